"""Sampling: validation, greedy, `sampling_probs` against its float64 twin, per-row keys and
batch independence, and a chi-square test of drawn tokens against the exact distribution."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from realm_jax.errors import RequestError
from realm_jax.sampling import (
    Sampling,
    SamplingParams,
    sample,
    sampling_probs,
    sampling_probs_reference,
    token_rngs,
)
from realm_jax.testing import assert_close

# Also set by conftest; repeated so that this module proves the code under strict promotion.
jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")

LOGITS = np.array([2.0, 1.6, 1.3, 1.1, 0.8, 0.6, 0.3, 0.0, -0.3, -0.6, -0.9, -1.2], np.float32)
N = 20_000
ALPHA = 1e-3
# name -> (temperature, top_k, top_p); the exact supports have 12, 12, 12, 3, 6 and 5 tokens.
SETTINGS = {
    "t0.7": (0.7, 0, 1.0),
    "t1.0": (1.0, 0, 1.0),
    "t1.5": (1.5, 0, 1.0),
    "top_k3": (1.0, 3, 1.0),
    "top_p0.8": (1.0, 0, 0.8),
    "combined": (1.3, 6, 0.9),  # top-k cuts to 6, then top-p to 5: both filters act
}
# Smallest total-variation distance detected with >= 99% power (see the statistical test).
TV_99 = 0.026

probs_jit = jax.jit(sampling_probs)
sample_jit = jax.jit(sample)
rngs_jit = jax.jit(token_rngs)


def _params(temperature, top_k, top_p, b=None) -> SamplingParams:
    """[B] SamplingParams from scalars or sequences (unvalidated: tests build odd grids)."""
    cols = [np.atleast_1d(a) for a in (temperature, top_k, top_p)]
    cols = [np.broadcast_to(c, (b or max(map(len, cols)),)) for c in cols]
    return SamplingParams(
        temperature=jnp.asarray(cols[0], jnp.float32),
        top_k=jnp.asarray(cols[1], jnp.int32),
        top_p=jnp.asarray(cols[2], jnp.float32),
    )


def _rngs(b: int, seed: int = 0, position: int = 0) -> jax.Array:
    ids = jnp.arange(b, dtype=jnp.int32)
    return rngs_jit(jnp.full((b,), seed, jnp.int32), ids, jnp.full((b,), position, jnp.int32))


# --- validation -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(temperature=-0.1),
        dict(temperature=float("nan")),
        dict(temperature=float("inf")),
        dict(temperature="1.0"),
        dict(temperature=True),
        dict(top_p=0.0),
        dict(top_p=1.5),
        dict(top_p=float("nan")),
        dict(top_p=-0.5),
        dict(top_k=-1),
        dict(top_k=True),
        dict(top_k=2.0),
        dict(top_k=None),
    ],
    ids=repr,
)
def test_invalid_sampling_raises_request_error(kwargs):
    ((name, value),) = kwargs.items()
    with pytest.raises(RequestError, match=f"Sampling.{name}") as error:
        Sampling(**kwargs)
    assert repr(value) in str(error.value)  # the message shows the offending value


def test_valid_sampling_and_params():
    rows = [
        Sampling(),
        Sampling(temperature=1, top_k=np.int64(5), top_p=np.float32(0.5)),
        Sampling(temperature=0.7, top_k=10**12, top_p=1),
    ]
    params = SamplingParams.from_rows(rows)
    leaves = jax.tree.leaves(params)
    assert [(x.shape, x.dtype) for x in leaves] == [
        ((3,), jnp.float32),
        ((3,), jnp.int32),
        ((3,), jnp.float32),
    ]
    np.testing.assert_array_equal(params.top_k, [0, 5, np.iinfo(np.int32).max])
    with pytest.raises(RequestError):
        SamplingParams.from_rows([])
    with pytest.raises(RequestError):
        SamplingParams.from_rows([Sampling(), dict(temperature=1.0)])


def test_from_rows_marks_filtering_and_the_unfiltered_program_is_exact():
    """`from_rows` compiles the cut-off searches in only where a sampled row uses top-k or
    top-p (greedy ignores them); a program without them gives a batch that does not filter
    the float64 definition's distribution, as the program with them does."""
    assert not SamplingParams.from_rows([Sampling(), Sampling(0.0, top_k=3, top_p=0.5)]).filtering
    assert not SamplingParams.from_rows([Sampling(0.8), Sampling()]).filtering
    assert SamplingParams.from_rows([Sampling(), Sampling(0.8, top_k=3)]).filtering
    assert SamplingParams.from_rows([Sampling(0.8, top_p=0.9)]).filtering
    rng = np.random.default_rng(3)
    logits = (3.0 * rng.standard_normal((4, 50))).astype(np.float32)
    logits[:, 1::4] = -np.inf  # masked tokens stay at probability 0
    rows = [Sampling(), Sampling(0.3), Sampling(1.0), Sampling(2.5)]
    params = SamplingParams.from_rows(rows)
    assert not params.filtering
    probs = np.asarray(probs_jit(jnp.asarray(logits), params))
    temps = [row.temperature for row in rows]
    expected = sampling_probs_reference(logits, temps, [0] * 4, [1.0] * 4)
    assert_close(probs, expected, kind="op", what="program without the cut-off searches")
    np.testing.assert_array_equal(probs > 0, expected > 0)
    with_searches = probs_jit(jnp.asarray(logits), dataclasses.replace(params, filtering=True))
    assert_close(probs, np.asarray(with_searches), kind="op", what="with the searches")


