"""Bad inputs a user tries, through the real `decodekit` command in a subprocess: ONE table.

Each row: the command line (run in the row's own empty folder, which is also ``{tmp}``; ``{tiny}`` is a shared
preset:tiny artifact), a fragment of the one stderr line it must print, the exit code (1 user error, 2 usage
error), and an optional setup that builds the row's inputs first. Every row also checks that stderr is exactly
one line (no traceback) and that the command left nothing on disk (the folder's listing, hidden files
included, is the same before and after; the shared artifact too).

To cover a new command or input: append a ``Case`` to CASES (and a setup function if it needs files).
Signals (SIGINT / SIGTERM mid-export), stale partial folders and the exit-code mapping are tested below the table.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import pytest

from helpers import edit_manifest

CLI = [sys.executable, "-m", "decodekit"]  # with the suite's PYTHONPATH: the code under test
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}


def decodekit(*args: str, cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, env=ENV, cwd=cwd, timeout=timeout)


def listing(root: Path) -> dict[str, int]:
    """Every path under root (hidden ones and links included) -> its size (-1 for folders and links)."""
    found = {}
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            p = Path(folder) / name
            found[str(p.relative_to(root))] = -1 if p.is_dir() or p.is_symlink() else p.stat().st_size
    return found


# ------------------------------------------------------------------------------------------------ setups
# setup(tmp, tiny): build the row's inputs inside tmp (the shared artifact `tiny` is read-only)

def random_onnx(tmp: Path, tiny: Path) -> None:
    import numpy as np

    (tmp / "random.onnx").write_bytes(np.random.default_rng(0).bytes(4096))


def truncated_onnx(tmp: Path, tiny: Path) -> None:
    data = (tiny / "rank0.onnx").read_bytes()
    (tmp / "half.onnx").write_bytes(data[: len(data) // 2])


def truncated_artifact(tmp: Path, tiny: Path) -> None:
    shutil.copytree(tiny, tmp / "art")
    os.truncate(tmp / "art" / "rank0.onnx", (tmp / "art" / "rank0.onnx").stat().st_size // 2)


def a_file(tmp: Path, tiny: Path) -> None:
    (tmp / "somefile").write_text("not a folder")


def non_empty(tmp: Path, tiny: Path) -> None:
    (tmp / "full").mkdir()
    (tmp / "full" / "thesis.txt").write_text("precious")


def nested_artifact(tmp: Path, tiny: Path) -> None:
    shutil.copytree(tiny, tmp / "outer" / "art")


def nested_checkpoint(tmp: Path, tiny: Path) -> None:
    (tmp / "outer" / "ckpt").mkdir(parents=True)
    (tmp / "outer" / "ckpt" / "config.json").write_text("{}")


def edited_layers(tmp: Path, tiny: Path) -> None:
    import json

    shutil.copytree(tiny, tmp / "art")
    d = json.loads((tmp / "art" / "manifest.json").read_text())
    d["config"]["num_layers"] += 1  # a hand edit: the manifest's checksum no longer matches
    (tmp / "art" / "manifest.json").write_text(json.dumps(d, indent=2))


def moved_source(tmp: Path, tiny: Path) -> None:
    shutil.copytree(tiny, tmp / "art")
    edit_manifest(tmp / "art", lambda d: d.update(source=str(tmp / "moved-checkpoint")))


def external_data(location: str, link: bool = False) -> Callable[[Path, Path], None]:
    """An artifact whose rank file stores its largest weight as external data at `location` ("{tmp}" expands),
    with the file and the manifest re-sealed so that the checksums pass: only the binding can refuse it.
    link: the location is a listed file inside the folder, but a symlink to a file outside it."""

    def setup(tmp: Path, tiny: Path) -> None:
        import onnx
        from onnx import external_data_helper

        from decodekit.export.manifest import file_entry

        art = tmp / "art"
        shutil.copytree(tiny, art)
        model = onnx.load(str(art / "rank0.onnx"))
        weight = max(model.graph.initializer, key=lambda t: len(t.raw_data))
        where = location.format(tmp=tmp)
        target = tmp / "outside.bin" if link else (art / where).resolve()
        target.write_bytes(weight.raw_data)
        if link:
            (art / where).symlink_to(os.path.relpath(target, art))
        external_data_helper.set_external_data(weight, where)
        weight.ClearField("raw_data")
        onnx.save(model, str(art / "rank0.onnx"))
        listed = [dataclasses.asdict(file_entry(art, where))] if link else []
        edit_manifest(art, lambda d: d["ranks"][0].update(onnx=dataclasses.asdict(file_entry(art, "rank0.onnx")),
                                                          external_data=listed))

    return setup


def hf_config_only(family: str, **edits) -> Callable[[Path, Path], None]:
    """A folder `ckpt` with just the config.json transformers writes for the test checkpoints of `family`, edited:
    the export refuses it before it looks for weights."""

    def setup(tmp: Path, tiny: Path) -> None:
        import json

        from helpers import hf_config

        (tmp / "ckpt").mkdir()
        (tmp / "ckpt" / "config.json").write_text(json.dumps({**hf_config(family).to_dict(), **edits}))

    return setup


def phi3_without_qkv(tmp: Path, tiny: Path) -> None:
    """A Phi-3 checkpoint whose fused q/k/v tensor of layer 1 is missing."""
    from safetensors.torch import load_file, save_file

    from helpers import build_hf_checkpoint

    build_hf_checkpoint("phi3", tmp / "ckpt")
    tensors = load_file(str(tmp / "ckpt" / "model.safetensors"))
    tensors.pop("model.layers.1.self_attn.qkv_proj.weight")
    save_file(tensors, str(tmp / "ckpt" / "model.safetensors"), metadata={"format": "pt"})


def phi3_gguf(tmp: Path, tiny: Path) -> None:
    import gguf

    w = gguf.GGUFWriter(str(tmp / "phi3.gguf"), "phi3")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def gemma2_fp16_std(tmp: Path, tiny: Path) -> None:
    """A Gemma 2 checkpoint (soft-capped attention) exported as an fp16 std artifact `g16`."""
    from decodekit.export.artifact import ExportOptions, export_artifact
    from helpers import build_hf_checkpoint

    export_artifact(str(build_hf_checkpoint("gemma2", tmp / "ck")), tmp / "g16",
                    ExportOptions(dtype="fp16", max_seq=32, max_batch=1))


# ------------------------------------------------------------------------------------------------ the table

@dataclasses.dataclass(frozen=True)
class Case:
    argv: str  # split on spaces after formatting {tmp} / {tiny}
    message: str  # fragment of the one stderr line
    code: int = 1
    setup: Callable[[Path, Path], None] | None = None


CASES: dict[str, Case] = {
    # inspect: files that are not what they claim
    "inspect a random .onnx": Case("inspect random.onnx", "not a readable ONNX file", setup=random_onnx),
    "inspect a truncated .onnx": Case("inspect half.onnx", "not a readable ONNX file", setup=truncated_onnx),
    "inspect a truncated artifact": Case("inspect art", "rank0.onnx does not match its manifest checksum",
                                         setup=truncated_artifact),
    "inspect a truncated artifact --no-verify": Case("inspect art --no-verify", "not a readable ONNX file",
                                                     setup=truncated_artifact),
    # where an artifact may be written: refused before any work
    "export -o . --force": Case("export preset:tiny -o . --force", "it is the current folder"),
    "export -o .. --force": Case("export preset:tiny -o .. --force", "it is the current folder or one of its parents"),
    "export -o FILE/sub": Case("export preset:tiny -o somefile/sub", "somefile is a file, not a folder",
                               setup=a_file),
    "export -o FILE --force": Case("export preset:tiny -o somefile --force", "--force replaces folders only",
                                   setup=a_file),
    "export -o a non-empty folder": Case("export preset:tiny -o full", "not empty; pass --force", setup=non_empty),
    "optimize -o FILE --force": Case("optimize {tiny} -o somefile --dialect ort-gqa --force", "somefile is a file",
                                     setup=a_file),
    "optimize --force over the folder holding the input": Case(
        "optimize outer/art -o outer --dialect ort-gqa --force", "it holds the input", setup=nested_artifact),
    "export --force over the folder holding the source": Case("export outer/ckpt -o outer --force",
                                                              "it holds the input outer/ckpt",
                                                              setup=nested_checkpoint),
    # external data must be a listed file inside the folder, whatever the checksums say
    "optimize: external data in ../": Case("optimize art -o opt --dialect ort-gqa",
                                           "reads external data from '../outside.bin'",
                                           setup=external_data("../outside.bin")),
    "inspect: external data in ../": Case("inspect art", "reads external data from '../outside.bin'",
                                          setup=external_data("../outside.bin")),
    "generate: external data at an absolute path": Case("generate art --ids 1,2",
                                                        "which is not a file of this artifact",
                                                        setup=external_data("{tmp}/absolute.bin")),
    "validate: external data through a link leaving the folder": Case(
        "validate art", "lies outside the artifact folder", setup=external_data("rank0.onnx.data", link=True)),
    # the manifest's own checksum
    "inspect an edited manifest": Case("inspect art", "manifest.json was edited or corrupted", setup=edited_layers),
    "generate with an edited manifest": Case("generate art --ids 1,2", "re-export with `decodekit export preset:tiny",
                                             setup=edited_layers),
    # the torch reference is rebuilt from the manifest's source: the hint names the CLI flag
    "validate an artifact whose source moved": Case("validate art", "`decodekit validate --reference-source SOURCE`",
                                                    setup=moved_source),
    "validate --mode judge against transformers": Case("validate {tiny} --backends ort --reference transformers "
                                                       "--mode judge", "use --reference decodekit"),
    # RoPE and the Phi-3 family (export/rope_fields.py, export/config_phi3.py): refused before any weight is read
    "export: a rope_type the family's config refuses": Case(
        "export ckpt -o out", "rope_parameters.rope_type='dynamic' is not supported; supported: 'default', 'longrope'",
        setup=hf_config_only("phi3", rope_parameters={"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4})),
    "export: longrope factors for another rotary dimension": Case(
        "export ckpt -o out", "rope_parameters.short_factor has 3 values; the rotary dimension 8 needs 4",
        setup=hf_config_only("phi3", rope_parameters={"rope_type": "longrope", "short_factor": [1.0] * 3,
                                                       "long_factor": [1.0] * 4})),
    "export: yarn beyond max_position_embeddings": Case(
        "export ckpt -o out --max-seq 1024", "--max-seq 1024 exceeds the model's max_position_embeddings 512",
        setup=hf_config_only("llama", rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e4})),
    "export: a Phi-3 checkpoint without a fused tensor": Case(  # --json: no progress lines before the refusal
        "export ckpt -o out --json", "missing 1 tensors (e.g. model.layers.1.self_attn.qkv_proj.weight)",
        setup=phi3_without_qkv),
    "export: a Phi-3 GGUF": Case("export phi3.gguf -o out", "GGUF architecture 'phi3' is not supported",
                                 setup=phi3_gguf),
    # model families: what decodekit does not compute is refused by name, before any weight is read
    "export Gemma 3's multimodal checkpoint": Case(
        "export ckpt -o out", "unsupported architecture ('Gemma3ForConditionalGeneration',)",
        setup=hf_config_only("gemma3_text", architectures=["Gemma3ForConditionalGeneration"], model_type="gemma3")),
    "export Gemma 2 with bidirectional attention": Case(
        "export ckpt -o out", "use_bidirectional_attention=True is not supported (bidirectional attention)",
        setup=hf_config_only("gemma2", use_bidirectional_attention=True)),
    "export Gemma 3 with a scaled local RoPE": Case(
        "export ckpt -o out", "rope_parameters.sliding_attention.rope_type='linear' is not supported",
        setup=hf_config_only("gemma3_text", rope_parameters={
            "full_attention": {"rope_type": "default", "rope_theta": 1e6},
            "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}})),
    # TensorRT's ATTENTION layer has no soft cap: the build names the dialect that avoids it
    "build Gemma 2 from std": Case("build g16 -o e --json", "--dialect trt", setup=gemma2_fp16_std),
    # usage errors: click's exit code 2, still one line
    "an unknown option": Case("export preset:tiny -o out --bogus", "No such option", code=2),
    "a bad choice": Case("generate {tiny} --backend onnx --ids 1,2", "Invalid value for '--backend'", code=2),
    "an unknown command": Case("exprot preset:tiny", "No such command", code=2),
}


@pytest.fixture(scope="module")
def tiny(exported) -> Path:
    return exported("preset:tiny", max_seq=32, max_batch=2)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name: str, tiny: Path, tmp_path: Path) -> None:
    case = CASES[name]
    if case.setup is not None:
        case.setup(tmp_path, tiny)
    before, shared = listing(tmp_path), listing(tiny)
    p = decodekit(*case.argv.format(tmp=tmp_path, tiny=tiny).split(" "), cwd=tmp_path)
    lines = p.stderr.splitlines()
    assert p.returncode == case.code and len(lines) == 1, f"{name}: rc={p.returncode}\n{p.stderr}"
    assert case.message in lines[0], lines[0]
    assert listing(tmp_path) == before and listing(tiny) == shared


def test_inspect_prints_what_verification_found_then_fails(tiny: Path, tmp_path: Path) -> None:
    import json

    external_data("../outside.bin")(tmp_path, tiny)
    p = decodekit("inspect", "art", "--json", cwd=tmp_path)
    assert p.returncode == 1 and len(p.stderr.splitlines()) == 1, p.stderr
    v = json.loads(p.stdout)["verification"]
    assert v["checked"] and v["passed"] is False and "'../outside.bin'" in v["error"] and v["error"] in p.stderr
    p = decodekit("inspect", "art", "--no-verify", cwd=tmp_path)  # skipped on request: the report, exit 0
    assert p.returncode == 0 and "verification: skipped (--no-verify)" in p.stdout, p.stderr


# ------------------------------------------------------------------------------------------------ signals

def _wait_for(found: Callable[[], list[Path]], proc: subprocess.Popen, timeout: float = 120) -> list[Path]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        if hits := found():
            return hits
        time.sleep(0.02)
    proc.kill()
    raise AssertionError(f"no partial folder appeared (exit {proc.poll()}): {proc.communicate()[1]}")


@pytest.mark.parametrize("sig, code, said", [(signal.SIGINT, 130, "interrupted (SIGINT)"),
                                             (signal.SIGTERM, 143, "terminated (signal 15)")],
                         ids=["SIGINT", "SIGTERM"])
def test_signal_mid_export_leaves_nothing(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory, sig: int,
                                         code: int, said: str) -> None:
    """The export made two parent folders and its partial folder; the signal removes all three."""
    out = tmp_path / "made" / "for it" / "out"
    # an empty trace cache (export/trace_cache.py): the export traces for seconds, so the signal lands mid-export
    env = {**ENV, "DECODEKIT_CACHE_DIR": str(tmp_path_factory.mktemp("cold-cache"))}
    # a background job of a non-interactive shell inherits SIGINT ignored: give the command Python's default
    proc = subprocess.Popen([*CLI, "export", "preset:tiny", "-o", str(out), "--max-seq", "32"], cwd=tmp_path,
                            env=env, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    _wait_for(lambda: list(out.parent.glob(".out.partial-*")) if out.parent.is_dir() else [], proc)
    proc.send_signal(sig)
    err = proc.communicate(timeout=120)[1]
    assert proc.returncode == code, err
    assert [line for line in err.splitlines() if not line.startswith("[export]")] == \
        [f"{said}; nothing half-written was kept"], err
    assert listing(tmp_path) == {}


def test_stale_partials_removed_and_force_leaves_no_old(tiny: Path, tmp_path: Path) -> None:
    """A partial / replaced folder of a dead process is removed by the next write to the same OUT; one of a live
    process is not; --force over an existing folder leaves only the new folder (optimize and export share
    export/folders.py's atomic_folder; optimize is the quicker to run)."""
    dead = subprocess.Popen(["true"])
    dead.wait()
    for stale in (f".out.partial-{dead.pid}", f".out.old-{dead.pid}"):
        (tmp_path / stale).mkdir()
        (tmp_path / stale / "rank0.onnx").write_bytes(b"x" * 1000)
    live = tmp_path / f".out.partial-{os.getpid()}"  # this test's own process: alive
    live.mkdir()
    for dialect, force in (("std", []), ("ort-gqa", ["--force"])):
        p = decodekit("optimize", str(tiny), "-o", "out", "--dialect", dialect, *force, cwd=tmp_path)
        assert p.returncode == 0, p.stderr
        assert sorted(x.name for x in tmp_path.iterdir()) == [live.name, "out"]
    assert '"dialect": "ort-gqa"' in (tmp_path / "out" / "manifest.json").read_text()


# ------------------------------------------------------------------------------------------------ one error home

def _error_types() -> list[type[BaseException]]:
    from decodekit import errors

    return [t for t in vars(errors).values() if isinstance(t, type) and issubclass(t, errors.DecodekitError)]


def test_every_error_type_lives_in_errors_py() -> None:
    """No module of the package defines an exception class of its own: errors.py is the one home."""
    import ast

    import decodekit

    root = Path(decodekit.__file__).parent
    elsewhere = []
    # the package's own folders only: the checkout root may also hold a .venv, build outputs, benchmarks/
    folders = ("export", "graphs", "runtime", "tools")
    sources = [*root.glob("*.py"), *(p for d in folders for p in (root / d).rglob("*.py"))]
    for path in sources:
        if path.name == "errors.py" and path.parent == root:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ClassDef) and any(
                    (ast.unparse(b).endswith(("Error", "Exception", "Interrupt"))) for b in node.bases):
                elsewhere.append(f"{path.relative_to(root)}:{node.lineno} {node.name}")
    assert elsewhere == []
    names = {t.__name__ for t in _error_types()}
    assert {"ConfigError", "CheckpointError", "ArtifactError", "BackendError", "GenerationError", "PartitionError",
            "UserError", "DialectError", "ValidationError", "TpError", "EngineBuildError"} <= names


