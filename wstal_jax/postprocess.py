"""Per-snippet scores of one video -> scored action proposals in seconds (numpy, host side).

The pipeline, every step a field of the config (see `get_preset`):

1. classes: keep the classes whose video-level score is >= `class_threshold`; if none, the
   argmax class.
2. candidates: threshold a score sequence (`threshold_sequence`: the kept classes' columns of
   `cas_TxC`, or the class-agnostic `actionness_T` shared by all kept classes) at each of
   `action_thresholds`; every run of consecutive snippets above a threshold is a region.
   Optionally the sequences are first upsampled linearly by `upsample` (ASL family: x24).
3. scores (`score_mode`): 'oic', the outer-inner contrast on the class's column of
   `cas_TxC`: mean(inside) - mean(outside) + gamma * video_score[c] (or the method's own
   `oic_scores` for this term, e.g. ASL's MIL score beside VLPO's p^), where "outside" is
   floor(lambda * length) snippets on each side, clipped to the video (an empty outside
   counts as 0); 'max', the maximum of the class's column inside the region (Ju et al.
   Sec. 3.4); or 'max_video', that maximum times the class's video score (the 'ju2023'
   preset: its detection column is min-max normalised per video, so every video's top
   region has maximum 1 and the maximum alone cannot rank proposals across videos).
4. seconds: region [s, e] (inclusive indices of the possibly upsampled sequence) covers
   [s / u * sps, (e + 1) / u * sps], clipped to [0, duration]; regions shorter than
   `min_length_s` are dropped.
5. per-class NMS: "hard", Gaussian "soft" (every proposal kept, scores decayed), or
   "append_decayed" (hard NMS whose suppressed proposals are appended after the kept ones
   with score * exp(-iou^2 / sigma)); or "none".
6. proposals overlapping an ambiguous segment (THUMOS14's `Ambiguous_test.txt`) are removed
   when `filter_ambiguous` is set.

`video_proposals` runs this for one video; `proposals_for_videos` for many videos at once,
with the same output bit for bit and each step vectorised across videos (the sequential
soft-NMS of all (video, class) groups advances in lockstep). On the THUMOS14 test set with the
'co2net' preset that is ~10x faster than the former per-video loop; per-video calls are 2-3x
faster.

NMS (step 5) is `wstal_jax.nms.nms_groups`, run once on all (video, class) groups; that module
documents the methods, why its vectorised result is the reference loops' (ties included), and
its input rules. Non-finite proposals (from NaN / inf model outputs, seconds_per_snippet or
durations) are a WstalError naming the video; 'hard' / 'append_decayed' with
nms.iou_threshold <= 0 keep only each class's top proposal (every tIoU reaches the threshold).

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
* `pvlr` (PVLR's released evaluation, an option: `configs/pvlr.py:reading=code`): the
  `co2net` pipeline with thresholds linspace(0.1, 0.95, 10), OIC lambda=0.1 gamma=0.05 on the
  attention regions, plus a second source of regions (`cas_source`): each kept class's CAS
  column min-max normalised over the video, thresholded (`>`) at linspace(0.1, 0.95, 10) and
  OIC-scored on the normalised column with lambda=0.1 gamma=0.5; both sources' proposals of a
  class (the CAS source's first) go through one Gaussian soft-NMS with sigma=0.2.

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
from wstal_jax.nms import NMS_METHODS, nms_groups

SNIPPET_FRAMES = 16
FPS = 25.0
SECONDS_PER_SNIPPET = SNIPPET_FRAMES / FPS  # 0.64 s, THUMOS14 / ActivityNet I3D features

THRESHOLD_SEQUENCES = ("cas", "actionness")
PRESETS = ("vlpo", "co2net", "pvlr", "ju2023", "delu", "pmil", "seal")
SCORE_MODES = ("oic", "max", "max_video")


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
    cas_source.enabled: also threshold each kept class's CAS column, min-max normalised over
      the video (PVLR's released evaluation); its regions are OIC-scored on that normalised
      column with cas_source.oic_lambda / oic_gamma, thresholded at
      cas_source.action_thresholds (strict per cas_source.threshold_strict), and join the
      class's other proposals before NMS.
  """
  cfg = ml_collections.ConfigDict()
  nms = ml_collections.ConfigDict()
  cas = ml_collections.ConfigDict()   # off unless a preset turns it on (PVLR's release)
  cas.enabled = False
  cas.action_thresholds = tuple(np.linspace(0.1, 0.95, 10).tolist())   # PVLR code
  cas.threshold_strict = True        # PVLR code: normalised CAS > threshold
  cas.oic_lambda = 0.1               # PVLR code cas_lambda_
  cas.oic_gamma = 0.5                # PVLR code cas_gamma_oic
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
  elif name == "ju2023":             # Ju et al. Sec. 3.4, 4.1 (no public code)
    cfg.class_threshold = 0.85       # theta_cls ("greater than"; argmax if none passes)
    cfg.threshold_sequence = "cas"   # each kept class's frame-level score column
    cfg.action_thresholds = (0.45,)  # theta_loc, one threshold
    cfg.threshold_strict = True      # "threshold detection scores with theta_loc": > 0.45
    cfg.upsample = 1
    cfg.oic_lambda = 0.0             # unused with score_mode='max_video'
    cfg.oic_gamma = 0.0
    cfg.min_length_s = 0.0
    nms.method = "soft"              # "soft non-maximum suppression"; the paper gives no
    nms.iou_threshold = 0.7          # numbers: the Gaussian soft-NMS of the CO2-Net family
    nms.sigma = 0.3                  # (sigma 0.3) with the plain tIoU. With one threshold on
                                     # one sequence per class the regions never overlap, so
                                     # it changes nothing unless action_thresholds grows
    nms.length_offset_s = 0.0
    cfg.filter_ambiguous = False     # the official ActivityNet algorithm, no filtering
  elif name in ("co2net", "pvlr", "delu", "pmil", "seal"):
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
    if name == "delu":               # DELU's release (2024): 20 thresholds, and proposals
      cfg.action_thresholds = tuple(np.linspace(0.1, 0.9, 20).tolist())   # of one snippet
      cfg.min_length_s = 1.5 * SECONDS_PER_SNIPPET   # dropped (t_end - t_start > 1 snippet)
    if name == "pvlr":               # PVLR's released multiple_threshold_hamnet
      cfg.action_thresholds = tuple(np.linspace(0.1, 0.95, 10).tolist())
      cfg.oic_lambda = 0.1           # PVLR code act_lambda_
      cfg.oic_gamma = 0.05           # PVLR code act_gamma_oic
      nms.sigma = 0.2                # PVLR code sigma 0.2
      cas.enabled = True
    # pmil / seal: proposal methods score given candidates (`proposals_from_candidates`
    # reads only class_threshold, nms and filter_ambiguous). P-MIL code: class threshold 0.2,
    # Gaussian soft-NMS sigma 0.3 on snippet units with "+1", the ambiguous filter.
    if name == "seal":               # SEAL code: class threshold 0.25, sigma 0.1
      cfg.class_threshold = 0.25
      nms.sigma = 0.1
  else:
    raise WstalError(f"unknown post-processing preset {name!r}; choose one of {PRESETS}")
  cfg.score_mode = "max_video" if name == "ju2023" else "oic"   # step 3
  cfg.nms = nms
  cfg.cas_source = cas
  return cfg


