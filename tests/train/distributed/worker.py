"""One distributed training run for the multi-process tests, launched by ``torchrun`` (or plain ``python`` for the
single-process reference): the tiny config under DDP, FSDP2 or DeepSpeed ZeRO-3, on the CPU with gloo.

Each rank writes ``OUT/rank<R>.pt``: the student's full parameters after training (gathered with the engine's own
API), the LATF ratio, and evidence that the engine really sharded the student and the teacher.

    torchrun --nproc_per_node=2 tests/train/distributed/worker.py --engine fsdp2 --out DIR [--fused] [overrides...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[3]
TINY = ROOT / "configs" / "tiny-cpu.yaml"

ZERO3 = {
    "zero_optimization": {
        "stage": 3,
        "stage3_param_persistence_threshold": 0,  # else the tiny parameters are not partitioned at all
        "stage3_gather_16bit_weights_on_model_save": True,
    },
    "train_micro_batch_size_per_gpu": "auto",
    "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto",
    "train_batch_size": "auto",
}
FSDP2 = {"version": 2, "reshard_after_forward": True, "state_dict_type": "SHARDED_STATE_DICT"}


def force_fsdp_on_cpu() -> None:
    """accelerate turns every CPU run into MULTI_CPU (plain DDP) and drops the FSDP plugin (``AcceleratorState``
    switches to FSDP only for accelerator devices); this test-only shim keeps FSDP, so that ``fully_shard`` runs over
    gloo. The test then checks that the parameters really are DTensor shards, so a silent fall-back fails."""
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = fsdp_plugin
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = init


def full_state(trainer) -> dict[str, torch.Tensor]:
    """Every student parameter in full on every rank, gathered through the engine."""
    from torch.distributed.tensor import DTensor

    from adakd.train.engines import unwrap

    model = unwrap(trainer.model_wrapped)
    params = dict(model.named_parameters())
    zero3 = [p for p in params.values() if hasattr(p, "ds_id")]
    out = {}
    if zero3:
        import deepspeed

        with deepspeed.zero.GatheredParameters(zero3, modifier_rank=None):
            return {k: p.detach().clone().float() for k, p in params.items()}
    for name, p in params.items():
        out[name] = (p.full_tensor() if isinstance(p, DTensor) else p).detach().clone().float()
    return out


def shard_evidence(module) -> dict[str, float]:
    """How much of each engine-managed model this rank holds: local elements / full elements (1.0 = a replica)."""
    from torch.distributed.tensor import DTensor

    local = full = 0
    for p in module.parameters():
        if isinstance(p, DTensor):
            local, full = local + p.to_local().numel(), full + p.numel()
        elif hasattr(p, "ds_id"):
            local, full = local + p.ds_tensor.numel(), full + p.ds_numel
        else:
            local, full = local + p.numel(), full + p.numel()
    return {"local": local, "full": full, "fraction": local / max(full, 1)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", choices=["single", "ddp", "fsdp2", "deepspeed"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--poison-rank", type=int, default=None, help="this rank's teacher gives NaN logits")
    parser.add_argument("overrides", nargs="*")
    a = parser.parse_args()

    if a.engine == "fsdp2":
        force_fsdp_on_cpu()
    from adakd.train import build_trainer, load_config
    from adakd.train.engines import save_final, unwrap

    config = load_config(TINY, a.overrides)
    training = config.training
    training.setdefault("ddp_backend", "gloo" if a.engine != "single" else None)
    if a.engine == "deepspeed":
        training["deepspeed"] = ZERO3
    if a.engine == "fsdp2":
        training["fsdp"] = True
        training["fsdp_config"] = FSDP2
    trainer = build_trainer(config)
    rank = trainer.args.process_index
    if a.poison_rank is not None and a.poison_rank == rank:
        # NaN in this rank's own teacher activations (a poisoned weight would be a shard that every rank gathers)
        unwrap(trainer.teacher).get_decoder().norm.register_forward_hook(lambda module, args, out: out + math.nan)
    initial = {k: p.detach().clone().float() for k, p in unwrap(trainer.model).named_parameters()}
    trainer.train(resume_from_checkpoint=a.resume)
    save_final(trainer, Path(training["output_dir"]) / "final")
    result = {
        "params": full_state(trainer),
        "initial": initial,
        "ratio": trainer.loss_fn.ratio,
        "engine": trainer.engine,
        "global_step": trainer.state.global_step,
        "skipped": trainer.skipped_nonfinite,
        "student": shard_evidence(trainer.model_wrapped),
        "teacher": shard_evidence(trainer.teacher) if trainer.teacher is not None else None,
        "world": trainer.accelerator.num_processes,
    }
    Path(a.out).mkdir(parents=True, exist_ok=True)
    torch.save(result, Path(a.out) / f"rank{rank}.pt")
    print(json.dumps({k: v for k, v in result.items() if k not in ("params", "initial")}), flush=True)
    trainer.accelerator.wait_for_everyone()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    sys.stdout.flush()
    # DeepSpeed was seen to abort at interpreter exit after a finished run: the results are written, leave now.
    os._exit(0)


if __name__ == "__main__":
    main()
