"""`ModelConfig`: the static shape of a llama-family model, read from GGUF metadata.

The config is frozen and hashable and holds no arrays, so jitted functions take it as a static
argument. Presets for tests are plain functions (`tiny()`), as gpt-fast keeps its configs.
Axis letters (see `model.py`): D model width, F FFN width, V vocabulary, L layers,
N query heads, K KV heads, H head dim.
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

from realm_jax.errors import GGUFError, UnsupportedModelError

SUPPORTED_ARCHITECTURES = ("llama",)

# Limits that no llama-family model we could run on one accelerator exceeds; metadata beyond
# them is refused before anything is allocated (a hostile file could otherwise ask for a
# terabyte-sized cache or embedding).
MAX_VOCAB = 1 << 22
MAX_DIM = 1 << 16
MAX_LAYERS = 1 << 10
MAX_HEADS = 1 << 10
MAX_CONTEXT = 1 << 24


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Hyper-parameters of a llama-family decoder.

    Attributes:
      vocab_size: V, rows of the token embedding.
      dim: D, the residual stream width.
      n_layers: L, transformer blocks.
      n_heads: N, query heads.
      n_kv_heads: K, key/value heads; N % K == 0 (grouped-query attention, G = N // K).
      head_dim: H, width of one head (usually D // N).
      ffn_dim: F, SwiGLU hidden width.
      rope_base: RoPE frequency base (theta).
      rope_dim: leading dims of each head that RoPE rotates (== H for llama).
      norm_eps: RMSNorm epsilon.
      context_length: the model's trained context; prompts + generation beyond it are refused.
      tied_embeddings: True when logits use the token embedding (no separate output matrix).
    """

    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    rope_base: float = 10000.0
    rope_dim: int = 0
    norm_eps: float = 1e-5
    context_length: int = 2048
    tied_embeddings: bool = True

    def __post_init__(self):
        if self.rope_dim == 0:
            object.__setattr__(self, "rope_dim", self.head_dim)
        self.validate()

    @property
    def group_size(self) -> int:
        """G = N // K, query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    def validate(self) -> None:
        """Raise `GGUFError` for values that are inconsistent or absurdly large."""
        limits = dict(
            vocab_size=MAX_VOCAB,
            dim=MAX_DIM,
            n_layers=MAX_LAYERS,
            n_heads=MAX_HEADS,
            n_kv_heads=MAX_HEADS,
            head_dim=MAX_DIM,
            ffn_dim=MAX_DIM * 8,
            context_length=MAX_CONTEXT,
        )
        for name, limit in limits.items():
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or not 0 < value <= limit:
                raise GGUFError(f"model config: {name}={value!r} is outside 1..{limit}")
        if self.n_heads % self.n_kv_heads:
            raise GGUFError(
                f"model config: n_heads={self.n_heads} is not a multiple of "
                f"n_kv_heads={self.n_kv_heads}"
            )
        if not (0 < self.rope_dim <= self.head_dim and self.rope_dim % 2 == 0):
            raise GGUFError(
                f"model config: rope_dim={self.rope_dim} must be even and within "
                f"1..head_dim={self.head_dim}"
            )
        if not (self.rope_base > 0 and self.norm_eps > 0):
            raise GGUFError(
                f"model config: rope_base={self.rope_base} and norm_eps={self.norm_eps} "
                "must be positive"
            )

    @classmethod
    def from_gguf_metadata(cls, meta: Mapping[str, Any], *, tied_embeddings: bool) -> "ModelConfig":
        """Build a config from decoded GGUF key/value metadata (see `gguf.read_gguf`).

        Raises:
          UnsupportedModelError: `general.architecture` is not a llama-family one.
          GGUFError: a required key is missing or holds a value of the wrong kind.
        """
        arch = meta.get("general.architecture")
        if arch not in SUPPORTED_ARCHITECTURES:
            raise UnsupportedModelError(
                f"architecture {arch!r} is not supported (supported: "
                f"{', '.join(SUPPORTED_ARCHITECTURES)})"
            )

        def get(key: str, kind: type, default: Any = None) -> Any:
            full = f"{arch}.{key}"
            if full not in meta:
                if default is None:
                    raise GGUFError(f"metadata key {full!r} is missing")
                return default
            value = meta[full]
            if kind is float and isinstance(value, int) and not isinstance(value, bool):
                value = float(value)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise GGUFError(f"metadata key {full!r} = {value!r} is not a {kind.__name__}")
            return value

        dim = get("embedding_length", int)
        n_heads = get("attention.head_count", int)
        if not isinstance(n_heads, int) or n_heads <= 0 or dim % n_heads:
            raise GGUFError(
                f"metadata: embedding_length={dim} is not a multiple of head_count={n_heads}"
            )
        head_dim = get("attention.key_length", int, dim // n_heads)
        vocab = meta.get(f"{arch}.vocab_size")
        if vocab is None:
            tokens = meta.get("tokenizer.ggml.tokens")
            vocab = len(tokens) if isinstance(tokens, list) else None
        if vocab is None:
            raise GGUFError(f"metadata: neither {arch}.vocab_size nor tokenizer.ggml.tokens")
        return cls(
            vocab_size=vocab,
            dim=dim,
            n_layers=get("block_count", int),
            n_heads=n_heads,
            n_kv_heads=get("attention.head_count_kv", int, n_heads),
            head_dim=head_dim,
            ffn_dim=get("feed_forward_length", int),
            rope_base=get("rope.freq_base", float, 10000.0),
            rope_dim=get("rope.dimension_count", int, head_dim),
            norm_eps=get("attention.layer_norm_rms_epsilon", float),
            context_length=get("context_length", int, 2048),
            tied_embeddings=tied_embeddings,
        )


def tiny(**overrides: Any) -> ModelConfig:
    """A small config for tests: 2 layers, GQA 4:2, head dim 16, vocabulary 64."""
    values = dict(
        vocab_size=64,
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        head_dim=16,
        ffn_dim=96,
        rope_base=10000.0,
        norm_eps=1e-5,
        context_length=256,
        tied_embeddings=True,
    )
    values.update(overrides)
    return ModelConfig(**values)
