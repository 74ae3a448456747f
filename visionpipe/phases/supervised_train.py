"""Phase 3, supervised_train: train a classifier from a recipe, keep the best epoch on val_select, write its
logits on val_calib / val_test.

Outputs (see DESIGN.md, contracts):

- ``model_dir/model.safetensors``: the BEST epoch's weights (EMA weights when the recipe enables EMA;
  PEFT adapters merged), and ``model_dir/model.json``: arch, preprocess, classes, recipe + hash, best epoch,
  history, split fingerprints.
- ``logits_dir/val_calib.npz`` and ``logits_dir/val_test.npz`` (``logits`` float32 (N, K), ``labels``
  int64) and ``logits_dir/meta.json``, computed in fp32 from the exact weights saved in model.safetensors,
  reloaded into a fresh model, through `visionpipe.serving.views.predict_rows` (the shared preprocessing; with
  ``preprocess.views`` each image's global view + tiles in one forward pass, aggregated to log-probabilities,
  the code bundle_validation and the served predictor run). Training and the per-epoch val_select selection use
  the global view only (`to_model_input`), views or not.
- ``checkpoint_dir``: after every epoch a resumable state (model, optimizer, EMA, schedule position,
  history, best weights) in safetensors + JSON (never pickle). A rerun on the same checkpoint_dir resumes
  after the last completed epoch and gives the same result as an uninterrupted run: the data order,
  augmentation and dropout of epoch e are drawn from generators seeded by (recipe.seed, e) alone.
"""

import base64
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import nn

from visionpipe.data.datasets import Dataset as LoadedDataset
from visionpipe.data.datasets import SplitData, load_dataset, write_json
from visionpipe.data.logits import LOGIT_SPLITS
from visionpipe.serving.metrics import mcc
from visionpipe.serving.models import VisionClassifier, build_model, load_weights, save_weights
from visionpipe.serving.views import predict_rows
from visionpipe.specs import ArchSpec, PreprocessSpec
from visionpipe.specs.resolve import resolve_arch, resolve_preprocess
from visionpipe.training.augment import black_level
from visionpipe.training.batching import ModelInputs, in_order
from visionpipe.training.checkpoint import CheckpointMirror, resume, save_checkpoint, state_copy
from visionpipe.training.errors import TrainError, TrainingInterrupted
from visionpipe.training.loop import TrainState, build_trainable_model, new_state, pick_device, train_epoch
from visionpipe.training.passthrough import is_passthrough
from visionpipe.training.peft import merge_peft, trainable_summary
from visionpipe.training.recipes import Recipe

MODEL_FILE = "model.safetensors"
MODEL_META_FILE = "model.json"

FloatArray = npt.NDArray[np.float32]
Log = Callable[[str], None]


@dataclass(frozen=True)
class TrainResult:
    """What `run` produced, with the figures the KFP Metrics show."""

    model_path: Path
    metric_name: str
    best_epoch: int
    best_metric: float
    epochs_run: int
    stopped_early: bool
    resumed_from_epoch: int
    train_seconds: float
    images_per_second: float
    split_accuracy: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------- core