# --- greedy and the exact distribution -------------------------------------------------------


def test_greedy_is_argmax_including_ties():
    """Greedy rows take the first maximal index (like jnp/np.argmax), whatever top-k/p say.
    [N, 12] like the statistical tests, so that the compiled step is shared."""
    rng = np.random.default_rng(0)
    logits = rng.integers(0, 4, size=(N, 12)).astype(np.float32)  # many ties at the max
    logits[: N // 2] += rng.standard_normal((N // 2, 12)).astype(np.float32)
    params = _params(0.0, rng.integers(0, 4, N), rng.choice([0.1, 0.5, 1.0], N))
    expected = np.argmax(logits, axis=-1)
    assert np.mean(np.sum(logits == logits.max(-1, keepdims=True), -1) > 1) > 0.2
    tokens = sample_jit(jnp.asarray(logits), params, _rngs(N))
    np.testing.assert_array_equal(tokens, expected)
    assert tokens.dtype == jnp.int32
    np.testing.assert_array_equal(probs_jit(jnp.asarray(logits), params), np.eye(12)[expected])


def _grid(v: int):
    """Every combination of temperature (0 included), top_k and top_p, as [B] columns."""
    temps, top_ks, top_ps = [0.0, 0.3, 1.0, 2.5], [0, 1, 2, 5, v, v + 3], [1e-6, 0.3, 0.9, 1.0]
    grid = np.array([(t, k, p) for t in temps for k in top_ks for p in top_ps])
    return grid[:, 0], grid[:, 1].astype(int), grid[:, 2]


@pytest.mark.parametrize("v", [1, 7, 500])
@pytest.mark.parametrize("kind", ["normal", "ties", "masked"])
def test_sampling_probs_matches_float64_reference(v, kind):
    """Each grid row against the float64 definition: values within float32 tolerance and the
    same support (which checks both tie rules and the top-k-then-top-p order)."""
    temps, top_ks, top_ps = _grid(v)
    b = len(temps)
    rng = np.random.default_rng(v)
    logits = 3.0 * rng.standard_normal((b, v))
    if kind == "ties":
        logits = np.round(logits / 2)  # a handful of distinct values: ties at every cut
    if kind == "masked":
        logits[:, 1::3] = -np.inf  # e.g. banned tokens; the first column stays finite
    logits = logits.astype(np.float32)
    probs = np.asarray(probs_jit(jnp.asarray(logits), _params(temps, top_ks, top_ps)))
    expected = sampling_probs_reference(logits, temps, top_ks, top_ps)
    assert_close(probs, expected, kind="op", what=f"sampling_probs V={v} {kind}")
    np.testing.assert_array_equal(probs > 0, expected > 0)
    assert_close(probs.sum(axis=-1), np.ones(b), kind="op", what="row sums")


def test_cut_offs_at_a_larger_vocabulary_and_signed_zeros():
    """The bisection on order keys at V = 4096 (top-k, top-p and both), on logits with wide
    ranges, runs of ties, a -0.0 / +0.0 pair at the top and subnormal gaps: same support as
    the float64 definition, values within float32 tolerance."""
    v = 4096
    rng = np.random.default_rng(7)
    logits = np.stack(
        [
            8.0 * rng.standard_normal(v),  # wide range
            np.round(2.0 * rng.standard_normal(v)),  # long runs of ties at every cut
            np.concatenate([[0.0, -0.0], -np.abs(rng.standard_normal(v - 2))]),  # signed zeros
            np.concatenate([[1.0], 1.0 - 1e-40 * np.arange(1, v)]),  # subnormal-sized gaps
        ]
    ).astype(np.float32)
    settings = [(1.0, 0, 0.9), (0.7, 40, 1.0), (1.3, 1000, 0.95), (1.0, v - 1, 0.5)]
    rows = np.repeat(logits, len(settings), axis=0)
    temps, top_ks, top_ps = (np.tile([s[i] for s in settings], len(logits)) for i in range(3))
    probs = np.asarray(probs_jit(jnp.asarray(rows), _params(temps, top_ks.astype(int), top_ps)))
    expected = sampling_probs_reference(rows, temps, top_ks.astype(int), top_ps)
    np.testing.assert_array_equal(probs > 0, expected > 0)
    assert_close(probs, expected, kind="op", what=f"sampling_probs V={v}")


def test_tie_rules_keep_every_tied_token():
    """top-k and top-p keep all tokens tied at the cut; greedy picks the first maximum."""
    logits = jnp.asarray([[1.0, 3.0, 3.0, 0.0]] * 5)
    params = _params([1.0, 1.0, 1.0, 1.0, 0.0], [1, 2, 3, 0, 1], [1.0, 1.0, 1.0, 1e-6, 0.5])
    e1, e3 = math.e**1, math.e**3
    expected = np.array(
        [
            [0, 0.5, 0.5, 0],
            [0, 0.5, 0.5, 0],
            [e1 / (e1 + 2 * e3), e3 / (e1 + 2 * e3), e3 / (e1 + 2 * e3), 0],
            [0, 0.5, 0.5, 0],
            [0, 1, 0, 0],
        ]
    )
    assert_close(probs_jit(logits, params), expected, kind="op", what="ties")
    np.testing.assert_array_equal(expected, sampling_probs_reference(logits, *_cols(params)))


def _cols(params: SamplingParams):
    return [np.asarray(x) for x in (params.temperature, params.top_k, params.top_p)]


def test_tiny_temperature_and_masked_tokens_stay_finite():
    """No inf - inf: the max is subtracted before dividing by the temperature. Subnormal
    temperatures (1e-38, 1e-45) may flush to 0 (greedy) or hit the floor: one-hot either way."""
    top = [0.5, 2.0, -np.inf, 1.999]
    tied = [-np.inf, 1.0, 1.0, -np.inf]
    logits = jnp.asarray([top, tied, top, top, tied], jnp.float32)
    probs = probs_jit(logits, _params([1e-30, 1e-30, 1e-38, 1e-45, 3e-38], 0, 1.0))
    one_hot, half = [0, 1, 0, 0], [0, 0.5, 0.5, 0]
    np.testing.assert_array_equal(probs, [one_hot, half, one_hot, one_hot, half])


def test_rows_in_a_mixed_batch_equal_rows_alone():
    """Bitwise, including a lone row whose batch takes the no-filter branch of the cond."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((5, 30)).astype(np.float32)
    cols = ([0.0, 1.0, 1.5, 1.0, 0.5], [0, 5, 0, 12, 3], [1.0, 1.0, 0.7, 0.9, 0.95])
    keyed = np.array([[3, 3, 4, 9, 3], [0, 1, 2, 3, 4], [6, 6, 6, 2, 8]], np.int32)
    batched = probs_jit(logits, _params(*cols))
    tokens = sample_jit(logits, _params(*cols), rngs_jit(*keyed))
    for i in range(5):
        alone = _params(*[[c[i]] for c in cols])
        np.testing.assert_array_equal(probs_jit(logits[i : i + 1], alone)[0], batched[i])
        token = sample_jit(logits[i : i + 1], alone, rngs_jit(*keyed[:, i : i + 1]))
        assert int(token[0]) == int(tokens[i])


# --- keys and reproducibility ----------------------------------------------------------------


def test_token_rngs_depend_on_seed_request_and_position_only():
    seeds, ids, positions = np.meshgrid([0, 1, 7], [0, 1, 2, 99], [0, 1, 5, 6], indexing="ij")
    args = [jnp.asarray(a.ravel(), jnp.int32) for a in (seeds, ids, positions)]
    data = np.asarray(jax.random.key_data(token_rngs(*args)))  # [B, 2]
    assert len({tuple(row) for row in data}) == len(data), "two (seed, id, position) share a key"
    np.testing.assert_array_equal(jax.random.key_data(token_rngs(*args)), data)
    # Permuting the rows (another slot order) permutes the keys and changes nothing else.
    perm = np.random.default_rng(0).permutation(len(data))
    moved = token_rngs(*[a[perm] for a in args])
    np.testing.assert_array_equal(jax.random.key_data(moved), data[perm])


def test_fixed_seed_reproduces_and_row_ignores_its_neighbours():
    """Same key and logits -> same token, alone or among 4 different rows, over 30 draws."""
    rng = np.random.default_rng(2)
    row = rng.standard_normal(30).astype(np.float32)
    row_params = (1.2, 8, 0.95)
    tokens_alone, tokens_batched = [], []
    for position in range(30):
        rngs = rngs_jit(*(jnp.asarray([a], jnp.int32) for a in (5, 17, position)))
        alone = sample_jit(jnp.asarray(row[None]), _params(*[[c] for c in row_params]), rngs)
        tokens_alone.append(int(alone[0]))
        # Neighbours: other logits, other parameters, other keys; our row sits in slot 3.
        logits = rng.standard_normal((5, 30)).astype(np.float32)
        logits[3] = row
        cols = [list(rng.choice([0.0, 0.5, 1.0, 2.0], 5)), list(rng.integers(0, 5, 5)), [0.5] * 5]
        for c, value in zip(cols, row_params, strict=True):
            c[3] = value
        batch_rngs = rngs_jit(
            jnp.asarray([1, 2, 3, 5, 4], jnp.int32),
            jnp.asarray([0, 1, 2, 17, 3], jnp.int32),
            jnp.full((5,), position, jnp.int32),
        )
        tokens_batched.append(int(sample_jit(jnp.asarray(logits), _params(*cols), batch_rngs)[3]))
    assert tokens_alone == tokens_batched
    assert len(set(tokens_alone)) > 3, "positions should draw different tokens"
    again = sample_jit(jnp.asarray(row[None]), _params(*[[c] for c in row_params]), rngs)
    assert int(again[0]) == tokens_alone[-1]


# --- statistics ------------------------------------------------------------------------------


def chi2_sf(x: float, df: int) -> float:
    """P(chi-square_df > x): the regularized upper incomplete gamma Q(df/2, x/2), by its
    series for x < a + 1 and by Lentz's continued fraction otherwise (Numerical Recipes §6.2)."""
    a, x = df / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    lead = math.exp(a * math.log(x) - x - math.lgamma(a))
    if x < a + 1:
        term = total = 1.0 / a
        n = a
        while term > total * 1e-16:
            n += 1
            term *= x / n
            total += term
        return max(0.0, 1.0 - lead * total)
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 1000):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = 1.0 / (d if abs(d) > tiny else tiny)
        c = b + an / c
        c = c if abs(c) > tiny else tiny
        h *= d * c
        if abs(d * c - 1.0) < 1e-16:
            break
    return lead * h


