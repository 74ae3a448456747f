"""`make demo` / `visionpipe demo`: the whole pipeline on built-in digits, then serve the bundle and classify.

1. run the seven phases with kfp.local (artifacts under ./runs, the bundle published under ./bundles);
2. print a short summary: split counts, metrics, threshold / calibration, where the bundle is;
3. serve the bundle with KServe's ModelServer on 127.0.0.1, classify a few val_test images over HTTP (v2), print
   the answers, and stop the server.
"""

from __future__ import annotations

import base64
import io
import json
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from visionpipe.kfp.local import LocalRun


@dataclass(frozen=True)
class RunSummary:
    run_dir: Path
    bundle_uri: str
    report: str
    decision_summaries: list[str]


def summarise_run(result: LocalRun) -> RunSummary:
    """Find the outputs of the run's last (only) validation and export steps in its folder."""
    run_dir = latest_run_dir(result.pipeline_root)
    published = _one(run_dir, "export*/published")
    report = _one(run_dir, "bundle-validation*/report").read_text()
    decision = [p.read_text() for p in sorted(run_dir.glob("threshold-sweep*/summary"))]
    decision += [p.read_text() for p in sorted(run_dir.glob("calibrate*/summary"))]
    return RunSummary(run_dir, json.loads(published.read_text())["uri"], report, decision)


def latest_run_dir(runs_dir: Path) -> Path:
    runs = sorted((p for p in runs_dir.iterdir() if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not runs:
        raise FileNotFoundError(f"no pipeline run under {runs_dir}")
    return runs[-1]


def classify_over_http(bundle_uri: str, dataset_dir: Path, count: int = 8) -> str:
    """Serve `bundle_uri` on a free loopback port, send `count` val_test images as one v2 request, stop."""
    from visionpipe.data.datasets import load_dataset
    from visionpipe.harness import free_port, running_server

    data = load_dataset(dataset_dir).split("val_test", "evaluate")
    images, labels = data.images[:count], data.labels[:count]
    port = free_port()
    argv = [
        sys.executable,
        "-m",
        "visionpipe.serving.server",
        "--bundle",
        bundle_uri,
        f"--http_port={port}",
        "--model_name=digits",
    ]
    started = time.monotonic()
    with running_server(argv, port, timeout_s=180) as server:
        ready = time.monotonic() - started
        body = {
            "inputs": [
                {"name": "image", "datatype": "BYTES", "shape": [len(images)], "data": [_png_b64(i) for i in images]}
            ]
        }
        request = urllib.request.Request(
            f"{server.base_url}/v2/models/digits/infer",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        sent = time.monotonic()
        with urllib.request.urlopen(request, timeout=60) as answer:
            reply = json.loads(answer.read())
        took = time.monotonic() - sent
    results = next(o for o in reply["outputs"] if o["name"] == "result")["data"]
    lines = [
        f"Served {bundle_uri} on {server.base_url} (ready in {ready:.1f} s); one v2 request, "
        f"{len(images)} images, {took * 1000:.0f} ms; server stopped.",
        "",
        "| image | true | answer | confidence | decision | policy |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for i, (record_text, label) in enumerate(zip(results, labels, strict=True)):
        record = json.loads(record_text)
        decision = record["decision"]
        verdict = "abstain, set {" + ",".join(decision["prediction_set"]) + "}" if decision["abstain"] else "class"
        answer_text = record["class_name"] if record["class_name"] is not None else "-"
        lines.append(f"| {i} | {label} | {answer_text} | {record['confidence']:.3f} | {verdict} | {record['policy']} |")
    return "\n".join(lines)


def _png_b64(image: np.ndarray) -> str:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _one(run_dir: Path, pattern: str) -> Path:
    found = sorted(run_dir.glob(pattern))
    if not found:
        raise FileNotFoundError(f"{run_dir}: no {pattern} (did the step run?)")
    return found[-1]
