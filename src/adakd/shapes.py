"""Input checks shared by both loss paths: leading shapes, vocabularies (teacher padding rows) and dtypes.

Imports only torch.
"""

from __future__ import annotations

from torch import Tensor

from .labels import IGNORE_INDEX
from .sparse import SparseTeacher, check_sparse

__all__ = [
    "align_vocab",
    "check_hidden_inputs",
    "check_logits_inputs",
    "check_student_inputs",
    "check_vocab_sizes",
]


def check_vocab_sizes(v_student: int, v_teacher: int, vocab_size: int | None = None) -> None:
    """Raise unless the teacher's V_t ≥ V_s rows can be cropped to the student's without losing a real token."""
    if v_student > v_teacher:
        raise ValueError(
            f"the student's vocabulary ({v_student}) is larger than the teacher's ({v_teacher}); only the teacher "
            "may carry padding rows"
        )
    if vocab_size is not None and vocab_size > v_student:
        raise ValueError(
            f"the tokenizer has {vocab_size} tokens but the student logits only {v_student}: cropping the teacher "
            f"from {v_teacher} to {v_student} would drop real tokens"
        )


def align_vocab(student_logits: Tensor, teacher_logits: Tensor, vocab_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Crop the teacher's padding rows so both logits cover the student's vocabulary.

    Qwen2-7B pads its lm_head to 152,064 rows and Qwen2-1.5B to 151,936, with fewer real tokens than either:
    the extra teacher rows are padding and are dropped. A crop that would drop a real token is an error.

    Args:
        student_logits: ``[..., V_s]``.
        teacher_logits: ``[..., V_t]`` with V_t ≥ V_s and the same leading shape.
        vocab_size: the tokenizer's real vocabulary size, if known; must be ≤ V_s.

    Returns:
        ``(student_logits, teacher_logits[..., :V_s])`` (the student unchanged; the crop is a view).

    Raises:
        ValueError: the student's vocabulary is larger than the teacher's, ``vocab_size`` exceeds V_s (the crop
            would cut off real tokens), or the leading shapes differ.
    """
    v_s, v_t = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student logits {tuple(student_logits.shape)} and teacher logits {tuple(teacher_logits.shape)} "
            "must agree on every dimension but the vocabulary"
        )
    check_vocab_sizes(v_s, v_t, vocab_size)
    if v_t > v_s:
        teacher_logits = teacher_logits[..., :v_s]
    return student_logits, teacher_logits


def check_hidden_inputs(
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor | SparseTeacher, Tensor | None, Tensor | None],
    labels: Tensor,
    vocab_size: int | None,
    ignore_index: int = IGNORE_INDEX,
) -> None:
    """Raise ``ValueError`` unless :meth:`AdaKDLoss.forward_hidden`'s inputs agree in shape, vocabulary and dtype.

    Args:
        student: ``(hidden [..., H_s], weight [V_s, H_s], bias [V_s] | None)``.
        teacher: ``(hidden [..., H_t], weight [V_t, H_t], bias [V_t] | None)``, or a :class:`SparseTeacher` ``[...]``
            with weight and bias None.
        labels: ``[...]``.
    """
    student_hidden, student_weight, student_bias = student
    teacher_hidden, teacher_weight, teacher_bias = teacher
    check_student_inputs(student_hidden, student_weight, student_bias, labels)
    lead, v_s = student_hidden.shape[:-1], student_weight.shape[0]
    if isinstance(teacher_hidden, SparseTeacher):
        if teacher_weight is not None or teacher_bias is not None:
            raise ValueError("a sparse teacher takes no teacher_weight or teacher_bias (pass None)")
        check_vocab_sizes(v_s, v_s, vocab_size)
        check_sparse(teacher_hidden, lead, v_s, labels != ignore_index)
        return
    if teacher_hidden.shape[:-1] != lead:
        raise ValueError(
            f"student_hidden {tuple(student_hidden.shape)}, teacher_hidden {tuple(teacher_hidden.shape)} and "
            f"labels {tuple(labels.shape)} must share their leading shape"
        )
    if teacher_weight.dim() == 2:  # the vocabulary first: the likelier mistake than a wrong bias
        check_vocab_sizes(v_s, teacher_weight.shape[0], vocab_size)
    _check_head("teacher", teacher_hidden, teacher_weight, teacher_bias)


def check_logits_inputs(
    student_logits: Tensor,
    teacher: Tensor | SparseTeacher,
    labels: Tensor,
    vocab_size: int | None,
    ignore_index: int = IGNORE_INDEX,
) -> tuple[Tensor, Tensor | SparseTeacher]:
    """:meth:`AdaKDLoss.forward`'s inputs, checked: ``(student_logits [..., V_s], teacher)`` with dense teacher
    logits ``[..., V_t]`` cropped to V_s (:func:`align_vocab`), or a :class:`SparseTeacher` ``[...]`` checked against
    the student's vocabulary; ``labels`` must have the logits' leading shape."""
    if isinstance(teacher, SparseTeacher):
        lead, vocab = student_logits.shape[:-1], student_logits.shape[-1]
        check_sparse(teacher, lead, vocab, labels != ignore_index)
        check_vocab_sizes(vocab, vocab, vocab_size)
    else:
        student_logits, teacher = align_vocab(student_logits, teacher, vocab_size)
    if labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels {tuple(labels.shape)} must have the logits' leading shape {tuple(student_logits.shape[:-1])}"
        )
    return student_logits, teacher


def check_student_inputs(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor) -> None:
    """Raise ``ValueError`` unless the student's ``hidden [..., H]``, ``weight [V, H]``, ``bias [V] | None`` and
    ``labels [...]`` agree in shape and dtype (the inputs of a CE-only fused forward)."""
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(
            f"student_hidden {tuple(hidden.shape)} and labels {tuple(labels.shape)} must share their leading shape"
        )
    _check_head("student", hidden, weight, bias)


def _check_head(role: str, hidden: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """One model's output layer: ``weight [V, H]`` over its hidden size, ``bias [V]``, both in the hidden dtype."""
    h = hidden.shape[-1]
    letter = "s" if role == "student" else "t"
    if weight.dim() != 2 or weight.shape[1] != h:
        raise ValueError(f"{role}_weight {tuple(weight.shape)} must be [V_{letter}, {h}]")
    if bias is not None and (bias.dim() != 1 or bias.shape[0] != weight.shape[0]):
        raise ValueError(f"{role}_bias {tuple(bias.shape)} must be a vector over the vocabulary")
    for name, t in ((f"{role}_weight", weight), (f"{role}_bias", bias)):
        if t is not None and t.dtype != hidden.dtype:
            raise ValueError(f"{name} is {t.dtype} but its hidden states are {hidden.dtype}; cast one of them")
