"""Calibration proxies of the built-in synthetic benchmark against BENCHMARK.md.

    python benchmarks/calibrate_synthetic.py --size=full --seed=0
    python benchmarks/calibrate_synthetic.py --size=small --data_dir=DIR   # a written dataset
    python benchmarks/calibrate_synthetic.py --size=small --knob vl_leak=0.9   # try a knob

The real methods are not needed: three proxies measure whether the generated features have the
properties the papers rely on, on THUMOS14's protocol (avg mAP over tIoU 0.1:0.1:0.7 with
`metrics.detection_map`, proposals with `postprocess.video_proposals` and the `vlpo` preset,
upsampling x4 instead of x24 for speed):

1. zero-shot localizer from the vision-language features alone: P = softmax over classes of
   cos(snippet, text) / 0.01 (CLIP's logit scale), min-max normalised over time per video,
   thresholded into proposals for the video's ground-truth classes (so only localization is
   measured). Real data: 14.9 avg mAP (30.8 at 0.1, 2.3 at 0.7), VLPO Table 4.
2. pseudo-label foreground / background mIoU (Ju et al. Table 3, Eq. 4 ternary labels with
   delta_h = 0.3, delta_l = 0.1). For each test video and each of its classes c: predicted
   foreground = P_c > delta_h, predicted background = P_c < delta_l (the rest is uncertain);
   IoU with the ground truth accumulated over the test set, foreground averaged over classes.
   P for I3D: a linear (C+1)-way softmax probe trained on train snippets with their ground-truth
   snippet labels (the features' best linear reading). P for VL: the class softmax of (1).
   Real data: I3D 56.0 / 88.7, VL 75.6 / 34.1. Also printed: the same from the class softmax of
   the MIL CAS of (3), and the raw rates behind them (% of ground-truth foreground, near
   background (<= 3 s from an instance of the class) and far background with P > delta_h / P <
   delta_l).
3. a trained linear MIL baseline on the I3D features: top-k (k = T/8) MIL with softmax
   cross-entropy on video labels, videos resampled to 256 snippets, AdamW; CAS = per-class
   logits min-max normalised over time. Evaluated with its own predicted classes (video score
   >= 0.2) and with the ground-truth classes. Real data: VLPO's (stronger) baseline 42.4.

Both trained proxies see I3D features standardised with train statistics. Prints one table;
about a minute on 2 CPU cores for `small`, several minutes for `full`.
"""
import argparse
import dataclasses
import pathlib
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402

from wstal_jax import metrics  # noqa: E402
from wstal_jax import postprocess  # noqa: E402
from wstal_jax.data import synthetic  # noqa: E402

SPS = synthetic.SECONDS_PER_SNIPPET
LOGIT_SCALE = 100.0   # CLIP
DELTA_H, DELTA_L = 0.3, 0.1   # Ju et al. Sec. 4.1


@dataclasses.dataclass
class Video:
  name: str
  duration: float
  i3d: np.ndarray
  vl: np.ndarray
  label: np.ndarray
  segments: np.ndarray
  segment_labels: np.ndarray
  ambiguous: np.ndarray


def load(size, seed, split, knobs, data_dir=None):
  """The videos of a split, generated in memory (or read from data_dir)."""
  if data_dir:
    from wstal_jax.data import format as fmt  # pylint: disable=import-outside-toplevel
    recs = fmt.read_videos(data_dir, split)
  else:
    recs = synthetic.iter_videos(size, seed, split, knobs=knobs)
  return [Video(r.name, float(r.duration), r.features["i3d"], r.features[synthetic.VL_FEATURE],
                r.label, r.segments, r.segment_labels, r.ambiguous) for r in recs]


def snippet_labels(v: Video, num_classes: int) -> np.ndarray:
  """[T] class of the instance covering each snippet centre, num_classes for background."""
  t = v.i3d.shape[0]
  centre = (np.arange(t) + 0.5) * SPS
  lab = np.full(t, num_classes, np.int64)
  for (s, e), c in zip(v.segments, v.segment_labels):
    lab[(centre >= s) & (centre < e)] = c
  return lab


def inside_mask(v: Video, c: int) -> np.ndarray:
  t = v.i3d.shape[0]
  centre = (np.arange(t) + 0.5) * SPS
  m = np.zeros(t, bool)
  for (s, e), k in zip(v.segments, v.segment_labels):
    if k == c:
      m |= (centre >= s) & (centre < e)
  return m


