"""Candidate proposals (the inputs of proposal-based methods: P-MIL, SEAL) as a per-video
field of a dataset.

Proposal-based methods score candidate segments that another model produced. They come as
ActivityNet-format results files, one per split, in seconds (the CO2-Net proposals P-MIL and
SEAL use: `detection_result_base_{train,test}.json`; any method of this codebase exports its
own with `--mode=eval --config.eval.export_proposals=raw`):

  {"results": {"<video>": [{"segment": [start_s, end_s], "label": str, "score": float}, ...]}}

`add_proposals` writes a copy of a dataset with, per video of the given splits, the field
`extra/proposals`: float32 little-endian raw bytes, [M, 2] (start, end) in *snippet units*
(seconds / seconds_per_snippet), clipped to [0, T] of the video; and the artefact
'proposals' ({"counts": {split: [M per video index]}, "dedupe": bool}: evaluation pads each
batch's proposals to a length bucket from these). Only the segment is kept:
label and score are the producing model's and are not inputs of the proposal methods.

Choices (P-MIL's released loader in parentheses):
* Duplicates are kept by default (as P-MIL: the same segment listed for several classes
  stays several rows, about a third of the CO2-Net train segments and half of the test
  ones); `dedupe=True` keeps the first of identical segments. Kept because the duplicate
  rows are part of what the published numbers were trained and scored on; a duplicate
  changes the top-k MIL pooling over proposals (it can fill several of the k slots).
* Clipping: each segment is clipped to [0, T] snippets of the feature sequence; a segment
  that is empty after clipping (it lies past the end of the features) is dropped and counted
  in the log. (P-MIL relies on the files being inside the video.)
* A video with no proposal is an error naming the file and the video (P-MIL inserts a
  [0, 0] placeholder row, a zero-length segment that its RoI pooling reads as the features
  around snippet 0 and trains on as if it were a candidate). Every video of the split must be
  in its file; the export writes at least one segment per video (the whole video when the
  producing method finds nothing).
* The cap on proposals per training video (P-MIL: 1,000, random subsample) is the input
  pipeline's (`config.data.max_proposals`), so the stored field always holds all of them.

Errors (one line naming the file and the video; nothing is written): not a results file,
a segment that is not two finite numbers or ends before it starts, a video of the file not
in the dataset's split, a video of the split missing from the file or with no proposals.

  python -m wstal_jax.data.proposals --data_dir=thumos14_shards \\
      --train=detection_result_base_train.json --test=detection_result_base_test.json \\
      --out=thumos14_shards_proposals
"""
from __future__ import annotations

import argparse
import sys
from typing import Mapping

from absl import logging
import numpy as np

from wstal_jax import results_io
from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError, cli_main

FIELD = "proposals"


def encode(segments_Mx2) -> bytes:
  return np.ascontiguousarray(segments_Mx2, dtype="<f4").tobytes()


def decode(raw: bytes) -> np.ndarray:
  """float32 [M, 2] snippet units."""
  return np.frombuffer(raw, dtype="<f4").reshape(-1, 2)


def read_file(path: str) -> dict[str, np.ndarray]:
  """{video: float64 [N, 2] seconds} of a results-format file, in file order (WstalError
  naming the file and the entry for anything malformed)."""
  res = results_io.load_json(path)
  if not isinstance(res, Mapping) or not isinstance(res.get("results"), Mapping):
    raise WstalError(f"{path}: expected an object with a 'results' object "
                     "(ActivityNet detection results format)")
  out = {}
  for vid, preds in res["results"].items():
    where = f"{path}: results[{vid!r}]"
    if not isinstance(preds, list):
      raise WstalError(f"{where}: expected a list of proposals")
    segs = []
    for i, p in enumerate(preds):
      if not isinstance(p, Mapping) or "segment" not in p:
        raise WstalError(f"{where}[{i}]: expected an object with a 'segment'")
      segs.append(results_io.segment(p["segment"], f"{where}[{i}].segment"))
    out[str(vid)] = np.asarray(segs, np.float64).reshape(-1, 2)
  return out


def to_snippets(segments_sec_Nx2, seconds_per_snippet: float, num_snippets: int,
                dedupe: bool = False) -> tuple[np.ndarray, int]:
  """Segments in seconds -> (float32 [M, 2] snippet units clipped to [0, num_snippets],
  number dropped for being empty after clipping). dedupe: keep the first of identical
  segments (compared in snippet units after clipping)."""
  seg = np.asarray(segments_sec_Nx2, np.float64) / float(seconds_per_snippet)
  seg = np.clip(seg, 0.0, float(num_snippets)).astype(np.float32)
  keep = seg[:, 1] > seg[:, 0]
  dropped = int(np.sum(~keep))
  seg = seg[keep]
  if dedupe and len(seg):
    _, first = np.unique(seg, axis=0, return_index=True)
    seg = seg[np.sort(first)]
  return seg, dropped


