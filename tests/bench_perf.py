"""The README's Performance table, measured here: ``python tests/bench_perf.py [--runs 3]``
(``make perf``). Run it on a quiet machine: it prints the 1-minute load average beside the
numbers, and every figure is min / median / max of ``--runs`` repeats unless it says otherwise.

Sections (``--only a,b``): ``train`` (the default digits run, process start to finished, and
its time to 95 % and 97 %), ``patch`` (patch precision / recall / F of that run against the
shipped model), ``models`` (training images/s per model), ``explain`` (ms per image per
explanation method on the shipped model), ``startup`` (``python -m engine --help`` and
``models``), ``app`` (ξ-slider latency, Home and Explorer, via tests/bench_app.py), ``pages``
(every page's first useful view). Writes ``--out`` (JSON) and, with ``--readme``, replaces the
table between the ``perf`` markers of README.md.
"""

from __future__ import annotations

import argparse
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
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
SHIPPED = ROOT / "checkpoints" / "digits_small_cnn_la.pt"
DEFAULT_TRAIN = ["train", "--dataset", "digits", "--backbone", "small_cnn", "--head",
                 "loss_attention", "--quiet"]
PAGES = ["", "train", "runs", "explorer", "compare", "curves", "sweep", "stride", "mil",
         "transfer"]
START, END = "<!-- perf:start -->", "<!-- perf:end -->"


def spread(values: list[float]) -> dict:
    return {"min": min(values), "median": statistics.median(values), "max": max(values),
            "n": len(values)}


def engine(args: list[str], **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "engine", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, check=True, **kw)


def _first_reaching(rows: list[dict], created: float, level: float) -> float | None:
    """Seconds from process start to the first epoch whose whole-test-set accuracy is
    >= ``level`` (a sampled mid-run evaluation does not count; the last row is always on the
    whole set)."""
    whole = rows[-1]["eval_images"]
    for row in rows:
        if row["eval_images"] == whole and row["test_acc"] >= level:
            return row["time"] - created
    return None


def train_default(runs: int, store: Path) -> dict:
    """The README's own command with no schedule flags, from process start to finished."""
    walls, accs, to95, to97 = [], [], [], []
    for i in range(runs):
        started = time.time()
        engine([*DEFAULT_TRAIN, "--runs-dir", str(store), "--name", f"default-{i}"])
        walls.append(time.time() - started)
        run = store / f"default-{i}"
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        accs.append(rows[-1]["test_acc"])
        for level, out in ((0.95, to95), (0.97, to97)):
            reached = _first_reaching(rows, started, level)
            if reached is not None:
                out.append(reached)
    config = json.loads((store / "default-0" / "config.json").read_text())
    return {"wall_s": spread(walls), "final_test_acc": spread(accs),
            "to_95_s": spread(to95) if to95 else None, "to_97_s": spread(to97) if to97 else None,
            "preset": config["preset"], "epochs": config["train"]["epochs"],
            "train_images": config["data"]["train_size"]}


def patch_quality(store: Path) -> dict:
    """Patch precision / recall / F (paper's definitions) at ξ = 0.1: the default run's
    against the shipped model's, on the same test set."""
    out = {}
    for label, source in (("shipped", str(SHIPPED)), ("default", "default-0")):
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

    model, ckpt = load_model(SHIPPED)
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
    from bench_app import measure

    return [measure(moves=20) for _ in range(runs)]


def page_times(runs: int) -> dict:
    from bench_app import page_open_times

    measured = [page_open_times(PAGES) for _ in range(runs)]
    return {page or "home": {kind: spread([m[page][kind] for m in measured])
                             for kind in ("cold_s", "warm_s")} for page in PAGES}


def machine() -> dict:
    import torch

    from engine.device import cpu_has_native_bf16

    return {"cpus": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "torch": torch.__version__, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "native_bf16": cpu_has_native_bf16(), "load_avg_1min": os.getloadavg()[0]}


def _mmm(d: dict | None, unit: str = "", digits: int = 1) -> str:
    if not d:
        return "not reached"
    return f"{d['min']:.{digits}f} / {d['median']:.{digits}f} / {d['max']:.{digits}f}{unit}"


