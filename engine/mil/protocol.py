"""The MIL benchmark protocol: repeated stratified k-fold cross-validation (5 x 10 in the paper).

For every test fold, the training folds alone decide everything the model sees:

- a stratified validation split is taken from the training folds (never the test fold);
- the standardisation (per-feature mean and std over instances) is fitted on the remaining
  training bags only;
- the epoch kept is the one with the lowest validation error (ties: the later epoch; the AAAI
  supplement's "lowest validation error and loss" is ``select="error_loss"``), with early
  stopping on it; or, with ``epoch_choice="inner_cv"``, the number of epochs is chosen by an
  inner cross-validation on the training folds and the model retrained on all of them.

The test fold is seen once, by the kept model. With ``report_test_max`` it is also evaluated
after every epoch, and the best of those accuracies is reported *beside* the honest one: the
released AAAI code's rule (``np.amax`` over per-epoch test accuracies, METHOD.md §7), which
selects the epoch on the test fold and so is optimistic. That record is write-only: nothing in
training or selection reads it (tests/test_mil.py proves it).

Everything is seeded: the folds by ``seed``, every fold's initialisation, dropout and batch order
by ``(seed, repeat, fold)``. Results go to a folder as ``results.json``, ``results.csv`` and
``results.md`` (the paper's numbers beside), per-bag instance weights of the first repetition as
``weights_<dataset>_<method>.json``; the folder's ``status.json`` (engine.jobs) is what a page
polls.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from engine.mil.config import MilConfig
from engine.mil.data import MilDataset
from engine.mil.models import MilNet, mil_loss
from engine.mil.paper import paper_accuracy

# ----------------------------------------------------------------------------------------------
# Splits and standardisation


def cv_splits(labels: np.ndarray, folds: int, repeats: int, seed: int
              ) -> list[tuple[int, int, np.ndarray, np.ndarray]]:
    """(repeat, fold, train bags, test bags) of repeated stratified k-fold CV."""
    from sklearn.model_selection import RepeatedStratifiedKFold

    counts = np.bincount(labels, minlength=2)
    if counts.min() < folds:
        raise ValueError(f"{folds}-fold stratified CV needs at least {folds} bags of each class; "
                         f"this data set has {counts.tolist()} (negative, positive)")
    splitter = RepeatedStratifiedKFold(n_splits=folds, n_repeats=repeats, random_state=seed)
    return [(i // folds, i % folds, train, test) for i, (train, test)
            in enumerate(splitter.split(np.zeros(len(labels)), labels))]


def validation_split(train: np.ndarray, labels: np.ndarray, fraction: float, seed: int
                     ) -> tuple[np.ndarray, np.ndarray]:
    """A stratified (fit, validation) split of the training bags ``train``."""
    from sklearn.model_selection import train_test_split

    n_val = max(2, round(fraction * len(train)))
    fit, val = train_test_split(train, test_size=n_val, stratify=labels[train],
                                random_state=seed)
    return np.sort(fit), np.sort(val)


@dataclass
class Standardiser:
    """Per-feature z-score with statistics from one set of instances."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: np.ndarray) -> Standardiser:
        mean = features.mean(0, dtype=np.float64)
        std = features.std(0, dtype=np.float64)
        # A constant feature carries no information; dividing by 1 keeps it at 0, not NaN.
        std = np.where(std > 1e-8, std, 1.0)
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.std


@dataclass
class FoldPlan:
    """What one fold trains and tests on; every bag set is a sorted array of bag numbers."""

    repeat: int
    fold: int
    fit: np.ndarray
    """Training-fold bags the model learns from (and the standardisation is fitted on)."""
    val: np.ndarray
    """Training-fold bags held out to choose the epoch."""
    test: np.ndarray
    seed: int


