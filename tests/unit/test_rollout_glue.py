"""The glue between engine and trainer: generation rounds, dynamic sampling on raw accuracy, truncation to
the training batch, overlong filtering and label alignment, with a scripted engine.

``ScriptedEngine`` is a deterministic ``RolloutEngine`` written for these tests (not a mock of the code under
test): it answers each prompt with the responses a script gives for it, as token ids of the toy tokenizer.
"""

from __future__ import annotations

import pytest
import torch

from megatron_dapo.batch import build_training_batch
from megatron_dapo.config import AlgorithmConfig, RolloutConfig
from megatron_dapo.data import PromptRecord, PromptSampler
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.rollout.collect import DynamicSamplingError, collect_training_groups, encode_prompt
from megatron_dapo.samples import Group, RolloutSample
from megatron_dapo.toy import build_toy_tokenizer

TOKENIZER = build_toy_tokenizer()


class ScriptedEngine(RolloutEngine):
    """Answers prompt ``p`` with ``script[p][i]`` for sample i; cuts at ``max_new_tokens`` ("length")."""

    weight_dtype = torch.float32

    def __init__(self, script: dict[str, list[str]]) -> None:
        self.script = script
        self.prompts_seen: list[str] = []

    def generate(self, prompt_token_ids, n, temperature, top_p, max_new_tokens):
        samples = []
        for index, ids in enumerate(prompt_token_ids):
            prompt = TOKENIZER.decode(ids)
            self.prompts_seen.append(prompt)
            for answer in self.script[prompt][:n]:
                tokens = TOKENIZER.encode(answer) + [TOKENIZER.eos_token_id]
                reason = "stop" if len(tokens) <= max_new_tokens else "length"
                tokens = tokens[:max_new_tokens]
                samples.append(RolloutSample(index, tokens, [-0.1 * (i + 1) for i in range(len(tokens))], reason))
        return samples

    def update_weights(self, buckets):
        raise AssertionError("not used")

    def release_memory(self):
        pass

    def resume_memory(self):
        pass


def _records(*prompts_and_answers):
    return [PromptRecord([{"role": "user", "content": p}], a, "test") for p, a in prompts_and_answers]


ROLLOUT = RolloutConfig(n=2, max_response_length=12)


def test_rounds_until_the_batch_is_full_and_truncated_to_it():
    records = _records(("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6"), ("4+4=", "8"))
    script = {
        "1+1=": ["Answer: 2", "Answer: 2"],  # all correct: dropped
        "2+2=": ["Answer: 4", "Answer: 5"],  # mixed: kept
        "3+3=": ["Answer: 1", "Answer: 2"],  # all wrong: dropped
        "4+4=": ["Answer: 8", "Answer: 9"],  # mixed: kept
    }
    engine = ScriptedEngine(script)
    sampler = PromptSampler(len(records), seed=0)
    order = PromptSampler(len(records), seed=0).next_indices(4)
    algorithm = AlgorithmConfig(gen_batch_size=1, train_batch_size=1, max_num_gen_batches=0, overlong_buffer_enable=False)
    groups, stats = collect_training_groups(engine, records, sampler, TOKENIZER, ROLLOUT, algorithm)
    mixed = {"2+2=", "4+4="}
    first_mixed = next(i for i, index in enumerate(order) if records[index].messages[0]["content"] in mixed)
    assert stats.num_gen_batches == first_mixed + 1  # one prompt per round, until the first mixed group
    assert len(groups) == 1 and TOKENIZER.decode(groups[0].prompt_ids) == records[order[first_mixed]].messages[0]["content"]

    engine = ScriptedEngine(script)
    algorithm = AlgorithmConfig(gen_batch_size=4, train_batch_size=1, max_num_gen_batches=0, overlong_buffer_enable=False)
    groups, stats = collect_training_groups(engine, records, PromptSampler(len(records), 0), TOKENIZER, ROLLOUT, algorithm)
    assert stats.num_gen_batches == 1 and stats.num_kept_groups == 2
    assert len(groups) == 1  # two kept, truncated to train_batch_size (the first in sampler order)
    assert TOKENIZER.decode(groups[0].prompt_ids) == records[order[first_mixed]].messages[0]["content"]


