"""domain_pretrain starts efficientnet-lite from its ImageNet weights (the registry's ``pretrained``, through the
same `default_backbone` supervised_train uses) unless a backbone is given, which wins."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from visionpipe.phases.data_fetch import write_dataset_from_arrays
from visionpipe.phases.domain_pretrain import run
from visionpipe.serving.models import BACKBONE_FILE, build_model, save_backbone
from visionpipe.specs import ArchSpec, PreprocessSpec
from visionpipe.training import pretrained as P
from visionpipe.training.pretrain_config import PretrainConfig

torch.set_num_threads(1)  # tiny tensors: one thread is fastest, and other work shares the machine

SIZE = 32  # the convolutional backbone takes any side; small keeps the step cheap
LITE0 = ArchSpec("efficientnet-lite0", 2, 3, SIZE)
PREP = PreprocessSpec(channels=3, size=SIZE, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))
# One optimizer step at a negligible learning rate: the teacher (the result) stays at the starting weights up to
# the EMA's (1 - momentum) share of a ~1e-9 move, so the starting weights can be read back from the output.
ONE_STEP = PretrainConfig(
    epochs=1,
    max_steps=1,
    batch_size=4,
    num_local_crops=0,
    out_dim=16,
    head_hidden_dim=16,
    head_bottleneck_dim=8,
    lr=1e-9,
    collapse_patience=0,
)
KEYS = ("stem.weight", "blocks.15._expand_conv.weight", "top.weight")


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(40, SIZE, SIZE, 3), dtype=np.uint8)
    labels = (np.arange(40) % 2).astype(np.int64)
    out = tmp_path_factory.mktemp("ds")
    write_dataset_from_arrays(out, images, labels, ["a", "b"], [f"img{i}" for i in range(40)])
    return out


def _output(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(str(folder / BACKBONE_FILE))


def test_efficientnet_lite_starts_from_imagenet(pretrained_cache: Path, dataset_dir: Path, tmp_path: Path) -> None:
    lines: list[str] = []
    run(dataset_dir, tmp_path, LITE0, PREP, ONE_STEP, log=lines.append)
    imagenet = load_file(str(P.imagenet_backbone(LITE0) / BACKBONE_FILE))
    out = _output(tmp_path)
    torch.manual_seed(0)
    random_init = build_model(LITE0).backbone.state_dict()
    for key in KEYS:
        torch.testing.assert_close(out[key], imagenet[key], rtol=0, atol=1e-6)
        assert not torch.allclose(out[key], random_init[key], atol=1e-3), key  # would fail from a random init
    assert json.loads((tmp_path / "backbone.json").read_text())["init"].startswith("imagenet weights")
    assert "efficientnet-lite0 from imagenet weights" in lines[0]


def test_a_given_backbone_wins(pretrained_cache: Path, dataset_dir: Path, tmp_path: Path) -> None:
    torch.manual_seed(7)
    mine = build_model(LITE0)
    save_backbone(mine, tmp_path / "mine")
    run(dataset_dir, tmp_path / "out", LITE0, PREP, ONE_STEP, init_backbone=str(tmp_path / "mine"), log=print)
    out, own = _output(tmp_path / "out"), mine.backbone.state_dict()
    for key in KEYS:
        torch.testing.assert_close(out[key], own[key], rtol=0, atol=1e-6)
    meta = json.loads((tmp_path / "out" / "backbone.json").read_text())
    assert meta["init"] == f"the given backbone {tmp_path / 'mine'}"
