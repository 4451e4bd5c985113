"""tIoU and the greedy matching of ranked detections to ground truth, vectorised with numpy.

The matching is the ActivityNet one: detections are visited in rank order; each takes the
unmatched ground truth (same video, same class) with the highest tIoU, provided tIoU >= the
threshold, falling back to its next-best candidate when the best is taken. Ties in tIoU go to
the ground truth listed *later* in the annotation file, as in the ActivityNet, ActionFormer and
OpenTAD evaluators (their best-first order is an ascending sort reversed, which is stable for
the few segments a video and class hold).

Visiting 200,000 detections one by one in Python takes tens of seconds, so :func:`greedy_match`
resolves many detections per numpy pass instead (see :func:`_resolve_in_rounds`) and gives the
same result as the sequential procedure.
"""
import numpy as np


def elementwise_tiou(pred_start, pred_end, gt_start, gt_end) -> np.ndarray:
    """tIoU of each pred segment with the gt segment at the same position: aligned 1-D
    arrays (or scalars), in float64. (``head.nms.segment_iou`` is the torch one-against-many.)

    ``inter / (len_pred + len_gt - inter)``: the union written as ``max(end) - min(start)``
    differs by one ulp at some boundaries, which flips matches at exact thresholds.
    """
    inter = np.maximum(np.minimum(pred_end, gt_end) - np.maximum(pred_start, gt_start), 0.0)
    return inter / ((pred_end - pred_start) + (gt_end - gt_start) - inter)


# Candidate pairs are built this many at a time (about 100 MB of index and tIoU arrays): a video
# with 100,000 detections and 2,000 segments of one class holds 200 million pairs.
PAIRS_PER_CHUNK = 1 << 22


def pairs_with_equal_keys(pred_keys: np.ndarray, gt_keys: np.ndarray):
    """Every (pred, gt) index pair whose keys (small non-negative ints) are equal, yielded in
    chunks of whole detections holding at most PAIRS_PER_CHUNK pairs (or one detection's), so
    memory stays bounded however many pairs a key holds.

    Pairs come ordered by pred, then by gt index.
    """
    gt_order = np.argsort(gt_keys, kind="stable")
    num_keys = int(max(pred_keys.max(initial=0), gt_keys.max(initial=0))) + 1
    # first_of_key[k] .. first_of_key[k + 1] is key k's range in gt_order (a lookup, not a search)
    first_of_key = np.searchsorted(gt_keys[gt_order], np.arange(num_keys + 1))
    first = first_of_key[pred_keys]
    count = first_of_key[pred_keys + 1] - first
    pairs_before = np.r_[0, np.cumsum(count)]  # pairs of the detections before each one
    start = 0
    while start < len(pred_keys):
        stop = max(int(np.searchsorted(pairs_before, pairs_before[start] + PAIRS_PER_CHUNK,
                                       side="right")) - 1, start + 1)
        chunk_count = count[start:stop]
        pair_pred = np.repeat(np.arange(start, stop), chunk_count)
        pair_offset = np.arange(len(pair_pred)) - np.repeat(
            pairs_before[start:stop] - pairs_before[start], chunk_count)
        yield pair_pred, gt_order[np.repeat(first[start:stop], chunk_count) + pair_offset]
        start = stop


def pair_iou(pred_segments, gt_segments, pair_pred, pair_gt) -> np.ndarray:
    """tIoU of each (pred, gt) index pair."""
    return elementwise_tiou(pred_segments[:, 0][pair_pred], pred_segments[:, 1][pair_pred],
                            gt_segments[:, 0][pair_gt], gt_segments[:, 1][pair_gt])


