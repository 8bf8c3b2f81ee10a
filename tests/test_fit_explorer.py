"""The Patch Explorer on a classroom projector: a real browser at 1366x768 (issue 31).

Debian's chromium, driven by Playwright against one ``streamlit run app.py`` for the whole file,
checks what a student at a projector sees without touching the page:

- on first load of /explorer, and on a shared link (``?model=...&image=...&xi=...&gamma=...``),
  the ξ slider and the whole map are on the first screen, nothing scrolled (the filters and
  view options are folded into one row above the map);
- "Beside: γmax = 0" draws the model explained and its partner the same size, side by side,
  still on the first screen;
- the worked Eq. 5 wraps into lines that fit its column: no sideways scroll, its right edge
  inside the column.

Each check waits on a state of the page (the map drawn, the script idle), never a fixed time.
Screenshots go to ``test-artifacts/browser/fit-explorer-*.png`` (or $LOSSATTN_ARTIFACTS):
look at them, as a student at the back of the room would.
"""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from bench_app import (
    CHROMIUM,
    MAP_IMG_JS,
    app_server,
    idle,
    launch_browser,
    overlay_state,
    xi_slider,
)
from conftest import PROJECTOR, browser_or_skip, needs_chromium

sync_playwright = browser_or_skip()  # CI (LOSSATTN_REQUIRE_BROWSER=1) fails, never skips
pytestmark = needs_chromium(CHROMIUM)
LINK = "/explorer?model=digits_small_cnn_la&image=7&xi=0.30&gamma=0.1"
FAMILY_LINK = "/explorer?model=digits_live_gamma0.3&image=7&xi=0.10&gamma=1"
"""A link to the γmax family at another γmax: it opens that member (digits_live_gamma1)."""

# A map's <img> as drawn (null until its picture has loaded: before, it has no size).
MAP_BOX_JS = f"""(key) => {{ const img = ({MAP_IMG_JS})(key);
  if (!img || !img.complete || !img.naturalWidth) return null;
  const b = img.getBoundingClientRect();
  return {{x: b.x, y: b.y, width: b.width, height: b.height}}; }}"""
# Whether anything on the page has scrolled (the window, or Streamlit's scrolling main view).
SCROLLED_JS = """() => [document.scrollingElement,
  ...document.querySelectorAll("[data-testid='stMain'], [data-testid='stAppViewContainer']")]
  .some(e => e && (e.scrollTop !== 0 || e.scrollLeft !== 0))"""
