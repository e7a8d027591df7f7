"""decodekit: autoregressive decoders -> ONNX (explicit KV cache, explicit collectives) -> ORT / TensorRT."""

__version__ = "0.1.0"
