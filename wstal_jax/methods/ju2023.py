"""Ju et al. 2023 (CVPR): distillation-collaboration of a CBP branch and a VLP branch.

Paper: ju2023_distill_vlp.txt. No public code exists; every reading below is ours. The method
object `Ju2023` wires `models.ju2023.Ju2023Model` to the pure losses of this file. Paper map:

  Eq. 1     L_cls: top-k MIL of the CBP frame logits                     `cls_loss`
  Eq. 2-3   F_vid, F_txt, P^vl = softmax_C(F_vid . F_txt^T)             models/ju2023.py
  Eq. 4     ternary pseudo-labels (delta_h = 0.3, delta_l = 0.1)        `ternarize`
  Eq. 5     L_all = L_kd + lambda L_fb (lambda = 0.05)                  `Ju2023.loss`
  Eq. 6     L_kd on confident frames, / O                                `kd_loss`
  Eq. 7     foreground-background contrast (tau = 0.07)                  `fb_loss`
  Sec. 3.3  warm-up, then alternating B / F steps                        `schedule`
  Sec. 3.4  inference from the CBP branch (the `ju2023` post-processing preset)

Schedule (Sec. 3.3), as trainer phases (each a fresh optimizer over the phase's trainable
scope, the other scope frozen): 'warmup' trains CBP with L_cls; 'B' freezes CBP, whose
ternary labels H^cb supervise VLP (L_kd + lambda L_fb on VLP's F_vid); 'F' freezes VLP, whose
labels H^vl supervise CBP (L_kd + lambda L_fb on CBP's frame features). The teacher's scores
come from a deterministic (dropout-free) forward pass with no gradient.

Readings (the paper does not say; each is a config field):
* L_cls in F steps (`cls_in_f_step`, default True): the paper's F-step loss is Eq. 5 only. We
  keep Eq. 1 on CBP in F steps: inference keeps the classes whose video probability (Eq. 1's
  pooled score) exceeds theta_cls = 0.85, and only L_cls calibrates that score; L_kd trains
  frames, not the pooled score. False is the literal reading.
* P^cb, CBP's "frame-level action probabilities", and Eq. 1 (`cbp_probs`). Eq. 1 reads
  y_hat_c = sigma(top-k mean of P^cb) with "the binary cross-entropy loss", though it prints
  only the -y_c log y_hat_c term. Default 'sigmoid': what is pooled are class logits A
  [T, C], P^cb = sigmoid(A) per frame and class, L_cls the binary cross-entropy of
  sigmoid(top-k mean of A) summed over the C classes (both terms: with the positive term
  alone every class would rise), the video score sigmoid(top-k mean). Trained with MIL, a
  frame's sigmoid rises only where the class evidence is (the top-k) and every class falls
  wherever it is absent from a video, so P^cb is high at discriminative frames and low
  elsewhere: the paper's "high true negatives, serious false negatives" (built-in, seed 0,
  400 warm-up steps, test: fg / bg mIoU 30.0 / 72.7). Options, each measured there: 'minmax'
  (A min-max normalised over the video per class: the normalised CAS WS-TAL thresholds; with
  delta_h = 0.3 it marks most of a labelled class's frames foreground, bg mIoU 11),
  'softmax' over the C classes (24.4 test, 0.0 on the train videos it teaches from),
  'softmax_bg' over C + 1 with a background column (BaS-Net's base branch; P^cb > 0.3 at
  nearly every frame), and 'co2net' (attention x softmax over C + 1, with cbp_arch='co2net').
* CBP attention span (`cbp_window`, default 4): the paper's CBP is "Transformer
  architectures" with sizes unstated. Global self-attention lets every frame see its whole
  video, and on the 200 training videos the warm-up memorises them: P^cb > delta_h at every
  frame of the labelled class on the train videos (bg mIoU 0.1 on train, 51.6 on test), so
  the CBP branch, which the paper makes the background teacher, has no background to teach.
  A local window (each snippet attends to t - 4 .. t + 4) keeps the Transformer blocks and
  ends that (train bg mIoU 70.4; test 72.7, avg mAP 14.3 vs 2.0). 0 restores global attention.
  The VLP branch's temporal layers keep global attention (`vlp_window` 0; 1 or 4 measured
  the same within 0.4 mAP).
* Which confident entries each step distils (`distill`, default 'directional'). Eq. 6
  distils every confident entry of the teacher's H; Sec. 3.3 says B steps distil the CBP
  branch's confident *background* and F steps the VLP branch's confident *foreground*. With
  'all' (Eq. 6 literally) on the built-in data the two branches amplify each other's false
  positives: F steps teach CBP the VLP branch's over-complete foreground, the next B step
  teaches it back, and the VLP background mIoU falls 57 -> 47 -> 22 -> 14 over three rounds
  (CBP's 73 -> 63; avg mAP 17.1 -> 14.7). 'directional' keeps, in B, H^cb's background
  entries (its foreground ones become uncertain) and, in F, H^vl's foreground entries (the
  labelled classes' background ones become uncertain; non-label classes stay 0 in both);
  Eq. 7 always uses the full ternary labels (it needs both sides). 'b_both' (B steps distil
  all of H^cb, Sec. 3.3's "two types of confident frames ... avoid trivial solutions"; F
  steps H^vl's foreground) measured worse (seeds 0-1: 14.9 +- 1.4 avg mAP vs 17.8 +- 1.1,
  both with the mean-over-anchors L_fb): after the first F step CBP's foreground is wider,
  and B steps teach it to the VLP branch (its bg mIoU falls to 21).
* B-step learning rate (`b_lr_scale`): B steps train the VLP branch at config.optim.lr x
  b_lr_scale. The built-in preset trains at 1e-3 (every method there) and sets 0.1, the
  paper's 1e-4 (Sec. 4.1), for B steps: at 1e-3 100 B steps with background-only targets
  collapse the VLP branch to near-uniform scores (fg mIoU 42 -> 6). The THUMOS14 /
  ActivityNet presets train at the paper's 1e-4 throughout (scale 1).
* Confident frames (Eq. 6): h is per (t, c); a frame is confident when its entry is not
  uncertain for every class of the video's label (non-label classes are always confident
  background). L_kd sums the Bernoulli KL(h || p) = BCE over the C classes of the confident
  frames of the batch and divides by their number O; uncertain frames get exactly zero
  gradient.
* L_fb (Eq. 7) is computed within each video: anchors i are the confident foreground (frame,
  class) pairs, positives the other foreground frames of that class in the video, negatives
  the video's confident background frames (background for every labelled class); f is the
  L2-normalised frame feature of the trained branch. Within-video keeps memory O(B T^2) (a
  batch-wide contrast is O(B^2 T^2): 16 x 1000 frames is 1 GB per similarity matrix) and
  contrasts an action with its own video's look-alike background, the case the paper
  motivates it with. Anchors without a positive are skipped. Reduction (`fb_reduce`):
  'video_sum' (default) is Eq. 7 as printed, the sum over a video's anchors, then the mean
  over the batch's videos (so lambda does not scale with the batch size; it does with the
  number of confident foreground frames per video, as in the paper). 'anchor_mean' (the
  mean over anchors, our first reading) left lambda L_fb inert: 0.2 % of the gradient norm
  in the full method (built-in, 3 seeds), against 7-11 % per B / F window with 'video_sum',
  at the same avg mAP within noise (17.5 +- 0.6 vs 17.8 +- 1.1).
* VLP logit scale (`vlp_logit_scale`, 100): CLIP's learned scale, fixed (only prompts and the
  temporal layers train, Sec. 3.2).
* The VLP temporal layers start as the identity (zero output projections), so the untrained
  branch is vanilla CLIP (Table 3's "VLP" and Table 4's "only F step" pseudo-labels).
* Table 4's fusion (`fusion`: 'cbp' | 'average' | 'weighted' | 'vlp'): the frame scores
  that inference thresholds, P^cb, (P^cb + P^vl) / 2, or w P^cb + (1 - w) P^vl with
  w = `fusion_weight` (0.7: the paper gives no weights; CBP sees optical flow, VLP does not).
  Video scores stay CBP's. 'vlp' localizes with P^vl alone (the VLP branch as a localizer:
  Table 3's VLP rows, zero-shot when the branch never trained), the classes still CBP's.

Inference (Sec. 3.4, the `ju2023` post-processing preset): classes whose video probability
(Eq. 1's pooled score: sigmoid per class by default, so both classes of a multi-label video
can pass; with the softmax readings at most one can) exceeds theta_cls = 0.85, else the
argmax; regions where the kept class's frame score exceeds theta_loc = 0.45; each scored by
its maximum frame score times the class's video probability (`score_mode='max_video'`: with
a min-max P^cb every video's top region has maximum 1, so the paper's "detection maximum"
alone cannot rank proposals across videos; a review measured a fallback class with video
score 0.4 tying a true one at 1.0); Gaussian soft-NMS.

With a CLIP checkpoint ('clip' text mode) the untrained VLP branch is CLIP with 32 random
N(0, 0.01) context vectors around each class name, not a hand-written zero-shot prompt; the
'vanilla VLP' of Table 3 / Table 4's only-F pseudo-labels is exactly CLIP's zero-shot only in
the 'precomputed' mode (the dataset's class text embeddings).

Cost: the trainer passes the phase index (`static_phase`), so a warm-up step runs the CBP
student only, a B step the CBP teacher and the VLP student, an F step the VLP teacher and the
CBP student (a `lax.switch` on the step is the fallback when no phase is given; inside the
jitted step on CPU it ran 2.4x slower than one traced kind).

Table 6 (`cbp_arch='co2net'`, `configs/ju2023.py:cbp=co2net`): CO2-Net (models/co2net.py,
configured by config.co2net) is the CBP branch; its own video losses (methods/co2net.py)
replace Eq. 1 in warm-up (and F steps, with cls_in_f_step), P^cb = its attention x the
softmax of its CAS over C + 1 (`cbp_probs='co2net'`), Eq. 7's f its fused features, and
the video score its own (softmax over C + 1 of the top-k of CAS x attention).

Frame-level pseudo-label quality (Table 3): `predict` also returns frame_cbp_BxTxC and
frame_vlp_BxTxC; the Evaluator turns every frame_<name>_BxTxC into fg_mIoU_<name> /
bg_mIoU_<name> (and mIoU_<name>, classes and background together) at `frame_threshold`
(delta_h) against the ground truth (metrics.FrameIoU).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.layers import l2_normalize, masked_topk_mean, temporal_minmax, topk_count
from wstal_jax.methods import co2net
from wstal_jax.models import class_text
from wstal_jax.models import ju2023 as ju_model

MODES = ("full", "cbp", "only_f", "only_b")
CBP_PROBS = ("minmax", "softmax", "softmax_bg", "sigmoid", "co2net")
CBP_ARCHS = ("transformer", "co2net")
FUSIONS = ("cbp", "average", "weighted", "vlp")
DISTILLS = ("directional", "all", "b_both")
KINDS = ("warmup", "B", "F")
FB_REDUCES = ("anchor_mean", "video_sum")


def default_config() -> ml_collections.ConfigDict:
  """The `config.ju2023` block (Sec. 4.1 where the paper gives a value)."""
  c = ml_collections.ConfigDict()
  c.mode = "full"              # 'full' (alternating B / F), 'cbp' (warm-up only, all steps),
                               # 'only_f' / 'only_b' (Table 4)
  # CBP branch (sizes not given: ~1.9 M parameters on 2048-d I3D, near CO2-Net's ~2.5 M)
  c.cbp_arch = "transformer"   # or 'co2net' (Table 6: CO2-Net, configured by config.co2net,
                               # as the CBP branch; needs cbp_probs='co2net')
  c.cbp_width = 256
  c.cbp_layers = 2              # 0: the conv embedding and the head only (no attention)
  c.cbp_heads = 4
  c.cbp_mlp_dim = 512
  c.cbp_dropout = 0.3
  c.cbp_window = 4             # attention span: 0 global, w > 0 snippets t - w .. t + w
                               # (docstring: global attention memorises the train videos)
  c.cbp_probs = "sigmoid"      # P^cb and Eq. 1: 'sigmoid' (binary CE) | 'minmax' |
                               # 'softmax' | 'softmax_bg' | 'co2net' (docstring)
  c.topk_divisor = 8           # Eq. 1: k = max(1, n // 8)
  # VLP branch (Sec. 4.1: 2-layer temporal Transformer, 16 + 16 prompts, N(0, 0.01))
  c.vlp_layers = 2
  c.vlp_heads = 8
  c.vlp_mlp_ratio = 2
  c.vlp_dropout = 0.1
  c.vlp_window = 0             # attention span of the temporal layers (0: global)
  c.vlp_logit_scale = 100.0
  c.text_mode = "auto"         # 'clip' with a checkpoint, else 'precomputed' (PVLR's fallback)
  c.clip_checkpoint = ml_collections.config_dict.placeholder(str)
  c.clip_bpe_vocab = ml_collections.config_dict.placeholder(str)
  c.class_names = ml_collections.config_dict.placeholder(str)
  c.n_ctx_pre = 16
  c.n_ctx_post = 16
  c.prompt_init_std = 0.01
  # Eq. 4-7 (Sec. 4.1)
  c.delta_h = 0.3
  c.delta_l = 0.1
  c.lam = 0.05                 # lambda of Eq. 5
  c.tau = 0.07                 # Eq. 7
  c.fb_reduce = "video_sum"    # Eq. 7 over anchors: 'video_sum' | 'anchor_mean' (docstring)
  c.distill = "directional"    # L_kd's targets: 'directional' (B: H^cb's background entries,
                               # F: H^vl's foreground entries) | 'all' (docstring)
  c.use_kd = True              # Table 5
  c.use_fb = True
  c.cls_in_f_step = True       # L_cls keeps training CBP in F steps (docstring)
  # Schedule (Sec. 3.3; lengths not given)
  c.warmup_steps = 400
  c.b_steps = 100
  c.f_steps = 100
  c.num_alternations = 3
  c.b_lr_scale = 1.0           # B steps train the VLP branch at config.optim.lr x this
  # Inference (Sec. 3.4; Table 4 fusion)
  c.fusion = "cbp"
  c.fusion_weight = 0.7
  c.eval_topk_divisor = 8
  return c


# What a config saved before each field existed did (methods.config_block): an older run
# directory evaluates as it trained.
LEGACY = {"cbp_arch": "transformer", "cbp_window": 0, "vlp_window": 0, "distill": "all",
          "b_lr_scale": 1.0, "fb_reduce": "anchor_mean"}


def validate_config(cfg) -> None:
  def bad(field, why):
    raise WstalError(f"config.ju2023.{field}={cfg.get(field)!r}: {why}")
  if cfg.mode not in MODES:
    bad("mode", f"choose one of {MODES}")
  if cfg.fb_reduce not in FB_REDUCES:
    bad("fb_reduce", f"choose one of {FB_REDUCES}")
  if cfg.distill not in DISTILLS:
    bad("distill", f"choose one of {DISTILLS}")
  if cfg.fusion not in FUSIONS:
    bad("fusion", f"choose one of {FUSIONS}")
  if cfg.cbp_probs not in CBP_PROBS:
    bad("cbp_probs", f"choose one of {CBP_PROBS}")
  if cfg.cbp_arch not in CBP_ARCHS:
    bad("cbp_arch", f"choose one of {CBP_ARCHS}")
  if (cfg.cbp_arch == "co2net") != (cfg.cbp_probs == "co2net"):
    bad("cbp_probs", "cbp_probs='co2net' (attention x softmax over C + 1) goes with "
        f"cbp_arch='co2net' and only with it (cbp_arch={cfg.cbp_arch!r})")
  for field in ("cbp_width", "cbp_heads", "cbp_mlp_dim", "topk_divisor",
                "vlp_heads", "vlp_mlp_ratio", "eval_topk_divisor", "warmup_steps"):
    if int(cfg[field]) < 1:
      bad(field, "must be >= 1")
  for field in ("cbp_layers", "cbp_window", "vlp_window", "vlp_layers", "n_ctx_pre",
                "n_ctx_post", "num_alternations", "b_steps", "f_steps"):
    if int(cfg[field]) < 0:
      bad(field, "must be >= 0")
  if int(cfg.cbp_width) % int(cfg.cbp_heads):
    bad("cbp_width", f"must be divisible by cbp_heads={cfg.cbp_heads}")
  if not 0.0 <= cfg.delta_l < cfg.delta_h <= 1.0:
    bad("delta_h", f"need 0 <= delta_l ({cfg.delta_l}) < delta_h <= 1")
  for field in ("cbp_dropout", "vlp_dropout"):
    if not 0.0 <= cfg[field] < 1.0:
      bad(field, "must be in [0, 1)")
  if cfg.tau <= 0 or cfg.vlp_logit_scale <= 0:
    bad("tau", "tau and vlp_logit_scale must be > 0")
  if not cfg.b_lr_scale > 0:
    bad("b_lr_scale", "must be > 0")
  if cfg.lam < 0:
    bad("lam", "must be >= 0")
  if not 0.0 <= cfg.fusion_weight <= 1.0:
    bad("fusion_weight", "must be in [0, 1]")
  if not (cfg.use_kd or cfg.use_fb):
    bad("use_kd", "use_kd and use_fb are both off: B / F steps would train nothing")
  if cfg.mode in ("full", "only_b") and int(cfg.b_steps) < 1:
    bad("b_steps", f"mode={cfg.mode!r} needs B steps")
  if cfg.mode in ("full", "only_f") and int(cfg.f_steps) < 1:
    bad("f_steps", f"mode={cfg.mode!r} needs F steps")
  if cfg.mode == "only_b" and cfg.fusion == "cbp":
    bad("fusion", "mode='only_b' trains only the VLP branch after warm-up: inference from "
        "CBP alone would be the warm-up's; use 'average' or 'weighted' (Table 4)")
  if cfg.mode in ("full",) and int(cfg.num_alternations) < 1:
    bad("num_alternations", "mode='full' needs at least one B / F alternation")


def schedule(cfg) -> list[tuple[int, str]]:
  """[(start step, kind)] of the phases (kind in KINDS), from the config block."""
  w, b, f = int(cfg.warmup_steps), int(cfg.b_steps), int(cfg.f_steps)
  if cfg.mode == "cbp":
    return [(0, "warmup")]
  if cfg.mode == "only_f":
    return [(0, "warmup"), (w, "F")]
  if cfg.mode == "only_b":
    return [(0, "warmup"), (w, "B")]
  out, step = [(0, "warmup")], w
  for _ in range(int(cfg.num_alternations)):
    out += [(step, "B"), (step + b, "F")]
    step += b + f
  return out


def schedule_length(cfg) -> int:
  """The steps the schedule needs (mode 'full': warm-up + alternations x (B + F))."""
  if cfg.mode == "full":
    return int(cfg.warmup_steps) + int(cfg.num_alternations) * (int(cfg.b_steps)
                                                                + int(cfg.f_steps))
  return int(cfg.warmup_steps) + (1 if cfg.mode != "cbp" else 0)


# ----------------------------------------------------------------------------- losses


def cbp_frame_probs(logits_BxTxK, mask_BxT, mode: str, attn_BxT=None):
  """P^cb [B, T, C] (`cbp_probs`, docstring): 'minmax' (the logits min-max normalised over
  each video's valid frames per class), 'softmax' (over C), 'softmax_bg' (over C + 1, the
  background column dropped)."""
  if mode == "minmax":
    return temporal_minmax(logits_BxTxK, mask_BxT)
  if mode == "softmax_bg":
    return jax.nn.softmax(logits_BxTxK, axis=-1)[..., :-1]
  if mode == "sigmoid":
    return jax.nn.sigmoid(logits_BxTxK)
  if mode == "co2net":
    return attn_BxT[:, :, None] * jax.nn.softmax(logits_BxTxK, axis=-1)[..., :-1]
  return jax.nn.softmax(logits_BxTxK, axis=-1)


def cls_loss(logits_BxTxK, label_BxC, mask_BxT, valid_B, k_B, background: bool,
             sigmoid: bool = False):
  """Eq. 1 (per batch): CE of softmax(top-k mean of the frame logits) with y / sum y; with
  the background column, over C + 1 with the background label 1; with `sigmoid`, the binary
  cross-entropy of sigmoid(top-k mean) summed over the C classes (docstring)."""
  if sigmoid:
    logits_BxC = masked_topk_mean(logits_BxTxK, mask_BxT, k_B)
    l_B = jnp.sum(optax.sigmoid_binary_cross_entropy(logits_BxC, label_BxC), axis=-1)
  elif background:
    l_B = co2net.mil_loss(logits_BxTxK, label_BxC, mask_BxT, k_B, 1.0)
  else:
    logits_BxC = masked_topk_mean(logits_BxTxK, mask_BxT, k_B)
    y_BxC = label_BxC / jnp.maximum(jnp.sum(label_BxC, -1, keepdims=True), 1e-6)
    l_B = -jnp.sum(y_BxC * jax.nn.log_softmax(logits_BxC, axis=-1), axis=-1)
  return jnp.sum(l_B * valid_B) / jnp.maximum(jnp.sum(valid_B), 1.0)


def ternarize(p_BxTxC, label_BxC, mask_BxT, delta_h: float, delta_l: float):
  """Eq. 4 -> int32 [B, T, C]: 1 (p > delta_h and c in the label), 0 (p < delta_l or c not in
  the label), -1 (otherwise, and every padded frame)."""
  in_label = label_BxC[:, None, :] > 0
  h = jnp.where(~in_label, 0, jnp.where(p_BxTxC > delta_h, 1,
                                        jnp.where(p_BxTxC < delta_l, 0, -1)))
  return jnp.where(mask_BxT[:, :, None] > 0, h, -1).astype(jnp.int32)


def directional_targets(h_BxTxC, label_BxC, keep: str):
  """Eq. 6's targets of one direction: keep='background' makes the labelled classes'
  foreground entries uncertain (B step: CBP teaches background), keep='foreground' their
  background entries (F step: VLP teaches foreground); non-label classes stay 0."""
  labelled = label_BxC[:, None, :] > 0
  drop = (h_BxTxC == 1) if keep == "background" else (h_BxTxC == 0) & labelled
  return jnp.where(drop, -1, h_BxTxC)


def confident_frames(h_BxTxC, label_BxC, mask_BxT):
  """[B, T] bool: valid frames whose entries are confident for every labelled class."""
  uncertain = jnp.any((h_BxTxC < 0) & (label_BxC[:, None, :] > 0), axis=-1)
  return (mask_BxT > 0) & ~uncertain


def softmax_log_probs(z_BxTxC):
  """(log p, log(1 - p)) of p = softmax(z) over the last axis, both from the logits: no
  clipping, so a saturated p (a confident VLP false positive at logit scale 100) keeps its
  gradient (log(1 - p_c) = logsumexp_{j != c} z_j - logsumexp z)."""
  num_c = z_BxTxC.shape[-1]
  lse = jax.nn.logsumexp(z_BxTxC, axis=-1, keepdims=True)
  others = jnp.where(jnp.eye(num_c, dtype=bool), -jnp.inf, z_BxTxC[..., None, :])
  return z_BxTxC - lse, jax.nn.logsumexp(others, axis=-1) - lse


def prob_log_probs(p_BxTxC, eps: float = 1e-6):
  """(log p, log(1 - p)) of probabilities given directly (P^cb 'minmax'), floored at eps."""
  return jnp.log(jnp.maximum(p_BxTxC, eps)), jnp.log(jnp.maximum(1.0 - p_BxTxC, eps))


def kd_loss(h_BxTxC, log_p, log_1mp, label_BxC, mask_BxT, valid_B, labelled_only: bool,
            per_entry: bool = False):
  """Eq. 6: sum over classes of KL(h || p) (Bernoulli; hard h: the BCE -h log p - (1 - h)
  log(1 - p)) over the confident frames of valid videos, / their number O -> (loss, O).

  per_entry (the 'directional' targets): a frame counts when any labelled class's entry is
  confident, and only the confident labelled entries (plus the non-label classes, target
  0) enter its sum: in a two-class video an F step then distils class A's foreground at a
  frame where class B's entry was made uncertain (frame-level confidence would drop it).

  labelled_only: sum over the video's labelled classes only (the min-max P^cb student of F
  steps: a min-max column always reaches 1 at its peak, so a target 0 for a class outside
  the label could only be met by raising that class's peak logit, against L_cls; a review
  measured 90 % of the F-step KD gradient going there)."""
  labelled = label_BxC[:, None, :] > 0
  if per_entry:
    frame_ok = jnp.any((h_BxTxC >= 0) & labelled, axis=-1)
    conf_BxT = frame_ok & (mask_BxT > 0) & (valid_B[:, None] > 0)
  else:
    conf_BxT = confident_frames(h_BxTxC, label_BxC, mask_BxT) & (valid_B[:, None] > 0)
  h = (h_BxTxC == 1).astype(log_p.dtype)
  bce_BxTxC = -(h * log_p + (1.0 - h) * log_1mp)
  if per_entry:
    bce_BxTxC = jnp.where(labelled & (h_BxTxC < 0), 0.0, bce_BxTxC)
  if labelled_only:
    bce_BxTxC = jnp.where(label_BxC[:, None, :] > 0, bce_BxTxC, 0.0)
  bce_BxT = jnp.sum(bce_BxTxC, axis=-1)
  count = jnp.sum(conf_BxT)
  return jnp.sum(jnp.where(conf_BxT, bce_BxT, 0.0)) / jnp.maximum(count, 1), count


def fb_loss(feat_BxTxF, h_BxTxC, label_BxC, mask_BxT, valid_B, tau: float,
            reduce: str = "anchor_mean"):
  """Eq. 7 within each video (docstring) -> (loss, number of anchors). reduce='anchor_mean':
  the mean over the batch's anchors; 'video_sum': Eq. 7's sum over each video's anchors, the
  mean over the valid videos."""
  valid_BxT = (mask_BxT > 0) & (valid_B[:, None] > 0)
  f = l2_normalize(feat_BxTxF)
  # exp((cos - 1) / tau) <= 1: the same ratios as exp(cos / tau), no overflow.
  e_BxTxT = jnp.exp((jnp.einsum("btf,bsf->bts", f, f) - 1.0) / tau)
  fg_BxTxC = ((h_BxTxC == 1) & valid_BxT[:, :, None]).astype(f.dtype)
  labelled = label_BxC[:, None, :] > 0
  bg_BxT = (valid_BxT & jnp.all((h_BxTxC == 0) | ~labelled, axis=-1)).astype(f.dtype)
  # The anchor is not its own positive: the diagonal is masked out (subtracting e_ii = 1
  # after the sum would cancel a small positive sum away in float32).
  num_t = e_BxTxT.shape[1]
  off_BxTxT = e_BxTxT * (1.0 - jnp.eye(num_t, dtype=f.dtype))[None]
  pos_BxTxC = jnp.einsum("bts,bsc->btc", off_BxTxT, fg_BxTxC)
  neg_BxT = jnp.einsum("bts,bs->bt", e_BxTxT, bg_BxT)
  n_pos_BxC = jnp.sum(fg_BxTxC, axis=1)
  anchor = (fg_BxTxC > 0) & (n_pos_BxC[:, None, :] >= 2)
  pos = jnp.maximum(pos_BxTxC, 1e-30)
  term = -(jnp.log(pos) - jnp.log(pos + neg_BxT[:, :, None]))
  count = jnp.sum(anchor)
  total = jnp.sum(jnp.where(anchor, term, 0.0))
  if reduce == "video_sum":
    return total / jnp.maximum(jnp.sum(valid_B > 0), 1), count
  return total / jnp.maximum(count, 1), count


# ----------------------------------------------------------------------------- method


class Ju2023:
  """Ju et al. 2023 on I3D (CBP) + CLIP (VLP) features (module docstring)."""
  postprocess_preset = "ju2023"

  def __init__(self, config, num_classes: int, dims: dict[str, int], class_names=None):
    cfg = methods.config_block(config, "ju2023", default_config, LEGACY)
    validate_config(cfg)
    self.cfg = cfg
    self.num_classes = int(num_classes)
    num_steps = int(config.train.num_steps) if "train" in config else None
    if num_steps is not None and num_steps < schedule_length(cfg):
      raise WstalError(
          f"config.train.num_steps={num_steps} is shorter than config.ju2023's schedule "
          f"({schedule_length(cfg)} steps: warmup_steps {cfg.warmup_steps} + "
          f"num_alternations {cfg.num_alternations} x (b_steps {cfg.b_steps} + f_steps "
          f"{cfg.f_steps}) for mode {cfg.mode!r})")
    e_img = dims.get("vlm")
    if not e_img:
      raise WstalError("ju2023: the VLP branch needs CLIP image features per snippet: set "
                       "config.data.vlm_feature to the dataset's CLIP feature (e.g. 'clip')")
    self.text = class_text.resolve("ju2023", cfg, class_names, num_classes, dims,
                                   ("vlp", "text"))
    if self.text.dim != e_img:
      raise WstalError(f"ju2023: class text embeddings are {self.text.dim}-d but the CLIP "
                       f"image features ({config.data.vlm_feature}) are {e_img}-d; Eq. 3 "
                       "compares them in one space")
    if int(e_img) % int(cfg.vlp_heads):
      raise WstalError(f"config.ju2023.vlp_heads={cfg.vlp_heads}: must divide the CLIP "
                       f"feature size {e_img}")
    self.phases = schedule(cfg)
    self.phase_starts = tuple(s for s, _ in self.phases)
    self.frame_threshold = float(cfg.delta_h)
    if cfg.cbp_arch == "co2net":
      co2 = methods.config_block(config, "co2net", co2net.default_config)
      co2net.validate_config(co2)
      self.co2net = co2net.VideoLossSettings.from_config(co2)
      self.co2net_eval_topk = int(co2.eval_topk_divisor)
      cbp_args = dict(rgb_dim=co2net.rgb_dim_of(dims), attn_hidden=int(co2.attn_hidden),
                      dropout=float(co2.dropout))
    else:
      self.co2net = None
      cbp_args = dict(width=int(cfg.cbp_width), num_layers=int(cfg.cbp_layers),
                      num_heads=int(cfg.cbp_heads), mlp_dim=int(cfg.cbp_mlp_dim),
                      dropout=float(cfg.cbp_dropout), window=int(cfg.cbp_window),
                      background=cfg.cbp_probs == "softmax_bg")
    self.model = ju_model.Ju2023Model(
        num_classes=self.num_classes, cbp_arch=str(cfg.cbp_arch), cbp_args=cbp_args,
        vlp_args=dict(num_layers=int(cfg.vlp_layers), num_heads=int(cfg.vlp_heads),
                 mlp_dim=int(cfg.vlp_mlp_ratio) * int(e_img), dropout=float(cfg.vlp_dropout),
                 logit_scale=float(cfg.vlp_logit_scale), text_mode=self.text.mode,
                 clip_config=self.text.clip_config, n_pre=int(cfg.n_ctx_pre),
                 n_post=int(cfg.n_ctx_post), prompt_init_std=float(cfg.prompt_init_std),
                 window=int(cfg.vlp_window)))

  # ------------------------------------------------------------------------ contract

  def extra_consts(self):
    return dict(self.text.consts)

  def init(self, rng, batch, consts):
    params_rng, dropout_rng = jax.random.split(rng)
    variables = self.model.init({"params": params_rng, "dropout": dropout_rng}, batch, consts,
                                train=False)
    return {"params": self.text.strip_frozen(dict(variables["params"]))}

  def apply(self, params, batch, consts, *, train: bool, rng=None, branch=None):
    """Both branches' outputs, or one branch's (`branch` 'cbp' | 'vlp')."""
    rngs = {"dropout": rng} if train else None
    method = {None: None, "cbp": "run_cbp", "vlp": "run_vlp"}[branch]
    return self.model.apply(self.text.variables(params, consts), batch, consts, train=train,
                            rngs=rngs, method=method)

  def param_labels(self, params, step: int):
    """The phase at `step` trains one scope: 'cbp' in warm-up and F steps, 'vlp' in B."""
    kind = self.kind_at(step)
    trained = "vlp" if kind == "B" else "cbp"
    return {scope: jax.tree.map(lambda _, s=scope: "train" if s == trained else "freeze", sub)
            for scope, sub in params.items()}

  def phase_lr_scale(self, start: int) -> float:
    """B steps: config.optim.lr x b_lr_scale (methods.Method)."""
    return float(self.cfg.b_lr_scale) if self.kind_at(start) == "B" else 1.0

  def kind_at(self, step: int) -> str:
    idx = int(np.searchsorted(np.asarray(self.phase_starts), int(step), side="right")) - 1
    return self.phases[idx][1]

  def loss_weights(self):
    """loss = l_cls + l_kd + lam * l_fb, each term already gated by the phase (so the
    weights are constant and the trainer's shares read the phase's terms)."""
    weights = ({"l_cls": 1.0} if self.co2net is None
               else co2net.video_loss_weights(self.co2net))
    if self.cfg.use_kd:
      weights["l_kd"] = 1.0
    if self.cfg.use_fb:
      weights["l_fb"] = float(self.cfg.lam)
    return weights

  static_phase = True   # the trainer passes the phase index (methods.Method)

  def loss(self, params, batch, consts, rng, step, phase=None):
    """One function per phase kind, each computing only the forwards it needs (warm-up: the
    CBP student; B: the CBP teacher and the VLP student; F: the VLP teacher and the CBP
    student) and returning every term (zero where the phase has none), so the trainer's
    term shares read the phase's terms. The trainer passes `phase` (its index, a Python
    int: the kind is chosen at trace time); without it a `lax.switch` on `step` selects
    (measured: the switch inside the jitted step ran 2.4x slower on CPU than one kind)."""
    cfg = self.cfg
    mask_BxT, label_BxC, valid_B = batch["mask_BxT"], batch["label_BxC"], batch["valid_B"]
    starts = jnp.asarray(self.phase_starts, jnp.int32)
    kinds = jnp.asarray([KINDS.index(k) for _, k in self.phases], jnp.int32)
    kind = kinds[jnp.sum(starts <= step) - 1]
    k_B = topk_count(mask_BxT, int(cfg.topk_divisor))
    probs = str(cfg.cbp_probs)
    zero = jnp.zeros((), jnp.float32)
    n_valid = jnp.maximum(jnp.sum(mask_BxT * valid_B[:, None]), 1.0)

    def student(branch):
      return self.apply(params, batch, consts, train=True, rng=rng, branch=branch)

    def teacher(branch):
      return jax.lax.stop_gradient(self.apply(params, batch, consts, train=False,
                                              branch=branch))

    def cls_terms(out):
      """Eq. 1 ({'l_cls'}), or with cbp_arch='co2net' CO2-Net's own video losses."""
      if self.co2net is not None:
        return co2net.video_loss(out, out["cas_BxTxC1"], batch, self.co2net)[1]
      return {"l_cls": cls_loss(out["cbp_logits_BxTxK"], label_BxC, mask_BxT, valid_B, k_B,
                                probs == "softmax_bg", sigmoid=probs == "sigmoid")}

    def no_cls():
      return {k: zero for k in self.loss_weights() if k not in ("l_kd", "l_fb")}

    def frame_probs(out):
      return cbp_frame_probs(out["cbp_logits_BxTxK"], mask_BxT, probs, out.get("attn_BxT"))

    def terms(cls, kd=zero, fb=zero, h=None, num_conf=zero, anchors=zero):
      aux = dict(cls)
      if cfg.use_kd:
        aux["l_kd"] = kd
      if cfg.use_fb:
        aux["l_fb"] = fb
        aux["stat_anchors"] = jnp.asarray(anchors, jnp.float32)
      fg = zero if h is None else jnp.sum((h == 1) & (label_BxC[:, None, :] > 0))
      aux["stat_confident"] = num_conf / n_valid      # share of frames supervised
      aux["stat_fg"] = fg / n_valid                   # foreground (frame, class) pairs
      return aux

    def distill(h, log_probs, feat, labelled_only, keep):
      directional = (cfg.distill == "directional"
                     or (cfg.distill == "b_both" and keep == "foreground"))
      h_kd = directional_targets(h, label_BxC, keep) if directional else h
      kd, num_conf = kd_loss(h_kd, *log_probs, label_BxC, mask_BxT, valid_B, labelled_only,
                             per_entry=directional)
      fb, anchors = (fb_loss(feat, h, label_BxC, mask_BxT, valid_B, cfg.tau, cfg.fb_reduce)
                     if cfg.use_fb else (zero, jnp.zeros((), jnp.int32)))
      return kd, fb, num_conf, anchors

    def warmup():
      return terms(cls_terms(student("cbp")))

    def b_step():
      # CBP (frozen teacher) -> VLP: its softmax over all classes (pushing a non-label
      # class down is what the softmax can do), Eq. 7 on F_vid.
      h = ternarize(frame_probs(teacher("cbp")), label_BxC, mask_BxT, cfg.delta_h,
                    cfg.delta_l)
      out = student("vlp")
      kd, fb, num_conf, anchors = distill(h, softmax_log_probs(out["vlp_logits_BxTxC"]),
                                          out["vlp_emb_BxTxE"], False, "background")
      return terms(no_cls(), kd, fb, h, num_conf, anchors)

    def f_step():
      # VLP (frozen teacher) -> CBP: all classes for the softmax / sigmoid / co2net readings
      # of P^cb, the labelled ones for 'minmax' (kd_loss); Eq. 7 on the CBP frame features.
      p_vl = jax.nn.softmax(teacher("vlp")["vlp_logits_BxTxC"], axis=-1)
      h = ternarize(p_vl, label_BxC, mask_BxT, cfg.delta_h, cfg.delta_l)
      out = student("cbp")
      logits = out["cbp_logits_BxTxK"]
      if probs in ("minmax", "co2net"):
        logs = prob_log_probs(frame_probs(out))
      elif probs == "softmax_bg":
        lp, l1mp = softmax_log_probs(logits)
        logs = (lp[..., :-1], l1mp[..., :-1])
      elif probs == "sigmoid":
        logs = (jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits))
      else:
        logs = softmax_log_probs(logits)
      kd, fb, num_conf, anchors = distill(h, logs, out["cbp_emb_BxTxF"], probs == "minmax",
                                          "foreground")
      cls = cls_terms(out) if cfg.cls_in_f_step else no_cls()
      return terms(cls, kd, fb, h, num_conf, anchors)

    branches = {"warmup": warmup, "B": b_step, "F": f_step}
    used = sorted({k for _, k in self.phases}, key=KINDS.index)
    if phase is not None:
      aux = branches[self.phases[int(phase)][1]]()
    elif len(used) == 1:
      aux = branches[used[0]]()
    else:
      index = jnp.searchsorted(jnp.asarray([KINDS.index(k) for k in used]), kind)
      aux = jax.lax.switch(index, [branches[k] for k in used])
    aux["stat_phase"] = kind.astype(jnp.float32)
    total = sum(w * aux[k] for k, w in self.loss_weights().items())
    return total, aux

  def predict(self, params, batch, consts):
    """video_scores_BxC: CBP's softmax over C of the top-k mean of its class logits (Eq. 1
    at inference, k = n // eval_topk_divisor); cas_BxTxC: the frame scores inference
    thresholds (P^cb, or fused with P^vl per `fusion`); frame_cbp_BxTxC / frame_vlp_BxTxC:
    each branch's frame probabilities (Table 3's mIoU)."""
    cfg = self.cfg
    out = self.apply(params, batch, consts, train=False)
    mask_BxT = batch["mask_BxT"]
    valid = mask_BxT[:, :, None] > 0
    logits = out["cbp_logits_BxTxK"]
    if self.co2net is not None:   # CO2-Net's own video score (softmax over C + 1)
      video = co2net.co2net_scores(logits, out["attn_BxT"], mask_BxT,
                                   self.co2net_eval_topk)["video_scores_BxC"]
    else:
      class_logits = logits[..., :-1] if cfg.cbp_probs == "softmax_bg" else logits
      k_B = topk_count(mask_BxT, int(cfg.eval_topk_divisor))
      pooled = masked_topk_mean(class_logits, mask_BxT, k_B)
      video = (jax.nn.sigmoid(pooled) if cfg.cbp_probs == "sigmoid"
               else jax.nn.softmax(pooled, axis=-1))
    p_cb = cbp_frame_probs(logits, mask_BxT, str(cfg.cbp_probs), out.get("attn_BxT"))
    p_vl = jax.nn.softmax(out["vlp_logits_BxTxC"], axis=-1)
    if cfg.fusion == "average":
      cas = 0.5 * (p_cb + p_vl)
    elif cfg.fusion == "weighted":
      cas = cfg.fusion_weight * p_cb + (1.0 - cfg.fusion_weight) * p_vl
    elif cfg.fusion == "vlp":
      cas = p_vl
    else:
      cas = p_cb
    zero = lambda x: jnp.where(valid, x, 0.0)
    return {"video_scores_BxC": video, "cas_BxTxC": zero(cas),
            "frame_cbp_BxTxC": zero(p_cb), "frame_vlp_BxTxC": zero(p_vl)}
