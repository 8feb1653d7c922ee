"""A step's rollout across every engine of the job, and delivering its samples to the ranks that train them.

Every rank takes the same decision from the same group summaries — so no rank coordinates the others and
nothing but summaries travels until the end:

- **Kept in sampler order.** The training groups are the first ``train_batch_size`` qualifying groups (raw
  accuracy strictly between 0 and 1, when ``algorithm.dynamic_sampling``) in the order the sampler drew them,
  whatever order they completed in (docs/pitfalls.md, 22). The step is decided once every group drawn before
  the last kept one has completed.
- **streaming** (``rollout.sampling_mode``): about ``rollout.groups_in_flight`` groups stay submitted across
  the engines; when the step is decided the rest is aborted, and every prompt drawn after the last kept group
  (aborted, completed too late, or never started) goes back to the front of the sampler.
- **rounds**: ``algorithm.gen_batch_size`` prompts at a time, all completed before deciding; everything drawn is
  used up (the behaviour before streaming, kept for comparison).

Two feeding protocols. **Continuous** (streaming with ``rollout.continuous_feeding``, the default): each engine
host keeps its share of ``groups_in_flight`` submitted, claiming the next draw position from a counter in the
job's key-value store the moment a group completes, scores it where it was generated and publishes its summary
in the store; hosts read each other's summaries from it, the first to see the step decided says so there, and
one ``all_gather_object`` at the end gives every rank every summary. No host waits for another's group.
**Ticks** (rounds, or ``continuous_feeding=false``): each tick every rank plans the same new assignments from
its copy of the sampler, hosts submit theirs and wait for one of *their own* groups, then every rank learns
every new summary (one ``all_gather_object``), so an engine that finished early waits for the slowest.

A group's samples depend only on ``trainer.seed``, the step, the group's position in the draw order and the
weights (``base.group_seed``), so the decision, the kept groups and every metric but the timing-dependent
``sampling/generated_*``, ``sampling/wasted_token_frac``, ``sampling/aborted_groups`` and
``rollout/engine_idle_frac`` are the same whatever the number of engines and the protocol.
``algorithm.max_num_gen_batches`` bounds the groups drawn per step (in units of ``gen_batch_size``).

Samples then go from the engine hosts straight to the data-parallel ranks that train them, as tensors; no rank
receives the whole step's samples.
"""

from __future__ import annotations

import math
import pickle
import time
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from transformers import PreTrainedTokenizerBase

from megatron_dapo.algorithm import dynamic_sampling_keep, overlong_penalty
from megatron_dapo.batch import training_samples
from megatron_dapo.config import AlgorithmConfig, RolloutConfig
from megatron_dapo.data import PromptRecord, PromptSampler
from megatron_dapo.distributed import job_store
from megatron_dapo.errors import UserError
from megatron_dapo.reward import RewardScorer
from megatron_dapo.rollout.base import EVAL_DRAW, TRAIN_DRAW, GroupRequest, RolloutEngine, group_seed
from megatron_dapo.rollout.factory import EnginePlacement
from megatron_dapo.samples import Group, RolloutSample, TrainingSample


class DynamicSamplingError(UserError, RuntimeError):
    """Too few groups with reward spread among the groups a step may generate."""


def prompt_text(tokenizer: PreTrainedTokenizerBase, record: PromptRecord) -> str:
    """The prompt as the policy reads it: the record's messages through the tokenizer's chat template (with the
    generation prompt)."""
    return tokenizer.apply_chat_template(record.messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, record: PromptRecord) -> list[int]:
    """Prompt token ids of ``prompt_text``."""
    return tokenizer.encode(prompt_text(tokenizer, record), add_special_tokens=False)


@dataclass
class GroupSummary:
    """What every rank learns about a completed group; its samples stay on the engine's rank."""

    position: int
    engine: int
    acc: list[float]  # raw correctness: what dynamic sampling filters on (docs/pitfalls.md, 4)
    rewards: list[float]  # ±1 plus the overlong penalty: what advantages are computed from
    lengths: list[int]
    truncated: int
    no_answer: int
    timeouts: int
    prompt_length: int  # tokens: with ``lengths``, what the data-parallel partition balances
    entropy_sum: float  # summed token entropy of the responses (RolloutSample.entropy_total): entropy/mean

    def qualifies(self, dynamic_sampling: bool) -> bool:
        return not dynamic_sampling or bool(dynamic_sampling_keep(torch.tensor([self.acc]))[0])


