"""Hub conventions: the model card in final/ (front matter, settings, metrics) and training.push_to_hub, which
uploads final/ alone (the Hub is replaced by a recorder of HfApi's calls: no network here)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

pytest.importorskip("transformers")
pytest.importorskip("huggingface_hub")

from huggingface_hub import HfApi  # noqa: E402
from huggingface_hub.errors import HfHubHTTPError  # noqa: E402

import adakd  # noqa: E402
from adakd.train import load_config, run  # noqa: E402
from adakd.train.checkpoints import STAGING_DIR  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402
from adakd.train.hub import TAGS, UploadError, model_card  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
TINY = ROOT / "configs" / "tiny-cpu.yaml"
SECRET = "hf_not_a_real_token_123"


def _config(tmp_path: Path, *overrides: str):
    base = [
        f"training.output_dir={tmp_path / 'run'}",
        "training.logging_steps=1",
        "training.disable_tqdm=true",
        "data.synthetic_size=48",
        "training.max_steps=4",
        "training.save_steps=2",
    ]
    return load_config(TINY, [*base, *overrides])


class _Hub:
    """Records what HfApi is asked to do; ``upload_folder`` lists the files it would send, read from disk at the
    moment of the call."""

    def __init__(self, monkeypatch, fail: bool | Exception = False, whoami: Exception | dict | None = None):
        self.tokens: list = []
        self.repos: list[dict] = []
        self.branches: list[dict] = []
        self.uploads: list[dict] = []
        hub = self
        real_init = HfApi.__init__

        def init(api, *args, **kwargs):
            hub.tokens.append(kwargs.get("token"))
            real_init(api, *args, **kwargs)

        def create_repo(api, repo_id, **kwargs):
            hub.repos.append({"repo_id": repo_id, **kwargs})
            return type("RepoUrl", (), {"repo_id": repo_id if "/" in repo_id else f"me/{repo_id}"})()

        def create_branch(api, repo_id, **kwargs):
            hub.branches.append({"repo_id": repo_id, **kwargs})

        def upload_folder(api, **kwargs):
            if isinstance(fail, Exception):
                raise fail
            if fail:
                raise OSError("401 Client Error: Unauthorized")
            folder = Path(kwargs["folder_path"])
            files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
            hub.uploads.append({**kwargs, "files": files})

        def check_token(api, *args, **kwargs):
            hub.whoami_calls += 1
            if isinstance(whoami, Exception):
                raise whoami
            return whoami or {"name": "me", "orgs": [{"name": "team"}]}

        self.whoami_calls = 0
        monkeypatch.setattr(HfApi, "whoami", check_token)
        monkeypatch.setattr(HfApi, "__init__", init)
        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def _front_matter(text: str) -> tuple[dict, str]:
    match = re.match(r"---\n(.*?)\n---\n(.*)", text, flags=re.S)
    assert match, text[:200]
    return yaml.safe_load(match.group(1)), match.group(2)


def _table(body: str, heading: str) -> dict[str, str]:
    """The first two columns of the tables under ``## heading`` (up to the next ``## ``), as a mapping."""
    section = body.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) >= 2 and not set(cells[0]) <= set("-: "):
            rows.setdefault(cells[0], cells[1])
    return rows


