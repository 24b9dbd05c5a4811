"""PVLR: Probabilistic Vision-Language Representation for WS-TAL (pvlr.txt), on CO2-Net.

The method object `PVLR` wires `models.pvlr.PVLRModel` to the pure losses below. Paper map:

  Eq. 1-6    CO2-Net base and L_vid, computed on P-CAS      methods/co2net.video_loss
  Eq. 7-10   probabilistic adapters, K samples, P-CAS       models/pvlr.py
  Eq. 11     L_ortho = ||X_C X_C^T - I||_F^2                 `ortho_loss`
  Eq. 12     L_kd, rescaled cosine of g_mu to CLIP images    `distill_loss`
  Eq. 13-15  threshold a, erosion / dilation mining          `mine_snippets`
  Eq. 16-17  Gaussian divergences, L_intra                   `divergence`, `intra_loss`
  Eq. 18-19  attention-weighted GMM per video, L_inter       `video_gaussians`, `inter_loss`
  Eq. 20     L = L_vid + a L_kd + b L_ortho + g (L_intra + L_inter)    `pvlr_loss`

Readings (the paper leaves these open; each is noted again where it is coded):
* The CAS of L_vid is P-CAS: "we reformulated the classification objective using P-CAS"
  (Sec. 4.6), and the authors' public code has no other classifier. So f_cls's last layer is
  replaced by P-CAS (S_base in Eq. 4-5 and in L_guide is S_prob); the rest of CO2-Net is kept.
* P-CAS uses cosine similarity / tau at training and evaluation (Eq. 10; the authors' code
  uses an unnormalised dot product / 8 in training and cos / 0.03 at test); tau and the loss
  weight of L_kd are chosen as noted in `default_config`.
* Eq. 11 runs over the C class embeddings (X_C), L2-normalised first (cosine is what P-CAS
  uses; unnormalised, the identity target would also fix their norms).
* Eq. 12: the paper's mean over snippets of -log((cos + 1) / 2) (the authors' code takes the
  log of the mean).
* Eq. 13: theta_b < 0 (the default) thresholds at the per-video median of a, as CoLA's
  mining and the authors' code do; theta_b in [0, 1] is a fixed threshold.
* Eq. 14-15: R_inner = erosion(b; m) - erosion(b; M), R_outer = dilation(b; M) -
  dilation(b; m) with m < M (CoLA's m = 3, M = 6; the authors' defaults m = 24, M = 3 give
  an empty inner region). Binary erosion / dilation with a centred window and zero border,
  as scipy.ndimage; padded snippets count as border. Hard action snippets: the k_hard
  highest-a in R_inner; hard background: the k_hard highest-a in R_outer (the hardest
  background); easy action / background: the k_easy highest a / highest (max a - a) after a
  random drop of easy_drop of the snippets (CoLA, the authors' code). Fewer candidates than k
  are not padded: only real picks count.
* Eq. 16-17: p(N) is read as a dissimilarity in [0, 1): p = D / (1 + D) with D a
  divergence between the two diagonal Gaussians, so positive pairs get -log(1 - p) =
  log(1 + D) and negative pairs -log p. The paper names the Jensen-Shannon divergence, which
  has no closed form for Gaussians; the default D is the symmetrised KL (KL(P||Q) +
  KL(Q||P)) / 2 (Eq. 16 both ways: the Jensen-Shannon-style symmetrisation of KL, the
  authors' code's choice); 'bhattacharyya' and 'mahalanobis' (squared, with the averaged
  covariance) give Table 4's alternatives. Variances get `var_floor` (1e-5, as the authors'
  code) so a ReLU at 0 has a finite divergence. Positive pairs: (hard action, easy action)
  and (hard background, easy background); negative pairs: the crossed ones; losses are the
  mean over pairs, the action and background queries summed.
* Eq. 18: the mixture weights are a normalised over the video's valid snippets, and the GMM
  is compared through its moment-matched Gaussian (mean sum w mu, variance sum w (Sigma +
  mu^2) - mean^2): divergences between mixtures have no closed form. Eq. 19: p = 1 / (1 + D)
  (a matching probability), H(i, j) = 1 when videos i and j share a label, L_inter = the mean
  BCE over the N^2 pairs of valid videos.
* Sampling noise comes from the step key (rng 'sample'); the easy-snippet drop from 'mining'.
"""

