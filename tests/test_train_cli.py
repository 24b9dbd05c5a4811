"""The command line: `python -m wstal_jax.main` with the real configs and VLPO on tiny data.

Runs from a directory outside the repository with an absolute --config path, as a user of an
installed package would.
"""
import glob
import json
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from wstal_jax.data import format as data_format

ROOT = pathlib.Path(__file__).resolve().parent.parent
NUM_CLASSES, DIM, VLM_DIM = 3, 8, 8


def _write_vlpo_dataset(out_dir):
  """i3d + videoclip features and text embeddings, as VLPO needs."""
  rng = np.random.default_rng(1)
  text = rng.normal(size=(NUM_CLASSES, VLM_DIM)).astype(np.float32)
  text /= np.linalg.norm(text, axis=1, keepdims=True)
  splits = {}
  for split, n in (("train", 8), ("test", 4)):
    videos = []
    for i in range(n):
      num_t, cls = int(rng.integers(10, 30)), i % NUM_CLASSES
      i3d = rng.normal(size=(num_t, DIM)).astype(np.float32)
      vlm = rng.normal(size=(num_t, VLM_DIM)).astype(np.float32)
      i3d[2:8, cls] += 2.0
      vlm[2:8] += text[cls]
      label = np.eye(NUM_CLASSES, dtype=np.float32)[cls]
      videos.append(data_format.VideoRecord(
          name=f"{split}_{i}", duration=num_t * 0.64, features={"i3d": i3d, "videoclip": vlm},
          label=label, segments=np.array([[2 * 0.64, 8 * 0.64]], np.float32),
          segment_labels=np.array([cls], np.int32)))
    splits[split] = videos
  data_format.write_dataset(str(out_dir), dataset="tiny", classes=["a", "b", "c"],
                            feature_dims={"i3d": DIM, "videoclip": VLM_DIM}, splits=splits,
                            num_shards=1, text_embeddings=text)
  return str(out_dir)


