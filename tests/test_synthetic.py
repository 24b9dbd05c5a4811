"""Tests of the built-in synthetic benchmark: THUMOS14 structure, determinism, cache, phenomena.

Everything uses the `small` size (a few seconds to generate); the structure of `full` is checked
on its layouts alone, which need no features.
"""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from wstal_jax.data import builtin_cache
from wstal_jax.data import format as fmt
from wstal_jax.data import synthetic
from wstal_jax.errors import WstalError

SPS = synthetic.SECONDS_PER_SNIPPET
NUM_C = len(synthetic.CLASSES)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("synth") / "small")
  synthetic.generate(out, "small", seed=0)
  return out


@pytest.fixture(scope="module")
def small_videos(small_dir):
  return {split: list(fmt.read_videos(small_dir, split)) for split in ("train", "test")}


@pytest.fixture(scope="module")
def small_layouts():
  return {split: synthetic.sample_layouts("small", 0, split) for split in ("train", "test")}


def _centres(num_t):
  return (np.arange(num_t) + 0.5) * SPS


def _inside(rec, num_t, label=None):
  """[T] bool: snippet centre inside an instance (of `label`, if given)."""
  c = _centres(num_t)
  m = np.zeros(num_t, bool)
  for (s, e), k in zip(rec.segments, rec.segment_labels):
    if label is None or k == label:
      m |= (c >= s) & (c < e)
  return m


def _distance_to_instances(rec, num_t):
  c = _centres(num_t)
  seg = np.asarray(rec.segments).reshape(-1, 2)
  return np.min(np.maximum(seg[None, :, 0] - c[:, None], 0)
                + np.maximum(c[:, None] - seg[None, :, 1], 0), axis=1)


# ------------------------------------------------------------------------------- structure


def test_class_names_are_thumos14():
  assert len(synthetic.CLASSES) == 20
  assert synthetic.CLASSES[0] == "BaseballPitch" and synthetic.CLASSES[-1] == "VolleyballSpiking"
  assert list(synthetic.CLASSES) == sorted(synthetic.CLASSES)


def test_class_names_match_shared_annotations(shared_data):
  path = shared_data / "thumos14" / "Thumos14reduced-Annotations" / "classlist.npy"
  names = [c.decode() if isinstance(c, bytes) else str(c)
           for c in np.load(path, allow_pickle=True, encoding="bytes")]
  assert names == list(synthetic.CLASSES)


@pytest.mark.parametrize("size", ["full", "small"])
@pytest.mark.parametrize("split", ["train", "test"])
def test_structure_matches_thumos14(size, split):
  """Loose bounds around ../shared/data/README.md's THUMOS14 statistics."""
  layouts = synthetic.sample_layouts(size, 0, split)
  spec = synthetic.get_spec(size)
  assert len(layouts) == (spec.num_train if split == "train" else spec.num_test)
  n = np.array([len(l.segments) for l in layouts])
  dur = np.array([l.duration for l in layouts])
  lengths = np.concatenate([l.segments[:, 1] - l.segments[:, 0] for l in layouts])
  frac = np.array([np.sum(l.segments[:, 1] - l.segments[:, 0]) / l.duration for l in layouts])
  num_cls = np.array([len(l.classes) for l in layouts])
  assert n.min() >= 1
  if size == "full":
    assert 11 <= n.mean() <= 20                       # THUMOS14: 15.0 / 15.8
    assert 6 <= np.median(n) <= 11                    # 8 / 9
    assert 120 <= np.median(dur) <= 190               # 151 / 162 s
    assert 180 <= dur.mean() <= 260                   # 209 / 217 s
  else:
    snippets = np.array([l.num_snippets for l in layouts])
    assert snippets.min() >= 40 and snippets.max() <= 400
    assert 3 <= n.mean() <= 10                        # fewer instances in shorter videos
  assert 3.3 <= lengths.mean() <= 5.2                 # 4.0 / 4.5 s
  assert 2.2 <= np.median(lengths) <= 3.6             # 2.9 / 3.2 s
  assert 0.22 <= frac.mean() <= 0.36                  # 0.29
  assert 0.8 <= np.mean(num_cls == 1) <= 0.97         # 179/200, 181/212
  assert num_cls.max() <= 3
  for l in layouts:
    assert np.all(l.segments[:, 0] >= 0) and np.all(l.segments[:, 1] <= l.duration + 1e-4)
    assert np.all(l.segments[:, 1] > l.segments[:, 0])
    order = np.argsort(l.segments[:, 0])
    assert np.all(np.diff(l.segments[order].reshape(-1)) >= -1e-4)  # no overlaps
    assert sorted(set(l.segment_labels.tolist())) == l.classes
  with_ambiguous = np.mean([len(l.ambiguous) > 0 for l in layouts])
  if split == "train":
    assert with_ambiguous == 0
  else:
    assert 0.08 <= with_ambiguous <= 0.3             # 37 / 212


