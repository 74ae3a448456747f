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

import numpy as np
import numpy.typing as npt
import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.distributed_c10d import PrefixStore
from torch.distributed.rendezvous import rendezvous

from visionpipe.training.errors import TrainError

T = TypeVar("T")
Log = Callable[[str], None]

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


def main_log(ctx: DistContext, log: Log) -> Log:
    """`log` on rank 0 (or one process); a log that drops every line on the other ranks."""
    return log if ctx.is_main else _drop


def _drop(_line: str) -> None:
    pass


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


def equal_share(n: int, world_size: int, rank: int) -> npt.NDArray[np.int64]:
    """`rank`'s contiguous share of indices 0..n-1 when every rank must take the same number (collective
    forward passes): the index list padded with its last index to a multiple of the world size. The shares
    concatenated in rank order, cut to n, are 0..n-1."""
    per_rank = -(-n // world_size)
    padded = np.minimum(np.arange(per_rank * world_size), n - 1).astype(np.int64)
    return padded[rank * per_rank : (rank + 1) * per_rank]


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


def shard_fsdp2(model: nn.Module, block_names: Sequence[str], device: torch.device, world_size: int) -> int:
    """FSDP2 in place: `fully_shard` each transformer block (the modules whose qualified names end with one of
    `block_names`; a PEFT wrapper adds a prefix), then the root, over a 1-d device mesh of the group
    (torch/distributed/fsdp/_fully_shard/_fully_shard.py). Parameters become DTensors sharded on dim 0, so the
    optimizer must be built afterwards. Gradients are reduce-scattered as the mean over ranks (ReduceOp.AVG,
    _fsdp_collectives.py _get_gradient_divide_factors), the same scaling DDP applies. Returns the block count."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    wanted = tuple(block_names)
    blocks = [m for name, m in model.named_modules() if any(name == b or name.endswith("." + b) for b in wanted)]
    if not blocks:
        raise TrainError(
            f"FSDP2 found none of the transformer blocks {list(wanted)[:2]}... in the model; distributed.strategy="
            "'fsdp2' is for the transformer architectures (use 'ddp')"
        )
    for block in blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return len(blocks)


def gradient_sync(module: nn.Module, sync: bool) -> contextlib.AbstractContextManager[None]:
    """Whether this backward reduces gradients over the ranks: DDP's no_sync() while accumulating; FSDP2's
    set_requires_gradient_sync (unsharded gradients accumulate locally, reduce-scattered on the step's last
    micro-batch, torch/distributed/fsdp/_fully_shard/_fully_shard.py)."""
    from torch.distributed.fsdp import FSDPModule
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(module, DistributedDataParallel):
        return contextlib.nullcontext() if sync else module.no_sync()
    if isinstance(module, FSDPModule):
        module.set_requires_gradient_sync(sync)
    return contextlib.nullcontext()


def full_state_dict(module: nn.Module, sharded: bool) -> dict[str, Tensor]:
    """A detached, contiguous CPU copy of the whole state dict. Sharded (FSDP2): gathered from every rank (a
    collective: every rank calls it), returned on rank 0 only and {} elsewhere (StateDictOptions
    full_state_dict + cpu_offload, torch/distributed/checkpoint/state_dict.py)."""
    if not sharded:
        return {k: v.detach().cpu().contiguous().clone() for k, v in module.state_dict().items()}
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {k: v.detach().contiguous() for k, v in full.items() if isinstance(v, Tensor)}


def load_full_state_dict(module: nn.Module, state: Mapping[str, Tensor], sharded: bool) -> None:
    """Load a whole (unsharded) state dict; sharded, every rank keeps its own shard of it (a collective)."""
    if not sharded:
        module.load_state_dict(dict(state))
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    set_model_state_dict(module, dict(state), options=StateDictOptions(full_state_dict=True))


OptimState = dict[str, object]  # torch's optimizer state-dict shape: {"state": {...}, "param_groups": [...]}


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, sharded: bool) -> OptimState:
    """The optimizer's state dict in torch's one-process layout (parameters numbered in param_groups order).
    Sharded: gathered whole from every rank (a collective; rank 0 gets it, the others {}) and renumbered, so a
    checkpoint has one format whatever the strategy and world size."""
    if not sharded:
        return dict(optimizer.state_dict())
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    by_name: dict[str, object] = dict(get_optimizer_state_dict(model, optimizer, options=options))
    return renumber_by_position(by_name, param_names(model, optimizer)) if by_name else {}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: OptimState, sharded: bool) -> None:
    """Load a one-process-layout optimizer state dict; sharded, each rank keeps its shard (a collective)."""
    if not sharded:
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    by_name = renumber_by_name(state, param_names(model, optimizer))
    set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))  # type: ignore[arg-type]  # torch's OptimizerStateType is a TypedDict-like alias of this dict


def param_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """The qualified names of the optimizer's parameters in param_groups order (torch numbers them 0, 1, ...
    in this order in Optimizer.state_dict)."""
    names = {id(p): n for n, p in model.named_parameters()}
    return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]


def renumber_by_position(state: Mapping[str, object], names: Sequence[str]) -> OptimState:
    """A state dict keyed by parameter names (torch.distributed.checkpoint's layout) in the numbered layout."""
    position = {n: i for i, n in enumerate(names)}
    return _renumbered(state, lambda key: position[str(key)])


def renumber_by_name(state: Mapping[str, object], names: Sequence[str]) -> OptimState:
    """The inverse of `renumber_by_position`."""
    return _renumbered(state, lambda key: names[int(str(key))])


def _renumbered(state: Mapping[str, object], key_of: Callable[[object], object]) -> OptimState:
    per_param = state["state"]
    groups = state["param_groups"]
    if not isinstance(per_param, Mapping) or not isinstance(groups, list):
        raise TrainError("optimizer state dict must hold a 'state' mapping and a 'param_groups' list")
    try:
        return {
            "state": {key_of(k): v for k, v in per_param.items()},
            "param_groups": [{**g, "params": [key_of(p) for p in g["params"]]} for g in groups],
        }
    except (KeyError, IndexError, ValueError) as exc:
        raise TrainError(f"optimizer state does not fit this model's parameters ({exc!r})") from exc


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
