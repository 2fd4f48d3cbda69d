"""The jitted fixed-shape steps that every generation path runs: prefill and decode.

`generate` runs them with one row; the batching engine (a later issue) runs them with
`max_batch` rows. Shapes are bucketed on the host (`bucket`) so that recompiles are bounded:
prompts are padded to a length bucket, and attention reads only `attn_len` cache positions,
the smallest bucket holding every row's length, instead of the whole capacity.

Every step takes an optional `lora` (a `lora.LoraStack`, traced like the params) and
`adapter_ids` ([B] int32, each row's slot in the stack); None runs the base model with no
extra ops. A stack of a different shape (M, ranks, targets) is a new compilation.
"""

import functools

import jax
import jax.numpy as jnp

from realm_jax.config import ModelConfig
from realm_jax.kv_cache import KVCache, init_cache, insert_row
from realm_jax.lora import LoraStack
from realm_jax.model import Params, forward, lm_head
from realm_jax.sampling import SamplingParams, sample, token_rngs

MIN_BUCKET = 16  # smallest padded prompt length
# Smallest attention window of a decode step. Each window size is a separate compilation
# (~7 s for SmolLM2 on a 2-core CPU), while attending over 256 positions instead of 16 costs
# ~4 ms of a ~50 ms step there: a coarse floor keeps short generations to one compilation.
MIN_DECODE_WINDOW = 256


def bucket(n: int, limit: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum), clipped to `limit`."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return size if limit is None else min(size, limit)


def decode_window(length: int, capacity: int) -> int:
    """The static `attn_len` for a decode step whose longest row reaches `length`."""
    return bucket(length, capacity, MIN_DECODE_WINDOW)


