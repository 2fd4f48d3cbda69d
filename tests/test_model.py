"""The JAX forward on synthetic GGUF models: against the float64 NumPy reference, cached
decoding against one full forward, batched rows against rows alone, both layer layouts."""

import copy
import dataclasses

import numpy as np
import pytest

import realm_jax as rj
from realm_jax.config import tiny
from realm_jax.gguf import read_gguf
from realm_jax.kv_cache import init_cache
from realm_jax.layout import params_from_tensors
from realm_jax.reference import forward_reference
from realm_jax.sampling import SamplingParams
from realm_jax.steps.decode import append_and_sample, decode_step, prompt_logits
from realm_jax.steps.loop import run_steps
from realm_jax.steps.state import Caches, StepSpec, Weights, host_rows
from realm_jax.testing import assert_close, cached_logits, random_tensors, write_gguf

# (name, config, matrix storage type): tied and untied output, GQA and plain MHA, a partial
# RoPE, and several quantization types (K-quants need rows that are multiples of 256).
CASES = [
    ("gqa_tied_q8", tiny(vocab_size=300), "Q8_0"),
    ("mha_untied_f32", tiny(vocab_size=300, n_kv_heads=4, tied_embeddings=False), "F32"),
    ("gqa3_q4_1", tiny(vocab_size=300, n_heads=6, n_kv_heads=2, head_dim=16, dim=96), "Q4_1"),
    ("mqa_f16_partial_rope", tiny(vocab_size=300, n_kv_heads=1, rope_dim=8), "F16"),
    ("q5_0_untied", tiny(vocab_size=300, tied_embeddings=False), "Q5_0"),
    ("bf16", tiny(vocab_size=300), "BF16"),
    (
        "q6_k",
        tiny(vocab_size=300, dim=256, ffn_dim=256, head_dim=64, n_heads=4, n_kv_heads=2),
        "Q6_K",
    ),
    (
        "q4_k_untied",
        tiny(vocab_size=300, dim=256, ffn_dim=512, head_dim=64, tied_embeddings=False),
        "Q4_K",
    ),
]


# The properties below do not depend on the storage type: run them on the three layouts only
# (each case costs several XLA compilations).
LAYOUT_CASES = CASES[:3]


def _load(name, config, qtype, tmp_path_factory):
    path = tmp_path_factory.mktemp(name) / f"{name}.gguf"
    write_gguf(path, config, random_tensors(config, seed=len(name)), qtype=qtype)
    return rj.load_model(path), read_gguf(path)


@pytest.fixture(scope="module", params=CASES, ids=[c[0] for c in CASES])
def any_case(request, tmp_path_factory):
    return _load(*request.param, tmp_path_factory)


@pytest.fixture(scope="module", params=LAYOUT_CASES, ids=[c[0] for c in LAYOUT_CASES])
def case(request, tmp_path_factory):
    return _load(*request.param, tmp_path_factory)


def _prompt(model, length, seed=0):
    return np.random.default_rng(seed).integers(0, model.config.vocab_size, size=length).tolist()


def test_forward_matches_float64_reference(any_case):
    model, contents = any_case
    ids = _prompt(model, 37)
    expected = forward_reference(contents.config, contents.tensors, ids)
    assert_close(rj.logits(model, ids), expected, what="logits vs float64 reference")


def test_cached_decoding_equals_full_forward(case):
    """Prefill 11 tokens, then feed 19 more one at a time: logits equal the full forward."""
    model, _ = case
    ids = _prompt(model, 30, seed=1)
    full = rj.logits(model, ids)
    stepwise = cached_logits(model, ids[:11], ids[11:])
    assert_close(stepwise, full[10:], what="cached decode vs full forward")


