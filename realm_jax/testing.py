"""Test support shared by tests and experiments: the tolerance table, `assert_close`, and
tiny random llama models written as real GGUF files with `gguf.GGUFWriter`.

The tolerance table is the only place a tolerance is written; values come from
`shared/golden/README.md` and the dtype, and no test loosens them.
"""

import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import gguf
import numpy as np

from realm_jax.config import ModelConfig, tiny
from realm_jax.tokenizer import _byte_to_unicode

# (dtype, comparison) -> (atol, rtol). "logits": a whole-model float32 forward against float32
# golden logits or the float64 reference (golden README: observed 3e-5..1.6e-4 on SmolLM2,
# whose logits span ~40; 5e-4 leaves headroom for summation order, while layout bugs err by
# 0.5 to 9). "op": one float32 op (attention, norm, rope) against float64: a few ulps of the
# output scale times sqrt of the reduction length.
# ("bfloat16", "logits"): a whole bfloat16 forward against the float32 forward of the same
# weights, with atol in units of each position's float32 logit range (max - min over the
# vocabulary): divide both sides by it (tests/test_bfloat16.py). Derivation: each rounding to
# bfloat16 errs by at most u = 2^-8 relative (rms u/sqrt(3)), reductions accumulate in float32
# (negligible), and this forward rounds k ~ 13 activations per layer (2 norms, 4 projections,
# RoPE, probabilities, attention output, SiLU, its product, 2 residual adds), so over L
# layers the final hidden state, hence the logits, err by ~ (u/sqrt(3)) sqrt(k L) kappa of the
# logits' std: kappa is the residual stream's cancellation (its peak rms over its final rms).
# With Gaussian logits max|error| / range ~ half that ratio (both extremes scale with
# sqrt(2 ln V)). SmolLM2 (L = 30) at its first position, whose residual stream peaks at rms
# 945 (one feature 2.25e4) and ends at 208, kappa = 4.5: 0.100 (0.115 counting the weights'
# rounding as 4 more per layer), hence 0.1. Measured on CPU, 5 golden prompts: SmolLM2 worst
# 0.050 (position 0; <= 0.030 elsewhere, medians 0.007-0.013; rms/std 0.02-0.035 there vs
# 0.045 predicted for kappa = 1), the same loading one file as float32 and as bfloat16
# (rounding the weights alone: 0.004-0.007); top-1 agreed except at 4 of 342 long-prompt
# positions, margins 0.012-0.10; per-token KL <= 0.020. config.tiny (L = 2, kappa ~ 1):
# 0.0037-0.0061 (0.0055 predicted); random tiny models of 1..30 layers follow the sqrt(k L)
# rms law within 25%. Half-split RoPE (SmolLM2 long prompt 1.07, tiny 0.27) or a dropped
# layer (SmolLM2's middle one 0.22, others 0.78-1.3; tiny 0.38-0.53) exceeds it.
TOLERANCES: dict[tuple[str, str], tuple[float, float]] = {
    ("float32", "logits"): (5e-4, 0.0),
    ("float32", "op"): (2e-5, 2e-5),
    ("bfloat16", "op"): (2e-2, 2e-2),
    ("bfloat16", "logits"): (0.1, 0.0),
}


