"""docs/performance.md's table, measured here: ``python tests/bench_perf.py [--runs 3]``
(``make perf``). Run it on a quiet machine: it prints the 1-minute load average beside the
numbers, and every figure is min / median / max of ``--runs`` repeats unless it says otherwise.

Sections (``--only a,b``): ``train`` (the default digits run, process start to finished, and
its time to 95 % and 97 %), ``patch`` (patch precision / recall / F of that run against the
shipped model), ``models`` (training images/s per model), ``explain`` (ms per image per
explanation method on the shipped model), ``startup`` (``python -m engine --help`` and
``models``), ``app`` (ξ-slider latency, Home and Explorer, via tests/bench_app.py; the first
repeat also with four runs training), ``gamma`` (the γmax slider over the shipped family),
``pages`` (every page's first useful view), ``transfer`` (the mutual-transfer training step,
two peers against one, fp32 and bf16: tests/bench_transfer.py --step), ``jobs`` (four runs
at once against in a row, and twenty launches at once: tests/bench_jobs.py). Writes ``--out``
(JSON) and, with ``--docs`` (``--readme`` is the same flag, its older name), replaces the table
between the ``perf`` markers of docs/performance.md.

Before and after, side by side: ``--tree DIR`` measures another checkout of the project (a git
worktree of an older commit) with this script: its CLI and its app, its own
``tests/bench_app.py`` for the browser figures, and ``--train-limit S`` to end a default run
that would train for an hour once S seconds have passed (its times to 95 % and 97 % are read
from its metrics). ``--compare BEFORE.json AFTER.json`` prints the two as one table, and
``--from F.json --docs`` writes a saved result's table into docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TREE = ROOT  # the checkout measured (--tree); this one unless told otherwise
DEFAULT_TRAIN = ["train", "--dataset", "digits", "--backbone", "small_cnn", "--head",
                 "loss_attention", "--quiet"]
PAGES = ["", "train", "runs", "explorer", "compare", "curves", "sweep", "stride", "mil",
         "transfer"]
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


def shipped() -> Path:
    return TREE / "checkpoints" / "digits_small_cnn_la.pt"


def engine_env() -> dict:
    return {**os.environ, "PYTHONPATH": str(TREE), "HF_HUB_OFFLINE": "1"}


def engine(args: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=TREE, env=engine_env(),
                          capture_output=True, text=True, check=True, **kw)


def _first_reaching(rows: list[dict], created: float, level: float) -> float | None:
    """Seconds from process start to the first epoch whose whole-test-set accuracy is
    >= ``level`` (a sampled mid-run evaluation does not count; the last row is always on the
    whole set; rows without ``eval_images``, from before sampling existed, are all whole)."""
    whole = rows[-1].get("eval_images")
    for row in rows:
        if row.get("eval_images") == whole and row["test_acc"] >= level:
            return row["time"] - created
    return None


def _metrics(run: Path) -> list[dict]:
    """The run's metrics lines so far; a line the trainer is still writing is left out."""
    path = run / "metrics.jsonl"
    rows = []
    for line in path.read_text().splitlines() if path.exists() else []:
        with contextlib.suppress(json.JSONDecodeError):
            rows.append(json.loads(line))
    return rows


def _train_one(store: Path, name: str, started: float, limit: float | None
               ) -> tuple[float, bool]:
    """One default run, started now (``started``: ``time.time()``); with ``limit``, ended
    (SIGTERM: the trainer checkpoints and stops) once it has reached 97 % or run ``limit``
    seconds. Returns (seconds, whether it finished)."""
    with tempfile.TemporaryFile("w+") as errors:  # a file, not a pipe: nothing can block on it
        proc = subprocess.Popen([sys.executable, "-m", "engine", *DEFAULT_TRAIN, "--runs-dir",
                                 str(store), "--name", name], cwd=TREE, env=engine_env(),
                                stdout=subprocess.DEVNULL, stderr=errors, text=True)
        while proc.poll() is None:
            time.sleep(0.2)
            if limit is None:
                continue
            rows = _metrics(store / name)
            if time.time() - started > limit or (rows and _first_reaching(rows, started, 0.97)):
                proc.terminate()
                proc.wait(120)
                return time.time() - started, False
        if proc.returncode != 0:
            errors.seek(0)
            raise RuntimeError(f"the default run failed: {errors.read()[-2000:]}")
    return time.time() - started, True


