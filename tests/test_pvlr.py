"""PVLR (pvlr.txt): every loss term against an independent numpy computation, snippet mining
against scipy.ndimage, P-CAS sampling / evaluation paths, masks, and the method object."""
import importlib.util
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from scipy import ndimage

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.methods import pvlr
from wstal_jax.models import pvlr as pvlr_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(arg=""):
  path = os.path.join(ROOT, "configs", "pvlr.py")
  spec = importlib.util.spec_from_file_location("pvlr_config_for_test", path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _full_cov_kl(mu_p, var_p, mu_q, var_q):
  """KL(N_p || N_q) with full matrices (Eq. 16 as printed)."""
  sp, sq = np.diag(var_p), np.diag(var_q)
  sq_inv = np.linalg.inv(sq)
  d = mu_q - mu_p
  return 0.5 * (np.trace(sq_inv @ sp) + d @ sq_inv @ d + np.log(np.linalg.det(sq)
                                                                / np.linalg.det(sp)) - len(d))


def test_gaussian_divergences_match_full_covariance_formulas():
  rng = np.random.default_rng(0)
  for _ in range(5):
    mu_p, mu_q = rng.normal(size=6), rng.normal(size=6)
    var_p, var_q = rng.uniform(0.2, 2.0, 6), rng.uniform(0.2, 2.0, 6)
    args = [jnp.asarray(x, jnp.float32) for x in (mu_p, var_p, mu_q, var_q)]
    kl = float(pvlr.kl_gauss(*args))
    np.testing.assert_allclose(kl, _full_cov_kl(mu_p, var_p, mu_q, var_q), rtol=1e-5)
    sym = float(pvlr.divergence(*args, "kl"))
    np.testing.assert_allclose(
        sym, 0.5 * (_full_cov_kl(mu_p, var_p, mu_q, var_q) + _full_cov_kl(mu_q, var_q, mu_p,
                                                                           var_p)), rtol=1e-5)
    s = np.diag((var_p + var_q) / 2)
    d = mu_p - mu_q
    bhat = d @ np.linalg.inv(s) @ d / 8 + 0.5 * np.log(
        np.linalg.det(s) / np.sqrt(np.prod(var_p) * np.prod(var_q)))
    np.testing.assert_allclose(float(pvlr.divergence(*args, "bhattacharyya")), bhat, rtol=1e-5)
    np.testing.assert_allclose(float(pvlr.divergence(*args, "mahalanobis")),
                               d @ np.linalg.inv(s) @ d, rtol=1e-5)
  # Identical Gaussians: every divergence is 0.
  z = jnp.ones(4)
  for metric in pvlr.METRICS:
    assert abs(float(pvlr.divergence(z, z, z, z, metric))) < 1e-6


@pytest.mark.parametrize("width", [1, 2, 3, 6, 7])
def test_erosion_dilation_match_scipy(width):
  rng = np.random.default_rng(width)
  b = (rng.uniform(size=(4, 40)) > 0.4).astype(np.float32)
  structure = np.ones((1, width), bool)
  np.testing.assert_array_equal(np.asarray(pvlr.erode(jnp.asarray(b), width)),
                                ndimage.binary_erosion(b, structure=structure).astype(np.float32))
  np.testing.assert_array_equal(np.asarray(pvlr.dilate(jnp.asarray(b), width)),
                                ndimage.binary_dilation(b, structure=structure)
                                .astype(np.float32))


def test_hard_regions_median_threshold_and_masks():
  # One action run in the middle; padding (last 3) must be neither inner nor outer.
  a = np.array([[0.1, 0.1, 0.1, 0.1, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.1, 0.1, 0.1, 0.0, 0.0,
                 0.0, 0.5, 0.5, 0.5]], np.float32)
  mask = np.ones_like(a)
  mask[0, 16:] = 0
  inner, outer = pvlr.hard_regions(jnp.asarray(a), jnp.asarray(mask), -1.0, 3, 5)
  b = np.zeros(19)
  b[4:10] = 1  # above the median 0.1 of the 16 valid snippets
  expect_inner = ndimage.binary_erosion(b, np.ones(3)) & ~ndimage.binary_erosion(b, np.ones(5))
  expect_outer = ndimage.binary_dilation(b, np.ones(5)) & ~ndimage.binary_dilation(b, np.ones(3))
  expect_outer[16:] = False
  np.testing.assert_array_equal(np.asarray(inner[0]), expect_inner)
  np.testing.assert_array_equal(np.asarray(outer[0]), expect_outer)
  assert np.asarray(inner[0]).tolist().index(True) == 5   # the ring just inside the run
  assert np.asarray(outer[0])[[2, 11]].all()              # and just outside it
  # A fixed theta_b: the same run.
  inner2, _ = pvlr.hard_regions(jnp.asarray(a), jnp.asarray(mask), 0.5, 3, 5)
  np.testing.assert_array_equal(np.asarray(inner2), np.asarray(inner))


def test_mining_picks_only_real_candidates():
  cfg = pvlr.default_config()
  cfg.k_easy, cfg.k_hard, cfg.easy_drop = 4, 3, 0.0
  a = np.zeros((2, 20), np.float32)
  a[0, 5:12] = np.linspace(0.6, 0.9, 7)
  a[1, :] = np.linspace(0.0, 1.0, 20)
  mask = np.ones((2, 20), np.float32)
  mask[1, 10:] = 0  # video 1 has 10 valid snippets
  picks = pvlr.mine_snippets(jnp.asarray(a), jnp.asarray(mask), jax.random.key(0), cfg)
  idx, ok = picks["easy_act"]
  assert idx.shape == (2, 4) and ok.shape == (2, 4)
  assert set(np.asarray(idx[0])) == {8, 9, 10, 11}          # the top-4 attention
  assert np.all(np.asarray(idx[1]) < 10)                    # never a padded snippet
  eb_idx, _ = picks["easy_bkg"]
  assert np.all(a[0, np.asarray(eb_idx[0])] == 0.0)
  for name in ("hard_act", "hard_bkg"):
    i, k = picks[name]
    for b in range(2):
      inner, outer = pvlr.hard_regions(jnp.asarray(a), jnp.asarray(mask), -1.0,
                                       cfg.erosion_m, cfg.erosion_M)
      region = np.asarray(inner if name == "hard_act" else outer)[b]
      real = np.asarray(i[b])[np.asarray(k[b])]
      assert region[real].all()
      assert np.asarray(k[b]).sum() == min(cfg.k_hard, region.sum())


def test_intra_loss_matches_numpy():
  rng = np.random.default_rng(1)
  mu = rng.normal(size=(1, 12, 3)).astype(np.float32)
  var = rng.uniform(0.5, 1.5, (1, 12, 3)).astype(np.float32)
  picks = {"hard_act": ([[0, 1]], [[True, True]]), "easy_act": ([[2, 3, 4]], [[True, True, False]]),
           "hard_bkg": ([[5, 6]], [[True, False]]), "easy_bkg": ([[7, 8, 9]], [[True] * 3])}
  picks = {k: (jnp.asarray(i), jnp.asarray(o)) for k, (i, o) in picks.items()}

  def d(i, j):
    return 0.5 * (_full_cov_kl(mu[0, i], var[0, i], mu[0, j], var[0, j])
                  + _full_cov_kl(mu[0, j], var[0, j], mu[0, i], var[0, i]))

  def mean_loss(qs, ks, positive):
    vals = []
    for i in qs:
      for j in ks:
        dd = d(i, j)
        p = dd / (1 + dd)  # the dissimilarity probability of Eq. 17
        vals.append(-np.log(1 - p) if positive else -np.log(p))
    return np.mean(vals)
  expect = (mean_loss([0, 1], [2, 3], True) + mean_loss([0, 1], [7, 8, 9], False)
            + mean_loss([5], [7, 8, 9], True) + mean_loss([5], [2, 3], False))
  got = pvlr.intra_loss(jnp.asarray(mu), jnp.asarray(var), picks, "kl")
  np.testing.assert_allclose(float(got[0]), expect, rtol=1e-4)


def test_inter_loss_two_videos_matches_numpy():
  rng = np.random.default_rng(2)
  mu = rng.normal(size=(2, 5, 3)).astype(np.float32)
  var = rng.uniform(0.5, 1.5, (2, 5, 3)).astype(np.float32)
  attn = rng.uniform(0.1, 1.0, (2, 5)).astype(np.float32)
  mask = np.ones((2, 5), np.float32)
  mask[1, 3:] = 0
  gauss = []
  for b in range(2):
    n = int(mask[b].sum())
    w = attn[b, :n] / attn[b, :n].sum()
    m = (w[:, None] * mu[b, :n]).sum(0)
    v = (w[:, None] * (var[b, :n] + mu[b, :n] ** 2)).sum(0) - m ** 2 + 1e-5
    gauss.append((m, v))
  for labels, same in (([[1, 0, 0], [1, 1, 0]], True), ([[1, 0, 0], [0, 1, 0]], False)):
    dd = 0.5 * (_full_cov_kl(*gauss[0], *gauss[1]) + _full_cov_kl(*gauss[1], *gauss[0]))
    p = 1 / (1 + dd)
    off = -np.log(p) if same else -np.log(1 - p)
    expect = (0 + 0 + 2 * off) / 4  # diagonal pairs: p = 1, H = 1 -> 0 (up to the clip)
    got = pvlr.inter_loss(jnp.asarray(attn), jnp.asarray(mu), jnp.asarray(var),
                          jnp.asarray(mask), jnp.asarray(labels, jnp.float32),
                          jnp.ones(2), "kl", 1e-5)
    np.testing.assert_allclose(float(got), expect, rtol=1e-3, atol=2e-6)
  # An invalid (dummy) video is ignored.
  got = pvlr.inter_loss(jnp.asarray(attn), jnp.asarray(mu), jnp.asarray(var),
                        jnp.asarray(mask), jnp.asarray([[1, 0, 0], [0, 1, 0]], jnp.float32),
                        jnp.asarray([1.0, 0.0]), "kl", 1e-5)
  assert float(got) < 1e-5


def test_distill_and_ortho_losses():
  mu = np.array([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], np.float32)
  img = np.array([[[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]]], np.float32)
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  # cos = 1 and 0 on the valid snippets: -log(1), -log(1/2).
  np.testing.assert_allclose(float(pvlr.distill_loss(jnp.asarray(mu), jnp.asarray(img),
                                                     jnp.asarray(mask))[0]),
                             (0 + np.log(2)) / 2, rtol=1e-6)
  text = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]], np.float32)
  x = text / np.linalg.norm(text, axis=1, keepdims=True)
  expect = np.sum((x @ x.T - np.eye(3)) ** 2)
  np.testing.assert_allclose(float(pvlr.ortho_loss(jnp.asarray(text))), expect, rtol=1e-6)
  assert float(pvlr.ortho_loss(jnp.eye(3) * 4.0)) < 1e-10


