"""Non-maximum suppression of temporal proposals, many (video, class) groups at once (numpy).

`nms` runs one group (one class of one video), `nms_groups` many groups in one call; the
methods ('hard', Gaussian 'soft', ASL's 'append_decayed', 'none') are described in `nms`.
The result is defined by the reference codes' loops, one Python step per output proposal
(CO2-Net's `soft_nms`, ASL's NMS, greedy hard NMS); tests/test_nms.py holds them as the
specification, and the vectorised code here gives exactly their result: the same indices in
the same order and the same scores bit for bit, ties included. Why:

* Every tIoU and decay is the reference's elementwise formula on the same float64 operands
  in the same order, and each score is multiplied by the same decays in the same order.
* Only pairs that can overlap are looked at (`_pair_structure`: sorted by start, a proposal
  and the later-starting ones that start before its end + length_offset, plus a margin far
  above rounding error); for every other pair the formula gives tIoU 0, which suppresses
  nothing when iou_threshold > 0 and decays by exp(-0) = 1, a no-op.
* Gaussian soft-NMS is sequential within a group, but groups are independent:
  `_soft_nms_chunk` advances every group by one step per Python step, keeping the
  reference's row-swap bookkeeping (so ties go the same way), and decays only the pick's
  overlapping proposals (decay != 1). Python steps: the largest group's size, not the total.
* Hard NMS / append_decayed: in the loop's order (the same argsort call per group), a
  proposal is kept iff no kept proposal before it has tIoU >= iou_threshold with it. That
  fixed point is unique (each depends on earlier ones only), and Jacobi rounds reach it: after
  d rounds every proposal with a chain of at most d suppressors is final, so a group settles
  within its size + 1 rounds. `_settle` runs rounds until nothing changes (no cap), carrying
  on only the groups that still change. A dropped proposal is appended by its first kept
  suppressor: the loop step that removes it.
* Memory: the overlapping pairs are materialised for a chunk of consecutive groups at a time,
  at most _PAIR_BUDGET pairs per chunk (a single group above it is a chunk of its own). Groups
  are independent, so chunking does not change the result.

Inputs and definitions (where the loops' formula is undefined or the inputs make no sense):
* start, end and score must be finite and end >= start, length_offset finite and >= 0, else
  ValueError naming what is wrong (the pipeline builds finite proposals from finite model
  outputs; `postprocess` reports non-finite ones as a WstalError naming the video).
* tIoU = inter / union with lengths end - start + length_offset. A pair whose union is 0
  (both lengths + offset are 0, i.e. two zero-length proposals and no offset) has tIoU 0 by
  definition (the formula gives 0/0 = NaN there); for every other valid pair union > 0.
* 'hard' / 'append_decayed' with iou_threshold <= 0: every tIoU (0 included) reaches the
  threshold, so each group's top-ranked proposal suppresses all the others (as the loop does):
  'hard' keeps one proposal per group, 'append_decayed' appends the rest in rank order,
  decayed by their tIoU with the top one. iou_threshold NaN is a ValueError.
* 'soft' / 'append_decayed' need sigma > 0 (ValueError otherwise).
"""
import numpy as np

from wstal_jax.errors import WstalError

NMS_METHODS = ("none", "hard", "soft", "append_decayed")

_PAIR_BUDGET = 2_000_000   # overlapping pairs materialised at once (~150 bytes each)
_FEW_ROWS = 4              # soft-NMS lockstep: this many groups left run one by one on scalars
_MARGIN = 1e-9             # relative to the largest |time|


