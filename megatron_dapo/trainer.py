"""The DAPO loop: generate → reward → dynamic sampling → advantages → old log-probs → train → weight sync.

Every group of ``rollout.ranks_per_engine`` ranks runs a rollout engine; a step's groups are generated and
scored across all of them and each data-parallel replica receives only the samples it trains
(``rollout/collect.py``). The actor recomputes π_old itself; the engines' log-probs only enter through
truncated importance weights and the ``rollout/train_logprob_abs_diff`` health metric (docs/design.md,
"Which old log-probs").
"""

from __future__ import annotations

import os
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from tqdm import tqdm

from megatron_dapo.actor.actor import MegatronActor
from megatron_dapo.algorithm import truncated_is_weights
from megatron_dapo.batch import build_training_batch, cost_imbalance, data_parallel_partition, sample_cost, split_batch, to_device
from megatron_dapo.checkpointing import remove_old_checkpoints
from megatron_dapo.ops.dapo_loss import CLIP_METRIC_KEYS
from megatron_dapo.weights.checkpoint_reader import CHECKPOINT_FAILURES, newest_resumable, saved_iterations, strict_resume_refusal
from megatron_dapo.config import DapoConfig, config_to_dict
from megatron_dapo.errors import UserError
from megatron_dapo.data import PromptSampler
from megatron_dapo.distributed import (
    destroy_distributed,
    free_device_cache,
    initialize_model_parallel,
    initialize_process_group,
    is_rank_zero,
    run_on_rank_zero,
)
from megatron_dapo.evaluation import EvalSummary, summarize
from megatron_dapo.inputs import (
    check_model_fits_layout,
    fit_prompts,
    load_prompts,
    load_tokenizer,
    model_hf_config,
    prepare_inputs,
    write_run_config,
)
from megatron_dapo.metrics import MetricsLogger, timed
from megatron_dapo.output_dir import OutputLock, claim_output_dir
from megatron_dapo.preemption import Preempted, StopRequests
from megatron_dapo.report import write_report
from megatron_dapo.reward import RewardScorer
from megatron_dapo.rollout.collect import JobRollout, StepRollout
from megatron_dapo.rollout.dump import rollout_dump_rows, write_rollout_dump
from megatron_dapo.rollout.factory import EnginePlacement, build_rollout_engine, engine_class
from megatron_dapo.watchdog import StallWatchdog
from megatron_dapo.weights.sync import export_hf, sync_weights


def checkpoint_dir(config: DapoConfig) -> Path:
    """``trainer.save_dir``, by default ``output_dir/checkpoints`` (read before the job is built, and by it)."""
    return Path(config.trainer.save_dir or Path(config.trainer.output_dir) / "checkpoints")


def _stop_again_before_loading(config: DapoConfig, stop_requests: StopRequests) -> None:
    """torchrun's in-job restarts (``--max-restarts``) also restart workers that stopped for a requeue: while
    the launcher's stop file is there and the checkpoint it asked for exists, stop again before loading anything
    (collective)."""
    latest = newest_resumable(checkpoint_dir(config)) if config.trainer.resume else None
    if latest is None:
        return
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    if stop_requests.agreed(device) == "stop file":
        destroy_distributed()
        raise Preempted(int(latest.name.removeprefix("iter_")), "stop file")


