"""CLIM (Li, Zhang, Xiong 2021, "Center-wise Local Image Mixture for
Contrastive Representation Learning", BMVC 2021, arXiv:2011.02697).

    python train.py --method clim --data /data/imagenet

Base: MoCo v2, as the paper (query encoder + MLP head of the backbone's
width, momentum key encoder m = 0.999 under shuffling BN, queue of
negatives, InfoNCE at T = 0.2; mocov2.py). On top:

1. Memory: the L2-normalised key of every image seen, by dataset index
   (views.index), written each step, gathered across ranks so all hold the
   same rows. It grows to the largest index seen (no dataset size needed),
   is checkpointed and is kept out of DDP's buffer broadcasts.
2. Clusters: spherical k-means in torch (kmeans_iters iterations) on the
   memory, redone at each epoch boundary (epoch = floor(progress * epochs)
   in step_end) and, while the first epoch fills the memory, whenever the
   images seen have doubled; min(num_clusters, rows // 10) centres.
3. Center-wise local selection (select_neighbours): of an anchor's `knn`
   nearest neighbours keep those closer to the anchor's cluster centre than
   the anchor (and, same_cluster, in its cluster); draw one at random; an
   anchor without one is not mixed. DIFFERENCE: the paper searches the
   dataset; a plan-driven pipeline cannot fetch any image's pixels, so we
   search the current batch (its features: its keys, the memory's rows).
4. Mixture: CutMix (Yun et al. 2019) of the anchor's view 0 with the
   neighbour's, batched on device (lambda ~ Beta(alpha, alpha) per sample,
   recomputed from the clipped box). The mixed query's target is smoothed:
   lambda on the anchor's key, 1 - lambda on the neighbour's (view 1), the
   queue as negatives (mixed_info_nce).
5. Multi-resolution: one more random-resized crop at each of
   multires_sizes (px at 224, scaled with image_size), a query each.

loss = mean of the InfoNCE terms (view 0, each resolution) + mix_weight x
mixed term. The paper's text and code were not available to us beyond its
abstract: knn, num_clusters, same_cluster, kmeans_iters, mix_alpha,
mix_weight and multires_sizes are our choices, flags in configs/clim.yaml.

cfg keys: arch, small_stem, image_size, crop_min_scale, epochs, temperature,
queue_size, proj_dim, proj_hidden, ema, shuffle_bn, bn_splits, seed, knn,
num_clusters, same_cluster, kmeans_iters, mix_alpha, mix_weight,
multires_sizes.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipelines.views import MOCOV2_AUG, CropSpec, ViewSpec, Views

from ..backbones import build_backbone
from ..common import Queue, concat_all_gather, copy_as_target, ema_update, info_nce, momentum_key, world_info
from ..heads import MLP
from .mocov2 import shuffle_bn_from


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None,
           chunk: int = 65536) -> torch.Tensor:
    """Spherical k-means of unit rows x [N, D] -> unit centres [k, D]; starts
    from k distinct random rows; an empty cluster keeps its centre."""
    x = F.normalize(x.float(), dim=1)
    centres = x[torch.randperm(x.shape[0], generator=generator, device="cpu")[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cat([(c @ centres.T).argmax(1) for c in x.split(chunk)])  # N
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centres)
    return centres


@torch.no_grad()
def select_neighbours(feats: torch.Tensor, centres: torch.Tensor, knn: int, same_cluster: bool = True,
                      generator: torch.Generator | None = None) -> torch.Tensor:
    """Center-wise local selection within a batch. feats [B, D] unit rows,
    centres [K, D] unit rows. Returns nbr [B]: the batch index of a randomly
    drawn neighbour j of anchor i among its `knn` nearest (cosine), with
    |f_j - c_i| < |f_i - c_i| for the centre c_i of i's cluster; -1 if none."""
    b = feats.shape[0]
    kk = min(knn, b - 1)
    if kk < 1:
        return torch.full((b,), -1, dtype=torch.long, device=feats.device)
    with torch.autocast(feats.device.type, enabled=False):  # float32 distances, whatever the AMP setting
        feats, centres = feats.float(), centres.float()
        assign = (feats @ centres.T).argmax(1)                               # B
        c = centres[assign]                                                  # B x D, each anchor's centre
        sim = (feats @ feats.T).fill_diagonal_(float("-inf"))
        cand = sim.topk(kk, dim=1).indices                                   # B x kk, nearest first
        d_anchor = (feats - c).norm(dim=1)                                   # B
        d_cand = (feats[cand] - c[:, None]).norm(dim=2)                      # B x kk
    ok = d_cand < d_anchor[:, None]
    if same_cluster:
        ok &= assign[cand] == assign[:, None]
    r = torch.rand(b, kk, generator=generator, device="cpu").to(feats.device).masked_fill(~ok, -1.0)
    pick = cand.gather(1, r.argmax(1, keepdim=True)).squeeze(1)
    return torch.where(ok.any(1), pick, torch.full_like(pick, -1))


