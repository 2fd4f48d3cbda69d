"""`logits`, `generate` and `stream`: one request through the shared jitted steps.

There is one decode loop in the project: `stream` runs `batching.prefill_into_slot` once and then
`batching.decode_loop`, up to `steps_per_call` decode steps per device call, on one row;
`generate` collects what `stream` yields.

`adapter=` runs a `LoraAdapter` by one of two strategies (`lora_strategy`): "merged" merges it
into a new params pytree for the call (the base params are untouched), "unmerged" passes it
to the steps as a stack of one adapter. Both are exact against the float64 reference.
"""

from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.batching import (
    bucket,
    decode_loop,
    decode_window,
    prefill_into_slot,
    prompt_logits,
)
from realm_jax.errors import RequestError
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.lora import LoraAdapter, LoraStack, check_adapter, merge_adapter, stack_adapters
from realm_jax.model import Params
from realm_jax.sampling import Sampling, SamplingParams

GREEDY = Sampling()
# Decode steps per device call in `stream` (experiments/probe_dispatch.py, docs/results.md).
# On an H100 SmolLM2's step took 0.83 ms inside one program against 2.1-2.3 ms called once
# per token: the host's launches and a wait per token. On the 2-core CPU, 8 per call ran
# 1.17-1.23x faster than 1 per call. Streamed text arrives in bursts of up to this many.
STEPS_PER_CALL = 8


LORA_STRATEGIES = ("merged", "unmerged")
# The default strategy for one request, from experiments/lora_strategies.py (SmolLM2-135M,
# float32, shared 2-core CPU, adapters on all 7 projections; docs/lora.md): merged decodes at
# the base model's speed (38.0 vs 37.1 ms per token at best, rank 16) where unmerged costs
# 3-10 ms more (40.3 ms at rank 16, 47.3 ms at rank 64), and merged reuses the base model's
# compiled steps (first request 24 s vs 34 s) at the price of a 0.3-0.7 s merge per call. For
# many calls with one adapter, merge once (`rj.merge_adapter`) or pass "unmerged".
DEFAULT_LORA_STRATEGY = "merged"


