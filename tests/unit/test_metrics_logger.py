"""``MetricsLogger``: each step once in metrics.jsonl, and W&B steps that never go backwards after a resume (a
recording stand-in for the ``wandb`` module; the real one runs offline in tests/functional/test_observability.py)."""

import json
import sys
import types

import pytest

from megatron_dapo.errors import ConfigError
from megatron_dapo.metrics import MetricsLogger


class RecordingWandb(types.ModuleType):
    """``wandb.init`` returning a run that records what it is given, or raising W&B's error as without a login."""

    def __init__(self):
        super().__init__("wandb")
        self.inits, self.logged, self.logged_in = [], [], True
        self.errors = types.SimpleNamespace(Error=type("Error", (Exception,), {}))

    def init(self, **kwargs):
        if not self.logged_in:
            raise self.errors.Error("No API key configured. Use `wandb login` to log in.")
        self.inits.append(kwargs)
        wandb = self

        class Run:
            def log(self, metrics, step):
                wandb.logged.append((kwargs["id"], step, dict(metrics)))

            def finish(self):
                wandb.logged.append((kwargs["id"], "finish", None))

        return Run()


@pytest.fixture
def wandb(monkeypatch, tmp_path):
    module = RecordingWandb()
    monkeypatch.setitem(sys.modules, "wandb", module)
    monkeypatch.delenv("WANDB_DIR", raising=False)
    return module


def _run(output_dir, steps, resumed_after=None, **wandb_options):
    logger = MetricsLogger(output_dir, tensorboard=False, resumed_after=resumed_after, wandb_project="proj", **wandb_options)
    for step in steps:
        logger.log(step, {"acc/mean": step / 10})
    logger.close()


def test_resumed_run_continues_the_wandb_run_without_going_back(tmp_path, wandb):
    out = tmp_path / "my_run"
    _run(out, [1, 2, 3, 4], run_config={"trainer": {"max_steps": 6}})  # stopped after step 4, checkpoint at 2
    _run(out, [3, 4, 5, 6], resumed_after=2)

    first, second = wandb.inits
    assert first["id"] == second["id"] == (out / "wandb_run_id").read_text().strip()
    assert second["resume"] == "allow"
    assert (first["project"], first["name"], first["dir"]) == ("proj", "my_run", str(out))
    assert first["config"] == {"trainer": {"max_steps": 6}}
    steps = [step for _, step, _ in wandb.logged if step != "finish"]
    assert steps == [1, 2, 3, 4, 5, 6]  # 3 and 4 were in W&B already: sent once
    assert ("acc/mean", 0.5) in wandb.logged[5][2].items()
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]  # the file keeps the resumed run's steps 3 and 4


def test_a_run_from_step_one_starts_a_new_wandb_run(tmp_path, wandb, monkeypatch):
    out = tmp_path / "run"
    _run(out, [1, 2])
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_files"))
    _run(out, [1, 2], wandb_run_name="named")  # trainer.resume=false or no checkpoint: from step 1 again
    first, second = wandb.inits
    assert first["id"] != second["id"] and second["name"] == "named" and second["dir"] == str(tmp_path / "wandb_files")
    assert [(run_id == second["id"], step) for run_id, step, _ in wandb.logged if step != "finish"] == [
        (False, 1), (False, 2), (True, 1), (True, 2)
    ]


def test_no_wandb_without_a_project(tmp_path, wandb):
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.log(1, {"acc/mean": 0.5})
    logger.close()
    assert wandb.inits == [] and not (tmp_path / "wandb_run_id").exists()


def test_wandb_that_cannot_start_is_a_config_error(tmp_path, wandb):
    wandb.logged_in = False
    with pytest.raises(ConfigError, match=r"logging.wandb=true: W&B could not start the run \(No API key.*WANDB_MODE=offline"):
        MetricsLogger(tmp_path, tensorboard=False, wandb_project="proj")
