"""The real model (SmolLM2-135M-Instruct, Q4_1 GGUF) against HF transformers' float32 golden
outputs in shared/golden/smollm2_hf.* (made from the same file by shared/golden/tools)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import realm_jax as rj
from realm_jax.testing import assert_close, cached_logits

PROMPTS = ["capital", "once", "code", "chat", "long"]

pytestmark = pytest.mark.model


@pytest.fixture(scope="module")
def golden_json(golden_dir) -> dict:
    return json.loads((golden_dir / "smollm2_hf.json").read_text())


@pytest.mark.parametrize("name", PROMPTS)
def test_token_ids(smollm2, golden, golden_json, name):
    text = golden_json["prompts"][name]["rendered_text"]
    assert smollm2.tokenizer.encode(text) == golden[f"ids_{name}"].tolist()


@pytest.mark.parametrize("name", PROMPTS)
def test_logits(smollm2, golden, name):
    ours = rj.logits(smollm2, golden[f"ids_{name}"].tolist())
    if name == "capital":
        assert_close(ours, golden["allpos_logits_capital"], what="capital, every position")
    assert_close(ours[-1], golden[f"logits_{name}"], what=f"{name}, last position")


@pytest.mark.parametrize("name", PROMPTS)
def test_greedy_continuation(smollm2, golden, name):
    ids = golden[f"ids_{name}"].tolist()
    out = rj.generate(smollm2, ids, max_new_tokens=32, stop_at_eos=False)
    assert out == golden[f"gen_{name}"].tolist()


@pytest.mark.parametrize("name", ["capital", "long"])
def test_cached_decode_logits_along_greedy_path(smollm2, golden, name):
    """The decode step's logits at the golden top-20 ids, all 32 steps (cache path)."""
    ids = golden[f"ids_{name}"].tolist()
    gen = golden[f"gen_{name}"].tolist()
    rows = cached_logits(smollm2, ids, gen[:-1])  # [32, V]
    ours = np.take_along_axis(rows, golden[f"gen_topk_ids_{name}"], axis=1)
    assert_close(ours, golden[f"gen_topk_val_{name}"], what=f"{name} decode path top-20")


def _half_split_rope(x, positions, base, rope_dim):
    """HF's rotate_half pairing (i, i + rope_dim/2): wrong for GGUF's permuted Q/K rows."""
    half = rope_dim // 2
    inv = jnp.asarray(base ** (-np.arange(half) * 2 / rope_dim), jnp.float32)
    angles = positions.astype(jnp.float32)[:, :, None] * inv[None, None]
    cos, sin = jnp.cos(angles)[:, :, None], jnp.sin(angles)[:, :, None]
    a, b = x[..., :half], x[..., half:rope_dim]
    return jnp.concatenate([a * cos - b * sin, a * sin + b * cos, x[..., rope_dim:]], axis=-1)


def test_wrong_rope_layout_fails_golden(smollm2, golden, monkeypatch):
    """Positive control: mixing GGUF Q/K rows with half-split RoPE must fail the golden check
    on the long (342-token) prompt, so the logits test above is known to be able to fail."""
    monkeypatch.setattr(rj.model, "apply_rope", _half_split_rope)
    jax.clear_caches()
    try:
        wrong = rj.logits(smollm2, golden["ids_long"].tolist())
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    with pytest.raises(AssertionError, match="not close"):
        assert_close(wrong[-1], golden["logits_long"], what="long prompt, wrong RoPE")
    assert np.abs(wrong[-1] - golden["logits_long"]).max() > 0.5
