"""The AAAI 2020 Loss-Attention paper's MIL table (accuracy, mean ± std over 5 x 10-fold CV).

The Attention and Gated-Attention rows are Ilse et al.'s (ICML 2018) numbers, copied into the AAAI
table, not re-run by its authors; their stds are the AAAI table's.
"""

from __future__ import annotations

PAPER_ACCURACY: dict[str, dict[str, tuple[float, float | None]]] = {
    "loss_attention": {"musk1": (0.917, 0.066), "musk2": (0.911, 0.063), "fox": (0.712, 0.074),
                       "tiger": (0.897, 0.065), "elephant": (0.900, 0.069)},
    "attention": {"musk1": (0.892, 0.090), "musk2": (0.858, 0.106), "fox": (0.615, 0.096),
                  "tiger": (0.839, 0.054), "elephant": (0.868, 0.054)},
    "gated_attention": {"musk1": (0.900, 0.088), "musk2": (0.863, 0.094), "fox": (0.603, 0.068),
                        "tiger": (0.845, 0.046), "elephant": (0.857, 0.064)},
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
