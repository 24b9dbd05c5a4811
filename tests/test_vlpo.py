"""Tests of VLPO (wstal_jax/methods/vlpo.py, wstal_jax/models/vlpo.py).

Loss terms against hand-computed values on tiny cases, set logic of DSP / PPG / APR on
hand-made inputs, padding invariance, switches, gradients, and a short jitted overfit run.
Every model call is jitted and each configuration is built once (`build`): on a shared CPU
eager dispatch and repeated compilation dominate the runtime.
"""
import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from wstal_jax import layers
from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.methods import vlpo

B, T, D, E, C = 2, 24, 8, 6, 4
DIMS = {"feat": D, "vlm": E, "text": E}
OFF = {k: False for k in vlpo.SWITCHES}   # every VLPO switch off: the baseline's loss


def make_config(method="vlpo", **overrides):
  """Tiny model; dropout 0 unless asked (padding tests compare across lengths)."""
  cfg = ml_collections.ConfigDict()
  cfg.method = method
  cfg.vlpo = vlpo.default_config()
  cfg.vlpo.embed_dim = 16
  cfg.vlpo.act_hidden_dim = 16
  cfg.vlpo.dropout = 0.0
  for k, v in overrides.items():
    cfg.vlpo[k] = v
  return cfg


def make_batch(seed=0, t=T, n_valid=None, b=B):
  """Random batch; video i has n_valid[i] valid snippets (the rest is zero padding)."""
  rng = np.random.default_rng(seed)
  n_valid = [t] * b if n_valid is None else n_valid
  mask = np.zeros((b, t), np.float32)
  for i, n in enumerate(n_valid):
    mask[i, :n] = 1
  label = np.zeros((b, C), np.float32)
  label[np.arange(b), np.arange(b) % C] = 1
  feat = rng.normal(size=(b, t, D)).astype(np.float32) * mask[:, :, None]
  vlm = rng.normal(size=(b, t, E)).astype(np.float32) * mask[:, :, None]
  return {"feat_BxTxD": feat, "vlm_BxTxE": vlm, "mask_BxT": mask, "label_BxC": label,
          "valid_B": np.ones(b, np.float32)}


def make_consts(seed=1):
  return {"text_CxE": np.random.default_rng(seed).normal(size=(C, E)).astype(np.float32)}


def key(seed):
  """PRNG key; 'rbg' compiles much faster than threefry on CPU (init, dropout)."""
  return jax.random.key(seed, impl="rbg")


def fast_jit(fn):
  """jax.jit with XLA's backend optimisation off: these tests compile far more than they run."""
  return jax.jit(fn, compiler_options={"xla_backend_optimization_level": 0})


class Jitted:
  """A method with jitted init / loss / predict / apply."""

  def __init__(self, method):
    self.method = method
    self.settings = method.settings
    self.init = fast_jit(method.init)
    self.loss = fast_jit(method.loss)
    self.predict = fast_jit(method.predict)
    self.param_labels = method.param_labels
    self.apply = fast_jit(lambda params, batch, consts: method.model.apply(
        {"params": params}, batch, consts, train=False))


_METHODS, _PARAMS = {}, {}


def build(method="vlpo", seed=0, **overrides):
  """(Jitted method, params) for make_config(method, **overrides), cached across tests so
  that each configuration compiles once per input shape."""
  cfg = make_config(method, **overrides)
  cfg_key = cfg.to_json()
  if cfg_key not in _METHODS:
    _METHODS[cfg_key] = Jitted(methods.get_method(cfg, C, DIMS))
  jitted = _METHODS[cfg_key]
  if (cfg_key, seed) not in _PARAMS:
    _PARAMS[cfg_key, seed] = jitted.init(key(seed), make_batch(), make_consts())["params"]
  return jitted, _PARAMS[cfg_key, seed]


def gce_np(s, pos, neg, q):
  lp = [(1 - si ** q) / q for si, p in zip(s, pos) if p]
  ln = [(1 - (1 - si) ** q) / q for si, n in zip(s, neg) if n]
  return (sum(lp) / max(len(lp), 1)) + (sum(ln) / max(len(ln), 1))


# ------------------------------------------------------------------------------------------
# Config and construction.


def test_default_config_matches_paper():
  c = vlpo.default_config()
  assert (c.q, c.topk_divisor) == (0.6, 8)
  assert (c.lambda1, c.lambda2, c.lambda3) == (300.0, 0.1, 0.5)
  assert (c.alpha_h, c.alpha_l) == (0.9, 0.25)
  assert c.finetune == "cm_afa"
  assert all(c[k] for k in vlpo.SWITCHES)


def test_config_errors():
  with pytest.raises(WstalError, match="finetune"):
    methods.get_method(make_config(finetune="lora"), C, DIMS)
  with pytest.raises(WstalError, match="config.vlpo.q"):
    methods.get_method(make_config(q=0.0), C, DIMS)
  with pytest.raises(WstalError, match="unknown method"):
    methods.get_method(make_config(method="nope"), C, DIMS)
  with pytest.raises(WstalError, match="vlm"):
    methods.get_method(make_config(), C, {"feat": D})
  with pytest.raises(WstalError, match="dim"):
    methods.get_method(make_config(), C, {"feat": D, "vlm": E, "text": E + 1})


def test_base_needs_no_vlm():
  """'base' ignores the switches and never reads VLM features or text embeddings."""
  method = Jitted(methods.get_method(make_config("base"), C, {"feat": D}))
  batch = make_batch()
  del batch["vlm_BxTxE"]
  params = method.init(key(0), batch, {})["params"]
  assert set(params) == {"embedding", "f_act", "f_mil"}
  loss, aux = method.loss(params, batch, {}, key(1), 0)
  assert set(aux) == {"loss", "l_base", "l_mil", "l_act"}
  assert np.isfinite(float(loss))
  assert method.method.postprocess_preset == "vlpo"
  # Same network and settings as 'vlpo' with every switch off.
  off = methods.get_method(make_config(**{k: False for k in vlpo.SWITCHES}), C, DIMS)
  assert off.model == method.method.model and off.settings == method.settings


# ------------------------------------------------------------------------------------------
# Loss terms against hand computation.


def test_gce_hand():
  s = np.array([[0.9, 0.2, 0.6, 0.1, 0.5]], np.float32)
  pos = np.array([[1, 0, 1, 0, 0]], bool)
  neg = np.array([[0, 1, 0, 1, 0]], bool)
  got = vlpo.gce(jnp.asarray(s), pos, neg, 0.6)
  want = ((1 - 0.9 ** 0.6) / 0.6 + (1 - 0.6 ** 0.6) / 0.6) / 2 + \
         ((1 - 0.8 ** 0.6) / 0.6 + (1 - 0.9 ** 0.6) / 0.6) / 2
  np.testing.assert_allclose(got, [want], rtol=1e-5)
  # Empty sets contribute 0, not NaN.
  np.testing.assert_allclose(vlpo.gce(jnp.asarray(s), pos & False, neg & False, 0.6), [0.0])


def test_baseline_l_act_uses_topk_of_valid_sa():
  """Eq. 1 in the loss: tau_p = top-k of S^a over valid snippets, k = n_valid // divisor."""
  s_a = np.array([[0.9, 0.2, 0.6, 0.1, 0.99]], np.float32)   # last snippet is padding
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  outputs = {"cas_BxTxC": jnp.zeros((1, 5, 2)), "s_a_BxT": jnp.asarray(s_a)}
  batch = {"mask_BxT": mask, "label_BxC": np.array([[1, 0]], np.float32),
           "valid_B": np.ones(1, np.float32)}
  st = vlpo.LossSettings.from_config(vlpo.default_config(), topk_divisor=2, q=0.6, **OFF)
  _, aux = fast_jit(lambda o, b: vlpo.vlpo_loss(o, b, st))(outputs, batch)
  want = gce_np([0.9, 0.2, 0.6, 0.1], [1, 0, 1, 0], [0, 1, 0, 1], 0.6)
  np.testing.assert_allclose(aux["l_act"], want, rtol=1e-5)
  np.testing.assert_allclose(aux["l_mil"], math.log(2), rtol=1e-5)   # all-zero CAS: p = 1/2