def run(
    dataset_dir: Path,
    model_dir: Path,
    logits_dir: Path,
    recipe: Recipe,
    checkpoint_dir: Path,
    backbone_dir: Path | None = None,
    curve_path: Path | None = None,
    device: str | None = None,
    stop_after_epoch: int | None = None,
    log: Log = print,
    checkpoint_uri: str = "",
) -> TrainResult:
    """Train `recipe` on the Dataset at `dataset_dir`; write the best model, its logits and a curve plot.

    `backbone_dir` holds a pretrained backbone (domain_pretrain's output); one holding the pass-through marker
    (domain_pretrain disabled) counts as no backbone. `checkpoint_dir` holds the per-epoch state; when it
    already holds one, training resumes after its last epoch. With `checkpoint_uri` (s3://bucket/prefix or a
    shared folder) every epoch's checkpoint is mirrored there too and a newer one found there is resumed from,
    so a retry on a fresh disk continues the run. `stop_after_epoch` (a test hook) raises TrainingInterrupted
    after that epoch's checkpoint.
    """
    ds = load_dataset(dataset_dir)
    preprocess = resolve_preprocess(recipe, ds.image_shape[2])
    arch = resolve_arch(recipe, ds.num_classes, preprocess)
    metric_name = selection_metric_name(recipe, ds.num_classes)
    train, select = ds.split("train", "fit"), ds.split("val_select", "select")
    dev = pick_device(device)
    backbone = None if is_passthrough(backbone_dir) else backbone_dir

    loop = new_state(recipe, arch, backbone, dev, train.labels, ds.num_classes)
    log(
        f"supervised_train: {recipe.name} ({arch.name}, {trainable_summary(loop.model)}) on {dev.type}; "
        f"train {len(train.labels)} / val_select {len(select.labels)} images; select by {metric_name}"
    )
    note = views_resolution_note(preprocess, ds.image_shape)
    if note:
        log(f"supervised_train: {note}")

    def phase_log(message: str) -> None:
        log(f"supervised_train: {message}")

    mirror = CheckpointMirror(checkpoint_uri, checkpoint_dir, phase_log) if checkpoint_uri else None
    if mirror is not None:
        mirror.pull()
    resumed_from = resume(loop, checkpoint_dir, phase_log)
    _fit(loop, recipe, preprocess, train, select, metric_name, checkpoint_dir, stop_after_epoch, log, mirror)

    best = export_best_model(loop, recipe, arch, model_dir)
    split_accuracy = write_logits(best, ds, preprocess, recipe.eval_batch_size, logits_dir, dev)
    write_model_meta(model_dir, arch, preprocess, ds.classes, ds.positive_class, recipe, loop, ds.split_fingerprints)
    if curve_path is not None:
        write_curve(loop.history, loop.best_epoch, metric_name, curve_path)
    seconds = sum(h["seconds"] for h in loop.history)
    images = sum(h["train_images"] for h in loop.history)
    log(
        f"supervised_train: best epoch {loop.best_epoch} ({metric_name} {loop.best_metric:.4f}); "
        + ", ".join(f"{k} accuracy {v:.4f}" for k, v in split_accuracy.items())
    )
    return TrainResult(
        model_path=model_dir / MODEL_FILE,
        metric_name=metric_name,
        best_epoch=loop.best_epoch,
        best_metric=loop.best_metric,
        epochs_run=loop.epoch,
        stopped_early=loop.stopped_early,
        resumed_from_epoch=resumed_from,
        train_seconds=seconds,
        images_per_second=images / seconds if seconds > 0 else 0.0,
        split_accuracy=split_accuracy,
        history=list(loop.history),
    )


def views_resolution_note(preprocess: PreprocessSpec, image_shape: tuple[int, int, int]) -> str:
    """A warning when multi-view tiles would be cut from stored images too small for them ('' otherwise).

    The Dataset stores every image at data_fetch's ``image_size``; the val_calib / val_test logits cut their
    tiles from those stored images, while a served upload is tiled at its own resolution. Below
    ``views.required_side(size)`` the validated tiles are upsampled and hold less detail than served ones."""
    if preprocess.views is None:
        return ""
    need = preprocess.views.required_side(preprocess.size)
    have = min(image_shape[0], image_shape[1])
    if have >= need:
        return ""
    return (
        f"preprocess.views ({preprocess.views.signature}) tiles the stored {image_shape[0]}x{image_shape[1]} "
        f"images, but each tile needs a {need}-pixel source side to hold {preprocess.size} pixels; run "
        f"data_fetch with image_size={need} (or more) so validated tiles match served ones"
    )


def selection_metric_name(recipe: Recipe, num_classes: int) -> str:
    """``mcc`` for binary tasks and ``accuracy`` otherwise, unless the recipe names one."""
    chosen = recipe.early_stopping.metric
    if chosen == "auto":
        return "mcc" if num_classes == 2 else "accuracy"
    if chosen == "mcc" and num_classes != 2:
        raise TrainError(f"early_stopping.metric='mcc' needs a binary task; this one has {num_classes} classes")
    return chosen


def selection_metric(logits: npt.NDArray[np.floating], labels: npt.NDArray[np.int64], name: str) -> float:
    """The val_select score: accuracy or MCC (binary, class 1 positive; MCC is symmetric in the classes)."""
    pred = np.asarray(logits).argmax(axis=1)
    if name == "mcc":
        return mcc(labels == 1, pred == 1)
    return float(np.mean(pred == labels))


def is_improvement(score: float, loss: float, best_score: float, best_loss: float, min_delta: float) -> bool:
    """A better val_select score by more than min_delta; with min_delta 0, an equal score with a lower
    val_select loss also counts (small selection splits tie often, and the earliest tie is usually an
    under-trained epoch)."""
    if score > best_score + min_delta:
        return True
    return min_delta == 0 and score == best_score and loss < best_loss


