"""Mutual transfer of local attention maps: known answers for the maps and the Pearson loss,
the K-peer trainer (checkpoints, resume, the λ = 0 control) and its bad input."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import kill_mid_epoch
from torch import nn

from engine.checkpoint import load_checkpoint, load_model, peer_state
from engine.config import ConfigError, DataConfig, ModelConfig, RunConfig, TrainConfig
from engine.local_maps import (
    EPS,
    captured,
    channel_map,
    chosen_layers,
    common_side,
    global_map,
    layer_map,
    region_pearson,
    regions,
    transfer_loss,
    unit_map,
)
from engine.models import build_model
from engine.runs import RunStore
from engine.team import map_plan, peer_rows
from engine.train import prepare_run_config, train_run

# ----------------------------------------------------------------------------------------------
# Known answers


def _two_by_two(*blocks):
    """A (1, 4, 4) map whose 2x2 regions, row-major, hold the given 4 values each."""
    m = torch.zeros(1, 4, 4)
    for idx, values in enumerate(blocks):
        i, j = divmod(idx, 2)
        m[0, 2 * i:2 * i + 2, 2 * j:2 * j + 2] = torch.tensor(values, dtype=torch.float).view(2, 2)
    return m


def _standardise(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def _pearson_with_eps(a, b):
    """The documented formula, by hand, on one region of already standardised maps."""
    ma, mb = sum(a) / len(a), sum(b) / len(b)
    ca, cb = [v - ma for v in a], [v - mb for v in b]
    eps = EPS * len(a)
    num = sum(x * y for x, y in zip(ca, cb, strict=True))
    return num / math.sqrt((sum(x * x for x in ca) + eps) * (sum(y * y for y in cb) + eps))


def test_regions_are_row_major_blocks():
    m = _two_by_two([1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13, 14, 15, 16])
    r = regions(m, 2)
    assert r.shape == (1, 2, 2, 4)
    assert r[0, 0, 1].tolist() == [5, 6, 7, 8] and r[0, 1, 0].tolist() == [9, 10, 11, 12]
    with pytest.raises(ValueError, match="does not divide"):
        regions(torch.zeros(1, 5, 4), 2)


def test_region_pearson_known_answers():
    a = _two_by_two([1, 2, 3, 4], [1, 2, 3, 4], [1, 0, 0, 0], [1, 2, 3, 4])
    b = _two_by_two([2, 4, 6, 8], [4, 3, 2, 1], [1, 1, 0, 0], [5, 5, 5, 5])
    rho = region_pearson(a, b, 2)[0]
    blocks_a = [[1, 2, 3, 4], [1, 2, 3, 4], [1, 0, 0, 0], [1, 2, 3, 4]]
    blocks_b = [[2, 4, 6, 8], [4, 3, 2, 1], [1, 1, 0, 0], [5, 5, 5, 5]]
    # The same whole-map standardisation, by hand (region order: row-major blocks).
    sa = _standardise([v for block in blocks_a for v in block])
    sb = _standardise([v for block in blocks_b for v in block])
    expected = [_pearson_with_eps(sa[4 * i:4 * i + 4], sb[4 * i:4 * i + 4]) for i in range(4)]
    torch.testing.assert_close(rho.flatten(), torch.tensor(expected), atol=1e-6, rtol=0)
    # Without ε these are exactly 1, -1, 1/sqrt(3) and 0.
    torch.testing.assert_close(rho.flatten(), torch.tensor([1.0, -1.0, 1 / math.sqrt(3), 0.0]),
                               atol=2e-3, rtol=0)


def test_pearson_ignores_scale_and_offset_of_a_map():
    torch.manual_seed(0)
    a, b = torch.rand(3, 8, 8), torch.rand(3, 8, 8)
    torch.testing.assert_close(region_pearson(a, b, 4), region_pearson(5 * a, b + 3.0, 4))
    assert region_pearson(a, a, 4).min() > 0.99


def test_constant_region_gives_zero_and_a_finite_gradient():
    a = _two_by_two([3, 3, 3, 3], [1, 2, 3, 4], [0, 1, 0, 1], [2, 2, 1, 1]).requires_grad_()
    b = _two_by_two([1, 2, 3, 4], [1, 2, 3, 4], [0, 1, 0, 1], [0, 0, 1, 1])
    rho = region_pearson(a, b, 2)
    assert rho[0, 0, 0].item() == 0.0
    loss = (1 - rho).mean()
    loss.backward()
    assert torch.isfinite(a.grad).all()
    # The flat region's gradient pushes it towards b's pattern there (down where b is high)...
    flat = a.grad[0, :2, :2].flatten()
    assert flat[3] < 0 < flat[0]
    # ...and stays bounded by 1 / sqrt(ε n) in the standardised scale (here n = 4 pixels).
    assert flat.abs().max() * a.detach().std(unbiased=False) < 1 / math.sqrt(EPS * 4)


def test_a_flat_or_zero_map_keeps_finite_gradients():
    """A whole map that is constant (or a layer that is all zero, a dead ReLU) must not send
    NaN into the weights: the loss would be finite and the NaN check would not see it."""
    own = torch.full((1, 8, 8), 0.25, requires_grad=True)
    loss = transfer_loss(own, [torch.rand(1, 8, 8)], 4)
    loss.backward()
    assert loss.item() == pytest.approx(1.0) and torch.isfinite(own.grad).all()
    dead = torch.zeros(2, 4, 8, 8, requires_grad=True)
    live = torch.rand(2, 4, 8, 8, requires_grad=True)
    m = global_map([dead, live], (8, 8), 2.0)
    transfer_loss(m, [torch.rand(2, 8, 8)], 2).backward()
    assert torch.isfinite(dead.grad).all() and torch.isfinite(live.grad).all()


def test_transfer_loss_teaches_only_the_learner():
    torch.manual_seed(1)
    own = torch.rand(2, 8, 8, requires_grad=True)
    other = torch.rand(2, 8, 8, requires_grad=True)
    loss = transfer_loss(own, [other], 2)
    expected = (1 - region_pearson(own, other, 2)).mean()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert own.grad is not None and other.grad is None
    assert transfer_loss(own.detach(), [own.detach()], 2).item() < 1e-3


def test_layer_and_global_map_known_answer():
    # Layer A: 2 channels, constant 1 and 3 -> mean |a| = 2 everywhere -> L2-normalised 0.5.
    a = torch.stack([torch.ones(2, 2), 3 * torch.ones(2, 2)])[None]
    # Layer B: one channel [[0, 2], [0, 0]] at p = 2 -> [[0, 4], [0, 0]] -> [[0, 1], [0, 0]].
    b = torch.tensor([[0.0, 2.0], [0.0, 0.0]])[None, None]
    torch.testing.assert_close(layer_map(a, (2, 2), 1.0), torch.full((1, 2, 2), 0.5))
    torch.testing.assert_close(layer_map(b, (2, 2), 2.0), torch.tensor([[[0.0, 1.0], [0, 0]]]))
    torch.testing.assert_close(global_map([a, b], (2, 2), 2.0),
                               torch.tensor([[[0.5, 1.5], [0.5, 0.5]]]))
    # A smaller map is resized (bilinear) before it is normalised.
    small = layer_map(torch.ones(1, 1, 1, 1), (4, 4), 1.0)
    torch.testing.assert_close(small, torch.full((1, 4, 4), 0.25))


def test_channel_energy_gradient_is_exact_and_keeps_dtype_and_layout():
    """The fused p = 2 map (maps._ChannelEnergy) has the gradient of mean(a * a) over the
    channels, and hands it back in the activation's dtype and memory format: a gradient in
    another layout made the ReLU backward and the gradient sum of every hooked layer slow."""
    torch.manual_seed(0)
    a = torch.randn(2, 5, 6, 6, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer_map(t, (8, 8), 2.0), (a,))
    ref = a.detach().clone().requires_grad_(True)
    w = torch.rand(2, 8, 8, dtype=torch.float64)
    (layer_map(a, (8, 8), 2.0) * w).sum().backward()
    expected = F.interpolate((ref * ref).mean(1, keepdim=True), size=(8, 8), mode="bilinear",
                             align_corners=False).flatten(1)
    (((expected / expected.norm(dim=1, keepdim=True)).view(2, 8, 8)) * w).sum().backward()
    torch.testing.assert_close(a.grad, ref.grad)
    for dtype in (torch.float32, torch.bfloat16):
        x = torch.randn(2, 5, 6, 6).to(dtype=dtype, memory_format=torch.channels_last)
        x.requires_grad_(True)
        m = layer_map(x, (8, 8), 2.0)
        assert m.dtype == torch.float32
        m.sum().backward()
        assert x.grad.dtype == dtype
        assert x.grad.is_contiguous(memory_format=torch.channels_last)


def test_a_bf16_map_is_the_fp32_map_to_bf16_precision_without_an_fp32_copy():
    """On the CPU a bf16 activation's energy is reduced as bf16: within 1 % of the fp32 energy
    of the same values, pixel by pixel, and the activation is never copied whole to another
    dtype on the way (that copy cost more than the rest of the map)."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    a = torch.rand(4, 96, 16, 16).to(torch.bfloat16)
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        got = channel_map(a, 2.0)
    copies = [e.name for e in prof.events()
              if e.name in ("aten::_to_copy", "aten::copy_") and list(a.shape) in e.input_shapes]
    assert not copies
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, channel_map(a.float(), 2.0), rtol=1e-2, atol=0)


