"""Post-processing: threshold grouping, OIC, seconds conversion, presets, the whole pipeline.

NMS itself (`wstal_jax.nms`) is tested in test_nms.py.
"""
import numpy as np
import pytest

from wstal_jax import postprocess as pp
from wstal_jax.errors import WstalError


def config(**kw):
  """A plain config: cas thresholded at 0.5, no upsampling, no NMS, OIC lambda .25 gamma 0."""
  cfg = pp.get_preset("vlpo")
  cfg.action_thresholds = (0.5,)
  cfg.upsample = 1
  cfg.oic_gamma = 0.0
  cfg.nms.method = "none"
  cfg.filter_ambiguous = False
  for k, v in kw.items():
    if k.startswith("nms_"):
      cfg.nms[k[4:]] = v
    else:
      cfg[k] = v
  return cfg


# ------------------------------------------------------------------------- building blocks


def test_find_regions_groups_consecutive_snippets():
  mask = np.array([[0, 1, 1, 0, 1, 0, 0, 1],
                   [1, 1, 1, 1, 1, 1, 1, 1],
                   [0, 0, 0, 0, 0, 0, 0, 0]], bool)
  row, s, e = pp.find_regions(mask)
  np.testing.assert_array_equal(row, [0, 0, 0, 1])
  np.testing.assert_array_equal(s, [1, 4, 7, 0])
  np.testing.assert_array_equal(e, [2, 4, 7, 7])


def test_oic_hand_computed():
  seq = np.array([0.1, 0.2, 0.9, 0.8, 0.7, 0.6, 0.3, 0.0])[:, None]
  # [2, 5]: L=4, one outer snippet each side (1 and 6): 0.75 - (0.2 + 0.3) / 2 = 0.5
  # [0, 1]: L=2, floor(0.5)=0 outer snippets on the right, none on the left: outer = 0
  # [0, 3]: L=4, outer = snippet 4 only: mean(.1,.2,.9,.8) - .7 = 0.5 - 0.7
  # [6, 7]: L=2, left floor(6 - .5) = 5 -> snippet 5; right clipped: .15 - .6
  got = pp.oic_scores(seq, [0, 0, 0, 0], [2, 0, 0, 6], [5, 1, 3, 7], 0.25)
  np.testing.assert_allclose(got, [0.5, 0.15, -0.2, 0.15 - 0.6], atol=1e-12)


def _reference_oic(seq, s, e, lam):
  """Loop transcription of the reference codes' outer-inner contrast."""
  idx = list(range(s, e + 1))
  inner = np.mean(seq[idx])
  length = len(idx)
  outer_s = max(0, int(s - lam * length))
  outer_e = min(len(seq) - 1, int(e + lam * length))
  outer = list(range(outer_s, s)) + list(range(e + 1, outer_e + 1))
  return inner - (np.mean(seq[outer]) if outer else 0.0)


def test_oic_matches_reference_loop_on_random_regions():
  rng = np.random.default_rng(0)
  seq = rng.random((200, 3))
  s = rng.integers(0, 200, 300)
  e = np.minimum(199, s + rng.integers(0, 40, 300))
  col = rng.integers(0, 3, 300)
  for lam in (0.25, 0.5, 1.0):
    got = pp.oic_scores(seq, col, s, e, lam)
    ref = [_reference_oic(seq[:, c], a, b, lam) for c, a, b in zip(col, s, e)]
    np.testing.assert_allclose(got, ref, atol=1e-12)


def test_upsample_linear_interpolates_and_extrapolates():
  x = np.array([0.0, 1.0, 3.0])
  np.testing.assert_allclose(pp.upsample_linear(x, 2), [0, 0.5, 1, 2, 3, 4])
  y = pp.upsample_linear(np.c_[x, -x], 4)
  assert y.shape == (12, 2)
  np.testing.assert_allclose(y[:9, 0], np.interp(np.arange(9) / 4, [0, 1, 2], x))
  np.testing.assert_allclose(y[:, 1], -y[:, 0])
  np.testing.assert_allclose(pp.upsample_linear([2.0], 3), [2.0, 2.0, 2.0])


