"""The continuous batching engine: batch invariance against `rj.generate` alone, every
request finishing exactly once, and bad requests failing alone."""

import numpy as np
import pytest

import realm_jax as rj
from realm_jax.config import tiny
from realm_jax.lora.adapters import adapter_from_tensors
from realm_jax.testing import random_tensors, write_gguf

CONTEXT = 128


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    config = tiny(vocab_size=300, context_length=CONTEXT)
    path = tmp_path_factory.mktemp("engine") / "tiny.gguf"
    write_gguf(path, config, random_tensors(config, seed=7), qtype="F32")
    return rj.load_model(path)


def _requests(model, count, seed, sampled=False):
    """Random prompts (1..40 tokens) and budgets (1..16 tokens); some sampled."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(count):
        prompt = rng.integers(3, model.config.vocab_size, rng.integers(1, 41)).tolist()
        sampling = rj.Sampling()
        if sampled and i % 2:
            sampling = rj.Sampling(temperature=0.9, top_k=int(rng.integers(0, 50)), top_p=0.95)
        out.append(
            dict(
                ids=prompt,
                max_new_tokens=int(rng.integers(1, 17)),
                sampling=sampling,
                seed=int(rng.integers(0, 1000)),
            )
        )
    return out


def _alone(model, requests):
    return [
        rj.generate(model, r["ids"], r["max_new_tokens"], r["sampling"], r["seed"])
        for r in requests
    ]


def _serve(engine, requests, schedule_seed):
    """Submit in a random order, some up front and the rest while the engine runs."""
    rng = np.random.default_rng(schedule_seed)
    order = rng.permutation(len(requests)).tolist()
    upfront = int(rng.integers(1, len(order) + 1))
    ids = {}
    for i in order[:upfront]:
        ids[i] = engine.submit(**requests[i])
    late = order[upfront:]
    done = {}
    for event in engine.stream():
        if event.done:
            done[event.request_id] = done.get(event.request_id, 0) + 1
        if late and rng.random() < 0.3:
            i = late.pop(0)
            ids[i] = engine.submit(**requests[i])
    for i in late:  # whatever the stream ended before submitting
        ids[i] = engine.submit(**requests[i])
    results = engine.run()
    assert all(count == 1 for count in done.values())
    return [results[ids[i]] for i in range(len(requests))]


@pytest.mark.parametrize("max_batch", [1, 3, 4])
def test_greedy_and_sampled_requests_equal_generate_alone(model, max_batch):
    requests = _requests(model, 10, seed=max_batch, sampled=True)
    expected = _alone(model, requests)
    engine = rj.Engine(model, max_batch=max_batch, max_seq_len=64)
    for schedule in range(3):
        assert _serve(engine, requests, schedule) == expected, f"schedule {schedule}"
    assert engine.pending == 0


def test_top_k_1_is_greedy_in_a_batch_that_switches_to_filtering(model):
    """A hot sampled request with top_k = 1 must decode exactly as greedy, whether it joins an
    engine that has only served greedy batches (whose programs have no top-k search) or one
    already filtering; without its top-k cut, temperature 5 would wander off the argmax."""
    requests = _requests(model, 4, seed=21)
    hot = dict(requests[0], sampling=rj.Sampling(temperature=5.0, top_k=1), max_new_tokens=16)
    greedy = rj.generate(model, hot["ids"], 16, seed=hot["seed"])
    assert rj.generate(model, **dict(hot, sampling=rj.Sampling(temperature=5.0))) != greedy
    engine = rj.Engine(model, max_batch=2, max_seq_len=64)
    ids = [engine.submit(**r) for r in requests[1:]]
    assert engine.step()  # a greedy-only batch first: its programs have no top-k search
    late = engine.submit(**hot)
    results = engine.run()
    assert results[late] == greedy
    assert [results[i] for i in ids] == _alone(model, requests[1:])


def test_a_long_running_neighbour_does_not_change_outputs(model):
    requests = _requests(model, 6, seed=11)
    expected = _alone(model, requests)
    engine = rj.Engine(model, max_batch=3, max_seq_len=CONTEXT)
    long_prompt = list(range(3, 90))
    neighbour = engine.submit(long_prompt, max_new_tokens=30, stop_at_eos=False)
    ids = [engine.submit(**r) for r in requests]
    results = engine.run()
    assert [results[i] for i in ids] == expected
    assert len(results[neighbour]) == 30
    assert results[neighbour] == rj.generate(model, long_prompt, 30, stop_at_eos=False)


def test_every_request_finishes_exactly_once_under_random_cancellation(model):
    rng = np.random.default_rng(0)
    engine = rj.Engine(model, max_batch=4, max_seq_len=64)
    submitted, done_events, tokens = [], {}, {}
    requests = _requests(model, 300, seed=5, sampled=True)
    pending = list(requests)
    for r in pending[:20]:
        submitted.append(engine.submit(**r))
    pending = pending[20:]
    while engine.pending or pending:
        for event in engine.step():
            if event.token is not None:
                tokens.setdefault(event.request_id, []).append(event.token)
            if event.done:
                done_events[event.request_id] = done_events.get(event.request_id, 0) + 1
        for _ in range(int(rng.integers(0, 4))):
            if pending:
                submitted.append(engine.submit(**pending.pop(0)))
        if submitted and rng.random() < 0.4:  # cancel any id, finished ones included
            engine.cancel(int(rng.choice(submitted)))
    results = engine.run()
    assert sorted(results) == sorted(submitted) == sorted(done_events)
    assert set(done_events.values()) == {1}
    for rid, new in results.items():
        assert new == tokens.get(rid, [])
        assert len(new) <= requests[rid]["max_new_tokens"]
    assert engine.pending == 0


def test_bad_requests_fail_alone(model):
    engine = rj.Engine(model, max_batch=2, max_seq_len=32)
    good = _requests(model, 3, seed=3)
    good = [dict(r, ids=r["ids"][:10]) for r in good]
    ids = [engine.submit(**good[0])]
    bad = [
        dict(ids=[]),  # empty prompt
        dict(ids=[1, 2, model.config.vocab_size]),  # outside the vocabulary
        dict(ids=[5] * 30, max_new_tokens=3),  # beyond max_seq_len
        dict(ids=[5], max_new_tokens=-1),
        dict(ids=[5], sampling=dict(temperature=1.0)),  # not an rj.Sampling
        dict(ids=[5], seed=-1),
        dict(ids=[5], adapter="nobody"),  # unknown tenant
    ]
    for kwargs in bad:
        with pytest.raises(rj.RequestError):
            engine.submit(**kwargs)
        ids.append(engine.submit(**good[len(ids) % 3]))
    results = engine.run()
    assert [results[i] for i in ids] == [_alone(model, [good[i % 3]])[0] for i in range(len(ids))]
    with pytest.raises(rj.RequestError):
        rj.Sampling(temperature=-1.0)
    for never_issued in (-1, len(ids), "0", True):  # finished ids (all of `ids`) are accepted
        with pytest.raises(rj.RequestError, match="unknown request id"):
            engine.cancel(never_issued)
    for rid in ids:
        engine.cancel(rid)
    assert engine.pending == 0 and engine.run() == {}  # nothing left to run or to end again


def test_engine_sizes_are_validated(model):
    with pytest.raises(rj.RealmError, match="max_batch"):
        rj.Engine(model, max_batch=0)
    with pytest.raises(rj.RealmError, match="max_seq_len"):
        rj.Engine(model, max_batch=2, max_seq_len=CONTEXT + 1)


def _random_adapter(model, seed, rank=4):
    """A strong random LoRA on q, v, output and down projections (changes greedy outputs)."""
    c = model.config
    rng = np.random.default_rng(seed)
    dims = dict(
        attn_q=(c.dim, c.n_heads * c.head_dim),
        attn_v=(c.dim, c.n_kv_heads * c.head_dim),
        attn_output=(c.n_heads * c.head_dim, c.dim),
        ffn_down=(c.ffn_dim, c.dim),
    )
    tensors = {}
    for i in range(c.n_layers):
        for kind, (n_in, n_out) in dims.items():
            a = rng.standard_normal((rank, n_in)) / np.sqrt(n_in)
            b = 0.3 * rng.standard_normal((n_out, rank))
            tensors[f"blk.{i}.{kind}.weight"] = (a.astype(np.float32), b.astype(np.float32), 2.0)
    return adapter_from_tensors(c, tensors)


def test_tenants_share_decode_steps_and_equal_generate_alone(model):
    tenants = {"a": _random_adapter(model, 1), "b": _random_adapter(model, 2, rank=8)}
    requests = _requests(model, 9, seed=21, sampled=True)
    names = [None, "a", "b"] * 3
    expected = [
        rj.generate(model, r["ids"], r["max_new_tokens"], r["sampling"], r["seed"],
                    adapter=tenants[n] if n else None)
        for r, n in zip(requests, names, strict=True)
    ]  # fmt: skip
    base = _alone(model, requests)
    assert any(e != b for e, b, n in zip(expected, base, names, strict=True) if n)
    engine = rj.Engine(model, max_batch=4, max_seq_len=64)
    for name, adapter in tenants.items():
        engine.add_adapter(name, adapter)
    ids = [engine.submit(**r, adapter=n) for r, n in zip(requests, names, strict=True)]
    results = engine.run()
    assert [results[i] for i in ids] == expected


def test_adapters_added_and_removed_while_running(model):
    a, b, c = (_random_adapter(model, seed) for seed in (3, 4, 5))
    requests = _requests(model, 6, seed=31)
    engine = rj.Engine(model, max_batch=2, max_seq_len=64)
    engine.add_adapter("a", a)
    with pytest.raises(rj.AdapterError, match="already registered"):
        engine.add_adapter("a", b)
    first = [engine.submit(**r, adapter="a") for r in requests[:3]]
    later = []
    for _ in engine.stream():
        if not later:
            engine.add_adapter("b", b)  # joins while "a" requests run
            later = [engine.submit(**r, adapter="b") for r in requests[3:]]
            with pytest.raises(rj.AdapterError, match="still used"):
                engine.remove_adapter("a")
    results = engine.run()
    expected = [rj.generate(model, **r, adapter=a) for r in requests[:3]]
    expected += [rj.generate(model, **r, adapter=b) for r in requests[3:]]
    assert [results[i] for i in first + later] == expected
    slots = engine._stack.num_adapters
    engine.remove_adapter("a")  # no request uses it any more
    with pytest.raises(rj.RequestError, match="unknown adapter"):
        engine.submit([5, 6], max_new_tokens=4, adapter="a")
    engine.add_adapter("c", c)  # reuses the freed slot: the steps keep their shapes
    assert engine._stack.num_adapters == slots and engine.adapters == ["b", "c"]
    rid = engine.submit(**requests[0], adapter="c")
    assert engine.run()[rid] == rj.generate(model, **requests[0], adapter=c)
    with pytest.raises(rj.AdapterError, match="unknown adapter"):
        engine.remove_adapter("a")


def test_speculative_engine_equals_plain_greedy_and_speculative_sampling_alone(model):
    draft = rj.layer_skip_draft(model, 1)
    requests = _requests(model, 8, seed=41, sampled=True)
    engine = rj.Engine(model, max_batch=3, max_seq_len=64, draft=draft, num_draft_tokens=3)
    ids = [engine.submit(**r) for r in requests]
    results = engine.run()
    for rid, r in zip(ids, requests, strict=True):
        if r["sampling"].temperature == 0:  # greedy: exactly plain greedy decoding
            expected = rj.generate(model, r["ids"], r["max_new_tokens"], seed=r["seed"])
        else:  # sampled: the same draws as speculative decoding of the request alone
            expected = rj.generate(model, **r, draft=draft, num_draft_tokens=3)
        assert results[rid] == expected, rid


def test_full_composition_tenants_speculation_continuous_batching(model):
    """A greedy request served in a continuous batch, beside other tenants' adapters, with
    speculative decoding on, equals the same request alone with its adapter merged."""
    tenants = {"a": _random_adapter(model, 6), "b": _random_adapter(model, 7, rank=2)}
    draft = rj.layer_skip_draft(model, 1)
    engine = rj.Engine(model, max_batch=3, max_seq_len=64, draft=draft, num_draft_tokens=2)
    for name, adapter in tenants.items():
        engine.add_adapter(name, adapter)
    requests = _requests(model, 7, seed=51, sampled=True)
    names = ["a", "b", None, "a", None, "b", "a"]
    ids = [engine.submit(**r, adapter=n) for r, n in zip(requests, names, strict=True)]
    results = engine.run()
    target = ids[0]  # greedy, tenant "a", among sampled neighbours of other tenants
    assert requests[0]["sampling"].temperature == 0
    merged = rj.Model(model.config, rj.merge_adapter(model.params, tenants["a"]), model.tokenizer)
    r = requests[0]
    assert results[target] == rj.generate(merged, r["ids"], r["max_new_tokens"])
    for rid, r, n in zip(ids, requests, names, strict=True):
        if r["sampling"].temperature == 0:
            adapter = tenants[n] if n else None
            assert results[rid] == rj.generate(model, **r, adapter=adapter)


def test_speculative_engine_rejects_a_draft_with_another_vocabulary(model, tmp_path):
    config = tiny(vocab_size=290, context_length=CONTEXT)
    path = tmp_path / "other.gguf"
    write_gguf(path, config, random_tensors(config, seed=1), qtype="F32")
    with pytest.raises(rj.RealmError, match="vocabulary"):
        rj.Engine(model, max_batch=2, max_seq_len=32, draft=rj.load_model(path))
    with pytest.raises(rj.RealmError, match="num_draft_tokens"):
        rj.Engine(model, max_batch=2, max_seq_len=32, draft=model, num_draft_tokens=0)