def test_classes_balanced_and_partners_cooccur():
  layouts = synthetic.sample_layouts("full", 0, "train")
  videos_per_class = np.bincount(np.concatenate([l.classes for l in layouts]), minlength=NUM_C)
  assert videos_per_class.min() >= 8 and videos_per_class.max() <= 25  # THUMOS14: 10 .. 25
  pairs = [tuple(l.classes) for l in layouts if len(l.classes) == 2]
  partner_pairs = {(4, 7), (5, 6)}  # CliffDiving/Diving, CricketBowling/CricketShot
  assert sum(p in partner_pairs for p in pairs) >= len(pairs) / 2


def test_full_size_features():
  """`full` has THUMOS14's feature dims (one short video synthesised, not the whole set)."""
  spec = synthetic.get_spec("full")
  assert (spec.rgb_dim, spec.flow_dim, spec.vl_dim, spec.clip_dim) == (1024, 1024, 768, 1024)
  assert (spec.num_train, spec.num_test) == (200, 212)
  world = synthetic.make_world(0, spec)
  assert world.text_CxE.shape == (NUM_C, 768)
  layout = synthetic.sample_layout(np.random.default_rng(0), spec, 7, annotate_ambiguous=True)
  layout.duration = min(layout.duration, 40.0)
  layout.segments = np.minimum(layout.segments, 40.0)
  feats = synthetic.synthesize(np.random.default_rng(1), world, layout)
  assert feats["i3d"].shape == (layout.num_snippets, 2048)
  assert feats["videoclip"].shape == (layout.num_snippets, 768)
  assert feats["clip"].shape == (layout.num_snippets, 1024)  # CLIP RN50 (PVLR Sec. 4.2)
  assert world.clip["text"].shape == (NUM_C, 1024)
  assert all(np.all(np.isfinite(f)) and f.dtype == np.float32 for f in feats.values())


def test_unknown_size_and_split():
  with pytest.raises(WstalError, match="unknown synthetic size"):
    synthetic.get_spec("huge")
  with pytest.raises(WstalError, match="unknown split"):
    synthetic.sample_layouts("small", 0, "validation")
  with pytest.raises(WstalError, match="seed"):
    builtin_cache.ensure_builtin("small", seed=-1)


# ------------------------------------------------------------------------ dataset on disk


def test_manifest(small_dir, small_layouts):
  m = fmt.read_manifest(small_dir)
  assert m["dataset"] == "synthetic-thumos14-small"
  assert m["classes"] == list(synthetic.CLASSES)
  assert m["features"] == {"i3d": {"dim": 128}, "videoclip": {"dim": 64}, "clip": {"dim": 64}}
  assert m["primary_feature"] == "i3d"
  assert m["snippet_frames"] == 16 and m["fps"] == 25.0
  assert m["splits"]["train"]["num_videos"] == 200
  assert m["splits"]["test"]["num_videos"] == 212
  for split in ("train", "test"):
    assert m["splits"][split]["num_instances"] == sum(len(l.segments)
                                                      for l in small_layouts[split])
  assert m["source"]["seed"] == 0 and m["source"]["size"] == "small"
  assert m["source"]["generator_version"] == synthetic.GENERATOR_VERSION
  fmt.verify_shards(small_dir)
  text = fmt.load_text_embeddings(small_dir, m)
  assert text.shape == (NUM_C, 64) and text.dtype == np.float32
  np.testing.assert_allclose(np.linalg.norm(text, axis=1), 1.0, rtol=1e-5)
  clip_text = fmt.load_text_embeddings(small_dir, m, feature="clip")
  assert m["feature_text_embeddings"] == {"clip": "text_embeddings_clip.npy"}
  assert clip_text.shape == (NUM_C, 64)
  assert not np.allclose(clip_text, text)  # its own space
  # Features without their own text embeddings fall back to text_embeddings.npy.
  np.testing.assert_array_equal(fmt.load_text_embeddings(small_dir, m, feature="videoclip"), text)


