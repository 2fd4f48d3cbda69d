"""The GGUF tensor layout, in one place: which GGUF tensor becomes which `Params` leaf.

What lives here: `TENSOR_TABLE` (every tensor of a llama-family GGUF, its shape and how it is
arranged), `FUSED` (the leaves that concatenate several GGUF tensors: Q/K/V, gate/up),
`params_from_tensors` (GGUF-named arrays -> `Params`), `lora_pieces` / `expected_shapes`
(where a LoRA of each GGUF weight lands in those fused leaves) and the Q/K row permutation
between HF's and GGUF's order (`permute_qk_rows_to_gguf`, for PEFT adapters). What does not:
reading files (`gguf.py`, `lora_files.py`) and the math (`model.py`).

Layout facts (llama.cpp `convert_hf_to_gguf.py`, `LlamaModel.permute`): gguf-py gives each
tensor as a NumPy array whose shape is GGUF's `ne` reversed, so matrices are
[out_features, in_features]. The rows of `attn_q` / `attn_k` are permuted within every head
for GGML's adjacent-pair RoPE; the weights keep them as stored and the model rotates adjacent
pairs (DESIGN §4), so only an adapter trained on HF's order needs the permutation.
"""

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.config import ModelConfig
from realm_jax.model import LayerParams, Params

Shape = Callable[[ModelConfig], tuple[int, ...]]


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    """One row of `TENSOR_TABLE`.

    Attributes:
      gguf_name: the GGUF tensor name; `{i}` stands for the layer index.
      leaf: the `Params` / `LayerParams` field it becomes, or a piece of one (`FUSED`).
      shape: its NumPy shape (GGUF `ne` reversed) as a function of the config.
      layout: how `params_from_tensors` rearranges it: "as_is", "out_heads"
        ([N*H, D] -> [N, H, D]) or "in_heads" ([D, N*H] -> [D, N, H]). Matrices keep GGUF's
        [out, in] order (see `model.LayerParams`).
    """

    gguf_name: str
    leaf: str
    shape: Shape
    layout: str


def _q(c: ModelConfig) -> tuple[int, ...]:
    return (c.n_heads * c.head_dim, c.dim)


def _kv(c: ModelConfig) -> tuple[int, ...]:
    return (c.n_kv_heads * c.head_dim, c.dim)


TENSOR_TABLE: tuple[TensorSpec, ...] = (
    TensorSpec("token_embd.weight", "embed", lambda c: (c.vocab_size, c.dim), "as_is"),
    TensorSpec("output_norm.weight", "final_norm", lambda c: (c.dim,), "as_is"),
    TensorSpec("output.weight", "output", lambda c: (c.vocab_size, c.dim), "as_is"),
    TensorSpec("blk.{i}.attn_norm.weight", "attn_norm", lambda c: (c.dim,), "as_is"),
    # Q/K rows stay in GGUF's permuted order: the model rotates adjacent pairs (DESIGN §4).
    TensorSpec("blk.{i}.attn_q.weight", "wq", _q, "out_heads"),
    TensorSpec("blk.{i}.attn_k.weight", "wk", _kv, "out_heads"),
    TensorSpec("blk.{i}.attn_v.weight", "wv", _kv, "out_heads"),
    TensorSpec(
        "blk.{i}.attn_output.weight",
        "wo",
        lambda c: (c.dim, c.n_heads * c.head_dim),
        "in_heads",
    ),
    TensorSpec("blk.{i}.ffn_norm.weight", "ffn_norm", lambda c: (c.dim,), "as_is"),
    TensorSpec("blk.{i}.ffn_gate.weight", "w_gate", lambda c: (c.ffn_dim, c.dim), "as_is"),
    TensorSpec("blk.{i}.ffn_up.weight", "w_up", lambda c: (c.ffn_dim, c.dim), "as_is"),
    TensorSpec("blk.{i}.ffn_down.weight", "w_down", lambda c: (c.dim, c.ffn_dim), "as_is"),
)


# Fused LayerParams leaf -> (piece names from gguf.TENSOR_TABLE, concatenation axis).
FUSED: dict[str, tuple[tuple[str, ...], int]] = {
    "wqkv": (("wq", "wk", "wv"), 0),
    "w_gate_up": (("w_gate", "w_up"), 0),
}


def _to_layout(array: np.ndarray, layout: str, config: ModelConfig) -> np.ndarray:
    if layout == "as_is":
        return array
    if layout == "out_heads":  # [heads*H, D] -> [heads, H, D]
        return array.reshape(-1, config.head_dim, config.dim)
    if layout == "in_heads":  # [D, N*H] -> [D, N, H]
        return array.reshape(config.dim, config.n_heads, config.head_dim)
    raise ValueError(f"unknown layout {layout!r}")


