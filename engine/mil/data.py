"""Multiple-instance data: the classic benchmarks (MUSK1/2, FOX, TIGER, ELEPHANT) and digit bags.

A :class:`MilDataset` keeps all instances of all bags in one matrix, grouped by bag, with
``offsets`` marking where each bag starts (the CSR layout). Models run on the flat instance matrix
and a bag index per instance, so a 1,044-instance MUSK2 bag costs no padding.

Sources:

- the miproblems layout (``X.mat``, ``Bag2.mat``, ``BagI.mat``; ../shared/data/mil/README.md);
- a CSV file: one row per instance, feature columns, then bag id, then bag label (0/1);
- ``digit_bags``: the MNIST-bags protocol of Ilse et al. (2018) on scikit-learn's 8x8 digits,
  generated offline; a bag is positive iff it holds the target digit.

Data folders: an explicit root, else ``$LOSSATTN_DATA``; the set is looked up as
``<root>/<name>/``, ``<root>/mil/<name>/``, ``<root>/<name>.csv`` or ``<root>/mil/<name>.csv``.
Bad files raise :class:`MilDataError` naming the file and the problem.
"""

from __future__ import annotations

import csv
import functools
import io
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from engine.errors import FileRefused, MilDataError
from engine.roots import check_inside_roots, open_data, read_data_bytes
from engine.safe_io import MAT_CAP, TABLE_CAP

BENCHMARKS = ("musk1", "musk2", "fox", "tiger", "elephant")
EMBEDDED = "digit_bags"
MAT_FILES = (("X.mat", "X"), ("Bag2.mat", "Bag2"), ("BagI.mat", "bagI"))

# (bags, instances, features) of the benchmark files, from ../shared/data/mil/README.md
EXPECTED_COUNTS = {
    "musk1": (92, 476, 166), "musk2": (102, 6598, 166), "fox": (200, 1320, 230),
    "tiger": (200, 1220, 230), "elephant": (200, 1391, 230),
}


@dataclass
class MilDataset:
    """Bags of instances. Bag ``k`` is ``features[offsets[k]:offsets[k + 1]]``."""

    name: str
    features: np.ndarray
    """(n_instances, n_features) float32, rows grouped by bag."""
    offsets: np.ndarray
    """(n_bags + 1,) int64, non-decreasing, ``offsets[0] == 0``, ``offsets[-1] == n_instances``."""
    labels: np.ndarray
    """(n_bags,) int64 bag labels, 0 = negative, 1 = positive."""
    instance_labels: np.ndarray | None = None
    """(n_instances,) int64, 1 = a key (target) instance; ``None`` where unknown (benchmarks)."""
    source: str = ""
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        n = len(self.features)
        if self.offsets[0] != 0 or self.offsets[-1] != n or np.any(np.diff(self.offsets) < 1):
            raise MilDataError(f"{self.name}: every bag needs at least one instance")
        if len(self.labels) != len(self.offsets) - 1:
            raise MilDataError(f"{self.name}: {len(self.labels)} labels for "
                               f"{len(self.offsets) - 1} bags")
        if self.instance_labels is not None and len(self.instance_labels) != n:
            raise MilDataError(f"{self.name}: {len(self.instance_labels)} instance labels for "
                               f"{n} instances")

    @property
    def n_bags(self) -> int:
        return len(self.labels)

    @property
    def n_instances(self) -> int:
        return len(self.features)

    @property
    def n_features(self) -> int:
        return self.features.shape[1]

    @property
    def bag_sizes(self) -> np.ndarray:
        return np.diff(self.offsets)

    def bag(self, k: int) -> np.ndarray:
        return self.features[self.offsets[k]:self.offsets[k + 1]]

    def rows(self, bags: np.ndarray) -> np.ndarray:
        """Instance row numbers of ``bags`` (in that order), concatenated."""
        bags = np.asarray(bags, dtype=np.int64)
        sizes = self.bag_sizes[bags]
        starts = np.repeat(self.offsets[bags], sizes)
        within = np.arange(sizes.sum()) - np.repeat(np.cumsum(sizes) - sizes, sizes)
        return starts + within

    def summary(self) -> dict:
        sizes = self.bag_sizes
        return {"name": self.name, "bags": self.n_bags, "positive": int(self.labels.sum()),
                "negative": int(self.n_bags - self.labels.sum()), "instances": self.n_instances,
                "features": self.n_features, "bag_size_min": int(sizes.min()),
                "bag_size_mean": round(float(sizes.mean()), 2), "bag_size_max": int(sizes.max()),
                "instance_labels": self.instance_labels is not None, "source": self.source}


