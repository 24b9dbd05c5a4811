"""Every writer's bytes are a function of its inputs: two separate processes (different
PYTHONHASHSEED, so set and dict-of-set iteration orders differ, and some seconds apart, so any
timestamp would show) writing the same dataset, results and scores must produce identical files.

Each process runs the commands' own entry points (`main(argv)`, what `python -m ...` runs) in
one interpreter, to pay the TensorFlow import once per process:
  the built-in benchmark (`wstal_jax.data.synthetic`), the W-TALC converter on the real
  THUMOS14 annotations with generated features, the proposals and descriptions converters on
  the built-in benchmark's sources, the ground-truth writer, and the results / scores writers.
The evaluation outputs of a trained run (metrics.json, results.json, scores.npz, plots) are
checked the same way in tests/test_train_cli.py.
"""
import filecmp
import os
import pathlib
import shutil
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent

_DRIVER = r"""
import sys
import numpy as np
from wstal_jax import postprocess, results_io
from wstal_jax.data import convert, descriptions, proposals, synthetic
from wstal_jax.data import synthetic_descriptions, synthetic_proposals

out, sources, features, annotations = sys.argv[1:5]
synthetic.main(["--size=small", "--seed=3", f"--out={out}/synthetic"])
data = f"{out}/synthetic"
src = synthetic_proposals.write_sources(f"{sources}/proposals", data, seed=3)
proposals.main([f"--data_dir={data}", f"--train={src['train']}", f"--test={src['test']}",
                f"--out={out}/with_proposals"])
desc, vectors = synthetic_descriptions.write_sources(f"{sources}/descriptions", "small", 3)
descriptions.main([f"--data_dir={data}", f"--descriptions={desc}",
                   f"--word_vectors={vectors}", f"--out={out}/with_descriptions"])
if annotations != "-":
  convert.main(["--format=wtalc", f"--features={features}", f"--annotations={annotations}",
                f"--out={out}/wtalc", "--num_shards=3"])
results_io.write_ground_truth(f"{out}/gt.json", data, splits=("train", "test"))
rng = np.random.default_rng(0)
names = [f"video_{i}" for i in range(5)]
props = {n: postprocess.Proposals(label=rng.integers(3, size=4), score=rng.uniform(size=4),
                                  start=rng.uniform(0, 5, size=4), end=rng.uniform(5, 9, size=4))
         for n in names}
results_io.write_results(f"{out}/results.json", props, ["a", "b", "c"])
scores = {n: {"cas": rng.normal(size=(7, 3)), "actionness": rng.uniform(size=7)} for n in names}
results_io.save_scores_npz(f"{out}/scores.npz", scores, seconds_per_snippet=0.64,
                           class_names=["a", "b", "c"])
"""


def _run_driver(out, sources, features, annotations, hash_seed):
  env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONHASHSEED=str(hash_seed))
  proc = subprocess.run([sys.executable, "-c", _DRIVER, str(out), str(sources), features,
                         annotations],
                        env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-4000:]


def _files(root):
  return sorted(str(p.relative_to(root)) for p in pathlib.Path(root).rglob("*") if p.is_file())


def test_writers_are_byte_identical_across_processes(tmp_path, shared_data):
  ann = shared_data / "thumos14" / "Thumos14reduced-Annotations"
  names = np.load(ann / "videoname.npy")
  rng = np.random.default_rng(0)
  feats = np.empty(len(names), dtype=object)
  feats[:] = [rng.standard_normal((2 + i % 5, 2048), dtype=np.float32)
              for i in range(len(names))]
  features = tmp_path / "I3D-JOINTFeatures.npy"
  np.save(features, feats, allow_pickle=True)

  # The converters record their source files' paths in the manifest, so both processes read
  # their sources from one place; the sources written by the first are kept to compare.
  sources = tmp_path / "sources"
  _run_driver(tmp_path / "a", sources, str(features), str(ann), hash_seed=1)
  shutil.copytree(sources, tmp_path / "a" / "sources")
  time.sleep(2.1)   # zip and file timestamps have a 2-second resolution
  _run_driver(tmp_path / "b", sources, str(features), str(ann), hash_seed=2)
  shutil.copytree(sources, tmp_path / "b" / "sources")

  files = _files(tmp_path / "a")
  assert files == _files(tmp_path / "b")
  for sub in ("synthetic", "with_proposals", "with_descriptions", "wtalc"):
    assert any(f.startswith(sub + "/") and f.endswith(".tfrecord") for f in files), sub
  assert {"gt.json", "results.json", "scores.npz", "synthetic/manifest.json",
          "wtalc/manifest.json", "sources/descriptions/word_vectors.txt",
          "sources/proposals/proposals_test.json"} <= set(files)
  different = [f for f in files
               if not filecmp.cmp(tmp_path / "a" / f, tmp_path / "b" / f, shallow=False)]
  assert different == []
