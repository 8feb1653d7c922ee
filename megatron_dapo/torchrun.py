"""``python -m megatron_dapo.torchrun ARGS``: ``torchrun ARGS``, except that a user error stays one line.

A worker that stops on a ``UserError`` prints ``error: ...`` and exits 2 (``cli.py``). Plain ``torchrun`` then
raises ``ChildFailedError`` out of its ``main`` and Python prints that as a 30-line traceback under the one line
(torch/distributed/launcher/api.py:378-383 raises it for any non-zero exit; run.py:1025 ``@record`` re-raises
it). Here torchrun's ``run`` is called directly: when the first failure exited 2, the launcher exits 2 quietly
(the worker has said what to fix); any other failure is re-raised and reported exactly as torchrun does. The
Slurm launcher (slurm/node.sh) starts workers through this module.
"""

from __future__ import annotations

import logging
import sys

from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import get_args_parser, run

USER_ERROR_EXIT_CODE = 2  # cli.py: a UserError's exit code


class _QuietUserErrors(logging.Filter):
    """Drop the elastic agent's record of a worker that exited 2 and its notices of stopping the other workers
    (torch/distributed/elastic/multiprocessing/api.py:1003 and :1029, torch 2.13); other records pass."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.msg.startswith("failed (exitcode: %s)"):
            return record.args[0] != USER_ERROR_EXIT_CODE
        return not record.msg.startswith("Sending process %s closing signal %s")


def main(argv: list[str] | None = None) -> int:
    """Run torchrun with ``argv``; its exit code (2 without a traceback when a worker stopped on a user error)."""
    logging.getLogger("torch.distributed.elastic.multiprocessing.api").addFilter(_QuietUserErrors())
    try:
        run(get_args_parser().parse_args(argv))
    except ChildFailedError as failed:
        _, first = failed.get_first_failure()
        if first.exitcode == USER_ERROR_EXIT_CODE:
            return USER_ERROR_EXIT_CODE
        raise
    return 0


if __name__ == "__main__":
    sys.exit(main())
