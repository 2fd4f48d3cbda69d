"""Run a llama-family model in float64 NumPy: the slow, obvious golden for every JAX path.

Written independently of `model.py` and `attention/`, in the style of picoGPT's `gpt2.py`:
plain functions, weights looked up by their GGUF names, a shape comment on every line that
changes a shape, and no import but NumPy. Speed is not a goal; the 30-layer SmolLM2-135M on a
342-token prompt still takes a few seconds because each head's positions are one matmul.

What lives here: `forward_reference` (logits at every position, optional LoRA merged into the
weights), `rms_norm_reference`, `rope_reference` (GGML's adjacent-pair rotation, for raw GGUF
q/k rows), `rope_half_split_reference` (HF's `rotate_half`, for un-permuted rows),
`attention_reference` (the batched causal GQA attention the kernels are tested against), and
`permute_qk_rows_to_gguf` / `permute_qk_rows_from_gguf`, and the float64 twins of speculative
decoding (`residual_probs_reference`, `speculative_block_reference`: every draft / accept /
reject path of one step enumerated exactly). What does not: loading (`gguf.py`), tokenizing,
sampling, caches.

Axis letters (`shared/DESIGN.md`): B batch, T query length, S key length, N query heads,
K KV heads, G = N // K, H head dim, D model width, F FFN width, V vocabulary, R LoRA rank.
Matrices are in gguf-py's NumPy convention, [out, in], so a linear layer is `x @ w.T`.
"""

from collections.abc import Callable, Mapping, Sequence

import numpy as np


