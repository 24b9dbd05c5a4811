"""Built-in THUMOS14-structured benchmark, generated from a seed (no download needed).

`builtin_cache.ensure_builtin("small")` returns a dataset directory in the shard format of
`wstal_jax.data.format` (manifest + TFRecords + text_embeddings.npy), generating it into a cache
on first use. `python -m wstal_jax.data.synthetic --size=small --seed=0 --out=DIR` writes one
explicitly.

What is generated (docs/ARCHITECTURE.md; calibration targets in BENCHMARK.md):

* Structure as in THUMOS14: the 20 class names, 25 fps and 16 frames per snippet (0.64 s),
  200 train / 212 test videos, log-normal durations, mostly one class per video (the co-occurring
  pairs CliffDiving/Diving and CricketBowling/CricketShot give most of the two-class videos),
  class-dependent log-normal instance lengths, a skewed fraction of each video inside actions,
  instances clustered with many short gaps, and ambiguous segments in some test videos.
* `i3d` features, like classification-pretrained I3D (RGB half then flow half, non-negative):
  class evidence peaks at one discriminative moment of each instance (several, with weak
  stretches between them, in long instances) and is weak near the edges (incomplete
  localization); RGB carries class appearance plus the scene ("venue") correlated with the
  video's class, also present in many background shots (context false positives); flow carries
  class motion plus class-agnostic motion, which distractor shots in the background also have.
  Slow-motion replays (with broadcast graphics) and unclear actions (annotated as ambiguous in
  test videos) appear in the background with partial evidence. Classes of one sport group
  (athletics field events, the two dives, the cricket pair, ...) look and move alike.
* `videoclip` features, like a video-language model, unit-norm and in the space of the class
  text embeddings: class semantics are flat over each instance (with per-snippet flicker) and
  leak into the context on both sides for a few seconds, merging nearby instances; venue shots
  resemble the text of the video's class (complete but over-complete localization). Only part of
  the visual semantics is aligned with the text, so zero-shot use is weak while a learned
  projection can do much better.
* `text_embeddings.npy` [C, E]: one unit vector per class, correlated like CLIP prompt
  embeddings (a shared prompt direction, sport groups, a class-specific part).
* `clip` features, like CLIP image embeddings of each snippet's middle frame (PVLR Sec. 4.2:
  RN50, 1024-d in `full`), unit-norm, in their own space with their own class text embeddings
  (`text_embeddings_clip.npy`): a frame sees appearance, not motion, so the class semantics
  are on exactly while the instance is in view (no temporal leakage, frequent per-frame
  dropouts from blur and occlusion), and any frame that merely looks like the sport - the
  venue, replays, unclear actions - resembles the class text strongly (PVLR Fig. 1a: high
  similarity "even when actual human actions do not occur"). Its geometry is that of real
  CLIP (Liang et al. 2022, "Mind the Gap"; benchmarks/clip_stats.py): image-image cosine ~0.55,
  cosine to the image mean ~0.75, image-text cosine ~0.29 to the own class while it is in view
  and ~0.17 otherwise (all images sit in a cone leaning towards the texts), modality gap ~0.9;
  zero-shot snippet classification is far from perfect (per-video nuisance that resembles other
  classes, dropouts). Generated after, and from draws after, the other streams, so adding or
  changing it leaves `i3d` / `videoclip` unchanged.

Nothing is a noise-free linear function of the labels: every modality has temporally correlated
noise, per-video style, per-instance variation and class sub-types, and the confusers above.
Generation is deterministic: the world (class vectors, text) comes from the seed, video i of a
split from (seed, split, i) with separate streams for train and test, so test videos are new
draws. Any change to what is generated must bump GENERATOR_VERSION (it names the cache entry).
"""
import argparse
import dataclasses
import math
import sys
from typing import Iterator

import numpy as np

from wstal_jax.errors import WstalError, cli_main

GENERATOR_VERSION = 4  # 1: development snapshots; 2: without the `clip` stream; 3: `clip` with
                       # an unrealistic geometry (image cosines ~0.95, zero-shot 94%); 4: the
                       # `clip` geometry of real CLIP (i3d / videoclip identical to 3)
SIZES = ("small", "full")
SNIPPET_FRAMES = 16
FPS = 25.0
SECONDS_PER_SNIPPET = SNIPPET_FRAMES / FPS
VL_FEATURE = "videoclip"
CLIP_FEATURE = "clip"

# THUMOS14's 20 classes in its class-list order (W-TALC classlist.npy).
CLASSES = (
    "BaseballPitch", "BasketballDunk", "Billiards", "CleanAndJerk", "CliffDiving",
    "CricketBowling", "CricketShot", "Diving", "FrisbeeCatch", "GolfSwing", "HammerThrow",
    "HighJump", "JavelinThrow", "LongJump", "PoleVault", "Shotput", "SoccerPenalty",
    "TennisSwing", "ThrowDiscus", "VolleyballSpiking")

# Median instance length (s) per class, read off the THUMOS14 annotations (train/test average).
_MEDIAN_LENGTH_S = (3.0, 1.55, 2.4, 9.0, 2.7, 1.25, 1.15, 2.5, 2.2, 4.2, 7.1, 4.8, 6.3, 7.0, 6.5,
                    4.8, 2.8, 1.55, 4.0, 1.8)
# Mean logit of the fraction of a video inside actions, per (main) class, same source.
_COVERAGE_LOGIT = (-2.2, -1.25, -2.2, 0.2, -1.2, -1.45, -1.65, -0.95, -0.65, -1.1, -0.6, -0.85,
                   -1.2, -0.85, -0.45, -0.75, -1.8, -1.45, -0.35, -1.1)
