"""Every page under AppTest: no exception, no error in normal use, and the key widgets change
what is shown. Runs go to a temporary run store (LOSSATTN_RUNS)."""

import base64
import html
import json
import re
import time
from pathlib import Path

import pytest
from conftest import errors, open_page

from engine import launch as background
from engine.config import DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.runs import RunStore

ROOT = Path(__file__).resolve().parents[1]
TINY = {"tr_train_size": 64, "tr_test_size": 32, "tr_epochs": 1, "tr_batch": 32}


@pytest.fixture
def runs_root(tmp_path, monkeypatch):
    root = tmp_path / "runs"
    monkeypatch.setenv("LOSSATTN_RUNS", str(root))
    return root




def test_no_page_draws_a_stray_string():
    """Streamlit's magic writes any bare string statement of a page script onto the page: only
    the module docstring may stand alone (a field "docstring" once showed on the Train page)."""
    import ast

    for script in [ROOT / "app.py", *sorted((ROOT / "pages").glob("*.py"))]:
        body = ast.parse(script.read_text()).body
        stray = [node.lineno for node in body[1:] if isinstance(node, ast.Expr)
                 and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str)]
        assert not stray, f"{script.name}: bare strings at lines {stray}"


def tiny_run(root: Path, name: str, **model) -> str:
    store = RunStore(root)
    config = RunConfig(name=name, model=ModelConfig(backbone="small_cnn", **model),
                       data=DataConfig(train_size=64, test_size=32),
                       train=TrainConfig(epochs=1, batch_size=32))
    run = background.launch(store, config)
    assert background.wait(run, timeout=600).state == "finished"
    return name


def test_home(runs_root):
    at = open_page()
    assert at.title[0].value == "Loss-Attention Studio"
    assert len(at.latex) >= 2
    # the patch loss's ramp-up is the shipped model's own (12 of its 30 epochs, its card says),
    # not the paper's 80 of 200
    assert any(r"\tau/12)^2" in tex.value for tex in at.latex)
    assert not any("80)" in tex.value for tex in at.latex)
    assert any("the first 12 of its 30 epochs, to γmax = 0.1" in c.value for c in at.caption)
    cards = [e.label for e in at.expander]
    assert cards[0] == "Model card: digits_small_cnn_la"  # the default model's card first
    assert cards[-1] == "Model cards: the γmax family (7 models)"
    assert any("test_acc" in m.value for m in at.markdown)
    # the catalog tables: every backbone and head with its description
    assert any(m.value.startswith("| backbone | description |") and "| resnet18 |" in m.value
               for m in at.markdown)
    assert any("| loss\\_attention | Loss-Attention, conv patches" in m.value
               for m in at.markdown)
    assert at.sidebar.selectbox[0].value == "shipped: digits_small_cnn_la"
    at.button(key="home_go").click().run()
    assert at.title[0].value == "Patch Explorer" and not at.exception
    at = open_page()
    at.button(key="home_gamma").click().run()  # one click to the γmax slider
    assert at.title[0].value == "Patch Explorer" and not at.exception
    assert at.session_state["model_source"] == "shipped: digits_live_gamma0.3"
    assert len(at.select_slider(key="w_gamma").options) == 7


FIRST_PAGE_PROBE = """
import sys
from streamlit.testing.v1 import AppTest
import ui.st_models as st_models
st_models._PRELOAD_STARTED.acquire()  # as if the background import had not had its turn yet
at = AppTest.from_file(sys.argv[1], default_timeout=300)
if sys.argv[2] != "home":
    at.switch_page(f"pages/{sys.argv[2]}.py")
at.run()
assert not at.exception, [e.message for e in at.exception]
print("TORCH" if "torch" in sys.modules else "NO TORCH")
print("TITLE", at.title[0].value)
print("LINE", [c.value for c in at.sidebar.caption])
st_models._PRELOAD_STARTED.release()
st_models.preload_torch()
assert st_models._TORCH_LOADED.wait(120)
print("PRELOADED" if "torch" in sys.modules else "NOT PRELOADED", st_models.device_badge())
"""
DEVICE = r"(CPU \(\d+ threads\)|GPU: .+)"


@pytest.mark.parametrize("page, title, torch_line", [
    ("home", "Loss-Attention Studio", "NO TORCH"), ("explorer", "Patch Explorer", "TORCH")])
def test_the_first_page_waits_for_torch_only_if_it_needs_it(runs_root, page, title, torch_line):
    """Home, the usual first page, ends without importing torch (about 1 s, most of its first
    render before): its sidebar line waits for the background import, which then holds torch
    for the pages that need it. A page that imported torch itself (a link opened first) names
    the device at once, whether or not the background import has had its turn."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", FIRST_PAGE_PROBE, str(ROOT / "app.py"), page],
                         cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.splitlines()
    assert lines[0] == torch_line and lines[1] == f"TITLE {title}", lines
    line = "Device: loading torch…" if page == "home" else DEVICE
    assert re.fullmatch(rf"LINE \['{line} · runs in `{re.escape(str(runs_root))}`'\]",
                        lines[2]), lines
    assert re.fullmatch(f"PRELOADED {DEVICE}", lines[3]), lines


def map_svg(at, key: str) -> str:
    """The Explorer's SVG picture marked ``data-map=key``, decoded from its image element."""
    for image in at.get("image"):
        for img in image.proto.imgs:
            if img.url.startswith("data:image/svg+xml;base64,"):
                svg = base64.b64decode(img.url.split(",", 1)[1]).decode()
                if f'data-map="{key}"' in svg:
                    return svg
    raise AssertionError(f"no picture {key!r} on the page")


