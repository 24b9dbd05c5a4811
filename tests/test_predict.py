"""python -m wstal_jax.predict: a trained run on the user's own feature files."""
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from test_train_cli import TINY, _main, _write_vlpo_dataset
from wstal_jax import predict
from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError

ROOT = pathlib.Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny VLPO run (i3d + videoclip) and its data."""
  tmp = tmp_path_factory.mktemp("predict")
  data = _write_vlpo_dataset(tmp / "data")
  run = tmp / "run"
  proc = _main([f"--config={ROOT / 'configs' / 'vlpo.py'}", f"--config.data.dir={data}",
                f"--workdir={run}", *TINY], tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return tmp, data, run


def test_predict_equals_eval_mode_on_the_same_videos(trained, tmp_path):
  tmp, data, run = trained
  videos = list(fmt.read_videos(data, "test"))[:2]
  feats, vlm = tmp_path / "i3d", tmp_path / "videoclip"
  feats.mkdir()
  vlm.mkdir()
  for v in videos:
    np.save(feats / f"{v.name}.npy", v.features["i3d"])
    np.save(vlm / f"{v.name}.npy", v.features["videoclip"])
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=str(ROOT), XLA_FLAGS="")
  proc = subprocess.run([sys.executable, "-m", "wstal_jax.predict", f"--workdir={run}",
                         "--checkpoint=latest", f"--features={feats}", f"--vlm_features={vlm}",
                         f"--out={out}"], cwd=tmp_path, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr and "2 videos" in proc.stdout
  got = json.loads((out / "results.json").read_text())["results"]
  eval_dir = tmp_path / "eval"
  proc = _main(["--mode=eval", f"--workdir={run}", "--checkpoint=latest",
                f"--eval_dir={eval_dir}"], tmp)
  assert proc.returncode == 0, proc.stderr[-3000:]
  want = json.loads((eval_dir / "results.json").read_text())["results"]
  assert sorted(got) == sorted(v.name for v in videos)
  for v in videos:
    a, b = got[v.name], want[v.name]
    assert len(a) == len(b) and len(a) > 0
    assert [r["label"] for r in a] == [r["label"] for r in b]
    np.testing.assert_allclose([r["segment"] for r in a], [r["segment"] for r in b], atol=1e-4)
    np.testing.assert_allclose([r["score"] for r in a], [r["score"] for r in b], atol=1e-5)
  assert sorted(os.listdir(out / "plots")) == sorted(f"{v.name}.png" for v in videos)
  with np.load(out / "scores.npz") as z:
    assert {f"{v.name}/cas" for v in videos} <= set(z.files)


@pytest.mark.parametrize("case,message", [
    ("width", "feature 'i3d' has dim 5, expected 8"),
    ("empty", "have T=0 snippets"),
    ("nan", "contain NaN/Inf"),
    ("no_vlm", "--vlm_features is required: the run's method reads the 'videoclip' stream"),
    ("vlm_missing_video", r"v: no VLM features for 1 video\(s\), e.g. \['b'\]"),
    ("not_npy", "must be a .npy file or a folder"),
])
def test_bad_input_is_one_error_naming_the_file(trained, tmp_path, case, message):
  _, _, run = trained
  rng = np.random.default_rng(0)
  feats, vlm = tmp_path / "f", tmp_path / "v"
  feats.mkdir()
  vlm.mkdir()
  good = rng.normal(size=(12, 8)).astype(np.float32)
  bad = {"width": good[:, :5], "empty": good[:0], "nan": np.where(good > 1, np.nan, good)}
  np.save(feats / "a.npy", good)
  np.save(feats / "b.npy", bad.get(case, good))
  np.save(vlm / "a.npy", good)
  if case != "vlm_missing_video":
    np.save(vlm / "b.npy", good)
  path = str(feats)
  if case == "not_npy":
    path = str(tmp_path / "f.txt")
    (tmp_path / "f.txt").write_text("x")
  out = tmp_path / "out"
  with pytest.raises(WstalError, match=message) as e:
    predict.predict(str(run), path, str(out), checkpoint="latest",
                    vlm_features=None if case == "no_vlm" else str(vlm),
                    overrides={"mesh.num_devices": 1})
  if case in ("width", "empty", "nan"):
    assert str(feats / "b.npy") in str(e.value)
  assert not out.exists()   # nothing written


def test_workdir_without_config_or_checkpoint(trained, tmp_path):
  (tmp_path / "run").mkdir()
  with pytest.raises(WstalError, match=r"run/config.json.*is .*run a training run"):
    predict.predict(str(tmp_path / "run"), str(tmp_path), str(tmp_path / "out"))
  (tmp_path / "run" / "config.json").write_bytes((trained[2] / "config.json").read_bytes())
  with pytest.raises(WstalError, match=r"run/checkpoints: no checkpoints here"):
    predict.predict(str(tmp_path / "run"), str(tmp_path), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()