def test_l_mil_hand():
  cas = np.zeros((2, 5, 2), np.float32)
  cas[:, :, 0] = [1, 3, 2, 0, 9]      # snippet 4 is padding: its 9 must not be pooled
  cas[:, :, 1] = [0, 1, -1, 2, 9]
  mask = np.array([[1, 1, 1, 1, 0]] * 2, np.float32)
  k = layers.topk_count(jnp.asarray(mask), 2)
  np.testing.assert_array_equal(k, [2, 2])
  pooled = layers.masked_topk_mean(jnp.asarray(cas), jnp.asarray(mask), k)
  np.testing.assert_allclose(pooled, [[2.5, 1.5]] * 2)
  label = np.array([[1, 0], [1, 1]], np.float32)
  got = vlpo.video_ce(pooled, jnp.asarray(label))
  lp0 = -math.log(1 + math.exp(-1.0))     # log softmax([2.5, 1.5])[0]
  lp1 = -math.log(1 + math.exp(1.0))
  np.testing.assert_allclose(got, [-lp0, -(lp0 + lp1) / 2], rtol=1e-5)


@pytest.mark.parametrize("k_max", [None, 4, 5, 6])
def test_topk_select_ties_and_empty(k_max):
  """Exactly min(k, n_valid) valid snippets; ties at the k-th value go to earlier snippets;
  the partial sort (k_max) selects the same."""
  x = np.array([[1.0, 2.0, 2.0, 2.0, 0.0, 5.0], [3.0, 3.0, 3.0, 3.0, 3.0, 3.0],
                [1.0, 1.0, 1.0, 1.0, 1.0, 1.0]], np.float32)[:, :, None]
  mask = np.array([[1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], np.float32)
  k = jnp.asarray([2, 4, 1], jnp.int32)
  sel = np.asarray(layers.topk_select(x, mask, k, k_max))[:, :, 0]
  np.testing.assert_array_equal(sel, [[0, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [0] * 6])
  np.testing.assert_array_equal(layers.topk_count(mask, 2), [2, 3, 1])
  np.testing.assert_allclose(layers.masked_topk_mean(x, mask, k, k_max)[:, 0], [2.0, 3.0, 0.0])


def test_topk_partial_sort_equals_full_sort():
  """k_max = topk_bound: the same selection as the full sort on random data with many ties
  (values rounded to 3 levels), random masks and every k up to the bound."""
  rng = np.random.default_rng(0)
  x = np.round(rng.normal(size=(6, 40, 5)), 0).astype(np.float32)
  mask = (np.arange(40)[None, :] < rng.integers(0, 41, 6)[:, None]).astype(np.float32)
  for divisor in (1, 3, 8):
    k = layers.topk_count(mask, divisor)
    bound = layers.topk_bound(mask, divisor)
    assert bound == max(40 // divisor, 1) and int(jnp.max(k)) <= bound
    full = jax.jit(layers.topk_select)(x, mask, k)
    part = jax.jit(layers.topk_select, static_argnums=3)(x, mask, k, bound)
    np.testing.assert_array_equal(np.asarray(full), np.asarray(part))


def test_topk_select_under_jit_selects_exactly_k_of_a_fused_expression():
  """Regression (stop 23): the selection of a value XLA recomputes in two fusions (here CO2-Net's
  suppression a * (S - min S) + min S) must still hold exactly k entries per column under jit.
  Comparing x with its own sorted k-th value missed by 1 ulp (different FMA contraction per
  kernel) and selected k - 1 on many seeds; the selection now comes from the sort order."""
  def count(raw, s, a, mask, k):
    cas = jnp.where(mask[:, :, None] > 0, raw * s, 0.0)
    lo = jnp.min(cas, axis=-1, keepdims=True)
    x = a[..., None] * (cas - lo) + lo
    return jnp.sum(layers.topk_select(x, mask, k), axis=1)
  jitted = jax.jit(count)
  for seed in range(20):
    r = np.random.default_rng(seed)
    raw = r.normal(size=(2, 24, 4)).astype(np.float32)
    a = r.uniform(size=(2, 24)).astype(np.float32)
    mask = np.ones((2, 24), np.float32)
    mask[1, 12:] = 0
    k = jnp.asarray([3, 1], jnp.int32)
    want = [[3] * 4, [1] * 4]
    scale = np.float32(r.uniform(0.05, 5))
    np.testing.assert_array_equal(count(raw, scale, a, mask, k), want)
    np.testing.assert_array_equal(jitted(raw, scale, a, mask, k), want,
                                  err_msg=f"seed {seed}")


def test_sym_kl_hand():
  rng = np.random.default_rng(0)
  lt = rng.normal(size=(1, 3, 4)).astype(np.float32)
  lv = rng.normal(size=(1, 3, 4)).astype(np.float32)
  mask = np.array([[1, 1, 0]], np.float32)
  p = np.exp(lt) / np.exp(lt).sum(-1, keepdims=True)
  q = np.exp(lv) / np.exp(lv).sum(-1, keepdims=True)
  kl_pq = (p * np.log(p / q)).sum(-1)
  kl_qp = (q * np.log(q / p)).sum(-1)
  want = (0.5 * (kl_pq + kl_qp))[0, :2].mean()
  np.testing.assert_allclose(vlpo.sym_kl(lt, lv, mask), [want], rtol=1e-5)
  np.testing.assert_allclose(vlpo.sym_kl(lt, lt, mask), [0.0], atol=1e-7)


def test_dsp_and_l_vl_hand():
  """Eq. 5 picks the labelled class at action snippets and the others at background."""
  cas_prob = np.array([[[0.5, 0.5], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]]], np.float32)
  s = np.array([[0.9, 0.1, 0.8, 0.2]], np.float32)
  y = np.array([[1, 0]], np.float32)
  hyb = vlpo.dsp_hybrid_cas(cas_prob, s, y)
  np.testing.assert_allclose(hyb[0, :, 0], np.array([1.4, 0.6, 1.7, 0.7]) / 2, rtol=1e-6)
  np.testing.assert_allclose(hyb[0, :, 1], np.array([0.6, 1.4, 0.3, 1.3]) / 2, rtol=1e-6)
  z = np.array([[[0.0, 5.0], [0.0, 1.0], [3.0, 0.0], [0.0, 0.0]]], np.float32)
  mask = np.ones((1, 4), np.float32)
  k = layers.topk_count(mask, 4)                     # k = 1
  logits = vlpo.vl_video_logits(z, mask, k, hybrid_cas_BxTxC=hyb)
  np.testing.assert_allclose(logits, [[3.0, 1.0]])  # class 0 at t=2, class 1 at t=1
  np.testing.assert_allclose(vlpo.video_ce(logits, y), [math.log(1 + math.exp(-2.0))],
                             rtol=1e-5)
  # Without DSP: each class's own top-k (class 1 picks its 5 at t=0).
  np.testing.assert_allclose(vlpo.vl_video_logits(z, mask, k), [[3.0, 5.0]])
  # The same through vlpo_loss (only L_vl on; sim_t = sim_v = z, logit scale 1; the CAS is
  # log(cas_prob) so that softmax_C(A) = cas_prob; S = S^a without APR).
  outputs = {"cas_BxTxC": jnp.log(cas_prob), "s_a_BxT": jnp.asarray(s),
             "sim_t_BxTxC": jnp.asarray(z), "sim_v_BxTxC": jnp.asarray(z)}
  batch = {"mask_BxT": mask, "label_BxC": y, "valid_B": np.ones(1, np.float32)}
  st = vlpo.LossSettings.from_config(vlpo.default_config(), topk_divisor=4,
                                     **{**OFF, "use_vl": True, "use_dsp": True},
                                     vl_logit_scale=1.0, dsp_pass1_term=False)
  loss, aux = fast_jit(lambda o, b: vlpo.vlpo_loss(o, b, st))(outputs, batch)
  np.testing.assert_allclose(aux["l_vl"], math.log(1 + math.exp(-2.0)), rtol=1e-5)
  np.testing.assert_allclose(loss, aux["l_base"] + 0.1 * aux["l_vl"], rtol=1e-6)
  # With the pass-1 term (the default): also the CE at the all-classes A^, where class 1 is
  # read at t=0 ((0.5 + 0.9) / 2 is its largest) and pools z = 5: logits [3, 5].
  st1 = dataclasses.replace(st, dsp_pass1_term=True)
  _, aux1 = fast_jit(lambda o, b: vlpo.vlpo_loss(o, b, st1))(outputs, batch)
  np.testing.assert_allclose(aux1["l_vl"], 0.5 * (math.log(1 + math.exp(-2.0))
                                                   + math.log(1 + math.exp(2.0))), rtol=1e-5)


def test_temporal_minmax_hand():
  x = np.array([[[1.0, 2.0], [3.0, 2.0], [2.0, 2.0], [100.0, -5.0]]], np.float32)
  mask = np.array([[1, 1, 1, 0]], np.float32)
  got = layers.temporal_minmax(x, mask)
  np.testing.assert_allclose(got[0, :, 0], [0.0, 1.0, 0.5, 0.0])
  np.testing.assert_allclose(got[0, :, 1], [0.0, 0.0, 0.0, 0.0])   # constant column


def test_ppg_and_l_snip_hand():
  """Hard label of the best *labelled* class above alpha_h; uniform 1/C otherwise."""
  m_hat = np.array([[[0.95, 0.97, 1.00],    # labelled best = class 1 (class 2 unlabelled)
                     [0.92, 0.30, 0.00],    # class 0
                     [0.50, 0.89, 0.99],    # no labelled class above 0.9 -> uniform
                     [0.00, 0.10, 0.20]]], np.float32)
  label = np.array([[1, 1, 0]], np.float32)
  b = vlpo.ppg_targets(m_hat, label, 0.9)
  u = 1 / 3
  np.testing.assert_allclose(b[0], [[0, 1, 0], [1, 0, 0], [u, u, u], [u, u, u]], rtol=1e-6)
  cas = np.array([[[1.0, 2.0, 0.0], [0.5, 0.0, 0.0], [2.0, 0.0, 1.0], [0.0, 0.0, 0.0],
                   [9.0, 9.0, 9.0]]], np.float32)
  b_pad = np.concatenate([np.asarray(b), np.full((1, 1, 3), u, np.float32)], axis=1)
  mask = np.array([[1, 1, 1, 1, 0]], np.float32)
  logsm = cas - np.log(np.exp(cas).sum(-1, keepdims=True))
  want = -(logsm[0, 0, 1] + logsm[0, 1, 0] + logsm[0, 2].mean() + logsm[0, 3].mean()) / 4
  np.testing.assert_allclose(vlpo.snippet_ce(cas, b_pad, mask), [want], rtol=1e-5)


def test_apr_sets_hand():
  # snippets 0..5 valid, 6 padding; k = 6 // 3 = 2 -> A_p = {0, 1}
  s = np.array([[0.9, 0.8, 0.1, 0.2, 0.3, 0.05, 0.99]], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1, 0]], np.float32)
  label = np.array([[1, 1, 0]], np.float32)
  m_hat = np.array([[[0.10, 0.20, 0.95],   # 0: in A_p, labelled max 0.2 < 0.25 -> B_n: out
                     [0.50, 0.30, 0.00],   # 1: in A_p, neither -> stays
                     [0.10, 0.95, 0.00],   # 2: not in A_p, class 1 > 0.9 -> B_p: in (max)
                     [0.24, 0.10, 0.00],   # 3: B_n
                     [0.60, 0.91, 0.00],   # 4: B_p
                     [0.30, 0.30, 0.99],   # 5: neither (unlabelled class ignored)
                     [1.00, 1.00, 1.00]]], np.float32)   # padding: never in any set
  k = layers.topk_count(mask, 3)
  sets = vlpo.apr_sets(s, m_hat, label, mask, k, 0.9, 0.25)
  as_list = lambda key: list(np.flatnonzero(np.asarray(sets[key][0])))
  assert as_list("a_p_BxT") == [0, 1]
  assert as_list("b_p_BxT") == [2, 4]
  assert as_list("b_n_BxT") == [0, 3]
  assert as_list("c_p_BxT") == [1, 2, 4]
  assert as_list("c_n_BxT") == [0, 3, 5]
  np.testing.assert_allclose(sets["s_m_BxT"][0], [0.2, 0.5, 0.95, 0.24, 0.91, 0.3, 0.0])
  # B_p overrides: a snippet in A_p and B_p stays, one in B_p only joins.
  m_hat2 = m_hat.copy()
  m_hat2[0, 1] = [0.95, 0.0, 0.0]
  sets2 = vlpo.apr_sets(s, m_hat2, label, mask, k, 0.9, 0.25)
  assert list(np.flatnonzero(np.asarray(sets2["c_p_BxT"][0]))) == [1, 2, 4]
  # A video without labels has no preference evidence: C_p = A_p.
  sets3 = vlpo.apr_sets(s, m_hat, label * 0, mask, k, 0.9, 0.25)
  assert list(np.flatnonzero(np.asarray(sets3["c_p_BxT"][0]))) == [0, 1]


