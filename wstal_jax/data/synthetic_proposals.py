"""Candidate proposals of the built-in benchmark: what a weak localizer would hand P-MIL / SEAL.

Proposal-based methods score segments another model produced (the CO2-Net proposals of
THUMOS14 in the papers). The built-in benchmark has its own, so `configs/pmil.py` and
SEAL (issue 14, to come) run with no external file (the run logs that it uses them). They imitate
the *raw* multi-threshold proposals of a weakly supervised localizer (before NMS), made from
the annotations with the defects such proposals have, not from a trained model:

* an actionness sequence per video: every ground-truth instance as a box whose edges are
  jittered (N(0, 0.2 L) each) and whose amplitude varies (U(0.45, 1)), with, for one instance
  in three, a stretch inside it dropped to 0.15 (an incomplete detection: split proposals);
  plus background bumps (Poisson(T / 25) of them, 2-10 snippets wide, amplitude U(0.2, 0.8):
  false alarms) and smoothed noise (std 0.12); scaled to [0, 1] per video;
* regions of that sequence above each of the thresholds 0.1, 0.2, ..., 0.9 (nested, partly
  repeated segments), regions of one snippet dropped;
* each region listed once per class the localizer selected: the video's labelled classes,
  plus a wrong class with probability 0.3 (the duplicates of the CO2-Net files).

Seeded by (seed, split, video index) apart from the feature generator's streams: the features
and annotations are those of the plain benchmark, and the proposals are byte-identical for a
seed. They are added with `data.proposals.add_proposals` from results files written to a
temporary folder (the same path a user's files take).
"""
from __future__ import annotations

import json

from absl import logging
import numpy as np
import tensorflow as tf

from wstal_jax.data import format as fmt
from wstal_jax.data import proposals as proposals_lib
from wstal_jax.data import builtin_cache
from wstal_jax.data import synthetic

THRESHOLDS = tuple(np.round(np.arange(1, 10) / 10.0, 2))
_SPLIT_KEY = {"train": 1, "test": 2}
_WORLD = 97


def _regions(x_T, threshold):
  """[start, end) snippet runs of x_T > threshold, longer than one snippet."""
  above = np.concatenate([[False], x_T > threshold, [False]])
  edges = np.flatnonzero(above[1:] != above[:-1])
  runs = edges.reshape(-1, 2)
  return runs[runs[:, 1] - runs[:, 0] > 1]


def actionness(rng, num_t: int, segments_snip, num_bumps_per_t: float = 1 / 25):
  """The weak localizer's class-agnostic sequence in [0, 1] (module docstring)."""
  t = np.arange(num_t) + 0.5
  x = np.zeros(num_t)
  for s, e in segments_snip:
    length = max(e - s, 1.0)
    s2, e2 = s + rng.normal(0, 0.2 * length), e + rng.normal(0, 0.2 * length)
    box = ((t >= min(s2, e2)) & (t <= max(s2, e2))).astype(np.float64) * rng.uniform(0.45, 1.0)
    if rng.random() < 1 / 3 and length >= 4:
      gap = rng.uniform(s + 0.25 * length, e - 0.25 * length)
      box[(t >= gap - 0.1 * length) & (t <= gap + 0.1 * length)] *= 0.15
    x = np.maximum(x, box)
  for _ in range(int(rng.poisson(num_t * num_bumps_per_t))):
    c, w = rng.uniform(0, num_t), rng.uniform(2, 10)
    x = np.maximum(x, rng.uniform(0.2, 0.8) * np.exp(-0.5 * ((t - c) / (w / 2)) ** 2))
  noise = rng.normal(0, 0.12, num_t)
  noise = np.convolve(noise, np.ones(3) / np.sqrt(3), mode="same")
  x = x + noise
  lo, hi = x.min(), x.max()
  return (x - lo) / (hi - lo) if hi > lo else np.zeros(num_t)


def video_proposals(rng, info: fmt.VideoInfo, seconds_per_snippet: float, num_classes: int):
  """Results-format entries ({segment [s, e] seconds, label, score}) of one video."""
  seg = np.asarray(info.segments, np.float64).reshape(-1, 2) / seconds_per_snippet
  x = actionness(rng, info.num_snippets, seg)
  labelled = [int(c) for c in np.flatnonzero(info.label)]
  chosen = list(labelled)
  others = [c for c in range(num_classes) if c not in labelled]
  if others and rng.random() < 0.3:
    chosen.append(int(rng.choice(others)))
  out = []
  for threshold in THRESHOLDS:
    for s, e in _regions(x, threshold):
      score = float(np.mean(x[s:e]))
      for c in chosen:
        out.append({"segment": [round(s * seconds_per_snippet, 2),
                                round(e * seconds_per_snippet, 2)],
                    "label": int(c), "score": round(score, 4)})
  if not out:
    out.append({"segment": [0.0, round(info.num_snippets * seconds_per_snippet, 2)],
                "label": 0, "score": 0.0})
  return out


def write_sources(out_dir: str, data_dir: str, seed: int) -> dict[str, str]:
  """Writes proposals_<split>.json (ActivityNet results format) for the plain benchmark at
  data_dir into out_dir; returns {split: path}."""
  manifest = fmt.read_manifest(data_dir)
  sps = fmt.seconds_per_snippet(manifest)
  classes = manifest["classes"]
  tf.io.gfile.makedirs(out_dir)
  paths = {}
  for split in manifest["splits"]:
    results = {}
    for info in fmt.read_video_info(data_dir, split):
      rng = np.random.default_rng([seed, _WORLD, _SPLIT_KEY.get(split, 3), info.index])
      entries = video_proposals(rng, info, sps, len(classes))
      for p in entries:
        p["label"] = classes[p["label"]]
      results[info.name] = entries
    paths[split] = f"{out_dir}/proposals_{split}.json"
    with tf.io.gfile.GFile(paths[split], "w") as fh:
      fh.write(json.dumps({"version": "VERSION 1.3", "results": results,
                           "external_data": {"used": False, "details": ""}},
                          sort_keys=True) + "\n")
  return paths


def ensure_builtin(size: str, seed: int = 0, cache_dir: str | None = None) -> str:
  """The built-in benchmark with candidate proposals (cache_dir/<name>-proposals), generated
  on first use next to the plain one (`builtin_cache.ensure_builtin`)."""
  plain = builtin_cache.ensure_builtin(size, seed=seed, cache_dir=cache_dir)
  logging.info("candidate proposals: the built-in benchmark's synthetic weak-localizer "
               "proposals (from the annotations, no trained model; data/synthetic_proposals.py)")

  def add(sources, target):
    proposals_lib.add_proposals(plain, target, write_sources(sources, plain, seed),
                                provenance=f"synthetic_proposals {size} seed {seed}")

  return builtin_cache.ensure_derived(plain, "proposals", add)
