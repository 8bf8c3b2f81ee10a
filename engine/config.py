"""Dataclass configs: defaults equal the paper's, validated at construction, JSON round-trip.

A bad value raises :class:`ConfigError` (a ``ValueError``) naming the field and what is allowed,
so the CLI and the app can show it to a person as it is.

Fields left at ``None`` mean "the backbone's default" and are filled in by
:func:`engine.models.build_model`, which stores the resolved config on the model so that a
checkpoint alone can rebuild it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import re
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from engine.errors import ConfigError
from engine.presets import check_preset_name

XI_DENOMINATORS = ("patches", "feature_map")
DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")
RAMP_UNITS = ("epoch", "step")
"""How often the patch-loss ramp-up moves (LossConfig.ramp_by)."""
RESIZE_POLICIES = ("squash", "center_crop")
"""How an image of another shape becomes the square model input (engine.inputs.fit)."""

# Upper bounds of counts and sizes. JSON, a form or a command line can give any int; beyond
# these a value overflows what torch or the run index (SQLite, int64) holds, or asks for more
# than any machine has, and would fail deep inside a run instead of here.
SEED_LIMIT = 2**63
"""Seeds (train.seed, data.seed) lie in [0, 2**63): torch's generators take a signed int64."""
MAX_EPOCHS = 100_000
MAX_BATCH = 2**20
"""Largest train.batch_size (about a million images a step)."""
MAX_IMAGES = 100_000_000
"""Largest image count (data.train_size / test_size, train.eval_sample)."""
MAX_SIDE = 8192
"""Largest input side in pixels (data.input_size, model.input_size)."""
MAX_WIDTH = 2**20
"""Largest layer width, channel, class, kernel or stride count of a model section."""
MAX_THREADS = 4096


# ----------------------------------------------------------------------------------------------
# Types: JSON, a command line or a form can give any value; each field takes only its own type


def check_types(obj: Any, section: str = "") -> None:
    """Check every field of the dataclass ``obj`` against its annotation (bool, int, float,
    str, ``X | None``, ``tuple[T, ...]``, ``tuple[T1, T2]``); lists become tuples. A wrong type
    raises :class:`ConfigError` naming ``section.field`` and what is allowed, so that e.g.
    ``train.compile="no"`` is refused instead of read as true."""
    hints = _type_hints(type(obj))
    prefix = f"{section}." if section else ""
    for f in dataclasses.fields(obj):
        hint = hints[f.name]
        if dataclasses.is_dataclass(hint):
            continue  # nested sections check themselves
        value = getattr(obj, f.name)
        ok, converted = _conform(value, hint)
        if not ok:
            raise ConfigError(f"{prefix}{f.name} must be {_describe(hint)}; got {value!r:.80}")
        if converted is not value:
            setattr(obj, f.name, converted)


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _conform(value: Any, hint: Any) -> tuple[bool, Any]:
    """(whether ``value`` has type ``hint``, the value with lists made tuples)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        for arm in args:
            ok, converted = _conform(value, arm)
            if ok:
                return True, converted
        return False, value
    if hint is type(None):
        return value is None, value
    if hint is bool:
        return isinstance(value, bool), value
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if hint is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(
            value)
        return ok, value
    if hint is str:
        return isinstance(value, str), value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            return False, value
        arms = [args[0]] * len(value) if len(args) == 2 and args[1] is Ellipsis else list(args)
        if len(arms) != len(value):
            return False, value
        parts = [_conform(v, a) for v, a in zip(value, arms, strict=True)]
        return all(ok for ok, _ in parts), tuple(v for _, v in parts)
    return True, value  # a type this checker does not know: the field's own checks apply


def _describe(hint: Any) -> str:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0]).removeprefix('a ').removeprefix('an ')}s"
        return f"a list of {len(args)} ({', '.join(_describe(a) for a in args)})"
    return {type(None): "null", bool: "true or false", int: "an int", float: "a finite number",
            str: "a string"}.get(hint, getattr(hint, "__name__", str(hint)))


@contextlib.contextmanager
def section_errors(section: str) -> Iterator[None]:
    """Prefix a field's error with its section (``model.xi must be ...``)."""
    try:
        yield
    except ConfigError as exc:
        text = str(exc)
        if not text.startswith(f"{section}."):
            raise ConfigError(f"{section}.{text}") from None
        raise


