"""The memory planner against the real megatron-core model on CPU (docs/planner.md, "Validation").

- Parameters, ``main_grad`` buffers and optimizer state: every rank's bytes under TP2×DP2 (+SP), PP2×DP2 and
  TP2×PP2 (4 processes, gloo), bf16 on and off, with and without the distributed optimizer, untied and tied,
  equal the planner's prediction for that rank's pipeline stage and data-parallel shard exactly.
- The same for a Qwen3-MoE under TP2(SP)×EP2 with ETP1 (expert data-parallel size 2), TP2(SP) with ETP2 (EP1:
  experts in the dense buffer) and PP2×EP2 (expert data-parallel size 1): expert buffers (their own, sharded over
  the expert data-parallel group, when EP > 1) included; activations too (routing is
  not balanced on a random model: the estimate assumes it is).
- Activations: the bytes the forward saves for backward (``saved_tensors_hooks``, unique storages) against the
  planner's estimate for the local spec, at two sequence lengths, each recompute setting, fp32 and bf16, in one
  process; and per rank in the layouts above (sequence parallelism, first and last pipeline stage).
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoConfig

from megatron_dapo.planner import ActivationShape, ModelDims, micro_batch_activation_bytes, rank_state_bytes

from ..helpers import ROOT, build_actor, make_tiny_qwen2, make_tiny_qwen3, test_config
from .workers.planner_worker import saved_activation_bytes

pytestmark = pytest.mark.slow  # multi-process: minutes on 2 cores

LAYOUTS = {
    "tp2-dp2-sp": ["--tp", "2", "--sp"],
    "pp2-dp2": ["--pp", "2"],
    "tp2-pp2": ["--tp", "2", "--pp", "2"],
    "moe-tp2-sp-ep2-etp1": ["--models", "moe", "--tp", "2", "--sp", "--ep", "2", "--etp", "1"],
    "moe-tp2-sp-etp2": ["--models", "moe", "--tp", "2", "--sp"],
    "moe-pp2-ep2": ["--models", "moe", "--pp", "2", "--ep", "2"],
}
NUM_LAYERS = 4
SEQ = 32


def _batch() -> dict:
    generator = torch.Generator().manual_seed(7)
    num, width = 8, 24
    input_ids = torch.randint(2, 50, (num, width), generator=generator)
    loss_mask = torch.zeros(num, width)
    for row in range(num):
        loss_mask[row, 3 : 3 + 4 + 2 * row] = 1
    labels = torch.cat([input_ids[:, 1:], torch.zeros(num, 1, dtype=torch.long)], dim=1)
    return {
        "input_ids": input_ids, "labels": labels, "loss_mask": loss_mask,
        "advantages": torch.randn(num, 1, generator=generator).expand(num, width).contiguous(),
        "old_logprobs": -3.0 + 0.1 * torch.randn(num, width, generator=generator),
    }


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("planner")
    for name in ("untied", "tied"):
        make_tiny_qwen2(work / name, tied=name == "tied", num_layers=NUM_LAYERS)
    make_tiny_qwen3(work / "moe", moe=True, num_layers=NUM_LAYERS)
    torch.save(_batch(), work / "batch.pt")
    return work


def _launch(work, name, args) -> list[dict]:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
               "-m", "tests.functional.workers.planner_worker", "--work", str(work), "--name", name,
               "--seq", str(SEQ), *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads((work / name / f"rank{rank}.json").read_text()) for rank in range(4)]


def _option(args: list[str], flag: str) -> int:
    return int(args[args.index(flag) + 1]) if flag in args else 1


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_state_and_activation_bytes_per_rank(work, layout):
    args = LAYOUTS[layout]
    tp, pp, sp = _option(args, "--tp"), _option(args, "--pp"), "--sp" in args
    ep, etp = _option(args, "--ep"), (_option(args, "--etp") if "--etp" in args else "null")
    models = args[args.index("--models") + 1].split(",") if "--models" in args else ["untied", "tied"]
    ranks = _launch(work, layout, args)
    for model_name in models:
        dims = ModelDims.from_hf_config(AutoConfig.from_pretrained(work / model_name))
        for bf16 in (False, True):
            for distopt in (False, True):
                config = test_config(**{
                    "parallel.tensor_model_parallel_size": tp, "parallel.pipeline_model_parallel_size": pp,
                    "parallel.sequence_parallel": sp, "parallel.use_distributed_optimizer": distopt,
                    "parallel.expert_model_parallel_size": ep, "parallel.expert_tensor_parallel_size": etp,
                    "model.bf16": bf16,
                })
                key = f"{model_name}/bf16={bf16}/distopt={distopt}"
                for rank, measured in enumerate(ranks):
                    predicted = rank_state_bytes(
                        dims, config.model, config.parallel, measured["dp"], measured["pp_rank"], measured["dp_rank"],
                        expert_dp_rank=measured["expert_dp_rank"],
                    )
                    got = measured[key]
                    assert (got["params"], got["grads"], got["optimizer"]) == (
                        predicted.params, predicted.grads, predicted.optimizer
                    ), f"{layout} rank {rank} {key}"
                    if distopt:
                        continue
                    shape = ActivationShape(SEQ, 2, tp, sp, 2 if bf16 else 4, "local",
                                            expert_tp=etp if etp != "null" else None)
                    first, last = measured["pp_rank"] == 0, measured["pp_rank"] == pp - 1
                    estimate = micro_batch_activation_bytes(dims, shape, NUM_LAYERS // pp, first, last, "fused")
                    saved = measured[f"{key}/activations"]
                    assert abs(estimate - saved) <= 0.2 * saved, f"{layout} rank {rank} {key}: {estimate} vs {saved}"
                    print(f"{layout} rank {rank} {key}: saved {saved} B, estimate {estimate} B, "
                          f"relative error {(estimate - saved) / saved:+.4f}")


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("recompute", ["none", "selective", "full"])
def test_activation_estimate_at_two_sequence_lengths(megatron_world, tmp_path, recompute, bf16):
    """One process, local spec: what the actor's forward saves for backward vs the planner, 32 and 256 tokens."""
    make_tiny_qwen2(tmp_path, tied=False)
    dims = ModelDims.from_hf_config(AutoConfig.from_pretrained(tmp_path))
    config = test_config(**{"model.bf16": bf16, "parallel.recompute_granularity": recompute})
    actor = build_actor(config, tmp_path)
    for seq in (32, 256):
        saved = saved_activation_bytes(actor, seq, micro_batch=2)
        shape = ActivationShape(seq, 2, 1, False, 2 if bf16 else 4, "local", recompute)
        estimate = micro_batch_activation_bytes(dims, shape, dims.layers, True, True, "fused")
        print(f"recompute={recompute} bf16={bf16} seq={seq}: saved {saved} B, estimate {estimate} B, "
              f"relative error {(estimate - saved) / saved:+.4f}")
        assert abs(estimate - saved) <= 0.2 * saved
