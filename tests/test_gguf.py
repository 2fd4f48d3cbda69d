"""GGUF loading: configs and tensors from synthetic files, and every kind of bad file."""

import dataclasses
import signal
import struct

import gguf
import numpy as np
import pytest

import realm_jax as rj
from realm_jax.config import tiny
from realm_jax.errors import GGUFError, UnsupportedModelError
from realm_jax.gguf import open_gguf, read_gguf
from realm_jax.testing import random_tensors, write_gguf

CONFIG = tiny(vocab_size=300)


@pytest.fixture(scope="module")
def good_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(path, CONFIG, random_tensors(CONFIG), qtype="Q8_0")
    return path


class _Timeout:
    """Fail instead of hanging: a hostile file must never make the loader spin."""

    def __init__(self, seconds: int):
        self.seconds = seconds

    def __enter__(self):
        def raise_timeout(signum, frame):
            raise AssertionError(f"loading took more than {self.seconds} s")

        self.previous = signal.signal(signal.SIGALRM, raise_timeout)
        signal.alarm(self.seconds)

    def __exit__(self, *exc):
        signal.alarm(0)
        signal.signal(signal.SIGALRM, self.previous)


def _load_or_realm_error(path) -> bool:
    """Load a possibly damaged file: True if it loaded, False on RealmError; else fail."""
    with _Timeout(20):
        try:
            rj.load_model(path)
            return True
        except rj.RealmError as e:
            assert str(path) in str(e) or "model config" in str(e), e
            return False


def test_config_from_metadata(good_file):
    contents = read_gguf(good_file)
    # GGUF stores the epsilon as float32
    assert contents.config == dataclasses.replace(CONFIG, norm_eps=float(np.float32(1e-5)))
    assert contents.tensor_types["blk.0.attn_q.weight"] == "Q8_0"
    assert contents.tensor_types["output_norm.weight"] == "F32"


@pytest.mark.parametrize("tied", [True, False])
def test_tensors_round_trip(tmp_path, tied):
    config = tiny(vocab_size=300, tied_embeddings=tied)
    tensors = random_tensors(config, seed=3)
    write_gguf(tmp_path / "m.gguf", config, tensors, qtype="F32")
    contents = read_gguf(tmp_path / "m.gguf")
    assert contents.config.tied_embeddings is tied
    assert ("output.weight" in contents.tensors) is not tied
    assert set(contents.tensors) == set(tensors)
    for name, array in tensors.items():
        np.testing.assert_array_equal(contents.tensors[name], array, err_msg=name)


def test_reader_parses_as_gguf_py_does(good_file):
    """open_gguf's reader (plain-ndarray view of the map) gives gguf-py's fields and tensors."""
    ours, theirs = open_gguf(good_file), gguf.GGUFReader(good_file, "r")
    assert type(ours.data) is np.ndarray and isinstance(theirs.data, np.memmap)
    assert list(ours.fields) == list(theirs.fields)
    for key, field in theirs.fields.items():
        assert ours.fields[key].types == field.types, key
        assert ours.fields[key].contents() == field.contents(), key
    assert [t.name for t in ours.tensors] == [t.name for t in theirs.tensors]
    for a, b in zip(ours.tensors, theirs.tensors, strict=True):
        assert a.tensor_type == b.tensor_type and a.shape.tolist() == b.shape.tolist()
        np.testing.assert_array_equal(a.data, b.data, err_msg=a.name)


def test_not_a_file(tmp_path):
    with pytest.raises(GGUFError, match="no such file"):
        rj.load_model(tmp_path / "missing.gguf")
    with pytest.raises(GGUFError, match="not a file"):
        rj.load_model(tmp_path)  # a folder


def test_not_gguf(tmp_path):
    path = tmp_path / "x.gguf"
    path.write_bytes(b"PK\x03\x04" + bytes(100))
    with pytest.raises(GGUFError, match="not a GGUF file"):
        rj.load_model(path)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(GGUFError):
        rj.load_model(path)


def test_truncated_at_many_offsets(good_file, tmp_path):
    data = good_file.read_bytes()
    rng = np.random.default_rng(0)
    offsets = sorted(set(range(0, 64, 3)) | set(rng.integers(64, len(data) - 1, size=40).tolist()))
    for offset in offsets:
        path = tmp_path / f"cut{offset}.gguf"
        path.write_bytes(data[:offset])
        assert not _load_or_realm_error(path), f"a file cut at {offset} loaded"


def test_random_byte_flips(good_file, tmp_path):
    """Flipped bytes either load (a changed weight or name-neutral byte) or raise RealmError."""
    data = bytearray(good_file.read_bytes())
    rng = np.random.default_rng(1)
    header_end = data.find(b"blk.1.ffn_down") + 200  # flips concentrated in the metadata
    outcomes = []
    for trial in range(60):
        damaged = bytearray(data)
        limit = header_end if trial % 2 == 0 else len(data)
        for offset in rng.integers(0, limit, size=3):
            damaged[offset] ^= 1 << int(rng.integers(0, 8))
        path = tmp_path / f"flip{trial}.gguf"
        path.write_bytes(bytes(damaged))
        outcomes.append(_load_or_realm_error(path))
    assert not all(outcomes), "no flip was detected: the test cannot fail"


