"""The team of K peers one run trains: one model (a team of one), or K peers that learn from
each other's local maps.

An ordinary run is a team of one, and its step and metrics are exactly those of a single
model. A mutual-transfer run (``RunConfig.transfer``) trains every peer on the same batches,
each with its own optimizer; each peer's loss adds λ · (1 - ρ) over local regions against the
other peers' maps (detached) and, if asked, mutual learning's KL term
(docs/mutual_transfer.md; the maps: :mod:`engine.local_maps`).

Checkpoints hold every peer in one layout (:mod:`engine.checkpoint`), so any tool that opens a
run's checkpoint sees peer 0; :func:`peer_checkpoint` makes a standalone checkpoint of any
peer. A metrics row keeps the team's means under the plain names and, for K > 1, each peer's
own under ``peers``; :func:`peer_rows` reads every peer's, from rows of any version.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from engine.checkpoint import VERSION, checkpoint_peers, load_state, make_checkpoint
from engine.config import ConfigError, RunConfig, TransferConfig, config_to_dict
from engine.device import autocast, channels_last_supported
from engine.errors import CheckpointError
from engine.local_maps import (
    LayerTap,
    captured,
    chosen_layers,
    common_side,
    global_map,
    grid_map,
    region_pearson,
    transfer_loss,
)
from engine.losses import Criterion
from engine.models import PatchModel, PatchOutput, build_model
from engine.recipes import make_optimizer, set_hyperparameters


def peer_field(k: int, name: str) -> str:
    """The config field that sets peer ``k``'s ``name`` (for error messages)."""
    return f"model.{name}" if k == 0 else f"transfer.peers[{k - 1}].{name}"


@dataclass(frozen=True)
class MapPlan:
    """How each peer's global map is made: hooked layers per peer (empty for patch weights)
    and the common side every map is resized to."""

    layers: tuple[tuple[str, ...], ...]
    side: int


def map_plan(models: list[PatchModel], transfer: TransferConfig) -> MapPlan:
    """Check that every peer gives a map the grid fits in, and say how to make it."""
    layers, sides = [], []
    for k, model in enumerate(models):
        cfg = model.config
        if transfer.map_source == "patch_weights":
            grid = model.grid(cfg.input_size)
            if grid is None or not model.head.regularised:
                raise ConfigError(
                    f"transfer.map_source='patch_weights' needs Loss-Attention peers; "
                    f"{peer_field(k, 'head')}={cfg.head!r} has no learned patch weights")
            layers.append(())
            size = (grid.rows, grid.cols)
        else:
            found = chosen_layers(model.backbone, cfg.in_chans, cfg.input_size, transfer.layers,
                                  peer_field(k, "backbone") + f"={cfg.backbone!r}")
            layers.append(tuple(layer.name for layer in found))
            size = max((layer.size for layer in found), key=min)
        if transfer.grid > min(size):
            raise ConfigError(
                f"transfer.grid={transfer.grid} is larger than the attention map of peer {k} "
                f"({cfg.backbone}/{cfg.head}: {size[0]}x{size[1]} at input "
                f"{cfg.input_size[0]}x{cfg.input_size[1]}); use a grid of at most {min(size)}")
        sides.append(max(size))
    return MapPlan(tuple(layers), common_side(sides, transfer.grid))


def map_of(transfer: TransferConfig, side: int, out: PatchOutput,
           features: list[torch.Tensor]) -> torch.Tensor:
    """A peer's global map (B, side, side) from its output and its hooked layers' outputs."""
    if transfer.map_source == "patch_weights":
        return grid_map(out.patch_weights, out.grid.rows, out.grid.cols, (side, side))
    return global_map(features, (side, side), transfer.power)


@torch.no_grad()
def peer_maps(models: list[PatchModel], x: torch.Tensor, transfer: TransferConfig
              ) -> list[torch.Tensor]:
    """Each model's global map of the images ``x``, as in training, in the models' current
    mode (for the app, evaluation and the experiment; the models need not be a team's)."""
    plan = map_plan(models, transfer)
    maps = []
    for k, model in enumerate(models):
        with captured(model.backbone, plan.layers[k]) as tap:
            out = model(x)
            maps.append(map_of(transfer, plan.side, out, tap.take()))
    return maps


def local_view(models: list[PatchModel], x: torch.Tensor, transfer: TransferConfig) -> dict:
    """What the transfer loss sees for the images ``x``: each peer's global map (K, B, S, S),
    all on one scale (each map divided by the largest value of any peer's map of that image),
    and the per-region Pearson ρ of every peer against peer 0 (K - 1, B, grid, grid)."""
    maps = peer_maps(models, x, transfer)
    stacked = torch.stack(maps).float()
    top = stacked.flatten(2).amax((0, 2)).clamp_min(1e-12)
    rho = [region_pearson(m, maps[0], transfer.grid) for m in maps[1:]]
    return {"maps": (stacked / top[None, :, None, None]).cpu(), "rho": torch.stack(rho).cpu()}


