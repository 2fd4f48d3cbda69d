"""Generation with speculative steps: the host loop, the on-device loop, streaming, stats.

`speculative_rows` prefills B requests into a target and a draft cache (`batching.
prefill_step`) and then runs `speculative.speculative_step` until each row reaches its budget
or EOS, either from a Python loop (the default, tokens stream out after every step) or inside
one `lax.while_loop` (loop="device", tokens come out at the end; the same tokens).
`speculative_stream` is its one-request view with `rj.generate`'s arguments, adapters
included (`with_adapter`). `SpeculativeStats` counts what a request drafted and accepted.
The step itself, the drafts and the float64 twins live in `speculative.py`.
"""

import dataclasses
import functools
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

# `generation` as a module (its names are looked up at call time): `rj.generate` dispatches
# here when given a draft, so either module may be imported first.
from realm_jax import generation, speculative
from realm_jax.batching import bucket, decode_window, prefill_step
from realm_jax.errors import RealmError, RequestError
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.lora import LoraAdapter
from realm_jax.sampling import Sampling, SamplingParams
from realm_jax.speculative import (
    NO_TOKEN,
    STEP_STATICS,
    SpeculativeState,
    check_draft,
    layer_skip_draft,
    speculative_step_unjitted,
)

GREEDY = Sampling()  # temperature 0, as `generation.GREEDY`
LOOPS = ("host", "device")
# The host loop is the default. Measured on SmolLM2 (2-core CPU, experiments/
# speculative_sweep.py, two runs of two alternated repeats): 128.0 vs 134.6 and 124.7 vs
# 121.8 ms/token host vs device, i.e. equal within the VM's noise, because the host's per-step
# cost (dispatch, copying k + 1 tokens back, ~1-2 ms, measured on a tiny model where it
# doubles the time per token) is ~1% of a 100+ ms step. At equal speed the host loop wins on
# what it does: it streams tokens as they come, and attends over the smallest window bucket
# holding the rows (the device loop's window is static: the whole cache). Where steps take
# ~1 ms (a GPU, tiny models) `loop="device"` is the one to try; both give the same tokens.
DEFAULT_LOOP = "host"


# --- statistics ---------------------------------------------------------------------------


@dataclasses.dataclass
class SpeculativeStats:
    """Acceptance counts of one request (filled in when passed as `stats=`).

    Attributes:
      num_draft_tokens: k.
      histogram: [k+1] list; histogram[a] = target calls (steps) that accepted exactly a
        draft tokens. Every other count follows from it.
      emitted: tokens yielded, the prefill's first token included (after EOS / max-token
        truncation, so it can be less than 1 + `generated`).
    """

    num_draft_tokens: int = 0
    histogram: list[int] = dataclasses.field(default_factory=list)
    emitted: int = 0

    def reset(self, num_draft_tokens: int) -> None:
        """Zero the counts for a run with k = num_draft_tokens."""
        self.num_draft_tokens = num_draft_tokens
        self.histogram = [0] * (num_draft_tokens + 1)
        self.emitted = 0

    @property
    def target_calls(self) -> int:
        """Verification forwards of the target (one per step)."""
        return sum(self.histogram)

    @property
    def drafted(self) -> int:
        """Draft tokens proposed (k per step)."""
        return self.num_draft_tokens * self.target_calls

    @property
    def accepted(self) -> int:
        """Draft tokens accepted."""
        return sum(a * n for a, n in enumerate(self.histogram))

    @property
    def generated(self) -> int:
        """Tokens the steps produced (accepted + one per step), before truncation."""
        return self.accepted + self.target_calls

    @property
    def tokens_per_call(self) -> float:
        """Tokens produced per target call: (1 - alpha^(k+1)) / (1 - alpha) for i.i.d.
        acceptance alpha (Leviathan et al. 2023, eq. 1)."""
        return self.generated / max(self.target_calls, 1)

    @property
    def reached(self) -> list[int]:
        """[k] how often draft position i (0-based) was tested: all before it accepted."""
        return [sum(self.histogram[i:]) for i in range(self.num_draft_tokens)]

    @property
    def accepted_at(self) -> list[int]:
        """[k] how often draft position i was accepted."""
        return [sum(self.histogram[i + 1 :]) for i in range(self.num_draft_tokens)]

    @property
    def position_acceptance(self) -> list[float]:
        """[k] acceptance rate at each draft position, given it was tested (NaN if never)."""
        return [
            a / r if r else math.nan for a, r in zip(self.accepted_at, self.reached, strict=True)
        ]

    @property
    def acceptance_rate(self) -> float:
        """alpha: accepted / tested draft tokens, the estimate of a per-token acceptance
        probability that a step stops testing at its first rejection."""
        tested = sum(self.reached)
        return self.accepted / tested if tested else math.nan

    def add_step(self, num_accepted: int) -> None:
        """Count one step that accepted `num_accepted` draft tokens."""
        self.histogram[num_accepted] += 1


