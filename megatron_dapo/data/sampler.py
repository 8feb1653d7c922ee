"""A resumable, seeded sampler over prompt indices: reshuffles each epoch, and takes back prompts that were
drawn but not used (a streamed step's groups beyond the training batch), which it hands out first next time."""

from __future__ import annotations

import torch

from megatron_dapo.errors import ConfigError


class PromptSampler:
    """Prompt indices in a seeded per-epoch permutation; ``state_dict`` resumes exactly (returned prompts too)."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        if num_prompts <= 0:
            raise ValueError("PromptSampler needs at least one prompt")
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.cursor = 0
        self.returned: list[int] = []  # drawn, not used: the next draws, in this order

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_prompts, generator=generator)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` indices: returned prompts first, then the permutation, crossing epochs as needed."""
        indices = self.returned[:count]
        self.returned = self.returned[count:]
        while len(indices) < count:
            take = min(count - len(indices), self.num_prompts - self.cursor)
            indices.extend(self._permutation()[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.num_prompts:
                self.epoch, self.cursor = self.epoch + 1, 0
        return indices

    def give_back(self, indices: list[int]) -> None:
        """Prompts drawn but neither trained nor filtered out: they come first again, in this order."""
        self.returned = list(indices) + self.returned

    def state_dict(self) -> dict:
        return {
            "epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_prompts": self.num_prompts,
            "returned": list(self.returned),
        }

    def load_state_dict(self, state: dict) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ConfigError(
                f"the checkpoint's data cursor is for {state['num_prompts']} prompts, data.train_files hold "
                f"{self.num_prompts}: resume with the same data.train_files and data.deduplicate, or set "
                "trainer.resume=false"
            )
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
        self.returned = list(state.get("returned", []))
