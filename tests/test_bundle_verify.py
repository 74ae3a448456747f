"""Loading is part of verifying: layout, bounded manifest parsing, budgets, safetensors and a forward pass.

Every attack is made on a copy of the real `candidate` bundle, checksums recomputed and re-signed with the
trusted (session-local) key, so the check under test is the one that refuses it."""

from __future__ import annotations

import json
import os
import pickle
import resource
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from bundle_copies import Manifest, copy_bundle, read_manifest
from safetensors.torch import save_file

from visionpipe.cli import main
from visionpipe.serving import bundle as B
from visionpipe.serving import models as M
from visionpipe.serving import signing

WEIGHTS = "weights/member-0.safetensors"
VISIONPIPE = Path(sys.executable).parent / "visionpipe"


def _reseal(root: Path, edit: Callable[[Manifest], None] | None = None) -> None:
    """What an attacker holding a trusted key could do: edit, recompute every checksum, re-sign."""
    manifest = read_manifest(root)
    if edit is not None:
        edit(manifest)
    files = manifest["files"]
    assert isinstance(files, dict)
    manifest["files"] = {rel: B.sha256_file(root / rel) for rel in files}
    (root / B.SIGNATURE_FILE).write_bytes(signing.sign_manifest(manifest, signing.default_signing_key()).to_bytes())
    (root / B.BUNDLE_FILE).write_text(json.dumps(manifest, indent=1))


def _set_arch(manifest: Manifest, arch: dict[str, object]) -> None:
    members = manifest["members"]
    assert isinstance(members, list) and isinstance(members[0], dict)
    members[0]["architecture"] = arch


def _arch(manifest: Manifest) -> dict[str, object]:
    members = manifest["members"]
    assert isinstance(members, list) and isinstance(members[0], dict)
    arch = members[0]["architecture"]
    assert isinstance(arch, dict)
    return arch


def _state(root: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.clone() for k, v in load_file(str(root / WEIGHTS)).items()}  # load_file maps the file: copy


def _refused(root: Path, error: type[B.BundleError], reason: str, match: str | None = None) -> B.BundleError:
    with pytest.raises(error, match=match) as err:
        B.verify_bundle(root)
    assert err.value.reason == reason
    return err.value


def _cli(root: Path, *args: str) -> tuple[int, str, str, float, int]:
    """Run `visionpipe validate-bundle` in a subprocess: (exit code, stdout, stderr, seconds, peak RSS in KiB).

    os.wait4 reaps exactly this child and returns its own resource usage (ru_maxrss: peak RSS, KiB on Linux)."""
    out_path, err_path = root.parent / "cli.out", root.parent / "cli.err"
    started = time.monotonic()
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = subprocess.Popen([str(VISIONPIPE), "validate-bundle", *args, str(root)], stdout=out, stderr=err)
    timer = threading.Timer(120, proc.kill)
    timer.start()
    try:
        _, status, usage = os.wait4(proc.pid, 0)
    finally:
        timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.monotonic() - started
    return proc.returncode, out_path.read_text(), err_path.read_text(), seconds, usage.ru_maxrss


# --------------------------------------------------------------------------------------------- good bundle


def test_checked_loading_matches_the_plain_loader(candidate: Path) -> None:
    bundle, models = B.verify_bundle(candidate)
    reference = M.build_model(bundle.members[0].arch)
    M.load_weights(reference, bundle.members[0].weights)
    reference.eval()
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        torch.testing.assert_close(models[0](x), reference(x), rtol=0, atol=0)
    assert not any(t.is_meta for t in models[0].state_dict().values())
    assert all(p.requires_grad for p in models[0].parameters())  # still trainable (monthly warm start)


