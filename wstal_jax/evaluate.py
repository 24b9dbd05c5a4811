"""Evaluation: the Evaluator (used by training and by `--mode=eval`) and eval from a checkpoint.

Also home of the run set-up both modes share (data directory, method, constants, mesh, batch
placement), because training depends on evaluation and not the other way round.

Evaluator: `method.predict` jitted over `input_pipeline.eval_batches` (whole videos, longest
first, padded to length buckets with masked dummy videos so every process runs the same
batches), then on the host one `postprocess.proposals_for_videos` call for all videos with the
method's preset (fields in `config.eval.postprocess` replace the preset's),
`metrics.detection_map` at `config.eval.tiou`, classification mAP and top-1 accuracy. Every
process receives the whole global batch's outputs and computes the same metrics. Metric values
are percentages.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import os
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np
import tensorflow as tf

from wstal_jax import checkpointing
from wstal_jax import input_pipeline
from wstal_jax import metrics as metrics_lib
from wstal_jax import methods
from wstal_jax import plots
from wstal_jax import postprocess
from wstal_jax import results_io
from wstal_jax.data import format as data_format
from wstal_jax.errors import WstalError

DATA_AXIS = "data"


# ----------------------------------------------------------------------------- run set-up


@dataclasses.dataclass
class Setup:
  """What both training and evaluation build from a config."""
  config: ml_collections.ConfigDict
  data_dir: str
  manifest: dict
  method: Any
  consts: dict          # replicated jax arrays (text_CxE, ...)
  mesh: jax.sharding.Mesh

  @property
  def classes(self) -> list[str]:
    return list(self.manifest["classes"])

  @property
  def sps(self) -> float:
    """Seconds per (original) snippet."""
    return data_format.seconds_per_snippet(self.manifest)

  @property
  def replicated(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())

  @property
  def data_sharding(self):
    return jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(DATA_AXIS))

  def put_batch(self, batch: dict) -> dict:
    """Per-process numpy batch -> global jax arrays sharded over the batch axis."""
    sharding = self.data_sharding
    return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
            for k, v in batch.items()}

  def abstract_params(self, example_batch: dict):
    """ShapeDtypeStructs (replicated) of the parameters, without running init."""
    shapes = jax.eval_shape(self._init_params, jax.random.key(0), example_batch, self.consts)
    return checkpointing.abstract_like(shapes, self.replicated)

  def init_params(self, rng, example_batch: dict):
    init = jax.jit(self._init_params, out_shardings=self.replicated)
    return init(rng, example_batch, self.consts)

  def _init_params(self, rng, batch, consts):
    variables = self.method.init(rng, batch, consts)
    return variables["params"]


def absolute(path: str) -> str:
  """Local paths made absolute (orbax needs it); gs://... left alone."""
  return path if "://" in str(path) else os.path.abspath(path)


def resolve_data_dir(config) -> str:
  """config.data.dir, or (built-in preset without a dir) the cached built-in benchmark."""
  if config.data.dir:
    return str(config.data.dir)
  if config.data.dataset != "builtin":
    raise WstalError(f"dataset {config.data.dataset!r} needs --config.data.dir=DIR (shards "
                     "written by python -m wstal_jax.data.convert)")
  from wstal_jax.data import synthetic  # only the built-in preset needs the generator
  logging.info("no --config.data.dir: using the built-in %r benchmark (seed %d)",
               config.data.builtin_size, config.data.builtin_seed)
  return synthetic.ensure_builtin(config.data.builtin_size, seed=config.data.builtin_seed,
                                  cache_dir=config.data.cache_dir)


