"""One real-browser test: Debian's chromium driven by Playwright against `streamlit run app.py`.

It opens every page, moves the ξ and γmax sliders on the Patch Explorer and checks the overlay
(and, for γmax, the link and the sidebar's model) changes,
uploads an image and a non-image, launches a one-epoch run on the Train page and waits for it to
finish, and keeps a second browser session open at the same time. Screenshots and the timings
seen on the way are written to ``test-artifacts/browser/`` (or $LOSSATTN_ARTIFACTS). The
benchmark proper is ``python tests/bench_app.py``.
"""

import io
import json
import re
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))
from bench_app import (
    CHROMIUM,
    FAMILY_LINK,
    MAP_IMG_JS,
    app_server,
    gamma_slider,
    idle,
    launch_browser,
    open_explorer,
    open_home,
    overlay_state,
    slider_latencies,
    summarise,
    wait_new_overlay,
    xi_slider,
)
from conftest import browser_or_skip, needs_chromium

sync_playwright = browser_or_skip()  # CI (LOSSATTN_REQUIRE_BROWSER=1) fails, never skips
pytestmark = needs_chromium(CHROMIUM)

PAGES = {"": "Loss-Attention Studio", "explorer": "Patch Explorer", "compare": "Compare maps",
         "curves": "Curves", "train": "Train", "runs": "Runs", "sweep": "Sweep",
         "stride": "Stride / time", "mil": "MIL", "transfer": "Mutual transfer"}


def no_traceback(page) -> None:
    text = page.inner_text("body")
    assert "Traceback" not in text and 'File "' not in text, text[:2000]


