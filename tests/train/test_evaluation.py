"""Evaluation during training on tiny models: the eval set's CE / KD / Hellinger against an independent float64
recomputation, batch-size invariance, no effect on LATF or on the training itself, metrics.jsonl rows at their step,
ROUGE-L equal to ``adakd eval`` on the same checkpoint, and the config errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adakd.cli import main  # noqa: E402
from adakd.data import build_examples, read_minillm_jsonl, synthetic_instructions, tokenizer_for  # noqa: E402
from adakd.train import build_trainer, load_config  # noqa: E402
from adakd.train.config import ConfigError, ModelSection  # noqa: E402
from adakd.train.models import load_model  # noqa: E402

from .. import reference as ref  # noqa: E402
from ..faults.common import one_line_error  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
# An answer of single letters and digits: a random tiny model's byte soup hits some of them, so ROUGE-L is > 0
# and its equality with adakd eval's is not the trivial 0 == 0.
LETTERS = " ".join("abcdefghijklmnopqrstuvwxyz0123456789")
LATF_MOVES = ["loss.ema_decay=0.0", "loss.tolerance=0.0", "loss.step_size=0.2", "loss.warmup_steps=1"]


def _write(path: Path, records, output=None) -> Path:
    rows = [{"prompt": r.prompt, "output": output or r.response} for r in records]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, Path]:
    """MiniLLM-format train / eval / ROUGE files from the synthetic tasks (eval answers of varied lengths)."""
    folder = tmp_path_factory.mktemp("data")
    records = synthetic_instructions(140, seed=3)
    return {
        "train": _write(folder / "train.jsonl", records[:100]),
        "valid": _write(folder / "valid.jsonl", records[100:]),
        "rouge": _write(folder / "rouge.jsonl", records[100:], output=LETTERS),
    }


def _config(tmp_path: Path, files: dict[str, Path], *overrides: str, name: str = "run"):
    base = [
        f"training.output_dir={tmp_path / name}",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "data.source=minillm_jsonl",
        f"data.path={files['train']}",
        f"data.eval_path={files['valid']}",
        "training.eval_strategy=steps",
        "training.eval_steps=2",
    ]
    return load_config(TINY, [*base, *overrides])


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _eval_only(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k in ("eval_ce_loss", "eval_kd_loss", "eval_hellinger", "eval_loss")}


def reference_metrics(student, teacher, examples, base: str, params: dict, kd_ratio: float) -> dict[str, float]:
    """The eval metrics from scratch: each sequence alone (no padding, no batching), the models' logits in float64,
    probabilities and divergences from tests/reference.py, sums over the whole set divided by its token count."""
    sums = torch.zeros(4, dtype=torch.float64)
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        labels = torch.tensor(ex["labels"][1:])
        keep = labels != -100
        with torch.no_grad():
            zs = student(input_ids=ids).logits[0, :-1][keep].double()
            zt = None if teacher is None else teacher(input_ids=ids).logits[0, :-1][keep].double()
        y = labels[keep]
        q = ref.probs(zs)  # the student's whole lm_head, as its training CE
        sums[0] += len(y)
        sums[1] += -q.gather(1, y[:, None]).log().sum()
        if zt is not None:
            p = ref.probs(zt[:, : zs.shape[1]])  # the teacher's padding rows dropped
            sums[2] += ref.divergence(base, p, q, **params).sum()
            sums[3] += ref.hellinger(p, q).sum()
    n, ce, kd, hellinger = sums.tolist()
    if teacher is None:
        return {"eval_ce_loss": ce / n, "eval_loss": ce / n}
    loss = (1 - kd_ratio) * ce / n + kd_ratio * kd / n
    return {"eval_ce_loss": ce / n, "eval_kd_loss": kd / n, "eval_hellinger": hellinger / n, "eval_loss": loss}


# ---------------------------------------------------------------------------------------------- the metrics


@pytest.mark.parametrize(
    ("overrides", "base", "params", "kd_ratio"),
    [
        ([], "rkl", {}, 1.0),  # the tiny config: LATF + IDTS in training, none of it in evaluation
        (["loss.base=jsd", "loss.base_params={lam: 0.3}", "loss.kd_ratio=0.6"], "jsd", {"lam": 0.3}, 0.6),
        (["loss.base=fkl", "loss.fused=true", "loss.chunk_size=7", "loss.kd_ratio=0.5"], "fkl", {}, 0.5),
    ],
    ids=["rkl-latf", "jsd-mixed", "fkl-fused"],
)
def test_eval_metrics_equal_an_independent_float64_recomputation(tmp_path, files, overrides, base, params, kd_ratio):
    trainer = build_trainer(_config(tmp_path, files, "training.per_device_eval_batch_size=4", *overrides))
    tokenizer = tokenizer_for("byte")
    # The eval set is the eval file read and tokenised as the training data is.
    want, _ = build_examples(read_minillm_jsonl(files["valid"]), tokenizer, max_length=320, max_prompt_length=256)
    assert trainer.eval_dataset.examples == want and len(want) % 4 != 0  # a short last batch
    got = trainer.evaluate()
    expected = reference_metrics(trainer.model, trainer.teacher, want, base, params, kd_ratio)
    assert got["eval_tokens"] == sum(sum(x != -100 for x in ex["labels"][1:]) for ex in want)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5, abs=1e-9), key
    # Token-weighted over the set: a mean of batch means is further from it than the tolerance above.
    batches = [want[i : i + 4] for i in range(0, len(want), 4)]
    per_batch = [reference_metrics(trainer.model, trainer.teacher, b, base, params, kd_ratio) for b in batches]
    mean_of_means = sum(m["eval_kd_loss"] for m in per_batch) / len(per_batch)
    assert abs(mean_of_means / got["eval_kd_loss"] - 1) > 1e-4


def test_eval_metrics_of_plain_sft_are_the_students_cross_entropy(tmp_path, files):
    config = _config(tmp_path, files, "loss.kd_ratio=0")
    config.teacher = None
    trainer = build_trainer(config.validate())
    got = trainer.evaluate()
    assert "eval_kd_loss" not in got and "eval_hellinger" not in got
    expected = reference_metrics(trainer.model, None, trainer.eval_dataset.examples, "rkl", {}, 0.0)
    for key, value in expected.items():
        assert got[key] == pytest.approx(value, rel=1e-5), key


@pytest.mark.parametrize("fused", ["false", "true"])
def test_eval_metrics_do_not_depend_on_the_eval_batch_size(tmp_path, files, fused):
    results = []
    for batch in (1, 4):
        config = _config(tmp_path, files, f"training.per_device_eval_batch_size={batch}", f"loss.fused={fused}")
        results.append(_eval_only(build_trainer(config).evaluate()))
    one, four = results
    assert set(one) == {"eval_ce_loss", "eval_kd_loss", "eval_hellinger", "eval_loss"}
    for key in one:
        assert four[key] == pytest.approx(one[key], rel=1e-6), key


# ---------------------------------------------------------------------------------------------- no side effects


def test_evaluation_leaves_latf_and_the_pending_sums_unchanged(tmp_path, files):
    trainer = build_trainer(_config(tmp_path, files, *LATF_MOVES))
    batch = trainer.data_collator([trainer.train_dataset[i] for i in range(4)])
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)  # a training forward: pending sums that LATF has not used yet
    pending, report = trainer.loss_fn.pending(), trainer.loss_fn.last_report
    controller = trainer.loss_fn.controller.state_dict()
    assert pending[1] == 1
    trainer.evaluate()
    assert trainer.loss_fn.pending() == pending
    assert trainer.loss_fn.last_report is report
    assert trainer.loss_fn.controller.state_dict() == controller
    trainer.log({"loss": 0.0})  # the training window survived the eval row in between
    assert "kd_loss" in trainer.state.log_history[-1]


@pytest.mark.slow
def test_evaluation_and_rouge_do_not_change_the_training(tmp_path, files):
    """The same run with and without evaluation (every 2 steps) and ROUGE-L (every 3): the same losses and LATF
    ratios at every step; and each training row's kd_loss still averages the same steps as its loss."""
    common = ["training.max_steps=6", "training.save_strategy=no", "training.logging_steps=3", *LATF_MOVES]
    common.append("student.config.attention_dropout=0.1")  # training draws random numbers: sampling must not move them
    plain = _config(tmp_path, files, *common, "training.eval_strategy=no", "data.eval_path=null", name="plain")
    build_trainer(plain).train()
    rouge = ["eval.rouge_every=3", f"eval.rouge_examples={files['rouge']}", "eval.rouge_limit=2"]
    build_trainer(_config(tmp_path, files, *common, *rouge, name="evaluated")).train()

    a = [r for r in _metrics(tmp_path / "plain") if "loss" in r]
    b = [r for r in _metrics(tmp_path / "evaluated") if "loss" in r]
    assert [r["step"] for r in b] == [r["step"] for r in a] == [3, 6]
    for ra, rb in zip(a, b, strict=True):
        assert rb["loss"] == pytest.approx(ra["loss"], rel=1e-9)
        assert rb["adakd/ratio"] == ra["adakd/ratio"]
        assert rb["kd_loss"] == pytest.approx(rb["loss"], rel=1e-6)  # kd_ratio 1: the loss is the KD term
    evaluated = _metrics(tmp_path / "evaluated")
    assert [r["step"] for r in evaluated if "eval_loss" in r] == [2, 4, 6]
    assert [r["step"] for r in evaluated if "eval_rouge_l" in r] == [3, 6]
    assert len({r["adakd/ratio"] for r in a}) > 1  # LATF did move


