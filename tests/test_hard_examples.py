"""Hard examples: deciding what to log, the round trip through a real S3 server (SeaweedFS on loopback) and a
local folder (log -> label -> collect), and a failing store that never raises into the request path.

Records have the shape `VisionPredictor.records()` returns (one dict per image)."""

from __future__ import annotations

import io
import json
import logging
import socket
from datetime import UTC, date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from s3server import S3Server

from visionpipe.data.hard_examples import collect_labelled, label_example, list_unlabelled
from visionpipe.serving import storage
from visionpipe.serving.hard_examples import (
    HardExampleConfig,
    HardExampleError,
    HardExampleLogger,
    hard_reason,
    margin_of,
    month_of,
    previous_month,
    to_png,
)

CLASSES = [str(d) for d in range(10)]
WHEN = datetime(2025, 5, 31, 23, 59, 30, tzinfo=UTC)


def record(probs: dict[str, float], abstain: bool, policy: str = "threshold") -> dict[str, object]:
    """One answer as `VisionPredictor.records()` writes it."""
    full = {name: probs.get(name, 0.0) for name in CLASSES}
    top = max(full, key=lambda k: full[k])
    return {
        "label": -1 if abstain else CLASSES.index(top),
        "class_name": None if abstain else top,
        "probabilities": full,
        "confidence": full[top],
        "decision": {
            "abstain": abstain,
            "class": None if abstain else top,
            "prediction_set": [] if not abstain else ["3", "8"],
        },
        "policy": policy,
        "bundle_version": "digits-test@2025-05-01",
    }


def digit(value: int) -> np.ndarray:
    image = np.zeros((28, 28), dtype=np.uint8)
    image[4:24, 10 + value % 8 : 14 + value % 8] = 40 + 20 * value
    return image


def png_bytes(array: np.ndarray, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format=fmt)
    return buf.getvalue()


def pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


# --------------------------------------------------------------------------------------------- months
@pytest.mark.parametrize(
    ("value", "month", "previous"),
    [
        (date(2025, 5, 31), "2025-05", "2025-04"),
        (date(2025, 1, 1), "2025-01", "2024-12"),
        (datetime(2025, 3, 1, 0, 30, tzinfo=timezone(timedelta(hours=2))), "2025-02", "2025-01"),  # UTC month
        (datetime(2025, 12, 31, 23, 0), "2025-12", "2025-11"),  # naive = UTC
        ("2000-01", "2000-01", "1999-12"),
    ],
)
def test_months(value: date | datetime | str, month: str, previous: str) -> None:
    if not isinstance(value, str):
        assert month_of(value) == month
    assert previous_month(value) == previous


@pytest.mark.parametrize("bad", ["2025-13", "2025-5", "25-05", "2025/05", ""])
def test_bad_month_is_refused(bad: str) -> None:
    with pytest.raises(HardExampleError, match="must be YYYY-MM"):
        previous_month(bad)


# --------------------------------------------------------------------------------------------- config
@pytest.mark.parametrize(
    ("kwargs", "fragment"),
    [
        ({"prefix": ""}, "prefix='' must be a local folder or s3://bucket/path"),
        ({"prefix": "s3://"}, "no bucket name"),
        ({"max_margin": 1.5}, "max_margin=1.5 is out of range; allowed: 0 <= max_margin <= 1"),
        ({"max_margin": -0.1}, "max_margin=-0.1"),
        ({"sample_rate": 2}, "sample_rate=2 is out of range"),
        ({"sample_rate": True}, "sample_rate=True"),
        ({"log_abstentions": "yes"}, "log_abstentions='yes' must be True or False"),
        ({"queue_size": 0}, "queue_size=0 must be an integer >= 1"),
    ],
)
def test_config_rejects(kwargs: dict[str, object], fragment: str) -> None:
    args: dict[str, object] = {"prefix": "s3://bucket/hard", **kwargs}
    with pytest.raises(HardExampleError) as err:
        HardExampleConfig(**args)  # type: ignore[arg-type]
    assert fragment in str(err.value)


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, None),
        ({"VISIONPIPE_HARD_EXAMPLES": "s3://b/hard"}, HardExampleConfig("s3://b/hard")),
        (
            {
                "VISIONPIPE_HARD_EXAMPLES": "/data/hard",
                "VISIONPIPE_HARD_EXAMPLES_MAX_MARGIN": "0.1",
                "VISIONPIPE_HARD_EXAMPLES_ABSTENTIONS": "0",
                "VISIONPIPE_HARD_EXAMPLES_SAMPLE_RATE": "0.25",
            },
            HardExampleConfig("/data/hard", max_margin=0.1, log_abstentions=False, sample_rate=0.25),
        ),
    ],
)
def test_config_from_env(env: dict[str, str], expected: HardExampleConfig | None) -> None:
    assert HardExampleConfig.from_env(env) == expected


