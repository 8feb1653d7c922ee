"""Typed job configuration: dataclasses loaded from YAML, with ``key.sub=value`` command-line overrides.

Every option carries one line of documentation (``megatron-dapo config`` lists them with their values);
every cross-field rule lives in ``DapoConfig.validate``, which runs before any work starts.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.util
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import yaml

from megatron_dapo.algorithm.policy_loss import LOSS_AGG_MODES, PolicyLossConfig
from megatron_dapo.errors import ConfigError

__all__ = ["ConfigError", "DapoConfig", "describe_options", "load_config"]

LossAggMode = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"]
assert typing.get_args(LossAggMode) == LOSS_AGG_MODES


def option(default: object, doc: str) -> typing.Any:
    """A dataclass field with its one-line documentation (``megatron-dapo config`` prints it)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: copy.deepcopy(default), metadata={"doc": doc})
    return field(default=default, metadata={"doc": doc})


@dataclass
class ModelConfig:
    hf_path: str | None = option(None, "HF folder (config.json, safetensors, tokenizer); null builds the toy model")
    megatron_checkpoint: str | None = option(None, "start from these torch_dist weights (any TP/PP) instead of hf_path's")
    make_vocab_size_divisible_by: int = option(128, "Megatron pads the vocabulary to a multiple of this × TP")
    loss_impl: Literal["naive", "fused", "fused_linear"] = option(
        "fused", "log-prob op: naive (gathers full-vocab logits) | fused (vocab-parallel) | fused_linear (chunked)"
    )
    loss_chunk_size: int = option(512, "tokens per chunk of the fused_linear loss")
    bf16: bool = option(False, "bf16 weights and activations, fp32 main params, gradients and loss math (GPU configs)")
    offload_during_rollout: bool = option(
        False, "release the actor's memory (weights, grads, optimizer state) while engines generate (CPU: emulated)"
    )


@dataclass
class ToyModelConfig:
    """The offline toy model and its supervised warm start (used when ``model.hf_path`` is null)."""

    hidden_size: int = option(128, "toy model hidden size")
    intermediate_size: int = option(384, "toy model FFN size")
    num_hidden_layers: int = option(2, "toy model layers")
    num_attention_heads: int = option(4, "toy model attention heads")
    num_key_value_heads: int = option(2, "toy model KV heads (GQA)")
    tie_word_embeddings: bool = option(False, "tie input and output embeddings")
    model_type: Literal["qwen2", "qwen3", "qwen3_moe"] = option(
        "qwen2", "toy architecture: qwen2 | qwen3 (q/k RMSNorm) | qwen3_moe (q/k RMSNorm, MoE MLPs)"
    )
    num_experts: int = option(8, "qwen3_moe: routed experts per layer")
    num_experts_per_tok: int = option(2, "qwen3_moe: experts per token (top-k)")
    moe_intermediate_size: int = option(96, "qwen3_moe: each expert's FFN size")
    sft_steps: int = option(2000, "supervised warm-start steps")
    sft_batch_size: int = option(64, "warm-start batch size")
    sft_lr: float = option(1e-3, "warm-start AdamW learning rate")
    sft_answer_noise: float = option(0.4, "arithmetic: share of warm-start demonstrations whose answer is off by 1–9")
    sft_step_error: float = option(0.03, "countdown: chance that a demonstrated number is off by 1–2 (carried on)")
    sft_ramble: float = option(
        0.2, "countdown: share of demonstrations that repeat one number 2 to sft_ramble_repeats times, then go on"
    )
    sft_ramble_repeats: int = option(6, "countdown: most repeats of a rambling demonstration's number (>= 2)")
    sft_ramble_error: float = option(
        0.0, "countdown: chance that a rambling demonstration loses count after its repeats (later numbers off by 1–2)"
    )
    sft_loop: float = option(0.05, "countdown: share of demonstrations that repeat one number without end (no EOS)")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = option(1, "TP: ranks sharing each layer")
    pipeline_model_parallel_size: int = option(1, "PP: pipeline stages (data parallelism is the rest of the world size)")
    virtual_pipeline_model_parallel_size: int | None = option(None, "model chunks per pipeline rank (interleaved 1F1B)")
    sequence_parallel: bool = option(False, "with TP > 1: norms on sequence shards, activations 1/TP")
    expert_model_parallel_size: int = option(1, "EP (MoE): ranks sharing each layer's experts, from TP × DP")
    expert_tensor_parallel_size: int | None = option(None, "ETP (MoE): ranks sharing each expert's matrices; null: = TP")
    use_distributed_optimizer: bool = option(False, "optimizer state and fp32 master weights sharded over DP")
    micro_batch_size: int = option(8, "samples per micro-batch (sorted by length, cut to the longest)")
    max_tokens_per_micro_batch: int = option(
        0, "token budget: length-sorted samples packed into micro-batches of at most this many padded tokens (a "
        "longer sample alone); 0: micro_batch_size samples each"
    )
    balance_data: bool = option(
        True, "assign each mini-batch's samples to data-parallel ranks evening out the estimated training cost "
        "(tokens + attention); false: consecutive slices"
    )
    recompute_granularity: Literal["none", "full", "selective"] = option(
        "none", "activation recompute: none | full (each layer keeps only its input) | selective (core attention)"
    )


