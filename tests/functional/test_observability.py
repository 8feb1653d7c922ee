"""What a toy run records besides metrics.jsonl: rollout dumps, report.png and an offline W&B run (one run)."""

import json
import os
import re
import struct

import pytest

from ..helpers import run_cli

pytestmark = pytest.mark.slow  # end-to-end: minutes on 2 cores

STEPS, GROUPS, G = 2, 16, 8  # trainer.max_steps; the toy config's train_batch_size and rollout.n
MAX_LENGTH, BUFFER = 16, 4  # the toy config's rollout.max_response_length and algorithm.overlong_buffer_len
ANSWER = re.compile(r"^Answer: (-?\d+)$")


@pytest.fixture(scope="module")
def run(tmp_path_factory, toy_warm_start):
    out = tmp_path_factory.mktemp("observability")
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(out / "wandb_files")}
    (out / "wandb_files").mkdir()
    result = run_cli(
        f"trainer.output_dir={out / 'run'}", toy_warm_start, "data.toy_num_val=8", "rollout.val_n=2",
        "algorithm.max_num_gen_batches=0", "trainer.export_hf=false", f"trainer.max_steps={STEPS}",
        "logging.rollout_dump_interval=1", "logging.wandb=true", env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().splitlines()[-1].startswith("eval accuracy:")
    return out


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_rollout_dumps_hold_every_trained_sample(run):
    for step in range(1, STEPS + 1):
        rows = [json.loads(line) for line in (run / "run" / "rollouts" / f"step_{step}.jsonl").read_text().splitlines()]
        assert len(rows) == GROUPS * G
        assert [(r["step"], r["group"], r["sample"]) for r in rows] == [(step, g, s) for g in range(GROUPS) for s in range(G)]
        exact_lengths, parsed = 0, 0
        for row in rows:
            assert row["finish_reason"] in ("stop", "length") and row["prompt"].endswith("=")
            # the toy reward: +1 correct / -1 otherwise, plus the overlong penalty over the last BUFFER tokens
            penalty = -min(max(row["length"] - (MAX_LENGTH - BUFFER), 0), BUFFER) / BUFFER
            assert row["reward"] == pytest.approx((1.0 if row["acc"] else -1.0) + penalty)
            match = ANSWER.match(row["response"])
            if match:  # the toy format, read by hand: correct iff the number is the ground truth
                parsed += 1
                assert row["acc"] == (int(match.group(1)) == int(row["ground_truth"])), row
            # one token per character (the toy tokenizer) plus the stop token; tokens that decode to nothing
            # (padding, unused vocabulary) make a response shorter than its length, never longer
            tokens = len(row["response"]) + (row["finish_reason"] == "stop")
            assert row["length"] >= tokens and (row["finish_reason"] == "stop" or row["length"] == MAX_LENGTH)
            exact_lengths += row["length"] == tokens
        assert exact_lengths >= 0.9 * len(rows) and parsed >= 0.5 * len(rows)
        for group in range(GROUPS):  # dynamic sampling kept only groups with accuracy strictly between 0 and 1
            assert 0 < sum(r["acc"] for r in rows[group * G : (group + 1) * G]) < G


def test_run_logs_up_clipped_probability_and_writes_report(run):
    for row in _metrics(run / "run")[1:]:  # row 0: the evaluation before training
        assert 0.0 <= row["prob/up_clipped_mean"] <= 1.0
        if row["pg_clipfrac/high"] == 0.0:
            assert row["prob/up_clipped_mean"] == 0.0
    assert (run / "run" / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    result = run_cli(str(run / "run"), "--out", str(run / "again.png"), command="report", config=None, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == f"report: {run / 'again.png'}"


def _wandb_records(path):
    """The records of a ``.wandb`` file: W&B's 7-byte header, then a LevelDB log (32 KiB blocks, records split
    into chunks with a 7-byte header: CRC, length, type) of ``wandb_internal_pb2.Record`` messages."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, offset, pending, records = 32768, 7, b"", []
    while offset + 7 <= len(data):
        room = block - offset % block
        _, length, kind = struct.unpack("<IHB", data[offset : offset + 7])
        if room < 7 or kind == 0:  # block trailer or zero padding
            offset += room
            continue
        pending += data[offset + 7 : offset + 7 + length]
        offset += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_offline_run_holds_every_step(run):
    run_dirs = list((run / "wandb_files" / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 1
    run_id = (run / "run" / "wandb_run_id").read_text().strip()
    assert run_dirs[0].name.endswith(f"-{run_id}")
    records = _wandb_records(run_dirs[0] / f"run-{run_id}.wandb")
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs[0].project == "megatron-dapo" and runs[0].display_name == "run"  # output_dir's folder name
    history = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            items = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item}
            history[record.history.step.num] = items
    metrics = _metrics(run / "run")
    assert sorted(history) == [row["step"] for row in metrics] == list(range(STEPS + 1))  # step 0: evaluation
    assert all(history[0][key] == pytest.approx(value) for key, value in metrics[0].items() if key != "step")
    for row in metrics[1:]:
        for key in ("acc/mean", "prob/up_clipped_mean", "actor/pg_loss", "timing/step"):
            assert history[row["step"]][key] == pytest.approx(row[key]), key
