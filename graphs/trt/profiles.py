"""Optimization profiles: which input shapes an engine accepts, and which profile serves which step.

The graph has two dynamic dims, named by the exporter: ``batch`` (1..max_batch) and ``seq`` (1..max_seq);
the KV caches are static in their other dims ([batch, kv_heads, max_seq, head_dim]). Two profiles by default:

    decode   batch 1..max_batch, seq 1         (every generated token: fixed shapes, CUDA-graph friendly)
    prefill  batch 1..max_batch, seq 1..max_seq (the prompt; opt at opt_seq)

or one profile covering both ("single"). The runtime picks by seq (``profile_for``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Sequence

from ...export.config import ConfigError
from ...export.manifest import TensorSpec

DYNAMIC_DIMS = ("batch", "seq")
PROFILE_SETS = ("split", "single")


@dataclass(frozen=True)
class Profile:
    name: str  # "decode" | "prefill" | "any"
    batch: tuple[int, int, int]  # min, opt, max
    seq: tuple[int, int, int]

    def dims(self) -> dict[str, tuple[int, int, int]]:
        return {"batch": self.batch, "seq": self.seq}

    def to_json(self, index: int) -> dict[str, Any]:
        return {"index": index, **{k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}}


def plan_profiles(max_batch: int, max_seq: int, opt_seq: int, opt_batch: int = 1, kind: str = "split") -> list[Profile]:
    """The profiles to build, in engine order (a profile's index is its position)."""
    if kind not in PROFILE_SETS:
        raise ConfigError(f"unknown profile set {kind!r}; use one of {', '.join(PROFILE_SETS)}")
    if not 1 <= opt_seq <= max_seq:
        raise ConfigError(f"--opt-seq must lie in 1..{max_seq} (the artifact's max_seq), got {opt_seq}")
    if not 1 <= opt_batch <= max_batch:
        raise ConfigError(f"--opt-batch must lie in 1..{max_batch} (the max batch), got {opt_batch}")
    batch = (1, opt_batch, max_batch)
    prefill = Profile("prefill" if kind == "split" else "any", batch, (1, opt_seq, max_seq))
    return [Profile("decode", batch, (1, 1, 1)), prefill] if kind == "split" else [prefill]


def input_shapes(profile: Profile, name: str, network_shape: Sequence[int], spec: TensorSpec | None
                 ) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(min, opt, max) of one network input: dynamic dims (-1) take the profile's range by the manifest's dim name."""
    ranges = profile.dims()
    triples = []
    for axis, size in enumerate(network_shape):
        if size >= 0:
            triples.append((size, size, size))
            continue
        dim = spec.shape[axis] if spec is not None and axis < len(spec.shape) else None
        if dim not in ranges:
            raise ConfigError(f"input {name!r} axis {axis} is dynamic ({dim!r}) but only {', '.join(DYNAMIC_DIMS)} "
                              f"may be; re-export the artifact with `decodekit export`")
        triples.append(ranges[dim])
    lo, mid, hi = zip(*triples) if triples else ((), (), ())
    return tuple(lo), tuple(mid), tuple(hi)


def add_profiles(builder: Any, config: Any, network: Any, specs: Sequence[TensorSpec], profiles: Sequence[Profile]
                 ) -> None:
    """Add each profile to the builder config, in order (TensorRT API, same in both flavours)."""
    by_name = {s.name: s for s in specs}
    for expected, profile in enumerate(profiles):
        p = builder.create_optimization_profile()
        for i in range(network.num_inputs):
            t = network.get_input(i)
            p.set_shape(t.name, *input_shapes(profile, t.name, tuple(t.shape), by_name.get(t.name)))
        index = config.add_optimization_profile(p)
        if index != expected:
            raise ConfigError(f"TensorRT refused the {profile.name} optimization profile {profile}")


def profile_for(profiles: Sequence[dict[str, Any]], batch: int, seq: int) -> dict[str, Any]:
    """The recorded profile (manifest engines["profiles"]) that serves a step of [batch, seq]; decode first."""
    for p in sorted(profiles, key=lambda p: p["name"] != "decode"):
        if p["batch"][0] <= batch <= p["batch"][2] and p["seq"][0] <= seq <= p["seq"][2]:
            return p
    raise ConfigError(f"no optimization profile serves batch {batch} x seq {seq}; the engine covers "
                      + ", ".join(f"{p['name']} batch {p['batch'][0]}..{p['batch'][2]} seq {p['seq'][0]}.."
                                  f"{p['seq'][2]}" for p in profiles))
