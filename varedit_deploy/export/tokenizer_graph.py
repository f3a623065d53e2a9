"""The T5 tokenizer as an ONNX graph: one string in, the ids T5TokenizerFast gives out.

The artifact's `tokenizer.json` is what the official T5TokenizerFast runs; this module turns it
into a graph of ONNX Runtime core ops plus onnxruntime-extensions' `SentencepieceTokenizer`, so
that any ONNX Runtime (C++, C#, Java, JavaScript) can tokenise without the `tokenizers` library.
Input `text` string [1]; output `input_ids` int64 [1, L] ending in `</s>`, what the text encoder
takes as it is (it runs on the real tokens: no padding, no mask).

The sentencepiece op alone differs from the fast tokenizer on 15-20 % of a wide corpus; each
difference has a fix in the graph:

1. special-token literals in the text (`</s>`, `<pad>`, `<extra_id_N>`) are one id each in the fast
   tokenizer, spelled out by sentencepiece: the graph splits them out first and interleaves them back;
2. whitespace: the released layout (Metaspace only) keeps a lone `▁` before trailing whitespace and
   special tokens, which sentencepiece strips: its whitespace collapsing is off and a lone `▁` is
   dropped only where the next piece starts a word; the transformers-5 layout (WhitespaceSplit)
   splits on White_Space characters the normaliser keeps (U+0085 for nmt_nfkc): they become spaces;
3. U+0000 cuts the extensions' strings (C strings): it is swapped for an unknown character with core ops;
4. the fast tokenizer's Unigram table has `</s>`, `<pad>`, `<unk>` and `<extra_id_N>` as ordinary
   pieces that normalised text can spell (`＜/s＞`): the sentencepiece model is rebuilt from that table;
5. normalisation: tokenizers applies the charsmap per extended grapheme cluster (a cluster under
   6 bytes whose prefix is a rule key becomes the shortest key's replacement, the rest of the
   cluster dropped); sentencepiece takes the longest key at every position. The graph normalises
   as tokenizers does (clusters by `grapheme_clusters.re2`, rule tables read from the charsmap) and
   runs sentencepiece with an identity normaliser; text with no character of any rule skips it.

Building needs `onnx` and sentencepiece's protobuf module; running, onnxruntime and
onnxruntime-extensions. `tokenizer_layout` refuses a tokenizer.json it does not know.
"""

from __future__ import annotations

import base64
import itertools
import json
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import VareditError, require

CONTRIB = "ai.onnx.contrib"  # onnxruntime-extensions' operator domain
OPSETS = {"": 20, CONTRIB: 1, "ai.onnx.ml": 3}  # 20: StringSplit, RegexFullMatch, StringConcat
INPUT, OUTPUT = "text", "input_ids"
META = "\u2581"  # sentencepiece's word-start mark
# Private-use characters (plane 15) the graph uses internally: no charsmap rule, never in a vocab.
NUL_STANDIN = "\U000F0000"  # U+0000 in the text (an unknown character, as NUL is to the fast tokenizer)
SEGMENT_END = "\U000F0001"  # appended to every piece while normalising; the text's own become NUL_STANDIN
NO_RULE = "\U000F0002"  # what a rule table gives for a key it lacks
UNK_INTERNAL = "\u2047unk\u2047"  # sentencepiece's UNKNOWN piece, renamed so `<unk>` can be an ordinary piece
CLUSTER_FILE = Path(__file__).with_name("grapheme_clusters.re2")
# tokenizers' Precompiled normaliser replaces whole clusters only when shorter than this many UTF-8 bytes.
WHOLE_CLUSTER_BYTES = 6
# A charsmap without rules (a trie of 256 empty units, no replacements): sentencepiece normalises
# nothing with it, as with none, but does not log that it was given none.
NO_RULES_CHARSMAP = struct.pack("<I", 256 * 4) + bytes(256 * 4)
WHITE_SPACE = (0x9, 0xA, 0xB, 0xC, 0xD, 0x85, 0xA0, 0x1680, *range(0x2000, 0x200B), 0x2028, 0x2029, 0x202F,
               0x205F, 0x3000)  # Unicode White_Space (Rust's char::is_whitespace) but for U+0020


class TokenizerGraphError(VareditError):
    """A tokenizer.json this builder does not reproduce (the artifact then ships tokenizer.json alone)."""


