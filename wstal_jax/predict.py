r"""Run a trained model on your own feature files.

  python -m wstal_jax.predict --workdir=RUN [--checkpoint=best] --features=PATH \
      [--vlm_features=PATH] --out=DIR

PATH is one `<video>.npy` float32 [T, D], or a folder of them (`<video>.npy`; or the BaS-Net
layout's `rgb/<video>.npy` [+ `flow/<video>.npy`, concatenated as the converter does]). The
run's saved config gives the model, the feature streams, the seconds per snippet and the
post-processing; a method that reads a vision-language stream (VLPO, PVLR, Ju et al.) needs
`--vlm_features` (same layout; resampled linearly to the primary T when they differ by at most
2x, as the converter does). Writes DIR/results.json (ActivityNet format, seconds, the run's
class names), DIR/scores.npz (the per-video sequences, `wstal_jax.plots` reads it) and
DIR/plots/<video>.png. The proposals are those `--mode=eval` gives for the same features
(tested).

Bad input is one `error:` line naming the file: a width other than the run's, T = 0, NaN /
Inf, a missing VLM stream, a workdir without a checkpoint or config. Nothing is written then.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile

import numpy as np

from wstal_jax.errors import WstalError, cli_main


def _load_array(path: str, what: str) -> np.ndarray:
  try:
    arr = np.load(path, allow_pickle=False)
  except FileNotFoundError:
    raise WstalError(f"{path}: {what} not found") from None
  except (ValueError, OSError, EOFError) as e:
    raise WstalError(f"{path}: cannot read {what} ({type(e).__name__}: {e})") from None
  if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.floating):
    raise WstalError(f"{path}: {what} must be a float array [T, D], got {arr.dtype} "
                     f"{arr.shape}")
  if arr.shape[0] == 0:
    raise WstalError(f"{path}: {what} have T=0 snippets (empty video)")
  if not np.all(np.isfinite(arr)):
    raise WstalError(f"{path}: {what} contain NaN/Inf")
  return arr.astype(np.float32)


def find_features(path: str, what: str = "features") -> dict[str, list[str]]:
  """{video: [file, ...]} of a .npy file, a folder of <video>.npy, or a BaS-Net folder
  (rgb/ [+ flow/])."""
  if os.path.isfile(path):
    if not path.endswith(".npy"):
      raise WstalError(f"{path}: {what} must be a .npy file or a folder of <video>.npy")
    return {os.path.basename(path)[:-len(".npy")]: [path]}
  if not os.path.isdir(path):
    raise WstalError(f"{path}: {what} not found")
  streams = [s for s in ("rgb", "flow") if os.path.isdir(os.path.join(path, s))]
  if streams:
    per = {s: sorted(f[:-4] for f in os.listdir(os.path.join(path, s)) if f.endswith(".npy"))
           for s in streams}
    videos = per[streams[0]]
    for s in streams[1:]:
      if per[s] != videos:
        missing = sorted(set(videos) ^ set(per[s]))
        raise WstalError(f"{path}: rgb/ and {s}/ hold different videos (e.g. {missing[:3]})")
    found = {v: [os.path.join(path, s, f"{v}.npy") for s in streams] for v in videos}
  else:
    found = {f[:-4]: [os.path.join(path, f)] for f in sorted(os.listdir(path))
             if f.endswith(".npy")}
  if not found:
    raise WstalError(f"{path}: no <video>.npy {what} here")
  return found


def _load_video(files: list[str], what: str) -> np.ndarray:
  parts = [_load_array(f, what) for f in files]
  if len(parts) > 1 and parts[0].shape[0] != parts[1].shape[0]:
    raise WstalError(f"{files[0]}: T={parts[0].shape[0]} but {files[1]} has "
                     f"T={parts[1].shape[0]}")
  return np.concatenate(parts, axis=1) if len(parts) > 1 else parts[0]


def build_records(features: str, vlm_features: str | None, *, primary: str, vlm: str | None,
                  num_classes: int, seconds_per_snippet: float):
  """VideoRecords (no labels, no segments) of the user's files; checks the VLM stream."""
  from wstal_jax.data import convert
  from wstal_jax.data import format as fmt
  videos = find_features(features)
  if vlm and vlm_features is None:
    raise WstalError(f"--vlm_features is required: the run's method reads the {vlm!r} stream "
                     "as well as the primary one")
  if vlm_features is not None and not vlm:
    raise WstalError("--vlm_features was given but the run's method reads no VLM stream")
  if vlm_features is not None:
    vlm_files = (find_features(vlm_features, "VLM features")
                 if os.path.isdir(vlm_features) or len(videos) > 1
                 else {next(iter(videos)): [vlm_features]})
    missing = sorted(set(videos) - set(vlm_files))
    if missing:
      raise WstalError(f"{vlm_features}: no VLM features for {len(missing)} video(s), e.g. "
                       f"{missing[:3]}")
  records = []
  for name, files in videos.items():
    feat = _load_video(files, "features")
    feats = {primary: feat}
    source = " + ".join(files)
    if vlm_features is not None:
      vfile = vlm_files[name][0]
      vfeat = _load_array(vfile, "VLM features")
      if vfeat.shape[0] != feat.shape[0]:
        ratio = max(vfeat.shape[0], feat.shape[0]) / min(vfeat.shape[0], feat.shape[0])
        if ratio > convert._MAX_VLM_RATIO:
          raise WstalError(f"{vfile}: VLM features have T={vfeat.shape[0]} but {files[0]} has "
                           f"T={feat.shape[0]} (ratio {ratio:.2f} > 2)")
        vfeat = convert.resample_linear(vfeat, feat.shape[0])
      feats[vlm] = vfeat
      source += f"; {vfile}"
    records.append(fmt.VideoRecord(
        name=name, duration=feat.shape[0] * seconds_per_snippet, features=feats,
        label=np.zeros(num_classes, np.float32), source=source))
  return records


