"""Speculative decoding: greedy output is plain greedy's (several k and drafts, batched and
alone, 1 or several steps per device call), the sampled output has exactly the target's distribution
(every path enumerated in float64, and a chi-square test of the jitted step with a positive
control), edge cases (EOS inside a block, truncation, capacity), drafts and validation."""

import dataclasses
import functools
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_sampling import chi2_critical, chi2_sf

import realm_jax as rj
from realm_jax import engine as engine_module
from realm_jax.config import tiny
from realm_jax.errors import RealmError, RequestError
from realm_jax.generation import SpeculativeStats
from realm_jax.kv_cache import init_cache
from realm_jax.layout import params_from_tensors
from realm_jax.lora.adapters import adapter_from_tensors
from realm_jax.lora.tree import LoraAdapter
from realm_jax.model import stack_layers
from realm_jax.reference import (
    forward_reference,
    residual_probs_reference,
    speculative_block_reference,
)
from realm_jax.requests import GREEDY
from realm_jax.sampling import Sampling, SamplingParams, sampling_probs_reference
from realm_jax.steps import speculative
from realm_jax.steps.decode import append_and_sample
from realm_jax.steps.drafts import draft_spec, layer_skip_draft
from realm_jax.steps.state import Caches, StepSpec, Weights, emit, host_rows
from realm_jax.testing import assert_close, random_tensors

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

CONTEXT = 128
MAX_NEW = 24
# Prompts + MAX_NEW + k stay within 64 positions, so every run shares one cache shape.
PROMPTS = [np.random.default_rng(n).integers(3, 300, n).tolist() for n in (9, 14)]


def _model(config, tensors, stacked=False) -> rj.Model:
    return rj.Model(config, params_from_tensors(config, tensors, stacked=stacked), None)


def speculative_stream(model, ids, max_new_tokens=32, sampling=GREEDY, seed=0, **kwargs):
    """`rj.stream` with a draft (kwargs: draft, num_draft_tokens, stats, ...)."""
    return rj.stream(model, ids, max_new_tokens, sampling, seed, **kwargs)


def _damped_tensors(config, seed):
    """Random weights with blocks 1.. writing at 0.3x scale, so that layer-skip drafts agree
    with the target's argmax often (~70%) but not always."""
    tensors = random_tensors(config, seed=seed)
    for i in range(1, config.n_layers):
        for name in ("attn_output", "ffn_down"):
            tensors[f"blk.{i}.{name}.weight"] *= 0.3
    return tensors


@pytest.fixture(scope="module")
def target() -> rj.Model:
    config = tiny(vocab_size=300, n_layers=4, tied_embeddings=False, context_length=CONTEXT)
    return _model(config, _damped_tensors(config, seed=11))


@pytest.fixture(scope="module")
def drafts(target) -> dict[str, rj.Model]:
    """Layer-skip drafts at two depths, and a separate 2-layer model (the target's first two
    layers plus noise, its own norms and output) with the same vocabulary."""
    config = dataclasses.replace(target.config, n_layers=2)
    rng = np.random.default_rng(5)
    tensors = {
        name: array + 0.2 * array.std() * rng.standard_normal(array.shape).astype(np.float32)
        for name, array in _damped_tensors(target.config, seed=11).items()
        if not name.startswith(("blk.2.", "blk.3."))
    }
    return {
        "skip1": layer_skip_draft(target, 1),
        "skip3": layer_skip_draft(target, 3),
        "separate": _model(config, tensors),
    }


@pytest.fixture(scope="module")
def plain(target) -> list[list[int]]:
    return [rj.generate(target, ids, MAX_NEW) for ids in PROMPTS]


# --- greedy: identical to plain greedy ----------------------------------------------------

# (draft, k): k = 1..8 spread over the three drafts (each pair is one compilation); the edge
# cases below add the full-depth draft at k = 4.
GREEDY_CASES = [
    ("skip1", 1),
    ("skip1", 4),
    ("skip1", 8),
    ("skip3", 2),
    ("skip3", 5),
    ("separate", 3),
]