def nms_groups(start_N, end_N, score_N, bounds_G1, *, method: str, iou_threshold: float = 0.5,
               sigma: float = 0.3, length_offset: float = 0.0):
  """`nms` of G groups at once (e.g. every (video, class) of a test set) -> (index_M, score_M).

  Group g is proposals [bounds_G1[g], bounds_G1[g + 1]) of the inputs. The output lists the
  groups in order, each exactly as `nms` gives it for that group alone (indices into the whole
  inputs, the same scores bit for bit), in a fraction of the time when there are many groups.
  """
  start = np.asarray(start_N, np.float64).reshape(-1)
  end = np.asarray(end_N, np.float64).reshape(-1)
  score = np.array(score_N, np.float64).reshape(-1)
  bounds = np.asarray(bounds_G1, np.int64).reshape(-1)
  n = len(score)
  if (len(start) != n or len(end) != n or len(bounds) < 1 or bounds[0] != 0
      or bounds[-1] != n or np.any(np.diff(bounds) < 0)):
    raise ValueError(f"nms_groups: start {start.shape}, end {end.shape}, score {score.shape} "
                     f"and bounds {bounds.tolist()[:8]}... do not describe contiguous groups")
  if method not in NMS_METHODS:
    raise WstalError(f"post-processing config: nms.method {method!r} not in {NMS_METHODS}")
  offset, iou_threshold, sigma = float(length_offset), float(iou_threshold), float(sigma)
  _check_inputs(start, end, score, method=method, iou_threshold=iou_threshold, sigma=sigma,
                offset=offset)
  if method == "none" or n == 0:
    return np.arange(n), score
  if method != "soft" and not iou_threshold > 0:
    return _hard_nms_chunk(start, end, score, bounds, None, append=method == "append_decayed",
                           iou_threshold=iou_threshold, sigma=sigma, offset=offset)
  order, num_after = _pair_structure(start, end, bounds, offset)
  parts_index, parts_score = [], []
  for g0, g1, a, b in _chunks(order, num_after, bounds):
    lo, hi = bounds[g0], bounds[g1]
    sub = (start[lo:hi], end[lo:hi], score[lo:hi], bounds[g0:g1 + 1] - lo, a - lo, b - lo)
    if method == "soft":
      index, new_score = _soft_nms_chunk(*sub, sigma=sigma, offset=offset)
    else:
      index, new_score = _hard_nms_chunk(*sub[:4], (sub[4], sub[5]),
                                         append=method == "append_decayed",
                                         iou_threshold=iou_threshold, sigma=sigma,
                                         offset=offset)
    parts_index.append(lo + index)
    parts_score.append(new_score)
  if len(parts_index) == 1:
    return parts_index[0], parts_score[0]
  return np.concatenate(parts_index), np.concatenate(parts_score)


def nms(start_N, end_N, score_N, *, method: str, iou_threshold: float = 0.5,
        sigma: float = 0.3, length_offset: float = 0.0):
  """Non-maximum suppression of one class's proposals -> (index_M, score_M).

  `index_M` are positions into the inputs in output order; `score_M` the (possibly decayed)
  scores. Methods:
    'none': all, in input order, scores unchanged.
    'hard': greedy by `score.argsort()[::-1]`; drops proposals with tIoU >= iou_threshold
      with a kept one.
    'append_decayed' (ASL): as 'hard', but each suppressed proposal is appended after the kept
      ones (in suppression order) with score * exp(-iou^2 / sigma), iou with its suppressor.
    'soft' (Gaussian soft-NMS, Bodla et al. 2017, as CO2-Net): repeatedly take the current
      maximum (first on ties, with CO2-Net's swap-with-front bookkeeping) and multiply every
      remaining score by exp(-iou^2 / sigma); every proposal is kept.
  tIoU uses lengths end - start + length_offset. `nms_groups` does many classes at once.
  """
  n = len(np.asarray(score_N).reshape(-1))
  return nms_groups(start_N, end_N, score_N, [0, n], method=method,
                    iou_threshold=iou_threshold, sigma=sigma, length_offset=length_offset)


