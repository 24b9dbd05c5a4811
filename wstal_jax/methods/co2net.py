"""CO2-Net (Hong et al., MM 2021), the base of PVLR (pvlr.txt Sec. 3.1.2, Eq. 1-6).

The method object `CO2Net` wires `models.co2net.CO2NetModel` to the pure loss `video_loss`
(PVLR's L_vid, Eq. 6), which PVLR reuses on its P-CAS. Paper map:

  Eq. 1-3   X_B, attention a, S_base (C + 1 classes)               models/co2net.py
  Eq. 4     L_base: top-k MIL with the background label y = [y, 1]  `mil_loss(..., bg=1)`
  Eq. 5     L_supp: on S_supp = a (x) S_base, label [y, 0]          `suppress`, `mil_loss`
  Eq. 6     L_vid = l1 L_cls + l2 L_oppo + l3 L_norm + l4 L_guide   `video_loss`
            (+ CO2-Net's mutual-learning term between the RGB and flow attentions, weight
            `mutual`, which PVLR's Eq. 6 does not list: 1 for CO2-Net, 0 for PVLR)

The inherited terms, as CO2-Net's released code computes them (read, not copied):
* MIL: k = max(1, n_valid // topk_divisor) (7 on THUMOS14); softmax over C + 1 of the top-k
  mean; the label vector normalised to sum 1 (y / (sum y + 1e-4) in the reference; we use
  y / sum y, the same up to 1e-4).
* S_supp = a * (S - min_c S) + min_c S (the reference's `_multiply(include_min=True)`: per
  snippet, the attention scales the CAS above its minimum over the C + 1 classes, so a ~ 0
  makes every class of the snippet equal, not 0).
* L_oppo: the co-activity similarity loss of W-TALC as CO2-Net uses it, on the fused feature
  and S_supp: per class, attention-weighted high / low features H, L of each video
  (softmax over time of S_supp; (1 - softmax) / (n - 1)), distances d = 1 - cos, and a hinge
  max(0, d(H_i, H_j) - d(H_i, L_j) + 0.5) (and the symmetric one) for every pair of videos
  sharing the class. The reference pairs videos (0,1), (2,3), (4,5) of a batch built with
  three same-class pairs; our input pipeline draws batches at random, so every pair i < j of
  the batch that shares a class counts (a superset of the reference's pairs; a batch with
  no shared class gives 0).
* L_norm: mean attention (fused, RGB, flow averaged); L_guide: mean |1 - a - softmax(S)_bg|
  (same three attentions averaged); both over valid snippets.
* Mutual learning: 0.5 MSE(a_rgb, sg(a_flow)) + 0.5 MSE(a_flow, sg(a_rgb)).

Inference (CO2-Net's `multiple_threshold_hamnet`, the 'co2net' post-processing preset): the
CAS is multiplied by the attention, the video score is softmax over C + 1 of its top-k mean
with k = max(1, n // eval_topk_divisor), background dropped; proposals are thresholded on the
attention and scored by OIC on the attention-weighted CAS.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.layers import (masked_softmax_time, masked_topk_mean, snippet_mean, topk_count,
                              video_mean)
from wstal_jax.models import co2net as co2net_model


def default_config() -> ml_collections.ConfigDict:
  """The `config.co2net` block: CO2-Net's released THUMOS14 settings."""
  c = ml_collections.ConfigDict()
  c.attn_hidden = 512         # attention head width (CO2-Net: 512)
  c.dropout = 0.7             # CO2-Net's dropout outside the attention modules
  c.topk_divisor = 7          # training MIL k = n // 7 (CO2-Net --k 7)
  c.eval_topk_divisor = 20    # video score at inference: k = n // 20 (PVLR's --test-topk;
                              # CO2-Net's own inference uses get_cls_score(rat=10)). One
                              # value for both methods so they are compared alike.
  c.w_cls = 1.0               # L_base + L_supp
  c.w_oppo = 1.0              # co-activity loss (CO2-Net alpha3)
  c.w_norm = 0.8              # attention norm (CO2-Net alpha1)
  c.w_guide = 0.8             # guide loss (CO2-Net alpha2)
  c.w_mutual = 1.0            # RGB/flow attention mutual learning (CO2-Net alpha4)
  c.oppo_margin = 0.5
  return c


