"""The trace template (export/template.py): real shapes of rank 0, weight memory never written nor resident, and
fingerprints that still tell every weight apart (bind_weights binds each parameter once)."""

from __future__ import annotations

import pytest
import torch

from decodekit.export.config import preset
from decodekit.export.template import ENDS, SMALL_BYTES, template_model
from decodekit.export.trace import trace
from decodekit.export.weights import bind_weights


def _resident_bytes() -> int:
    """This process's resident set (/proc/self/statm: pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.parametrize("tp", [1, 2])
def test_large_weights_are_zero_pages_except_their_fingerprints(tp):
    config = preset("llama-156m")
    template_model(preset("tiny"), 1, "fp32", 64, tp)  # first-call work of torch (kernels, caches) out of the way
    before = _resident_bytes()
    model = template_model(config, 3, "fp32", 64, tp)
    grown = _resident_bytes() - before
    assert model.layers[0].attn.q_proj.weight.shape == (config.q_size // tp, config.hidden_size)
    large = [(n, p) for n, p in model.named_parameters() if p.numel() * p.element_size() >= SMALL_BYTES]
    assert {n for n, _ in large} >= {"embed.weight", "layers.0.ffn.down_proj.weight"}
    assert grown < 0.05 * sum(p.numel() * p.element_size() for _, p in large)
    for name, p in large:
        assert int(torch.count_nonzero(p)) <= 4 * ENDS, name  # reads map the zero page: still not resident
    assert _resident_bytes() - before == pytest.approx(grown, abs=16 << 20)


def test_every_template_weight_binds_once():
    config = preset("llama-156m")
    model = template_model(config, 1, "fp32", 64, 1)
    program = trace(model, 2, 64, "all")
    refs = bind_weights(program.model, model)
    params = {n for n, _ in model.named_parameters()}
    assert {r.param for r in refs} == params
    assert len({r.name for r in refs}) == len(refs)