def train_default(runs: int, store: Path, limit: float | None = None) -> dict:
    """The README's own command with no schedule flags, from process start to finished (or,
    with ``limit``, to where it was ended: see :func:`_train_one`)."""
    walls, accs, to95, to97, ended = [], [], [], [], []
    for i in range(runs):
        started = time.time()
        seconds, finished = _train_one(store, f"default-{i}", started, limit)
        rows = _metrics(store / f"default-{i}")
        (walls if finished else ended).append(seconds)
        if not rows:  # ended by --train-limit before its first epoch
            continue
        accs.append(rows[-1]["test_acc"])
        for level, out in ((0.95, to95), (0.97, to97)):
            reached = _first_reaching(rows, started, level)
            if reached is not None:
                out.append(reached)
    config = json.loads((store / "default-0" / "config.json").read_text())
    return {"wall_s": spread(walls) if walls else None,
            "ended_unfinished_s": spread(ended) if ended else None,
            "final_test_acc": spread(accs) if accs else None,
            "to_95_s": spread(to95) if to95 else None, "to_97_s": spread(to97) if to97 else None,
            "preset": config.get("preset"), "epochs": config["train"]["epochs"],
            "train_images": config["data"]["train_size"]}


def patch_quality(store: Path) -> dict:
    """Patch precision / recall / F (paper's definitions) at ξ = 0.1: the default run's
    against the shipped model's, on the same test set."""
    out = {}
    for label, source in (("shipped", str(shipped())), ("default", "default-0")):
        with tempfile.TemporaryDirectory() as folder:
            engine(["evaluate", "--runs-dir", str(store), source, "--metrics", "image,patch",
                    "--out", folder])
            report = json.loads((Path(folder) / "report.json").read_text())
        at = next(r for r in report["by_xi"] if r["xi"] == report["model"]["xi"])
        out[label] = {k: at["patch"][k] for k in ("precision_paper", "recall_paper", "f_paper")}
    return out


def train_throughput() -> list[dict]:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "bench.json"
        engine(["bench", "--json", str(path)], timeout=900)
        return json.loads(path.read_text())


def explain_cost(images: int = 32, repeats: int = 3) -> dict:
    """ms per image of each explanation method on the shipped model (one batch of images)."""
    from engine.checkpoint import load_model
    from engine.config import DataConfig, config_from_dict
    from engine.data import load_split
    from engine.data.base import model_input
    from engine.explain import METHODS, explanation_maps

    model, ckpt = load_model(shipped())
    test = load_split(config_from_dict(DataConfig, ckpt["run_config"]["data"]), "test")
    x = model_input(test, test.images[:images])
    classes = test.targets[:images]
    out = {}
    for method in METHODS:
        explanation_maps(model, x[:2], classes[:2], method)  # imports and first-call set-up
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            explanation_maps(model, x, classes, method)
            times.append((time.perf_counter() - start) * 1000 / images)
        out[method] = spread(times)
    return out


def startup(runs: int) -> dict:
    out = {}
    for label, args in (("engine_help_s", ["--help"]), ("engine_models_s", ["models"])):
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            engine(args)
            times.append(time.perf_counter() - start)
        out[label] = spread(times)
    return out


def app_latency(runs: int) -> list[dict]:
    """The browser figures; the first repeat also times the ξ slider while four default runs
    train in the server's store (a checkout whose bench_app cannot: without)."""
    import inspect

    from bench_app import measure

    loaded = {"training": 4} if "training" in inspect.signature(measure).parameters else {}
    return [measure(moves=20, **(loaded if i == 0 else {})) for i in range(runs)]


def jobs() -> dict:
    """Four default runs at once against one after another, under each job limit, and twenty
    launches at once (tests/bench_jobs.py)."""
    import bench_jobs
    from bench_app import measure_queue

    from engine.slots import default_limit

    limits = list(dict.fromkeys([default_limit(), 1, 4]))
    result = bench_jobs.measure(limits, launches=0, before=False, before_limit=0)
    result["queue"] = measure_queue(20)
    return result


def transfer_step(runs: int) -> dict:
    """The mutual-transfer step against one peer's, in fp32 and (native bf16 only) under bf16
    autocast: ``runs`` repeats of tests/bench_transfer.py's interleaved step timing."""
    import bench_transfer

    from engine.device import cpu_has_native_bf16

    out = {}
    for amp in (False, True) if cpu_has_native_bf16() else (False,):
        repeats = [bench_transfer.step_ratios(amp) for _ in range(runs)]
        out["bf16" if amp else "fp32"] = {
            label: spread([r["ratio"][label] for r in repeats]) for label in repeats[0]["ratio"]
            if label != "one peer"} | {"one peer ms": spread(
                [r["step_s"]["one peer"] * 1000 for r in repeats])}
    return out