def check_field(ok: bool, field_name: str, allowed: str, value: Any) -> None:
    if not ok:
        shown = _int_text(value) if _is_int(value) else repr(value)
        raise ConfigError(f"{field_name} must be {allowed}; got {shown}")


def check_at_most(value: Any, field_name: str, limit: int, why: str) -> None:
    """Refuse an int above ``limit`` (None passes: it means a default), naming why."""
    if value is not None and value > limit:
        raise ConfigError(f"{field_name} must be at most {limit:,} ({why}); got "
                          f"{_int_text(value)}")


def _int_text(value: int) -> str:
    """``value`` for a message; a huge int by its size (str() refuses over 4300 digits)."""
    if value.bit_length() <= 128:
        return repr(value)
    return f"an int of about {int(value.bit_length() * math.log10(2)) + 1} digits"


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _pair(value: Any, field_name: str) -> tuple[int, int]:
    """Accept ``32`` or ``(32, 32)`` / ``[h, w]`` and return ``(h, w)``."""
    if _is_int(value):
        value = (value, value)
    ok = isinstance(value, (tuple, list)) and len(value) == 2 and all(_is_int(v) for v in value)
    check_field(ok, field_name, "an int or a pair of ints (height, width)", value)
    check_field(min(value) >= 1, field_name, "positive", value)
    check_at_most(max(value), field_name, MAX_SIDE, "pixels a side")
    return (int(value[0]), int(value[1]))


def _optional_positive_int(value: Any, field_name: str, none_means: str = "backbone default"
                           ) -> None:
    check_field(value is None or value >= 1, field_name,
           f"None ({none_means}) or a positive int", value)