def image_captions(at) -> list[str]:
    return [img.caption for image in at.get("image") for img in image.proto.imgs]


def map_title(svg: str) -> str:
    return html.unescape(re.search(r'<text x="0" y="17"[^>]*>([^<]*)</text>', svg).group(1))


def test_patch_explorer_slider_filters_and_state(runs_root):
    at = open_page("explorer")
    assert not errors(at)

    def kept_text():
        return next(m.value for m in at.markdown if "patches kept" in m.value)

    def matches():
        return next(n.label for n in at.number_input if n.label.startswith("Image ("))

    def eq5_table() -> list[str]:
        return next(m.value for m in at.markdown if m.value.startswith("| term |")).splitlines()

    # the shipped model by its one name, and the kept-patch box's size said under the map
    assert any(c.value.startswith("**digits\\_small\\_cnn\\_la**: small_cnn") for c in at.caption)
    assert any("reaches past their tinted cells" in c for c in image_captions(at))
    # ξ = 0.1 removes patches: they are a row of their own, α = 0, apart from the kept ones
    removed = next(line for line in eq5_table() if "removed |" in line)
    assert re.match(r"\| the \d+ patch(es)? removed \| 0\.0000 \|", removed), removed
    before, weights = kept_text(), map_svg(at, "ex_map")
    at.slider(key="w_xi").set_value(0.0).run()
    assert not at.exception and kept_text() != before and map_svg(at, "ex_map") != weights
    assert re.search(r"\*\*(\d+)\*\* of \1 patches", kept_text())  # ξ = 0 keeps them all
    assert re.search(r'<g class="removed"[^>]*></g>', map_svg(at, "ex_map"))  # none greyed
    everything = matches()
    at.selectbox(key="w_ex_outcome").set_value("incorrect").run()
    assert matches() != everything
    at.selectbox(key="w_ex_outcome").set_value("all").run()
    at.selectbox(key="w_ex_true").set_value("7").run()
    assert "; true: 7" in kept_text()
    at.selectbox(key="w_ex_class").set_value("3").run()
    assert not at.exception and not errors(at)
    # Eq. 5 with the real numbers: a table whose α·O columns add up to z; at ξ = 0 nothing
    # is removed, and the patches beyond the heaviest are all kept
    table = eq5_table()
    assert table[-2].startswith("| z = Σ α·O |") and "α·O\\[" in table[0]
    assert not any("removed" in line for line in table)
    assert any(line.startswith("| the other ") and "kept, summed |" in line for line in table)
    assert any(r"\sum_m \alpha_m O_" in tex.value for tex in at.latex)
    # A page change drops widget keys; the choices come back.
    at.switch_page("pages/home.py").run()
    at.switch_page("pages/explorer.py").run()
    assert at.slider(key="w_xi").value == 0.0
    assert at.selectbox(key="w_ex_true").value == "7"


def test_explorer_view_is_in_the_url_and_a_link_reopens_it(runs_root):
    at = open_page("explorer")
    at.slider(key="w_xi").set_value(0.3).run()
    at.number_input(key="w_ex_pos").set_value(7).run()
    assert at.query_params["image"] == "7" and at.query_params["xi"] == "0.30"
    assert at.query_params["model"] == "digits_small_cnn_la"
    # a new session (a reload, or the link sent to someone) opens the same view
    from streamlit.testing.v1 import AppTest

    link = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for key, value in {"model": "digits_small_cnn_la_gamma0", "image": "7", "xi": "0.3"}.items():
        link.query_params[key] = value
    link.switch_page("pages/explorer.py").run()  # the link's page is the first one opened
    assert not link.exception and not errors(link)
    assert link.session_state["model_source"] == "shipped: digits_small_cnn_la_gamma0"
    assert link.slider(key="w_xi").value == pytest.approx(0.3)
    assert link.number_input(key="w_ex_pos").value == 7
    assert any(c.startswith("test7:") for c in image_captions(link))  # the map's caption
    # a link with nonsense in it is named and ignored, never a crash
    bad = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for key, value in {"model": "no-such-model", "image": "x", "xi": "7"}.items():
        bad.query_params[key] = value
    bad.switch_page("pages/explorer.py").run()
    warnings = " ".join(w.value for w in bad.warning)
    assert not bad.exception and "'no-such-model' is not here" in warnings
    assert "'x' is not a test image number" in warnings and "'7' is not a number" in warnings