# The worked Eq. 5: the display maths in the column headed "How the prediction is built".
EQ5_JS = """() => {
  const heading = Array.from(document.querySelectorAll("[data-testid='stMain'] h3"))
    .find(h => h.innerText.startsWith("How the prediction is built"));
  const column = heading && heading.closest("[data-testid='stColumn']");
  const display = column && column.querySelector(".katex-display");
  if (!display) return null;
  const maths = display.querySelector(".katex").getBoundingClientRect();
  const col = column.getBoundingClientRect();
  return {scrollWidth: display.scrollWidth, clientWidth: display.clientWidth,
          left: maths.left, right: maths.right, width: maths.width,
          columnLeft: col.left, columnRight: col.right, columnWidth: col.width,
          height: maths.height,
          text: display.innerText}; }"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """(browser, url): one app server and one chromium for the file."""
    with app_server(tmp_path_factory.mktemp("runs")) as (url, _), sync_playwright() as p:
        browser = launch_browser(p)
        yield browser, url
        browser.close()


def opened(site, path: str):
    """A fresh projector-sized tab on ``path``, once its map is drawn and the script idle."""
    browser, url = site
    page = browser.new_page(viewport=PROJECTOR)
    page.goto(f"{url}{path}")
    overlay_state(page, timeout=120_000)
    idle(page, 120_000)
    page.wait_for_function(MAP_BOX_JS, arg="ex_map", timeout=60_000)
    return page


def on_first_screen(box: dict | None) -> bool:
    return (box is not None and box["x"] >= 0 and box["y"] >= 0
            and box["x"] + box["width"] <= PROJECTOR["width"]
            and box["y"] + box["height"] <= PROJECTOR["height"])


def assert_slider_and_map_on_first_screen(page) -> dict:
    """The ξ slider (label, bar and value) and the whole map inside the viewport, with the
    page as it opened: nothing scrolled. Returns the two boxes."""
    assert not page.evaluate(SCROLLED_JS)
    boxes = {"xi": page.locator(".st-key-w_xi").bounding_box(),
             "map": page.evaluate(MAP_BOX_JS, "ex_map")}
    for name, box in boxes.items():
        assert on_first_screen(box), f"{name} at {box} is not on the 1366x768 screen"
    assert boxes["map"]["width"] >= 400  # the map itself, at a size a room can read
    return boxes


def test_first_load_shows_the_xi_slider_and_the_whole_map(site, artifacts):
    page = opened(site, "/explorer")
    boxes = assert_slider_and_map_on_first_screen(page)
    # the filters are one click away, folded above the map, not gone
    assert page.get_by_text("Images: test set, samples, your own; filters").count() == 1
    assert page.get_by_role("spinbutton", name="Image (1000 match)",
                            include_hidden=True).input_value() == "0"
    # nothing wider than the screen: no sideways scroll of the page
    assert page.evaluate("() => document.documentElement.scrollWidth") <= PROJECTOR["width"]
    page.screenshot(path=artifacts / "fit-explorer-first-load.png")
    print("first load:", boxes)
    page.close()


def test_a_shared_link_opens_onto_the_map(site, artifacts):
    page = opened(site, LINK)
    assert xi_slider(page).input_value() == "0.3"
    assert page.get_by_text("test7:").count() == 1  # the link's image, in the map's caption
    print("link:", assert_slider_and_map_on_first_screen(page))
    page.screenshot(path=artifacts / "fit-explorer-link.png")
    page.close()
    # a link into the γmax family: that member, with its γmax slider beside the map
    page = opened(site, FAMILY_LINK)
    assert page.get_by_role("combobox", name="Model to explain").input_value() == (
        "shipped: digits_live_gamma1")
    # a select slider's value is its stop's index; the thumb shows the stop itself
    assert page.locator(".st-key-w_gamma [data-testid='stSliderThumbValue']").inner_text() == "1"
    assert_slider_and_map_on_first_screen(page)
    assert on_first_screen(page.locator(".st-key-w_gamma").bounding_box())  # label, bar, value
    page.screenshot(path=artifacts / "fit-explorer-family-link.png")
    page.close()


def test_with_and_without_the_patch_loss_draws_both_maps_the_same_size(site, artifacts):
    page = opened(site, LINK)
    page.get_by_text("Beside: γmax = 0").click()
    page.wait_for_function(MAP_BOX_JS, arg="ex_map_partner", timeout=120_000)
    idle(page)
    mine, partner = (page.evaluate(MAP_BOX_JS, key) for key in ("ex_map", "ex_map_partner"))
    print("with / without:", {"this model": mine, "partner": partner})
    assert abs(mine["width"] - partner["width"]) < 1, (mine, partner)
    assert abs(mine["height"] - partner["height"]) < 1, (mine, partner)
    assert mine["width"] >= 300  # each still a map a room can read
    assert abs(mine["y"] - partner["y"]) < 1 and mine["x"] + mine["width"] <= partner["x"]
    assert not page.evaluate(SCROLLED_JS)
    for box in (mine, partner, page.locator(".st-key-w_xi").bounding_box()):
        assert on_first_screen(box), box
    page.screenshot(path=artifacts / "fit-explorer-with-without.png")
    page.close()


@pytest.mark.parametrize("xi", ["0.00", "0.30"])
def test_the_worked_eq5_wraps_inside_its_column(site, artifacts, xi):
    """ξ = 0 keeps all 36 patches (four products and the other 32 kept); ξ = 0.3 keeps two
    and removes the rest (their 0 is a term of its own)."""
    page = opened(site, f"/explorer?model=digits_small_cnn_la&image=7&xi={xi}")
    page.wait_for_function(EQ5_JS, timeout=60_000)
    eq5 = page.evaluate(EQ5_JS)
    print(f"Eq. 5 at ξ = {xi}:", {k: v for k, v in eq5.items() if k != "text"})
    assert eq5["scrollWidth"] <= eq5["clientWidth"], eq5  # no sideways scroll
    assert eq5["columnLeft"] <= eq5["left"] and eq5["right"] <= eq5["columnRight"], eq5
    assert ("removed" in eq5["text"]) == (xi != "0.00")
    heading = page.get_by_role("heading", name="How the prediction is built (Eq. 5)")
    heading.scroll_into_view_if_needed()
    page.screenshot(path=artifacts / f"fit-explorer-eq5-xi{xi}.png")
    page.close()
