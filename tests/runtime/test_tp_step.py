"""The tensor-parallel decode step exchanges one device tensor per step; host control messages go once per request.

Real ranks (gloo, CPU): rank 0 runs two requests through ``runtime.generate`` on one backend (64 and 8 new
tokens); each rank reports its counts of host control messages and of [5, B] step messages.
"""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

from decodekit.runtime.generate import generate_ids
from decodekit.runtime.launch import launch
from decodekit.runtime.ort_backend import OrtBackend

PROMPT = [1, 17, 42, 99, 7]
WORKER = textwrap.dedent("""
    import json, sys
    from decodekit.runtime.generate import generate_ids
    from decodekit.runtime.launch import close_group, init_group
    from decodekit.runtime.tp_ort import TpOrtBackend

    artifact, out = sys.argv[1], sys.argv[2]
    group = init_group("cpu", timeout_s=60)
    backend = TpOrtBackend(artifact, group=group, intra_op_threads=1)
    tokens = None
    if group.rank:
        steps = backend.serve()
    else:
        tokens = [generate_ids(backend, [%r], n, eos_ids=())[0] for n in (64, 8)]
        backend.close()
        steps = group.stats.steps
    s = group.stats
    with open(f"{out}.{group.rank}.json", "w") as f:
        json.dump({"tokens": tokens, "control": s.control_messages, "step_messages": s.step_broadcasts,
                   "steps": steps}, f)
    close_group()
""" % PROMPT)


def test_one_device_message_per_step_and_a_few_control_messages(tp1: Path, tp2: Path, tmp_path: Path) -> None:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / "r"
    result = launch([sys.executable, str(script), str(tp2), str(out)], 2, log=lambda m: None)
    assert result.returncode == 0, result.message
    rank0, rank1 = (json.loads(Path(f"{out}.{r}.json").read_text()) for r in range(2))
    with OrtBackend(tp1, intra_op_threads=1) as b:
        assert rank0["tokens"] == [generate_ids(b, [PROMPT], n, eos_ids=())[0] for n in (64, 8)]
    # per request: allocate + prefill; then stop: 5 host messages for 64 + 8 tokens, not one per token
    assert rank0["control"] == 5
    decode_steps = 63 + 7  # the first token of each request comes from its prefill
    # one [5, B] device message per decode step, plus one "leave the decode loop" per request
    assert rank0["step_messages"] == rank1["step_messages"] == decode_steps + 2
    assert rank0["steps"] == rank1["steps"] == decode_steps + 2  # + the two prefills