def test_batched_rows_equal_rows_alone(case):
    """Rows of different lengths in one padded batch: bitwise the logits they give beside
    other neighbours in a batch of the same shape (the same computation), and within float32
    tolerance of the row run alone (a batch of 1 is a different matmul shape on CPU)."""
    model, _ = case
    config = model.config
    lengths = [29, 7, 18]
    rows = [_prompt(model, n, seed=10 + n) for n in lengths]

    def run(batch_rows):
        tokens = np.zeros((len(batch_rows), 32), np.int32)
        for b, row in enumerate(batch_rows):
            tokens[b, : len(row)] = row
        counts = np.asarray([len(r) for r in batch_rows], np.int32)
        ids = np.zeros(len(batch_rows), np.int32)
        spec = StepSpec(config, 32)
        return np.asarray(prompt_logits(Weights(model.params), tokens, counts, ids, spec=spec))

    batched = run(rows)
    others = [_prompt(model, n, seed=99 + n) for n in (3, 31)]
    for b, row in enumerate(rows):
        neighbours = others[:b] + [row] + others[b:]
        np.testing.assert_array_equal(
            run(neighbours)[b, : len(row)], batched[b, : len(row)], err_msg=f"row {b}"
        )
        alone = run([row])
        assert_close(batched[b, : len(row)], alone[0, : len(row)], what=f"row {b} alone")
        np.testing.assert_array_equal(
            batched[b, : len(row)].argmax(-1), alone[0, : len(row)].argmax(-1)
        )


@pytest.mark.slow
def test_stacked_and_unrolled_layers_agree(tmp_path_factory):
    model, _ = _load(*CASES[0], tmp_path_factory)
    ids = _prompt(model, 20, seed=2)
    assert isinstance(model.params.layers, tuple)  # load_model's default
    stacked = rj.Model(
        model.config, rj.model.stack_layers(model.params), model.tokenizer, model.path
    )
    assert not isinstance(stacked.params.layers, tuple)
    assert_close(rj.logits(stacked, ids), rj.logits(model, ids), what="stacked vs unrolled")
    assert rj.generate(stacked, ids, 8) == rj.generate(model, ids, 8)


def test_greedy_generation_is_iterated_argmax(case):
    """generate's cached greedy tokens equal argmax of a full forward re-run at every step."""
    model, _ = case
    ids = _prompt(model, 9, seed=3)
    generated = rj.generate(model, ids, 12, stop_at_eos=False)
    sequence = list(ids)
    for _ in range(12):
        sequence.append(int(np.argmax(rj.logits(model, sequence)[-1])))
    assert generated == sequence[len(ids) :]


def test_generation_stops_after_eos(case):
    """`stream` dispatches each call before reading the previous call's tokens: EOS still
    ends the output right after it, and the call already queued is never read."""
    model, _ = case
    ids = _prompt(model, 9, seed=3)
    full = rj.generate(model, ids, 12, stop_at_eos=False)
    eos = full[5]  # any token the run produces; the output must end at its first occurrence
    tokenizer = copy.copy(model.tokenizer)
    tokenizer.eos_id = eos
    with_eos = dataclasses.replace(model, tokenizer=tokenizer)
    assert rj.generate(with_eos, ids, 12) == full[: full.index(eos) + 1]
    assert rj.generate(with_eos, ids, 12, stop_at_eos=False) == full


def test_steps_per_call_does_not_change_the_tokens(tmp_path_factory):
    """`stream` runs up to `steps_per_call` decode steps per device call
    (`steps.loop.run_steps`): greedy and sampled tokens are the same at 1, 3 and 8 per call,
    and EOS ends the output right after it, also in the middle of a call. (On this case
    greedy output depends on each fed token: feeding a call's first token at every step
    fails here.)"""
    model, _ = _load(*CASES[1], tmp_path_factory)
    ids = _prompt(model, 9, seed=3)
    for sampling in (rj.Sampling(), rj.Sampling(temperature=0.9, top_p=0.9)):
        runs = {
            n: rj.generate(model, ids, 12, sampling, seed=4, stop_at_eos=False, steps_per_call=n)
            for n in (1, 3, 8)
        }
        assert runs[1] == runs[3] == runs[8], runs
    full = runs[1]
    eos = full[4]  # within the second call of 3
    tokenizer = copy.copy(model.tokenizer)
    tokenizer.eos_id = eos
    with_eos = dataclasses.replace(model, tokenizer=tokenizer)
    for n in (1, 3, 8):
        out = rj.generate(with_eos, ids, 12, sampling, seed=4, steps_per_call=n)
        assert out == full[: full.index(eos) + 1]
    for bad in (0, -2, 2.5, True):
        with pytest.raises(rj.RequestError, match="steps_per_call"):
            rj.generate(model, ids, 4, steps_per_call=bad)


