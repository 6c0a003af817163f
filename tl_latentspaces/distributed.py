"""Data-parallel runs with ``torch.distributed`` (launched by ``torchrun``; gloo on CPU, NCCL on GPUs).

Each rank takes every ``world_size``-th batch (so the minibatches match a single-process run), the
statistics are reduced across ranks as ``torch.save`` bytes read with ``weights_only=True``, and only
rank 0 writes files. A script of your own::

    ctx = init_distributed()
    ...                       # CorpusRunner(...).run(...), fit_tuned_lens(...), ...
    if ctx.is_main:
        ...                   # write results
    finish_distributed()
"""

from __future__ import annotations

import atexit
import io
import os
import socket
from dataclasses import dataclass
from typing import Any, Optional, Protocol, TypeVar

import torch
import torch.distributed as dist

from tl_latentspaces.files import torch_bytes

__all__ = ["encode_state", "decode_state", "DistContext", "init_distributed", "finish_distributed",
           "current_context", "shard_batches", "all_reduce_sum", "gather_states", "reduce_accumulator",
           "check_port_free"]


@dataclass(frozen=True)
class DistContext:
    """Where this process stands: ``rank`` of ``world_size`` (1 when not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: Optional[str] = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes files and prints summaries."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def current_context() -> DistContext:
    """The context of an initialized process group, or the single-process context."""
    if dist.is_available() and dist.is_initialized():
        return DistContext(
            rank=dist.get_rank(),
            world_size=dist.get_world_size(),
            local_rank=int(os.environ.get("LOCAL_RANK", 0)),
            backend=str(dist.get_backend()),
        )
    return DistContext()


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """Raise a clear error if ``port`` on ``host`` is already taken."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise RuntimeError(
                f"port {port} on {host} is already in use, so the process group cannot start there. "
                "Pick a free one (torchrun --master_port PORT) or stop the process holding it."
            ) from err


def init_distributed(backend: Optional[str] = None) -> DistContext:
    """Join the process group ``torchrun`` set up in the environment (``WORLD_SIZE > 1``), if there is one.

    The backend defaults to NCCL when CUDA is available and gloo otherwise.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return DistContext()
    if dist.is_initialized():
        return current_context()
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend not in ("gloo", "nccl"):
        raise ValueError(f"backend must be 'gloo' (CPU) or 'nccl' (GPU), got {backend!r}.")
    if backend == "nccl" and torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    try:
        dist.init_process_group(backend=backend)
    except (RuntimeError, ValueError) as err:
        port = os.environ.get("MASTER_PORT", "?")
        if "in use" in str(err).lower() or "EADDRINUSE" in str(err):
            raise RuntimeError(
                f"the process group could not bind MASTER_PORT={port}: it is already in use. "
                "Pass another port (torchrun --master_port PORT)."
            ) from err
        raise
    atexit.register(_destroy_group)
    return current_context()


def _destroy_group() -> None:
    """Tear the process group down, if one is up (no collective, so it cannot hang)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def finish_distributed() -> None:
    """Leave the process group cleanly: wait for every rank, then destroy the group (no-op without one).

    Call it after rank 0 has written its files, not after an error (a failed rank never reaches the
    barrier; the group is still destroyed at exit). Without the barrier, gloo can abort ranks that exit
    while others still hold the group ("terminate called without an active exception").
    """
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def shard_batches(n_batches: int, ctx: Optional[DistContext] = None) -> range:
    """The batch indices this rank processes: ``rank, rank + world_size, ...``."""
    ctx = ctx or current_context()
    return range(ctx.rank, n_batches, ctx.world_size)


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op without a process group); returns it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def encode_state(state: dict[str, Any]) -> torch.Tensor:
    """A (nested) state dict of tensors and plain values as one ``torch.save`` byte buffer (uint8)."""
    return torch.frombuffer(bytearray(torch_bytes(state)), dtype=torch.uint8)


def decode_state(buf: torch.Tensor) -> dict[str, Any]:
    """The state dict :func:`encode_state` wrote, on the CPU, read with ``weights_only=True`` (never code)."""
    return torch.load(io.BytesIO(buf.cpu().numpy().tobytes()), map_location="cpu", weights_only=True)


def gather_states(state: dict[str, Any]) -> list[dict[str, Any]]:
    """Every rank's ``state`` (tensors and numbers), in rank order, on every rank."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [state]
    buf = encode_state(state)
    world = dist.get_world_size()
    # gloo moves CPU tensors; NCCL needs them on this rank's GPU.
    dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    size = torch.tensor([buf.numel()], dtype=torch.int64, device=dev)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=dev)
    padded[: buf.numel()] = buf.to(dev)
    parts = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [decode_state(p[: int(s.item())].cpu()) for p, s in zip(parts, sizes)]


class _Mergeable(Protocol):
    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def merge(self, other: Any) -> Any: ...


A = TypeVar("A", bound=_Mergeable)


def reduce_accumulator(acc: A, fresh: Any) -> A:
    """Merge ``acc``'s statistics from every rank, in rank order, into ``acc`` on every rank; returns ``acc``.

    ``fresh`` is a zero-argument callable returning an empty accumulator of the same settings.
    """
    if not current_context().distributed:
        return acc  # one process: nothing to merge, so no state to build (a copy of every statistic)
    states = gather_states(acc.state_dict())
    merged = fresh()
    for state in states:
        part = fresh()
        part.load_state_dict(state)
        merged.merge(part)
    acc.load_state_dict(merged.state_dict())
    return acc
