"""Evaluation end to end: reports, ξ grids, errors, CAM hooks, sweeps, the real data slices."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import data_root, needs_data

from engine import evaluate, explain
from engine.checkpoint import atomic_torch_save, load_model, make_checkpoint
from engine.config import DataConfig, ModelConfig, RunConfig, TrainConfig, config_to_dict
from engine.data import load_split
from engine.data.base import ImageSet, model_input
from engine.evaluate import EvaluationError, collect, evaluate_model, resolve_groups
from engine.explain import cam_maps, compare_maps, explanation_maps, remembered_maps
from engine.metrics import evaluate as epoch_evaluate
from engine.models import build_model

SHIPPED = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def shipped():
    model, ckpt = load_model(SHIPPED)
    data = load_split(DataConfig(**{**ckpt["run_config"]["data"], "test_size": 400}), "test")
    return model, data


def test_faithfulness_files_record_the_mask_and_the_references(shipped, tmp_path, capsys):
    import csv

    from engine.cli import main
    from engine.evaluate import faithfulness_rows, write_report

    model, data = shipped
    with pytest.raises(EvaluationError, match=r"mask must be one of \['black', 'mean', 'blur'\]"):
        evaluate_model(model, data, CPU, groups=["image"], faithfulness_images=4, mask="white")
    with pytest.raises(EvaluationError, match="draws >= 1"):
        evaluate_model(model, data, CPU, groups=["image"], faithfulness_images=4, random_draws=0)
    report = evaluate_model(model, data, CPU, groups=["image"], faithfulness_images=4,
                            mask="mean", random_draws=2)
    faith = report["faithfulness"]
    assert faith["mask"] == "mean" and set(faith["references"]) == set(explain.REFERENCES)
    write_report(report, tmp_path)
    assert json.loads((tmp_path / "report.json").read_text())["faithfulness"]["mask"] == "mean"
    rows = list(csv.DictReader((tmp_path / "faithfulness.csv").open()))
    assert {r["mask"] for r in rows} == {"mean"}
    assert [r["method"] for r in rows if r["kind"] == "reference"] == [
        "ref: uniform", "ref: random", "ref: centre", "ref: intensity"]
    # a report saved before masks were named was made with black, the only mask there was
    old = {"methods": {"gradcam": {"average_drop_pct": 50.0}}}
    assert faithfulness_rows(old) == [{"method": "gradcam", "kind": "method", "mask": "black",
                                       "average_drop_pct": 50.0}]
    capsys.readouterr()
    with pytest.raises(SystemExit) as exc:  # argparse's choices: the names in metric_table
        main(["evaluate", str(SHIPPED), "--faithfulness-images", "4", "--mask", "white",
              "--out", str(tmp_path / "bad")])
    assert exc.value.code == 2 and "'white'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_report_at_a_xi_grid(shipped):
    model, data = shipped
    report = evaluate_model(model, data, CPU, xi_grid=[0.0, 0.5, 1.0])
    assert [r["xi"] for r in report["by_xi"]] == [0.0, 0.1, 0.5, 1.0]  # the model's ξ added
    assert report["groups"] == ["image", "patch", "localization"]
    at = {r["xi"]: r for r in report["by_xi"]}
    # The cached re-decode agrees with a plain forward pass at the model's ξ.
    direct = epoch_evaluate(model, data, CPU)
    assert at[0.1]["image"]["accuracy"] == pytest.approx(direct["test_acc"])
    assert at[0.1]["selection"]["patches_per_image"] == pytest.approx(direct["patches_selected"])
    # ξ = 0 keeps every patch; a higher ξ keeps fewer, more precise ones.
    assert at[0.0]["selection"]["patches_per_image"] == 36
    assert at[0.0]["patch"]["recall"] == 1.0
    assert at[1.0]["patch"]["precision"] > at[0.1]["patch"]["precision"]
    assert at[1.0]["selection"]["patches_per_image"] < at[0.1]["selection"]["patches_per_image"]
    assert at[0.1]["patch"]["f_paper"] > 0.5 and at[0.1]["localization"]["gt_known_loc"] > 0.3
    curves = report["patch_pr"]
    assert 0 < curves["overall"]["ap"] <= 1 and len(curves["per_class"]) == 10


def test_faithfulness_in_report_and_cam_hooks_released(shipped):
    model, data = shipped
    report = evaluate_model(model, data, CPU, groups=["image"], faithfulness_images=12)
    methods = report["faithfulness"]["methods"]
    assert set(methods) == {"loss_attention", "gradcam", "gradcam++", "scorecam"}
    for row in methods.values():
        assert 0 <= row["average_drop_pct"] <= 100 and 0 <= row["deletion_auc"] <= 1
        assert 0 <= row["energy_pointing_game"] <= 1
    # Per-image values (for paired intervals) are the ones the means are made of.
    per_image = report["faithfulness"]["per_image"]
    assert set(per_image) == set(methods)
    for method, values in per_image.items():
        assert {len(v) for v in values.values()} == {12}
        assert set(values["increase_in_confidence_pct"]) <= {0.0, 100.0}
        for metric, v in values.items():
            assert np.nanmean(v) == pytest.approx(methods[method][metric], abs=1e-5)
    maps = cam_maps(model, torch.randn(2, 3, 32, 32), torch.tensor([1, 2]), "gradcam")
    assert maps.shape == (2, 32, 32) and maps.min() >= 0 and maps.max() <= 1
    assert not model.backbone._forward_hooks and not model.backbone._backward_hooks
    # A failing explanation: a clear error, and the hooks are released on that path too.
    with pytest.raises(ValueError, match="could not explain classes"):
        cam_maps(model, torch.randn(1, 3, 32, 32), torch.tensor([99]), "gradcam++")
    assert not model.backbone._forward_hooks and not model.backbone._backward_hooks


@pytest.mark.parametrize("head", ["loss_attention", "capsule_loss_attention", "plain"])
def test_one_pass_gradient_cams_equal_the_packages(head):
    """Grad-CAM and Grad-CAM++ are computed here from one backbone pass; they must be the grad-cam
    package's maps (its definitions, its target layer, the logits at the same ξ)."""
    model = build_model(ModelConfig(backbone="small_cnn", head=head, input_size=(40, 48))).eval()
    x, classes = torch.randn(3, 3, 40, 48), torch.tensor([0, 4, 9])
    for method in ("gradcam", "gradcam++"):
        ours = explanation_maps(model, x, classes, method, xi=0.7)  # the model at ξ = 0.7
        torch.testing.assert_close(ours, cam_maps(model, x, classes, method, xi=0.7), atol=1e-5,
                                   rtol=0)
        assert not model.backbone._forward_hooks and not model.backbone._backward_hooks
    with pytest.raises(ValueError, match="could not explain classes"):
        explanation_maps(model, x[:1], torch.tensor([99]), "gradcam++")


