"""Drafts for speculative decoding: a separate model, or the target's own first layers.

A draft is what `rj.generate(draft=...)` and `rj.Engine(draft=...)` take:
- an `rj.Model` with the target's vocabulary (a smaller model of the same family, e.g.
  TinyLlama for Llama-2-7B), run without the request's adapter;
- a `LayerSkipDraft` (`rj.layer_skip_draft(model, n)`): self-speculative decoding with the
  target's first n blocks, then its final norm and output projection (Elhoushi et al. 2024,
  "LayerSkip", without early-exit training). It says what it is: the step slices the weights
  it runs beside (merged or stacked adapters included), rather than recognising shared arrays.

`draft_spec` turns either into the static `DraftSpec` of a step; `draft_weights` gives the
step the draft's weights from `Weights`.
"""

import dataclasses
import functools

import jax
import numpy as np

from realm_jax.errors import RealmError
from realm_jax.loading import Model
from realm_jax.lora.tree import LoraStack
from realm_jax.model import Params
from realm_jax.steps.state import DraftSpec, Weights


def first_layers(layers, num_layers: int):
    """The first `num_layers` of a tuple of layers (shared) or of stacked [L, ...] leaves:
    of `Params.layers`, or of a LoRA adapter's or stack's `layers` (the same layout)."""
    if isinstance(layers, tuple):
        return layers[:num_layers]
    return jax.tree.map(lambda x: x[:num_layers], layers)


@dataclasses.dataclass(frozen=True)
class LayerSkipDraft:
    """The first `num_layers` blocks of `target` as a draft (see the module docstring).

    Attributes:
      target: the model whose layers it keeps; a draft for that model (or one with its
        config, such as the same model with an adapter merged).
      num_layers: n, 1..target.config.n_layers.
    """

    target: Model
    num_layers: int

    @property
    def config(self):
        """The target's config with n_layers = n."""
        return dataclasses.replace(self.target.config, n_layers=self.num_layers)

    @functools.cached_property
    def params(self) -> Params:
        """The target's params cut to n layers: shared arrays for a tuple of layers, a copy of
        the first n for stacked ones (for callers that run the draft as a model)."""
        layers = first_layers(self.target.params.layers, self.num_layers)
        return dataclasses.replace(self.target.params, layers=layers)

    @property
    def tokenizer(self):
        return self.target.tokenizer

    @property
    def path(self) -> str:
        return self.target.path

    @property
    def dtype(self):
        return self.target.dtype


def layer_skip_draft(model: Model, num_layers: int) -> LayerSkipDraft:
    """A self-speculative draft of `model`: its first `num_layers` blocks.

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
    return LayerSkipDraft(model, int(num_layers))


def check_draft(model: Model, draft) -> None:
    """Raise `RealmError` unless `draft` can draft for `model`: an `rj.Model` with its
    vocabulary, or a layer-skip draft of a model with its config."""
    if isinstance(draft, LayerSkipDraft):
        if draft.target.config != model.config:
            raise RealmError(
                f"layer-skip draft of {draft.target.path or 'a model'} drafts for a model with "
                f"its config, not for {model.path or 'this model'} ({model.config})"
            )
        return
    if not isinstance(draft, Model):
        raise RealmError(
            f"draft must be an rj.Model or rj.layer_skip_draft(...), got {type(draft).__name__}"
        )
    if draft.config.vocab_size != model.config.vocab_size:
        raise RealmError(
            f"draft {draft.path or '(in memory)'} has a vocabulary of "
            f"{draft.config.vocab_size} tokens but the target {model.path or '(in memory)'} "
            f"has {model.config.vocab_size}: speculative decoding needs the same vocabulary"
        )


def draft_spec(draft: Model | LayerSkipDraft, num_draft_tokens: int) -> DraftSpec:
    """The static description of `draft` for a step (check it first with `check_draft`)."""
    return DraftSpec(
        num_draft_tokens=num_draft_tokens,
        config=draft.config,
        layer_skip=isinstance(draft, LayerSkipDraft),
    )


def draft_weights(weights: Weights, spec: DraftSpec) -> tuple[Params, LoraStack | None]:
    """The (params, lora) a step's draft runs: the target's first n layers and the stack's
    for a layer-skip draft (so it drafts like the adapted target, with the same adapter
    ids), or the separate draft's own weights and no adapter."""
    if not spec.layer_skip:
        return weights.draft, None
    n = spec.config.n_layers
    params = dataclasses.replace(weights.params, layers=first_layers(weights.params.layers, n))
    lora = weights.lora
    if lora is not None:
        lora = dataclasses.replace(lora, layers=first_layers(lora.layers, n))
    return params, lora
