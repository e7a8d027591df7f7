"""Engine validation: a good artifact passes torch vs ort (fp32); one perturbed layer fails and bisect names it."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from decodekit.export.manifest import file_entry, read_manifest, write_manifest
from decodekit.tools.bisect import decoder_taps, locate_taps, node_module
from decodekit.tools.validate import (TOLERANCES, BackendSpec, ValidationError, compare_greedy, default_prompts,
                                      load_run_results, step_metrics, tolerance_for, validate)
from decodekit.tools.validate_judge import judge_steps
from decodekit.tools.validate_cmd import format_report

STEPS = 4
HAS_POLYGRAPHY = importlib.util.find_spec("polygraphy") is not None


def shared_tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """preset:tiny (max_seq 64, max_batch 4), exported once per session and shared read-only by tests/tools."""
    folder = tmp_path_factory.getbasetemp() / "tiny-shared"
    if not (folder / "manifest.json").is_file():
        from decodekit.export.artifact import ExportOptions, export_artifact

        export_artifact("preset:tiny", folder, ExportOptions(max_batch=4, max_seq=64, force=True))
    return folder


def perturb(src: Path, dst: Path, module: str, factor: float = 1.5) -> str:
    """Copy the artifact, scale the weight of the MatMul traced from ``module``, rewrite the manifest checksums."""
    import onnx
    from onnx import numpy_helper

    shutil.copytree(src, dst)
    m = read_manifest(dst)
    path = m.rank_file(dst)
    model = onnx.load(str(path))
    node = next(n for n in model.graph.node if n.op_type == "MatMul" and node_module(n) == module)
    init = next(i for i in model.graph.initializer if i.name == node.input[1])
    w = numpy_helper.to_array(init)
    init.CopyFrom(numpy_helper.from_array((w * np.float32(factor)).astype(w.dtype), init.name))
    onnx.save(model, str(path))
    ranks = [dataclasses.replace(r, onnx=file_entry(dst, r.onnx.file)) for r in m.ranks]
    write_manifest(dst, dataclasses.replace(m, ranks=ranks))
    return node.output[0]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return shared_tiny(tmp_path_factory)


def test_good_artifact_passes_torch_vs_ort(tiny: Path, tmp_path: Path) -> None:
    saved = tmp_path / "results.json" if HAS_POLYGRAPHY else None
    report = validate(tiny, ["torch", "ort"], steps=STEPS, save_results=saved)
    assert report.passed, report.to_dict()
    (c,) = report.comparisons
    assert (c.backend, c.reference, c.tolerance.dtype) == ("ort", "torch", "fp32")
    assert [m.step for m in c.steps] == list(range(STEPS + 1))
    assert c.steps[0].positions == sum(len(p) for p in report.prompts)  # every valid prefill position compared
    assert all(m.max_abs <= 1e-4 and m.cosine_min > 0.99999 and m.top1_agreement == 1.0 for m in c.steps)
    assert c.greedy.match and c.greedy.tokens == report.reference_tokens
    assert len({len(p) for p in report.prompts}) == len(report.prompts) >= 2  # different lengths (padding)
    assert all(len(t) == STEPS + 1 for t in report.reference_tokens)
    json.dumps(report.to_dict())
    text = format_report(report)
    assert "ort vs torch" in text and text.rstrip().endswith("RESULT: PASS") and "greedy tokens: identical" in text
    if not HAS_POLYGRAPHY:
        return
    results = load_run_results(saved)  # a Polygraphy RunResults
    assert list(results.keys()) == ["torch", "ort"] and len(results["ort"]) == STEPS + 1
    assert np.allclose(results["torch"][0]["logits"], results["ort"][0]["logits"], atol=1e-4)


def test_perturbed_layer_fails_and_bisect_names_it(tiny: Path, tmp_path: Path) -> None:
    tensor = perturb(tiny, tmp_path / "bad", "layers.1.ffn.down_proj")
    report = validate(tmp_path / "bad", ["torch", "ort"], steps=STEPS)
    assert not report.passed
    (c,) = report.comparisons
    assert not c.steps[0].passed and "max |logit error|" in c.reasons[0]
    b = c.bisect
    assert b["found"] and (b["step"], b["layer"], b["module"], b["onnx_tensor"]) == (0, 1, "layers.1.ffn.down_proj",
                                                                                     tensor)
    assert "layer 1 FFN output" in b["message"] and repr(tensor) in b["message"]
    upstream = [t for t in b["taps"] if t["module"] in ("layers.0.ffn_norm", "layers.1.attn.o_proj")]
    assert len(upstream) == 2 and not any(t["diverged"] for t in upstream)  # earlier taps agree


def test_perturbed_attention_is_named(tiny: Path, tmp_path: Path) -> None:
    perturb(tiny, tmp_path / "bad-attn", "layers.0.attn.o_proj", factor=0.5)
    report = validate(tmp_path / "bad-attn", ["torch", "ort"], prompts=[[5, 9, 33, 7]], steps=1,
                      reference_source="preset:tiny")
    b = report.comparisons[0].bisect
    assert not report.passed and b["found"] and b["module"] == "layers.0.attn.o_proj" and b["layer"] == 0
    assert "layer 0 attention output" in b["message"]


def test_cli_exit_codes_and_one_line_failure(tiny: Path, tmp_path: Path) -> None:
    perturb(tiny, tmp_path / "bad", "layers.1.ffn.down_proj")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    exe = Path(sys.executable).with_name("decodekit")
    cmd = [str(exe) if exe.is_file() else shutil.which("decodekit") or "decodekit", "validate"]
    bad = subprocess.run([*cmd, str(tmp_path / "bad"), "--steps", "2", "--json"], capture_output=True, text=True,
                         env=env, timeout=300)
    assert bad.returncode == 1, bad.stderr
    doc = json.loads(bad.stdout)
    assert doc["passed"] is False and doc["comparisons"][0]["bisect"]["layer"] == 1
    errors = [line for line in bad.stderr.splitlines() if not line.startswith("[validate]")]
    assert len(errors) == 1 and errors[0].startswith("error: validation failed") and "layer 1 FFN" in errors[0]


def test_tap_location_uses_exporter_metadata(tiny: Path) -> None:
    import onnx

    graph = onnx.load(str(tiny / "rank0.onnx"), load_external_data=False).graph
    taps = locate_taps(graph, decoder_taps(2))
    assert len(taps) == 2 * 4 + 2 and taps["lm_head"] == "logits"
    ops = {n.output[0]: n.op_type for n in graph.node}
    assert ops[taps["layers.1.attn.o_proj"]] == "MatMul" and ops[taps["layers.0.attn_norm"]] == "RMSNormalization"


def test_tolerances_and_metrics() -> None:
    assert tolerance_for("fp32", "fp16") is TOLERANCES["fp16"] and tolerance_for("bf16", "fp32").dtype == "bf16"
    assert TOLERANCES["fp32"].describe().startswith("fp32: max |logit error| <= 0.0001 x max(1, logit scale)")
    assert "top-1 agreement >= 0.99" in TOLERANCES["fp16"].describe()
    ref = np.array([[2.0, 1.0, 0.0], [0.0, 1.0, 3.0]], dtype=np.float32)
    ok = step_metrics(0, ref, ref + 1e-5, TOLERANCES["fp32"])
    assert ok.passed and ok.top1_agreement == 1.0 and ok.logit_scale == 3.0
    assert ok.max_rel == pytest.approx(1e-5 / 3, rel=1e-2)
    off = step_metrics(1, ref, ref[:, ::-1].copy(), TOLERANCES["fp32"])
    assert not off.passed and off.top1_agreement == 0.0 and off.cosine_min < 0.5
    nan = step_metrics(2, ref, ref * np.nan, TOLERANCES["fp32"])
    assert not nan.passed
    g = compare_greedy([[1, 2, 3], [4, 5]], [[1, 2, 9], [4, 5]])
    assert not g.match and g.first_divergence == (0, 2) and g.agreement == pytest.approx(4 / 5)


def test_inputs_checked_before_work(tiny: Path) -> None:
    assert BackendSpec.parse("ort@/x/gqa") == BackendSpec("ort", "/x/gqa")
    assert BackendSpec("ort", "/x/gqa").label == "ort@gqa"
    prompts = default_prompts(512, 64, STEPS, 4)
    assert all(len(p) + STEPS + 1 <= 64 and min(p) >= 3 for p in prompts)
    with pytest.raises(ValidationError, match="at least two backends"):
        validate(tiny, ["torch"])
    with pytest.raises(ValidationError, match="exceeds the artifact's max_seq 64"):
        validate(tiny, ["torch", "ort"], prompts=[[5] * 62], steps=2)
    with pytest.raises(ValidationError, match="outside the vocabulary"):
        validate(tiny, ["torch", "ort"], prompts=[[5, 512]], steps=1)
    assert {len(p) for p in default_prompts(512, 64, STEPS, 4, equal_lengths=True)} == {4}  # no mixed_lengths
    with pytest.raises(ValidationError, match="unknown mode 'exact'; choose one of tolerance, parity, judge"):
        validate(tiny, ["torch", "ort"], mode="exact")


# ------------------------------------------------------------------------------------------------ modes


@pytest.fixture(scope="module")
def tiny16(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from decodekit.export.artifact import ExportOptions, export_artifact

    folder = tmp_path_factory.mktemp("modes") / "tiny-fp16"
    export_artifact("preset:tiny", folder, ExportOptions(dtype="fp16", max_batch=4, max_seq=64, force=True))
    return folder


def test_parity_mode_decides_on_greedy_tokens_alone(tiny16: Path, tmp_path: Path) -> None:
    """fp16 passes parity with identical tokens; a perturbed layer changes the tokens and fails it, whatever the dtype."""
    good = validate(tiny16, ["torch", "ort"], steps=STEPS, mode="parity")
    assert good.passed and good.comparisons[0].tolerance.describe() == "parity: identical greedy tokens"
    perturb(tiny16, tmp_path / "bad", "layers.1.ffn.down_proj", factor=3.0)
    bad = validate(tmp_path / "bad", ["torch", "ort"], steps=STEPS, mode="parity", bisect=False)
    assert not bad.passed and bad.comparisons[0].reasons[0].startswith("greedy tokens differ")


def test_judge_mode_tells_rounding_from_an_error(tiny16: Path, tmp_path: Path) -> None:
    """fp16 ORT against the fp32 judge errs like fp16 torch and passes; a perturbed layer does not."""
    good = validate(tiny16, ["torch", "ort"], steps=STEPS, mode="judge")
    (c,) = good.comparisons
    assert good.passed and c.judge is not None and good.backends[-1] == "torch-fp32-judge"
    assert 0 < c.judge.reference.max_abs < 1e-2 and c.judge.candidate.max_abs <= c.judge.allowed_max_abs
    assert c.judge.reference.argmax_agreement > 0.9
    json.dumps(good.to_dict())
    assert "against the fp32 judge" in format_report(good)
    perturb(tiny16, tmp_path / "bad", "layers.1.ffn.down_proj", factor=1.5)
    bad = validate(tmp_path / "bad", ["torch", "ort"], steps=STEPS, mode="judge", bisect=False)
    assert not bad.passed and "not explained by rounding" in bad.comparisons[0].reasons[0]
    with pytest.raises(ValidationError, match="--mode judge compares"):
        validate(tiny16, ["ort"], mode="judge", reference="transformers")


def test_judge_flags_near_ties() -> None:
    """Two systems that pick different tokens where the fp32 top-2 margin is below their error: a near-tie."""
    judge = [np.array([[1.0, 0.999, -3.0], [2.0, 0.0, -1.0]])]
    ref = [judge[0] + np.array([[0.002, 0.0, 0.0], [0.001, 0.0, 0.0]])]  # keeps token 0
    cand = [judge[0] + np.array([[0.0, 0.002, 0.0], [0.0, 0.001, 0.0]])]  # flips row 0 to token 1
    j = judge_steps(ref, cand, judge)
    (d,) = j.disagreements
    assert (d.step, d.row, d.judge_pick, d.reference_pick, d.candidate_pick) == (0, 0, 0, 0, 1) and d.near_tie
    assert j.passed and j.candidate.argmax_agreement == 0.5
    far = judge_steps(ref, [judge[0] + 0.5 * np.eye(3)[[1, 1]]], judge)
    assert not far.passed and far.candidate.max_abs == pytest.approx(0.5)
