"""`KVCache`: preallocated per-layer key/value buffers with a valid length per row.

The cache is a pytree. Writes scatter new keys at absolute positions (positions at or beyond
the capacity are dropped, so padded tokens cannot spill); roll-back is just smaller lengths,
since attention never reads at or beyond a row's length.
"""

import dataclasses

import jax
import jax.numpy as jnp

from realm_jax.config import ModelConfig


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer for B rows of capacity S.

    Attributes:
      k: [L, B, S, K, H] when the layers are stacked, or a tuple of L arrays [B, S, K, H].
      v: same as k.
      lengths: [B] int32, number of valid positions per row.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        """S, the positions each row can hold."""
        return (self.k[0] if isinstance(self.k, tuple) else self.k[0]).shape[1]

    @property
    def batch_size(self) -> int:
        """B."""
        return self.lengths.shape[0]


def init_cache(
    config: ModelConfig, batch_size: int, capacity: int, dtype=jnp.float32, stacked: bool = False
) -> KVCache:
    """Allocate a zeroed cache for `batch_size` rows of `capacity` positions.

    `stacked` must match the params' layer layout (see `model.Params`): one [L, B, S, K, H]
    buffer per K and V, or (default, like `load_model`) a tuple of L [B, S, K, H] buffers.
    """
    shape = (batch_size, capacity, config.n_kv_heads, config.head_dim)
    if stacked:
        k = jnp.zeros((config.n_layers, *shape), dtype)
        v = jnp.zeros((config.n_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch_size,), jnp.int32))


def write_rows(buffer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter new[b, t] into buffer[b, positions[b, t]]; positions >= S are dropped.

    Args:
      buffer: [B, S, K, H].
      new: [B, T, K, H].
      positions: [B, T] int32.
    """
    rows = jnp.arange(buffer.shape[0], dtype=jnp.int32)[:, None]  # [B, 1]
    return buffer.at[rows, positions].set(new.astype(buffer.dtype), mode="drop")