def table(result: dict) -> str:
    """The README table: one row per figure, min / median / max of the repeats."""
    rows = [("Figure", "Measured (min / median / max)")]
    m = result["machine"]
    rows.append(("Machine", (f"{m['cpus']} CPUs ({m['cpu_capability']}, native bf16: "
                            f"{m['native_bf16']}), torch {m['torch']}, load "
                            f"{m['load_avg_1min']:.2f}")))
    if "train" in result:
        t = result["train"]
        rows += [((f"Default digits run ({t['preset']}: {t['epochs']} epochs, "
                  f"{t['train_images']} images): process start to finished"),
                  _mmm(t["wall_s"], " s")),
                 ("... its first whole-test-set accuracy >= 95 %", _mmm(t["to_95_s"], " s")),
                 ("... >= 97 %", _mmm(t["to_97_s"], " s")),
                 ("... final test accuracy", _mmm(t["final_test_acc"], "", 4))]
    if "patch" in result:
        for label, v in result["patch"].items():
            rows.append((f"Patch precision / recall / F (paper), ξ = 0.1, {label}",
                         (f"{v['precision_paper']:.3f} / {v['recall_paper']:.3f} / "
                         f"{v['f_paper']:.3f}")))
    for r in result.get("models", []):
        rows.append(((f"Training images/s, {r['model']} ({r['mode']}, batch {r['batch']}, "
                     f"{r['input_size'][0]}x{r['input_size'][1]})"),
                     (f"{r['images_per_s']:.0f} img/s, peak {r['peak_mem_mb']:.0f} MiB "
                     f"({r['memory_kind']})")))
    for method, v in result.get("explain", {}).items():
        rows.append((f"Explanation {method}, shipped model, batch of 32", _mmm(v, " ms/image")))
    for label, v in result.get("startup", {}).items():
        rows.append((f"`python -m engine {'--help' if 'help' in label else 'models'}`",
                     _mmm(v, " s", 2)))
    if "app" in result:
        apps = result["app"]
        for key, label in (("home_complete_s", "App Home, server start to rendered"),
                           ("home_title_after_answer_s",
                            "App Home, server answering to its title on screen"),
                           ("home_complete_after_answer_s",
                            "App Home, server answering to rendered"),
                           ("explorer_cold_s", "Patch Explorer, first visit"),
                           ("explorer_warm_s", "Patch Explorer, later visit")):
            rows.append((label, _mmm(spread([a[key] for a in apps]), " s", 2)))
        rows.append(("App server memory (RSS) after Home and two Explorer visits",
                     _mmm(spread([a["server_rss_mib_after_explorer"] for a in apps]), " MiB",
                          0)))
        for key in ("median", "p90"):
            rows.append((f"ξ slider key press to new overlay, {key} of 20 moves",
                         _mmm(spread([a["xi_slider_to_overlay_ms"][key] for a in apps]),
                              " ms", 0)))
    for page, v in result.get("pages", {}).items():
        rows.append((f"Page `{page}`: first useful view, cold / warm (median)",
                     f"{v['cold_s']['median']:.2f} s / {v['warm_s']['median']:.2f} s"))
    lines = [f"| {a} | {b} |" for a, b in rows]
    lines.insert(1, "|---|---|")
    return "\n".join(lines)


def write_readme(text: str) -> None:
    readme = ROOT / "README.md"
    body = readme.read_text()
    if START not in body or END not in body:
        raise SystemExit(f"README.md has no {START} ... {END} markers")
    head, rest = body.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{text}\n{END}{tail}")


SECTIONS = ("train", "patch", "models", "explain", "startup", "app", "pages")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--only", default=",".join(SECTIONS))
    parser.add_argument("--out", default="perf.json")
    parser.add_argument("--readme", action="store_true", help="rewrite README's table")
    args = parser.parse_args()
    only = args.only.split(",")
    result: dict = {"machine": machine()}
    with tempfile.TemporaryDirectory() as folder:
        store = Path(folder)
        if "train" in only:
            result["train"] = train_default(args.runs, store)
        if "patch" in only:
            if "train" not in only:
                engine([*DEFAULT_TRAIN, "--runs-dir", str(store), "--name", "default-0"])
            result["patch"] = patch_quality(store)
    steps = {"models": train_throughput, "explain": explain_cost,
             "startup": lambda: startup(5), "app": lambda: app_latency(args.runs),
             "pages": lambda: page_times(1)}
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
    if args.readme:
        write_readme(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
