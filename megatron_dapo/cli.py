"""``megatron-dapo`` / ``python -m megatron_dapo``: ``train --config FILE [key.sub=value ...]``."""

from __future__ import annotations

import argparse
import sys

from megatron_dapo.config import ConfigError, load_config
from megatron_dapo.data import DatasetFormatError
from megatron_dapo.rollout.collect import DynamicSamplingError
from megatron_dapo.weights.transfer import CheckpointMismatchError

USER_ERRORS = (ConfigError, DatasetFormatError, DynamicSamplingError, CheckpointMismatchError)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-dapo", description="DAPO reinforcement learning on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser("train", help="run DAPO training")
    train.add_argument("--config", help="YAML config (see examples/configs/)")
    train.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    import datasets
    import transformers

    from megatron_dapo.distributed import is_rank_zero

    datasets.disable_progress_bars()  # our own progress bar covers the long phases
    transformers.utils.logging.disable_progress_bar()

    try:
        config = load_config(args.config, args.overrides)
        from megatron_dapo.trainer import train

        before, after = train(config)
    except USER_ERRORS as error:
        if is_rank_zero():
            print(f"error: {error}", file=sys.stderr)
        return 2
    if is_rank_zero() and before is not None:
        print(f"eval accuracy: before={before:.3f} after={after:.3f}", flush=True)
    return 0