def test_seconds_conversion():
  assert pp.SECONDS_PER_SNIPPET == 0.64
  s, e = pp.snippets_to_seconds([2, 0], [5, 0], 0.64)
  np.testing.assert_allclose(s, [1.28, 0.0])
  np.testing.assert_allclose(e, [3.84, 0.64])
  # x24 upsampled indices 48..71 are snippets 2..2.96: [1.28, 72/24 * .64 = 1.92]
  s, e = pp.snippets_to_seconds([48], [71], 0.64, upsample=24)
  np.testing.assert_allclose([s[0], e[0]], [1.28, 1.92])
  s, e = pp.snippets_to_seconds([9], [10], 0.64, duration=6.5)
  np.testing.assert_allclose([s[0], e[0]], [5.76, 6.5])
  # a video of 1000 snippets resampled to 750: each sampled snippet is 0.64 * 4/3 s
  sps = pp.seconds_per_sampled_snippet(0.64, 1000, 750)
  assert sps == pytest.approx(0.64 * 1000 / 750)
  np.testing.assert_array_equal(pp.seconds_to_snippet([0.0, 0.63, 0.64, 10.0], 0.64),
                                [0, 0, 1, 15])


def test_select_classes_threshold_and_argmax_fallback():
  np.testing.assert_array_equal(pp.select_classes([0.1, 0.2, 0.5, 0.19], 0.2), [1, 2])
  np.testing.assert_array_equal(pp.select_classes([0.1, 0.15, 0.05], 0.2), [1])


# ------------------------------------------------------------------------------ filtering


def test_remove_ambiguous():
  props = pp.Proposals(np.array([0, 1, 2]), np.array([0.9, 0.8, 0.7]),
                       np.array([0.0, 5.0, 10.0]), np.array([5.0, 10.0, 15.0]))
  out = pp.remove_ambiguous(props, [[10.0, 12.0]])  # touching at 10.0 is no overlap
  np.testing.assert_array_equal(out.label, [0, 1])
  assert len(pp.remove_ambiguous(props, np.zeros((0, 2)))) == 3


# --------------------------------------------------------------------------- full pipeline


def test_video_proposals_threshold_grouping_and_oic():
  cas = np.zeros((10, 2))
  cas[2:5, 0] = [0.6, 0.9, 0.6]
  cas[7:9, 1] = 0.8
  vs = np.array([0.9, 0.3])
  out = pp.video_proposals(vs, cas, None, seconds_per_snippet=0.64, duration=6.4,
                           config=config())
  np.testing.assert_array_equal(out.label, [0, 1])
  np.testing.assert_allclose(out.start, [2 * 0.64, 7 * 0.64])
  np.testing.assert_allclose(out.end, [5 * 0.64, 9 * 0.64])
  # OIC: [2,4] L=3: outer [floor(2 - .75), 2) = snippet 1 (0), nothing right (floor(4.75) = 4):
  # .7 - 0. [7,8] L=2: outer snippet 6 (0), nothing right: .8 - 0
  np.testing.assert_allclose(out.score, [0.7, 0.8])
  out = pp.video_proposals(vs, cas, None, seconds_per_snippet=0.64, duration=6.4,
                           config=config(oic_gamma=0.2, oic_lambda=1.0))
  # lambda 1: [2,4] outer snippets 0,1 and 5,6,7 (all 0): .7 - 0 + .2 * .9;
  # [7,8] outer 5,6 and 9 (all 0): .8 - 0 + .2 * .3
  np.testing.assert_allclose(out.score, [0.7 + 0.18, 0.8 + 0.06])


def test_video_proposals_multiple_thresholds_and_actionness():
  act = np.array([0.0, 0.4, 0.8, 0.8, 0.4, 0.0])
  cas = np.tile(act[:, None], (1, 3)) * [1.0, 0.5, 0.1]
  vs = np.array([0.6, 0.5, 0.1])
  cfg = config(threshold_sequence="actionness", action_thresholds=(0.3, 0.5),
               threshold_strict=True)
  out = pp.video_proposals(vs, cas, act, seconds_per_snippet=1.0, duration=None, config=cfg)
  # regions: t=.3 -> [1, 4]; t=.5 -> [2, 3]; for both kept classes 0 and 1
  np.testing.assert_array_equal(out.label, [0, 0, 1, 1])
  np.testing.assert_allclose(out.start, [1, 2, 1, 2])
  np.testing.assert_allclose(out.end, [5, 4, 5, 4])
  # strict: a threshold equal to the value does not keep it
  cfg.action_thresholds = (0.8,)
  out = pp.video_proposals(vs, cas, act, seconds_per_snippet=1.0, duration=None, config=cfg)
  assert len(out) == 0
  cfg.threshold_strict = False
  out = pp.video_proposals(vs, cas, act, seconds_per_snippet=1.0, duration=None, config=cfg)
  np.testing.assert_allclose(out.start, [2, 2])
  with pytest.raises(WstalError, match="actionness"):
    pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=None, config=cfg)


