"""Command line: ``python -m engine <command>``. Everything the app does is scriptable here.

  models                      list backbones and heads
  data list | check NAME      list data sets; check that one loads (counts, classes, boxes)
  train [--config F] [flags]  create a run and train it (foreground with a progress bar, or
                              --background); torchrun-compatible
  resume NAME                 continue a stopped or killed run from its last checkpoint
  runs [list|show|stop|delete|reindex]
  export NAME --out F.pt      a run's best model as a small checkpoint with a model card
  evaluate RUN_OR_CHECKPOINT  every metric, JSON + CSV report (--xi-grid, --faithfulness-images)
  sweep --grid a.b=1,2 ...    train a grid of runs (γmax x ξ by default) and tabulate it
  bench                       forward+backward images/s and peak memory per model
  bench-train                 loader-only vs model-only vs full training step images/s
  mil --dataset D --method M  MIL 5 x 10-fold CV; results table beside the AAAI paper's
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import Sequence
from pathlib import Path

DEFAULT_BENCH_MODELS = "small_cnn/loss_attention,resnet18/loss_attention"
SHIPPED_CHECKPOINT = Path(__file__).resolve().parents[1] / "checkpoints" / "digits_small_cnn_la.pt"


def _model_list(text: str) -> list[tuple[str, str]]:
    """``"resnet18/loss_attention,timm:resnet18/mean"`` -> [(backbone, head), ...]."""
    pairs = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        backbone, sep, head = item.rpartition("/")
        if not sep or not backbone or not head:
            raise ValueError(f"--models entries must look like BACKBONE/HEAD; got {item!r}")
        pairs.append((backbone, head))
    if not pairs:
        raise ValueError("--models is empty")
    return pairs


# ----------------------------------------------------------------------------------------------
# models, data


def cmd_models(args: argparse.Namespace) -> int:
    from engine.models import backbone_descriptions, head_spec, list_heads

    print("backbones:")
    for name, text in backbone_descriptions().items():
        print(f"  {name:24s} {text}")
    print("heads:")
    for name in list_heads():
        print(f"  {name:24s} {head_spec(name).description}")
    return 0


def cmd_data(args: argparse.Namespace) -> int:
    import dataclasses

    from engine.config import DataConfig
    from engine.data import dataset_spec, list_datasets, load_split

    if args.action == "list":
        for name in list_datasets():
            spec = dataset_spec(name)
            kind = "multi-label" if spec.multilabel else "single-label"
            boxes = ", boxes" if spec.has_boxes else ""
            print(f"  {name:18s} {spec.native_size}px {kind}{boxes}: {spec.description}")
        return 0
    if not args.dataset:
        raise ValueError("data check needs a data set name (see: python -m engine data list)")
    cfg = DataConfig(dataset=args.dataset, root=args.data_root, input_size=args.input_size,
                     download=args.download)
    cfg = dataclasses.replace(cfg, skip_unreadable=args.skip_unreadable)
    for split in ("train", "test"):
        data = load_split(cfg, split)
        boxes = (f", {data.box_data.shape[0]} boxes" if data.has_boxes else ", no boxes")
        skipped = (f"; {len(data.skipped)} missing or unreadable image(s) skipped, e.g. "
                   f"{data.skipped[0]}" if data.skipped else "")
        print(f"{args.dataset}/{split}: {len(data)} images {tuple(data.images.shape[1:])}, "
              f"{data.num_classes} classes{boxes}; classes: {data.classes[:10]}"
              f"{' ...' if data.num_classes > 10 else ''}{skipped}")
    return 0


# ----------------------------------------------------------------------------------------------
# train, resume, runs

# Convenience flags: flag -> (section, field, type). Anything else: --set section.field=value.
TRAIN_FLAGS = {
    "dataset": ("data", "dataset", str), "data_root": ("data", "root", str),
    "input_size": ("data", "input_size", int), "train_size": ("data", "train_size", int),
    "test_size": ("data", "test_size", int),
    "backbone": ("model", "backbone", str), "head": ("model", "head", str),
    "xi": ("model", "xi", float), "xi_denominator": ("model", "xi_denominator", str),
    "gamma_max": ("loss", "gamma_max", float), "ramp_epochs": ("loss", "ramp_epochs", int),
    "epochs": ("train", "epochs", int), "batch_size": ("train", "batch_size", int),
    "lr": ("train", "lr", float), "recipe": ("train", "recipe", str),
    "seed": ("train", "seed", int), "device": ("train", "device", str),
    "micro_batches": ("train", "micro_batches", int),
}


def build_run_config(args: argparse.Namespace):
    """RunConfig from an optional JSON file, then the flags, then ``--set`` overrides."""
    from engine.config import ConfigError, RunConfig, config_from_dict, parse_setting

    data: dict = {}
    if args.config:
        data = _read_config_file(args.config)
    for flag, (section, key, _) in TRAIN_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            data.setdefault(section, {})[key] = value
    if args.compile:
        data.setdefault("train", {})["compile"] = True
    if args.no_amp:
        data.setdefault("train", {})["amp"] = False
    if args.download:
        data.setdefault("data", {})["download"] = True
    for item in args.set or []:
        section, key, value = parse_setting(item, "--set")
        section_data = data.setdefault(section, {})
        if not isinstance(section_data, dict):
            raise ConfigError(f"--set {item}: the config's {section} section is not an object")
        section_data[key] = value
    if args.name:
        data["name"] = args.name
    if args.tag:
        data["tags"] = list(data.get("tags") or []) + args.tag
    try:
        return config_from_dict(RunConfig, data)
    except ConfigError as exc:
        raise ConfigError(f"{exc}" + (f" (config file {args.config}, then the flags)"
                                      if args.config else "")) from None


def _read_config_file(path: str) -> dict:
    from engine.config import ConfigError

    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object; it holds a "
                          f"{type(data).__name__}")
    for section in ("model", "data", "loss", "train"):
        if section in data and not isinstance(data[section], dict):
            raise ConfigError(f"config file {path}: section {section!r} must be a JSON object; "
                              f"got {data[section]!r:.60}")
    return data


def _store(args: argparse.Namespace):
    from engine.runs import RunStore

    return RunStore(args.runs_dir)


def cmd_train(args: argparse.Namespace) -> int:
    from engine import launch
    from engine.runs import Run, RunStore
    from engine.train import init_distributed, prepare_run_config, train_run

    if args.run_dir:  # an existing run directory (how engine.jobs starts the trainer)
        run = Run(Path(args.run_dir))
        store = RunStore(run.path.parent)
        state = train_run(run, resume=args.resume, progress_bar=not args.quiet,
                          on_status=store.index, spawned=True)
        return 0 if state in ("finished", "stopped") else 1

    config = build_run_config(args)
    store = _store(args)
    if args.background:
        run = launch.launch(store, config)
        print(f"started run {run.name} in the background: {run.path}")
        return 0
    dist = init_distributed()
    if dist.is_main:
        run = store.create(prepare_run_config(config))
        run.update_status(command=_command_line())
        print(f"run {run.name}: {run.path}", file=sys.stderr)
        name = [run.name]
    else:
        name = [None]
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.broadcast_object_list(name, src=0)
        run = store.get(name[0])
    state = train_run(run, progress_bar=not args.quiet, console=True, dist=dist,
                      on_status=store.index)
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.destroy_process_group()
    if dist.is_main:
        print(f"run {run.name}: {state}", file=sys.stderr)
    return 0 if state in ("finished", "stopped") else 1


def _command_line() -> str:
    """How this process was started, for model cards (``python -m engine ...``)."""
    import shlex

    return "python -m engine " + " ".join(shlex.quote(a) for a in sys.argv[1:])


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import export_model

    weights, card = export_model(_store(args).get(args.name), args.out)
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {card}")
    return 0


def _parse_floats(text: str, flag: str) -> list[float]:
    try:
        return [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated numbers; got {text!r}") from None


def load_source(source: str, runs_dir: str | None):
    """A checkpoint file, or a run name (its best checkpoint). Returns (model, ckpt, out_dir)."""
    from engine.checkpoint import load_model

    path = Path(source)
    if path.suffix == ".pt" or path.is_file():
        model, ckpt = load_model(path)
        return model, ckpt, Path(f"eval-{path.stem}")
    run = _store(argparse.Namespace(runs_dir=runs_dir)).get(source)
    best = run.best_checkpoint if run.best_checkpoint.is_file() else run.last_checkpoint
    model, ckpt = load_model(best)
    return model, ckpt, run.path / "eval"


def cmd_evaluate(args: argparse.Namespace) -> int:
    from engine.checkpoint import check_classes
    from engine.config import DataConfig, config_from_dict, parse_setting
    from engine.data import load_split
    from engine.device import resolve_device
    from engine.evaluate import EvaluationError, evaluate_model, format_summary, write_report

    device = resolve_device(args.device)
    model, ckpt, out_dir = load_source(args.source, args.runs_dir)
    data_fields = dict(ckpt["run_config"].get("data", {}))
    for flag, key in (("dataset", "dataset"), ("data_root", "root"), ("test_size", "test_size")):
        if getattr(args, flag) is not None:
            data_fields[key] = getattr(args, flag)
    for item in args.set or []:
        _, key, value = parse_setting(item, "evaluate --set", sections=("data",))
        data_fields[key] = value
    data = load_split(config_from_dict(DataConfig, data_fields, section="data"), args.split)
    if data.num_classes != model.config.num_classes:
        raise EvaluationError(f"the model predicts {model.config.num_classes} classes but "
                              f"{data.name} has {data.num_classes}")
    check_classes(ckpt.get("classes"), data.classes, f"the model {args.source}",
                  force=args.allow_class_mismatch)
    xi_grid = _parse_floats(args.xi_grid, "--xi-grid") if args.xi_grid else None
    report = evaluate_model(model.to(device), data, device, xi_grid=xi_grid,
                            groups=args.metrics, faithfulness_images=args.faithfulness_images)
    report["source"] = str(args.source)
    paths = write_report(report, args.out or out_dir)
    print(format_summary(report))
    if "faithfulness" in report:
        for method, row in report["faithfulness"]["methods"].items():
            print(f"  {method:15s} " + "  ".join(f"{k} {v:.3f}" for k, v in row.items()))
    print("collect {:.1f}s, metrics {:.2f}s per ξ; wrote {}".format(
        report["timing"]["collect_s"], max(report["timing"]["metrics_s_per_xi"]),
        ", ".join(str(p) for p in paths)))
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    import torch

    from engine.device import resolve_device
    from engine.sweep import (
        DEFAULT_GRID,
        format_sweep,
        parse_grid,
        run_sweep,
        sweep_configs,
        sweep_job,
        sweep_report,
        write_manifest,
    )

    store = _store(args)
    if not args.report_only:
        grid = parse_grid(args.grid) if args.grid else DEFAULT_GRID
        configs = sweep_configs(build_run_config(args), grid, args.sweep_name)
        parallel = args.parallel
        if parallel == "auto":
            parallel = max(1, torch.cuda.device_count())
        elif not parallel.isdigit() or int(parallel) < 1:
            raise ValueError(f"--parallel must be a positive int or auto; got {parallel!r}")
        print(f"sweep {args.sweep_name}: {len(configs)} runs", file=sys.stderr)
        write_manifest(store, args.sweep_name, grid)
        # The sweep's own job, in the foreground too: the Sweep page sees it and can stop it.
        with sweep_job(store, args.sweep_name).attach(finish=True, kind="sweep",
                                                      cells=len(configs)):
            run_sweep(store, configs, int(parallel), progress_bar=not args.quiet,
                      log=lambda m: print(m, file=sys.stderr))
    report = sweep_report(store, args.sweep_name, resolve_device(args.device_eval))
    print(format_sweep(report))
    print(f"wrote {report['folder']}/report.json and report.csv", file=sys.stderr)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from engine import launch
    from engine.train import train_run

    store = _store(args)
    if args.background:
        run = launch.resume(store, args.name)
        print(f"resumed run {run.name} in the background")
        return 0
    run = store.get(args.name)
    state = train_run(run, resume=True, progress_bar=not args.quiet, console=True,
                      on_status=store.index)
    print(f"run {run.name}: {state}", file=sys.stderr)
    return 0 if state in ("finished", "stopped") else 1


def cmd_runs(args: argparse.Namespace) -> int:
    store = _store(args)
    if args.action == "list":
        rows = store.list()
        if not rows:
            print(f"no runs in {store.root}")
        for r in rows:
            best = "" if r["best_metric"] is None else f"{r['metric_name']} {r['best_metric']:.4f}"
            print(f"  {r['name']:48s} {r['state']:9s} {r['epochs_done']}/{r['epochs']} ep  "
                  f"{r['dataset']}/{r['backbone']}/{r['head']}  {best}")
        return 0
    if args.action == "reindex":
        print(f"indexed {store.rebuild_index()} runs in {store.root}")
        return 0
    if args.action == "show":
        run = store.get(args.name)
        print(json.dumps({"status": run.status(), "config": run.config_dict(),
                          "metrics": run.metrics()[-3:]}, indent=2))
    elif args.action == "stop":
        print("stop requested" if store.stop(args.name) else f"run {args.name} is not running")
    elif args.action == "delete":
        store.delete(args.name)
        print(f"deleted run {args.name}")
    return 0


# ----------------------------------------------------------------------------------------------
# benchmarks


def cmd_bench(args: argparse.Namespace) -> int:
    from engine.bench import (
        bench_isolated,
        bench_one,
        format_table,
        modes_for,
        parse_stride_plans,
        results_as_dicts,
    )
    from engine.config import ModelConfig
    from engine.device import resolve_device

    device = resolve_device(args.device)
    plans = parse_stride_plans(args.stride_plans) if args.stride_plans else [None]
    configs = [ModelConfig(backbone=b, head=h, num_classes=args.num_classes,
                           input_size=args.input_size, stride_plan=plan)
               for b, h in _model_list(args.models) for plan in plans]
    run = bench_one if args.no_isolate else bench_isolated
    results = []
    for cfg in configs:
        for mode in modes_for(device, args.compare_fp32, args.compile):
            result = run(cfg, mode, device, args.batch, args.steps, args.warmup)
            results.append(result)
            print(f"  measured {result.model} [{result.mode}]: {result.images_per_s:.1f} img/s",
                  file=sys.stderr, flush=True)
    print(format_table(results))
    if args.json:  # atomic: the Stride / time page polls this file
        from engine.fsutil import write_json_atomic

        write_json_atomic(Path(args.json), results_as_dicts(results))
    return 0


def cmd_bench_train(args: argparse.Namespace) -> int:
    from engine.bench import bench_training
    from engine.config import DataConfig, ModelConfig
    from engine.device import resolve_device

    result = bench_training(DataConfig(dataset=args.dataset, root=args.data_root),
                            ModelConfig(backbone=args.backbone, head=args.head),
                            resolve_device(args.device), args.batch, args.steps)
    return _report_bench(result, args.json, digits=1)


def cmd_bench_eval(args: argparse.Namespace) -> int:
    from engine.bench import bench_evaluation
    from engine.checkpoint import load_model
    from engine.config import DataConfig, config_from_dict
    from engine.data import load_split
    from engine.device import resolve_device

    device = resolve_device(args.device)
    model, ckpt = load_model(args.checkpoint)
    fields = {**ckpt["run_config"]["data"], "test_size": args.images}
    data = load_split(config_from_dict(DataConfig, fields), "test")  # generated / cached first
    result = bench_evaluation(model.to(device), data, device,
                              _parse_floats(args.xi_grid, "--xi-grid"))
    return _report_bench(result, args.json, digits=2)


def _report_bench(result: dict, json_path: str | None, digits: int) -> int:
    """One ``key value`` line per figure, and the figures as JSON when asked."""
    width = max(map(len, result)) + 2
    for key, value in result.items():
        shown = f"{value:.{digits}f}" if isinstance(value, float) else value
        print(f"{key:{width}s} {shown}")
    if json_path:
        from engine.fsutil import write_json_atomic

        write_json_atomic(Path(json_path), result)
    return 0


def cmd_mil(args: argparse.Namespace) -> int:
    """Cross-validate MIL methods on MIL data sets and write the results table (issue #6)."""
    import dataclasses

    from engine.mil.experiment import parse_datasets, parse_methods, run_experiment
    from engine.mil.protocol import MilConfig

    fields = {f.name for f in dataclasses.fields(MilConfig)} - {"method"}
    values = {k: getattr(args, k) for k in fields if getattr(args, k, None) is not None}
    if "hidden" in values:
        try:
            values["hidden"] = tuple(int(v) for v in values["hidden"].split(","))
        except ValueError:
            raise ValueError(f"--hidden must be comma-separated ints; got {args.hidden!r}"
                             ) from None
    methods = parse_methods(args.method)
    config = MilConfig(method=methods[0], **values)
    log = (lambda m: None) if args.quiet else (lambda m: print(m, file=sys.stderr, flush=True))
    run_experiment(parse_datasets(args.dataset), methods, config, args.out, args.data_root,
                   args.threads, log)
    print((Path(args.out) / "results.md").read_text())
    return 0


# ----------------------------------------------------------------------------------------------
# parser


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="RunConfig JSON file (sections model, data, loss, train)")
    for flag, (section, key, kind) in TRAIN_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                       help=f"{section}.{key}")
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="any other config field, e.g. --set model.stride_plan=[1,2,1,1]")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--download", action="store_true", help="download CIFAR/SVHN if missing")
    p.add_argument("--name", help="run name (default: made from data, model and time)")
    p.add_argument("--tag", action="append", help="tag the run (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m engine", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--debug", action="store_true",
                        help="show the traceback of an error (before the command)")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("models", help="list registered backbones and heads")
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("data", help="list data sets, or check that one loads")
    p.add_argument("action", choices=["list", "check"])
    p.add_argument("dataset", nargs="?")
    p.add_argument("--data-root")
    p.add_argument("--input-size", type=int)
    p.add_argument("--download", action="store_true")
    p.add_argument("--skip-unreadable", action="store_true",
                   help="count missing or unreadable images instead of failing on them")
    p.set_defaults(func=cmd_data)

    runs_dir = argparse.ArgumentParser(add_help=False)
    runs_dir.add_argument("--runs-dir", help="run store folder (default $LOSSATTN_RUNS or ./runs)")
    quiet = argparse.ArgumentParser(add_help=False)
    quiet.add_argument("--quiet", action="store_true", help="no progress bar")
    quiet.add_argument("--background", action="store_true",
                       help="train in a background process and return at once")

    p = sub.add_parser("train", parents=[runs_dir, quiet], help="create a run and train it")
    _add_train_flags(p)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sweep", parents=[runs_dir], help="train a grid of runs and tabulate")
    _add_train_flags(p)
    p.add_argument("--grid", action="append", metavar="SECTION.FIELD=V1,V2",
                   help="a grid axis (repeatable); default: loss.gamma_max=0,0.1 and "
                        "model.xi=0,0.1 (the paper's Table VI)")
    p.add_argument("--sweep-name", default="sweep", help="names and tags the runs")
    p.add_argument("--parallel", default="1",
                   help="processes at once (auto: one per visible GPU)")
    p.add_argument("--report-only", action="store_true", help="only (re)write the table")
    p.add_argument("--device-eval", default="auto", help="device for the report's evaluation")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_sweep)

    p = sub.add_parser("resume", parents=[runs_dir, quiet], help="continue a stopped run")
    p.add_argument("name")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("runs", help="list, show, stop or delete runs")
    p.set_defaults(func=cmd_runs, action="list", runs_dir=None)
    actions = p.add_subparsers(dest="action")
    for action, text in (("list", "table of runs"), ("reindex", "rebuild the SQLite index"),
                         ("show", "status, config and last metrics of a run"),
                         ("stop", "ask a running run to stop"), ("delete", "remove a run")):
        a = actions.add_parser(action, parents=[runs_dir], help=text)
        if action not in ("list", "reindex"):
            a.add_argument("name")

    p = sub.add_parser("evaluate", parents=[runs_dir],
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

    p = sub.add_parser("export", parents=[runs_dir],
                       help="write a run's best model as a small checkpoint + model card")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="output .pt path (the card goes beside it, .md)")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("mil", help="multiple-instance learning: repeated k-fold CV, results table")
    p.add_argument("--dataset", default="digit_bags",
                   help="all (the five benchmarks), or a comma list of musk1, musk2, fox, tiger, "
                        "elephant, digit_bags, a miproblems folder or a CSV file")
    p.add_argument("--method", default="loss_attention",
                   help="comma list of loss_attention, attention, gated_attention, mean, "
                        "tip_threshold")
    p.add_argument("--out", default="results/mil", help="results folder (merged into)")
    p.add_argument("--data-root", help="folder holding mil/<set>/ (default $LOSSATTN_DATA)")
    for flag, kind in (("folds", int), ("repeats", int), ("seed", int), ("epochs", int),
                       ("patience", int), ("lr", float), ("weight_decay", float),
                       ("dropout", float), ("lam", float), ("xi", float), ("hidden", str),
                       ("batch_bags", int), ("val_fraction", float), ("select", str),
                       ("parallel_folds", int)):
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, help="see engine.mil.MilConfig")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: up to 4)")
    p.add_argument("--quiet", action="store_true", help="no per-pair log lines")
    p.set_defaults(func=cmd_mil)

    p = sub.add_parser("bench", help="forward+backward images/s and peak memory per model")
    p.add_argument("--models", default=DEFAULT_BENCH_MODELS,
                   help=f"comma-separated BACKBONE/HEAD pairs (default {DEFAULT_BENCH_MODELS})")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--input-size", type=int, default=32)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--steps", type=int, default=5, help="timed steps (median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps before timing")
    p.add_argument("--device", default="auto")
    p.add_argument("--compile", action="store_true", help="also measure torch.compile")
    p.add_argument("--compare-fp32", action="store_true",
                   help="on CUDA, also measure plain fp32 eager in the same run")
    p.add_argument("--stride-plans", help="measure each model at these stride plans, e.g. "
                   "'1,2,1;2,2,1' (the backbone's per-stage strides)")
    p.add_argument("--json", help="also write the results to this JSON file")
    p.add_argument("--no-isolate", action="store_true",
                   help="measure every row in this process (faster; memory figures then include "
                        "heap left over from earlier rows)")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("bench-train", help="loader-only, model-only and full-step images/s")
    p.add_argument("--dataset", default="digits")
    p.add_argument("--data-root")
    p.add_argument("--backbone", default="small_cnn")
    p.add_argument("--head", default="loss_attention")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_train)

    p = sub.add_parser("bench-eval", help="seconds for patch metrics over N images at a ξ grid")
    p.add_argument("checkpoint", nargs="?", default=str(SHIPPED_CHECKPOINT))
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--xi-grid", default=",".join(f"{v / 10:g}" for v in range(11)))
    p.add_argument("--device", default="auto")
    p.add_argument("--json")
    p.set_defaults(func=cmd_bench_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. An expected error (a bad value, file, checkpoint or run: every engine
    error is a ValueError, and OSError) prints one line and returns 2; anything else prints one
    line and returns 1. Tracebacks only with ``--debug``. A process started as a background job
    (:mod:`engine.jobs`) records in its job folder how it ended."""
    from engine import jobs

    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    args = build_parser().parse_args([a for a in argv if a != "--debug"])
    for name in ("batch", "steps", "input_size", "num_classes"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            print(f"error: --{name.replace('_', '-')} must be >= 1", file=sys.stderr)
            return 2
    job = jobs.spawned_job()
    try:
        with job.attach() if job else contextlib.nullcontext():
            code = args.func(args)
            if job:
                job.complete(code)
            return code
    except jobs.JobStopped as exc:
        print(f"stopped: {exc}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:  # expected: a message a person can act on
        if debug:
            raise
        print(f"error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except Exception as exc:  # unforeseen: still one line, and a way to see more
        if debug:
            raise
        print(f"error: unexpected {exc.__class__.__name__}: {_one_line(exc)} (run with --debug "
              "for the traceback)", file=sys.stderr)
        return 1


def _one_line(exc: BaseException) -> str:
    text = str(exc) or exc.__class__.__name__
    if isinstance(exc, OSError) and exc.strerror:
        text = f"{exc.strerror}: {exc.filename}" if exc.filename else exc.strerror
    return " ".join(text.split())


if __name__ == "__main__":
    sys.exit(main())
