# shellcheck shell=bash
# Shared helpers for the sbatch scripts in slurm/. Sourced, never executed.
#
# Variables read here (scripts document their own on top of these):
#   MASPO_REPO             checkout of maspo_megatron on a shared filesystem (default: $SLURM_SUBMIT_DIR);
#                          sbatch copies the script to a spool dir, so its own path cannot be used
#   MASPO_DEVICE           gpu (default) | cpu: the CPU variant runs gloo ranks and no GPUs
#   MASPO_CONTAINER_IMAGE  pyxis/enroot image: every srun step gets --container-image (unset: venv)
#   MASPO_CONTAINER_MOUNTS --container-mounts for that image (e.g. /lustre:/lustre)
#   MASPO_VENV             virtual environment when no container is used (default: $MASPO_REPO/.venv)
#   MASPO_PYTHON           python to run (default: python inside a container, $MASPO_VENV/bin/python outside)
#   MASPO_LOG_DIR          one log file per job step lands here (default: $MASPO_REPO/logs/slurm)
#   MASPO_DRY_RUN=1        print each srun command line instead of running it (for checks)
#   MASTER_PORT            rendezvous port (default: derived from the job id, so jobs sharing a node do not clash)
#   MASPO_CPUS_PER_TASK    CPUs of each training rank (default: the node's CPUs / ranks per node)
#   MASPO_MEM_PER_NODE     --mem of each step (default 0: all the memory the job holds on the node)

maspo_die() {
    echo "maspo[$(basename "${0:-slurm}")]: $*" >&2
    exit 2
}

maspo_log() {
    echo "maspo[$(date -u +%H:%M:%S)]: $*" >&2
}

# maspo_require VAR...: fail fast, naming every missing variable at once.
maspo_require() {
    local missing=() var
    for var in "$@"; do
        [ -n "${!var:-}" ] || missing+=("$var")
    done
    [ "${#missing[@]}" -eq 0 ] || maspo_die "missing required variable(s): ${missing[*]} (see the header of this script)"
}

# maspo_require_int VAR...: each must be a positive integer.
maspo_require_int() {
    local var
    for var in "$@"; do
        [[ "${!var:-}" =~ ^[1-9][0-9]*$ ]] || maspo_die "$var must be a positive integer, got '${!var:-}'"
    done
}

# maspo_setup: checks the allocation and fills MASPO_REPO, MASPO_PYTHON, MASPO_LOG_DIR, MASPO_HOSTS,
# MASPO_CONTAINER_ARGS and the device variables every script needs.
maspo_setup() {
    [ -n "${SLURM_JOB_ID:-}" ] || maspo_die "SLURM_JOB_ID is not set: submit this script with sbatch"
    MASPO_REPO="${MASPO_REPO:-${SLURM_SUBMIT_DIR:-}}"
    [ -f "$MASPO_REPO/maspo_megatron/__init__.py" ] \
        || maspo_die "MASPO_REPO='$MASPO_REPO' is not a maspo_megatron checkout (set MASPO_REPO or submit from the checkout)"
    MASPO_DEVICE="${MASPO_DEVICE:-gpu}"
    case "$MASPO_DEVICE" in
        gpu | cpu) ;;
        *) maspo_die "MASPO_DEVICE must be gpu or cpu, got '$MASPO_DEVICE'" ;;
    esac
    MASPO_CONTAINER_ARGS=()
    if [ -n "${MASPO_CONTAINER_IMAGE:-}" ]; then
        MASPO_CONTAINER_ARGS=(--container-image="$MASPO_CONTAINER_IMAGE" --container-workdir="$MASPO_REPO")
        [ -z "${MASPO_CONTAINER_MOUNTS:-}" ] || MASPO_CONTAINER_ARGS+=(--container-mounts="$MASPO_CONTAINER_MOUNTS")
        MASPO_PYTHON="${MASPO_PYTHON:-python}"
    else
        MASPO_VENV="${MASPO_VENV:-$MASPO_REPO/.venv}"
        MASPO_PYTHON="${MASPO_PYTHON:-$MASPO_VENV/bin/python}"
        [ -x "$MASPO_PYTHON" ] || [ "${MASPO_DRY_RUN:-0}" = 1 ] \
            || maspo_die "no python at '$MASPO_PYTHON' (set MASPO_VENV, MASPO_PYTHON or MASPO_CONTAINER_IMAGE)"
    fi
    MASPO_LOG_DIR="${MASPO_LOG_DIR:-$MASPO_REPO/logs/slurm}"
    mkdir -p "$MASPO_LOG_DIR" || maspo_die "cannot create MASPO_LOG_DIR='$MASPO_LOG_DIR'"
    mapfile -t MASPO_HOSTS < <(scontrol show hostnames "${SLURM_JOB_NODELIST:?}")
    [ "${#MASPO_HOSTS[@]}" -ge 1 ] || maspo_die "scontrol show hostnames returned no host for '$SLURM_JOB_NODELIST'"
    export PYTHONUNBUFFERED=1
    if [ "$MASPO_DEVICE" = cpu ]; then
        # gloo ranks, one thread each: several ranks share the cores of a node.
        export CUDA_VISIBLE_DEVICES="" OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
    fi
}