def _metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def test_push_to_hub_uploads_final_only_with_a_model_card(tmp_path, monkeypatch):
    hub = _Hub(monkeypatch)
    config = _config(
        tmp_path,
        "training.push_to_hub=true",
        "training.hub_model_id=me/tiny-adakd",
        "training.hub_private_repo=true",
        f"training.hub_token={SECRET}",
        "student.license=apache-2.0",
        "loss.c=0.7",
        "loss.step_size=0.1",
    )
    summary = run(config)
    out = tmp_path / "run"
    final = out / "final"
    assert summary["hub_repo"] == "me/tiny-adakd"
    assert (out / "checkpoint-2").is_dir()  # there were checkpoints to leave out
    # One repo, one upload: final/ and exactly its files.
    assert hub.repos == [{"repo_id": "me/tiny-adakd", "private": True, "exist_ok": True}]
    assert hub.tokens == [SECRET, SECRET] and hub.branches == []  # the check before training, then the upload
    (upload,) = hub.uploads
    assert Path(upload["folder_path"]) == final and upload["repo_id"] == "me/tiny-adakd"
    on_disk = sorted(str(p.relative_to(final)) for p in final.rglob("*") if p.is_file())
    assert upload["files"] == on_disk
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.json", "adakd_state.pt"} <= set(on_disk)
    assert not any("checkpoint-" in f or STAGING_DIR in f or "optimizer" in f for f in upload["files"])
    # The token is in no file the upload sends (the Trainer never saw it, so training_args.bin does not hold it).
    for name in on_disk:
        assert SECRET.encode() not in (final / name).read_bytes(), name

    front, body = _front_matter((final / "README.md").read_text())
    assert front["library_name"] == "transformers" and front["license"] == "apache-2.0"
    assert set(TAGS) <= set(front["tags"]) and "base_model" not in front  # an inline config has no hub id
    assert "datasets" not in front  # synthetic data
    settings = _table(body, "AdaKD settings")
    assert settings["loss.base"] == "rkl" and settings["loss.selection"] == "latf"
    assert settings["loss.c"] == "0.7" and settings["loss.step_size"] == "0.1"
    assert settings["loss.ema_decay"] == "0.9"  # configs/tiny-cpu.yaml
    assert settings["loss.min_ratio"] == "0.1 (default)"  # LATF's own default, as the run used it
    assert settings["loss.warmup_steps"] == "0 (from warmup_ratio)"  # floor(0.1 x 4)
    training = _table(body, "Training")
    assert training["optimizer steps run"] == "4" and training["learning_rate"] == "0.003"
    assert training["per_device_train_batch_size"] == "8" and training["sequences per optimizer step"] == "8"
    # The results are the run's own, as metrics.jsonl holds them.
    last = [row for row in _metrics(out) if "loss" in row][-1]
    results = _table(body, "Results")
    assert last["step"] == 4
    for key in ("loss", "kd_loss", "adakd/ratio", "adakd/tau_mean"):
        assert float(results[key]) == pytest.approx(last[key], rel=1e-5), key
    assert float(results["train_loss"]) == pytest.approx(summary["train_loss"], rel=1e-5)
    assert float(results["ratio at the end"]) == pytest.approx(summary["ratio"], rel=1e-5)
    assert f"adakd {adakd.__version__}" in body
    config_block = yaml.safe_load(body.split("```yaml\n", 1)[1].split("```", 1)[0])
    assert config_block["loss"]["c"] == 0.7 and config_block["training"]["hub_token"] == "<redacted>"


def test_a_lora_run_uploads_its_adapter_with_a_peft_card(tmp_path, monkeypatch):
    pytest.importorskip("peft")
    hub = _Hub(monkeypatch)
    run(_config(tmp_path, "student.lora={r: 4, alpha: 8}", "training.push_to_hub=true", "training.hub_revision=v1"))
    final = tmp_path / "run" / "final"
    (upload,) = hub.uploads
    assert "adapter_config.json" in upload["files"] and "model.safetensors" not in upload["files"]
    assert upload["revision"] == "v1" and hub.branches == [{"repo_id": "me/run", "branch": "v1", "exist_ok": True}]
    assert hub.repos[0]["repo_id"] == "run"  # no hub_model_id: the output folder's name, in the token's namespace
    front, body = _front_matter((final / "README.md").read_text())
    assert front["library_name"] == "peft" and "lora" in front["tags"]
    assert "LoRA r=4, alpha=8" in body


def test_no_push_without_push_to_hub(tmp_path, monkeypatch):
    hub = _Hub(monkeypatch)
    summary = run(_config(tmp_path, "training.max_steps=2"))
    assert hub.uploads == [] and hub.repos == [] and "hub_repo" not in summary
    assert (tmp_path / "run" / "final" / "README.md").is_file()


