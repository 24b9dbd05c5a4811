#!/usr/bin/env bash
#SBATCH --job-name=wstal_jax
#SBATCH --nodes=2
#SBATCH --ntasks-per-node=4
#SBATCH --gpus-per-node=4
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --signal=TERM@300
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#
# Runs wstal_jax with one JAX process per GPU on every node of a SLURM allocation.
#
#   sbatch [--nodes=N --ntasks-per-node=G --gpus-per-node=G] launch/slurm_gpu.sh \
#     --config=configs/vlpo.py --workdir=/shared/workdirs/run1 [--data_dir=DIR] [-- MAIN_FLAGS]
#   bash launch/slurm_gpu.sh --dry_run --nodes=2 --gpus_per_node=4 --config=... --workdir=...
#
# The headers above are defaults: options given to sbatch override them. Keep --ntasks-per-node
# equal to --gpus-per-node; the script launches as many tasks per node as the node has GPUs.
#
# Distributed setup is explicit rather than left to jax's SLURM auto-detection, so that the
# printed command lines say exactly what each process gets:
#   --coordinator_address  first host of SLURM_JOB_NODELIST (scontrol show hostnames) and a port
#                          derived from the job id (10000 + SLURM_JOB_ID % 20000) unless --port
#   --num_processes        $SLURM_NTASKS of the step  (= nodes * GPUs per node)
#   --process_id           $SLURM_PROCID of the task
# Each task sees only its own GPU: CUDA_VISIBLE_DEVICES is cut down to entry $SLURM_LOCALID of
# the list SLURM gave the node (or set to $SLURM_LOCALID when SLURM gave none), and
# JAX_LOCAL_DEVICE_IDS=0 stops jax.distributed.initialize() from also selecting device
# $SLURM_LOCALID, which would not exist among the one visible GPU.
# --signal=TERM@300 makes SLURM send SIGTERM to every task 5 minutes before the time limit; the
# trainer checkpoints on SIGTERM, and resubmitting the same command resumes from the workdir.
set -euo pipefail

readonly USAGE="usage: sbatch [SBATCH_OPTIONS] launch/slurm_gpu.sh --config=CONFIG --workdir=DIR \\
    [--data_dir=DIR] [--python=BIN] [--port=PORT] [-- EXTRA_MAIN_FLAGS...]
       bash launch/slurm_gpu.sh --dry_run [--nodes=N] [--gpus_per_node=G] --config=CONFIG \\
    --workdir=DIR [...] [-- EXTRA_MAIN_FLAGS...]

  --config         config file, relative to the submission directory, e.g. configs/vlpo.py
  --workdir        checkpoints and summaries, on a filesystem every node shares (or gs://);
                   an existing workdir is resumed
  --data_dir       dataset directory every node can read, passed as --config.data.dir
  --python         python of the environment wstal_jax[gpu] is installed in (default python3)
  --port           coordinator port (default 10000 + SLURM_JOB_ID % 20000)
  --nodes          nodes to use (default: the allocation's, SLURM_JOB_NUM_NODES)
  --gpus_per_node  processes per node (default: SLURM_GPUS_ON_NODE)
  --dry_run        print the srun command and each task's command line, prefixed '[dry-run]',
                   and run nothing; outside SLURM the allocation is faked from --nodes and
                   --gpus_per_node (hosts node-0, node-1, ...)
  -- FLAGS...      forwarded to every process's main, e.g. -- --mode=eval"

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

# Runs inside every task (bash -c TASK_WRAPPER wstal-task PYTHON -m wstal_jax.main ...): picks
# the task's GPU, then execs main so that SLURM's SIGTERM reaches python itself.
# shellcheck disable=SC2016  # expanded by the task's shell, not this one
readonly TASK_WRAPPER='set -eu; '\
'IFS=, read -r -a gpus <<< "${CUDA_VISIBLE_DEVICES:-}"; '\
'if [ "${#gpus[@]}" -gt 1 ]; then '\
'export CUDA_VISIBLE_DEVICES="${gpus[$SLURM_LOCALID]:?"no GPU at index $SLURM_LOCALID of CUDA_VISIBLE_DEVICES"}"; '\
'elif [ "${#gpus[@]}" -eq 0 ]; then export CUDA_VISIBLE_DEVICES="$SLURM_LOCALID"; fi; '\
'export JAX_LOCAL_DEVICE_IDS=0; '\
'exec "$@" --num_processes="$SLURM_NTASKS" --process_id="$SLURM_PROCID"'

config="" workdir="" data_dir="" port="" nodes="" gpus_per_node=""
python_bin=python3
dry_run=0
extra=()
while (($#)); do
  case "$1" in
    --config=*) config="${1#*=}" ;;
    --workdir=*) workdir="${1#*=}" ;;
    --data_dir=*) data_dir="${1#*=}" ;;
    --python=*) python_bin="${1#*=}" ;;
    --port=*) port="${1#*=}" ;;
    --nodes=*) nodes="${1#*=}" ;;
    --gpus_per_node=*) gpus_per_node="${1#*=}" ;;
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
for name in config workdir; do
  [[ -n "${!name}" ]] || missing+=("--$name")
