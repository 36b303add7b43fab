"""Hub conventions of a finished run: ``training.push_to_hub``, which uploads ``output_dir/final`` alone, once, after
training (its model card, ``README.md`` with YAML front matter, is rendered by :mod:`.card`; :func:`model_card` and
:func:`write_model_card` are importable from here too).

The Trainer itself never pushes: its hub support uploads ``output_dir`` (checkpoints and optimizer state with it),
so the hub keys are taken out of the arguments it is given (:func:`trainer_training`), which also keeps the token
out of the ``training_args.bin`` it saves next to the model.
"""

from __future__ import annotations

import dataclasses
import shlex
from pathlib import Path
from typing import Any

from ..errors import AdakdError
from .card import CARD, REPO_ID, TAGS, model_card, write_model_card
from .config_sections import ErrorFactory

__all__ = [
    "CARD",
    "HUB_KEYS",
    "TAGS",
    "HubTarget",
    "UploadError",
    "check_hub",
    "hub_target",
    "model_card",
    "push_final",
    "trainer_training",
    "write_model_card",
]

# TrainingArguments' hub fields: adakd reads them, the Trainer never sees them.
HUB_KEYS = (
    "push_to_hub",
    "hub_model_id",
    "hub_private_repo",
    "hub_token",
    "hub_strategy",
    "hub_always_push",
    "hub_revision",
)


class UploadError(AdakdError):
    """The upload of ``final/`` failed after training; the model is saved, and the message says how to upload it."""


@dataclasses.dataclass(frozen=True)
class HubTarget:
    """Where ``final/`` goes: ``repo_id`` (``hub_model_id``, else the output folder's name in the token's namespace),
    ``private`` (``hub_private_repo``; None: the Hub's default), ``token`` (``hub_token``; None: the logged-in
    one or ``HF_TOKEN``), ``revision`` (``hub_revision``: a branch, created if missing; None: main)."""

    repo_id: str
    private: bool | None = None
    token: str | None = None
    revision: str | None = None


def trainer_training(training: dict[str, Any]) -> dict[str, Any]:
    """``training`` without the hub keys, for the Trainer's ``TrainingArguments``."""
    return {key: value for key, value in training.items() if key not in HUB_KEYS}


def hub_target(training: dict[str, Any], error: ErrorFactory) -> HubTarget | None:
    """The upload ``training.push_to_hub: true`` asks for, or None.

    Raises:
        ConfigError: ``training.hub_strategy`` asks for checkpoints or a push at every save (adakd uploads
            ``final/`` once: ``end``).
    """
    if not training.get("push_to_hub"):
        return None
    strategy = training.get("hub_strategy", "end")
    if strategy != "end":
        raise error(
            "training.hub_strategy",
            f"{strategy!r}: adakd uploads final/ only, once, after training (never checkpoints or optimizer state); "
            "set it to 'end' or leave it out",
        )
    return HubTarget(
        repo_id=training.get("hub_model_id") or Path(training["output_dir"]).name,
        private=training.get("hub_private_repo"),
        token=training.get("hub_token"),
        revision=training.get("hub_revision"),
    )


def _unreachable(e: BaseException) -> bool:
    """Whether ``e`` is the HTTP client's own transport error (no answer, DNS, TLS, timeout): huggingface_hub's
    client (httpx, or requests in older releases) raises them as they are, outside the Hub's error classes."""
    root = type(e).__module__.split(".")[0]
    return root in ("httpx", "httpx2", "requests", "urllib3") or isinstance(e, (ConnectionError, TimeoutError))


