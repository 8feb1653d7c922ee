"""Dynamic sampling: tokens generated per kept group, streaming against rounds, on the toy task.

The rounds baseline is the paper's proportion: rounds of 3 × ``train_batch_size`` prompts (the 32B recipe's
1536 for 512), all generated before the kept groups are chosen. Streaming keeps ``groups_in_flight`` groups
(default: ``train_batch_size``) submitted and stops as soon as the first ``train_batch_size`` qualifying groups
in draw order are in, giving the rest back to the sampler. Both run the same warm-started toy policy (fixed
weights: rollout only), one engine, the same seeds; each mode in its own process.

    python benchmarks/bench_dynamic_sampling.py            # 6 steps per mode
    python benchmarks/bench_dynamic_sampling.py --quick    # 2 steps, a shorter warm start
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from toy_rollout import build_policy  # noqa: E402

TRAIN_BATCH = 16
MODES = {
    "rounds": ["rollout.sampling_mode=rounds", f"algorithm.gen_batch_size={3 * TRAIN_BATCH}"],
    "streaming": ["rollout.sampling_mode=streaming", f"algorithm.gen_batch_size={3 * TRAIN_BATCH}"],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    steps, sft_steps = (2, 300) if args.quick else (6, 800)
    common = [f"algorithm.train_batch_size={TRAIN_BATCH}", "algorithm.max_num_gen_batches=0", "rollout.n=8"]
    per_kept = {}
    with tempfile.TemporaryDirectory() as tmp:
        policy, data = build_policy(Path(tmp), sft_steps)
        for mode, overrides in MODES.items():
            out = Path(tmp) / f"{mode}.json"
            command = [sys.executable, str(HERE / "toy_rollout.py"), "--policy", str(policy), "--data", str(data),
                       "--steps", str(steps), "--out", str(out), "--threads", "2", *common, *overrides]
            subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            rows = json.loads(out.read_text())
            tokens = sum(row["sampling/generated_tokens"] for row in rows)
            groups = sum(row["sampling/generated_groups"] for row in rows)
            per_kept[mode] = tokens / (steps * TRAIN_BATCH)
            print(f"{mode}: {groups / steps:.1f} groups and {tokens / steps:.0f} tokens generated per step for "
                  f"{TRAIN_BATCH} kept groups; {per_kept[mode]:.1f} tokens per kept group "
                  f"(kept fraction of used groups {sum(r['sampling/kept_group_frac'] for r in rows) / steps:.2f})")
    print(f"policy: toy warm start of {sft_steps} steps; G=8; {steps} steps per mode")
    print(f"streaming/rounds generated_tokens_per_kept_group ratio={per_kept['streaming'] / per_kept['rounds']:.3f}")


if __name__ == "__main__":
    main()