# ----------------------------------------------------------------------------------------------
# Building a data set from (features, bag id per row, label per bag)


def from_rows(name: str, features: np.ndarray, bag_ids: np.ndarray, labels: np.ndarray,
              source: str, instance_labels: np.ndarray | None = None) -> MilDataset:
    """Group rows by bag: bags in sorted id order, rows of a bag in file order. ``labels[k]`` is
    the label of the k-th smallest id (the callers check that the counts match)."""
    order = np.argsort(bag_ids, kind="stable")
    _, sizes = np.unique(bag_ids[order], return_counts=True)
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    inst = None if instance_labels is None else instance_labels[order].astype(np.int64)
    return MilDataset(name, np.ascontiguousarray(features[order], dtype=np.float32), offsets,
                      labels.astype(np.int64), inst, source)


def _check_features(features: np.ndarray, where: str) -> None:
    if features.ndim != 2 or features.shape[0] == 0 or features.shape[1] == 0:
        raise MilDataError(f"{where}: expected a non-empty (instances, features) matrix; got "
                           f"shape {features.shape}")
    bad = ~np.isfinite(features)
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise MilDataError(f"{where}: {int(bad.sum())} missing or infinite feature values "
                           f"(first at instance row {row + 1}, column {col + 1})")


def _binary_labels(values: np.ndarray, where: str) -> np.ndarray:
    """0/1 labels; -1/+1 (the SVM convention) is mapped to 0/1."""
    uniq = set(np.unique(values).tolist())
    if uniq <= {0, 1}:
        return values.astype(np.int64)
    if uniq <= {-1, 1}:
        return (values > 0).astype(np.int64)
    raise MilDataError(f"{where}: bag labels must be 0/1 (or -1/+1); got values "
                       f"{sorted(uniq)[:6]}")


# ----------------------------------------------------------------------------------------------
# miproblems .mat layout


def _mat_variable(path: Path, wanted: str) -> np.ndarray:
    """The variable ``wanted`` of a MATLAB file (case-insensitive), as an array."""
    import scipy.io

    if not path.is_file():
        raise MilDataError(f"{path}: file missing (a miproblems folder holds X.mat, Bag2.mat and "
                           "BagI.mat)")
    if path.stat().st_size == 0:
        raise MilDataError(f"{path}: empty file; expected a MATLAB .mat file")
    try:
        with open_data(path, MAT_CAP, "a MIL .mat file") as fh:
            content = scipy.io.loadmat(fh)
    except FileRefused as exc:
        raise MilDataError(str(exc)) from None
    except OSError as exc:
        raise MilDataError(f"{path}: cannot read it ({exc.strerror or exc})") from None
    except Exception as exc:  # scipy raises many types for text or damaged files
        raise MilDataError(f"{path}: not a readable MATLAB .mat file "
                           f"({exc.__class__.__name__})") from exc
    names = [k for k in content if not k.startswith("__")]
    match = [k for k in names if k.lower() == wanted.lower()]
    if not match:
        raise MilDataError(f"{path}: no variable {wanted!r}; the file holds {names}")
    value = content[match[0]]
    if not isinstance(value, np.ndarray) or value.dtype.kind not in "biuf":
        raise MilDataError(f"{path}: variable {match[0]!r} must be a numeric matrix; got "
                           f"{type(value).__name__} {getattr(value, 'dtype', '')}")
    return value


def _column(value: np.ndarray, path: Path, what: str) -> np.ndarray:
    if value.ndim > 2 or (value.ndim == 2 and min(value.shape) > 1):
        raise MilDataError(f"{path}: {what} must be a vector; got shape {value.shape}")
    flat = value.reshape(-1)
    if flat.dtype.kind == "f" and not np.all(np.isfinite(flat) & (flat == np.round(flat))):
        raise MilDataError(f"{path}: {what} must be whole numbers")
    return flat.astype(np.int64)