def test_compare_maps_share_one_pass_and_score_cam_is_remembered(shipped, monkeypatch):
    model, data = shipped
    indices = torch.arange(5, 8)
    both = compare_maps(model, data, indices, "predicted", ["loss_attention", "gradcam"])
    alone = compare_maps(model, data, indices, "predicted", ["gradcam"])
    assert both["classes"] == both["predicted"] == alone["classes"]
    assert (both["maps"]["gradcam"] == alone["maps"]["gradcam"]).all()
    batches = []
    real = explain.cam_maps
    monkeypatch.setattr(explain, "cam_maps", lambda m, x, c, method, xi=None: batches.append(
        (method, len(x))) or real(m, x, c, method, xi))
    memo = {}
    first = remembered_maps(memo, model, data, [5, 6], [3, 3], "scorecam")
    again = remembered_maps(memo, model, data, [6, 7, 5], [3, 3, 3], "scorecam", limit=2)
    assert batches == [("scorecam", 2), ("scorecam", 1)]  # image 7 only, the rest remembered
    assert (again[2] == first[0]).all() and (again[0] == first[1]).all()
    assert list(memo) == [(7, 3), (5, 3)]  # the least recently used dropped beyond the limit
    alone = cam_maps(model, model_input(data, data.images[[7]], CPU), torch.tensor([3]),
                     "scorecam")
    torch.testing.assert_close(torch.from_numpy(again[1]), alone[0])  # as if computed alone


