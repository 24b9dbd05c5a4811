"""SEAL (seal.txt, AAAI 2025) on P-MIL: similar modality enhancement (SME) and action
consistency learning (process and semantic consistency).

Network: P-MIL's fused form (`PMILModel(branches='fused')`, SEAL's paper and code: one
backbone on the SCFE features of the whole [RGB; flow] feature) with three heads: class
logits s_base [M, C + 1] (last: background), attention A_attn and the process-consistency
score s_pc (the head P-MIL uses for completeness). Per video, a = sigmoid(A_attn),
q = sigmoid(s_pc). The loss (Eq. 14):

  L = L_cls + lambda1(t) L_SME + lambda2 L_pc + lambda3(t) L_sc

  L_cls   P-MIL's MIL terms on the fused head (pmil.py): w_orig L_orig + w_supp L_supp with
          the released code's weights 1 and 0.5 ("a commonly used classification loss (Ren et
          al. 2023)"). P-MIL's rank-consistency and completeness terms are not part of SEAL
          (neither paper nor release has them), so Table 3's base row is this L_cls alone.
  L_SME   Eq. 1-9, below (`hard_descriptors`, `sme_pseudo_labels`, `sme_prediction`,
          `sme_loss`).
  L_pc    Eq. 10 (`process_consistency`): s_pc regressed onto exp(-(the printed summand)); the
          printed terms' means are logged as pc_centre, pc_ratio, pc_penalty.
  L_sc    Eq. 11-13 (`semantic_consistency`): alpha(t) L_st + L_c, logged as l_st (already
          times alpha) and l_c.

Schedules (epochs from 1, constant within an epoch, P-MIL's counter): lambda1 linear
1 -> 0 over `lambda1_epochs` (30); lambda2 = 1.5; lambda3 from 1 to 0 over `lambda3_epochs`
(50), 'cosine' 0.5 (1 + cos(pi (e - 1) / 50)) (our choice of "non-linear"; the release
uses exp(-e / 8) cut at epoch 70, offered as lambda3_decay='exp', with the release's alpha
over 70 epochs); alpha linear 0.3 -> 0.5 over the same 50 epochs (the paper gives no
horizon; after them lambda3 = 0 and alpha no longer matters); SME's moderate-confidence
lambda(t) linear 1 -> 0 over the whole run (the paper's "from 1 to 0"; the release's
0.5 (1 - e / 200) starts at 0.5).

Readings (the paper is silent or its literal reading does not train; each choice measured on
the built-in benchmark, README "SEAL"):

SME. The descriptors come from the training split's features and labels (the release ships
them as downloaded .npy files); here `hard_descriptors` computes them, at either aggregation
of Table 4 (segment-level Eq. 1: mean over every snippet of every training video of class c;
video-level Eq. 2, the paper's choice: mean over those videos of each video's temporal
mean). A video with several labels counts for each of its classes; held-out videos (model
selection on training videos) are left out. A video's pseudo-label is never compared with its
label (as in the paper and code). Eq. 9's prediction p = (1 / M) sum_i s_base,i A_attn,i
read literally has total mass mean(a) < 1, so an MSE onto a one-hot target is lowest with
every attention at 1 and works against L_supp; default `sme_pred='attention'` normalises by
the attention (p = sum_i s_i a_i / sum_i a_i, "averaging ... weighted by their attention
scores", P-MIL's video score); 'printed' is the 1 / M form, 'release' the code's unweighted
mean. s_base,i is the softmax over the C foreground logits (the release; the pseudo-label
is a distribution over the C classes). phi ("the mean squared error", Eq. 8 and 12) is the
squared error of a sample's class vector summed over the classes, the mean being Eq. 8's own
1 / m_H sum over videos (and, in L_c, the mean over proposals); the release also averages
over the C classes, which made L_SME 0.6 % and L_c 0.4 % of the attention head's gradient at
init on the built-in benchmark (benchmarks/grad_reach.py): 'mean' is `mse_reduce='mean'`.

Process consistency (Eq. 10). Pseudo-true instances: the video's proposals with
a > 0.9 max a (paper; the release uses 0.8), no gradient; each valid proposal i is matched
to the pseudo-true instance of highest tIoU (the first on ties) or, overlapping none, to the
one of nearest centre, so all N candidate proposals of Eq. 10 take part (`pc_match='all'`;
the release's 'overlapping' keeps only proposals with tIoU > 0, leaving the branch
untrained on the background proposals it scores at inference). Per matched proposal: centre term (C_P - C_G)^2, ratio term
d / (I + eps) with d = |C_P - C_G| and I the intersection, penalty delta = 1 when
I < 0.5 L_G. None of these contains a model output, so the printed sum has no gradient on
s_pc. Our reading: the summand g_i is the proposal's process inconsistency, and the branch
that "predicts corresponding scores" fused at inference learns to predict it:
L_pc = (1 / N) sum_i (q_i - exp(-g_i))^2 over the N proposals taking part (target 1 for a
pseudo-true instance itself, ~0 for an off-centre, poorly overlapping proposal). Each of the
three terms moves the target, so each reaches s_pc (tests check the gradient by hand). A
first reading, N counted softly by the branch (sum_i q_i g_i / sum_i q_i, equal to the
printed mean at equal q), was measured and dropped: minimised by q ~ 0 everywhere except on
the pseudo-true instances, it kept one instance a video (built-in seed 0: 15.0 average mAP
with q fused, 32.3 from the same checkpoint without q). Units (`pc_units`): 'instance'
(default) measures distances and the intersection in units of the pseudo-true instance's
length L_G, so the three terms are dimensionless and comparable; 'snippets' is the printed
form, where the squared centre distance (hundreds of snippets^2 on THUMOS14) swamps the
other two terms. eps = 0.1 in those units ("a small constant"; 1e-6 makes a touching
proposal's ratio 10^6). The release instead regresses (e1 - s2) / 2 q + (s1 + s2) / 2 onto
C_G over a V x V broadcast (a shape bug), has a centre term with no model output, and its
penalty adds (1 - q), which pushes q UP for the proposals it means to penalise; none of that
is reproduced.

Semantic consistency (Eq. 11-13). s_base = cas, s_supp = cas * a (P-MIL's suppressed
scores). "Classified into category c" by a score cannot be the per-proposal argmax: a > 0
only rescales a proposal's logits, so both scores would always agree (the release's sets
"both" and "either" are the same). Our reading is MIL's: a score classifies a proposal into
the video's class c when it is among the k top proposals of that class under the score (the
proposals L_orig / L_supp pool, k = max(1, M_valid // 8)). S_c = in both top-k sets, the soft-local
descriptor is the mean of their backbone features (f_prop: SCFE's output has no parameters,
so the learned backbone feature after dropout, the release's), and L_st averages
||f_i - descriptor|| (un-squared, gradient through both) over the proposals in either set,
per labelled class with a non-empty S_c, per video, on unit-length features f / ||f||: on the
raw features the distance is lowest with every feature shrunk towards 0, and it did so on the
built-in benchmark (L_st fell 1.7 -> 0.5 in 400 steps, L_orig stopped falling, test
average mAP 0.5 at step 250, the base 30.9). L_c = MSE between the foreground
softmaxes of s_base and s_supp (phi as in SME), averaged over the valid proposals (the
release includes padded rows).

Inference: score[i, c] = softmax(s_base)_c a_i q_i (the three heads fused), no video bonus
(the release), video score P-MIL's; q is left out (1) when L_pc is off, since the head is then
untrained. Post-processing preset 'seal': class threshold 0.25, soft-NMS sigma 0.1.
"""
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError
from wstal_jax.layers import l2_normalize, topk_count, topk_select, video_mean
from wstal_jax.methods import co2net, pmil
from wstal_jax.models.pmil import proposal_iou

