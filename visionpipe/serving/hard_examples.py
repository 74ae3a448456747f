"""Hard examples: log the predictor's abstentions and low-margin answers with their images, label them, retrain.

Layout under a prefix (a local folder or ``s3://bucket/path``; S3 settings from the environment, see
`visionpipe.serving.storage`), partitioned by UTC month::

    <prefix>/<YYYY-MM>/unlabelled/<id>.png     the image as served (PNG; decoded requests are re-encoded)
    <prefix>/<YYYY-MM>/unlabelled/<id>.json    what the model said: reason (abstain | low_margin), the top
                                               class, the predicted class (null on abstain), calibrated
                                               probabilities, margin (top1 - top2), prediction set, policy,
                                               bundle version, UTC timestamp; written after the PNG
    <prefix>/<YYYY-MM>/labelled/<class>/<file>.png|.jpg|.jpeg
                                               added by a person after labelling: copy (or move) the image
                                               into the folder of its true class; the JSON is not needed

``<class>`` must be one of the bundle's class names (e.g. ``0``..``9`` for digits, ``roadwork`` /
``no_roadwork``). Anything else under ``labelled/`` (JSON sidecars, deeper folders, other file types) is
ignored. `visionpipe.data.hard_examples.collect_labelled` (training side, not runtime) copies the labelled images of
some months into a local ``<class>/<file>`` folder, the layout `visionpipe.phases.data_fetch` reads, so the
monthly retrain takes them in next to the base data.

Labelling by hand with the AWS CLI / MinIO client, for example::

    mc cp minio/visionpipe/hard/2025-05/unlabelled/3f2a....png minio/visionpipe/hard/2025-05/labelled/7/

or in Python: ``visionpipe.data.hard_examples.label_example(image_uri, "7")``.

Logging never raises into the request path: `HardExampleLogger.log` only queues the work (bounded queue, one
background thread does the PNG encoding and the uploads); a full queue drops the example and a failed upload
is logged and counted (`HardExampleLogger.stats`). `flush` waits for the queue to drain (tests, shutdown).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import random
import re
import threading
import uuid
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from typing import Literal

import numpy as np
import numpy.typing as npt

from visionpipe.serving import storage

Reason = Literal["abstain", "low_margin"]
REASONS: tuple[Reason, ...] = ("abstain", "low_margin")
UNLABELLED = "unlabelled"
LABELLED = "labelled"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
SCHEMA = "visionpipe.hard_example/1"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
MONTH_PATTERN = re.compile(r"^\d{4}-(0[1-9]|1[0-2])$")
CLASS_PATTERN = re.compile(r"^[^./\\][^/\\]*$")

ImageInput = bytes | npt.NDArray[np.uint8]
log = logging.getLogger("visionpipe.hard_examples")


class HardExampleError(ValueError):
    """Invalid hard-example configuration or arguments (the message names the field, the value, what is allowed)."""


# --------------------------------------------------------------------------------------------- months
def month_of(value: date | datetime) -> str:
    """``YYYY-MM`` of a date, or of a datetime in UTC (naive datetimes are taken as UTC)."""
    if isinstance(value, datetime):
        value = _utc(value)
    return f"{value.year:04d}-{value.month:02d}"


def previous_month(value: str | date | datetime) -> str:
    """The month before `value` (``YYYY-MM`` or a date): ``previous_month("2025-01") == "2024-12"``."""
    year, month = parse_month(value if isinstance(value, str) else month_of(value))
    return f"{year - 1:04d}-12" if month == 1 else f"{year:04d}-{month - 1:02d}"


def parse_month(text: str) -> tuple[int, int]:
    if not isinstance(text, str) or not MONTH_PATTERN.match(text):
        raise HardExampleError(f"month={text!r} must be YYYY-MM (e.g. 2025-05)")
    year, month = text.split("-")
    return int(year), int(month)


def _utc(value: datetime) -> datetime:
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# --------------------------------------------------------------------------------------------- config
@dataclass(frozen=True)
class HardExampleConfig:
    """Where and what to log.

    prefix           local folder or s3://bucket/path
    max_margin       an answer whose calibrated top1 - top2 is below this is low-margin (0 turns it off)
    log_abstentions  log answers where the policy abstained
    sample_rate      the share of hard examples kept (1.0 = all), to bound volume
    queue_size       examples waiting for upload; beyond it new ones are dropped (and counted)
    seed             seed of the sampler (None: random)
    """

    prefix: str
    max_margin: float = 0.2
    log_abstentions: bool = True
    sample_rate: float = 1.0
    queue_size: int = 256
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.prefix, str) or not self.prefix.strip():
            raise HardExampleError(f"prefix={self.prefix!r} must be a local folder or s3://bucket/path")
        if storage.is_s3(self.prefix):
            try:
                storage.split_s3(self.prefix)
            except storage.StorageError as exc:
                raise HardExampleError(f"prefix={self.prefix!r}: {exc}") from None
        _check_fraction("max_margin", self.max_margin, "0 <= max_margin <= 1")
        _check_fraction("sample_rate", self.sample_rate, "0 <= sample_rate <= 1")
        if not isinstance(self.log_abstentions, bool):
            raise HardExampleError(f"log_abstentions={self.log_abstentions!r} must be True or False")
        if isinstance(self.queue_size, bool) or not isinstance(self.queue_size, int) or self.queue_size < 1:
            raise HardExampleError(f"queue_size={self.queue_size!r} must be an integer >= 1")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> HardExampleConfig | None:
        """From ``VISIONPIPE_HARD_EXAMPLES`` (the prefix; unset = off), ``..._MAX_MARGIN``,
        ``..._ABSTENTIONS`` (1/0) and ``..._SAMPLE_RATE``: set them on the InferenceService's container."""
        env = os.environ if environ is None else environ
        prefix = env.get("VISIONPIPE_HARD_EXAMPLES", "").strip()
        if not prefix:
            return None

        def number(name: str, default: float) -> float:
            raw = env.get(name, "").strip()
            try:
                return float(raw) if raw else default
            except ValueError:
                raise HardExampleError(f"{name}={raw!r} must be a number") from None

        flag = env.get("VISIONPIPE_HARD_EXAMPLES_ABSTENTIONS", "1").strip().lower()
        return cls(
            prefix=prefix,
            max_margin=number("VISIONPIPE_HARD_EXAMPLES_MAX_MARGIN", 0.2),
            log_abstentions=flag in ("1", "true", "yes", "on"),
            sample_rate=number("VISIONPIPE_HARD_EXAMPLES_SAMPLE_RATE", 1.0),
        )


