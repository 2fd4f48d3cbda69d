"""The speculative step: a draft proposes k tokens, the target verifies them in one forward.

The algorithm is Leviathan et al. 2023 (Algorithm 1) and Chen et al. 2023 (Algorithm 2): the
draft samples k tokens from its own distribution `draft_probs` (q); the target scores all k + 1
positions at once (`target_probs`, p); draft token i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); the first rejected one is replaced by a sample from the residual
norm(max(p_i - q_i, 0)); when all k are accepted a bonus token is drawn from p_{k+1}. p and q
are `sampling.sampling_probs` under the request's temperature / top-k / top-p, so the tokens
have exactly the distribution of plain sampling (`reference.speculative_block_reference` and
docs/speculative.md for the proof sketch). Greedy rows (temperature 0) accept while the draft
token equals the target's argmax and then take the target's argmax: the output is plain greedy.

This is one step of `loop.run_steps`, as `decode.decode_step` is; the drafts are in
`drafts.py`, the float64 twins in `reference.py`. Lowercase k is `num_draft_tokens`, a static
count (not the legend's K, the KV heads).

Randomness: each random draw is keyed by (seed, request id, absolute position of the token it
decides, stream tag) -- `sampling.token_rngs` folded with DRAFT / ACCEPT / RESIDUAL -- so runs
reproduce. A step at cache length n uses, for its output, only keys at positions n+1..n+a+1
(a = accepted count) and the next step starts at n + a + 1, so no key decides two outputs.
"""

import dataclasses

import chex
import jax
import jax.numpy as jnp

from realm_jax.model import forward, lm_head
from realm_jax.sampling import SamplingParams, draw, sampling_probs, token_rngs
from realm_jax.steps.drafts import draft_weights
from realm_jax.steps.state import Caches, Rows, StepSpec, Weights

# Stream tags folded into `token_rngs` keys: one independent stream per kind of draw.
DRAFT, ACCEPT, RESIDUAL = 1, 2, 3
NO_TOKEN = -1  # fills the unused tail of a step's emitted tokens


def _tagged_rngs(seeds, request_ids, positions, tag: int) -> jax.Array:
    """Keys [B * T] for (seed, request, position, tag); seeds/request_ids [B], positions [B, T]."""
    b, t = positions.shape
    rngs = token_rngs(jnp.repeat(seeds, t), jnp.repeat(request_ids, t), positions.reshape(-1))
    return jax.vmap(jax.random.fold_in, in_axes=(0, None))(rngs, tag)


def _repeat_rows(sampling: SamplingParams, times: int) -> SamplingParams:
    """Each row's sampling parameters repeated `times` times ([B] -> [B * times])."""
    return jax.tree.map(lambda x: jnp.repeat(x, times), sampling)


def residual_probs(target_probs: jax.Array, draft_probs: jax.Array) -> jax.Array:
    """norm(max(target_probs - draft_probs, 0)) over the last axis ([..., V] -> [..., V]).

    Where the two are equal the residual is all zero, and no rejection can happen (every
    draft token is then accepted); `target_probs` is returned there so the result is always a
    distribution.
    """
    excess = jnp.maximum(target_probs - draft_probs, 0.0)  # [..., V]
    total = jnp.sum(excess, axis=-1, keepdims=True)  # [..., 1]
    safe = jnp.where(total > 0, total, 1.0)
    return jnp.where(total > 0, excess / safe, target_probs)


