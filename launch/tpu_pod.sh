#!/usr/bin/env bash
# Runs wstal_jax on every worker of an existing Cloud TPU VM slice (v4-32, v5p-64, ...).
#
# The same `python -m wstal_jax.main --distributed=on` command line goes to all workers through
# one `gcloud compute tpus tpu-vm ssh --worker=all`; --distributed=on makes main.py call
# jax.distributed.initialize(), which finds the other workers from the TPU VM metadata, so no
# coordinator flags are passed. Dataset shards and the workdir live on gs:// because every
# worker must read and write the same paths.
#
# Steps (each printed before it runs; --dry_run prints them and runs nothing):
#   1. gcloud compute tpus tpu-vm describe      check the TPU VM exists and is READY
#   2. copy the package to ~/wstal_jax on every worker, either
#        scp --recurse of this checkout's package files (default; replaces ~/wstal_jax), or
#        git clone --repo_url [--repo_ref]                          (replaces ~/wstal_jax)
#   3. pip install -c constraints.txt -e '.[tpu]' into ~/wstal_jax_venv (created if absent)
#   4. python -m wstal_jax.main --config=... --workdir=gs://... --distributed=on on every
#      worker, in the foreground: run this script inside tmux/screen so a dropped connection
#      does not stop it.
# It creates no TPU VM, bucket or disk. Steps 2-3 are skipped with --skip_setup.
set -euo pipefail

readonly USAGE="usage: launch/tpu_pod.sh --tpu=NAME --zone=ZONE --project=PROJECT \\
    --config=CONFIG --workdir=gs://BUCKET/DIR [--data_dir=gs://BUCKET/DATA] \\
    [--repo_url=URL [--repo_ref=REF]] [--python=BIN] [--skip_setup] [--dry_run] \\
    [-- EXTRA_MAIN_FLAGS...]

  --tpu, --zone, --project  an existing TPU VM (this script never creates one)
  --config                  config file, relative to the repository root, e.g. configs/vlpo.py
  --workdir                 gs:// directory for checkpoints and summaries (resumes if present)
  --data_dir                gs:// dataset directory, passed to main as --config.data.dir
  --repo_url, --repo_ref    git clone this repository (and check out REF) on the workers
                            instead of copying this checkout with scp
  --python                  interpreter (>= 3.11) that creates ~/wstal_jax_venv (default python3)
  --skip_setup              only run main (the package is already installed on every worker)
  --dry_run                 print the commands, one per line prefixed '[dry-run] ', run nothing
  -- FLAGS...               forwarded to every worker's main, e.g. -- --mode=eval"

readonly REMOTE_DIR=wstal_jax        # on each worker, relative to the ssh login directory ($HOME)
readonly REMOTE_VENV=wstal_jax_venv  # outside REMOTE_DIR so a fresh copy keeps the installed deps

usage_error() {
  printf 'error: %s\n%s\n' "$1" "$USAGE" >&2
  exit 2
}

# Shell-quotes one word only where needed (for --flag=value, only the value), so printed
# commands stay readable and can be pasted back into a shell.
quote_word() {
  if [[ -n "$1" && "$1" != *[!A-Za-z0-9_@%+=:,./-]* ]]; then
    printf '%s' "$1"
  elif [[ "$1" =~ ^(--[A-Za-z0-9_.-]+=)(.*)$ ]]; then
    printf '%s' "${BASH_REMATCH[1]}"
    quote_word "${BASH_REMATCH[2]}"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_cmd() {
  local word sep=""
  for word in "$@"; do
    printf '%s' "$sep"
    quote_word "$word"
    sep=" "
  done
}

run() {
  if ((dry_run)); then
    printf '[dry-run] %s\n' "$(quote_cmd "$@")"
  else
    printf '+ %s\n' "$(quote_cmd "$@")" >&2
    "$@"
  fi
}

tpu="" zone="" project="" config="" workdir="" data_dir="" repo_url="" repo_ref=""
python_bin=python3
skip_setup=0
dry_run=0
extra=()
while (($#)); do
  case "$1" in
    --tpu=*) tpu="${1#*=}" ;;
    --zone=*) zone="${1#*=}" ;;
    --project=*) project="${1#*=}" ;;
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --data_dir=*) data_dir="${1#*=}" ;;
    --repo_url=*) repo_url="${1#*=}" ;;
    --repo_ref=*) repo_ref="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --skip_setup) skip_setup=1 ;;
    --dry_run) dry_run=1 ;;
    -h | --help)
      printf '%s\n' "$USAGE"
      exit 0
      ;;
    --)
      shift
      extra=("$@")
      break
      ;;
    *) usage_error "unknown argument '$1' (flags for main go after --)" ;;
  esac
  shift
