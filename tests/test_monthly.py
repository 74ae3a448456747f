"""Monthly retrain: month resolution, data + hard examples, warm start from the champion, the champion gate
(end to end through kfp.local), and the canary patch."""

from __future__ import annotations

import datetime as dt
import io
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from visionpipe.kfp.local import run_pipeline
from visionpipe.kfp.monthly import monthly_retrain_pipeline
from visionpipe.phases.monthly import (
    MonthlyError,
    canary_patch,
    champion_backbone,
    deployment_mode,
    gather_month,
    resolve_month,
    start_canary_patch,
)
from visionpipe.serving import bundle as B
from visionpipe.serving import storage
from visionpipe.serving.models import build_model, load_pretrained_backbone

MONTH = "2026-10"


@pytest.mark.parametrize(
    ("given", "today", "expected"),
    [("", dt.date(2026, 11, 1), "2026-10"), ("", dt.date(2026, 1, 15), "2025-12"), ("2026-03", None, "2026-03")],
)
def test_resolve_month(given: str, today: dt.date | None, expected: str) -> None:
    assert resolve_month(given, today) == expected


@pytest.mark.parametrize("bad", ["2026-13", "10-2026", "last month"])
def test_bad_month_is_refused(bad: str) -> None:
    with pytest.raises(MonthlyError, match="must look like 2026-10"):
        resolve_month(bad)


CANDIDATE = "s3://visionpipe/bundles/digits/20270105-093000-cd34ef56"
MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"


def _manifest(relative: str) -> dict[str, object]:
    loaded = yaml.safe_load((MANIFESTS / relative).read_text())
    assert isinstance(loaded, dict)
    return loaded


def test_canary_patch_body() -> None:
    patch = canary_patch("s3://models/digits/v2", 10)
    assert patch == {
        "spec": {"predictor": {"canaryTrafficPercent": 10, "model": {"storageUri": "s3://models/digits/v2"}}}
    }
    assert canary_patch("s3://models/digits/v2", 10, "Serverless") == patch  # the legacy name of Knative
    with pytest.raises(MonthlyError, match=r"1\.\.100"):
        canary_patch("s3://x", 0)
    with pytest.raises(MonthlyError, match="ModelMesh"):
        canary_patch("s3://x", 10, "ModelMesh")


@pytest.mark.parametrize(("kserve_mode", "cli_mode"), [("Knative", "serverless"), ("Standard", "standard")])
def test_canary_patch_equals_the_cli_patch(kserve_mode: str, cli_mode: str) -> None:
    """The monthly step and `visionpipe canary start` write the same patch for the same mode."""
    from visionpipe.rollout.canary import start_patch

    assert canary_patch(CANDIDATE, 10, kserve_mode) == start_patch(cli_mode, CANDIDATE, 10)
    if kserve_mode == "Standard":
        assert canary_patch(CANDIDATE, 10, "RawDeployment") == start_patch(cli_mode, CANDIDATE, 10)


def test_deployment_mode_of_a_live_service() -> None:
    isvc = _manifest("standard/inference-service.yaml")
    assert deployment_mode(isvc) == "Standard"
    assert deployment_mode({**isvc, "status": {"deploymentMode": "Serverless"}}) == "Knative"  # status wins
    with pytest.raises(MonthlyError, match="deployment mode"):
        deployment_mode({"metadata": {"name": "digits"}})


class FakeCluster:
    """The CustomObjectsApi calls start_canary_patch makes, against one InferenceService: GET returns it, PATCH
    applies the RFC 7386 merge patch and admits the result as the API server + KServe would."""

    def __init__(self, live: dict[str, object]) -> None:
        self.live = live
        self.calls: list[tuple[str, ...]] = []

    def get_namespaced_custom_object(self, group: str, version: str, ns: str, plural: str, name: str) -> object:
        self.calls.append(("get", group, version, ns, plural, name))
        return self.live

    def patch_namespaced_custom_object(
        self, group: str, version: str, ns: str, plural: str, name: str, body: object
    ) -> object:
        from k8s_schema import merge_patch
        from kserve_rules import admit

        self.calls.append(("patch", group, version, ns, plural, name))
        new = merge_patch(self.live, body)
        assert isinstance(new, dict)
        admission = admit(new, self.live, objects=[_manifest("common/serving-runtime.yaml")])
        assert admission.ok, admission.result.describe()
        self.live = admission.obj
        return self.live


