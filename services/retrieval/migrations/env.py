from llmo.core.storage import run_alembic_env
from llmo.retrieval.storage import metadata

run_alembic_env(metadata)