@dataclass(frozen=True)
class TokenizerLayout:
    """What the graph must reproduce of a T5 tokenizer.json."""

    split_on_whitespace: bool  # WhitespaceSplit before Metaspace (transformers 5); else Metaspace only (releases)
    charsmap: bytes  # the Precompiled normaliser's rules
    vocab: list[tuple[str, float]]  # the Unigram table: pieces and scores, by id
    unk_id: int
    specials: dict[str, int]  # special-token literals matched in the raw text
    eos_id: int


def tokenizer_layout(tokenizer_json: dict[str, Any]) -> TokenizerLayout:
    """Read the parts of a T5 tokenizer.json the graph reproduces; refuse anything else, naming it."""
    normalizer, pre = tokenizer_json.get("normalizer") or {}, tokenizer_json.get("pre_tokenizer") or {}
    model, post = tokenizer_json.get("model") or {}, tokenizer_json.get("post_processor") or {}
    steps = normalizer.get("normalizers", [normalizer]) if normalizer.get("type") == "Sequence" else [normalizer]
    collapse = {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}
    if not (steps and steps[0].get("type") == "Precompiled" and steps[1:] in ([], [collapse])):
        raise TokenizerGraphError(f"normalizer {[s.get('type') for s in steps]} is not Precompiled "
                                  "[+ Replace(' {2,}', ' ')]")
    kinds = [p.get("type") for p in pre.get("pretokenizers", [pre])]
    metaspace = pre.get("pretokenizers", [pre])[-1]
    if kinds not in (["WhitespaceSplit", "Metaspace"], ["Metaspace"]) or metaspace.get("replacement") != META \
            or metaspace.get("prepend_scheme", "always" if metaspace.get("add_prefix_space") else "never") != "always":
        raise TokenizerGraphError(f"pre_tokenizer {kinds} is not [WhitespaceSplit +] Metaspace('▁', always)")
    if model.get("type") != "Unigram" or model.get("byte_fallback"):
        raise TokenizerGraphError(f"model {model.get('type')} is not a Unigram without byte fallback")
    single = post.get("single")
    if post.get("type") != "TemplateProcessing" or not single or single[0] != {"Sequence": {"id": "A", "type_id": 0}} \
            or [s.get("SpecialToken", {}).get("id") for s in single[1:]] != ["</s>"]:
        raise TokenizerGraphError("post_processor does not append one </s> to the text")
    added = tokenizer_json.get("added_tokens", [])
    odd = [t["content"] for t in added if t.get("lstrip") or t.get("rstrip") or t.get("single_word")
           or t.get("normalized") or not t.get("special")]
    if odd:
        raise TokenizerGraphError(f"added tokens with options the graph does not reproduce: {odd[:3]}")
    vocab = [(piece, float(score)) for piece, score in model["vocab"]]
    used = {p for p, _ in vocab}
    if used & {NUL_STANDIN, SEGMENT_END, NO_RULE, UNK_INTERNAL}:
        raise TokenizerGraphError("the vocabulary holds a character the graph reserves (U+F0000-U+F0002)")
    return TokenizerLayout(
        split_on_whitespace=kinds[0] == "WhitespaceSplit",
        charsmap=base64.b64decode(steps[0]["precompiled_charsmap"]),
        vocab=vocab, unk_id=int(model["unk_id"]),
        specials={t["content"]: int(t["id"]) for t in added},
        eos_id=int(post["special_tokens"]["</s>"]["ids"][0]))