def _transfer_rows(t: dict) -> list[tuple[str, str, str]]:
    out = []
    for mode, v in t.items():
        out.append((f"transfer_step_{mode}", (f"Mutual transfer: training step, two small_cnn "
                    f"peers with activation maps / one peer ({mode}, batch 128; one peer "
                    f"{v['one peer ms']['median']:.0f} ms)"),
                    _mmm(v["two peers, activation maps"], "x", 2)))
        out.append((f"transfer_step_{mode}_control", f"... two peers at λ = 0 / one peer ({mode})",
                    _mmm(v["two peers, λ = 0"], "x", 2)))
    return out


def gamma_slider() -> dict:
    from bench_app import measure_gamma

    return measure_gamma(moves=20)


def page_times(runs: int) -> dict:
    import bench_app

    if not hasattr(bench_app, "page_open_times"):
        return {}  # an older checkout's bench_app cannot time the pages
    page_open_times = bench_app.page_open_times
    measured = [page_open_times(PAGES) for _ in range(runs)]
    return {page or "home": {kind: spread([m[page][kind] for m in measured])
                             for kind in ("cold_s", "warm_s")} for page in PAGES}


def machine() -> dict:
    import torch

    # engine.device.cpu_has_native_bf16's test, not imported: an older --tree may lack it.
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:  # not Linux
        flags = []
    commit = subprocess.run(["git", "describe", "--always", "--dirty"], cwd=TREE, check=False,
                            capture_output=True, text=True).stdout.strip()
    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": "avx512_bf16" in flags or "amx_bf16" in flags,
            "load_avg_1min": os.getloadavg()[0], "tree": str(TREE), "commit": commit}


def _mmm(d: dict | None, unit: str = "", digits: int = 1) -> str:
    if not d:
        return "not reached"
    return f"{d['min']:.{digits}f} / {d['median']:.{digits}f} / {d['max']:.{digits}f}{unit}"


def _train_rows(t: dict) -> list[tuple[str, str, str]]:
    epochs = (f"{t['preset'] or 'no preset'}: {t['epochs']} epochs, "
              f"{t['train_images'] or 'all'} train images")
    wall = (_mmm(t["wall_s"], " s") if t["wall_s"]
            else f"ended unfinished after {_mmm(t['ended_unfinished_s'], ' s')}")
    return [("train_wall", "Default digits run: process start to finished", f"{wall} ({epochs})"),
            ("train_95", "... its first whole-test-set accuracy >= 95 %", _mmm(t["to_95_s"], " s")),
            ("train_97", "... >= 97 %", _mmm(t["to_97_s"], " s")),
            ("train_acc", "... test accuracy at the end (finished, or ended)",
             _mmm(t["final_test_acc"], "", 4))]


def _app_rows(apps: list[dict]) -> list[tuple[str, str, str]]:
    """The browser figures; an older checkout's bench_app measures only some of them."""
    out = []
    for key, label, unit, digits in (
            ("home_complete_s", "App Home, server start to rendered", " s", 2),
            ("home_title_after_answer_s", "App Home, server answering to its title on screen",
             " s", 2),
            ("home_complete_after_answer_s", "App Home, server answering to rendered", " s", 2),
            ("explorer_cold_s", "Patch Explorer, first visit", " s", 2),
            ("explorer_warm_s", "Patch Explorer, later visit", " s", 2),
            ("server_rss_mib_after_explorer",
             "App server memory (RSS) after Home and two Explorer visits", " MiB", 0),
            ("server_cpu_ms_per_xi_move", "App server CPU time per ξ move (all threads)",
             " ms", 1)):
        if all(key in a for a in apps):
            out.append((key, label, _mmm(spread([a[key] for a in apps]), unit, digits)))
    # What a user who opens the Explorer as soon as Home is drawn waits in all: Home no longer
    # imports torch, so the Explorer's first visit may wait for the rest of that import.
    total = spread([a["home_complete_s"] + a["explorer_cold_s"] for a in apps])
    out.append(("home_then_explorer_s",
                "App: server start to the Explorer's picture (Home, then the Explorer at once)",
                _mmm(total, " s", 2)))
    for key in ("median", "p90"):
        out.append((f"xi_{key}", f"ξ slider key press to new overlay, {key} of 20 moves",
                    _mmm(spread([a["xi_slider_to_overlay_ms"][key] for a in apps]), " ms", 0)))
    loaded = [a for a in apps if "xi_slider_to_overlay_ms_with_training" in a]
    if loaded:
        ms = loaded[0]["xi_slider_to_overlay_ms_with_training"]
        out.append(("xi_with_training", ("... the same while 4 default runs train (queued at "
                    "the job limit), median / p90"), f"{ms['median']:.0f} / {ms['p90']:.0f} ms"))
    return out


