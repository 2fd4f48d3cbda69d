"""LoRA adapters as pytrees of low-rank deltas: build, load, stack for serving, merge.

Axis letters as in `model.py`, plus R (LoRA rank) and A (adapters in a stack).

An adapter touches some of a layer's matrices. `LoraAdapter.layers` mirrors `Params.layers`
(a tuple of per-layer `LayerLora`, or one `LayerLora` with [L, ...] leaves), and each
`LayerLora` field is named after the `LayerParams` leaf it changes (`wqkv`, `wo`, `w_gate_up`,
`w_down`), holding a `LoraDelta` (a [R, *in], b [R, *out], scale [R]) or None when the
adapter leaves that matrix alone. A leaf W is stored [*out, *in] (`model.LayerParams`); its
delta is b contracted with a * scale over R, in W's [*out, *in] order. Q/K/V (and gate/up)
are one fused leaf in `Params`, so their adapters fuse too: the q, k and v ranks sit side by
side on R, and b is block-structured (q's rank components write only the query heads, zeros
elsewhere), which lets each piece keep its own rank and scale.

Three strategies, one forward (`model.forward`):
- merged: `merge_adapter(params, adapter)` returns new Params with
  W + b.T @ (scale[:, None] * a); the base params stay untouched and reusable. (Written as
  products of row vectors, y = x @ W.T + ((x @ a.T) * scale) @ b.)
- unmerged and multi-adapter are one mechanism: `forward(..., lora=stack, adapter_ids=ids)`
  adds ((x @ a[ids].T) * scale[ids]) @ b[ids] inside each projection (`model.lora_delta`),
  where `stack` is a `LoraStack` of A adapters ([A, ...] per-layer leaves, ranks zero-padded
  to the largest) and each batch row picks its own by index. One adapter unmerged is a stack
  of A = 1 with ids all 0.

Serving many tenants (what an engine builds on): slot 0 is the base model by convention, an
all-zero slot. Build the stack once with free slots, then add, replace or clear one slot at a
time, and give each row its slot as `Rows.adapter_ids` (`steps.state`); `Engine` does this:

    stack = stack_adapters([None, adapter_a] + [None] * 6)   # A = 8: base, a, 6 free slots
    stack = set_adapter_slot(stack, 2, adapter_b)            # add or replace a tenant
    stack = set_adapter_slot(stack, 1, None)                 # remove one (zeros = base)

Shapes stay fixed (no recompilation) while an adapter fits the stack's ranks and targets;
a bigger one grows the stack (every slot zero-padded), which compiles the steps once more.

The pytrees themselves are `lora.tree`; file formats and their checks live in `lora.files`.
"""

import dataclasses
import os
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.config import ModelConfig
from realm_jax.errors import AdapterError
from realm_jax.layout import expected_shapes, lora_pieces
from realm_jax.loading import Model
from realm_jax.lora.files import GGUF_LAYER_WEIGHT, read_adapter_tensors
from realm_jax.lora.tree import TARGETS, LayerLora, LoraAdapter, LoraDelta, LoraStack
from realm_jax.model import Params, stack_trees

# ---------------------------------------------------------------------------------------------
# Building, checking, stacking and merging the pytree.


