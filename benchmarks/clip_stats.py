"""Embedding-geometry statistics of a dataset's CLIP-like image stream and its class texts.

    python benchmarks/clip_stats.py --data_dir=DIR                    # test and train splits
    python benchmarks/clip_stats.py --data_dir=DIR --splits=test --json=/tmp/clip_stats/s.json

Answers "are the built-in `clip` stream's statistics like those of real CLIP embeddings?" by
computing, per split, the quantities that published analyses of CLIP report:

1. image-image cosine between random pairs of distinct snippets (`--num_pairs`, fixed
   `--seed`), separately for action snippets (centre inside a ground-truth segment) and
   background snippets (outside every segment and every ambiguous segment);
2. text-text cosine between the class text embeddings (off-diagonal mean / min / max);
3. image-text cosine: action snippets to the text of their own class, action snippets to the
   other classes, background snippets to all classes (mean, std, 5th / 95th percentile);
4. the modality gap of Liang et al. (NeurIPS 2022, "Mind the Gap"): || mean of L2-normalised
   image features - mean of L2-normalised text embeddings ||, plus each embedding's cosine to
   its own modality's mean ("conformity", Levi & Gilboa, "The Double-Ellipsoid Geometry of
   CLIP");
5. zero-shot accuracy of action snippets by argmax cosine over the class texts.

Snippet t covers [t, t + 1) x snippet_frames / fps seconds; it is "action" of class c when its
centre lies in a segment of class c. Snippets whose centre is in segments of two different
classes are left out of the per-class statistics (3, 5) but count as action in (1) and (4);
snippets in ambiguous segments are in neither group. Features are L2-normalised before every
statistic (the built-in stream is unit-norm already; its mean raw norm is printed).

Videos are read with the package's own reader (`wstal_jax.data.format.read_videos`, manifest
order) and the text embeddings with `format.load_text_embeddings(feature=...)` (the stream's
own text space when the manifest names one). Prints one markdown table; `--json` also writes
the numbers.
"""
import argparse
import json
import pathlib
import sys
import time

import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from wstal_jax.data import format as data_format  # noqa: E402
from wstal_jax.errors import WstalError, cli_main  # noqa: E402

_BACKGROUND, _MULTI, _IGNORED = -1, -2, -3


