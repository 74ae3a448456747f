"""pipelines/canary.py: the kubectl argv of each rollout action, dry-run printing and running."""

from __future__ import annotations

import json
import shlex
import stat
from pathlib import Path

import pytest

from pipelines.canary import (
    CanaryError,
    Target,
    main,
    promote_argv,
    rollback_argv,
    start_argv,
    status_argv,
)

TARGET = Target(name="digits", namespace="ml")


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
