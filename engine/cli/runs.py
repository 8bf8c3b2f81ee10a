"""``train``, ``resume``, ``runs`` and ``export``: one run's life, from the command line."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from engine.cli.common import command_line, quiet_parent, runs_dir_parent, store_of
from engine.presets import describe_presets, preset_names

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
    "micro_batches": ("train", "micro_batches", int), "threads": ("train", "threads", int),
}
SWITCHES = {"compile": ("train", "compile", True), "no_amp": ("train", "amp", False),
            "download": ("data", "download", True)}


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """The flags that make a RunConfig (train and sweep share them)."""
    p.add_argument("--config", help="RunConfig JSON file (sections model, data, loss, train)")
    p.add_argument("--preset", choices=[*preset_names(), "none"], default=None,
                   help="fill the fields not given by the file, the flags or --set from a "
                        "named preset: " + "; ".join(describe_presets())
                        + "; none: no preset, not even the data set's default (the fields "
                        "keep their RunConfig defaults)")
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


def register(sub) -> None:
    runs_dir, quiet = runs_dir_parent(), quiet_parent()
    p = sub.add_parser("train", parents=[runs_dir, quiet], help="create a run and train it")
    add_config_flags(p)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("resume", parents=[runs_dir, quiet], help="continue a stopped run")
    p.add_argument("name")
    p.set_defaults(func=cmd_resume)

    p = sub.add_parser("runs", parents=[runs_dir], help="list, show, stop or delete runs")
    p.set_defaults(func=cmd_runs)
    actions = p.add_subparsers(dest="action")
    nested = runs_dir_parent(nested=True)
    for action, text in (("list", "table of runs"), ("reindex", "rebuild the SQLite index"),
                         ("show", "status, config and last metrics of a run"),
                         ("stop", "ask a running run to stop"), ("delete", "remove a run")):
        a = actions.add_parser(action, parents=[nested], help=text)
        if action not in ("list", "reindex"):
            a.add_argument("name")

    p = sub.add_parser("export", parents=[runs_dir],
                       help="write a run's best model as a small checkpoint + model card")
    p.add_argument("name")
    p.add_argument("--out", required=True, help="output .pt path (the card goes beside it, .md)")
    p.add_argument("--peer", type=int, help="mutual-transfer runs: which peer (default 0)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="do not measure patch precision / recall / F and localization on the "
                   "test set for the card (they are measured by default where the data has "
                   "boxes)")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the size; loading decodes them "
                        "exactly, and the card measures the stored weights)")
    p.set_defaults(func=cmd_export)


def run_config_data(args: argparse.Namespace) -> dict:
    """The RunConfig's JSON, not yet validated: an optional JSON file, then the flags, then
    ``--set`` overrides (commands that add to it, such as ``transfer``, validate it after).
    ``--preset`` only names the preset here: :func:`validated_run_config` fills its fields."""
    from engine.config import parse_setting

    data: dict = read_config_file(args.config) if args.config else {}

    def section_of(name: str) -> dict:
        if not isinstance(data.get(name), dict):  # absent, or "transfer": null
            data[name] = {}
        return data[name]

    for flag, (section, key, _) in TRAIN_FLAGS.items():
        if getattr(args, flag) is not None:
            section_of(section)[key] = getattr(args, flag)
    for flag, (section, key, value) in SWITCHES.items():
        if getattr(args, flag):
            section_of(section)[key] = value
    for item in args.set or []:
        section, key, value = parse_setting(item, "--set")
        section_of(section)[key] = value
    if args.preset:
        data["preset"] = None if args.preset == "none" else args.preset
    if args.name:
        data["name"] = args.name
    if args.tag:
        data["tags"] = list(data.get("tags") or []) + args.tag
    return data


def validated_run_config(data: dict, args: argparse.Namespace):
    """``data`` with its preset's fields filled in where it does not give them, as a RunConfig;
    an error says that it came from the file and the flags."""
    from engine.config import ConfigError, RunConfig, config_from_dict
    from engine.preset_fill import fill_preset

    try:
        return config_from_dict(RunConfig, fill_preset(data))
    except ConfigError as exc:
        raise ConfigError(f"{exc}" + (f" (config file {args.config}, then the flags)"
                                      if args.config else "")) from None


def build_run_config(args: argparse.Namespace):
    """RunConfig from an optional JSON file, then the flags, then ``--set`` overrides."""
    return validated_run_config(run_config_data(args), args)


def read_config_file(path: str) -> dict:
    from engine.config import SECTIONS, ConfigError
    from engine.safe_io import JSON_CAP, read_text

    try:
        data = json.loads(read_text(path, JSON_CAP, "a config file"))
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror or exc}") from exc
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"config file {path} is not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a JSON object; it holds a "
                          f"{type(data).__name__}")
    for section in SECTIONS:
        if section in data and not isinstance(data[section], dict) and not (
                section == "transfer" and data[section] is None):
            raise ConfigError(f"config file {path}: section {section!r} must be a JSON object; "
                              f"got {data[section]!r:.60}")
    return data


def cmd_train(args: argparse.Namespace) -> int:
    from engine import launch
    from engine.runs import Run, RunStore
    from engine.train import train_run

    if args.run_dir:  # an existing run directory (how engine.launch starts the trainer)
        run = Run(Path(args.run_dir))
        state = train_run(run, resume=args.resume, progress_bar=not args.quiet,
                          on_status=RunStore(run.path.parent).index, spawned=True)
        return 0 if state in ("finished", "stopped") else 1
    config = build_run_config(args)
    store = store_of(args)
    if args.background:
        run = launch.launch(store, config)
        print(_background_line(run, "started"))
        return 0
    return _train_here(store, config, args.quiet)


def _background_line(run, verb: str) -> str:
    """What a background start says: started, or queued behind the store's busy slots."""
    from engine.jobs import queue_place
    from engine.slots import job_limit

    place = queue_place(run.path)
    if place is None:
        return f"{verb} run {run.name} in the background: {run.path}"
    return (f"queued run {run.name} (place {place[0]} of {place[1]}): {job_limit()} job(s) "
            f"already compute under {run.path.parent} ($LOSSATTN_MAX_JOBS); it starts when "
            "one ends")


