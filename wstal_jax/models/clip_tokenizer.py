"""CLIP's byte-level BPE tokenizer, offline (host side, numpy).

Which vocabulary, and why:
  * Default: the pinned PyPI package `instant-clip-tokenizer==0.1.1` (MIT, a Rust port of
    OpenAI's tokenizer by Instant Labs). It embeds CLIP's `bpe_simple_vocab_16e6` merges in its
    binary, needs nothing but numpy, never touches the network, and has wheels for CPython
    3.11 and 3.12. It is used only for the byte-level BPE of one pre-token at a time: the text
    cleaning and the pre-tokenisation below are ours, because the package only lowercases (no
    HTML unescaping, no quote / ligature / width fixes, and it does not recognise the special
    tokens in text), which differs from OpenAI's reference on such strings.
  * `ClipTokenizer(bpe_vocab_path=...)` (flag `--clip_bpe_vocab=path/to/bpe_simple_vocab_16e6
    .txt.gz`): our own small BPE reading CLIP's merges file (gzip or plain text). Without the
    package and without a path, a `bpe_simple_vocab_16e6.txt.gz` shipped by an installed
    `open_clip` or `clip` package is used if one is found.
  Not chosen: `open_clip_torch` and `clip-anytorch` ship the .gz but pull torch + torchvision
  (+ timm, huggingface-hub), far too much for a vocabulary file.

The algorithm is OpenAI's `SimpleTokenizer.encode`: clean, collapse whitespace, lowercase,
split with CLIP's pre-tokenisation pattern
  <|startoftext|> | <|endoftext|> | 's|'t|'re|'ve|'m|'ll|'d | letters+ | one number | other+
(letters = Unicode category L*, numbers = N*, other = neither nor whitespace), map each
pre-token's UTF-8 bytes to printable characters, and merge by rank with '</w>' on the last
symbol. Ids: 256 byte symbols, 256 byte symbols + '</w>', 48,894 merges, then
<|startoftext|> = 49406 and <|endoftext|> = 49407. A padded row is
[49406, ids..., 49407, 0, ...] (length 77).

Cleaning: OpenAI runs ftfy.fix_text and html.unescape twice. We do not depend on ftfy; we apply
the ftfy steps that matter for clean text (HTML entities, C1 controls read as Windows-1252,
Latin ligatures, full/half-width forms, curly quotes, terminal escapes, control characters,
NFC) and agree with the reference on every string of tests/test_clip_text.py. Not reproduced:
ftfy's mojibake repair ("cafÃ©" stays as written) and Unicode-version differences (we use
Python's `unicodedata` tables where the reference uses the `regex` package's).
"""
import argparse
import functools
import gzip
import html
import importlib.util
import os
import re
import sys
import unicodedata

import numpy as np

from wstal_jax.errors import WstalError, cli_main

CONTEXT_LENGTH = 77
SOT_ID = 49406  # <|startoftext|>
EOT_ID = 49407  # <|endoftext|>
NUM_MERGES = 49152 - 256 - 2  # merges CLIP reads from the vocabulary file (48,894)
VOCAB_FILENAME = "bpe_simple_vocab_16e6.txt.gz"
_SPECIALS = ("<|startoftext|>", "<|endoftext|>")
_CONTRACTIONS_3 = ("'re", "'ve", "'ll")
_CONTRACTIONS_2 = ("'s", "'t", "'m", "'d")


@functools.lru_cache(maxsize=None)
def byte_to_symbol():
  """The 256 UTF-8 bytes -> printable one-character symbols, in CLIP's vocabulary order.

  Bytes that are printable Latin-1 ('!'..'~', '¡'..'¬', '®'..'ÿ') stand for themselves; the
  other 68 bytes, in increasing order, get chr(256), chr(257), ... . The dict's insertion
  order (printable bytes first) is the order of vocabulary ids 0..255.
  """
  printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
               *range(ord("®"), ord("ÿ") + 1)]
  table = {b: chr(b) for b in printable}
  extra = 0
  for b in range(256):
    if b not in table:
      table[b] = chr(256 + extra)
      extra += 1
  return table


