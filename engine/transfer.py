"""The mutual-transfer study (``python -m engine transfer``): mutual vs alone, the same peers and
seeds, judged by faithfulness. A study above the trainer: it trains ordinary runs of the run
store (:mod:`engine.train`, :mod:`engine.launch`) and the trainer knows nothing of it.

For each seed two runs train in the run store: ``NAME-sS-mutual`` (λ > 0) and ``NAME-sS-alone``
(λ = 0 and no KL: each peer trains exactly as it would by itself, which a test proves bit for
bit). A finished run is reused, a stopped or failed one resumed, so an interrupted experiment
continues where it stopped. Then every peer of every run is judged on the same test images:
its own attention map, Grad-CAM and (where it has one) its Loss-Attention map, by Average Drop /
Increase in Confidence, deletion / insertion AUC, the (energy) pointing game where boxes exist,
and accuracy; beside them the reference maps (uniform, random, centre, the image's intensity),
which know nothing of the model, under the same mask (black, mean or blur; recorded).
``results.json`` / ``.csv`` / ``.md`` go to the output folder, beside the seed paper's own
figures.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import torch

from engine.config import RUN_NAME_PATTERN, RunConfig
from engine.errors import ConfigError, RunError
from engine.fsutil import atomic_write, csv_text, write_json_atomic
from engine.job_status import State
from engine.metric_table import DEFAULT_MASK, MASKS, RANDOM_DRAWS
from engine.runs import Run, RunStore
from engine.safe_io import read_json

log = logging.getLogger(__name__)

ARMS = ("mutual", "alone")
METRICS = ("accuracy", "average_drop_pct", "increase_in_confidence_pct", "deletion_auc",
           "insertion_auc", "pointing_game", "energy_pointing_game")
"""Reported per (arm, map method); the first is the peers' test accuracy."""
HIGHER_IS_BETTER = {"accuracy": True, "average_drop_pct": False,
                    "increase_in_confidence_pct": True, "deletion_auc": False,
                    "insertion_auc": True, "pointing_game": True, "energy_pointing_game": True}
MAP_LABELS = {"own_map": "Peer's own attention map", "gradcam": "Grad-CAM",
              "loss_attention": "Loss-Attention",
              **{f"ref_{k}": f"ref: {k}" for k in ("uniform", "random", "centre", "intensity")}}
"""The maps judged, as tables name them; ``ref_*``: the reference maps
(engine.explain.REFERENCES), whose results.md headings add that they are not methods."""
SEED_PAPER = {
    "source": "Cheng, Wang, Cui, Zhan, Computer Science 49(5):64-70, 2022 (abstract)",
    "average_drop_pct": 28.2, "increase_in_confidence_pct": 29.5,
    "note": "their peers, data and protocol; only these two numbers are published in the "
            "abstract, with an improvement of 3.3 % in Average Drop over the best compared "
            "method (read here as 3.3 points better: this project's interpretation, the "
            "abstract does not say points or percent of the value)",
}


def arm_config(base: RunConfig, name: str, seed: int, arm: str,
               control: str | None = None) -> RunConfig:
    """The run of one arm and seed: ``alone`` is ``base`` with λ = 0 and no KL term.
    ``control``: another experiment whose alone runs this one shares (its λ = 0 runs are the
    same runs whatever λ the mutual arm has), so they are named and tagged after it."""
    if arm == "alone" and control:
        name = control
    if base.transfer is None:
        raise ConfigError("transfer: the experiment needs a transfer section (two or more "
                          "peers)")
    transfer = base.transfer if arm == "mutual" else dataclasses.replace(
        base.transfer, lam=0.0, kl=0.0)
    train = dataclasses.replace(base.train, seed=seed)
    run_name = f"{name}-s{seed}-{arm}"
    if not re.fullmatch(RUN_NAME_PATTERN, run_name):
        raise ConfigError(f"--experiment {name[:100]!r} makes the run name {run_name[:100]!r}, "
                          "which is not a run name (1-80 letters, digits, '.', '_' or '-', "
                          "starting with a letter or digit); choose a shorter or plainer name")
    return dataclasses.replace(base, name=run_name, train=train, transfer=transfer,
                               tags=(*base.tags, f"transfer:{name}", f"arm:{arm}"))