def fold_plans(data: MilDataset, config: MilConfig) -> list[FoldPlan]:
    """The outer folds. Under ``epoch_choice="inner_cv"`` a fold learns from all its training
    bags and has no validation split (its inner CV, :func:`inner_plans`, chooses the epochs)."""
    plans = []
    for repeat, fold, train, test in cv_splits(data.labels, config.folds, config.repeats,
                                               config.seed):
        seed = config.seed * 1_000_003 + repeat * 1000 + fold
        if config.epoch_choice == "inner_cv":
            fit, val = np.sort(train), train[:0]
        else:
            fit, val = validation_split(train, data.labels, config.val_fraction, seed)
        plans.append(FoldPlan(repeat, fold, fit, val, np.sort(test), seed))
    return plans


def inner_plans(data: MilDataset, plan: FoldPlan, config: MilConfig) -> list[FoldPlan]:
    """A stratified ``inner_folds``-fold CV of one fold's training bags: each inner plan learns
    from the other inner folds and is scored on its own (``val``); it has no test bags."""
    from sklearn.model_selection import StratifiedKFold

    labels = data.labels[plan.fit]
    counts = np.bincount(labels, minlength=2)
    if counts.min() < config.inner_folds:
        raise ValueError(f"inner_folds={config.inner_folds} needs at least that many training "
                         f"bags of each class in every fold; a fold has {counts.tolist()}")
    splitter = StratifiedKFold(config.inner_folds, shuffle=True,
                               random_state=plan.seed % 2**32)
    return [FoldPlan(plan.repeat, plan.fold, np.sort(plan.fit[a]), np.sort(plan.fit[b]),
                     plan.test[:0], plan.seed + 100_000 * (j + 1))
            for j, (a, b) in enumerate(splitter.split(np.zeros(len(labels)), labels))]


def _member_inputs(data: MilDataset, bag_sets: list[np.ndarray], scalers: list[Standardiser]):
    """Each member's own bags, standardised with its own scaler, padded to one tensor:
    x (F, N, D), bag (F, N), labels (F, B + 1), mask (F, B + 1). Padding rows are zeros and belong
    to an extra bag B (masked out)."""
    members, n_max = len(bag_sets), max(int(data.bag_sizes[b].sum()) for b in bag_sets)
    b_max = max(len(b) for b in bag_sets)
    x = torch.zeros(members, n_max, data.n_features)
    bag = torch.full((members, n_max), b_max, dtype=torch.long)
    labels = torch.zeros(members, b_max + 1, dtype=torch.long)
    mask = torch.zeros(members, b_max + 1, dtype=torch.bool)
    for f, (bags, scaler) in enumerate(zip(bag_sets, scalers, strict=True)):
        rows = data.rows(bags)
        x[f, :len(rows)] = torch.from_numpy(scaler(data.features[rows]))
        bag[f, :len(rows)] = torch.from_numpy(np.repeat(np.arange(len(bags)),
                                                        data.bag_sizes[bags]))
        labels[f, :len(bags)] = torch.from_numpy(data.labels[bags])
        mask[f, :len(bags)] = True
    return x, bag, labels, mask


def _evaluate(model: MilNet, inputs, config: MilConfig):
    """(output, error per member, loss per member) on padded member inputs, in eval mode."""
    x, bag, labels, mask = inputs
    model.eval()
    with torch.no_grad():
        out = model(x, bag, labels.shape[1])
        losses = mil_loss(out, labels, bag, config.lam, model.regularised, mask, per_member=True,
                          instance_loss=config.instance_loss)
        wrong = (out.logits.argmax(2) != labels) & mask
        errors = wrong.sum(1) / mask.sum(1)
    return out, errors, losses


def seeded_members(in_features: int, config: MilConfig, seeds: list[int]) -> MilNet:
    """A MilNet of len(seeds) members, member f initialised exactly as a one-member network
    made after ``torch.manual_seed(seeds[f])``."""
    model = MilNet(in_features, config.method, config.hidden, config.dropout, xi=config.xi,
                   members=len(seeds))
    with torch.no_grad():
        for f, seed in enumerate(seeds):
            torch.manual_seed(seed)
            single = MilNet(in_features, config.method, config.hidden, config.dropout,
                            xi=config.xi)
            for name, value in single.state_dict().items():
                model.state_dict()[name][f].copy_(value[0])
    return model


