"""``adakd cache``: run the teacher once over the training data and store its top-k at every supervised position.

The examples are built exactly as ``adakd train`` builds them (same tokenizer, template, masking and length policy),
so that a training run reading the cache (``teacher.cache``) finds one row per supervised position.

Resumable: ``plan.json`` (what the cache is made of) is written before any shard, and shards are written atomically;
the same command run again keeps the shards already there whose header names this plan and whose bytes check out,
computes the damaged ones again, and refuses a shard of another cache; another command is refused. One run at a time:
the run holds an exclusive ``flock`` on ``DIR/build.lock`` from start to end. Several processes (``torchrun``):
shard s is computed by rank s % world, rank 0 (the one holding the lock) writes ``manifest.json`` once all are there.
"""

from __future__ import annotations

import dataclasses
import datetime
from typing import Any

from ..files import write_json
from .folder import CacheFolder, OutputLock, file_errors, note
from .format import (
    FORMAT,
    MANIFEST,
    PLAN,
    data_info,
    digest_examples,
    id_dtype,
    is_cache_file,
    sha256_file,
    shard_name,
    template_info,
    tokenizer_info,
)
from .teachers import teacher_rows_of
from .writer import compute_shard, student_vocab_rows, write_shard

__all__ = ["LOGPROB_DTYPES", "build_cache", "check_cache_config"]

LOGPROB_DTYPES = ("float16", "float32")
# A process that finished its shards waits at the final barrier for the others' (a shard of a large teacher can
# take longer than the process group's default 30 minutes).
_FINAL_WAIT = datetime.timedelta(days=7)


def check_cache_config(config: Any) -> None:
    """Refuse a config whose run ``adakd cache`` cannot serve; raises :class:`ConfigError` naming the key."""
    if config.teacher is None:
        raise config.error("teacher", "adakd cache runs the teacher, and the config has none")
    cached = getattr(config.teacher, "cache", None)
    if cached:
        raise config.error(
            "teacher.cache", f"is set ({cached}): adakd cache computes a cache from the live teacher; drop the key"
        )
    if config.loss.kd_ratio == 0:
        raise config.error("loss.kd_ratio", "is 0: the run trains without the teacher, so there is nothing to cache")
    if config.onpolicy.mode != "off":
        raise config.error(
            "onpolicy.mode",
            f"{config.onpolicy.mode} distils on text generated during training, which needs the live teacher: a cache "
            "holds the teacher on the training data only",
        )
    if config.data.streaming:
        raise config.error(
            "data.streaming", "a cache is indexed by example, and a stream has no index: set data.streaming: false"
        )


def _check_options(top_k: int, dtype: str, batch_size: int, shard_examples: int) -> None:
    from ..errors import InputError

    for flag, value in (("--top-k", top_k), ("--batch-size", batch_size), ("--shard-examples", shard_examples)):
        if not isinstance(value, int) or value < 1:
            raise InputError(f"{flag}: must be a positive integer, got {value}")
    if dtype not in LOGPROB_DTYPES:
        raise InputError(f"--dtype: {dtype!r} is not one of {', '.join(LOGPROB_DTYPES)}")


def _plan(t: Any, d: Any, tokenizer: Any, digest: Any, conversations: bool, **fields: Any) -> dict[str, Any]:
    """What the cache is made of, in the order a difference is reported (the manifest less ``created`` and
    ``shards``): of the ``teacher`` section ``t``, the ``data`` section ``d``, the student ``tokenizer`` and the
    examples' ``digest``. ``fields``: ``tokenizer_source`` (where the tokenizer came from), ``top_k``,
    ``logprob_dtype``, ``shard_examples``, and once the teacher is loaded ``vocab_size`` and ``id_dtype``."""
    server = getattr(t, "server", None)
    teacher = (
        {"server": {"url": server.url, "model": server.model}}
        if server is not None
        else {
            "name_or_path": t.name_or_path,
            "revision": t.model_kwargs.get("revision"),
            "dtype": t.dtype,
            "adapter": t.adapter,
            "quantization": t.quantization,
            "config": t.config,
        }
    )
    if (
        server is None and t.gguf_file is not None
    ):  # only then: a manifest written before the key existed keeps its plan
        teacher["gguf_file"] = t.gguf_file
    if server is None and t.config is not None:
        teacher["seed"] = t.seed  # an inline teacher's weights are drawn from it
    plan = {"format": FORMAT, "teacher": teacher}
    keys = ("vocab_size", "teacher_vocab_size", "top_k", "logprob_dtype", "id_dtype")
    plan.update({key: fields[key] for key in keys if key in fields})
    plan["tokenizer"] = tokenizer_info(fields["tokenizer_source"], tokenizer)
    plan.update(data=data_info(d), template=template_info(d.template, tokenizer, conversations))
    plan.update(max_length=d.max_length, max_prompt_length=d.max_prompt_length, shard_examples=fields["shard_examples"])
    plan.update(examples=digest.count, positions=digest.total, examples_sha256=digest.sha256)
    return plan


