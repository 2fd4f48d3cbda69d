"""Read a llama-family GGUF file: config, dequantized tensors and tokenizer metadata.

Parsing and dequantization are gguf-py's (`gguf.GGUFReader`, `gguf.quants.dequantize`); this
module adds what a runtime needs on top: every failure becomes a `RealmError` naming the file
and tensor, and every tensor is checked against the config (`layout.TENSOR_TABLE`) before
anything is dequantized (so nothing is half-loaded and a hostile size is refused before it is
allocated). Which tensor becomes which `Params` leaf is `layout.py`'s.

Layout facts (llama.cpp `convert_hf_to_gguf.py`, `LlamaModel.permute`): gguf-py gives each
tensor as a NumPy array whose shape is GGUF's `ne` reversed, so matrices are
[out_features, in_features]. The rows of `attn_q` / `attn_k` are permuted within every head
for GGML's adjacent-pair RoPE; we keep them as stored and rotate adjacent pairs (DESIGN §4),
so no tensor is permuted here.
"""

import dataclasses
import os
from typing import Any

import gguf
import numpy as np

from realm_jax.config import ModelConfig
from realm_jax.errors import GGUFError, UnsupportedModelError
from realm_jax.layout import TENSOR_TABLE

# Dequantized float32 bytes allowed per byte of file. The densest storage we accept is
# ~1.6 bits per weight (IQ1_S), i.e. ~20x expansion to float32; anything claiming more than
# this relative to the file's real size is a lie about shapes and is refused before allocation.
MAX_EXPANSION = 24


@dataclasses.dataclass(frozen=True)
class GGUFModelFile:
    """What `read_gguf` found in a model file.

    Attributes:
      path: the file.
      config: the model's `ModelConfig`.
      metadata: every key/value pair, decoded to Python values.
      tensors: GGUF tensor name -> float32 array, NumPy shape = GGUF `ne` reversed.
      tensor_types: GGUF tensor name -> storage type name (e.g. "Q4_1").
    """

    path: str
    config: ModelConfig
    metadata: dict[str, Any]
    tensors: dict[str, np.ndarray]
    tensor_types: dict[str, str]


class _Reader(gguf.GGUFReader):
    """`gguf.GGUFReader` over a plain-ndarray view of its memory map.

    The reader parses every metadata value, and dequantization splits every tensor, as slices
    of `self.data`. On its `np.memmap` each slice runs memmap's Python-level `__getitem__` and
    `__array_finalize__`: ~1.2 M calls for SmolLM2 (its 49,152-token vocabulary and merges,
    then its 211 quantized tensors). A plain view of the same mapping slices in C, with the
    same fields and tensors (still memory-mapped, nothing copied; the view keeps the map
    alive). `load_model` of SmolLM2 takes about half the time (docs/results.md, change 12).
    """

    @property
    def data(self) -> np.ndarray:
        return self._mapped

    @data.setter
    def data(self, value: np.ndarray) -> None:  # GGUFReader.__init__ assigns its np.memmap
        self._mapped = value.view(np.ndarray)