# --------------------------------------------------------------------------------------------- deciding
@pytest.mark.parametrize(
    ("probs", "abstained", "config", "reason"),
    [
        ([0.9, 0.1], True, HardExampleConfig("x"), "abstain"),
        ([0.9, 0.1], True, HardExampleConfig("x", log_abstentions=False), None),
        ([0.55, 0.45], False, HardExampleConfig("x", max_margin=0.2), "low_margin"),
        ([0.2, 0.5, 0.3], False, HardExampleConfig("x", max_margin=0.25), "low_margin"),  # 0.5 - 0.3
        ([0.2, 0.5, 0.3], False, HardExampleConfig("x", max_margin=0.2), None),  # margin 0.2 is not below 0.2
        ([0.95, 0.05], False, HardExampleConfig("x"), None),
        ([0.5, 0.5], False, HardExampleConfig("x", max_margin=0.0), None),  # margin logging off
    ],
)
def test_hard_reason(probs: list[float], abstained: bool, config: HardExampleConfig, reason: str | None) -> None:
    assert hard_reason(probs, abstained, config) == reason
    assert HardExampleLogger(config).should_log(np.asarray(probs), abstained) == reason


@pytest.mark.parametrize(("probs", "margin"), [([0.7, 0.2, 0.1], 0.5), ([1.0], 1.0), ([0.5, 0.5], 0.0)])
def test_margin(probs: list[float], margin: float) -> None:
    assert margin_of(probs) == pytest.approx(margin)


def test_sampling_keeps_about_the_rate() -> None:
    logger = HardExampleLogger(HardExampleConfig("x", sample_rate=0.5, seed=7))
    kept = sum(logger.should_log([0.5, 0.5], False) is not None for _ in range(400))
    assert 150 < kept < 250
    assert logger.stats()["skipped_by_sampling"] == 400 - kept
    assert HardExampleLogger(HardExampleConfig("x", sample_rate=0.0)).should_log([0.5, 0.5], True) is None


@pytest.mark.parametrize(
    "image",
    [
        digit(3),
        digit(3)[:, :, None],
        np.stack([digit(3)] * 3, axis=-1),
        png_bytes(digit(3)),
    ],
)
def test_to_png_keeps_pixels(image: np.ndarray | bytes) -> None:
    out = to_png(image)
    assert out.startswith(b"\x89PNG")
    decoded = pixels(out)
    assert (decoded if decoded.ndim == 2 else decoded[:, :, 0]).tolist() == digit(3).tolist()


def test_to_png_reencodes_jpeg() -> None:
    jpeg = png_bytes(np.full((8, 8), 200, dtype=np.uint8), fmt="JPEG")
    assert to_png(jpeg).startswith(b"\x89PNG") and abs(int(pixels(to_png(jpeg)).mean()) - 200) <= 2