SELECT_RULES: dict[str, Callable[..., torch.Tensor]] = {
    # Which members' new epoch beats their best so far, from (errors, losses, best errors, best
    # losses) on the validation split; one rule per MilConfig.select value.
    "error_loss": lambda e, l, be, bl: (e < be) | ((e == be) & (l < bl)),
    "error_last": lambda e, l, be, bl: e <= be,
    "loss": lambda e, l, be, bl: l < bl,
    "last": lambda e, l, be, bl: torch.ones_like(e, dtype=torch.bool),
}


class _Choice:
    """Each member's chosen epoch and its parameters, up to the member's own early stop.

    A member whose own patience has run out keeps its choice for good, although the group goes on
    while other members improve: otherwise how long it trains would depend on the other members'
    validation curves, and their fit bags include this member's test bags."""

    def __init__(self, model: MilNet, config: MilConfig) -> None:
        members = model.members
        self.rule, self.patience = SELECT_RULES[config.select], config.patience
        self.err = torch.full((members,), math.inf)
        self.loss = torch.full((members,), math.inf)
        self.epoch = torch.zeros(members, dtype=torch.long)
        self.stopped = torch.zeros(members, dtype=torch.bool)
        self.stop_epoch = torch.zeros(members, dtype=torch.long)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: MilNet, epoch: int, errors: torch.Tensor,
               losses: torch.Tensor) -> bool:
        """Record the epoch for the members it is better for; returns whether all stopped."""
        better = self.rule(errors, losses, self.err, self.loss) & ~self.stopped
        if better.any():
            self.err = torch.where(better, errors, self.err)
            self.loss = torch.where(better, losses, self.loss)
            self.epoch = torch.where(better, torch.full_like(self.epoch, epoch), self.epoch)
            _keep_where(self.state, model, better)
        newly = ~self.stopped & ((epoch - self.epoch) >= self.patience)
        self.stop_epoch = torch.where(newly, torch.full_like(self.epoch, epoch), self.stop_epoch)
        self.stopped |= newly
        return bool(self.stopped.all())

    def final_epochs(self, epochs_run: int) -> list[int]:
        """Per member, the last epoch its choice could still take: its own stop, or the end."""
        return torch.where(self.stopped, self.stop_epoch, epochs_run).tolist()


class _FixedChoice:
    """Each member keeps its parameters after its own given number of epochs (the inner CV's
    choice); no validation split is read."""

    def __init__(self, model: MilNet, epochs: list[int]) -> None:
        self.epoch = torch.tensor(epochs, dtype=torch.long)
        self.stopped = torch.zeros(len(epochs), dtype=torch.bool)
        self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def update(self, model: MilNet, epoch: int, errors, losses) -> bool:
        reached = self.epoch == epoch
        if reached.any():
            _keep_where(self.state, model, reached)
        self.stopped |= reached
        return bool(self.stopped.all())

    def final_epochs(self, epochs_run: int) -> list[int]:
        return self.epoch.tolist()


def _keep_where(state: dict[str, torch.Tensor], model: MilNet, members: torch.Tensor) -> None:
    """Copy the model's current parameters into ``state`` for the chosen members."""
    for name, value in model.state_dict().items():
        keep = members.view(-1, *([1] * (value.dim() - 1)))
        state[name] = torch.where(keep, value.detach(), state[name])


class _MemberBatches:
    """Chunks of bags for all members at once, each member seeing only its own fit bags.

    Every member standardises the rows with its own scaler (one fused pass: x * scale + shift);
    the rows of its validation and test bags become zeros before its first layer, and their bags
    are masked out of its loss, so they contribute exactly nothing."""

    def __init__(self, data: MilDataset, plans: list[FoldPlan],
                 scalers: list[Standardiser]) -> None:
        self.data = data
        self.scale = torch.from_numpy(1.0 / np.stack([s.std for s in scalers])).unsqueeze(1)
        self.shift = torch.from_numpy(np.stack([-s.mean / s.std for s in scalers])).unsqueeze(1)
        self.fit_mask = torch.zeros(len(plans), data.n_bags, dtype=torch.bool)
        for f, p in enumerate(plans):
            self.fit_mask[f, torch.from_numpy(p.fit)] = True
        self.features = torch.from_numpy(data.features)
        self.labels = torch.from_numpy(data.labels)

    def __call__(self, bags: np.ndarray):
        """(x (F, N, D), bag of each row, bag mask (F, B), bag labels), or None if no member
        learns from any of ``bags``."""
        data = self.data
        rows = torch.from_numpy(data.rows(bags))
        local = torch.from_numpy(np.repeat(np.arange(len(bags)), data.bag_sizes[bags]))
        bag_mask = self.fit_mask[:, torch.from_numpy(bags)]
        if not bag_mask.any():
            return None
        # where, not a product: nothing of a masked row, not even a NaN, reaches that member.
        x = torch.where(bag_mask[:, local].unsqueeze(2),
                        torch.addcmul(self.shift, self.features[rows], self.scale), 0.0)
        return x, local, bag_mask, self.labels[rows.new_tensor(bags)]