def trained_run(store: RunStore, cfg: RunConfig, progress_bar: bool) -> Run:
    """The run of ``cfg`` trained to its end: reused if finished, resumed if interrupted."""
    from engine.train import prepare_run_config, train_run

    prepared = prepare_run_config(cfg)
    if store.exists(cfg.name):
        run = store.get(cfg.name)
        _check_same_settings(run, prepared)
        state = run.status().state
        if state == State.FINISHED:
            log.info("%s is finished: reused", run.name)
            return run
        resume = state != State.CREATED
    else:
        run, resume = store.create(prepared), False
    state = train_run(run, resume=resume, progress_bar=progress_bar, console=progress_bar,
                      on_status=store.index)
    if state != State.FINISHED:  # stopped or failed: said in one line, resumed by the next call
        raise RunError(f"run {run.name} ended {state}: {run.status().reason}; run "
                       "the same command again to resume it")
    return run


RUNTIME_FIELDS = frozenset({"train.device", "train.compile", "train.data_on_device",
                            "train.checkpoint_minutes", "data.root", "data.download"})
"""Fields that say how or where a run trains, not what it learns: a run reused by name may
differ in them (judge a CPU-trained experiment on a GPU, data moved to another folder)."""


def _check_same_settings(run: Run, wanted: RunConfig) -> None:
    """A run reused by name must be the run asked for: another λ, grid, data or epoch count
    under the same experiment name is an error, never a silently reused result."""
    from engine.config import config_to_dict

    have, want = run.config_dict(), config_to_dict(wanted)
    diff = [f"{section}.{key}: {(have.get(section) or {}).get(key)!r} there, {value!r} asked"
            for section, fields in want.items() if isinstance(fields, dict)
            for key, value in fields.items()
            if f"{section}.{key}" not in RUNTIME_FIELDS and key != "peers"
            and (have.get(section) or {}).get(key) != value]
    if (have.get("transfer") or {}).get("peers") != (want.get("transfer") or {}).get("peers"):
        diff.append("transfer.peers differ")
    if diff:
        raise ConfigError(f"run {run.name} exists with other settings ({'; '.join(diff[:3])}); "
                          "choose another --experiment name, or delete the old runs")


def launch_pair(store: RunStore, base: RunConfig, name: str, seed: int,
                control: bool = True) -> list[Run]:
    """Start the mutual run of ``base`` (and, with ``control``, its λ = 0 twin with the same
    seed) in the background, as the app's Mutual transfer page does."""
    from engine.launch import launch

    arms = ARMS if control else ARMS[:1]
    configs = [arm_config(base, name, seed, arm) for arm in arms]
    for cfg in configs:  # refuse before starting anything: a half-started pair helps no one
        if store.exists(cfg.name):
            raise ConfigError(f"a run named {cfg.name!r} already exists; choose another "
                              "experiment name or seed")
    return [launch(store, cfg) for cfg in configs]


def experiments(store: RunStore) -> dict[str, dict[str, list[dict]]]:
    """Mutual-transfer runs in the store by experiment and arm (from their tags), each a run
    row of :meth:`RunStore.list`, newest experiment first."""
    found: dict[str, dict[str, list[dict]]] = {}
    for row in store.list():
        tags = row.get("tags") or []
        name = next((t.removeprefix("transfer:") for t in tags if t.startswith("transfer:")),
                    None)
        arm = next((t.removeprefix("arm:") for t in tags if t.startswith("arm:")), None)
        if name and arm in ARMS:
            found.setdefault(name, {a: [] for a in ARMS})[arm].append(row)
    return found


JUDGED_VERSION = 1
"""Part of a kept judgement's key: raise it when what judge_peers measures changes, so that
rows judged by the older definition are judged again."""