def validate_config(cfg, block: str = "co2net") -> None:
  def bad(field, why):
    raise WstalError(f"config.{block}.{field}={cfg.get(field)!r}: {why}")
  for field in ("attn_hidden", "topk_divisor", "eval_topk_divisor"):
    if int(cfg[field]) < 1:
      bad(field, "must be >= 1")
  if not 0.0 <= cfg.dropout < 1.0:
    bad("dropout", "must be in [0, 1)")
  for field in ("w_cls", "w_oppo", "w_norm", "w_guide", "w_mutual"):
    if cfg[field] < 0:
      bad(field, "loss weights must be >= 0")


def rgb_dim_of(dims) -> int:
  """I3D features are [RGB; flow] of equal widths; the consensus modules need the split."""
  width = int(dims["feat"])
  if width % 2:
    raise WstalError(f"CO2-Net needs [RGB; flow] features of equal widths; the primary "
                     f"feature has odd width {width}")
  return width // 2


# ------------------------------------------------------------------------------------------
# Loss terms (pure; per video [B] unless noted).


def labels_with_background(label_BxC, background: float):
  """[y, bg] of Eq. 4 (bg = 1) / Eq. 5 (bg = 0), normalised to sum 1 per video."""
  bg_Bx1 = jnp.full(label_BxC.shape[:1] + (1,), background, label_BxC.dtype)
  y_BxC1 = jnp.concatenate([label_BxC, bg_Bx1], axis=-1)
  return y_BxC1 / jnp.maximum(jnp.sum(y_BxC1, axis=-1, keepdims=True), 1e-6)


def mil_loss(cas_BxTxC1, label_BxC, mask_BxT, k_B, background: float):
  """Top-k MIL cross-entropy with (bg=1) or without (bg=0) the background label: -> l_B."""
  logits_BxC1 = masked_topk_mean(cas_BxTxC1, mask_BxT, k_B)
  y_BxC1 = labels_with_background(label_BxC, background)
  return -jnp.sum(y_BxC1 * jax.nn.log_softmax(logits_BxC1, axis=-1), axis=-1)


def suppress(cas_BxTxC1, attn_BxT, mask_BxT):
  """S_supp = a * (S - min_c S) + min_c S, the minimum over the C + 1 classes of each snippet
  (CO2-Net's `_multiply(include_min=True)` on the last axis): a ~ 0 collapses every class of
  the snippet to one value, so a background snippet carries no class evidence."""
  lo_BxTx1 = jnp.min(cas_BxTxC1, axis=-1, keepdims=True)
  out = attn_BxT[:, :, None] * (cas_BxTxC1 - lo_BxTx1) + lo_BxTx1
  return jnp.where(mask_BxT[:, :, None] > 0, out, 0.0)


def _cos_dist(a_BxDxC, b_BxDxC, eps=1e-8):
  """1 - cos over D for every pair (i, j) and class: -> [B, B, C]."""
  dot = jnp.einsum("idc,jdc->ijc", a_BxDxC, b_BxDxC)
  na = jnp.linalg.norm(a_BxDxC, axis=1)
  nb = jnp.linalg.norm(b_BxDxC, axis=1)
  return 1.0 - dot / jnp.maximum(na[:, None, :] * nb[None, :, :], eps)


def co_activity_loss(feat_BxTxF, cas_supp_BxTxC1, label_BxC, mask_BxT, valid_B,
                     margin: float = 0.5):
  """L_oppo (scalar): CO2-Net's co-activity similarity loss over same-class video pairs."""
  mask = (mask_BxT > 0).astype(feat_BxTxF.dtype)
  atn_BxTxC = masked_softmax_time(cas_supp_BxTxC1[..., :-1], mask_BxT)
  n_B = jnp.sum(mask, axis=1)
  low_BxTxC = (1.0 - atn_BxTxC) * mask[:, :, None] / jnp.maximum(n_B - 1, 1.0)[:, None, None]
  high_BxFxC = jnp.einsum("btf,btc->bfc", feat_BxTxF, atn_BxTxC)
  low_BxFxC = jnp.einsum("btf,btc->bfc", feat_BxTxF, low_BxTxC)
  d1 = _cos_dist(high_BxFxC, high_BxFxC)                 # d(H_i, H_j)
  d2 = _cos_dist(high_BxFxC, low_BxFxC)                  # d(H_i, L_j)
  d3 = jnp.swapaxes(d2, 0, 1)                            # d(H_j, L_i)
  y_BxC = label_BxC * valid_B[:, None]
  num_b = label_BxC.shape[0]
  upper = jnp.triu(jnp.ones((num_b, num_b), feat_BxTxF.dtype), k=1)
  w_BxBxC = y_BxC[:, None, :] * y_BxC[None, :, :] * upper[:, :, None]
  hinge = (0.5 * jax.nn.relu(d1 - d2 + margin) + 0.5 * jax.nn.relu(d1 - d3 + margin))
  return jnp.sum(hinge * w_BxBxC) / jnp.maximum(jnp.sum(w_BxBxC), 1.0)


