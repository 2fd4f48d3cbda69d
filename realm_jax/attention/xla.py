"""Attention in plain jnp: the reference path and the CPU implementation.

Grouped-query attention without repeating K/V: queries are regrouped as [B, K, G * T, H] so that
each KV head's G query heads (and T queries) contract against that one head.
"""

import jax
import jax.numpy as jnp

# Finite, so a row with no valid key gives a uniform softmax instead of NaN; such rows are
# zeroed explicitly afterwards.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_positions: jax.Array, kv_lengths: jax.Array, num_keys: int) -> jax.Array:
    """Return valid[b, t, s]: key s is below the row's length and not after the query.

    Args:
      q_positions: [B, T] int32 absolute positions of the queries.
      kv_lengths: [B] int32 valid cache length per row.
      num_keys: S, the number of cache positions looked at.

    Returns:
      [B, T, S] bool, True = attend.
    """
    key_pos = jnp.arange(num_keys, dtype=jnp.int32)  # [S]
    causal = key_pos[None, None, :] <= q_positions[:, :, None]  # [B, T, S]
    in_row = key_pos[None, None, :] < kv_lengths[:, None, None]  # [B, 1, S]
    return causal & in_row


def xla_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
) -> jax.Array:
    """Causal grouped-query attention by absolute positions, softmax in float32.

    Args:
      q: [B, T, N, H].
      k_cache, v_cache: [B, S, K, H].
      q_positions: [B, T] int32.
      kv_lengths: [B] int32.

    Returns:
      [B, T, N, H] in q's dtype; rows with no valid key are 0.
    """
    b, t, n, h = q.shape
    s, k = k_cache.shape[1], k_cache.shape[2]
    g = n // k
    # Each KV head's G query heads and T queries form one free axis of Q = G * T query rows: both
    # products are then plain batched matmuls over (B, K). With G and T as two free axes,
    # XLA's CPU dot ran a batch-8 decode's attention slower (probe_decode_attention.py,
    # docs/results.md).
    q = jnp.transpose(q.reshape(b, t, k, g, h), (0, 2, 3, 1, 4)).reshape(b, k, g * t, h)
    k_bksh = jnp.swapaxes(k_cache, 1, 2)  # [B, K, S, H]; the cache's stored layout
    v_bksh = jnp.swapaxes(v_cache, 1, 2)
    scores = jnp.einsum("BKQH,BKSH->BKQS", q, k_bksh, preferred_element_type=jnp.float32)
    scores = scores.reshape(b, k, g, t, s) * (1.0 / float(h) ** 0.5)  # [B, K, G, T, S]
    valid = attention_mask(q_positions, kv_lengths, s)[:, None, None]  # [B, 1, 1, T, S]
    scores = jnp.where(valid, scores, MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    probs = jnp.where(valid.any(axis=-1, keepdims=True), probs, 0.0)
    probs = probs.reshape(b, k, g * t, s).astype(v_cache.dtype)
    out = jnp.einsum("BKQS,BKSH->BKQH", probs, v_bksh).reshape(b, k, g, t, h)
    return jnp.transpose(out, (0, 3, 1, 2, 4)).reshape(b, t, n, h).astype(q.dtype)