done
((${#missing[@]} == 0)) || usage_error "missing required flag(s): ${missing[*]}"
[[ -f "${config%%:*}" ]] ||
  usage_error "config file '${config%%:*}' not found in $(pwd) (--config is relative to it)"
if ((!dry_run)) && [[ -z "${SLURM_JOB_ID:-}" ]]; then
  usage_error "not inside a SLURM job: submit with sbatch, or pass --dry_run to see the commands"
fi

nodes="${nodes:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-}}}"
gpus_per_node="${gpus_per_node:-${SLURM_GPUS_ON_NODE:-}}"
[[ "$nodes" =~ ^[1-9][0-9]*$ ]] ||
  usage_error "cannot tell the number of nodes (got '$nodes'): pass --nodes=N"
[[ "$gpus_per_node" =~ ^[1-9][0-9]*$ ]] ||
  usage_error "cannot tell the GPUs per node (got '$gpus_per_node'): request GPUs with \
--gpus-per-node (sbatch) or pass --gpus_per_node=G"
if [[ -n "${SLURM_NTASKS_PER_NODE:-}" && "${SLURM_NTASKS_PER_NODE}" != "$gpus_per_node" ]]; then
  printf 'warning: the job has --ntasks-per-node=%s but %s GPUs per node; launching %s tasks per node\n' \
    "$SLURM_NTASKS_PER_NODE" "$gpus_per_node" "$gpus_per_node" >&2
fi
num_processes=$((nodes * gpus_per_node))

if [[ -n "${SLURM_JOB_NODELIST:-}" ]]; then
  command -v scontrol >/dev/null || usage_error "scontrol not found: cannot expand SLURM_JOB_NODELIST"
  mapfile -t hosts < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
elif ((dry_run)); then
  hosts=()
  for ((n = 0; n < nodes; n++)); do hosts+=("node-$n"); done
else
  usage_error "SLURM_JOB_NODELIST is not set"
fi
((${#hosts[@]} >= nodes)) ||
  usage_error "--nodes=$nodes but the allocation has ${#hosts[@]} node(s): ${hosts[*]}"

job_id="${SLURM_JOB_ID:-0}"
port="${port:-$((10000 + job_id % 20000))}"
if [[ ! "$port" =~ ^[1-9][0-9]*$ ]] || ((port > 65535)); then
  usage_error "bad --port '$port'"
fi
coordinator="${hosts[0]}:$port"

main=("$python_bin" -m wstal_jax.main --config="$config" --workdir="$workdir")
[[ -z "$data_dir" ]] || main+=(--config.data.dir="$data_dir")
main+=(--coordinator_address="$coordinator" "${extra[@]}")

srun_cmd=(srun --nodes="$nodes" --ntasks-per-node="$gpus_per_node" --ntasks="$num_processes"
  --distribution=block --kill-on-bad-exit=1)
# srun stopped inheriting sbatch's --cpus-per-task in SLURM 22.05: pass it on explicitly.
[[ -z "${SLURM_CPUS_PER_TASK:-}" ]] || srun_cmd+=(--cpus-per-task="$SLURM_CPUS_PER_TASK")
srun_cmd+=(bash -c "$TASK_WRAPPER" wstal-task "${main[@]}")

if ((!dry_run)); then
  printf 'wstal_jax: %d node(s) x %d GPU(s) = %d processes, coordinator %s\n+ %s\n' \
    "$nodes" "$gpus_per_node" "$num_processes" "$coordinator" "$(quote_cmd "${srun_cmd[@]}")" >&2
  exec "${srun_cmd[@]}"
fi

printf '[dry-run] %s\n' "$(quote_cmd "${srun_cmd[@]}")"
# Each task's command line, produced by running TASK_WRAPPER itself with the SLURM variables
# srun would set (block distribution: tasks 0..G-1 on the first node, ...) and a printer in
# place of python.
# Inside a job, the GPU list SLURM gave this node; outside, a faked 0,1,...,G-1.
node_gpus=""
[[ -z "${SLURM_JOB_ID:-}" ]] || node_gpus="${CUDA_VISIBLE_DEVICES:-}"
if [[ -z "$node_gpus" ]]; then
  node_gpus=0
  for ((g = 1; g < gpus_per_node; g++)); do node_gpus+=",$g"; done
fi
# shellcheck disable=SC2016  # expanded by the printer's shell
printer="$(declare -f quote_word quote_cmd)"'
printf "%s CUDA_VISIBLE_DEVICES=%s JAX_LOCAL_DEVICE_IDS=%s %s\n" "$1" \
  "$CUDA_VISIBLE_DEVICES" "$JAX_LOCAL_DEVICE_IDS" "$(shift; quote_cmd "$@")"'
for ((task = 0; task < num_processes; task++)); do
  host="${hosts[task / gpus_per_node]}"
  SLURM_PROCID="$task" SLURM_LOCALID="$((task % gpus_per_node))" SLURM_NTASKS="$num_processes" \
    CUDA_VISIBLE_DEVICES="$node_gpus" bash -c "$TASK_WRAPPER" wstal-task \
    bash -c "$printer" printer "[dry-run task=$task host=$host]" "${main[@]}"
done
