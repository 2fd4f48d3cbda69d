"""LoRA adapters: `tree` (the pytrees), `adapters` (build, check, stack, merge, load) and
`files` (PEFT folders and llama.cpp GGUF LoRA files, read into GGUF-named triples).

Import from the modules (`from realm_jax.lora.adapters import load_adapter`); the package
itself imports nothing, so that `model.py` can name the pytrees' types without importing the
code that builds them (which imports `model.py`). The public names are also `rj.*`.
"""
