"""DELU (Chen et al., ECCV 2022): dual evidential learning on the CO2-Net backbone.

MLLM4WTAL's base (mllm4wtal.txt Sec. 4, Table 3 "base"). DELU's paper is not among ours; the
terms below follow its released code (MengyuanChen21/ECCV2022-DELU, read, not copied), and
every deviation is a config field. The backbone and CO2-Net's terms are `models/co2net.py`
and `methods/co2net.video_loss` (configured by config.co2net; DELU's guide weight is 0.4,
CO2-Net's 0.8). DELU adds, configured by config.delu:

* Video-level evidential loss `edl_video_loss` (weight `w_edl`, 1.3 on THUMOS14). The
  attention-suppressed CAS S_supp = a (S - min_c S) + min_c S (co2net.suppress) is averaged
  over the k = max(1, n // `edl_topk_divisor`) snippets of highest attention (9: the code's
  rat_atn; ranked by the attention, not by the class score), action classes only. Evidence
  e = exp(clip(x, -10, 10)) ('exp'; 'relu' for ActivityNet), alpha = e + 1, S = sum_c alpha_c,
  u = C / S. 'log' (THUMOS14): L = sum_c g_c (log S - log alpha_c) with
  g_c = (1 - sg(u)) |y| (y_c / alpha_c) / sum_j (y_j / alpha_j), y the raw multi-hot label,
  |y| its count (only u is detached: the 1 / alpha weights keep their gradient, as released).
  'mse' (ActivityNet): sum_c (y_c - alpha_c / S)^2 with the raw multi-hot y (the release
  computes a variance term and a KL term beside it and uses neither). No KL / annealing term
  in either (the release computes an annealing coefficient and never uses it).
* Snippet-level uncertainty-guided loss `uncertainty_guide_loss` (weight `w_uct`, 0.4). Each
  snippet's uncertainty u_t = C / sum over the C + 1 columns of (exp(clip(S_supp, -10, 10)) + 1)
  (no gradient: it only orders snippets); rank r_t = its position in ascending u among the
  video's valid snippets (0 = most certain); the progressive curve w(r) = 1 + A tanh(theta_r
  delta) with theta_r = 2 (r + 0.5) / n - 1, delta = 1 - 2 step / num_steps, A =
  `curve_amplitude` (0.7): early in training the certain snippets weigh less than 1 and the
  uncertain ones more, the order flips at mid-training, and the mean weight over a video is
  exactly 1. The loss is the mean over valid snippets of w_t times CO2-Net's guide term
  |1 - a_t - softmax(S)_t,bg| (averaged over the fused, RGB and flow attentions).
  `curve_gather`: 'rank' (default) gives snippet t the weight of its own rank, w(r_t), what
  the curve is for. 'released' reproduces the released code, which gathers the curve with
  the sort permutation itself, w(argsort(u)_t): snippet t gets the weight of the rank equal
  to the *time index* of the t-th most certain snippet, unrelated to its own uncertainty
  (PEERS.md). Offered to reproduce the release; never the default (built-in benchmark, 3
  seeds: 37.6 avg mAP with either, README).

The released code has no masking (its T is always 320, random-perturb sampled); here every
term is masked, so padded snippets never enter a rank, a top-k or a mean (n above is the
video's number of valid snippets; the 'released' gather assumes, as the input pipeline
guarantees, that the valid snippets come first). Its hard-coded batch of 10 in the curve
gather is not reproduced.

ActivityNet (`smooth_kernel`, 13 there, 0 = off): the release's DELU_ACT smooths the CAS and
the three attentions with a moving average over 13 snippets (zero padding counted) before
every loss and at inference; here the same on the valid snippets (padding is zero).

Inference (`predict`, the 'delu' post-processing preset): CO2-Net's scores (CAS x attention,
video score softmax over C + 1 of the top-k mean), attention thresholds linspace(0.1, 0.9,
20) (DELU's 2024 release; CO2-Net: 10), OIC, Gaussian soft-NMS, proposals of one snippet
dropped (the release keeps t_end - t_start > 1 snippet).
"""
import jax
import jax.numpy as jnp
import ml_collections

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.layers import pool_selected, snippet_mean, topk_count, topk_select, video_mean
from wstal_jax.methods import co2net

EVIDENCES = ("exp", "relu")
EDL_LOSSES = ("log", "mse")
CURVE_GATHERS = ("rank", "released")