def predict(workdir: str, features: str, out: str, *, vlm_features: str | None = None,
            checkpoint: str = "best", overrides: dict | None = None) -> dict:
  """Proposals of the run's `checkpoint` for the user's features; writes OUT (see the module
  docstring). Returns {video: postprocess.Proposals}."""
  import jax
  from wstal_jax import checkpointing, evaluate, plots, results_io, run_setup
  from wstal_jax import workdir as workdir_lib
  from wstal_jax.data import format as fmt
  workdir = workdir_lib.absolute(workdir)
  config = workdir_lib.saved_config(workdir, overrides or {})
  ckpts = checkpointing.Checkpoints(os.path.join(workdir, "checkpoints"), read_only=True)
  step = ckpts.resolve(checkpoint)
  if config.data.get("proposals"):
    raise WstalError(f"{workdir}: the run's method scores candidate proposals "
                     "(config.data.proposals); predict takes features only — add proposals "
                     "with python -m wstal_jax.data.proposals and use --mode=eval")
  run = run_setup.setup(config)   # the training dataset: model, constants, classes
  primary, vlm = run.manifest["primary_feature"], config.data.vlm_feature
  dims = {primary: run.manifest["features"][primary]["dim"]}
  if vlm:
    dims[vlm] = run.manifest["features"][vlm]["dim"]
  records = build_records(features, vlm_features, primary=primary, vlm=vlm,
                          num_classes=len(run.classes), seconds_per_snippet=run.sps)
  with tempfile.TemporaryDirectory(prefix="wstal_predict_") as tmp:
    data_dir = os.path.join(tmp, "videos")
    manifest = fmt.write_dataset(
        data_dir, dataset="predict", classes=run.classes, feature_dims=dims,
        splits={"test": records}, num_shards=1, primary_feature=primary,
        snippet_frames=run.manifest["snippet_frames"], fps=run.manifest["fps"],
        source={"predict": features, "vlm_features": vlm_features})
    own = dataclasses.replace(run, data_dir=data_dir, manifest=manifest)
    evaluator = evaluate.Evaluator(own, split="test")
    example = next(iter(evaluator.batches()))
    params = ckpts.restore_params(step, run.abstract_params(run.put_batch(example)))
    result = evaluator(params, keep_scores=len(records))
  ckpts.close()
  if jax.process_index() == 0:
    os.makedirs(os.path.join(out, "plots"), exist_ok=True)
    results_io.write_results(os.path.join(out, "results.json"), result.proposals, run.classes,
                             external_data={"used": True, "details": f"{workdir} step {step}"})
    results_io.save_scores_npz(os.path.join(out, "scores.npz"), result.scores,
                               seconds_per_snippet=run.sps, class_names=run.classes)
    for rec in records:
      sc = result.scores[rec.name]
      plots.plot_video(os.path.join(out, "plots", f"{rec.name}.png"), name=rec.name,
                       seconds_per_snippet=sc["seconds_per_snippet"], class_names=run.classes,
                       cas_TxC=sc["cas"],
                       curves={"actionness": sc["actionness"]} if "actionness" in sc else None,
                       proposals=result.proposals[rec.name], duration=rec.duration)
  return result.proposals


def _parser():
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.predict",
      description="Proposals of a trained run on your own feature files (ActivityNet results "
                  "JSON, score arrays, one PNG per video).")
  p.add_argument("--workdir", required=True, help="the training run's folder")
  p.add_argument("--checkpoint", default="best", help="best, latest or a step")
  p.add_argument("--features", required=True,
                 help="one <video>.npy [T, D], or a folder of them (or rgb/ [+ flow/])")
  p.add_argument("--vlm_features", default=None,
                 help="the VLM stream, same layout (methods on vision-language features)")
  p.add_argument("--out", required=True, help="output folder")
  return p


@cli_main
def main(argv=None):
  args = _parser().parse_args(argv)
  from wstal_jax import compilation_cache, workdir as workdir_lib
  compilation_cache.enable(workdir_lib.saved_config(workdir_lib.absolute(args.workdir), {}))
  proposals = predict(args.workdir, args.features, args.out, vlm_features=args.vlm_features,
                      checkpoint=args.checkpoint)
  total = sum(len(p) for p in proposals.values())
  print(f"{len(proposals)} videos, {total} proposals")
  print(f"results: {os.path.join(args.out, 'results.json')} (ActivityNet format)")
  print(f"scores:  {os.path.join(args.out, 'scores.npz')}")
  print(f"plots:   {os.path.join(args.out, 'plots')}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