@pytest.mark.parametrize(("name", "k"), GREEDY_CASES, ids=[f"{n}-k{k}" for n, k in GREEDY_CASES])
def test_greedy_equals_plain_greedy(target, drafts, plain, name, k):
    accepted = drafted = 0
    for ids, expected in zip(PROMPTS, plain, strict=True):
        stats = SpeculativeStats()
        out = list(
            speculative_stream(
                target, ids, MAX_NEW, draft=drafts[name], num_draft_tokens=k, stats=stats
            )
        )
        assert out == expected
        assert stats.emitted == MAX_NEW and stats.generated >= MAX_NEW - 1
        accepted, drafted = accepted + stats.accepted, drafted + stats.drafted
    assert 0 < accepted < drafted, "the case should see both acceptances and rejections"


BATCH_PROMPTS = [np.random.default_rng(9).integers(3, 300, n).tolist() for n in (5, 9, 14)]
BATCH_BUDGETS = [28, 24, 19]
BATCH_SAMPLED = Sampling(temperature=0.9, top_k=40, top_p=0.95)


def _run_batch(target, draft, steps_per_call):
    """Three rows of different prompt lengths and budgets in one engine, greedy, sampled and
    greedy (k = 2); tokens per row."""
    engine = rj.Engine(
        target, max_batch=3, max_seq_len=64, draft=draft, num_draft_tokens=2,
        steps_per_call=steps_per_call,
    )  # fmt: skip
    samplings = [Sampling(), BATCH_SAMPLED, Sampling()]
    ids = [
        engine.submit(p, n, s, seed)
        for p, n, s, seed in zip(BATCH_PROMPTS, BATCH_BUDGETS, samplings, [0, 7, 0], strict=True)
    ]
    results = engine.run()
    return [results[i] for i in ids]


@pytest.fixture(scope="module")
def batch_host(target, drafts):
    return _run_batch(target, drafts["skip3"], 8)


def test_batched_rows_equal_rows_alone(target, drafts, batch_host):
    """Greedy rows equal plain greedy; the sampled row equals itself run alone, twice (its
    randomness is keyed by seed, request and position, not by the batch)."""
    for row in (0, 2):
        assert batch_host[row] == rj.generate(target, BATCH_PROMPTS[row], BATCH_BUDGETS[row])
    alone = [
        list(
            speculative_stream(
                target, BATCH_PROMPTS[1], BATCH_BUDGETS[1], BATCH_SAMPLED, 7,
                draft=drafts["skip3"], num_draft_tokens=2,
            )
        )
        for _ in range(2)
    ]  # fmt: skip
    assert batch_host[1] == alone[0] == alone[1]
    assert batch_host[1] != rj.generate(target, BATCH_PROMPTS[1], BATCH_BUDGETS[1])  # sampled


@pytest.mark.slow
def test_one_step_per_call_equals_several(target, drafts, batch_host):
    """One speculative step per device call yields the tokens of 8 per call, greedy and
    sampled rows."""
    assert _run_batch(target, drafts["skip3"], 1) == batch_host


# --- edge cases -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def full_draft(target) -> rj.Model:
    """The target itself as a layer-skip draft: greedy accepts every block (k = 4)."""
    return layer_skip_draft(target, target.config.n_layers)


def test_eos_inside_an_accepted_block_stops_there(target, full_draft, plain):
    seq = plain[1]
    # Blocks are [0], [1..5], [6..10], ...: pick a first occurrence strictly inside one.
    j = next(j for j, t in enumerate(seq) if j % 5 and seq.index(t) == j)
    eos_model = dataclasses.replace(target, tokenizer=types.SimpleNamespace(eos_id=seq[j]))
    stats = SpeculativeStats()
    out = list(speculative_stream(eos_model, PROMPTS[1], MAX_NEW, draft=full_draft, stats=stats))
    assert out == seq[: j + 1] == rj.generate(eos_model, PROMPTS[1], MAX_NEW)
    assert stats.accepted == stats.drafted  # every block accepted in full...
    assert 1 + stats.generated > stats.emitted == j + 1  # ...and the last went on past EOS