def _train_epoch(model: MilNet, opt: torch.optim.Optimizer, batches: _MemberBatches,
                 order: np.ndarray, chunk: int, config: MilConfig) -> None:
    model.train()
    for start in range(0, len(order), chunk):
        batch = batches(order[start:start + chunk])
        if batch is None:
            continue
        x, local, bag_mask, labels = batch
        out = model(x, local, bag_mask.shape[1])
        loss = mil_loss(out, labels, local, config.lam, model.regularised, bag_mask,
                        instance_loss=config.instance_loss)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_members(data: MilDataset, plans: list[FoldPlan], config: MilConfig,
                  on_epoch: Callable[[int], None] | None = None, *,
                  fixed_epochs: list[int] | None = None, watch_test: bool = False):
    """Train one network per plan, side by side (one batched forward per step); each keeps
    the parameters of its chosen epoch (:class:`_Choice`, or after its ``fixed_epochs`` with
    :class:`_FixedChoice`) and learns from its own fit bags only (:class:`_MemberBatches`).

    ``watch_test`` also scores every member on its test bags after each epoch, into
    ``info["test_errors"]``, which nothing here reads. Returns (model with the kept
    parameters, scalers, info: best_epoch, epochs_run, final_epochs, val_errors and
    test_errors as (epochs, members) tensors, fit_mask)."""
    scalers = [Standardiser.fit(data.features[data.rows(p.fit)]) for p in plans]
    batches = _MemberBatches(data, plans, scalers)
    val_inputs = (None if fixed_epochs is not None
                  else _member_inputs(data, [p.val for p in plans], scalers))
    test_inputs = _member_inputs(data, [p.test for p in plans], scalers) if watch_test else None
    model = seeded_members(data.n_features, config, [p.seed for p in plans])
    torch.manual_seed(plans[0].seed)  # dropout masks
    rng = np.random.default_rng(plans[0].seed)  # chunk order
    # The fused kernel updates the 50 members' parameters in one pass (4x faster on CPU).
    opt = torch.optim.Adam(model.parameters(), lr=config.lr, weight_decay=config.weight_decay,
                           fused=True)
    choice = _Choice(model, config) if fixed_epochs is None else _FixedChoice(model, fixed_epochs)
    # A chunk of all bags holds about batch_bags of each member's fit bags.
    chunk = max(1, round(config.batch_bags * data.n_bags / np.mean([len(p.fit) for p in plans])))
    curves: dict[str, list[torch.Tensor]] = {"val_errors": [], "test_errors": []}
    epoch = 0
    for epoch in range(1, (config.epochs if fixed_epochs is None else max(fixed_epochs)) + 1):
        _train_epoch(model, opt, batches, rng.permutation(data.n_bags), chunk, config)
        errors = losses = None
        if val_inputs is not None:
            _, errors, losses = _evaluate(model, val_inputs, config)
            curves["val_errors"].append(errors)
        if test_inputs is not None:
            curves["test_errors"].append(_evaluate(model, test_inputs, config)[1])
        done = choice.update(model, epoch, errors, losses)
        if on_epoch is not None:
            on_epoch(epoch)
        if done:
            break
    model.load_state_dict(choice.state)
    model.eval()
    info = {name: torch.stack(c) if c else None for name, c in curves.items()}
    return model, scalers, {"best_epoch": choice.epoch.tolist(), "epochs_run": epoch,
                            "final_epochs": choice.final_epochs(epoch),
                            "fit_mask": batches.fit_mask, **info}


