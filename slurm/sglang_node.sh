#!/usr/bin/env bash
# Runs on ONE rollout node (started by train_disaggregated.sbatch through srun, one task per node):
# starts MASPO_SERVERS_PER_NODE SGLang servers, each on MASPO_SGLANG_TP consecutive GPUs
# (--base-gpu-id), on ports MASPO_SGLANG_PORT, +1, ...; exits as soon as one of them dies, taking
# the others down, so the batch script sees the failure instead of waiting for a dead server.
# The step has all CPUs, memory and GPUs of the node (srun --cpus-per-task --mem --gpu-bind=none);
# the servers share them.
#
# Variables (set by the batch script): MASPO_MODEL_DIR, MASPO_SGLANG_TP (GPUs per server: tp x dp),
# MASPO_SERVERS_PER_NODE, MASPO_SGLANG_PORT, MASPO_SGLANG_CMD (argv prefix, default
# "$MASPO_PYTHON -m sglang.launch_server"), MASPO_SGLANG_ARGS (the config's launch_server flags from
# `python -m maspo_megatron.launch.sglang_server_args`: --tp-size, --mem-fraction-static,
# --quantization, ...; space separated), MASPO_PYTHON.
set -euo pipefail
for var in MASPO_MODEL_DIR MASPO_SGLANG_TP MASPO_SERVERS_PER_NODE MASPO_SGLANG_PORT; do
    [ -n "${!var:-}" ] || { echo "sglang_node: $var is not set" >&2; exit 2; }
done
read -r -a cmd <<<"${MASPO_SGLANG_CMD:-${MASPO_PYTHON:-python} -m sglang.launch_server}"
read -r -a extra <<<"${MASPO_SGLANG_ARGS:-}"
# The Slurm node name, as `scontrol show hostnames` gives it to the trainer (hostname may be an FQDN).
host="${SLURMD_NODENAME:-$(hostname)}"
echo "sglang_node: $host: $(nproc) CPUs for $MASPO_SERVERS_PER_NODE server(s); flags: ${extra[*]}"
pids=()
trap 'kill "${pids[@]}" 2>/dev/null || true' EXIT
trap 'exit 143' TERM
for ((i = 0; i < MASPO_SERVERS_PER_NODE; i++)); do
    port=$((MASPO_SGLANG_PORT + i))
    "${cmd[@]}" --model-path "$MASPO_MODEL_DIR" --base-gpu-id $((i * MASPO_SGLANG_TP)) --host "$host" \
        --port "$port" "${extra[@]}" &
    pids+=($!)
    echo "sglang_node: $host server $i on GPUs $((i * MASPO_SGLANG_TP))..$(((i + 1) * MASPO_SGLANG_TP - 1)) port $port pid $!"
done
# The first server to exit ends the node: a dead server must not leave a half fleet behind.
rc=0
wait -n "${pids[@]}" || rc=$?
echo "sglang_node: a server on $host exited with $rc; stopping the others" >&2
exit "$rc"