# --- generation ---------------------------------------------------------------------------


class _Rows(NamedTuple):
    """Validated host-side inputs of B rows."""

    prompts: list[np.ndarray]
    budgets: np.ndarray  # [B] max new tokens
    sampling: SamplingParams
    seeds: jax.Array  # [B] int32
    request_ids: jax.Array  # [B] int32
    eos: int  # NO_TOKEN when not stopping at EOS


def _validate_rows(
    model,
    draft,
    prompts,
    max_new_tokens,
    samplings,
    seeds,
    request_ids,
    stop_at_eos,
    num_draft_tokens,
) -> _Rows:
    """Check B requests as `generation.stream` checks one (and the draft, and k)."""
    check_draft(model, draft)
    k = num_draft_tokens
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise RequestError(f"num_draft_tokens must be an integer >= 1, got {num_draft_tokens!r}")
    rows = len(prompts)
    if not rows or not all(len(x) == rows for x in (max_new_tokens, samplings, seeds, request_ids)):
        raise RequestError(
            "speculative_rows: prompts, budgets, samplings, seeds and request "
            "ids must be non-empty lists of the same length"
        )
    arrays = [
        generation.validate_ids(model, p, n) for p, n in zip(prompts, max_new_tokens, strict=True)
    ]
    for sampling, seed in zip(samplings, seeds, strict=False):
        generation.validate_sampling(sampling, seed)
    eos = model.tokenizer.eos_id if (stop_at_eos and model.tokenizer is not None) else None
    return _Rows(
        prompts=arrays,
        budgets=np.asarray(max_new_tokens, np.int64),
        sampling=SamplingParams.from_rows(samplings),
        seeds=jnp.asarray(seeds, jnp.int32),
        request_ids=jnp.asarray(request_ids, jnp.int32),
        eos=NO_TOKEN if eos is None else int(eos),
    )


def _prefill(model, draft, rows: _Rows, capacity, implementation, target_kwargs, draft_kwargs):
    """Prefill both caches with every prompt; sample each row's first token from the target
    with the key `generation.stream` uses. Returns (state, first tokens [B] numpy)."""
    sizes = np.array([p.size for p in rows.prompts])
    tokens = np.zeros((len(sizes), bucket(int(sizes.max()), capacity)), np.int32)
    for b, prompt in enumerate(rows.prompts):
        tokens[b, : prompt.size] = prompt
    tokens, num_tokens = jnp.asarray(tokens), jnp.asarray(sizes, jnp.int32)
    caches, firsts = [], []
    for m, kwargs in ((model, target_kwargs), (draft, draft_kwargs)):
        cache = init_cache(
            m.config, len(sizes), capacity, m.dtype, stacked=not isinstance(m.params.layers, tuple)
        )
        first, _, cache = prefill_step(
            m.params,
            tokens,
            num_tokens,
            cache,
            rows.sampling,
            rows.seeds,
            rows.request_ids,
            config=m.config,
            attn_len=tokens.shape[1],
            implementation=implementation,
            **kwargs,
        )
        caches.append(cache)
        firsts.append(first)
    state = SpeculativeState(
        tokens=firsts[0],
        target_cache=caches[0],
        draft_cache=caches[1],
    )
    return state, np.asarray(firsts[0])


