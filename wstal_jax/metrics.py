"""Detection and classification metrics (numpy, host side).

Detection mAP is the official ActivityNet algorithm (`Evaluation/eval_detection.py`,
`compute_average_precision_detection`), which every WS-TAL paper we implement evaluates with
(THUMOS14 at tIoU 0.1:0.1:0.7, ActivityNet at 0.5:0.05:0.95). It reproduces that code's
numbers exactly, including its tie orders, but runs vectorised:

* per class, predictions are ranked with `scores.argsort()[::-1]` on the class's scores in
  input order (numpy's default sort, reversed), exactly as the official code does after
  pandas' groupby (which keeps input order);
* a prediction on a video without ground truth of its class is a false positive;
* otherwise the video's ground truths of that class are visited in `tiou.argsort()[::-1]`
  order (tIoU without the "+1"): the first one below the threshold makes the prediction a
  false positive, one already matched at this threshold is skipped, the first free one is
  matched (true positive) and locked;
* precision / recall are cumulative over the ranked list, AP is the VOC all-point
  interpolated AP, and mAP is the mean over the classes that have ground truth (a class
  without predictions scores 0).

Speed. The greedy matching is sequential only within one (class, video) group: the locks are
per ground truth, and a ground truth belongs to one video and one class. So the tIoU matrix of
each group is computed once, each prediction keeps only the ground truths it can match at the
lowest threshold (a prefix of its tIoU-sorted row), and the matching runs in rounds: round r
handles the r-th such prediction of every group at once, for all thresholds at once.
`benchmarks/eval_speed.py` measures it.

All values returned here are fractions in [0, 1]; callers that print tables (the
`evaluate_results` CLI, the training evaluator) multiply by 100.
"""
from collections.abc import Mapping, Sequence

import numpy as np

# THUMOS14 protocol: tIoU 0.1:0.1:0.7 (VLPO Sec. 4.1, PVLR Table 1).
THUMOS14_TIOU = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# ActivityNet protocol: tIoU 0.5:0.05:0.95 (VLPO Table 2, PVLR Sec. 4.1).
ACTIVITYNET_TIOU = (0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95)


def segment_iou(gt_start_G, gt_end_G, pred_start_P, pred_end_P) -> np.ndarray:
  """Temporal IoU of every prediction with every ground truth, float64 [P, G].

  The official formula, no "+1": inter = max(0, min(ends) - max(starts)),
  union = len(gt) + len(pred) - inter. A zero-length prediction against a zero-length ground
  truth at the same time gives 0/0 = NaN, as in the official code (where NaN is never
  "below the threshold", so such a pair matches); no warning is emitted.
  """
  gt_start_G = np.asarray(gt_start_G, np.float64)
  gt_end_G = np.asarray(gt_end_G, np.float64)
  pred_start_P = np.asarray(pred_start_P, np.float64)[:, None]
  pred_end_P = np.asarray(pred_end_P, np.float64)[:, None]
  inter_PxG = (np.minimum(pred_end_P, gt_end_G) - np.maximum(pred_start_P, gt_start_G)).clip(0)
  union_PxG = (gt_end_G - gt_start_G) + (pred_end_P - pred_start_P) - inter_PxG
  with np.errstate(divide="ignore", invalid="ignore"):
    return inter_PxG / union_PxG


def interpolated_ap(precision_KxP, recall_KxP) -> np.ndarray:
  """VOC all-point interpolated AP of each row, float64 [K] (the official `interpolated_prec_rec`).

  Precision is made monotone from the right; AP = sum over recall steps of
  (recall step) x (interpolated precision).
  """
  precision_KxP = np.atleast_2d(np.asarray(precision_KxP, np.float64))
  recall_KxP = np.atleast_2d(np.asarray(recall_KxP, np.float64))
  k = precision_KxP.shape[0]
  mprec = np.concatenate([np.zeros((k, 1)), precision_KxP, np.zeros((k, 1))], axis=1)
  mrec = np.concatenate([np.zeros((k, 1)), recall_KxP, np.ones((k, 1))], axis=1)
  mprec = np.maximum.accumulate(mprec[:, ::-1], axis=1)[:, ::-1]
  ap_K = np.zeros(k)
  for i in range(k):  # K is the number of thresholds; np.sum per row keeps the official sum order
    idx = np.flatnonzero(mrec[i, 1:] != mrec[i, :-1]) + 1
    ap_K[i] = np.sum((mrec[i, idx] - mrec[i, idx - 1]) * mprec[i, idx])
  return ap_K


