"""Speculative decoding: a draft proposes k tokens, the target verifies them in one forward.

The algorithm is Leviathan et al. 2023 (Algorithm 1) and Chen et al. 2023 (Algorithm 2): the
draft samples k tokens from its own distribution `draft_probs` (q); the target scores all k + 1
positions at once (`target_probs`, p); draft token i is accepted with probability
min(1, p_i(d_i) / q_i(d_i)); the first rejected one is replaced by a sample from the residual
norm(max(p_i - q_i, 0)); when all k are accepted a bonus token is drawn from p_{k+1}. p and q
are `sampling.sampling_probs` under the request's temperature / top-k / top-p, so the tokens
have exactly the distribution of plain sampling (see `speculative_block_reference` and
docs/speculative.md for the proof sketch). Greedy rows (temperature 0) accept while the draft
token equals the target's argmax and then take the target's argmax: the output is plain greedy.

What lives here: drafts (`layer_skip_draft`, self-speculative decoding after Elhoushi et al.
2024; `check_draft`), `SpeculativeState` (the per-row state between steps), the jitted
batched `speculative_step`, and the float64 twins `residual_probs_reference` /
`speculative_block_reference`. What does not: generating with the step (the host and device
loops, streaming, statistics, adapters: `speculative_generation.py`), prefill
(`batching.prefill_step`), the sampling distributions (`sampling.py`), slots (`engine.py`).

Axis letters as in `model.py` (B batch, T query length, S cache positions, V vocabulary, ...).
Lowercase k is `num_draft_tokens`, a static count (not the legend's K, the KV heads).

Randomness: each random draw is keyed by (seed, request id, absolute position of the token it
decides, stream tag) -- `sampling.token_rngs` folded with DRAFT / ACCEPT / RESIDUAL -- so runs
reproduce. A step at cache length n uses, for its output, only keys at positions n+1..n+a+1
(a = accepted count) and the next step starts at n + a + 1, so no key decides two outputs.
"""

import dataclasses
import functools
from collections.abc import Callable, Mapping
from typing import Any

import chex
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.config import ModelConfig
from realm_jax.errors import RealmError
from realm_jax.kv_cache import KVCache
from realm_jax.loading import Model
from realm_jax.lora import LoraStack
from realm_jax.model import Params, forward, lm_head
from realm_jax.sampling import SamplingParams, draw, sampling_probs, token_rngs

# Stream tags folded into `token_rngs` keys: one independent stream per kind of draw.
DRAFT, ACCEPT, RESIDUAL = 1, 2, 3
NO_TOKEN = -1  # fills the unused tail of a step's emitted tokens
SHARED_LEAVES = ("embed", "final_norm", "output")  # what a layer-skip draft shares whole


# --- drafts -------------------------------------------------------------------------------


def _first_layers(layers, num_layers: int):
    """The first `num_layers` of a tuple of layers (shared) or of stacked [L, ...] leaves:
    of `Params.layers`, or of a LoRA adapter's or stack's `layers` (the same layout)."""
    if isinstance(layers, tuple):
        return layers[:num_layers]
    return jax.tree.map(lambda x: x[:num_layers], layers)


def layer_skip_draft(model: Model, num_layers: int) -> Model:
    """A self-speculative draft: the target's first `num_layers` blocks, then its final norm
    and output projection (Elhoushi et al. 2024, "LayerSkip", without early-exit training).

    With the default tuple-of-layers params the draft shares every array with `model` (no
    copy); stacked [L, ...] params are sliced, which copies the first `num_layers` layers.

    Args:
      model: the target.
      num_layers: blocks kept, 1..model.config.n_layers.

    Returns:
      an `rj.Model` whose config has n_layers = num_layers (tokenizer shared).

    Raises:
      RealmError: `model` is not an `rj.Model` or `num_layers` is out of range.
    """
    if not isinstance(model, Model):
        raise RealmError(f"layer_skip_draft needs an rj.Model, got {type(model).__name__}")
    total = model.config.n_layers
    if isinstance(num_layers, bool) or not isinstance(num_layers, (int, np.integer)):
        raise RealmError(f"layer_skip_draft: num_layers must be an integer, got {num_layers!r}")
    if not 1 <= num_layers <= total:
        raise RealmError(
            f"layer_skip_draft: num_layers={num_layers} is outside 1..{total} (the layers of "
            f"{model.path or 'the model'})"
        )
    num_layers = int(num_layers)
    params = dataclasses.replace(
        model.params, layers=_first_layers(model.params.layers, num_layers)
    )
    config = dataclasses.replace(model.config, n_layers=num_layers)
    return Model(config, params, model.tokenizer, model.path, model.tensor_types)