def speculative_rows(
    model: Model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: Sequence[int],
    samplings: Sequence[Sampling],
    seeds: Sequence[int],
    stop_at_eos: bool = True,
    *,
    draft: Model,
    num_draft_tokens: int = 4,
    request_ids: Sequence[int] | None = None,
    implementation: str = "auto",
    stats: Sequence[SpeculativeStats] | None = None,
    loop: str = DEFAULT_LOOP,
    target_kwargs: Mapping[str, Any] | None = None,
    draft_kwargs: Mapping[str, Any] | None = None,
) -> Iterator[tuple[int, int]]:
    """Generate for B requests at once with speculative steps; yield (row, token) events.

    Each row stops at its own budget or at EOS (included), never emitting more than its
    `max_new_tokens`. Caches hold prompt + max_new_tokens + k positions (rounded up to a
    bucket), so a step never writes past them.

    Args:
      model: the target; draft: an `rj.Model` with the same vocabulary.
      prompts, max_new_tokens, samplings, seeds: one per row (see `rj.generate`).
      stop_at_eos: stop a row after the tokenizer's EOS token.
      num_draft_tokens: k, tokens the draft proposes per step.
      request_ids: per row, keying the randomness with the seed (default 0 for every row).
      implementation: attention implementation (see `rj.attention`).
      stats: one `SpeculativeStats` per row to fill in, or None.
      loop: "host" (a Python loop around the jitted step; tokens stream out per step) or
        "device" (one `lax.while_loop`; tokens come out at the end). Same tokens either way.
      target_kwargs, draft_kwargs: passed to each model's forward (prefill and steps); the
        LoRA hook.

    Raises:
      RequestError: invalid prompt, budget, sampling, seed or num_draft_tokens.
      RealmError: `draft` is not a model with the target's vocabulary; unknown `loop`.
    """
    if loop not in LOOPS:
        raise RealmError(f"loop must be one of {LOOPS}, got {loop!r}")
    request_ids = [0] * len(prompts) if request_ids is None else list(request_ids)
    rows = _validate_rows(
        model,
        draft,
        list(prompts),
        list(max_new_tokens),
        list(samplings),
        list(seeds),
        request_ids,
        stop_at_eos,
        num_draft_tokens,
    )
    k = int(num_draft_tokens)
    for s in stats or ():
        s.reset(k)
    if not rows.budgets.max():
        return
    sizes = np.array([p.size for p in rows.prompts])
    limit = model.config.context_length + k
    capacity = bucket(int((sizes + rows.budgets).max()) + k, limit)
    target_kwargs, draft_kwargs = dict(target_kwargs or {}), dict(draft_kwargs or {})
    state, first = _prefill(
        model, draft, rows, capacity, implementation, target_kwargs, draft_kwargs
    )
    produced = np.zeros(len(sizes), np.int64)
    done = rows.budgets == 0
    for b in np.flatnonzero(~done):
        yield int(b), int(first[b])
        produced[b] = 1
        done[b] = produced[b] >= rows.budgets[b] or int(first[b]) == rows.eos
        if stats:
            stats[b].emitted += 1
    statics = dict(
        target_config=model.config,
        draft_config=draft.config,
        num_draft_tokens=k,
        implementation=implementation,
    )
    args = (rows.sampling, rows.seeds, rows.request_ids, target_kwargs, draft_kwargs)
    if loop == "device":
        yield from _device_events(
            model, draft, state, rows, produced, done, capacity, args, statics, stats
        )
        return
    lengths = sizes.copy()  # host mirror of the caches' lengths
    while not done.all():
        active = ~done
        window = decode_window(int(lengths[active].max()) + k + 1, capacity)
        # looked up on the module at each call, so tests can wrap the step
        state, emitted, num_accepted = speculative.speculative_step(
            model.params,
            draft.params,
            state,
            jnp.asarray(active),
            *args,
            attn_len=window,
            **statics,
        )
        emitted, num_accepted = np.asarray(emitted), np.asarray(num_accepted)
        for b in np.flatnonzero(active):
            lengths[b] += num_accepted[b] + 1
            if stats:
                stats[b].add_step(int(num_accepted[b]))
            for token in emitted[b, : num_accepted[b] + 1]:
                yield int(b), int(token)
                produced[b] += 1
                if stats:
                    stats[b].emitted += 1
                if produced[b] >= rows.budgets[b] or token == rows.eos:
                    done[b] = True
                    break


