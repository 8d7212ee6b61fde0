"""Resuming `hf-distill run`: a killed stage resumes from its checkpoints only under the same stage config;
--force, or checkpoints recorded under another config, mean training from scratch."""

import json

import pytest
from conftest import save_text_model, write_sst2_slice
from test_pipeline import write_config

from hf_distill.cli import main
from hf_distill.pipeline import Pipeline
from hf_distill.pipeline.config import load_pipeline_config
from hf_distill.pipeline.workspace import Workspace
from hf_distill.trainer import DistillationTrainer

STAGES = "teacher,student,distill"


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("assets")
    save_text_model(root / "t")
    write_sst2_slice(root, train=32, dev=8)
    return root


def config_for(assets, out, **changes):
    base = {"student.baseline": False, "distill.learning_rate": 1e-5, "refine.epochs": 1.0, "export.enabled": False}
    return write_config(assets, out, **{**base, **changes})


def kill_at_step(monkeypatch, step):
    """Training dies in optimizer step ``step`` (after the checkpoint of step ``step - 1``), as a killed job would."""
    original, calls = DistillationTrainer.training_step, []

    def dying(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == step:
            raise KeyboardInterrupt("killed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(DistillationTrainer, "training_step", dying)


def learning_rates(record):
    return [e["learning_rate"] for e in record["log_history"] if "learning_rate" in e]


@pytest.mark.parametrize("killed_at", [3, None])  # a killed earlier run (checkpoint-2 left), or a finished one
def test_force_trains_from_scratch_with_the_new_settings(assets, tmp_path, monkeypatch, killed_at):
    out = tmp_path / "run"
    path = config_for(assets, out)
    if killed_at:
        kill_at_step(monkeypatch, killed_at)
        with pytest.raises(KeyboardInterrupt):
            Pipeline(load_pipeline_config(path)).run(STAGES.split(","))
        monkeypatch.undo()
        assert not (out / "distill" / ".done").exists()
    else:
        assert main(["run", str(path), "--stages", STAGES]) == 0
    assert (out / "distill" / "student" / "checkpoints" / "checkpoint-2").is_dir()
    new = ["--set", "distill.learning_rate=0.001", "--set", "distill.temperature=4"]
    assert main(["run", str(path), "--force", "--stages", "distill", *new]) == 0
    record = json.loads((out / "distill" / ".done").read_text())["student"]
    assert record["resumed_from"] is None
    rates = learning_rates(record)
    assert len(rates) == 2 and all(1e-4 < r <= 1e-3 for r in rates), rates  # the new schedule from step 1
    recorded = json.loads((out / "distill" / "student" / "checkpoints" / "stage_config.json").read_text())
    assert recorded["distill"]["temperature"] == 4 and recorded["distill"]["learning_rate"] == 0.001


def test_force_with_a_deeper_student_trains_it(assets, tmp_path):
    out = tmp_path / "run"
    path = config_for(assets, out)
    assert main(["run", str(path), "--stages", STAGES]) == 0
    assert main(["run", str(path), "--force", "--stages", "student,distill", "--set", "student.num_layers=2"]) == 0
    saved = json.loads((out / "distill" / "student" / "model" / "config.json").read_text())
    assert saved["num_hidden_layers"] == 2
    assert json.loads((out / "distill" / ".done").read_text())["student"]["resumed_from"] is None


def test_refine_resumes_a_killed_run_and_force_restarts_it(assets, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    path = config_for(assets, out, **{"refine.enabled": True})
    assert main(["run", str(path), "--stages", STAGES]) == 0
    kill_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        Pipeline(load_pipeline_config(path)).run(["refine"])
    monkeypatch.undo()
    assert main(["run", str(path), "--stages", "refine"]) == 0  # same config: continue from checkpoint-2
    record = json.loads((out / "refine" / ".done").read_text())
    assert record["resumed_from"] and record["resumed_from"].endswith("checkpoint-2")
    capsys.readouterr()
    assert main(["run", str(path), "--force", "--stages", "refine", "--set", "refine.learning_rate=0.5"]) == 0
    assert "removing the checkpoints" in capsys.readouterr().out
    record = json.loads((out / "refine" / ".done").read_text())
    assert record["resumed_from"] is None and max(learning_rates(record)) > 0.03  # old: 3e-2 at most


def test_checkpoints_of_another_stage_config_are_never_resumed(tmp_path):
    ws = Workspace(tmp_path)
    folder = tmp_path / "distill" / "student"
    checkpoints = ws.training_checkpoints(folder, {"distill": {"temperature": 2}})
    (checkpoints / "checkpoint-2").mkdir()
    assert (ws.training_checkpoints(folder, {"distill": {"temperature": 2}}) / "checkpoint-2").is_dir()
    assert not (ws.training_checkpoints(folder, {"distill": {"temperature": 3}}) / "checkpoint-2").exists()
    (checkpoints / "checkpoint-2").mkdir()
    (checkpoints / "stage_config.json").unlink()  # written by a version that recorded nothing: unknown config
    assert not (ws.training_checkpoints(folder, {"distill": {"temperature": 3}}) / "checkpoint-2").exists()


def test_a_stage_finished_under_another_config_is_redone_and_left_out_of_the_report(assets, tmp_path, capsys):
    out = tmp_path / "run"
    path = config_for(assets, out, **{"refine.enabled": True})
    assert main(["run", str(path), "--stages", STAGES + ",refine"]) == 0
    # --force for the distill stage only: the refine record (made from the old student) is stale now.
    assert main(["run", str(path), "--force", "--stages", "distill", "--set", "distill.temperature=3"]) == 0
    assert main(["run", str(path), "--stages", "report", "--set", "distill.temperature=3"]) == 0
    assert json.loads((out / "report.json").read_text())["refine"] is None
    capsys.readouterr()
    assert main(["run", str(path), "--stages", "refine,report", "--set", "distill.temperature=3"]) == 0
    printed = capsys.readouterr().out
    assert "refine: done already" not in printed and "[stage 1/2] refine ..." in printed
    assert json.loads((out / "report.json").read_text())["refine"]["method"] == "prompt_tuning"