def _conversations(d: Any) -> bool:
    """Whether the training examples are conversations rendered with a chat template (as
    :func:`adakd.data.tokenize_rows` decides: from ``data.format``, else the first row)."""
    if d.source != "hf":
        return False
    from ..data import detect_format
    from ..train.examples import load_records

    first = next(iter(load_records(d)), None)
    if first is None:
        return False
    data_format = d.format or detect_format(first, "data row 0")
    return data_format == "messages" or (data_format == "prompt_completion" and isinstance(first.get("prompt"), list))


@dataclasses.dataclass(frozen=True)
class _Options:
    """:func:`build_cache`'s options (checked by :func:`_check_options`)."""

    top_k: int
    dtype: str
    batch_size: int
    shard_examples: int
    overwrite: bool


class _Ranks:
    """The processes of a ``torchrun`` launch (one process: no-ops)."""

    def __init__(self, args: Any) -> None:
        import torch.distributed as dist

        self.rank, self.world = args.process_index, max(1, args.world_size)
        self.group = None
        if self.world > 1 and dist.is_available() and dist.is_initialized():
            self.group = dist.new_group(backend="gloo", timeout=_FINAL_WAIT)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.group is not None:
            import torch.distributed as dist

            dist.barrier(group=self.group)


def _log(ranks: _Ranks, message: str) -> None:
    if ranks.main:
        print(f"[adakd] {message}", flush=True)


def _prepare(folder: CacheFolder, plan: dict[str, Any], overwrite: bool, ranks: _Ranks) -> None:
    """Rank 0, while the others wait: delete the old cache (``--overwrite``), or an outdated manifest, the shards
    :meth:`CacheFolder.verify` found damaged (one line each on stderr) and the temporary files an interrupted run left;
    then write ``plan.json``."""
    if ranks.main:
        output = folder.output
        with file_errors(output, folder.path):
            folder.path.mkdir(parents=True, exist_ok=True)
        if folder.manifest_note and not overwrite:
            note(f"cache: {output}: {folder.manifest_note}; the manifest is written anew")
        for name, why in sorted(folder.redo.items()):
            note(f"cache: {output}: {name}: {why}; computing it again")
        with file_errors(output, folder.path, "read"):
            paths = sorted(folder.path.iterdir())
        for path in paths:
            stale = overwrite or ".tmp" in path.name or path.name == MANIFEST or path.name in folder.redo
            if stale and is_cache_file(path.name):
                with file_errors(output, path, "delete"):
                    path.unlink()
        with file_errors(output, folder.path / PLAN):
            write_json(folder.path / PLAN, plan)
    ranks.barrier()


def _shards(digest: Any, shard_examples: int) -> list[tuple[int, int, int]]:
    """``(first example, examples, positions)`` of each shard."""
    out = []
    for first in range(0, digest.count, shard_examples):
        count = min(shard_examples, digest.count - first)
        out.append((first, count, int(digest.positions[first : first + count].sum())))
    return out