import jax
import jax.numpy as jnp
import ml_collections

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.layers import l2_normalize, video_mean
from wstal_jax.methods import co2net
from wstal_jax.models import class_text
from wstal_jax.models import pvlr as pvlr_model

METRICS = ("kl", "bhattacharyya", "mahalanobis")


def default_config() -> ml_collections.ConfigDict:
  """The `config.pvlr` block: the paper's PVLR on THUMOS14 (Sec. 4.2; numbers the paper does
  not give are from the authors' public code, as noted)."""
  c = ml_collections.ConfigDict()
  c.num_samples = 20          # K (Sec. 4.5.2); 0 = Table 4's deterministic CAS
  c.eps_std = 1.0             # std of eps in Eq. 8 (paper: unit Gaussian)
  c.temperature = 0.3         # tau of Eq. 10; the paper gives none. Chosen from {0.03 (the
                              # authors' code at inference), 0.1, 0.3} on held-out training
                              # videos of the built-in benchmark (seed 0; best held-out avg
                              # mAP 33.5 / 38.8 / 45.0), used for every dataset.
  # Class text (Eq. 9): 'auto' = 'clip' when clip_checkpoint is set, else 'precomputed'.
  c.text_mode = "auto"
  c.clip_checkpoint = ml_collections.config_dict.placeholder(str)  # converted .npz / .pt
  c.clip_bpe_vocab = ml_collections.config_dict.placeholder(str)  # BPE vocab (.txt.gz)
  c.class_names = ml_collections.config_dict.placeholder(str)  # "a,b,..." (default: dataset's
                                                                # names, CamelCase split)
  c.n_ctx_pre = 4             # learnable prompt vectors before the name (Sec. 4.2)
  c.n_ctx_post = 4            # ... and after
  # Eq. 20 weights (the paper gives none; the authors' code: alpha4=200, alpha8=0.5,
  # alpha5 = alpha6 = alpha7 = 0.005).
  c.w_kd = 1.0                # alpha; the paper gives none. The authors' 200 goes with their
                              # dot-product P-CAS: with Eq. 10's cosine it pins g_mu's direction
                              # to the CLIP feature and P-CAS does not learn (built-in: chance
                              # accuracy). {0.1, 1, 10} at tau 0.03 on held-out videos: 33.4,
                              # 33.5, 35.6 best avg mAP, i.e. no clear winner; 1 kept.
  c.w_ortho = 0.5             # beta
  c.w_intra = 0.02            # gamma for L_intra; the paper gives none. The authors' 0.005
  c.w_inter = 0.02            # goes with D summed over 1024 dims; with the per-dimension D
                              # below it leaves L_inter at 0.4% of the loss (built-in, seed 0);
                              # 0.02 is the smallest of {0.005, 0.02} at which both terms stay
                              # above 1% (3.8% / 1.3% at the end of training)
  # Table 3 switches (all True = PVLR).
  c.use_kd = True
  c.use_intra = True
  c.use_inter = True
  c.use_ortho = True
  c.metric = "kl"             # Table 4: 'kl', 'bhattacharyya', 'mahalanobis'
  c.var_floor = 1e-5
  # Review findings (issue 20). The defaults are the readings under which every term acts
  # (README, "PVLR"); the first readings stay options: logit_scale='fixed',
  # var_param='relu', divergence_scale='sum' with w_intra = w_inter = 0.005.
  c.logit_scale = "learnable" # P-CAS scale: 'learnable' (CLIP's: init 1 / tau, clamped at
                              # 100; a fixed 1 / tau cannot separate near-collinear class
                              # texts, tests/test_pvlr.py) or 'fixed' 1 / tau
  c.var_param = "softplus"    # g_Sigma: 'softplus' (init var_init: samples start near their
                              # mean, never a dead unit, bounded d sqrt), 'relu' (Eq. 7
                              # literally; a dead unit never recovers) or 'code' (ReLU;
                              # sampling std exp(v / 2), the released code)
  c.var_init = 0.01
  c.train_similarity = "cosine"  # training P-CAS: 'cosine' / tau (Eq. 10) or 'dot' (the
                              # authors' training: mu . x_c / dot_divisor; evaluation is
                              # cos / tau either way)
  c.dot_divisor = 8.0
  c.divergence_scale = "mean" # D averaged over the E dims ('mean') or summed ('sum': with
                              # E = 64 the summed D >> 1 makes -log(D / (1 + D)) ~ 0 and
                              # L_inter's p = 1 / (1 + D) ~ 0 for every pair: both inert)
  # The authors' released code (src/thumos of the PVLR repository; read only), each a switch
  # whose default is the paper's reading; `configs/pvlr.py:reading=code` turns them on.
  c.adapter_init = "flax"     # g_mu / g_Sigma init: 'flax' or 'torch' (nn.Linear's default,
                              # the release; it also loads an unpublished init checkpoint)
  c.background_init = "small" # background vector N(0, 0.01^2) ('small') or of norm ~1 like a
                              # CLIP text feature ('unit'; the release's is a CLIP-encoded
                              # token, whose raw norm enters its dot-product P-CAS)
  c.dot_text_norm = True      # train_similarity='dot': class vectors L2-normalised (ours)
                              # or raw (the code)
  c.kd_form = "mean_log"      # Eq. 12: mean of -log((cos + 1) / 2) ('mean_log', the paper)
                              # or -log of the batch mean of (cos + 1) / 2 ('log_mean', code)
  c.intra_form = "mean_log"   # Eq. 17: mean over pairs of the pair losses ('mean_log') or
                              # the code's -log(sim+) - log(1 - sim-) with sim = the mean
                              # over pairs of 1 / (1 + KL), KL one-directional, symmetrised
                              # on the similarities ('log_mean')
  c.inter_form = "paper"      # Eq. 18-19: normalised mixture weights, symmetric D, one BCE
                              # mean ('paper') or the code's raw attention weights / T, one-
                              # directional KL, same- and different-label means apart ('code')
  c.ortho_form = "squared"    # Eq. 11: ||X X^T - I||_F^2 over the C classes ('squared') or
                              # the code's ||X sg(X)^T - I||_F over C + background ('code')
  # Snippet mining (Eq. 13-15; CoLA's numbers).
  c.theta_b = -1.0            # < 0: per-video median of a
  c.erosion_m = 3
  c.erosion_M = 6
  c.k_easy = 20
  c.k_hard = 5
  c.easy_drop = 0.6
  return c


