"""P-MIL (Ren et al., CVPR 2023), SEAL's base: proposal-based multiple instance learning.

STATUS: the pure loss and scoring terms below are implemented and tested
(tests/test_pmil.py); the method class, its config (configs/pmil.py), the evaluator's
proposal path and the registry row are not yet written (issue 14).

P-MIL scores candidate proposals another model produced (`data/proposals.py`). Its network
(models/pmil.py) pools each proposal's surrounding-contrastive features (SCFE) and has three
heads per modality (RGB, flow): class logits over C + 1 (last: background), an attention
logit and a completeness logit. Per modality m (cas [M, C + 1], a = sigmoid(attention),
q = sigmoid(completeness)), from the paper and its released code (PEERS.md):

  L_orig    MIL on the raw class logits, top-k mean over the valid proposals with
            k = max(1, M_valid // 8), target [y, 1] normalised (co2net.mil_loss; the release
            divides by sum + 1e-4 instead of sum, a 1e-4 relative difference not reproduced).
  L_supp    the same on cas * a with target [y, 0].
  L_IRC     instance-level rank consistency (`rank_consistency`): for each labelled class c,
            over the proposals j overlapping proposal i (tIoU > 0, itself included), the
            distribution softmax_j(cas[j, c]) of the student modality is pulled (KL) towards
            the teacher's (the other modality, stop-gradient), averaged over the anchors i
            whose teacher attention is above the video's mean, then over the classes.
  L_comp    completeness (`completeness_loss`): q regressed (MSE) onto the largest tIoU of
            the proposal with a pseudo-instance; pseudo-instances from the other modality's
            attention (`pseudo_instances`: candidates with a > 0.8 max a, greedily the
            highest first, each dropping the candidates that overlap it at all).
  total     2 L_orig + L_supp + r(epoch) (2 L_IRC + 20 L_comp), each averaged over the two
            modalities, r = exp(-5 (1 - min(epoch, 30) / 30)^2) (`ramp_up`).
  inference per modality softmax(cas) over C + 1, a, q averaged over the modalities;
            score[i, c] = p[i, c] a_i q_i (+ 0.2 times the video score, added per class);
            video score v_c = sum_i p[i, c] a_i / sum_i a_i (`proposal_scores`).
"""
import jax
import jax.numpy as jnp

from wstal_jax.models.pmil import proposal_iou

IRC_MASK = -1000.0   # additive logit mask of non-overlapping proposals (the release's value)


def ramp_up(epoch, length: float = 30.0):
  """exp(-5 (1 - min(epoch, length) / length)^2): 0.0094 at epoch 1, 1 from `length` on."""
  x = jnp.minimum(jnp.asarray(epoch, jnp.float32), length) / length
  return jnp.exp(-5.0 * (1.0 - x) ** 2)


def rank_consistency(cas_s_BxMxC1, cas_t_BxMxC1, attn_t_BxM, proposals_BxMx2, label_BxC,
                     mask_BxM):
  """L_IRC per video (module docstring): -> l_B. The teacher side carries no gradient. One
  class at a time (lax.map): the [B, M, M] distributions of all C classes at once would not
  fit at M = 1,000."""
  valid = mask_BxM > 0
  overlap = (proposal_iou(proposals_BxMx2, proposals_BxMx2) > 0) & valid[:, None, :]
  logit_mask = jnp.where(overlap, 0.0, IRC_MASK)                          # [B, M, M]
  attn_t = jax.lax.stop_gradient(attn_t_BxM)
  num = jnp.maximum(jnp.sum(valid, axis=1, keepdims=True), 1)
  mean_attn = jnp.sum(jnp.where(valid, attn_t, 0.0), axis=1, keepdims=True) / num
  anchor = valid & (attn_t > mean_attn)

  def per_class(cols):
    s_BxM, t_BxM = cols
    log_p = jax.nn.log_softmax(logit_mask + jax.lax.stop_gradient(t_BxM)[:, None, :], axis=2)
    log_q = jax.nn.log_softmax(logit_mask + s_BxM[:, None, :], axis=2)
    p = jnp.exp(log_p)
    kl_BxM = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=2)
    return (jnp.sum(jnp.where(anchor, kl_BxM, 0.0), axis=1)
            / jnp.maximum(jnp.sum(anchor, axis=1), 1))

  cols = (jnp.moveaxis(cas_s_BxMxC1[..., :-1], -1, 0),
          jnp.moveaxis(cas_t_BxMxC1[..., :-1], -1, 0))
  per_class_CxB = jax.lax.map(per_class, cols)
  labelled = label_BxC > 0
  return (jnp.sum(jnp.where(labelled, per_class_CxB.T, 0.0), axis=1)
          / jnp.maximum(jnp.sum(labelled, axis=1), 1))


