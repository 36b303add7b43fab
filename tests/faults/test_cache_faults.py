"""`adakd cache` under faults: a second run on the same folder, shards of another cache, a full disk, a read-only file
system, a hand-edited manifest, a corrupt shard. Each ends with one `adakd: error:` line (exit 2) or one line saying
what is computed again, and nothing written so far is lost."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import adakd.cache.build as build  # noqa: E402
import adakd.cache.writer as writer  # noqa: E402
from adakd.cache import open_cache  # noqa: E402
from adakd.cache.format import read_shard_header  # noqa: E402
from adakd.cli import main  # noqa: E402
from adakd.train import load_config  # noqa: E402
from adakd.train.config import ConfigError  # noqa: E402
from adakd.train.examples import training_examples  # noqa: E402
from adakd.train.inputs import load_tokenizer, training_arguments  # noqa: E402

from .common import TINY, cli, cli_subprocess, one_line_error  # noqa: E402

SHARDS = ("shard-00000.safetensors", "shard-00001.safetensors", "shard-00002.safetensors")
# Holds the lock an adakd cache run takes (an exclusive flock on DIR/build.lock, its pid and host in it) until its
# stdin closes.
HOLD = """
import fcntl, os, socket, sys
fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()} {socket.gethostname()}\\n".encode())
print("locked", flush=True)
sys.stdin.read()
"""


def _overrides(root: Path) -> list[str]:
    return ["data.synthetic_size=12", "training.disable_tqdm=true", f"training.output_dir={root / 'run'}"]


def _args(out: Path, root: Path, *extra: str) -> list[str]:
    """``adakd cache`` on the tiny config: 7 examples in 3 shards (3 + 3 + 1), k = 4."""
    flags = ["--top-k", "4", "--shard-examples", "3", "--batch-size", "3"]
    return ["cache", str(TINY), "--output", str(out), *flags, *_overrides(root), *extra]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(root, a complete cache in root/base)."""
    root = tmp_path_factory.mktemp("cache-faults")
    assert main(_args(root / "base", root)) == 0
    assert sorted(p.name for p in (root / "base").iterdir()) == ["manifest.json", "plan.json", *SHARDS]
    return root, root / "base"


def _copy(cache: Path, to: Path, *drop: str) -> Path:
    """A copy of ``cache`` without the files ``drop`` (manifest.json and a shard: an interrupted cache)."""
    shutil.copytree(cache, to)
    for name in drop:
        (to / name).unlink()
    return to


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


def _same_shards(a: Path, b: Path) -> None:
    for name in SHARDS:
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def _held_by(out: Path, pid: int) -> str:
    return (
        f"adakd: error: --output {out}: another adakd cache run (pid {pid} on {socket.gethostname()}) is writing to "
        f"this folder (it holds {out / 'build.lock'}): wait for it to end, or use another folder"
    )


# 1. One run at a time; a shard is kept only when it was computed for this cache.


def test_a_folder_another_run_holds_is_refused_and_left_as_it_was(base, tmp_path, capsys):
    root, cache = base
    out = _copy(cache, tmp_path / "out", "manifest.json", SHARDS[2])  # an interrupted cache a run would continue
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / "build.lock")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = _snapshot(out)
        line = one_line_error(*cli(capsys, *_args(out, root)))
        assert line == _held_by(out, holder.pid)
        assert _snapshot(out) == before  # not a byte, not a time stamp: the lock file too
    finally:
        holder.stdin.close()
        holder.wait(timeout=30)
    # The holder is gone (its lock file left behind, as after kill -9): the same command finishes the cache.
    assert main(_args(out, root)) == 0
    assert sorted(p.name for p in out.iterdir()) == ["manifest.json", "plan.json", *SHARDS]
    _same_shards(out, cache)


