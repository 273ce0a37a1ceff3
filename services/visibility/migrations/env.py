from llmo.core.storage import run_alembic_env
from llmo.visibility.storage import metadata

run_alembic_env(metadata)