def add_proposals(data_dir: str, out: str, files: Mapping[str, str], *, dedupe: bool = False,
                  overwrite: bool = False, provenance: str | None = None) -> dict:
  """Writes `out`: the dataset at `data_dir` plus `extra/proposals` for every video of the
  splits in `files` ({split: results file}). Returns the new manifest."""
  manifest = fmt.read_manifest(data_dir)
  sps = fmt.seconds_per_snippet(manifest)
  extras, stats, counts_by_split = {}, [], {}
  for split, path in files.items():
    if split not in manifest["splits"]:
      raise WstalError(f"{data_dir}: no split {split!r} to add {path} to (splits: "
                       f"{sorted(manifest['splits'])})")
    infos = {v.name: v for v in fmt.read_video_info(data_dir, split)}
    segments = read_file(path)
    unknown = [v for v in segments if v not in infos]
    if unknown:
      raise WstalError(f"{path}: video {unknown[0]!r} is not in the {split} split of "
                       f"{data_dir}" + (f" (and {len(unknown) - 1} more)"
                                        if len(unknown) > 1 else ""))
    missing = [v for v in infos if v not in segments]
    if missing:
      raise WstalError(f"{path}: no proposals for {split} video {missing[0]!r}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    num_m, dropped_total, dup_total = [], 0, 0
    for name, info in infos.items():
      seg, dropped = to_snippets(segments[name], sps, info.num_snippets, dedupe)
      if not len(seg):
        raise WstalError(f"{path}: {split} video {name!r} has no proposals"
                         + (f" inside its {info.num_snippets} snippets ({dropped} lie past "
                            "the end of its features)" if dropped else ""))
      dropped_total += dropped
      dup_total += len(seg) - len(np.unique(seg, axis=0))
      num_m.append(len(seg))
      extras[name] = {FIELD: encode(seg)}
    stats.append((split, len(num_m), int(np.sum(num_m)), int(np.max(num_m)), dropped_total,
                  dup_total))
    counts_by_split[split] = [int(c) for c in num_m]
  for split, n, total, most, dropped, dups in stats:
    logging.info("proposals: %s: %d videos, %d proposals (at most %d a video; %d identical "
                 "to an earlier one of their video, %s), %d dropped as empty after clipping",
                 split, n, total, most, dups, "removed" if dedupe else "kept", dropped)
  source = {f"proposals_{s}": provenance or str(p) for s, p in files.items()}
  old = fmt.load_aux(data_dir, FIELD, manifest) or {"counts": {}}
  aux = {"counts": dict(old["counts"], **counts_by_split), "dedupe": bool(dedupe)}
  return fmt.copy_with_extras(data_dir, out, extras, source=source, aux={FIELD: aux},
                              overwrite=overwrite)


def counts(data_dir: str, split: str, manifest: dict | None = None) -> np.ndarray:
  """Proposals of each video of `split` (by video index), from the dataset's 'proposals'
  artefact; WstalError when the split has none."""
  aux = fmt.load_aux(data_dir, FIELD, manifest)
  if aux is None or split not in aux.get("counts", {}):
    raise WstalError(f"{data_dir}: the {split} split has no candidate proposals (add them "
                     "with python -m wstal_jax.data.proposals)")
  return np.asarray(aux["counts"][split], np.int64)


def load(info: fmt.VideoInfo) -> np.ndarray | None:
  """A video's stored proposals, float32 [M, 2] snippets (None when it has none)."""
  raw = info.extras.get(FIELD)
  return None if raw is None else decode(raw)


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.data.proposals",
      description="Add candidate proposals (ActivityNet-format results files in seconds, one "
                  "per split) to a wstal_jax dataset; writes a new dataset directory.")
  p.add_argument("--data_dir", required=True, help="the dataset DIR (manifest.json + shards)")
  p.add_argument("--train", help="results FILE with the training videos' proposals")
  p.add_argument("--test", help="results FILE with the test videos' proposals")
  p.add_argument("--out", required=True, help="dataset DIR to create (must not exist)")
  p.add_argument("--dedupe", action="store_true",
                 help="keep one of identical segments of a video (default: keep all, as P-MIL)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out once the new dataset is complete")
  args = p.parse_args(argv)
  files = {s: f for s, f in (("train", args.train), ("test", args.test)) if f}
  if not files:
    p.error("give --train and / or --test")
  logging.set_verbosity(logging.INFO)
  add_proposals(args.data_dir, args.out, files, dedupe=args.dedupe, overwrite=args.overwrite)
  print(f"wrote {args.out}: proposals for {', '.join(files)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
