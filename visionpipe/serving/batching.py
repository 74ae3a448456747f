"""Adaptive micro-batching: concurrent requests' decoded images gathered into one forward pass.

`MicroBatcher.submit(item)` queues one request (for the predictor: a decoded `Batch`, i.e. one request's images)
and awaits its own answer. The batcher, on the event loop, takes whole requests in arrival order, up to
`max_batch_size` images, concatenates them and runs ONE forward pass on the worker pool
(visionpipe/serving/runtime.py), then hands every request exactly its own slice of the answers (ids, order and
requested outputs stay with the request's own `Batch`).

When a batch is dispatched (the measurements behind the defaults: the comment on DEFAULT_MAX_BATCH_SIZE):

* at once when the queue holds `max_batch_size` images;
* at once when the worker pool is idle: nothing is being decoded that could still join, and no forward pass is
  running; so a lone request never waits (under no load latency is today's);
* otherwise when the first queued request has waited `max_batch_wait_ms` (a deadline from the FIRST queued
  request, as Triton's ``max_queue_delay_microseconds``, not from the last arrival);
* and never while `max_concurrent` batches are already running: requests that arrive meanwhile accumulate and
  leave together in the next batch (Triton's dynamic batcher with a zero delay works this way: the batch is
  whatever is queued when a model instance frees up).

A request with more images than `max_batch_size` runs alone, never split: its answer must come from one forward
pass, and splitting would need re-assembly for no gain (its own forward is already batched).

Failures stay with the request that caused them: when a batched forward raises, each of its requests is run
again on its own, so only the culprit gets its exception (its named 4xx, or the 500 it would get unbatched) and
the others their answers. A request whose client went away (its task cancelled) is skipped when a batch is
formed and, when its batch is already running, its answer is dropped; it never fails the others.

Peers read for the design:

* Ray Serve ``@serve.batch`` (ray python/ray/serve/batching.py, ``_BatchQueue.wait_for_batch``): batches of up
  to ``max_batch_size`` *calls*, ``batch_wait_timeout_s`` (default 0) measured from the previous get; one
  exception fails every call of the batch.
* MLServer adaptive batching (SeldonIO/MLServer mlserver/batching/adaptive.py, ``AdaptiveBatcher``):
  ``max_batch_size`` *requests*, ``max_batch_time`` from the first one; a failed batch sets the same exception on
  every request's future.
* Triton's dynamic batcher (https://docs.nvidia.com/deeplearning/triton-inference-server/user-guide/docs/batcher.html,
  "Dynamic Batcher"): ``max_queue_delay_microseconds`` (default 0: "will not delay when forming batches"),
  ``preferred_batch_size``.
* KServe's ``spec.predictor.batcher`` (kserve pkg/batcher/handler.go): an agent sidecar that batches REST v1
  ``:predict`` bodies' ``instances`` only, up to ``maxBatchSize`` instances or ``maxLatency`` ms (defaults 32 and
  5000) after the first; one model-server error is sent to every request of the batch.

Here the batch is counted in images (a request of 4 images weighs 4), and errors are isolated per request.

Prometheus metrics (KServe's ``/metrics`` serves prometheus_client's default registry, kserve
protocol/rest/server.py ``metrics_handler``), labelled by model:
``visionpipe_batch_images`` (histogram: images per forward pass), ``visionpipe_batch_requests`` (requests per
forward pass), ``visionpipe_batch_queue_seconds`` (time from queueing to dispatch), ``visionpipe_batch_isolated``
(counter: batched forwards that failed and were re-run one request at a time).
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram

from visionpipe.serving.runtime import WorkerPool, hold_slot

T = TypeVar("T")
R = TypeVar("R")

# Defaults, measured on the 2-core development machine (at load 7-10: other jobs; docs/throughput.md section 1):
# in-process, the digits CNN's `VisionPredictor.infer` costs 4.5 ms CPU for one image and 0.76 ms per image at 16
# and 32 (0.64 at 64), so 32 takes nearly all of the gain (bench/serve.py's ceiling rows, --ceiling-sizes
# 1,16,32,64, time the same call); over HTTP at concurrency 32, 32 images / 2 ms cut the server's CPU per request
# from 9.2 to 5.6 ms (bench/serve.py --modes per-request,micro-batched:32:2), and the idle rule dispatched every
# lone request at once (mean queue time 0.03 ms), so the 2 ms only applies under load.
DEFAULT_MAX_BATCH_SIZE = 32
DEFAULT_MAX_BATCH_WAIT_MS = 2.0
MAX_BATCH_WAIT_MS = 1000.0  # a wait beyond a second is a misconfiguration, not batching
MANIFEST_SECTION = ("serving", "batching")  # bundle.json: {"serving": {"batching": {...}}}
MANIFEST_FIELDS = ("max_batch_size", "max_batch_wait_ms")


class BatchingConfigError(ValueError):
    """A batching limit out of range or of the wrong type (flag or bundle field); the message names the fix."""


@dataclass(frozen=True)
class BatchingConfig:
    """max_batch_size: images per forward pass (0 or 1: batching off, one forward pass per request, as before).
    max_batch_wait_ms: the longest the first queued request waits for others (0: never wait; only batch what
    accumulates while the pool is busy). max_concurrent: forward passes running at once (None: the pool's
    workers). source: where the values came from (flags, bundle, default), for the startup line."""

    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    max_batch_wait_ms: float = DEFAULT_MAX_BATCH_WAIT_MS
    max_concurrent: int | None = None
    source: str = "default"

    def __post_init__(self) -> None:
        size, wait = self.max_batch_size, self.max_batch_wait_ms
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise BatchingConfigError(
                f"max_batch_size={size!r} must be an integer >= 0 (0 or 1: batching off; e.g. 32)"
            )
        if isinstance(wait, bool) or not isinstance(wait, int | float) or not 0 <= wait <= MAX_BATCH_WAIT_MS:
            raise BatchingConfigError(
                f"max_batch_wait_ms={wait!r} must be a number of milliseconds in [0, {MAX_BATCH_WAIT_MS:g}] (e.g. 2)"
            )
        if self.max_concurrent is not None and (
            isinstance(self.max_concurrent, bool) or not isinstance(self.max_concurrent, int) or self.max_concurrent < 1
        ):
            raise BatchingConfigError(f"max_concurrent={self.max_concurrent!r} must be an integer >= 1 (or unset)")

    @property
    def enabled(self) -> bool:
        return self.max_batch_size > 1

    def describe(self) -> str:
        if not self.enabled:
            return f"batching off ({self.source})"
        at_once = "one per pool worker" if self.max_concurrent is None else str(self.max_concurrent)
        return (
            f"batching up to {self.max_batch_size} images, wait {self.max_batch_wait_ms:g} ms, forward passes at "
            f"once: {at_once} ({self.source})"
        )


def bundle_batching(manifest: Mapping[str, object]) -> dict[str, int | float]:
    """The bundle's optional ``serving.batching`` fields (`max_batch_size`, `max_batch_wait_ms`), checked.

    Absent section: ``{}``. An unknown field or a value of the wrong type is a `BatchingConfigError` naming it."""
    section: object = manifest
    for key in MANIFEST_SECTION:
        if not isinstance(section, Mapping) or key not in section:
            return {}
        section = section[key]
    where = ".".join(MANIFEST_SECTION)
    if not isinstance(section, Mapping):
        raise BatchingConfigError(f"bundle.json {where} must be an object with {', '.join(MANIFEST_FIELDS)}")
    unknown = sorted(set(map(str, section)) - set(MANIFEST_FIELDS))
    if unknown:
        raise BatchingConfigError(f"bundle.json {where}: unknown fields {unknown}; allowed: {list(MANIFEST_FIELDS)}")
    out: dict[str, int | float] = {}
    for name in MANIFEST_FIELDS:
        if name not in section:
            continue
        value = section[name]
        integer = name == "max_batch_size"
        if isinstance(value, bool) or not isinstance(value, int if integer else int | float):
            kind = "an integer" if integer else "a number"
            raise BatchingConfigError(f"bundle.json {where}.{name}={value!r} must be {kind}")
        out[name] = value
    return out


def resolve_batching(
    flag_size: int | None, flag_wait_ms: float | None, manifest: Mapping[str, object], max_concurrent: int | None = None
) -> BatchingConfig:
    """Flags win over the bundle's ``serving.batching``, which wins over the defaults; each value on its own."""
    try:
        fields = bundle_batching(manifest)
        size = flag_size if flag_size is not None else fields.get("max_batch_size", DEFAULT_MAX_BATCH_SIZE)
        wait = flag_wait_ms if flag_wait_ms is not None else fields.get("max_batch_wait_ms", DEFAULT_MAX_BATCH_WAIT_MS)
        sources = [
            "flags" if flag is not None else "bundle" if name in fields else "default"
            for flag, name in ((flag_size, "max_batch_size"), (flag_wait_ms, "max_batch_wait_ms"))
        ]
        return BatchingConfig(int(size), float(wait), max_concurrent, "+".join(dict.fromkeys(sources)))
    except BatchingConfigError:
        raise
    except (TypeError, ValueError) as exc:
        raise BatchingConfigError(str(exc)) from exc


