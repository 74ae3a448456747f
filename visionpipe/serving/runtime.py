"""The server's CPU budget and its bounded worker pool.

`cpu_budget` is the number of CPUs this process may really use: the smaller of its CPU affinity
(``os.sched_getaffinity``) and its cgroup CPU quota (cgroup v2 ``cpu.max``, cgroup v1 ``cpu.cfs_quota_us`` /
``cpu.cfs_period_us``, the tightest along the cgroup's ancestors), rounded down, at least 1. A pod limited to
2 CPUs on a 64-core node gets 2, never 64 (torch sizes its own intra-op pool by the node's cores).

`WorkerPool` runs the predictor's decoding and inference off the asyncio event loop, so health, readiness and
metadata endpoints keep answering while a heavy request runs. It has `workers` threads (default: the CPU
budget) and admits at most ``workers + max_queue`` requests at a time; a request beyond that is refused at once
with `Overloaded` (REST 503 ``overloaded`` with ``Retry-After``, gRPC UNAVAILABLE) rather than queued without
bound. Queued requests hold only their parsed body. Work for a request that has already started (its
inference, after its decoding) runs before work of requests not yet started, so at most about `workers`
requests hold decoded data while waiting.

The micro-batcher (visionpipe/serving/batching.py) runs one forward pass for several admitted requests with
`WorkerPool.submit` (a step of requests already under way, no admission of its own), asks `WorkerPool.idle`
whether anything could still join a batch, and keeps a cancelled request's slot taken until the forward pass
it is part of has finished (`hold_slot`).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import contextvars
import heapq
import itertools
import math
import os
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar, cast

from visionpipe.serving.limits import DEFAULT_MAX_QUEUE

T = TypeVar("T")

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


# ------------------------------------------------------------------------------------------------ CPU budget
def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def _cgroup_paths(proc_self_cgroup: Path) -> tuple[str | None, str | None]:
    """(the v2 unified cgroup path, the v1 ``cpu`` controller's path) from /proc/self/cgroup, None if absent.

    Lines are ``hierarchy-id:controllers:path``; v2 is ``0::/path``, v1's cpu line lists ``cpu`` among its
    comma-separated controllers (``cpu,cpuacct``)."""
    text = _read(proc_self_cgroup)
    v2: str | None = None
    v1: str | None = None
    for line in (text or "").splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        hierarchy, controllers, path = parts
        if hierarchy == "0" and controllers == "":
            v2 = path
        elif "cpu" in controllers.split(","):
            v1 = path
    return v2, v1


def _ancestors(base: Path, cgroup_path: str | None) -> list[Path]:
    """`base`/`cgroup_path` and every parent up to `base` itself (the innermost first)."""
    parts = [p for p in (cgroup_path or "").split("/") if p and p != ".."]
    return [base.joinpath(*parts[:depth]) for depth in range(len(parts), -1, -1)]


def _v2_limit(folder: Path) -> float | None:
    text = _read(folder / "cpu.max")  # "max 100000" (no limit) or "<quota> <period>" in microseconds
    if not text:
        return None
    fields = text.split()
    if len(fields) != 2 or fields[0] == "max":
        return None
    try:
        quota, period = int(fields[0]), int(fields[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _v1_limit(folder: Path) -> float | None:
    quota_text, period_text = _read(folder / "cpu.cfs_quota_us"), _read(folder / "cpu.cfs_period_us")
    if quota_text is None or period_text is None:
        return None
    try:
        quota, period = int(quota_text), int(period_text)
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None  # quota -1: no limit


def cgroup_cpu_limit(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (e.g. 1.5), or None when there is none.

    cgroup v2: ``cpu.max`` of the process's cgroup and of each ancestor (the smallest wins). cgroup v1:
    ``cpu.cfs_quota_us / cpu.cfs_period_us`` under ``cpu/`` or ``cpu,cpuacct/``, likewise. Inside a container
    with its own cgroup namespace the path is ``/`` and the files are at the mount's root."""
    v2_path, v1_path = _cgroup_paths(proc_self_cgroup)
    limits: list[float] = []
    if (cgroup_root / "cgroup.controllers").exists():  # the unified (v2) hierarchy is mounted here
        limits += [v for f in _ancestors(cgroup_root, v2_path) if (v := _v2_limit(f)) is not None]
    for controller in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        base = cgroup_root / controller
        if base.is_dir():
            limits += [v for f in _ancestors(base, v1_path) if (v := _v1_limit(f)) is not None]
    return min(limits) if limits else None


def affinity_cpus() -> int:
    """CPUs this process may be scheduled on (``os.sched_getaffinity``; ``os.cpu_count`` where unsupported)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def cpu_budget(cgroup_root: Path = CGROUP_ROOT, proc_self_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process can use: min(affinity, cgroup quota rounded down), at least 1.

    Rounded down (as Go's automaxprocs does): with a 1.5-CPU quota, two busy threads would be throttled."""
    cpus = affinity_cpus()
    quota = cgroup_cpu_limit(cgroup_root, proc_self_cgroup)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota)))
    return cpus


