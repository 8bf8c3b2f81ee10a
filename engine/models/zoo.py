"""The built-in backbones and heads, registered by name."""

from __future__ import annotations

from engine.models import heads
from engine.models.backbones import VGG11BN, ResNet18, SmallCNN, TimmBackbone
from engine.models.registry import BackboneSpec, HeadSpec, register_backbone, register_head

PAPER_PATCH = {"patch_kernel": 9, "patch_stride": 4, "patch_channels": 512}

register_backbone(BackboneSpec(
    name="resnet18",
    description="ResNet18 modified as in the paper (all strides 1 at 32x32; layer2 stride 2 at "
                "64x64)",
    build=lambda cfg: ResNet18(cfg.in_chans, cfg.stride_plan, cfg.stem_norm),
    base_plan=(1, 1, 1, 1),
    upscale_order=(1, 2, 3, 0),
    baseline_plan=(1, 2, 2, 2),
    patch_defaults=PAPER_PATCH,
))
register_backbone(BackboneSpec(
    name="vgg11_bn",
    description="VGG11_bn modified as in the paper (max-pools and FC layers removed; 4th conv "
                "stride 2 at 64x64)",
    build=lambda cfg: VGG11BN(cfg.in_chans, cfg.stride_plan),
    base_plan=(1,) * 8,
    upscale_order=(3, 5, 7, 1),
    baseline_plan=(1, 2, 2, 1, 2, 1, 2, 1),
    patch_defaults=PAPER_PATCH,
))
register_backbone(BackboneSpec(
    name="small_cnn",
    description="3-layer CNN for CPU demos and tests (6x6 patches of 10x10 px at 32x32)",
    build=lambda cfg: SmallCNN(cfg.in_chans, cfg.stride_plan),
    base_plan=(1, 2, 1),
    upscale_order=(2, 0),
    patch_defaults={"patch_kernel": 5, "patch_stride": 2, "patch_channels": 128},
))
register_backbone(BackboneSpec(
    name="timm",
    description="any timm model as 'timm:<name>' (features_only; pretrained only if asked)",
    build=lambda cfg: TimmBackbone(cfg.backbone.split(":", 1)[1], cfg.in_chans,
                                   cfg.timm_output_stride, cfg.pretrained),
    base_plan=None,
    patch_defaults={"patch_kernel": 3, "patch_stride": 1, "patch_channels": 512},
))

for _name, _cls, _text in [
    ("loss_attention", heads.LossAttentionHead, "Loss-Attention, conv patches (TIP Eq. 5)"),
    ("capsule_loss_attention", heads.CapsuleLossAttentionHead,
     "Loss-Attention, capsules (TIP Eqs. 6, 11)"),
    ("mean", heads.MeanPoolingHead, "Mean-pooling of patches (baseline)"),
    ("attention", heads.AttentionHead, "Attention pooling, Ilse et al. 2018 (baseline)"),
    ("gated_attention", heads.GatedAttentionHead,
     "Gated-Attention pooling, Ilse et al. 2018 (baseline)"),
    ("dynamic_routing", heads.DynamicRoutingHead,
     "Capsules with routing-by-agreement, Sabour et al. 2017 (baseline)"),
    ("plain", heads.PlainHead, "Global average pooling + linear, no patches (baseline)"),
]:
    register_head(HeadSpec(_name, _text, _cls))