def test_video_proposals_upsampling_refines_boundaries():
  cas = np.zeros((6, 1))
  cas[2:4, 0] = 1.0
  out = pp.video_proposals(np.array([1.0]), cas, None, seconds_per_snippet=0.64, duration=None,
                           config=config(upsample=4))
  # upsampled, >= .5 holds from 1.5 to 3.5 snippets: indices 6..14 -> [6/4, 15/4] snippets
  np.testing.assert_allclose([out.start[0], out.end[0]], [1.5 * 0.64, 3.75 * 0.64])


def test_video_proposals_min_length_clip_and_ambiguous():
  cas = np.zeros((10, 1))
  cas[1, 0] = 1.0
  cas[4:10, 0] = 1.0
  vs = np.array([1.0])
  out = pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=8.5,
                           config=config())
  np.testing.assert_allclose(out.end, [2.0, 8.5])  # clipped to the duration
  out = pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=8.5,
                           config=config(min_length_s=2.0))
  np.testing.assert_allclose(out.start, [4.0])
  cfg = config(filter_ambiguous=True)
  out = pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=None, config=cfg,
                           ambiguous=np.array([[1.5, 1.8]]))
  np.testing.assert_allclose(out.start, [4.0])


def test_presets():
  vlpo = pp.get_preset("vlpo")
  assert vlpo.threshold_sequence == "cas" and vlpo.upsample == 24
  assert vlpo.class_threshold == 0.2 and (vlpo.oic_lambda, vlpo.oic_gamma) == (0.25, 0.2)
  np.testing.assert_allclose(vlpo.action_thresholds, np.arange(0.1, 1.0, 0.1))
  assert vlpo.nms.method == "append_decayed"
  co2 = pp.get_preset("co2net")
  assert co2.threshold_sequence == "actionness" and co2.upsample == 1
  np.testing.assert_allclose(co2.action_thresholds, np.linspace(0.1, 0.9, 10))
  assert (co2.oic_lambda, co2.oic_gamma, co2.nms.method, co2.nms.sigma) == (0.25, 0.2, "soft",
                                                                            0.3)
  assert not vlpo.cas_source.enabled and not co2.cas_source.enabled
  ju = pp.get_preset("ju2023")   # Ju et al. Sec. 3.4 / 4.1
  assert (ju.class_threshold, tuple(ju.action_thresholds), ju.score_mode) == (0.85, (0.45,),
                                                                              "max_video")
  assert ju.threshold_sequence == "cas" and ju.nms.method == "soft"
  assert pp.get_preset("co2net").score_mode == "oic"
  pv = pp.get_preset("pvlr")   # PVLR's released evaluation
  assert pv.cas_source.enabled and pv.threshold_sequence == "actionness"
  np.testing.assert_allclose(pv.action_thresholds, np.linspace(0.1, 0.95, 10))
  np.testing.assert_allclose(pv.cas_source.action_thresholds, np.linspace(0.1, 0.95, 10))
  assert (pv.oic_lambda, pv.oic_gamma, pv.nms.sigma) == (0.1, 0.05, 0.2)
  assert (pv.cas_source.oic_lambda, pv.cas_source.oic_gamma) == (0.1, 0.5)
  with pytest.raises(WstalError, match="preset"):
    pp.get_preset("nope")
  bad = pp.get_preset("co2net")
  bad.nms.method = "greedy"
  with pytest.raises(WstalError, match="nms.method"):
    pp.video_proposals(np.ones(1), np.ones((3, 1)), np.ones(3), seconds_per_snippet=0.64,
                       duration=None, config=bad)


