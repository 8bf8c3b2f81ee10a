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
  ξ = 1 it can leave the selected patches and so the rendered overlay pixel-identical;
- ``xi_slider_to_overlay_ms_with_training`` (``--training N``): the same while N default digits
  runs, launched in the background into the server's store, train or queue.

``python tests/bench_app.py --pages compare,curves [--runs 3]`` instead times each page's first
useful view (:func:`page_open_times`): from navigation to the element a user came for, on the
first visit (cold), a second one (warm) and in a fresh tab (reload).

``python tests/bench_app.py --gamma [--moves 20]`` times the γmax slider over the shipped family
at 1366x768: each model's first use, then moves between models already used, and the server's
memory with the whole family loaded.

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
if str(ROOT) not in sys.path:  # the engine, for the runs that load the app's store
    sys.path.insert(0, str(ROOT))
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


def gamma_slider(page):
    """The Explorer's γmax slider (a select slider over the trained models)."""
    return page.locator(".st-key-w_gamma").get_by_role("slider")


FAMILY_LINK = "/explorer?model=digits_live_gamma0.3&image=7&xi=0.10"
"""The shipped γmax family's default member, on a test image."""
FAMILY_STOPS = len(list(ROOT.glob("checkpoints/digits_live_gamma*.pt")))


def gamma_latencies(page, url: str, moves: int) -> dict:
    """Seconds from a γmax key press to the new overlay (the page then shows another model):
    first over every stop once, from 0 up (each model's first use: its load and its pass over
    the test images), then ``moves`` moves between stops already used. Also the server's
    resident memory once every model of the family was used, and the URL after a move."""
    page.goto(f"{url}{FAMILY_LINK}")
    src = overlay_state(page, timeout=120_000)
    idle(page)
    gamma_slider(page).focus()
    stops = FAMILY_STOPS  # the slider's element does not say how many stops it has
    first = []
    for i in range(stops):  # Home: the first stop; then one stop up at a time
        start = time.monotonic()
        page.keyboard.press("Home" if i == 0 else "ArrowRight")
        src = wait_new_overlay(page, src, timeout=120_000)
        first.append(time.monotonic() - start)
        idle(page)
        gamma_slider(page).focus()
    rss = server_rss_mib(url)
    keys = ["Home", "End", "ArrowLeft"]  # from the last stop: 0, 3, 1, 0, 3, 1, ...
    warm = []
    for i in range(moves):
        start = time.monotonic()
        page.keyboard.press(keys[i % len(keys)])
        src = wait_new_overlay(page, src)
        warm.append(time.monotonic() - start)
        idle(page)
        gamma_slider(page).focus()
    return {"gamma_first_use_ms": summarise(first[1:]), "gamma_move_ms": summarise(warm),
            "server_rss_mib_family_loaded": rss, "url_after_moves": page.url}


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


def measure_gamma(moves: int = 20) -> dict:
    """The γmax slider on the shipped family, on a fresh server (``--gamma``)."""
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as runs, app_server(runs) as (url, _), \
            sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        result = gamma_latencies(page, url, moves)
        browser.close()
    result["machine"] = {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0]}
    return result


def start_training(runs: str | Path, count: int) -> list[str]:
    """``count`` default digits runs launched in the background into the server's store, as
    a user's launches would be (they queue beyond the store's job limit); returns their names
    once every one of them is training or waiting in the queue."""
    names = [f"load-{i}" for i in range(count)]
    for name in names:
        subprocess.run([sys.executable, "-m", "engine", "train", "--dataset", "digits",
                        "--backbone", "small_cnn", "--head", "loss_attention", "--background",
                        "--runs-dir", str(runs), "--name", name], cwd=ROOT, check=True,
                       capture_output=True)
    deadline = time.monotonic() + 120
    from engine.runs import RunStore

    store = RunStore(runs)
    while time.monotonic() < deadline:
        states = [store.get(n).status().state for n in names]
        if any(s == "running" for s in states) and "starting" not in states:
            return names
        time.sleep(0.2)
    return names


def stop_training(runs: str | Path, names: list[str]) -> None:
    """Stop the runs and wait until each has ended (checkpointed), before the store goes."""
    from engine.jobs import wait
    from engine.runs import RunStore

    store = RunStore(runs)
    for name in names:
        store.stop(name)
    for name in names:
        wait(store.get(name).job, timeout=120)


def measure_queue(launches: int = 20) -> dict:
    """``launches`` short runs launched at once into the store of a server whose Runs page is
    open (it looks at the store every few seconds): what computed at once, the queue, and the
    server's memory, sampled at every look (tests/bench_jobs.py's queue)."""
    import bench_jobs
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as runs, app_server(runs) as (url, _), \
            sync_playwright() as p:
        browser = launch_browser(p)
        page = browser.new_page(viewport={"width": 1366, "height": 768})
        page.goto(f"{url}/runs")
        idle(page)
        rss = [server_rss_mib(url)]
        result = bench_jobs.queue_of(launches, runs, lambda: rss.append(server_rss_mib(url)))
        page.reload()
        idle(page)
        result["server_rss_mib_max"] = max(rss)
        result["server_rss_mib_start"] = rss[0]
        browser.close()
    return result


def measure(moves: int = 20, training: int = 0) -> dict:
    """``training``: also time the ξ slider again while that many default runs train (or wait
    in the queue) in the server's store."""
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
        if training:
            names = start_training(runs, training)
            result["xi_slider_to_overlay_ms_with_training"] = summarise(
                slider_latencies(page, moves))
            result["runs_training_meanwhile"] = training
            stop_training(runs, names)
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
    parser.add_argument("--gamma", action="store_true", help="time the γmax slider over the "
                        "shipped family instead (first use of each model, then --moves moves)")
    parser.add_argument("--training", type=int, default=0, metavar="N",
                        help="also time the ξ slider while N default runs train in the "
                             "server's store")
    parser.add_argument("--first", default="", help="with --pages: comma-separated pages to "
                        "open (untimed) before each timed one")
    args = parser.parse_args()
    if args.pages is not None:
        names = ["" if n.strip() == "home" else n.strip() for n in args.pages.split(",")]
        first = [n.strip() for n in args.first.split(",") if n.strip()]
        result = {"runs": [page_open_times(names, first=first) for _ in range(args.runs)],
                  "machine": {"cpus": os.cpu_count(), "load_avg": os.getloadavg()}}
    elif args.gamma:
        result = measure_gamma(args.moves)
    else:
        result = measure(args.moves, args.training)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
