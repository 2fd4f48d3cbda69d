"""Request validation, written once: prompts, budgets, sampling, seeds and draft settings.

Every entry point (`rj.generate`, `rj.stream`, `rj.logits`, `Engine`) checks what a user hands
it here, before anything reaches a device, so a bad request raises a `RequestError` that says
what was wrong and nothing else is touched. Budgets follow HF and vLLM: at least one new
token (`max_new_tokens=0` is refused, not an empty result).

What does not live here: the checks a model or adapter makes of itself (`lora.check_adapter`,
`drafts.check_draft`) and the engine's own sizes (`Engine.__init__`).
"""

from collections.abc import Sequence
from numbers import Integral

import numpy as np

from realm_jax.config import ModelConfig
from realm_jax.errors import RequestError
from realm_jax.sampling import Sampling

GREEDY = Sampling()  # temperature 0: the default of every entry point


def _is_int(value) -> bool:
    """An integer that is not a bool (True would otherwise read as 1)."""
    return isinstance(value, Integral) and not isinstance(value, bool)


def validate_prompt(config: ModelConfig, ids: Sequence[int]) -> np.ndarray:
    """Check a prompt's token ids against the vocabulary; return them as int32 [T].

    Raises:
      RequestError: an empty prompt, non-integer ids, or ids outside 0..V-1.
    """
    array = np.asarray(ids)
    if array.ndim != 1 or array.size == 0:
        raise RequestError(f"prompt must be a non-empty list of token ids, got {array.shape=}")
    if not np.issubdtype(array.dtype, np.integer):
        raise RequestError(f"prompt token ids must be integers, got dtype {array.dtype}")
    vocab = config.vocab_size
    bad = (array < 0) | (array >= vocab)
    if bad.any():
        index = int(np.argmax(bad))
        raise RequestError(f"prompt token {index} is {int(array[index])}, outside 0..{vocab - 1}")
    return array.astype(np.int32)


def validate_budget(prompt_size: int, max_new_tokens: int, limit: int, what: str) -> int:
    """Check a generation budget: an integer >= 1 whose prompt + budget fits in `limit`.

    Args:
      prompt_size: T, the prompt's length.
      max_new_tokens: the request's budget.
      limit: positions available (the model's context length or an engine's max_seq_len).
      what: the name of that limit, for the message.

    Raises:
      RequestError: a budget that is not an integer >= 1, or prompt + budget beyond `limit`.
    """
    if not _is_int(max_new_tokens) or max_new_tokens < 1:
        raise RequestError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    total = prompt_size + int(max_new_tokens)
    if total > limit:
        raise RequestError(
            f"prompt ({prompt_size} tokens) + max_new_tokens ({max_new_tokens}) = {total} "
            f"exceeds {what} {limit}"
        )
    return int(max_new_tokens)


def validate_sampling(sampling: Sampling, seed: int) -> None:
    """Check a request's sampling object and seed (`Sampling` validates its own values).

    Raises:
      RequestError: `sampling` is not an `rj.Sampling`, or `seed` is not in 0..2**31-1.
    """
    if not isinstance(sampling, Sampling):
        raise RequestError(f"sampling must be an rj.Sampling, got {type(sampling).__name__}")
    if not _is_int(seed) or not 0 <= seed < 2**31:
        raise RequestError(f"seed must be an integer in 0..2**31-1, got {seed!r}")


def validate_count(value: int, name: str) -> int:
    """Check a count option that must be an integer >= 1 (`steps_per_call`,
    `num_draft_tokens`, ...).

    Raises:
      RequestError: anything else, naming the option.
    """
    if not _is_int(value) or value < 1:
        raise RequestError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)
