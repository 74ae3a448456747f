"""visionpipe/training/peft.py: LoRA / DoRA freeze the base, train adapters + head, and merge exactly."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from visionpipe.serving.models import VisionClassifier, build_model, transformer_blocks
from visionpipe.specs import ARCHITECTURES, ArchSpec, PeftError, PeftSpec
from visionpipe.training.peft import apply_peft, default_target_modules, merge_peft, trainable_summary

torch.set_num_threads(2)

SIZE = 16


def tiny(name: str) -> VisionClassifier:
    torch.manual_seed(0)
    spec = ArchSpec(
        name=name,
        num_classes=3,
        in_channels=1,
        image_size=SIZE,
        width=8,
        patch_size=4,
        hidden_dim=16,
        num_layers=2,
        num_heads=2,
        mlp_dim=32,
    )
    return build_model(spec)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.randn(6, 1, SIZE, SIZE, generator=g), torch.arange(6) % 3


def train_steps(model: nn.Module, steps: int = 2, lr: float = 0.05) -> None:
    x, y = batch()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        torch.autograd.backward(loss)
        opt.step()
    model.eval()


def base_param_names(model: nn.Module) -> dict[str, str]:
    """peft parameter name of each original base weight -> its name in the plain model."""
    out = {}
    for name, _ in model.named_parameters():
        if "lora_" in name or "modules_to_save" in name or "original_module" in name:
            continue
        out[name] = name.removeprefix("base_model.model.").replace(".base_layer", "")
    return out


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("name", ["vit", "dinov2", "cnn-small"])
def test_adapters_freeze_base_train_head_and_merge_exactly(name: str, method: str) -> None:
    model = tiny(name)
    original = {k: v.clone() for k, v in model.named_parameters()}
    wrapped = apply_peft(model, PeftSpec(method=method, rank=4, alpha=8.0), name)
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable, "nothing trains"
    assert all("lora_" in n or ".head." in n for n in trainable), trainable
    assert any("lora_" in n for n in trainable) and any("head" in n for n in trainable)
    if method == "dora":
        assert any("lora_magnitude" in n for n in trainable)

    train_steps(wrapped)

    params = dict(wrapped.named_parameters())
    for peft_name, plain in base_param_names(wrapped).items():
        assert not params[peft_name].requires_grad, peft_name
        # exact, except peft's MultiheadAttention adapter merges/unmerges around each forward (float rounding)
        torch.testing.assert_close(params[peft_name].detach(), original[plain].detach(), atol=1e-6, rtol=0)
    x, _ = batch()
    with torch.no_grad():
        adapted = wrapped(x)
    merged = merge_peft(wrapped).eval()
    assert type(merged) is VisionClassifier
    assert not any("lora" in n for n, _ in merged.named_parameters())
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-4)
    assert all(p.requires_grad for p in merged.parameters())


@pytest.mark.parametrize("name", ["vit", "dinov2"])
def test_extra_trainable_unfreezes_last_block(name: str) -> None:
    model = tiny(name)
    last = transformer_blocks(model)[-1]
    first = transformer_blocks(model)[0]
    wrapped = apply_peft(model, PeftSpec(method="lora", rank=2), name, extra_trainable=(last,))
    by_name = {n.removeprefix("base_model.model."): p for n, p in wrapped.named_parameters()}
    last_params = [p for n, p in by_name.items() if n.startswith(last + ".")]
    first_base = [p for n, p in by_name.items() if n.startswith(first + ".") and "lora_" not in n]
    assert last_params and all(p.requires_grad for p in last_params)
    assert first_base and not any(p.requires_grad for p in first_base)
    train_steps(wrapped)
    x, _ = batch()
    with torch.no_grad():
        adapted = wrapped(x)
    merged = merge_peft(wrapped).eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted, atol=1e-5, rtol=1e-4)


def test_vit_lora_reaches_multihead_attention() -> None:
    wrapped = apply_peft(tiny("vit"), PeftSpec(method="lora", rank=2), "vit")
    adapted = [
        n
        for n, m in wrapped.named_modules()
        if type(m).__name__ == "MultiheadAttention" and "lora" in str(type(m).__module__)
    ]
    assert len(adapted) == 2


def test_method_none_returns_model_fully_trainable() -> None:
    model = tiny("vit")
    for p in model.parameters():
        p.requires_grad_(False)
    out = apply_peft(model, PeftSpec(), "vit")
    assert out is model and all(p.requires_grad for p in model.parameters())
    assert merge_peft(out) is model


@pytest.mark.parametrize("name", ARCHITECTURES)
def test_default_targets_match_modules(name: str) -> None:
    model = tiny(name)
    names = [n for n, _ in model.named_modules()]
    for target in default_target_modules(name):
        assert any(n == target or n.endswith("." + target) for n in names), target


def test_dora_defaults_skip_multihead_attention_and_explicit_mha_is_refused() -> None:
    assert "self_attention" in default_target_modules("vit")
    assert "self_attention" not in default_target_modules("vit", "dora")
    with pytest.raises(PeftError, match="MultiheadAttention"):
        apply_peft(tiny("vit"), PeftSpec(method="dora", target_modules=("self_attention",)), "vit")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"method": "ia3"}, "none, lora, dora"),
        ({"rank": 0}, "rank=0"),
        ({"alpha": 0.0}, "alpha=0.0"),
        ({"dropout": 1.0}, "dropout=1.0"),
        ({"target_modules": ("",)}, "empty name"),
    ],
)
def test_peft_spec_validation(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(PeftError, match=match):
        PeftSpec(**kwargs)  # type: ignore[arg-type]


def test_bad_targets_and_prefixes_are_named() -> None:
    with pytest.raises(PeftError, match="match no module"):
        apply_peft(tiny("vit"), PeftSpec(method="lora", target_modules=("qkv",)), "vit")
    with pytest.raises(PeftError, match="extra_trainable"):
        apply_peft(tiny("vit"), PeftSpec(method="lora"), "vit", extra_trainable=("backbone.nope",))
    with pytest.raises(PeftError, match="arch="):
        default_target_modules("alexnet")


def test_trainable_summary_reports_fraction() -> None:
    text = trainable_summary(apply_peft(tiny("dinov2"), PeftSpec(method="lora", rank=2), "dinov2"))
    assert text.startswith("trainable ") and "%" in text
