"""Held-out evaluation: mean accuracy over k samples per problem (avg@k) and the unbiased pass@k."""

from __future__ import annotations

from math import comb

from transformers import PreTrainedTokenizerBase

from megatron_dapo.config import RolloutConfig
from megatron_dapo.data import PromptRecord
from megatron_dapo.reward import compute_score
from megatron_dapo.rollout import RolloutEngine
from megatron_dapo.rollout.collect import encode_prompt


def pass_at_k(num_samples: int, num_correct: int, k: int) -> float:
    """Unbiased pass@k estimator ``1 − C(n−c, k) / C(n, k)`` (docs/pitfalls.md, 18)."""
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


def evaluate_held_out(
    engine: RolloutEngine, records: list[PromptRecord], tokenizer: PreTrainedTokenizerBase, rollout: RolloutConfig
) -> float:
    """avg@``rollout.val_n`` with the evaluation sampling settings. The engine's sampling state is put back
    afterwards: evaluating never changes the training rollouts (a resumed run evaluates at its start and
    still samples what the uninterrupted run sampled)."""
    state = engine.state_dict()
    accuracy = evaluate_avg_at_k(
        engine, records, tokenizer, rollout.val_n, rollout.val_temperature, rollout.val_top_p, rollout.max_response_length
    )
    engine.load_state_dict(state)
    return accuracy