def _encode_videos(gt_video, pred_video):
  """Maps video ids (any hashable dtype) of both tables to shared int64 codes."""
  gt_video = np.asarray(gt_video)
  pred_video = np.asarray(pred_video)
  if gt_video.dtype.kind in "iu" and pred_video.dtype.kind in "iu":
    return gt_video.astype(np.int64), pred_video.astype(np.int64)
  both = np.concatenate([gt_video.astype(str), pred_video.astype(str)])
  _, codes = np.unique(both, return_inverse=True)
  return codes[:len(gt_video)].astype(np.int64), codes[len(gt_video):].astype(np.int64)


def _group_starts(sorted_keys):
  """Start offsets of the runs of equal values in a sorted 1-D array (plus the end)."""
  if len(sorted_keys) == 0:
    return np.zeros(1, np.int64)
  starts = np.flatnonzero(np.diff(sorted_keys)) + 1
  return np.concatenate([[0], starts, [len(sorted_keys)]]).astype(np.int64)


def detection_map(gt: Mapping[str, np.ndarray], pred: Mapping[str, np.ndarray],
                  tiou_thresholds: Sequence[float] = THUMOS14_TIOU,
                  num_classes: int | None = None):
  """Detection AP per class and mAP per tIoU threshold (official ActivityNet algorithm).

  Args:
    gt: ground truth table, arrays of length N: `video` (any ids: str or int), `label`
      (int class id), `start`, `end` (seconds; zero-length segments allowed).
    pred: prediction table, arrays of length P: `video`, `label`, `score`, `start`, `end`.
      Row order matters only for ties in score, exactly as in the official code (there: the
      order of the results file). Predictions whose class has no ground truth cannot change
      any AP and are ignored.
    tiou_thresholds: K thresholds.
    num_classes: C; default max label + 1.

  Returns:
    (map_K, ap_KxC): float64 fractions in [0, 1]. `ap_KxC` is NaN for classes without ground
    truth; `map_K` is the mean over the classes with ground truth (a class with ground truth but
    no prediction counts as 0). `map_K` is NaN when there is no ground truth at all.
  """
  thr_K = np.asarray(tiou_thresholds, np.float64).reshape(-1)
  num_thr = len(thr_K)
  gt_video, pred_video = _encode_videos(gt["video"], pred["video"])
  gt_label = np.asarray(gt["label"], np.int64).reshape(-1)
  pred_label = np.asarray(pred["label"], np.int64).reshape(-1)
  gt_start = np.asarray(gt["start"], np.float64).reshape(-1)
  gt_end = np.asarray(gt["end"], np.float64).reshape(-1)
  pred_start = np.asarray(pred["start"], np.float64).reshape(-1)
  pred_end = np.asarray(pred["end"], np.float64).reshape(-1)
  pred_score = np.asarray(pred["score"], np.float64).reshape(-1)
  if num_classes is None:
    num_classes = int(max(gt_label.max(initial=-1), pred_label.max(initial=-1))) + 1
  if len(gt_label) and (gt_label.min() < 0 or gt_label.max() >= num_classes):
    raise ValueError(f"ground-truth labels must lie in [0, {num_classes})")

  npos_C = np.bincount(gt_label, minlength=num_classes)
  has_gt_C = npos_C > 0
  ap_KxC = np.full((num_thr, num_classes), np.nan)
  ap_KxC[:, has_gt_C] = 0.0

  # 1) Rank predictions within each class that has ground truth: the official
  #    `scores.argsort()[::-1]` over the class's predictions in input order.
  keep = (pred_label >= 0) & (pred_label < num_classes)
  keep[keep] = has_gt_C[pred_label[keep]]
  kept = np.flatnonzero(keep)
  kept = kept[np.argsort(pred_label[kept], kind="stable")]
  class_bounds = _group_starts(pred_label[kept])
  ranked_parts = []
  for a, b in zip(class_bounds[:-1], class_bounds[1:]):
    idx = kept[a:b]
    ranked_parts.append(idx[pred_score[idx].argsort()[::-1]])
  ranked = np.concatenate(ranked_parts) if ranked_parts else np.zeros(0, np.int64)
  num_ranked = len(ranked)
  r_label = pred_label[ranked]
  r_video = pred_video[ranked]
  r_start = pred_start[ranked]
  r_end = pred_end[ranked]

  # 2) Ground truth grouped by (class, video), file order kept inside a group.
  num_videos = int(max(gt_video.max(initial=-1), pred_video.max(initial=-1))) + 1
  gt_key = gt_label * num_videos + gt_video
  gt_order = np.argsort(gt_key, kind="stable")
  gt_key_sorted = gt_key[gt_order]
  gt_bounds = _group_starts(gt_key_sorted)
  gt_group_keys = gt_key_sorted[gt_bounds[:-1]]

  # 3) Predictions grouped by (class, video), rank order kept inside a group. For each group
  #    with ground truth: the tIoU matrix once, each row's ground truths in the official
  #    visiting order, truncated to the ones that can match at the lowest threshold.
  r_key = r_label * num_videos + r_video
  p_order = np.argsort(r_key, kind="stable")
  p_key_sorted = r_key[p_order]
  p_bounds = _group_starts(p_key_sorted)
  thr_min = thr_K.min() if num_thr else np.inf
  rows_q, rows_iou, rows_gid, rows_group = [], [], [], []
  for g, (a, b) in enumerate(zip(p_bounds[:-1], p_bounds[1:])):
    if a == b:
      continue
    j = np.searchsorted(gt_group_keys, p_key_sorted[a])
    if j >= len(gt_group_keys) or gt_group_keys[j] != p_key_sorted[a]:
      continue  # no ground truth of this class in this video: all false positives
    q = p_order[a:b]
    gids = gt_order[gt_bounds[j]:gt_bounds[j + 1]]
    iou_PxG = segment_iou(gt_start[gids], gt_end[gids], r_start[q], r_end[q])
    srt_PxG = np.argsort(iou_PxG, axis=1)[:, ::-1]  # row-wise == the official 1-D argsort
    iou_PxG = np.take_along_axis(iou_PxG, srt_PxG, axis=1)
    # NaN sorts last, so reversed it comes first; `~(x < thr)` is the official "not below".
    cand_PxG = ~(iou_PxG < thr_min)
    n_cand = cand_PxG.sum(axis=1)
    active = n_cand > 0
    if not active.any():
      continue
    m = int(n_cand.max())
    rows_q.append(q[active])
    rows_iou.append(iou_PxG[active, :m])
    rows_gid.append(gids[srt_PxG[active, :m]])
    rows_group.append(np.full(int(active.sum()), g))

  tp_KxQ = np.zeros((num_thr, num_ranked), bool)
  if rows_q:
    width = max(x.shape[1] for x in rows_iou)
    num_gt = len(gt_label)
    num_active = sum(len(x) for x in rows_q)
    iou_AxM = np.full((num_active, width), -np.inf)  # padding never matches
    gid_AxM = np.full((num_active, width), num_gt)   # ... and points at a dummy column
    row = 0
    for iou, gid in zip(rows_iou, rows_gid):
      iou_AxM[row:row + len(iou), :iou.shape[1]] = iou
      gid_AxM[row:row + len(iou), :iou.shape[1]] = gid
      row += len(iou)
    q_A = np.concatenate(rows_q)
    group_A = np.concatenate(rows_group)
    # Position of each active prediction inside its group (rows are grouped, rank ordered).
    bounds = _group_starts(group_A)
    pos_A = np.arange(len(group_A)) - np.repeat(bounds[:-1], np.diff(bounds))
    by_round = np.argsort(pos_A, kind="stable")
    round_bounds = _group_starts(pos_A[by_round])
    locked_KxG = np.zeros((num_thr, num_gt + 1), bool)  # last column: padding, never locked
    free_KxAxM = ~(iou_AxM[None] < thr_K[:, None, None])
    for a, b in zip(round_bounds[:-1], round_bounds[1:]):
      rows = by_round[a:b]
      gid_SxM = gid_AxM[rows]
      ok_KxSxM = free_KxAxM[:, rows] & ~locked_KxG[:, gid_SxM]
      has_KxS = ok_KxSxM.any(axis=2)
      tp_KxQ[:, q_A[rows]] = has_KxS
      k_hit, s_hit = np.nonzero(has_KxS)
      first = ok_KxSxM[k_hit, s_hit].argmax(axis=1)
      locked_KxG[k_hit, gid_SxM[s_hit, first]] = True

  # 4) Cumulative precision / recall and interpolated AP per class.
  rank_bounds = _group_starts(r_label)
  for a, b in zip(rank_bounds[:-1], rank_bounds[1:]):
    if a == b:
      continue
    c = r_label[a]
    tp = tp_KxQ[:, a:b]
    tp_cum = np.cumsum(tp, axis=1).astype(np.float64)
    fp_cum = np.cumsum(~tp, axis=1).astype(np.float64)
    recall = tp_cum / float(npos_C[c])
    precision = tp_cum / (tp_cum + fp_cum)
    ap_KxC[:, c] = interpolated_ap(precision, recall)

  if has_gt_C.any():
    map_K = ap_KxC[:, has_gt_C].mean(axis=1)
  else:
    map_K = np.full(num_thr, np.nan)
  return map_K, ap_KxC