def validate_config(cfg) -> None:
  def bad(field, why):
    raise WstalError(f"config.pvlr.{field}={cfg.get(field)!r}: {why}")
  if cfg.metric not in METRICS:
    bad("metric", f"must be one of {METRICS}")
  for field, choices in (("logit_scale", ("fixed", "learnable")),
                         ("var_param", ("relu", "softplus", "code")),
                         ("divergence_scale", ("sum", "mean")),
                         ("train_similarity", ("cosine", "dot")),
                         ("kd_form", ("mean_log", "log_mean")),
                         ("intra_form", ("mean_log", "log_mean")),
                         ("inter_form", ("paper", "code")),
                         ("ortho_form", ("squared", "code")),
                         ("adapter_init", ("flax", "torch")),
                         ("background_init", ("small", "unit"))):
    if cfg[field] not in choices:
      bad(field, f"must be one of {choices}")
  if not cfg.var_init > 0:
    bad("var_init", "must be > 0")
  if cfg.train_similarity == "dot" and cfg.logit_scale == "learnable":
    bad("logit_scale", "a learnable P-CAS scale gets no gradient from the dot-product "
        "training P-CAS (train_similarity='dot'); use logit_scale='fixed'")
  if cfg.metric != "kl" and (cfg.intra_form == "log_mean" or cfg.inter_form == "code"):
    bad("metric", "the released code's L_intra / L_inter forms (intra_form='log_mean', "
        "inter_form='code') use the one-directional KL; use metric='kl' with them")
  if cfg.text_mode not in ("auto",) + class_text.TEXT_MODES:
    bad("text_mode", f"must be 'auto' or one of {class_text.TEXT_MODES}")
  if int(cfg.num_samples) < 0:
    bad("num_samples", "must be >= 0")
  if cfg.temperature <= 0:
    bad("temperature", "must be > 0")
  if not 1 <= int(cfg.erosion_m) < int(cfg.erosion_M):
    bad("erosion_m", f"need 1 <= erosion_m < erosion_M={cfg.erosion_M}")
  for field in ("k_easy", "k_hard"):
    if int(cfg[field]) < 1:
      bad(field, "must be >= 1")
  if not 0.0 <= cfg.easy_drop < 1.0:
    bad("easy_drop", "must be in [0, 1)")
  if cfg.theta_b > 1.0:
    bad("theta_b", "must be < 0 (median) or in [0, 1]")
  for field in ("w_kd", "w_ortho", "w_intra", "w_inter", "var_floor"):
    if cfg[field] < 0:
      bad(field, "must be >= 0")


