"""Multiple-instance learning (issue #6): attention and loss known answers, loaders and their
errors, digit bags, the cross-validation protocol (and that the test fold never leaks), the CLI,
the real benchmark files when LOSSATTN_DATA is set, and the MIL page under AppTest."""

import dataclasses
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from conftest import needs_data

from engine.mil.config import SELECTIONS, MilConfig
from engine.mil.data import (
    EXPECTED_COUNTS,
    MilDataError,
    digit_bags,
    load_csv,
    load_mat_folder,
    load_mil_dataset,
)
from engine.mil.models import (
    MilNet,
    MilOutput,
    loss_attention_weights,
    mil_loss,
    segment_softmax,
    tip_threshold_weights,
)
from engine.mil.protocol import (
    SELECT_RULES,
    Standardiser,
    _test_max,
    cross_validate,
    fold_plans,
    inner_cv_epochs,
    inner_plans,
    pooled_epoch_choice,
    run_folds,
    seeded_members,
    train_members,
)
from engine.mil.results import read_bag_weights, read_results, write_results

ROOT = Path(__file__).resolve().parents[1]
FAST = {"folds": 3, "repeats": 1, "epochs": 3, "patience": 3}


@pytest.fixture(autouse=True)
def _one_thread():
    """One torch thread: these networks are tiny, and on a busy 2-core machine OpenMP threads
    spinning against each other made one test 30x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------------------------
# Attention weights and loss: known answers on hand-built tensors


def test_loss_attention_weights_are_a_softmax_of_logsumexp():
    # bag 0: Σ_k exp(o) = 2 and 4 -> α = 1/3, 2/3; bag 1: one instance -> α = 1
    logits = torch.tensor([[0.0, 0.0], [math.log(2), math.log(2)], [5.0, -3.0]])
    bag = torch.tensor([0, 0, 1])
    alpha = loss_attention_weights(logits, bag, 2)
    torch.testing.assert_close(alpha, torch.tensor([1 / 3, 2 / 3, 1.0]))
    # huge logits: the per-bag max shift keeps it finite
    alpha = loss_attention_weights(logits * 1000, bag, 2)
    assert torch.isfinite(alpha).all() and torch.allclose(alpha[:2].sum(), torch.tensor(1.0))


def test_segment_softmax_is_per_bag():
    scores = torch.tensor([1.0, 2.0, 3.0, 0.5])
    bag = torch.tensor([1, 0, 1, 0])
    got = segment_softmax(scores, bag, 2)
    want = torch.cat([torch.softmax(torch.tensor([1.0, 3.0]), 0),
                      torch.softmax(torch.tensor([2.0, 0.5]), 0)])
    torch.testing.assert_close(got[[0, 2, 1, 3]], want)


def test_tip_threshold_weights_known_answer_and_guard():
    # norms 1, 1, 2 -> â = .25, .25, .5; ξ = 1 -> θ = 1/3 -> only the third survives
    logits = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.0, 2.0]])
    bag = torch.zeros(3, dtype=torch.long)
    torch.testing.assert_close(tip_threshold_weights(logits, bag, 1, 1.0),
                               torch.tensor([0.0, 0.0, 1.0]))
    # ξ = 0 keeps the ℓ2,1-normalised norms
    torch.testing.assert_close(tip_threshold_weights(logits, bag, 1, 0.0),
                               torch.tensor([0.25, 0.25, 0.5]))
    # equal norms at ξ = 1 remove everything: the guard keeps the top (tied) instances
    equal = torch.ones(2, 2)
    alpha = tip_threshold_weights(equal, torch.zeros(2, dtype=torch.long), 1, 1.0)
    torch.testing.assert_close(alpha, torch.tensor([0.5, 0.5]))


def test_bag_logit_is_the_weighted_sum_of_instance_logits():
    net = MilNet(5, "loss_attention", hidden=(4,), dropout=0.0).eval()
    x, bag = torch.randn(7, 5), torch.tensor([0, 0, 0, 1, 1, 2, 2])
    out = net(x, bag, 3)
    pooled = torch.zeros(3, 2).index_add(0, bag, out.weights[:, None] * out.instance_logits)
    torch.testing.assert_close(out.logits, pooled)
    torch.testing.assert_close(torch.zeros(3).index_add(0, bag, out.weights), torch.ones(3))


def test_loss_is_ce_plus_lambda_weighted_instance_ce():
    out = MilOutput(logits=torch.tensor([[0.0, 0.0]]),
                    instance_logits=torch.tensor([[0.0, math.log(3)], [0.0, 0.0]]),
                    weights=torch.tensor([0.25, 0.75]))
    y, bag = torch.tensor([1]), torch.tensor([0, 0])
    ce_bag = math.log(2)
    ce_inst = [-math.log(3 / 4), math.log(2)]
    want = ce_bag + 0.5 * (0.25 * ce_inst[0] + 0.75 * ce_inst[1])
    assert mil_loss(out, y, bag, lam=0.5).item() == pytest.approx(want, rel=1e-6)
    assert mil_loss(out, y, bag, lam=0.5, regularised=False).item() == pytest.approx(ce_bag)


def test_instance_loss_mean_divides_each_bag_by_its_size():
    """The released code's aggregate='mean': λ (1/N) Σ α CE per bag, with a known answer on two
    bags of sizes 2 and 1."""
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    inst = torch.tensor([[1.0, 0.0], [0.0, 2.0], [3.0, 0.0]])
    bag = torch.tensor([0, 0, 1])
    alpha = torch.tensor([0.25, 0.75, 1.0])
    y = torch.tensor([1, 0])

    def ce(o, k):
        return -torch.log_softmax(o, 0)[k].item()

    bag_terms = [0.25 * ce(inst[0], 1) + 0.75 * ce(inst[1], 1), 1.0 * ce(inst[2], 0)]
    ce_bags = [ce(logits[0], 1), ce(logits[1], 0)]
    out = MilOutput(logits, inst, alpha)
    want_sum = np.mean([c + 0.5 * t for c, t in zip(ce_bags, bag_terms, strict=True)])
    want_mean = np.mean([ce_bags[0] + 0.5 * bag_terms[0] / 2, ce_bags[1] + 0.5 * bag_terms[1]])
    assert mil_loss(out, y, bag, 0.5).item() == pytest.approx(want_sum, rel=1e-6)
    assert mil_loss(out, y, bag, 0.5, instance_loss="mean").item() == pytest.approx(want_mean,
                                                                                  rel=1e-6)
    with pytest.raises(ValueError, match="instance_loss"):
        mil_loss(out, y, bag, 0.5, instance_loss="max")


@pytest.mark.parametrize("method", ["loss_attention", "attention", "gated_attention", "mean",
                                    "tip_threshold"])
def test_members_match_single_networks(method):
    config = MilConfig(method=method, hidden=(8, 4), dropout=0.0)
    stacked = seeded_members(6, config, [3, 4]).eval()
    x, bag = torch.randn(5, 6), torch.tensor([0, 0, 1, 1, 1])
    out = stacked(x.expand(2, -1, -1), bag, 2)
    for f, seed in enumerate([3, 4]):
        torch.manual_seed(seed)
        single = MilNet(6, method, (8, 4), 0.0).eval()
        one = single(x, bag, 2)
        torch.testing.assert_close(out.logits[f], one.logits)
        torch.testing.assert_close(out.weights[f], one.weights)
    assert torch.isfinite(mil_loss(out, torch.tensor([0, 1]), bag, 0.1))


# ----------------------------------------------------------------------------------------------
# Loaders and bad input


def write_mat_set(folder: Path, x=None, bag2=None, bag_i=None, names=("X", "Bag2", "bagI")):
    folder.mkdir(parents=True, exist_ok=True)
    x = np.arange(12, dtype=np.float64).reshape(6, 2) if x is None else x
    bag2 = np.array([[1], [1], [2], [3], [3], [3]], dtype=np.uint8) if bag2 is None else bag2
    bag_i = np.array([[1], [0], [1]], dtype=np.uint8) if bag_i is None else bag_i
    scipy.io.savemat(folder / "X.mat", {names[0]: x})
    scipy.io.savemat(folder / "Bag2.mat", {names[1]: bag2})
    scipy.io.savemat(folder / "BagI.mat", {names[2]: bag_i})
    return folder


def test_mat_folder_loads(tmp_path):
    data = load_mat_folder(write_mat_set(tmp_path / "toy"))
    assert (data.n_bags, data.n_instances, data.n_features) == (3, 6, 2)
    assert data.bag_sizes.tolist() == [2, 1, 3] and data.labels.tolist() == [1, 0, 1]
    np.testing.assert_array_equal(data.bag(2), [[6, 7], [8, 9], [10, 11]])
    assert data.instance_labels is None


def test_mat_rows_need_not_be_grouped(tmp_path):
    bag2 = np.array([[2], [1], [2], [1], [1], [1]])
    data = load_mat_folder(write_mat_set(tmp_path / "toy", bag2=bag2,
                                         bag_i=np.array([[0], [1]])))
    np.testing.assert_array_equal(data.bag(1), [[0, 1], [4, 5]])
    assert data.labels.tolist() == [0, 1]


@pytest.mark.parametrize("case, file, words", [
    ("wrong_name", "X.mat", ["no variable 'X'", "features"]),
    ("short_ids", "Bag2.mat", ["5 bag ids", "6 instance rows"]),
    ("label_count", "BagI.mat", ["2 bag labels", "1..3"]),
    ("empty_bag", "Bag2.mat", ["empty bags", "[2]"]),
    ("bad_labels", "BagI.mat", ["0/1", "7"]),
    ("nan", "X.mat", ["missing or infinite", "row 2"]),
])
def test_mat_errors_name_the_file_and_the_problem(tmp_path, case, file, words):
    folder = tmp_path / "toy"
    if case == "wrong_name":
        write_mat_set(folder, names=("features", "Bag2", "bagI"))
    elif case == "short_ids":
        write_mat_set(folder, bag2=np.array([[1], [1], [2], [3], [3]]))
    elif case == "label_count":
        write_mat_set(folder, bag_i=np.array([[1], [0]]))
    elif case == "empty_bag":
        write_mat_set(folder, bag2=np.array([[1], [1], [3], [3], [3], [3]]))
    elif case == "bad_labels":
        write_mat_set(folder, bag_i=np.array([[1], [7], [0]]))
    else:
        x = np.ones((6, 2))
        x[1, 0] = np.nan
        write_mat_set(folder, x=x)
    with pytest.raises(MilDataError) as err:
        load_mat_folder(folder)
    assert str(folder / file) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_missing_mat_file_is_named(tmp_path):
    folder = write_mat_set(tmp_path / "toy")
    (folder / "BagI.mat").unlink()
    with pytest.raises(MilDataError, match="BagI.mat: file missing"):
        load_mat_folder(folder)


def test_csv_loads_with_and_without_header(tmp_path):
    body = "0.5,1,a,1\n1.5,2,a,1\n3,4,b,0\n"
    for name, text in (("plain.csv", body), ("header.csv", "f1,f2,bag,label\n" + body)):
        (tmp_path / name).write_text(text)
        data = load_csv(tmp_path / name)
        assert (data.n_bags, data.n_instances, data.n_features) == (2, 3, 2)
        assert data.labels.tolist() == [1, 0] and data.info["bag_names"] == ["a", "b"]


@pytest.mark.parametrize("text, words", [
    ("1,2,a,1\n1,x2,a,1\n", ["line 2, column 2", "'x2' is not a number"]),
    ("1,2,a,1\n1,2,a,0\n", ["bag 'a'", "different labels"]),
    ("1,2,a,1\n1,2,a\n", ["line 2 has 3 columns"]),
    ("1,2,a,1\n1,2,,1\n", ["line 2: empty bag id"]),
    ("1,2,a,3\n", ["0/1"]),
    ("f,bag,label\n", ["no instance rows"]),
    ("1,2,a,pos\n1,2,a,1\n", ["line 1"]),  # a bad first row is an error, not a header
])
def test_csv_errors_name_the_file_and_the_problem(tmp_path, text, words):
    path = tmp_path / "bags.csv"
    path.write_text(text)
    with pytest.raises(MilDataError) as err:
        load_csv(path)
    assert str(path) in str(err.value)
    for word in words:
        assert word in str(err.value)


def test_missing_data_root_says_where_to_put_the_files(tmp_path, monkeypatch):
    monkeypatch.delenv("LOSSATTN_DATA", raising=False)
    with pytest.raises(MilDataError, match="LOSSATTN_DATA"):
        load_mil_dataset("musk1")
    with pytest.raises(MilDataError, match=r"X.mat, Bag2.mat and BagI.mat in .*mil/musk1"):
        load_mil_dataset("musk1", tmp_path)
    with pytest.raises(MilDataError, match="unknown MIL data set"):
        load_mil_dataset("musk3", tmp_path)
    write_mat_set(tmp_path / "mil" / "fox")
    assert load_mil_dataset("fox", tmp_path).n_bags == 3


# ----------------------------------------------------------------------------------------------
# Digit bags


def test_digit_bags_are_deterministic_and_positive_iff_target_present():
    a, b, c = digit_bags(seed=1), digit_bags(seed=1), digit_bags(seed=2)
    np.testing.assert_array_equal(a.features, b.features)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.offsets, c.offsets) or not np.array_equal(a.features,
                                                                           c.features)
    digits = np.array(a.info["digits"])
    np.testing.assert_array_equal(a.instance_labels, digits == 9)
    for k in range(a.n_bags):
        lo, hi = a.offsets[k], a.offsets[k + 1]
        assert a.labels[k] == int(9 in digits[lo:hi])
    assert 0.3 < a.labels.mean() < 0.9  # both classes well represented
    assert a.bag_sizes.min() >= 1 and 8 < a.bag_sizes.mean() < 12


# ----------------------------------------------------------------------------------------------
# Protocol


def test_config_errors_name_the_field():
    for kwargs, field in (({"method": "max"}, "method"), ({"folds": 1}, "folds"),
                          ({"lr": 0}, "lr"), ({"dropout": 1.0}, "dropout"),
                          ({"val_fraction": 0.7}, "val_fraction"), ({"hidden": ()}, "hidden"),
                          ({"select": "best"}, "select"),
                          ({"epoch_choice": "test"}, "epoch_choice"),
                          ({"instance_loss": "max"}, "instance_loss"),
                          ({"inner_folds": 1}, "inner_folds"),
                          ({"report_test_max": "yes"}, "report_test_max")):
        with pytest.raises(ValueError, match=field):
            MilConfig(**kwargs)


def test_cross_validation_on_digit_bags_beats_chance():
    data = digit_bags(n_bags=120, seed=0)
    config = MilConfig(folds=4, repeats=1, epochs=25, patience=25, lr=1e-3, batch_bags=4)
    row = cross_validate(data, config)
    majority = max(data.labels.mean(), 1 - data.labels.mean())
    assert row["folds_done"] == 4
    assert row["accuracy_mean"] > majority + 0.12, (row["accuracy_mean"], majority)
    # every bag is a test bag once per repetition; weights sum to 1 per bag
    weights = row["bag_weights"]
    assert [w["bag"] for w in weights] == list(range(data.n_bags))
    assert all(abs(sum(w["weights"]) - 1) < 1e-3 for w in weights)
    assert all(len(w["weights"]) == len(w["instance_labels"]) for w in weights)


def test_no_test_fold_leakage():
    data = digit_bags(n_bags=60, seed=3)
    config = MilConfig(**FAST)
    plans = fold_plans(data, config)
    for p in plans:  # the three bag sets of a fold are disjoint and cover the data set
        assert not set(p.test) & set(p.fit) and not set(p.test) & set(p.val)
        assert not set(p.val) & set(p.fit)
        assert len(p.fit) + len(p.val) + len(p.test) == data.n_bags
    plan = plans[:1]
    model, scalers, _ = train_members(data, plan, config)
    fit_rows = data.rows(plan[0].fit)
    np.testing.assert_allclose(scalers[0].mean, data.features[fit_rows].mean(0), atol=1e-6)
    np.testing.assert_allclose(scalers[0].std, Standardiser.fit(data.features[fit_rows]).std)
    # Garbage (even NaN) in the test bags changes nothing of the trained network.
    poisoned = digit_bags(n_bags=60, seed=3)
    poisoned.features[poisoned.rows(plan[0].test)] = np.nan
    model2, scalers2, _ = train_members(poisoned, plan, config)
    np.testing.assert_array_equal(scalers[0].mean, scalers2[0].mean)
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(),
                            strict=True):
        assert torch.equal(a, b), name


def test_no_leakage_between_folds_trained_side_by_side():
    """Folds share one batched network and one epoch loop. Fold 0's result must not depend on its
    test bags even through the others (whose fit bags include them): changing those bags changes
    fold 0's selected parameters in no way, although the other folds' curves and stopping change.
    With a stop shared by the group, this failed here (fold 0 kept epoch 42, then 36)."""
    config = MilConfig(folds=3, repeats=1, epochs=60, patience=3, seed=1)
    data = digit_bags(n_bags=60, seed=0)
    plans = fold_plans(data, config)
    model, _, info = train_members(data, plans, config)
    noisy = digit_bags(n_bags=60, seed=0)
    rows = noisy.rows(plans[0].test)
    noisy.features[rows] = np.random.default_rng(0).normal(size=noisy.features[rows].shape)
    model2, _, info2 = train_members(noisy, plans, config)
    assert info["best_epoch"][0] == info2["best_epoch"][0]
    for (name, a), b in zip(model.state_dict().items(), model2.state_dict().values(),
                            strict=True):
        assert torch.equal(a[0], b[0]), name


def test_test_max_never_reaches_training_or_selection():
    """Recording every epoch's test accuracy (the optimistic column) changes nothing: the same
    parameters, chosen epochs and validation curves with and without it, and NaN test bags
    change nothing either. The record is consistent: at the kept epoch it is the reported
    accuracy, so the test maximum is never below it."""
    config = MilConfig(folds=3, repeats=1, epochs=12, patience=4, seed=2)
    data = digit_bags(n_bags=60, seed=1)
    plans = fold_plans(data, config)
    plain, _, info = train_members(data, plans, config)
    watched, _, winfo = train_members(data, plans, config, watch_test=True)
    poisoned = digit_bags(n_bags=60, seed=1)
    poisoned.features[poisoned.rows(plans[0].test)] = np.nan
    dirty, _, dinfo = train_members(poisoned, plans, config, watch_test=True)
    assert info["test_errors"] is None and winfo["test_errors"].shape[1] == len(plans)
    # The poisoned bags are the other folds' training bags: compare fold 0 alone there.
    for other, oinfo, f in ((watched, winfo, slice(None)), (dirty, dinfo, slice(0, 1))):
        assert oinfo["best_epoch"][f] == info["best_epoch"][f]
        assert torch.equal(oinfo["val_errors"][:, f], info["val_errors"][:, f])
        for (name, a), b in zip(plain.state_dict().items(), other.state_dict().values(),
                                strict=True):
            assert torch.equal(a[f], b[f]), name
    rows = [cross_validate(data, MilConfig(**FAST, report_test_max=flag)) for flag in (False, True)]
    assert "test_max_mean" not in rows[0]
    for key in ("fold_accuracies", "best_epochs", "bag_weights"):
        assert rows[0][key] == rows[1][key], key
    results = run_folds(data, plans, config)
    for r, f in zip(results, range(len(plans)), strict=True):
        at_kept = 1.0 - float(winfo["test_errors"][r.best_epoch - 1, f])
        assert r.accuracy == pytest.approx(at_kept)
        assert r.test_max >= r.accuracy and 1 <= r.test_max_epoch <= winfo["final_epochs"][f]


def test_test_max_known_answer_stops_at_the_fold_s_own_last_epoch():
    errors = torch.tensor([[0.5, 0.4], [0.2, 0.3], [0.1, 0.0]])  # (epochs, members)
    assert _test_max(errors, 0, 3) == (pytest.approx(0.9), 3)
    assert _test_max(errors, 0, 2) == (pytest.approx(0.8), 2)  # epoch 3 came after its stop
    assert _test_max(errors, 1, 1) == (pytest.approx(0.6), 1)
    assert _test_max(None, 0, 3) == (None, None)


def test_pooled_epoch_choice_known_answer():
    # Two groups: members 0-1 (val sizes 2 and 4), member 2 alone (size 5).
    val_errors = torch.tensor([[0.5, 0.25, 0.2],
                               [0.0, 0.50, 0.0],
                               [0.5, 0.00, 0.0]])
    # group 0 pooled wrong/6: epoch 1: (1 + 1)/6, epoch 2: (0 + 2)/6, epoch 3: (1 + 0)/6
    # group 1: 0.2, 0, 0 -> the later of the tied minima
    assert pooled_epoch_choice(val_errors, [2, 4, 5], [2, 1]) == [3, 3]
    assert pooled_epoch_choice(val_errors[:2], [2, 4, 5], [2, 1]) == [2, 2]


def test_inner_cv_splits_only_the_training_bags():
    config = MilConfig(folds=3, repeats=1, epoch_choice="inner_cv", inner_folds=3)
    data = digit_bags(n_bags=60, seed=0)
    for plan in fold_plans(data, config):
        assert len(plan.val) == 0 and len(plan.fit) + len(plan.test) == data.n_bags
        inner = inner_plans(data, plan, config)
        assert len(inner) == 3
        assert sorted(np.concatenate([q.val for q in inner])) == sorted(plan.fit)
        for q in inner:
            assert not set(q.fit) & set(q.val) and set(q.fit) | set(q.val) == set(plan.fit)
            assert not (set(q.fit) | set(q.val)) & set(plan.test) and len(q.test) == 0
            assert abs(data.labels[q.val].mean() - data.labels[plan.fit].mean()) < 0.1
    with pytest.raises(ValueError, match="inner_folds"):
        inner_plans(data, plan, MilConfig(inner_folds=40, epoch_choice="inner_cv"))


def test_inner_cv_retrains_for_the_chosen_epochs_without_seeing_the_test_fold():
    config = MilConfig(folds=3, repeats=1, epochs=6, epoch_choice="inner_cv", seed=4)
    data = digit_bags(n_bags=60, seed=2)
    plans = fold_plans(data, config)
    chosen = inner_cv_epochs(data, plans, config)
    assert len(chosen) == 3 and all(1 <= e <= 6 for e in chosen)
    poisoned = digit_bags(n_bags=60, seed=2)
    poisoned.features[poisoned.rows(plans[0].test)] = np.nan
    assert inner_cv_epochs(poisoned, plans[:1], config) == chosen[:1]
    # A fixed number of epochs keeps exactly the parameters after that epoch.
    fixed, _, info = train_members(data, plans, config, fixed_epochs=[2, 2, 2])
    last = dataclasses.replace(config, epochs=2, select="last")
    # (the validation split only watches here: "last" keeps every epoch)
    free, _, _ = train_members(data, [dataclasses.replace(p, val=p.test) for p in plans], last)
    assert info["best_epoch"] == [2, 2, 2] and info["epochs_run"] == 2
    for (name, a), b in zip(fixed.state_dict().items(), free.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    row = cross_validate(data, config)
    assert row["folds_done"] == 3 and all(1 <= e <= 6 for e in row["best_epochs"])
    assert row["test_max_mean"] >= row["accuracy_mean"]


def test_results_folder_round_trip(tmp_path):
    data = digit_bags(n_bags=40, seed=0)
    row = cross_validate(data, MilConfig(**FAST))
    write_results(tmp_path, [row])
    rows = read_results(tmp_path)
    assert [(r["dataset"], r["method"]) for r in rows] == [("digit_bags", "loss_attention")]
    assert "bag_weights" not in rows[0]
    assert len(read_bag_weights(tmp_path, "digit_bags", "loss_attention")) == 40
    md = (tmp_path / "results.md").read_text()
    assert "| digit_bags | loss_attention |" in md and "paper" in md
    assert "| test-max (optimistic) |" in md and "np.amax" in md
    assert (tmp_path / "results.csv").read_text().startswith(
        "dataset,method,measured,test-max (optimistic),paper")


def test_cli_writes_the_table(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "mil"
    rc = main(["mil", "--dataset", "digit_bags", "--method", "loss_attention,mean", "--folds",
               "3", "--repeats", "1", "--epochs", "2", "--out", str(out), "--quiet",
               "--threads", "2"])
    assert rc == 0
    assert {r["method"] for r in read_results(out)} == {"loss_attention", "mean"}
    # It trained on the threads asked for, and left the caller's setting as it was.
    assert {r["threads"] for r in read_results(out)} == {2}
    assert torch.get_num_threads() == 1  # this module's setting (_one_thread)
    assert "digit_bags" in capsys.readouterr().out
    assert main(["mil", "--method", "max", "--out", str(out)]) == 2
    assert main(["mil", "--dataset", "musk9", "--out", str(out)]) == 2
    assert main(["mil", "--epoch-choice", "best", "--out", str(out)]) == 2


def test_the_spec_carries_every_setting_to_the_background_process(tmp_path):
    from engine.cli import build_parser
    from engine.job_spec import MilSpec, spec_from_dict

    config = MilConfig(report_test_max=False, epoch_choice="inner_cv", inner_folds=4,
                       instance_loss="mean", hidden=(32, 16))
    spec = MilSpec(datasets=["fox"], methods=["attention"], config=config, out=str(tmp_path))
    back = spec_from_dict(json.loads(json.dumps(spec.to_dict())))  # as spec.json holds it
    assert back == spec and back.mil_config() == config
    args = build_parser().parse_args(["mil", "--report-test-max"])
    assert args.report_test_max is True and args.epoch_choice is None


# ----------------------------------------------------------------------------------------------
# The real benchmark files


@needs_data
@pytest.mark.parametrize("name", sorted(EXPECTED_COUNTS))
def test_benchmarks_load_with_the_readme_counts(name):
    data = load_mil_dataset(name, os.environ.get("LOSSATTN_DATA"))
    assert (data.n_bags, data.n_instances, data.n_features) == EXPECTED_COUNTS[name]
    positives = {"musk1": 47, "musk2": 39, "fox": 100, "tiger": 100, "elephant": 100}
    assert int(data.labels.sum()) == positives[name]
    assert np.isfinite(data.features).all()


# ----------------------------------------------------------------------------------------------
# The page


def test_mil_page_smoke(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("LOSSATTN_RUNS", str(tmp_path / "runs"))
    at = AppTest.from_file(str(ROOT / "pages" / "mil.py"), default_timeout=300).run()
    assert not at.exception, [e.message for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def test_mil_page_shows_the_honest_and_the_optimistic_column(tmp_path, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from engine.mil.results import TEST_MAX

    monkeypatch.setenv("LOSSATTN_RUNS", str(tmp_path / "runs"))
    data = digit_bags(n_bags=40, seed=0)
    row = cross_validate(data, MilConfig(**FAST, instance_loss="mean"))
    write_results(tmp_path / "runs" / "_mil" / "mine", [row])
    at = AppTest.from_file(str(ROOT / "pages" / "mil.py"), default_timeout=300).run()
    assert not at.exception, [e.message for e in at.exception]
    assert at.selectbox(key="w_mil_experiment").value == "mine"
    table = at.dataframe[0].value  # the measured table (the paper's is second)
    assert list(table[TEST_MAX]) == [f"{row['test_max_mean']:.3f} ± {row['test_max_std']:.3f}"]
    captions = " ".join(c.value for c in at.caption)
    assert "np.amax" in captions and "headline" in captions
    assert "instance loss: mean (the released code)" in captions
    shipped = [o for o in at.selectbox(key="w_mil_experiment").options if "shipped" in o]
    assert "results/mil (shipped with the repository)" in shipped


def test_every_selection_a_config_accepts_has_a_rule():
    assert sorted(SELECT_RULES) == sorted(SELECTIONS)