def load_mat_folder(folder: str | Path, name: str | None = None) -> MilDataset:
    """A folder in the miproblems layout: ``X.mat`` ('X'), ``Bag2.mat`` ('Bag2': 1-based bag id
    per instance) and ``BagI.mat`` ('bagI': label of bag k at row k-1)."""
    folder = check_inside_roots(folder, "the MIL set folder")
    name = name or folder.name
    (x_file, x_var), (b_file, b_var), (l_file, l_var) = MAT_FILES
    x_path, b_path, l_path = folder / x_file, folder / b_file, folder / l_file
    features = _mat_variable(x_path, x_var).astype(np.float64)
    _check_features(features, str(x_path))
    bag_ids = _column(_mat_variable(b_path, b_var), b_path, f"{b_var!r} (bag id per instance)")
    labels = _column(_mat_variable(l_path, l_var), l_path, f"{l_var!r} (label per bag)")
    if len(bag_ids) != len(features):
        raise MilDataError(f"{b_path}: {len(bag_ids)} bag ids but {x_path.name} has "
                           f"{len(features)} instance rows; they must match")
    if bag_ids.min() < 1:
        raise MilDataError(f"{b_path}: bag ids are 1-based; found {bag_ids.min()}")
    if bag_ids.max() != len(labels):
        raise MilDataError(f"{l_path}: {len(labels)} bag labels but {b_path.name} names bags "
                           f"1..{bag_ids.max()}; they must match")
    empty = np.setdiff1d(np.arange(1, len(labels) + 1), bag_ids)
    if len(empty):
        raise MilDataError(f"{b_path}: empty bags (no instance rows): {empty[:10].tolist()}"
                           f"{' ...' if len(empty) > 10 else ''}")
    labels = _binary_labels(labels, str(l_path))
    return from_rows(name, features, bag_ids, labels, str(folder))


# ----------------------------------------------------------------------------------------------
# CSV layout


def _number(cell: str, path: Path, line: int, column: int) -> float:
    try:
        value = float(cell)
    except ValueError:
        raise MilDataError(f"{path}: line {line}, column {column}: {cell.strip()!r} is not a "
                           "number") from None
    if not np.isfinite(value):
        raise MilDataError(f"{path}: line {line}, column {column}: {cell.strip()!r} is not a "
                           "finite number")
    return value


def _is_header(row: list[str]) -> bool:
    """A header names its columns: no feature cell is a number. (A data row with one bad cell
    is not a header; it gets the bad-cell error instead of being dropped.)"""
    def numeric(cell: str) -> bool:
        try:
            float(cell)
            return True
        except ValueError:
            return False
    return not any(numeric(c) for c in row[:-2] or row)


def load_csv(path: str | Path, name: str | None = None) -> MilDataset:
    """One row per instance: feature columns, then the bag id (any token), then the bag label
    (0/1 or -1/+1, equal on every row of a bag). An optional header row is skipped."""
    path = Path(path)
    name = name or path.stem
    if not path.is_file():
        raise MilDataError(f"{path}: file missing")
    try:
        text = read_data_bytes(path, TABLE_CAP, "a MIL CSV file").decode()
        rows = [(i, r) for i, r in enumerate(csv.reader(io.StringIO(text, newline="")), start=1)
                if any(c.strip() for c in r)]
    except FileRefused as exc:
        raise MilDataError(str(exc)) from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise MilDataError(f"{path}: cannot read as CSV ({exc})") from None
    if rows and _is_header(rows[0][1]):
        rows = rows[1:]
    if not rows:
        raise MilDataError(f"{path}: no instance rows")
    width = len(rows[0][1])
    if width < 3:
        raise MilDataError(f"{path}: line {rows[0][0]} has {width} columns; need at least one "
                           "feature, the bag id and the bag label")
    features = np.empty((len(rows), width - 2))
    ids, row_labels = [], np.empty(len(rows))
    for r, (line, cells) in enumerate(rows):
        if len(cells) != width:
            raise MilDataError(f"{path}: line {line} has {len(cells)} columns, the first row "
                               f"has {width}")
        features[r] = [_number(c, path, line, j + 1) for j, c in enumerate(cells[:-2])]
        if not cells[-2].strip():
            raise MilDataError(f"{path}: line {line}: empty bag id")
        ids.append(cells[-2].strip())
        row_labels[r] = _number(cells[-1], path, line, width)
    bag_names, bag_ids = np.unique(np.array(ids), return_inverse=True)
    labels = np.empty(len(bag_names))
    for k in range(len(bag_names)):
        values = np.unique(row_labels[bag_ids == k])
        if len(values) != 1:
            raise MilDataError(f"{path}: bag {str(bag_names[k])!r} has different labels on its "
                               f"rows ({values.tolist()}); a bag label must be the same on each "
                               "row")
        labels[k] = values[0]
    labels = _binary_labels(labels, str(path))
    data = from_rows(name, features, bag_ids, labels, str(path))
    data.info["bag_names"] = bag_names.tolist()
    return data


