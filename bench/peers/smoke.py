"""Smoke check of the peers, run by hand (not part of `make test`): each peer answers as our server does.

    .venv/bin/python bench/peers/smoke.py [--bundle bench/out/serve-bundle] [--peers mlserver,pytriton,bentoml]
        [--requests 20] [--concurrency 8] [--max-batch-size 16] [--max-wait-ms 5]

Starts our server (``python -m visionpipe.serving.server``, TTA off, 2 torch threads) on the bundle, sends it
`--requests` single-image requests (val_test digits of bench/out/serve-ds, base64 PNG), then starts each peer
on the same bundle with its batching on, sends the same requests from `--concurrency` threads (so batches form),
and checks every answer: the labels equal our server's and the calibrated probabilities agree to 1e-5. It
prints each peer's batch sizes (the peer logs one line per forward pass) and stops every server by PID.
Exit code 0 when every available peer agrees; a peer that is not available is reported with the reason.
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import re
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import numpy.typing as npt

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from bench import peers  # noqa: E402
from visionpipe.harness import free_port, running_server  # noqa: E402

MODEL = "digits"
TOLERANCE = 1e-5


def val_test_pngs(dataset: Path, limit: int) -> list[bytes]:
    """PNG bytes of the first `limit` val_test images (as bench/serve.py encodes them)."""
    from PIL import Image

    from visionpipe.data.datasets import load_dataset

    split = load_dataset(dataset).split("val_test", "evaluate")
    out = []
    for img in np.asarray(split.images[:limit]):
        buffer = io.BytesIO()
        Image.fromarray(img[..., 0] if img.shape[2] == 1 else img).save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def ours(bundle: Path, pngs: list[bytes]) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]]:
    """Our server's probabilities and labels, one request per image."""
    port = free_port()
    argv = [sys.executable, "-m", "visionpipe.serving.server", "--bundle", str(bundle), "--host", "127.0.0.1"]
    argv += ["--http_port", str(port), "--tta", "off", "--model_name", MODEL, "--torch_threads", "2"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    probs, labels = [], []
    with running_server(argv, port, timeout_s=180.0, env=env) as server:
        for png in pngs:
            b64 = base64.b64encode(png).decode("ascii")
            body = json.dumps({"inputs": [{"name": "image", "shape": [1], "datatype": "BYTES", "data": [b64]}]})
            request = urllib.request.Request(
                f"{server.base_url}/v2/models/{MODEL}/infer", body.encode(), {"Content-Type": "application/json"}
            )
            with urllib.request.urlopen(request, timeout=60) as answer:
                outputs = {o["name"]: o for o in json.loads(answer.read())["outputs"]}
            probs.append(np.asarray(outputs["probabilities"]["data"], np.float32))
            labels.append(int(outputs["label"]["data"][0]))
    return np.stack(probs), np.asarray(labels, np.int64)


def check_peer(
    name: str,
    bundle: Path,
    pngs: list[bytes],
    reference: tuple[npt.NDArray[np.float32], npt.NDArray[np.int64]],
    args: argparse.Namespace,
) -> bool:
    os.environ["VP_PEER_LOG_BATCHES"] = "1"
    t0 = time.perf_counter()
    try:
        process, url = peers.start(name, bundle, free_port(), args.max_batch_size, args.max_wait_ms)
    except peers.PeerError as exc:
        print(f"{name}: FAILED to start: {exc}", flush=True)
        return False
    print(f"{name}: pid {process.pid}, {url}, ready in {time.perf_counter() - t0:.0f} s", flush=True)
    try:
        with ThreadPoolExecutor(max_workers=args.concurrency) as pool:
            answers = list(pool.map(lambda png: peers.infer(name, url, [png], MODEL), pngs))
    except (OSError, ValueError, KeyError) as exc:  # urllib's HTTPError is an OSError
        detail = exc.read()[:500] if isinstance(exc, urllib.error.HTTPError) else b""
        print(f"{name}: FAILED: {exc} {detail!r}; log tail:\n{peers.log_tail(process)}", flush=True)
        peers.stop(process)
        return False
    log = peers.log_tail(process, 200_000)
    code = peers.stop(process)
    probs = np.concatenate([a[0] for a in answers])
    labels = np.concatenate([a[1] for a in answers])
    ref_probs, ref_labels = reference
    worst = float(np.abs(probs - ref_probs).max())
    same_labels = bool((labels == ref_labels).all())
    batches = [int(n) for n in re.findall(r"vp-peer batch (\d+)", log)]
    ok = same_labels and worst <= TOLERANCE and len(answers) == len(pngs)
    print(
        f"{name}: {len(answers)} answers, labels {'equal' if same_labels else 'DIFFER'}, max |dp| {worst:.2e} "
        f"(tolerance {TOLERANCE:g}), forward passes {len(batches)} with batch sizes {sorted(batches, reverse=True)}, "
        f"stopped with exit code {code}: {'OK' if ok else 'FAILED'}",
        flush=True,
    )
    return ok


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bundle", type=Path, default=REPO / "bench" / "out" / "serve-bundle")
    parser.add_argument("--dataset", type=Path, default=REPO / "bench" / "out" / "serve-ds")
    parser.add_argument("--peers", default=",".join(peers.PEERS))
    parser.add_argument("--requests", type=int, default=20)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-batch-size", type=int, default=16)
    parser.add_argument("--max-wait-ms", type=float, default=5.0)
    args = parser.parse_args(argv)
    if not (args.bundle / "bundle.json").is_file():
        parser.error(f"--bundle {args.bundle}: no bundle.json; run bench/serve.py once (it builds the demo bundle)")
    pngs = val_test_pngs(args.dataset, args.requests)
    t0 = time.perf_counter()
    reference = ours(args.bundle, pngs)
    print(f"our server: {len(pngs)} answers in {time.perf_counter() - t0:.0f} s (start included)", flush=True)
    status = peers.available()
    ok = True
    for name in [p.strip() for p in args.peers.split(",") if p.strip()]:
        if status.get(name, f"unknown peer; the peers are {sorted(peers.PEERS)}") is not None:
            print(f"{name}: not available: {status.get(name)}", flush=True)
            ok = False
            continue
        ok = check_peer(name, args.bundle, pngs, reference, args) and ok
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
