"""Tests of MLLM4WTAL (wstal_jax/methods/mllm4wtal.py): the A-weighted attention of Eq. 14-15
against a numpy transcription, the word masking (1/3, deterministic per (seed, step),
favouring action words), L_KSM / the localization terms by hand, the pseudo-instances and the
regression vote, which parameters each DPID phase updates, padding invariance, and a tiny
command-line run through both phases and an evaluation from its checkpoint."""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax import methods, train
from wstal_jax.data import descriptions as desc
from wstal_jax.errors import WstalError
from wstal_jax.methods import mllm4wtal as M
from wstal_jax.models import mllm4wtal as mllm_models
from test_co2net import C, D, ROOT, _main, _write_dataset, garbage_padded, key, make_batch

V, WD, LK, LC = 14, 5, 6, 10     # vocabulary, word-vector width, key / complete lengths


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location("mllm4wtal_config_for_test",
                                                ROOT / "configs" / "mllm4wtal.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def tiny_config(arg=None, **fields):
  config = load_config(arg)
  with config.unlocked():
    if "co2net" in config:
      config.co2net.attn_hidden = 8
    for k, v in dict(ksm_dim=16, text_dim=8, text_heads=2, num_context=2, csr_dim=8,
                     loc_hidden=8, **fields).items():
      config.mllm4wtal[k] = v
  return config


def consts(seed=0):
  rng = np.random.default_rng(seed)
  vectors = rng.normal(size=(V, WD)).astype(np.float32)
  vectors[:2] = 0
  return {"word_vectors_VxD": jnp.asarray(vectors),
          "class_name_tokens_CxL": jnp.asarray(desc.pad_tokens([[2], [3, 4], [5]], LK)),
          "class_key_tokens_CxL": jnp.asarray(desc.pad_tokens([[6, 2], [7, 3, 4], [8, 5]], LK)),
          "template_tokens_CxL": jnp.asarray(desc.pad_tokens([[9, 10, 2], [9, 10, 3, 4],
                                                              [9, 10, 5]], LC))}


DIMS = {"feat": D, "words": WD, "vocab": V}


def described_batch(seed=0, **kw):
  batch = make_batch(seed=seed, **kw)
  rng = np.random.default_rng(seed + 100)
  b = batch["label_BxC"].shape[0]
  batch["key_tokens_BxL"] = desc.pad_tokens(
      [rng.integers(2, V, size=int(rng.integers(2, LK + 1))) for _ in range(b)], LK)
  batch["complete_tokens_BxL"] = desc.pad_tokens(
      [rng.integers(2, V, size=int(rng.integers(3, LC + 1))) for _ in range(b)], LC)
  return batch


def jnp_batch(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


# ------------------------------------------------------------------------------------------
# Eq. 14-15.


def np_a_weighted_attention(q, k, v, a, mask):
  """Eq. 14 / 15 for one video, loops in float64: softmax_j((q_i . k_j / sqrt(d)) * a_j)
  over the valid keys j, then the weighted sum of v_j."""
  d = q.shape[-1]
  out = np.zeros((q.shape[0], v.shape[1]))
  for i in range(q.shape[0]):
    logits = np.array([q[i] @ k[j] / np.sqrt(d) * a[j] for j in range(len(k)) if mask[j]])
    w = np.exp(logits - logits.max())
    w /= w.sum()
    out[i] = sum(wj * v[j] for wj, j in zip(w, [j for j in range(len(k)) if mask[j]]))
  return out


def test_a_weighted_attention_matches_numpy():
  rng = np.random.default_rng(0)
  q = rng.normal(size=(2, 5, 4)).astype(np.float32)
  kk = rng.normal(size=(2, 7, 4)).astype(np.float32) * 3
  v = rng.normal(size=(2, 7, 3)).astype(np.float32)
  a = rng.uniform(size=(2, 7)).astype(np.float32)
  mask = np.ones((2, 7), np.float32)
  mask[1, 4:] = 0
  attend = mllm_models.a_weighted_attention
  got = np.asarray(attend(*(jnp.asarray(x) for x in (q, kk, v, a, mask))))
  for b in range(2):
    np.testing.assert_allclose(got[b], np_a_weighted_attention(q[b], kk[b], v[b], a[b],
                                                               mask[b]), rtol=1e-5, atol=1e-6)
  # a = 0 on a key makes its logit 0, not -inf: it keeps a share (Eq. 14 as printed).
  zero = np.asarray(attend(jnp.asarray(q), jnp.asarray(kk), jnp.asarray(v), jnp.zeros_like(a),
                           jnp.asarray(mask)))
  np.testing.assert_allclose(zero[0], np.broadcast_to(v[0].mean(0), (5, 3)), rtol=1e-5)
  # gate='probs': softmax(logit + log a) = the probabilities weighted by a, renormalised.
  probs = np.asarray(attend(*(jnp.asarray(x) for x in (q, kk, v, a, mask)), gate="probs"))
  for b in range(2):
    valid = mask[b] > 0
    logits = q[b] @ kk[b][valid].T / 2.0
    w = np.exp(logits - logits.max(1, keepdims=True)) * a[b][valid]
    w /= w.sum(1, keepdims=True)
    np.testing.assert_allclose(probs[b], w @ v[b][valid], rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Word masking.


def test_mask_words_one_third_deterministic_per_seed_and_step():
  tokens = jnp.asarray(desc.pad_tokens([[2, 3, 4, 5, 6, 7, 8, 9, 10], [2, 3], [4, 5, 6, 7]],
                                       12))
  weights = jnp.ones(V)
  k1 = jax.random.fold_in(jax.random.key(0), 5)
  a = np.asarray(M.mask_words(k1, tokens, weights, 1 / 3))
  np.testing.assert_array_equal(a, np.asarray(M.mask_words(k1, tokens, weights, 1 / 3)))
  assert a.sum(1).tolist() == [3, 1, 1]            # round(n / 3), at least one
  assert not (a & (np.asarray(tokens) == desc.PAD)).any()
  draws = {tuple(np.asarray(M.mask_words(jax.random.fold_in(jax.random.key(0), s), tokens,
                                         weights, 1 / 3))[0]) for s in range(20)}
  assert len(draws) > 5                            # the step changes the draw
  other_seed = np.asarray(M.mask_words(jax.random.fold_in(jax.random.key(1), 5), tokens,
                                       weights, 1 / 3))
  assert not np.array_equal(a, other_seed)


def test_masking_favours_action_words():
  vectors = np.zeros((V, 3), np.float32)
  vectors[2] = [1, 0, 0]        # the class name word
  vectors[3] = [0.9, 0.1, 0]    # an action word close to it
  vectors[4:] = [0, 0, 1]       # function words
  w = np.asarray(M.action_word_weights(jnp.asarray(vectors),
                                       jnp.asarray(desc.pad_tokens([[2]], 2))))
  assert w[2] == pytest.approx(3.0) and w[3] > 2.9 and w[5] == pytest.approx(1.0)
  tokens = jnp.asarray(desc.pad_tokens([[3, 4, 5, 6, 7, 8]], 6))
  counts = np.zeros(6)
  for s in range(300):
    counts += np.asarray(M.mask_words(jax.random.key(s), tokens, jnp.asarray(w), 1 / 3))[0]
  assert counts[0] > 2 * counts[1:].mean()


# ------------------------------------------------------------------------------------------
# Terms by hand.


def test_ksm_loss_by_hand():
  sim = np.array([[[2.0, 0.0, 1.0], [0.0, 1.0, 0.5]]], np.float32)   # T=2, C=2 (+bg)
  attn = np.array([[1.0, 0.5]], np.float32)
  label = np.array([[1.0, 0.0]], np.float32)
  got = float(M.ksm_loss(jnp.asarray(sim), jnp.asarray(attn), jnp.asarray(label),
                         jnp.ones((1, 2)), jnp.asarray([1]))[0])
  s = sim[0].max(0)                                  # top-1 over time
  s_hat = (attn[0][:, None] * sim[0]).max(0)
  lsm = lambda x: x - np.log(np.exp(x).sum())
  want = -(0.5 * lsm(s)[0] + 0.5 * lsm(s)[2]) - lsm(s_hat)[0]
  assert got == pytest.approx(want, rel=1e-5)


def test_csr_loss_only_masked_positions():
  logits = jnp.log(jnp.asarray([[[0.5, 0.25, 0.25], [0.1, 0.1, 0.8]]]))
  tokens = jnp.asarray([[1, 2]])
  got = M.csr_loss(logits, tokens, jnp.asarray([[True, False]]))
  assert float(got[0]) == pytest.approx(-np.log(0.25), rel=1e-5)
  both = M.csr_loss(logits, tokens, jnp.asarray([[True, True]]))
  assert float(both[0]) == pytest.approx(-(np.log(0.25) + np.log(0.8)) / 2, rel=1e-5)


def test_pseudo_instances_by_hand():
  attn = jnp.asarray([[0.9, 0.9, 0.2, 0.8, 0.8, 0.8, 0.9, 0.0]])
  cas = np.zeros((1, 8, 3), np.float32)
  cas[0, :, 0] = 1.0
  cas[0, 5:, 1] = 2.0          # class 1 wins from snippet 5 on
  cas[0, :, 2] = 5.0           # class 2 is not a label of the video: never chosen
  mask = jnp.asarray([[1, 1, 1, 1, 1, 1, 1, 0]], jnp.float32)
  fg, cls, start, end = (np.asarray(x) for x in M.pseudo_instances(
      attn, jnp.asarray(cas), jnp.asarray([[1.0, 1.0, 0.0]]), mask, 0.5))
  assert fg.tolist() == [[True, True, False, True, True, True, True, False]]
  assert cls[0, fg[0]].tolist() == [0, 0, 0, 0, 1, 1]
  assert start[0, fg[0]].tolist() == [0, 0, 3, 3, 5, 5]
  assert end[0, fg[0]].tolist() == [2, 2, 5, 5, 7, 7]


def test_diou_and_focal_by_hand():
  d = M.diou_loss(jnp.asarray([0.0, 0.0]), jnp.asarray([2.0, 1.0]), jnp.asarray([1.0, 2.0]),
                  jnp.asarray([3.0, 3.0]))
  # [0,2] vs [1,3]: IoU 1/3, centres 1 vs 2, enclosing 3; [0,1] vs [2,3]: IoU 0, centres
  # 0.5 vs 2.5, enclosing 3.
  np.testing.assert_allclose(np.asarray(d), [1 - 1 / 3 + (1 / 3) ** 2, 1 + (2 / 3) ** 2], rtol=1e-6)
  x, y = 0.3, 1.0
  p = 1 / (1 + np.exp(-x))
  want = 0.25 * (1 - p) ** 2 * -np.log(p) + 0.75 * (1 / (1 + np.exp(-0.7))) ** 2 * -np.log(
      1 - 1 / (1 + np.exp(-0.7)))
  got = M.focal_loss(jnp.asarray([[[x, 0.7]]]), jnp.asarray([[[y, 0.0]]]), jnp.ones((1, 1)),
                     0.25, 2.0)
  assert float(got[0]) == pytest.approx(want, rel=1e-5)


def test_regression_vote_by_hand():
  prob = jnp.asarray([[0.2, 0.9, 0.1, 0.5]])
  dist = jnp.asarray([[[0.5, 0.5], [1.5, 1.5], [0.5, 0.5], [0.5, 0.5]]])
  # Snippet 1 (centre 1.5) covers centres 0.5 ... 2.5 (snippets 0-2) with 0.9.
  vote = np.asarray(M.regression_vote(prob, dist, jnp.ones((1, 4))))
  np.testing.assert_allclose(vote, [[0.9, 0.9, 0.9, 0.5]], rtol=1e-6)
  masked = np.asarray(M.regression_vote(prob, dist, jnp.asarray([[1.0, 0.0, 1.0, 1.0]])))
  np.testing.assert_allclose(masked, [[0.2, 0.0, 0.1, 0.5]], rtol=1e-6)


# ------------------------------------------------------------------------------------------
# The method.


def test_dpid_phases_update_their_own_parameters():
  config = tiny_config(dpid_steps=1)
  method = methods.get_method(config, C, DIMS)
  assert method.alternate_steps == 1
  cst = consts()
  batch = jnp_batch(described_batch())
  params = method.init(key(0), batch, cst)["params"]
  labels = method.param_labels(params, 0)
  assert set(jax.tree.leaves(labels["csr"])) == {"train@1"}
  assert {l for k in ("base", "ksm", "loc") for l in jax.tree.leaves(labels[k])} == {"train@0"}
  tx = train.make_optimizer(config, labels, alternate_steps=method.alternate_steps)
  state = tx.init(params)

  def step(params, state, s):
    grads = jax.grad(lambda p: method.loss(p, batch, cst, key(s), jnp.int32(s))[0])(params)
    updates, state = tx.update(grads, state, params)
    import optax
    return optax.apply_updates(params, updates), state

  def changed(a, b):
    return {k: any(not np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a[k]),
                                                             jax.tree.leaves(b[k])))
            for k in a}

  p1, s1 = step(params, state, 0)     # a KSM step
  assert changed(params, p1) == {"base": True, "ksm": True, "loc": True, "csr": False}
  p2, s2 = step(p1, s1, 1)            # a CSR step
  assert changed(p1, p2) == {"base": False, "ksm": False, "loc": False, "csr": True}
  p3, _ = step(p2, s2, 2)
  assert changed(p2, p3)["ksm"] and not changed(p2, p3)["csr"]
  # dpid_steps=2: two KSM steps, then two CSR steps.
  tx2 = train.make_optimizer(config, labels, alternate_steps=2)
  on = [[float(jnp.abs(u).sum()) > 0 for u in (jax.tree.leaves(upd["ksm"])[0],
                                               jax.tree.leaves(upd["csr"])[0])]
        for upd in (tx2.update(jax.tree.map(jnp.ones_like, params),
                               _advance(tx2, params, n), params)[0] for n in range(4))]
  assert on == [[True, False], [True, False], [False, True], [False, True]]
  # dpid_steps=0 (default): both groups every step; the CSR group's gradient is still only
  # L_rec's (the KSM-side terms do not reach it).
  both = methods.get_method(tiny_config(), C, DIMS)
  assert set(jax.tree.leaves(both.param_labels(params, 0))) == {"train"}
  g_total = jax.grad(lambda p: both.loss(p, batch, cst, key(0), jnp.int32(0))[0])(params)
  def rec(p):
    terms = both.loss(p, batch, cst, key(0), jnp.int32(0))[1]
    return terms["l_csr"] + 1.5 * terms["l_distill_csr"]
  g_rec = jax.grad(rec)(params)
  for x, y in zip(jax.tree.leaves(g_total["csr"]), jax.tree.leaves(g_rec["csr"])):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def _advance(tx, params, n):
  state = tx.init(params)
  for _ in range(n):
    _, state = tx.update(jax.tree.map(jnp.ones_like, params), state, params)
  return state


def test_loss_terms_act_and_add_up():
  method = methods.get_method(tiny_config(), C, DIMS)
  cst = consts()
  batch = jnp_batch(described_batch())
  params = method.init(key(0), batch, cst)["params"]
  total, terms = method.loss(params, batch, cst, key(1), jnp.int32(0))
  weights = method.loss_weights()
  assert {"l_ksm", "l_csr", "l_distill_ksm", "l_distill_csr", "l_focal", "l_diou",
          "l_loc_mil", "l_edl", "l_uct"} <= set(weights)
  np.testing.assert_allclose(float(total), sum(w * float(terms[k]) for k, w in weights.items()),
                             rtol=1e-5)
  # The distillation terms train their own side only (psi = stop-gradient).
  g = jax.grad(lambda p: method.loss(p, batch, cst, key(1), jnp.int32(0))[1]["l_distill_csr"])(
      params)
  norm = lambda t: sum(float(jnp.abs(x).sum()) for x in jax.tree.leaves(t))
  assert norm(g["csr"]) > 0 and norm(g["base"]) == 0
  g = jax.grad(lambda p: method.loss(p, batch, cst, key(1), jnp.int32(0))[1]["l_distill_ksm"])(
      params)
  assert norm(g["base"]) > 0 and norm(g["csr"]) == 0
  # Ablations drop their terms.
  plain = methods.get_method(tiny_config(use_ksm=False, use_csr=False, dpid_steps=1), C, DIMS)
  assert not {"l_ksm", "l_csr"} & set(plain.loss_weights())
  assert set(jax.tree.leaves(plain.param_labels(params, 0))) == {"train"}


def test_distillation_targets_by_hand():
  """Eq. 19-20's MSE(a, psi(target)) over the valid snippets: psi='soft' (stop-gradient) and
  'binary' (1[target > threshold]); the gradient never reaches the target."""
  a = jnp.asarray([[0.2, 0.9, 0.6, 0.5]])
  t = jnp.asarray([[0.7, 0.4, 0.55, 0.0]])
  mask = jnp.asarray([[1.0, 1.0, 1.0, 0.0]])
  soft = ((0.2 - 0.7) ** 2 + (0.9 - 0.4) ** 2 + (0.6 - 0.55) ** 2) / 3
  binary = ((0.2 - 1) ** 2 + (0.9 - 0) ** 2 + (0.6 - 1) ** 2) / 3
  np.testing.assert_allclose(M.attention_mse(a, t, mask), [soft], rtol=1e-6)
  np.testing.assert_allclose(M.attention_mse(a, t, mask, "binary", 0.5), [binary], rtol=1e-6)
  np.testing.assert_allclose(M.attention_mse(a, t, mask, "binary", 0.6), [
      ((0.2 - 1) ** 2 + 0.9 ** 2 + 0.6 ** 2) / 3], rtol=1e-6)
  for psi in M.PSIS:
    g_a, g_t = jax.grad(lambda x, y: M.attention_mse(x, y, mask, psi)[0], (0, 1))(a, t)
    assert float(jnp.abs(g_t).sum()) == 0 and float(jnp.abs(g_a[:, 3]).sum()) == 0
    assert float(jnp.abs(g_a).sum()) > 0


def test_grad_reach_shares_within_a_parameter_group():
  """benchmarks/grad_reach.py: only the terms that reach a group get a share there (CSR's
  attention: L_CSR and the CSR-side distillation; with the printed logits gate L_CSR's share
  is smaller than with the probability gate), the shares add up to 100, a bad glob is one
  error."""
  spec = importlib.util.spec_from_file_location("wstal_bench_grad_reach",
                                                ROOT / "benchmarks" / "grad_reach.py")
  reach = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(reach)
  cst = consts()
  batches = [jnp_batch(described_batch(seed=s)) for s in (0, 1)]
  got = {}
  for gate in ("probs", "logits"):
    method = methods.get_method(tiny_config(csr_gate=gate), C, DIMS)
    params = method.init(key(0), batches[0], cst)["params"]
    got[gate] = reach.group_shares(method, params, batches, cst, 0,
                                   {"csr_attn": "csr/attn*", "base": "base/*"})
    assert set(got[gate]["csr_attn"]) == {"l_csr", "l_distill_csr"}
    assert "l_csr" not in got[gate]["base"] and "l_edl" in got[gate]["base"]
    for shares in got[gate].values():
      assert sum(shares.values()) == pytest.approx(100.0, abs=1e-3)
  assert got["probs"]["csr_attn"]["l_csr"] > got["logits"]["csr_attn"]["l_csr"]
  with pytest.raises(WstalError, match=r"group x='nothing/\*' matches no parameter"):
    reach.group_shares(method, params, batches, cst, 0, {"x": "nothing/*"})
  with pytest.raises(WstalError, match="is not NAME=GLOB"):
    reach.parse_groups("csr/attn*")


def test_key_descriptions_drive_the_queries():
  """ksm_text='key' reads the video's own description for its classes, 'class_name' does not."""
  cst = consts()
  b1 = described_batch()
  b2 = dict(b1, key_tokens_BxL=np.roll(b1["key_tokens_BxL"], 1, axis=0))
  for text, differs in (("key", True), ("class_name", False)):
    method = methods.get_method(tiny_config(ksm_text=text), C, DIMS)
    params = method.init(key(0), jnp_batch(b1), cst)["params"]
    feat = method.base.forward(params["base"], jnp_batch(b1), cst)["feat_BxTxF"]
    sims = [np.asarray(method._ksm_similarity(params["ksm"], feat, jnp_batch(b), cst, None,
                                              False)) for b in (b1, b2)]
    assert (not np.allclose(*sims)) == differs, text


def test_predict_padding_invariant_and_loc_inference():
  method = methods.get_method(tiny_config(), C, DIMS)
  cst = consts()
  short = described_batch(seed=4, n_valid=[16, 12, 16, 9])
  params = method.init(key(0), jnp_batch(short), cst)["params"]
  predict = jax.jit(lambda p, b: method.predict(p, b, cst))
  evalb = {k: v for k, v in short.items() if "tokens" not in k}    # no text at inference
  a = predict(params, jnp_batch(evalb))
  b = predict(params, jnp_batch(garbage_padded(evalb, 24)))
  valid = short["mask_BxT"] > 0
  for name in ("cas_BxTxC", "actionness_BxT", "frame_ksm_BxTxC", "frame_csr_BxTxC"):
    np.testing.assert_allclose(np.asarray(b[name])[:, :16][valid], np.asarray(a[name])[valid],
                               rtol=1e-5, atol=1e-6)
  # The two priors' frame scores (the Evaluator's fg / bg mIoU): A_KSM is the base's
  # attention, A_CSR the CSR branch's own (it reads no text), each the same for every class.
  out = method.base.forward(params["base"], jnp_batch(evalb), cst)
  np.testing.assert_allclose(np.asarray(a["frame_ksm_BxTxC"])[..., 1],
                             np.asarray(out["attn_BxT"]), rtol=1e-6)
  words = jnp.asarray(short["complete_tokens_BxL"])
  a_csr = method.csr.apply({"params": params["csr"]}, jnp.asarray(short["feat_BxTxD"]),
                           jnp.asarray(short["mask_BxT"]), words, jnp.zeros_like(words, bool),
                           cst["word_vectors_VxD"], False)[0]
  np.testing.assert_allclose(np.asarray(a["frame_csr_BxTxC"])[..., 2], np.asarray(a_csr),
                             rtol=1e-6)
  np.testing.assert_allclose(b["video_scores_BxC"], a["video_scores_BxC"], rtol=1e-5)
  assert np.asarray(a["actionness_BxT"]).max() == pytest.approx(1.0)
  # The head decides the actionness (its regression vote); by default the base's classifier
  # gives the video scores and the CAS the proposals are scored on (loc_cas='loc': the head's).
  base = methods.get_method(tiny_config(inference="base"), C, DIMS)
  c = jax.jit(lambda p, b: base.predict(p, b, cst))(params, jnp_batch(evalb))
  assert not np.allclose(np.asarray(c["actionness_BxT"]), np.asarray(a["actionness_BxT"]))
  np.testing.assert_allclose(np.asarray(c["cas_BxTxC"]), np.asarray(a["cas_BxTxC"]), rtol=1e-6)
  np.testing.assert_allclose(np.asarray(c["video_scores_BxC"]), np.asarray(a["video_scores_BxC"]),
                             rtol=1e-6)
  head = methods.get_method(tiny_config(loc_cas="loc", loc_video_score="loc"), C, DIMS)
  d = jax.jit(lambda p, b: head.predict(p, b, cst))(params, jnp_batch(evalb))
  assert not np.allclose(np.asarray(d["cas_BxTxC"]), np.asarray(a["cas_BxTxC"]))
  assert not np.allclose(np.asarray(d["video_scores_BxC"]), np.asarray(a["video_scores_BxC"]))
  np.testing.assert_allclose(np.asarray(d["actionness_BxT"]), np.asarray(a["actionness_BxT"]))


def test_table_rows_build_and_bad_settings():
  cst = consts()
  batch = jnp_batch(described_batch())
  for arg, fields in ((None, dict(csr_text="template")), ("base=co2net", {}),
                      (None, dict(ksm_text="class_name", use_csr=False))):
    method = methods.get_method(tiny_config(arg, **fields), C, DIMS)
    params = method.init(key(0), batch, cst)["params"]
    total, _ = method.loss(params, batch, cst, key(1), jnp.int32(0))
    assert np.isfinite(float(total))
  assert type(methods.get_method(tiny_config("base=co2net"), C, DIMS).base).__name__ == "CO2Net"
  with pytest.raises(WstalError, match=r"config.mllm4wtal.ksm_text='names'"):
    methods.get_method(tiny_config(ksm_text="names"), C, DIMS)
  with pytest.raises(WstalError, match=r"config.mllm4wtal.psi='hard'.*'binary'"):
    methods.get_method(tiny_config(psi="hard"), C, DIMS)
  with pytest.raises(WstalError, match=r"inference.*needs use_loc=True"):
    methods.get_method(tiny_config(use_loc=False), C, DIMS)
  with pytest.raises(WstalError, match=r"needs video descriptions"):
    methods.get_method(tiny_config(), C, {"feat": D})
  with pytest.raises(ValueError, match="base='um'"):
    load_config("base=um")


# ------------------------------------------------------------------------------------------
# End to end.


def _write_described(tmp_path):
  """test_co2net's tiny dataset (classes a, b, c; video i of a split has class i % 3) plus
  descriptions and word vectors."""
  plain = _write_dataset(tmp_path / "plain")
  texts = {}
  for split, n in (("train", 6), ("test", 3)):
    for i in range(n):
      texts[f"{split}_{i}"] = {"key": ["a person throws the ball", "b person jumps long",
                                       "c person dives"][i % C],
                               "complete": ["throws the ball then pitch", "jumps long sand",
                                            "dives then pool"][i % C]}
  (tmp_path / "desc.json").write_text(json.dumps(texts))
  words = ["a", "b", "c", "throws", "ball", "pitch", "jumps", "long", "sand", "dives", "pool",
           "the", "person", "then"]
  rng = np.random.default_rng(2)
  (tmp_path / "glove.txt").write_text("".join(
      f"{w} {' '.join(f'{x:.4f}' for x in rng.normal(size=4))}\n" for w in words))
  out = tmp_path / "data"
  desc.add_descriptions(plain, str(out), descriptions=str(tmp_path / "desc.json"),
                        word_vectors=str(tmp_path / "glove.txt"))
  return str(out)


def test_cli_both_phases_then_eval(tmp_path):
  data = _write_described(tmp_path)
  workdir = tmp_path / "run"
  small = [f"--config.mllm4wtal.{k}={v}" for k, v in dict(
      ksm_dim=16, text_dim=8, text_heads=2, num_context=2, csr_dim=8, loc_hidden=8).items()]
  proc = _main([f"--config={ROOT / 'configs' / 'mllm4wtal.py'}", f"--config.data.dir={data}",
                f"--workdir={workdir}", "--config.train.num_steps=3",
                "--config.train.eval_every=3", "--config.train.log_every=1",
                "--config.data.num_snippets=16", "--config.train.batch_size=4",
                "--config.eval.batch_size=4", "--config.co2net.attn_hidden=8",
                "--config.eval.num_plots=0", "--config.data.max_key_tokens=6",
                "--config.data.max_complete_tokens=8", *small], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  for term in ("l_ksm", "l_csr", "l_distill_ksm", "l_focal", "l_diou", "l_loc_mil"):
    assert f"{term} " in proc.stderr, term
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["step"] == 3 and np.isfinite(metrics["average_mAP"])
  proc = _main(["--mode=eval", f"--workdir={workdir}", "--checkpoint=latest",
                f"--eval_dir={tmp_path / 'eval'}"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert again["average_mAP"] == metrics["average_mAP"]
  # A dataset without descriptions: one clear error.
  proc = _main([f"--config={ROOT / 'configs' / 'mllm4wtal.py'}",
                f"--config.data.dir={tmp_path / 'plain'}", f"--workdir={tmp_path / 'r2'}"],
               tmp_path)
  assert proc.returncode == 2 and "needs a dataset with video descriptions" in proc.stderr
  assert "Traceback" not in proc.stderr
