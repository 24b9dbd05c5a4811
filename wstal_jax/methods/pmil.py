"""P-MIL (Ren et al., CVPR 2023), SEAL's base: proposal-based multiple instance learning.

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

Choices (ours): epochs are P-MIL's counter (from 1, constant within an epoch), epoch =
step // steps_per_epoch + 1 with steps_per_epoch = training videos // batch size (the
release drops the last batch) unless `steps_per_epoch` is set; L_IRC reads each video's first
`irc_max_classes` (4) labelled classes only (the datasets have at most 3); a video none of
whose proposals falls inside its training window takes no part in the batch's means;
`branches='fused'` (SEAL's code: one branch on the whole feature) takes its completeness
pseudo-instances from its own attention and has no L_IRC.
"""
import jax
import jax.numpy as jnp
import ml_collections

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.layers import topk_count, video_mean
from wstal_jax.methods import co2net
from wstal_jax.models.pmil import PMILModel, proposal_iou

BRANCHES = ("separate", "fused")


def default_config() -> ml_collections.ConfigDict:
  """The `config.pmil` block (THUMOS14, the released code's settings)."""
  c = ml_collections.ConfigDict()
  c.branches = "separate"     # P-MIL: RGB and flow branches; 'fused': one (SEAL's code)
  c.hidden = 1024             # backbone width per branch (P-MIL: 3072 -> 1024)
  c.head_hidden = 512         # each head's hidden width
  c.dropout = 0.5
  c.topk_divisor = 8          # MIL: k = max(1, M_valid // 8)
  c.w_orig = 2.0              # L_orig
  c.w_supp = 1.0              # L_supp
  c.w_irc = 2.0               # L_IRC (x ramp-up); needs two branches
  c.irc_max_classes = 4       # labelled classes a video that L_IRC reads (datasets: <= 3)
  c.w_comp = 20.0             # L_comp (x ramp-up)
  c.ramp_epochs = 30.0        # r(epoch) reaches 1 here
  c.steps_per_epoch = 0       # 0: training videos // batch size (P-MIL drops the last batch)
  c.pseudo_ratio = 0.8        # pseudo-instances: attention > 0.8 x max (the release)
  c.video_bonus = 0.2         # inference: + 0.2 x video score
  return c


def validate_config(cfg) -> None:
  def bad(field, why):
    raise WstalError(f"config.pmil.{field}={cfg.get(field)!r}: {why}")
  if cfg.branches not in BRANCHES:
    bad("branches", f"choose one of {BRANCHES}")
  for field in ("hidden", "head_hidden", "topk_divisor", "irc_max_classes"):
    if int(cfg[field]) < 1:
      bad(field, "must be >= 1")
  for field in ("w_orig", "w_supp", "w_irc", "w_comp", "video_bonus", "steps_per_epoch"):
    if cfg[field] < 0:
      bad(field, "must be >= 0")
  if cfg.ramp_epochs <= 0:
    bad("ramp_epochs", "must be > 0")
  if not 0.0 <= cfg.dropout < 1.0:
    bad("dropout", "must be in [0, 1)")
  if not 0.0 < cfg.pseudo_ratio <= 1.0:
    bad("pseudo_ratio", "must be in (0, 1]")
  if cfg.branches == "fused" and cfg.w_irc > 0:
    bad("w_irc", "rank consistency needs two branches (branches='separate'); set it to 0")

IRC_MASK = -1000.0   # additive logit mask of non-overlapping proposals (the release's value)


def ramp_up(epoch, length: float = 30.0):
  """exp(-5 (1 - min(epoch, length) / length)^2): 0.0094 at epoch 1, 1 from `length` on."""
  x = jnp.minimum(jnp.asarray(epoch, jnp.float32), length) / length
  return jnp.exp(-5.0 * (1.0 - x) ** 2)


