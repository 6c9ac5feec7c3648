#!/usr/bin/env bash
# The checks that need a GPU, in one call: each step under its own time limit, its output and
# exit status written under the output directory, a failed or timed-out step not stopping the
# next. Run from anywhere:
#
#   tools/gpu_checks.sh OUT_DIR                       # on a CUDA machine (at most TOTAL_S)
#   NANOGPT_DIR=/path/to/nanoGPT tools/gpu_checks.sh OUT_DIR    # nanoGPT timed beside pico-llm
#   tools/gpu_checks.sh --tiny --device cpu OUT_DIR   # every step at tiny size (how it is tested)
#   tools/gpu_checks.sh --replace OUT_DIR             # over an earlier run's results in OUT_DIR
#
# An OUT_DIR that already holds results (summary.txt, logs.tgz, a step's report or log) is
# refused, in one line, unless --replace is given: then those files, each checked to be this
# script's own, are removed before the first step (a file of that name that is not is refused).
# For a CUDA device (the default) on a machine without one it refuses, in one line. Ctrl-C or
# SIGTERM stops the step in flight, then the script.
#
# Steps, run in the order STEPS names them (STEPS="tests gptoss benchmark" by default: the
# cheapest verdict first):
#   benchmark  tools/benchmark.py --gpt2: GPT-2 small training eager/compiled (tokens/s, MFU,
#              peak memory; nanoGPT too with NANOGPT_DIR), decoding against transformers
#              -> gpt2_benchmark.json, benchmark.log, profile_<who>_<mode>.txt (torch.profiler)
#   gptoss     GPT-oss, 40 steps eager then with --compile -> gptoss_eager.json,
#              gptoss_compiled.json (run logs: train time, losses), gptoss_*.log (with
#              graph breaks and recompilations logged)
#   presets    (not by default: minutes) tools/compile_presets.py: --compile against eager for
#              every preset and attention kind (or those in PRESET_CONFIGS, comma-separated),
#              PRESET_STEPS (40) steps each, compilation seconds and steady tokens/s
#              -> compile_presets.json, compile_presets.log
#   generate   (not by default) a pico model trained 30 steps and saved, then --generate
#              greedily from its checkpoint without and with --compile (compiled graph decoder),
#              both in float32 (in bf16, Inductor's fused kernels round differently and a greedy
#              text may part from the eager one after some tokens)
#              -> generate_plain.txt, generate_compiled.txt (the texts; equal expected),
#              generate_*.log
#   recipe     (not by default: minutes) tools/recipe_gpt2.py: the nanoGPT recipe against Muon
#              and the speedrun blocks at GPT-2 small's shape, RECIPE_SECONDS (60) of training
#              each, on the text in RECIPE_INPUT_DIR (else a docstring corpus written first)
#              -> recipe_gpt2.json, recipe_gpt2.log
#   tests      the tests marked cuda, a line each, the slowest timed -> cuda_tests.log
#   suite      (not by default: minutes) the fast suite with CUDA present, in SUITE_WORKERS
#              processes (12) where pytest-xdist is installed, each test under TEST_TIMEOUT
#              seconds where pytest-timeout is -> fast_suite.log, one line per test
# summary.txt gets one line per step: name, exit status (124 = timed out, "skipped" when the
# total time was spent), seconds. OUT_DIR holds only summary.txt, the JSON reports (one per
# step that writes one), logs.tgz (every log, profile and generated text, packed again after
# each step) and the running step's log, so that a run stopped from outside at any moment
# (a job killed at a time limit, say) leaves every finished step's log and the one in flight.
# Limits in seconds: all steps together TOTAL_S (540; each step's limit is cut to what is left,
# and a step with under 20 s left is skipped), BENCHMARK_TIMEOUT (360), GPTOSS_EAGER_TIMEOUT
# (90), GPTOSS_COMPILED_TIMEOUT (200), PRESETS_TIMEOUT (540, each run PRESET_RUN_TIMEOUT 150),
# GENERATE_TIMEOUT (120 each of the three), RECIPE_TIMEOUT (420, the corpus written first 120),
# TESTS_TIMEOUT (240), SUITE_TIMEOUT (900); TEST_TIMEOUT (120) for each test where
# pytest-timeout is installed. Each is a whole number from 1, without a leading zero. Where the
# limits of the steps in STEPS add up to more than TOTAL_S (the defaults' 890 s do), a note says
# so before the first step. PYTHON: the Python that has torch (python, else python3).
set -u
# bash before 4.4 (macOS's 3.2) takes an empty array, "${QUICK[@]}" without --tiny, for an
# unset variable under set -u and stops: there only the expansions' checking is given up.
if (( BASH_VERSINFO[0] * 100 + BASH_VERSINFO[1] < 404 )); then set +u; fi

