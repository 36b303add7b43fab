"""Training from a teacher served over HTTP (teacher.server) against the fake vLLM server: the same run as from an
`adakd cache` of the same top-k, the next batches' rows fetched while the student trains (and the same result as
without prefetch), a server that dies mid-run ending it with one line and a --resume that continues exactly, and
the config's refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

from adakd.cli import main as cli  # noqa: E402
from adakd.train import build_trainer, load_config  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402
from adakd.train.server_teacher import ServerTeacher  # noqa: E402

from ..serving.fake_vllm import FakeVLLM  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
K = 8
COMMON = [
    "teacher.config.vocab_size=288",  # the student's rows: no padding rows for the server to return
    "data.synthetic_size=24",
    "training.logging_steps=1",
    "training.disable_tqdm=true",
    "training.per_device_train_batch_size=4",
    "training.max_steps=4",
    "training.save_strategy=no",
    # LATF that moves at every step, so that a run that drifts shows in the ratio too
    "loss.ema_decay=0.0",
    "loss.tolerance=0.0",
    "loss.step_size=0.2",
    "loss.warmup_steps=1",
    "loss.min_ratio=0.2",
]


@pytest.fixture(scope="module")
def server():
    """The fake vLLM server serving the run's own inline teacher (built as a run builds it)."""
    from adakd.data import tokenizer_for
    from adakd.train.models import load_model

    config = load_config(TINY, ["training.output_dir=unused", *COMMON])
    model = load_model(config.teacher, "teacher", device="cpu")
    with FakeVLLM(model, tokenizer_for("byte"), name="tiny-teacher") as fake:
        yield fake


def _served(fake: FakeVLLM, *more: str) -> list[str]:
    return [f"teacher.server.url={fake.url}", "teacher.server.model=tiny-teacher", f"teacher.server.top_k={K}", *more]


def _train(tmp_path: Path, name: str, *overrides: str):
    trainer = build_trainer(load_config(TINY, [f"training.output_dir={tmp_path / name}", *COMMON, *overrides]))
    trainer.train()
    return trainer


def test_a_served_teacher_trains_as_the_cache_of_the_same_top_k(tmp_path, server, capsys):
    """The server's rows are the cache's up to float32 rounding: JSON carries each float32 log-probability exactly
    (its repr round-trips), but the server runs one unpadded prompt at a time where the cache runs the padded batch
    (logits equal to ~1e-6), and the tail is log1p(−Σp) in float64 where the cache takes a log-sum-exp of the rest.
    Hence a tolerance, not equality: the losses within 1e-4 relative, the parameters within 1e-6 absolute (+1e-4
    relative)."""
    cache = tmp_path / "cache"
    code = cli(["cache", str(TINY), "--output", str(cache), "--top-k", str(K), "--dtype", "float32",
                f"training.output_dir={tmp_path / 'cache-run'}", *COMMON])  # fmt: skip
    assert code == 0
    cached = _train(tmp_path, "cached", f"teacher.cache={cache}")
    capsys.readouterr()
    served = _train(tmp_path, "served", *_served(server))
    assert f"teacher: served by {server.url} (tiny-teacher, top-8, vLLM 0.32.0-fake)" in capsys.readouterr().out
    assert served.teacher is None and isinstance(served.teacher_source, ServerTeacher)
    assert served.loss_fn.ratio == cached.loss_fn.ratio < 1.0  # LATF moved, identically
    rows = [(a, b) for a, b in zip(cached.state.log_history, served.state.log_history, strict=True) if "loss" in a]
    for a, b in rows:
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4)  # measured: 2e-5 at most
        assert b["adakd/kept_tokens"] == a["adakd/kept_tokens"]
    last = rows[-1][1]
    assert last["teacher_server/requests"] >= 4 and last["teacher_server/positions"] > 0
    assert last["teacher_server/wait_seconds"] >= 0
    trained = dict(cached.model.named_parameters())
    for name, p in served.model.named_parameters():
        torch.testing.assert_close(p, trained[name], rtol=1e-4, atol=1e-6, msg=name)  # measured: 2.4e-7 at most


