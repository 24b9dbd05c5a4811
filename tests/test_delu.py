"""Tests of DELU (wstal_jax/methods/delu.py): the evidential loss against a numpy
transcription of the released code's formula (value and gradient, only u detached), the
progressive curve by rank (both gather variants, by hand), the attention-ranked top-k, masking
of every term, the method under jit, and a 2-step command-line run."""
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax import methods
from wstal_jax.errors import WstalError
from wstal_jax.methods import co2net, delu
from test_co2net import (C, DIMS, ROOT, _main, _write_dataset, garbage_padded, key, make_batch,
                         masks)


def load_config(arg=None):
  spec = importlib.util.spec_from_file_location("delu_config_for_test",
                                                ROOT / "configs" / "delu.py")
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


# ------------------------------------------------------------------------------------------
# The video-level evidential loss.


def np_edl_log(logits, y, u_fixed=None):
  """The released `edl_loss(torch.log, ...)` for one video, in float64; u_fixed replaces u
  (the detached uncertainty) when given."""
  alpha = np.exp(np.clip(logits, -10, 10)) + 1.0
  s = alpha.sum()
  u = len(logits) / s if u_fixed is None else u_fixed
  temp = y / alpha
  g = (1.0 - u) * y.sum() * temp / temp.sum()
  return float((g * (np.log(s) - np.log(alpha))).sum())


def test_edl_log_loss_value_and_gradient_by_hand():
  rng = np.random.default_rng(0)
  logits = rng.normal(scale=2.0, size=(3, 5)).astype(np.float32)
  logits[2, 1] = 12.0                       # past the clip: no gradient there
  y = np.array([[1, 0, 0, 0, 0], [0, 1, 0, 1, 0], [0, 1, 0, 0, 0]], np.float32)
  got = delu.edl_video_loss(jnp.asarray(logits), jnp.asarray(y), "log", "exp")
  want = [np_edl_log(logits[b].astype(np.float64), y[b]) for b in range(3)]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)   # float32: log S - log alpha
  # Gradient: only u is detached (finite differences of the numpy formula with u held at
  # its value; the 1 / alpha weights inside g keep their gradient).
  grad = np.asarray(jax.grad(lambda z: jnp.sum(delu.edl_video_loss(z, jnp.asarray(y))))(
      jnp.asarray(logits)))
  for b in range(3):
    x = logits[b].astype(np.float64)
    u0 = len(x) / (np.exp(np.clip(x, -10, 10)) + 1.0).sum()
    for c in range(5):
      h = np.zeros(5)
      h[c] = 1e-5
      fd = (np_edl_log(x + h, y[b], u0) - np_edl_log(x - h, y[b], u0)) / 2e-5
      np.testing.assert_allclose(grad[b, c], fd, rtol=2e-3, atol=1e-5, err_msg=(b, c))
  assert grad[2, 1] == 0.0
  # With u not detached the gradient would differ: the test can tell.
  x = logits[0].astype(np.float64)
  fd_full = (np_edl_log(x + [1e-5, 0, 0, 0, 0], y[0]) - np_edl_log(x - [1e-5, 0, 0, 0, 0], y[0]))
  assert abs(fd_full / 2e-5 - grad[0, 0]) > 1e-3


def test_edl_mse_loss_by_hand():
  """DELU_ACT: sum_c (y_c - alpha_c / S)^2 with the raw multi-hot y, relu evidence."""
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(2, 4)).astype(np.float32)
  y = np.array([[1, 0, 0, 0], [0, 1, 1, 0]], np.float32)
  got = delu.edl_video_loss(jnp.asarray(logits), jnp.asarray(y), "mse", "relu")
  for b in range(2):
    alpha = np.maximum(logits[b], 0).astype(np.float64) + 1
    np.testing.assert_allclose(got[b], ((y[b] - alpha / alpha.sum()) ** 2).sum(), rtol=1e-5)


def test_activitynet_smoothing_is_a_centred_zero_padded_mean():
  x = np.arange(1, 8, dtype=np.float32)[None, :, None] * np.array([1, -2], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 0, 0]], np.float32)
  got = np.asarray(delu.smooth(jnp.asarray(x), jnp.asarray(mask), 3))
  want = np.array([(0 + 1 + 2) / 3, 2, 3, 4, (4 + 5 + 0) / 3, 0, 0])  # padding counts as 0
  np.testing.assert_allclose(got[0, :, 0], want, rtol=1e-6)
  np.testing.assert_allclose(got[0, :, 1], -2 * want, rtol=1e-6)


