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
    from engine.config import DataConfig, config_from_dict
    from engine.errors import EvaluationError
    from engine.explain_image import explain_file
    from engine.runs import load_model_source

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