def check_draft(model: Model, draft: Model) -> None:
    """Raise `RealmError` unless `draft` is an `rj.Model` with the target's vocabulary."""
    if not isinstance(draft, Model):
        raise RealmError(f"draft must be an rj.Model, got {type(draft).__name__}")
    if draft.config.vocab_size != model.config.vocab_size:
        raise RealmError(
            f"draft {draft.path or '(in memory)'} has a vocabulary of "
            f"{draft.config.vocab_size} tokens but the target {model.path or '(in memory)'} "
            f"has {model.config.vocab_size}: speculative decoding needs the same vocabulary"
        )


def layer_skip_depth(model: Model, draft: Model) -> int | None:
    """n when `draft` is `layer_skip_draft(model, n)` (same embedding, norm and output arrays,
    and for tuple layers the same first n layer objects), else None."""
    n = draft.config.n_layers
    if draft.config != dataclasses.replace(model.config, n_layers=n):
        return None
    if any(getattr(draft.params, f) is not getattr(model.params, f) for f in SHARED_LEAVES):
        return None
    layers, own = draft.params.layers, model.params.layers
    if isinstance(layers, tuple) != isinstance(own, tuple):
        return None
    if isinstance(layers, tuple) and not all(a is b for a, b in zip(layers, own, strict=False)):
        return None
    return n


def draft_lora(model: Model, draft: Model, lora: LoraStack | None) -> LoraStack | None:
    """The LoRA stack `draft` runs for rows that run `lora` on `model`: a layer-skip draft of
    `model` runs the stack's first n layers (so that it drafts like the adapted target, with
    the same adapter ids); any other draft, or no stack, runs none (None). The output is the
    adapted target's either way: the draft only changes the speed."""
    depth = layer_skip_depth(model, draft)
    if lora is None or not depth:
        return None
    return dataclasses.replace(lora, layers=_first_layers(lora.layers, depth))


# --- the step -----------------------------------------------------------------------------


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpeculativeState:
    """What a row carries from one speculative step to the next.

    With n = target_cache.lengths[b], row b has emitted the token at position n (`tokens[b]`)
    and both caches hold exactly positions 0..n-1 (the same invariant as `decode_step`'s).

    Attributes:
      tokens: [B] int32, each row's newest token (position n, in neither cache).
      target_cache: the target's KV cache; lengths [B] = n.
      draft_cache: the draft's KV cache; lengths [B] = n.
    """

    tokens: jax.Array
    target_cache: KVCache
    draft_cache: KVCache


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


def speculative_step_unjitted(
    target_params: Params,
    draft_params: Params,
    state: SpeculativeState,
    active: jax.Array,
    sampling: SamplingParams,
    seeds: jax.Array,
    request_ids: jax.Array,
    target_kwargs: Mapping[str, Any],
    draft_kwargs: Mapping[str, Any],
    *,
    target_config: ModelConfig,
    draft_config: ModelConfig,
    num_draft_tokens: int,
    attn_len: int,
    implementation: str,
) -> tuple[SpeculativeState, jax.Array, jax.Array]:
    """`speculative_step` before `jax.jit` (the on-device loop runs it inside its own jit)."""
    k = num_draft_tokens
    lengths = state.target_cache.lengths  # [B] n
    b = lengths.shape[0]
    chex.assert_shape([state.tokens, active, seeds, request_ids, sampling.temperature], (b,))
    last = state.tokens  # [B]
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
            attn_len=attn_len,
            implementation=implementation,
            **draft_kwargs,
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
        draft_one, (state.draft_cache, last), jnp.arange(k, dtype=jnp.int32)
    )  # [k, B], [k, B, V]
    draft_tokens = draft_tokens.T  # [B, k]
    draft_probs = jnp.swapaxes(draft_probs, 0, 1)  # [B, k, V]

    # 2. Verify: the target scores positions n..n+k in one forward.
    positions = lengths[:, None] + jnp.arange(k + 1, dtype=jnp.int32)[None]  # [B, k+1]
    hidden, target_cache = forward(
        target_params,
        jnp.concatenate([last[:, None], draft_tokens], axis=1),
        positions,
        state.target_cache,
        lengths + k + 1,
        config=target_config,
        attn_len=attn_len,
        implementation=implementation,
        **target_kwargs,
    )  # [B, k+1, D]
    target_logits = lm_head(target_params, hidden)  # [B, k+1, V]
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
    tokens = jnp.where(active, correction, last)  # [B]
    new_lengths = jnp.where(active, lengths + num_accepted + 1, lengths)
    new_state = SpeculativeState(
        tokens=tokens,
        target_cache=dataclasses.replace(target_cache, lengths=new_lengths),
        draft_cache=dataclasses.replace(draft_cache, lengths=new_lengths),
    )
    return new_state, emitted, num_accepted


STEP_STATICS = ("target_config", "draft_config", "num_draft_tokens", "attn_len", "implementation")