@dataclass
class ModelConfig:
    """Everything needed to build a model; saved with every run and inside every checkpoint."""

    backbone: str = "resnet18"
    """The feature extractor: a registered backbone (``engine.models.list_backbones()``;
    ``python -m engine models`` describes them) or ``"timm:<model name>"``. The paper's ResNet18
    (32.7M parameters with the Loss-Attention head) is the default, kept by the paper presets;
    the digits' ``live`` preset picks ``small_cnn``, fast enough for a CPU."""
    head: str = "loss_attention"
    """What turns the features into a prediction: a registered head
    (``engine.models.list_heads()``): Loss-Attention, its capsule form, or a baseline."""
    num_classes: int = 10
    """Classes the model predicts. A run takes them from its data (engine.train.
    prepare_run_config): the default, 10, stands for "the data's count"; any other value must
    equal the data's count, or the run is refused."""
    in_chans: int = 3
    """Input channels (a run takes them from its data)."""
    input_size: tuple[int, int] = (32, 32)
    """Input (height, width) the model is built and validated for; other sizes work at run time
    as long as they leave at least one patch."""
    stride_plan: tuple[int, ...] | None = None
    """Per-stage strides of the backbone (ResNet18: 4 stages; VGG11_bn: 8 convs). ``None`` picks
    the paper's plan for the input size: stride 1 everywhere at 32x32, one stride-2 stage per
    doubling of the input (ResNet18 layer2, VGG11 4th conv first)."""

    xi: float = 0.1
    """Threshold numerator ξ in [0, 1]; acts only in the forward pass (can be changed after
    training)."""
    xi_denominator: str = "patches"
    """``"patches"``: θ = ξ/M (paper). ``"feature_map"``: θ = ξ/(H·W of the map before the patch
    conv), as the released conv code does."""

    patch_kernel: int | None = None
    """Kernel of the patch conv (paper 9); ``None`` = backbone default."""
    patch_stride: int | None = None
    """Stride of the patch conv (paper 4); ``None`` = backbone default."""
    patch_padding: int = 0
    """Padding of the patch conv."""
    patch_channels: int | None = None
    """Channels C of the patch features (paper 512); ``None`` = backbone default."""

    primary_caps: int = 32
    primary_dim: int = 16
    caps_channels: int = 64
    caps_dim: int = 128
    attention_hidden: int = 128
    """Hidden size D of the Ilse Attention / Gated-Attention heads."""
    routing_iters: int = 3
    plain_hidden: tuple[int, ...] = ()
    """Hidden widths of the plain head's MLP; ``(4096, 4096)`` is the paper's VGG11_bn baseline."""

    stem_norm: bool = True
    """Apply BN+ReLU after the ResNet stem conv. The released TIP code defines ``bn1`` but never
    uses it (False reproduces that); the parameter count is the same either way."""
    timm_output_stride: int | None = None
    """``output_stride`` passed to timm (8, 16 or 32) for ``timm:`` backbones."""
    pretrained: bool = False
    """timm backbones only: load pretrained weights (needs them cached or a network)."""

    def __post_init__(self) -> None:
        with section_errors("model"):
            self.input_size = _pair(self.input_size, "input_size")
            check_types(self)
            self._check_ranges()

    def _check_ranges(self) -> None:
        """Ranges (``check_types`` has checked the types). The backbone and head names are
        checked by the model registry when the model is resolved or built
        (:func:`engine.models.resolve_config`)."""
        check_field(bool(self.backbone), "backbone", "a backbone name", self.backbone)
        check_field(bool(self.head), "head", "a head name", self.head)
        for name in ("num_classes", "in_chans", "primary_caps", "primary_dim", "caps_channels",
                     "caps_dim", "attention_hidden", "routing_iters"):
            value = getattr(self, name)
            check_field(value >= 1, name, "a positive int", value)
        check_field(self.num_classes >= 2, "num_classes", ">= 2", self.num_classes)
        self._check_widths()
        check_field(0.0 <= self.xi <= 1.0, "xi", "a number in [0, 1]", self.xi)
        check_field(self.xi_denominator in XI_DENOMINATORS, "xi_denominator",
               f"one of {list(XI_DENOMINATORS)}", self.xi_denominator)
        for name in ("patch_kernel", "patch_stride", "patch_channels"):
            _optional_positive_int(getattr(self, name), name)
        check_field(self.patch_padding >= 0, "patch_padding",
               "an int >= 0", self.patch_padding)
        plan = self.stride_plan
        check_field(plan is None or (len(plan) > 0 and all(s >= 1 for s in plan)),
               "stride_plan", "None or a non-empty tuple of positive ints", plan)
        check_field(all(h >= 1 for h in self.plain_hidden), "plain_hidden",
               "a tuple of positive ints", self.plain_hidden)
        check_field(self.timm_output_stride in (None, 8, 16, 32), "timm_output_stride",
               "None, 8, 16 or 32", self.timm_output_stride)

    def _check_widths(self) -> None:
        """Sizes beyond any machine's memory (and torch's int64 shapes) are refused here."""
        for name in ("num_classes", "in_chans", "primary_caps", "primary_dim", "caps_channels",
                     "caps_dim", "attention_hidden", "routing_iters", "patch_kernel",
                     "patch_stride", "patch_padding", "patch_channels", "timm_output_stride"):
            check_at_most(getattr(self, name), name, MAX_WIDTH, "MAX_WIDTH")
        for name in ("stride_plan", "plain_hidden"):
            check_at_most(max(getattr(self, name) or (0,)), name, MAX_WIDTH,
                          "MAX_WIDTH, for each entry")

    def replace(self, **changes: Any) -> ModelConfig:
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


@dataclass
class LossConfig:
    """The Loss-Attention objective (paper Eqs. 9/10) and its Gaussian ramp-up."""

    multilabel: bool = False
    """False: softmax CE (Eq. 9). True: BCE with the min-over-positive-labels patch term
    (Eq. 10)."""
    gamma_max: float = 0.1
    """Weight of the patch-loss term once the ramp-up is over (γmax >= 0)."""
    ramp_epochs: int | None = None
    """Length of the ramp-up in epochs. ``None``: the paper's proportion of the run, 80 of 200
    epochs (80 when the run length is unknown). ``0``: full weight from epoch 1."""
    ramp_by: str = "epoch"
    """``"epoch"``: the paper's ramp, one weight per epoch (0 for all of epoch 0, so a one-epoch
    run never uses the patch loss). ``"step"``: the same curve at the fractional epoch of every
    step, so that a run of one or two epochs ramps up within them."""

    def __post_init__(self) -> None:
        with section_errors("loss"):
            check_types(self)
            self._check_ranges()

    def _check_ranges(self) -> None:
        check_field(self.gamma_max >= 0, "gamma_max", "a finite number >= 0", self.gamma_max)
        check_field(self.ramp_by in RAMP_UNITS, "ramp_by", f"one of {list(RAMP_UNITS)}",
                    self.ramp_by)
        check_field(self.ramp_epochs is None or self.ramp_epochs >= 0, "ramp_epochs",
               "None or an int >= 0", self.ramp_epochs)
        check_at_most(self.ramp_epochs, "ramp_epochs", MAX_EPOCHS, "MAX_EPOCHS")


