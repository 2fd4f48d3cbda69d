"""`logits`, `generate` and `stream`: one request through the shared jitted steps.

There is one decode loop in the project: `stream` runs `batching.prefill_step` once and then
`batching.decode_step` per token, on one row; `generate` collects what `stream` yields.
"""

from collections.abc import Iterator, Sequence

import jax.numpy as jnp
import numpy as np

from realm_jax.batching import bucket, decode_step, decode_window, prefill_step, prompt_logits
from realm_jax.errors import RequestError
from realm_jax.kv_cache import init_cache
from realm_jax.loading import Model
from realm_jax.sampling import Sampling, SamplingParams

GREEDY = Sampling()


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


def logits(model: Model, ids: Sequence[int], *, implementation: str = "auto") -> np.ndarray:
    """Logits at every position of one prompt.

    Args:
      model: a loaded model.
      ids: T token ids.
      implementation: attention implementation (see `rj.attention`).

    Returns:
      [T, V] float32 NumPy array; row t scores the token after ids[t].
    """
    array = validate_ids(model, ids)
    t = array.size
    padded = bucket(t, model.config.context_length)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :t] = array
    out = prompt_logits(
        model.params,
        jnp.asarray(tokens),
        jnp.asarray([t], jnp.int32),
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
    request_id: int = 0,
    implementation: str = "auto",
) -> Iterator[int]:
    """Yield new token ids one at a time as they are produced (see `generate`)."""
    prompt = validate_ids(model, ids, max_new_tokens)
    if not isinstance(sampling, Sampling):
        raise RequestError(f"sampling must be an rj.Sampling, got {type(sampling).__name__}")
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**31:
        raise RequestError(f"seed must be an integer in 0..2**31-1, got {seed!r}")
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

    token, _, cache = prefill_step(
        model.params,
        jnp.asarray(tokens),
        jnp.asarray([prompt.size], jnp.int32),
        cache,
        row_sampling,
        seeds,
        request_ids,
        attn_len=tokens.shape[1],
        **steps,
    )
    active = jnp.ones((1,), bool)
    for produced in range(1, max_new_tokens + 1):
        value = int(token[0])
        yield value
        if value == eos or produced == max_new_tokens:
            return
        # attention reads the smallest window holding every position written so far
        window = decode_window(prompt.size + produced, capacity)
        token, _, cache = decode_step(
            model.params,
            token,
            active,
            cache,
            row_sampling,
            seeds,
            request_ids,
            attn_len=window,
            **steps,
        )


def generate(
    model: Model,
    ids: Sequence[int],
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_at_eos: bool = True,
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
      **kwargs: `request_id`, `implementation` (see `stream`).

    Returns:
      The new token ids only.

    Raises:
      RequestError: invalid prompt, lengths, sampling parameters or seed.
    """
    return list(stream(model, ids, max_new_tokens, sampling, seed, stop_at_eos, **kwargs))
