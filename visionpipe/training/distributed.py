"""Data-parallel training with torch.distributed: the process group from the torchrun environment, rank
helpers, global-batch shards, batch norm over the global batch, DDP / FSDP2 wrapping, and `run_torchrun`, the
local launcher (``python -m torch.distributed.run --standalone``).

The scheme (visionpipe/training/loop.py `train_epoch`): every rank draws the same seeded global batch, loads and
augments / mixes all of it with the same generator (so the randomness never depends on the world size), and
runs forward / backward on its contiguous shard only. The loss of a shard is its weighted sum over the global
batch's weight total, times the world size, because DDP averages gradients over ranks
(torch/nn/parallel/distributed.py: the reducer divides by the process-group size); the averaged gradient is
then the one-process gradient of the whole global batch. Batch norm layers use the global batch's statistics
(`GlobalBatchNorm`): torch's own SyncBatchNorm refuses CPU tensors (torch/nn/modules/batchnorm.py,
SyncBatchNorm.forward: "SyncBatchNorm expected input tensor to be on GPU ..."), so gloo on CPU could not run it.
Dropout masks are drawn per rank from torch's generator seeded by (seed, epoch): the same distribution, other
masks than a single process draws, so only dropout-free models match one process bit for bit in law.

With no torchrun environment (WORLD_SIZE unset or 1) nothing here changes the one-process loop.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from visionpipe.training.errors import TrainError

T = TypeVar("T")
Log = Callable[[str], None]

STRATEGIES = ("ddp", "fsdp2")
KILL_HOOK_ENV = "VISIONPIPE_TEST_KILL_AT_STEP"  # "<rank>:<step>": SIGKILL that rank after that optimizer step
GROUP_TIMEOUT_S = float(os.environ.get("VISIONPIPE_DIST_TIMEOUT_S", "1800"))


class TorchrunFailed(TrainError):
    """A torchrun launch exited non-zero or ran out of time; the message carries the workers' last lines."""


# ------------------------------------------------------------------------------------------ the process group


@dataclass(frozen=True)
class DistContext:
    """Where this process stands in the job: global rank, rank on its node, world size, backend."""

    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str = ""

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


SINGLE = DistContext()


