r"""The README's "Before you rent a slice" table: VLPO's and PVLR's steps at THUMOS14 settings
compiled for TPU slices with `python -m wstal_jax.main --mode=compile` (needs libtpu).

  python benchmarks/compile_table.py [--topologies=v5e:4x4,v4:2x2x4] [--root=/tmp/compile]

The compile reads shapes only, so the dataset is a THUMOS14-shaped stand-in written here: the
20 classes, I3D 2048-d, VideoCLIP 768-d and CLIP 1024-d streams with class text embeddings,
20 training videos (T from 750 to 2,202, the longest THUMOS14 training video) and 16 test
videos as long as THUMOS14's longest (2,614 snippets: the evaluation's largest padded batch).
P-MIL and SEAL read a copy with 1,000 candidate proposals a video, MLLM4WTAL one with
description tokens (`write_described`).
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import wstal_jax  # noqa: E402

wstal_jax.quiet_native_logs()   # before tensorflow is imported

DIMS = {"i3d": 2048, "videoclip": 768, "clip": 1024}


def write_dataset(out, proposals=0):
  """The stand-in; with proposals=M every video also carries M candidate proposals (P-MIL,
  SEAL: THUMOS14's preset keeps up to 1,000 a video)."""
  from wstal_jax.data import format as fmt
  from wstal_jax.data import proposals as proposals_lib
  from wstal_jax.data import synthetic
  if os.path.exists(os.path.join(out, "manifest.json")):
    return out
  rng = np.random.default_rng(0)
  classes = list(synthetic.CLASSES)

  def video(name, num_t, i):
    label = np.zeros(len(classes), np.float32)
    label[i % len(classes)] = 1
    extras = {}
    if proposals:
      start = rng.uniform(0, num_t - 8, proposals)
      seg = np.stack([start, start + rng.uniform(2, 8, proposals)], 1).astype(np.float32)
      extras = {proposals_lib.FIELD: proposals_lib.encode(seg)}
    return fmt.VideoRecord(
        name=name, duration=num_t * 0.64, label=label, extras=extras,
        features={k: rng.standard_normal((num_t, d), dtype=np.float32) for k, d in DIMS.items()},
        segments=np.array([[1.0, 5.0]], np.float32), segment_labels=np.array([i % 20], np.int32))

  # 20 training videos: one of each class (SEAL's descriptors need every class)
  train = [video(f"train_{i}", int(t), i) for i, t in enumerate(np.linspace(750, 2202, 20))]
  test = [video(f"test_{i}", 2614, i) for i in range(16)]
  text = {k: rng.standard_normal((len(classes), d)).astype(np.float32) for k, d in DIMS.items()
          if k != "i3d"}
  aux = ({proposals_lib.FIELD: {"counts": {"train": [proposals] * 20, "test": [proposals] * 16},
                                 "dedupe": False}} if proposals else None)
  fmt.write_dataset(out, dataset="thumos14", classes=classes, feature_dims=DIMS,
                    splits={"train": train, "test": test}, num_shards=1,
                    text_embeddings=text["videoclip"], feature_text_embeddings=text,
                    optional_fields=[proposals_lib.FIELD] if proposals else None, aux=aux)
  return out


def write_described(data, out):
  """The stand-in plus MLLM4WTAL's description tokens (data/descriptions.py): every
  training video a key description of 20 words and a complete one of 64 (the preset's token
  lengths: 24 / 64), GloVe-like 300-d random vectors for a vocabulary of ~2,000 words."""
  from wstal_jax.data import descriptions
  from wstal_jax.data import format as fmt
  if os.path.exists(os.path.join(out, "manifest.json")):
    return out
  rng = np.random.default_rng(1)
  words = [f"w{i}" for i in range(2000)]
  classes = fmt.read_manifest(data)["classes"]
  names = {w for c in classes for w in descriptions.class_name_words(c)}
  names.update(descriptions.tokenize(descriptions.TEMPLATE.format("")))
  texts = {}
  for info in fmt.read_video_info(data, "train"):
    cls = " ".join(descriptions.class_name_words(classes[int(np.argmax(info.label))]))
    texts[info.name] = {"key": cls + " " + " ".join(rng.choice(words, 18)),
                        "complete": " ".join(rng.choice(words, 64))}
  os.makedirs(out + ".inputs", exist_ok=True)
  desc = os.path.join(out + ".inputs", "descriptions.json")
  vec = os.path.join(out + ".inputs", "vectors.txt")
  with open(desc, "w") as f:
    json.dump(texts, f)
  with open(vec, "w") as f:
    for w in sorted(set(words) | names):
      f.write(w + " " + " ".join(f"{x:.4f}" for x in rng.standard_normal(300)) + "\n")
  descriptions.add_descriptions(data, out, descriptions=desc, word_vectors=vec)
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--topologies", default="v5e:4x4,v4:2x2x4")
  p.add_argument("--configs", default="vlpo,pvlr",
                 help="also co2net, ju2023, delu, mllm4wtal, pmil, seal")
  p.add_argument("--root", default="/tmp/wstal_compile")
  args = p.parse_args()
  data = write_dataset(os.path.join(args.root, "thumos14_shapes"))
  with_proposals = None
  for topology in args.topologies.split(","):
    for name in args.configs.split(","):
      out = os.path.join(args.root, f"{name}-{topology.replace(':', '_')}")
      # The papers' batches (VLPO 16, PVLR 10) do not divide over every slice: the global
      # batch is one video per device here (and at least the paper's).
      from wstal_jax import compile_check
      compile_check.prepare_environment(topology)
      devices = len(compile_check.describe(topology).devices)
      batch = max(devices, 16 if name == "vlpo" else 10)
      batch = -(-batch // devices) * devices
      if name in ("pmil", "seal") and with_proposals is None:
        with_proposals = write_dataset(os.path.join(args.root, "thumos14_shapes_proposals"),
                                       proposals=1000)
      data_dir = {"pmil": with_proposals, "seal": with_proposals}.get(name, data)
      if name == "mllm4wtal":
        data_dir = write_described(data, os.path.join(args.root, "thumos14_shapes_described"))
      cmd = [sys.executable, "-m", "wstal_jax.main", "--mode=compile",
             f"--config={ROOT / 'configs' / name}.py:dataset=thumos14",
             f"--config.data.dir={data_dir}", f"--topology={topology}", f"--workdir={out}",
             f"--config.train.batch_size={batch}", f"--config.eval.batch_size={devices}"]
      proc = subprocess.run(cmd, capture_output=True, text=True,
                            env=dict(os.environ, PYTHONPATH=str(ROOT)))
      print(proc.stdout.strip() if proc.returncode == 0 else proc.stderr.strip()[-2000:])
      if proc.returncode == 0:
        print(json.dumps({k: v for k, v in json.load(open(os.path.join(out, "compile.json")))
                          .items() if k in ("topology", "num_devices", "findings")}))
      print()


if __name__ == "__main__":
  main()
