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
- views still to choose (recipe ``preprocess.views.aggregate: auto``, or ``learned`` without weights;
  `visionpipe.specs.preprocess.ViewsChoice`) are resolved after the epoch, on val_select only: the chosen
  checkpoint's per-view log-probabilities are computed once (`view_log_probs`) and `choose_views` picks the
  global view alone, mean, max, topk_mean or learned (VIEWS_RULE), or fits the learned weights. The resolved,
  concrete spec (or none) is what model.json's ``preprocess`` carries and what the logits above are computed
  with; model.json's ``views_selection`` records the candidates, their val_select scores, the winner and the rule.
- ``checkpoint_dir``: after every epoch a resumable state (model, optimizer, EMA, schedule position,
  history, best weights) in safetensors + JSON (never pickle). A rerun on the same checkpoint_dir resumes
  after the last completed epoch and gives the same result as an uninterrupted run: the data order,
  augmentation and dropout of epoch e are drawn from generators seeded by (recipe.seed, e) alone.
"""

import base64
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]  # threadpoolctl ships no types
from torch import nn

from visionpipe.data.datasets import Dataset as LoadedDataset
from visionpipe.data.datasets import SplitData, load_dataset, write_json
from visionpipe.data.logits import LOGIT_SPLITS
from visionpipe.serving.metrics import mcc
from visionpipe.serving.models import VisionClassifier, build_model, load_weights, save_weights
from visionpipe.serving.views import pool_views, predict_rows, view_log_probs
from visionpipe.specs import ArchSpec, PreprocessSpec
from visionpipe.specs.preprocess import WEIGHT_DECIMALS, ViewsChoice, ViewsSpec
from visionpipe.specs.resolve import pending_views, resolve_arch, resolve_preprocess
from visionpipe.training import distributed
from visionpipe.training.augment import black_level
from visionpipe.training.batching import Batch, ModelInputs, in_order
from visionpipe.training.checkpoint import CheckpointMirror, resume, save_checkpoint
from visionpipe.training.errors import TrainError, TrainingInterrupted
from visionpipe.training.loop import TrainState, build_trainable_model, new_state, pick_device, train_epoch
from visionpipe.training.passthrough import is_passthrough
from visionpipe.training.peft import merge_peft, trainable_summary
from visionpipe.training.recipes import Recipe

MODEL_FILE = "model.safetensors"
MODEL_META_FILE = "model.json"

FloatArray = npt.NDArray[np.float32]
FloatArray64 = npt.NDArray[np.float64]
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
    views_selection: dict[str, object] = field(default_factory=dict)  # how pending views were resolved, or {}

    def to_json(self) -> str:
        """The result as JSON (train_worker's result.json); model_path as a string."""
        payload = {f.name: getattr(self, f.name) for f in fields(self)}
        payload["model_path"] = str(self.model_path)
        return json.dumps(payload, indent=1, sort_keys=True) + "\n"

    @classmethod
    def from_json(cls, text: str) -> "TrainResult":
        """Parse `to_json`'s output; a missing or mistyped field is named."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TrainError(f"a TrainResult must be a JSON object ({exc})") from exc
        if not isinstance(data, dict):
            raise TrainError(f"a TrainResult must be a JSON object, not {type(data).__name__}")
        names = [f.name for f in fields(cls)]
        missing = [n for n in names if n not in data]
        if missing:
            raise TrainError(f"TrainResult JSON lacks {missing}; fields are {names}")

        def number(key: str) -> float:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise TrainError(f"TrainResult JSON: {key}={value!r} must be a number")
            return float(value)

        def integer(key: str) -> int:
            value = data[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise TrainError(f"TrainResult JSON: {key}={value!r} must be an integer")
            return value

        history, accuracy, views = data["history"], data["split_accuracy"], data["views_selection"]
        if not isinstance(history, list) or not all(isinstance(h, dict) for h in history):
            raise TrainError("TrainResult JSON: history must be a list of objects")
        if not isinstance(accuracy, dict) or not isinstance(views, dict):
            raise TrainError("TrainResult JSON: split_accuracy and views_selection must be objects")
        return cls(
            model_path=Path(str(data["model_path"])),
            metric_name=str(data["metric_name"]),
            best_epoch=integer("best_epoch"),
            best_metric=number("best_metric"),
            epochs_run=integer("epochs_run"),
            stopped_early=bool(data["stopped_early"]),
            resumed_from_epoch=integer("resumed_from_epoch"),
            train_seconds=number("train_seconds"),
            images_per_second=number("images_per_second"),
            split_accuracy={str(k): float(v) for k, v in accuracy.items()},
            history=[{str(k): float(v) for k, v in h.items()} for h in history],
            views_selection={str(k): v for k, v in views.items()},
        )


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

    Under torchrun (an initialised process group, visionpipe/training/distributed.py) every rank trains its
    shard of each global batch; only rank 0 logs, evaluates val_select, writes checkpoints and the outputs, and
    every rank resumes from the same checkpoint and returns the same TrainResult.
    """
    ctx = distributed.current()
    log = distributed.main_log(ctx, log)
    ds = load_dataset(dataset_dir)
    preprocess = resolve_preprocess(recipe, ds.image_shape[2])
    arch = resolve_arch(recipe, ds.num_classes, preprocess)
    metric_name = selection_metric_name(recipe, ds.num_classes)
    train, select = ds.split("train", "fit"), ds.split("val_select", "select")
    dev = pick_device(device)
    if dev.type == "cuda" and ctx.enabled:
        dev = torch.device("cuda", ctx.local_rank)
    backbone = None if is_passthrough(backbone_dir) else backbone_dir

    loop = new_state(recipe, arch, backbone, dev, train.labels, ds.num_classes, ctx)
    strategy = "fsdp2" if loop.sharded else "ddp"
    workers = f" x {ctx.world_size} workers ({ctx.backend}, {strategy})" if ctx.enabled else ""
    log(
        f"supervised_train: {recipe.name} ({arch.name}, {trainable_summary(loop.model)}) on {dev.type}{workers}; "
        f"train {len(train.labels)} / val_select {len(select.labels)} images; select by {metric_name}"
    )
    choice = pending_views(recipe)  # views to choose on val_select after the epoch (training: global view only)
    note = views_resolution_note(
        preprocess if choice is None else replace(preprocess, views=choice.geometry), ds.image_shape
    )
    if note:
        log(f"supervised_train: {note}")

    def phase_log(message: str) -> None:
        log(f"supervised_train: {message}")

    mirror = CheckpointMirror(checkpoint_uri, checkpoint_dir, phase_log) if checkpoint_uri else None
    if mirror is not None:  # one download per node (local rank 0); every rank raises if it failed
        distributed.agree(ctx, mirror.pull, lambda c: c.local_rank == 0)
    resumed_from = resume(loop, checkpoint_dir, phase_log)
    check_same_resume(ctx, resumed_from, checkpoint_dir)
    _fit(loop, recipe, preprocess, train, select, metric_name, checkpoint_dir, stop_after_epoch, log, mirror)
    if not ctx.is_main:  # rank 0 writes the outputs; the others return what it reports
        result = distributed.broadcast(ctx, None)
        assert isinstance(result, TrainResult)
        return result
    result = _write_outputs(
        loop,
        ds,
        select,
        recipe,
        arch,
        preprocess,
        choice,
        metric_name,
        model_dir,
        logits_dir,
        curve_path,
        dev,
        resumed_from,
        log,
    )
    return distributed.broadcast(ctx, result)


def check_same_resume(ctx: distributed.DistContext, resumed_from: int, checkpoint_dir: Path) -> None:
    """Every rank must have resumed from the same epoch (a per-node checkpoint_dir without a checkpoint_uri
    mirror leaves the other nodes without rank 0's checkpoint)."""
    if not ctx.enabled:
        return
    gathered: list[object] = [None] * ctx.world_size
    torch.distributed.all_gather_object(gathered, resumed_from)
    if len(set(gathered)) > 1:
        raise TrainError(
            f"the ranks resumed from different epochs {gathered} of {checkpoint_dir}; give every node the same "
            "checkpoint: a shared checkpoint_dir or a checkpoint_uri mirror (s3://...) they all pull from"
        )


def _write_outputs(
    loop: TrainState,
    ds: LoadedDataset,
    select: SplitData,
    recipe: Recipe,
    arch: ArchSpec,
    preprocess: PreprocessSpec,
    choice: ViewsChoice | None,
    metric_name: str,
    model_dir: Path,
    logits_dir: Path,
    curve_path: Path | None,
    dev: torch.device,
    resumed_from: int,
    log: Log,
) -> TrainResult:
    """The best model, its logits, model.json and the curve (rank 0 / one process)."""
    best = export_best_model(loop, recipe, arch, model_dir)
    selection = None
    if choice is not None:
        positive = ds.positive_index if ds.positive_index is not None else 1
        best = best.to("cpu")  # the device write_logits computes the logits on
        preprocess, selection = resolve_views(best, select, preprocess, choice, recipe.eval_batch_size, positive)
        log(f"supervised_train: {describe_views_selection(selection)}")
    split_accuracy = write_logits(best, ds, preprocess, recipe.eval_batch_size, logits_dir, dev)
    write_model_meta(
        model_dir, arch, preprocess, ds.classes, ds.positive_class, recipe, loop, ds.split_fingerprints, selection
    )
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
        views_selection={} if selection is None else selection.to_dict(),
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
    return _forward(model, inputs, in_order(len(inputs), batch_size), device).cpu().numpy().astype(np.float32)


def _forward(model: nn.Module, inputs: ModelInputs, batches: list[Batch], device: torch.device) -> torch.Tensor:
    """fp32 logits of `inputs`' images in `batches` (index arrays), in that order, on `device`; eval mode."""
    model.eval()
    with torch.no_grad():
        return torch.cat([model(x.to(device)).float() for x, _ in inputs.iterate(batches, 0)])


def _predict_inputs_sharded(
    model: nn.Module, inputs: ModelInputs, batch_size: int, device: torch.device, ctx: distributed.DistContext
) -> FloatArray:
    """`_predict_inputs` of an FSDP2-sharded model: every rank runs the same number of batches (its forward
    passes all-gather the parameters) over its equal share of the images (`distributed.equal_share`), and the
    logits are gathered back in order on every rank."""
    n = len(inputs)
    mine = distributed.equal_share(n, ctx.world_size, ctx.rank)
    local = _forward(model, inputs, [mine[b] for b in in_order(len(mine), batch_size)], device)
    gathered = [torch.empty_like(local) for _ in range(ctx.world_size)]
    torch.distributed.all_gather(gathered, local)
    return torch.cat(gathered)[:n].cpu().numpy().astype(np.float32)


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
        score, select_loss = 0.0, 0.0
        # rank 0 evaluates (every rank holds the same weights) and broadcasts the figures; a sharded (FSDP2) model
        # runs its forward passes on every rank (they are collectives), each rank on its share of val_select
        select_logits = None
        if loop.sharded:
            select_logits = _predict_inputs_sharded(
                loop.eval_model, select_x, recipe.eval_batch_size, loop.device, loop.dist
            )
        elif loop.dist.is_main:
            select_logits = _predict_inputs(loop.eval_model, select_x, recipe.eval_batch_size, loop.device)
        if select_logits is not None:
            select_loss = float(F.cross_entropy(torch.from_numpy(select_logits), torch.from_numpy(select.labels)))
            score = selection_metric(select_logits, select.labels, metric_name)
        score, select_loss, train_seconds = distributed.broadcast(loop.dist, (score, select_loss, train_seconds))
        min_delta = recipe.early_stopping.min_delta
        improved = loop.best_epoch == 0 or is_improvement(
            score, select_loss, loop.best_metric, loop.best_loss, min_delta
        )
        if improved:
            loop.best_epoch, loop.best_metric, loop.best_loss = epoch, score, select_loss
            loop.best_state = distributed.full_state_dict(loop.eval_model, loop.sharded)  # rank 0's is exported
        seconds = distributed.broadcast(loop.dist, time.perf_counter() - started)  # one clock: rank 0's
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
        save_checkpoint(loop, checkpoint_dir, improved)  # rank 0 writes (the others help gather a sharded model)
        if loop.dist.is_main and mirror is not None:
            mirror.push()
        distributed.barrier(loop.dist)
        eta = (elapsed / len(loop.history)) * (recipe.epochs - epoch) if not loop.stopped_early else 0.0
        log(
            f"epoch {epoch}/{recipe.epochs} loss {train_loss:.4f} val_select {metric_name} {score:.4f} "
            f"(best {loop.best_metric:.4f} @ {loop.best_epoch}) lr {loop.history[-1]['lr']:.2e} "
            f"{loop.history[-1]['images_per_second']:.0f} img/s {seconds:.1f}s ETA {eta:.0f}s"
            + (" -- early stop" if loop.stopped_early else "")
        )
        if stop_after_epoch is not None and epoch >= stop_after_epoch and loop.epoch < recipe.epochs:
            raise TrainingInterrupted(f"stopped after epoch {epoch} (stop_after_epoch hook)")


# ------------------------------------------------------------------------------- views chosen on val_select

# auto's candidates, simplest first: a tie (within one paired SE) goes to the earlier one
VIEW_CANDIDATES: tuple[str, ...] = ("global", "mean", "max", "topk_mean", "learned")
VIEWS_FOLDS = 5  # stratified folds of val_select (fewer when a class has fewer images)
VIEWS_REPEATS = 3  # cross-fitting repeats, fold seeds VIEWS_SEED + r
VIEWS_SEED = 0
VIEWS_L2 = 1.0  # penalty L2 * sum_v (theta_v - mean(theta))^2 on the weight logits: a pull toward uniform weights
VIEWS_TIE_NATS = 1e-4  # an excess this small is a tie even when its paired SE is 0 (identical candidates)
VIEWS_RULE = (
    f"{VIEWS_REPEATS} x stratified {VIEWS_FOLDS}-fold cross-fitting on val_select: each candidate's aggregated "
    "scores (aggregate_views) recalibrated on the training folds (binary: a * log-odds + b; multiclass: a * "
    "log-probabilities) and scored by the held-out log-loss; learned fits its weights with the recalibration on "
    "the training folds only; the simplest candidate (global < mean < max < topk_mean < learned) whose mean "
    f"log-loss is within one paired SE (or {VIEWS_TIE_NATS:g} nats) of the lowest wins"
)
LEARNED_RULE = (
    f"weights = softmax(theta) fitted on val_select by L-BFGS-B (mean NLL of the recalibrated weighted log-odds / "
    f"log-probabilities + {VIEWS_L2:g} * |theta - mean(theta)|^2 / n), rounded to 6 decimals"
)


@dataclass(frozen=True)
class ViewsSelection:
    """How supervised_train resolved a recipe's pending views on val_select (model.json `views_selection`)."""

    requested: str  # the recipe's aggregate: auto, or learned (weights to fit)
    chosen: str  # one of VIEW_CANDIDATES
    views: ViewsSpec | None  # the concrete views the model carries (None: the global view only)
    images: int  # val_select images
    rule: str
    candidates: dict[str, dict[str, float]] = field(default_factory=dict)  # auto: nll / excess / paired_se

    def to_dict(self) -> dict[str, object]:
        return {
            "requested": self.requested,
            "chosen": self.chosen,
            "views": None if self.views is None else self.views.to_dict(),
            "signature": "global view only" if self.views is None else self.views.signature,
            "val_select_images": self.images,
            "rule": self.rule,
            "candidates": self.candidates,
        }


def describe_views_selection(selection: ViewsSelection) -> str:
    """One log line: the winner and every candidate's val_select score."""
    scores = ", ".join(f"{name} {c['nll']:.4f}" for name, c in selection.candidates.items())
    how = f" (held-out val_select log-loss: {scores})" if scores else ""
    return f"views {selection.requested} -> {selection.chosen}: {selection.to_dict()['signature']}{how}"


def resolve_views(
    model: nn.Module,
    select: SplitData,
    preprocess: PreprocessSpec,
    choice: ViewsChoice,
    batch_size: int,
    positive_index: int,
) -> tuple[PreprocessSpec, ViewsSelection]:
    """The chosen checkpoint's per-view log-probabilities on val_select, computed once (`view_log_probs`: one
    forward pass of images x views per chunk, on the CPU like `write_logits`), then `choose_views`; returns the
    preprocessing with the resolved views (or none) and the record of the choice."""
    model.eval()

    def forward(x: torch.Tensor) -> FloatArray:
        with torch.no_grad():
            return np.asarray(model(x).float().cpu().numpy(), dtype=np.float32)

    per_view = view_log_probs(forward, select.images, replace(preprocess, views=choice.geometry), batch_size)
    selection = choose_views(per_view, select.labels, choice, positive_index)
    return replace(preprocess, views=selection.views), selection


def candidate_views(choice: ViewsChoice) -> dict[str, ViewsSpec | None]:
    """auto's fixed candidates on the recipe's grid / overlap (learned is fitted, not listed)."""
    geometry = choice.geometry
    return {
        "global": None,
        "mean": geometry,
        "max": replace(geometry, aggregate="max"),
        "topk_mean": replace(geometry, aggregate="topk_mean", k=choice.topk),
    }


def choose_views(
    per_view: npt.NDArray[np.floating],
    labels: npt.ArrayLike,
    choice: ViewsChoice,
    positive_index: int = 1,
    folds: int = VIEWS_FOLDS,
    repeats: int = VIEWS_REPEATS,
    seed: int = VIEWS_SEED,
) -> ViewsSelection:
    """Resolve a pending `ViewsChoice` from per-view log-probabilities (N, V, K) of val_select and its labels.

    ``learned``: the weights fitted on all of val_select (`fit_view_weights`). ``auto``: VIEWS_RULE over
    VIEW_CANDIDATES; when it picks learned, the weights are then fitted on all of val_select. Binary tasks
    score the positive class `positive_index`."""
    # Some 75 fits of 2-12 parameters: scipy's L-BFGS-B calls BLAS on tiny arrays, where BLAS threads only
    # contend (n=200: 17 s with 2 threads at load 9, 1.6 s with one); as in visionpipe/phases/calibration.py.
    # threadpoolctl is scikit-learn's own dependency.
    with threadpool_limits(1):
        return _choose_views(per_view, labels, choice, positive_index, folds, repeats, seed)


def _choose_views(
    per_view: npt.NDArray[np.floating],
    labels: npt.ArrayLike,
    choice: ViewsChoice,
    positive_index: int,
    folds: int,
    repeats: int,
    seed: int,
) -> ViewsSelection:
    x = np.asarray(per_view, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    if x.ndim != 3 or x.shape[0] != len(y) or x.shape[1] != choice.geometry.count:
        raise TrainError(
            f"per-view log-probabilities of shape {x.shape} do not match {len(y)} labels x "
            f"{choice.geometry.count} views ({choice.geometry.signature})"
        )
    if not choice.pending:
        raise TrainError(f"preprocess.views={choice.fixed!r} is already concrete; nothing to choose")
    if choice.aggregate == "learned":
        learned = replace(choice.geometry, aggregate="learned", weights=fit_view_weights(x, y, positive_index))
        return ViewsSelection("learned", "learned", learned, len(y), LEARNED_RULE)
    fixed = candidate_views(choice)
    binary = x.shape[2] == 2
    inputs = {
        name: _view_scores(x[:, :1] if spec is None else pool_views(x, spec, positive_index)[:, None], positive_index)
        for name, spec in fixed.items()
    }
    inputs["learned"] = _view_scores(x, positive_index)
    counts = np.bincount(y)
    n_folds = min(folds, int(counts[counts > 0].min()) if len(y) else 0)
    if n_folds < 2:
        rule = (
            f"val_select has a class with fewer than 2 of its {len(y)} images: nothing can be cross-fitted, views off"
        )
        return ViewsSelection("auto", "global", None, len(y), rule)
    held_out = {name: np.zeros((repeats, len(y))) for name in VIEW_CANDIDATES}
    for r in range(repeats):
        fold_of = _stratified_folds(y, n_folds, seed + r)
        for f in range(n_folds):
            train, test = fold_of != f, fold_of == f
            fit_target = _targets(y[train], x.shape[2], positive_index, smooth=True)
            test_target = _targets(y[test], x.shape[2], positive_index, smooth=False)
            for name in VIEW_CANDIDATES:
                learn = name == "learned"
                params = _fit_mix(inputs[name][train], fit_target, binary, learn)
                held_out[name][r, test] = _mix_nll(params, inputs[name][test], test_target, binary, learn)[0]
    candidates, chosen = _simplest_within_one_se({name: held_out[name].mean(axis=0) for name in VIEW_CANDIDATES})
    rule = VIEWS_RULE if n_folds == folds else VIEWS_RULE.replace(f"{folds}-fold", f"{n_folds}-fold")
    if chosen == "learned":
        views: ViewsSpec | None = replace(
            choice.geometry, aggregate="learned", weights=fit_view_weights(x, y, positive_index)
        )
    else:
        views = fixed[chosen]
    return ViewsSelection("auto", chosen, views, len(y), rule, candidates)


def fit_view_weights(
    per_view: npt.NDArray[np.floating], labels: npt.ArrayLike, positive_index: int = 1, l2: float = VIEWS_L2
) -> tuple[float, ...]:
    """The learned weighting: w = softmax(theta) over the V views (global first, then the tiles row by row),
    fitted on per-view log-probabilities (N, V, K) jointly with a nuisance recalibration (binary: a * m + b on
    the weighted log-odds m; multiclass: a * the weighted log-probabilities, renormalised), so the weights say
    which views inform, not how confident they are; the calibration phase refits the calibration on val_calib.
    Minimises the mean NLL + l2 * |theta - mean(theta)|^2 / N by L-BFGS-B from uniform weights (deterministic);
    returns the weights rounded to WEIGHT_DECIMALS, as the ViewsSpec stores them."""
    x = np.asarray(per_view, dtype=np.float64)
    y = np.asarray(labels, dtype=np.int64)
    binary = x.shape[2] == 2
    with threadpool_limits(1):  # see choose_views
        params = _fit_mix(
            _view_scores(x, positive_index), _targets(y, x.shape[2], positive_index, True), binary, True, l2
        )
    weights = _softmax1(params[: x.shape[1]])
    rounded = np.round(weights, WEIGHT_DECIMALS)
    return tuple(float(w) + 0.0 for w in rounded)


def _view_scores(per_view: FloatArray | npt.NDArray[np.float64], positive_index: int) -> npt.NDArray[np.float64]:
    """What the views pool: binary, the positive log-odds per view (N, V); multiclass, the log-probabilities."""
    if per_view.shape[2] == 2:
        p = positive_index
        return np.asarray(per_view[..., p] - per_view[..., 1 - p], dtype=np.float64)
    return np.asarray(per_view, dtype=np.float64)


def _targets(labels: npt.NDArray[np.int64], k_classes: int, positive_index: int, smooth: bool) -> FloatArray64:
    """Fitting targets: binary P(positive) per image (N,), multiclass class probabilities (N, K). With `smooth`,
    Platt's (1999) targets: an image of a class with n images in the fitting set targets 1 - 1 / (n + 2) on its
    class (binary: (n+ + 1) / (n+ + 2) and 1 / (n- + 2)), the rest spread over the other classes, so a fold the
    views separate perfectly still has a finite recalibration (no scale running to infinity)."""
    counts = np.bincount(labels, minlength=k_classes).astype(np.float64)
    eps = 1.0 / (counts[labels] + 2.0) if smooth else np.zeros(len(labels))
    if k_classes == 2:
        positive = labels == positive_index
        return np.where(positive, 1.0 - eps, eps)
    out = np.repeat((eps / (k_classes - 1))[:, None], k_classes, axis=1)
    out[np.arange(len(labels)), labels] = 1.0 - eps
    return out


def _stratified_folds(labels: npt.NDArray[np.int64], n_folds: int, seed: int) -> npt.NDArray[np.int64]:
    """The fold of each image: every class shuffled (seeded), then dealt round-robin across the folds."""
    rng = np.random.default_rng(seed)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == c)) for c in np.unique(labels)])
    fold_of = np.empty(len(labels), dtype=np.int64)
    fold_of[order] = np.arange(len(order)) % n_folds
    return fold_of