def test_loss_wiring_full():
  """Eq. 14 with all switches: each term equals its pure function on the model outputs."""
  method, params = build()
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  loss, aux = method.loss(params, batch, consts, key(0), 0)
  st = method.settings
  out = method.apply(params, batch, consts)

  @fast_jit
  def expected(out, mask, label):
    k = layers.topk_count(mask, st.topk_divisor)
    lt, lv, _, m_hat = vlpo.preference_matrices(out, mask, st.m_temperature)
    sets = vlpo.apr_sets((out["s_a_BxT"] + out["s_v_BxT"]) / 2, m_hat, label, mask, k,
                         st.alpha_h, st.alpha_l)
    l_act = jnp.mean(vlpo.gce(out["s_a_BxT"], sets["c_p_BxT"], sets["c_n_BxT"], st.q)
                     + vlpo.gce(out["s_v_BxT"], sets["c_p_BxT"], sets["c_n_BxT"], st.q))
    b = vlpo.ppg_targets(m_hat, label, st.alpha_h)
    return {"l_act": l_act, "l_kl": jnp.mean(vlpo.sym_kl(lt, lv, mask)),
            "l_snip": jnp.mean(vlpo.snippet_ce(out["cas_BxTxC"], b, mask))}

  for name, value in expected(out, batch["mask_BxT"], batch["label_BxC"]).items():
    np.testing.assert_allclose(aux[name], value, rtol=1e-5, atol=1e-12, err_msg=name)
  want = aux["l_base"] + 300 * aux["l_kl"] + 0.1 * aux["l_vl"] + 0.5 * aux["l_snip"]
  np.testing.assert_allclose(loss, want, rtol=1e-6)
  assert aux["loss"] == loss
  # Randomly initialised projections (proj_init='default'): M^t != M^v at step 0, so L_kl
  # acts from the first step (with 'identity' it starts at its minimum: see below).
  assert float(aux["l_kl"]) > 1e-6


def test_l_kl_acts_at_init_and_is_inert_with_identity_projections():
  """Review finding 1: identity-initialised P_v, P_t make M^t = M^v, so L_kl = 0 with zero
  gradient at step 0; the default (random) init gives a visible share and a gradient."""
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  shares = {}
  for init in ("identity", "default"):
    method, params = build(proj_init=init)

    def kl(p):
      return method.method.loss(p, batch, consts, key(0), 0)[1]["l_kl"]

    value, grads = fast_jit(jax.value_and_grad(kl))(params)
    grad_norm = sum(float(np.abs(np.asarray(g)).sum())
                    for g in jax.tree.leaves(grads["cm_afa"]))
    loss, aux = method.loss(params, batch, consts, key(0), 0)
    shares[init] = 300.0 * float(aux["l_kl"]) / float(loss)
    if init == "identity":
      assert float(value) < 1e-9 and grad_norm < 1e-6
    else:
      assert float(value) > 1e-6 and grad_norm > 1e-4
  assert shares["identity"] < 1e-6 and shares["default"] > 0.01, shares


