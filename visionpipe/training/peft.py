"""Parameter-efficient fine-tuning (LoRA / DoRA via `peft`) for the model zoo in visionpipe/serving/models.py.

`apply_peft` wraps a `VisionClassifier` so that only the adapters, the head and the modules named in
`extra_trainable` train; `merge_peft` folds the adapters back into a plain `VisionClassifier` with the same
outputs, which is what bundles store (serving never needs peft).

Targets per architecture (`default_target_modules`, from the registry in visionpipe/specs/registry.py):

- ``vit`` (torchvision): every ``self_attention`` (nn.MultiheadAttention: peft adapts its packed q/k/v input
  projection and its output projection) and the MLP linears ``mlp.0`` / ``mlp.3``. peft does not support DoRA
  on nn.MultiheadAttention, so DoRA on vit defaults to the MLP linears only (and an explicit
  ``self_attention`` target with DoRA is refused with `PeftError`).
- ``dinov2`` (transformers): ``q_proj``, ``k_proj``, ``v_proj``, ``o_proj``, ``fc1``, ``fc2``.
- ``resnet18`` / ``cnn-small``: every conv / linear layer of the backbone (LoRA on convolutions); rarely
  worth it for such small models — full fine-tuning is the usual choice.
"""

from __future__ import annotations

import logging

from torch import nn

from visionpipe.serving.models import VisionClassifier

# PeftSpec is defined once, torch-free, in visionpipe.specs.peft; re-exported here so old import paths keep working.
from visionpipe.specs.peft import METHODS as METHODS
from visionpipe.specs.peft import PeftError as PeftError
from visionpipe.specs.peft import PeftSpec as PeftSpec
from visionpipe.specs.registry import ARCHITECTURES, REGISTRY

log = logging.getLogger(__name__)

HEAD = "head"
_PEFT_PREFIX = "base_model.model."

# per-architecture defaults come from the architecture registry (visionpipe/specs/registry.py)
_NO_DORA_TARGETS: dict[str, frozenset[str]] = {
    name: info.no_dora_targets for name, info in REGISTRY.items() if info.no_dora_targets
}


def default_target_modules(arch: str, method: str = "lora") -> tuple[str, ...]:
    """Module-name suffixes to adapt for `arch` (attention + MLP projections for transformers)."""
    if arch not in ARCHITECTURES:
        raise PeftError(f"arch={arch!r} is not one of {', '.join(ARCHITECTURES)}")
    return REGISTRY[arch].default_targets(method)


def apply_peft(model: VisionClassifier, spec: PeftSpec, arch: str, extra_trainable: tuple[str, ...] = ()) -> nn.Module:
    """Wrap `model` with LoRA / DoRA adapters; base weights frozen, head and `extra_trainable` trainable.

    extra_trainable: qualified-name prefixes in `model` (e.g. ``backbone.encoder.layers.encoder_layer_1``)
    whose parameters are fully unfrozen. With method ``none`` the model itself is returned with every
    parameter trainable. The result of a LoRA / DoRA wrap is a peft model; `merge_peft` turns it back into a
    VisionClassifier.
    """
    if spec.method == "none":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = spec.target_modules or default_target_modules(arch, spec.method)
    if not spec.target_modules and spec.method == "dora" and arch in _NO_DORA_TARGETS:
        log.warning(
            "DoRA cannot adapt %s in %s (peft lacks DoRA for nn.MultiheadAttention); adapting %s only",
            sorted(_NO_DORA_TARGETS[arch]),
            arch,
            list(targets),
        )
    _check_targets(model, targets, spec.method, arch)
    _check_prefixes(model, extra_trainable)
    config = LoraConfig(
        r=spec.rank,
        lora_alpha=spec.alpha,  # type: ignore[arg-type]
        lora_dropout=spec.dropout,
        target_modules=list(targets),
        modules_to_save=[HEAD],
        use_dora=spec.method == "dora",
        bias="none",
    )
    wrapped = get_peft_model(model, config)
    for name, param in wrapped.named_parameters():
        plain = name.removeprefix(_PEFT_PREFIX)
        if any(plain == p or plain.startswith(p + ".") for p in extra_trainable):
            param.requires_grad_(True)
    return wrapped


def merge_peft(model: nn.Module) -> VisionClassifier:
    """Fold adapters into the base weights: a plain VisionClassifier (all parameters trainable)."""
    if isinstance(model, VisionClassifier):
        return model
    merge = getattr(model, "merge_and_unload", None)
    if merge is None:
        raise PeftError(f"cannot merge a {type(model).__name__}: neither a peft model nor a VisionClassifier")
    merged = merge()
    if not isinstance(merged, VisionClassifier):
        raise PeftError(f"merging gave a {type(merged).__name__}, expected a VisionClassifier")
    for p in merged.parameters():
        p.requires_grad_(True)
    return merged


def trainable_summary(model: nn.Module) -> str:
    """``trainable N / total M (x%)`` for logs and summaries."""
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return f"trainable {trainable:,} / total {total:,} ({100.0 * trainable / max(total, 1):.1f}%)"


def _check_targets(model: VisionClassifier, targets: tuple[str, ...], method: str, arch: str) -> None:
    names = [n for n, _ in model.named_modules() if n]
    matched = {t: [n for n in names if n == t or n.endswith("." + t)] for t in targets}
    unmatched = sorted(t for t, hits in matched.items() if not hits)
    if unmatched:
        raise PeftError(
            f"peft.target_modules {unmatched} match no module of this {arch} model; "
            f"defaults for {arch}: {list(default_target_modules(arch, method))}"
        )
    if method == "dora":
        mha = sorted(
            n for hits in matched.values() for n in hits if isinstance(model.get_submodule(n), nn.MultiheadAttention)
        )
        if mha:
            raise PeftError(
                f"DoRA cannot adapt nn.MultiheadAttention modules {mha[:3]} (unsupported by peft); "
                "use method='lora' or target the MLP linears"
            )


def _check_prefixes(model: VisionClassifier, prefixes: tuple[str, ...]) -> None:
    names = [n for n, _ in model.named_parameters()]
    bad = sorted(p for p in prefixes if not any(n == p or n.startswith(p + ".") for n in names))
    if bad:
        raise PeftError(f"extra_trainable prefixes {bad} match no parameter of the model")