def test_the_gamma_slider_moves_over_the_shipped_family_and_keeps_the_image(runs_root):
    at = open_page("explorer", model_source="shipped: digits_live_gamma0.3")
    slider = at.select_slider(key="w_gamma")
    assert list(slider.options) == ["0", "0.01", "0.03", "0.1", "0.3", "1", "3"]
    assert slider.value == 0.3 and at.selectbox(key="w_ex_gamma_over").value.startswith("live")
    at.slider(key="w_xi").set_value(0.2).run()
    at.selectbox(key="w_ex_outcome").set_value("correct").run()
    at.number_input(key="w_ex_pos").set_value(5).run()
    image = at.query_params["image"]
    before = map_svg(at, "ex_map")
    at.select_slider(key="w_gamma").set_value(1.0).run()
    assert not at.exception and not errors(at)
    assert at.session_state["model_source"] == "shipped: digits_live_gamma1"
    assert at.query_params["gamma"] == "1" and at.query_params["model"] == "digits_live_gamma1"
    assert at.query_params["image"] == image and at.query_params["xi"] == "0.20"
    assert at.select_slider(key="w_gamma").value == 1.0
    assert map_svg(at, "ex_map") != before  # another model's map of the same image
    # What γmax does: from the shipped results, at this ξ, in words
    at.toggle(key="w_ex_gamma_fx").set_value(True).run()
    assert not at.exception and at.get("plotly_chart")
    assert any("beyond the seeds' spread" in m.value for m in at.markdown)
    assert any("At ξ = 0.20" in c.value for c in at.caption)
    # another family: its model nearest this γmax opens
    pair = next(o for o in at.selectbox(key="w_ex_gamma_over").options if "no preset" in o)
    at.selectbox(key="w_ex_gamma_over").set_value(pair).run()
    assert at.session_state["model_source"] == "shipped: digits_small_cnn_la"  # γmax 0.1
    assert list(at.select_slider(key="w_gamma").options) == ["0", "0.1"]
    at.selectbox(key="w_ex_gamma_over").set_value("this model only").run()
    assert not at.select_slider and at.selectbox(key="w_ex_gamma_over").value == (
        "this model only")


def test_a_link_with_gamma_opens_that_model_of_the_family(runs_root):
    from streamlit.testing.v1 import AppTest

    link = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for key, value in {"model": "digits_live_gamma0.3", "image": "7", "xi": "0.3",
                       "gamma": "0.01"}.items():
        link.query_params[key] = value
    link.switch_page("pages/explorer.py").run()
    assert not link.exception and not errors(link)
    assert link.session_state["model_source"] == "shipped: digits_live_gamma0.01"
    assert link.select_slider(key="w_gamma").value == 0.01
    bad = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for key, value in {"model": "digits_live_gamma0.3", "gamma": "0.5"}.items():
        bad.query_params[key] = value
    bad.switch_page("pages/explorer.py").run()
    assert not bad.exception and bad.session_state["model_source"] == (
        "shipped: digits_live_gamma0.3")
    assert any("γmax '0.5' is not a stop" in w.value for w in bad.warning)
    # a model of no family: its own γmax in the link is no reason for a warning
    name = tiny_run(runs_root, "alone")
    own = AppTest.from_file(str(ROOT / "app.py"), default_timeout=300)
    for key, value in {"model": f"run/{name}", "gamma": "0.1"}.items():
        own.query_params[key] = value
    own.switch_page("pages/explorer.py").run()
    assert not own.exception and not any("γmax" in w.value for w in own.warning)
    assert own.session_state["model_source"] == f"run: {name}"


def test_the_gamma_slider_moves_over_a_sweeps_cells(runs_root):
    """A finished sweep's cells are stops; a sweep that varies more than γmax is refused with
    the fields it varies, unless a cell is explained (then its column is slid over)."""
    from engine.sweep import run_sweep, sweep_configs

    store = RunStore(runs_root)
    base = {"data": {"dataset": "digits", "train_size": 64, "test_size": 32},
            "model": {"backbone": "small_cnn"}, "train": {"epochs": 1, "batch_size": 32}}
    grid = [("loss.gamma_max", [0.0, 0.3]), ("model.xi", [0.1, 0.5])]
    run_sweep(store, sweep_configs(base, grid, "gx"), parallel=1, progress_bar=False,
              log=lambda m: None)
    at = open_page("explorer")
    name = next(o for o in at.selectbox(key="w_ex_gamma_over").options if o == "sweep gx")
    at.selectbox(key="w_ex_gamma_over").set_value(name).run()
    assert not at.exception
    assert any("more than γmax (model.xi)" in w.value for w in at.warning)
    assert at.session_state["model_source"] == "shipped: digits_small_cnn_la"  # unchanged
    cell = next(n for n in store.names() if "gamma0.3-xi0.5" in n)
    at = open_page("explorer", model_source=f"run: {cell}")
    assert at.selectbox(key="w_ex_gamma_over").value == "sweep gx"
    assert list(at.select_slider(key="w_gamma").options) == ["0", "0.3"]
    at.select_slider(key="w_gamma").set_value(0.0).run()
    other = next(n for n in store.names() if "gamma0.0-xi0.5" in n)
    assert at.session_state["model_source"] == f"run: {other}" and not errors(at)


