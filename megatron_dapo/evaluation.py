"""Held-out evaluation: mean accuracy over k samples per problem (avg@k) and the unbiased pass@k."""

from __future__ import annotations

from math import comb

from transformers import PreTrainedTokenizerBase

from megatron_dapo.data import PromptRecord
from megatron_dapo.reward import compute_score
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.rollout.collect import encode_prompt


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 − C(n−c, k) / C(n, k)`` (pitfall 18)."""
    if num_samples - num_correct < k:
        return 1.0
    return 1.0 - comb(num_samples - num_correct, k) / comb(num_samples, k)


def evaluate_avg_at_k(
    engine: RolloutEngine,
    records: list[PromptRecord],
    tokenizer: PreTrainedTokenizerBase,
    k: int,
    temperature: float,
    top_p: float,
    max_new_tokens: int,
) -> float:
    """avg@k: the mean correctness of ``k`` samples for each problem, averaged over problems."""
    prompts = [encode_prompt(tokenizer, r) for r in records]
    samples = engine.generate(prompts, k, temperature, top_p, max_new_tokens)
    texts = tokenizer.batch_decode([s.token_ids for s in samples], skip_special_tokens=True)
    correct = [compute_score(text, records[s.prompt_index].ground_truth)["acc"] for s, text in zip(samples, texts)]
    return sum(correct) / len(correct)
