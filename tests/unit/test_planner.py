"""The memory planner's arithmetic against numbers worked out by hand from the formulas (docs/planner.md), the
shipped configs, and ``megatron-dapo plan``'s report and refusals. Its agreement with the real megatron-core
model is tests/functional/test_planner_validation.py's job."""

from __future__ import annotations

import ast
import dataclasses
import re
import subprocess
import sys

import pytest
from transformers import AutoConfig, Qwen2Config

from megatron_dapo.cli import main
from megatron_dapo.config import load_config
from megatron_dapo.planner import (
    ActivationShape,
    BufferLayout,
    Cluster,
    ModelDims,
    Param,
    buffer_layout,
    in_flight_micro_batches,
    kv_bytes_per_token,
    layer_activation_bytes,
    loss_op_bytes,
    micro_batch_activation_bytes,
    PlanOptions,
    plan_memory,
    rank_state_bytes,
    sglang_weight_bytes,
)

from ..helpers import ROOT, test_config

CONFIGS, MODELS = ROOT / "examples" / "configs", ROOT / "examples" / "models"
# as the issue and the README write it: model.hf_path (/checkpoints/Qwen2.5-32B) is not on this machine, so the
# planner takes the shipped examples/models/qwen2.5-32b/config.json
PLAN_32B = ["plan", "--config", str(CONFIGS / "qwen2.5_32b_dapo.yaml"), "--nodes", "16", "--gpus-per-node", "8",
            "--gpu-memory-gib", "80"]
PLAN_7B = ["plan", "--config", str(CONFIGS / "qwen2.5_7b_dapo.yaml"), "--nodes", "4", "--gpus-per-node", "8",
           "--gpu-memory-gib", "80", "--model-config", str(MODELS / "qwen2.5-7b")]
LAST_LINE = re.compile(r"^plan: fits=(yes|no) params=(\d+) train_peak_gib=(\d+\.\d) rollout_peak_gib=(\d+\.\d)$")


def _dims(name: str) -> ModelDims:
    return ModelDims.from_hf_config(AutoConfig.from_pretrained(MODELS / name))


def _tiny() -> ModelDims:
    """tests/helpers.make_tiny_qwen2's sizes: 2 layers, hidden 32, FFN 64, 4 heads / 2 KV of 8, vocabulary 50."""
    return ModelDims.from_hf_config(Qwen2Config(
        vocab_size=50, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False,
    ))


# ---------------------------------------------------------------- the shipped model configs
def test_parameter_counts_of_the_shipped_model_configs():
    dims = _dims("qwen2.5-32b")
    assert (dims.layers, dims.hidden, dims.ffn, dims.heads, dims.kv_heads, dims.head_dim, dims.vocab) == (
        64, 5120, 27648, 40, 8, 128, 152064)
    assert dims.qkv_bias and not dims.tied and dims.max_positions == 131072
    assert dims.parameter_count() == 32_763_876_352  # Qwen2.5-32B
    # by hand: embeddings 2·152064·5120 + 64 layers · (q 5120·5120+5120, k and v 2·(1024·5120+1024),
    # o 5120·5120, MLP 3·5120·27648, norms 2·5120) + final norm 5120
    assert 2 * 152064 * 5120 + 64 * (26_219_520 + 10_487_808 + 26_214_400 + 424_673_280 + 10_240) + 5120 == 32_763_876_352
    assert _dims("qwen2.5-7b").parameter_count() == 7_615_616_512  # Qwen2.5-7B
    raw = AutoConfig.from_pretrained(MODELS / "qwen2.5-32b")
    assert (raw.model_type, raw.architectures, raw.rms_norm_eps) == ("qwen2", ["Qwen2ForCausalLM"], 1e-5)


