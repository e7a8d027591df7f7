"""The real `decodekit` commands as subprocesses on preset:tiny: export -> optimize -> build -> generate -> validate
-> inspect with --json parsed, and the bad inputs a new user tries, each answered with one stderr line and exit 1."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

HAS_TRT = any(importlib.util.find_spec(m) is not None for m in ("tensorrt_rtx", "tensorrt"))
ENV = {**os.environ, "PYTHONWARNINGS": "ignore"}
# the installed console script (what users run); next to this interpreter in a venv
EXE = str(Path(sys.executable).with_name("decodekit")) if Path(sys.executable).with_name("decodekit").is_file() \
    else shutil.which("decodekit") or "decodekit"


def decodekit(*args: str | Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([EXE, *map(str, args)], capture_output=True, text=True, env=ENV, timeout=timeout)


def ok_json(*args: str | Path) -> dict:
    p = decodekit(*args, "--json")
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def tiny(work: Path) -> tuple[Path, dict]:
    manifest = ok_json("export", "preset:tiny", "-o", work / "tiny", "--max-seq", "64", "--max-batch", "4")
    return work / "tiny", manifest


@pytest.fixture(scope="module")
def gqa(tiny: tuple[Path, dict], work: Path) -> tuple[Path, dict]:
    report = ok_json("optimize", tiny[0], "-o", work / "gqa", "--dialect", "ort-gqa")
    return work / "gqa", report


@pytest.fixture(scope="module")
def engine(tiny: tuple[Path, dict], work: Path) -> tuple[Path, dict]:
    if not HAS_TRT:
        pytest.skip("neither tensorrt nor tensorrt_rtx is installed")
    manifest = ok_json("build", tiny[0], "-o", work / "trt", "--opt-seq", "16", "--max-batch", "2")
    return work / "trt", manifest


def test_export(tiny: tuple[Path, dict]) -> None:
    folder, m = tiny
    assert m["format"] == "decodekit-artifact" and m["dialect"] == "std" and m["tp"] == 1 and m["max_seq"] == 64
    assert [i["name"] for i in m["inputs"]][:4] == ["input_ids", "position_ids", "write_indices", "nonpad_kv_seqlen"]
    assert (folder / m["ranks"][0]["onnx"]["file"]).is_file() and (folder / "tokenizer.json").is_file()


def test_optimize(gqa: tuple[Path, dict]) -> None:
    folder, report = gqa
    assert report["dialect"] == "ort-gqa" and report["counts"]["lower-ort-gqa"]["GroupQueryAttention"] == 2
    assert json.loads((folder / "manifest.json").read_text())["dialect"] == "ort-gqa"


def test_build(engine: tuple[Path, dict]) -> None:
    folder, m = engine
    assert m["ranks"][0]["engine"]["file"] == "rank0.engine" and (folder / "rank0.engine").stat().st_size > 0
    assert m["engines"]["layer_types"]["KV_CACHE_UPDATE"] == 4 and (folder / "build.log").is_file()


def test_generate_text_and_ids(tiny: tuple[Path, dict]) -> None:
    ort = ok_json("generate", tiny[0], "--prompt", "Hello world", "--max-new-tokens", "8")
    assert len(ort["tokens"]) == 1 and 1 <= len(ort["tokens"][0]) <= 8 and isinstance(ort["text"][0], str)
    ref = ok_json("generate", tiny[0], "--ids", "5,6,7,8", "--max-new-tokens", "6", "--backend", "torch")
    assert len(ref["tokens"][0]) <= 6 and ref["text"] and ref["finish_reasons"][0] in ("eos", "length")


def test_validate_three_backends(tiny: tuple[Path, dict], gqa: tuple[Path, dict], work: Path) -> None:
    save = ["--save-results", work / "results.json"] if importlib.util.find_spec("polygraphy") else []
    doc = ok_json("validate", tiny[0], "--backends", f"torch,ort,ort@{gqa[0]}", "--steps", "4", *save)
    assert doc["passed"] is True and doc["reference"] == "torch"
    assert [c["backend"] for c in doc["comparisons"]] == ["ort", "ort@gqa"]
    for c in doc["comparisons"]:
        assert c["passed"] and c["summary"]["max_abs"] <= 1e-4 and c["greedy"]["match"] and len(c["steps"]) == 5
    assert not save or (work / "results.json").is_file()


def test_inspect(tiny: tuple[Path, dict], gqa: tuple[Path, dict]) -> None:
    r = ok_json("inspect", tiny[0])
    assert r["kind"] == "artifact" and r["ranks"][0]["parameters"] == r["manifest"]["config_parameters"]
    assert r["kv_cache"]["bytes_per_rank"] == 2 * 2 * 4 * 2 * 64 * 16 * 4
    g = ok_json("inspect", gqa[0])
    assert g["manifest"]["dialect"] == "ort-gqa" and g["ranks"][0]["ops"]["com.microsoft::GroupQueryAttention"] == 2


def test_inspect_engine(engine: tuple[Path, dict]) -> None:
    r = ok_json("inspect", engine[0] / "rank0.engine")
    (e,) = r["engines"]
    assert r["kind"] == "engine" and e["layers"] > 0 and e["source"] in ("engine inspector", "build.log")
    assert e["network_layer_types"]["KV_CACHE_UPDATE"] == 4


# ------------------------------------------------------------------------------------------------ bad inputs

@pytest.fixture(scope="module")
def bad(tiny: tuple[Path, dict], work: Path) -> dict[str, Path]:
    root = work / "bad"
    (root / "plain").mkdir(parents=True)
    (root / "plain" / "model.onnx").write_bytes(b"not an artifact")
    shutil.copytree(tiny[0], root / "tampered")
    onnx_file = root / "tampered" / "rank0.onnx"
    data = bytearray(onnx_file.read_bytes())
    data[len(data) // 2] ^= 0x01  # one byte changed
    onnx_file.write_bytes(bytes(data))
    shutil.copytree(tiny[0], root / "old")
    manifest = json.loads((root / "old" / "manifest.json").read_text())
    manifest["format_version"] = 99
    (root / "old" / "manifest.json").write_text(json.dumps(manifest))
    (root / "mine").mkdir()
    (root / "mine" / "thesis.txt").write_text("precious")
    return {"tiny": tiny[0], "missing": root / "missing", "plain": root / "plain", "tampered": root / "tampered",
            "old": root / "old", "mine": root / "mine", "out": root / "out"}


LONG = ",".join(["5"] * 70)
CASES = {
    "export a missing folder": (["export", "{missing}", "-o", "{out}"], "not a folder"),
    "generate a missing artifact": (["generate", "{missing}", "--ids", "1,2"], "no such artifact folder"),
    "inspect a missing path": (["inspect", "{missing}"], "no such file or folder"),
    "validate a non-artifact folder": (["validate", "{plain}"], "not a decodekit artifact"),
    "generate a tampered artifact": (["generate", "{tampered}", "--ids", "1,2"], "checksum"),
    "validate a tampered artifact": (["validate", "{tampered}"], "checksum"),
    "inspect a manifest of another version": (["inspect", "{old}"], "format version 99"),
    "generate a prompt longer than max_seq": (["generate", "{tiny}", "--ids", LONG, "--max-new-tokens", "4"],
                                              "max_seq"),
    "validate a prompt longer than max_seq": (["validate", "{tiny}", "--prompt", "Hello world " * 40], "max_seq"),
    "validate an unknown backend": (["validate", "{tiny}", "--backends", "torch,onnx"], "unknown backend"),
    "optimize to an unknown dialect": (["optimize", "{tiny}", "-o", "{out}", "--dialect", "fast"], "unknown dialect"),
    "demo into a folder it did not make": (["demo", "--workdir", "{mine}"], "not made by `decodekit demo`"),
    "build a missing artifact": (["build", "{missing}", "-o", "{out}"], "no such artifact folder"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_line_and_exit_1(case: str, bad: dict[str, Path]) -> None:
    args, expected = CASES[case]
    p = decodekit(*[a.format(**bad) for a in args])
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 1 and len(lines) == 1, f"{case}: rc={p.returncode}\n{p.stderr}"
    assert expected in lines[0], lines[0]
    assert not (bad["out"]).exists() and (bad["mine"] / "thesis.txt").is_file()


def test_unknown_backend_choice_is_one_line(bad: dict[str, Path]) -> None:
    p = decodekit("generate", bad["tiny"], "--backend", "onnx", "--ids", "1,2")
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1, p.stderr  # a usage error: click's 2


@pytest.mark.slow
def test_demo(work: Path) -> None:
    wd = work / "demo"
    p = decodekit("demo", "--workdir", wd, "--model", "tiny", "--steps", "2", "--max-new-tokens", "6", "--json",
                  timeout=600)
    assert p.returncode == 0, p.stderr
    doc = json.loads(p.stdout)
    assert doc["passed"] and len(doc["tokens"]) <= 6 and isinstance(doc["text"], str)
    stages = {s["name"].split()[0]: s["status"] for s in doc["stages"]}
    assert stages == {"export": "ok", "optimize": "ok", "build": "ok" if HAS_TRT else "skipped", "generate": "ok",
                      "chat": "skipped", "validate": "ok"}
    assert [c["backend"] for c in doc["validation"]["comparisons"]] == ["ort", "ort@tiny-ort-gqa"]
    assert "[demo] 6/6 validate" in p.stderr and (wd / "tiny" / "manifest.json").is_file()


def test_demo_replaces_only_its_own_workdir(tmp_path: Path) -> None:
    from decodekit.tools.cli import UserError
    from decodekit.tools.demo_cmd import MARKER, prepare_workdir

    prepare_workdir(tmp_path / "w")
    (tmp_path / "w" / "old-artifact").mkdir()
    prepare_workdir(tmp_path / "w")  # made by the demo: replaced
    assert (tmp_path / "w" / MARKER).is_file() and not (tmp_path / "w" / "old-artifact").exists()
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="not made by"):
        prepare_workdir(tmp_path / "other")
    assert (tmp_path / "other" / "keep.txt").is_file()