# ------------------------------------------------------------------------------------------
# Switches, masks, gradients.


def test_switches_off_is_baseline():
  """All switches off: L = L_base exactly and the VLM features get no gradient."""
  method, params = build(**{k: False for k in vlpo.SWITCHES})
  batch, consts = make_batch(), make_consts()
  (loss, aux), grads = fast_jit(jax.value_and_grad(
      lambda b: method.method.loss(params, b, consts, key(3), 0), has_aux=True))(batch)
  assert set(aux) == {"loss", "l_base", "l_mil", "l_act"}
  assert float(loss) == float(aux["l_mil"] + aux["l_act"]) == float(aux["l_base"])
  assert not np.any(np.asarray(grads["vlm_BxTxE"]))
  assert np.any(np.asarray(grads["feat_BxTxD"]))


def garbage_padded(batch, t_pad, seed=7):
  """The same videos padded to t_pad snippets with garbage (NaN, +-1e6) in the padding."""
  rng = np.random.default_rng(seed)
  out = dict(batch)
  b, t = batch["mask_BxT"].shape
  for name in ("feat_BxTxD", "vlm_BxTxE"):
    x = np.asarray(batch[name])
    garbage = rng.normal(size=(b, t_pad - t, x.shape[-1])).astype(np.float32) * 1e6
    garbage[:, ::2] = np.nan
    out[name] = np.concatenate([x, garbage], axis=1)
  out["mask_BxT"] = np.concatenate([batch["mask_BxT"], np.zeros((b, t_pad - t), np.float32)], 1)
  return out


def with_dummy_video(batch, row):
  """`batch` with video `row` replaced by a dummy padding video (valid_B = 0, no valid
  snippet, no label, NaN features)."""
  out = {k: np.array(v) for k, v in batch.items()}
  out["feat_BxTxD"][row] = np.nan
  out["vlm_BxTxE"][row] = np.nan
  out["mask_BxT"][row] = 0
  out["label_BxC"][row] = 0
  out["valid_B"][row] = 0
  return out


def assert_close_tree(got, want, prefix=""):
  for name in want:
    np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-6,
                               err_msg=prefix + name)


@pytest.mark.parametrize("finetune", ["cm_afa", "zero_shot"])
def test_padding_never_changes_valid_outputs(finetune):
  """A video padded with garbage scores exactly like the unpadded video: temporal convs,
  every top-k (k from the valid length), min-max normalisations and loss averages."""
  method, params = build(finetune=finetune)
  consts = make_consts()
  short = make_batch(seed=2, t=16)                      # k = 2 either way
  padded = garbage_padded(short, T)
  p_short = method.predict(params, short, consts)
  p_pad = method.predict(params, padded, consts)
  np.testing.assert_allclose(p_pad["video_scores_BxC"], p_short["video_scores_BxC"],
                             rtol=1e-5, atol=1e-6)
  for name in ("cas_BxTxC", "actionness_BxT"):
    np.testing.assert_allclose(p_pad[name][:, :16], p_short[name], rtol=1e-5, atol=1e-6)
    assert not np.any(np.asarray(p_pad[name][:, 16:]))
  mixed = with_dummy_video(padded, 1)
  if finetune == "cm_afa":   # the zero-shot loss is the baseline's, a subset of this one
    _, aux_short = method.loss(params, short, consts, key(0), 0)
    _, aux_pad = method.loss(params, padded, consts, key(0), 0)
    assert_close_tree(aux_pad, aux_short)
    # A dummy video next to a real one changes neither the real one's scores nor the loss.
    short_one = dict(short, valid_B=np.array([1, 0], np.float32))
    _, aux_one = method.loss(params, short_one, consts, key(0), 0)
    _, aux_mixed = method.loss(params, mixed, consts, key(0), 0)
    assert_close_tree(aux_mixed, aux_one)
  p_mixed = method.predict(params, mixed, consts)
  for name in p_pad:
    np.testing.assert_allclose(p_mixed[name][:1], p_pad[name][:1], rtol=1e-5, atol=1e-6)
    assert np.all(np.isfinite(np.asarray(p_mixed[name])))


# ------------------------------------------------------------------------------------------
# predict: Eq. 5 at inference, zero-shot, the fine-tuning variants, parameter labels.


def test_predicted_labels():
  p = jnp.asarray([[0.5, 0.3, 0.2], [0.15, 0.1, 0.75], [0.34, 0.33, 0.33]])
  np.testing.assert_array_equal(vlpo.predicted_labels(p, 0.25),
                                [[1, 1, 0], [0, 0, 1], [1, 1, 1]])
  np.testing.assert_array_equal(vlpo.predicted_labels(p, 0.9),     # argmax fallback
                                [[1, 0, 0], [0, 0, 1], [1, 0, 0]])


@pytest.mark.parametrize("weights", ["equal", "halved"])
def test_predict_applies_eq5_with_predicted_labels(weights):
  """p^ = pass 2 of Eq. 5/6 on the classes kept from pass 1 (all classes treated as present);
  cas = A^'s labelled branch for every class ((softmax_C(A) + S^a + S^v) / 3 with equal
  weights, (softmax_C(A) + S) / 2 halved); actionness = S = (S^a + S^v) / 2."""
  method, params = build(dsp_weights=weights)
  batch, consts = make_batch(n_valid=[24, 15]), make_consts()
  pred = method.predict(params, batch, consts)
  out = method.apply(params, batch, consts)

  def hybrid(prob, sa, sv, y):
    present = y[:, None, :] > 0
    sa, sv = sa[:, :, None], sv[:, :, None]
    if weights == "equal":
      return jnp.where(present, (prob + sa + sv) / 3, (prob + 2 - sa - sv) / 3)
    return jnp.where(present, (prob + (sa + sv) / 2) / 2, (prob + 1 - (sa + sv) / 2) / 2)

  @fast_jit
  def expected(out, mask):
    k = layers.topk_count(mask, 8)
    prob = jax.nn.softmax(out["cas_BxTxC"], -1)
    sa, sv = out["s_a_BxT"], out["s_v_BxT"]
    s = (sa + sv) / 2
    z = 100.0 * (out["sim_t_BxTxC"] + out["sim_v_BxTxC"]) / 2
    hyb0 = hybrid(prob, sa, sv, jnp.ones((B, C)))
    p0 = jax.nn.softmax(vlpo.vl_video_logits(z, mask, k, hybrid_cas_BxTxC=hyb0), -1)
    y = vlpo.predicted_labels(p0, 0.2)
    hyb = hybrid(prob, sa, sv, y)
    video = jax.nn.softmax(vlpo.vl_video_logits(z, mask, k, hybrid_cas_BxTxC=hyb), -1)
    mil = jax.nn.softmax(layers.masked_topk_mean(out["cas_BxTxC"], mask, k), -1)
    valid = mask > 0
    return {"video_scores_BxC": video, "mil_BxC": mil, "y_BxC": y,
            "cas_BxTxC": jnp.where(valid[:, :, None], hyb0, 0.0),
            "actionness_BxT": jnp.where(valid, s, 0.0)}

  want = expected(out, batch["mask_BxT"])
  assert_close_tree(pred, {k: want[k] for k in pred})
  assert 0 <= float(pred["cas_BxTxC"].min()) and float(pred["cas_BxTxC"].max()) <= 1
  assert np.all(np.asarray(want["y_BxC"]).sum(-1) >= 1)
  # Without L_vl (same network) the video score is the CAS MIL probability p; with DSP
  # pooling the CAS, A pooled at the top-k of A^ (pass-1 labels: every class).
  no_vl, _ = build(use_vl=False, dsp_pools_cas=False, dsp_weights=weights)
  np.testing.assert_allclose(no_vl.predict(params, batch, consts)["video_scores_BxC"],
                             want["mil_BxC"], rtol=1e-5, atol=1e-6)
  no_vl_dsp, _ = build(use_vl=False, dsp_weights=weights, dsp_pools_cas=True)
  mask = jnp.asarray(batch["mask_BxT"])
  k = layers.topk_count(mask, 8)
  hyb0 = hybrid(jax.nn.softmax(out["cas_BxTxC"], -1), out["s_a_BxT"], out["s_v_BxT"],
                jnp.ones((B, C)))
  pooled = jax.nn.softmax(layers.pool_selected(out["cas_BxTxC"],
                                               layers.topk_select(hyb0, mask, k)), -1)
  np.testing.assert_allclose(no_vl_dsp.predict(params, batch, consts)["video_scores_BxC"],
                             pooled, rtol=1e-5, atol=1e-6)


