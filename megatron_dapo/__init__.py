"""megatron-dapo: DAPO reinforcement learning for reasoning LLMs on megatron-core."""

import os

# OpenMP threads waiting for work spin before they sleep (libgomp's default, which torch's CPU build ships): next
# to other busy processes a spinning thread holds the core that the thread it waits for needs, and the CPU toy
# (warm start, the CPU engine, the actor) slowed tenfold instead of in proportion (docs/pitfalls.md, 41). libgomp
# reads this once, when torch loads it: the package sets it before anything imports torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"
