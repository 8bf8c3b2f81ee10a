"""Evaluate a trained model on a data set: every metric, at one ξ or a grid of them.

The backbone runs once per image. What a head needs to re-decode at any ξ (``Head.xi_cache``,
a few numbers per patch) is kept for the whole set, so an 11-value ξ grid costs 11 cheap
re-decodes, not 11 passes through the network.

Metric groups: ``image`` (accuracy, top-5, per class, confusion; or mAP both ways), ``patch``
(precision / recall / F both ways, PR curves), ``localization`` (GT-known and top-1), and
``faithfulness`` (Loss-Attention vs the Grad-CAM family; see engine.explain). A group a model or
data set cannot support raises :class:`EvaluationError` when asked for by name, and is skipped
under ``auto``.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from engine import metrics as M
from engine.data.base import BatchStream, ImageSet
from engine.device import autocast
from engine.errors import EvaluationError
from engine.fsutil import csv_text
from engine.metric_table import DEFAULT_MASK, RANDOM_DRAWS
from engine.models import PatchGrid, PatchModel, PatchOutput

GROUPS = ("image", "patch", "localization", "faithfulness")


@dataclass
class Collected:
    """Per-image outputs of one pass over a data set (on the CPU)."""

    cache: dict[str, torch.Tensor]
    grid: PatchGrid | None
    seconds: float


def progress_bar(total: int, desc: str, show: bool, unit: str = "img"):
    """The progress bar of a long step, on stderr (training's: tqdm); ``show`` False: none."""
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not show, leave=False,
                dynamic_ncols=True)


@torch.no_grad()
def collect(model: PatchModel, data: ImageSet, device: torch.device, *, batch_size: int = 512,
            amp: bool = False, progress: bool = False) -> Collected:
    """One pass of the backbone over ``data``; ``progress``: a bar over its images."""
    if len(data) == 0:
        raise EvaluationError(f"data set {data.name}/{data.split} is empty")
    model.eval()
    parts: dict[str, list[torch.Tensor]] = {}
    start = time.perf_counter()
    grid = model.grid(data.input_size)
    with progress_bar(len(data), f"model pass over {data.name}/{data.split}", progress) as bar:
        for x, _, _ in BatchStream(data, batch_size, device):
            with autocast(device, amp):
                cache = model.xi_cache(x)
            for key, value in cache.items():
                parts.setdefault(key, []).append(value.float().cpu())
            bar.update(len(x))
    return Collected({k: torch.cat(v) for k, v in parts.items()}, grid,
                     time.perf_counter() - start)


def outputs_at(model: PatchModel, collected: Collected, xi: float | None) -> PatchOutput:
    return model.decode_cached(collected.cache, collected.grid, xi)


def resolve_groups(model: PatchModel, data: ImageSet, requested: str | list[str]) -> list[str]:
    """The metric groups to compute; an explicit request that cannot be met is an error."""
    auto = requested == "auto" or requested == ["auto"]
    wanted = list(GROUPS[:3]) if auto else (
        [g.strip() for g in requested.split(",")] if isinstance(requested, str) else requested)
    unknown = [g for g in wanted if g not in GROUPS]
    if unknown:
        raise EvaluationError(f"unknown metric group(s) {unknown}; choose from {list(GROUPS)}")
    problems = {}
    if not model.head.has_patches:
        problems["patch"] = (f"the model (head {model.config.head!r}) has no patch outputs; "
                             "patch metrics need a patch head")
        problems["localization"] = problems["patch"]
    if not data.has_boxes:
        for group, what in (("patch", "patch metrics"), ("localization", "localization")):
            problems.setdefault(group, f"data set {data.name!r} has no bounding boxes; {what} "
                                       "need ground-truth boxes")
    if data.multilabel:
        problems.setdefault("localization", "localization is defined for single-label data "
                                            "(one object class per image), as in the paper")
    if auto:
        return [g for g in wanted if g not in problems]
    for group in wanted:
        if group in problems:
            raise EvaluationError(problems[group])
    return wanted