def test_zero_shot_predicts_from_raw_cosine():
  batch, consts = make_batch(), make_consts()
  zs, params_a = build(finetune="zero_shot", seed=0)
  _, params_b = build(finetune="zero_shot", seed=1)
  pa = zs.predict(params_a, batch, consts)
  pb = zs.predict(params_b, batch, consts)
  assert_close_tree(pb, pa)     # nothing trained enters a zero-shot prediction
  xv = batch["vlm_BxTxE"] / np.linalg.norm(batch["vlm_BxTxE"], axis=-1, keepdims=True)
  xt = consts["text_CxE"] / np.linalg.norm(consts["text_CxE"], axis=-1, keepdims=True)
  z = 100.0 * np.einsum("bte,ce->btc", xv, xt).astype(np.float64)
  softmax = lambda x: np.exp(x - x.max(-1, keepdims=True)) / np.exp(
      x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)
  np.testing.assert_allclose(pa["cas_BxTxC"], softmax(z), rtol=1e-4, atol=1e-6)
  pooled = -np.sort(-z, axis=1)[:, :3].mean(1)            # k = 24 // 8
  np.testing.assert_allclose(pa["video_scores_BxC"], softmax(pooled), rtol=1e-4, atol=1e-6)
  _, aux = zs.loss(params_a, batch, consts, key(0), 0)
  assert set(aux) == {"loss", "l_base", "l_mil", "l_act"}


@pytest.mark.parametrize("finetune", ["training_free", "clip_adapter"])
def test_finetune_variants(finetune):
  """Table 4 variants: the full framework; one similarity (M^t = M^v), so L_kl = 0."""
  method, params = build(finetune=finetune)
  assert "cm_afa" not in params and "f_va" in params
  assert ("clip_adapter" in params) == (finetune == "clip_adapter")
  batch, consts = make_batch(), make_consts()
  _, aux = method.loss(params, batch, consts, key(0), 0)
  assert float(aux["l_kl"]) == 0.0
  assert {"l_vl", "l_snip"} <= set(aux) and all(np.isfinite(float(v)) for v in aux.values())


def test_param_labels():
  method, params = build()
  labels = method.param_labels(params, 0)
  assert jax.tree_util.tree_structure(labels) == jax.tree_util.tree_structure(params)
  assert set(jax.tree_util.tree_leaves(labels)) == {"train"}
  tf = methods.get_method(make_config(finetune="training_free"), C, DIMS)
  tf_labels = tf.param_labels(params, 0)     # a tree that carries CM-AFA projections
  assert set(jax.tree_util.tree_leaves(tf_labels["cm_afa"])) == {"freeze"}
  assert set(jax.tree_util.tree_leaves(tf_labels["f_mil"])) == {"train"}


# ------------------------------------------------------------------------------------------
# Training: a jitted Adam step on the full method, with dropout and garbage padding.


def test_overfit_few_steps():
  method, params0 = build(dropout=0.5)
  consts = make_consts()
  batch = with_dummy_video(garbage_padded(make_batch(seed=5, t=16, n_valid=[16, 16]), T), 1)
  batch["label_BxC"][0] = [1, 0, 1, 0]                  # multi-label
  opt = optax.adam(3e-3)

  @fast_jit
  def step(params, opt_state, i):
    rng = jax.random.fold_in(key(0), i)
    (loss, _), grads = jax.value_and_grad(method.method.loss, has_aux=True)(
        params, batch, consts, rng, i)
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(g))
                                for g in jax.tree_util.tree_leaves(grads)]))
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, finite

  params, opt_state = params0, opt.init(params0)
  losses = []
  for i in range(30):
    params, opt_state, loss, finite = step(params, opt_state, i)
    assert bool(finite), i
    losses.append(float(loss))
  # Dropout is active in training: the same parameters under another step's key differ.
  assert float(step(params0, opt.init(params0), 99)[2]) != losses[0]
  assert np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses
  moved = jax.tree_util.tree_map(lambda a, b: bool(np.any(np.asarray(a != b))),
                                 params["cm_afa"], params0["cm_afa"])
  assert all(jax.tree_util.tree_leaves(moved))          # the projections are fine-tuned


# ------------------------------------------------------------------------------------------
# Review findings (issue 20): DSP pooling, A^ weights, actionness targets, pass-1 labels.


def _hand_outputs(seed=0, b=2, t=12, c=3):
  rng = np.random.default_rng(seed)
  mask = np.ones((b, t), np.float32)
  mask[1, 9:] = 0
  label = np.zeros((b, c), np.float32)
  label[0, 0] = label[1, 1] = label[1, 2] = 1
  out = {"cas_BxTxC": rng.normal(size=(b, t, c)).astype(np.float32),
         "s_a_BxT": rng.uniform(0.05, 0.95, (b, t)).astype(np.float32),
         "s_v_BxT": rng.uniform(0.05, 0.95, (b, t)).astype(np.float32)}
  batch = {"mask_BxT": mask, "label_BxC": label, "valid_B": np.ones(b, np.float32)}
  return out, batch