def test_max_new_tokens_mid_block_truncates(target, full_draft, plain):
    """Blocks of 5 after the first token: the fifth block (tokens 21..25) is cut at 24."""
    stats = SpeculativeStats()
    out = list(speculative_stream(target, PROMPTS[1], MAX_NEW, draft=full_draft, stats=stats))
    assert out == plain[1]
    assert stats.histogram == [0, 0, 0, 0, 5] and stats.generated == 25 and stats.emitted == 24


@pytest.fixture
def step_spy(monkeypatch) -> list[dict]:
    """Record every `run_steps` call the engine makes: lengths and active rows before,
    capacity, the spec, and a host copy of the caches after (taken before the next call
    donates them)."""
    calls = []
    run = engine_module.run_steps

    def spy(weights, rows, caches, live, *args, **kwargs):
        before, capacity = np.asarray(caches.target.lengths), caches.target.capacity
        active = np.asarray(rows.active) & live
        out = run(weights, rows, caches, live, *args, **kwargs)
        after = jax.tree.map(np.asarray, out[1])
        calls.append(
            dict(before=before, active=active, capacity=capacity, spec=kwargs["spec"], caches=after)
        )
        return out

    monkeypatch.setattr(engine_module, "run_steps", spy)
    return calls


@pytest.mark.parametrize("name", ["full", "skip1"])
def test_caches_hold_exactly_the_emitted_prefix(target, full_draft, drafts, step_spy, name):
    """After the last step both caches hold, at positions 0..n-1, the keys and values that a
    prefill of the prompt and the tokens emitted before position n gives: roll-back left no
    rejected token behind, and a fully accepted block's last draft token was fed to the
    draft (the full-depth draft accepts every block; skip1 rejects often)."""
    draft = full_draft if name == "full" else drafts["skip1"]
    out = list(speculative_stream(target, PROMPTS[1], MAX_NEW, draft=draft, num_draft_tokens=4))
    caches = step_spy[-1]["caches"]
    n = int(caches.target.lengths[0])
    assert int(caches.draft.lengths[0]) == n
    sequence = PROMPTS[1] + rj.generate(target, PROMPTS[1], 32)
    assert out == sequence[len(PROMPTS[1]) :][:MAX_NEW] and n - len(PROMPTS[1]) <= 32
    greedy = host_rows(
        [0], [True], [1], [-1], SamplingParams.from_rows([Sampling()]), [0], [0], [0]
    )
    for model, cache in ((target, caches.target), (draft, caches.draft)):
        fresh = init_cache(model.config, 1, 64)
        tokens = np.asarray([sequence[:n] + [0] * (64 - n)], np.int32)
        _, _, expected = append_and_sample(
            model.params, None, tokens, np.asarray([n], np.int32), fresh, greedy,
            StepSpec(model.config, 64),
        )  # fmt: skip
        for layer in range(model.config.n_layers):
            for kv in ("k", "v"):
                assert_close(
                    getattr(cache, kv)[layer][0, :, :n],
                    getattr(expected, kv)[layer][0, :, :n],
                    kind="op",
                    what=f"{name}: {kv} of layer {layer}",
                )


@pytest.mark.slow
def test_cache_never_exceeds_capacity_at_the_context_limit(target, full_draft, step_spy):
    """prompt + max_new_tokens = the context length: every position a step writes (up to
    n + k) and every length it leaves stay inside the cache."""
    prompt = np.random.default_rng(3).integers(3, 300, 100).tolist()
    out = list(speculative_stream(target, prompt, CONTEXT - 100, draft=full_draft))
    assert out == rj.generate(target, prompt, CONTEXT - 100)
    calls = [call for call in step_spy if call["spec"].draft is not None]  # not generate's
    assert calls
    for call in calls:  # a call dispatched after the row stopped finds it inactive
        k = call["spec"].draft.num_draft_tokens
        assert (call["before"][call["active"]] + k < call["capacity"]).all()
        caches = call["caches"]
        assert max(caches.target.lengths.max(), caches.draft.lengths.max()) <= call["capacity"]
        assert caches.target.lengths.max() <= call["spec"].attn_len


