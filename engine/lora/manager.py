"""LoraManager: the adapter registry, the CPU LRU cache and the GPU slots, for one engine.

Adapters are registered by name (validated by reading them once). Every registration (a first
load, an in-place reload, a load after an unload) gets a new id from a counter that never
repeats, stamped as its LoRARequest.lora_int_id; the CPU cache and the GPU slots are keyed by
that id, so a slot left over from an unloaded or replaced registration can never serve another
one, even before the step thread frees it. A request holds an AdapterHandle (one
registration), so an in-place reload serves new requests only and an unload lets running
requests finish. The step thread asks try_pin() for a slot when it admits a sequence: a
GPU-resident adapter is pinned at once; one in the CPU cache is copied into a free or evicted
slot; one only on disk is read by a background thread while other requests keep running, and
pinned once read, if its files still match the fingerprint of the read that validated it (else
its requests fail with AdapterFilesChanged until it is reloaded). The manager never touches the
device: a slot write or clear is an AdapterOp that the engine hands to the worker (`take_ops`)
before the step that needs it. Registry and CPU cache are shared with the caller's thread under
a lock; slots belong to the step thread alone.
"""

from __future__ import annotations

import itertools
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

import torch

from loramux.engine.config import LoraConfig, ModelConfig
from loramux.engine.errors import AdapterAlreadyExists, AdapterNotFound
from loramux.engine.lora.adapter import read_adapter
from loramux.engine.lora.files import Fingerprint
from loramux.engine.lora.weights import LoraAdapter
from loramux.engine.memory import AdapterSlots
from loramux.engine.plan import AdapterOp, ClearAdapter, WriteAdapter
from loramux.engine.request import LoRARequest

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AdapterHandle:
    """One registration of an adapter; request.lora_int_id is its never-reused id."""

    request: LoRARequest
    fingerprint: Fingerprint = ()  # of the validating read; a re-read from disk must match it

    @property
    def name(self) -> str:
        return self.request.lora_name

    @property
    def key(self) -> int:
        return self.request.lora_int_id