def _check_fraction(name: str, value: float, allowed: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0.0 <= float(value) <= 1.0:
        raise HardExampleError(f"{name}={value!r} is out of range; allowed: {allowed}")


# --------------------------------------------------------------------------------------------- deciding
def margin_of(probs: Sequence[float] | npt.NDArray[np.floating]) -> float:
    """top1 - top2 of one row of probabilities (1.0 for a single class)."""
    row = np.sort(np.asarray(probs, dtype=np.float64).ravel())[::-1]
    if row.size == 0:
        raise HardExampleError("probabilities are empty")
    return float(row[0] - row[1]) if row.size > 1 else 1.0


def hard_reason(
    probs: Sequence[float] | npt.NDArray[np.floating], abstained: bool, config: HardExampleConfig
) -> Reason | None:
    """Why this answer is a hard example ("abstain" first, then "low_margin"), or None. No sampling."""
    if abstained:
        return "abstain" if config.log_abstentions else None
    return "low_margin" if margin_of(probs) < config.max_margin else None


# --------------------------------------------------------------------------------------------- logging
@dataclass(frozen=True)
class _Job:
    image: ImageInput
    png_uri: str
    json_uri: str
    payload: dict[str, object]


@dataclass
class _Stats:
    logged: int = 0
    written: int = 0
    dropped: int = 0
    failed: int = 0
    skipped_by_sampling: int = 0
    counts: Counter[str] = field(default_factory=Counter)


class HardExampleLogger:
    """Queue hard examples for upload under ``<prefix>/<YYYY-MM>/unlabelled/``; one background thread writes."""

    def __init__(self, config: HardExampleConfig) -> None:
        self.config = config
        self._rng = random.Random(config.seed)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending: list[_Job] = []
        self._in_flight = 0
        self._stats = _Stats()
        self._closed = False
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------------------- decide
    def should_log(
        self, calibrated_probs_row: Sequence[float] | npt.NDArray[np.floating], abstained: bool
    ) -> Reason | None:
        """The reason to log this answer, or None; applies `sample_rate` (so it may say None to a hard one)."""
        reason = hard_reason(calibrated_probs_row, abstained, self.config)
        if reason is None:
            return None
        if self.config.sample_rate < 1.0 and self._rng.random() >= self.config.sample_rate:
            with self._lock:
                self._stats.skipped_by_sampling += 1
            return None
        return reason

    # ----------------------------------------------------------------------------------------- log
    def log(
        self,
        image: ImageInput,
        record: Mapping[str, object],
        when: datetime | None = None,
        reason: Reason | None = None,
        request_id: str | None = None,
    ) -> str | None:
        """Queue one example; returns the URI its PNG will have, or None when dropped. Never raises.

        `record` is one of `VisionPredictor.records()`'s answers (probabilities by class name, decision,
        policy, bundle_version). `image` is the encoded request image (bytes; non-PNG bytes are re-encoded)
        or the decoded uint8 array (HxW or HxWxC). `reason` defaults to "abstain" when the record abstained,
        else "low_margin"."""
        try:
            moment = _utc(when or datetime.now(UTC))
            example_id = uuid.uuid4().hex
            base = storage.join(self.config.prefix, month_of(moment), UNLABELLED, example_id)
            payload = example_payload(record, example_id, moment, reason, request_id)
            if isinstance(image, np.ndarray):
                image = np.array(image, dtype=np.uint8, copy=True)  # the caller may reuse its buffer
            elif not isinstance(image, bytes | bytearray):
                raise HardExampleError(f"image of type {type(image).__name__} must be bytes or a uint8 array")
            job = _Job(bytes(image) if isinstance(image, bytearray) else image, base + ".png", base + ".json", payload)
        except Exception as exc:  # never into the request path
            log.warning("hard example not logged: %s", exc)
            with self._lock:
                self._stats.failed += 1
            return None
        with self._lock:
            if self._closed or len(self._pending) + self._in_flight >= self.config.queue_size:
                self._stats.dropped += 1
                return None
            self._pending.append(job)
            self._stats.logged += 1
            self._stats.counts[str(payload["reason"])] += 1
            self._start_locked()
            self._idle.notify_all()
        return job.png_uri

    def records_to_log(
        self,
        records: Sequence[Mapping[str, object]],
        images: Sequence[ImageInput],
        when: datetime | None = None,
        request_id: str | None = None,
    ) -> list[str]:
        """The predictor hook: log every hard answer of one batch; returns the PNG URIs queued. Never raises.

        `records` are `VisionPredictor.records(answers)`, `images` the batch's images in the same order
        (`answers.batch.images`, or the request's encoded bytes)."""
        uris: list[str] = []
        try:
            if len(records) != len(images):
                raise HardExampleError(f"{len(records)} records but {len(images)} images")
            moment = when or datetime.now(UTC)
            for record, image in zip(records, images, strict=True):
                probs, abstained = _probs_and_abstained(record)
                reason = self.should_log(probs, abstained)
                if reason is not None:
                    uri = self.log(image, record, moment, reason, request_id)
                    if uri is not None:
                        uris.append(uri)
        except Exception as exc:  # never into the request path
            log.warning("hard examples of a batch not logged: %s", exc)
            with self._lock:
                self._stats.failed += 1
        return uris

    # ----------------------------------------------------------------------------------------- control
    def flush(self, timeout: float = 30.0) -> bool:
        """Wait until every queued example is written (or failed); False on timeout."""
        with self._idle:
            return self._idle.wait_for(lambda: not self._pending and self._in_flight == 0, timeout=timeout)

    def close(self, timeout: float = 30.0) -> bool:
        """Flush, then stop the worker; later `log` calls drop their example."""
        done = self.flush(timeout)
        with self._idle:
            self._closed = True
            self._idle.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return done

    def stats(self) -> dict[str, int]:
        """Counters: logged (queued), written, dropped (queue full / closed), failed, skipped_by_sampling,
        and per reason (abstain, low_margin)."""
        with self._lock:
            s = self._stats
            return {
                "logged": s.logged,
                "written": s.written,
                "dropped": s.dropped,
                "failed": s.failed,
                "skipped_by_sampling": s.skipped_by_sampling,
                **{reason: s.counts[reason] for reason in REASONS},
            }

    # ----------------------------------------------------------------------------------------- worker
    def _start_locked(self) -> None:
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._work, name="hard-examples", daemon=True)
            self._thread.start()

    def _work(self) -> None:
        while True:
            with self._idle:
                self._idle.wait_for(lambda: bool(self._pending) or self._closed)
                if not self._pending:
                    return
                job = self._pending.pop(0)
                self._in_flight += 1
            ok = self._write(job)
            with self._idle:
                self._in_flight -= 1
                if ok:
                    self._stats.written += 1
                else:
                    self._stats.failed += 1
                self._idle.notify_all()

    def _write(self, job: _Job) -> bool:
        try:
            storage.write_bytes(job.png_uri, to_png(job.image))
            storage.write_bytes(job.json_uri, json.dumps(job.payload, indent=1, sort_keys=True).encode())
            return True
        except Exception as exc:  # the worker survives anything
            with self._lock:
                failures = self._stats.failed
            if failures < 3 or failures % 100 == 0:
                log.warning("hard example %s not written: %s", job.png_uri, exc)
            return False


