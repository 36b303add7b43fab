"""Per-token analysis of AdaKD on one response: which tokens are hard, which LATF keeps, and what τ IDTS gives them.

:func:`analyse` runs a teacher and a student over one prompt + response (the response followed by eos, as in
training) and returns a :class:`TokenInfo` per response token: its Hellinger difficulty (Eq. 3), whether it
is among the k = max(1, floor(N·r)) hardest (LATF at a fixed ratio), its IDTS temperature over the kept tokens'
lower median (Eqs. 9-10), and both models' probability of the actual token. :func:`load_model` loads the two models
as the analysis needs them. Rendering the result (an HTML page, a terminal table) is :mod:`adakd.report.tokens`'s job;
``adakd inspect`` composes the two.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .adaptive import difficulty_scores, select_tokens
from .errors import InputError, OptionError
from .shapes import align_vocab

__all__ = ["TAU_WEIGHTS", "TokenInfo", "analyse", "load_model", "summarize_tokens", "token_pieces"]

TAU_WEIGHTS = ("squared", "none")


@dataclass(frozen=True)
class TokenInfo:
    """One response token (the appended eos included, with ``special=True``).

    Attributes:
        position: index in the response, 0-based.
        token_id: the token's id.
        text: its decoded piece; the pieces concatenate to the decoded response. A token that ends inside a
            multi-byte character has the piece ``""`` and the token completing the character carries it.
        score: Hellinger difficulty in [0, 1] (higher = harder).
        rank: 1 for the hardest token, N for the easiest (ties in position order).
        kept: among the k hardest at the given ratio.
        tau: the IDTS temperature of a kept token, ``None`` for a dropped one.
        weight: the factor on a kept token's loss: τ² (``tau_weight="squared"``, Eq. 2) or 1 (``"none"``); ``None``
            for a dropped one.
        p_teacher: the teacher's probability of this token (over the student's vocabulary, as the loss sees it).
        p_student: the student's probability of this token.
        special: the eos appended after the response.
    """

    position: int
    token_id: int
    text: str
    score: float
    rank: int
    kept: bool
    tau: float | None
    p_teacher: float
    p_student: float
    special: bool = False
    weight: float | None = None


def token_pieces(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The decoded text of each token, such that ``"".join(pieces) == tokenizer.decode(ids)``.

    ``decode([id])`` alone is wrong for byte-level vocabularies (a byte of "é" decodes to "\\ufffd") and for
    SentencePiece (which drops a word's leading space), so each piece is the growth of the decoded prefix; a prefix
    that ends in an incomplete character gives the piece ``""`` and the next token takes the whole character.
    """
    pieces: list[str] = []
    committed = ""
    ids = [int(i) for i in ids]
    for i in range(len(ids)):
        text = tokenizer.decode(ids[: i + 1], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        if i < len(ids) - 1 and text.endswith("\ufffd"):
            pieces.append("")
            continue
        if text.startswith(committed):
            pieces.append(text[len(committed) :])
            committed = text
        else:
            # A tokenizer whose prefixes re-decode differently: fall back to the token alone.
            piece = tokenizer.decode([ids[i]], skip_special_tokens=False, clean_up_tokenization_spaces=False)
            pieces.append(piece)
            committed += piece
    return pieces


def _device(model: Any) -> torch.device:
    try:
        return next(model.parameters()).device
    except (StopIteration, AttributeError):
        return torch.device("cpu")


@torch.no_grad()
def _logits(model: Any, ids: list[int]) -> torch.Tensor:
    """``[T, V]`` float32 logits on the CPU, computed in eval mode (no dropout); the model's mode is restored."""
    input_ids = torch.tensor([ids], dtype=torch.long, device=_device(model))
    training = getattr(model, "training", False)
    model.eval()
    try:
        out = model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids))
    finally:
        model.train(training)
    return out.logits[0].float().cpu()


def _context_ids(tokenizer: Any, prompt: str | None) -> list[int]:
    if prompt:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    # Without a prompt the first response token still needs a position predicting it: start the text like a
    # pretraining document, after bos (or the eos that separates documents when there is no bos).
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise InputError("the tokenizer has neither a bos nor an eos token to start a response without a prompt")
    return [int(start)]


def _response_ids(tokenizer: Any, response: str) -> list[int]:
    """The response's ids followed by eos, as :func:`adakd.data.build_examples` builds a training example."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise InputError("the tokenizer has no eos token; load it with adakd.data.tokenizer_for")
    return [*tokenizer(response, add_special_tokens=False)["input_ids"], int(eos)]


@torch.no_grad()
def _token_scores(
    teacher: Any, student: Any, vocab_size: int, context: list[int], response_ids: list[int]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(scores, p_teacher, p_student)``, each ``[N]`` float32 for the N response tokens.

    Position i's logits predict token i + 1, so the N rows that predict the response start one before it; the
    teacher's padding rows are cropped to the student's vocabulary (:func:`adakd.align_vocab`), as in the loss.
    """
    ids = context + response_ids
    start, end = len(context) - 1, len(ids) - 1
    s_logits, t_logits = align_vocab(
        _logits(student, ids)[start:end], _logits(teacher, ids)[start:end], vocab_size=vocab_size
    )  # [N, V_s] each
    labels = torch.tensor(response_ids, dtype=torch.long)[:, None]
    scores = difficulty_scores("hellinger", s_logits, t_logits).float()
    p_student = torch.log_softmax(s_logits, -1).gather(-1, labels).squeeze(-1).exp()
    p_teacher = torch.log_softmax(t_logits, -1).gather(-1, labels).squeeze(-1).exp()
    return scores, p_teacher, p_student


