"""The Phi-3 family (Phi3ForCausalLM: Phi-3-mini / -medium, Phi-3.5-mini, Phi-4-mini): its config.json fields.

The architecture is Llama's, with q/k/v stored as one ``qkv_proj`` and gate/up as one ``gate_up_proj`` (split at
load: export/checkpoint.py ``fused_tensors``), rotary embedding on the first int(head_dim * partial_rotary_factor)
dimensions of each head (Phi-4-mini: 0.75), and RoPE default or longrope: transformers' Phi3Config reads "su" and
"yarn" as longrope and takes original_max_position_embeddings from its own top-level field (default 4096).
"""

from __future__ import annotations

from functools import partial

from . import config_fields as cf
from .rope_fields import RopeRules, read_rope

PHI3_ROPE = RopeRules(types=("default", "longrope"), aliases={"su": "longrope", "yarn": "longrope"},
                      original_max_field=4096, partial_rotary=True)

PHI3: tuple[cf.Rule, ...] = tuple(r for r in cf.COMMON if r not in (cf.ROPE, cf.NO_PARTIAL_ROTARY)) + (
    cf.Derived(PHI3_ROPE.keys, partial(read_rope, rules=PHI3_ROPE)),
    cf.Derived(("sliding_window",), cf.read_mistral_window),
    cf.Ignored(("resid_pdrop", "embd_pdrop"), "dropout probabilities: training-only"),
)