def default_config() -> ml_collections.ConfigDict:
  """The `config.delu` block: DELU's released THUMOS14 settings (train_thumos.sh)."""
  c = ml_collections.ConfigDict()
  c.w_edl = 1.3               # --alpha_edl
  c.edl_topk_divisor = 9      # --rat_atn: k = n // 9 snippets of highest attention
  c.edl_evidence = "exp"      # exp(clip(x, -10, 10)); 'relu' (ActivityNet)
  c.edl_loss = "log"          # 'log' (THUMOS14) | 'mse' (ActivityNet)
  c.w_uct = 0.4               # --alpha_uct_guide
  c.curve_amplitude = 0.7     # --amplitude
  c.curve_gather = "rank"     # 'rank' (intended) | 'released' (the release's gather; docstring)
  c.smooth_kernel = 0         # moving average of the CAS and attentions (ActivityNet: 13)
  return c


def validate_config(cfg) -> None:
  def bad(field, why):
    raise WstalError(f"config.delu.{field}={cfg.get(field)!r}: {why}")
  if int(cfg.edl_topk_divisor) < 1:
    bad("edl_topk_divisor", "must be >= 1")
  for field, choices in (("edl_evidence", EVIDENCES), ("edl_loss", EDL_LOSSES),
                         ("curve_gather", CURVE_GATHERS)):
    if cfg[field] not in choices:
      bad(field, f"choose one of {choices}")
  for field in ("w_edl", "w_uct", "curve_amplitude"):
    if cfg[field] < 0:
      bad(field, "must be >= 0")
  if int(cfg.smooth_kernel) < 0 or (int(cfg.smooth_kernel) and int(cfg.smooth_kernel) % 2 == 0):
    bad("smooth_kernel", "must be 0 (off) or an odd window length")
  if cfg.curve_amplitude >= 1:
    bad("curve_amplitude", "must be < 1 (the curve 1 + A tanh(.) would reach 0)")


# ------------------------------------------------------------------------------------------
# Loss terms (pure).


def evidence(x, kind: str):
  """DELU's evidence functions: exp(clip(x, -10, 10)) or relu(x)."""
  return jnp.exp(jnp.clip(x, -10.0, 10.0)) if kind == "exp" else jax.nn.relu(x)


def attention_topk_logits(supp_BxTxC1, attn_BxT, mask_BxT, k_B):
  """Mean of the action-class columns of S_supp over each video's k_B valid snippets of
  highest attention (ties: the earlier snippet): -> [B, C]."""
  sel_BxTx1 = topk_select(attn_BxT[:, :, None], mask_BxT, k_B)
  x_BxTxC = supp_BxTxC1[..., :-1]
  return pool_selected(x_BxTxC, jnp.broadcast_to(sel_BxTx1, x_BxTxC.shape))


def edl_video_loss(logits_BxC, label_BxC, kind: str = "log", evidence_fn: str = "exp"):
  """DELU's video-level evidential loss per video (module docstring): -> l_B."""
  alpha = evidence(logits_BxC, evidence_fn) + 1.0
  s_Bx1 = jnp.sum(alpha, axis=-1, keepdims=True)
  num_c = logits_BxC.shape[-1]
  if kind == "mse":
    return jnp.sum((label_BxC - alpha / s_Bx1) ** 2, axis=-1)
  u_Bx1 = jax.lax.stop_gradient(num_c / s_Bx1)
  count_Bx1 = jnp.sum(label_BxC, axis=-1, keepdims=True)
  inv = label_BxC / alpha
  g = (1.0 - u_Bx1) * count_Bx1 * inv / jnp.maximum(jnp.sum(inv, axis=-1, keepdims=True),
                                                     1e-30)
  return jnp.sum(g * (jnp.log(s_Bx1) - jnp.log(alpha)), axis=-1)


def snippet_uncertainty(supp_BxTxC1):
  """u_t = C / sum over the C + 1 columns of (exp(clip(S_supp)) + 1), C = action classes
  (the release's form); no gradient (it only orders snippets): -> [B, T]."""
  num_c = supp_BxTxC1.shape[-1] - 1
  s = jnp.sum(evidence(jax.lax.stop_gradient(supp_BxTxC1), "exp") + 1.0, axis=-1)
  return num_c / s


