"""The LoRA pytrees: `LoraDelta` (one weight's low-rank change), `LayerLora` (one block's),
`LoraAdapter` (one adapter, shaped like the `Params` leaves it touches) and `LoraStack` (A
adapters stacked for per-row serving).

Axis letters as in `model.py`: R the LoRA rank, A the adapters in a stack. This module holds
the data only, so that the math (`model.forward`, `model.lora_delta`) can name its types
without importing the code that builds them (`lora.adapters`) or reads files (`lora.files`).
"""

import dataclasses

import jax


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraDelta:
    """The low-rank change of one weight: the product x @ W.T gains ((x @ a.T) * scale) @ b.

    Attributes:
      a: [R, *in] down projection (rank, then the weight's input dims: PEFT's lora_A order,
        so that a stack's [A, R, *in] is one [A * R, in] matrix for `model.lora_delta`).
      b: [R, *out] up projection (rank, then the weight's output dims).
      scale: [R] per rank component (alpha / r of the piece it belongs to; 0 on padding).
    In a `LoraStack` every leaf gains a leading [A] axis (after [L] for stacked layers).
    """

    a: jax.Array
    b: jax.Array
    scale: jax.Array

    @property
    def rank(self) -> int:
        """R, the number of rank components (including zero padding)."""
        return self.scale.shape[-1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerLora:
    """The deltas of one transformer block, named like the `LayerParams` leaves they change.

    Attributes:
      wqkv: a [D, R], b [R, N + 2K, H]; q, k and v pieces side by side on R.
      wo: a [N, H, R], b [R, D].
      w_gate_up: a [D, R], b [R, 2F]; gate and up pieces side by side on R.
      w_down: a [F, R], b [R, D].
    Each is None when the adapter leaves that weight alone.
    """

    wqkv: LoraDelta | None = None
    wo: LoraDelta | None = None
    w_gate_up: LoraDelta | None = None
    w_down: LoraDelta | None = None


TARGETS = tuple(f.name for f in dataclasses.fields(LayerLora))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraAdapter:
    """One LoRA adapter, shaped like the `Params` leaves it touches (what `load_adapter` gives).

    Attributes:
      layers: a tuple of L `LayerLora`, or one `LayerLora` with [L, ...] leaves (the same
        layout as the model's `Params.layers`).
    """

    layers: LayerLora | tuple[LayerLora, ...]


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LoraStack:
    """A adapters stacked for `model.forward(lora=..., adapter_ids=...)` (`stack_adapters`).

    Attributes:
      layers: like `LoraAdapter.layers`, with a leading [A] axis on every per-layer leaf
        (leaves [A, ...] in a tuple of layers, [L, A, ...] for stacked layers). Ranks are
        zero-padded to the largest; a slot with no adapter is all zeros (the base model).
    """

    layers: LayerLora | tuple[LayerLora, ...]

    @property
    def num_adapters(self) -> int:
        """A, the adapters in the stack."""
        first = self.layers[0] if isinstance(self.layers, tuple) else self.layers
        axis = 0 if isinstance(self.layers, tuple) else 1
        scales = [getattr(first, f).scale for f in TARGETS if getattr(first, f) is not None]
        return scales[0].shape[axis] if scales else 0