def assert_close(
    actual, expected, *, dtype: str = "float32", kind: str = "logits", what: str = ""
) -> None:
    """Assert |actual - expected| <= atol + rtol * |expected| elementwise, from `TOLERANCES`.

    On failure the message summarises the float64 difference: max abs diff, where, both
    values there, the fraction of elements within tolerance and the relative L2 error.
    """
    atol, rtol = TOLERANCES[(dtype, kind)]
    a = np.asarray(actual, dtype=np.float64)
    e = np.asarray(expected, dtype=np.float64)
    if a.shape != e.shape:
        raise AssertionError(f"{what}: shape {a.shape} != expected {e.shape}")
    diff = np.abs(a - e)
    ok = diff <= atol + rtol * np.abs(e)
    if ok.all():
        return
    worst = np.unravel_index(np.nanargmax(np.where(np.isnan(diff), np.inf, diff)), diff.shape)
    l2 = np.linalg.norm(a - e) / max(np.linalg.norm(e), 1e-30)
    raise AssertionError(
        f"{what}: not close at ({dtype}, {kind}) atol={atol} rtol={rtol}: max |diff| "
        f"{diff[worst]:.3g} at {tuple(int(i) for i in worst)} (actual {a[worst]:.6g}, "
        f"expected {e[worst]:.6g}); {100 * ok.mean():.2f}% close; relative L2 {l2:.3g}"
    )


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def tiny_vocab_metadata(vocab_size: int) -> dict:
    """A byte-level BPE vocabulary of `vocab_size` tokens: 3 specials, 256 bytes, merges."""
    alphabet = [char for _, char in sorted(_byte_to_unicode().items())]
    tokens = list(SPECIAL_TOKENS) + alphabet
    merges = []
    letters = "etaoinshrdlu"
    for a in letters:
        for b in letters:
            if len(tokens) >= vocab_size:
                break
            merges.append(f"{a} {b}")
            tokens.append(a + b)
    if len(tokens) < vocab_size:
        raise ValueError(f"vocab_size {vocab_size} is too large for the tiny vocabulary")
    tokens = tokens[:vocab_size]
    types = [3] * len(SPECIAL_TOKENS) + [1] * (vocab_size - len(SPECIAL_TOKENS))
    return dict(tokens=tokens, token_types=types, merges=merges)


# K-quant blocks cannot be produced by gguf-py's quantizer; tests fill them with random bytes
# and overwrite each block's float16 scale fields (byte offsets within the block, from
# ggml-common.h's block_q*_K structs) with small finite values, which gives valid blocks for
# any dequantizer; the size of the scale keeps dequantized weights at a std of about 0.1.
K_QUANT_SCALE_OFFSETS = {
    gguf.GGMLQuantizationType.Q2_K: ((80, 82), 1 / 128),
    gguf.GGMLQuantizationType.Q3_K: ((108,), 1 / 512),
    gguf.GGMLQuantizationType.Q4_K: ((0, 2), 1 / 2048),
    gguf.GGMLQuantizationType.Q5_K: ((0, 2), 1 / 4096),
    gguf.GGMLQuantizationType.Q6_K: ((208,), 1 / 16384),
}