def _train_here(store, config, quiet: bool) -> int:
    """Train in this process, on every rank when started by torchrun."""
    from engine.train import init_distributed, prepare_run_config, train_run

    dist = init_distributed()
    name = [None]
    if dist.is_main:
        run = store.create(prepare_run_config(config))
        run.update_status(command=command_line())
        print(f"run {run.name}: {run.path}", file=sys.stderr)
        name = [run.name]
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.broadcast_object_list(name, src=0)
        run = store.get(name[0])
    state = train_run(run, progress_bar=not quiet, console=True, dist=dist,
                      on_status=store.index)
    _leave_group(dist)
    if dist.is_main:
        print(f"run {run.name}: {state}", file=sys.stderr)
    return 0 if state in ("finished", "stopped") else 1


def cmd_resume(args: argparse.Namespace) -> int:
    from engine import launch
    from engine.train import init_distributed, train_run

    store = store_of(args)
    if args.background:
        run = launch.resume(store, args.name)
        print(_background_line(run, "resumed"))
        return 0
    dist = init_distributed()  # torchrun: every rank resumes the run from the shared store
    run = store.get(args.name)
    state = train_run(run, resume=True, progress_bar=not args.quiet, console=True, dist=dist,
                      on_status=store.index)
    _leave_group(dist)
    if dist.is_main:
        print(f"run {run.name}: {state}", file=sys.stderr)
    return 0 if state in ("finished", "stopped") else 1


def _leave_group(dist) -> None:
    if dist.world > 1:
        import torch.distributed as tdist

        tdist.destroy_process_group()


def cmd_runs(args: argparse.Namespace) -> int:
    store = store_of(args)
    if args.action in (None, "list"):  # `runs` alone lists (argparse leaves None)
        from engine.jobs import dispatch, queue_place

        dispatch(store.root)  # a look starts what the queue holds for slots a killed job left
        rows = store.list()
        if not rows:
            print(f"no runs in {store.root}")
        for r in rows:
            best = "" if r["best_metric"] is None else f"{r['metric_name']} {r['best_metric']:.4f}"
            place = queue_place(store.root / r["name"]) if r["state"] == "queued" else None
            where = f"  (place {place[0]} of {place[1]} in the queue)" if place else ""
            print(f"  {r['name']:48s} {r['state']:9s} {r['epochs_done']}/{r['epochs']} ep  "
                  f"{r['dataset']}/{r['backbone']}/{r['head']}  {best}{where}")
    elif args.action == "reindex":
        print(f"indexed {store.rebuild_index()} runs in {store.root}")
    elif args.action == "show":
        run = store.get(args.name)
        print(json.dumps({"status": run.status(), "config": run.config_dict(),
                          "metrics": run.metrics()[-3:]}, indent=2))
    elif args.action == "stop":
        print("stop requested" if store.stop(args.name) else f"run {args.name} is not running")
    elif args.action == "delete":
        store.delete(args.name)
        print(f"deleted run {args.name}")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from engine.export import export_model

    weights, card = export_model(store_of(args).get(args.name), args.out, args.peer,
                                 evaluate=args.evaluate, half=args.half)
    print(f"wrote {weights} ({weights.stat().st_size / 1e6:.2f} MB) and {card}")
    return 0