@pytest.mark.slow
def test_two_adakd_cache_runs_on_one_folder_never_mix(base, tmp_path, monkeypatch):
    """A second `adakd cache` (another teacher) started while the first computes its first shard is refused, and the
    folder ends as the first run's cache alone."""
    root, cache = base
    out = tmp_path / "out"
    real, seen = build.compute_shard, {}

    def compute_while_another_run_starts(*args, **kwargs):
        if not seen:
            seen["before"] = _snapshot(out)
            seen["other"] = cli_subprocess(*_args(out, root, "teacher.seed=3"), timeout=300)
            seen["after"] = _snapshot(out)
        return real(*args, **kwargs)

    monkeypatch.setattr(build, "compute_shard", compute_while_another_run_starts)
    assert main(_args(out, root)) == 0
    other = seen["other"]
    assert one_line_error(other.returncode, other.stderr) == _held_by(out, os.getpid())
    assert seen["after"] == seen["before"]
    _same_shards(out, cache)
    for name in SHARDS:
        assert read_shard_header(out / name).meta["plan"]["teacher"]["seed"] == 1
    assert json.loads((out / "manifest.json").read_text())["teacher"]["seed"] == 1


@pytest.mark.parametrize(
    ("other", "differs"),
    [(["--top-k", "8"], "top_k 8, not 4"), (["teacher.seed=3"], "teacher.seed 3, not 1")],
    ids=["top-k", "teacher"],
)
def test_a_shard_of_another_cache_is_refused(base, tmp_path, capsys, other, differs):
    root, cache = base
    assert main(_args(tmp_path / "other", root, *other)) == 0
    out = _copy(cache, tmp_path / "out", "manifest.json")
    shutil.copyfile(tmp_path / "other" / SHARDS[1], out / SHARDS[1])  # e.g. two runs that wrote one folder
    before = _snapshot(out)
    line = one_line_error(*cli(capsys, *_args(out, root)))
    assert line == (
        f"adakd: error: --output {out}: {SHARDS[1]} was computed for a cache made with {differs} (a shard of another "
        "cache): delete it, or use --overwrite"
    )
    assert _snapshot(out) == before


@pytest.mark.parametrize(
    ("source", "target", "message"),
    [
        (SHARDS[0], SHARDS[1], f"{SHARDS[1]} holds shard 0 of this cache, not shard 1 (a renamed file?)"),
        (SHARDS[0], "shard-00007.safetensors", "shard-00007.safetensors is not a shard of this cache, which has 3 "
         "shards (a file of another cache?)"),
    ],
    ids=["renamed", "extra"],
)  # fmt: skip
def test_a_shard_in_the_wrong_place_is_refused(base, tmp_path, capsys, source, target, message):
    root, cache = base
    out = _copy(cache, tmp_path / "out", "manifest.json")
    shutil.copyfile(out / source, out / target)
    before = _snapshot(out)
    line = one_line_error(*cli(capsys, *_args(out, root)))
    assert line == f"adakd: error: --output {out}: {message}: delete it, or use --overwrite"
    assert _snapshot(out) == before


def _headerless(path: Path) -> None:
    """``path`` as an adakd before shard headers wrote it: the same tensors, no metadata."""
    from safetensors.numpy import load_file, save_file

    save_file(load_file(str(path)), str(path))


def test_a_shard_without_its_header_is_computed_again_unless_the_manifest_vouches_for_it(base, tmp_path, capsys):
    root, cache = base
    # An interrupted cache of an older adakd: nothing says which cache the shard belongs to, so it is computed again.
    out = _copy(cache, tmp_path / "out", "manifest.json")
    _headerless(out / SHARDS[1])
    capsys.readouterr()
    assert main(_args(out, root)) == 0
    err = capsys.readouterr().err
    assert (
        f"[adakd] cache: {out}: {SHARDS[1]}: written without the header that says which cache it belongs to (an "
        "older adakd?); computing it again" in err.splitlines()
    )
    _same_shards(out, cache)
    # A complete cache of an older adakd: its manifest holds each shard's sha256, which vouches for it.
    old = _copy(cache, tmp_path / "old")
    manifest = json.loads((old / "manifest.json").read_text())
    for entry in manifest["shards"]:
        _headerless(old / entry["file"])
        entry["bytes"], entry["sha256"] = build.sha256_file(old / entry["file"])
    (old / "manifest.json").write_text(json.dumps(manifest))
    before = _snapshot(old)
    assert main(_args(old, root)) == 0
    assert "complete already" in capsys.readouterr().out
    assert _snapshot(old) == before


