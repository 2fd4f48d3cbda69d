"""One attention interface for the model and every later feature.

`attention(q, k_cache, v_cache, q_positions, kv_lengths, implementation=...)` dispatches to an
implementation; all of them compute the same function (see `xla.xla_attention`).
"""

import os

import chex
import jax

from realm_jax.attention.xla import xla_attention
from realm_jax.errors import RealmError

IMPLEMENTATIONS = ("auto", "xla", "pallas")
ENV_OVERRIDE = "REALM_JAX_ATTENTION"  # forces the choice that "auto" makes


def resolve_implementation(implementation: str = "auto") -> str:
    """Return the concrete implementation that `implementation` stands for on this backend."""
    if implementation not in IMPLEMENTATIONS:
        raise RealmError(
            f"attention implementation {implementation!r} is not one of {IMPLEMENTATIONS}"
        )
    if implementation == "auto":
        implementation = os.environ.get(ENV_OVERRIDE, "xla")
        if implementation not in IMPLEMENTATIONS[1:]:
            raise RealmError(f"{ENV_OVERRIDE}={implementation!r} is not 'xla' or 'pallas'")
    if implementation == "pallas":
        raise NotImplementedError(
            "the Pallas flash-attention kernels are not built yet (issue 3); use 'xla'"
        )
    return implementation


def attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    implementation: str = "auto",
) -> jax.Array:
    """Causal grouped-query attention over a KV cache, by absolute positions.

    Args:
      q: [B, T, N, H] queries; query head n reads KV head n // (N // K).
      k_cache, v_cache: [B, S, K, H].
      q_positions: [B, T] int32; a query at position p sees keys 0..p of its row.
      kv_lengths: [B] int32; keys at or beyond a row's length are never seen.
      implementation: "xla", "pallas" or "auto".

    Returns:
      [B, T, N, H]; scores are scaled by 1/sqrt(H) and the softmax runs in float32.
    """
    chex.assert_rank([q, k_cache, v_cache, q_positions, kv_lengths], [4, 4, 4, 2, 1])
    chex.assert_equal_shape([k_cache, v_cache])
    b, t, n, h = q.shape
    if k_cache.shape[0] != b or k_cache.shape[3] != h or n % k_cache.shape[2]:
        raise RealmError(f"attention: incompatible shapes {q.shape=} {k_cache.shape=}")
    chex.assert_shape(q_positions, (b, t))
    chex.assert_shape(kv_lengths, (b,))
    resolve_implementation(implementation)
    return xla_attention(q, k_cache, v_cache, q_positions, kv_lengths)