@dataclass
class DataConfig:
    """Which data set, where it lives and how it is prepared."""

    dataset: str = "digits"
    """Registered data set (``engine.data.list_datasets()``)."""
    root: str | None = None
    """Folder holding the data (or a folder above it); ``None``: ``$LOSSATTN_DATA``, then
    ``./data``."""
    input_size: int | None = None
    """Side of the square model input; ``None``: the data set's native size (32 or 64)."""
    train_size: int | None = None
    """Digits: canvases to generate (default 12,000). Other sets: keep a seeded random subset of
    this many training images (``None``: all)."""
    test_size: int | None = None
    """Digits: canvases to generate (default 3,000). Other sets: subset size (``None``: all)."""
    augment: bool = True
    """The paper's augmentation for the data set (random crop with padding, flips where
    meaningful)."""
    download: bool = False
    """Download missing CIFAR / SVHN files with torchvision (needs a network)."""
    resize: str = "squash"
    """How images of another size become square: ``"squash"`` (resize both sides; keeps every
    object) or ``"center_crop"`` (resize the short side, crop the centre; boxes outside are
    clipped or dropped)."""
    train_split: str | None = None
    """Split folder names for COCO (``train2017``) and image folders (``train``)."""
    test_split: str | None = None
    """As ``train_split`` (COCO ``val2017``, image folders ``test`` or ``val``)."""
    seed: int = 0
    """Seed of the digit generator and of subsets / folder splits."""
    skip_unreadable: bool = False
    """An image that the annotations or folders list but that is missing or unreadable is an
    error (naming up to 10 such files). True: leave such images out; how many were left out is
    recorded in the run's status and shown by ``data check`` and the Runs page."""
    crowd_boxes: bool = False
    """COCO: count crowd regions (``iscrowd=1``) as ground-truth boxes for patch metrics and
    localization. COCO's own evaluation does not (the default); their classes always count
    in the image-level labels."""

    def __post_init__(self) -> None:
        with section_errors("data"):
            check_types(self)
            self._check_ranges()

    def _check_ranges(self) -> None:
        # The name is checked by the data registry when the data set is asked for.
        check_field(bool(self.dataset), "dataset", "a data set name", self.dataset)
        check_field(self.input_size is None or self.input_size >= 8,
               "input_size", "None or an int >= 8", self.input_size)
        check_at_most(self.input_size, "input_size", MAX_SIDE, "pixels a side")
        for name in ("train_size", "test_size"):
            _optional_positive_int(getattr(self, name), name, "the whole split")
            check_at_most(getattr(self, name), name, MAX_IMAGES, "MAX_IMAGES")
        check_field(self.resize in RESIZE_POLICIES, "resize", f"one of {list(RESIZE_POLICIES)}",
               self.resize)
        check_seed(self.seed)
        for name in ("train_split", "test_split"):  # a folder name, never a way out of the root
            value = getattr(self, name)
            check_field(value is None or (value.strip() not in ("", ".", "..") and "/" not in value
                                          and "\\" not in value), name,
                        "None or a plain folder name (no '/', no '..')", value)


def check_seed(seed: int) -> None:
    check_field(0 <= seed < SEED_LIMIT, "seed",
                "an int >= 0 and < 2**63 (torch's generators take a signed 64-bit seed)", seed)


RECIPE_NAMES = ("sgd", "onecycle", "adam")
"""The training recipes (engine.train.RECIPES); ``auto`` picks the head's own."""
RECIPES = ("auto", *RECIPE_NAMES)
RUN_NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,79}"