# ------------------------------------------------------------------------------------------
# Gaussian divergences (diagonal covariances; [..., E] -> [...]).


def kl_gauss(mu_p, var_p, mu_q, var_q):
  """KL(N_p || N_q) of Eq. 16 for diagonal covariances."""
  d = mu_q - mu_p
  return 0.5 * jnp.sum(var_p / var_q + d * d / var_q - 1.0 + jnp.log(var_q) - jnp.log(var_p),
                       axis=-1)


def divergence(mu_p, var_p, mu_q, var_q, metric: str, scale: str = "sum"):
  """Symmetric divergence D >= 0 between diagonal Gaussians (module docstring); scale='mean'
  divides it by the dimension E (a per-dimension divergence)."""
  d = _divergence(mu_p, var_p, mu_q, var_q, metric)
  return d / mu_p.shape[-1] if scale == "mean" else d


def _divergence(mu_p, var_p, mu_q, var_q, metric: str):
  if metric == "kl":
    return 0.5 * (kl_gauss(mu_p, var_p, mu_q, var_q) + kl_gauss(mu_q, var_q, mu_p, var_p))
  d = mu_p - mu_q
  avg = 0.5 * (var_p + var_q)
  if metric == "bhattacharyya":
    return jnp.sum(0.125 * d * d / avg + 0.5 * (jnp.log(avg) - 0.5 * (jnp.log(var_p)
                                                                    + jnp.log(var_q))), axis=-1)
  if metric == "mahalanobis":
    return jnp.sum(d * d / avg, axis=-1)
  raise WstalError(f"unknown metric {metric!r}; choose one of {METRICS}")


# ------------------------------------------------------------------------------------------
# Snippet mining (Eq. 13-15).


def _window_reduce(b_BxT, width: int, op, reflect: bool):
  """op (min: erosion, max: dilation) over a window of `width` snippets with scipy.ndimage's
  origin: erosion reads offsets -width//2 .. width - 1 - width//2, dilation the reflected
  window; zero border."""
  lo = width // 2
  hi = width - 1 - lo
  if reflect:
    lo, hi = hi, lo
  padded = jnp.pad(b_BxT, ((0, 0), (lo, hi)))
  num_t = b_BxT.shape[1]
  stack = jnp.stack([padded[:, i:i + num_t] for i in range(width)], axis=0)
  return op(stack, axis=0)


def erode(b_BxT, width: int):
  return _window_reduce(b_BxT, width, jnp.min, reflect=False)


def dilate(b_BxT, width: int):
  return _window_reduce(b_BxT, width, jnp.max, reflect=True)


