"""Fixtures for the functional tests: a one-process gloo world; one toy warm start for the whole session."""

import subprocess
import sys

import pytest
from megatron_dapo.distributed import initialize_distributed

from ..helpers import ROOT, TOY_CONFIG

WARM_START_STEPS = 300
_BUILD = """
import sys
from megatron_dapo.config import load_config
from megatron_dapo.inputs import build_toy_warm_start, training_files
config = load_config(sys.argv[1], sys.argv[3:])
build_toy_warm_start(config, training_files(config), sys.argv[2])
"""


@pytest.fixture(scope="session")
def megatron_world():
    """A world of one process (TP=PP=DP=1) shared by the session's in-process actor tests."""
    initialize_distributed(1, 1, seed=1)
    yield


@pytest.fixture(scope="session")
def toy_warm_start(tmp_path_factory) -> str:
    """``model.hf_path=<folder>``: the policy a toy run (examples/configs/toy_cpu.yaml, trainer.seed 1) builds with
    ``toy_model.sft_steps=300``, built once per session (in a process of its own, as a run builds it). End-to-end
    tests that are not about the warm start load it instead of each building the same policy again."""
    folder = tmp_path_factory.mktemp("toy_warm_start")
    overrides = [f"toy_model.sft_steps={WARM_START_STEPS}", f"trainer.output_dir={folder}", "logging.progress_bar=false"]
    subprocess.run([sys.executable, "-c", _BUILD, str(TOY_CONFIG), str(folder / "toy_init"), *overrides], cwd=ROOT,
                   check=True, capture_output=True, timeout=600)
    return f"model.hf_path={folder / 'toy_init'}"
