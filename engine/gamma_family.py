"""The shipped γmax family: the default digits model trained at seven values of γmax.

ξ acts only at inference, so the Patch Explorer re-thresholds one model at any ξ; γmax weighs
the patch loss during training, so moving it needs one trained model per value. The family is
the default digits command, a plain ``train`` (small_cnn, Loss-Attention, ``live`` preset) at
γmax ∈ {0, 0.01, 0.03, 0.1, 0.3, 1, 3}, one recipe for all. The spacing comes from a pilot (one
seed each, ξ = 0.1): from 0.01 to 1 every ×3 step moved the patches kept per image by a similar
amount (20 → 14 → 8.5 → 5.7 → 3.7), so steps of ×3 are even steps of effect; 0 is the ablation
(every patch kept), and 3 is where accuracy gives way (0.905 against 0.975-0.98 for the others).

:func:`build_family` is ``python -m engine gamma-family``: a sweep over the values with three
seeds each (torch threads pinned to 1, so every cell is the same bit for bit however many run
beside it); each cell evaluated on the whole test set at every ξ of the Explorer's slider
(``results/gamma_family/results.json``, what the Explorer's *What γmax does* draws); seed 0
of every value exported to ``checkpoints/`` in half precision with its card.
"""

from __future__ import annotations

import itertools
import json
import math
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from engine.budget import holding
from engine.catalog import FAMILY_GAMMAS, family_checkpoint_name
from engine.checkpoint import load_model
from engine.config import RunConfig
from engine.export import export_model
from engine.fsutil import atomic_write, csv_text, write_json_atomic
from engine.runs import Run, RunStore
from engine.safe_io import TABLE_CAP, read_json, read_text
from engine.sweep import run_sweep, sweep_configs, write_manifest

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SWEEP = "gamma-family"
GAMMAS = FAMILY_GAMMAS
SEEDS = 3
XI_GRID = tuple(round(i / 100, 2) for i in range(101))
"""Every position of the Explorer's ξ slider (step 0.01)."""
CHECKPOINTS = PROJECT_ROOT / "checkpoints"
RESULTS = PROJECT_ROOT / "results" / "gamma_family"
METRICS = ("accuracy", "precision_paper", "recall_paper", "f_paper", "precision", "recall", "f",
           "gt_known_loc", "patches_per_image")
"""What the results file keeps per (γmax, seed, ξ)."""
BASE = {"data": {"dataset": "digits"},
        "model": {"backbone": "small_cnn", "head": "loss_attention"},
        "train": {"threads": 1}}
"""The default digits command (a plain ``train``), its preset filled per cell, with one torch
thread: the family regenerates bit for bit on the same kind of machine."""


checkpoint_name = family_checkpoint_name


def family_configs(seeds: int = SEEDS, gammas=GAMMAS) -> list[RunConfig]:
    return sweep_configs(json.loads(json.dumps(BASE)),
                         [("loss.gamma_max", list(gammas)), ("train.seed", list(range(seeds)))],
                         SWEEP)


def build_family(store: RunStore, checkpoints: Path = CHECKPOINTS, results: Path = RESULTS,
                 seeds: int = SEEDS, gammas=GAMMAS, parallel: int = 2,
                 log: Callable[[str], None] = print) -> dict:
    """Train (or finish) the family's sweep, evaluate every cell, write the results file and
    export seed 0 of every γmax; returns the results."""
    configs = family_configs(seeds, gammas)
    write_manifest(store, SWEEP, [("loss.gamma_max", list(gammas)),
                                  ("train.seed", list(range(seeds)))])
    run_sweep(store, configs, parallel, progress_bar=False, log=log)
    rows = []
    with holding(store.root, threads=1):  # one thread here too: the results repeat exactly
        for config in configs:
            run = store.get(config.name)
            log(f"{run.name}: evaluating at {len(XI_GRID)} values of ξ")
            rows += evaluate_member(run)
    out = {"sweep": SWEEP, "gammas": list(gammas), "seeds": list(range(seeds)),
           "xi_grid": list(XI_GRID), "command": "python -m engine gamma-family",
           "weights": "float16 as shipped, decoded exactly to float32",
           "machine": machine(), "rows": rows}
    write_results(out, results)
    for config in configs:
        if config.train.seed == 0:
            run = store.get(config.name)
            run.update_status(command=member_command(config.loss.gamma_max))
            name = checkpoint_name(config.loss.gamma_max)
            weights, _ = export_model(
                run, checkpoints / name, half=True,
                title=f"{Path(name).stem}: the live γmax family at γmax = "
                      f"{config.loss.gamma_max:g} (cell {run.name})")
            log(f"exported {weights}")
    return out


