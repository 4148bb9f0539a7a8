"""Tensor / expert parallelism: N ranks over torch.distributed, one Worker on each.

The engine's process is rank 0. `ParallelWorker` has the Worker methods the engine calls
(plan_memory, allocate, apply, execute, shutdown); each call's plain data (engine/plan.py) is
broadcast to ranks 1..N-1 (spawned processes running `_serve`), every rank runs the same call
on its shard (engine/model/parallel.py), and rank 0's result is the answer. Control messages
go through broadcast_object_list on a gloo group; the model's all_reduces use the default group
(gloo on CPU, NCCL on CUDA, with NVLink multicast off). The scheduler, the LoraManager and its
CPU LRU live once, in the engine; a WriteAdapter op carries the whole adapter and each rank
copies its part into its slot buffers. Every rank sizes its pools from its own budget, and all
take the smallest plan, so every rank has the same KV blocks and state slots.

A rank that dies closes its connections, so rank 0's next collective fails at once and the
engine stops with EngineStopped naming the rank and its exit code, instead of waiting.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from loramux.engine.config import EngineConfig, ModelConfig
from loramux.engine.errors import EngineStopped
from loramux.engine.memory import MemoryPlan
from loramux.engine.model.parallel import Shard, check_shardable
from loramux.engine.plan import AdapterOp, SampleResult, StepPlan
from loramux.engine.worker.worker import Worker, resolve_device
from loramux.kernels import reference, select_ops

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_JOIN_S = 10.0  # how long shutdown waits for a rank to leave before it is terminated
_STARTUP_POLL_S = 0.05
# The multi-GPU hosts here need NVLink multicast off (NCCL's NVLS and torch's symmetric memory)
_NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}


def _join(store: dist.TCPStore, rank: int, size: int, device: torch.device):
    """Join the default group and return the gloo group for control messages."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, store=store, rank=rank, world_size=size,
                            timeout=datetime.timedelta(hours=1))
    return None if backend == "gloo" else dist.new_group(backend="gloo")