def _metrics_at(model: PatchModel, data: ImageSet, out: PatchOutput, groups: list[str],
                gt: torch.Tensor | None) -> dict:
    row: dict = {}
    logits, targets = out.logits, data.targets
    if "image" in groups:
        if data.multilabel:
            row["image"] = M.multilabel_metrics(logits.numpy(), targets.numpy())
        else:
            row["image"] = M.classification_metrics(logits, targets)
    if out.patch_weights is not None:
        selected = M.selection_mask(out.patch_weights, model.selection)
        if "patch" in groups:
            agree = M.label_agreement(out.patch_logits, targets, data.multilabel)
            row["patch"] = M.patch_prf(selected, agree, gt)
        if "localization" in groups:
            row["localization"] = M.localization_metrics(
                selected, out.grid.boxes, logits.argmax(1), targets, data.box_data,
                data.box_offsets)
        row["selection"] = {"patches_per_image": selected.float().sum(1).mean().item(),
                            "max_weight": out.patch_weights.max(1).values.mean().item()}
    return row


def evaluate_model(model: PatchModel, data: ImageSet, device: torch.device, *,
                   xi_grid: list[float] | None = None, groups: str | list[str] = "auto",
                   faithfulness_images: int = 0, pr_curves: bool = True,
                   seed: int = 0, collected: Collected | None = None,
                   progress: bool = False, mask: str = DEFAULT_MASK,
                   random_draws: int = RANDOM_DRAWS) -> dict:
    """The full report (a JSON-ready dict). ``collected``: a :func:`collect` pass already made
    over ``data`` with this model (e.g. the app's cache), so that the backbone does not run
    again. ``progress``: bars on stderr over the model pass and the faithfulness images.
    ``mask`` and ``random_draws``: the faithfulness's mask and the random reference's repeats
    (engine.explain.faithfulness); every reference map is judged beside the methods."""
    from engine.explain import check_mask, check_references

    started = time.perf_counter()
    try:  # before the backbone pass: a typo should not cost minutes
        check_mask(mask)
        check_references(["random"], random_draws)
    except ValueError as exc:
        raise EvaluationError(str(exc)) from None
    chosen = resolve_groups(model, data, groups)
    if faithfulness_images and "faithfulness" not in chosen:
        chosen.append("faithfulness")
    for xi in xi_grid or []:  # before the backbone pass: a typo should not cost minutes
        if not 0.0 <= xi <= 1.0:
            raise EvaluationError(f"xi values must lie in [0, 1]; got {xi}")
    default_xi = model.config.xi
    grid_values = sorted({default_xi, *(xi_grid or [])}) if model.xi_dependent else [default_xi]
    if collected is None:
        collected = collect(model, data, device, progress=progress)
    elif (sizes := {len(v) for v in collected.cache.values()}) != {len(data)}:
        raise EvaluationError(f"the collected pass covers {sorted(sizes)} images; the data set "
                              f"has {len(data)}")
    gt = None
    if "patch" in chosen:
        gt = M.patch_ground_truth(collected.grid.boxes, data.box_data, data.box_offsets,
                                  data.targets, data.multilabel)
    rows, seconds = [], []
    for xi in grid_values:
        start = time.perf_counter()
        rows.append({"xi": xi, **_metrics_at(model, data, outputs_at(model, collected, xi),
                                             chosen, gt)})
        seconds.append(time.perf_counter() - start)
    report = {
        "model": {"backbone": model.config.backbone, "head": model.config.head,
                  "xi": default_xi, "xi_denominator": model.config.xi_denominator,
                  "selection": model.selection, "xi_dependent": model.xi_dependent},
        "data": {"dataset": data.name, "split": data.split, "images": len(data),
                 "classes": data.classes, "multilabel": data.multilabel},
        "groups": chosen,
        "by_xi": rows,
        "timing": {"collect_s": collected.seconds, "metrics_s_per_xi": seconds},
    }
    if not model.xi_dependent:
        report["note"] = (f"ξ does not act on head {model.config.head!r}: one row at the "
                          "config's ξ")
    if "patch" in chosen and pr_curves:
        # Scores over which the curves sweep: the pre-threshold weights (ξ = 0) for
        # Loss-Attention, whose threshold is exactly such a sweep; the weights otherwise.
        scores = outputs_at(model, collected, 0.0).patch_weights
        report["patch_pr"] = M.patch_pr_curves(scores, collected.grid.boxes, data.box_data,
                                               data.box_offsets, data.targets, data.multilabel,
                                               data.classes)
    if data.multilabel and pr_curves:
        logits = outputs_at(model, collected, default_xi).logits
        report["image_pr"] = M.image_pr_curves(logits, data.targets, data.classes)
    if "faithfulness" in chosen:
        from engine.explain import METHODS, REFERENCES, faithfulness

        count = faithfulness_images or 200
        gen = torch.Generator().manual_seed(seed)
        indices = torch.randperm(len(data), generator=gen)[:count].sort().values
        methods = [m for m in METHODS if m != "loss_attention" or model.head.has_patches]
        with progress_bar(len(methods) + len(REFERENCES), f"faithfulness on {len(indices)} "
                          f"images", progress, unit="map") as bar:
            report["faithfulness"] = faithfulness(
                model, data, device, indices, methods, on_method=lambda _: bar.update(1),
                mask=mask, references=list(REFERENCES), draws=random_draws, seed=seed)
    report["timing"]["total_s"] = time.perf_counter() - started
    return report


