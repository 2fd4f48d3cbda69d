"""Turn logits into tokens: per-row temperature / top-k / top-p, and per-token PRNG keys.

`Sampling` is the user-facing request option; `SamplingParams` stacks one per batch row as
arrays, so one jitted step serves rows with different settings. `sampling_probs` is the exact
distribution a row draws from (speculative decoding reuses it for `target_probs` and
`draft_probs`); `sample` draws from it with `draw`, the one way tokens are drawn here.
`sampling_probs_reference` is its float64 NumPy twin.
Batching, speculative acceptance and scheduling live elsewhere.

The distribution of a row with temperature t > 0, top-k k and top-p p over logits x [V]:
  1. scale: s = (x - max(x)) / t;
  2. top-k: keep tokens with s >= the k-th largest s (k = 0 or k >= V keeps all). Tokens tied
     with the k-th value are all kept, so more than k can survive (HF `TopKLogitsWarper` and
     vLLM threshold the same way). This makes the rule independent of token order;
  3. top-p: on softmax of the step-2 survivors, keep token i when the mass of tokens with
     strictly larger s is < p. That is the smallest top set whose mass reaches p, widened to
     every token tied with its last member; the top token is always kept; p = 1 keeps all;
  4. renormalise: softmax over the tokens kept by both steps.
The order (temperature, then top-k, then top-p on the filtered, rescaled distribution) is the
one HF's warper list and vLLM's sampler use. Temperature 0 is greedy: a one-hot at
`jnp.argmax(x)`, the first index on ties, whatever k and p are.
Logits must be finite or -inf, with at least one finite entry per row.
"""

import dataclasses
import math
from collections.abc import Sequence
from numbers import Integral, Real

import chex
import jax
import jax.numpy as jnp
import numpy as np

from realm_jax.errors import RequestError