def _random_adapter(config, seed=0) -> LoraAdapter:
    """Rank-4 LoRA on every layer's q, v and down projections, strong enough to change the
    greedy output."""
    rng = np.random.default_rng(seed)
    dims = {"attn_q": (64, 64), "attn_v": (32, 64), "ffn_down": (64, 96)}  # (out, in)
    tensors = {}
    for layer in range(config.n_layers):
        for kind, (out, inn) in dims.items():
            a = rng.standard_normal((4, inn)).astype(np.float32) / np.sqrt(inn)
            b = rng.standard_normal((out, 4)).astype(np.float32)
            tensors[f"blk.{layer}.{kind}.weight"] = (a, b, 0.5)
    return adapter_from_tensors(config, tensors)


@pytest.mark.parametrize("strategy", [pytest.param("unmerged", marks=pytest.mark.slow), "merged"])
def test_layer_skip_draft_runs_the_requests_adapter(target, full_draft, plain, strategy):
    """With an adapter the output is the adapted target's greedy output, and a layer-skip
    draft runs the adapter on its layers (merged weights, or the stack's layers): at full
    depth it is then the adapted target itself and every draft token is accepted. The
    control: the target as a separate draft model runs without the adapter, and is rejected
    where the adapter changes the argmax."""
    adapter = _random_adapter(target.config)
    expected = rj.generate(target, PROMPTS[0], MAX_NEW, adapter=adapter, lora_strategy=strategy)
    assert expected != plain[0]
    for draft, accepts_all in ((full_draft, True), (target, False)):
        stats = SpeculativeStats()
        out = speculative_stream(
            target, PROMPTS[0], MAX_NEW, draft=draft, num_draft_tokens=2, adapter=adapter,
            lora_strategy=strategy, stats=stats,
        )  # fmt: skip
        assert list(out) == expected
        assert stats.drafted > 0 and (stats.accepted == stats.drafted) == accepts_all


# --- drafts and validation -------------------------------------------------------------------


def test_layer_skip_draft_shares_the_targets_arrays(target):
    draft = layer_skip_draft(target, 3)
    assert draft.config == dataclasses.replace(target.config, n_layers=3)
    assert len(draft.params.layers) == 3
    assert all(a is b for a, b in zip(draft.params.layers, target.params.layers[:3], strict=True))
    for field in ("embed", "final_norm", "output"):
        assert getattr(draft.params, field) is getattr(target.params, field)
    stacked = _model(target.config, random_tensors(target.config), stacked=True)
    leaves = jax.tree.leaves(layer_skip_draft(stacked, 2).params.layers)
    assert all(leaf.shape[0] == 2 for leaf in leaves)


@pytest.mark.parametrize("num_layers", [0, 5, -1, True, 1.5, "2", None])
def test_layer_skip_draft_rejects_bad_depths(target, num_layers):
    with pytest.raises(RealmError, match="num_layers"):
        layer_skip_draft(target, num_layers)


def test_bad_drafts_and_options_raise(target, drafts):
    other = _model(tiny(vocab_size=301), random_tensors(tiny(vocab_size=301)))
    with pytest.raises(RealmError, match="vocabulary of 301 tokens"):
        list(speculative_stream(target, PROMPTS[0], 4, draft=other))
    with pytest.raises(RealmError, match="rj.Model"):
        list(speculative_stream(target, PROMPTS[0], 4, draft=target.params))
    with pytest.raises(RealmError, match="rj.Model"):
        layer_skip_draft(target.params, 1)
    for k in (0, -2, True, 2.0):
        with pytest.raises(RequestError, match="num_draft_tokens"):
            list(
                speculative_stream(target, PROMPTS[0], 4, draft=drafts["skip1"], num_draft_tokens=k)
            )
    with pytest.raises(RequestError, match="context length"):
        list(speculative_stream(target, PROMPTS[0], CONTEXT, draft=drafts["skip1"]))
    with pytest.raises(RequestError, match="max_new_tokens"):
        list(speculative_stream(target, PROMPTS[0], 0, draft=drafts["skip1"]))
    other_target = _model(target.config, random_tensors(target.config, seed=3))
    with pytest.raises(RealmError, match="layer-skip draft"):
        rj.Engine(target, 2, 64, draft=layer_skip_draft(_model(tiny(), random_tensors(tiny())), 1))
    rj.Engine(target, 2, 64, draft=layer_skip_draft(other_target, 1))  # same config: a draft