def rms_norm_reference(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """Normalize the last axis by its root mean square, then scale by `weight` (no +1 offset).

    Args:
      x: [..., D].
      weight: [D].
      eps: added to the mean square before the square root.

    Returns:
      [..., D] float64.
    """
    x = np.asarray(x, np.float64)
    mean_square = np.mean(x**2, axis=-1, keepdims=True)  # [..., D] -> [..., 1]
    return x / np.sqrt(mean_square + eps) * np.asarray(weight, np.float64)


def silu(x: np.ndarray) -> np.ndarray:
    """x * sigmoid(x), with sigmoid written through tanh so large |x| cannot overflow `exp`."""
    return x * 0.5 * (1.0 + np.tanh(0.5 * x))


def rope_angles(positions: np.ndarray, base: float, rope_dim: int) -> np.ndarray:
    """Angle of rotation pair i at each position: position * base^(-2i / rope_dim).

    Args:
      positions: [...] integer positions, counted from 0.

    Returns:
      [..., rope_dim // 2] float64.
    """
    pair = np.arange(rope_dim // 2, dtype=np.float64)  # [rope_dim // 2]
    inv_freq = float(base) ** (-2.0 * pair / rope_dim)  # [rope_dim // 2]
    return np.asarray(positions, np.float64)[..., None] * inv_freq  # [...] -> [..., rope_dim // 2]


def rope_reference(x: np.ndarray, positions: np.ndarray, base: float, rope_dim: int) -> np.ndarray:
    """Rotate adjacent pairs (2i, 2i+1) of each head's leading `rope_dim` dims (GGML's llama RoPE).

    This is the rotation that matches q/k rows as GGUF stores them (llama.cpp's converter
    permutes them for it; see `permute_qk_rows_to_gguf`). Dims >= `rope_dim` pass through.

    Args:
      x: [..., T, N, H] queries or keys (any number of heads N).
      positions: [..., T] position of each token.
      base: RoPE frequency base (theta).
      rope_dim: how many leading dims of each head rotate; even, <= H.

    Returns:
      [..., T, N, H] float64.
    """
    x = np.asarray(x, np.float64)
    angles = rope_angles(positions, base, rope_dim)[..., None, :]  # [..., T, 1, rope_dim // 2]
    cos, sin = np.cos(angles), np.sin(angles)
    pairs = x[..., :rope_dim].reshape(*x.shape[:-1], rope_dim // 2, 2)  # -> [..., T, N, rd/2, 2]
    even, odd = pairs[..., 0], pairs[..., 1]  # [..., T, N, rope_dim // 2] each
    rotated = np.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)  # [.., rd/2, 2]
    rotated = rotated.reshape(*x.shape[:-1], rope_dim)  # -> [..., T, N, rope_dim]
    return np.concatenate([rotated, x[..., rope_dim:]], axis=-1)  # -> [..., T, N, H]


def rope_half_split_reference(
    x: np.ndarray, positions: np.ndarray, base: float, rope_dim: int
) -> np.ndarray:
    """Rotate pairs (i, i + rope_dim/2) of each head (HF's `rotate_half`), same angles as above.

    Right for q/k rows in HF order (GGUF rows passed through `permute_qk_rows_from_gguf`);
    wrong, yet plausible-looking, on raw GGUF rows. Same arguments and shapes as
    `rope_reference`.
    """
    x = np.asarray(x, np.float64)
    angles = rope_angles(positions, base, rope_dim)[..., None, :]  # [..., T, 1, rope_dim // 2]
    cos, sin = np.cos(angles), np.sin(angles)
    first, second = x[..., : rope_dim // 2], x[..., rope_dim // 2 : rope_dim]  # [..., rd/2] each
    rotated = [first * cos - second * sin, first * sin + second * cos]
    return np.concatenate([*rotated, x[..., rope_dim:]], axis=-1)  # -> [..., T, N, H]


def permute_qk_rows_to_gguf(w_hf: np.ndarray, n_heads: int) -> np.ndarray:
    """Reorder q/k projection rows from HF order to GGUF order, as llama.cpp's converter does.

    Within each head of H rows, GGUF row h*H + 2i + j holds HF row h*H + (H/2)*j + i
    (i < H/2, j in {0, 1}), so HF's rotate_half pair (i, i + H/2) lands on GGML's adjacent
    pair (2i, 2i+1). This assumes the whole head rotates (rope_dim == H), as in llama.

    Args:
      w_hf: [n_heads * H, ...] rows in HF order (a weight, a LoRA B, a bias).
      n_heads: heads the rows are split into (N for q, K for k).

    Returns:
      [n_heads * H, ...] rows in GGUF order.
    """
    head_dim = w_hf.shape[0] // n_heads
    split = w_hf.reshape(n_heads, 2, head_dim // 2, *w_hf.shape[1:])  # [heads, j, i, ...]
    return split.swapaxes(1, 2).reshape(w_hf.shape)  # [heads, i, j, ...] -> [heads * H, ...]


def permute_qk_rows_from_gguf(w_gguf: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo `permute_qk_rows_to_gguf`: HF row h*H + (H/2)*j + i holds GGUF row h*H + 2i + j."""
    head_dim = w_gguf.shape[0] // n_heads
    split = w_gguf.reshape(n_heads, head_dim // 2, 2, *w_gguf.shape[1:])  # [heads, i, j, ...]
    return split.swapaxes(1, 2).reshape(w_gguf.shape)  # [heads, j, i, ...] -> [heads * H, ...]


def attention_reference(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    q_positions: np.ndarray,
    kv_lengths: np.ndarray,
) -> np.ndarray:
    """Causal grouped-query attention, one (row, head) at a time, in float64.

    Query t of row b, at position p = q_positions[b, t], attends to keys s with s <= p and
    s < kv_lengths[b]; key s sits at position s. Query head n reads KV head n // G.
    Scores are scaled by 1/sqrt(H). A query with no valid key outputs zeros.

    Args:
      q: [B, T, N, H].
      k: [B, S, K, H].
      v: [B, S, K, H].
      q_positions: [B, T] integer positions of the queries.
      kv_lengths: [B] valid keys per row (0..S).

    Returns:
      [B, T, N, H] float64.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    batch, _, n_heads, head_dim = q.shape
    key_len, n_kv_heads = k.shape[1], k.shape[2]
    group = n_heads // n_kv_heads
    q_positions, kv_lengths = np.asarray(q_positions), np.asarray(kv_lengths)
    out = np.zeros(q.shape, np.float64)  # [B, T, N, H]
    for b in range(batch):
        key_index = np.arange(key_len)  # [S]
        valid = (key_index <= q_positions[b][:, None]) & (key_index < kv_lengths[b])  # [T, S]
        has_key = valid.any(axis=-1, keepdims=True)  # [T, 1]
        for n in range(n_heads):
            kv_head = n // group
            scores = q[b, :, n] @ k[b, :, kv_head].T / np.sqrt(head_dim)  # [T, H] @ [H, S]
            scores = np.where(valid, scores, -np.inf)  # [T, S]
            row_max = np.where(has_key, scores.max(axis=-1, keepdims=True), 0.0)  # [T, 1]
            weights = np.exp(scores - row_max)  # [T, S]; exp(-inf) = 0 at masked keys
            weights /= np.where(has_key, weights.sum(axis=-1, keepdims=True), 1.0)
            out[b, :, n] = weights @ v[b, :, kv_head]  # [T, S] @ [S, H] -> [T, H]
    return out


def forward_reference(
    config,
    tensors: Mapping[str, np.ndarray],
    ids: Sequence[int] | np.ndarray,
    lora: Mapping[str, tuple[np.ndarray, np.ndarray, float]] | None = None,
    *,
    rope: Callable[..., np.ndarray] = rope_reference,
) -> np.ndarray:
    """Logits at every position of one sequence, in float64.

    Args:
      config: any object with vocab_size, dim, n_layers, n_heads, n_kv_heads, head_dim,
        ffn_dim, rope_base, rope_dim, norm_eps, tied_embeddings (e.g. `ModelConfig`).
      tensors: GGUF tensor names -> dequantized arrays, [out, in] for matrices (gguf-py's
        NumPy shapes); q/k rows in GGUF order. `output.weight` may be absent when tied.
      ids: [T] token ids; positions are 0..T-1.
      lora: optional GGUF weight name -> (A [R, in], B [out, R], scale); the weight used is
        W + scale * B @ A. B rows of attn_q / attn_k must already be in GGUF order.
      rope: the rotation applied to q and k. Keep the default (adjacent pairs) for GGUF rows;
        `rope_half_split_reference` is right only for rows un-permuted to HF order.

    Returns:
      [T, V] float64 logits.

    Raises:
      ValueError: `ids` is not 1-D or holds an id outside [0, V) (NumPy would wrap negatives).
      KeyError: a LoRA names a weight that `tensors` does not have.
    """
    lora = dict(lora or {})
    unknown = sorted(set(lora) - set(tensors))
    if unknown:
        raise KeyError(f"LoRA targets weights the model does not have: {unknown}")

    def weight(name: str) -> np.ndarray:
        w = np.asarray(tensors[name], np.float64)
        if name in lora:
            a, b, scale = (np.asarray(m, np.float64) for m in lora[name])
            w = w + scale * (b @ a)  # [out, R] @ [R, in] -> [out, in]
        return w

    ids = np.asarray(ids)
    if ids.ndim != 1 or np.any(ids < 0) or np.any(ids >= config.vocab_size):
        raise ValueError(f"token ids must be a 1-D sequence in [0, {config.vocab_size}): {ids=}")
    n_heads, n_kv_heads, head_dim = config.n_heads, config.n_kv_heads, config.head_dim
    seq_len = len(ids)  # T
    positions = np.arange(seq_len)  # [T]

    x = weight("token_embd.weight")[ids]  # [V, D] -> [T, D]
    for layer in range(config.n_layers):
        p = f"blk.{layer}."
        n = rms_norm_reference(x, weight(p + "attn_norm.weight"), config.norm_eps)  # [T, D]
        q = (n @ weight(p + "attn_q.weight").T).reshape(seq_len, n_heads, head_dim)  # [T, N, H]
        k = (n @ weight(p + "attn_k.weight").T).reshape(seq_len, n_kv_heads, head_dim)  # [T,K,H]
        v = (n @ weight(p + "attn_v.weight").T).reshape(seq_len, n_kv_heads, head_dim)  # [T,K,H]
        q = rope(q, positions, config.rope_base, config.rope_dim)  # [T, N, H]
        k = rope(k, positions, config.rope_base, config.rope_dim)  # [T, K, H]
        attn = attention_reference(q[None], k[None], v[None], positions[None], [seq_len])
        attn = attn[0].reshape(seq_len, n_heads * head_dim)  # [1, T, N, H] -> [T, N*H]
        h = x + attn @ weight(p + "attn_output.weight").T  # [T, N*H] @ [N*H, D] -> [T, D]

        n = rms_norm_reference(h, weight(p + "ffn_norm.weight"), config.norm_eps)  # [T, D]
        gate = n @ weight(p + "ffn_gate.weight").T  # [T, D] @ [D, F] -> [T, F]
        up = n @ weight(p + "ffn_up.weight").T  # [T, D] @ [D, F] -> [T, F]
        x = h + (silu(gate) * up) @ weight(p + "ffn_down.weight").T  # [T, F] -> [T, D]

    x = rms_norm_reference(x, weight("output_norm.weight"), config.norm_eps)  # [T, D]
    out_name = "token_embd.weight" if config.tied_embeddings else "output.weight"
    return x @ weight(out_name).T  # [T, D] @ [D, V] -> [T, V]


# --- speculative decoding: the exact distribution of one step -------------------------------


def residual_probs_reference(target_probs: np.ndarray, draft_probs: np.ndarray) -> np.ndarray:
    """Float64 twin of `residual_probs` for one position ([V], [V] -> [V])."""
    excess = np.maximum(np.asarray(target_probs, np.float64) - draft_probs, 0.0)
    total = excess.sum()
    return excess / total if total > 0 else np.asarray(target_probs, np.float64)


def speculative_block_reference(
    target_probs_fn: Callable[[tuple[int, ...]], np.ndarray],
    draft_probs_fn: Callable[[tuple[int, ...]], np.ndarray],
    context: tuple[int, ...],
    num_draft_tokens: int,
    residual: Callable[[np.ndarray, np.ndarray], np.ndarray] = residual_probs_reference,
) -> dict[tuple[int, ...], float]:
    """Enumerate every draft / accept / reject path of one step exactly, in float64.

    Args:
      target_probs_fn, draft_probs_fn: context (a tuple of token ids) -> [V] float64, the
        distribution each model samples the next token from (p and q).
      context: the tokens so far.
      num_draft_tokens: k.
      residual: (p, q) -> [V], the distribution a rejection resamples from (a parameter so
        that tests can plant a wrong one).

    Returns:
      {emitted block (1..k+1 tokens): probability}; the values sum to 1.
    """
    blocks: dict[tuple[int, ...], float] = {}

    def add(block, weight):
        blocks[block] = blocks.get(block, 0.0) + weight

    def visit(prefix: tuple[int, ...], weight: float) -> None:
        """`weight`: probability that the draft proposed `prefix` and all of it was accepted."""
        target = target_probs_fn(context + prefix)
        if len(prefix) == num_draft_tokens:
            for token in np.flatnonzero(target):  # bonus token from p
                add((*prefix, int(token)), weight * target[token])
            return
        draft = draft_probs_fn(context + prefix)
        for token in np.flatnonzero(draft):  # the draft proposes token with probability q
            proposed = weight * draft[token]
            keep = min(1.0, target[token] / draft[token])
            if keep > 0:
                visit((*prefix, int(token)), proposed * keep)
            if keep < 1:
                fix = residual(target, draft)
                for other in np.flatnonzero(fix):
                    add((*prefix, int(other)), proposed * (1.0 - keep) * fix[other])

    visit((), 1.0)
    return blocks