def _append_and_sample(
    params: Params,
    tokens: jax.Array,
    num_tokens: jax.Array,
    cache: KVCache,
    sampling: SamplingParams,
    seeds: jax.Array,
    request_ids: jax.Array,
    lora: LoraStack | None = None,
    adapter_ids: jax.Array | None = None,
    *,
    config: ModelConfig,
    attn_len: int,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Append up to T tokens per row to the cache and sample each row's next token.

    Args:
      params: model weights.
      tokens: [B, T] int32, row b's new tokens left-aligned, padded beyond num_tokens[b].
      num_tokens: [B] int32 real tokens per row (0 leaves a row untouched: only positions
        beyond its length are written, and they are never read).
      cache: KV cache (donated); row b's new tokens go to positions lengths[b]...
      sampling: per-row sampling parameters.
      seeds, request_ids: [B] int32, with the token position they key the sampler.
      lora: optional stack of M adapters; adapter_ids: [B] int32 slot of each row
        (see `model.forward`).
      config, attn_len, implementation: static; see `model.forward`.

    Returns:
      (next_tokens [B] int32, logits [B, V] float32 at each row's last real token, cache).
    """
    t = tokens.shape[1]
    positions = cache.lengths[:, None] + jnp.arange(t, dtype=jnp.int32)[None]  # [B, T]
    kv_lengths = cache.lengths + num_tokens
    hidden, cache = forward(
        params,
        tokens,
        positions,
        cache,
        kv_lengths,
        config=config,
        attn_len=attn_len,
        implementation=implementation,
        lora=lora,
        adapter_ids=adapter_ids,
    )  # [B, T, D]
    last = jnp.clip(num_tokens - 1, 0, t - 1)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = lm_head(params, hidden)  # [B, V]
    rngs = token_rngs(seeds, request_ids, kv_lengths)
    return sample(logits, sampling, rngs), logits, cache


prefill_step = functools.partial(
    jax.jit,
    static_argnames=("config", "attn_len", "implementation"),
    donate_argnames=("cache",),
)(_append_and_sample)


@functools.partial(
    jax.jit, static_argnames=("config", "implementation"), donate_argnames=("cache",)
)
def prefill_into_slot(
    params: Params,
    tokens: jax.Array,
    num_tokens: jax.Array,
    cache: KVCache,
    slot: jax.Array,
    sampling: SamplingParams,
    seeds: jax.Array,
    request_ids: jax.Array,
    lora: LoraStack | None = None,
    adapter_ids: jax.Array | None = None,
    *,
    config: ModelConfig,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Prefill one prompt into row `slot` of a cache and sample its first token.

    The prompt runs alone (batch 1, a fresh cache of its padded length T), so its keys,
    values and first token do not depend on what the other rows hold; they are then copied
    into the slot's positions 0..T-1 (`kv_cache.insert_row`), whose length becomes
    num_tokens. `rj.generate` (slot 0 of a one-row cache) and `Engine` both prefill here.

    Args:
      tokens: [1, T] int32, the prompt padded to a length bucket.
      num_tokens: [1] int32, its real length.
      cache: B rows of capacity >= T (donated).
      slot: int32 scalar, the row to fill.
      sampling, seeds, request_ids: the request's row, fields [1] (see `prefill_step`).
      lora, adapter_ids: optional adapter stack and [1] int32 slot (see `model.forward`).

    Returns:
      (next_token [1] int32, logits [1, V] float32, cache).
    """
    t = tokens.shape[1]
    stacked = not isinstance(params.layers, tuple)
    dtype = cache.k.dtype if stacked else cache.k[0].dtype
    row = init_cache(config, 1, t, dtype, stacked=stacked)
    token, logits, row = _append_and_sample(
        params,
        tokens,
        num_tokens,
        row,
        sampling,
        seeds,
        request_ids,
        lora,
        adapter_ids,
        config=config,
        attn_len=t,
        implementation=implementation,
    )
    return token, logits, insert_row(cache, row, slot)


@functools.partial(
    jax.jit,
    static_argnames=("config", "attn_len", "implementation"),
    donate_argnames=("cache",),
)
def decode_step(
    params: Params,
    tokens: jax.Array,
    active: jax.Array,
    cache: KVCache,
    sampling: SamplingParams,
    seeds: jax.Array,
    request_ids: jax.Array,
    lora: LoraStack | None = None,
    adapter_ids: jax.Array | None = None,
    *,
    config: ModelConfig,
    attn_len: int,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Feed each active row its last token and sample the next one.

    Args:
      tokens: [B] int32, each row's newest token (not yet in the cache).
      active: [B] bool; inactive rows keep their length and their output is meaningless.
      Others as in `prefill_step`.

    Returns:
      (next_tokens [B] int32, logits [B, V] float32, cache).
    """
    return _append_and_sample(
        params,
        tokens[:, None],
        active.astype(jnp.int32),
        cache,
        sampling,
        seeds,
        request_ids,
        lora,
        adapter_ids,
        config=config,
        attn_len=attn_len,
        implementation=implementation,
    )


@functools.partial(
    jax.jit,
    static_argnames=("config", "attn_len", "max_steps", "implementation"),
    donate_argnames=("cache",),
)
def decode_loop(
    params: Params,
    tokens: jax.Array,
    active: jax.Array,
    cache: KVCache,
    sampling: SamplingParams,
    seeds: jax.Array,
    request_ids: jax.Array,
    num_steps: jax.Array,
    stop_ids: jax.Array,
    lora: LoraStack | None = None,
    adapter_ids: jax.Array | None = None,
    *,
    config: ModelConfig,
    attn_len: int,
    max_steps: int,
    implementation: str = "auto",
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, KVCache]:
    """Up to `num_steps` decode steps in one program: `decode_step` in a `lax.while_loop`,
    each active row fed its last token.

    One dispatch for many tokens: on a GPU a step called alone costs the host its launches
    and the caller a wait per token, which the loop pays once (docs/results.md, the largest
    gap). A row stops after it samples its stop id; the loop ends after `num_steps` steps or
    when no row is active. The sampler is keyed by position, so the tokens are those that
    `decode_step` would give one call at a time.

    Args:
      num_steps: int32 scalar <= max_steps (traced: a shorter last call needs no new program).
      stop_ids: [B] int32, the id after which each row stops (-1: none).
      attn_len: static window, holding every position the last step writes.
      max_steps: static, the width of the returned tokens.
      Others as in `decode_step`.

    Returns:
      (new_tokens [B, max_steps] int32, row b's first counts[b] valid; counts [B] int32;
      last [B] int32, each row's newest token; active [B] bool, the rows not stopped; cache).
    """
    batch = tokens.shape[0]

    def cond(carry):
        i, _, active, *_ = carry
        return (i < num_steps) & jnp.any(active)

    def body(carry):
        i, last, active, cache, out, counts = carry
        token, _, cache = decode_step(
            params,
            last,
            active,
            cache,
            sampling,
            seeds,
            request_ids,
            lora,
            adapter_ids,
            config=config,
            attn_len=attn_len,
            implementation=implementation,
        )  # the one decode step, traced into the loop's body
        last = jnp.where(active, token, last)
        out = out.at[:, i].set(last)
        counts = counts + active.astype(jnp.int32)
        return i + 1, last, active & (token != stop_ids), cache, out, counts

    out = jnp.zeros((batch, max_steps), jnp.int32)
    counts = jnp.zeros((batch,), jnp.int32)
    carry = (jnp.int32(0), tokens, active, cache, out, counts)
    _, last, active, cache, out, counts = jax.lax.while_loop(cond, body, carry)
    return out, counts, last, active, cache


@functools.partial(jax.jit, static_argnames=("config", "implementation"))
def prompt_logits(
    params: Params,
    tokens: jax.Array,
    num_tokens: jax.Array,
    lora: LoraStack | None = None,
    adapter_ids: jax.Array | None = None,
    *,
    config: ModelConfig,
    implementation: str = "auto",
) -> jax.Array:
    """Logits at every position of padded prompts, each starting at position 0.

    Args:
      tokens: [B, T] int32, padded beyond num_tokens.
      num_tokens: [B] int32.
      lora, adapter_ids: optional adapter stack and [B] int32 slots (see `model.forward`).

    Returns:
      [B, T, V] float32; positions at or beyond num_tokens[b] are meaningless.
    """
    b, t = tokens.shape
    stacked = not isinstance(params.layers, tuple)
    cache = init_cache(config, b, t, params.embed.dtype, stacked=stacked)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))  # [B, T]
    hidden, _ = forward(
        params,
        tokens,
        positions,
        cache,
        num_tokens,
        config=config,
        attn_len=t,
        implementation=implementation,
        lora=lora,
        adapter_ids=adapter_ids,
    )
    return lm_head(params, hidden)