@dataclass
class DataConfig:
    train_files: list[str] = option([], "parquet/jsonl in DAPO-Math-17K format; empty: the toy task")
    val_files: list[str] = option([], "held-out problems for avg@k; empty with the toy task: toy problems")
    toy_num_train: int = option(2000, "toy training problems")
    toy_num_val: int = option(64, "toy held-out problems")
    toy_seed: int = option(1234, "seed of the toy problems")
    toy_task: Literal["arithmetic", "countdown"] = option(
        "arithmetic", "the built-in task: arithmetic (one-line answers) | countdown (worked solutions, 14–110 tokens)"
    )
    deduplicate: bool = option(
        True, "drop repeated rows (same prompt messages and ground truth; the first is kept) of train and val files"
    )
    max_prompt_length: int | None = option(
        None, "longest prompt in tokens (chat template applied); + rollout.max_response_length must fit the model's "
        "max_position_embeddings; null: the data's longest prompt must fit"
    )
    overlong_prompt: Literal["refuse", "drop"] = option(
        "refuse", "prompts longer than max_prompt_length: refuse (stop, naming the row) | drop (counted in the "
        "metric data/dropped_long_prompts)"
    )


@dataclass
class RolloutConfig:
    engine: Literal["hf", "sglang"] = option("hf", "hf (in-process transformers, CPU) | sglang (GPU)")
    n: int = option(16, "G: samples per prompt")
    temperature: float = option(1.0, "sampling temperature (applied identically to the actor's log-probs)")
    top_p: float = option(1.0, "nucleus sampling")
    max_response_length: int = option(20480, "L_max: response tokens per sample")
    val_n: int = option(32, "samples per evaluation problem: avg@k and pass@k for k = 1, 2, 4, … and val_n")
    val_temperature: float = option(1.0, "evaluation temperature")
    val_top_p: float = option(0.7, "evaluation nucleus")
    weight_sync_bucket_mb: int = option(512, "size of the flattened buckets the resharder sends to the engine")
    weight_sync_transport: Literal["auto", "shared_memory", "collectives"] = option(
        "auto", "resharder transport: shared_memory (CPU processes of one host), collectives (GPU), auto"
    )
    ranks_per_engine: int = option(1, "ranks (GPUs) one engine spans (SGLang TP); world_size / this engines in all")
    sampling_mode: Literal["streaming", "rounds"] = option(
        "streaming", "dynamic sampling as a stream of groups, or in rounds of algorithm.gen_batch_size prompts"
    )
    groups_in_flight: int = option(0, "streaming: groups submitted across all engines at a time; 0: train_batch_size")
    continuous_feeding: bool = option(
        True, "streaming: each engine host refills its share of groups_in_flight as each group completes, without "
        "waiting for the other engines; false: lock-step ticks across the job"
    )
    sglang_mem_fraction: float = option(0.6, "SGLang's mem_fraction_static (weights + KV cache share of the GPU)")
    sglang_deterministic: bool = option(
        False, "SGLang deterministic inference: per-request sampling seeds, samples independent of the engine count; "
        "slower (batch-invariant kernels, PyTorch sampling, Tree-only NCCL all-reduce)"
    )
    engine_start_timeout_s: float = option(
        900.0, "seconds an engine may take to start before every rank stops with an error"
    )
    engine_idle_timeout_s: float = option(
        600.0, "seconds an engine may take to finish its running requests before releasing its memory"
    )


