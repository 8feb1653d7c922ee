"""torchrun (or plain python) worker: build the actor under a TP/PP/EP layout, optionally from a Megatron
checkpoint; report log-probs; optionally save a Megatron checkpoint and export HF through the in-job resharder;
optionally train one step, save the trainer checkpoint, train a second (``--save-between-steps``) or resume one
and train the second (``--resume``), reporting the log-probs after it.

Run by tests/functional/test_checkpoint_convert.py.
"""

import argparse
from pathlib import Path

import torch
import torch.distributed as dist

from megatron_dapo.distributed import destroy_distributed, initialize_distributed
from megatron_dapo.weights.sync import export_hf
from tests.helpers import build_actor, test_config


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hf-dir", required=True)
    parser.add_argument("--batch", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--pp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--etp", type=int, default=None)
    parser.add_argument("--sp", action="store_true")
    parser.add_argument("--megatron-checkpoint")
    parser.add_argument("--save-between-steps", help="train, save the trainer checkpoint here, train again")
    parser.add_argument("--resume", help="load this trainer checkpoint, then train once")
    parser.add_argument("--save")
    parser.add_argument("--export", help="HF folder written through the default (shared-memory) transport")
    parser.add_argument("--export-collectives", help="HF folder written through the collectives transport")
    args = parser.parse_args()
    initialize_distributed(args.tp, args.pp, seed=1, expert_model_parallel_size=args.ep,
                           expert_tensor_parallel_size=args.etp)
    overrides = [f"parallel.tensor_model_parallel_size={args.tp}", f"parallel.pipeline_model_parallel_size={args.pp}",
                 f"parallel.expert_model_parallel_size={args.ep}", f"parallel.expert_tensor_parallel_size={args.etp or 'null'}",
                 f"parallel.sequence_parallel={args.sp}", "parallel.micro_batch_size=2", "optimizer.lr=1e-3",
                 "optimizer.lr_warmup_steps=0"]
    if args.megatron_checkpoint:
        overrides.append(f"model.megatron_checkpoint={args.megatron_checkpoint}")
    actor = build_actor(test_config(*overrides), args.hf_dir, total_steps=4)
    batch = torch.load(args.batch)
    if args.resume:
        actor.load_checkpoint(args.resume)
    logprobs, _ = actor.compute_logprobs(batch, 1.0)
    if args.save_between_steps:
        actor.train_step(batch)
        actor.save_checkpoint(args.save_between_steps, 1, {"step": 1}, tokenizer=None)
    if args.save_between_steps or args.resume:
        actor.train_step(batch)
        logprobs, _ = actor.compute_logprobs(batch, 1.0)
    if args.save:
        actor.save_checkpoint(args.save, 1, {"step": 1}, tokenizer=None)
    for out_dir, transport in ((args.export, "auto"), (args.export_collectives, "collectives")):
        if out_dir:  # 0 bytes: a bucket per parameter
            export_hf(actor.model_chunks, actor.layout, actor.hf_config, Path(out_dir), None, 0, transport=transport)
    if dist.get_rank() == 0:
        torch.save(logprobs, args.out)
    destroy_distributed()


if __name__ == "__main__":  # the guard matters: dist-checkpoint saving re-imports __main__
    main()
