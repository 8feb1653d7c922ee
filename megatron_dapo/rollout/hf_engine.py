"""CPU rollout engine: a Hugging Face ``transformers`` causal LM living in a trainer process.

Batched generation with a KV cache through ``generate``. Sampling is seeded per group: ``generate`` runs
greedy search over Gumbel-perturbed log-probabilities — argmax(log p + G) is a draw from p — and each group's
noise comes from its own generator, so a group's samples do not depend on the rest of the batch or on the
engine. Reported log-probs are those of ``softmax(logits / T)`` over the full vocabulary, not renormalised over
the top-p nucleus — what SGLang reports too (docs/pitfalls.md, 3). Weight updates copy in place.
"""

from __future__ import annotations

import time
from itertools import groupby
from typing import Callable, Iterable

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    GenerationConfig,
    LogitsProcessor,
    LogitsProcessorList,
    PreTrainedModel,
    StoppingCriteria,
    StoppingCriteriaList,
)

from megatron_dapo.errors import different_models
from megatron_dapo.rollout.base import GroupRequest, RolloutEngine
from megatron_dapo.samples import RolloutSample
from megatron_dapo.weights.transfer import Bucket


class SeededSampling(LogitsProcessor):
    """Scores whose argmax is a sample of ``softmax(logits / T)`` (top-p filtered), per-group seeded."""

    def __init__(self, requests: list[GroupRequest], temperature: float, top_p: float) -> None:
        self.generators = [torch.Generator().manual_seed(request.seed) for request in requests]
        self.rows = [request.n for request in requests]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logprobs = torch.log_softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:  # keep the smallest set of tokens whose mass reaches top_p
            sorted_logprobs, order = logprobs.sort(dim=-1, descending=True)
            mass_before = sorted_logprobs.exp().cumsum(dim=-1) - sorted_logprobs.exp()
            outside = (mass_before >= self.top_p).scatter(-1, order, mass_before >= self.top_p)
            logprobs = logprobs.masked_fill(outside, float("-inf"))
        vocab = scores.shape[-1]
        uniform = torch.cat([torch.rand((n, vocab), generator=g) for g, n in zip(self.generators, self.rows)])
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=torch.finfo(torch.float32).tiny)))
        return logprobs + gumbel


