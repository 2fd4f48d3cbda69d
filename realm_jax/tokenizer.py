"""`Tokenizer`: text to token ids and back for a GGUF vocabulary, and its chat template.

Two vocabulary kinds, read as llama.cpp reads them (`src/llama-vocab.cpp`, `impl::load`):
- `tokenizer.ggml.model = "gpt2"`: byte-level BPE. HF `tokenizers` runs `models.BPE` over the
  GGUF tokens and merges, behind the split regexes llama.cpp keeps for the file's
  `tokenizer.ggml.pre`, so the ids are llama.cpp's.
- `tokenizer.ggml.model = "llama"`: SentencePiece BPE with byte fallback. The vocabulary is
  written out as a sentencepiece `ModelProto` (serialized by hand below, so protobuf is not a
  dependency) and encoded by `sentencepiece`.
Special tokens (CONTROL, USER_DEFINED, UNKNOWN) written in the text are cut out first, by
llama.cpp's rule (`tokenizer_st_partition`), so both kinds parse them alike. Decoding is ours:
one byte string per id, joined and read as UTF-8.

Not here: reading the file (`gguf.py`), stopping rules (`generation.py`), and the other kinds
llama.cpp knows (WordPiece, Unigram, RWKV), which raise `TokenizerError`.
"""

import codecs
import datetime
import functools
import json
import operator
import re
import struct
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2.ext
import sentencepiece
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment, SecurityError

from realm_jax.errors import TokenizerError

# GGUF token types (gguf-py `TokenType`, llama.h `llama_token_type`); sentencepiece's
# `ModelProto.SentencePiece.Type` uses the same numbers for 1..6.
UNDEFINED, NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = range(7)
# Token types matched in the text before tokenizing (llama.cpp `cache_special_tokens`).
SPECIAL_TYPES = frozenset({UNKNOWN, CONTROL, USER_DEFINED})
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")

