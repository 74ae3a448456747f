"""Benchmark: the compiled CPU runtime, torch vs ONNX Runtime vs OpenVINO, side by side in one run.

Each recipe's model (digits-cnn: cnn-small 28 px grey; roadwork-effnet-lite0: EfficientNet-Lite0 224 px RGB) is
built as the bundle rebuilds it (random init: the figures are speed, not accuracy), exported once with
`visionpipe.serving.compiled.export_onnx` (the file bundle_validation ships), and the same input rows are run by

- torch: the module in eval mode, `torch.inference_mode`, `torch.set_num_threads(threads)`;
- onnxruntime: `visionpipe.serving.compiled.load_onnx` (the session serving uses: intra-op threads = threads,
  sequential, all graph optimisations, no spinning);
- openvino: `openvino.Core().compile_model(<the .onnx>, "CPU", {INFERENCE_NUM_THREADS: threads, PERFORMANCE_HINT:
  LATENCY})` (OpenVINO reads the ONNX file directly; a dev dependency only).

For batch 1 / 8 / 32 each runtime runs warm-up calls, then timed calls for at least `--seconds` (median of the
per-call rates reported, images/s). The max |Δlogit| of each runtime against torch is printed too.

    .venv/bin/python bench/compiled.py [--recipes digits-cnn,roadwork-effnet-lite0] [--batches 1,8,32]
        [--threads 2] [--seconds 2]
"""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench/train_mnist.py

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from visionpipe.serving.compiled import export_onnx, load_onnx  # noqa: E402
from visionpipe.serving.models import build_model  # noqa: E402
from visionpipe.specs.resolve import resolve_arch, resolve_preprocess  # noqa: E402
from visionpipe.training.recipes import load_recipe  # noqa: E402

Rows = npt.NDArray[np.float32]
Runner = Callable[[Rows], npt.NDArray[np.float32]]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipes", default="digits-cnn,roadwork-effnet-lite0")
    parser.add_argument("--batches", default="1,8,32")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seconds", type=float, default=2.0, help="timed seconds per (runtime, batch), at least")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    import onnxruntime
    import openvino

    print(
        f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, openvino {openvino.__version__}; "
        f"threads {args.threads}; load average at start {tuple(round(v, 2) for v in os.getloadavg())}"
    )
    batches = [int(b) for b in args.batches.split(",")]
    print(
        f"{'recipe':<22} {'input':<10} {'batch':>5} {'torch img/s':>12} {'onnxruntime':>12} {'openvino':>12}"
        f" {'ort/torch':>9} {'ov/torch':>9}  max |Δz| ort / ov"
    )
    for name in args.recipes.split(","):
        for line in measure(name, batches, args.threads, args.seconds):
            print(line, flush=True)
    print(f"load average at end {tuple(round(v, 2) for v in os.getloadavg())}")
    return 0


def measure(name: str, batches: list[int], threads: int, seconds: float) -> list[str]:
    recipe = load_recipe(name)
    classes = 10 if name.startswith("digits") else 2
    preprocess = resolve_preprocess(recipe, 1 if recipe.preprocess.channels in (0, 1) else 3)
    arch = resolve_arch(recipe, classes, preprocess)
    torch.manual_seed(0)
    model = build_model(arch).eval()
    c, s = preprocess.channels, preprocess.size
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "member.onnx"
        start = time.perf_counter()
        export_onnx(model, c, s, classes, path)
        print(f"{name}: exported {path.stat().st_size:,} bytes in {time.perf_counter() - start:.1f} s", flush=True)
        ort_member = load_onnx(path.read_bytes(), c, s, classes, threads=threads)
        import openvino as ov

        compiled = ov.Core().compile_model(
            str(path), "CPU", {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
        )
        request = compiled.create_infer_request()

        def run_torch(x: Rows) -> npt.NDArray[np.float32]:
            with torch.inference_mode():
                return np.asarray(model(torch.from_numpy(x)).numpy(), dtype=np.float32)

        def run_ov(x: Rows) -> npt.NDArray[np.float32]:
            return np.asarray(request.infer({0: x})[compiled.output(0)], dtype=np.float32)

        runners: dict[str, Runner] = {"torch": run_torch, "onnxruntime": ort_member.logits, "openvino": run_ov}
        lines = []
        for batch in batches:
            x = np.random.default_rng(batch).standard_normal((batch, c, s, s)).astype(np.float32)
            want = run_torch(x)
            rates = {key: rate(fn, x, seconds) for key, fn in runners.items()}
            dz = [float(np.max(np.abs(runners[k](x) - want))) for k in ("onnxruntime", "openvino")]
            lines.append(
                f"{name:<22} {f'{c}x{s}x{s}':<10} {batch:>5} {rates['torch']:>12.0f} {rates['onnxruntime']:>12.0f} "
                f"{rates['openvino']:>12.0f} {rates['onnxruntime'] / rates['torch']:>9.2f} "
                f"{rates['openvino'] / rates['torch']:>9.2f}  {dz[0]:.1e} / {dz[1]:.1e}"
            )
        return lines


def rate(fn: Runner, x: Rows, seconds: float) -> float:
    """Median images/s over calls timed for at least `seconds` (after 3 warm-up calls)."""
    for _ in range(3):
        fn(x)
    per_call: list[float] = []
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline or len(per_call) < 5:
        start = time.perf_counter()
        fn(x)
        per_call.append(len(x) / (time.perf_counter() - start))
    return statistics.median(per_call)


if __name__ == "__main__":
    raise SystemExit(main())
