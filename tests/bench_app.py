"""Benchmark the app in a real browser: ``python tests/bench_app.py [--moves 20] [--out F]``.

Starts ``streamlit run app.py`` on a free port with an empty run store, drives Debian's chromium
with Playwright, and prints (and writes as JSON):

- ``home_title_visible_s`` / ``home_complete_s``: server process start to the Home title on
  screen / to the script finishing (cold imports included); ``..._after_answer_s``: the same
  from the moment the server first answers its health check;
- ``explorer_cold_s``: first visit of the Patch Explorer (model load and test-set pass included);
- ``explorer_warm_s``: a later visit, from navigation to the overlay on screen;
- ``server_rss_mib_after_explorer``: the server process's resident memory after both visits;
- ``server_cpu_ms_per_xi_move``: the server's CPU time (all threads) over the slider moves
  below, per move;
- ``xi_slider_to_overlay_ms``: a ξ slider key press to a new overlay image (median, p90, all),
  alternating page steps (0 <-> 0.1) and jumps (0 <-> 1). A 0.01 arrow step is not used: near
  ξ = 1 it can leave the selected patches and so the rendered overlay pixel-identical.

``python tests/bench_app.py --pages compare,curves [--runs 3]`` instead times each page's first
useful view (:func:`page_open_times`): from navigation to the element a user came for, on the
first visit (cold), a second one (warm) and in a fresh tab (reload).

The browser test (tests/test_browser.py) shares these helpers.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
# The overlay is the Explorer's patch map: SVG shown as an image (a data URI), marked
# data-map="ex_map" inside. Its state is the image's source: a ξ move that changes any cell's
# colour or layer changes it.
MAP_IMG_JS = """(key) => Array.from(
  document.querySelectorAll("[data-testid='stMain'] img[src^='data:image/svg+xml']"))
  .find(img => atob(img.src.split(",")[1]).includes(`data-map="${key}"`)) || null"""
OVERLAY_JS = f"""() => {{ const img = ({MAP_IMG_JS})("ex_map");
  return img && img.complete ? img.src : null; }}"""


SERVER_PIDS: dict[str, int] = {}  # url -> the streamlit server's pid, while it runs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def app_server(runs_root: str | Path):
    """``streamlit run app.py`` as a user starts it; yields (url, monotonic start time)."""
    port = free_port()
    env = {**os.environ, "LOSSATTN_RUNS": str(runs_root)}
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port),
         "--browser.gatherUsageStats", "false", "--server.fileWatcherType", "none"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    SERVER_PIDS[url] = proc.pid
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(OSError):
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            if time.monotonic() > deadline or proc.poll() is not None:
                raise RuntimeError("streamlit did not start: "
                                   + proc.stdout.read1().decode(errors="replace"))
            time.sleep(0.05)
        yield url, started
    finally:
        SERVER_PIDS.pop(url, None)
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()


def launch_browser(playwright):
    return playwright.chromium.launch(executable_path=CHROMIUM, headless=True,
                                      args=CHROMIUM_ARGS)


def xi_slider(page):
    """The Explorer's ξ slider (the view options above it have a slider too)."""
    return page.locator(".st-key-w_xi").get_by_role("slider")


def idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector(IDLE, timeout=timeout)


def overlay_state(page, timeout: float = 60_000) -> str:
    page.wait_for_function(OVERLAY_JS, timeout=timeout)
    return page.evaluate(OVERLAY_JS)


def wait_new_overlay(page, old: str, timeout: float = 30_000) -> str:
    page.wait_for_function(f"old => {{ const s = ({OVERLAY_JS})(); return s && s !== old; }}",
                           arg=old, timeout=timeout)
    return page.evaluate(OVERLAY_JS)


# What a user opens each page for, as a JS predicate that holds once it is on screen. A page not
# listed is ready when its title is drawn and its script has finished.
COMPARE_MAPS_JS = """() => {
  const gd = document.querySelector("[data-testid='stMain'] .st-key-cm_maps_fast .js-plotly-plot");
  return gd && gd.data && gd.data.some(t => t.type === 'heatmap'); }"""
READY_JS = {
    "explorer": OVERLAY_JS,
    "compare": COMPARE_MAPS_JS,  # the test images with the one-pass maps over them
    "curves": "() => document.querySelector('[data-testid=stMain] .js-plotly-plot')",
}
TITLE_JS = "() => { const h = document.querySelector('h1'); return h ? h.innerText : ''; }"


def open_timed(page, url: str, name: str, via: str = "click", timeout: float = 120_000
               ) -> float:
    """Seconds from navigating to page ``name`` (url path; ``""``: Home) to its first useful
    element on screen (READY_JS), ``via`` its sidebar link (a user moving within the app) or
    ``"goto"`` (the address typed into a fresh tab: the page and its scripts load again).
    Returns once the script has finished, so that the next navigation starts clean."""
    old_title = page.evaluate(TITLE_JS)
    start = time.monotonic()
    if via == "click":
        page.locator(f"[data-testid='stSidebarNavLink'][href='{url}/{name}']").click()
    elif via == "goto":
        page.goto(f"{url}/{name}")
    else:
        raise ValueError(f"via must be 'click' or 'goto'; got {via!r}")
    # The page before may still be on screen for a moment: wait for the new title first.
    page.wait_for_function(f"old => ({TITLE_JS})() && ({TITLE_JS})() !== old", arg=old_title,
                           timeout=timeout)
    ready = READY_JS.get(name)
    if ready:
        page.wait_for_function(ready, timeout=timeout)
    else:
        idle(page, timeout)
    seconds = time.monotonic() - start
    idle(page, timeout)
    return seconds