# ---------------------------------------------------------------------------------------------- metrics.jsonl


@pytest.mark.slow
def test_rows_land_in_metrics_jsonl_at_their_step_and_rouge_equals_adakd_eval(tmp_path, files):
    """Train 4 steps, evaluating and scoring ROUGE-L every 2 and saving checkpoint-2 and -4. Each eval row equals
    the reference recomputed on the checkpoint of its step; each ROUGE-L equals ``adakd eval`` on that checkpoint
    with the same seed and settings (predictions included)."""
    rouge = [
        "eval.rouge_every=2", f"eval.rouge_examples={files['rouge']}", "eval.rouge_limit=6", "eval.batch_size=4",
        "eval.max_length=300", "eval.seed=7",
    ]  # fmt: skip
    config = _config(tmp_path, files, "training.max_steps=4", "training.save_steps=2", *rouge)
    trainer = build_trainer(config)
    trainer.train()
    out = tmp_path / "run"
    rows = _metrics(out)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # a training row at every step still
    eval_rows = {r["step"]: r for r in rows if "eval_loss" in r}
    rouge_rows = {r["step"]: r["eval_rouge_l"] for r in rows if "eval_rouge_l" in r}
    assert sorted(eval_rows) == sorted(rouge_rows) == [2, 4]
    teacher = trainer.teacher
    for step in (2, 4):
        ckpt = out / f"checkpoint-{step}"
        student = load_model(ModelSection(name_or_path=str(ckpt)), "student").eval()
        expected = reference_metrics(student, teacher, trainer.eval_dataset.examples, "rkl", {}, 1.0)
        for key, value in expected.items():
            assert eval_rows[step][key] == pytest.approx(value, rel=1e-5), (step, key)

        results = tmp_path / f"adakd-eval-{step}.json"
        code = main([
            "eval", "--model", str(ckpt), "--tokenizer", "byte", "--datasets", f"rouge={files['rouge']}",
            "--seeds", "7", "--limit", "6", "--batch-size", "4", "--max-length", "300", "--max-prompt-length", "256",
            "--device", "cpu", "--dtype", "float32", "--output", str(results), "--quiet",
        ])  # fmt: skip
        assert code == 0
        theirs = json.loads(results.read_text())
        assert rouge_rows[step] == theirs["average"]["mean"] > 0
        ours_pred = out / "rouge" / f"step-{step}.predictions" / "rouge.seed7.jsonl"
        theirs_pred = tmp_path / f"adakd-eval-{step}.predictions" / "rouge.seed7.jsonl"
        texts = [json.loads(line)["prediction"] for line in ours_pred.read_text().splitlines()]
        assert texts == [json.loads(line)["prediction"] for line in theirs_pred.read_text().splitlines()]
    # The two steps' weights differ, and so do their eval losses.
    assert eval_rows[2]["eval_loss"] != eval_rows[4]["eval_loss"]