class LoraManager:
    def __init__(self, config: LoraConfig, model_config: ModelConfig, native_layout: str,
                 slots: AdapterSlots, dtype: torch.dtype = torch.float32,
                 base_model: str | None = None) -> None:
        self.config = config
        self.dtype = dtype  # the serving dtype, which adapter values must fit
        self.base_model = base_model  # the served checkpoint, to warn of adapters of another
        self.model_config = model_config
        self.native_layout = native_layout
        self.slots = slots  # the engine's pool (MemoryPools.adapters): pins end with a sequence
        self.cpu_capacity = config.cpu_capacity
        self._ops: list[AdapterOp] = []  # slot writes and clears for the worker, in order
        self._registry: dict[str, AdapterHandle] = {}
        self._cpu: OrderedDict[int, LoraAdapter] = OrderedDict()
        self._loading: dict[int, Future] = {}
        self._blocked: set[int] = set()
        self._ids = itertools.count(1)  # registration ids: never reused, even after an unload
        self._lock = threading.Lock()
        self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lora-reader")
        self.loads_total = 0  # adapter copies into GPU slots
        self.evictions_total = 0  # adapters pushed out of a GPU slot for another
        self.disk_reads_total = 0  # re-reads of adapters that had left the CPU cache
        self.reads_total = 0  # every read of an adapter's files: first loads and re-reads

    # --- registry (any thread) -------------------------------------------------------------
    def read(self, req: LoRARequest, expected: Fingerprint | None = None) -> LoraAdapter:
        """Read and validate an adapter's files (blocking; no engine state is touched).

        expected: a re-read, whose files must match this fingerprint (AdapterFilesChanged).
        """
        self.reads_total += 1
        return read_adapter(
            req.lora_name, req.lora_path, self.model_config, self.config.max_lora_rank,
            is_3d_lora_weight=req.is_3d_lora_weight, native_layout=self.native_layout,
            allow_mixed=self.config.enable_mixed_moe_lora_format, dtype=self.dtype,
            base_model=self.base_model, allowed_roots=req.allowed_roots, expected=expected)

    def read_later(self, req: LoRARequest, expected: Fingerprint | None = None) -> Future:
        """read() on the reader thread. One thread for every read (first loads and re-reads):
        a read is mostly Python holding the GIL, so reads in parallel would slow the steps."""
        return self._reader.submit(self.read, req, expected)

    def check_new(self, req: LoRARequest) -> None:
        with self._lock:
            if req.lora_name in self._registry and not req.load_inplace:
                raise AdapterAlreadyExists(
                    f"The lora adapter '{req.lora_name}' has already been loaded. If you want "
                    "to load the adapter in place, set 'load_inplace' to True.")

    def register(self, req: LoRARequest, adapter: LoraAdapter) -> AdapterHandle:
        """Make a read adapter servable under its name, as a registration with a new id."""
        self.check_new(req)
        with self._lock:
            old = self._registry.get(req.lora_name)
            handle = AdapterHandle(replace(req, lora_int_id=next(self._ids)), adapter.fingerprint)
            self._registry[req.lora_name] = handle
            self._cache_put(handle.key, adapter)
            if old is not None:
                self._cpu.pop(old.key, None)
        logger.info("adapter %s registered (%s, expert layout %s, rank %d)", req.lora_name,
                    req.lora_path, adapter.expert_layout or "none", adapter.rank)
        return handle

    def unregister(self, name: str) -> None:
        with self._lock:
            handle = self._registry.pop(name, None)
            if handle is None:
                raise AdapterNotFound(f"The lora adapter '{name}' cannot be found.")
            self._cpu.pop(handle.key, None)
        logger.info("adapter %s unregistered", name)

    def resolve(self, name: str) -> AdapterHandle:
        with self._lock:
            handle = self._registry.get(name)
        if handle is None:
            raise AdapterNotFound(f"The model `{name}` does not exist.")
        return handle

    def list(self) -> list[LoRARequest]:
        with self._lock:
            return [h.request for h in self._registry.values()]

    def residency(self) -> dict[str, str]:
        with self._lock:
            handles = list(self._registry.values())
            cpu = set(self._cpu)
        return {h.name: "gpu" if self.slots.lookup(h.key) is not None
                else "cpu" if h.key in cpu else "disk" for h in handles}

    def _cache_put(self, key: int, adapter: LoraAdapter) -> None:
        self._cpu[key] = adapter
        self._cpu.move_to_end(key)
        while len(self._cpu) > self.cpu_capacity:
            self._cpu.popitem(last=False)

    def _cache_get(self, key: int) -> LoraAdapter | None:
        with self._lock:
            adapter = self._cpu.get(key)
            if adapter is not None:
                self._cpu.move_to_end(key)
            return adapter

    # --- slots (step thread) ---------------------------------------------------------------
    def try_pin(self, handle: AdapterHandle) -> int | None:
        """A pinned slot holding the adapter, or None if it must wait (reading, or no slot)."""
        slot = self.slots.lookup(handle.key)
        if slot is not None:
            self.slots.pin(slot)
            return slot
        adapter = self._cache_get(handle.key) or self._fetch(handle)
        if adapter is None:
            return None
        taken = self.slots.take()
        if taken is None:
            self._blocked.add(handle.key)  # keeps its read (in _loading) until a slot frees
            return None
        slot, evicted = taken
        if evicted is not None:
            self.evictions_total += 1
            logger.debug("evicted adapter registration %d from slot %d", evicted, slot)
        self._ops.append(WriteAdapter(slot, adapter.weights))
        self.slots.assign(slot, handle.key)
        self.slots.pin(slot)
        self._blocked.discard(handle.key)
        self._loading.pop(handle.key, None)
        self.loads_total += 1
        return slot

    def is_waiting_for_slot(self, handle: AdapterHandle) -> bool:
        return handle.key in self._blocked

    def _fetch(self, handle: AdapterHandle) -> LoraAdapter | None:
        """Start or finish a background re-read of an adapter that left the CPU cache.

        A finished read stays in _loading until a slot takes it: a registration that was
        unloaded or replaced while its requests wait is not cached, and throwing its read away
        when no slot is free would make those requests read again, and lose their turn, forever.
        """
        future = self._loading.get(handle.key)
        if future is None:
            self._loading[handle.key] = self.read_later(handle.request, handle.fingerprint)
            self.disk_reads_total += 1
            return None
        if not future.done():
            return None
        if future.exception() is not None:
            del self._loading[handle.key]  # the next request of it reads again
            raise future.exception()  # typed: the scheduler fails this request
        adapter = future.result()
        with self._lock:
            if self._registry.get(handle.name) == handle and handle.key not in self._cpu:
                self._cache_put(handle.key, adapter)
        return adapter

    def release_stale(self, waiting: set[int]) -> None:
        """Free idle slots and finished reads of registrations that were unloaded or replaced,
        unless a waiting request still holds that registration (its key is in `waiting`).
        Called every step."""
        with self._lock:
            keep = {h.key for h in self._registry.values()} | waiting
        for slot in self.slots.idle_slots():
            if self.slots.key_of[slot] not in keep:
                self.slots.release(slot)
                self._ops.append(ClearAdapter(slot))
        for key in [k for k, future in self._loading.items() if k not in keep and future.done()]:
            del self._loading[key]
        self._blocked &= keep

    def take_ops(self) -> list[AdapterOp]:
        """The slot writes and clears decided since the last call, for Worker.apply."""
        ops, self._ops = self._ops, []
        return ops

    def shutdown(self) -> None:
        self._reader.shutdown(wait=False, cancel_futures=True)
