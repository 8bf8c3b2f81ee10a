"""The AAAI 2020 Loss-Attention paper's MIL table (accuracy, mean ± std over 5 x 10-fold CV).

The paper gives a std for every Loss-Attention entry; for the baselines this project only has the
means (issue #6), so their std is ``None``.
"""

from __future__ import annotations

PAPER_ACCURACY: dict[str, dict[str, tuple[float, float | None]]] = {
    "loss_attention": {"musk1": (0.917, 0.066), "musk2": (0.911, 0.063), "fox": (0.712, 0.074),
                       "tiger": (0.897, 0.065), "elephant": (0.900, 0.069)},
    "attention": {"musk1": (0.892, None), "musk2": (0.858, None), "fox": (0.615, None),
                  "tiger": (0.839, None), "elephant": (0.868, None)},
    "gated_attention": {"musk1": (0.900, None), "musk2": (0.863, None), "fox": (0.603, None),
                        "tiger": (0.845, None), "elephant": (0.857, None)},
}


def paper_accuracy(dataset: str, method: str) -> tuple[float, float | None] | None:
    """(mean, std) the paper reports for this data set and method, or ``None``."""
    return PAPER_ACCURACY.get(method, {}).get(dataset)


def format_paper(dataset: str, method: str) -> str:
    value = paper_accuracy(dataset, method)
    if value is None:
        return "-"
    mean, std = value
    return f"{mean:.3f}" if std is None else f"{mean:.3f} ± {std:.3f}"
