"""The one driver: a batched Engine gives each request what `rj.generate` gives it alone, at
any number of steps per device call, with adapters and drafts, and EOS inside a call; and
after `Engine.warmup()` a randomized serving mix compiles nothing."""

import copy
import dataclasses

import jax
import numpy as np
import pytest
from jax._src.dispatch import BACKEND_COMPILE_EVENT
from test_engine import _random_adapter
from test_speculative import _damped_tensors

import realm_jax as rj
from realm_jax.config import tiny
from realm_jax.steps import loop, state
from realm_jax.testing import write_gguf

CONTEXT = 512


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """4 layers, untied, blocks damped (test_speculative): outputs that vary token to token,
    so that feeding a row the wrong token changes what follows."""
    config = tiny(vocab_size=300, n_layers=4, tied_embeddings=False, context_length=CONTEXT)
    path = tmp_path_factory.mktemp("driver") / "tiny.gguf"
    write_gguf(path, config, _damped_tensors(config, seed=11), qtype="F32")
    return rj.load_model(path)


@pytest.fixture(scope="module")
def adapters(model):
    return {"a": _random_adapter(model, 1), "b": _random_adapter(model, 2, rank=8)}


SAMPLED = rj.Sampling(temperature=0.9, top_k=40, top_p=0.95)


def _mix(model, count, seed, max_prompt=40, max_budget=20):
    """Requests with random prompts and budgets, greedy and sampled, on no adapter, "a" or
    "b" in turn."""
    rng = np.random.default_rng(seed)
    return [
        dict(
            ids=rng.integers(3, model.config.vocab_size, rng.integers(1, max_prompt + 1)).tolist(),
            max_new_tokens=int(rng.integers(1, max_budget + 1)),
            sampling=SAMPLED if i % 2 else rj.Sampling(),
            seed=int(rng.integers(0, 1000)),
            adapter=(None, "a", "b")[i % 3],
        )
        for i in range(count)
    ]


@pytest.fixture(scope="module")
def eos_model(model, adapters):
    """The model with an EOS id that the mix's outputs (plain, no EOS stop) meet inside: the
    token whose first occurrence falls strictly inside the most outputs."""
    full = [
        rj.generate(model, **dict(r, adapter=adapters.get(r["adapter"])), stop_at_eos=False)
        for r in _mix(model, 8, seed=1)
    ]
    inside = [t for out in full for j, t in enumerate(out) if 0 < j < len(out) - 1]
    tokens = sorted(
        set(inside), key=lambda t: -sum(t in out[1:-1] and t not in out[:1] for out in full)
    )
    tokenizer = copy.copy(model.tokenizer)
    tokenizer.eos_id = int(tokens[0])
    return dataclasses.replace(model, tokenizer=tokenizer), full


def _alone(model, requests, adapters, **kwargs):
    """Each request through `rj.generate` alone."""
    return [
        rj.generate(model, **dict(r, adapter=adapters.get(r["adapter"])), **kwargs)
        for r in requests
    ]


def _served(model, requests, adapters, **engine_kwargs):
    """All requests through one Engine (max_batch 3: they queue and join as slots free)."""
    engine = rj.Engine(model, max_batch=3, max_seq_len=64, **engine_kwargs)
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    ids = [engine.submit(**r) for r in requests]
    results = engine.run()
    return [results[i] for i in ids]


def _check_stops_at_eos(outputs, full, eos):
    """Each output is its request's full output cut right after its first EOS."""
    for i, (out, whole) in enumerate(zip(outputs, full, strict=True)):
        expected = whole[: whole.index(eos) + 1] if eos in whole else whole
        assert out == expected, f"request {i}: {out} != {expected}"


@pytest.mark.parametrize("steps_per_call", [1, 3, 8])
def test_engine_equals_generate_alone(eos_model, adapters, steps_per_call):
    """Greedy and sampled requests of three tenants, batched in an engine at 1, 3 and 8 steps
    per call: each equals `rj.generate` alone and stops right after EOS, which comes up
    inside a call for several of them."""
    model, full = eos_model
    eos = model.tokenizer.eos_id
    requests = _mix(model, 8, seed=1)
    firsts = [out.index(eos) for out in full if eos in out[:-1]]  # EOS before the end
    assert len(firsts) >= 2
    # token 0 comes from the prefill, then calls of steps_per_call tokens: EOS at j stops the
    # row inside its call unless j is a call's last token
    assert steps_per_call == 1 or any((j - 1) % steps_per_call < steps_per_call - 1 for j in firsts)
    served = _served(model, requests, adapters, steps_per_call=steps_per_call)
    assert served == _alone(model, requests, adapters)
    _check_stops_at_eos(served, full, eos)


@pytest.mark.parametrize("steps_per_call", [1, 3, 8])
def test_speculative_engine_equals_generate_alone(eos_model, adapters, steps_per_call):
    """The same with a layer-skip draft (k = 2, drafting with each row's adapter): greedy rows
    equal plain greedy decoding, sampled rows the same request alone with the draft."""
    model, full = eos_model
    requests = _mix(model, 8, seed=1)
    draft = rj.layer_skip_draft(model, 1)
    speculative = dict(draft=draft, num_draft_tokens=2)
    served = _served(model, requests, adapters, steps_per_call=steps_per_call, **speculative)
    assert served == _alone(model, requests, adapters, **speculative)
    greedy = [i for i, r in enumerate(requests) if r["sampling"].temperature == 0]
    _check_stops_at_eos(
        [served[i] for i in greedy], [full[i] for i in greedy], model.tokenizer.eos_id
    )