def test_maps_stay_fp32_under_autocast_and_after_inference_mode():
    """The resize's matrix products are fp32 even inside bf16 autocast; and its weights, cached
    on first use, can be first made in inference mode and still serve a backward later."""
    m = torch.rand(2, 1, 5, 3)
    with torch.inference_mode():
        unit_map(m, (10, 6))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit_map(m, (10, 6)).dtype == torch.float32
    x = m.clone().requires_grad_(True)
    unit_map(x, (10, 6)).pow(2).sum().backward()
    assert torch.isfinite(x.grad).all()


@pytest.mark.parametrize(("src", "dst"), [((16, 16), (32, 32)), ((7, 5), (12, 20)),
                                          ((9, 9), (4, 6)), ((1, 1), (4, 4))])
def test_a_map_is_resized_as_bilinear_interpolation_does(src, dst):
    """A layer's map is resized by two matrix products: F.interpolate's bilinear map (to fp32
    rounding) up and down, with the same gradient."""
    torch.manual_seed(0)
    m = torch.rand(3, 1, *src, requires_grad=True)
    ref = m.detach().clone().requires_grad_(True)
    w = torch.rand(3, *dst)
    got = unit_map(m, dst)
    up = F.interpolate(ref, size=dst, mode="bilinear", align_corners=False).flatten(1)
    want = (up / up.norm(dim=1, keepdim=True)).view(3, *dst)
    torch.testing.assert_close(got, want)
    (got * w).sum().backward()
    (want * w).sum().backward()
    torch.testing.assert_close(m.grad, ref.grad)


