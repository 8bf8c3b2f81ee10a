"""Export a run's best model as a small self-contained checkpoint with a model card."""

from __future__ import annotations

from pathlib import Path

from engine.checkpoint import FORMAT, VERSION, atomic_torch_save, load_checkpoint, peer_state
from engine.metric_table import metrics_of
from engine.runs import Run


def _count(value) -> str:
    return f"{value:,}" if isinstance(value, int) else "?"


EXPLANATION_KEYS = ("accuracy", "precision_paper", "recall_paper", "f_paper", "precision",
                    "recall", "f", "gt_known_loc", "top1_loc", "patches_per_image")
"""The evaluation's columns that a card shows: how well the selected patches explain (and the
accuracy of the weights as written, which for a half-precision file are not the trained ones)."""


def explanation_metrics(path: Path, data_config) -> dict | None:
    """Patch precision / recall / F (both definitions, METHOD.md) and localization of the
    checkpoint at ``path`` on its test set at its own ξ; None where the data has no boxes or
    the model no patches."""
    import torch

    from engine.checkpoint import load_model
    from engine.data import load_split
    from engine.evaluate import evaluate_model

    model, _ = load_model(path)
    if not model.head.has_patches:
        return None
    data = load_split(data_config, "test")
    if not data.has_boxes:
        return None
    report = evaluate_model(model.eval(), data, torch.device("cpu"),
                            groups=["image", "patch", "localization"], pr_curves=False)
    row = report["by_xi"][0]
    found = {k: v for group in row.values() if isinstance(group, dict) for k, v in group.items()}
    return {"xi": row["xi"], "images": len(data),
            **{k: found[k] for k in EXPLANATION_KEYS if k in found}}


def explanation_section(explanation: dict) -> list[str]:
    """The card's lines for :func:`explanation_metrics`."""
    heading = (f"Explanation quality on the {explanation['images']:,} test images at "
               f"ξ = {explanation['xi']:g} (`python -m engine evaluate`; *paper*: the released "
               "code's definitions, METHOD.md):")
    return [heading, "", "| metric | value |", "|---|---|",
            *[f"| {key} | {explanation[key]:.4f} |" for key in EXPLANATION_KEYS
              if key in explanation]]


def _ramp_words(ramp_epochs: int) -> str:
    """How the patch loss reached γmax: a ramp of 0 epochs is full weight from the first step
    ("ramped over 0 epochs" read to a student as a ramp that never ended)."""
    if ramp_epochs == 0:
        return "at full weight from the first step (no ramp-up)"
    return f"ramped over {ramp_epochs} epochs"


