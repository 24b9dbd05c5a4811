"""Tests of CO2-Net (wstal_jax/methods/co2net.py, wstal_jax/models/co2net.py).

Every loss term against an independent numpy transcription of CO2-Net's released PyTorch code
(`CO2.criterion`, `topkloss`, `Contrastive`, `_multiply`, `get_cls_score`), written here as
loops over videos / pairs / classes on the valid snippets only; padding invariance of the
model; the method object under jit; and a 2-step train + eval run of the command line.
Model calls are jitted with XLA's backend optimisation off and each configuration is built once.
"""
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax import methods
from wstal_jax.data import format as data_format
from wstal_jax.errors import WstalError
from wstal_jax.methods import co2net
from wstal_jax.models import co2net as co2net_model

ROOT = pathlib.Path(__file__).resolve().parent.parent
C = 3                      # action classes (the CAS has C + 1 columns)
D = 8                      # [RGB; flow] = 4 + 4
DIMS = {"feat": D}


def load_config(arg=None):
  """configs/co2net.py's get_config, loaded as main.py's config flag would."""
  spec = importlib.util.spec_from_file_location("co2net_config_for_test",
                                                ROOT / "configs" / "co2net.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def key(seed):
  """'rbg' keys compile much faster than threefry on CPU."""
  return jax.random.key(seed, impl="rbg")


def fast_jit(fn, **kw):
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0}, **kw)


# ------------------------------------------------------------------------------------------
# Independent numpy transcriptions of CO2-Net's released code (per video, valid snippets).


