"""The functional llama-family transformer: `Params` pytrees and a pure `forward`.

Axis legend (JAX's own, used in every shape comment and einsum string of the project):
B batch, T query length, S key/value (cache) length, N query heads, K KV heads,
G = N // K, H head dim, D model width, F FFN width, V vocabulary, L layers,
R LoRA rank, A adapters in a LoRA stack. Flattened axes get letters of their own: I and O a
weight's input and output dims, E = A * R (every adapter's rank components side by side), Q
= G * T query rows (attention), P those rows padded (Pallas), C key chunks (flash-decoding).

No I/O here, and no GGUF names: `layout.params_from_tensors` arranges what `gguf.read_gguf`
read into these pytrees. Layers are
either stacked ([L, ...] leaves, iterated with `lax.scan`) or a tuple of per-layer pytrees
(unrolled); `forward` runs either with the same block function (experiments/bench_decode.py
measures both).

LoRA: `forward(..., lora=stack, adapter_ids=ids)` adds each row's own low-rank delta inside
the projections (`lora_delta`); the pytrees are `lora.tree`'s, and the loaders and merging
(`lora.adapters`, which imports this module) are not imported here. With `lora=None` the
forward has no extra ops.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.attention import attention
from realm_jax.config import ModelConfig
from realm_jax.kv_cache import KVCache, window, write_layer, write_rows
from realm_jax.lora.tree import LayerLora, LoraDelta, LoraStack


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerParams:
    """One transformer block (leaves gain a leading [L] axis when layers are stacked).

    Attributes:
      attn_norm: [D] RMSNorm weight before attention.
      wqkv: [N + 2K, H, D] query, key and value projections stacked on the output axis (heads
        0..N-1 are queries, then K key heads, then K value heads); Q/K head rows in GGUF order
        (adjacent-pair RoPE, DESIGN §4).
      wo: [D, N, H] attention output projection.
      ffn_norm: [D] RMSNorm weight before the MLP.
      w_gate_up: [2F, D] SwiGLU gate (rows 0..F-1) and up projection (F..2F-1).
      w_down: [D, F] SwiGLU down projection.

    Every matrix is stored [*out, *in], as GGUF (and PyTorch) store them; `linear` contracts
    its trailing input axes. XLA's CPU products read this layout as fast as [*in, *out] at one
    row and faster at several (docs/results.md, change 8).

    Q/K/V and gate/up are fused because XLA's CPU matrix-vector product runs each call at a
    fixed overhead: one [N + 2K, H, D] product instead of three, and one [2F, D] instead of
    two (docs/results.md, the changes made from measurements).
    `layout.FUSED` names the GGUF pieces of each fused leaf.
    """

    attn_norm: jax.Array
    wqkv: jax.Array
    wo: jax.Array
    ffn_norm: jax.Array
    w_gate_up: jax.Array
    w_down: jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Params:
    """All weights of a model.

    Attributes:
      embed: [V, D] token embedding.
      layers: a `LayerParams` with [L, ...] leaves (stacked) or a tuple of L `LayerParams`.
      final_norm: [D] RMSNorm weight after the last block.
      output: [V, D] output projection; for tied embeddings the same array as `embed`.
    """

    embed: jax.Array
    layers: LayerParams | tuple[LayerParams, ...]
    final_norm: jax.Array
    output: jax.Array


@jax.jit
def stack_trees(trees):
    """Pytrees of one structure and shapes -> one pytree whose leaves gain a leading axis.

    One jitted program per (count, structure, shapes), where `jax.tree.map(jnp.stack, ...)`
    compiles a program per distinct leaf shape (a LoRA stack has ~12 per adapter count)."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def stack_layers(params: Params) -> Params:
    """Return `params` with a tuple of layers turned into [L, ...] leaves."""
    if not isinstance(params.layers, tuple):
        return params
    return dataclasses.replace(params, layers=stack_trees(params.layers))


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


def linear(x: jax.Array, w: jax.Array, in_axes: int = 1, out_dtype=None) -> jax.Array:
    """x @ w.T over several axes: x [..., *in] and w [*out, *in] -> [..., *out].

    Both sides are flattened to matrices first (free for contiguous arrays): contracting two
    axes at once made XLA's CPU backend transpose and copy the weight on every call.

    Args:
      x: the input; its last `in_axes` axes are contracted.
      w: a weight stored [*out, *in] (see `LayerParams`).
      in_axes: how many trailing axes the input side has.
      out_dtype: the product's dtype (None: the operands' own).
    """
    out_dims, lead = w.shape[: w.ndim - in_axes], x.shape[: x.ndim - in_axes]
    w2 = w.reshape(math.prod(out_dims), -1)  # [O, I]
    x2 = x.reshape(math.prod(lead), -1)  # [rows, I]
    y = jax.lax.dot_general(x2, w2, (((1,), (1,)), ((), ())), preferred_element_type=out_dtype)
    return y.reshape(*lead, *out_dims)  # [rows, O] -> [..., *out]