def _simplest_within_one_se(
    per_image: dict[str, npt.NDArray[np.float64]],
) -> tuple[dict[str, dict[str, float]], str]:
    """(per candidate: mean held-out NLL, excess over the lowest, paired SE of that excess; the winner): the
    first of VIEW_CANDIDATES whose excess is within one paired SE (or VIEWS_TIE_NATS)."""
    names = [name for name in VIEW_CANDIDATES if name in per_image]
    best = min(names, key=lambda name: float(per_image[name].mean()))
    out: dict[str, dict[str, float]] = {}
    for name in names:
        diff = per_image[name] - per_image[best]
        se = float(diff.std(ddof=1) / np.sqrt(len(diff))) if len(diff) > 1 else 0.0
        out[name] = {"nll": float(per_image[name].mean()), "excess": float(diff.mean()), "paired_se": se}
    chosen = next(n for n in names if out[n]["excess"] <= max(out[n]["paired_se"], VIEWS_TIE_NATS))
    return out, chosen


def _fit_mix(
    x: npt.NDArray[np.float64],
    target: FloatArray64,
    binary: bool,
    learn: bool,
    l2: float = VIEWS_L2,
) -> npt.NDArray[np.float64]:
    """Parameters [theta (V, learn only), a, b (binary only)] minimising the mean NLL (+ the pull of theta)."""
    from scipy.optimize import minimize

    v = x.shape[1] if learn else 0
    n = max(len(target), 1)

    def objective(params: npt.NDArray[np.float64]) -> tuple[float, npt.NDArray[np.float64]]:
        nll, grad = _mix_nll(params, x, target, binary, learn)
        loss, grad = float(nll.sum()), grad
        if learn:
            centred = params[:v] - params[:v].mean()
            loss += l2 * float(centred @ centred)
            grad[:v] += 2.0 * l2 * centred
        return loss / n, grad / n

    start = np.concatenate([np.zeros(v), [1.0], [0.0] if binary else []])
    bounds = [(None, None)] * v + [(0.0, None)] + ([(None, None)] if binary else [])
    result = minimize(objective, start, jac=True, method="L-BFGS-B", bounds=bounds)
    return np.asarray(result.x, dtype=np.float64)