@dataclass
class RewardConfig:
    function: str = option(
        "megatron_dapo.reward.math_reward:compute_score",
        "module:function with compute_score(response, ground_truth, **row_fields) -> float | {score, acc, ...}",
    )
    num_workers: int = option(0, "reward worker processes on each engine's rank (0: score inline)")


@dataclass
class AlgorithmConfig:
    clip_ratio_low: float = option(0.2, "ε_low")
    clip_ratio_high: float = option(0.28, "ε_high (Clip-Higher)")
    clip_ratio_c: float | None = option(10.0, "dual clip for negative advantages (> 1); null disables")
    loss_agg_mode: LossAggMode = option("token-mean", "token-mean (DAPO) | seq-mean-token-mean (GRPO) | ...")
    dynamic_sampling: bool = option(True, "drop groups whose raw accuracy is 0 or 1, generate more")
    gen_batch_size: int = option(1536, "prompts per generation round")
    train_batch_size: int = option(512, "prompts (groups) per training step")
    max_num_gen_batches: int = option(10, "generation rounds per step before giving up (<= 0: unbounded)")
    mini_batch_size: int = option(512, "samples per optimiser step")
    ppo_epochs: int = option(1, "passes over each step's samples")
    overlong_filtering: bool = option(False, "truncated samples get loss mask 0")
    overlong_buffer_enable: bool = option(True, "soft overlong punishment")
    overlong_buffer_len: int = option(4096, "L_cache: the punishment ramp's length in tokens")
    overlong_penalty_factor: float = option(1.0, "punishment at L_max")
    kl_coef: float = option(0.0, "> 0 adds a k3 KL-to-reference term (naive GRPO baseline)")
    tis_cap: float | None = option(2.0, "truncated importance-sampling cap C; null disables")
    moe_aux_loss_coef: float = option(0.0, "MoE: the router's load-balancing loss coefficient (logged even at 0)")
    routing_replay: Literal["off", "rollout"] = option(
        "off", "MoE: rollout makes the actor's forwards use the experts the engine chose for each token"
    )


@dataclass
class OptimizerConfig:
    lr: float = option(1e-6, "AdamW learning rate (constant after warm-up)")
    min_lr: float = option(0.0, "learning-rate floor")
    lr_warmup_steps: int = option(20, "linear warm-up, in optimiser steps")
    weight_decay: float = option(0.1, "AdamW weight decay")
    adam_beta1: float = option(0.9, "AdamW β1")
    adam_beta2: float = option(0.999, "AdamW β2")
    adam_eps: float = option(1e-8, "AdamW ε")
    clip_grad: float = option(1.0, "gradient-norm clipping")


@dataclass
class TrainerConfig:
    output_dir: str = option("outputs/run", "metrics, TensorBoard, exports, checkpoints")
    max_steps: int = option(100, "rollout steps")
    seed: int = option(1, "seeds the model build, the sampler and rollout sampling")
    export_hf: bool = option(True, "write the final policy as an HF folder (output_dir/hf_final)")
    export_hf_interval: int = option(0, "also export output_dir/hf/iter_<step> every this many steps (0: never)")
    save_interval: int = option(0, "Megatron checkpoint every this many steps and at the end (0: never)")
    save_dir: str | None = option(None, "checkpoint folder; default output_dir/checkpoints")
    keep_last: int = option(0, "keep only this many latest checkpoints (0: keep all)")
    resume: bool | Literal["strict"] = option(
        True, "continue from save_dir's newest complete checkpoint when there is one, naming torn newer ones; "
        "strict: refuse to start when the newest is torn (--strict-resume); false: start over"
    )
    overwrite: bool = option(
        False, "start over in an output_dir that holds another run's output and no checkpoint to resume: removes "
        "its metrics.jsonl, config.yaml, report.png, hf_final/, hf/, tensorboard/, rollouts/ and save_dir's checkpoints"
    )
    eval_interval: int = option(
        0, "evaluate the validation problems every this many steps, besides before the first and after the last"
    )
    distributed_timeout_minutes: int = option(
        30, "process groups' collective timeout (megatron's --distributed-timeout-minutes): a rank that waits "
        "longer on its peers stops with an error"
    )
    stall_timeout_s: float = option(
        3600.0, "a rank whose step makes no progress for this long dumps its Python stacks, names the ranks that "
        "stopped answering and ends the job for a requeue from the last checkpoint (0: never; GPU configs: 1800)"
    )


