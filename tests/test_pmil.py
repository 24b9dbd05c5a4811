"""Tests of P-MIL (wstal_jax/models/pmil.py, wstal_jax/methods/pmil.py): SCFE's bins against a
numpy transcription on hand-made proposals, the proposal IoU."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from wstal_jax.models import pmil as pm


def np_interpolant(feat_TxD, x):
  """The features as a function of time x (snippet i spans [i, i + 1], value at i + 0.5),
  linear between centres, falling to 0 one snippet outside [0, T]."""
  t = feat_TxD.shape[0]
  pos = np.concatenate([[-0.5], np.arange(t) + 0.5, [t + 0.5]])
  vals = np.concatenate([np.zeros((1, feat_TxD.shape[1])), feat_TxD,
                         np.zeros((1, feat_TxD.shape[1]))])
  return np.stack([np.interp(x, pos, vals[:, d], left=0.0, right=0.0)
                   for d in range(feat_TxD.shape[1])], axis=-1)


def np_bins(feat_TxD, s, e, samples=4000):
  """SCFE's 12 bins by dense midpoint sampling of the interpolant, float64."""
  length = e - s
  start, extent = s - 0.25 * length, max(1.5 * length, 1.0)
  out = []
  for p in range(12):
    lo = start + p * extent / 12
    x = lo + (np.arange(samples) + 0.5) / samples * extent / 12
    out.append(np_interpolant(feat_TxD, x).mean(0))
  return np.stack(out)


def test_scfe_bins_match_a_numpy_transcription():
  rng = np.random.default_rng(0)
  t, d = 13, 3
  feat = rng.normal(size=(2, t, d)).astype(np.float32)
  feat[1, 9:] = 0                      # video 1 has 9 valid snippets (padding is zero)
  props = np.array([[[2.0, 6.0], [0.0, 13.0], [11.5, 13.0], [4.0, 4.0], [0.3, 1.1]],
                    [[1.0, 8.0], [7.0, 9.0], [8.5, 12.0], [0.0, 0.5], [2.0, 2.0]]],
                   np.float32)
  got = np.asarray(pm.bin_features(jnp.asarray(feat), jnp.asarray(props)))
  assert got.shape == (2, 5, 12, d)
  for b in range(2):
    valid = feat[b, :9] if b == 1 else feat[b]
    for m in range(5):
      want = np_bins(valid.astype(np.float64), *props[b, m])
      np.testing.assert_allclose(got[b, m], want, rtol=1e-4, atol=1e-4)
  # A proposal past the end of the valid snippets reads zeros there; the SCFE feature is
  # [inner - left, inner, inner - right] of the region max-pools.
  feats = np.asarray(pm.scfe(jnp.asarray(feat), jnp.asarray(props)))
  bins = got
  left, inner, right = bins[:, :, :2].max(2), bins[:, :, 2:10].max(2), bins[:, :, 10:].max(2)
  np.testing.assert_allclose(feats, np.concatenate([inner - left, inner, inner - right], -1),
                             rtol=1e-6, atol=1e-6)


def test_proposal_iou_by_hand():
  a = jnp.asarray([[[0.0, 4.0], [2.0, 3.0]]])
  b = jnp.asarray([[[2.0, 6.0], [5.0, 7.0], [0.0, 4.0]]])
  got = np.asarray(pm.proposal_iou(a, b))
  np.testing.assert_allclose(got, [[[2 / 6, 0, 1], [1 / 4, 0, 1 / 4]]], rtol=1e-5)


# ------------------------------------------------------------------------------------------
# Loss and scoring terms (methods/pmil.py).

from wstal_jax.methods import pmil as P  # noqa: E402


def test_ramp_up_values():
  np.testing.assert_allclose([float(P.ramp_up(e)) for e in (1, 10, 20, 30, 45)],
                             [np.exp(-5 * (29 / 30) ** 2), np.exp(-5 * (2 / 3) ** 2),
                              np.exp(-5 * (1 / 3) ** 2), 1.0, 1.0], rtol=1e-6)


PROPS = np.array([[[0, 4], [1, 3], [5, 8], [6, 9], [10, 12], [0, 12]]], np.float32)