TINY=0
REPLACE=0
DEVICE=cuda:0
while [ $# -gt 0 ]; do
    case "$1" in
        --tiny) TINY=1; shift ;;
        --replace) REPLACE=1; shift ;;
        --device)
            if [ $# -lt 2 ]; then echo "gpu_checks.sh: --device needs a value (cuda:0, cpu)" >&2; exit 2; fi
            DEVICE="$2"; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^set -u/ {exit} NR > 1' "$0"; exit 0 ;;
        -*) echo "gpu_checks.sh: unknown option $1" >&2; exit 2 ;;
        *) break ;;
    esac
done
if [ $# -ne 1 ]; then
    echo "usage: tools/gpu_checks.sh [--tiny] [--replace] [--device cuda:0] OUT_DIR" >&2
    exit 2
fi
for limit in TOTAL_S BENCHMARK_TIMEOUT GPTOSS_EAGER_TIMEOUT GPTOSS_COMPILED_TIMEOUT PRESETS_TIMEOUT \
             GENERATE_TIMEOUT RECIPE_TIMEOUT RECIPE_CORPUS_TIMEOUT TESTS_TIMEOUT SUITE_TIMEOUT \
             TEST_TIMEOUT; do
    case "${!limit:-1}" in   # 0 would be no limit at all (timeout 0), 08 octal to bash
        *[!0-9]*) echo "gpu_checks.sh: $limit=${!limit} is not a number of seconds" >&2; exit 2 ;;
        0*) echo "gpu_checks.sh: $limit=${!limit} must be a number of seconds from 1, without a leading zero" >&2
            exit 2 ;;
    esac
done
STEPS="${STEPS:-tests gptoss benchmark}"
for step in $STEPS; do       # all checked before anything is run or written
    case "$step" in
        benchmark|gptoss|presets|generate|recipe|tests|suite) ;;
        *) echo "gpu_checks.sh: unknown step $step in STEPS; steps: benchmark gptoss presets generate recipe tests suite" >&2
           exit 2 ;;
    esac
done
OUT="$1"
# The Python with torch: PYTHON if set, else python, else python3 (an image may have only one)
if [ -z "${PYTHON:-}" ]; then
    if command -v python > /dev/null 2>&1; then PYTHON=python; else PYTHON=python3; fi
fi
export PYTHON                # for the generate step's bash -c
# The files a run leaves in OUT (own_output tells them from others of the same names).
RESULTS="summary.txt logs.tgz gpt2_benchmark.json gptoss_eager.json gptoss_compiled.json
    compile_presets.json recipe_gpt2.json benchmark.log gptoss_eager.log gptoss_compiled.log
    compile_presets.log generate_train.log generate_plain.log generate_compiled.log
    recipe_corpus.log recipe_gpt2.log cuda_tests.log fast_suite.log"
own_output() {  # file: whether OUT's file of that name is one this script wrote
    local path="$OUT/$1"
    [ -f "$path" ] || return 1
    case "$1" in
        summary.txt) ! grep -qvE '^[a-z_]+ ([0-9]+|skipped) [0-9]+$' "$path" ;;
        logs.tgz) tar tzf "$path" 2>/dev/null | head -n 1 | grep -qx 'logs/' ;;
        *.log) head -n 1 "$path" | grep -q '^gpu_checks.sh step ' ;;
        *.json)
            local kind="${1%.json}"
            case "$1" in gptoss_*) kind=run ;; esac    # pico-llm's run logs
            head -c 4096 "$path" | tr -d '\n' | grep -qE "^[[:space:]]*\\{.*\"kind\": *\"$kind\"" ;;
    esac
}
found=""
for name in $RESULTS; do
    if [ -e "$OUT/$name" ] || [ -L "$OUT/$name" ]; then found="$found $name"; fi