def test_explorer_shows_the_model_with_and_without_the_patch_loss(runs_root):
    at = open_page("explorer")
    assert at.toggle(key="w_ex_pair").value is False
    at.toggle(key="w_ex_pair").set_value(True).run()
    assert not at.exception and not errors(at)
    titles = [map_title(map_svg(at, key)) for key in ("ex_map", "ex_map_partner")]
    assert titles[0].startswith("γmax = 0.1 (this model): ")
    assert at.toggle(key="w_ex_pair").label == "Beside: γmax = 0"
    # from the other side of the pair, the partner is the one with the patch loss
    other = open_page("explorer", model_source="shipped: digits_small_cnn_la_gamma0")
    assert other.toggle(key="w_ex_pair").label == "Beside: with patch loss"
    assert titles[1].startswith("γmax = 0: ") and titles[1].endswith("kept")


def test_train_page_launches_watches_and_rejects_bad_input(runs_root):
    at = open_page("train", **TINY)
    assert any("No runs yet" in i.value for i in at.info)
    at.text_input(key="w_tr_name").set_value("../escape").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and errors(at) and "name" in errors(at)[0]
    at.text_input(key="w_tr_name").set_value("ui-run").run()
    at.button(key="tr_launch").click().run()
    assert not at.exception and not errors(at)
    assert any("ui-run started" in s.value for s in at.success)
    run = RunStore(runs_root).get("ui-run")
    assert background.wait(run, timeout=600).state == "finished"
    at.run()
    assert at.selectbox(key="w_tr_watch").value == "ui-run"
    assert any("finished" in p.proto.text for p in at.get("progress"))
    assert at.button(key="tr_resume").disabled and at.button(key="tr_stop").disabled
    at.button(key="tr_explore").click().run()  # from training to exploring, in one click
    assert at.title[0].value == "Patch Explorer" and not at.exception
    assert at.session_state["model_source"] == "run: ui-run"


def test_train_page_shows_a_crashed_run(runs_root):
    store = RunStore(runs_root)
    run = store.create(RunConfig(name="broken", model=ModelConfig(backbone="small_cnn"),
                                 data=DataConfig(train_size=64, test_size=32)))
    run.update_status(state="failed", reason="NaN loss at epoch 3")
    at = open_page("train")
    assert any("NaN loss at epoch 3" in e for e in errors(at))
    assert not at.button(key="tr_resume").disabled


def test_runs_page_compares_and_deletes(runs_root):
    tiny_run(runs_root, "r-la")
    tiny_run(runs_root, "r-mean", head="mean")
    at = open_page("runs")
    assert not errors(at)
    table = at.dataframe[0].value
    assert set(table["name"]) == {"r-la", "r-mean"}
    at.multiselect(key="w_runs_chosen").set_value(["r-la", "r-mean"]).run()
    diff = at.dataframe[1].value
    assert "model.head" in set(diff["field"])
    at.text_input(key="w_runs_filter").set_value("mean").run()
    assert list(at.dataframe[0].value["name"]) == ["r-mean"]
    at.text_input(key="w_runs_filter").set_value("").run()
    at.multiselect(key="runs_delete_pick").set_value(["r-mean"]).run()
    at.checkbox(key="runs_delete_ok").check().run()
    at.button(key="runs_delete").click().run()
    assert not at.exception
    assert RunStore(runs_root).names() == ["r-la"]
    assert list(at.dataframe[0].value["name"]) == ["r-la"]


def pick_row(at, index: int):
    """What a click on a row of the runs table does (AppTest cannot click a dataframe)."""
    at.session_state["runs_table"] = {"selection": {"rows": [index], "columns": [],
                                                    "cells": []}}
    return at.run()


def test_runs_page_row_actions_open_resume_and_delete_the_picked_run(runs_root):
    tiny_run(runs_root, "r-la")
    tiny_run(runs_root, "r-plain", head="plain")
    at = open_page("runs")
    names = list(at.dataframe[0].value["name"])
    pick_row(at, names.index("r-plain"))
    assert at.button(key="runs_row_explore").disabled  # no patches to explore
    assert at.button(key="runs_row_resume").disabled and at.button(key="runs_row_stop").disabled
    at.checkbox(key="runs_row_sure_r-plain").check().run()
    at.button(key="runs_row_delete").click().run()
    assert not at.exception and RunStore(runs_root).names() == ["r-la"]
    pick_row(at, 0)
    assert not at.checkbox(key="runs_row_sure_r-la").value  # the tick was the other run's
    at.button(key="runs_row_explore").click().run()
    assert at.title[0].value == "Patch Explorer" and not errors(at)
    assert at.session_state["model_source"] == "run: r-la"
    assert "(32 test images)" in at.caption[0].value  # the run's own test set


def test_a_queued_run_shows_its_place_and_stops_from_the_pages(runs_root, monkeypatch):
    """With every slot taken (a job computing elsewhere), a launch waits in the queue: Train
    and Runs say where, and Stop takes it out of the queue."""
    import subprocess
    import sys

    from engine.slots import Slots

    monkeypatch.setenv("LOSSATTN_MAX_JOBS", "1")
    busy = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        Slots(runs_root).write_lease(busy.pid, runs_root / "busy")
        at = open_page("train", **TINY)
        at.text_input(key="w_tr_name").set_value("waits").run()
        at.button(key="tr_launch").click().run()
        assert not at.exception and not errors(at)
        assert any("waits is queued: place 1 of 1" in i.value for i in at.info)
        assert any("queued: place 1 of 1" in p.proto.text for p in at.get("progress"))
        at.switch_page("pages/runs.py").run()
        table = at.dataframe[0].value
        assert list(table["state"]) == ["queued"] and "place 1 of 1" in table["note"][0]
        pick_row(at, 0)
        assert not at.button(key="runs_row_stop").disabled
        at.button(key="runs_row_stop").click().run()
        assert RunStore(runs_root).get("waits").status().state == "stopped"
    finally:
        busy.kill()
        busy.wait()