# --- sampling is lossless: exact enumeration in float64 --------------------------------------

# name -> (temperature, top_k, top_p); greedy included (a one-hot p and q).
EXACT_SETTINGS = {
    "greedy": (0.0, 0, 1.0),
    "t1": (1.0, 0, 1.0),
    "t0.6_top_k3": (0.6, 3, 1.0),
    "top_p0.7": (1.0, 0, 0.7),
    "combined": (1.3, 4, 0.9),
}
EXACT_ATOL = 1e-12


def _emitted_distribution(target_fn, draft_fn, context, k, horizon, residual):
    """{first `horizon` emitted tokens: probability} under repeated speculative steps."""
    memo = {}

    def dist(ctx, m):
        if m == 0:
            return {(): 1.0}
        if (ctx, m) not in memo:
            out = {}
            blocks = speculative_block_reference(target_fn, draft_fn, ctx, k, residual)
            for block, weight in blocks.items():
                tails = {(): 1.0} if len(block) >= m else dist(ctx + block, m - len(block))
                for tail, w in tails.items():
                    seq = (block + tail)[:m]
                    out[seq] = out.get(seq, 0.0) + weight * w
            memo[ctx, m] = out
        return memo[ctx, m]

    return dist(tuple(context), horizon)


def _autoregressive(target_fn, context, horizon):
    """{horizon tokens: probability} of plain sampling from the target."""
    out = {(): 1.0}
    for _ in range(horizon):
        nxt = {}
        for seq, w in out.items():
            probs = target_fn(tuple(context) + seq)
            for token in np.flatnonzero(probs):
                nxt[(*seq, int(token))] = w * probs[token]
        out = nxt
    return out


def _max_gap(a: dict, b: dict) -> float:
    return max(abs(a.get(s, 0.0) - b.get(s, 0.0)) for s in set(a) | set(b))


def _table_fns(setting):
    """A target and a correlated draft whose next-token logits depend on the last two tokens
    (V = 5), as float64 probability functions of the context under `setting`."""
    v = 5
    rng = np.random.default_rng(0)
    target_logits = 1.5 * rng.standard_normal((v + 1, v, v))  # [prev2 or start, prev1, V]
    draft_logits = target_logits + 0.8 * rng.standard_normal((v + 1, v, v))

    def fn(table):
        @functools.cache
        def probs(ctx):
            row = table[ctx[-2] if len(ctx) > 1 else v, ctx[-1]]
            return sampling_probs_reference(row, *setting)

        return probs

    return fn(target_logits), fn(draft_logits)


@pytest.mark.parametrize("k", [1, 2, 3, 4])
@pytest.mark.parametrize("setting", list(EXACT_SETTINGS))
def test_emitted_tokens_have_the_target_distribution_exactly(k, setting):
    """Every draft / accept / reject path of repeated steps, enumerated in float64: the first
    3 emitted tokens have the target's autoregressive distribution to 1e-12."""
    target_fn, draft_fn = _table_fns(EXACT_SETTINGS[setting])
    spec = _emitted_distribution(target_fn, draft_fn, (1,), k, 3, residual_probs_reference)
    exact = _autoregressive(target_fn, (1,), 3)
    assert abs(sum(spec.values()) - 1.0) < EXACT_ATOL
    assert _max_gap(spec, exact) < EXACT_ATOL
    if setting != "greedy":  # the draft differs from the target: rejections happen
        block = speculative_block_reference(target_fn, draft_fn, (1,), k)
        assert sum(w for b, w in block.items() if len(b) <= k) > 0.01