def inner_cv_epochs(data: MilDataset, plans: list[FoldPlan], config: MilConfig,
                    on_epoch: Callable[[int], None] | None = None) -> list[int]:
    """Per plan, the number of epochs its inner CV chooses: all inner folds of all plans train
    side by side for ``config.epochs`` epochs with no early stop; a plan's curve is the error
    pooled over its inner validation folds, and the epoch of its minimum (ties: the later
    epoch, as ``select="error_last"``) is the choice."""
    inner = [inner_plans(data, p, config) for p in plans]
    flat = [q for group in inner for q in group]
    # "last" takes every epoch, so no inner model stops early: every curve has all epochs.
    _, _, info = train_members(data, flat, dataclasses.replace(config, select="last"), on_epoch)
    return pooled_epoch_choice(info["val_errors"], [len(q.val) for q in flat],
                               [len(group) for group in inner])


def pooled_epoch_choice(val_errors: torch.Tensor, val_sizes: list[int],
                        group_sizes: list[int]) -> list[int]:
    """From (epochs, members) validation error rates, members in consecutive groups: per group,
    the 1-based epoch of the lowest error pooled over its members (wrong bags / bags), the later
    epoch on a tie."""
    sizes = torch.tensor(val_sizes, dtype=torch.float64)
    wrong = val_errors.double() * sizes
    chosen, start = [], 0
    for n in group_sizes:
        curve = wrong[:, start:start + n].sum(1) / sizes[start:start + n].sum()
        chosen.append(len(curve) - int(torch.argmin(curve.flip(0))))
        start += n
    return chosen


@dataclass
class FoldResult:
    repeat: int
    fold: int
    accuracy: float
    best_epoch: int
    epochs_run: int
    test_bags: np.ndarray
    probabilities: np.ndarray
    """(test bags,) predicted probability of the positive class."""
    weights: np.ndarray
    """(test instances,) α of the test bags' instances, in bag order."""
    trained_bags: np.ndarray
    """Bags whose rows reached the model's training and the scaler (for the leakage test)."""
    selection_bags: np.ndarray
    """Bags that chose the epoch (the validation split; all training bags under inner CV)."""
    test_max: float | None = None
    """The best test accuracy over the epochs this fold's choice could take (the released
    code's optimistic rule), when ``report_test_max``; reporting only."""
    test_max_epoch: int | None = None


def _test_max(test_errors: torch.Tensor | None, member: int, final_epoch: int):
    """(best test accuracy, its epoch) of one member over epochs 1..final_epoch."""
    if test_errors is None:
        return None, None
    accuracy = 1.0 - test_errors[:final_epoch, member]
    best = int(torch.argmax(accuracy))
    return float(accuracy[best]), best + 1


def run_folds(data: MilDataset, plans: list[FoldPlan], config: MilConfig,
              on_fraction: Callable[[float], None] | None = None) -> list[FoldResult]:
    """Train the plans side by side (after their inner CV, under ``epoch_choice="inner_cv"``)
    and test each member on its own test fold; ``on_fraction(share of this work done)``."""
    def report(low: float, high: float, epochs: int) -> Callable[[int], None]:
        def on_epoch(epoch: int) -> None:
            if on_fraction is not None:
                on_fraction(low + (high - low) * epoch / epochs)
        return on_epoch

    fixed, on_epoch = None, report(0.0, 1.0, config.epochs)
    if config.epoch_choice == "inner_cv":
        # The inner CV trains inner_folds x the members for every epoch: about 3/4 of the work.
        fixed = inner_cv_epochs(data, plans, config, report(0.0, 0.75, config.epochs))
        on_epoch = report(0.75, 1.0, max(fixed))
    model, scalers, info = train_members(data, plans, config, on_epoch, fixed_epochs=fixed,
                                         watch_test=config.report_test_max)
    test_inputs = _member_inputs(data, [p.test for p in plans], scalers)
    out, errors, _ = _evaluate(model, test_inputs, config)
    probs = torch.softmax(out.logits, 2)[..., 1]
    results = []
    for f, p in enumerate(plans):
        n_rows = int(data.bag_sizes[p.test].sum())
        trained = np.flatnonzero(info["fit_mask"][f].numpy())
        best, at = _test_max(info["test_errors"], f, info["final_epochs"][f])
        results.append(FoldResult(p.repeat, p.fold, 1.0 - float(errors[f]),
                                  info["best_epoch"][f], info["epochs_run"], p.test,
                                  probs[f, :len(p.test)].numpy(),
                                  out.weights[f, :n_rows].numpy(), trained,
                                  p.fit if fixed is not None else p.val, best, at))
    return results


