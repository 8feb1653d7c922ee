"""Config loading, overrides and validation errors that name the key."""

import re
from pathlib import Path

import pytest

from megatron_dapo.config import ConfigError, load_config

CONFIGS = Path(__file__).resolve().parents[2] / "examples" / "configs"


def test_toy_config_and_overrides():
    config = load_config(CONFIGS / "toy_cpu.yaml", ["trainer.max_steps=3", "parallel.tensor_model_parallel_size=2", "trainer.output_dir=/tmp/x"])
    assert config.trainer.max_steps == 3 and config.parallel.tensor_model_parallel_size == 2
    assert config.trainer.output_dir == "/tmp/x"
    config.validate(world_size=2)


def test_paper_config_holds_dapo_numbers():
    config = load_config(CONFIGS / "qwen2.5_32b_dapo.yaml")
    alg, ro = config.algorithm, config.rollout
    assert (alg.clip_ratio_low, alg.clip_ratio_high, alg.clip_ratio_c) == (0.2, 0.28, 10.0)
    assert (alg.gen_batch_size, alg.train_batch_size, alg.max_num_gen_batches) == (1536, 512, 10)
    assert (ro.n, ro.max_response_length, alg.overlong_buffer_len) == (16, 20480, 4096)
    assert alg.train_batch_size * ro.n // alg.mini_batch_size == 16
    assert (config.optimizer.lr, config.optimizer.lr_warmup_steps) == (1e-6, 20)
    assert (ro.val_n, ro.val_temperature, ro.val_top_p) == (32, 1.0, 0.7)
    config.validate(world_size=128)


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["algorithm.train_batch_size=64", "algorithm.gen_batch_size=32"], "train_batch_size"),
        (["algorithm.mini_batch_size=7"], "mini_batch_size"),
        (["parallel.micro_batch_size=3"], "micro_batch_size"),
        (["algorithm.loss_agg_mode=mean"], "loss_agg_mode"),
        (["algorithm.overlong_buffer_len=100"], "overlong_buffer_len"),
        (["rollout.n=1"], "rollout.n"),
        (["parallel.tensor_model_parallel_size=3"], "tensor_model_parallel_size"),
    ],
)
def test_validation_names_the_key(overrides, key):
    with pytest.raises(ConfigError, match=key):
        load_config(CONFIGS / "toy_cpu.yaml", overrides).validate(world_size=2)


def test_exponent_floats_without_a_dot():
    assert load_config(None, ["optimizer.lr=1e-6"]).optimizer.lr == 1e-6


def test_unknown_key_and_wrong_type():
    with pytest.raises(ConfigError, match="trainer.max_stepz"):
        load_config(None, ["trainer.max_stepz=3"])
    with pytest.raises(ConfigError, match="trainer.max_steps"):
        load_config(None, ["trainer.max_steps=lots"])
    with pytest.raises(ConfigError, match="optimizer.lr"):
        load_config(None, ["optimizer.lr=fast"])
    with pytest.raises(ConfigError, match="key.sub=value"):
        load_config(None, ["trainer.max_steps"])


def test_every_option_is_listed_with_its_documentation():
    import dataclasses

    from megatron_dapo.config import DapoConfig, describe_options

    lines = describe_options(load_config(CONFIGS / "toy_cpu.yaml"))
    keys = [f"{s.name}.{f.name}" for s in dataclasses.fields(DapoConfig) for f in dataclasses.fields(getattr(DapoConfig(), s.name))]
    assert [line.split(" = ")[0] for line in lines] == keys
    assert all(line.split("  # ", 1)[1].strip() for line in lines)  # a non-empty line of documentation each
    assert "rollout.n = 8  # G: samples per prompt" in lines  # the file's value, not the default