# ------------------------------------------------------------------------------ proxies


def vl_class_probs(v: Video, text_CxE) -> np.ndarray:
  """[T, C] softmax over classes of the cosine to each class text (features are unit norm)."""
  cos = v.vl @ (text_CxE / np.linalg.norm(text_CxE, axis=1, keepdims=True)).T
  z = LOGIT_SCALE * cos
  z -= z.max(1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(1, keepdims=True)


def minmax_over_time(x_TxC):
  lo, hi = x_TxC.min(0, keepdims=True), x_TxC.max(0, keepdims=True)
  return (x_TxC - lo) / np.maximum(hi - lo, 1e-8)


def localization_map(videos, seqs, video_scores, num_classes):
  """avg mAP and mAP_K of proposals from per-video [T, C] sequences in [0, 1]."""
  cfg = postprocess.get_preset("vlpo")
  cfg.upsample = 4  # x24 of the reference changes little here and costs time
  gt = {"video": [], "label": [], "start": [], "end": []}
  pred = {"video": [], "label": [], "score": [], "start": [], "end": []}
  for v, seq, vs in zip(videos, seqs, video_scores):
    for (s, e), c in zip(v.segments, v.segment_labels):
      gt["video"].append(v.name)
      gt["label"].append(int(c))
      gt["start"].append(float(s))
      gt["end"].append(float(e))
    p = postprocess.video_proposals(vs, seq, None, seconds_per_snippet=SPS,
                                    duration=v.duration, config=cfg, ambiguous=v.ambiguous)
    pred["video"] += [v.name] * len(p)
    for key in ("label", "score", "start", "end"):
      pred[key] += getattr(p, key).tolist()
  map_k, _ = metrics.detection_map({k: np.asarray(x) for k, x in gt.items()},
                                   {k: np.asarray(x) for k, x in pred.items()},
                                   metrics.THUMOS14_TIOU, num_classes=num_classes)
  return 100 * float(np.mean(map_k)), 100 * map_k


def pseudo_label_miou(videos, probs):
  """(foreground mIoU over classes, background IoU) of ternary pseudo-labels (Ju et al. Eq. 4)."""
  num_c = len(synthetic.CLASSES)
  fg_i, fg_u = np.zeros(num_c), np.zeros(num_c)
  bg_i = bg_u = 0.0
  for v, p in zip(videos, probs):
    for c in np.flatnonzero(v.label):
      gt = inside_mask(v, c)
      fg = p[:, c] > DELTA_H
      bg = p[:, c] < DELTA_L
      fg_i[c] += np.sum(fg & gt)
      fg_u[c] += np.sum(fg | gt)
      bg_i += np.sum(bg & ~gt)
      bg_u += np.sum(bg | ~gt)
  has = fg_u > 0
  return 100 * float(np.mean(fg_i[has] / fg_u[has])), 100 * bg_i / bg_u


def pseudo_label_breakdown(videos, probs):
  """Fractions (P > delta_h, P < delta_l) of GT foreground, near background (<= 3 s), far bg."""
  acc = {"fg": [], "near": [], "far": []}
  for v, p in zip(videos, probs):
    centre = (np.arange(len(p)) + 0.5) * SPS
    for c in np.flatnonzero(v.label):
      gt = inside_mask(v, c)
      seg = v.segments[v.segment_labels == c]
      dist = np.min(np.maximum(seg[None, :, 0] - centre[:, None], 0)
                    + np.maximum(centre[:, None] - seg[None, :, 1], 0), axis=1)
      for key, m in (("fg", gt), ("near", ~gt & (dist <= 3.0)), ("far", ~gt & (dist > 3.0))):
        acc[key].append(np.stack([p[m, c] > DELTA_H, p[m, c] < DELTA_L], 1))
  return {k: 100 * np.concatenate(x).mean(0) for k, x in acc.items()}


def train_probe(videos, num_classes, steps=400, batch=2048, seed=0, feature=lambda v: v.i3d):
  """Softmax regression over C+1 classes on every train snippet's `feature(v)` [T, D];
  returns predict(x) -> probs."""
  x = np.concatenate([feature(v) for v in videos])
  y = np.concatenate([snippet_labels(v, num_classes) for v in videos])
  d = x.shape[1]
  params = {"w": jnp.zeros((d, num_classes + 1)), "b": jnp.zeros(num_classes + 1)}
  opt = optax.adam(5e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb):
    def loss_fn(p):
      logits = xb @ p["w"] + p["b"]
      return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(x), batch)
    params, state, _ = step(params, state, jnp.asarray(x[idx]), jnp.asarray(y[idx]))
  w, b = np.asarray(params["w"]), np.asarray(params["b"])

  def predict(feat):
    z = feat @ w + b
    z -= z.max(1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(1, keepdims=True))[:, :num_classes]
  return predict


