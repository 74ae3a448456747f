"""Phase 2, domain_pretrain: ExPLoRA-style self-supervised adaptation of a backbone to the domain's images.

Objective: DINO self-distillation. A student sees 2 global + ``num_local_crops`` local crops of each image; an
EMA teacher sees the 2 global crops; the student matches the teacher's centred, sharpened distribution over
``out_dim`` prototypes (cross-entropy over every (teacher global, other student crop) pair). Centring plus
sharpening is what keeps DINO from collapsing; the collapse guard below watches that it does not.

What trains (ExPLoRA): for ``vit`` / ``dinov2`` the last ``unfreeze_last_blocks`` transformer blocks and the
final layer norm are fully unfrozen, and the other blocks get LoRA of rank ``lora_rank`` on their attention
(vit: the nn.MultiheadAttention q/k/v + output projection, peft cannot separate them; dinov2: ``q_proj`` and
``v_proj``); everything else stays frozen. ``lora_rank = 0`` trains the unfrozen blocks only. LoRA is not
applicable to ``cnn-small`` / ``resnet18``: they are fully fine-tuned (the summary says so).

Reads only the train split (purpose "fit"); its labels are never used. The teacher (EMA) weights, adapters
merged, are the result.

Outputs in ``out_dir``:
  backbone.safetensors   the backbone's state dict only (no head; load with
                         `visionpipe.serving.models.load_pretrained_backbone(model, str(out_dir))`)
  backbone.json          arch spec, preprocess spec, config, mode, per-epoch loss / feature std / entropies
  pretrain_curve.png     loss, feature std and entropies per epoch
  summary.md             the same as a table (shown in the Kubeflow UI)

Collapse guard: per epoch, ``feature_std`` is the per-dimension std across the batch of the L2-normalised
teacher backbone features, times sqrt(dim) (about 1 for spread-out features, 0 when every image maps to the
same point); ``marginal_entropy`` is the entropy of the batch-mean teacher distribution over prototypes divided
by log(out_dim) (0 when every image picks the same prototype); ``teacher_entropy`` is the mean per-image
teacher entropy / log(out_dim) (1 when the teacher is uniform for every image: DINO's other collapse, where the
loss sits at log(out_dim)). An epoch below either floor or above ``collapse_uniform_ceiling`` is "collapsed":
it is warned about, and ``collapse_patience`` consecutive collapsed epochs raise `CollapseError`
(``collapse_patience = 0`` only warns).
"""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.

import copy
import json
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Optional, TypeVar

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from kfp.dsl import Dataset, Input, Markdown, Model, Output
from torch import Tensor, nn

from visionpipe.data.datasets import load_dataset
from visionpipe.kfp.platform import component
from visionpipe.serving.models import (
    TRANSFORMERS,
    ArchSpec,
    VisionClassifier,
    build_model,
    load_pretrained_backbone,
    save_backbone,
    transformer_blocks,
)
from visionpipe.serving.preprocessing import PreprocessSpec, to_model_input
from visionpipe.training.peft import PeftSpec, apply_peft, merge_peft, trainable_summary

CURVE_FILE = "pretrain_curve.png"
SUMMARY_FILE = "summary.md"
CACHE_LIMIT_BYTES = 512 * 2**20  # preprocess the whole train split once when it fits in this much memory
Log = Callable[[str], None]
M = TypeVar("M", bound=nn.Module)


class PretrainError(ValueError):
    """A pretraining config or input is invalid."""


class CollapseError(RuntimeError):
    """The self-supervised features collapsed for `collapse_patience` consecutive epochs."""