# --------------------------------------------------------------------------------------------- payloads
def example_payload(
    record: Mapping[str, object],
    example_id: str,
    when: datetime,
    reason: Reason | None = None,
    request_id: str | None = None,
) -> dict[str, object]:
    """The JSON written next to the PNG, from one predictor record."""
    probs, abstained = _probs_and_abstained(record)
    names = list(_probability_map(record))
    decision = record.get("decision")
    prediction_set = decision.get("prediction_set", []) if isinstance(decision, Mapping) else []
    chosen: Reason = reason or ("abstain" if abstained else "low_margin")
    if chosen not in REASONS:
        raise HardExampleError(f"reason={chosen!r} is not one of {', '.join(REASONS)}")
    return {
        "schema": SCHEMA,
        "id": example_id,
        "image": f"{example_id}.png",
        "reason": chosen,
        "abstained": abstained,
        "predicted_class": None if abstained else record.get("class_name"),
        "top_class": names[int(np.argmax(probs))],
        "probabilities": dict(_probability_map(record)),
        "margin": round(margin_of(probs), 6),
        "prediction_set": list(prediction_set) if isinstance(prediction_set, list | tuple) else [],
        "policy": record.get("policy"),
        "bundle_version": record.get("bundle_version"),
        "timestamp": _utc(when).isoformat().replace("+00:00", "Z"),
        "request_id": request_id,
    }