def make_mesh(config) -> jax.sharding.Mesh:
  """1-D data-parallel mesh over all devices, or the first config.mesh.num_devices.

  Devices are ordered by process, so process p's devices hold rows [p B, (p + 1) B) of every
  global batch: the rows input_pipeline gives process p."""
  total = jax.device_count()
  n = int(config.mesh.num_devices) or total
  if n < 0 or n > total:
    raise WstalError(f"config.mesh.num_devices={n}: this job has {total} device(s)")
  if jax.process_count() > 1:
    if n != total:
      raise WstalError("config.mesh.num_devices must be 0 (all devices) in a multi-process job")
    per_process = dict(collections.Counter(d.process_index for d in jax.devices()))
    if len(set(per_process.values())) != 1:
      raise WstalError(f"every process needs the same number of devices, got {per_process} "
                       "(process: devices); check CUDA_VISIBLE_DEVICES / JAX_LOCAL_DEVICE_IDS")
  devices = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))[:n]
  # Auto axes: the methods are written as single-device code and XLA partitions them (data
  # parallel: only the batch axis is sharded), so they need no sharding annotations. The mesh
  # is built directly: jax.make_mesh may reorder devices by physical topology, which would
  # interleave processes along the batch axis.
  return jax.sharding.Mesh(np.asarray(devices), (DATA_AXIS,),
                           axis_types=(jax.sharding.AxisType.Auto,))


def check_batch_size(global_batch: int, mesh, what: str):
  """WstalError unless `global_batch` splits evenly over the processes and the devices."""
  n_dev, n_proc = mesh.devices.size, jax.process_count()
  if global_batch <= 0 or global_batch % n_dev or global_batch % n_proc:
    layout = f" = {n_proc} processes x {n_dev // n_proc} devices" if n_proc > 1 else ""
    raise WstalError(f"{what}={global_batch} must be a positive multiple of the number of "
                     f"devices ({n_dev}{layout}): the global batch is split evenly over the "
                     "processes and their devices")


def per_process_batch_size(global_batch: int, mesh, what: str) -> int:
  check_batch_size(global_batch, mesh, what)
  return global_batch // jax.process_count()


def setup(config, *, method=None) -> Setup:
  """Data directory, manifest, method, constants and mesh for `config`.

  `method` replaces `methods.get_method(...)` (tests use small stand-in methods)."""
  data_dir = resolve_data_dir(config)
  manifest = data_format.read_manifest(data_dir)
  mesh = make_mesh(config)
  features = manifest["features"]
  vlm = config.data.vlm_feature
  if vlm and vlm not in features:
    raise WstalError(f"config.data.vlm_feature={vlm!r}: the dataset at {data_dir} has "
                     f"features {sorted(features)}")
  text = data_format.load_text_embeddings(data_dir, manifest, feature=vlm)
  dims = {"feat": features[manifest["primary_feature"]]["dim"],
          "vlm": features[vlm]["dim"] if vlm else None,
          "text": None if text is None else int(text.shape[1])}
  if method is None:
    method = methods.get_method(config, len(manifest["classes"]), dims,
                                class_names=list(manifest["classes"]))
  consts = {} if text is None else {"text_CxE": text}
  extra = getattr(method, "extra_consts", None)
  if extra is not None:
    consts.update(extra())
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  consts = jax.device_put(consts, replicated)
  return Setup(config=config, data_dir=data_dir, manifest=manifest, method=method,
               consts=consts, mesh=mesh)