def test_common_side_is_a_multiple_of_the_grid_with_regions_of_two():
    assert common_side([16, 32], 4) == 32
    assert common_side([6], 4) == 8
    assert common_side([6], 6) == 12
    assert common_side([30], 4) == 32


def test_layers_of_the_projects_backbones():
    small = build_model(ModelConfig(backbone="small_cnn"))
    layers = chosen_layers(small.backbone, 3, (32, 32), 3, "model.backbone")
    assert [(x.name, x.size) for x in layers] == [
        ("features.0", (32, 32)), ("features.1", (16, 16)), ("features.2", (16, 16))]
    resnet = build_model(ModelConfig(backbone="resnet18", input_size=64))
    assert [(x.name, x.size) for x in chosen_layers(resnet.backbone, 3, (64, 64), 2, "b")] == [
        ("layer3", (32, 32)), ("layer4", (32, 32))]
    # timm's MobileNet features loop over their blocks: the container is opened.
    mobile = build_model(ModelConfig(backbone="timm:mobilenetv3_small_050", input_size=64,
                                     timm_output_stride=8))
    assert [x.name for x in chosen_layers(mobile.backbone, 3, (64, 64), 2, "b")] == [
        "body.blocks.4", "body.blocks.5"]
    with captured(small.backbone, ["features.2"]) as tap:
        small(torch.zeros(2, 3, 32, 32))
        assert tap.take()[0].shape == (2, 96, 16, 16)
    assert not small.backbone.features[2]._forward_hooks  # released


class _Flat(nn.Module):
    """A backbone without child modules: nothing for a hook to catch."""

    out_channels = 3

    def forward(self, x):
        return nn.functional.avg_pool2d(x, 2)


def test_a_backbone_without_usable_layers_is_named():
    model = build_model(ModelConfig(backbone="small_cnn"))
    peer = build_model(ModelConfig(backbone="small_cnn"))
    peer.backbone = _Flat()
    cfg = RunConfig(transfer={"peers": [{"backbone": "small_cnn"}]}).transfer
    with pytest.raises(ConfigError, match=r"transfer\.peers\[0\]\.backbone.*no usable "
                                          r"intermediate layer"):
        map_plan([model, peer], cfg)


# ----------------------------------------------------------------------------------------------
# Bad input, each naming its field


