"""``adakd eval``: the paper's evaluation protocol in one command (generation + ROUGE-L over seeds)."""

from __future__ import annotations

import argparse
import os
import sys

from ..errors import InputError


def _ints(flag: str):
    def parse(text: str) -> list[int]:
        try:
            return [int(x) for x in text.split(",") if x.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag} takes comma-separated integers, got {text!r}") from None

    return parse


def add_parser(sub) -> None:
    """Register the ``eval`` subcommand on ``sub`` (the result of ``ArgumentParser.add_subparsers()``)."""
    p = sub.add_parser(
        "eval",
        help="generate and score ROUGE-L on the paper's evaluation sets",
        description="Sample answers for the evaluation sets with each seed and report ROUGE-L (mean ± std).",
    )
    p.add_argument("--model", required=True, help="a model directory (or hub id), or a LoRA adapter with --base-model")
    p.add_argument("--base-model", default=None, help="the base model of a LoRA adapter given as --model")
    p.add_argument("--tokenizer", default=None, help="defaults to --model ('byte': the built-in byte tokenizer)")
    p.add_argument(
        "--data-dir",
        default=os.environ.get("ADAKD_EVAL_DATA"),
        help="MiniLLM's layout: dolly/valid.jsonl, sinst/11_/valid.jsonl, ... (default: $ADAKD_EVAL_DATA)",
    )
    p.add_argument("--datasets", default="dolly,self-inst,vicuna,sinst,uinst", help="names, or name=path pairs")
    p.add_argument("--seeds", type=_ints("--seeds"), default=[10, 20, 30, 40, 50])
    p.add_argument("--limit", type=int, default=None, help="the first N examples of each set")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=512, help="prompt + answer tokens")
    p.add_argument("--max-prompt-length", type=int, default=256, help="longer prompts keep their last tokens")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0: off")
    p.add_argument("--greedy", action="store_true", help="greedy decoding instead of sampling")
    p.add_argument(
        "--chat-template",
        nargs="?",
        const=TOKENIZER_TEMPLATE,
        default=None,
        metavar="NAME_OR_JINJA",
        help="for chat models: each record's instruction (+ input) as one user turn of the tokenizer's chat template "
        "(or NAME: qwen2, or a Jinja file), generating from the assistant's turn; default: the raw MiniLLM prompt",
    )
    p.add_argument(
        "--backend",
        default="hf",
        help="hf (default), vllm (vLLM's engine in this process) or vllm-server (a running vLLM server: --server-url; "
        "--model then only names the tokenizer, the served model's folder or hub id)",
    )
    p.add_argument("--server-url", default=None, help="vllm-server: the server's root, http://host:port")
    p.add_argument("--server-model", default=None, help="vllm-server: the served model's name (default: the only one)")
    p.add_argument("--server-api-key-env", default=None, help="vllm-server: the variable holding the API key, if any")
    p.add_argument("--server-timeout", type=float, default=600.0, help="vllm-server: seconds one request may take")
    p.add_argument("--device", default="cuda" if _cuda() else "cpu")
    p.add_argument("--dtype", default="auto", help="auto, float32, bfloat16, float16")
    p.add_argument("--output", required=True, help="results JSON; predictions go to <stem>.predictions/")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(handler=run)


# --chat-template without a value: the tokenizer's own template (a value no template name or file path is).
TOKENIZER_TEMPLATE = ""


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


def run(args: argparse.Namespace) -> int:
    """Check the flags, load the sets and the model, evaluate, print the table; 0 on success."""
    from ..eval.run import evaluate, format_table, predictions_dir
    from ..eval.sets import chat_template_for, load_eval_set, resolve_eval_sets, user_turns
    from ..generation import GenerationConfig, load_backend

    if args.batch_size < 1:
        raise InputError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not 0 < args.max_prompt_length < args.max_length:
        raise InputError("--max-prompt-length must be positive and below --max-length")
    if not args.seeds:
        raise InputError("--seeds: give at least one seed")
    paths = resolve_eval_sets(args.data_dir, [x for x in args.datasets.split(",") if x])
    sets = [load_eval_set(name, path, limit=args.limit) for name, path in paths.items()]
    for s in sets:
        print(f"[adakd] {s.name}: {len(s.records)} examples from {s.path}", file=sys.stderr)
    chat = None
    if args.chat_template is not None:
        # Refused before the model loads: a record that cannot be one user turn, a template name or file that is not
        # one. The tokenizer's own template is looked up once the tokenizer is loaded.
        for s in sets:
            user_turns(s)
        if args.chat_template != TOKENIZER_TEMPLATE:
            chat = chat_template_for(None, args.chat_template, args.tokenizer or args.model)
    config = GenerationConfig(
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        greedy=args.greedy,
        batch_size=args.batch_size,
    )
    backend = load_backend(
        args.backend,
        args.model,
        base_model=args.base_model,
        tokenizer=args.tokenizer,
        device=args.device,
        dtype=args.dtype,
        server_url=args.server_url,
        server_model=args.server_model,
        server_api_key_env=args.server_api_key_env,
        server_timeout=args.server_timeout,
    )
    if args.chat_template is not None:
        name = args.tokenizer or args.model
        chat = chat or chat_template_for(backend.tokenizer, None, name)
        which = f"the tokenizer's own ({name})" if chat.source == "tokenizer" else chat.source
        print(f"[adakd] prompts: each record as one user turn, chat template: {which}", file=sys.stderr)
    results = evaluate(
        backend, sets, args.seeds, config, args.output, args.model, show_progress=not args.quiet, chat_template=chat
    )
    gen = results["generation"]
    print(format_table(results))
    print(
        f"[adakd] {gen['generated_tokens']} tokens decoded in {gen['generation_seconds']:.1f} s of generation, "
        f"{gen['tokens_per_second']:.1f} tokens/s ({gen['answer_tokens']} kept in the answers); wall "
        f"{gen['wall_seconds']:.1f} s, scoring {gen['scoring_seconds']:.2f} s; results in {args.output}, "
        f"predictions in {predictions_dir(args.output)}",
        file=sys.stderr,
    )
    return 0