def charsmap_rules(blob: bytes, below_bytes: int = WHOLE_CLUSTER_BYTES) -> dict[str, str]:
    """The (key -> replacement) rules of a sentencepiece precompiled charsmap whose keys are shorter
    than `below_bytes` UTF-8 bytes (tokenizers applies no longer key: see the module docstring). The
    charsmap is a Darts double-array trie over the keys' bytes, then the NUL-terminated replacements
    its leaves point into; the trie is walked one byte level at a time, every node's 255 possible
    children at once."""
    (trie_bytes,) = struct.unpack_from("<I", blob, 0)
    units = np.frombuffer(blob, "<u4", count=trie_bytes // 4, offset=4).astype(np.int64)
    replacements = blob[4 + trie_bytes:]
    label_mask, byte_values = (1 << 31) | 0xFF, np.arange(1, 256, dtype=np.int64)

    def base(positions: np.ndarray) -> np.ndarray:
        unit = units[positions]
        return positions ^ ((unit >> 10) << ((unit & (1 << 9)) >> 6))

    rules: dict[str, str] = {}
    positions, keys = np.zeros(1, np.int64), [b""]
    for _ in range(below_bytes - 1):
        children = base(positions)[:, None] ^ byte_values[None, :]
        inside = children < len(units)
        matches = inside & ((units[np.where(inside, children, 0)] & label_mask) == byte_values[None, :])
        parent, byte = np.nonzero(matches)
        positions = children[parent, byte]
        keys = [keys[p] + bytes([b + 1]) for p, b in zip(parent.tolist(), byte.tolist())]
        leaves = np.nonzero((units[positions] >> 8) & 1)[0]
        values = units[base(positions[leaves])] & ((1 << 31) - 1)
        for i, start in zip(leaves.tolist(), values.tolist()):
            try:
                key = keys[i].decode("utf-8")
            except UnicodeDecodeError:  # no rule key is malformed UTF-8; this would be a damaged charsmap
                raise TokenizerGraphError("the normaliser's charsmap holds a key that is not UTF-8") from None
            rules[key] = replacements[start:replacements.index(b"\x00", start)].decode("utf-8")
    return rules


def _char_class(code_points) -> str:
    """An RE2 character-class body for these code points, as ranges."""
    parts = []
    for _, run in itertools.groupby(enumerate(sorted(set(code_points))), lambda t: t[1] - t[0]):
        run = list(run)
        a, b = run[0][1], run[-1][1]
        parts.append(f"\\x{{{a:x}}}" if a == b else f"\\x{{{a:x}}}-\\x{{{b:x}}}")
    return "".join(parts)


def grapheme_cluster_pattern(regex_module) -> str:
    """The RE2 pattern of `grapheme_clusters.re2`, from the Unicode data of the `regex` module:
    CR LF | Control | Prepend* (not Control) (Extend | ZWJ | SpacingMark)*. The full UAX #29 rules also
    join Hangul jamo, regional indicators, emoji ZWJ sequences and Indic conjuncts, but every such
    cluster of two or more parts is at least 6 UTF-8 bytes, where the normaliser goes character by
    character either way, so this simpler pattern normalises the same (and runs 2x faster)."""
    def members(prop: str) -> list[int]:
        pattern = regex_module.compile(r"\p{" + prop + "}")
        return [c for c in range(0x110000) if not 0xD800 <= c <= 0xDFFF and pattern.match(chr(c))]

    control = _char_class(members("GCB=Control") + members("GCB=CR") + members("GCB=LF"))
    after = _char_class(members("GCB=Extend") + members("GCB=ZWJ") + members("GCB=SpacingMark"))
    return f"((?:\\x{{d}}\\x{{a}}|[{control}]|[{_char_class(members('GCB=Prepend'))}]*[^{control}][{after}]*))"


def _under_bytes_pattern(limit: int) -> str:
    """RE2: a whole string of fewer than `limit` UTF-8 bytes."""
    width = {1: "[\\x{0}-\\x{7f}]", 2: "[\\x{80}-\\x{7ff}]", 3: "[\\x{800}-\\x{ffff}]", 4: "[\\x{10000}-\\x{10ffff}]"}
    sequences = []

    def extend(prefix: list[int], total: int) -> None:
        if prefix:
            sequences.append("".join(width[k] for k in prefix))
        for k in width:
            if total + k < limit:
                extend(prefix + [k], total + k)

    extend([], 0)
    return "(?s)(?:" + "|".join(sequences) + ")"


class _Graph:
    """Nodes and constants of the graph being built, named as they are added."""

    def __init__(self) -> None:
        self.nodes: list = []
        self.constants: list = []

    def const(self, name: str, value) -> str:
        from onnx import numpy_helper

        array = np.array(value, dtype=object) if isinstance(value, (str, list)) and (
            isinstance(value, str) or value and isinstance(value[0], str)) else np.asarray(value)
        self.constants.append(numpy_helper.from_array(array, name))
        return name

    def op(self, op_type: str, inputs: list[str], outputs: list[str] | str, domain: str = "", **attrs) -> str:
        from onnx import helper

        outputs = [outputs] if isinstance(outputs, str) else outputs
        self.nodes.append(helper.make_node(op_type, inputs, outputs, domain=domain or None, **attrs))
        return outputs[0]


def _normalise_nodes(g: _Graph, rules: dict[str, str], pieces: str, out: str, pattern: str) -> None:
    """Nodes mapping the string tensor `pieces` [P] to its normalisation as tokenizers' Precompiled
    does it, into `out` [P]. Every piece gets an end mark; clusters and characters are split out of
    all pieces at once, each character learns its cluster (by byte position), and the output per
    character is the cluster's replacement (on its first character; "" on the others) where the
    cluster is whole-replaced, else the character's own rule or the character."""
    single = {k: v for k, v in rules.items() if len(k) == 1}
    short = {k: v for k, v in rules.items() if len(k.encode()) < WHOLE_CLUSTER_BYTES}
    for table in (single, short):
        assert not any(NO_RULE in v or SEGMENT_END in v for v in table.values())
    zero, one = g.const("n_zero", np.int64(0)), g.const("n_one", np.int64(1))
    one_v, zero_v, last_v = g.const("n_one_v", [1]), g.const("n_zero_v", [0]), g.const("n_last_v", [-1])
    big = g.const("n_big", [1 << 62])
    no_rule, empty = g.const("n_no_rule", NO_RULE), g.const("n_empty", "")
    ones = {"value": _int_tensor(1)}
    zeros = {"value": _int_tensor(0)}

    def split(src: str, regex: str, prefix: str) -> tuple[str, str, str, str]:
        names = [f"{prefix}_items", f"{prefix}_begin", f"{prefix}_end", f"{prefix}_rows"]
        g.op("StringRegexSplitWithOffsets", [src, g.const(f"{prefix}_pat", regex), g.const(f"{prefix}_keep", [regex])],
             names, CONTRIB)
        return tuple(names)

    def row_of_each(prefix: str, items: str, row_splits: str) -> str:
        """Which piece each split item came from, from the row splits."""
        n = g.op("Shape", [items], f"{prefix}_n")
        marks0 = g.op("ConstantOfShape", [g.op("Add", [n, one_v], f"{prefix}_n1")], f"{prefix}_marks0", **zeros)
        starts = g.op("Slice", [row_splits, one_v, last_v], f"{prefix}_starts")
        ones_ = g.op("ConstantOfShape", [g.op("Shape", [starts], f"{prefix}_ns")], f"{prefix}_ones", **ones)
        marks = g.op("ScatterElements", [marks0, starts, ones_], f"{prefix}_marks", axis=0, reduction="add")
        rows = g.op("CumSum", [marks, zero], f"{prefix}_cum")
        return g.op("Slice", [rows, zero_v, n], f"{prefix}_row")

    marked = g.op("StringConcat", [pieces, g.const("n_end", SEGMENT_END)], "n_marked")
    clusters, c_begin, _, c_rows = split(marked, pattern, "n_cl")
    chars, ch_begin, ch_end, ch_rows = split(marked, "(?s)(.)", "n_ch")
    cluster_row, char_row = row_of_each("n_clr", clusters, c_rows), row_of_each("n_chr", chars, ch_rows)
    # byte position of every cluster and character in the pieces laid end to end
    last_char = g.op("Sub", [g.op("Slice", [ch_rows, one_v, big], "n_ch_rows1"), one], "n_last_char")
    piece_bytes = g.op("Gather", [ch_end, last_char], "n_piece_bytes")  # every piece has its end mark
    piece_base = g.op("CumSum", [piece_bytes, zero], "n_piece_base", exclusive=1)
    total = g.op("ReduceSum", [piece_bytes], "n_total", keepdims=1)
    c_pos = g.op("Add", [g.op("Gather", [piece_base, cluster_row], "n_cl_base"), c_begin], "n_cl_pos")
    ch_pos = g.op("Add", [g.op("Gather", [piece_base, char_row], "n_ch_base"), ch_begin], "n_ch_pos")
    starts0 = g.op("ConstantOfShape", [g.op("Add", [total, one_v], "n_total1")], "n_starts0", **zeros)
    c_ones = g.op("ConstantOfShape", [g.op("Shape", [c_pos], "n_cl_n")], "n_cl_ones", **ones)
    cluster_starts = g.op("ScatterElements", [starts0, c_pos, c_ones], "n_cl_starts", axis=0)
    cluster_id = g.op("Sub", [g.op("Gather", [g.op("CumSum", [cluster_starts, zero], "n_cl_cum"), ch_pos],
                                        "n_ch_cl1"), one], "n_ch_cl")
    first_in_cluster = g.op("Equal", [ch_pos, g.op("Gather", [c_pos, cluster_id], "n_ch_cl_start")], "n_ch_first")

    def lookup(src: str, table: dict[str, str], name: str) -> tuple[str, str]:
        value = g.op("LabelEncoder", [src], name, "ai.onnx.ml", keys_strings=list(table),
                     values_strings=list(table.values()), default_string=NO_RULE)
        return value, g.op("Not", [g.op("Equal", [value, no_rule], f"{name}_miss")], f"{name}_hit")

    # whole clusters: the shortest rule key among their first 1, 2, 3 characters (keys are <= 3 chars
    # under 6 bytes), for clusters under 6 bytes
    small = g.op("RegexFullMatch", [clusters], "n_cl_small", pattern=_under_bytes_pattern(WHOLE_CLUSTER_BYTES))
    group = g.const("n_group1", "\\1")
    found = []
    for k in (1, 2, 3):
        prefix = g.op("StringRegexReplace", [clusters, g.const(f"n_p{k}_pat", f"(?s)^(.{{{k}}}).*$"), group],
                      f"n_p{k}", CONTRIB)
        found.append(lookup(prefix, short, f"n_v{k}"))
    (v1, hit1), (v2, hit2), (v3, hit3) = found
    cluster_value = g.op("Where", [hit1, v1, g.op("Where", [hit2, v2, v3], "n_v23")], "n_cl_value")
    any_hit = g.op("Or", [g.op("Or", [hit1, hit2], "n_hit12"), hit3], "n_hit")
    whole = g.op("And", [any_hit, small], "n_cl_whole")
    # characters: their own rule, or themselves
    char_value, char_hit = lookup(chars, single, "n_chv")
    per_char = g.op("Where", [char_hit, char_value, chars], "n_ch_out")
    from_cluster = g.op("Where", [first_in_cluster, g.op("Gather", [cluster_value, cluster_id], "n_ch_clv"), empty],
                        "n_ch_from_cl")
    mapped = g.op("Where", [g.op("Gather", [whole, cluster_id], "n_ch_whole"), from_cluster, per_char], "n_mapped")
    # one string, cut back into the pieces at the end marks (the last part, after the final mark, is empty)
    joined = g.op("Reshape", [g.op("StringJoin", [mapped, empty, zero], "n_joined0", CONTRIB), one_v], "n_joined")
    parts = g.op("StringSplit", [joined], ["n_parts", "n_parts_n"], delimiter=SEGMENT_END)
    g.op("Slice", [g.op("Reshape", [parts, last_v], "n_parts1"), zero_v, last_v], out)


def _int_tensor(value: int):
    from onnx import TensorProto, helper

    return helper.make_tensor("value", TensorProto.INT64, [1], [value])


def _untouched_pattern(rules: dict[str, str]) -> str:
    """RE2 for texts no rule can change: none of their characters is a one-character key or a later
    character of a longer key (a longer key's first character may be a plain letter)."""
    used = {ord(k) for k in rules if len(k) == 1} | {ord(c) for k in rules if len(k) > 1 for c in k[1:]}
    return f"(?s)[^{_char_class(used)}]*"


def _sentencepiece_model(layout: TokenizerLayout) -> tuple[bytes, int]:
    """The model the graph's SentencepieceTokenizer runs: the fast tokenizer's own Unigram table
    (same pieces, scores and ids; every piece NORMAL, so `</s>` and `<extra_id_0>` can be matched
    as the fast tokenizer matches them), an identity normaliser (the graph has normalised), and
    whitespace collapsing as the layout has it. Sentencepiece needs one UNKNOWN piece: it keeps
    the unk id under another name, and `<unk>` itself is appended as a new id, which the graph
    maps back to the unk id. Returns the serialised model and that appended id."""
    pb = require("sentencepiece.sentencepiece_model_pb2", "export", package="sentencepiece")
    model = pb.ModelProto()
    kinds = pb.ModelProto.SentencePiece.Type
    for i, (piece, score) in enumerate(layout.vocab):
        entry = model.pieces.add()
        entry.piece = UNK_INTERNAL if i == layout.unk_id else piece
        entry.score, entry.type = score, kinds.UNKNOWN if i == layout.unk_id else kinds.NORMAL
    unk = model.pieces.add()
    unk.piece, unk.score, unk.type = layout.vocab[layout.unk_id][0], layout.vocab[layout.unk_id][1], kinds.NORMAL
    model.trainer_spec.model_type = pb.TrainerSpec.UNIGRAM
    model.trainer_spec.unk_id = layout.unk_id
    model.trainer_spec.bos_id = model.trainer_spec.eos_id = model.trainer_spec.pad_id = -1
    model.trainer_spec.byte_fallback = False
    spec = model.normalizer_spec
    spec.name, spec.precompiled_charsmap = "identity", NO_RULES_CHARSMAP
    spec.add_dummy_prefix, spec.escape_whitespaces = True, True
    spec.remove_extra_whitespaces = layout.split_on_whitespace
    return model.SerializeToString(), len(model.pieces) - 1


def build_tokenizer_graph(tokenizer_json: str, cluster_pattern: str | None = None):
    """The tokenizer graph (an onnx.ModelProto) for the text of a T5 tokenizer.json."""
    onnx = require("onnx", "export")
    from onnx import TensorProto, helper

    layout = tokenizer_layout(json.loads(tokenizer_json))
    rules = charsmap_rules(layout.charsmap)  # keys under 6 bytes: the only ones tokenizers applies
    reserved = {NUL_STANDIN, SEGMENT_END, NO_RULE}
    if any(set(k) & reserved or set(v) & reserved for k, v in rules.items()):
        raise TokenizerGraphError("the normaliser has a rule for a character the graph reserves (U+F0000-U+F0002)")
    g = _Graph()
    zero, one, one_v = g.const("zero", np.int64(0)), g.const("one", np.int64(1)), g.const("one_v", [1])
    # 3. U+0000 -> an unknown character, before any extensions op reads the text as a C string
    parts = g.op("StringSplit", [INPUT], ["nul_parts", "nul_count"], delimiter="\x00")
    text = g.op("StringJoin", [parts, g.const("nul_standin", NUL_STANDIN), one], "text_no_nul", CONTRIB)
    text = g.op("StringRegexReplace", [text, g.const("end_pat", "\\x{F0001}"), g.const("standin", NUL_STANDIN)],
                "text_clean", CONTRIB)  # the normaliser's end mark must not occur in the text
    # 1. special-token literals (longest first) split out; each piece is a special id or -1
    literals = "(" + "|".join(re.escape(s) for s in sorted(layout.specials, key=len, reverse=True)) + ")"
    pieces = g.op("StringRegexSplitWithOffsets", [text, g.const("special_pat", literals),
                                                  g.const("special_keep", [literals])],
                  ["pieces", "piece_begin", "piece_end", "piece_rows"], CONTRIB)
    special_id = g.op("LabelEncoder", [pieces], "special_id", "ai.onnx.ml", keys_strings=list(layout.specials),
                      values_int64s=list(layout.specials.values()), default_int64=-1)
    is_special = g.op("GreaterOrEqual", [special_id, zero], "is_special")
    plain = g.op("Where", [is_special, g.const("empty", ""), pieces], "plain_pieces")
    # 5. normalise as tokenizers does, unless no character of the text takes part in any rule
    pattern = cluster_pattern or CLUSTER_FILE.read_text().strip()
    slow = _Graph()
    slow.constants = g.constants
    _normalise_nodes(slow, rules, plain, "normalised_slow", pattern)
    untouched = g.op("Reshape", [g.op("RegexFullMatch", [text], "untouched1", pattern=_untouched_pattern(rules)),
                                 g.const("scalar", np.zeros(0, np.int64))], "untouched")
    string_out = lambda name: helper.make_tensor_value_info(name, TensorProto.STRING, None)  # noqa: E731
    g.op("If", [untouched], "normalised",
         then_branch=helper.make_graph([helper.make_node("Identity", [plain], ["normalised_fast"])], "as_is", [],
                                       [string_out("normalised_fast")]),
         else_branch=helper.make_graph(slow.nodes, "normalise", [], [string_out("normalised_slow")]))
    normalised = "normalised"
    # 2. (transformers-5 layout) White_Space the normaliser keeps: WhitespaceSplit splits there
    kept = [c for c in WHITE_SPACE if rules.get(chr(c), chr(c)) == chr(c)]
    if layout.split_on_whitespace and kept:
        normalised = g.op("StringRegexReplace", [normalised, g.const("ws_pat", f"[{_char_class(kept)}]"),
                                                 g.const("space", " ")], "normalised_ws", CONTRIB)
    # 4. sentencepiece on the fast tokenizer's table; the appended <unk> id mapped back
    spm_bytes, appended_unk = _sentencepiece_model(layout)
    flags = [g.const("spm_nbest", np.int64(0)), g.const("spm_alpha", np.float32(0.0)),
             g.const("spm_bos", np.bool_(False)), g.const("spm_eos", np.bool_(False)), g.const("spm_reverse", np.bool_(False))]
    g.op("SentencepieceTokenizer", [normalised, *flags], ["tokens32", "token_rows"], CONTRIB, model=spm_bytes)
    token_rows = "token_rows"
    tokens = g.op("Cast", ["tokens32"], "tokens_any", to=TensorProto.INT64)
    tokens = g.op("Where", [g.op("Equal", [tokens, g.const("appended_unk", np.int64(appended_unk))], "is_appended_unk"),
                            g.const("unk", np.int64(layout.unk_id)), tokens], "tokens")
    # 1. interleave: a token moves right by the specials before or at its piece; a special sits at its
    # piece's first token position plus the specials before it
    n_tokens = g.op("Squeeze", [g.op("Shape", [tokens], "n_tokens1")], "n_tokens")
    position = g.op("Range", [zero, n_tokens, one], "token_index")
    piece_start = g.op("Slice", [token_rows, g.const("from0", [0]), g.const("to_last", [-1])], "piece_start")
    at_or_before = g.op("And", [g.op("LessOrEqual", [piece_start, g.op("Unsqueeze", [position, one_v], "token_col")],
                                     "piece_at_or_before"), is_special], "special_at_or_before")
    shift = g.op("ReduceSum", [g.op("Cast", [at_or_before], "special_at_or_before_i", to=TensorProto.INT64), one_v],
                 "shift", keepdims=0)
    token_pos = g.op("Add", [position, shift], "token_pos")
    specials_before = g.op("CumSum", [g.op("Cast", [is_special], "is_special_i", to=TensorProto.INT64), zero],
                           "specials_before", exclusive=1)
    special_pos = g.op("Compress", [g.op("Add", [piece_start, specials_before], "piece_pos"), is_special],
                       "special_pos", axis=0)
    special_val = g.op("Compress", [special_id, is_special], "special_val", axis=0)
    values = g.op("Concat", [tokens, special_val], "all_values", axis=0)
    ids = g.op("ScatterElements", [g.op("ConstantOfShape", [g.op("Shape", [values], "n_ids")], "ids0",
                                        value=_int_tensor(0)),
                                   g.op("Concat", [token_pos, special_pos], "all_pos", axis=0), values],
               "merged", axis=0)
    if not layout.split_on_whitespace:
        # 2. (released layout) a lone ▁ stays only where the next piece does not start a word
        starts_word = np.zeros(len(layout.vocab) + 1, bool)  # the extra entry: past the end
        starts_word[:len(layout.vocab)] = [p.startswith(META) for p, _ in layout.vocab]
        starts_word[list(layout.specials.values())] = False
        meta_id = next((i for i, (p, _) in enumerate(layout.vocab) if p == META), None)
        if meta_id is not None:
            following = g.op("Concat", [g.op("Slice", [ids, one_v, g.const("end", [1 << 62])], "ids_tail"),
                                        g.const("past_end", [len(layout.vocab)])], "following", axis=0)
            drop = g.op("And", [g.op("Equal", [ids, g.const("meta_id", np.int64(meta_id))], "is_meta"),
                                g.op("Gather", [g.const("starts_word", starts_word), following], "next_starts_word")],
                        "drop")
            ids = g.op("Compress", [ids, g.op("Not", [drop], "keep")], "deduped", axis=0)
    with_eos = g.op("Concat", [ids, g.const("eos", [layout.eos_id])], "with_eos", axis=0)
    g.op("Unsqueeze", [with_eos, g.const("batch_axis", [0])], OUTPUT)
    graph = helper.make_graph(g.nodes, "t5_tokenizer", [helper.make_tensor_value_info(INPUT, TensorProto.STRING, [1])],
                              [helper.make_tensor_value_info(OUTPUT, TensorProto.INT64, [1, "tokens"])], g.constants)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in OPSETS.items()], ir_version=10,
                              producer_name="varedit-deploy")
    onnx.checker.check_model(model)
    return model