def test_prefetch_asks_for_the_next_batch_before_this_ones_loss_and_changes_nothing(tmp_path, server, monkeypatch):
    events: list[tuple[str, str]] = []
    pending: list[int] = []
    from adakd.train import server_teacher

    submit, sparse = ServerTeacher.submit, ServerTeacher.sparse

    def recorded_submit(self, inputs):
        events.append(("submit", server_teacher._on_cpu(inputs)[0]))
        submit(self, inputs)
        pending.append(self.pending)

    def recorded_sparse(self, inputs):
        events.append(("loss", server_teacher._on_cpu(inputs)[0]))
        return sparse(self, inputs)

    monkeypatch.setattr(ServerTeacher, "submit", recorded_submit)
    monkeypatch.setattr(ServerTeacher, "sparse", recorded_sparse)
    ahead = _train(tmp_path, "ahead", *_served(server, "teacher.server.prefetch=2"))
    order = [key for kind, key in events if kind == "loss"]
    assert len(order) == 4 and [key for kind, key in events if kind == "submit"][:4] == order
    for n in range(3):  # batch n + 1 was asked for before batch n's loss was computed
        assert events.index(("submit", order[n + 1])) < events.index(("loss", order[n]))
    # two ahead of the batch the step takes: at most prefetch + 1 submitted and not yet taken
    assert max(pending) == 3
    events.clear()
    plain = _train(tmp_path, "plain", *_served(server, "teacher.server.prefetch=0"))
    assert [kind for kind, _ in events] == ["loss"] * 4  # nothing submitted ahead
    assert [key for _, key in events] == order  # the same batches in the same order
    for (name, a), (_, b) in zip(ahead.model.named_parameters(), plain.model.named_parameters(), strict=True):
        assert torch.equal(a, b), name
    assert ahead.teacher_source._pool is None and ahead.teacher_source.pending == 0  # released at the end


def test_a_server_that_dies_mid_run_ends_it_in_one_line_and_resume_continues_exactly(tmp_path, server, capsys):
    from safetensors.torch import load_file

    from adakd.train.trainer import AdaKDTrainer

    base = ["train", str(TINY), *COMMON, *_served(server, "teacher.server.retries=1", "teacher.server.backoff=0.01"),
            "training.max_steps=6", "training.save_strategy=steps", "training.save_steps=2"]  # fmt: skip
    assert cli([*base, f"training.output_dir={tmp_path / 'whole'}"]) == 0
    original = AdaKDTrainer._save_checkpoint

    def save_then_kill(self, model, trial):
        original(self, model, trial)
        if self.state.global_step == 2:  # the rows already asked for arrive; nothing after them does
            for future in list(self.teacher_source._pending.values()):
                future.result()
            server.stop()

    capsys.readouterr()
    broken = [*base, f"training.output_dir={tmp_path / 'broken'}"]
    try:
        AdaKDTrainer._save_checkpoint = save_then_kill
        assert cli(broken) == 1
    finally:
        AdaKDTrainer._save_checkpoint = original
        server.start()  # back on the same port
    text = capsys.readouterr().err
    err = [line for line in text.splitlines() if line.startswith("adakd: error")]
    assert len(err) == 1 and "Traceback" not in text
    assert "teacher.server.url" in err[0] and "no answer to /v1/completions after 2 tries" in err[0]
    checkpoint = tmp_path / "broken" / "checkpoint-4"
    assert f"training stopped at step 5 (the last complete checkpoint is {checkpoint})" in err[0]
    assert err[0].endswith("rerun the same command with --resume once the server is back")
    assert (tmp_path / "broken" / "checkpoint-2").is_dir() and (tmp_path / "broken" / "checkpoint-4").is_dir()
    assert cli([*broken, "--resume"]) == 0
    card = (tmp_path / "broken" / "final" / "README.md").read_text()
    assert "(its top-8 distributions, served by vLLM)" in card
    whole = load_file(tmp_path / "whole" / "final" / "model.safetensors")
    resumed = load_file(tmp_path / "broken" / "final" / "model.safetensors")
    assert whole.keys() == resumed.keys()
    for name in whole:
        assert torch.equal(whole[name], resumed[name]), name  # bitwise


# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (["teacher.server.url=localhost:8000"], "teacher.server.url: 'localhost:8000' is not an http"),
        (["teacher.server.top_k=0"], "teacher.server.top_k: must be >= 1, got 0"),
        (["teacher.server.timeout=0"], "teacher.server.timeout: must be > 0, got 0"),
        (["teacher.server.retries=-1"], "teacher.server.retries: must be >= 0, got -1"),
        (["teacher.server.backoff=-1"], "teacher.server.backoff: must be >= 0, got -1"),
        (["teacher.server.prefetch=-1"], "teacher.server.prefetch: must be >= 0, got -1"),
        (["teacher.server.api_key_env=MY-KEY"], "teacher.server.api_key_env: the name of an environment variable"),
        (["teacher.server.model=null"], "teacher.server.model: expected a string"),
        (["teacher.server.nope=1"], "teacher.server.nope: unknown key"),
        (["teacher.cache=somewhere"], "teacher.server: give one of teacher.cache and teacher.server, not both"),
        (["loss.kd_ratio=0"], "teacher.server: loss.kd_ratio is 0"),
        (["onpolicy.mode=gkd"], "teacher.server: replaces the teacher model, and cannot serve on-policy"),
        (["student.server.url=http://x", "student.server.model=m"], "student.server: only the teacher"),
    ],
)
def test_each_server_key_is_checked(tmp_path, overrides, match):
    served = ["teacher.server.url=http://127.0.0.1:1", "teacher.server.model=m"]
    with pytest.raises(ConfigError, match=match):
        load_config(TINY, [f"training.output_dir={tmp_path}", *served, *overrides])