@pytest.mark.parametrize("preset", ["vlpo", "co2net"])
def test_presets_end_to_end_on_a_long_video(preset):
  rng = np.random.default_rng(0)
  t, c = 750, 20
  cas = 0.1 * rng.random((t, c))
  act = 0.1 * rng.random(t)
  for s, e, h in ((50, 90, 0.8), (300, 340, 0.8), (600, 610, 0.4)):
    cas[s:e, 4] += h
    act[s:e] += h
  vs = np.full(c, 0.01)
  vs[4] = 0.95
  sps = pp.seconds_per_sampled_snippet(0.64, 1500, t)
  out = pp.video_proposals(vs, cas, act, seconds_per_snippet=sps, duration=1500 * 0.64,
                           config=pp.get_preset(preset), ambiguous=np.array([[600 * sps,
                                                                               601 * sps]]))
  assert len(out) > 0 and set(out.label.tolist()) == {4}
  assert np.all(out.end > out.start) and np.all(np.isfinite(out.score))
  best = np.argsort(-out.score)[:2]
  np.testing.assert_allclose(sorted(out.start[best]), [50 * sps, 300 * sps], atol=sps)


# ------------------------------------------- fast paths vs straightforward loops (exactness)
#
# Written here from the reference codes' algorithms, not from wstal_jax: runs found by walking
# the mask, OIC from running sums accumulated one snippet at a time (in the order np.cumsum
# adds, so equal sums stay equal), CO2-Net's soft-NMS with its row swap, ASL's NMS, and the
# ambiguous filter as a double loop. The fast paths must give the same proposals in the same
# order: labels, starts and ends exactly, scores to 1e-12 (they are in fact bit-identical).


def _loop_iou(s0, e0, s, e, offset):
  inter = max(0.0, min(e0, e) - max(s0, s) + offset)
  union = (e0 - s0 + offset) + (e - s + offset) - inter
  return inter / union


def _loop_soft_nms(rows, sigma, offset):
  """CO2-Net soft_nms on [[index, score, start, end], ...] -> rows in output order."""
  rows = [list(r) for r in rows]
  out = []
  while rows:
    best = int(np.argmax([r[1] for r in rows]))   # first maximum (NaN first, as numpy)
    rows[0], rows[best] = rows[best], rows[0]
    top = rows.pop(0)
    out.append(top)
    for r in rows:
      iou = _loop_iou(top[2], top[3], r[2], r[3], offset)
      r[1] = r[1] * np.exp(-(iou * iou) / sigma)
  return out


def _loop_hard_nms(rows, iou_threshold, sigma, offset, append):
  """ASL's NMS (append_decayed) or plain greedy NMS on [[index, score, start, end], ...]."""
  scores = np.array([r[1] for r in rows], np.float64)
  order = list(scores.argsort()[::-1])      # the codes' own order, ties included
  keep, dropped = [], []
  while order:
    i = order.pop(0)
    keep.append(rows[i])
    rest = []
    for j in order:
      iou = _loop_iou(rows[i][2], rows[i][3], rows[j][2], rows[j][3], offset)
      if iou >= iou_threshold:
        if append:
          dropped.append([rows[j][0], rows[j][1] * np.exp(-np.square(iou) / sigma),
                          rows[j][2], rows[j][3]])
      else:
        rest.append(j)
    order = rest
  return keep + dropped


def _loop_nms(rows, cfg):
  method = cfg.nms.method
  if method == "none":
    return rows
  if method == "soft":
    return _loop_soft_nms(rows, cfg.nms.sigma, cfg.nms.length_offset_s)
  return _loop_hard_nms(rows, cfg.nms.iou_threshold, cfg.nms.sigma, cfg.nms.length_offset_s,
                        method == "append_decayed")


def _loop_runs(values, threshold, strict):
  runs, start = [], None
  for i, x in enumerate(list(values) + [-np.inf]):
    above = x > threshold if strict else x >= threshold
    if above and start is None:
      start = i
    elif not above and start is not None:
      runs.append((start, i - 1))
      start = None
  return runs


def _loop_upsample(x, factor):
  t = len(x)
  if factor == 1:
    return [float(v) for v in x]
  if t == 1:
    return [float(x[0])] * factor
  out = []
  for j in range(t * factor):
    pos = j / factor
    lo = min(int(np.floor(pos)), t - 2)
    w = pos - lo
    out.append(x[lo] * (1.0 - w) + x[lo + 1] * w)
  return out


