"""What the jitted steps take: `Weights`, `Rows`, `Caches` (pytrees) and `StepSpec` (static).

Every step is `step(weights, rows, caches, ..., spec=spec)`: the arrays that stay the same for
many calls (`Weights`), the per-row state that changes every call (`Rows`), the KV caches
(`Caches`, donated) and one frozen, hashable specification of the program (`StepSpec`), so
that the argument lists of the steps are these four names and not ten loose ones. A new
`StepSpec` value, or a new shape of any leaf, is a new compilation; `Engine.warmup` compiles
every one that a configuration can reach.

Axis letters as in `model.py`; lowercase k is `DraftSpec.num_draft_tokens`, a static count.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.config import ModelConfig
from realm_jax.kv_cache import KVCache
from realm_jax.lora.tree import LoraStack
from realm_jax.model import Params
from realm_jax.sampling import SamplingParams

NO_STOP = -1  # a row's stop id when it does not stop at EOS (no token has this id)


@dataclasses.dataclass(frozen=True)
class DraftSpec:
    """How a speculative step drafts (static).

    Attributes:
      num_draft_tokens: k >= 1, tokens proposed per step.
      config: the draft model's config (for a layer-skip draft, the target's with
        n_layers = the draft's depth).
      layer_skip: True when the draft is the target's first `config.n_layers` blocks: it then
        runs the target's own weights and LoRA stack, sliced inside the step (so a merged or
        stacked adapter drafts too), and `Weights.draft` is None. False: a separate model
        whose weights are `Weights.draft` (run without adapters: the output is the target's
        either way, the draft only changes the speed).
    """

    num_draft_tokens: int
    config: ModelConfig
    layer_skip: bool


@dataclasses.dataclass(frozen=True)
class StepSpec:
    """Everything static about a step's program (hashable: a `jax.jit` static argument).

    Attributes:
      config: the target model's config.
      attn_len: cache positions attention reads: a bucket holding every position the call
        writes (`decode.decode_window`); for a prefill, the padded prompt length.
      implementation: attention implementation (see `rj.attention`).
      draft: None for plain decoding, else how the speculative step drafts.
    """

    config: ModelConfig
    attn_len: int
    implementation: str = "auto"
    draft: DraftSpec | None = None

    @property
    def tokens_per_step(self) -> int:
        """The most tokens one step emits per row: 1, or k + 1 with a draft."""
        return 1 if self.draft is None else self.draft.num_draft_tokens + 1


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Weights:
    """The arrays a step reads and never changes.

    Attributes:
      params: the target's weights.
      lora: a stack of A adapters (`lora.LoraStack`), each row picking its own by
        `Rows.adapter_ids`; None runs the base model with no LoRA operations.
      draft: a separate draft model's weights (`DraftSpec.layer_skip` False); None otherwise.
    """

    params: Params
    lora: LoraStack | None = None
    draft: Params | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Caches:
    """The KV caches a step writes (donated to every step).

    Attributes:
      target: the target's cache, B rows; lengths [B] = n, the positions each row holds.
      draft: the draft's cache with the same rows and lengths (speculative steps only).
    """

    target: KVCache
    draft: KVCache | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Rows:
    """The per-row state of a batch: one row per engine slot.

    With n = Caches.target.lengths[b], an active row b has emitted the token at position n
    (`tokens[b]`, in no cache yet); the caches hold positions 0..n-1.

    Attributes:
      tokens: [B] int32, each row's newest token, the next step's input.
      active: [B] bool, rows still generating; an inactive row is left untouched by every
        step (its length stays, it emits nothing), whatever its other fields hold.
      remaining: [B] int32, tokens the row may still emit (its budget minus what it has).
      stop_ids: [B] int32, the token after which the row stops (EOS), or `NO_STOP`.
      sampling: the rows' sampling parameters, fields [B] (temperature 0 = greedy).
      seeds: [B] int32, each request's seed.
      request_ids: [B] int32, the id that keys the sampler with the seed and the position
        (`sampling.token_rngs`); 0 for every engine request, so that a request draws the
        same tokens whatever else runs.
      adapter_ids: [B] int32, each row's adapter in `Weights.lora` (0 = the base model).
    """

    tokens: jax.Array
    active: jax.Array
    remaining: jax.Array
    stop_ids: jax.Array
    sampling: SamplingParams
    seeds: jax.Array
    request_ids: jax.Array
    adapter_ids: jax.Array

    @property
    def batch_size(self) -> int:
        """B."""
        return self.tokens.shape[0]


def host_rows(
    tokens, active, remaining, stop_ids, sampling: SamplingParams, seeds, request_ids, adapter_ids
) -> Rows:
    """`Rows` from host values (lists or NumPy), as NumPy arrays of the step's dtypes.

    NumPy leaves reach a jitted step as a plain transfer: building rows this way runs no
    device program, so it cannot trigger a compilation after `Engine.warmup`.
    """
    return Rows(
        tokens=np.asarray(tokens, np.int32),
        active=np.asarray(active, bool),
        remaining=np.asarray(remaining, np.int32),
        stop_ids=np.asarray(stop_ids, np.int32),
        sampling=sampling,
        seeds=np.asarray(seeds, np.int32),
        request_ids=np.asarray(request_ids, np.int32),
        adapter_ids=np.asarray(adapter_ids, np.int32),
    )


def emit(rows: Rows, emitted: jax.Array, counts: jax.Array) -> tuple[Rows, jax.Array]:
    """The stop rule, the one place it is written: keep each row's new tokens up to and
    including its stop id and within its budget; stop the row when either is reached.

    Args:
      rows: the rows before these tokens.
      emitted: [B, E] int32, row b's new tokens, the first counts[b] valid.
      counts: [B] int32 tokens produced per row (ignored for inactive rows).

    Returns:
      (rows with tokens = each row's newest kept token, remaining reduced, active cleared
      where a row stopped; keep [B] int32, how many of `emitted` each row keeps).
    """
    e = emitted.shape[1]
    index = jnp.arange(e, dtype=jnp.int32)[None]  # [1, E]
    is_stop = (index < counts[:, None]) & (emitted == rows.stop_ids[:, None])  # [B, E]
    through_stop = jnp.where(jnp.any(is_stop, axis=1), jnp.argmax(is_stop, axis=1) + 1, e)
    keep = jnp.minimum(jnp.minimum(counts, through_stop), rows.remaining)
    keep = jnp.where(rows.active, keep, 0).astype(jnp.int32)  # [B]
    stopped = jnp.any(is_stop & (index < keep[:, None]), axis=1)  # [B]
    remaining = rows.remaining - keep
    newest = jnp.take_along_axis(emitted, jnp.maximum(keep - 1, 0)[:, None], axis=1)[:, 0]
    rows = dataclasses.replace(
        rows,
        tokens=jnp.where(keep > 0, newest, rows.tokens),
        active=rows.active & ~stopped & (remaining > 0),
        remaining=remaining,
    )
    return rows, keep
