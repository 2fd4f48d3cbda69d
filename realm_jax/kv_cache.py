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

    Positions are the third axis: attention contracts over H with (B, K) as batch axes, and
    XLA's CPU dot wants batch axes leading, so a [B, S, K, H] buffer was transposed (copied)
    on every step; stored [B, K, S, H] it is read in place (`window` gives attention its
    [B, S, K, H] view).

    Attributes:
      k: [L, B, K, S, H] when the layers are stacked, or a tuple of L arrays [B, K, S, H].
      v: same as k.
      lengths: [B] int32, number of valid positions per row.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    lengths: jax.Array

    @property
    def capacity(self) -> int:
        """S, the positions each row can hold."""
        return self.k[0].shape[2] if isinstance(self.k, tuple) else self.k.shape[3]

    @property
    def batch_size(self) -> int:
        """B."""
        return self.lengths.shape[0]


def init_cache(
    config: ModelConfig, batch_size: int, capacity: int, dtype=jnp.float32, stacked: bool = False
) -> KVCache:
    """Allocate a zeroed cache for `batch_size` rows of `capacity` positions.

    `stacked` must match the params' layer layout (see `model.Params`): one [L, B, K, S, H]
    buffer per K and V, or (default, like `load_model`) a tuple of L [B, K, S, H] buffers.
    """
    shape = (batch_size, config.n_kv_heads, capacity, config.head_dim)
    if stacked:
        k = jnp.zeros((config.n_layers, *shape), dtype)
        v = jnp.zeros((config.n_layers, *shape), dtype)
    else:
        k = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
        v = tuple(jnp.zeros(shape, dtype) for _ in range(config.n_layers))
    return KVCache(k=k, v=v, lengths=jnp.zeros((batch_size,), jnp.int32))


def _row_head_position_index(positions: jax.Array, num_heads: int) -> tuple:
    """Index arrays [B, 1, 1], [1, K, 1], [B, 1, T] addressing buffer[b, k, positions[b, t]]."""
    b = positions.shape[0]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None, None]
    heads = jnp.arange(num_heads, dtype=jnp.int32)[None, :, None]
    return rows, heads, positions[:, None, :]


def write_rows(buffer: jax.Array, new: jax.Array, positions: jax.Array) -> jax.Array:
    """Scatter new[b, t] into buffer[b, :, positions[b, t]]; positions >= S are dropped.

    Args:
      buffer: [B, K, S, H] one layer's keys or values.
      new: [B, T, K, H].
      positions: [B, T] int32.
    """
    index = _row_head_position_index(positions, buffer.shape[1])
    update = jnp.swapaxes(new, 1, 2).astype(buffer.dtype)  # [B, K, T, H]
    return buffer.at[index].set(update, mode="drop")


def write_layer(
    buffers: jax.Array, layer: jax.Array, new: jax.Array, positions: jax.Array
) -> jax.Array:
    """`write_rows` into layer `layer` (a traced index) of stacked [L, B, K, S, H] buffers."""
    index = _row_head_position_index(positions, buffers.shape[2])
    update = jnp.swapaxes(new, 1, 2).astype(buffers.dtype)  # [B, K, T, H]
    return buffers.at[(layer, *index)].set(update, mode="drop")


def window(buffer: jax.Array, attn_len: int) -> jax.Array:
    """The first `attn_len` positions of one layer's [B, K, S, H] buffer, viewed as
    attention's [B, S, K, H]. Attention contracts with K as a batch axis, so XLA cancels this
    swap against its own and reads the stored layout without a copy."""
    return jnp.swapaxes(buffer[:, :, :attn_len], 1, 2)


def insert_row(cache: KVCache, row: KVCache, slot: jax.Array) -> KVCache:
    """Copy a one-row cache into row `slot` of `cache`, positions 0..row.capacity-1.

    The slot's length becomes the row's; its positions beyond are left as they were (never
    read). With `cache` donated by the caller, XLA writes the row in place.

    Args:
      cache: B rows of capacity S.
      row: one row of capacity <= S, same layer layout.
      slot: int32 scalar, the row of `cache` to overwrite.
    """
    stacked = not isinstance(cache.k, tuple)
    start = (0, slot, 0, 0, 0) if stacked else (slot, 0, 0, 0)

    def put(buffer, new):
        return jax.lax.dynamic_update_slice(buffer, new.astype(buffer.dtype), start)

    if stacked:
        k, v = put(cache.k, row.k), put(cache.v, row.v)
    else:
        k = tuple(put(a, b) for a, b in zip(cache.k, row.k, strict=True))
        v = tuple(put(a, b) for a, b in zip(cache.v, row.v, strict=True))
    lengths = jax.lax.dynamic_update_slice(cache.lengths, row.lengths, (slot,))
    return KVCache(k=k, v=v, lengths=lengths)