@pytest.mark.parametrize(
    "override, message",
    [
        ("algorithm.clip_ratio_c=1.0", "algorithm.clip_ratio_c=1.0 must be > 1"),
        ("algorithm.tis_cap=0", "algorithm.tis_cap=0.0 must be > 0"),
        ("rollout.temperature=0", "rollout.temperature=0.0 must be > 0"),
        ("trainer.max_steps=-1", "trainer.max_steps=-1 must be >= 0"),
        ("parallel.micro_batch_size=0", "parallel.micro_batch_size=0 must be at least 1"),
        ("logging.rollout_dump_interval=-1", "logging.rollout_dump_interval=-1 must be >= 0"),
        ("toy_model.sft_loop=1.5", "toy_model.sft_loop=1.5 must be in [0, 1]"),
        ("toy_model.sft_ramble=0.99", "toy_model.sft_ramble=0.99 + toy_model.sft_loop=0.05 must be at most 1"),
        ("trainer.eval_interval=-2", "trainer.eval_interval=-2 must be >= 0"),
        ("rollout.engine_start_timeout_s=0", "rollout.engine_start_timeout_s=0.0 must be > 0"),
        ("trainer.distributed_timeout_minutes=0", "trainer.distributed_timeout_minutes=0 must be at least 1"),
        ("trainer.stall_timeout_s=-1", "trainer.stall_timeout_s=-1.0 must be >= 0"),
    ],
)
def test_value_ranges_are_checked_before_any_work(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(CONFIGS / "toy_cpu.yaml", [override]).validate(world_size=1)


@pytest.mark.parametrize("key", ["rollout.engine_start_timeout_s", "rollout.engine_idle_timeout_s"])
def test_engine_timeouts_end_before_the_process_groups(key):
    """The other ranks wait for an engine in a collective: its own deadline must come first."""
    load_config(CONFIGS / "toy_cpu.yaml", [f"{key}=1199", "trainer.distributed_timeout_minutes=20"]).validate()
    config = load_config(CONFIGS / "toy_cpu.yaml", [f"{key}=1200", "trainer.distributed_timeout_minutes=20"])
    with pytest.raises(ConfigError, match=re.escape(f"{key}=1200 must be below trainer.distributed_timeout_minutes × 60 = 1200 s")):
        config.validate(training=False)


def test_gpu_configs_choose_throughput_and_score_in_workers():
    for name in ("qwen2.5_32b_dapo.yaml", "qwen2.5_7b_dapo.yaml"):
        config = load_config(CONFIGS / name)
        assert config.rollout.sglang_deterministic is False and config.reward.num_workers > 0, name


def test_gpu_configs_balance_data_parallel_work_pack_by_tokens_and_feed_engines_continuously():
    for name in ("qwen2.5_32b_dapo.yaml", "qwen2.5_7b_dapo.yaml", "qwen3_30b_a3b_dapo.yaml", "qwen3_235b_a22b_dapo.yaml"):
        config = load_config(CONFIGS / name)
        assert config.parallel.balance_data and config.rollout.continuous_feeding, name
        assert config.parallel.max_tokens_per_micro_batch >= 2048 + config.rollout.max_response_length, name


def test_a_token_budget_under_the_interleaved_pipeline_is_refused():
    config = load_config(CONFIGS / "toy_cpu.yaml", ["parallel.max_tokens_per_micro_batch=512",
                                                   "parallel.pipeline_model_parallel_size=2",
                                                   "parallel.virtual_pipeline_model_parallel_size=2"])
    with pytest.raises(ConfigError, match="interleaved pipeline .* max_tokens_per_micro_batch=0"):
        config.validate(world_size=2)


def test_evaluation_checks_the_engines_not_the_training_layout():
    """``megatron-dapo eval`` of a 128-GPU training config on one 8-GPU node: the engines must fit the node, the
    actor's TP 8 × PP 2 need not divide the world."""
    config = load_config(CONFIGS / "qwen2.5_32b_dapo.yaml")
    with pytest.raises(ConfigError, match="tensor_model_parallel_size"):
        config.validate(world_size=8)
    config.validate(world_size=8, training=False)
    with pytest.raises(ConfigError, match="rollout.ranks_per_engine=8"):
        config.validate(world_size=4, training=False)
    with pytest.raises(ConfigError, match="rollout.val_n=0"):
        load_config(CONFIGS / "toy_cpu.yaml", ["rollout.val_n=0"]).validate(training=False)


def test_choices_are_checked_when_loading():
    with pytest.raises(ConfigError, match=re.escape("model.loss_impl='fast' must be one of ['naive', 'fused', 'fused_linear']")):
        load_config(None, ["model.loss_impl=fast"])
    with pytest.raises(ConfigError, match="config file .*missing.yaml not found"):
        load_config(CONFIGS / "missing.yaml")


def test_wandb_without_the_package_names_the_extra(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "wandb", None)  # as if not installed: importlib finds no spec
    config = load_config(CONFIGS / "toy_cpu.yaml", ["logging.wandb=true"])
    with pytest.raises(ConfigError, match=re.escape("logging.wandb=true needs the wandb package: pip install -e '.[wandb]'")):
        config.validate(world_size=1)
    load_config(CONFIGS / "toy_cpu.yaml").validate(world_size=1)  # off by default: no wandb needed


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["algorithm.clip_ratio_high=0.1"], "algorithm.clip_ratio_high=0.1 < algorithm.clip_ratio_low=0.2"),
        (["optimizer.lr=0"], "optimizer.lr=0.0 must be > 0"),
        (["optimizer.lr=-1e-5"], "optimizer.lr=-1e-05 must be > 0"),
        (["data.max_prompt_length=0"], "data.max_prompt_length=0 must be at least 1"),
        (["data.overlong_prompt=truncate"], "data.overlong_prompt='truncate' must be one of ['refuse', 'drop']"),
        (["parallel.max_tokens_per_micro_batch=-8"], "parallel.max_tokens_per_micro_batch=-8 must be >= 0"),
        (["parallel.max_tokens_per_micro_batch=100", "data.max_prompt_length=128"],
         "parallel.max_tokens_per_micro_batch=100 is smaller than data.max_prompt_length + 1 = 129"),
    ],
)
def test_values_that_can_never_work_are_refused(overrides, message):
    with pytest.raises(ConfigError) as refused:
        load_config(CONFIGS / "toy_cpu.yaml", overrides).validate(world_size=1)
    assert message in str(refused.value)


def test_train_without_config_is_one_line_naming_the_flag(capsys):
    from megatron_dapo.cli import main

    assert main(["train", "trainer.max_steps=1"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: train needs --config FILE"), lines
