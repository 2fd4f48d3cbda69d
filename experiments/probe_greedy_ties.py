"""Where greedy speculative decoding and plain greedy decoding part, per weight dtype.

Question: on the H100 in bfloat16 the speculative sweep found greedy speculative output
different from plain greedy output (docs/results.md), while in float32 the two are equal
(tests and the CPU sweep). Is the bfloat16 difference a tie that rounding breaks one way in
a one-position decode step and the other way in the verify pass over k + 1 positions, or a
fault? For each dtype and layer-skip draft it generates the sweep's prompt greedily with and
without the draft, and at the first token where they part it reads the target's logits for
the common prefix (`rj.logits`, a third computation of the same numbers): the two tokens'
logits, their gap and bfloat16's spacing at that magnitude.

    python experiments/probe_greedy_ties.py [--tiny] [--out DIR]

Writes probe_greedy_ties.json and .md to DIR (default experiments/results/probe_greedy_ties/,
or a temporary folder with --tiny).
"""

import json
import platform
import sys

import common
import numpy as np
import speculative_sweep

import realm_jax as rj

RESULTS = common.RESULTS / "probe_greedy_ties"
PLANS = {
    "full": dict(tokens=64, drafts=((28, 2), (20, 4)), dtypes=("float32", "bfloat16")),
    "tiny": dict(tokens=12, drafts=((1, 2),), dtypes=("bfloat16",)),
}


def bfloat16_spacing(x: float) -> float:
    """The gap between adjacent bfloat16 numbers at |x| (8 significant bits)."""
    return 2.0 ** (np.floor(np.log2(abs(x))) - 7)


def first_difference(model, ids: list[int], plain: list[int], spec: list[int]) -> dict | None:
    """Where two generations of `ids` part, and the target's logits there (None if equal)."""
    if plain == spec:
        return None
    i = next(j for j, (a, b) in enumerate(zip(plain, spec, strict=False)) if a != b)
    if i == min(len(plain), len(spec)):  # one is a prefix of the other (an EOS)
        return dict(index=i, plain_token=None, spec_token=None)
    row = np.asarray(rj.logits(model, ids + plain[:i])[-1], np.float64)
    top = np.argsort(row)[::-1][:2]
    a, b = row[plain[i]], row[spec[i]]
    return dict(
        index=i,
        plain_token=plain[i],
        spec_token=spec[i],
        plain_logit=a,
        spec_logit=b,
        gap=abs(a - b),
        bfloat16_spacing=bfloat16_spacing(max(abs(a), abs(b))),
        top2=[int(t) for t in top],
    )


def run(tiny: bool, model_path: str | None = None) -> dict:
    plan = PLANS["tiny" if tiny else "full"]
    rows = []
    for dtype in plan["dtypes"]:
        model, ids = speculative_sweep.load(tiny, dtype, model_path)  # the sweep's prompt
        plain = rj.generate(model, ids, plan["tokens"], stop_at_eos=False)
        for depth, k in plan["drafts"]:
            draft = rj.layer_skip_draft(model, depth)
            spec = rj.generate(
                model, ids, plan["tokens"], stop_at_eos=False, draft=draft, num_draft_tokens=k
            )
            row = dict(dtype=dtype, draft_layers=depth, k=k, same=spec == plain)
            row["first_difference"] = first_difference(model, ids, plain, spec)
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    return dict(
        model="tiny random (2 layers)" if tiny else "SmolLM2-135M-Instruct (Q4_1)",
        tokens=plan["tokens"],
        machine=dict(common.machine(), cpu=platform.processor()),
        rows=rows,
    )


def markdown(result: dict) -> str:
    lines = [
        f"{result['model']}, {result['tokens']} greedy tokens, {result['machine']['backend']} "
        f"(jax {result['machine']['jax']}).",
        "",
        "| dtype | draft layers | k | same as plain | first difference at | logits there "
        "(plain / speculative) | gap | bfloat16 spacing |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        d = r["first_difference"] or {}
        logits = f"{d['plain_logit']:.4f} / {d['spec_logit']:.4f}" if "plain_logit" in d else ""
        lines.append(
            f"| {r['dtype']} | {r['draft_layers']} | {r['k']} | {'yes' if r['same'] else 'no'} "
            f"| {d.get('index', '')} | {logits} | "
            + (f"{d['gap']:.4f} | {d['bfloat16_spacing']:.4f} |" if "gap" in d else " | |")
        )
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    args = common.parser(__doc__).parse_args(argv)  # --tiny: a random 2-layer model
    result = run(args.tiny, args.model)
    common.write("probe_greedy_ties", result, markdown(result), common.output_folder(args, RESULTS))
    return 0


if __name__ == "__main__":
    sys.exit(main())