def temporal_window(x_TxD, w):
  """[T, (2w + 1) D]: each snippet with its w neighbours on each side (edge-padded)."""
  pad = np.pad(x_TxD, ((w, w), (0, 0)), mode="edge")
  return np.concatenate([pad[i:i + len(x_TxD)] for i in range(2 * w + 1)], axis=1)


def train_mil(videos, num_classes, steps=800, batch=16, length=256, seed=0, lr=1e-3):
  """Linear top-k MIL (k = T/8) with softmax CE on video labels; returns cas(x) -> logits."""
  d = videos[0].i3d.shape[1]
  params = {"w": jnp.zeros((d, num_classes)), "b": jnp.zeros(num_classes)}
  opt = optax.adamw(lr, weight_decay=5e-4)
  state = opt.init(params)
  k = length // 8

  @jax.jit
  def step(params, state, xb, yb):
    def loss_fn(p):
      cas = xb @ p["w"] + p["b"]                               # [B, T, C]
      top = jax.lax.top_k(jnp.swapaxes(cas, 1, 2), k)[0]       # [B, C, k]
      logits = top.mean(-1)
      target = yb / yb.sum(-1, keepdims=True)
      return optax.softmax_cross_entropy(logits, target).mean()
    loss, g = jax.value_and_grad(loss_fn)(params)
    upd, state = opt.update(g, state, params)
    return optax.apply_updates(params, upd), state, loss

  rng = np.random.default_rng(seed)
  for _ in range(steps):
    vids = rng.integers(0, len(videos), batch)
    # A fresh buffer per step: jnp.asarray may alias it while the previous step still runs.
    xb = np.empty((batch, length, d), np.float32)
    for j, i in enumerate(vids):
      t = videos[i].i3d.shape[0]
      # "random perturb" sampling: one random snippet from each of `length` equal bins.
      pos = np.floor((np.arange(length) + rng.random(length)) * t / length).astype(int)
      xb[j] = videos[i].i3d[np.minimum(pos, t - 1)]
    yb = np.stack([videos[i].label for i in vids])
    params, state, _ = step(params, state, jnp.asarray(xb), jnp.asarray(yb))
  w, b = np.asarray(params["w"]), np.asarray(params["b"])
  return lambda feat: feat @ w + b


