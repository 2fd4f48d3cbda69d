"""Exceptions raised for input a user can get wrong; every one derives from `RealmError`.

Messages say what was wrong and where (file, tensor, adapter, request), so that a user never
sees a bare KeyError, assert or shape error from deep inside NumPy or JAX.
"""


class RealmError(Exception):
    """Base class of every error realm-jax raises for bad input."""


class GGUFError(RealmError):
    """A GGUF file is unreadable, truncated, inconsistent or hostile."""


class UnsupportedModelError(RealmError):
    """A well-formed GGUF file describes a model or tensor type realm-jax does not run."""


class TokenizerError(RealmError):
    """A vocabulary or chat template in the GGUF metadata cannot be used."""


class AdapterError(RealmError):
    """A LoRA adapter does not load or does not fit the model."""


class RequestError(RealmError):
    """A generation request is invalid: prompt, lengths or sampling parameters."""