def chi2_critical(df: int, alpha: float) -> float:
    lo, hi = 0.0, 1000.0
    for _ in range(100):  # bisection on the monotone survival function
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if chi2_sf(mid, df) > alpha else (lo, mid)
    return hi


def test_chi2_sf_against_closed_forms():
    """df = 2: exp(-x/2); df = 1: erfc(sqrt(x/2)). Covers the series and the fraction."""
    for x in [0.1, 1.0, 2.9, 3.5, 10.0, 40.0, 80.0]:
        assert chi2_sf(x, 2) == pytest.approx(math.exp(-x / 2), rel=1e-10)
        assert chi2_sf(x, 1) == pytest.approx(math.erfc(math.sqrt(x / 2)), rel=1e-9)
    assert chi2_critical(11, 1e-3) == pytest.approx(31.264, abs=1e-3)  # standard tables


def _draw(temperature, top_k, top_p, seed=2024) -> np.ndarray:
    """N tokens, one per (seed, request id, position 7) key, as token counts [V]."""
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (N, LOGITS.size))
    tokens = sample_jit(logits, _params(temperature, top_k, top_p, b=N), _rngs(N, seed, 7))
    return np.bincount(np.asarray(tokens), minlength=LOGITS.size)


def _goodness_of_fit(counts: np.ndarray, exact: np.ndarray) -> tuple[float, int]:
    """(Pearson chi-square p-value over the exact support, counts outside the support)."""
    support = exact > 0
    expected = counts.sum() * exact[support]
    statistic = float(np.sum((counts[support] - expected) ** 2 / expected))
    return chi2_sf(statistic, int(support.sum()) - 1), int(counts[~support].sum())