# Sport groups share a venue (stadium, pool, court) and part of their text semantics.
_GROUP = (0, 1, 2, 3, 4, 0, 0, 4, 5, 6, 7, 7, 7, 7, 7, 7, 5, 6, 7, 1)
_NUM_GROUPS = 8
# Pairs that share videos in THUMOS14 (most of its two-class videos).
_PARTNER = {4: 7, 7: 4, 5: 6, 6: 5}
_NUM_GENERIC = 10      # background scene types (crowd, studio, scoreboard, close-up, ...)
_NUM_DISTRACTOR = 6    # class-agnostic motion types (camera pan, people walking, ...)
_NUM_SUBTYPES = 3      # visual sub-types (viewpoints) of each class
_NUM_NUISANCE = 16     # nuisance directions per modality
_REF_DIM = 64          # feature dim at which the noise amplitudes are given
_NOISE_POWER = 0.1     # per-dim noise std ~ (_REF_DIM / dim) ** _NOISE_POWER (see synthesize)


@dataclasses.dataclass(frozen=True)
class SizeSpec:
  """One built-in size: feature dims, video counts, durations (log-normal, clipped), shards."""
  name: str
  rgb_dim: int
  flow_dim: int
  vl_dim: int
  clip_dim: int
  num_train: int
  num_test: int
  log_duration_mean: float
  log_duration_std: float
  min_duration_s: float
  max_duration_s: float
  num_shards: int

  @property
  def i3d_dim(self) -> int:
    return self.rgb_dim + self.flow_dim


_SPECS = {
    # THUMOS14 durations: log-mean 4.94 (median ~150 s), log-std 0.92, 31 s .. 1409 s.
    "full": SizeSpec("full", 1024, 1024, 768, 1024, 200, 212, 4.98, 0.92, 15.0, 1500.0, 8),
    # Same structure, shorter videos (about 40 .. 400 snippets) and small dims.
    "small": SizeSpec("small", 64, 64, 64, 64, 200, 212, math.log(70.0), 0.6, 26.0, 256.0, 2),
}


@dataclasses.dataclass(frozen=True)
class Knobs:
  """The generator's calibrated constants (BENCHMARK.md; benchmarks/calibrate_synthetic.py).

  Amplitudes are lengths along unit vectors, in units of the per-dimension standard deviation
  of the fast isotropic noise at feature dim 64 (see `synthesize` for other dims).
  """
  # Structure.
  coverage_logit_std: float = 1.0         # fraction inside actions: logit-normal per class
  length_log_std: float = 0.6             # within-class spread of instance lengths
  length_scale: float = 1.15              # on the class medians: matches the pooled mean 4.0 s
  coverage_shift: float = -0.2            # on the class logits: matches the pooled mean 0.29
  gap_concentration: float = 0.6          # Dirichlet: small -> clustered instances, short gaps
  second_class_prob: float = 0.04         # for classes without a THUMOS partner
  partner_prob: float = 0.5               # CliffDiving/Diving, CricketBowling/CricketShot
  third_class_prob: float = 0.04          # of two-class videos
  ambiguous_video_prob: float = 0.17      # videos with unclear actions (37 / 212 in test)
  shot_log_mean: float = math.log(5.0)    # shot lengths (s), log-normal
  shot_log_std: float = 0.7
  venue_shot_prob: float = 0.5            # background shots showing the venue
  distractor_shot_prob: float = 0.25      # background shots with class-agnostic motion
  replay_shot_prob: float = 0.3           # venue shots with a slow-motion replay
  # I3D-like profile over the instance's relative time u: Gaussian bumps of std width / n
  # around n discriminative moments (one more per i3d_peak_every_s beyond the first).
  i3d_width: float = 0.15
  i3d_floor: float = 0.1                  # evidence everywhere inside, weak but not absent
  i3d_peak_every_s: float = 4.0
  i3d_strength_log_std: float = 0.35
  # I3D amplitudes.
  app: float = 7.0                        # class appearance (RGB) at the profile peak
  motion: float = 7.0                     # class motion (flow) at the profile peak
  actionness: float = 2.5                 # class-agnostic motion / person appearance
  venue_rgb: float = 3.0                  # class-correlated scene in RGB
  generic_rgb: float = 3.0                # other background scene types
  replay_overlay: float = 3.0             # graphics on replays (RGB)
  distractor: float = 4.0                 # distractor motion (flow)
  distractor_actionness: float = 1.5      # ... and how much of it looks like actionness
  instance_var: float = 1.5               # per-instance random deviation
  style: float = 2.0                      # per-video constant offset
  noise: float = 1.0                      # fast temporally correlated noise (at dim 64)
  nuisance: float = 1.5                   # along the nuisance directions (AR, per video)
  noise_slow: float = 0.6                 # slow drift
  i3d_scale: float = 0.25
  i3d_offset: float = 0.1
  # Vision-language features.
  vl_sem: float = 4.0                     # class semantics, flat over the instance
  vl_leak: float = 0.9                    # relative level just outside an instance
  vl_leak_s: tuple = (1.5, 3.5)           # decay length of the leakage (s), per instance
  vl_flicker_z: float = -0.5              # N(0,1) quantile: ~30% of snippets flicker ...
  vl_flicker_level: float = 0.2           # ... to this fraction of the class semantics
  vl_venue: float = 2.6
  vl_generic: float = 3.0
  vl_img: float = 26.0                    # modality gap: shared offset of all visual features
  vl_style: float = 1.5
  vl_noise: float = 0.15
  vl_nuisance: float = 1.0
  vl_noise_slow: float = 0.08
  # CLIP-like image features (same units as the vision-language ones), calibrated on the
  # statistics of real CLIP embeddings (benchmarks/clip_stats.py, module docstring).
  clip_sem: float = 4.0                   # class semantics while the instance is in view
  clip_flicker_z: float = -0.3            # ~38% of snippets lose most of the semantics ...
  clip_flicker_level: float = 0.25        # ... keeping this fraction
  clip_venue: float = 3.4                 # the venue looks like the sport (Fig. 1a)
  clip_replay: float = 0.9                # replays / unclear actions: level of semantics
  clip_generic: float = 3.0
  clip_img: float = 12.0                  # the image cone: cosine to the image mean ~0.75
  clip_img_text: float = 0.28             # cone direction vs text mean: unmatched cosine ~0.17
  clip_style: float = 1.5
  clip_noise: float = 0.3                 # per-dim std at dim 64; constant norm at other dims
  clip_nuisance: float = 2.5              # per-video confusers: zero-shot ~60-70%, not ~95%


