"""DAPO-Math-17K-format prompt data: loading (parquet/jsonl via Hugging Face ``datasets``) and validation.

Row schema: ``data_source``, ``prompt`` (list of ``{role, content}`` messages), ``ability``,
``reward_model`` (``{style: "rule", ground_truth: "<answer>"}``), ``extra_info`` (``{index, ...}``).
Only ``prompt`` and ``reward_model.ground_truth`` are required.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import datasets

from megatron_dapo.errors import UserError


class DatasetFormatError(UserError, ValueError):
    """A data file or row does not follow the DAPO-Math schema; the message names file, row and field."""


@dataclass(frozen=True)
class PromptRecord:
    """One training/evaluation problem. ``extra``: the row's other fields (``data_source``, ``ability``,
    ``extra_info``, ...), passed to the reward function as keyword arguments."""

    messages: list[dict[str, str]]
    ground_truth: str
    data_source: str
    extra: dict = field(default_factory=dict, compare=False)


def validate_row(row: dict, path: str, index: int) -> PromptRecord:
    """Check one row and return its record; raise a one-line ``DatasetFormatError`` otherwise."""
    where = f"{path}: row {index}"
    prompt = row.get("prompt")
    if not isinstance(prompt, list) or not prompt:
        raise DatasetFormatError(
            f"{where}: field 'prompt' must be a non-empty list of {{role, content}} chat messages, "
            f"got {type(prompt).__name__}"
        )
    for message in prompt:
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) or not message.get("role"):
            raise DatasetFormatError(f"{where}: field 'prompt' holds {message!r}; each message needs 'role' and 'content'")
    reward_model = row.get("reward_model")
    ground_truth = reward_model.get("ground_truth") if isinstance(reward_model, dict) else None
    if ground_truth is None or str(ground_truth).strip() == "":
        raise DatasetFormatError(
            f"{where}: field 'reward_model.ground_truth' is missing or empty; "
            "write reward_model: {style: rule, ground_truth: '<answer>'}"
        )
    messages = [{"role": str(m["role"]), "content": m["content"]} for m in prompt]
    extra = {key: value for key, value in row.items() if key not in ("prompt", "reward_model")}
    return PromptRecord(
        messages=messages, ground_truth=str(ground_truth).strip(), data_source=str(row.get("data_source", "")), extra=extra
    )


def _validate_jsonl_lines(path: Path) -> None:
    """Row-level diagnosis for a JSONL file that Arrow could not load (mixed types, bad JSON)."""
    for index, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DatasetFormatError(f"{path}: row {index}: not valid JSON ({error.msg})") from None
        if not isinstance(row, dict):
            raise DatasetFormatError(f"{path}: row {index}: must be a JSON object")
        validate_row(row, str(path), index)


def load_prompt_file(path: str | Path) -> list[PromptRecord]:
    """Load and validate every row of one parquet or jsonl file."""
    path = Path(path)
    if not path.exists():
        raise DatasetFormatError(f"{path}: file not found (check data.train_files / data.val_files)")
    suffix = path.suffix.lower()
    builder = {".parquet": "parquet", ".jsonl": "json", ".json": "json"}.get(suffix)
    if builder is None:
        raise DatasetFormatError(f"{path}: unsupported file type {suffix!r}; use .parquet or .jsonl")
    if path.stat().st_size == 0:
        raise DatasetFormatError(f"{path}: file is empty; it must hold at least one row")
    try:
        table = datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as error:  # Arrow schema errors: find the offending row ourselves
        if builder == "json":
            _validate_jsonl_lines(path)
        raise DatasetFormatError(f"{path}: could not be read as {builder}: {error}") from error
    if len(table) == 0:
        raise DatasetFormatError(f"{path}: file is empty; it must hold at least one row")
    return [validate_row(row, str(path), index) for index, row in enumerate(table)]


def load_prompt_files(paths: list[str]) -> list[PromptRecord]:
    """All records of several files, in order."""
    return [record for path in paths for record in load_prompt_file(path)]


@dataclass(frozen=True)
class Duplicates:
    """What ``find_duplicates`` found: ``unique`` holds each (prompt messages, ground truth) pair's first record,
    in order; ``ambiguous_prompts`` counts prompts that come with more than one ground truth."""

    unique: list[PromptRecord]
    ambiguous_prompts: int


def find_duplicates(records: list[PromptRecord]) -> Duplicates:
    """Repeated rows: the same prompt messages with the same ground truth (other fields are not compared).

    Public DAPO data repeats rows many times over (DAPO-Math-17k each prompt about 100 times, AIME-2024 each
    problem 32 times), which would multiply evaluation work and skew sampling. A prompt with *different* ground
    truths is not a repeat: each row is scored against its own answer, so both stay, and are counted.
    """
    unique: dict[tuple[str, str], PromptRecord] = {}
    truths: dict[str, set[str]] = {}
    for record in records:
        prompt = json.dumps(record.messages, sort_keys=True)
        unique.setdefault((prompt, record.ground_truth), record)
        truths.setdefault(prompt, set()).add(record.ground_truth)
    return Duplicates(list(unique.values()), sum(len(answers) > 1 for answers in truths.values()))