def test_attention_topk_selects_by_attention_not_by_score():
  supp = np.zeros((1, 6, C + 1), np.float32)
  supp[0, :, 0] = [9, 8, 0, 1, 2, 3]        # class 0 is high where the attention is low
  attn = np.array([[0.1, 0.2, 0.9, 0.8, 0.7, 0.6]], np.float32)
  mask = np.ones((1, 6), np.float32)
  got = delu.attention_topk_logits(jnp.asarray(supp), jnp.asarray(attn), jnp.asarray(mask),
                                   jnp.array([3]))
  np.testing.assert_allclose(got[0], [(0 + 1 + 2) / 3, 0, 0], rtol=1e-6)
  # A padded snippet with the highest attention is never selected.
  mask[0, 2] = 0
  got = delu.attention_topk_logits(jnp.asarray(supp), jnp.asarray(attn), jnp.asarray(mask),
                                   jnp.array([3]))
  np.testing.assert_allclose(got[0, 0], (1 + 2 + 3) / 3, rtol=1e-6)
  assert got.shape == (1, C)


# ------------------------------------------------------------------------------------------
# The progressive curve.


def test_curve_weights_by_rank_and_the_released_gather():
  u = np.array([[0.5, 0.1, 0.9, 0.3, 7.0, 7.0]], np.float32)   # last two padded
  mask = np.array([[1, 1, 1, 1, 0, 0]], np.float32)
  n, amp, step, num_steps = 4, 0.7, 100, 1000
  delta = 1 - 2 * step / num_steps
  curve = lambda r: 1 + amp * np.tanh((2 * (r + 0.5) / n - 1) * delta)
  rank = np.array([2, 0, 3, 1])             # ascending u: snippet 1, 3, 0, 2
  order = np.array([1, 3, 0, 2])            # argsort(u)
  got = np.asarray(delu.curve_weights(jnp.asarray(u), jnp.asarray(mask), step, num_steps, amp,
                                      "rank"))
  np.testing.assert_allclose(got[0, :4], curve(rank), rtol=1e-6)
  assert not np.any(got[0, 4:])
  np.testing.assert_allclose(got[0, :4].mean(), 1.0, rtol=1e-6)   # symmetric curve
  # Early in training the most certain snippet weighs least; after mid-training, most.
  assert got[0, 1] == got[0, :4].min() and got[0, 2] == got[0, :4].max()
  late = np.asarray(delu.curve_weights(jnp.asarray(u), jnp.asarray(mask), 900, num_steps, amp))
  assert late[0, 1] == late[0, :4].max()
  released = np.asarray(delu.curve_weights(jnp.asarray(u), jnp.asarray(mask), step, num_steps,
                                           amp, "released"))
  np.testing.assert_allclose(released[0, :4], curve(order), rtol=1e-6)
  assert not np.allclose(released[0, :4], got[0, :4])     # the two variants differ here


def test_uncertainty_guide_loss_by_hand_and_masking():
  rng = np.random.default_rng(3)
  t, n_b = 7, [7, 5]
  mask = masks(n_b, t)
  out = {k: (rng.uniform(0.05, 0.95, size=(2, t)) * mask).astype(np.float32)
         for k in ("attn_BxT", "v_attn_BxT", "f_attn_BxT")}
  cas = (rng.normal(size=(2, t, C + 1)) * mask[:, :, None]).astype(np.float32)
  supp = np.asarray(co2net.suppress(jnp.asarray(cas), jnp.asarray(out["attn_BxT"]),
                                    jnp.asarray(mask)))
  got = np.asarray(delu.uncertainty_guide_loss(
      {k: jnp.asarray(v) for k, v in out.items()}, jnp.asarray(cas), jnp.asarray(supp),
      jnp.asarray(mask), 30, 100, 0.7))
  for b, n in enumerate(n_b):
    u = C / (np.exp(np.clip(supp[b, :n].astype(np.float64), -10, 10)) + 1).sum(-1)
    rank = np.argsort(np.argsort(u, kind="stable"), kind="stable")
    w = 1 + 0.7 * np.tanh((2 * (rank + 0.5) / n - 1) * (1 - 2 * 30 / 100))
    e = np.exp(cas[b, :n] - cas[b, :n].max(-1, keepdims=True))
    bg = (e / e.sum(-1, keepdims=True))[:, -1]
    guide = sum(np.abs(1 - out[k][b, :n] - bg) for k in out) / 3
    np.testing.assert_allclose(got[b], (w * guide).mean(), rtol=1e-5)


# ------------------------------------------------------------------------------------------
# The method.


def _tiny_config(**delu_overrides):
  config = load_config()
  config.co2net.attn_hidden = 8
  config.train.num_steps = 10
  for k, v in delu_overrides.items():
    config.delu[k] = v
  return config


def test_config_presets_and_errors():
  config = load_config()
  assert config.method == "delu" and config.co2net.w_guide == 0.4
  assert (config.delu.w_edl, config.delu.edl_topk_divisor, config.delu.w_uct) == (1.3, 9, 0.4)
  assert config.eval.postprocess.action_thresholds == pytest.approx(
      tuple(np.linspace(0.1, 0.9, 20)))
  thumos = load_config("dataset=thumos14")
  assert (thumos.optim.lr, thumos.train.batch_size, thumos.data.num_snippets,
          thumos.train.num_steps) == (5e-5, 10, 320, 5000)
  anet_config = load_config("dataset=activitynet")
  anet = anet_config.delu
  assert (anet.edl_evidence, anet.edl_loss, anet.w_edl, anet.edl_topk_divisor,
          anet.smooth_kernel) == ("relu", "mse", 1.2, 5, 13)
  assert (anet_config.co2net.w_guide, anet_config.optim.weight_decay) == (0.8, 5e-4)
  assert config.co2net.eval_topk_divisor == 10
  with pytest.raises(WstalError, match="config.delu.curve_gather='inverse'"):
    methods.get_method(_tiny_config(curve_gather="inverse"), C, DIMS)
  with pytest.raises(WstalError, match="curve_amplitude"):
    methods.get_method(_tiny_config(curve_amplitude=1.0), C, DIMS)


