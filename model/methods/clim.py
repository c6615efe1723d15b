"""CLIM (Li, Zhang, Xiong 2021, "Center-wise Local Image Mixture for
Contrastive Representation Learning", BMVC 2021, arXiv:2011.02697).

    python train.py --method clim --data /data/imagenet

Base: MoCo v2, as the paper (query encoder + MLP head of the backbone's
width, momentum key encoder m = 0.999 under shuffling BN, queue of
negatives, InfoNCE at T = 0.2; mocov2.py). On top:

1. Memory bank: the L2-normalised momentum key of every image seen, by
   dataset index (views.index), written as images pass, gathered across
   ranks so all hold the same rows. It grows to the largest index seen (no
   dataset size needed), is checkpointed and kept out of DDP's broadcasts.
2. At each epoch start (epoch_start: the loop calls it before the
   epoch's first plan): spherical k-means (kmeans_iters iterations,
   min(num_clusters, rows // 10) centres) on the bank, then the neighbour
   table over the whole bank (bank_neighbours, center-wise local
   selection): of an image's `knn` nearest bank rows keep those closer to
   its cluster centre than the image itself (and, same_cluster, in its
   cluster) and draw one at random; -1 for none. The table and the epoch
   it was made for are checkpointed, so a resumed run plans as before.
   Both search exactly, by GEMM, a chunk of rows against all at a time,
   the chunk sized so their extra memory stays within neighbour_memory_gb
   (kmeans_bytes, neighbour_bytes; issue 25).
3. The planner takes the table as an input array: every step's plan
   appends, to the B anchors, the B images the table names for them, and
   the pipeline renders them like any other row (ViewSpec.neighbours).
   The first epoch has no table yet, so no mixing.
4. Mixture: CutMix (Yun et al. 2019) of the anchor's view 0 with its
   neighbour's view 0, batched on device (lambda ~ Beta(alpha, alpha) per
   sample, recomputed from the clipped box; drawn from (seed, draw count),
   the count checkpointed). The mixed query's target is smoothed: lambda
   on the anchor's key, 1 - lambda on the neighbour's (its view 1), the
   queue as negatives (mixed_info_nce).
5. Multi-resolution: one more random-resized crop at each of
   multires_sizes (px at 224, scaled with image_size), a query each.

loss = mean of the InfoNCE terms (view 0, each resolution) + mix_weight x
mixed term. The paper's text and code were not available to us beyond its
abstract: knn, num_clusters, same_cluster, kmeans_iters, mix_alpha,
mix_weight and multires_sizes are our choices, flags in configs/clim.yaml.

cfg keys: arch, small_stem, image_size, crop_min_scale, temperature,
queue_size, proj_dim, proj_hidden, ema, shuffle_bn, bn_splits, seed, knn,
num_clusters, same_cluster, kmeans_iters, neighbour_memory_gb, mix_alpha,
mix_weight, multires_sizes.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from pipelines.base import upload
from pipelines.views import MOCOV2_AUG, CropSpec, ViewSpec, Views

from ..backbones import build_backbone
from ..common import Method, Queue, concat_all_gather, copy_as_target, ema_update, info_nce, momentum_key, world_info
from ..heads import MLP
from .mocov2 import shuffle_bn_from


# ----------------------------------------------------------------------------- memory budget
# The neighbour search and k-means compare chunk rows against all rows at a
# time; the chunk is the most rows whose temporaries fit the budget (issue 25:
# a fixed 4096-row chunk at N = 1.28M took 21 GB). Each size below is
# (fixed bytes, bytes per chunk row), counted from the code of the function
# it sizes, float32 values and int64 indices; GB = 1e9 bytes.
GB = 1e9
# Beyond the counted tensors: the allocator's free lists and arenas, BLAS's
# buffers, code first run. On 2 shared CPU threads the RSS peak of the search
# ran up to 79 MB above the counted terms, once 153 MB (bench/clim_search.py,
# N = 20k-100k, three runs); 128 MiB is the spare we count.
WORKSPACE_BYTES = 128 * 2**20


def chunk_rows(budget_bytes: float, fixed: int, per_row: int, rows: int) -> int:
    """The most rows r in [1, rows] with fixed + r * per_row <= budget_bytes;
    1 when even that does not fit (the search cannot use less)."""
    return int(min(rows, max(1, (budget_bytes - fixed) // per_row)))


def kmeans_bytes(n: int, d: int, k: int, itemsize: int = 4) -> tuple[int, int]:
    """Extra bytes of kmeans on x [n, d] of itemsize-byte values with k
    centres: (fixed, per chunk row)."""
    fixed = ((4 * n * d if itemsize != 4 else 0)  # x.float() of a float16 bank
             + 4 * n * d + 8 * n    # F.normalize's copy of x and its row norms
             + 8 * n                # randperm for the starting centres
             + 2 * 8 * n            # assign: the chunks' argmaxes, then their cat
             + 4 * 4 * k * d        # sums, F.normalize(sums), torch.where's new centres, the old ones
             + 2 * 8 * k            # counts, the norms of sums
             + WORKSPACE_BYTES)
    per_row = 4 * k + 8             # the chunk x k similarity block, its argmax
    return fixed, per_row


def neighbour_bytes(n: int, m: int, d: int, kk: int, k: int, threads: int,
                    itemsize: int = 4) -> tuple[int, int]:
    """Extra bytes of bank_neighbours on a bank of n rows of itemsize-byte
    values, m of them filled, d wide, top-kk, k centres, `threads` CPU
    threads (1 on a GPU): (fixed, per chunk row)."""
    fixed = (8 * n                  # the table (the output)
             + (itemsize * m * d if itemsize != 4 else 0)  # feats[rows] of a float16 bank, before .float()
             + 4 * m * d + 8 * m    # f = feats[rows].float(), rows
             + 2 * 8 * m            # assign: the chunks' argmaxes, then their cat
             + 2 * 8 * m            # picks, then their cat
             + 16 * m * threads     # topk's per-row (value, index) queue of m pairs per thread (ATen TopKImpl.h)
             + WORKSPACE_BYTES)
    per_row = (4 * max(m, k)        # the chunk x m similarity block (chunk x k for the assignment)
               + 12 * kk            # topk's values and indices
               + 4 * d * 4          # f[own], centres[assign[own]], their difference (d_anchor), spare
               + 2 * 4 * kk * d     # f[cand] and f[cand] - c: chunk x kk x d each
               + 4 * kk             # their norms
               + 8 * kk + 3 * kk    # assign[cand]; the masks ok, ==, ~ok
               + 3 * 4 * kk         # the random draws, on the device, masked_fill's copy
               + 12 * 8)            # row vectors: own, arange, assign[own], d_anchor, argmax, gather, where, ...
    return fixed, per_row


@torch.no_grad()
def kmeans(x: torch.Tensor, k: int, iters: int, generator: torch.Generator | None = None,
           chunk: int | None = None, memory_gb: float = 2.0) -> torch.Tensor:
    """Spherical k-means of unit rows x [N, D] -> unit centres [k, D]; starts
    from k distinct random rows; an empty cluster keeps its centre. Rows are
    assigned `chunk` at a time, by default as many as memory_gb allows
    (kmeans_bytes); the centres do not depend on the chunk."""
    chunk = chunk or chunk_rows(memory_gb * GB, *kmeans_bytes(*x.shape, k, x.element_size()), x.shape[0])
    x = F.normalize(x.float(), dim=1)
    centres = x[torch.randperm(x.shape[0], generator=generator, device="cpu")[:k].to(x.device)].clone()
    for _ in range(iters):
        assign = torch.cat([(c @ centres.T).argmax(1) for c in x.split(chunk)])  # N
        sums = torch.zeros_like(centres).index_add_(0, assign, x)
        counts = torch.bincount(assign, minlength=k)
        centres = torch.where(counts[:, None] > 0, F.normalize(sums, dim=1), centres)
    return centres


@torch.no_grad()
def bank_neighbours(feats: torch.Tensor, filled: torch.Tensor, centres: torch.Tensor, knn: int,
                    same_cluster: bool = True, generator: torch.Generator | None = None,
                    chunk: int | None = None, memory_gb: float = 2.0) -> torch.Tensor:
    """Center-wise local selection over the memory bank. feats [N, D] unit
    rows, of which only those with filled [N] are searched; centres [K, D]
    unit rows. Returns table [N] int64: for each filled row i, a randomly
    drawn row j among i's `knn` nearest filled rows (cosine, j != i) with
    |f_j - c_i| < |f_i - c_i| for the centre c_i of i's cluster (and, with
    same_cluster, in that cluster); -1 where there is none or i is empty.
    Exact search, `chunk` anchors at a time against all M filled rows, by
    default as many as memory_gb allows (neighbour_bytes). The table does
    not depend on the chunk: each anchor's draws are the next kk uniforms of
    `generator` in row order, and the CPU generator's stream does not depend
    on how it is split."""
    table = torch.full((feats.shape[0],), -1, dtype=torch.long, device=feats.device)
    rows = filled.nonzero().squeeze(1)                                       # M filled rows
    kk = min(knn, rows.numel() - 1)
    if kk < 1 or centres.shape[0] == 0:
        return table
    threads = torch.get_num_threads() if feats.device.type == "cpu" else 1
    sizes = neighbour_bytes(feats.shape[0], rows.numel(), feats.shape[1], kk, centres.shape[0], threads,
                            feats.element_size())
    chunk = chunk or chunk_rows(memory_gb * GB, *sizes, rows.numel())
    with torch.autocast(feats.device.type, enabled=False):  # float32 distances, whatever the AMP setting
        f, centres = feats[rows].float(), centres.float()                    # M x D
        assign = torch.cat([(c @ centres.T).argmax(1) for c in f.split(chunk)])  # M
        picks = []
        for start in range(0, f.shape[0], chunk):                            # M x M similarities, chunk rows at a time
            own = torch.arange(start, min(start + chunk, f.shape[0]), device=f.device)
            sim = f[own] @ f.T
            sim[torch.arange(len(own), device=f.device), own] = float("-inf")
            cand = sim.topk(kk, dim=1).indices                               # chunk x kk, nearest first
            del sim                                                          # before the next chunk's block
            c = centres[assign[own]]                                         # chunk x D
            d_anchor = (f[own] - c).norm(dim=1)                              # chunk
            ok = (f[cand] - c[:, None]).norm(dim=2) < d_anchor[:, None]
            if same_cluster:
                ok &= assign[cand] == assign[own, None]
            r = torch.rand(len(own), kk, generator=generator).to(f.device).masked_fill(~ok, -1.0)
            pick = cand.gather(1, r.argmax(1, keepdim=True)).squeeze(1)
            picks.append(torch.where(ok.any(1), rows[pick], torch.full_like(pick, -1)))
    table[rows] = torch.cat(picks)
    return table


def cutmix(x: torch.Tensor, other: torch.Tensor, has: torch.Tensor, alpha: float,
           rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """x, other [B, C, H, W]; row i gets a box of other[i] where has[i].
    lambda ~ Beta(alpha, alpha) and the box centre come from rng. Returns
    (mixed batch, lambda [B] = the fraction of pixels still the anchor's)."""
    b, _, h, w = x.shape
    dev = x.device
    lam, cx, cy = upload(np.stack([rng.beta(alpha, alpha, b), rng.random(b) * w, rng.random(b) * h]).astype(np.float32),
                         dev)  # one pinned, non_blocking copy
    cut = (1 - lam).sqrt()
    x0, x1 = (cx - cut * w / 2).round().clamp(0, w), (cx + cut * w / 2).round().clamp(0, w)
    y0, y1 = (cy - cut * h / 2).round().clamp(0, h), (cy + cut * h / 2).round().clamp(0, h)
    xs, ys = torch.arange(w, device=dev), torch.arange(h, device=dev)
    inx = (xs >= x0[:, None]) & (xs < x1[:, None])                           # B x W
    iny = (ys >= y0[:, None]) & (ys < y1[:, None])                           # B x H
    mask = (iny[:, :, None] & inx[:, None, :] & has[:, None, None])[:, None]  # B x 1 x H x W
    mixed = torch.where(mask, other, x).contiguous(memory_format=torch.channels_last)
    return mixed, 1 - mask.flatten(1).float().mean(1)


def mixed_info_nce(q: torch.Tensor, keys: torch.Tensor, nbr: torch.Tensor, lam: torch.Tensor,
                   queue: torch.Tensor | None, temperature: float) -> torch.Tensor:
    """InfoNCE with a smoothed target for mixed queries q [B, D]: weight lam
    on the anchor's key keys[i], 1 - lam on the neighbour's keys[nbr[i]]
    (nbr[i] = i: not mixed, lam = 1); keys [R, D], R >= B (with neighbour
    rows: [anchors' keys; neighbours' keys]). With a queue the logits are
    [q.k_anchor, q.k_nbr, q.queue] / T (MoCo v2: the queue is the only
    negatives; the neighbour column is masked for unmixed rows); without,
    q against every key of the global batch (MoCo v3 form, as info_nce)."""
    with torch.autocast(q.device.type, enabled=False):
        q = F.normalize(q.float(), dim=1)
        k = F.normalize(keys.detach().float(), dim=1)
        n, rows, lam = q.shape[0], torch.arange(q.shape[0], device=q.device), lam.float()
        if queue is not None:
            l_nbr = (q * k[nbr]).sum(1, keepdim=True).masked_fill((nbr == rows)[:, None], -1e4 * temperature)
            logits = torch.cat([(q * k[:n]).sum(1, keepdim=True), l_nbr, q @ queue.detach().float().clone().T], 1)
            target = torch.zeros_like(logits)
            target[:, 0], target[:, 1] = lam, 1 - lam
        else:
            offset = world_info()[0] * k.shape[0]
            logits = q @ concat_all_gather(k).T                               # B x world*R
            target = torch.zeros_like(logits)
            target[rows, rows + offset] += lam
            target[rows, nbr + offset] += 1 - lam
        logp = F.log_softmax(logits / temperature, dim=1)
        return -(target * logp).sum(1).mean()


class CLIM(Method):
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
        return ViewSpec(crops=tuple(crops), neighbours=True)  # the plan fetches each anchor's neighbour

    def __init__(self, cfg):
        super().__init__()
        self.temperature, self.ema = cfg.temperature, cfg.ema
        self.knn, self.num_clusters, self.same_cluster = cfg.knn, cfg.num_clusters, cfg.same_cluster
        self.kmeans_iters, self.mix_alpha, self.mix_weight = cfg.kmeans_iters, cfg.mix_alpha, cfg.mix_weight
        self.neighbour_memory_gb = float(getattr(cfg, "neighbour_memory_gb", 2.0))
        self.families, self.seed = self.multires_families(cfg), int(getattr(cfg, "seed", 0))
        self.backbone = build_backbone(cfg.arch, cfg.small_stem)
        self.projector = MLP(self.backbone.out_dim, cfg.proj_hidden or self.backbone.out_dim, cfg.proj_dim, bn=False)
        self.key_backbone = copy_as_target(self.backbone)
        self.key_projector = copy_as_target(self.projector)
        self.queue = Queue(cfg.proj_dim, cfg.queue_size) if cfg.queue_size > 0 else None
        self.shuffle_bn = shuffle_bn_from(cfg)
        self.register_buffer("memory", torch.zeros(0, cfg.proj_dim, dtype=torch.float16))  # N x D unit keys
        self.register_buffer("filled", torch.zeros(0, dtype=torch.bool))                   # N
        self.register_buffer("neighbours", torch.zeros(0, dtype=torch.long))               # N, -1 for none
        self.register_buffer("centres", torch.zeros(0, cfg.proj_dim), persistent=False)    # K x D
        # every rank writes the same rows, so DDP need not broadcast them (and they grow)
        self._ddp_params_and_buffers_to_ignore = ["memory", "filled", "neighbours", "centres"]
        self._table_epoch, self._draws = -1, 0  # checkpointed as extra state

    def get_extra_state(self):
        return {"table_epoch": self._table_epoch, "draws": self._draws}

    def set_extra_state(self, state) -> None:
        self._table_epoch, self._draws = int(state["table_epoch"]), int(state["draws"])

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.projector(self.backbone(x)[1])  # B x proj_dim

    @torch.no_grad()
    def _key(self, x: torch.Tensor) -> torch.Tensor:
        return momentum_key(self.key_backbone, self.key_projector, x, self.shuffle_bn)  # B x proj_dim

    @torch.no_grad()
    def _remember(self, index: torch.Tensor, keys: torch.Tensor, images: int) -> None:
        """Row index[i] of the bank takes keys[i]; the bank holds a row for
        each of the source's `images` (a host count: no device read)."""
        with torch.autocast(keys.device.type, enabled=False):
            index, keys = concat_all_gather(index.to(keys.device)), concat_all_gather(keys.float())
            if images > self.memory.shape[0]:  # in steps of 1024 rows
                grow = -(-images // 1024) * 1024 - self.memory.shape[0]
                self.memory = torch.cat([self.memory, self.memory.new_zeros(grow, keys.shape[1])])
                self.filled = torch.cat([self.filled, self.filled.new_zeros(grow)])
            self.memory[index] = keys.to(self.memory.dtype)
            self.filled[index] = True

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        for name in ("memory", "filled", "neighbours"):  # a checkpoint's bank may be larger than ours
            t = state_dict.get(prefix + name)
            if t is not None and t.shape != getattr(self, name).shape:
                setattr(self, name, torch.zeros_like(t, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def epoch_start(self, epoch: int, loader) -> None:
        """This epoch's plans fetch the neighbours its table names."""
        loader.set_neighbours(self.neighbour_table(epoch))

    @torch.no_grad()
    def neighbour_table(self, epoch: int) -> np.ndarray:
        """The planner's neighbour table for `epoch` (epoch_start, before the
        epoch's first plan): made once per epoch from the bank (k-means, then
        bank_neighbours), kept for the epoch, so a run resumed mid-epoch
        gets the table its plans were made with. Every rank makes the same."""
        if epoch != self._table_epoch:
            rows = int(self.filled.sum())
            if rows == 0:
                self.neighbours = torch.full_like(self.filled, -1, dtype=torch.long)
            else:
                g = torch.Generator().manual_seed(self.seed * 100003 + epoch)
                # both take the float16 bank and cast the rows they search, within the budget
                with torch.autocast(self.memory.device.type, enabled=False):
                    self.centres = kmeans(self.memory[self.filled], min(self.num_clusters, max(1, rows // 10)),
                                          self.kmeans_iters, g, memory_gb=self.neighbour_memory_gb)
                self.neighbours = bank_neighbours(self.memory, self.filled, self.centres, self.knn, self.same_cluster,
                                                  g, memory_gb=self.neighbour_memory_gb)
            self._table_epoch = epoch
        return self.neighbours.cpu().numpy()

    def forward(self, views: Views) -> tuple[torch.Tensor, dict]:
        x0_all, x1_all = views.crops["global"]           # each R x C x H x W: B anchors, then their neighbours
        b = views.batch_size
        x0 = x0_all[:b]
        negatives = self.queue.keys if self.queue is not None else None
        keys = self._key(x1_all)                         # R x D: anchors' keys, then the neighbours'
        k1 = keys[:b]
        loss, acc = info_nce(self._query(x0), k1, negatives, self.temperature)
        terms = [loss] + [info_nce(self._query(x[:b]), k1, negatives, self.temperature)[0]
                          for name in self.families for x in views.crops[name]]
        loss = sum(terms) / len(terms)
        metrics = {"acc": acc.detach()}
        if self.training:
            self._remember(views.index[:b], k1, views.source_size)
        if views.neighbours_found:  # none before the first table (first epoch): nothing to mix
            has = views.neighbour >= 0
            rng = np.random.default_rng([self.seed, self._draws])
            self._draws += 1
            mixed, lam = cutmix(x0, x0_all[b:], has, self.mix_alpha, rng)  # lam = 1 where there is no neighbour
            own = torch.arange(b, device=has.device)
            partner = torch.where(has, own + b, own)     # rows of `keys`
            mix_loss = mixed_info_nce(self._query(mixed), keys, partner, lam, negatives, self.temperature)
            loss = loss + self.mix_weight * mix_loss
            metrics.update(mix_loss=mix_loss.detach(), mixed=has.float().mean())
        if self.queue is not None and self.training:
            self.queue.enqueue(k1)
        return loss, metrics

    @torch.no_grad()
    def step_end(self, progress: float) -> None:
        ema_update(self.key_backbone, self.backbone, self.ema)
        ema_update(self.key_projector, self.projector, self.ema)