def np_log_softmax(z):
  z = np.asarray(z, np.float64)
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_softmax(z, axis=-1):
  z = np.asarray(z, np.float64)
  e = np.exp(z - z.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def np_topk_mean(x_TxC, k):
  """torch.topk(x, k, dim=0).values.mean(0)."""
  return np.sort(np.asarray(x_TxC, np.float64), axis=0)[::-1][:k].mean(0)


def ref_topkloss(cas_BxTxC1, label_BxC, n_B, is_back, rat):
  """CO2-Net `topkloss` per video on its n valid snippets: -> [B]."""
  out = []
  for cas, y, n in zip(cas_BxTxC1, label_BxC, n_B):
    k = max(1, int(n // rat))
    inst = np_topk_mean(cas[:n], k)
    yb = np.concatenate([y, [1.0 if is_back else 0.0]])
    yb = yb / (yb.sum() + 1e-4)                        # the reference's normalisation
    out.append(-(yb * np_log_softmax(inst)).sum())
  return np.array(out)


def ref_contrastive(feat_BxTxF, supp_BxTxC1, label_BxC, n_B, valid_B=None, margin=0.5):
  """CO2-Net `Contrastive` (co-activity loss) over every pair i < j of valid videos."""
  b = len(n_B)
  valid_B = np.ones(b) if valid_B is None else valid_B
  feats = [np.asarray(feat_BxTxF[i, :n_B[i]], np.float64) for i in range(b)]
  sim, count = 0.0, 0.0

  def dist(u, v):
    return 1.0 - u @ v / (np.linalg.norm(u) * np.linalg.norm(v))

  for i in range(b):
    for j in range(i + 1, b):
      if not (valid_B[i] and valid_B[j]):
        continue
      for c in range(label_BxC.shape[1]):
        w = label_BxC[i, c] * label_BxC[j, c]
        if not w:
          continue
        atn1 = np_softmax(supp_BxTxC1[i, :n_B[i], c], axis=0)
        atn2 = np_softmax(supp_BxTxC1[j, :n_B[j], c], axis=0)
        hf1, hf2 = feats[i].T @ atn1, feats[j].T @ atn2
        lf1 = feats[i].T @ ((1 - atn1) / max(n_B[i] - 1, 1))
        lf2 = feats[j].T @ ((1 - atn2) / max(n_B[j] - 1, 1))
        d1, d2, d3 = dist(hf1, hf2), dist(hf1, lf2), dist(hf2, lf1)
        sim += 0.5 * max(d1 - d2 + margin, 0.0) * w + 0.5 * max(d1 - d3 + margin, 0.0) * w
        count += w
  return sim / count if count else 0.0


def ref_attention_terms(attn, v_attn, f_attn, cas_BxTxC1, n_B):
  """CO2-Net norm / guide / mutual terms per video (the reference's .mean() over snippets)."""
  norm, guide, mutual = [], [], []
  for i, n in enumerate(n_B):
    bg = np_softmax(cas_BxTxC1[i, :n], -1)[:, -1]
    a, v, f = attn[i, :n], v_attn[i, :n], f_attn[i, :n]
    norm.append((a.mean() + v.mean() + f.mean()) / 3)
    guide.append((np.abs(1 - a - bg).mean() + np.abs(1 - v - bg).mean()
                  + np.abs(1 - f - bg).mean()) / 3)
    mutual.append(0.5 * ((v - f) ** 2).mean() + 0.5 * ((f - v) ** 2).mean())
  return np.array(norm), np.array(guide), np.array(mutual)


def masks(n_B, t):
  m = np.zeros((len(n_B), t), np.float32)
  for i, n in enumerate(n_B):
    m[i, :n] = 1
  return m


# ------------------------------------------------------------------------------------------
# 1. MIL with / without the background label.


def test_labels_with_background_hand():
  y = jnp.asarray([[1, 0, 1], [0, 1, 0], [0, 0, 0]], jnp.float32)
  np.testing.assert_allclose(co2net.labels_with_background(y, 1.0),
                             [[1 / 3, 0, 1 / 3, 1 / 3], [0, 0.5, 0, 0.5], [0, 0, 0, 1]],
                             rtol=1e-6)
  np.testing.assert_allclose(co2net.labels_with_background(y, 0.0),
                             [[0.5, 0, 0.5, 0], [0, 1, 0, 0], [0, 0, 0, 0]], rtol=1e-6)


def test_mil_loss_hand():
  """k = max(1, n_valid // divisor) over valid snippets only, label [y, bg] normalised."""
  rng = np.random.default_rng(0)
  n_B, t, rat = [6, 4, 1], 6, 2                  # k = 3, 2, max(1, 0) = 1
  cas = rng.normal(size=(3, t, C + 1)).astype(np.float32)
  mask = masks(n_B, t)
  cas[mask == 0] = 50.0                          # padding would win every top-k
  label = np.array([[1, 0, 1], [0, 1, 0], [0, 0, 1]], np.float32)   # video 0 multi-label
  k_B = co2net.topk_count(jnp.asarray(mask), rat)
  np.testing.assert_array_equal(k_B, [3, 2, 1])
  for bg, is_back in ((1.0, True), (0.0, False)):
    got = co2net.mil_loss(jnp.asarray(cas), jnp.asarray(label), jnp.asarray(mask), k_B, bg)
    want = ref_topkloss(cas, label, n_B, is_back, rat)
    # y / sum y here vs y / (sum y + 1e-4) in the reference: equal up to ~5e-5 relative.
    np.testing.assert_allclose(got, want, rtol=2e-4, err_msg=f"bg={bg}")
  # Hand value for video 1 (k = 2), bg = 1: label [0, 1/2, 0, 1/2].
  pooled = np.sort(cas[1, :4], axis=0)[::-1][:2].mean(0)
  lsm = np_log_softmax(pooled)
  got = co2net.mil_loss(jnp.asarray(cas), jnp.asarray(label), jnp.asarray(mask), k_B, 1.0)
  np.testing.assert_allclose(got[1], -(lsm[1] + lsm[3]) / 2, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 2. The suppressed CAS.


def test_suppress_hand():
  """a * (S - min_c S) + min_c S per snippet; padded entries 0."""
  cas = np.zeros((2, 4, 2), np.float32)
  cas[0, :, 0] = [1, 3, 2, -100]                 # snippet 3 is padding
  cas[0, :, 1] = [-2, 0, 4, -100]
  cas[1] = np.nan                                # a video without valid snippets
  attn = np.array([[0.5, 1.0, 0.0, 0.7], [0.3, 0.3, 0.3, 0.3]], np.float32)
  mask = np.array([[1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
  got = np.asarray(co2net.suppress(jnp.asarray(cas), jnp.asarray(attn), jnp.asarray(mask)))
  np.testing.assert_allclose(got[0, :, 0], [-0.5, 3, 2, 0])
  np.testing.assert_allclose(got[0, :, 1], [-2, 0, 2, 0])
  np.testing.assert_array_equal(got[1], 0)


def test_suppress_matches_reference_multiply():
  """CO2-Net: element_logits_supp = _multiply(element_logits, element_atn, include_min=True)
  with `_min = x.min(dim=-1, keepdim=True)` on x of shape [B, n, C+1]."""
  rng = np.random.default_rng(1)
  cas = rng.normal(size=(2, 5, C + 1)).astype(np.float32)
  attn = rng.uniform(0.05, 0.95, size=(2, 5)).astype(np.float32)
  lo = cas.min(-1, keepdims=True)
  want = attn[:, :, None] * (cas - lo) + lo
  got = co2net.suppress(jnp.asarray(cas), jnp.asarray(attn), jnp.ones((2, 5)))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# 3. The co-activity loss.


def _coact_inputs(seed=2, t=7, f=5):
  rng = np.random.default_rng(seed)
  n_B = [7, 6, 5, 7]
  mask = masks(n_B, t)
  feat = rng.normal(size=(4, t, f)).astype(np.float32) * mask[:, :, None]
  supp = rng.normal(size=(4, t, C + 1)).astype(np.float32) * 2
  supp[mask == 0] = 30.0                          # padding would dominate a softmax
  supp[..., -1] = 40.0                            # background column: never used
  # Pairs sharing a class: (0,1) c0, (0,2) c1, (2,3) c2, (1,3) none.
  label = np.array([[1, 1, 0], [1, 0, 0], [0, 1, 1], [0, 0, 1]], np.float32)
  return feat, supp, label, mask, n_B


def test_co_activity_loss_hand():
  feat, supp, label, mask, n_B = _coact_inputs()
  f = fast_jit(co2net.co_activity_loss)
  ones = np.ones(4, np.float32)
  got = float(f(feat, supp, label, mask, ones))
  want = ref_contrastive(feat, supp, label, n_B)
  assert want > 0.1
  np.testing.assert_allclose(got, want, rtol=1e-5)
  # A weight is y_i,c * y_j,c: multi-label pairs count once per shared class.
  label2 = label.copy()
  label2[1] = [1, 1, 0]                           # (0,1) now shares c0 and c1
  np.testing.assert_allclose(float(f(feat, supp, label2, mask, ones)),
                             ref_contrastive(feat, supp, label2, n_B), rtol=1e-5)
  # The margin enters every hinge (margin 0: a different, smaller value).
  np.testing.assert_allclose(
      float(co2net.co_activity_loss(feat, supp, label, mask, ones, margin=0.0)),
      ref_contrastive(feat, supp, label, n_B, margin=0.0), rtol=1e-5, atol=1e-7)


def test_co_activity_loss_no_shared_class_and_invalid_videos():
  feat, supp, label, mask, n_B = _coact_inputs()
  f = fast_jit(co2net.co_activity_loss)
  ones = np.ones(4, np.float32)
  eye = np.eye(4, C, dtype=np.float32)            # video 3 has no label, no pair shares
  assert float(f(feat, supp, eye, mask, ones)) == 0.0
  # valid_B = 0 excludes a video from every pair, even with data and labels.
  valid = np.array([1, 1, 1, 0], np.float32)
  got = float(f(feat, supp, label, mask, valid))
  want = ref_contrastive(feat, supp, label, n_B, valid_B=valid)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  assert abs(got - ref_contrastive(feat, supp, label, n_B)) > 1e-4
  # A dummy video (no valid snippet, zero features, no label) as the input pipeline pads with.
  feat_d, supp_d, label_d, mask_d = feat.copy(), supp.copy(), label.copy(), mask.copy()
  feat_d[3], mask_d[3], label_d[3] = 0, 0, 0
  got_d = float(f(feat_d, supp_d, label_d, mask_d, valid))
  np.testing.assert_allclose(got_d, want, rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 4. Norm / guide / mutual learning.


def _attn_inputs(seed=3, t=5):
  rng = np.random.default_rng(seed)
  n_B = [5, 3]
  mask = masks(n_B, t)
  out = {k: rng.uniform(0.05, 0.95, size=(2, t)).astype(np.float32)
         for k in ("attn_BxT", "v_attn_BxT", "f_attn_BxT")}
  cas = rng.normal(size=(2, t, C + 1)).astype(np.float32)
  for v in out.values():
    v[mask == 0] = 0.99                           # garbage in the padding
  cas[mask == 0] = 9.0
  return out, cas, mask, n_B


def test_attention_terms_and_mutual_loss_hand():
  out, cas, mask, n_B = _attn_inputs()
  norm, guide = co2net.attention_terms(out, jnp.asarray(cas), jnp.asarray(mask))
  mutual = co2net.mutual_loss(out, jnp.asarray(mask))
  w_norm, w_guide, w_mutual = ref_attention_terms(out["attn_BxT"], out["v_attn_BxT"],
                                                  out["f_attn_BxT"], cas, n_B)
  np.testing.assert_allclose(norm, w_norm, rtol=1e-5)
  np.testing.assert_allclose(guide, w_guide, rtol=1e-5)
  np.testing.assert_allclose(mutual, w_mutual, rtol=1e-5)


def test_mutual_loss_stops_gradient_through_the_other_branch():
  """d/dv [0.5 (v - sg f)^2 + 0.5 (f - sg v)^2] = (v - f): only the first term (the second
  would double it without the stop-gradient)."""
  out, _, mask, n_B = _attn_inputs()
  v, f = out["v_attn_BxT"], out["f_attn_BxT"]

  def total(v_attn, f_attn):
    return jnp.sum(co2net.mutual_loss({"v_attn_BxT": v_attn, "f_attn_BxT": f_attn}, mask))

  g_v, g_f = jax.grad(total, argnums=(0, 1))(jnp.asarray(v), jnp.asarray(f))
  n = np.array(n_B, np.float32)[:, None]
  np.testing.assert_allclose(g_v, (v - f) * mask / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_f, (f - v) * mask / n, rtol=1e-5, atol=1e-7)
  assert np.any(np.asarray(g_v))


def test_attention_terms_gradient_reaches_cas_background():
  """The guide term trains both the attention and the background column (no stop-gradient)."""
  out, cas, mask, _ = _attn_inputs()
  g = jax.grad(lambda c: jnp.sum(co2net.attention_terms(out, c, mask)[1]))(jnp.asarray(cas))
  g = np.asarray(g)
  assert np.any(g[..., -1][mask > 0])
  assert not np.any(g[mask == 0])                 # padding gets nothing


# ------------------------------------------------------------------------------------------
# 5. Inference scores.


def test_co2net_scores_hand():
  rng = np.random.default_rng(4)
  n_B, t, rat = [12, 9], 12, 4                    # k = 3, 2
  mask = masks(n_B, t)
  cas = rng.normal(size=(2, t, C + 1)).astype(np.float32) * 3
  attn = rng.uniform(0.05, 0.95, size=(2, t)).astype(np.float32)
  cas[mask == 0], attn[mask == 0] = 100.0, 1.0    # garbage padding
  scores = fast_jit(co2net.co2net_scores, static_argnums=3)
  got = scores(cas, attn, mask, rat)
  elem = cas * attn[:, :, None]
  for i, n in enumerate(n_B):
    # get_cls_score: softmax(topk(cas * attn, n // rat).mean)[..., :-1]
    want = np_softmax(np_topk_mean(elem[i, :n], max(1, n // rat)))[:-1]
    np.testing.assert_allclose(got["video_scores_BxC"][i], want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(got["cas_BxTxC"][i, :n], elem[i, :n, :C], rtol=1e-6)
    np.testing.assert_allclose(got["actionness_BxT"][i, :n], attn[i, :n], rtol=1e-6)
  assert got["cas_BxTxC"].shape == (2, t, C)
  assert not np.any(np.asarray(got["cas_BxTxC"])[mask == 0])
  assert not np.any(np.asarray(got["actionness_BxT"])[mask == 0])
  # A divisor larger than the video: k = 1 (the top snippet).
  big = scores(cas, attn, mask, 50)
  np.testing.assert_allclose(big["video_scores_BxC"][1],
                             np_softmax(elem[1, :9].max(0))[:-1], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------
# 6. The model: shapes and padding invariance.


def make_batch(seed=0, t=16, n_valid=None, b=4, label=None):
  rng = np.random.default_rng(seed)
  n_valid = [t] * b if n_valid is None else n_valid
  mask = masks(n_valid, t)
  feat = rng.normal(size=(b, t, D)).astype(np.float32) * mask[:, :, None]
  if label is None:
    label = np.zeros((b, C), np.float32)
    label[np.arange(b), np.arange(b) // 2 % C] = 1      # pairs (0,1), (2,3) share a class
  return {"feat_BxTxD": feat, "mask_BxT": mask, "label_BxC": np.asarray(label, np.float32),
          "valid_B": np.ones(b, np.float32)}


def garbage_padded(batch, t_pad, seed=7):
  """The same videos padded to t_pad snippets with garbage (NaN, +-1e6) in the padding."""
  rng = np.random.default_rng(seed)
  out = dict(batch)
  x = np.asarray(batch["feat_BxTxD"])
  b, t, d = x.shape
  garbage = rng.normal(size=(b, t_pad - t, d)).astype(np.float32) * 1e6
  garbage[:, ::2] = np.nan
  out["feat_BxTxD"] = np.concatenate([x, garbage], axis=1)
  out["mask_BxT"] = np.concatenate([batch["mask_BxT"], np.zeros((b, t_pad - t), np.float32)], 1)
  return out


_CACHE = {}


def model_and_params():
  if "model" not in _CACHE:
    model = co2net_model.CO2NetModel(num_classes=C, rgb_dim=D // 2, attn_hidden=8)
    params = fast_jit(lambda k, b: model.init({"params": k, "dropout": k}, b, train=False))(
        key(0), make_batch())["params"]
    apply = fast_jit(lambda p, b: model.apply({"params": p}, b, train=False))
    _CACHE["model"] = (model, params, apply)
  return _CACHE["model"]


def test_model_shapes_and_ranges():
  _, params, apply = model_and_params()
  batch = make_batch(n_valid=[16, 11, 16, 5])
  out = apply(params, batch)
  assert out["cas_BxTxC1"].shape == (4, 16, C + 1)
  assert out["feat_BxTxF"].shape == out["base_BxTxF"].shape == (4, 16, D)
  valid = batch["mask_BxT"] > 0
  for name in ("attn_BxT", "v_attn_BxT", "f_attn_BxT"):
    a = np.asarray(out[name])
    assert a.shape == (4, 16)
    assert np.all((a[valid] > 0) & (a[valid] < 1)), name
    assert not np.any(a[~valid]), name
  np.testing.assert_allclose(out["attn_BxT"], (out["v_attn_BxT"] + out["f_attn_BxT"]) / 2,
                             rtol=1e-6)
  for name in ("cas_BxTxC1", "feat_BxTxF", "base_BxTxF"):
    assert not np.any(np.asarray(out[name])[~valid]), name
  assert set(params) == {"trunk", "classifier"}
  assert {"rgb_attention", "flow_attention", "fusion", "cls_conv"} <= set(params["trunk"])


def test_model_padding_invariance():
  """Extra padded snippets with NaN / 1e6 garbage never change the valid snippets' outputs
  (temporal convs, the channel attention's temporal mean), in eval mode."""
  _, params, apply = model_and_params()
  short = make_batch(seed=1, n_valid=[16, 12, 16, 9])
  padded = garbage_padded(short, 24)
  o_short, o_pad = apply(params, short), apply(params, padded)
  valid = short["mask_BxT"] > 0
  for name, v in o_short.items():
    a, b = np.asarray(o_pad[name])[:, :16], np.asarray(v)
    assert np.all(np.isfinite(np.asarray(o_pad[name]))), name
    np.testing.assert_allclose(a[valid], b[valid], rtol=1e-5, atol=1e-6, err_msg=name)
    assert not np.any(np.asarray(o_pad[name])[:, 16:]), name


# ------------------------------------------------------------------------------------------
# 7. video_loss: the weighted sum of its terms.


def _loss_out(seed=5, t=8):
  rng = np.random.default_rng(seed)
  n_B = [8, 6, 8, 5]
  mask = masks(n_B, t)
  out = {k: rng.uniform(0.05, 0.95, size=(4, t)).astype(np.float32) * mask
         for k in ("attn_BxT", "v_attn_BxT", "f_attn_BxT")}
  out["feat_BxTxF"] = rng.normal(size=(4, t, 6)).astype(np.float32) * mask[:, :, None]
  cas = rng.normal(size=(4, t, C + 1)).astype(np.float32) * mask[:, :, None]
  label = np.array([[1, 0, 0], [1, 0, 1], [0, 1, 1], [0, 1, 0]], np.float32)
  batch = {"mask_BxT": mask, "label_BxC": label, "valid_B": np.ones(4, np.float32)}
  return out, cas, batch, n_B


def test_video_loss_is_the_weighted_sum_of_its_terms():
  out, cas, batch, n_B = _loss_out()
  s = co2net.VideoLossSettings(topk_divisor=2, w_cls=0.7, w_oppo=1.3, w_norm=0.4,
                               w_guide=0.6, w_mutual=2.0, oppo_margin=0.5)
  total, terms = fast_jit(lambda o, c, b: co2net.video_loss(o, c, b, s))(out, cas, batch)
  assert set(terms) == {"l_base", "l_supp", "l_norm", "l_guide", "l_oppo", "l_mutual"}
  want_total = (0.7 * (terms["l_base"] + terms["l_supp"]) + 0.4 * terms["l_norm"]
                + 0.6 * terms["l_guide"] + 1.3 * terms["l_oppo"] + 2.0 * terms["l_mutual"])
  np.testing.assert_allclose(total, want_total, rtol=1e-6)
  # Each term against the reference (S_supp taken from `suppress`, tested above).
  supp = np.asarray(co2net.suppress(jnp.asarray(cas), out["attn_BxT"], batch["mask_BxT"]))
  label = batch["label_BxC"]
  norm, guide, mutual = ref_attention_terms(out["attn_BxT"], out["v_attn_BxT"],
                                            out["f_attn_BxT"], cas, n_B)
  want = {"l_base": ref_topkloss(cas, label, n_B, True, 2).mean(),
          "l_supp": ref_topkloss(supp, label, n_B, False, 2).mean(),
          "l_norm": norm.mean(), "l_guide": guide.mean(), "l_mutual": mutual.mean(),
          "l_oppo": ref_contrastive(out["feat_BxTxF"], supp, label, n_B)}
  for name, value in want.items():
    np.testing.assert_allclose(terms[name], value, rtol=2e-4, err_msg=name)
  assert want["l_oppo"] > 0 and want["l_mutual"] > 0
  # w_oppo = w_mutual = 0: the terms leave the dict and the total.
  s0 = co2net.VideoLossSettings(topk_divisor=2, w_cls=0.7, w_oppo=0.0, w_norm=0.4,
                                w_guide=0.6, w_mutual=0.0, oppo_margin=0.5)
  total0, terms0 = fast_jit(lambda o, c, b: co2net.video_loss(o, c, b, s0))(out, cas, batch)
  assert set(terms0) == {"l_base", "l_supp", "l_norm", "l_guide"}
  np.testing.assert_allclose(total0, total - 1.3 * terms["l_oppo"] - 2.0 * terms["l_mutual"],
                             rtol=1e-5)


# ------------------------------------------------------------------------------------------
# 8. The method object.


def test_config_file_and_errors():
  cfg = load_config()
  assert cfg.method == "co2net"
  b = cfg.co2net
  # Built-in: dropout 0.5 (chosen on CO2-Net, configs/co2net.py); THUMOS14: CO2-Net's 0.7.
  assert (b.topk_divisor, b.eval_topk_divisor, b.dropout) == (7, 20, 0.5)
  assert (b.w_cls, b.w_oppo, b.w_norm, b.w_guide, b.w_mutual) == (1.0, 1.0, 0.8, 0.8, 1.0)
  thumos = load_config("dataset=thumos14")
  assert (thumos.co2net.attn_hidden, thumos.co2net.dropout) == (512, 0.7)
  assert (thumos.data.num_snippets, thumos.train.batch_size, thumos.optim.lr,
          thumos.optim.weight_decay) == (320, 10, 5e-5, 1e-3)
  assert load_config("dataset=activitynet").co2net.topk_divisor == 5
  with pytest.raises(WstalError, match="odd width 7"):
    methods.get_method(cfg, C, {"feat": 7})
  for field, value in (("dropout", 1.0), ("topk_divisor", 0), ("w_oppo", -1.0)):
    bad = load_config()
    bad.co2net[field] = value
    with pytest.raises(WstalError, match=f"config.co2net.{field}"):
      methods.get_method(bad, C, DIMS)


def method_and_params():
  if "method" not in _CACHE:
    cfg = load_config()
    cfg.co2net.attn_hidden = 8
    method = methods.get_method(cfg, C, DIMS)
    assert isinstance(method, co2net.CO2Net)
    jitted = {"init": fast_jit(method.init), "predict": fast_jit(method.predict),
              "loss_and_grad": fast_jit(jax.value_and_grad(
                  lambda p, b, r: method.loss(p, b, {}, r, 0), has_aux=True))}
    params = jitted["init"](key(0), make_batch(), {})["params"]
    _CACHE["method"] = (method, jitted, params)
  return _CACHE["method"]


def test_method_init_loss_predict_and_gradients():
  method, jitted, params = method_and_params()
  assert method.postprocess_preset == "co2net"
  labels = method.param_labels(params, 0)
  assert set(jax.tree_util.tree_leaves(labels)) == {"train"}
  batch = make_batch(seed=3, n_valid=[16, 12, 16, 10])
  (loss, aux), grads = jitted["loss_and_grad"](params, batch, key(1))
  assert np.isfinite(float(loss))
  assert set(aux) == {"l_base", "l_supp", "l_norm", "l_guide", "l_oppo", "l_mutual"}
  assert all(np.isfinite(float(v)) for v in aux.values())
  for path in (("classifier", "kernel"), ("trunk", "rgb_attention", "attn_out", "kernel"),
               ("trunk", "flow_attention", "attn_out", "kernel"),
               ("trunk", "rgb_attention", "bit_wise", "conv", "kernel"),
               ("trunk", "fusion", "kernel")):
    g = grads
    for p in path:
      g = g[p]
    assert np.any(np.asarray(g)), path
  # Dropout is active in training: another key gives another loss.
  assert float(jitted["loss_and_grad"](params, batch, key(2))[0][0]) != float(loss)
  # A batch with a dummy video (as evaluation pads): loss and gradients stay finite.
  dummy = {k: np.array(v) for k, v in batch.items()}
  dummy["feat_BxTxD"][3], dummy["mask_BxT"][3] = np.nan, 0
  dummy["label_BxC"][3], dummy["valid_B"][3] = 0, 0
  (loss_d, _), grads_d = jitted["loss_and_grad"](params, dummy, key(1))
  assert np.isfinite(float(loss_d))
  for g in jax.tree_util.tree_leaves((grads, grads_d)):
    assert np.all(np.isfinite(np.asarray(g)))
  pred = jitted["predict"](params, batch, {})
  assert pred["video_scores_BxC"].shape == (4, C)
  assert pred["cas_BxTxC"].shape == (4, 16, C) and pred["actionness_BxT"].shape == (4, 16)
  s = np.asarray(pred["video_scores_BxC"])
  assert np.all(s > 0) and np.all(s.sum(-1) < 1)   # the background column was dropped


def test_method_predict_padding_and_dummy_video():
  _, jitted, params = method_and_params()
  short = make_batch(seed=4, n_valid=[16, 12, 16, 9])
  padded = garbage_padded(short, 24)
  p_short = jitted["predict"](params, short, {})
  p_pad = jitted["predict"](params, padded, {})
  np.testing.assert_allclose(p_pad["video_scores_BxC"], p_short["video_scores_BxC"],
                             rtol=1e-5, atol=1e-6)
  for name in ("cas_BxTxC", "actionness_BxT"):
    np.testing.assert_allclose(p_pad[name][:, :16], p_short[name], rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(p_pad[name])[:, 16:])
  # A dummy video next to real ones: the real ones' scores do not move.
  mixed = {k: np.array(v) for k, v in padded.items()}
  mixed["feat_BxTxD"][2], mixed["mask_BxT"][2] = np.nan, 0
  mixed["label_BxC"][2], mixed["valid_B"][2] = 0, 0
  p_mixed = jitted["predict"](params, mixed, {})
  for name in p_pad:
    assert np.all(np.isfinite(np.asarray(p_mixed[name]))), name
    np.testing.assert_allclose(np.asarray(p_mixed[name])[[0, 1, 3]],
                               np.asarray(p_pad[name])[[0, 1, 3]], rtol=1e-5, atol=1e-6)


def test_method_loss_padding_invariance_in_eval_mode():
  """video_loss on eval-mode outputs: padding the batch (k from the valid length, masked
  softmax and means) leaves every term unchanged."""
  method, _, params = method_and_params()

  @fast_jit
  def terms(p, b):
    out = method.model.apply({"params": p}, b, None, train=False)
    return co2net.video_loss(out, out["cas_BxTxC1"], b, method.settings)[1]

  short = make_batch(seed=6, n_valid=[16, 12, 16, 9])
  t_short, t_pad = terms(params, short), terms(params, garbage_padded(short, 24))
  for name in t_short:
    np.testing.assert_allclose(t_pad[name], t_short[name], rtol=1e-5, atol=1e-6,
                               err_msg=name)


# ------------------------------------------------------------------------------------------
# 9. The command line: 2 training steps with an evaluation, then --mode=eval.


def _write_dataset(out_dir):
  rng = np.random.default_rng(1)
  splits = {}
  for split, n in (("train", 6), ("test", 3)):
    videos = []
    for i in range(n):
      num_t, cls = int(rng.integers(10, 24)), i % C
      i3d = rng.normal(size=(num_t, D)).astype(np.float32)
      i3d[2:8, cls] += 2.0
      videos.append(data_format.VideoRecord(
          name=f"{split}_{i}", duration=num_t * 0.64, features={"i3d": i3d},
          label=np.eye(C, dtype=np.float32)[cls],
          segments=np.array([[2 * 0.64, 8 * 0.64]], np.float32),
          segment_labels=np.array([cls], np.int32)))
    splits[split] = videos
  data_format.write_dataset(str(out_dir), dataset="tiny", classes=["a", "b", "c"],
                            feature_dims={"i3d": D}, splits=splits, num_shards=1)
  return str(out_dir)


def _main(args, cwd):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="--xla_backend_optimization_level=0",
             WSTAL_DATA_CACHE=str(cwd),
             JAX_COMPILATION_CACHE_DIR=str(cwd / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, "-m", "wstal_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


def test_cli_train_then_eval(tmp_path):
  data = _write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  proc = _main([f"--config={ROOT / 'configs' / 'co2net.py'}", f"--config.data.dir={data}",
                f"--workdir={workdir}", "--config.train.num_steps=2",
                "--config.train.eval_every=2", "--config.train.log_every=1",
                "--config.data.num_snippets=16", "--config.train.batch_size=4",
                "--config.eval.batch_size=4", "--config.co2net.attn_hidden=8",
                "--config.eval.num_plots=0"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert "average_mAP" in metrics and metrics["step"] == 2
  assert np.isfinite(metrics["average_mAP"])
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"version", "results", "external_data"}
  assert set(results["results"]) == {f"test_{i}" for i in range(3)}
  for rows in results["results"].values():
    for row in rows:
      assert row["label"] in ("a", "b", "c") and len(row["segment"]) == 2
      assert row["segment"][0] <= row["segment"][1] and np.isfinite(row["score"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["method"] == "co2net" and config["co2net"]["attn_hidden"] == 8

  eval_dir = tmp_path / "eval"
  proc = _main(["--mode=eval", f"--workdir={workdir}", "--checkpoint=latest",
                f"--eval_dir={eval_dir}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.loads((eval_dir / "metrics.json").read_text())
  for k in ("average_mAP", "acc", "cls_mAP", "step"):
    assert again[k] == metrics[k], k
  assert json.loads((eval_dir / "results.json").read_text())["results"] == results["results"]
