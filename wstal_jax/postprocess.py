"""Per-snippet scores of one video -> scored action proposals in seconds (numpy, host side).

The pipeline, every step a field of the config (see `get_preset`):

1. classes: keep the classes whose video-level score is >= `class_threshold`; if none, the
   argmax class.
2. candidates: threshold a score sequence (`threshold_sequence`: the kept classes' columns of
   `cas_TxC`, or the class-agnostic `actionness_T` shared by all kept classes) at each of
   `action_thresholds`; every run of consecutive snippets above a threshold is a region.
   Optionally the sequences are first upsampled linearly by `upsample` (ASL family: x24).
3. scores: outer-inner contrast (OIC) on the class's column of `cas_TxC`:
   mean(inside) - mean(outside) + gamma * video_score[c], where "outside" is
   floor(lambda * length) snippets on each side, clipped to the video (an empty outside
   counts as 0).
4. seconds: region [s, e] (inclusive indices of the possibly upsampled sequence) covers
   [s / u * sps, (e + 1) / u * sps], clipped to [0, duration]; regions shorter than
   `min_length_s` are dropped.
5. per-class NMS: "hard", Gaussian "soft" (every proposal kept, scores decayed), or
   "append_decayed" (hard NMS whose suppressed proposals are appended after the kept ones
   with score * exp(-iou^2 / sigma)); or "none".
6. proposals overlapping an ambiguous segment (THUMOS14's `Ambiguous_test.txt`) are removed
   when `filter_ambiguous` is set.

Snippet time: one snippet = 16 frames at 25 fps = 0.64 s; snippet i covers
[i * sps, (i + 1) * sps). For a video uniformly resampled from N original snippets to T
(`scale_B` in the batch), sps = 0.64 * N / T (`seconds_per_sampled_snippet`). With upsampling
by u, index j of the upsampled sequence sits at j / u snippets.

Where the defaults come from (the papers give the steps, the released code the numbers):
* `vlpo` (ASL family). VLPO App. A.1: class threshold "following [8]" (= CO2-Net, whose
  released inference keeps classes with score >= 0.2); "multiple action thresholds" on the
  hybrid CAS A-hat (Eq. 5) of each kept class; proposal score by the outer-inner contrast
  on A-hat; "soft non-maximum suppression". VLPO gives no numbers for these, so the rest is
  from the released code of ASL (Ma et al., CVPR 2021), the baseline VLPO builds on
  (Sec. 3.1, T=750, k=T/8): action thresholds arange(0.1, 1.0, 0.1) kept with `>=`, linear
  upsampling x24 before thresholding, OIC lambda=0.25 gamma=0.2, and its "soft NMS"
  (run with --soft_nms), which is our "append_decayed" with tIoU 0.4, sigma (its `nms_alpha`)
  0.35 and its "+1" in segment lengths in seconds (`length_offset_s`=1.0).
* `co2net` (CO2-Net / PVLR family). PVLR (Sec. 3.1.2, 4.1) uses the CO2-Net head and its
  evaluation code; CO2-Net's `multiple_threshold_hamnet`: class threshold 0.2 (`>=`),
  thresholds linspace(0.1, 0.9, 10) on the class-agnostic attention (`>`), OIC lambda=0.25
  gamma=0.2 on the class's CAS, per-class Gaussian soft-NMS sigma=0.3 keeping every
  proposal, with the "+1" in lengths in snippet units (`length_offset_s`=0.64), and
  removal of proposals overlapping ambiguous segments.

Readings we chose (documented once, here):
* OIC outer extents use floor(e + lambda*L) and max(0, floor(s - lambda*L)), as the
  reference code's int() does for these signs.
* The reference codes skip a region made only of snippet 0 (`np.array(...).any()` on the
  index list); we do not.
* Reference ambiguous filtering compares rounded snippet index sets; we remove a proposal
  whose overlap with an ambiguous segment has positive length in seconds.
* Output order: kept classes in ascending class id, inside a class the NMS output order.
"""
import dataclasses

