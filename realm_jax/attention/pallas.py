"""Flash attention in Pallas: a prefill/verify kernel and a flash-decoding kernel.

Both compute `xla.xla_attention`'s function (causal by absolute positions, per-row lengths,
grouped-query heads, float32 softmax statistics, rows with no valid key give 0); this module
holds only the kernels, their `pallas_call` wrappers and `pallas_attention`, which picks one
by T. The dispatcher is `realm_jax.attention.attention`. docs/attention.md explains the
design; in short:

- **Rows.** The G = N // K query heads that read one KV head are processed together, so one
  key/value block load serves all of them: q is laid out as [B, K, T*G, H], row r = t*G + g
  (a transpose of q in the wrapper; free for T = 1). Every row carries one integer,
  `limit = clip(min(position + 1, kv_length), 0, S)`: it sees keys 0..limit-1 and nothing
  else, so the causal mask and the length mask are one comparison `key < limit`.
- **Prefill** (`flash_attention`): grid (query block, B, K); each program loops over key
  blocks with an online softmax (FlashAttention-2, Dao 2023, Algorithm 1), blocks below the
  block's smallest limit without any mask, the rest up to its largest limit with the mask;
  blocks beyond the largest limit are never read.
- **Decode** (`flash_decoding`, flash-decoding): grid (key chunk, B, K); each program reduces
  one chunk of keys to a partial (max, sum, unnormalised output) and stops at its rows'
  largest limit (a chunk beyond it reads nothing); a small jnp epilogue combines the chunks.
- **Ragged lengths without copies.** The caches are read in their stored [B, K, S, H] layout
  and never padded (padding would copy the whole cache on every call): when S is not a
  multiple of the key block, the last block is read at S - block_k instead, overlapping the
  previous one, and the keys it re-reads are masked (`key >= nominal start`). Triton loads
  are not bounds-checked, and interpret mode clamps out-of-range slices, so a block may never
  run past S on either.

On GPU the kernels lower through Triton; elsewhere they run with `interpret=True` (slow, for
tests). Only Pallas APIs shared by jax 0.10 and 0.11 are used (`pl.pallas_call`,
`pl.BlockSpec(block_shape, index_map)`, `pl.ds`, `pl.program_id`, the Triton
`CompilerParams`); no TPU-only API.
"""

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from realm_jax.attention.xla import MASK_VALUE

LOG2E = math.log2(math.e)  # exp(x) = exp2(x * log2(e)): scores live in base 2, one multiply
MIN_TILE = 16  # Triton's tl.dot needs every matmul dimension >= 16
DECODE_MAX_T = 8  # T at or below this runs flash decoding; above, the prefill kernel
SUPPORTED_DTYPES = ("float32", "bfloat16", "float16")


def _is_power_of_two(x: int) -> bool:
    return x > 0 and x & (x - 1) == 0