def rank_consistency(cas_s_BxMxC1, cas_t_BxMxC1, attn_t_BxM, proposals_BxMx2, label_BxC,
                     mask_BxM, max_classes: int = 4):
  """L_IRC per video (module docstring): -> l_B. The teacher side carries no gradient.

  Only labelled classes enter, so each video's first `max_classes` labelled classes (by
  class index) are gathered and processed one at a time (lax.map): all C classes' [B, M, M]
  distributions would not fit at M = 1,000, and computing the unlabelled ones is C / L times
  the work for nothing. THUMOS14, ActivityNet and the built-in benchmark have at most 3
  labelled classes a video; a video with more uses its first `max_classes`."""
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

  num_l = min(int(max_classes), label_BxC.shape[1])
  order = jnp.argsort(jnp.where(label_BxC > 0, 0, 1), axis=1, stable=True)[:, :num_l]  # [B, L]
  labelled = jnp.take_along_axis(label_BxC > 0, order, axis=1)
  pick = lambda cas: jnp.moveaxis(jnp.take_along_axis(cas[..., :-1], order[:, None, :], 2),
                                  -1, 0)                                   # [L, B, M]
  per_class_LxB = jax.lax.map(per_class, (pick(cas_s_BxMxC1), pick(cas_t_BxMxC1)))
  return (jnp.sum(jnp.where(labelled, per_class_LxB.T, 0.0), axis=1)
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

  def body(state):
    left, chosen = state
    score = jnp.where(left, attn, -jnp.inf)
    i = jnp.argmax(score, axis=1)
    any_left = jnp.any(left, axis=1)
    pick = jax.nn.one_hot(i, m, dtype=bool) & any_left[:, None]
    hit = jnp.take_along_axis(overlap, i[:, None, None], axis=1)[:, 0] | pick
    return left & ~(hit & any_left[:, None]), chosen | pick

  # As many rounds as the most pseudo-instances of a video (a few), not M.
  _, chosen = jax.lax.while_loop(lambda state: jnp.any(state[0]), body,
                                 (cand, jnp.zeros_like(cand)))
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


def proposal_scores(outs, mask_BxM, video_bonus: float = 0.2, eps: float = 1e-6,
                    use_q: bool = True):
  """Inference scores from the branches' outputs ({name: ProposalBranch outputs}, averaged
  over the branches): (score_BxMxC = p a q + video_bonus * v, video_BxC = v); 0 on padded
  proposals. use_q=False: q = 1 (a third head no loss trained)."""
  valid = (mask_BxM > 0)[..., None]
  n = len(outs)
  p = sum(jax.nn.softmax(o["cas_BxMxC1"], axis=-1) for o in outs.values()) / n
  a = sum(jax.nn.sigmoid(o["attn_logit_BxM"]) for o in outs.values()) / n
  q = (sum(jax.nn.sigmoid(o["iou_logit_BxM"]) for o in outs.values()) / n if use_q
       else jnp.ones_like(a))
  p, a, q = p[..., :-1], jnp.where(valid[..., 0], a, 0.0), jnp.where(valid[..., 0], q, 0.0)
  video = (jnp.sum(p * a[..., None], axis=1)
           / (jnp.sum(a, axis=1, keepdims=True) + eps))
  score = p * (a * q)[..., None] + video_bonus * video[:, None, :]
  return jnp.where(valid, score, 0.0), video


# ------------------------------------------------------------------------------------------
# The method object.


class PMIL:
  """P-MIL (method 'pmil', configured by config.pmil), a `methods.Method`. Batches carry the
  candidate proposals (config.data.proposals: proposals_BxMx2, proposal_mask_BxM)."""
  postprocess_preset = "pmil"
  phase_starts = (0,)
  block = "pmil"

  defaults = staticmethod(default_config)
  validate = staticmethod(validate_config)
  use_q = True     # inference fuses the third head (SEAL: only when L_pc trains it)

  def __init__(self, config, num_classes: int, dims: dict, class_names=None):
    """Also SEAL's (its own block, defaults and validation; a block without `branches` is
    the fused network)."""
    del class_names
    cfg = methods.config_block(config, self.block, self.defaults)
    self.validate(cfg)
    if not config.data.get("proposals"):
      raise WstalError(f"method {self.block!r} scores candidate proposals: set "
                       f"config.data.proposals=True (configs/{self.block}.py does) with a "
                       "dataset that has them (python -m wstal_jax.data.proposals)")
    self.cfg = cfg
    self.num_classes = int(num_classes)
    self.rgb_dim = co2net.rgb_dim_of(dims)
    self.model = PMILModel(num_classes=self.num_classes, split=self.rgb_dim,
                           hidden=int(cfg.hidden), head_hidden=int(cfg.head_hidden),
                           dropout=float(cfg.dropout), branches=cfg.get("branches", "fused"))
    self.steps_per_epoch = int(cfg.steps_per_epoch) or max(
        int(dims.get("train_videos", 0)) // int(config.train.batch_size), 1)
    self.total_epochs = max(int(config.train.num_steps) / self.steps_per_epoch, 1.0)

  def extra_consts(self):
    return {}

  def epoch(self, step):
    """P-MIL's epoch counter (from 1, constant within an epoch) at training step `step`."""
    return jnp.asarray(step, jnp.int32) // self.steps_per_epoch + 1

  def loss_weights(self):
    c = self.cfg
    w = {"l_orig": float(c.w_orig), "l_supp": float(c.w_supp)}
    if c.w_comp > 0:
      w["l_comp"] = float(c.w_comp)
    if c.w_irc > 0:
      w["l_irc"] = float(c.w_irc)
    return w

  def init(self, rng, batch, consts):
    del consts
    params_rng, dropout_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "dropout": dropout_rng}, batch["feat_BxTxD"],
                           batch["proposals_BxMx2"], False)

  def forward(self, params, batch, rng=None):
    if rng is None:
      return self.model.apply({"params": params}, batch["feat_BxTxD"],
                              batch["proposals_BxMx2"], False)
    return self.model.apply({"params": params}, batch["feat_BxTxD"], batch["proposals_BxMx2"],
                            True, rngs={"dropout": rng})

  def terms_from_out(self, outs, batch, step, consts=None):
    """Unweighted terms {l_orig, l_supp, [l_comp, l_irc]} (the completeness and rank terms
    already times the ramp-up), each the mean over the branches, per batch."""
    del consts
    c = self.cfg
    props, mask = batch["proposals_BxMx2"], batch["proposal_mask_BxM"]
    label, valid_B = batch["label_BxC"], batch["valid_B"]
    # A video none of whose proposals survived the sampling window takes no part.
    valid_B = valid_B * (jnp.sum(mask, axis=1) > 0)
    k_B = topk_count(mask, int(c.topk_divisor))
    names = list(outs)
    ramp = ramp_up(self.epoch(step), float(c.ramp_epochs))
    terms = {"l_orig": 0.0, "l_supp": 0.0}
    for name in names:
      o = outs[name]
      attn = jax.nn.sigmoid(o["attn_logit_BxM"])
      terms["l_orig"] += video_mean(co2net.mil_loss(o["cas_BxMxC1"], label, mask, k_B, 1.0),
                                    valid_B)
      terms["l_supp"] += video_mean(co2net.mil_loss(o["cas_BxMxC1"] * attn[..., None], label,
                                                    mask, k_B, 0.0), valid_B)
      if c.w_comp > 0:
        other = outs[names[1 - names.index(name)]] if len(names) == 2 else o
        inst = pseudo_instances(jax.nn.sigmoid(other["attn_logit_BxM"]), props, mask,
                                float(c.pseudo_ratio))
        terms["l_comp"] = terms.get("l_comp", 0.0) + ramp * video_mean(
            completeness_loss(o["iou_logit_BxM"], props, inst, mask), valid_B)
      if c.w_irc > 0:
        other = outs[names[1 - names.index(name)]]
        terms["l_irc"] = terms.get("l_irc", 0.0) + ramp * video_mean(rank_consistency(
            o["cas_BxMxC1"], other["cas_BxMxC1"], jax.nn.sigmoid(other["attn_logit_BxM"]),
            props, label, mask, int(c.irc_max_classes)), valid_B)
    return {k: v / len(names) for k, v in terms.items()}

  def loss(self, params, batch, consts, rng, step):
    terms = self.terms_from_out(self.forward(params, batch, rng), batch, step, consts)
    total = sum(w * terms[k] for k, w in self.loss_weights().items())
    return total, terms

  def predict(self, params, batch, consts):
    del consts
    outs = self.forward(params, batch)
    mask = batch["proposal_mask_BxM"]
    score, video = proposal_scores(outs, mask, float(self.cfg.video_bonus),
                                   use_q=self.use_q)
    return {"video_scores_BxC": video, "proposal_scores_BxMxC": score,
            "cas_BxTxC": snippet_scores(score, batch["proposals_BxMx2"], mask,
                                        batch["mask_BxT"])}

  def param_labels(self, params, step):
    del step
    return jax.tree.map(lambda _: "train", params)


def snippet_scores(score_BxMxC, proposals_BxMx2, mask_BxM, mask_BxT):
  """A per-snippet view of the proposal scores for plots (`cas_BxTxC`; detections come from
  the proposals): the mean score of the valid proposals covering each snippet's centre."""
  t = jnp.arange(mask_BxT.shape[1], dtype=jnp.float32)[None, :, None] + 0.5
  cover = ((proposals_BxMx2[:, None, :, 0] <= t) & (t < proposals_BxMx2[:, None, :, 1])
           & (mask_BxM[:, None, :] > 0)).astype(jnp.float32)                # [B, T, M]
  total = jnp.einsum("btm,bmc->btc", cover, score_BxMxC)
  count = jnp.sum(cover, axis=2)[..., None]
  return jnp.where((mask_BxT[..., None] > 0) & (count > 0), total / jnp.maximum(count, 1.0),
                   0.0)
