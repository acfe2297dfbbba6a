#!/usr/bin/env bash
# The device check: everything that can only be verified on a GPU, in one command, one report.
#
#   bash tools/gpu_check.sh [REPORT_DIR]         (default outputs/gpu_check)
#
# On one CUDA GPU with no network, within about 6 minutes, it runs and records:
#   1. the gpu-marked tests (pytest -m gpu);
#   2. the CPU default config trained on the GPU (reward of the first and last fifth of the steps);
#   3. one RL step of a Qwen2.5-1.5B-shaped random policy with packed 4,096-token rows (tools/gpu_rl_step.py);
#   4. the GPU benchmarks (benchmarks/*_gpu.py and benchmarks/logprob_entropy.py --device cuda), where present;
#   5. the rest of the test suite (pytest -m "not gpu and not slurm"), if GPU_CHECK_FULL_SUITE=1.
# GPU_CHECK_PHASES="gpu_tests rl_step_1p5b ..." runs only the phases named (default: all).
# Packages the node lacks can be carried as wheels in .whl/ (docs/gpu.md says which and how):
# they are installed into a private target first. Every phase has its own time limit and its
# outcome goes into REPORT_DIR/report.md; the exit code is the number of failed phases.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
report_dir="${1:-outputs/gpu_check}"
mkdir -p "$report_dir"
report="$report_dir/report.md"
py="${PYTHON:-python3}"
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-4}"
if compgen -G ".whl/*.whl" >/dev/null; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/maspo-site .whl/*.whl
    export PYTHONPATH="/tmp/maspo-site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
failed=0
started_all=$(date +%s)

{
    echo "# Device check report"
    echo
    echo "- date: $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet 2>/dev/null || echo ' (+ uncommitted changes)')"
    echo "- GPU: $(nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null | head -1)"
    "$py" - <<'PY'
import importlib
import torch
parts = [f"python {__import__('sys').version.split()[0]}", f"torch {torch.__version__} (CUDA {torch.version.cuda})"]
for name in ("megatron.core", "transformer_engine", "triton", "transformers", "sglang", "math_verify"):
    try:
        module = importlib.import_module(name)
        parts.append(f"{name} {getattr(module, '__version__', '?')}")
    except Exception as exc:  # noqa: BLE001 - a missing package is a fact to report
        parts.append(f"{name} absent ({type(exc).__name__})")
print("- versions: " + ", ".join(parts))
PY
    echo
} > "$report"

# phase NAME LIMIT_S COMMAND...: runs the command with a time limit, appends its outcome and output tail.
phase() {
    local name="$1" limit="$2"
    shift 2
    if [ -n "${GPU_CHECK_PHASES:-}" ] && [[ " $GPU_CHECK_PHASES " != *" $name "* ]]; then
        return 0
    fi
    local log="$report_dir/${name}.log" start end code
    start=$(date +%s)
    timeout --signal=TERM --kill-after=15 "$limit" "$@" >"$log" 2>&1
    code=$?
    end=$(date +%s)
    local verdict="ok"
    [ "$code" -eq 0 ] || { verdict="FAILED (exit $code$([ "$code" -eq 124 ] && echo ', time limit'))"; failed=$((failed + 1)); }
    {
        echo "## $name: $verdict in $((end - start)) s"
        echo
        echo '```'
        grep -v -e "Warning" -e "warnings.warn" "$log" | tail -n "${TAIL_LINES:-25}"
        echo '```'
        echo
    } >> "$report"
    echo "gpu_check: $name: $verdict ($((end - start)) s)"
}

# Only the files that hold gpu tests are collected: others may import packages a GPU node lacks.
mapfile -t gpu_files < <(grep -rlE "mark\.gpu\b" tests --include='test_*.py' | sort)
phase gpu_tests 240 "$py" -m pytest -q -m gpu -p no:cacheprovider -o addopts="-ra --strict-markers" "${gpu_files[@]}"
phase cpu_default_on_gpu 240 "$py" tools/reward_rise.py --run --output-dir "${TMPDIR:-/tmp}/maspo_gpu_check_cpu_tiny"
phase rl_step_1p5b 180 "$py" tools/gpu_rl_step.py --row-tokens 4096 --json "$report_dir/rl_step.json"
if [ -f benchmarks/logprob_entropy.py ]; then
    phase bench_logprob_entropy 150 "$py" benchmarks/logprob_entropy.py --device cuda --json "$report_dir/logprob_entropy.json"
fi
for bench in benchmarks/*_gpu.py; do
    [ -f "$bench" ] || continue
    name="bench_$(basename "$bench" .py)"
    phase "$name" 180 "$py" "$bench" --json "$report_dir/${name}.json"
done
if [ "${GPU_CHECK_FULL_SUITE:-0}" = "1" ]; then
    skip_launch=()
    if ! "$py" -c "import nemo_run" >/dev/null 2>&1; then  # nemo-run's dependency tree is not carried
        skip_launch=(--ignore=tests/launch/test_recipes.py --ignore=tests/launch/test_local_executor.py)
        echo "full_suite: nemo-run is not installed here: tests/launch/test_recipes.py and test_local_executor.py not run" >> "$report"
    fi
    phase full_suite "${GPU_CHECK_SUITE_LIMIT_S:-420}" "$py" -m pytest -q -m "not gpu and not slurm" -p no:cacheprovider \
        -o addopts="-ra --strict-markers" --continue-on-collection-errors --timeout 150 "${skip_launch[@]}"
fi
echo "Total: $(( $(date +%s) - started_all )) s, $failed failed phase(s)." >> "$report"
echo "gpu_check: report in $report ($failed failed phase(s))"
exit "$failed"