def test_exact_check_detects_a_wrong_residual():
    """Positive control: resampling a rejection from p instead of norm(max(p - q, 0)) (a
    common bug) is off by far more than the tolerance."""
    target_fn, draft_fn = _table_fns(EXACT_SETTINGS["t1"])
    wrong = _emitted_distribution(target_fn, draft_fn, (1,), 2, 3, lambda p, q: p)
    assert _max_gap(wrong, _autoregressive(target_fn, (1,), 3)) > 1e-3


def _model_fns(config, tensors, draft_layers, setting):
    """float64 probability functions of a real (reference) model and its layer-skip draft."""

    def fn(cfg):
        @functools.cache
        def logits(ctx):
            return forward_reference(cfg, tensors, list(ctx))[-1]

        return lambda ctx: sampling_probs_reference(logits(ctx), *setting)

    return fn(config), fn(dataclasses.replace(config, n_layers=draft_layers))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exact_on_a_tiny_model_and_its_layer_skip_draft(k):
    """The same enumeration with the float64 forward of a 2-layer model (V = 4) and its
    1-layer draft, under top-k + top-p + temperature. Untied: a random output matrix gives
    spread-out distributions (tied embeddings make this model's nearly one-hot)."""
    config = tiny(vocab_size=4, n_layers=2, tied_embeddings=False)
    tensors = random_tensors(config, seed=2)
    target_fn, draft_fn = _model_fns(config, tensors, 1, (1.3, 3, 0.9))
    context = (0, 3, 2)
    spec = _emitted_distribution(target_fn, draft_fn, context, k, 2, residual_probs_reference)
    assert _max_gap(spec, _autoregressive(target_fn, context, 2)) < EXACT_ATOL
    block = speculative_block_reference(target_fn, draft_fn, context, k)
    assert sum(w for b, w in block.items() if len(b) <= k) > 0.1  # rejections carry weight


# --- sampling is lossless: the jitted step, empirically -------------------------------------

N = 20_000
ALPHA = 1e-3
V_SMALL = 6
STEP_K = 2
CHI2_PROMPT = (1, 4, 0, 5)
FIRST = 3  # the emitted token at the prompt's end, fixed so every row shares its context
# name -> (temperature, top_k, top_p)
CHI2_SETTINGS = {"t1": (1.0, 0, 1.0), "t0.8_top_k3": (0.8, 3, 1.0), "top_p0.8": (1.0, 0, 0.8)}


@pytest.fixture(scope="module")
def small_pair():
    """A 2-layer target and an unrelated 1-layer draft, V = 6 (as models and tensors)."""
    # Untied: a random [V, D] output gives logits of order 1 (tied embeddings would make the
    # distributions nearly one-hot and the test blind).
    config = tiny(vocab_size=V_SMALL, n_layers=2, tied_embeddings=False)
    draft_config = tiny(vocab_size=V_SMALL, n_layers=1, tied_embeddings=False)
    tensors = random_tensors(config, seed=21)
    draft_tensors = random_tensors(draft_config, seed=22)
    return (
        (_model(config, tensors), config, tensors),
        (_model(draft_config, draft_tensors), draft_config, draft_tensors),
    )


def _exact_pairs(small_pair, setting, residual=residual_probs_reference) -> np.ndarray:
    """[V, V] float64 distribution of the first two tokens after FIRST, via the enumeration
    with the models' float64 forwards (`residual` as given: the right one gives the target's
    autoregressive distribution, as the exact tests show)."""
    (_, config, tensors), (_, draft_config, draft_tensors) = small_pair

    def fn(cfg, ts):
        @functools.cache
        def probs(ctx):
            return sampling_probs_reference(forward_reference(cfg, ts, list(ctx))[-1], *setting)

        return probs

    target_fn, draft_fn = fn(config, tensors), fn(draft_config, draft_tensors)
    dist = _emitted_distribution(target_fn, draft_fn, (*CHI2_PROMPT, FIRST), STEP_K, 2, residual)
    table = np.zeros((V_SMALL, V_SMALL))
    for (a, b), w in dist.items():
        table[a, b] = w
    return table


