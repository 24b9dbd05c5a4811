"""Ju et al. 2023 (methods/ju2023.py): Eq. 4 ternarisation, Eq. 6 / 7 losses against hand and
loop computations, the B / F freezing, padding invariance, and a tiny run through warm-up, B
and F with a resume in the middle of a B step."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from wstal_jax import methods
from wstal_jax import metrics as metrics_lib
from wstal_jax import train
from wstal_jax.errors import WstalError
from wstal_jax.methods import ju2023
from test_pvlr import _write_pvlr_dataset   # the tiny two-stream dataset (tests/ on sys.path)

C = 3
DIMS = {"feat": 8, "vlm": 8, "text": 8}


def make_config(**overrides):
  cfg = ml_collections.ConfigDict()
  cfg.method = "ju2023"
  block = ju2023.default_config()
  block.cbp_width, block.cbp_mlp_dim, block.cbp_heads = 16, 16, 2
  block.vlp_heads, block.vlp_mlp_ratio = 2, 1
  block.cbp_dropout = block.vlp_dropout = 0.0
  block.warmup_steps, block.b_steps, block.f_steps, block.num_alternations = 2, 2, 2, 1
  for k, v in overrides.items():
    block[k] = v
  cfg.ju2023 = block
  return cfg


def make_batch(n_valid=(12, 9), t=12, seed=0):
  rng = np.random.default_rng(seed)
  b = len(n_valid)
  mask = np.zeros((b, t), np.float32)
  for i, n in enumerate(n_valid):
    mask[i, :n] = 1
  label = np.zeros((b, C), np.float32)
  label[0, 0] = 1
  if b > 1:
    label[1, 1] = label[1, 2] = 1
  return {"feat_BxTxD": (rng.normal(size=(b, t, 8)) * mask[..., None]).astype(np.float32),
          "vlm_BxTxE": (rng.normal(size=(b, t, 8)) * mask[..., None]).astype(np.float32),
          "mask_BxT": mask, "label_BxC": label, "valid_B": np.ones(b, np.float32)}


def consts():
  return {"text_CxE": jnp.asarray(np.random.default_rng(9).normal(size=(C, 8)), jnp.float32)}


# ----------------------------------------------------------------------------- Eq. 4


def test_ternarize_each_case_of_eq4():
  # One video, labels {0, 2}; frames x classes.
  p = np.array([[[0.5, 0.9, 0.05],     # c0 fg (> 0.3, labelled); c1 not labelled -> 0
                 [0.2, 0.5, 0.35],     # c0 uncertain (0.1..0.3); c2 fg
                 [0.05, 0.0, 0.3],     # c0 bg (< 0.1); c2 = 0.3 is not > 0.3 -> uncertain
                 [0.1, 0.2, 0.99]]],   # c0 = 0.1 is not < 0.1 -> uncertain; padded frame
               np.float32)
  label = np.array([[1, 0, 1]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  h = np.asarray(ju2023.ternarize(jnp.asarray(p), jnp.asarray(label), jnp.asarray(mask),
                                  0.3, 0.1))
  np.testing.assert_array_equal(h[0], [[1, 0, 0], [-1, 0, 1], [0, 0, -1], [-1, -1, -1]])
  conf = np.asarray(ju2023.confident_frames(jnp.asarray(h), jnp.asarray(label),
                                            jnp.asarray(mask)))
  # frame 0: both labelled entries confident; 1: c0 uncertain; 2: c2 uncertain; 3: padded
  np.testing.assert_array_equal(conf[0], [True, False, False, False])


# ----------------------------------------------------------------------------- Eq. 6


def test_directional_targets_keep_one_side():
  """distill='directional': B steps learn H^cb's background, F steps H^vl's foreground; the
  other side becomes uncertain (so its frames get no L_kd), non-label classes stay 0."""
  label = jnp.asarray([[1, 0, 1]], jnp.float32)
  h = jnp.asarray([[[1, 0, 1], [0, 0, 0], [-1, 0, 0], [1, 0, 0]]], jnp.int32)
  bg = np.asarray(ju2023.directional_targets(h, label, "background"))
  fg = np.asarray(ju2023.directional_targets(h, label, "foreground"))
  np.testing.assert_array_equal(bg[0], [[-1, 0, -1], [0, 0, 0], [-1, 0, 0], [-1, 0, 0]])
  np.testing.assert_array_equal(fg[0], [[1, 0, 1], [-1, 0, -1], [-1, 0, -1], [1, 0, -1]])
  # Per entry: a frame counts when any labelled entry is kept (frame 3 of the F targets:
  # class 0's foreground, class 2 uncertain), and only kept labelled entries + the non-label
  # class (target 0) enter its sum.
  mask = jnp.ones((1, 4))
  p = np.random.default_rng(0).uniform(0.1, 0.9, (1, 4, 3)).astype(np.float32)
  for h_dir, frames in ((fg, [0, 3]), (bg, [1, 2, 3])):
    want = 0.0
    for t in frames:
      for c in range(3):
        if h_dir[0, t, c] < 0:
          continue
        y = float(h_dir[0, t, c] == 1)
        want -= y * np.log(p[0, t, c]) + (1 - y) * np.log(1 - p[0, t, c])
    loss, count = ju2023.kd_loss(jnp.asarray(h_dir), *ju2023.prob_log_probs(jnp.asarray(p)),
                                 label, mask, jnp.ones(1), False, per_entry=True)
    assert int(count) == len(frames)
    np.testing.assert_allclose(float(loss), want / len(frames), rtol=1e-5)


def test_kd_loss_value_and_zero_gradient_on_uncertain_frames():
  rng = np.random.default_rng(1)
  p = rng.uniform(0.05, 0.95, (2, 6, C)).astype(np.float32)
  label = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
  mask = np.ones((2, 6), np.float32)
  mask[1, 4:] = 0
  h = ju2023.ternarize(jnp.asarray(p), jnp.asarray(label), jnp.asarray(mask), 0.3, 0.1)
  valid = jnp.ones(2)

  def kd(q, labelled_only=False):
    return ju2023.kd_loss(h, *ju2023.prob_log_probs(q), jnp.asarray(label),
                          jnp.asarray(mask), valid, labelled_only)
  loss, count = kd(jnp.asarray(p))
  conf = np.asarray(ju2023.confident_frames(h, jnp.asarray(label), jnp.asarray(mask)))
  hn = np.asarray(h)
  want = want_lab = 0.0
  for b in range(2):
    for t in range(6):
      if conf[b, t]:
        for c in range(C):
          y = float(hn[b, t, c] == 1)
          term = -(y * np.log(p[b, t, c]) + (1 - y) * np.log(1 - p[b, t, c]))
          want += term
          want_lab += term if label[b, c] else 0.0
  assert int(count) == conf.sum() > 0 and (~conf & (mask > 0)).any()
  np.testing.assert_allclose(float(loss), want / conf.sum(), rtol=1e-5)
  np.testing.assert_allclose(float(kd(jnp.asarray(p), True)[0]), want_lab / conf.sum(),
                             rtol=1e-5)
  g = np.asarray(jax.grad(lambda q: kd(q)[0])(jnp.asarray(p)))
  assert np.all(g[~conf] == 0.0)                      # uncertain and padded frames: exactly 0
  assert np.all(np.abs(g[conf]).sum(-1) > 0)


def test_softmax_kd_keeps_its_gradient_at_saturation():
  """The B step's VLP student at logit scale 100: a confident false positive (p ~ 1 on a
  background frame) must still get a gradient (a clipped probability gave exactly 0)."""
  z = jnp.asarray([[[40.0, 0.0, 0.0]]])          # p_0 = 1 - 4e-18 in float32: saturated
  h = jnp.asarray([[[0, 0, 0]]], jnp.int32)      # background for its labelled class 0
  label = jnp.asarray([[1.0, 0.0, 0.0]])
  mask = jnp.ones((1, 1))
  lp, l1mp = ju2023.softmax_log_probs(z)
  np.testing.assert_allclose(np.exp(np.asarray(lp)), np.asarray(jax.nn.softmax(z)), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(l1mp)[0, 0, 1:],
                             np.log1p(-np.asarray(jax.nn.softmax(z))[0, 0, 1:]), rtol=1e-5,
                             atol=1e-12)
  g = jax.grad(lambda x: ju2023.kd_loss(h, *ju2023.softmax_log_probs(x), label, mask,
                                        jnp.ones(1), False)[0])(z)
  assert float(g[0, 0, 0]) > 0.5                 # pushes the false positive's logit down


def test_f_step_kd_with_minmax_cbp_never_raises_a_non_label_peak():
  """F step, P^cb 'minmax': Eq. 6 over the labelled classes only, so no KD gradient reaches
  a class outside the label (its min-max column peaks at 1 whatever the logits)."""
  method = methods.get_method(make_config(), C, DIMS)
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  params = method.init(jax.random.key(0), batch, consts())["params"]

  def kd_logit_grad(logits):
    h = jnp.asarray(np.random.default_rng(3).choice([0, 1], size=logits.shape), jnp.int32)
    p = ju2023.cbp_frame_probs(logits, batch["mask_BxT"], "minmax")
    return jax.grad(lambda l: ju2023.kd_loss(
        h, *ju2023.prob_log_probs(ju2023.cbp_frame_probs(l, batch["mask_BxT"], "minmax")),
        batch["label_BxC"], batch["mask_BxT"], batch["valid_B"], True)[0])(logits), p
  logits = method.apply(params, batch, consts(), train=False)["cbp_logits_BxTxK"]
  g, _ = kd_logit_grad(logits)
  outside = np.asarray(batch["label_BxC"])[:, None, :].repeat(g.shape[1], 1) == 0
  assert np.all(np.asarray(g)[outside] == 0.0) and np.any(np.asarray(g)[~outside] != 0.0)


def test_sigmoid_reading_of_eq1_by_hand():
  """cbp_probs='sigmoid': Eq. 1 as binary cross-entropy of sigmoid(top-k mean) summed over
  the classes, P^cb = sigmoid(A) per frame, the video score sigmoid(top-k mean)."""
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(2, 8, C)).astype(np.float32) * 3
  mask = np.ones((2, 8), np.float32)
  mask[1, 5:] = 0
  label = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
  k = np.array([2, 1])
  want = []
  for b in range(2):
    n = int(mask[b].sum())
    pooled = np.sort(logits[b, :n], axis=0)[::-1][:k[b]].mean(0)
    y_hat = 1 / (1 + np.exp(-pooled))
    want.append(-np.sum(label[b] * np.log(y_hat) + (1 - label[b]) * np.log(1 - y_hat)))
  got = ju2023.cls_loss(jnp.asarray(logits), jnp.asarray(label), jnp.asarray(mask),
                        jnp.ones(2), jnp.asarray(k), False, sigmoid=True)
  np.testing.assert_allclose(float(got), np.mean(want), rtol=1e-5)
  np.testing.assert_allclose(
      np.asarray(ju2023.cbp_frame_probs(jnp.asarray(logits), jnp.asarray(mask), "sigmoid")),
      1 / (1 + np.exp(-logits)), rtol=1e-5)
  method = methods.get_method(make_config(cbp_probs="sigmoid"), C, DIMS)
  batch = {k_: jnp.asarray(v) for k_, v in make_batch().items()}
  params = method.init(jax.random.key(0), batch, consts())["params"]
  out = method.predict(params, batch, consts())
  cbp = method.apply(params, batch, consts(), train=False)["cbp_logits_BxTxK"]
  pooled = np.sort(np.asarray(cbp)[0], axis=0)[::-1][:12 // 8].mean(0)
  np.testing.assert_allclose(out["video_scores_BxC"][0], 1 / (1 + np.exp(-pooled)), rtol=1e-5)
  # F step: the sigmoid student's KD reaches every class (a non-label class's target 0 is
  # what L_cls asks too), and only confident frames.
  aux = method.loss(params, batch, consts(), jax.random.key(1), jnp.int32(4))[1]
  assert float(aux["l_kd"]) > 0 and float(aux["l_cls"]) > 0


def test_local_attention_window_limits_the_receptive_field():
  """cbp_window=w: with one block, the frame logits at t depend on snippets t - w - 1 ..
  t + w + 1 only (the kernel-3 embedding adds 1 on each side); global attention sees all."""
  batch = make_batch(n_valid=(12,), t=12)
  far = {k: v.copy() for k, v in batch.items()}
  far["feat_BxTxD"][0, 11] += 5.0
  for window, unchanged in ((2, 8), (0, 0)):
    method = methods.get_method(make_config(cbp_layers=1, cbp_window=window), C, DIMS)
    params = method.init(jax.random.key(0), batch, consts())["params"]
    a = np.asarray(method.apply(params, batch, consts(), train=False)["cbp_logits_BxTxK"])
    b = np.asarray(method.apply(params, far, consts(), train=False)["cbp_logits_BxTxK"])
    np.testing.assert_array_equal(a[0, :unchanged], b[0, :unchanged])
    assert np.all(np.abs(a[0, unchanged:] - b[0, unchanged:]).max(-1) > 0), window


def test_co2net_as_the_cbp_branch():
  """Table 6 (cbp_arch='co2net'): CO2-Net's own losses train the CBP scope in warm-up (each
  with a non-zero gradient), P^cb = attention x softmax over C + 1, F-step KD reaches CBP,
  and the VLP scope is untouched by the CBP terms."""
  with pytest.raises(WstalError, match="cbp_probs"):
    methods.get_method(make_config(cbp_arch="co2net"), C, DIMS)
  method = methods.get_method(make_config(cbp_arch="co2net", cbp_probs="co2net"), C, DIMS)
  assert set(method.loss_weights()) == {"l_base", "l_supp", "l_norm", "l_guide", "l_oppo",
                                        "l_mutual", "l_kd", "l_fb"}
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  params = method.init(jax.random.key(0), batch, consts())["params"]
  out = method.apply(params, batch, consts(), train=False)
  p_cb = np.asarray(method.predict(params, batch, consts())["frame_cbp_BxTxC"])
  cas = np.asarray(out["cas_BxTxC1"])
  soft = np.exp(cas - cas.max(-1, keepdims=True))
  soft /= soft.sum(-1, keepdims=True)
  want = np.asarray(out["attn_BxT"])[..., None] * soft[..., :-1]
  want *= np.asarray(batch["mask_BxT"])[..., None]
  np.testing.assert_allclose(p_cb, want, rtol=1e-5, atol=1e-7)
  for step, kind in ((0, "warmup"), (4, "F")):
    for term in ("l_base", "l_guide") if kind == "warmup" else ("l_kd",):
      g = jax.grad(lambda p, t=term: method.loss(p, batch, consts(), jax.random.key(1),
                                                 jnp.int32(step))[1][t])(params)
      norm = lambda tree: sum(float(jnp.sum(x ** 2)) for x in jax.tree.leaves(tree))
      assert norm(g["cbp"]) > 0 and norm(g["vlp"]) == 0, (step, term)
  aux_b = method.loss(params, batch, consts(), jax.random.key(1), jnp.int32(2))[1]
  assert float(aux_b["l_base"]) == 0 and float(aux_b["l_kd"]) > 0


# ----------------------------------------------------------------------------- Eq. 7


def _fb_loop(f, h, label, mask, tau, reduce="anchor_mean"):
  """Eq. 7 within each video, anchor by anchor."""
  terms, video_sums = [], []
  for b in range(f.shape[0]):
    video_sums.append(0.0)
    n = int(mask[b].sum())
    x = f[b, :n] / np.linalg.norm(f[b, :n], axis=1, keepdims=True)
    lab = [c for c in range(C) if label[b, c] > 0]
    bg = [t for t in range(n) if all(h[b, t, c] == 0 for c in lab)]
    for c in range(C):
      fg = [t for t in range(n) if h[b, t, c] == 1]
      for i in fg:
        pos = [m for m in fg if m != i]
        if not pos:
          continue
        num = sum(np.exp(x[i] @ x[m] / tau) for m in pos)
        den = num + sum(np.exp(x[i] @ x[j] / tau) for j in bg)
        terms.append(-np.log(num / den))
        video_sums[-1] += terms[-1]
  return (np.mean(terms) if reduce == "anchor_mean" else np.mean(video_sums)), len(terms)


def test_fb_loss_matches_the_anchor_loop():
  rng = np.random.default_rng(2)
  f = rng.normal(size=(2, 10, 5)).astype(np.float32)
  label = np.array([[1, 0, 0], [0, 1, 1]], np.float32)
  mask = np.ones((2, 10), np.float32)
  mask[0, 8:] = 0
  h = rng.choice([-1, 0, 1], size=(2, 10, C), p=[0.2, 0.4, 0.4]).astype(np.int32)
  h[label[:, None, :].repeat(10, 1) == 0] = 0
  h[mask == 0] = -1
  got, count = ju2023.fb_loss(jnp.asarray(f), jnp.asarray(h), jnp.asarray(label),
                              jnp.asarray(mask), jnp.ones(2), 0.07)
  want, n = _fb_loop(f.astype(np.float64), h, label, mask, 0.07)
  assert int(count) == n > 3
  np.testing.assert_allclose(float(got), want, rtol=1e-4)
  # Eq. 7's sum over each video's anchors, the mean over the videos.
  got, _ = ju2023.fb_loss(jnp.asarray(f), jnp.asarray(h), jnp.asarray(label),
                          jnp.asarray(mask), jnp.ones(2), 0.07, reduce="video_sum")
  want_sum, _ = _fb_loop(f.astype(np.float64), h, label, mask, 0.07, reduce="video_sum")
  np.testing.assert_allclose(float(got), want_sum, rtol=1e-4)
  assert want_sum > 2 * want


# ----------------------------------------------------------------------------- schedule


def test_schedule_and_phase_freezing():
  # distill='all': at init the untrained CBP teacher's sigmoid is ~0.5 > delta_h at every
  # frame, so the default B step (its background entries only) has nothing to distil yet.
  method = methods.get_method(make_config(distill="all"), C, DIMS)
  assert method.phase_starts == (0, 2, 4)
  assert [method.kind_at(s) for s in range(6)] == ["warmup"] * 2 + ["B"] * 2 + ["F"] * 2
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  params = method.init(jax.random.key(0), batch, consts())["params"]
  assert set(params) == {"cbp", "vlp"}
  cfg = ml_collections.ConfigDict({"optim": {"lr": 0.1, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                                             "weight_decay": 0.0, "weight_decay_style": "l2",
                                             "grad_clip_norm": 0.0, "no_decay": ()}})
  for step, frozen, trained in ((0, "vlp", "cbp"), (2, "cbp", "vlp"), (4, "vlp", "cbp")):
    labels = method.param_labels(params, step)
    tx = train.make_optimizer(cfg, labels)
    grads = jax.grad(lambda p: method.loss(p, batch, consts(), jax.random.key(1),
                                           jnp.int32(step))[0])(params)
    updates, _ = tx.update(grads, tx.init(params), params)
    new = jax.tree.map(lambda p, u: p + u, params, updates)
    jax.tree.map(np.testing.assert_array_equal, new[frozen], params[frozen])   # bit-identical
    moved = jax.tree.leaves(jax.tree.map(lambda a, b: bool(np.any(a != b)), new[trained],
                                         params[trained]))
    assert any(moved), (step, trained)
  # b_lr_scale: B steps' Adam steps are that fraction of the others' (same gradients).
  slow = methods.get_method(make_config(b_lr_scale=0.1, distill="all"), C, DIMS)
  assert [slow.phase_lr_scale(s) for s in (0, 2, 4)] == [1.0, 0.1, 1.0]
  labels = slow.param_labels(params, 2)
  grads = jax.grad(lambda p: slow.loss(p, batch, consts(), jax.random.key(1),
                                       jnp.int32(2))[0])(params)
  full, scaled = (train.make_optimizer(cfg, labels, s) for s in (1.0, 0.1))
  u_full = full.update(grads, full.init(params), params)[0]["vlp"]
  u_scaled = scaled.update(grads, scaled.init(params), params)[0]["vlp"]
  assert any(bool(np.any(np.asarray(u) != 0)) for u in jax.tree.leaves(u_full))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(b, 0.1 * a, rtol=1e-5, atol=1e-12),
               u_full, u_scaled)


def test_terms_are_gated_by_phase():
  method = methods.get_method(make_config(), C, DIMS)
  batch = {k: jnp.asarray(v) for k, v in make_batch().items()}
  params = method.init(jax.random.key(0), batch, consts())["params"]
  # A CBP teacher that says "background" (sigmoid ~0.05): the default B step distils it.
  params["cbp"]["head"]["bias"] = params["cbp"]["head"]["bias"] - 3.0
  aux = {s: method.loss(params, batch, consts(), jax.random.key(1), jnp.int32(s))[1]
         for s in (0, 2, 4)}
  assert float(aux[0]["l_cls"]) > 0 and float(aux[0]["l_kd"]) == 0 == float(aux[0]["l_fb"])
  assert float(aux[2]["l_cls"]) == 0 and float(aux[2]["l_kd"]) > 0       # B: no L_cls
  assert float(aux[4]["l_cls"]) > 0 and float(aux[4]["l_kd"]) > 0        # F: cls_in_f_step
  # The trainer's static phase (one kind traced) gives the lax.switch path's values.
  for phase, s in enumerate((0, 2, 4)):
    static = method.loss(params, batch, consts(), jax.random.key(1), jnp.int32(s), phase)[1]
    for k, v in aux[s].items():
      np.testing.assert_allclose(float(static[k]), float(v), rtol=1e-6, err_msg=(s, k))
  literal = methods.get_method(make_config(cls_in_f_step=False), C, DIMS)
  assert float(literal.loss(params, batch, consts(), jax.random.key(1),
                            jnp.int32(4))[1]["l_cls"]) == 0


def test_predict_is_padding_invariant_and_vlp_starts_as_vanilla_clip():
  method = methods.get_method(make_config(), C, DIMS)
  short = make_batch(n_valid=(9,), t=9)
  long = {k: v.copy() for k, v in short.items()}
  for k in ("feat_BxTxD", "vlm_BxTxE", "mask_BxT"):
    pad = [(0, 0), (0, 7)] + [(0, 0)] * (long[k].ndim - 2)
    long[k] = np.pad(long[k], pad)
  params = method.init(jax.random.key(0), {k: jnp.asarray(v) for k, v in short.items()},
                       consts())["params"]
  a = method.predict(params, short, consts())
  b = method.predict(params, long, consts())
  for key in ("video_scores_BxC",):
    np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=1e-6)
  for key in ("cas_BxTxC", "frame_cbp_BxTxC", "frame_vlp_BxTxC"):
    np.testing.assert_allclose(a[key], b[key][:, :9], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(b[key])[:, 9:] == 0)
  # Zero-initialised output projections: F_vid = F_vis, so P^vl is CLIP's zero-shot softmax
  # of 100 x cos(frame, text + offset).
  out = method.apply(params, short, consts(), train=False)
  text = np.asarray(out["text_CxE"])
  x = short["vlm_BxTxE"][0]
  cos = (x / np.linalg.norm(x, axis=1, keepdims=True)) @ (
      text / np.linalg.norm(text, axis=1, keepdims=True)).T
  want = np.exp(100 * cos - (100 * cos).max(1, keepdims=True))
  np.testing.assert_allclose(a["frame_vlp_BxTxC"][0], want / want.sum(1, keepdims=True),
                             rtol=1e-4, atol=1e-6)


def test_bad_settings_are_one_clear_error():
  with pytest.raises(WstalError, match="delta_h"):
    methods.get_method(make_config(delta_h=0.05), C, DIMS)
  with pytest.raises(WstalError, match="mode"):
    methods.get_method(make_config(mode="nope"), C, DIMS)
  with pytest.raises(WstalError, match="only_b"):
    methods.get_method(make_config(mode="only_b"), C, DIMS)   # fusion 'cbp' would be warm-up
  with pytest.raises(WstalError, match="vlm_feature"):
    methods.get_method(make_config(), C, {"feat": 8, "vlm": None, "text": 8})
  config = make_config()
  config.train = ml_collections.ConfigDict({"num_steps": 5})
  with pytest.raises(WstalError, match="shorter than config.ju2023's schedule"):
    methods.get_method(config, C, DIMS)
  # A typo in the block is one error naming the field and its likely spelling; a field the
  # block lacks (a run directory saved before it existed) takes its pre-field behaviour.
  typo = make_config()
  with typo.ju2023.unlocked():
    typo.ju2023.cbp_windows = 4
  with pytest.raises(WstalError, match="config.ju2023.cbp_windows.*'cbp_window'"):
    methods.get_method(typo, C, DIMS)
  old = make_config()
  with old.ju2023.unlocked():
    del old.ju2023["cbp_window"]
    del old.ju2023["distill"]
  method = methods.get_method(old, C, DIMS)
  assert method.cfg.cbp_window == 0 and method.cfg.distill == "all"
  assert method.cfg.delta_h == 0.3


# ----------------------------------------------------------------------------- frame mIoU


def test_frame_miou_by_hand():
  gt = metrics_lib.snippet_labels([[0.0, 1.9], [3.0, 4.0]], [0, 1], num_t=6,
                                  seconds_per_snippet=0.64, num_classes=2)
  # centres 0.32 0.96 1.6 2.24 2.88 3.52: class 0 at t 0-2, class 1 at t 5
  np.testing.assert_array_equal(gt.nonzero(), ([0, 1, 2, 5], [0, 0, 0, 1]))
  acc = metrics_lib.FrameIoU(2, threshold=0.3)
  score = np.array([[0.9, 0.9], [0.1, 0.0], [0.5, 0.0], [0.5, 0.0], [0.0, 0.0], [0.0, 0.8]])
  acc.add(score, np.array([1.0, 1.0]), gt)
  fg, bg, both = acc.result()
  # class 0: pred {0, 2, 3}, gt {0, 1, 2}: 2 / 4; class 1: pred {0, 5}, gt {5}: 1 / 2
  # bg: pred {1, 4}, gt {3, 4}: 1 / 3
  assert fg == pytest.approx((0.5 + 0.5) / 2) and bg == pytest.approx(1 / 3)
  assert both == pytest.approx((0.5 + 0.5 + 1 / 3) / 3)
  acc2 = metrics_lib.FrameIoU(2, threshold=0.3)
  acc2.add(score, np.array([1.0, 0.0]), gt)   # class 1 not in the video label: never predicted
  assert acc2.inter_C[1] == 0 and acc2.union_C[1] == 1


# ----------------------------------------------------------------------------- end to end


def _tiny_run_config(data_dir):
  import importlib.util
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location("ju_recipe", os.path.join(root, "configs",
                                                                          "ju2023.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dir = data_dir
  config.data.vlm_feature = "clip"    # the tiny dataset's second stream
  config.data.num_snippets = 16
  config.train.batch_size = 2
  config.mesh.num_devices = 1
  config.train.num_steps = 12
  config.train.log_every = 2
  config.train.eval_every = 6
  config.train.checkpoint_every = 2
  config.checkpoint.keep_latest = 20
  config.checkpoint.async_save = False
  config.eval.batch_size = 2
  config.eval.num_plots = 0
  b = config.ju2023
  b.cbp_width, b.cbp_mlp_dim, b.cbp_heads, b.vlp_heads, b.vlp_mlp_ratio = 16, 16, 2, 2, 1
  b.warmup_steps, b.b_steps, b.f_steps, b.num_alternations = 4, 4, 4, 1
  return config


def test_tiny_run_through_warmup_b_f_and_resume_mid_b_step(tmp_path, caplog):
  data = _write_pvlr_dataset(tmp_path / "data")   # I3D 8-d + CLIP 6-d, three classes
  config = _tiny_run_config(data)
  assert config.ju2023.b_lr_scale == 0.1   # the built-in preset's B-step rate
  full = str(tmp_path / "full")
  with caplog.at_level("INFO"):
    metrics = train.train_and_evaluate(config, full)
  # The trainer builds each phase's optimizer at the method's phase_lr_scale.
  starts = [r.getMessage() for r in caplog.records if "starts (optimizer" in r.getMessage()]
  assert starts == ["step 4: phase 1 starts (optimizer re-initialised, lr x 0.1)",
                    "step 8: phase 2 starts (optimizer re-initialised, lr x 1)"], starts
  for key in ("average_mAP", "fg_mIoU_cbp", "bg_mIoU_cbp", "fg_mIoU_vlp", "bg_mIoU_vlp",
              "mIoU_cbp", "mIoU_vlp"):
    assert key in metrics and metrics[key] is not None and np.isfinite(metrics[key]), key
  # A copy of the run as it stood after step 6 (the middle of the B phase, steps 4-7).
  resumed = str(tmp_path / "resumed")
  shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("tensorboard", "metrics.json",
                                                               "results.json", "plots"))
  ckpt_dir = os.path.join(resumed, "checkpoints")
  for name in os.listdir(ckpt_dir):
    if name.isdigit() and int(name) > 6:
      shutil.rmtree(os.path.join(ckpt_dir, name))
  again = train.train_and_evaluate(config, resumed)
  with open(os.path.join(full, "metrics.json")) as f:
    assert json.load(f) == again

  # --mode=eval from the command line with an override of the method's own block (parsed
  # against the run's saved config: the flag's default config has no `ju2023` block), equal
  # to evaluating the same checkpoint in-process with that setting (Table 3's VLP row).
  import subprocess
  import sys
  from wstal_jax import evaluate
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  env = dict(os.environ, PYTHONPATH=root, XLA_FLAGS="--xla_backend_optimization_level=0")
  step = json.load(open(os.path.join(full, "metrics.json")))["step"]
  proc = subprocess.run(
      [sys.executable, "-m", "wstal_jax.main", "--mode=eval", f"--workdir={full}",
       f"--checkpoint={step}", f"--eval_dir={tmp_path / 'vlp'}", "--config.ju2023.fusion=vlp"],
      cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = json.loads((tmp_path / "vlp" / "metrics.json").read_text())
  config.ju2023.fusion = "vlp"
  want = evaluate.evaluate_checkpoint(config, full, checkpoint=str(step),
                                      eval_dir=str(tmp_path / "vlp_in_process"))
  for key in ("average_mAP", "fg_mIoU_vlp", "bg_mIoU_cbp"):
    assert got[key] == pytest.approx(want[key], abs=1e-6), key
  assert got["fg_mIoU_vlp"] == pytest.approx(metrics["fg_mIoU_vlp"], abs=1e-6)
  # The override acted: the proposals are the VLP branch's, not the trained run's (CBP's).
  results = lambda d: json.loads(open(os.path.join(d, "results.json")).read())["results"]
  assert results(str(tmp_path / "vlp")) != results(full)