def encode_tensor(array: np.ndarray, qtype: gguf.GGMLQuantizationType, rng) -> np.ndarray:
    """Store a float32 array as `qtype` (random valid blocks for K-quants)."""
    if qtype == gguf.GGMLQuantizationType.F32:
        return array.astype(np.float32)
    if qtype == gguf.GGMLQuantizationType.F16:
        return array.astype(np.float16)
    if qtype in K_QUANT_SCALE_OFFSETS:
        block, size = gguf.GGML_QUANT_SIZES[qtype]
        rows, cols = array.shape
        blocks = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
        offsets, size_of_scale = K_QUANT_SCALE_OFFSETS[qtype]
        for offset in offsets:
            scale = (rng.uniform(0.5, 1.5, size=len(blocks)) * size_of_scale).astype(np.float16)
            blocks[:, offset : offset + 2] = scale.view(np.uint8).reshape(-1, 2)
        return blocks.reshape(rows, cols // block * size)
    return gguf.quants.quantize(array.astype(np.float32), qtype)


def random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights for every tensor of `config`, in GGUF names and NumPy shapes."""
    from realm_jax.layout import TENSOR_TABLE

    rng = np.random.default_rng(seed)
    tensors = {}
    for spec in TENSOR_TABLE:
        if spec.leaf == "output" and config.tied_embeddings:
            continue
        layers = range(config.n_layers) if "{i}" in spec.gguf_name else [None]
        for i in layers:
            shape = spec.shape(config)
            if len(shape) == 1:
                value = 1.0 + 0.1 * rng.standard_normal(shape)
            else:
                value = rng.standard_normal(shape) / np.sqrt(shape[1])
                if spec.leaf == "embed":
                    value = rng.standard_normal(shape)
            tensors[spec.gguf_name.format(i=i)] = value.astype(np.float32)
    return tensors


def write_gguf(
    path: str | os.PathLike,
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    *,
    qtype: str = "F32",
    arch: str = "llama",
    extra_metadata: Mapping[str, object] | None = None,
    seed: int = 0,
) -> None:
    """Write `tensors` (GGUF names, NumPy shapes) as a llama GGUF model file.

    Matrices are stored as `qtype`; 1-D tensors (norms) as F32, as llama.cpp does.
    """
    rng = np.random.default_rng(seed)
    matrix_type = gguf.GGMLQuantizationType[qtype]
    writer = gguf.GGUFWriter(os.fspath(path), arch)
    writer.add_block_count(config.n_layers)
    writer.add_context_length(config.context_length)
    writer.add_embedding_length(config.dim)
    writer.add_feed_forward_length(config.ffn_dim)
    writer.add_head_count(config.n_heads)
    writer.add_head_count_kv(config.n_kv_heads)
    writer.add_rope_freq_base(config.rope_base)
    writer.add_rope_dimension_count(config.rope_dim)
    writer.add_layer_norm_rms_eps(config.norm_eps)
    writer.add_vocab_size(config.vocab_size)
    vocab = tiny_vocab_metadata(config.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocab["tokens"])
    writer.add_token_types(vocab["token_types"])
    writer.add_token_merges(vocab["merges"])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)
    for key, value in (extra_metadata or {}).items():
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    for name, array in tensors.items():
        qt = gguf.GGMLQuantizationType.F32 if array.ndim == 1 else matrix_type
        data = encode_tensor(array, qt, rng)
        if qt in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
            writer.add_tensor(name, data)
        else:
            writer.add_tensor(name, data, raw_dtype=qt)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def tiny_model_file(vocab_size: int = 300) -> Path:
    """A random tiny llama model (`config.tiny`, float32) written as a GGUF file in a fresh
    temporary folder: the model of the experiments' `--tiny` runs."""
    config = tiny(vocab_size=vocab_size)
    path = Path(tempfile.mkdtemp()) / "tiny.gguf"
    write_gguf(path, config, random_tensors(config))
    return path


def cached_logits(model, prompt: list[int], fed: list[int]) -> np.ndarray:
    """Logits through the cache path: append `prompt` to an empty one-row cache, then feed
    `fed` one token per `decode_step` (the step the engine's loop runs), greedy.

    Returns:
      [1 + len(fed), V] float32: the logits after the prompt, then after each fed token.
    """
    import dataclasses

    from realm_jax.kv_cache import init_cache
    from realm_jax.sampling import Sampling, SamplingParams
    from realm_jax.steps.decode import append_and_sample, bucket, decode_step
    from realm_jax.steps.state import StepSpec, Weights, host_rows

    capacity = bucket(len(prompt) + len(fed))
    tokens = np.zeros((1, bucket(len(prompt), capacity)), np.int32)
    tokens[0, : len(prompt)] = prompt
    stacked = not isinstance(model.params.layers, tuple)
    cache = init_cache(model.config, 1, capacity, model.dtype, stacked=stacked)
    rows = host_rows([0], [True], [1], [-1], SamplingParams.from_rows([Sampling()]), [0], [0], [0])
    spec = StepSpec(model.config, capacity)
    _, logits, cache = append_and_sample(
        model.params, None, tokens, np.asarray([len(prompt)], np.int32), cache, rows, spec
    )
    out = [np.asarray(logits[0])]
    for token in fed:
        rows = dataclasses.replace(rows, tokens=np.asarray([token], np.int32))
        _, logits, cache = decode_step(Weights(model.params), rows, cache, spec=spec)
        out.append(np.asarray(logits[0]))
    assert int(cache.lengths[0]) == len(prompt) + len(fed)
    return np.stack(out)