done
if [ -n "$found" ] && [ "$REPLACE" = 0 ]; then
    echo "gpu_checks.sh: $OUT already holds results (${found# }); choose another OUT_DIR, or give --replace to replace them" >&2
    exit 2
fi
for name in $found; do
    if ! own_output "$name"; then
        echo "gpu_checks.sh: $OUT/$name is not this script's output, which is all --replace replaces; move it away or choose another OUT_DIR" >&2
        exit 2
    fi
done
REPO="$(cd "$(dirname "$0")/.." && pwd)"
# Without a GPU every pico-llm step would train on the CPU instead (with a note in its log),
# for minutes, and leave CPU figures under the GPU results' names.
case "$DEVICE" in
    cuda*)
        probe=$("$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 3)" 2>&1)
        case $? in
            0) ;;
            3) echo "gpu_checks.sh: no CUDA device here for --device $DEVICE; run it on a GPU machine, or try the steps at tiny size on the CPU with --tiny --device cpu" >&2
               exit 2 ;;
            *) echo "gpu_checks.sh: $PYTHON cannot import torch ($(printf '%s\n' "$probe" | tail -n 1))" >&2
               exit 2 ;;
        esac ;;
esac
mkdir -p "$OUT" || exit 2
OUT="$(cd "$OUT" && pwd)"
cd "$REPO" || exit 2
DEADLINE=$(( $(date +%s) + ${TOTAL_S:-540} ))
planned=0                 # the steps' own limits, against TOTAL_S: said before they run
for step in $STEPS; do
    case "$step" in
        benchmark) planned=$(( planned + ${BENCHMARK_TIMEOUT:-360} )) ;;
        gptoss) planned=$(( planned + ${GPTOSS_EAGER_TIMEOUT:-90} + ${GPTOSS_COMPILED_TIMEOUT:-200} )) ;;
        presets) planned=$(( planned + ${PRESETS_TIMEOUT:-540} )) ;;
        generate) planned=$(( planned + 3 * ${GENERATE_TIMEOUT:-120} )) ;;
        recipe) planned=$(( planned + ${RECIPE_TIMEOUT:-420} ))
                if [ -z "${RECIPE_INPUT_DIR:-}" ] && [ "$TINY" = 0 ]; then
                    planned=$(( planned + ${RECIPE_CORPUS_TIMEOUT:-120} )); fi ;;
        tests) planned=$(( planned + ${TESTS_TIMEOUT:-240} )) ;;
        suite) planned=$(( planned + ${SUITE_TIMEOUT:-900} )) ;;
    esac
done
if [ "$planned" -gt "${TOTAL_S:-540}" ]; then
    echo "gpu_checks.sh: note: the limits of the steps in STEPS add up to $planned s, more than TOTAL_S=${TOTAL_S:-540}: the last ones may be cut short or skipped; raise TOTAL_S, or run fewer STEPS" >&2
fi
WORK="$(mktemp -d)"       # run logs and caches of the pico-llm runs: only their reports are kept
trap 'rm -rf "$WORK"' EXIT
LOGS="$WORK/logs"         # packed into OUT/logs.tgz after each step
for name in $found; do rm -f "$OUT/$name" || exit 2; done    # an earlier run's, with --replace
mkdir -p "$LOGS" || exit 2
: > "$OUT/summary.txt"

pack_logs() {  # OUT/logs.tgz replaced whole, so a run stopped mid-step keeps the last one
    tar czf "$OUT/.logs.tgz.part" -C "$WORK" logs && mv -f "$OUT/.logs.tgz.part" "$OUT/logs.tgz"
}

