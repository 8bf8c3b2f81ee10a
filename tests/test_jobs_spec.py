"""The job layer's data (issue 33, item 1): the State enum, the versioned Status read from the
files the previous version wrote, the typed specs in spec.json, the one child entry
``python -m engine job FOLDER``, and the queue starting a job queued by the previous version."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.job_spec import (
    BenchSpec,
    MilSpec,
    SpecError,
    SweepSpec,
    TrainSpec,
    read_spec,
    spec_from_dict,
)
from engine.job_status import (
    ACTIVE,
    ENDED,
    LIVE,
    STATUS_VERSION,
    State,
    Status,
    merge_status,
    parse_status,
    read_status,
)
from engine.jobs import Job, dispatch, wait
from engine.slots import LIMIT_ENV, Slots, job_environment

ROOT = Path(__file__).resolve().parents[1]

# What the previous version wrote (no "version" field), by hand, as it lies in old run stores.
OLD_RUN_STATUS = {
    "state": "finished", "reason": "", "created": 1700000000.0, "updated": 1700000100.5,
    "launched": 1700000001.0, "started": 1700000002.0, "finished": 1700000100.0,
    "process": {"pid": 4242, "create_time": 1700000001.5, "host": "old-box"},
    "epochs": 3, "epochs_done": 3, "epoch": 2, "step": 9, "steps": 9, "images_per_s": 512.5,
    "metric_name": "accuracy", "best_metric": 0.93, "best_epoch": 2, "last_metric": 0.92,
    "device": "cpu", "threads_from": "budget", "cpu_threads": 2, "data_on_device": False}


# ----------------------------------------------------------------------------------------------
# State


def test_states_are_a_str_enum_and_the_sets_hold_them():
    assert [s.value for s in State] == ["created", "queued", "starting", "running", "finished",
                                        "stopped", "failed"]
    assert State.FINISHED == "finished" and f"{State.RUNNING}" == "running"
    assert json.dumps({"state": State.STOPPED}) == '{"state": "stopped"}'
    assert "running" in ACTIVE and "queued" not in ACTIVE and "queued" in LIVE
    assert ENDED | LIVE | {State.CREATED} == set(State) and not ENDED & LIVE


# ----------------------------------------------------------------------------------------------
# Status: the old files read, the new ones keep their keys


def test_a_status_file_of_the_previous_version_reads(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps(OLD_RUN_STATUS))
    status = read_status(path)
    assert isinstance(status, Status) and status.version == 1  # no version field: the old one
    assert status.state is State.FINISHED and status.reason == ""
    assert status.process.pid == 4242 and status.process.host == "old-box"
    assert (status.created, status.finished, status.kind) == (1700000000.0, 1700000100.0, None)
    assert status.fields["epochs_done"] == 3 and status.fields["best_metric"] == 0.93
    assert status.fields["threads_from"] == "budget"  # a field the job layer does not know
    assert not {"state", "reason", "process", "created", "version"} & set(status.fields)


def test_the_new_version_writes_the_same_keys_plus_version(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps(OLD_RUN_STATUS))
    written = merge_status(path, {"reason": "looked at"})
    data = json.loads(path.read_text())
    assert set(data) == set(OLD_RUN_STATUS) | {"version"} and data["version"] == STATUS_VERSION
    assert {k: v for k, v in data.items() if k not in ("version", "reason", "updated")} == {
        k: v for k, v in OLD_RUN_STATUS.items() if k not in ("reason", "updated")}
    assert written.version == STATUS_VERSION and written.reason == "looked at"
    # Status.to_dict is the same object again (what a legacy dict reader is given)
    assert parse_status(written.to_dict(), "again") == written


def test_a_legacy_bare_pid_is_dropped_when_written_again(tmp_path):
    path = tmp_path / "status.json"
    path.write_text(json.dumps({"state": "created", "pid": 1234}))
    assert read_status(path).process is None
    merge_status(path, {"reason": "x"})
    assert "pid" not in json.loads(path.read_text())


def test_writes_refuse_a_state_that_would_read_as_failed(tmp_path):
    path = tmp_path / "status.json"
    with pytest.raises(ValueError, match="'state' must be one of"):
        merge_status(path, {"state": "done"})
    assert not path.exists()


def test_job_status_is_a_status_with_no_dict_bridge(tmp_path):
    job = Job(tmp_path / "job")
    assert job.status().missing and job.status().state is None  # never created
    job.update(state=State.CREATED, kind="mil", task=0)
    status = job.status()
    assert isinstance(status, Status) and status.state == "created" and status.kind == "mil"
    assert status.fields == {"task": 0}
    assert not hasattr(status, "get") and not hasattr(status, "__getitem__")
    with pytest.raises(TypeError):
        status.fields["task"] = 1  # read-only


# ----------------------------------------------------------------------------------------------
# Specs


@pytest.mark.parametrize("spec", [
    TrainSpec(run_dir="/runs/a", resume=True),
    SweepSpec(runs_dir="/runs", sweep="s", config="/runs/_sweeps/s/base.json",
              grid=[("loss.gamma_max", [0.0, 0.1]), ("model.stride_plan", [[1, 2], [2, 2]])],
              parallel="auto", executor="ray", ray_address="head:6379", ray_cpus=2.0),
    BenchSpec(models=[("small_cnn", "loss_attention")], stride_plans=[(1, 2, 1), None],
              json="/x/bench.json"),
    MilSpec(datasets=["digit_bags"], methods=["attention", "loss_attention"],
            config={"folds": 2, "hidden": [8]}, out="/runs/_mil/e", threads=1),
])
def test_every_kind_of_spec_goes_through_json_unchanged(spec):
    data = json.loads(json.dumps(spec.to_dict()))
    assert data["kind"] == spec.kind and data["version"] == 1
    assert spec_from_dict(data) == spec


@pytest.mark.parametrize("data, message", [
    ([1], "must hold a JSON object"),
    ({"run_dir": "/x"}, "field 'kind' must be one of"),
    ({"kind": "deploy"}, "field 'kind' must be one of"),
    ({"kind": "train", "version": 7, "run_dir": "/x"}, "field 'version'"),
    ({"kind": "train"}, "field 'run_dir' is missing"),
    ({"kind": "train", "run_dir": "/x", "resume": "yes"}, "field 'resume' must be true or false"),
    ({"kind": "train", "run_dir": "/x", "epochs": 3}, "unknown field 'epochs'"),
    ({"kind": "sweep", "runs_dir": "/r", "sweep": "s", "config": "/c", "parallel": 0},
     "field 'parallel'"),
    ({"kind": "sweep", "runs_dir": "/r", "sweep": "s", "config": "/c", "grid": [["a", []]]},
     "field 'grid'"),
    ({"kind": "bench", "models": [["small_cnn"]]}, "field 'models'"),
    ({"kind": "mil", "datasets": ["fox"], "methods": ["attention"], "out": "/o",
      "config": {"folds": -1}}, "field 'config'.*folds"),
])
def test_a_malformed_or_unknown_spec_names_the_field(data, message):
    with pytest.raises(SpecError, match=message):
        spec_from_dict(data)


def test_a_starter_mistake_is_named_before_anything_starts(tmp_path):
    with pytest.raises(SpecError, match="field 'threads'"):
        MilSpec(datasets=["fox"], methods=["attention"], config={}, out="/o", threads=0)
    with pytest.raises(SpecError, match="spec.json is missing"):
        read_spec(tmp_path)


def test_the_job_command_names_a_missing_or_bad_spec(tmp_path):
    (tmp_path / "spec.json").write_text(json.dumps({"kind": "train", "resume": True}))
    out = subprocess.run([sys.executable, "-m", "engine", "job", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 2 and "field 'run_dir' is missing" in out.stderr, out.stderr


# ----------------------------------------------------------------------------------------------
# The queue: a job queued by the previous version still starts


def _queue_by_hand(root: Path, folder: Path, start: dict) -> Job:
    folder.mkdir(parents=True)
    now = time.time()
    (folder / "status.json").write_text(json.dumps({  # the previous version's file
        "state": "queued", "reason": "waiting for a free slot", "process": None,
        "queued": now, "updated": now, "kind": "bench"}))
    (folder / "spawn.json").write_text(json.dumps(start))
    Slots(root).enqueue(folder)
    return Job(folder)


def test_a_job_queued_by_the_previous_version_is_started_with_its_command_line(tmp_path,
                                                                               monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "2")
    job = _queue_by_hand(tmp_path, tmp_path / "_bench" / "old", {
        "args": ["models"], "env": {}, "environment": job_environment()})
    assert dispatch(tmp_path) == [job.folder.resolve()]
    status = wait(job, timeout=300, poll=0.1)
    assert status.state == State.FINISHED, (status, job.last_output_line())
    assert "loss_attention" in job.log_path.read_text()  # what `python -m engine models` says
    assert json.loads(job.status_path.read_text())["version"] == STATUS_VERSION
    assert not Slots(tmp_path).queued()


def test_a_queued_job_whose_spec_is_malformed_fails_with_the_field_named(tmp_path,
                                                                          monkeypatch):
    monkeypatch.setenv(LIMIT_ENV, "2")
    job = _queue_by_hand(tmp_path, tmp_path / "_bench" / "bad", {"env": {}, "environment": {}})
    (job.folder / "spec.json").write_text(json.dumps({"kind": "bench", "models": "all"}))
    assert dispatch(tmp_path) == []
    status = job.status()
    assert status.state == State.FAILED and "field 'models'" in status.reason
    assert not Slots(tmp_path).queued() and job.process() is None