def pseudo_instances(attn_BxM, proposals_BxMx2, mask_BxM, ratio: float = 0.8):
  """Boolean [B, M]: the greedy pseudo-instances (module docstring). Candidates: valid
  proposals with attention > ratio * the video's maximum; repeatedly the candidate of highest
  attention is taken (ties: the earlier one) and every candidate overlapping it is dropped,
  so the pseudo-instances are disjoint."""
  valid = mask_BxM > 0
  attn = jax.lax.stop_gradient(attn_BxM)
  top = jnp.max(jnp.where(valid, attn, -jnp.inf), axis=1, keepdims=True)
  cand = valid & (attn > ratio * top)
  overlap = proposal_iou(proposals_BxMx2, proposals_BxMx2) > 0
  m = attn.shape[1]

  def body(_, state):
    left, chosen = state
    score = jnp.where(left, attn, -jnp.inf)
    i = jnp.argmax(score, axis=1)
    any_left = jnp.any(left, axis=1)
    pick = jax.nn.one_hot(i, m, dtype=bool) & any_left[:, None]
    hit = jnp.take_along_axis(overlap, i[:, None, None], axis=1)[:, 0] | pick
    return left & ~(hit & any_left[:, None]), chosen | pick

  _, chosen = jax.lax.fori_loop(0, m, body, (cand, jnp.zeros_like(cand)))
  return chosen


def completeness_loss(iou_logit_BxM, proposals_BxMx2, instances_BxM, mask_BxM):
  """L_comp per video: mean over the valid proposals of (sigmoid(q) - t)^2, t the largest
  tIoU with a pseudo-instance (0 without any): -> l_B."""
  valid = mask_BxM > 0
  iou = proposal_iou(proposals_BxMx2, proposals_BxMx2)
  target = jax.lax.stop_gradient(
      jnp.max(jnp.where(instances_BxM[:, None, :], iou, 0.0), axis=2))
  err = (jax.nn.sigmoid(iou_logit_BxM) - target) ** 2
  return (jnp.sum(jnp.where(valid, err, 0.0), axis=1)
          / jnp.maximum(jnp.sum(valid, axis=1), 1))


def proposal_scores(outs, mask_BxM, video_bonus: float = 0.2, eps: float = 1e-6):
  """Inference scores from the branches' outputs ({name: ProposalBranch outputs}, averaged
  over the branches): (score_BxMxC = p a q + video_bonus * v, video_BxC = v); 0 on padded
  proposals."""
  valid = (mask_BxM > 0)[..., None]
  n = len(outs)
  p = sum(jax.nn.softmax(o["cas_BxMxC1"], axis=-1) for o in outs.values()) / n
  a = sum(jax.nn.sigmoid(o["attn_logit_BxM"]) for o in outs.values()) / n
  q = sum(jax.nn.sigmoid(o["iou_logit_BxM"]) for o in outs.values()) / n
  p, a, q = p[..., :-1], jnp.where(valid[..., 0], a, 0.0), jnp.where(valid[..., 0], q, 0.0)
  video = (jnp.sum(p * a[..., None], axis=1)
           / (jnp.sum(a, axis=1, keepdims=True) + eps))
  score = p * (a * q)[..., None] + video_bonus * video[:, None, :]
  return jnp.where(valid, score, 0.0), video
