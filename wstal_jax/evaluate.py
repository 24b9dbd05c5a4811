"""Evaluation: the Evaluator (used by training and by `--mode=eval`) and eval from a checkpoint.

The run set-up both modes share (data directory, method, constants, mesh, batch placement) is
`run_setup.py`; the Evaluator receives a `run_setup.Setup` and only evaluates.

Evaluator: `method.predict` jitted over `input_pipeline.eval_batches` (whole videos, longest
first, padded to length buckets with masked dummy videos so every process runs the same
batches), then on the host one `postprocess.proposals_for_videos` call for all videos with the
method's preset (fields in `config.eval.postprocess` replace the preset's),
`metrics.detection_map` at `config.eval.tiou`, classification mAP and top-1 accuracy (and, for
every optional frame_<name>_BxTxC a method returns, the foreground / background mIoU of its
frame scores at the method's `frame_threshold`: `metrics.FrameIoU`). Every
process receives the whole global batch's outputs and computes the same metrics. Metric values
are percentages.
"""
from __future__ import annotations

import contextlib
import dataclasses
import math
import os

from absl import logging
import jax
import numpy as np
import tensorflow as tf

from wstal_jax import checkpointing
from wstal_jax import eval_forward
from wstal_jax import input_pipeline
from wstal_jax import metrics as metrics_lib
from wstal_jax import plots
from wstal_jax import postprocess
from wstal_jax import protocols
from wstal_jax import results_io
from wstal_jax import run_setup
from wstal_jax import workdir as workdir_lib
from wstal_jax.data import format as data_format
from wstal_jax.errors import WstalError

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

  def __init__(self, run: run_setup.Setup, *, split: str, video_indices=None, order: str = "length"):
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
    self.batch_size = run_setup.per_process_batch_size(config.eval.batch_size, run.mesh,
                                             "config.eval.batch_size")
    preset = run.method.postprocess_preset
    self.pp_config = postprocess.get_preset(preset)
    overrides = config.eval.postprocess.to_dict() if config.eval.postprocess else {}
    unknown = sorted(set(overrides) - set(self.pp_config.keys()))
    if unknown:
      raise WstalError(f"config.eval.postprocess: unknown field(s) {unknown} for the "
                       f"{preset!r} preset (fields: {sorted(self.pp_config.keys())})")
    self.pp_config.update(overrides)
    try:   # every post-processing field, before anything is trained
      postprocess.check_config(self.pp_config)
    except WstalError as e:
      raise WstalError(f"config.eval.postprocess ({preset!r} preset and overrides): "
                       f"{str(e).removeprefix('post-processing config: ')}") from None

    # The forward pass (eval_forward.py): exact chunks for local networks, else buckets.
    self.forward_mode = eval_forward.resolve(config, run.method)
    self._forward = eval_forward.Forward(
        run, self.forward_mode, row_len=int(config.eval.get("chunk_snippets", 1024)),
        rows_per_batch=self.batch_size, stream_lengths_fn=self._stream_lengths)
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
    # The protocol (protocols.py): for 'wtalc' the ground truth in snippet units and each
    # video's ambiguous segments (seconds as written), applied to the proposals in _metrics.
    self.protocol = protocols.check(config.eval.get("protocol", "official"),
                                    "config.eval.protocol")
    self.fps = float(run.manifest["fps"])
    self.snippet_frames = float(run.manifest["snippet_frames"])
    if self.protocol == "wtalc":
      self.gt = dict(self.gt,
                     start=protocols.snippet_bounds(self.gt["start"], self.fps,
                                                    self.snippet_frames),
                     end=protocols.snippet_bounds(self.gt["end"], self.fps,
                                                  self.snippet_frames))
      self.ambiguous = {i: as_written(v.ambiguous.astype(np.float64)) for i, v in gt_rows
                        if len(v.ambiguous)}

  def batches(self):
    config = self.run.config
    return input_pipeline.eval_batches(
        self.run.data_dir, split=self.split, batch_size=self.batch_size,
        vlm_feature=config.data.vlm_feature, num_snippets=config.eval.num_snippets,
        video_indices=self.video_indices, order=self.order,
        sampling=config.eval.get("sampling", "uniform"),
        process_index=jax.process_index(), process_count=jax.process_count(),
        proposals=bool(config.data.get("proposals", False)))

  def _stream_lengths(self) -> list:
    """Chunked forward: every process's video lengths in its batch order (from the plan)."""
    videos_P, _ = input_pipeline.eval_plan(
        self.run.manifest, self.run.data_dir, self.split, batch_size=self.batch_size,
        video_indices=self.video_indices, process_count=jax.process_count(), order=self.order)
    lengths = {info.index: info.num_snippets for info in self.infos}
    return [[lengths[int(i)] for i in v] for v in videos_P]

  def __call__(self, params, *, keep_scores: int = 0) -> EvalResult:
    num_c = len(self.run.classes)
    keep = set(int(i) for i in self.video_indices[:keep_scores])
    video_scores = {}
    scores = {}
    # Per video, in batch order: what postprocess.proposals_for_videos needs (one call for
    # all videos after the loop: the same proposals as video_proposals per video, faster).
    index_V, cas, actionness, sps, durations, ambiguous = [], [], [], [], [], []
    oic_scores = []   # predict's optional oic_scores_BxC (the OIC gamma term's scores)
    # Proposal methods (predict gives proposal_scores_BxMxC): per video the valid candidates'
    # scores [M_v, C] and segments in seconds; detections come from these, not from the CAS.
    cand_scores, cand_segments = [], []
    frame_ious = {}   # name -> metrics.FrameIoU for predict's optional frame_<name>_BxTxC
    frame_threshold = float(getattr(self.run.method, "frame_threshold", 0.5))
    # Replicated outputs: every process holds the whole global batch.
    for out in self._forward(params, self.batches()):
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
        if "oic_scores_BxC" in out:
          oic_scores.append(np.asarray(out["oic_scores_BxC"][b], np.float32))
        video_sps = self.sps * float(scale_B[b])
        if "proposal_scores_BxMxC" in out:
          valid_m = out["proposal_mask_BxM"][b] > 0
          cand_scores.append(np.asarray(out["proposal_scores_BxMxC"][b][valid_m], np.float32))
          cand_segments.append(np.asarray(out["proposals_BxMx2"][b][valid_m], np.float64)
                               * video_sps)
        frame_keys = [k for k in out if k.startswith("frame_") and k.endswith("_BxTxC")]
        if frame_keys:
          gt_TxC = metrics_lib.snippet_labels(info.segments, info.segment_labels, num_t,
                                              video_sps, num_c)
          for key in frame_keys:
            name = key[len("frame_"):-len("_BxTxC")]
            frame_ious.setdefault(name, metrics_lib.FrameIoU(num_c, frame_threshold)).add(
                out[key][b, :num_t], info.label, gt_TxC)
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
    if oic_scores and len(oic_scores) != len(index_V):
      raise WstalError(f"{type(self.run.method).__name__}.predict returned oic_scores_BxC for "
                       f"{len(oic_scores)} of {len(index_V)} videos: it must return it for "
                       "every batch or for none")
    missing = [int(i) for i in self.video_indices if int(i) not in video_scores]
    if missing:
      raise WstalError(f"{self.run.data_dir}: split {self.split!r}: evaluation saw no output for "
                       f"{len(missing)} video(s) (first index {missing[0]})")
    if cand_scores:
      found = postprocess.proposals_from_candidates(
          [video_scores[i] for i in index_V], cand_scores, cand_segments,
          config=self.pp_config, ambiguous=ambiguous)
    else:
      found = postprocess.proposals_for_videos(
          [video_scores[i] for i in index_V], cas, actionness, seconds_per_snippet=sps,
          durations=durations, config=self.pp_config, ambiguous=ambiguous,
          oic_scores=oic_scores or None)
    proposals = {self.infos[i].name: p for i, p in zip(index_V, found)}
    metrics = self._metrics(video_scores, proposals, num_c)
    for name, acc in sorted(frame_ious.items()):   # Ju et al. Table 3's pseudo-label quality
      fg, bg, both = acc.result()
      metrics[f"fg_mIoU_{name}"], metrics[f"bg_mIoU_{name}"] = _pct(fg), _pct(bg)
      metrics[f"mIoU_{name}"] = _pct(both)
    if self.run.config.eval.get("oracle_labels", False):
      metrics["oracle_labels"] = True   # ground-truth labels entered the predictions
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
    if self.protocol == "wtalc":
      pred = protocols.wtalc_predictions(pred, self.ambiguous, self.fps, self.snippet_frames)
    map_K, _ = metrics_lib.detection_map(self.gt, pred, self.tiou, num_classes=num_c)
    scores_NxC = np.stack([video_scores[int(i)] for i in self.video_indices])
    labels_NxC = np.stack([self.infos[int(i)].label for i in self.video_indices])
    out = {map_key(t): _pct(m) for t, m in zip(self.tiou, map_K)}
    out["average_mAP"] = _pct(np.mean(map_K))
    out["protocol"] = self.protocol
    out["acc"] = _pct(metrics_lib.top1_accuracy(scores_NxC, labels_NxC))
    out["cls_mAP"] = _pct(metrics_lib.classification_map(scores_NxC, labels_NxC))
    return out