def speculative_step(
    weights: Weights, rows: Rows, caches: Caches, spec: StepSpec
) -> tuple[Caches, jax.Array, jax.Array]:
    """One speculative step for B rows: draft k tokens, verify, accept / resample, roll back.

    Each row uses its own length n, positions n..n+k, sampling parameters and keys, and
    accepts its own number of tokens; the caches are rolled back by their lengths. Inactive
    rows keep their caches' lengths and emit nothing. `rows` is not updated here: the loop's
    stop rule (`state.emit`) does that with what this returns.

    Args:
      weights: the target's weights and LoRA stack, and a separate draft's weights.
      rows: the rows' newest tokens, active mask, sampling parameters, seeds and ids.
      caches: target and draft caches, lengths [B] = n.
      spec: static; `spec.draft` says how to draft and k; `spec.attn_len` >= max(n) + k + 1
        over active rows.

    Returns:
      (caches, emitted [B, k+1] int32, num_accepted [B] int32): row b emitted
      emitted[b, :num_accepted[b] + 1] (accepted draft tokens, then the correction or bonus
      token), NO_TOKEN beyond; inactive rows emit nothing and report 0.
    """
    k = spec.draft.num_draft_tokens
    draft_params, draft_lora = draft_weights(weights, spec.draft)
    draft_config = spec.draft.config
    target_lora = weights.lora
    lengths = caches.target.lengths  # [B] n
    b = lengths.shape[0]
    chex.assert_shape([rows.tokens, rows.active, rows.seeds, rows.sampling.temperature], (b,))
    last, active, sampling = rows.tokens, rows.active, rows.sampling  # [B]
    seeds, request_ids = rows.seeds, rows.request_ids
    greedy = sampling.temperature == 0.0  # [B]

    def draft_forward(tokens, positions, cache):
        """Feed tokens [B] at positions [B] to the draft: (hidden [B, D], cache)."""
        hidden, cache = forward(
            draft_params,
            tokens[:, None],
            positions[:, None],
            cache,
            positions + 1,
            config=draft_config,
            attn_len=spec.attn_len,
            implementation=spec.implementation,
            lora=draft_lora,
            adapter_ids=None if draft_lora is None else rows.adapter_ids,
        )  # [B, 1, D]
        return hidden[:, 0], cache

    # 1. Draft: k one-token forwards in a scan, feeding `last`, then each draft token; token
    #    i + 1 is drawn from the draft's own q (the argmax for greedy rows).
    def draft_one(carry, i):
        cache, token = carry
        positions = lengths + i  # [B] where `token` goes
        hidden, cache = draft_forward(token, positions, cache)
        logits = lm_head(draft_params, hidden)  # [B, V]
        probs = sampling_probs(logits, sampling)  # [B, V]
        # a greedy row's probs are one-hot, so `draw` returns its argmax exactly
        new_token = draw(_tagged_rngs(seeds, request_ids, (positions + 1)[:, None], DRAFT), probs)
        return (cache, new_token), (new_token, probs)

    (draft_cache, _), (draft_tokens, draft_probs) = jax.lax.scan(
        draft_one, (caches.draft, last), jnp.arange(k, dtype=jnp.int32)
    )  # [k, B], [k, B, V]
    draft_tokens = draft_tokens.T  # [B, k]
    draft_probs = jnp.swapaxes(draft_probs, 0, 1)  # [B, k, V]

    # 2. Verify: the target scores positions n..n+k in one forward.
    positions = lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None]  # [B, k+1]
    hidden, target_cache = forward(
        weights.params,
        jnp.concatenate([last[:, None], draft_tokens], axis=1),
        positions,
        caches.target,
        lengths + k + 1,
        config=spec.config,
        attn_len=spec.attn_len,
        implementation=spec.implementation,
        lora=target_lora,
        adapter_ids=None if target_lora is None else rows.adapter_ids,
    )  # [B, k+1, D]
    target_logits = lm_head(weights.params, hidden)  # [B, k+1, V]
    v = target_logits.shape[-1]
    target_probs = sampling_probs(
        target_logits.reshape(b * (k + 1), v), _repeat_rows(sampling, k + 1)
    ).reshape(b, k + 1, v)  # [B, k+1, V]
    target_argmax = jnp.argmax(target_logits, axis=-1).astype(jnp.int32)  # [B, k+1]

    # 3. Accept draft token i with probability min(1, p/q): u * q < p for u ~ U[0, 1).
    #    Greedy rows accept exactly when the draft token is the target's argmax.
    pick = draft_tokens[..., None]
    draft_p = jnp.take_along_axis(draft_probs, pick, axis=-1)[..., 0]  # [B, k]
    target_p = jnp.take_along_axis(target_probs[:, :k], pick, axis=-1)[..., 0]  # [B, k]
    rngs = _tagged_rngs(seeds, request_ids, positions[:, 1:], ACCEPT)
    uniforms = jax.vmap(jax.random.uniform)(rngs).reshape(b, k)  # [B, k]
    accepted = jnp.where(
        greedy[:, None], draft_tokens == target_argmax[:, :k], uniforms * draft_p < target_p
    )  # [B, k]
    num_accepted = jnp.sum(jnp.cumprod(accepted.astype(jnp.int32), axis=1), axis=1)  # [B]
    num_accepted = jnp.where(active, num_accepted, 0)

    # 4. The token after the accepted ones: residual at the first rejection, else the bonus
    #    token from p_{k+1} (a residual against an all-zero draft distribution).
    residual = residual_probs(target_probs[:, :k], draft_probs)  # [B, k, V]
    residual = jnp.concatenate([residual, target_probs[:, k:]], axis=1)  # [B, k+1, V]
    residual = jnp.take_along_axis(residual, num_accepted[:, None, None], axis=1)[:, 0]  # [B, V]
    rngs = _tagged_rngs(seeds, request_ids, (lengths + num_accepted + 1)[:, None], RESIDUAL)
    argmax_at = jnp.take_along_axis(target_argmax, num_accepted[:, None], axis=1)[:, 0]
    correction = jnp.where(greedy, argmax_at, draw(rngs, residual))  # [B]

    # 5. A row that accepted all k drafts has emitted d_k, which the draft was never fed:
    #    feed it (position n + k) when any row needs it. Other rows write beyond their new
    #    length, where nothing is read. Skipped, it would cost a draft forward every step.
    def catch_up(cache):
        return draft_forward(draft_tokens[:, k - 1], lengths + k, cache)[1]

    draft_cache = jax.lax.cond(
        jnp.any(num_accepted == k), catch_up, lambda cache: cache, draft_cache
    )

    # 6. Emitted tokens and roll-back: both caches keep n + a + 1 positions. The keys and
    #    values written beyond (rejected tokens) are never read and are overwritten later.
    index = jnp.arange(k + 1, dtype=jnp.int32)[None]  # [1, k+1]
    padded = jnp.concatenate([draft_tokens, jnp.full((b, 1), NO_TOKEN, jnp.int32)], axis=1)
    emitted = jnp.where(index < num_accepted[:, None], padded, NO_TOKEN)
    emitted = jnp.where(index == num_accepted[:, None], correction[:, None], emitted)
    emitted = jnp.where(active[:, None], emitted, NO_TOKEN)  # [B, k+1]
    new_lengths = jnp.where(active, lengths + num_accepted + 1, lengths)
    caches = Caches(
        target=dataclasses.replace(target_cache, lengths=new_lengths),
        draft=dataclasses.replace(draft_cache, lengths=new_lengths),
    )
    return caches, emitted, num_accepted
