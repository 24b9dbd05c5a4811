"""Video descriptions (MLLM4WTAL's inputs): the converter, its errors, the batches, the
built-in benchmark's synthetic descriptions."""
import hashlib
import json
import os

import numpy as np
import pytest

import test_train as T
from wstal_jax import input_pipeline
from wstal_jax.data import descriptions as desc
from wstal_jax.data import format as fmt
from wstal_jax.data import synthetic_descriptions as sd
from wstal_jax.errors import WstalError

CLASSES = ["BaseballPitch", "Long_jump", "diving"]
WORDS = ["the", "a", "man", "throws", "ball", "baseball", "pitch", "long", "jump", "runs",
         "leaps", "diving", "dives", "video", "of", "into", "pool", "sand"]


@pytest.fixture(scope="module")
def described(tmp_path_factory):
  """A tiny dataset with 3 named classes, a description JSON, a vector file, the output."""
  root = tmp_path_factory.mktemp("desc")
  rng = np.random.default_rng(0)
  splits = {s: [T._video(rng, f"{s}_{i:03d}", int(rng.integers(12, 40)), i % 3, s)
                for i in range(n)] for s, n in (("train", 9), ("test", 4))}
  splits["train"][4].label[:] = [1, 1, 0]   # a two-class video of class 1
  data = str(root / "data")
  fmt.write_dataset(data, dataset="tiny", classes=CLASSES, feature_dims={"i3d": T.DIM},
                    splits=splits, num_shards=2, text_embeddings=np.ones((3, 4), np.float32))
  texts = {}
  for i in range(9):
    c = i % 3
    key = ["The man throws the baseball pitch!", "A man runs, leaps: long jump.",
           "He dives into the pool (diving)"][c] + f" zzz{i}"   # zzz: not in the vectors
    texts[f"train_{i:03d}"] = {"key": key, "complete": f"a video of {key} then sand"}
  texts["test_001"] = {"key": "diving", "complete": "dives"}
  texts["unrelated"] = {"key": "ball", "complete": "ball"}
  js = root / "desc.json"
  js.write_text(json.dumps(texts))
  vecs = {w: rng.standard_normal(6).astype(np.float32) for w in WORDS}
  glove = root / "glove.txt"
  glove.write_text("".join(f"{w} {' '.join(f'{x:.5f}' for x in v)}\n" for w, v in vecs.items()))
  out = str(root / "out")
  manifest = desc.add_descriptions(data, out, descriptions=str(js), word_vectors=str(glove))
  return dict(root=root, data=data, js=js, glove=glove, out=out, texts=texts, vecs=vecs,
              manifest=manifest)


def test_tokens_vocabulary_and_vectors(described):
  out, texts, vecs = described["out"], described["texts"], described["vecs"]
  aux = fmt.load_aux(out, "descriptions")
  vocab = aux["vocabulary"]
  assert vocab[:2] == ["<pad>", "<mask>"] and vocab[2:] == sorted(vocab[2:])
  assert "zzz0" not in vocab and "unrelated" not in vocab
  matrix = fmt.load_aux(out, "word_vectors")
  assert matrix.shape == (len(vocab), 6) and not matrix[:2].any()
  for i, w in enumerate(vocab[2:], 2):
    np.testing.assert_allclose(matrix[i], vecs[w], atol=1e-5)
  videos = {v.name: v for s in ("train", "test") for v in fmt.read_videos(out, s)}
  for name, text in texts.items():
    if name not in videos:
      continue
    for field, key in (("key_tokens", "key"), ("complete_tokens", "complete")):
      got = [vocab[i] for i in desc.decode(videos[name].extras[field])]
      assert got == [w for w in desc.tokenize(text[key]) if w in vecs], (name, field)
  assert "key_tokens" not in videos["test_000"].extras      # test videos need none
  # Features, labels and the other artefacts carried over unchanged.
  for s in ("train", "test"):
    for a, b in zip(fmt.read_videos(described["data"], s), fmt.read_videos(out, s)):
      np.testing.assert_array_equal(a.features["i3d"], b.features["i3d"])
      np.testing.assert_array_equal(a.label, b.label)
  np.testing.assert_array_equal(fmt.load_text_embeddings(out), np.ones((3, 4)))


