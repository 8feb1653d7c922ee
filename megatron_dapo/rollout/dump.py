"""Rollout dumps: a step's trained samples as ``output_dir/rollouts/step_<n>.jsonl`` (``logging.rollout_dump_interval``).

One JSON object per sample of the kept groups (dynamic sampling's discards are not written), group-major in
the order they were trained: what the policy wrote, how it was scored, and the advantage it was trained with —
the first place to look when a reward or length curve moves unexpectedly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from megatron_dapo.algorithm import compute_group_advantages
from megatron_dapo.rollout.collect import StepRollout, prompt_text


def rollout_dump_rows(
    step: int, step_rollout: StepRollout, responses: dict[int, list[tuple[str, str]]], tokenizer: PreTrainedTokenizerBase
) -> list[dict]:
    """The dump's rows from the step's rollout and ``JobRollout.kept_responses``: ``step``, ``group`` (index among
    the step's kept groups), ``sample``, ``prompt`` (chat template applied), ``response``, ``ground_truth``,
    ``data_source``, ``reward`` (shaped: with the overlong penalty), ``acc`` (correct), ``advantage``,
    ``length`` (response tokens, the stop token included) and ``finish_reason`` (``stop`` or ``length``)."""
    rows = []
    for group, position in enumerate(step_rollout.kept):
        summary, record = step_rollout.summaries[position], step_rollout.records[position]
        prompt = prompt_text(tokenizer, record)
        advantages = compute_group_advantages(torch.tensor([summary.rewards]))[0].tolist()
        for sample, (response, finish_reason) in enumerate(responses[position]):
            rows.append({
                "step": step, "group": group, "sample": sample, "prompt": prompt, "response": response,
                "ground_truth": record.ground_truth, "data_source": record.data_source,
                "reward": summary.rewards[sample], "acc": summary.acc[sample] > 0, "advantage": advantages[sample],
                "length": summary.lengths[sample], "finish_reason": finish_reason,
            })
    return rows


def write_rollout_dump(output_dir: str | Path, step: int, rows: list[dict]) -> Path:
    """Write ``output_dir/rollouts/step_<step>.jsonl`` (replacing a resumed run's earlier copy); its path."""
    path = Path(output_dir) / "rollouts" / f"step_{step}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path
