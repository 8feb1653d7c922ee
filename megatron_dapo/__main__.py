"""``python -m megatron_dapo`` (also under ``torchrun``)."""

import sys

from megatron_dapo.cli import main

if __name__ == "__main__":  # the guard matters: dist-checkpoint saving re-imports __main__
    sys.exit(main())