def test_class_token_lists(described):
  aux = fmt.load_aux(described["out"], "descriptions")
  vocab = aux["vocabulary"]
  words = lambda ids: [vocab[i] for i in ids]
  assert [words(r) for r in aux["class_name_tokens"]] == [["baseball", "pitch"],
                                                           ["long", "jump"], ["diving"]]
  assert words(aux["template_tokens"][1]) == ["a", "video", "of", "the", "long", "jump"]
  # Class 1's key text: train_001 (one label) rather than train_004 (two labels, lower
  # index among the class-1 videos would be 1 anyway: check class 0, whose first video
  # train_000 has one label).
  assert words(aux["class_key_tokens"][0]) == ["the", "man", "throws", "the", "baseball",
                                               "pitch"]
  assert words(aux["class_key_tokens"][1]) == ["a", "man", "runs", "leaps", "long", "jump"]
  loaded = desc.load(described["out"])
  assert loaded["class_name_tokens_CxL"].shape == (3, 2)
  assert loaded["class_name_tokens_CxL"][2, 1] == desc.PAD
  assert desc.class_name_words("CleanAndJerk") == ["clean", "and", "jerk"]


def test_class_key_prefers_single_label_videos(tmp_path, described):
  """Class 1's first video is made two-class: the class key text comes from the next one."""
  rng = np.random.default_rng(1)
  recs = [T._video(rng, f"train_{i:03d}", 20, i % 3, "train") for i in range(6)]
  recs[1].label[:] = [1, 1, 0]
  data = str(tmp_path / "d")
  fmt.write_dataset(data, dataset="t", classes=CLASSES, feature_dims={"i3d": T.DIM},
                    splits={"train": recs}, num_shards=1)
  texts = {f"train_{i:03d}": {"key": f"throws {w}", "complete": "ball"}
           for i, w in enumerate(["ball", "pitch", "sand", "pool", "jump", "leaps"])}
  js = tmp_path / "d.json"
  js.write_text(json.dumps(texts))
  desc.add_descriptions(data, str(tmp_path / "o"), descriptions=str(js),
                        word_vectors=str(described["glove"]))
  aux = fmt.load_aux(str(tmp_path / "o"), "descriptions")
  assert [aux["vocabulary"][i] for i in aux["class_key_tokens"][1]] == ["throws", "jump"]


def _dirs(parent):
  return sorted(os.listdir(parent))


@pytest.mark.parametrize("case,pattern", [
    ("missing", r"desc.json: no description for training video 'train_003'"),
    ("empty", r"desc.json: video 'train_002': the 'complete' description is empty"),
    ("not_object", r"desc.json: video 'train_002': expected an object"),
    ("no_word", r"desc.json: video 'train_005': no word of its 'key' description 'qqq rrr' "
                r"is in the word vectors .*glove.txt"),
    ("width", r"glove.txt: line 3: 5 values, expected 6"),
    ("number", r"glove.txt: line 2: a value of 'a' is not a number"),
    ("class", r"glove.txt: no word of class 'diving'"),
    ("json", r"desc.json: not valid JSON"),
])
def test_bad_inputs_one_error_nothing_written(described, tmp_path, case, pattern):
  texts = json.loads(json.dumps(described["texts"]))
  glove_lines = described["glove"].read_text().splitlines()
  if case == "missing":
    del texts["train_003"]
  elif case == "empty":
    texts["train_002"]["complete"] = "  "
  elif case == "not_object":
    texts["train_002"] = "a man throws"
  elif case == "no_word":
    texts["train_005"]["key"] = "qqq rrr"
  elif case == "width":
    glove_lines[2] = " ".join(glove_lines[2].split()[:-1])
  elif case == "number":
    parts = glove_lines[1].split()
    glove_lines[1] = " ".join(parts[:2] + ["x1"] + parts[3:])
  elif case == "class":
    glove_lines = [l for l in glove_lines if not l.startswith(("diving ", "dives "))]
  js, glove = tmp_path / "desc.json", tmp_path / "glove.txt"
  js.write_text("{bad" if case == "json" else json.dumps(texts))
  glove.write_text("\n".join(glove_lines) + "\n")
  out_parent = tmp_path / "outs"
  out_parent.mkdir()
  with pytest.raises(WstalError, match=pattern):
    desc.add_descriptions(described["data"], str(out_parent / "o"), descriptions=str(js),
                          word_vectors=str(glove))
  assert _dirs(out_parent) == []    # nothing half-written, no temp directory left