import ml_collections
import numpy as np

from wstal_jax.errors import WstalError

SNIPPET_FRAMES = 16
FPS = 25.0
SECONDS_PER_SNIPPET = SNIPPET_FRAMES / FPS  # 0.64 s, THUMOS14 / ActivityNet I3D features

NMS_METHODS = ("none", "hard", "soft", "append_decayed")
THRESHOLD_SEQUENCES = ("cas", "actionness")


@dataclasses.dataclass
class Proposals:
  """Scored proposals of one video: int64 label [N], float64 score / start / end [N] (seconds)."""
  label: np.ndarray
  score: np.ndarray
  start: np.ndarray
  end: np.ndarray

  def __len__(self) -> int:
    return len(self.label)

  @classmethod
  def empty(cls) -> "Proposals":
    return cls(np.zeros(0, np.int64), np.zeros(0), np.zeros(0), np.zeros(0))

  def take(self, idx) -> "Proposals":
    """The proposals at `idx` (indices or boolean mask), in that order."""
    return Proposals(self.label[idx], self.score[idx], self.start[idx], self.end[idx])

  @classmethod
  def concat(cls, parts) -> "Proposals":
    parts = list(parts)
    if not parts:
      return cls.empty()
    return cls(*(np.concatenate([getattr(p, f) for p in parts])
                 for f in ("label", "score", "start", "end")))


# ------------------------------------------------------------------------------- presets


def get_preset(name: str) -> ml_collections.ConfigDict:
  """Post-processing config for a method family: 'vlpo' (ASL family) or 'co2net' (PVLR).

  Fields:
    class_threshold: keep classes with video score >= this (argmax if none passes).
    threshold_sequence: 'cas' (each kept class's column of cas_TxC) or 'actionness'
      (actionness_T, shared by all kept classes) is thresholded into regions.
    action_thresholds: tuple of thresholds; each gives its own regions (all are kept).
    threshold_strict: True keeps snippets with score > t, False with score >= t.
    upsample: integer factor of linear upsampling before thresholding (1 = none).
    oic_lambda: outer extent on each side, as a fraction of the region length.
    oic_gamma: weight of the video-level class score added to the OIC score.
    min_length_s: drop proposals shorter than this many seconds (0 keeps all).
    nms.method: 'hard', 'soft' (Gaussian), 'append_decayed' or 'none'; applied per class.
    nms.iou_threshold: tIoU at or above which 'hard' / 'append_decayed' suppress.
    nms.sigma: Gaussian decay score * exp(-iou^2 / sigma) ('soft', 'append_decayed').
    nms.length_offset_s: seconds added to every length in the NMS tIoU (the reference
      codes' "+1"; 0 gives the plain tIoU).
    filter_ambiguous: remove proposals overlapping the video's ambiguous segments.
  """
  cfg = ml_collections.ConfigDict()
  nms = ml_collections.ConfigDict()
  if name == "vlpo":
    cfg.class_threshold = 0.2        # VLPO A.1 "following [8]"; CO2-Net code: >= 0.2
    cfg.threshold_sequence = "cas"   # VLPO A.1: thresholds on A-hat (Eq. 5) per kept class
    cfg.action_thresholds = tuple(np.arange(0.1, 1.0, 0.1).tolist())  # ASL code, 0.1..0.9
    cfg.threshold_strict = False     # ASL code: score >= threshold
    cfg.upsample = 24                # ASL code: --scale 24
    cfg.oic_lambda = 0.25            # ASL code get_proposal_oic
    cfg.oic_gamma = 0.2              # ASL code --gamma
    cfg.min_length_s = 0.0
    nms.method = "append_decayed"    # VLPO A.1 "soft NMS" = ASL code --soft_nms
    nms.iou_threshold = 0.4          # ASL code --nms_thresh
    nms.sigma = 0.35                 # ASL code --nms_alpha
    nms.length_offset_s = 1.0        # ASL code: areas = x2 - x1 + 1 on seconds
    cfg.filter_ambiguous = False     # ASL evaluates without the ambiguous list
  elif name == "co2net":
    cfg.class_threshold = 0.2        # CO2-Net code: pred_vid_score >= 0.2
    cfg.threshold_sequence = "actionness"  # CO2-Net code: thresholds the attention
    cfg.action_thresholds = tuple(np.linspace(0.1, 0.9, 10).tolist())  # CO2-Net code
    cfg.threshold_strict = True      # CO2-Net code: attention > threshold
    cfg.upsample = 1                 # CO2-Net code: --scale 1
    cfg.oic_lambda = 0.25            # CO2-Net code get_proposal_oic_2
    cfg.oic_gamma = 0.2              # CO2-Net code --gamma-oic
    cfg.min_length_s = 0.0
    nms.method = "soft"              # CO2-Net code soft_nms(method='gaussian')
    nms.iou_threshold = 0.7          # CO2-Net code (unused by the Gaussian method)
    nms.sigma = 0.3                  # CO2-Net code sigma=0.3
    nms.length_offset_s = SECONDS_PER_SNIPPET  # CO2-Net: "+1" on snippet indices
    cfg.filter_ambiguous = True      # CO2-Net code filter_segments (Ambiguous_test.txt)
  else:
    raise WstalError(f"unknown post-processing preset {name!r}; choose 'vlpo' or 'co2net'")
  cfg.nms = nms
  return cfg


