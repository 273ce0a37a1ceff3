from llmo.core.storage import run_alembic_env
from llmo.evaluation.storage import metadata

run_alembic_env(metadata)