def classification_map(scores_NxC, labels_NxC) -> float:
  """Video-level classification mAP, a fraction in [0, 1].

  Per class, the non-interpolated AP of ranking the N videos by score (the mean of the
  precision at the rank of each positive video; the W-TALC / CO2-Net `getAP`, ranked with
  `np.argsort(-score)` like them); averaged over classes with at least one positive video.
  NaN if no class has a positive.
  """
  scores_NxC = np.asarray(scores_NxC, np.float64)
  pos_NxC = np.asarray(labels_NxC) > 0
  if scores_NxC.shape != pos_NxC.shape or scores_NxC.ndim != 2:
    raise ValueError(f"scores {scores_NxC.shape} and labels {pos_NxC.shape} must be [N, C]")
  npos_C = pos_NxC.sum(axis=0)
  valid_C = npos_C > 0
  if not valid_C.any():
    return float("nan")
  order_NxC = np.argsort(-scores_NxC, axis=0)
  hit_NxC = np.take_along_axis(pos_NxC, order_NxC, axis=0)
  tp_cum = np.cumsum(hit_NxC, axis=0)
  rank_N = np.arange(1, scores_NxC.shape[0] + 1)[:, None]
  ap_C = (hit_NxC * (tp_cum / rank_N)).sum(axis=0)[valid_C] / npos_C[valid_C]
  return float(ap_C.mean())


