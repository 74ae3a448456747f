"""visionpipe/rollout/canary.py and `visionpipe canary`: each rollout action's kubectl argv, dry-run and running."""

from __future__ import annotations

import json
import shlex
import shutil
import stat
from pathlib import Path

import pytest
import yaml
from k8s_schema import PLATFORM, merge_patch, render
from kserve_rules import admit

from visionpipe.cli import main
from visionpipe.rollout.canary import (
    CanaryError,
    Target,
    promote_argv,
    rollback_argv,
    start_argv,
    status_argv,
)

TARGET = Target(name="digits", namespace="ml")
MANIFESTS = Path(__file__).resolve().parents[1] / "manifests"
RUNTIME = yaml.safe_load((MANIFESTS / "common" / "serving-runtime.yaml").read_text())


def patch_of(argv: list[str]) -> dict[str, object]:
    assert argv[argv.index("--type") + 1] == "merge"
    return json.loads(argv[argv.index("--patch") + 1])  # type: ignore[no-any-return]


def test_start_patches_uri_and_percent() -> None:
    argv = start_argv(TARGET, "s3://visionpipe/bundles/digits/v7", 20)
    assert argv[:6] == ["kubectl", "--namespace", "ml", "patch", "inferenceservice", "digits"]
    assert patch_of(argv) == {
        "spec": {
            "predictor": {"canaryTrafficPercent": 20, "model": {"storageUri": "s3://visionpipe/bundles/digits/v7"}}
        }
    }


def test_promote_removes_canary_percent() -> None:
    assert patch_of(promote_argv(TARGET)) == {"spec": {"predictor": {"canaryTrafficPercent": None}}}


@pytest.mark.parametrize(
    ("previous", "expected"),
    [
        (None, {"canaryTrafficPercent": 0}),
        ("s3://b/v6", {"canaryTrafficPercent": 0, "model": {"storageUri": "s3://b/v6"}}),
    ],
)
def test_rollback_pins_traffic_to_previous(previous: str | None, expected: dict[str, object]) -> None:
    assert patch_of(rollback_argv(TARGET, previous)) == {"spec": {"predictor": expected}}


def test_status_reads_the_isvc() -> None:
    argv = status_argv(Target(name="digits", context="prod"))
    assert argv[:5] == ["kubectl", "--context", "prod", "get", "inferenceservice"]
    assert argv[5] == "digits" and argv[6] == "-o" and argv[7].startswith("custom-columns=")
    assert ".spec.predictor.canaryTrafficPercent" in argv[7]


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: start_argv(TARGET, "s3://b/x", 0), "percent"),
        (lambda: start_argv(TARGET, "s3://b/x", 100), "percent"),
        (lambda: start_argv(TARGET, "/local/path", 10), "uri"),
        (lambda: start_argv(TARGET, "s3://", 10), "uri"),
        (lambda: rollback_argv(TARGET, "ftp://x/y"), "uri"),
        (lambda: Target(name="Digits_1"), "name"),
        (lambda: Target(name="digits", namespace="a b"), "namespace"),
    ],
)
def test_invalid_arguments(build: object, message: str) -> None:
    with pytest.raises(CanaryError, match=message):
        build()  # type: ignore[operator]


@pytest.mark.parametrize(
    ("cli", "expected"),
    [
        (
            ["canary", "start", "--bundle-uri", "s3://b/v7", "--percent", "25", "-n", "ml"],
            start_argv(TARGET, "s3://b/v7", 25),
        ),
        (["canary", "promote", "-n", "ml"], promote_argv(TARGET)),
        (["canary", "rollback", "-n", "ml", "--previous-uri", "s3://b/v6"], rollback_argv(TARGET, "s3://b/v6")),
        (["canary", "status", "-n", "ml"], status_argv(TARGET)),
    ],
)
def test_dry_run_prints_the_command(cli: list[str], expected: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*cli, "--dry-run"]) == 0
    printed = capsys.readouterr().out.strip()
    assert shlex.split(printed) == expected


def test_bad_cli_value_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["canary", "start", "--bundle-uri", "s3://b/v7", "--percent", "150", "--dry-run"]) == 2
    assert "percent" in capsys.readouterr().err


def test_runs_kubectl_and_returns_its_exit_code(tmp_path: Path) -> None:
    """A stand-in kubectl records its argv: the command really runs when --dry-run is absent."""
    record = tmp_path / "argv.json"
    fake = tmp_path / "kubectl"
    fake.write_text(
        f"#!/usr/bin/env python3\nimport json, sys\njson.dump(sys.argv[1:], open({str(record)!r}, 'w'))\nsys.exit(3)\n"
    )
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    code = main(["canary", "promote", "--name", "digits", "-n", "ml", "--kubectl", str(fake)])
    assert code == 3
    assert json.loads(record.read_text()) == promote_argv(TARGET)[1:]


def test_missing_kubectl_exits_127(tmp_path: Path) -> None:
    assert main(["canary", "status", "--kubectl", str(tmp_path / "nope")]) == 127


# --------------------------------------------------------------------------------------------- Standard mode
STANDARD = Target(name="digits", namespace="ml", mode="standard")
CANDIDATE = "s3://visionpipe/bundles/digits/20270105-093000-cd34ef56"