def open_gguf(path: str | os.PathLike) -> gguf.GGUFReader:
    """Parse a GGUF file's header, metadata and tensor index (memory-mapped, nothing copied).

    Raises:
      GGUFError: the file is missing, not GGUF, truncated or malformed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise GGUFError(f"{path}: no such file")
    if not os.path.isfile(path):
        raise GGUFError(f"{path}: not a file (a GGUF model is one file)")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise GGUFError(f"{path}: not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        return _Reader(path, "r")
    except Exception as e:  # gguf-py raises ValueError, KeyError, IndexError, OverflowError...
        raise GGUFError(f"{path}: malformed or truncated GGUF ({type(e).__name__}: {e})") from e


def read_metadata(reader: gguf.GGUFReader, path: str) -> dict[str, Any]:
    """Decode every key/value field of an open GGUF file to Python values."""
    metadata = {}
    for name, field in reader.fields.items():
        if name.startswith("GGUF."):
            continue
        try:
            value = field.contents()
        except Exception as e:
            raise GGUFError(f"{path}: metadata key {name!r} is malformed ({e})") from e
        metadata[name] = value
    return metadata


def check_tensor(path: str, tensor: Any, expected: tuple[int, ...], budget: list[int]) -> None:
    """Refuse a tensor whose type or shape is wrong, before any of it is dequantized."""
    qtype = tensor.tensor_type
    shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
    if shape != expected:
        raise GGUFError(f"{path}: tensor {tensor.name!r} has shape {shape}, expected {expected}")
    if qtype not in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16) and (
        qtype not in getattr(gguf.quants, "_type_traits", {})
    ):
        raise UnsupportedModelError(
            f"{path}: tensor {tensor.name!r} has type {qtype.name}, which gguf-py cannot dequantize"
        )
    budget[0] -= 4 * int(np.prod(shape, dtype=np.int64))
    if budget[0] < 0:
        raise GGUFError(
            f"{path}: tensor sizes exceed {MAX_EXPANSION}x the file size when dequantized; "
            "the metadata is inconsistent with the data"
        )


def read_gguf(path: str | os.PathLike) -> GGUFModelFile:
    """Read a llama-family GGUF model: config, float32 tensors and metadata.

    Every expected tensor is located and checked (name, shape, type, total size) before any is
    dequantized, so a bad file fails fast and nothing is half-loaded.

    Raises:
      GGUFError: unreadable, truncated or inconsistent file (missing tensor, wrong shape,
        unexpected tensor, absurd sizes).
      UnsupportedModelError: an architecture, file type or tensor type we do not run.
    """
    path = os.fspath(path)
    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    file_type = metadata.get("general.type", "model")
    if file_type != "model":
        raise UnsupportedModelError(
            f"{path}: general.type is {file_type!r}; load_model needs a model file "
            "(LoRA adapters load with load_adapter)"
        )
    by_name = {t.name: t for t in reader.tensors}
    try:
        config = ModelConfig.from_gguf_metadata(
            metadata, tied_embeddings="output.weight" not in by_name
        )
    except GGUFError as e:
        raise GGUFError(f"{path}: {e}") from e
    except UnsupportedModelError as e:
        raise UnsupportedModelError(f"{path}: {e}") from e
    scaling = metadata.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", None) or "rope_freqs.weight" in by_name:
        raise UnsupportedModelError(f"{path}: RoPE scaling ({scaling!r}) is not supported")

    expected: dict[str, tuple[int, ...]] = {}
    for spec in TENSOR_TABLE:
        if spec.leaf == "output" and config.tied_embeddings:
            continue
        layers = range(config.n_layers) if "{i}" in spec.gguf_name else [None]
        for i in layers:
            expected[spec.gguf_name.format(i=i)] = spec.shape(config)
    missing = [name for name in expected if name not in by_name]
    if missing:
        raise GGUFError(f"{path}: tensor {missing[0]!r} is missing ({len(missing)} missing)")
    unexpected = [name for name in by_name if name not in expected]
    if unexpected:
        raise GGUFError(f"{path}: unexpected tensor {unexpected[0]!r} for a llama model")

    budget = [MAX_EXPANSION * os.path.getsize(path)]
    for name, shape in expected.items():
        check_tensor(path, by_name[name], shape, budget)

    tensors, tensor_types = {}, {}
    for name, shape in expected.items():
        t = by_name[name]
        try:
            array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
        except Exception as e:
            raise GGUFError(f"{path}: tensor {name!r} cannot be dequantized ({e})") from e
        tensors[name] = np.asarray(array, dtype=np.float32)
        tensor_types[name] = t.tensor_type.name
    return GGUFModelFile(path, config, metadata, tensors, tensor_types)