@dataclass
class LoggingConfig:
    tensorboard: bool = option(True, "mirror metrics to output_dir/tensorboard")
    progress_bar: bool = option(True, "progress bars on the console")
    rollout_dump_interval: int = option(
        0, "write the step's trained samples (prompt, response, reward, ...) to output_dir/rollouts/step_<n>.jsonl "
        "every this many steps (0: never)"
    )
    wandb: bool = option(False, "also mirror metrics to Weights & Biases (pip install -e '.[wandb]'; WANDB_MODE=offline works)")
    wandb_project: str = option("megatron-dapo", "W&B project")
    wandb_run_name: str | None = option(None, "W&B run name; null: the name of trainer.output_dir's folder")


@dataclass
class DapoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    toy_model: ToyModelConfig = field(default_factory=ToyModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int = 1, ranks_per_node: int | None = None, training: bool = True) -> None:
        """Check every value and cross-field rule; raise ``ConfigError`` naming the keys and the fix.

        ``ranks_per_node``: processes per node (torchrun's ``LOCAL_WORLD_SIZE``; default: all on one node).
        ``training=False`` (``megatron-dapo eval``): the actor's layout and the batch sizes are not checked, so
        that a training config evaluates on fewer GPUs than it trains on.
        """
        _validate_ranges(self)
        par, alg, ro = self.parallel, self.algorithm, self.rollout
        ranks_per_node = ranks_per_node or world_size
        if world_size % ro.ranks_per_engine or ranks_per_node % ro.ranks_per_engine:
            raise ConfigError(
                f"rollout.ranks_per_engine={ro.ranks_per_engine} must divide the world size {world_size} and the "
                f"{ranks_per_node} ranks of a node (an engine's ranks sit on one node)"
            )
        group_timeout_s = self.trainer.distributed_timeout_minutes * 60
        for key in ("engine_start_timeout_s", "engine_idle_timeout_s"):
            if getattr(ro, key) >= group_timeout_s:
                raise ConfigError(
                    f"rollout.{key}={getattr(ro, key):g} must be below trainer.distributed_timeout_minutes × 60 = "
                    f"{group_timeout_s} s (the other ranks wait for the engine in a collective): lower it or raise "
                    f"trainer.distributed_timeout_minutes"
                )
        if alg.overlong_buffer_enable and not 0 < alg.overlong_buffer_len <= ro.max_response_length:
            raise ConfigError(
                f"algorithm.overlong_buffer_len={alg.overlong_buffer_len} must be in "
                f"(0, rollout.max_response_length={ro.max_response_length}]"
            )
        if not training:
            return
        model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"parallel.tensor_model_parallel_size × parallel.pipeline_model_parallel_size = {model_parallel} does "
                f"not divide the world size {world_size}: launch a multiple of {model_parallel} processes, e.g. "
                f"`torchrun --nproc-per-node {model_parallel} -m megatron_dapo train ...`"
            )
        dp = world_size // model_parallel
        ep, etp = par.expert_model_parallel_size, par.expert_tensor_parallel_size or par.tensor_model_parallel_size
        expert_parallel = ep * etp * par.pipeline_model_parallel_size
        if world_size % expert_parallel:
            raise ConfigError(
                f"parallel.expert_model_parallel_size × expert_tensor_parallel_size × pipeline_model_parallel_size = "
                f"{ep} × {etp} × {par.pipeline_model_parallel_size} must divide the world size {world_size} (megatron "
                f"lays experts out over the ranks of a pipeline stage): lower parallel.expert_model_parallel_size"
            )
        if alg.train_batch_size > alg.gen_batch_size:
            raise ConfigError(
                f"algorithm.train_batch_size={alg.train_batch_size} > algorithm.gen_batch_size="
                f"{alg.gen_batch_size}: a generation round must hold at least one training batch of prompts"
            )
        samples = alg.train_batch_size * ro.n
        if samples % alg.mini_batch_size:
            raise ConfigError(
                f"algorithm.mini_batch_size={alg.mini_batch_size} must divide train_batch_size × rollout.n = {samples}"
            )
        if alg.mini_batch_size % (par.micro_batch_size * dp):
            raise ConfigError(
                f"algorithm.mini_batch_size={alg.mini_batch_size} must be divisible by parallel.micro_batch_size × "
                f"data-parallel size = {par.micro_batch_size} × {dp}"
            )
        vpp = par.virtual_pipeline_model_parallel_size
        if vpp is not None and vpp > 1:
            if par.pipeline_model_parallel_size < 2:
                raise ConfigError("parallel.virtual_pipeline_model_parallel_size needs parallel.pipeline_model_parallel_size > 1")
            micro_batches = alg.mini_batch_size // (par.micro_batch_size * dp)
            if micro_batches % par.pipeline_model_parallel_size:
                raise ConfigError(
                    f"interleaved pipeline: the {micro_batches} micro-batches per data-parallel rank and step "
                    f"(algorithm.mini_batch_size / (parallel.micro_batch_size × DP)) must be a multiple of "
                    f"parallel.pipeline_model_parallel_size={par.pipeline_model_parallel_size}"
                )
        if self.logging.wandb and importlib.util.find_spec("wandb") is None:
            raise ConfigError(
                "logging.wandb=true needs the wandb package: pip install -e '.[wandb]' (or set logging.wandb=false)"
            )

    def policy_loss(self) -> PolicyLossConfig:
        """The settings of the per-token DAPO loss (``algorithm.*`` plus the rollout's temperature and L_max)."""
        alg = self.algorithm
        return PolicyLossConfig(
            clip_ratio_low=alg.clip_ratio_low,
            clip_ratio_high=alg.clip_ratio_high,
            clip_ratio_c=alg.clip_ratio_c,
            loss_agg_mode=alg.loss_agg_mode,
            kl_coef=alg.kl_coef,
            temperature=self.rollout.temperature,
            norm_length=self.rollout.max_response_length,
        )