AGGREGATIONS = ("video", "segment")
SME_PREDICTIONS = ("attention", "printed", "release")
PC_UNITS = ("instance", "snippets")
PC_MATCHES = ("all", "overlapping")
MSE_REDUCTIONS = ("sum", "mean")
LAMBDA3_DECAYS = ("cosine", "exp")


def default_config() -> ml_collections.ConfigDict:
  """The `config.seal` block (THUMOS14; the paper's values where it gives them)."""
  c = ml_collections.ConfigDict()
  c.hidden = 2048             # fused backbone width (the release: 6144 -> 2048)
  c.head_hidden = 1024
  c.dropout = 0.5
  c.topk_divisor = 8          # MIL and the SC top-k sets: k = max(1, M_valid // 8)
  c.w_orig = 1.0              # L_cls = w_orig L_orig + w_supp L_supp (the release)
  c.w_supp = 0.5
  c.steps_per_epoch = 0       # 0: training videos // batch size
  c.sme = True                # Table 3 / 5 switches
  c.pc = True
  c.sc = True
  c.aggregation = "video"     # hard-global descriptors: 'video' (Eq. 2) | 'segment' (Eq. 1)
  c.sme_pred = "attention"    # Eq. 9 reading (module docstring)
  c.mse_reduce = "sum"        # phi of Eq. 8 / 12 over the classes: 'sum' | 'mean' (release)
  c.lambda1_epochs = 30.0     # lambda1: 1 -> 0 linearly over these epochs
  c.moderate = True           # Table 5: the moderate-confidence pseudo-labels
  c.lambda2 = 1.5             # L_pc (the release: 3.4 after retuning)
  c.pc_ratio = 0.9            # pseudo-true instances: a > 0.9 max a (the release: 0.8)
  c.pc_units = "instance"     # 'instance' | 'snippets' (module docstring)
  c.pc_eps = 0.1              # eps of d / (I + eps), in pc_units
  c.pc_overlap = 0.5          # delta fires when I < 0.5 L_G
  c.pc_match = "all"          # Eq. 10 over 'all' proposals | 'overlapping' ones (the release)
  c.lambda3_epochs = 50.0     # lambda3: 1 -> 0 over these epochs
  c.lambda3_decay = "cosine"  # 'cosine' | 'exp' (the release: exp(-e / 8), 0 after epoch 70)
  c.alpha_start = 0.3         # alpha(t): 0.3 -> 0.5 over lambda3_epochs
  c.alpha_end = 0.5
  c.video_bonus = 0.0         # inference: + this x the video score (P-MIL: 0.2; SEAL: none)
  return c


