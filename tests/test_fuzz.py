"""Generated bad input through the engine's input functions, the command line and every page:
only the project's own clear errors come out, never a traceback, and no run is lost.

Hypothesis draws the cases (derandomized, so CI sees the same ones every time); every test
states which errors are the expected ones, and anything else fails it."""

import io
import json
import shutil
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from engine import inputs
from engine.checkpoint import CheckpointError, load_checkpoint, load_model
from engine.config import ConfigError, RunConfig, config_from_dict
from engine.jobs import STATES, Job

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "checkpoints" / "digits_small_cnn_la.pt"
FUZZ = settings(max_examples=150, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.function_scoped_fixture,
                                       HealthCheck.too_slow])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12)
    | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=8)
FIELDS = {
    "model": ["backbone", "head", "num_classes", "in_chans", "input_size", "stride_plan", "xi",
              "xi_denominator", "patch_kernel", "patch_stride", "plain_hidden", "stem_norm",
              "timm_output_stride", "pretrained"],
    "data": ["dataset", "root", "input_size", "train_size", "augment", "download", "resize",
             "seed", "skip_unreadable", "crowd_boxes"],
    "loss": ["multilabel", "gamma_max", "ramp_epochs"],
    "train": ["epochs", "batch_size", "recipe", "lr", "momentum", "weight_decay", "milestones",
              "seed", "device", "amp", "channels_last", "compile", "micro_batches",
              "data_on_device", "checkpoint_minutes"],
}
sections = st.fixed_dictionaries({}, optional={
    section: st.dictionaries(st.sampled_from(names), json_values, max_size=3)
    for section, names in FIELDS.items()})
configs = sections | st.dictionaries(st.sampled_from(["model", "data", "loss", "train", "name",
                                                      "tags", "notes", "bogus"]),
                                     json_values, max_size=3)


@FUZZ
@given(configs)
def test_any_config_is_valid_or_a_config_error(data):
    try:
        cfg = config_from_dict(RunConfig, data)
    except ConfigError as exc:
        assert str(exc) and "Traceback" not in str(exc)
        return
    assert isinstance(cfg.train.compile, bool) and isinstance(cfg.train.epochs, int)
    assert isinstance(cfg.model.xi, int | float) and 0 <= cfg.model.xi <= 1