ATTENTIONS = ("attn_BxT", "v_attn_BxT", "f_attn_BxT")   # fused, RGB, flow


def guide_per_snippet(out, cas_BxTxC1):
  """|1 - a - softmax(S)_bg| per snippet, averaged over the fused, RGB and flow attentions
  (gradient to both the attention and the CAS, as CO2-Net): -> [B, T]."""
  bg_BxT = jax.nn.softmax(cas_BxTxC1, axis=-1)[..., -1]
  return sum(jnp.abs(1.0 - out[k] - bg_BxT) for k in ATTENTIONS) / len(ATTENTIONS)


def attention_terms(out, cas_BxTxC1, mask_BxT):
  """(L_norm, L_guide) per video, each averaged over the fused, RGB and flow attentions."""
  norm_BxT = sum(out[k] for k in ATTENTIONS) / len(ATTENTIONS)
  return (snippet_mean(norm_BxT, mask_BxT),
          snippet_mean(guide_per_snippet(out, cas_BxTxC1), mask_BxT))


def mutual_loss(out, mask_BxT):
  """0.5 MSE(a_rgb, sg(a_flow)) + 0.5 MSE(a_flow, sg(a_rgb)) per video."""
  m = (mask_BxT > 0).astype(out["v_attn_BxT"].dtype)
  n_B = jnp.maximum(jnp.sum(m, axis=1), 1.0)
  v, f = out["v_attn_BxT"], out["f_attn_BxT"]
  sg = jax.lax.stop_gradient
  return (0.5 * jnp.sum((v - sg(f)) ** 2 * m, axis=1)
          + 0.5 * jnp.sum((f - sg(v)) ** 2 * m, axis=1)) / n_B


@dataclasses.dataclass(frozen=True)
class VideoLossSettings:
  """The config.co2net fields `video_loss` reads, as plain values (defaults and meaning:
  `default_config`)."""
  topk_divisor: int
  w_cls: float
  w_oppo: float
  w_norm: float
  w_guide: float
  w_mutual: float
  oppo_margin: float

  @classmethod
  def from_config(cls, cfg):
    return cls(topk_divisor=int(cfg.topk_divisor), w_cls=float(cfg.w_cls),
               w_oppo=float(cfg.w_oppo), w_norm=float(cfg.w_norm),
               w_guide=float(cfg.w_guide), w_mutual=float(cfg.w_mutual),
               oppo_margin=float(cfg.oppo_margin))


def video_loss(out, cas_BxTxC1, batch, s: VideoLossSettings):
  """L_vid (Eq. 6, + mutual learning) on a CAS with background: -> (loss, terms)."""
  mask_BxT, valid_B, label_BxC = batch["mask_BxT"], batch["valid_B"], batch["label_BxC"]
  k_B = topk_count(mask_BxT, s.topk_divisor)
  supp_BxTxC1 = suppress(cas_BxTxC1, out["attn_BxT"], mask_BxT)
  base = video_mean(mil_loss(cas_BxTxC1, label_BxC, mask_BxT, k_B, 1.0), valid_B)
  supp = video_mean(mil_loss(supp_BxTxC1, label_BxC, mask_BxT, k_B, 0.0), valid_B)
  norm_B, guide_B = attention_terms(out, cas_BxTxC1, mask_BxT)
  terms = {"l_base": base, "l_supp": supp,
           "l_norm": video_mean(norm_B, valid_B), "l_guide": video_mean(guide_B, valid_B)}
  total = s.w_cls * (base + supp) + s.w_norm * terms["l_norm"] + s.w_guide * terms["l_guide"]
  if s.w_oppo:
    terms["l_oppo"] = co_activity_loss(out["feat_BxTxF"], supp_BxTxC1, label_BxC, mask_BxT,
                                       valid_B, s.oppo_margin)
    total = total + s.w_oppo * terms["l_oppo"]
  if s.w_mutual:
    terms["l_mutual"] = video_mean(mutual_loss(out, mask_BxT), valid_B)
    total = total + s.w_mutual * terms["l_mutual"]
  return total, terms