def test_the_7b_config_keeps_the_32b_dapo_numbers():
    big, small = load_config(CONFIGS / "qwen2.5_32b_dapo.yaml"), load_config(CONFIGS / "qwen2.5_7b_dapo.yaml")
    assert small.algorithm == big.algorithm and small.optimizer == big.optimizer
    rollout = dataclasses.replace(small.rollout, ranks_per_engine=big.rollout.ranks_per_engine)
    assert rollout == big.rollout
    assert small.model.hf_path == "/checkpoints/Qwen2.5-7B"
    small.validate(world_size=32, ranks_per_node=8)


# ---------------------------------------------------------------- parameters, gradients, optimizer state
def test_buffer_layout_pads_like_megatron():
    # [a: 100, b: 10], DP 2: reversed, b at [0, 10), a starts at 64 → [64, 164), bucket padded to lcm(2, 128)
    layout = buffer_layout([Param("a", 100), Param("b", 10)], dp=2, distributed=True)
    assert layout.numel == 256 and layout.shard_numel == (10 + 64, 164 - 128)
    assert buffer_layout([Param("a", 100), Param("b", 10)], dp=2, distributed=False) == BufferLayout(110, (110, 110))
    # a shared embedding gets its own bucket: [0, 10) padded to 128, then the embedding at [128, 328) → 384
    layout = buffer_layout([Param("emb", 200, shared_embedding=True), Param("a", 10)], dp=4, distributed=True)
    assert layout.numel == 384 and layout.shard_numel == (10 + 64, 64, 64, 8)


def test_state_bytes_by_hand():
    dims = _tiny()
    # parameters: embedding and output layer 128·32 (vocabulary 50 padded to 128), per layer norms 2·32,
    # o 32·32, QKV (4 + 2·2)·8 = 64 rows · 32 + bias 64, fc1 128·32, fc2 32·64 = 9344; final norm 32
    elements = 2 * 4096 + 2 * 9344 + 32
    fp32 = rank_state_bytes(dims, test_config().model, test_config().parallel, dp=2, pp_rank=0, dp_rank=0)
    assert (fp32.params, fp32.grads, fp32.optimizer) == (4 * elements, 4 * elements, 8 * elements)
    config = test_config(**{"model.bf16": True, "parallel.use_distributed_optimizer": True})
    # megatron's buffer, reversed: output [0, 4096), final norm [4096, 4128), layer 1 from 4160 (64-aligned)
    # to 13536, layer 0 from 13568 to 22944, embedding [22976, 27072); padded to 27136 (a multiple of 128)
    shards = [rank_state_bytes(dims, config.model, config.parallel, 2, 0, rank) for rank in (0, 1)]
    assert [s.params for s in shards] == [2 * 27136] * 2 and [s.grads for s in shards] == [4 * 27136] * 2
    # shard 0 = [0, 13568): output, final norm and layer 1; shard 1: layer 0 and the embedding
    assert [s.optimizer for s in shards] == [12 * (4096 + 32 + 9344), 12 * (9344 + 4096)]
    assert shards[0].optimizer_replicated == 12 * elements


def test_pipeline_stages_hold_embedding_and_output_layer():
    dims = dataclasses.replace(_tiny(), layers=4, tied=True)
    config = test_config(**{"parallel.pipeline_model_parallel_size": 2})
    first, last = (rank_state_bytes(dims, config.model, config.parallel, 1, pp_rank, 0) for pp_rank in (0, 1))
    # both stages: 2 layers; first: the embedding; last: final norm and a copy of the tied embedding
    assert first.params == 4 * (4096 + 2 * 9344) and last.params == 4 * (2 * 9344 + 32 + 4096)


