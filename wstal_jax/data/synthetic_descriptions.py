"""Descriptions of the built-in benchmark's videos: what MLLM4WTAL's LLM would say, made up.

The built-in benchmark (`synthetic.py`) has no pixels for a multimodal LLM to describe, so
its descriptions are generated from per-class templates, and its word vectors are its own:
nothing is downloaded, and `python -m wstal_jax.main --config=configs/mllm4wtal.py` runs with
no other flag (the run logs that it uses these synthetic descriptions).

Vocabulary (50-d vectors, `DIM`). Per class c: its name words ("baseball", "pitch"), three
action-verb synonyms `v<c>a`, `v<c>b`, `v<c>c` and four phase words `p<c>a` ... `p<c>d`
(the parts of the action a complete description walks through: run-up, take-off, ...). A
class word's vector is unit(0.6 g + u_c + 0.35 n_w): g shared by the class's sport group (as
in the feature generator, classes of a group read alike), u_c the class direction, n_w the
word's own noise, so synonyms are close but not equal. Filler words (a, the, person, camera,
...) have random unit vectors.

Descriptions (per video, seeded by (seed, split, index) apart from the feature generator's
streams, so the features are unchanged):
* key: one sentence per labelled class: "the person <verb> the <name words>", with a
  probability of 0.25 of a distractor word of another class before the name (an LLM's slip);
* complete: per labelled class 12-20 words: an opening, the class's verb, its phase words in
  order with fillers between them, its name, and one or two distractors of other classes.
"""
from __future__ import annotations

import json

from absl import logging
import numpy as np
import tensorflow as tf

from wstal_jax.data import descriptions as desc
from wstal_jax.data import builtin_cache
from wstal_jax.data import synthetic

DIM = 50
FILLERS = ("a", "the", "person", "athlete", "player", "camera", "then", "and", "while",
           "with", "after", "before", "slowly", "quickly", "crowd", "watches", "scene", "shows",
           "in", "video", "this", "of", "his", "her", "moves", "body", "arms")
_SPLIT_KEY = {"train": 1, "test": 2}
_WORLD = 91


def class_words(c: int) -> dict:
  name = desc.class_name_words(synthetic.CLASSES[c])
  return {"name": name, "verbs": [f"v{c:02d}{s}" for s in "abc"],
          "phases": [f"p{c:02d}{s}" for s in "abcd"]}


def word_vectors(seed: int) -> dict[str, np.ndarray]:
  """{word: float32 [DIM]} for every word descriptions of `seed` use."""
  rng = np.random.default_rng([seed, _WORLD])
  unit = lambda x: (x / np.linalg.norm(x)).astype(np.float32)
  groups = rng.standard_normal((synthetic._NUM_GROUPS, DIM))  # pylint: disable=protected-access
  out = {}
  for w in FILLERS:
    out[w] = unit(rng.standard_normal(DIM))
  for c in range(len(synthetic.CLASSES)):
    u_c = rng.standard_normal(DIM)
    g = groups[synthetic._GROUP[c]]  # pylint: disable=protected-access
    words = class_words(c)
    for w in words["name"] + words["verbs"] + words["phases"]:
      vec = unit(0.6 * g + u_c + 0.35 * rng.standard_normal(DIM))
      out.setdefault(w, vec)   # a name word two classes share keeps its first vector
  return out


def describe(rng, classes_present, num_classes: int) -> tuple[str, str]:
  """(key, complete) for a video whose labelled classes are `classes_present`."""
  key, complete = [], []
  for c in classes_present:
    words = class_words(c)
    others = [o for o in range(num_classes) if o not in classes_present]
    def distractor():
      w = class_words(int(rng.choice(others)))
      return str(rng.choice(w["verbs"] + w["phases"] + w["name"]))
    sentence = ["the", str(rng.choice(("person", "athlete", "player"))),
                str(rng.choice(words["verbs"])), "the", *words["name"]]
    if rng.random() < 0.25:
      sentence.insert(int(rng.integers(1, 4)), distractor())   # before "the <name>"
    key.extend(sentence)
    text = ["this", "video", "shows", "a", str(rng.choice(("person", "athlete"))),
            str(rng.choice(words["verbs"])), *words["name"]]
    for phase in words["phases"]:
      text.append(str(rng.choice(("then", "and", "while", "after"))))
      if rng.random() < 0.5:
        text.append(str(rng.choice(FILLERS)))
      text.append(phase)
    for _ in range(int(rng.integers(1, 3))):
      text.insert(int(rng.integers(1, len(text))), distractor())
    complete.extend(text)
  return " ".join(key), " ".join(complete)


def write_sources(out_dir: str, size: str, seed: int) -> tuple[str, str]:
  """Writes descriptions.json and word_vectors.txt (GloVe text format) for the built-in
  `size` benchmark of `seed` into out_dir; returns their paths."""
  tf.io.gfile.makedirs(out_dir)
  texts = {}
  for split in ("train", "test"):
    for i, layout in enumerate(synthetic.sample_layouts(size, seed, split)):
      rng = np.random.default_rng([seed, _WORLD, _SPLIT_KEY[split], i])
      present = sorted({int(c) for c in layout.classes}, key=list(layout.classes).index)
      key, complete = describe(rng, present, len(synthetic.CLASSES))
      texts[f"synthetic_{split}_{i:04d}"] = {"key": key, "complete": complete}
  json_path = f"{out_dir}/descriptions.json"
  with tf.io.gfile.GFile(json_path, "w") as fh:
    fh.write(json.dumps(texts, indent=1, sort_keys=True) + "\n")
  vec_path = f"{out_dir}/word_vectors.txt"
  with tf.io.gfile.GFile(vec_path, "w") as fh:
    for w, v in word_vectors(seed).items():
      fh.write(w + " " + " ".join(f"{x:.6f}" for x in v) + "\n")
  return json_path, vec_path


def ensure_builtin(size: str, seed: int = 0, cache_dir: str | None = None) -> str:
  """The built-in benchmark with synthetic descriptions (cache_dir/<name>-descriptions),
  generated on first use next to the plain one (`builtin_cache.ensure_builtin`)."""
  plain = builtin_cache.ensure_builtin(size, seed=seed, cache_dir=cache_dir)
  logging.info("MLLM4WTAL inputs: the built-in benchmark's synthetic descriptions and word "
               "vectors (per-class templates, no LLM; data/synthetic_descriptions.py)")

  def add(sources, target):
    json_path, vec_path = write_sources(sources, size, seed)
    desc.add_descriptions(plain, target, descriptions=json_path, word_vectors=vec_path,
                          provenance=f"synthetic_descriptions {size} seed {seed}")

  return builtin_cache.ensure_derived(plain, "descriptions", add)