def default_torch_threads(workers: int, budget: int | None = None) -> int:
    """Torch intra-op threads per worker: the CPU budget shared out among the workers, at least 1.

    With the default ``workers = cpu_budget()`` this is 1, which measured best on a 2-core machine at
    concurrency 1 and 32 (bench/serve.py; see the README)."""
    return max(1, (cpu_budget() if budget is None else budget) // max(1, workers))


def configure_torch_threads(threads: int) -> int:
    """Set torch's intra-op thread count (0: leave torch's own default); returns the count in effect.

    PyTorch keeps the count process-wide and applies it lazily in each thread that runs an op
    (at::internal::lazy_init_num_threads), so the pool's worker threads use it too."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    return int(torch.get_num_threads())


# ------------------------------------------------------------------------------------------------ worker pool
class Overloaded(RuntimeError):
    """The pool already holds ``workers + max_queue`` requests: REST 503 ``overloaded``, gRPC UNAVAILABLE."""

    def __init__(self, in_flight: int, capacity: int) -> None:
        self.reason = f"overloaded: {in_flight} requests are in flight and the server admits {capacity}; retry later"
        super().__init__(self.reason)

    def __str__(self) -> str:
        return self.reason


@dataclass(order=True)
class _Job:
    priority: int  # 0: a request already under way (its next step); 1: a request's first step
    sequence: int
    run: Callable[[], object] = field(compare=False)
    future: concurrent.futures.Future[object] = field(compare=False)


class _Ticket:
    """One admitted request: its steps run on the pool; its slot is freed when the request is done and the
    step it last submitted has finished (a cancelled request does not free a slot its thread still uses)."""

    def __init__(self, pool: WorkerPool) -> None:
        self.pool = pool
        self.steps = 0
        self.last: concurrent.futures.Future[object] | None = None


_CURRENT: contextvars.ContextVar[_Ticket | None] = contextvars.ContextVar("visionpipe_ticket", default=None)


class WorkerPool:
    """`workers` threads with a priority queue; at most ``workers + max_queue`` admitted requests."""

    def __init__(self, workers: int | None = None, max_queue: int = DEFAULT_MAX_QUEUE) -> None:
        workers = cpu_budget() if workers is None else workers
        if workers < 1:
            raise ValueError(f"workers={workers} must be >= 1")
        if max_queue < 0:
            raise ValueError(f"max_queue={max_queue} must be >= 0")
        self.workers = workers
        self.max_queue = max_queue
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._jobs: list[_Job] = []
        self._sequence = itertools.count()
        self._threads: list[threading.Thread] = []
        self._in_flight = 0
        self._running = 0  # jobs a thread is running now
        self._closed = False

    @property
    def capacity(self) -> int:
        return self.workers + self.max_queue

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def idle(self) -> bool:
        """No job queued and none running (a job's result is set only after it stops counting as running)."""
        with self._lock:
            return not self._jobs and self._running == 0

    def submit(self, fn: Callable[[], object]) -> concurrent.futures.Future[object]:
        """Queue `fn()` as a step of requests already admitted (first priority, no admission of its own): the
        micro-batcher's forward pass for requests that each hold their own slot."""
        return self._submit(fn, 0)

    # ---------------------------------------------------------------------------------------- admission
    @contextlib.asynccontextmanager
    async def admit(self) -> AsyncIterator[None]:
        """Admit one request (or raise `Overloaded`); `run` calls inside it share its slot."""
        if _CURRENT.get() is not None:  # nested: already admitted
            yield
            return
        with self._lock:
            if self._in_flight >= self.capacity:
                raise Overloaded(self._in_flight, self.capacity)
            self._in_flight += 1
        ticket = _Ticket(self)
        token = _CURRENT.set(ticket)
        try:
            yield
        finally:
            _CURRENT.reset(token)
            last = ticket.last
            if last is None or last.done():
                self._release()
            else:
                last.add_done_callback(lambda _f: self._release())

    def _release(self) -> None:
        with self._lock:
            self._in_flight -= 1

    async def run(self, fn: Callable[[], T]) -> T:
        """Run `fn()` on a worker thread and await its result (admitting a request of its own if needed)."""
        ticket = _CURRENT.get()
        if ticket is None or ticket.pool is not self:
            async with self.admit():
                return await self.run(fn)
        priority = 0 if ticket.steps else 1
        ticket.steps += 1
        future = self._submit(fn, priority)
        ticket.last = future
        return cast(T, await asyncio.wrap_future(future))  # the future holds fn()'s result

    # ------------------------------------------------------------------------------------------ threads
    def _submit(self, fn: Callable[[], object], priority: int) -> concurrent.futures.Future[object]:
        future: concurrent.futures.Future[object] = concurrent.futures.Future()
        with self._ready:
            if self._closed:
                raise RuntimeError("the worker pool is shut down")
            while len(self._threads) < self.workers:  # started on first use: constructing a pool is cheap
                thread = threading.Thread(
                    target=self._work, name=f"visionpipe-worker-{len(self._threads)}", daemon=True
                )
                thread.start()
                self._threads.append(thread)
            heapq.heappush(self._jobs, _Job(priority, next(self._sequence), fn, future))
            self._ready.notify()
        return future

    def _work(self) -> None:
        while True:  # one job per pass; ends when the pool is shut down and its queue is empty
            with self._ready:
                self._ready.wait_for(lambda: bool(self._jobs) or self._closed)
                if not self._jobs:
                    return
                job = heapq.heappop(self._jobs)
                self._running += 1
            if not job.future.set_running_or_notify_cancel():
                self._done_running()
                continue
            try:
                result = job.run()
            except BaseException as exc:  # handed to the awaiting request, which answers it
                self._done_running()
                job.future.set_exception(exc)
            else:
                self._done_running()  # before the result: whoever it wakes sees this thread free (`idle`)
                job.future.set_result(result)

    def _done_running(self) -> None:
        with self._lock:
            self._running -= 1

    def shutdown(self, timeout_s: float = 10.0) -> None:
        """Finish the queued jobs, then stop the threads (bounded wait per thread)."""
        with self._ready:
            self._closed = True
            self._ready.notify_all()
        for thread in self._threads:
            thread.join(timeout=timeout_s)


def hold_slot(future: concurrent.futures.Future[object]) -> None:
    """The current request's admission slot stays taken until `future` is done, even once the request has ended
    (cancelled while the batched forward pass it joined still runs on a thread)."""
    ticket = _CURRENT.get()
    if ticket is not None:
        ticket.last = future


_default_pool: WorkerPool | None = None
_default_lock = threading.Lock()


def default_pool() -> WorkerPool:
    """The process-wide pool that predictors share when none is given (CPU-budget workers)."""
    global _default_pool
    with _default_lock:
        if _default_pool is None:
            _default_pool = WorkerPool()
        return _default_pool
