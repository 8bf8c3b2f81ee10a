"""Backbones: a module mapping images to a feature map, and the geometry of that map.

Every backbone has ``out_channels``, ``feature_geom(input_size) -> MapGeom`` and a
``from_config(cfg)`` that the registry calls; each registers itself with
:func:`~engine.models.registry.register_backbone`. The project's own backbones derive their
geometry from their real conv modules (``geometry_layers``), so a change to a layer's stride or
padding changes the patch boxes with it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from engine.errors import ConfigError
from engine.models.geometry import LayerGeom, MapGeom, compose
from engine.models.registry import register_backbone

PAPER_PATCH = {"patch_kernel": 9, "patch_stride": 4, "patch_channels": 512}
"""The paper's added patch layer: 9x9 conv, stride 4, 512 channels."""


def conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1, bias: bool = False
                 ) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=bias),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class TracedBackbone(nn.Module):
    """Base for backbones whose main path is a known list of conv layers."""

    out_channels: int

    def geometry_layers(self) -> list[nn.Module]:
        raise NotImplementedError

    def feature_geom(self, input_size: tuple[int, int]) -> MapGeom:
        return compose(input_size, [LayerGeom.of(m) for m in self.geometry_layers()])


class BasicBlock(nn.Module):
    """ResNet basic block; the 1x1 shortcut conv exists where stride or width changes."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = nn.Sequential()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


@register_backbone(
    "resnet18",
    description="ResNet18 modified as in the paper (all strides 1 at 32x32; layer2 stride 2 at "
                "64x64)",
    base_plan=(1, 1, 1, 1), upscale_order=(1, 2, 3, 0), baseline_plan=(1, 2, 2, 2),
    patch_defaults=PAPER_PATCH, compare_plans=((1, 1, 1, 1), (1, 2, 1, 1), (1, 1, 1, 2)))
class ResNet18(TracedBackbone):
    """CIFAR-style ResNet18 (3x3 stem, no stem max-pool), BasicBlocks [2, 2, 2, 2].

    ``stride_plan`` gives the stride of each of the 4 stages: (1, 2, 2, 2) is the standard CIFAR
    network (the paper's baseline), (1, 1, 1, 1) the paper's Loss-Attention backbone at 32x32 and
    (1, 2, 1, 1) its 64x64 variant (stride 2 kept in layer2).
    """

    widths = (64, 128, 256, 512)

    def __init__(self, in_chans: int, stride_plan: Sequence[int], stem_norm: bool = True) -> None:
        super().__init__()
        if len(stride_plan) != 4:
            raise ValueError(f"stride_plan for resnet18 needs 4 entries; got {tuple(stride_plan)}")
        self.conv1 = nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False)
        # bn1 always exists (the paper's parameter counts include it); whether it is applied is
        # the released-code quirk that ``stem_norm`` controls.
        self.bn1 = nn.BatchNorm2d(64)
        self.stem_norm = stem_norm
        cin, stages = 64, []
        for width, stride in zip(self.widths, stride_plan):
            stages.append(nn.Sequential(BasicBlock(cin, width, stride),
                                        BasicBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.out_channels = cin

    @classmethod
    def from_config(cls, cfg) -> ResNet18:
        return cls(cfg.in_chans, cfg.stride_plan, cfg.stem_norm)

    def geometry_layers(self) -> list[nn.Module]:
        layers: list[nn.Module] = [self.conv1]
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for block in stage:
                layers += [block.conv1, block.conv2]
        return layers

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.stem_norm:
            x = torch.relu(self.bn1(x))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))


@register_backbone(
    "vgg11_bn",
    description="VGG11_bn modified as in the paper (max-pools and FC layers removed; 4th conv "
                "stride 2 at 64x64)",
    base_plan=(1,) * 8, upscale_order=(3, 5, 7, 1), baseline_plan=(1, 2, 2, 1, 2, 1, 2, 1),
    patch_defaults=PAPER_PATCH, compare_plans=((1,) * 8, (1, 1, 1, 2, 1, 1, 1, 1)))
class VGG11BN(TracedBackbone):
    """VGG11 with BatchNorm, as modified in the paper: every max-pool dropped, FC layers removed.

    Convs are 3x3, padding 1, with bias (torchvision's ``vgg11_bn`` convention). ``stride_plan``
    gives the stride of each of the 8 convs: all 1 at 32x32; stride 2 in the 4th conv at 64x64.
    The standard network's five max-pools are replaced by stride 2 in convs 2, 3, 5, 7 when the
    plain baseline asks for the standard plan (the final pool is the global pooling of the head).
    """

    widths = (64, 128, 256, 256, 512, 512, 512, 512)

    def __init__(self, in_chans: int, stride_plan: Sequence[int]) -> None:
        super().__init__()
        if len(stride_plan) != len(self.widths):
            raise ValueError(f"stride_plan for vgg11_bn needs 8 entries; got {tuple(stride_plan)}")
        cin, layers = in_chans, []
        for width, stride in zip(self.widths, stride_plan):
            layers.append(conv_bn_relu(cin, width, 3, stride, bias=True))
            cin = width
        self.features = nn.Sequential(*layers)
        self.out_channels = cin

    @classmethod
    def from_config(cls, cfg) -> VGG11BN:
        return cls(cfg.in_chans, cfg.stride_plan)

    def geometry_layers(self) -> list[nn.Module]:
        return [block[0] for block in self.features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


@register_backbone(
    "small_cnn",
    description="3-layer CNN for CPU demos and tests (6x6 patches of 10x10 px at 32x32)",
    base_plan=(1, 2, 1), upscale_order=(2, 0),
    patch_defaults={"patch_kernel": 5, "patch_stride": 2, "patch_channels": 128},
    compare_plans=((1, 2, 1), (2, 2, 1), (1, 1, 1)))
class SmallCNN(TracedBackbone):
    """A few conv-BN-ReLU layers: the CPU-friendly backbone for demos, tests and the shipped model.

    Default plan (1, 2, 1): a 32x32 input gives a 16x16 map; with its default 5x5 / stride-2 patch
    conv that is a 6x6 grid of 10x10-pixel patches, the same grid as the paper's model.
    """

    widths = (32, 64, 96)

    def __init__(self, in_chans: int, stride_plan: Sequence[int]) -> None:
        super().__init__()
        if len(stride_plan) != len(self.widths):
            raise ValueError(f"stride_plan for small_cnn needs 3 entries; got {tuple(stride_plan)}")
        cin, layers = in_chans, []
        for width, stride in zip(self.widths, stride_plan):
            layers.append(conv_bn_relu(cin, width, 3, stride))
            cin = width
        self.features = nn.Sequential(*layers)
        self.out_channels = cin

    @classmethod
    def from_config(cls, cfg) -> SmallCNN:
        return cls(cfg.in_chans, cfg.stride_plan)

    def geometry_layers(self) -> list[nn.Module]:
        return [block[0] for block in self.features]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)


def check_timm_name(model: str) -> None:
    import timm

    if not timm.is_model(model):
        raise ConfigError(f"model.backbone 'timm:{model}': timm has no model {model!r} (see "
                          "timm.list_models())")


@register_backbone(
    "timm:", prefix=True, check_name=check_timm_name,
    description="any timm model as 'timm:<name>' (features_only; pretrained only if asked)",
    patch_defaults={"patch_kernel": 3, "patch_stride": 1, "patch_channels": 512})
class TimmBackbone(nn.Module):
    """Any timm model as a feature extractor (its last feature map).

    timm models are not traced layer by layer: the cumulative stride comes from timm's own
    ``feature_info.reduction()`` (which accounts for ``output_stride``) and the map size from a
    dry run at the requested input size, cached per size.
    """

    def __init__(self, model_name: str, in_chans: int, output_stride: int | None,
                 pretrained: bool) -> None:
        super().__init__()
        import timm

        kwargs = {"features_only": True, "out_indices": (-1,), "in_chans": in_chans,
                  "pretrained": pretrained}
        if output_stride is not None:
            kwargs["output_stride"] = output_stride
        try:
            self.body = timm.create_model(model_name, **kwargs)
        except (RuntimeError, TypeError, ValueError) as exc:
            raise ValueError(f"backbone 'timm:{model_name}' cannot be built as a feature "
                             f"extractor: {exc}") from exc
        except OSError as exc:  # hub errors (offline, not cached) are OSErrors
            raise ValueError(f"pretrained weights for timm:{model_name} are not available here "
                             f"(offline and not cached?): {exc}. Use pretrained=False, or fetch "
                             "the weights once with a network.") from exc
        self.model_name = model_name
        self.in_chans = in_chans
        self.out_channels = int(self.body.feature_info.channels()[-1])
        self.reduction = int(self.body.feature_info.reduction()[-1])
        self._sizes: dict[tuple[int, int], tuple[int, int]] = {}

    @classmethod
    def from_config(cls, cfg) -> TimmBackbone:
        return cls(cfg.backbone.split(":", 1)[1], cfg.in_chans, cfg.timm_output_stride,
                   cfg.pretrained)

    def _probe(self, input_size: tuple[int, int]) -> tuple[int, int]:
        device = next(self.parameters()).device
        was_training = self.training
        self.eval()
        try:
            with torch.no_grad():
                feats = self.body(torch.zeros(1, self.in_chans, *input_size, device=device))[-1]
        except RuntimeError as exc:
            raise ValueError(f"input_size {tuple(input_size)} is too small for "
                             f"timm:{self.model_name}: {exc}") from exc
        finally:
            self.train(was_training)
        return int(feats.shape[-2]), int(feats.shape[-1])

    def feature_geom(self, input_size: tuple[int, int]) -> MapGeom:
        key = (int(input_size[0]), int(input_size[1]))
        if key not in self._sizes:
            self._sizes[key] = self._probe(key)
        return MapGeom(self._sizes[key], (self.reduction, self.reduction))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)[-1]