def _check_config(config):
  def need(cond, what):
    if not cond:
      raise WstalError(f"post-processing config: {what}")
  need(config.threshold_sequence in THRESHOLD_SEQUENCES,
       f"threshold_sequence {config.threshold_sequence!r} not in {THRESHOLD_SEQUENCES}")
  need(config.nms.method in NMS_METHODS,
       f"nms.method {config.nms.method!r} not in {NMS_METHODS}")
  need(int(config.upsample) == config.upsample and config.upsample >= 1,
       f"upsample must be an integer >= 1, got {config.upsample!r}")
  need(len(config.action_thresholds) > 0, "action_thresholds is empty")
  need(config.oic_lambda >= 0, f"oic_lambda must be >= 0, got {config.oic_lambda}")
  if config.nms.method in ("soft", "append_decayed"):
    need(config.nms.sigma > 0, f"nms.sigma must be > 0, got {config.nms.sigma}")


# ------------------------------------------------------------------------------ time axis


def seconds_per_sampled_snippet(seconds_per_snippet: float, num_snippets: int,
                                num_sampled: int) -> float:
  """Seconds covered by one element of a video resampled from `num_snippets` to `num_sampled`.

  The exact factor: sps * num_snippets / num_sampled (the batch's `scale_B` is
  num_snippets / num_sampled).
  """
  return float(seconds_per_snippet) * float(num_snippets) / float(num_sampled)


def snippets_to_seconds(start_idx, end_idx, seconds_per_snippet: float, upsample: int = 1,
                        duration: float | None = None):
  """Inclusive index range [s, e] of a (x`upsample`) sequence -> (start_s, end_s) arrays.

  start = s / u * sps, end = (e + 1) / u * sps, both clipped to [0, duration] when a
  positive duration is given.
  """
  step = float(seconds_per_snippet) / float(upsample)
  start = np.asarray(start_idx, np.float64) * step
  end = (np.asarray(end_idx, np.float64) + 1.0) * step
  if duration is not None and duration > 0:
    start = np.clip(start, 0.0, duration)
    end = np.clip(end, 0.0, duration)
  return start, end


def seconds_to_snippet(t_s, seconds_per_snippet: float) -> np.ndarray:
  """Index of the snippet that contains time t (floor(t / sps)), int64."""
  return np.floor(np.asarray(t_s, np.float64) / float(seconds_per_snippet)).astype(np.int64)