def _loop_oic(seq, s, e, lam):
  csum = [0.0]
  for x in seq:
    csum.append(csum[-1] + x)
  length = e - s + 1
  inner = (csum[e + 1] - csum[s]) / length
  outer_s = max(0, int(np.floor(s - lam * length)))
  outer_e = min(len(seq) - 1, int(np.floor(e + lam * length)))
  n_out = (s - outer_s) + (outer_e - e)
  sum_out = (csum[s] - csum[outer_s]) + (csum[outer_e + 1] - csum[e + 1])
  return inner - (sum_out / n_out if n_out > 0 else 0.0)


def _loop_video_proposals(vs, cas, act, sps, duration, cfg, ambiguous):
  """The pipeline of the module docstring, one class, threshold and region at a time."""
  kept = [c for c in range(len(vs)) if vs[c] >= cfg.class_threshold] or [int(np.argmax(vs))]
  u = int(cfg.upsample)
  out = []
  for c in kept:
    seq_oic = _loop_upsample(cas[:, c].astype(np.float64), u)
    seq = seq_oic if cfg.threshold_sequence == "cas" else _loop_upsample(
        act.astype(np.float64), u)
    rows = []

    def add_regions(thresholds, strict, seq_thr, seq_score, lam, gamma):
      for thr in thresholds:
        for s, e in _loop_runs(seq_thr, thr, strict):
          mode = cfg.get("score_mode", "oic")
          if mode in ("max", "max_video"):
            score = max(float(x) for x in seq_score[s:e + 1])
            if mode == "max_video":
              score *= float(vs[c])
          else:
            score = _loop_oic(seq_score, s, e, lam) + gamma * float(vs[c])
          step = float(sps) / float(u)
          start, end = s * step, (e + 1.0) * step
          if duration is not None and duration > 0:
            start, end = min(max(start, 0.0), duration), min(max(end, 0.0), duration)
          if end - start > 0 and (cfg.min_length_s <= 0 or end - start >= cfg.min_length_s):
            rows.append([len(rows), score, start, end])
    src = cfg.get("cas_source")
    if src is not None and src.enabled:   # PVLR's release: the normalised column first
      col = [float(x) for x in cas[:, c]]
      lo, hi = min(col), max(col)
      norm = _loop_upsample([(x - lo) / (hi - lo) if hi > lo else 0.0 for x in col], u)
      add_regions(src.action_thresholds, src.threshold_strict, norm, norm, src.oic_lambda,
                  src.oic_gamma)
    add_regions(cfg.action_thresholds, cfg.threshold_strict, seq, seq_oic, cfg.oic_lambda,
                cfg.oic_gamma)
    out += [(c, r[1], r[2], r[3]) for r in _loop_nms(rows, cfg)]
  if cfg.filter_ambiguous and ambiguous is not None:
    out = [r for r in out
           if not any(min(r[3], b) - max(r[2], a) > 0 for a, b in np.reshape(ambiguous, (-1, 2)))]
  return out


def _random_video(rng, num_classes, max_t, quantize):
  """Scores with runs above the thresholds; `quantize` rounds them to multiples of 1/8, which
  makes many proposals tie exactly (equal OIC scores, equal tIoU)."""
  t = int(rng.integers(1, max_t + 1))
  cas = 0.1 * rng.random((t, num_classes))
  act = 0.1 * rng.random(t)
  for _ in range(int(rng.integers(0, 6))):
    s = int(rng.integers(0, t))
    e = min(t, s + int(rng.integers(1, 40)))
    c = int(rng.integers(num_classes))
    h = rng.uniform(0.3, 1.0)
    cas[s:e, c] += h * (1 - 0.5 * rng.random(e - s))
    act[s:e] += h * (1 - 0.5 * rng.random(e - s))
  vs = rng.dirichlet(np.ones(num_classes) * 0.3)
  if quantize:
    cas, act, vs = (np.round(x * 8) / 8 for x in (cas, act, vs))
  sps = 0.64 * float(rng.choice([1.0, 1.5]))
  duration = None if rng.random() < 0.2 else t * sps * float(rng.uniform(0.8, 1.0))
  amb = rng.uniform(0, t * sps, (int(rng.integers(0, 3)), 1)) + [0.0, 1.0]
  return vs, cas, act, sps, duration, amb