def topk_video_scores(cas_TxC):
  t = cas_TxC.shape[0]
  k = max(1, t // 8)
  logits = -np.sort(-cas_TxC, axis=0)[:k].mean(0)
  e = np.exp(logits - logits.max())
  return e / e.sum()


# -------------------------------------------------------------------------------- main


def profile_checks(videos, text_CxE):
  """Mean VL cosine to the instance's class text: inside centre / edge / 2 s outside / far bg."""
  rows = {"centre": [], "edge": [], "outside_2s": [], "far_bg": []}
  for v in videos:
    cos = v.vl @ text_CxE.T
    t = len(cos)
    for (s, e), c in zip(v.segments, v.segment_labels):
      if e - s < 3 * SPS:
        continue
      ci = int((s + e) / 2 / SPS)
      rows["centre"].append(cos[min(ci, t - 1), c])
      rows["edge"].append(cos[min(int(s / SPS + 0.5), t - 1), c])
      o = int((e + 2.0) / SPS)
      if o < t and not inside_mask(v, c)[o]:
        rows["outside_2s"].append(cos[o, c])
    lab = snippet_labels(v, len(synthetic.CLASSES))
    for c in np.flatnonzero(v.label):
      rows["far_bg"] += cos[lab == len(synthetic.CLASSES), c].tolist()
  return {k: float(np.mean(x)) for k, x in rows.items()}


def _tick(what, t0=[None]):
  now = time.time()
  if t0[0] is not None:
    print(f"  [{now - t0[0]:6.1f} s] {what}", file=sys.stderr, flush=True)
  t0[0] = now


def run(size, seed, knobs, data_dir=None, mil_steps=800, only_vl=False):
  t0 = time.time()
  train = load(size, seed, "train", knobs, data_dir)
  test = load(size, seed, "test", knobs, data_dir)
  world = synthetic.make_world(seed, synthetic.get_spec(size))
  text = world.text_CxE
  if data_dir:
    from wstal_jax.data import format as fmt  # pylint: disable=import-outside-toplevel
    text = fmt.load_text_embeddings(data_dir)
  num_c = len(synthetic.CLASSES)
  t_load = time.time() - t0
  _tick("start")
  out = {}
  # (1) zero-shot VL localizer.
  vl_p = [vl_class_probs(v, text) for v in test]
  out["zs_gt"] = localization_map(test, [minmax_over_time(p) for p in vl_p],
                                  [v.label for v in test], num_c)
  out["zs_own"] = localization_map(test, [minmax_over_time(p) for p in vl_p],
                                   [topk_video_scores(np.log(p + 1e-9)) for p in vl_p], num_c)
  out["zs_acc"] = 100 * np.mean([v.label[np.argmax(p.mean(0))] for v, p in zip(test, vl_p)])
  _tick("zero-shot localization")
  out["pl_vl"] = pseudo_label_miou(test, vl_p)
  out["profile"] = profile_checks(test, text)
  out["breakdown"] = {"vl": pseudo_label_breakdown(test, vl_p)}
  if only_vl:
    out["time"] = (t_load, time.time() - t0 - t_load)
    return out
  # The trained proxies see I3D standardised with train statistics (linear models on raw,
  # non-negative features with a large common mean train slowly and unstably).
  x = np.concatenate([v.i3d for v in train])
  mean, std = x.mean(0), x.std()
  del x
  for v in train + test:
    v.i3d = (v.i3d - mean) / std
  # (2) pseudo-labels.
  probe = train_probe(train, num_c)
  out["pl_i3d"] = pseudo_label_miou(test, [probe(v.i3d) for v in test])
  out["breakdown"]["i3d probe"] = pseudo_label_breakdown(test, [probe(v.i3d) for v in test])
  _tick("probe")
  # The same probe on the VL features, on each snippet and on a window of 9 snippets (what
  # the Ju et al. VLP branch's temporal layers can see): how far any trained reading of the VL
  # stream can separate foreground from the background it resembles.
  vl_all = np.concatenate([v.vl for v in train])
  vl_mean, vl_std = vl_all.mean(0), vl_all.std()
  del vl_all
  vl = lambda v: (v.vl - vl_mean) / vl_std   # standardised with train statistics, as I3D
  vl_probe = train_probe(train, num_c, feature=vl)
  out["pl_vl_probe"] = pseudo_label_miou(test, [vl_probe(vl(v)) for v in test])
  vl_win = train_probe(train, num_c, feature=lambda v: temporal_window(vl(v), 4))
  out["pl_vl_window"] = pseudo_label_miou(test, [vl_win(temporal_window(vl(v), 4))
                                                 for v in test])
  _tick("VL probes")
  # (3) linear MIL baseline.
  cas_fn = train_mil(train, num_c, steps=mil_steps)
  _tick("MIL training")
  cas = [cas_fn(v.i3d) for v in test]
  vscore = [topk_video_scores(c) for c in cas]
  out["mil_own"] = localization_map(test, [minmax_over_time(c) for c in cas], vscore, num_c)
  out["mil_gt"] = localization_map(test, [minmax_over_time(c) for c in cas],
                                   [v.label for v in test], num_c)
  out["mil_acc"] = 100 * np.mean([v.label[np.argmax(s)] for v, s in zip(test, vscore)])
  out["mil_pl"] = pseudo_label_miou(
      test, [np.exp(c - c.max(1, keepdims=True)) / np.exp(c - c.max(1, keepdims=True)).sum(
          1, keepdims=True) for c in cas])
  _tick("MIL evaluation")
  out["time"] = (t_load, time.time() - t0 - t_load)
  return out


def _fmt_map(r):
  avg, k = r
  return f"{avg:5.1f}  ({k[0]:.1f} / {k[2]:.1f} / {k[4]:.1f} / {k[6]:.1f})"


def print_table(size, seed, out):
  print(f"\nsynthetic-thumos14-{size} seed {seed}  (generator v{synthetic.GENERATOR_VERSION}; "
        f"data {out['time'][0]:.0f} s, proxies {out['time'][1]:.0f} s)")
  print(f"{'proxy':48s} {'real THUMOS14':>14s}   synthetic")
  print(f"{'':48s} {'':>14s}   avg mAP (0.1 / 0.3 / 0.5 / 0.7)")
  print(f"{'(1) zero-shot VL localizer, GT classes':48s} {'14.9':>14s}   {_fmt_map(out['zs_gt'])}")
  print(f"{'    zero-shot VL localizer, own classes':48s} {'':>14s}   {_fmt_map(out['zs_own'])}"
        f"   top-1 acc {out['zs_acc']:.1f}")
  if "mil_own" not in out:
    print(f"{'    pseudo-labels FG / BG mIoU: VL cos-text':48s} {'75.6 / 34.1':>14s}   "
          f"{out['pl_vl'][0]:.1f} / {out['pl_vl'][1]:.1f}")
    for name, b in out.get("breakdown", {}).items():
      print(f"{name:10s} % >dh/<dl: fg {b['fg'][0]:.0f}/{b['fg'][1]:.0f}  near bg "
            f"{b['near'][0]:.0f}/{b['near'][1]:.0f}  far bg {b['far'][0]:.0f}/{b['far'][1]:.0f}")
    return
  print(f"{'(3) linear top-k MIL on I3D, own classes':48s} {'42.4 (*)':>14s}   "
        f"{_fmt_map(out['mil_own'])}   top-1 acc {out['mil_acc']:.1f}")
  print(f"{'    linear top-k MIL on I3D, GT classes':48s} {'':>14s}   {_fmt_map(out['mil_gt'])}")
  print(f"{'(2) pseudo-labels FG / BG mIoU: I3D probe':48s} {'56.0 / 88.7':>14s}   "
        f"{out['pl_i3d'][0]:.1f} / {out['pl_i3d'][1]:.1f}")
  print(f"{'    pseudo-labels FG / BG mIoU: VL cos-text':48s} {'75.6 / 34.1':>14s}   "
        f"{out['pl_vl'][0]:.1f} / {out['pl_vl'][1]:.1f}")
  print(f"{'    pseudo-labels FG / BG mIoU: VL probe':48s} {'':>14s}   "
        f"{out['pl_vl_probe'][0]:.1f} / {out['pl_vl_probe'][1]:.1f}   "
        f"(9-snippet window: {out['pl_vl_window'][0]:.1f} / {out['pl_vl_window'][1]:.1f})")
  print(f"{'    pseudo-labels FG / BG mIoU: MIL CAS':48s} {'':>14s}   "
        f"{out['mil_pl'][0]:.1f} / {out['mil_pl'][1]:.1f}")
  p = out["profile"]
  print(f"VL cos to own class text: centre {p['centre']:.3f}  edge {p['edge']:.3f}  "
        f"2 s outside {p['outside_2s']:.3f}  far background {p['far_bg']:.3f}")
  for name, b in out.get("breakdown", {}).items():
    print(f"{name:10s} % >dh/<dl: fg {b['fg'][0]:.0f}/{b['fg'][1]:.0f}  near bg "
          f"{b['near'][0]:.0f}/{b['near'][1]:.0f}  far bg {b['far'][0]:.0f}/{b['far'][1]:.0f}")
  print("(*) VLPO's baseline (MIL + actionness, conv embedding), not a linear probe.")


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  ap.add_argument("--size", choices=synthetic.SIZES, default="small")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--data_dir", default=None,
                  help="read a written dataset instead of generating in memory")
  ap.add_argument("--knob", action="append", default=[],
                  help="override a synthetic.Knobs field, name=value (repeatable)")
  ap.add_argument("--mil_steps", type=int, default=800)
  ap.add_argument("--only_vl", action="store_true", help="skip the trained proxies (2, 3)")
  args = ap.parse_args(argv)
  knobs = synthetic.KNOBS
  for kv in args.knob:
    name, val = kv.split("=", 1)
    cur = getattr(knobs, name)
    val = tuple(float(x) for x in val.split(",")) if isinstance(cur, tuple) else type(cur)(val)
    knobs = dataclasses.replace(knobs, **{name: val})
  out = run(args.size, args.seed, knobs, args.data_dir, args.mil_steps, args.only_vl)
  print_table(args.size, args.seed, out)


if __name__ == "__main__":
  main()
