"""A resumable, seeded sampler over prompt indices: reshuffles each epoch, state is ``(epoch, cursor)``."""

from __future__ import annotations

import torch

from megatron_dapo.errors import ConfigError


class PromptSampler:
    """Yields prompt indices in a seeded per-epoch permutation; ``state_dict`` resumes exactly."""

    def __init__(self, num_prompts: int, seed: int) -> None:
        if num_prompts <= 0:
            raise ValueError("PromptSampler needs at least one prompt")
        self.num_prompts = num_prompts
        self.seed = seed
        self.epoch = 0
        self.cursor = 0

    def _permutation(self) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return torch.randperm(self.num_prompts, generator=generator)

    def next_indices(self, count: int) -> list[int]:
        """The next ``count`` indices, crossing epoch boundaries as needed."""
        indices: list[int] = []
        while len(indices) < count:
            take = min(count - len(indices), self.num_prompts - self.cursor)
            indices.extend(self._permutation()[self.cursor : self.cursor + take].tolist())
            self.cursor += take
            if self.cursor == self.num_prompts:
                self.epoch, self.cursor = self.epoch + 1, 0
        return indices

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor, "seed": self.seed, "num_prompts": self.num_prompts}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state["num_prompts"] != self.num_prompts:
            raise ConfigError(
                f"the checkpoint's data cursor is for {state['num_prompts']} prompts, data.train_files hold "
                f"{self.num_prompts}: resume with the same data.train_files, or set trainer.resume=false"
            )
        self.epoch, self.cursor, self.seed = state["epoch"], state["cursor"], state["seed"]
