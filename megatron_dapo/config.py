"""Typed job configuration: dataclasses loaded from YAML, with ``key.sub=value`` command-line overrides."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from megatron_dapo.algorithm.policy_loss import LOSS_AGG_MODES


LOSS_IMPLS = ("naive", "fused", "fused_linear")


class ConfigError(ValueError):
    """A configuration value is missing, unknown or inconsistent; the message names the key."""


@dataclass
class ModelConfig:
    hf_path: str | None = None  # HF folder (config.json + safetensors + tokenizer); None builds the toy model
    megatron_checkpoint: str | None = None  # start from these weights (torch_dist, any TP/PP) instead of hf_path's
    make_vocab_size_divisible_by: int = 128
    loss_impl: str = "fused"  # naive (gathers full-vocab logits) | fused (vocab-parallel) | fused_linear (chunked)
    loss_chunk_size: int = 512  # tokens per chunk of the fused_linear loss


@dataclass
class ToyModelConfig:
    """The offline toy model and its supervised warm start (used when ``model.hf_path`` is null)."""

    hidden_size: int = 128
    intermediate_size: int = 384
    num_hidden_layers: int = 2
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    tie_word_embeddings: bool = False
    sft_steps: int = 2000
    sft_batch_size: int = 64
    sft_lr: float = 1e-3
    sft_answer_noise: float = 0.4  # share of warm-start demonstrations whose answer is off by 1–9


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    pipeline_model_parallel_size: int = 1
    virtual_pipeline_model_parallel_size: int | None = None  # model chunks per pipeline rank (interleaved 1F1B)
    sequence_parallel: bool = False  # with TP > 1: norms/dropout on sequence shards, activations 1/TP
    use_distributed_optimizer: bool = False  # optimizer state and fp32 master weights sharded over DP
    micro_batch_size: int = 8  # samples per micro-batch (padding-aware: sorted by length, cut to the longest)


@dataclass
class DataConfig:
    train_files: list[str] = field(default_factory=list)  # parquet/jsonl in DAPO-Math-17K format; empty: toy task
    val_files: list[str] = field(default_factory=list)
    toy_num_train: int = 2000
    toy_num_val: int = 64
    toy_seed: int = 1234


@dataclass
class RolloutConfig:
    engine: str = "hf"  # "hf" (in-process transformers model, CPU) or "sglang" (GPU)
    n: int = 16  # G, samples per prompt
    temperature: float = 1.0
    top_p: float = 1.0
    max_response_length: int = 20480
    val_n: int = 32  # avg@k samples per evaluation problem
    val_temperature: float = 1.0
    val_top_p: float = 0.7
    weight_sync_bucket_mb: int = 512  # size of the flattened buckets the resharder sends to the engine
    sglang_tp_size: int = 0  # SGLang engine TP size; 0: every GPU of the node
    sglang_mem_fraction: float = 0.6  # SGLang's mem_fraction_static (weights + KV cache share of the GPU)


@dataclass
class AlgorithmConfig:
    clip_ratio_low: float = 0.2
    clip_ratio_high: float = 0.28
    clip_ratio_c: float | None = 10.0
    loss_agg_mode: str = "token-mean"
    dynamic_sampling: bool = True
    gen_batch_size: int = 1536  # prompts per generation round
    train_batch_size: int = 512  # prompts (groups) per training step
    max_num_gen_batches: int = 10  # <= 0: unbounded
    mini_batch_size: int = 512  # samples per optimiser step
    ppo_epochs: int = 1
    overlong_filtering: bool = False
    overlong_buffer_enable: bool = True
    overlong_buffer_len: int = 4096
    overlong_penalty_factor: float = 1.0
    kl_coef: float = 0.0  # > 0 adds a k3 KL-to-reference term (naive GRPO baseline)
    tis_cap: float | None = 2.0  # truncated importance-sampling cap; null disables


@dataclass
class OptimizerConfig:
    lr: float = 1e-6
    min_lr: float = 0.0
    lr_warmup_steps: int = 20
    weight_decay: float = 0.1
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    clip_grad: float = 1.0


@dataclass
class TrainerConfig:
    output_dir: str = "outputs/run"
    max_steps: int = 100
    seed: int = 1
    export_hf: bool = True  # write the final policy as an HF folder (output_dir/hf_final)
    export_hf_interval: int = 0  # also export output_dir/hf/iter_<step> every this many steps (0: never)
    save_interval: int = 0  # Megatron checkpoint every this many steps and at the end (0: never)
    save_dir: str | None = None  # default: output_dir/checkpoints
    resume: bool = True  # continue from save_dir's latest checkpoint when there is one


@dataclass
class LoggingConfig:
    tensorboard: bool = True
    progress_bar: bool = True


@dataclass
class DapoConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    toy_model: ToyModelConfig = field(default_factory=ToyModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self, world_size: int = 1) -> None:
        """Check cross-field consistency; raise ``ConfigError`` naming the keys and the fix."""
        par, alg, ro = self.parallel, self.algorithm, self.rollout
        model_parallel = par.tensor_model_parallel_size * par.pipeline_model_parallel_size
        if world_size % model_parallel:
            raise ConfigError(
                f"world size {world_size} is not divisible by parallel.tensor_model_parallel_size × "
                f"parallel.pipeline_model_parallel_size = {model_parallel}"
            )
        dp = world_size // model_parallel
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
        if alg.loss_agg_mode not in LOSS_AGG_MODES:
            raise ConfigError(f"algorithm.loss_agg_mode={alg.loss_agg_mode!r} must be one of {LOSS_AGG_MODES}")
        if alg.overlong_buffer_enable and not 0 < alg.overlong_buffer_len <= ro.max_response_length:
            raise ConfigError(
                f"algorithm.overlong_buffer_len={alg.overlong_buffer_len} must be in "
                f"(0, rollout.max_response_length={ro.max_response_length}]"
            )
        if ro.n < 2:
            raise ConfigError(f"rollout.n={ro.n}: group advantages need at least 2 samples per prompt")
        if self.model.loss_impl not in LOSS_IMPLS:
            raise ConfigError(f"model.loss_impl={self.model.loss_impl!r} must be one of {LOSS_IMPLS}")
        if ro.engine not in ("hf", "sglang"):
            raise ConfigError(f"rollout.engine={ro.engine!r} must be 'hf' or 'sglang'")


def _coerce(value: object, annotation: object, key: str) -> object:
    """Check/convert a YAML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(annotation):
            return None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
        origin = typing.get_origin(annotation)
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


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> DapoConfig:
    """Defaults ← YAML file ← overrides. Raises ``ConfigError`` for unknown keys or wrong types."""
    values: dict = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections")
        values = loaded or {}
    for override in overrides:
        apply_override(values, override)
    return _build(DapoConfig, values, "")


def config_to_dict(config: DapoConfig) -> dict:
    return dataclasses.asdict(config)