# --------------------------------------------------------------------------------------------- round trip
@pytest.fixture(params=["s3", "local"])
def prefix(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "local":
        return str(tmp_path / "hard")
    bucket: str = request.getfixturevalue("s3_bucket")
    return bucket + "/hard-examples"


def test_log_label_collect_round_trip(prefix: str, tmp_path: Path) -> None:
    logger = HardExampleLogger(HardExampleConfig(prefix, max_margin=0.3))
    records = [
        record({"3": 0.48, "8": 0.46}, abstain=True),  # abstain
        record({"7": 0.55, "1": 0.40}, abstain=False),  # low margin (0.15)
        record({"4": 0.97}, abstain=False),  # confident: not logged
        record({"5": 0.60, "6": 0.35}, abstain=False),  # low margin (0.25)
    ]
    images: list[np.ndarray | bytes] = [digit(3), png_bytes(digit(7)), digit(4), digit(5)]
    uris = logger.records_to_log(records, images, when=WHEN, request_id="req-1")
    assert logger.flush(timeout=30)
    assert len(uris) == 3
    assert all(u.startswith(storage.join(prefix, "2025-05", "unlabelled") + "/") for u in uris)
    assert logger.stats() == {
        "logged": 3,
        "written": 3,
        "dropped": 0,
        "failed": 0,
        "skipped_by_sampling": 0,
        "abstain": 1,
        "low_margin": 2,
    }
    assert sorted(list_unlabelled(prefix, "2025-05")) == sorted(uris)
    objects = storage.list_uris(storage.join(prefix, "2025-05"))
    assert len(objects) == 6  # a PNG and a JSON per example

    sidecars = [json.loads(storage.read_bytes(u[: -len(".png")] + ".json")) for u in uris]
    abstained, low, low2 = sidecars
    assert abstained["reason"] == "abstain" and abstained["abstained"] is True
    assert abstained["predicted_class"] is None and abstained["top_class"] == "3"
    assert abstained["prediction_set"] == ["3", "8"] and abstained["margin"] == pytest.approx(0.02)
    assert low["reason"] == "low_margin" and low["predicted_class"] == "7" and low["margin"] == pytest.approx(0.15)
    assert low2["predicted_class"] == "5"
    for sidecar, uri in zip(sidecars, uris, strict=True):
        assert sidecar["schema"] == "visionpipe.hard_example/1"
        assert uri.endswith("/" + sidecar["image"])
        assert sidecar["timestamp"] == "2025-05-31T23:59:30Z" and sidecar["request_id"] == "req-1"
        assert sidecar["policy"] == "threshold" and sidecar["bundle_version"] == "digits-test@2025-05-01"
        assert set(sidecar["probabilities"]) == set(CLASSES)
    assert pixels(storage.read_bytes(uris[0])).tolist() == digit(3).tolist()
    assert pixels(storage.read_bytes(uris[1])).tolist() == digit(7).tolist()

    # A person labels: two with the helper, one by copying the object by hand, and a JSON that must be ignored.
    label_example(uris[0], "8")  # the abstention was an 8
    label_example(uris[1], "7")
    by_hand = storage.join(prefix, "2025-05", "labelled", "5", "by-hand.png")
    storage.write_bytes(by_hand, storage.read_bytes(uris[2]))
    storage.write_bytes(storage.join(prefix, "2025-05", "labelled", "5", "by-hand.json"), b"{}")
    # The month before, labelled earlier; a same-named file with other content is kept under another name.
    storage.write_bytes(storage.join(prefix, "2025-04", "labelled", "5", "by-hand.png"), png_bytes(digit(6)))

    out = tmp_path / "collected"
    counts = collect_labelled(prefix, ["2025-05", previous_month("2025-05"), "2025-03"], out)
    assert counts == {"5": 2, "7": 1, "8": 1}
    assert sorted(p.name for p in (out / "5").iterdir()) == ["2025-04-by-hand.png", "by-hand.png"]
    assert pixels((out / "8" / Path(uris[0]).name).read_bytes()).tolist() == digit(3).tolist()
    assert not list(out.rglob("*.json"))


def test_collected_folder_is_read_by_data_fetch(tmp_path: Path) -> None:
    from visionpipe.phases.data_fetch import read_source

    prefix = str(tmp_path / "hard")
    for cls in ("0", "1"):
        for i in range(3):
            storage.write_bytes(storage.join(prefix, "2025-05", "labelled", cls, f"{i}.png"), png_bytes(digit(i)))
    out = tmp_path / "data"
    assert collect_labelled(prefix, ["2025-05"], out) == {"0": 3, "1": 3}
    items, bad, _sizes = read_source(str(out), 28)
    assert not bad and sorted({it.class_name for it in items}) == ["0", "1"] and len(items) == 6


@pytest.mark.parametrize(
    ("image_uri", "class_name", "fragment"),
    [
        ("/p/2025-05/unlabelled/a.png", "../x", "class_name='../x' must be a folder name"),
        ("/p/2025-05/unlabelled/a.png", "", "class_name=''"),
        ("/p/2025-05/labelled/a.png", "1", "is not under <prefix>/<YYYY-MM>/unlabelled/"),
        ("/p/may/unlabelled/a.png", "1", "is not under"),
    ],
)
def test_label_example_rejects(image_uri: str, class_name: str, fragment: str) -> None:
    with pytest.raises(HardExampleError) as err:
        label_example(image_uri, class_name)
    assert fragment in str(err.value)


def test_collect_refuses_bad_month(tmp_path: Path) -> None:
    with pytest.raises(HardExampleError, match="month='May' must be YYYY-MM"):
        collect_labelled(str(tmp_path), ["May"], tmp_path / "out")


# --------------------------------------------------------------------------------------------- failures
def test_wrong_credentials_never_raise_from_log(
    s3_bucket: str, s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    logger = HardExampleLogger(HardExampleConfig(s3_bucket + "/hard"))
    with caplog.at_level(logging.WARNING, logger="visionpipe.hard_examples"):
        uri = logger.log(digit(1), record({"1": 0.5, "7": 0.5}, abstain=True), WHEN)
        assert uri is not None  # queued: the request path does not wait for the upload
        assert logger.flush(timeout=30)
    stats = logger.stats()
    assert stats["failed"] == 1 and stats["written"] == 0
    assert "refused the credentials" in caplog.text
    assert s3_server.secret_key not in caplog.text and "not-the-secret" not in caplog.text


def test_unreachable_store_fills_the_queue_and_drops(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("S3_ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("VISIONPIPE_S3_ATTEMPTS", "2")  # each upload retries once after ~0.25 s
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "k")  # with credentials the store is tried (and unreachable);
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "s")  # without them each upload would fail at once
    logger = HardExampleLogger(HardExampleConfig("s3://nowhere/hard", queue_size=2))
    results = [logger.log(digit(i), record({"1": 0.5, "2": 0.5}, abstain=False), WHEN) for i in range(6)]
    assert logger.flush(timeout=30)
    stats = logger.stats()
    assert stats["logged"] == 2 and stats["dropped"] == 4 and stats["failed"] == 2
    assert [r is not None for r in results] == [True, True, False, False, False, False]


@pytest.mark.parametrize(
    ("records", "images"),
    [
        ([record({"1": 0.5, "2": 0.5}, abstain=False)], []),  # lengths differ
        ([{"label": 1}], [digit(1)]),  # no probabilities
        ([{"probabilities": {"a": float("nan"), "b": 0.1}}], [digit(1)]),
    ],
)
def test_bad_batches_never_raise(records: list[dict[str, object]], images: list[np.ndarray], tmp_path: Path) -> None:
    logger = HardExampleLogger(HardExampleConfig(str(tmp_path)))
    assert logger.records_to_log(records, images) == []
    assert logger.stats()["failed"] == 1


@pytest.mark.parametrize("image", ["a string", np.zeros((2, 2, 2), dtype=np.uint8), b"not an image"])
def test_bad_images_never_raise(image: object, tmp_path: Path) -> None:
    logger = HardExampleLogger(HardExampleConfig(str(tmp_path)))
    logger.log(image, record({"1": 0.5, "2": 0.5}, abstain=False), WHEN)  # type: ignore[arg-type]
    assert logger.flush(timeout=10)
    assert logger.stats()["failed"] == 1 and logger.stats()["written"] == 0


def test_closed_logger_drops(tmp_path: Path) -> None:
    logger = HardExampleLogger(HardExampleConfig(str(tmp_path)))
    assert logger.log(digit(1), record({"1": 0.5, "2": 0.5}, abstain=False), WHEN) is not None
    assert logger.close(timeout=10)
    assert logger.log(digit(1), record({"1": 0.5, "2": 0.5}, abstain=False), WHEN) is None
    assert logger.stats()["written"] == 1 and logger.stats()["dropped"] == 1