def validate_config(cfg) -> None:
  def bad(field, why):
    raise WstalError(f"config.seal.{field}={cfg.get(field)!r}: {why}")
  for field, options in (("aggregation", AGGREGATIONS), ("sme_pred", SME_PREDICTIONS),
                         ("pc_units", PC_UNITS), ("lambda3_decay", LAMBDA3_DECAYS),
                         ("pc_match", PC_MATCHES), ("mse_reduce", MSE_REDUCTIONS)):
    if cfg[field] not in options:
      bad(field, f"choose one of {options}")
  for field in ("hidden", "head_hidden", "topk_divisor"):
    if int(cfg[field]) < 1:
      bad(field, "must be >= 1")
  for field in ("w_orig", "w_supp", "lambda2", "video_bonus", "steps_per_epoch", "alpha_start",
                "alpha_end"):
    if cfg[field] < 0:
      bad(field, "must be >= 0")
  for field in ("lambda1_epochs", "lambda3_epochs", "pc_eps"):
    if cfg[field] <= 0:
      bad(field, "must be > 0")
  if not 0.0 <= cfg.dropout < 1.0:
    bad("dropout", "must be in [0, 1)")
  for field in ("pc_ratio", "pc_overlap"):
    if not 0.0 < cfg[field] <= 1.0:
      bad(field, "must be in (0, 1]")


# ------------------------------------------------------------------------------------------
# Similar modality enhancement (Eq. 1-9).


def hard_descriptors(data_dir: str, *, rgb_dim: int, aggregation: str = "video",
                     split: str = "train", feature: str | None = None, video_indices=None):
  """(D_ap [C, rgb_dim], D_mo [C, D - rgb_dim]) float32 from `split` of the dataset (module
  docstring); `video_indices` (positions in the split) restricts the videos (None: all).
  WstalError naming the dataset when a class has no video."""
  if aggregation not in AGGREGATIONS:
    raise WstalError(f"SEAL descriptors: aggregation {aggregation!r} not in {AGGREGATIONS}")
  manifest = fmt.read_manifest(data_dir)
  feature = feature or manifest["primary_feature"]
  num_c = len(manifest["classes"])
  keep = None if video_indices is None else {int(i) for i in video_indices}
  total, count = None, np.zeros(num_c, np.float64)
  for index, rec in enumerate(fmt.read_videos(data_dir, split, features=[feature])):
    if keep is not None and index not in keep:
      continue
    x = np.asarray(rec.features[feature], np.float64)
    if total is None:
      total = np.zeros((num_c, x.shape[1]), np.float64)
    part, weight = ((x.mean(0), 1.0) if aggregation == "video" else (x.sum(0), len(x)))
    for c in np.flatnonzero(rec.label):
      total[c] += part
      count[c] += weight
  if total is None or np.any(count == 0):
    missing = [manifest["classes"][c] for c in np.flatnonzero(count == 0)] or ["(all)"]
    raise WstalError(f"{data_dir}: SEAL's descriptors need training videos of every class; "
                     f"none of {missing[0]!r}" + (f" (and {len(missing) - 1} more)"
                                                  if len(missing) > 1 else ""))
  desc = (total / count[:, None]).astype(np.float32)
  return desc[:, :rgb_dim], desc[:, rgb_dim:]