def test_cli(described, tmp_path, capsys):
  out = tmp_path / "cli"
  assert desc.main([f"--data_dir={described['data']}", f"--descriptions={described['js']}",
                    f"--word_vectors={described['glove']}", f"--out={out}"]) == 0
  assert "wrote" in capsys.readouterr().out
  with pytest.raises(SystemExit) as e:
    desc.main([f"--data_dir={described['data']}", f"--descriptions={tmp_path / 'none.json'}",
               f"--word_vectors={described['glove']}", f"--out={tmp_path / 'cli2'}"])
  assert e.value.code == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and "none.json" in err and len(err.splitlines()) == 1


def test_batches_carry_padded_tokens(described):
  out = described["out"]
  videos = {v.index: v for v in fmt.read_video_info(out, "train")}
  batches = input_pipeline.train_batches(out, split="train", batch_size=3, num_snippets=16,
                                         seed=0, token_fields={"key_tokens": 4,
                                                               "complete_tokens": 40})
  for _ in range(3):
    b = next(batches)
    assert b["key_tokens_BxL"].shape == (3, 4) and b["complete_tokens_BxL"].dtype == np.int32
    for row, idx in enumerate(b["index_B"]):
      key = desc.decode(videos[int(idx)].extras["key_tokens"])
      comp = desc.decode(videos[int(idx)].extras["complete_tokens"])
      np.testing.assert_array_equal(b["key_tokens_BxL"][row], key[:4])   # truncated
      assert len(comp) < 40
      np.testing.assert_array_equal(b["complete_tokens_BxL"][row, :len(comp)], comp)
      assert not b["complete_tokens_BxL"][row, len(comp):].any()         # padded
  with pytest.raises(WstalError, match="no 'key_tokens' field"):
    next(input_pipeline.train_batches(described["data"], split="train", batch_size=3,
                                      num_snippets=16, seed=0, token_fields={"key_tokens": 4}))


def _tree_digest(path):
  h = hashlib.sha256()
  for name in sorted(os.listdir(path)):
    with open(os.path.join(path, name), "rb") as fh:
      h.update(name.encode() + fh.read())
  return h.hexdigest()


def test_builtin_descriptions_byte_identical_and_informative(tmp_path):
  a = sd.ensure_builtin("small", 0, cache_dir=str(tmp_path / "a"))
  b = sd.ensure_builtin("small", 0, cache_dir=str(tmp_path / "b"))
  assert _tree_digest(a) == _tree_digest(b)
  assert sorted(os.listdir(tmp_path / "a")) == sorted(os.listdir(tmp_path / "b"))
  assert len(os.listdir(tmp_path / "a")) == 2        # the plain and the described dataset
  aux = fmt.load_aux(a, "descriptions")
  vocab = aux["vocabulary"]
  # Each key description names its video's first class (its name words, in order).
  for v in list(fmt.read_video_info(a, "train"))[:30]:
    words = [vocab[i] for i in desc.decode(v.extras["key_tokens"])]
    first = int(np.argmax(v.label)) if v.label.sum() == 1 else None
    if first is not None:
      name = desc.class_name_words(sd.synthetic.CLASSES[first])
      assert any(words[i:i + len(name)] == name for i in range(len(words))), words
  # Same-class words are closer than other-class words.
  vec = dict(zip(vocab, fmt.load_aux(a, "word_vectors")))
  w0, w1 = sd.class_words(0), sd.class_words(9)
  cos = lambda x, y: float(vec[x] @ vec[y] / np.linalg.norm(vec[x]) / np.linalg.norm(vec[y]))
  assert cos(w0["verbs"][0], w0["verbs"][1]) > cos(w0["verbs"][0], w1["verbs"][0]) + 0.2