@dataclass
class TrainConfig:
    """Optimisation and run mechanics. Defaults are the paper's recipe for 200 epochs."""

    epochs: int = 200
    """Passes over the training images (the paper: 200)."""
    batch_size: int = 128
    """Global batch (split across DDP ranks and micro-batches)."""
    recipe: str = "auto"
    """``"sgd"``: the paper's Loss-Attention recipe (SGD, momentum 0.9, lr 0.1, decays x0.1 at
    50 % and 75 % of the epochs). ``"adam"``: the paper's Mean-pooling / Dynamic Routing recipe
    (lr ramped up to 0.003 over 40 % of the epochs, flat, then x0.1 at 60 % and 80 %; β2 0.99 ->
    0.999 after the ramp). ``"onecycle"``: Nesterov SGD with a one-cycle lr, moved every step
    (up to lr 0.2 over the first 20 % of the run, then down to 0): the short schedule of the
    ``live`` preset. ``"auto"``: the head's own (its spec's ``recipe``)."""
    lr: float | None = None
    """Peak learning rate; ``None``: the recipe's (sgd 0.1, onecycle 0.2, adam 0.003)."""
    momentum: float = 0.9
    """SGD momentum (the sgd and onecycle recipes)."""
    weight_decay: float | None = None
    """``None``: the recipe's (sgd and onecycle 5e-4, adam 0)."""
    milestones: tuple[float, ...] = (0.5, 0.75)
    """SGD decay points as fractions of the epochs (the paper's 100 and 150 of 200)."""
    lr_decay: float = 0.1
    """The factor the lr is multiplied by at each milestone."""
    seed: int = 0
    """Seed of the weights' initialisation, the batch order and the augmentation."""
    device: str = "auto"
    """Where to train: ``"auto"`` (a GPU if there is one, else the CPU), ``"cpu"``, ``"cuda"``,
    ``"cuda:N"`` or ``"mps"``."""
    amp: bool = True
    """bf16 autocast for training on CUDA, and on a CPU with native bf16 (AVX512-BF16 or AMX;
    ``engine.device.cpu_has_native_bf16``). Elsewhere fp32: emulated bf16 is far slower."""
    channels_last: bool = True
    """channels_last memory format for training, on CUDA and on the CPU (faster there:
    ``python -m engine bench`` compares the layouts)."""
    compile: bool = False
    """``torch.compile`` the model."""
    micro_batches: int = 1
    """Split each batch into this many chunks with gradient accumulation (memory; also the exact
    single-process equivalent of that many DDP ranks)."""
    data_on_device: bool | None = None
    """Keep the training images on the GPU (``None``: when they take < 25 % of free memory)."""
    checkpoint_minutes: float = 10.0
    """Also checkpoint mid-epoch this often, so a killed run loses at most this much work."""
    eval_sample: int | None = None
    """Epochs before the last are evaluated on the first this many test images only, the last
    on the whole test set (``None``: the whole set every epoch, as the paper). The metrics row
    says how many (``eval_images``); best.pt prefers a whole-set evaluation to a sample's."""

    threads: int | None = None
    """torch CPU threads (``--threads``). ``None``: the run's share of the cores among the jobs
    computing under its run store, followed as they start and end (``engine.slots``). Sums
    in floating point depend on the count, so a run meant to be repeated bit for bit pins it;
    the run's status and metrics record the count used."""

    def __post_init__(self) -> None:
        with section_errors("train"):
            check_types(self)
            self._check_ranges()

    def _check_ranges(self) -> None:
        for name in ("epochs", "batch_size", "micro_batches"):
            value = getattr(self, name)
            check_field(value >= 1, name, "a positive int", value)
        check_at_most(self.epochs, "epochs", MAX_EPOCHS, "MAX_EPOCHS")
        check_at_most(self.batch_size, "batch_size", MAX_BATCH, "MAX_BATCH")
        check_field(self.recipe in RECIPES, "recipe", f"one of {list(RECIPES)}", self.recipe)
        check_field(self.lr is None or self.lr > 0, "lr",
               "None or a number > 0", self.lr)
        check_field(self.weight_decay is None or self.weight_decay >= 0,
               "weight_decay", "None or a number >= 0", self.weight_decay)
        check_field(0 <= self.momentum < 1, "momentum", "in [0, 1)",
               self.momentum)
        check_field(all(0 < m < 1 for m in self.milestones), "milestones",
               "fractions of the epochs, each in (0, 1)", self.milestones)
        ordered = all(a < b for a, b in zip(self.milestones, self.milestones[1:]))
        check_field(ordered, "milestones", "in increasing order without repeats (the lr decays "
                    "once at each)", self.milestones)
        check_field(0 < self.lr_decay <= 1, "lr_decay", "in (0, 1]",
               self.lr_decay)
        check_seed(self.seed)
        check_field(self.micro_batches <= self.batch_size, "micro_batches", "<= batch_size",
               self.micro_batches)
        check_field(self.checkpoint_minutes > 0,
               "checkpoint_minutes", "a number > 0", self.checkpoint_minutes)
        _optional_positive_int(self.eval_sample, "eval_sample", "the whole test set")
        check_at_most(self.eval_sample, "eval_sample", MAX_IMAGES, "MAX_IMAGES")
        _optional_positive_int(self.threads, "threads", "the share of the cores")
        check_at_most(self.threads, "threads", MAX_THREADS, "MAX_THREADS")
        # Only the name here: whether this machine has the device is checked before a run
        # starts (engine.device.check_device), so that a GPU run's config loads anywhere.
        check_field(is_device_name(self.device), "device",
                    f"one of {list(DEVICE_CHOICES)} or 'cuda:N'", self.device)


