"""varedit-deploy: run VAREdit (instruction-guided image editing) fast and portably.

Subpackages: `model` (the PyTorch reference, the one source of the math), `export`
(torch -> ONNX artifacts), `runtime` (the scale loop on ONNX Runtime and other backends).
"""

__version__ = "0.1.0"
