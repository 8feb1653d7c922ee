"""Shared test set-up: offline Hugging Face, and the `gpu` marker skipping without CUDA."""

import os

import pytest
import torch

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (GPU-only path)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