class Job:
    """What the steps share: the config, data, tokenizer, the actor (every rank), this rank's part of its
    rollout engine (``None`` on a CPU engine's other ranks) and the job's rollout across engines."""

    def __init__(self, config: DapoConfig, stop_requests: StopRequests) -> None:
        alg, ro = config.algorithm, config.rollout
        self.config = config
        self.hf_dir, train_files, val_files = prepare_inputs(
            config, lambda: stop_requests.stop_if_signalled("the toy warm start")
        )
        self.tokenizer = load_tokenizer(self.hf_dir)
        hf_config = model_hf_config(config)
        max_positions = hf_config.max_position_embeddings
        self.train_records, dropped_train = fit_prompts(
            load_prompts(train_files, config.data.deduplicate), self.tokenizer, config, max_positions, "data.train_files"
        )
        self.val_records, dropped_val = fit_prompts(
            load_prompts(val_files, config.data.deduplicate) if val_files else [], self.tokenizer, config,
            max_positions, "data.val_files",
        )
        self.dropped_long_prompts = dropped_train + dropped_val
        self.sampler = PromptSampler(len(self.train_records), config.trainer.seed)  # one copy per rank, in step
        scorer = RewardScorer(config.reward.function, config.reward.num_workers)
        # Engines start first, on free GPUs (SGLang sizes its KV cache from the memory it finds), and release
        # their memory before the actor is built.
        self.placement = EnginePlacement(ro.ranks_per_engine, dist.get_world_size())
        # weights_by_sync: restore() syncs the actor's weights into the engines before the first generation
        self.engine = build_rollout_engine(
            ro, self.placement, self.hf_dir, self.tokenizer, config.trainer.seed, weights_by_sync=True,
            timeout_minutes=config.trainer.distributed_timeout_minutes,
            route_shape=(hf_config.num_hidden_layers, hf_config.num_experts_per_tok)
            if alg.routing_replay == "rollout" else None,
        )
        self.engine_dtype = engine_class(ro).weight_dtype
        self.release_engine()
        updates_per_step = alg.ppo_epochs * alg.train_batch_size * ro.n // alg.mini_batch_size
        self.actor = MegatronActor(
            self.hf_dir, config.model, config.parallel, config.optimizer, config.policy_loss(),
            total_steps=config.trainer.max_steps * updates_per_step,
            moe_aux_loss_coef=alg.moe_aux_loss_coef, routing_replay=alg.routing_replay == "rollout",
        )
        self.dp_size = parallel_state.get_data_parallel_world_size()
        dp_rank_of = [None] * dist.get_world_size()
        dist.all_gather_object(dp_rank_of, parallel_state.get_data_parallel_rank())
        self.rollout = JobRollout(self.engine, self.placement, self.tokenizer, ro, alg, scorer, config.trainer.seed, dp_rank_of)
        self.bucket_bytes = ro.weight_sync_bucket_mb * 1024**2
        self.save_dir = checkpoint_dir(config)

    # ------------------------------------------------------------------ the colocated phases (docs/design.md)
    def release_engine(self) -> None:
        """Generation → training: the engine frees weights, KV cache and CUDA graphs; then every rank may allocate."""
        if self.engine is not None:
            self.engine.release_memory()
        dist.barrier()

    def sync_weights(self) -> None:
        """Training → generation: free the training phase's memory, give the engine its weight memory back,
        stream the actor's weights in, release the actor's memory, then let the engine take its KV cache."""
        free_device_cache()
        if self.engine is not None:
            self.engine.resume_memory(("weights",))
        actor, ro = self.actor, self.config.rollout
        actor.require_onloaded("the weight sync")
        sync_weights(
            actor.model_chunks, actor.layout, self.engine, self.placement.weight_receivers(ro), self.bucket_bytes,
            self.engine_dtype, ro.weight_sync_transport,
        )
        actor.offload()
        free_device_cache()
        if self.engine is not None:
            self.engine.resume_memory(("kv_cache", "cuda_graph"))

    @contextmanager
    def actor_onloaded(self) -> Iterator[None]:
        """The actor's weights and optimizer state readable for the block (a checkpoint, an HF export; collective).

        Between steps an offloaded actor's memory is the engines' KV cache: the engines release theirs, the actor
        onloads, and after the block the weights are synced again, which offloads the actor and gives the
        engines their memory back (docs/pitfalls.md, 35). Nothing to do while the actor is on.
        """
        if not self.actor.offloaded:
            yield
            return
        self.release_engine()
        self.actor.onload()
        yield
        self.sync_weights()

    def export_hf(self, out_dir: Path) -> None:
        """Write the actor's policy as an HF folder (collective)."""
        actor = self.actor
        with self.actor_onloaded():
            export_hf(
                actor.model_chunks, actor.layout, actor.hf_config, out_dir, self.tokenizer, self.bucket_bytes,
                actor.params_dtype, self.config.rollout.weight_sync_transport,
            )

    def dump_rollouts(self, step: int, step_rollout: StepRollout) -> None:
        """Write the step's trained samples to ``output_dir/rollouts/step_<step>.jsonl`` (collective: the engine
        hosts send their responses' text to rank 0, which writes)."""
        responses = self.rollout.kept_responses(step_rollout)
        if is_rank_zero():
            rows = rollout_dump_rows(step, step_rollout, responses, self.tokenizer)
            write_rollout_dump(self.config.trainer.output_dir, step, rows)

    def evaluate(self, metrics: dict[str, float]) -> EvalSummary:
        """The engines' policy on the validation problems (collective); its metrics and ``timing/eval`` are added
        to ``metrics``. Sampling is seeded per problem: nothing a training step draws from changes."""
        with timed(metrics, "eval"):
            correct = self.rollout.evaluate(self.val_records)
        summary = summarize(correct, [record.data_source for record in self.val_records])
        metrics.update(summary.metrics)
        return summary

    def evaluates_after(self, step: int) -> bool:
        """Whether ``step`` ends with an evaluation: every ``trainer.eval_interval`` steps and the last one,
        when there are validation problems."""
        trainer = self.config.trainer
        scheduled = step == trainer.max_steps or (trainer.eval_interval > 0 and step % trainer.eval_interval == 0)
        return scheduled and bool(self.val_records)

    def restore(self) -> int:
        """Resume from ``save_dir``'s newest complete checkpoint when there is one; the first step to run.

        Restores model, optimizer, LR scheduler, the data cursor (with the prompts a streamed step gave back), the
        step and the engines' weight version, then syncs the actor's weights into the engines: they start with
        the initial weights (the CPU engine) or none at all (SGLang), never with the restored ones
        (docs/pitfalls.md, 6 and 23). Newer checkpoints that are torn (incomplete, unreadable, failing to load) are
        named in one line and left in place; ``trainer.resume: strict`` refuses them instead (docs/pitfalls.md, 42).
        """
        resume = self.config.trainer.resume
        saved = run_on_rank_zero(lambda: saved_iterations(self.save_dir)) if resume else []
        first_step, torn = 1, []
        for folder, problem in saved:
            if problem is None:
                state, problem = self._load(folder)
            if problem is None:
                self.sampler.load_state_dict(state["sampler"])
                if self.engine is not None:
                    self.engine.load_state_dict(state["engine"])
                first_step = state["step"] + 1
                break
            if resume == "strict":
                raise strict_resume_refusal(folder, problem)
            torn.append(f"{folder} ({problem})")
        if torn and is_rank_zero():
            resumed = f"resuming from {folder}" if first_step > 1 else "no complete checkpoint: starting from step 1"
            print(f"resume: torn checkpoint {', '.join(torn)} left for inspection (a later save of that step replaces "
                  f"it); {resumed}", flush=True)
        self.sync_weights()
        return first_step

    def _load(self, folder: Path) -> tuple[dict | None, str | None]:
        """Load ``folder`` on every rank: its trainer state, or why it failed on some rank (collective).

        What the cheap checks cannot see (a shard damaged in place) fails here; a checkpoint of another model or
        layout is the user's to fix, not a reason to fall back, and is raised.
        """
        state, problem = None, None
        try:
            state = self.actor.load_checkpoint(folder)
        except UserError:
            raise
        except CHECKPOINT_FAILURES as error:  # the next older checkpoint is loaded over whatever this one left
            problem = f"loading it failed ({type(error).__name__}: {' '.join(str(error).split())[:300]})"
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
        return state, next((p for p in problems if p is not None), None)

    def save(self, step: int) -> None:
        """A checkpoint of everything a resumed run needs after ``step`` (collective); the oldest beyond
        ``trainer.keep_last`` go once it is complete."""
        engine_state = self.engine.state_dict() if self.engine is not None else {}
        state = run_on_rank_zero(lambda: {"step": step, "sampler": self.sampler.state_dict(), "engine": engine_state})
        with self.actor_onloaded():
            self.actor.save_checkpoint(self.save_dir, step, state, self.tokenizer)
        if is_rank_zero() and self.config.trainer.keep_last > 0:
            remove_old_checkpoints(self.save_dir, self.config.trainer.keep_last)

    def save_at(self, step: int) -> bool:
        """Checkpoint and HF export at the configured steps (collective); whether a checkpoint was written."""
        trainer = self.config.trainer
        saved = trainer.save_interval > 0 and (step % trainer.save_interval == 0 or step == trainer.max_steps)
        exported = trainer.export_hf_interval > 0 and step % trainer.export_hf_interval == 0
        with self.actor_onloaded() if saved or exported else nullcontext():  # onloaded once for both
            if saved:
                self.save(step)
            if exported:
                self.export_hf(Path(trainer.output_dir) / "hf" / f"iter_{step:07d}")
        return saved