def test_filtering_uses_raw_accuracy_not_the_shaped_reward():
    """An all-correct group whose overlong penalty spreads its rewards is still dropped (docs/pitfalls.md, 4)."""
    records = _records(("1+1=", "2"), ("2+2=", "4"))
    script = {
        "1+1=": ["Answer: 2", "Answer:2"],  # both correct; 10 and 9 tokens, on the overlong ramp (6..12)
        "2+2=": ["Answer: 4", "Answer: 3"],
    }
    algorithm = AlgorithmConfig(gen_batch_size=2, train_batch_size=1, max_num_gen_batches=0, overlong_buffer_len=6)
    groups, stats = collect_training_groups(ScriptedEngine(script), records, PromptSampler(2, 0), TOKENIZER, ROLLOUT, algorithm)
    assert stats.num_kept_groups == 1
    assert TOKENIZER.decode(groups[0].prompt_ids) == "2+2="
    assert groups[0].acc == [1.0, 0.0]
    # the dropped group's shaped rewards differ: 1 − (10 − 6)/6 and 1 − (9 − 6)/6
    assert sorted(r for r in stats.rewards if r > 0) == pytest.approx(sorted([1 - 4 / 6, 1 - 3 / 6, 1 - 4 / 6]))


def test_starvation_is_a_clear_error_with_the_template_hint():
    records = _records(("1+1=", "2"))
    script = {"1+1=": ["no answer here", "none"]}
    algorithm = AlgorithmConfig(gen_batch_size=1, train_batch_size=1, max_num_gen_batches=3, overlong_buffer_enable=False)
    with pytest.raises(DynamicSamplingError, match="max_num_gen_batches=3.*Answer: <value>"):
        collect_training_groups(ScriptedEngine(script), records, PromptSampler(1, 0), TOKENIZER, ROLLOUT, algorithm)


def test_training_batch_labels_masks_and_overlong_filtering():
    prompt = encode_prompt(TOKENIZER, _records(("12+3=", "15"))[0])
    finished = RolloutSample(0, [7, 8, 9, TOKENIZER.eos_token_id], [-0.1, -0.2, -0.3, -0.4], "stop")
    truncated = RolloutSample(0, [5, 6], [-1.0, -2.0], "length")
    group = Group(prompt, [finished, truncated], acc=[1.0, 0.0], rewards=[1.0, -1.0])
    batch = build_training_batch([group], TOKENIZER.pad_token_id, overlong_filtering=False)
    p = len(prompt)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
    assert ids.shape == (2, p + 4)
    assert ids[0].tolist() == prompt + [7, 8, 9, TOKENIZER.eos_token_id]
    assert torch.equal(labels[:, :-1], ids[:, 1:])  # position t predicts token t+1
    # response tokens are the labels at positions p-1 … p-1+len-1
    assert mask[0].nonzero().flatten().tolist() == [p - 1, p, p + 1, p + 2]
    assert labels[0, p - 1 : p + 3].tolist() == [7, 8, 9, TOKENIZER.eos_token_id]
    assert mask[1].nonzero().flatten().tolist() == [p - 1, p]
    assert batch["rollout_logprobs"][0, p - 1 : p + 3].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    assert batch["rollout_logprobs"][1, p - 1 : p + 1].tolist() == pytest.approx([-1.0, -2.0])
    # advantages: (R − mean) / (std + eps), the same for every token of a sample
    std = torch.tensor([1.0, -1.0]).std()
    assert batch["advantages"][0].unique().item() == pytest.approx(1.0 / (std.item() + 1e-6), rel=1e-5)
    assert batch["advantages"][1].unique().item() == pytest.approx(-1.0 / (std.item() + 1e-6), rel=1e-5)

    filtered = build_training_batch([group], TOKENIZER.pad_token_id, overlong_filtering=True)
    assert torch.equal(filtered["loss_mask"][0], mask[0])
    assert filtered["loss_mask"][1].sum() == 0  # truncated: no token trained