def _mutual(name=None, peers=({"backbone": "small_cnn"},), epochs=2, train_size=256, **transfer):
    return RunConfig(name=name, model=ModelConfig(backbone="small_cnn"),
                     data=DataConfig(train_size=train_size, test_size=64),
                     train=TrainConfig(epochs=epochs, batch_size=64),
                     transfer={"peers": list(peers), **transfer})


@pytest.mark.parametrize("change, field", [
    ({"lam": -0.5}, r"transfer\.lam must be a number >= 0"),
    ({"peers": []}, r"transfer\.peers must be at least one other peer"),
    ({"peers": [{"backbone": "small_cnn", "num_classes": 7}]},
     r"transfer\.peers\[0\]\.num_classes must be equal to model\.num_classes"),
    ({"grid": 0}, r"transfer\.grid must be a positive int"),
    ({"map_source": "saliency"}, r"transfer\.map_source must be one of"),
    ({"peers": [{"backbone": "small_cnn", "xi": 2}]}, r"transfer\.peers\[0\]\.xi must be"),
])
def test_bad_transfer_settings_name_the_field(change, field):
    with pytest.raises(ConfigError, match=field):
        _mutual(**change)


@pytest.mark.parametrize("change, field", [
    ({"grid": 40}, r"transfer\.grid=40 is larger than the attention map of peer 0 .*32x32"),
    ({"grid": 7, "map_source": "patch_weights"},
     r"transfer\.grid=7 is larger than the attention map of peer 0 .*6x6"),
    ({"map_source": "patch_weights", "peers": [{"backbone": "small_cnn", "head": "plain"}]},
     r"transfer\.peers\[0\]\.head='plain' has no learned patch weights"),
    ({"peers": [{"backbone": "timm:not_a_model"}]}, r"timm has no model"),
])
def test_maps_are_checked_when_the_run_is_prepared(change, field):
    with pytest.raises(ConfigError, match=field):
        prepare_run_config(_mutual(**change))


# ----------------------------------------------------------------------------------------------
# The trainer


PLAIN = ({"backbone": "small_cnn", "head": "plain"},)


@pytest.fixture(scope="module")
def mutual_run(tmp_path_factory):
    store = RunStore(tmp_path_factory.mktemp("runs"))
    # Peers of different heads: each must be saved, resumed and exported as itself.
    run = store.create(prepare_run_config(_mutual("mutual", epochs=2, lam=2.0, peers=PLAIN)))
    assert train_run(run, progress_bar=False) == "finished"
    return run


def test_mutual_run_holds_every_peer(mutual_run):
    rows = mutual_run.metrics()
    assert len(rows) == 2
    for key in ("train_transfer_loss", "test_map_pearson"):
        assert key in rows[-1], key
    peers = rows[-1]["peers"]  # each peer's own statistics, a list (no suffixed keys)
    assert len(peers) == 2 and not any(key.startswith("peer0_") for key in rows[-1])
    for own in peers:
        assert {"test_acc", "train_loss", "train_acc", "eval_images"} <= set(own)
    assert peer_rows(rows[-1]) == peers
    assert rows[-1]["test_acc"] == pytest.approx((peers[0]["test_acc"] + peers[1]["test_acc"]) / 2)
    assert rows[-1]["train_acc"] == (peers[0]["train_acc"] + peers[1]["train_acc"]) / 2
    assert -1 <= rows[-1]["test_map_pearson"] <= 1
    progress = mutual_run.status().fields
    assert [own["last_metric"] for own in progress["peers"]] == [own["test_acc"] for own in peers]
    ckpt = load_checkpoint(mutual_run.last_checkpoint)
    assert ckpt["version"] == 2 and "model" not in ckpt  # one layout: every peer in "peers"
    assert len(ckpt["peers"]) == 2 and all("optimizer" in own for own in ckpt["peers"])
    # Each peer is also a standalone checkpoint (a team of one), and it is that peer.
    peer1, standalone = load_model(mutual_run.peer_checkpoint(1))
    assert standalone["run_config"]["transfer"] is None and len(standalone["peers"]) == 1
    assert standalone["metrics"] == {"epoch": standalone["metrics"]["epoch"],
                                     **rows[standalone["metrics"]["epoch"]]["peers"][1]}
    best = load_checkpoint(mutual_run.best_checkpoint)
    for key, value in peer_state(best, 1).items():
        torch.testing.assert_close(peer1.state_dict()[key], value, atol=0, rtol=0)
    # load_model sees peer 0 by default, and any peer when asked
    for k in (0, 1):
        model, _ = load_model(mutual_run.best_checkpoint, peer=k)
        assert model.config.head == ("loss_attention", "plain")[k]
        for key, value in peer_state(best, k).items():
            torch.testing.assert_close(model.state_dict()[key], value, atol=0, rtol=0)
    summary = RunStore(mutual_run.path.parent).list()[0]
    assert summary["backbone"] == "small_cnn + small_cnn"