def cutmix(x: torch.Tensor, nbr: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B, C, H, W]; row i gets a box of x[nbr[i]] (none where nbr < 0).
    Returns (mixed batch, lambda [B] = the fraction of pixels still the anchor's)."""
    b, _, h, w = x.shape
    dev = x.device
    has = nbr >= 0
    lam = torch.distributions.Beta(alpha, alpha).sample((b,)).to(dev)
    cut = (1 - lam).sqrt()
    cx, cy = torch.rand(b, device=dev) * w, torch.rand(b, device=dev) * h
    x0, x1 = (cx - cut * w / 2).round().clamp(0, w), (cx + cut * w / 2).round().clamp(0, w)
    y0, y1 = (cy - cut * h / 2).round().clamp(0, h), (cy + cut * h / 2).round().clamp(0, h)
    xs, ys = torch.arange(w, device=dev), torch.arange(h, device=dev)
    inx = (xs >= x0[:, None]) & (xs < x1[:, None])                           # B x W
    iny = (ys >= y0[:, None]) & (ys < y1[:, None])                           # B x H
    mask = (iny[:, :, None] & inx[:, None, :] & has[:, None, None])[:, None]  # B x 1 x H x W
    src = x[torch.where(has, nbr, torch.arange(b, device=dev))]
    mixed = torch.where(mask, src, x).contiguous(memory_format=torch.channels_last)
    return mixed, 1 - mask.flatten(1).float().mean(1)


def mixed_info_nce(q: torch.Tensor, keys: torch.Tensor, nbr: torch.Tensor, lam: torch.Tensor,
                   queue: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """InfoNCE with a smoothed target for mixed queries q [B, D]: weight lam
    on the anchor's key keys[i], 1 - lam on the neighbour's keys[nbr[i]]
    (nbr[i] = i: not mixed, lam = 1). With a queue the logits are
    [q.k_anchor, q.k_nbr, q.queue] / T (MoCo v2: the queue is the only
    negatives; the neighbour column is masked for unmixed rows); without,
    q against every key of the global batch (MoCo v3 form, as info_nce)."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(keys.detach().float(), dim=1)
        n, rows, lam = q.shape[0], torch.arange(q.shape[0], device=q.device), lam.float()
        if queue is not None:
            l_nbr = (q * k[nbr]).sum(1, keepdim=True).masked_fill((nbr == rows)[:, None], -1e4 * temperature)
            logits = torch.cat([(q * k).sum(1, keepdim=True), l_nbr, q @ queue.detach().float().clone().T], 1)
            target = torch.zeros_like(logits)
            target[:, 0], target[:, 1] = lam, 1 - lam
        else:
            offset = world_info()[0] * n
            logits = q @ concat_all_gather(k).T                               # B x world*B
            target = torch.zeros_like(logits)
            target[rows, rows + offset] += lam
            target[rows, nbr + offset] += 1 - lam
        logp = F.log_softmax(logits / temperature, dim=1)
        return -(target * logp).sum(1).mean()


class CLIM(nn.Module):
    name = "clim"

    @staticmethod
    def multires_families(cfg) -> list[str]:
        return [f"res{i}" for i in range(len(getattr(cfg, "multires_sizes", ())))]

    @staticmethod
    def spec(cfg) -> ViewSpec:
        scale = (getattr(cfg, "crop_min_scale", 0.2), 1.0)  # MoCo v2 --aug-plus
        crops = [CropSpec("global", 2, cfg.image_size, scale=scale, augs=(MOCOV2_AUG,))]
        for name, size in zip(CLIM.multires_families(cfg), getattr(cfg, "multires_sizes", ())):
            crops.append(CropSpec(name, 1, max(8, round(size * cfg.image_size / 224)), scale=scale))
        return ViewSpec(crops=tuple(crops))

    def __init__(self, cfg):
        super().__init__()
        self.temperature, self.ema, self.epochs = cfg.temperature, cfg.ema, cfg.epochs
        self.knn, self.num_clusters, self.same_cluster = cfg.knn, cfg.num_clusters, cfg.same_cluster
        self.kmeans_iters, self.mix_alpha, self.mix_weight = cfg.kmeans_iters, cfg.mix_alpha, cfg.mix_weight
        self.families, self.seed = self.multires_families(cfg), int(getattr(cfg, "seed", 0))
        self.backbone = build_backbone(cfg.arch, cfg.small_stem)
        self.projector = MLP(self.backbone.out_dim, cfg.proj_hidden or self.backbone.out_dim, cfg.proj_dim, bn=False)
        self.key_backbone = copy_as_target(self.backbone)
        self.key_projector = copy_as_target(self.projector)
        self.queue = Queue(cfg.proj_dim, cfg.queue_size) if cfg.queue_size > 0 else None
        self.shuffle_bn = shuffle_bn_from(cfg)
        self.register_buffer("memory", torch.zeros(0, cfg.proj_dim, dtype=torch.float16))  # N x D unit keys
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool))                   # N
        self.register_buffer("centres", torch.zeros(0, cfg.proj_dim), persistent=False)    # K x D
        # every rank writes the same rows, so DDP need not broadcast them (and they grow)
        self._ddp_params_and_buffers_to_ignore = ["memory", "filled", "centres"]
        self._epoch, self._seen, self._seen_at_clustering = -1, 0, 0

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x)[1])  # B x proj_dim

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return momentum_key(self.key_backbone, self.key_projector, x, self.shuffle_bn)  # B x proj_dim

    @torch.no_grad()
    def _remember(self, index: torch.Tensor, keys: torch.Tensor) -> None:
        with torch.autocast(keys.device.type, enabled=False):
            index, keys = concat_all_gather(index.to(keys.device)), concat_all_gather(keys.float())
            n = int(index.max()) + 1  # grow to the largest index seen, in steps of 1024 rows
            if n > self.memory.shape[0]:
                grow = -(-n // 1024) * 1024 - self.memory.shape[0]
                self.memory = torch.cat([self.memory, self.memory.new_zeros(grow, keys.shape[1])])
                self.filled = torch.cat([self.filled, self.filled.new_zeros(grow)])
            self.memory[index] = keys.to(self.memory.dtype)
            self.filled[index] = True
        self._seen += index.shape[0]

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory", "filled"):  # a checkpoint's memory may be larger than ours
            t = state_dict.get(prefix + name)
            if t is not None and t.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(t, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x0, x1 = views.crops["global"]                                 # each B x C x H x W, channels_last
        negatives = self.queue.keys if self.queue is not None else None
        k1 = self._key(x1)                                             # B x D, the anchors' keys
        loss, acc = info_nce(self._query(x0), k1, negatives, self.temperature)
        terms = [loss] + [info_nce(self._query(x), k1, negatives, self.temperature)[0]
                          for name in self.families for x in views.crops[name]]
        loss = sum(terms) / len(terms)
        metrics = {"acc": acc.detach()}
        if self.training:
            self._remember(views.index, k1)
            if self.centres.shape[0] == 0:  # first step (or just resumed): cluster what the memory holds
                self.recluster()
        if self.centres.shape[0] > 0:
            nbr = select_neighbours(k1, self.centres, self.knn, self.same_cluster)
            mixed, lam = cutmix(x0, nbr, self.mix_alpha)                # lam = 1 where nbr < 0
            partner = torch.where(nbr >= 0, nbr, torch.arange(len(nbr), device=nbr.device))
            mix_loss = mixed_info_nce(self._query(mixed), k1, partner, lam, negatives, self.temperature)
            loss = loss + self.mix_weight * mix_loss
            metrics.update(mix_loss=mix_loss.detach(), mixed=(nbr >= 0).float().mean())
        if self.queue is not None and self.training:
            self.queue.enqueue(k1)
        return loss, metrics

    @torch.no_grad()
    def recluster(self) -> None:
        """k-means on the filled memory rows; every rank gets the same centres."""
        x = self.memory[self.filled].float()
        if x.shape[0] == 0:
            return
        g = torch.Generator().manual_seed(self.seed * 100003 + self._epoch + 1)
        with torch.autocast(x.device.type, enabled=False):
            self.centres = kmeans(x, min(self.num_clusters, max(1, x.shape[0] // 10)), self.kmeans_iters, g)
        self._seen_at_clustering = self._seen

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.ema)
        ema_update(self.key_projector, self.projector, self.ema)
        epoch = int(progress * self.epochs)
        if epoch != self._epoch or self._seen >= 2 * max(1, self._seen_at_clustering):
            self._epoch = epoch
            self.recluster()