def predict_logits(
    model: nn.Module,
    images: npt.NDArray[np.uint8],
    preprocess: PreprocessSpec,
    batch_size: int = 256,
    device: torch.device | str | None = None,
    positive_index: int = 1,
) -> FloatArray:
    """fp32 logits (N, K) of uint8 NHWC images through the shared preprocessing; puts `model` in eval mode.

    Without views: the model's raw logits. With ``preprocess.views``: each image's views in one forward pass,
    aggregated to log-probabilities (`visionpipe.serving.views.aggregate_views`; `positive_index` is the binary
    task's positive class), exactly what `BundleModel.predict_images` computes."""
    if len(images) == 0:
        raise TrainError("predict_logits got no images")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    model.eval()

    def forward(x: torch.Tensor) -> FloatArray:
        with torch.no_grad():
            return np.asarray(model(x.to(dev)).float().cpu().numpy(), dtype=np.float32)

    return predict_rows(forward, images, preprocess, positive_index, batch_size).astype(np.float32)


def _predict_inputs(model: nn.Module, inputs: ModelInputs, batch_size: int, device: torch.device) -> FloatArray:
    """fp32 logits of a split's preprocessed inputs (the same values `predict_logits` computes)."""
    model.eval()
    out: list[FloatArray] = []
    batches = in_order(len(inputs), batch_size)
    with torch.no_grad():
        for x, _ in inputs.iterate(batches, 0):
            out.append(model(x.to(device)).float().cpu().numpy())
    return np.concatenate(out).astype(np.float32)


# ------------------------------------------------------------------------------------------ training loop


def _fit(
    loop: TrainState,
    recipe: Recipe,
    preprocess: PreprocessSpec,
    train: SplitData,
    select: SplitData,
    metric_name: str,
    checkpoint_dir: Path,
    stop_after_epoch: int | None,
    log: Log,
    mirror: CheckpointMirror | None = None,
) -> None:
    """Train epoch after epoch from `loop.epoch`; keep the best epoch on val_select (early stopping by
    patience or time), checkpoint (and mirror) after every epoch."""
    inputs = ModelInputs(train.images, preprocess)
    select_x = ModelInputs(select.images, preprocess)
    fill = black_level(preprocess).to(loop.device)
    elapsed = sum(h["seconds"] for h in loop.history)
    while loop.epoch < recipe.epochs and not loop.stopped_early:
        epoch = loop.epoch + 1
        started = time.perf_counter()
        train_loss, train_images = train_epoch(loop, recipe, inputs, train.labels, epoch, fill)
        train_seconds = time.perf_counter() - started
        select_logits = _predict_inputs(loop.eval_model, select_x, recipe.eval_batch_size, loop.device)
        select_loss = float(F.cross_entropy(torch.from_numpy(select_logits), torch.from_numpy(select.labels)))
        score = selection_metric(select_logits, select.labels, metric_name)
        min_delta = recipe.early_stopping.min_delta
        improved = loop.best_epoch == 0 or is_improvement(
            score, select_loss, loop.best_metric, loop.best_loss, min_delta
        )
        if improved:
            loop.best_epoch, loop.best_metric, loop.best_loss = epoch, score, select_loss
            loop.best_state = state_copy(loop.eval_model)
        seconds = time.perf_counter() - started
        elapsed += seconds
        loop.epoch = epoch
        loop.history.append(
            {
                "epoch": float(epoch),
                "train_loss": train_loss,
                "val_select_loss": select_loss,
                f"val_select_{metric_name}": score,
                "lr": float(loop.optimizer.param_groups[0]["lr"]),
                "images_per_second": train_images / train_seconds if train_seconds > 0 else 0.0,
                "train_images": float(train_images),
                "seconds": seconds,
            }
        )
        patience = recipe.early_stopping.patience
        out_of_time = recipe.max_train_seconds > 0 and elapsed >= recipe.max_train_seconds
        no_progress = patience > 0 and epoch - loop.best_epoch >= patience
        loop.stopped_early = epoch < recipe.epochs and (no_progress or out_of_time)
        save_checkpoint(loop, checkpoint_dir, improved)
        if mirror is not None:
            mirror.push()
        eta = (elapsed / len(loop.history)) * (recipe.epochs - epoch) if not loop.stopped_early else 0.0
        log(
            f"epoch {epoch}/{recipe.epochs} loss {train_loss:.4f} val_select {metric_name} {score:.4f} "
            f"(best {loop.best_metric:.4f} @ {loop.best_epoch}) lr {loop.history[-1]['lr']:.2e} "
            f"{loop.history[-1]['images_per_second']:.0f} img/s {seconds:.1f}s ETA {eta:.0f}s"
            + (" -- early stop" if loop.stopped_early else "")
        )
        if stop_after_epoch is not None and epoch >= stop_after_epoch and loop.epoch < recipe.epochs:
            raise TrainingInterrupted(f"stopped after epoch {epoch} (stop_after_epoch hook)")