def _update_metrics(updates: list[dict[str, float]]) -> dict[str, float]:
    """Means over the step's optimiser updates; clip metrics over the updates after the first only: π_old is
    computed with the weights the first update starts from, so its ratio is identically 1 and nothing clips there
    (0 when the step makes one update)."""
    means = {key: sum(u[key] for u in updates) / len(updates) for key in updates[0]}
    moved = updates[1:]
    for key in CLIP_METRIC_KEYS:
        means[key] = sum(u[key] for u in moved) / len(moved) if moved else 0.0
    return means


def _replica_sums(values: torch.Tensor) -> torch.Tensor:
    """Sums over the data-parallel replicas (each holds its own samples; its ranks hold the same)."""
    dist.all_reduce(values, group=parallel_state.get_data_parallel_group())
    return values


def _step_partition(job: Job, step_rollout) -> tuple[list[list[int]], float]:
    """The step's samples by data-parallel rank (``parallel.balance_data``) and the estimated cost imbalance."""
    hidden = job.actor.hf_config.hidden_size
    costs = [sample_cost(length, hidden) for length in job.rollout.sample_lengths(step_rollout)]
    mini_batch = job.config.algorithm.mini_batch_size
    partition = data_parallel_partition(costs, mini_batch, job.dp_size, job.config.parallel.balance_data)
    return partition, cost_imbalance(costs, partition, mini_batch)