@dataclass(frozen=True)
class PretrainConfig:
    """The SSL recipe. Crop scales are fractions of the image area; every crop is resized to the model size."""

    epochs: int = 10
    batch_size: int = 64
    lr: float = 5e-4
    weight_decay: float = 0.04
    warmup_fraction: float = 0.1
    unfreeze_last_blocks: int = 1
    lora_rank: int = 8
    lora_alpha: float = 16.0
    num_local_crops: int = 4
    global_crop_scale: tuple[float, float] = (0.4, 1.0)
    local_crop_scale: tuple[float, float] = (0.1, 0.4)
    rotation_degrees: float = 10.0
    flip_prob: float = 0.0
    teacher_momentum: float = 0.996
    out_dim: int = 1024
    head_hidden_dim: int = 256
    head_bottleneck_dim: int = 64
    teacher_temp: float = 0.04
    student_temp: float = 0.1
    center_momentum: float = 0.9
    koleo_weight: float = 0.0
    collapse_std_floor: float = 0.05
    collapse_entropy_floor: float = 0.02
    collapse_uniform_ceiling: float = 0.99
    collapse_patience: int = 2
    seed: int = 0
    max_steps: int = 0

    def __post_init__(self) -> None:
        _at_least(self, "epochs", 1)
        _at_least(self, "batch_size", 2)
        _at_least(self, "unfreeze_last_blocks", 0)
        _at_least(self, "lora_rank", 0)
        _at_least(self, "num_local_crops", 0)
        _at_least(self, "out_dim", 2)
        _at_least(self, "head_hidden_dim", 1)
        _at_least(self, "head_bottleneck_dim", 1)
        _at_least(self, "collapse_patience", 0)
        _at_least(self, "max_steps", 0)
        _in_range(self, "lr", 0.0, 1.0, low_open=True)
        _in_range(self, "weight_decay", 0.0, 1.0)
        _in_range(self, "warmup_fraction", 0.0, 1.0, high_open=True)
        _in_range(self, "lora_alpha", 0.0, math.inf, low_open=True)
        _in_range(self, "rotation_degrees", 0.0, 180.0)
        _in_range(self, "flip_prob", 0.0, 1.0)
        _in_range(self, "teacher_momentum", 0.0, 1.0)
        _in_range(self, "center_momentum", 0.0, 1.0)
        _in_range(self, "teacher_temp", 0.0, math.inf, low_open=True)
        _in_range(self, "student_temp", 0.0, math.inf, low_open=True)
        _in_range(self, "koleo_weight", 0.0, math.inf)
        _in_range(self, "collapse_std_floor", 0.0, math.inf)
        _in_range(self, "collapse_entropy_floor", 0.0, 1.0)
        _in_range(self, "collapse_uniform_ceiling", 0.0, 1.0)
        for name in ("global_crop_scale", "local_crop_scale"):
            low, high = getattr(self, name)
            if not 0.0 < low <= high <= 1.0:
                raise PretrainError(f"pretrain.{name}={(low, high)} must satisfy 0 < low <= high <= 1")
        if self.teacher_temp > self.student_temp:
            raise PretrainError(
                f"pretrain.teacher_temp={self.teacher_temp} must be <= student_temp={self.student_temp} "
                "(the teacher sharpens; a softer teacher invites uniform collapse)"
            )

    def to_dict(self) -> dict[str, object]:
        payload = asdict(self)
        payload["global_crop_scale"] = list(self.global_crop_scale)
        payload["local_crop_scale"] = list(self.local_crop_scale)
        return payload

    @classmethod
    def from_dict(cls, payload: dict[str, object]) -> "PretrainConfig":
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(payload) - set(known))
        if unknown:
            raise PretrainError(f"unknown pretrain fields {unknown}; allowed: {sorted(known)}")
        values: dict[str, object] = {}
        for key, raw in payload.items():
            default = getattr(cls, key)
            try:
                if isinstance(default, tuple):
                    assert isinstance(raw, list | tuple) and len(raw) == 2, "expected [low, high]"
                    values[key] = (float(raw[0]), float(raw[1]))
                elif isinstance(default, int):
                    assert not isinstance(raw, bool) and isinstance(raw, int | str), "expected an integer"
                    values[key] = int(raw)
                else:
                    assert not isinstance(raw, bool) and isinstance(raw, int | float | str), "expected a number"
                    values[key] = float(raw)
            except (AssertionError, ValueError) as exc:
                raise PretrainError(f"pretrain.{key}={raw!r} is invalid: {exc}") from exc
        return cls(**values)  # type: ignore[arg-type]


