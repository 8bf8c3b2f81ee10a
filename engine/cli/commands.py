"""The commands' names, one-line help and command group, in the order ``--help`` lists them.

This table is all that ``python -m engine --help`` reads: it imports nothing, so that the
top-level help costs about what Python's own start does. A command's full parser (its flags,
description and examples) is built from its group module only when it is the one invoked
(:func:`engine.cli.build_parser`). ``tests/test_cli_help.py`` checks that every group registers
exactly the commands this table gives it.
"""

from __future__ import annotations

COMMANDS: dict[str, tuple[str, str]] = {
    # name: (group module in engine.cli, one-line help)
    "train": ("runs", "create a run and train it (start here: train --name NAME)"),
    "models": ("info", "list the backbones, heads and presets"),
    "data": ("info", "list the data sets, or check that one loads"),
    "runs": ("runs", "list, show, stop or delete runs"),
    "resume": ("runs", "continue a stopped or killed run"),
    "export": ("runs", "write a run's best model as a small checkpoint with a model card"),
    "evaluate": ("evaluate", "every metric of a model (run or checkpoint): JSON + CSV report"),
    "explain": ("explain", "a model's explanation of image files: overlay PNG, CSV, JSON"),
    "sweep": ("sweep", "train a grid of runs (γmax x ξ by default) and tabulate it"),
    "gamma-family": ("sweep", "regenerate the shipped γmax family of digits models"),
    "transfer": ("transfer", "mutual transfer of local attention maps vs the peers alone"),
    "mil": ("mil", "multiple-instance learning: repeated k-fold CV and its table"),
    "bench": ("bench", "forward+backward images/s and peak memory per model"),
    "bench-train": ("bench", "loader-only, model-only and full training step images/s"),
    "bench-eval": ("bench", "seconds for patch metrics over N images at a ξ grid"),
    "gpu-check": ("bench", "the CUDA paths verified on one GPU, in one table"),
    "job": ("job", "run a background job from its folder's spec.json (what the app starts)"),
}


def summary(name: str) -> str:
    """The command's one-line help (what the top-level ``--help`` lists)."""
    return COMMANDS[name][1]


def groups_of(names) -> list[str]:
    """The group modules holding ``names`` (unknown names hold none), in table order."""
    wanted = {COMMANDS[n][0] for n in names if n in COMMANDS}
    return [g for g in dict.fromkeys(group for group, _ in COMMANDS.values()) if g in wanted]


def all_groups() -> list[str]:
    return groups_of(COMMANDS)
