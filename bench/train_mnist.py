"""Benchmark: train a digits recipe on mnist-5k-train, report accuracy on mnist-test-dev.

mnist-test-dev is used ONLY for the final figure printed here: it never feeds training, epoch selection
(val_select is carved out of mnist-5k-train) or any tuning inside this script.

Usage (from the repository root):

    .venv/bin/python bench/train_mnist.py [--recipe digits-cnn-mnist] [--overrides '{"epochs": 30}']
        [--train-dir ../shared/datasets/mnist-5k-train] [--test-dir ../shared/datasets/mnist-test-dev]
        [--threads N] [--seeds 1] [--tta]

The last line printed is ``mnist_dev_accuracy=<float> train_seconds=<float>``. With --seeds K > 1 the figure is
a K-model ensemble (mean softmax) and with --tta it averages small shifts; both are said plainly in the output.
"""

import os

# Under CPU contention (other processes on the cores) OpenMP's busy-waiting threads slow torch down badly;
# passive waiting is the safer default for a benchmark. Must be set before torch is imported.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import io
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from components.data_fetch import run as fetch  # noqa: E402
from components.recipes import load_recipe, parse_overrides  # noqa: E402
from components.supervised_train import predict_logits  # noqa: E402
from components.supervised_train import run as train  # noqa: E402
from serving.metrics import softmax  # noqa: E402
from serving.models import ArchSpec, build_model, load_weights  # noqa: E402
from serving.preprocessing import PreprocessSpec  # noqa: E402

DEFAULT_TRAIN = REPO.parent / "shared" / "datasets" / "mnist-5k-train"
DEFAULT_TEST = REPO.parent / "shared" / "datasets" / "mnist-test-dev"
# train / val_select / val_calib / val_test carved out of mnist-5k-train (val_calib / val_test are unused here)
RATIOS = (0.9, 0.08, 0.01, 0.01)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    work = Path(args.work_dir or tempfile.mkdtemp(prefix="bench-mnist-"))
    print(f"threads={torch.get_num_threads()} work_dir={work} load_average={os.getloadavg()}", flush=True)

    started = time.perf_counter()
    fetch(str(args.train_dir), work / "dataset", ratios=RATIOS, seed=0)
    fetch_seconds = time.perf_counter() - started
    test_images, test_labels = read_image_folder(args.test_dir)

    overrides = parse_overrides(args.overrides)
    probs = np.zeros((len(test_labels), 10), dtype=np.float64)
    train_seconds = 0.0
    for k in range(args.seeds):
        recipe = load_recipe(args.recipe, overrides).with_overrides({"seed": k})
        out = work / f"seed{k}"
        t0 = time.perf_counter()
        result = train(work / "dataset", out / "model", out / "logits", recipe, out / "ckpt")
        train_seconds += time.perf_counter() - t0
        model, preprocess, classes = load_saved(out / "model")
        labels = np.asarray([classes.index(c) for c in test_labels], dtype=np.int64)
        member = member_probs(model, test_images, preprocess, args.tta)
        print(
            f"seed {k}: best epoch {result.best_epoch}, val_select accuracy {result.best_metric:.4f}, "
            f"mnist-test-dev accuracy {float(np.mean(member.argmax(1) == labels)):.4f}",
            flush=True,
        )
        probs += member
    accuracy = float(np.mean(probs.argmax(axis=1) == labels))
    what = "single model" if args.seeds == 1 else f"ensemble of {args.seeds} seeds (mean softmax)"
    what += ", with shift TTA" if args.tta else ", no TTA"
    print(f"recipe={args.recipe} overrides={json.dumps(overrides)} {what}; dataset fetch {fetch_seconds:.1f}s")
    print(f"mnist_dev_accuracy={accuracy:.4f} train_seconds={train_seconds:.1f}")
    return 0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--recipe", default="digits-cnn-mnist")
    parser.add_argument("--overrides", default="{}", help="recipe overrides as a JSON object")
    parser.add_argument("--train-dir", type=Path, default=DEFAULT_TRAIN)
    parser.add_argument("--test-dir", type=Path, default=DEFAULT_TEST)
    parser.add_argument("--work-dir", default="")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--seeds", type=int, default=1, help="ensemble size (1 = a single model)")
    parser.add_argument("--tta", action="store_true", help="average predictions over small shifts")
    return parser.parse_args(argv)


def read_image_folder(root: Path) -> tuple[npt.NDArray[np.uint8], list[str]]:
    """uint8 (N, 28, 28, 1) images and their class names from a <class>/<file>.png folder."""
    images, labels = [], []
    for class_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        for path in sorted(class_dir.glob("*.png")):
            with Image.open(io.BytesIO(path.read_bytes())) as img:
                images.append(np.asarray(img.convert("L"), dtype=np.uint8))
            labels.append(class_dir.name)
    return np.stack(images)[..., None], labels


def load_saved(model_dir: Path) -> tuple[torch.nn.Module, PreprocessSpec, list[str]]:
    meta = json.loads((model_dir / "model.json").read_text())
    model = build_model(ArchSpec.from_dict(meta["arch"]))
    load_weights(model, model_dir / "model.safetensors")
    return model.eval(), PreprocessSpec.from_dict(meta["preprocess"]), list(meta["classes"])


def member_probs(
    model: torch.nn.Module, images: npt.NDArray[np.uint8], preprocess: PreprocessSpec, tta: bool
) -> npt.NDArray[np.float64]:
    """Softmax of one model, optionally averaged over the identity and 4 one-pixel shifts of the image."""
    shifts = [(0, 0)] + ([(1, 0), (-1, 0), (0, 1), (0, -1)] if tta else [])
    total = np.zeros((len(images), 10))
    for dy, dx in shifts:
        shifted = np.roll(images, (dy, dx), axis=(1, 2))
        total += softmax(predict_logits(model, shifted, preprocess, batch_size=500))
    return total / len(shifts)


if __name__ == "__main__":
    raise SystemExit(main())
