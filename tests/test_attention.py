"""`rj.attention` and its implementations against the float64 NumPy `attention_reference`.

One test body runs every implementation: the XLA path, the Pallas prefill kernel and the
Pallas decoding kernel (both in interpret mode here; natively under the `gpu` mark), each fed
shapes that hit the kernels' edges: T = 1, T and S not multiples of the blocks, S < one tile,
GQA ratios 1, 3, 4, 8, head dims 32..256, rows of very different lengths in one batch, rows of
length 1 and 0, padded queries beyond a row's length. The kernels run with their outputs
poisoned (NaN-filled and aliased), so an element they fail to write cannot pass. Positive
controls show that an off-by-one limit and an unwritten block are caught.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

import realm_jax as rj
from realm_jax.attention import pallas, resolve_implementation
from realm_jax.attention.xla import xla_attention
from realm_jax.errors import RealmError
from realm_jax.model import stack_layers
from realm_jax.reference import attention_reference
from realm_jax.testing import assert_close

ON_GPU = jax.default_backend() == "gpu"
needs_gpu = pytest.mark.skipif(not ON_GPU, reason="needs a GPU (the Triton lowering)")


@dataclasses.dataclass(frozen=True)
class Case:
    """One attention problem: B rows of `lengths`, T queries at positions
    max(0, length - T) + t (chunked prefill / decode; queries beyond a short row's length
    are padding and see all of its keys), N query heads over K KV heads of dim H, S keys.
    `kernels` are the Pallas kernels run on it besides the XLA path (what the dispatcher
    would pick, plus the other kernel on two small cases); `bf16` adds a bfloat16 run of
    the XLA path and of the last of `kernels` only (each interpreted kernel shape costs
    seconds of compilation on a CPU)."""

    name: str
    t: int
    n: int
    k: int
    h: int
    s: int
    lengths: tuple[int, ...]
    kernels: tuple[str, ...] = ("pallas_prefill", "pallas_decode")
    bf16: bool = False


PREFILL, DECODE = ("pallas_prefill",), ("pallas_decode",)
CASES = [
    Case("decode_gqa3_len0_len1", t=1, n=9, k=3, h=64, s=300, lengths=(300, 1, 0, 157), bf16=True),
    Case("decode_gqa8_s2500", t=1, n=16, k=2, h=128, s=2500, lengths=(2500, 1234), kernels=DECODE),
    Case("verify_gqa4", t=5, n=8, k=2, h=64, s=200, lengths=(200, 77, 5)),
    Case("s_below_one_tile_h256", t=3, n=4, k=2, h=256, s=7, lengths=(7, 3), kernels=DECODE),
    Case("prefill_t37_gqa1_h32", t=37, n=4, k=4, h=32, s=100, lengths=(100, 37), kernels=PREFILL),
    Case(
        "prefill_ragged_gqa3_h128",
        t=64,
        n=6,
        k=2,
        h=128,
        s=777,
        lengths=(700, 20, 1, 0),
        kernels=PREFILL,
        bf16=True,
    ),
    Case("prefill_t1200_gqa8", t=1200, n=8, k=1, h=64, s=1200, lengths=(1200,), kernels=PREFILL),
    Case("prefill_h256", t=20, n=2, k=1, h=256, s=50, lengths=(50, 31), kernels=PREFILL),
]


XLA = jax.jit(xla_attention)


def _kernels(interpret: bool) -> dict:
    return {
        "xla": XLA,
        "pallas_prefill": functools.partial(
            pallas.flash_attention, interpret=interpret, poison=True
        ),
        "pallas_decode": functools.partial(pallas.flash_decoding, interpret=interpret, poison=True),
    }


def _params():
    """(implementation, case, dtype) triples; "_gpu" runs the kernels natively."""
    out = []
    for case in CASES:
        for dtype in ["float32"] + ["bfloat16"] * case.bf16:
            kernels = case.kernels if dtype == "float32" else case.kernels[-1:]
            for impl in ("xla", *kernels):
                out.append(pytest.param(impl, case, dtype, id=f"{impl}-{case.name}-{dtype}"))
                if impl != "xla":
                    out.append(
                        pytest.param(
                            impl + "_gpu",
                            case,
                            dtype,
                            id=f"{impl}_gpu-{case.name}-{dtype}",
                            marks=[pytest.mark.gpu, needs_gpu],
                        )
                    )
    return out


def make_inputs(case: Case, dtype: str, seed: int = 0):
    """(q, k_cache, v_cache, q_positions, kv_lengths) as jax arrays, standard normal values
    rounded to `dtype`."""
    rng = np.random.default_rng(seed)
    b = len(case.lengths)
    lengths = np.asarray(case.lengths, np.int32)
    positions = np.maximum(lengths - case.t, 0)[:, None] + np.arange(case.t, dtype=np.int32)
    q = rng.standard_normal((b, case.t, case.n, case.h))
    k = rng.standard_normal((b, case.s, case.k, case.h))
    v = rng.standard_normal((b, case.s, case.k, case.h))
    q, k, v = (jnp.asarray(x, dtype) for x in (q, k, v))
    return q, k, v, jnp.asarray(positions, jnp.int32), jnp.asarray(lengths)


def reference(q, k, v, positions, lengths) -> np.ndarray:
    """attention_reference on the (rounded) inputs, in float64."""
    q, k, v = (np.asarray(x.astype(jnp.float32)) for x in (q, k, v))
    return attention_reference(q, k, v, np.asarray(positions), np.asarray(lengths))


# An interpreted kernel is an XLA while loop over the grid whose compilation, not its run,
# dominates these tests (1.5-2.5 s per shape on the 2-core CPU); LLVM at -O0 halves it.
FAST_COMPILE = {"xla_backend_optimization_level": 0}


def compile_for(fn, inputs, fast: bool):
    """`fn` compiled for `inputs`' shapes, at -O0 when `fast`."""
    return jax.jit(fn).trace(*inputs).lower().compile(FAST_COMPILE if fast else None)