def _batch(b=2, t=16, d=8, e=6, c=3, seed=0):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, t), np.float32)
  label = np.zeros((b, c), np.float32)
  label[0, 0] = 1
  if b > 1:
    mask[1, 11:] = 0
    label[1, 1] = 1
  return {"feat_BxTxD": rng.uniform(0, 1, (b, t, d)).astype(np.float32),
          "vlm_BxTxE": rng.normal(size=(b, t, e)).astype(np.float32),
          "mask_BxT": mask, "label_BxC": label, "valid_B": np.ones(b, np.float32),
          "index_B": np.arange(b), "scale_B": np.ones(b, np.float32)}


def _model(**kw):
  args = dict(num_classes=3, rgb_dim=4, embed_dim=6, attn_hidden=8, dropout=0.0,
              attn_dropout=0.0, num_samples=5)
  args.update(kw)
  return pvlr_model.PVLRModel(**args)


def test_pcas_eval_uses_the_mean_and_training_samples_k_times():
  batch = _batch()
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)}
  model = _model()
  variables = model.init({"params": jax.random.key(0)}, batch, consts, train=False)
  out = model.apply(variables, batch, consts, train=False)
  assert out["pcas_BxTxC1"].shape == (2, 16, 4)
  assert out["mu_BxTxE"].shape == out["var_BxTxE"].shape == (2, 16, 6)
  assert np.all(np.asarray(out["var_BxTxE"]) >= 0)
  # Evaluation: cos(mu, [x_c; background]) / tau, computed here from the outputs and params.
  classes = np.concatenate([np.asarray(out["text_CxE"]),
                            np.asarray(variables["params"]["background"])[None]])
  classes /= np.linalg.norm(classes, axis=1, keepdims=True)
  mu = np.asarray(out["mu_BxTxE"])
  cos = mu @ classes.T / np.maximum(np.linalg.norm(mu, axis=-1, keepdims=True), 1e-6)
  valid = batch["mask_BxT"][:, :, None] > 0
  np.testing.assert_allclose(np.asarray(out["pcas_BxTxC1"]), np.where(valid, cos / 0.03, 0),
                             rtol=1e-4, atol=1e-4)
  # Training samples: different sample keys differ; eps_std = 0 gives the mean's P-CAS.
  rngs = lambda k: {"dropout": jax.random.key(1), "sample": jax.random.key(k)}
  t1 = model.apply(variables, batch, consts, train=True, rngs=rngs(1))["pcas_BxTxC1"]
  t2 = model.apply(variables, batch, consts, train=True, rngs=rngs(2))["pcas_BxTxC1"]
  assert not np.allclose(t1, t2)
  t0 = _model(eps_std=0.0).apply(variables, batch, consts, train=True, rngs=rngs(1))
  np.testing.assert_allclose(np.asarray(t0["pcas_BxTxC1"]), np.asarray(out["pcas_BxTxC1"]),
                             rtol=1e-4, atol=1e-4)
  # K = 0 (Table 4's deterministic CAS) samples nothing even in training.
  tk0 = _model(num_samples=0).apply(variables, batch, consts, train=True, rngs=rngs(1))
  np.testing.assert_allclose(np.asarray(tk0["pcas_BxTxC1"]), np.asarray(out["pcas_BxTxC1"]),
                             rtol=1e-4, atol=1e-4)
  # A mean of K cosines / tau stays within [-1/tau, 1/tau].
  assert np.all(np.abs(np.asarray(t1)) <= 1 / 0.03 + 1e-3)