@dataclass
class PretrainResult:
    """What `run` wrote, and the figures the summary shows."""

    out_dir: Path
    backbone_path: Path
    mode: str
    epochs_run: int
    steps: int
    seconds: float
    images_per_second: float
    trainable: str
    history: list[dict[str, float]] = field(default_factory=list)
    collapsed_epochs: list[int] = field(default_factory=list)
    summary_markdown: str = ""


# --------------------------------------------------------------------------------------------------- core


def run(
    dataset_dir: Path,
    out_dir: Path,
    arch: ArchSpec | dict[str, object] | str,
    preprocess: PreprocessSpec | dict[str, object] | str,
    config: PretrainConfig,
    init_backbone: str = "",
    device: str | None = None,
    log: Log = print,
) -> PretrainResult:
    """Self-supervised (DINO) ExPLoRA adaptation on the train split's images; write the merged backbone."""
    arch_spec, prep = _as_arch(arch), _as_preprocess(preprocess)
    _check_compatible(arch_spec, prep)
    images = load_dataset(dataset_dir).split("train", "fit").images  # labels unused
    if len(images) < 2:
        raise PretrainError(f"the train split has {len(images)} images; SSL needs at least 2")
    torch.manual_seed(config.seed)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))

    base = build_model(arch_spec)
    if init_backbone:
        load_pretrained_backbone(base, init_backbone)
    student, mode = adapt_for_pretraining(base, arch_spec, config)
    student_head = DinoHead(base.feature_dim, config)
    student, student_head = student.to(dev), student_head.to(dev)
    teacher, teacher_head = _frozen_copy(student), _frozen_copy(student_head)
    log(f"domain_pretrain: {arch_spec.name}, {mode}; {trainable_summary(student)}; {len(images)} train images")

    history, collapsed, steps, seconds = _train(
        student, student_head, teacher, teacher_head, images, prep, config, dev, log
    )

    merged = merge_peft(teacher.cpu())
    out_dir.mkdir(parents=True, exist_ok=True)
    meta: dict[str, object] = {
        "format": "visionpipe-backbone/v1",
        "preprocess": prep.to_dict(),
        "config": config.to_dict(),
        "mode": mode,
        "history": history,
        "collapsed_epochs": collapsed,
        "objective": "dino",
    }
    path = save_backbone(merged, out_dir, extra=meta)
    seen = sum(h["images"] for h in history)
    result = PretrainResult(
        out_dir=out_dir,
        backbone_path=path,
        mode=mode,
        epochs_run=len(history),
        steps=steps,
        seconds=seconds,
        images_per_second=seen / max(seconds, 1e-9),
        trainable=trainable_summary(student),
        history=history,
        collapsed_epochs=collapsed,
    )
    plot_curve(history, out_dir / CURVE_FILE)
    result.summary_markdown = render_summary(result, arch_spec, config)
    (out_dir / SUMMARY_FILE).write_text(result.summary_markdown)
    return result


def adapt_for_pretraining(model: VisionClassifier, arch: ArchSpec, config: PretrainConfig) -> tuple[nn.Module, str]:
    """ExPLoRA for transformers (last blocks unfrozen + LoRA elsewhere); full fine-tuning for CNNs."""
    if arch.name not in TRANSFORMERS:
        return apply_peft(model, PeftSpec(method="none"), arch.name), "full fine-tuning (LoRA n/a for CNNs)"
    blocks = transformer_blocks(model)
    n_open = min(config.unfreeze_last_blocks, len(blocks))
    frozen_blocks, open_blocks = blocks[: len(blocks) - n_open], blocks[len(blocks) - n_open :]
    if not frozen_blocks:
        return apply_peft(model, PeftSpec(method="none"), arch.name), "full fine-tuning (every block unfrozen)"
    final_norm = "backbone.encoder.ln" if arch.name == "vit" else "backbone.model.layernorm"
    opened = (*open_blocks, final_norm)
    if config.lora_rank == 0:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(b + ".") for b in opened))
        return model, f"last {n_open} block(s) unfrozen, no LoRA"
    suffixes = ("self_attention",) if arch.name == "vit" else ("attention.q_proj", "attention.v_proj")
    targets = tuple(f"{b}.{s}" for b in frozen_blocks for s in suffixes)
    spec = PeftSpec(method="lora", rank=config.lora_rank, alpha=config.lora_alpha, target_modules=targets)
    wrapped = apply_peft(model, spec, arch.name, extra_trainable=opened)
    return wrapped, f"ExPLoRA: last {n_open} block(s) unfrozen, LoRA r={config.lora_rank} on {len(targets)} modules"