def _check_inputs(start, end, score, *, method, iou_threshold, sigma, offset):
  """ValueError for the inputs the module docstring excludes."""
  for name, x in (("start", start), ("end", end), ("score", score)):
    bad = np.flatnonzero(~np.isfinite(x))
    if bad.size:
      raise ValueError(f"nms_groups: {name} has {bad.size} non-finite value(s) (first at "
                       f"index {bad[0]}: {x[bad[0]]})")
  bad = np.flatnonzero(end < start)
  if bad.size:
    raise ValueError(f"nms_groups: {bad.size} proposal(s) end before they start (first at "
                     f"index {bad[0]}: start {start[bad[0]]}, end {end[bad[0]]})")
  if not (np.isfinite(offset) and offset >= 0):
    raise ValueError(f"nms_groups: length_offset must be finite and >= 0, got {offset}")
  if method in ("hard", "append_decayed") and np.isnan(iou_threshold):
    raise ValueError("nms_groups: iou_threshold is NaN")
  if method in ("soft", "append_decayed") and not sigma > 0:
    raise ValueError(f"nms_groups: sigma must be > 0, got {sigma}")


def _new_run(ids):
  """True where an array starts a new run of equal values."""
  out = np.ones(len(ids), bool)
  out[1:] = ids[1:] != ids[:-1]
  return out


def _pair_iou(start, end, a, b, offset):
  """tIoU of proposals a[k] and b[k] (symmetric; 0 where the union is 0).

  inter = max(0, min(ends) - max(starts) + offset), union = len_a + len_b - inter with
  len = end - start + offset: the reference codes' formula and operation order.
  """
  inter = np.maximum(0.0, np.minimum(end[a], end[b]) - np.maximum(start[a], start[b]) + offset)
  area_a = end[a] - start[a] + offset
  area_b = end[b] - start[b] + offset
  union = area_a + area_b - inter
  return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _pair_structure(start, end, bounds, offset):
  """Proposals sorted by (group, start) and how many later ones each can overlap.

  Returns (order_N, num_after_N): order_N[k] is the k-th proposal in that order (group g
  holds positions bounds[g]:bounds[g + 1]); it is paired with the next num_after_N[k] ones,
  those of its group that start at most end + offset + margin. The margin (1e-9 of the
  largest |time|) is far above the formula's rounding error, so for a pair left out the
  formula's intersection is 0.
  """
  gid = np.repeat(np.arange(len(bounds) - 1), np.diff(bounds))
  order = np.lexsort((start, gid))
  s_sorted = start[order]
  e_sorted = end[order]
  times = np.abs(np.concatenate([s_sorted, e_sorted]))
  margin = _MARGIN * max(float(times.max(initial=0.0)), abs(offset), 1.0)
  # Complex numbers sort by (real, imaginary): one search over all groups at once.
  key = gid + 1j * s_sorted
  reach = np.searchsorted(key, gid + 1j * (e_sorted + offset + margin), side="right")
  num_after = np.maximum(reach - np.arange(len(order)) - 1, 0)
  return order, num_after


def _chunks(order, num_after, bounds):
  """Consecutive groups [g0, g1) with at most _PAIR_BUDGET pairs (or one group) at a time
  -> yields (g0, g1, a_P, b_P), the chunk's pairs as proposal indices (a starts first)."""
  num_groups = len(bounds) - 1
  pairs_before = np.concatenate([[0], np.cumsum(num_after)])[bounds]   # [G + 1]
  g0 = 0
  while g0 < num_groups:
    g1 = int(np.searchsorted(pairs_before, pairs_before[g0] + _PAIR_BUDGET, side="right")) - 1
    g1 = min(max(g1, g0 + 1), num_groups)
    lo, hi = bounds[g0], bounds[g1]
    count = num_after[lo:hi]
    first = np.repeat(np.arange(lo, hi), count)
    second = first + 1 + np.arange(len(first)) - np.repeat(np.cumsum(count) - count, count)
    yield g0, g1, order[first], order[second]
    g0 = g1