def with_adapter(
    model: Model,
    draft: Model,
    adapter: LoraAdapter | None,
    lora_strategy: str | None = None,
) -> tuple[Model, Model, dict[str, Any], dict[str, Any]]:
    """The target, draft and forward keyword arguments that run one request with `adapter`.

    The target runs it as `generation.with_adapter` does (merged weights, or a stack of one
    adapter passed to every forward). A layer-skip draft of `model` runs it too, on its first
    n layers (the draft of merged weights, or the stack's first n layers), so that it keeps
    drafting like the adapted target; any other draft runs without it (the output is still
    the adapted target's: the draft only changes the speed).

    Args:
      lora_strategy: "merged" or "unmerged"; None for `generation.DEFAULT_LORA_STRATEGY`.

    Returns:
      (target, draft, target_kwargs, draft_kwargs) for `speculative_rows`.

    Raises:
      RequestError, AdapterError: a bad strategy or an adapter that does not fit the model.
    """
    strategy = generation.DEFAULT_LORA_STRATEGY if lora_strategy is None else lora_strategy
    params, lora, adapter_ids = generation.with_adapter(model, adapter, strategy)
    if adapter is None:
        return model, draft, {}, {}
    target = dataclasses.replace(model, params=params)
    if lora is None:  # merged: a layer-skip draft of the merged weights
        depth = speculative.layer_skip_depth(model, draft)
        return target, layer_skip_draft(target, depth) if depth else draft, {}, {}
    target_kwargs = dict(lora=lora, adapter_ids=adapter_ids)
    draft_lora = speculative.draft_lora(model, draft, lora)
    if draft_lora is None:
        return target, draft, target_kwargs, {}
    return target, draft, target_kwargs, dict(lora=draft_lora, adapter_ids=adapter_ids)


def speculative_stream(
    model: Model,
    ids: Sequence[int],
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_at_eos: bool = True,
    *,
    draft: Model,
    num_draft_tokens: int = 4,
    adapter: LoraAdapter | None = None,
    lora_strategy: str | None = None,
    request_id: int = 0,
    implementation: str = "auto",
    stats: SpeculativeStats | None = None,
    loop: str = DEFAULT_LOOP,
) -> Iterator[int]:
    """Yield new token ids like `generation.stream`, produced by speculative decoding.

    Greedy output is plain greedy's; sampled output has the distribution of plain sampling
    (not the same tokens: the draws are keyed differently). `adapter` / `lora_strategy` as in
    `rj.generate`; a layer-skip draft runs the adapter too (`with_adapter`). See
    `speculative_rows` for the other arguments; `stats`, when given, is reset and filled in.

    Raises:
      RequestError, AdapterError, RealmError: as `speculative_rows` and `with_adapter`.
    """
    check_draft(model, draft)
    model, draft, target_kwargs, draft_kwargs = with_adapter(model, draft, adapter, lora_strategy)
    events = speculative_rows(
        model,
        [ids],
        [max_new_tokens],
        [sampling],
        [seed],
        stop_at_eos,
        draft=draft,
        num_draft_tokens=num_draft_tokens,
        request_ids=[request_id],
        implementation=implementation,
        stats=None if stats is None else [stats],
        loop=loop,
        target_kwargs=target_kwargs,
        draft_kwargs=draft_kwargs,
    )
    for _, token in events:
        yield token


# --- the on-device loop -------------------------------------------------------------------