def test_padding_invariance_of_predictions():
  batch = _batch(b=1)
  batch["mask_BxT"][:] = 1
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)}
  model = _model()
  variables = model.init({"params": jax.random.key(0)}, batch, consts, train=False)
  out = model.apply(variables, batch, consts, train=False)
  padded = {k: v for k, v in batch.items()}
  extra = 7
  for key in ("feat_BxTxD", "vlm_BxTxE"):
    pad = np.full((1, extra, batch[key].shape[-1]), np.nan, np.float32)
    padded[key] = np.concatenate([batch[key], pad], axis=1)
  padded["mask_BxT"] = np.concatenate([batch["mask_BxT"], np.zeros((1, extra), np.float32)], 1)
  out_p = model.apply(variables, padded, consts, train=False)
  for key in ("pcas_BxTxC1", "attn_BxT", "mu_BxTxE"):
    np.testing.assert_allclose(np.asarray(out_p[key])[:, :16], np.asarray(out[key]),
                               rtol=1e-5, atol=1e-5)
    assert np.all(np.asarray(out_p[key])[:, 16:] == 0)


def _method(**overrides):
  config = _config()
  config.co2net.attn_hidden = 8
  for k, v in overrides.items():
    config.pvlr[k] = v
  return methods.get_method(config, 3, {"feat": 8, "vlm": 6, "text": 6})