def training_cutoff(summaries: dict[int, GroupSummary], num_drawn: int, needed: int, dynamic_sampling: bool) -> int | None:
    """The position of the ``needed``-th qualifying group in draw order once every group up to it has
    completed; ``None`` while that is not known."""
    kept = 0
    for position in range(num_drawn):
        if position not in summaries:
            return None
        kept += summaries[position].qualifies(dynamic_sampling)
        if kept == needed:
            return position
    return None


@dataclass
class StepRollout:
    """A step's rollout as every rank knows it. ``groups``: the kept groups this rank's engine generated."""

    kept: list[int]  # positions of the training groups, in draw order
    summaries: dict[int, GroupSummary]
    groups: dict[int, Group] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    records: dict[int, PromptRecord] = field(default_factory=dict)  # the kept groups' problems, by position


@dataclass
class _Generation:
    """What a feeding protocol leaves: draws by position, every rank's summaries, this host's groups, counts and
    this host's times (engine under-filled, generating, scoring)."""

    drawn: list[int] = field(default_factory=list)
    summaries: dict[int, GroupSummary] = field(default_factory=dict)
    groups: dict[int, Group] = field(default_factory=dict)
    rounds: int = 0
    aborted: int = 0
    reward_seconds: float = 0.0
    idle_seconds: float = 0.0
    seconds: float = 0.0


