"""A deliberately plain ActionFormer, for the tests only: the yardstick for head/.

It follows the official code (happyharrycn/actionformer_release, libs/modeling/ and
libs/utils/nms.py) step by step, in its [B, C, T] layout, with its own module structure and
state-dict key names (``backbone.embd.0.conv.weight``, ``neck.fpn_norms.0.weight``,
``cls_head.cls_head.conv.bias``, ...), so that weights saved from it load into our head through
``head.actionformer.load_actionformer_weights`` exactly as an official checkpoint would. None of
our shortcuts: its own LayerNorm over dim 1 with [1, C, 1] parameters, 1x1 Conv1d projections,
the local attention as ActionFormer computes it (scores of overlapping 2w-step chunks copied
into a band of 2w+1 diagonals, -1e4 added on padded keys, -inf beyond the sequence; the
values multiplied chunk by chunk), masks multiplied in as float tensors, stochastic depth in
training, and Soft-NMS as the extension's swap-and-scan loop over one detection at a time.
Written for these tests, not copied. Having the official computation and tensor sizes
throughout, it also stands for the official code in bench/head_speed.py.
"""
import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class MaskedConv1D(nn.Module):
    def __init__(self, c_in, c_out, kernel, stride=1, groups=1, bias=True):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv1d(c_in, c_out, kernel, stride, kernel // 2, groups=groups, bias=bias)
        if bias:
            nn.init.constant_(self.conv.bias, 0.0)

    def forward(self, x, mask):  # x [B, C, T], mask [B, 1, T] bool
        out = self.conv(x)
        if self.stride > 1:
            out_mask = F.interpolate(mask.float(), size=x.shape[-1] // self.stride, mode="nearest")
        else:
            out_mask = mask.float()
        return out * out_mask, out_mask.bool()


class LayerNorm(nn.Module):
    def __init__(self, channels, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(1, channels, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1))

    def forward(self, x):
        centred = x - x.mean(dim=1, keepdim=True)
        out = centred / torch.sqrt((centred ** 2).mean(dim=1, keepdim=True) + self.eps)
        return out * self.weight + self.bias


def sinusoid_encoding(n_position, dim):
    """[1, dim, n_position], one angle at a time in float64, as the official helper does."""
    table = np.array([[pos / np.power(10000, 2 * (j // 2) / dim) for j in range(dim)]
                      for pos in range(n_position)])
    table[:, 0::2] = np.sin(table[:, 0::2])
    table[:, 1::2] = np.cos(table[:, 1::2])
    return torch.FloatTensor(table).unsqueeze(0).transpose(1, 2)


def band_scores(q, k, half):
    """ActionFormer's sliding-chunk product (after Longformer): [BH, T, d] x [BH, T, d] ->
    [BH, T, 2w+1] with column j = q[t] . k[t + j - w] (w = ``half``), -inf where that key is
    beyond either end. Computed, as there, from overlapping chunks of 2w steps (stride w):
    one [2w, 2w] product per chunk, whose diagonals are copied into the band."""
    bh, length, dim = q.shape
    w, chunks = half, length // half - 1

    def chunked(x):
        return x.as_strided((bh, chunks, 2 * w, dim),
                            (x.stride(0), w * x.stride(1), x.stride(1), x.stride(2)))

    # Padded at the end (one copy, as ActionFormer pads too) so that the diagonal views of
    # the last chunk may run past it; what they read there is masked below.
    s = F.pad(torch.einsum("bcxd,bcyd->bcxy", chunked(q), chunked(k)).flatten(), (0, 2 * w * w))

    def diagonals(offset, rows, cols, first=0, count=chunks):  # s[c, x, offset + x + j], a view
        return s.as_strided((bh, count, rows, cols), (chunks * 4 * w * w, 4 * w * w, 2 * w + 1,
                                                      1), first * 4 * w * w + offset)

    band = s.new_full((bh, chunks + 1, w, 2 * w + 1), float("-inf"))
    band[:, :-1, :, w:] = diagonals(0, w, w + 1)                  # block c, keys t..t+w
    band[:, -1:, :, w:2 * w] = diagonals(2 * w * w + w, w, w, chunks - 1, 1)  # last: t..t+w-1
    band[:, 1:, :, :w] = diagonals(2 * w * w, w, w)                 # block c, keys t-w..t-1
    band[:, :1, 1:, :w] = diagonals(w + 1, w - 1, w, 0, 1)       # first: t-w..t-1
    band = band.view(bh, length, 2 * w + 1)
    offsets = torch.arange(2 * w + 1) - w
    for rows, beyond in ((slice(0, w), torch.arange(w)[:, None] + offsets < 0),
                         (slice(length - w, length),
                          torch.arange(length - w, length)[:, None] + offsets >= length)):
        band[:, rows] = band[:, rows].masked_fill(beyond, float("-inf"))
    return band


def band_times_values(probs, v, half):
    """sum_j probs[t, j] v[t + j - w]: each block of w queries' band is laid out along the
    diagonals of a [w, 3w] matrix and multiplied with the 3w values around the block."""
    bh, length, dim = v.shape
    w, blocks = half, length // half
    padded = F.pad(v, (0, 0, w, w))
    values = padded.as_strided((bh, blocks, 3 * w, dim),
                               (padded.stride(0), w * dim, dim, 1))
    spread = probs.new_zeros(bh, blocks, w, 3 * w)
    spread.as_strided((bh, blocks, w, 2 * w + 1),
                      (spread.stride(0), spread.stride(1), 3 * w + 1, 1)).copy_(
        probs.view(bh, blocks, w, 2 * w + 1))
    return torch.einsum("bcxy,bcyd->bcxd", spread, values).reshape(bh, length, dim)


class MaskedMHCA(nn.Module):
    """Both of ActionFormer's attentions: local (window > 1, its sliding-chunk computation,
    memory linear in T) or over the whole sequence."""

    def __init__(self, dim, n_head, window, stride, proj_pdrop):
        super().__init__()
        self.n_head, self.window = n_head, window
        self.scale = 1.0 / math.sqrt(dim // n_head)
        for name in ("query", "key", "value"):
            setattr(self, f"{name}_conv", MaskedConv1D(dim, dim, 3, stride, groups=dim,
                                                       bias=False))
            setattr(self, f"{name}_norm", LayerNorm(dim))
            setattr(self, name, nn.Conv1d(dim, dim, 1))
        self.proj = nn.Conv1d(dim, dim, 1)
        self.proj_drop = nn.Dropout(proj_pdrop)

    def forward(self, x, mask):
        B, C, _ = x.shape
        q, q_mask = self.query_conv(x, mask)
        k, kv_mask = self.key_conv(x, mask)
        v, _ = self.value_conv(x, mask)
        q = self.query(self.query_norm(q))
        k = self.key(self.key_norm(k))
        v = self.value(self.value_norm(v))
        split = lambda t: t.view(B, self.n_head, C // self.n_head, -1).transpose(2, 3)  # noqa
        q, k, v = split(q), split(k), split(v)
        if self.window > 1:
            T, half = q.shape[2], self.window // 2
            flat = lambda t: t.reshape(B * self.n_head, T, -1)  # noqa: E731
            att = band_scores(flat(q * self.scale), flat(k), half).view(B, self.n_head, T, -1)
            padded = (~kv_mask[:, 0, :, None]).float() * -1e4         # [B, T, 1]
            att = att + band_scores(torch.ones_like(padded), padded, half)[:, None]
            att = F.softmax(att, dim=-1).masked_fill(~kv_mask[:, :, :, None], 0.0)
            out = band_times_values(att.view(B * self.n_head, T, -1), flat(v), half)
            out = out.view(B, self.n_head, T, -1)
        else:
            att = (q * self.scale) @ k.transpose(-2, -1)              # [B, h, T, T]
            att = att.masked_fill(~kv_mask[:, :, None, :], float("-inf"))
            out = F.softmax(att, dim=-1) @ (v * kv_mask[:, :, :, None].float())
        out = out.transpose(2, 3).contiguous().view(B, C, -1)
        return self.proj_drop(self.proj(out)) * q_mask.float(), q_mask


def look_trained(model):
    """Perturb freshly initialised ActionFormer weights (its key names) in place, so that every
    norm, scale and bias matters when two models are compared (the initial LayerScales of 1e-4
    would hide the attention)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("scale"):
                p.uniform_(0.5, 1.5)
            elif "norm" in name or name.split(".")[-2].startswith("ln"):
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


class AffineDropPath(nn.Module):
    def __init__(self, dim, drop_prob):
        super().__init__()
        self.scale = nn.Parameter(1e-4 * torch.ones(1, dim, 1))
        self.drop_prob = drop_prob

    def forward(self, x):
        x = self.scale * x
        if not self.training or self.drop_prob == 0:
            return x
        keep = 1 - self.drop_prob  # stochastic depth: drop a whole sample's branch
        return x.div(keep) * x.new_empty(x.shape[0], 1, 1).bernoulli_(keep)


class TransformerBlock(nn.Module):
    def __init__(self, dim, n_head, window, stride, proj_pdrop, path_pdrop):
        super().__init__()
        self.ln1, self.ln2 = LayerNorm(dim), LayerNorm(dim)
        self.attn = MaskedMHCA(dim, n_head, window, stride, proj_pdrop)
        self.pool_skip = nn.MaxPool1d(3, stride, 1) if stride > 1 else nn.Identity()
        self.mlp = nn.Sequential(nn.Conv1d(dim, 4 * dim, 1), nn.GELU(), nn.Dropout(proj_pdrop),
                                 nn.Conv1d(4 * dim, dim, 1), nn.Dropout(proj_pdrop))
        if path_pdrop > 0:
            self.drop_path_attn = AffineDropPath(dim, path_pdrop)
            self.drop_path_mlp = AffineDropPath(dim, path_pdrop)
        else:
            self.drop_path_attn = self.drop_path_mlp = nn.Identity()

    def forward(self, x, mask):
        out, out_mask = self.attn(self.ln1(x), mask)
        m = out_mask.float()
        out = self.pool_skip(x) * m + self.drop_path_attn(out)
        return out + self.drop_path_mlp(self.mlp(self.ln2(out)) * m), out_mask


class Backbone(nn.Module):
    def __init__(self, n_in, dim, n_head, max_len, windows, path_pdrop, use_abs_pe, arch=(2, 2, 5)):
        super().__init__()
        self.max_len, self.use_abs_pe = max_len, use_abs_pe
        self.embd = nn.ModuleList(MaskedConv1D(n_in if i == 0 else dim, dim, 3, bias=False)
                                  for i in range(arch[0]))
        self.embd_norm = nn.ModuleList(LayerNorm(dim) for _ in range(arch[0]))
        if use_abs_pe:
            self.register_buffer("pos_embd", sinusoid_encoding(max_len, dim) / dim ** 0.5,
                                 persistent=False)
        self.stem = nn.ModuleList(TransformerBlock(dim, n_head, windows[0], 1, 0.0, path_pdrop)
                                  for _ in range(arch[1]))
        self.branch = nn.ModuleList(TransformerBlock(dim, n_head, windows[1 + i], 2, 0.0,
                                                     path_pdrop) for i in range(arch[2]))
        for module in self.modules():
            if isinstance(module, (nn.Linear, nn.Conv1d)) and module.bias is not None:
                nn.init.constant_(module.bias, 0.0)

    def forward(self, x, mask):
        T = x.shape[-1]
        for conv, norm in zip(self.embd, self.embd_norm):
            x, mask = conv(x, mask)
            x = F.relu(norm(x))
        if self.use_abs_pe:
            pe = self.pos_embd
            if not self.training and T >= self.max_len:
                pe = F.interpolate(pe, T, mode="linear", align_corners=False)
            x = x + pe[:, :, :T] * mask.to(x.dtype)
        feats, masks = [], []
        for block in self.stem:
            x, mask = block(x, mask)
        feats.append(x)
        masks.append(mask)
        for block in self.branch:
            x, mask = block(x, mask)
            feats.append(x)
            masks.append(mask)
        return feats, masks


class Neck(nn.Module):
    def __init__(self, dim, levels):
        super().__init__()
        self.fpn_norms = nn.ModuleList(LayerNorm(dim) for _ in range(levels))

    def forward(self, feats, masks):
        return [norm(f) for norm, f in zip(self.fpn_norms, feats)], masks


class ConvHead(nn.Module):
    """ActionFormer's PtTransformerClsHead (``out_name`` "cls_head") and RegHead ("offset_head")."""

    def __init__(self, dim, out_dim, out_name, prior=None, levels=None, num_layers=3):
        super().__init__()
        self.head = nn.ModuleList(MaskedConv1D(dim, dim, 3, bias=False)
                                  for _ in range(num_layers - 1))
        self.norm = nn.ModuleList(LayerNorm(dim) for _ in range(num_layers - 1))
        self.out_name = out_name
        setattr(self, out_name, MaskedConv1D(dim, out_dim, 3))
        if prior is not None:
            nn.init.constant_(self.cls_head.conv.bias, -math.log((1 - prior) / prior))
        if levels is not None:
            self.scale = nn.ModuleList(Scale() for _ in range(levels))

    def forward(self, feats, masks):
        outs = []
        for level, (x, mask) in enumerate(zip(feats, masks)):
            for conv, norm in zip(self.head, self.norm):
                x = F.relu(norm(conv(x, mask)[0]))
            x = getattr(self, self.out_name)(x, mask)[0]
            outs.append(F.relu(self.scale[level](x)) if hasattr(self, "scale") else x)
        return outs


class Scale(nn.Module):
    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, x):
        return x * self.scale


class PtTransformer(nn.Module):
    """The meta architecture: preprocessing (padding), network, targets, losses, inference."""

    def __init__(self, n_in, num_classes, dim=512, n_head=4, max_seq_len=2304, window=19,
                 levels=6, path_pdrop=0.1, use_abs_pe=False, regression_range=None,
                 radius=1.5, label_smoothing=0.0, loss_weight=1.0, init_loss_norm=100.0):
        super().__init__()
        self.num_classes, self.max_seq_len = num_classes, max_seq_len
        self.strides = [2 ** i for i in range(levels)]
        self.windows = window if isinstance(window, list) else [window] * levels
        self.max_div_factor = max(s * (w // 2) * 2 if w > 1 else s
                                  for s, w in zip(self.strides, self.windows))
        self.reg_range = regression_range or [(0, 4), (4, 8), (8, 16), (16, 32), (32, 64),
                                              (64, 10000)]
        self.radius, self.label_smoothing, self.loss_weight = radius, label_smoothing, loss_weight
        self.loss_normalizer, self.loss_normalizer_momentum = init_loss_norm, 0.9
        self.backbone = Backbone(n_in, dim, n_head, max_seq_len, self.windows, path_pdrop,
                                 use_abs_pe, arch=(2, 2, levels - 1))
        self.neck = Neck(dim, levels)
        self.cls_head = ConvHead(dim, num_classes, "cls_head", prior=0.01)
        self.reg_head = ConvHead(dim, 2, "offset_head", levels=levels)

    def preprocessing(self, feats):
        """feats: list of [C, T_i]; training pads to max_seq_len, inference (one video) to
        max_seq_len or the next multiple of max_div_factor."""
        lengths = torch.as_tensor([f.shape[-1] for f in feats])
        max_len = int(lengths.max())
        if self.training or max_len <= self.max_seq_len:
            max_len = self.max_seq_len
        else:
            factor = self.max_div_factor
            max_len = (max_len + factor - 1) // factor * factor
        batch = feats[0].new_zeros(len(feats), feats[0].shape[0], max_len)
        for f, padded in zip(feats, batch):
            padded[:, :f.shape[-1]] = f
        return batch, (torch.arange(max_len)[None] < lengths[:, None]).unsqueeze(1)

    def network(self, feats):
        x, mask = self.preprocessing(feats)
        fpn, masks = self.neck(*self.backbone(x, mask))
        cls = [o.permute(0, 2, 1) for o in self.cls_head(fpn, masks)]
        off = [o.permute(0, 2, 1) for o in self.reg_head(fpn, masks)]
        return cls, off, [m.squeeze(1) for m in masks]

    def points(self, lengths):
        rows = []
        for length, stride, (low, high) in zip(lengths, self.strides, self.reg_range):
            t = torch.arange(0, length * stride, stride, dtype=torch.float)[:, None]
            rest = torch.tensor([low, high, stride], dtype=torch.float)[None].repeat(length, 1)
            rows.append(torch.cat([t, rest], dim=1))
        return torch.cat(rows)

    def label_points_single_video(self, points, segs, labels):
        P, N = points.shape[0], segs.shape[0]
        if N == 0:
            return segs.new_zeros(P, self.num_classes), segs.new_zeros(P, 2)
        lens = (segs[:, 1] - segs[:, 0])[None].repeat(P, 1)
        gt = segs[None].expand(P, N, 2)
        left, right = points[:, 0, None] - gt[:, :, 0], gt[:, :, 1] - points[:, 0, None]
        reg = torch.stack((left, right), dim=-1)
        if self.radius is not None:
            centre = 0.5 * (gt[:, :, 0] + gt[:, :, 1])
            t_min = centre - points[:, 3, None] * self.radius
            t_max = centre + points[:, 3, None] * self.radius
            cb = torch.stack((points[:, 0, None] - torch.maximum(t_min, gt[:, :, 0]),
                              torch.minimum(t_max, gt[:, :, 1]) - points[:, 0, None]), -1)
            inside = cb.min(-1)[0] > 0
        else:
            inside = reg.min(-1)[0] > 0
        far = reg.max(-1)[0]
        in_range = (far >= points[:, 1, None]) & (far <= points[:, 2, None])
        lens.masked_fill_(~inside, float("inf"))
        lens.masked_fill_(~in_range, float("inf"))
        min_len, min_idx = lens.min(dim=1)
        chosen = ((lens <= min_len[:, None] + 1e-3) & (lens < float("inf"))).float()
        cls = (chosen @ F.one_hot(labels, self.num_classes).float()).clamp(0.0, 1.0)
        reg = reg[range(P), min_idx] / points[:, 3, None]
        return cls, reg

    def losses(self, feats, segments, labels):
        """The training losses of a batch (segments/labels: one tensor per video)."""
        cls, off, masks = self.network(feats)
        points = self.points([m.shape[1] for m in masks])
        targets = [self.label_points_single_video(points, s, lab)
                   for s, lab in zip(segments, labels)]
        valid = torch.cat(masks, dim=1)
        gt_cls = torch.stack([t[0] for t in targets])
        pos = (gt_cls.sum(-1) > 0) & valid
        pred_off = torch.cat(off, dim=1)[pos]
        gt_off = torch.stack([t[1] for t in targets])[pos]
        num_pos = pos.sum().item()
        self.loss_normalizer = (self.loss_normalizer_momentum * self.loss_normalizer
                                + (1 - self.loss_normalizer_momentum) * max(num_pos, 1))
        target = gt_cls[valid] * (1 - self.label_smoothing) + self.label_smoothing / (
            self.num_classes + 1)
        logits = torch.cat(cls, dim=1)[valid]
        p = torch.sigmoid(logits)
        ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        p_t = p * target + (1 - p) * (1 - target)
        focal = ce * (1 - p_t) ** 2 * (0.25 * target + 0.75 * (1 - target))
        cls_loss = focal.sum() / self.loss_normalizer
        reg_loss = self.diou(pred_off, gt_off).sum() / self.loss_normalizer
        return {"cls_loss": cls_loss, "reg_loss": reg_loss,
                "final_loss": cls_loss + self.loss_weight * reg_loss, "num_pos": num_pos}

    @staticmethod
    def diou(pred, gt, eps=1e-8):
        lp, rp, lg, rg = pred[:, 0], pred[:, 1], gt[:, 0], gt[:, 1]
        inter = torch.min(lp, lg) + torch.min(rp, rg)
        union = lp + rp + lg + rg - inter
        iou = inter / union.clamp(min=eps)
        enclosing = torch.max(lp, lg) + torch.max(rp, rg)
        rho = 0.5 * (rp - lp - rg + lg)
        return 1.0 - iou + torch.square(rho / enclosing.clamp(min=eps))

    @torch.no_grad()
    def candidates(self, cls, off, masks, pre_nms_thresh=0.001, topk=2000, duration=0.05):
        """Per-level decoding of one video (index 0): segments, scores, labels before NMS."""
        points = self.points([m.shape[1] for m in masks]).split([m.shape[1] for m in masks])
        segs, scores, labels = [], [], []
        for c, o, p, m in zip(cls, off, points, masks):
            prob = (c[0].sigmoid() * m[0].unsqueeze(-1)).flatten()
            keep = prob > pre_nms_thresh
            prob, idx = prob[keep], keep.nonzero(as_tuple=True)[0]
            prob, order = prob.sort(descending=True)
            prob, idx = prob[:topk], idx[order[:topk]]
            pt = torch.div(idx, self.num_classes, rounding_mode="floor")
            label = idx % self.num_classes
            left = p[pt, 0] - o[0][pt, 0] * p[pt, 3]
            right = p[pt, 0] + o[0][pt, 1] * p[pt, 3]
            long_enough = (right - left) > duration
            segs.append(torch.stack((left, right), -1)[long_enough])
            scores.append(prob[long_enough])
            labels.append(label[long_enough])
        return torch.cat(segs), torch.cat(scores), torch.cat(labels)


def soft_nms(segs, scores, sigma=0.5, min_score=0.001):
    """The extension's Gaussian Soft-NMS of one class: swap the best to the front, decay the
    rest, drop those below min_score by swapping in the last. Returns rows (start, end, score)."""
    x1, x2, sc = segs[:, 0].tolist(), segs[:, 1].tolist(), scores.tolist()
    area = [b - a + 1e-6 for a, b in zip(x1, x2)]
    n, out = len(sc), []
    i = 0
    while i < n:
        best = max(range(i, n), key=lambda j: (sc[j], -j))
        for arr in (x1, x2, sc, area):
            arr[i], arr[best] = arr[best], arr[i]
        out.append((x1[i], x2[i], sc[i]))
        pos = i + 1
        while pos < n:
            inter = max(0.0, min(x2[i], x2[pos]) - max(x1[i], x1[pos]))
            ovr = inter / (area[i] + area[pos] - inter)
            sc[pos] *= math.exp(-(ovr * ovr) / sigma)
            if sc[pos] < min_score:
                for arr in (x1, x2, sc, area):
                    arr[pos] = arr[n - 1]
                n -= 1
                pos -= 1
            pos += 1
        i += 1
    return out


def batched_soft_nms(segs, scores, labels, max_seg_num=200, sigma=0.5, min_score=0.001):
    """Per-class Soft-NMS without voting, each class capped, then the best ``max_seg_num``."""
    rows = []
    for c in torch.unique(labels).tolist():
        chosen = labels == c
        rows += [(*r, c) for r in soft_nms(segs[chosen], scores[chosen], sigma,
                                           min_score)[:max_seg_num]]
    rows.sort(key=lambda r: -r[2])
    return rows[:max_seg_num]


def seg_voting(rows, segs, scores, iou_threshold):
    """Class-agnostic voting: each kept segment becomes the mean of all candidates overlapping
    it by at least the threshold, weighted by score x IoU (plain IoU, no length offset)."""
    voted = []
    for start, end, score, label in rows:
        total, acc_start, acc_end = 0.0, 0.0, 0.0
        for (s, e), p in zip(segs.tolist(), scores.tolist()):
            inter = max(0.0, min(end, e) - max(start, s))
            iou = inter / ((end - start) + (e - s) - inter)
            if iou >= iou_threshold:
                total += p * iou
                acc_start += p * iou * s
                acc_end += p * iou * e
        voted.append((acc_start / total, acc_end / total, score, label))
    return voted