# What the export checks the graph on against tokenizer.json (the tests run a far wider corpus):
# one or more strings of each difference class the graph fixes.
CHECK_TEXTS = (
    "make the sky purple", "Add a hat to the cat, then turn the photo into a watercolor painting.", "",
    "a </s> b", "</s></s>", "x<unk>y <pad>", "text <extra_id_0> more <extra_id_99>", "<extra_id_100> <s>",
    "＜/s＞", "a＜extra_id_12＞b", "＜pad＞ ＜unk＞", "  leading", "trailing  ", "a   b", " ", "\t<pad>\n", "a\u0085b",
    "a\x00b", "\x00", "a\U000F0001b", "e\u0301\u0302", "a\u0308\u0304", "ｶﾞｷﾞ", "\u1100\u1161\u11a8", "\u202f\u0303",
    "cr\r\nlf", "Ｆｕｌｌｗｉｄｔｈ ﬁne ① x²", "日本語のテキスト 한국어", "👨\u200d👩\u200d👧 🇫🇷 1\ufe0f\u20e3",
    "नमस्ते العربية", "a\u00a0\u3000b", "sky " * 200,
)


def _node_counts(graph) -> dict[str, int]:
    """Operators of the graph and its subgraphs, by `domain::op` outside the default domain."""
    counts: dict[str, int] = {}
    for node in graph.node:
        key = f"{node.domain}::{node.op_type}" if node.domain not in ("", "ai.onnx") else node.op_type
        counts[key] = counts.get(key, 0) + 1
        for attribute in node.attribute:
            if attribute.g.node:
                for sub, n in _node_counts(attribute.g).items():
                    counts[sub] = counts.get(sub, 0) + n
    return dict(sorted(counts.items()))