def adapter_from_tensors(
    config: ModelConfig,
    tensors: Mapping[str, tuple[np.ndarray, np.ndarray, float]],
    *,
    dtype=jnp.float32,
    stacked: bool = False,
) -> LoraAdapter:
    """Arrange GGUF-named (A [R, in], B [out, R], scale) triples into a `LoraAdapter`.

    Pieces of a fused leaf (q, k, v; gate, up) are laid side by side on R in `FUSED` order,
    each B block written at its piece's output slice, zeros elsewhere.

    Args:
      config: the model's config.
      tensors: as `read_adapter_tensors` returns (B rows of attn_q / attn_k in GGUF order).
      dtype: the model's compute dtype.
      stacked: the model's layer layout ([L, ...] leaves) or a tuple of layers.

    Raises:
      AdapterError: a name that is not a layer weight of the model, or a shape that does not
        fit it.
    """
    pieces = lora_pieces(config)
    per_layer: list[dict[str, list]] = [{} for _ in range(config.n_layers)]
    for name, (a, b, scale) in tensors.items():
        match = GGUF_LAYER_WEIGHT.fullmatch(name)
        if match is None or match[2] not in pieces or int(match[1]) >= config.n_layers:
            raise AdapterError(f"LoRA names {name!r}, which is not a layer weight of the model")
        piece = pieces[match[2]]
        a, b = np.asarray(a), np.asarray(b)
        want_a, want_b = expected_shapes(config, match[2], a.shape[0] if a.ndim else 0)
        if a.shape != want_a or b.shape != want_b or a.shape[0] == 0:
            raise AdapterError(
                f"LoRA of {name!r}: {a.shape=} and {b.shape=} do not fit (expected "
                f"{want_a} and {want_b})"
            )
        per_layer[int(match[1])].setdefault(piece.leaf, []).append((piece, a, b, float(scale)))

    layers = []
    for entries in per_layer:
        deltas = {}
        for leaf, items in entries.items():
            items.sort(key=lambda item: item[0].offset)
            first = items[0][0]
            rank = sum(a.shape[0] for _, a, _, _ in items)
            a_leaf = np.zeros((rank, *first.in_dims), np.float32)  # [R, *in]
            b_leaf = np.zeros((rank, *first.leaf_out), np.float32)  # [R, *out]
            scale_leaf = np.zeros((rank,), np.float32)  # [R]
            start = 0
            for piece, a, b, scale in items:
                r = a.shape[0]
                a_leaf[start : start + r] = a.reshape(r, *piece.in_dims)
                span = slice(piece.offset, piece.offset + piece.out_dims[0])
                b_leaf[start : start + r, span] = b.T.reshape(r, *piece.out_dims)
                scale_leaf[start : start + r] = scale
                start += r
            deltas[leaf] = LoraDelta(*(jnp.asarray(x, dtype) for x in (a_leaf, b_leaf, scale_leaf)))
        layers.append(LayerLora(**deltas))
    if stacked:
        return LoraAdapter(_stack_layer_list(_uniform([layers])[0]))
    return LoraAdapter(tuple(layers))


def load_adapter(path: str | os.PathLike, model: Model) -> LoraAdapter:
    """Load a LoRA adapter for `model`: a PEFT folder or a llama.cpp GGUF LoRA file.

    Args:
      path: a folder with adapter_config.json + adapter_model.safetensors (or either file
        in it), or a GGUF file with general.type = adapter.
      model: the `rj.Model` it adapts (config, dtype and layer layout are taken from it).

    Returns:
      A `LoraAdapter` in the model's dtype and layer layout; nothing is returned (and nothing
      is kept) unless every tensor was checked and read.

    Raises:
      AdapterError: see `read_adapter_tensors`.
    """
    tensors = read_adapter_tensors(path, model.config)
    stacked = not isinstance(model.params.layers, tuple)
    adapter = adapter_from_tensors(model.config, tensors, dtype=model.dtype, stacked=stacked)
    return jax.block_until_ready(adapter)


def _num_layers(layers: LayerLora | tuple[LayerLora, ...]) -> int:
    """L, for either layout."""
    if isinstance(layers, tuple):
        return len(layers)
    return next(getattr(layers, f).scale.shape[0] for f in TARGETS if getattr(layers, f))


def _layer_list(layers: LayerLora | tuple[LayerLora, ...]) -> list[LayerLora]:
    """Per-layer `LayerLora`s of either layout (stacked [L, ...] leaves are sliced)."""
    if isinstance(layers, tuple):
        return list(layers)
    return [jax.tree.map(lambda x, i=i: x[i], layers) for i in range(_num_layers(layers))]


def _stack_layer_list(layers: Sequence[LayerLora]) -> LayerLora:
    """One `LayerLora` with [L, ...] leaves from per-layer ones of equal structure."""
    return stack_trees(tuple(layers))


def _pad(delta: LoraDelta, rank: int) -> LoraDelta:
    """Zero-pad R to `rank` (any leading axes); padded components contribute exactly 0."""
    extra = rank - delta.rank
    if extra == 0:
        return delta
    lead = delta.scale.ndim - 1

    def pad(x, axis):
        widths = [(0, 0)] * x.ndim
        widths[axis] = (0, extra)
        return jnp.pad(x, widths)

    return LoraDelta(pad(delta.a, lead), pad(delta.b, lead), pad(delta.scale, -1))


def _zeros(lead: tuple[int, ...], spec: tuple, rank: int) -> LoraDelta:
    in_dims, out_dims, dtype = spec
    return LoraDelta(
        jnp.zeros((*lead, rank, *in_dims), dtype),
        jnp.zeros((*lead, rank, *out_dims), dtype),
        jnp.zeros((*lead, rank), dtype),
    )


def _specs(layer_lists: Sequence[Sequence[LayerLora]], lead: int) -> dict[str, tuple]:
    """Leaf -> ((in dims, out dims, dtype), largest rank) over every layer of every list."""
    specs = {}
    for layers in layer_lists:
        for layer in layers:
            for leaf in TARGETS:
                d = getattr(layer, leaf)
                if d is None:
                    continue
                spec = (d.a.shape[lead + 1 :], d.b.shape[lead + 1 :], d.a.dtype)
                if leaf in specs and specs[leaf][0] != spec:
                    raise AdapterError(
                        f"adapters disagree on {leaf}: {specs[leaf][0]} vs {spec} (different "
                        "models or dtypes?)"
                    )
                rank = max(d.rank, specs.get(leaf, (None, 0))[1])
                specs[leaf] = (spec, rank)
    return specs


