"""`decodekit optimize`: per-pass counts, --json, --debug, --dtype, refusals with exit code 1."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from decodekit.export.manifest import read_manifest
from decodekit.tools.cli import main

L = 2  # preset:tiny layers


def run(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as e:
        code = int(e.code or 0)
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("cli") / "tiny"
    main(["export", "preset:tiny", "-o", str(folder), "--max-seq", "64", "--max-batch", "2"])
    return folder


def test_optimize_json_report(tiny, tmp_path, capsys):
    code, out, _ = run(["optimize", str(tiny), "-o", str(tmp_path / "gqa"), "--dialect", "ort-gqa", "--json"], capsys)
    assert code == 0
    report = json.loads(out)
    assert report["counts"] == {"fuse-projections": {"groups": 2 * L, "matmuls": 5 * L},
                                "lower-ort-gqa": {"GroupQueryAttention": L, "SkipSimplifiedLayerNormalization": 2 * L}}
    assert report["dialect"] == "ort-gqa" and report["ranks"][0]["ops"]["com.microsoft::GroupQueryAttention"] == L
    assert read_manifest(tmp_path / "gqa").dialect == "ort-gqa"


def test_optimize_prints_per_pass_counts_and_debug_reasons(tiny, tmp_path, capsys):
    code, out, err = run(["optimize", str(tiny), "-o", str(tmp_path / "dec"), "--dialect", "decomposed",
                          "--dtype", "fp16", "--debug"], capsys)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("rank0 lower-decomposed") and '"Attention": 2' in line for line in lines)
    assert any(line.startswith("rank0 precision") and '"attention_fp32_softmax": 2' in line for line in lines)
    assert any("did not match" in line for line in lines)  # --debug: where fuse-std's rules stopped
    man = read_manifest(tmp_path / "dec")
    assert (man.dialect, man.dtype, man.opset) == ("decomposed", "fp16", 21)
    assert {s.dtype for s in man.outputs} == {"float16"}


def test_unknown_dialect_is_a_one_line_error(tiny, tmp_path, capsys):
    code, out, err = run(["optimize", str(tiny), "-o", str(tmp_path / "x"), "--dialect", "trtllm"], capsys)
    assert code == 1 and out == ""
    from decodekit.graphs.dialects import DIALECTS

    assert err.strip() == f"error: unknown dialect 'trtllm'; known dialects: {', '.join(DIALECTS)}"
    assert {"std", "ort-gqa", "ort-gqa-uniform", "decomposed"} <= set(DIALECTS)
    assert not (tmp_path / "x").exists()


def test_existing_output_needs_force(tiny, tmp_path, capsys):
    target = tmp_path / "std"
    assert run(["optimize", str(tiny), "-o", str(target), "--dialect", "std"], capsys)[0] == 0
    code, _, err = run(["optimize", str(tiny), "-o", str(target), "--dialect", "std"], capsys)
    assert code == 1 and "--force" in err
    assert run(["optimize", str(tiny), "-o", str(target), "--dialect", "ort-gqa", "--force"], capsys)[0] == 0
    assert read_manifest(target).dialect == "ort-gqa"


def test_missing_artifact_is_a_user_error(tmp_path, capsys):
    code, _, err = run(["optimize", str(tmp_path / "nope"), "-o", str(tmp_path / "o"), "--dialect", "std"], capsys)
    assert code == 1 and "decodekit export" in err
