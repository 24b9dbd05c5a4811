"""Per-video plots: a real PNG from the function and from the command."""
import json
import pathlib
import subprocess
import sys

import numpy as np

from wstal_jax import plots
from wstal_jax import postprocess as pp
from wstal_jax import results_io

ROOT = pathlib.Path(__file__).resolve().parent.parent
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASSES = ["BaseballPitch", "CliffDiving", "HighJump"]


def scores(t=200, seed=0):
  rng = np.random.default_rng(seed)
  cas = 0.1 * rng.random((t, 3))
  act = 0.1 * rng.random(t)
  for s, e in ((20, 50), (120, 160)):
    cas[s:e, 1] += 0.8
    act[s:e] += 0.8
  return cas, act


def assert_png(path, min_kb=10):
  data = pathlib.Path(path).read_bytes()
  assert data[:8] == PNG_SIGNATURE
  assert len(data) > min_kb * 1024, len(data)


def test_plot_video_writes_png(tmp_path):
  cas, act = scores()
  props = pp.video_proposals(np.array([0.05, 0.9, 0.05]), cas, act, seconds_per_snippet=0.64,
                             duration=200 * 0.64, config=pp.get_preset("co2net"))
  out = plots.plot_video(str(tmp_path / "v.png"), name="video_a", seconds_per_snippet=0.64,
                         class_names=CLASSES, cas_TxC=cas, curves={"actionness": act},
                         gt_segments=[(12.8, 32.0, "CliffDiving"), (76.8, 102.4, 1)],
                         proposals=props)
  assert out == str(tmp_path / "v.png")
  assert_png(out)
  assert sorted(p.name for p in tmp_path.iterdir()) == ["v.png"]  # atomic: no temp left


def test_plots_cli(tmp_path):
  cas, act = scores()
  npz = tmp_path / "scores.npz"
  results_io.save_scores_npz(str(npz), {"video_a": {"cas": cas, "actionness": act},
                                        "video_b": {"cas": cas[:100]}},
                             seconds_per_snippet=0.64, class_names=CLASSES)
  gt = tmp_path / "gt.json"
  gt.write_text(json.dumps({"database": {"video_a": {"subset": "test", "annotations": [
      {"segment": ["12.8", "32.0"], "label": "CliffDiving"}]}}}))
  res = tmp_path / "res.json"
  results_io.write_results(str(res), {"video_a": pp.Proposals(
      np.array([1]), np.array([0.8]), np.array([12.0]), np.array([33.0]))}, CLASSES)
  out = tmp_path / "figs"
  p = subprocess.run([sys.executable, "-m", "wstal_jax.plots", f"--results={res}",
                      f"--scores={npz}", f"--ground_truth={gt}", "--videos=video_a,video_b",
                      f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert p.returncode == 0, p.stderr
  assert_png(out / "video_a.png")
  assert_png(out / "video_b.png")
  p = subprocess.run([sys.executable, "-m", "wstal_jax.plots", f"--scores={npz}",
                      "--videos=video_zzz", f"--out={out}"], cwd=ROOT, capture_output=True,
                     text=True, timeout=60)
  assert p.returncode == 2 and str(npz) in p.stderr and "video_zzz" in p.stderr
  assert "Traceback" not in p.stderr