def params_from_tensors(
    config: ModelConfig,
    tensors: Mapping[str, np.ndarray],
    dtype=jnp.float32,
    stacked: bool = True,
) -> Params:
    """Arrange GGUF-named float arrays (see `TENSOR_TABLE`) into a `Params` pytree."""
    top, per_layer = {}, [{} for _ in range(config.n_layers)]
    for spec in TENSOR_TABLE:
        if "{i}" not in spec.gguf_name:
            if spec.gguf_name in tensors:
                top[spec.leaf] = _to_layout(tensors[spec.gguf_name], spec.layout, config)
            continue
        for i in range(config.n_layers):
            array = tensors[spec.gguf_name.format(i=i)]
            per_layer[i][spec.leaf] = _to_layout(array, spec.layout, config)

    for pieces in per_layer:
        for leaf, (names, axis) in FUSED.items():
            pieces[leaf] = np.concatenate([pieces.pop(name) for name in names], axis=axis)

    def put(array: np.ndarray) -> jax.Array:
        return jnp.asarray(np.ascontiguousarray(array), dtype=dtype)

    if stacked:
        layers = LayerParams(**{f: put(np.stack([p[f] for p in per_layer])) for f in per_layer[0]})
    else:
        layers = tuple(LayerParams(**{f: put(a) for f, a in p.items()}) for p in per_layer)
    embed = put(top["embed"])
    return Params(
        embed=embed,
        layers=layers,
        final_norm=put(top["final_norm"]),
        output=put(top["output"]) if "output" in top else embed,  # tied: one array
    )


@dataclasses.dataclass(frozen=True)
class LoraPiece:
    """Where one GGUF weight's LoRA lands in its (possibly fused) `LayerParams` leaf."""

    leaf: str  # LayerParams field
    in_dims: tuple[int, ...]  # the leaf's input dims: a is [*in_dims, R]
    out_dims: tuple[int, ...]  # this piece's output dims in the leaf's layout
    leaf_out: tuple[int, ...]  # the leaf's output dims: b is [R, *leaf_out]
    offset: int  # start of the piece on the leaf's first output axis


@functools.lru_cache(maxsize=16)
def lora_pieces(config: ModelConfig) -> dict[str, LoraPiece]:
    """GGUF layer weight kind ("attn_q", ...) -> where its delta goes.

    Dims follow `TENSOR_TABLE`'s layouts ([out, in] matrices; "out_heads" [heads, H, D],
    "in_heads" [D, N, H]); fused pieces are concatenated on the leaf's first output axis in
    `FUSED` order.
    """
    fused_at = {
        name: (leaf, i) for leaf, (names, _) in FUSED.items() for i, name in enumerate(names)
    }
    groups: dict[str, list] = {}
    for spec in TENSOR_TABLE:
        if "{i}" not in spec.gguf_name or len(spec.shape(config)) != 2:
            continue  # not a layer's weight matrix
        out, inn = spec.shape(config)
        if spec.layout == "out_heads":
            in_dims, out_dims = (inn,), (out // config.head_dim, config.head_dim)
        elif spec.layout == "in_heads":
            in_dims, out_dims = (config.n_heads, config.head_dim), (out,)
        else:  # as_is
            in_dims, out_dims = (inn,), (out,)
        leaf, order = fused_at.get(spec.leaf, (spec.leaf, 0))
        kind = spec.gguf_name.split(".")[2]
        groups.setdefault(leaf, []).append((order, kind, in_dims, out_dims))
    pieces = {}
    for leaf, members in groups.items():
        members.sort()
        total = sum(out_dims[0] for *_, out_dims in members)
        offset = 0
        for _, kind, in_dims, out_dims in members:
            pieces[kind] = LoraPiece(leaf, in_dims, out_dims, (total, *out_dims[1:]), offset)
            offset += out_dims[0]
    return pieces


def expected_shapes(config: ModelConfig, kind: str, rank: int) -> tuple[tuple, tuple]:
    """NumPy shapes of A [R, in] and B [out, R] for a GGUF weight kind."""
    piece = lora_pieces(config)[kind]
    return (rank, math.prod(piece.in_dims)), (math.prod(piece.out_dims), rank)


def permute_qk_rows_to_gguf(rows: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF's order to GGUF's, as llama.cpp's converter does.

    Within each head of H rows, GGUF row h*H + 2i + j holds HF row h*H + (H/2)*j + i
    (i < H/2, j in {0, 1}): HF's rotate_half pair (i, i + H/2) becomes GGML's adjacent pair
    (2i, 2i+1). Assumes the whole head rotates (rope_dim == H), as in llama.
    (`reference.permute_qk_rows_to_gguf` is the golden's own, written apart; a test checks
    that the two agree.)

    Args:
      rows: [heads * H, ...] in HF order (a weight, a LoRA B).
      n_heads: the heads the rows are split into (N for q, K for k).
    """
    head_dim = rows.shape[0] // n_heads
    split = rows.reshape(n_heads, 2, head_dim // 2, *rows.shape[1:])  # [heads, j, i, ...]
    return split.swapaxes(1, 2).reshape(rows.shape)  # [heads, i, j, ...] -> [heads * H, ...]