def test_records_match_layouts(small_videos, small_layouts):
  for split in ("train", "test"):
    for rec, lay in zip(small_videos[split], small_layouts[split]):
      assert rec.num_snippets == lay.num_snippets
      assert abs(rec.num_snippets - rec.duration / SPS) < 1.0 + 1e-3  # T = floor(dur * 25 / 16)
      assert rec.features["i3d"].shape == (rec.num_snippets, 128)
      assert rec.features["videoclip"].shape == (rec.num_snippets, 64)
      assert np.all(rec.features["i3d"] >= 0)  # like post-ReLU I3D
      np.testing.assert_allclose(np.linalg.norm(rec.features["videoclip"], axis=1), 1.0,
                                 rtol=1e-4)
      assert rec.features["clip"].shape == (rec.num_snippets, 64)
      np.testing.assert_allclose(np.linalg.norm(rec.features["clip"], axis=1), 1.0, rtol=1e-4)
      np.testing.assert_allclose(rec.segments, lay.segments, atol=1e-5)
      np.testing.assert_array_equal(np.flatnonzero(rec.label), lay.classes)


def _same_bytes(dir_a, dir_b):
  """Shards (by manifest sha256) and text embeddings of two dataset dirs are identical."""
  a, b = fmt.read_manifest(dir_a), fmt.read_manifest(dir_b)
  for split in ("train", "test"):
    sha_a = [s["sha256"] for s in a["splits"][split]["shards"]]
    assert sha_a == [s["sha256"] for s in b["splits"][split]["shards"]]
  with open(os.path.join(dir_a, "text_embeddings.npy"), "rb") as f1, open(
      os.path.join(dir_b, "text_embeddings.npy"), "rb") as f2:
    assert f1.read() == f2.read()
  return True


def test_seed_changes_data():
  a = synthetic.sample_layouts("small", 0, "train")
  b = synthetic.sample_layouts("small", 1, "train")
  assert [l.duration for l in a] != [l.duration for l in b]
  assert not np.allclose(synthetic.make_world(0, synthetic.get_spec("small")).text_CxE,
                         synthetic.make_world(1, synthetic.get_spec("small")).text_CxE)


def test_test_videos_are_new_draws(small_videos):
  train, test = small_videos["train"], small_videos["test"]
  same = {r.duration for r in train} & {r.duration for r in test}
  assert len(same) < 0.05 * len(test)  # a few coincide at the clipping bound / on 0.01 s
  train_first = {r.features["i3d"][0].tobytes() for r in train}
  assert not any(r.features["i3d"][0].tobytes() in train_first for r in test)


# ------------------------------------------------------------------------------- the cache


def test_ensure_builtin_generates_once(small_dir, tmp_path, monkeypatch):
  cache = str(tmp_path / "cache")
  path = builtin_cache.ensure_builtin("small", seed=0, cache_dir=cache)
  assert path == os.path.join(cache, synthetic.builtin_name("small", 0))
  assert f"-v{synthetic.GENERATOR_VERSION}" in path and "small" in path and "seed0" in path
  assert _same_bytes(path, small_dir)  # deterministic: byte-identical to another generation
  manifest = os.path.join(path, "manifest.json")
  mtime = os.stat(manifest).st_mtime_ns
  assert os.listdir(cache) == [os.path.basename(path)]  # no temp dirs left behind

  def fail(*args, **kwargs):
    raise AssertionError("regenerated a cached dataset")

  monkeypatch.setattr(synthetic, "generate", fail)
  monkeypatch.setenv("WSTAL_DATA_CACHE", cache)
  assert builtin_cache.ensure_builtin("small", seed=0) == path  # default cache dir from env
  assert os.stat(manifest).st_mtime_ns == mtime
  # An entry cached before datasets carried TFDS metadata gets it, without regenerating.
  info = os.path.join(path, "dataset_info.json")
  written = open(info, "rb").read()
  os.remove(info)
  os.remove(os.path.join(path, "features.json"))
  assert builtin_cache.ensure_builtin("small", seed=0) == path
  assert open(info, "rb").read() == written
  assert os.stat(manifest).st_mtime_ns == mtime


def test_ensure_builtin_loses_race_gracefully(small_dir, tmp_path, monkeypatch):
  """Another process finishes first: ours is discarded and the winner's copy is returned."""
  cache = str(tmp_path / "cache")
  target = os.path.join(cache, synthetic.builtin_name("small", 0))

  def racing_generate(out_dir, size, seed=0, **kwargs):
    shutil.copytree(small_dir, target)    # the other process wins the race ...
    with open(os.path.join(target, "winner"), "w"):
      pass
    shutil.copytree(small_dir, out_dir)   # ... while we finish our own copy

  monkeypatch.setattr(synthetic, "generate", racing_generate)
  assert builtin_cache.ensure_builtin("small", seed=0, cache_dir=cache) == target
  assert os.path.exists(os.path.join(target, "winner"))
  assert os.listdir(cache) == [os.path.basename(target)]  # our temp copy is gone


