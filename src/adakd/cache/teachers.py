"""The teacher ``adakd cache`` computes from: a model loaded here, or a teacher served over HTTP (``teacher.server``),
each as one function of a batch to its top-k rows (:func:`adakd.cache.writer.compute_shard`'s ``rows``)."""

from __future__ import annotations

import functools
from typing import Any

from ..shapes import check_vocab_sizes
from .writer import linear_head, teacher_rows, vocab_rows

__all__ = ["load_teacher", "teacher_rows_of"]


def load_teacher(section: Any, args: Any) -> Any:
    """The teacher alone, on the run's device, in eval mode, without gradients."""
    from ..train.models import check_quantization_backend, load_model

    check_quantization_backend(section, "teacher", args.device)
    model = load_model(section, "teacher", device=args.device)
    if not getattr(model, "is_quantized", False):  # a quantised model was loaded onto its device
        model = model.to(args.device)
    return model.eval().requires_grad_(False)


def teacher_rows_of(section: Any, args: Any, tokenizer: Any, vocab: int, k: int) -> tuple[Any, int | None]:
    """The teacher as a function of a batch to its top-``k`` rows (:func:`~adakd.cache.writer.compute_shard`'s
    ``rows``), and its vocabulary rows (None for a served teacher, whose vocabulary the server check compares).

    A model is loaded and cropped to the student's ``vocab`` rows; a served teacher (``teacher.server``) is checked
    first: it answers, serves the named model with the student's tokenizer, and allows ``k`` log-probabilities."""
    from ..errors import ConfigError

    if getattr(section, "server", None) is not None:
        from ..serving.teacher import TeacherServer

        server = TeacherServer.from_section(section.server, top_k=k)
        info = server.check(tokenizer, vocab)
        version = f", vLLM {info['version']}" if info.get("version") else ""
        print(f"[adakd] teacher: served by {server.endpoint.url} ({server.model}{version}), top-{k}", flush=True)
        return (lambda batch: server.rows(batch["input_ids"], batch["attention_mask"], batch["labels"])), None
    model = load_teacher(section, args)
    teacher_vocab = vocab_rows(model)
    try:
        check_vocab_sizes(vocab, teacher_vocab, len(tokenizer))
    except ValueError as e:
        raise ConfigError(f"teacher: {e}") from e
    return functools.partial(teacher_rows, model, k=k, head=linear_head(model), width=vocab), teacher_vocab
