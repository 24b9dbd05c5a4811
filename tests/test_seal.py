"""Tests of SEAL (wstal_jax/methods/seal.py): descriptors of both aggregations on a tiny split
(multi-label, video subsets), each agreement case, the SME loss with an empty group and Eq. 9's
readings, Eq. 10 on hand-made proposals with its gradient on s_pc, L_st / L_c by hand, the
schedules, and a tiny run end to end with resume."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError
from wstal_jax.methods import seal as S

R = 2   # RGB half of the 4-d features


def _dataset(tmp_path, with_c=True):
  rng = np.random.default_rng(0)
  videos = []
  labels = [[1, 0, 0], [1, 0, 0], [1, 1, 0], [0, 1, 0]] + ([[0, 0, 1]] if with_c else [])
  for i, lab in enumerate(labels):
    t = 2 + i
    videos.append(fmt.VideoRecord(name=f"v{i}", duration=t * 0.64,
                                  features={"i3d": rng.normal(size=(t, 4)).astype(np.float32)},
                                  label=np.asarray(lab, np.float32)))
  out = str(tmp_path / ("data" if with_c else "data_no_c"))
  fmt.write_dataset(out, dataset="tiny", classes=["a", "b", "c"], feature_dims={"i3d": 4},
                    splits={"train": videos}, num_shards=1)
  return out, videos


def test_hard_descriptors_both_aggregations(tmp_path):
  data, videos = _dataset(tmp_path)
  feats = [v.features["i3d"].astype(np.float64) for v in videos]
  members = {c: [i for i, v in enumerate(videos) if v.label[c]] for c in range(3)}
  for aggregation in S.AGGREGATIONS:
    d_ap, d_mo = S.hard_descriptors(data, rgb_dim=R, aggregation=aggregation)
    assert d_ap.shape == (3, R) and d_mo.shape == (3, 4 - R)
    for c, idx in members.items():
      if aggregation == "video":      # Eq. 2: the mean of the videos' temporal means
        want = np.mean([feats[i].mean(0) for i in idx], axis=0)
      else:                           # Eq. 1: the mean over all their snippets
        want = np.concatenate([feats[i] for i in idx]).mean(0)
      np.testing.assert_allclose(np.concatenate([d_ap[c], d_mo[c]]), want, rtol=1e-5)
  # Video 2 (labels a and b) counts for both classes.
  assert members[0] == [0, 1, 2] and members[1] == [2, 3]
  data_no_c, _ = _dataset(tmp_path, with_c=False)
  with pytest.raises(WstalError, match=r"data_no_c: SEAL's descriptors need training videos "
                                       r"of every class; none of 'c'"):
    S.hard_descriptors(data_no_c, rgb_dim=R)


def test_agreement_cases_by_hand():
  s_ap = jnp.asarray([[0.6, 0.3, 0.1],    # both say class 0                 -> case 1
                      [0.5, 0.4, 0.1],    # rgb 0, flow 1, average 1 (flow)  -> case 2
                      [0.40, 0.21, 0.39],  # rgb 0, flow 1, average 2        -> case 3
                      ])
  s_mo = jnp.asarray([[0.7, 0.2, 0.1],
                      [0.1, 0.45, 0.45],
                      [0.21, 0.40, 0.39]])
  pseudo, case = S.agreement(s_ap, s_mo)
  np.testing.assert_array_equal(case, [1, 2, 3])
  np.testing.assert_array_equal(np.argmax(pseudo, -1), [0, 1, 2])
  # Through the features: a video whose RGB and flow means point at class 1's descriptors.
  d_ap = jnp.asarray([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])
  d_mo = jnp.asarray([[0.0, 1.0], [1.0, 0.0], [0.0, -1.0]])
  feat = jnp.asarray([[[0.1, 2.0, 3.0, 0.2], [0.0, 1.0, 1.0, 0.0], [9.0, 9.0, 9.0, 9.0]]])
  mask = jnp.asarray([[1.0, 1.0, 0.0]])          # the padded snippet is not pooled
  pseudo, case = S.sme_pseudo_labels(feat, mask, d_ap, d_mo)
  assert int(case[0]) == 1 and int(np.argmax(pseudo[0])) == 1


def test_sme_loss_by_hand_and_empty_groups():
  pred = jnp.asarray([[0.5, 0.5], [1.0, 0.0], [0.2, 0.8], [0.0, 0.0]])
  pseudo = jnp.asarray([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
  valid = jnp.ones(4)
  err = [0.5, 0.0, 0.08, 1.0]          # squared errors summed over the two classes
  got = float(S.sme_loss(pred, pseudo, jnp.asarray([1, 1, 2, 3]), valid, 0.4))
  assert got == pytest.approx((err[0] + err[1]) / 2 + 0.4 * err[2], rel=1e-6)
  # No case-1 video: a finite value from the case-2 group alone (the release: NaN).
  got = float(S.sme_loss(pred, pseudo, jnp.asarray([3, 2, 2, 3]), valid, 0.5))
  assert got == pytest.approx(0.5 * (err[1] + err[2]) / 2, rel=1e-6)
  assert float(S.sme_loss(pred, pseudo, jnp.asarray([3, 3, 3, 3]), valid, 0.5)) == 0.0
  # The release's phi also averages over the classes.
  got = float(S.sme_loss(pred, pseudo, jnp.asarray([1, 1, 2, 3]), valid, 0.4, "mean"))
  assert got == pytest.approx(((err[0] + err[1]) / 2 + 0.4 * err[2]) / 2, rel=1e-6)


def test_hard_descriptors_of_a_video_subset(tmp_path):
  data, videos = _dataset(tmp_path)
  d_ap, d_mo = S.hard_descriptors(data, rgb_dim=R, video_indices=[0, 3, 4])
  feats = [v.features["i3d"].astype(np.float64) for v in videos]
  np.testing.assert_allclose(np.concatenate([d_ap[0], d_mo[0]]), feats[0].mean(0), rtol=1e-5)
  np.testing.assert_allclose(np.concatenate([d_ap[1], d_mo[1]]), feats[3].mean(0), rtol=1e-5)
  with pytest.raises(WstalError, match="none of 'b'"):
    S.hard_descriptors(data, rgb_dim=R, video_indices=[0, 1, 4])


def test_sme_prediction_readings_by_hand():
  cas = jnp.asarray([[[1.0, 0.0, 5.0], [0.0, 2.0, -1.0], [3.0, 3.0, 0.0]]])   # C = 2 (+ bg)
  attn = jnp.asarray([[0.5, 0.25, 0.9]])
  mask = jnp.asarray([[1.0, 1.0, 0.0]])                # the third proposal is padding
  sm = lambda x: np.exp(x) / np.exp(x).sum()
  s0, s1 = sm(np.array([1.0, 0.0])), sm(np.array([0.0, 2.0]))   # background left out
  np.testing.assert_allclose(S.sme_prediction(cas, attn, mask, "attention")[0],
                             (0.5 * s0 + 0.25 * s1) / 0.75, rtol=1e-6)
  np.testing.assert_allclose(S.sme_prediction(cas, attn, mask, "printed")[0],
                             (0.5 * s0 + 0.25 * s1) / 2, rtol=1e-6)
  np.testing.assert_allclose(S.sme_prediction(cas, attn, mask, "release")[0],
                             (s0 + s1) / 2, rtol=1e-6)


# ------------------------------------------------------------------------------------------
# Process consistency (Eq. 10).

# One video: P0 [10, 20] is the only pseudo-true instance (attention far above the others),
# P1 [12, 22] and P2 [0, 14] overlap it, P3 [30, 40] does not, P4 is padding.
PROPS = jnp.asarray([[[10.0, 20.0], [12.0, 22.0], [0.0, 14.0], [30.0, 40.0], [0.0, 0.0]]])
MASK = jnp.asarray([[1.0, 1.0, 1.0, 1.0, 0.0]])
ATTN = jax.nn.sigmoid(jnp.asarray([[3.0, 0.0, 0.0, 0.0, 0.0]]))


def _g(units, match="all"):
  """Per-proposal (centre, ratio, penalty) by hand: L_G = 10, C_G = 15; P0-P2 overlap P0
  (centre differences 0, 2, -8; intersections 10, 8, 4); with match='all' P3 takes part too
  (nearest centre: P0, difference 20, no intersection)."""
  unit = 10.0 if units == "instance" else 1.0
  diff, inter = np.array([0.0, 2.0, -8.0, 20.0]), np.array([10.0, 8.0, 4.0, 0.0])
  if match == "overlapping":
    diff, inter = diff[:3], inter[:3]
  return ((diff / unit) ** 2, (np.abs(diff) / unit) / (inter / unit + 0.1),
          (inter < 5.0).astype(np.float64))


@pytest.mark.parametrize("units", S.PC_UNITS)
@pytest.mark.parametrize("match", S.PC_MATCHES)
def test_process_consistency_hand_values(units, match):
  """The printed Eq. 10 terms of the taking-part proposals (their means: the parts), and
  L_pc = mean (q - exp(-(centre + ratio + penalty)))^2 over them."""
  logits = jnp.asarray([[0.3, -0.2, 0.1, 0.7, 0.0]])
  l_pc, parts, matched = S.process_consistency(logits, ATTN, PROPS, MASK, units=units,
                                               match=match)
  n = 4 if match == "all" else 3
  np.testing.assert_array_equal(matched[0], [True] * n + [False] * (5 - n))
  g = _g(units, match)
  for name, want in zip(("centre", "ratio", "penalty"), g):
    assert float(parts[name][0]) == pytest.approx(want.mean(), rel=1e-5), name
  q = 1 / (1 + np.exp(-np.asarray(logits)[0, :n]))
  assert float(l_pc[0]) == pytest.approx(np.mean((q - np.exp(-sum(g))) ** 2), rel=1e-5)
  # Flat attention: whatever the ratio, every proposal is its own pseudo-true instance
  # (g = 0, target 1).
  l_pc, parts, _ = S.process_consistency(logits, jnp.full((1, 5), 0.5), PROPS, MASK,
                                         ratio=0.8, match=match)
  assert float(parts["centre"][0]) == 0.0
  q4 = 1 / (1 + np.exp(-np.asarray(logits)[0, :4]))
  assert float(l_pc[0]) == pytest.approx(np.mean((q4 - 1) ** 2), rel=1e-5)


def test_process_consistency_gradient_reaches_s_pc():
  """d L / d s_i = 2 (q_i - t_i) q_i (1 - q_i) / N with t = exp(-g): each printed term moves
  the target (dropping one changes the gradient); padded proposals get none."""
  logits = jnp.asarray([[0.3, -0.2, 0.1, 0.7, 0.0]])
  q = np.asarray(jax.nn.sigmoid(logits))[0, :4]
  grad = np.asarray(jax.grad(lambda s: S.process_consistency(s, ATTN, PROPS, MASK)[0][0])(
      logits)[0])
  g = _g("instance")
  t = np.exp(-sum(g))
  np.testing.assert_allclose(grad[:4], 2 * (q - t) * q * (1 - q) / 4, rtol=1e-4)
  assert grad[4] == 0.0
  for drop in range(3):
    t_without = np.exp(-sum(x for i, x in enumerate(g) if i != drop))
    assert np.max(np.abs(2 * (q - t_without) * q * (1 - q) / 4 - grad[:4])) > 1e-3, drop
  # P0 (the pseudo-true instance, target 1) is pushed up, P2 (off-centre) and P3 (far) down.
  assert grad[0] < 0 < grad[2] and grad[3] > 0
  # A video with no valid proposal gives 0, not NaN.
  l_pc, parts, _ = S.process_consistency(logits, ATTN, PROPS, jnp.zeros((1, 5)))
  assert float(l_pc[0]) == 0.0 and all(float(v[0]) == 0.0 for v in parts.values())


# ------------------------------------------------------------------------------------------
# Semantic consistency (Eq. 11-13).


def test_semantic_consistency_hand_values():
  """Class 0 (the label): top-2 by s_base = {P0, P1}, by s_supp = cas * a = {P0, P2}; so
  S_c = {P0} (the descriptor is f0 / |f0|) and the distance is averaged over {P0, P1, P2}."""
  cas = jnp.asarray([[[3.0, 0.0, 0.0], [2.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
  a = jnp.asarray([[0.9, 0.2, 0.8, 0.9]])
  f = jnp.asarray([[[1.0, 0.0], [0.0, 2.0], [3.0, 0.0], [5.0, 5.0]]])   # unit: e0, e1, e0
  label, mask, k = jnp.asarray([[1.0, 0.0]]), jnp.ones((1, 4)), jnp.asarray([2])
  l_st, l_c, has = S.semantic_consistency(cas, a, f, label, mask, k)
  assert bool(has[0]) and float(l_st[0]) == pytest.approx((0.0 + np.sqrt(2) + 0.0) / 3,
                                                          rel=1e-5)
  # Unit-length features: scaling them changes nothing (no shrinking them to lower L_st).
  assert float(S.semantic_consistency(cas, a, 0.1 * f, label, mask, k)[0][0]) == \
      pytest.approx(float(l_st[0]), rel=1e-5)
  base = np.asarray(cas)[0, :, :2]
  supp = base * np.asarray(a)[0, :, None]
  sm = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  want_c = np.mean(np.sum((sm(base) - sm(supp)) ** 2, axis=-1))
  assert float(l_c[0]) == pytest.approx(want_c, rel=1e-5)
  l_c_mean = S.semantic_consistency(cas, a, f, label, mask, k, "mean")[1]
  assert float(l_c_mean[0]) == pytest.approx(want_c / 2, rel=1e-5)
  # The gradient reaches the features and the attention.
  g_f, g_a = jax.grad(lambda f, a: S.semantic_consistency(cas, a, f, label, mask, k)[0][0]
                      + S.semantic_consistency(cas, a, f, label, mask, k)[1][0],
                      argnums=(0, 1))(f, a)
  assert float(jnp.abs(g_f[0, 1]).sum()) > 0 and float(jnp.abs(g_a).sum()) > 0
  np.testing.assert_array_equal(g_f[0, 3], 0.0)           # P3 is in neither set
  # Disjoint top-1 sets: no descriptor, no L_st.
  l_st, _, has = S.semantic_consistency(cas, jnp.asarray([[0.1, 0.2, 0.9, 0.1]]), f, label,
                                        mask, jnp.asarray([1]))
  assert not bool(has[0]) and float(l_st[0]) == 0.0
  # Padded proposals take no part: a padded row with the highest class-0 logit changes nothing.
  cas_p = jnp.concatenate([cas, jnp.asarray([[[9.0, 0.0, 0.0]]])], axis=1)
  f_p = jnp.concatenate([f, jnp.asarray([[[7.0, 7.0]]])], axis=1)
  out = S.semantic_consistency(cas_p, jnp.concatenate([a, jnp.ones((1, 1))], 1), f_p, label,
                               jnp.asarray([[1.0, 1.0, 1.0, 1.0, 0.0]]), k)
  assert float(out[0][0]) == pytest.approx(np.sqrt(2) / 3, rel=1e-5)
  assert float(out[1][0]) == pytest.approx(want_c, rel=1e-5)


def test_schedules():
  assert [round(float(S.lambda1(e, 30.0)), 4) for e in (1, 16, 31, 60)] == [1.0, 0.5, 0.0, 0.0]
  assert [round(float(S.lambda3(e, 50.0)), 4) for e in (1, 26, 51, 90)] == [1.0, 0.5, 0.0, 0.0]
  assert float(S.lambda3(1, 50.0, "exp")) == pytest.approx(np.exp(-1 / 8), rel=1e-6)
  assert float(S.lambda3(71, 50.0, "exp")) == 0.0
  assert [round(float(S.alpha(e, 50.0)), 4) for e in (1, 26, 51, 90)] == [0.3, 0.4, 0.5, 0.5]


# ------------------------------------------------------------------------------------------
# The method end to end.


def test_tiny_run_with_resume_and_padding_invariant_predict(tmp_path):
  from test_pmil import _dataset_with_proposals, _pmil_config, check_resume_and_padding
  from wstal_jax import methods, run_setup, train
  data = _dataset_with_proposals(tmp_path)
  config = _pmil_config(data, recipe="seal")
  full = str(tmp_path / "full")
  metrics = train.train_and_evaluate(config, full)
  assert np.isfinite(metrics["average_mAP"])
  # run_setup gave the method the descriptors of the training split; with model selection
  # on held-out training videos, of the videos that train only.
  setup = run_setup.setup(config)
  np.testing.assert_allclose(
      setup.consts["sme_ap_CxR"],
      S.hard_descriptors(data, rgb_dim=setup.method.rgb_dim)[0], rtol=1e-6)
  held = config.copy_and_resolve_references()
  held.eval.select_on, held.eval.heldout_fraction = "heldout", 0.2
  train_idx, heldout_idx = run_setup.heldout_split(6, 0.2, held.seed)
  assert len(heldout_idx) == 1
  got = run_setup.setup(held).consts["sme_mo_CxF"]
  np.testing.assert_allclose(got, S.hard_descriptors(data, rgb_dim=setup.method.rgb_dim,
                                                     video_indices=train_idx)[1], rtol=1e-6)
  assert not np.allclose(got, setup.consts["sme_mo_CxF"])
  method, params, batch, a = check_resume_and_padding(config, full,
                                                      str(tmp_path / "resumed"))
  # The score fuses the three heads; without L_pc the untrained s_pc head is left out.
  outs = method.forward(params, {k: jnp.asarray(v) for k, v in batch.items()})["fused"]
  p = jax.nn.softmax(outs["cas_BxMxC1"], -1)[..., :-1]
  fused = p * (jax.nn.sigmoid(outs["attn_logit_BxM"])
               * jax.nn.sigmoid(outs["iou_logit_BxM"]))[..., None]
  np.testing.assert_allclose(np.asarray(a["proposal_scores_BxMxC"])[0], fused[0], rtol=1e-5)
  config.seal.pc = False
  no_pc = methods.get_method(config, 3, {"feat": 8, "train_videos": 6}).predict(
      params, {k: jnp.asarray(v) for k, v in batch.items()}, {})
  np.testing.assert_allclose(
      np.asarray(no_pc["proposal_scores_BxMxC"])[0],
      p[0] * jax.nn.sigmoid(outs["attn_logit_BxM"])[0, :, None], rtol=1e-5)


def test_seal_config_errors():
  from test_pmil import _pmil_config
  from wstal_jax import methods
  config = _pmil_config("unused", recipe="seal")
  for field, value, match in (("aggregation", "frame", "choose one of"),
                              ("pc_units", "px", "choose one of"),
                              ("pc_ratio", 0.0, r"in \(0, 1\]"),
                              ("lambda1_epochs", 0.0, "> 0")):
    bad = _pmil_config("unused", recipe="seal", **{field: value})
    with pytest.raises(WstalError, match=rf"config.seal.{field}=.*{match}"):
      methods.get_method(bad, 3, {"feat": 8, "train_videos": 6})
  config.data.proposals = False
  with pytest.raises(WstalError, match="candidate proposals"):
    methods.get_method(config, 3, {"feat": 8, "train_videos": 6})


def _tiny_method_and_batch(seed=0):
  from test_pmil import _pmil_config
  from wstal_jax import methods
  config = _pmil_config("unused", recipe="seal")          # steps_per_epoch 1: epoch = step + 1
  method = methods.get_method(config, 3, {"feat": 8, "train_videos": 6})
  rng = np.random.default_rng(seed)
  m = 20
  start = rng.uniform(0, 10, (2, m))
  props = np.stack([start, start + rng.uniform(1, 6, (2, m))], -1).astype(np.float32)
  batch = {"feat_BxTxD": np.abs(rng.normal(size=(2, 16, 8))).astype(np.float32),
           "mask_BxT": np.ones((2, 16), np.float32), "proposals_BxMx2": props,
           "proposal_mask_BxM": np.ones((2, m), np.float32),
           "label_BxC": np.array([[1, 0, 0], [0, 1, 1]], np.float32),
           "valid_B": np.ones(2, np.float32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}
  consts = method.stand_in_consts()
  params = method.init(jax.random.key(0), batch, consts)["params"]
  return method, batch, consts, params


def test_loss_terms_ignore_padded_proposals_and_videos():
  """Every term (and the gradient) is unchanged by padded proposals (any coordinates) and by
  a padded video (valid_B = 0, here a copy of a real one with another label); a video whose
  proposals are all padding gives finite gradients."""
  method, batch, consts, params = _tiny_method_and_batch()
  terms = lambda p, b: method.terms_from_out(method.forward(p, b), b, jnp.int32(0), consts)
  total = lambda p, b: sum(w * terms(p, b)[k] for k, w in method.loss_weights().items())
  want = terms(params, batch)
  big = dict(batch)
  pad = jnp.asarray(np.tile([[[0.0, 0.0], [3.0, 19.0], [7.0, 7.0]]], (2, 2, 1)))
  big["proposals_BxMx2"] = jnp.concatenate([batch["proposals_BxMx2"], pad], axis=1)
  big["proposal_mask_BxM"] = jnp.pad(batch["proposal_mask_BxM"], ((0, 0), (0, 6)))
  for k in ("feat_BxTxD", "mask_BxT", "proposals_BxMx2", "proposal_mask_BxM"):
    big[k] = jnp.concatenate([big[k], big[k][:1]], axis=0)
  big["label_BxC"] = jnp.concatenate([batch["label_BxC"], jnp.asarray([[0.0, 0.0, 1.0]])])
  big["valid_B"] = jnp.asarray([1.0, 1.0, 0.0])
  got = terms(params, big)
  for k, v in want.items():
    assert float(got[k]) == pytest.approx(float(v), rel=1e-5, abs=1e-7), k
  g_a = jax.grad(total)(params, batch)
  g_b = jax.grad(total)(params, big)
  for a, b in zip(jax.tree.leaves(g_a), jax.tree.leaves(g_b)):
    np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
  empty = dict(batch)
  empty["proposal_mask_BxM"] = batch["proposal_mask_BxM"].at[1].set(0.0)
  grads = jax.grad(total)(params, empty)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in jax.tree.leaves(grads))


def test_schedules_act_inside_the_loss():
  """l_sme = lambda1(epoch) x Eq. 8, l_c = lambda3(epoch) x Eq. 12, l_st = lambda3 x alpha x
  Eq. 11 at the step's epoch (epoch = step // steps_per_epoch + 1)."""
  method, batch, consts, params = _tiny_method_and_batch(1)
  outs = method.forward(params, batch)
  o = outs["fused"]
  attn = jax.nn.sigmoid(o["attn_logit_BxM"])
  mask = batch["proposal_mask_BxM"]
  k = jnp.maximum(jnp.sum(mask, 1).astype(jnp.int32) // 8, 1)
  l_st, l_c, _ = S.semantic_consistency(o["cas_BxMxC1"], attn, o["emb_BxMxH"],
                                        batch["label_BxC"], mask, k)
  pseudo, case = S.sme_pseudo_labels(batch["feat_BxTxD"], batch["mask_BxT"],
                                     consts["sme_ap_CxR"], consts["sme_mo_CxF"])
  pred = S.sme_prediction(o["cas_BxMxC1"], attn, mask)
  for step in (0, 15, 25, 29, 30, 60):
    epoch = step + 1
    terms = method.terms_from_out(outs, batch, jnp.int32(step), consts)
    moderate = max(1.0 - (epoch - 1) / method.total_epochs, 0.0)
    lam1 = max(1.0 - (epoch - 1) / 30, 0.0)
    lam3 = 0.5 * (1 + np.cos(np.pi * min((epoch - 1) / 50, 1.0)))
    alpha = 0.3 + 0.2 * min((epoch - 1) / 50, 1.0)
    want = lam1 * float(S.sme_loss(pred, pseudo, case, batch["valid_B"], moderate))
    assert float(terms["l_sme"]) == pytest.approx(want, rel=1e-5, abs=1e-9), step
    assert float(terms["l_c"]) == pytest.approx(lam3 * float(jnp.mean(l_c)), rel=1e-5,
                                                abs=1e-9), step
    assert float(terms["l_st"]) == pytest.approx(lam3 * alpha * float(jnp.mean(l_st)),
                                                 rel=1e-5, abs=1e-9), step
  assert method.total_epochs == 6.0     # 6 steps at one step an epoch