done

missing=()
for name in tpu zone project config workdir; do
  [[ -n "${!name}" ]] || missing+=("--$name")
done
((${#missing[@]} == 0)) || usage_error "missing required flag(s): ${missing[*]}"
[[ "$workdir" == gs://?* ]] ||
  usage_error "--workdir must be a gs:// path that every worker can write, got '$workdir'"
[[ -z "$data_dir" || "$data_dir" == gs://?* ]] ||
  usage_error "--data_dir must be a gs:// path that every worker can read, got '$data_dir'"
[[ -z "$repo_ref" || -n "$repo_url" ]] || usage_error "--repo_ref needs --repo_url"

# Relative paths below (scp sources, the config check) are relative to the repository root.
cd "$(dirname "${BASH_SOURCE[0]}")/.."
if [[ -z "$repo_url" && ! -f "${config%%:*}" ]]; then
  usage_error "config file '${config%%:*}' not found in $(pwd) (--config is relative to the repository root)"
fi
if ((!dry_run)) && ! command -v gcloud >/dev/null; then
  printf 'error: gcloud not found on PATH (install the Google Cloud CLI)\n' >&2
  exit 2
fi

tpu_flags=(--zone="$zone" --project="$project")
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$tpu" "${tpu_flags[@]}" --worker=all --command="$1"
}

# 1. The TPU VM must already exist: say so instead of creating one.
if ((dry_run)); then
  run gcloud compute tpus tpu-vm describe "$tpu" "${tpu_flags[@]}" --format='value(state)'
else
  state="$(run gcloud compute tpus tpu-vm describe "$tpu" "${tpu_flags[@]}" \
    --format='value(state)')" || {
    printf 'error: TPU VM %s not found in %s/%s; create it first (see launch/README.md)\n' \
      "$tpu" "$project" "$zone" >&2
    exit 1
  }
  if [[ "$state" != READY ]]; then
    printf 'error: TPU VM %s is %s, not READY\n' "$tpu" "${state:-in an unknown state}" >&2
    exit 1
  fi
fi

# 2-3. Same package and dependencies on every worker.
if ((!skip_setup)); then
  install="cd $REMOTE_DIR && { test -x ../$REMOTE_VENV/bin/python || $(quote_word "$python_bin") -m venv ../$REMOTE_VENV; }"
  install+=" && ../$REMOTE_VENV/bin/python -m pip install -q -c constraints.txt -e \".[tpu]\""
  if [[ -n "$repo_url" ]]; then
    clone="rm -rf $REMOTE_DIR && git clone -q $(quote_word "$repo_url") $REMOTE_DIR"
    [[ -z "$repo_ref" ]] || clone+=" && git -C $REMOTE_DIR checkout -q $(quote_word "$repo_ref")"
    on_all_workers "$clone && $install"
  else
    # Only what `pip install -e .` and main need: no .git, virtualenvs, workdirs or caches.
    sources=()
    for path in setup.cfg pyproject.toml constraints.txt README.md wstal_jax configs; do
      if [[ -e "$path" ]]; then sources+=("$path"); fi
    done
    on_all_workers "rm -rf $REMOTE_DIR && mkdir -p $REMOTE_DIR"
    run gcloud compute tpus tpu-vm scp --recurse "${sources[@]}" "$tpu:$REMOTE_DIR" \
      "${tpu_flags[@]}" --worker=all
    on_all_workers "$install"
  fi
fi

# 4. One command line, identical on every worker.
main=("../$REMOTE_VENV/bin/python" -m wstal_jax.main --config="$config" --workdir="$workdir"
  --distributed=on)
[[ -z "$data_dir" ]] || main+=(--config.data.dir="$data_dir")
main+=("${extra[@]}")
on_all_workers "cd $REMOTE_DIR && $(quote_cmd "${main[@]}")"