def test_explorer_survives_a_deleted_model(runs_root):
    name = tiny_run(runs_root, "gone")
    at = open_page("explorer", model_source=f"run: {name}")
    assert "(32 test images)" in at.caption[0].value   # the run's model and its test set
    RunStore(runs_root).delete(name)
    at.run()
    assert not at.exception and not errors(at)     # falls back to the shipped model
    assert at.session_state["model_source"] == "shipped: digits_small_cnn_la"
    assert "(1000 test images)" in at.caption[0].value


def test_sweep_page_launches_and_draws_heat_maps(runs_root):
    state = {"sw_train_size": 64, "sw_test_size": 32, "sw_epochs": 1, "sw_batch": 32,
             "sw_gammas": "0, 0.1", "sw_xis": "0.1", "sw_name": "tiny"}
    at = open_page("sweep", **state)
    # the cells train with the data set's preset, as `python -m engine sweep` does
    assert at.selectbox(key="w_sw_preset").value == "live"
    assert any("Every cell trains with preset **live**" in c.value for c in at.caption)
    assert any("2 cells" in c.value and "unknown" in c.value for c in at.caption)
    assert not any("every γmax" in w.value for w in at.warning)  # live ramps by step
    # without a preset, one epoch ramped by epoch: w(τ) = 0 throughout, and the page says so
    at.selectbox(key="w_sw_preset").set_value("").run()
    assert any("every γmax trains the same model" in w.value for w in at.warning)
    at.number_input(key="w_sw_epochs").set_value(2).run()
    assert not any("every γmax" in w.value for w in at.warning)
    at.number_input(key="w_sw_epochs").set_value(1).run()
    at.selectbox(key="w_sw_preset").set_value("live").run()
    # the preset's values, written into the form (and what the form then says wins)
    assert at.number_input(key="w_sw_epochs").value == 2
    assert at.number_input(key="w_sw_train_size").value == 12000
    at.number_input(key="w_sw_epochs").set_value(1).run()
    at.number_input(key="w_sw_train_size").set_value(64).run()
    at.number_input(key="w_sw_batch").set_value(32).run()
    at.number_input(key="w_sw_seeds").set_value(2).run()
    assert any("4 cells" in c.value for c in at.caption)  # 2 γmax x 1 ξ x 2 seeds
    at.text_input(key="w_sw_gammas").set_value("0, 0.1, 0.10, 0").run()  # repeats: one cell each
    assert any("4 cells" in c.value for c in at.caption)
    assert any("Repeats merged: loss.gamma_max: 2 repeated" in i.value for i in at.info)
    at.text_input(key="w_sw_gammas").set_value("0, x").run()
    at.button(key="sw_launch").click().run()
    assert errors(at) and not at.exception
    at.text_input(key="w_sw_gammas").set_value("0, 0.1").run()
    at.button(key="sw_launch").click().run()
    assert not errors(at), errors(at)
    store = RunStore(runs_root)
    deadline = time.time() + 600
    from engine.sweep import sweep_process_alive

    while sweep_process_alive(store, "tiny") and time.time() < deadline:
        time.sleep(0.5)
    at.run()
    assert not at.exception and not errors(at)
    assert "4/4 runs finished" in at.get("progress")[0].proto.text
    for name in store.names():  # each cell: the live preset, filled as the CLI fills it
        config = store.get(name).config()
        assert config.preset == "live" and config.train.recipe == "onecycle"
        assert config.loss.ramp_by == "step" and config.train.epochs == 1
    charts = [c for c in at.get("plotly_chart")]
    assert len(charts) >= 4  # accuracy and patch precision / recall / F
    table = at.dataframe[-1].value
    assert sorted(table["loss.gamma_max"]) == [0, 0, 0.1, 0.1]
    assert sorted(table["train.seed"]) == [0, 0, 1, 1]
    assert list(table["xi"]) == [0.1] * 4
    # the trained cells re-thresholded at another ξ, without retraining
    at.selectbox(key="w_sw_eval_xi").set_value("0.0").run()
    assert not at.exception and list(at.dataframe[-1].value["xi"]) == [0.0] * 4
    assert len(RunStore(runs_root).names()) == 4  # no run was trained for it
    # now that cells have run here, the plan is timed by their measured speed
    assert any("about" in c.value and "img/s" in c.value for c in at.caption)