def test_method_loss_terms_switches_and_jit():
  batch = _batch()
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)}
  method = _method()
  params = method.init(jax.random.key(0), batch, consts)["params"]
  loss, terms = jax.jit(method.loss)(params, batch, consts, jax.random.key(1), 0)
  assert np.isfinite(float(loss))
  for key in ("l_base", "l_supp", "l_norm", "l_guide", "l_oppo", "l_kd", "l_ortho", "l_intra",
              "l_inter"):
    assert key in terms and np.isfinite(float(terms[key])), key
  assert "l_mutual" not in terms  # PVLR's Eq. 6 has no mutual learning
  cfg = method.cfg
  expect = (0.8 * (terms["l_base"] + terms["l_supp"]) + 0.8 * terms["l_norm"]
            + 0.8 * terms["l_guide"] + 1.0 * terms["l_oppo"] + cfg.w_kd * terms["l_kd"]
            + cfg.w_ortho * terms["l_ortho"] + cfg.w_intra * terms["l_intra"]
            + cfg.w_inter * terms["l_inter"])
  np.testing.assert_allclose(float(loss), float(expect), rtol=1e-5)
  grads = jax.grad(lambda p: method.loss(p, batch, consts, jax.random.key(1), 0)[0])(params)
  for name in ("g_mu", "g_sigma", "text", "trunk"):
    assert any(float(jnp.abs(g).sum()) > 0 for g in jax.tree.leaves(grads[name])), name
  # Table 3 row 2: only P-CAS + L_kd on top of L_vid.
  m2 = methods.get_method(_config("exp=2"), 3, {"feat": 8, "vlm": 6, "text": 6})
  _, t2 = m2.loss(m2.init(jax.random.key(0), batch, consts)["params"], batch, consts,
                  jax.random.key(1), 0)
  assert "l_kd" in t2 and not {"l_intra", "l_inter", "l_ortho"} & set(t2)
  out = jax.jit(method.predict)(params, batch, consts)
  assert out["video_scores_BxC"].shape == (2, 3) and out["cas_BxTxC"].shape == (2, 16, 3)
  assert np.all(np.asarray(out["actionness_BxT"])[1, 11:] == 0)


def test_method_config_errors():
  with pytest.raises(WstalError, match="CLIP image features"):
    methods.get_method(_config(), 3, {"feat": 8, "vlm": None, "text": 6})
  with pytest.raises(WstalError, match="one space"):
    methods.get_method(_config(), 3, {"feat": 8, "vlm": 6, "text": 5})
  with pytest.raises(WstalError, match="config.pvlr.metric"):
    _method(metric="cosine")
  with pytest.raises(WstalError, match="erosion_m"):
    _method(erosion_m=6, erosion_M=3)
  with pytest.raises(ValueError, match="rows 1..5"):
    _config("exp=7")
  assert _config("exp=1").method == "co2net"
  with pytest.raises(WstalError, match="config.pvlr.logit_scale"):
    _method(train_similarity="dot", logit_scale="learnable")
  with pytest.raises(WstalError, match="config.pvlr.metric"):
    _method(intra_form="log_mean", metric="bhattacharyya")
  for field, value in (("logit_scale", "free"), ("var_param", "exp"),
                       ("divergence_scale", "max"), ("var_init", 0.0),
                       ("train_similarity", "l1")):
    with pytest.raises(WstalError, match=f"config.pvlr.{field}"):
      _method(**{field: value})


def test_table3_rows_change_only_what_the_paper_changes():
  """Review finding 4: row 1 is the CO2-Net base with PVLR's L_vid (no mutual learning,
  w_cls 0.8); row 2 adds only P-CAS + L_kd."""
  row1, row2 = _config("exp=1"), _config("exp=2")
  assert (row1.co2net.w_mutual, row1.co2net.w_cls) == (0.0, 0.8)
  assert row1.co2net.to_dict() == row2.co2net.to_dict()
  assert row1.train.to_dict() == row2.train.to_dict()
  assert row1.optim.to_dict() == row2.optim.to_dict()


