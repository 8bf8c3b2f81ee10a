"""``explain``: a model's explanation of image files, as files (what the Patch Explorer shows).

  python -m engine explain CHECKPOINT IMAGE... [--xi X] [--method M ...] [--class C] [--out DIR]

Each image is read exactly as the app reads an upload (EXIF orientation, any mode, the model's
resize policy, :func:`engine.inputs.image_from_bytes`). Per image, in ``DIR``:
``NAME-loss_attention.png`` (the Explorer's picture: weights on the fixed √α scale, removed
patches greyed, numbers, the kept-patch box), ``NAME-weights.csv`` (one row per patch),
``NAME-METHOD.png`` for each Grad-CAM family method asked for, and ``NAME.json`` (the prediction,
the kept patches, Eq. 5's breakdown and the files written).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from engine.cli.common import add_command, runs_dir_parent

CAMS = ("gradcam", "gradcam++", "scorecam")


DEFAULT_OUT = "explained"


def register(sub) -> None:
    p = add_command(
        sub, "explain", parents=[runs_dir_parent()],
        description="A model's explanation of image files, as the Patch Explorer shows it: "
                    "per image NAME-loss_attention.png (the patch weights over the image, "
                    "removed patches greyed), NAME-weights.csv (one row per patch), "
                    "NAME-METHOD.png for each Grad-CAM method asked for, and NAME.json (the "
                    "prediction, the kept patches, Eq. 5's breakdown). Any image format, size "
                    "and mode, read as the app reads an upload.",
        examples=["explain first photo.jpg",
                  "explain checkpoints/digits_small_cnn_la.pt scan.png --xi 0.2 --out shown/",
                  "explain first img.png --method all --class 7"])
    p.add_argument("source", help="a checkpoint .pt file, or a run name (its best checkpoint)")
    p.add_argument("images", nargs="+", help="image files (any format, size and mode)")
    p.add_argument("--xi", type=float, metavar="X",
                   help="threshold ξ in [0, 1] (default: the model's)")
    p.add_argument("--method", action="append", choices=["loss_attention", *CAMS, "all"],
                   help="repeatable (default: loss_attention; the Grad-CAM family needs "
                   "gradients: slower, Score-CAM most)")
    p.add_argument("--class", dest="klass", metavar="CLASS",
                   help="explain this class, one of the model's class names (default: the "
                   "predicted one)")
    p.add_argument("--out", default=DEFAULT_OUT, metavar="DIR",
                   help=f"output folder, created (default: ./{DEFAULT_OUT}/)")
    p.set_defaults(func=cmd_explain)


def _methods(asked: list[str] | None) -> list[str]:
    asked = asked or ["loss_attention"]
    return ["loss_attention", *CAMS] if "all" in asked else list(dict.fromkeys(asked))


def cmd_explain(args: argparse.Namespace) -> int:
    from engine.checkpoint import load_model_source
    from engine.config import DataConfig, config_from_dict
    from engine.errors import EvaluationError

    model, ckpt, _ = load_model_source(args.source, args.runs_dir)
    model.eval()
    if not model.head.has_patches:
        raise EvaluationError(f"the model's head {model.config.head!r} has no patches to "
                              "explain")
    if args.xi is not None and not 0.0 <= args.xi <= 1.0:
        raise EvaluationError(f"--xi must lie in [0, 1]; got {args.xi}")
    classes = list(ckpt.get("classes") or [str(k) for k in range(model.config.num_classes)])
    if args.klass is not None and args.klass not in classes:
        raise EvaluationError(f"--class {args.klass!r} is not one of the model's classes "
                              f"{classes[:10]}{'...' if len(classes) > 10 else ''}")
    data_config = config_from_dict(DataConfig, ckpt["run_config"]["data"])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        report = explain_file(model, classes, data_config, Path(path), out, args.xi,
                              _methods(args.method), args.klass)
        print(f"{path}: {report['predicted']} ({report['probability']:.1%}), "
              f"{report['patches_kept']} of {report['patches']} patches kept at "
              f"ξ = {report['xi']:g}; wrote {', '.join(report['files'])}")
    return 0


def explain_file(model, classes: list[str], data_config, path: Path, out: Path,
                 xi: float | None, methods: list[str], klass: str | None) -> dict:
    """Read one image as the app does, explain it, write its files; returns the JSON report."""
    import torch

    from engine.data.base import ImageSet
    from engine.data.registry import dataset_spec
    from engine.explore import decode, image_story, patch_rows, prediction_breakdown
    from engine.explore import single_image_cache as cache_of
    from engine.fsutil import atomic_write, csv_text, write_json_atomic
    from engine.inputs import MAX_BYTES, image_from_bytes
    from engine.safe_io import read_bytes

    if not path.is_file():
        raise FileNotFoundError(f"image {path} does not exist")
    pixels = image_from_bytes(read_bytes(path, MAX_BYTES, "an image"),
                              tuple(model.config.input_size), path.name,
                              data_config.resize)
    spec = dataset_spec(data_config.dataset)
    data = ImageSet(spec.name, "explain", pixels[None], torch.zeros(1, dtype=torch.long),
                    classes, spec.multilabel, spec.mean, spec.std)
    xi = model.config.xi if xi is None else xi
    decoded = decode(model, cache_of(model, pixels, data), xi)
    predicted = int(decoded.logits[0].argmax())
    target = predicted if klass is None else classes.index(klass)
    story = image_story(model, decoded, 0, target, spec.multilabel)
    stem = path.stem
    files = _write_pictures(model, story, data, pixels, out, stem, methods, target, xi)
    rows = csv_text(patch_rows(story, classes, target)).encode()
    atomic_write(out / f"{stem}-weights.csv", lambda fh: fh.write(rows), durable=False)
    files.append(f"{stem}-weights.csv")
    breakdown = prediction_breakdown(decoded, 0, spec.multilabel)
    order = story.probabilities.argsort(descending=True)[:5].tolist()
    report = {
        "image": str(path), "model": {"backbone": model.config.backbone,
                                      "head": model.config.head},
        "xi": xi, "predicted": classes[predicted], "explained_class": classes[target],
        "probability": float(story.probabilities[predicted]),
        "top": {classes[k]: float(story.probabilities[k]) for k in order},
        "patches": story.grid.num_patches, "patches_kept": int(story.selected.sum()),
        "kept_patches": story.selected.nonzero().flatten().tolist(),
        "kept_box": story.selection_box,
        "eq5": {"exact": breakdown.exact, "patches": breakdown.patches,
                "weights": breakdown.weights,
                "classes": [classes[k] for k in breakdown.classes], "logits": breakdown.logits,
                "rest": breakdown.rest, "z": breakdown.z},
        "files": [*files, f"{stem}.json"],
    }
    write_json_atomic(out / f"{stem}.json", report, durable=False)
    return report


def _write_pictures(model, story, data, pixels, out: Path, stem: str, methods: list[str],
                    target: int, xi: float) -> list[str]:
    import torch

    from engine.data.base import model_input
    from engine.explain import explanation_maps
    from engine.explore import story_picture
    from engine.fsutil import atomic_write
    from engine.pictures import map_overlay, png_bytes, to_hwc

    image = to_hwc(pixels)
    written = []
    for method in methods:
        if method == "loss_attention":
            picture = story_picture(story, image)
        else:
            x = model_input(data, pixels[None], next(model.parameters()).device)
            heat = explanation_maps(model, x, torch.tensor([target]), method, xi)[0]
            picture = map_overlay(image, heat.detach().cpu().numpy())
        encoded = png_bytes(picture)
        atomic_write(out / f"{stem}-{method}.png", lambda fh, b=encoded: fh.write(b),
                     durable=False)
        written.append(f"{stem}-{method}.png")
    return written