def test_pseudo_instances_greedy_by_hand():
  attn = jnp.asarray([[0.9, 0.95, 0.5, 0.85, 0.2, 0.99]])
  mask = jnp.asarray([[1, 1, 1, 1, 1, 0]], jnp.float32)     # the whole-video one is padding
  got = np.asarray(P.pseudo_instances(attn, jnp.asarray(PROPS), mask))
  # max 0.95 -> candidates > 0.76: 0, 1, 3; take 1 (drops 0, overlapping it), then 3.
  np.testing.assert_array_equal(got, [[False, True, False, True, False, False]])
  loss = P.completeness_loss(jnp.zeros((1, 6)), jnp.asarray(PROPS), jnp.asarray(got), mask)
  # targets: best tIoU with [1, 3] or [6, 9]: 2/4, 1, 2/4, 1, 0 (the padded row not counted)
  want = np.mean((0.5 - np.array([0.5, 1.0, 0.5, 1.0, 0.0])) ** 2)
  np.testing.assert_allclose(float(loss[0]), want, rtol=1e-5)


def np_rank_consistency(cas_s, cas_t, attn_t, props, label, mask):
  """L_IRC for one video with loops, float64."""
  valid = [i for i in range(len(mask)) if mask[i]]
  anchors = [i for i in valid if attn_t[i] > np.mean(attn_t[valid])]
  total, classes = 0.0, [c for c in range(len(label)) if label[c]]
  for c in classes:
    rows = []
    for i in anchors:
      js = [j for j in valid if min(props[i, 1], props[j, 1]) - max(props[i, 0], props[j, 0]) > 0]
      p = np.exp(cas_t[js, c] - cas_t[js, c].max()); p /= p.sum()
      q = np.exp(cas_s[js, c] - cas_s[js, c].max()); q /= q.sum()
      rows.append(np.sum(p * (np.log(p) - np.log(q))))
    total += np.mean(rows) if rows else 0.0
  return total / max(len(classes), 1)


