"""Video descriptions from a multimodal LLM (MLLM4WTAL's inputs) as fields of a dataset.

MLLM4WTAL (mllm4wtal.txt Sec. 3.1-3.2) prompts a multimodal LLM offline, per training video,
for a *key* description ("... describe the action of {Cls} with one sentence") and a
*complete* one ("... in detail"), and embeds their words with GloVe. Here the LLM's answers
are an input file and the word vectors another:

  descriptions  JSON {video name: {"key": str, "complete": str}}
  word vectors  GloVe text format, one word per line: `word v_1 ... v_D` (glove.6B.300d.txt)

`add_descriptions` writes a copy of a dataset with, per video, the token fields
`extra/key_tokens` and `extra/complete_tokens` (int32 little-endian raw bytes; ids into the
dataset's vocabulary) and two dataset artefacts (`format.load_aux`):

  aux 'descriptions'   {"vocabulary": [word, ...] (id = position; 0 = padding, 1 = [MASK]),
                        "class_name_tokens": [[id, ...]] per class (the class name's words:
                        "BaseballPitch" -> baseball pitch; Table 5's "class name" row),
                        "template_tokens": [[id, ...]] per class ("a video of the {name}":
                        Table 5's fixed template), "class_key_tokens": [[id, ...]] per class
                        (the key description of one training video of the class, the one with
                        the fewest labels, then the lowest index: the class's query text for
                        videos that do not contain it), "word_dim", "sources"}
  aux 'word_vectors'   float32 [V, D]: the vectors of the vocabulary (rows 0 and 1 zero)

Only words present in the vector file enter the vocabulary (the others are dropped from the
token sequences and counted in the log). Every training video needs a description; test
videos may have one (it is stored, never used: the method needs no text at inference).

Errors (one line, naming the file and the video; nothing is written): a training video
missing from the JSON, a description that is not an object of two non-empty strings, a
description with no word in the vocabulary, a vector line of the wrong width or with a
non-number, a class name with no word in the vectors.

  python -m wstal_jax.data.descriptions --data_dir=thumos14_shards \
      --descriptions=thumos14_descriptions.json --word_vectors=glove.6B.300d.txt \
      --out=thumos14_shards_described
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Iterable, Mapping

from absl import logging
import numpy as np
import tensorflow as tf

from wstal_jax.data import format as fmt
from wstal_jax.errors import WstalError, cli_main

PAD, MASK = 0, 1
SPECIAL = ("<pad>", "<mask>")
FIELDS = ("key_tokens", "complete_tokens")
TEMPLATE = "a video of the {}"
_TOKEN_RE = re.compile(r"[a-z0-9]+")


def tokenize(text: str) -> list[str]:
  """Lower-cased runs of letters and digits (GloVe's 6B vocabulary is lower-case)."""
  return _TOKEN_RE.findall(str(text).lower())


def class_name_words(name: str) -> list[str]:
  """'BaseballPitch' -> ['baseball', 'pitch']; 'Long_jump' / 'long jump' -> ['long', 'jump']."""
  spaced = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", str(name))
  return tokenize(spaced)


def encode(ids) -> bytes:
  return np.asarray(ids, "<i4").tobytes()


def decode(raw: bytes) -> np.ndarray:
  return np.frombuffer(raw, "<i4").astype(np.int32)


def read_descriptions(path: str) -> dict[str, tuple[str, str]]:
  """{video: (key, complete)} from the JSON file; WstalError naming the file and video."""
  data = fmt.read_json(path)
  if not isinstance(data, dict) or not data:
    raise WstalError(f"{path}: expected a non-empty JSON object {{video: {{\"key\": ..., "
                     "\"complete\": ...}}}")
  out = {}
  for video, entry in data.items():
    if not isinstance(entry, dict):
      raise WstalError(f"{path}: video {video!r}: expected an object with \"key\" and "
                       f"\"complete\" texts, got {type(entry).__name__}")
    texts = []
    for field in ("key", "complete"):
      text = entry.get(field)
      if not isinstance(text, str) or not text.strip():
        what = "missing" if field not in entry else "empty" if isinstance(text, str) else (
            f"a {type(text).__name__}, not a string")
        raise WstalError(f"{path}: video {video!r}: the {field!r} description is {what}")
      texts.append(text)
    out[str(video)] = (texts[0], texts[1])
  return out


def read_word_vectors(path: str, words: Iterable[str]) -> tuple[int, dict[str, np.ndarray]]:
  """(D, {word: float32 [D]}) for the requested words found in a GloVe text file. The width
  D is the first line's; every line is checked (WstalError naming the file and line)."""
  wanted = set(words)
  found, dim = {}, None
  try:
    with tf.io.gfile.GFile(path, "rb") as fh:
      for line_no, line in enumerate(fh, 1):
        parts = line.rstrip(b"\r\n").split(b" ")
        if parts == [b""]:
          continue
        width = len(parts) - 1
        if dim is None:
          if width < 1:
            raise WstalError(f"{path}: line {line_no}: a word with no vector")
          dim = width
        elif width != dim:
          raise WstalError(f"{path}: line {line_no}: {width} values, expected {dim} (the width "
                           "of the file's first vector): not a GloVe text file of one width")
        try:
          word = parts[0].decode("utf-8")
        except UnicodeDecodeError:
          raise WstalError(f"{path}: line {line_no}: the word is not UTF-8") from None
        if word in wanted and word not in found:
          try:
            vec = np.asarray([float(v) for v in parts[1:]], np.float32)
          except ValueError:
            raise WstalError(f"{path}: line {line_no}: a value of {word!r} is not a "
                             "number") from None
          if not np.all(np.isfinite(vec)):
            raise WstalError(f"{path}: line {line_no}: the vector of {word!r} has NaN/Inf")
          found[word] = vec
  except (tf.errors.OpError, OSError) as e:
    raise WstalError(f"{path}: cannot read ({e})") from None
  if dim is None:
    raise WstalError(f"{path}: no word vectors in the file")
  return dim, found


def build_aux(classes, texts: Mapping[str, tuple[str, str]], labels: Mapping[str, np.ndarray],
              train_order, vectors_path: str, descriptions_path: str):
  """(vocabulary ids, aux dict, word vectors) for the descriptions (`add_descriptions`).

  texts: {video: (key, complete)}; labels: {video: multi-hot [C]} of the training videos in
  `train_order` (manifest order)."""
  class_words = [class_name_words(c) for c in classes]
  template_words = [tokenize(TEMPLATE.format(" ".join(w))) for w in class_words]
  wanted = {w for key, comp in texts.values() for w in tokenize(key) + tokenize(comp)}
  wanted.update(w for ws in class_words + template_words for w in ws)
  dim, vectors = read_word_vectors(vectors_path, wanted)
  vocab = list(SPECIAL) + sorted(vectors)
  ids = {w: i for i, w in enumerate(vocab)}
  for c, words in enumerate(class_words):
    if not any(w in ids for w in words):
      raise WstalError(f"{vectors_path}: no word of class {classes[c]!r} ({words}) has a vector")
  tokens, dropped, total = {}, 0, 0
  for video, (key, comp) in texts.items():
    row = []
    for field, text in (("key", key), ("complete", comp)):
      words = tokenize(text)
      kept = [ids[w] for w in words if w in ids]
      total += len(words)
      dropped += len(words) - len(kept)
      if not kept:
        raise WstalError(f"{descriptions_path}: video {video!r}: no word of its {field!r} "
                         f"description {text[:60]!r} is in the word vectors {vectors_path}")
      row.append(kept)
    tokens[video] = row
  class_key = []
  for c, name in enumerate(classes):
    having = [v for v in train_order if labels[v][c] > 0]
    if not having:
      raise WstalError(f"{descriptions_path}: no training video of class {name!r} to take "
                       "its key description from")
    best = min(having, key=lambda v: (float(np.sum(labels[v])), train_order.index(v)))
    class_key.append(tokens[best][0])
  if dropped:
    logging.info("descriptions: %d of %d words have no vector in %s and were dropped",
                 dropped, total, vectors_path)
  matrix = np.zeros((len(vocab), dim), np.float32)
  for w, vec in vectors.items():
    matrix[ids[w]] = vec
  aux = {"vocabulary": vocab,
         "class_name_tokens": [[ids[w] for w in ws if w in ids] for ws in class_words],
         "template_tokens": [[ids[w] for w in ws if w in ids] for ws in template_words],
         "class_key_tokens": class_key, "word_dim": dim}
  return tokens, aux, matrix


def add_descriptions(data_dir: str, out: str, *, descriptions: str, word_vectors: str,
                     overwrite: bool = False, provenance: str | None = None) -> dict:
  """Writes `out`: the dataset at `data_dir` plus the description token fields and
  artefacts (module docstring). Returns the new manifest. `provenance` replaces the two
  source paths in the manifest and artefacts (the built-in benchmark: byte-identical
  wherever it is generated)."""
  manifest = fmt.read_manifest(data_dir)
  texts = read_descriptions(descriptions)
  infos = {s: fmt.read_video_info(data_dir, s) for s in manifest["splits"]}
  train = [v.name for v in infos.get("train", [])]
  if not train:
    raise WstalError(f"{data_dir}: no training videos to describe")
  missing = [v for v in train if v not in texts]
  if missing:
    raise WstalError(f"{descriptions}: no description for training video {missing[0]!r}"
                     + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
  known = {v.name for vs in infos.values() for v in vs}
  used = {v: t for v, t in texts.items() if v in known}
  unknown = len(texts) - len(used)
  if unknown:
    logging.info("descriptions: %d entries of %s name no video of the dataset (ignored)",
                 unknown, descriptions)
  labels = {v.name: np.asarray(v.label) for v in infos["train"]}
  tokens, aux, matrix = build_aux(manifest["classes"], used, labels, train, word_vectors,
                                  descriptions)
  aux["sources"] = ({"descriptions": str(descriptions), "word_vectors": str(word_vectors)}
                    if provenance is None else {"generated": provenance})

  extras = {name: {"key_tokens": encode(key), "complete_tokens": encode(comp)}
            for name, (key, comp) in tokens.items()}
  return fmt.copy_with_extras(data_dir, out, extras,
                              source={"descriptions": provenance or str(descriptions)},
                              aux={"descriptions": aux, "word_vectors": matrix},
                              overwrite=overwrite)


def load(data_dir: str, manifest: dict | None = None) -> dict | None:
  """The dataset's description artefacts as arrays, None when it has none:
  {'word_vectors_VxD', 'class_name_tokens_CxL', 'template_tokens_CxL',
  'class_key_tokens_CxL'} (token lists padded with PAD to their longest)."""
  manifest = manifest or fmt.read_manifest(data_dir)
  aux = fmt.load_aux(data_dir, "descriptions", manifest)
  if aux is None:
    return None
  vectors = fmt.load_aux(data_dir, "word_vectors", manifest)
  path = f"{data_dir}/{manifest['aux'].get('descriptions')}"
  if vectors is None or vectors.ndim != 2 or vectors.shape[0] != len(aux.get("vocabulary", [])):
    raise WstalError(f"{path}: the word vectors do not match the vocabulary")
  out = {"word_vectors_VxD": vectors.astype(np.float32)}
  for name in ("class_name_tokens", "template_tokens", "class_key_tokens"):
    rows = aux.get(name)
    if not isinstance(rows, list) or len(rows) != len(manifest["classes"]):
      raise WstalError(f"{path}: {name} must hold one token list per class")
    out[f"{name}_CxL"] = pad_tokens(rows)
  return out


def pad_tokens(rows, length: int | None = None) -> np.ndarray:
  """int32 [N, L] of token lists, padded with PAD (or truncated) to `length` (default: the
  longest)."""
  length = max((len(r) for r in rows), default=1) if length is None else length
  out = np.full((len(rows), max(length, 1)), PAD, np.int32)
  for i, r in enumerate(rows):
    r = list(r)[:length]
    out[i, :len(r)] = r
  return out


@cli_main
def main(argv=None):
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.data.descriptions",
      description="Add per-video LLM descriptions (key + complete) and their word vectors to "
                  "a wstal_jax dataset (MLLM4WTAL's inputs); writes a new dataset directory.")
  p.add_argument("--data_dir", required=True, help="the dataset DIR (manifest.json + shards)")
  p.add_argument("--descriptions", required=True,
                 help='JSON FILE {video: {"key": str, "complete": str}}')
  p.add_argument("--word_vectors", required=True,
                 help="GloVe text FILE (word v_1 ... v_D per line), e.g. glove.6B.300d.txt")
  p.add_argument("--out", required=True, help="dataset DIR to create (must not exist)")
  p.add_argument("--overwrite", action="store_true",
                 help="replace an existing --out once the new dataset is complete")
  args = p.parse_args(argv)
  logging.set_verbosity(logging.INFO)
  manifest = add_descriptions(args.data_dir, args.out, descriptions=args.descriptions,
                              word_vectors=args.word_vectors, overwrite=args.overwrite)
  aux = fmt.load_aux(args.out, "descriptions", manifest)
  print(f"wrote {args.out}: vocabulary of {len(aux['vocabulary']) - len(SPECIAL)} words, "
        f"{aux['word_dim']}-d vectors")
  return 0


if __name__ == "__main__":
  sys.exit(main())