def test_curves_and_compare_pages(runs_root):
    at = open_page("curves", cu_limit=500)
    assert not errors(at)
    assert at.get("plotly_chart")
    # never more images than the test set has (the digits have 3,000)
    assert at.select_slider(key="w_cu_limit").options == ["500", "1,000", "2,000", "3,000 (all)"]
    table = next(df.value for df in at.dataframe if "ξ" in df.value.columns)
    assert list(table["ξ"]) == [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0]
    assert (table["recall"].diff().dropna() <= 1e-9).all()  # a higher ξ keeps fewer patches
    assert table["recall"].iloc[0] == 1.0 and "f_paper" in table
    at.multiselect(key="w_cu_classes").set_value(["1"]).run()
    assert not at.exception
    at = open_page("compare", cm_count=2, cm_n=16)
    assert not errors(at)
    assert map_cells(at) == (2, ["Loss-Attention", "Grad-CAM", "Grad-CAM++"])
    at.multiselect(key="w_cm_methods").set_value(["loss_attention", "gradcam"]).run()
    assert map_cells(at) == (2, ["Loss-Attention", "Grad-CAM"])
    at.button(key="cm_measure").click().run()
    assert not at.exception and not errors(at)
    table = next(df.value for df in at.dataframe if "map" in df.value.columns)
    # a row per method, then the reference maps, marked as such; a column per metric
    assert list(table["map"]) == ["Loss-Attention", "Grad-CAM", "ref: uniform", "ref: random",
                                  "ref: centre", "ref: intensity"]
    assert "Avg Drop % ↓" in table.columns and "insertion ↑" in table.columns
    uniform = table[table["map"] == "ref: uniform"].iloc[0]
    assert uniform["Avg Drop % ↓"] == 0  # under black, the all-ones map keeps the image
    assert any("mask: black" in c.value and "reference maps, not methods" in c.value
               for c in at.caption)
    # Grad-CAM − Loss-Attention per metric, with a paired-bootstrap interval and words
    differences = next(m.value for m in at.markdown
                       if m.value.startswith("**Differences from Loss-Attention**"))
    assert "| Average Drop % | Grad-CAM − Loss-Attention |" in differences
    assert "ref:" not in differences  # the references are yardsticks, not compared here
    words = next(m.value for m in at.markdown if m.value.startswith("- Average Drop %: "))
    assert "95 % interval" in words and ("no clear difference" in words or "better" in words)
    assert any("Paired bootstrap over the 16 images (2,000 resamples, seed 0)" in c.value
               for c in at.caption)
    # another mask: measured again, and said
    at.selectbox(key="w_cm_mask").set_value("blur").run()
    assert not at.exception and not errors(at)
    assert any("mask: blur" in c.value for c in at.caption)
    at.selectbox(key="w_cm_mask").set_value("black").run()
    # the curves behind the AUCs, one line per method and panel
    curves = json.loads(next(c for c in at.get("plotly_chart") if "cm_curves" in c.proto.id
                             ).proto.spec)
    assert [t["name"] for t in curves["data"]][:4] == ["Loss-Attention"] * 2 + ["Grad-CAM"] * 2
    assert {t["name"] for t in curves["data"][4:]} == {"ref: uniform", "ref: random",
                                                       "ref: centre", "ref: intensity"}
    assert {t["line"]["dash"] for t in curves["data"][4:]} == {"dot"}  # references drawn dotted
    # the faithfulness follows the class chosen above, and so does its caption
    at.selectbox(key="w_cm_class").set_value("predicted").run()
    assert any("class explained: predicted class" in c.value for c in at.caption)
    # the sanity check: each map as the layers are randomised, and its rank correlation
    at.toggle(key="w_cm_sanity").set_value(True).run()
    assert not at.exception and not errors(at)
    # over 32 test images by default: each step's mean ± sd, and a verdict per method
    assert at.select_slider(key="w_cm_sanity_n").value == 32
    rho = next(m.value for m in at.markdown if m.value.startswith("| rank correlation |"))
    assert "| Loss-Attention | 1.00 ± 0.00 |" in rho and "| Grad-CAM | 1.00 ± 0.00 |" in rho
    assert "classifier" in rho and re.search(r"\| -?0\.\d\d ± 0\.\d\d \|$", rho)
    verdicts = next(m.value for m in at.markdown if m.value.startswith("- **Loss-Attention**"))
    assert re.fullmatch(r"- \*\*Loss-Attention\*\* :\w+\[\*\*(passes|fails|unclear)\*\*\]: .+\n"
                        r"- \*\*Grad-CAM\*\* :\w+\[\*\*(passes|fails|unclear)\*\*\]: .+",
                        verdicts)
    assert any("A method passes when" in c.value and "95 % interval" in c.value
               for c in at.caption)
    assert any("cm_sanity_maps" in c.proto.id for c in at.get("plotly_chart"))
    assert any("cm_sanity_curve" in c.proto.id for c in at.get("plotly_chart"))


def map_cells(at) -> tuple[int, list[str]]:
    """(images, methods) of the Compare page's map grid, read from its figure."""
    chart = [c for c in at.get("plotly_chart") if "cm_maps" in c.proto.id][-1]
    spec = json.loads(chart.proto.spec)
    heatmaps = [t for t in spec["data"] if t["type"] == "heatmap"]
    assert all(t["coloraxis"] == "coloraxis" for t in heatmaps)  # one colour scale
    assert spec["layout"]["coloraxis"]["cmin"] == 0 and spec["layout"]["coloraxis"]["cmax"] == 1
    titles = [a["text"] for a in spec["layout"]["annotations"]]
    images = sum(t.startswith("#") for t in titles)
    return images, [t for t in titles if t and not t.startswith("#")]