def judged_peers(run: Run, images: int, steps: int, device: torch.device,
                 mask: str = DEFAULT_MASK, draws: int = RANDOM_DRAWS) -> list[dict]:
    """:func:`judge_peers`, kept in the run's folder (``judged/``) for the same protocol and
    checkpoint: judging costs more than training a small pair, and an experiment run again (the
    other mask, an experiment sharing this control, an interrupted one) need not judge again."""
    if mask not in MASKS:  # it names a file below: only the known names
        raise ValueError(f"mask must be one of {list(MASKS)}; got {mask!r}")
    best = run.path / "best.pt"
    stamp = best.stat() if best.exists() else None
    key = {"version": JUDGED_VERSION, "images": images, "steps": steps, "mask": mask,
           "draws": draws, "best": [stamp.st_mtime_ns, stamp.st_size] if stamp else None}
    path = run.path / "judged" / f"{mask}-i{images}-s{steps}-d{draws}.json"
    try:
        kept = read_json(path, "judged maps")
    except (OSError, ValueError):  # none yet, or damaged: judged again
        kept = None
    if isinstance(kept, dict) and kept.get("key") == key and isinstance(kept.get("rows"), list):
        return kept["rows"]
    rows = judge_peers(run, images, steps, device, mask, draws)
    path.parent.mkdir(exist_ok=True)
    write_json_atomic(path, {"key": key, "rows": rows})
    return rows


def judge_peers(run: Run, images: int, steps: int, device: torch.device,
                mask: str = DEFAULT_MASK, draws: int = RANDOM_DRAWS) -> list[dict]:
    """Every peer of ``run`` at its best epoch, on the first ``images`` test images, with the
    reference maps (``ref_*``; the random one over ``draws`` seeded repeats), under ``mask``."""
    from engine.checkpoint import load_model
    from engine.data import load_split
    from engine.explain import REFERENCES, faithfulness
    from engine.metrics import evaluate
    from engine.team import input_maps

    cfg = run.config()
    data = load_split(cfg.data, "test")
    indices = torch.arange(min(images, len(data)))
    rows = []
    for k in range(len(cfg.models)):
        model, _ = load_model(run.peer_checkpoint(k), device)
        methods = ["gradcam"] + (["loss_attention"] if model.regularised else [])
        own = {"own_map": lambda x, c, model=model: input_maps(model, x, cfg.transfer)}
        report = faithfulness(model, data, device, indices, methods=methods, steps=steps,
                              extra=own, mask=mask, references=list(REFERENCES), draws=draws)
        accuracy = evaluate(model, data, device).get("test_acc")
        judged = {**report["methods"],
                  **{f"ref_{r}": v for r, v in report["references"].items()}}
        for method, values in judged.items():
            rows.append({"run": run.name, "peer": k, "model": f"{cfg.models[k].backbone}/"
                         f"{cfg.models[k].head}", "method": method, "accuracy": accuracy,
                         "mask": mask, **values})
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    """Per (method, metric): each arm's mean ± std over seeds (peers averaged within a seed)
    and the paired difference mutual - alone, with how many seeds moved the good way."""
    out = []
    mask = next((r["mask"] for r in rows if "mask" in r), "black")
    order = list(MAP_LABELS)
    methods = sorted({r["method"] for r in rows},
                     key=lambda m: order.index(m) if m in order else len(order))
    for method in methods:
        for metric in METRICS:
            per_arm = {arm: _per_seed(rows, arm, method, metric) for arm in ARMS}
            seeds = sorted(set(per_arm["mutual"]) & set(per_arm["alone"]))
            if not seeds:
                continue
            diffs = [per_arm["mutual"][s] - per_arm["alone"][s] for s in seeds]
            better = sum((d > 0) == HIGHER_IS_BETTER[metric] and d != 0 for d in diffs)
            out.append({"method": method, "metric": metric, "mask": mask, "seeds": len(seeds),
                        **{f"{arm}_mean": _mean(per_arm[arm].values()) for arm in ARMS},
                        **{f"{arm}_std": _std(per_arm[arm].values()) for arm in ARMS},
                        "difference_mean": _mean(diffs), "difference_std": _std(diffs),
                        **_seed_interval(diffs), "seeds_better": better})
    return out