# ---------------------------------------------------------------------------------------------- sources, DDP


def test_eval_split_of_an_hf_source(tmp_path, files, monkeypatch):
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-cache")
    folder = tmp_path / "hub"
    folder.mkdir()
    (folder / "train.jsonl").write_text(files["train"].read_text())
    (folder / "validation.jsonl").write_text(files["valid"].read_text())
    config = _config(
        tmp_path, files, "data.source=hf", f"data.path={folder}", "data.eval_path=null",
        "data.eval_split=validation", "data.eval_limit=9",
    )  # fmt: skip
    trainer = build_trainer(config)
    records = read_minillm_jsonl(files["valid"], limit=9)
    want, _ = build_examples(records, tokenizer_for("byte"), max_length=320, max_prompt_length=256)
    ds = trainer.eval_dataset
    assert [{k: list(ds[i][k]) for k in ("input_ids", "labels")} for i in range(len(ds))] == want
    got = trainer.evaluate()
    expected = reference_metrics(trainer.model, trainer.teacher, want, "rkl", {}, 1.0)
    assert got["eval_kd_loss"] == pytest.approx(expected["eval_kd_loss"], rel=1e-5)


@pytest.mark.slow
@pytest.mark.distributed
def test_two_processes_evaluate_the_whole_set_once(tmp_path, files):
    """Under DDP (two CPU processes) with an eval set that does not split evenly (the sampler repeats sequences to
    fill the last batches), the eval metrics equal one process's: every sequence counted exactly once. ROUGE-L runs
    on the main process while the other waits for its value (the run ends, nothing hangs)."""
    overrides = [
        f"training.output_dir={tmp_path / 'ddp'}", "training.max_steps=1", "training.eval_on_start=true",
        "training.eval_strategy=no", "training.save_strategy=no", "training.per_device_eval_batch_size=4",
        "training.ddp_backend=gloo", "training.disable_tqdm=true", "data.source=minillm_jsonl",
        f"data.path={files['train']}", f"data.eval_path={files['valid']}",
    ]  # fmt: skip
    torchrun = Path(sys.executable).with_name("torchrun")
    port = f"--master_port={29400 + os.getpid() % 100}"
    cmd = [str(torchrun), "--nproc_per_node=2", port, "-m", "adakd", "train", str(TINY), *overrides]
    rouge = ["eval.rouge_every=1", f"eval.rouge_examples={files['rouge']}", "eval.rouge_limit=2"]
    proc = subprocess.run([*cmd, *rouge], capture_output=True, text=True, cwd=ROOT, timeout=600, env={**os.environ})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = _metrics(tmp_path / "ddp")
    (ddp,) = [r for r in rows if "eval_loss" in r]
    assert ddp["step"] == 0
    assert [r["step"] for r in rows if "eval_rouge_l" in r] == [1]  # written once, by the main process
    single_overrides = [x for x in overrides if not x.startswith("training.ddp_backend")]
    one = load_config(TINY, [*single_overrides, f"training.output_dir={tmp_path / 'one'}"])
    single = build_trainer(one).evaluate()
    assert len(single) and single["eval_tokens"] == ddp["eval_tokens"]
    for key, value in _eval_only(single).items():
        assert ddp[key] == pytest.approx(value, rel=1e-6), key


