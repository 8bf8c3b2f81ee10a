"""``train``, ``resume``, ``runs`` and ``export``: one run's life, from the command line."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from pathlib import Path

from engine.cli.common import add_command, command_line, quiet_parent, runs_dir_parent, store_of
from engine.cli.estimate import say_if_long
from engine.cli.formatting import Deferred
from engine.job_status import State
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


def add_config_flags(p: argparse.ArgumentParser, own_preset: str = "auto") -> None:
    """The flags that make a RunConfig (train, sweep and transfer share them). A field's flag
    help is its docstring in engine.config, its choices and its default per preset
    (:mod:`engine.cli.fieldhelp`), made when help is shown. ``own_preset``: the preset a run
    of this command gets when it names none (auto: its data set's own)."""
    from engine.cli.fieldhelp import field_help

    def help_of(section: str, key: str) -> Deferred:
        return Deferred(functools.partial(field_help, section, key, own_preset))

    p.add_argument("--config", metavar="FILE",
                   help="a RunConfig JSON file (sections model, data, loss, train, transfer); "
                        "the flags and --set change it (default: none, every field its default)")
    p.add_argument("--preset", choices=[*preset_names(), "none"], default=None,
                   help="fill the fields that the file, the flags and --set leave out from a "
                        "named preset: " + "; ".join(describe_presets())
                        + "; none: no preset, not even the data set's own (the fields keep "
                        "their RunConfig defaults). Default: " + (
                            "the data set's own (the digits: live; the paper's data sets: none)"
                            if own_preset == "auto" else own_preset))
    for flag, (section, key, kind) in TRAIN_FLAGS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", type=kind, default=None,
                       metavar=METAVARS.get(flag) or METAVARS.get(kind, "NAME"),
                       help=help_of(section, key))
    p.add_argument("--set", action="append", metavar="SECTION.FIELD=VALUE",
                   help="any other config field, as JSON where it parses (repeatable), e.g. "
                        "--set model.stride_plan=[1,2,1,1] --set data.augment=false")
    p.add_argument("--compile", action="store_true", help=help_of("train", "compile"))
    p.add_argument("--no-amp", action="store_true", help=Deferred(
        lambda: "turn train.amp off: " + field_help("train", "amp", own_preset)))
    p.add_argument("--download", action="store_true", help=help_of("data", "download"))
    p.add_argument("--name", help="the run's name: 1-80 letters, digits, '.', '_' or '-' "
                                  "(default: made from the data, the model and the time)")
    p.add_argument("--tag", action="append",
                   help="tag the run (repeatable; default: no tags)")


METAVARS = {int: "N", float: "X", "data_root": "DIR", "device": "DEVICE"}
"""A flag's placeholder in the usage line: by its name, else by its type."""


def register(sub) -> None:
    runs_dir, quiet = runs_dir_parent(), quiet_parent()
    p = add_command(
        sub, "train", parents=[runs_dir, quiet],
        description="Create a run and train it, here with a progress bar or with --background "
                    "in a process of its own; torchrun starts it on several GPUs. With no "
                    "flags it trains the app's default: the embedded digits, the small CNN "
                    "with the Loss-Attention head and the live preset (2 epochs, about a "
                    "minute on a laptop CPU). The paper's ResNet18 and 200-epoch schedule "
                    "come with --preset paper (hours on a CPU: a run estimated at over 10 "
                    "minutes says so before it starts). What you give (a --config file, then "
                    "the flags, then --set) wins over the preset, which wins over the "
                    "RunConfig defaults.",
        examples=["train --name first",
                  "train --name cifar --preset paper --dataset cifar10 --download",
                  "train --config run.json --set model.xi=0.5 --background",
                  "train --name mine --epochs 5 --gamma-max 0.1 --xi 0.2"])
    add_config_flags(p)
    p.add_argument("--run-dir", help=argparse.SUPPRESS)
    p.add_argument("--resume", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=cmd_train)

    p = add_command(
        sub, "resume", parents=[runs_dir, quiet],
        description="Continue a stopped or killed run from its last checkpoint (last.pt, "
                    "written every epoch and every train.checkpoint_minutes), with the "
                    "config it was created with.",
        examples=["resume first", "resume first --background"])
    p.add_argument("name", help="the run's name (python -m engine runs lists them)")
    p.set_defaults(func=cmd_resume)
    _register_runs(sub, runs_dir)
    _register_export(sub, runs_dir)


