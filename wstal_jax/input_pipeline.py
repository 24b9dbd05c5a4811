"""TFRecord shards -> per-process tf.data -> fixed-shape numpy batches with masks.

Batch keys (docs/ARCHITECTURE.md, "Batches"): feat_BxTxD, vlm_BxTxE (if a VLM feature is
asked for), mask_BxT, label_BxC, index_B, valid_B, scale_B. `batch_size` is always the
per-process batch; the global batch is batch_size * process_count.

Training (`train_batches`) is infinite and resumable: the batch for step s is a pure function of
(seed, s), the same whatever the process layout. Every process reads one global element
stream, a sequence of epochs; epoch e is a permutation of the selected videos that depends only
on (seed, e): the shard files are shuffled, read round-robin, and cut into blocks of
`shuffle_buffer` records that are each permuted with a stateless shuffle. Element k of the
stream draws its snippet sampling from a stateless RNG keyed by (seed, k). Global batch s is
elements [s G, (s + 1) G) with G = batch_size * process_count, and process p keeps rows
[p B, (p + 1) B) of it: it reads every shard's records but parses only its own rows, so 1
process x 4 devices and 2 processes x 2 devices train on identical global batches. Each process
thus reads all training records every epoch (P times the reads of disjoint shards, though none
parses another's rows): the price of results that do not depend on the layout. start_step=s
starts at epoch (s G) // N and skips the remaining (s G) % N serialized records before any
parsing.

Evaluation (`eval_batches`) yields whole videos, per process the videos of its shards, longest
first by default (`eval_plan`; order='manifest' gives increasing index), so a batch holds
videos of similar length. Batch j of every process is padded to the same length bucket, chosen
from the lengths of all processes' j-th batches (the manifest lists every video's T), and short
processes are topped up with dummy videos (index -1, valid 0, zero mask), so every process
yields the same number of identically shaped batches. The shards are read by increasing index
and reordered through a bounded buffer (one pass per window of the plan that fits it).
"""
import functools
import math
from typing import Iterator, Mapping, Sequence

import jax
import numpy as np
import tensorflow as tf

from wstal_jax.data import format as fmt
from wstal_jax.data import proposals as proposals_lib
from wstal_jax.data.proposals import FIELD as PROPOSALS
from wstal_jax.errors import WstalError

try:  # JAX owns the accelerators; TF only reads files.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass

SAMPLINGS = ("random_perturb", "uniform", "pad", "floor")
EVAL_SAMPLINGS = ("uniform", "floor")
_AUTOTUNE = tf.data.AUTOTUNE
_MAX_CYCLE = 16
EVAL_BUFFER_BYTES = 512 << 20   # eval_batches: bound on the reorder buffer of one process


# ------------------------------------------------------------------------------------ sampling