def test_pvlr_review_options():
  """Learnable P-CAS logit scale (init 1 / tau, trained), softplus variances (start at
  var_init, never dead), per-dimension divergences (D / E), statistics logged."""
  batch = _batch()
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)}
  method = _method(logit_scale="learnable", var_param="softplus", var_init=0.01)
  params = method.init(jax.random.key(0), batch, consts)["params"]
  np.testing.assert_allclose(float(jnp.exp(params["log_logit_scale"])),
                             1.0 / method.cfg.temperature, rtol=1e-5)
  loss, terms = jax.jit(method.loss)(params, batch, consts, jax.random.key(1), 0)
  np.testing.assert_allclose(float(terms["stat_logit_scale"]), 1.0 / method.cfg.temperature,
                             rtol=1e-5)
  assert 0.0 < float(terms["stat_var_mean"]) < 0.05     # small at init, softplus never 0
  grads = jax.grad(lambda p: method.loss(p, batch, consts, jax.random.key(1), 0)[0])(params)
  assert abs(float(grads["log_logit_scale"])) > 0
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))
  out = method.model.apply({"params": params}, batch, consts, train=False)
  assert float(jnp.min(out["var_BxTxE"][0])) > 0
  # ReLU variances: the literal Eq. 7, zero for a dead unit.
  relu = _method(var_param="relu")
  out_r = relu.model.apply({"params": relu.init(jax.random.key(0), batch, consts)["params"]},
                           batch, consts, train=False)
  assert float(jnp.min(out_r["var_BxTxE"][0])) == 0.0
  # The authors' training P-CAS: mu . x_c / 8 (unit class vectors), evaluation still cos / tau.
  dot = _method(train_similarity="dot", num_samples=0, logit_scale="fixed")
  params_d = dot.init(jax.random.key(0), batch, consts)["params"]
  tr = dot.model.apply({"params": params_d}, batch, consts, train=True,
                       rngs={"dropout": jax.random.key(2)})
  classes = np.asarray(pvlr.l2_normalize(jnp.concatenate(
      [tr["text_CxE"], params_d["background"][None]], 0)))
  mu = np.asarray(tr["mu_BxTxE"])
  np.testing.assert_allclose(np.asarray(tr["pcas_BxTxC1"])[0],
                             mu[0] @ classes.T / 8.0, rtol=1e-4, atol=1e-5)
  ev = dot.model.apply({"params": params_d}, batch, consts, train=False)
  mu_e = np.asarray(ev["mu_BxTxE"])[0]
  cos = (mu_e / np.linalg.norm(mu_e, axis=-1, keepdims=True)) @ classes.T
  np.testing.assert_allclose(np.asarray(ev["pcas_BxTxC1"])[0], cos / dot.cfg.temperature,
                             rtol=1e-4, atol=1e-4)
  # D averaged over dimensions.
  rng = np.random.default_rng(0)
  mu_p, mu_q = rng.normal(size=(2, 5, 6))
  var_p, var_q = rng.uniform(0.1, 2.0, (2, 5, 6))
  for metric in pvlr.METRICS:
    total = pvlr.divergence(mu_p, var_p, mu_q, var_q, metric)
    np.testing.assert_allclose(pvlr.divergence(mu_p, var_p, mu_q, var_q, metric, "mean"),
                               total / 6, rtol=1e-6)


def test_clip_text_mode_from_a_converted_checkpoint(tmp_path):
  """text_mode 'clip': a (small, random) CLIP text tower saved as our .npz is loaded, kept
  out of the trained params (constants), fed the dataset's class names with 4 + 4 learnable
  context vectors, and the shortened context gives exactly the 77-position encoding."""
  pytest.importorskip("instant_clip_tokenizer", reason="CLIP tokenizer package not installed")
  from wstal_jax.models import clip_convert, clip_text
  cc = clip_text.ClipTextConfig(width=16, layers=1, heads=2, output_dim=6)
  tower = clip_text.ClipTextEncoder(cc)
  clip_params = tower.init(jax.random.key(5), jnp.zeros((1, 77), jnp.int32))["params"]
  ckpt = str(tmp_path / "clip_text_small.npz")
  clip_convert.save_npz(ckpt, clip_params, cc)
  config = _config()
  config.co2net.attn_hidden = 8
  config.pvlr.clip_checkpoint = ckpt
  names = ["BaseballPitch", "HighJump", "CleanAndJerk"]
  method = methods.get_method(config, 3, {"feat": 8, "vlm": 6, "text": None}, class_names=names)
  assert method.text_mode == "clip"
  assert method.class_texts == ["baseball pitch", "high jump", "clean and jerk"]
  consts = method.extra_consts()
  batch = _batch()
  params = method.init(jax.random.key(0), batch, consts)["params"]
  assert "clip" not in params["text"]                       # frozen weights are constants
  assert set(params["text"]) == {"ctx_pre", "ctx_post"}
  assert params["text"]["ctx_pre"].shape == (4, 16)
  loss, terms = method.loss(params, batch, consts, jax.random.key(1), 0)
  assert np.isfinite(float(loss)) and "l_ortho" in terms
  grads = jax.grad(lambda p: method.loss(p, batch, consts, jax.random.key(1), 0)[0])(params)
  assert float(jnp.abs(grads["text"]["ctx_pre"]).sum()) > 0
  # The class embeddings equal those of the full 77-position prompted encoder.
  out = method.model.apply(method._variables(params, consts), batch, consts, train=False)
  full = clip_text.PromptedClassEncoder(cc, n_pre=4, n_post=4)
  ref = full.apply({"params": {**params["text"], "clip": clip_params}},
                   consts["class_name_ids_CxM"], consts["class_name_len_C"])
  np.testing.assert_allclose(np.asarray(out["text_CxE"]), np.asarray(ref), rtol=1e-5,
                             atol=1e-6)
  # Wrong class-name count and dimension mismatches are clear errors.
  config.pvlr.class_names = "a,b"
  with pytest.raises(WstalError, match="2 names"):
    methods.get_method(config, 3, {"feat": 8, "vlm": 6, "text": None}, class_names=names)
  config.pvlr.class_names = None
  with pytest.raises(WstalError, match="one space"):
    methods.get_method(config, 3, {"feat": 8, "vlm": 7, "text": None}, class_names=names)
  config.pvlr.clip_checkpoint = str(tmp_path / "missing.npz")
  with pytest.raises(WstalError, match="missing.npz"):
    methods.get_method(config, 3, {"feat": 8, "vlm": 6, "text": None}, class_names=names)


