"""``megatron-dapo report``: a run's metrics.jsonl (hand-written here) drawn as a PNG; a clear error without one."""

import json

import pytest
from matplotlib.image import imread

from megatron_dapo.cli import main
from megatron_dapo.report import read_metrics

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _write_rows(output_dir, rows, tail: str = "") -> None:
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "metrics.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def _training_row(step: int) -> dict:
    return {
        "step": step, "acc/mean": 0.5 + 0.05 * step, "reward/mean": 0.1 * step, "entropy/mean": 1.0 / step,
        "response_length/mean": 10.0 + step, "pg_clipfrac/high": 0.01, "pg_clipfrac/low": 0.002,
        "prob/up_clipped_mean": 0.3, "sampling/kept_group_frac": 0.6, "sampling/num_gen_batches": 1.0,
        "timing/generate": 2.0, "timing/train": 1.0, "timing/step": 3.5,
    }


def test_report_draws_a_png_from_sparse_rows_with_missing_keys(tmp_path, capsys):
    run = tmp_path / "run"
    rows = [{"step": 0, "eval/toy/avg@8": 0.55}] + [_training_row(step) for step in (1, 2, 3)]
    rows[2].pop("entropy/mean")  # a key missing in one row
    rows.append({"step": 3, "eval/toy/avg@8": 0.7, "note": "text values are ignored"})
    _write_rows(run, rows, tail='{"step": 4, "acc/me')  # the line a running trainer is writing

    assert main(["report", str(run)]) == 0
    last_line = capsys.readouterr().out.strip().splitlines()[-1]
    assert last_line == f"report: {run / 'report.png'}"
    png = run / "report.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    image = imread(png)
    height, width = image.shape[:2]
    assert height >= 600 and width >= 800
    assert image[..., :3].std() > 0.05  # not a blank canvas

    metrics = read_metrics(run / "metrics.jsonl")
    assert list(metrics) == [0, 1, 2, 3]  # step 4 is still being written
    assert metrics[0] == {"eval/toy/avg@8": 0.55}
    assert metrics[3]["eval/toy/avg@8"] == 0.7 and metrics[3]["acc/mean"] == pytest.approx(0.65)
    assert "entropy/mean" not in metrics[2] and "note" not in metrics[3]


def test_report_out_option_writes_elsewhere(tmp_path, capsys):
    run, out = tmp_path / "run", tmp_path / "plots" / "mine.png"
    out.parent.mkdir()
    _write_rows(run, [_training_row(1)])
    assert main(["report", str(run), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1] == f"report: {out}"
    assert out.read_bytes()[:8] == PNG_SIGNATURE and not (run / "report.png").exists()


@pytest.mark.parametrize("content", [None, "", '{"step": 1, "acc/me'])
def test_report_without_metrics_is_a_one_line_error(tmp_path, capsys, content):
    run = tmp_path / "run"
    run.mkdir()
    if content is not None:
        (run / "metrics.jsonl").write_text(content)
    assert main(["report", str(run)]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and str(run / "metrics.jsonl") in lines[0]
    assert not (run / "report.png").exists()


def test_a_non_json_line_is_named_not_skipped(tmp_path, capsys):
    """Only the unterminated last line (being written) may be skipped; a broken line inside is refused by number."""
    run = tmp_path / "run"
    _write_rows(run, [_training_row(1)])
    with (run / "metrics.jsonl").open("a") as f:
        f.write("Traceback (most recent call last):\n" + json.dumps(_training_row(2)) + "\n")
    assert main(["report", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {run / 'metrics.jsonl'}: line 2 is not JSON"), lines
    assert not (run / "report.png").exists()
