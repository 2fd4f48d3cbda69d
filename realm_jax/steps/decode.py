"""Prefill and the one-token decode step, and the shape buckets that bound their programs.

Shapes are bucketed on the host (`bucket`) so that compilations are bounded: prompts are
padded to a length bucket, and attention reads only `StepSpec.attn_len` cache positions, the
smallest bucket holding every position a call writes, instead of the whole capacity.

`prefill` fills one engine slot; `decode_step` is the step that `loop.run_steps` traces into
its `lax.while_loop` (jitted here too, for tests and experiments that time one step alone);
`prompt_logits` scores whole prompts for `rj.logits`. The speculative step is in
`speculative.py`; the loop and the stop rule in `loop.py`.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp

from realm_jax.kv_cache import KVCache, init_cache, insert_row
from realm_jax.lora.tree import LoraStack
from realm_jax.model import Params, forward, lm_head
from realm_jax.sampling import sample, token_rngs
from realm_jax.steps.drafts import draft_weights
from realm_jax.steps.state import Caches, Rows, StepSpec, Weights, emit

MIN_BUCKET = 16  # smallest padded prompt length
# Smallest attention window of a decode call. Each window size is a separate compilation
# (several seconds for SmolLM2 on a 2-core CPU), while attending over 256 positions instead
# of 16 costs little of a step there: a coarse floor keeps short generations to one program.
MIN_DECODE_WINDOW = 256


def bucket(n: int, limit: int | None = None, minimum: int = MIN_BUCKET) -> int:
    """The smallest power of two >= max(n, minimum), clipped to `limit`."""
    size = max(minimum, 1 << max(0, int(n) - 1).bit_length())
    return size if limit is None else min(size, limit)


def decode_window(length: int, capacity: int) -> int:
    """The static `attn_len` for a decode call whose longest row reaches `length`."""
    return bucket(length, capacity, MIN_DECODE_WINDOW)


def append_and_sample(
    params: Params,
    lora: LoraStack | None,
    tokens: jax.Array,
    num_tokens: jax.Array,
    cache: KVCache,
    rows: Rows,
    spec: StepSpec,
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Append up to T tokens per row to the cache and sample each row's next token.

    Args:
      params, lora: the weights to run (lora: a stack, each row's adapter by
        `rows.adapter_ids`; None for none).
      tokens: [B, T] int32, row b's new tokens left-aligned, padded beyond num_tokens[b].
      num_tokens: [B] int32 real tokens per row (0 leaves a row untouched: only positions
        beyond its length are written, and they are never read).
      cache: row b's new tokens go to positions lengths[b]...
      rows: sampling parameters, seeds, request and adapter ids of the B rows.
      spec: config, attention window and implementation.

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
        config=spec.config,
        attn_len=spec.attn_len,
        implementation=spec.implementation,
        lora=lora,
        adapter_ids=None if lora is None else rows.adapter_ids,
    )  # [B, T, D]
    last = jnp.clip(num_tokens - 1, 0, t - 1)
    hidden = jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = lm_head(params, hidden)  # [B, V]
    rngs = token_rngs(rows.seeds, rows.request_ids, kv_lengths)
    return sample(logits, rows.sampling, rngs), logits, cache


def _prefill_cache(params, lora, tokens, num_tokens, cache, slot, row, spec):
    """Run the prompt alone in a fresh one-row cache of its padded length, then copy the row
    into `slot` of `cache`: (first token [1], cache). The draft's prefill runs this too and
    drops its token (one [1, V] product more, against a second way to prefill)."""
    t = tokens.shape[1]
    stacked = not isinstance(params.layers, tuple)
    dtype = cache.k.dtype if stacked else cache.k[0].dtype
    fresh = init_cache(spec.config, 1, t, dtype, stacked=stacked)
    token, _, fresh = append_and_sample(params, lora, tokens, num_tokens, fresh, row, spec)
    return token, insert_row(cache, fresh, slot)


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("caches",))
def prefill(
    weights: Weights,
    tokens: jax.Array,
    num_tokens: jax.Array,
    caches: Caches,
    rows: Rows,
    row: Rows,
    slot: jax.Array,
    *,
    spec: StepSpec,
) -> tuple[Caches, Rows, jax.Array, jax.Array]:
    """Prefill one prompt into row `slot` of the caches and sample its first token.

    The prompt runs alone (batch 1, a fresh cache of its padded length T), so its keys,
    values and first token do not depend on what the other rows hold; they are then copied
    into the slot's positions 0..T-1 (`kv_cache.insert_row`), whose length becomes
    num_tokens. With a draft, its cache gets the prompt too. The first token goes through the
    stop rule (`state.emit`), and `row` becomes row `slot` of `rows`.

    Args:
      tokens: [1, T] int32, the prompt padded to a length bucket (T = spec.attn_len).
      num_tokens: [1] int32, its real length.
      caches: B rows of capacity >= T (donated).
      rows: the batch's rows; row `slot` is replaced.
      row: the request's own row, fields [1]: active True, remaining = its budget, its stop
        id, sampling, seed, request and adapter id (`tokens` is ignored).
      slot: int32 scalar, the row to fill.

    Returns:
      (caches, rows, first token [1, 1] int32 (the shape of `loop.StepsOut.tokens`),
      still active [1] bool).
    """
    token, target = _prefill_cache(
        weights.params, weights.lora, tokens, num_tokens, caches.target, slot, row, spec
    )
    draft = caches.draft
    if spec.draft is not None:
        params, lora = draft_weights(weights, spec.draft)
        draft_spec = dataclasses.replace(spec, config=spec.draft.config)
        _, draft = _prefill_cache(params, lora, tokens, num_tokens, draft, slot, row, draft_spec)
    row, _ = emit(row, token[:, None], jnp.ones((1,), jnp.int32))
    rows = jax.tree.map(lambda whole, one: whole.at[slot].set(one[0]), rows, row)
    return Caches(target=target, draft=draft), rows, token[:, None], row.active


def decode_step_unjitted(
    weights: Weights, rows: Rows, cache: KVCache, spec: StepSpec
) -> tuple[jax.Array, jax.Array, KVCache]:
    """`decode_step` before `jax.jit` (the loop traces it into its body)."""
    return append_and_sample(
        weights.params,
        weights.lora,
        rows.tokens[:, None],
        rows.active.astype(jnp.int32),
        cache,
        rows,
        spec,
    )


@functools.partial(jax.jit, static_argnames=("spec",), donate_argnames=("cache",))
def decode_step(
    weights: Weights, rows: Rows, cache: KVCache, *, spec: StepSpec
) -> tuple[jax.Array, jax.Array, KVCache]:
    """Feed each active row its newest token and sample the next one.

    Inactive rows keep their length and their output is meaningless. `rows.tokens`,
    `rows.remaining` and the stop ids are not updated here: that is the loop's stop rule.

    Returns:
      (next_tokens [B] int32, logits [B, V] float32, cache).
    """
    return decode_step_unjitted(weights, rows, cache, spec)


@functools.partial(jax.jit, static_argnames=("spec",))
def prompt_logits(
    weights: Weights, tokens: jax.Array, num_tokens: jax.Array, adapter_ids: jax.Array, *,
    spec: StepSpec,
) -> jax.Array:  # fmt: skip
    """Logits at every position of padded prompts, each starting at position 0.

    Args:
      tokens: [B, T] int32, padded beyond num_tokens (T = spec.attn_len).
      num_tokens: [B] int32.
      adapter_ids: [B] int32, each row's adapter in `weights.lora` (ignored without one).

    Returns:
      [B, T, V] float32; positions at or beyond num_tokens[b] are meaningless.
    """
    b, t = tokens.shape
    params = weights.params
    stacked = not isinstance(params.layers, tuple)
    cache = init_cache(spec.config, b, t, params.embed.dtype, stacked=stacked)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32)[None], (b, t))  # [B, T]
    hidden, _ = forward(
        params,
        tokens,
        positions,
        cache,
        num_tokens,
        config=spec.config,
        attn_len=t,
        implementation=spec.implementation,
        lora=weights.lora,
        adapter_ids=None if weights.lora is None else adapter_ids,
    )
    return lm_head(params, hidden)