def test_evaluation_from_a_pass_already_made(shipped, monkeypatch):
    model, data = shipped
    made = collect(model, data, CPU)
    monkeypatch.setattr(evaluate, "collect", lambda *a, **k: pytest.fail("the backbone ran"))
    report = evaluate_model(model, data, CPU, xi_grid=[0.0, 1.0], collected=made)
    monkeypatch.undo()
    assert report["by_xi"] == evaluate_model(model, data, CPU, xi_grid=[0.0, 1.0])["by_xi"]
    with pytest.raises(EvaluationError, match="covers"):
        evaluate_model(model, data.subset(torch.arange(10)), CPU, collected=made)


def test_missing_capabilities_are_clear_errors(shipped):
    model, data = shipped
    plain = build_model(ModelConfig(backbone="small_cnn", head="plain"))
    with pytest.raises(EvaluationError, match=r"head 'plain'\) has no patch outputs"):
        resolve_groups(plain, data, "patch")
    assert resolve_groups(plain, data, "auto") == ["image"]
    boxless = ImageSet("nobox", "test", data.images[:4], data.targets[:4], data.classes, False,
                       data.mean, data.std)
    with pytest.raises(EvaluationError, match="no bounding boxes; localization"):
        resolve_groups(model, boxless, "localization")
    with pytest.raises(EvaluationError, match="empty"):
        evaluate_model(model, ImageSet("empty", "test", data.images[:0], data.targets[:0],
                                       data.classes, False, data.mean, data.std), CPU)
    with pytest.raises(EvaluationError, match="unknown metric"):
        resolve_groups(model, data, "speed")
    multi = load_split(DataConfig(dataset="digits_multilabel", test_size=8), "test")
    with pytest.raises(EvaluationError, match="single-label"):
        resolve_groups(model, multi, "localization")


def test_cli_evaluate_writes_reports(tmp_path, capsys):
    from engine.cli import main

    out = tmp_path / "eval"
    assert main(["evaluate", str(SHIPPED), "--data", "digits", "--test-size", "200",
                 "--xi-grid", "0,1", "--out", str(out)]) == 0
    report = json.loads((out / "report.json").read_text())
    assert len(report["by_xi"]) == 3
    lines = (out / "metrics.csv").read_text().splitlines()
    assert lines[0].startswith("xi,accuracy") and len(lines) == 4
    assert "patch_ap" in (out / "per_class.csv").read_text().splitlines()[0]
    capsys.readouterr()
    assert main(["evaluate", str(SHIPPED), "--metrics", "faithfulness,bogus"]) == 2
    assert "unknown metric" in capsys.readouterr().err
    assert main(["evaluate", str(tmp_path / "missing.pt")]) == 2
    capsys.readouterr()
    assert main(["evaluate", str(SHIPPED), "--data", "mnist"]) == 2
    assert "digits" in capsys.readouterr().err  # the unknown name is answered with the known ones
    assert main(["evaluate", str(SHIPPED), "--xi-grid", "0,2", "--test-size", "50",
                 "--out", str(out)]) == 2


def test_sweep_trains_a_grid_and_tabulates(tmp_path):
    from engine.runs import RunStore
    from engine.sweep import parse_grid, run_sweep, sweep_configs, sweep_report, write_manifest

    base = RunConfig(model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=128, test_size=64),
                     train=TrainConfig(epochs=1, batch_size=32))
    grid = parse_grid(["model.head=loss_attention,mean", "loss.gamma_max=0,0.1"])
    configs = sweep_configs(base, grid, "ab")
    assert len(configs) == 4 and configs[1].loss.gamma_max == 0.1
    assert all("sweep:ab" in c.tags for c in configs)
    store = RunStore(tmp_path)
    run_sweep(store, configs[:2], parallel=2, log=lambda m: None)   # background processes
    run_sweep(store, configs, parallel=1, progress_bar=False, log=lambda m: None)  # the rest
    assert "train.lr" in sweep_report(store, "ab")["fields"]   # no manifest: all varied
    write_manifest(store, "ab", grid)
    report = sweep_report(store, "ab")
    assert report["fields"] == ["model.head", "loss.gamma_max"]
    assert "train.lr" in report["derived_fields"]    # Mean-pooling's Adam recipe
    assert len(report["rows"]) == 4 and all(r["state"] == "finished" for r in report["rows"])
    assert all("f_paper" in r for r in report["rows"])
    assert (tmp_path / "_sweeps" / "ab" / "report.csv").is_file()
    with pytest.raises(ValueError, match="--grid"):
        parse_grid(["gamma=0,1"])