def test_reports_annex_may_hold_unlisted_reports(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    (root / "reports" / "extra.md").write_text("a report written after validation\n")
    assert B.verify_bundle(root)[0].version == B.read_bundle(candidate).version


def test_weights_changed_after_reading_are_refused_at_load(candidate: Path, tmp_path: Path) -> None:
    """The sha256 is checked again on the very bytes parsed (no window between checksum and load)."""
    root = copy_bundle(candidate, tmp_path)
    bundle = B.read_bundle(root)
    state = _state(root)
    state["head.bias"] = state["head.bias"] + 1.0
    save_file(state, str(root / WEIGHTS))
    with pytest.raises(B.ChecksumMismatch, match="bytes loaded"):
        bundle.load_models()


# ----------------------------------------------------------------------------------------------- layout


def test_symlinked_weights_are_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    outside = tmp_path / "outside.safetensors"
    shutil.move(root / WEIGHTS, outside)
    (root / WEIGHTS).symlink_to(outside)  # same bytes: the checksum alone would pass
    _refused(root, B.SymlinkInBundle, "symlink", "member-0.safetensors is a symbolic link")


def test_symlinked_model_card_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    outside = tmp_path / "card.json"
    shutil.move(root / B.MODEL_CARD_FILE, outside)
    (root / B.MODEL_CARD_FILE).symlink_to(outside)
    _refused(root, B.SymlinkInBundle, "symlink", "model_card.json")


def test_symlinked_folder_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    shutil.move(root / "weights", tmp_path / "weights")
    (root / "weights").symlink_to(tmp_path / "weights", target_is_directory=True)
    _refused(root, B.SymlinkInBundle, "symlink", "weights is a symbolic link")


def test_bundle_folder_itself_may_be_a_link(candidate: Path, tmp_path: Path) -> None:
    """KServe mounts a PVC bundle as /mnt/models -> /mnt/pvc/...: the operator's link to the folder is fine."""
    link = tmp_path / "models"
    link.symlink_to(candidate, target_is_directory=True)
    assert B.verify_bundle(link)[0].version == B.read_bundle(candidate).version


@pytest.mark.parametrize("rel", ["evil.py", "weights/member-1.safetensors", "sub/dir/notes.txt"])
def test_unlisted_file_is_refused(candidate: Path, tmp_path: Path, rel: str) -> None:
    root = copy_bundle(candidate, tmp_path)
    (root / rel).parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(root / WEIGHTS, root / rel)
    _refused(root, B.UnlistedFile, "unlisted_file", rel)


def test_fifo_in_bundle_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    os.mkfifo(root / "reports" / "pipe")
    _refused(root, B.SpecialFile, "special_file", "pipe")


# ------------------------------------------------------------------------------------------------ manifest


def test_invalid_utf8_manifest_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    data = (root / B.BUNDLE_FILE).read_bytes()
    (root / B.BUNDLE_FILE).write_bytes(data[:40] + b"\xff\xfe\xc3" + data[40:])
    _refused(root, B.InvalidUtf8, "invalid_utf8", "not valid UTF-8")


@pytest.mark.parametrize("content", [b'{"name": ', b'{"a": 1, "a": 2}', b"[1, 2]"])
def test_invalid_json_manifest_is_refused(candidate: Path, tmp_path: Path, content: bytes) -> None:
    root = copy_bundle(candidate, tmp_path)
    (root / B.BUNDLE_FILE).write_bytes(content)
    _refused(root, B.InvalidJson, "invalid_json")


def test_deeply_nested_manifest_is_refused_without_recursion(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    depth = 200_000  # far beyond Python's recursion limit
    (root / B.BUNDLE_FILE).write_bytes(b'{"a": ' + b"[" * depth + b"]" * depth + b"}")
    err = _refused(root, B.JsonTooDeep, "json_too_deep", "nested 200001 levels deep; the limit is 32")
    assert "32" in str(err)


def test_brackets_inside_strings_do_not_count_as_nesting(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    note = '[[[[{{{{ "quoted" \\ [[[[ ' + "[" * 100  # a quote and a backslash inside, escaped in JSON
    _reseal(root, lambda m: m.update(note=note))
    assert B.json_depth('{"a": "[[[[", "b": [[1]]}') == 3
    assert B.verify_bundle(root)[0].manifest["note"] == note


def test_oversized_manifest_is_refused_with_a_configurable_cap(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    size = (root / B.BUNDLE_FILE).stat().st_size
    tight = B.VerifyLimits(max_manifest_bytes=size - 1)
    with pytest.raises(B.ManifestTooLarge, match=f"{size:,} bytes; the limit is {size - 1:,}") as err:
        B.read_bundle(root, limits=tight)
    assert err.value.reason == "manifest_too_large"
    assert B.read_bundle(root, limits=B.VerifyLimits(max_manifest_bytes=size)).version


@pytest.fixture(scope="module")
def baseline_peak_kib(candidate: Path, tmp_path_factory: pytest.TempPathFactory) -> int:
    """Peak RSS of the CLI verifying the small valid bundle: the imports (torch, kfp, kserve) and one forward
    pass. A refusal must stay close to it, whatever the installed torch build weighs."""
    code, _, _, _, peak_kib = _cli(copy_bundle(candidate, tmp_path_factory.mktemp("baseline")))
    assert code == 0
    return peak_kib


def test_cli_refuses_a_gigabyte_manifest_without_reading_it(
    candidate: Path, tmp_path: Path, baseline_peak_kib: int
) -> None:
    root = copy_bundle(candidate, tmp_path)
    with (root / B.BUNDLE_FILE).open("r+b") as f:
        f.truncate(2 * 1024**3)  # sparse: 2 GiB of size, no disk blocks
    code, out, err, seconds, peak_kib = _cli(root)
    assert code == 1 and "REFUSED [manifest_too_large]" in out and "manifest_too_large: " in err
    assert "Traceback" not in out + err
    # far below the 2 GiB a full read would add
    assert seconds < 60 and peak_kib < baseline_peak_kib + 256 * 1024, (peak_kib, baseline_peak_kib)


# ------------------------------------------------------------------------------------------------- budgets


def test_parameter_count_is_exact_for_every_architecture() -> None:
    specs = [
        M.ArchSpec("cnn-small", 10, 1, 28, width=16),
        M.ArchSpec("cnn-small", 3, 3, 20, width=5),
        M.ArchSpec("resnet18", 2, 3, 32),
        M.ArchSpec("vit", 4, 3, 24, patch_size=8, hidden_dim=24, num_layers=2, num_heads=3, mlp_dim=40),
        M.ArchSpec("dinov2", 5, 1, 16, patch_size=4, hidden_dim=16, num_layers=2, num_heads=2, mlp_dim=32),
    ]
    for spec in specs:
        assert M.parameter_count(spec) == M.count_parameters(M.build_model(spec)), spec.name


def test_million_wide_architecture_is_refused_before_anything_is_built(
    candidate: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = copy_bundle(candidate, tmp_path)
    _reseal(root, lambda m: _arch(m).update(width=10**6))

    def never(spec: M.ArchSpec) -> M.VisionClassifier:
        raise AssertionError(f"built {spec.name} of width {spec.width}")

    monkeypatch.setattr(M, "build_model", never)
    monkeypatch.setattr(B, "build_model_meta", never)
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.monotonic()
    err = _refused(root, B.ParamBudget, "param_budget", "parameters; the budget is 500,000,000")
    assert time.monotonic() - started < 5.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss_before < 256 * 1024  # KiB
    assert f"{M.parameter_count(M.ArchSpec('cnn-small', 10, 1, 28, width=10**6)):,}" in str(err)


def test_cli_refuses_a_million_wide_architecture_fast_and_small(
    candidate: Path, tmp_path: Path, baseline_peak_kib: int
) -> None:
    root = copy_bundle(candidate, tmp_path)
    _reseal(root, lambda m: _arch(m).update(width=10**6))
    code, out, err, seconds, peak_kib = _cli(root)
    assert code == 1 and "REFUSED [param_budget]" in out and "param_budget: " in err
    assert "Traceback" not in out + err
    # the imports, not 36 TB
    assert seconds < 60 and peak_kib < baseline_peak_kib + 256 * 1024, (peak_kib, baseline_peak_kib)


def test_too_many_layers_are_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    vit: dict[str, object] = {"name": "vit", "num_classes": 10, "in_channels": 1, "image_size": 28, "patch_size": 4}
    vit.update(hidden_dim=2, num_heads=1, mlp_dim=1, num_layers=10**7)
    _reseal(root, lambda m: _set_arch(m, vit))
    _refused(root, B.ParamBudget, "param_budget", "num_layers=10000000 exceeds the budget of 256 layers")


def test_quadratic_attention_is_refused_by_the_memory_budget(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    vit: dict[str, object] = {"name": "vit", "num_classes": 10, "in_channels": 1, "image_size": 1024, "patch_size": 1}
    vit.update(hidden_dim=2, num_heads=1, mlp_dim=2, num_layers=1)  # few parameters, 10^12 attention entries
    _reseal(root, lambda m: _set_arch(m, vit))
    with pytest.raises(B.MemoryBudget, match="bytes of activations") as err:
        B.read_bundle(root)
    assert err.value.reason == "memory_budget"


def test_parameter_budget_is_configurable(candidate: Path) -> None:
    params = M.parameter_count(B.read_bundle(candidate).members[0].arch)
    with pytest.raises(B.ParamBudget):
        B.read_bundle(candidate, limits=B.VerifyLimits(model=M.ModelBudget(max_parameters=params - 1)))
    assert B.verify_bundle(candidate, limits=B.VerifyLimits(model=M.ModelBudget(max_parameters=params)))[1]


# ------------------------------------------------------------------------------------------------- weights


class _Boom:
    """Unpickling this writes a marker file: proof that a pickle was (or was not) loaded."""

    marker = ""

    def __reduce__(self) -> tuple[Callable[..., object], tuple[object, ...]]:
        return (Path.write_text, (Path(self.marker), "unpickled"))


def test_pickle_named_safetensors_is_never_loaded(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    boom = _Boom()
    boom.marker = str(tmp_path / "marker")
    (root / WEIGHTS).write_bytes(pickle.dumps({"head.weight": boom}, protocol=4))
    _reseal(root)
    _refused(root, B.NotSafetensors, "not_safetensors", "Python pickle")
    assert not (tmp_path / "marker").exists()


def test_torch_save_checkpoint_named_safetensors_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    torch.save(_state(root), root / WEIGHTS)
    _reseal(root)
    _refused(root, B.NotSafetensors, "not_safetensors", "zip archive")


def _edit_state(root: Path, edit: Callable[[dict[str, torch.Tensor]], None]) -> None:
    state = _state(root)
    edit(state)
    save_file(state, str(root / WEIGHTS))
    _reseal(root)


@pytest.mark.parametrize(
    ("edit", "match"),
    [
        (lambda s: s.update({"head.weight": torch.zeros(11, s["head.weight"].shape[1])}), r"head\.weight: file F32"),
        (lambda s: s.update({"head.bias": s["head.bias"].double()}), r"head\.bias: file F64"),
        (lambda s: s.pop("head.bias"), r"missing \['head\.bias'\]"),
        (lambda s: s.update({"extra.tensor": torch.zeros(2)}), r"unexpected \['extra\.tensor'\]"),
    ],
)
def test_weights_that_do_not_fit_the_model_are_refused(
    candidate: Path, tmp_path: Path, edit: Callable[[dict[str, torch.Tensor]], None], match: str
) -> None:
    root = copy_bundle(candidate, tmp_path)
    _edit_state(root, edit)
    _refused(root, B.WeightsMismatch, "weights_mismatch", match)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_refused(candidate: Path, tmp_path: Path, value: float) -> None:
    root = copy_bundle(candidate, tmp_path)

    def poison(state: dict[str, torch.Tensor]) -> None:
        state["head.weight"][3, 5] = value

    _edit_state(root, poison)
    _refused(root, B.NonFiniteWeights, "non_finite_weights", r"'head\.weight' holds 1 NaN")


def test_overflowing_weights_are_refused_by_the_forward_pass(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)

    def huge(state: dict[str, torch.Tensor]) -> None:
        state["head.weight"].fill_(3e38)
        state["head.bias"].fill_(3e38)

    _edit_state(root, huge)
    _refused(root, B.NonFiniteOutput, "non_finite_output", "non-finite logits")


def test_model_that_cannot_run_on_the_preprocessed_input_is_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    arch = M.ArchSpec.from_dict({**_arch(read_manifest(root)), "in_channels": 3})  # but preprocessing gives 1 channel
    M.save_weights(M.build_model(arch), root / WEIGHTS)
    _reseal(root, lambda m: _arch(m).update(in_channels=3))
    _refused(root, B.ForwardFailed, "forward_failed", r"blank \(1, 1, 28, 28\) input failed")


def _header_bomb(root: Path) -> None:
    (root / WEIGHTS).write_bytes((2**40).to_bytes(8, "little") + b'{"a": 1}')


def _header_beyond_file(root: Path) -> None:
    data = (root / WEIGHTS).read_bytes()
    (root / WEIGHTS).write_bytes((len(data) * 2).to_bytes(8, "little") + data[8:])


@pytest.mark.parametrize(
    ("tamper", "match"), [(_header_bomb, "1,099,511,627,776 bytes"), (_header_beyond_file, "file 20")]
)
def test_safetensors_header_bomb_is_refused(
    candidate: Path, tmp_path: Path, tamper: Callable[[Path], None], match: str
) -> None:
    root = copy_bundle(candidate, tmp_path)
    tamper(root)
    _reseal(root)
    _refused(root, B.HeaderTooLarge, "header_too_large", match)


def test_header_cap_is_configurable(candidate: Path, tmp_path: Path) -> None:
    header_len = int.from_bytes((candidate / WEIGHTS).read_bytes()[:8], "little")
    with pytest.raises(B.HeaderTooLarge):
        B.verify_bundle(candidate, limits=B.VerifyLimits(max_header_bytes=header_len - 1))


def test_truncated_weights_are_refused(candidate: Path, tmp_path: Path) -> None:
    root = copy_bundle(candidate, tmp_path)
    data = (root / WEIGHTS).read_bytes()
    (root / WEIGHTS).write_bytes(data[: len(data) - 100])
    _reseal(root)
    _refused(root, B.WeightsMismatch, "weights_mismatch", "bytes of tensor data")


# ---------------------------------------------------------------------------------------------------- CLI


def test_cli_names_the_reason_without_a_traceback(candidate: Path, tmp_path: Path) -> None:
    """One subprocess over three attacks would hide which one failed; the header bomb stands for the weights
    checks (the others run in-process through `main` below)."""
    root = copy_bundle(candidate, tmp_path)
    _header_bomb(root)
    _reseal(root)
    code, out, err, _, _ = _cli(root)
    assert code == 1 and out.startswith("REFUSED [header_too_large]")
    assert "visionpipe validate-bundle: header_too_large: member-0.safetensors" in err
    assert "Traceback" not in out + err


@pytest.mark.parametrize(
    ("tamper", "reason"),
    [
        (lambda r: (r / B.BUNDLE_FILE).write_bytes(b"\xff" * 10), "invalid_utf8"),
        (lambda r: (r / B.BUNDLE_FILE).write_bytes(b"[" * 5000 + b"]" * 5000), "json_too_deep"),
        (lambda r: _edit_state(r, lambda s: s["head.bias"].fill_(float("nan"))), "non_finite_weights"),
        (lambda r: (r / "evil.py").write_text("print('hi')"), "unlisted_file"),
    ],
)
def test_validate_bundle_prints_reason_and_exits_1(
    candidate: Path,
    tmp_path: Path,
    tamper: Callable[[Path], object],
    reason: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = copy_bundle(candidate, tmp_path)
    tamper(root)
    assert main(["validate-bundle", str(root)]) == 1
    captured = capsys.readouterr()
    assert captured.out.startswith(f"REFUSED [{reason}]")
    assert f"visionpipe validate-bundle: {reason}: " in captured.err


def test_validate_bundle_reports_the_loaded_weights(candidate: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate-bundle", str(candidate)]) == 0
    out = capsys.readouterr().out
    params = M.parameter_count(B.read_bundle(candidate).members[0].arch)
    assert f"weights loaded: parameters {params:,}" in out and "signature: verified, key" in out
