"""Post-processing: threshold grouping, OIC, NMS variants, seconds conversion, presets."""
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


# ------------------------------------------------------------------------------------ NMS


def test_hard_nms():
  start = np.array([0.0, 1.0, 10.0, 0.0])
  end = np.array([10.0, 11.0, 20.0, 4.0])
  score = np.array([0.9, 0.8, 0.7, 0.95])
  idx, sc = pp.nms(start, end, score, method="hard", iou_threshold=0.5)
  # by score: 3 kept; 0 kept (IoU .4 with 3); 1 dropped (IoU 9/11 with 0); 2 kept (IoU 0)
  np.testing.assert_array_equal(idx, [3, 0, 2])
  np.testing.assert_array_equal(sc, score[[3, 0, 2]])


def test_append_decayed_nms():
  start = np.array([0.0, 1.0, 10.0])
  end = np.array([10.0, 11.0, 20.0])
  score = np.array([0.9, 0.8, 0.7])
  idx, sc = pp.nms(start, end, score, method="append_decayed", iou_threshold=0.5, sigma=0.35)
  np.testing.assert_array_equal(idx, [0, 2, 1])
  np.testing.assert_allclose(sc, [0.9, 0.7, 0.8 * np.exp(-(9 / 11) ** 2 / 0.35)])
  # the reference "+1": lengths 11, inter 10 -> IoU 10/12
  idx, sc = pp.nms(start, end, score, method="append_decayed", iou_threshold=0.5, sigma=0.35,
                   length_offset=1.0)
  np.testing.assert_allclose(sc[2], 0.8 * np.exp(-(10 / 12) ** 2 / 0.35))


def test_gaussian_soft_nms_keeps_all_and_decays():
  start = np.array([0.0, 1.0, 10.0])
  end = np.array([10.0, 11.0, 20.0])
  score = np.array([0.9, 0.8, 0.7])
  idx, sc = pp.nms(start, end, score, method="soft", sigma=0.3)
  # take 0; 1 decays by exp(-(9/11)^2/.3) = 0.1076 -> 0.0861; 2 untouched (IoU 0);
  # take 2 (0.7); then 1, decayed again by IoU(2, 1) = 1/19
  w01 = np.exp(-(9 / 11) ** 2 / 0.3)
  w21 = np.exp(-(1 / 19) ** 2 / 0.3)
  np.testing.assert_array_equal(idx, [0, 2, 1])
  np.testing.assert_allclose(sc, [0.9, 0.7, 0.8 * w01 * w21])


def test_soft_nms_ties_follow_reference_swap_order():
  # Disjoint proposals (no decay). CO2-Net takes the first maximum of its current array,
  # swaps it with the front row and drops the front; equal scores: 0, 1, 2, 3.
  start = np.arange(4) * 10.0
  idx, _ = pp.nms(start, start + 1, np.ones(4), method="soft", sigma=0.3)
  np.testing.assert_array_equal(idx, [0, 1, 2, 3])
  idx, _ = pp.nms(np.array([0.0, 10, 20, 30]), np.array([1.0, 11, 21, 31]),
                  np.array([0.5, 0.9, 0.5, 0.5]), method="soft", sigma=0.3)
  # take 1; slot of 1 gets element 0, front dropped: remaining order [0, 2, 3] -> 0, 2, 3
  np.testing.assert_array_equal(idx, [1, 0, 2, 3])
  idx, _ = pp.nms(np.array([0.0, 10, 20, 30]), np.array([1.0, 11, 21, 31]),
                  np.array([0.5, 0.5, 0.9, 0.5]), method="soft", sigma=0.3)
  # take 2; its slot gets element 0: remaining [1, 0, 3] -> ties go to 1 first
  np.testing.assert_array_equal(idx, [2, 1, 0, 3])


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