def _draw_pairs(small_pair, setting, step) -> np.ndarray:
    """[V, V] counts of the first two tokens emitted after FIRST by N rows (seeds 0..N-1)
    running `step` (a jitted speculative step and the stop rule) until each row has two."""
    (target, _, _), (draft, _, _) = small_pair
    t = len(CHI2_PROMPT)
    tokens = np.asarray([CHI2_PROMPT], np.int32)
    greedy = host_rows(
        [0], [True], [1], [-1], SamplingParams.from_rows([Sampling()]), [0], [0], [0]
    )
    caches = []
    for m in (target, draft):  # prefill one row, then repeat it N times
        cache = init_cache(m.config, 1, 16)
        _, _, cache = append_and_sample(
            m.params, None, tokens, np.asarray([t], np.int32), cache, greedy, StepSpec(m.config, t)
        )
        caches.append(jax.tree.map(lambda x: jnp.repeat(x, N, axis=0), cache))
    caches = Caches(*caches)
    zeros = np.zeros(N, np.int32)
    sampling = SamplingParams.from_rows([Sampling(*setting)] * N)
    rows = host_rows(
        np.full(N, FIRST), np.ones(N, bool), np.full(N, 2), np.full(N, -1), sampling,
        np.arange(N), zeros, zeros,
    )  # fmt: skip
    spec = StepSpec(target.config, 16, "xla", draft_spec(draft, STEP_K))
    weights = Weights(target.params, draft=draft.params)
    out = np.full((N, 2), -1)
    count = np.zeros(N, int)
    while (count < 2).any():
        rows, caches, emitted, keep = step(weights, rows, caches, spec=spec)
        emitted, keep = np.asarray(emitted), np.asarray(keep)
        for row in np.flatnonzero(keep):
            out[row, count[row] : count[row] + keep[row]] = emitted[row, : keep[row]]
            count[row] += keep[row]
    return np.bincount(out[:, 0] * V_SMALL + out[:, 1], minlength=V_SMALL**2).reshape(
        V_SMALL, V_SMALL
    )


def _jitted_step():
    """A fresh jit (its trace cache is keyed by the function) of one speculative step and
    the stop rule, as `run_steps`' body runs them."""

    def step(weights, rows, caches, *, spec):
        caches, emitted, accepted = speculative.speculative_step(weights, rows, caches, spec)
        rows, keep = emit(rows, emitted, jnp.where(rows.active, accepted + 1, 0))
        return rows, caches, emitted, keep

    return jax.jit(step, static_argnames=("spec",))


def _chi_square(counts: np.ndarray, exact: np.ndarray) -> tuple[float, int, int]:
    """(p-value, df, draws outside the support): Pearson's test over the exact support, the
    bins expected below 5 pooled into one."""
    counts, exact = counts.ravel(), exact.ravel()
    support = exact > 0
    expected = counts.sum() * exact
    small = support & (expected < 5)
    obs = np.append(counts[support & ~small], counts[small].sum())
    exp = np.append(expected[support & ~small], expected[small].sum())
    obs, exp = (obs, exp) if exp[-1] > 0 else (obs[:-1], exp[:-1])
    statistic = float(np.sum((obs - exp) ** 2 / exp))
    df = len(exp) - 1
    return chi2_sf(statistic, df), df, int(counts[~support].sum())


def _power(exact: np.ndarray, alternative: np.ndarray, df: int) -> float:
    """Probability that the test at ALPHA rejects when draws follow `alternative`: noncentral
    chi-square with lambda = N sum((alt - exact)^2 / exact), simulated (100k draws)."""
    support = exact > 0
    lam = N * np.sum((alternative[support] - exact[support]) ** 2 / exact[support])
    draws = np.random.default_rng(0).noncentral_chisquare(df, lam, size=100_000)
    return float(np.mean(draws > chi2_critical(df, ALPHA)))


@pytest.fixture(scope="module")
def jitted_step():
    return _jitted_step()