def member_command(gamma: float) -> str:
    """One member alone, as the family trains it (the same weights, bit for bit: the run's
    name and tags do not enter training)."""
    return (f"python -m engine train --name digits-live-gamma{gamma:g} --dataset digits "
            f"--backbone small_cnn --head loss_attention --gamma-max {gamma:g} --threads 1 "
            "--seed 0   # or the whole family: python -m engine gamma-family")


def evaluate_member(run: Run) -> list[dict]:
    """The run's best checkpoint, rounded to float16 as it ships, on the whole test set at
    every ξ of :data:`XI_GRID`: one row per ξ."""
    from engine.data import load_split
    from engine.evaluate import evaluate_model, summary_rows

    model, ckpt = load_model(run.best_checkpoint)
    with torch.no_grad():  # exactly the values a half-precision checkpoint decodes to
        for tensor in model.state_dict().values():
            if tensor.is_floating_point():
                tensor.copy_(tensor.half().float())
    config = run.config()
    data = load_split(config.data, "test")
    report = evaluate_model(model, data, torch.device("cpu"), xi_grid=list(XI_GRID),
                            groups=["image", "patch", "localization"], pr_curves=False)
    # Six decimals: far below any difference the family shows, and a third of the file.
    return [{"gamma_max": config.loss.gamma_max, "seed": config.train.seed, "run": run.name,
             "best_epoch": ckpt.get("metrics", {}).get("epoch"), "images": len(data),
             "xi": row["xi"], **{k: round(row[k], 6) for k in METRICS if k in row}}
            for row in summary_rows(report)]


def machine() -> dict:
    """What the family was trained on: a bf16-capable CPU trains it in bf16 (the live
    preset's ``train.amp``), another in fp32, so the weights differ between the two kinds."""
    from engine.device import cpu_has_native_bf16

    cpu = ""
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")),
                       "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "native_bf16": cpu_has_native_bf16(),
            "precision": "bf16 autocast" if cpu_has_native_bf16() else "fp32",
            "torch": torch.__version__, "threads": 1}