def test_ensure_builtin_incomplete_entry(tmp_path):
  cache = tmp_path / "cache"
  (cache / synthetic.builtin_name("small", 0)).mkdir(parents=True)
  with pytest.raises(WstalError, match="incomplete cached dataset"):
    builtin_cache.ensure_builtin("small", 0, cache_dir=str(cache))


# ------------------------------------------------------------------------------ phenomena


def _class_directions(videos, half):
  """[C, D/2] mean instance feature minus mean background feature (train), of one I3D half."""
  d = videos[0].features["i3d"].shape[1] // 2
  sl = slice(0, d) if half == "rgb" else slice(d, 2 * d)
  fg = np.zeros((NUM_C, d))
  cnt = np.zeros(NUM_C)
  bg = []
  for r in videos:
    x = r.features["i3d"][:, sl]
    t = len(x)
    for c in np.flatnonzero(r.label):
      m = _inside(r, t, c)
      fg[c] += x[m].sum(0)
      cnt[c] += m.sum()
    bg.append(x[~_inside(r, t)])
  bg = np.concatenate(bg).mean(0)
  return fg / cnt[:, None] - bg, bg, sl


def test_i3d_evidence_peaks_inside_instances(small_videos):
  """Incompleteness: class evidence is clearly stronger in the middle than at the edges."""
  dirs, bg_mean, _ = _class_directions(small_videos["train"], "flow")
  centre, edge = [], []
  for r in small_videos["test"]:
    x = r.features["i3d"][:, dirs.shape[1]:] - bg_mean
    t = len(x)
    for (s, e), c in zip(r.segments, r.segment_labels):
      first, last = int(np.ceil(s / SPS)), int(e / SPS) - 1
      if last - first < 6 or last >= t:
        continue
      proj = x[first:last + 1] @ dirs[c] / np.linalg.norm(dirs[c])
      n = len(proj)
      centre.append(proj[n // 3: n - n // 3].max())
      edge.append(0.5 * (proj[0] + proj[-1]))
  centre, edge = np.array(centre), np.array(edge)
  assert len(centre) > 50
  assert np.mean(centre) > 2.0 * np.mean(edge)
  assert np.mean(centre > edge) > 0.8


def test_vl_evidence_flat_and_leaking(small_videos):
  """Vision-language: flat over the instance, above background just outside it."""
  text = synthetic.make_world(0, synthetic.get_spec("small")).text_CxE
  centre, edge, outside, far = [], [], [], []
  for r in small_videos["test"]:
    cos = r.features["videoclip"] @ text.T
    t = len(cos)
    dist = _distance_to_instances(r, t)
    for (s, e), c in zip(r.segments, r.segment_labels):
      first, last = int(np.ceil(s / SPS)), int(e / SPS) - 1
      if last - first < 4 or last >= t:
        continue
      n = last - first + 1
      centre.append(cos[first + n // 3: last + 1 - n // 3, c].mean())
      edge.append(0.5 * (cos[first, c] + cos[last, c]))
      after = int((e + 1.0) / SPS)
      if after < t and dist[after] > 0:
        outside.append(cos[after, c])
    for c in np.flatnonzero(r.label):
      far += cos[dist > 10.0, c].tolist()
  centre, edge, outside, far = map(np.mean, (centre, edge, outside, far))
  assert edge > 0.8 * centre                  # complete: edges about as strong as the middle
  assert outside > far + 0.3 * (centre - far)  # over-complete: leaks into the context
  assert centre > outside


def test_background_context_predicts_class(small_videos):
  """Scene context: far-from-action RGB background alone tells the video's class."""
  d = small_videos["train"][0].features["i3d"].shape[1] // 2

  def bg_mean(r):
    x = r.features["i3d"][:, :d]
    far = _distance_to_instances(r, len(x)) > 5.0
    return x[far].mean(0) if far.sum() >= 3 else None

  means = np.zeros((NUM_C, d))
  cnt = np.zeros(NUM_C)
  for r in small_videos["train"]:
    m = bg_mean(r)
    if m is not None:
      for c in np.flatnonzero(r.label):
        means[c] += m
        cnt[c] += 1
  means /= np.maximum(cnt, 1)[:, None]
  hits, total = 0, 0
  for r in small_videos["test"]:
    m = bg_mean(r)
    if m is None:
      continue
    total += 1
    hits += r.label[np.argmin(((means - m) ** 2).sum(1))] > 0
  assert total > 100
  assert hits / total > 0.18  # chance is ~0.06


def test_flow_carries_actionness_and_distractors(small_videos, small_layouts):
  """Flow separates action from background better than RGB does; distractor shots look active."""
  train = small_videos["train"]
  d = train[0].features["i3d"].shape[1] // 2

  def direction(sl):
    fg = np.concatenate([r.features["i3d"][_inside(r, r.num_snippets), sl] for r in train])
    bg = np.concatenate([r.features["i3d"][~_inside(r, r.num_snippets), sl] for r in train])
    w = fg.mean(0) - bg.mean(0)
    return w / np.linalg.norm(w), bg.mean(0)

  w, mu = direction(slice(d, 2 * d))
  dis, calm = [], []
  for r, lay in zip(small_videos["test"], small_layouts["test"]):
    x = (r.features["i3d"][:, d:] - mu) @ w
    c = _centres(len(x))
    shot = np.minimum(np.searchsorted(lay.shots[:, 1], c, side="right"), len(lay.shots) - 1)
    bg = _distance_to_instances(r, len(x)) > 3.0
    dis += x[bg & (lay.distractor[shot] >= 0)].tolist()
    calm += x[bg & (lay.distractor[shot] < 0)].tolist()
  assert len(dis) > 200
  assert np.mean(dis) > np.mean(calm) + 0.5 * np.std(calm)


def test_not_trivially_separable(small_videos):
  """No linear read-out of I3D separates action from background cleanly."""
  train, test = small_videos["train"], small_videos["test"]

  def xy(videos):
    x = np.concatenate([r.features["i3d"] for r in videos])
    y = np.concatenate([_inside(r, r.num_snippets) for r in videos]).astype(np.float64)
    return np.concatenate([x, np.ones((len(x), 1))], 1), y

  x, y = xy(train)
  w = np.linalg.lstsq(x, y, rcond=None)[0]  # linear discriminant by least squares
  xt, yt = xy(test)
  acc = np.mean((xt @ w > 0.5) == (yt > 0.5))
  assert 0.7 < acc < 0.95


def test_vl_zero_shot_classifies_videos(small_videos):
  text = synthetic.make_world(0, synthetic.get_spec("small")).text_CxE
  hits = [r.label[np.argmax((r.features["videoclip"] @ text.T).mean(0))] > 0
          for r in small_videos["test"]]
  assert np.mean(hits) > 0.6


# -------------------------------------------------------------------------------------- CLI


def test_cli_writes_dataset(small_dir, tmp_path, capsys):
  out = str(tmp_path / "cli")
  synthetic.main(["--size=small", "--seed=0", f"--out={out}"])
  assert capsys.readouterr().out.strip() == out
  with open(os.path.join(out, "manifest.json")) as f:
    m = json.load(f)
  assert m["source"]["seed"] == 0 and m["dataset"] == "synthetic-thumos14-small"
  assert _same_bytes(out, small_dir)  # deterministic: byte-identical to the API's output
  with pytest.raises(SystemExit) as e:  # exists, no --overwrite
    synthetic.main(["--size=small", f"--out={out}"])
  assert e.value.code == 2
  assert capsys.readouterr().err.startswith("error:")


def test_cli_help():
  res = subprocess.run([sys.executable, "-m", "wstal_jax.data.synthetic", "--help"],
                       capture_output=True, text=True, timeout=60,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert res.returncode == 0
  for flag in ("--size", "--seed", "--out", "--overwrite"):
    assert flag in res.stdout


def test_clip_stream_is_frame_like(small_videos, small_dir):
  """CLIP-like features: zero-shot classification of the video mostly works (as CLIP's does on
  UCF101's sports, far from perfectly: per-video confusers, dropouts), the labelled class's
  similarity is higher inside instances than outside, and it drops within a snippet of the
  boundary (no temporal leakage, unlike `videoclip`)."""
  text = fmt.load_text_embeddings(small_dir, feature="clip")
  hits, inside, outside, edge_drop_clip, edge_drop_vl = [], [], [], [], []
  vl_text = fmt.load_text_embeddings(small_dir)
  for rec in small_videos["test"]:
    cls = np.flatnonzero(rec.label)
    sim_T = (rec.features["clip"] @ text.T)[:, cls].max(1)
    vl_T = (rec.features["videoclip"] @ vl_text.T)[:, cls].max(1)
    hits.append(rec.label[np.argmax((rec.features["clip"] @ text.T).mean(0))] > 0)
    gt_T = np.zeros(rec.num_snippets, bool)
    for s, e in rec.segments:
      gt_T[int(np.ceil(s / SPS)):int(e / SPS)] = True
    if gt_T.any() and (~gt_T).any():
      inside.append(sim_T[gt_T].mean())
      outside.append(sim_T[~gt_T].mean())
      # Snippets just after an instance ends (1-2 snippets out) vs inside.
      after = np.zeros_like(gt_T)
      idx = np.flatnonzero(gt_T[:-1] & ~gt_T[1:]) + 1
      for i in idx:
        after[i + 1:i + 3] = True  # skip the boundary snippet itself
      after &= ~gt_T
      if after.any():
        edge_drop_clip.append(sim_T[gt_T].mean() - sim_T[after].mean())
        edge_drop_vl.append(vl_T[gt_T].mean() - vl_T[after].mean())
  assert 0.6 < np.mean(hits) < 0.95
  assert np.mean(inside) > np.mean(outside) + 0.02
  # Relative to its in/out contrast, clip drops right after an instance; videoclip leaks. (What
  # remains is the venue: the shot around an instance shows it, before and after.)
  contrast = np.mean(inside) - np.mean(outside)
  assert np.mean(edge_drop_clip) > 0.8 * contrast
  assert np.mean(edge_drop_clip) > 2 * np.mean(edge_drop_vl)


def test_clip_stream_geometry_like_real_clip(small_videos, small_dir):
  """The `clip` stream's embedding geometry is that of real CLIP (benchmarks/clip_stats.py;
  real CLIP on MSCOCO, Liang et al. 2022: image-image cosine 0.53, cosine to the image mean 0.73,
  matched / unmatched image-text cosine 0.31 / 0.16, modality gap 0.85 with cos(mean image,
  mean text) 0.31), and zero-shot snippet classification is far from solved."""
  text = fmt.load_text_embeddings(small_dir, feature="clip")
  x, lab, vid = [], [], []
  for i, rec in enumerate(small_videos["test"]):
    x.append(rec.features["clip"])
    lab_T = np.full(rec.num_snippets, -1)
    centre_T = _centres(rec.num_snippets)
    for (s, e), c in zip(rec.segments, rec.segment_labels):
      inside_T = (centre_T >= s) & (centre_T <= e)
      lab_T[inside_T] = np.where(lab_T[inside_T] == -1, c, -2)  # -2: two classes
    x_amb = np.zeros(rec.num_snippets, bool)
    for s, e in np.asarray(rec.ambiguous).reshape(-1, 2):
      x_amb |= (centre_T >= s) & (centre_T <= e)
    lab_T[x_amb & (lab_T == -1)] = -3
    lab.append(lab_T)
    vid.append(np.full(rec.num_snippets, i))
  x, lab, vid = np.concatenate(x), np.concatenate(lab), np.concatenate(vid)
  rng = np.random.default_rng(0)
  a, b = rng.integers(0, len(x), (2, 20000))
  keep = vid[a] != vid[b]
  img_img = np.einsum("ne,ne->n", x[a[keep]], x[b[keep]])
  mu_img, mu_txt = x.mean(0), text.mean(0)
  conformity = x @ (mu_img / np.linalg.norm(mu_img))
  sim = x @ text.T
  act = lab >= 0
  own = sim[act, lab[act]]
  other = np.ones_like(sim, bool)
  other[np.flatnonzero(act), lab[act]] = False
  unmatched = sim[other & ((lab >= 0) | (lab == -1))[:, None]]
  assert 0.45 < img_img.mean() < 0.65 and 0.2 < np.percentile(img_img, 5)
  assert 0.68 < conformity.mean() < 0.82
  assert 0.25 < own.mean() < 0.33
  assert 0.12 < unmatched.mean() < 0.2
  assert 0.8 < np.linalg.norm(mu_img - mu_txt) < 1.0
  cos_means = mu_img @ mu_txt / np.linalg.norm(mu_img) / np.linalg.norm(mu_txt)
  assert 0.2 < cos_means < 0.4
  assert 0.45 < np.mean(sim[act].argmax(1) == lab[act]) < 0.8  # chance 0.05
