"""visionpipe.training: the library both training phases share (schedule, EMA, batching, augmentation,
validation, pass-through backbones)."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from visionpipe.training import batching
from visionpipe.training.augment import affine_grid, random_resized_crop
from visionpipe.training.ema import ema_update, frozen_copy, warmup_decay
from visionpipe.training.passthrough import is_passthrough, write_passthrough
from visionpipe.training.schedule import cosine_ramp, lr_factor
from visionpipe.training.validate import Limit, at_least, check_limits, check_ordered_pair


def test_one_warmup_formula_rises_to_the_peak_then_decays() -> None:
    # (step + 1) / (warmup + 1) during warmup: strictly below the peak, the first step after it at the peak
    assert [lr_factor(s, 20, 4, "cosine", 0.0) for s in range(4)] == [0.2, 0.4, 0.6, 0.8]
    assert lr_factor(4, 20, 4, "cosine", 0.0) == 1.0
    assert lr_factor(20, 20, 4, "cosine", 0.0) == pytest.approx(0.0)
    assert lr_factor(0, 10, 0, "cosine", 0.1) == 1.0  # no warmup
    assert lr_factor(7, 10, 2, "constant", 0.1) == 1.0


def test_cosine_ramp_goes_from_start_to_end() -> None:
    assert cosine_ramp(0.996, 1.0, 0, 100) == pytest.approx(0.996)
    assert cosine_ramp(0.996, 1.0, 50, 100) == pytest.approx(0.998)
    assert cosine_ramp(0.996, 1.0, 100, 100) == pytest.approx(1.0)


def test_ema_averages_parameters_and_copies_or_averages_buffers() -> None:
    model = nn.BatchNorm1d(3)
    ema = frozen_copy(model)
    assert not any(p.requires_grad for p in ema.parameters())
    with torch.no_grad():
        model.weight.fill_(3.0)
        model.running_mean.fill_(2.0)
    ema_update(ema, model, 0.5)
    torch.testing.assert_close(ema.weight, torch.full((3,), 2.0))  # 0.5 * 1 + 0.5 * 3
    torch.testing.assert_close(ema.running_mean, torch.full((3,), 1.0))  # averaged too
    assert int(ema.num_batches_tracked) == int(model.num_batches_tracked)  # integers are copied
    teacher = frozen_copy(nn.BatchNorm1d(3))
    ema_update(teacher, model, 0.5, average_buffers=False)
    torch.testing.assert_close(teacher.running_mean, torch.full((3,), 2.0))  # buffers copied
    assert warmup_decay(0.999, 0) == pytest.approx(0.1) and warmup_decay(0.9, 10_000) == 0.9


def test_batches_drop_a_small_last_batch_unless_it_is_the_only_one() -> None:
    order = np.arange(10, dtype=np.int64)
    assert [len(b) for b in batching.batches(order, 4)] == [4, 4, 2]  # 2 >= max(2, 4 // 2)
    assert [len(b) for b in batching.batches(order, 8)] == [8]  # 2 < 4: dropped
    assert [len(b) for b in batching.batches(order, 4, min_last=4)] == [4, 4]  # full batches only
    assert [len(b) for b in batching.batches(order[:3], 4, min_last=4)] == [3]  # the only batch stays
    assert batching.num_batches(10, 4) == 3
    assert [b.tolist() for b in batching.in_order(5, 2)] == [[0, 1], [2, 3], [4]]


def test_affine_grid_is_the_identity_without_a_transform() -> None:
    shape = torch.Size((2, 1, 5, 7))
    zero, one = torch.zeros(2), torch.ones(2)
    identity = torch.nn.functional.affine_grid(
        torch.tensor([[1.0, 0, 0], [0, 1.0, 0]]).expand(2, 2, 3), list(shape), align_corners=False
    )
    torch.testing.assert_close(affine_grid(shape, zero, one, one, zero, zero), identity)
    flipped = affine_grid(shape, zero, -one, one, zero, zero)
    torch.testing.assert_close(flipped, identity.flip(2) * torch.tensor([1.0, 1.0]), rtol=0, atol=1e-6)


def test_random_resized_crops_are_seeded_and_keep_the_shape() -> None:
    x = torch.randn(3, 1, 8, 8)
    a = random_resized_crop(x, (0.2, 0.5), 10.0, 0.5, torch.Generator().manual_seed(4))
    b = random_resized_crop(x, (0.2, 0.5), 10.0, 0.5, torch.Generator().manual_seed(4))
    assert a.shape == x.shape and torch.equal(a, b) and not torch.equal(a, x)


def test_limits_name_the_field_the_value_and_the_interval() -> None:
    limits = {"epochs": at_least(1), "lr": Limit(0.0, 1.0, low_open=True), "p": Limit(0.0, 1.0, high_open=True)}
    check_limits("cfg.", {"epochs": 1, "lr": 1.0, "p": 0.0}, limits, ValueError)
    with pytest.raises(ValueError, match=r"^cfg.epochs=0 must be >= 1$"):
        check_limits("cfg.", {"epochs": 0, "lr": 0.5, "p": 0.5}, limits, ValueError)
    with pytest.raises(ValueError, match=r"^cfg.lr=0.0 must be in \(0.0, 1.0\]$"):
        check_limits("cfg.", {"epochs": 1, "lr": 0.0, "p": 0.5}, limits, ValueError)
    with pytest.raises(ValueError, match=r"^cfg.p=1.0 must be in \[0.0, 1.0\)$"):
        check_limits("cfg.", {"epochs": 1, "lr": 0.5, "p": 1.0}, limits, ValueError)
    with pytest.raises(ValueError, match=r"cfg.scale=\(0.5, 0.1\) must satisfy 0 < low <= high <= 1"):
        check_ordered_pair("cfg.scale", (0.5, 0.1), 0.0, 1.0, ValueError)
    assert Limit(0.0, math.inf).describe() == ">= 0"


def test_pass_through_marker(tmp_path: Path) -> None:
    assert not is_passthrough(None) and not is_passthrough(tmp_path)
    path = write_passthrough(tmp_path / "backbone")
    assert json.loads(path.read_text()) == {"passthrough": True} and is_passthrough(tmp_path / "backbone")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "backbone.json").write_text(json.dumps({"format": "visionpipe-backbone/v1"}))
    assert not is_passthrough(tmp_path / "other")  # a real backbone's metadata
    (tmp_path / "other" / "backbone.json").write_text("{broken")
    assert not is_passthrough(tmp_path / "other")


def test_supervised_train_treats_a_pass_through_backbone_as_none(tmp_path: Path) -> None:
    from safetensors.torch import load_file
    from test_supervised_train import make_dataset, quiet, tiny_recipe

    from visionpipe.phases import supervised_train as st

    dataset = make_dataset(tmp_path, per_class=12)
    recipe = tiny_recipe(epochs=1)
    write_passthrough(tmp_path / "backbone")
    for name, backbone in (("plain", None), ("passthrough", tmp_path / "backbone")):
        out = tmp_path / name
        st.run(dataset, out / "model", out / "logits", recipe, out / "ckpt", backbone_dir=backbone, log=quiet)
    a, b = (load_file(str(tmp_path / d / "model" / "model.safetensors")) for d in ("plain", "passthrough"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_disabled_domain_pretrain_step_imports_no_torch(tmp_path: Path) -> None:
    """The disabled step only writes the marker, without paying for a torch import in its pod."""
    import subprocess
    import sys

    code = (
        "import sys; from pathlib import Path;"
        " from visionpipe.training.passthrough import run_disabled, is_passthrough;"
        f" out = Path({str(tmp_path / 'backbone')!r}); print(run_disabled(out), end='');"
        " assert is_passthrough(out); assert 'torch' not in sys.modules, 'torch was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    assert "disabled" in done.stdout