def greedy_match(pred_segments, pred_keys, gt_segments, gt_keys, thresholds) -> np.ndarray:
    """Matched ground-truth index per threshold and detection, ``-1`` for a false positive.

    Rows of ``pred_segments`` must be in rank order (best first). Keys say which detections
    compete for which ground truth (one key per video and class). Returns int64 [T, P].
    """
    num_pred, num_gt, thresholds = len(pred_segments), len(gt_segments), np.asarray(thresholds)
    pair_pred, pair_gt, iou = usable_pairs(pred_segments, pred_keys, gt_segments, gt_keys,
                                           thresholds.min())
    # One copy of the candidate pairs per threshold, with ids offset so that copies never meet.
    pred_ids, gt_ids, ious = [], [], []
    for t, threshold in enumerate(thresholds):
        above = iou >= threshold
        pred_ids.append(pair_pred[above] + t * num_pred)
        gt_ids.append(pair_gt[above] + t * num_gt)
        ious.append(iou[above])
    matched = _resolve_in_rounds(np.concatenate(pred_ids), np.concatenate(gt_ids),
                                 np.concatenate(ious), len(thresholds) * num_pred,
                                 len(thresholds) * num_gt)
    matched = matched.reshape(len(thresholds), num_pred)
    offsets = (np.arange(len(thresholds)) * num_gt)[:, None]
    return np.where(matched >= 0, matched - offsets, -1)


def usable_pairs(pred_segments, pred_keys, gt_segments, gt_keys, min_iou):
    """(pair_pred, pair_gt, iou) of the pairs with equal keys and tIoU >= ``min_iou``, ordered
    by pred, then gt; built chunk by chunk, so only the usable pairs are ever held whole."""
    parts = [(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0))]
    for pair_pred, pair_gt in pairs_with_equal_keys(pred_keys, gt_keys):
        iou = pair_iou(pred_segments, gt_segments, pair_pred, pair_gt)
        usable = iou >= min_iou
        parts.append((pair_pred[usable], pair_gt[usable], iou[usable]))
    return tuple(np.concatenate(arrays) for arrays in zip(*parts))


def _resolve_in_rounds(pred_id, gt_id, iou, num_pred, num_gt) -> np.ndarray:
    """Sequential greedy matching, many detections per pass.

    ``(pred_id, gt_id, iou)`` lists candidate pairs sorted by pred_id (= rank), then gt_id.
    A detection's outcome can only be changed by better-ranked detections that share a
    candidate with it. So a detection that ranks first among the remaining claimants of *every*
    one of its remaining candidates can be settled now: it takes its best remaining candidate.
    Each pass settles at least the best-ranked detection of every group; taken ground truth and
    settled detections then drop out, and a detection left with no candidate is a false positive.
    """
    matched = np.full(num_pred, -1, dtype=np.int64)
    while len(pred_id):
        best_claimant = np.full(num_gt, num_pred, dtype=np.int64)
        np.minimum.at(best_claimant, gt_id, pred_id)
        blocked = np.zeros(num_pred, dtype=bool)
        blocked[pred_id[best_claimant[gt_id] != pred_id]] = True
        choice = _best_candidate(pred_id, iou)
        settle = choice[~blocked[pred_id[choice]]]
        matched[pred_id[settle]] = gt_id[settle]
        taken = np.zeros(num_gt, dtype=bool)
        taken[gt_id[settle]] = True
        remaining = ~taken[gt_id] & blocked[pred_id]
        pred_id, gt_id, iou = pred_id[remaining], gt_id[remaining], iou[remaining]
    return matched


def _best_candidate(pred_id, iou) -> np.ndarray:
    """Position of each detection's highest-tIoU pair; on ties the last (ground truth listed later).

    A detection's pairs are consecutive and in ground-truth order.
    """
    run_start = np.flatnonzero(np.r_[True, pred_id[1:] != pred_id[:-1]])
    run_length = np.diff(np.r_[run_start, len(pred_id)])
    best = np.repeat(np.maximum.reduceat(iou, run_start), run_length)
    is_best = np.flatnonzero(iou == best)
    last_of_run = np.r_[pred_id[is_best[1:]] != pred_id[is_best[:-1]], True]
    return is_best[last_of_run]
