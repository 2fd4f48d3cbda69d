"""The functional llama-family transformer: `Params` pytrees and a pure `forward`.

Axis legend (JAX's own, used in every shape comment and einsum string of the project):
B batch, T query length, S key/value (cache) length, N query heads, K KV heads,
G = N // K, H head dim, D model width, F FFN width, V vocabulary, L layers.

No I/O here: `params_from_tensors` takes arrays that `gguf.read_gguf` produced. Layers are
either stacked ([L, ...] leaves, iterated with `lax.scan`) or a tuple of per-layer pytrees
(unrolled); `forward` runs either with the same block function (experiments/bench_decode.py
measures both).
"""

import dataclasses
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.attention import attention
from realm_jax.config import ModelConfig
from realm_jax.gguf import TENSOR_TABLE
from realm_jax.kv_cache import KVCache, window, write_layer, write_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """One transformer block (leaves gain a leading [L] axis when layers are stacked).

    Attributes:
      attn_norm: [D] RMSNorm weight before attention.
      wqkv: [D, N + 2K, H] query, key and value projections side by side (heads 0..N-1 are
        queries, then K key heads, then K value heads); Q/K head rows in GGUF order
        (adjacent-pair RoPE, DESIGN §4).
      wo: [N, H, D] attention output projection.
      ffn_norm: [D] RMSNorm weight before the MLP.
      w_gate_up: [D, 2F] SwiGLU gate (columns 0..F-1) and up projection (F..2F-1).
      w_down: [F, D] SwiGLU down projection.

    Q/K/V and gate/up are fused because XLA's CPU matrix-vector product runs each call at a
    fixed overhead: one [D, N + 2K, H] product instead of three, and one [D, 2F] instead of
    two, saved ~3.5 of ~38 ms of SmolLM2's per-token weight reads on the 2-core dev machine.
    `FUSED` names the GGUF pieces of each fused leaf.
    """

    attn_norm: jax.Array
    wqkv: jax.Array
    wo: jax.Array
    ffn_norm: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array


# Fused LayerParams leaf -> (piece names from gguf.TENSOR_TABLE, concatenation axis).
FUSED: dict[str, tuple[tuple[str, ...], int]] = {
    "wqkv": (("wq", "wk", "wv"), 1),
    "w_gate_up": (("w_gate", "w_up"), 1),
}


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """All weights of a model.

    Attributes:
      embed: [V, D] token embedding.
      layers: a `LayerParams` with [L, ...] leaves (stacked) or a tuple of L `LayerParams`.
      final_norm: [D] RMSNorm weight after the last block.
      output: [D, V] output projection; for tied embeddings a transposed copy of `embed`.
        XLA's CPU matrix-vector product reads a [D, V] operand at ~22 GB/s and a [V, D] one at
        ~14 GB/s (measured on the 2-core dev machine), so the copy buys ~3 ms per decoded
        token for SmolLM2 at the price of 113 MB.
    """

    embed: jax.Array
    layers: LayerParams | tuple[LayerParams, ...]
    final_norm: jax.Array
    output: jax.Array


def _to_layout(array: np.ndarray, layout: str, config: ModelConfig) -> np.ndarray:
    if layout == "as_is":
        return array
    if layout == "transpose":
        return array.T
    if layout == "heads_in":  # [heads*H, D] -> [D, heads, H]
        return array.T.reshape(config.dim, -1, config.head_dim)
    if layout == "heads_out":  # [D, N*H] -> [N, H, D]
        return array.T.reshape(config.n_heads, config.head_dim, config.dim)
    raise ValueError(f"unknown layout {layout!r}")


