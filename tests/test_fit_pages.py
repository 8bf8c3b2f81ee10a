"""The pages on a classroom projector: a real browser (Debian's chromium through Playwright) at
1366x768 against one `streamlit run app.py` for the whole file.

Nothing is cut sideways on Runs, Compare maps, Mutual transfer, Train, Curves, Sweep, Stride /
time and MIL, and Train's Launch button is on the first screen. "Cut" is measured in the DOM,
not judged from pixels (MEASURE_JS):

- a data frame (glide-data-grid, drawn on a canvas) is cut when its scroller's scrollWidth
  exceeds its clientWidth: the columns' total width is more than the frame shows, so some
  columns are only reachable by scrolling. (Each column sizes itself to its longest text up to
  Streamlit's 500 px, so a frame that fits shows every cell whole.)
- a markdown table is cut when it reaches past its container, or its container scrolls;
- a multiselect's chips are cut when their row scrolls (Streamlit 1.67 puts them in one
  horizontally scrolling row: the last chips slide out of sight);
- a label or value is cut when its element ends in an ellipsis (CSS text-overflow: ellipsis)
  and its text is wider than its box;
- and the page itself must not scroll sideways.

A screenshot of every page's first screen is kept as ``test-artifacts/browser/fit-<page>.png``
(and of the states opened on the way: ``fit-runs-<view>.png``, ``fit-compare-sanity.png``,
``fit-transfer-launch.png``), with the measures in ``fit-measures.json``.
"""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_app import CHROMIUM, COMPARE_MAPS_JS, app_server, idle, launch_browser
from conftest import PROJECTOR, browser_or_skip, needs_chromium

sync_playwright = browser_or_skip()  # CI (LOSSATTN_REQUIRE_BROWSER=1) fails, never skips
pytestmark = needs_chromium(CHROMIUM)
PAGES = {"home": ("", "Loss-Attention Studio"), "explorer": ("explorer", "Patch Explorer"),
         "compare": ("compare", "Compare maps"), "curves": ("curves", "Curves"),
         "train": ("train", "Train"), "runs": ("runs", "Runs"), "sweep": ("sweep", "Sweep"),
         "stride": ("stride", "Stride / time"), "mil": ("mil", "MIL"),
         "transfer": ("transfer", "Mutual transfer")}
VIEWS = {"results": ["name", "state", "epochs", "metric", "best", "best epoch", "last",
                     "minutes"],
         "model and data": ["name", "data", "model", "γmax", "ξ", "skipped images"],
         "when and tags": ["name", "created", "tags"]}
"""The Runs table's groups of columns (pages/runs.py), as the user picks them."""
CHECKED = ["compare", "curves", "train", "runs", "sweep", "stride", "mil", "transfer"]
"""The pages whose fit this file asserts (Home and the Explorer are only photographed here:
tests/test_fit_explorer.py has the Explorer's own first-screen checks)."""

# Everything that can be cut sideways, measured; cuts() below says which of it is.
MEASURE_JS = """() => {
  const main = document.querySelector("[data-testid='stMain']");
  const key = e => (e.closest("[class*='st-key-']")?.className.match(/st-key-\\S+/) || [""])[0];
  const text = e => (e.innerText || e.getAttribute("aria-label") || "").trim().slice(0, 80);
  const out = {page: [main.scrollWidth, main.clientWidth], frames: [], tables: [], chips: [],
               ellipsis: []};
  main.querySelectorAll("[data-testid='stDataFrame'] .dvn-scroller").forEach(g =>
    out.frames.push([key(g), g.scrollWidth, g.clientWidth]));
  main.querySelectorAll("[data-testid='stMarkdownContainer'] table").forEach(t => {
    const box = t.closest("[data-testid='stMarkdownContainer']");
    out.tables.push([text(t.rows[0]), Math.round(t.getBoundingClientRect().right),
                     Math.round(box.getBoundingClientRect().right),
                     t.parentElement.scrollWidth, t.parentElement.clientWidth]);
  });
  main.querySelectorAll("[data-testid='stMultiSelectTagsContainer']").forEach(c =>
    out.chips.push([text(c).replace(/\\n/g, ", "), c.scrollWidth, c.clientWidth]));
  main.querySelectorAll("*").forEach(e => {
    if (e.clientWidth > 0 && e.scrollWidth > e.clientWidth + 1
        && getComputedStyle(e).textOverflow === "ellipsis")
      out.ellipsis.push([text(e), e.scrollWidth, e.clientWidth]);
  });
  return out; }"""
