"""`decodekit validate --reference transformers`: transformers' own model is the reference, so a config field
decodekit maps wrongly FAILS validation (against decodekit's own PyTorch model it would pass)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from decodekit.errors import BackendError
from decodekit.export.artifact import ExportOptions, export_artifact
from decodekit.export.config_fields import HIDDEN_ACT
from decodekit.tools.validate import validate

STEPS = 6
BIASED_GELU = {"attention_bias": True, "mlp_bias": True, "hidden_act": "gelu_new"}


def test_passes_on_a_correct_export(hf_checkpoint, exported, one_thread):
    artifact = exported(str(hf_checkpoint("llama", **BIASED_GELU)), max_seq=48, max_batch=3)
    report = validate(artifact, ["torch", "ort"], steps=STEPS, reference="transformers")
    assert report.passed, report.to_dict()
    assert report.reference == "transformers" and [c.backend for c in report.comparisons] == ["torch", "ort"]
    assert len(report.prompts) == 3 and len({len(p) for p in report.prompts}) == 3  # right-padded batch
    for c in report.comparisons:
        assert c.reference == "transformers" and c.greedy.match and c.tolerance.dtype == "fp32"
        assert c.summary()["max_rel"] <= 1e-4
    assert "transformers" in report.notes[0]


def test_fails_where_decodekit_gets_the_math_wrong(hf_checkpoint, one_thread, tmp_path, monkeypatch, capsys):
    """Re-create the old bug (hidden_act "gelu" exported as SiLU): --reference decodekit passes, transformers fails."""
    from decodekit.tools.cli import main

    monkeypatch.setitem(HIDDEN_ACT, "gelu", "silu")
    src = hf_checkpoint("llama", hidden_act="gelu")
    export_artifact(str(src), tmp_path / "a", ExportOptions(max_seq=32, max_batch=2))
    assert validate(tmp_path / "a", ["torch", "ort"], steps=STEPS).passed  # decodekit against itself: blind
    report = validate(tmp_path / "a", ["ort"], steps=STEPS, reference="transformers")
    assert not report.passed
    (c,) = report.comparisons
    assert c.backend == "ort" and c.reference == "transformers" and c.bisect is None
    assert any("max |logit error|" in r for r in c.reasons) and not c.greedy.match
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        main(["validate", str(tmp_path / "a"), "--reference", "transformers", "--backends", "ort", "--steps", "2"])
    assert info.value.code == 1
    errors = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[validate]")]
    assert len(errors) == 1 and errors[0].startswith("error: validation failed: ort vs transformers: ")


def test_preset_artifact_is_refused_with_the_flag_to_use(tp1):
    with pytest.raises(BackendError, match=r"preset:tiny .*--reference-source FOLDER"):
        validate(tp1, ["ort"], steps=1, prompts=[[5, 6]], reference="transformers")


def test_missing_transformers_is_one_line(hf_checkpoint, monkeypatch):
    from decodekit.tools.hf_reference import load_reference_model

    src = str(hf_checkpoint("llama"))
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(BackendError, match=r"^--reference transformers needs the transformers package: "
                                           r"pip install transformers$"):
        load_reference_model(src)


def test_unknown_source_kind_names_the_known_ones(tmp_path):
    from decodekit.tools.hf_reference import SOURCE_KINDS, load_reference_model

    with pytest.raises(BackendError, match=r"known kinds: hf-folder, gguf\); pass .* --reference-source PATH"):
        load_reference_model(str(tmp_path / "nothing-here"))
    assert list(SOURCE_KINDS) == ["hf-folder", "gguf"]


def test_cli_backend_counts_and_torch_hint_name_cli_flags(tp1, capsys):
    from decodekit.tools.cli import main

    with pytest.raises(SystemExit) as info:  # decodekit reference: the first backend is the reference
        main(["validate", str(tp1), "--backends", "ort"])
    assert info.value.code == 1 and "at least two backends" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["validate", str(tp1), "--reference-source", str(Path("/nonexistent/model")), "--steps", "1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert info.value.code == 1 and "--reference-source" in err and err.count("torch_source=") <= 1
    assert "(torch_source= in Python)" in err
