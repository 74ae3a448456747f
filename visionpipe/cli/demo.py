"""`make demo` / `visionpipe demo`: the whole pipeline on built-in digits, then serve the bundle and classify.

1. run the seven phases with kfp.local (artifacts under ./runs, the bundle published under ./bundles), one
   progress line per task (``--verbose``: kfp.local's whole output; either way it is written to
   <run folder>/logs/);
2. print a short summary: split counts, metrics, threshold / calibration, where the bundle is;
3. serve the bundle with KServe's ModelServer on 127.0.0.1, classify a few val_test images over HTTP (v2), print
   the answers, and stop the server.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import sys
import time
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from visionpipe.cli.run import add_run_options

    parser = sub.add_parser("demo", help="the demo: run the pipeline on built-in digits (what `make demo` does)")
    add_run_options(parser, "pipeline parameter")
    parser.set_defaults(func=cmd_demo, source=None)


def cmd_demo(args: argparse.Namespace) -> int:
    from visionpipe.cli.run import run_training
    from visionpipe.cli.summary import summarise_run

    started = time.monotonic()
    print("visionpipe demo: the training pipeline on builtin://sklearn-digits through kfp.local\n", flush=True)
    result = run_training(args)
    pipeline_seconds = time.monotonic() - started
    summary = summarise_run(result)
    print("\n" + "=" * 100)
    print(result.artifact_path("data_summary").read_text())
    for text in summary.decision_summaries:
        print(text)
    print(summary.report)
    print(f"Bundle published at {summary.bundle_uri}")
    print(f"Pipeline artifacts under {summary.run_dir} (pipeline {pipeline_seconds:.0f} s)")
    if result.log_path is not None:
        print(f"Task logs under {result.log_path.parent}")
    print(flush=True)
    dataset_dir = result.artifact_path("dataset")
    print(classify_over_http(summary.bundle_uri, dataset_dir))
    print(f"\nvisionpipe demo: done in {time.monotonic() - started:.0f} s")
    return 0


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
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[2] == 1 else image).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()
