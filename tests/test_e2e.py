"""The whole training pipeline through kfp.local on tiny settings, exporting to a real S3 server (SeaweedFS)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from visionpipe.cli import main
from visionpipe.serving import bundle as B
from visionpipe.serving import storage

TINY = ['recipe_overrides_json={"epochs": 1, "batch_size": 32}', "bootstrap=20", "model_name=e2e-digits"]


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


@pytest.mark.slow
def test_pipeline_end_to_end_exports_to_s3_and_loads_back(
    small_folder: Path, s3_bucket: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        [
            "run",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--source",
            str(small_folder),
            *_params(f"destination={s3_bucket}/models"),
        ]
    )
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
    code = main(
        [
            "run",
            "--runs-dir",
            str(tmp_path / "runs"),
            "--source",
            str(small_folder),
            *_params(f"destination={s3_bucket}/gated", "min_accuracy=0.9999", "max_ece=0.0"),
        ]
    )
    captured = capsys.readouterr()
    assert code == 1
    assert "gate_accuracy" in captured.out + captured.err
    assert not any("/gated/" in u for u in storage.list_uris(s3_bucket))