def _write_pvlr_dataset(out_dir):
  from wstal_jax.data import format as data_format
  rng = np.random.default_rng(1)
  text = rng.normal(size=(3, 6)).astype(np.float32)
  splits = {}
  for split, n in (("train", 6), ("test", 3)):
    videos = []
    for i in range(n):
      num_t, cls = int(rng.integers(10, 24)), i % 3
      i3d = rng.uniform(0, 1, size=(num_t, 8)).astype(np.float32)
      i3d[2:8, cls] += 2.0
      clip = rng.normal(size=(num_t, 6)).astype(np.float32)
      clip[2:8] += text[cls]
      videos.append(data_format.VideoRecord(
          name=f"{split}_{i}", duration=num_t * 0.64, features={"i3d": i3d, "clip": clip},
          label=np.eye(3, dtype=np.float32)[cls],
          segments=np.array([[2 * 0.64, 8 * 0.64]], np.float32),
          segment_labels=np.array([cls], np.int32)))
    splits[split] = videos
  data_format.write_dataset(str(out_dir), dataset="tiny", classes=["a", "b", "c"],
                            feature_dims={"i3d": 8, "clip": 6}, splits=splits, num_shards=1,
                            feature_text_embeddings={"clip": text})
  return str(out_dir)


def test_cli_two_steps_train_then_eval(tmp_path):
  import json
  import subprocess
  import sys
  data = _write_pvlr_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=ROOT, XLA_FLAGS="--xla_backend_optimization_level=0",
             WSTAL_DATA_CACHE=str(tmp_path))

  def main(*args):
    return subprocess.run([sys.executable, "-m", "wstal_jax.main", *args], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=600)
  proc = main(f"--config={ROOT}/configs/pvlr.py", f"--config.data.dir={data}",
              f"--workdir={workdir}", "--config.train.num_steps=2", "--config.train.eval_every=2",
              "--config.data.num_snippets=16", "--config.train.batch_size=4",
              "--config.eval.batch_size=4", "--config.co2net.attn_hidden=8",
              "--config.pvlr.k_easy=4", "--config.eval.num_plots=0")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "learnable offset per class" in proc.stderr   # the text-side choice is logged
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["step"] == 2 and np.isfinite(metrics["average_mAP"])
  config = json.loads((workdir / "config.json").read_text())
  assert config["method"] == "pvlr" and config["data"]["vlm_feature"] == "clip"
  proc = main("--mode=eval", f"--workdir={workdir}", "--checkpoint=latest",
              f"--eval_dir={tmp_path / 'eval'}")
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert again["average_mAP"] == metrics["average_mAP"] and again["acc"] == metrics["acc"]


# ------------------------------------------------------------------------------------------
# The authors' released code's readings (issue 20): each switch against numpy, the preset.


def _kl_np(mu_p, var_p, mu_q, var_q):
  return 0.5 * np.sum(var_p / var_q + (mu_q - mu_p) ** 2 / var_q - 1 + np.log(var_q / var_p))


def test_intra_loss_code_is_the_log_of_averaged_similarities():
  rng = np.random.default_rng(4)
  mu = rng.normal(size=(1, 12, 3)).astype(np.float32)
  var = rng.uniform(0.5, 1.5, (1, 12, 3)).astype(np.float32)
  picks = {"hard_act": ([[0, 1]], [[True, True]]), "easy_act": ([[2, 3, 4]], [[True, True, False]]),
           "hard_bkg": ([[5, 6]], [[True, False]]), "easy_bkg": ([[7, 8, 9]], [[True] * 3])}
  picks = {k: (jnp.asarray(i), jnp.asarray(o)) for k, (i, o) in picks.items()}
  m, v = mu[0].astype(np.float64), var[0].astype(np.float64)

  def sim(qs, ks):
    fwd = np.mean([1 / (1 + _kl_np(m[i], v[i], m[j], v[j])) for i in qs for j in ks])
    bwd = np.mean([1 / (1 + _kl_np(m[j], v[j], m[i], v[i])) for i in qs for j in ks])
    return 0.5 * (fwd + bwd)
  expect = (-np.log(sim([0, 1], [2, 3])) - np.log(1 - sim([0, 1], [7, 8, 9]))
            - np.log(sim([5], [7, 8, 9])) - np.log(1 - sim([5], [2, 3])))
  got = pvlr.intra_loss_code(jnp.asarray(mu), jnp.asarray(var), picks)
  np.testing.assert_allclose(float(got[0]), expect, rtol=1e-4)