def write_results(out: dict, folder: Path) -> None:
    """results.csv (a row per γmax, seed and ξ), results.json (what they were made with) and
    results.md (the table at ξ = 0.1)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(folder / "results.json", {k: v for k, v in out.items() if k != "rows"})
    atomic_write(folder / "results.csv", lambda fh: fh.write(csv_text(out["rows"]).encode()))
    text = results_markdown(out, 0.1)
    atomic_write(folder / "results.md", lambda fh: fh.write(text.encode()))


def load_results(folder: Path = RESULTS) -> dict:
    """What :func:`write_results` wrote: the settings, with the rows (numbers as numbers)."""
    import csv
    import io

    from engine.errors import RunError

    try:
        data = read_json(Path(folder) / "results.json", "the γmax family's results")
        table = read_text(Path(folder) / "results.csv", TABLE_CAP, "the γmax family's table")
        rows = [{k: _number(v) for k, v in row.items()}
                for row in csv.DictReader(io.StringIO(table, newline=""))]
        if not isinstance(data, dict) or not rows:
            raise TypeError("no rows")
    except (OSError, ValueError, TypeError) as exc:
        raise RunError(f"the γmax family's results in {folder} are unreadable ({exc}); "
                       "regenerate them with `python -m engine gamma-family`") from None
    return {**data, "rows": rows}


def _number(text: str):
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def at_xi(results: dict, xi: float) -> list[dict]:
    """Per γmax at the grid's ξ nearest ``xi``: each metric's mean, sample sd (n - 1), min,
    max and seed values (``KEY``, ``KEY_sd``, ``KEY_min``, ``KEY_max``, ``KEY_values``)."""
    grid = results.get("xi_grid") or sorted({r["xi"] for r in results["rows"]})
    nearest = min(grid, key=lambda v: abs(v - xi))
    out = []
    for gamma in results["gammas"]:
        rows = [r for r in results["rows"] if r["gamma_max"] == gamma and r["xi"] == nearest]
        entry = {"gamma_max": gamma, "xi": nearest, "seeds": len(rows)}
        for key in METRICS:
            values = [float(r[key]) for r in rows if isinstance(r.get(key), int | float)]
            if not values:
                continue
            mean = sum(values) / len(values)
            entry.update({key: mean, f"{key}_values": values, f"{key}_min": min(values),
                          f"{key}_max": max(values),
                          f"{key}_sd": math.sqrt(sum((v - mean) ** 2 for v in values)
                                                 / (len(values) - 1)) if len(values) > 1
                          else None})
        out.append(entry)
    return out


def spread_verdicts(entries: list[dict], key: str) -> list[tuple[float, float, bool]]:
    """For each step between neighbouring γmax values: (lower γmax, higher γmax, whether the
    change exceeds the seeds' spread, i.e. the two values' ranges over seeds do not
    overlap). A plain rule a reader can check on the error bars, not a test: for two sets of
    3 seeds from one distribution the ranges miss each other with probability 2 x 3!3!/6! =
    1/10."""
    steps = []
    for a, b in itertools.pairwise(entries):
        if key not in a or key not in b:
            continue
        apart = a[f"{key}_max"] < b[f"{key}_min"] or b[f"{key}_max"] < a[f"{key}_min"]
        steps.append((a["gamma_max"], b["gamma_max"], apart))
    return steps


LABELS = {"accuracy": "test accuracy", "precision_paper": "patch P (paper)",
          "recall_paper": "patch R (paper)", "f_paper": "patch F (paper)",
          "gt_known_loc": "GT-known loc.", "patches_per_image": "patches kept"}


def results_markdown(results: dict, xi: float) -> str:
    """The family's table at ``xi``: γmax x mean ± sd over the seeds."""
    entries = at_xi(results, xi)
    header = ["γmax", *LABELS.values()]
    machine, first = results["machine"], results["rows"][0]
    note = (f"Mean ± sample sd over {len(results['seeds'])} seeds, whole digits test set "
            f"({first['images']:,} images), weights {results['weights']}. Trained "
            f"on {machine['cpu']} ({machine['precision']}, torch {machine['torch']}, 1 thread). "
            f"Regenerate: `{results['command']}`.")
    lines = [f"# The γmax family at ξ = {entries[0]['xi']:g}", "", note, "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in entries:
        cells = [f"{e['gamma_max']:g}"]
        for key in LABELS:
            digits = 1 if key == "patches_per_image" else 3
            sd = e.get(f"{key}_sd")
            cells.append(f"{e[key]:.{digits}f}" + (f" ± {sd:.{digits}f}" if sd is not None
                                                  else ""))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def effect_sentences(entries: list[dict]) -> list[str]:
    """In words, per measure: which steps between neighbouring γmax values change it by more
    than the seeds' spread (their ranges do not overlap), and which do not."""
    lines = []
    for key, label in LABELS.items():
        steps = spread_verdicts(entries, key)
        if not steps:
            continue
        means = {e["gamma_max"]: e[key] for e in entries if key in e}
        digits = 1 if key == "patches_per_image" else 3

        def step(a: float, b: float, digits: int = digits, means: dict = means) -> str:
            return f"{a:g}→{b:g} ({means[b] - means[a]:+.{digits}f})"

        apart = [step(a, b) for a, b, beyond in steps if beyond]
        within = [f"{a:g}→{b:g}" for a, b, beyond in steps if not beyond]
        parts = []
        if apart:
            parts.append("beyond the seeds' spread: " + ", ".join(apart))
        if within:
            parts.append("within it: " + ", ".join(within))
        lines.append(f"**{label}**: " + "; ".join(parts))
    return lines
