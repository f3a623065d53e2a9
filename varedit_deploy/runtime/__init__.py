"""The scale loop behind one backend interface (ONNX Runtime, TensorRT, torch), the KV cache and the `EditPipeline` API.

Imports stay light here: the ONNX Runtime path needs numpy, pillow and onnxruntime only.
"""
