r"""Which loss terms train a group of parameters? Gradient shares within a parameter group.

  python benchmarks/grad_reach.py --workdir=workdirs/mllm4wtal \
      --groups='csr_attn=csr/attn*,base_attn=base/*attn*' [--checkpoint=latest] [--batches=4]

The trainer logs each weighted term's share of the summed per-term gradient norms over *all*
trained parameters (`train.term_grad_norms_fn`). A term that reaches only a few parameters
(MLLM4WTAL's distillations reach only the attention branches) has a small global share even
when it is the one that trains those parameters. This prints, for the freshly initialised
parameters and for a checkpoint of a finished run (its config.json), each term's share of the
gradient norm restricted to each group: the parameters whose flattened path
('base/trunk/attn/Conv_0/kernel', ...) matches the group's glob. Shares are means over
`--batches` training batches of the run's own pipeline (seed 0). Groups matching no
parameter are an error naming the patterns.
"""
import argparse
import fnmatch
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from wstal_jax import checkpointing, input_pipeline, run_setup  # noqa: E402
from wstal_jax import workdir as workdir_lib  # noqa: E402
from wstal_jax.errors import WstalError  # noqa: E402


def parse_groups(text: str) -> dict[str, str]:
  groups = {}
  for item in text.split(","):
    name, sep, pattern = item.partition("=")
    if not sep or not name or not pattern:
      raise WstalError(f"--groups: {item!r} is not NAME=GLOB")
    groups[name] = pattern
  return groups


def group_shares(method, params, batches, consts, step: int, groups: dict[str, str]):
  """{group: {term: share of the summed per-term gradient norms over the group's
  parameters}} (terms with a zero gradient there are left out), averaged over `batches`."""
  weights = method.loss_weights()
  paths = list(traverse_util.flatten_dict(params, sep="/"))
  for name, pattern in groups.items():
    if not any(fnmatch.fnmatch(p, pattern) for p in paths):
      raise WstalError(f"group {name}={pattern!r} matches no parameter; paths look like "
                       f"{paths[:3]}")
  norms = {g: {k: [] for k in weights} for g in groups}
  for i, batch in enumerate(batches):
    for k, w in weights.items():
      def term(p, k=k, w=w, batch=batch):
        return w * method.loss(p, batch, consts, jax.random.key(i), jnp.int32(step))[1][k]
      grads = traverse_util.flatten_dict(jax.grad(term)(params), sep="/")
      for g, pattern in groups.items():
        sq = sum(float(jnp.sum(v.astype(jnp.float32) ** 2)) for p, v in grads.items()
                 if fnmatch.fnmatch(p, pattern))
        norms[g][k].append(np.sqrt(sq))
  out = {}
  for g, per_term in norms.items():
    means = {k: float(np.mean(v)) for k, v in per_term.items()}
    total = sum(means.values())
    out[g] = {k: 100.0 * v / total for k, v in sorted(means.items(), key=lambda kv: -kv[1])
              if v > 0} if total else {}
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="a training run's directory")
  p.add_argument("--groups", required=True, help="NAME=GLOB,... over flattened param paths")
  p.add_argument("--checkpoint", default="latest", help="latest, best or a step")
  p.add_argument("--batches", type=int, default=4)
  args = p.parse_args()
  try:
    groups = parse_groups(args.groups)
    config = workdir_lib.saved_config(args.workdir, {})
    run = run_setup.setup(config)
    stream = input_pipeline.train_batches(
        run.data_dir, split="train", batch_size=int(config.train.batch_size),
        num_snippets=int(config.data.num_snippets), seed=0, sampling=config.data.sampling,
        vlm_feature=config.data.vlm_feature, token_fields=run_setup.token_fields(config),
        max_proposals=run_setup.max_proposals(config))
    batches = [run.put_batch(next(stream)) for _ in range(args.batches)]
    ckpts = checkpointing.Checkpoints(os.path.join(args.workdir, "checkpoints"),
                                      read_only=True)
    step = ckpts.resolve(args.checkpoint)
    init = run.init_params(jax.random.split(jax.random.key(config.seed))[0], batches[0])
    trained = ckpts.restore_params(step, run.abstract_params(batches[0]))
  except (WstalError, OSError) as e:
    sys.exit(f"error: {e}")
  print("| parameters | group | term shares of the group's gradient norm (%) |")
  print("|---|---|---|")
  for label, params, at in (("init", init, 0), (f"step {step}", trained, step)):
    for g, shares in group_shares(run.method, params, batches, run.consts, at,
                                  groups).items():
      cells = ", ".join(f"{k} {v:.1f}" for k, v in shares.items())
      print(f"| {label} | {g} ({groups[g]}) | {cells} |")


if __name__ == "__main__":
  main()