def _next_power_of_two(x: int) -> int:
    return 1 << max(0, x - 1).bit_length()


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes and Triton launch parameters of both kernels; static under jit.

    Defaults come from `for_shape`; they follow the Triton fused-attention tutorial's
    Hopper configurations and have not been tuned on a GPU yet (docs/attention.md).

    Attributes:
      block_rows: query rows per prefill program (a row is one (position, query head) pair
        of one KV head, so a block covers block_rows // G positions of all G heads).
      block_k: keys per inner step of the prefill kernel.
      decode_block_k: keys per inner step of the decoding kernel.
      decode_programs: the number of programs (B * K * chunks) flash decoding aims for,
        about four per H100 SM; the key axis is split into as many chunks as that needs.
      num_warps, num_stages: Triton launch parameters of the prefill kernel.
      decode_num_warps, decode_num_stages: the same for the decoding kernel.
    """

    block_rows: int = 128
    block_k: int = 64
    decode_block_k: int = 64
    decode_programs: int = 528
    num_warps: int = 4
    num_stages: int = 2
    decode_num_warps: int = 4
    decode_num_stages: int = 2

    def __post_init__(self):
        for name in ("block_rows", "block_k", "decode_block_k"):
            value = getattr(self, name)
            if not _is_power_of_two(value) or value < MIN_TILE:
                raise ValueError(f"BlockSizes.{name}={value} must be a power of two >= 16")

    @classmethod
    def for_shape(cls, head_dim: int, dtype) -> "BlockSizes":
        """Defaults for one head dim and input dtype.

        Shared memory holds the q tile plus num_stages (key, value) tiles: 128 bf16 rows at
        H = 128 with 3 stages of 64 keys is 32 + 96 KiB, within an H100 SM's 227 KiB. Four-byte
        inputs and H = 256 halve a tile to stay there.
        """
        itemsize = jnp.dtype(dtype).itemsize
        row_bytes = head_dim * itemsize  # bytes of one q, k or v row
        wide = row_bytes > 256
        return cls(
            block_rows=64 if itemsize > 2 or head_dim > 128 else 128,
            block_k=32 if row_bytes > 512 else 64,
            decode_block_k=32 if wide else 64,
            num_warps=4 if head_dim <= 64 else 8,
            num_stages=2 if wide else 3,
            decode_num_stages=2 if wide else 3,
        )


def unsupported_reason(q: jax.Array, k_cache: jax.Array) -> str | None:
    """Why the Pallas kernels cannot run these shapes (None when they can).

    Triton tiles must have power-of-two sizes, and `tl.dot` needs dimensions >= 16.
    """
    h = q.shape[-1]
    if not _is_power_of_two(h) or not MIN_TILE <= h <= 256:
        return f"the Pallas kernels need a power-of-two head dim in 16..256, got {h}"
    for array in (q, k_cache):
        if jnp.dtype(array.dtype).name not in SUPPORTED_DTYPES:
            return f"the Pallas kernels take {SUPPORTED_DTYPES}, got {array.dtype}"
    return None


def _compiler_params(interpret: bool, num_warps: int, num_stages: int):
    """Triton launch parameters (they also select the Triton lowering); none in interpret."""
    if interpret:
        return None
    from jax.experimental.pallas import triton as pltriton

    return pltriton.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def _rows_layout(
    q: jax.Array,
    k_cache: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    num_rows: int,
) -> tuple[jax.Array, jax.Array]:
    """Lay q out as rows of one KV head, pad the rows, and compute each row's key limit.

    Args:
      q: [B, T, N, H].
      k_cache: [B, S, K, H].
      q_positions: [B, T].
      kv_lengths: [B].
      num_rows: P >= T*G, the padded number of query rows.

    Returns:
      (q [B, K, P, H] with row t*G + g = query head k*G + g at t, zero rows beyond T*G;
       limits [B, P] int32: row r sees keys 0..limits[b, r]-1; 0 for padding rows).
    """
    b, t, n, h = q.shape
    s, k = k_cache.shape[1], k_cache.shape[2]
    g = n // k
    q = jnp.transpose(q.reshape(b, t, k, g, h), (0, 2, 1, 3, 4))  # [B, K, T, G, H]
    q = q.reshape(b, k, t * g, h)  # [B, K, T*G, H]
    q = jnp.pad(q, ((0, 0), (0, 0), (0, num_rows - t * g), (0, 0)))  # [B, K, P, H]
    limits = jnp.minimum(q_positions.astype(jnp.int32) + 1, kv_lengths.astype(jnp.int32)[:, None])
    limits = jnp.clip(limits, 0, s)  # [B, T]
    limits = jnp.repeat(limits, g, axis=1, total_repeat_length=t * g)  # [B, T*G]
    limits = jnp.pad(limits, ((0, 0), (0, num_rows - t * g)))  # [B, P]
    return q, limits


def _cache_layout(cache: jax.Array) -> jax.Array:
    """[B, S, K, H] -> the stored [B, K, S, H] (the model passes a swapaxes view of it, so
    XLA cancels the two transposes); caches shorter than one tile are padded (a tiny copy)."""
    cache = jnp.swapaxes(cache, 1, 2)  # [B, K, S, H]
    s = cache.shape[2]
    if s < MIN_TILE:
        cache = jnp.pad(cache, ((0, 0), (0, 0), (0, MIN_TILE - s), (0, 0)))  # [B, K, 16, H]
    return cache


def _key_block(num_keys: int, block_k: int) -> int:
    """The key block: block_k, or the largest power of two <= S when S is shorter."""
    return min(block_k, 1 << (max(num_keys, MIN_TILE).bit_length() - 1))


def _rows_back(out: jax.Array, t: int, n: int) -> jax.Array:
    """[B, K, P, H] rows -> [B, T, N, H] (inverse of `_rows_layout`'s q layout)."""
    b, k, _, h = out.shape
    out = out[:, :, : t * (n // k)].reshape(b, k, t, n // k, h)  # [B, K, T, G, H]
    return jnp.transpose(out, (0, 2, 1, 3, 4)).reshape(b, t, n, h)


def _attend_block(
    start,
    carry: tuple[jax.Array, jax.Array, jax.Array],
    *,
    q: jax.Array,
    k_ref,
    v_ref,
    limits: jax.Array,
    block_k: int,
    scale: float,
    masked: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """One online-softmax step over keys start..start+block_k-1 (FlashAttention-2, Alg. 1).

    Args:
      start: first key of the block (traced int32 scalar).
      carry: (m [Q] running max of the base-2 scores, denom [Q] running sum of
        exp2(score - m),
        acc [Q, H] running sum of exp2(score - m) * value), all float32.
      q: [Q, H] the program's query rows.
      k_ref, v_ref: [S, H] refs to the (row, KV head) cache.
      limits: [Q] int32 keys each row sees.
      masked: False only for blocks that every row sees whole (then start + block_k <= S).

    Returns:
      the updated carry.
    """
    m_prev, denom_prev, acc_prev = carry
    num_keys = k_ref.shape[0]
    # A block that would run past S is read at S - block_k; the keys it re-reads (below
    # `start`) were counted by the previous block and are masked below.
    read = jnp.minimum(start, num_keys - block_k) if masked else start
    k = k_ref[pl.ds(read, block_k), :]  # [block_k, H]
    v = v_ref[pl.ds(read, block_k), :]  # [block_k, H]
    scores = lax.dot_general(
        q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32
    )  # [Q, block_k]
    scores = scores * scale
    if masked:
        key = read + jnp.arange(block_k, dtype=jnp.int32)[None, :]  # [1, block_k]
        valid = (key >= start) & (key < limits[:, None])  # [Q, block_k]
        scores = jnp.where(valid, scores, MASK_VALUE)
    m = jnp.maximum(m_prev, jnp.max(scores, axis=1))  # [Q]
    # m_prev and m are both MASK_VALUE (finite) until a row meets its first valid key, so
    # these exponents are never inf - inf.
    alpha = jnp.exp2(m_prev - m)  # [Q]
    probs = jnp.exp2(scores - m[:, None])  # [Q, block_k]
    if masked:
        # A row with no valid key yet has m = MASK_VALUE, where a masked score would count 1.
        probs = jnp.where(valid, probs, 0.0)
    denom = alpha * denom_prev + jnp.sum(probs, axis=1)  # [Q]
    acc = alpha[:, None] * acc_prev + lax.dot_general(
        probs.astype(v.dtype), v, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32
    )  # [Q, H]
    return m, denom, acc


def _init_carry(rows: int, head_dim: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    return (
        jnp.full((rows,), MASK_VALUE, jnp.float32),
        jnp.zeros((rows,), jnp.float32),
        jnp.zeros((rows, head_dim), jnp.float32),
    )


def _cdiv(x: jax.Array, y: int) -> jax.Array:
    """ceil(x / y) for a traced int32 x >= 0 (`lax.div` truncates: Triton has no floor div)."""
    return lax.div(x + (y - 1), y)


def _flash_kernel(limits_ref, q_ref, k_ref, v_ref, *out_refs, block_k: int, scale: float):
    """One prefill program: block_rows query rows of one (row b, KV head k).

    Refs:
      limits_ref: [Q] int32, keys each row sees (0 for padding rows).
      q_ref: [Q, H].
      k_ref, v_ref: [S, H], the whole cache of (b, k); only blocks below the largest limit
        are read.
      out_refs: (o_ref [Q, H],), after the aliased poison buffer when there is one.
    """
    o_ref = out_refs[-1]
    limits = limits_ref[...]  # [Q]
    q = q_ref[...]  # [Q, H]
    step = functools.partial(
        _attend_block, q=q, k_ref=k_ref, v_ref=v_ref, limits=limits, block_k=block_k, scale=scale
    )
    # Blocks [0, n_full) lie below every row's limit: no mask. Blocks [n_full, n_all) hold
    # some row's diagonal or length: masked. Blocks from n_all on are seen by no row: skipped.
    n_full = lax.div(jnp.min(limits), block_k)
    n_all = _cdiv(jnp.max(limits), block_k)
    carry = _init_carry(*q.shape)
    carry = lax.fori_loop(0, n_full, lambda j, c: step(j * block_k, c, masked=False), carry)
    carry = lax.fori_loop(n_full, n_all, lambda j, c: step(j * block_k, c, masked=True), carry)
    _, denom, acc = carry
    # The final rescale by 1/denom (FlashAttention-2 §3.1.1); a row that saw no key has
    # denom = 0 and acc = 0 and outputs 0, as the XLA path does.
    o_ref[...] = (acc / jnp.where(denom > 0.0, denom, 1.0)[:, None]).astype(o_ref.dtype)


def _poisoned(shape, dtype) -> jax.Array:
    """A NaN-filled buffer, aliased to an output so that any element a kernel fails to write
    stays NaN (tests only)."""
    return jnp.full(shape, jnp.nan, dtype)


def _resolve(block_sizes: BlockSizes | None, interpret: bool | None, q: jax.Array):
    if block_sizes is None:
        block_sizes = BlockSizes.for_shape(q.shape[-1], q.dtype)
    if interpret is None:
        interpret = jax.default_backend() != "gpu"
    return block_sizes, interpret


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "poison"))
def flash_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    poison: bool = False,
) -> jax.Array:
    """Causal grouped-query attention with the prefill/verify kernel (any T, meant for T > 8).

    Args:
      q: [B, T, N, H].
      k_cache, v_cache: [B, S, K, H].
      q_positions: [B, T] int32.
      kv_lengths: [B] int32.
      block_sizes: tiles and launch parameters (default: `BlockSizes.for_shape`).
      interpret: run in Pallas interpret mode (default: unless the backend is a GPU).
      poison: fill the output with NaN before the kernel runs (tests: proves every element
        is written).

    Returns:
      [B, T, N, H] in q's dtype, equal to `xla.xla_attention`.
    """
    block_sizes, interpret = _resolve(block_sizes, interpret, q)
    b, t, n, h = q.shape
    s, num_kv = k_cache.shape[1], k_cache.shape[2]
    rows = t * (n // num_kv)
    block_rows = min(block_sizes.block_rows, max(MIN_TILE, _next_power_of_two(rows)))
    num_blocks = pl.cdiv(rows, block_rows)
    q_rows, limits = _rows_layout(q, k_cache, q_positions, kv_lengths, num_blocks * block_rows)
    k, v = _cache_layout(k_cache), _cache_layout(v_cache)  # [B, K, S', H]
    block_k = _key_block(s, block_sizes.block_k)

    # Grid axis 0 is CUDA's x, launched first and unbounded: programs of one (b, k) run side
    # by side and share its keys in L2, and the last query blocks, which see the most keys,
    # start first (better load balance under the causal mask).
    def rows_map(i, bi, ki):
        return (bi, ki, num_blocks - 1 - i, 0)

    row_spec = pl.BlockSpec((None, None, block_rows, h), rows_map)
    cache_spec = pl.BlockSpec((None, None, k.shape[2], h), lambda i, bi, ki: (bi, ki, 0, 0))
    limits_spec = pl.BlockSpec((None, block_rows), lambda i, bi, ki: (bi, num_blocks - 1 - i))
    out_shape = jax.ShapeDtypeStruct(q_rows.shape, q.dtype)
    args, in_specs = [limits, q_rows, k, v], [limits_spec, row_spec, cache_spec, cache_spec]
    if poison:
        args.append(_poisoned(out_shape.shape, out_shape.dtype))
        in_specs.append(row_spec)
    kernel = functools.partial(_flash_kernel, block_k=block_k, scale=LOG2E / math.sqrt(h))
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_blocks, b, num_kv),
        in_specs=in_specs,
        out_specs=row_spec,
        input_output_aliases={4: 0} if poison else {},
        interpret=interpret,
        compiler_params=_compiler_params(interpret, block_sizes.num_warps, block_sizes.num_stages),
        name="realm_flash_attention",
    )(*args)  # [B, K, P, H]
    return _rows_back(out, t, n)


def _decode_kernel(
    limits_ref, q_ref, k_ref, v_ref, *out_refs, block_k: int, chunk: int, scale: float
):
    """One flash-decoding program: all rows of one (row b, KV head k), one chunk of keys.

    Refs:
      limits_ref: [Q] int32, keys each row sees.
      q_ref: [Q, H].
      k_ref, v_ref: [S, H], the whole cache of (b, k); this program reads at most keys
        c*chunk .. (c+1)*chunk-1, and none at or beyond its rows' largest limit.
      out_refs: (acc [Q, H], m [Q], denom [Q]) float32 partials of chunk c, after the aliased
        poison buffers when there are some.
    """
    acc_ref, m_ref, denom_ref = out_refs[-3:]
    limits = limits_ref[...]  # [Q]
    q = q_ref[...]  # [Q, H]
    chunk_start = pl.program_id(0) * chunk
    step = functools.partial(
        _attend_block, q=q, k_ref=k_ref, v_ref=v_ref, limits=limits, block_k=block_k, scale=scale
    )
    num_steps = jnp.clip(_cdiv(jnp.max(limits) - chunk_start, block_k), 0, chunk // block_k)
    carry = lax.fori_loop(
        0,
        num_steps,
        lambda j, c: step(chunk_start + j * block_k, c, masked=True),
        _init_carry(*q.shape),
    )
    m, denom, acc = carry
    acc_ref[...] = acc
    m_ref[...] = m
    denom_ref[...] = denom


def _combine_chunks(acc: jax.Array, m: jax.Array, denom: jax.Array) -> jax.Array:
    """Merge per-chunk softmax partials into the normalised output (flash-decoding).

    Args:
      acc: [C, B, K, Q, H] sum over the chunk's keys of exp2(score - m_c) * value.
      m: [C, B, K, Q] base-2 max score of the chunk (MASK_VALUE when it saw no key).
      denom: [C, B, K, Q] sum over the chunk's keys of exp2(score - m_c).

    Returns:
      [B, K, Q, H] float32; 0 for rows that saw no key.
    """
    m_all = jnp.max(m, axis=0)  # [B, K, Q]
    weight = jnp.exp2(m - m_all[None])  # [C, B, K, Q]; 0 for chunks far below the max
    total = jnp.sum(weight * denom, axis=0)  # [B, K, Q]
    out = jnp.einsum("CBKM,CBKMH->BKMH", weight, acc)  # [B, K, Q, H]
    return out / jnp.where(total > 0.0, total, 1.0)[..., None]


def decode_chunks(batch: int, num_kv_heads: int, num_keys: int, block_sizes: BlockSizes):
    """(chunk, number of chunks): split S so that B * K * chunks ~ decode_programs, each
    chunk a multiple of the key block."""
    block_k = _key_block(num_keys, block_sizes.decode_block_k)
    blocks = pl.cdiv(max(num_keys, MIN_TILE), block_k)
    wanted = max(1, min(blocks, pl.cdiv(block_sizes.decode_programs, batch * num_kv_heads)))
    chunk = pl.cdiv(blocks, wanted) * block_k
    return chunk, pl.cdiv(max(num_keys, MIN_TILE), chunk)


@functools.partial(jax.jit, static_argnames=("block_sizes", "interpret", "poison"))
def flash_decoding(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
    poison: bool = False,
) -> jax.Array:
    """Causal grouped-query attention with the split-key decoding kernel (meant for T <= 8).

    All T*G rows of one (b, KV head) share one program per key chunk (padded to >= 16 rows
    for Triton's dot), so the kernel fits T up to ~16 at G = 8; larger T belongs to
    `flash_attention`.

    Args:
      q: [B, T, N, H].
      k_cache, v_cache: [B, S, K, H].
      q_positions: [B, T] int32.
      kv_lengths: [B] int32.
      block_sizes: tiles and launch parameters (default: `BlockSizes.for_shape`).
      interpret: run in Pallas interpret mode (default: unless the backend is a GPU).
      poison: fill the partial outputs with NaN before the kernel runs (tests).

    Returns:
      [B, T, N, H] in q's dtype, equal to `xla.xla_attention`.
    """
    block_sizes, interpret = _resolve(block_sizes, interpret, q)
    b, t, n, h = q.shape
    s, num_kv = k_cache.shape[1], k_cache.shape[2]
    rows = max(MIN_TILE, _next_power_of_two(t * (n // num_kv)))
    q_rows, limits = _rows_layout(q, k_cache, q_positions, kv_lengths, rows)  # [B, K, Q, H]
    k, v = _cache_layout(k_cache), _cache_layout(v_cache)  # [B, K, S', H]
    block_k = _key_block(s, block_sizes.decode_block_k)
    chunk, num_chunks = decode_chunks(b, num_kv, s, block_sizes)

    in_specs = [
        pl.BlockSpec((None, rows), lambda c, bi, ki: (bi, 0)),
        pl.BlockSpec((None, None, rows, h), lambda c, bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, k.shape[2], h), lambda c, bi, ki: (bi, ki, 0, 0)),
        pl.BlockSpec((None, None, k.shape[2], h), lambda c, bi, ki: (bi, ki, 0, 0)),
    ]
    out_specs = [
        pl.BlockSpec((None, None, None, rows, h), lambda c, bi, ki: (c, bi, ki, 0, 0)),
        pl.BlockSpec((None, None, None, rows), lambda c, bi, ki: (c, bi, ki, 0)),
        pl.BlockSpec((None, None, None, rows), lambda c, bi, ki: (c, bi, ki, 0)),
    ]
    out_shape = [
        jax.ShapeDtypeStruct((num_chunks, b, num_kv, rows, h), jnp.float32),  # acc
        jax.ShapeDtypeStruct((num_chunks, b, num_kv, rows), jnp.float32),  # m
        jax.ShapeDtypeStruct((num_chunks, b, num_kv, rows), jnp.float32),  # denom
    ]
    args = [limits, q_rows, k, v]
    if poison:
        args += [_poisoned(o.shape, o.dtype) for o in out_shape]
        in_specs += out_specs
    kernel = functools.partial(
        _decode_kernel, block_k=block_k, chunk=chunk, scale=LOG2E / math.sqrt(h)
    )
    acc, m, denom = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(num_chunks, b, num_kv),
        in_specs=in_specs,
        out_specs=out_specs,
        input_output_aliases={4: 0, 5: 1, 6: 2} if poison else {},
        interpret=interpret,
        compiler_params=_compiler_params(
            interpret, block_sizes.decode_num_warps, block_sizes.decode_num_stages
        ),
        name="realm_flash_decoding",
    )(*args)
    out = _combine_chunks(acc, m, denom).astype(q.dtype)  # [B, K, Q, H]
    return _rows_back(out, t, n)


def pallas_attention(
    q: jax.Array,
    k_cache: jax.Array,
    v_cache: jax.Array,
    q_positions: jax.Array,
    kv_lengths: jax.Array,
    *,
    block_sizes: BlockSizes | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    """`attention` through the Pallas kernels: flash decoding for T <= 8, else prefill.

    Args:
      q: [B, T, N, H].
      k_cache, v_cache: [B, S, K, H].
      q_positions: [B, T] int32.
      kv_lengths: [B] int32.
      block_sizes, interpret: see `flash_attention`.

    Returns:
      [B, T, N, H] in q's dtype.
    """
    kernel = flash_decoding if q.shape[1] <= DECODE_MAX_T else flash_attention
    return kernel(
        q,
        k_cache,
        v_cache,
        q_positions,
        kv_lengths,
        block_sizes=block_sizes,
        interpret=interpret,
    )