def _png(image: Image.Image, fmt: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


SEEDS = [_png(Image.new("RGB", (30, 20), (9, 9, 9))), _png(Image.new("RGBA", (5, 40)), "PNG"),
         _png(Image.new("RGB", (16, 16)), "JPEG"), _png(Image.new("P", (7, 7)), "GIF"),
         _png(Image.new("I;16", (8, 8)), "PNG"), _png(Image.new("RGB", (12, 9)), "WEBP")]


@st.composite
def damaged_images(draw):
    """Real image files, cut short, overwritten in places, or random bytes."""
    if draw(st.booleans()):
        return draw(st.binary(max_size=300))
    data = bytearray(draw(st.sampled_from(SEEDS)))
    cut = draw(st.integers(0, len(data)))
    for _ in range(draw(st.integers(0, 4))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    return bytes(data[:cut] if draw(st.booleans()) else data)


@FUZZ
@given(damaged_images(), st.sampled_from(["squash", "center_crop"]))
def test_any_upload_is_an_input_or_an_image_error(payload, policy):
    try:
        out = inputs.image_from_bytes(payload, (16, 16), "fuzz.bin", policy)
    except inputs.ImageInputError as exc:
        assert "fuzz.bin" in str(exc) and " object at 0x" not in str(exc)
        return
    assert out.shape == (3, 16, 16)


@pytest.fixture(scope="module")
def checkpoint_bytes():
    return SHIPPED.read_bytes()


@settings(max_examples=60, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_any_damaged_checkpoint_is_a_checkpoint_error(checkpoint_bytes, tmp_path, data):
    raw = bytearray(checkpoint_bytes)
    cut = data.draw(st.integers(0, len(raw)))
    for _ in range(data.draw(st.integers(0, 3))):
        raw[data.draw(st.integers(0, len(raw) - 1))] = data.draw(st.integers(0, 255))
    path = tmp_path / "fuzz.pt"
    path.write_bytes(bytes(raw[:cut] if data.draw(st.booleans()) else raw))
    try:
        load_model(path)
    except CheckpointError as exc:
        assert "weights_only" not in str(exc)


@FUZZ
@given(json_values | st.dictionaries(st.sampled_from(
    ["state", "process", "pid", "launched", "epochs_done", "best_metric", "reason", "eta_s"]),
    json_values, max_size=5))
def test_any_status_file_reads_as_a_known_state(tmp_path, content):
    job = Job(tmp_path / "job")
    job.folder.mkdir(exist_ok=True)
    try:
        job.status_path.write_text(json.dumps(content))
    except ValueError:  # NaN in strict JSON: write it the way Python does
        job.status_path.write_text(json.dumps(content, allow_nan=True))
    status = job.status()
    assert status.state in (*STATES, None)
    assert not job.stop() or status.state in ("starting", "running")


# ----------------------------------------------------------------------------------------------
# The command line, with generated arguments


@pytest.fixture(scope="module")
def precious(tmp_path_factory):
    """A run store with a finished run whose files must survive every fuzzed command."""
    from engine.config import DataConfig, ModelConfig, TrainConfig
    from engine.runs import RunStore
    from engine.train import prepare_run_config, train_run

    root = tmp_path_factory.mktemp("precious")
    store = RunStore(root / "runs")
    run = store.create(prepare_run_config(RunConfig(
        name="keep-me", model=ModelConfig(backbone="small_cnn"),
        data=DataConfig(train_size=64, test_size=32), train=TrainConfig(epochs=1,
                                                                         batch_size=32))))
    assert train_run(run, progress_bar=False) == "finished"
    files = root / "files"
    files.mkdir()
    (files / "empty.pt").write_bytes(b"")
    (files / "text.json").write_text("{not json")
    (files / "list.json").write_text("[1, 2]")
    (files / "section.json").write_text('{"train": 5}')
    (files / "bool.json").write_text('{"train": {"compile": "no"}}')
    (files / "empty.mat").write_bytes(b"")
    snapshot = {p: p.read_bytes() for p in run.path.rglob("*") if p.is_file()
                and p.suffix in (".pt", ".json", ".jsonl") and p.name != "status.json"}
    return root, store, run, snapshot


BAD_VALUES = ["", "-1", "0", "1e309", "nan", "abc", "../..", "/", "/etc/passwd", "é∂", "[1,",
              "{}", "true", "no", "3.5", "99999999999", " ", "--", "a" * 300]


@st.composite
def command_lines(draw, files: Path, runs: Path):
    value = st.sampled_from(BAD_VALUES + [str(p) for p in sorted(files.iterdir())])
    name = st.sampled_from(BAD_VALUES + ["nope", "index.sqlite"])
    settings_ = st.builds(lambda f, v: f"{f}={v}", st.sampled_from(
        [f"{s}.{f}" for s, names in FIELDS.items() for f in names] + ["x.y", "train", "=",
                                                                      "model."]), value)
    kind = draw(st.sampled_from(["train", "set", "evaluate", "runs", "resume", "export", "data",
                                 "bench", "sweep", "mil", "bench-eval"]))
    if kind == "train":
        flag = draw(st.sampled_from(["--epochs", "--batch-size", "--lr", "--xi", "--dataset",
                                     "--backbone", "--head", "--config", "--input-size",
                                     "--name", "--device", "--micro-batches"]))
        return ["train", flag, draw(value), "--runs-dir", str(runs)]
    if kind == "set":
        return ["train", "--set", draw(settings_), "--runs-dir", str(runs)]
    if kind == "evaluate":
        return ["evaluate", draw(value), "--metrics", draw(value), "--runs-dir", str(runs)]
    if kind == "runs":
        return ["runs", draw(st.sampled_from(["show", "stop", "delete"])), draw(name),
                "--runs-dir", str(runs)]
    if kind in ("resume", "export"):
        return [kind, draw(name), *(["--out", draw(value)] if kind == "export" else []),
                "--runs-dir", str(runs)]
    if kind == "data":
        return ["data", "check", draw(st.sampled_from(["image_folder", "coco", "svhn", "nope"])),
                "--data-root", draw(value)]
    if kind == "bench":
        return ["bench", "--models", draw(value), "--batch", "2", "--steps", "1", "--no-isolate",
                "--stride-plans", draw(value)]
    if kind == "sweep":
        return ["sweep", "--grid", draw(settings_), "--sweep-name", draw(name),
                "--runs-dir", str(runs)]
    if kind == "mil":
        flag = draw(st.sampled_from(["--dataset", "--method", "--folds", "--hidden", "--lr",
                                     "--select", "--epochs"]))
        return ["mil", flag, draw(value), "--out", str(runs.parent / "mil-out")]
    return ["bench-eval", draw(value), "--images", "4", "--xi-grid", draw(value)]


def test_generated_command_lines_give_one_line_errors_and_lose_nothing(precious, monkeypatch):
    """Anything a valid command line would start (training, a sweep, a MIL run) is replaced by
    a stand-in: this test is about the input checks in front of them."""
    from engine import cli, train
    from engine.mil import experiment
    from engine.runs import RunStore

    root, store, run, snapshot = precious
    started = []
    monkeypatch.setattr(train, "train_run", lambda *a, **k: started.append(a) or "finished")
    monkeypatch.setattr(experiment, "run_experiment", lambda *a, **k: started.append(a) or [])
    monkeypatch.setattr("engine.sweep.run_sweep", lambda *a, **k: started.append(a) or [])
    seen = {"cases": 0, "clear_errors": 0, "ok": 0}

    @settings(max_examples=250, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(command_lines(root / "files", store.root))
    def check(argv):
        import contextlib

        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                code = cli.main(argv)
            except SystemExit as exc:  # argparse's own usage errors
                code = exc.code
        text = err.getvalue()
        assert "Traceback" not in text and "unexpected" not in text, (argv, text)
        assert code in (0, 2), (argv, code, text)
        seen["cases"] += 1
        seen["clear_errors" if code == 2 else "ok"] += 1

    try:
        check()
    finally:
        shutil.rmtree(root / "mil-out", ignore_errors=True)
    assert seen["cases"] >= 200 and seen["clear_errors"] > 150
    assert started  # some generated lines were valid, and reached the work behind the checks
    for path, content in snapshot.items():
        assert path.read_bytes() == content, path
    assert "keep-me" in RunStore(store.root).names()
    assert load_checkpoint(run.best_checkpoint)["format"]


# ----------------------------------------------------------------------------------------------
# Every page, with nasty text in every text field and every button pressed

NASTY = ["", " ", "../../etc", "/", "/etc/passwd", "~", "a" * 500, "é∂ƒ", "0, x", "1,,2",
         "nan", "-1", "[[1,2]", "{}", "true", "x;y", "\x00", "index.sqlite-wal"]
PAGES = ["home", "explorer", "compare", "curves", "train", "runs", "sweep", "stride", "mil",
         "transfer"]


@pytest.mark.parametrize("page", PAGES)
def test_every_page_takes_nasty_text_and_every_button(page, tmp_path, monkeypatch):
    """Whatever is typed and pressed, a page shows messages and never an exception. Starting
    background work is replaced by a stand-in, so that a nasty value that happens to be valid
    ("true" is a fine run name) starts nothing real."""
    from streamlit.testing.v1 import AppTest

    from engine import jobs

    def spawn(self, args, env=None, **fields):
        return jobs.ProcessIdentity.current()

    monkeypatch.setattr(jobs.Job, "spawn", spawn)
    monkeypatch.setenv("LOSSATTN_RUNS", str(tmp_path / "runs"))
    monkeypatch.setenv("LOSSATTN_DATA", str(tmp_path))
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    at.run()
    at.switch_page(f"pages/{page}.py").run()
    assert not at.exception
    for box in at.selectbox:  # a data root chosen: its sub-folder field takes text too
        if box.key and box.key.endswith("_root") and "$LOSSATTN_DATA" in box.options:
            box.set_value("$LOSSATTN_DATA").run()
    keys = [t.key for t in at.text_input if t.key and not t.disabled]
    for i, key in enumerate(keys):
        at.text_input(key=key).set_value(NASTY[i % len(NASTY)]).run()
        assert not at.exception, (page, key)
        for value in NASTY:
            at.text_input(key=key).set_value(value).run()
            assert not at.exception, (page, key, value)
    for key in [b.key for b in at.button if b.key and not b.disabled]:
        if key not in {b.key for b in at.button}:  # an earlier click left the page (Home's)
            at.switch_page(f"pages/{page}.py").run()
        if key in {b.key for b in at.button}:
            at.button(key=key).click().run()
            assert not at.exception, (page, key)
