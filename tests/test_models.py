"""Every backbone x head builds and trains one step; parameter counts equal the paper's."""

import pytest
import torch

from engine.config import LossConfig, ModelConfig
from engine.losses import Criterion
from engine.models import (
    LogitsOnly,
    backbone_spec,
    build_model,
    count_parameters,
    head_spec,
    list_backbones,
    list_heads,
)

PATCH_HEADS = [h for h in list_heads() if head_spec(h).cls.has_patches]


def _step(cfg, batch, size):
    model = build_model(cfg).train()
    x = torch.randn(batch, cfg.in_chans, size, size)
    y = torch.randint(0, cfg.num_classes, (batch,))
    out = model(x)
    Criterion(LossConfig(), model.regularised)(out, y, 100).total.backward()
    return model, out


def _check(model, out, batch):
    assert out.logits.shape == (batch, model.config.num_classes)
    assert torch.isfinite(out.logits).all()
    # Every parameter takes part in the loss (a detached path would leave a grad of None), and
    # the gradient reaches both ends of the network.
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    first = next(p for p in model.backbone.parameters())
    assert first.grad.abs().sum() > 0, "no gradient reached the backbone's first layer"
    last = list(model.head.parameters())[-1]  # the classifier (Dynamic Routing: the scale)
    assert last.grad.abs().sum() > 0, "no gradient reached the head's last parameter"
    if out.grid is None:
        assert out.patch_logits is None and out.patch_weights is None
        return
    m = out.grid.num_patches
    assert out.patch_weights.shape == (batch, m)
    assert out.patch_logits.shape == (batch, m, model.config.num_classes)
    torch.testing.assert_close(out.patch_weights.sum(1), torch.ones(batch), atol=1e-5, rtol=0)
    assert out.grid.boxes.shape == (m, 4)


def _paper_scale(backbone: str) -> bool:
    """Millions of parameters on a stride-free 32x32 map: a step costs about a second here."""
    with torch.device("meta"):
        model = build_model(ModelConfig(backbone=backbone, head="plain"))
    return count_parameters(model) > 5_000_000


def _backbone_head_size():
    """Every backbone x head x input size, but a paper-scale backbone at 64 px with one head:
    it hands every head the same 32x32 map at 64 px as at 32 px (a stride in an early stage),
    so its other heads' 64-px steps would repeat their 32-px ones at a second each."""
    for backbone in list_backbones():
        heavy = _paper_scale(backbone)
        for head in list_heads():
            for size in (32, 64):
                if not (heavy and size == 64 and head != "loss_attention"):
                    yield backbone, head, size


# Parametrised over the registries: a new backbone or head is tested here without a new line.
@pytest.mark.parametrize("backbone, head, size", list(_backbone_head_size()))
def test_every_backbone_with_every_head(backbone, head, size):
    cfg = ModelConfig(backbone=backbone, head=head, input_size=size)
    model, out = _step(cfg, 2, size)
    _check(model, out, 2)
    # The grid the geometry predicts is the grid the patch conv produced.
    fmap = model.backbone(torch.zeros(1, 3, size, size))
    if out.grid is not None:
        assert tuple(fmap.shape[-2:]) == out.grid.feature_size


def test_paper_scale_backbones_hand_every_head_the_same_map_at_64_px():
    """What lets the test above try one head, not all, on a paper-scale backbone at 64 px."""
    heavy = [b for b in list_backbones() if _paper_scale(b)]
    assert heavy, "no paper-scale backbone registered"
    for backbone in heavy:
        with torch.device("meta"):
            maps = [build_model(ModelConfig(backbone=backbone, input_size=size)).backbone(
                torch.zeros(1, 3, size, size)).shape for size in (32, 64)]
        assert maps[0] == maps[1], (backbone, maps)


@pytest.mark.parametrize("backbone", list_backbones())
@pytest.mark.parametrize("head", [h for h in list_heads() if head_spec(h).cls.regularised])
@pytest.mark.parametrize("size", [32, 64])
def test_every_backbone_takes_a_batch_of_one(backbone, head, size):
    model, out = _step(ModelConfig(backbone=backbone, head=head, input_size=size), 1, size)
    _check(model, out, 1)