def test_rouge_during_training_is_refused_where_no_process_holds_the_whole_student(tmp_path, files, monkeypatch):
    import adakd.train.trainer as trainer_module

    monkeypatch.setattr(trainer_module, "engine_of", lambda accelerator: "fsdp2")  # as under FSDP2 (sharded)
    config = _config(tmp_path, files, "eval.rouge_every=2", f"eval.rouge_examples={files['rouge']}")
    with pytest.raises(ConfigError, match="eval.rouge_every: ROUGE-L during training runs on one process, not under"):
        build_trainer(config)


# ---------------------------------------------------------------------------------------------- config errors


def test_an_eval_strategy_without_an_eval_set_is_an_error(tmp_path, files):
    with pytest.raises(ConfigError, match=r"training\.eval_strategy: needs an eval set: give data\.eval_path"):
        _config(tmp_path, files, "data.eval_path=null")
    with pytest.raises(ConfigError, match=r"training\.eval_on_start: needs an eval set"):
        _config(tmp_path, files, "data.eval_path=null", "training.eval_strategy=no", "training.eval_on_start=true")


def test_an_eval_set_that_is_never_evaluated_is_a_warning(tmp_path, files):
    with pytest.warns(UserWarning, match=r"data\.eval_path is set but training\.eval_strategy is 'no'"):
        config = _config(tmp_path, files, "training.eval_strategy=no")
    assert config.data.eval_path == str(files["valid"])  # still loaded: trainer.evaluate() works
    with pytest.warns(UserWarning, match=r"eval\.rouge_examples is set but eval\.rouge_every is 0"):
        _config(tmp_path, files, f"eval.rouge_examples={files['rouge']}")


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["data.eval_split=validation"], "data.eval_split: source 'minillm_jsonl' has no splits (only 'hf')"),
        (["data.source=synthetic", "data.path=null"], "data.eval_path: source 'synthetic' reads no file"),
        (["data.eval_limit=0"], "data.eval_limit: must be >= 1, got 0"),
        (["eval.rouge_every=5"], "eval.rouge_every: needs eval.rouge_examples"),
        (["eval.rouge_every=-1"], "eval.rouge_every: must be >= 0"),
        (["eval.rouge_every=1", "eval.rouge_examples=x.jsonl", "eval.rouge_limit=0"], "eval.rouge_limit: must be >= 1"),
        (["eval.max_prompt_length=400"], "eval.max_prompt_length: need 0 < it < max_length, got 400 and 320"),
        (["eval.seed=ten"], "eval.seed: expected an integer"),
    ],
)
def test_config_errors_name_the_key(tmp_path, files, overrides, message):
    with pytest.raises(ConfigError) as info:
        _config(tmp_path, files, *overrides)
    assert message in str(info.value) and str(TINY) in str(info.value)