def test_the_url_and_model_are_required_and_no_teacher_model_is_needed(tmp_path):
    with pytest.raises(ConfigError, match="teacher.server.model: is required"):
        load_config(TINY, [f"training.output_dir={tmp_path}", "teacher.server.url=http://h:1"])
    data = {"student": {"config": {"model_type": "qwen2", "vocab_size": 288, "hidden_size": 32}, "tokenizer": "byte"},
            "teacher": {"server": {"url": "http://h:1", "model": "m"}},
            "data": {"eval_path": "e.jsonl", "source": "minillm_jsonl", "path": "t.jsonl"},
            "training": {"output_dir": str(tmp_path), "eval_strategy": "steps", "eval_steps": 1}}  # fmt: skip
    config = load_config(data=data)  # an eval set works (the server answers any batch), no teacher model
    assert config.teacher.server.top_k == 32 and config.teacher.server.prefetch == 2


def test_an_unreachable_server_stops_the_run_before_the_first_step(tmp_path, capsys):
    code = cli(["train", str(TINY), f"training.output_dir={tmp_path / 'r'}", *COMMON, "teacher.server.url=http://127.0.0.1:9",
                "teacher.server.model=m", "teacher.server.retries=0"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("adakd: error: teacher.server.url http://127.0.0.1:9: no answer to /v1")


def test_the_lookahead_pulls_depth_ahead_once_per_epoch_iterator():
    from types import SimpleNamespace

    from adakd.train.prefetch import Prefetcher

    submitted: list[int] = []
    prefetcher = Prefetcher(SimpleNamespace(prefetch=2, submit=submitted.append))
    epoch = iter(range(5))
    ahead = prefetcher.wrap(epoch)
    assert prefetcher.wrap(epoch) is ahead  # every step of the epoch pulls from the same lookahead
    assert next(ahead) == 0 and submitted == [0, 1, 2]  # the batch handed out and two beyond it
    assert next(ahead) == 1 and submitted == [0, 1, 2, 3]
    assert list(ahead) == [2, 3, 4] and submitted == [0, 1, 2, 3, 4]  # the same batches, in order, each once
    following = iter(range(10, 12))
    assert prefetcher.wrap(following) is not ahead and list(prefetcher.wrap(following)) == [10, 11]
    assert Prefetcher(SimpleNamespace(prefetch=0, submit=submitted.append)).wrap(epoch) is epoch
    assert Prefetcher(None).wrap(epoch) is epoch


def test_closing_stops_a_request_retrying_in_the_background():
    """A prefetch thread retrying a dead server ends when the run ends, not after its whole backoff (the process
    waits for its threads before it exits)."""
    import time

    from adakd.serving.http import Endpoint
    from adakd.serving.teacher import TeacherServer

    endpoint = Endpoint("http://127.0.0.1:9", retries=5, backoff=30.0, key="teacher.server.url")
    teacher = ServerTeacher(TeacherServer(endpoint, "m", 4, vocab_rows=288), prefetch=1)
    ids = torch.tensor([[1, 2, 3]])
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    teacher.submit(batch)
    (future,) = teacher._pending.values()
    time.sleep(0.2)  # the first try is refused: the thread is in its 30 s backoff
    assert not future.done()
    started = time.monotonic()
    teacher.close()
    with pytest.raises(Exception, match="the run ended while a request was retried"):
        future.result(timeout=10)
    assert time.monotonic() - started < 5


def test_resume_compares_what_the_server_teaches_not_how_it_is_reached(tmp_path):
    from types import SimpleNamespace

    from adakd.train.checkpoints import run_settings

    served = _served(SimpleNamespace(url="http://h:1"))
    settings = run_settings(load_config(TINY, [f"training.output_dir={tmp_path}", *served]))
    assert settings["teacher.server.model"] == "tiny-teacher" and settings["teacher.server.top_k"] == K
    assert not any(key in settings for key in ("teacher.server.url", "teacher.server.prefetch"))