# 2. File-system errors: one line naming the path and the reason; what was written is kept, nothing partial.


def test_a_full_disk_keeps_the_shards_written_and_no_partial_one(base, tmp_path, capsys, monkeypatch):
    root, cache = base
    out = tmp_path / "out"

    def full_disk(path, mode="r", *args, **kwargs):
        f = open(path, mode, *args, **kwargs)
        if SHARDS[1] not in str(path):
            return f

        class Full:  # the first block fits, then the disk is full
            def __enter__(self):
                return self

            def __exit__(self, *exc):
                f.close()

            def write(self, data):
                f.write(data[:1024])
                f.flush()
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        return Full()

    monkeypatch.setattr(writer, "open", full_disk, raising=False)
    line = one_line_error(*cli(capsys, *_args(out, root)))
    assert line == (
        f"adakd: error: --output {out}: cannot write {out / SHARDS[1]}: no space left on device; free some space and "
        "run the same command again (the shards written so far are kept)"
    )
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", SHARDS[0]]  # no half shard, no manifest, no lock
    assert (out / SHARDS[0]).read_bytes() == (cache / SHARDS[0]).read_bytes()
    monkeypatch.delattr(writer, "open")
    computed = []
    real = build.compute_shard

    def counting(model, examples, first, count, **kwargs):
        computed.append(first)
        return real(model, examples, first, count, **kwargs)

    monkeypatch.setattr(build, "compute_shard", counting)
    assert main(_args(out, root)) == 0
    assert computed == [3, 6]
    _same_shards(out, cache)


