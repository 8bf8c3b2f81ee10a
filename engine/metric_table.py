"""Every metric the project reports, named once: its key, its label and which way is better.

Tables, model cards, CSV columns, curves and heat maps take their keys and labels from here, so a
new metric is one line here (and its computation in ``engine.metrics`` / ``engine.explain``).
This module imports nothing heavy: pages that only lay out tables can use it.

Groups:
- ``epoch``: a training run's per-epoch line (``metrics.jsonl``);
- ``summary``: an evaluation's row per ξ (``metrics.csv``, the sweep table);
- ``faithfulness``: one row per explanation method.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Metric:
    key: str
    label: str
    better: str = ""
    """``"higher"``, ``"lower"``, or ``""`` (a count, a rate, a setting)."""
    group: str = "epoch"
    short: str = ""
    """A narrow label for tables with many columns (default: the label)."""

    @property
    def heading(self) -> str:
        """The label with its direction, for tables a reader compares across."""
        return f"{self.label} ({self.better} better)" if self.better else self.label

    @property
    def short_heading(self) -> str:
        """The short label with its direction as an arrow (↑ higher, ↓ lower better)."""
        arrow = {"higher": " ↑", "lower": " ↓"}.get(self.better, "")
        return f"{self.short or self.label}{arrow}"


_METRICS = [
    # A training run's epoch line
    Metric("test_acc", "test accuracy", "higher"),
    Metric("test_top5", "test top-5 accuracy", "higher"),
    Metric("test_map", "test mAP", "higher"),
    Metric("test_loss", "test loss", "lower"),
    Metric("train_loss", "training loss", "lower"),
    Metric("train_acc", "training accuracy", "higher"),
    Metric("patches_selected", "patches selected per image"),
    Metric("max_weight", "largest patch weight"),
    Metric("epoch_s", "seconds per epoch", "lower"),
    Metric("images_per_s", "training images/s", "higher"),
    Metric("lr", "learning rate"),
    # An evaluation's row per ξ
    Metric("accuracy", "image accuracy", "higher", "summary"),
    Metric("map", "image mAP", "higher", "summary"),
    Metric("precision_paper", "patch precision (paper)", "higher", "summary"),
    Metric("recall_paper", "patch recall (paper)", "higher", "summary"),
    Metric("f_paper", "patch F (paper)", "higher", "summary"),
    Metric("precision", "patch precision (location)", "higher", "summary"),
    Metric("recall", "patch recall (location)", "higher", "summary"),
    Metric("f", "patch F (location)", "higher", "summary"),
    Metric("gt_known_loc", "GT-known localization", "higher", "summary"),
    Metric("patches_per_image", "patches selected per image", "", "summary"),
    # Explanation methods compared
    Metric("average_drop_pct", "Average Drop %", "lower", "faithfulness", "Avg Drop %"),
    Metric("increase_in_confidence_pct", "Increase in Confidence %", "higher", "faithfulness",
           "Incr. Conf. %"),
    Metric("deletion_auc", "deletion AUC", "lower", "faithfulness", "deletion"),
    Metric("insertion_auc", "insertion AUC", "higher", "faithfulness", "insertion"),
    Metric("pointing_game", "pointing game", "higher", "faithfulness", "pointing"),
    Metric("energy_pointing_game", "energy pointing game", "higher", "faithfulness", "energy"),
]
METRICS: dict[str, Metric] = {m.key: m for m in _METRICS}


def metrics_of(group: str) -> list[Metric]:
    return [m for m in _METRICS if m.group == group]


def label(key: str) -> str:
    """A metric's label; an unknown key is shown as it is."""
    return METRICS[key].label if key in METRICS else key


def main_metric(multilabel: bool) -> str:
    """The metric that picks a run's best checkpoint: mAP for multi-label data, else accuracy."""
    return "test_map" if multilabel else "test_acc"


MASKS = {"black": "unexplained pixels black (the image times the map, in [0, 1] pixels)",
         "mean": "unexplained pixels the data set's mean colour (its normalisation mean)",
         "blur": "unexplained pixels from a blurred copy of the image (σ = side / 8)"}
"""What replaces the pixels a map leaves out (Average Drop, Increase in Confidence, deletion;
engine.explain.mask_fill). Here, without torch, so that the command line can offer them."""
DEFAULT_MASK = "black"
RANDOM_DRAWS = 8
"""Seeded draws of the random reference map, averaged (engine.explain.reference_maps)."""