def _unit(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def snippet_labels(num_t, sps, segments, segment_labels, ambiguous):
  """int [T]: class of the snippet's centre, _BACKGROUND, _MULTI (two classes) or _IGNORED."""
  centre_T = (np.arange(num_t) + 0.5) * sps
  lab_T = np.full(num_t, _BACKGROUND, np.int64)
  for (start, end), c in zip(np.asarray(segments).reshape(-1, 2), segment_labels):
    inside_T = (centre_T >= start) & (centre_T <= end)
    clash_T = inside_T & (lab_T >= 0) & (lab_T != c)
    lab_T = np.where(inside_T & (lab_T == _BACKGROUND), int(c), lab_T)
    lab_T[clash_T] = _MULTI
  for start, end in np.asarray(ambiguous).reshape(-1, 2):
    lab_T[(centre_T >= start) & (centre_T <= end) & (lab_T == _BACKGROUND)] = _IGNORED
  return lab_T


def load_split(data_dir, split, feature, sps):
  """(features [N, E] float32 as stored, labels [N], video index [N]) of all snippets."""
  feats, labels, vids = [], [], []
  for i, rec in enumerate(data_format.read_videos(data_dir, split, features=[feature])):
    x = rec.features[feature]
    feats.append(x)
    labels.append(snippet_labels(len(x), sps, rec.segments, rec.segment_labels,
                                 rec.ambiguous))
    vids.append(np.full(len(x), i, np.int64))
  return np.concatenate(feats), np.concatenate(labels), np.concatenate(vids)


def _summary(v):
  v = np.asarray(v, np.float64)
  return {"mean": float(v.mean()), "std": float(v.std()), "p5": float(np.percentile(v, 5)),
          "p95": float(np.percentile(v, 95)), "min": float(v.min()), "max": float(v.max()),
          "n": int(v.size)}


def random_pair_cosines(x_NxE, idx, num_pairs, rng, vid=None, cross_video=False):
  """Cosines of `num_pairs` random pairs of distinct rows among `idx` (unit rows)."""
  idx = np.asarray(idx)
  if len(idx) < 2:
    return None
  a = rng.integers(0, len(idx), num_pairs)
  b = rng.integers(0, len(idx) - 1, num_pairs)
  b = b + (b >= a)  # distinct snippets
  ia, ib = idx[a], idx[b]
  if cross_video:
    keep = vid[ia] != vid[ib]
    ia, ib = ia[keep], ib[keep]
  return _summary(np.einsum("ne,ne->n", x_NxE[ia], x_NxE[ib]))


def split_stats(x_raw, lab, vid, text_CxE, num_pairs, seed):
  rng = np.random.default_rng(seed)
  x = _unit(x_raw)
  t = _unit(text_CxE)
  num_c = len(t)
  action = np.flatnonzero((lab >= 0) | (lab == _MULTI))
  single = np.flatnonzero(lab >= 0)
  background = np.flatnonzero(lab == _BACKGROUND)
  out = {"num_snippets": int(len(x)), "num_action": int(len(action)),
         "num_background": int(len(background)),
         "num_ignored": int(np.sum(lab == _IGNORED)),
         "raw_norm_mean": float(np.linalg.norm(x_raw, axis=1).mean())}
  # (1) image-image.
  out["img_img_action"] = random_pair_cosines(x, action, num_pairs, rng)
  out["img_img_background"] = random_pair_cosines(x, background, num_pairs, rng)
  out["img_img_all_cross_video"] = random_pair_cosines(
      x, np.arange(len(x)), num_pairs, rng, vid=vid, cross_video=True)
  # action pairs of the same / different classes, from different videos (one larger draw).
  a = single[rng.integers(0, len(single), 4 * num_pairs)]
  b = single[rng.integers(0, len(single), 4 * num_pairs)]
  cos_ab = np.einsum("ne,ne->n", x[a], x[b])
  same = (lab[a] == lab[b]) & (vid[a] != vid[b])
  diff = (lab[a] != lab[b]) & (vid[a] != vid[b])
  out["img_img_action_same_class"] = _summary(cos_ab[same][:num_pairs])
  out["img_img_action_diff_class"] = _summary(cos_ab[diff][:num_pairs])
  # (3) image-text.
  sim_NxC = x @ t.T
  own = sim_NxC[single, lab[single]]
  other_mask = np.ones((len(single), num_c), bool)
  other_mask[np.arange(len(single)), lab[single]] = False
  out["img_text_own"] = _summary(own)
  out["img_text_other"] = _summary(sim_NxC[single][other_mask])
  out["img_text_background"] = _summary(sim_NxC[background].ravel())
  out["img_text_all"] = _summary(sim_NxC.ravel())
  others = np.where(other_mask, sim_NxC[single], -np.inf).max(axis=1)
  out["own_minus_best_other"] = _summary(own - others)
  # (4) modality gap and conformity.
  mu_img = x.mean(axis=0)
  mu_txt = t.mean(axis=0)
  out["gap_all"] = float(np.linalg.norm(mu_img - mu_txt))
  out["gap_action"] = float(np.linalg.norm(x[action].mean(axis=0) - mu_txt))
  out["img_mean_norm"] = float(np.linalg.norm(mu_img))
  out["txt_mean_norm"] = float(np.linalg.norm(mu_txt))
  out["img_conformity"] = _summary(x @ _unit(mu_img))
  out["txt_conformity"] = _summary(t @ _unit(mu_txt))
  out["cos_img_mean_txt_mean"] = float(_unit(mu_img) @ _unit(mu_txt))
  # (5) zero-shot.
  pred = sim_NxC[single].argmax(axis=1)
  out["zero_shot_acc"] = float(np.mean(pred == lab[single]))
  out["zero_shot_chance"] = 1.0 / num_c
  return out


def text_stats(text_CxE):
  t = _unit(text_CxE)
  g = t @ t.T
  off = g[~np.eye(len(t), dtype=bool)]
  return {"text_text": _summary(off), "num_classes": int(len(t)), "dim": int(t.shape[1])}


def _f(s, key="mean", spread=True):
  if s is None:
    return "n/a"
  if spread:
    return f"{s[key]:.3f} [{s['p5']:.3f}, {s['p95']:.3f}]"
  return f"{s[key]:.3f}"


def markdown(results, text, splits):
  rows = [
      ("snippets (action / background / ambiguous)",
       lambda r: f"{r['num_snippets']} ({r['num_action']} / {r['num_background']} / "
                 f"{r['num_ignored']})"),
      ("raw feature norm (mean)", lambda r: f"{r['raw_norm_mean']:.3f}"),
      ("(1) img-img cos, action pairs: mean [p5, p95]", lambda r: _f(r["img_img_action"])),
      ("(1) img-img cos, background pairs", lambda r: _f(r["img_img_background"])),
      ("(1) img-img cos, any pair, different videos", lambda r: _f(r["img_img_all_cross_video"])),
      ("(1) img-img cos, action, same class, diff. videos", lambda r: _f(r["img_img_action_same_class"])),
      ("(1) img-img cos, action, diff. class, diff. videos", lambda r: _f(r["img_img_action_diff_class"])),
      ("(3) img-text cos, action to own class: mean [p5, p95]", lambda r: _f(r["img_text_own"])),
      ("(3) img-text cos, action to own class: std", lambda r: f"{r['img_text_own']['std']:.3f}"),
      ("(3) img-text cos, action to other classes", lambda r: _f(r["img_text_other"])),
      ("(3) img-text cos, action to other classes: std",
       lambda r: f"{r['img_text_other']['std']:.3f}"),
      ("(3) img-text cos, background to all classes", lambda r: _f(r["img_text_background"])),
      ("(3) img-text cos, background: std", lambda r: f"{r['img_text_background']['std']:.3f}"),
      ("(3) own - best other class cos", lambda r: _f(r["own_minus_best_other"])),
      ("(4) modality gap: norm(mu_img - mu_txt), all snippets", lambda r: f"{r['gap_all']:.3f}"),
      ("(4) modality gap (action snippets only)", lambda r: f"{r['gap_action']:.3f}"),
      ("(4) norm(mu_img) / norm(mu_txt)",
       lambda r: f"{r['img_mean_norm']:.3f} / {r['txt_mean_norm']:.3f}"),
      ("(4) cos(mu_img, mu_txt)", lambda r: f"{r['cos_img_mean_txt_mean']:.3f}"),
      ("(4) img conformity cos(x, mu_img): mean [p5, p95]", lambda r: _f(r["img_conformity"])),
      ("(4) text conformity cos(t, mu_txt)", lambda r: _f(r["txt_conformity"])),
      ("(5) zero-shot acc, action snippets (chance)",
       lambda r: f"{100 * r['zero_shot_acc']:.1f}% ({100 * r['zero_shot_chance']:.1f}%)"),
  ]
  lines = ["| statistic | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
  for name, fn in rows:
    lines.append(f"| {name} | " + " | ".join(fn(results[s]) for s in splits) + " |")
  tt = text["text_text"]
  lines.append(f"| (2) text-text cos, {text['num_classes']} classes: mean (min, max) | "
               + " | ".join(f"{tt['mean']:.3f} ({tt['min']:.3f}, {tt['max']:.3f})"
                            for _ in splits) + " |")
  return "\n".join(lines)


def _parser():
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--data_dir", required=True, help="dataset directory (manifest.json + shards)")
  p.add_argument("--feature", default="clip", help="image feature stream (default: clip)")
  p.add_argument("--splits", default="test,train", help="comma-separated splits")
  p.add_argument("--num_pairs", type=int, default=20000, help="random pairs per statistic (1)")
  p.add_argument("--seed", type=int, default=0, help="seed of the pair sampling")
  p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
  return p


@cli_main
def main(argv=None):
  args = _parser().parse_args(argv)
  manifest = data_format.read_manifest(args.data_dir)
  if args.feature not in manifest["features"]:
    raise WstalError(f"feature {args.feature!r} is not in the dataset (has "
                     f"{sorted(manifest['features'])})")
  text = data_format.load_text_embeddings(args.data_dir, manifest, feature=args.feature)
  if text is None:
    raise WstalError(f"{args.data_dir}: the dataset has no text embeddings")
  if text.shape[1] != manifest["features"][args.feature]["dim"]:
    raise WstalError(f"text embeddings are {text.shape[1]}-d, feature {args.feature!r} is "
                     f"{manifest['features'][args.feature]['dim']}-d: not one space")
  sps = data_format.seconds_per_snippet(manifest)
  splits = [s for s in args.splits.split(",") if s]
  results = {}
  for split in splits:
    t0 = time.time()
    x, lab, vid = load_split(args.data_dir, split, args.feature, sps)
    results[split] = split_stats(x, lab, vid, text, args.num_pairs, args.seed)
    print(f"# {split}: {len(x)} snippets read and measured in {time.time() - t0:.1f} s",
          file=sys.stderr)
  txt = text_stats(text)
  print(f"dataset: {manifest.get('dataset')} ({args.data_dir}); feature {args.feature!r} "
        f"{manifest['features'][args.feature]['dim']}-d; {txt['num_classes']} class texts; "
        f"{args.num_pairs} pairs, seed {args.seed}\n")
  print(markdown(results, txt, splits))
  if args.json:
    pathlib.Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    with open(args.json, "w") as fh:
      json.dump({"data_dir": args.data_dir, "feature": args.feature, "splits": results,
                 "text": txt, "num_pairs": args.num_pairs, "seed": args.seed}, fh, indent=1)


if __name__ == "__main__":
  main()
