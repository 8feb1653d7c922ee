"""docs/pitfalls.md, 35: with ``model.offload_during_rollout`` the actor's memory is unreadable between a step's
weight sync and the next step's onload (on CPU, ``actor/host_offload.py`` emulates torch_memory_saver's pause);
checkpoints and HF exports onload it first, and onload restores every value bit for bit."""

import os

import pytest
import torch

from ..helpers import build_actor, metrics_rows, make_tiny_qwen2, run_cli
from .test_actor_parity import _config, _random_batch
from .test_resume import COMPARED, SMALL


def _train_step(actor, seed: int) -> None:
    batch = _random_batch(seed=seed)
    batch["old_logprobs"], _ = actor.compute_logprobs(batch, 1.0)
    batch["ref_logprobs"], _ = actor.compute_logprobs(batch, 1.0, use_reference=True)
    actor.train_step(batch)


def _state(actor) -> dict[str, torch.Tensor]:
    """Copies of every parameter, ``main_grad``, reference weight and Adam state tensor, by name."""
    named = {}
    for kind, chunks in (("actor", actor.model_chunks), ("ref", actor.ref_chunks)):
        for name, param in chunks[0].named_parameters():
            named[f"{kind}/{name}"] = param.detach().clone()
            if kind == "actor":
                named[f"grad/{name}"] = param.main_grad.clone()
    for index, state in actor.optimizer.state_dict()["state"].items():
        named.update({f"adam/{index}/{key}": value.clone() for key, value in state.items()})
    return named


def test_offloaded_actor_memory_is_unreadable_and_onload_restores_it_bit_identical(megatron_world, tmp_path):
    make_tiny_qwen2(tmp_path, tied=False)
    config = _config(**{"model.offload_during_rollout": True, "algorithm.kl_coef": 0.1, "optimizer.lr": 0.01})
    actor = build_actor(config, str(tmp_path))
    _train_step(actor, seed=2)  # gradients and Adam state exist (created by the first step)
    before = _state(actor)
    assert {key.split("/")[2] for key in before if key.startswith("adam/")} == {"step", "exp_avg", "exp_avg_sq"}
    param = next(actor.model_chunks[0].parameters())
    adam_moment = next(iter(actor.optimizer.state_dict()["state"].values()))["exp_avg"]
    ref_param = next(actor.ref_chunks[0].parameters())

    actor.offload()
    for tensor in (param, param.main_grad, adam_moment, ref_param):
        assert tensor.untyped_storage().nbytes() == 0  # released
        with pytest.raises(RuntimeError, match="out of bounds for storage of size 0"):
            tensor.flatten()[0].item()  # a read (a kernel reading the whole tensor would crash the process)
    with pytest.raises(RuntimeError, match="offloaded memory"):
        actor.compute_logprobs(_random_batch(), 1.0)

    actor.onload()
    after = _state(actor)
    assert after.keys() == before.keys()
    for key, value in before.items():
        assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    # the restored storages are the ones DDP and the optimizer use: training goes on exactly as without offload
    reference = build_actor(config, str(tmp_path))
    _train_step(reference, seed=2)
    _train_step(reference, seed=3)
    _train_step(actor, seed=3)
    for (name, got), want in zip(actor.model_chunks[0].named_parameters(), reference.model_chunks[0].parameters()):
        assert torch.equal(got, want), name


@pytest.mark.slow  # three toy runs: minutes on 2 cores
def test_offloaded_toy_saves_exports_stops_and_resumes(tmp_path):
    """The toy with offload on: checkpoints and HF exports on schedule, a stop request's checkpoint, the final
    export, and a resume from the stop's checkpoint that equals an uninterrupted offloaded run."""
    offload = [*SMALL, "model.offload_during_rollout=true", "trainer.max_steps=3", "trainer.export_hf=true"]
    whole, split, stop = tmp_path / "whole", tmp_path / "split", tmp_path / "stop"
    uninterrupted = run_cli(f"trainer.output_dir={whole}", *offload, "trainer.export_hf_interval=2", timeout=1800)
    assert uninterrupted.returncode == 0, uninterrupted.stderr[-3000:]
    assert (whole / "hf" / "iter_0000002" / "config.json").is_file() and (whole / "hf_final" / "config.json").is_file()
    assert (whole / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "3"

    # the same warm-started toy policy, not trained again; the launcher's stop file: the run stops after step 1
    # with a checkpoint written for it (save_interval 0)
    interrupted = [f"trainer.output_dir={split}", f"model.hf_path={whole / 'toy_init'}", *offload,
                   "trainer.save_interval=0"]
    stop.touch()
    env = dict(os.environ, MEGATRON_DAPO_STOP_FILE=str(stop))
    stopped = run_cli(*interrupted, env=env, timeout=1800)
    assert stopped.returncode == 75, stopped.stderr[-3000:]
    assert (split / "checkpoints" / "latest_checkpointed_iteration.txt").read_text() == "1"
    stop.unlink()
    resumed = run_cli(*interrupted, env=env, timeout=1800)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (split / "hf_final" / "config.json").is_file()
    expected, got = metrics_rows(whole), metrics_rows(split)
    assert [r["step"] for r in got] == [0, 1, 2, 3]
    for step in (2, 3):  # step 3 depends on the Adam moments restored from the stop's checkpoint
        for key in COMPARED:
            assert got[step][key] == pytest.approx(expected[step][key], rel=1e-6, abs=1e-9), (step, key)