def _raising(exc: BaseException):
    import click

    @click.command("boom")
    def boom() -> None:
        raise exc

    return boom


@pytest.mark.parametrize("exc, code", [*[(t("what went wrong\nand what to do"), 1) for t in _error_types()],
                                       (KeyboardInterrupt(), 130)],
                         ids=[*[t.__name__ for t in _error_types()], "KeyboardInterrupt"])
def test_cli_turns_each_error_into_one_line(exc: BaseException, code: int, monkeypatch, capsys) -> None:
    from decodekit.tools import cli

    monkeypatch.setattr(cli.LazyGroup, "list_commands", lambda self, ctx: ["boom"])
    monkeypatch.setattr(cli.LazyGroup, "get_command", lambda self, ctx, name: _raising(exc))
    assert cli.run(["boom"]) == code
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and ("what went wrong | and what to do" in err or code == 130), err


def test_cli_sigterm_exit_code_and_bugs_keep_tracebacks(monkeypatch, capsys) -> None:
    from decodekit.errors import Interrupted
    from decodekit.tools import cli

    monkeypatch.setattr(cli.LazyGroup, "list_commands", lambda self, ctx: ["boom"])
    monkeypatch.setattr(cli.LazyGroup, "get_command", lambda self, ctx, name: _raising(Interrupted(signal.SIGTERM)))
    assert cli.run(["boom"]) == 143
    assert capsys.readouterr().err == "terminated (signal 15); nothing half-written was kept\n"
    monkeypatch.setattr(cli.LazyGroup, "get_command", lambda self, ctx, name: _raising(RuntimeError("bug")))
    with pytest.raises(RuntimeError, match="bug"):  # not a user error: a bug keeps its traceback
        cli.run(["boom"])


def test_bare_command_shows_help_with_usage_exit_code(tmp_path: Path) -> None:
    p = decodekit(cwd=tmp_path)
    assert p.returncode == 2 and p.stderr.startswith("Usage: decodekit") and "Commands:" in p.stderr, p.stderr