def is_device_name(name: Any) -> bool:
    """Whether ``name`` is a device this program knows: auto, cpu, cuda, mps or cuda:N."""
    return isinstance(name, str) and (name in DEVICE_CHOICES
                                      or re.fullmatch(r"cuda:[0-9]{1,6}", name) is not None)


MAP_SOURCES = ("activations", "patch_weights")
"""Where a peer's attention map comes from in mutual transfer (engine.local_maps)."""


@dataclass
class TransferConfig:
    """Mutual transfer of local attention maps (Cheng et al. 2022; docs/mutual_transfer.md).

    A run with this section trains ``1 + len(peers)`` models together on the same batches: the
    run's ``model`` is peer 0 and ``peers`` lists the others. Each peer's loss is its own
    objective plus ``lam`` times the mean over regions of (1 - Pearson ρ) between its local maps
    and each other peer's (detached), plus ``kl`` times mutual learning's KL term."""

    peers: tuple[ModelConfig, ...] = ()
    """The other peers' models (at least one); data-dependent fields are filled in as for
    ``model``."""
    lam: float = 1.0
    """λ >= 0, the weight of the local-map transfer term (0: the peers train alone)."""
    grid: int = 4
    """Local regions: the global map is cut into ``grid`` x ``grid`` regions."""
    map_source: str = "activations"
    """``"activations"``: channel-mean of |a|^p over the backbone's deepest ``layers`` layers,
    each resized and L2-normalised, then summed. ``"patch_weights"``: the Loss-Attention patch
    weights on their grid."""
    layers: int = 3
    """How many of the backbone's deepest usable layers make the global map."""
    power: float = 2.0
    """p in |a|^p."""
    kl: float = 0.0
    """Weight of deep mutual learning's KL(p_other || p_self) on the logits (0: off)."""

    def __post_init__(self) -> None:
        with section_errors("transfer"):
            peers = self.peers if isinstance(self.peers, list | tuple) else None
            check_field(peers is not None, "peers", "a list of model sections", self.peers)
            self.peers = tuple(_peer_config(p, i) for i, p in enumerate(peers))
            check_types(self)
            check_field(len(self.peers) >= 1, "peers",
                        "at least one other peer (mutual transfer needs two or more models; "
                        "the run's model is the first)", list(self.peers))
            check_field(self.lam >= 0, "lam", "a number >= 0 (λ; 0 trains the peers alone)",
                        self.lam)
            check_field(self.grid >= 1, "grid", "a positive int", self.grid)
            check_at_most(self.grid, "grid", MAX_SIDE, "regions a side")
            check_field(self.map_source in MAP_SOURCES, "map_source",
                        f"one of {list(MAP_SOURCES)}", self.map_source)
            check_field(self.layers >= 1, "layers", "a positive int", self.layers)
            check_at_most(self.layers, "layers", MAX_WIDTH, "MAX_WIDTH")
            check_field(self.power > 0, "power", "a number > 0", self.power)
            check_field(self.kl >= 0, "kl", "a number >= 0", self.kl)


def _peer_config(value: Any, index: int) -> ModelConfig:
    if isinstance(value, ModelConfig):
        return value
    try:
        return config_from_dict(ModelConfig, value, section=f"peers[{index}]")
    except ConfigError as exc:  # "model.xi must ..." of the peer's own section
        text = str(exc).removeprefix("model.")
        raise ConfigError(text if text.startswith("peers[") else f"peers[{index}].{text}"
                          ) from None