def _job_rows(j: dict) -> list[tuple[str, str, str]]:
    together = j["together_s"][str(j["default_limit"])]["seconds"]
    out = [("jobs_alone", "One default digits run alone (foreground)", f"{j['alone_s']:.1f} s"),
           ("jobs_row", "Four default runs one after another", f"{j['in_a_row_s']:.1f} s"),
           ("jobs_together", (f"Four launched together in the background (job limit "
                              f"{j['default_limit']}, the default: one per core)"),
            (f"{together:.1f} s: {j['together_over_in_a_row']:.2f}x four in a row, "
             f"{j['together_over_alone']:.2f}x one alone"))]
    for limit, t in j["together_s"].items():
        if limit != str(j["default_limit"]):
            out.append((f"jobs_limit_{limit}", f"... the same with job limit {limit}",
                        f"{t['seconds']:.1f} s"))
    q = j.get("queue")
    if q:
        out.append(("jobs_queue", (f"{q['launches']} short runs launched at once: computing at "
                                   "once (most) / queued (most) / all ended"),
                    (f"{q['most_computing_at_once']} / {q['longest_queue']} / "
                     f"{q['seconds']:.0f} s ({q['end_states']})")))
    if q and "server_rss_mib_max" in q:
        out.append(("jobs_queue_rss", ("... the app server's memory (RSS) meanwhile, Runs page "
                    "open: at the start / at most"),
                    f"{q['server_rss_mib_start']:.0f} / {q['server_rss_mib_max']:.0f} MiB"))
    return out


def _gamma_rows(g: dict) -> list[tuple[str, str, str]]:
    return [("gamma_move", ("γmax slider (7 shipped models) key press to new overlay, median "
             "/ p90 of 20 moves between models used before"),
             f"{g['gamma_move_ms']['median']:.0f} / {g['gamma_move_ms']['p90']:.0f} ms"),
            ("gamma_first", "... each model's first use (median / max of 6)",
             (f"{g['gamma_first_use_ms']['median']:.0f} / {max(g['gamma_first_use_ms']['all'])} "
             "ms")),
            ("gamma_rss", "App server memory (RSS) with the whole family used",
             f"{g['server_rss_mib_family_loaded']:.0f} MiB")]


def rows(result: dict) -> list[tuple[str, str, str]]:
    """(key, figure, measured) for every figure in ``result``: the key is the same for the
    same figure of another checkout, so that two results line up (:func:`compare`)."""
    m = result["machine"]
    out = [("machine", "Machine", (f"{m['cpus']} CPUs ({m['cpu_capability']}, native bf16: "
                                   f"{m['native_bf16']}), torch {m['torch']}, load "
                                   f"{m['load_avg_1min']:.2f}"))]
    if "train" in result:
        out += _train_rows(result["train"])
    for label, v in result.get("patch", {}).items():
        out.append((f"patch_{label}", f"Patch precision / recall / F (paper), ξ = 0.1, {label}",
                    (f"{v['precision_paper']:.3f} / {v['recall_paper']:.3f} / "
                     f"{v['f_paper']:.3f}")))
    for r in result.get("models", []):
        # The mode beside the figure, not in the label: an older checkout benchmarks another.
        out.append((f"model_{r['model']}", (f"Training images/s, {r['model']} (batch "
                    f"{r['batch']}, {r['input_size'][0]}x{r['input_size'][1]})"),
                    (f"{r['images_per_s']:.0f} img/s in {r['mode']}, peak "
                     f"{r['peak_mem_mb']:.0f} MiB ({r['memory_kind']})")))
    for method, v in result.get("explain", {}).items():
        out.append((f"explain_{method}", f"Explanation {method}, shipped model, batch of 32",
                    _mmm(v, " ms/image")))
    for label, v in result.get("startup", {}).items():
        out.append((label, f"`python -m engine {'--help' if 'help' in label else 'models'}`",
                    _mmm(v, " s", 2)))
    if "app" in result:
        out += _app_rows(result["app"])
    if "gamma" in result:
        out += _gamma_rows(result["gamma"])
    if "transfer" in result:
        out += _transfer_rows(result["transfer"])
    if "jobs" in result:
        out += _job_rows(result["jobs"])
    for page, v in result.get("pages", {}).items():
        out.append((f"page_{page}", f"Page `{page}`: first useful view, cold / warm (median)",
                    f"{v['cold_s']['median']:.2f} s / {v['warm_s']['median']:.2f} s"))
    return out


