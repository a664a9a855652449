# Shared steps of the semiseg sbatch scripts; sourced by them, not run on its own:
#   SEMISEG_ROOT=${SEMISEG_ROOT:-${SLURM_SUBMIT_DIR:-$PWD}}
#   source "$SEMISEG_ROOT/slurm/job_lib.sh"
#   semiseg_job_start "$@"                                  # env, banner, train arguments
#   semiseg_run_requeueable srun python main.py train "${SEMISEG_TRAIN_ARGS[@]}"
# Inputs (environment, e.g. `sbatch --export=ALL,METHOD=...`, or positional METHOD PRESET DATA
# followed by extra main.py arguments): METHOD, PRESET, DATA, FORMAT, OUT, EXTRA, PYTHON,
# DISTRIBUTION, SEMISEG_PORT, SEMISEG_MAX_RESTARTS, CACHE_ON_SCRATCH. See slurm/README.md.
# PYTHON may be a command of several words (`apptainer exec --nv semiseg.sif python`): the
# scripts run "${SEMISEG_PYTHON[@]}", its words (split at spaces; no quoting inside PYTHON).

# Exit code of a trainer that caught the signal, saved a checkpoint and stopped early
# (distribute.PREEMPTED_EXIT_CODE).
SEMISEG_PREEMPTED_EXIT=75

semiseg_die() { echo "semiseg job error: $*" >&2; exit 2; }

