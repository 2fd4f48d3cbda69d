"""`realm-jax generate` and `realm-jax info`: the command line.

Errors a user can cause print one line (`error: ...`) and exit with status 1, no traceback.
"""

import argparse
import collections
import os
import sys
import time
from pathlib import Path

from realm_jax.loading import INSTALL_HINT, default_model_path


def _generate(args: argparse.Namespace) -> None:
    import realm_jax as rj

    path = Path(args.model) if args.model else default_model_path()
    sampling = rj.Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    start = time.perf_counter()
    model = rj.load_model(path, dtype=args.dtype)
    load_s = time.perf_counter() - start
    tokenizer = model.tokenizer
    prompt = args.prompt
    if args.chat:
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True
        )
    ids = tokenizer.encode(prompt)
    options = dict(
        max_new_tokens=args.max_tokens,
        sampling=sampling,
        seed=args.seed,
        stop_at_eos=True,
        implementation=args.attention,
    )
    if args.adapter:
        options["adapter"] = rj.load_adapter(args.adapter, model)
    if args.lora_strategy:
        options["lora_strategy"] = args.lora_strategy
    stats = None
    if args.draft_layers:
        from realm_jax.generation import SpeculativeStats

        stats = SpeculativeStats()
        options.update(
            draft=rj.layer_skip_draft(model, args.draft_layers),
            num_draft_tokens=args.num_draft_tokens,
            stats=stats,
        )
    # Warm-up: compile both steps for these shapes, so the speeds below exclude compilation.
    start = time.perf_counter()
    for produced, _ in enumerate(rj.stream(model, ids, **options)):
        if produced == 1:
            break
    compile_s = time.perf_counter() - start
    print(
        f"[{path.name}: {model.config.n_layers} layers, loaded in {load_s:.1f} s, "
        f"compiled in {compile_s:.1f} s]",
        file=sys.stderr,
    )

    decoder = tokenizer.decode_stream()
    if not args.chat:
        sys.stdout.write(prompt)
    start = time.perf_counter()
    first_token_at, count = None, 0
    for token in rj.stream(model, ids, **options):
        if first_token_at is None:
            first_token_at = time.perf_counter()
        count += 1
        if token == tokenizer.eos_id:
            break
        sys.stdout.write(decoder.push(token))
        sys.stdout.flush()
    end = time.perf_counter()
    sys.stdout.write("\n")
    prefill_s = (first_token_at or end) - start
    decode_s = end - (first_token_at or end)
    # the first token comes from the prefill: a decode rate needs at least one more
    rate = f"{(count - 1) / decode_s:.1f} tok/s" if count > 1 and decode_s > 0 else "no rate"
    print(
        f"prompt: {len(ids)} tokens, {len(ids) / prefill_s:.1f} tok/s | "
        f"decode: {count} tokens, {rate}",
        file=sys.stderr,
    )
    if stats is not None and stats.target_calls:
        print(
            f"speculative: draft of {args.draft_layers} layers, k = {args.num_draft_tokens}: "
            f"{stats.accepted} of {stats.drafted} draft tokens accepted, "
            f"{stats.tokens_per_call:.2f} tokens per target call",
            file=sys.stderr,
        )


def _info(args: argparse.Namespace) -> None:
    from realm_jax.config import ModelConfig
    from realm_jax.gguf import open_gguf, read_metadata

    path = os.fspath(args.model)
    reader = open_gguf(path)
    metadata = read_metadata(reader, path)
    names = {t.name for t in reader.tensors}
    adapter = metadata.get("general.type") == "adapter"  # a llama.cpp GGUF LoRA
    if not adapter:
        config = ModelConfig.from_gguf_metadata(
            metadata, tied_embeddings="output.weight" not in names
        )
    print(f"file: {path} ({os.path.getsize(path) / 1e6:.1f} MB)")
    print(
        f"name: {metadata.get('general.name', '?')}  architecture: "
        f"{metadata.get('general.architecture', '?')}"
    )
    if adapter:
        print(
            f"adapter: {metadata.get('adapter.type', '?')}, alpha "
            f"{metadata.get('adapter.lora.alpha', 'absent (read as 0: scale 1)')} "
            "(load it with rj.load_adapter)"
        )
    else:
        for field in config.__dataclass_fields__:
            print(f"  {field}: {getattr(config, field)}")
        print(
            f"tokenizer: {metadata.get('tokenizer.ggml.model')} "
            f"(pre {metadata.get('tokenizer.ggml.pre', 'default')}), "
            f"chat template: {'yes' if 'tokenizer.chat_template' in metadata else 'no'}"
        )
    by_type = collections.defaultdict(lambda: [0, 0, 0])
    for t in reader.tensors:
        row = by_type[t.tensor_type.name]
        row[0] += 1
        row[1] += int(t.n_elements)
        row[2] += int(t.n_bytes)
    total = sum(row[1] for row in by_type.values())
    print(
        f"tensors: {len(reader.tensors)}, {total / 1e6:.1f} M parameters "
        f"({4 * total / 1e6:.0f} MB as float32)"
    )
    print(f"  {'type':<8}{'count':>7}{'params (M)':>12}{'bytes (MB)':>12}")
    for name, (count, elements, nbytes) in sorted(by_type.items()):
        print(f"  {name:<8}{count:>7}{elements / 1e6:>12.2f}{nbytes / 1e6:>12.2f}")
    if args.tensors:
        for t in reader.tensors:
            shape = "x".join(str(int(d)) for d in reversed(t.shape.tolist()))
            print(f"  {t.name:<32}{t.tensor_type.name:<8}{shape}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="realm-jax", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    gen = commands.add_parser("generate", help="generate text, streamed as it is produced")
    gen.add_argument("--model", help=f"a GGUF file (default: SmolLM2-135M from {INSTALL_HINT})")
    gen.add_argument("--prompt", default="The capital of France is")
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the chat template")
    gen.add_argument("--max-tokens", type=int, default=64, help="new tokens at most (>= 1)")
    gen.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    gen.add_argument("--top-k", type=int, default=0, help="0 = off")
    gen.add_argument("--top-p", type=float, default=1.0, help="1 = off")
    gen.add_argument("--seed", type=int, default=0)
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    gen.add_argument("--adapter", help="a LoRA adapter: PEFT folder or llama.cpp GGUF LoRA file")
    gen.add_argument(
        "--lora-strategy",
        choices=["merged", "unmerged"],
        help="how --adapter runs (default: rj.generate's, merged)",
    )
    gen.add_argument(
        "--draft-layers",
        type=int,
        default=0,
        help="speculative decoding with the model's first N layers as the draft (0 = off)",
    )
    gen.add_argument("--num-draft-tokens", type=int, default=4, help="k, draft tokens per step")
    gen.add_argument("--attention", default="auto", choices=["auto", "xla", "pallas"])
    gen.set_defaults(run=_generate)
    info = commands.add_parser(
        "info", help="print a GGUF model's config (a LoRA's adapter keys) and tensor table"
    )
    info.add_argument("model")
    info.add_argument("--tensors", action="store_true", help="list every tensor")
    info.set_defaults(run=_info)
    return parser


def _enable_compilation_cache() -> None:
    """Keep compiled steps on disk, so a second run with the same shapes starts at once."""
    import jax

    folder = os.environ.get(
        "REALM_JAX_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "realm-jax", "xla")
    )
    if folder:  # REALM_JAX_CACHE="" turns it off
        jax.config.update("jax_compilation_cache_dir", folder)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from realm_jax.errors import RealmError

    _enable_compilation_cache()

    try:
        args.run(args)
    except RealmError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