KNOBS = Knobs()


def builtin_name(size: str, seed: int) -> str:
  """Cache directory name: size, seed and GENERATOR_VERSION."""
  return f"synthetic-thumos14-{size}-seed{int(seed)}-v{GENERATOR_VERSION}"


def _check_seed(seed) -> int:
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise WstalError(f"synthetic seed must be an integer >= 0, got {seed!r}")
  return int(seed)


def get_spec(size: str) -> SizeSpec:
  """The SizeSpec of a built-in size; WstalError for an unknown one."""
  if size not in _SPECS:
    raise WstalError(f"unknown synthetic size {size!r}; expected one of {list(SIZES)}")
  return _SPECS[size]


# ------------------------------------------------------------------------------------ layout


@dataclasses.dataclass
class Layout:
  """Everything about one video except its features (times in seconds).

  segments [N, 2], segment_labels [N], ambiguous [M, 2] are the annotations; `events` are all
  action-like intervals that shape the features: (start, end, class, kind, strength), kind in
  {"instance", "unclear", "replay"}; `shots` [S, 2] with shot_kind [S] ("action", "venue",
  "generic") and shot_type [S] (generic scene type or -1) and distractor [S] (type or -1).
  """
  duration: float
  classes: list
  segments: np.ndarray
  segment_labels: np.ndarray
  ambiguous: np.ndarray
  events: list
  shots: np.ndarray
  shot_kind: list
  shot_type: np.ndarray
  distractor: np.ndarray

  @property
  def num_snippets(self) -> int:
    return max(1, int(self.duration / SECONDS_PER_SNIPPET))


def _video_classes(rng, primary: int, knobs: Knobs) -> list:
  classes = [primary]
  partner = _PARTNER.get(primary)
  if partner is not None and rng.random() < knobs.partner_prob:
    classes.append(partner)
  elif rng.random() < knobs.second_class_prob:
    same = [c for c in range(len(CLASSES)) if _GROUP[c] == _GROUP[primary] and c != primary]
    pool = same if same and rng.random() < 0.6 else [c for c in range(len(CLASSES))
                                                    if c != primary]
    classes.append(int(rng.choice(pool)))
  if len(classes) == 2 and rng.random() < knobs.third_class_prob:
    classes.append(int(rng.choice([c for c in range(len(CLASSES)) if c not in classes])))
  return classes


def _coverage(rng, primary: int, knobs: Knobs) -> float:
  z = rng.normal(_COVERAGE_LOGIT[primary] + knobs.coverage_shift, knobs.coverage_logit_std)
  return float(np.clip(1.0 / (1.0 + np.exp(-z)), 0.02, 0.9))


def _place(rng, lengths, free_s, knobs: Knobs):
  """Start times for consecutive intervals of `lengths` with Dirichlet gaps summing to free_s."""
  gaps = rng.dirichlet(np.full(len(lengths) + 1, knobs.gap_concentration)) * free_s
  starts = np.cumsum(gaps[:-1]) + np.concatenate([[0.0], np.cumsum(lengths)[:-1]])
  return starts


