"""`logits`, `generate` and `stream`: one request, through the one driver.

`stream` runs an `Engine` with one slot and one request: the same prefill, the same device
loop of up to `steps_per_call` steps per call, the same stop rule as any batch, and
speculative decoding is the engine's draft, not a second loop. `generate` collects what
`stream` yields. `logits` scores a whole prompt in one forward (`steps.decode.prompt_logits`).

`adapter=` runs a `LoraAdapter` by one of two strategies (`lora_strategy`): "merged" merges it
into a new params pytree for the call (the base params are untouched), "unmerged" registers
it with the engine as a stack of one adapter. Both are exact against the float64 reference.
"""

import dataclasses
import math
from collections.abc import Iterator, Sequence

import numpy as np

from realm_jax.engine import STEPS_PER_CALL, Engine
from realm_jax.errors import RequestError
from realm_jax.loading import Model
from realm_jax.lora.adapters import check_adapter, merge_adapter, stack_adapters
from realm_jax.lora.tree import LoraAdapter
from realm_jax.requests import GREEDY, validate_budget, validate_prompt
from realm_jax.sampling import Sampling
from realm_jax.steps.decode import bucket, prompt_logits
from realm_jax.steps.drafts import LayerSkipDraft
from realm_jax.steps.state import StepSpec, Weights

LORA_STRATEGIES = ("merged", "unmerged")
# The default strategy for one request (experiments/lora_strategies.py, docs/lora.md): merged
# decodes at the base model's speed and reuses its compiled steps, at the price of a merge per
# call; unmerged adds the LoRA products to every step. For many calls with one adapter, merge
# once (`rj.merge_adapter`) or pass "unmerged".
DEFAULT_LORA_STRATEGY = "merged"
ADAPTER_NAME = "adapter"  # the tenant name of an unmerged adapter in `stream`'s engine


@dataclasses.dataclass
class SpeculativeStats:
    """Acceptance counts of one request (filled in when passed to `stream` as `stats=`).

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


def _check_strategy(model: Model, adapter: LoraAdapter | None, lora_strategy: str) -> None:
    if lora_strategy not in LORA_STRATEGIES:
        raise RequestError(f"lora_strategy {lora_strategy!r} is not one of {LORA_STRATEGIES}")
    if adapter is not None:
        check_adapter(adapter, model.params, model.config)


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
      lora_strategy: "merged" or "unmerged".
      implementation: attention implementation (see `rj.attention`).

    Returns:
      [T, V] float32 NumPy array; row t scores the token after ids[t].

    Raises:
      RequestError, AdapterError: a bad prompt, strategy or adapter.
    """
    array = validate_prompt(model.config, ids)
    if array.size > model.config.context_length:
        raise RequestError(
            f"prompt ({array.size} tokens) exceeds the context length {model.config.context_length}"
        )
    _check_strategy(model, adapter, lora_strategy)
    weights = Weights(params=model.params)
    if adapter is not None and lora_strategy == "merged":
        weights = Weights(params=merge_adapter(model.params, adapter))
    elif adapter is not None:
        weights = Weights(params=model.params, lora=stack_adapters([adapter]))
    t = array.size
    padded = bucket(t, model.config.context_length)
    tokens = np.zeros((1, padded), np.int32)
    tokens[0, :t] = array
    spec = StepSpec(model.config, padded, implementation)
    zero = np.zeros((1,), np.int32)
    out = prompt_logits(weights, tokens, np.asarray([t], np.int32), zero, spec=spec)
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
    implementation: str = "auto",
    draft: Model | LayerSkipDraft | None = None,
    num_draft_tokens: int = 4,
    stats: SpeculativeStats | None = None,
    steps_per_call: int = STEPS_PER_CALL,
) -> Iterator[int]:
    """Yield new token ids as they are produced (see `generate`).

    The request runs through an `Engine` with one slot, up to `steps_per_call` steps per
    device call, so tokens arrive in groups of up to that many (k + 1 times that with a
    draft); the tokens do not depend on it (the sampler is keyed by position). With a
    `draft`, `stats` (a `SpeculativeStats`) is filled in as the request runs.

    Raises:
      RequestError, AdapterError, RealmError: as `generate`, when the generator starts.
    """
    prompt = validate_prompt(model.config, ids)
    validate_budget(prompt.size, max_new_tokens, model.config.context_length, "the context length")
    _check_strategy(model, adapter, lora_strategy)
    name = None
    if adapter is not None and lora_strategy == "merged":
        model = dataclasses.replace(model, params=merge_adapter(model.params, adapter))
    elif adapter is not None:
        name = ADAPTER_NAME
    capacity = bucket(prompt.size + max_new_tokens, model.config.context_length)
    engine = Engine(
        model,
        max_batch=1,
        max_seq_len=capacity,
        draft=draft,
        num_draft_tokens=num_draft_tokens,
        implementation=implementation,
        steps_per_call=steps_per_call,
    )
    if name is not None:
        engine.add_adapter(name, adapter)
    rid = engine.submit(prompt, max_new_tokens, sampling, seed, name, stop_at_eos)
    if stats is not None:
        stats.num_draft_tokens = num_draft_tokens if draft is not None else 0
        stats.histogram, stats.emitted = [], 0
    for event in engine.stream():
        if stats is not None and draft is not None:
            stats.histogram = engine.accepted(rid)
        if event.token is not None:
            if stats is not None:
                stats.emitted += 1
            yield event.token


def generate(
    model: Model,
    ids: Sequence[int],
    max_new_tokens: int = 32,
    sampling: Sampling = GREEDY,
    seed: int = 0,
    stop_at_eos: bool = True,
    *,
    adapter: LoraAdapter | None = None,
    draft: Model | LayerSkipDraft | None = None,
    num_draft_tokens: int = 4,
    **kwargs,
) -> list[int]:
    """Generate up to `max_new_tokens` tokens after a prompt.

    Args:
      model: a loaded model.
      ids: the prompt's token ids.
      max_new_tokens: how many new tokens at most, >= 1.
      sampling: temperature / top-k / top-p (temperature 0 = greedy).
      seed: the sampler's seed; token t's randomness depends only on (seed, t).
      stop_at_eos: stop after the tokenizer's EOS token (it is included in the output).
      adapter: an `rj.LoraAdapter` for this model (`rj.load_adapter`), or None.
      draft: an `rj.Model` with the same vocabulary, or `rj.layer_skip_draft(model, n)`:
        speculative decoding; None decodes one token per step.
      num_draft_tokens: k, the tokens the draft proposes per step.
      **kwargs: `lora_strategy` ("merged" or "unmerged"), `implementation`, `stats`,
        `steps_per_call` (see `stream`).

    Returns:
      The new token ids only.

    Raises:
      RequestError: invalid prompt, lengths, sampling parameters, seed or strategy.
      AdapterError: an adapter that does not fit the model.
      RealmError: a draft that does not fit the model.
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