def params_from_tensors(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    dtype=jnp.float32,
    stacked: bool = True,
) -> Params:
    """Arrange GGUF-named float arrays (see `gguf.TENSOR_TABLE`) into a `Params` pytree."""
    top, per_layer = {}, [{} for _ in range(config.n_layers)]
    for spec in TENSOR_TABLE:
        if "{i}" not in spec.gguf_name:
            if spec.gguf_name in tensors:
                top[spec.leaf] = _to_layout(tensors[spec.gguf_name], spec.layout, config)
            continue
        for i in range(config.n_layers):
            array = tensors[spec.gguf_name.format(i=i)]
            per_layer[i][spec.leaf] = _to_layout(array, spec.layout, config)

    for pieces in per_layer:
        for leaf, (names, axis) in FUSED.items():
            pieces[leaf] = np.concatenate([pieces.pop(name) for name in names], axis=axis)

    def put(array: np.ndarray) -> jax.Array:
        return jnp.asarray(np.ascontiguousarray(array), dtype=dtype)

    if stacked:
        layers = LayerParams(**{f: put(np.stack([p[f] for p in per_layer])) for f in per_layer[0]})
    else:
        layers = tuple(LayerParams(**{f: put(a) for f, a in p.items()}) for p in per_layer)
    output = top.get("output", top["embed"].T)  # [D, V]
    return Params(
        embed=put(top["embed"]),
        layers=layers,
        final_norm=put(top["final_norm"]),
        output=put(output),
    )


def stack_layers(params: Params) -> Params:
    """Return `params` with a tuple of layers turned into [L, ...] leaves."""
    if not isinstance(params.layers, tuple):
        return params
    layers = jax.tree.map(lambda *xs: jnp.stack(xs), *params.layers)
    return dataclasses.replace(params, layers=layers)


def unstack_layers(params: Params) -> Params:
    """Return `params` with [L, ...] layer leaves split into a tuple of per-layer pytrees."""
    if isinstance(params.layers, tuple):
        return params
    n = jax.tree.leaves(params.layers)[0].shape[0]
    layers = tuple(jax.tree.map(lambda x, i=i: x[i], params.layers) for i in range(n))
    return dataclasses.replace(params, layers=layers)


def rms_norm(x: jax.Array, weight: jax.Array, eps: float) -> jax.Array:
    """x / sqrt(mean(x^2) + eps) * weight, computed in float32. x: [..., D], weight: [D]."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    weight = weight.astype(jnp.float32).reshape((1,) * (x.ndim - 1) + weight.shape)
    return (x32 * inv * weight).astype(x.dtype)


def apply_rope(x: jax.Array, positions: jax.Array, base: float, rope_dim: int) -> jax.Array:
    """Rotate adjacent pairs (2i, 2i+1) of each head by position * base^(-2i/rope_dim).

    This is GGML's "normal" llama RoPE, correct for GGUF's permuted Q/K rows (DESIGN §4).

    Args:
      x: [B, T, heads, H].
      positions: [B, T] int32.
    """
    half = rope_dim // 2
    inv_freq = jnp.asarray(base ** (-np.arange(half, dtype=np.float64) * 2 / rope_dim), jnp.float32)
    angles = positions.astype(jnp.float32)[:, :, None] * inv_freq[None, None]  # [B, T, R/2]
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, rope_dim/2]
    sin = jnp.sin(angles)[:, :, None, :]
    rot = x[..., :rope_dim].astype(jnp.float32)
    rot = rot.reshape(*x.shape[:-1], half, 2)  # [B, T, heads, rope_dim/2, 2]
    even, odd = rot[..., 0], rot[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    rotated = rotated.reshape(*x.shape[:-1], rope_dim).astype(x.dtype)
    if rope_dim == x.shape[-1]:
        return rotated
    return jnp.concatenate([rotated, x[..., rope_dim:]], axis=-1)


def _project_qkv(
    layer: LayerParams, x: jax.Array, positions: jax.Array, config: ModelConfig
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm Q/K/V projections with RoPE: q [B, T, N, H], k and v [B, T, K, H]."""
    h = rms_norm(x, layer.attn_norm, config.norm_eps)  # [B, T, D]
    qkv = jnp.einsum("BTD,DEH->BTEH", h, layer.wqkv)  # [B, T, N + 2K, H]
    n, kv = config.n_heads, config.n_kv_heads
    q, k, v = qkv[:, :, :n], qkv[:, :, n : n + kv], qkv[:, :, n + kv :]
    q = apply_rope(q, positions, config.rope_base, config.rope_dim)
    k = apply_rope(k, positions, config.rope_base, config.rope_dim)
    return q, k, v


def _mlp_block(layer: LayerParams, x: jax.Array, config: ModelConfig) -> jax.Array:
    """Pre-norm SwiGLU MLP with its residual."""
    h = rms_norm(x, layer.ffn_norm, config.norm_eps)  # [B, T, D]
    gate_up = jnp.einsum("BTD,DE->BTE", h, layer.w_gate_up)  # [B, T, 2F]
    gate, up = gate_up[..., : config.ffn_dim], gate_up[..., config.ffn_dim :]
    return x + jnp.einsum("BTF,FD->BTD", jax.nn.silu(gate) * up, layer.w_down)