# ------------------------------------------------------------------------------------------------ metrics
@dataclass(frozen=True)
class BatchMetrics:
    images: Histogram
    requests: Histogram
    queue_seconds: Histogram
    isolated: Counter


_SIZE_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
_WAIT_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 1.0)
_METRICS: dict[int, BatchMetrics] = {}


def batch_metrics(registry: CollectorRegistry = REGISTRY) -> BatchMetrics:
    """The batch metrics of `registry`, created once (every predictor of the process shares them)."""
    key = id(registry)
    if key not in _METRICS:
        _METRICS[key] = BatchMetrics(
            Histogram(
                "visionpipe_batch_images",
                "Images per batched forward pass",
                ["model"],
                buckets=_SIZE_BUCKETS,
                registry=registry,
            ),
            Histogram(
                "visionpipe_batch_requests",
                "Requests per batched forward pass",
                ["model"],
                buckets=_SIZE_BUCKETS,
                registry=registry,
            ),
            Histogram(
                "visionpipe_batch_queue_seconds",
                "Time a request waited in the batch queue before its forward pass",
                ["model"],
                buckets=_WAIT_BUCKETS,
                registry=registry,
            ),
            Counter(
                "visionpipe_batch_isolated",
                "Batched forward passes that failed and were re-run one request at a time",
                ["model"],
                registry=registry,
            ),
        )
    return _METRICS[key]