def curve_weights(u_BxT, mask_BxT, step, num_steps: int, amplitude: float,
                  gather: str = "rank"):
  """The progressive curve's weight of every snippet (module docstring): -> [B, T] (padded
  snippets 0). gather='rank': w(rank of u_t); 'released': w(argsort(u)_t)."""
  valid = mask_BxT > 0
  n_B = jnp.maximum(jnp.sum(valid, axis=1), 1).astype(jnp.float32)
  pos = jax.lax.broadcasted_iota(jnp.int32, u_BxT.shape, 1)
  # Ascending u over the valid snippets (padded last); ties keep time order.
  _, order_BxT = jax.lax.sort((jnp.where(valid, u_BxT, jnp.inf), pos), dimension=1,
                              num_keys=1, is_stable=True)
  if gather == "rank":
    index_BxT = jnp.zeros_like(order_BxT).at[
        jax.lax.broadcasted_iota(jnp.int32, u_BxT.shape, 0), order_BxT].set(pos)
  else:
    index_BxT = order_BxT
  theta = 2.0 * (index_BxT.astype(jnp.float32) + 0.5) / n_B[:, None] - 1.0
  delta = 1.0 - 2.0 * jnp.asarray(step, jnp.float32) / float(max(num_steps, 1))
  w = 1.0 + amplitude * jnp.tanh(theta * delta)
  return jnp.where(valid, w, 0.0)


def uncertainty_guide_loss(out, cas_BxTxC1, supp_BxTxC1, mask_BxT, step, num_steps: int,
                           amplitude: float, gather: str = "rank"):
  """DELU's snippet-level uncertainty-guided loss per video: -> l_B."""
  w_BxT = curve_weights(snippet_uncertainty(supp_BxTxC1), mask_BxT, step, num_steps,
                        amplitude, gather)
  return snippet_mean(w_BxT * co2net.guide_per_snippet(out, cas_BxTxC1), mask_BxT)


def smooth(x_BxTxK, mask_BxT, kernel: int):
  """DELU_ACT's AvgPool1d(kernel, stride 1, padding kernel // 2, count_include_pad): the mean
  over a centred window, zeros beyond the video counted; padded snippets stay 0."""
  m = (mask_BxT > 0).astype(x_BxTxK.dtype)[:, :, None]
  half = kernel // 2
  x = jnp.pad(x_BxTxK * m, ((0, 0), (half, half), (0, 0)))
  c = jnp.cumsum(x, axis=1)
  c = jnp.concatenate([jnp.zeros_like(c[:, :1]), c], axis=1)
  num_t = x_BxTxK.shape[1]
  return (c[:, kernel:kernel + num_t] - c[:, :num_t]) / kernel * m


def smoothed(out, mask_BxT, kernel: int):
  """The model outputs with the CAS and the three attentions smoothed (kernel > 0)."""
  if not kernel:
    return out
  out = dict(out)
  out["cas_BxTxC1"] = smooth(out["cas_BxTxC1"], mask_BxT, kernel)
  for k in co2net.ATTENTIONS:
    out[k] = smooth(out[k][:, :, None], mask_BxT, kernel)[..., 0]
  return out


# ------------------------------------------------------------------------------------------
# The method object.


class DELU(co2net.CO2Net):
  """DELU (method 'delu'; config.co2net for the backbone and CO2-Net's terms, config.delu
  for its own), a `methods.Method`."""
  postprocess_preset = "delu"

  def __init__(self, config, num_classes: int, dims: dict, class_names=None):
    super().__init__(config, num_classes, dims, class_names)
    cfg = methods.config_block(config, "delu", default_config)
    validate_config(cfg)
    self.delu = cfg
    self.num_steps = int(config.train.num_steps) if "train" in config else 1

  def loss_weights(self):
    weights = dict(super().loss_weights())
    weights["l_edl"] = float(self.delu.w_edl)
    weights["l_uct"] = float(self.delu.w_uct)
    return weights

  def forward(self, params, batch, consts, rng=None):
    return smoothed(super().forward(params, batch, consts, rng), batch["mask_BxT"],
                    int(self.delu.smooth_kernel))

  def loss_from_out(self, out, batch, step):
    cas = out["cas_BxTxC1"]
    total, terms = co2net.video_loss(out, cas, batch, self.settings)
    mask_BxT, valid_B = batch["mask_BxT"], batch["valid_B"]
    d = self.delu
    supp = co2net.suppress(cas, out["attn_BxT"], mask_BxT)
    k_B = topk_count(mask_BxT, int(d.edl_topk_divisor))
    logits = attention_topk_logits(supp, out["attn_BxT"], mask_BxT, k_B)
    terms["l_edl"] = video_mean(edl_video_loss(logits, batch["label_BxC"], d.edl_loss,
                                               d.edl_evidence), valid_B)
    terms["l_uct"] = video_mean(uncertainty_guide_loss(
        out, cas, supp, mask_BxT, step, self.num_steps, float(d.curve_amplitude),
        d.curve_gather), valid_B)
    total = total + d.w_edl * terms["l_edl"] + d.w_uct * terms["l_uct"]
    return total, terms