def model_card(run: Run, metrics: dict, size_bytes: int, params: int, peer: int = 0,
               explanation: dict | None = None, half: bool = False,
               title: str | None = None) -> str:
    cfg, progress = run.config(), run.status().fields
    transfer = cfg.transfer
    data, model, loss, train = cfg.data, cfg.models[peer], cfg.loss, cfg.train
    minutes = progress.get("duration_s", 0.0) / 60
    lines = [
        f"# {title or run.name}" + (f", peer {peer}" if transfer else ""),
        "",
        (f"- **Model**: `{model.backbone}` backbone + `{model.head}` head, {params:,} parameters "
        f"({size_bytes / 1e6:.2f} MB on disk), input {model.input_size[0]}x{model.input_size[1]}, "
        f"{model.num_classes} classes; patches {model.patch_kernel}x{model.patch_kernel} / stride "
        f"{model.patch_stride}; ξ = {model.xi} (denominator {model.xi_denominator})."
        + (" Stored in half precision (float16): loading decodes it exactly, to float32 "
           "weights equal to these values." if half else "")),
        (f"- **Data**: `{data.dataset}`, {_count(progress.get('train_images'))} train / "
        f"{_count(progress.get('test_images'))} test images (seed {data.seed}), augmentation "
        f"{'on' if data.augment else 'off'}."),
        f"- **Training**: {train.epochs} epochs, batch {train.batch_size}, recipe {train.recipe} "
        f"(lr {train.lr}, weight decay {train.weight_decay}), γmax = {loss.gamma_max} "
        f"{_ramp_words(loss.ramp_epochs)}, seed {train.seed}; {minutes:.1f} min of training on "
        f"{progress.get('device', '?')}"
        + (f" ({progress['cpu_threads']} thread{'s' if progress['cpu_threads'] != 1 else ''})"
           if progress.get("device") == "cpu" and progress.get("cpu_threads") else "") + ".",
        (f"- **Selected checkpoint**: epoch {(metrics.get('epoch') or 0) + 1} of {train.epochs} "
        "(best test metric, as the paper selects" + (", the peers' mean)." if transfer else ").")),
        "",
        "| metric | value |",
        "|---|---|",
    ]
    if transfer:
        others = ", ".join(f"{m.backbone}/{m.head}" for i, m in enumerate(cfg.models)
                           if i != peer)
        lines.insert(-4, f"- **Mutual transfer**: trained together with {others}; λ = "
                     f"{transfer.lam}, {transfer.grid}x{transfer.grid} regions, maps from "
                     f"`{transfer.map_source}` (docs/mutual_transfer.md). Metrics are this "
                     "peer's own.")
    for metric in metrics_of("epoch"):
        if metric.key in metrics and metric.key != "lr":
            lines.append(f"| {metric.key} ({metric.label}) | {metrics[metric.key]:.4f} |")
    if half:
        lines += ["", ("The table above was measured in training, before the weights were "
                       "rounded to float16; the one below measures the weights as stored.")]
    if explanation:
        lines += ["", *explanation_section(explanation)]
    command = progress.get("command")
    if command:
        how = "export NAME --half --out FILE.pt" if half else "export NAME --out FILE.pt"
        lines += ["", f"Reproduce (then `python -m engine {how}`):", "",
                  "```bash", command, "```"]
    return "\n".join(lines) + "\n"


def export_model(run: Run, out: str | Path, peer: int | None = None, evaluate: bool = True,
                 half: bool = False, title: str | None = None) -> tuple[Path, Path]:
    """Write ``out`` (.pt, weights + config + metrics, no optimizer) and its ``.md`` card. For a
    mutual-transfer run, ``peer`` (default 0) says which peer, exported as itself. With
    ``evaluate``, the card also reports :func:`explanation_metrics`. ``half``: floating-point
    tensors stored as float16 (half the size; a model loads them into float32 exactly, so what
    the card measures is what any later load computes). ``title``: the card's heading (by
    default the file's stem: the name the app's model picker shows, so that a model has one
    name on the card and in the app, whatever its run was called)."""
    from engine.errors import RunError

    out = Path(out)
    peers = len(run.config().models)
    if peer is not None and not 0 <= peer < peers:
        raise RunError(f"--peer must be in 0..{peers - 1} for run {run.name}; got {peer}")
    source = run.peer_checkpoint(peer or 0) if peers > 1 else run.best_checkpoint
    ckpt = load_checkpoint(source)  # a single model, or one peer alone: peer 0 of its file
    state = peer_state(ckpt, 0, source)
    # A team of one in the checkpoint layout, whatever the layout of the file it came from.
    slim = {"format": FORMAT, "version": VERSION, "run_config": ckpt["run_config"],
            "peers": [{"model": {k: v.half() if half and v.is_floating_point() else v
                                 for k, v in state.items()}}],
            **{key: ckpt[key] for key in ("metrics", "classes") if key in ckpt}}
    if half:
        slim["stored_dtype"] = "float16"
    atomic_torch_save(slim, out)
    params = sum(v.numel() for k, v in state.items()
                 if not k.endswith(("running_mean", "running_var", "num_batches_tracked")))
    explanation = (explanation_metrics(out, run.config().data)
                   if evaluate and peers == 1 else None)
    card = out.with_suffix(".md")
    card.write_text(model_card(run, ckpt.get("metrics", {}), out.stat().st_size, params,
                               peer or 0, explanation, half, title or out.stem))
    return out, card