# maspo_tasks_per_node: processes per node for a training step (one per GPU, or per CPU rank).
maspo_tasks_per_node() {
    local n
    if [ "$MASPO_DEVICE" = cpu ]; then
        n="${MASPO_TASKS_PER_NODE:-${SLURM_NTASKS_PER_NODE:-1}}"
    else
        n="${MASPO_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}"
        [ -n "$n" ] || maspo_die "cannot tell the GPUs per node: set MASPO_GPUS_PER_NODE or submit with --gpus-per-node"
    fi
    [[ "$n" =~ ^[1-9][0-9]*$ ]] || maspo_die "tasks per node must be a positive integer, got '$n'"
    echo "$n"
}

# maspo_step_resources TASKS_PER_NODE: the srun flags that give a step its CPUs, memory and GPUs
# explicitly. Without them a cons_tres + cgroup site confines a step to the defaults (one CPU per task,
# DefMemPerCPU) and eight SGLang servers or training ranks end up on one core. --gpu-bind=none: every
# task sees all GPUs of its node (a rank picks its GPU by local rank, a server by --base-gpu-id).
maspo_step_resources() {
    local tasks="$1" cpus="${MASPO_CPUS_PER_TASK:-}"
    if [ -z "$cpus" ]; then
        [ -n "${SLURM_CPUS_ON_NODE:-}" ] || maspo_die "cannot tell the CPUs per node: set MASPO_CPUS_PER_TASK"
        cpus=$((SLURM_CPUS_ON_NODE / tasks))
        [ "$cpus" -ge 1 ] || cpus=1
    fi
    [[ "$cpus" =~ ^[1-9][0-9]*$ ]] || maspo_die "MASPO_CPUS_PER_TASK must be a positive integer, got '$cpus'"
    echo "--cpus-per-task=$cpus"
    echo "--mem=${MASPO_MEM_PER_NODE:-0}"
    [ "$MASPO_DEVICE" = cpu ] || echo "--gpu-bind=none"
}

# maspo_rendezvous HOST: exports MASTER_ADDR/MASTER_PORT for torch.distributed. The port is derived
# from the job id (and restart count) unless set, so two jobs sharing a node, or a requeued job
# whose old socket lingers in TIME_WAIT, do not collide. maspo_megatron/parallel/launch_env.py
# (rendezvous_port) computes the same port for nemo-run's srun tasks; a test keeps the two equal.
maspo_rendezvous() {
    export MASTER_ADDR="$1"
    export MASTER_PORT="${MASTER_PORT:-$((20000 + (SLURM_JOB_ID * 7 + ${SLURM_RESTART_COUNT:-0}) % 20000))}"
}

# maspo_step_log NAME: the log file for the next srun step (one per job, restart and step).
maspo_step_log() {
    echo "$MASPO_LOG_DIR/${SLURM_JOB_NAME:-job}-${SLURM_JOB_ID}-r${SLURM_RESTART_COUNT:-0}-$1.log"
}

# maspo_srun ARGS...: srun with the container arguments, or only printed under MASPO_DRY_RUN=1.
maspo_srun() {
    if [ "${MASPO_DRY_RUN:-0}" = 1 ]; then
        printf 'DRY-RUN srun'
        printf ' %q' "${MASPO_CONTAINER_ARGS[@]}" "$@"
        printf '\n'
        return 0
    fi
    srun "${MASPO_CONTAINER_ARGS[@]}" "$@"
}