# ---------------------------------------------------------------- activations
def test_layer_activations_by_hand():
    dims, tokens = _tiny(), 24 * 2
    shape = ActivationShape(seq=24, micro_batch=2, tp=1, sequence_parallel=False, dtype_bytes=4, layer_spec="local")
    norms = 2 * tokens * (8 * 32 + 4 + 4 * 32)  # fp32 input copy, rstd, normalised input, output
    rope = 4 * 24 * 8 * 4  # cos, sin for q and k
    attention = tokens * 4 * 3 * 32 + 2 * 4 * 24 * 24 * 4 + 24 * 24 + tokens * 4 * 32  # q, k, v; probs; mask; context
    mlp = tokens * 4 * 5 * 64
    assert layer_activation_bytes(dims, shape) == norms + rope + attention + mlp == 145_344  # measured on CPU
    bf16 = dataclasses.replace(shape, dtype_bytes=2)
    assert layer_activation_bytes(dims, bf16) == 103_872  # measured: fp32 norm copies, probs fp32 + bf16
    assert layer_activation_bytes(dims, shape, "full") == tokens * 32 * 4
    # selective: q (32), k before the repeat (16), v's view keeps the QKV output (64), context (32)
    assert layer_activation_bytes(dims, shape, "selective") == norms + rope + tokens * 4 * (32 + 16 + 64 + 32) + mlp
    # one micro-batch: token ids, 2 layers, final norm and the output layer's input
    total = micro_batch_activation_bytes(dims, shape, 2, True, True, "fused")
    assert total == tokens * 8 + 2 * 145_344 + tokens * (8 * 32 + 4 + 4 * 32) == 309_696  # measured on CPU


