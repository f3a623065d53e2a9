"""ONNX artifacts -> TensorRT / TensorRT-RTX engines: profiles per scale, precision, timing cache, manifests."""