# Environment every script needs; prints what ran where.
semiseg_environment() {
    cd "$SEMISEG_ROOT" || semiseg_die "cannot cd to SEMISEG_ROOT=$SEMISEG_ROOT"
    [ -f main.py ] || semiseg_die "$SEMISEG_ROOT has no main.py: submit from the semiseg folder or set SEMISEG_ROOT"
    PYTHON=${PYTHON:-python}
    read -r -a SEMISEG_PYTHON <<< "$PYTHON"
    [ ${#SEMISEG_PYTHON[@]} -gt 0 ] || semiseg_die "PYTHON is empty: name the interpreter or the command that runs it"
    # Slurm 22.05+ no longer passes the batch allocation's --cpus-per-task on to srun.
    [ -n "${SLURM_CPUS_PER_TASK:-}" ] && export SRUN_CPUS_PER_TASK=$SLURM_CPUS_PER_TASK
    # Workers listen on this port (and the next ones when tasks share a node); derived from
    # the job id so that jobs sharing a node do not collide (same rule as distribute.slurm_port).
    export SEMISEG_PORT=${SEMISEG_PORT:-$((20000 + (${SLURM_JOB_ID:-0} % 750) * 16))}
    export TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-1}
    export PYTHONUNBUFFERED=1
    semiseg_export_end_time

    echo "=== semiseg ${SLURM_JOB_NAME:-job} ${SLURM_JOB_ID:-?} restart ${SLURM_RESTART_COUNT:-0} on $(hostname) at $(date '+%F %T')"
    echo "nodes ${SLURM_JOB_NODELIST:-?} ntasks ${SLURM_NTASKS:-1} cpus/task ${SLURM_CPUS_PER_TASK:-?} port $SEMISEG_PORT"
    echo "CUDA_VISIBLE_DEVICES=${CUDA_VISIBLE_DEVICES:-<unset>}"
    if command -v nvidia-smi >/dev/null 2>&1; then
        nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader
    else
        echo "nvidia-smi: not found (no NVIDIA GPU driver on this node)"
    fi
    # Versions from package metadata: importing TensorFlow here would cost seconds.
    "${SEMISEG_PYTHON[@]}" - <<'PY' || semiseg_die "'$PYTHON' cannot run: set PYTHON or activate the environment before sbatch"
import importlib.metadata as metadata, sys
def version(name):
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "missing"
print(f"python {sys.version.split()[0]} ({sys.executable}) tensorflow {version('tensorflow')} "
      f"keras {version('keras')}", flush=True)
PY
}

# Reads METHOD PRESET DATA from the positional arguments (else the environment) and builds
# SEMISEG_TRAIN_ARGS, the arguments of `main.py train`; the remaining positional arguments and
# $EXTRA (word-split) are appended as given.
semiseg_job_start() {
    [ $# -ge 1 ] && [ -n "$1" ] && METHOD=$1
    [ $# -ge 2 ] && [ -n "$2" ] && PRESET=$2
    [ $# -ge 3 ] && [ -n "$3" ] && DATA=$3
    if [ $# -gt 3 ]; then shift 3; else shift $#; fi
    [ -n "${METHOD:-}" ] || semiseg_die "METHOD is not set: pass it as the first argument or METHOD=... in the environment"
    semiseg_environment
    OUT=${OUT:-runs/${SLURM_JOB_NAME:-semiseg}-${SLURM_JOB_ID:-local}}
    SEMISEG_TRAIN_ARGS=(--method "$METHOD")
    [ -n "${PRESET:-}" ] && SEMISEG_TRAIN_ARGS+=(--preset "$PRESET")
    [ -n "${DATA:-}" ] && SEMISEG_TRAIN_ARGS+=(--data "$DATA")
    [ -n "${FORMAT:-}" ] && SEMISEG_TRAIN_ARGS+=(--set "data.format=$FORMAT")
    [ -n "${DISTRIBUTION:-}" ] && SEMISEG_TRAIN_ARGS+=(--set "train.distribution=$DISTRIBUTION")
    # A requeued job reuses OUT (its name holds only the job id), so it resumes that run. A run
    # killed before its first checkpoint has config.yaml only: --resume starts it at step 0
    # (main.py refuses an existing OUT without --resume).
    SEMISEG_TRAIN_ARGS+=(--out "$OUT")
    if [ -d "$OUT/checkpoints" ] || [ -f "$OUT/config.yaml" ]; then
        SEMISEG_TRAIN_ARGS+=(--resume)
        echo "resuming $OUT from its checkpoints"
    fi
    # EXTRA is split into words (no glob expansion): EXTRA="--set train.epochs=5 --set seed=1".
    local extra_words=()
    read -r -a extra_words <<< "${EXTRA:-}"
    SEMISEG_TRAIN_ARGS+=("${extra_words[@]}")
    SEMISEG_TRAIN_ARGS+=("$@")
    echo "method $METHOD preset ${PRESET:-<none>} data ${DATA:-<default>} out $OUT"
    [ "${CACHE_ON_SCRATCH:-0}" = 1 ] && semiseg_cache_on_scratch
    return 0
}

# CACHE_ON_SCRATCH=1: the slice cache is read from node-local scratch instead of the shared file
# system. One task per node copies the shared cache root ($SEMISEG_CACHE, else ~/.cache/semiseg;
# build it there first with preprocess.sbatch) into $SLURM_TMPDIR (else $TMPDIR, else /tmp), files
# already there are kept (a requeued job on the same node copies nothing); then SEMISEG_CACHE
# points every task there. A cache missing from the shared root is built by the trainer on each node.
semiseg_cache_on_scratch() {
    local shared=${SEMISEG_CACHE:-$HOME/.cache/semiseg}
    local scratch=${SLURM_TMPDIR:-${TMPDIR:-/tmp}}/semiseg-cache-${SLURM_JOB_ID:-local}
    local nodes=${SLURM_JOB_NUM_NODES:-1}
    local copy="mkdir -p '$scratch' && if [ -d '$shared' ]; then cp -Rn '$shared/.' '$scratch/'; fi"
    echo "slice cache on node-local scratch: $shared -> $scratch (one copy per node, $nodes node(s))"
    if [ -n "${SLURM_JOB_ID:-}" ]; then
        srun --nodes="$nodes" --ntasks="$nodes" --ntasks-per-node=1 bash -c "$copy" \
            || semiseg_die "copying the slice cache $shared to $scratch failed"
    else
        bash -c "$copy" || semiseg_die "copying the slice cache $shared to $scratch failed"
    fi
    export SEMISEG_CACHE=$scratch
}

# The trainer checkpoints and stops train.end_time_margin_s before SLURM_JOB_END_TIME (the unix
# time of the wall limit). Slurm sets it from 23.02 on; before, it is read from squeue here.
semiseg_export_end_time() {
    [ -n "${SLURM_JOB_END_TIME:-}" ] || [ -z "${SLURM_JOB_ID:-}" ] && return 0
    local end
    end=$(squeue -h -j "$SLURM_JOB_ID" -o %e 2>/dev/null | head -n 1)
    case "$end" in
        ""|N/A|NONE|Unknown) return 0 ;;        # no wall limit (or squeue unavailable)
    esac
    end=$(date -d "$end" +%s 2>/dev/null) && export SLURM_JOB_END_TIME=$end
    echo "job end time ${SLURM_JOB_END_TIME:-unknown} (unix time, from squeue)"
}

# Runs the command in the background so that the batch shell can catch the signals:
# SIGUSR1 (sent by --signal=B:USR1@SECS before the time limit, or `scancel --signal=USR1
# --batch JOB`) is forwarded to the command (srun passes it on to every task); when the
# command then stops with a non-zero code (75: checkpoint saved) the job is requeued and
# resumes from that checkpoint. SIGTERM (scancel, preemption) is forwarded too, but never
# requeues here: a cancelled job stays cancelled, a preempted one is requeued by SLURM. Code 75
# with no signal at all: the trainer stopped itself before the wall limit (SLURM_JOB_END_TIME),
# so the job is requeued as after SIGUSR1.
semiseg_run_requeueable() {
    echo "+ $*"
    SEMISEG_SIGNAL=""
    "$@" &
    local child=$! rc trapped
    trap 'trapped=1; SEMISEG_SIGNAL=USR1; echo "caught SIGUSR1, forwarding to $child"; kill -USR1 $child 2>/dev/null' USR1
    trap 'trapped=1; SEMISEG_SIGNAL=${SEMISEG_SIGNAL:-TERM}; echo "caught SIGTERM, forwarding to $child"; kill -TERM $child 2>/dev/null' TERM
    while :; do
        trapped=""
        wait "$child"; rc=$?
        [ -n "$trapped" ] || break           # the command exited; rc is its status
        # A trapped signal interrupts `wait` (rc > 128) while the command still runs.
        if ! kill -0 "$child" 2>/dev/null; then
            wait "$child"; local again=$?
            [ "$again" -ne 127 ] && rc=$again
            break
        fi
    done
    trap - USR1 TERM
    echo "command exited with code $rc"

    if { [ "$SEMISEG_SIGNAL" = USR1 ] && [ "$rc" -ne 0 ]; } || { [ -z "$SEMISEG_SIGNAL" ] && [ "$rc" -eq "$SEMISEG_PREEMPTED_EXIT" ]; }; then
        local restarts=${SLURM_RESTART_COUNT:-0} max=${SEMISEG_MAX_RESTARTS:-20}
        if [ "$restarts" -ge "$max" ]; then
            echo "not requeueing: already restarted $restarts times (SEMISEG_MAX_RESTARTS=$max)"
        elif [ -n "${SLURM_JOB_ID:-}" ]; then
            echo "requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
            scontrol requeue "$SLURM_JOB_ID" && exit 0
            echo "scontrol requeue failed" >&2
        fi
    fi
    return "$rc"
}
