"""The glue between engines and trainer: dynamic sampling across engines (streaming and rounds), groups kept in
draw order whatever order they complete in, prompts given back, filtering on raw accuracy, starvation, samples
delivered to the data-parallel ranks that train them, the training tensors built from them, and evaluations that
leave training sampling alone.

``ScriptedEngine`` is a deterministic ``RolloutEngine`` written for these tests (not a mock of the code under
test): it answers each prompt with the responses a script gives for it, and can complete groups one per
``collect``, each submission's last group first, like an engine whose later requests finish first.
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from transformers import Qwen2ForCausalLM

from megatron_dapo.batch import (
    build_training_batch, cost_imbalance, data_parallel_partition, data_parallel_rows, sample_cost, training_samples,
)
from megatron_dapo.config import AlgorithmConfig, RolloutConfig, ToyModelConfig
from megatron_dapo.data import PromptRecord, PromptSampler
from megatron_dapo.reward import RewardScorer
from megatron_dapo.rollout.base import TRAIN_DRAW, GroupRequest, RolloutEngine, group_seed
from megatron_dapo.rollout.collect import DynamicSamplingError, GroupSummary, JobRollout, encode_prompt, training_cutoff
from megatron_dapo.rollout.dump import rollout_dump_rows
from megatron_dapo.rollout.factory import EnginePlacement
from megatron_dapo.rollout.hf_engine import HFRolloutEngine
from megatron_dapo.samples import Group, RolloutSample
from megatron_dapo.toy import build_toy_tokenizer, toy_hf_config

TOKENIZER = build_toy_tokenizer()


class ScriptedEngine(RolloutEngine):
    """Answers prompt ``p`` with ``script[p]``; ``one_at_a_time`` completes one group per ``collect``: from the
    oldest submission still running, its last group."""

    weight_dtype = torch.float32

    def __init__(self, script: dict[str, list[str]], one_at_a_time: bool = False) -> None:
        self.script, self.one_at_a_time = script, one_at_a_time
        self.submissions: list[list[GroupRequest]] = []
        self.completion_order: list[int] = []

    def submit(self, requests):
        if requests:
            self.submissions.append(list(requests))

    def collect(self):
        if self.one_at_a_time:
            done = [self.submissions[0].pop()]
            self.submissions = [batch for batch in self.submissions if batch]
        else:
            done, self.submissions = [r for batch in self.submissions for r in batch], []
        results = {}
        for request in done:
            answers = self.script[TOKENIZER.decode(request.prompt_ids)][: request.n]
            results[request.key] = [self._sample(request, answer) for answer in answers]
            self.completion_order.append(request.key)
        return results

    @staticmethod
    def _sample(request, answer):
        tokens = TOKENIZER.encode(answer) + [TOKENIZER.eos_token_id]
        reason = "stop" if len(tokens) <= request.max_new_tokens else "length"
        tokens = tokens[: request.max_new_tokens]
        return RolloutSample(request.key, tokens, [-0.1 * (i + 1) for i in range(len(tokens))], reason)

    def abort(self):
        aborted, self.submissions = sum(map(len, self.submissions)), []
        return aborted

    def update_weights(self, buckets):
        raise AssertionError("not used")

    def release_memory(self):
        pass

    def resume_memory(self, tags=()):
        pass


def _records(*prompts_and_answers):
    return [PromptRecord([{"role": "user", "content": p}], a, "test") for p, a in prompts_and_answers]


def _text(prompt_ids):
    return TOKENIZER.decode(prompt_ids)


@pytest.fixture
def world_of_one(tmp_path):
    """A one-process gloo job (the rollout's summaries travel by collectives)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    yield
    if created:
        dist.destroy_process_group()


def _rollout(engine, algorithm, rollout=None, world_size=1):
    rollout = rollout or RolloutConfig(n=2, max_response_length=12, groups_in_flight=4)
    return JobRollout(engine, EnginePlacement(1, world_size), TOKENIZER, rollout, algorithm, RewardScorer(), seed=1,
                      data_parallel_rank_of=list(range(world_size)))


MIXED = {"1+1=": ["Answer: 2", "Answer: 3"], "2+2=": ["Answer: 4", "Answer: 5"], "3+3=": ["Answer: 6", "Answer: 7"],
         "4+4=": ["Answer: 8", "Answer: 1"], "5+5=": ["Answer: 10", "Answer: 2"], "6+6=": ["Answer: 12", "Answer: 3"]}
SIX = _records(("1+1=", "2"), ("2+2=", "4"), ("3+3=", "6"), ("4+4=", "8"), ("5+5=", "10"), ("6+6=", "12"))


def _summary(position, acc):
    return GroupSummary(position, 0, acc, [1.0 if a else -1.0 for a in acc], [3] * len(acc), 0, 0, 0, 5, 1.0)


def test_training_cutoff_waits_for_every_earlier_group():
    summaries = {1: _summary(1, [1, 0]), 2: _summary(2, [1, 0]), 3: _summary(3, [1, 1])}
    assert training_cutoff(summaries, 5, needed=2, dynamic_sampling=True) is None  # position 0 still running
    summaries[0] = _summary(0, [0, 0])  # it completes, and is filtered out
    assert training_cutoff(summaries, 5, needed=2, dynamic_sampling=True) == 2
    assert training_cutoff(summaries, 5, needed=2, dynamic_sampling=False) == 1
    assert training_cutoff(summaries, 4, needed=3, dynamic_sampling=True) is None  # not enough yet


def test_streaming_keeps_groups_in_draw_order_and_gives_back_the_rest(world_of_one):
    """Groups complete last-drawn first; the kept ones are still the first qualifying in draw order, and the
    prompts drawn after the last kept one (completed or not) come first again next step."""
    engine = ScriptedEngine(MIXED, one_at_a_time=True)
    sampler = PromptSampler(len(SIX), seed=0)
    order = PromptSampler(len(SIX), seed=0).next_indices(6)
    rollout = _rollout(engine, AlgorithmConfig(train_batch_size=2, gen_batch_size=2, max_num_gen_batches=0,
                                               overlong_buffer_enable=False))
    step = rollout.generate_step(SIX, sampler, step=1)
    assert step.kept == [0, 1]
    assert [_text(step.groups[p].prompt_ids) for p in step.kept] == [SIX[order[0]].messages[0]["content"],
                                                                       SIX[order[1]].messages[0]["content"]]
    assert engine.completion_order[:4] == [3, 2, 1, 0]  # completion order was the reverse of draw order
    returned = list(sampler.returned)  # drawn after the last kept one (completed or not): given back, in order
    assert len(returned) >= 2 and returned == PromptSampler(len(SIX), seed=0).next_indices(2 + len(returned))[2:]
    assert sampler.next_indices(len(returned)) == returned
    metrics = step.metrics
    assert metrics["sampling/generated_groups"] == 4 and metrics["sampling/kept_group_frac"] == 1.0
    assert metrics["acc/mean"] == 0.5  # over the used groups only (positions 0 and 1)
    # entropy/mean covers the responses of the groups drawn up to the cutoff (not those generated past it): the
    # script's log-probs are −0.1·(i+1), and an engine that reports no entropy is measured by −Σ log π of its tokens
    lengths = [len(TOKENIZER.encode(answer)) + 1 for p in (0, 1) for answer in MIXED[SIX[order[p]].messages[0]["content"]]]
    assert metrics["entropy/mean"] == pytest.approx(sum(0.1 * n * (n + 1) / 2 for n in lengths) / sum(lengths))


def test_rounds_use_up_everything_drawn(world_of_one):
    engine = ScriptedEngine(MIXED)
    sampler = PromptSampler(len(SIX), seed=0)
    rollout = _rollout(engine, AlgorithmConfig(train_batch_size=2, gen_batch_size=3, max_num_gen_batches=0,
                                               overlong_buffer_enable=False),
                       RolloutConfig(n=2, max_response_length=12, sampling_mode="rounds"))
    step = rollout.generate_step(SIX, sampler, step=1)
    assert step.kept == [0, 1] and sampler.returned == [] and sampler.cursor == 3
    assert step.metrics["sampling/num_gen_batches"] == 1.0 and step.metrics["sampling/generated_groups"] == 3


def test_filtering_uses_raw_accuracy_not_the_shaped_reward(world_of_one):
    """An all-correct group whose overlong penalty spreads its rewards is still dropped (docs/pitfalls.md, 4)."""
    records = _records(("1+1=", "2"), ("2+2=", "4"))
    script = {"1+1=": ["Answer: 2", "Answer:2"], "2+2=": ["Answer: 4", "Answer: 3"]}  # 10 and 9 tokens: on the ramp
    rollout = _rollout(ScriptedEngine(script), AlgorithmConfig(train_batch_size=1, gen_batch_size=2, max_num_gen_batches=0,
                                                                overlong_buffer_len=6))
    step = rollout.generate_step(records, PromptSampler(2, 0), step=1)
    kept = step.groups[step.kept[0]]
    assert _text(kept.prompt_ids) == "2+2=" and kept.acc == [1.0, 0.0]
    dropped = next(s for s in step.summaries.values() if s.acc == [1.0, 1.0])
    assert dropped.rewards == pytest.approx([1 - 4 / 6, 1 - 3 / 6])  # shaped rewards differ, still dropped


def test_starvation_is_a_clear_error_with_the_template_hint(world_of_one):
    records = _records(("1+1=", "2"))
    rollout = _rollout(ScriptedEngine({"1+1=": ["no answer here", "none"]}),
                       AlgorithmConfig(gen_batch_size=1, train_batch_size=1, max_num_gen_batches=3, overlong_buffer_enable=False))
    with pytest.raises(DynamicSamplingError, match="max_num_gen_batches=3.*Answer: <value>"):
        rollout.generate_step(records, PromptSampler(1, 0), step=1)


def test_training_batch_labels_masks_and_overlong_filtering():
    prompt = encode_prompt(TOKENIZER, _records(("12+3=", "15"))[0])
    finished = RolloutSample(0, [7, 8, 9, TOKENIZER.eos_token_id], [-0.1, -0.2, -0.3, -0.4], "stop")
    truncated = RolloutSample(0, [5, 6], [-1.0, -2.0], "length")
    samples = training_samples(Group(prompt, [finished, truncated], acc=[1.0, 0.0], rewards=[1.0, -1.0]))
    batch = build_training_batch(samples, TOKENIZER.pad_token_id, overlong_filtering=False)
    p = len(prompt)
    ids, labels, mask = batch["input_ids"], batch["labels"], batch["loss_mask"]
    assert ids.shape == (2, p + 4)
    assert ids[0].tolist() == prompt + [7, 8, 9, TOKENIZER.eos_token_id]
    assert torch.equal(labels[:, :-1], ids[:, 1:])  # position t predicts token t+1
    assert mask[0].nonzero().flatten().tolist() == [p - 1, p, p + 1, p + 2]
    assert labels[0, p - 1 : p + 3].tolist() == [7, 8, 9, TOKENIZER.eos_token_id]
    assert mask[1].nonzero().flatten().tolist() == [p - 1, p]
    assert batch["rollout_logprobs"][0, p - 1 : p + 3].tolist() == pytest.approx([-0.1, -0.2, -0.3, -0.4])
    std = torch.tensor([1.0, -1.0]).std().item()  # (R − mean) / (std + eps), the same for every token
    assert batch["advantages"][0].unique().item() == pytest.approx(1.0 / (std + 1e-6), rel=1e-5)
    assert batch["advantages"][1].unique().item() == pytest.approx(-1.0 / (std + 1e-6), rel=1e-5)
    filtered = build_training_batch(samples, TOKENIZER.pad_token_id, overlong_filtering=True)
    assert torch.equal(filtered["loss_mask"][0], mask[0]) and filtered["loss_mask"][1].sum() == 0


def test_data_parallel_rows_are_each_replicas_share_of_every_mini_batch():
    assert data_parallel_rows(8, 4, 2, 0) == [0, 1, 4, 5] and data_parallel_rows(8, 4, 2, 1) == [2, 3, 6, 7]
    assert sorted(data_parallel_rows(12, 6, 3, 0) + data_parallel_rows(12, 6, 3, 1) + data_parallel_rows(12, 6, 3, 2)) == list(range(12))


def _two_engines(rank: int, init_file: str, out: dict, continuous: bool) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    engine = ScriptedEngine(MIXED, one_at_a_time=rank == 1)
    algorithm = AlgorithmConfig(train_batch_size=4, gen_batch_size=4, max_num_gen_batches=0, mini_batch_size=4,
                                overlong_buffer_enable=False)
    rollout = _rollout(engine, algorithm, RolloutConfig(n=2, max_response_length=12, groups_in_flight=4,
                                                        continuous_feeding=continuous), world_size=2)
    sampler = PromptSampler(len(SIX), 0)
    step = rollout.generate_step(SIX, sampler, step=1)
    lengths = rollout.sample_lengths(step)
    partition = data_parallel_partition([sample_cost(length, 32) for length in lengths], 4, 2, balance=True)
    samples = rollout.local_training_samples(step, partition)
    responses = rollout.kept_responses(step)
    dump = rollout_dump_rows(1, step, responses, TOKENIZER) if rank == 0 else responses
    out[rank] = (step.kept, sorted(step.groups), [(_text(s.prompt_ids), s.token_ids, s.advantage) for s in samples], dump,
                 lengths, partition, [len(s.prompt_ids) + len(s.token_ids) for s in samples],
                 sampler.next_indices(2))
    dist.destroy_process_group()


@pytest.mark.parametrize("continuous", [False, True], ids=["ticks", "continuous"])
def test_two_engines_share_the_step_and_each_replica_gets_its_rows(tmp_path, continuous):
    """Two engines (one per process): the same kept groups as one engine would keep, each engine holding the
    groups it generated, and each data-parallel rank receiving exactly its rows of the balanced partition, from
    whichever engine has them. Both feeding protocols; continuously fed, which engine claims which position
    depends on timing, but the decision and the sampler's next draws do not."""
    out = mp.Manager().dict()
    mp.spawn(_two_engines, args=(str(tmp_path / "rendezvous"), out, continuous), nprocs=2, join=True)
    kept, held_0, rows_0, dump, lengths, partition, _, next_draws = out[0]
    order = PromptSampler(len(SIX), seed=0).next_indices(6)
    assert next_draws == out[1][7] == order[4:6]  # positions 4 and 5, drawn but not kept, come first again
    assert out[1][4] == lengths and out[1][5] == partition  # every rank computes the same partition
    for rank in (0, 1):  # the lengths the partition balanced are the samples' prompt + response tokens
        assert out[rank][6] == [lengths[row] for row in partition[rank]]
    assert kept == out[1][0] == [0, 1, 2, 3]
    assert set(held_0) | set(out[1][1]) == {0, 1, 2, 3} and not set(held_0) & set(out[1][1])
    if not continuous:
        assert held_0 and out[1][1]  # both engines generated kept groups
    expected = []  # group-major rows of the kept groups, from the script
    for position in kept:
        prompt = SIX[order[position]].messages[0]["content"]
        expected += [(prompt, TOKENIZER.encode(answer) + [TOKENIZER.eos_token_id]) for answer in MIXED[prompt]]
    for rank, rows in ((0, rows_0), (1, out[1][2])):
        assert [(p, t) for p, t, _ in rows] == [expected[r] for r in partition[rank]]
        assert all(abs(a) > 0.5 for _, _, a in rows)  # mixed groups: non-zero advantages
    # the rollout dump: rank 0 has every kept sample's text, from both engines; rank 1 received nothing
    assert out[1][3] == {}
    answers = {record.messages[0]["content"]: record.ground_truth for record in SIX}
    expected_dump = []
    for group, (prompt, _) in enumerate(expected[::2]):  # each kept group's first row
        for sample, answer in enumerate(MIXED[prompt]):
            correct = answer == f"Answer: {answers[prompt]}"
            expected_dump.append({
                "step": 1, "group": group, "sample": sample, "prompt": prompt, "response": answer,
                "ground_truth": answers[prompt], "data_source": "test", "reward": 1.0 if correct else -1.0,
                "acc": correct, "length": len(TOKENIZER.encode(answer)) + 1, "finish_reason": "stop",
            })
    assert [{k: v for k, v in row.items() if k != "advantage"} for row in dump] == expected_dump
    trained = {row: sample for rank in (0, 1) for row, sample in zip(partition[rank], out[rank][2])}
    assert [row["advantage"] for row in dump] == pytest.approx([trained[row][2] for row in range(8)])


class RecordingEngine(HFRolloutEngine):
    """The CPU engine over a random toy model, keeping every request it was given."""

    def __init__(self) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = Qwen2ForCausalLM(toy_hf_config(ToyModelConfig(hidden_size=32, intermediate_size=64), TOKENIZER))
        super().__init__(model, TOKENIZER.pad_token_id, TOKENIZER.eos_token_id)
        self.requests: list[GroupRequest] = []

    def submit(self, requests):
        self.requests += requests
        super().submit(requests)


def _sampling_rollout(engine: RolloutEngine) -> JobRollout:
    return _rollout(engine, AlgorithmConfig(dynamic_sampling=False, train_batch_size=2, gen_batch_size=2,
                                            overlong_buffer_enable=False),
                    RolloutConfig(n=2, max_response_length=6, val_n=3))


def _step_two_samples(evaluate_between: bool) -> list[list[int]]:
    """Step 2's sampled tokens, with or without an evaluation after step 1."""
    rollout = _sampling_rollout(RecordingEngine())
    sampler = PromptSampler(len(SIX), seed=0)
    rollout.generate_step(SIX, sampler, step=1)
    if evaluate_between:
        rollout.evaluate(SIX[:3])
    step = rollout.generate_step(SIX, sampler, step=2)
    return [s.token_ids for p in step.kept for s in step.groups[p].samples]


def test_an_evaluation_leaves_the_training_samples_and_itself_unchanged(world_of_one):
    """Evaluation draws from no state that training sampling uses (each group has its own seed), and every
    evaluation samples problem i with the same seed, whatever the step: evaluations of the same weights agree."""
    with_eval = _step_two_samples(evaluate_between=True)
    assert with_eval == _step_two_samples(evaluate_between=False)
    assert len({tuple(tokens) for tokens in with_eval}) > 1  # really sampled
    engine = RecordingEngine()
    rollout = _sampling_rollout(engine)
    rollout.evaluate(SIX[:3])
    evaluation = [(r.key, r.seed, r.n) for r in engine.requests]
    assert [(key, n) for key, _, n in evaluation] == [(0, 3), (1, 3), (2, 3)]
    training_seeds = {group_seed(1, TRAIN_DRAW, step, position) for step in (1, 5) for position in range(6)}
    assert not {seed for _, seed, _ in evaluation} & training_seeds
    rollout.generate_step(SIX, PromptSampler(len(SIX), seed=0), step=5)
    engine.requests.clear()
    rollout.evaluate(SIX[:3])
    assert [(r.key, r.seed, r.n) for r in engine.requests] == evaluation


def test_balanced_partition_evens_the_cost_keeps_counts_and_is_deterministic():
    costs = [100.0, 90.0, 1.0, 1.0, 1.0, 2.0, 3.0, 2.0] + [5.0] * 8  # two mini-batches of 8
    partition = data_parallel_partition(costs, 8, 2, balance=True)
    assert partition == data_parallel_partition(list(costs), 8, 2, balance=True)
    assert sorted(partition[0] + partition[1]) == list(range(16))
    for rows in partition:  # 4 rows of each mini-batch per rank, mini-batch by mini-batch
        assert [row // 8 for row in rows] == [0] * 4 + [1] * 4
    first = [sum(costs[r] for r in rows[:4]) for rows in partition]
    assert sorted(first) == [97.0, 103.0]  # LPT by hand: 100 | 90, then 3, 2, 2, 1, 1, 1 to the lighter side
    consecutive = data_parallel_partition(costs, 8, 2, balance=False)
    assert consecutive == [data_parallel_rows(16, 8, 2, rank) for rank in (0, 1)]
    assert cost_imbalance(costs, consecutive, 8) == pytest.approx((192 + 20) / (100 + 20))
    assert cost_imbalance(costs, partition, 8) == pytest.approx((103 + 20) / (100 + 20))


def test_sample_cost_adds_attention_quadratically():
    assert sample_cost(120, 10) == pytest.approx(120 * 2)  # length = 12 h: attention doubles the cost
    assert sample_cost(1, 4096) == pytest.approx(1.0, rel=1e-4)


def test_the_cpu_engine_gives_a_batch_up_when_asked_and_keeps_it_for_abort():
    """Continuous feeding: a host still generating when the step is decided gives its batch up (asking every
    20 ms); unasked, the watch changes nothing (the same samples as without it)."""
    engine = RecordingEngine()
    requests = [GroupRequest(key, TOKENIZER.encode("1+1="), 2, seed=key, temperature=1.0, top_p=1.0, max_new_tokens=40)
                for key in range(2)]
    engine.submit(requests)
    expected = engine.collect()
    engine.watch_for_abort(lambda: False)
    engine.submit(requests)
    assert {k: [s.token_ids for s in v] for k, v in engine.collect().items()} == {
        k: [s.token_ids for s in v] for k, v in expected.items()}
    asked = []
    engine.watch_for_abort(lambda: asked.append(1) or True)
    engine.submit(requests)
    assert engine.collect() == {} and len(asked) == 1  # asked at the first token, and given up
    assert engine.abort() == 2  # still queued: abort drops them


def test_the_cpu_engine_reports_the_exact_entropy_of_its_sampling_distribution():
    """``entropy_sum`` of each sample equals Σ_t H(softmax(logits_t / T)) from a plain forward of the same model
    over prompt + response (prompts of two lengths: the engine pads on the left)."""
    engine = RecordingEngine()
    prompts = [TOKENIZER.encode("1+1="), TOKENIZER.encode("12+34+5=")]
    requests = [GroupRequest(key, prompt, 2, seed=key, temperature=0.7, top_p=1.0, max_new_tokens=8)
                for key, prompt in enumerate(prompts)]
    for key, samples in engine.generate(requests).items():
        prompt = prompts[key]
        for sample in samples:
            with torch.no_grad():
                logits = engine.model(torch.tensor([prompt + sample.token_ids])).logits[0].float()
            steps = logits[len(prompt) - 1 : len(prompt) - 1 + len(sample.token_ids)] / 0.7
            probs = steps.softmax(dim=-1)
            expected = -(probs * probs.log()).nan_to_num().sum().item()
            assert sample.entropy_sum == pytest.approx(expected, rel=1e-4)
            assert sample.entropy_total() == sample.entropy_sum