def test_a_failed_upload_keeps_the_model_and_says_how_to_upload_it(tmp_path, monkeypatch):
    _Hub(monkeypatch, fail=True)
    with pytest.raises(UploadError) as info:
        run(_config(tmp_path, "training.max_steps=2", "training.push_to_hub=true", "training.hub_model_id=me/x"))
    final = tmp_path / "run" / "final"
    assert str(info.value) == (
        f"training.push_to_hub: uploading {final} to me/x failed (401 Client Error: Unauthorized); the model is "
        f"saved there: upload it later with `hf upload me/x {final}`"
    )
    assert (final / "model.safetensors").is_file() and (final / "README.md").is_file()
    assert issubclass(HfHubHTTPError, OSError)  # what the Hub's client raises is caught as such


def _http():
    """The HTTP client huggingface_hub uses: httpx2 in its 2.x releases, httpx before."""
    try:
        import httpx2 as http
    except ImportError:
        import httpx as http
    return http


def test_an_upload_that_cannot_reach_the_hub_is_one_line_with_a_quoted_command(tmp_path, monkeypatch):
    _Hub(monkeypatch, fail=_http().ConnectError("[Errno -2] Name or service not known"))
    out = tmp_path / "my run"  # a space: the printed command must still be one that a shell runs
    with pytest.raises(UploadError) as info:
        run(_config(tmp_path, f"training.output_dir={out}", "training.max_steps=2", "training.push_to_hub=true",
                    "training.hub_model_id=me/x", "training.hub_revision=v 1"))  # fmt: skip
    final = out / "final"
    assert str(info.value).endswith(f"upload it later with `hf upload me/x '{final}' --revision 'v 1'`")
    assert "(Name or service not known" not in str(info.value) and "[Errno -2]" in str(info.value)
    assert (final / "model.safetensors").is_file()


def _hub_error(status: int):
    http = _http()
    request = http.Request("GET", "https://huggingface.co/api/whoami-v2")
    return HfHubHTTPError(f"{status} Client Error", response=http.Response(status, request=request))


@pytest.mark.parametrize(
    ("whoami", "overrides", "expected"),
    [
        ("down", [], "training.push_to_hub: the Hub (https://huggingface.co) does not answer ([Errno -2] Name or"),
        ("401", [f"training.hub_token={SECRET}"], "training.hub_token: the Hub refused the token (401 Unauthorized);"),
        ("401", [], "training.push_to_hub: the Hub refused the token (401 Unauthorized): log in again"),
        ("no token", [], "training.push_to_hub: no Hub token: log in with `hf auth login`, set HF_TOKEN"),
        (None, ["training.hub_model_id=someone-else/x"], "training.hub_model_id: someone-else/x: the token's user 'me' "
         "cannot write to 'someone-else' (theirs: me, team)"),
        (None, ["training.hub_model_id=me/a b"], "training.hub_model_id: 'me/a b' is not a Hub repo id"),
    ],
)  # fmt: skip
def test_push_to_hub_is_checked_before_the_first_step(tmp_path, monkeypatch, capsys, whoami, overrides, expected):
    from huggingface_hub.errors import LocalTokenNotFoundError

    from adakd.cli import main

    error = {
        "down": _http().ConnectError("[Errno -2] Name or service not known"),
        "401": _hub_error(401),
        "no token": LocalTokenNotFoundError("Token is required to call the /whoami-v2 endpoint, but no token found."),
    }.get(whoami)
    hub = _Hub(monkeypatch, whoami=error)
    monkeypatch.setattr("huggingface_hub.constants.ENDPOINT", "https://huggingface.co")
    keys = ["training.push_to_hub=true", "training.hub_model_id=me/x", *overrides]
    code = main(["train", str(TINY), f"training.output_dir={tmp_path / 'run'}", "data.synthetic_size=48", *keys])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"adakd: error: {TINY}: {expected}" in err, err
    assert hub.whoami_calls == (0 if "not a Hub repo id" in expected else 1) and hub.repos == hub.uploads == []
    assert not (tmp_path / "run" / "metrics.jsonl").exists() and not list((tmp_path / "run").glob("checkpoint-*"))


@pytest.mark.parametrize("strategy", ["every_save", "checkpoint", "all_checkpoints"])
def test_hub_strategies_that_push_more_than_final_are_refused(tmp_path, monkeypatch, strategy):
    hub = _Hub(monkeypatch)
    config = _config(tmp_path, "training.push_to_hub=true", f"training.hub_strategy={strategy}")
    with pytest.raises(ConfigError, match=f"^{TINY}: training.hub_strategy: '{strategy}': adakd uploads final/ only"):
        run(config)
    assert not (tmp_path / "run").exists() and hub.repos == []  # refused before anything ran
    run(_config(tmp_path, "training.max_steps=1", "training.push_to_hub=true", "training.hub_strategy=end"))
    assert len(hub.uploads) == 1