def check_config(config) -> None:
  """WstalError naming the first bad field of a post-processing config."""
  _Settings.of(config)


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
  need(config.get("score_mode", "oic") in SCORE_MODES,
       f"score_mode {config.get('score_mode')!r} not in {SCORE_MODES}")
  if config.nms.method in ("soft", "append_decayed"):
    need(config.nms.sigma > 0, f"nms.sigma must be > 0, got {config.nms.sigma}")
  if config.nms.method in ("hard", "append_decayed"):
    need(not np.isnan(config.nms.iou_threshold), "nms.iou_threshold is NaN")
  need(np.isfinite(config.nms.length_offset_s) and config.nms.length_offset_s >= 0,
       f"nms.length_offset_s must be finite and >= 0, got {config.nms.length_offset_s}")


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
  col = np.asarray(col_N, np.int64)
  return _oic_from_prefix_sums(csum.T.reshape(-1), col * (t + 1), start_N, end_N, t,
                               oic_lambda)


def _oic_from_prefix_sums(csum, base_N, start_N, end_N, t_N, oic_lambda):
  """`oic_scores` of regions whose column's prefix sums (0 first) start at csum[base]; t_N is
  that column's length."""
  s = np.asarray(start_N, np.int64)
  e = np.asarray(end_N, np.int64)
  length = e - s + 1
  inner = (csum[base_N + e + 1] - csum[base_N + s]) / length
  outer_s = np.maximum(0, np.floor(s - oic_lambda * length)).astype(np.int64)
  outer_e = np.minimum(t_N - 1, np.floor(e + oic_lambda * length)).astype(np.int64)
  n_out = (s - outer_s) + (outer_e - e)
  sum_out = ((csum[base_N + s] - csum[base_N + outer_s])
             + (csum[base_N + outer_e + 1] - csum[base_N + e + 1]))
  outer = np.where(n_out > 0, sum_out / np.maximum(n_out, 1), 0.0)
  return inner - outer