def _pct(x) -> float | None:
  x = float(x)
  return None if math.isnan(x) else round(100.0 * x, 4)


def format_table(metrics: dict, tiou) -> str:
  """Two-line mAP table: thresholds then values, plus average, ACC and classification mAP."""
  return format_rows([("mAP(%)", metrics)], tiou)


def format_rows(rows, tiou) -> str:
  """One header line (thresholds, avg, ACC, cls_mAP) and one line per (label, metrics):
  e.g. the selected checkpoint, the last one and the best on test side by side."""
  keys = [map_key(float(t)) for t in tiou] + ["average_mAP", "acc", "cls_mAP"]
  heads = [f"{float(t):.2f}" for t in tiou] + ["avg", "ACC", "cls_mAP"]
  cells = [["-" if m.get(k) is None else f"{m[k]:.2f}" for k in keys] for _, m in rows]
  width = [max([len(h)] + [len(c[i]) for c in cells]) for i, h in enumerate(heads)]
  label_w = max([len("tIoU")] + [len(label) for label, _ in rows])
  lines = [f"{'tIoU':<{label_w}s} " + "  ".join(h.rjust(w) for h, w in zip(heads, width))]
  for (label, _), c in zip(rows, cells):
    lines.append(f"{label:<{label_w}s} " + "  ".join(v.rjust(w) for v, w in zip(c, width)))
  if any(m.get("oracle_labels") for _, m in rows):
    lines.append("ORACLE: ground-truth test labels entered the predictions "
                 "(config.eval.oracle_labels); a diagnostic, not a result")
  return "\n".join(lines)


