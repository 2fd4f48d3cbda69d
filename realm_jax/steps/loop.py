"""The on-device loop: up to `num_steps` decode or speculative steps in one device call.

One dispatch for many tokens: on a GPU a step called alone costs the host its launches and the
caller a wait per token, which the loop pays once per call (docs/results.md, "the largest
gap"). The step is chosen by `spec.draft` (plain `decode.decode_step` or
`speculative.speculative_step`); after each, the stop rule (`state.emit`) keeps each row's
tokens up to its stop id and budget and stops the row there. The sampler is keyed by
position, so the tokens do not depend on how many steps a call runs.

The Engine is the only caller (`rj.generate` and `rj.stream` run through it).
"""

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from realm_jax.steps.decode import decode_step_unjitted
from realm_jax.steps.speculative import NO_TOKEN, speculative_step
from realm_jax.steps.state import Caches, Rows, StepSpec, Weights, emit


class StepsOut(NamedTuple):
    """What a call of `run_steps` returns besides the new rows and caches.

    Attributes:
      tokens: [B, max_steps * (k+1)] int32, row b's new tokens in its first counts[b] columns.
      counts: [B] int32, tokens each row kept (after the stop rule).
      accepted: [B, k+1] int32 (k = 0 without a draft): accepted[b, a] counts the steps in
        which row b accepted exactly a draft tokens.
      active: [B] bool, the rows still generating after the call.
    """

    tokens: jax.Array
    counts: jax.Array
    accepted: jax.Array
    active: jax.Array


@functools.partial(jax.jit, static_argnames=("spec", "max_steps"), donate_argnames=("caches",))
def run_steps(
    weights: Weights,
    rows: Rows,
    caches: Caches,
    live: jax.Array,
    num_steps: jax.Array,
    end_at_finish: jax.Array,
    *,
    spec: StepSpec,
    max_steps: int,
) -> tuple[Rows, Caches, StepsOut]:
    """Run up to `num_steps` steps in a `lax.while_loop`, each row stopping on its own.

    The loop ends after `num_steps` steps, when no row is active, or, with `end_at_finish`,
    after the step in which any row stopped (so that a waiting request can take its slot).

    Args:
      weights, rows, caches: as the steps take them (caches donated).
      live: [B] bool, the slots the host still runs; a row outside it (cancelled) is made
        inactive before the first step.
      num_steps: int32 scalar <= max_steps (traced: a shorter call needs no new program).
      end_at_finish: bool scalar.
      spec: static; `spec.attn_len` must hold every position the call can write.
      max_steps: static, the most steps per call (the width of the returned tokens).

    Returns:
      (rows, caches, `StepsOut`).
    """
    b = rows.batch_size
    per_step = spec.tokens_per_step
    width = max_steps * per_step
    rows = dataclasses.replace(rows, active=rows.active & live)
    index = jnp.arange(per_step, dtype=jnp.int32)[None]  # [1, E]
    row_index = jnp.arange(b, dtype=jnp.int32)[:, None]  # [B, 1]

    def cond(carry):
        i, rows, _, _, _, _, finished = carry
        return (i < num_steps) & jnp.any(rows.active) & ~(end_at_finish & finished)

    def body(carry):
        i, rows, caches, out, counts, accepted, _ = carry
        if spec.draft is None:
            token, _, target = decode_step_unjitted(weights, rows, caches.target, spec)
            caches = Caches(target=target, draft=caches.draft)
            emitted, produced = token[:, None], rows.active.astype(jnp.int32)  # [B, 1], [B]
            num_accepted = jnp.zeros((b,), jnp.int32)
        else:
            caches, emitted, num_accepted = speculative_step(weights, rows, caches, spec)
            produced = jnp.where(rows.active, num_accepted + 1, 0)  # [B]
        new_rows, keep = emit(rows, emitted, produced)
        columns = jnp.where(index < keep[:, None], counts[:, None] + index, width)  # [B, E]
        out = out.at[row_index, columns].set(emitted, mode="drop")
        accepted = accepted.at[row_index[:, 0], num_accepted].add(rows.active.astype(jnp.int32))
        finished = jnp.any(rows.active & ~new_rows.active)
        return i + 1, new_rows, caches, out, counts + keep, accepted, finished

    carry = (
        jnp.int32(0),
        rows,
        caches,
        jnp.full((b, width), NO_TOKEN, jnp.int32),
        jnp.zeros((b,), jnp.int32),
        jnp.zeros((b, per_step), jnp.int32),
        jnp.bool_(False),
    )
    _, rows, caches, out, counts, accepted, _ = jax.lax.while_loop(cond, body, carry)
    return rows, caches, StepsOut(out, counts, accepted, rows.active)