def input_maps(model: PatchModel, x: torch.Tensor, transfer: TransferConfig) -> torch.Tensor:
    """A model's own global map at input resolution (bilinear), each scaled to [0, 1], on the
    CPU: the map that faithfulness metrics judge."""
    from engine.explain import scale_maps

    (m,) = peer_maps([model], x, transfer)
    up = F.interpolate(m[:, None], size=tuple(x.shape[-2:]), mode="bilinear",
                       align_corners=False)[:, 0]
    return scale_maps(up.float().cpu())


@dataclass
class Peer:
    model: PatchModel
    optimizer: torch.optim.Optimizer
    criterion: Criterion
    net: torch.nn.Module
    """The model as trained: wrapped in DDP and/or compiled where asked."""


class Team:
    """The run's peers (one for an ordinary run), their optimizers and the transfer loss."""

    def __init__(self, cfg: RunConfig, device: torch.device) -> None:
        self.cfg, self.transfer = cfg, cfg.transfer
        self.peers = []
        for model_cfg in cfg.models:  # built in order after one seed: peer 0 = a solo run's
            model = build_model(model_cfg).to(device)
            if cfg.train.channels_last and channels_last_supported(device):
                model = model.to(memory_format=torch.channels_last)
            self.peers.append(Peer(model, make_optimizer(model, cfg.train),
                                   Criterion(cfg.loss, model.regularised), model))
        # Maps are made in training only where a peer learns from them (λ > 0); the λ = 0
        # control measures its agreement once an epoch (map_agreement), off the hot path.
        learns = self.transfer is not None and self.transfer.lam > 0
        self.plan = map_plan(self.models, self.transfer) if learns else None
        self.taps = [LayerTap(p.model.backbone, self.plan.layers[k] if self.plan else ())
                     for k, p in enumerate(self.peers)]

    def close(self) -> None:
        """Remove the layer hooks."""
        for tap in self.taps:
            tap.close()

    @property
    def models(self) -> list[PatchModel]:
        return [p.model for p in self.peers]

    @property
    def model(self) -> PatchModel:
        """Peer 0: the run's ``model``."""
        return self.peers[0].model

    @property
    def mutual(self) -> bool:
        return len(self.peers) > 1

    def parameter_count(self) -> int:
        return sum(p.numel() for m in self.models for p in m.parameters())

    # -- one step ---------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, amp: bool) -> tuple[list[PatchOutput], list | None]:
        """Every peer's output (through its DDP / compiled wrapper) and, where the peers learn
        from each other's maps, each one's global attention map."""
        outs, maps = [], []
        for k, peer in enumerate(self.peers):
            with autocast(x.device, amp):
                outs.append(peer.net(x))
            features = self.taps[k].take()
            if self.plan:
                maps.append(map_of(self.transfer, self.plan.side, outs[-1], features))
        return outs, (maps if self.plan else None)

    def losses(self, outs: list[PatchOutput], maps: list | None, y: torch.Tensor,
               position: float) -> list[dict[str, torch.Tensor]]:
        """Per peer at ``position`` (epochs): ``loss`` (what it minimises), ``image``,
        ``patch`` and, where they apply, ``transfer`` and ``kl``."""
        terms = []
        for k, peer in enumerate(self.peers):
            base = peer.criterion(outs[k], y, position)
            t = {"loss": base.total, "image": base.image, "patch": base.patch}
            if maps is not None:
                others = [maps[j] for j in range(len(maps)) if j != k]
                t["transfer"] = transfer_loss(maps[k], others, self.transfer.grid)
                t["loss"] = t["loss"] + self.transfer.lam * t["transfer"]
            if self.mutual and self.transfer.kl:
                t["kl"] = _mutual_kl(outs, k)
                t["loss"] = t["loss"] + self.transfer.kl * t["kl"]
            terms.append(t)
        return terms

    def no_sync(self, sync: bool):
        """DDP's no_sync for every peer while accumulating micro-batches."""
        stack = contextlib.ExitStack()
        if not sync:
            for peer in self.peers:
                stack.enter_context(peer.net.no_sync())
        return stack

    def optimizer_step(self) -> None:
        for peer in self.peers:
            peer.optimizer.step()
            peer.optimizer.zero_grad(set_to_none=True)

    def set_position(self, t: float) -> float:
        """The learning rate (and betas) at position ``t`` (epochs) for every peer; returns
        the lr."""
        lrs = [set_hyperparameters(p.optimizer, t, self.cfg.train) for p in self.peers]
        return lrs[0]

    def patch_weight(self, t: float) -> float:
        return self.peers[0].criterion.patch_weight(t)

    def train(self) -> None:
        for peer in self.peers:
            peer.net.train()

    # -- checkpoints ------------------------------------------------------------------------

    def checkpoint(self, optimizers: bool = False, **extra) -> dict:
        """Every peer's weights in the one checkpoint layout; with ``optimizers``, every
        peer's optimizer state too (what resume needs)."""
        states = [p.optimizer.state_dict() for p in self.peers] if optimizers else None
        return make_checkpoint(config_to_dict(self.cfg), self.models, states, **extra)

    def load(self, ckpt: dict, path) -> None:
        """Weights (and optimizer states, where present) of every peer, from a checkpoint of
        any layout (:func:`engine.checkpoint.checkpoint_peers`)."""
        stored = checkpoint_peers(ckpt, path)
        if len(stored) != len(self.peers):
            raise CheckpointError(f"{path} holds {len(stored)} peer(s) but the run trains "
                                  f"{len(self.peers)}")
        for k, (peer, entry) in enumerate(zip(self.peers, stored, strict=True)):
            # Each peer is checked against the architecture recorded for it, not peer 0's.
            load_state(peer.model, ckpt, f"{path} (peer {k})", k)
            if "optimizer" in entry:
                peer.optimizer.load_state_dict(entry["optimizer"])