# ftfy-equivalent clean-up tables (see the module docstring).
# Latin ligatures and digraphs -> their one-level compatibility decomposition
# ("\ufb01" -> "fi", "\ufb05" -> "\u017ft", "\u01c4" -> "D\u017d").
_LIGATURE_CPS = (0x132, 0x133, 0x149, *range(0x1C4, 0x1CD), *range(0x1F1, 0x1F4),
                 *range(0xFB00, 0xFB07))
_LIGATURES = {cp: "".join(chr(int(h, 16)) for h in unicodedata.decomposition(chr(cp)).split()[1:])
              for cp in _LIGATURE_CPS}
_QUOTES = {**{cp: "'" for cp in (0x02BC, 0x2018, 0x2019, 0x201A, 0x201B)},
           **{cp: '"' for cp in range(0x201C, 0x2020)}}
_CONTROLS = {cp: None for cp in (*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F,
                                 *range(0x206A, 0x2070), 0xFEFF, *range(0xFFF9, 0xFFFD))}
_TERMINAL_ESCAPE = re.compile(r"\x1b\[[0-9;]*[a-zA-Z]")
_C1 = re.compile("[\x80-\x9f]")
_LINE_BREAKS = re.compile("\r\n|[\r\u2028\u2029\u0085]")


@functools.lru_cache(maxsize=1)
def _width_table():
  """Full-width / half-width forms (U+FF01..U+FFEF) -> their NFKC form; U+3000 -> space."""
  table = {0x3000: " "}
  for cp in range(0xFF01, 0xFFF0):
    normal = unicodedata.normalize("NFKC", chr(cp))
    if normal != chr(cp):
      table[cp] = normal
  return table


def _c1_as_cp1252(match):
  try:
    return bytes([ord(match.group())]).decode("cp1252")
  except UnicodeDecodeError:  # 0x81, 0x8d, 0x8f, 0x90, 0x9d: no cp1252 character, keep
    return match.group()


def clean_text(text: str) -> str:
  """OpenAI's `whitespace_clean(basic_clean(text)).lower()`, without ftfy's mojibake repair."""
  if "<" not in text:  # ftfy unescapes to a fixed point, unless the text looks like markup
    unescaped = html.unescape(text)
    while unescaped != text:
      text, unescaped = unescaped, html.unescape(unescaped)
  text = _C1.sub(_c1_as_cp1252, text)
  text = text.translate(_LIGATURES).translate(_width_table()).translate(_QUOTES)
  text = _LINE_BREAKS.sub("\n", text)
  text = _TERMINAL_ESCAPE.sub("", text).translate(_CONTROLS)
  text = unicodedata.normalize("NFC", text)
  text = html.unescape(html.unescape(text))
  return " ".join(text.split()).lower()


def _is_letter(ch):
  return unicodedata.category(ch)[0] == "L"


def _is_number(ch):
  return unicodedata.category(ch)[0] == "N"


def pretokenize(text: str) -> list[str]:
  """Splits cleaned text exactly as CLIP's pattern does (see the module docstring)."""
  pieces, i, n = [], 0, len(text)
  while i < n:
    ch = text[i]
    special = next((s for s in _SPECIALS if text.startswith(s, i)), None)
    if special is not None:
      j = i + len(special)
    elif ch == "'" and text[i:i + 3] in _CONTRACTIONS_3:
      j = i + 3
    elif ch == "'" and text[i:i + 2] in _CONTRACTIONS_2:
      j = i + 2
    elif _is_letter(ch):
      j = i + 1
      while j < n and _is_letter(text[j]):
        j += 1
    elif _is_number(ch):
      j = i + 1
    elif ch.isspace():
      i += 1
      continue
    else:
      j = i + 1
      while j < n and not (text[j].isspace() or _is_letter(text[j]) or _is_number(text[j])):
        j += 1
    pieces.append(text[i:j])
    i = j
  return pieces