def test_inter_loss_code_matches_numpy():
  rng = np.random.default_rng(5)
  mu = rng.normal(size=(3, 5, 3)).astype(np.float32)
  var = rng.uniform(0.5, 1.5, (3, 5, 3)).astype(np.float32)
  attn = rng.uniform(0.1, 1.0, (3, 5)).astype(np.float32)
  mask = np.ones((3, 5), np.float32)
  mask[1, 3:] = 0
  labels = np.array([[1, 0], [1, 0], [0, 1]], np.float32)
  g = []
  for b in range(3):
    n = int(mask[b].sum())
    w = attn[b, :n, None] / n                      # raw attention weights, mean over time
    mean = (w * mu[b, :n]).sum(0)
    g.append((mean, (w * (var[b, :n] + mu[b, :n] ** 2)).sum(0) - mean ** 2 + 1e-5))
  same, diff = [], []
  for i in range(3):
    for j in range(3):
      p = 1 / (1 + _kl_np(*g[i], *g[j]))
      (same if labels[i] @ labels[j] > 0 else diff).append(p)
  p_same = np.clip(same, 1e-6, 1 - 1e-6)
  expect = np.mean(-np.log(p_same)) + np.mean(-np.log(1 - np.array(diff)))
  got = pvlr.inter_loss_code(jnp.asarray(attn), jnp.asarray(mu), jnp.asarray(var),
                             jnp.asarray(mask), jnp.asarray(labels), jnp.ones(3), 1e-5)
  np.testing.assert_allclose(float(got), expect, rtol=1e-4)


def test_distill_and_ortho_code_forms():
  mu = np.array([[[1.0, 0.0], [0.0, 2.0], [5.0, 5.0]]], np.float32)
  img = np.array([[[2.0, 0.0], [1.0, 0.0], [1.0, 0.0]]], np.float32)
  mask = np.array([[1.0, 1.0, 0.0]], np.float32)
  # (cos + 1) / 2 = 1 and 1/2 on the valid snippets: -log(3/4).
  np.testing.assert_allclose(float(pvlr.distill_loss_code(jnp.asarray(mu), jnp.asarray(img),
                                                          jnp.asarray(mask))),
                             -np.log(0.75), rtol=1e-6)
  text = np.array([[2.0, 0.0], [1.0, 1.0], [0.0, -3.0]], np.float32)
  x = text / np.linalg.norm(text, axis=1, keepdims=True)
  np.testing.assert_allclose(float(pvlr.ortho_loss(jnp.asarray(text), "code")),
                             np.sqrt(np.sum((x @ x.T - np.eye(3)) ** 2)), rtol=1e-6)
  # One side detached: the gradient is half of that of the symmetric (undetached) norm.
  def full(t):
    xn = pvlr.l2_normalize(t)
    return jnp.sqrt(jnp.sum((xn @ xn.T - jnp.eye(3)) ** 2))
  np.testing.assert_allclose(jax.grad(lambda t: pvlr.ortho_loss(t, "code"))(jnp.asarray(text)),
                             0.5 * jax.grad(full)(jnp.asarray(text)), rtol=1e-5, atol=1e-7)


def test_code_sampling_std_is_exp_half_v_and_dot_uses_raw_class_vectors():
  """var_param='code': a ReLU head whose output is the variance in the divergences but a
  log-variance for sampling (std exp(v / 2)); dot_text_norm=False: the training P-CAS is
  z . x_c / 8 with the raw class vectors (checked at eps_std = 0, where z = mu)."""
  v = jnp.asarray([0.0, 1.0, 4.0])
  np.testing.assert_allclose(pvlr_model.sample_std(v, "code"), np.exp(np.asarray(v) / 2),
                             rtol=1e-6)
  np.testing.assert_allclose(pvlr_model.sample_std(v, "relu"), np.sqrt(np.asarray(v) + 1e-8),
                             rtol=1e-6)
  batch = _batch()
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)}
  method = _method(var_param="code", eps_std=0.0, train_similarity="dot", dot_text_norm=False,
                   num_samples=2, logit_scale="fixed")
  params = method.init(jax.random.key(0), batch, consts)["params"]
  out = method.model.apply({"params": params}, batch, consts, train=True,
                           rngs={"dropout": jax.random.key(2), "sample": jax.random.key(5)})
  mu, var = np.asarray(out["mu_BxTxE"]), np.asarray(out["var_BxTxE"])
  assert var.min() == 0.0 and var.max() > 0                    # a ReLU head
  raw = np.asarray(out["classes_C1xE"])
  assert not np.allclose(np.linalg.norm(raw, axis=-1), 1.0)
  np.testing.assert_allclose(np.asarray(out["pcas_BxTxC1"])[0], mu[0] @ raw.T / 8.0,
                             rtol=1e-4, atol=1e-5)
  normed = _method(eps_std=0.0, train_similarity="dot", num_samples=2, logit_scale="fixed")
  out_n = normed.model.apply({"params": params}, batch, consts, train=True,
                             rngs={"dropout": jax.random.key(2), "sample": jax.random.key(5)})
  unit = raw / np.linalg.norm(raw, axis=-1, keepdims=True)
  np.testing.assert_allclose(np.asarray(out_n["pcas_BxTxC1"])[0], mu[0] @ unit.T / 8.0,
                             rtol=1e-4, atol=1e-5)


