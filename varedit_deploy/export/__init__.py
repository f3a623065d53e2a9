"""torch -> ONNX: one declarative spec per graph, each export checked and compared with its module, plus the manifest."""