def _token_metrics(job: Job, step_rollout, rows, batch, old_logprobs, rollout_logprobs, entropy) -> dict[str, float]:
    """Per-token means over the whole step; the engine-vs-actor log-prob gap per engine, the worst reported."""
    mask, batch_advantages = batch["loss_mask"], batch["advantages"]
    engines = job.placement.num_engines
    engine_of_row = [step_rollout.summaries[step_rollout.kept[row // job.config.rollout.n]].engine for row in rows]
    one_hot = torch.nn.functional.one_hot(torch.tensor(engine_of_row, device=mask.device), engines).to(mask.dtype)
    gap = ((old_logprobs - rollout_logprobs).abs() * mask).sum(dim=1)
    per_engine = _replica_sums(torch.stack([one_hot.t() @ gap, one_hot.t() @ mask.sum(dim=1)]))
    zero_advantage = (batch_advantages == 0).to(mask.dtype) * mask
    totals = _replica_sums(torch.stack([
        (entropy * mask).sum(), (old_logprobs.exp() * mask).sum(), zero_advantage.sum(), mask.sum()
    ]))
    tokens = totals[3].clamp(min=1)
    return {
        "rollout/train_logprob_abs_diff": (per_engine[0] / per_engine[1].clamp(min=1)).max().item(),
        "entropy/trained_mean": (totals[0] / tokens).item(),  # over the loss mask; entropy/mean: every response
        "prob/mean": (totals[1] / tokens).item(),
        "sampling/zero_adv_token_frac": (totals[2] / tokens).item(),  # trained tokens without a learning signal
    }


def train_step(job: Job, step: int) -> dict[str, float]:
    """One DAPO step; its metrics (collective)."""
    alg, ro, actor = job.config.algorithm, job.config.rollout, job.actor
    metrics: dict[str, float] = {}
    with timed(metrics, "step"):
        with timed(metrics, "generate"):
            step_rollout = job.rollout.generate_step(job.train_records, job.sampler, step)
            job.release_engine()
            actor.onload()
        metrics.update(step_rollout.metrics)
        metrics["data/dropped_long_prompts"] = float(job.dropped_long_prompts)
        dump_interval = job.config.logging.rollout_dump_interval
        if dump_interval > 0 and step % dump_interval == 0:
            job.dump_rollouts(step, step_rollout)
        partition, metrics["perf/dp_cost_imbalance"] = _step_partition(job, step_rollout)
        rows = partition[parallel_state.get_data_parallel_rank()]
        samples = job.rollout.local_training_samples(step_rollout, partition)
        batch = to_device(build_training_batch(samples, job.tokenizer.pad_token_id, alg.overlong_filtering), actor.device)
        rollout_logprobs, mask = batch.pop("rollout_logprobs"), batch["loss_mask"]
        with timed(metrics, "old_logprob"):
            old_logprobs, entropy = actor.compute_logprobs(batch, ro.temperature)
            metrics.update(actor.routing_metrics)
            if alg.kl_coef > 0:
                batch["ref_logprobs"], _ = actor.compute_logprobs(batch, ro.temperature, use_reference=True)
        batch["old_logprobs"] = old_logprobs
        if alg.tis_cap is not None:
            batch["rollout_is_weights"] = truncated_is_weights(old_logprobs, rollout_logprobs, alg.tis_cap)
        metrics.update(_token_metrics(job, step_rollout, rows, batch, old_logprobs, rollout_logprobs, entropy))
        with timed(metrics, "train"):
            updates = [
                actor.train_step(mini_batch)
                for _ in range(alg.ppo_epochs)
                for mini_batch in split_batch(batch, alg.mini_batch_size // job.dp_size)
            ]
        metrics.update(_update_metrics(updates))
        with timed(metrics, "sync"):
            job.sync_weights()
    return metrics


def _metrics_logger(config: DapoConfig, resumed_after: int | None) -> MetricsLogger:
    logging = config.logging
    return MetricsLogger(
        config.trainer.output_dir, logging.tensorboard, resumed_after,
        wandb_project=logging.wandb_project if logging.wandb else None, wandb_run_name=logging.wandb_run_name,
        run_config=config_to_dict(config),
    )


def _close_logging(logger: MetricsLogger | None, output_dir: str) -> None:
    """Rank 0: close the metric sinks and draw ``output_dir/report.png`` once any step has been logged."""
    if logger is not None:
        logger.close()
        if logger.path.is_file() and logger.path.stat().st_size > 0:
            write_report(output_dir)


def _stall_watchdog(config: DapoConfig) -> StallWatchdog | None:
    """This rank's watchdog (``trainer.stall_timeout_s``; none when 0), heartbeating into ``output_dir``."""
    trainer = config.trainer
    if trainer.stall_timeout_s <= 0:
        return None
    folder = Path(trainer.output_dir) / "heartbeats"
    return StallWatchdog(trainer.stall_timeout_s, folder, dist.get_rank(), dist.get_world_size())


def _finish(watchdog: StallWatchdog | None, logger: MetricsLogger | None, output_dir: str) -> None:
    """The end of a run, finished or stopped: no stall can happen any more; the logs closed; no process group."""
    if watchdog is not None:
        watchdog.close()
    _close_logging(logger, output_dir)
    destroy_distributed()


def train(config: DapoConfig) -> tuple[float | None, float | None]:
    """Run DAPO as configured; returns held-out avg@``rollout.val_n`` ``(before, after)`` over all validation
    problems (None without validation data).

    Everything that can be checked before work starts is: the config against the world size, the model
    against the parallel layout. Evaluations are logged at step 0 (before the first step, in a row of their own)
    and in the rows of the steps they follow; a resumed run evaluates its restored policy for ``before`` without
    logging it again.
    """
    initialize_process_group(config.trainer.distributed_timeout_minutes)
    config.validate(dist.get_world_size(), int(os.environ.get("LOCAL_WORLD_SIZE", dist.get_world_size())))
    check_model_fits_layout(config)
    # the folder's owner is decided before anything is written there (rank 0 decides, every rank follows)
    lock = run_on_rank_zero(lambda: OutputLock(config.trainer.output_dir), share_result=False)
    try:
        run_on_rank_zero(lambda: claim_output_dir(config.trainer, checkpoint_dir(config), model_hf_config(config)))
        return _train(config)
    finally:
        if lock is not None:
            lock.release()


def _train(config: DapoConfig) -> tuple[float | None, float | None]:
    par = config.parallel
    initialize_model_parallel(
        par.tensor_model_parallel_size, par.pipeline_model_parallel_size, config.trainer.seed,
        par.virtual_pipeline_model_parallel_size, config.trainer.distributed_timeout_minutes,
        par.expert_model_parallel_size, par.expert_tensor_parallel_size,
    )
    torch.manual_seed(config.trainer.seed)
    stop_requests = StopRequests()
    _stop_again_before_loading(config, stop_requests)
    job = Job(config, stop_requests)
    first_step = job.restore()
    stop_requests.stop_if_any_rank("model loading", job.actor.device)  # nothing to checkpoint yet
    stop_requests.steps_begin()  # from here a signal stops at a step boundary, with a checkpoint
    watchdog = _stall_watchdog(config)
    resumed = first_step > 1
    # written once the checkpoint is restored: a refused resume leaves the earlier run's config.yaml as it was
    run_on_rank_zero(lambda: write_run_config(config))
    # rank 0 logs; a sink that cannot start (W&B without credentials) stops every rank with its error
    logger = run_on_rank_zero(lambda: _metrics_logger(config, first_step - 1 if resumed else None), share_result=False)
    before = latest = None
    if job.val_records:
        metrics: dict[str, float] = {}
        before = latest = job.evaluate(metrics)
        if logger is not None and not resumed:
            logger.log(0, metrics)
    steps = range(first_step, config.trainer.max_steps + 1)
    progress = tqdm(steps, desc="DAPO", disable=not (is_rank_zero() and config.logging.progress_bar))
    for step in progress:
        if watchdog is not None:
            watchdog.progress(step)
        metrics = train_step(job, step)
        if job.evaluates_after(step):
            latest = job.evaluate(metrics)
        if logger is not None:
            logger.log(step, metrics)
            progress.set_postfix(acc=f"{metrics['acc/mean']:.3f}", loss=f"{metrics['actor/pg_loss']:.4f}")
        saved = job.save_at(step)
        stop_reason = stop_requests.agreed(job.actor.device)
        if stop_reason is not None and step < config.trainer.max_steps:
            if not saved:
                job.save(step)
            _finish(watchdog, logger, config.trainer.output_dir)
            raise Preempted(step, stop_reason)
    if config.trainer.export_hf:
        job.export_hf(Path(config.trainer.output_dir) / "hf_final")
    _finish(watchdog, logger, config.trainer.output_dir)
    if before is None:
        return None, None
    return before.avg, latest.avg