def test_run_steps_stops_each_row_at_its_stop_id(tmp_path_factory):
    """Two rows in one `run_steps` call: each row's tokens are those of `decode_step` called
    once per step; the row whose stop id comes up stops right after it (its count and its
    cache length stop there), the other runs every step."""
    model, _ = _load(*CASES[0], tmp_path_factory)
    config, steps = model.config, 6
    prompts = np.asarray([_prompt(model, 8, seed=5), _prompt(model, 8, seed=6)], np.int32)
    lengths = np.asarray([8, 5], np.int32)  # row 1's prompt is its first 5 ids
    sampling = SamplingParams.from_rows([rj.Sampling()] * 2)
    zeros = np.zeros((2,), np.int32)
    weights = Weights(model.params)

    def prefilled(stop_ids):
        cache = init_cache(config, 2, 32, model.dtype)
        rows = host_rows(zeros, [True, True], [100, 100], stop_ids, sampling, zeros, zeros, zeros)
        first, _, cache = append_and_sample(
            model.params, None, prompts, lengths, cache, rows, StepSpec(config, 8)
        )
        return dataclasses.replace(rows, tokens=first), cache

    rows, cache = prefilled([-1, -1])
    expected = []
    for _ in range(steps):
        token, _, cache = decode_step(weights, rows, cache, spec=StepSpec(config, 32))
        rows = dataclasses.replace(rows, tokens=token)
        expected.append(np.asarray(token))
    expected = np.stack(expected, axis=1)  # [2, steps]
    stop = int(expected[0, 2])
    stops_at = expected[0].tolist().index(stop) + 1  # row 0's tokens up to its stop id
    rows, cache = prefilled([stop, -1])
    rows, caches, out = run_steps(
        weights, rows, Caches(cache), np.ones(2, bool), np.int32(steps), np.bool_(False),
        spec=StepSpec(config, 32), max_steps=steps,
    )  # fmt: skip
    assert np.asarray(out.counts).tolist() == [stops_at, steps]
    assert np.asarray(out.tokens)[0, :stops_at].tolist() == expected[0, :stops_at].tolist()
    assert np.asarray(out.tokens)[1].tolist() == expected[1].tolist()
    assert np.asarray(out.active).tolist() == [False, True]
    assert np.asarray(rows.tokens).tolist() == [stop, int(expected[1, -1])]
    assert np.asarray(rows.remaining).tolist() == [100 - stops_at, 100 - steps]
    assert np.asarray(caches.target.lengths).tolist() == [8 + stops_at, 5 + steps]


def test_padding_does_not_change_prefix_logits():
    """Logits of a prefix are unchanged by a longer input (causality) and by padding."""
    config = tiny(vocab_size=300)
    params = params_from_tensors(config, random_tensors(config, seed=5))
    ids = np.random.default_rng(4).integers(0, 300, size=24).astype(np.int32)
    results = []
    for t, pad in [(12, 16), (24, 32), (12, 64)]:
        tokens = np.full((1, pad), 7, np.int32)
        tokens[0, :t] = ids[:t]
        zero = np.zeros((1,), np.int32)
        spec = StepSpec(config, pad)
        out = prompt_logits(Weights(params), tokens, np.asarray([t], np.int32), zero, spec=spec)
        results.append(np.asarray(out[0, :12]))
    assert_close(results[1], results[0], what="longer input")
    assert_close(results[2], results[0], what="more padding")
