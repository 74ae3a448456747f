"""The training worker: one rank of a data-parallel supervised_train run under torchrun (or one plain
process), the entry point the KFP step (`run_torchrun`) and a Kubeflow Trainer TrainJob both call:

    python -m visionpipe.phases.train_worker --dataset <dir | s3://bucket/prefix> --out <dir | s3://bucket/prefix>
        --recipe <name or yaml path> [--recipe-overrides-json '{...}'] [--backbone <dir | s3://...>]
        [--checkpoint-uri <s3://... | dir>] [--device cpu|cuda] [--checkpoint-dir <dir>]

s3:// inputs are downloaded (credentials from the environment, visionpipe/serving/storage.py) by local rank 0
of each node into a node-local folder; the other ranks wait. Global rank 0 writes the outputs; for an s3://
--out it writes them locally and uploads them under it. Layout of --out: ``model/`` (model.safetensors +
model.json), ``logits/`` (val_calib.npz, val_test.npz, meta.json), ``curve.png``, ``result.json`` (the
TrainResult) and, last, ``_SUCCESS``. The per-epoch checkpoint lives in --checkpoint-dir (default
``<out>/.checkpoint`` for a local --out, a node-local folder for an s3:// one; --checkpoint-uri mirrors it), so a
relaunch or a torchrun restart (--max-restarts) resumes from rank 0's last checkpoint, every rank loading it.

Errors (bad recipe, unreadable dataset, storage) exit with status 2 and one line ``train_worker: <Error>: <why>``
on stderr (rank 0).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from visionpipe.data.datasets import DatasetError
from visionpipe.phases import supervised_train
from visionpipe.serving import storage
from visionpipe.serving.storage import StorageError
from visionpipe.specs.checks import SpecError
from visionpipe.training import distributed
from visionpipe.training.distributed import DistContext
from visionpipe.training.errors import TrainError
from visionpipe.training.loop import pick_device
from visionpipe.training.recipes import RecipeError, load_recipe, parse_overrides

SUCCESS_FILE = "_SUCCESS"
RESULT_FILE = "result.json"
CURVE_FILE = "curve.png"
EXIT_NAMED_ERROR = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m visionpipe.phases.train_worker", description=__doc__.split("\n\n")[0])
    p.add_argument("--dataset", required=True, help="Dataset directory or s3://bucket/prefix")
    p.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    p.add_argument("--recipe", required=True, help="shipped recipe name or YAML path")
    p.add_argument("--recipe-overrides-json", default="", help="JSON object of recipe overrides")
    p.add_argument("--backbone", default="", help="pretrained backbone directory or s3://... (optional)")
    p.add_argument("--checkpoint-uri", default="", help="checkpoint mirror: s3://bucket/prefix or absolute folder")
    p.add_argument("--checkpoint-dir", default="", help="local checkpoint folder (default: see above)")
    p.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    named = (RecipeError, SpecError, TrainError, DatasetError, StorageError, FileNotFoundError)
    try:
        ctx, device = distributed.init(pick_device(args.device))
    except (TrainError, RuntimeError) as exc:
        print(f"train_worker: {type(exc).__name__}: {exc}", file=sys.stderr)
        return EXIT_NAMED_ERROR
    try:
        _work(args, ctx, device)
    except named as exc:
        if ctx.is_main:
            print(f"train_worker: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return EXIT_NAMED_ERROR
    finally:
        distributed.shutdown()
    return 0


def _work(args: argparse.Namespace, ctx: DistContext, device: torch.device) -> None:
    recipe = load_recipe(args.recipe, parse_overrides(args.recipe_overrides_json))
    s3_uris = [u for u in (args.dataset, args.out, args.backbone, args.checkpoint_uri) if storage.is_s3(u)]
    if s3_uris:
        storage.require_s3_credentials(*s3_uris)
    staging = _staging_dir(args)
    dataset_dir = _stage(ctx, args.dataset, staging / "dataset")
    backbone_dir = _stage(ctx, args.backbone, staging / "backbone") if args.backbone else None
    out_s3 = storage.is_s3(args.out)
    out_dir = staging / "out" if out_s3 else Path(args.out)
    checkpoint_dir = (
        Path(args.checkpoint_dir)
        if args.checkpoint_dir
        else (staging / "checkpoint" if out_s3 else out_dir / ".checkpoint")
    )

    def clear_success() -> None:
        marker = storage.join(args.out, SUCCESS_FILE) if out_s3 else str(out_dir / SUCCESS_FILE)
        if storage.exists(marker):
            storage.delete(marker)

    distributed.agree(ctx, clear_success, lambda c: c.is_main)
    result = supervised_train.run(
        dataset_dir,
        out_dir / "model",
        out_dir / "logits",
        recipe,
        checkpoint_dir,
        backbone_dir=backbone_dir,
        curve_path=out_dir / CURVE_FILE,
        device=device.type,
        log=distributed.main_log(ctx, print),
        checkpoint_uri=args.checkpoint_uri,
    )

    def publish() -> None:
        (out_dir / RESULT_FILE).write_text(result.to_json())
        if out_s3:
            storage.upload_prefix(out_dir, args.out)
            storage.write_bytes(storage.join(args.out, SUCCESS_FILE), b"")
        else:
            (out_dir / SUCCESS_FILE).write_text("")
        print(f"train_worker: wrote {args.out} ({SUCCESS_FILE} last)", flush=True)

    distributed.agree(ctx, publish, lambda c: c.is_main)
    if staging.is_dir():
        distributed.barrier(ctx)
        if ctx.local_rank == 0:
            shutil.rmtree(staging, ignore_errors=True)


STAGING_PREFIX = "visionpipe-train-"


def _staging_dir(args: argparse.Namespace) -> Path:
    """A node-local folder the local ranks share: keyed by torchrun's run id (the same across restarts, so a
    restarted group reuses finished downloads) and the inputs; a plain process keys it by its pid."""
    alone = "" if "TORCHELASTIC_RUN_ID" in os.environ else str(os.getpid())
    key = distributed.run_key(args.dataset, args.out, args.backbone, alone)
    return Path(tempfile.gettempdir()) / f"{STAGING_PREFIX}{key}"


def _stage(ctx: DistContext, uri: str, local: Path) -> Path:
    """A local path of `uri`: itself when local, else downloaded by local rank 0 (once: a `.complete` marker)
    while the other ranks wait."""
    if not storage.is_s3(uri):
        return Path(uri)
    marker = local / ".complete"

    def download() -> None:
        if marker.is_file():
            return
        shutil.rmtree(local, ignore_errors=True)
        local.mkdir(parents=True)
        storage.download_prefix(uri, local)
        marker.write_text(uri)

    distributed.agree(ctx, download, lambda c: c.local_rank == 0)
    return local


if __name__ == "__main__":
    sys.exit(main())