class _Args:
    """The TrainingArguments fields a card reads."""

    per_device_train_batch_size, gradient_accumulation_steps, world_size = 4, 2, 2
    learning_rate, lr_scheduler_type, warmup_steps, weight_decay, optim = 2e-5, "cosine", 10, 0.0, "adamw_torch"
    max_steps, num_train_epochs, max_grad_norm, bf16, fp16, seed = -1, 3.0, 1.0, True, False, 0


def test_the_card_names_hub_models_and_datasets_and_the_last_evaluation(tmp_path):
    data = {
        "student": {"name_or_path": "Qwen/Qwen2-1.5B", "lora": True, "license": "apache-2.0"},
        "teacher": {"name_or_path": "Qwen/Qwen2-7B", "adapter": "me/qwen2-7b-sft-lora",
                    "quantization": {"load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}},
        "data": {"name": "databricks/databricks-dolly-15k"},
        "loss": {"selection": "fixed", "ratio": 0.5},
        "training": {"output_dir": str(tmp_path / "qwen2-adakd"), "hub_model_id": "me/qwen2-1.5b-adakd"},
    }  # fmt: skip
    config = load_config(data=data)
    history = [
        {"loss": 2.0, "kd_loss": 1.5, "ce_loss": 2.5, "adakd/ratio": 0.5, "step": 10},
        {"eval_loss": 1.9, "eval_kd_loss": 1.4, "eval_hellinger": 0.3, "step": 10},
        {"loss": 1.0, "kd_loss": 0.75, "ce_loss": 1.25, "adakd/ratio": 0.5, "step": 20},
        {"eval_loss": 0.9, "eval_kd_loss": 0.7, "eval_hellinger": 0.2, "step": 20},
        {"train_loss": 1.4, "train_runtime": 12.5, "step": 20},
    ]
    text = model_card(config, log_history=history, args=_Args(), global_step=20, adapter=True, command="adakd train x")
    front, body = _front_matter(text)
    assert front == {
        "library_name": "peft",
        "base_model": "Qwen/Qwen2-1.5B",
        "tags": [*TAGS, "lora"],
        "datasets": ["databricks/databricks-dolly-15k"],
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
    }
    assert body.startswith("\n# me/qwen2-1.5b-adakd\n")
    models = _table(body, "Models")
    assert "`Qwen/Qwen2-7B` + LoRA adapter `me/qwen2-7b-sft-lora` (merged at load)" in models["teacher"]
    assert "4-bit (bitsandbytes" in body and "nf4" in body
    results = _table(body, "Results")
    assert results["loss"] == "1" and results["ce_loss"] == "1.25" and results["train_loss"] == "1.4"
    assert results["eval_loss"] == "0.9" and results["eval_hellinger"] == "0.2"  # the last evaluation
    assert "Last evaluation (step 20)" in body
    settings = _table(body, "AdaKD settings")
    assert settings["loss.ratio"] == "0.5" and "loss.ema_decay" not in settings  # LATF's keys: not used by fixed
    training = _table(body, "Training")
    assert training["sequences per optimizer step"] == "16" and training["precision"] == "bf16"
    assert "```bash\nadakd train x\n```" in body


def test_local_paths_are_not_hub_metadata(tmp_path):
    local = tmp_path / "student"
    local.mkdir()
    data = {
        "student": {"name_or_path": str(local)},
        "teacher": {"name_or_path": "Qwen/Qwen2-7B"},
        "data": {"source": "hf", "path": "train.parquet"},  # a data file (here, or where the run was)
        "training": {"output_dir": str(tmp_path / "out")},
    }
    text = model_card(load_config(data=data), log_history=[], args=_Args(), global_step=0, command="x")
    front, body = _front_matter(text)
    assert "base_model" not in front and "datasets" not in front
    assert f"`{local}`" in body and "No metric was logged" in body
