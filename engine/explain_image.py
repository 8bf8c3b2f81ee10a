"""Explaining one image file as the Patch Explorer would: read it as the app reads an upload,
decode it at ξ, and write the overlay PNG per method, the per-patch weights CSV and a JSON
report (the prediction, the kept patches, Eq. 5's numbers). ``python -m engine explain`` and
``engine.gpu_check`` use it; it lives in the engine so that neither reaches into the CLI."""

from __future__ import annotations

from pathlib import Path


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
