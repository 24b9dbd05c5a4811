"""NMS: the reference loops as the specification, and the vectorised `wstal_jax.nms` against it.

`_hard_nms_loop` and `_soft_nms_loop` are the reference codes' per-group loops (greedy hard
NMS / ASL's append_decayed, CO2-Net's Gaussian soft-NMS with its row swap), one step per
output proposal, with the one definition `wstal_jax.nms` adds: a tIoU whose union is 0 is 0.
`nms.nms_groups` must give their result bit for bit: indices, order and scores.
"""
import numpy as np
import pytest

from wstal_jax import nms
from wstal_jax.errors import WstalError

METHODS = ("soft", "hard", "append_decayed")


# ----------------------------------------------------------------------- the specification


def _iou_one(i, rest, start, end, offset):
  """tIoU of proposal i with proposals `rest`, lengths + offset (the reference "+1"); 0 where
  the union is 0 (two zero-length proposals without offset: the formula's 0/0)."""
  inter = np.maximum(0.0, np.minimum(end[i], end[rest]) - np.maximum(start[i], start[rest])
                     + offset)
  area_i = end[i] - start[i] + offset
  area_r = end[rest] - start[rest] + offset
  union = area_i + area_r - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union != 0)


def _hard_nms_loop(start, end, score, *, append, iou_threshold, sigma, offset):
  """'hard' / 'append_decayed' of one group, one step per kept proposal (the definition)."""
  order = score.argsort()[::-1]
  keep, dropped, dropped_score = [], [], []
  while order.size:
    i = order[0]
    keep.append(i)
    rest = order[1:]
    iou = _iou_one(i, rest, start, end, offset)
    gone = iou >= iou_threshold
    if append and gone.any():
      dropped.append(rest[gone])
      dropped_score.append(score[rest[gone]] * np.exp(-np.square(iou[gone]) / sigma))
    order = rest[~gone]
  index = np.array(keep, np.int64)
  new_score = score[index]
  if dropped:
    index = np.concatenate([index] + dropped)
    new_score = np.concatenate([new_score] + dropped_score)
  return index, new_score


def _soft_nms_loop(start, end, score, *, sigma, offset):
  """Gaussian soft-NMS of one group, one step per proposal (the definition, as CO2-Net)."""
  n = len(score)
  score = score.copy()
  order = np.arange(n)
  out = np.empty(n, np.int64)
  out_score = np.empty(n)
  for step in range(n):
    m = int(np.argmax(score[order]))
    i = order[m]
    order[m] = order[0]  # CO2-Net swaps the maximum to the front, then drops the front
    order = order[1:]
    out[step] = i
    out_score[step] = score[i]
    if order.size:
      iou = _iou_one(i, order, start, end, offset)
      score[order] *= np.exp(-(iou * iou) / sigma)
  return out, out_score


def _spec(start, end, score, bounds, *, method, iou_threshold=0.5, sigma=0.3,
          length_offset=0.0):
  """The specification of `nms.nms_groups`: each group by its loop, concatenated."""
  parts_index, parts_score = [np.zeros(0, np.int64)], [np.zeros(0)]
  for lo, hi in zip(bounds[:-1], bounds[1:]):
    if hi == lo:
      continue
    s, e, sc = start[lo:hi], end[lo:hi], score[lo:hi]
    if method == "none":
      idx, new = np.arange(hi - lo), sc.copy()
    elif method == "soft":
      idx, new = _soft_nms_loop(s, e, sc, sigma=sigma, offset=length_offset)
    else:
      idx, new = _hard_nms_loop(s, e, sc, append=method == "append_decayed",
                                iou_threshold=iou_threshold, sigma=sigma, offset=length_offset)
    parts_index.append(lo + idx)
    parts_score.append(new)
  return np.concatenate(parts_index), np.concatenate(parts_score)


def _assert_matches_spec(start, end, score, bounds, per_group=True, **kw):
  """nms_groups == the loops bit for bit, and (per_group) == `nms` of each group alone."""
  index, new_score = nms.nms_groups(start, end, score, bounds, **kw)
  want_index, want_score = _spec(start, end, score, bounds, **kw)
  np.testing.assert_array_equal(index, want_index, err_msg=str(kw))
  np.testing.assert_array_equal(new_score, want_score, err_msg=str(kw))
  assert index.dtype == np.int64 and new_score.dtype == np.float64
  if per_group:
    pos = 0
    for lo, hi in zip(bounds[:-1], bounds[1:]):
      one_index, one_score = nms.nms(start[lo:hi], end[lo:hi], score[lo:hi], **kw)
      m = len(one_index)
      np.testing.assert_array_equal(lo + one_index, index[pos:pos + m], err_msg=str(kw))
      np.testing.assert_array_equal(one_score, new_score[pos:pos + m], err_msg=str(kw))
      pos += m
    assert pos == len(index)
  return index, new_score