def upsample_linear(x_TxN, factor: int) -> np.ndarray:
  """Linear upsampling along time: [T, ...] -> [T * factor, ...].

  Element j is the sequence at time j / factor (snippet units), linearly interpolated
  between snippets and extrapolated past the last one from the last two (as ASL's
  `upgrade_resolution`, scipy interp1d with fill_value='extrapolate').
  """
  x = np.asarray(x_TxN, np.float64)
  factor = int(factor)
  if factor == 1:
    return x
  t = x.shape[0]
  pos = np.arange(t * factor) / factor
  if t == 1:
    return np.repeat(x, factor, axis=0)
  lo = np.minimum(np.floor(pos).astype(np.int64), t - 2)
  w = (pos - lo).reshape((-1,) + (1,) * (x.ndim - 1))
  return x[lo] * (1.0 - w) + x[lo + 1] * w


# ------------------------------------------------------------------------------- regions


def select_classes(video_scores_C, class_threshold: float) -> np.ndarray:
  """Class ids with score >= threshold, ascending; the argmax alone if none passes. int64."""
  scores = np.asarray(video_scores_C, np.float64)
  keep = np.flatnonzero(scores >= class_threshold)
  if keep.size == 0:
    keep = np.array([int(np.argmax(scores))])
  return keep.astype(np.int64)


def find_regions(mask_RxT):
  """Runs of True along time in each row -> (row_N, start_N, end_N), ends inclusive, int64.

  Sorted by row, then start.
  """
  mask_RxT = np.asarray(mask_RxT, bool)
  r = mask_RxT.shape[0]
  padded = np.zeros((r, mask_RxT.shape[1] + 2), np.int8)
  padded[:, 1:-1] = mask_RxT
  step = np.diff(padded, axis=1)
  row, start = np.nonzero(step == 1)
  _, stop = np.nonzero(step == -1)
  return row.astype(np.int64), start.astype(np.int64), stop.astype(np.int64) - 1


def oic_scores(seq_TxK, col_N, start_N, end_N, oic_lambda: float) -> np.ndarray:
  """Outer-inner contrast mean(inside) - mean(outside) of regions, float64 [N].

  Region n spans rows [start, end] (inclusive) of column col of `seq_TxK`; its outside is
  [max(0, floor(s - lambda L)), s) and (e, min(T - 1, floor(e + lambda L))], L = e - s + 1;
  an empty outside counts as 0. Prefix sums make it O(T + N).
  """
  seq = np.asarray(seq_TxK, np.float64)
  t = seq.shape[0]
  csum = np.concatenate([np.zeros((1, seq.shape[1])), np.cumsum(seq, axis=0)], axis=0)
  s = np.asarray(start_N, np.int64)
  e = np.asarray(end_N, np.int64)
  col = np.asarray(col_N, np.int64)
  length = e - s + 1
  inner = (csum[e + 1, col] - csum[s, col]) / length
  outer_s = np.maximum(0, np.floor(s - oic_lambda * length)).astype(np.int64)
  outer_e = np.minimum(t - 1, np.floor(e + oic_lambda * length)).astype(np.int64)
  n_out = (s - outer_s) + (outer_e - e)
  sum_out = (csum[s, col] - csum[outer_s, col]) + (csum[outer_e + 1, col] - csum[e + 1, col])
  outer = np.where(n_out > 0, sum_out / np.maximum(n_out, 1), 0.0)
  return inner - outer


# ----------------------------------------------------------------------------------- NMS


def _iou_one(i, rest, start, end, offset):
  """tIoU of proposal i with proposals `rest`, lengths + offset (the reference "+1")."""
  inter = np.maximum(0.0, np.minimum(end[i], end[rest]) - np.maximum(start[i], start[rest])
                     + offset)
  area_i = end[i] - start[i] + offset
  area_r = end[rest] - start[rest] + offset
  with np.errstate(divide="ignore", invalid="ignore"):
    return inter / (area_i + area_r - inter)


