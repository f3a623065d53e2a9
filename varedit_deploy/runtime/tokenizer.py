"""Instruction -> T5 token ids without torch or transformers, from either of the artifact's tokenizers.

The artifact ships `tokenizer.json`, the file the official T5TokenizerFast runs, and (exports
from this version on) the same tokenizer as an ONNX graph, `tokenizer/tokenizer.onnx`, which
gives the same ids (tests/test_tokenizer_graph.py; the export checks it too). The graph runs on
ONNX Runtime with onnxruntime-extensions, so an edit needs no tokenizer library at all; the JSON
file runs with the `tokenizers` library. `load_tokenizer` takes the graph where it can ("auto"),
and says which one it took.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..artifact import Manifest
from ..errors import ArtifactError, InputError, VareditError, missing_dependency, require

TOKENIZERS = ("auto", "graph", "json")  # what `load_tokenizer` may be asked for


def _checked(ids: list[int], max_tokens: int) -> np.ndarray:
    if len(ids) > max_tokens:
        raise InputError(f"the instruction is {len(ids)} tokens long; the text encoder takes at most {max_tokens} "
                         "(including the end token): shorten it")
    return np.asarray([ids], dtype=np.int64)


def _check_instruction(instruction: str) -> None:
    if not isinstance(instruction, str) or not instruction.strip():
        raise InputError("the instruction is empty; say what to change, e.g. 'make the sky purple'")


class Tokenizer:
    """tokenizer.json through the `tokenizers` library."""

    def __init__(self, path: Path, max_tokens: int = 512):
        try:
            from tokenizers import Tokenizer as HFTokenizer
        except ImportError:
            raise missing_dependency("tokenizers", "ort") from None
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:
            raise ArtifactError(f"tokenizer {path}: cannot be loaded ({e})") from None
        self._tok.no_truncation()
        self._tok.no_padding()
        self.max_tokens = max_tokens
        self.source = f"{path.name} (tokenizers)"

    def encode(self, instruction: str) -> np.ndarray:
        """[1, L] int64 ids including `</s>`; refuses empty and over-long instructions."""
        _check_instruction(instruction)
        return _checked(self._tok.encode(instruction, add_special_tokens=True).ids, self.max_tokens)


class GraphTokenizer:
    """The tokenizer graph on ONNX Runtime's CPU provider, with onnxruntime-extensions' operators."""

    def __init__(self, path: Path, max_tokens: int = 512):
        ort = require("onnxruntime", "ort")
        extensions = require("onnxruntime_extensions", "ort", package="onnxruntime-extensions")
        options = ort.SessionOptions()
        options.register_custom_ops_library(extensions.get_library_path())
        options.log_severity_level = 3
        options.intra_op_num_threads = 1  # string work on one short text: threads only add start-up
        try:
            self._session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as e:
            raise ArtifactError(f"tokenizer graph {path}: cannot be loaded by ONNX Runtime ({e})") from None
        self.max_tokens = max_tokens
        self.source = f"{path.name} (ONNX Runtime + onnxruntime-extensions)"

    def encode(self, instruction: str) -> np.ndarray:
        """[1, L] int64 ids including `</s>`; refuses empty and over-long instructions."""
        _check_instruction(instruction)
        (ids,) = self._session.run(None, {"text": np.array([instruction], dtype=object)})
        return _checked(ids[0].tolist(), self.max_tokens)


def load_tokenizer(manifest: Manifest, which: str = "auto") -> Tokenizer | GraphTokenizer | None:
    """The artifact's tokenizer: "graph" (tokenizer.onnx), "json" (tokenizer.json), or "auto": the
    graph where the artifact has one and onnxruntime-extensions is installed, else tokenizer.json
    where `tokenizers` is. None for an artifact without a text encoder (a fixture export)."""
    if which not in TOKENIZERS:
        raise InputError(f"unknown tokenizer {which!r}; choose one of {', '.join(TOKENIZERS)}")
    if manifest.tokenizer_file is None:
        return None
    graph, limit = manifest.tokenizer_graph_file, manifest.max_tokens
    if which == "graph" and graph is None:
        raise ArtifactError(f"artifact {manifest.folder} has no tokenizer graph (it was exported before tokenizer "
                            "graphs, or its tokenizer.json has a layout the graph does not reproduce: the export "
                            "said which); use its tokenizer.json, or export it again")
    if which == "json":
        return Tokenizer(manifest.tokenizer_file, limit)
    if which == "graph":
        return GraphTokenizer(graph, limit)
    if graph is not None and _importable("onnxruntime_extensions"):
        return GraphTokenizer(graph, limit)
    if _importable("tokenizers"):
        return Tokenizer(manifest.tokenizer_file, limit)
    if graph is not None:
        raise VareditError("tokenizing needs onnxruntime-extensions (for the artifact's tokenizer graph) or "
                           "tokenizers (for its tokenizer.json), and neither is installed; install one: "
                           "pip install onnxruntime-extensions")
    raise missing_dependency("tokenizers", "ort")


def _importable(module: str) -> bool:
    try:
        __import__(module)
    except ImportError:
        return False
    return True