def heldout_split(num_videos: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Deterministic split of the TRAIN videos: (train indices, held-out indices), sorted."""
  if not 0.0 < fraction < 1.0:
    raise WstalError(f"config.eval.heldout_fraction must be in (0, 1), got {fraction}")
  num_held = int(round(fraction * num_videos))
  if num_held < 1 or num_held >= num_videos:
    raise WstalError(f"config.eval.heldout_fraction={fraction} of {num_videos} training videos "
                     "leaves no held-out or no training video")
  perm = np.random.default_rng([seed, 0x4E1D]).permutation(num_videos)
  return np.sort(perm[num_held:]), np.sort(perm[:num_held])


# ----------------------------------------------------------------------------- evaluator


@dataclasses.dataclass
class EvalResult:
  """metrics: `mAP@0.10`, ..., `average_mAP`, `acc`, `cls_mAP` (percent, NaN -> None).
  proposals: video name -> postprocess.Proposals (seconds). scores: video name -> the
  method's outputs for the first `keep_scores` videos (numpy, trimmed to valid snippets)."""
  metrics: dict
  proposals: dict
  scores: dict
  split: str
  num_videos: int


def map_key(tiou: float) -> str:
  return f"mAP@{tiou:.2f}"


class Evaluator:
  """Evaluates parameters on one split (or a subset of its videos).

  `order` is the batching of `input_pipeline.eval_batches`: 'length' (default; least padding)
  or 'manifest'. Predictions are per video (masked), so both give the same results.
  """

  def __init__(self, run: Setup, *, split: str, video_indices=None, order: str = "length"):
    config = run.config
    self.order = order
    self.run = run
    self.split = split
    self.tiou = tuple(float(t) for t in config.eval.tiou)
    if not self.tiou:
      raise WstalError("config.eval.tiou is empty")
    infos = data_format.read_video_info(run.data_dir, split)
    if video_indices is None:
      video_indices = np.arange(len(infos))
    self.video_indices = np.asarray(video_indices, np.int64)
    self.infos = infos
    self.sps = data_format.seconds_per_snippet(run.manifest)
    self.batch_size = per_process_batch_size(config.eval.batch_size, run.mesh,
                                             "config.eval.batch_size")
    preset = run.method.postprocess_preset
    self.pp_config = postprocess.get_preset(preset)
    overrides = config.eval.postprocess.to_dict() if config.eval.postprocess else {}
    unknown = sorted(set(overrides) - set(self.pp_config.keys()))
    if unknown:
      raise WstalError(f"config.eval.postprocess: unknown field(s) {unknown} for the "
                       f"{preset!r} preset (fields: {sorted(self.pp_config.keys())})")
    self.pp_config.update(overrides)

    def predict(params, batch, consts):
      out = dict(run.method.predict(params, batch, consts))
      # Carried through so every process reads the global batch's rows from one place.
      for key in ("index_B", "mask_BxT", "scale_B"):
        out[key] = batch[key]
      return out

    self._predict = jax.jit(predict,
                            in_shardings=(run.replicated, run.data_sharding, run.replicated),
                            out_shardings=run.replicated)
    gt_rows = [(i, self.infos[i]) for i in self.video_indices]
    # Times as the GT JSON stores them (shortest decimal of each float32, see
    # results_io.ground_truth_dict), so these metrics equal `evaluate_results` on written files
    # even where a tIoU lands exactly on a threshold.
    as_written = np.vectorize(results_io.short_float, otypes=[np.float64])
    self.gt = {
        "video": np.concatenate([np.full(len(v.segment_labels), i) for i, v in gt_rows]
                                + [np.zeros(0, np.int64)]),
        "label": np.concatenate([v.segment_labels for _, v in gt_rows] + [np.zeros(0, int)]),
        "start": as_written(np.concatenate([v.segments[:, 0] for _, v in gt_rows]
                                           + [np.zeros(0)])),
        "end": as_written(np.concatenate([v.segments[:, 1] for _, v in gt_rows]
                                         + [np.zeros(0)])),
    }

  def batches(self):
    config = self.run.config
    return input_pipeline.eval_batches(
        self.run.data_dir, split=self.split, batch_size=self.batch_size,
        vlm_feature=config.data.vlm_feature, num_snippets=config.eval.num_snippets,
        video_indices=self.video_indices, order=self.order,
        process_index=jax.process_index(), process_count=jax.process_count())

  def __call__(self, params, *, keep_scores: int = 0) -> EvalResult:
    num_c = len(self.run.classes)
    keep = set(int(i) for i in self.video_indices[:keep_scores])
    video_scores = {}
    scores = {}
    # Per video, in batch order: what postprocess.proposals_for_videos needs (one call for
    # all videos after the loop: the same proposals as video_proposals per video, faster).
    index_V, cas, actionness, sps, durations, ambiguous = [], [], [], [], [], []
    for batch in self.batches():
      out = self._predict(params, self.run.put_batch(batch), self.run.consts)
      out = jax.device_get(out)   # replicated: every process holds the whole global batch
      index_B, mask_BxT, scale_B = out["index_B"], out["mask_BxT"], out["scale_B"]
      for b, idx in enumerate(index_B.tolist()):
        if idx < 0:
          continue   # dummy padding video
        info = self.infos[idx]
        num_t = int(round(float(mask_BxT[b].sum())))
        vid_scores_C = np.asarray(out["video_scores_BxC"][b], np.float32)
        cas_TxC = np.asarray(out["cas_BxTxC"][b, :num_t], np.float32)
        act_T = (np.asarray(out["actionness_BxT"][b, :num_t], np.float32)
                 if "actionness_BxT" in out else None)
        video_sps = self.sps * float(scale_B[b])
        index_V.append(idx)
        cas.append(cas_TxC)
        actionness.append(act_T)
        sps.append(video_sps)
        durations.append(info.duration)
        ambiguous.append(info.ambiguous)
        video_scores[idx] = vid_scores_C
        if idx in keep:
          # The layout of results_io.save_scores_npz.
          scores[info.name] = {"video_scores": vid_scores_C, "cas": cas_TxC,
                               "seconds_per_snippet": video_sps}
          if act_T is not None:
            scores[info.name]["actionness"] = act_T
    missing = [int(i) for i in self.video_indices if int(i) not in video_scores]
    if missing:
      raise WstalError(f"{self.run.data_dir}: split {self.split!r}: evaluation saw no output for "
                       f"{len(missing)} video(s) (first index {missing[0]})")
    found = postprocess.proposals_for_videos(
        [video_scores[i] for i in index_V], cas, actionness, seconds_per_snippet=sps,
        durations=durations, config=self.pp_config, ambiguous=ambiguous)
    proposals = {self.infos[i].name: p for i, p in zip(index_V, found)}
    metrics = self._metrics(video_scores, proposals, num_c)
    ordered = {self.infos[i].name: proposals[self.infos[i].name] for i in self.video_indices}
    ordered_scores = {self.infos[i].name: scores[self.infos[i].name]
                      for i in self.video_indices if self.infos[i].name in scores}
    return EvalResult(metrics=metrics, proposals=ordered, scores=ordered_scores,
                      split=self.split, num_videos=len(self.video_indices))

  def _metrics(self, video_scores, proposals, num_c) -> dict:
    rows = []
    for i in self.video_indices:
      p = proposals[self.infos[i].name]
      rows.append((np.full(len(p.label), i), p.label, p.score, p.start, p.end))
    cols = [np.concatenate([r[k] for r in rows] + [np.zeros(0)]) for k in range(5)]
    pred = {"video": cols[0].astype(np.int64), "label": cols[1].astype(np.int64),
            "score": cols[2], "start": cols[3], "end": cols[4]}
    map_K, _ = metrics_lib.detection_map(self.gt, pred, self.tiou, num_classes=num_c)
    scores_NxC = np.stack([video_scores[int(i)] for i in self.video_indices])
    labels_NxC = np.stack([self.infos[int(i)].label for i in self.video_indices])
    out = {map_key(t): _pct(m) for t, m in zip(self.tiou, map_K)}
    out["average_mAP"] = _pct(np.mean(map_K))
    out["acc"] = _pct(metrics_lib.top1_accuracy(scores_NxC, labels_NxC))
    out["cls_mAP"] = _pct(metrics_lib.classification_map(scores_NxC, labels_NxC))
    return out


def _pct(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else round(100.0 * x, 4)


def format_table(metrics: dict, tiou) -> str:
  """Two-line mAP table: thresholds then values, plus average, ACC and classification mAP."""
  keys = [map_key(float(t)) for t in tiou] + ["average_mAP", "acc", "cls_mAP"]
  heads = [f"{float(t):.2f}" for t in tiou] + ["avg", "ACC", "cls_mAP"]
  vals = ["-" if metrics.get(k) is None else f"{metrics[k]:.2f}" for k in keys]
  width = [max(len(h), len(v)) for h, v in zip(heads, vals)]
  line1 = "tIoU   " + "  ".join(h.rjust(w) for h, w in zip(heads, width))
  line2 = "mAP(%) " + "  ".join(v.rjust(w) for v, w in zip(vals, width))
  return line1 + "\n" + line2


# ----------------------------------------------------------------------------- outputs


def write_json_atomic(path: str, obj):
  results_io.write_json_atomic(path, obj, indent=2)


def write_outputs(out_dir: str, result: EvalResult, run: Setup, *, extra: dict) -> dict:
  """Writes OUT/metrics.json (metrics + `extra`), OUT/results.json (ActivityNet format),
  OUT/plots/<video>.png and OUT/plots/scores.npz for the videos in result.scores.
  Only process 0 writes. Returns the metrics.json content."""
  content = dict(result.metrics)
  content.update(extra)
  if jax.process_index() != 0:
    return content
  tf.io.gfile.makedirs(out_dir)
  write_json_atomic(os.path.join(out_dir, "metrics.json"), content)
  results_io.write_results(os.path.join(out_dir, "results.json"), result.proposals,
                           run.classes)
  if result.scores:
    plot_dir = os.path.join(out_dir, "plots")
    tf.io.gfile.makedirs(plot_dir)
    infos = {v.name: v for v in data_format.read_video_info(run.data_dir, result.split)}
    for name, sc in result.scores.items():
      info = infos[name]
      gt = [(s, e, c) for (s, e), c in zip(info.segments.tolist(), info.segment_labels.tolist())]
      curves = {"actionness": sc["actionness"]} if "actionness" in sc else None
      plots.plot_video(os.path.join(plot_dir, f"{name}.png"), name=name,
                       seconds_per_snippet=sc["seconds_per_snippet"], class_names=run.classes,
                       cas_TxC=sc["cas"], curves=curves, gt_segments=gt,
                       proposals=result.proposals[name], duration=info.duration)
    results_io.save_scores_npz(os.path.join(plot_dir, "scores.npz"), result.scores,
                               seconds_per_snippet=run.sps, class_names=run.classes)
  return content


# ----------------------------------------------------------------------------- --mode=eval


def evaluate_checkpoint(config, workdir: str, *, checkpoint: str = "best",
                        eval_dir: str | None = None, method=None) -> dict:
  """Restores `checkpoint` ('best' | 'latest' | step) from WORKDIR/checkpoints read-only,
  evaluates it on config.eval.split and writes metrics.json, results.json and plots to
  `eval_dir` (default: the workdir). Returns the metrics.json content."""
  workdir = absolute(workdir)
  run = setup(config, method=method)
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ckpts.resolve(checkpoint)
  evaluator = Evaluator(run, split=config.eval.split)
  example = next(iter(evaluator.batches()))
  params = ckpts.restore_params(step, run.abstract_params(run.put_batch(example)))
  logging.info("evaluating checkpoint %s (step %d) on split %r (%d videos)", checkpoint, step,
               config.eval.split, evaluator.video_indices.size)
  result = evaluator(params, keep_scores=config.eval.num_plots)
  ckpt_metrics = ckpts.metrics(step) or {}
  extra = {"step": step, "selected_on": ckpt_metrics.get("selected_on", checkpoint),
           "checkpoint": str(checkpoint), "split": result.split}
  content = write_outputs(eval_dir or workdir, result, run, extra=extra)
  ckpts.close()
  return content