def _uniform(
    layer_lists: Sequence[Sequence[LayerLora | None]], lead: tuple[int, ...] = (), specs=None
) -> list[list[LayerLora]]:
    """Give every layer of every list the same leaves and ranks (zero-padded, zero-filled)."""
    present = [[x for x in ls if x is not None] for ls in layer_lists]
    specs = specs or _specs(present, len(lead))
    out = []
    for layers in layer_lists:
        row = []
        for layer in layers:
            fields = {}
            for leaf, (spec, rank) in specs.items():
                d = getattr(layer, leaf) if layer is not None else None
                fields[leaf] = _pad(d, rank) if d is not None else _zeros(lead, spec, rank)
            row.append(LayerLora(**fields))
        out.append(row)
    return out


def stack_adapters(adapters: Sequence[LoraAdapter | None]) -> LoraStack:
    """Stack A adapters into one `LoraStack` for `forward(lora=..., adapter_ids=...)`.

    A None slot is all zeros: rows that pick it run the base model (slot 0 by convention when
    serving many tenants; see the module docstring). Ranks are zero-padded per leaf to the
    largest, and a leaf that only some adapters touch is zeros in the others.

    Args:
      adapters: A >= 1 adapters or None, in the same layer layout; at least one adapter.

    Returns:
      A `LoraStack` with [A, ...] per-layer leaves ([L, A, ...] for stacked layers).

    Raises:
      AdapterError: no adapter at all, or adapters of different models or layouts.
    """
    present = [a for a in adapters if a is not None]
    if not present:
        raise AdapterError("stack_adapters needs at least one adapter to know the shapes")
    layouts = {isinstance(a.layers, tuple) for a in present}
    if len(layouts) > 1:
        raise AdapterError("adapters mix stacked and tuple layer layouts")
    lists = [_layer_list(a.layers) if a is not None else None for a in adapters]
    n_layers = {len(ls) for ls in lists if ls is not None}
    if len(n_layers) > 1:
        raise AdapterError(f"adapters have different numbers of layers: {sorted(n_layers)}")
    n = n_layers.pop()
    uniform = _uniform([ls if ls is not None else [None] * n for ls in lists])
    layers = [_stack_layer_list([u[i] for u in uniform]) for i in range(n)]  # [A, ...]
    if layouts.pop():
        return LoraStack(tuple(layers))
    return LoraStack(_stack_layer_list(layers))  # [L, A, ...]


def set_adapter_slot(stack: LoraStack, slot: int, adapter: LoraAdapter | None) -> LoraStack:
    """Return `stack` with slot `slot` holding `adapter` (None: zeros, i.e. the base model).

    Shapes are unchanged (so jitted steps do not recompile) when the adapter's ranks and
    targets fit the stack's; otherwise every slot is zero-padded to make room.

    Raises:
      AdapterError: `slot` outside 0..A-1, or an adapter of another model or layout.
    """
    m = stack.num_adapters
    if not isinstance(slot, (int, np.integer)) or not 0 <= slot < m:
        raise AdapterError(f"adapter slot {slot!r} is outside 0..{m - 1}")
    tuple_layout = isinstance(stack.layers, tuple)
    layers = _layer_list(stack.layers)  # each [A, ...]
    if adapter is None:
        new = [jax.tree.map(lambda x: x.at[slot].set(0), layer) for layer in layers]
    else:
        if isinstance(adapter.layers, tuple) != tuple_layout:
            raise AdapterError(
                "the adapter's layer layout (stacked vs tuple) differs from the stack's"
            )
        own = _layer_list(adapter.layers)
        if len(own) != len(layers):
            raise AdapterError(f"adapter has {len(own)} layers, the stack {len(layers)}")
        specs = _specs([layers], 1)
        for leaf, (spec, rank) in _specs([own], 0).items():
            if leaf in specs and specs[leaf][0] != spec:
                raise AdapterError(
                    f"adapter's {leaf} {spec} does not fit the stack's {specs[leaf][0]}"
                )
            specs[leaf] = (spec, max(rank, specs.get(leaf, (spec, 0))[1]))
        layers = _uniform([layers], (m,), specs)[0]
        own = _uniform([own], (), specs)[0]
        new = [
            jax.tree.map(lambda s, x: s.at[slot].set(x), layer, mine)
            for layer, mine in zip(layers, own, strict=True)
        ]
    return LoraStack(tuple(new) if tuple_layout else _stack_layer_list(new))


