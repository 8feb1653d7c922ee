"""Prompt data: DAPO-Math-17K-format loading and validation, a resumable sampler, the toy task."""

from megatron_dapo.data.dataset import (
    DatasetFormatError,
    Duplicates,
    PromptRecord,
    find_duplicates,
    load_prompt_file,
    load_prompt_files,
    validate_row,
)
from megatron_dapo.data.sampler import PromptSampler
from megatron_dapo.data.toy_task import DATA_SOURCES, ToyTask, countdown_problem, make_toy_rows, write_toy_dataset

__all__ = [
    "DATA_SOURCES",
    "DatasetFormatError",
    "Duplicates",
    "PromptRecord",
    "PromptSampler",
    "ToyTask",
    "countdown_problem",
    "find_duplicates",
    "load_prompt_file",
    "load_prompt_files",
    "make_toy_rows",
    "validate_row",
    "write_toy_dataset",
]