def test_export_writes_a_peer_as_itself(mutual_run, tmp_path):
    from engine.errors import RunError
    from engine.export import export_model

    weights, card = export_model(mutual_run, tmp_path / "p1.pt", peer=1)
    ckpt = load_checkpoint(weights)
    best_row = mutual_run.metrics()[ckpt["metrics"]["epoch"]]
    assert ckpt["metrics"]["test_acc"] == best_row["peers"][1]["test_acc"]
    assert ckpt["run_config"]["transfer"] is None and list(ckpt["peers"][0]) == ["model"]
    assert "peer 1" in card.read_text() and "Mutual transfer" in card.read_text()
    with pytest.raises(RunError, match=r"--peer must be in 0\.\.1"):
        export_model(mutual_run, tmp_path / "p2.pt", peer=2)


def test_mutual_run_resumes_exactly(mutual_run, tmp_path, monkeypatch):
    store = RunStore(tmp_path)
    cfg = _mutual("often", epochs=2, lam=2.0, peers=PLAIN)
    cfg.train.checkpoint_minutes = 1e-6  # a checkpoint every step
    run = store.create(prepare_run_config(cfg))
    kill_mid_epoch(run, monkeypatch)
    assert train_run(run, resume=True, progress_bar=False) == "finished"
    a, b = load_checkpoint(mutual_run.last_checkpoint), load_checkpoint(run.last_checkpoint)
    for mine, theirs in ((peer_state(a, k), peer_state(b, k)) for k in (0, 1)):
        for key in mine:
            torch.testing.assert_close(mine[key], theirs[key], atol=0, rtol=0, msg=key)
    assert [r["train_transfer_loss"] for r in run.metrics()] == [
        r["train_transfer_loss"] for r in mutual_run.metrics()]


def test_lambda_zero_peers_train_exactly_as_alone(tmp_path):
    """The control: at λ = 0 peer 0 of a team is bit for bit the same model trained alone."""
    store = RunStore(tmp_path)
    team = store.create(prepare_run_config(_mutual("team", epochs=2, lam=0.0)))
    alone_cfg = _mutual("alone", epochs=2)
    alone_cfg.transfer = None
    alone = store.create(prepare_run_config(alone_cfg))
    assert train_run(team, progress_bar=False) == "finished"
    assert train_run(alone, progress_bar=False) == "finished"
    a, b = load_checkpoint(team.last_checkpoint), load_checkpoint(alone.last_checkpoint)
    for key, value in peer_state(b).items():
        torch.testing.assert_close(peer_state(a)[key], value, atol=0, rtol=0, msg=key)
    assert [peer_rows(r)[0]["test_acc"] for r in team.metrics()] == [
        r["test_acc"] for r in alone.metrics()]
    # λ = 0 still measures the agreement (once an epoch, on test images), without learning
    # from it: no transfer term in training at all.
    assert -1 <= team.metrics()[-1]["test_map_pearson"] <= 1
    assert "train_transfer_loss" not in team.metrics()[-1]


def test_a_team_checkpoint_with_the_wrong_peers_is_refused(mutual_run, tmp_path):
    from engine.checkpoint import CheckpointError
    from engine.device import resolve_device
    from engine.team import Team

    ckpt = load_checkpoint(mutual_run.last_checkpoint)
    cfg = mutual_run.config()
    cfg.transfer.peers = (*cfg.transfer.peers, cfg.transfer.peers[0])
    team = Team(cfg, resolve_device("cpu"))
    with pytest.raises(CheckpointError, match="holds 2 peer"):
        team.load(ckpt, "last.pt")
    team.close()


# ----------------------------------------------------------------------------------------------
# The command