def sample_layout(rng: np.random.Generator, spec: SizeSpec, primary: int, *,
                  annotate_ambiguous: bool, knobs: Knobs = KNOBS) -> Layout:
  """Draws one video's structure: duration, classes, instances, shots, background events."""
  duration = float(np.clip(np.exp(rng.normal(spec.log_duration_mean, spec.log_duration_std)),
                           spec.min_duration_s, spec.max_duration_s))
  duration = round(duration, 2)
  classes = _video_classes(rng, primary, knobs)
  target = _coverage(rng, primary, knobs) * duration
  share = rng.uniform(0.2, 0.5) if len(classes) > 1 else 0.0
  lengths, labels = [], []
  while not lengths or sum(lengths) < target:
    c = classes[0]
    if len(classes) > 1 and rng.random() < share:
      c = int(rng.choice(classes[1:]))
    length = knobs.length_scale * float(np.exp(rng.normal(math.log(_MEDIAN_LENGTH_S[c]),
                                                             knobs.length_log_std)))
    lengths.append(float(np.clip(length, 0.3, 0.8 * duration)))
    labels.append(c)
  for c in classes[1:]:  # every labelled class has at least one instance
    if c not in labels:
      labels[int(rng.integers(len(labels)))] = c
  while len(lengths) > 1 and sum(lengths) > 0.9 * duration:
    lengths.pop()
    labels.pop()
  classes = [c for c in classes if c in labels]
  lengths = np.asarray(lengths)
  starts = _place(rng, lengths, duration - lengths.sum(), knobs)
  segments = np.round(np.stack([starts, starts + lengths], 1), 2)
  segments[:, 1] = np.minimum(segments[:, 1], duration)
  labels = np.asarray(labels, np.int32)
  events = [(float(s), float(e), int(c), "instance", 1.0) for (s, e), c in zip(segments, labels)]

  # Shots tile the video; a shot that overlaps an instance shows the venue.
  bounds = [0.0]
  while bounds[-1] < duration:
    bounds.append(bounds[-1] + float(np.exp(rng.normal(knobs.shot_log_mean, knobs.shot_log_std))))
  bounds[-1] = duration
  shots = np.stack([bounds[:-1], bounds[1:]], 1)
  num_shots = len(shots)
  in_action = np.zeros(num_shots, bool)
  for s, e in segments:
    in_action |= (shots[:, 0] < e) & (shots[:, 1] > s)
  shot_kind, shot_type = [], np.full(num_shots, -1)
  distractor = np.full(num_shots, -1)
  for j in range(num_shots):
    if in_action[j]:
      shot_kind.append("action")
      continue
    venue = rng.random() < knobs.venue_shot_prob
    shot_kind.append("venue" if venue else "generic")
    if not venue:
      shot_type[j] = rng.integers(_NUM_GENERIC)
    if rng.random() < knobs.distractor_shot_prob:
      distractor[j] = rng.integers(_NUM_DISTRACTOR)
    s, e = shots[j]
    if venue and e - s > 1.5 and rng.random() < knobs.replay_shot_prob:
      ln = min(e - s - 0.5, rng.uniform(2.0, 5.0))
      st = rng.uniform(s + 0.25, e - 0.25 - ln)
      events.append((st, st + ln, int(rng.choice(classes)), "replay",
                     float(rng.uniform(0.35, 0.7))))

  # Unclear actions (THUMOS14 marks them ambiguous in test videos) sit in the gaps between
  # instances; train videos have them too, unannotated.
  ambiguous = []
  order = np.argsort(segments[:, 0])
  edges = np.concatenate([[0.0], segments[order].reshape(-1), [duration]]).reshape(-1, 2)
  free = edges[edges[:, 1] - edges[:, 0] > 1.5]
  if rng.random() < knobs.ambiguous_video_prob and len(free):
    num = min(len(free), 1 + int(rng.poisson(1.7)))
    room = free[:, 1] - free[:, 0]
    for gs, ge in free[np.sort(rng.choice(len(free), num, replace=False, p=room / room.sum()))]:
      ln = min(ge - gs - 0.4, float(np.exp(rng.normal(math.log(4.0), 0.6))))
      st = round(float(rng.uniform(gs + 0.1, ge - 0.2 - ln)), 2)
      en = round(st + ln, 2)
      events.append((st, en, int(rng.choice(classes)), "unclear", float(rng.uniform(0.25, 0.55))))
      if annotate_ambiguous:
        ambiguous.append((st, en))
  return Layout(duration=duration, classes=sorted(classes), segments=segments.astype(np.float32),
                segment_labels=labels,
                ambiguous=np.asarray(ambiguous, np.float32).reshape(-1, 2), events=events,
                shots=shots, shot_kind=shot_kind, shot_type=shot_type, distractor=distractor)


def sample_layouts(size: str, seed: int, split: str, knobs: Knobs = KNOBS) -> list:
  """The layouts (structure only, no features) of every video of a split; fast."""
  return [layout for layout, _ in _iter_layouts(get_spec(size), seed, split, knobs)]


_SPLIT_KEY = {"train": 1, "test": 2}
_WORLD_KEY = 0


def _iter_layouts(spec: SizeSpec, seed: int, split: str, knobs: Knobs):
  """Yields (layout, feature rng) per video; train and test use disjoint random streams."""
  if split not in _SPLIT_KEY:
    raise WstalError(f"unknown split {split!r}; expected one of {sorted(_SPLIT_KEY)}")
  seed = _check_seed(seed)
  key = _SPLIT_KEY[split]
  num = spec.num_train if split == "train" else spec.num_test
  # Primary classes are balanced over the split (THUMOS14 has about 10 videos per class).
  order_rng = np.random.default_rng(np.random.SeedSequence([seed, key]))
  primaries = order_rng.permutation(np.resize(np.arange(len(CLASSES)), num))
  for i in range(num):
    layout_rng = np.random.default_rng(np.random.SeedSequence([seed, key, i, 0]))
    feature_rng = np.random.default_rng(np.random.SeedSequence([seed, key, i, 1]))
    yield (sample_layout(layout_rng, spec, int(primaries[i]),
                         annotate_ambiguous=split == "test", knobs=knobs), feature_rng)


# ------------------------------------------------------------------------------------- world


@dataclasses.dataclass
class World:
  """The seed's fixed vectors: a bank of unit rows in the joint [rgb | flow | vl] space.

  text_CxE: unit-norm class text embeddings. rows: name -> row indices into bank_KxD.
  text_basis_QxE: orthonormal basis of the span of the text vectors' parts.
  clip: the CLIP-like image space ({'text': [C, E'], 'sem': [C * subtypes, E'], 'venue',
    'generic', 'img', 'nuisance', 'basis'}), drawn from its own stream.
  """
  spec: SizeSpec
  text_CxE: np.ndarray
  text_basis_QxE: np.ndarray
  bank_KxD: np.ndarray
  rows: dict
  clip: dict = dataclasses.field(default_factory=dict)


