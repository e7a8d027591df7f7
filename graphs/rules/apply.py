"""Run rewrite rules one by one, counting applications and (debug) collecting why rules did not match."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import onnx_ir as ir
from onnxscript.rewriter import MatchingTracer, MatchStatus, RewriteRule, RewriteRuleSet

MAX_REASONS = 8  # per rule, in debug mode


@dataclass(frozen=True)
class RuleOutcome:
    counts: dict[str, int]  # rule name -> applications
    why_not: dict[str, list[str]] = field(default_factory=dict)  # rule name -> failure reasons (debug only)


def apply_rules(model: ir.Model, rules: Sequence[RewriteRule], debug: bool = False) -> RuleOutcome:
    """Apply each rule over the whole graph in order; a rule sees the graph the previous rules left."""
    counts: dict[str, int] = {}
    for rule in rules:  # variants of one fusion share a name: their counts add up
        counts[rule.name] = counts.get(rule.name, 0) + RewriteRuleSet([rule]).apply_to_model(model)
    return RuleOutcome(counts, why_not(model, rules) if debug else {})


def why_not(model: ir.Model, rules: Sequence[RewriteRule]) -> dict[str, list[str]]:
    """For each rule, the reasons of its best partial matches that remain in the graph (nothing is changed)."""
    tracer = MatchingTracer()
    RewriteRuleSet(list(rules)).apply_to_model(model, tracer=tracer)
    reasons: dict[str, list[str]] = {}
    for rule, infos in tracer.best_matches_map.items():
        lines = reasons.get(rule.name, [])
        for info in infos:
            if info.status == MatchStatus.SUCCESS:
                continue
            node = info.root_node
            reason = info.match_result.reason or "pattern did not match"
            kind = "check failed" if info.status == MatchStatus.CONDITION_FAILED else info.status.name.lower()
            matched = len(info.match_result.nodes)
            lines.append(f"at {node.op_type} {node.name!r}: {kind} after {matched} matched node(s): {reason}")
        if lines:
            reasons[rule.name] = sorted(set(lines))[:MAX_REASONS]
    return reasons