def nms(start_N, end_N, score_N, *, method: str, iou_threshold: float = 0.5,
        sigma: float = 0.3, length_offset: float = 0.0):
  """Non-maximum suppression of one class's proposals -> (index_M, score_M).

  `index_M` are positions into the inputs in output order; `score_M` the (possibly decayed)
  scores. Methods:
    'none': all, in input order, scores unchanged.
    'hard': greedy by `score.argsort()[::-1]`; drops proposals with tIoU >= iou_threshold
      with a kept one.
    'append_decayed' (ASL): as 'hard', but each suppressed proposal is appended after the kept
      ones (in suppression order) with score * exp(-iou^2 / sigma), iou with its suppressor.
    'soft' (Gaussian soft-NMS, Bodla et al. 2017, as CO2-Net): repeatedly take the current
      maximum (first on ties, with CO2-Net's swap-with-front bookkeeping) and multiply every
      remaining score by exp(-iou^2 / sigma); every proposal is kept.
  tIoU uses lengths end - start + length_offset.
  """
  start = np.asarray(start_N, np.float64)
  end = np.asarray(end_N, np.float64)
  score = np.array(score_N, np.float64)
  n = len(score)
  if method == "none" or n == 0:
    return np.arange(n), score
  if method in ("hard", "append_decayed"):
    order = score.argsort()[::-1]
    keep, dropped, dropped_score = [], [], []
    while order.size:
      i = order[0]
      keep.append(i)
      rest = order[1:]
      iou = _iou_one(i, rest, start, end, length_offset)
      gone = iou >= iou_threshold
      if method == "append_decayed" and gone.any():
        dropped.append(rest[gone])
        dropped_score.append(score[rest[gone]] * np.exp(-np.square(iou[gone]) / sigma))
      order = rest[~gone]
    index = np.array(keep, np.int64)
    new_score = score[index]
    if dropped:
      index = np.concatenate([index] + dropped)
      new_score = np.concatenate([new_score] + dropped_score)
    return index, new_score
  if method == "soft":
    order = np.arange(n)
    out = np.empty(n, np.int64)
    out_score = np.empty(n)
    for step in range(n):
      m = int(np.argmax(score[order]))
      i = order[m]
      order[m] = order[0]  # CO2-Net swaps the maximum to the front, then drops the front
      order = order[1:]
      out[step] = i
      out_score[step] = score[i]
      if order.size:
        iou = _iou_one(i, order, start, end, length_offset)
        score[order] *= np.exp(-(iou * iou) / sigma)
    return out, out_score
  raise WstalError(f"post-processing config: nms.method {method!r} not in {NMS_METHODS}")


def remove_ambiguous(proposals: Proposals, ambiguous_Mx2) -> Proposals:
  """Drops proposals whose overlap with any ambiguous segment (seconds) has positive length."""
  amb = np.asarray(ambiguous_Mx2, np.float64).reshape(-1, 2)
  if len(proposals) == 0 or len(amb) == 0:
    return proposals
  inter_NxM = (np.minimum(proposals.end[:, None], amb[None, :, 1])
               - np.maximum(proposals.start[:, None], amb[None, :, 0]))
  return proposals.take(~(inter_NxM > 0).any(axis=1))


# ------------------------------------------------------------------------------ pipeline


