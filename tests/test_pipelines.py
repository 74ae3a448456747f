"""Pipeline graph, compiled YAML freshness, local runs through kfp.local, CLI parameters."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipelines.cli import main
from pipelines.compile import stale_pipelines
from pipelines.local import ParameterError, parse_parameters
from pipelines.training import training_pipeline


def test_checked_in_compiled_yaml_is_current() -> None:
    stale = stale_pipelines()
    assert not stale, "pipelines/compiled is stale; run `visionpipe compile`:\n" + "\n".join(stale.values())


def test_compile_check_detects_a_stale_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["compile", "--out", str(tmp_path)]) == 0
    assert main(["compile", "--check", "--out", str(tmp_path)]) == 0
    yaml_path = tmp_path / "training.yaml"
    yaml_path.write_text(yaml_path.read_text().replace("builtin://sklearn-digits", "builtin://other", 1))
    assert main(["compile", "--check", "--out", str(tmp_path)]) == 1
    assert "training: compiled YAML is stale" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("pairs", "expected"),
    [
        (["seed=3"], {"seed": 3}),
        (["train_ratio=0.6", "source=s3://b/p"], {"train_ratio": 0.6, "source": "s3://b/p"}),
    ],
)
def test_parse_parameters_types_values(pairs: list[str], expected: dict[str, object]) -> None:
    assert parse_parameters(training_pipeline, pairs) == expected


@pytest.mark.parametrize(
    ("pairs", "message"),
    [(["nope=1"], "unknown pipeline parameter 'nope'"), (["seed=x"], "seed='x'"), (["seed"], "name=value")],
)
def test_parse_parameters_errors(pairs: list[str], message: str) -> None:
    with pytest.raises(ParameterError, match=message):
        parse_parameters(training_pipeline, pairs)


def test_cli_rejects_bad_parameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", "-p", "bogus=1"]) == 2
    assert "unknown pipeline parameter 'bogus'" in capsys.readouterr().err