def test_reading_code_preset():
  paper, code = _config(), _config("reading=code")
  assert code.name == "pvlr-code" and _config("reading=code,exp=3").name == "pvlr-exp3-code"
  mod_spec = importlib.util.spec_from_file_location("pvlr_cfg", os.path.join(ROOT, "configs",
                                                                              "pvlr.py"))
  mod = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(mod)
  for k, v in mod.CODE_READING.items():
    assert code.pvlr[k] == v, k
  changed = {k for k in paper.pvlr if paper.pvlr[k] != code.pvlr[k]}
  assert changed <= set(mod.CODE_READING)
  assert code.eval.postprocess.cas_source.enabled and code.eval.postprocess.nms.sigma == 0.2
  assert not paper.eval.postprocess.cas_source.enabled
  with pytest.raises(ValueError, match="reading"):
    _config("reading=x")
  config = _config("reading=code")
  config.co2net.attn_hidden = 8
  method = methods.get_method(config, 3, {"feat": 8, "vlm": 6, "text": 6})
  batch = _batch()
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 6)).astype(np.float32)}
  params = method.init(jax.random.key(0), batch, consts)["params"]
  loss, terms = jax.jit(method.loss)(params, batch, consts, jax.random.key(1), 0)
  weights = method.loss_weights()
  assert weights["l_kd"] == 200.0
  np.testing.assert_allclose(float(loss), sum(w * float(terms[t]) for t, w in weights.items()),
                             rtol=1e-5)
  for t in ("l_kd", "l_ortho", "l_intra", "l_inter"):
    assert np.isfinite(float(terms[t])) and float(terms[t]) > 0, t


def test_pcas_separates_orthogonal_texts_and_the_learnable_scale_sharpens_collinear_ones():
  """Review finding 1: with mu on class 0's text, P-CAS at the default tau (0.3) passes the
  0.2 class threshold when the 20 class texts are orthogonal, not when they are as collinear
  as the built-in CLIP texts (pairwise cosine ~0.58); the learnable scale (init 1 / tau) gets
  a gradient that raises it on that case, so training can restore the margin."""
  num_c, e = 20, 32
  batch = _batch(b=1, t=4, e=e, c=num_c)
  batch["label_BxC"][0, 0] = 1
  rng = np.random.default_rng(0)
  basis = np.linalg.qr(rng.normal(size=(e, num_c + 1)))[0].T      # C + 1 orthonormal rows
  ortho, shared = basis[:num_c].astype(np.float32), basis[num_c]
  collinear = ortho * np.sqrt(1 - 0.58) + np.sqrt(0.58) * shared            # cosines 0.58
  temperature = pvlr.default_config().temperature

  def class0_prob(texts, logit_scale="fixed"):
    model = _model(num_classes=num_c, embed_dim=e, temperature=temperature,
                   logit_scale=logit_scale)
    consts = {"text_CxE": texts.astype(np.float32)}
    params = model.init({"params": jax.random.key(0)}, batch, consts, train=False)["params"]
    params = jax.tree.map(lambda x: x, params)
    params["g_mu"] = {"kernel": jnp.zeros_like(params["g_mu"]["kernel"]),
                      "bias": jnp.asarray(texts[0])}                      # mu = x_0
    params["text"] = {"offsets": jnp.zeros_like(params["text"]["offsets"])}

    def prob(p):
      out = model.apply({"params": p}, batch, consts, train=False)
      return jax.nn.softmax(out["pcas_BxTxC1"][0, 0])[0]
    return float(prob(params)), (jax.grad(lambda p: -jnp.log(prob(p)))(params)
                                 if logit_scale == "learnable" else None)
  p_ortho, _ = class0_prob(ortho)
  p_col, _ = class0_prob(collinear)
  assert p_ortho > 0.5 > 0.2 > p_col, (p_ortho, p_col)
  _, grads = class0_prob(collinear, "learnable")
  assert float(grads["log_logit_scale"]) < 0     # gradient descent raises the scale


def test_adapter_and_background_init_options():
  """adapter_init='torch': nn.Linear's U(+-1/sqrt(fan_in)) for kernel and bias;
  background_init='unit': a background vector of norm ~1 (a CLIP text feature's)."""
  batch = _batch(e=64)
  consts = {"text_CxE": np.random.default_rng(3).normal(size=(3, 64)).astype(np.float32)}
  torch_like = _model(embed_dim=64, adapter_init="torch", background_init="unit")
  p = torch_like.init({"params": jax.random.key(0)}, batch, consts, train=False)["params"]
  fan_in = p["g_mu"]["kernel"].shape[0]
  for name in ("g_mu", "g_sigma"):
    for leaf in ("kernel", "bias"):
      x = np.asarray(p[name][leaf])
      assert np.abs(x).max() <= 1 / np.sqrt(fan_in) + 1e-7
      assert np.abs(x).max() > 0.8 / np.sqrt(fan_in)          # spread over the whole range
  assert 0.7 < np.linalg.norm(p["background"]) < 1.3
  flax_like = _model(embed_dim=64)
  q = flax_like.init({"params": jax.random.key(0)}, batch, consts, train=False)["params"]
  assert not np.any(np.asarray(q["g_mu"]["bias"]))
  assert np.linalg.norm(q["background"]) < 0.2