def _mutual_kl(outs: list[PatchOutput], k: int) -> torch.Tensor:
    """Deep mutual learning: mean over the other peers of KL(p_j || p_k), p_j detached."""
    log_p = F.log_softmax(outs[k].logits.float(), 1)
    terms = [F.kl_div(log_p, F.log_softmax(outs[j].logits.detach().float(), 1),
                      reduction="batchmean", log_target=True)
             for j in range(len(outs)) if j != k]
    return torch.stack(terms).mean()


def peer_config(cfg: RunConfig, k: int) -> RunConfig:
    """The run's config as peer ``k``'s own: its model first, no transfer section (what a
    standalone checkpoint of that peer records)."""
    return dataclasses.replace(cfg, model=cfg.models[k], transfer=None)


def peer_checkpoint(cfg: RunConfig, ckpt: dict, k: int) -> dict:
    """A standalone checkpoint of peer ``k`` (a team of one) from a team checkpoint of any
    layout (for export, Explorer, Compare maps); its metrics are that peer's own."""
    state = checkpoint_peers(ckpt)[k]["model"]
    keep = {key: v for key, v in ckpt.items()
            if key not in ("model", "optimizer", "peers", "run_config", "rng", "metrics")}
    team_row = ckpt.get("metrics") or {}
    metrics = {"epoch": team_row.get("epoch"), **peer_rows(team_row)[k]} if team_row else {}
    return {**keep, "version": VERSION, "run_config": config_to_dict(peer_config(cfg, k)),
            "peers": [{"model": state}], "metrics": metrics, "peer": k}


_OLD_PEER_KEY = re.compile(r"peer(\d+)_(.+)")


def peer_rows(row: dict) -> list[dict]:
    """Each peer's own statistics in a metrics row (one line of ``metrics.jsonl``), from a row
    of any version; every reader of per-peer values goes through here:

    - this version, a team of K > 1: ``row["peers"]``, one dict per peer (``train_loss``,
      ``train_acc``, ``test_acc``, ...); the team's means are under the plain names;
    - the previous version, K > 1: suffixed keys ``peer{k}_{name}`` (``peer1_test_acc``);
    - a single model (any version): the row's own values are its one peer's.
    """
    peers = row.get("peers")
    if isinstance(peers, list) and all(isinstance(p, dict) for p in peers) and peers:
        return [dict(p) for p in peers]
    found: dict[int, dict] = {}
    for key, value in row.items():
        match = _OLD_PEER_KEY.fullmatch(key) if isinstance(key, str) else None
        if match:
            found.setdefault(int(match[1]), {})[match[2]] = value
    if found and sorted(found) == list(range(len(found))):  # peers 0..K-1, none missing
        return [found[k] for k in range(len(found))]
    return [{key: v for key, v in row.items() if key != "peers"}]


@torch.no_grad()
def map_agreement(team: Team, images: torch.Tensor) -> float:
    """Mean local-map Pearson ρ between every pair of peers on ``images`` (already on the
    device and normalised), in eval mode."""
    for m in team.models:
        m.eval()
    try:
        maps = peer_maps(team.models, images, team.transfer)
        rhos = [region_pearson(maps[i], maps[j], team.transfer.grid).mean()
                for i in range(len(maps)) for j in range(i + 1, len(maps))]
        return torch.stack(rhos).mean().item()
    finally:
        for m in team.models:
            m.train()