@torch.no_grad()
def analyse(
    teacher: Any,
    student: Any,
    tokenizer: Any,
    prompt: str | None,
    response: str,
    ratio: float = 0.75,
    c: float = 0.5,
    tau_base: float = 1.0,
    tau_weight: str = "squared",
) -> list[TokenInfo]:
    """Score every response token of ``prompt + response + eos`` as AdaKD's loss would, at a fixed ratio.

    The prompt and the response are tokenized separately without special tokens, and eos is appended (as
    :func:`adakd.data.build_examples` does). Position i's logits predict token i + 1; the teacher's extra vocabulary
    rows are cropped (:func:`adakd.align_vocab`).

    Args:
        teacher, student: causal LMs (``model(input_ids=...).logits``), each on its own device; they run in eval
            mode (no dropout) and are left in the mode they were in.
        tokenizer: shared by both; must have an eos.
        prompt: the formatted prompt, not scored; ``None`` or ``""``: none (the text then starts after bos).
        response: the text to score.
        ratio: r ∈ (0, 1]; k = max(1, floor(N·r)) tokens are kept.
        c: IDTS strength.
        tau_base: τ of a kept token at the kept tokens' median difficulty.
        tau_weight: ``squared`` (each kept token's loss times τ²) or ``none``: the ``weight`` shown per token.

    Returns:
        One :class:`TokenInfo` per response token, the eos last, in order.

    Raises:
        InputError: a ratio outside (0, 1], an unknown ``tau_weight`` or a tokenizer without eos.
        ValueError: vocabularies that cannot be aligned (a student larger than the teacher).
    """
    if not 0.0 < ratio <= 1.0:
        raise OptionError("ratio", f"must be in (0, 1], got {ratio}")
    if tau_weight not in TAU_WEIGHTS:
        raise OptionError("tau_weight", f"must be squared or none, got {tau_weight!r}")
    context = _context_ids(tokenizer, prompt)
    response_ids = _response_ids(tokenizer, response)
    scores, p_teacher, p_student = _token_scores(teacher, student, len(tokenizer), context, response_ids)

    n = len(response_ids)
    selection = select_tokens(scores, ratio, c=c, tau_base=tau_base)  # the loss's own rule
    order = torch.argsort(scores, descending=True, stable=True)  # the same order select_tokens keeps by
    rank = torch.empty(n, dtype=torch.long)
    rank[order] = torch.arange(1, n + 1)
    taus = torch.full((n,), math.nan)
    taus[selection.index] = selection.tau.float()
    kept = selection.kept.tolist()

    def weight(tau: float) -> float:
        return tau**2 if tau_weight == "squared" else 1.0

    pieces = token_pieces(tokenizer, response_ids)
    return [
        TokenInfo(
            position=i,
            token_id=response_ids[i],
            text=pieces[i],
            score=float(scores[i]),
            rank=int(rank[i]),
            kept=kept[i],
            tau=float(taus[i]) if kept[i] else None,
            p_teacher=float(p_teacher[i]),
            p_student=float(p_student[i]),
            special=i == n - 1,
            weight=weight(float(taus[i])) if kept[i] else None,
        )
        for i in range(n)
    ]


def summarize_tokens(infos: Sequence[TokenInfo]) -> dict[str, float | int]:
    """Totals over :func:`analyse` output: ``n``, ``k`` (kept), ``median`` m (the lower median of the kept scores,
    IDTS's), ``mean_score``, ``tau_min``, ``tau_max``, ``kept_min_score`` (the selection threshold); NaN where there
    is nothing to take it over."""
    kept = [t for t in infos if t.kept]
    scores = sorted(t.score for t in kept)
    taus = [t.tau for t in kept if t.tau is not None]
    return {
        "n": len(infos),
        "k": len(kept),
        "median": scores[(len(scores) - 1) // 2] if scores else math.nan,  # torch.median's lower median
        "mean_score": sum(t.score for t in infos) / len(infos) if infos else math.nan,
        "tau_min": min(taus) if taus else math.nan,
        "tau_max": max(taus) if taus else math.nan,
        "kept_min_score": scores[0] if scores else math.nan,
    }


def load_model(path: str, flag: str, *, base: str | None = None, device: str | torch.device = "cpu") -> Any:
    """A float32 causal LM in eval mode on ``device`` (:func:`adakd.models.load_causal_lm`): float32 so that the
    scores do not depend on the checkpoint's dtype.

    Args:
        path: a model directory or hub id, or a LoRA adapter (with ``base``).
        flag: the flag or key the path came from (``--teacher``), for the error message.

    Raises:
        InputError: the model cannot be loaded (the message names ``flag`` and the path).
    """
    from .models import load_causal_lm

    return load_causal_lm(path, base=base, dtype="float32", name=flag).to(device).eval()
