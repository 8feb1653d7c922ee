"""Config loading, overrides and validation errors that name the key."""

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