def _random_groups(rng, num_groups, quantize, zero_length=False):
  """Proposals of many groups: sizes 0, 1 and up to 150, duplicates, negative scores, and
  (zero_length) some proposals of length 0, duplicated too (pairs with union 0 at offset 0)."""
  sizes = rng.choice([0, 1, 2, 3, 8, 30, 150], num_groups)
  parts = []
  for n in sizes:
    start = np.round(rng.uniform(0, 60, n), 1)
    end = start + np.round(rng.uniform(0.1, 15, n), 1)
    if zero_length:
      zero = rng.random(n) < 0.15
      end[zero] = start[zero]
    score = rng.normal(0.3, 0.4, n)
    if quantize:
      score = np.round(score * 4) / 4
    dup = rng.random(n) < 0.2
    if n > 1 and dup.any():   # exact copies of another proposal of the group
      src = rng.integers(0, n, int(dup.sum()))
      start[dup], end[dup], score[dup] = start[src], end[src], score[src]
    parts.append((start, end, score))
  bounds = np.r_[0, np.cumsum(sizes)]
  return [np.concatenate([p[k] for p in parts]) for k in range(3)], bounds


# -------------------------------------------------------------------- hand-computed cases


def test_hard_nms():
  start = np.array([0.0, 1.0, 10.0, 0.0])
  end = np.array([10.0, 11.0, 20.0, 4.0])
  score = np.array([0.9, 0.8, 0.7, 0.95])
  idx, sc = nms.nms(start, end, score, method="hard", iou_threshold=0.5)
  # by score: 3 kept; 0 kept (IoU .4 with 3); 1 dropped (IoU 9/11 with 0); 2 kept (IoU 0)
  np.testing.assert_array_equal(idx, [3, 0, 2])
  np.testing.assert_array_equal(sc, score[[3, 0, 2]])


def test_append_decayed_nms():
  start = np.array([0.0, 1.0, 10.0])
  end = np.array([10.0, 11.0, 20.0])
  score = np.array([0.9, 0.8, 0.7])
  idx, sc = nms.nms(start, end, score, method="append_decayed", iou_threshold=0.5, sigma=0.35)
  np.testing.assert_array_equal(idx, [0, 2, 1])
  np.testing.assert_allclose(sc, [0.9, 0.7, 0.8 * np.exp(-(9 / 11) ** 2 / 0.35)])
  # the reference "+1": lengths 11, inter 10 -> IoU 10/12
  idx, sc = nms.nms(start, end, score, method="append_decayed", iou_threshold=0.5, sigma=0.35,
                    length_offset=1.0)
  np.testing.assert_allclose(sc[2], 0.8 * np.exp(-(10 / 12) ** 2 / 0.35))


def test_gaussian_soft_nms_keeps_all_and_decays():
  start = np.array([0.0, 1.0, 10.0])
  end = np.array([10.0, 11.0, 20.0])
  score = np.array([0.9, 0.8, 0.7])
  idx, sc = nms.nms(start, end, score, method="soft", sigma=0.3)
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
  idx, _ = nms.nms(start, start + 1, np.ones(4), method="soft", sigma=0.3)
  np.testing.assert_array_equal(idx, [0, 1, 2, 3])
  idx, _ = nms.nms(np.array([0.0, 10, 20, 30]), np.array([1.0, 11, 21, 31]),
                   np.array([0.5, 0.9, 0.5, 0.5]), method="soft", sigma=0.3)
  # take 1; slot of 1 gets element 0, front dropped: remaining order [0, 2, 3] -> 0, 2, 3
  np.testing.assert_array_equal(idx, [1, 0, 2, 3])
  idx, _ = nms.nms(np.array([0.0, 10, 20, 30]), np.array([1.0, 11, 21, 31]),
                   np.array([0.5, 0.5, 0.9, 0.5]), method="soft", sigma=0.3)
  # take 2; its slot gets element 0: remaining [1, 0, 3] -> ties go to 1 first
  np.testing.assert_array_equal(idx, [2, 1, 0, 3])


def test_none_keeps_the_input():
  score = np.array([0.2, 0.9, 0.5])
  idx, sc = nms.nms(np.zeros(3), np.ones(3), score, method="none")
  np.testing.assert_array_equal(idx, [0, 1, 2])
  np.testing.assert_array_equal(sc, score)
  idx, sc = nms.nms_groups(np.zeros(0), np.zeros(0), np.zeros(0), [0], method="hard")
  assert idx.shape == (0,) and sc.shape == (0,)


