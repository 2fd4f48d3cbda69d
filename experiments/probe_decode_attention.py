"""Decode attention's cost on XLA's CPU backend, formulation by formulation.

Question: the batch-8 profile (profile_decode.py) puts attention's two small batched products
at ~26% of a SmolLM2 decode step. Is that the formulation (einsums over [B, K] batches, K
cache stored [B, K, S, H]) or the cost of such products on this backend? Each variant runs
L chained layers of T = 1 grouped-query attention (one layer's output feeds the next layer's
queries, as in the model), SmolLM2's head shapes, batch 8, a window of 256 positions:

- "ours (xla_attention)": the model's own call, on the cache layout the model keeps;
- "G, T as two free axes": the same function written as `xla_attention` was before change 10
  (docs/results.md): queries [B, T, K, G, H], so each product has two free axes;
- "K stored [B, K, H, S]": the score product reads keys with positions last;
- "multiply-reduce": both products as a broadcast multiply and a sum;
- "scores only" and "values only": one of the two products alone, to split the time.

    python experiments/probe_decode_attention.py [--tiny] [--out DIR]

Medians of alternated repeats after one compile call each. Writes probe_decode_attention.json
and .md to DIR (default experiments/results/probe_decode_attention/, or a temporary folder
with --tiny).
"""

import sys

import common
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.attention.xla import MASK_VALUE, attention_mask, xla_attention
from realm_jax.kv_cache import window

RESULTS = common.RESULTS / "probe_decode_attention"
SIZES = {
    "full": dict(batch=8, heads=9, kv_heads=3, head_dim=64, window=256, layers=30, repeats=21),
    "tiny": dict(batch=2, heads=4, kv_heads=2, head_dim=16, window=32, layers=2, repeats=3),
}


def variants(lengths: jax.Array, window_len: int, scale: float) -> dict:
    """name -> (one layer's attention (q [B,K,G,H], k, v) -> [B,K,G,H], whether k is [B,K,H,S]).

    Keys and values are stored [B, K, S, H] as in `kv_cache` (or keys [B, K, H, S])."""
    positions = lengths[:, None] - 1  # [B, 1]: each row's newest token
    valid = attention_mask(positions, lengths, window_len)[:, None]  # [B, 1, 1, S]

    def softmax(scores):
        return jax.nn.softmax(jnp.where(valid, scores * scale, MASK_VALUE), axis=-1)

    def ours(q, k, v):  # the model's call: xla_attention on the cache's [B, S, K, H] view
        b, kh, g, h = q.shape
        out = xla_attention(
            q.reshape(b, 1, kh * g, h), window(k, window_len), window(v, window_len),
            positions, lengths,
        )  # fmt: skip
        return out.reshape(b, kh, g, h)

    def two_free_axes(q, k, v):
        b, kh, g, h = q.shape
        q5 = q.reshape(b, 1, kh, g, h)  # [B, T, K, G, H]
        scores = jnp.einsum("BTKGH,BKSH->BKGTS", q5, k) * scale
        valid5 = valid[:, :, :, None]  # [B, 1, 1, T, S]
        p = jax.nn.softmax(jnp.where(valid5, scores, MASK_VALUE), axis=-1)
        p = jnp.where(valid5.any(axis=-1, keepdims=True), p, 0.0)
        return jnp.einsum("BKGTS,BKSH->BTKGH", p, v).reshape(b, kh, g, h)

    def keys_transposed(q, kt, v):
        p = softmax(jnp.einsum("bkgh,bkhs->bkgs", q, kt))
        return jnp.einsum("bkgs,bksh->bkgh", p, v)

    def multiply_reduce(q, k, v):
        p = softmax((q[:, :, :, None, :] * k[:, :, None, :, :]).sum(-1))
        return (p[..., None] * v[:, :, None, :, :]).sum(-2)

    def scores_only(q, k, v):
        return jnp.einsum("bkgh,bksh->bkgs", q, k)[..., : q.shape[-1]]

    def values_only(q, k, v):
        p = jnp.broadcast_to(q[..., :1], (*q.shape[:3], k.shape[2]))
        return jnp.einsum("bkgs,bksh->bkgh", p, v)

    return {
        "ours (xla_attention)": (ours, False),
        "G, T as two free axes": (two_free_axes, False),
        "K stored [B, K, H, S]": (keys_transposed, True),
        "multiply-reduce": (multiply_reduce, False),
        "scores only": (scores_only, False),
        "values only": (values_only, False),
    }


def run(tiny: bool) -> dict:
    size = SIZES["tiny" if tiny else "full"]
    b, n, kh, h = size["batch"], size["heads"], size["kv_heads"], size["head_dim"]
    s, layers = size["window"], size["layers"]
    rng = np.random.default_rng(0)
    q0 = jnp.asarray(rng.standard_normal((b, kh, n // kh, h)), jnp.float32)
    keys = tuple(
        jnp.asarray(rng.standard_normal((b, kh, s, h)), jnp.float32) for _ in range(layers)
    )
    keys_t = tuple(jnp.swapaxes(k, 2, 3) + 0.0 for k in keys)  # stored [B, K, H, S]
    values = tuple(
        jnp.asarray(rng.standard_normal((b, kh, s, h)), jnp.float32) for _ in range(layers)
    )
    lengths = jnp.full((b,), s - s // 8, jnp.int32)  # most of the window valid, as mid-decode

    calls = {}
    for name, (layer, transposed) in variants(lengths, s, 1.0 / h**0.5).items():

        def chain(q, ks, vs, layer=layer):
            for k, v in zip(ks, vs, strict=True):
                q = layer(q, k, v) + q
            return q

        calls[name] = (jax.jit(chain), keys_t if transposed else keys)
    reference = np.asarray(calls["ours (xla_attention)"][0](q0, keys, values))
    times = {name: [] for name in calls}
    max_diff = {}
    for name, (fn, ks) in calls.items():
        out = np.asarray(fn(q0, ks, values))  # compiles
        if "only" not in name:
            max_diff[name] = float(np.abs(out - reference).max())
    for _ in range(size["repeats"]):  # alternated: a load change hits every variant
        for name, (fn, ks) in calls.items():
            times[name] += common.time_call(fn, q0, ks, values, repeats=1)
    rows = [
        dict(variant=name, ms=1e3 * common.median(t), max_abs_diff=max_diff.get(name))
        for name, t in times.items()
    ]
    return dict(
        size=size,
        jax=jax.__version__,
        machine=common.machine(),
        max_abs_output=float(np.abs(reference).max()),
        rows=rows,
    )


def markdown(result: dict) -> str:
    z = result["size"]
    lines = [
        f"{z['layers']} chained layers of decode attention (T = 1), batch {z['batch']}, "
        f"{z['heads']}/{z['kv_heads']} heads of {z['head_dim']}, window {z['window']}, "
        f"float32, jax {result['jax']}; median of {z['repeats']} alternated repeats.",
        "",
        "| variant | ms for all layers | max abs diff to ours |",
        "|---|---|---|",
    ]
    for r in result["rows"]:
        diff = "-" if r["max_abs_diff"] is None else f"{r['max_abs_diff']:.1e}"
        lines.append(f"| {r['variant']} | {r['ms']:.2f} | {diff} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = common.parser(__doc__, model=False).parse_args(argv)  # --tiny: tiny sizes
    result = run(args.tiny)
    out = common.output_folder(args, RESULTS)
    common.write("probe_decode_attention", result, markdown(result), out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
