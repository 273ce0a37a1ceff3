"""The models one server serves, by id."""

from __future__ import annotations

from llmo.core.errors import invalid_argument, not_found
from llmo.core.limits import preview
from llmo.inference.backends.base import Backend


class ModelRegistry:
    def __init__(self, backends: list[Backend]) -> None:
        if not backends:
            raise ValueError("at least one model backend is needed")
        self._backends = {b.model_id: b for b in backends}
        self.default = backends[0].model_id

    def ids(self) -> list[str]:
        return sorted(self._backends)

    def all(self) -> list[Backend]:
        return [self._backends[i] for i in self.ids()]

    def get(self, model: str) -> Backend:
        """Resolve a model id or "models/{id}"; empty means the default model."""
        model_id = model.removeprefix("models/") if model else self.default
        backend = self._backends.get(model_id)
        if backend is None:
            raise not_found("MODEL_NOT_FOUND", f"model {preview(model_id)!r} is not served here; see ListModels",
                            model=preview(model_id))
        return backend

    def by_name(self, name: str) -> Backend:
        if not name.startswith("models/") or len(name) <= len("models/"):
            raise invalid_argument("INVALID_MODEL_NAME",
                                   f"model name must be 'models/{{model}}', got {preview(name)!r}", field="name")
        return self.get(name)

    async def start(self) -> None:
        for backend in self._backends.values():
            await backend.start()

    async def stop(self) -> None:
        for backend in self._backends.values():
            await backend.stop()