def check_against_json(graph_path: Path, tokenizer_json: Path, texts=CHECK_TEXTS) -> list[str]:
    """The texts on which the graph's ids differ from tokenizer.json's (run by `tokenizers`)."""
    import onnxruntime as ort
    import onnxruntime_extensions
    from tokenizers import Tokenizer

    reference = Tokenizer.from_file(str(tokenizer_json))
    options = ort.SessionOptions()
    options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    session = ort.InferenceSession(str(graph_path), options, providers=["CPUExecutionProvider"])
    return [text for text in texts if session.run(None, {INPUT: np.array([text], dtype=object)})[0][0].tolist()
            != reference.encode(text, add_special_tokens=True).ids]


def write_tokenizer_graph(folder: Path, tokenizer_json: Path) -> tuple[dict[str, Any] | None, str]:
    """Write `tokenizer.onnx` beside `tokenizer_json` inside the artifact `folder`, checked against it
    where onnxruntime-extensions and tokenizers are installed. Returns the manifest record (None when
    the graph is left out) and a line saying what happened."""
    from ..artifact import file_record

    try:
        model = build_tokenizer_graph(tokenizer_json.read_text())
    except TokenizerGraphError as e:
        return None, f"tokenizer graph: left out ({e}); runtimes use tokenizer.json"
    path = tokenizer_json.with_name("tokenizer.onnx")
    path.write_bytes(model.SerializeToString())
    try:
        differ = check_against_json(path, tokenizer_json)
        check = {"texts": len(CHECK_TEXTS), "differ": len(differ)}
    except ImportError as e:
        differ, check = [], {"texts": 0, "not_run": f"{e.name} is not installed"}
    if differ:
        path.unlink()
        return None, (f"tokenizer graph: left out, it gives other ids than tokenizer.json for {len(differ)} of "
                      f"{len(CHECK_TEXTS)} check texts (first: {differ[0][:40]!r}); runtimes use tokenizer.json")
    record = {
        "files": [file_record(folder, path)],
        "inputs": [{"name": INPUT, "dtype": "string", "shape": [1]}],
        "outputs": [{"name": OUTPUT, "dtype": "int64", "shape": [1, "tokens"]}],
        "opset": {domain or "ai.onnx": version for domain, version in OPSETS.items()},
        "ops": _node_counts(model.graph),
        "custom_ops": {CONTRIB: "onnxruntime-extensions (register its library with the session options)"},
        "check": check,
    }
    said = (f"ids equal tokenizer.json's on {check['texts']} check texts" if "not_run" not in check
            else f"not checked against tokenizer.json here ({check['not_run']})")
    return record, f"tokenizer graph: {path.name}, {path.stat().st_size / 1e6:.2f} MB, {said}"