def _first_line(e: BaseException) -> str:
    return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _token_check_failure(e: BaseException, target: HubTarget, endpoint: str) -> str:
    """Why the token check (``whoami``) failed, in words: by the error's class and HTTP status, never its text."""
    from huggingface_hub.errors import LocalTokenNotFoundError

    status = getattr(getattr(e, "response", None), "status_code", None)
    if _unreachable(e):
        return f"the Hub ({endpoint}) does not answer ({_first_line(e)})"
    if status == 401:
        return "the Hub refused the token (401 Unauthorized)" + (
            "" if target.token else ": log in again with `hf auth login` or set HF_TOKEN"
        )
    if isinstance(e, LocalTokenNotFoundError):
        return "no Hub token: log in with `hf auth login`, set HF_TOKEN, or give training.hub_token"
    return f"the Hub's answer to the token check: {_first_line(e)}"


def check_hub(training: dict[str, Any], target: HubTarget, error: ErrorFactory) -> None:
    """Before the first step, that ``final/`` can be uploaded at the end: the repo id is well formed, the Hub
    answers, the token is accepted, and its user may write to the repo's namespace (their own or an organisation
    they belong to). Catches what would otherwise fail only after hours of training.

    Raises:
        ConfigError: naming ``training.hub_model_id``, ``training.hub_token`` or ``training.push_to_hub``.
    """
    from huggingface_hub import HfApi, constants

    key = "training.hub_model_id" if training.get("hub_model_id") else "training.output_dir"
    if not REPO_ID.fullmatch(target.repo_id) or ".." in target.repo_id or len(target.repo_id.split("/")[-1]) > 96:
        raise error(
            key,
            f"{target.repo_id!r} is not a Hub repo id (NAME or NAMESPACE/NAME: letters, digits, '-', '_', '.'; up "
            "to 96 characters)",
        )
    token_key = "training.hub_token" if target.token else "training.push_to_hub"
    try:
        me = HfApi(token=target.token).whoami()
    except Exception as e:  # the Hub's errors are OSErrors; the transport's are not
        if not (_unreachable(e) or isinstance(e, OSError)):
            raise
        reason = _token_check_failure(e, target, constants.ENDPOINT)
        raise error(
            token_key,
            f"{reason}; checked before training so that final/ can be uploaded after it (or set "
            "training.push_to_hub: false and upload final/ later with `hf upload`)",
        ) from e
    namespace = target.repo_id.split("/")[0] if "/" in target.repo_id else None
    user = me.get("name")
    allowed = {user} | {org.get("name") for org in me.get("orgs") or [] if isinstance(org, dict)}
    if namespace is not None and user and namespace not in allowed:
        raise error(
            key,
            f"{target.repo_id}: the token's user {user!r} cannot write to {namespace!r} (theirs: "
            f"{', '.join(sorted(n for n in allowed if n))})",
        )


def push_final(folder: str | Path, target: HubTarget) -> str:
    """Upload ``folder`` (a run's ``final/``) and nothing else to ``target``, creating the repo (and the branch)
    when missing. Returns the repo id the Hub answered (with the namespace).

    Raises:
        UploadError: the Hub refused or could not be reached; the model stays in ``folder``, and the message gives
            the shell command that uploads it later.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=target.token)
    try:
        repo_id = api.create_repo(target.repo_id, private=target.private, exist_ok=True).repo_id
        if target.revision is not None:
            api.create_branch(repo_id, branch=target.revision, exist_ok=True)
        api.upload_folder(
            repo_id=repo_id,
            folder_path=str(folder),
            revision=target.revision,
            commit_message="adakd: the distilled model",
        )
    except Exception as e:  # HfHubHTTPError / a missing token: OSError; a bad repo id: ValueError; transport: httpx
        if not (isinstance(e, (OSError, ValueError)) or _unreachable(e)):
            raise
        command = ["hf", "upload", target.repo_id, str(folder)]
        command += ["--revision", target.revision] if target.revision is not None else []
        raise UploadError(
            f"training.push_to_hub: uploading {folder} to {target.repo_id} failed ({_first_line(e)}); the model is "
            f"saved there: upload it later with `{shlex.join(command)}`"
        ) from e
    return repo_id