@pytest.mark.slow
@pytest.mark.parametrize("setting", list(CHI2_SETTINGS))
def test_jitted_step_draws_the_target_distribution(small_pair, jitted_step, setting):
    """The first two tokens emitted by the jitted step (k = 2; N = 20000 rows, seeds 0..N-1)
    against the target's exact two-token distribution (36 cells).

    Test: Pearson chi-square at alpha = 1e-3 per setting (3e-3 over the three), df = cells
    in the support (bins expected below 5 pooled) - 1, and no draw outside the support.
    Power: against the planted bug of `test_jitted_step_with_a_wrong_residual_fails` (a
    rejection resampled from p) the test rejects with probability >= 0.99 in each setting,
    computed here from the exact wrong distribution (noncentral chi-square); in general any
    alternative with lambda = N sum((q - p)^2 / p) >= 4 N TV^2 above ~70 (df <= 35), i.e.
    total variation >= ~0.03, is detected with >= 99% probability.
    """
    exact = _exact_pairs(small_pair, CHI2_SETTINGS[setting])
    assert abs(exact.sum() - 1) < EXACT_ATOL
    counts = _draw_pairs(small_pair, CHI2_SETTINGS[setting], jitted_step)
    p_value, df, outside = _chi_square(counts, exact)
    assert outside == 0
    assert p_value > ALPHA, f"{setting}: chi-square p = {p_value:.2e} (df {df})"
    wrong = _exact_pairs(small_pair, CHI2_SETTINGS[setting], lambda p, q: p)
    assert _power(exact, wrong, df) >= 0.99


@pytest.mark.slow
def test_jitted_step_with_a_wrong_residual_fails(small_pair, monkeypatch):
    """Positive control: the same test on a step whose rejections resample from p rejects."""
    monkeypatch.setattr(speculative, "residual_probs", lambda target, draft: target)
    wrong_step = _jitted_step()
    setting = CHI2_SETTINGS["t1"]
    counts = _draw_pairs(small_pair, setting, wrong_step)
    p_value, _, _ = _chi_square(counts, _exact_pairs(small_pair, setting))
    assert p_value < ALPHA


# --- the real model ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def smollm2_stacked(smollm2):
    """The real model with its layers stacked under `lax.scan`: the same function (the layouts
    agree, test_model.py), compiled in a fraction of the time, so the real-model speculative
    tests cover both layouts for less CI time than one."""
    return rj.Model(smollm2.config, stack_layers(smollm2.params), smollm2.tokenizer, smollm2.path)


@pytest.mark.model
@pytest.mark.parametrize(("depth", "k", "layout"), [(26, 2, "unrolled"), (12, 8, "stacked")])
def test_real_model_greedy_equals_golden(request, golden, depth, k, layout):
    """SmolLM2 with its first `depth` layers as the draft: the golden greedy continuations
    (HF's, which plain `rj.generate` reproduces), token for token."""
    model = request.getfixturevalue("smollm2" if layout == "unrolled" else "smollm2_stacked")
    draft = layer_skip_draft(model, depth)
    for name in ("capital", "once"):  # one prompt bucket and cache shape: one compilation
        ids = golden[f"ids_{name}"].tolist()
        out = speculative_stream(model, ids, 32, stop_at_eos=False, draft=draft, num_draft_tokens=k)
        assert list(out) == golden[f"gen_{name}"].tolist(), name


@pytest.mark.model
def test_real_model_batched_equals_golden(smollm2_stacked, golden):
    """Four prompts of 4 to 46 tokens in one batch (draft: 26 layers, k = 3), layers stacked."""
    names = ["capital", "once", "code", "chat"]
    prompts = [golden[f"ids_{name}"].tolist() for name in names]
    draft = layer_skip_draft(smollm2_stacked, 26)
    engine = rj.Engine(smollm2_stacked, 4, 128, draft=draft, num_draft_tokens=3)
    ids = [engine.submit(prompt, 32, stop_at_eos=False) for prompt in prompts]
    results = engine.run()
    rows = [results[i] for i in ids]
    for name, out in zip(names, rows, strict=True):
        assert out == golden[f"gen_{name}"].tolist(), name
