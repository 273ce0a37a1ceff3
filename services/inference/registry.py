"""The models one server serves, by id."""

from __future__ import annotations

from llmo.core.errors import invalid_argument, not_found
from llmo.core.limits import preview
from llmo.inference.backends.base import Backend
from llmo.inference.engine.adapters import AdapterHandle


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
        """Resolve a model id, an adapter name or "models/{id}"; empty means the default model."""
        return self.resolve(model)[0]

    def resolve(self, model: str) -> tuple[Backend, str | None]:
        """The backend serving `model`, and the adapter name when `model` is one of its LoRA adapters."""
        model_id = model.removeprefix("models/") if model else self.default
        backend = self._backends.get(model_id)
        if backend is not None:
            return backend, None
        found = self.find_adapter(model_id)
        if found is not None:
            return found[0], model_id
        raise not_found("MODEL_NOT_FOUND", f"model {preview(model_id)!r} is not served here; see ListModels",
                        model=preview(model_id))

    def find_adapter(self, name: str) -> tuple[Backend, AdapterHandle] | None:
        """The adapter called `name` and the backend serving it, if one is loaded."""
        for candidate in self._backends.values():
            adapters = getattr(candidate, "adapters", None)
            handle = adapters.get(name) if adapters is not None else None
            if handle is not None:
                return candidate, handle
        return None

    def adapter_owner(self, name: str) -> Backend | None:
        """The backend that serves an adapter called `name`, if any."""
        found = self.find_adapter(name)
        return found[0] if found is not None else None

    def is_model_id(self, name: str) -> bool:
        return name in self._backends

    def adapters(self) -> list[tuple[Backend, AdapterHandle]]:
        """Every loaded adapter with the backend it runs on, by adapter name."""
        found = []
        for backend in self.all():
            registry = getattr(backend, "adapters", None)
            if registry is not None:
                found += [(backend, handle) for handle in registry.handles()]
        return sorted(found, key=lambda pair: pair[1].name)

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