def comparison_rows(content: dict) -> list:
  """(label, metrics) rows of a training run's metrics.json: the selected checkpoint, the
  last one, and (with held-out selection) the best on the test split."""
  rows = [(f"selected (step {content.get('step')}, on {content.get('selected_on')})", content)]
  last = content.get("last")
  if last:
    rows.append((f"last (step {last.get('step')})", last))
  best = content.get("best_on_test")
  if best and content.get("selected_on") != "test":
    rows.append((f"best on test (step {best.get('step')})", best))
  return rows


# ----------------------------------------------------------------------------- outputs


def write_outputs(out_dir: str, result: EvalResult, run: run_setup.Setup, *, extra: dict) -> dict:
  """Writes OUT/metrics.json (metrics + `extra`), OUT/results.json (ActivityNet format),
  OUT/plots/<video>.png and OUT/plots/scores.npz for the videos in result.scores.
  Only process 0 writes. Returns the metrics.json content."""
  content = dict(result.metrics)
  content.update(extra)
  if jax.process_index() != 0:
    return content
  tf.io.gfile.makedirs(out_dir)
  results_io.write_json_atomic(os.path.join(out_dir, "metrics.json"), content, indent=2)
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
  run_setup.validate_config(config)
  workdir = workdir_lib.absolute(workdir)
  out_dir = workdir_lib.absolute(eval_dir or workdir)
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  # The folder it writes to must not be a live run's (a training run's metrics.json).
  lock = (workdir_lib.RunLock(out_dir, what="evaluation", flag="--eval_dir")
          if jax.process_index() == 0 else contextlib.nullcontext())
  with lock:
    return _evaluate_checkpoint(config, ckpts, checkpoint, out_dir, method)


def _evaluate_checkpoint(config, ckpts, checkpoint, out_dir, method):
  run = run_setup.setup(config, method=method)
  step = ckpts.resolve(checkpoint)
  evaluator = Evaluator(run, split=config.eval.split)
  example = next(iter(evaluator.batches()))
  params = ckpts.restore_params(step, run.abstract_params(run.put_batch(example)))
  logging.info("evaluating checkpoint %s (step %d) on split %r (%d videos)", checkpoint, step,
               config.eval.split, evaluator.video_indices.size)
  result = evaluator(params, keep_scores=config.eval.num_plots)
  ckpt_metrics = ckpts.metrics(step) or {}
  extra = {"step": step, "selected_on": ckpt_metrics.get("selected_on", checkpoint),
           "checkpoint": str(checkpoint), "split": result.split,
           "num_videos": int(result.num_videos)}
  content = write_outputs(out_dir, result, run, extra=extra)
  if config.eval.get("export_proposals", "none") == "raw":
    export_raw_proposals(run, params, out_dir)
  ckpts.close()
  return content


def export_raw_proposals(run: run_setup.Setup, params, out_dir: str) -> dict[str, str]:
  """Writes OUT/proposals_<split>.json for every split of the dataset: the method's
  proposals before NMS (the post-processing preset with nms.method='none': every
  threshold's every region of every selected class, duplicates included), ActivityNet
  results format in seconds. A video with none gets one proposal spanning the whole video
  (score 0, class 0: proposal methods read only the segment; no label of the video is used),
  so that every video has candidates (`data.proposals` refuses a video without). Only
  process 0 writes. -> {split: path}."""
  paths = {}
  for split in run.manifest["splits"]:
    evaluator = Evaluator(run, split=split)
    evaluator.pp_config.nms.method = "none"
    result = evaluator(params)
    found, filled = {}, 0
    for i in evaluator.video_indices:
      info = evaluator.infos[int(i)]
      props = result.proposals[info.name]
      if not len(props):
        filled += 1
        props = postprocess.Proposals(np.zeros(1, np.int64), np.zeros(1), np.zeros(1),
                                      np.array([info.duration]))
      found[info.name] = props
    paths[split] = os.path.join(out_dir, f"proposals_{split}.json")
    if jax.process_index() == 0:
      tf.io.gfile.makedirs(out_dir)
      results_io.write_results(paths[split], found, run.classes)
    logging.info("raw proposals of %d %s videos (%d in all%s) -> %s", len(found), split,
                 sum(len(p) for p in found.values()),
                 f"; {filled} without any got the whole video" if filled else "", paths[split])
  return paths