@pytest.mark.parametrize("base", ["base", "standard"])
def test_start_canary_patch_reads_the_mode_and_the_platform_accepts_the_patch(
    base: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from k8s_schema import PLATFORM
    from kubernetes import client, config

    if not PLATFORM.is_dir():
        pytest.skip(f"platform CRDs not found at {PLATFORM}")
    cluster = FakeCluster(_manifest(f"{base}/inference-service.yaml"))
    monkeypatch.setattr(config, "load_incluster_config", lambda: None)
    monkeypatch.setattr(client, "CustomObjectsApi", lambda: cluster)
    result = start_canary_patch("digits", "kubeflow-user", CANDIDATE, 10)
    assert [c[0] for c in cluster.calls] == ["get", "patch"]
    assert cluster.calls[1][1:] == ("serving.kserve.io", "v1beta1", "kubeflow-user", "inferenceservices", "digits")
    spec = result["spec"]
    assert isinstance(spec, dict)
    if base == "standard":
        (entry,) = spec["canary"]
        assert entry["predictor"]["model"]["storageUri"] == CANDIDATE and entry["trafficPercent"] == 10
        assert spec["predictor"]["model"]["storageUri"] != CANDIDATE, "the stable bundle keeps 90 %"
    else:
        assert spec["predictor"]["canaryTrafficPercent"] == 10
        assert spec["predictor"]["model"]["storageUri"] == CANDIDATE


def _png(img: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img[..., 0]).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def month_prefix(trained: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A month of new digits (from the champion's Dataset train split) + labelled hard examples, on disk."""
    from visionpipe.data.datasets import load_dataset

    ds = load_dataset(trained / "ds")
    train = ds.split("train", "fit")
    root = tmp_path_factory.mktemp("monthly")
    for k, name in enumerate(ds.classes):
        idx = np.flatnonzero(train.labels == k)[:14]
        for j, i in enumerate(idx[:12]):
            path = root / "data" / MONTH / name / f"{j:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(_png(train.images[i]))
        for j, i in enumerate(idx[12:]):
            hard = root / "hard" / MONTH / "labelled" / name / f"h{j}.png"
            hard.parent.mkdir(parents=True, exist_ok=True)
            hard.write_bytes(_png(train.images[i]))
    return root


def test_gather_month_takes_new_data_and_labelled_hard_examples(month_prefix: Path, tmp_path: Path) -> None:
    month = gather_month(str(month_prefix / "data"), MONTH, str(month_prefix / "hard"), tmp_path / "images")
    assert month.month == MONTH
    assert sum(month.new_images.values()) == 120 and sum(month.hard_examples.values()) == 20
    assert len(list((tmp_path / "images").rglob("*.png"))) == 140
    with pytest.raises(MonthlyError, match="no data for 2026-09"):
        gather_month(str(month_prefix / "data"), "2026-09", "", tmp_path / "none")


def test_champion_backbone_is_a_warm_start(candidate: Path, tmp_path: Path) -> None:
    info = champion_backbone(str(candidate), tmp_path / "warm")
    champion = B.read_bundle(candidate)
    assert info == {"parent_bundle": str(candidate), "parent_version": champion.version}
    fresh = build_model(champion.members[0].arch)
    load_pretrained_backbone(fresh, str(tmp_path / "warm"))
    reference = champion.load_models()[0]
    for (name, a), (_, b) in zip(
        fresh.backbone.state_dict().items(), reference.backbone.state_dict().items(), strict=True
    ):
        assert np.array_equal(a.numpy(), b.numpy()), name


MONTHLY_TINY = {"recipe_overrides_json": json.dumps({"epochs": 1, "preprocess": {"kind": "standard"}}), "bootstrap": 20}


@pytest.mark.slow
def test_monthly_pipeline_exports_challenger_with_champion_as_parent(
    month_prefix: Path, candidate: Path, s3_bucket: str, tmp_path: Path
) -> None:
    run = run_pipeline(
        monthly_retrain_pipeline,
        {
            **MONTHLY_TINY,
            "data_prefix": str(month_prefix / "data"),
            "hard_examples_prefix": str(month_prefix / "hard"),
            "data_month": MONTH,
            "champion_uri": str(candidate),
            "champion_margin": 1.0,
            "destination": f"{s3_bucket}/monthly",
        },
        tmp_path / "runs",
    )
    published = [u for u in storage.list_uris(f"{s3_bucket}/monthly") if u.endswith("/bundle.json")]
    assert len(published) == 1
    challenger = B.read_bundle(published[0].rsplit("/", 1)[0], cache_dir=tmp_path)
    assert run.outputs["bundle_uri"] == published[0].rsplit("/", 1)[0] + "/"  # export's KServe storageUri
    provenance = challenger.manifest["provenance"]
    assert isinstance(provenance, dict) and provenance["parent_bundle"] == str(candidate)
    report = (challenger.root / "reports" / "validation.md").read_text()
    assert "| champion | pass |" in report


@pytest.mark.slow
def test_monthly_pipeline_refuses_a_challenger_that_loses(
    month_prefix: Path, candidate: Path, s3_bucket: str, tmp_path: Path
) -> None:
    # another seed gives the head a fresh random init, and a vanishing learning rate leaves it untrained
    weak = json.dumps({"epochs": 1, "seed": 7, "preprocess": {"kind": "standard"}, "optimizer": {"lr": 1e-7}})
    with pytest.raises(RuntimeError, match="bundle-validation"):
        run_pipeline(
            monthly_retrain_pipeline,
            {
                **MONTHLY_TINY,
                "recipe_overrides_json": weak,
                "target_selective_accuracy": 0.05,  # any abstain threshold is feasible for the weak challenger
                "data_prefix": str(month_prefix / "data"),
                "data_month": MONTH,
                "champion_uri": str(candidate),
                "destination": f"{s3_bucket}/refused",
            },
            tmp_path / "runs",
        )
    assert not any("/refused/" in u for u in storage.list_uris(s3_bucket))


def test_pipeline_rbac_lets_the_canary_step_patch_inference_services() -> None:
    import shutil
    import subprocess

    import yaml

    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl not installed")
    rendered = subprocess.run(
        [kubectl, "kustomize", str(Path(__file__).parents[1] / "manifests" / "pipeline-rbac")],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    docs = {d["kind"]: d for d in yaml.safe_load_all(rendered)}
    rule = docs["Role"]["rules"][0]
    assert rule["apiGroups"] == ["serving.kserve.io"] and "inferenceservices" in rule["resources"]
    assert {"get", "patch"} <= set(rule["verbs"]), "start_canary_patch reads the service's mode, then patches it"
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