@pytest.mark.parametrize("draft", [None, 1])
def test_the_eos_check_fails_when_rows_do_not_stop_at_eos(eos_model, adapters, monkeypatch, draft):
    """Positive control: with a stop rule that ignores stop ids (each row runs to its budget)
    the engine's output is no longer cut at EOS, and the check above fails."""
    model, full = eos_model
    emit = state.emit

    def ignoring_stop_ids(rows, emitted, counts):
        return emit(dataclasses.replace(rows, stop_ids=rows.stop_ids * 0 - 1), emitted, counts)

    jax.clear_caches()  # the loop's programs were traced with the real rule
    monkeypatch.setattr(loop, "emit", ignoring_stop_ids)
    kwargs = {} if draft is None else dict(draft=rj.layer_skip_draft(model, draft))
    requests = [dict(r, sampling=rj.Sampling()) for r in _mix(model, 8, seed=1)]
    served = _served(model, requests, adapters, steps_per_call=3, **kwargs)
    jax.clear_caches()
    with pytest.raises(AssertionError):
        _check_stops_at_eos(served, full, model.tokenizer.eos_id)


def test_max_new_tokens_must_be_at_least_one(model):
    engine = rj.Engine(model, max_batch=2, max_seq_len=64)
    for bad in (0, -1, 2.0, True, None):
        with pytest.raises(rj.RequestError, match="max_new_tokens"):
            engine.submit([5, 6], max_new_tokens=bad)
        with pytest.raises(rj.RequestError, match="max_new_tokens"):
            rj.generate(model, [5, 6], bad)
        with pytest.raises(rj.RequestError, match="max_new_tokens"):
            next(rj.stream(model, [5, 6], bad))
    assert engine.pending == 0


class _Compilations:
    """Counts XLA backend compilations while `on` (a `jax.monitoring` listener)."""

    def __init__(self):
        self.count, self.on = 0, False
        jax.monitoring.register_event_duration_secs_listener(self._listen)

    def _listen(self, event, duration, **kwargs):
        if self.on and event == BACKEND_COMPILE_EVENT:
            self.count += 1


def _serve_randomly(engine, rng, count, max_prompt, max_budget):
    """Submit `count` random requests in waves while the engine runs, cancelling some
    (queued or running); returns how many finished."""
    names = [None, *engine.adapters]
    submitted, finished = [], 0
    while len(submitted) < count or engine.pending:
        for _ in range(min(int(rng.integers(0, 6)), count - len(submitted))):
            prompt = int(rng.integers(1, max_prompt + 1))
            budget = int(rng.integers(1, min(max_budget, engine.max_seq_len - prompt) + 1))
            sampling = [
                rj.Sampling(),
                rj.Sampling(temperature=float(rng.uniform(0.5, 1.5))),
                rj.Sampling(temperature=1.0, top_k=int(rng.integers(1, 50)), top_p=0.9),
            ][int(rng.integers(0, 3))]
            adapter = names[int(rng.integers(0, len(names)))]
            ids = rng.integers(3, 300, prompt).tolist()
            seed = int(rng.integers(0, 2**31))
            submitted.append(engine.submit(ids, budget, sampling, seed, adapter))
        if submitted and rng.random() < 0.15:
            engine.cancel(int(rng.choice(submitted)))
        finished += sum(event.done for event in engine.step())
    return finished


@pytest.mark.slow
@pytest.mark.parametrize("draft", [None, 1])
def test_after_warmup_a_serving_mix_compiles_nothing(model, adapters, draft):
    """`warmup()` compiles every program: afterwards hundreds of random requests (prompts of
    1 to 300 tokens, budgets up to 100, greedy, hot, top-k / top-p, three tenants, some
    cancelled while queued or running) trigger no compilation. The control: a new shape (an
    engine of another batch size) is counted."""
    compilations = _Compilations()
    kwargs = (
        {} if draft is None else dict(draft=rj.layer_skip_draft(model, draft), num_draft_tokens=3)
    )
    engine = rj.Engine(model, max_batch=4, max_seq_len=CONTEXT, steps_per_call=4, **kwargs)
    for name, adapter in adapters.items():
        engine.add_adapter(name, adapter)
    info = engine.warmup()
    windows = 2 if draft is None else 3  # 256, 512 (+ 516: the speculative overshoot)
    assert info["programs"] == 2 * (6 + windows)  # (prompt buckets 16..512 + windows) x filtering
    compilations.on = True
    count = 300 if draft is None else 120
    finished = _serve_randomly(engine, np.random.default_rng(0), count, 300, 100)
    assert finished == count
    assert compilations.count == 0
    other = rj.Engine(model, max_batch=2, max_seq_len=64, **kwargs)
    other.submit([5, 6, 7], 3)
    other.run()
    assert compilations.count > 0