def validate_ids(model: Model, ids: Sequence[int], max_new_tokens: int = 0) -> np.ndarray:
    """Check a prompt and its generation budget against the model; return ids as int32.

    Raises:
      RequestError: empty prompt, ids outside the vocabulary, a negative or non-integer
        `max_new_tokens`, or prompt + new tokens beyond the model's context length.
    """
    array = np.asarray(ids)
    if array.ndim != 1 or array.size == 0:
        raise RequestError(f"prompt must be a non-empty list of token ids, got {array.shape=}")
    if not np.issubdtype(array.dtype, np.integer):
        raise RequestError(f"prompt token ids must be integers, got dtype {array.dtype}")
    vocab = model.config.vocab_size
    bad = (array < 0) | (array >= vocab)
    if bad.any():
        index = int(np.argmax(bad))
        raise RequestError(f"prompt token {index} is {int(array[index])}, outside 0..{vocab - 1}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 0:
        raise RequestError(f"max_new_tokens must be an integer >= 0, got {max_new_tokens!r}")
    total = array.size + int(max_new_tokens)
    if total > model.config.context_length:
        raise RequestError(
            f"prompt ({array.size} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds the context length {model.config.context_length}"
        )
    return array.astype(np.int32)


def with_adapter(
    model: Model, adapter: LoraAdapter | None, lora_strategy: str = DEFAULT_LORA_STRATEGY
) -> tuple[Params, LoraStack | None, jax.Array | None]:
    """The (params, lora, adapter_ids) that run one request with `adapter`.

    Returns:
      The model's own params and (None, None) without an adapter; merged params and
      (None, None) for "merged"; the base params, a stack of one adapter and ids [1] = 0 for
      "unmerged".

    Raises:
      RequestError: an unknown strategy.
      AdapterError: an adapter that does not fit the model.
    """
    if lora_strategy not in LORA_STRATEGIES:
        raise RequestError(f"lora_strategy {lora_strategy!r} is not one of {LORA_STRATEGIES}")
    if adapter is None:
        return model.params, None, None
    check_adapter(adapter, model.params, model.config)
    if lora_strategy == "merged":
        return merge_adapter(model.params, adapter), None, None
    return model.params, stack_adapters([adapter]), jnp.zeros((1,), jnp.int32)


def validate_sampling(sampling: Sampling, seed: int) -> None:
    """Check a request's sampling object and seed (`Sampling` validates its own values).

    Raises:
      RequestError: `sampling` is not an `rj.Sampling`, or `seed` is not in 0..2**31-1.
    """
    if not isinstance(sampling, Sampling):
        raise RequestError(f"sampling must be an rj.Sampling, got {type(sampling).__name__}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
        raise RequestError(f"seed must be an integer in 0..2**31-1, got {seed!r}")


def logits(
    model: Model,
    ids: Sequence[int],
    *,
    adapter: LoraAdapter | None = None,
    lora_strategy: str = DEFAULT_LORA_STRATEGY,
    implementation: str = "auto",
) -> np.ndarray:
    """Logits at every position of one prompt.

    Args:
      model: a loaded model.
      ids: T token ids.
      adapter: an `rj.LoraAdapter` for this model (`rj.load_adapter`), or None.
      lora_strategy: "merged" or "unmerged" (see `with_adapter`).
      implementation: attention implementation (see `rj.attention`).

    Returns:
      [T, V] float32 NumPy array; row t scores the token after ids[t].

    Raises:
      RequestError, AdapterError: a bad prompt, strategy or adapter.
    """
    array = validate_ids(model, ids)
    params, lora, adapter_ids = with_adapter(model, adapter, lora_strategy)
    t = array.size
    padded = bucket(t, model.config.context_length)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :t] = array
    out = prompt_logits(
        params,
        jnp.asarray(tokens),
        jnp.asarray([t], jnp.int32),
        lora,
        adapter_ids,
        config=model.config,
        implementation=implementation,
    )
    return np.asarray(out[0, :t])


def stream(
    model: Model,
    ids: Sequence[int],
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_at_eos: bool = True,
    *,
    adapter: LoraAdapter | None = None,
    lora_strategy: str = DEFAULT_LORA_STRATEGY,
    request_id: int = 0,
    implementation: str = "auto",
    draft: Model | None = None,
    num_draft_tokens: int = 4,
    stats=None,
    steps_per_call: int = STEPS_PER_CALL,
) -> Iterator[int]:
    """Yield new token ids as they are produced (see `generate`).

    Plain decoding runs up to `steps_per_call` decode steps per device call
    (`batching.decode_loop`), so tokens arrive in groups of up to that many; the tokens do
    not depend on it (the sampler is keyed by position).

    With a `draft`, the tokens come from `speculative_generation.speculative_stream` (greedy
    output is identical to plain greedy decoding in float32, and in bfloat16 up to ties within
    one rounding step; sampled output has the same distribution);
    `stats`, a `speculative_generation.SpeculativeStats`, is then filled in.
    """
    if draft is not None:
        from realm_jax.speculative_generation import speculative_stream  # imports this module

        yield from speculative_stream(
            model,
            ids,
            max_new_tokens,
            sampling,
            seed,
            stop_at_eos,
            draft=draft,
            num_draft_tokens=num_draft_tokens,
            adapter=adapter,
            lora_strategy=lora_strategy,
            request_id=request_id,
            implementation=implementation,
            stats=stats,
        )
        return
    prompt = validate_ids(model, ids, max_new_tokens)
    validate_sampling(sampling, seed)
    if isinstance(steps_per_call, bool) or not isinstance(steps_per_call, (int, np.integer)):
        raise RequestError(f"steps_per_call must be an integer, got {steps_per_call!r}")
    if steps_per_call < 1:
        raise RequestError(f"steps_per_call must be at least 1, got {steps_per_call}")
    params, lora, adapter_ids = with_adapter(model, adapter, lora_strategy)
    if max_new_tokens == 0:
        return
    config = model.config
    capacity = bucket(prompt.size + max_new_tokens, config.context_length)
    tokens = np.zeros((1, bucket(prompt.size, capacity)), np.int32)
    tokens[0, : prompt.size] = prompt
    cache = init_cache(
        config, 1, capacity, model.dtype, stacked=not isinstance(model.params.layers, tuple)
    )
    row_sampling = SamplingParams.from_rows([sampling])
    seeds = jnp.asarray([seed], jnp.int32)
    request_ids = jnp.asarray([request_id], jnp.int32)
    eos = model.tokenizer.eos_id if (stop_at_eos and model.tokenizer is not None) else None
    steps = dict(config=config, implementation=implementation)

    token, _, cache = prefill_into_slot(
        params,
        jnp.asarray(tokens),
        jnp.asarray([prompt.size], jnp.int32),
        cache,
        jnp.zeros((), jnp.int32),
        row_sampling,
        seeds,
        request_ids,
        lora,
        adapter_ids,
        **steps,
    )
    stop = jnp.asarray([-1 if eos is None else eos], jnp.int32)
    active = token != stop
    # The first token comes from the prefill, the rest from calls of `decode_loop`. Each call
    # is dispatched before the host reads the previous one's tokens, so the device has work
    # queued while the host copies them out and yields them; after EOS the queued call finds
    # no active row and ends at once.
    ready, produced = (token[:, None], jnp.ones((1,), jnp.int32)), 1
    while ready is not None:
        queued = None
        if produced < max_new_tokens:
            n = min(steps_per_call, max_new_tokens - produced)
            # attention reads the smallest window holding every position the call writes
            window = decode_window(prompt.size + produced + n - 1, capacity)
            out, counts, token, active, cache = decode_loop(
                params,
                token,
                active,
                cache,
                row_sampling,
                seeds,
                request_ids,
                np.int32(n),
                stop,
                lora,
                adapter_ids,
                attn_len=window,
                max_steps=steps_per_call,
                **steps,
            )
            queued, produced = (out, counts), produced + n
        new, count = jax.device_get(ready)
        for value in new[0, : count[0]].tolist():
            yield value
            if value == eos:
                return
        ready = queued


def generate(
    model: Model,
    ids: Sequence[int],
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_at_eos: bool = True,
    *,
    adapter: LoraAdapter | None = None,
    draft: Model | None = None,
    num_draft_tokens: int = 4,
    **kwargs,
) -> list[int]:
    """Generate up to `max_new_tokens` tokens after a prompt.

    Args:
      model: a loaded model.
      ids: the prompt's token ids.
      max_new_tokens: how many new tokens at most.
      sampling: temperature / top-k / top-p (temperature 0 = greedy).
      seed: the sampler's seed; token t's randomness depends only on (seed, request, t).
      stop_at_eos: stop after the tokenizer's EOS token (it is included in the output).
      adapter: an `rj.LoraAdapter` for this model (`rj.load_adapter`), or None.
      draft: an `rj.Model` with the same vocabulary (e.g. `rj.layer_skip_draft(model, 8)`):
        speculative decoding; None decodes one token per step.
      num_draft_tokens: k, the tokens the draft proposes per step.
      **kwargs: `lora_strategy` ("merged" or "unmerged", see `with_adapter`), `request_id`,
        `implementation`, `stats`, `steps_per_call` (see `stream`).

    Returns:
      The new token ids only.

    Raises:
      RequestError: invalid prompt, lengths, sampling parameters, seed or strategy.
      AdapterError: an adapter that does not fit the model.
    """
    return list(
        stream(
            model,
            ids,
            max_new_tokens,
            sampling,
            seed,
            stop_at_eos,
            adapter=adapter,
            draft=draft,
            num_draft_tokens=num_draft_tokens,
            **kwargs,
        )
    )