# Lower bounds (inclusive unless noted) of numeric options; upper bounds where they exist.
_AT_LEAST_ONE = (
    "parallel.tensor_model_parallel_size", "parallel.pipeline_model_parallel_size", "parallel.micro_batch_size",
    "rollout.max_response_length", "rollout.val_n", "algorithm.gen_batch_size", "algorithm.train_batch_size",
    "algorithm.mini_batch_size", "algorithm.ppo_epochs", "model.loss_chunk_size", "data.toy_num_train",
    "rollout.ranks_per_engine", "trainer.distributed_timeout_minutes", "parallel.expert_model_parallel_size",
    "toy_model.num_experts", "toy_model.num_experts_per_tok", "toy_model.moe_intermediate_size",
)
_NON_NEGATIVE = (
    "trainer.max_steps", "trainer.save_interval", "trainer.export_hf_interval", "trainer.keep_last",
    "trainer.eval_interval", "trainer.stall_timeout_s", "optimizer.min_lr",
    "optimizer.lr_warmup_steps", "optimizer.weight_decay", "algorithm.kl_coef", "algorithm.moe_aux_loss_coef", "algorithm.overlong_penalty_factor",
    "rollout.weight_sync_bucket_mb", "rollout.groups_in_flight", "reward.num_workers", "toy_model.sft_steps",
    "data.toy_num_val", "logging.rollout_dump_interval", "parallel.max_tokens_per_micro_batch",
)
_POSITIVE = (
    "optimizer.lr", "rollout.temperature", "rollout.val_temperature", "optimizer.clip_grad", "optimizer.adam_eps",
    "rollout.engine_start_timeout_s", "rollout.engine_idle_timeout_s",
)
_UNIT_INTERVAL = ("rollout.top_p", "rollout.val_top_p", "rollout.sglang_mem_fraction")  # (0, 1]
_SHARES = ("toy_model.sft_answer_noise", "toy_model.sft_step_error", "toy_model.sft_ramble", "toy_model.sft_ramble_error",
           "toy_model.sft_loop")