# ------------------------------------------------------------------------------- filtering


def remove_ambiguous(proposals: Proposals, ambiguous_Mx2) -> Proposals:
  """Drops proposals whose overlap with any ambiguous segment (seconds) has positive length."""
  amb = np.asarray(ambiguous_Mx2, np.float64).reshape(-1, 2)
  if len(proposals) == 0 or len(amb) == 0:
    return proposals
  inter_NxM = (np.minimum(proposals.end[:, None], amb[None, :, 1])
               - np.maximum(proposals.start[:, None], amb[None, :, 0]))
  return proposals.take(~(inter_NxM > 0).any(axis=1))


# ------------------------------------------------------------------------------ pipeline


@dataclasses.dataclass(frozen=True)
class _Settings:
  """A checked post-processing config as plain values (ConfigDict reads are slow)."""
  class_threshold: float
  threshold_sequence: str
  action_thresholds: np.ndarray
  threshold_strict: bool
  upsample: int
  oic_lambda: float
  oic_gamma: float
  min_length_s: float
  nms_method: str
  iou_threshold: float
  sigma: float
  length_offset_s: float
  filter_ambiguous: bool
  cas_source: "_Settings | None" = None   # the min-max normalised CAS source, if enabled
  score_mode: str = "oic"

  @classmethod
  def of(cls, config) -> "_Settings":
    _check_config(config)
    nms_cfg = config.nms
    main = cls(float(config.class_threshold), str(config.threshold_sequence),
               np.asarray(config.action_thresholds, np.float64), bool(config.threshold_strict),
               int(config.upsample), float(config.oic_lambda), float(config.oic_gamma),
               float(config.min_length_s), str(nms_cfg.method), float(nms_cfg.iou_threshold),
               float(nms_cfg.sigma), float(nms_cfg.length_offset_s),
               bool(config.filter_ambiguous), score_mode=str(config.get("score_mode", "oic")))
    cas = config.get("cas_source")
    if cas is not None and bool(cas.enabled):
      if len(cas.action_thresholds) == 0:
        raise WstalError("post-processing config: cas_source.action_thresholds is empty")
      if cas.oic_lambda < 0:
        raise WstalError(f"post-processing config: cas_source.oic_lambda must be >= 0, got "
                         f"{cas.oic_lambda}")
      main = dataclasses.replace(main, cas_source=dataclasses.replace(
          main, threshold_sequence="cas",
          action_thresholds=np.asarray(cas.action_thresholds, np.float64),
          threshold_strict=bool(cas.threshold_strict), oic_lambda=float(cas.oic_lambda),
          oic_gamma=float(cas.oic_gamma), score_mode="oic"))
    return main


def minmax_columns(cas_TxC) -> np.ndarray:
  """Each column min-max normalised over time (a constant column gives 0)."""
  cas_TxC = np.asarray(cas_TxC, np.float64)
  lo, hi = cas_TxC.min(axis=0), cas_TxC.max(axis=0)
  span = hi - lo
  return np.where(span > 0, (cas_TxC - lo) / np.where(span > 0, span, 1.0), 0.0)