@dataclass
class RunConfig:
    """Everything a run needs; saved as the run's config.json and inside its checkpoints."""

    name: str | None = None
    """Run name (letters, digits, '.', '_', '-'); ``None``: made from data, model and time."""
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    data: DataConfig = dataclasses.field(default_factory=DataConfig)
    loss: LossConfig = dataclasses.field(default_factory=LossConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    tags: tuple[str, ...] = ()
    notes: str = ""
    transfer: TransferConfig | None = None
    """Mutual transfer: train ``model`` together with ``transfer.peers`` (None: one model)."""
    preset: str | None = None
    """The named preset (``engine.presets``) whose settings filled the fields the user did not
    give; recorded so that Runs and diffs show it. None: the recipe defaults alone."""

    def __post_init__(self) -> None:
        if isinstance(self.transfer, dict):
            self.transfer = config_from_dict(TransferConfig, self.transfer, section="transfer")
        check_field(self.transfer is None or isinstance(self.transfer, TransferConfig),
                    "transfer", "null or a JSON object (the transfer section)", self.transfer)
        for name, cls in (("model", ModelConfig), ("data", DataConfig), ("loss", LossConfig),
                          ("train", TrainConfig)):
            value = getattr(self, name)
            if isinstance(value, dict):
                setattr(self, name, config_from_dict(cls, value, section=name))
            elif not isinstance(value, cls):
                raise ConfigError(f"{name} must be a JSON object (the {name} section); got "
                                  f"{value!r:.60}")
        check_types(self)
        check_preset_name(self.preset)
        check_field(self.name is None or (isinstance(self.name, str)
                                     and re.fullmatch(RUN_NAME_PATTERN, self.name) is not None),
               "name", "1-80 letters, digits, '.', '_' or '-', starting with a letter or digit "
               "(no paths)", self.name)
        if self.transfer is not None:
            self._check_peers_agree()

    @property
    def models(self) -> tuple[ModelConfig, ...]:
        """Every model the run trains: ``model``, then the transfer peers."""
        return (self.model, *(self.transfer.peers if self.transfer else ()))

    def _check_peers_agree(self) -> None:
        """Peers learn the same task from the same images: classes and channels must agree."""
        for i, peer in enumerate(self.transfer.peers):
            for name in ("num_classes", "in_chans"):
                mine, theirs = getattr(self.model, name), getattr(peer, name)
                check_field(mine == theirs, f"transfer.peers[{i}].{name}",
                            f"equal to model.{name} ({mine}): peers predict the same classes "
                            "from the same images", theirs)


T = TypeVar("T")
SECTIONS = ("model", "data", "loss", "train", "transfer")


def split_setting(item: str, flag: str, sections: tuple[str, ...] = SECTIONS
                  ) -> tuple[str, str, str]:
    """``"section.field=text"`` -> (section, field, text); the one parser of such settings
    (``train --set``, ``evaluate --set``, sweep grids)."""
    path, sep, text = str(item).partition("=")
    section, dot, key = path.strip().partition(".")
    if not sep or not dot or section not in sections or not key:
        raise ConfigError(f"{flag} needs {'|'.join(sections)}.FIELD=VALUE; got {item!r}")
    return section, key, text


def parse_value(text: str) -> Any:
    """A setting's value: JSON where it parses (numbers, true/false, null, lists), else the
    text itself (``model.head=mean``). Types are then checked by the config."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text.strip()


def parse_setting(item: str, flag: str, sections: tuple[str, ...] = SECTIONS
                  ) -> tuple[str, str, Any]:
    section, key, text = split_setting(item, flag, sections)
    return section, key, parse_value(text)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-safe dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def config_from_dict(cls: type[T], data: dict[str, Any], section: str = "") -> T:
    """Rebuild a config, refusing unknown fields so that a typo is never silently ignored."""
    what = section or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{what} must be a JSON object; got {type(data).__name__}")
    known = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(str(k) for k in set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown field(s) {unknown} in {what}; known fields: {known}")
    return cls(**data)


__all__ = [
    "MAP_SOURCES",
    "MAX_BATCH",
    "MAX_EPOCHS",
    "MAX_IMAGES",
    "MAX_SIDE",
    "MAX_THREADS",
    "MAX_WIDTH",
    "RECIPES",
    "RECIPE_NAMES",
    "RESIZE_POLICIES",
    "RUN_NAME_PATTERN",
    "SECTIONS",
    "SEED_LIMIT",
    "XI_DENOMINATORS",
    "ConfigError",
    "DataConfig",
    "LossConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "TransferConfig",
    "config_from_dict",
    "config_to_dict",
    "is_device_name",
    "parse_setting",
    "parse_value",
    "split_setting",
]
