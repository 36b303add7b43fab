"""A teacher served by vLLM against the in-process teacher: fidelity, teacher positions per second, and whole training
steps per second with the served teacher, its requests prefetched or not.

    python bench/server_bench.py --url http://127.0.0.1:8000 --model smollm2 --folder DIR \\
        [--data T.jsonl --chats M.jsonl]

``DIR`` is the folder the server serves (the in-process teacher loads the same weights from it, float32 on both
sides); ``--data``: a prompt/output JSONL whose texts make the teacher part's batches (else random token ids);
``--chats``: a chat-messages JSONL to train on (else the built-in synthetic data). Start the server first, e.g.
with the CPU build of vLLM::

    VLLM_CPU_KVCACHE_SPACE=2 VLLM_CPU_OMP_THREADS_BIND=nobind python -m vllm.entrypoints.openai.api_server \\
        --model DIR --served-model-name smollm2 --max-logprobs 64 --dtype float32 --port 8000

1. Teacher: the same batches (``--batch-size`` × ``--length`` tokens, every position supervised) through the server
   (:class:`adakd.serving.TeacherServer`) and through the in-process model (forward + top-k,
   :func:`adakd.cache.writer.teacher_rows`): positions per second of each, and how far apart they are (top-k id sets
   equal, largest log-probability difference, largest tail-mass difference).
2. Training: a small student (inline Llama on the teacher's vocabulary) trained ``--steps`` steps from the served
   teacher with ``prefetch: 0`` and ``prefetch: 2``, and from the in-process teacher, one after the other in this
   process: the median step time of each (the first two steps left out). On one machine the server and the trainer
   share the cores, so the overlap prefetching buys is bounded by what the two leave idle; with the server on its
   own machine (a GPU box) the teacher's time hides behind the student's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402


def teacher_batches(tokenizer: Any, data: str | None, batches: int, size: int, length: int) -> list[dict]:
    """``batches`` right-filled batches of ``size`` rows × ``length`` tokens, every position supervised: texts of
    ``data`` concatenated (or random ids)."""
    generator = torch.Generator().manual_seed(0)
    total = batches * size * length
    if data:
        ids: list[int] = []
        with open(data) as f:
            for line in f:
                row = json.loads(line)
                text = row.get("prompt", "") + row.get("output", "") if "prompt" in row else str(row)
                ids += tokenizer(text, add_special_tokens=False)["input_ids"]
                if len(ids) >= total:
                    break
        flat = torch.tensor(ids[:total])
    else:
        flat = torch.randint(0, len(tokenizer), (total,), generator=generator)
    out = []
    for chunk in flat.view(batches, size, length):
        out.append({"input_ids": chunk, "attention_mask": torch.ones_like(chunk), "labels": chunk.clone()})
    return out


def teacher_part(args: argparse.Namespace) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adakd.cache.writer import teacher_rows
    from adakd.serving.http import Endpoint
    from adakd.serving.teacher import TeacherServer

    tokenizer = AutoTokenizer.from_pretrained(args.folder)
    model = AutoModelForCausalLM.from_pretrained(args.folder, dtype=torch.float32).eval()
    server = TeacherServer(Endpoint(args.url, key="--url", timeout=600), args.model, args.k)
    info = server.check(tokenizer, model.config.vocab_size)
    batches = teacher_batches(tokenizer, args.data, args.batches, args.batch_size, args.length)
    served, local = [], []
    server.rows(batches[0]["input_ids"][:1, :32], batches[0]["attention_mask"][:1, :32], batches[0]["labels"][:1, :32])
    teacher_rows(model, {k: v[:1, :32] for k, v in batches[0].items()}, args.k, None)  # warm-up of both
    seconds = {"server": 0.0, "in-process": 0.0}
    for batch in batches:
        start = time.perf_counter()
        served.append(server.rows(batch["input_ids"], batch["attention_mask"], batch["labels"]))
        seconds["server"] += time.perf_counter() - start
        start = time.perf_counter()
        local.append(teacher_rows(model, batch, args.k, None))
        seconds["in-process"] += time.perf_counter() - start
    a = type(served[0])(*(torch.cat(x) for x in zip(*served, strict=True)))
    b = type(local[0])(*(torch.cat(x) for x in zip(*local, strict=True)))
    positions = a.ids.shape[0]
    same = (a.ids.sort(-1).values == b.ids.sort(-1).values).all(-1)
    # log-probabilities of the ids both hold, compared id by id
    matched = b.logprobs.gather(-1, torch.argsort(b.ids, -1)).gather(-1, torch.argsort(torch.argsort(a.ids, -1), -1))
    diff = (a.logprobs - matched)[same].abs()
    tail = (a.tail.double().exp() - b.tail.double().exp()).abs()
    result = {
        "server": info,
        "positions": positions,
        "k": args.k,
        "topk_sets_equal": float(same.float().mean()),
        "max_logprob_diff": float(diff.max()) if diff.numel() else float("nan"),
        "mean_logprob_diff": float(diff.mean()) if diff.numel() else float("nan"),
        "max_tail_mass_diff": float(tail.max()),
        "positions_per_s": {name: positions / s for name, s in seconds.items()},
    }
    print(f"teacher, {positions} positions (batches of {args.batch_size} × {args.length}), k = {args.k}:")
    for name, rate in result["positions_per_s"].items():
        print(f"  {name:<11} {rate:8.0f} positions/s")
    print(
        f"  fidelity: top-k sets equal at {result['topk_sets_equal']:.2%} of positions, log-probabilities within "
        f"{result['max_logprob_diff']:.2e} (mean {result['mean_logprob_diff']:.1e}), tail mass within "
        f"{result['max_tail_mass_diff']:.1e}"
    )
    return result


def training_config(args: argparse.Namespace, output: Path, teacher: dict[str, Any]) -> dict[str, Any]:
    data = (
        {"source": "hf", "path": args.chats, "format": "messages", "max_length": 256, "max_prompt_length": 128}
        if args.chats
        else {"source": "synthetic", "synthetic_size": 64, "max_length": 320, "max_prompt_length": 256}
    )
    student = {
        "config": {
            "model_type": "llama",
            "vocab_size": args.vocab,
            "hidden_size": 256,
            "intermediate_size": 512,
            "num_hidden_layers": 4,
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "tie_word_embeddings": True,
        },
        "tokenizer": args.folder,
    }
    return {
        "student": student,
        "teacher": teacher,
        "data": data,
        "loss": {"base": "rkl", "indicator": "hellinger", "selection": "latf", "temperature": "inverse"},
        "training": {
            "output_dir": str(output),
            "max_steps": args.steps,
            "per_device_train_batch_size": args.train_batch_size,
            "learning_rate": 1e-4,
            "save_strategy": "no",
            "logging_steps": args.steps,
            "report_to": "none",
            "use_cpu": True,
            "seed": 0,
        },
    }


def train_part(args: argparse.Namespace) -> dict[str, Any]:
    from adakd.train import build_trainer, load_config

    server = {"url": args.url, "model": args.model, "top_k": args.k, "timeout": 600}
    variants = {
        "server, prefetch 0": {"server": {**server, "prefetch": 0}},
        "server, prefetch 2": {"server": {**server, "prefetch": 2}},
        "in-process teacher": {"name_or_path": args.folder, "dtype": "float32"},
    }
    rows = {}
    with tempfile.TemporaryDirectory() as root:
        for name, teacher in variants.items():
            path = Path(root) / f"{len(rows)}.yaml"
            out = Path(root) / f"run{len(rows)}"
            import yaml

            path.write_text(yaml.safe_dump(training_config(args, out, teacher)))
            trainer = build_trainer(load_config(str(path), []))
            times: list[float] = []
            trainer.add_callback(harness.step_timer(times))
            trainer.train()
            kept = times[2:] or times
            rows[name] = {"median_step_s": statistics.median(kept), "steps": len(times)}
            rows[name]["teacher"] = trainer.teacher_source.log_metrics()
            print(
                f"  {name:<20} {rows[name]['median_step_s']:.3f} s/step ({1 / rows[name]['median_step_s']:.2f} steps/s)"
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--model", default="smollm2", help="the served model name")
    parser.add_argument("--folder", required=True, help="the weights the server serves, loaded in-process too")
    parser.add_argument("--data", default=None, help="prompt/output JSONL for the teacher part (default: random ids)")
    parser.add_argument("--chats", default=None, help="chat-messages JSONL to train on (default: synthetic data)")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--train-batch-size", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=49152, help="the student's vocabulary (the teacher's)")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args()
    result = {"machine": harness.device_name("cpu"), "torch": torch.__version__}
    print(f"machine: {result['machine']}")
    result["teacher"] = teacher_part(args)
    if not args.skip_train:
        print(f"training, {args.steps} steps of {args.train_batch_size} examples (median step time after 2):")
        result["training"] = train_part(args)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
