"""``megatron-dapo`` / ``python -m megatron_dapo``.

- ``train --config FILE [key.sub=value ...]``: run DAPO (also under ``torchrun``);
- ``config [--config FILE] [key.sub=value ...]``: every option with its value and one line of documentation.

Errors the user can fix (``UserError``) end the command with one line on stderr and exit code 2, on every rank.
"""

from __future__ import annotations

import argparse
import sys

from megatron_dapo.config import describe_options, load_config
from megatron_dapo.errors import UserError


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="megatron-dapo", description="DAPO reinforcement learning on megatron-core")
    commands = parser.add_subparsers(dest="command", required=True)
    train = commands.add_parser(
        "train",
        help="run DAPO training",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="config keys (section.key = default  # meaning):\n  " + "\n  ".join(describe_options()),
    )
    config = commands.add_parser("config", help="list every config key with its value and documentation")
    for command in (train, config):
        command.add_argument("--config", help="YAML config (see examples/configs/)")
        command.add_argument("overrides", nargs="*", help="config overrides key.sub=value")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from megatron_dapo.distributed import is_rank_zero

    try:
        config = load_config(args.config, args.overrides)
        if args.command == "config":
            print("\n".join(describe_options(config)))
            return 0
        import datasets
        import transformers

        from megatron_dapo.trainer import train

        datasets.disable_progress_bars()  # our own progress bar covers the long phases
        transformers.utils.logging.disable_progress_bar()
        before, after = train(config)
    except UserError as error:
        if is_rank_zero():
            print(f"error: {error}", file=sys.stderr)
        return 2
    if is_rank_zero() and before is not None:
        print(f"eval accuracy: before={before:.3f} after={after:.3f}", flush=True)
    return 0