def test_compare_shows_one_pass_maps_at_once_and_score_cam_on_demand(runs_root, monkeypatch):
    import streamlit as st

    from engine import explain
    from ui.st_models import _map_memo

    st.cache_data.clear()
    _map_memo.clear()
    batches = []  # every call into the grad-cam package: (method, images)
    real = explain.cam_maps
    monkeypatch.setattr(explain, "cam_maps", lambda m, x, c, method, xi=None: batches.append(
        (method, len(x))) or real(m, x, c, method, xi))
    at = open_page("compare", cm_count=2, cm_start=40, cm_n=16)
    assert not errors(at)
    assert map_cells(at) == (2, ["Loss-Attention", "Grad-CAM", "Grad-CAM++"])  # at once
    assert batches == []  # no Score-CAM, nor anything else from the package
    assert any("Score-CAM is computed when you turn it on" in c.value for c in at.caption)
    at.button(key="cm_measure").click().run()
    assert list(at.dataframe[-1].value["map"])[:4] == ["Loss-Attention", "Grad-CAM",
                                                       "Grad-CAM++", "ref: uniform"]
    assert batches == []
    # the model explained at another ξ: Loss-Attention's map changes (its patches), no error
    before = [c.proto.spec for c in at.get("plotly_chart") if "cm_maps" in c.proto.id]
    at.slider(key="w_cm_xi").set_value(0.5).run()
    assert not at.exception and not errors(at)
    assert [c.proto.spec for c in at.get("plotly_chart") if "cm_maps" in c.proto.id] != before
    at.slider(key="w_cm_xi").set_value(0.1).run()

    at.toggle(key="w_cm_scorecam").set_value(True).run()
    assert not at.exception and not errors(at)
    assert map_cells(at) == (2, ["Loss-Attention", "Grad-CAM", "Grad-CAM++", "Score-CAM"])
    assert ("scorecam", 2) in batches  # both images shown, in one batch
    assert list(at.dataframe[-1].value["map"])[3] == "Score-CAM"  # its row, once computed
    seen = len(batches)
    at.run()  # a second view of the same images
    at.switch_page("pages/home.py").run()
    at.switch_page("pages/compare.py").run()
    assert map_cells(at)[1][-1] == "Score-CAM" and len(batches) == seen
    at.number_input(key="w_cm_start").set_value(41).run()  # images 41 (seen) and 42 (new)
    assert batches[seen:] == [("scorecam", 1)]


def test_curves_reuse_the_explorers_pass_over_the_test_set(runs_root, monkeypatch):
    import streamlit as st

    from engine import evaluate
    from ui.st_models import _collected

    st.cache_data.clear()
    _collected.clear()
    passes = []  # the images of every backbone pass over a test set
    real = evaluate.collect
    monkeypatch.setattr(evaluate, "collect", lambda model, data, *a, **k: passes.append(
        len(data)) or real(model, data, *a, **k))
    at = open_page("explorer")
    assert passes == [1000]
    at.switch_page("pages/curves.py").run()
    assert not at.exception and not errors(at) and at.get("plotly_chart")
    assert "(1000 test images)" in at.caption[0].value
    at.run()
    at.switch_page("pages/home.py").run()
    at.switch_page("pages/curves.py").run()
    assert at.get("plotly_chart") and passes == [1000]  # the Explorer's pass, and only it
    _collected.clear()
    st.cache_data.clear()
    at = open_page("curves")  # the other way round: the Explorer finds the Curves' pass
    at.switch_page("pages/explorer.py").run()
    assert not errors(at) and passes == [1000, 1000]


def test_stride_page_benchmarks_in_the_background(runs_root):
    from engine.sweep import write_manifest

    write_manifest(RunStore(runs_root), "gammas", [("loss.gamma_max", [0, 0.1])])
    at = open_page("stride", st_batch=8, st_plans_small_cnn="1,2,1; 2,2,1")
    # the sketch: what each plan does to the patch grid, from the model's geometry
    sketch = next(c for c in at.get("plotly_chart") if "st_sketch" in c.proto.id)
    titles = [a["text"] for a in json.loads(sketch.proto.spec)["layout"]["annotations"]]
    assert titles == ["plan 1,2,1: 6x6 = 36 patches", "plan 2,2,1: 2x2 = 4 patches"]
    # a sweep over γmax is not a stride sweep: not offered for the accuracy plot
    assert not any(box.key == "w_st_sweep" for box in at.selectbox)
    assert any("No stride sweep yet" in c.value for c in at.caption)
    at.button(key="st_measure").click().run()
    assert not errors(at)
    folder = Path(at.session_state["st_bench_folder"])
    deadline = time.time() + 600
    while not (folder / "bench.json").is_file() and time.time() < deadline:
        time.sleep(0.5)
    at.run()
    table = at.dataframe[0].value
    assert list(table["plan"]) == ["1,2,1", "2,2,1"]
    assert (table["images_per_s"] > 0).all()
    at.text_input(key="w_st_plans_small_cnn").set_value("1,x").run()
    at.button(key="st_measure").click().run()
    assert any("comma-separated integers" in e for e in errors(at))