def _patch_u64_after(data: bytes, marker: bytes, value: int, skip: int = 0) -> bytes:
    """Overwrite the little-endian uint64 found `skip` bytes after `marker`."""
    at = data.index(marker) + len(marker) + skip
    return data[:at] + struct.pack("<Q", value) + data[at + 8 :]


def test_hostile_tensor_dims(good_file, tmp_path):
    """A tensor claiming 2**40 x 2**20 elements is refused without allocating it."""
    data = good_file.read_bytes()
    name = b"token_embd.weight"
    # tensor info: name, n_dims (u32), dims (u64 each), type (u32), offset (u64)
    hostile = _patch_u64_after(data, name, 1 << 40, skip=4)
    hostile = _patch_u64_after(hostile, name, 1 << 20, skip=12)
    path = tmp_path / "hostile.gguf"
    path.write_bytes(hostile)
    assert not _load_or_realm_error(path)


@pytest.mark.parametrize(
    "key,value",
    [
        ("llama.block_count", 1 << 31),
        ("llama.embedding_length", 1 << 30),
        ("llama.vocab_size", (1 << 32) - 1),
        ("llama.context_length", 1 << 31),
        ("llama.attention.head_count", 0),
        ("llama.attention.head_count_kv", 3),
    ],
)
def test_hostile_metadata(tmp_path, key, value):
    config = CONFIG
    write_gguf(tmp_path / "m.gguf", config, random_tensors(config))
    reader = gguf.GGUFReader(tmp_path / "m.gguf", "r+")
    field = reader.fields[key]
    field.parts[field.data[0]][...] = value
    del reader
    with pytest.raises(rj.RealmError):
        rj.load_model(tmp_path / "m.gguf")


def test_huge_string_array_count(good_file, tmp_path):
    """A token list claiming 2**60 entries fails fast instead of looping."""
    data = good_file.read_bytes()
    key = b"tokenizer.ggml.tokens"
    hostile = _patch_u64_after(data, key, 1 << 60, skip=8)  # value type u32, array type u32
    path = tmp_path / "count.gguf"
    path.write_bytes(hostile)
    assert not _load_or_realm_error(path)


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "m.gguf", CONFIG, random_tensors(CONFIG), arch="mamba")
    with pytest.raises(UnsupportedModelError, match="architecture 'mamba'"):
        rj.load_model(tmp_path / "m.gguf")


def test_missing_tensor(tmp_path):
    tensors = random_tensors(CONFIG)
    del tensors["blk.1.ffn_up.weight"]
    write_gguf(tmp_path / "m.gguf", CONFIG, tensors)
    with pytest.raises(GGUFError, match=r"'blk\.1\.ffn_up\.weight' is missing"):
        rj.load_model(tmp_path / "m.gguf")


def test_wrong_shape(tmp_path):
    tensors = random_tensors(CONFIG)
    tensors["blk.0.attn_k.weight"] = tensors["blk.0.attn_q.weight"]
    write_gguf(tmp_path / "m.gguf", CONFIG, tensors)
    with pytest.raises(GGUFError, match=r"'blk\.0\.attn_k\.weight' has shape \(64, 64\)"):
        rj.load_model(tmp_path / "m.gguf")


def test_unexpected_tensor(tmp_path):
    tensors = random_tensors(CONFIG)
    tensors["blk.5.attn_q.weight"] = tensors["blk.0.attn_q.weight"]
    write_gguf(tmp_path / "m.gguf", CONFIG, tensors)
    with pytest.raises(GGUFError, match=r"unexpected tensor 'blk\.5\.attn_q\.weight'"):
        rj.load_model(tmp_path / "m.gguf")


def test_unsupported_tensor_type(tmp_path):
    tensors = random_tensors(CONFIG)
    path = tmp_path / "m.gguf"
    write_gguf(path, CONFIG, tensors)
    reader = gguf.GGUFReader(path, "r+")
    tensor = next(t for t in reader.tensors if t.name == "output_norm.weight")
    tensor.field.parts[4][...] = gguf.GGMLQuantizationType.I32  # same size as F32
    del reader
    with pytest.raises(UnsupportedModelError, match=r"'output_norm\.weight' has type I32"):
        rj.load_model(path)


def test_adapter_file_is_not_a_model(tmp_path):
    write_gguf(
        tmp_path / "m.gguf",
        CONFIG,
        random_tensors(CONFIG),
        extra_metadata={"general.type": "adapter"},
    )
    with pytest.raises(UnsupportedModelError, match="load_adapter"):
        rj.load_model(tmp_path / "m.gguf")