HEADERS_JS = """() => Array.from(document.querySelectorAll(
  ".st-key-runs_table [data-testid='stDataFrame'] th"), th => th.innerText.trim())
  .filter(t => t)"""
NO_SKELETON = "() => !document.querySelector(\"[data-testid='stSkeleton']\")"
MEASURED: dict[str, dict] = {}


def cuts(measure: dict) -> list[str]:
    """What is cut, in words, from MEASURE_JS's numbers (a pixel of rounding allowed)."""
    found = [f"the page scrolls sideways ({measure['page'][0]} > {measure['page'][1]} px)"
             ] if measure["page"][0] > measure["page"][1] + 1 else []
    found += [f"data frame {k or '(no key)'}: columns {w} px wide in {c} px"
              for k, w, c in measure["frames"] if w > c + 1]
    found += [f"table '{head}': ends at {right} px, its box at {box} px"
              for head, right, box, sw, cw in measure["tables"] if right > box + 1 or sw > cw + 1]
    found += [f"chips '{names}': {w} px of chips in {c} px" for names, w, c in measure["chips"]
              if w > c + 1]
    found += [f"'{t}' ends in an ellipsis ({w} px of text in {c} px)"
              for t, w, c in measure["ellipsis"]]
    return found


def settle(page, timeout: float = 120_000) -> None:
    """The script has finished and every element is drawn (no loading placeholder left)."""
    idle(page, timeout)
    page.wait_for_function(NO_SKELETON, timeout=timeout)
    idle(page, timeout)


def look(page, name: str, artifacts: Path) -> list[str]:
    """Photograph what the screen shows, keep the measures, return the cuts."""
    page.screenshot(path=artifacts / f"fit-{name}.png")
    measure = page.evaluate(MEASURE_JS)
    MEASURED[name] = measure
    (artifacts / "fit-measures.json").write_text(json.dumps(MEASURED, indent=1))
    return cuts(measure)


def runs_for_the_tables(root: Path) -> None:
    """A mutual pair and its control (the Runs table and the Mutual transfer page), and a run
    with an automatic name, the long one a user gets by leaving the name empty."""
    from test_browser import trained_pair

    from engine.config import RunConfig
    from engine.runs import RunStore
    from engine.train import prepare_run_config, train_run

    trained_pair(root)
    config = RunConfig(model={"backbone": "small_cnn"}, data={"train_size": 256, "test_size": 64},
                       train={"epochs": 1, "batch_size": 64})
    run = RunStore(root).create(prepare_run_config(config))
    assert run.name.startswith("digits-small_cnn-loss_attention-")
    assert train_run(run, progress_bar=False) == "finished"


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """(url, browser): one server over a store with the runs above, one headless chromium."""
    root = tmp_path_factory.mktemp("fit") / "runs"
    runs_for_the_tables(root)
    with app_server(root) as (url, _), sync_playwright() as p:
        browser = launch_browser(p)
        yield url, browser
        browser.close()


def open_page(app, name: str):
    """A fresh 1366x768 tab on page ``name``, drawn and finished (the scroll at the top)."""
    url, browser = app
    path, title = PAGES[name]
    page = browser.new_page(viewport=PROJECTOR)
    page.goto(f"{url}/{path}")
    page.get_by_role("heading", name=title).first.wait_for(timeout=120_000)
    if name == "compare":  # its maps come after the script's first pass
        page.wait_for_function(COMPARE_MAPS_JS, timeout=120_000)
    settle(page)
    return page


