from llmo.core.storage import run_alembic_env
from llmo.router.store import metadata

run_alembic_env(metadata)