def video_proposals(video_scores_C, cas_TxC, actionness_T, *, seconds_per_snippet: float,
                    duration: float | None, config, ambiguous=None) -> Proposals:
  """Proposals of one video from its scores (the pipeline in the module docstring).

  Args:
    video_scores_C: [C] video-level class probabilities (class selection, OIC gamma term).
    cas_TxC: [T, C] sequence the OIC score is computed on (and thresholded when
      `config.threshold_sequence == 'cas'`); only the T valid snippets, no padding.
    actionness_T: [T] class-agnostic sequence, or None (needed for 'actionness').
    seconds_per_snippet: seconds per element of the sequences (0.64, or
      `seconds_per_sampled_snippet(...)` for resampled videos).
    duration: video length in seconds for clipping (None or <= 0: no clipping).
    config: a `get_preset` ConfigDict (or one with the same fields).
    ambiguous: [M, 2] ambiguous segments in seconds, used if `config.filter_ambiguous`.

  Returns:
    Proposals (label int64, score, start, end seconds).
  """
  _check_config(config)
  video_scores_C = np.asarray(video_scores_C, np.float64).reshape(-1)
  cas_TxC = np.asarray(cas_TxC, np.float64)
  num_classes = video_scores_C.shape[0]
  if cas_TxC.ndim != 2 or cas_TxC.shape[1] != num_classes or cas_TxC.shape[0] == 0:
    raise ValueError(f"cas_TxC {cas_TxC.shape} must be [T > 0, C={num_classes}]")
  t = cas_TxC.shape[0]
  if config.threshold_sequence == "actionness":
    if actionness_T is None:
      raise WstalError("post-processing config: threshold_sequence='actionness' but the "
                       "method gives no actionness_T")
    actionness_T = np.asarray(actionness_T, np.float64).reshape(-1)
    if actionness_T.shape[0] != t:
      raise ValueError(f"actionness_T {actionness_T.shape} does not match cas_TxC {cas_TxC.shape}")

  classes_K = select_classes(video_scores_C, config.class_threshold)
  u = int(config.upsample)
  oic_TxK = upsample_linear(cas_TxC[:, classes_K], u)
  if config.threshold_sequence == "cas":
    seq_RxT = oic_TxK.T                                   # one row per kept class
  else:
    seq_RxT = upsample_linear(actionness_T, u)[None, :]   # one row, shared by all classes
  thr_A = np.asarray(config.action_thresholds, np.float64)
  if config.threshold_strict:
    mask_AxRxT = seq_RxT[None] > thr_A[:, None, None]
  else:
    mask_AxRxT = seq_RxT[None] >= thr_A[:, None, None]
  rows, s_idx, e_idx = find_regions(mask_AxRxT.reshape(-1, seq_RxT.shape[1]))
  if config.threshold_sequence == "cas":
    col = rows % len(classes_K)
  else:  # every actionness region is a candidate for every kept class
    col = np.repeat(np.arange(len(classes_K))[None, :], len(rows), axis=0).reshape(-1)
    s_idx = np.repeat(s_idx, len(classes_K))
    e_idx = np.repeat(e_idx, len(classes_K))
  # Regions of one class stay in threshold order (reference order, matters for NMS ties).
  by_class = np.argsort(col, kind="stable")
  col, s_idx, e_idx = col[by_class], s_idx[by_class], e_idx[by_class]

  score = (oic_scores(oic_TxK, col, s_idx, e_idx, config.oic_lambda)
           + config.oic_gamma * video_scores_C[classes_K[col]])
  start, end = snippets_to_seconds(s_idx, e_idx, seconds_per_snippet, u, duration)
  length = end - start
  keep = length > 0  # only a region wholly past `duration` has none left after clipping
  if config.min_length_s > 0:
    keep &= length >= config.min_length_s
  props = Proposals(classes_K[col[keep]], score[keep], start[keep], end[keep])

  parts = []
  for k in np.unique(props.label):
    idx = np.flatnonzero(props.label == k)
    order, new_score = nms(props.start[idx], props.end[idx], props.score[idx],
                           method=config.nms.method, iou_threshold=config.nms.iou_threshold,
                           sigma=config.nms.sigma, length_offset=config.nms.length_offset_s)
    part = props.take(idx[order])
    part.score = new_score
    parts.append(part)
  out = Proposals.concat(parts)
  if config.filter_ambiguous and ambiguous is not None:
    out = remove_ambiguous(out, ambiguous)
  return out
