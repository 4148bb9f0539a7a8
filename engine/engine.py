"""Engine: EngineCore driven by a step-loop thread, with an asyncio-friendly front.

Callers (the HTTP server's event loop) never touch engine state directly: requests and aborts go
through a command queue the step thread drains before each step, and outputs come back through
per-request asyncio queues. Adapter registrations go to the LoraManager's registry, which is
shared under its lock (the step thread only reads it). Stats are the step thread's snapshot
(EngineCore.stats). The thread sleeps when there is no work.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator
import dataclasses

from loramux.engine.config import EngineConfig
from loramux.engine.core import EngineCore
from loramux.engine.errors import AdapterLoadError, EngineOverloaded, EngineStopped
from loramux.engine.request import LoRARequest, RequestOutput, SamplingParams
from loramux.engine.stats import EngineStats

logger = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.5  # how long the loop sleeps with nothing to do (new work wakes it at once)
_POLL_S = 0.002  # pause when every waiting request waits on an adapter being read


class Engine:
    def __init__(self, config: EngineConfig) -> None:
        self.core = EngineCore(config)
        self.tokenizer = self.core.tokenizer
        self.max_model_len = self.core.max_model_len
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        self._wake = threading.Event()
        self._streams: dict[str, tuple[asyncio.AbstractEventLoop, asyncio.Queue]] = {}
        self._thread: threading.Thread | None = None
        self._stop = False
        self._stats: EngineStats = self.core.stats()
        self._alive = True

    @property
    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._alive

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="engine-step", daemon=True)
        self._thread.start()

    def shutdown(self) -> None:
        self._stop = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self.core.lora is not None:
            self.core.lora.shutdown()
        self.core.shutdown()

    # --- requests --------------------------------------------------------------------------
    async def generate(self, prompt_token_ids: list[int], params: SamplingParams,
                       lora: str | None = None,
                       request_id: str | None = None) -> AsyncIterator[RequestOutput]:
        """Stream a request's outputs; leaving the iteration early aborts the request."""
        if not self.is_alive:
            raise EngineStopped("the engine loop is not running")
        rid = request_id or uuid.uuid4().hex
        handle = self.core.resolve_lora(lora)
        if params.structured_outputs is not None:  # compile (cached) off the event loop
            await asyncio.get_running_loop().run_in_executor(
                None, self.core.grammars.compile, params.structured_outputs)
        state = self.core.make_request(rid, prompt_token_ids, params, handle)
        out_queue: asyncio.Queue = asyncio.Queue()
        self._streams[rid] = (asyncio.get_running_loop(), out_queue)
        self._submit(("add", state))
        finished = False
        try:
            while not finished:
                item = await out_queue.get()
                if isinstance(item, Exception):
                    raise item
                finished = item.finished
                yield item
        finally:
            self._streams.pop(rid, None)
            if not finished:
                self.abort(rid)

    def abort(self, request_id: str) -> None:
        self._submit(("abort", request_id))

    def _submit(self, command: tuple) -> None:
        self._commands.put(command)
        self._wake.set()

    # --- adapters --------------------------------------------------------------------------
    async def add_lora(self, req: LoRARequest) -> None:
        manager = self._lora()
        manager.check_new(req)
        adapter = await asyncio.wrap_future(manager.read_later(req))
        manager.register(req, adapter)

    async def remove_lora(self, name: str) -> None:
        self._lora().unregister(name)
        self._wake.set()

    def list_loras(self) -> list[LoRARequest]:
        return [] if self.core.lora is None else self.core.lora.list()

    def _lora(self):
        if self.core.lora is None:
            raise AdapterLoadError("LoRA is not enabled on this server (start with --enable-lora)")
        return self.core.lora

    def stats(self) -> EngineStats:
        """The step thread's latest snapshot, with adapter residency and liveness as of now."""
        residency = {} if self.core.lora is None else self.core.lora.residency()
        return dataclasses.replace(self._stats, adapter_residency=residency,
                                   is_alive=self.is_alive)

    # --- the step thread -------------------------------------------------------------------
    def _loop(self) -> None:
        core = self.core
        while not self._stop:
            try:
                self._drain()
                if not core.has_work():
                    self._stats = core.stats()
                    self._wake.wait(_IDLE_WAIT_S)
                    self._wake.clear()
                    continue
                outputs = core.step()
                self._stats = core.stats()
                for out in outputs:
                    self._deliver(out.request_id, out)
                if not outputs and not self._stats.num_running:
                    time.sleep(_POLL_S)
            except Exception:
                logger.exception("engine step failed; the engine is stopping")
                self._alive = False
                self._fail_all(EngineStopped("the engine loop failed; see the server log"))
                return

    def _drain(self) -> None:
        while True:
            try:
                kind, arg = self._commands.get_nowait()
            except queue.Empty:
                return
            if kind == "add":
                try:
                    self.core.add(arg)
                except EngineOverloaded as err:  # tell that request only
                    self._deliver(arg.request_id, err)
            elif kind == "abort":
                out = self.core.abort(arg)
                if out is not None:
                    self._deliver(arg, out)

    def _deliver(self, request_id: str, item) -> None:
        stream = self._streams.get(request_id)
        if stream is None:
            return
        loop, out_queue = stream
        if isinstance(item, RequestOutput) and item.error is not None:
            item = item.error
        loop.call_soon_threadsafe(out_queue.put_nowait, item)

    def _fail_all(self, err: Exception) -> None:
        for loop, out_queue in list(self._streams.values()):
            loop.call_soon_threadsafe(out_queue.put_nowait, err)