def _cli(capsys, *argv):
    from engine.cli import main

    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.mark.parametrize("argv, message", [
    (["--peer", "small_cnn"], "--peer: mutual transfer needs at least two peers; got 1"),
    (["--peer", "small_cnn", "--peer", "small_cnn", "--lam", "-1"], "transfer.lam must be"),
    (["--peer", "small_cnn", "--peer", "small_cnn", "--grid", "99"],
     "transfer.grid=99 is larger than the attention map"),
    (["--peer", "small_cnn", "--peer", "small_cnn", "--seeds", "1,x"], "--seeds must be"),
    (["--peer", "small_cnn/a/b", "--peer", "small_cnn"], "--peer must be BACKBONE"),
    (["--peer", "small_cnn", "--peer", "small_cnn", "--random-draws", "0"],
     "--random-draws must be >= 1"),
])
def test_transfer_command_refuses_bad_input(tmp_path, capsys, argv, message):
    code, _, err = _cli(capsys, "transfer", "--runs-dir", str(tmp_path), "--epochs", "1", *argv)
    assert code == 2 and message in err, err
    assert not list(tmp_path.glob("*/config.json"))  # nothing was created


@pytest.mark.parametrize("command", ["transfer", "evaluate"])
def test_an_unknown_mask_is_refused_with_the_choices(tmp_path, capsys, command):
    """Both commands take the mask names from one table (engine.metric_table.MASKS), and
    argparse refuses any other name, listing them, before anything trains or loads."""
    argv = (["transfer", "--peer", "small_cnn", "--peer", "small_cnn"] if command == "transfer"
            else ["evaluate", "checkpoints/digits_small_cnn_la.pt"])
    with pytest.raises(SystemExit) as exc:
        _cli(capsys, *argv, "--runs-dir", str(tmp_path), "--mask", "white")
    err = capsys.readouterr().err
    assert exc.value.code == 2 and "--mask" in err and "'white'" in err, err
    assert all(name in err for name in ("black", "mean", "blur")), err
    assert not list(tmp_path.glob("*/config.json"))


def test_transfer_settings_come_from_a_config_file_too(tmp_path):
    import json

    from engine.cli import build_parser
    from engine.cli.transfer import transfer_config

    path = tmp_path / "pair.json"
    path.write_text(json.dumps({"model": {"backbone": "small_cnn"}, "transfer": {
        "peers": [{"backbone": "small_cnn", "head": "plain"}], "lam": 2.0, "grid": 2}}))
    args = build_parser().parse_args(["transfer", "--config", str(path), "--kl", "0.5"])
    cfg = transfer_config(args)
    assert (cfg.transfer.lam, cfg.transfer.grid, cfg.transfer.kl) == (2.0, 2, 0.5)
    assert [m.head for m in cfg.models] == ["loss_attention", "plain"]
    args = build_parser().parse_args(["transfer", "--config", str(path), "--peer", "small_cnn",
                                      "--peer", "vgg11_bn"])
    assert [m.backbone for m in transfer_config(args).models] == ["small_cnn", "vgg11_bn"]
    with pytest.raises(ConfigError, match="--peer: mutual transfer needs at least two peers"):
        transfer_config(build_parser().parse_args(["transfer", "--lam", "2"]))


def test_transfer_fields_on_a_run_without_peers_are_config_errors(tmp_path):
    import json

    from engine.cli import build_parser
    from engine.cli.runs import build_run_config
    from engine.sweep import sweep_configs

    with pytest.raises(ConfigError, match=r"transfer\.peers must be at least one other peer"):
        sweep_configs(RunConfig(), [("transfer.lam", [0.0, 1.0])], "s")
    path = tmp_path / "run.json"
    path.write_text(json.dumps({"transfer": None}))
    args = build_parser().parse_args(["train", "--config", str(path), "--set",
                                      "transfer.lam=2"])
    with pytest.raises(ConfigError, match=r"transfer\.peers must be at least one other peer"):
        build_run_config(args)


def test_kl_is_refused_for_multi_label_data(monkeypatch):
    from engine import train

    real = train.describe
    monkeypatch.setattr(train, "describe", lambda cfg: {**real(cfg), "multilabel": True})
    with pytest.raises(ConfigError, match="transfer.kl must be 0 for multi-label data"):
        prepare_run_config(_mutual(kl=0.5))


def test_a_too_long_experiment_name_fails_before_training(tmp_path, capsys):
    argv = ["transfer", "--runs-dir", str(tmp_path), "--peer", "small_cnn", "--peer",
            "small_cnn", "--epochs", "1", "--experiment", "e" * 70, "--seeds", "0,10"]
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and "--experiment 'eeee" in err and "not a run name" in err
    assert not RunStore(tmp_path).names()