# timeout runs each step in a process group of its own, which a signal to this script's group
# (Ctrl-C) does not reach and which outlives this script: a signal stops the step in flight
# too (timeout passes it on, then kills after 15 s), and then the script.
STEP_PID=""
stop() {  # exit status
    trap - TERM INT HUP
    if [ -n "$STEP_PID" ]; then kill -TERM "$STEP_PID" 2>/dev/null; wait "$STEP_PID"; fi
    exit "$1"
}
trap 'stop 143' TERM
trap 'stop 130' INT
trap 'stop 129' HUP

run_step() {  # name timeout log command...: run, time, record "name status seconds"
    local name="$1" limit="$2" log="$3"
    shift 3
    local started status left
    started=$(date +%s)
    left=$(( DEADLINE - started - 15 ))              # 15: the kill's grace after the limit
    if [ "$left" -lt 20 ]; then
        echo "$name skipped 0" >> "$OUT/summary.txt"
        return
    fi
    if [ "$limit" -gt "$left" ]; then limit="$left"; fi
    echo "gpu_checks.sh step $name: $*" > "$OUT/$log"  # its first line: this script's log
    timeout -k 15 "$limit" "$@" >> "$OUT/$log" 2>&1 &  # in OUT while it runs, for a run stopped
    STEP_PID=$!
    wait "$STEP_PID"
    status=$?
    STEP_PID=""
    echo "$name $status $(( $(date +%s) - started ))" >> "$OUT/summary.txt"
    cp "$OUT/$log" "$LOGS/$log"                         # left in OUT until it is in logs.tgz
    pack_logs && rm -f "$OUT/$log"
}

QUICK=()
GPTOSS_SIZE=(--max_steps_per_epoch 40 --batch_size 16)
GENERATE_SIZE=(--max_steps_per_epoch 30)
RECIPE_SIZE=(--seconds "${RECIPE_SECONDS:-60}")
if [ "$TINY" = 1 ]; then
    QUICK=(--quick)
    GENERATE_SIZE=(--max_steps_per_epoch 3 --d_model 32 --n_heads 2 --n_blocks 1 --block_size 16)
    RECIPE_SIZE=(--tiny --seconds 1)
    GPTOSS_SIZE=(--max_steps_per_epoch 3 --batch_size 4 --block_size 16 --d_model 32 --n_heads 2
                 --n_kv_heads 1 --n_blocks 1 --d_ff 32 --n_experts 2 --sliding_window 4)
fi

PER_TEST=()            # one hung test (a rendezvous, a compilation) is named, not the whole step
# the signal method: a hung test fails alone (pytest.ini's thread method ends the process, all
# of the cuda tests step's, one process)
if "$PYTHON" -c "import pytest_timeout" 2>/dev/null; then
    PER_TEST=(--timeout "${TEST_TIMEOUT:-120}" --timeout-method=signal)
fi