def _register_runs(sub, runs_dir) -> None:
    p = add_command(
        sub, "runs", parents=[runs_dir],
        description="The run store: one folder per run (config, metrics, status, log, "
                    "checkpoints) and an SQLite index of them. Without an action it lists "
                    "the runs.",
        examples=["runs", "runs show first", "runs stop first", "runs delete first",
                  "runs reindex"])
    p.set_defaults(func=cmd_runs)
    actions = p.add_subparsers(dest="action", title="actions", metavar="ACTION",
                               help="default: list")
    nested = runs_dir_parent(nested=True)
    for action, text in (("list", "table of runs"), ("reindex", "rebuild the SQLite index"),
                         ("show", "status, config and last metrics of a run"),
                         ("stop", "ask a running run to stop"), ("delete", "remove a run")):
        a = actions.add_parser(action, parents=[nested], help=text, description=text)
        if action not in ("list", "reindex"):
            a.add_argument("name", help="the run's name")


def _register_export(sub, runs_dir) -> None:
    p = add_command(
        sub, "export", parents=[runs_dir],
        description="Write a run's best model as a small checkpoint that rebuilds it alone, "
                    "with a model card beside it (.md: config, measured metrics, how to "
                    "reproduce it). The app, evaluate and explain take such a file.",
        examples=["export first --out first.pt", "export first --out first.pt --half"])
    p.add_argument("name", help="the run's name")
    p.add_argument("--out", required=True, metavar="FILE",
                   help="output .pt path (the card goes beside it, .md)")
    p.add_argument("--peer", type=int, metavar="N",
                   help="mutual-transfer runs: which peer (default: 0, the run's model)")
    p.add_argument("--no-evaluate", dest="evaluate", action="store_false",
                   help="do not measure patch precision / recall / F and localization on the "
                   "test set for the card (default: measured where the data has boxes)")
    p.add_argument("--half", action="store_true",
                   help="store the weights as float16 (half the size; loading decodes them "
                        "exactly, and the card measures the stored weights; default: float32)")
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
        return 0 if state in (State.FINISHED, State.STOPPED) else 1
    config = build_run_config(args)
    store = store_of(args)
    if args.background:
        from engine.train import prepare_run_config

        say_if_long(prepare_run_config(config), store, _say)  # said before it competes for CPU
        run = launch.launch(store, config)
        print(_background_line(run, "started"))
        return 0
    return _train_here(store, config, args.quiet)


def _say(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


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
        print(f"run {run.name}: {run.path}", file=sys.stderr, flush=True)
        if dist.world == 1:  # torchrun's ranks would wait on rank 0's timing
            say_if_long(run.config(), store, _say)
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
    return 0 if state in (State.FINISHED, State.STOPPED) else 1


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
    return 0 if state in (State.FINISHED, State.STOPPED) else 1


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
            place = queue_place(store.root / r["name"]) if r["state"] == State.QUEUED else None
            where = f"  (place {place[0]} of {place[1]} in the queue)" if place else ""
            print(f"  {r['name']:48s} {r['state']:9s} {r['epochs_done']}/{r['epochs']} ep  "
                  f"{r['dataset']}/{r['backbone']}/{r['head']}  {best}{where}")
    elif args.action == "reindex":
        print(f"indexed {store.rebuild_index()} runs in {store.root}")
    elif args.action == "show":
        run = store.get(args.name)
        print(json.dumps({"status": run.status().to_dict(), "config": run.config_dict(),
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
