"""Tests of P-MIL (wstal_jax/models/pmil.py, wstal_jax/methods/pmil.py): SCFE's bins against a
numpy transcription on hand-made proposals, the proposal IoU."""
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