def test_bad_eval_files_are_one_line_errors_under_their_key(tmp_path, files, capsys):
    long_prompts = tmp_path / "long.jsonl"  # every prompt over data.max_prompt_length (256 bytes)
    long_prompts.write_text(json.dumps({"prompt": "P" * 300, "output": "a"}) + "\n")
    (tmp_path / "bad.jsonl").write_text('{"prompt": "P", "output": "a"}\n{"prompt": 3}\n')
    cases = [
        ([f"data.eval_path={tmp_path / 'missing.jsonl'}"], f"data.eval_path: {tmp_path / 'missing.jsonl'}: no such"),
        ([f"data.eval_path={tmp_path / 'bad.jsonl'}"], f"data.eval_path: {tmp_path / 'bad.jsonl'}:2:"),
        ([f"data.eval_path={long_prompts}"], "data.eval_path: no example left"),
        (
            ["eval.rouge_every=1", f"eval.rouge_examples={tmp_path / 'none.jsonl'}"],
            f"eval.rouge_examples: {tmp_path / 'none.jsonl'}: no such file",
        ),
    ]
    for i, (overrides, message) in enumerate(cases):
        args = [
            f"training.output_dir={tmp_path / f'out{i}'}",
            "data.source=minillm_jsonl",
            f"data.path={files['train']}",
        ]
        args += [f"data.eval_path={files['valid']}", "training.eval_strategy=steps", *overrides]
        code, err = main(["train", str(TINY), *args]), capsys.readouterr().err
        line = one_line_error(code, err)
        assert message in line, (message, line)


# ---------------------------------------------------------------------------------------------- chat template