def sme_pseudo_labels(feat_BxTxD, mask_BxT, d_ap_CxR, d_mo_CxF):
  """Eq. 5-7: (pseudo-labels one-hot [B, C], case [B] int32 in {1, 2, 3}).

  s_ap = softmax_c cos(temporal mean of the video's RGB half, D_ap) and s_mo likewise for
  flow ('norm' of Eq. 5-6: softmax over the classes, as the released code); the pseudo-label
  is the argmax of (s_ap + s_mo) / 2. Case 1 (high confidence): argmax s_ap == argmax s_mo;
  case 2 (moderate): otherwise, and the average's argmax equals one of them; case 3: neither.
  """
  r = d_ap_CxR.shape[1]
  m = mask_BxT[..., None]
  mean = jnp.sum(feat_BxTxD * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
  cos = lambda x, d: l2_normalize(x) @ l2_normalize(d).T
  s_ap = jax.nn.softmax(cos(mean[:, :r], d_ap_CxR), axis=-1)
  s_mo = jax.nn.softmax(cos(mean[:, r:], d_mo_CxF), axis=-1)
  return agreement(s_ap, s_mo)


def agreement(s_ap_BxC, s_mo_BxC):
  """The three cases of Sec. "High/Moderate-Confidence Pseudo-labels" from the two
  modalities' class scores: (one-hot argmax of their average [B, C], case [B])."""
  a, b = jnp.argmax(s_ap_BxC, -1), jnp.argmax(s_mo_BxC, -1)
  avg = jnp.argmax(0.5 * (s_ap_BxC + s_mo_BxC), -1)
  case = jnp.where(a == b, 1, jnp.where((avg == a) | (avg == b), 2, 3)).astype(jnp.int32)
  return jax.nn.one_hot(avg, s_ap_BxC.shape[-1]), case


def sme_prediction(cas_BxMxC1, attn_BxM, mask_BxM, form: str = "attention"):
  """Eq. 9's video-level class scores [B, C] from the foreground softmax of the proposals'
  class logits (module docstring: 'attention' = sum s a / sum a, 'printed' = sum s a / M,
  'release' = the unweighted mean)."""
  valid = (mask_BxM > 0).astype(jnp.float32)
  s = jax.nn.softmax(cas_BxMxC1[..., :-1], axis=-1)
  w = valid if form == "release" else valid * attn_BxM
  total = jnp.einsum("bm,bmc->bc", w, s)
  norm = jnp.sum(valid if form == "printed" else w, axis=1, keepdims=True)
  return total / jnp.maximum(norm, 1e-6)


def squared_error(a_NxC, b_NxC, reduce: str = "sum"):
  """phi of Eq. 8 and 12 per sample: the squared error of the class vectors, summed over the
  classes ('sum', ours: Eq. 8's own 1 / m sum is the mean) or averaged ('mean', the release:
  C times smaller)."""
  err = (a_NxC - b_NxC) ** 2
  return jnp.sum(err, axis=-1) if reduce == "sum" else jnp.mean(err, axis=-1)


def sme_loss(pred_BxC, pseudo_BxC, case_B, valid_B, moderate_weight, reduce: str = "sum"):
  """Eq. 8 with phi = `squared_error`: the mean over the batch's case-1 videos plus
  moderate_weight times the mean over its case-2 videos; a group with no video adds 0 (the
  released code gives NaN for a batch without a case-1 video)."""
  err_B = squared_error(pred_BxC, pseudo_BxC, reduce)
  def group(k):
    sel = (case_B == k) & (valid_B > 0)
    return jnp.sum(jnp.where(sel, err_B, 0.0)) / jnp.maximum(jnp.sum(sel), 1)
  return group(1) + moderate_weight * group(2)


# ------------------------------------------------------------------------------------------
# Action consistency learning (Eq. 10-13).


def process_consistency(pc_logit_BxM, attn_BxM, proposals_BxMx2, mask_BxM, *,
                        ratio: float = 0.9, units: str = "instance", eps: float = 0.1,
                        overlap: float = 0.5, match: str = "all"):
  """Eq. 10 per video (module docstring): -> (l_B, parts, matched_BxM). l_B is the mean over
  the matched proposals of (q_i - exp(-g_i))^2 (0 for a video with none), g_i the printed
  summand; parts {'centre', 'ratio', 'penalty'}: l_B-shaped means of g's three terms over the
  matched proposals (their sum is the printed L_pc)."""
  valid = mask_BxM > 0
  a = jax.lax.stop_gradient(attn_BxM)
  top = jnp.max(jnp.where(valid, a, -jnp.inf), axis=1, keepdims=True)
  pseudo = valid & (a > ratio * top)                                       # [B, M]
  iou = jnp.where(pseudo[:, None, :], proposal_iou(proposals_BxMx2, proposals_BxMx2), -1.0)
  s, e = proposals_BxMx2[..., 0], proposals_BxMx2[..., 1]
  overlaps = jnp.max(iou, axis=2) > 0
  if match == "all":     # no overlap: the pseudo-true instance of nearest centre
    centre = 0.5 * (s + e)
    far = jnp.where(pseudo[:, None, :], jnp.abs(centre[:, :, None] - centre[:, None, :]),
                    jnp.inf)
    j = jnp.where(overlaps, jnp.argmax(iou, axis=2), jnp.argmin(far, axis=2))
    matched = valid & jnp.any(pseudo, axis=1, keepdims=True)
  else:
    j = jnp.argmax(iou, axis=2)                                            # [B, M]
    matched = valid & overlaps
  gt = jnp.take_along_axis(proposals_BxMx2, j[..., None], axis=1)          # [B, M, 2]
  gs, ge = gt[..., 0], gt[..., 1]
  inter = jnp.maximum(jnp.minimum(e, ge) - jnp.maximum(s, gs), 0.0)
  length_g = ge - gs
  diff = 0.5 * (s + e) - 0.5 * (gs + ge)
  unit = jnp.maximum(length_g, 1e-6) if units == "instance" else jnp.ones_like(length_g)
  terms = {"centre": (diff / unit) ** 2,
           "ratio": (jnp.abs(diff) / unit) / (inter / unit + eps),
           "penalty": (inter < overlap * length_g).astype(jnp.float32)}
  n = jnp.maximum(jnp.sum(matched, axis=1), 1)
  mean = lambda x: jnp.sum(jnp.where(matched, x, 0.0), axis=1) / n
  target = jax.lax.stop_gradient(jnp.exp(-sum(terms.values())))
  err = (jax.nn.sigmoid(pc_logit_BxM) - target) ** 2
  return mean(err), {k: mean(v) for k, v in terms.items()}, matched


def semantic_consistency(cas_BxMxC1, attn_BxM, feat_BxMxH, label_BxC, mask_BxM, k_B,
                         reduce: str = "sum", max_classes: int = 4):
  """Eq. 11-12 per video (module docstring): -> (l_st_B, l_c_B, has_st_B). l_st is the mean
  over the video's labelled classes with a non-empty S_c of the mean distance over the
  proposals in either top-k set, between unit-length features (f / ||f||); has_st_B says
  whether the video has such a class."""
  valid = mask_BxM > 0
  feat_BxMxH = l2_normalize(feat_BxMxH)
  base = cas_BxMxC1[..., :-1]
  supp = base * attn_BxM[..., None]
  in_base = topk_select(base, mask_BxM, k_B)                               # [B, M, C]
  in_supp = topk_select(supp, mask_BxM, k_B)
  labelled = (label_BxC > 0)[:, None, :]
  both = (in_base & in_supp & labelled).astype(jnp.float32)
  either = ((in_base | in_supp) & labelled).astype(jnp.float32)
  # Only labelled classes enter: each video's first `max_classes` labelled classes (by index;
  # the datasets have at most 3) are gathered and their distances computed one class at a
  # time (lax.map), as differences (the expanded ||f||^2 - 2 f.d + ||d||^2 loses the small
  # distances of near-duplicate proposals to float32 round-off).
  num_l = min(int(max_classes), label_BxC.shape[1])
  order = jnp.argsort(jnp.where(label_BxC > 0, 0, 1), axis=1, stable=True)[:, :num_l]
  pick = lambda x_BxMxC: jnp.moveaxis(jnp.take_along_axis(x_BxMxC, order[:, None, :], 2),
                                      -1, 0)                               # [L, B, M]

  def per_class(sets):
    both_BxM, either_BxM = sets
    n_both = jnp.sum(both_BxM, axis=1)                                     # [B]
    desc = (jnp.einsum("bm,bmh->bh", both_BxM, feat_BxMxH)
            / jnp.maximum(n_both, 1.0)[:, None])
    dist = jnp.sqrt(jnp.maximum(jnp.sum((feat_BxMxH - desc[:, None, :]) ** 2, axis=-1),
                                1e-12))
    mean = jnp.sum(either_BxM * dist, axis=1) / jnp.maximum(jnp.sum(either_BxM, axis=1), 1.0)
    return mean, n_both > 0

  mean_LxB, active_LxB = jax.lax.map(per_class, (pick(both), pick(either)))
  num = jnp.sum(active_LxB, axis=0)
  l_st = jnp.sum(jnp.where(active_LxB, mean_LxB, 0.0), axis=0) / jnp.maximum(num, 1)
  p_base = jax.nn.softmax(base, axis=-1)
  p_supp = jax.nn.softmax(supp, axis=-1)
  err = squared_error(p_base, p_supp, reduce)
  l_c = jnp.sum(jnp.where(valid, err, 0.0), axis=1) / jnp.maximum(jnp.sum(valid, axis=1), 1)
  return l_st, l_c, num > 0


# ------------------------------------------------------------------------------------------
# Schedules (epochs from 1).


def lambda1(epoch, horizon: float):
  """Linear 1 -> 0 over `horizon` epochs (1 at epoch 1, 0 from epoch horizon + 1)."""
  e = jnp.asarray(epoch, jnp.float32)
  return jnp.clip(1.0 - (e - 1.0) / horizon, 0.0, 1.0)


def lambda3(epoch, horizon: float, decay: str = "cosine"):
  """1 -> 0 over `horizon` epochs: 'cosine' 0.5 (1 + cos(pi (e - 1) / horizon)), 0 after;
  'exp' the release's exp(-e / 8) up to epoch 70, then 0."""
  e = jnp.asarray(epoch, jnp.float32)
  if decay == "exp":
    return jnp.where(e <= 70.0, jnp.exp(-e / 8.0), 0.0)
  x = jnp.clip((e - 1.0) / horizon, 0.0, 1.0)
  return 0.5 * (1.0 + jnp.cos(math.pi * x))


def alpha(epoch, horizon: float, start: float = 0.3, end: float = 0.5):
  """Linear start -> end over `horizon` epochs, then end."""
  e = jnp.asarray(epoch, jnp.float32)
  return start + (end - start) * jnp.clip((e - 1.0) / horizon, 0.0, 1.0)


# ------------------------------------------------------------------------------------------
# The method object.


class SEAL(pmil.PMIL):
  """SEAL (method 'seal', configured by config.seal), a `methods.Method` built on P-MIL's
  fused network. Its constants (the hard-global descriptors) come from the dataset:
  `dataset_consts(data_dir, video_indices)`, which run_setup calls."""
  postprocess_preset = "seal"
  phase_starts = (0,)
  block = "seal"

  defaults = staticmethod(default_config)
  validate = staticmethod(validate_config)

  def dataset_consts(self, data_dir: str, video_indices=None) -> dict:
    """The hard-global descriptors from the training split (`video_indices`: the videos
    that train, None = all) when SME is on, else {}."""
    if not self.cfg.sme:
      return {}
    d_ap, d_mo = hard_descriptors(data_dir, rgb_dim=self.rgb_dim,
                                  aggregation=self.cfg.aggregation, video_indices=video_indices)
    return {"sme_ap_CxR": jnp.asarray(d_ap), "sme_mo_CxF": jnp.asarray(d_mo)}

  def stand_in_consts(self, seed: int = 0) -> dict:
    """Random constants of `dataset_consts`'s shapes (benchmarks and contract tests)."""
    return (random_descriptors(self.num_classes, 2 * self.rgb_dim, seed) if self.cfg.sme
            else {})

  def loss_weights(self):
    c = self.cfg
    w = {"l_orig": float(c.w_orig), "l_supp": float(c.w_supp)}
    if c.sme:
      w["l_sme"] = 1.0
    if c.pc:
      w["l_pc"] = float(c.lambda2)
    if c.sc:
      w.update({"l_st": 1.0, "l_c": 1.0})
    return w

  def terms_from_out(self, outs, batch, step, consts=None):
    """Unweighted terms (l_sme, l_st, l_c already times their schedules), per batch."""
    c = self.cfg
    o = outs["fused"]
    props, mask = batch["proposals_BxMx2"], batch["proposal_mask_BxM"]
    label = batch["label_BxC"]
    valid_B = batch["valid_B"] * (jnp.sum(mask, axis=1) > 0)
    k_B = topk_count(mask, int(c.topk_divisor))
    cas, attn = o["cas_BxMxC1"], jax.nn.sigmoid(o["attn_logit_BxM"])
    epoch = self.epoch(step)
    terms = {"l_orig": video_mean(co2net.mil_loss(cas, label, mask, k_B, 1.0), valid_B),
             "l_supp": video_mean(co2net.mil_loss(cas * attn[..., None], label, mask, k_B,
                                                  0.0), valid_B)}
    if c.sme:
      pseudo, case = sme_pseudo_labels(batch["feat_BxTxD"], batch["mask_BxT"],
                                       consts["sme_ap_CxR"], consts["sme_mo_CxF"])
      moderate = (1.0 - (epoch - 1.0) / self.total_epochs) if c.moderate else 0.0
      pred = sme_prediction(cas, attn, mask, c.sme_pred)
      terms["l_sme"] = lambda1(epoch, float(c.lambda1_epochs)) * sme_loss(
          pred, pseudo, case, valid_B, jnp.maximum(moderate, 0.0), c.mse_reduce)
      # Diagnostics (not summed): how often the pseudo-label is one of the video's labels.
      conf = (case <= 2) & (valid_B > 0)
      hit = jnp.sum(pseudo * label, axis=1) > 0
      terms["sme_confident_frac"] = jnp.sum(conf) / jnp.maximum(jnp.sum(valid_B > 0), 1)
      terms["sme_label_agree"] = jnp.sum(conf & hit) / jnp.maximum(jnp.sum(conf), 1)
    if c.pc:
      l_pc, parts, _ = process_consistency(o["iou_logit_BxM"], attn, props, mask,
                                           ratio=float(c.pc_ratio), units=c.pc_units,
                                           eps=float(c.pc_eps), overlap=float(c.pc_overlap),
                                           match=c.pc_match)
      terms["l_pc"] = video_mean(l_pc, valid_B)
      for k, v in parts.items():    # diagnostics (not summed): the printed Eq. 10's terms
        terms[f"pc_{k}"] = video_mean(v, valid_B)
    if c.sc:
      l_st, l_c, has = semantic_consistency(cas, attn, o["emb_BxMxH"], label, mask, k_B,
                                            c.mse_reduce)
      lam3 = lambda3(epoch, float(c.lambda3_epochs), c.lambda3_decay)
      a_t = alpha(epoch, 70.0 if c.lambda3_decay == "exp" else float(c.lambda3_epochs),
                  float(c.alpha_start), float(c.alpha_end))
      terms["l_st"] = lam3 * a_t * video_mean(l_st, valid_B * has)
      terms["l_c"] = lam3 * video_mean(l_c, valid_B)
    return terms

  @property
  def use_q(self):
    """s_pc joins the inference score only when L_pc trains it."""
    return bool(self.cfg.pc)


def random_descriptors(num_classes: int, feat_dim: int, seed: int = 0) -> dict:
  """Stand-in descriptor constants of the right shapes (benchmarks, contract tests)."""
  rng = np.random.default_rng(seed)
  d = rng.normal(size=(num_classes, feat_dim)).astype(np.float32)
  half = feat_dim // 2
  return {"sme_ap_CxR": jnp.asarray(d[:, :half]), "sme_mo_CxF": jnp.asarray(d[:, half:])}