def compiled(impl: str, inputs):
    """`impl` compiled for `inputs`' shapes (interpreted kernels at -O0).

    Native kernels compile at "highest" matmul precision: on a GPU the default lets float32
    dots run in TF32 (10-bit mantissa; relative L2 error 2e-4..4e-4 on these cases on an
    H100), which the float32 row of the tolerance table does not cover (docs/attention.md).
    """
    interpret = not impl.endswith("_gpu")
    fn = _kernels(interpret)[impl.removesuffix("_gpu")]
    if interpret:
        return compile_for(fn, inputs, fast=impl != "xla")
    with jax.default_matmul_precision("highest"):
        return compile_for(fn, inputs, fast=False)


def run(impl: str, inputs) -> jax.Array:
    return compiled(impl, inputs)(*inputs)


@pytest.mark.parametrize("impl, case, dtype", _params())
def test_matches_float64_reference(impl, case, dtype):
    inputs = make_inputs(case, dtype)
    out = run(impl, inputs)
    assert out.shape == inputs[0].shape and out.dtype == inputs[0].dtype
    expected = reference(*inputs)
    assert_close(out, expected, dtype=dtype, kind="op", what=f"{impl} {case.name}")
    if 0 in case.lengths:  # a row with no valid key outputs exactly 0
        assert not np.asarray(out[np.asarray(case.lengths) == 0], np.float32).any()


@pytest.mark.parametrize("impl", ["pallas_prefill", "pallas_decode"])
def test_kernels_are_deterministic(impl):
    inputs = make_inputs(CASES[2], "float32", seed=1)
    kernel = compiled(impl, inputs)
    first, second = kernel(*inputs), kernel(*inputs)
    np.testing.assert_array_equal(np.asarray(first), np.asarray(second))


SMALL_BLOCKS = pallas.BlockSizes(block_rows=16, block_k=16, decode_block_k=16)


