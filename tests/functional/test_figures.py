"""examples/ablation/figures.py --quick: every arm of the four figure experiments runs with the settings the issue
and the paper give (hand-written here), the seed's warm start is built once and loaded by every other arm, and
figures.md's cells are the runs' own metrics."""

import re
import subprocess
import sys

import pytest
import yaml
from PIL import Image

from ..helpers import ROOT, metrics_rows

pytestmark = pytest.mark.slow  # ten training runs: minutes on 2 cores

# figure folder -> {arm folder: what differs from naive GRPO (clip 0.2, seq-mean-token-mean, no dynamic sampling,
# no overlong filtering or punishment)}, and the figure's task setting
ARMS = {
    "fig2_clip_higher": {"eps0.2": {}, "eps0.28": {"clip_ratio_high": 0.28}, "eps0.5": {"clip_ratio_high": 0.5}},
    "fig4_token_level_loss": {"seq_mean": {}, "token_mean": {"loss_agg_mode": "token-mean"}},
    "fig5_overlong": {"none": {}, "filtering": {"overlong_filtering": True},
                      "filtering_soft": {"overlong_filtering": True, "overlong_buffer_enable": True}},
    "fig6_dynamic_sampling": {"off": {}, "on": {"dynamic_sampling": True}},
}
NAIVE = {"clip_ratio_high": 0.2, "loss_agg_mode": "seq-mean-token-mean", "dynamic_sampling": False,
         "overlong_filtering": False, "overlong_buffer_enable": False, "kl_coef": 0.0}


def test_quick_figures_run_every_arm_from_shared_warm_starts_and_tabulate_their_metrics(tmp_path):
    out = tmp_path / "figures"
    result = subprocess.run([sys.executable, "examples/ablation/figures.py", "--out", str(out), "--quick", "--jobs", "2"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"figures: {out / 'figures.md'}"
    report = (out / "figures.md").read_text()
    warm_start = out / "warm_start" / "seed1"
    assert (warm_start / "config.json").is_file() and not (out / "warm_start" / "seed1.building").exists()
    for figure, arms in ARMS.items():
        for arm, changes in arms.items():
            run = out / figure / "seed1" / arm
            config = yaml.safe_load((run / "config.yaml").read_text())
            expected = {**NAIVE, **changes}
            assert {key: config["algorithm"][key] for key in expected} == expected, (figure, arm)
            assert config["toy_model"]["sft_ramble"] == 0.4 and config["toy_model"]["sft_ramble_error"] == 0.8
            assert config["model"]["hf_path"] == str(warm_start)  # built once, loaded by every arm
            assert [row["step"] for row in metrics_rows(run)] == [0, 1]
        setting = yaml.safe_load((out / figure / "seed1" / next(iter(arms)) / "config.yaml").read_text())
        if figure == "fig2_clip_higher":  # 32 samples per step in updates of 8: four updates per rollout
            assert setting["algorithm"]["mini_batch_size"] == 8
        if figure == "fig4_token_level_loss":
            assert setting["rollout"]["max_response_length"] == 224
        if figure == "fig5_overlong":
            assert setting["rollout"]["max_response_length"] == 64
        with Image.open(out / f"{figure}.png") as image:
            assert image.size[0] > 2 * image.size[1]  # panels side by side
    # a cell of each table is its runs' metric: the last evaluation's avg@2 of each arm (one seed: no spread)
    for figure, arms in ARMS.items():
        section = report.split(f"{figure}.png")[0].rsplit("### ", 1)[1]
        for arm in arms:
            avg = metrics_rows(out / figure / "seed1" / arm)[-1]["eval/toy-countdown/avg@2"]
            assert re.search(rf"\| [^|]+ \| {avg:.3f} ± 0\.000 \|", section), (figure, arm)