def page_open_times(pages: list[str], runs_root: str | Path | None = None,
                    first: Sequence[str] = ()) -> dict[str, dict]:
    """``{page: {"cold_s", "warm_s", "reload_s"}}`` for url paths like ``"compare"`` (``""``:
    Home), on the shipped default model, each page in a fresh server so that its numbers do not
    depend on which pages went before (unless ``first`` names pages to open, untimed, before
    it: e.g. ``["explorer"]`` to see what a page gains from the Explorer's caches):

    - ``cold_s``: the first visit, by its sidebar link from Home (model load, test set and
      computation included; process start-up and imports are already paid for by Home);
    - ``warm_s``: a second visit by its sidebar link, after another page;
    - ``reload_s``: then the page's address in a fresh tab (the browser loads the app again)."""
    from playwright.sync_api import sync_playwright

    out = {}
    with sync_playwright() as p:
        browser = launch_browser(p)
        for name in pages:
            away = "runs" if name != "runs" else ""
            with contextlib.ExitStack() as stack:
                runs = runs_root or stack.enter_context(tempfile.TemporaryDirectory())
                url, started = stack.enter_context(app_server(runs))
                page = browser.new_page(viewport={"width": 1400, "height": 1000})
                open_home(page, url, started)
                for before in first:
                    open_timed(page, url, before)
                if name in ("", *first[-1:]):  # already on it: go away first
                    open_timed(page, url, away)
                cold = open_timed(page, url, name)
                open_timed(page, url, away)
                warm = open_timed(page, url, name)
                page.close()
                fresh = browser.new_page(viewport={"width": 1400, "height": 1000})
                fresh.goto(f"{url}/{away}")
                idle(fresh)
                out[name] = {"cold_s": cold, "warm_s": warm,
                             "reload_s": open_timed(fresh, url, name, via="goto")}
                fresh.close()
        browser.close()
    return out


def open_home(page, url: str, started: float) -> dict:
    """Times from ``started`` (the server process's start) and from now (the server answers:
    ``app_server`` returns once its health check does) to the Home title on screen and to the
    script finishing."""
    answered = time.monotonic()
    page.goto(url)
    page.get_by_role("heading", name="Loss-Attention Studio").wait_for(timeout=60_000)
    title = time.monotonic()
    idle(page)
    done = time.monotonic()
    return {"home_title_visible_s": title - started, "home_complete_s": done - started,
            "home_title_after_answer_s": title - answered,
            "home_complete_after_answer_s": done - answered}


def open_explorer(page, url: str) -> float:
    """Seconds from navigation to the overlay on screen."""
    start = time.monotonic()
    page.goto(f"{url}/explorer")
    overlay_state(page, timeout=120_000)
    seconds = time.monotonic() - start
    idle(page)
    return seconds


def slider_latencies(page, moves: int) -> list[float]:
    """Seconds from each ξ key press to the new overlay (the browser's figure data changed)."""
    xi_slider(page).focus()
    keys = ["End", "Home", "PageUp", "Home"]  # 1, 0, 0.1, 0: each move changes the overlay
    src, out = overlay_state(page), []
    for i in range(moves):
        start = time.monotonic()
        page.keyboard.press(keys[i % len(keys)])
        src = wait_new_overlay(page, src)
        out.append(time.monotonic() - start)
        idle(page)
    return out


def server_rss_mib(url: str) -> float:
    """The app server's resident memory now (MiB): the process a user's machine keeps."""
    import psutil

    return psutil.Process(SERVER_PIDS[url]).memory_info().rss / 2**20


def server_cpu_s(url: str) -> float:
    """CPU seconds the app server has used so far, all its threads (script runs, websocket)."""
    import psutil

    times = psutil.Process(SERVER_PIDS[url]).cpu_times()
    return times.user + times.system


def summarise(latencies: list[float]) -> dict:
    ms = sorted(1000 * v for v in latencies)
    return {"median": statistics.median(ms), "p90": ms[int(0.9 * (len(ms) - 1))],
            "all": [round(v) for v in ms]}


def measure(moves: int = 20) -> dict:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as runs, app_server(runs) as (url, started), \
            sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        result = open_home(page, url, started)
        result["explorer_cold_s"] = open_explorer(page, url)
        page.goto(f"{url}/runs")
        idle(page)
        result["explorer_warm_s"] = open_explorer(page, url)
        result["server_rss_mib_after_explorer"] = server_rss_mib(url)
        cpu = server_cpu_s(url)
        result["xi_slider_to_overlay_ms"] = summarise(slider_latencies(page, moves))
        result["server_cpu_ms_per_xi_move"] = 1000 * (server_cpu_s(url) - cpu) / moves
        browser.close()
    import torch

    result["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                         "load_avg_1min": os.getloadavg()[0]}
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--moves", type=int, default=20, help="ξ slider moves to time")
    parser.add_argument("--out", help="also write the JSON here")
    parser.add_argument("--pages", help="comma-separated url paths: time their first useful "
                        "view instead (cold, warm, reload; '' or 'home' for Home)")
    parser.add_argument("--runs", type=int, default=1, help="with --pages: repeat this often")
    parser.add_argument("--first", default="", help="with --pages: comma-separated pages to "
                        "open (untimed) before each timed one")
    args = parser.parse_args()
    if args.pages is not None:
        names = ["" if n.strip() == "home" else n.strip() for n in args.pages.split(",")]
        first = [n.strip() for n in args.first.split(",") if n.strip()]
        result = {"runs": [page_open_times(names, first=first) for _ in range(args.runs)],
                  "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    else:
        result = measure(args.moves)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