# ------------------------------------------------------------------------------------------------ batcher
@dataclass(eq=False)
class _Entry(Generic[T, R]):
    item: T
    images: int
    future: asyncio.Future[R]
    queued: float
    job: concurrent.futures.Future[object] | None = field(default=None)


class MicroBatcher(Generic[T, R]):
    """Gathers concurrent `submit` calls into batches for `run` (synchronous, on the worker pool).

    run: items -> one result per item, in order (one forward pass over all their images). size: an item's image
    count. Bound to the event loop of its first `submit` (the queue lives on that loop)."""

    def __init__(
        self,
        pool: WorkerPool,
        run: Callable[[Sequence[T]], Sequence[R]],
        size: Callable[[T], int],
        config: BatchingConfig,
        model: str = "",
        metrics: BatchMetrics | None = None,
    ) -> None:
        if not config.enabled:
            raise BatchingConfigError(f"max_batch_size={config.max_batch_size}: batching is off, use no batcher")
        self.pool = pool
        self.run = run
        self.size = size
        self.config = config
        self.max_concurrent = config.max_concurrent or pool.workers
        self.model = model
        self.metrics = metrics
        self._observe = (
            None
            if metrics is None
            else (metrics.images.labels(model), metrics.requests.labels(model), metrics.queue_seconds.labels(model))
        )
        self._queue: collections.deque[_Entry[T, R]] = collections.deque()
        self._queued_images = 0
        self._running = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def queued(self) -> int:
        """Requests waiting for a batch."""
        return len(self._queue)

    async def submit(self, item: T) -> R:
        """Queue `item` and await its own result (or its own exception)."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # first use, or a new loop once the old one's work is all done (tests)
            if self._queue or self._running:
                raise RuntimeError("the micro-batcher has work queued on another event loop")
            self._loop, self._timer = loop, None
        entry: _Entry[T, R] = _Entry(item, self.size(item), loop.create_future(), time.perf_counter())
        self._queue.append(entry)
        self._queued_images += entry.images
        self._pump()
        try:
            return await entry.future
        except asyncio.CancelledError:
            # The client went away. Queued: `_pump` skips it. Running: its slot in the worker pool stays taken
            # until the forward pass it is part of has finished (runtime.hold_slot), as for unbatched work.
            if entry.job is not None:
                hold_slot(entry.job)
            raise

    # ------------------------------------------------------------------------------------------ dispatch
    def _pump(self) -> None:
        """Dispatch every batch the rule allows now; else arm the timer for the first request's deadline."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._running < self.max_concurrent:
            self._drop_cancelled()
            if not self._queue:
                return
            wait_s = self._wait_left()
            if wait_s > 0:
                assert self._loop is not None
                self._timer = self._loop.call_later(wait_s, self._pump)
                return
            self._dispatch(self._take())

    def _drop_cancelled(self) -> None:
        while self._queue and self._queue[0].future.done():
            self._queued_images -= self._queue.popleft().images

    def _wait_left(self) -> float:
        """Seconds the head request may still wait for others: 0 when the batch is full, the pool is idle (no
        decoding that could join, no forward pass running) or its deadline has passed."""
        if self._queued_images >= self.config.max_batch_size or self.config.max_batch_wait_ms <= 0:
            return 0.0
        if self._running == 0 and self.pool.idle:
            return 0.0
        deadline = self._queue[0].queued + self.config.max_batch_wait_ms / 1000.0
        return max(0.0, deadline - time.perf_counter())

    def _take(self) -> list[_Entry[T, R]]:
        """Whole requests in arrival order up to max_batch_size images (the first always, even if larger)."""
        taken: list[_Entry[T, R]] = []
        images = 0
        while self._queue:
            head = self._queue[0]
            if head.future.done():  # cancelled while queued
                self._queued_images -= self._queue.popleft().images
                continue
            if taken and images + head.images > self.config.max_batch_size:
                break
            self._queue.popleft()
            self._queued_images -= head.images
            taken.append(head)
            images += head.images
        return taken

    def _dispatch(self, entries: list[_Entry[T, R]]) -> None:
        self._running += 1
        if self._observe is not None:
            images, requests, waited = self._observe
            now = time.perf_counter()
            images.observe(sum(e.images for e in entries))
            requests.observe(len(entries))
            for e in entries:
                waited.observe(now - e.queued)
        try:
            job = self.pool.submit(lambda: self._run_isolated([e.item for e in entries]))
        except RuntimeError as exc:  # the pool is shut down: every member hears it
            self._running -= 1
            for e in entries:
                if not e.future.done():
                    e.future.set_exception(exc)
            return
        for e in entries:
            e.job = job
        loop = self._loop
        assert loop is not None

        def done(finished: concurrent.futures.Future[object]) -> None:  # on the worker thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
                loop.call_soon_threadsafe(self._finish, entries, finished)

        # One callback back on the loop (as asyncio.wrap_future does), no task per batch: a batch of one costs
        # the same loop passes as the unbatched path.
        job.add_done_callback(done)

    def _run_isolated(self, items: list[T]) -> list[R | BaseException]:
        """On a worker thread: one forward pass for all; if it raises, each item alone (its own error)."""
        try:
            results = list(self.run(items))
            if len(results) != len(items):
                raise RuntimeError(f"the batched forward returned {len(results)} answers for {len(items)} requests")
            return list(results)
        except Exception as exc:
            if len(items) == 1:
                return [exc]
        if self.metrics is not None:
            self.metrics.isolated.labels(self.model).inc()
        out: list[R | BaseException] = []
        for item in items:
            try:
                out.extend(self.run([item]))
            except Exception as exc:
                out.append(exc)
        return out

    def _finish(self, entries: list[_Entry[T, R]], job: concurrent.futures.Future[object]) -> None:
        """On the loop: hand each request its result (or its own exception), then dispatch what waits."""
        self._running -= 1
        error = job.exception()
        outcome = [error for _ in entries] if error is not None else job.result()  # `_run_isolated` never raises
        assert isinstance(outcome, list)
        for entry, result in zip(entries, outcome, strict=True):
            if entry.future.done():  # cancelled meanwhile: the answer is dropped
                continue
            if isinstance(result, BaseException):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(result)
        self._pump()