@pytest.mark.parametrize("name", list(SETTINGS))
def test_sample_distribution_chi_square(name):
    """Drawn tokens follow the exact float64 distribution (N = 20000 draws, fixed seed).

    Test: Pearson chi-square goodness of fit over the exact support at significance
    alpha = 1e-3 (per setting; at most 6e-3 over the six), df = support size - 1; every
    expected count is >= 75. Tokens outside the support must never be drawn (asserted
    separately: chi-square cannot see a bin whose expected count is 0).

    Power: under an alternative q on the same support the statistic is approximately (large
    N) noncentral chi-square with lambda = N * sum((q - p)^2 / p) >= 4 * N * TV(p, q)^2
    (Cauchy-Schwarz); mass outside the support is the support check's job. At alpha = 1e-3
    the test has 99% power once lambda >= 54 for df = 11 (less for smaller df), so any q with
    TV >= 0.026 is rejected with >= 99% probability (`test_power_claim` checks this number).
    Positive controls in `test_chi_square_rejects_wrong_distributions`.
    """
    exact = sampling_probs_reference(LOGITS, *SETTINGS[name])
    p_value, outside = _goodness_of_fit(_draw(*SETTINGS[name]), exact)
    assert outside == 0, f"{name}: {outside} draws of zero-probability tokens"
    assert p_value > ALPHA, f"{name}: chi-square p = {p_value:.2e}"