TINY = float(np.finfo(np.float32).tiny)  # smallest normal float32: the temperature floor


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one request turns logits into tokens (validated on construction).

    Attributes:
      temperature: finite, >= 0; 0 means greedy (argmax), which ignores top_k and top_p.
      top_k: keep the k most likely tokens (and any tied with the k-th); 0 turns it off.
      top_p: nucleus mass in (0, 1]; 1.0 turns it off.

    Raises:
      RequestError: a value of the wrong type or out of range.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        t, k, p = self.temperature, self.top_k, self.top_p
        # bool is an Integral, and True would otherwise read as temperature 1 or top_k 1.
        if isinstance(t, bool) or not isinstance(t, Real) or not (math.isfinite(t) and t >= 0):
            raise RequestError(f"Sampling.temperature must be a finite number >= 0, got {t!r}")
        if isinstance(k, bool) or not isinstance(k, Integral) or k < 0:
            raise RequestError(f"Sampling.top_k must be an integer >= 0 (0 = off), got {k!r}")
        if isinstance(p, bool) or not isinstance(p, Real) or not (0 < p <= 1):
            raise RequestError(f"Sampling.top_p must be in (0, 1] (1 = off), got {p!r}")

    @property
    def filters(self) -> bool:
        """Whether a row of this request may cut tokens off by top-k or top-p (greedy ignores
        both): what `SamplingParams.filtering` records for a batch."""
        return self.temperature > 0 and (self.top_k > 0 or self.top_p < 1)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SamplingParams:
    """One `Sampling` per batch row, as arrays (a pytree: pass it to jitted steps).

    Attributes:
      temperature: [B] float32; 0 marks a greedy row.
      top_k: [B] int32; 0 = off.
      top_p: [B] float32; 1 = off.
      filtering: static: whether any row may use top-k or top-p. False (what `from_rows`
        gives greedy and plain-temperature batches) compiles a program without the two
        cut-off searches; it is exact only when no row filters. The default True is exact
        for any rows.
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    filtering: bool = dataclasses.field(default=True, metadata=dict(static=True))

    @classmethod
    def from_rows(cls, rows: Sequence[Sampling]) -> "SamplingParams":
        """Stack validated `Sampling`s, one per row, into [B] arrays.

        Raises:
          RequestError: `rows` is empty or holds something other than a `Sampling`.
        """
        rows = list(rows)
        if not rows or not all(isinstance(row, Sampling) for row in rows):
            raise RequestError(f"SamplingParams.from_rows needs rj.Sampling rows, got {rows!r}")
        # top_k beyond int32 means "off" anyway; clip so that the cast cannot wrap around.
        top_k = [min(int(row.top_k), np.iinfo(np.int32).max) for row in rows]
        # NumPy leaves: a jitted step takes them as a plain transfer, so building a batch's
        # parameters runs no device program (and cannot compile one after a warm-up).
        return cls(
            temperature=np.asarray([row.temperature for row in rows], np.float32),
            top_k=np.asarray(top_k, np.int32),
            top_p=np.asarray([row.top_p for row in rows], np.float32),
            filtering=any(row.filters for row in rows),
        )


def token_rngs(seed: jax.Array, request_id: jax.Array, position: jax.Array) -> jax.Array:
    """Derive each row's key for sampling the token at `position` (DESIGN §3).

    The key depends only on (seed, request id, absolute position of the token being
    sampled), never on the slot or the batch, so a request draws the same tokens alone or
    batched, and a seed replays exactly. New-style typed keys (`jax.random.key`) throughout.

    Args:
      seed: [B] integer, the request's seed.
      request_id: [B] integer.
      position: [B] integer, position in the sequence of the token about to be sampled.

    Returns:
      [B] typed PRNG keys.
    """
    chex.assert_rank([seed, request_id, position], 1)
    chex.assert_equal_shape([seed, request_id, position])

    def one(seed, request_id, position):
        rng = jax.random.key(seed)
        return jax.random.fold_in(jax.random.fold_in(rng, request_id), position)

    return jax.vmap(one)(seed, request_id, position)


_SIGN = np.uint32(0x80000000)


def _order_keys(x: jax.Array) -> jax.Array:
    """float32 -> uint32 keys in the same order (-inf < ... < 0 < ... < +inf); -0 maps to +0."""
    bits = jax.lax.bitcast_convert_type(x + 0.0, jnp.uint32)
    return jnp.where(bits >= _SIGN, ~bits, bits | _SIGN)


def _from_order_key(key: jax.Array) -> jax.Array:
    """The inverse of `_order_keys`."""
    bits = jnp.where(key >= _SIGN, key ^ _SIGN, ~key)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)


def _bisect(pred, lo: jax.Array, hi: jax.Array, *, largest: bool) -> jax.Array:
    """Per row, the largest (or smallest) uint32 key in [lo, hi] where `pred` ([B] keys ->
    [B] bool, monotone in the key) holds; it must hold at lo (largest) or at hi (smallest).
    32 halvings cover any uint32 range, so the result is exact."""

    def halve(_, bounds):
        lo, hi = bounds
        gap = hi - lo
        if largest:
            mid = lo + (gap >> 1) + (gap & 1)  # upper middle: lo < mid unless lo == hi
            ok = pred(mid)
            return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)
        mid = lo + (gap >> 1)  # lower middle: mid < hi unless lo == hi
        ok = pred(mid)
        return jnp.where(ok, lo, mid + 1), jnp.where(ok, mid, hi)

    lo, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
    return lo if largest else hi


def _top_k_top_p_threshold(scaled: jax.Array, params: SamplingParams) -> jax.Array:
    """Each row's smallest kept scaled logit after top-k then top-p ([B, V] -> [B]).

    Both cut-offs are element values found by bisection on the values' order keys: 32
    compare-and-sum passes over [B, V] per rule instead of a [B, V] sort (several times
    faster at SmolLM2's 49,152 logits on the dev CPU, docs/results.md; both run whether or
    not a row uses them, which compiles less than a cond):
      - the k-th largest value is the largest t with count(s >= t) >= k;
      - the top-p cut-off is the smallest t with mass(s > t) < p, the mass taken on the
        softmax of the top-k survivors. mass(s > t) only changes at element values, so that
        t is the smallest kept value, and every token tied with it is kept, as in step 3.
    """
    v = scaled.shape[-1]
    keys = _order_keys(scaled)  # [B, V]
    lowest, highest = jnp.min(keys, axis=-1), jnp.max(keys, axis=-1)  # [B]
    k = jnp.where(params.top_k > 0, jnp.minimum(params.top_k, v), v)  # [B]

    def at_least_k(t):
        return jnp.sum(keys >= t[:, None], axis=-1, dtype=jnp.int32) >= k

    kth = _bisect(at_least_k, lowest, highest, largest=True)
    probs = jax.nn.softmax(jnp.where(keys >= kth[:, None], scaled, -jnp.inf), axis=-1)

    def below_p(t):
        return jnp.sum(jnp.where(keys > t[:, None], probs, 0.0), axis=-1) < params.top_p

    # top_p == 1 must be off exactly: float32 sums can reach 1 before the tail's last tokens.
    cutoff = jnp.where(params.top_p < 1.0, _bisect(below_p, kth, highest, largest=False), kth)
    return _from_order_key(cutoff)


def _filtered_logits(logits: jax.Array, params: SamplingParams) -> tuple[jax.Array, jax.Array]:
    """Scaled logits with filtered-out tokens at -inf ([B, V]), and the greedy rows ([B])."""
    chex.assert_rank(logits, 2)
    b = logits.shape[0]
    chex.assert_shape([params.temperature, params.top_k, params.top_p], (b,))
    logits = logits.astype(jnp.float32)
    greedy = params.temperature == 0.0
    # The floor keeps a subnormal temperature from dividing as 0 where denormals flush to zero.
    temperature = jnp.where(greedy, 1.0, jnp.maximum(params.temperature, TINY))
    # Shift by the row max before dividing: a tiny temperature then sends the other tokens to
    # -inf instead of sending the top one to +inf (inf - inf is NaN in the softmax).
    scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature[:, None]
    if not params.filtering:
        # No row filters (greedy and plain-temperature batches, decided on the host by
        # `from_rows`): the program has no cut-off searches to compile, and no `lax.cond`,
        # which on a GPU stops the host midway through every step to read its predicate.
        return scaled, greedy
    threshold = _top_k_top_p_threshold(scaled, params)
    return jnp.where(scaled >= threshold[:, None], scaled, -jnp.inf), greedy


def sampling_probs(logits: jax.Array, params: SamplingParams) -> jax.Array:
    """Compute the distribution each row samples from (see the module docstring).

    Args:
      logits: [B, V] float (computed in float32).
      params: per-row sampling parameters, fields [B].

    Returns:
      [B, V] float32 probabilities; a one-hot at the argmax for greedy rows.
    """
    masked, greedy = _filtered_logits(logits, params)
    one_hot = jax.nn.one_hot(jnp.argmax(logits, axis=-1), logits.shape[-1], dtype=jnp.float32)
    return jnp.where(greedy[:, None], one_hot, jax.nn.softmax(masked, axis=-1))


def draw(rngs: jax.Array, probs: jax.Array) -> jax.Array:
    """One token per row from probs [B, V] by inverting the CDF with one uniform per row.

    x = (1 - u) * total lies in (0, total], so the first index whose cumulative mass reaches
    x has positive probability; a one-hot row gives its own index exactly. One uniform per row
    instead of `jax.random.categorical`'s V Gumbels: a fraction of the draw's time at
    V = 49,152 on the dev CPU (docs/results.md), and its program compiles faster.

    Args:
      rngs: [B] PRNG keys; each row uses only its own.
      probs: [B, V] nonnegative, each row with positive total (need not sum to exactly 1).

    Returns:
      [B] int32 token ids.
    """
    cdf = jnp.cumsum(probs, axis=-1)  # [B, V]
    x = (1.0 - jax.vmap(jax.random.uniform)(rngs)) * cdf[:, -1]  # [B]
    index = jnp.sum(cdf < x[:, None], axis=-1, dtype=jnp.int32)
    return jnp.minimum(index, probs.shape[-1] - 1)


def sample(logits: jax.Array, params: SamplingParams, rngs: jax.Array) -> jax.Array:
    """Draw one token per row from `sampling_probs`: the argmax exactly for greedy rows.

    Args:
      logits: [B, V] float.
      params: per-row sampling parameters, fields [B].
      rngs: [B] PRNG keys, from `token_rngs`; each row uses only its own.

    Returns:
      [B] int32 token ids.
    """
    return draw(rngs, sampling_probs(logits, params))


def sampling_probs_reference(logits, temperature, top_k, top_p) -> np.ndarray:
    """Float64 NumPy twin of `sampling_probs`, written from the definition, not the sort.

    Args:
      logits: [V] or [B, V].
      temperature, top_k, top_p: scalars or [B], broadcast over rows.

    Returns:
      float64 probabilities shaped like `logits`.
    """
    x = np.asarray(logits, np.float64)
    if x.ndim == 1:
        return sampling_probs_reference(x[None], temperature, top_k, top_p)[0]
    b, v = x.shape
    rows = [np.broadcast_to(a, (b,)) for a in (temperature, top_k, top_p)]
    out = np.zeros((b, v))
    for i, (row, t, k, p) in enumerate(zip(x, *rows, strict=True)):
        if t == 0:
            out[i, np.argmax(row)] = 1.0
            continue
        scaled = (row - row.max()) / t
        k = v if k <= 0 or k >= v else int(k)
        keep = scaled >= np.sort(scaled)[::-1][k - 1]
        probs = np.where(keep, np.exp(scaled), 0.0)
        probs /= probs.sum()
        if p < 1:
            above = (scaled[None, :] > scaled[:, None]) @ probs  # [V] mass strictly above
            keep &= above < p
        probs = np.where(keep, np.exp(scaled), 0.0)
        out[i] = probs / probs.sum()
    return out
