"""Overlong reward shaping: soft punishment of long responses and filtering of truncated ones."""

from __future__ import annotations

import torch


def overlong_penalty(
    response_lengths: torch.Tensor,
    max_response_length: int,
    overlong_buffer_len: int,
    penalty_factor: float = 1.0,
) -> torch.Tensor:
    """DAPO's soft overlong punishment, added to the correctness reward.

    With ``expected = max_response_length − overlong_buffer_len`` and ``|y|`` the response tokens:
    0 if ``|y| ≤ expected``; ``(expected − |y|) / overlong_buffer_len · factor`` on the ramp;
    ``−factor`` beyond ``max_response_length``.

    Returns:
        float ``[num_samples]`` penalties (≤ 0).
    """
    if overlong_buffer_len <= 0 or overlong_buffer_len > max_response_length:
        raise ValueError(
            f"overlong_buffer_len={overlong_buffer_len} must be in (0, max_response_length={max_response_length}]"
        )
    lengths = torch.as_tensor(response_lengths, dtype=torch.float32)
    expected = max_response_length - overlong_buffer_len
    ramp = (expected - lengths) / overlong_buffer_len
    return ramp.clamp(min=-1.0, max=0.0) * penalty_factor


def overlong_filter_mask(finish_reasons: list[str]) -> torch.Tensor:
    """Overlong filtering: float ``[num_samples]``, 0 for truncated samples (finish reason ``length``), else 1."""
    return torch.tensor([0.0 if reason == "length" else 1.0 for reason in finish_reasons])