@pytest.mark.parametrize("name", list(PAGES))
def test_every_page_first_screen(app, artifacts, name):
    page = open_page(app, name)
    found = look(page, name, artifacts)
    page.close()
    if name in CHECKED:
        assert not found, found


def test_the_runs_table_fits_in_each_group_of_columns(app, artifacts):
    """Every group of columns, with an automatic run name and a mutual pair's two-peer model,
    fits the frame; so do a picked run's buttons."""
    page = open_page(app, "runs")
    frame = page.locator(".st-key-runs_table .dvn-scroller")
    for view, columns in VIEWS.items():
        page.get_by_text(view, exact=True).click()
        settle(page)
        # The grid's accessible header row names the columns it draws (only those in view):
        # every column of the group is there, and no other.
        page.wait_for_function(f"cols => JSON.stringify(({HEADERS_JS})()) === "
                               "JSON.stringify(cols)", arg=columns, timeout=60_000)
        found = look(page, f"runs-{view.replace(' ', '-')}", artifacts)
        assert not found, (view, found)
    frame.click(position={"x": 15, "y": 55})  # the first row's tick: its actions appear
    page.get_by_role("button", name="Open in the Explorer").wait_for(timeout=60_000)
    settle(page)
    found = look(page, "runs-picked", artifacts)
    assert not found, found
    page.close()


def test_compare_sanity_check_and_faithfulness_fit(app, artifacts):
    """The sanity check over many images (verdicts, mean ± sd per step) and the faithfulness
    table, opened, are not cut; four methods' chips fit their box."""
    page = open_page(app, "compare")
    chips = page.locator("[data-testid='stMultiSelectTagsContainer']").first
    assert chips.inner_text().split("\n") == ["Loss-Attention", "Grad-CAM", "Grad-CAM++",
                                              "Score-CAM"]
    page.get_by_text("Sanity check: randomise the weights").click()
    curve = page.locator(".st-key-cm_sanity_curve .js-plotly-plot")
    curve.wait_for(timeout=180_000)
    settle(page, 180_000)
    for method in ("Loss-Attention", "Grad-CAM", "Grad-CAM++"):
        verdict = page.locator("li").filter(has_text=f"{method} ").first
        assert any(f"{method} {word}:" in verdict.inner_text()
                   for word in ("passes", "fails", "unclear"))
    table = page.locator("[data-testid='stMarkdownContainer'] table").filter(
        has_text="rank correlation")
    assert "±" in table.inner_text()
    page.locator("li").filter(has_text="Loss-Attention ").first.scroll_into_view_if_needed()
    found = look(page, "compare-sanity", artifacts)
    assert not found, found
    page.get_by_role("button", name="Measure").click()
    faithful = page.locator(".st-key-cm_faithfulness .dvn-scroller")
    faithful.wait_for(timeout=180_000)
    settle(page, 180_000)
    faithful.scroll_into_view_if_needed()
    found = look(page, "compare-faithfulness", artifacts)
    assert not found, found
    page.close()


def test_transfer_launch_form_fits(app, artifacts):
    page = open_page(app, "transfer")
    page.get_by_text("Train a new pair").click()
    control = page.get_by_text("Also train alone (λ = 0, same seed)")
    control.wait_for(timeout=60_000)
    settle(page)
    control.scroll_into_view_if_needed()
    found = look(page, "transfer-launch", artifacts)
    assert not found, found
    page.close()


def test_train_launch_button_on_the_first_screen(app):
    """At first load, with no scrolling, the whole Launch button is inside the 1366x768 view."""
    page = open_page(app, "train")
    assert page.evaluate("() => document.querySelector(\"[data-testid='stMain']\").scrollTop"
                         ) == 0
    box = page.get_by_role("button", name="Launch training").bounding_box()
    assert box["x"] >= 0 and box["y"] >= 0, box
    assert box["x"] + box["width"] <= PROJECTOR["width"], box
    assert box["y"] + box["height"] <= PROJECTOR["height"], box
    page.close()