def _soft_nms_chunk(start, end, score, bounds, a, b, *, sigma, offset):
  """Gaussian soft-NMS of every group, all advancing together one step at a time.

  (a, b) are the pairs that can overlap (`_chunks`). Group g is a row of slots holding the
  reference's array (slot s = row s of CO2-Net's `dets`). A step takes the first maximum of
  slots [t, n_g) of every row still running, moves the proposal in slot t into the picked slot
  (the reference's swap), drops slot t, and multiplies the scores of the pick's overlapping
  proposals by their decays. Rows are bucketed by size (power-of-two buckets, one argmax call
  each); the last _FEW_ROWS rows finish one at a time, the same step on scalars (cheaper per
  step). -> (index_N, score_N) in group order: output t of group g at bounds[g] + t.
  """
  n_all = len(score)
  out_index = np.empty(n_all, np.int64)
  out_score = np.empty(n_all)
  sizes_all = np.diff(bounds)
  groups = np.flatnonzero(sizes_all > 0)
  sizes = sizes_all[groups]
  if groups.size == 0:
    return out_index, out_score
  by_size = np.argsort(-sizes, kind="stable")
  groups, sizes = groups[by_size], sizes[by_size]
  # Picking i multiplies the scores of member[row_at[i]:row_at[i] + count[i]] by the
  # decays in the same range of `decay` (pairs whose decay is exactly 1 left out).
  iou = _pair_iou(start, end, a, b, offset)
  pair_decay = np.exp(-(iou * iou) / sigma)
  moves = pair_decay != 1.0
  source = np.concatenate([a[moves], b[moves]])
  by_source = np.argsort(source, kind="stable")
  member = np.concatenate([b[moves], a[moves]])[by_source]
  decay = np.concatenate([pair_decay[moves], pair_decay[moves]])[by_source]
  count = np.bincount(source, minlength=n_all + 1)
  row_at = np.cumsum(count) - count

  # Slots: bucket k holds rows heads[k]:tails[k], each widths[k] slots (its largest size).
  level = np.ceil(np.log2(sizes)).astype(np.int64)
  heads = np.r_[0, np.flatnonzero(np.diff(level)) + 1]
  tails = np.append(heads[1:], len(groups))
  widths = sizes[heads]
  width_of_row = np.repeat(widths, tails - heads)
  row0 = np.cumsum(width_of_row) - width_of_row      # first slot of each row
  sink = int(width_of_row.sum())                     # slot of picked / absent proposals
  pos = np.arange(sink) - np.repeat(row0, width_of_row)
  row_of_slot = np.repeat(np.arange(len(groups)), width_of_row)
  real = pos < sizes[row_of_slot]
  at = np.append(np.where(real, bounds[groups][row_of_slot] + pos, n_all), n_all)
  live = np.append(np.where(real, score[np.minimum(at[:sink], n_all - 1)], -np.inf), 0.0)
  slot = np.full(n_all + 1, sink, np.int64)
  slot[at[:sink][real]] = np.flatnonzero(real)
  out0 = bounds[groups]
  running = np.searchsorted(-sizes, -np.arange(int(sizes[0])), side="left")   # sizes > t
  views = [(live[row0[h]:row0[h] + (e - h) * w].reshape(e - h, w), int(h), int(e))
           for h, e, w in zip(heads, tails, widths)]
  t = 0
  while t < sizes[0] and running[t] > _FEW_ROWS:
    na = int(running[t])
    parts = [view[:min(na, hi) - lo, t:].argmax(axis=1) for view, lo, hi in views if na > lo]
    front = row0[:na] + t
    pick = front + (parts[0] if len(parts) == 1 else np.concatenate(parts))
    p = at[pick]
    f = at[front]
    dest = out0[:na] + t
    out_index[dest] = p
    out_score[dest] = live[pick]
    at[pick] = f
    live[pick] = live[front]
    slot[f] = pick
    slot[p] = sink
    c = count[p]
    ends = np.cumsum(c)
    total = int(ends[-1])
    if total:
      idx = np.repeat(row_at[p] - (ends - c), c) + np.arange(total)
      live[slot[member[idx]]] *= decay[idx]
    t += 1
  # The last few rows one at a time: the same step on scalars.
  for r in range(int(running[t]) if t < sizes[0] else 0):
    r0, o0, n_r = int(row0[r]), int(out0[r]), int(sizes[r])
    row = live[r0:r0 + n_r]
    for u in range(t, n_r):
      pick = r0 + u + int(row[u:].argmax())
      p, f = at[pick], at[r0 + u]
      out_index[o0 + u] = p
      out_score[o0 + u] = live[pick]
      at[pick] = f
      live[pick] = live[r0 + u]
      slot[f] = pick
      slot[p] = sink
      lo, c = row_at[p], count[p]
      if c:
        live[slot[member[lo:lo + c]]] *= decay[lo:lo + c]
  return out_index, out_score


