"""Generation rounds with scoring and DAPO's dynamic sampling, until a training batch of groups is full."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import PreTrainedTokenizerBase

from megatron_dapo.algorithm import dynamic_sampling_keep, overlong_penalty
from megatron_dapo.config import AlgorithmConfig, RolloutConfig
from megatron_dapo.data import PromptRecord, PromptSampler
from megatron_dapo.errors import UserError
from megatron_dapo.reward import compute_score
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.samples import Group, RolloutSample


class DynamicSamplingError(UserError, RuntimeError):
    """Too few groups with reward spread after the allowed number of generation rounds."""


@dataclass
class RoundStats:
    """Statistics over every sample generated for one training step (kept or not)."""

    num_gen_batches: int = 0
    num_groups: int = 0
    num_kept_groups: int = 0
    acc: list[float] = field(default_factory=list)
    rewards: list[float] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    truncated: list[bool] = field(default_factory=list)
    no_answer: int = 0
    reward_timeouts: int = 0

    def metrics(self) -> dict[str, float]:
        n = max(len(self.acc), 1)
        return {
            "acc/mean": sum(self.acc) / n,
            "reward/mean": sum(self.rewards) / n,
            "reward/no_answer_frac": self.no_answer / n,
            "reward/timeouts": float(self.reward_timeouts),
            "response_length/mean": sum(self.lengths) / n,
            "response_length/max": float(max(self.lengths, default=0)),
            "response_length/clip_ratio": sum(self.truncated) / n,
            "sampling/num_gen_batches": float(self.num_gen_batches),
            "sampling/kept_group_frac": self.num_kept_groups / max(self.num_groups, 1),
        }


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: PromptRecord) -> list[int]:
    """Prompt token ids through the tokenizer's chat template (with the generation prompt)."""
    text = tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def score_groups(
    samples: list[RolloutSample],
    prompts: list[list[int]],
    records: list[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    rollout: RolloutConfig,
    algorithm: AlgorithmConfig,
    stats: RoundStats,
) -> list[Group]:
    """Score ``n`` samples per prompt (prompt-major) into groups, updating ``stats``."""
    n = rollout.n
    groups = []
    for g, (prompt_ids, record) in enumerate(zip(prompts, records)):
        group_samples = samples[g * n : (g + 1) * n]
        texts = tokenizer.batch_decode([s.token_ids for s in group_samples], skip_special_tokens=True)
        scores = [compute_score(text, record.ground_truth) for text in texts]
        lengths = [len(s.token_ids) for s in group_samples]
        rewards = torch.tensor([s["score"] for s in scores])
        if algorithm.overlong_buffer_enable:
            rewards = rewards + overlong_penalty(
                lengths, rollout.max_response_length, algorithm.overlong_buffer_len, algorithm.overlong_penalty_factor
            )
        acc = [float(s["acc"]) for s in scores]
        groups.append(Group(prompt_ids, group_samples, acc, rewards.tolist()))
        stats.acc += acc
        stats.rewards += rewards.tolist()
        stats.lengths += lengths
        stats.truncated += [s.finish_reason == "length" for s in group_samples]
        stats.no_answer += sum(s["pred"] is None for s in scores)
        stats.reward_timeouts += sum(s["timed_out"] for s in scores)
    return groups


def collect_training_groups(
    engine: RolloutEngine,
    records: list[PromptRecord],
    sampler: PromptSampler,
    tokenizer: PreTrainedTokenizerBase,
    rollout: RolloutConfig,
    algorithm: AlgorithmConfig,
) -> tuple[list[Group], RoundStats]:
    """Generate rounds of ``gen_batch_size`` prompts × ``n`` samples until ``train_batch_size`` groups are kept.

    With dynamic sampling, groups whose raw accuracy is 0 or 1 are dropped (zero advantage, zero gradient).
    More than ``max_num_gen_batches`` rounds (when > 0) raises ``DynamicSamplingError``.
    """
    stats = RoundStats()
    kept: list[Group] = []
    while len(kept) < algorithm.train_batch_size:
        if 0 < algorithm.max_num_gen_batches <= stats.num_gen_batches:
            hint = (
                " No response contained an extractable answer: check the prompt template asks for 'Answer: <value>'."
                if stats.no_answer == len(stats.acc)
                else ""
            )
            raise DynamicSamplingError(
                f"dynamic sampling kept {len(kept)} of algorithm.train_batch_size={algorithm.train_batch_size} groups "
                f"after algorithm.max_num_gen_batches={algorithm.max_num_gen_batches} generation rounds "
                f"(accuracy {sum(stats.acc) / max(len(stats.acc), 1):.3f}); raise max_num_gen_batches "
                f"(<= 0 is unbounded) or use easier prompts.{hint}"
            )
        batch_records = [records[i] for i in sampler.next_indices(algorithm.gen_batch_size)]
        prompts = [encode_prompt(tokenizer, r) for r in batch_records]
        samples = engine.generate(prompts, rollout.n, rollout.temperature, rollout.top_p, rollout.max_response_length)
        groups = score_groups(samples, prompts, batch_records, tokenizer, rollout, algorithm, stats)
        keep = (
            dynamic_sampling_keep(torch.tensor([g.acc for g in groups])).tolist()
            if algorithm.dynamic_sampling
            else [True] * len(groups)
        )
        kept += [g for g, k in zip(groups, keep) if k]
        stats.num_gen_batches += 1
        stats.num_groups += len(groups)
        stats.num_kept_groups += sum(keep)
    return kept[: algorithm.train_batch_size], stats
