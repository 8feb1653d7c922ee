"""``megatron-dapo`` killed (SIGKILL) after megatron-core has written the files of checkpoint
``$KILL_DURING_CHECKPOINT`` and before the tracker names it: a job killed in the middle of writing a
checkpoint. Run by tests/functional/test_resume.py."""

import os
import signal
import sys

from megatron.core import dist_checkpointing

from megatron_dapo.cli import main

KILL_AT = f"iter_{int(os.environ['KILL_DURING_CHECKPOINT']):07d}"
_save = dist_checkpointing.save


def _save_then_die(state, path, *args, **kwargs):
    _save(state, path, *args, **kwargs)
    if str(path).endswith(KILL_AT):
        os.kill(os.getpid(), signal.SIGKILL)


dist_checkpointing.save = _save_then_die

if __name__ == "__main__":  # the guard matters: dist-checkpoint saving re-imports __main__
    sys.exit(main())