class _IdleClock:
    """How long an engine host had fewer groups submitted than its share: from the moment completed groups left
    its engine until it refilled it (or the generation ended), over the whole generation."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.idle, self.emptied_at = 0.0, None

    def emptied(self) -> None:
        if self.emptied_at is None:
            self.emptied_at = time.perf_counter()

    def refilled(self) -> None:
        if self.emptied_at is not None:
            self.idle += time.perf_counter() - self.emptied_at
            self.emptied_at = None

    def stop(self) -> tuple[float, float]:
        self.refilled()
        return self.idle, time.perf_counter() - self.start


class JobRollout:
    """The job's engines generating steps and evaluations (collective: every rank calls each method)."""

    def __init__(
        self,
        engine: RolloutEngine | None,
        placement: EnginePlacement,
        tokenizer: PreTrainedTokenizerBase,
        rollout: RolloutConfig,
        algorithm: AlgorithmConfig,
        scorer: RewardScorer,
        seed: int,
        data_parallel_rank_of: list[int],
    ) -> None:
        self.engine, self.placement, self.tokenizer = engine, placement, tokenizer
        self.rollout, self.algorithm, self.scorer, self.seed = rollout, algorithm, scorer, seed
        self.data_parallel_rank_of = data_parallel_rank_of  # by global rank
        self.rank = dist.get_rank()
        self.my_engine = placement.engine_of(self.rank)
        self.is_host = self.rank == placement.hosts[self.my_engine]
        self.control = dist.new_group(backend="gloo")  # host-side objects and tensors, on CPU and GPU alike
        self.generations = 0  # generate_step calls so far: names each one's keys in the job store

    # ------------------------------------------------------------------ generating a step
    def _request(self, record: PromptRecord, key: int, draw: int, step: int) -> GroupRequest:
        ro = self.rollout
        temperature, top_p, n = (ro.temperature, ro.top_p, ro.n) if draw == TRAIN_DRAW else (ro.val_temperature, ro.val_top_p, ro.val_n)
        return GroupRequest(key, encode_prompt(self.tokenizer, record), n, group_seed(self.seed, draw, step, key),
                            temperature, top_p, ro.max_response_length)

    def _score(
        self, completed: dict[int, list[RolloutSample]], records: dict[int, PromptRecord], prompts: dict[int, list[int]]
    ) -> list[tuple[Group, GroupSummary]]:
        """Score completed groups here, where they were generated (the reward pool scores them together)."""
        keys = sorted(completed)
        texts = {key: self.tokenizer.batch_decode([s.token_ids for s in completed[key]], skip_special_tokens=True) for key in keys}
        items = [(text, records[key].ground_truth, records[key].extra) for key in keys for text in texts[key]]
        scores = iter(self.scorer.score(items))
        alg, ro = self.algorithm, self.rollout
        scored = []
        for key in keys:
            samples = completed[key]
            group_scores = [next(scores) for _ in samples]
            lengths = [len(s.token_ids) for s in samples]
            rewards = torch.tensor([score["score"] for score in group_scores])
            if alg.overlong_buffer_enable:
                rewards = rewards + overlong_penalty(lengths, ro.max_response_length, alg.overlong_buffer_len, alg.overlong_penalty_factor)
            acc = [float(score["acc"]) for score in group_scores]
            summary = GroupSummary(key, self.my_engine, acc, rewards.tolist(), lengths,
                                   sum(s.finish_reason == "length" for s in samples),
                                   sum(score["pred"] is None for score in group_scores),
                                   sum(score["timed_out"] for score in group_scores), len(prompts[key]),
                                   sum(s.entropy_total() for s in samples))
            scored.append((Group(prompts[key], samples, acc, rewards.tolist()), summary))
        return scored

    def _plan(self, drawn: list[int], in_flight: list[set[int]], sampler: PromptSampler, limit: float) -> list[tuple[int, int]]:
        """New ``(position, engine)`` assignments, the same on every rank: streaming tops every engine up to its
        share of ``groups_in_flight``; rounds draw ``gen_batch_size`` prompts once nothing is in flight."""
        alg, ro = self.algorithm, self.rollout
        engines = self.placement.num_engines
        if ro.sampling_mode == "streaming":
            capacity = math.ceil((ro.groups_in_flight or alg.train_batch_size) / engines)
            room = [capacity - len(positions) for positions in in_flight]
        elif any(in_flight):
            return []
        else:
            room = [alg.gen_batch_size] * engines  # the round is spread below, one engine after the other
            limit = min(limit, len(drawn) + alg.gen_batch_size)
        assigned = []
        while len(drawn) < limit and any(r > 0 for r in room):
            for engine in range(engines):
                if room[engine] > 0 and len(drawn) < limit:
                    assigned.append((len(drawn), engine))
                    drawn.extend(sampler.next_indices(1))
                    room[engine] -= 1
        return assigned

    def generate_step(self, records: list[PromptRecord], sampler: PromptSampler, step: int) -> StepRollout:
        """Generate, score and select a step's training groups (dynamic sampling across all engines)."""
        alg, ro = self.algorithm, self.rollout
        streaming = ro.sampling_mode == "streaming"
        limit = alg.max_num_gen_batches * alg.gen_batch_size if alg.max_num_gen_batches > 0 else math.inf
        start = time.perf_counter()
        feed = self._feed_continuously if streaming and ro.continuous_feeding else self._feed_in_ticks
        generation = feed(records, sampler, step, limit)
        summaries, drawn = generation.summaries, generation.drawn
        cutoff = training_cutoff(summaries, len(drawn), alg.train_batch_size, alg.dynamic_sampling)
        if cutoff is None:
            raise self._starvation(summaries, len(drawn))
        consumed = range(cutoff + 1) if streaming else range(len(drawn))
        if streaming:  # drawn, neither trained nor filtered out: first again next step
            sampler.give_back([drawn[p] for p in range(cutoff + 1, len(drawn))])
        kept = [p for p in range(cutoff + 1) if summaries[p].qualifies(alg.dynamic_sampling)]
        metrics = self._metrics(summaries, consumed, kept, generation.rounds, generation.aborted, time.perf_counter() - start)
        host_times = self._gather((generation.reward_seconds, generation.idle_seconds, generation.seconds))
        metrics["timing/reward"] = max(reward for reward, _, _ in host_times)
        busy = sum(seconds for _, _, seconds in host_times)
        metrics["rollout/engine_idle_frac"] = sum(idle for _, idle, _ in host_times) / busy if busy else 0.0
        return StepRollout(kept, summaries, {p: g for p, g in generation.groups.items() if p in kept}, metrics,
                           {p: records[drawn[p]] for p in kept})

    def _feed_in_ticks(self, records: list[PromptRecord], sampler: PromptSampler, step: int, limit: float) -> "_Generation":
        """The lock-step protocol (``rollout.continuous_feeding=false``, and rounds): each tick every rank plans
        the same new assignments, hosts submit theirs and wait for one of their own groups, then every rank
        learns every new summary (one ``all_gather_object``)."""
        alg, ro = self.algorithm, self.rollout
        streaming = ro.sampling_mode == "streaming"
        generation = _Generation()
        drawn, summaries = generation.drawn, generation.summaries
        in_flight: list[set[int]] = [set() for _ in range(self.placement.num_engines)]
        prompts: dict[int, list[int]] = {}  # prompt token ids of the groups this rank's engine was given
        clock = _IdleClock()
        while True:
            assigned = self._plan(drawn, in_flight, sampler, limit)
            generation.rounds += bool(assigned) and not streaming
            for position, engine in assigned:
                in_flight[engine].add(position)
            news: list[GroupSummary] = []
            if self.is_host:
                requests = [self._request(records[drawn[p]], p, TRAIN_DRAW, step) for p, e in assigned if e == self.my_engine]
                news = self._engine_turn(requests, bool(in_flight[self.my_engine]), prompts, clock, generation, records)
            for host_news in self._gather(news):
                for summary in host_news:
                    summaries[summary.position] = summary
                    in_flight[summary.engine].discard(summary.position)
            cutoff = training_cutoff(summaries, len(drawn), alg.train_batch_size, alg.dynamic_sampling)
            idle = not any(in_flight)
            if (cutoff is not None and (streaming or idle)) or (idle and len(drawn) >= limit):
                break
        generation.aborted = sum(len(positions) for positions in in_flight)
        if self.is_host:
            self.engine.abort()
            generation.idle_seconds, generation.seconds = clock.stop()
        return generation

    def _feed_continuously(self, records: list[PromptRecord], sampler: PromptSampler, step: int, limit: float) -> "_Generation":
        """Streaming without ticks: each host claims the next draw position from a job-wide counter whenever its
        engine has room and refills at once, publishes each scored group's summary in the job's store and reads
        the others' from it; no collective runs until the step is decided. Positions, seeds, the cutoff and what
        goes back to the sampler are those of the tick protocol: they depend on draw positions, not on which
        engine claimed them when."""
        alg, ro = self.algorithm, self.rollout
        store = job_store(f"megatron_dapo/rollout/{self.generations}/")
        self.generations += 1
        generation = _Generation()
        drawn, summaries = generation.drawn, generation.summaries
        capacity = math.ceil((ro.groups_in_flight or alg.train_batch_size) / self.placement.num_engines)
        if self.is_host:
            in_flight: set[int] = set()
            prompts: dict[int, list[int]] = {}
            known = 0  # every position below it has its summary here
            clock = _IdleClock()
            self.engine.watch_for_abort(lambda: store.check(["stop"]))
            while True:
                requests = []
                while len(in_flight) < capacity:
                    position = store.add("claimed", 1) - 1
                    if position >= limit:
                        break
                    while len(drawn) <= position:
                        drawn.extend(sampler.next_indices(1))
                    requests.append(self._request(records[drawn[position]], position, TRAIN_DRAW, step))
                    in_flight.add(position)
                for summary in self._engine_turn(requests, bool(in_flight), prompts, clock, generation, records):
                    summaries[summary.position] = summary
                    in_flight.discard(summary.position)
                    store.set(f"summary/{summary.position}", pickle.dumps(summary))
                claimed = min(store.add("claimed", 0), limit)
                while known < claimed and (known in summaries or store.check([f"summary/{known}"])):
                    if known not in summaries:  # another host's: read it once
                        summaries[known] = pickle.loads(store.get(f"summary/{known}"))
                    known += 1
                decided = training_cutoff(summaries, claimed, alg.train_batch_size, alg.dynamic_sampling) is not None
                if decided or (known >= claimed and claimed >= limit):  # decided, or starved
                    store.set("stop", b"1")
                if store.check(["stop"]):
                    break
                if not in_flight:
                    time.sleep(0.01)  # nothing left to claim: wait for the others' groups
            self.engine.watch_for_abort(None)
            generation.aborted = self.engine.abort()
            generation.idle_seconds, generation.seconds = clock.stop()
        else:
            while not store.check(["stop"]):
                time.sleep(0.05)
        mine = [s.position for s in summaries.values() if s.engine == self.my_engine] if self.is_host else []
        for host_news in self._gather([summaries[position] for position in mine]):
            for summary in host_news:
                summaries[summary.position] = summary
        total = min(store.add("claimed", 0), limit)
        while len(drawn) < total:  # every rank's sampler copy ends where the job's draws did
            drawn.extend(sampler.next_indices(1))
        generation.aborted = sum(self._gather(generation.aborted))
        self._gather(None)  # every rank is past its last store read: the keys can go
        for position in mine:
            store.delete_key(f"summary/{position}")
        if self.rank == 0:
            store.delete_key("claimed")
            store.delete_key("stop")
        return generation

    def _engine_turn(self, requests: list[GroupRequest], waiting: bool, prompts: dict[int, list[int]],
                     clock: "_IdleClock", generation: "_Generation", records: list[PromptRecord]) -> list[GroupSummary]:
        """One turn of this host's engine in either protocol: submit ``requests`` (a refill), collect what
        completed while ``waiting`` on groups in flight, and score it; the summaries of the new groups."""
        if requests:
            prompts.update({request.key: request.prompt_ids for request in requests})
            self.engine.submit(requests)
            clock.refilled()
        completed = self.engine.collect() if waiting else {}
        if completed:
            clock.emptied()
        return self._score_into(generation, completed, records, prompts)

    def _score_into(self, generation: "_Generation", completed: dict[int, list[RolloutSample]],
                    records: list[PromptRecord], prompts: dict[int, list[int]]) -> list[GroupSummary]:
        """Score this host's completed groups, keep them in ``generation``; their summaries."""
        start = time.perf_counter()
        drawn = generation.drawn
        news = []
        for group, summary in self._score(completed, {p: records[drawn[p]] for p in completed}, prompts):
            generation.groups[summary.position] = group
            news.append(summary)
        generation.reward_seconds += time.perf_counter() - start
        return news

    def kept_responses(self, step_rollout: StepRollout) -> dict[int, list[tuple[str, str]]]:
        """The kept groups' responses as text (decoded as the reward function read them) with their finish
        reasons, by position: on global rank 0, ``{}`` elsewhere (collective). Only this text travels, host to
        rank 0; rewards, accuracies and lengths are in every rank's summaries, problems in its records."""
        mine = {}
        if self.is_host:
            for position, group in step_rollout.groups.items():
                texts = self.tokenizer.batch_decode([s.token_ids for s in group.samples], skip_special_tokens=True)
                mine[position] = [(text, sample.finish_reason) for text, sample in zip(texts, group.samples)]
        gathered = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0, group=self.control)
        return {position: texts for host in gathered or [] for position, texts in host.items()}

    def _gather(self, value: object) -> list:
        values = [None] * dist.get_world_size()
        dist.all_gather_object(values, value, group=self.control)
        return values

    def _starvation(self, summaries: dict[int, GroupSummary], num_drawn: int) -> DynamicSamplingError:
        alg = self.algorithm
        qualifying = sum(s.qualifies(alg.dynamic_sampling) for s in summaries.values())
        samples = [a for s in summaries.values() for a in s.acc]
        no_answer = sum(s.no_answer for s in summaries.values())
        hint = (
            " No response contained an extractable answer: check the prompt template asks for 'Answer: <value>'."
            if samples and no_answer == len(samples) else ""
        )
        return DynamicSamplingError(
            f"dynamic sampling kept {qualifying} of algorithm.train_batch_size={alg.train_batch_size} groups among "
            f"the {num_drawn} groups of algorithm.max_num_gen_batches={alg.max_num_gen_batches} generation batches "
            f"(accuracy {sum(samples) / max(len(samples), 1):.3f}); raise max_num_gen_batches (<= 0 is unbounded) "
            f"or use easier prompts.{hint}"
        )

    def _metrics(self, summaries, consumed, kept, rounds, aborted, seconds) -> dict[str, float]:
        used = [summaries[p] for p in consumed]
        acc = [a for s in used for a in s.acc]
        rewards = [r for s in used for r in s.rewards]
        lengths = [n for s in used for n in s.lengths]
        samples = max(len(acc), 1)
        generated_tokens = sum(sum(s.lengths) for s in summaries.values())
        trained_tokens = sum(sum(summaries[p].lengths) for p in kept)
        group_size = self.rollout.n
        return {
            # over every response drawn up to the cutoff, kept or filtered, truncated or not: comparable across
            # algorithms, and not over groups generated past the cutoff, whose number depends on timing
            "entropy/mean": sum(s.entropy_sum for s in used) / max(sum(lengths), 1),
            "acc/mean": sum(acc) / samples,
            "reward/mean": sum(rewards) / samples,
            "reward/no_answer_frac": sum(s.no_answer for s in used) / samples,
            "reward/timeouts": float(sum(s.timeouts for s in used)),
            "response_length/mean": sum(lengths) / samples,
            "response_length/max": float(max(lengths, default=0)),
            "response_length/clip_ratio": sum(s.truncated for s in used) / samples,
            "sampling/num_gen_batches": float(rounds) if rounds else len(used) / self.algorithm.gen_batch_size,
            "sampling/kept_group_frac": sum(s.qualifies(self.algorithm.dynamic_sampling) for s in used) / max(len(used), 1),
            "sampling/zero_std_all_correct": float(sum(sum(a > 0 for a in s.acc) == group_size for s in used)),
            "sampling/zero_std_all_wrong": float(sum(sum(a > 0 for a in s.acc) == 0 for s in used)),
            "sampling/generated_groups": float(len(summaries)),
            "sampling/generated_tokens": float(generated_tokens),
            "sampling/wasted_token_frac": 1.0 - trained_tokens / max(generated_tokens, 1),
            "sampling/aborted_groups": float(aborted),
            "rollout/tokens_per_s": generated_tokens / max(seconds, 1e-9),
        }

    # ------------------------------------------------------------------ samples to the ranks that train them
    def sample_lengths(self, step_rollout: StepRollout) -> list[int]:
        """Prompt + response tokens of each of the step's samples (kept groups, group-major, in draw order)."""
        summaries = [step_rollout.summaries[p] for p in step_rollout.kept]
        return [s.prompt_length + length for s in summaries for length in s.lengths]

    def local_training_samples(self, step_rollout: StepRollout, partition: list[list[int]]) -> list[TrainingSample]:
        """This rank's data-parallel share of the step's samples (its rows of ``partition``, by data-parallel rank,
        rows numbering the kept groups' samples group-major in draw order), sent as tensors by the engine hosts
        that hold them."""
        n = self.rollout.n
        num_samples = len(step_rollout.kept) * n
        host_of_row = [self.placement.hosts[step_rollout.summaries[p].engine] for p in step_rollout.kept for _ in range(n)]
        rows_of = dict(enumerate(partition))
        mine = rows_of[self.data_parallel_rank_of[self.rank]]
        by_row: dict[int, TrainingSample] = {}
        if self.is_host:
            own = {p: training_samples(group) for p, group in step_rollout.groups.items()}
            for row in range(num_samples):
                if host_of_row[row] == self.rank:
                    by_row[row] = own[step_rollout.kept[row // n]][row % n]
        sends = {}  # destination rank -> the rows it gets from this host
        if self.is_host:
            for rank in range(dist.get_world_size()):
                rows = [r for r in rows_of[self.data_parallel_rank_of[rank]] if host_of_row[r] == self.rank]
                if rows and rank != self.rank:
                    sends[rank] = rows
        receives = {}  # source host -> the rows this rank gets from it
        for row in mine:
            if host_of_row[row] != self.rank:
                receives.setdefault(host_of_row[row], []).append(row)
        by_row.update(self._exchange({dst: [by_row[r] for r in rows] for dst, rows in sends.items()}, receives))
        return [by_row[row] for row in mine]

    def _exchange(self, outgoing: dict[int, list[TrainingSample]], incoming: dict[int, list[int]]) -> dict[int, TrainingSample]:
        """Point-to-point: per-sample lengths first, then token ids, log-probs, advantages and (MoE) the engine's
        routes, as tensors."""
        requests, headers = [], {}
        packed = {dst: _pack(samples) for dst, samples in outgoing.items()}
        for dst, (lengths, *_) in packed.items():
            requests.append(dist.isend(lengths, dst, group=self.control))
        for src, rows in incoming.items():
            headers[src] = torch.empty(len(rows), 5, dtype=torch.long)
            requests.append(dist.irecv(headers[src], src, group=self.control))
        for request in requests:
            request.wait()
        requests, bodies = [], {}
        for dst, (_, *tensors) in packed.items():
            requests += [dist.isend(tensor, dst, group=self.control) for tensor in tensors if tensor.numel()]
        for src, lengths in headers.items():
            bodies[src] = _empty_body(lengths)
            requests += [dist.irecv(tensor, src, group=self.control) for tensor in bodies[src] if tensor.numel()]
        for request in requests:
            request.wait()
        return {row: sample for src, rows in incoming.items() for row, sample in zip(rows, _unpack(headers[src], *bodies[src]))}

    # ------------------------------------------------------------------ evaluation
    def evaluate(self, records: list[PromptRecord]) -> list[list[float]]:
        """Per problem, the correctness of ``rollout.val_n`` samples, known on every rank; problems are spread
        over the engines. Every evaluation samples problem i with the same seed (``group_seed`` at step 0):
        evaluations of different weights share their sampling noise, and ``megatron-dapo eval`` of an exported
        policy repeats the training run's evaluation of the same weights."""
        results: dict[int, list[float]] = {}
        if self.is_host:
            engines = self.placement.num_engines
            requests = [self._request(records[i], i, EVAL_DRAW, 0) for i in range(self.my_engine, len(records), engines)]
            completed = self.engine.generate(requests)
            mine = {request.key: records[request.key] for request in requests}
            for _, summary in self._score(completed, mine, {request.key: request.prompt_ids for request in requests}):
                results[summary.position] = summary.acc
        merged = {i: acc for host_results in self._gather(results) for i, acc in host_results.items()}
        return [merged[i] for i in range(len(records))]


def _pack(samples: list[TrainingSample]) -> tuple[torch.Tensor, ...]:
    """Header ``[prompt, response, truncated, MoE layers, top-k]`` per sample (0, 0 without routes), then bodies."""
    shapes = [s.routed_experts.shape[1:] if s.routed_experts is not None else (0, 0) for s in samples]
    lengths = torch.tensor([[len(s.prompt_ids), len(s.token_ids), int(s.truncated), *shape] for s, shape in zip(samples, shapes)],
                           dtype=torch.long)
    tokens = torch.tensor([t for s in samples for t in s.prompt_ids + s.token_ids], dtype=torch.long)
    logprobs = torch.tensor([lp for s in samples for lp in s.logprobs], dtype=torch.float32)
    advantages = torch.tensor([s.advantage for s in samples], dtype=torch.float32)
    routes = [s.routed_experts.reshape(-1) for s in samples if s.routed_experts is not None]
    return lengths, tokens, logprobs, advantages, torch.cat(routes) if routes else torch.empty(0, dtype=torch.int32)


def _route_counts(lengths: torch.Tensor) -> list[int]:
    """Each sample's number of route entries: forwarded tokens (prompt + response − 1) × layers × top-k."""
    return [(p + r - 1) * layers * k for p, r, _, layers, k in lengths.tolist()]


def _empty_body(lengths: torch.Tensor) -> tuple[torch.Tensor, ...]:
    return (
        torch.empty(int(lengths[:, :2].sum()), dtype=torch.long),
        torch.empty(int(lengths[:, 1].sum()), dtype=torch.float32),
        torch.empty(len(lengths), dtype=torch.float32),
        torch.empty(sum(_route_counts(lengths)), dtype=torch.int32),
    )


def _unpack(lengths: torch.Tensor, tokens: torch.Tensor, logprobs: torch.Tensor, advantages: torch.Tensor,
            routes: torch.Tensor) -> list[TrainingSample]:
    samples, token_start, logprob_start, route_start = [], 0, 0, 0
    for (prompt_len, response_len, truncated, layers, top_k), advantage, count in zip(
        lengths.tolist(), advantages.tolist(), _route_counts(lengths)
    ):
        ids = tokens[token_start : token_start + prompt_len + response_len].tolist()
        sample_routes = routes[route_start : route_start + count].view(-1, layers, top_k) if layers else None
        samples.append(TrainingSample(ids[:prompt_len], ids[prompt_len:],
                                      logprobs[logprob_start : logprob_start + response_len].tolist(), advantage,
                                      bool(truncated), sample_routes))
        token_start += prompt_len + response_len
        logprob_start += response_len
        route_start += count
    return samples