def _threshold_regions(x_L, thresholds_A, strict: bool):
  """Runs of x > t (strict) or x >= t for every threshold t -> (a_R, start_R, end_R).

  The same runs as `find_regions` on the [A, L] masks (a = index into thresholds_A, ends
  inclusive), sorted by (a, start), but in O(A L) cheap passes plus O(L + R): x_i passes the
  lowest c_i of the sorted thresholds (the masks are nested), so a run of sorted threshold j
  starts where c rises past j and ends where it falls to j or below.
  """
  thr = np.asarray(thresholds_A, np.float64).reshape(-1)
  by_value = np.argsort(thr, kind="stable")
  count = np.zeros(len(x_L) + 2, np.int16 if len(thr) < 2 ** 15 else np.int64)
  inner = count[1:-1]
  for t in thr[by_value]:
    inner += (x_L > t) if strict else (x_L >= t)
  step = np.diff(count)            # step[i] = c_i - c_(i-1), c_(-1) = c_L = 0
  up = np.flatnonzero(step[:-1] > 0)
  down = np.flatnonzero(step[1:] < 0)
  rises = step[up].astype(np.int64)
  falls = -step[down + 1].astype(np.int64)
  j_start = (np.repeat(inner[up] - step[up], rises).astype(np.int64)
             + np.arange(int(rises.sum())) - np.repeat(np.cumsum(rises) - rises, rises))
  j_end = (np.repeat(inner[down] + step[down + 1], falls).astype(np.int64)
           + np.arange(int(falls.sum())) - np.repeat(np.cumsum(falls) - falls, falls))
  start = np.repeat(up, rises)
  end = np.repeat(down, falls)
  first = np.lexsort((start, j_start))
  last = np.lexsort((end, j_end))
  a = by_value[j_start[first]]
  order = np.lexsort((start[first], a))
  return a[order], start[first][order], end[last][order]


