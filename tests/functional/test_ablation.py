"""examples/ablation/table1.py --quick: six runs whose configs are Table 1's rows, one shared warm start per
seed, and a table whose numbers are those of the runs' metrics."""

import subprocess
import sys

import pytest
import yaml
from PIL import Image

from ..helpers import ROOT, metrics_rows

pytestmark = pytest.mark.slow  # six training runs: minutes on 2 cores

# (folder, clip_ratio_high, loss_agg_mode, dynamic_sampling, overlong_filtering, overlong_buffer_enable), from
# the paper's Table 1: each row adds one technique to the one above
EXPECTED_ROWS = [
    ("grpo", 0.2, "seq-mean-token-mean", False, False, False),
    ("overlong_filtering", 0.2, "seq-mean-token-mean", False, True, False),
    ("clip_higher", 0.28, "seq-mean-token-mean", False, True, False),
    ("soft_overlong", 0.28, "seq-mean-token-mean", False, True, True),
    ("token_level_loss", 0.28, "token-mean", False, True, True),
    ("dynamic_sampling", 0.28, "token-mean", True, True, True),
]
PAPER = [30, 36, 38, 41, 42, 50]


def test_quick_ladder_runs_the_six_rows_and_tabulates_their_metrics(tmp_path):
    out = tmp_path / "table1"
    result = subprocess.run([sys.executable, "examples/ablation/table1.py", "--out", str(out), "--quick", "--seeds", "1"],
                            cwd=ROOT, capture_output=True, text=True, timeout=1500)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1] == f"table1: {out / 'table1.md'}"
    warm_start = out / "seed1" / "grpo" / "toy_init"
    assert (warm_start / "config.json").is_file()
    for folder, clip_high, agg, dynamic, filtering, soft in EXPECTED_ROWS:
        run = out / "seed1" / folder
        config = yaml.safe_load((run / "config.yaml").read_text())
        algorithm = config["algorithm"]
        assert (algorithm["clip_ratio_high"], algorithm["loss_agg_mode"], algorithm["dynamic_sampling"],
                algorithm["overlong_filtering"], algorithm["overlong_buffer_enable"]) == (clip_high, agg, dynamic,
                                                                                          filtering, soft), folder
        assert config["data"]["toy_task"] == "countdown" and config["trainer"]["seed"] == 1
        if folder != "grpo":  # every row starts from the same policy
            assert config["model"]["hf_path"] == str(warm_start) and not (run / "toy_init").exists()
        assert [row["step"] for row in metrics_rows(run)] == [0, 1, 2]
    table = (out / "table1.md").read_text().splitlines()
    lines = [line for line in table if line.startswith("| ") and not line.startswith("| row")]
    assert len(lines) == 6
    for line, paper, (folder, *_) in zip(lines, PAPER, EXPECTED_ROWS):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[1] == str(paper)
        last = metrics_rows(out / "seed1" / folder)[-1]
        assert cells[2] == f"{last['eval/toy-countdown/avg@2']:.3f} ± 0.000"  # one seed: no spread
        assert cells[3] == f"{last['eval/toy-countdown/pass@2']:.3f} ± 0.000"
        steps = metrics_rows(out / "seed1" / folder)[1:]
        assert cells[5] == f"{sum(r['response_length/mean'] for r in steps) / 2:.1f} ± 0.0"
        assert cells[8] == f"{sum(r['sampling/generated_tokens'] for r in steps) / 1000:.0f}k"
    with Image.open(out / "curves.png") as image:
        assert image.size[0] > 2 * image.size[1]  # four panels side by side