def _serve(rank: int, port: int, config: EngineConfig, model_config: ModelConfig,
           max_model_len: int) -> None:
    """Ranks 1..N-1: build the shard's Worker, then run what rank 0 broadcasts until "stop"."""
    size = config.parallel.tensor_parallel_size
    shard = Shard(rank, size, config.parallel.enable_expert_parallel)
    store = dist.TCPStore(_HOST, port, size, is_master=False)
    store.set(f"up{rank}", "1")
    device = resolve_device(config.device)
    if device.type == "cpu":  # the ranks share the host's cores
        torch.set_num_threads(max(1, torch.get_num_threads() // size))
    group = _join(store, rank, size, torch.device("cuda", rank) if device.type == "cuda"
                  else device)
    try:
        worker = Worker(config, model_config, max_model_len, shard)
        while True:
            message: list[Any] = [None]
            dist.broadcast_object_list(message, src=0, group=group)
            kind, arg = message[0]
            if kind == "stop":
                break
            if kind in ("plan_memory", "summary"):
                value = worker.plan_memory() if kind == "plan_memory" else worker.summary()
                dist.gather_object(value, None, dst=0, group=group)
            elif kind == "allocate":
                worker.allocate(arg)
            elif kind == "apply":
                worker.apply(arg)
            else:
                worker.execute(arg)
    finally:
        dist.destroy_process_group()


def smallest_plan(plans: list[MemoryPlan]) -> MemoryPlan:
    """The plan every rank can hold: the fewest KV blocks and state slots of each kind."""
    slots = {kind: min(p.state_slots[kind] for p in plans) for kind in plans[0].state_slots}
    return dataclasses.replace(min(plans, key=lambda p: p.num_blocks), state_slots=slots)


class ParallelWorker:
    """Rank 0 and the handles of ranks 1..N-1, behind the Worker methods the engine calls."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig,
                 max_model_len: int) -> None:
        parallel = config.parallel
        size, expert_parallel = parallel.tensor_parallel_size, parallel.enable_expert_parallel
        check_shardable(model_config, size, expert_parallel)
        device = resolve_device(config.device)
        if expert_parallel and select_ops(device, config.kernel_backend) is not reference:
            raise ValueError("--enable-expert-parallel runs on the torch ops for now (the "
                             "Triton fused MoE does not skip other ranks' experts yet): add "
                             "--kernel-backend torch")
        if device.type == "cuda" and torch.cuda.device_count() < size:
            raise ValueError(f"tensor_parallel_size {size} needs {size} GPUs, "
                             f"{torch.cuda.device_count()} visible")
        if dist.is_initialized():
            raise ValueError("one tensor-parallel engine per process: shut the other down "
                             "first")
        os.environ.update(_NCCL_ENV)
        store = dist.TCPStore(_HOST, 0, size, is_master=True, wait_for_workers=False)
        context = mp.get_context("spawn")
        self.ranks = [context.Process(target=_serve, name=f"loramux-rank{rank}", daemon=True,
                                       args=(rank, store.port, config, model_config,
                                             max_model_len))
                       for rank in range(1, size)]
        for process in self.ranks:
            process.start()
        self._stopped = False
        try:
            self._wait_for_ranks(store)
            self._group = _join(store, 0, size, torch.device("cuda", 0)
                                if device.type == "cuda" else device)
            self.local = Worker(config, model_config, max_model_len,
                                Shard(0, size, expert_parallel))
        except BaseException:
            self.shutdown()
            raise
        self.native_layout, self.dtype = self.local.native_layout, self.local.dtype
        self.device = self.local.device
        logger.info("%s parallelism over %d ranks (%s)",
                    "expert" if expert_parallel else "tensor", size,
                    dist.get_backend())

    def _wait_for_ranks(self, store: dist.TCPStore) -> None:
        """Wait until every rank has reached the store; one that exits first is an error."""
        for rank, process in enumerate(self.ranks, start=1):
            while not store.check([f"up{rank}"]):
                if not process.is_alive():
                    raise EngineStopped(self._lost())
                time.sleep(_STARTUP_POLL_S)

    def _lost(self) -> str:
        for process in self.ranks:
            process.join(timeout=1.0)
        dead = [f"rank {rank} (exit code {p.exitcode})"
                for rank, p in enumerate(self.ranks, start=1) if not p.is_alive()]
        return ("a tensor-parallel worker exited: " + ", ".join(dead or ["unknown"])
                + "; see its log above")

    def _send(self, kind: str, arg: Any = None) -> None:
        try:
            dist.broadcast_object_list([(kind, arg)], src=0, group=self._group)
        except RuntimeError as exc:
            raise EngineStopped(self._lost()) from exc

    def _gather(self, value: Any) -> list[Any]:
        values: list[Any] = [None] * (len(self.ranks) + 1)
        try:
            dist.gather_object(value, values, dst=0, group=self._group)
        except RuntimeError as exc:
            raise EngineStopped(self._lost()) from exc
        return values

    def plan_memory(self) -> MemoryPlan:
        self._send("plan_memory")
        return smallest_plan(self._gather(self.local.plan_memory()))

    def allocate(self, plan: MemoryPlan) -> None:
        self._send("allocate", plan)
        self.local.allocate(plan)

    def summaries(self) -> list[dict]:
        """Worker.summary of every rank, in rank order."""
        self._send("summary")
        return self._gather(self.local.summary())

    def apply(self, ops: list[AdapterOp]) -> None:
        if ops:
            self._send("apply", ops)
            self.local.apply(ops)

    def execute(self, plan: StepPlan) -> SampleResult | None:
        self._send("execute", plan)
        try:
            return self.local.execute(plan)
        except RuntimeError as exc:  # an all_reduce whose peer is gone
            if all(p.is_alive() for p in self.ranks):
                raise
            raise EngineStopped(self._lost()) from exc

    def shutdown(self) -> None:
        """Stop every rank (terminated if it does not leave) and leave the group."""
        if self._stopped:
            return
        self._stopped = True
        if dist.is_initialized():
            if all(p.is_alive() for p in self.ranks):
                try:
                    dist.broadcast_object_list([("stop", None)], src=0, group=self._group)
                except RuntimeError:
                    logger.warning("a tensor-parallel worker was gone at shutdown")
            dist.destroy_process_group()
        for process in self.ranks:
            process.join(timeout=_JOIN_S)
            if process.is_alive():
                process.terminate()
                process.join()
