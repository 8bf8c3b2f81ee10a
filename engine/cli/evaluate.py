"""``evaluate``: every metric of a model (a checkpoint or a run) over a data set, at ξ values."""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import parse_floats, runs_dir_parent


def register(sub) -> None:
    p = sub.add_parser("evaluate", parents=[runs_dir_parent()],
                       help="image, patch, localization and faithfulness metrics of a model")
    p.add_argument("source", help="a checkpoint .pt file, or a run name (its best checkpoint)")
    p.add_argument("--dataset", "--data", dest="dataset",
                   help="evaluate on another registered data set")
    p.add_argument("--data-root")
    p.add_argument("--test-size", type=int)
    p.add_argument("--set", action="append", metavar="data.FIELD=VALUE")
    p.add_argument("--split", choices=["test", "train"], default="test")
    p.add_argument("--xi-grid", help="comma-separated ξ values, e.g. 0,0.1,0.2,...,1")
    p.add_argument("--metrics", default="auto",
                   help="auto, or a comma list of image,patch,localization,faithfulness")
    p.add_argument("--faithfulness-images", type=int, default=0,
                   help="also measure faithfulness on this many images (e.g. 200)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", help="report folder (default: the run's eval/ or ./eval-NAME)")
    p.add_argument("--allow-class-mismatch", action="store_true",
                   help="evaluate on data whose class names differ from the model's")
    p.set_defaults(func=cmd_evaluate)


def _data_of(args: argparse.Namespace, ckpt: dict):
    """The data set to evaluate on: the model's own, with the flags' changes."""
    from engine.config import DataConfig, config_from_dict, parse_setting
    from engine.data import load_split

    fields = dict(ckpt["run_config"].get("data", {}))
    for flag, key in (("dataset", "dataset"), ("data_root", "root"), ("test_size", "test_size")):
        if getattr(args, flag) is not None:
            fields[key] = getattr(args, flag)
    for item in args.set or []:
        _, key, value = parse_setting(item, "evaluate --set", sections=("data",))
        fields[key] = value
    return load_split(config_from_dict(DataConfig, fields, section="data"), args.split)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.checkpoint import check_classes, load_model_source
    from engine.device import resolve_device
    from engine.errors import EvaluationError
    from engine.evaluate import evaluate_model, format_summary, write_report

    device = resolve_device(args.device, "--device")
    model, ckpt, run = load_model_source(args.source, args.runs_dir)
    data = _data_of(args, ckpt)
    if data.num_classes != model.config.num_classes:
        raise EvaluationError(f"the model predicts {model.config.num_classes} classes but "
                              f"{data.name} has {data.num_classes}")
    check_classes(ckpt.get("classes"), data.classes, f"the model {args.source}",
                  force=args.allow_class_mismatch)
    xi_grid = parse_floats(args.xi_grid, "--xi-grid") if args.xi_grid else None
    report = evaluate_model(model.to(device), data, device, xi_grid=xi_grid,
                            groups=args.metrics, faithfulness_images=args.faithfulness_images)
    report["source"] = str(args.source)
    default_out = run.path / "eval" if run else Path(f"eval-{Path(args.source).stem}")
    paths = write_report(report, args.out or default_out)
    print(format_summary(report))
    if "faithfulness" in report:
        for method, row in report["faithfulness"]["methods"].items():
            print(f"  {method:15s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print("collect {:.1f}s, metrics {:.2f}s per ξ; wrote {}".format(
        report["timing"]["collect_s"], max(report["timing"]["metrics_s_per_xi"]),
        ", ".join(str(p) for p in paths)))
    return 0