def _candidates(video_scores, cas, actionness, seconds_per_snippet, durations,
                cfg: _Settings, oic_scores=None):
  """Steps 1-4 of the pipeline for every video at once -> (video_N, Proposals before NMS).

  Sorted by video, then class (ascending), then threshold, then start: each class's regions in
  the reference order (it decides NMS ties). Each value is computed as the one-video
  reference computes it: per-video prefix sums, the same elementwise formulas.
  oic_scores: None (the gamma term reads video_scores) or per video [C] scores for it.
  """
  u = cfg.upsample
  seqs, seg_video, seg_class = [], [], []     # thresholded sequences
  sums, sum_at, seq_len = [], [], []          # OIC prefix sums, (video, class) columns
  cols, col_at = [], []                       # the raw columns ('max' scores)
  col_base = 0
  classes, class_at, vid_score = [], [], []
  class_base = sum_base = 0
  for v, (scores_c, cas_tc) in enumerate(zip(video_scores, cas)):
    scores_c = np.asarray(scores_c, np.float64).reshape(-1)
    cas_tc = np.asarray(cas_tc, np.float64)
    num_classes = scores_c.shape[0]
    if cas_tc.ndim != 2 or cas_tc.shape[1] != num_classes or cas_tc.shape[0] == 0:
      raise ValueError(f"cas_TxC {cas_tc.shape} must be [T > 0, C={num_classes}]")
    t = cas_tc.shape[0]
    act = actionness[v]
    if cfg.threshold_sequence == "actionness":
      if act is None:
        raise WstalError("post-processing config: threshold_sequence='actionness' but the "
                         "method gives no actionness_T")
      act = np.asarray(act, np.float64).reshape(-1)
      if act.shape[0] != t:
        raise ValueError(f"actionness_T {act.shape} does not match cas_TxC {cas_tc.shape}")
    classes_k = select_classes(scores_c, cfg.class_threshold)
    oic_tk = upsample_linear(cas_tc[:, classes_k], u)
    if cfg.threshold_sequence == "cas":
      seqs.extend(oic_tk.T)                   # one sequence per kept class
      seg_video.extend([v] * len(classes_k))
      seg_class.extend(range(len(classes_k)))
    else:
      seqs.append(upsample_linear(act, u))    # one sequence, shared by all kept classes
      seg_video.append(v)
    csum = np.cumsum(oic_tk, axis=0)
    sums.append(np.concatenate([np.zeros((len(classes_k), 1)), csum.T], axis=1).reshape(-1))
    sum_at.append(sum_base)
    seq_len.append(oic_tk.shape[0])
    sum_base += sums[-1].size
    if cfg.score_mode in ("max", "max_video"):
      cols.append(oic_tk.T.reshape(-1))
      col_at.append(col_base)
      col_base += cols[-1].size
    classes.append(classes_k)
    class_at.append(class_base)
    gamma_c = scores_c if oic_scores is None else np.asarray(
        oic_scores[v], np.float64).reshape(-1)
    if gamma_c.shape != scores_c.shape:
      raise ValueError(f"oic_scores {gamma_c.shape} do not match video_scores {scores_c.shape}")
    vid_score.append(gamma_c[classes_k])
    class_base += len(classes_k)
  num_k = np.array([len(c) for c in classes], np.int64)
  sum_at, seq_len, class_at = (np.array(x, np.int64) for x in (sum_at, seq_len, class_at))

  # All sequences end to end, NaN between them (below every threshold, whatever the rule).
  lengths = np.array([len(x) for x in seqs], np.int64)
  seg_at = np.cumsum(lengths + 1) - (lengths + 1)
  gap = np.full(1, np.nan)
  joined = np.concatenate([part for x in seqs for part in (x, gap)])
  thr, s_idx, e_idx = _threshold_regions(joined, cfg.action_thresholds, cfg.threshold_strict)
  seg = np.searchsorted(seg_at, s_idx, side="right") - 1
  s_idx, e_idx = s_idx - seg_at[seg], e_idx - seg_at[seg]
  video = np.asarray(seg_video, np.int64)[seg]
  if cfg.threshold_sequence == "cas":
    col = np.asarray(seg_class, np.int64)[seg]
  else:  # every actionness region is a candidate for every kept class of its video
    reps = num_k[video]
    col = np.arange(int(reps.sum())) - np.repeat(np.cumsum(reps) - reps, reps)
    thr, s_idx, e_idx, video = (np.repeat(x, reps) for x in (thr, s_idx, e_idx, video))
  order = np.lexsort((s_idx, thr, col, video))
  video, col, s_idx, e_idx = video[order], col[order], s_idx[order], e_idx[order]

  t_n = seq_len[video]
  if cfg.score_mode in ("max", "max_video"):   # the column's maximum inside [s, e]
    flat = np.concatenate(cols + [np.zeros(1)]) if cols else np.zeros(1)
    base = np.asarray(col_at, np.int64)[video] + col * t_n
    bounds = np.stack([base + s_idx, base + e_idx + 1], axis=1).reshape(-1)
    score = (np.maximum.reduceat(flat, bounds)[0::2] if len(bounds) else np.zeros(0))
    if cfg.score_mode == "max_video":
      vid_score_flat = np.concatenate(vid_score) if vid_score else np.zeros(0)
      score = score * vid_score_flat[class_at[video] + col]
  else:
    csum_flat = np.concatenate(sums) if sums else np.zeros(0)
    vid_score_flat = np.concatenate(vid_score) if vid_score else np.zeros(0)
    score = (_oic_from_prefix_sums(csum_flat, sum_at[video] + col * (t_n + 1), s_idx, e_idx,
                                   t_n, cfg.oic_lambda)
             + cfg.oic_gamma * vid_score_flat[class_at[video] + col])
  step_v = np.array([float(sps) / float(u) for sps in seconds_per_snippet])
  clip = np.array([d is not None and d > 0 for d in durations], bool)
  lo_v = np.where(clip, 0.0, -np.inf)
  hi_v = np.array([float(d) if c else np.inf for d, c in zip(durations, clip)])
  step = step_v[video]
  start = np.clip(s_idx.astype(np.float64) * step, lo_v[video], hi_v[video])
  end = np.clip((e_idx.astype(np.float64) + 1.0) * step, lo_v[video], hi_v[video])
  length = end - start
  keep = length > 0  # only a region wholly past `duration` has none left after clipping
  if cfg.min_length_s > 0:
    keep &= length >= cfg.min_length_s
  label = (np.concatenate(classes) if classes else np.zeros(0, np.int64))[class_at[video] + col]
  return video[keep], Proposals(label[keep], score[keep], start[keep], end[keep])