def test_transfer_command_trains_both_arms_and_writes_results(tmp_path, capsys):
    from engine.transfer import read_results

    out = tmp_path / "results"
    argv = ["transfer", "--runs-dir", str(tmp_path / "runs"), "--peer", "small_cnn",
            "--peer", "small_cnn/plain", "--train-size", "128", "--test-size", "32",
            "--epochs", "1", "--batch-size", "64", "--seeds", "3", "--eval-images", "8",
            "--steps", "2", "--experiment", "t", "--out", str(out), "--quiet", "--mask", "blur",
            "--random-draws", "2"]
    code, printed, err = _cli(capsys, *argv)
    assert code == 0, err
    store = RunStore(tmp_path / "runs")
    assert store.names() == ["t-s3-alone", "t-s3-mutual"]
    assert store.get("t-s3-alone").config().transfer.lam == 0.0
    assert store.get("t-s3-mutual").config().train.seed == 3
    report = read_results(out)
    methods = {r["method"] for r in report["summary"]}
    assert methods == {"own_map", "gradcam", "loss_attention", "ref_uniform", "ref_random",
                       "ref_centre", "ref_intensity"}
    # the mask is recorded in every results file
    assert report["mask"] == "blur" and {r["mask"] for r in report["rows"]} == {"blur"}
    assert "mask" in (out / "results.csv").read_text().splitlines()[0]
    assert "mask `blur`" in (out / "results.md").read_text()
    assert "ref: centre (reference, not a method)" in (out / "results.md").read_text()
    # The plain peer has no Loss-Attention map; the conv-head peer does.
    la_peers = {r["peer"] for r in report["rows"] if r["method"] == "loss_attention"}
    assert la_peers == {0}
    assert "## Grad-CAM" in (out / "results.md").read_text() and "28.2" in printed
    # Run again: the finished runs are reused, not trained again...
    mtime = store.get("t-s3-mutual").last_checkpoint.stat().st_mtime_ns
    assert _cli(capsys, *argv)[0] == 0
    assert store.get("t-s3-mutual").last_checkpoint.stat().st_mtime_ns == mtime
    # ...but not under other settings: a new λ under the same name is refused.
    code, _, err = _cli(capsys, *argv, "--lam", "5")
    assert code == 2 and "exists with other settings (transfer.lam: 1.0 there, 5.0 asked)" in err


def test_an_interrupted_arm_is_one_line_and_resumed_by_the_next_call(tmp_path, capsys,
                                                                     monkeypatch):
    from engine import train

    real = train.train_run

    def stopped(run, **kwargs):
        run.update_status(state="stopped", reason="stopped on request")
        return "stopped"

    argv = ["transfer", "--runs-dir", str(tmp_path), "--peer", "small_cnn", "--peer",
            "small_cnn", "--train-size", "128", "--test-size", "32", "--epochs", "1",
            "--batch-size", "64", "--eval-images", "4", "--steps", "1", "--quiet",
            "--experiment", "cut", "--out", str(tmp_path / "out")]
    monkeypatch.setattr(train, "train_run", stopped)
    code, _, err = _cli(capsys, *argv)
    assert code == 2 and "run cut-s0-mutual ended stopped" in err and "again to resume" in err
    monkeypatch.setattr(train, "train_run", real)
    assert _cli(capsys, *argv)[0] == 0  # the same command resumes and finishes
    assert RunStore(tmp_path).get("cut-s0-mutual").status().state == "finished"


def test_a_transfer_experiment_gets_no_data_set_default_preset():
    """The digits' live schedule is for a single run trained in a lesson: a transfer experiment
    keeps its protocol (the shipped results/transfer tables), unless --preset names one."""
    from engine.cli import build_parser
    from engine.cli.transfer import transfer_config

    args = ["transfer", "--peer", "small_cnn", "--peer", "small_cnn/plain", "--epochs", "8"]
    cfg = transfer_config(build_parser().parse_args(args))
    assert cfg.preset is None and (cfg.train.batch_size, cfg.train.recipe) == (128, "auto")
    live = transfer_config(build_parser().parse_args([*args, "--preset", "live"]))
    assert live.preset == "live" and live.train.batch_size == 32 and live.train.epochs == 8


def test_results_saved_before_masks_were_named_read_as_black(tmp_path):
    import json

    from engine.transfer import read_results

    (tmp_path / "results.json").write_text(json.dumps({"summary": [], "rows": []}))
    assert read_results(tmp_path)["mask"] == "black"
    (tmp_path / "results.json").write_text(json.dumps({"summary": [], "mask": "mean"}))
    assert read_results(tmp_path)["mask"] == "mean"