def check_adapter(adapter: LoraAdapter, params: Params, config: ModelConfig) -> None:
    """Raise `AdapterError` unless `adapter` fits `params` (layout, layers, dims, dtype)."""
    if not isinstance(adapter, LoraAdapter):
        raise AdapterError(f"expected an rj.LoraAdapter, got {type(adapter).__name__}")
    if isinstance(adapter.layers, tuple) != isinstance(params.layers, tuple):
        raise AdapterError(
            "adapter and model disagree on the layer layout (stacked vs tuple): load the "
            "adapter with load_adapter(path, model) for this model"
        )
    layers = _layer_list(adapter.layers)
    if len(layers) != config.n_layers:
        raise AdapterError(f"adapter has {len(layers)} layers, the model {config.n_layers}")
    pieces = lora_pieces(config)
    dtype = params.embed.dtype
    for i, layer in enumerate(layers):
        for leaf in TARGETS:
            d = getattr(layer, leaf)
            if d is None:
                continue
            piece = next(p for p in pieces.values() if p.leaf == leaf)
            fits = (
                d.a.shape == (d.rank, *piece.in_dims)
                and d.b.shape == (d.rank, *piece.leaf_out)
                and d.a.dtype == d.b.dtype == d.scale.dtype == dtype
            )
            if not fits:
                raise AdapterError(
                    f"adapter layer {i} {leaf}: a {d.a.shape} {d.a.dtype}, b {d.b.shape} does "
                    f"not fit the model (a [R, *{piece.in_dims}], b [R, *{piece.leaf_out}], "
                    f"{dtype})"
                )


def _delta_weight(delta: LoraDelta) -> jax.Array:
    """The weight's delta in its stored [*out, *in] layout, in float32: b [R, *out] and
    a * scale [R, *in] contracted over R."""
    a, b, scale = (x.astype(jnp.float32) for x in (delta.a, delta.b, delta.scale))
    scaled_a = a * scale.reshape(scale.shape + (1,) * (a.ndim - 1))  # [R, *in]
    return jnp.tensordot(b, scaled_a, axes=((0,), (0,)), precision="highest")


@jax.jit
def _merge_weights(
    weights: dict[str, jax.Array], deltas: dict[str, LoraDelta]
) -> dict[str, jax.Array]:
    """W + delta W for each named weight, summed in float32 and rounded once to W's dtype;
    leading [L] axes are vmapped."""
    out = {}
    for name, w in weights.items():
        fn = _delta_weight
        for _ in range(deltas[name].scale.ndim - 1):
            fn = jax.vmap(fn)
        out[name] = (w.astype(jnp.float32) + fn(deltas[name])).astype(w.dtype)
    return out


def merge_adapter(params: Params, adapter: LoraAdapter) -> Params:
    """New params with the adapter merged: W + b.T @ (scale[:, None] * a) per touched weight.

    The base `params` are not modified and untouched leaves are shared, not copied. The sum is
    formed in float32; for bfloat16 weights it is then rounded to bfloat16, which can lose a
    small delta (the unmerged path keeps the delta separate).

    Raises:
      AdapterError: the adapter does not fit the params' layout or dims.
    """
    layers = params.layers
    n = len(layers) if isinstance(layers, tuple) else layers.wqkv.shape[0]
    if isinstance(adapter.layers, tuple) != isinstance(layers, tuple):
        raise AdapterError("adapter and params disagree on the layer layout (stacked vs tuple)")
    if _num_layers(adapter.layers) != n:
        raise AdapterError(f"adapter has {_num_layers(adapter.layers)} layers, the params {n}")

    def merge(layer, deltas: LayerLora):
        touched = {f: getattr(deltas, f) for f in TARGETS if getattr(deltas, f) is not None}
        weights = {f: getattr(layer, f) for f in touched}
        for f, d in touched.items():
            lead = d.scale.ndim - 1
            want = (*d.a.shape[:lead], *d.b.shape[lead + 1 :], *d.a.shape[lead + 1 :])
            if tuple(weights[f].shape) != want:
                raise AdapterError(
                    f"adapter {f}: a {d.a.shape}, b {d.b.shape} do not fit the weight "
                    f"{weights[f].shape}"
                )
        return dataclasses.replace(layer, **_merge_weights(weights, touched))

    if isinstance(layers, tuple):
        new = tuple(merge(layer, d) for layer, d in zip(layers, adapter.layers, strict=True))
    else:
        new = merge(layers, adapter.layers)
    return dataclasses.replace(params, layers=new)


def adapter_nbytes(adapter: LoraAdapter | LoraStack) -> int:
    """Bytes of every array in an adapter or stack (padding included)."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(adapter))
