"""MLLM4WTAL (mllm4wtal.txt, CVPR 2025): key semantic matching, complete semantic
reconstruction and dual-prior interactive distillation on a WTAL base (DELU; CO2-Net).

Inputs: per training video a key and a complete description of its actions from a multimodal
LLM (offline) as word tokens, and GloVe word vectors (`data/descriptions.py`; the built-in
benchmark's are synthetic, `data/synthetic_descriptions.py`). No public code exists; every
reading below is ours, and a config field where the paper leaves a choice.

Paper map (config.mllm4wtal; params {'base', 'ksm', 'csr', 'loc'}):

  Eq. 2-3   F_e and A_KSM: the *base's* fused feature and attention (DELU / CO2-Net: two
            temporal convs on the fused RGB / flow features, sigmoid attention), so the KSM
            branch is plug-in on any base of that family (Table 4: `:base=co2net`) and
            "the WTAL model" the distillation reaches (Sec. 3.3) is the base itself.
  Eq. 4-5   T_query = [START, N_ctx learnable context tokens, GloVe(key description)] ->
            a Transformer encoder -> the START output -> a linear map to the video
            embedding's width: one query per class (`KSMText`). Descriptions are per video:
            the query of a class the video contains reads the video's own key description,
            the query of any other class reads that class's bank description (the key
            description of one training video of the class, `data/descriptions.py`); the
            encoder runs once per distinct text (C + B + 1 sequences a step). The (C+1)-th,
            background query: [START, context, one learnable token initialised at 0]
            ("initialised with 0").
  Eq. 6-9   M = <v_t, q_j> of the L2-normalised projected video feature and query times
            `ksm_scale` (an inner product of unit vectors: an unnormalised one saturates the
            softmax over classes at init); M_hat = A_KSM * M; s, s_hat = top-k means over
            time (k = n // base topk_divisor); p, p_hat = softmax over the C + 1 classes.
  Eq. 10    L_KSM = CE(p, y / |y|) + CE(p_hat, y_hat / |y_hat|), y with background 1,
            y_hat with background 0 (normalised like the MIL family's labels).
  Eq. 11-13 CSR's own embedding F_complete = FC(F) of the input features (width
            `csr_dim`, 512) and its own attention A_CSR = sigmoid(convs(F_complete)): Eq. 13
            writes F_e, KSM's embedding; we read it as CSR's, so the two branches share no
            parameter and each DPID phase trains only its own.
  Eq. 14    F_fg = softmax((F W_q)(F W_k)^T / sqrt(d) (*) A_CSR) F W_v, (*) the *key*
            snippet's A_CSR (padded keys excluded). How A_CSR enters (`csr_gate`): as
            printed it multiplies the logits ('logits'); we default to weighting the
            attention probabilities ('probs': softmax(q k^T / sqrt(d) + log A_CSR), so a key
            with A_CSR ~ 0 gets no weight). Why: with the printed form the reconstruction
            barely depends on A_CSR (it scales logits that are near 0 at init), and A_CSR is
            not "trained by CSR" (Sec. 3.3) at all. Measured on the built-in benchmark
            (benchmarks/grad_reach.py, seed 0): L_CSR's share of the gradient on A_CSR's
            parameters is 3 % at init and 0.0 % after training with 'logits' (the rest is
            the distillation towards A_KSM: A_CSR is a copy of A_KSM, the frame fg mIoU of
            the two agree to 0.3), 40 % and 81 % with 'probs'; avg mAP 40.5 +- 0.9 vs
            40.6 +- 0.5 (3 seeds, README).
  Eq. 15    H = softmax((F_c W_qd)(F_fg W_kd)^T / sqrt(d) * A_CSR) F_fg W_vd, F_c = FC(GloVe
            of the masked complete description) + a learnable [MASK] embedding at masked
            positions + position embeddings.
  Eq. 16-17 P(w_i) = softmax(FC(H_i)) over the dataset vocabulary; L_CSR = mean over the
            masked positions of -log P(w_i) (the masked words are what is reconstructed; an
            unmasked word is visible to its own query).
  masking   1/3 of each description's words (at least one), drawn without replacement
            with weights 1 + 2 max(0, max_c cos(word, class-name words of c)): "a high
            probability of masking action words". The draw uses the step's RNG
            (fold_in(seed key, step)): deterministic per (seed, step).
  Eq. 18    L_loc (the prior-guided localization head after PivoTAL, `LocHead`): per-snippet
            class logits and (start, end) distances from the base's fused feature (stopped
            gradient: the head learns from the base's prior, it does not reshape it).
            Pseudo-instances from the base (stopped gradient): a valid snippet is foreground
            of class c when A_KSM > `pseudo_threshold` and c is, among the video's labelled
            classes, the one of highest base CAS; runs of one class are instances.
            L_focal: sigmoid focal loss (alpha 0.25, gamma 2) over all (snippet, class),
            normalised by the number of foreground snippets; L_DIoU on the foreground
            snippets' predicted vs pseudo-instance extents; L_MIL: binary cross-entropy of
            the top-k mean class logits with the video labels.
  Eq. 19-20 DPID: L_match = L_base + w_ksm L_KSM + lambda1 MSE(A_KSM, sg(A_CSR)) + mu1 L_loc
            trains {base, ksm, loc}; L_rec = L_CSR + lambda2 MSE(A_CSR, sg(A_KSM)) trains
            {csr}. The total reported is L_match + L_rec: with disjoint parameters and psi =
            stop gradient, each group's gradient is exactly its own phase's loss's. How the
            phases alternate (the paper does not say at what granularity):
            `dpid_steps=0` (default): every step updates both groups, each with its own
            phase's loss (the KSM phase and the CSR phase of one iteration, the CSR phase
            reading A_KSM from before the KSM update); `dpid_steps=L`: the phases take turns
            of L steps (the trainer's 'train@i' labels: each group has its own Adam state,
            frozen while the other phase runs), so each side gets half the updates. Measured
            on the built-in benchmark: with turns of 1 step the base is updated 750 times in
            the 1500 steps DELU gets, and the full method trails DELU (README).
  Sec. 3.4  Inference runs the localization head (`inference='loc'`) on the base's trunk
            (its input), no text. What the head decides: where proposals are, through the
            actionness that is thresholded into them (below). What the base's classifier
            decides (the paper does not say how the head's outputs become proposals):
            which classes a video has (`loc_video_score='base'`; 'loc': the sigmoid of the
            head's top-k mean logits) and the CAS the proposals are scored on by OIC
            (`loc_cas='base'`; 'loc': the head's class probabilities). Measured on the
            built-in benchmark (seed 0, one checkpoint): head scores and head CAS 28.6 avg
            mAP (video accuracy 72.6 %, vs 80.7 % with the base's score); base score + head
            CAS 33.9; base score + base attention as actionness + head CAS 33.0; base
            score + base CAS + head actionness (the defaults) 37.3; the base's own
            inference 35.9. The head's boundaries help (mAP@0.7 14.6 vs 10.8), its focal
            class probabilities rank proposals worse than the base's CAS. The actionness
            thresholded into proposals is the regression vote: snippet tau's value is the
            largest foreground probability among the snippets whose predicted extent covers
            tau (so the regressed boundaries decide the proposals' extents), divided by its
            maximum over the video (the preset's thresholds 0.1 ... 0.9 are for a sequence
            spanning [0, 1]; focal-trained probabilities are small). `inference='base'`
            uses the base's own inference.

Ablations (config overrides): `use_ksm`, `use_csr` (Table 3), `ksm_text='class_name'`
(Table 5: the class name instead of the key description), `csr_text='template'` (Table 5:
"a video of the [CLS]" instead of the complete description), `:base=co2net` (Table 4).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections

from wstal_jax import methods
from wstal_jax.data import descriptions as desc
from wstal_jax.errors import WstalError
from wstal_jax.layers import (l2_normalize, masked_topk_mean, snippet_mean, topk_count,
                              video_mean)
from wstal_jax.methods import co2net
from wstal_jax.models.mllm4wtal import CSR, KSMText, LocHead

BASES = ("delu", "co2net")
KSM_TEXTS = ("key", "class_name")
CSR_TEXTS = ("complete", "template")
INFERENCES = ("loc", "base")
PSIS = ("soft", "binary")


def default_config() -> ml_collections.ConfigDict:
  """The `config.mllm4wtal` block (THUMOS14; Sec. 4 "Training Settings")."""
  c = ml_collections.ConfigDict()
  c.base = "delu"             # the WTAL base: 'delu' (Tables 1-3) | 'co2net' (Table 4)
  c.use_ksm = True
  c.use_csr = True
  c.use_loc = True            # the prior-guided localization head (Eq. 18, Sec. 3.4)
  c.inference = "loc"         # 'loc': the head alone (Sec. 3.4) | 'base'
  c.loc_cas = "base"          # the CAS the proposals are scored on (OIC): 'base' | 'loc'
  c.loc_video_score = "base"  # which classes a video has at inference: 'base' (the base's
                              # video score, as the base computes it) | 'loc' (the head's MIL)
  c.ksm_text = "key"          # 'key' description | 'class_name' (Table 5)
  c.csr_text = "complete"     # 'complete' description | 'template' (Table 5)
  c.w_ksm = 1.0               # L_KSM's weight in L_match (the paper: 1)
  c.lambda1 = 1.5             # MSE(A_KSM, sg(A_CSR)) in L_match
  c.lambda2 = 1.5             # MSE(A_CSR, sg(A_KSM)) in L_rec
  c.mu1 = 1.0                 # L_loc in L_match
  c.psi = "soft"              # psi of Eq. 19-20 (the paper leaves it undefined): 'soft': the
                              # other attention, gradient stopped; 'binary': 1[other >
                              # pseudo_threshold], gradient stopped (a pseudo-label target)
  c.dpid_steps = 0            # 0: each step updates both phases' parameters (each with its
                              # own phase's loss); L >= 1: phases take turns of L steps
  c.ksm_dim = 512             # width of the matching space (video projection, queries)
  c.ksm_scale = 10.0          # M = ksm_scale * cos(video, query)
  c.text_dim = 256            # KSM text Transformer width
  c.text_layers = 1
  c.text_heads = 4
  c.num_context = 8           # N_context learnable context tokens
  c.csr_dim = 512             # d_h (Eq. 14-15)
  c.csr_gate = "probs"        # Eq. 14-15: A_CSR weights the attention probabilities;
                              # 'logits': it multiplies the logits, as printed (docstring)
  c.mask_ratio = 1.0 / 3.0    # masked share of the complete description's words
  c.pseudo_threshold = 0.5    # A_KSM above this: a pseudo-instance snippet (Eq. 18)
  c.loc_hidden = 256
  c.focal_alpha = 0.25
  c.focal_gamma = 2.0
  c.dropout = 0.1             # in the text Transformer and CSR
  return c


def validate_config(cfg) -> None:
  def bad(field, why):
    raise WstalError(f"config.mllm4wtal.{field}={cfg.get(field)!r}: {why}")
  for field, choices in (("base", BASES), ("ksm_text", KSM_TEXTS), ("csr_text", CSR_TEXTS),
                         ("inference", INFERENCES), ("loc_video_score", ("base", "loc")),
                         ("loc_cas", ("base", "loc")), ("csr_gate", ("logits", "probs")),
                         ("psi", PSIS)):
    if cfg[field] not in choices:
      bad(field, f"choose one of {choices}")
  for field in ("ksm_dim", "text_dim", "text_layers", "text_heads", "csr_dim", "loc_hidden"):
    if int(cfg[field]) < 1:
      bad(field, "must be >= 1")
  for field in ("num_context", "dpid_steps"):
    if int(cfg[field]) < 0:
      bad(field, "must be >= 0")
  if int(cfg.text_dim) % int(cfg.text_heads):
    bad("text_heads", f"must divide text_dim={cfg.text_dim}")
  for field in ("w_ksm", "lambda1", "lambda2", "mu1", "ksm_scale", "focal_alpha",
                "focal_gamma"):
    if cfg[field] < 0:
      bad(field, "must be >= 0")
  if not 0.0 < cfg.mask_ratio <= 1.0:
    bad("mask_ratio", "must be in (0, 1]")
  if not 0.0 <= cfg.pseudo_threshold < 1.0:
    bad("pseudo_threshold", "must be in [0, 1)")
  if not 0.0 <= cfg.dropout < 1.0:
    bad("dropout", "must be in [0, 1)")
  if cfg.inference == "loc" and not cfg.use_loc:
    bad("inference", "'loc' needs use_loc=True")


# ------------------------------------------------------------------------------------------
# Pure terms.


def ksm_loss(sim_BxTxC1, attn_BxT, label_BxC, mask_BxT, k_B):
  """Eq. 6-10 per video: -> l_B."""
  s = masked_topk_mean(sim_BxTxC1, mask_BxT, k_B)
  s_hat = masked_topk_mean(attn_BxT[:, :, None] * sim_BxTxC1, mask_BxT, k_B)
  y = co2net.labels_with_background(label_BxC, 1.0)
  y_hat = co2net.labels_with_background(label_BxC, 0.0)
  return (-jnp.sum(y * jax.nn.log_softmax(s, -1), -1)
          - jnp.sum(y_hat * jax.nn.log_softmax(s_hat, -1), -1))


def mask_words(rng, tokens_BxL, weights_V, ratio: float):
  """Boolean [B, L]: round(ratio * n) (at least 1) of each row's n valid words,
  drawn without replacement with probabilities proportional to weights_V[token] (Gumbel
  top-k); deterministic in rng."""
  valid = tokens_BxL != desc.PAD
  n_B = jnp.sum(valid, axis=1)
  k_B = jnp.where(n_B > 0, jnp.maximum(jnp.round(ratio * n_B), 1), 0).astype(jnp.int32)
  gumbel = jax.random.gumbel(rng, tokens_BxL.shape)
  keys = jnp.where(valid, jnp.log(weights_V[tokens_BxL]) + gumbel, -jnp.inf)
  rank = jnp.argsort(jnp.argsort(-keys, axis=1), axis=1)
  return valid & (rank < k_B[:, None])


def action_word_weights(word_vectors_VxD, class_name_tokens_CxL):
  """1 + 2 max(0, max over class-name words of cos(word, class word)) per vocabulary word:
  words near the action names are masked more often."""
  unit = l2_normalize(word_vectors_VxD)
  names = unit[class_name_tokens_CxL.reshape(-1)]
  valid = (class_name_tokens_CxL.reshape(-1) != desc.PAD)[None, :]
  cos = jnp.where(valid, unit @ names.T, -1.0)
  w = 1.0 + 2.0 * jnp.maximum(jnp.max(cos, axis=1), 0.0)
  return w.at[desc.PAD].set(1.0).at[desc.MASK].set(1.0)


def csr_loss(logits_BxLxV, tokens_BxL, masked_BxL):
  """Eq. 17 per video: mean over the masked positions of -log P(word) -> l_B."""
  logp = jax.nn.log_softmax(logits_BxLxV, axis=-1)
  nll = -jnp.take_along_axis(logp, tokens_BxL[..., None], axis=-1)[..., 0]
  m = masked_BxL.astype(jnp.float32)
  return jnp.sum(nll * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)


def attention_mse(a_BxT, target_BxT, mask_BxT, psi: str = "soft", threshold: float = 0.5):
  """MSE(a, psi(target)) over valid snippets, per video (Eq. 19-20): -> l_B. psi='soft':
  sg(target); 'binary': sg(1[target > threshold])."""
  target = jax.lax.stop_gradient(target_BxT)
  if psi == "binary":
    target = (target > threshold).astype(a_BxT.dtype)
  return snippet_mean((a_BxT - target) ** 2, mask_BxT)


def pseudo_instances(attn_BxT, cas_BxTxC, label_BxC, mask_BxT, threshold: float):
  """(fg_BxT bool, class_BxT int32, start_BxT, end_BxT float32 snippets): the pseudo-instance
  each foreground snippet belongs to, [start, end) in snippet units (Eq. 18's prior)."""
  scores = jnp.where(label_BxC[:, None, :] > 0, cas_BxTxC, -jnp.inf)
  cls = jnp.argmax(scores, axis=-1).astype(jnp.int32)
  fg = (attn_BxT > threshold) & (mask_BxT > 0) & (jnp.sum(label_BxC, -1) > 0)[:, None]
  num_t = attn_BxT.shape[1]
  t = jnp.arange(num_t)[None, :]
  prev_fg = jnp.pad(fg, ((0, 0), (1, 0)))[:, :-1]
  prev_cls = jnp.pad(cls, ((0, 0), (1, 0)), constant_values=-1)[:, :-1]
  next_fg = jnp.pad(fg, ((0, 0), (0, 1)))[:, 1:]
  next_cls = jnp.pad(cls, ((0, 0), (0, 1)), constant_values=-1)[:, 1:]
  starts = fg & (~prev_fg | (prev_cls != cls))
  ends = fg & (~next_fg | (next_cls != cls))
  start = jax.lax.cummax(jnp.where(starts, t, -1), axis=1)
  end = jax.lax.cummin(jnp.where(ends, t, num_t), axis=1, reverse=True)
  return fg, cls, start.astype(jnp.float32), (end + 1).astype(jnp.float32)


def focal_loss(logits_BxTxC, target_BxTxC, mask_BxT, alpha: float, gamma: float):
  """Sigmoid focal loss summed over valid (snippet, class), per video: -> l_B."""
  p = jax.nn.sigmoid(logits_BxTxC)
  ce = (jnp.maximum(logits_BxTxC, 0) - logits_BxTxC * target_BxTxC
        + jnp.log1p(jnp.exp(-jnp.abs(logits_BxTxC))))
  p_t = p * target_BxTxC + (1 - p) * (1 - target_BxTxC)
  a_t = alpha * target_BxTxC + (1 - alpha) * (1 - target_BxTxC)
  loss = a_t * (1 - p_t) ** gamma * ce
  return jnp.sum(loss * (mask_BxT > 0)[..., None], axis=(1, 2))


def diou_loss(pred_lo, pred_hi, tgt_lo, tgt_hi):
  """1 - IoU + (centre distance / enclosing length)^2 of 1-D segments (elementwise)."""
  inter = jnp.maximum(jnp.minimum(pred_hi, tgt_hi) - jnp.maximum(pred_lo, tgt_lo), 0.0)
  union = (pred_hi - pred_lo) + (tgt_hi - tgt_lo) - inter
  iou = inter / jnp.maximum(union, 1e-6)
  enclose = jnp.maximum(pred_hi, tgt_hi) - jnp.minimum(pred_lo, tgt_lo)
  centre = 0.5 * (pred_lo + pred_hi) - 0.5 * (tgt_lo + tgt_hi)
  return 1.0 - iou + (centre / jnp.maximum(enclose, 1e-6)) ** 2


def loc_losses(logits_BxTxC, dist_BxTx2, pseudo, label_BxC, mask_BxT, k_B,
               alpha: float, gamma: float):
  """Eq. 18's three terms per video: (focal_B, diou_B, mil_B)."""
  fg, cls, start, end = pseudo
  num_c = logits_BxTxC.shape[-1]
  target = (fg[..., None] & (jax.nn.one_hot(cls, num_c) > 0)).astype(jnp.float32)
  num_fg = jnp.maximum(jnp.sum(fg, axis=1).astype(jnp.float32), 1.0)
  focal = focal_loss(logits_BxTxC, target, mask_BxT, alpha, gamma) / num_fg
  centre = jnp.arange(logits_BxTxC.shape[1], dtype=jnp.float32)[None, :] + 0.5
  d = diou_loss(centre - dist_BxTx2[..., 0], centre + dist_BxTx2[..., 1], start, end)
  diou = jnp.sum(jnp.where(fg, d, 0.0), axis=1) / num_fg
  video = masked_topk_mean(logits_BxTxC, mask_BxT, k_B)
  mil = jnp.mean(jnp.maximum(video, 0) - video * label_BxC
                 + jnp.log1p(jnp.exp(-jnp.abs(video))), axis=-1)
  return focal, diou, mil


def regression_vote(prob_BxT, dist_BxTx2, mask_BxT):
  """Actionness from the regressed extents: at snippet tau the largest prob_t among the valid
  snippets t whose predicted extent [t + 0.5 - d_s, t + 0.5 + d_e] covers tau + 0.5."""
  num_t = prob_BxT.shape[1]
  centre = jnp.arange(num_t, dtype=jnp.float32) + 0.5
  lo = centre[None, :] - dist_BxTx2[..., 0]
  hi = centre[None, :] + dist_BxTx2[..., 1]
  covers = ((lo[:, :, None] <= centre[None, None, :]) & (centre[None, None, :] <= hi[:, :, None])
            & (mask_BxT[:, :, None] > 0))                       # [B, t, tau]
  vote = jnp.max(jnp.where(covers, prob_BxT[:, :, None], 0.0), axis=1)
  return jnp.where(mask_BxT > 0, vote, 0.0)


# ------------------------------------------------------------------------------------------
# The method object.


class MLLM4WTAL:
  """MLLM4WTAL (method 'mllm4wtal'; config.mllm4wtal, the base's own block for the base), a
  `methods.Method`."""

  def __init__(self, config, num_classes: int, dims: dict, class_names=None):
    cfg = methods.config_block(config, "mllm4wtal", default_config)
    validate_config(cfg)
    self.m = cfg
    if "words" not in dims or "vocab" not in dims:
      raise WstalError("method 'mllm4wtal' needs video descriptions: set "
                       "config.data.descriptions=True (configs/mllm4wtal.py does) with a "
                       "dataset that has them (python -m wstal_jax.data.descriptions)")
    self.base = methods.method_class(cfg.base)(config, num_classes, dims, class_names)
    self.num_classes = int(num_classes)
    self.postprocess_preset = self.base.postprocess_preset
    self.phase_starts = (0,)
    self.alternate_steps = max(int(cfg.dpid_steps), 1)
    self.ksm_text = KSMText(int(cfg.text_dim), int(cfg.ksm_dim), int(cfg.text_layers),
                            int(cfg.text_heads), int(cfg.num_context), float(cfg.dropout))
    self.ksm_video = nn.Dense(int(cfg.ksm_dim))
    self.csr = CSR(int(cfg.csr_dim), int(dims["vocab"]), float(cfg.dropout), cfg.csr_gate)
    self.loc = LocHead(self.num_classes, int(cfg.loc_hidden))
    self.topk_divisor = int(self.base.cfg.topk_divisor)
    self.eval_topk_divisor = int(self.base.cfg.eval_topk_divisor)

  def extra_consts(self):
    return {}

  def loss_weights(self):
    m = self.m
    w = dict(self.base.loss_weights())
    if m.use_ksm:
      w["l_ksm"] = float(m.w_ksm)
    if m.use_csr:
      w["l_csr"] = 1.0
      w["l_distill_ksm"] = float(m.lambda1)
      w["l_distill_csr"] = float(m.lambda2)
    if m.use_loc:
      for k in ("l_focal", "l_diou", "l_loc_mil"):
        w[k] = float(m.mu1)
    return w

  # -- inputs

  def _query_tokens(self, batch, consts):
    """Token rows the text encoder reads, [N, L], and their background flags [N]: the C class
    rows (bank key descriptions, or class names), then (ksm_text='key') the B videos' own
    key descriptions, then the background row. Each (video, class) query is one of these
    rows (`_ksm_similarity`), so the encoder runs C + B + 1 sequences, not B (C + 1)."""
    per_class = consts["class_name_tokens_CxL" if self.m.ksm_text == "class_name"
                       else "class_key_tokens_CxL"]
    length = per_class.shape[1]
    rows = [per_class]
    if self.m.ksm_text == "key":
      own = batch["key_tokens_BxL"][:, :length]
      rows.append(jnp.pad(own, ((0, 0), (0, length - own.shape[1]))))
    rows.append(jnp.zeros((1, length), per_class.dtype))
    tokens = jnp.concatenate(rows, axis=0)
    background = jnp.zeros(tokens.shape[0], bool).at[-1].set(True)
    return tokens, background

  def _complete_tokens(self, batch, consts):
    if self.m.csr_text == "template":
      tmpl = consts["template_tokens_CxL"]
      first = jnp.argmax(batch["label_BxC"], axis=-1)
      return tmpl[first]
    return batch["complete_tokens_BxL"]

  def _dummy_batch(self, batch, consts):
    """Token fields for `init` when the batch is an evaluation batch (no descriptions)."""
    batch = dict(batch)
    b = batch["label_BxC"].shape[0]
    for field, const in (("key_tokens_BxL", "class_key_tokens_CxL"),
                         ("complete_tokens_BxL", "template_tokens_CxL")):
      if field not in batch:
        batch[field] = jnp.ones((b, consts[const].shape[1]), jnp.int32) * 2
    return batch

  # -- forward pieces

  def _ksm_similarity(self, params, feat_BxTxF, batch, consts, rng, train):
    """M of Eq. 6-9, [B, T, C + 1]: the query of class c for video b is the encoding of b's
    own key description when b contains c (ksm_text='key'), else of c's bank row."""
    tokens, background = self._query_tokens(batch, consts)
    rngs = {"dropout": rng} if train else {}
    rows = self.ksm_text.apply({"params": params["text"]}, tokens, consts["word_vectors_VxD"],
                               background, train, rngs=rngs)
    label = batch["label_BxC"]
    b, num_c = label.shape
    per_class = jnp.broadcast_to(rows[None, :num_c], (b, num_c, rows.shape[-1]))
    if self.m.ksm_text == "key":
      own = rows[num_c:num_c + b]
      per_class = jnp.where(label[:, :, None] > 0, own[:, None, :], per_class)
    queries = jnp.concatenate(
        [per_class, jnp.broadcast_to(rows[-1], (b, 1, rows.shape[-1]))], axis=1)
    video = self.ksm_video.apply({"params": params["video"]}, feat_BxTxF)
    sim = jnp.einsum("btd,bcd->btc", l2_normalize(video), l2_normalize(queries))
    return float(self.m.ksm_scale) * sim

  def init(self, rng, batch, consts):
    r_base, r_text, r_video, r_csr, r_loc, r_drop = jax.random.split(rng, 6)
    batch = self._dummy_batch(batch, consts)
    params = {"base": self.base.init(r_base, batch, consts)["params"]}
    out = self.base.forward(params["base"], batch, consts)
    feat = out["feat_BxTxF"]
    tokens, background = self._query_tokens(batch, consts)
    params["ksm"] = {
        "text": self.ksm_text.init({"params": r_text, "dropout": r_drop}, tokens,
                                   consts["word_vectors_VxD"], background, False)["params"],
        "video": self.ksm_video.init(r_video, feat)["params"]}
    comp = self._complete_tokens(batch, consts)
    params["csr"] = self.csr.init({"params": r_csr, "dropout": r_drop}, batch["feat_BxTxD"],
                                  batch["mask_BxT"], comp, comp == desc.PAD,
                                  consts["word_vectors_VxD"], False)["params"]
    params["loc"] = self.loc.init(r_loc, feat, batch["mask_BxT"])["params"]
    return {"params": params}

  def param_labels(self, params, step):
    del step
    if not self.m.use_csr or int(self.m.dpid_steps) == 0:
      return jax.tree.map(lambda _: "train", params)
    labels = {k: jax.tree.map(lambda _: "train@0", v) for k, v in params.items()}
    labels["csr"] = jax.tree.map(lambda _: "train@1", params["csr"])
    return labels

  def loss(self, params, batch, consts, rng, step):
    m = self.m
    r_base, r_ksm, r_csr, r_mask = jax.random.split(rng, 4)
    mask_BxT, valid_B, label = batch["mask_BxT"], batch["valid_B"], batch["label_BxC"]
    out = self.base.forward(params["base"], batch, consts, r_base)
    total, terms = self.base.loss_from_out(out, batch, step)
    a_ksm = out["attn_BxT"]
    k_B = topk_count(mask_BxT, self.topk_divisor)
    if m.use_ksm:
      sim = self._ksm_similarity(params["ksm"], out["feat_BxTxF"], batch, consts, r_ksm, True)
      terms["l_ksm"] = video_mean(ksm_loss(sim, a_ksm, label, mask_BxT, k_B), valid_B)
    if m.use_csr:
      tokens = self._complete_tokens(batch, consts)
      weights = action_word_weights(consts["word_vectors_VxD"],
                                    consts["class_name_tokens_CxL"])
      masked = mask_words(r_mask, tokens, weights, float(m.mask_ratio))
      a_csr, logits = self.csr.apply({"params": params["csr"]}, batch["feat_BxTxD"], mask_BxT,
                                     tokens, masked, consts["word_vectors_VxD"], True,
                                     rngs={"dropout": r_csr})
      terms["l_csr"] = video_mean(csr_loss(logits, tokens, masked), valid_B)
      psi, thr = str(m.psi), float(m.pseudo_threshold)
      terms["l_distill_ksm"] = video_mean(attention_mse(a_ksm, a_csr, mask_BxT, psi, thr),
                                          valid_B)
      terms["l_distill_csr"] = video_mean(attention_mse(a_csr, a_ksm, mask_BxT, psi, thr),
                                          valid_B)
    if m.use_loc:
      feat = jax.lax.stop_gradient(out["feat_BxTxF"])
      logits_loc, dist = self.loc.apply({"params": params["loc"]}, feat, mask_BxT)
      cas = jax.nn.softmax(jax.lax.stop_gradient(out["cas_BxTxC1"])[..., :-1], axis=-1)
      pseudo = pseudo_instances(jax.lax.stop_gradient(a_ksm), cas, label, mask_BxT,
                                float(m.pseudo_threshold))
      focal, diou, mil = loc_losses(logits_loc, dist, pseudo, label, mask_BxT, k_B,
                                    float(m.focal_alpha), float(m.focal_gamma))
      terms["l_focal"] = video_mean(focal, valid_B)
      terms["l_diou"] = video_mean(diou, valid_B)
      terms["l_loc_mil"] = video_mean(mil, valid_B)
    weights = self.loss_weights()
    extra = sum(weights[k] * terms[k] for k in weights if k not in self.base.loss_weights())
    return total + extra, terms

  def predict(self, params, batch, consts):
    out = self.base.forward(params["base"], batch, consts)
    pred = self._predict(params, out, batch)
    # Frame-level quality of the two priors (Sec. 3.3: KSM incomplete, CSR over-complete):
    # A_KSM and A_CSR as every class's frame score; the Evaluator restricts them to the
    # video's labelled classes and reports fg / bg mIoU at 0.5 (metrics.json: *_mIoU_ksm,
    # *_mIoU_csr).
    num_c = self.num_classes
    frames = {"ksm": out["attn_BxT"]}
    if self.m.use_csr:
      frames["csr"] = self.csr.apply({"params": params["csr"]}, batch["feat_BxTxD"],
                                     batch["mask_BxT"], None, None, None, False)
    for name, a_BxT in frames.items():
      pred[f"frame_{name}_BxTxC"] = jnp.broadcast_to(a_BxT[..., None], a_BxT.shape + (num_c,))
    return pred

  def _predict(self, params, out, batch):
    if self.m.inference == "base":
      return self.base.predict_from_out(out, batch)
    mask_BxT = batch["mask_BxT"]
    logits, dist = self.loc.apply({"params": params["loc"]}, out["feat_BxTxF"], mask_BxT)
    prob = jnp.where(mask_BxT[..., None] > 0, jax.nn.sigmoid(logits), 0.0)
    if self.m.loc_video_score == "loc":
      k_B = topk_count(mask_BxT, self.eval_topk_divisor)
      video = jax.nn.sigmoid(masked_topk_mean(logits, mask_BxT, k_B))
    else:
      video = self.base.predict_from_out(out, batch)["video_scores_BxC"]
    vote = regression_vote(jnp.max(prob, axis=-1), dist, mask_BxT)
    # Relative to the video's peak: focal-trained probabilities are small in absolute terms,
    # and the preset's thresholds (0.1 ... 0.9) are for a sequence that spans [0, 1].
    vote = vote / jnp.maximum(jnp.max(vote, axis=1, keepdims=True), 1e-6)
    cas = prob if self.m.loc_cas == "loc" else self.base.predict_from_out(out, batch)[
        "cas_BxTxC"]
    return {"video_scores_BxC": video, "cas_BxTxC": cas, "actionness_BxT": vote}