def _assert_same_rows(got, want_rows, what):
  want_rows = list(want_rows)
  assert len(got) == len(want_rows), what
  if not want_rows:
    return
  want = np.array(want_rows, np.float64)
  np.testing.assert_array_equal(got.label, want[:, 0].astype(np.int64), err_msg=what)
  np.testing.assert_array_equal(got.start, want[:, 2], err_msg=what)
  np.testing.assert_array_equal(got.end, want[:, 3], err_msg=what)
  np.testing.assert_allclose(got.score, want[:, 1], rtol=1e-12, atol=0, err_msg=what)


@pytest.mark.parametrize("preset,quantize,method", [
    ("co2net", False, None), ("co2net", True, None), ("vlpo", False, None),
    ("vlpo", True, None), ("co2net", True, "hard"), ("pvlr", False, None),
    ("pvlr", True, None), ("ju2023", False, None), ("ju2023", True, None),
    ("ju2023", True, "max")])
def test_pipeline_matches_straightforward_loops_on_many_videos(preset, quantize, method):
  rng = np.random.default_rng(7 + quantize)
  cfg = pp.get_preset(preset)
  if method == "max":   # the plain maximum (score_mode 'max')
    cfg.score_mode, method = "max", None
  if method is not None:
    cfg.nms.method = method
  if preset == "ju2023":   # its 'max' scores on the coverage below (one theta_loc = 0.45 and
    cfg.action_thresholds = tuple(np.linspace(0.1, 0.9, 10).tolist())   # theta_cls 0.85
    cfg.class_threshold = 0.2                                            # make few groups)
  max_t = 60 if preset == "vlpo" else 300   # vlpo upsamples x24
  videos = [_random_video(rng, 5, max_t, quantize) for _ in range(40)]
  flat = np.full((30, 5), 0.05)
  vs_two = np.array([0.5, 0.0, 0.3, 0.1, 0.1])
  one_peak = flat.copy()
  one_peak[10, 0] = 0.15             # above the lowest threshold only: a single region
  videos += [(vs_two, flat, flat[:, 0], 0.64, 19.2, np.zeros((0, 2))),   # no proposals
             (vs_two, one_peak, one_peak[:, 0], 0.64, None, np.zeros((0, 2)))]
  vs, cas, act, sps, dur, amb = (list(x) for x in zip(*videos))
  batched = pp.proposals_for_videos(vs, cas, act, seconds_per_snippet=sps, durations=dur,
                                    config=cfg, ambiguous=amb)
  assert len(batched) == len(videos)
  sizes = []
  for i, video in enumerate(videos):
    want = _loop_video_proposals(*video[:5], cfg, video[5])
    _assert_same_rows(batched[i], want, f"{preset} video {i} (batched)")
    one = pp.video_proposals(vs[i], cas[i], act[i], seconds_per_snippet=sps[i],
                             duration=dur[i], config=cfg, ambiguous=amb[i])
    _assert_same_rows(one, want, f"{preset} video {i} (one video)")
    kept = pp.select_classes(vs[i], cfg.class_threshold)
    sizes += [int(np.sum(batched[i].label == c)) for c in kept]
  # The data covers videos and kept classes without proposals, single-proposal classes, large
  # groups, several classes per video and (quantized) ties.
  assert 0 in sizes and 1 in sizes and max(sizes) > 15 and len(batched[-2]) == 0
  assert max(len(np.unique(p.label)) for p in batched) > 1
  if quantize:
    scores = np.concatenate([p.score for p in batched])
    assert len(np.unique(scores)) < 0.8 * len(scores)


def test_proposals_for_videos_arguments():
  cfg = pp.get_preset("co2net")
  assert pp.proposals_for_videos([], [], None, seconds_per_snippet=0.64, durations=None,
                                 config=cfg) == []
  rng = np.random.default_rng(0)
  vs, cas, act, sps, dur, amb = _random_video(rng, 4, 50, False)
  out = pp.proposals_for_videos([vs, vs], [cas, cas], [act, act], seconds_per_snippet=sps,
                                durations=dur, config=cfg)   # scalars apply to every video
  one = pp.video_proposals(vs, cas, act, seconds_per_snippet=sps, duration=dur, config=cfg)
  for got in out:
    _assert_same_rows(got, zip(one.label, one.score, one.start, one.end), "scalar args")
  with pytest.raises(ValueError, match="durations"):
    pp.proposals_for_videos([vs, vs], [cas, cas], [act, act], seconds_per_snippet=sps,
                            durations=[dur], config=cfg)
  with pytest.raises(WstalError, match="actionness"):
    pp.proposals_for_videos([vs], [cas], None, seconds_per_snippet=sps, durations=dur,
                            config=cfg)