for step in $STEPS; do
    case "$step" in
        benchmark)
            NANOGPT=()
            if [ -n "${NANOGPT_DIR:-}" ]; then NANOGPT=(--nanogpt_dir "$NANOGPT_DIR"); fi
            run_step benchmark "${BENCHMARK_TIMEOUT:-360}" benchmark.log \
                "$PYTHON" tools/benchmark.py --gpt2 "${QUICK[@]}" --device_id "$DEVICE" \
                --output "$OUT/gpt2_benchmark.json" --profile "$LOGS" "${NANOGPT[@]}" ;;
        gptoss)
            for mode in eager compiled; do
                COMPILE=()
                limit="${GPTOSS_EAGER_TIMEOUT:-90}"
                if [ "$mode" = compiled ]; then COMPILE=(--compile); limit="${GPTOSS_COMPILED_TIMEOUT:-200}"; fi
                run_step "gptoss_$mode" "$limit" "gptoss_$mode.log" \
                    env TORCH_LOGS="${TORCH_LOGS:-graph_breaks,recompiles}" "$PYTHON" pico-llm.py --input_files 3seqs.txt --tokenizer char --models transformer \
                    --transformer_variant GPT-oss "${GPTOSS_SIZE[@]}" --epochs 1 --max_new_tokens 8 \
                    --device_id "$DEVICE" --quiet --artefacts_dir "$WORK/gptoss" \
                    --cache_dir "$WORK/gptoss/cache" --run_name "gptoss_$mode" "${COMPILE[@]}"
                if [ -f "$WORK/gptoss/gptoss_$mode.json" ]; then
                    cp "$WORK/gptoss/gptoss_$mode.json" "$OUT/.gptoss_$mode.json.part" &&
                        mv -f "$OUT/.gptoss_$mode.json.part" "$OUT/gptoss_$mode.json"
                fi
            done ;;
        presets)
            run_step presets "${PRESETS_TIMEOUT:-540}" compile_presets.log \
                "$PYTHON" tools/compile_presets.py --device_id "$DEVICE" --output "$OUT/compile_presets.json" \
                --timeout "${PRESET_RUN_TIMEOUT:-150}" --steps "${PRESET_STEPS:-40}" \
                ${PRESET_CONFIGS:+--configs "$PRESET_CONFIGS"} "${QUICK[@]/--quick/--tiny}" ;;
        generate)
            run_step generate_train "${GENERATE_TIMEOUT:-120}" generate_train.log \
                "$PYTHON" pico-llm.py --input_files 3seqs.txt --tokenizer char --models transformer \
                "${GENERATE_SIZE[@]}" --epochs 1 --max_new_tokens 4 --device_id "$DEVICE" --quiet \
                --artefacts_dir "$WORK/generate" --cache_dir "$WORK/generate/cache" \
                --run_name generate --save_dir "$WORK/generate/checkpoints"
            checkpoint=$(ls "$WORK"/generate/checkpoints/transformer/step_*.pt 2>/dev/null | tail -n 1)
            for mode in plain compiled; do
                COMPILE=()
                if [ "$mode" = compiled ]; then COMPILE=(--compile); fi
                run_step "generate_$mode" "${GENERATE_TIMEOUT:-120}" "generate_$mode.log" \
                    bash -c '"$PYTHON" pico-llm.py "$@" > "$0"' "$LOGS/generate_$mode.txt" --generate \
                    --checkpoint "${checkpoint:-missing}" --prompt "Once upon a time" --temperature 0 \
                    --max_new_tokens 40 --dtype float32 --device_id "$DEVICE" "${COMPILE[@]}"
            done ;;
        recipe)
            INPUT_DIR="${RECIPE_INPUT_DIR:-}"
            if [ -z "$INPUT_DIR" ] && [ "$TINY" = 1 ]; then INPUT_DIR=data/custom_corpus; fi
            if [ -z "$INPUT_DIR" ]; then
                INPUT_DIR="$WORK/corpus"            # tens of MB: not among the results
                run_step recipe_corpus "${RECIPE_CORPUS_TIMEOUT:-120}" recipe_corpus.log \
                    "$PYTHON" tools/recipe_gpt2.py --write_corpus "$INPUT_DIR"
            fi
            run_step recipe "${RECIPE_TIMEOUT:-420}" recipe_gpt2.log \
                "$PYTHON" tools/recipe_gpt2.py --input_dir "$INPUT_DIR" --device_id "$DEVICE" \
                --output "$OUT/recipe_gpt2.json" "${RECIPE_SIZE[@]}" ;;
        tests)
            run_step tests "${TESTS_TIMEOUT:-240}" cuda_tests.log \
                "$PYTHON" -m pytest -v --durations=10 -m cuda tests/test_cuda.py -p no:cacheprovider \
                "${PER_TEST[@]}" ;;   # a line per test: a step cut short still says which passed
        suite)
            PARALLEL=("${PER_TEST[@]}")
            if "$PYTHON" -c "import xdist" 2>/dev/null; then PARALLEL+=(-n "${SUITE_WORKERS:-12}"); fi
            run_step suite "${SUITE_TIMEOUT:-900}" fast_suite.log \
                env OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}" "$PYTHON" -m pytest -v -m "not slow and not cuda" \
                -p no:cacheprovider --durations 25 "${PARALLEL[@]}" ;;
    esac
done
pack_logs
cat "$OUT/summary.txt"
