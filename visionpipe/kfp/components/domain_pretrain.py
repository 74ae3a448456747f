"""The KFP component of phase 2, domain_pretrain (thin: its body imports and calls
visionpipe.phases.domain_pretrain.run, or visionpipe.training.passthrough.run_disabled when enabled is false)."""

# No `from __future__ import annotations` here: KFP reads the component signature at import time.
from typing import Optional

from kfp.dsl import Dataset, Input, Markdown, Model, Output

from visionpipe.kfp.platform import component


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
    enabled: bool = True,
) -> None:
    """Self-supervised (DINO, EMA teacher, multi-crop) ExPLoRA adaptation of a backbone on the Dataset's
    train images (labels unused): last blocks unfrozen, LoRA on the other blocks' attention, merged. Writes
    backbone.safetensors + backbone.json (load with visionpipe.serving.models.load_pretrained_backbone), a curve and a
    summary; fails if the features collapse. With enabled=false it trains nothing: the backbone output holds
    only the pass-through marker (backbone.json = {"passthrough": true}), which supervised_train treats as no
    backbone, and the summary says so in one line."""
    import json
    from pathlib import Path

    if not enabled:  # torch-free: the disabled step only writes the pass-through marker
        from visionpipe.training.passthrough import run_disabled

        line = run_disabled(Path(backbone.path))
        backbone.metadata.update({"passthrough": True})
        Path(summary.path).write_text(line)
        print(line, end="")
        return

    from visionpipe.phases.domain_pretrain import run
    from visionpipe.training.pretrain_config import PretrainConfig

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