def test_pipeline_nms_input_rules():
  rng = np.random.default_rng(1)
  vs, cas, act, sps, dur, _ = _random_video(rng, 4, 80, False)
  cfg = pp.get_preset("co2net")
  bad_cas = cas.copy()
  bad_cas[3, :] = np.nan      # inside every OIC window that reaches snippet 3
  args = (vs, cas, act)
  with pytest.raises(WstalError, match=r"video 1 \(of 2\) has non-finite proposal scores"):
    pp.proposals_for_videos([vs, vs], [cas, bad_cas], [act, act], seconds_per_snippet=sps,
                            durations=dur, config=cfg)
  for field, value in (("length_offset_s", -0.64), ("length_offset_s", np.nan)):
    cfg = pp.get_preset("co2net")
    cfg.nms[field] = value
    with pytest.raises(WstalError, match="nms.length_offset_s"):
      pp.video_proposals(*args, seconds_per_snippet=sps, duration=dur, config=cfg)
  cfg = pp.get_preset("vlpo")
  cfg.nms.iou_threshold = np.nan
  with pytest.raises(WstalError, match="nms.iou_threshold"):
    pp.video_proposals(*args, seconds_per_snippet=sps, duration=dur, config=cfg)
  # iou_threshold <= 0 is allowed: each class's top proposal suppresses all the others.
  cfg = pp.get_preset("co2net")
  cfg.nms.method, cfg.nms.iou_threshold = "hard", 0.0
  out = pp.video_proposals(*args, seconds_per_snippet=sps, duration=dur, config=cfg)
  cfg.nms.method = "none"
  every = pp.video_proposals(*args, seconds_per_snippet=sps, duration=dur, config=cfg)
  assert len(every) > len(out) > 0
  np.testing.assert_array_equal(out.label, np.unique(every.label))
  for c in np.unique(every.label):
    assert out.score[out.label == c][0] == every.score[every.label == c].max()


# ------------------------------------------- parity with ASL's released inference (VLPO)
#
# A transcription, written for this test from the steps of ASL's released THUMOS14 inference
# (Ma et al., CVPR 2021; VLPO's baseline family; review finding 6): binarise the class score
# at class_th (argmax if none passes), upsample the kept classes' columns of the combined CAS
# by `scale` with linear inter/extrapolation, for each action threshold keep the snippets at
# or above it, group consecutive indices, score each group by inner mean - outer mean
# (outer = int(lambda * len) on each side, clipped) + gamma * the class's video score, turn
# indices into seconds with t_factor = 16 * v_len / (scale * T * 25), gather each class's
# proposals over all thresholds and apply ASL's NMS (hard NMS at 0.4 whose suppressed
# proposals come back after the kept ones with score * exp(-iou^2 / 0.35), lengths + 1).
# `select_C` picks the classes, `gamma_C` feeds the OIC term: ASL uses its MIL score for
# both; VLPO selects with p^ and (oic_score='mil') adds ASL's MIL score.