# ------------------------------------------------------------------------------------------------ outputs


def export_best_model(loop: TrainState, recipe: Recipe, arch: ArchSpec, model_dir: Path) -> VisionClassifier:
    """Merge the best epoch's weights into a plain model, save it, and return a fresh model loaded from the
    saved file (so every later output is computed from exactly the bytes on disk)."""
    if not loop.best_state:
        raise TrainError("no epoch was evaluated; nothing to export")
    wrapped = build_trainable_model(recipe, arch, None)
    wrapped.load_state_dict(loop.best_state)
    merged = merge_peft(wrapped)
    path = model_dir / MODEL_FILE
    save_weights(merged, path)
    fresh = build_model(arch)
    load_weights(fresh, path, strict=True)
    return fresh.to(loop.device).eval()


def write_logits(
    model: nn.Module,
    ds: LoadedDataset,
    preprocess: PreprocessSpec,
    batch_size: int,
    logits_dir: Path,
    device: torch.device,
) -> dict[str, float]:
    """val_calib.npz / val_test.npz (logits float32, labels int64) + meta.json; returns accuracy per split."""
    logits_dir.mkdir(parents=True, exist_ok=True)
    accuracy: dict[str, float] = {}
    model = model.to("cpu") if device.type != "cpu" else model
    positive = ds.positive_index if ds.positive_index is not None else 1  # as the logits meta reads it
    for name in LOGIT_SPLITS:
        split = ds.split(name, "evaluate")
        logits = predict_logits(model, split.images, preprocess, batch_size, "cpu", positive)
        np.savez(logits_dir / f"{name}.npz", logits=logits, labels=split.labels.astype(np.int64))
        accuracy[name] = float(np.mean(logits.argmax(axis=1) == split.labels))
    write_json(logits_dir / "meta.json", {"classes": list(ds.classes), "positive_class": ds.positive_class})
    return accuracy


def write_model_meta(
    model_dir: Path,
    arch: ArchSpec,
    preprocess: PreprocessSpec,
    classes: Sequence[str],
    positive_class: str | None,
    recipe: Recipe,
    loop: TrainState,
    split_fingerprints: dict[str, str],
) -> None:
    write_json(
        model_dir / MODEL_META_FILE,
        {
            "arch": arch.to_dict(),
            "preprocess": preprocess.to_dict(),
            "preprocess_signature": preprocess.signature,
            "classes": list(classes),
            "positive_class": positive_class,
            "recipe": recipe.to_dict(),
            "recipe_hash": loop.recipe_hash,
            "best_epoch": loop.best_epoch,
            "best_val_select_metric": loop.best_metric,
            "ema": recipe.ema.enabled,
            "history": loop.history,
            "split_fingerprints": {k: split_fingerprints[k] for k in ("train", "val_select")},
        },
    )


def write_curve(history: list[dict[str, float]], best_epoch: int, metric_name: str, path: Path) -> None:
    """A PNG of train / val_select loss and the val_select metric per epoch, the best epoch marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax_loss, ax_metric) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [h["train_loss"] for h in history], label="train loss (augmented)")
    ax_loss.plot(epochs, [h["val_select_loss"] for h in history], label="val_select loss")
    ax_loss.set_xlabel("epoch")
    ax_loss.legend()
    ax_metric.plot(epochs, [h[f"val_select_{metric_name}"] for h in history], marker="o", label=metric_name)
    ax_metric.axvline(best_epoch, color="tab:red", linestyle="--", label=f"best epoch {best_epoch}")
    ax_metric.set_xlabel("epoch")
    ax_metric.set_ylabel(f"val_select {metric_name}")
    ax_metric.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def curve_html(png_path: Path, result: TrainResult) -> str:
    """A self-contained HTML page (the PNG inlined) with the per-epoch table, for the KFP UI."""
    png = base64.b64encode(png_path.read_bytes()).decode()
    keys = [
        "epoch",
        "train_loss",
        "val_select_loss",
        f"val_select_{result.metric_name}",
        "lr",
        "images_per_second",
    ]
    rows = "".join("<tr>" + "".join(f"<td>{h[k]:.4g}</td>" for k in keys) + "</tr>" for h in result.history)
    return (
        "<html><body><h3>supervised_train: best epoch "
        f"{result.best_epoch} (val_select {result.metric_name} {result.best_metric:.4f})</h3>"
        f'<img src="data:image/png;base64,{png}"/>'
        "<table border=1><tr>" + "".join(f"<th>{k}</th>" for k in keys) + f"</tr>{rows}</table></body></html>"
    )
