"""Read LoRA adapter files (PEFT folders, llama.cpp GGUF LoRA) into GGUF-named triples.

What lives here: the two formats, every check against the model's config (architecture,
module names, shapes, ranks, A/B pairs, unsupported features) and the scale rules. What does
not: where each GGUF weight's LoRA lands in the fused `LayerParams` leaves
(`layout.lora_pieces`) and the pytrees built from the triples (`lora.adapters`).

Axis letters as in `model.py`, plus R (LoRA rank).

- PEFT folder (`adapter_config.json` + `adapter_model.safetensors`): lora_A [R, in],
  lora_B [out, R] in HF layout; scale lora_alpha / r, or lora_alpha / sqrt(r) with
  `use_rslora`, with per-module `rank_pattern` / `alpha_pattern` (PEFT's `get_pattern_key`:
  the first key k, in order, such that `re.match(rf"(.*\\.)?({k})$", module_name)`).
  HF's q/k rows are in rotate_half order while our weights keep GGUF's permuted rows, so
  lora_B of q_proj / k_proj is row-permuted (`layout.permute_qk_rows_to_gguf`, DESIGN §4);
  lora_A and the other projections are unaffected.
- llama.cpp GGUF LoRA (`general.type = adapter`, `adapter.type = lora`,
  `adapter.lora.alpha`, tensors `<base weight>.lora_a` [R, in] / `.lora_b` [out, R], lora_b
  already in GGUF row order): scale = alpha / R per tensor, or 1 when alpha is 0 or absent
  (llama.cpp `src/llama-adapter.h`, `llama_adapter_lora_weight::get_scale`:
  `alpha ? adapter_scale * alpha / rank : adapter_scale`, rank = b's ne[0]; a missing
  `adapter.lora.alpha` reads as 0 in `src/llama-adapter.cpp`).
"""

import json
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from safetensors import safe_open

from realm_jax.config import SUPPORTED_ARCHITECTURES, ModelConfig
from realm_jax.errors import AdapterError, GGUFError, UnsupportedModelError
from realm_jax.gguf import MAX_EXPANSION, check_tensor, open_gguf, read_metadata
from realm_jax.layout import expected_shapes, lora_pieces, permute_qk_rows_to_gguf

# A LoRA in GGUF names: weight name -> (A [R, in], B [out, R] in GGUF row order, scale), the
# form `reference.forward_reference(lora=...)` takes.
LoraTensors = dict[str, tuple[np.ndarray, np.ndarray, float]]

# PEFT module path inside a llama layer -> llama.cpp tensor kind (convert_hf_to_gguf.py).
PEFT_MODULES = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_KEY = re.compile(
    r"(?:base_model\.model\.)?model\.layers\.(\d+)\."
    r"(self_attn\.[qkvo]_proj|mlp\.(?:gate|up|down)_proj)\.lora_([AB])\.weight"
)
# PEFT config entries that change the math in ways we do not implement: key -> test of the
# harmless value.
PEFT_UNSUPPORTED = {
    "use_dora": lambda v: not v,
    "fan_in_fan_out": lambda v: not v,
    "bias": lambda v: v in (None, "none"),
    "lora_bias": lambda v: not v,
    "modules_to_save": lambda v: not v,
    "layer_replication": lambda v: not v,
    "use_qalora": lambda v: not v,
    "target_parameters": lambda v: not v,
    "trainable_token_indices": lambda v: not v,
    "alora_invocation_tokens": lambda v: not v,
}
GGUF_LORA_KEY = re.compile(r"(.+)\.lora_([ab])")
GGUF_LAYER_WEIGHT = re.compile(r"blk\.(\d+)\.(\w+)\.weight")
VOCAB_WEIGHTS = ("token_embd.weight", "output.weight")
SAFETENSORS_FLOATS = ("F16", "BF16", "F32", "F64")