# ----------------------------------------------------------------------------------------------
# Embedded digit bags (Ilse et al. 2018 MNIST-bags protocol, on sklearn digits)


@functools.lru_cache(maxsize=1)
def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 scans as (n, 64) float32 in [0, 1] and their digits (parsing takes ~1 s)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)


def digit_bags(n_bags: int = 200, target: int = 9, mean_size: float = 10.0, std_size: float = 2.0,
               seed: int = 0) -> MilDataset:
    """Bags of 8x8 digit scans; bag size ~ int(N(mean, std)) >= 1, digits drawn at random; a bag
    is positive iff it contains ``target``. Each scan is used at most once while the 1,797 last
    (then the pool is reshuffled), so with the default 200 bags few scans repeat across bags."""
    if not 0 <= target <= 9:
        raise ValueError(f"target must be a digit 0-9; got {target!r}")
    if n_bags < 2:
        raise ValueError(f"n_bags must be >= 2; got {n_bags!r}")
    images, targets = _sklearn_digits()
    rng = np.random.default_rng(seed)
    sizes = np.maximum(1, rng.normal(mean_size, std_size, n_bags).astype(np.int64))
    need = int(sizes.sum())
    pool = np.concatenate([rng.permutation(len(images))
                           for _ in range(-(-need // len(images)))])[:need]
    digit = targets[pool]
    offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
    inst = (digit == target).astype(np.int64)
    labels = np.maximum.reduceat(inst, offsets[:-1])
    data = MilDataset(EMBEDDED, images[pool], offsets, labels, inst,
                      f"sklearn digits, target {target}, seed {seed}")
    data.info.update(digits=digit.tolist(), target=target, seed=seed)
    return data


# ----------------------------------------------------------------------------------------------
# Registry


def list_mil_datasets() -> list[str]:
    return [EMBEDDED, *BENCHMARKS]


def mil_data_root(root: str | Path | None = None) -> Path | None:
    """The given root, else ``$LOSSATTN_DATA``; ``None`` when neither is set."""
    if root:
        return Path(root).expanduser()
    env = os.environ.get("LOSSATTN_DATA")
    return Path(env).expanduser() if env else None


def _locate(name: str, root: Path) -> Path | None:
    for base in (root, root / "mil"):
        if (base / name / MAT_FILES[0][0]).is_file():
            return base / name
        if (base / f"{name}.csv").is_file():
            return base / f"{name}.csv"
    if root.name == name and (root / MAT_FILES[0][0]).is_file():  # root is the set's folder
        return root
    return None


def available_mil_datasets(root: str | Path | None = None) -> list[str]:
    """The embedded set, plus every benchmark found under the data root."""
    base = mil_data_root(root)
    found = [n for n in BENCHMARKS if base is not None and _locate(n, base) is not None]
    return [EMBEDDED, *found]


def load_mil_dataset(name: str, root: str | Path | None = None, seed: int = 0) -> MilDataset:
    """A registered set by name (``list_mil_datasets()``), or a path to a folder / CSV file."""
    if name == EMBEDDED:
        return digit_bags(seed=seed)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".csv" or path.is_file():
        return load_csv(path)
    if path.is_dir():
        return load_mat_folder(path)
    if name not in BENCHMARKS:
        raise MilDataError(f"unknown MIL data set {name!r}: use one of {list_mil_datasets()}, a "
                           "folder in the miproblems layout, or a CSV file")
    base = mil_data_root(root)
    if base is None:
        raise MilDataError(f"{name}: no data folder. Set LOSSATTN_DATA (or pass --data-root) to a "
                           f"folder holding mil/{name}/X.mat, Bag2.mat, BagI.mat (the miproblems "
                           f"layout) or mil/{name}.csv")
    found = _locate(name, base)
    if found is None:
        raise MilDataError(f"{name}: not found under {base}. Put X.mat, Bag2.mat and BagI.mat in "
                           f"{base / 'mil' / name}/ (or a CSV at {base / 'mil' / name}.csv)")
    data = load_csv(found, name) if found.suffix == ".csv" else load_mat_folder(found, name)
    return data
