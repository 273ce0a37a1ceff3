"""Names of the served LoRA adapters, their slots, and the requests using them.

Loading writes the weights into a free slot before the name becomes visible, so no
step ever reads a half-written slot. Unloading hides the name at once (new requests
get ADAPTER_NOT_FOUND) and frees the slot when the last request using it ends, so
requests already running finish with the adapter they started with.

Every load gets a fresh cache salt: prefix-cache blocks computed with one adapter (or
an earlier load under the same name) are never reused for another.
"""

from __future__ import annotations

import re
import secrets
import threading
import time
from dataclasses import dataclass, field

from llmo.inference.models.lora import AdapterError, AdapterSlots, LoraAdapter

# Adapter names are model ids in the OpenAI API: same alphabet as model ids.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/@-]{0,127}$")


@dataclass
class AdapterHandle:
    """A loaded adapter; `slot` is its row in every projection's slot stack."""

    name: str
    slot: int
    source: str
    rank: int
    alpha: float
    target_modules: list[str]
    nbytes: int
    salt: bytes
    loaded_at: float = field(default_factory=time.time)
    users: int = 0
    unloading: bool = False


class AdapterRegistry:
    def __init__(self, slots: AdapterSlots, base_model_id: str) -> None:
        self.slots = slots
        self.base_model_id = base_model_id
        self._lock = threading.Lock()
        self._by_name: dict[str, AdapterHandle] = {}
        self._by_slot: dict[int, AdapterHandle] = {}

    @property
    def capacity(self) -> int:
        return self.slots.slots

    def names(self) -> list[str]:
        with self._lock:
            return sorted(self._by_name)

    def handles(self) -> list[AdapterHandle]:
        with self._lock:
            return [self._by_name[n] for n in sorted(self._by_name)]

    def get(self, name: str) -> AdapterHandle | None:
        with self._lock:
            return self._by_name.get(name)

    def check_name(self, name: str) -> None:
        if not NAME_PATTERN.match(name):
            raise AdapterError("INVALID_ADAPTER_NAME", f"adapter name must match {NAME_PATTERN.pattern}, got {name[:64]!r}")
        if name == self.base_model_id:
            raise AdapterError("INVALID_ADAPTER_NAME", f"{name!r} is the base model's id")

    def load(self, name: str, adapter: LoraAdapter, source: str) -> AdapterHandle:
        """Serve `adapter` as `name` (a checked adapter; reading it is the caller's, off any lock)."""
        self.check_name(name)
        with self._lock:
            if name in self._by_name:
                raise AdapterError("ADAPTER_EXISTS", f"an adapter named {name!r} is already loaded; unload it first")
            free = next((s for s in range(self.slots.slots) if s not in self._by_slot), None)
            if free is None:
                raise AdapterError("ADAPTER_LIMIT",
                                   f"all {self.slots.slots} adapter slots are in use (LLMO_INFERENCE_MAX_ADAPTERS); "
                                   "unload one first")
            handle = AdapterHandle(name, free, source, adapter.rank, adapter.alpha, adapter.target_modules,
                                   adapter.nbytes, secrets.token_bytes(16))
            self._by_slot[free] = handle  # reserved: no other load takes the slot while it is written
        try:
            self.slots.write(free, adapter)
        except BaseException:
            with self._lock:
                self._by_slot.pop(free, None)
            raise
        with self._lock:
            self._by_name[name] = handle
        return handle

    def unload(self, name: str) -> AdapterHandle:
        with self._lock:
            handle = self._by_name.pop(name, None)
            if handle is None:
                raise AdapterError("ADAPTER_NOT_FOUND", f"no adapter named {name!r} is loaded")
            handle.unloading = True
            free_now = handle.users == 0
        if free_now:
            self._free(handle)
        return handle

    def acquire(self, name: str) -> AdapterHandle:
        """A request starts using `name`; pair with `release`."""
        with self._lock:
            handle = self._by_name.get(name)
            if handle is None:
                raise AdapterError("ADAPTER_NOT_FOUND", f"no adapter named {name!r} is loaded")
            handle.users += 1
            return handle

    def release(self, handle: AdapterHandle) -> None:
        with self._lock:
            handle.users -= 1
            free_now = handle.unloading and handle.users == 0
        if free_now:
            self._free(handle)

    def _free(self, handle: AdapterHandle) -> None:
        self.slots.clear(handle.slot)
        with self._lock:
            self._by_slot.pop(handle.slot, None)
