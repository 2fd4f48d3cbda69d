"""One attention interface for the model and every later feature.

`attention(q, k_cache, v_cache, q_positions, kv_lengths, implementation=...)` dispatches to an
implementation; all of them compute the same function (see `xla.xla_attention`): "xla" (the
jnp path) or "pallas" (the flash kernels of `pallas.py`; Pallas interpret mode off GPU).
"auto" is Pallas on a GPU and XLA elsewhere, unless $REALM_JAX_ATTENTION names one; shapes
the kernels cannot take (head dims that are not a power of two in 16..256) fall back to XLA
under "auto" and raise NotImplementedError under an explicit "pallas".
"""

import os

import chex
import jax

from realm_jax.attention.pallas import pallas_attention, unsupported_reason
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
        default = "pallas" if jax.default_backend() == "gpu" else "xla"
        implementation = os.environ.get(ENV_OVERRIDE) or default
        if implementation not in IMPLEMENTATIONS[1:]:
            raise RealmError(f"{ENV_OVERRIDE}={implementation!r} is not 'xla' or 'pallas'")
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
      implementation: "xla", "pallas" (interpret mode off GPU) or "auto" (Pallas on a GPU,
        XLA elsewhere; $REALM_JAX_ATTENTION overrides).

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
    if resolve_implementation(implementation) == "pallas":
        reason = unsupported_reason(q, k_cache)
        if reason is None:
            return pallas_attention(q, k_cache, v_cache, q_positions, kv_lengths)
        if implementation == "pallas":
            raise NotImplementedError(reason)
    return xla_attention(q, k_cache, v_cache, q_positions, kv_lengths)