def masked_median(x_BxT, mask_BxT):
  """Per-video median over valid snippets (numpy's: the mean of the two middle values)."""
  valid = mask_BxT > 0
  n_B = jnp.sum(valid, axis=1)
  s = jnp.sort(jnp.where(valid, x_BxT, jnp.inf), axis=1)
  lo = jnp.take_along_axis(s, jnp.maximum((n_B - 1) // 2, 0)[:, None], axis=1)[:, 0]
  hi = jnp.take_along_axis(s, jnp.maximum(n_B // 2, 0)[:, None], axis=1)[:, 0]
  return jnp.where(n_B > 0, 0.5 * (lo + hi), 0.0)


def hard_regions(attn_BxT, mask_BxT, theta_b: float, m: int, big_m: int):
  """(R_inner, R_outer) boolean [B, T] of Eq. 14-15 (module docstring)."""
  valid = mask_BxT > 0
  thr_B = masked_median(attn_BxT, mask_BxT) if theta_b < 0 else jnp.full(
      attn_BxT.shape[:1], theta_b, attn_BxT.dtype)
  b = ((attn_BxT > thr_B[:, None]) & valid).astype(jnp.float32)
  inner = (erode(b, m) - erode(b, big_m)) > 0
  outer = (dilate(b, big_m) - dilate(b, m)) > 0
  return inner & valid, outer & valid


def top_picks(score_BxT, allowed_BxT, k: int):
  """Indices [B, k] of the k highest allowed scores and whether each pick is real."""
  k = min(k, score_BxT.shape[1])
  vals, idx = jax.lax.top_k(jnp.where(allowed_BxT, score_BxT, -jnp.inf), k)
  return idx, jnp.isfinite(vals)


def mine_snippets(attn_BxT, mask_BxT, rng, cfg):
  """Easy / hard action / background picks: {name: (idx_BxK, ok_BxK)}."""
  a = jax.lax.stop_gradient(attn_BxT)
  valid = mask_BxT > 0
  keep = jax.random.bernoulli(rng, 1.0 - cfg.easy_drop, a.shape) & valid
  a_max = jnp.max(jnp.where(valid, a, -jnp.inf), axis=1, keepdims=True)
  inner, outer = hard_regions(a, mask_BxT, cfg.theta_b, cfg.erosion_m, cfg.erosion_M)
  return {"easy_act": top_picks(a, keep, cfg.k_easy),
          "easy_bkg": top_picks(a_max - a, keep, cfg.k_easy),
          "hard_act": top_picks(a, inner, cfg.k_hard),
          "hard_bkg": top_picks(a, outer, cfg.k_hard)}


# ------------------------------------------------------------------------------------------
# Loss terms.


def _gather(x_BxTxE, idx_BxK):
  return jnp.take_along_axis(x_BxTxE, idx_BxK[:, :, None], axis=1)


def _pair_loss(q, k, mu, var, metric, positive: bool, scale: str = "sum"):
  """Mean over real (query, key) pairs of Eq. 17 per video -> (l_B, has_pairs_B)."""
  (qi, qok), (ki, kok) = q, k
  mq, vq = _gather(mu, qi), _gather(var, qi)
  mk, vk = _gather(mu, ki), _gather(var, ki)
  d_BxQxK = divergence(mq[:, :, None], vq[:, :, None], mk[:, None], vk[:, None], metric,
                       scale)
  if positive:
    l = jnp.log1p(d_BxQxK)                                     # -log(1 - p), p = D / (1 + D)
  else:
    l = jnp.log1p(d_BxQxK) - jnp.log(jnp.maximum(d_BxQxK, 1e-12))  # -log p
  w = (qok[:, :, None] & kok[:, None, :]).astype(l.dtype)
  n = jnp.sum(w, axis=(1, 2))
  return jnp.sum(l * w, axis=(1, 2)) / jnp.maximum(n, 1.0), n > 0


def intra_loss(mu_BxTxE, var_BxTxE, picks, metric: str, scale: str = "sum"):
  """L_intra per video (Eq. 17): hard action / background queries against easy keys."""
  total = 0.0
  for hard, pos, neg in (("hard_act", "easy_act", "easy_bkg"),
                         ("hard_bkg", "easy_bkg", "easy_act")):
    lp, okp = _pair_loss(picks[hard], picks[pos], mu_BxTxE, var_BxTxE, metric, True, scale)
    ln, okn = _pair_loss(picks[hard], picks[neg], mu_BxTxE, var_BxTxE, metric, False, scale)
    total = total + jnp.where(okp, lp, 0.0) + jnp.where(okn, ln, 0.0)
  return total


def _mean_similarity(q, k, mu, var, scale: str):
  """The released code's symmetrised similarity per video: the mean over real (query, key)
  pairs of 1 / (1 + KL(q || k)) and of 1 / (1 + KL(k || q)), averaged (each KL
  one-directional): -> (sim_B, has_pairs_B)."""
  (qi, qok), (ki, kok) = q, k
  mq, vq = _gather(mu, qi)[:, :, None], _gather(var, qi)[:, :, None]
  mk, vk = _gather(mu, ki)[:, None], _gather(var, ki)[:, None]
  per = mu.shape[-1] if scale == "mean" else 1.0
  p = 0.5 * (1.0 / (1.0 + kl_gauss(mq, vq, mk, vk) / per)
             + 1.0 / (1.0 + kl_gauss(mk, vk, mq, vq) / per))
  w = (qok[:, :, None] & kok[:, None, :]).astype(mu.dtype)
  n = jnp.sum(w, axis=(1, 2))
  return jnp.sum(w * p, axis=(1, 2)) / jnp.maximum(n, 1.0), n > 0


def intra_loss_code(mu_BxTxE, var_BxTxE, picks, scale: str = "sum"):
  """L_intra as the released code computes it, per video: for each query (hard action vs easy
  action / easy background; hard background vs easy background / easy action),
  sim = (mean p(KL(h||e)) + mean p(KL(e||h))) / 2 with p = 1 / (1 + KL), and the loss
  -log(sim+) - log(1 - sim-) (the log of averaged similarities)."""
  total = 0.0
  for hard, pos, neg in (("hard_act", "easy_act", "easy_bkg"),
                         ("hard_bkg", "easy_bkg", "easy_act")):
    sp, okp = _mean_similarity(picks[hard], picks[pos], mu_BxTxE, var_BxTxE, scale)
    sn, okn = _mean_similarity(picks[hard], picks[neg], mu_BxTxE, var_BxTxE, scale)
    sp, sn = jnp.clip(sp, 1e-6, 1.0 - 1e-6), jnp.clip(sn, 1e-6, 1.0 - 1e-6)
    total = total + jnp.where(okp, -jnp.log(sp), 0.0) + jnp.where(okn, -jnp.log1p(-sn), 0.0)
  return total


def inter_loss_code(attn_BxT, mu_BxTxE, var_BxTxE, mask_BxT, label_BxC, valid_B,
                    var_floor: float, scale: str = "sum"):
  """L_inter as the released code computes it (scalar): raw attention weights averaged over
  the valid snippets (mean a mu, mean a (mu^2 + var) - mean^2), p_ij = 1 / (1 + KL(N_i||N_j))
  over all pairs of valid videos (the diagonal included), and the mean of -log p over
  same-label pairs plus the mean of -log(1 - p) over different-label pairs."""
  mean, var = video_gaussians(attn_BxT, mu_BxTxE, var_BxTxE, mask_BxT, normalise=False)
  var = var + var_floor
  kl = kl_gauss(mean[:, None], var[:, None], mean[None], var[None])
  if scale == "mean":
    kl = kl / mu_BxTxE.shape[-1]
  p = jnp.clip(1.0 / (1.0 + kl), 1e-6, 1.0 - 1e-6)
  h = (label_BxC @ label_BxC.T > 0).astype(p.dtype)
  pair = valid_B[:, None] * valid_B[None, :]
  same, diff = h * pair, (1.0 - h) * pair
  return (jnp.sum(-jnp.log(p) * same) / jnp.maximum(jnp.sum(same), 1.0)
          + jnp.sum(-jnp.log1p(-p) * diff) / jnp.maximum(jnp.sum(diff), 1.0))


def video_gaussians(attn_BxT, mu_BxTxE, var_BxTxE, mask_BxT, normalise: bool = True):
  """Moment-matched Gaussian of each video's attention-weighted GMM (Eq. 18): (mu, var).

  normalise: mixture weights a / sum(a) over the valid snippets (Eq. 18), or the released
  code's raw weights a / n_valid (they need not sum to 1)."""
  m = (mask_BxT > 0).astype(mu_BxTxE.dtype)
  w = attn_BxT * m
  w = w / jnp.maximum(jnp.sum(w if normalise else m, axis=1, keepdims=True),
                      1e-8 if normalise else 1.0)
  mean = jnp.einsum("bt,bte->be", w, mu_BxTxE)
  second = jnp.einsum("bt,bte->be", w, var_BxTxE + mu_BxTxE * mu_BxTxE)
  return mean, jnp.maximum(second - mean * mean, 0.0)


def inter_loss(attn_BxT, mu_BxTxE, var_BxTxE, mask_BxT, label_BxC, valid_B, metric: str,
               var_floor: float, scale: str = "sum"):
  """L_inter (Eq. 19): mean BCE(H, 1 / (1 + D)) over the pairs of valid videos (scalar)."""
  mean, var = video_gaussians(attn_BxT, mu_BxTxE, var_BxTxE, mask_BxT)
  var = var + var_floor
  d_BxB = divergence(mean[:, None], var[:, None], mean[None], var[None], metric, scale)
  p = jnp.clip(1.0 / (1.0 + d_BxB), 1e-6, 1.0 - 1e-6)
  h = (label_BxC @ label_BxC.T > 0).astype(p.dtype)
  bce = -(h * jnp.log(p) + (1.0 - h) * jnp.log1p(-p))
  w = valid_B[:, None] * valid_B[None, :]
  return jnp.sum(bce * w) / jnp.maximum(jnp.sum(w), 1.0)


def distill_loss(mu_BxTxE, clip_BxTxE, mask_BxT):
  """L_kd per video (Eq. 12): mean over valid snippets of -log((cos(g_mu, x^i) + 1) / 2)."""
  m = (mask_BxT > 0).astype(mu_BxTxE.dtype)
  cos = jnp.sum(l2_normalize(mu_BxTxE) * l2_normalize(clip_BxTxE), axis=-1)
  l = -jnp.log(jnp.maximum((cos + 1.0) / 2.0, 1e-6))
  return jnp.sum(l * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def distill_loss_code(mu_BxTxE, clip_BxTxE, mask_BxT):
  """L_kd as the released code computes it (scalar): -log of the mean over the batch's valid
  snippets of (cos(g_mu, x^i) + 1) / 2 (the code's mean also counts padding; ours does not)."""
  m = (mask_BxT > 0).astype(mu_BxTxE.dtype)
  cos = jnp.sum(l2_normalize(mu_BxTxE) * l2_normalize(clip_BxTxE), axis=-1)
  mean = jnp.sum((cos + 1.0) / 2.0 * m) / jnp.maximum(jnp.sum(m), 1.0)
  return -jnp.log(jnp.maximum(mean, 1e-6))


def ortho_loss(text_CxE, form: str = "squared"):
  """L_ortho (Eq. 11) on the L2-normalised class embeddings: ||X X^T - I||_F^2.

  form='code' (the released code): ||X sg(X)^T - I||_F, not squared, one side detached; the
  caller passes the C classes + the background vector."""
  x = l2_normalize(text_CxE)
  if form == "code":
    g = x @ jax.lax.stop_gradient(x).T - jnp.eye(x.shape[0], dtype=x.dtype)
    return jnp.sqrt(jnp.sum(g * g) + 1e-12)
  g = x @ x.T - jnp.eye(x.shape[0], dtype=x.dtype)
  return jnp.sum(g * g)


def pvlr_loss(out, batch, rng, video_settings, cfg):
  """Eq. 20: -> (loss, terms)."""
  total, terms = co2net.video_loss(out, out["pcas_BxTxC1"], batch, video_settings)
  mask, valid = batch["mask_BxT"], batch["valid_B"]
  var = out["var_BxTxE"] + cfg.var_floor
  mu = out["mu_BxTxE"]
  if cfg.use_kd:
    if cfg.kd_form == "log_mean":
      terms["l_kd"] = distill_loss_code(mu, batch["vlm_BxTxE"], mask)
    else:
      terms["l_kd"] = video_mean(distill_loss(mu, batch["vlm_BxTxE"], mask), valid)
    total = total + cfg.w_kd * terms["l_kd"]
  if cfg.use_ortho:
    if cfg.ortho_form == "code":
      terms["l_ortho"] = ortho_loss(out["classes_C1xE"], "code")
    else:
      terms["l_ortho"] = ortho_loss(out["text_CxE"])
    total = total + cfg.w_ortho * terms["l_ortho"]
  if cfg.use_intra:
    picks = mine_snippets(out["attn_BxT"], mask, rng, cfg)
    if cfg.intra_form == "log_mean":
      l_intra_B = intra_loss_code(mu, var, picks, cfg.divergence_scale)
    else:
      l_intra_B = intra_loss(mu, var, picks, cfg.metric, cfg.divergence_scale)
    terms["l_intra"] = video_mean(l_intra_B, valid)
    total = total + cfg.w_intra * terms["l_intra"]
  if cfg.use_inter:
    if cfg.inter_form == "code":
      terms["l_inter"] = inter_loss_code(out["attn_BxT"], mu, out["var_BxTxE"], mask,
                                         batch["label_BxC"], valid, cfg.var_floor,
                                         cfg.divergence_scale)
    else:
      terms["l_inter"] = inter_loss(out["attn_BxT"], mu, out["var_BxTxE"], mask,
                                    batch["label_BxC"], valid, cfg.metric, cfg.var_floor,
                                    cfg.divergence_scale)
    total = total + cfg.w_inter * terms["l_inter"]
  # Statistics (not loss terms, not in loss_weights): the variances and the P-CAS scale.
  m = (mask > 0).astype(var.dtype)
  terms["stat_var_mean"] = jnp.sum(jnp.mean(out["var_BxTxE"], axis=-1) * m) / jnp.maximum(
      jnp.sum(m), 1.0)
  if "logit_scale" in out:
    terms["stat_logit_scale"] = out["logit_scale"]
  return total, terms


# ------------------------------------------------------------------------------------------
# The method object.


class PVLR:
  """PVLR (method 'pvlr'; config.co2net for the base, config.pvlr for the rest), a
  `methods.Method`."""
  postprocess_preset = "co2net"
  phase_starts = (0,)

  def __init__(self, config, num_classes: int, dims: dict, class_names=None):
    base = methods.config_block(config, "co2net", co2net.default_config)
    cfg = methods.config_block(config, "pvlr", default_config)
    co2net.validate_config(base)
    validate_config(cfg)
    self.base_cfg, self.cfg = base, cfg
    self.num_classes = int(num_classes)
    self.video_settings = co2net.VideoLossSettings.from_config(base)
    e_img = dims.get("vlm")
    if not e_img:
      raise WstalError("pvlr: needs CLIP image features per snippet (Eq. 12): set "
                       "config.data.vlm_feature to the dataset's CLIP feature (e.g. 'clip')")
    self.text = class_text.resolve("pvlr", cfg, class_names, num_classes, dims, ("text",))
    self.text_mode, self.class_texts = self.text.mode, self.text.names
    self._consts, clip_config, e_text = self.text.consts, self.text.clip_config, self.text.dim
    if e_text != e_img:
      raise WstalError(f"pvlr: class text embeddings are {e_text}-d but the CLIP image "
                       f"features ({config.data.vlm_feature}) are {e_img}-d; P-CAS (Eq. 10) "
                       "and L_kd (Eq. 12) compare them in one space")
    self.model = pvlr_model.PVLRModel(
        num_classes=self.num_classes, rgb_dim=co2net.rgb_dim_of(dims), embed_dim=int(e_img),
        attn_hidden=int(base.attn_hidden), dropout=float(base.dropout),
        num_samples=int(cfg.num_samples), eps_std=float(cfg.eps_std),
        temperature=float(cfg.temperature), text_mode=self.text_mode, clip_config=clip_config,
        n_pre=int(cfg.n_ctx_pre), n_post=int(cfg.n_ctx_post), var_param=str(cfg.var_param),
        var_init=float(cfg.var_init), logit_scale=str(cfg.logit_scale),
        train_similarity=str(cfg.train_similarity), dot_divisor=float(cfg.dot_divisor),
        dot_text_norm=bool(cfg.dot_text_norm), adapter_init=str(cfg.adapter_init),
        background_init=str(cfg.background_init))

  def extra_consts(self):
    """Constants the method needs besides the dataset's (CLIP weights, class token ids)."""
    return dict(self._consts)

  def loss_weights(self):
    """Eq. 20: L_vid's terms + w_kd L_kd + w_ortho L_ortho + w_intra L_intra + w_inter L_inter."""
    cfg = self.cfg
    weights = co2net.video_loss_weights(self.video_settings)
    for term, on, w in (("l_kd", cfg.use_kd, cfg.w_kd), ("l_ortho", cfg.use_ortho, cfg.w_ortho),
                        ("l_intra", cfg.use_intra, cfg.w_intra),
                        ("l_inter", cfg.use_inter, cfg.w_inter)):
      if on:
        weights[term] = float(w)
    return weights

  def _variables(self, params, consts):
    return self.text.variables(params, consts)

  def init(self, rng, batch, consts):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, batch, consts,
                                train=False)
    # The frozen encoder lives in consts, not in params.
    return {"params": self.text.strip_frozen(dict(variables["params"]))}

  def loss(self, params, batch, consts, rng, step):
    del step
    drop_rng, sample_rng, mining_rng = jax.random.split(rng, 3)
    out = self.model.apply(self._variables(params, consts), batch, consts, train=True,
                           rngs={"dropout": drop_rng, "sample": sample_rng})
    return pvlr_loss(out, batch, mining_rng, self.video_settings, self.cfg)

  def predict(self, params, batch, consts):
    out = self.model.apply(self._variables(params, consts), batch, consts, train=False)
    return co2net.co2net_scores(out["pcas_BxTxC1"], out["attn_BxT"], batch["mask_BxT"],
                                int(self.base_cfg.eval_topk_divisor))

  def param_labels(self, params, step):
    del step
    return jax.tree.map(lambda _: "train", params)
