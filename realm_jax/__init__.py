"""realm-jax: a pure-JAX reference runtime for multi-tenant LLM inference.

This module re-exports the public surface (shared/API.md) and nothing else.
"""

from realm_jax import model
from realm_jax.attention import attention
from realm_jax.config import ModelConfig
from realm_jax.engine import Engine, TokenEvent
from realm_jax.errors import (
    AdapterError,
    GGUFError,
    RealmError,
    RequestError,
    TokenizerError,
    UnsupportedModelError,
)
from realm_jax.generation import generate, logits, stream
from realm_jax.loading import Model, load_model
from realm_jax.lora.adapters import load_adapter, merge_adapter, set_adapter_slot, stack_adapters
from realm_jax.lora.tree import LoraAdapter, LoraStack
from realm_jax.sampling import Sampling
from realm_jax.steps.drafts import LayerSkipDraft, layer_skip_draft
from realm_jax.tokenizer import Tokenizer

__all__ = [
    "AdapterError",
    "Engine",
    "LayerSkipDraft",
    "GGUFError",
    "LoraAdapter",
    "LoraStack",
    "Model",
    "ModelConfig",
    "RealmError",
    "RequestError",
    "Sampling",
    "TokenEvent",
    "Tokenizer",
    "TokenizerError",
    "UnsupportedModelError",
    "attention",
    "generate",
    "load_adapter",
    "layer_skip_draft",
    "load_model",
    "logits",
    "merge_adapter",
    "model",
    "set_adapter_slot",
    "stack_adapters",
    "stream",
]