def _checkpoint_views(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The model's parameters by HF checkpoint name, as the actor sends them. transformers 5 keeps a MoE layer's
    experts fused in memory (``mlp.experts.gate_up_proj`` [E, 2I, H], gate rows first; ``mlp.experts.down_proj``
    [E, H, I]) while checkpoints, SGLang and the actor name them one by one
    (``mlp.experts.<e>.{gate,up,down}_proj.weight``): each of those is a view into the fused parameter."""
    views: dict[str, torch.Tensor] = {}
    for name, param in model.named_parameters():
        prefix = name.rpartition(".")[0] + "."
        if name.endswith("mlp.experts.gate_up_proj"):
            for expert, fused in enumerate(param):
                views[f"{prefix}{expert}.gate_proj.weight"], views[f"{prefix}{expert}.up_proj.weight"] = fused.chunk(2)
        elif name.endswith("mlp.experts.down_proj"):
            views.update((f"{prefix}{expert}.down_proj.weight", down) for expert, down in enumerate(param))
        else:
            views[name] = param
    return views


class _RouteRecorder:
    """Collects each router call's top-k experts ``[rows × positions, k]`` during one ``generate``."""

    def __init__(self, routers: list[torch.nn.Module], rows: int) -> None:
        self.rows, self.calls = rows, [[] for _ in routers]
        self.handles = [router.register_forward_hook(self._hook(i)) for i, router in enumerate(routers)]

    def _hook(self, layer: int):
        def record(module, inputs, output) -> None:
            indices = output[2]  # transformers' TopKRouter returns (logits, weights, indices)
            self.calls[layer].append(indices.view(self.rows, -1, indices.shape[-1]).to(torch.int32))
        return record

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()

    def routes(self) -> torch.Tensor | None:
        """``[rows, positions forwarded, layers, k]``: the prefill's positions, then one per decode step."""
        if not self.calls:
            return None
        return torch.stack([torch.cat(calls, dim=1) for calls in self.calls], dim=2)


class _AbortWatch(StoppingCriteria):
    """Ends ``generate`` for every row once ``requested()`` is true, asked at the first token and then at most
    every 20 ms (a store lookup per token would cost more than a small model's token)."""

    def __init__(self, requested: Callable[[], bool] | None) -> None:
        self.requested, self.fired, self.asked_at = requested, False, -float("inf")  # asked at the first token

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        if self.requested is not None and not self.fired and time.perf_counter() - self.asked_at > 0.02:
            self.asked_at = time.perf_counter()
            self.fired = bool(self.requested())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class HFRolloutEngine(RolloutEngine):
    """Rollout engine over an in-process ``transformers`` model (fp32, CPU)."""

    weight_dtype = torch.float32

    def __init__(self, model: PreTrainedModel, pad_token_id: int, eos_token_id: int) -> None:
        self.model = model.eval()
        # a folder's generation_config.json (repetition penalty, top-k, ...) would add logits processors: sampling
        # is the request's alone, whether the model came from a folder or from a config
        self.model.generation_config = GenerationConfig.from_model_config(model.config)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.queued: list[GroupRequest] = []
        self._params = _checkpoint_views(self.model)
        # MoE: the routers, in layer order, whose choices every sample returns (routing replay and its metrics)
        self._routers = [m for m in self.model.modules() if type(m).__name__.endswith("TopKRouter")]

    @classmethod
    def from_pretrained(cls, hf_dir: str, pad_token_id: int, eos_token_id: int) -> "HFRolloutEngine":
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        return cls(model, pad_token_id, eos_token_id)

    @classmethod
    def from_config(cls, hf_dir: str, pad_token_id: int, eos_token_id: int) -> "HFRolloutEngine":
        """An engine whose weights arrive by ``update_weights`` (the folder needs only ``config.json``)."""
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.float32)
        return cls(model, pad_token_id, eos_token_id)

    # ------------------------------------------------------------------ generation
    def submit(self, requests: list[GroupRequest]) -> None:
        self.queued += requests

    def collect(self) -> dict[int, list[RolloutSample]]:
        """Generate everything submitted: one batch per sampling setting. A batch given up on request
        (``watch_for_abort``) stays queued, and is not returned."""
        queued, self.queued = self.queued, []
        results: dict[int, list[RolloutSample]] = {}
        setting = lambda r: (r.temperature, r.top_p, r.max_new_tokens)  # noqa: E731
        for _, batch in groupby(sorted(queued, key=setting), key=setting):
            requests = list(batch)
            generated = self._generate(requests)
            if generated is None:
                self.queued += requests
            else:
                results.update(generated)
        return results

    def abort(self) -> int:
        aborted, self.queued = len(self.queued), []
        return aborted

    @torch.no_grad()
    def _generate(self, requests: list[GroupRequest]) -> dict[int, list[RolloutSample]] | None:
        first = requests[0]
        rows = [request.prompt_ids for request in requests for _ in range(request.n)]
        width = max(map(len, rows))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in rows])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in rows])
        recorder = _RouteRecorder(self._routers, len(rows))
        stop = _AbortWatch(self.abort_requested)
        try:
            output = self._sample(requests, input_ids, attention_mask, stop)
        finally:
            recorder.remove()
        if stop.fired:
            return None
        routes = recorder.routes()
        new_tokens = output.sequences[:, width:]
        step_logprobs = torch.stack([torch.log_softmax(s.float() / first.temperature, dim=-1) for s in output.logits], dim=1)
        token_logprobs = step_logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        token_entropies = torch.special.entr(step_logprobs.exp()).sum(dim=-1)  # entr(0) = 0: no 0·log 0
        samples = []
        for row, (tokens, logprobs) in enumerate(zip(new_tokens.tolist(), token_logprobs.tolist())):
            if self.eos_token_id in tokens:
                length, reason = tokens.index(self.eos_token_id) + 1, "stop"
            else:
                length, reason = len(tokens), "length"
            # forwarded: the prompt (after the left padding) and every response token but the last
            row_routes = routes[row, width - len(rows[row]) : width + length - 1].clone() if routes is not None else None
            entropy = token_entropies[row, :length].sum().item()
            samples.append((tokens[:length], logprobs[:length], reason, row_routes, entropy))
        results, start = {}, 0
        for request in requests:
            results[request.key] = [RolloutSample(request.key, *sample) for sample in samples[start : start + request.n]]
            start += request.n
        return results

    def _sample(self, requests: list[GroupRequest], input_ids: torch.Tensor, attention_mask: torch.Tensor,
                stop: "_AbortWatch"):
        first = requests[0]
        return self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=False,  # the processor's perturbed scores make greedy search sample
            logits_processor=LogitsProcessorList([SeededSampling(requests, first.temperature, first.top_p)]),
            stopping_criteria=StoppingCriteriaList([stop]),
            max_new_tokens=first.max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            output_logits=True,  # the model's raw logits, before temperature and top-p
            return_dict_in_generate=True,
        )

    # ------------------------------------------------------------------ weights
    # (the bucket names are HF checkpoint names: see _checkpoint_views)
    @torch.no_grad()
    def update_weights(self, buckets: Iterable[Bucket]) -> None:
        """Copy each bucket's tensors into the model's parameters in place."""
        for bucket in buckets:
            for name, tensor in bucket:
                param = self._params.get(name)
                if param is None:
                    raise different_models(f"the rollout engine's model has no parameter {name!r} (sent by the actor)", "actor")
                if param.shape != tensor.shape:
                    raise different_models(
                        f"weight {name}: the rollout engine's shape {tuple(param.shape)} != the actor's {tuple(tensor.shape)}", "actor"
                    )
                param.copy_(tensor)

    def release_memory(self) -> None:
        """Nothing to release on CPU: the model shares host memory with the trainer and holds no KV cache."""

    def resume_memory(self, tags: Iterable[str] = ()) -> None:
        """Nothing to resume on CPU (see ``release_memory``)."""
