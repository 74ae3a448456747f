"""The whole training pipeline through kfp.local on tiny settings, exporting to a real S3 server (SeaweedFS)."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from visionpipe.cli import main
from visionpipe.serving import bundle as B
from visionpipe.serving import storage

OVERRIDES = {"epochs": 1, "batch_size": 32}
TINY = [f"recipe_overrides_json={json.dumps(OVERRIDES)}", "bootstrap=20", "model_name=e2e-digits"]


@pytest.fixture(scope="module")
def small_folder(mnist_train_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """120 real MNIST digits of three classes as an image folder <class>/<file>.png."""
    root = tmp_path_factory.mktemp("mnist-small")
    for digit in ("0", "1", "7"):
        (root / digit).mkdir()
        for png in sorted((mnist_train_dir / digit).glob("*.png"))[:40]:
            shutil.copy(png, root / digit / png.name)
    return root


def _params(*extra: str) -> list[str]:
    out = []
    for p in [*TINY, *extra]:
        out += ["-p", p]
    return out


def _run(source: Path, runs_dir: Path, *extra: str) -> int:
    """`visionpipe run` (kfp.local) of the TINY training pipeline on `source`, with `extra` -p parameters."""
    return main(["run", "--runs-dir", str(runs_dir), "--source", str(source), *_params(*extra)])


@pytest.mark.slow
def test_pipeline_end_to_end_exports_to_s3_and_loads_back(
    small_folder: Path, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(small_folder, tmp_path / "runs", f"destination={s3_bucket}/models")
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "Bundle validation: PASSED" in out
    published = [u for u in storage.list_uris(f"{s3_bucket}/models") if u.endswith("/bundle.json")]
    assert len(published) == 1 and "/models/e2e-digits/" in published[0]
    # the pipeline's output `bundle_uri` (what `visionpipe run` prints) is export's storage URI of that one bundle
    printed = [line.removeprefix("Bundle: ") for line in out.splitlines() if line.startswith("Bundle: ")]
    assert printed == [published[0].rsplit("/", 1)[0] + "/"], printed
    bundle = B.read_bundle(published[0].rsplit("/", 1)[0], cache_dir=tmp_path)
    assert bundle.classes == ("0", "1", "7")
    provenance = bundle.manifest["provenance"]
    assert isinstance(provenance, dict) and provenance["data_source"] == str(small_folder)
    prediction = B.BundleModel(bundle).predict_images(__import__("numpy").zeros((2, 28, 28, 1), dtype="uint8"))
    assert prediction.calibrated_probs.shape == (2, 3)


@pytest.mark.slow
@pytest.mark.long  # `make test-long` (run by .ci/run): keeps `make test` within its 15 minutes
def test_failed_quality_gate_stops_the_pipeline_before_export(
    small_folder: Path, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = _run(small_folder, tmp_path / "runs", f"destination={s3_bucket}/gated", "min_accuracy=0.9999", "max_ece=0.0")
    captured = capsys.readouterr()
    assert code == 1
    assert "gate_accuracy" in captured.out + captured.err
    assert not any("/gated/" in u for u in storage.list_uris(s3_bucket))


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _tensor_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    from safetensors.numpy import load_file

    return {name: (str(t.dtype), t.shape) for name, t in load_file(path).items()}


def _npz_layout(path: Path) -> dict[str, tuple[str, tuple[int, ...]]]:
    with np.load(path) as z:
        return {name: (str(z[name].dtype), z[name].shape) for name in z.files}


@pytest.mark.slow
@pytest.mark.long  # `make test-long`: a whole pipeline run with 2 torchrun workers (~2.5 min here)
def test_two_train_workers_under_kfp_local_keep_the_one_process_step_outputs(
    small_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """train_workers=2 under kfp.local: supervised_train runs 2 local torchrun ranks (gloo) and its outputs are
    those of a one-process run: a plain supervised_train of the same recipe on the step's own Dataset writes the
    same files, model.json keys and recipe, tensors and logits layout (docs/distributed.md)."""
    from visionpipe.phases import supervised_train as st
    from visionpipe.training.recipes import load_recipe

    code = _run(small_folder, tmp_path / "runs", f"destination={tmp_path / 'bundles'}", "train_workers=2")
    out = capsys.readouterr().out
    assert code == 0, out[-3000:]
    assert "Bundle validation: PASSED" in out
    run_dir = Path(next(line for line in out.splitlines() if line.startswith("Artifacts: ")).split()[1])
    step = run_dir / "supervised-train"
    # trained by 2 workers: scale_out launched them, and rank 0 of the training loop saw a world of 2 over gloo
    log = (run_dir / "logs" / "supervised-train.log").read_text()
    assert "supervised_train: 2 local workers (torchrun" in log, log[-3000:]
    assert re.search(r" on cpu x 2 workers \(gloo[,)]", log), log[-3000:]  # supervised_train's first line
    assert (step / "model-checkpoint" / "state.json").is_file(), "the workers checkpoint into the step's folder"

    # the step's outputs: the documented layout (model/, logits/, the curve page, the metrics)
    assert _files(step / "model") == {"model.json", "model.safetensors"}
    assert _files(step / "logits") == {"val_calib.npz", "val_test.npz", "meta.json"}
    assert "data:image/png;base64," in (step / "curve").read_text()
    artifacts = json.loads((step / "executor_output.json").read_text())["artifacts"]
    metrics = artifacts["metrics"]["artifacts"][0]["metadata"]
    model_meta = artifacts["model"]["artifacts"][0]["metadata"]
    assert metrics["epochs_run"] == OVERRIDES["epochs"] and 0 < metrics["val_select_accuracy"] <= 1
    assert {"val_calib_accuracy", "val_test_accuracy", "train_seconds", "best_epoch"} <= metrics.keys()

    # ... and a one-process supervised_train of the same recipe on the same Dataset writes the same layout
    plain = tmp_path / "plain"
    recipe = load_recipe(str(model_meta["recipe"]), OVERRIDES)
    dataset = run_dir / "data-fetch" / "dataset"
    result = st.run(dataset, plain / "model", plain / "logits", recipe, plain / "ckpt", log=lambda _msg: None)
    assert _files(step / "model") == _files(plain / "model") and _files(step / "logits") == _files(plain / "logits")
    two, one = (json.loads((d / "model" / "model.json").read_text()) for d in (step, plain))
    assert two.keys() == one.keys()
    trajectory = {"history", "best_epoch", "best_val_select_metric"}  # the only keys training itself decides
    assert {k: v for k, v in two.items() if k not in trajectory} == {
        k: v for k, v in one.items() if k not in trajectory
    }, "the same recipe (hash), architecture, preprocessing, classes and split fingerprints"
    assert len(two["history"]) == len(one["history"]) == result.epochs_run == metrics["epochs_run"]
    assert [sorted(h) for h in two["history"]] == [sorted(h) for h in one["history"]]
    assert _tensor_layout(step / "model" / "model.safetensors") == _tensor_layout(plain / "model" / "model.safetensors")
    for split in ("val_calib", "val_test"):
        layout = _npz_layout(step / "logits" / f"{split}.npz")
        assert layout == _npz_layout(plain / "logits" / f"{split}.npz")
        assert layout["logits"][0] == "float32" and layout["logits"][1][1] == len(two["classes"])
        with np.load(step / "logits" / f"{split}.npz") as a, np.load(plain / "logits" / f"{split}.npz") as b:
            assert np.array_equal(a["labels"], b["labels"]), "the same images in the same order"
    assert (step / "logits" / "meta.json").read_text() == (plain / "logits" / "meta.json").read_text()