def _mix_nll(
    params: npt.NDArray[np.float64],
    x: npt.NDArray[np.float64],
    target: FloatArray64,
    binary: bool,
    learn: bool,
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]:
    """(per-image NLL, gradient of their sum w.r.t. params) of the recalibrated mix of x: binary x (N, V) log-odds
    -> sigmoid(a * x @ w + b); multiclass x (N, V, K) log-probabilities -> softmax(a * sum_v w_v x_v)."""
    v = x.shape[1]
    w = _softmax1(params[:v]) if learn else np.ones(v) / v
    a = float(params[v if learn else 0])
    if binary:
        s = x @ w
        z = a * s + float(params[-1])
        nll = np.logaddexp(0.0, z) - target * z
        r = 0.5 * (1.0 + np.tanh(0.5 * z)) - target  # sigmoid(z) - y, overflow-free
        grad_w, rest = a * (x.T @ r), [float(r @ s), float(r.sum())]
    else:
        s = np.einsum("nvk,v->nk", x, w)
        z = a * s
        log_p = z - z.max(axis=1, keepdims=True)
        log_p -= np.log(np.exp(log_p).sum(axis=1, keepdims=True))
        nll = -(target * log_p).sum(axis=1)
        resid = np.exp(log_p) - target
        grad_w, rest = a * np.einsum("nvk,nk->v", x, resid), [float((resid * s).sum())]
    grad_theta = w * (grad_w - float(w @ grad_w)) if learn else np.zeros(0)
    return np.asarray(nll, dtype=np.float64), np.concatenate([grad_theta, rest])


def _softmax1(theta: npt.NDArray[np.float64]) -> npt.NDArray[np.float64]:
    e = np.exp(theta - theta.max())
    return np.asarray(e / e.sum(), dtype=np.float64)


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
    views_selection: ViewsSelection | None = None,
) -> None:
    extra = {} if views_selection is None else {"views_selection": views_selection.to_dict()}
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
            **extra,
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
