"""Named presets: one table of the settings that reproduce a source, each with its reason.

A run may name a preset (``RunConfig.preset``, ``--preset NAME``, the Train page). The preset
fills only the fields the user did not give, so the precedence is: the recipe defaults < the
preset < the config file, the flags and ``--set``. ``--preset released-code --set model.xi=0.5``
therefore trains at ξ = 0.5 with every other released-code setting. The name is recorded in the
run's config.json, beside the fields it filled. A resolved config.json gives every field, so
applying its preset to it again changes nothing: resume and reuse are unaffected.

Some settings depend on the run: the released code's threshold denominator on the head (its
spec's ``released_xi_denominator``), its learning rate on the data set, and the SGD settings
apply only to a run trained with the SGD recipe. A rule therefore reads a
:class:`PresetContext`, which ``engine.preset_fill.fill_preset`` builds from the not-yet-validated
config and the head registry. This module imports nothing else of the engine, so that the
config (which validates ``RunConfig.preset`` against :func:`preset_names`) and
``python -m engine --help`` stay light.

Sources: ``../shared/docs/METHOD.md``, its decisions table, §5 (training recipe) and §8 (D1
threshold denominator, D4 stem).
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from engine.errors import ConfigError


@dataclass(frozen=True)
class Setting:
    """One field a preset sets, and why."""

    value: Any
    reason: str


@dataclass(frozen=True)
class PresetContext:
    """What a rule may depend on: facts of the run, resolved as training will resolve them."""

    head: str
    dataset: str
    recipe: str
    """The training recipe the run will use (``train.recipe``, or the head's own for auto)."""
    released_xi_denominator: str | None
    """The head spec's threshold denominator in the released code (None: no released code)."""


CONTEXT_FIELDS = ("model.head", "data.dataset", "train.recipe")
"""The fields a context is made from: a sweep over one of them needs its preset per cell."""

Rule = Callable[[PresetContext], dict[str, Setting]]
"""context -> {"section.field": Setting}."""


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    rule: Rule


def _schedule() -> dict[str, Setting]:
    """What the paper's text and the released scripts agree on (METHOD.md §3, §5, §9)."""
    return {
        "model.xi": Setting(0.1, "ξ = 0.1, the paper's default threshold numerator"),
        "loss.gamma_max": Setting(0.1, "γmax = 0.1, the paper's default and every script's"),
        "loss.ramp_epochs": Setting(80, "Gaussian ramp-up over 80 epochs, as the paper and "
                                        "the scripts (fixed, not scaled with the run's length)"),
        "train.epochs": Setting(200, "200 epochs (paper, scripts)"),
        "train.batch_size": Setting(128, "batch 128 (paper, scripts)"),
    }


def _sgd(context: PresetContext, lr: float, lr_reason: str) -> dict[str, Setting]:
    """The Loss-Attention SGD recipe (METHOD.md §5). A head that trains with Adam (Mean-pooling,
    Dynamic Routing: the paper's own recipe for them) keeps its recipe's settings."""
    if context.recipe != "sgd":
        return {}
    return {
        "train.lr": Setting(lr, lr_reason),
        "train.momentum": Setting(0.9, "SGD momentum 0.9 (scripts)"),
        "train.weight_decay": Setting(5e-4, "weight decay 5e-4 on all parameters (scripts)"),
        "train.milestones": Setting([0.5, 0.75], "lr x0.1 at epochs 100 and 150 of 200"),
    }


def _paper(context: PresetContext) -> dict[str, Setting]:
    return {
        **_schedule(),
        "model.xi_denominator": Setting("patches", "θ = ξ/M, the paper's reading of Eq. 5 "
                                                   "(METHOD.md D1)"),
        "model.stem_norm": Setting(True, "BN + ReLU after the ResNet stem, the standard "
                                         "network the paper describes (METHOD.md D4)"),
        **_sgd(context, 0.1, "lr 0.1 (paper)"),
    }


def _released_code(context: PresetContext) -> dict[str, Setting]:
    settings = {
        **_schedule(),
        "model.stem_norm": Setting(False, "the released ResNet18 defines bn1 but never applies "
                                          "it: no BN/ReLU after the stem (METHOD.md D4)"),
        **_sgd(context, *((0.05, "lr 0.05, the released COCO script") if context.dataset == "coco"
                          else (0.1, "lr 0.1, the released CIFAR scripts"))),
    }
    settings["train.amp"] = Setting(False, "fp32, as the released scripts train: bf16 autocast "
                                           "moved the conv head's logits by 2e-2 relative on "
                                           "constructed weights and flipped the patch selection "
                                           "in 1 of 4 images")
    if "train.milestones" in settings:
        settings["train.milestones"] = Setting(
            [0.5, 0.75], "lr x0.1 at epochs 100 and 150 of 200, as the scripts' MultiStepLR "
                         "names them. Not reproduced: the conv CIFAR-10 scripts "
                         "(cifar10_main_resnet18/50.py) step the scheduler at the start of each "
                         "epoch, which in their torch 1.1 drops the lr one epoch early (epochs "
                         "99 and 149); the other scripts step it at the end (METHOD.md §5)")
    if context.released_xi_denominator is not None:
        settings["model.xi_denominator"] = Setting(
            context.released_xi_denominator,
            f"the released code's θ for the {context.head} head: conv heads ξ/(H·W) of the map "
            "before the patch conv, capsule heads ξ/M (METHOD.md D1)")
    return settings


def _live(context: PresetContext) -> dict[str, Setting]:
    """A short schedule for training during a lesson on a CPU (issue 17; measured by
    ``tests/bench_perf.py``). Every choice was measured on the embedded digits, small_cnn."""
    settings = {
        "model.backbone": Setting("small_cnn", "the small CNN: 98 % in 2 epochs at about 900 "
                                              "images/s on a 2-core CPU, where the paper's "
                                              "ResNet18 trains at 1.6 images/s (8 hours)"),
        "model.xi": Setting(0.1, "ξ = 0.1, the paper's default"),
        "loss.gamma_max": Setting(0.3, "γmax = 0.3, not the paper's 0.1: in 2 epochs the patch "
                                       "loss has less time to act (0.5 lowered the patch F)"),
        "train.epochs": Setting(2, "2 epochs: 98.0 % test accuracy on the digits, where the "
                                   "paper's 200 would take over an hour on a CPU"),
        "train.batch_size": Setting(32, "batch 32: the CPU's images/s is flat from 32 to 128, "
                                        "so small batches buy 4x the updates for the same time"),
        "data.train_size": Setting(12000, "12,000 digit canvases: the patch F 0.757 against the "
                                          "30-epoch shipped model's 0.777 (9,000: 0.727; 3 "
                                          "epochs of 9,000: 0.733), about 24 s in all"),
        "data.augment": Setting(False, "no random crops: in a 2-epoch run they cost 0.6 "
                                       "points of accuracy and 10 % of the time"),
        "loss.ramp_epochs": Setting(0, "no ramp-up: the patch loss acts from the first step "
                                       "(a ramp over epoch 1 lowered the patch F by 0.04)"),
        "loss.ramp_by": Setting("step", "a ramp-up given with --ramp-epochs moves every step: "
                                        "by epoch, epoch 0 would have no patch loss at all"),
        "train.eval_sample": Setting(500, "epoch 1 is evaluated on 500 test images, the last "
                                          "on all of them"),
    }
    if context.recipe == "sgd":
        settings["train.recipe"] = Setting("onecycle", "Nesterov SGD with a one-cycle lr "
                                                       "(peak 0.2), moved every step")
    return settings


PRESETS: dict[str, Preset] = {p.name: p for p in (
    Preset("paper", "the paper's text: θ = ξ/M, BN+ReLU stem, SGD lr 0.1, 200 epochs",
           _paper),
    Preset("released-code", "the authors' released TIP code: conv θ = ξ/(H·W), no stem "
                            "BN/ReLU, COCO lr 0.05", _released_code),
    Preset("live", "the small CNN on a 2-epoch one-cycle schedule for the embedded digits, "
                   "trainable live on a CPU (the digits' default)", _live),
)}


def preset_names() -> list[str]:
    return list(PRESETS)


def check_preset_name(name: object) -> None:
    """Raise ConfigError naming ``preset`` and the allowed names, unless ``name`` is one."""
    if name is not None and (not isinstance(name, str) or name not in PRESETS):
        raise ConfigError(f"preset must be one of {preset_names()} or null; got {name!r}")


def preset_settings(name: str, context: PresetContext) -> dict[str, Setting]:
    """The fields preset ``name`` sets for a run described by ``context``."""
    check_preset_name(name)
    return PRESETS[name].rule(context)


def fill_absent(section_data: dict, settings: dict[str, Setting], section: str) -> dict:
    """A copy of one config section with the ``section.*`` settings it does not give filled in
    (what the user gave wins)."""
    filled = copy.deepcopy(section_data)
    for path, setting in settings.items():
        name, _, key = path.partition(".")
        if name == section and key not in filled:
            filled[key] = copy.deepcopy(setting.value)
    return filled


def describe_presets() -> list[str]:
    """One line per preset (``python -m engine models``, ``--preset`` help)."""
    return [f"{name}: {preset.description}" for name, preset in PRESETS.items()]


__all__ = [
    "CONTEXT_FIELDS", "PRESETS", "Preset", "PresetContext", "Setting", "check_preset_name",
    "describe_presets", "fill_absent", "preset_names", "preset_settings",
]