def _per_video(value, num_videos, what):
  """A scalar or None for every video, or a sequence of one value per video -> list."""
  if value is None or isinstance(value, (int, float, np.number)) or (
      isinstance(value, np.ndarray) and value.ndim == 0):
    return [value] * num_videos
  value = list(value)
  if len(value) != num_videos:
    raise ValueError(f"{what}: {len(value)} values for {num_videos} videos")
  return value


def proposals_for_videos(video_scores, cas, actionness, *, seconds_per_snippet, durations,
                         config, ambiguous=None, oic_scores=None) -> list:
  """`video_proposals` of many videos at once -> list of Proposals, one per video.

  The same proposals bit for bit as calling `video_proposals` per video, but each step runs
  once for all videos (the soft-NMS of all (video, class) groups in lockstep, see
  `wstal_jax.nms.nms_groups`), which is several times faster on a test set.

  Args:
    video_scores: per video, [C] video-level class probabilities.
    cas: per video, [T_v, C] (valid snippets only).
    actionness: per video [T_v] (or None), or None for all videos.
    seconds_per_snippet: one value, or one per video.
    durations: one value (None: no clipping), or one per video.
    config: a `get_preset` ConfigDict (or one with the same fields).
    ambiguous: None, or per video [M, 2] ambiguous segments in seconds (or None).
    oic_scores: None, or per video [C] scores for the OIC gamma term in place of
      video_scores (ASL adds its MIL score there while VLPO selects classes with p^; a
      method gives them as predict's `oic_scores_BxC`).
  """
  cfg = _Settings.of(config)
  num_videos = len(video_scores)
  if len(cas) != num_videos:
    raise ValueError(f"{num_videos} video_scores but {len(cas)} cas")
  if oic_scores is not None and len(oic_scores) != num_videos:
    raise ValueError(f"{num_videos} video_scores but {len(oic_scores)} oic_scores")
  act = _per_video(actionness, num_videos, "actionness")
  sps = _per_video(seconds_per_snippet, num_videos, "seconds_per_snippet")
  dur = _per_video(durations, num_videos, "durations")
  amb = _per_video(ambiguous, num_videos, "ambiguous") if ambiguous is not None else None
  if num_videos == 0:
    return []
  video, flat = _candidates(video_scores, cas, act, sps, dur, cfg, oic_scores)
  if cfg.cas_source is not None:   # PVLR's second source: the normalised CAS, placed first
    cas_n = [minmax_columns(c) for c in cas]
    video_c, flat_c = _candidates(video_scores, cas_n, act, sps, dur, cfg.cas_source,
                                  oic_scores)
    video = np.concatenate([video_c, video])
    flat = Proposals.concat([flat_c, flat])
    order = np.lexsort((flat.label, video))   # stable: within a class, the CAS source first
    video, flat = video[order], flat.take(order)
  for what in ("score", "start", "end"):
    bad = np.flatnonzero(~np.isfinite(getattr(flat, what)))
    if bad.size:
      raise WstalError(f"post-processing: video {int(video[bad[0]])} (of {num_videos}) has "
                       f"non-finite proposal {what}s ({getattr(flat, what)[bad[0]]}): NaN or "
                       "inf in its video_scores / cas / actionness, seconds_per_snippet or "
                       "duration")
  # Groups: (video, class); candidates are sorted by video, then class (key >= 0, so the first
  # candidate starts a group).
  key = video * (int(flat.label.max(initial=0)) + 1) + flat.label
  bounds = np.append(np.flatnonzero(np.diff(key, prepend=-1)), len(flat))
  index, score = nms_groups(flat.start, flat.end, flat.score, bounds, method=cfg.nms_method,
                            iou_threshold=cfg.iou_threshold, sigma=cfg.sigma,
                            length_offset=cfg.length_offset_s)
  out = flat.take(index)
  out.score = score
  cuts = np.searchsorted(video[index], np.arange(1, num_videos))
  parts = [out.take(slice(lo, hi)) for lo, hi in zip(np.r_[0, cuts], np.r_[cuts, len(out)])]
  if cfg.filter_ambiguous and amb is not None:
    parts = [p if a is None else remove_ambiguous(p, a) for p, a in zip(parts, amb)]
  return parts