def read_adapter_tensors(path: str | os.PathLike, config: ModelConfig) -> LoraTensors:
    """Read a PEFT folder or a llama.cpp GGUF LoRA file, checked against `config`.

    Returns:
      GGUF weight name -> (A [R, in] float32, B [out, R] float32 in GGUF row order, scale),
      as `reference.forward_reference(lora=...)` takes it.

    Raises:
      AdapterError: the path is neither format, or anything in it does not fit the model
        (architecture, module, shape, a missing half of an A/B pair, unsupported features).
    """
    path = Path(os.fspath(path))
    if path.is_dir():
        return _read_peft(path, config)
    if path.is_file():
        with open(path, "rb") as f:
            magic = f.read(4)
        if magic == b"GGUF":
            return _read_gguf_lora(path, config)
        if path.name == PEFT_CONFIG or path.suffix == ".safetensors":
            return _read_peft(path.parent, config)
        raise AdapterError(
            f"{path}: neither a PEFT adapter folder nor a GGUF file (magic {magic!r})"
        )
    raise AdapterError(f"{path}: no such file or folder")


def _regex(pattern: str, how: str, text: str) -> bool:
    """re.match / re.fullmatch of a pattern from adapter_config.json; a bad one is an
    AdapterError."""
    try:
        return getattr(re, how)(pattern, text) is not None
    except re.error as e:
        raise AdapterError(f"{PEFT_CONFIG}: {pattern!r} is not a regular expression ({e})") from e


def _peft_rank_alpha(cfg: Mapping[str, Any], module: str) -> tuple[int, float]:
    """PEFT's rank and alpha for one module name, honouring rank_pattern / alpha_pattern
    (peft.utils.other.get_pattern_key: first matching key in insertion order)."""

    def lookup(pattern: Mapping[str, Any], default):
        for key, value in (pattern or {}).items():
            if _regex(rf"(.*\.)?({key})$", "match", module):
                return value
        return default

    return lookup(cfg.get("rank_pattern"), cfg["r"]), lookup(
        cfg.get("alpha_pattern"), cfg["lora_alpha"]
    )


def _peft_targets(target_modules: Any, module: str) -> bool:
    """Whether PEFT's `target_modules` selects `module` (peft's `check_target_module_exists`:
    a string is a full regex match, a list matches the name or its dotted suffix)."""
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return _regex(target_modules, "fullmatch", module)
    return any(module == t or module.endswith("." + t) for t in target_modules)


