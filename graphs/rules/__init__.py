"""onnxscript rewrite rules (pattern / check / rewrite), one concept per file.

Fusions (decomposed -> std ops), decompositions (std ops -> opset-21 ops) and lowerings (std -> ORT contrib
ops) are all expressed as rules; ``apply.apply_rules`` runs them and reports per-rule counts and, in debug
mode, why each rule did not match where it came closest.
"""