def top1_accuracy(scores_NxC, labels_NxC) -> float:
  """Top-1 video classification accuracy (VLPO Table 3 "ACC"), a fraction in [0, 1].

  Our definition (VLPO does not give one): a video counts as correct when its highest-scoring
  class is one of its labels; the mean is over the videos with at least one label (videos
  without any action are skipped). NaN if no video has a label.
  """
  scores_NxC = np.asarray(scores_NxC, np.float64)
  pos_NxC = np.asarray(labels_NxC) > 0
  if scores_NxC.shape != pos_NxC.shape or scores_NxC.ndim != 2:
    raise ValueError(f"scores {scores_NxC.shape} and labels {pos_NxC.shape} must be [N, C]")
  labelled_N = pos_NxC.any(axis=1)
  if not labelled_N.any():
    return float("nan")
  top_N = scores_NxC.argmax(axis=1)
  correct_N = pos_NxC[np.arange(len(top_N)), top_N]
  return float(correct_N[labelled_N].mean())


# ----------------------------------------------------------------------------- frame mIoU
# Pseudo-label quality (Ju et al. 2023, Table 3): each frame of a branch's frame-level
# scores is foreground of class c when its score is above a threshold and c is one of the
# video's ground-truth classes (as the pseudo-labels of Eq. 4 are made), else background; the
# IoU of each class's frame set with the ground truth's, over all evaluated frames, is
# averaged over the classes (foreground mIoU), and the background frames' IoU is the
# background mIoU.


def snippet_labels(segments_Gx2, labels_G, num_t: int, seconds_per_snippet: float,
                   num_classes: int) -> np.ndarray:
  """bool [T, C]: snippet t (covering [t, t + 1) x seconds_per_snippet) is of class c when its
  centre lies in a ground-truth segment [start, end] of class c."""
  centre_T = (np.arange(num_t) + 0.5) * float(seconds_per_snippet)
  segments_Gx2 = np.asarray(segments_Gx2, np.float64).reshape(-1, 2)
  inside_GxT = ((centre_T[None] >= segments_Gx2[:, :1]) & (centre_T[None] <= segments_Gx2[:, 1:]))
  out = np.zeros((num_t, num_classes), bool)
  for g, c in enumerate(np.asarray(labels_G, np.int64).reshape(-1)):
    out[:, c] |= inside_GxT[g]
  return out


class FrameIoU:
  """Accumulates frame-level intersections and unions over videos (see above)."""

  def __init__(self, num_classes: int, threshold: float):
    self.threshold = float(threshold)
    self.inter_C = np.zeros(num_classes, np.int64)
    self.union_C = np.zeros(num_classes, np.int64)
    self.inter_bg = self.union_bg = 0

  def add(self, score_TxC, video_label_C, gt_TxC):
    pred = (np.asarray(score_TxC) > self.threshold) & (np.asarray(video_label_C)[None] > 0)
    gt = np.asarray(gt_TxC, bool)
    self.inter_C += np.sum(pred & gt, axis=0)
    self.union_C += np.sum(pred | gt, axis=0)
    pred_bg, gt_bg = ~pred.any(axis=1), ~gt.any(axis=1)
    self.inter_bg += int(np.sum(pred_bg & gt_bg))
    self.union_bg += int(np.sum(pred_bg | gt_bg))

  def result(self) -> tuple[float, float, float]:
    """(foreground mIoU over the classes with a non-empty union, background IoU, the mean
    over those classes and the background together); NaN when there is nothing to average."""
    seen = self.union_C > 0
    ious = self.inter_C[seen] / self.union_C[seen]
    fg = float(np.mean(ious)) if seen.any() else float("nan")
    bg = self.inter_bg / self.union_bg if self.union_bg else float("nan")
    both = list(ious) + ([bg] if self.union_bg else [])
    return fg, bg, float(np.mean(both)) if both else float("nan")
