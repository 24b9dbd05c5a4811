"""python -m wstal_jax.sweep: one tiny config over two seeds, resumed, summarised."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from test_train_cli import TINY, _write_vlpo_dataset

ROOT = pathlib.Path(__file__).resolve().parent.parent


def _sweep(args, cwd):
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="", WSTAL_DATA_CACHE=str(cwd),
             JAX_COMPILATION_CACHE_DIR=str(cwd / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  return subprocess.run([sys.executable, "-m", "wstal_jax.sweep", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=900)


def test_two_seeds_resume_and_summary(tmp_path):
  data = _write_vlpo_dataset(tmp_path / "data")
  out = tmp_path / "sweep"
  args = [f"--config={ROOT / 'configs' / 'vlpo.py'}", "--seeds=0,1", f"--workdir={out}",
          f"--config.data.dir={data}", *TINY]
  proc = _sweep(args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-2000:]
  runs = {s: json.loads((out / f"seed{s}" / "metrics.json").read_text()) for s in (0, 1)}
  for s in (0, 1):
    config = json.loads((out / f"seed{s}" / "config.json").read_text())
    assert config["seed"] == s and config["data"]["builtin_seed"] == s
  summary = json.loads((out / "summary.json").read_text())
  for key, get in (("average_mAP", lambda m: m["average_mAP"]),
                   ("mAP@0.50", lambda m: m["mAP@0.50"])):
    vals = [get(runs[0]), get(runs[1])]
    assert summary[key]["values"] == vals and summary[key]["seeds"] == [0, 1]
    assert summary[key]["mean"] == pytest.approx(np.mean(vals))
    assert summary[key]["std"] == pytest.approx(np.std(vals, ddof=1))
  last = [runs[0]["last"]["average_mAP"], runs[1]["last"]["average_mAP"]]
  assert summary["last"]["average_mAP"]["values"] == last
  assert summary["last"]["average_mAP"]["mean"] == pytest.approx(np.mean(last))
  table = (out / "summary.md").read_text()
  assert "| avg mAP |" in table and "best on test" in table and "last" in table
  assert table.strip() in proc.stdout

  # Resume: a finished seed is not run again (its log and metrics are untouched); a run
  # from before metrics.json had `last` gets it from its latest checkpoint.
  stamp = {s: (out / f"seed{s}" / "log.txt").stat().st_mtime_ns for s in (0, 1)}
  old = dict(runs[1])
  old.pop("last")
  (out / "seed1" / "metrics.json").write_text(json.dumps(old))
  proc = _sweep(args, tmp_path)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert {s: (out / f"seed{s}" / "log.txt").stat().st_mtime_ns for s in (0, 1)} == stamp
  evaluated = json.loads((out / "seed1" / "last" / "metrics.json").read_text())
  assert evaluated["step"] == runs[1]["last"]["step"]
  assert evaluated["average_mAP"] == pytest.approx(runs[1]["last"]["average_mAP"], abs=1e-3)
  again = json.loads((out / "summary.json").read_text())
  assert again["last"]["average_mAP"]["values"][1] == pytest.approx(last[1], abs=1e-3)


def test_bad_arguments_are_one_error(tmp_path):
  for args, message in (
      (["--config=configs/vlpo.py", "--seeds=0,x", f"--workdir={tmp_path}"], "--seeds"),
      (["--config=configs/vlpo.py", "--seeds=0", f"--workdir={tmp_path}", "--config.seed=3"],
       "the seed comes from --seeds"),
      (["--config=configs/vlpo.py", "--seeds=0", f"--workdir={tmp_path}", "extra"],
       "unexpected arguments")):
    proc = _sweep(args, ROOT)
    assert proc.returncode == 2 and message in proc.stderr and "Traceback" not in proc.stderr
  # A run that fails names its error line and its log.
  proc = _sweep(["--config=configs/vlpo.py", "--seeds=0", f"--workdir={tmp_path / 's'}",
                 "--config.train.num_stepz=1"], ROOT)
  assert proc.returncode == 2
  assert "the run failed (error: --config.train.num_stepz: no such field" in proc.stderr
  assert str(tmp_path / "s" / "seed0" / "log.txt") in proc.stderr