def test_a_sweep_is_finished_only_with_its_table(tmp_path, capsys):
    """The sweep's job covers its report: "finished" means report.json is there."""
    from engine.cli import main
    from engine.runs import RunStore
    from engine.sweep import sweep_folder, sweep_status

    assert main(["sweep", "--runs-dir", str(tmp_path), "--sweep-name", "one", "--backbone",
                 "small_cnn", "--epochs", "1", "--train-size", "64", "--test-size", "32",
                 "--batch-size", "32", "--grid", "train.seed=0", "--quiet",
                 "--device-eval", "cpu"]) == 0
    status = sweep_status(RunStore(tmp_path), "one")
    report = sweep_folder(RunStore(tmp_path), "one") / "report.json"
    assert status.state == "finished" and report.is_file()
    assert report.stat().st_mtime <= status.finished


def _untrained_checkpoint(path, model_cfg, data_cfg):
    model = build_model(model_cfg)
    run = RunConfig(model=model.config, data=data_cfg)
    atomic_torch_save(make_checkpoint(config_to_dict(run), model), path)


@needs_data
def test_tiny_imagenet_slice_end_to_end(tmp_path):
    from engine.cli import main

    ckpt = tmp_path / "tiny.pt"
    _untrained_checkpoint(ckpt, ModelConfig(backbone="small_cnn", num_classes=10, input_size=64),
                          DataConfig(dataset="tiny_imagenet", root=data_root()))
    assert main(["evaluate", str(ckpt), "--faithfulness-images", "6", "--out",
                 str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["data"]["images"] == 500
    assert report["groups"] == ["image", "patch", "localization", "faithfulness"]
    row = report["by_xi"][0]
    assert 0 <= row["localization"]["gt_known_loc"] <= 1 and "recall" in row["patch"]


@needs_data
def test_coco_slice_end_to_end(tmp_path):
    ckpt = tmp_path / "coco.pt"
    _untrained_checkpoint(ckpt, ModelConfig(backbone="small_cnn", num_classes=80, input_size=64),
                          DataConfig(dataset="coco", root=data_root(), test_split="val2017"))
    model, meta = load_model(ckpt)
    data = load_split(DataConfig(**meta["run_config"]["data"]), "test")
    report = evaluate_model(model, data, CPU, faithfulness_images=4)
    assert report["groups"] == ["image", "patch", "faithfulness"]  # no localization: multi-label
    image = report["by_xi"][0]["image"]
    assert image["classes_with_positives"] == 47 and 0 <= image["map"] <= 1
    assert 0 <= image["map_11point_paper"] <= 1
    assert report["by_xi"][0]["patch"]["positive_patches"] > 0


def test_bench_eval_runs_the_backbone_once_for_a_whole_xi_grid(shipped, capsys, tmp_path):
    from engine.bench import bench_evaluation
    from engine.cli import main

    model, data = shipped
    grid = [v / 10 for v in range(11)]
    result = bench_evaluation(model, data, CPU, grid)
    assert result["images"] == result["backbone_images"] == len(data)  # each image once
    assert result["xi_values"] == 11 and result["total_s"] >= result["backbone_pass_s"] > 0
    out = tmp_path / "bench.json"
    assert main(["bench-eval", "--images", "100", "--xi-grid", "0,1", "--json", str(out)]) == 0
    assert json.loads(out.read_text())["backbone_images"] == 100
    assert main(["bench-eval", "--images", "100", "--xi-grid", "0,3"]) == 2  # ξ outside [0, 1]