def read_bpe_merges(path: str) -> list[tuple[str, str]]:
  """Reads CLIP's merges file (gzip or plain UTF-8 text): one 'a b' pair a line after a header.

  Returns up to NUM_MERGES pairs in rank order, as CLIP reads them. Raises WstalError naming
  the file if it is missing, unreadable or has a malformed line.
  """
  if not os.path.isfile(path):
    raise WstalError(f"{path}: CLIP BPE vocabulary file not found (--clip_bpe_vocab)")
  try:
    with open(path, "rb") as f:
      raw = f.read()
    if raw[:2] == b"\x1f\x8b":
      raw = gzip.decompress(raw)
    lines = raw.decode("utf-8").split("\n")
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise WstalError(f"{path}: cannot read the CLIP BPE vocabulary ({e})") from e
  merges = []
  for lineno, line in enumerate(lines[1:NUM_MERGES + 1], start=2):
    parts = line.split()
    if not parts:  # the file ends with a newline
      continue
    if len(parts) != 2:
      raise WstalError(f"{path}: line {lineno} is not a BPE merge 'a b': {line!r}")
    merges.append((parts[0], parts[1]))
  return merges


class _FileBpe:
  """Byte-level BPE over a merges list (CLIP's vocabulary layout)."""

  def __init__(self, merges):
    symbols = list(byte_to_symbol().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
    self.encoder = {tok: i for i, tok in enumerate(vocab)}
    self.ranks = {m: r for r, m in enumerate(merges)}
    self.sot_id = len(vocab)
    self.eot_id = len(vocab) + 1
    self._cache = {}

  def _merge(self, word: str) -> list[str]:
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
      best = min(range(len(parts) - 1),
                 key=lambda k: self.ranks.get((parts[k], parts[k + 1]), float("inf")))
      pair = (parts[best], parts[best + 1])
      if pair not in self.ranks:
        break
      merged, k = [], 0
      while k < len(parts):  # merge every occurrence, left to right, non-overlapping
        if k + 1 < len(parts) and (parts[k], parts[k + 1]) == pair:
          merged.append(parts[k] + parts[k + 1])
          k += 2
        else:
          merged.append(parts[k])
          k += 1
      parts = merged
    return parts

  def piece_ids(self, piece: str) -> list[int]:
    ids = self._cache.get(piece)
    if ids is None:
      table = byte_to_symbol()
      word = "".join(table[b] for b in piece.encode("utf-8"))
      ids = [self.encoder[p] for p in self._merge(word)]
      self._cache[piece] = ids
    return ids


class _InstantBpe:
  """BPE of single pre-tokens through the pinned `instant-clip-tokenizer` package."""

  def __init__(self, module):
    self._tok = module.Tokenizer()
    self.sot_id = int(self._tok.start_of_text())
    self.eot_id = int(self._tok.end_of_text())
    self._cache = {}

  def piece_ids(self, piece: str) -> list[int]:
    ids = self._cache.get(piece)
    if ids is None:
      ids = [int(t) for t in self._tok.encode(piece)]
      self._cache[piece] = ids
    return ids


def find_packaged_vocab():
  """Path of a bpe_simple_vocab_16e6.txt.gz shipped by an installed open_clip / clip, or None.

  Looks the packages up without importing them (they import torch).
  """
  for name in ("open_clip", "clip"):
    try:
      spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
      continue
    for loc in (spec.submodule_search_locations or []) if spec else []:
      cand = os.path.join(loc, VOCAB_FILENAME)
      if os.path.isfile(cand):
        return cand
  return None


class ClipTokenizer:
  """CLIP's tokenizer: text -> BPE ids (see the module docstring for backend choice).

  Args:
    bpe_vocab_path: CLIP's merges file (`--clip_bpe_vocab`). None: the pinned
      `instant-clip-tokenizer` package, else a vocabulary shipped by open_clip / clip.
    require_full_vocab: raise unless the file holds all 48,894 merges of CLIP (a truncated
      file would silently give other ids). Tests set it False for a toy vocabulary, whose
      SOT / EOT ids then follow its last merge.

  Attributes:
    backend: "instant-clip-tokenizer" or the vocabulary path used.
    sot_id, eot_id: 49406 and 49407 for CLIP's vocabulary.
  """

  def __init__(self, bpe_vocab_path: str | None = None, *, require_full_vocab: bool = True):
    if bpe_vocab_path is None:
      try:
        import instant_clip_tokenizer  # pylint: disable=import-outside-toplevel
      except ImportError:
        bpe_vocab_path = find_packaged_vocab()
        if bpe_vocab_path is None:
          raise WstalError(
              "no CLIP BPE vocabulary: install instant-clip-tokenizer==0.1.1 or pass "
              f"--clip_bpe_vocab=path/to/{VOCAB_FILENAME}") from None
      else:
        self._bpe = _InstantBpe(instant_clip_tokenizer)
        self.backend = "instant-clip-tokenizer"
    if bpe_vocab_path is not None:
      merges = read_bpe_merges(bpe_vocab_path)
      if require_full_vocab and len(merges) != NUM_MERGES:
        raise WstalError(f"{bpe_vocab_path}: holds {len(merges)} BPE merges, CLIP's "
                         f"{VOCAB_FILENAME} has {NUM_MERGES}")
      self._bpe = _FileBpe(merges)
      self.backend = bpe_vocab_path
    self.sot_id = self._bpe.sot_id
    self.eot_id = self._bpe.eot_id

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without the SOT / EOT that `tokenize` adds."""
    ids = []
    for piece in pretokenize(clean_text(text)):
      if piece == _SPECIALS[0]:
        ids.append(self.sot_id)
      elif piece == _SPECIALS[1]:
        ids.append(self.eot_id)
      else:
        ids.extend(self._bpe.piece_ids(piece))
    return ids

  def tokenize(self, texts, context_length: int = CONTEXT_LENGTH,
               truncate: bool = False) -> np.ndarray:
    """texts (a string or a list of N) -> int32 [N, context_length]: SOT, ids, EOT, 0-padding.

    A text longer than context_length - 2 tokens raises WstalError unless `truncate`, which
    keeps the first context_length - 1 tokens and ends the row with EOT (as clip.tokenize).
    """
    if isinstance(texts, str):
      texts = [texts]
    out_NxL = np.zeros((len(texts), context_length), np.int32)
    for i, text in enumerate(texts):
      ids = [self.sot_id, *self.encode(text), self.eot_id]
      if len(ids) > context_length:
        if not truncate:
          raise WstalError(f"text {text!r} is {len(ids)} tokens with SOT/EOT, longer than the "
                           f"CLIP context length {context_length}")
        ids = ids[:context_length - 1] + [self.eot_id]
      out_NxL[i, :len(ids)] = ids
    return out_NxL


def build_parser():
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.models.clip_tokenizer",
      description="Print CLIP token ids (with SOT/EOT) of each text.")
  p.add_argument("texts", nargs="+", help="texts to tokenize")
  p.add_argument("--clip_bpe_vocab", default=None,
                 help=f"CLIP's {VOCAB_FILENAME}; default: the instant-clip-tokenizer package")
  return p


@cli_main
def main(argv=None):
  args = build_parser().parse_args(argv)
  tok = ClipTokenizer(args.clip_bpe_vocab)
  for text in args.texts:
    print(" ".join(str(i) for i in [tok.sot_id, *tok.encode(text), tok.eot_id]))
  return 0


if __name__ == "__main__":
  sys.exit(main())
