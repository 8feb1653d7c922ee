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
from megatron_dapo.data.toy_task import make_toy_rows, write_toy_dataset

__all__ = [
    "DatasetFormatError",
    "Duplicates",
    "PromptRecord",
    "PromptSampler",
    "find_duplicates",
    "load_prompt_file",
    "load_prompt_files",
    "make_toy_rows",
    "validate_row",
    "write_toy_dataset",
]