def _read_peft_config(folder: Path) -> dict[str, Any]:
    config_path = folder / PEFT_CONFIG
    if not config_path.is_file():
        raise AdapterError(f"{folder}: no {PEFT_CONFIG}, so not a PEFT adapter folder")
    try:
        cfg = json.loads(config_path.read_text())
    except (OSError, ValueError) as e:
        raise AdapterError(f"{config_path}: unreadable JSON ({e})") from e
    if not isinstance(cfg, dict):
        raise AdapterError(f"{config_path}: expected a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"{config_path}: peft_type {cfg['peft_type']!r} is not LORA")
    for key, harmless in PEFT_UNSUPPORTED.items():
        if not harmless(cfg.get(key)):
            raise AdapterError(f"{config_path}: {key}={cfg[key]!r} is not supported")

    def number(value, integer=False) -> bool:
        kinds = (int,) if integer else (int, float)
        return isinstance(value, kinds) and not isinstance(value, bool) and value > 0

    if not number(cfg.get("r"), integer=True):
        raise AdapterError(f"{config_path}: r={cfg.get('r')!r} is not a positive integer")
    if not number(cfg.get("lora_alpha")):
        raise AdapterError(f"{config_path}: lora_alpha={cfg.get('lora_alpha')!r} is not > 0")
    for key, integer in (("rank_pattern", True), ("alpha_pattern", False)):
        pattern = cfg.get(key) or {}
        if not isinstance(pattern, dict) or not all(
            isinstance(k, str) and number(v, integer) for k, v in pattern.items()
        ):
            raise AdapterError(f"{config_path}: {key}={pattern!r} is not a name -> number map")
    return cfg


def _read_peft(folder: Path, config: ModelConfig) -> LoraTensors:
    cfg = _read_peft_config(folder)
    weights = folder / PEFT_WEIGHTS
    if not weights.is_file():
        other = " (adapter_model.bin is not read: convert it to safetensors)"
        raise AdapterError(
            f"{folder}: no {PEFT_WEIGHTS}"
            + (other if (folder / "adapter_model.bin").exists() else "")
        )
    try:
        with safe_open(str(weights), framework="numpy") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            dtypes = {k: f.get_slice(k).get_dtype() for k in f.keys()}
    except Exception as e:  # safetensors raises SafetensorError, OSError, ValueError...
        raise AdapterError(f"{weights}: unreadable safetensors file ({e})") from e

    pairs: dict[tuple[int, str], dict[str, str]] = {}
    for key in shapes:
        match = PEFT_KEY.fullmatch(key)
        if match is None:
            if "embed_tokens" in key or "lm_head" in key:
                raise AdapterError(
                    f"{weights}: tensor {key!r}: LoRA on the vocabulary (embedding or output) "
                    "is not supported"
                )
            raise AdapterError(f"{weights}: tensor {key!r} is not a LoRA A/B of a llama module")
        layer, module, half = int(match[1]), match[2], match[3]
        if layer >= config.n_layers:
            raise AdapterError(
                f"{weights}: tensor {key!r}: layer {layer}, but the model has "
                f"{config.n_layers} layers"
            )
        if dtypes[key] not in SAFETENSORS_FLOATS:
            raise AdapterError(f"{weights}: tensor {key!r} has dtype {dtypes[key]}, not a float")
        pairs.setdefault((layer, module), {})[half] = key

    rslora = bool(cfg.get("use_rslora"))
    plan = []
    for (layer, module), halves in sorted(pairs.items()):
        name = f"model.layers.{layer}.{module}"
        if set(halves) != {"A", "B"}:
            missing = ({"A", "B"} - set(halves)).pop()
            raise AdapterError(
                f"{weights}: {name}.lora_{missing}.weight is missing (found only "
                f"{next(iter(halves.values()))!r})"
            )
        if not _peft_targets(cfg.get("target_modules"), name):
            raise AdapterError(
                f"{weights}: tensor {halves['A']!r} is for a module that target_modules "
                f"{cfg.get('target_modules')!r} does not select"
            )
        rank, alpha = _peft_rank_alpha(cfg, name)
        kind = PEFT_MODULES[module]
        want_a, want_b = expected_shapes(config, kind, rank)
        for half, want in (("A", want_a), ("B", want_b)):
            if shapes[halves[half]] != want:
                raise AdapterError(
                    f"{weights}: tensor {halves[half]!r} has shape {shapes[halves[half]]}, "
                    f"expected {want} (rank {rank} from {PEFT_CONFIG}, model dims)"
                )
        scale = alpha / (math.sqrt(rank) if rslora else rank)
        plan.append((f"blk.{layer}.{kind}.weight", kind, halves, float(scale)))
    if not plan:
        raise AdapterError(f"{weights}: holds no LoRA tensors")

    out: LoraTensors = {}
    with safe_open(str(weights), framework="numpy") as f:
        for name, kind, halves, scale in plan:
            a = np.asarray(f.get_tensor(halves["A"]), np.float32)  # [R, in]
            b = np.asarray(f.get_tensor(halves["B"]), np.float32)  # [out, R], HF row order
            if kind == "attn_q":
                b = permute_qk_rows_to_gguf(b, config.n_heads)
            elif kind == "attn_k":
                b = permute_qk_rows_to_gguf(b, config.n_kv_heads)
            out[name] = (a, b, scale)
    return out


def _read_gguf_lora(path: Path, config: ModelConfig) -> LoraTensors:
    try:
        reader = open_gguf(path)
        metadata = read_metadata(reader, str(path))
    except GGUFError as e:
        raise AdapterError(str(e)) from e
    kind_of_file = metadata.get("general.type")
    if kind_of_file != "adapter":
        raise AdapterError(
            f"{path}: general.type is {kind_of_file!r}, not 'adapter'"
            + (" (a model file: load it with load_model)" if kind_of_file == "model" else "")
        )
    if metadata.get("adapter.type") != "lora":
        raise AdapterError(f"{path}: adapter.type is {metadata.get('adapter.type')!r}, not 'lora'")
    arch = metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise AdapterError(
            f"{path}: adapter architecture {arch!r} does not match the model's "
            f"({', '.join(SUPPORTED_ARCHITECTURES)})"
        )
    alpha = metadata.get("adapter.lora.alpha", 0.0)  # llama.cpp reads a missing key as 0
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise AdapterError(f"{path}: adapter.lora.alpha = {alpha!r} is not a number")

    pairs: dict[str, dict[str, Any]] = {}
    for tensor in reader.tensors:
        match = GGUF_LORA_KEY.fullmatch(tensor.name)
        if match is None:
            raise AdapterError(
                f"{path}: tensor {tensor.name!r} is not a .lora_a / .lora_b tensor "
                "(norm vectors and other extras are not supported)"
            )
        pairs.setdefault(match[1], {})[match[2]] = tensor

    pieces = lora_pieces(config)
    budget = [MAX_EXPANSION * os.path.getsize(path)]
    plan = []
    for name, halves in pairs.items():
        if name in VOCAB_WEIGHTS:
            raise AdapterError(
                f"{path}: tensor {name + '.lora_a'!r}: LoRA on the vocabulary (embedding or "
                "output) is not supported"
            )
        match = GGUF_LAYER_WEIGHT.fullmatch(name)
        if match is None or match[2] not in pieces:
            raise AdapterError(
                f"{path}: tensor {name + '.lora_a'!r}: {name!r} is not a "
                "weight of a llama model that LoRA can change"
            )
        layer, kind = int(match[1]), match[2]
        if layer >= config.n_layers:
            raise AdapterError(
                f"{path}: tensor {name + '.lora_a'!r}: layer {layer}, but the model has "
                f"{config.n_layers} layers"
            )
        if set(halves) != {"a", "b"}:
            missing = ({"a", "b"} - set(halves)).pop()
            raise AdapterError(
                f"{path}: tensor {name}.lora_{missing} is missing (its pair "
                f"{name}.lora_{'ab'.replace(missing, '')} is present)"
            )
        # gguf-py's tensor.shape is GGUF's ne: the rank is b's ne[0], as llama.cpp reads it;
        # the NumPy shapes (ne reversed) must then be a [R, in] and b [out, R].
        rank = int(halves["b"].shape[0])
        if rank < 1:
            raise AdapterError(f"{path}: tensor {name}.lora_b has rank {rank}")
        want_a, want_b = expected_shapes(config, kind, rank)
        try:
            check_tensor(str(path), halves["a"], want_a, budget)
            check_tensor(str(path), halves["b"], want_b, budget)
        except (GGUFError, UnsupportedModelError) as e:
            raise AdapterError(f"{e} (LoRA rank {rank} from lora_b's ne[0])") from e
        scale = alpha / rank if alpha else 1.0
        plan.append((name, halves, want_a, want_b, float(scale)))

    if not plan:
        raise AdapterError(f"{path}: holds no LoRA tensors")
    out: LoraTensors = {}
    for name, halves, want_a, want_b, scale in plan:
        arrays = []
        for half, shape in (("a", want_a), ("b", want_b)):
            t = halves[half]
            try:
                array = gguf.quants.dequantize(t.data, t.tensor_type).reshape(shape)
            except Exception as e:
                raise AdapterError(f"{path}: tensor {t.name!r} cannot be dequantized ({e})") from e
            arrays.append(np.asarray(array, np.float32))
        out[name] = (arrays[0], arrays[1], scale)
    return out