@pytest.mark.parametrize(
    "native",
    [
        pytest.param(False, id="interpret"),
        # Natively the kernels lower through Triton, whose out-of-bounds and loop-bound
        # behaviour interpret mode (which clamps slices) does not reproduce.
        pytest.param(True, id="gpu", marks=[pytest.mark.gpu, needs_gpu]),
    ],
)
@pytest.mark.parametrize("kernel", [pallas.flash_attention, pallas.flash_decoding])
def test_kernels_read_no_key_block_beyond_a_rows_length(kernel, native):
    """Keys from the first 16-key block past each row's length on are NaN: any read of them
    (even multiplied by a zero probability) would make the output NaN. So rows skip whole
    blocks and chunks by their loop bounds, not by masking alone. Run in interpret mode
    everywhere and natively (Triton) under the `gpu` mark."""
    case = Case("skip", t=2, n=4, k=2, h=64, s=130, lengths=(130, 40, 16, 1))
    q, k, v, positions, lengths = make_inputs(case, "float32", seed=2)
    first_unread = -(-np.asarray(lengths) // 16) * 16  # [B]
    beyond = (np.arange(case.s)[None, :] >= first_unread[:, None])[:, :, None, None]
    k_nan, v_nan = (jnp.where(jnp.asarray(beyond), jnp.nan, x) for x in (k, v))
    kernel = functools.partial(kernel, block_sizes=SMALL_BLOCKS, interpret=not native)
    nan_inputs = (q, k_nan, v_nan, positions, lengths)
    if native:  # float32 dots in full precision, not TF32 (see `compiled`)
        with jax.default_matmul_precision("highest"):
            out = compile_for(kernel, nan_inputs, fast=False)(*nan_inputs)
    else:
        out = compile_for(kernel, nan_inputs, fast=True)(*nan_inputs)
    assert_close(out, reference(q, k, v, positions, lengths), kind="op", what="NaN tail")


def test_off_by_one_limit_is_caught(monkeypatch):
    """Positive control: a kernel whose queries also see the key at their own position + 1
    must fail the comparison above."""
    inner = pallas._rows_layout

    def off_by_one(q, k_cache, q_positions, kv_lengths, num_rows):
        return inner(q, k_cache, q_positions + 1, kv_lengths + 1, num_rows)

    case = Case("off_by_one", t=20, n=4, k=2, h=64, s=64, lengths=(60, 20))
    inputs = make_inputs(case, "float32", seed=3)
    monkeypatch.setattr(pallas, "_rows_layout", off_by_one)
    jax.clear_caches()
    try:
        wrong = run("pallas_prefill", inputs)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    with pytest.raises(AssertionError, match="not close"):
        assert_close(wrong, reference(*inputs), kind="op", what="off-by-one limits")


def test_unwritten_output_is_caught(monkeypatch):
    """Positive control for the poisoned output: a kernel that skips the stores of its first
    grid step leaves NaN behind, and the comparison fails."""
    inner = pallas._flash_kernel

    def lazy_kernel(*refs, **kwargs):
        @pl.when(pl.program_id(0) != 0)
        def _():
            inner(*refs, **kwargs)

    case = Case("unwritten", t=40, n=2, k=1, h=64, s=40, lengths=(40,))
    inputs = make_inputs(case, "float32", seed=4)
    monkeypatch.setattr(pallas, "_flash_kernel", lazy_kernel)
    jax.clear_caches()
    try:
        out = run("pallas_prefill", inputs)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    assert np.isnan(np.asarray(out)).any()
    with pytest.raises(AssertionError, match="not close"):
        assert_close(out, reference(*inputs), kind="op", what="unwritten block")


@pytest.mark.parametrize(
    "t, expected", [(1, "flash_decoding"), (8, "flash_decoding"), (9, "flash_attention")]
)
def test_dispatch_picks_the_kernel_by_t(monkeypatch, t, expected):
    """rj.attention(implementation="pallas") runs flash decoding for T <= 8 and the prefill
    kernel above (the kernels themselves are replaced by spies; the model test below runs
    them end to end through this path)."""
    called = []

    def spy(name):
        def kernel(q, k_cache, v_cache, q_positions, kv_lengths, **kwargs):
            called.append(name)
            return xla_attention(q, k_cache, v_cache, q_positions, kv_lengths)

        return kernel

    for name in ("flash_decoding", "flash_attention"):
        monkeypatch.setattr(pallas, name, spy(name))
    case = Case("dispatch", t=t, n=4, k=2, h=32, s=48, lengths=(48, 13))
    inputs = make_inputs(case, "float32", seed=5)
    rj.attention(*inputs, implementation="pallas")
    assert called == [expected]
    monkeypatch.setenv("REALM_JAX_ATTENTION", "pallas")
    rj.attention(*inputs, implementation="auto")
    monkeypatch.setenv("REALM_JAX_ATTENTION", "xla")
    rj.attention(*inputs, implementation="auto")
    assert called == [expected, expected]


def test_auto_and_environment_override(monkeypatch):
    monkeypatch.delenv("REALM_JAX_ATTENTION", raising=False)
    assert resolve_implementation("auto") == ("pallas" if ON_GPU else "xla")
    assert resolve_implementation("xla") == "xla"
    monkeypatch.setenv("REALM_JAX_ATTENTION", "pallas")
    assert resolve_implementation("auto") == "pallas"
    assert resolve_implementation("xla") == "xla"  # the override only replaces "auto"
    monkeypatch.setenv("REALM_JAX_ATTENTION", "cudnn")
    with pytest.raises(RealmError, match="REALM_JAX_ATTENTION"):
        resolve_implementation("auto")
    with pytest.raises(RealmError, match="not one of"):
        resolve_implementation("flash")


def test_unsupported_head_dim(monkeypatch):
    """H = 80 is no Triton tile: explicit "pallas" refuses, "auto" falls back to XLA."""
    case = Case("h80", t=1, n=2, k=1, h=80, s=20, lengths=(20,))
    inputs = make_inputs(case, "float32", seed=6)
    with pytest.raises(NotImplementedError, match="head dim"):
        rj.attention(*inputs, implementation="pallas")
    monkeypatch.setenv("REALM_JAX_ATTENTION", "pallas")
    out = rj.attention(*inputs, implementation="auto")
    assert_close(out, reference(*inputs), kind="op", what="auto fallback")


@pytest.mark.slow
@pytest.mark.model
def test_model_golden_with_pallas(smollm2, golden):
    """The real model with the Pallas kernels (interpret mode on CPU) matches the golden
    logits at every position of `capital` and the last of `long` (342 tokens: the prefill
    kernel over several key blocks), and greedy decoding (the decoding kernel) reproduces
    the golden continuation. Layers are stacked under `lax.scan` so that each step compiles
    the interpreted kernel once rather than 30 times (a layout the golden tests cover with
    the XLA path)."""
    model = dataclasses.replace(smollm2, params=stack_layers(smollm2.params))
    ours = rj.logits(model, golden["ids_capital"].tolist(), implementation="pallas")
    assert_close(ours, golden["allpos_logits_capital"], what="pallas, capital, every position")
    ours = rj.logits(model, golden["ids_long"].tolist(), implementation="pallas")
    assert_close(ours[-1], golden["logits_long"], what="pallas, long, last position")
    ids = golden["ids_capital"].tolist()
    out = rj.generate(model, ids, max_new_tokens=8, stop_at_eos=False, implementation="pallas")
    assert out == golden["gen_capital"][:8].tolist()