def _compute(
    rows: Any, examples: Any, shards: list, folder: CacheFolder, plan: dict, ranks: _Ranks, **options: Any
) -> int:
    """Compute and write this process's missing shards (shard s belongs to rank s % world); returns their count.
    ``options``: :func:`~adakd.cache.writer.compute_shard`'s keywords. Each shard's header records ``plan`` and its
    place (:func:`~adakd.cache.writer.write_shard`)."""
    from tqdm.auto import tqdm

    mine = [s for s in range(len(shards)) if s % ranks.world == ranks.rank]
    todo = [s for s in mine if not (folder.path / shard_name(s)).is_file()]
    if len(todo) < len(mine):
        _log(ranks, f"cache: {len(mine) - len(todo)} of this process's {len(mine)} shards already written, kept")
    total = sum(shards[s][1] for s in todo)
    with tqdm(total=total, desc="adakd cache", unit="ex", disable=not ranks.main) as progress:
        for s in todo:
            first, count, positions = shards[s]
            tensors = compute_shard(rows, examples, first, count, progress=progress, **options)
            if int(tensors["offsets"][-1]) != positions:  # the collator masks as the digest counts: a bug otherwise
                raise RuntimeError(f"shard {s}: {int(tensors['offsets'][-1])} rows for {positions} positions")
            place = {"index": s, "first_example": first, "examples": count, "positions": positions}
            meta = {"plan": plan, "shard": place}
            path = folder.path / shard_name(s)
            with file_errors(folder.output, path):
                write_shard(path, tensors, meta)
    return len(todo)


def _write_manifest(folder: CacheFolder, plan: dict[str, Any], shards: list) -> dict[str, Any]:
    """Read every shard back (its size, sha256 and row count) and write ``manifest.json`` atomically."""
    import numpy as np
    from safetensors import safe_open

    from ..errors import InputError

    entries = []
    tail_mass, tail_max = 0.0, 0.0
    for s, (first, count, positions) in enumerate(shards):
        path = folder.path / shard_name(s)
        with file_errors(folder.output, path, "read"), safe_open(str(path), framework="numpy") as f:
            rows = int(f.get_tensor("offsets")[-1])
            mass = np.exp(f.get_tensor("tail").astype(np.float64))
        tail_mass += float(mass.sum())
        tail_max = max(tail_max, float(mass.max(initial=0.0)))
        if rows != positions:
            raise InputError(
                f"--output {folder.output}: {path.name} holds {rows} rows where this cache has {positions} "
                "positions (a file from another run?): delete it and run the command again"
            )
        with file_errors(folder.output, path, "read"):
            size, sha = sha256_file(path)
        entry = {"file": path.name, "first_example": first, "examples": count, "positions": positions}
        entries.append({**entry, "bytes": size, "sha256": sha})
    created = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    # The teacher's mass outside the top-k, over every position: how much of its distribution the cache lumps into
    # the tail bucket (docs/cache.md: above about 1%, raise --top-k or train with the live teacher).
    tail = {"mean": tail_mass / max(1, plan["positions"]), "max": tail_max}
    manifest = {"format": plan["format"], "created": created, **plan, "tail_mass": tail, "shards": entries}
    with file_errors(folder.output, folder.path / MANIFEST):
        write_json(folder.path / MANIFEST, manifest)
    return manifest


def _summary(manifest: dict[str, Any], output: str, computed: int, rank: int) -> dict[str, Any]:
    size = sum(s["bytes"] for s in manifest["shards"])
    mean = manifest.get("tail_mass", {}).get("mean")
    return {
        "output": output,
        "examples": manifest["examples"],
        "positions": manifest["positions"],
        "shards": len(manifest["shards"]),
        "bytes": size,
        "bytes_per_position": size / max(1, manifest["positions"]),
        "tail_mass": mean if isinstance(mean, (int, float)) else float("nan"),
        "top_k": manifest["top_k"],  # effective: a --top-k above the vocabulary keeps the whole vocabulary
        "computed_shards": computed,
        "rank": rank,
    }