# Pre-tokenizer regexes, verbatim from llama.cpp `src/llama-vocab.cpp` (commit 00ad355e, the
# `llm_tokenizer_bpe` constructor: one list per LLAMA_VOCAB_PRE_TYPE_*). llama.cpp applies them
# in order, each cutting every piece left by the previous one into its matches and the text
# between them (`unicode_regex_split` in `src/unicode.cpp`): that is `Split(behavior="isolated")`.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
_QWEN2 = _LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
_QWEN35 = (
    _CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
PRE_TOKENIZER_REGEXES: dict[str, tuple[str, ...]] = {
    "default": (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
    "gpt2": (_GPT2,),
    "starcoder": (r"\p{N}", _GPT2),
    "llama3": (_LLAMA3,),
    "qwen2": (_QWEN2,),
    "qwen35": (_QWEN35,),
    "falcon": (r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"),
    # llama.cpp runs "[一-龥ࠀ-一가-퟿]+" on text whose non-ASCII spaces became \x0B, so the
    # range U+0800-U+4E00 never takes U+2028 or U+3000: "&&\S" says the same to Oniguruma.
    "deepseek-coder": ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", r"[一-龥ࠀ-一가-퟿&&\S]+", r"\p{N}"),
    "bloom": (r" ?[^(\s|.,!?…。，、।۔،)]+",),
}
# `tokenizer.ggml.pre` -> regex set, as `impl::load` maps names to LLAMA_VOCAB_PRE_TYPE_*.
PRE_TYPES: dict[str, str] = {
    name: group.strip()
    for line in """default: default
        gpt2: gpt-2 phi-2 mpt olmo jais gigachat a.x-4.0 mellum exaone4 trillion granite-docling
        starcoder: starcoder refact command-r smollm codeshell exaone minerva-7b mellum2
        llama3: llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2 dbrx smaug-bpe
        qwen2: qwen2 deepseek-r1-qwen kormo f2llmv2 megrez stablelm2 hunyuan solar-open
        qwen35: qwen35
        falcon: falcon
        deepseek-coder: deepseek-coder
        bloom: bloom gpt3-finnish poro-chat""".splitlines()
    for group, names in [line.split(":")]
    for name in names.split()
}
# The pre types for which `impl::load` sets `ignore_merges = true` (a word that is a token is
# taken whole) and `add_bos = true` (the default when `tokenizer.ggml.add_bos_token` is absent).
LLAMA3_FLAGS = frozenset(
    "llama3 llama-v3 llama-bpe falcon3 falcon-h1 pixtral midm-2.0 lfm2".split()
)


def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (llama.cpp `unicode_byte_to_utf8_map`)."""
    printable = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    others = [b for b in range(256) if b not in printable]
    return {b: chr(b) for b in printable} | {b: chr(256 + k) for k, b in enumerate(others)}


UNICODE_TO_BYTE = {char: bytes([b]) for b, char in _byte_to_unicode().items()}


def _varint(value: int) -> bytes:
    """Protobuf base-128 varint; negative numbers as 64-bit two's complement, as int32 is."""
    value &= (1 << 64) - 1
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    return bytes(out + bytes([value]))


def _field(number: int, value: bytes | str | float | int) -> bytes:
    """One protobuf field: str/bytes length-delimited, float fixed32, int/bool/enum varint."""
    value = value.encode() if isinstance(value, str) else value
    if isinstance(value, bytes):
        return _varint(number << 3 | 2) + _varint(len(value)) + value
    if isinstance(value, float):
        return _varint(number << 3 | 5) + struct.pack("<f", value)
    return _varint(number << 3) + _varint(int(value))


def sentencepiece_model_proto(tokens, types, scores, unk_id: int, add_dummy_prefix: bool) -> bytes:
    """Serialize a BPE `sentencepiece.ModelProto` with an identity normalizer.

    Field numbers are sentencepiece's `sentencepiece_model.proto` (read from the descriptor in
    its `sentencepiece_model_pb2.py` 0.2.3): ModelProto pieces=1, trainer_spec=2,
    normalizer_spec=3; SentencePiece piece=1, score=2, type=3; TrainerSpec model_type=3 (BPE=2),
    vocab_size=4, byte_fallback=35; NormalizerSpec name=1, add_dummy_prefix=3,
    remove_extra_whitespaces=4, escape_whitespaces=5. No charsmap means no normalization, as in
    llama.cpp's SPM path, which only escapes spaces as "▁" and adds the leading one.
    """
    pieces = []
    for i, (text, kind, score) in enumerate(zip(tokens, types, scores, strict=True)):
        if i == unk_id:
            kind = UNKNOWN
        elif kind == UNKNOWN:  # sentencepiece allows one UNKNOWN piece; ours are cut out anyway
            kind = CONTROL
        elif kind == UNDEFINED:
            kind = NORMAL
        pieces.append(_field(1, _field(1, text) + _field(2, float(score)) + _field(3, kind)))
    trainer = _field(3, 2) + _field(4, len(tokens)) + _field(35, BYTE in types)
    normalizer = b"".join([_field(1, "identity"), _field(3, add_dummy_prefix), _field(4, False)])
    return b"".join(pieces) + _field(2, trainer) + _field(3, normalizer + _field(5, True))


# What `_Metadata` says a key must be.
_KINDS = {str: "a string", bool: "a bool", int: "an int", (int, float): "a number"}


class _Metadata:
    """Typed reads of `tokenizer.*` GGUF keys; every failure names the file and the key."""

    def __init__(self, meta: Mapping[str, Any], source: str):
        self.meta, self.source = meta, source

    def error(self, key: str, message: str) -> TokenizerError:
        sep = "" if message.startswith("[") else " "  # "key[3] = ..." or "key is ..."
        return TokenizerError(f"{self.source}: tokenizer.{key}{sep}{message}")

    def get(self, key: str, kind: type | tuple, default: Any = None, what: str = "") -> Any:
        value = self.meta.get("tokenizer." + key, default)
        if "tokenizer." + key in self.meta and not _is(value, kind):
            what = what or _KINDS[kind]
            raise self.error(key, f"must be {what}, got {type(value).__name__} {value!r:.60}")
        return value

    def get_list(self, key: str, kind: type | tuple, length: int | None = None) -> list | None:
        values = self.get(key, (list, tuple), what=f"a list of {_KINDS[kind]}s")
        bad = next((i for i, value in enumerate(values or ()) if not _is(value, kind)), None)
        if bad is not None:
            raise self.error(key, f"[{bad}] = {values[bad]!r:.60} is not {_KINDS[kind]}")
        if values is not None and length is not None and len(values) != length:
            raise self.error(key, f"has {len(values)} entries for {length} tokens")
        return None if values is None else list(values)

    def token_id(self, key: str, n_tokens: int, default: int | None) -> int | None:
        value = self.get(key, int, default)
        if value is not None and not 0 <= value < n_tokens:
            raise self.error(key, f"= {value} is outside the vocabulary of {n_tokens} tokens")
        return value


def _is(value: Any, kind: type | tuple) -> bool:
    """isinstance, except that a bool is not an int (GGUF has both)."""
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return isinstance(value, kinds) and (bool in kinds or not isinstance(value, bool))


class _ChatTemplateSandbox(ImmutableSandboxedEnvironment):
    """HF's chat-template environment, raising on unsafe attributes instead of hiding them.

    Templates come from the model file, i.e. from strangers: CVE-2024-34359 ran code from a GGUF
    template rendered outside a sandbox. Jinja's sandbox turns `''.__class__` into an undefined
    value that prints as nothing; raising makes an escape attempt a loud `TokenizerError`.
    """

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        raise SecurityError(f"access to {attribute!r} of a {type(obj).__name__} is unsafe")


@functools.cache
def _chat_template_environment() -> _ChatTemplateSandbox:
    """The environment transformers builds in `_compile_jinja_template`, with its helpers."""

    def raise_exception(message: str):
        raise jinja2.TemplateError(message)

    def tojson(value: Any, ensure_ascii: bool = False, **options: Any) -> str:
        # HF's filter: unlike Jinja's own it does not HTML-escape <, >, & and '.
        return json.dumps(value, ensure_ascii=ensure_ascii, **options)

    env = _ChatTemplateSandbox(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.datetime.now().strftime(fmt)
    return env


class Tokenizer:
    """Encode text to token ids and back, as llama.cpp does for the same GGUF vocabulary.

    Attributes:
      model: "gpt2" (byte-level BPE) or "llama" (SentencePiece).
      pre: the pre-tokenizer type (`tokenizer.ggml.pre`, "default" when absent).
      vocab_size: number of tokens.
      bos_id, eos_id, pad_id, unk_id: special token ids, or None where the vocabulary has none.
      add_bos, add_eos: whether `encode` puts BOS first / EOS last.
      chat_template: the Jinja chat template (`tokenizer.chat_template`), or None.
      source: where the metadata came from, for error messages.
    """

    def __init__(self, meta: Mapping[str, Any], source: str = "<gguf>"):
        """Same as `Tokenizer.from_gguf_metadata(meta, source)`."""
        md, self.source = _Metadata(meta, source), source
        self.model = md.get("ggml.model", str)
        if self.model not in ("gpt2", "llama"):
            raise md.error("ggml.model", f"= {self.model!r}: supported are 'gpt2' and 'llama'")
        tokens = md.get_list("ggml.tokens", str)
        if not tokens:
            raise md.error("ggml.tokens", "is missing or empty")
        # llama.cpp renames empty tokens (`[EMPTY_i]`) and refuses duplicates.
        self._tokens = tokens = [text or f"[EMPTY_{i}]" for i, text in enumerate(tokens)]
        index = {text: i for i, text in enumerate(tokens)}
        if len(index) != len(tokens):
            dup = next(i for i, text in enumerate(tokens) if index[text] != i)
            raise md.error(
                "ggml.tokens", f"[{dup}] = {tokens[dup]!r} is also [{index[tokens[dup]]}]"
            )
        self.vocab_size = n = len(tokens)
        self._types = types = md.get_list("ggml.token_type", int, n) or [NORMAL] * n
        fits = (
            0 <= k <= BYTE and (k != BYTE or BYTE_TOKEN.fullmatch(tokens[i]))
            for i, k in enumerate(types)
        )
        bad = next((i for i, ok in enumerate(fits) if not ok), None)
        if bad is not None:
            message = f"[{bad}] = {types[bad]} is no token type (0..6) for {tokens[bad]!r}"
            raise md.error("ggml.token_type", message)
        spm = self.model == "llama"
        self.pre = md.get("ggml.pre", str, "default")
        if not spm and self.pre not in PRE_TYPES:  # llama.cpp ignores the pre type of SPM
            supported = ", ".join(sorted(PRE_TYPES))
            raise md.error("ggml.pre", f"= {self.pre!r} is not supported; supported: {supported}")
        # Defaults where a key is absent are llama.cpp's (`impl::load`): SPM has BOS 1, EOS 2,
        # UNK 0 and adds BOS and a leading space; BPE adds BOS only for the llama3 family.
        self.bos_id = md.token_id("ggml.bos_token_id", n, 1 if spm and n > 1 else None)
        self.eos_id = md.token_id("ggml.eos_token_id", n, 2 if spm and n > 2 else None)
        self.pad_id = md.token_id("ggml.padding_token_id", n, None)
        self.unk_id = md.token_id("ggml.unknown_token_id", n, 0 if spm else None)
        self.add_bos = md.get("ggml.add_bos_token", bool, spm or self.pre in LLAMA3_FLAGS)
        self.add_eos = md.get("ggml.add_eos_token", bool, False)
        space_prefix = md.get("ggml.add_space_prefix", bool, spm)
        self.chat_template = md.get("chat_template", str)
        for which, token_id in [("bos", self.bos_id), ("eos", self.eos_id)]:
            if getattr(self, f"add_{which}") and token_id is None:
                message = f"is true but tokenizer.ggml.{which}_token_id is not set"
                raise md.error(f"ggml.add_{which}_token", message)
        if spm:
            scores = md.get_list("ggml.scores", (int, float), n) or [0.0] * n
            encoder = _sentencepiece_encoder(md, tokens, types, scores, self.unk_id, space_prefix)
        else:
            merges = md.get_list("ggml.merges", str)
            if merges is None:
                raise md.error("ggml.merges", "is missing (a gpt2 vocabulary needs it)")
            encoder = _bpe_encoder(md, index, merges, self.pre)
        self._encode_text = encoder
        # SentencePiece writes a "▁" before the text and after each special token
        # (`add_dummy_prefix`; llama.cpp `tokenize`, `is_prev_special`); decoding drops it there.
        self._strip_dummy_space = spm and space_prefix
        # Longest first, as llama.cpp sorts `cache_special_tokens`; ties by id.
        specials = [i for i, kind in enumerate(types) if kind in SPECIAL_TYPES]
        self._specials = sorted(specials, key=lambda i: (-len(tokens[i]), i))
        self._pieces = list(map(self._piece_bytes, tokens, types))

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], source: str = "<gguf>") -> "Tokenizer":
        """Build the tokenizer from decoded GGUF key/value metadata.

        Args:
          meta: GGUF keys -> Python values, as `gguf.GGUFReader(path).fields[key].contents()`.
          source: the file name, for error messages.

        Raises:
          TokenizerError: a key is missing or malformed, or the vocabulary kind or pre-tokenizer
            type is not supported (the message lists the supported ones).
        """
        return cls(meta, source)

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.source!r}, model={self.model!r}, pre={self.pre!r}, "
            f"vocab_size={self.vocab_size}, bos_id={self.bos_id}, eos_id={self.eos_id})"
        )

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special tokens written in it become their ids.

        BOS comes first only if `add_bos`, EOS last only if `add_eos` (llama.cpp `tokenize`
        with add_special=true, parse_special=true).

        Raises:
          TokenizerError: `text` is not a string or holds lone surrogates (not Unicode).
        """
        if not isinstance(text, str):
            raise TokenizerError(f"{self.source}: encode takes a str, got {type(text).__name__}")
        ids = [self.bos_id] if self.add_bos else []
        try:
            for part in self._split_special(text):
                ids.extend([part] if isinstance(part, int) else self._encode_text(part))
        except UnicodeEncodeError as e:
            raise TokenizerError(f"{self.source}: text is not valid Unicode ({e})") from e
        return ids + ([self.eos_id] if self.add_eos else [])

    def _split_special(self, text: str) -> list[str | int]:
        """Cut special token texts out of `text`: llama.cpp `tokenizer_st_partition`.

        Each special token, longest first, splits every text fragment left so far at its
        non-overlapping occurrences from the left, so "<|im_start|>" wins over a shorter
        token inside it. (A regex alternation would instead take whichever starts first.)
        """
        parts: list[str | int] = [text] if text else []
        for token_id in self._specials:
            special = self._tokens[token_id]
            if not any(isinstance(part, str) and special in part for part in parts):
                continue
            split: list[str | int] = []
            for part in parts:
                if isinstance(part, int):
                    split.append(part)
                    continue
                for k, piece in enumerate(part.split(special)):
                    split.extend(([token_id] if k else []) + ([piece] if piece else []))
            parts = split
        return parts

    def _piece_bytes(self, text: str, kind: int) -> bytes:
        """The bytes token `text` stands for (llama.cpp `token_to_piece` with special=true)."""
        if kind in SPECIAL_TYPES:
            return text.encode()
        if kind == BYTE:
            return bytes([int(BYTE_TOKEN.fullmatch(text)[1], 16)])
        # NORMAL, and UNUSED / UNDEFINED too (llama.cpp prints nothing for those two; their
        # text is more useful). A character outside the byte alphabet stands for itself.
        if self.model == "llama":
            return text.replace("▁", " ").encode()
        return b"".join(UNICODE_TO_BYTE.get(char) or char.encode() for char in text)

    def _piece(self, token_id: int, after_special: bool) -> tuple[bytes, bool]:
        """Bytes of one token in context, and whether the next one follows a special token."""
        try:
            i = operator.index(token_id)
        except TypeError:
            raise TokenizerError(f"{self.source}: token id {token_id!r} is not an int") from None
        if not 0 <= i < self.vocab_size:
            raise TokenizerError(
                f"{self.source}: token id {i} is outside the vocabulary of {self.vocab_size} tokens"
            )
        piece, kind = self._pieces[i], self._types[i]
        special = kind in SPECIAL_TYPES
        if self._strip_dummy_space and after_special and not special and kind != BYTE:
            piece = piece.removeprefix(b" ")
        return piece, special

    def decode(self, ids: Sequence[int]) -> str:
        """Text of `ids`, the inverse of `encode` (after dropping the BOS / EOS it adds).

        Special tokens give their text. For SentencePiece vocabularies the space `encode`
        writes at the start and after each special token is dropped. Bytes that are not
        UTF-8 become U+FFFD.

        Raises:
          TokenizerError: an id is not an int in [0, vocab_size).
        """
        pieces, after_special = [], True
        for token_id in ids:
            piece, after_special = self._piece(token_id, after_special)
            pieces.append(piece)
        return b"".join(pieces).decode("utf-8", errors="replace")

    def decode_stream(self, context: Sequence[int] | None = None) -> "IncrementalDecoder":
        """An `IncrementalDecoder` for ids that arrive one at a time.

        Args:
          context: ids that come before the streamed ones (say the prompt); they print
            nothing. After an empty context or a special token, the first piece loses the
            SentencePiece space as in `decode`. None (default) continues ordinary text, which
            is what streaming a continuation of a prompt needs.
        """
        after_special = context is not None and (not context or self._piece(context[-1], 0)[1])
        return IncrementalDecoder(self, after_special)

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored (e.g. "Ġthe", "▁the", "<0x0A>")."""
        self._piece(token_id, False)
        return self._tokens[token_id]

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = False, **kwargs: Any
    ) -> str:
        """Render `tokenizer.chat_template` for `messages`, as transformers does.

        The template runs in Jinja's immutable sandbox with `trim_blocks` and `lstrip_blocks`,
        HF's `tojson`, `raise_exception` and `strftime_now`, and `bos_token` / `eos_token`
        (strings), `tools=None`, `documents=None`; `kwargs` add or override variables.

        Raises:
          TokenizerError: there is no template, it does not compile, it fails (including its
            own `raise_exception`), or it tries to leave the sandbox.
        """
        if self.chat_template is None:
            raise TokenizerError(f"{self.source}: no chat template (tokenizer.chat_template)")
        text = {None: ""} | dict(enumerate(self._tokens))
        variables = dict(
            bos_token=text[self.bos_id], eos_token=text[self.eos_id], tools=None, documents=None
        )
        try:
            template = _chat_template_environment().from_string(self.chat_template)
            return template.render(
                variables | kwargs, messages=messages, add_generation_prompt=add_generation_prompt
            )
        except Exception as e:  # the template is code from the file: any failure is its own
            raise TokenizerError(
                f"{self.source}: tokenizer.chat_template failed: {type(e).__name__}: {e}"
            ) from e


