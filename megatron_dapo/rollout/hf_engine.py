"""CPU rollout engine: a Hugging Face ``transformers`` causal LM living in the trainer process.

Batched sampling with a KV cache through ``generate``; per-token log-probs are those of ``softmax(logits / T)``
over the full vocabulary, not renormalised over the top-p nucleus — what SGLang reports too
(docs/pitfalls.md, 3). Weight updates copy in place.
"""

from __future__ import annotations

from typing import Iterable

import torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel

from megatron_dapo.errors import different_models
from megatron_dapo.rollout.base import RolloutEngine
from megatron_dapo.samples import RolloutSample
from megatron_dapo.weights.transfer import Bucket


class HFRolloutEngine(RolloutEngine):
    """Rollout engine over an in-process ``transformers`` model (fp32, CPU)."""

    weight_dtype = torch.float32

    def __init__(self, model: PreTrainedModel, pad_token_id: int, eos_token_id: int, seed: int = 0) -> None:
        self.model = model.eval()
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.generator_seed = seed
        self.num_generate_calls = 0
        self._params = dict(self.model.named_parameters())

    @classmethod
    def from_pretrained(cls, hf_dir: str, pad_token_id: int, eos_token_id: int, seed: int = 0) -> "HFRolloutEngine":
        model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
        return cls(model, pad_token_id, eos_token_id, seed)

    @classmethod
    def from_config(cls, hf_dir: str, pad_token_id: int, eos_token_id: int, seed: int = 0) -> "HFRolloutEngine":
        """An engine whose weights arrive by ``update_weights`` (the folder needs only ``config.json``)."""
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(hf_dir), dtype=torch.float32)
        return cls(model, pad_token_id, eos_token_id, seed)

    @torch.no_grad()
    def generate(
        self, prompt_token_ids: list[list[int]], n: int, temperature: float, top_p: float, max_new_tokens: int
    ) -> list[RolloutSample]:
        # Seeded per call so that a resumed run samples what the uninterrupted run would have.
        torch.manual_seed(self.generator_seed * 1_000_003 + self.num_generate_calls)
        self.num_generate_calls += 1
        width = max(map(len, prompt_token_ids))
        input_ids = torch.tensor([[self.pad_token_id] * (width - len(p)) + list(p) for p in prompt_token_ids])
        attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompt_token_ids])
        output = self.model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            do_sample=True,
            temperature=temperature,
            top_p=top_p,
            top_k=0,
            max_new_tokens=max_new_tokens,
            num_return_sequences=n,
            pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id,
            output_logits=True,  # the model's raw logits, before temperature and top-p
            return_dict_in_generate=True,
        )
        new_tokens = output.sequences[:, width:]
        step_logprobs = torch.stack([torch.log_softmax(s.float() / temperature, dim=-1) for s in output.logits], dim=1)
        token_logprobs = step_logprobs.gather(-1, new_tokens.unsqueeze(-1)).squeeze(-1)
        samples = []
        for row, (tokens, logprobs) in enumerate(zip(new_tokens.tolist(), token_logprobs.tolist())):
            if self.eos_token_id in tokens:
                length, reason = tokens.index(self.eos_token_id) + 1, "stop"
            else:
                length, reason = len(tokens), "length"
            samples.append(RolloutSample(row // n, tokens[:length], logprobs[:length], reason))
        return samples

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

    def state_dict(self) -> dict:
        return {"num_generate_calls": self.num_generate_calls}

    def load_state_dict(self, state: dict) -> None:
        self.num_generate_calls = state["num_generate_calls"]

    def release_memory(self) -> None:
        """Nothing to release on CPU: the model shares host memory with the trainer and holds no KV cache."""

    def resume_memory(self, tags: Iterable[str] = ()) -> None:
        """Nothing to resume on CPU (see ``release_memory``)."""