def _asl_inference(combined_TxC, select_C, gamma_C, v_len, *, class_th=0.25, scale=24,
                   lam=0.25, gamma=0.2, nms_thresh=0.4, nms_alpha=0.35):
  num_t = combined_TxC.shape[0]
  keep = (select_C >= class_th).astype(np.float64)
  if not keep.any():
    keep[np.argmax(select_C)] = 1
  pred = np.where(keep > class_th)[0]
  x = np.arange(num_t)
  xs = np.arange(0, num_t, 1 / scale)
  up = np.empty((len(xs), len(pred)))
  for j, c in enumerate(pred):   # numpy linear interpolation, extrapolated from the last two
    col = combined_TxC[:, c]
    up[:, j] = np.interp(xs, x, col)
    past = xs > num_t - 1
    up[past, j] = col[-1] + (xs[past] - (num_t - 1)) * (col[-1] - col[-2])
  t_factor = (16 * v_len) / (scale * num_t * 25)
  by_class = {}
  for thr in np.arange(0.1, 1.0, 0.1):
    for j, c in enumerate(pred):
      idx = np.where(np.where(up[:, j] < thr, 0, up[:, j]) > 0)[0]
      if not idx.size:
        continue
      for grp in np.split(idx, np.where(np.diff(idx) != 1)[0] + 1):
        inner = np.mean(up[grp, j])
        n = len(grp)
        o_s = max(0, int(grp[0] - lam * n))
        o_e = min(up.shape[0] - 1, int(grp[-1] + lam * n))
        outer_idx = list(range(o_s, grp[0])) + list(range(grp[-1] + 1, o_e + 1))
        outer = np.mean(up[outer_idx, j]) if outer_idx else 0
        by_class.setdefault(c, []).append(
            [c, inner - outer + gamma * gamma_C[c], grp[0] * t_factor, (grp[-1] + 1) * t_factor])
  out = []
  for c in sorted(by_class):
    props = np.array(by_class[c])
    order = list(props[:, 1].argsort()[::-1])
    kept, dropped = [], []
    while order:
      i = order.pop(0)
      kept.append(props[i].tolist())
      rest = []
      for k in order:
        inter = max(0.0, min(props[i, 3], props[k, 3]) - max(props[i, 2], props[k, 2]) + 1)
        iou = inter / ((props[i, 3] - props[i, 2] + 1) + (props[k, 3] - props[k, 2] + 1) - inter)
        if iou >= nms_thresh:
          dropped.append([c, props[k, 1] * np.exp(-iou ** 2 / nms_alpha), props[k, 2],
                          props[k, 3]])
        else:
          rest.append(k)
      order = rest
    out.extend(kept + dropped)
  return np.array(out).reshape(-1, 4)


@pytest.mark.parametrize("same_scores", [True, False])
def test_vlpo_preset_matches_asl_inference_on_random_scores(same_scores):
  """The 'vlpo' preset with ASL's class threshold (0.25), on identical scores, gives ASL's
  proposals: labels, order, times and scores (the OIC gamma term from `oic_scores`)."""
  rng = np.random.default_rng(7)
  cfg = pp.get_preset("vlpo")
  cfg.class_threshold = 0.25
  for v in range(12):
    num_t, num_c = int(rng.integers(8, 40)), 5
    # Smooth-ish sequences in [0, 1] (random walks), so regions span several snippets.
    walk = np.cumsum(rng.normal(0, 0.25, (num_t, num_c)), axis=0)
    combined = 1 / (1 + np.exp(-walk))
    select = rng.dirichlet(np.full(num_c, 0.3))
    gamma_c = select if same_scores else rng.dirichlet(np.full(num_c, 0.5))
    v_len = int(rng.integers(num_t // 2 + 1, 3 * num_t))
    want = _asl_inference(combined, select, gamma_c, v_len)
    got = pp.video_proposals(select, combined, None,
                             seconds_per_snippet=pp.seconds_per_sampled_snippet(0.64, v_len,
                                                                                num_t),
                             duration=None, config=cfg,
                             oic_scores_C=None if same_scores else gamma_c)
    assert len(got) == len(want) > 0, v
    np.testing.assert_array_equal(got.label, want[:, 0].astype(np.int64))
    np.testing.assert_allclose(got.start, want[:, 2], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.end, want[:, 3], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(got.score, want[:, 1], rtol=1e-9, atol=1e-12)


def test_oic_scores_replace_only_the_gamma_term():
  cas = np.zeros((10, 2))
  cas[3:6, 0] = 0.9
  vs = np.array([0.9, 0.1])
  cfg = config(oic_gamma=0.2)
  base = pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=None, config=cfg)
  other = pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=None, config=cfg,
                             oic_scores_C=np.array([0.4, 0.6]))
  np.testing.assert_array_equal(base.label, other.label)
  np.testing.assert_allclose(base.score - other.score, 0.2 * (0.9 - 0.4))
  with pytest.raises(ValueError, match="oic_scores"):
    pp.video_proposals(vs, cas, None, seconds_per_snippet=1.0, duration=None, config=cfg,
                       oic_scores_C=np.ones(3))