def test_standard_start_adds_a_canary_entry_and_leaves_the_stable_predictor() -> None:
    assert patch_of(start_argv(STANDARD, CANDIDATE, 20)) == {
        "spec": {
            "canary": [
                {
                    "trafficPercent": 20,
                    "predictor": {
                        "name": "canary",
                        "model": {
                            "name": "kserve-container",
                            "modelFormat": {"name": "visionpipe", "version": "1"},
                            "storageUri": CANDIDATE,
                        },
                    },
                }
            ]
        }
    }


def test_standard_promote_moves_the_bundle_to_the_stable_predictor_and_drops_the_canary() -> None:
    assert patch_of(promote_argv(STANDARD, CANDIDATE)) == {
        "spec": {"canary": None, "predictor": {"model": {"storageUri": CANDIDATE}}}
    }
    with pytest.raises(CanaryError, match="--bundle-uri"):
        promote_argv(STANDARD)
    with pytest.raises(CanaryError, match="bundle uri"):
        promote_argv(TARGET, CANDIDATE)


def test_standard_rollback_drops_the_canary() -> None:
    assert patch_of(rollback_argv(STANDARD)) == {"spec": {"canary": None}}
    assert patch_of(rollback_argv(STANDARD, "s3://b/v6")) == {
        "spec": {"canary": None, "predictor": {"model": {"storageUri": "s3://b/v6"}}}
    }


def test_mode_and_isvc_name_are_checked() -> None:
    with pytest.raises(CanaryError, match="mode"):
        Target(name="digits", mode="raw")
    with pytest.raises(CanaryError, match="name"):
        Target(name="1digits")  # KServe wants a leading letter


def test_cli_standard_mode(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["canary", "promote", "-n", "ml", "--mode", "standard", "--bundle-uri", CANDIDATE, "--dry-run"]
    assert main(argv) == 0
    assert shlex.split(capsys.readouterr().out.strip()) == promote_argv(STANDARD, CANDIDATE)
    assert main(["canary", "promote", "-n", "ml", "--mode", "standard", "--dry-run"]) == 2
    assert "--bundle-uri" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------- on the platform
@pytest.fixture(scope="module")
def bases() -> dict[str, dict[str, object]]:
    """The rendered InferenceService `digits` of each base: serverless (manifests/base), standard."""
    kubectl = shutil.which("kubectl")
    if kubectl is None or not PLATFORM.is_dir():
        pytest.skip("kubectl or the platform CRDs are missing")
    found = {}
    for mode, folder in (("serverless", "base"), ("standard", "standard")):
        (isvc,) = [d for d in render(MANIFESTS / folder, kubectl) if d["kind"] == "InferenceService"]
        found[mode] = isvc
    return found


def applied(live: dict[str, object], argv: list[str]) -> dict[str, object]:
    """`kubectl patch --type merge` on the live object, checked like the API server + KServe would."""
    new = merge_patch(live, patch_of(argv))
    assert isinstance(new, dict)
    admission = admit(new, live, objects=[RUNTIME])
    assert admission.ok, f"{shlex.join(argv)}\n{admission.result.describe()}"
    return admission.obj


@pytest.mark.parametrize("mode", ["serverless", "standard"])
def test_every_rollout_path_is_accepted_by_the_platform(bases: dict[str, dict[str, object]], mode: str) -> None:
    target = Target(name="digits", mode=mode)
    stable = bases[mode]
    stable_uri = stable["spec"]["predictor"]["model"]["storageUri"]  # type: ignore[index]
    assert isinstance(stable_uri, str)
    promote_uri = CANDIDATE if mode == "standard" else None  # serverless: the canary already is the predictor's

    # start -> raise -> promote: the candidate ends up as the stable bundle with all the traffic
    live = applied(stable, start_argv(target, CANDIDATE, 10))
    live = applied(live, start_argv(target, CANDIDATE, 50))
    live = applied(live, promote_argv(target, promote_uri))
    predictor = live["spec"]["predictor"]  # type: ignore[index]
    assert predictor["model"]["storageUri"] == CANDIDATE
    assert "canaryTrafficPercent" not in predictor and "canary" not in live["spec"]  # type: ignore[operator]

    # start -> rollback (with the previous URI): back to the stable bundle
    live = applied(stable, start_argv(target, CANDIDATE, 10))
    live = applied(live, rollback_argv(target, stable_uri))
    assert live["spec"]["predictor"]["model"]["storageUri"] == stable_uri  # type: ignore[index]
    assert "canary" not in live["spec"]  # type: ignore[operator]

    for argv in (
        promote_argv(target, promote_uri),
        rollback_argv(target),
    ):  # on a service with no canary running: harmless
        applied(stable, argv)


def test_the_wrong_mode_is_caught(bases: dict[str, dict[str, object]]) -> None:
    """A Serverless patch on a Standard service would silently move all traffic; a Standard patch on a Knative
    service is refused by the webhook."""
    on_standard = merge_patch(bases["standard"], patch_of(start_argv(TARGET, CANDIDATE, 10)))
    errors = admit(on_standard, bases["standard"], objects=[RUNTIME]).result.errors  # type: ignore[arg-type]
    assert [e.path for e in errors] == ["spec.predictor.canaryTrafficPercent"]
    on_knative = merge_patch(bases["serverless"], patch_of(start_argv(STANDARD, CANDIDATE, 10)))
    errors = admit(on_knative, bases["serverless"], objects=[RUNTIME]).result.errors  # type: ignore[arg-type]
    assert [e.message for e in errors] == [
        "canary is only supported in Standard deployment mode (this InferenceService is Knative)"
    ]