class DinoHead(nn.Module):
    """MLP -> L2-normalised bottleneck -> cosine similarity to L2-normalised prototypes (DINO's head)."""

    def __init__(self, in_dim: int, config: PretrainConfig) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, config.head_hidden_dim),
            nn.GELU(),
            nn.Linear(config.head_hidden_dim, config.head_bottleneck_dim),
        )
        self.prototypes = nn.Parameter(torch.randn(config.out_dim, config.head_bottleneck_dim) * 0.02)

    def forward(self, features: Tensor) -> Tensor:
        z = F.normalize(self.mlp(features), dim=-1)
        return z @ F.normalize(self.prototypes, dim=-1).T


def dino_loss(
    student_out: Tensor, teacher_out: Tensor, center: Tensor, n_global: int, student_temp: float, teacher_temp: float
) -> Tensor:
    """Cross-entropy between each teacher global view and every other student view (views stacked on dim 0)."""
    s_views = (student_out / student_temp).chunk(student_out.shape[0] // (teacher_out.shape[0] // n_global))
    t_views = F.softmax((teacher_out - center) / teacher_temp, dim=-1).chunk(n_global)
    total, pairs = student_out.new_zeros(()), 0
    for ti, t in enumerate(t_views):
        for si, s in enumerate(s_views):
            if si == ti:
                continue
            total = total + torch.sum(-t * F.log_softmax(s, dim=-1), dim=-1).mean()
            pairs += 1
    return total / pairs


def koleo_loss(features: Tensor) -> Tensor:
    """KoLeo spreading term (DINOv2): -mean log distance of each L2-normalised feature to its nearest neighbour."""
    f = F.normalize(features, dim=-1)
    dist = torch.cdist(f, f) + torch.eye(len(f), device=f.device) * 1e3
    return -torch.log(dist.min(dim=1).values + 1e-8).mean()


def make_views(x: Tensor, config: PretrainConfig, gen: torch.Generator) -> list[Tensor]:
    """2 global + num_local_crops local augmented views of a batch of model inputs (same size as x)."""
    views = [_augment(x, config.global_crop_scale, config, gen) for _ in range(2)]
    views += [_augment(x, config.local_crop_scale, config, gen) for _ in range(config.num_local_crops)]
    return views


def collapse_stats(features: Tensor, teacher_out: Tensor, center: Tensor, teacher_temp: float) -> dict[str, float]:
    """feature_std (normalised, ~1 healthy, 0 collapsed), teacher entropy and marginal entropy (/ log K)."""
    f = F.normalize(features.float(), dim=-1)
    feature_std = float(f.std(dim=0).mean() * math.sqrt(f.shape[1]))
    p = F.softmax((teacher_out - center) / teacher_temp, dim=-1)
    log_k = math.log(p.shape[1])
    per_sample = float(-(p * torch.log(p + 1e-12)).sum(dim=-1).mean()) / log_k
    mean_p = p.mean(dim=0)
    marginal = float(-(mean_p * torch.log(mean_p + 1e-12)).sum()) / log_k
    return {"feature_std": feature_std, "teacher_entropy": per_sample, "marginal_entropy": marginal}


def plot_curve(history: list[dict[str, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [h["epoch"] for h in history]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    ax1.plot(epochs, [h["loss"] for h in history], marker="o")
    ax1.set_xlabel("epoch")
    ax1.set_ylabel("DINO loss")
    for key in ("feature_std", "teacher_entropy", "marginal_entropy"):
        ax2.plot(epochs, [h[key] for h in history], marker="o", label=key)
    ax2.set_xlabel("epoch")
    ax2.set_ylim(bottom=0)
    ax2.legend()
    ax2.set_title("collapse guard")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def render_summary(result: PretrainResult, arch: ArchSpec, config: PretrainConfig) -> str:
    lines = [
        "# domain_pretrain (DINO self-distillation, ExPLoRA)",
        "",
        f"- architecture: `{arch.name}` (image {arch.image_size}, {arch.in_channels} channel(s))",
        f"- what trained: {result.mode}; {result.trainable}",
        f"- {result.epochs_run} epoch(s), {result.steps} step(s), {result.seconds:.1f} s, "
        f"{result.images_per_second:.0f} images/s; crops: 2 global + {config.num_local_crops} local",
        "- labels were not used (train split only)",
        f"- collapsed epochs: {result.collapsed_epochs or 'none'} "
        f"(floors: feature_std {config.collapse_std_floor}, marginal entropy {config.collapse_entropy_floor}; "
        f"ceiling: teacher entropy {config.collapse_uniform_ceiling})",
        "",
        "| epoch | loss | feature std | teacher entropy | marginal entropy | images/s |",
        "|---:|---:|---:|---:|---:|---:|",
    ]
    for h in result.history:
        lines.append(
            f"| {int(h['epoch'])} | {h['loss']:.4f} | {h['feature_std']:.3f} | {h['teacher_entropy']:.3f} "
            f"| {h['marginal_entropy']:.3f} | {h['images_per_second']:.0f} |"
        )
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------- internals


def _train(
    student: nn.Module,
    student_head: DinoHead,
    teacher: nn.Module,
    teacher_head: DinoHead,
    images: npt.NDArray[np.uint8],
    prep: PreprocessSpec,
    config: PretrainConfig,
    dev: torch.device,
    log: Log,
) -> tuple[list[dict[str, float]], list[int], int, float]:
    params = [p for p in (*student.parameters(), *student_head.parameters()) if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    per_epoch = max(1, len(images) // config.batch_size)
    total = per_epoch * config.epochs if config.max_steps == 0 else min(per_epoch * config.epochs, config.max_steps)
    center = torch.zeros(1, config.out_dim, device=dev)
    cache = _preprocess_all(images, prep) if images.nbytes * 4 * prep.channels <= CACHE_LIMIT_BYTES else None
    gen = torch.Generator().manual_seed(config.seed)
    history: list[dict[str, float]] = []
    collapsed: list[int] = []
    step, streak, start = 0, 0, time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        if step >= total:
            break
        t0, losses, stats, seen = time.perf_counter(), [], [], 0
        student.train()
        student_head.train()
        for idx in _batches(len(images), config.batch_size, gen):
            if step >= total:
                break
            x = cache[idx] if cache is not None else to_model_input(images[idx.numpy()], prep)
            views = [v.to(dev) for v in make_views(x, config, gen)]
            _set_lr(optimizer, config, step, total)
            with torch.no_grad():
                t_feats = _features(teacher, torch.cat(views[:2]))
                t_out = teacher_head(t_feats)
            s_feats = _features(student, torch.cat(views))
            s_out = student_head(s_feats)
            loss = dino_loss(s_out, t_out, center, 2, config.student_temp, config.teacher_temp)
            if config.koleo_weight:
                loss = loss + config.koleo_weight * koleo_loss(s_feats[: len(idx)])
            optimizer.zero_grad(set_to_none=True)
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, 3.0)
            optimizer.step()
            momentum = 1.0 - (1.0 - config.teacher_momentum) * (math.cos(math.pi * step / total) + 1) / 2
            _ema(teacher, student, momentum)
            _ema(teacher_head, student_head, momentum)
            stats.append(collapse_stats(t_feats, t_out, center, config.teacher_temp))
            center = center * config.center_momentum + t_out.mean(dim=0, keepdim=True) * (1 - config.center_momentum)
            losses.append(loss.item())
            seen += len(idx)
            step += 1
        elapsed = time.perf_counter() - t0
        row = {"epoch": float(epoch), "loss": float(np.mean(losses)), "images": float(seen), "steps": float(step)}
        row |= {k: float(np.mean([s[k] for s in stats])) for k in stats[0]}
        row["images_per_second"] = seen / max(elapsed, 1e-9)
        history.append(row)
        is_collapsed = (
            row["feature_std"] < config.collapse_std_floor
            or row["marginal_entropy"] < config.collapse_entropy_floor
            or row["teacher_entropy"] > config.collapse_uniform_ceiling
        )
        streak = streak + 1 if is_collapsed else 0
        if is_collapsed:
            collapsed.append(epoch)
        remaining = (time.perf_counter() - start) / step * (total - step)
        log(
            f"epoch {epoch}/{config.epochs} step {step}/{total} loss {row['loss']:.4f} "
            f"feature_std {row['feature_std']:.3f} teacher_entropy {row['teacher_entropy']:.3f} "
            f"marginal_entropy {row['marginal_entropy']:.3f} {row['images_per_second']:.0f} img/s "
            f"ETA {remaining:.0f}s" + ("  WARNING: features collapsed" if is_collapsed else "")
        )
        if config.collapse_patience and streak >= config.collapse_patience:
            raise CollapseError(
                f"features collapsed for {streak} consecutive epoch(s) (epochs {collapsed[-streak:]}): "
                f"feature_std {row['feature_std']:.4f} (floor {config.collapse_std_floor}), marginal entropy "
                f"{row['marginal_entropy']:.4f} (floor {config.collapse_entropy_floor}), teacher entropy "
                f"{row['teacher_entropy']:.4f} (ceiling {config.collapse_uniform_ceiling}); lower lr, raise "
                "teacher_momentum or center_momentum, or lower teacher_temp"
            )
    return history, collapsed, step, time.perf_counter() - start


def _features(model: nn.Module, x: Tensor) -> Tensor:
    get_base = getattr(model, "get_base_model", None)
    classifier = get_base() if callable(get_base) else model
    assert isinstance(classifier, VisionClassifier)
    return classifier.features(x)


def _frozen_copy(module: M) -> M:
    twin = copy.deepcopy(module)
    for p in twin.parameters():
        p.requires_grad_(False)
    return twin


@torch.no_grad()
def _ema(teacher: nn.Module, student: nn.Module, momentum: float) -> None:
    for t, s in zip(teacher.parameters(), student.parameters(), strict=True):
        if s.requires_grad:
            t.mul_(momentum).add_(s.detach(), alpha=1 - momentum)
    for tb, sb in zip(teacher.buffers(), student.buffers(), strict=True):
        tb.copy_(sb)


def _set_lr(optimizer: torch.optim.Optimizer, config: PretrainConfig, step: int, total: int) -> None:
    warmup = int(config.warmup_fraction * total)
    if step < warmup:
        lr = config.lr * (step + 1) / warmup
    else:
        progress = (step - warmup) / max(1, total - warmup)
        lr = config.lr * (0.5 * (1 + math.cos(math.pi * progress)))
    for group in optimizer.param_groups:
        group["lr"] = lr


def _batches(n: int, batch_size: int, gen: torch.Generator) -> Iterator[Tensor]:
    order = torch.randperm(n, generator=gen)
    for start in range(0, n - batch_size + 1, batch_size):
        yield order[start : start + batch_size]
    if n < batch_size:
        yield order


def _preprocess_all(images: npt.NDArray[np.uint8], prep: PreprocessSpec) -> Tensor:
    return torch.cat([to_model_input(images[i : i + 1024], prep) for i in range(0, len(images), 1024)])


def _augment(x: Tensor, scale: tuple[float, float], config: PretrainConfig, gen: torch.Generator) -> Tensor:
    """Random resized crop + rotation (+ flip) by one batched affine resample, then brightness / contrast."""
    n = x.shape[0]
    area = torch.empty(n).uniform_(scale[0], scale[1], generator=gen)
    log_ratio = torch.empty(n).uniform_(math.log(3 / 4), math.log(4 / 3), generator=gen)
    sx = torch.sqrt(area * torch.exp(log_ratio)).clamp(max=1.0)
    sy = torch.sqrt(area / torch.exp(log_ratio)).clamp(max=1.0)
    tx = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sx)
    ty = (torch.rand(n, generator=gen) * 2 - 1) * (1 - sy)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(config.rotation_degrees)
    flip = torch.where(torch.rand(n, generator=gen) < config.flip_prob, -1.0, 1.0)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack(
        [torch.stack([sx * cos * flip, -sy * sin, tx], dim=1), torch.stack([sx * sin * flip, sy * cos, ty], dim=1)],
        dim=1,
    )
    grid = F.affine_grid(theta.to(x.dtype), list(x.shape), align_corners=False)
    out = F.grid_sample(x, grid.to(x.device), mode="bilinear", padding_mode="border", align_corners=False)
    contrast = torch.empty(n, 1, 1, 1).uniform_(0.7, 1.3, generator=gen).to(x.device)
    brightness = torch.empty(n, 1, 1, 1).uniform_(-0.3, 0.3, generator=gen).to(x.device)
    mean = out.mean(dim=(1, 2, 3), keepdim=True)
    return (out - mean) * contrast + mean + brightness


def _as_arch(arch: ArchSpec | dict[str, object] | str) -> ArchSpec:
    if isinstance(arch, ArchSpec):
        return arch
    return ArchSpec.from_json(arch) if isinstance(arch, str) else ArchSpec.from_dict(arch)


def _as_preprocess(prep: PreprocessSpec | dict[str, object] | str) -> PreprocessSpec:
    if isinstance(prep, PreprocessSpec):
        return prep
    payload = json.loads(prep) if isinstance(prep, str) else prep
    if not isinstance(payload, dict):
        raise PretrainError(f"preprocess must be a JSON object, got {type(payload).__name__}")
    return PreprocessSpec.from_dict(payload)


def _check_compatible(arch: ArchSpec, prep: PreprocessSpec) -> None:
    if arch.in_channels != prep.channels or arch.image_size != prep.size:
        raise PretrainError(
            f"arch (in_channels={arch.in_channels}, image_size={arch.image_size}) does not match preprocess "
            f"(channels={prep.channels}, size={prep.size})"
        )


def _at_least(config: PretrainConfig, name: str, low: int) -> None:
    value = getattr(config, name)
    if value < low:
        raise PretrainError(f"pretrain.{name}={value} must be >= {low}")


def _in_range(
    config: PretrainConfig, name: str, low: float, high: float, low_open: bool = False, high_open: bool = False
) -> None:
    value = getattr(config, name)
    ok = (value > low if low_open else value >= low) and (value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise PretrainError(f"pretrain.{name}={value} must be in {interval}")


# ------------------------------------------------------------------------------------------ component


@component
def domain_pretrain(
    dataset: Input[Dataset],
    backbone: Output[Model],
    summary: Output[Markdown],
    arch_json: str,
    preprocess_json: str,
    epochs: int = 10,
    batch_size: int = 64,
    lr: float = 5e-4,
    unfreeze_last_blocks: int = 1,
    lora_rank: int = 8,
    num_local_crops: int = 4,
    max_steps: int = 0,
    seed: int = 0,
    config_overrides_json: str = "{}",
    init_backbone: Optional[Input[Model]] = None,  # noqa: UP045 (kfp needs Optional[...] for optional artifacts)
) -> None:
    """Self-supervised (DINO, EMA teacher, multi-crop) ExPLoRA adaptation of a backbone on the Dataset's
    train images (labels unused): last blocks unfrozen, LoRA on the other blocks' attention, merged. Writes
    backbone.safetensors + backbone.json (load with visionpipe.serving.models.load_pretrained_backbone), a curve and a
    summary; fails if the features collapse."""
    import json
    from pathlib import Path

    from visionpipe.phases.domain_pretrain import PretrainConfig, run

    settings: dict[str, object] = {
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "unfreeze_last_blocks": unfreeze_last_blocks,
        "lora_rank": lora_rank,
        "num_local_crops": num_local_crops,
        "max_steps": max_steps,
        "seed": seed,
    }
    settings.update(json.loads(config_overrides_json))
    result = run(
        Path(dataset.path),
        Path(backbone.path),
        arch_json,
        preprocess_json,
        PretrainConfig.from_dict(settings),
        init_backbone=init_backbone.path if init_backbone is not None else "",
    )
    backbone.metadata.update({"mode": result.mode, "epochs": result.epochs_run, "final": result.history[-1]})
    Path(summary.path).write_text(result.summary_markdown)
    print(result.summary_markdown)