def forward(
    params: Params,
    tokens: jax.Array,
    positions: jax.Array,
    cache: KVCache,
    kv_lengths: jax.Array,
    *,
    config: ModelConfig,
    attn_len: int | None = None,
    implementation: str = "auto",
) -> tuple[jax.Array, KVCache]:
    """Run the decoder over new tokens, writing their keys and values into the cache.

    Args:
      params: the weights (stacked or unrolled layers; `cache` must match).
      tokens: [B, T] int32 new tokens.
      positions: [B, T] int32 absolute positions of the new tokens; a padded token may take
        any position >= its row's `kv_lengths` (its key is written but never read).
      cache: the KV cache holding each row's earlier positions.
      kv_lengths: [B] int32 valid length of each row after this step.
      config: static model config.
      attn_len: static number of cache positions attention reads (a bucket >= max
        kv_lengths); None reads the whole capacity.
      implementation: attention implementation (see `rj.attention`).

    Returns:
      (hidden [B, T, D] after the final norm, the updated cache with lengths = kv_lengths).
    """
    if isinstance(params.layers, tuple) != isinstance(cache.k, tuple):
        raise ValueError(
            "params and cache disagree on the layer layout (stacked vs tuple of layers): "
            "build the cache with init_cache(..., stacked=not isinstance(params.layers, tuple))"
        )
    attn_len = cache.capacity if attn_len is None else attn_len
    x = params.embed[tokens]  # [B, T, D]

    def attend(layer, x, q, k_cache, v_cache):
        out = attention(
            q, k_cache, v_cache, positions, kv_lengths, implementation=implementation
        )  # [B, T, N, H]
        # Contract over one merged N*H axis: with "BTNH,NHD->BTD" XLA's CPU backend transposes
        # and copies wo on every call (found in the optimized HLO), 1.3 MB per layer per step.
        b, t = out.shape[:2]
        wo = layer.wo.reshape(-1, layer.wo.shape[-1])  # [N*H, D]
        x = x + jnp.einsum("BTE,ED->BTD", out.reshape(b, t, -1), wo)
        return _mlp_block(layer, x, config)

    if isinstance(params.layers, tuple):
        new_k, new_v = [], []
        for layer, k_cache, v_cache in zip(params.layers, cache.k, cache.v, strict=True):
            q, k, v = _project_qkv(layer, x, positions, config)
            k_cache = write_rows(k_cache, k, positions)  # [B, K, S, H]
            v_cache = write_rows(v_cache, v, positions)
            x = attend(layer, x, q, window(k_cache, attn_len), window(v_cache, attn_len))
            new_k.append(k_cache)
            new_v.append(v_cache)
        new_k, new_v = tuple(new_k), tuple(new_v)
    else:
        # The full [L, B, K, S, H] buffers ride in the carry and are written at layer i by a
        # scatter, so XLA updates them in place; scanning them as xs/ys, or slicing out a
        # whole layer and writing it back, would copy the cache every step.
        def scan_step(carry, layer):
            x, all_k, all_v, i = carry
            q, k, v = _project_qkv(layer, x, positions, config)
            all_k = write_layer(all_k, i, k, positions)
            all_v = write_layer(all_v, i, v, positions)
            k_ctx = window(jax.lax.dynamic_index_in_dim(all_k, i, 0, keepdims=False), attn_len)
            v_ctx = window(jax.lax.dynamic_index_in_dim(all_v, i, 0, keepdims=False), attn_len)
            return (attend(layer, x, q, k_ctx, v_ctx), all_k, all_v, i + 1), None

        init = (x, cache.k, cache.v, jnp.zeros((), jnp.int32))
        (x, new_k, new_v, _), _ = jax.lax.scan(scan_step, init, params.layers)
    hidden = rms_norm(x, params.final_norm, config.norm_eps)
    return hidden, KVCache(k=new_k, v=new_v, lengths=kv_lengths)


def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """Logits [..., V] float32 from final hidden states [..., D]."""
    return jnp.einsum("...D,DV->...V", hidden, params.output, preferred_element_type=jnp.float32)