INTERVAL = "t over seeds"
"""How ``difference_low`` / ``difference_high`` are made: the Student t 95 % interval of the
per-seed paired differences (n − 1 degrees of freedom; none with one seed)."""


def _seed_interval(diffs: list[float]) -> dict:
    from engine.intervals import t_interval

    got = t_interval(diffs)
    return {"difference_low": got["low"], "difference_high": got["high"],
            "interval": INTERVAL}


def add_intervals(report: dict) -> dict:
    """Give a summary saved before the intervals existed its t intervals, from its per-seed
    rows (the same pairing :func:`summarise` uses); rows without seeds are left as they are."""
    rows = report.get("rows") or []
    for r in report.get("summary") or []:
        if "difference_low" in r or not rows:
            continue
        per_arm = {arm: _per_seed(rows, arm, r["method"], r["metric"]) for arm in ARMS}
        seeds = sorted(set(per_arm["mutual"]) & set(per_arm["alone"]))
        r.update(_seed_interval([per_arm["mutual"][s] - per_arm["alone"][s] for s in seeds]))
    return report


def difference_sentence(r: dict) -> str:
    """The summary row's mutual − alone in words that follow its interval."""
    from engine.intervals import difference_words

    digits = 1 if r["metric"].endswith("_pct") else 3
    better = "higher" if HIGHER_IS_BETTER[r["metric"]] else "lower"
    return difference_words("mutual", "alone", r["metric"], r["difference_mean"],
                            r.get("difference_low"), r.get("difference_high"), better, digits)


def _per_seed(rows: list[dict], arm: str, method: str, metric: str) -> dict[int, float]:
    by_seed: dict[int, list[float]] = {}
    for r in rows:
        if r["arm"] == arm and r["method"] == method and r.get(metric) is not None:
            by_seed.setdefault(r["seed"], []).append(r[metric])
    return {s: sum(v) / len(v) for s, v in by_seed.items()}


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def _std(values) -> float | None:
    values = list(values)
    return statistics.stdev(values) if len(values) > 1 else None


def run_experiment(store: RunStore, base: RunConfig, name: str, seeds: list[int], *,
                   images: int = 500, steps: int = 16, out: str | Path,
                   mask: str = DEFAULT_MASK, draws: int = RANDOM_DRAWS, progress_bar: bool = True,
                   on_progress: Callable[[str], None] = lambda text: None,
                   control: str | None = None) -> dict:
    """Train both arms for every seed, judge every peer under ``mask`` (with the reference
    maps, the random one over ``draws`` repeats), write the results folder."""
    from engine.device import resolve_device
    from engine.explain import check_mask, check_references

    check_mask(mask)  # before anything trains
    check_references(["random"], draws)
    device = resolve_device(base.train.device)
    # Every run's config first: a bad name fails before anything trains.
    configs = {(seed, arm): arm_config(base, name, seed, arm, control) for seed in seeds
               for arm in ARMS}
    rows, timing = [], []
    for seed in seeds:
        for arm in ARMS:
            on_progress(f"seed {seed}: training the {arm} peers")
            run = trained_run(store, configs[seed, arm], progress_bar)
            on_progress(f"seed {seed}: judging the {arm} peers' maps")
            metrics = run.metrics()
            timing.append({"arm": arm, "seed": seed, "run": run.name,
                           "epoch_s": statistics.median(r["epoch_s"] for r in metrics),
                           "test_map_pearson": metrics[-1].get("test_map_pearson")})
            rows += [{**r, "arm": arm, "seed": seed}
                     for r in judged_peers(run, images, steps, device, mask, draws)]
    report = {"name": name, "config": json.loads(json.dumps(dataclasses.asdict(base))),
              "seeds": seeds, "images": images, "steps": steps, "mask": mask,
              "random_draws": draws, "control": control or name, "rows": rows,
              "summary": summarise(rows), "timing": timing, "seed_paper": SEED_PAPER}
    write_results(report, out)
    return report