def test_a_read_only_file_system_is_one_line(base, tmp_path, capsys, monkeypatch):
    root, cache = base
    # A new --output folder on a read-only mount: it cannot be created.
    new = tmp_path / "ro" / "cache"
    real_mkdir = Path.mkdir

    def read_only_mkdir(self, *args, **kwargs):
        if str(self).startswith(str(tmp_path / "ro")):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", read_only_mkdir)
    line = one_line_error(*cli(capsys, *_args(new, root)))
    assert line == (
        f"adakd: error: --output {new}: cannot write {new}: read-only file system; give --output a folder on a "
        "writable file system"
    )
    monkeypatch.undo()
    # A folder that turns read-only while a shard is renamed into place: the shards there are kept.
    out = _copy(cache, tmp_path / "out", "manifest.json", SHARDS[2])
    real_replace = os.replace

    def read_only_replace(src, dst, *args, **kwargs):
        if str(dst) == str(out / SHARDS[2]):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(src), None, str(dst))
        return real_replace(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", read_only_replace)
    line = one_line_error(*cli(capsys, *_args(out, root)))
    assert line == (
        f"adakd: error: --output {out}: cannot write {out / SHARDS[2]}: read-only file system; give --output a folder "
        "on a writable file system"
    )
    assert sorted(p.name for p in out.iterdir()) == ["plan.json", *SHARDS[:2]]
    for name in SHARDS[:2]:
        assert (out / name).read_bytes() == (cache / name).read_bytes(), name


def test_an_output_under_a_file_is_one_line(base, tmp_path, capsys):
    root, _ = base
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "cache"
    line = one_line_error(*cli(capsys, *_args(out, root)))
    assert line == f"adakd: error: --output {out}: cannot write {out}: not a directory"


def _can_mount_tmpfs(where: Path) -> bool:
    if sys.platform != "linux" or shutil.which("unshare") is None:
        return False
    where.mkdir(exist_ok=True)
    probe = ["unshare", "-rm", "sh", "-c", f"mount -t tmpfs -o size=4k tmpfs {where}"]
    return subprocess.run(probe, capture_output=True).returncode == 0


def _in_tmpfs(mnt: Path, size: int, script: str) -> subprocess.CompletedProcess:
    """``script`` (sh) in a private mount namespace where a tmpfs of ``size`` bytes is mounted on ``mnt``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    cmd = ["unshare", "-rm", "sh", "-ec", f"mount -t tmpfs -o size={size} tmpfs {mnt}\n{script}"]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=TINY.parents[1])


@pytest.mark.slow
def test_a_really_full_tmpfs(base, tmp_path):
    """A tmpfs with room for the lock, the plan and the first shard only: the second shard finds the disk full."""
    root, cache = base
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs unshare -rm)")
    page = os.sysconf("SC_PAGE_SIZE")
    pages = 1 + sum(-(-(cache / name).stat().st_size // page) for name in ("plan.json", SHARDS[0]))
    out, kept = mnt / "cache", tmp_path / "kept"
    run = " ".join(map(str, [sys.executable, "-m", "adakd", *_args(out, root)]))
    proc = _in_tmpfs(mnt, pages * page, f"{run} || echo $? > {tmp_path / 'rc'}\ncp -a {out} {kept}")
    assert (tmp_path / "rc").read_text().strip() == "2", proc.stderr
    line = one_line_error(2, proc.stderr)
    assert line.startswith(f"adakd: error: --output {out}: cannot write {out / SHARDS[1]}: no space left on device")
    assert sorted(p.name for p in kept.iterdir()) == ["plan.json", SHARDS[0]]
    assert (kept / SHARDS[0]).read_bytes() == (cache / SHARDS[0]).read_bytes()


@pytest.mark.slow
def test_a_really_read_only_tmpfs(base, tmp_path):
    """An interrupted cache on a file system remounted read-only: refused in one line, left as it was."""
    root, cache = base
    mnt = tmp_path / "mnt"
    if not _can_mount_tmpfs(mnt):
        pytest.skip("cannot mount a tmpfs here (needs unshare -rm)")
    partial = _copy(cache, tmp_path / "partial", "manifest.json", SHARDS[2])
    out = mnt / "cache"
    run = " ".join(map(str, [sys.executable, "-m", "adakd", *_args(out, root)]))
    script = (
        f"cp -a {partial} {out}\nmount -o remount,ro {mnt}\nls -l --time-style=full-iso {out} > {tmp_path / 'before'}\n"
        f"{run} || echo $? > {tmp_path / 'rc'}\nls -l --time-style=full-iso {out} > {tmp_path / 'after'}"
    )
    proc = _in_tmpfs(mnt, 1 << 20, script)
    assert (tmp_path / "rc").read_text().strip() == "2", proc.stderr
    line = one_line_error(2, proc.stderr)
    assert line == (
        f"adakd: error: --output {out}: cannot write {out / 'build.lock'}: read-only file system; give --output a "
        "folder on a writable file system"
    )
    assert (tmp_path / "before").read_text() == (tmp_path / "after").read_text()


# 3. A hand-edited manifest is refused when the cache opens; a rerun finds a corrupt shard and computes it again.


@pytest.fixture(scope="module")
def inputs(base):
    """The config, tokenizer and examples of a training run that reads the base cache."""
    root, _ = base
    config = load_config(TINY, _overrides(root))
    tokenizer = load_tokenizer(config.student)
    examples, _ = training_examples(config.data, training_arguments(config.training), tokenizer)
    return config, tokenizer, examples


def _edit(edit):
    def apply(m):
        edit(m)
        return m

    return apply


def _set(key, value):
    return _edit(lambda m: m.__setitem__(key, value))


def _bump_positions(m):
    m["shards"][0]["positions"] += 1
    m["positions"] += 1


E = re.escape


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (_set("top_k", 3), E("top_k: 3, but shard-00000.safetensors holds 4 tokens per row")),
        (_set("top_k", "4"), E('top_k: expected an integer of at least 1, got "4"')),
        (_set("logprob_dtype", "float32"), E("logprob_dtype: float32, but shard-00000.safetensors holds float16 log-")),
        (_edit(lambda m: m["shards"].pop(1)), E('shards[1].file: "shard-00002.safetensors" where '
                                                "shard-00001.safetensors belongs (a dropped or reordered entry?)")),
        (_edit(lambda m: m["shards"].pop()), E("shards: they hold 6 examples, the manifest's examples 7")),
        (_edit(lambda m: m["shards"][1].__setitem__("examples", "3")), E('shards[1].examples: expected an integer '
                                                                         'of at least 1, got "3"')),
        (_set("shards", {"file": "shard-00000.safetensors"}), E("shards: expected a list, got {")),
        (_edit(_bump_positions), E("shards[0].positions: ") + r"(\d+)" + E(", but shard-00000.safetensors holds ")
         + r"(\d+)" + E(" rows")),
    ],
    ids=["top-k", "top-k-string", "dtype", "dropped-entry", "dropped-last", "examples-string", "shards-object",
         "positions"],
)  # fmt: skip
def test_a_hand_edited_manifest_is_refused_naming_the_key(base, inputs, tmp_path, edit, pattern):
    _, cache = base
    config, tokenizer, examples = inputs
    out = _copy(cache, tmp_path / "out")
    path = out / "manifest.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ConfigError) as info:
        open_cache(
            out,
            student=config.student,
            data=config.data,
            onpolicy_mode=config.onpolicy.mode,
            tokenizer=tokenizer,
            examples=examples,
        )
    text = str(info.value)
    found = re.match(E(f"teacher.cache: {out}: manifest.json: ") + pattern, text)
    assert found and "\n" not in text, text
    if found.groups():  # the positions the manifest claims, one more than the shard holds
        assert int(found[1]) == int(found[2]) + 1, text
    assert text.endswith("(a hand-edited manifest?): compute the cache again with adakd cache"), text


def test_adakd_train_on_a_hand_edited_manifest_is_one_line(base, tmp_path, capsys):
    root, cache = base
    out = _copy(cache, tmp_path / "out")
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["top_k"] = 3
    (out / "manifest.json").write_text(json.dumps(manifest))
    args = ["train", str(TINY), *_overrides(root), f"teacher.cache={out}", "training.max_steps=1", "loss.fused=false"]
    line = one_line_error(*cli(capsys, *args))
    assert f"teacher.cache: {out}: manifest.json: top_k: 3, but shard-00000.safetensors holds 4 tokens per row" in line


def _flip(offset):
    def damage(path: Path) -> None:
        data = bytearray(path.read_bytes())
        data[offset] ^= 0xFF  # -1: the last byte, in the tensors; 10: in the header
        path.write_bytes(bytes(data))

    return damage


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-10])


@pytest.mark.parametrize(
    ("damage", "drop", "reason"),
    [
        (_flip(-1), (), E("its size or sha256 is not the manifest's (corrupt)")),
        (_flip(-1), ("manifest.json",), E("its tensors' sha256 is not the one its header records (corrupt)")),
        (_flip(10), (), E("not a safetensors file (its header is not a JSON object)")),
        (_truncate, (), r"\d+ bytes where its header describes \d+ \(truncated\?\)"),
    ],
    ids=["flipped", "flipped-unfinished", "flipped-header", "truncated"],
)
def test_a_rerun_computes_a_corrupt_shard_again_and_only_it(base, tmp_path, capsys, monkeypatch, damage, drop, reason):
    root, cache = base
    out = _copy(cache, tmp_path / "out", *drop)
    damage(out / SHARDS[1])
    computed = []
    real = build.compute_shard

    def counting(model, examples, first, count, **kwargs):
        computed.append(first)
        return real(model, examples, first, count, **kwargs)

    monkeypatch.setattr(build, "compute_shard", counting)
    capsys.readouterr()
    assert main(_args(out, root)) == 0
    out_text, err = capsys.readouterr()
    notes = [line for line in err.splitlines() if SHARDS[1] in line]
    assert len(notes) == 1 and re.fullmatch(
        re.escape(f"[adakd] cache: {out}: {SHARDS[1]}: ") + reason + re.escape("; computing it again"), notes[0]
    ), err
    assert computed == [3] and "1 shards computed" in out_text
    _same_shards(out, cache)
    a, b = (json.loads((d / "manifest.json").read_text()) for d in (cache, out))
    assert a["shards"] == b["shards"]