def _hand_rows(diffs: list[float]) -> list[dict]:
    """One peer, own map only: alone scores 50 on every seed, mutual 50 + diffs[seed]."""
    return [{"arm": arm, "seed": seed, "method": "own_map", "peer": 0, "mask": "black",
             "average_drop_pct": 50.0 + (d if arm == "mutual" else 0.0)}
            for seed, d in enumerate(diffs) for arm in ("mutual", "alone")]


def test_each_mutual_minus_alone_carries_a_t_interval_and_words_that_follow_it(tmp_path):
    import json

    from scipy import stats

    from engine.transfer import read_results, summarise, write_results

    clear, unclear = _hand_rows([-3.0, -2.0, -4.0]), _hand_rows([-3.0, 1.0, -4.0])
    (row,) = summarise(clear)
    half = stats.t.ppf(0.975, 2) * 1.0 / math.sqrt(3)  # sd of (-3, -2, -4) is 1
    assert row["difference_mean"] == pytest.approx(-3.0)
    assert row["difference_low"] == pytest.approx(-3.0 - half)
    assert row["difference_high"] == pytest.approx(-3.0 + half)
    assert row["interval"] == "t over seeds"
    for rows, words in ((clear, "mutual's average_drop_pct is lower than alone's by 3.0"),
                        (unclear, "no clear difference between mutual and alone")):
        report = {"name": "h", "seeds": [0, 1, 2], "images": 4, "rows": rows,
                  "summary": summarise(rows), "timing": [], "seed_paper": {
                      "source": "s", "note": "n", "average_drop_pct": 28.2,
                      "increase_in_confidence_pct": 29.5},
                  "config": {"model": {"backbone": "b", "head": "h"}, "data": {"dataset": "d"},
                             "train": {"epochs": 1}, "transfer": {
                                 "peers": [{"backbone": "b", "head": "h"}], "lam": 1, "grid": 4,
                                 "map_source": "activations", "layers": 3, "power": 2,
                                 "kl": 0}}}
        write_results(report, tmp_path)
        text = (tmp_path / "results.md").read_text()
        assert words in text and "95 % interval (t, seeds)" in text
        assert "difference_low" in (tmp_path / "results.csv").read_text().splitlines()[0]
    assert "mutual is better" not in text  # the unclear one claims no direction
    # A results file saved before the intervals existed gets them from its per-seed rows.
    old = {"rows": clear, "summary": [{k: v for k, v in row.items()
                                       if k not in ("difference_low", "difference_high",
                                                    "interval")}]}
    (tmp_path / "results.json").write_text(json.dumps(old))
    again = read_results(tmp_path)["summary"][0]
    assert again["difference_low"] == pytest.approx(row["difference_low"])


def test_an_experiment_shares_its_controls_runs_and_judging(tmp_path, capsys, monkeypatch):
    """--control: a λ = 10 experiment reuses the λ = 1 experiment's alone runs (λ = 0 either
    way), and a run's judged maps are kept in its folder, so running an experiment again under
    the same protocol judges nothing again; another mask is judged afresh."""
    from engine import transfer

    base = ["transfer", "--runs-dir", str(tmp_path / "runs"), "--peer", "small_cnn", "--peer",
            "small_cnn", "--train-size", "128", "--test-size", "32", "--epochs", "1",
            "--batch-size", "64", "--eval-images", "4", "--steps", "1", "--quiet",
            "--random-draws", "1"]
    assert _cli(capsys, *base, "--experiment", "a", "--out", str(tmp_path / "a"))[0] == 0
    judged = []
    real = transfer.judge_peers
    monkeypatch.setattr(transfer, "judge_peers",
                        lambda run, *a, **k: judged.append(run.name) or real(run, *a, **k))
    code, _, err = _cli(capsys, *base, "--lam", "10", "--experiment", "b", "--control", "a",
                        "--out", str(tmp_path / "b"))
    assert code == 0, err
    assert RunStore(tmp_path / "runs").names() == ["a-s0-alone", "a-s0-mutual", "b-s0-mutual"]
    assert judged == ["b-s0-mutual"]  # the shared control was judged with experiment a
    report = transfer.read_results(tmp_path / "b")
    assert report["control"] == "a"
    assert {r["run"] for r in report["rows"]} == {"a-s0-alone", "b-s0-mutual"}
    judged.clear()
    assert _cli(capsys, *base, "--experiment", "a", "--out", str(tmp_path / "a"))[0] == 0
    assert judged == []
    assert _cli(capsys, *base, "--experiment", "a", "--mask", "mean",
                "--out", str(tmp_path / "a-mean"))[0] == 0
    assert judged == ["a-s0-mutual", "a-s0-alone"]