def proposals_from_candidates(video_scores, scores, segments, *, config,
                              ambiguous=None) -> list:
  """Detections of proposal-based methods (P-MIL, SEAL) -> list of Proposals, one per video.

  Per video: the classes kept by `class_threshold` (argmax if none passes); for each, every
  candidate segment with its score for the class (the method's score, video bonus included);
  per-class NMS (`config.nms`); the ambiguous filter. No thresholding, no OIC: the method
  scored the candidates.

  Args:
    video_scores: per video, [C].
    scores: per video, [M_v, C] candidate scores (valid candidates only).
    segments: per video, [M_v, 2] candidate segments in seconds.
    config: a `get_preset('pmil' | 'seal')` ConfigDict.
    ambiguous: None, or per video [A, 2] ambiguous segments in seconds (or None).
  """
  cfg = _Settings.of(config)
  num_videos = len(video_scores)
  amb = _per_video(ambiguous, num_videos, "ambiguous") if ambiguous is not None else None
  rows = []
  for v in range(num_videos):
    seg = np.asarray(segments[v], np.float64).reshape(-1, 2)
    sc = np.asarray(scores[v], np.float64).reshape(len(seg), len(video_scores[v]))
    for c in select_classes(video_scores[v], cfg.class_threshold):
      rows.append((np.full(len(seg), v), np.full(len(seg), c), sc[:, c], seg[:, 0], seg[:, 1]))
  if not sum(len(r[0]) for r in rows):
    return [Proposals.empty() for _ in range(num_videos)]
  video, label, score, start, end = (np.concatenate([r[k] for r in rows]) for k in range(5))
  bad = np.flatnonzero(~np.isfinite(score) | ~np.isfinite(start) | ~np.isfinite(end))
  if bad.size:
    raise WstalError(f"post-processing: video {int(video[bad[0]])} (of {num_videos}) has a "
                     "non-finite candidate score or segment")
  flat = Proposals(label.astype(np.int64), score, start, end)
  key = video.astype(np.int64) * (int(label.max()) + 1) + label.astype(np.int64)
  bounds = np.append(np.flatnonzero(np.diff(key, prepend=-1)), len(flat))
  index, kept_score = nms_groups(flat.start, flat.end, flat.score, bounds,
                                 method=cfg.nms_method, iou_threshold=cfg.iou_threshold,
                                 sigma=cfg.sigma, length_offset=cfg.length_offset_s)
  out = flat.take(index)
  out.score = kept_score
  video = video[index]
  parts = [out.take(video == v) for v in range(num_videos)]
  if cfg.filter_ambiguous and amb is not None:
    parts = [p if a is None else remove_ambiguous(p, a) for p, a in zip(parts, amb)]
  return parts


def video_proposals(video_scores_C, cas_TxC, actionness_T, *, seconds_per_snippet: float,
                    duration: float | None, config, ambiguous=None,
                    oic_scores_C=None) -> Proposals:
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
    oic_scores_C: [C] scores of the OIC gamma term (default: video_scores_C).

  Returns:
    Proposals (label int64, score, start, end seconds). `proposals_for_videos` gives the same
    for many videos, faster.
  """
  return proposals_for_videos([video_scores_C], [cas_TxC], [actionness_T],
                              seconds_per_snippet=[seconds_per_snippet], durations=[duration],
                              config=config,
                              ambiguous=None if ambiguous is None else [ambiguous],
                              oic_scores=None if oic_scores_C is None else [oic_scores_C])[0]