def sample_indices(num_t, length: int, sampling: str, key=None):
  """Snippet indices for resampling a video of T_v = num_t snippets to `length` (TF graph).

  Args:
    num_t: int32 scalar tensor, T_v > 0.
    length: T, the fixed number of output snippets.
    sampling: "random_perturb" (ASL / CO2-Net): the T_v snippets are split into T equal bins
      [floor(i T_v / T), floor((i + 1) T_v / T)) and one index is drawn uniformly in each;
      a bin shorter than one snippet (T_v < T) collapses to its start, so short videos repeat
      indices. "uniform": the centre of each bin, floor((2i + 1) T_v / 2T). "floor": the start
      of each bin, floor(i T_v / T) (ASL's test-time resampling). "pad": no
      resampling; the first T snippets (or, with a key, a random window of T) and zero padding
      when T_v < T.
    key: int64 [2] stateless RNG seed; needed for random_perturb and for a random pad window.

  Returns:
    idx_T int32 [T] indices into [0, T_v), mask_T float32 [T], scale float32 [] (original
    snippets per sampled snippet: T_v / T when resampled, 1 for pad).

  The CO2-Net code draws from the closed range [lo_i, lo_{i+1}], so neighbouring bins can pick
  the same snippet; we use half-open bins so indices are one per bin and non-decreasing.
  """
  num_t = tf.cast(num_t, tf.int64)
  i_T = tf.range(length, dtype=tf.int64)
  if sampling == "pad":
    if key is None:
      start = tf.constant(0, tf.int64)
    else:
      room = tf.maximum(num_t - length, 0)
      u = tf.random.stateless_uniform([], seed=key, dtype=tf.float32)
      start = tf.minimum(tf.cast(tf.floor(u * tf.cast(room + 1, tf.float32)), tf.int64), room)
    pos_T = start + i_T
    mask_T = tf.cast(pos_T < num_t, tf.float32)
    idx_T = tf.minimum(pos_T, num_t - 1)
    return tf.cast(idx_T, tf.int32), mask_T, tf.constant(1.0, tf.float32)
  lo_T = (i_T * num_t) // length
  if sampling == "uniform":
    idx_T = ((2 * i_T + 1) * num_t) // (2 * length)
  elif sampling == "floor":
    idx_T = lo_T
  elif sampling == "random_perturb":
    if key is None:
      raise ValueError("random_perturb sampling needs an RNG key")
    hi_T = tf.maximum(((i_T + 1) * num_t) // length, lo_T + 1)
    u_T = tf.random.stateless_uniform([length], seed=key, dtype=tf.float32)
    width_T = hi_T - lo_T
    off_T = tf.cast(tf.floor(u_T * tf.cast(width_T, tf.float32)), tf.int64)
    idx_T = lo_T + tf.minimum(off_T, width_T - 1)
  else:
    raise WstalError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
  scale = tf.cast(num_t, tf.float32) / float(length)
  return tf.cast(idx_T, tf.int32), tf.ones([length], tf.float32), scale


# ------------------------------------------------------------------------------------- helpers


def _layout(process_index, process_count):
  p = jax.process_index() if process_index is None else int(process_index)
  n = jax.process_count() if process_count is None else int(process_count)
  if n < 1 or not 0 <= p < n:
    raise WstalError(f"bad process layout: process_index={p}, process_count={n}")
  return p, n


def _selection(video_indices, num_videos, data_dir, split):
  """Sorted unique selected video indices (all when None) -> int64 numpy [K]."""
  if video_indices is None:
    return np.arange(num_videos, dtype=np.int64)
  sel = np.asarray(video_indices, dtype=np.int64).reshape(-1)
  if sel.size == 0:
    raise WstalError(f"{data_dir}: empty video_indices for split {split!r}")
  if sel.min() < 0 or sel.max() >= num_videos:
    raise WstalError(f"{data_dir}: video_indices must lie in [0, {num_videos}) for split "
                     f"{split!r}, got range [{sel.min()}, {sel.max()}]")
  return np.unique(sel)


def _process_videos(sel, num_shards, p, num_procs):
  """Selected videos that process p reads (video i is in shard i % n), increasing order."""
  return sel[(sel % num_shards) % num_procs == p]


def _feature_names(manifest, vlm_feature, data_dir):
  primary = manifest["primary_feature"]
  names = [primary]
  if vlm_feature is not None:
    if vlm_feature not in manifest["features"]:
      raise WstalError(f"{data_dir}: VLM feature {vlm_feature!r} is not in the dataset (has "
                       f"{sorted(manifest['features'])})")
    if vlm_feature != primary:
      names.append(vlm_feature)
  return primary, names


def _index_filter(keep_N):
  """Predicate on serialized records: keep_N[index] (parses only the index field)."""
  keep = tf.constant(keep_N)
  spec = {"index": tf.io.FixedLenFeature([], tf.int64)}

  def pred(serialized):
    index = tf.io.parse_single_example(serialized, spec)["index"]
    in_range = tf.logical_and(index >= 0, index < keep.shape[0])
    return tf.logical_and(in_range, tf.gather(keep, tf.clip_by_value(
        index, 0, keep.shape[0] - 1)))

  return pred


def _to_batch(ex, feats, primary, vlm_feature, idx_T, mask_T, scale, valid):
  mask_T1 = mask_T[:, None]
  out = {
      "feat_BxTxD": tf.gather(feats[primary], idx_T) * mask_T1,
      "mask_BxT": mask_T,
      "label_BxC": ex["label"],
      "index_B": ex["index"],
      "valid_B": tf.constant(valid, tf.float32),
      "scale_B": scale,
  }
  if vlm_feature is not None:
    out["vlm_BxTxE"] = tf.gather(feats[vlm_feature], idx_T) * mask_T1
  return out


def _proposal_batch(seg_flat, idx_T, mask_T, scale, windowed: bool, cap: int, key=None):
  """A video's stored proposals (float32 [2M] raw, original snippet units) in the batch's
  snippet coordinates: shifted by the window start (windowed: 'pad' sampling, and whole-video
  evaluation) or divided by `scale` (resampled), clipped to the valid length, those empty
  after clipping dropped. More than `cap`: a random subset of `cap` (stateless in key; in
  their stored order), or the first `cap` without a key. Padded to `cap`.
  -> proposals_BxMx2 float32 [cap, 2], proposal_mask_BxM float32 [cap]."""
  seg = tf.reshape(seg_flat, [-1, 2])
  if windowed:
    seg = seg - tf.cast(idx_T[0], tf.float32)
  else:
    seg = seg / scale
  seg = tf.clip_by_value(seg, 0.0, tf.reduce_sum(mask_T))
  seg = tf.boolean_mask(seg, seg[:, 1] > seg[:, 0])
  num_m = tf.shape(seg)[0]
  if key is not None:
    order = tf.argsort(tf.random.stateless_uniform([num_m], seed=key))
    seg = tf.gather(seg, tf.sort(order[:cap]))
  else:
    seg = seg[:cap]
  n = tf.shape(seg)[0]
  return {"proposals_BxMx2": tf.pad(seg, [[0, cap - n], [0, 0]]),
          "proposal_mask_BxM": tf.cast(tf.range(cap) < n, tf.float32)}


def _numpy_batches(ds, data_dir, split, check=None) -> Iterator[dict]:
  """Iterates a tf.data dataset as numpy, turning TF read errors into WstalError."""
  for step, batch in enumerate(fmt.iterate(ds.as_numpy_iterator(), data_dir, split)):
    if check is not None:
      check(step, batch)
    yield batch


# ------------------------------------------------------------------------------------ training


def train_batches(data_dir: str, *, split: str, batch_size: int, num_snippets: int, seed: int,
                  start_step: int = 0, sampling: str = "random_perturb",
                  vlm_feature: str | None = None, video_indices: Sequence[int] | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  shuffle_buffer: int = 512,
                  token_fields: Mapping[str, int] | None = None,
                  max_proposals: int | None = None) -> Iterator[dict]:
  """Infinite per-process training batches of fixed shape [batch_size, num_snippets, ...].

  Args:
    data_dir: dataset directory (manifest.json + shards).
    split: "train" usually.
    batch_size: per-process batch size B (the global batch is B * process_count).
    num_snippets: T, snippets per video after sampling.
    seed: integer seed; with the step it fixes every global batch.
    start_step: first step to produce; equals continuing an uninterrupted run from there.
    sampling: "random_perturb" | "uniform" | "pad" (see `sample_indices`; pad crops a random
      window of long videos and zero-pads short ones, mask 0 on padding).
    vlm_feature: also emit this manifest feature as vlm_BxTxE (same snippet indices).
    video_indices: restrict to these video indices of the split (held-out subsets).
    process_index, process_count: default jax.process_index() / jax.process_count(). Process p
      yields rows [p B, (p + 1) B) of every global batch.
    shuffle_buffer: records permuted together; an epoch is a perfect shuffle when it holds at
      most this many videos.
    token_fields: {optional field: L}: also emit each int32 token field (the description
      tokens of `data.descriptions`) as <field>_BxL, truncated or padded with 0 to L.
    max_proposals: M: also emit the video's candidate proposals (`data.proposals`) in the
      batch's snippet coordinates (divided by scale_B; shifted by the window start for
      'pad'), clipped to the sampled length, as proposals_BxMx2 with proposal_mask_BxM: all
      of them when they are at most M, else a random subset of M (P-MIL's cap, 1,000),
      drawn from (seed, the video's position in the stream): resumable like the snippets.

  Yields:
    dicts of numpy arrays: feat_BxTxD float32, [vlm_BxTxE float32], mask_BxT float32,
    label_BxC float32, index_B int32, valid_B float32 (ones), scale_B float32 (T_v / T),
    [<field>_BxL int32 per token field], [proposals_BxMx2 float32, proposal_mask_BxM
    float32].
  """
  token_fields = dict(token_fields or {})
  if max_proposals is not None and int(max_proposals) < 1:
    raise WstalError(f"max_proposals must be >= 1, got {max_proposals}")
  if any(int(n) < 1 for n in token_fields.values()):
    raise WstalError(f"token field lengths must be >= 1, got {token_fields}")
  if sampling not in SAMPLINGS:
    raise WstalError(f"unknown sampling {sampling!r}; expected one of {SAMPLINGS}")
  if batch_size < 1 or num_snippets < 1 or start_step < 0 or shuffle_buffer < 1:
    raise WstalError(f"batch_size ({batch_size}), num_snippets ({num_snippets}) and "
                     f"shuffle_buffer ({shuffle_buffer}) must be >= 1, start_step "
                     f"({start_step}) >= 0")
  manifest = fmt.read_manifest(data_dir)
  paths = fmt.shard_paths(data_dir, split, manifest)
  p, num_procs = _layout(process_index, process_count)
  num_videos = manifest["splits"][split]["num_videos"]
  sel = _selection(video_indices, num_videos, data_dir, split)
  num_sel = len(sel)
  primary, names = _feature_names(manifest, vlm_feature, data_dir)
  files = tf.constant(paths)
  cycle = min(len(paths), _MAX_CYCLE)
  keep_pred = None
  if video_indices is not None:
    keep_N = np.zeros(num_videos, bool)
    keep_N[sel] = True
    keep_pred = _index_filter(keep_N)
  seed64 = tf.constant(int(seed) % (1 << 63), tf.int64)
  shuffle_seed64 = tf.constant((int(seed) ^ 0x5EED5EED) % (1 << 63), tf.int64)
  num_sel64 = tf.constant(num_sel, tf.int64)
  block = min(shuffle_buffer, num_sel)
  global_batch = batch_size * num_procs

  def epoch(e):
    order = tf.random.experimental.stateless_shuffle(files, seed=tf.stack([seed64, e]))
    ds = tf.data.Dataset.from_tensor_slices(order).interleave(
        tf.data.TFRecordDataset, cycle_length=cycle, block_length=1)
    if keep_pred is not None:
      ds = ds.filter(keep_pred)
    ds = ds.batch(block).enumerate().map(
        lambda b, recs: tf.random.experimental.stateless_shuffle(
            recs, seed=tf.stack([shuffle_seed64, e * 1_000_003 + b])))
    return ds.unbatch().enumerate().map(lambda pos, rec: (e * num_sel64 + pos, rec))

  first = start_step * global_batch
  ds = tf.data.Dataset.range(first // num_sel, 1 << 62).flat_map(epoch)
  ds = ds.skip(first % num_sel)  # serialized records: nothing parsed yet
  if num_procs > 1:
    # Element k is row k % G of global batch k // G (the stream starts on a batch boundary);
    # keep this process's rows, before parsing.
    lo, hi = p * batch_size, (p + 1) * batch_size
    ds = ds.filter(lambda k, rec: tf.logical_and(k % global_batch >= lo,
                                                 k % global_batch < hi))
  if max_proposals:
    _require_proposals(manifest, data_dir)
  parse = fmt.tf_parse_fn(manifest, names, int_extras=tuple(token_fields),
                          float_extras=(PROPOSALS,) if max_proposals else ())
  random_window = sampling == "pad"
  proposal_seed64 = tf.constant((int(seed) ^ 0x9E3779B9) % (1 << 63), tf.int64)

  def element(counter, serialized):
    ex = parse(serialized)
    key = tf.stack([seed64, counter])
    need_key = sampling == "random_perturb" or random_window
    idx_T, mask_T, scale = sample_indices(ex["num_snippets"], num_snippets, sampling,
                                          key if need_key else None)
    feats = {n: ex[f"feature/{n}"] for n in names}
    out = _to_batch(ex, feats, primary, vlm_feature, idx_T, mask_T, scale, 1.0)
    for field, length in token_fields.items():
      tokens = ex[f"extra/{field}"][:length]
      out[f"{field}_BxL"] = tf.pad(tokens, [[0, length - tf.shape(tokens)[0]]])
    if max_proposals:
      out.update(_proposal_batch(ex[f"extra/{PROPOSALS}"], idx_T, mask_T, scale,
                                 random_window, int(max_proposals),
                                 tf.stack([proposal_seed64, counter])))
    return out

  ds = ds.map(element, num_parallel_calls=_AUTOTUNE, deterministic=True)
  ds = ds.batch(batch_size, drop_remainder=True).prefetch(_AUTOTUNE)
  return _numpy_batches(ds, data_dir, split)


# ---------------------------------------------------------------------------------- evaluation


def default_buckets(max_len: int) -> list[int]:
  """Powers of two from 64 below max_len, then max_len rounded up to a multiple of 64."""
  buckets, b = [], 64
  while b < max_len:
    buckets.append(b)
    b *= 2
  buckets.append(max(64, -(-max_len // 64) * 64))
  return sorted(set(buckets))


@functools.lru_cache(maxsize=8)
def _scan_lengths(data_dir, split):
  """T of every video (manifest order) read from the shards; for manifests without the list."""
  manifest = fmt.read_manifest(data_dir)
  lengths = np.zeros(manifest["splits"][split]["num_videos"], np.int64)
  for info in fmt.read_video_info(data_dir, split):
    lengths[info.index] = info.num_snippets
  return tuple(lengths.tolist())


def _video_lengths(manifest, data_dir, split):
  lengths = manifest["splits"][split].get("video_num_snippets")
  if lengths is None:
    lengths = _scan_lengths(str(data_dir), split)
  return np.asarray(lengths, np.int64)


def eval_plan(manifest, data_dir, split, *, batch_size, buckets=None, num_snippets=None,
              video_indices=None, process_count=1, order="length"):
  """The eval batches every process will yield, computed from the manifest alone.

  Args:
    manifest, data_dir, split: the dataset (lengths come from the manifest's
      video_num_snippets, or from the shards when it has none).
    batch_size: per-process batch size B.
    buckets, num_snippets, video_indices: as in `eval_batches`.
    process_count: number of processes; process p evaluates the videos of its shards.
    order: 'length' (the default, what `eval_batches` and the Evaluator use): each process's
      videos longest first, ties by index, so a batch holds videos of similar length (1.6x
      the real snippets padded instead of 4.1x on the THUMOS14 test set). 'manifest': each
      process's videos by increasing index. The batch count and each process's videos are the
      same in both. With `num_snippets` every video has the same T and the order is always
      'manifest'.

  Returns:
    (videos_P, length_J): videos_P[p] int64 [N_p] video indices of process p in order;
    length_J int [J] the padded T of batch j (the same on every process);
    J = max_p ceil(N_p / B).
  """
  if order not in ("manifest", "length"):
    raise WstalError(f"eval_plan: order must be 'manifest' or 'length', got {order!r}")
  entry = fmt._split_entry(manifest, split, data_dir)
  num_shards = len(entry["shards"])
  sel = _selection(video_indices, entry["num_videos"], data_dir, split)
  videos_P = [_process_videos(sel, num_shards, p, process_count) for p in range(process_count)]
  num_batches = max(math.ceil(len(v) / batch_size) for v in videos_P)
  if num_snippets is not None:
    return videos_P, [int(num_snippets)] * num_batches
  lengths_N = _video_lengths(manifest, data_dir, split)
  if order == "length":
    videos_P = [v[np.argsort(-lengths_N[v], kind="stable")] for v in videos_P]
  max_len = int(lengths_N[sel].max())
  if buckets is None:
    buckets = default_buckets(max_len)
  buckets = sorted({int(b) for b in buckets})
  if buckets[0] < 1:
    raise WstalError(f"eval buckets must be positive, got {buckets}")
  if max_len > buckets[-1]:
    raise WstalError(f"{data_dir}: split {split!r} has a video of T={max_len} snippets, longer "
                     f"than the largest eval bucket {buckets[-1]}")
  length_J = []
  for j in range(num_batches):
    longest = max((int(lengths_N[v[j * batch_size:(j + 1) * batch_size]].max())
                   for v in videos_P if len(v) > j * batch_size), default=1)
    length_J.append(next(b for b in buckets if b >= longest))
  return videos_P, length_J


def _require_proposals(manifest, data_dir):
  if PROPOSALS not in manifest.get("optional_fields", []):
    raise WstalError(f"{data_dir}: the dataset has no candidate proposals (add them with "
                     "python -m wstal_jax.data.proposals)")


def _proposal_slots(data_dir, split, manifest, videos_P, batch_size, num_batches, buckets):
  """(padded M of every video index [N] int32, padded M of every batch [J]): batch j's M is
  the smallest bucket holding the most proposals of a video of the j-th batch of any
  process (so every process's batch j has the same shapes)."""
  counts_N = proposals_lib.counts(data_dir, split, manifest)
  buckets = sorted(buckets or default_buckets(int(counts_N.max(initial=1))))
  most_J = np.ones(num_batches, np.int64)
  for videos in videos_P:
    for j in range(num_batches):
      rows = np.asarray(videos[j * batch_size:(j + 1) * batch_size], np.int64)
      if len(rows):
        most_J[j] = max(most_J[j], int(counts_N[rows].max()))
  if most_J.max() > buckets[-1]:
    raise WstalError(f"proposal buckets {buckets} cannot hold a video with {most_J.max()} "
                     "proposals")
  length_m_J = np.array([next(b for b in buckets if b >= m) for m in most_J], np.int32)
  slot_m_N = np.ones(len(counts_N), np.int32)
  for videos in videos_P:
    for j in range(num_batches):
      slot_m_N[np.asarray(videos[j * batch_size:(j + 1) * batch_size], np.int64)] = \
          length_m_J[j]
  return slot_m_N, length_m_J


def _peak_held_bytes(videos_W, bytes_W) -> float:
  """Most bytes held at once when the records of videos_W arrive by increasing index and are
  released in list order (a video is held from its arrival until it and every video before
  it in the list have arrived)."""
  num = len(videos_W)
  arrive_W = np.empty(num, np.int64)
  arrive_W[np.argsort(videos_W, kind="stable")] = np.arange(num)
  leave_W = np.maximum.accumulate(arrive_W)
  delta = np.zeros(num + 1)
  np.add.at(delta, arrive_W, bytes_W)
  np.add.at(delta, leave_W + 1, -np.asarray(bytes_W, np.float64))
  return float(np.cumsum(delta).max(initial=0.0))


def _read_windows(videos_K, bytes_K, buffer_bytes) -> list[tuple[int, int]]:
  """Splits the plan positions [0, K) into windows [lo, hi), each read in one pass over the
  shards, whose reorder buffer holds at most `buffer_bytes` (a window has >= 1 video).

  Greedy: each window is the longest that fits (the peak grows with the window)."""
  windows, lo, num = [], 0, len(videos_K)
  while lo < num:
    good, bad = lo + 1, num + 1   # good fits (one video always does); bad: first known not to
    while bad - good > 1:
      mid = (good + bad) // 2
      if _peak_held_bytes(videos_K[lo:mid], bytes_K[lo:mid]) <= buffer_bytes:
        good = mid
      else:
        bad = mid
    windows.append((lo, good))
    lo = good
  return windows


def eval_batches(data_dir: str, *, split: str, batch_size: int,
                 vlm_feature: str | None = None, buckets: Sequence[int] | None = None,
                 num_snippets: int | None = None, video_indices: Sequence[int] | None = None,
                 process_index: int | None = None, process_count: int | None = None,
                 order: str = "length", sampling: str = "uniform",
                 buffer_bytes: int = EVAL_BUFFER_BYTES, proposals: bool = False,
                 proposal_buckets: Sequence[int] | None = None) -> Iterator[dict]:
  """Whole-video per-process eval batches; every process yields the same number and shapes.

  The batches follow `eval_plan(order=order)`. A process reads only its own shards, whose
  records come by increasing video index; to yield them in plan order (longest first by
  default) it holds parsed videos that arrived before their turn in a reorder buffer of at
  most `buffer_bytes` (padded features of the requested streams). When the whole plan does
  not fit, the plan is cut into windows that each fit (`_read_windows`) and the shards are
  read once per window, parsing only that window's videos (the others are skipped after
  reading their index). THUMOS14 test at full dims (I3D 2048-d, padded to the length
  buckets: ~0.9 GB) takes 2-3 passes with the default 512 MiB; in manifest order nothing
  waits and one pass always suffices.

  Args:
    data_dir, split: the dataset and split to evaluate.
    batch_size: per-process batch size B.
    vlm_feature: also emit this manifest feature as vlm_BxTxE.
    buckets: padded lengths to choose from (default `default_buckets(longest video)`); batch j
      is padded to the smallest bucket holding its longest video on any process.
    num_snippets: instead of padding, resample every video to this T (ActivityNet style) with
      `sampling` ('uniform': bin centres, 'floor': bin starts as ASL's test code, see
      `sample_indices`); then scale_B = T_v / num_snippets and the mask is all ones.
    video_indices: evaluate only these videos of the split.
    process_index, process_count: default jax.process_index() / jax.process_count(). A process
      without shards yields only dummy batches.
    order: 'length' (longest first) or 'manifest' (by index); see `eval_plan`. Each video's
      batch row holds the same values in both; only the batching (and padding) differs.
    buffer_bytes: bound on the reorder buffer (see above).
    proposals: also emit every candidate proposal of each video (`data.proposals`; none
      dropped) as proposals_BxMx2 (batch snippet coordinates: as stored, or divided by
      scale_B when resampling) and proposal_mask_BxM, M padded per batch to the smallest of
      `proposal_buckets` (default `default_buckets(most proposals of a video)`) holding the
      batch's largest count on any process.

  Yields:
    dicts of numpy arrays as in train_batches, with T (and M) varying by batch; dummy entries
    have index_B -1, valid_B 0, an all-zero mask and zero features (and proposals).
  """
  if batch_size < 1 or (num_snippets is not None and num_snippets < 1):
    raise WstalError(f"batch_size ({batch_size}) and num_snippets ({num_snippets}) must be >= 1")
  if sampling not in EVAL_SAMPLINGS:
    raise WstalError(f"eval sampling must be one of {EVAL_SAMPLINGS}, got {sampling!r}")
  manifest = fmt.read_manifest(data_dir)
  paths = fmt.shard_paths(data_dir, split, manifest)
  p, num_procs = _layout(process_index, process_count)
  videos_P, length_J = eval_plan(manifest, data_dir, split, batch_size=batch_size,
                                 buckets=buckets, num_snippets=num_snippets,
                                 video_indices=video_indices, process_count=num_procs,
                                 order=order)
  primary, names = _feature_names(manifest, vlm_feature, data_dir)
  mine = videos_P[p]
  num_batches = len(length_J)
  num_videos = manifest["splits"][split]["num_videos"]
  pad_T = np.repeat(np.asarray(length_J, np.int64), batch_size)  # T of every slot
  lengths_N = None if num_snippets is not None else _video_lengths(manifest, data_dir, split)
  dims = {n: manifest["features"][n]["dim"] for n in names}
  num_c = len(manifest["classes"])
  if proposals:
    _require_proposals(manifest, data_dir)
  parse = fmt.tf_parse_fn(manifest, names, float_extras=(PROPOSALS,) if proposals else ())
  # Padded T of each of this process's videos; records of other videos are never parsed.
  slot_N = np.ones(num_videos, np.int32)
  slot_N[mine] = pad_T[:len(mine)]
  slot_tf = tf.constant(slot_N)
  if proposals:
    slot_m_N, length_m_J = _proposal_slots(data_dir, split, manifest, videos_P, batch_size,
                                           num_batches, proposal_buckets)
    slot_m_tf = tf.constant(slot_m_N)
  # Video i is in shard i % num_shards; process p reads shards p, p + P, ...
  mine_N = (np.arange(num_videos) % len(paths)) % num_procs == p
  bytes_K = pad_T[:len(mine)] * 4 * sum(dims.values())
  windows = _read_windows(mine, bytes_K, buffer_bytes)
  my_paths = paths[p::num_procs]
  index_spec = {"index": tf.io.FixedLenFeature([], tf.int64)}

  def element(index, serialized):
    ex = parse(serialized)
    num_t = ex["num_snippets"]
    if num_snippets is not None:
      idx_T, mask_T, scale = sample_indices(num_t, num_snippets, sampling)
    else:
      slot_t = tf.gather(slot_tf, tf.clip_by_value(index, 0, num_videos - 1))
      pos_T = tf.range(slot_t, dtype=tf.int32)
      mask_T = tf.cast(pos_T < num_t, tf.float32)
      idx_T, scale = tf.minimum(pos_T, num_t - 1), tf.constant(1.0, tf.float32)
    feats = {n: ex[f"feature/{n}"] for n in names}
    out = _to_batch(ex, feats, primary, vlm_feature, idx_T, mask_T, scale, 1.0)
    if proposals:
      slot_m = tf.gather(slot_m_tf, tf.clip_by_value(index, 0, num_videos - 1))
      out.update(_proposal_batch(ex[f"extra/{PROPOSALS}"], idx_T, mask_T, scale,
                                 num_snippets is None, slot_m))
    return out

  def read_pass(take_N):
    """This process's records of the videos in take_N, parsed, by increasing index. Records
    that belong to no video of this process's shards are kept too (to be reported)."""
    keep = tf.constant(take_N | ~mine_N)

    def with_index(serialized):
      return tf.io.parse_single_example(serialized, index_spec)["index"], serialized

    def wanted(index, serialized):
      del serialized
      in_range = tf.logical_and(index >= 0, index < num_videos)
      return tf.logical_or(tf.logical_not(in_range),
                           tf.gather(keep, tf.clip_by_value(index, 0, num_videos - 1)))

    ds = tf.data.Dataset.from_tensor_slices(my_paths).interleave(
        tf.data.TFRecordDataset, cycle_length=len(my_paths), block_length=1)
    ds = ds.map(with_index).filter(wanted)
    return ds.map(element, num_parallel_calls=_AUTOTUNE, deterministic=True).prefetch(_AUTOTUNE)

  def mismatch(what):
    return WstalError(f"{data_dir}: split {split!r}: shards hold other videos than the manifest "
                      f"lists ({what}); the manifest does not match its shards")

  def videos_in_plan_order():
    for lo, hi in windows:
      take_N = np.zeros(num_videos, bool)
      take_N[mine[lo:hi]] = True
      held, pos = {}, lo
      for ex in _numpy_batches(read_pass(take_N), data_dir, split):
        index = int(ex["index_B"])
        if not (0 <= index < num_videos and take_N[index]):
          raise mismatch(f"process {p} read video index {index}"
                         + (" twice" if 0 <= index < num_videos and mine_N[index] else ""))
        take_N[index] = False
        held[index] = ex
        while pos < hi and int(mine[pos]) in held:
          yield held.pop(int(mine[pos]))
          pos += 1
      if pos < hi:
        raise mismatch(f"no record of video index {int(mine[pos])}")

  def dummy(slot_t, slot_m):
    out = {
        "feat_BxTxD": np.zeros([slot_t, dims[primary]], np.float32),
        "mask_BxT": np.zeros([slot_t], np.float32),
        "label_BxC": np.zeros([num_c], np.float32),
        "index_B": np.int32(-1),
        "valid_B": np.float32(0.0),
        "scale_B": np.float32(1.0),
    }
    if vlm_feature is not None:
      out["vlm_BxTxE"] = np.zeros([slot_t, dims[vlm_feature]], np.float32)
    if proposals:
      out["proposals_BxMx2"] = np.zeros([slot_m, 2], np.float32)
      out["proposal_mask_BxM"] = np.zeros([slot_m], np.float32)
    return out

  def check(batch, want):
    if lengths_N is not None:
      real_t = np.where(want >= 0, lengths_N[np.maximum(want, 0)], 0)
      if not np.array_equal(batch["mask_BxT"].sum(1).astype(np.int64), real_t):
        raise WstalError(f"{data_dir}: split {split!r}: video lengths in the shards differ "
                         "from video_num_snippets in the manifest")

  def batches():
    videos = videos_in_plan_order()
    for j in range(num_batches):
      want = np.full(batch_size, -1, np.int64)
      rows = mine[j * batch_size:(j + 1) * batch_size]
      want[:len(rows)] = rows
      exs = [next(videos) for _ in rows]
      exs += [dummy(int(length_J[j]), int(length_m_J[j]) if proposals else 0)] * (
          batch_size - len(rows))
      batch = {k: np.stack([ex[k] for ex in exs]) for k in exs[0]}
      check(batch, want)
      yield batch

  return batches()
