"""MIL result folders: results.json / .csv / .md and weights_<set>_<method>.json, merged as each
(data set, method) finishes; the folder's status.json is its job's (:mod:`engine.jobs`)."""

from __future__ import annotations

from pathlib import Path

from engine.fsutil import atomic_write, csv_text, write_json_atomic
from engine.mil.data import BENCHMARKS
from engine.mil.models import MIL_METHODS
from engine.mil.paper import format_paper, paper_accuracy
from engine.safe_io import read_json


def read_results(folder: str | Path) -> list[dict]:
    """The result rows (without bag weights) of a results folder; [] if there are none."""
    try:
        rows = read_json(Path(folder) / "results.json", "a MIL results file").get("rows", [])
    except (OSError, ValueError, AttributeError):
        return []
    return rows if isinstance(rows, list) else []


def weights_path(folder: str | Path, dataset: str, method: str) -> Path:
    return Path(folder) / f"weights_{dataset}_{method}.json"


def read_bag_weights(folder: str | Path, dataset: str, method: str) -> list[dict]:
    """Per-bag instance weights written by :func:`write_results`; [] if absent."""
    try:
        return read_json(weights_path(folder, dataset, method), "bag weights")
    except (OSError, ValueError):
        return []


def _pm(mean, std) -> str:
    if mean is None:
        return "-"
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"


TEST_MAX = "test-max (optimistic)"
"""The diagnostic column's name, wherever it is shown."""
TEST_MAX_NOTE = (
    "*Measured* is this project's honest protocol: each fold's epoch is chosen on data held out "
    "from its training folds, and the test fold is seen once. *Test-max (optimistic)* is the "
    "same folds' best test accuracy over the epochs that choice could take: the released AAAI "
    "code's rule (`np.amax` over per-epoch test accuracies), which selects the epoch on the test "
    "fold. It is shown only to measure that rule's bias; it never touches training or selection, "
    "and the headline is the measured column.")


def table_rows(rows: list[dict]) -> list[dict]:
    """Flat rows for a table: measured, test-max (optimistic) and paper accuracy side by side,
    and the gap measured − paper."""
    out = []
    for r in rows:
        paper = paper_accuracy(r["dataset"], r["method"])
        gap = None if paper is None else r["accuracy_mean"] - paper[0]
        out.append({"dataset": r["dataset"], "method": r["method"],
                    "measured": _pm(r["accuracy_mean"], r["accuracy_std"]),
                    TEST_MAX: _pm(r.get("test_max_mean"), r.get("test_max_std")),
                    "paper": format_paper(r["dataset"], r["method"]),
                    "gap": "-" if gap is None else f"{gap:+.3f}",
                    "folds": f"{r['folds_done']}", "seconds": r.get("seconds")})
    return out


def results_markdown(rows: list[dict], title: str = "MIL benchmarks", note: str = "") -> str:
    lines = [f"# {title}", "",
             ("Accuracy, mean ± std over all test folds (repeated stratified k-fold CV), beside "
              "the AAAI 2020 Loss-Attention paper's numbers. Gap = measured − paper."), "",
             TEST_MAX_NOTE, ""]
    if note:
        lines += [note, ""]
    columns = ["dataset", "method", "measured", TEST_MAX, "paper", "gap", "folds", "seconds"]
    header = ["data set", *columns[1:]]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in table_rows(rows):
        lines.append("| " + " | ".join(str(r[c]) for c in columns) + " |")
    totals: dict[str, float] = {}
    for r in rows:
        totals[r["method"]] = totals.get(r["method"], 0.0) + float(r.get("seconds") or 0.0)
    if totals:
        threads = sorted({str(r.get("threads", "?")) for r in rows})
        lines += ["", "Cross-validation time (training and testing, all folds), summed per "
                  "method over its rows: " + ", ".join(f"{m} {t / 60:.1f} min"
                                                         for m, t in totals.items())
                  + f" (CPU, torch threads: {'/'.join(threads)})."]
    if rows:
        cfg = rows[0]["config"]
        keys = [k for k in cfg if k != "method"]
        lines += ["", "Settings: " + ", ".join(f"{k}={cfg[k]}" for k in keys) + "."]
    return "\n".join(lines) + "\n"


def write_results(folder: str | Path, rows: list[dict], note: str = "") -> list[Path]:
    """Merge ``rows`` into the folder's results (a (dataset, method) row replaces an older one)
    and write results.json, results.csv, results.md and the bag weights."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for r in rows:
        if "bag_weights" in r:
            write_json_atomic(weights_path(folder, r["dataset"], r["method"]), r["bag_weights"],
                              durable=False)
    new = {(r["dataset"], r["method"]): {k: v for k, v in r.items() if k != "bag_weights"}
           for r in rows}
    merged = [r for r in read_results(folder) if (r["dataset"], r["method"]) not in new]
    merged += list(new.values())
    # The paper's order: MUSK1, MUSK2, FOX, TIGER, ELEPHANT, then other sets by name.
    sets = {d: i for i, d in enumerate(BENCHMARKS)}
    order = {m: i for i, m in enumerate(MIL_METHODS)}
    merged.sort(key=lambda r: (sets.get(r["dataset"], 99), r["dataset"],
                               order.get(r["method"], 99)))
    write_json_atomic(folder / "results.json", {"rows": merged}, durable=False)
    table = csv_text(table_rows(merged)) if merged else "dataset\n"
    atomic_write(folder / "results.csv", lambda fh: fh.write(table.encode()), durable=False)
    md = results_markdown(merged, note=note)
    atomic_write(folder / "results.md", lambda fh: fh.write(md.encode()), durable=False)
    return [folder / "results.json", folder / "results.csv", folder / "results.md"]