CHATML = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def test_rouge_with_the_chat_template_equals_adakd_eval_chat_template(tmp_path, files):
    """``eval.chat_template`` (read with getattr: false when the config has no such key): each ROUGE record is one
    user turn of the student tokenizer's chat template, exactly as ``adakd eval --chat-template`` renders it."""
    import transformers

    from adakd.eval.sets import load_eval_set
    from adakd.generation import GenerationConfig
    from adakd.train.evaluation import RougeDuringTraining

    tok = tokenizer_for("byte")
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = CHATML
    config = transformers.Qwen2Config(
        vocab_size=260, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config)
    folder = tmp_path / "model"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)

    run = _config(tmp_path, files, "eval.rouge_every=1", f"eval.rouge_examples={files['rouge']}")
    eval_set = load_eval_set("rouge", files["rouge"], limit=3)
    generation = GenerationConfig(max_length=440, max_prompt_length=400, batch_size=2)
    assert (
        RougeDuringTraining.from_sections(
            run.eval, run.data, run.student, eval_set=eval_set, generation=generation, tokenizer=tok
        ).chat_template
        is None
    )  # off by default
    run.eval.chat_template = True  # what `eval.chat_template: true` sets
    rouge = RougeDuringTraining.from_sections(
        run.eval, run.data, run.student, eval_set=eval_set, generation=generation, tokenizer=tok
    )
    assert rouge.chat_template.source == "tokenizer" and rouge.seed == run.eval.seed == 10
    value = rouge.score(model, tok, torch.device("cpu"), tmp_path / "rouge", step=1)

    out = tmp_path / "cli.json"
    code = main([
        "eval", "--model", str(folder), "--datasets", f"rouge={files['rouge']}", "--seeds", "10", "--limit", "3",
        "--batch-size", "2", "--max-length", "440", "--max-prompt-length", "400", "--device", "cpu",
        "--dtype", "float32", "--output", str(out), "--quiet", "--chat-template",
    ])  # fmt: skip
    assert code == 0
    ours = json.loads((tmp_path / "rouge" / "step-1.json").read_text())
    theirs = json.loads(out.read_text())
    assert ours["generation"]["chat_template"] == theirs["generation"]["chat_template"] == "tokenizer"
    assert value == theirs["average"]["mean"]
    ours_rows = (tmp_path / "rouge" / "step-1.predictions" / "rouge.seed10.jsonl").read_text().splitlines()
    theirs_rows = (tmp_path / "cli.predictions" / "rouge.seed10.jsonl").read_text().splitlines()
    assert ours_rows == theirs_rows
    first = json.loads(ours_rows[0])
    assert (
        first["chat_prompt"]
        == "<|im_start|>user\nRepeat the word 'light' three times.<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chat_template_during_training_refusals_name_the_key(tmp_path, files):
    from adakd.eval.sets import load_eval_set
    from adakd.generation import GenerationConfig
    from adakd.train.evaluation import RougeDuringTraining

    run = _config(tmp_path, files, "eval.rouge_every=1", f"eval.rouge_examples={files['rouge']}")
    run.eval.chat_template = True
    eval_set = load_eval_set("rouge", files["rouge"], limit=2)
    generation = GenerationConfig()
    with pytest.raises(ConfigError, match=r"^eval\.chat_template: the tokenizer 'byte' has no chat template"):
        RougeDuringTraining.from_sections(
            run.eval, run.data, run.student, eval_set=eval_set, generation=generation, tokenizer=tokenizer_for("byte")
        )
    tok = tokenizer_for("byte")
    tok.chat_template = CHATML
    bad = tmp_path / "bad.jsonl"
    bad.write_text(
        files["rouge"].read_text().splitlines()[0] + "\n" + json.dumps({"prompt": "Q?", "output": "a"}) + "\n"
    )
    with pytest.raises(ConfigError, match=rf"^{bad}:2: eval\.chat_template needs the record's 'instruction'"):
        RougeDuringTraining.from_sections(
            run.eval, run.data, run.student, eval_set=load_eval_set("bad", bad), generation=generation, tokenizer=tok
        )
    # data.template names the chat template the data was rendered with: that one, not the tokenizer's.
    run.data.template = "qwen2"
    assert (
        RougeDuringTraining.from_sections(
            run.eval, run.data, run.student, eval_set=eval_set, generation=generation, tokenizer=tok
        ).chat_template.source
        == "qwen2"
    )