def write_results(report: dict, out: str | Path) -> list[Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "results.json", report)
    text = csv_text(report["summary"])
    atomic_write(out / "results.csv", lambda fh: fh.write(text.encode()))
    markdown = format_results(report)
    atomic_write(out / "results.md", lambda fh: fh.write(markdown.encode()))
    return [out / "results.json", out / "results.csv", out / "results.md"]


def read_results(folder: str | Path) -> dict | None:
    try:
        report = read_json(Path(folder) / "results.json", "a transfer results file")
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict) or "summary" not in report:
        return None
    report.setdefault("mask", "black")  # saved before the mask was named: the only one then
    return add_intervals(report)


def _cell(mean, std, digits: int) -> str:
    if mean is None:
        return "-"
    return f"{mean:.{digits}f}" + ("" if std is None else f" ± {std:.{digits}f}")


def format_results(report: dict) -> str:
    """The results as Markdown: one table per map method, the seed paper's numbers, timing."""
    cfg = report["config"]
    peers = [cfg["model"], *cfg["transfer"]["peers"]]
    t = cfg["transfer"]
    setting = (f"Peers {' + '.join(p['backbone'] + '/' + p['head'] for p in peers)} on "
               f"`{cfg['data']['dataset']}`; λ = {t['lam']}, grid {t['grid']}x{t['grid']}, map "
               f"source `{t['map_source']}` ({t['layers']} layers, p = {t['power']}), KL "
               f"{t['kl']}; {cfg['train']['epochs']} epochs; seeds {report['seeds']}; "
               f"{report['images']} test images; mask `{report.get('mask', 'black')}` "
               "(docs/faithfulness.md). Mean ± std over seeds (peers averaged within "
               "a seed); the difference is paired by seed, with its 95 % interval: Student t "
               "over the per-seed differences (n − 1 degrees of freedom; with 3 seeds "
               "t = 4.30, so the interval is wide). A direction is claimed only where the "
               "interval excludes 0. Maps marked reference know nothing of the model: a "
               "yardstick, not a method.")
    lines = [f"# Mutual transfer: {report['name']}", "", setting, ""]
    for method in dict.fromkeys(r["method"] for r in report["summary"]):
        heading = MAP_LABELS.get(method, method) + (
            " (reference, not a method)" if method.startswith("ref_") else "")
        lines += [f"## {heading}", ""] + _method_lines(
            [r for r in report["summary"] if r["method"] == method])
    paper = report["seed_paper"]
    seed = (f"Average Drop {paper['average_drop_pct']} %, Increase in Confidence "
            f"{paper['increase_in_confidence_pct']} % ({paper['source']}; {paper['note']}).")
    lines += ["## The seed paper, for reference", "", seed, "", "## Time and agreement", "",
              "| run | epoch s (median) | test map ρ |",
              "|---|---|---|"]
    for r in report["timing"]:
        rho = r.get("test_map_pearson")
        lines.append(f"| {r['run']} | {r['epoch_s']:.2f} | "
                     f"{'-' if rho is None else f'{rho:.3f}'} |")
    return "\n".join(lines) + "\n"


def _method_lines(summary: list[dict]) -> list[str]:
    """One map method's table (with each difference's interval) and its differences in words."""
    head = "| metric | mutual | alone | mutual - alone | 95 % interval (t, seeds) | seeds better |"
    lines = [head, "|---|---|---|---|---|---|"]
    for r in summary:
        digits = 1 if r["metric"].endswith("_pct") else 3
        arrow = "↑" if HIGHER_IS_BETTER[r["metric"]] else "↓"
        low, high = r.get("difference_low"), r.get("difference_high")
        interval = "-" if low is None or high is None else f"{low:.{digits}f} to {high:.{digits}f}"
        lines.append(f"| {r['metric']} {arrow} | "
                     f"{_cell(r['mutual_mean'], r['mutual_std'], digits)} "
                     f"| {_cell(r['alone_mean'], r['alone_std'], digits)} | "
                     f"{_cell(r['difference_mean'], r['difference_std'], digits)} | {interval} | "
                     f"{r['seeds_better']}/{r['seeds']} |")
    return [*lines, "", *(f"- {difference_sentence(r)}" for r in summary), ""]
