"""SEAL (seal.txt, AAAI 2025) on P-MIL: similar modality enhancement (SME) and action
consistency learning.

STATUS (issue 14): the SME pieces below (hard-global descriptors, Eq. 1-4; the three
agreement cases and pseudo-labels, Eq. 5-7; the SME loss, Eq. 8) are implemented and tested
(tests/test_seal.py). The process- and semantic-consistency losses (Eq. 10-13), the method
class, configs/seal.py and its registry row are not yet written.

SME reads nothing the model learns: the descriptors come from the training split's features
and labels, and each video's pseudo-label from its own features, so both are fixed for a run.
The released code ships the descriptors as downloaded .npy files; here the project computes
them (`hard_descriptors`), at either aggregation of Table 4:

  segment-level (Eq. 1)  S^c = mean over every snippet of every training video of class c
  video-level (Eq. 2)    V^c = mean over the training videos of class c of each video's
                         temporal mean (the paper's choice, Table 4)

A video with several labels counts for each of its classes (the paper does not say; the
released code's files give no hint). Appearance descriptors use the RGB half of the I3D
features, motion descriptors the flow half.
"""
import jax
import jax.numpy as jnp
import numpy as np

from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError
from wstal_jax.layers import l2_normalize

AGGREGATIONS = ("video", "segment")


def hard_descriptors(data_dir: str, *, rgb_dim: int, aggregation: str = "video",
                     split: str = "train", feature: str | None = None):
  """(D_ap [C, rgb_dim], D_mo [C, D - rgb_dim]) float32 from `split` of the dataset (module
  docstring). WstalError naming the dataset when a class has no training video."""
  if aggregation not in AGGREGATIONS:
    raise WstalError(f"SEAL descriptors: aggregation {aggregation!r} not in {AGGREGATIONS}")
  manifest = fmt.read_manifest(data_dir)
  feature = feature or manifest["primary_feature"]
  num_c = len(manifest["classes"])
  total, count = None, np.zeros(num_c, np.float64)
  for rec in fmt.read_videos(data_dir, split, features=[feature]):
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


def sme_loss(pred_BxC, pseudo_BxC, case_B, valid_B, moderate_weight):
  """Eq. 8 with phi = MSE over the classes: the mean over the batch's case-1 videos plus
  moderate_weight times the mean over its case-2 videos; a group with no video adds 0 (the
  released code gives NaN for a batch without a case-1 video)."""
  err_B = jnp.mean((pred_BxC - pseudo_BxC) ** 2, axis=-1)
  def group(k):
    sel = (case_B == k) & (valid_B > 0)
    return jnp.sum(jnp.where(sel, err_B, 0.0)) / jnp.maximum(jnp.sum(sel), 1)
  return group(1) + moderate_weight * group(2)