def lora_delta(x: jax.Array, delta: LoraDelta, adapter_ids: jax.Array) -> jax.Array:
    """((x @ a.T) * scale) @ b with each row's own adapter from a stack of A.

    Two forms of the same sum, chosen statically by the stack's size A against the batch's
    B rows:
    - A <= 2 B (one adapter unmerged, or a serving stack up to twice the batch): every row
      against all A adapters at once. The stack's a [A, R, *in] is one [E, I] matrix in the
      [out, in] order of the base weights, so this is one product, then each row keeps
      only its own adapter's R columns (the others set to 0) and one [E, O] product
      adds them up. It reads the whole stack once.
    - A > 2 B: each row's a and b are gathered ([B, R, in], [B, R, out]), then two batched
      products. It reads only the rows' own adapters, so it does not grow with A; but it
      reads each of them twice and writes it once (the gathered copy), hence the factor 2.

    I and O are the weight's input and output dims flattened, E = A * R (every adapter's
    rank components side by side).

    Args:
      x: [B, T, *in] the projection's input.
      delta: a stacked `lora.LoraDelta`: a [A, R, *in], b [A, R, *out], scale [A, R].
      adapter_ids: [B] int32 in 0..A-1, the adapter of each row (clamped into that range).

    Returns:
      [B, T, *out], in x's dtype.
    """
    if delta.scale.ndim != 2:
        raise ValueError(
            f"lora must be a stack of adapters (scale [A, R], got {delta.scale.shape}): "
            "build it with lora.stack_adapters"
        )
    b, t = x.shape[:2]
    num_adapters, r = delta.scale.shape
    e = num_adapters * r
    out_dims = delta.b.shape[2:]
    if num_adapters <= 2 * b:
        low = linear(x, delta.a.reshape(e, *delta.a.shape[2:]), x.ndim - 2)  # [B, T, E]
        ids = jnp.clip(adapter_ids, 0, num_adapters - 1)  # as the gather's mode="clip" below
        own = ids[:, None, None] == jnp.arange(num_adapters, dtype=ids.dtype)[None, :, None]
        own = jnp.broadcast_to(own, (b, num_adapters, r)).reshape(b, 1, e)  # [B, 1, E]
        # where, not a multiply by 0: another adapter's inf or NaN must not reach this row
        low = jnp.where(own, low * delta.scale.reshape(1, 1, e), 0.0)
        w_up = delta.b.reshape(e, -1)  # [E, O]
        out = jnp.einsum("BTE,EO->BTO", low, w_up)
        return out.reshape(b, t, *out_dims)
    x = x.reshape(b, t, -1)  # [B, T, I]
    a = jnp.take(delta.a.reshape(num_adapters, r, -1), adapter_ids, axis=0, mode="clip")
    w_up = jnp.take(delta.b.reshape(num_adapters, r, -1), adapter_ids, axis=0, mode="clip")
    scale = jnp.take(delta.scale, adapter_ids, axis=0, mode="clip")[:, None, :]  # [B, 1, R]
    low = jnp.einsum("BTI,BRI->BTR", x, a) * scale  # [B, T, R]
    return jnp.einsum("BTR,BRO->BTO", low, w_up).reshape(b, t, *out_dims)  # [B, T, *out]


def _plus_lora(
    y: jax.Array,
    x: jax.Array,
    lora: LayerLora | None,
    leaf: str,
    adapter_ids: jax.Array | None,
) -> jax.Array:
    """y + the LoRA delta of weight `leaf` on input x; y itself when there is none."""
    delta = None if lora is None else getattr(lora, leaf)
    if delta is None:
        return y
    return y + lora_delta(x, delta, adapter_ids)