def _value(config: DapoConfig, key: str) -> object:
    section, name = key.split(".")
    return getattr(getattr(config, section), name)


def _validate_ranges(config: DapoConfig) -> None:
    for key in _AT_LEAST_ONE:
        if _value(config, key) < 1:
            raise ConfigError(f"{key}={_value(config, key)} must be at least 1")
    for key in _NON_NEGATIVE:
        if _value(config, key) < 0:
            raise ConfigError(f"{key}={_value(config, key)} must be >= 0")
    for key in _POSITIVE:
        if not _value(config, key) > 0:
            raise ConfigError(f"{key}={_value(config, key)} must be > 0")
    for key in _UNIT_INTERVAL:
        if not 0 < _value(config, key) <= 1:
            raise ConfigError(f"{key}={_value(config, key)} must be in (0, 1]")
    for key in _SHARES:
        if not 0 <= _value(config, key) <= 1:
            raise ConfigError(f"{key}={_value(config, key)} must be in [0, 1] (a share of the demonstrations)")
    toy = config.toy_model
    if toy.sft_ramble_repeats < 2:
        raise ConfigError(f"toy_model.sft_ramble_repeats={toy.sft_ramble_repeats} must be at least 2 (a number said twice)")
    if toy.sft_ramble + toy.sft_loop > 1:
        raise ConfigError(
            f"toy_model.sft_ramble={toy.sft_ramble} + toy_model.sft_loop={toy.sft_loop} must be at most 1 "
            "(shares of the same demonstrations)"
        )
    alg, ro = config.algorithm, config.rollout
    if ro.n < 2:
        raise ConfigError(f"rollout.n={ro.n}: group advantages need at least 2 samples per prompt")
    if not 0 <= alg.clip_ratio_low < 1 or alg.clip_ratio_high < 0:
        raise ConfigError(
            f"algorithm.clip_ratio_low={alg.clip_ratio_low} must be in [0, 1) and algorithm.clip_ratio_high="
            f"{alg.clip_ratio_high} >= 0 (the paper: 0.2 and 0.28)"
        )
    if alg.clip_ratio_high < alg.clip_ratio_low:
        raise ConfigError(
            f"algorithm.clip_ratio_high={alg.clip_ratio_high} < algorithm.clip_ratio_low={alg.clip_ratio_low}: the "
            "upper clip must be at least the lower one (Clip-Higher: 0.28 vs 0.2); swap or raise clip_ratio_high"
        )
    max_prompt = config.data.max_prompt_length
    if max_prompt is not None and max_prompt < 1:
        raise ConfigError(f"data.max_prompt_length={max_prompt} must be at least 1, or null")
    if alg.clip_ratio_c is not None and alg.clip_ratio_c <= 1:
        raise ConfigError(f"algorithm.clip_ratio_c={alg.clip_ratio_c} must be > 1 (the reference uses 10), or null to disable")
    if alg.tis_cap is not None and alg.tis_cap <= 0:
        raise ConfigError(f"algorithm.tis_cap={alg.tis_cap} must be > 0 (about 2), or null to disable")
    etp = config.parallel.expert_tensor_parallel_size
    if etp is not None and etp < 1:
        raise ConfigError(f"parallel.expert_tensor_parallel_size={etp} must be at least 1, or null (= TP)")
    if toy.num_experts_per_tok > toy.num_experts:
        raise ConfigError(
            f"toy_model.num_experts_per_tok={toy.num_experts_per_tok} > toy_model.num_experts={toy.num_experts}"
        )
    vpp = config.parallel.virtual_pipeline_model_parallel_size
    if vpp is not None and vpp < 1:
        raise ConfigError(f"parallel.virtual_pipeline_model_parallel_size={vpp} must be at least 1, or null")
    budget = config.parallel.max_tokens_per_micro_batch
    if budget and max_prompt is not None and budget < max_prompt + 1:
        raise ConfigError(
            f"parallel.max_tokens_per_micro_batch={budget} is smaller than data.max_prompt_length + 1 = "
            f"{max_prompt + 1} (the shortest sample that could be its longest); raise it, or 0 for micro_batch_size"
        )
    if budget and vpp is not None and vpp > 1:
        raise ConfigError(
            "parallel.max_tokens_per_micro_batch: the interleaved pipeline (parallel.virtual_pipeline_model_parallel_size "
            "> 1) needs every micro-batch of one shape; set max_tokens_per_micro_batch=0 or the virtual size to null"
        )