# ----------------------------------------------------------------------------------------------
# Writing reports


def json_safe(value):
    """JSON-safe: NaN / inf become null."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


SUMMARY_FIELDS = {
    "image": ("accuracy", "top5", "map", "map_11point_paper"),
    "patch": ("precision_paper", "recall_paper", "f_paper", "precision", "recall", "f"),
    "localization": ("gt_known_loc", "top1_loc", "mean_iou"),
    "selection": ("patches_per_image", "max_weight"),
}


def summary_rows(report: dict) -> list[dict]:
    """One flat row per ξ (for CSV files and tables)."""
    rows = []
    for entry in report["by_xi"]:
        row = {"xi": entry["xi"]}
        for group, keys in SUMMARY_FIELDS.items():
            for key in keys:
                if key in entry.get(group, {}):
                    row[key] = entry[group][key]
        rows.append(row)
    return rows


def write_report(report: dict, out_dir: str | Path) -> list[Path]:
    """report.json (everything), metrics.csv (a row per ξ), per_class.csv, faithfulness.csv."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json"]
    paths[0].write_text(json.dumps(json_safe(report), indent=1))
    rows = summary_rows(report)
    paths.append(write_csv(out / "metrics.csv", rows))
    default = next(r for r in report["by_xi"] if r["xi"] == report["model"]["xi"])
    classes = report["data"]["classes"]
    per_class = [{"class": c} for c in classes]
    image = default.get("image", {})
    for key in ("per_class_accuracy", "per_class_ap", "per_class_ap_11point_paper"):
        for row, value in zip(per_class, image.get(key, []), strict=False):
            row[key] = value
    for curve in report.get("patch_pr", {}).get("per_class", []):
        per_class[curve["index"]]["patch_ap"] = curve["ap"]
    paths.append(write_csv(out / "per_class.csv", per_class))
    if "faithfulness" in report:
        paths.append(write_csv(out / "faithfulness.csv", faithfulness_rows(report["faithfulness"])))
    return paths


def faithfulness_rows(faith: dict) -> list[dict]:
    """A row per method, then per reference map (``kind`` says which), each with the mask
    (a report saved before masks were named: ``black``, the only mask there was)."""
    mask = faith.get("mask", "black")
    return ([{"method": m, "kind": "method", "mask": mask, **v}
             for m, v in faith["methods"].items()]
            + [{"method": f"ref: {m}", "kind": "reference", "mask": mask, **v}
               for m, v in faith.get("references", {}).items()])


def write_csv(path: Path, rows: list[dict]) -> Path:
    Path(path).write_text(csv_text(rows))
    return path


def format_summary(report: dict) -> str:
    rows = summary_rows(report)
    if not rows:
        return ""
    fields = list(dict.fromkeys(k for row in rows for k in row))
    lines = ["  ".join(f"{f:>15s}" for f in fields)]
    for row in rows:
        cells = []
        for f in fields:
            v = row.get(f)
            cells.append(f"{v:15.4f}" if isinstance(v, float) and math.isfinite(v) else
                         f"{'-' if v is None or isinstance(v, float) else v!s:>15s}")
        lines.append("  ".join(cells))
    return "\n".join(lines)