def test_method_terms_act_and_padding_invariance():
  method = methods.get_method(_tiny_config(), C, DIMS)
  batch = {k: jnp.asarray(v) for k, v in make_batch(n_valid=[16, 12, 16, 9]).items()}
  params = method.init(key(0), batch, {})["params"]
  weights = method.loss_weights()
  assert weights["l_edl"] == 1.3 and weights["l_uct"] == 0.4 and weights["l_guide"] == 0.4

  @jax.jit
  def terms_eval(p, b, step):
    """The DELU terms on eval-mode (dropout-free) outputs."""
    out = method.model.apply({"params": p}, b, None, train=False)
    cas = out["cas_BxTxC1"]
    supp = co2net.suppress(cas, out["attn_BxT"], b["mask_BxT"])
    k = delu.topk_count(b["mask_BxT"], 9)
    edl = delu.edl_video_loss(delu.attention_topk_logits(supp, out["attn_BxT"],
                                                         b["mask_BxT"], k), b["label_BxC"])
    uct = delu.uncertainty_guide_loss(out, cas, supp, b["mask_BxT"], step, 10, 0.7)
    return edl, uct

  short = terms_eval(params, batch, 2)
  padded = terms_eval(params, {k: jnp.asarray(v) for k, v in garbage_padded(
      {k: np.asarray(v) for k, v in batch.items()}, 24).items()}, 2)
  for a, b in zip(short, padded):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
  # Each DELU term has a non-zero gradient at init, and the total is the weighted sum.
  loss_fn = jax.jit(lambda p, s: method.loss(p, batch, {}, key(1), s))
  total, terms = loss_fn(params, 2)
  np.testing.assert_allclose(total, sum(w * terms[k] for k, w in weights.items()), rtol=1e-5)
  for name in ("l_edl", "l_uct"):
    g = jax.grad(lambda p: method.loss(p, batch, {}, key(1), 2)[1][name])(params)
    assert sum(float(jnp.sum(jnp.abs(x))) for x in jax.tree.leaves(g)) > 0, name


def test_cli_two_steps_train_then_eval(tmp_path):
  data = _write_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  proc = _main([f"--config={ROOT / 'configs' / 'delu.py'}", f"--config.data.dir={data}",
                f"--workdir={workdir}", "--config.train.num_steps=2",
                "--config.train.eval_every=2", "--config.train.log_every=1",
                "--config.data.num_snippets=16", "--config.train.batch_size=4",
                "--config.eval.batch_size=4", "--config.co2net.attn_hidden=8",
                "--config.eval.num_plots=0"], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "l_edl" in proc.stderr and "l_uct" in proc.stderr     # logged with their shares
  metrics = json.loads((workdir / "metrics.json").read_text())
  assert metrics["step"] == 2 and np.isfinite(metrics["average_mAP"])
  proc = _main(["--mode=eval", f"--workdir={workdir}", "--checkpoint=latest",
                f"--eval_dir={tmp_path / 'eval'}", "--config.delu.curve_gather=released"],
               tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.loads((tmp_path / "eval" / "metrics.json").read_text())
  assert again["average_mAP"] == metrics["average_mAP"]   # a training-only field


def test_smoothed_predict_is_padding_invariant():
  method = methods.get_method(_tiny_config(smooth_kernel=3), C, DIMS)
  short = make_batch(seed=4, n_valid=[16, 12, 16, 9])
  params = method.init(key(0), {k: jnp.asarray(v) for k, v in short.items()}, {})["params"]
  predict = jax.jit(lambda p, b: method.predict(p, b, {}))
  a = predict(params, {k: jnp.asarray(v) for k, v in short.items()})
  b = predict(params, {k: jnp.asarray(v) for k, v in garbage_padded(short, 24).items()})
  valid = short["mask_BxT"] > 0
  np.testing.assert_allclose(b["video_scores_BxC"], a["video_scores_BxC"], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(b["cas_BxTxC"])[:, :16][valid],
                             np.asarray(a["cas_BxTxC"])[valid], rtol=1e-5, atol=1e-6)
  # The smoothing acts: unsmoothed scores differ.
  plain = methods.get_method(_tiny_config(), C, DIMS)
  c = jax.jit(lambda p, b: plain.predict(p, b, {}))(params, {k: jnp.asarray(v)
                                                             for k, v in short.items()})
  assert not np.allclose(np.asarray(c["cas_BxTxC"]), np.asarray(a["cas_BxTxC"]))