def test_power_claim():
    """Noncentral chi-square at lambda = 4 N TV_99^2 exceeds the critical value >= 99% of the
    time for every df used above (numbers the docstring states, recomputed)."""
    rng = np.random.default_rng(0)
    for df in [11, 5, 4, 2]:
        draws = rng.noncentral_chisquare(df, 4 * N * TV_99**2, size=100_000)
        assert np.mean(draws > chi2_critical(df, ALPHA)) >= 0.99, df


def test_chi_square_rejects_wrong_distributions():
    """Positive controls: the same test on samples from slightly wrong distributions."""
    # Temperature 10% too high: TV 0.028 from the truth (lambda ~ 104): chi-square rejects.
    exact = sampling_probs_reference(LOGITS, 1.0, 0, 1.0)
    assert 0.5 * np.abs(exact - sampling_probs_reference(LOGITS, 1.1, 0, 1.0)).sum() < 0.03
    p_value, _ = _goodness_of_fit(_draw(1.1, 0, 1.0), exact)
    assert p_value < ALPHA
    # A top-p mask one token short (5 kept instead of 6): chi-square rejects.
    exact = sampling_probs_reference(LOGITS, *SETTINGS["top_p0.8"])
    p_value, _ = _goodness_of_fit(_draw(1.0, 5, 1.0), exact)
    assert p_value < ALPHA
    # One token too many (7): the extra token lands outside the support.
    _, outside = _goodness_of_fit(_draw(1.0, 7, 1.0), exact)
    assert outside > 0