def _project_qkv(
    layer: LayerParams,
    x: jax.Array,
    positions: jax.Array,
    config: ModelConfig,
    lora: LayerLora | None = None,
    adapter_ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Pre-norm Q/K/V projections with RoPE: q [B, T, N, H], k and v [B, T, K, H]."""
    h = rms_norm(x, layer.attn_norm, config.norm_eps)  # [B, T, D]
    qkv = linear(h, layer.wqkv)  # [B, T, N + 2K, H]
    qkv = _plus_lora(qkv, h, lora, "wqkv", adapter_ids)
    n, kv = config.n_heads, config.n_kv_heads
    q, k, v = qkv[:, :, :n], qkv[:, :, n : n + kv], qkv[:, :, n + kv :]
    q = apply_rope(q, positions, config.rope_base, config.rope_dim)
    k = apply_rope(k, positions, config.rope_base, config.rope_dim)
    return q, k, v


def _mlp_block(
    layer: LayerParams,
    x: jax.Array,
    config: ModelConfig,
    lora: LayerLora | None = None,
    adapter_ids: jax.Array | None = None,
) -> jax.Array:
    """Pre-norm SwiGLU MLP with its residual."""
    h = rms_norm(x, layer.ffn_norm, config.norm_eps)  # [B, T, D]
    gate_up = linear(h, layer.w_gate_up)  # [B, T, 2F]
    gate_up = _plus_lora(gate_up, h, lora, "w_gate_up", adapter_ids)
    gate, up = gate_up[..., : config.ffn_dim], gate_up[..., config.ffn_dim :]
    act = jax.nn.silu(gate) * up  # [B, T, F]
    down = linear(act, layer.w_down)  # [B, T, D]
    return x + _plus_lora(down, act, lora, "w_down", adapter_ids)


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
    lora: LoraStack | None = None,
    adapter_ids: jax.Array | None = None,
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
      lora: optional `lora.LoraStack` of A adapters ([A, ...] per-layer leaves, in the
        params' layer layout); each projection adds ((x @ a.T) * scale) @ b of the row's
        adapter. None (the default) adds no ops at all.
      adapter_ids: [B] int32 in 0..A-1, each row's adapter in `lora` (None: all 0).

    Returns:
      (hidden [B, T, D] after the final norm, the updated cache with lengths = kv_lengths).
    """
    if isinstance(params.layers, tuple) != isinstance(cache.k, tuple):
        raise ValueError(
            "params and cache disagree on the layer layout (stacked vs tuple of layers): "
            "build the cache with init_cache(..., stacked=not isinstance(params.layers, tuple))"
        )
    if lora is not None:
        if isinstance(params.layers, tuple) != isinstance(lora.layers, tuple):
            raise ValueError("params and lora disagree on the layer layout (stacked vs tuple)")
        if adapter_ids is None:
            adapter_ids = jnp.zeros(tokens.shape[:1], jnp.int32)
    attn_len = cache.capacity if attn_len is None else attn_len
    x = params.embed[tokens]  # [B, T, D]

    def attend(layer, layer_lora, x, q, k_cache, v_cache):
        out = attention(
            q, k_cache, v_cache, positions, kv_lengths, implementation=implementation
        )  # [B, T, N, H]
        x = x + _plus_lora(linear(out, layer.wo, 2), out, layer_lora, "wo", adapter_ids)
        return _mlp_block(layer, x, config, layer_lora, adapter_ids)

    if isinstance(params.layers, tuple):
        new_k, new_v = [], []
        layer_loras = (None,) * len(params.layers) if lora is None else lora.layers
        for layer, layer_lora, k_cache, v_cache in zip(
            params.layers, layer_loras, cache.k, cache.v, strict=True
        ):
            q, k, v = _project_qkv(layer, x, positions, config, layer_lora, adapter_ids)
            k_cache = write_rows(k_cache, k, positions)  # [B, K, S, H]
            v_cache = write_rows(v_cache, v, positions)
            x = attend(
                layer, layer_lora, x, q, window(k_cache, attn_len), window(v_cache, attn_len)
            )
            new_k.append(k_cache)
            new_v.append(v_cache)
        new_k, new_v = tuple(new_k), tuple(new_v)
    else:
        # The full [L, B, K, S, H] buffers ride in the carry and are written at layer i by a
        # scatter, so XLA updates them in place; scanning them as xs/ys, or slicing out a
        # whole layer and writing it back, would copy the cache every step.
        def scan_step(carry, xs):
            layer, layer_lora = xs if lora is not None else (xs, None)
            x, all_k, all_v, i = carry
            q, k, v = _project_qkv(layer, x, positions, config, layer_lora, adapter_ids)
            all_k = write_layer(all_k, i, k, positions)
            all_v = write_layer(all_v, i, v, positions)
            k_ctx = window(jax.lax.dynamic_index_in_dim(all_k, i, 0, keepdims=False), attn_len)
            v_ctx = window(jax.lax.dynamic_index_in_dim(all_v, i, 0, keepdims=False), attn_len)
            return (attend(layer, layer_lora, x, q, k_ctx, v_ctx), all_k, all_v, i + 1), None

        init = (x, cache.k, cache.v, jnp.zeros((), jnp.int32))
        xs = params.layers if lora is None else (params.layers, lora.layers)
        (x, new_k, new_v, _), _ = jax.lax.scan(scan_step, init, xs)
    hidden = rms_norm(x, params.final_norm, config.norm_eps)
    return hidden, KVCache(k=new_k, v=new_v, lengths=kv_lengths)


def lm_head(params: Params, hidden: jax.Array) -> jax.Array:
    """Logits [..., V] float32 from final hidden states [..., D]."""
    return linear(hidden, params.output, out_dtype=jnp.float32)