def env_context(environ: Mapping[str, str] | None = None) -> DistContext:
    """The torchrun environment (RANK, LOCAL_RANK, WORLD_SIZE; torch/distributed/run.py sets them), else one
    process."""
    env = os.environ if environ is None else environ
    try:
        world = int(env.get("WORLD_SIZE", "1"))
        rank = int(env.get("RANK", "0"))
        local = int(env.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise TrainError(
            f"torchrun environment is malformed ({exc}); WORLD_SIZE / RANK / LOCAL_RANK must be integers"
        ) from exc
    if world < 1 or not 0 <= rank < world:
        raise TrainError(f"torchrun environment RANK={rank} WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
    return DistContext(rank=rank, local_rank=local, world_size=world)


def init(device: torch.device, environ: Mapping[str, str] | None = None) -> tuple[DistContext, torch.device]:
    """Join the process group of a torchrun launch (gloo on CPU, nccl on CUDA); returns the context and this
    rank's device (cuda:LOCAL_RANK under CUDA). Without a torchrun environment: one process, nothing started."""
    ctx = env_context(environ)
    if device.type == "cuda" and ctx.world_size > 1:
        device = torch.device("cuda", ctx.local_rank)
        torch.cuda.set_device(device)
    if ctx.world_size == 1 or dist.is_initialized():
        return current(), device
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = timedelta(seconds=GROUP_TIMEOUT_S)
    # env:// rendezvous: MASTER_ADDR / MASTER_PORT come from torchrun (torch/distributed/run.py). Under
    # torchrun's c10d rendezvous every attempt reuses the agent's one TCPStore (torch/distributed/rendezvous.py
    # _create_c10d_store, torch/distributed/elastic/rendezvous/api.py RendezvousStoreInfo.build with a shared
    # server_port), so after a --max-restarts restart the new group would read the dead attempt's gloo addresses
    # from it ("Connection refused" in connectFullMesh, seen here); the keys get a per-attempt prefix instead.
    store, rank, world = next(rendezvous("env://", timeout=timeout))
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
    prefixed = PrefixStore(f"visionpipe/attempt-{attempt}", store)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world, timeout=timeout)
    return current(), device


def current() -> DistContext:
    """The context of the initialised process group, else one process."""
    if not (dist.is_available() and dist.is_initialized()):
        return SINGLE
    local = int(os.environ.get("LOCAL_RANK", "0"))
    return DistContext(dist.get_rank(), local, dist.get_world_size(), str(dist.get_backend()))


def shutdown() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


def broadcast(ctx: DistContext, value: T) -> T:
    """Rank 0's `value` on every rank (picklable objects)."""
    if not ctx.enabled:
        return value
    box: list[object] = [value if ctx.is_main else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]  # type: ignore[return-value]  # rank 0 sent a T; broadcast_object_list is untyped (object)


def all_sum(ctx: DistContext, value: float) -> float:
    """The sum of `value` over the ranks (float64)."""
    if not ctx.enabled:
        return value
    t = torch.tensor([value], dtype=torch.float64)
    if ctx.backend == "nccl":
        t = t.cuda()
    dist.all_reduce(t)
    return float(t.item())


def agree(ctx: DistContext, action: Callable[[], None], on: Callable[[DistContext], bool]) -> None:
    """Run `action` on the ranks where `on(ctx)` holds (e.g. local rank 0 downloads), then make every rank
    raise when any of them failed, so no rank waits forever at the next collective for a failed one."""
    failure = ""
    if on(ctx):
        try:
            action()
        except Exception as exc:  # re-raised below, on every rank, with its message
            failure = f"{type(exc).__name__}: {exc}"
            if not ctx.enabled:
                raise
    if not ctx.enabled:
        return
    gathered: list[object] = [None] * ctx.world_size
    dist.all_gather_object(gathered, failure)
    failures = [f"rank {r}: {f}" for r, f in enumerate(gathered) if f]
    if failures:
        raise TrainError("; ".join(str(f) for f in failures))


def shard_bounds(n: int, world_size: int, rank: int) -> tuple[int, int]:
    """[start, stop) of `rank`'s contiguous shard of a global batch of n images (np.array_split's sizes)."""
    if n < world_size:
        raise TrainError(
            f"a global batch of {n} images cannot be split over {world_size} workers; use batch_size >= "
            f"{2 * world_size} (the last batch may be half a batch) or fewer workers"
        )
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def maybe_kill_for_test(ctx: DistContext, step: int) -> None:
    """Test hook: with VISIONPIPE_TEST_KILL_AT_STEP=<rank>:<step>, SIGKILL that rank right after that optimizer
    step, on the first attempt only (TORCHELASTIC_RESTART_COUNT=0; torch/distributed/elastic/agent/server/
    local_elastic_agent.py sets it), so torchrun's --max-restarts restarts the group from the last checkpoint."""
    hook = os.environ.get(KILL_HOOK_ENV, "")
    if not hook or os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") != "0":
        return
    rank, _, at = hook.partition(":")
    if int(rank) == ctx.rank and int(at) == step:
        os.kill(os.getpid(), signal.SIGKILL)


# ------------------------------------------------------------------------------ batch norm over the global batch


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with the adjoint backward (the gradient summed over ranks), as
    torch/distributed/nn/functional.py's _AllReduce does (that public one is deprecated in 2.14)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, tensor: Tensor) -> Tensor:
        out = tensor.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> Tensor:
        out = grad.contiguous().clone()
        dist.all_reduce(out)
        return out


def sum_over_ranks(tensor: Tensor) -> Tensor:
    out = _SumOverRanks.apply(tensor)
    assert isinstance(out, Tensor)
    return out


def global_batch_norm(bn: nn.modules.batchnorm._BatchNorm, x: Tensor) -> Tensor:
    """Training-mode batch norm with the mean / variance of the global batch (every rank's shard), computed in
    fp32 in two passes (mean, then centred squares); running statistics updated as F.batch_norm does (unbiased
    variance, momentum or cumulative average), so all ranks keep the same buffers."""
    dims = [0, *range(2, x.dim())]
    shape = [1, -1] + [1] * (x.dim() - 2)
    xf = x.float()
    local_count = torch.tensor([x.numel() / max(x.shape[1], 1)], dtype=torch.float32, device=x.device)
    stats = sum_over_ranks(torch.cat([xf.sum(dims), local_count]))
    count = stats[-1].detach()
    mean = stats[:-1] / count
    centred = xf - mean.view(shape)
    var = sum_over_ranks((centred * centred).sum(dims)) / count
    y = centred * torch.rsqrt(var + bn.eps).view(shape)
    if bn.affine:
        y = y * bn.weight.view(shape) + bn.bias.view(shape)
    if bn.track_running_stats and bn.running_mean is not None and bn.running_var is not None:
        with torch.no_grad():
            assert bn.num_batches_tracked is not None
            bn.num_batches_tracked.add_(1)
            factor = bn.momentum if bn.momentum is not None else 1.0 / float(bn.num_batches_tracked.item())
            unbiased = var.detach() * count / (count - 1).clamp_min(1.0)
            bn.running_mean.mul_(1 - factor).add_(mean.detach().to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(unbiased.to(bn.running_var.dtype), alpha=factor)
    return y.to(x.dtype)


class _GlobalBatchNormMixin:
    def forward(self, input: Tensor) -> Tensor:
        assert isinstance(self, nn.modules.batchnorm._BatchNorm)
        if self.training and dist.is_initialized() and dist.get_world_size() > 1:
            if input.dim() < 2:
                raise ValueError(f"batch norm needs an (N, C, ...) input, got shape {tuple(input.shape)}")
            return global_batch_norm(self, input)
        return nn.modules.batchnorm._BatchNorm.forward(self, input)


class GlobalBatchNorm1d(_GlobalBatchNormMixin, nn.BatchNorm1d):
    pass


class GlobalBatchNorm2d(_GlobalBatchNormMixin, nn.BatchNorm2d):
    pass


class GlobalBatchNorm3d(_GlobalBatchNormMixin, nn.BatchNorm3d):
    pass


_GLOBAL_BN: dict[type[nn.Module], type[nn.Module]] = {
    nn.BatchNorm1d: GlobalBatchNorm1d,
    nn.BatchNorm2d: GlobalBatchNorm2d,
    nn.BatchNorm3d: GlobalBatchNorm3d,
}


def use_global_batch_norm(model: nn.Module) -> int:
    """Switch every BatchNorm1d/2d/3d of `model` to its global-batch twin in place (same parameters, buffers and
    state-dict names); returns how many. SyncBatchNorm (torch's own) is left alone."""
    count = 0
    for module in model.modules():
        twin = _GLOBAL_BN.get(type(module))
        if twin is not None:
            module.__class__ = twin
            count += 1
    return count


def plain_batch_norm(model: nn.Module) -> None:
    """Undo `use_global_batch_norm` (e.g. before a deep copy that should not carry the twin classes)."""
    back = {v: k for k, v in _GLOBAL_BN.items()}
    for module in model.modules():
        plain = back.get(type(module))
        if plain is not None:
            module.__class__ = plain


# ------------------------------------------------------------------------------------------------- wrapping


def wrap_ddp(model: nn.Module, device: torch.device) -> nn.Module:
    """DistributedDataParallel over the initialised group. Buffers are not re-broadcast every forward
    (forward_sync_buffers=False, torch/nn/parallel/distributed.py): batch norm buffers are updated from the
    global batch on every rank, so they already agree; the init sync still broadcasts rank 0's parameters and
    buffers."""
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" and device.index is not None else None
    return DistributedDataParallel(model, device_ids=ids, forward_sync_buffers=False)


def validate_strategy(strategy: str, world_size: int) -> None:
    if strategy not in STRATEGIES:
        raise TrainError(f"distributed strategy {strategy!r} is not one of {list(STRATEGIES)}")
    if world_size < 1:
        raise TrainError(f"world size {world_size} must be >= 1")


# ---------------------------------------------------------------------------------------------- the launcher


def torchrun_argv(nproc: int, worker_argv: Sequence[str], max_restarts: int = 0) -> list[str]:
    """`python -m torch.distributed.run --standalone` (a c10d rendezvous on localhost, torch/distributed/run.py)
    with `nproc` workers of `python -m visionpipe.phases.train_worker`."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        f"--max-restarts={max_restarts}",
        "--monitor-interval=0.5",
        "-m",
        "visionpipe.phases.train_worker",
        *worker_argv,
    ]


def run_torchrun(
    nproc: int,
    worker_argv: Sequence[str],
    env: Mapping[str, str] | None = None,
    timeout_s: float = 3600.0,
    log: Log = print,
    max_restarts: int = 0,
    last_lines: int = 40,
) -> None:
    """Launch `nproc` local train workers under torchrun (gloo on CPU), stream their output lines to `log`,
    kill the whole process group on timeout, and raise TorchrunFailed carrying the last lines on failure.
    `env` is added to this process's environment (MASTER_ADDR is set to 127.0.0.1)."""
    if nproc < 1:
        raise TrainError(f"nproc={nproc} must be >= 1")
    full_env = {**os.environ, **(env or {}), "MASTER_ADDR": "127.0.0.1", "PYTHONUNBUFFERED": "1"}
    argv = torchrun_argv(nproc, worker_argv, max_restarts)
    tail: collections.deque[str] = collections.deque(maxlen=last_lines)
    proc = subprocess.Popen(
        argv,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,  # its own process group: a timeout kills torchrun and every worker
    )

    def pump() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            line = line.rstrip("\n")
            tail.append(line)
            log(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    deadline = time.monotonic() + timeout_s
    try:
        rc = proc.wait(timeout=max(deadline - time.monotonic(), 0.0))
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        reader.join(5.0)
        raise TorchrunFailed(
            f"torchrun with {nproc} workers ran past {timeout_s:.0f}s and was killed; last lines:\n" + "\n".join(tail)
        ) from None
    reader.join(10.0)
    if rc != 0:
        raise TorchrunFailed(f"torchrun with {nproc} workers exited with code {rc}; last lines:\n" + "\n".join(tail))


def _kill_group(proc: subprocess.Popen[str]) -> None:
    """SIGKILL torchrun's process group (the one it leads: start_new_session) and reap it."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(10.0)


def run_key(*parts: str) -> str:
    """A short stable key of a launch (node-local staging folders shared by its local ranks)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID", "")
    return hashlib.sha256("\0".join((run_id, *parts)).encode()).hexdigest()[:16]