class _LoopCarry(NamedTuple):
    """State of `_device_loop`: the step state, tokens [B, M] so far, produced [B], done
    [B], histogram [B, k+1] of accepted counts."""

    state: SpeculativeState
    out: jax.Array
    produced: jax.Array
    done: jax.Array
    histogram: jax.Array


@functools.partial(jax.jit, static_argnames=(*STEP_STATICS, "out_len"))
def _device_loop(
    target_params,
    draft_params,
    state,
    produced,
    done,
    budgets,
    eos,
    sampling,
    seeds,
    request_ids,
    target_kwargs,
    draft_kwargs,
    *,
    target_config,
    draft_config,
    num_draft_tokens,
    attn_len,
    implementation,
    out_len,
):
    """Run speculative steps in a `lax.while_loop` until every row is done.

    Args:
      state: after prefill (not donated: no output aliases it).
      produced: [B] int32 tokens already emitted; done: [B] bool.
      budgets: [B] int32 max new tokens; eos: int32 scalar (NO_TOKEN for none).
      out_len: static width of the token buffer (max budget + k + 1).

    Returns:
      (tokens [B, out_len] emitted by the steps, count [B], histogram [B, k+1]).
    """
    k = num_draft_tokens
    b = budgets.shape[0]
    index = jnp.arange(k + 1, dtype=jnp.int32)[None]  # [1, k+1]
    rows = jnp.arange(b, dtype=jnp.int32)[:, None]  # [B, 1]
    start = produced

    def body(carry: _LoopCarry) -> _LoopCarry:
        active = ~carry.done
        new_state, emitted, num_accepted = speculative_step_unjitted(
            target_params,
            draft_params,
            carry.state,
            active,
            sampling,
            seeds,
            request_ids,
            target_kwargs,
            draft_kwargs,
            target_config=target_config,
            draft_config=draft_config,
            num_draft_tokens=k,
            attn_len=attn_len,
            implementation=implementation,
        )
        count = num_accepted + 1  # [B]
        is_eos = (index < count[:, None]) & (emitted == eos)  # [B, k+1]
        first_eos = jnp.where(jnp.any(is_eos, axis=1), jnp.argmax(is_eos, axis=1), k + 1)
        keep = jnp.minimum(jnp.minimum(count, first_eos + 1), budgets - carry.produced)
        keep = jnp.where(active, keep, 0)  # [B]
        columns = carry.produced[:, None] - start[:, None] + index  # [B, k+1]
        columns = jnp.where(index < keep[:, None], columns, out_len)  # out_len: dropped
        out = carry.out.at[rows, columns].set(emitted, mode="drop")
        produced = carry.produced + keep
        done = carry.done | (produced >= budgets) | (active & (first_eos < keep))
        histogram = carry.histogram.at[rows[:, 0], num_accepted].add(active.astype(jnp.int32))
        return _LoopCarry(new_state, out, produced, done, histogram)

    init = _LoopCarry(
        state,
        jnp.full((b, out_len), NO_TOKEN, jnp.int32),
        produced,
        done,
        jnp.zeros((b, k + 1), jnp.int32),
    )
    final = jax.lax.while_loop(lambda c: jnp.any(~c.done), body, init)
    return final.out, final.produced - start, final.histogram


def _device_events(model, draft, state, rows, produced, done, capacity, args, statics, stats):
    """Run `_device_loop` and yield its tokens as (row, token) events, row by row."""
    k = statics["num_draft_tokens"]
    out, counts, histogram = _device_loop(
        model.params,
        draft.params,
        state,
        jnp.asarray(produced, jnp.int32),
        jnp.asarray(done),
        jnp.asarray(rows.budgets, jnp.int32),
        jnp.asarray(rows.eos, jnp.int32),
        *args,
        attn_len=decode_window(capacity, capacity),
        out_len=int(rows.budgets.max()) + k + 1,
        **statics,
    )
    out, counts, histogram = np.asarray(out), np.asarray(counts), np.asarray(histogram)
    for b in range(out.shape[0]):
        if stats:
            stats[b].histogram = histogram[b].tolist()
            stats[b].emitted += int(counts[b])
        for token in out[b, : counts[b]]:
            yield b, int(token)