# ----------------------------------------------------------------------------------------------
# A whole cross-validation


def cross_validate(data: MilDataset, config: MilConfig,
                   on_progress: Callable[[float], None] | None = None) -> dict:
    """Run the CV for one data set and method; ``on_progress(fraction done)`` every epoch.
    Returns the summary row, with per-fold accuracies and the first repetition's bag weights."""
    started = time.perf_counter()
    plans = fold_plans(data, config)
    group = config.parallel_folds or len(plans)
    groups = [plans[i:i + group] for i in range(0, len(plans), group)]
    results: list[FoldResult] = []
    for g, members in enumerate(groups):
        def done(fraction: float, g: int = g) -> None:
            if on_progress is not None:
                on_progress(min(1.0, (g + fraction) / len(groups)))
        results += run_folds(data, members, config, done)
        done(1.0)
    return summarise(data, config, results, time.perf_counter() - started)


def _test_max_summary(results: list[FoldResult]) -> dict:
    """The optimistic column's numbers (empty when they were not recorded)."""
    if any(r.test_max is None for r in results):
        return {}
    best = np.array([r.test_max for r in results])
    return {"test_max_mean": float(best.mean()), "test_max_std": float(best.std()),
            "test_max_fold_accuracies": best.tolist(),
            "test_max_epochs": [r.test_max_epoch for r in results]}


def summarise(data: MilDataset, config: MilConfig, results: list[FoldResult],
              seconds: float) -> dict:
    acc = np.array([r.accuracy for r in results])
    repeat_means = [float(np.mean([r.accuracy for r in results if r.repeat == k]))
                    for k in sorted({r.repeat for r in results})]
    paper = paper_accuracy(data.name, config.method)
    return {
        "dataset": data.name, "method": config.method,
        "accuracy_mean": float(acc.mean()), "accuracy_std": float(acc.std()),
        "accuracy_std_of_repeat_means": float(np.std(repeat_means)),
        "repeat_means": repeat_means, "fold_accuracies": acc.tolist(),
        "best_epochs": [r.best_epoch for r in results],
        "epochs_run": [r.epochs_run for r in results],
        **_test_max_summary(results),
        "folds_done": len(results), "seconds": round(seconds, 2),
        "paper_mean": None if paper is None else paper[0],
        "paper_std": None if paper is None else paper[1],
        "data": data.summary(), "config": config.to_dict(),
        "bag_weights": bag_weights(data, [r for r in results if r.repeat == 0]),
    }


def bag_weights(data: MilDataset, results: list[FoldResult]) -> list[dict]:
    """Per test bag of the given folds: label, predicted probability, instance weights (and the
    instance labels where the data set has them), ordered by bag number."""
    bags = []
    for r in results:
        sizes = data.bag_sizes[r.test_bags]
        starts = np.concatenate([[0], np.cumsum(sizes)])
        for i, k in enumerate(r.test_bags):
            entry = {"bag": int(k), "label": int(data.labels[k]),
                     "probability": round(float(r.probabilities[i]), 4), "fold": r.fold,
                     "weights": [round(float(w), 5) for w in r.weights[starts[i]:starts[i + 1]]]}
            if data.instance_labels is not None:
                lo, hi = data.offsets[k], data.offsets[k + 1]
                entry["instance_labels"] = data.instance_labels[lo:hi].tolist()
            bags.append(entry)
    return sorted(bags, key=lambda b: b["bag"])


