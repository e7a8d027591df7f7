"""`decodekit generate` as a real subprocess on a preset:tiny artifact (which ships a tokenizer.json)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from decodekit.runtime.backend import load_backend
from decodekit.runtime.generate import generate_ids
from decodekit.runtime.pipeline import generate_text
from helpers import edit_manifest

DECODEKIT = Path(sys.executable).with_name("decodekit")


@pytest.fixture(scope="module")
def tiny(exported) -> Path:
    return exported("preset:tiny", max_seq=64, max_batch=4)


def decodekit(*args: str) -> subprocess.CompletedProcess:
    if not DECODEKIT.is_file():
        pytest.skip(f"no decodekit console script next to {sys.executable}; pip install -e .")
    return subprocess.run([str(DECODEKIT), "generate", *args], capture_output=True, text=True, timeout=120)


def assert_user_error(proc: subprocess.CompletedProcess, *needles: str) -> None:
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got:\n{proc.stderr}"
    assert lines[0].startswith("error: ") and all(n in lines[0] for n in needles), lines[0]
    assert proc.stdout == ""


def test_prompt_json(tiny):
    proc = decodekit(str(tiny), "--prompt", "Hello world", "--prompt", "The decoder reads", "--max-new-tokens", "8",
                     "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)  # exactly one JSON document on stdout
    assert set(doc) == {"tokens", "text", "finish_reasons"}
    expected = generate_text(tiny, ["Hello world", "The decoder reads"], max_new_tokens=8)
    assert doc["tokens"] == expected.output_ids and [len(t) for t in doc["tokens"]] == [8, 8]
    assert doc["text"] == expected.text and doc["finish_reasons"] == ["length", "length"]


def test_ids_json_and_streamed_text(tiny):
    proc = decodekit(str(tiny), "--ids", "1,318,422", "--max-new-tokens", "6", "--json")
    assert proc.returncode == 0, proc.stderr
    with load_backend("ort", tiny) as backend:
        expected = generate_ids(backend, [[1, 318, 422]], 6)
    assert json.loads(proc.stdout)["tokens"] == expected
    streamed = decodekit(str(tiny), "--ids", "1,318,422", "--max-new-tokens", "6")
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == json.loads(proc.stdout)["text"][0] + "\n"


def test_missing_artifact_is_one_line(tmp_path):
    assert_user_error(decodekit(str(tmp_path / "nope"), "--ids", "1,2"), "no such artifact folder")


def test_prompt_longer_than_max_seq_is_one_line(tiny):
    assert_user_error(decodekit(str(tiny), "--prompt", "Hello world " * 40, "--max-new-tokens", "4"),
                      "exceeds the artifact's max_seq 64", "--max-seq")


def test_bad_ids_and_prompt_without_tokenizer(tiny, tmp_path):
    assert_user_error(decodekit(str(tiny), "--ids", "1,x"), "comma-separated integers")
    assert_user_error(decodekit(str(tiny)), "--prompt", "--ids")
    bare = tmp_path / "bare"
    shutil.copytree(tiny, bare)
    edit_manifest(bare, lambda m: m.update(tokenizer=[]))
    assert_user_error(decodekit(str(bare), "--prompt", "Hello"), "no tokenizer", "--ids")
    proc = decodekit(str(bare), "--ids", "1,2,3", "--max-new-tokens", "3", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["text"] == [None] and len(doc["tokens"][0]) == 3


def test_cuda_graph_flags_are_one_line_errors(tiny):
    assert_user_error(decodekit(str(tiny), "--ids", "1,2", "--cuda-graph"), "--backend ort --device cuda only")
    # the std dialect reads lengths on the host: a graph is refused before any GPU is needed
    assert_user_error(decodekit(str(tiny), "--ids", "1,2", "--device", "cuda", "--cuda-graph"),
                      "stale lengths", "--dialect ort-gqa-static")