def build_cache(
    config: Any,
    output: str,
    *,
    top_k: int = 32,
    dtype: str = "float16",
    batch_size: int = 8,
    shard_examples: int = 1024,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Compute the teacher cache of ``config``'s training data into the folder ``output`` (see the module).

    Args:
        config: a :class:`adakd.train.DistillConfig` with a teacher (not itself a cache), off-policy, not streamed.
        output: the cache folder; a folder holding this same plan is continued, another plan is refused.
        top_k: tokens kept per position (at most the teacher's vocabulary).
        dtype: the log-probabilities' storage dtype, ``float16`` or ``float32`` (the tail is always float32).
        batch_size: examples per teacher forward pass.
        shard_examples: examples per shard file.
        overwrite: delete the cache files ``output`` holds first.

    Returns:
        ``output``, ``examples``, ``positions``, ``shards``, ``bytes`` (the shards'), ``bytes_per_position``,
        ``computed_shards`` (0 for a cache found complete), ``rank``; a process other than rank 0 returns its own
        ``computed_shards`` and ``rank`` only.

    Raises:
        ConfigError: a config ``adakd cache`` refuses (:func:`check_cache_config`), or what training would refuse.
        InputError: a bad option; an ``output`` that holds something else, a shard of another cache, or that another
            ``adakd cache`` run is writing (it holds ``output/build.lock``); a file-system error (a full disk, a
            read-only file system), naming the path.
    """
    _check_options(top_k, dtype, batch_size, shard_examples)
    check_cache_config(config)
    from ..train.inputs import training_arguments

    # Each process runs a whole teacher: DeepSpeed would build it partitioned (zero.Init) for training.
    plain = {key: value for key, value in config.training.items() if key != "deepspeed"}
    args = training_arguments(plain, origin=config.origin)
    ranks = _Ranks(args)
    lock = OutputLock(output) if ranks.main else None
    if lock is not None:
        lock.acquire()  # before the folder is read, until the command returns: one run at a time
    try:
        ranks.barrier()  # the others read the folder once rank 0 holds it
        return _build(config, args, ranks, output, _Options(top_k, dtype, batch_size, shard_examples, overwrite))
    finally:
        if lock is not None:
            lock.release()


def _build(config: Any, args: Any, ranks: _Ranks, output: str, options: _Options) -> dict[str, Any]:
    """:func:`build_cache` once the folder is locked."""
    from ..data import DistillCollator
    from ..train.examples import training_examples
    from ..train.inputs import check_tokenizers, load_tokenizer
    from ..train.models import tokenizer_source

    top_k, dtype, shard_examples, overwrite = options.top_k, options.dtype, options.shard_examples, options.overwrite
    tokenizer = load_tokenizer(config.student)
    check_tokenizers(config.teacher, config.loss, tokenizer)
    # check_cache_config refused on-policy modes: nothing is held out
    examples, _ = training_examples(config.data, args, tokenizer, tokenizer_name=tokenizer_source(config.student))
    digest = digest_examples(examples)
    shards = _shards(digest, shard_examples)
    conversations = _conversations(config.data)
    fields: dict[str, Any] = {"top_k": top_k, "logprob_dtype": dtype, "shard_examples": shard_examples}
    fields["tokenizer_source"] = tokenizer_source(config.student)
    folder = CacheFolder(output, overwrite)
    plan = folder.check(_plan(config.teacher, config.data, tokenizer, digest, conversations, **fields))
    folder.verify(plan, shards)
    if folder.complete(plan, len(shards)):
        _log(ranks, f"cache: {output} is complete already; nothing to compute")
        return _summary(folder.manifest, output, 0, ranks.rank)
    vocab = student_vocab_rows(config.student)  # the rows training compares over: the teacher is cropped to them
    rows, teacher_vocab = teacher_rows_of(config.teacher, args, tokenizer, vocab, min(top_k, vocab))
    fields.update(top_k=min(top_k, vocab), vocab_size=vocab, id_dtype=id_dtype(vocab))
    if teacher_vocab is not None:
        fields["teacher_vocab_size"] = teacher_vocab
    plan = folder.check(_plan(config.teacher, config.data, tokenizer, digest, conversations, **fields))
    folder.verify(plan, shards)  # the headers against the whole plan (the bytes were read once, above)
    ranks.barrier()  # every process has read the folder before rank 0 changes it
    _prepare(folder, plan, overwrite, ranks)
    collate = DistillCollator(tokenizer.pad_token_id)
    kwargs = {"batch_size": options.batch_size, "collate": collate, "id_dtype": fields["id_dtype"]}
    computed = _compute(rows, examples, shards, folder, plan, ranks, logprob_dtype=dtype, **kwargs)
    ranks.barrier()
    summary = {"computed_shards": computed, "rank": ranks.rank}
    if ranks.main:
        summary = _summary(_write_manifest(folder, plan, shards), output, computed, ranks.rank)
    ranks.barrier()  # the command returns on every process once the cache is complete
    return summary