def png_bytes(size=(50, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", size, (200, 30, 30, 128)).save(buffer, "PNG")
    return buffer.getvalue()


def trained_pair(root: Path) -> None:
    """A one-epoch mutual pair and its control, so the Mutual transfer page shows its maps."""
    from engine.config import RunConfig
    from engine.runs import RunStore
    from engine.train import prepare_run_config, train_run
    from engine.transfer import arm_config

    store = RunStore(root)
    base = RunConfig(model={"backbone": "small_cnn"}, data={"train_size": 256, "test_size": 64},
                     train={"epochs": 1, "batch_size": 64},
                     transfer={"peers": [{"backbone": "small_cnn"}]})
    for arm in ("mutual", "alone"):
        run = store.create(prepare_run_config(arm_config(base, "browser-pair", 0, arm)))
        assert train_run(run, progress_bar=False) == "finished"


# Where the removed patches' cells are on screen: a point in each (clear of its number, which
# sits at the cell's centre), in page pixels: the map is SVG shown as an image, so its cells
# are read from the decoded SVG and scaled to the image's size on screen.
REMOVED_CELLS_JS = f"""() => {{
  const img = ({MAP_IMG_JS})("ex_map"), box = img.getBoundingClientRect();
  const bytes = Uint8Array.from(atob(img.src.split(",")[1]), c => c.charCodeAt(0));
  const svg = new DOMParser().parseFromString(new TextDecoder().decode(bytes), "image/svg+xml")
    .documentElement;
  const k = box.width / parseFloat(svg.getAttribute("width"));
  return Array.from(svg.querySelectorAll("g.removed rect"), r => {{
    const x = +r.getAttribute("x"), y = +r.getAttribute("y");
    const w = +r.getAttribute("width"), h = +r.getAttribute("height");
    return [Math.round(box.left + k * (x + 0.25 * w)), Math.round(box.top + k * (y + 0.75 * h))];
  }}); }}"""
# The map, then (with the other model beside it) the partner's map, then the sorted scores.
PICTURES = "[data-testid='stMain'] img[src^='data:image/svg+xml']"


def inside(box: dict, viewport: dict) -> bool:
    return (box["x"] >= 0 and box["y"] >= 0 and box["x"] + box["width"] <= viewport["width"]
            and box["y"] + box["height"] <= viewport["height"])


def set_xi(page, key: str) -> None:
    old = overlay_state(page)
    xi_slider(page).focus()
    page.keyboard.press(key)
    wait_new_overlay(page, old)
    idle(page)


def map_pixels(page) -> np.ndarray:
    """The page's pixels (a screenshot of the viewport), where REMOVED_CELLS_JS points."""
    return np.asarray(Image.open(io.BytesIO(page.screenshot())).convert("RGB"), dtype=np.float64)


def check_link_and_threshold_view(browser, url: str, artifacts: Path) -> None:
    """On a server no session has used yet: a link opens the Explorer on its model, image and ξ
    (with the app's router and sidebar); at 1366x768 the ξ slider and the map are on screen
    together; ξ = 0.1 visibly greys the patches it removes (their pixels differ from ξ = 0)."""
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.goto(f"{url}/explorer?model=digits_small_cnn_la&image=7&xi=0.30")
    overlay_state(page, timeout=120_000)
    idle(page, 120_000)
    no_traceback(page)
    assert page.get_by_text("Model to explain").count() == 1  # app.py ran: the router
    assert page.get_by_text("test7:").count() == 1
    # in the folded Images row above the map (hidden until opened, and still set)
    assert page.get_by_role("spinbutton", name="Image (1000 match)",
                            include_hidden=True).input_value() == "7"
    assert xi_slider(page).input_value() == "0.3"
    page.locator(PICTURES).first.scroll_into_view_if_needed()
    viewport = page.viewport_size
    assert inside(page.locator(".st-key-w_xi").bounding_box(), viewport)  # label, bar, value
    assert inside(page.locator(PICTURES).first.bounding_box(), viewport)
    page.screenshot(path=artifacts / "explorer-link-xi0.30.png")
    shots = {}
    for key, xi in [("Home", "0"), ("PageUp", "0.1"), ("End", "1")]:
        set_xi(page, key)
        assert xi_slider(page).input_value() == xi
        page.screenshot(path=artifacts / f"explorer-xi{xi}.png")
        shots[xi] = map_pixels(page)
        if xi == "0.1":
            removed = page.evaluate(REMOVED_CELLS_JS)
    assert len(removed) >= 18  # the trained model keeps a handful of 36 patches at ξ = 0.1
    spots = [(slice(int(y) - 2, int(y) + 3), slice(int(x) - 2, int(x) + 3)) for x, y in removed]
    changed = [np.abs(shots["0"][spot] - shots["0.1"][spot]).mean() > 10 for spot in spots]
    assert all(changed), f"{changed.count(False)} removed patches look the same at ξ = 0 and 0.1"
    page.get_by_text("Beside: γmax = 0").click()
    page.wait_for_function(f"() => ({MAP_IMG_JS})('ex_map_partner')", timeout=120_000)
    idle(page)
    page.locator(PICTURES).first.scroll_into_view_if_needed()
    page.screenshot(path=artifacts / "explorer-with-without-patch-loss.png")
    page.close()


def check_gamma_slider(browser, url: str, artifacts: Path) -> dict:
    """At 1366x768 the γmax slider sits under the ξ slider, beside the map; a move swaps the
    model for the same image and ξ: the map changes, and so do the link (model and gamma) and
    the sidebar's model. Returns the moves' timings (each model once first, then warm)."""
    page = browser.new_page(viewport={"width": 1366, "height": 768})
    page.goto(f"{url}{FAMILY_LINK}")
    src = overlay_state(page, timeout=120_000)
    idle(page, 120_000)
    page.locator(PICTURES).first.scroll_into_view_if_needed()
    for widget in (".st-key-w_xi", ".st-key-w_gamma", PICTURES):
        assert inside(page.locator(widget).first.bounding_box(), page.viewport_size), widget
    times = {}
    for key, gamma in [("End", "3"), ("Home", "0"), ("End", "3"), ("Home", "0")]:
        gamma_slider(page).focus()
        start = time.monotonic()
        page.keyboard.press(key)
        src = wait_new_overlay(page, src, timeout=120_000)
        times.setdefault(gamma, []).append(round(1000 * (time.monotonic() - start)))
        idle(page)
        assert f"model=digits_live_gamma{gamma}&image=7&xi=0.10&gamma={gamma}" in page.url
        assert page.get_by_role("combobox", name="Model to explain").input_value() == (
            f"shipped: digits_live_gamma{gamma}")
        no_traceback(page)
    page.screenshot(path=artifacts / "explorer-gamma0.png")
    page.get_by_text("What γmax does").click()
    page.locator(".st-key-ex_gamma_fx_chart .js-plotly-plot").wait_for(timeout=60_000)
    idle(page)
    page.locator(".st-key-ex_gamma_fx_chart").scroll_into_view_if_needed()
    assert page.get_by_text("beyond the seeds' spread").count() >= 1
    page.screenshot(path=artifacts / "explorer-what-gamma-does.png")
    page.close()
    return {"gamma_move_ms (first, warm)": times}


def test_home_on_a_fresh_server_then_the_device_line(artifacts, tmp_path):
    """Home, the first page of a fresh server, ends without waiting for torch; the sidebar's
    device line then fills in by itself (torch loads in the background, and the app reruns
    once), with the rest of the sidebar and the page still there."""
    with app_server(tmp_path / "runs") as (url, started), sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        timings = open_home(page, url, started)
        sidebar = page.locator("[data-testid='stSidebar']")
        sidebar.get_by_text(re.compile(r"^(CPU \(\d+ threads\)|GPU: .+) · runs in")).wait_for(
            timeout=60_000)
        idle(page)
        assert sidebar.get_by_text("Device: loading torch").count() == 0
        assert sidebar.get_by_text("Model to explain").count() == 1
        assert page.get_by_role("heading", name="Loss-Attention Studio").count() == 1
        no_traceback(page)
        page.screenshot(path=artifacts / "home-fresh-server.png")
        browser.close()
    print("fresh home timings:", json.dumps(timings))


def test_every_page_in_a_real_browser(artifacts, tmp_path):
    trained_pair(tmp_path / "runs")
    with app_server(tmp_path / "runs") as (url, _), sync_playwright() as p:
        browser = launch_browser(p)
        check_link_and_threshold_view(browser, url, artifacts)
        gamma = check_gamma_slider(browser, url, artifacts)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        timings = open_home(page, url, time.monotonic())  # timed from this navigation
        timings.update(gamma)
        page.screenshot(path=artifacts / "home.png", full_page=True)
        # .streamlit/config.toml: a tool to use, not a script to deploy (toolbarMode viewer).
        assert page.get_by_text("Deploy", exact=True).count() == 0

        for path, title in PAGES.items():
            page.goto(f"{url}/{path}")
            page.get_by_role("heading", name=title).first.wait_for(timeout=90_000)
            idle(page, 120_000)
            no_traceback(page)
            if path == "transfer":
                page.get_by_text("What the transfer loss sees").wait_for(timeout=60_000)
                page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
                idle(page)
                chart = page.locator(".js-plotly-plot").first
                chart.scroll_into_view_if_needed()
                page.screenshot(path=artifacts / "transfer-maps.png")
            page.screenshot(path=artifacts / f"{path or 'home'}.png", full_page=True)
            if path == "compare":  # the sanity check: maps as the layers are randomised
                page.get_by_text("Sanity check: randomise the weights").click()
                sanity = page.locator("[data-testid='stMain'] .st-key-cm_sanity_maps")
                sanity.wait_for(timeout=120_000)
                idle(page)
                no_traceback(page)
                sanity.scroll_into_view_if_needed()
                page.screenshot(path=artifacts / "compare-sanity-check.png")

        # Patch Explorer, warm; then the ξ slider must change the overlay.
        page.goto(f"{url}/runs")
        idle(page)
        timings["explorer_warm_s"] = open_explorer(page, url)
        first = overlay_state(page)
        timings["xi_slider_to_overlay_ms"] = summarise(slider_latencies(page, 4))
        assert overlay_state(page) != first
        page.screenshot(path=artifacts / "explorer-xi.png", full_page=True)

        # Upload: an RGBA PNG of odd size works; a text file gets a clear message.
        page.get_by_text("Images: test set, samples, your own").click()  # unfold the choices
        page.get_by_text("upload your own").click()
        idle(page)
        good = tmp_path / "mine.png"
        good.write_bytes(png_bytes())
        uploader = page.locator("[data-testid='stFileUploaderDropzoneInput']")
        uploader.set_input_files(str(good))
        page.get_by_text("unknown (your image)").wait_for(timeout=60_000)
        idle(page)
        bad = tmp_path / "notes.png"
        bad.write_text("not an image at all")
        uploader.set_input_files(str(bad))
        page.get_by_text("is not an image this program can read").wait_for(timeout=60_000)
        no_traceback(page)
        page.screenshot(path=artifacts / "explorer-upload.png", full_page=True)

        # A second session at the same time, on the explorer.
        other = browser.new_context().new_page()
        other.goto(f"{url}/explorer")
        overlay_state(other)

        # Train: a one-epoch run on a small slice, watched until it finishes.
        page.goto(f"{url}/train")
        idle(page)
        for label, value in [("Epochs", "1"), ("Train images (0: all)", "256"),
                             ("Test images (0: all)", "64"),
                             ("Run name (empty: automatic)", "browser-run")]:
            field = page.get_by_label(label)
            field.fill(value)
            field.press("Enter")
            idle(page)
        started_run = time.monotonic()
        page.get_by_role("button", name="Launch training").click()
        page.get_by_text("Run browser-run started").wait_for(timeout=60_000)
        page.close()  # the tab closes; the run goes on, and a new tab finds it
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/train")
        page.get_by_text("Finished in").wait_for(timeout=180_000)
        page.screenshot(path=artifacts / "train-finished.png", full_page=True)
        # The watched run is the selectbox's value (a combobox input, not text of the page).
        assert page.get_by_role("combobox", name="Watch run").input_value() == "browser-run"
        assert "finished: epoch 1/1" in page.inner_text("body")
        timings["one_epoch_run_seen_finished_s"] = time.monotonic() - started_run
        no_traceback(page)
        page.screenshot(path=artifacts / "train-finished.png", full_page=True)
        other.get_by_role("heading", name="Patch Explorer").wait_for()
        browser.close()
    (artifacts / "timings.json").write_text(json.dumps(timings, indent=1))
    print("browser timings:", json.dumps(timings))
