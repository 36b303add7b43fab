"""Non-finite logits and losses, empty batches and extreme IDTS temperatures."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from adakd import AdaKDLoss
from adakd.adaptive import idts_temperatures
from adakd.loss import C_MAX, NonFiniteLossError
from adakd.train import build_trainer

from .common import metrics, tiny


def _batch(trainer, n: int = 4):
    return trainer.data_collator([trainer.train_dataset[i] for i in range(n)])


def _grads(model) -> list[torch.Tensor]:
    return [p.grad for p in model.parameters() if p.requires_grad]


def test_empty_batch_warns_once_and_counts(tmp_path):
    trainer = build_trainer(tiny(tmp_path))
    trainer.model.train()
    batch = _batch(trainer)
    batch["labels"][:] = -100
    with pytest.warns(RuntimeWarning, match="no supervised token"):
        loss = trainer.compute_loss(trainer.model, batch, num_items_in_batch=0)
    assert loss.item() == 0.0
    loss.backward()
    assert all(g is None or not g.any() for g in _grads(trainer.model))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second one is counted, not warned
        trainer.compute_loss(trainer.model, batch, num_items_in_batch=0)
    assert trainer.empty_batches == 2
    logs = {"loss": 0.0}
    trainer.log(logs)
    assert logs["adakd/empty_batches"] == 2 and logs["adakd/skipped_nonfinite"] == 0


def _poison_teacher(trainer) -> None:
    with torch.no_grad():
        trainer.teacher.get_output_embeddings().weight.fill_(math.nan)


def test_nonfinite_teacher_logits_error(tmp_path):
    trainer = build_trainer(tiny(tmp_path))
    trainer.model.train()
    _poison_teacher(trainer)
    with pytest.raises(
        NonFiniteLossError, match=r"^step 1: non-finite teacher logits \(NaN or inf\).*loss.nonfinite: skip"
    ):
        trainer.compute_loss(trainer.model, _batch(trainer), num_items_in_batch=10)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("which", ["teacher", "student"])
def test_nonfinite_skip_gives_zero_gradient(tmp_path, which, fused):
    trainer = build_trainer(tiny(tmp_path, "loss.nonfinite=skip", f"loss.fused={str(fused).lower()}"))
    trainer.model.train()
    if which == "teacher":
        _poison_teacher(trainer)
    else:  # the student's final hidden states become inf, its weights stay finite
        trainer.model.model.norm.register_forward_hook(lambda module, args, out: out + math.inf)
    what = f"{which} {'hidden states' if fused and which == 'student' else 'logits'}"
    if fused and which == "teacher":
        what = "teacher hidden states"  # a NaN teacher lm_head is seen in the teacher's logits on the logits path
        with torch.no_grad():
            trainer.teacher.model.norm.weight.fill_(math.nan)
    with pytest.warns(RuntimeWarning, match=f"non-finite {what}; micro-batch skipped"):
        loss = trainer.compute_loss(trainer.model, _batch(trainer), num_items_in_batch=10)
    assert loss.item() == 0.0
    loss.backward()
    grads = _grads(trainer.model)
    assert grads and all(g is not None and not g.any() for g in grads)
    assert trainer.skipped_nonfinite == 1 and trainer.loss_fn.pending() == (0.0, 0)  # LATF never saw it


def test_nonfinite_loss_from_finite_logits(tmp_path):
    trainer = build_trainer(tiny(tmp_path, "loss.nonfinite=skip"))
    trainer.model.train()

    def boom(*args, **kwargs):
        raise NonFiniteLossError("non-finite AdaKD loss")

    trainer.loss_fn.forward = boom
    with pytest.warns(RuntimeWarning, match="non-finite loss"):
        loss = trainer.compute_loss(trainer.model, _batch(trainer), num_items_in_batch=10)
    assert loss.item() == 0.0 and trainer.skipped_nonfinite == 1


def test_skip_policy_trains_through_and_logs_the_count(tmp_path):
    trainer = build_trainer(tiny(tmp_path, "loss.nonfinite=skip", "training.max_steps=3", "training.save_strategy=no"))
    _poison_teacher(trainer)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        trainer.train()
    logged = [r for r in metrics(tmp_path / "run") if "loss" in r]
    assert [r["adakd/skipped_nonfinite"] for r in logged] == [1, 2, 3]
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert trainer.loss_fn.controller.state_dict()["ema"] is None or math.isfinite(
        trainer.loss_fn.controller.state_dict()["ema"]
    )


def test_idts_temperatures_stay_in_the_documented_bounds():
    scores = torch.tensor([0.0, 1e-30, 1e-6, 0.5, 1.0, 1e6, 1e30], dtype=torch.float32)
    for c in (0.0, 0.5, 3.0, C_MAX):
        tau = idts_temperatures(scores, c=c, tau_base=2.0)
        assert torch.isfinite(tau).all()
        assert (tau >= 2.0 * math.exp(-c) * (1 - 1e-6)).all() and (tau <= 2.0 * math.exp(c) * (1 + 1e-6)).all()


def test_extreme_c_is_refused_and_the_bound_is_finite():
    with pytest.raises(ValueError, match=r"c must be a number in \[0, 10\]"):
        AdaKDLoss("rkl", c=C_MAX + 1)
    torch.manual_seed(0)
    student, teacher = torch.randn(3, 7, 50) * 30, torch.randn(3, 7, 50) * 30
    labels = torch.randint(0, 50, (3, 7))
    loss = AdaKDLoss("rkl", selection="fixed", ratio=0.5, c=C_MAX)(student, teacher, labels)
    assert torch.isfinite(loss)


def test_loss_refuses_nonfinite_before_touching_state():
    fn = AdaKDLoss("rkl")
    student, teacher = torch.randn(2, 4, 9), torch.randn(2, 4, 9)
    student[0, 1] = -math.inf  # a whole row of -inf: no distribution
    with pytest.raises(NonFiniteLossError, match="non-finite AdaKD loss"):
        fn(student, teacher, torch.zeros(2, 4, dtype=torch.long))
    assert fn.pending() == (0.0, 0) and fn.last_report is None and fn.stats == {}


@pytest.mark.parametrize("one_pass", [False, True])
def test_forward_hidden_refuses_nonfinite_before_touching_state(one_pass):
    """A teacher bias of -inf on a token the student gives mass: RKL is +inf there. The fused path raises the same
    error as the logits path, before its statistics, its pending L_t or its one-pass state change."""
    gen = torch.Generator().manual_seed(0)
    hs, ws = torch.randn(12, 8, generator=gen), torch.randn(16, 8, generator=gen)
    ht, wt = torch.randn(12, 8, generator=gen), torch.randn(16, 8, generator=gen)
    labels = torch.randint(0, 16, (12,), generator=gen)
    fn = AdaKDLoss("rkl", selection="fixed", ratio=0.5, one_pass=one_pass)
    fn.forward_hidden(hs, ws, ht, wt, labels)  # a finite batch first (the one-pass mode needs a previous one)
    before = (fn.pending(), fn.stats, fn._prev_scores)
    bias = torch.zeros(16)
    bias[labels[0]] = -math.inf
    with pytest.raises(NonFiniteLossError, match="non-finite AdaKD loss"):
        fn.forward_hidden(hs, ws, ht, wt, labels, teacher_bias=bias)
    assert fn.pending() == before[0] and fn.stats == before[1]
    assert fn._prev_scores is before[2]  # the one-pass state is the last finite batch's


def test_fused_trainer_skips_a_nonfinite_loss_from_finite_hidden_states(tmp_path):
    """Through the trainer's fused path: finite hidden states, an infinite loss (a teacher lm_head bias of -inf),
    the same skip policy as on logits: a zero loss, a zero gradient, LATF untouched."""
    trainer = build_trainer(tiny(tmp_path, "loss.nonfinite=skip", "loss.fused=true"))
    trainer.model.train()
    head = trainer.teacher.get_output_embeddings()
    head.bias = torch.nn.Parameter(torch.zeros(head.weight.shape[0]), requires_grad=False)
    with torch.no_grad():
        head.bias[: head.weight.shape[0] // 2] = -math.inf  # half the vocabulary impossible for the teacher
    with pytest.warns(RuntimeWarning, match="non-finite loss; micro-batch skipped"):
        loss = trainer.compute_loss(trainer.model, _batch(trainer), num_items_in_batch=10)
    assert loss.item() == 0.0
    loss.backward()
    grads = _grads(trainer.model)
    assert grads and all(g is not None and not g.any() for g in grads)
    assert trainer.skipped_nonfinite == 1 and trainer.loss_fn.pending() == (0.0, 0)
