"""Test material for the tokenizer graph: T5 tokenizer folders made on the spot, and a wide corpus.

Two sentencepiece models (the project's tiny one, where almost everything is `<unk>`, and a
3 000-piece multilingual one, where normalisation differences show), each with tokenizer.json in
the two layouts that exist: as transformers 5 converts it (WhitespaceSplit + Metaspace) and as
the released flan-t5 files have it (Replace(' {2,}') after the charsmap, Metaspace only).
The corpus holds every class of text on which sentencepiece and the fast tokenizer are known to
differ, plus random and very long text; `tricky` draws strings from the hardest code points.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

SPECIALS = ["</s>", "<pad>", "<unk>", "<extra_id_0>", "<extra_id_1>", "<extra_id_99>"]


def _wide_sentences(n: int = 6000, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    alphabets = {
        "latin": "abcdefghijklmnopqrstuvwxyzàáâãäåæçèéêëìíîïñòóôõöøùúûüýÿßœ",
        "greek": "αβγδεζηθικλμνξοπρστυφχψω",
        "cyrillic": "абвгдежзийклмнопрстуфхцчшщъыьэюя",
        "cjk": "".join(chr(c) for c in range(0x4E00, 0x4E00 + 300)),
        "kana": "".join(chr(c) for c in [*range(0x3041, 0x3097), *range(0x30A1, 0x30FB)]),
        "hangul": "".join(chr(c) for c in range(0xAC00, 0xAC00 + 200)),
        "devanagari": "".join(chr(c) for c in range(0x0905, 0x0939)),
    }
    english = ("make the sky purple add a hat to cat remove person from background turn photo into painting change "
               "color of car red blue green yellow replace dog with lion snow sunset night winter style").split()
    out = []
    for _ in range(n):
        words = []
        for _ in range(rng.randint(3, 12)):
            r = rng.random()
            if r < 0.45:
                word = rng.choice(english)
            elif r < 0.88:
                chars = rng.choice(list(alphabets.values()))
                word = "".join(rng.choice(chars) for _ in range(rng.randint(1, 6)))
            elif r < 0.93:
                word = str(rng.randint(0, 10 ** rng.randint(1, 6)))
            elif r < 0.96:
                word = rng.choice(["😀", "🐱", "🌈", "👍", "❤", "🔥"])
            else:
                word = rng.choice(list(".,!?;:'\"()-"))
            words.append(word.capitalize() if rng.random() < 0.2 else word)
        out.append(" ".join(words))
    return out


def write_tokenizer_folders(root: Path) -> dict[str, Path]:
    """`{name: tokenizer.json}` for tiny/wide x transformers-5/released layouts, written under `root`."""
    import sentencepiece as spm

    from varedit_deploy.model.text import load_tokenizer
    from varedit_deploy.model.tiny_text import write_tokenizer

    write_tokenizer(root / "tiny")
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_wide_sentences()), model_writer=buf, model_type="unigram",
                                   vocab_size=3000, hard_vocab_limit=False, pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=0.9995, minloglevel=2)
    (root / "wide").mkdir()
    (root / "wide" / "spiece.model").write_bytes(buf.getvalue())
    (root / "wide" / "tokenizer_config.json").write_text(
        json.dumps({"tokenizer_class": "T5Tokenizer", "extra_ids": 100, "model_max_length": 512}))
    files = {}
    for name in ("tiny", "wide"):
        path = root / name / "tokenizer.json"
        load_tokenizer(root / name).backend_tokenizer.save(str(path))  # what `export` ships
        files[f"{name}-transformers5"] = path
        released = json.loads(path.read_text())
        released["normalizer"] = {"type": "Sequence", "normalizers": [
            released["normalizer"], {"type": "Replace", "pattern": {"Regex": " {2,}"}, "content": " "}]}
        released["pre_tokenizer"] = released["decoder"] = {"type": "Metaspace", "replacement": "\u2581",
                                                           "add_prefix_space": True}
        files[f"{name}-released"] = root / name / "tokenizer_released.json"
        files[f"{name}-released"].write_text(json.dumps(released, ensure_ascii=False))
    return files


def corpus(seed: int = 1234) -> list[tuple[str, str]]:
    """(class, text) pairs, deterministic."""
    rng = random.Random(seed)
    items: list[tuple[str, str]] = []

    def add(kind: str, texts) -> None:
        items.extend((kind, t) for t in texts)

    add("plain", ["Make the sky purple", "make the sky purple.", "Add a hat to the cat!", "a", "A", ".", "?!", "xxx",
                  "Remove the person from the background, then turn the photo into a watercolor painting.",
                  "It's 3:45pm — 20% brighter?", "URL: https://example.com/a_b?c=d&e=f#g", "def f(x): return x**2",
                  "\"quoted\" 'single' `back`", "(parens) [brackets] {braces} <angle>", "1234567890 3.14159 -42 1e-5",
                  "MiXeD CaSe WoRdS", "don't won't can't", "e.g. i.e. etc.", "C++ / C# / F#"])
    add("unicode normalisation", [
        "Ｆｕｌｌｗｉｄｔｈ ＡＢＣ １２３", "ﬁne ﬂow ﬀ ﬃ", "① ② ⑳ ⓐ", "x² y³ H₂O", "Ⅻ ⅻ Ⅳ", "㎏ ㎞ ℃ ℉ № ™ ℡",
        "e\u0301 vs \u00e9", "\u212b vs \u00c5", "\u212a \u2126", "ｶﾞｷﾞｸﾞ halfwidth kana", "ｱｲｳｴｵ",
        "\u1100\u1161\u11a8 jamo", "ſ µ ½ ¼ ¾ ⅓ … ‥", "¨ ´ ¸ ˘ ˙ ‾", "\ufe4d\ufe4e", "ǅ ǈ ǋ Ǆ", "ℌ ℑ ℜ 𝐀𝐁𝐂 𝔸𝔹",
        "Ⓐ Ⓑ ⁰¹²³⁴", "ＡＢＣ　ＤＥＦ", "㍻ ㋿ ㌀", "ﷺ ﷻ", "ﬀ" * 5, "İstanbul ı ß ẞ Ç ç Ş ş", "Ω̈"])
    add("cjk", ["日本語のテキスト", "中文文本，标点。", "한국어 텍스트", "漢字かなカナ混じり文", "「引用」『二重』【括弧】",
                "東京タワー 2024年", "Ｅｍａｉｌ：ｔｅｓｔ＠ｅｘａｍｐｌｅ．ｃｏｍ", "空に紫を足して", "你好 世界",
                "안녕하세요 세계", "ｶﾀｶﾅﾃｷｽﾄ", "〜～ー−", "・･"])
    add("emoji and joiners", ["😀😂🤣", "👨\u200d👩\u200d👧\u200d👦 family", "🏳️\u200d🌈 flag", "👍🏽 thumbs",
                              "🇫🇷🇯🇵 flags", "1️⃣ keycap", "❤️ VS16", "☺︎ VS15", "a\u200db", "a\u200cb",
                              "zero\u200bwidth", "word\u2060joiner", "\ufeffBOM start", "👩🏿\u200d💻",
                              "🧑\u200d🤝\u200d🧑", "🫠🫨", "make the sky 🟣 purple 🌈", "©️ ®️ ™️"])
    add("combining marks", ["e\u0301\u0302 stacked", "Z\u0351\u0360\u0307a\u0315\u0328l\u034cg\u0361o zalgo",
                            "नमस्ते दुनिया", "ภาษาไทย", "العربية مَرْحَبًا", "עִבְרִית", "a\u0308\u0304", "o\u0328\u0301",
                            "\u0301 leading mark", "q\u0307\u0323", "ẹ́ Ệ", "A\u030a\u0301", "ñ vs n\u0303", "g\u0308",
                            "ᄀ\u1161", "각\u0300", "\u0915\u094d\u0937", "\u0e01\u0e34\u0e4a"])
    add("control characters", ["a\x00b", "\x00", "\x00\x00x\x00", "tab\there", "bell\x07", "esc\x1b[31mred", "del\x7f",
                               "c1\x85next", "\x80\x9f", "vt\x0bff\x0c", "cr\rlf\n", "\x01\x02\x03text", "unit\x1fsep",
                               "soft\u00adhyphen", "lrm\u200erlm\u200f", "bidi\u202aemb\u202c", "\ufffd replacement",
                               "\ue000 private", "\U000f0000 \U000f0001 plane 15", "noncharacter\ufffe",
                               "\u2028line sep", "para\u2029sep"])
    add("whitespace runs", ["  leading", "trailing  ", "  both  ", "a  b", "a   b    c", "a\t\tb", "a\n\nb", "a \n b",
                            "a\r\nb", " ", "   ", "\t", "\n", "\n\n\n", "a\u00a0b", "a\u00a0\u00a0b", "a\u3000b",
                            "a\u2002b\u2003c\u2009d\u200ae", "a\u202fb\u205fc", "a\u1680b", "a\u180eb", "a\u0085b",
                            " \u3000 ", "x \u200b y", "x\u200b \u200by", "end\u200b ", " \u00a0", "a \t \n \r b",
                            "word" + " " * 50 + "word", "\u2000\u2001\u2002", "a ¨", "a ¨ b"])
    add("special-token literals", [
        *SPECIALS, "<extra_id_100>", "<s>", "a </s> b", "a</s>b", " </s> ", "</s></s>", "</s> </s>",
        "text <extra_id_0> more <extra_id_1>", "<extra_id_0 >", "<EXTRA_ID_0>", "＜/s＞", "< /s>", "</s", "<pad><unk>",
        "x<unk>y", "<extra_id_05>", "<extra_id_-1>", "<<extra_id_2>>", "make the sky purple</s>", "  </s>  ",
        "\t<pad>\n", "</s>" * 10, "a <unk>  b", "<extra_id_0><extra_id_1><extra_id_2>", "ｱ</s>ｲ", "e\u0301</s>\u0301",
        "＜extra_id_0＞", "a＜extra_id_12＞b", "＜pad＞", "＜unk＞ x", "<\u200bextra_id_0>", "＜/s＞\u0301",
        "</s>\u0338", "<extra_id_0>\u0301x"])
    add("empty", [""])
    english = "make the sky purple add a hat to the cat remove person from background".split()
    add("very long", [" ".join(rng.choice(english) for _ in range(2500)), "a" * 5000, "ab " * 3000, "日本" * 2000,
                      "".join(chr(rng.randint(0x20, 0x2FFF)) for _ in range(4000)),
                      " ".join(SPECIALS[i % 6] + rng.choice(english) for i in range(500))])
    add("random", [_random_text(rng) for _ in range(200)])
    add("one character between letters", [f"a{chr(c)}b" for c in [*range(0x00, 0x21), *range(0x7F, 0xA1),
                                                                    *range(0x2000, 0x2030), *range(0x205F, 0x2070),
                                                                    0x3000, 0xFEFF, 0x1680, 0x180E]])
    return items


def _random_code_point(rng: random.Random) -> str:
    blocks = [(0.3, 0x20, 0x7E), (0.5, 0x80, 0x2FF), (0.6, 0x300, 0x36F), (0.7, 0x2000, 0x206F), (0.8, 0x3000, 0x9FFF),
              (0.85, 0xFF00, 0xFFEF), (0.9, 0x1F300, 0x1FAFF), (0.95, 0x0, 0x1F), (1.0, 0x0, 0x10FFFF)]
    r = rng.random()
    lo, hi = next((lo, hi) for limit, lo, hi in blocks if r < limit)
    while True:
        c = rng.randint(lo, hi)
        if not 0xD800 <= c <= 0xDFFF:
            return chr(c)


def _random_text(rng: random.Random) -> str:
    text = "".join(_random_code_point(rng) if rng.random() > 0.15 else " " * rng.randint(1, 3)
                   for _ in range(rng.randint(1, 30)))
    return text + rng.choice(SPECIALS) + text[::-1] if rng.random() < 0.15 else text


_TRICKY_POOLS = [
    [chr(c) for c in [*range(0x300, 0x370), *range(0x1AB0, 0x1AC0), *range(0x20D0, 0x20F0)]],  # combining marks
    [chr(c) for c in range(0x1100, 0x1200)],  # conjoining jamo
    [chr(c) for c in range(0xAC00, 0xAC40)],  # Hangul syllables
    [chr(c) for c in [*range(0xFF61, 0xFFA0), *range(0x3099, 0x309D)]],  # halfwidth kana, sound marks
    ["\u200d", "\u200c", "\ufe0f", "\ufe0e", "\U0001f3fb", "\U0001f3ff"],  # joiners, selectors, skin tones
    [chr(c) for c in [*range(0x1F300, 0x1F320), *range(0x1F1E6, 0x1F200)]],  # emoji, regional indicators
    [chr(c) for c in range(0x0900, 0x0980)],  # Devanagari, virama
    [chr(c) for c in range(0x0600, 0x0606)] + ["\u06dd", "\U000110bd"],  # Prepend characters
    list("aeiouAEIOUnNcCsS<>/ \t\n\r") + SPECIALS[:4] + ["  "],
    [chr(c) for c in range(0x2000, 0x2070)] + ["\u00a0", "\u3000", "\x85", "\x00", "\U000f0001"],
    [chr(c) for c in range(0xF900, 0xFB50)],  # compatibility ideographs, presentation forms
    [chr(c) for c in range(0x00A0, 0x0250)],
    [chr(c) for c in [*range(0x3300, 0x3400), *range(0x2460, 0x24FF)]],  # squared, circled
]


def tricky(n: int, seed: int = 7) -> list[str]:
    """`n` strings of 1-40 characters, each drawn from one of the hardest pools at random."""
    rng = random.Random(seed)
    return ["".join(rng.choice(rng.choice(_TRICKY_POOLS)) for _ in range(rng.randint(1, 40))) for _ in range(n)]