class IncrementalDecoder:
    """Text of token ids pushed one at a time, holding back incomplete UTF-8 sequences.

    The concatenated `push` outputs plus `flush()` equal `tokenizer.decode(ids)` for a decoder
    made by `decode_stream(context=[])`.
    """

    def __init__(self, tokenizer: Tokenizer, after_special: bool):
        self._tokenizer, self._after_special = tokenizer, after_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        """The text that `token_id` completes ("" while a character is still partial)."""
        piece, self._after_special = self._tokenizer._piece(token_id, self._after_special)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """Whatever is held back, as U+FFFD for an unfinished character; resets the decoder."""
        return self._utf8.decode(b"", final=True)


def _bpe_encoder(md: _Metadata, index: dict[str, int], merges: list[str], pre: str) -> Callable:
    """Byte-level BPE in `tokenizers` behind llama.cpp's regexes for pre type `pre`."""
    pairs, seen = [], set()
    for i, merge in enumerate(merges):
        cut = merge.find(" ", 1)  # llama.cpp splits at the first space after the first char
        if cut < 0:
            raise md.error("ggml.merges", f"[{i}] = {merge!r} is not 'left right'")
        pair = (merge[:cut], merge[cut + 1 :])
        # llama.cpp keeps the first rank of a repeated pair (`bpe_ranks.emplace`), where
        # tokenizers would keep the last. A merge whose parts or result are not tokens cannot
        # be given to tokenizers; llama.cpp would apply it and then spell the result in bytes.
        if pair not in seen and pair[0] in index and pair[1] in index and "".join(pair) in index:
            seen.add(pair)
            pairs.append(pair)
    pre_tokenizers = tokenizers.pre_tokenizers
    splits = [
        pre_tokenizers.Split(tokenizers.Regex(regex), behavior="isolated")
        for regex in PRE_TOKENIZER_REGEXES[PRE_TYPES[pre]]
    ]
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    # A byte missing from the vocabulary: llama.cpp merges around it and drops it at the end,
    # tokenizers would drop it first and merge its neighbours. An out-of-vocabulary placeholder
    # id (`n`, never a merge part) keeps it in place until we drop it.
    n = len(index)
    vocab = index | {"\x00<missing byte>": n}
    try:
        bpe = tokenizers.models.BPE(
            vocab, pairs, unk_token="\x00<missing byte>", ignore_merges=pre in LLAMA3_FLAGS
        )
    except Exception as e:  # tokenizers raises plain Exception for a bad vocabulary
        raise md.error("ggml.tokens", f"cannot make a BPE model: {e}") from e
    hf = tokenizers.Tokenizer(bpe)
    hf.pre_tokenizer = pre_tokenizers.Sequence([*splits, byte_level])
    return lambda text: [i for i in hf.encode(text, add_special_tokens=False).ids if i != n]


def _sentencepiece_encoder(md: _Metadata, tokens, types, scores, unk_id, space_prefix) -> Callable:
    """SentencePiece BPE over the GGUF pieces: llama.cpp's SPM merge order and byte fallback."""
    byte_values = {int(tokens[i][3:5], 16) for i, kind in enumerate(types) if kind == BYTE}
    if byte_values and len(byte_values) != 256:
        missing = min(set(range(256)) - byte_values)
        message = f"has {len(byte_values)} byte tokens, not 256 (<0x{missing:02X}> is missing)"
        raise md.error("ggml.tokens", message)
    proto = sentencepiece_model_proto(tokens, types, scores, unk_id, space_prefix)
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, OSError) as e:
        raise md.error("ggml.tokens", f"is no SentencePiece vocabulary: {e}") from e
    return processor.encode