def test_rank_consistency_matches_a_loop_and_only_the_student_learns():
  rng = np.random.default_rng(3)
  cas_s = rng.normal(size=(2, 6, 4)).astype(np.float32)
  cas_t = rng.normal(size=(2, 6, 4)).astype(np.float32)
  attn_t = rng.uniform(size=(2, 6)).astype(np.float32)
  props = np.concatenate([PROPS, PROPS[:, ::-1]], axis=0)
  label = np.array([[1, 0, 1], [0, 1, 0]], np.float32)
  mask = np.array([[1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 1, 1]], np.float32)
  got = np.asarray(P.rank_consistency(*map(jnp.asarray, (cas_s, cas_t, attn_t, props, label,
                                                         mask))))
  for b in range(2):
    np.testing.assert_allclose(got[b], np_rank_consistency(
        cas_s[b].astype(np.float64), cas_t[b].astype(np.float64), attn_t[b], props[b],
        label[b], mask[b]), rtol=1e-4, atol=1e-6)
  # Only the first `max_classes` labelled classes of a video enter.
  first = np.asarray(P.rank_consistency(*map(jnp.asarray, (cas_s, cas_t, attn_t, props, label,
                                                           mask)), max_classes=1))
  np.testing.assert_allclose(first[0], np_rank_consistency(
      cas_s[0].astype(np.float64), cas_t[0].astype(np.float64), attn_t[0], props[0],
      np.array([1, 0, 0]), mask[0]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(first[1], got[1], rtol=1e-6)
  g_s, g_t = jax.grad(lambda s, t: jnp.sum(P.rank_consistency(
      s, t, *map(jnp.asarray, (attn_t, props, label, mask)))), (0, 1))(
          jnp.asarray(cas_s), jnp.asarray(cas_t))
  assert float(jnp.abs(g_t).sum()) == 0 and float(jnp.abs(g_s).sum()) > 0
  assert float(jnp.abs(g_s[..., 3]).sum()) == 0          # the background column is not used


def test_proposal_scores_by_hand():
  rng = np.random.default_rng(5)
  outs = {m: {"cas_BxMxC1": jnp.asarray(rng.normal(size=(1, 3, 3)), jnp.float32),
              "attn_logit_BxM": jnp.asarray(rng.normal(size=(1, 3)), jnp.float32),
              "iou_logit_BxM": jnp.asarray(rng.normal(size=(1, 3)), jnp.float32)}
          for m in ("rgb", "flow")}
  mask = jnp.asarray([[1, 1, 0]], jnp.float32)
  score, video = map(np.asarray, P.proposal_scores(outs, mask, video_bonus=0.2))
  sm = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
  sig = lambda x: 1 / (1 + np.exp(-x))
  p = np.mean([sm(np.asarray(o["cas_BxMxC1"][0], np.float64)) for o in outs.values()], 0)
  a = np.mean([sig(np.asarray(o["attn_logit_BxM"][0], np.float64)) for o in outs.values()], 0)
  q = np.mean([sig(np.asarray(o["iou_logit_BxM"][0], np.float64)) for o in outs.values()], 0)
  v = (p[:2, :2] * a[:2, None]).sum(0) / (a[:2].sum() + 1e-6)
  np.testing.assert_allclose(video[0], v, rtol=1e-5)
  np.testing.assert_allclose(score[0, :2], p[:2, :2] * (a * q)[:2, None] + 0.2 * v, rtol=1e-5)
  np.testing.assert_array_equal(score[0, 2], 0)


# ------------------------------------------------------------------------------------------
# The method end to end.


def _pmil_config(data_dir, recipe="pmil", **fields):
  """configs/<recipe>.py (pmil or seal) shrunk to the tiny dataset; `fields` set in its
  block."""
  import importlib.util
  import os
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  spec = importlib.util.spec_from_file_location(f"{recipe}_recipe",
                                                os.path.join(root, "configs", f"{recipe}.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.dir = data_dir
  config.data.num_snippets = 24
  config.data.max_proposals = 4
  config.train.batch_size = 2
  config.mesh.num_devices = 1
  config.train.num_steps = 6
  config.train.log_every = 2
  config.train.eval_every = 3
  config.train.checkpoint_every = 2
  config.checkpoint.keep_latest = 20
  config.checkpoint.async_save = False
  config.eval.batch_size = 2
  config.eval.num_plots = 1
  block = config[recipe]
  block.hidden, block.head_hidden = 8, 8
  block.steps_per_epoch = 1                  # the epoch schedules move every step
  if recipe == "pmil":
    block.ramp_epochs = 4
  for k, v in fields.items():
    block[k] = v
  return config


def _dataset_with_proposals(tmp_path):
  from test_proposals import _files, _write_dataset
  from wstal_jax.data import proposals
  plain = _write_dataset(tmp_path / "plain")
  train = {f"train_{i}": [(0.64, 3.2), (1.28, 4.48), (1.92, 5.12), (5.0, 9.0), (0.0, 2.0)]
           for i in range(6)}
  out = str(tmp_path / "data")
  proposals.add_proposals(plain, out, _files(tmp_path, train=train))
  return out


def test_tiny_run_with_resume_and_padding_invariant_predict(tmp_path):
  import json
  import os
  from wstal_jax import train
  data = _dataset_with_proposals(tmp_path)
  config = _pmil_config(data)
  full = str(tmp_path / "full")
  metrics = train.train_and_evaluate(config, full)
  assert np.isfinite(metrics["average_mAP"])
  results = json.loads(open(os.path.join(full, "results.json")).read())["results"]
  assert set(results) == {"test_0", "test_1", "test_2"}
  # Detections are candidate segments (test videos' candidates: [0, 1.92] and [2.56, end]).
  starts = {round(p["segment"][0], 2) for v in results.values() for p in v}
  assert starts <= {0.0, 2.56}
  assert os.path.exists(os.path.join(full, "plots", "scores.npz"))
  check_resume_and_padding(config, full, str(tmp_path / "resumed"))


def check_resume_and_padding(config, full, resumed):
  """Resumed from the step-2 checkpoint of the run in `full`: the same metrics; `predict`:
  padded proposals and padded snippets change no valid output. -> (method, params, batch,
  predictions) of the unpadded batch."""
  import json
  import os
  import shutil
  from wstal_jax import methods, train
  shutil.copytree(full, resumed, ignore=shutil.ignore_patterns("tensorboard", "metrics.json",
                                                               "results.json", "plots"))
  ckpt_dir = os.path.join(resumed, "checkpoints")
  for name in os.listdir(ckpt_dir):
    if name.isdigit() and int(name) > 2:
      shutil.rmtree(os.path.join(ckpt_dir, name))
  assert train.train_and_evaluate(config, resumed) == json.load(
      open(os.path.join(full, "metrics.json")))

  # predict: padded proposals and padded snippets change no valid output.
  method = methods.get_method(config, 3, {"feat": 8, "train_videos": 6})
  rng = np.random.default_rng(0)
  feat = rng.normal(size=(2, 12, 8)).astype(np.float32)
  feat[1, 9:] = 0
  batch = {"feat_BxTxD": feat, "mask_BxT": (np.arange(12)[None] < [[12], [9]]).astype(
               np.float32),
           "proposals_BxMx2": np.array([[[0, 4], [2, 9], [5, 12]], [[1, 3], [0, 9], [0, 0]]],
                                       np.float32),
           "proposal_mask_BxM": np.array([[1, 1, 1], [1, 1, 0]], np.float32),
           "label_BxC": np.eye(3, dtype=np.float32)[:2]}
  params = method.init(jax.random.key(0), {k: jnp.asarray(v) for k, v in batch.items()},
                       {})["params"]
  a = method.predict(params, {k: jnp.asarray(v) for k, v in batch.items()}, {})
  big = dict(batch)
  big["feat_BxTxD"] = np.pad(feat, ((0, 0), (0, 6), (0, 0)))
  big["mask_BxT"] = np.pad(batch["mask_BxT"], ((0, 0), (0, 6)))
  big["proposals_BxMx2"] = np.pad(batch["proposals_BxMx2"], ((0, 0), (0, 3), (0, 0)),
                                  constant_values=7.0)
  big["proposal_mask_BxM"] = np.pad(batch["proposal_mask_BxM"], ((0, 0), (0, 3)))
  b = method.predict(params, {k: jnp.asarray(v) for k, v in big.items()}, {})
  np.testing.assert_allclose(b["video_scores_BxC"], a["video_scores_BxC"], rtol=1e-5)
  np.testing.assert_allclose(np.asarray(b["proposal_scores_BxMxC"])[:, :3],
                             a["proposal_scores_BxMxC"], rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(np.asarray(b["cas_BxTxC"])[:, :12], a["cas_BxTxC"], rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_array_equal(np.asarray(b["proposal_scores_BxMxC"])[:, 3:], 0)
  return method, params, batch, a


def test_pmil_config_errors():
  from wstal_jax import methods
  from wstal_jax.errors import WstalError
  config = _pmil_config("unused", branches="fused")
  with pytest.raises(WstalError, match=r"config.pmil.w_irc=2.0: rank consistency needs two"):
    methods.get_method(config, 3, {"feat": 8})
  config = _pmil_config("unused")
  config.data.proposals = False
  with pytest.raises(WstalError, match="scores candidate proposals: set config.data.proposals"):
    methods.get_method(config, 3, {"feat": 8})


def test_detections_from_candidates_by_hand():
  """postprocess.proposals_from_candidates: the kept classes' candidates with their scores,
  per-class Gaussian soft-NMS (an exact duplicate decays by exp(-1 / sigma)), the ambiguous
  filter; a video without candidates gives none."""
  from wstal_jax import postprocess
  cfg = postprocess.get_preset("pmil")
  cfg.nms.length_offset_s = 0.0
  video_scores = [np.array([0.9, 0.1, 0.3]), np.array([0.1, 0.15, 0.1]), np.array([0.5, 0, 0])]
  scores = [np.array([[0.8, 0.5, 0.2], [0.6, 0.4, 0.1], [0.6, 0.4, 0.3]]),
            np.array([[0.2, 0.3, 0.1]]), np.zeros((0, 3))]
  segments = [np.array([[0.0, 2.0], [5.0, 7.0], [0.0, 2.0]]), np.array([[1.0, 3.0]]),
              np.zeros((0, 2))]
  got = postprocess.proposals_from_candidates(video_scores, scores, segments, config=cfg,
                                              ambiguous=[np.array([[5.5, 6.0]]), None, None])
  # Video 0: classes 0 and 2 pass 0.2; the [5, 7] candidate overlaps an ambiguous segment.
  v0 = got[0]
  assert sorted(set(v0.label.tolist())) == [0, 2] and not np.any(v0.start == 5.0)
  c0 = np.sort(v0.score[v0.label == 0])[::-1]
  np.testing.assert_allclose(c0, [0.8, 0.6 * np.exp(-1 / 0.3)], rtol=1e-6)
  # Video 1: nothing passes, the argmax class (1) is kept.
  assert got[1].label.tolist() == [1] and got[1].score.tolist() == [0.3]
  assert len(got[2]) == 0
  empty = postprocess.proposals_from_candidates([np.ones(3)], [np.zeros((0, 3))],
                                                [np.zeros((0, 2))], config=cfg)
  assert len(empty) == 1 and len(empty[0]) == 0
