"""Tests of SEAL's similar modality enhancement (wstal_jax/methods/seal.py): descriptors of
both aggregations on a tiny split (multi-label included), each agreement case, the SME loss
with an empty group."""
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
  err = [0.25, 0.0, 0.04, 0.5]
  got = float(S.sme_loss(pred, pseudo, jnp.asarray([1, 1, 2, 3]), valid, 0.4))
  assert got == pytest.approx((err[0] + err[1]) / 2 + 0.4 * err[2], rel=1e-6)
  # No case-1 video: a finite value from the case-2 group alone (the release: NaN).
  got = float(S.sme_loss(pred, pseudo, jnp.asarray([3, 2, 2, 3]), valid, 0.5))
  assert got == pytest.approx(0.5 * (err[1] + err[2]) / 2, rel=1e-6)
  assert float(S.sme_loss(pred, pseudo, jnp.asarray([3, 3, 3, 3]), valid, 0.5)) == 0.0