def test_mutual_transfer_page_launches_shows_maps_and_compares(runs_root):
    at = open_page("transfer")
    assert "Mutual transfer" in at.title[0].value and not errors(at)
    assert any("No mutual-transfer runs yet" in i.value for i in at.info)
    # A grid larger than the maps is refused with the field named, and nothing starts.
    for key, value in {"mt_train_size": 128, "mt_test_size": 32, "mt_epochs": 1,
                       "mt_batch": 64, "mt_grid": 40}.items():
        at.number_input(key=f"w_{key}").set_value(value)
    at.text_input(key="w_mt_name").set_value("ui").run()
    at.button(key="mt_launch").click().run()
    assert any("transfer.grid=40 is larger than the attention map" in e for e in errors(at))
    assert not RunStore(runs_root).names()
    at.number_input(key="w_mt_grid").set_value(4).run()
    at.button(key="mt_launch").click().run()
    assert not errors(at), errors(at)
    store = RunStore(runs_root)
    assert store.names() == ["ui-s0-alone", "ui-s0-mutual"]
    for name in store.names():
        assert background.wait(store.get(name), timeout=600).state == "finished"
    at.run()
    assert not errors(at) and not at.exception
    charts = at.get("plotly_chart")
    assert charts, "the maps figure is missing"
    assert any("transfer loss is the mean of 1 - ρ" in c.value for c in at.caption)
    assert any("peer 1 = small_cnn/loss_attention" in c.value for c in at.caption)
    at.number_input(key="w_mt_index").set_value(3).run()
    assert not at.exception
    at.select_slider(key="w_mt_images").set_value(32).run()
    at.button(key="mt_measure").click().run()
    table = at.dataframe[0].value
    assert {"Peer's own attention map", "Grad-CAM", "Loss-Attention"} <= set(table["map"])
    assert set(table["seeds better"]) <= {"0/1", "1/1"}
    ad = table[table["metric"] == "average_drop_pct"]["seed paper"]
    assert set(ad) == {"28.2"}  # the seed paper's figure, beside every map's row
    assert any("Mask black:" in c.value for c in at.caption)
    # The judgement is kept in each run's folder, as the transfer command keeps its own.
    assert (store.get("ui-s0-mutual").path / "judged" / "black-i32-s16-d8.json").is_file()
    # The mask is the reader's to pick, and the table says which one it was measured under.
    at.selectbox(key="w_mt_mask").set_value("mean").run()
    at.button(key="mt_measure").click().run()
    assert not errors(at) and not at.exception
    assert any("Mask mean: unexplained pixels the data set's mean colour" in c.value
               for c in at.caption)
    mean_ad = at.dataframe[0].value
    mean_ad = mean_ad[mean_ad["metric"] == "average_drop_pct"]["mutual"].tolist()
    assert mean_ad != table[table["metric"] == "average_drop_pct"]["mutual"].tolist()
    # Each peer is a model the explaining pages can open.
    from ui.st_models import model_sources

    sources = model_sources()
    assert {"run: ui-s0-mutual · peer 0", "run: ui-s0-mutual · peer 1"} <= set(sources)


def test_saved_transfer_results_show_each_difference_with_its_t_interval(runs_root):
    """The first shipped study the page offers: each map's Average Drop difference is shown
    with the t interval over its seeds that its results.json holds, and the mask it was
    measured under is named."""
    from engine.transfer import read_results

    first = min(p for p in (ROOT / "results" / "transfer").glob("*")
                if (p / "results.json").is_file())
    report = read_results(first)
    assert report["seeds"] and len(report["seeds"]) >= 3  # an interval needs seeds
    at = open_page("transfer")
    assert not errors(at) and not at.exception
    table = next(d.value for d in at.dataframe if "95 % interval" in d.value.columns)
    ad = table[table["metric"] == "average_drop_pct"].set_index("map")["95 % interval"]
    for method, label in (("own_map", "Peer's own attention map"), ("gradcam", "Grad-CAM")):
        row = next(r for r in report["summary"]
                   if r["method"] == method and r["metric"] == "average_drop_pct")
        assert ad[label] == f"{row['difference_low']:.1f} to {row['difference_high']:.1f}"
    assert any("Student t over the per-seed differences" in c.value for c in at.caption)
    assert any(f"Mask: {report['mask']}" in c.value for c in at.caption)


def test_overlapping_xi_moves_leave_torch_threads_as_they_found_them(monkeypatch):
    """Two sessions' script threads inside single_threaded at once (a ξ move in each): a script
    thread started afterwards gets torch's threads as before, not the 1 one of them set."""
    import threading

    import torch

    from ui import st_guards

    before = torch.get_num_threads()
    torch.set_num_threads(2)  # also the default of threads started from here on
    monkeypatch.setattr(st_guards, "_default_threads", None)
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()

    def first():
        with st_guards.single_threaded():
            a_in.set()
            b_in.wait(10)
        a_out.set()

    def second():  # starts while the first is inside, so it starts at 1 thread
        with st_guards.single_threaded():
            b_in.set()
            a_out.wait(10)

    seen = []
    try:
        a = threading.Thread(target=first)
        a.start()
        assert a_in.wait(10)
        b = threading.Thread(target=second)
        b.start()
        a.join(10)
        b.join(10)
        later = threading.Thread(target=lambda: seen.append(torch.get_num_threads()))
        later.start()
        later.join(10)
    finally:
        torch.set_num_threads(before)
    assert seen == [2]
