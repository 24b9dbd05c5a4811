"""The evaluation forward pass: whole videos through `method.predict`, exact and with little
padding.

Two ways, chosen per method (`config.eval.forward`, default 'auto'):

* **buckets** (every method): each batch of whole videos is padded to a length bucket
  (`input_pipeline.eval_plan`) and `method.predict` runs on it; one compilation per bucket
  length, and the padded snippets (1.6x the real ones on the THUMOS14 test set) cost as much
  as real ones.
* **chunked** (methods whose network is local): a method declares `receptive_field` (the
  snippets on each side any per-snippet output of its network reads) and splits `predict`
  into `snippet_outputs` (the network) and `predict_from_outputs` (per-video pooling and
  scoring: O(T C), no features). The network runs on fixed rows of a snippet stream:

      stream = gap, video 1, gap, video 2, gap, ...   (gap: `halo` masked zero snippets)
      row r  = stream[r L, r L + L + 2 halo)  ->  outputs of stream[r L + halo, r L + L + halo)

  A masked zero gap of `halo` snippets is exactly the 'SAME' zero padding a video sees at its
  ends in a padded batch (every masked layer zeroes masked inputs), so each valid snippet's
  outputs equal the whole-video forward's; `tests/test_eval_forward.py` checks it against
  'buckets'. The network then compiles once ([R, L + 2 halo]) and computes almost only real
  snippets; `predict_from_outputs` runs on the bucketed batches (cheap to run and compile).
  'auto' picks chunked where the method is local and videos are whole
  (`config.eval.num_snippets` unset: resampled videos all have the same T anyway).

Every process packs its own videos; all run the same number of row batches (the plan is
known from the manifest), padded with empty rows.
"""
from __future__ import annotations

import math

import jax
from jax.experimental import multihost_utils
import numpy as np

from wstal_jax.errors import WstalError

FORWARDS = ("auto", "buckets", "chunked")
FEATURE_KEYS = ("feat_BxTxD", "vlm_BxTxE")
# Carried from the input batch into the outputs, so every process reads the global batch's
# rows from one place.
CARRIED_KEYS = ("index_B", "mask_BxT", "scale_B", "proposals_BxMx2", "proposal_mask_BxM")


def is_local(method) -> bool:
  return getattr(method, "receptive_field", None) is not None


def resolve(config, method) -> str:
  """'buckets' or 'chunked' for config.eval.forward; WstalError for an impossible choice."""
  choice = config.eval.get("forward", "auto")
  if choice not in FORWARDS:
    raise WstalError(f"config.eval.forward must be one of {', '.join(FORWARDS)}, "
                     f"got {choice!r}")
  whole = config.eval.num_snippets is None
  if choice == "chunked" and not is_local(method):
    raise WstalError(f"config.eval.forward='chunked': {type(method).__name__}'s network is "
                     "not local (it declares no receptive_field): use 'buckets' or 'auto'")
  if choice == "chunked" and not whole:
    raise WstalError("config.eval.forward='chunked' needs whole videos "
                     "(config.eval.num_snippets unset)")
  if choice == "auto":
    return "chunked" if is_local(method) and whole else "buckets"
  return choice


def stream_rows(lengths, halo: int, row_len: int) -> int:
  """Rows of `row_len` outputs covering videos of `lengths` in one stream (at least 1)."""
  needed = sum(int(t) + halo for t in lengths)   # out index q = stream position - halo
  return max(1, math.ceil(needed / row_len))


def num_row_batches(lengths_by_process, halo: int, row_len: int, rows_per_batch: int) -> int:
  """Row batches every process runs: the most any process needs."""
  return max(math.ceil(stream_rows(v, halo, row_len) / rows_per_batch)
             for v in lengths_by_process)


