"""LoRA adapters: PEFT and GGUF files on synthetic models against the float64 reference with
merged, unmerged and multi-adapter strategies, stacks for serving, bad adapters, and the real
model against HF + PEFT's golden logits (shared/golden/lora_r8_attn*)."""

import json
import math

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

import realm_jax as rj
from realm_jax.config import tiny
from realm_jax.gguf import read_gguf
from realm_jax.layout import params_from_tensors
from realm_jax.lora.adapters import adapter_from_tensors, adapter_nbytes
from realm_jax.lora.files import read_adapter_tensors
from realm_jax.model import stack_layers
from realm_jax.reference import forward_reference, permute_qk_rows_to_gguf
from realm_jax.steps.decode import prompt_logits
from realm_jax.steps.state import StepSpec, Weights
from realm_jax.testing import assert_close, random_tensors, write_gguf

CONFIG = tiny(vocab_size=300)  # GQA: 4 query heads, 2 KV heads of 16 dims
HF_MODULES = {  # PEFT module -> (GGUF kind, rows permuted by heads of ...)
    "self_attn.q_proj": ("attn_q", "n_heads"),
    "self_attn.k_proj": ("attn_k", "n_kv_heads"),
    "self_attn.v_proj": ("attn_v", None),
    "self_attn.o_proj": ("attn_output", None),
    "mlp.gate_proj": ("ffn_gate", None),
    "mlp.up_proj": ("ffn_up", None),
    "mlp.down_proj": ("ffn_down", None),
}
T = 21  # prompt length (bucket 32)


def _dims(config, kind):
    """(out, in) of a GGUF layer weight."""
    d, q, kv, f = (
        config.dim,
        config.n_heads * config.head_dim,
        config.n_kv_heads * config.head_dim,
        config.ffn_dim,
    )
    return {
        "attn_q": (q, d),
        "attn_k": (kv, d),
        "attn_v": (kv, d),
        "attn_output": (d, q),
        "ffn_gate": (f, d),
        "ffn_up": (f, d),
        "ffn_down": (d, f),
    }[kind]


def _pair(rng, config, kind, rank):
    out, inn = _dims(config, kind)
    a = (rng.uniform(-1, 1, (rank, inn)) / np.sqrt(inn)).astype(np.float32)
    b = (0.3 * rng.standard_normal((out, rank))).astype(np.float32)
    return a, b