# ------------------------------------------------------------------ random cases vs the spec


@pytest.mark.parametrize("quantize", [False, True])
@pytest.mark.parametrize("offset", [0.0, 0.64, 1.0])
@pytest.mark.parametrize("method", METHODS)
def test_nms_groups_matches_loops(method, offset, quantize):
  rng = np.random.default_rng(3 + quantize)
  (start, end, score), bounds = _random_groups(rng, 60, quantize, zero_length=offset == 0.0)
  _assert_matches_spec(start, end, score, bounds, method=method, iou_threshold=0.4, sigma=0.3,
                       length_offset=offset)


@pytest.mark.parametrize("method", ["hard", "append_decayed"])
def test_hard_nms_thresholds(method):
  # Thresholds near the tIoU values of the data (many pairs exactly at 0.5 with quantized
  # times), and at 1: only identical proposals suppress each other.
  rng = np.random.default_rng(11)
  (start, end, score), bounds = _random_groups(rng, 40, True)
  start, end = np.round(start), np.round(end) + 1.0
  for thr in (0.5, 1.0, 1e-9):
    _assert_matches_spec(start, end, score, bounds, per_group=False, method=method,
                         iou_threshold=thr, sigma=0.35, length_offset=0.0)


def test_long_suppression_chain_settles():
  # Each proposal overlaps only its neighbours (tIoU 0.6) and scores fall along the chain:
  # 0 is kept, 1 dropped by 0, 2 kept (its only suppressor 1 is dropped), ... The status of
  # proposal k depends on all before it, so the Jacobi rounds settle one link per round: 300
  # rounds for the longest chain, far beyond the former cap of 64.
  groups = []
  for n in (300, 70, 1, 5):
    start = np.arange(n) * 0.25
    groups.append((start, start + 1.0, 1.0 - np.arange(n) / 1000))
  start, end, score = (np.concatenate([g[k] for g in groups]) for k in range(3))
  bounds = np.r_[0, np.cumsum([len(g[0]) for g in groups])]
  for method in ("hard", "append_decayed"):
    index, _ = _assert_matches_spec(start, end, score, bounds, per_group=False, method=method,
                                    iou_threshold=0.55, sigma=0.3, length_offset=0.0)
  kept, _ = nms.nms(start[:300], end[:300], score[:300], method="hard", iou_threshold=0.55)
  np.testing.assert_array_equal(kept, np.arange(0, 300, 2))


def test_pair_budget_chunks_give_the_same_result(monkeypatch):
  # A tiny budget: many chunks, and groups with more pairs than the budget run alone.
  rng = np.random.default_rng(5)
  (start, end, score), bounds = _random_groups(rng, 30, True)
  kw = [dict(method=m, iou_threshold=0.4, sigma=0.3, length_offset=o)
        for m, o in (("soft", 0.64), ("hard", 0.0), ("append_decayed", 1.0))]
  whole = [nms.nms_groups(start, end, score, bounds, **k) for k in kw]
  chunks = []
  original = nms._chunks

  def spy(*args):
    for chunk in original(*args):
      chunks.append((chunk[0], chunk[1], len(chunk[2])))
      yield chunk

  monkeypatch.setattr(nms, "_PAIR_BUDGET", 50)
  monkeypatch.setattr(nms, "_chunks", spy)
  for k, (want_index, want_score) in zip(kw, whole):
    chunks.clear()
    index, new_score = _assert_matches_spec(start, end, score, bounds, per_group=False, **k)
    np.testing.assert_array_equal(index, want_index)
    np.testing.assert_array_equal(new_score, want_score)
    assert len(chunks) > 5
    assert any(g1 == g0 + 1 and num > 50 for g0, g1, num in chunks)      # one big group alone
    assert all(num <= 50 for g0, g1, num in chunks if g1 > g0 + 1)
    assert [c[0] for c in chunks[1:]] == [c[1] for c in chunks[:-1]]    # consecutive groups
    assert chunks[0][0] == 0 and chunks[-1][1] == len(bounds) - 1


def test_many_small_groups_and_one_large():
  # Lockstep with thousands of rows of all sizes; the largest finishes alone on scalars.
  rng = np.random.default_rng(2)
  sizes = np.r_[rng.integers(0, 6, 800), 400]
  start = np.round(rng.uniform(0, 30, int(sizes.sum())), 1)
  end = start + np.round(rng.uniform(0.0, 5, len(start)), 1)
  score = np.round(rng.random(len(start)), 2)
  bounds = np.r_[0, np.cumsum(sizes)]
  for method in METHODS:
    _assert_matches_spec(start, end, score, bounds, per_group=False, method=method,
                         iou_threshold=0.4, sigma=0.3, length_offset=0.64)