def markdown(header: tuple[str, ...], body: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])


def table(result: dict) -> str:
    """The Performance table: one row per figure, min / median / max of the repeats."""
    return markdown(("Figure", "Measured (min / median / max)"),
                    [(label, value) for _, label, value in rows(result)])


def compare(before: dict, after: dict) -> str:
    """Two results (``--out`` files) side by side, one row per figure either has; a figure the
    older checkout could not measure shows a dash."""
    old, new = rows(before), rows(after)
    was = {key: value for key, _, value in old}
    keys = {key for key, _, _ in new}
    body = [(label, was.get(key, "-"), value) for key, label, value in new]
    body += [(label, value, "-") for key, label, value in old if key not in keys]
    heads = [f"{side} ({r['machine']['commit']})" if r["machine"].get("commit") else side
             for side, r in (("before", before), ("after", after))]
    return markdown(("Figure", *heads), body)


PERF_DOC = ROOT / "docs" / "performance.md"
"""Where ``--docs`` writes the table (between the ``perf`` markers)."""


def write_table(text: str, doc: Path = PERF_DOC) -> None:
    body = doc.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"{doc.relative_to(ROOT)} has no {START} ... {END} markers")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{text}\n{END}{tail}")


SECTIONS = ("train", "patch", "models", "explain", "startup", "app", "gamma", "pages",
            "transfer", "jobs")


def main() -> int:
    global TREE
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--out", default="perf.json")
    parser.add_argument("--docs", "--readme", dest="docs", action="store_true",
                        help="rewrite the table in docs/performance.md (--readme: its older name)")
    parser.add_argument("--tree", type=Path, default=ROOT,
                        help="measure this checkout of the project (default: this one)")
    parser.add_argument("--train-limit", type=float, metavar="S",
                        help="end a default run after S seconds or once at 97 %%")
    parser.add_argument("--compare", nargs=2, metavar=("BEFORE", "AFTER"),
                        help="print two --out files side by side, and measure nothing")
    parser.add_argument("--from", dest="saved", type=Path, metavar="F",
                        help="the table of an --out file (with --docs: into docs/performance.md), "
                             "measuring nothing")
    args = parser.parse_args()
    if args.compare:
        before, after = (json.loads(Path(f).read_text()) for f in args.compare)
        print(compare(before, after))
        return 0
    if args.saved:
        text = table(json.loads(args.saved.read_text()))
        print(text)
        if args.docs:
            write_table(text)
        return 0
    TREE = args.tree.resolve()
    # The measured checkout's own engine (explanations) and bench_app (the browser figures).
    sys.path[:0] = [str(TREE), str(TREE / "tests")]
    only = args.only.split(",")
    result: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        if "train" in only:
            result["train"] = train_default(args.runs, store, args.train_limit)
        if "patch" in only and result.get("train", {}).get("wall_s", True):
            if "train" not in only:
                engine([*DEFAULT_TRAIN, "--runs-dir", str(store), "--name", "default-0"])
            result["patch"] = patch_quality(store)
    steps = {"models": train_throughput, "explain": explain_cost,
             "startup": lambda: startup(5), "app": lambda: app_latency(args.runs),
             "gamma": gamma_slider, "pages": lambda: page_times(1),
             "transfer": lambda: transfer_step(args.runs), "jobs": jobs}
    for name, step in steps.items():
        if name in only:
            result[name] = step()
            print(f"{name}: done", file=sys.stderr, flush=True)
            # Written after each section: a later section's failure keeps what was measured.
            Path(args.out).write_text(json.dumps(result, indent=1))
    result["machine"]["load_avg_1min_end"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(result, indent=1))
    text = table(result)
    print(text)
    if args.docs:
        write_table(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