@functools.partial(jax.jit, static_argnames=STEP_STATICS, donate_argnames=("state",))
def speculative_step(
    target_params: Params,
    draft_params: Params,
    state: SpeculativeState,
    active: jax.Array,
    sampling: SamplingParams,
    seeds: jax.Array,
    request_ids: jax.Array,
    target_kwargs: Mapping[str, Any] | None = None,
    draft_kwargs: Mapping[str, Any] | None = None,
    *,
    target_config: ModelConfig,
    draft_config: ModelConfig,
    num_draft_tokens: int,
    attn_len: int,
    implementation: str = "auto",
) -> tuple[SpeculativeState, jax.Array, jax.Array]:
    """One speculative step for B rows: draft k tokens, verify, accept / resample, roll back.

    Each row uses its own length n, positions n..n+k, sampling parameters and keys, and
    accepts its own number of tokens; caches are donated and rolled back by their lengths.

    Args:
      target_params, draft_params: the two models' weights (same vocabulary V).
      state: the rows' `SpeculativeState` (donated).
      active: [B] bool; inactive rows keep their state and emit nothing.
      sampling: per-row sampling parameters, fields [B] (temperature 0 = greedy).
      seeds, request_ids: [B] int32, keying every draw with the token position and a tag.
      target_kwargs, draft_kwargs: extra keyword arguments for each model's `forward`, as
        pytrees of arrays (the hook for per-row LoRA: `lora=`, `adapter_ids=`).
      target_config, draft_config: static model configs.
      num_draft_tokens: static k >= 1.
      attn_len: static cache positions attention reads; >= max(n) + k + 1 over active rows.
      implementation: attention implementation (see `rj.attention`).

    Returns:
      (new state, emitted [B, k+1] int32, num_accepted [B] int32): row b emitted
      emitted[b, :num_accepted[b] + 1] (accepted draft tokens, then the correction or bonus
      token), NO_TOKEN beyond; inactive rows emit nothing and report 0.
    """
    return speculative_step_unjitted(
        target_params,
        draft_params,
        state,
        active,
        sampling,
        seeds,
        request_ids,
        dict(target_kwargs or {}),
        dict(draft_kwargs or {}),
        target_config=target_config,
        draft_config=draft_config,
        num_draft_tokens=num_draft_tokens,
        attn_len=attn_len,
        implementation=implementation,
    )


# --- float64 reference ----------------------------------------------------------------------


def residual_probs_reference(target_probs: np.ndarray, draft_probs: np.ndarray) -> np.ndarray:
    """Float64 twin of `residual_probs` for one position ([V], [V] -> [V])."""
    excess = np.maximum(np.asarray(target_probs, np.float64) - draft_probs, 0.0)
    total = excess.sum()
    return excess / total if total > 0 else np.asarray(target_probs, np.float64)


def speculative_block_reference(
    target_probs_fn: Callable[[tuple[int, ...]], np.ndarray],
    draft_probs_fn: Callable[[tuple[int, ...]], np.ndarray],
    context: tuple[int, ...],
    num_draft_tokens: int,
    residual: Callable[[np.ndarray, np.ndarray], np.ndarray] = residual_probs_reference,
) -> dict[tuple[int, ...], float]:
    """Enumerate every draft / accept / reject path of one step exactly, in float64.

    Args:
      target_probs_fn, draft_probs_fn: context (a tuple of token ids) -> [V] float64, the
        distribution each model samples the next token from (p and q).
      context: the tokens so far.
      num_draft_tokens: k.
      residual: (p, q) -> [V], the distribution a rejection resamples from (a parameter so
        that tests can plant a wrong one).

    Returns:
      {emitted block (1..k+1 tokens): probability}; the values sum to 1.
    """
    blocks: dict[tuple[int, ...], float] = {}

    def add(block, weight):
        blocks[block] = blocks.get(block, 0.0) + weight

    def visit(prefix: tuple[int, ...], weight: float) -> None:
        """`weight`: probability that the draft proposed `prefix` and all of it was accepted."""
        target = target_probs_fn(context + prefix)
        if len(prefix) == num_draft_tokens:
            for token in np.flatnonzero(target):  # bonus token from p
                add((*prefix, int(token)), weight * target[token])
            return
        draft = draft_probs_fn(context + prefix)
        for token in np.flatnonzero(draft):  # the draft proposes token with probability q
            proposed = weight * draft[token]
            keep = min(1.0, target[token] / draft[token])
            if keep > 0:
                visit((*prefix, int(token)), proposed * keep)
            if keep < 1:
                fix = residual(target, draft)
                for other in np.flatnonzero(fix):
                    add((*prefix, int(other)), proposed * (1.0 - keep) * fix[other])

    visit((), 1.0)
    return blocks