# ------------------------------------------------------------------ documented definitions


def test_zero_union_has_tiou_zero():
  # Two copies of a zero-length proposal and no offset: union 0, tIoU 0 by definition (the
  # formula's 0/0). Nothing is suppressed or decayed; with an offset the union is positive.
  start = np.array([2.0, 2.0, 2.0, 5.0])
  end = np.array([2.0, 2.0, 3.0, 5.0])
  score = np.array([0.9, 0.8, 0.7, 0.6])
  for method in METHODS:
    idx, sc = nms.nms(start, end, score, method=method, iou_threshold=0.5, sigma=0.3)
    np.testing.assert_array_equal(np.sort(idx), [0, 1, 2, 3])
    np.testing.assert_array_equal(sc, score[idx])
    _assert_matches_spec(start, end, score, np.array([0, 4]), method=method,
                         iou_threshold=0.5, sigma=0.3)
  idx, _ = nms.nms(start, end, score, method="hard", iou_threshold=0.5, length_offset=1.0)
  np.testing.assert_array_equal(idx, [0, 3])   # lengths 1, 1, 2: tIoU 1 and 1/2 with 0


@pytest.mark.parametrize("thr", [0.0, -1.0])
@pytest.mark.parametrize("method", ["hard", "append_decayed"])
def test_non_positive_threshold_top_suppresses_all(method, thr):
  # Every tIoU (0 included) reaches the threshold: each group's top-ranked proposal
  # suppresses all the others, exactly as the loop does.
  rng = np.random.default_rng(8)
  (start, end, score), bounds = _random_groups(rng, 25, True, zero_length=True)
  index, new_score = _assert_matches_spec(start, end, score, bounds, method=method,
                                          iou_threshold=thr, sigma=0.3, length_offset=0.0)
  num_nonempty = int(np.sum(np.diff(bounds) > 0))
  assert len(index) == (num_nonempty if method == "hard" else len(score))
  idx, sc = nms.nms([0.0, 10.0, 1.0], [1.0, 11.0, 2.0], [0.5, 0.9, 0.7], method=method,
                    iou_threshold=thr, sigma=0.3)
  if method == "hard":
    np.testing.assert_array_equal(idx, [1])
  else:   # disjoint from the top: appended undecayed, in rank order
    np.testing.assert_array_equal(idx, [1, 2, 0])
    np.testing.assert_array_equal(sc, [0.9, 0.7, 0.5])


@pytest.mark.parametrize("what", ["start", "end", "score"])
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_inputs_are_an_error(what, bad):
  x = dict(start=np.array([0.0, 1.0, 2.0]), end=np.array([1.0, 2.0, 3.0]),
           score=np.array([0.5, 0.4, 0.3]))
  x[what][1] = bad
  for method in ("none",) + METHODS:
    with pytest.raises(ValueError, match=f"{what} has 1 non-finite value.*index 1"):
      nms.nms(x["start"], x["end"], x["score"], method=method)


def test_invalid_arguments_are_an_error():
  s, e, sc = np.array([0.0, 1.0]), np.array([1.0, 0.5]), np.array([0.5, 0.4])
  with pytest.raises(ValueError, match="1 proposal.*end before they start.*index 1"):
    nms.nms(s, e, sc, method="soft")
  e = np.array([1.0, 2.0])
  with pytest.raises(ValueError, match="length_offset"):
    nms.nms(s, e, sc, method="hard", length_offset=-0.5)
  with pytest.raises(ValueError, match="length_offset"):
    nms.nms(s, e, sc, method="soft", length_offset=np.nan)
  with pytest.raises(ValueError, match="iou_threshold is NaN"):
    nms.nms(s, e, sc, method="append_decayed", iou_threshold=np.nan)
  for sigma in (0.0, -1.0, np.nan):
    with pytest.raises(ValueError, match="sigma"):
      nms.nms(s, e, sc, method="soft", sigma=sigma)
  nms.nms(s, e, sc, method="hard", sigma=0.0)   # hard NMS does not use sigma
  with pytest.raises(WstalError, match="nms.method"):
    nms.nms(s, e, sc, method="greedy")
  with pytest.raises(ValueError, match="contiguous groups"):
    nms.nms_groups(s, e, sc, [0, 1], method="soft")