def _softmax_np(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_hybrid_cas_weights_equal_and_halved():
  """Review finding 5: 'equal' weighs softmax(A)_c, S^a and S^v alike (ASL's instance
  selection), 'halved' is 2 : 1 : 1; one score (no APR): both are (softmax + S^a) / 2."""
  out, batch = _hand_outputs()
  p = _softmax_np(out["cas_BxTxC"])
  sa, sv, y = out["s_a_BxT"][..., None], out["s_v_BxT"][..., None], batch["label_BxC"][:, None]
  eq = np.asarray(vlpo.hybrid_cas(jnp.asarray(p), [out["s_a_BxT"], out["s_v_BxT"]],
                                  batch["label_BxC"], True))
  np.testing.assert_allclose(eq, np.where(y > 0, (p + sa + sv) / 3, (p + 2 - sa - sv) / 3),
                             rtol=1e-6)
  half = np.asarray(vlpo.hybrid_cas(jnp.asarray(p), [out["s_a_BxT"], out["s_v_BxT"]],
                                    batch["label_BxC"], False))
  s = (sa + sv) / 2
  np.testing.assert_allclose(half, np.where(y > 0, (p + s) / 2, (p + 1 - s) / 2), rtol=1e-6)
  one = np.asarray(vlpo.hybrid_cas(jnp.asarray(p), [out["s_a_BxT"]], batch["label_BxC"], True))
  np.testing.assert_allclose(one, np.where(y > 0, (p + sa) / 2, (p + 1 - sa) / 2), rtol=1e-6)


def _settings(**kw):
  return vlpo.LossSettings.from_config(vlpo.default_config(), topk_divisor=4,
                                       **{**OFF, **kw})


def test_dsp_l_mil_gradient_reaches_the_cas_only_at_the_hybrid_indices():
  """Review finding 2: with DSP and dsp_pools_cas, L_mil pools A at the top-k of A^ (ASL's
  instance selection), so its gradient w.r.t. A is non-zero exactly there; without DSP, at
  A's own top-k (dsp_pools_cas=False, the default: L_mil as without DSP)."""
  out, batch = _hand_outputs()
  mask, y = batch["mask_BxT"], batch["label_BxC"]
  k = np.maximum(mask.sum(1).astype(int) // 4, 1)

  def topk_np(x):
    sel = np.zeros(x.shape, bool)
    for i in range(x.shape[0]):
      n = int(mask[i].sum())
      for c in range(x.shape[2]):
        sel[i, np.argsort(-x[i, :n, c], kind="stable")[:k[i]], c] = True
    return sel

  p = _softmax_np(out["cas_BxTxC"])
  hybrid = np.where(y[:, None] > 0, (p + out["s_a_BxT"][..., None]) / 2,
                    (p + 1 - out["s_a_BxT"][..., None]) / 2)
  for dsp, want in ((True, topk_np(hybrid)), (False, topk_np(out["cas_BxTxC"]))):
    st = _settings(use_dsp=dsp, dsp_pools_cas=True)

    def l_mil(cas):
      return vlpo.vlpo_loss({**out, "cas_BxTxC": cas}, batch, st)[1]["l_mil"]

    g = np.asarray(fast_jit(jax.grad(l_mil))(jnp.asarray(out["cas_BxTxC"])))
    np.testing.assert_array_equal(g != 0, want)
  assert not np.array_equal(topk_np(hybrid), topk_np(out["cas_BxTxC"]))
  st = _settings(use_dsp=True)   # the default: DSP leaves L_mil alone
  g = np.asarray(fast_jit(jax.grad(lambda cas: vlpo.vlpo_loss(
      {**out, "cas_BxTxC": cas}, batch, st)[1]["l_mil"]))(jnp.asarray(out["cas_BxTxC"])))
  np.testing.assert_array_equal(g != 0, topk_np(out["cas_BxTxC"]))


def test_act_target_labelled_cas_ranks_by_the_labelled_classes():
  """Review finding 3: act_target='labelled_cas' takes tau_p (Eq. 1) from the top-k of
  sum_{c in label} softmax(A)_c, not from S^a itself."""
  out, batch = _hand_outputs(1)
  mask = batch["mask_BxT"]
  for target in ("actionness", "labelled_cas"):
    st = _settings(act_target=target)
    _, aux = fast_jit(lambda o, b: vlpo.vlpo_loss(o, b, st))(out, batch)
    if target == "actionness":
      rank = out["s_a_BxT"]
    else:
      rank = (_softmax_np(out["cas_BxTxC"]) * batch["label_BxC"][:, None]).sum(-1)
    want = []
    for i in range(2):
      n = int(mask[i].sum())
      k = max(n // 4, 1)
      pos = np.zeros(n, bool)
      pos[np.argsort(-rank[i, :n], kind="stable")[:k]] = True
      want.append(gce_np(out["s_a_BxT"][i, :n], pos, ~pos, st.q))
    np.testing.assert_allclose(aux["l_act"], np.mean(want), rtol=1e-5, err_msg=target)


def test_infer_labels_mil_takes_pass1_labels_from_the_mil_score():
  """Review finding 4: infer_labels='mil' picks DSP's inference labels from p (label-free at
  inference), then p^ is Eq. 6 on A^ of those labels."""
  method, params = build(infer_labels="mil")
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  got = method.predict(params, batch, consts)
  out = method.apply(params, batch, consts)
  st, mask = method.settings, batch["mask_BxT"]
  k = layers.topk_count(jnp.asarray(mask), st.topk_divisor)
  p = jax.nn.softmax(layers.masked_topk_mean(out["cas_BxTxC"], mask, k), axis=-1)
  y = vlpo.predicted_labels(p, 0.2)
  scores = [out["s_a_BxT"], out["s_v_BxT"]]
  hybrid = vlpo.hybrid_cas(jax.nn.softmax(out["cas_BxTxC"], -1), scores, y,
                           st.dsp_weights == "equal")
  z = st.vl_logit_scale * (out["sim_t_BxTxC"] + out["sim_v_BxTxC"]) / 2
  want = jax.nn.softmax(vlpo.vl_video_logits(z, mask, k, hybrid_cas_BxTxC=hybrid), -1)
  np.testing.assert_allclose(got["video_scores_BxC"], want, rtol=1e-5, atol=1e-7)
  with pytest.raises(WstalError, match="infer_labels"):
    methods.get_method(make_config(infer_labels="oracle"), C, DIMS)


def test_infer_labels_all_classes_pool_takes_pass1_labels_from_the_pooled_cas():
  """infer_labels='all_classes_pool' (the code reading): pass-1 labels from softmax of A
  pooled at each class's top-k of the all-classes A^ (numpy: argsort per class), then p^ is
  Eq. 6 on A^ of those labels. (Seed 1 and threshold 0.22: a case where those labels
  differ from the own-top-k MIL score's, checked below.)"""
  method, params = build(infer_labels="all_classes_pool", infer_class_threshold=0.22, seed=1)
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  got = method.predict(params, batch, consts)
  out = jax.tree.map(np.asarray, method.apply(params, batch, consts))
  st, mask = method.settings, batch["mask_BxT"]
  prob = _softmax_np(out["cas_BxTxC"])
  all_hybrid = (prob + out["s_a_BxT"][..., None] + out["s_v_BxT"][..., None]) / 3 \
      if st.dsp_weights == "equal" else \
      (prob + ((out["s_a_BxT"] + out["s_v_BxT"]) / 2)[..., None]) / 2
  pooled = np.zeros((2, C), np.float32)
  for i in range(2):
    n = int(mask[i].sum())
    k = max(n // st.topk_divisor, 1)
    for c in range(C):
      idx = np.argsort(-all_hybrid[i, :n, c], kind="stable")[:k]
      pooled[i, c] = out["cas_BxTxC"][i, idx, c].mean()
  y = np.asarray(vlpo.predicted_labels(jnp.asarray(_softmax_np(pooled)), 0.22))
  k = layers.topk_count(jnp.asarray(mask), st.topk_divisor)
  mil = jax.nn.softmax(layers.masked_topk_mean(jnp.asarray(out["cas_BxTxC"]), mask, k), -1)
  assert np.any(np.asarray(vlpo.predicted_labels(mil, 0.22)) != y)
  scores = [jnp.asarray(out["s_a_BxT"]), jnp.asarray(out["s_v_BxT"])]
  hybrid = vlpo.hybrid_cas(jnp.asarray(prob), scores, jnp.asarray(y), st.dsp_weights == "equal")
  z = st.vl_logit_scale * (out["sim_t_BxTxC"] + out["sim_v_BxTxC"]) / 2
  want = jax.nn.softmax(vlpo.vl_video_logits(jnp.asarray(z), mask, k, hybrid_cas_BxTxC=hybrid),
                        -1)
  np.testing.assert_allclose(got["video_scores_BxC"], want, rtol=1e-5, atol=1e-7)


def test_oracle_labels_take_dsp_labels_from_the_ground_truth():
  """config.eval.oracle_labels (a diagnostic): DSP's inference labels are the batch's
  ground-truth labels instead of pass 1's."""
  cfg = make_config()
  cfg.eval = ml_collections.ConfigDict({"oracle_labels": True})
  oracle = Jitted(methods.get_method(cfg, C, DIMS))
  method, params = build()
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  got = oracle.predict(params, batch, consts)
  out = method.apply(params, batch, consts)
  st, mask = method.settings, jnp.asarray(batch["mask_BxT"])
  k = layers.topk_count(mask, st.topk_divisor)
  hybrid = vlpo.hybrid_cas(jax.nn.softmax(out["cas_BxTxC"], -1),
                           [out["s_a_BxT"], out["s_v_BxT"]], jnp.asarray(batch["label_BxC"]),
                           st.dsp_weights == "equal")
  z = st.vl_logit_scale * (out["sim_t_BxTxC"] + out["sim_v_BxTxC"]) / 2
  want = jax.nn.softmax(vlpo.vl_video_logits(z, mask, k, hybrid_cas_BxTxC=hybrid), -1)
  np.testing.assert_allclose(got["video_scores_BxC"], want, rtol=1e-5, atol=1e-7)
  assert not np.allclose(got["video_scores_BxC"],
                         method.predict(params, batch, consts)["video_scores_BxC"])



def test_oic_score_mil_is_asl_score_supp():
  """Review finding 6: oic_score='mil' adds ASL's MIL score (softmax of A averaged over each
  class's top-k snippets of instance_selection = (softmax_C(A) + S^a + S^v) / 3) for the OIC
  gamma term, computed here in numpy; the video score that selects classes is unchanged."""
  method, params = build(oic_score="mil", dsp_weights="equal")
  plain, _ = build(dsp_weights="equal")
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  got = method.predict(params, batch, consts)
  assert "oic_scores_BxC" not in plain.predict(params, batch, consts)
  np.testing.assert_allclose(got["video_scores_BxC"],
                             plain.predict(params, batch, consts)["video_scores_BxC"])
  out = jax.device_get(method.apply(params, batch, consts))
  for b, n in enumerate((24, 17)):
    a = np.asarray(out["cas_BxTxC"][b, :n], np.float64)
    prob = np.exp(a - a.max(-1, keepdims=True))
    prob /= prob.sum(-1, keepdims=True)
    sel = (prob + out["s_a_BxT"][b, :n, None] + out["s_v_BxT"][b, :n, None]) / 3
    k = max(1, n // 8)
    top = np.argsort(-sel, axis=0, kind="stable")[:k]          # [k, C]
    pooled = np.take_along_axis(a, top, axis=0).mean(0)
    want = np.exp(pooled - pooled.max()) / np.exp(pooled - pooled.max()).sum()
    np.testing.assert_allclose(got["oic_scores_BxC"][b], want, rtol=1e-5, atol=1e-6)
  with pytest.raises(WstalError, match="oic_score"):
    methods.get_method(make_config(oic_score="p"), C, DIMS)
  assert methods.get_method(make_config("base", oic_score="mil"), C, {"feat": D}).oic_score \
      == "video"   # the baseline's predict has no such output
  with pytest.raises(WstalError, match="apr_topk_divisor"):
    methods.get_method(make_config(apr_topk_divisor=0.5), C, DIMS)


# ------------------------------------------------------------------------------------------
# The released code's readings (issue 20): each switch on a hand-made case, the preset whole.


def _sims(seed=3, b=2, t=12, c=3):
  rng = np.random.default_rng(seed)
  return {"sim_t_BxTxC": rng.uniform(-1, 1, (b, t, c)).astype(np.float32),
          "sim_v_BxTxC": rng.uniform(-1, 1, (b, t, c)).astype(np.float32)}


def _minmax_np(x, mask):
  out = np.zeros_like(x)
  for i in range(x.shape[0]):
    n = int(mask[i].sum())
    lo, hi = x[i, :n].min(0), x[i, :n].max(0)
    out[i, :n] = (x[i, :n] - lo) / (hi - lo)
  return out


def test_m_norm_temporal_minmax_is_the_mean_of_minmaxed_cosines():
  _, batch = _hand_outputs()
  sims, mask = _sims(), batch["mask_BxT"]
  lt, lv, m, m_hat = vlpo.preference_matrices(sims, mask, 1.0, "temporal_minmax")
  want = (_minmax_np(sims["sim_t_BxTxC"], mask) + _minmax_np(sims["sim_v_BxTxC"], mask)) / 2
  np.testing.assert_allclose(m, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(m_hat, want, rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(lt, sims["sim_t_BxTxC"])   # L_kl still compares the cosines
  # The paper's reading differs: rows of M are class distributions there.
  _, _, m_soft, _ = vlpo.preference_matrices(sims, mask, 1.0)
  np.testing.assert_allclose(np.asarray(m_soft).sum(-1), 1.0, rtol=1e-5)


def test_kl_form_detached_values_and_one_sided_gradients():
  """KL(sg(Mv)||Mt) + KL(sg(Mt)||Mv): twice the symmetric value; d/d logit_t equals the
  gradient of KL(Mv||Mt) with Mv constant (no contribution of KL(Mt||Mv) through Mt)."""
  _, batch = _hand_outputs()
  sims, mask = _sims(), jnp.asarray(batch["mask_BxT"])
  lt, lv = jnp.asarray(sims["sim_t_BxTxC"]) * 3, jnp.asarray(sims["sim_v_BxTxC"]) * 3
  sym = vlpo.sym_kl(lt, lv, mask)
  det = vlpo.sym_kl(lt, lv, mask, "detached")
  np.testing.assert_allclose(det, 2 * np.asarray(sym), rtol=1e-5)
  g_det = jax.grad(lambda a: jnp.sum(vlpo.sym_kl(a, lv, mask, "detached")))(lt)

  def kl_v_t(a):   # KL(q || softmax(a)) with q = softmax(lv) constant, mean over valid snippets
    q = jax.nn.softmax(lv, -1)
    kl = jnp.sum(q * (jnp.log(q) - jax.nn.log_softmax(a, -1)), -1)
    return jnp.sum(layers.snippet_mean(kl, mask))
  np.testing.assert_allclose(g_det, jax.grad(kl_v_t)(lt), rtol=1e-5, atol=1e-7)
  g_sym = jax.grad(lambda a: jnp.sum(vlpo.sym_kl(a, lv, mask)))(lt)
  assert not np.allclose(g_det, 2 * np.asarray(g_sym), atol=1e-5)


def test_ppg_multi_hot_labels_every_labelled_class_above_alpha_h():
  m_hat = np.zeros((1, 3, 4), np.float32)
  m_hat[0, 0] = [0.95, 0.92, 0.99, 0.1]   # classes 0, 1 labelled and above; 2 not labelled
  m_hat[0, 1] = [0.95, 0.5, 0.1, 0.1]     # only class 0
  m_hat[0, 2] = [0.5, 0.5, 0.99, 0.1]     # no labelled class above: uniform
  label = np.array([[1, 1, 0, 0]], np.float32)
  b = np.asarray(vlpo.ppg_targets(m_hat, label, 0.9, multi_hot=True))
  np.testing.assert_allclose(b[0], [[0.5, 0.5, 0, 0], [1, 0, 0, 0], [0.25] * 4])
  arg = np.asarray(vlpo.ppg_targets(m_hat, label, 0.9))
  np.testing.assert_allclose(arg[0, 0], [1, 0, 0, 0])


def test_apr_topk_count_real_divisor():
  mask = np.zeros((3, 800), np.float32)
  for i, n in enumerate((750, 100, 5)):
    mask[i, :n] = 1
  np.testing.assert_array_equal(vlpo.apr_topk_count(jnp.asarray(mask), 7.5), [100, 13, 1])


def test_three_heads_outputs_losses_and_gradients():
  """act_heads='three': F_rgb / F_flow read only their half of X, S^a is their 0.1 / 0.4 mix,
  L_act sums each head's GCE (RGB, flow, VLM) against one target, L_mut is the sum of the
  pairwise mean squared differences, weighted by mut_weight."""
  method, params = build(act_heads="three")
  assert "f_act" not in params and {"f_rgb", "f_flow", "f_va"} <= set(params)
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  out = jax.device_get(method.apply(params, batch, consts))
  np.testing.assert_allclose(out["s_a_BxT"], (0.1 * out["s_rgb_BxT"] + 0.4 * out["s_flow_BxT"])
                             / 0.5, rtol=1e-5, atol=1e-7)
  loss, aux = method.loss(params, batch, consts, key(0), 0)
  st, mask = method.settings, batch["mask_BxT"]
  heads = [out["s_rgb_BxT"], out["s_flow_BxT"], out["s_v_BxT"]]
  mut = 0.0
  for i, n in enumerate((24, 17)):
    for a, b in ((0, 1), (0, 2), (1, 2)):
      mut += np.mean((heads[a][i, :n] - heads[b][i, :n]) ** 2) / 2
  np.testing.assert_allclose(aux["l_mut"], mut, rtol=1e-4)
  k = layers.topk_count(jnp.asarray(mask), st.topk_divisor)
  _, _, _, m_hat = vlpo.preference_matrices(out, mask, st.m_temperature)
  sets = vlpo.apr_sets((out["s_a_BxT"] + out["s_v_BxT"]) / 2, m_hat, batch["label_BxC"], mask,
                       k, st.alpha_h, st.alpha_l)
  want_act = np.mean(sum(np.asarray(vlpo.gce(h, sets["c_p_BxT"], sets["c_n_BxT"], st.q))
                         for h in heads))
  np.testing.assert_allclose(aux["l_act"], want_act, rtol=1e-5)
  assert method.method.loss_weights()["l_mut"] == 5.0
  weights = method.method.loss_weights()
  np.testing.assert_allclose(loss, sum(w * aux[t] for t, w in weights.items()), rtol=1e-6)
  # The RGB head reads the first half of X only.
  feat = np.array(batch["feat_BxTxD"])
  feat[:, :, D // 2:] += 1.0
  out2 = method.apply(params, {**batch, "feat_BxTxD": feat}, consts)
  np.testing.assert_allclose(out2["s_rgb_BxT"], out["s_rgb_BxT"], rtol=1e-6)
  assert not np.allclose(out2["s_flow_BxT"], out["s_flow_BxT"])


def test_cas_vlm_feeds_the_vlm_features_to_the_cas_encoder():
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  vlm = np.array(batch["vlm_BxTxE"]) + 0.5 * np.asarray(batch["mask_BxT"])[:, :, None]
  changed = {**batch, "vlm_BxTxE": vlm}
  for on in (False, True):
    method, params = build(cas_vlm=on)
    a = method.apply(params, batch, consts)["cas_BxTxC"]
    b = method.apply(params, changed, consts)["cas_BxTxC"]
    assert np.allclose(a, b) != on
  assert params["embedding"]["conv"]["conv"]["kernel"].shape[1] == D + E
  base_cfg = make_config("base", cas_vlm=True)
  assert not methods.get_method(base_cfg, C, {"feat": D}).uses_vlm   # the paper's baseline


def test_vl_form_two_cosines_is_two_ces_on_raw_pooled_cosines():
  method, params = build(vl_form="two_cosines", dsp_pass1_term=False)   # as reading=code
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  _, aux = method.loss(params, batch, consts, key(0), 0)
  out = method.apply(params, batch, consts)
  st, mask = method.settings, jnp.asarray(batch["mask_BxT"])
  k = layers.topk_count(mask, st.topk_divisor)
  hyb = vlpo.hybrid_cas(jax.nn.softmax(out["cas_BxTxC"], -1), [out["s_a_BxT"], out["s_v_BxT"]],
                        jnp.asarray(batch["label_BxC"]), st.dsp_weights == "equal")
  want = 0.0
  for name in ("sim_t_BxTxC", "sim_v_BxTxC"):
    pooled = layers.pool_selected(out[name], layers.topk_select(hyb, mask, k))
    want += np.mean(-np.sum(batch["label_BxC"] * np.asarray(jax.nn.log_softmax(pooled, -1)), -1))
  np.testing.assert_allclose(aux["l_vl"], want, rtol=1e-5)


def test_video_score_mil_pools_the_cas_at_the_dsp_indices():
  """video_score='mil' (the code's score_supp): softmax of A pooled at the top-k of A^ on the
  inference labels (here the MIL score's, infer_labels='mil')."""
  method, params = build(video_score="mil", dsp_pools_cas=True, infer_labels="mil")
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  got = method.predict(params, batch, consts)
  out = method.apply(params, batch, consts)
  st, mask = method.settings, jnp.asarray(batch["mask_BxT"])
  k = layers.topk_count(mask, st.topk_divisor)
  y = vlpo.predicted_labels(jax.nn.softmax(layers.masked_topk_mean(out["cas_BxTxC"], mask, k),
                                           -1), 0.2)
  hyb = vlpo.hybrid_cas(jax.nn.softmax(out["cas_BxTxC"], -1), [out["s_a_BxT"], out["s_v_BxT"]],
                        y, st.dsp_weights == "equal")
  want = jax.nn.softmax(layers.pool_selected(out["cas_BxTxC"], layers.topk_select(hyb, mask, k)),
                        -1)
  np.testing.assert_allclose(got["video_scores_BxC"], want, rtol=1e-5, atol=1e-7)


def test_reading_code_preset_and_its_loss_terms():
  """configs/vlpo.py:reading=code sets every released-code switch (and only those, the
  inference details and the run name); the method builds, every term is finite, and L_mut
  joins the logged terms."""
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "configs" / "vlpo.py"
  spec = importlib.util.spec_from_file_location("vlpo_recipe", path)
  recipe = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(recipe)
  paper, code = recipe.get_config(None), recipe.get_config("reading=code")
  changed = {k for k in paper.vlpo if paper.vlpo[k] != code.vlpo[k]}
  assert changed == {k for k, v in recipe.CODE_READING.items() if paper.vlpo[k] != v}
  assert code.eval.postprocess.nms.sigma == 0.3 and code.eval.sampling == "floor"
  assert code.name == "vlpo-code" and recipe.get_config("reading=code,exp=6").name == \
      "vlpo-exp6-code"
  with pytest.raises(ValueError, match="reading"):
    recipe.get_config("reading=authors")
  cfg = make_config(**recipe.CODE_READING)
  method = Jitted(methods.get_method(cfg, C, DIMS))
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  params = method.init(key(0), batch, consts)["params"]
  loss, aux = method.loss(params, batch, consts, key(1), 0)
  assert set(method.method.loss_weights()) == {"l_mil", "l_act", "l_mut", "l_kl", "l_vl",
                                                "l_snip"}
  assert all(np.isfinite(float(v)) for v in aux.values()) and float(aux["l_kl"]) > 0
  pred = method.predict(params, batch, consts)
  np.testing.assert_allclose(np.asarray(pred["video_scores_BxC"]).sum(-1), 1.0, rtol=1e-5)


def test_dsp_pass1_term_averages_the_labelled_and_the_all_classes_selection():
  """Review finding 4 (the training-side remedy): with dsp_pass1_term, L_vl is the mean of
  Eq. 6's CE at the top-k of A^ (ground-truth labels) and at the top-k of the all-classes A^
  (what inference pass 1 pools)."""
  method, params = build(dsp_pass1_term=True)
  plain, _ = build(dsp_pass1_term=False)
  batch, consts = make_batch(n_valid=[24, 17]), make_consts()
  _, aux = method.loss(params, batch, consts, key(0), 0)
  _, aux0 = plain.loss(params, batch, consts, key(0), 0)
  out = method.apply(params, batch, consts)
  st, mask = method.settings, jnp.asarray(batch["mask_BxT"])
  k = layers.topk_count(mask, st.topk_divisor)
  z = st.vl_logit_scale * (out["sim_t_BxTxC"] + out["sim_v_BxTxC"]) / 2
  hyb_all = vlpo.hybrid_cas(jax.nn.softmax(out["cas_BxTxC"], -1),
                            [out["s_a_BxT"], out["s_v_BxT"]], jnp.ones((B, C)),
                            st.dsp_weights == "equal")
  ce_all = np.mean(vlpo.video_ce(vlpo.vl_video_logits(z, mask, k, hybrid_cas_BxTxC=hyb_all),
                                 jnp.asarray(batch["label_BxC"])))
  np.testing.assert_allclose(aux["l_vl"], 0.5 * (float(aux0["l_vl"]) + ce_all), rtol=1e-5)
  assert abs(float(aux["l_vl"]) - float(aux0["l_vl"])) > 1e-6