def write_peft(folder, config, modules, seed, **settings):
    """A PEFT folder; `modules` is [(layer, module, rank, expected scale)]. Returns the
    expected GGUF-named LoRA for the reference (B rows of q/k permuted here, by hand)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    tensors, expected = {}, {}
    for layer, module, rank, scale in modules:
        kind, heads = HF_MODULES[module]
        a, b = _pair(rng, config, kind, rank)
        key = f"base_model.model.model.layers.{layer}.{module}"
        tensors[f"{key}.lora_A.weight"] = a
        tensors[f"{key}.lora_B.weight"] = b
        b_gguf = permute_qk_rows_to_gguf(b, getattr(config, heads)) if heads else b
        expected[f"blk.{layer}.{kind}.weight"] = (a, b_gguf, scale)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    cfg = dict(
        peft_type="LORA",
        r=4,
        lora_alpha=8,
        use_rslora=False,
        target_modules=sorted({m.split(".")[1] for _, m, _, _ in modules}),
        rank_pattern={},
        alpha_pattern={},
        bias="none",
        fan_in_fan_out=False,
        use_dora=False,
        modules_to_save=None,
    )
    cfg.update(settings)
    (folder / "adapter_config.json").write_text(json.dumps(cfg))
    return expected


def write_gguf_lora(
    path,
    tensors,
    alpha=None,
    *,
    arch="llama",
    general_type="adapter",
    adapter_type="lora",
    dtype=np.float32,
):
    """A llama.cpp GGUF LoRA: `tensors` maps names to NumPy arrays (lora_a [R, in],
    lora_b [out, R]); alpha None writes no adapter.lora.alpha key."""
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type(general_type)
    writer.add_string("adapter.type", adapter_type)
    if alpha is not None:
        writer.add_float32("adapter.lora.alpha", float(alpha))
    for name, array in tensors.items():
        writer.add_tensor(name, np.ascontiguousarray(array, dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def gguf_lora(path, config, modules, alpha, seed, dtype=np.float32):
    """Write a GGUF LoRA of [(layer, kind, rank)]; returns the expected reference LoRA."""
    rng = np.random.default_rng(seed)
    tensors, expected = {}, {}
    for layer, kind, rank in modules:
        a, b = _pair(rng, config, kind, rank)
        a, b = a.astype(dtype), b.astype(dtype)
        name = f"blk.{layer}.{kind}.weight"
        tensors[name + ".lora_a"], tensors[name + ".lora_b"] = a, b
        expected[name] = (a, b, alpha / rank if alpha else 1.0)  # llama.cpp's rule, by hand
    write_gguf_lora(path, tensors, alpha, dtype=dtype)
    return expected


# Synthetic adapters: name -> writer(folder) -> expected reference LoRA.
ALL_PEFT = [
    (0, "self_attn.q_proj", 4, 2.0),
    (0, "self_attn.k_proj", 2, 4.0),  # rank_pattern k_proj: 2 -> 8 / 2
    (0, "self_attn.v_proj", 4, 0.75),  # alpha_pattern v_proj: 3 -> 3 / 4
    (0, "self_attn.o_proj", 4, 2.0),
    (0, "mlp.gate_proj", 4, 2.0),
    (0, "mlp.up_proj", 4, 2.0),
    (0, "mlp.down_proj", 4, 2.0),
    (1, "self_attn.q_proj", 4, 2.0),
    (1, "self_attn.k_proj", 2, 4.0),
    (1, "mlp.down_proj", 6, 8 / 6),  # rank_pattern on this one layer's module
]
ADAPTERS = {
    "peft_patterns": lambda d: write_peft(
        d / "peft_patterns",
        CONFIG,
        ALL_PEFT,
        seed=1,
        rank_pattern={"model.layers.1.mlp.down_proj": 6, "k_proj": 2},
        alpha_pattern={"v_proj": 3},
    ),
    "peft_rslora": lambda d: write_peft(
        d / "peft_rslora",
        CONFIG,
        [(0, "self_attn.q_proj", 8, 4 / math.sqrt(8)), (1, "mlp.up_proj", 8, 4 / math.sqrt(8))],
        seed=2,
        r=8,
        lora_alpha=4,
        use_rslora=True,
    ),
    "gguf_alpha0": lambda d: gguf_lora(
        d / "alpha0.gguf",
        CONFIG,
        [(0, "attn_k", 3), (0, "attn_output", 3), (1, "ffn_gate", 3), (1, "attn_v", 3)],
        alpha=0.0,
        seed=3,
    ),
    "gguf_f16_r6": lambda d: gguf_lora(
        d / "r6.gguf",
        CONFIG,
        [(i, k, 6) for i in range(2) for k in ("attn_q", "ffn_up", "ffn_down")],
        alpha=12.0,
        seed=4,
        dtype=np.float16,
    ),
}
PATHS = {
    "peft_patterns": "peft_patterns",
    "peft_rslora": "peft_rslora",
    "gguf_alpha0": "alpha0.gguf",
    "gguf_f16_r6": "r6.gguf",
}


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """The tiny model (tuple layout), its tensors, a stacked-layers twin, and the adapters:
    name -> (path, expected reference LoRA)."""
    folder = tmp_path_factory.mktemp("lora")
    write_gguf(folder / "model.gguf", CONFIG, random_tensors(CONFIG, seed=11))
    model = rj.load_model(folder / "model.gguf")
    stacked = rj.Model(model.config, stack_layers(model.params), model.tokenizer, model.path)
    adapters = {name: (folder / PATHS[name], write(folder)) for name, write in ADAPTERS.items()}
    tensors = read_gguf(folder / "model.gguf").tensors
    return model, stacked, tensors, adapters


def _ids(seed=0, length=T):
    return np.random.default_rng(seed).integers(0, CONFIG.vocab_size, size=length).tolist()


def _reference(tensors, ids, lora=None):
    return forward_reference(CONFIG, tensors, ids, lora=lora)


@pytest.mark.parametrize("name", list(ADAPTERS))
def test_read_adapter_tensors_matches_hand_conversion(synthetic, name):
    """Scales (alpha/r, rsLoRA, patterns, llama.cpp's alpha 0) and the q/k permutation."""
    _, _, _, adapters = synthetic
    path, expected = adapters[name]
    got = read_adapter_tensors(path, CONFIG)
    assert sorted(got) == sorted(expected)
    for key, (a, b, scale) in expected.items():
        np.testing.assert_array_equal(got[key][0], a.astype(np.float32), err_msg=key)
        np.testing.assert_array_equal(got[key][1], b.astype(np.float32), err_msg=key)
        assert got[key][2] == pytest.approx(scale, rel=1e-12), key


@pytest.mark.parametrize("name", list(ADAPTERS))
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_strategies_match_float64_reference(synthetic, name, strategy):
    model, _, tensors, adapters = synthetic
    path, expected = adapters[name]
    ids = _ids()
    want = _reference(tensors, ids, expected)
    assert np.abs(want - _reference(tensors, ids)).max() > 0.1  # the adapter matters
    adapter = rj.load_adapter(path, model)
    got = rj.logits(model, ids, adapter=adapter, lora_strategy=strategy)
    assert_close(got, want, what=f"{name} {strategy} vs float64 reference")


@pytest.mark.slow
@pytest.mark.parametrize("strategy", ["merged", "unmerged"])
def test_stacked_layers_match_reference(synthetic, strategy):
    """The scan path ([L, ...] leaves) with adapters whose layers touch different weights."""
    _, stacked, tensors, adapters = synthetic
    for name in ("peft_rslora", "gguf_alpha0"):
        path, expected = adapters[name]
        adapter = rj.load_adapter(path, stacked)
        assert not isinstance(adapter.layers, tuple)
        got = rj.logits(stacked, _ids(1), adapter=adapter, lora_strategy=strategy)
        assert_close(got, _reference(tensors, _ids(1), expected), what=f"stacked {name}")


def _batch_logits(model, rows, stack, ids):
    tokens = np.zeros((len(rows), 32), np.int32)
    for b, row in enumerate(rows):
        tokens[b, : len(row)] = row
    counts = np.asarray([len(r) for r in rows], np.int32)
    weights = Weights(model.params, lora=stack)
    spec = StepSpec(model.config, 32)
    out = prompt_logits(weights, tokens, counts, np.asarray(ids, np.int32), spec=spec)
    return np.asarray(out)


def test_multi_adapter_rows_equal_rows_alone(synthetic):
    """One batch, rows of different adapters and base rows (slot 0): each row matches the
    reference with its own adapter and the row run alone, and is bitwise independent of its
    neighbours (their prompts and adapters). The batch (7 rows, a stack of 5) takes
    `lora_delta`'s dense form, each row alone in the same stack its gathered form."""
    model, _, tensors, adapters = synthetic
    names = list(ADAPTERS)
    loaded = [rj.load_adapter(adapters[n][0], model) for n in names]
    stack = rj.stack_adapters([None, *loaded])  # slot 0 = base
    assert stack.num_adapters == 1 + len(names)
    slots = [0, 1, 2, 3, 4, 1, 0]
    rows = [_ids(20 + b, length=n) for b, n in enumerate([21, 19, 30, 24, 21, 17, 28])]
    batched = _batch_logits(model, rows, stack, slots)
    for b, (row, slot) in enumerate(zip(rows, slots, strict=True)):
        lora = adapters[names[slot - 1]][1] if slot else None
        want = _reference(tensors, row, lora)
        got = batched[b, : len(row)]
        assert_close(got, want, what=f"row {b} (slot {slot}) vs reference")
        adapter = loaded[slot - 1] if slot else None
        alone = rj.logits(model, row, adapter=adapter, lora_strategy="unmerged")
        assert_close(got, alone, what=f"row {b} vs alone")
        np.testing.assert_array_equal(got.argmax(-1), alone.argmax(-1))
        gathered = _batch_logits(model, [row], stack, [slot])[0, : len(row)]  # M = 5 > 2 B
        assert_close(gathered, want, what=f"row {b} (slot {slot}) alone in the stack")
    # Neighbours: other prompts and other adapters around row 2; row 2 is bitwise unchanged.
    others = [_ids(90 + b, length=12) for b in range(len(rows))]
    mixed = others[:2] + [rows[2]] + others[3:]
    again = _batch_logits(model, mixed, stack, [4, 3, slots[2], 0, 1, 2, 3])
    np.testing.assert_array_equal(again[2, : len(rows[2])], batched[2, : len(rows[2])])


def test_greedy_generation_with_adapter(synthetic):
    """Cached decoding with the adapter (both strategies) = argmax of the float64 reference
    re-run at every step."""
    model, _, tensors, adapters = synthetic
    path, expected = adapters["peft_patterns"]
    adapter = rj.load_adapter(path, model)
    ids = _ids(6, length=7)  # a prompt whose greedy path the adapter changes (at step 5)
    merged = rj.generate(model, ids, 10, stop_at_eos=False, adapter=adapter)
    unmerged = rj.generate(
        model, ids, 10, stop_at_eos=False, adapter=adapter, lora_strategy="unmerged"
    )
    sequence = list(ids)
    for _ in range(10):
        sequence.append(int(np.argmax(_reference(tensors, sequence, expected)[-1])))
    assert merged == unmerged == sequence[len(ids) :]
    assert merged != rj.generate(model, ids, 10, stop_at_eos=False)


def test_zero_b_adapter_is_the_base_model(synthetic, tmp_path):
    model, _, _, _ = synthetic
    tensors = {}
    for kind in ("attn_q", "attn_output", "ffn_down"):
        a, b = _pair(np.random.default_rng(0), CONFIG, kind, 4)
        tensors[f"blk.0.{kind}.weight.lora_a"] = a
        tensors[f"blk.0.{kind}.weight.lora_b"] = np.zeros_like(b)
    write_gguf_lora(tmp_path / "zero.gguf", tensors, alpha=8.0)
    adapter = rj.load_adapter(tmp_path / "zero.gguf", model)
    base = rj.logits(model, _ids(3))
    np.testing.assert_array_equal(rj.logits(model, _ids(3), adapter=adapter), base)
    unmerged = rj.logits(model, _ids(3), adapter=adapter, lora_strategy="unmerged")
    assert_close(unmerged, base, what="B = 0, unmerged")


def test_merge_leaves_base_params_bitwise_unchanged(synthetic):
    model, _, _, adapters = synthetic
    before = [np.array(x) for x in jax.tree.leaves(model.params)]
    adapter = rj.load_adapter(adapters["peft_patterns"][0], model)
    merged = rj.merge_adapter(model.params, adapter)
    assert not np.array_equal(merged.layers[0].wqkv, model.params.layers[0].wqkv)  # it merged
    assert merged.embed is model.params.embed  # untouched leaves are shared, not copied
    del merged, adapter
    for old, new in zip(before, jax.tree.leaves(model.params), strict=True):
        np.testing.assert_array_equal(old, np.asarray(new))


def test_adapter_tree_lines_up_with_params(synthetic):
    """Every delta's tensordot(a * scale, b) has its weight's shape and dtype; the merged
    params have the base's exact tree structure, shapes and dtypes."""
    model, stacked, _, adapters = synthetic
    for m in (model, stacked):
        adapter = rj.load_adapter(adapters["peft_patterns"][0], m)
        spec = jax.eval_shape(rj.merge_adapter, m.params, adapter)
        assert jax.tree.structure(spec) == jax.tree.structure(m.params)
        shapes = jax.tree.map(lambda x: (x.shape, x.dtype), m.params)
        assert jax.tree.map(lambda x: (x.shape, x.dtype), spec) == shapes
    layer = rj.load_adapter(adapters["peft_patterns"][0], model).layers[1]
    assert layer.wo is None and layer.w_gate_up is None  # layer 1: q, k, down only
    assert layer.wqkv.rank == 4 + 2 and layer.w_down.rank == 6
    # q's rank components write only the query heads, k's only the key heads
    b = np.asarray(layer.wqkv.b)  # [R, N + 2K, H]
    n, k = CONFIG.n_heads, CONFIG.n_kv_heads
    assert not b[:4, n:].any() and not b[4:, :n].any() and not b[4:, n + k :].any()


def test_serving_stack_slots(synthetic, tmp_path):
    """Slot 0 = base; adding, replacing and removing one slot keeps shapes when the adapter
    fits; a bigger one grows the stack; the results always match stacks built directly."""
    model, _, _, adapters = synthetic
    a = rj.load_adapter(adapters["gguf_alpha0"][0], model)
    b = rj.load_adapter(adapters["peft_patterns"][0], model)
    gguf_lora(tmp_path / "big.gguf", CONFIG, [(0, "attn_q", 12), (1, "ffn_down", 2)], 6.0, 9)
    c = rj.load_adapter(tmp_path / "big.gguf", model)  # wqkv rank 12 > the stack's 10
    stack = rj.stack_adapters([None, b, None])
    shapes = jax.tree.map(jnp.shape, stack)
    fits = rj.set_adapter_slot(stack, 2, a)  # a's targets and ranks fit inside b's
    assert jax.tree.map(jnp.shape, fits) == shapes
    direct = rj.stack_adapters([None, b, a])
    for x, y in zip(jax.tree.leaves(fits), jax.tree.leaves(direct), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    removed = rj.set_adapter_slot(fits, 1, None)
    for x, y in zip(jax.tree.leaves(removed), jax.tree.leaves(fits), strict=True):
        np.testing.assert_array_equal(np.asarray(x)[1], 0)
        np.testing.assert_array_equal(np.asarray(x)[2], np.asarray(y)[2])
    grown = rj.set_adapter_slot(fits, 1, c)
    assert jax.tree.map(jnp.shape, grown) != shapes
    rows = [_ids(40, 11), _ids(41, 11), _ids(42, 11)]
    out = _batch_logits(model, rows, grown, [0, 1, 2])
    for row, adapter, got in zip(rows, (None, c, a), out, strict=True):
        want = rj.logits(model, row, adapter=adapter)
        assert_close(got[:11], want, what="grown stack row")
    assert adapter_nbytes(grown) > adapter_nbytes(fits)
    with pytest.raises(rj.AdapterError, match="slot 3"):
        rj.set_adapter_slot(fits, 3, a)
    with pytest.raises(rj.AdapterError, match="at least one adapter"):
        rj.stack_adapters([None, None])


# ---------------------------------------------------------------------------------------------
# Bad adapters: each raises AdapterError naming the file (and tensor).


def _peft_bad(tmp_path, change_config=None, change_tensors=None):
    folder = tmp_path / "bad_peft"
    write_peft(folder, CONFIG, [(0, "self_attn.q_proj", 4, 2.0), (0, "mlp.down_proj", 4, 2.0)], 0)
    if change_config:
        cfg = json.loads((folder / "adapter_config.json").read_text())
        change_config(cfg)
        (folder / "adapter_config.json").write_text(json.dumps(cfg))
    if change_tensors:
        from safetensors.numpy import load_file

        tensors = load_file(str(folder / "adapter_model.safetensors"))
        change_tensors(tensors)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
    return folder


Q_A = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
Q_B = Q_A.replace("lora_A", "lora_B")
PEFT_CASES = {
    "unknown module": (
        lambda t: t.update({Q_A.replace("q_proj", "rotary_emb"): t[Q_A]}),
        None,
        r"'base_model\.model\.model\.layers\.0\.self_attn\.rotary_emb\.lora_A\.weight' is not "
        "a LoRA A/B",
    ),
    "missing half": (lambda t: t.pop(Q_B), None, r"q_proj\.lora_B\.weight is missing"),
    "embedding": (
        lambda t: t.update({"base_model.model.model.embed_tokens.lora_embedding_A": t[Q_A]}),
        None,
        "vocabulary",
    ),
    "lm_head": (
        lambda t: t.update({"base_model.model.lm_head.lora_A.weight": t[Q_A]}),
        None,
        "vocabulary",
    ),
    "shape": (lambda t: t.update({Q_A: t[Q_A][:, :-1].copy()}), None, r"shape \(4, 63\)"),
    "rank vs config": (None, lambda c: c.update(r=8), r"expected \(8, \d+\) \(rank 8"),
    "layer": (
        lambda t: t.update(
            {
                Q_A.replace("layers.0", "layers.7"): t[Q_A],
                Q_B.replace("layers.0", "layers.7"): t[Q_B],
            }
        ),
        None,
        "layer 7, but the model has 2 layers",
    ),
    "not targeted": (None, lambda c: c.update(target_modules=["q_proj"]), "target_modules"),
    "dora": (None, lambda c: c.update(use_dora=True), "use_dora=True is not supported"),
    "peft type": (None, lambda c: c.update(peft_type="IA3"), "peft_type 'IA3' is not LORA"),
    "bad r": (None, lambda c: c.update(r=0), "r=0 is not a positive integer"),
    "integer tensor": (
        lambda t: t.update({Q_A: t[Q_A].astype(np.int32)}),
        None,
        "dtype I32, not a float",
    ),
}


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_bad_peft_adapters(synthetic, tmp_path, case):
    model = synthetic[0]
    change_tensors, change_config, match = PEFT_CASES[case]
    folder = _peft_bad(tmp_path, change_config, change_tensors)
    with pytest.raises(rj.AdapterError, match=match) as info:
        rj.load_adapter(folder, model)
    assert "bad_peft" in str(info.value)


def test_bad_peft_files(synthetic, tmp_path):
    model = synthetic[0]
    with pytest.raises(rj.AdapterError, match="no such file"):
        rj.load_adapter(tmp_path / "nothing", model)
    (tmp_path / "empty").mkdir()
    with pytest.raises(rj.AdapterError, match="no adapter_config.json"):
        rj.load_adapter(tmp_path / "empty", model)
    folder = _peft_bad(tmp_path)
    (folder / "adapter_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad")
    with pytest.raises(rj.AdapterError, match="unreadable safetensors"):
        rj.load_adapter(folder, model)
    (folder / "adapter_model.safetensors").unlink()
    with pytest.raises(rj.AdapterError, match="no adapter_model.safetensors"):
        rj.load_adapter(folder, model)
    (folder / "adapter_config.json").write_text("{not json")
    with pytest.raises(rj.AdapterError, match="unreadable JSON"):
        rj.load_adapter(folder, model)
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(rj.AdapterError, match="neither a PEFT adapter folder nor a GGUF"):
        rj.load_adapter(tmp_path / "notes.txt", model)


def _gguf_pair(kind="attn_q", rank=4, layer=0):
    a, b = _pair(np.random.default_rng(0), CONFIG, kind, rank)
    name = f"blk.{layer}.{kind}.weight"
    return {name + ".lora_a": a, name + ".lora_b": b}


GGUF_CASES = {
    "architecture": (dict(arch="gpt2"), _gguf_pair(), "architecture 'gpt2' does not match"),
    "not an adapter": (dict(general_type="model"), _gguf_pair(), "not 'adapter'"),
    "not lora": (dict(adapter_type="control_vector"), _gguf_pair(), "adapter.type"),
    "missing half": (
        {},
        {k: v for k, v in _gguf_pair().items() if k.endswith("lora_a")},
        r"blk\.0\.attn_q\.weight\.lora_b is missing",
    ),
    "vocabulary": (
        {},
        {
            "token_embd.weight.lora_a": np.ones((4, 300), np.float32),
            "token_embd.weight.lora_b": np.ones((64, 4), np.float32),
        },
        "vocabulary",
    ),
    "unknown weight": (
        {},
        {
            "blk.0.attn_norm.weight.lora_a": np.ones((4, 64), np.float32),
            "blk.0.attn_norm.weight.lora_b": np.ones((64, 4), np.float32),
        },
        "'blk.0.attn_norm.weight' is not a weight",
    ),
    "norm tensor": (
        {},
        {**_gguf_pair(), "blk.0.attn_norm.weight": np.ones((64,), np.float32)},
        "'blk.0.attn_norm.weight' is not a .lora_a",
    ),
    "shape": (
        {},
        {**_gguf_pair(), "blk.0.attn_q.weight.lora_a": np.ones((4, 65), np.float32)},
        r"'blk\.0\.attn_q\.weight\.lora_a' has shape \(4, 65\), expected \(4, 64\)",
    ),
    "transposed": (
        {},
        {
            "blk.0.ffn_down.weight.lora_a": np.ones((96, 4), np.float32),
            "blk.0.ffn_down.weight.lora_b": np.ones((64, 4), np.float32),
        },
        "lora_a' has shape",
    ),
    "layer": ({}, _gguf_pair(layer=5), "layer 5, but the model has 2 layers"),
}


@pytest.mark.parametrize("case", list(GGUF_CASES))
def test_bad_gguf_adapters(synthetic, tmp_path, case):
    model = synthetic[0]
    options, tensors, match = GGUF_CASES[case]
    path = tmp_path / "bad.gguf"
    write_gguf_lora(path, tensors, alpha=8.0, **options)
    with pytest.raises(rj.AdapterError, match=match) as info:
        rj.load_adapter(path, model)
    assert "bad.gguf" in str(info.value)


def test_bad_gguf_files_and_mismatched_use(synthetic, tmp_path):
    model = synthetic[0]
    path = tmp_path / "cut.gguf"
    write_gguf_lora(path, _gguf_pair(), alpha=8.0)
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(rj.AdapterError, match="cut.gguf"):
        rj.load_adapter(path, model)
    with pytest.raises(rj.AdapterError, match="not 'adapter'"):
        rj.load_adapter(model.path, model)  # a model file
    # an adapter loaded for another model, and a bad strategy
    other = tiny(vocab_size=300, dim=96, n_heads=6, n_kv_heads=2)
    write_gguf(tmp_path / "other.gguf", other, random_tensors(other))
    other_model = rj.load_model(tmp_path / "other.gguf")
    write_gguf_lora(
        tmp_path / "fits_other.gguf",
        {
            "blk.0.ffn_up.weight.lora_a": np.ones((2, 96), np.float32),
            "blk.0.ffn_up.weight.lora_b": np.ones((96, 2), np.float32),
        },
        alpha=2.0,
    )
    foreign = rj.load_adapter(tmp_path / "fits_other.gguf", other_model)
    with pytest.raises(rj.AdapterError, match="does not fit the model"):
        rj.logits(model, _ids(), adapter=foreign)
    with pytest.raises(rj.RequestError, match="lora_strategy"):
        rj.logits(model, _ids(), adapter=foreign, lora_strategy="fused")
    with pytest.raises(rj.AdapterError, match="expected an rj.LoraAdapter"):
        rj.generate(model, _ids(), 2, adapter="tenant-a")


# ---------------------------------------------------------------------------------------------
# The real model against HF + PEFT (shared/golden/README.md, lora_r8_attn sections).

GOLDEN_SOURCES = ["lora_r8_attn", "lora_r8_attn.gguf"]


@pytest.fixture(scope="module")
def lora_golden(golden_dir) -> dict:
    with np.load(golden_dir / "lora_r8_attn_hf.npz") as data:
        return dict(data)


@pytest.mark.model
@pytest.mark.parametrize("source", GOLDEN_SOURCES)
def test_golden_logits(smollm2, golden_dir, lora_golden, source):
    adapter = rj.load_adapter(golden_dir / source, smollm2)
    for name in ("capital", "chat"):
        ours = rj.logits(smollm2, lora_golden[f"ids_{name}"].tolist(), adapter=adapter)
        assert_close(ours, lora_golden[f"lora_logits_{name}"], what=f"{source} {name}, all")


@pytest.mark.model
def test_golden_unmerged_and_greedy(smollm2, golden_dir, lora_golden):
    adapter = rj.load_adapter(golden_dir / "lora_r8_attn", smollm2)
    ids = lora_golden["ids_capital"].tolist()
    ours = rj.logits(smollm2, ids, adapter=adapter, lora_strategy="unmerged")
    assert_close(ours, lora_golden["lora_logits_capital"], what="capital, unmerged")
    out = rj.generate(smollm2, ids, max_new_tokens=16, stop_at_eos=False, adapter=adapter)
    assert out == lora_golden["lora_gen_capital"].tolist()


def test_layout_and_reference_permute_qk_rows_alike():
    """The loader's Q/K row permutation (`layout`) and the golden's (`reference`), written
    apart, agree, and undoing the golden's restores the rows (a real permutation)."""
    from realm_jax import layout, reference

    rows = np.arange(3 * 16 * 5, dtype=np.float32).reshape(3 * 16, 5)  # 3 heads of H = 16
    permuted = layout.permute_qk_rows_to_gguf(rows, 3)
    np.testing.assert_array_equal(permuted, reference.permute_qk_rows_to_gguf(rows, 3))
    assert not np.array_equal(permuted, rows)
    np.testing.assert_array_equal(reference.permute_qk_rows_from_gguf(permuted, 3), rows)


@pytest.mark.model
def test_golden_fails_without_qk_permutation(smollm2, golden_dir, lora_golden, monkeypatch):
    """Positive control: PEFT's lora_B rows for q/k left in HF order must fail the check."""
    monkeypatch.setattr("realm_jax.lora.files.permute_qk_rows_to_gguf", lambda w, heads: w)
    adapter = rj.load_adapter(golden_dir / "lora_r8_attn", smollm2)
    ids = lora_golden["ids_chat"].tolist()
    wrong = rj.logits(smollm2, ids, adapter=adapter)
    with pytest.raises(AssertionError, match="not close"):
        assert_close(wrong, lora_golden["lora_logits_chat"], what="chat, q/k rows unpermuted")
    assert np.abs(wrong - lora_golden["lora_logits_chat"]).max() > 0.5


@pytest.mark.parametrize("stacked", [False, True])
def test_no_adapter_means_no_lora_operations(stacked):
    """`Weights(params)` (no stack) traces a decode step with the base products only: six per
    layer (qkv, the two attention products, o, gate/up, down) and the output projection; a
    stack of one adapter on two projections adds 2 x 2 per layer (`lora_delta`'s two
    products). Counted in the jaxpr, scans' bodies counted once."""
    from realm_jax.kv_cache import init_cache
    from realm_jax.sampling import SamplingParams
    from realm_jax.steps.decode import decode_step_unjitted
    from realm_jax.steps.state import StepSpec, host_rows

    config = tiny(vocab_size=300)
    params = params_from_tensors(config, random_tensors(config), stacked=stacked)
    cache = init_cache(config, 2, 32, stacked=stacked)
    greedy = SamplingParams.from_rows([rj.Sampling()] * 2)
    rows = host_rows([1, 2], [True, True], [9, 9], [-1, -1], greedy, [0, 0], [0, 0], [0, 0])

    def dots(weights):
        jaxpr = jax.make_jaxpr(lambda w, r, c: decode_step_unjitted(w, r, c, StepSpec(config, 32)))(
            weights, rows, cache
        )
        return str(jaxpr).count("dot_general")

    layers = 1 if stacked else config.n_layers  # a scan's body appears once
    assert dots(Weights(params)) == 6 * layers + 1
    rng = np.random.default_rng(0)
    tensors = {
        f"blk.{i}.{kind}.weight": (
            rng.standard_normal((2, config.dim)).astype(np.float32),
            rng.standard_normal((out, 2)).astype(np.float32),
            1.0,
        )
        for i in range(config.n_layers)
        for kind, out in (("attn_q", config.n_heads * config.head_dim), ("ffn_up", config.ffn_dim))
    }
    stack = rj.stack_adapters([adapter_from_tensors(config, tensors, stacked=stacked)])
    assert dots(Weights(params, lora=stack)) == (6 + 4) * layers + 1