def test_flash_attention_layer_of_qwen_32b():
    dims = _dims("qwen2.5-32b")
    shape = ActivationShape(22528, 1, 8, True, 2, "te")
    norms = 2 * (22528 // 8) * (2 * 2 * 5120 + 4)  # TE: input, rstd, normalised output; 1/8 under SP
    rope = 4 * 22528 * 128 * 2
    core = 22528 * (2 * (640 + 128 + 896) + 4 * 5)  # q, k after RoPE, the QKV output (v's view), log-sum-exp
    context, mlp = 22528 * 640 * 2, 22528 * 2 * 5 * 3456
    assert layer_activation_bytes(dims, shape) == norms + rope + core + context + mlp == 1_021_261_824
    assert layer_activation_bytes(dims, dataclasses.replace(shape, recompute="full")) == 22528 // 8 * 5120 * 2


def test_in_flight_micro_batches():
    assert [in_flight_micro_batches(4, None, rank, 8) for rank in range(4)] == [4, 3, 2, 1]
    assert in_flight_micro_batches(4, None, 0, 2) == 2
    assert in_flight_micro_batches(1, None, 0, 64) == 1
    # interleaved, 2 stages × 2 chunks: warm-up 2 (p − r − 1) + (v − 1) p, plus one
    assert [in_flight_micro_batches(2, 2, rank, 4) for rank in (0, 1)] == [5, 3]
    assert in_flight_micro_batches(2, 2, 0, 2) == 4  # all chunk micro-batches in warm-up


def test_loss_op_buffers_by_hand():
    dims, n = _dims("qwen2.5-32b"), 22528
    shape = ActivationShape(n, 1, 8, True, 2, "te")
    shard = 152576 // 8  # 152064 padded to a multiple of 128 · 8
    fused = loss_op_bytes(dims, shape, test_config(**{"model.loss_impl": "fused"}).model, 1.0)
    assert fused == n * shard * (2 + 4 + 4)  # bf16 shard, fp32 tempered copy, exponentials
    naive = loss_op_bytes(dims, shape, test_config(**{"model.loss_impl": "naive"}).model, 1.0)
    assert naive == n * shard * 2 + 5 * n * 152576 * 4
    linear = loss_op_bytes(dims, shape, test_config(**{"model.loss_impl": "fused_linear"}).model, 1.0)
    assert linear == (n * 5120 + shard * 5120) * (4 + 2) + 512 * shard * (4 + 4 + 2)


def test_sglang_weights_and_kv_cache_by_hand():
    dims = _dims("qwen2.5-32b")
    # per GPU at TP 8: embedding + LM head 2 · 19008 · 5120, per layer norms 10240, QKV (5 + 2) · 128 rows · 5120
    # + bias 896, o 5120 · 640, MLP 3 · 5120 · 3456; final norm
    layer = 10240 + 896 * 5120 + 896 + 5120 * 640 + 3 * 5120 * 3456
    assert sglang_weight_bytes(dims, 8) == 2 * (2 * 19008 * 5120 + 64 * layer + 5120)
    assert kv_bytes_per_token(dims, 8) == 2 * 64 * 1 * 128 * 2
    assert kv_bytes_per_token(dims, 16) == kv_bytes_per_token(dims, 8)  # KV heads replicated past 8


# ---------------------------------------------------------------- the command
def _plan(capsys, argv: list[str]) -> tuple[int, str, str]:
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_32b_plan_fits_with_its_exact_parameter_count(capsys):
    code, out, err = _plan(capsys, PLAN_32B)
    assert code == 0, err
    last = out.strip().splitlines()[-1]
    match = LAST_LINE.match(last)
    assert match, last
    assert match.group(1) == "yes" and int(match.group(2)) == 32_763_876_352
    assert float(match.group(3)) <= 80 and float(match.group(4)) <= 80
    for row in ("parameters (bf16)", "gradients", "optimizer states with the distributed optimizer (configured)",
                "optimizer states without it (alternative)", "activations", "micro-batches in flight", "logits buffers",
                "engine weights", "KV cache", "full-length sequences", "actor kept while generating", "training peak",
                "generation peak", "weight sync peak"):
        assert row in out, row


def test_7b_plan_fits(capsys):
    code, out, err = _plan(capsys, PLAN_7B)
    assert code == 0, err
    match = LAST_LINE.match(out.strip().splitlines()[-1])
    assert match and match.group(1) == "yes" and int(match.group(2)) == 7_615_616_512


@pytest.mark.parametrize(
    "extra, knob",
    [
        # too little memory: the biggest consumer's knob
        (["parallel.recompute_granularity=none", "parallel.max_tokens_per_micro_batch=0", "parallel.micro_batch_size=2"],
         "parallel.recompute_granularity=full"),
        (["model.loss_impl=naive"], "model.loss_impl=fused_linear"),
        (["--gpu-memory-gib", "30", "parallel.use_distributed_optimizer=false"], "parallel.use_distributed_optimizer=true"),
        (["model.offload_during_rollout=false", "rollout.sglang_mem_fraction=0.85"], "model.offload_during_rollout=true"),
        (["rollout.sglang_mem_fraction=0.1"], "rollout.sglang_mem_fraction"),
        (["--gpu-memory-gib", "8"], "parallel.tensor_model_parallel_size"),
    ],
)
def test_refusals_name_the_knob(capsys, extra, knob):
    argv = list(PLAN_32B)
    if "--gpu-memory-gib" in extra:
        argv[argv.index("--gpu-memory-gib") + 1] = extra[1]
        extra = extra[2:]
    code, out, err = _plan(capsys, argv + extra)
    assert code == 2 and knob in err, err
    assert err.count("\n") == 1 and err.startswith("error: ")
    assert LAST_LINE.match(out.strip().splitlines()[-1]).group(1) == "no"


@pytest.mark.parametrize(
    "argv, extra, knob",
    [
        (PLAN_32B, ["parallel.tensor_model_parallel_size=16"], "parallel.tensor_model_parallel_size"),  # 40 heads
        (PLAN_7B, ["parallel.pipeline_model_parallel_size=8"], "parallel.pipeline_model_parallel_size"),  # 28 layers
        (PLAN_7B, ["rollout.ranks_per_engine=8"], "rollout.ranks_per_engine"),  # 28 heads, 4 KV heads
        (PLAN_32B, ["parallel.micro_batch_size=3"], "parallel.micro_batch_size"),  # 512 samples vs 3 × DP 8
        (PLAN_32B, ["rollout.max_response_length=140000"], "rollout.max_response_length"),
        (PLAN_32B, ["model.hf_path=/nowhere/MyModel-3B"], "--model-config"),  # no config.json, none shipped
    ],
)
def test_layouts_that_do_not_divide_exit_2_naming_the_knob(capsys, argv, extra, knob):
    code, out, err = _plan(capsys, argv + extra)
    assert code == 2 and knob in err and err.count("\n") == 1, err
    assert out == ""


def test_plan_initialises_neither_torch_distributed_nor_megatron():
    script = (
        "import sys\nfrom megatron_dapo.cli import main\n"
        f"assert main({PLAN_32B!r}) == 0\n"
        "import torch.distributed as dist\n"
        "print(dist.is_initialized(), any(name.startswith('megatron.core') for name in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "False False"


def test_planner_imports_only_the_base_modules():
    tree = ast.parse((ROOT / "megatron_dapo" / "planner.py").read_text())
    imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    imported |= {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    ours = {name for name in imported if name.startswith("megatron_dapo")}
    assert ours <= {"megatron_dapo.config", "megatron_dapo.model_config", "megatron_dapo.errors"}, ours
    assert not {name for name in imported if name.startswith(("megatron.", "torch"))}



# ---------------------------------------------------------------- Qwen3 and Qwen3-MoE
def test_parameter_counts_of_the_qwen3_model_configs():
    """Equal to the models' own counts: transformers builds each on the meta device and counts its parameters."""
    import torch
    from transformers import AutoModelForCausalLM

    expected = {"qwen3-30b-a3b": 30_532_122_624, "qwen3-235b-a22b": 235_093_634_560, "qwen3-32b": 32_762_123_264}
    for name, count in expected.items():
        assert _dims(name).parameter_count() == count, name
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(MODELS / name))
        assert sum(p.numel() for p in model.parameters()) == count, name


@pytest.mark.parametrize("config, nodes, model, params", [
    ("qwen3_30b_a3b_dapo.yaml", "4", "qwen3-30b-a3b", 30_532_122_624),
    ("qwen3_235b_a22b_dapo.yaml", "32", "qwen3-235b-a22b", 235_093_634_560),
])
def test_qwen3_moe_plans_fit(capsys, config, nodes, model, params):
    code, out, err = _plan(capsys, ["plan", "--config", str(CONFIGS / config), "--nodes", nodes, "--gpus-per-node", "8",
                                    "--gpu-memory-gib", "80", "--model-config", str(MODELS / model)])
    assert code == 0, err
    match = LAST_LINE.match(out.strip().splitlines()[-1])
    assert match and match.group(1) == "yes" and int(match.group(2)) == params


def test_a_token_budget_sizes_the_micro_batch_by_its_tokens():
    """A budget of k full-length sequences plans like k samples per micro-batch; a budget below one sequence plans
    one full-length sample (it goes alone); a budget in between plans its tokens (attention at full length)."""
    hf_config = AutoConfig.from_pretrained(MODELS / "qwen2.5-7b")
    cluster = Cluster(nodes=4, gpus_per_node=8, gpu_memory_gib=80)

    def plan(*overrides):
        config = load_config(CONFIGS / "qwen2.5_7b_dapo.yaml", list(overrides))
        return plan_memory(config, hf_config, cluster, PlanOptions(max_prompt_length=2048))

    seq = 2048 + 20480
    budgeted, fixed = plan(f"parallel.max_tokens_per_micro_batch={2 * seq}"), plan("parallel.max_tokens_per_micro_batch=0",
                                                                                     "parallel.micro_batch_size=2")
    assert budgeted.shape.tokens == fixed.shape.tokens == 2 * seq
    assert [s.activations for s in budgeted.stages] == [s.activations for s in fixed.stages]
    alone = plan("parallel.max_tokens_per_micro_batch=4096")
    assert alone.shape.tokens == seq
    between = plan(f"parallel.max_tokens_per_micro_batch={seq + seq // 2}")
    assert between.shape.tokens == seq + seq // 2
    assert fixed.stages[0].activations > between.stages[0].activations > alone.stages[0].activations
