r"""The candidate-proposal pipeline end to end on THUMOS14's real files, with generated features.

What it runs (every step a user's command):
  1. W-TALC-format features for THUMOS14's 412 videos (`Thumos14reduced-I3D-JOINTFeatures.npy`
     layout: one float32 [T, 2048] array per video, T = floor(duration x 25 / 16)), GENERATED:
     |N(0, 1)| noise plus a class direction inside the ground-truth instances, so the numbers
     mean nothing beyond "the pipeline runs"; no I3D features are available here.
  2. python -m wstal_jax.data.convert --format=wtalc (the real annotations)
  3. python -m wstal_jax.data.proposals with the real CO2-Net proposal files (SEAL's P_w,
     Table 6; P-MIL's released training proposals)
  4. python -m wstal_jax.main --config=configs/<method>.py:dataset=thumos14 for a few steps at
     the THUMOS14 shapes (T = 2304, up to 1,000 proposals a training video, every proposal of
     every test video at evaluation), then evaluation of the 212 test videos.

  python benchmarks/thumos14_proposals_run.py --work=/tmp/t14p [--method=seal] [--steps=20]

Prints the steps' wall times and the metrics; exits non-zero if any step fails.
"""
import argparse
import json
import os
import subprocess
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARED = os.path.join(os.path.dirname(ROOT), "shared", "data", "thumos14")


def generate_features(ann_dir: str, path: str, seed: int = 0) -> int:
  """Writes the generated W-TALC feature file; returns the number of snippets."""
  rng = np.random.default_rng(seed)
  load = lambda name: np.load(os.path.join(ann_dir, f"{name}.npy"), allow_pickle=True)
  durations = np.asarray(load("duration"), np.float64).reshape(-1)
  segments, labels = load("segments"), load("labels")
  classes = [c.decode() if isinstance(c, bytes) else str(c) for c in load("classlist")]
  direction = rng.standard_normal((len(classes), 2048)).astype(np.float32)
  arrays = np.empty(len(durations), dtype=object)
  for i, duration in enumerate(durations):
    num_t = max(int(np.floor(float(duration) * 25 / 16)), 1)
    x = np.abs(rng.standard_normal((num_t, 2048), dtype=np.float32))
    for (start, end), label in zip(segments[i], labels[i]):
      lo, hi = int(start * 25 / 16), int(np.ceil(end * 25 / 16))
      x[max(lo, 0):min(hi, num_t)] += direction[classes.index(str(label))]
    arrays[i] = x
  np.save(path, arrays, allow_pickle=True)
  return int(sum(len(a) for a in arrays))


def run(cmd, log):
  t0 = time.time()
  env = dict(os.environ, PYTHONPATH=ROOT)
  out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
  with open(log, "w") as f:
    f.write(out.stdout + out.stderr)
  if out.returncode:
    sys.exit(f"failed ({out.returncode}): {' '.join(cmd)}\n{(out.stdout + out.stderr)[-3000:]}")
  return time.time() - t0


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--work", required=True, help="scratch directory (features, shards, run)")
  p.add_argument("--method", default="seal", choices=("seal", "pmil"))
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--shared", default=SHARED, help="../shared/data/thumos14")
  args = p.parse_args()
  os.makedirs(args.work, exist_ok=True)
  ann = os.path.join(args.shared, "Thumos14reduced-Annotations")
  props = os.path.join(args.shared, "proposals_co2net")
  feats = os.path.join(args.work, "Thumos14reduced-I3D-JOINTFeatures.npy")
  plain, data = os.path.join(args.work, "plain"), os.path.join(args.work, "data")
  workdir = os.path.join(args.work, f"run_{args.method}")
  times = {}
  if not os.path.exists(feats):
    t0 = time.time()
    snippets = generate_features(ann, feats)
    times["generate features"] = time.time() - t0
    print(f"generated {snippets} snippets of 2048-d features", flush=True)
  py = sys.executable
  if not os.path.exists(plain):
    times["convert"] = run([py, "-m", "wstal_jax.data.convert", "--format=wtalc",
                            f"--features={feats}", f"--annotations={ann}", f"--out={plain}"],
                           os.path.join(args.work, "convert.log"))
  if not os.path.exists(data):
    times["add proposals"] = run(
        [py, "-m", "wstal_jax.data.proposals", f"--data_dir={plain}",
         f"--train={os.path.join(props, 'detection_result_base_train.json')}",
         f"--test={os.path.join(props, 'detection_result_base_test.json')}", f"--out={data}"],
        os.path.join(args.work, "proposals.log"))
  times["train + evaluate"] = run(
      [py, "-m", "wstal_jax.main", f"--config=configs/{args.method}.py:dataset=thumos14",
       f"--config.data.dir={data}", f"--workdir={workdir}",
       f"--config.train.num_steps={args.steps}", f"--config.train.eval_every={args.steps}",
       f"--config.train.log_every={max(args.steps // 4, 1)}",
       f"--config.train.checkpoint_every={args.steps}"],
      os.path.join(args.work, f"train_{args.method}.log"))
  metrics = json.load(open(os.path.join(workdir, "metrics.json")))
  for name, seconds in times.items():
    print(f"{name:20s} {seconds:8.1f} s")
  print(json.dumps(metrics, indent=1))


if __name__ == "__main__":
  main()