def _main(args, cwd, **env_vars):
  # One device; a shared persistent compilation cache lets the eval run reuse the train run's
  # compiled predict function.
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="", WSTAL_DATA_CACHE=str(cwd),
             JAX_COMPILATION_CACHE_DIR=str(cwd / "jax_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_vars)
  return subprocess.run([sys.executable, "-m", "wstal_jax.main", *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=600)


TINY = ["--config.train.num_steps=2", "--config.train.eval_every=2", "--config.train.log_every=1",
        "--config.data.num_snippets=16", "--config.train.batch_size=4",
        "--config.eval.batch_size=4", "--config.vlpo.embed_dim=8",
        "--config.vlpo.act_hidden_dim=8", "--config.eval.num_plots=1",
        "--config.eval.postprocess.upsample=1"]


def test_train_then_eval_from_another_directory(tmp_path):
  data = _write_vlpo_dataset(tmp_path / "data")
  workdir = tmp_path / "run"
  config = f"--config={ROOT / 'configs' / 'vlpo.py'}"
  proc = _main([config, f"--config.data.dir={data}", f"--workdir={workdir}", *TINY], tmp_path)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "Traceback" not in proc.stderr
  metrics = json.loads((workdir / "metrics.json").read_text())
  keys = {"mAP@0.10", "mAP@0.20", "mAP@0.30", "mAP@0.40", "mAP@0.50", "mAP@0.60", "mAP@0.70",
          "average_mAP", "acc", "cls_mAP", "step", "selected_on"}
  assert keys <= set(metrics)
  assert metrics["step"] == 2 and metrics["selected_on"] == "test"
  results = json.loads((workdir / "results.json").read_text())
  assert set(results) == {"version", "results", "external_data"}
  assert set(results["results"]) == {f"test_{i}" for i in range(4)}
  for rows in results["results"].values():
    for row in rows:
      assert row["label"] in ("a", "b", "c") and len(row["segment"]) == 2
      assert row["segment"][0] <= row["segment"][1]
  assert glob.glob(str(workdir / "plots" / "*.png"))
  assert glob.glob(str(workdir / "tensorboard" / "events.out.tfevents.*"))
  assert json.loads((workdir / "config.json").read_text())["method"] == "vlpo"
  assert "average_mAP" not in proc.stdout and "avg" in proc.stdout   # the printed table
  assert str(workdir / "results.json") in proc.stdout

  # --mode=eval reads the run's config.json; --config.x overrides apply on top.
  eval_dir = tmp_path / "eval"
  eval_args = ["--mode=eval", f"--workdir={workdir}", "--checkpoint=latest",
               "--config.eval.num_plots=2"]
  proc = _main([*eval_args, f"--eval_dir={eval_dir}"], tmp_path, PYTHONHASHSEED="1")
  assert proc.returncode == 0, proc.stderr[-4000:]
  again = json.loads((eval_dir / "metrics.json").read_text())
  for key in keys - {"selected_on"}:
    assert again[key] == metrics[key], key
  assert (eval_dir / "results.json").exists()
  assert len(glob.glob(str(eval_dir / "plots" / "*.png"))) == 2

  # The same evaluation in another process (another hash seed, seconds later) writes the same
  # bytes: metrics, results, scores and plots.
  proc = _main([*eval_args, f"--eval_dir={tmp_path / 'eval2'}"], tmp_path, PYTHONHASHSEED="2")
  assert proc.returncode == 0, proc.stderr[-4000:]
  written = sorted(str(p.relative_to(eval_dir)) for p in eval_dir.rglob("*") if p.is_file())
  assert {"metrics.json", "results.json", "plots/scores.npz"} <= set(written)
  assert written == sorted(str(p.relative_to(tmp_path / "eval2"))
                           for p in (tmp_path / "eval2").rglob("*") if p.is_file())
  for name in written:
    assert (eval_dir / name).read_bytes() == (tmp_path / "eval2" / name).read_bytes(), name
  assert (eval_dir / "plots" / "scores.npz").exists()


_VLPO = str(ROOT / "configs" / "vlpo.py")


def _write(path, text):
  path.write_text(text)
  return str(path)


@pytest.mark.parametrize("args, message", [
    (["--config.eval.select_on=bogus"], "error: config.eval.select_on: must be 'test' or"),
    ([f"--config={_VLPO}:dataset=nope"], "unknown dataset 'nope'"),
    ([f"--config={_VLPO}:runlocal"], f"error: --config={_VLPO}:runlocal: unknown config argument"),
    # An override of a field the config lacks (here the flag's default config, vlpo's: an
    # evaluation whose workdir holds no run), and typos in a method block and a common block.
    (["--mode=eval", "--config.ju2023.fusion=vlp"],
     "error: --config.ju2023.fusion: no such field; without --config the fields are those of"),
    ([f"--config={_VLPO}", "--config.vlpo.bogus=1"], "error: --config.vlpo.bogus: no such field"),
    ([f"--config={_VLPO}", "--config.train.num_stepz=5"],
     "error: --config.train.num_stepz: no such field (did you mean num_steps?)\n"),
    (["--config.trian.num_steps=5"], "error: --config.trian.num_steps: no such field (did you "
                                     "mean train?)"),
    # Wrong types, and values the validation rejects.
    (["--config.train.num_steps=1.5"], "error: --config.train.num_steps=1.5: expected an integer"),
    (["--config.optim.lr=fast"], "error: --config.optim.lr=fast: expected a number"),
    (["--config.eval.tiou=abc"], "error: config.eval.tiou: needs a tuple of thresholds"),
    (["--config.data.dataset=thumos15"], "error: config.data.dataset: must be one of builtin,"),
    (["--config.data.sampling=rndom"], "error: config.data.sampling: must be one of random_perturb"),
    (["--mode=evaluate"], "error: --mode=evaluate: value should be one of <train|eval|compile>"),
    # --config pointing at something that is not a config file.
    ([f"--config={ROOT / 'setup.cfg'}"], "setup.cfg: not a Python config file (line "),
    (["--config=NOCONFIG"], "NOCONFIG: not a config file (it defines no get_config())"),
    (["--config=RETURNS_INT"],
     "RETURNS_INT: get_config() does not return an ml_collections.ConfigDict"),
])
def test_bad_config_value_is_an_error_not_a_traceback(tmp_path, args, message):
  files = {"NOCONFIG": _write(tmp_path / "notes.py", "x = 1\n"),
           "RETURNS_INT": _write(tmp_path / "five.py", "def get_config():\n  return 5\n")}
  args = [a.replace(k, v) for a in args for k, v in [next(
      ((k, v) for k, v in files.items() if k in a), ("", ""))]]
  message = next((message.replace(k, v) for k, v in files.items() if k in message), message)
  proc = _main([*args, f"--workdir={tmp_path / 'w'}", "--config.data.dir=/nonexistent"],
               tmp_path)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert message in proc.stderr, proc.stderr[-3000:]
  # One error line, and it does not start with a Python exception name.
  errors = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1, proc.stderr[-3000:]
  assert not re.match(r"error: \w*(Error|Exception)\b", errors[0]), errors[0]
  assert not (tmp_path / "w" / "metrics.json").exists()


def test_start_up_prints_no_tensorflow_native_logging(tmp_path):
  """Without TF_CPP_MIN_LOG_LEVEL in the environment, a command that imports tensorflow prints
  only our own lines: no oneDNN notice, no absl pre-initialisation warning, no CPU feature
  guard; the same with the user's own TF_CPP_MIN_LOG_LEVEL=2, which is left as it is."""
  env = {k: v for k, v in os.environ.items()
         if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "JAX_PLATFORMS")}
  env.update(PYTHONPATH=str(ROOT), XLA_FLAGS="")
  for user_level in (None, "2"):
    if user_level:
      env["TF_CPP_MIN_LOG_LEVEL"] = user_level
    proc = subprocess.run(
        [sys.executable, "-m", "wstal_jax.main", f"--config={_VLPO}",
         "--config.data.dir=/nonexistent", f"--workdir={tmp_path / 'w'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "/nonexistent/manifest.json: not found" in proc.stderr
    # (where libtpu is installed, no TPU runtime is started either: wstal_jax.__init__)
    for noise in ("oneDNN", "absl::InitializeLog", "cpu_feature_guard", "libtpu", "TPU"):
      assert noise not in proc.stderr, proc.stderr
  env.pop("TF_CPP_MIN_LOG_LEVEL")
  # The library itself (an import, as in a notebook) does not change TF's logging settings
  # (jax's own import sets TF_CPP_MIN_LOG_LEVEL=1 if unset; we leave it at that).
  probe = ("import os, wstal_jax; a = os.environ.get('TF_CPP_MIN_LOG_LEVEL'); "
           "import wstal_jax.main; b = os.environ.get('TF_CPP_MIN_LOG_LEVEL'); "
           "print(a, b, os.environ.get('TF_ENABLE_ONEDNN_OPTS'))")
  out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.stdout.split() == ["None", "1", "None"], out.stderr[-2000:]


def test_second_run_compiles_nothing_new(tmp_path):
  """The persistent compilation cache is on by default (under $WSTAL_DATA_CACHE here): the
  first run stores its executables, and the same command with a fresh workdir finds every
  one of them (it adds no entry). --config.compilation_cache=off stores nothing."""
  data = _write_vlpo_dataset(tmp_path / "data")
  config = f"--config={ROOT / 'configs' / 'vlpo.py'}"
  cache = tmp_path / "jax_compilation"
  env = {"JAX_COMPILATION_CACHE_DIR": "", "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  env = {k: v for k, v in os.environ.items() if k not in env}
  entries = []
  for run in ("a", "b"):
    proc = subprocess.run(
        [sys.executable, "-m", "wstal_jax.main", config, f"--config.data.dir={data}",
         f"--workdir={tmp_path / run}", *TINY], cwd=tmp_path, capture_output=True, text=True,
        timeout=600, env=dict(env, PYTHONPATH=str(ROOT), XLA_FLAGS="",
                              WSTAL_DATA_CACHE=str(tmp_path)))
    assert proc.returncode == 0, proc.stderr[-4000:]
    entries.append(sorted(os.listdir(cache)))
  assert any("train_step" in e for e in entries[0]), entries[0]
  assert entries[1] == entries[0]
  off = tmp_path / "off_cache"
  proc = subprocess.run(
      [sys.executable, "-m", "wstal_jax.main", config, f"--config.data.dir={data}",
       f"--workdir={tmp_path / 'c'}", "--config.compilation_cache=off", *TINY], cwd=tmp_path,
      capture_output=True, text=True, timeout=600,
      env=dict(env, PYTHONPATH=str(ROOT), XLA_FLAGS="", WSTAL_DATA_CACHE=str(off)))
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert not (off / "jax_compilation").exists()