def video_loss_weights(s: VideoLossSettings) -> dict:
  """{term: weight} of `video_loss`'s total (the terms it adds)."""
  weights = {"l_base": s.w_cls, "l_supp": s.w_cls, "l_norm": s.w_norm, "l_guide": s.w_guide}
  if s.w_oppo:
    weights["l_oppo"] = s.w_oppo
  if s.w_mutual:
    weights["l_mutual"] = s.w_mutual
  return weights


def co2net_scores(cas_BxTxC1, attn_BxT, mask_BxT, eval_topk_divisor: int):
  """CO2-Net inference scores: -> {video_scores_BxC, cas_BxTxC, actionness_BxT}."""
  valid_BxT = mask_BxT > 0
  element_BxTxC1 = cas_BxTxC1 * attn_BxT[:, :, None]
  k_B = topk_count(mask_BxT, eval_topk_divisor)
  video_BxC1 = jax.nn.softmax(masked_topk_mean(element_BxTxC1, mask_BxT, k_B), axis=-1)
  return {"video_scores_BxC": video_BxC1[:, :-1],
          "cas_BxTxC": jnp.where(valid_BxT[:, :, None], element_BxTxC1[..., :-1], 0.0),
          "actionness_BxT": jnp.where(valid_BxT, attn_BxT, 0.0)}


# ------------------------------------------------------------------------------------------
# The method object.


class CO2Net:
  """CO2-Net (method 'co2net', configured by config.co2net), a `methods.Method`."""
  postprocess_preset = "co2net"
  phase_starts = (0,)

  def __init__(self, config, num_classes: int, dims: dict, class_names=None):
    del class_names
    cfg = methods.config_block(config, "co2net", default_config)
    validate_config(cfg)
    self.cfg = cfg
    self.num_classes = int(num_classes)
    self.settings = VideoLossSettings.from_config(cfg)
    self.model = co2net_model.CO2NetModel(
        num_classes=self.num_classes, rgb_dim=rgb_dim_of(dims),
        attn_hidden=int(cfg.attn_hidden), dropout=float(cfg.dropout))

  def extra_consts(self):
    return {}

  def loss_weights(self):
    return video_loss_weights(self.settings)

  def init(self, rng, batch, consts):
    params_rng, dropout_rng = jax.random.split(rng)
    return self.model.init({"params": params_rng, "dropout": dropout_rng}, batch, consts,
                           train=False)

  def forward(self, params, batch, consts, rng=None):
    """The model's outputs (models/co2net.py), training mode when `rng` is given."""
    if rng is None:
      return self.model.apply({"params": params}, batch, consts, train=False)
    return self.model.apply({"params": params}, batch, consts, train=True,
                            rngs={"dropout": rng})

  def loss_from_out(self, out, batch, step):
    """(total, terms) of the method's loss on `forward`'s outputs (MLLM4WTAL builds on it)."""
    del step
    return video_loss(out, out["cas_BxTxC1"], batch, self.settings)

  def predict_from_out(self, out, batch):
    return co2net_scores(out["cas_BxTxC1"], out["attn_BxT"], batch["mask_BxT"],
                         int(self.cfg.eval_topk_divisor))

  def loss(self, params, batch, consts, rng, step):
    return self.loss_from_out(self.forward(params, batch, consts, rng), batch, step)

  def predict(self, params, batch, consts):
    return self.predict_from_out(self.forward(params, batch, consts), batch)

  def param_labels(self, params, step):
    del step
    return jax.tree.map(lambda _: "train", params)