def _settle(sup, vic, gid, num_groups):
  """Kept mask of the hard-NMS fixed point: a proposal is kept iff none of its suppressors is.

  Jacobi rounds over the (suppressor, victim) pairs until nothing changes. Groups are
  independent and each has one fixed point, so a group in which nothing changed in a round
  is settled; after rounds 4, 8, 16, ... the rounds go on with only the groups still changing
  (their proposals renumbered compactly), so each group takes part in at most twice its own
  rounds. A group settles in at most its longest suppressor chain + 1 rounds.
  """
  keep = np.ones(len(gid), bool)
  out = where = None                # once renumbered: keep[k] is out[where[k]]
  rounds = 0
  while sup.size:
    suppressed = np.zeros(len(keep), bool)
    suppressed[vic[keep[sup]]] = True
    changed = suppressed == keep      # kept and now suppressed, or the other way
    keep = ~suppressed
    rounds += 1
    if not changed.any():
      break
    if rounds >= 4 and not rounds & (rounds - 1):
      if out is None:
        out, where = keep, np.arange(len(gid))
      else:
        out[where] = keep
      moving = np.zeros(num_groups, bool)
      moving[gid[changed]] = True
      live = moving[gid[vic]]
      used, inverse = np.unique(np.concatenate([sup[live], vic[live]]), return_inverse=True)
      sup, vic = np.split(inverse, 2)
      where, gid, keep = where[used], gid[used], keep[used]
  if out is None:
    return keep
  out[where] = keep
  return out


def _hard_nms_chunk(start, end, score, bounds, pairs, *, append, iou_threshold, sigma, offset):
  """'hard' / 'append_decayed' of every group -> (index_M, score_M) in group order.

  pairs: (a_P, b_P), the pairs that can overlap (`_chunks`), or None for iou_threshold <= 0
  (then each group's top-ranked proposal is paired with every other one: it suppresses them
  all, and no other pair matters).
  """
  n = len(score)
  num_groups = len(bounds) - 1
  sizes = np.diff(bounds)
  gid = np.repeat(np.arange(num_groups), sizes)
  rank = np.zeros(n, np.int64)
  for g in np.flatnonzero(sizes):
    lo, hi = bounds[g], bounds[g + 1]
    rank[lo + score[lo:hi].argsort()[::-1]] = np.arange(hi - lo)   # the loop's order
  if pairs is None:
    top = np.flatnonzero(rank == 0)
    a = np.repeat(top, sizes[sizes > 0])
    b = np.arange(n)
    a, b = a[a != b], b[a != b]
  else:
    a, b = pairs
  iou = _pair_iou(start, end, a, b, offset)
  hit = iou >= iou_threshold
  a, b, iou = a[hit], b[hit], iou[hit]
  a_first = rank[a] < rank[b]
  sup = np.where(a_first, a, b)     # the earlier one in the loop's order suppresses
  vic = np.where(a_first, b, a)
  keep = _settle(sup, vic, gid, num_groups)

  # Output order per group: kept by rank, then dropped by (suppressor's rank, rank).
  major = rank.copy()
  minor = np.zeros(n, np.int64)
  dropped = ~keep
  new_score = score.copy()
  if append:
    live = keep[sup]
    s_sup, s_vic, s_iou = sup[live], vic[live], iou[live]
    first = np.lexsort((rank[s_sup], s_vic))
    head = first[_new_run(s_vic[first])]
    s_sup, s_vic, s_iou = s_sup[head], s_vic[head], s_iou[head]
    new_score[s_vic] = score[s_vic] * np.exp(-np.square(s_iou) / sigma)
    major[s_vic] = rank[s_sup]
    minor[s_vic] = rank[s_vic]
    index = np.arange(n)
  else:
    index = np.flatnonzero(keep)
  index = index[np.lexsort((minor[index], major[index], dropped[index], gid[index]))]
  return index, new_score[index]
