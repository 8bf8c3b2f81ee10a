"""The MIL experiment's settings: which method, the protocol and the training recipe."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from engine.config import check_field, check_types

SELECTIONS = ("error_loss", "error_last", "loss", "last")
"""How a fold's epoch is chosen on its validation split (engine.mil.protocol.SELECT_RULES)."""


@dataclass
class MilConfig:
    """One cross-validation: which method, the protocol, and the training recipe."""

    method: str = "loss_attention"
    """One of ``engine.mil.models.MIL_METHODS``."""
    folds: int = 10
    repeats: int = 5
    seed: int = 0
    epochs: int = 100
    """Most epochs per fold (AAAI Table A4: 100); early stopping may end sooner."""
    patience: int = 30
    """Stop after this many epochs without a better validation (error, loss)."""
    lr: float = 5e-4
    weight_decay: float = 5e-4
    dropout: float = 0.5
    lam: float = 0.1
    """λ of the instance term (AAAI Table A4: 0.1); only Loss-Attention and tip_threshold."""
    xi: float = 0.1
    """ξ of ``tip_threshold`` (θ = ξ/N per bag)."""
    hidden: tuple[int, ...] = (256, 128, 64)
    batch_bags: int = 8
    """Bags per optimiser step (the AAAI code used 1)."""
    val_fraction: float = 0.1
    """Share of the training folds' bags held out for model selection."""
    select: str = "error_last"
    """How the epoch is chosen on the validation split: ``"error_last"`` (lowest error, ties
    going to the later epoch), ``"error_loss"`` (lowest error, ties by the lowest loss: the AAAI
    supplement's words), ``"loss"`` (lowest loss) or ``"last"`` (no selection). With about 9
    validation bags the loss favours early epochs; on MUSK1 and FOX ``error_loss`` lost 2 and
    0.5 points against ``error_last`` (results/mil/results.md)."""
    parallel_folds: int = 0
    """Folds trained side by side as one batched network (0: all folds of all repeats)."""

    def __post_init__(self) -> None:
        check_types(self)  # the types; the ranges below
        from engine.mil.models import MIL_METHODS  # here: the models load torch

        check_field(self.method in MIL_METHODS, "method", f"one of {list(MIL_METHODS)}",
                    self.method)
        for name, low in (("folds", 2), ("repeats", 1), ("epochs", 1), ("patience", 1),
                          ("batch_bags", 1), ("parallel_folds", 0), ("seed", 0)):
            value = getattr(self, name)
            check_field(value >= low, name, f"an int >= {low}", value)
        check_field(self.lr > 0, "lr", "a positive number", self.lr)
        for name in ("weight_decay", "lam"):
            check_field(getattr(self, name) >= 0, name, "a number >= 0", getattr(self, name))
        check_field(0 <= self.dropout < 1, "dropout", "in [0, 1)", self.dropout)
        check_field(0 <= self.xi <= 1, "xi", "in [0, 1]", self.xi)
        check_field(0 < self.val_fraction < 0.5, "val_fraction", "in (0, 0.5)",
                    self.val_fraction)
        check_field(self.select in SELECTIONS, "select", f"one of {list(SELECTIONS)}",
                    self.select)
        check_field(len(self.hidden) >= 1 and all(h >= 1 for h in self.hidden), "hidden",
                    "one or more positive layer widths", self.hidden)

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["hidden"] = list(self.hidden)
        return d