def row_length(lengths_by_process, halo: int, row_len: int, rows_per_batch: int) -> int:
  """`row_len`, or for a stream shorter than one row batch the multiple of 64 that fits it
  in one (a small test set is not padded to rows_per_batch x row_len snippets)."""
  most = max(sum(int(t) + halo for t in v) for v in lengths_by_process)
  if most >= row_len * rows_per_batch:
    return row_len
  fit = -(-math.ceil(most / rows_per_batch) // 64) * 64
  return min(row_len, max(fit, 64, halo))


# Scoring lengths: one more compiled shape of the per-video scoring costs about what scoring
# this many padded snippets does (CPU, VLPO: ~0.4 s compile, ~1.5 us a snippet).
SHAPE_COST_SNIPPETS = 250_000


def scoring_lengths(lengths_J, rows: int, shape_cost: int = SHAPE_COST_SNIPPETS) -> list:
  """Padded length of each batch for the per-video scoring: a subset of the batches' own
  lengths minimising rows * sum(padded lengths) + shape_cost * (number of lengths), each
  batch padded to the smallest chosen length holding it (dynamic programming over the
  sorted distinct lengths; the largest is always chosen)."""
  values = sorted(set(int(t) for t in lengths_J))
  count = [sum(1 for t in lengths_J if t == v) for v in values]
  best = [0.0] * (len(values) + 1)   # best[i]: values[:i] covered, values[i-1] chosen
  choice = [0] * (len(values) + 1)
  for i in range(1, len(values) + 1):
    best[i] = math.inf
    for j in range(i):   # values[j:i] padded to values[i - 1]
      cost = best[j] + shape_cost + rows * values[i - 1] * sum(count[j:i])
      if cost < best[i]:
        best[i], choice[i] = cost, j
  chosen, i = [], len(values)
  while i > 0:
    chosen.append(values[i - 1])
    i = choice[i]
  chosen.sort()
  return [next(c for c in chosen if c >= int(t)) for t in lengths_J]


class SnippetStream:
  """Host-side packing of videos into overlapping rows, and unpacking of the outputs.

  add(video_id, arrays) appends a video (arrays: key -> [T, ...]) after a gap; rows_ready()
  yields the row batches now complete ({key: [R, L + 2 halo, ...], 'mask_BxT':
  [R, L + 2 halo]}); finish(num_batches) yields the rest, padded with empty rows to
  `num_batches` in all; put_outputs(out) stores a row batch's outputs (key -> [R, L + 2 halo,
  ...]) in order; video_outputs(id) returns key -> [T, ...] of a video once its rows are
  stored.

  Layout: out index q (stream position - halo) is row q // L, column halo + q % L. Each video
  is copied once, straight into the core columns of its rows (the gaps stay zero); a batch's
  halo columns are filled from the neighbouring rows' cores when it is cut.
  """

  def __init__(self, halo: int, row_len: int, rows_per_batch: int):
    if halo < 0 or row_len < 1 or rows_per_batch < 1:
      raise WstalError(f"chunked evaluation: halo {halo}, row length {row_len} and rows per "
                       f"batch {rows_per_batch} must be >= 0, >= 1, >= 1")
    if halo > row_len:
      raise WstalError(f"chunked evaluation: rows of {row_len} snippets are shorter than the "
                       f"network's receptive field ({halo} each side): raise "
                       "config.eval.chunk_snippets")
    self.halo, self.row_len, self.rows = halo, row_len, rows_per_batch
    self._specs = None          # key -> (trailing shape, dtype), from the first video
    self._pending = {}          # batch number -> {key: [R, L + 2 halo, ...]} being filled
    self._prev_tail = None      # key -> the last row's last `halo` core entries, cut batch
    self._q = 0                 # out index of the next video's first snippet
    self._batches_out = 0
    self._starts = {}           # video id -> (out index, T)
    self._out = {}              # key -> list of [R L, ...] output blocks

  def _buffers(self, k):
    if k not in self._pending:
      width = self.row_len + 2 * self.halo
      self._pending[k] = {key: np.zeros((self.rows, width) + shape, dtype)
                          for key, (shape, dtype) in self._specs.items()}
    return self._pending[k]

  def add(self, video_id, arrays: dict):
    lengths = {v.shape[0] for v in arrays.values()}
    if len(lengths) != 1:
      raise WstalError(f"chunked evaluation: video {video_id}'s arrays differ in length")
    num_t = lengths.pop()
    if self._specs is None:
      self._specs = {k: (v.shape[1:], v.dtype) for k, v in arrays.items()}
      self._specs["mask_BxT"] = ((), np.float32)
    length, h = self.row_len, self.halo
    q, end = self._q, self._q + num_t
    while q < end:   # one contiguous piece per row the video crosses
      g = q // length
      col = q - g * length
      n = min(length - col, end - q)
      bufs = self._buffers(g // self.rows)
      i = g % self.rows
      for key, value in arrays.items():
        bufs[key][i, h + col:h + col + n] = value[q - self._q:q - self._q + n]
      bufs["mask_BxT"][i, h + col:h + col + n] = 1.0
      q += n
    self._starts[video_id] = (self._q, num_t)
    self._q = end + h

  def _cut(self):
    k, h, length = self._batches_out, self.halo, self.row_len
    if self._specs is None:   # no video at all: one key, the mask
      self._specs = {"mask_BxT": ((), np.float32)}
    self._buffers(k)
    bufs = self._pending.pop(k)
    nxt = self._pending.get(k + 1)
    if h:
      for key, buf in bufs.items():
        buf[1:, :h] = buf[:-1, length:length + h]            # left halo: previous row's core
        if self._prev_tail is not None:
          buf[0, :h] = self._prev_tail[key]
        buf[:-1, length + h:] = buf[1:, h:2 * h]             # right halo: next row's core
        if nxt is not None:
          buf[-1, length + h:] = nxt[key][0, h:2 * h]
      self._prev_tail = {key: buf[-1, length:length + h].copy() for key, buf in bufs.items()}
    self._batches_out += 1
    return bufs

  def rows_ready(self):
    """Row batches complete with the videos added so far (the next batch's first `halo`
    entries written: no later video can change them)."""
    span = self.rows * self.row_len
    while self._q >= (self._batches_out + 1) * span + self.halo:
      yield self._cut()

  def finish(self, num_batches: int):
    """The remaining row batches, padded with empty rows to `num_batches` in all."""
    if self._batches_out > num_batches:
      raise WstalError(f"chunked evaluation: {self._batches_out} row batches already cut, "
                       f"more than the plan's {num_batches}")
    while self._batches_out < num_batches:
      yield self._cut()
    if self._batches_out * self.rows * self.row_len < self._q - self.halo:
      raise WstalError(f"chunked evaluation: {num_batches} row batches do not cover the "
                       f"{self._q - self.halo} snippets of the stream (a plan / data mismatch)")

  def put_outputs(self, out: dict):
    h, length = self.halo, self.row_len
    for key, value in out.items():
      value = np.asarray(value)[:, h:h + length]
      self._out.setdefault(key, []).append(value.reshape((-1,) + value.shape[2:]))

  def video_outputs(self, video_id) -> dict:
    q, num_t = self._starts[video_id]
    result = {}
    for key, blocks in self._out.items():
      if len(blocks) > 1:   # join once, then slice
        blocks[:] = [np.concatenate(blocks)]
      result[key] = blocks[0][q:q + num_t]
    return result


def empty_rows(batch: dict, rows: int, width: int) -> dict:
  """Zero row batch of the network's input: the feature keys of `batch` (an eval batch) at
  [rows, width, ...] and the mask (FLOP counts, compilation for a topology)."""
  out = {k: np.zeros((rows, width) + v.shape[2:], v.dtype) for k, v in batch.items()
         if k in FEATURE_KEYS}
  out["mask_BxT"] = np.zeros((rows, width), np.float32)
  return out


def _host_local(arr, mesh, spec):
  if jax.process_count() == 1:
    return np.asarray(arr)
  return np.asarray(multihost_utils.global_array_to_host_local_array(arr, mesh, spec))


class Forward:
  """Whole-video outputs of `method.predict` over eval batches: `__call__(params, batches)`
  yields, per input batch, predict's outputs plus CARRIED_KEYS (numpy, the whole global
  batch on every process), the same in both modes (module docstring)."""

  def __init__(self, run, mode: str, *, row_len: int = 1024, rows_per_batch: int = 8,
               stream_lengths_fn=None):
    """stream_lengths_fn() (chunked): every process's video lengths in stream order (the
    plan, so that every process runs the same row batches)."""
    self.run, self.mode = run, mode
    self.row_len, self.rows_per_batch = int(row_len), int(rows_per_batch)
    self.stream_lengths_fn = stream_lengths_fn
    self.plan = None   # chunked: (row length, row batches) of the last call
    method = run.method

    def predict(params, batch, consts):
      out = dict(method.predict(params, batch, consts))
      out.update({k: batch[k] for k in CARRIED_KEYS if k in batch})
      return out

    def from_outputs(outputs, batch, consts):
      out = dict(method.predict_from_outputs(outputs, batch, consts))
      out.update({k: batch[k] for k in CARRIED_KEYS if k in batch})
      return out

    data, rep = run.data_sharding, run.replicated
    self._predict = jax.jit(predict, in_shardings=(rep, data, rep), out_shardings=rep)
    if mode == "chunked":
      self._network = jax.jit(method.snippet_outputs, in_shardings=(rep, data, rep),
                              out_shardings=data)
      self._from_outputs = jax.jit(from_outputs, in_shardings=(data, data, rep),
                                   out_shardings=rep)

  def __call__(self, params, batches):
    if self.mode == "buckets":
      for batch in batches:
        yield jax.device_get(self._predict(params, self.run.put_batch(batch), self.run.consts))
      return
    yield from self._chunked(params, batches)

  def _run_rows(self, params, stream, row_batches):
    """Dispatches each row batch, then fetches the one before it: the host packs the next
    videos while the network runs (jax dispatch is asynchronous)."""
    for rows in row_batches:
      out = self._network(params, self.run.put_batch(rows), self.run.consts)
      self._fetch(stream)
      self._in_flight = out

  def _fetch(self, stream):
    if self._in_flight is not None:
      spec = self.run.data_sharding.spec
      stream.put_outputs({k: _host_local(v, self.run.mesh, spec)
                          for k, v in self._in_flight.items()})
      self._in_flight = None

  def _chunked(self, params, batches):
    run = self.run
    halo, rows = run.method.receptive_field, self.rows_per_batch
    lengths_P = self.stream_lengths_fn()
    row_len = row_length(lengths_P, halo, self.row_len, rows)
    self.plan = (row_len, num_row_batches(lengths_P, halo, row_len, rows))
    stream = SnippetStream(halo, row_len, rows)
    self._in_flight = None
    metas = []
    for batch in batches:
      meta = {k: v for k, v in batch.items() if k not in FEATURE_KEYS}
      metas.append(meta)
      self._feature_shapes = {k: (batch[k].shape[2:], batch[k].dtype) for k in FEATURE_KEYS
                              if k in batch}
      mask_BxT = batch["mask_BxT"]
      for b, idx in enumerate(batch["index_B"].tolist()):
        if idx < 0:
          continue
        num_t = int(round(float(mask_BxT[b].sum())))
        stream.add(idx, {k: batch[k][b, :num_t] for k in FEATURE_KEYS if k in batch})
      self._run_rows(params, stream, stream.rows_ready())
    self._run_rows(params, stream, stream.finish(self.plan[1]))
    self._fetch(stream)
    # The per-video scoring on fewer lengths than the input buckets (cheap to run, not to
    # compile; identical on every process: it depends on the plan's lengths only).
    lengths = scoring_lengths([m["mask_BxT"].shape[1] for m in metas], self.rows_per_batch)
    for meta, num_t in zip(metas, lengths):
      num_b, t_in = meta["mask_BxT"].shape
      meta = dict(meta, mask_BxT=np.pad(meta["mask_BxT"], ((0, 0), (0, num_t - t_in))))
      outputs = {}
      for b, idx in enumerate(meta["index_B"].tolist()):
        if idx < 0:
          continue
        for key, value in stream.video_outputs(idx).items():
          if key not in outputs:
            outputs[key] = np.zeros((num_b, num_t) + value.shape[1:], value.dtype)
          outputs[key][b, :value.shape[0]] = value
      if not outputs:   # a process with only dummy videos in this batch: zeros
        outputs = self._empty_outputs(params, num_b, num_t)
      yield jax.device_get(self._from_outputs(run.put_batch(outputs), run.put_batch(meta),
                                              run.consts))

  def _empty_outputs(self, params, num_b, num_t):
    shapes = jax.eval_shape(
        self.run.method.snippet_outputs, params,
        {"mask_BxT": jax.ShapeDtypeStruct((num_b, num_t), np.float32),
         **{k: jax.ShapeDtypeStruct((num_b, num_t) + shape, dtype)
            for k, (shape, dtype) in self._feature_shapes.items()}},
        self.run.consts)
    return {k: np.zeros(s.shape, s.dtype) for k, s in shapes.items()}