def _coerce(value: object, annotation: object, key: str) -> object:
    """Check/convert a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        alternatives = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(alternatives) > 1:  # e.g. trainer.resume: bool | "strict"
            for alternative in alternatives:
                try:
                    return _coerce(value, alternative, key)
                except ConfigError:
                    pass
            names = [a.__name__ if isinstance(a, type) else str(list(typing.get_args(a))) for a in alternatives]
            raise ConfigError(f"config key {key}={value!r} must be one of: {', '.join(names)}")
        annotation = alternatives[0]
        origin = typing.get_origin(annotation)
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value is False and "off" in choices:  # YAML 1.1 reads a bare `off` as false
            value = "off"
        if value not in choices:
            raise ConfigError(f"config key {key}={value!r} must be one of {list(choices)}")
        return value
    if origin is list:
        if not isinstance(value, list):
            value = [value]
        return [_coerce(v, typing.get_args(annotation)[0], key) for v in value]
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation is float and isinstance(value, str):  # YAML 1.1 reads "1e-6" as a string
        try:
            return float(value)
        except ValueError:
            pass
    if annotation in (int, float, str, bool) and not isinstance(value, annotation):
        raise ConfigError(f"config key {key}={value!r} must be of type {annotation.__name__}")
    if annotation is int and isinstance(value, bool):
        raise ConfigError(f"config key {key}={value!r} must be of type int")
    return value


def _build(cls: type, values: dict, prefix: str) -> object:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"unknown config key(s) {sorted(prefix + k for k in unknown)}; known: {sorted(known)}")
    kwargs = {}
    for name, value in values.items():
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            if not isinstance(value, dict):
                raise ConfigError(f"config key {prefix}{name} must be a mapping")
            kwargs[name] = _build(hint, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, hint, prefix + name)
    return cls(**kwargs)


def apply_override(values: dict, override: str) -> None:
    """Apply one ``a.b.c=value`` override (value parsed as YAML) to a nested dict."""
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like key.sub=value")
    key, raw = override.split("=", 1)
    parts = key.strip().split(".")
    node = values
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {part} is not a section")
    node[parts[-1]] = yaml.safe_load(raw)


def load_config(path: str | Path | None = None, overrides: typing.Sequence[str] = ()) -> DapoConfig:
    """Defaults ← YAML file ← overrides. Raises ``ConfigError`` for missing files, unknown keys or wrong types."""
    values: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found; see examples/configs/ for examples")
        try:
            loaded = yaml.safe_load(path.read_text())
        except yaml.YAMLError as error:
            raise ConfigError(f"{path}: not valid YAML ({error})") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        values = loaded or {}
    for override in overrides:
        apply_override(values, override)
    return _build(DapoConfig, values, "")


def config_to_dict(config: DapoConfig) -> dict:
    return dataclasses.asdict(config)


def describe_options(config: DapoConfig | None = None) -> list[str]:
    """One line per option: ``section.key = value  # documentation`` (``config``'s values, else the defaults)."""
    config = config or DapoConfig()
    lines = []
    for section in dataclasses.fields(DapoConfig):
        values = getattr(config, section.name)
        for option_field in dataclasses.fields(values):
            value = yaml.safe_dump(getattr(values, option_field.name), default_flow_style=True).strip()
            value = value.removesuffix("\n...").removesuffix("...").strip()
            lines.append(f"{section.name}.{option_field.name} = {value}  # {option_field.metadata.get('doc', '')}")
    return lines