@pytest.mark.parametrize("head", PATCH_HEADS)
def test_xi_dependent_flag_tells_whether_xi_acts(head):
    """Evaluation sweeps ξ only for heads that say ξ acts: the flag must tell the truth."""
    model = build_model(ModelConfig(backbone="small_cnn", head=head)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        low, high = model(x, xi=0.0), model(x, xi=1.0)
    changed = not torch.equal(low.patch_weights, high.patch_weights)
    assert model.xi_dependent == changed == model.regularised


def test_registries_know_the_papers_models_and_their_display_text():
    assert {"resnet18", "vgg11_bn", "small_cnn"} <= set(list_backbones())
    assert {"loss_attention", "capsule_loss_attention", "mean", "attention", "gated_attention",
            "dynamic_routing", "plain"} <= set(list_heads())
    for head in list_heads():
        spec = head_spec(head)
        assert spec.label and spec.description and spec.recipe in ("sgd", "adam")
    for backbone in list_backbones():  # every plan the Stride page offers builds, 32 and 64 px
        for plan in backbone_spec(backbone).compare_plans:
            for size in (32, 64):
                with torch.device("meta"):
                    build_model(ModelConfig(backbone=backbone, stride_plan=plan,
                                            input_size=size))


def test_timm_backbone():
    cfg = ModelConfig(backbone="timm:resnet18", head="loss_attention", input_size=64,
                      timm_output_stride=8, patch_kernel=3, patch_channels=64)
    model, out = _step(cfg, 2, 64)
    _check(model, out, 2)
    assert (out.grid.rows, out.grid.cols) == (6, 6)
    assert out.grid.boxes[0].tolist() == [0, 0, 24, 24]  # 3 cells of 8 px


def _count(**kwargs):
    with torch.device("meta"):
        return count_parameters(build_model(ModelConfig(**kwargs)))


@pytest.mark.parametrize("backbone, head, paper", [
    ("resnet18", "loss_attention", 32_671_818),
    ("resnet18", "mean", 32_671_818),
    ("resnet18", "attention", 32_737_611),
    ("resnet18", "gated_attention", 32_803_275),
    ("vgg11_bn", "loss_attention", 30_728_970),
    ("vgg11_bn", "attention", 30_794_763),
    ("vgg11_bn", "gated_attention", 30_860_427),
    ("resnet18", "plain", 11_173_962),
])
def test_parameter_counts_match_paper(backbone, head, paper):
    assert _count(backbone=backbone, head=head) == paper


def test_vgg_baseline_with_paper_classifier():
    assert _count(backbone="vgg11_bn", head="plain", plain_hidden=(4096, 4096)) == 28_149_514


@pytest.mark.parametrize("backbone, paper", [("resnet18", 32_962_410), ("vgg11_bn", 31_019_562)])
def test_capsule_parameter_count_differs_only_by_unused_shortcuts(backbone, paper):
    from engine.models.heads import CapsuleLossAttentionHead

    cfg = ModelConfig(backbone=backbone, head="capsule_loss_attention")
    dead = CapsuleLossAttentionHead.unused_shortcut_params(cfg)
    assert dead == 270_336
    assert _count(backbone=backbone, head="capsule_loss_attention") + dead == paper


@pytest.mark.parametrize("backbone, ours, paper_millions", [
    ("resnet18", 32_484_929, 35.35), ("vgg11_bn", 30_542_081, 33.41)])
def test_dynamic_routing_parameter_count_differs_by_per_position_votes(backbone, ours,
                                                                       paper_millions):
    """Our votes are shared over the 36 patch positions; the paper's Table II counts match
    votes per position (Sabour et al.'s W_ij per input capsule), and not the dead shortcuts."""
    from engine.models.heads import CapsuleLossAttentionHead, DynamicRoutingHead

    cfg = ModelConfig(backbone=backbone, head="dynamic_routing")
    with torch.device("meta"):
        model = build_model(cfg)
    assert count_parameters(model) == ours
    shared = model.head.votes.numel()
    patches = model.grid((32, 32)).num_patches
    per_position = DynamicRoutingHead.per_position_vote_params(cfg, patches)
    assert (shared, per_position, per_position - shared) == (81_920, 2_949_120, 2_867_200)
    with_per_position = ours - shared + per_position  # 35,352,129 / 33,409,281
    assert round(with_per_position / 1e6, 2) == paper_millions
    dead = CapsuleLossAttentionHead.unused_shortcut_params(cfg)
    assert round((with_per_position + dead) / 1e6, 2) != paper_millions
    assert round((ours + dead) / 1e6, 2) != paper_millions


def test_loss_attention_head_has_no_parameters_of_its_own():
    la = build_model(ModelConfig(backbone="small_cnn", head="loss_attention"))
    mean = build_model(ModelConfig(backbone="small_cnn", head="mean"))
    assert count_parameters(la) == count_parameters(mean)
    assert {n for n, _ in la.head.named_parameters() if not n.startswith("patches.")} == {
        "fc.weight", "fc.bias"}


def test_xi_override_at_call_time_changes_selection_without_retraining():
    model = build_model(ModelConfig(backbone="small_cnn", xi=0.1)).eval()
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        kept = [(model(x, xi=xi).patch_weights > 0).sum().item() for xi in (0.0, 0.5, 1.0)]
        tokens = model.encode(x)
        grid = model.grid((32, 32))
        again = model.decode(tokens, grid, xi=1.0).patch_weights
        torch.testing.assert_close(again, model(x, xi=1.0).patch_weights)
    assert kept[0] >= kept[1] >= kept[2] >= 4
    assert kept[0] > kept[2]
    with pytest.raises(ValueError, match="xi"):
        model(x, xi=1.5)


def test_xi_denominator_feature_map_keeps_more_patches():
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    paper = build_model(ModelConfig(backbone="small_cnn", xi=1.0)).eval()
    code = build_model(ModelConfig(backbone="small_cnn", xi=1.0, xi_denominator="feature_map"))
    code.load_state_dict(paper.state_dict())
    with torch.no_grad():
        n_paper = (paper(x).patch_weights > 0).sum()
        n_code = (code.eval()(x).patch_weights > 0).sum()
    assert n_code > n_paper  # θ = 1/256 instead of 1/36


def test_logits_only_wrapper():
    model = build_model(ModelConfig(backbone="small_cnn")).eval()
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(LogitsOnly(model)(x), model(x).logits)


def test_stem_norm_false_reproduces_released_code():
    model = build_model(ModelConfig(backbone="resnet18", stem_norm=False))
    model(torch.randn(1, 3, 32, 32)).logits.sum().backward()
    assert model.backbone.bn1.weight.grad is None  # defined, never used, as in the TIP code


def test_timm_pretrained_unavailable_offline_is_a_clear_error():
    # conftest sets HF_HUB_OFFLINE=1 and no weights are cached: a message, not a hang.
    cfg = ModelConfig(backbone="timm:resnet18", pretrained=True, input_size=64,
                      timm_output_stride=8, patch_kernel=3)
    with pytest.raises(ValueError, match="pretrained weights for timm:resnet18"):
        build_model(cfg)


@pytest.mark.parametrize("head", list_heads())
def test_xi_cache_reproduces_forward_at_every_xi(head):
    model = build_model(ModelConfig(backbone="small_cnn", head=head)).eval()
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        cache = model.xi_cache(x)
        grid = model.grid((32, 32))
        for xi in (0.0, 0.1, 0.5, 1.0):
            direct, cached = model(x, xi=xi), model.decode_cached(cache, grid, xi=xi)
            torch.testing.assert_close(cached.logits, direct.logits, atol=1e-5, rtol=1e-5)
            if direct.patch_weights is not None:
                torch.testing.assert_close(cached.patch_weights, direct.patch_weights)
                torch.testing.assert_close(cached.patch_logits, direct.patch_logits)
    if head in ("loss_attention", "capsule_loss_attention"):
        per_image = sum(v[0].numel() for v in cache.values())
        assert per_image < model.encode(x)[0].numel()  # smaller than the tokens


def test_the_torch_free_catalog_lists_exactly_the_registry():
    """`python -m engine models` reads the catalog from the registration decorators' source
    so that it does not import torch; it must say what the registry holds, in its order."""
    import subprocess
    import sys

    from engine.catalog import backbone_catalog, head_catalog
    from engine.models import backbone_descriptions, head_spec, list_heads

    assert backbone_catalog() == backbone_descriptions()
    assert list(backbone_catalog()) == list(backbone_descriptions())
    assert head_catalog() == {name: head_spec(name).description for name in list_heads()}
    assert list(head_catalog()) == list_heads()
    probe = ("import sys, runpy; sys.argv = ['engine', 'models'];\n"
             "try: runpy.run_module('engine', run_name='__main__')\n"
             "except SystemExit: pass\n"
             "print('TORCH' if 'torch' in sys.modules else 'NO TORCH')")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                         check=True).stdout
    assert "loss_attention" in out and out.strip().endswith("NO TORCH")