# --- preemption: USR1 (sbatch --signal=B:USR1@120) -> checkpoint -> exit 75 -> requeue -------------
MASPO_EX_TEMPFAIL=75
MASPO_PREEMPTED=0
MASPO_CANCELLED=0
MASPO_STEP_PID=""

_maspo_on_usr1() {
    MASPO_PREEMPTED=1
    # The marker is written and the trainer told to checkpoint BEFORE anything can requeue the
    # job: `scontrol requeue` may kill this very script.
    echo "USR1 at $(date -u +%FT%TZ) restart=${SLURM_RESTART_COUNT:-0}" >>"$MASPO_LOG_DIR/${SLURM_JOB_ID}.preempted"
    maspo_log "USR1: asking the trainer to checkpoint and exit $MASPO_EX_TEMPFAIL"
    [ -z "$MASPO_STEP_PID" ] || kill -USR1 "$MASPO_STEP_PID" 2>/dev/null || true
}

_maspo_on_term() {
    # Cancelled, timed out or preempted by Slurm itself: let the trainer save, but do not requeue
    # (Slurm's own PreemptMode decides that).
    MASPO_CANCELLED=1
    maspo_log "TERM: forwarding to the trainer; no requeue"
    [ -z "$MASPO_STEP_PID" ] || kill -TERM "$MASPO_STEP_PID" 2>/dev/null || true
}

# maspo_run_step ARGS...: runs one srun step in the background and waits for it while USR1/TERM
# can interrupt the wait. Returns the step's exit code in MASPO_STEP_RC.
maspo_run_step() {
    MASPO_STEP_RC=0
    if [ "${MASPO_DRY_RUN:-0}" = 1 ]; then
        maspo_srun "$@"
        return 0
    fi
    trap _maspo_on_usr1 USR1
    trap _maspo_on_term TERM
    # srun itself (not a subshell) must be the background pid: srun forwards USR1/TERM to its tasks.
    srun "${MASPO_CONTAINER_ARGS[@]}" "$@" &
    MASPO_STEP_PID=$!
    while :; do
        wait "$MASPO_STEP_PID" && MASPO_STEP_RC=0 || MASPO_STEP_RC=$?
        # A trapped signal ends `wait` early with 128+n while the step still runs: wait again.
        kill -0 "$MASPO_STEP_PID" 2>/dev/null || break
    done
    MASPO_STEP_PID=""
    trap - USR1 TERM
}

# maspo_finish_or_requeue: turns the trainer's exit code into the job's fate.
#   0 -> done; 75 (checkpoint saved) or a USR1 we forwarded -> `scontrol requeue` (up to
#   MASPO_MAX_REQUEUES times); anything else -> the job fails with that code.
maspo_finish_or_requeue() {
    local rc="$MASPO_STEP_RC" restarts="${SLURM_RESTART_COUNT:-0}" max="${MASPO_MAX_REQUEUES:-50}"
    if [ "$rc" = 0 ]; then
        maspo_log "training finished"
        exit 0
    fi
    if [ "$MASPO_CANCELLED" = 0 ] && { [ "$rc" = "$MASPO_EX_TEMPFAIL" ] || [ "$MASPO_PREEMPTED" = 1 ]; }; then
        if [ "$restarts" -ge "$max" ]; then
            maspo_die "trainer exited $rc but the job was already requeued $restarts times (MASPO_MAX_REQUEUES=$max)"
        fi
        maspo_log "trainer exited $rc (checkpoint saved): requeueing job $SLURM_JOB_ID (restart $((restarts + 1)))"
        if [ "${MASPO_DRY_RUN:-0}" = 1 ]; then
            echo "DRY-RUN scontrol requeue $SLURM_JOB_ID"
            exit 0
        fi
        scontrol requeue "$SLURM_JOB_ID" || maspo_die "scontrol requeue $SLURM_JOB_ID failed (is the job --requeue and JobRequeue=1?)"
        exit 0
    fi
    maspo_log "trainer failed with exit code $rc (log: $MASPO_LOG_DIR)"
    exit "$rc"
}
