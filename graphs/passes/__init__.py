"""Graph passes, one per file, each an onnx_ir in-place pass (requires / call / ensures) that leaves a report.

Every pass returns ``onnx_ir.passes.PassResult(model, modified)`` and stores a ``PassReport`` (counts of what
it did, and in debug mode why its rewrite rules did not match) on ``pass_.report``.
"""
