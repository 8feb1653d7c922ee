"""The toy warm start on a busy machine: how much slower it gets next to other busy processes, with libgomp's
default wait policy (threads spin before they sleep) against ``OMP_WAIT_POLICY=PASSIVE`` (what
``megatron_dapo/__init__.py`` sets unless the variable is set).

Each measurement is a fresh process that loads torch (libgomp reads the variable then) and runs the toy warm start
(its fixed two threads) for ``--sft-steps`` steps, alone and next to ``--busy`` pure-Python busy loops (one per
core on this 2-core machine: the situation of two other runs beside this one). The slowdown is busy/alone wall
time; the last line compares the two policies' slowdowns.

    python benchmarks/bench_busy_machine.py              # 40 warm-start steps
    python benchmarks/bench_busy_machine.py --quick      # 3
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

WORKER = """
import sys, time
import torch  # libgomp reads OMP_WAIT_POLICY here
from megatron_dapo.config import ToyModelConfig
from megatron_dapo.data import load_prompt_files, write_toy_dataset
from megatron_dapo.toy import build_toy_checkpoint
out, steps = sys.argv[1], int(sys.argv[2])
records = load_prompt_files([str(write_toy_dataset(f"{out}/train.parquet", 512, 1, "arithmetic"))])
start = time.perf_counter()
build_toy_checkpoint(ToyModelConfig(sft_steps=steps), records, f"{out}/init", 1)
print(time.perf_counter() - start)
"""


def warm_start_seconds(policy: str | None, steps: int, busy: int) -> float:
    """Wall seconds of the warm start in a fresh process (``policy`` None: the variable unset)."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if policy is not None:
        env["OMP_WAIT_POLICY"] = policy
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(busy)]
    try:
        with tempfile.TemporaryDirectory() as out:
            done = subprocess.run([sys.executable, "-c", WORKER, out, str(steps)], env=env, check=True,
                                  capture_output=True, text=True)
        return float(done.stdout.strip().splitlines()[-1])
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--sft-steps", type=int, default=None)
    parser.add_argument("--busy", type=int, default=os.cpu_count() or 2, help="busy loops beside the warm start")
    args = parser.parse_args()
    steps = args.sft_steps or (3 if args.quick else 40)
    slowdown = {}
    for name, policy in (("default", None), ("passive", "PASSIVE")):
        began = time.perf_counter()
        alone = warm_start_seconds(policy, steps, 0)
        busy = warm_start_seconds(policy, steps, args.busy)
        slowdown[name] = busy / alone
        print(f"{name:8s} OMP_WAIT_POLICY={policy or '(unset)':8s} {steps} warm-start steps: alone {alone:6.1f} s, "
              f"next to {args.busy} busy loops {busy:6.1f} s, slowdown {slowdown[name]:.2f}x "
              f"({time.perf_counter() - began:.0f} s)", flush=True)
    print(f"passive/default busy_slowdown ratio={slowdown['passive'] / slowdown['default']:.2f}")


if __name__ == "__main__":
    main()