def _unit(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


def make_world(seed: int, spec: SizeSpec) -> World:
  """Class, scene and motion vectors and the text embeddings of one seed (shared by splits)."""
  rng = np.random.default_rng(np.random.SeedSequence([_check_seed(seed), _WORLD_KEY]))
  num_c, num_k = len(CLASSES), _NUM_SUBTYPES
  group = np.asarray(_GROUP)
  dr, df, de = spec.rgb_dim, spec.flow_dim, spec.vl_dim

  def rand(n, d):
    return _unit(rng.standard_normal((n, d)))

  cls_of = np.repeat(np.arange(num_c), num_k)  # row (c, k) -> c
  # RGB: appearance = venue + class pose + sub-type (viewpoint) + generic person.
  venue_rgb = _unit(0.6 * rand(_NUM_GROUPS, dr)[group] + 0.8 * rand(num_c, dr))
  person = rand(1, dr)
  app = _unit(0.45 * venue_rgb[cls_of] + 0.5 * rand(_NUM_GROUPS, dr)[group][cls_of]
              + 0.3 * rand(num_c, dr)[cls_of] + 0.5 * rand(num_c * num_k, dr) + 0.3 * person)
  generic_rgb = rand(_NUM_GENERIC, dr)
  overlay = rand(1, dr)
  # Flow: class motion shares a group part (all throws swing) and generic motion.
  move = rand(1, df)
  motion = _unit(0.7 * rand(_NUM_GROUPS, df)[group][cls_of] + 0.3 * rand(num_c, df)[cls_of]
                 + 0.45 * rand(num_c * num_k, df) + 0.3 * move)
  distract = _unit(0.8 * rand(_NUM_DISTRACTOR, df) + 0.6 * move)
  # Vision-language space: text = prompt + group + class. Visual semantics share the group and
  # class parts only partly; the rest of what the image encoder sees (`free`) is orthogonal to
  # the text span, so zero-shot logits differ by a few units, as CLIP's do, at every dim.
  prompt = rand(1, de)
  grp_vl = rand(_NUM_GROUPS, de)[group]
  cls_vl = rand(num_c, de)
  text = _unit(0.75 * prompt + 0.45 * grp_vl + 0.5 * cls_vl)
  text_basis = np.linalg.qr(np.concatenate([prompt, grp_vl, cls_vl]).T)[0].T  # [<=29, E]

  def free(n):
    x = rng.standard_normal((n, de))
    return _unit(x - (x @ text_basis.T) @ text_basis)

  sem = _unit(0.3 * grp_vl[cls_of] + 0.4 * cls_vl[cls_of] + 0.75 * free(num_c)[cls_of]
              + 0.35 * free(num_c * num_k))
  venue_vl = _unit(0.3 * grp_vl + 0.35 * cls_vl + 0.88 * free(num_c))
  generic_vl = free(_NUM_GENERIC)
  img = free(1)
  # Nuisance directions (lighting, camera, crowd, ...) overlap the class directions, so that
  # they confuse classes at every feature dim.
  mix = lambda vecs, d: _unit(0.6 * rand(_NUM_NUISANCE, d) + 0.8 * _unit(
      rng.standard_normal((_NUM_NUISANCE, len(vecs))) @ vecs))
  nuis_rgb, nuis_flow, nuis_vl = mix(app, dr), mix(motion, df), mix(sem, de)

  blocks = [("app", 0, app), ("person", 0, person), ("venue_rgb", 0, venue_rgb),
            ("overlay", 0, overlay),
            ("generic_rgb", 0, generic_rgb), ("motion", 1, motion), ("move", 1, move),
            ("distract", 1, distract), ("sem", 2, sem), ("venue_vl", 2, venue_vl),
            ("generic_vl", 2, generic_vl), ("img", 2, img), ("nuis_rgb", 0, nuis_rgb),
            ("nuis_flow", 1, nuis_flow), ("nuis_vl", 2, nuis_vl)]
  offsets = (0, dr, dr + df, dr + df + de)
  bank = np.zeros((sum(len(b) for _, _, b in blocks), offsets[-1]), np.float32)
  rows, k = {}, 0
  for name, space, vecs in blocks:
    bank[k:k + len(vecs), offsets[space]:offsets[space + 1]] = vecs
    rows[name] = np.arange(k, k + len(vecs))
    k += len(vecs)
  return World(spec=spec, text_CxE=text.astype(np.float32), text_basis_QxE=text_basis,
               bank_KxD=bank, rows=rows, clip=_clip_world(seed, spec))


def _clip_world(seed: int, spec: SizeSpec) -> dict:
  """The CLIP-like image space: the same construction as the vision-language one (text =
  prompt + group + class; visual semantics share it only partly), from its own stream."""
  rng = np.random.default_rng(np.random.SeedSequence([_check_seed(seed), _WORLD_KEY, 1]))
  num_c, num_k, d = len(CLASSES), _NUM_SUBTYPES, spec.clip_dim
  group = np.asarray(_GROUP)
  cls_of = np.repeat(np.arange(num_c), num_k)

  def rand(n):
    return _unit(rng.standard_normal((n, d)))

  prompt, grp, cls = rand(1), rand(_NUM_GROUPS)[group], rand(num_c)
  text = _unit(0.75 * prompt + 0.45 * grp + 0.5 * cls)
  basis = np.linalg.qr(np.concatenate([prompt, grp, cls]).T)[0].T

  def free(n):
    x = rng.standard_normal((n, d))
    return _unit(x - (x @ basis.T) @ basis)

  # A frame of the sport is closer to the text than a video embedding is (appearance is
  # what CLIP learned), and the venue is nearly as close as the action itself.
  sem = _unit(0.35 * grp[cls_of] + 0.45 * cls[cls_of] + 0.7 * free(num_c)[cls_of]
              + 0.3 * free(num_c * num_k))
  venue = _unit(0.35 * grp + 0.35 * cls + 0.8 * free(num_c))
  nuis = _unit(0.6 * rand(_NUM_NUISANCE) + 0.8 * _unit(
      rng.standard_normal((_NUM_NUISANCE, len(sem))) @ sem))
  return {"text": text.astype(np.float32), "sem": sem, "venue": venue,
          "generic": free(_NUM_GENERIC), "img": free(1)[0], "nuisance": nuis, "basis": basis}


# ---------------------------------------------------------------------------------- features

_SUB = 4  # sub-samples per snippet: evidence is averaged over the snippet's 0.64 s


def _ar_processes(rng, num_t, specs) -> dict:
  """Stationary AR(1) processes along time: specs [(name, dim, rho, std)] -> {name: [T, dim]}.

  All are advanced in one loop over time (float32), which is most of the cost of synthesis.
  """
  rho = np.concatenate([np.full(d, r, np.float32) for _, d, r, _ in specs])
  std = np.concatenate([np.full(d, s, np.float32) for _, d, _, s in specs])
  x = rng.standard_normal((num_t, rho.size), dtype=np.float32)
  x[1:] *= np.sqrt(1.0 - rho * rho)
  for t in range(1, num_t):
    x[t] += rho * x[t - 1]
  x *= std
  out, k = {}, 0
  for name, d, _, _ in specs:
    out[name] = x[:, k:k + d]
    k += d
  return out


def synthesize(rng: np.random.Generator, world: World, layout: Layout,
               knobs: Knobs = KNOBS) -> dict:
  """Features of one video: {"i3d": [T, rgb+flow], "videoclip": [T, E], "clip": [T, E']}."""
  spec = world.spec
  num_t = layout.num_snippets
  dr, df, de = spec.rgb_dim, spec.flow_dim, spec.vl_dim
  rows = world.rows
  num_k = _NUM_SUBTYPES
  tau_TxS = (np.arange(num_t)[:, None] + (np.arange(_SUB) + 0.5) / _SUB) * SECONDS_PER_SNIPPET
  coef_TxK = np.zeros((num_t, world.bank_KxD.shape[0]), np.float32)
  extra_TxD = np.zeros((num_t, dr + df + de), np.float32)
  sem_TxSxR = np.zeros((num_t, _SUB, len(CLASSES) * num_k), np.float32)
  # Isotropic noise: per-dim std ~ (_REF_DIM / dim) ** _NOISE_POWER. With a constant per-dim
  # std a linear learner finds wide features much harder (more dims to overfit from 200
  # videos); with a constant norm, much easier (4x cleaner projections at dim 1024). A power
  # in between keeps `small` and `full` about equally hard (calibrate_synthetic.py).
  g_i3d, g_vl = (_REF_DIM / dr) ** _NOISE_POWER, (_REF_DIM / de) ** _NOISE_POWER
  ar = _ar_processes(rng, num_t, [
      ("flicker", 1, 0.6, 1.0), ("nuisance", 3 * _NUM_NUISANCE, 0.9, 1.0),
      ("i3d", dr + df, 0.6, g_i3d * knobs.noise),
      ("i3d_slow", dr + df, 0.97, g_i3d * knobs.noise_slow),
      ("vl", de, 0.6, g_vl * knobs.vl_noise), ("vl_slow", de, 0.97, g_vl * knobs.vl_noise_slow)])

  event_rows = []  # (start, end, kind, class sub-type row) for the clip stream
  for start, end, c, kind, strength in layout.events:
    k = c * num_k + int(rng.integers(num_k))
    event_rows.append((start, end, kind, k))
    length = max(end - start, 1e-3)
    amp = strength * float(np.exp(rng.normal(0.0, knobs.i3d_strength_log_std)))
    motion_gain = 0.4 if kind == "replay" else 1.0  # slow motion
    t0 = max(0, int(start / SECONDS_PER_SNIPPET))
    t1 = min(num_t, int(end / SECONDS_PER_SNIPPET) + 1)
    if t1 > t0 and kind == "replay":  # broadcast replays carry graphics (wipes, logos)
      cover = ((tau_TxS[t0:t1] >= start) & (tau_TxS[t0:t1] <= end)).mean(1)
      coef_TxK[t0:t1, rows["overlay"][0]] += knobs.replay_overlay * cover
    if t1 > t0:
      u = (tau_TxS[t0:t1] - start) / length
      inside = (u >= 0.0) & (u <= 1.0)
      # Discriminative moments: one, or a few in long instances, with weak stretches between
      # them and near the edges (what classification pre-training makes I3D see).
      num_peaks = 1 + int(rng.poisson(max(0.0, length - knobs.i3d_peak_every_s)
                                      / knobs.i3d_peak_every_s))
      if num_peaks == 1:
        centres = rng.uniform(0.3, 0.7, 1)
        heights = np.ones(1)
      else:
        jitter = rng.uniform(0.25, 0.75, num_peaks)
        centres = 0.1 + 0.8 * (np.arange(num_peaks) + jitter) / num_peaks
        heights = rng.uniform(0.5, 1.0, num_peaks)
        heights[rng.integers(num_peaks)] = 1.0
      width = knobs.i3d_width / num_peaks
      z = (u[..., None] - centres) / width
      peaks = np.max(heights * np.exp(-0.5 * z * z), -1)
      prof = np.where(inside, knobs.i3d_floor + (1 - knobs.i3d_floor) * peaks, 0.0).mean(1)
      z = z / 1.6  # actionness is broader than class evidence
      act = np.where(inside, np.max(heights * np.exp(-0.5 * z * z), -1), 0.0).mean(1)
      coef_TxK[t0:t1, rows["app"][k]] += knobs.app * amp * prof
      coef_TxK[t0:t1, rows["motion"][k]] += knobs.motion * amp * motion_gain * prof
      coef_TxK[t0:t1, rows["person"][0]] += knobs.actionness * amp * act
      coef_TxK[t0:t1, rows["move"][0]] += knobs.actionness * amp * motion_gain * act
      dev = _unit(rng.standard_normal(dr + df)) * knobs.instance_var * amp
      extra_TxD[t0:t1, :dr + df] += prof[:, None] * dev[None, :]
    # Vision-language: flat over the instance, decaying into the context on both sides.
    decay = rng.uniform(*knobs.vl_leak_s)
    level = {"instance": rng.uniform(0.85, 1.1), "replay": rng.uniform(0.7, 0.9),
             "unclear": rng.uniform(0.5, 0.8)}[kind]
    v0 = max(0, int((start - 5 * decay) / SECONDS_PER_SNIPPET))
    v1 = min(num_t, int((end + 5 * decay) / SECONDS_PER_SNIPPET) + 1)
    if v1 > v0:
      tt = tau_TxS[v0:v1]
      out = np.maximum(start - tt, 0.0) + np.maximum(tt - end, 0.0)
      q = level * np.where(out > 0, knobs.vl_leak * np.exp(-out / decay), 1.0)
      np.maximum(sem_TxSxR[v0:v1, :, k], q, out=sem_TxSxR[v0:v1, :, k])
      if kind == "instance":
        dev = _unit(rng.standard_normal(de)) * knobs.instance_var
        extra_TxD[v0:v1, dr + df:] += (q * (out == 0)).mean(1)[:, None] * dev[None, :]
  # Per-frame semantics flicker (occlusion, small actor, camera cuts): runs of snippets where
  # the class is barely visible to the image encoder.
  flicker_T = ar["flicker"][:, 0] < knobs.vl_flicker_z
  visible_T = np.where(flicker_T, knobs.vl_flicker_level, 1.0).astype(np.float32)
  coef_TxK[:, rows["sem"]] += knobs.vl_sem * sem_TxSxR.mean(1) * visible_T[:, None]

  # Shots: the venue (class-correlated scene), generic scenes, distractor motion.
  num_s = len(layout.shots)
  shot_TxS = np.minimum(np.searchsorted(layout.shots[:, 1], tau_TxS, side="right"), num_s - 1)
  kind = np.asarray(layout.shot_kind)
  venue_level = np.where(kind == "action", rng.uniform(0.8, 1.0, num_s),
                         np.where(kind == "venue", rng.uniform(0.5, 1.0, num_s), 0.1))
  venue_T = venue_level[shot_TxS].mean(1)
  for c in layout.classes:
    coef_TxK[:, rows["venue_rgb"][c]] += knobs.venue_rgb * venue_T / len(layout.classes)
    coef_TxK[:, rows["venue_vl"][c]] += knobs.vl_venue * venue_T / len(layout.classes)
  generic_SxG = np.zeros((num_s, _NUM_GENERIC), np.float32)
  has_type = layout.shot_type >= 0
  generic_SxG[np.nonzero(has_type)[0], layout.shot_type[has_type]] = rng.uniform(
      0.6, 1.0, int(has_type.sum()))
  generic_TxG = generic_SxG[shot_TxS].mean(1)
  coef_TxK[:, rows["generic_rgb"]] += knobs.generic_rgb * generic_TxG
  coef_TxK[:, rows["generic_vl"]] += knobs.vl_generic * generic_TxG
  distract_SxJ = np.zeros((num_s, _NUM_DISTRACTOR), np.float32)
  has_dis = layout.distractor >= 0
  distract_SxJ[np.nonzero(has_dis)[0], layout.distractor[has_dis]] = rng.uniform(
      0.5, 1.0, int(has_dis.sum()))
  distract_TxJ = distract_SxJ[shot_TxS].mean(1)
  coef_TxK[:, rows["distract"]] += knobs.distractor * distract_TxJ
  coef_TxK[:, rows["move"][0]] += knobs.distractor_actionness * distract_TxJ.sum(1)
  coef_TxK[:, rows["img"][0]] += knobs.vl_img
  nuis_Tx3N = ar["nuisance"]
  for j, name in enumerate(("nuis_rgb", "nuis_flow", "nuis_vl")):
    amp = knobs.vl_nuisance if name == "nuis_vl" else knobs.nuisance
    coef_TxK[:, rows[name]] += amp * nuis_Tx3N[:, j * _NUM_NUISANCE:(j + 1) * _NUM_NUISANCE]

  raw_TxD = coef_TxK @ world.bank_KxD + extra_TxD
  vl_style = rng.standard_normal(de)
  vl_style -= (vl_style @ world.text_basis_QxE.T) @ world.text_basis_QxE
  style = np.concatenate([_unit(rng.standard_normal(dr)) * knobs.style,
                          _unit(rng.standard_normal(df)) * knobs.style,
                          _unit(vl_style) * knobs.vl_style])
  raw_TxD += style[None, :].astype(np.float32)
  raw_TxD[:, :dr + df] += ar["i3d"] + ar["i3d_slow"]
  raw_TxD[:, dr + df:] += ar["vl"] + ar["vl_slow"]
  i3d = np.maximum(knobs.i3d_scale * raw_TxD[:, :dr + df] + knobs.i3d_offset, 0.0)
  vl = _unit(raw_TxD[:, dr + df:])
  # Every draw of the clip stream comes after those of the streams above.
  clip = _clip_features(rng, world, layout, tau_TxS, event_rows, venue_T, generic_TxG, knobs)
  return {"i3d": i3d.astype(np.float32), VL_FEATURE: vl.astype(np.float32),
          CLIP_FEATURE: clip.astype(np.float32)}


def _clip_features(rng, world, layout, tau_TxS, event_rows, venue_T, generic_TxG, knobs):
  """CLIP-like middle-frame embeddings [T, E'] (module docstring): semantics exactly while an
  instance is in view, frequent per-frame dropouts, strong venue / replay resemblance."""
  cw = world.clip
  num_t, d = tau_TxS.shape[0], world.spec.clip_dim
  g = math.sqrt(_REF_DIM / d)  # constant norm: the geometry (cosines) is the same at every dim
  ar = _ar_processes(rng, num_t, [
      ("flicker", 1, 0.3, 1.0), ("nuisance", _NUM_NUISANCE, 0.9, 1.0),
      ("noise", d, 0.3, g * knobs.clip_noise)])
  mid_T = tau_TxS[:, tau_TxS.shape[1] // 2]  # the snippet's middle frame
  sem_TxR = np.zeros((num_t, cw["sem"].shape[0]))
  for start, end, kind, k in event_rows:
    level = 1.0 if kind == "instance" else knobs.clip_replay * rng.uniform(0.7, 1.0)
    inside_T = (mid_T >= start) & (mid_T <= end)
    sem_TxR[inside_T, k] = np.maximum(sem_TxR[inside_T, k], level)
  visible_T = np.where(ar["flicker"][:, 0] < knobs.clip_flicker_z, knobs.clip_flicker_level,
                       1.0)
  raw = knobs.clip_sem * (sem_TxR * visible_T[:, None]) @ cw["sem"]
  for c in layout.classes:
    raw += knobs.clip_venue * np.outer(venue_T / len(layout.classes), cw["venue"][c])
  raw += knobs.clip_generic * generic_TxG @ cw["generic"]
  # The image cone: a shared direction that leans towards the texts' mean (CLIP's modality
  # gap with cos(mean image, mean text) ~ 0.3), so every frame is mildly similar to every text.
  mu_txt = _unit(cw["text"].astype(np.float64).mean(0))
  img = _unit(knobs.clip_img_text * mu_txt
               + math.sqrt(1.0 - knobs.clip_img_text ** 2) * cw["img"])  # cw["img"] _|_ texts
  raw += knobs.clip_img * img[None, :]
  raw += knobs.clip_nuisance * ar["nuisance"] @ cw["nuisance"]
  style = rng.standard_normal(d)
  style -= (style @ cw["basis"].T) @ cw["basis"]
  raw += knobs.clip_style * _unit(style)[None, :] + ar["noise"]
  return _unit(raw)



# ---------------------------------------------------------------------------------- datasets


def iter_videos(size: str, seed: int, split: str, *, knobs: Knobs = KNOBS,
                world: World | None = None) -> Iterator:
  """Yields the VideoRecords of one split, in manifest order."""
  from wstal_jax.data import format as fmt  # imports TensorFlow; only needed here
  spec = get_spec(size)
  world = world or make_world(seed, spec)
  for i, (layout, rng) in enumerate(_iter_layouts(spec, seed, split, knobs)):
    label = np.zeros(len(CLASSES), np.float32)
    label[layout.classes] = 1.0
    yield fmt.VideoRecord(
        name=f"synthetic_{split}_{i:04d}", duration=layout.duration,
        features=synthesize(rng, world, layout, knobs), label=label,
        segments=layout.segments, segment_labels=layout.segment_labels,
        ambiguous=layout.ambiguous, source=f"synthetic {size} seed {seed} {split} video {i}")


def generate(out_dir: str, size: str, seed: int = 0, *, overwrite: bool = False,
             knobs: Knobs = KNOBS) -> dict:
  """Writes the `size` benchmark of `seed` to out_dir (atomically); returns the manifest.

  `knobs` other than the default are for calibration experiments and are recorded in the
  manifest's source.
  """
  from wstal_jax.data import format as fmt
  spec = get_spec(size)
  seed = _check_seed(seed)
  world = make_world(seed, spec)
  source = {"generator": "wstal_jax.data.synthetic", "generator_version": GENERATOR_VERSION,
            "size": size, "seed": int(seed),
            "i3d": f"RGB in dims [0, {spec.rgb_dim}), flow in [{spec.rgb_dim}, {spec.i3d_dim})"}
  if knobs != KNOBS:
    source["knobs"] = {k: v for k, v in dataclasses.asdict(knobs).items()
                       if v != getattr(KNOBS, k)}
  return fmt.write_dataset(
      out_dir, dataset=f"synthetic-thumos14-{size}", classes=list(CLASSES),
      feature_dims={"i3d": spec.i3d_dim, VL_FEATURE: spec.vl_dim, CLIP_FEATURE: spec.clip_dim},
      feature_text_embeddings={CLIP_FEATURE: world.clip["text"]},
      splits={split: iter_videos(size, seed, split, knobs=knobs, world=world)
              for split in ("train", "test")},
      num_shards=spec.num_shards, text_embeddings=world.text_CxE, primary_feature="i3d",
      snippet_frames=SNIPPET_FRAMES, fps=FPS, source=source, overwrite=overwrite)


# --------------------------------------------------------------------------------------- CLI


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(
      prog="python -m wstal_jax.data.synthetic",
      description="Write the built-in THUMOS14-structured synthetic benchmark (shard format of "
                  "wstal_jax.data.format). Same size and seed give byte-identical shards.")
  p.add_argument("--size", choices=SIZES, default="small",
                 help="small: I3D 2x64 + VL 64 dims, 40-400 snippets per video, generates in "
                      "seconds; full: I3D 2x1024 + VL 768 and THUMOS14-like lengths "
                      "(~1.5 GB). Default: %(default)s.")
  p.add_argument("--seed", type=int, default=0, help="generator seed (default: %(default)s)")
  p.add_argument("--out", default=None,
                 help="output dataset directory (must not exist unless --overwrite); default: "
                      "the cache entry used by ensure_builtin ($WSTAL_DATA_CACHE or "
                      "~/.cache/wstal_jax)")
  p.add_argument("--overwrite", action="store_true", help="replace an existing --out directory")
  return p


@cli_main
def main(argv=None):
  """CLI entry point; prints the dataset directory."""
  args = _parser().parse_args(argv)
  if args.out:
    generate(args.out, args.size, args.seed, overwrite=args.overwrite)
    print(args.out)
  else:
    from wstal_jax.data import builtin_cache   # it imports this module
    print(builtin_cache.ensure_builtin(args.size, args.seed))


if __name__ == "__main__":
  main(sys.argv[1:])