def _probability_map(record: Mapping[str, object]) -> dict[str, float]:
    probs = record.get("probabilities")
    if not isinstance(probs, Mapping) or not probs:
        raise HardExampleError("record has no 'probabilities' mapping of class name -> probability")
    out: dict[str, float] = {}
    for name, value in probs.items():
        if not isinstance(value, int | float) or not math.isfinite(float(value)):
            raise HardExampleError(f"record probability {name!r}={value!r} is not a finite number")
        out[str(name)] = float(value)
    return out


def _probs_and_abstained(record: Mapping[str, object]) -> tuple[list[float], bool]:
    probs = list(_probability_map(record).values())
    decision = record.get("decision")
    if isinstance(decision, Mapping) and "abstain" in decision:
        return probs, bool(decision["abstain"])
    return probs, record.get("label") == -1


def to_png(image: ImageInput) -> bytes:
    """PNG bytes of encoded image bytes (PNG kept as it is) or of a uint8 HxW / HxWx{1,3,4} array."""
    from PIL import Image

    if isinstance(image, bytes):
        if image.startswith(PNG_MAGIC):
            return image
        with Image.open(io.BytesIO(image)) as opened:
            opened.load()
            picture = opened.copy()
    else:
        array = np.asarray(image, dtype=np.uint8)
        if array.ndim == 3 and array.shape[2] == 1:
            array = array[:, :, 0]
        if array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] not in (3, 4)):
            raise HardExampleError(f"image array of shape {array.shape} must be HxW or HxWx1/3/4")
        picture = Image.fromarray(array)
    out = io.BytesIO()
    picture.save(out, format="PNG")
    return out.getvalue()
