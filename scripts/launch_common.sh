# Shared body of the launch scripts in scripts/single_node/ and scripts/multi_node/.
#
# Sourced, not run. The launch scripts only pick a preset of config/grpo.py and the hardware layout;
# every algorithm setting lives in the presets (extra `--config.*` arguments pass through to the
# entry point unchanged). The entry point is `python -m flow_grpo.train`, which takes the model
# family from the preset, so nothing here names a family.
#
# Distributed engine: DDP, always (scripts/accelerate_configs/multi_gpu.yaml on one machine,
# multi_node.yaml on several). Only the LoRA is trained, so nothing needs sharding; the trainer stops
# at start-up under DeepSpeed or FSDP. The reference TP-GRPO scripts launched with
# deepspeed_zero2.yaml: these scripts replace them with the same presets on DDP, no config file to pass.
#
# Environment knobs (all optional unless stated):
#   MODEL_NAME   a model family with presets, e.g. sd3 | flux  (default sd3; picks <task>_<MODEL_NAME>)
#   REWARD       pickscore | geneval | general_ocr   (default pickscore; general_ocr -> the ocr_* presets)
#   PRESET       any preset name of config/grpo.py; overrides MODEL_NAME / REWARD
#   BETA         KL weight, passed as --config.train.beta=$BETA
#   MASTER_PORT  rendezvous port (default 29500)
#   NUM_GPUS     single node: processes to start (default: visible GPUs, else 1)
#   MASTER_ADDR, NUM_MACHINES (required), NUM_PROCESSES (total; default NUM_MACHINES x local GPUs): multi node
#   DRY_RUN=1    print the resolved command and exit
#   PYTHON       interpreter used to read the preset (default: python, else python3)

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ACCELERATE_CONFIGS="scripts/accelerate_configs"

die() {
    echo "error: $*" >&2
    exit 2
}

is_positive_int() {
    [[ "$1" =~ ^[1-9][0-9]*$ ]]
}

python_bin() {
    if [[ -n "${PYTHON:-}" ]]; then
        echo "$PYTHON"
    elif command -v python >/dev/null 2>&1; then
        echo python
    elif command -v python3 >/dev/null 2>&1; then
        echo python3
    else
        die "no python interpreter on PATH; activate the project's virtual environment (source .venv/bin/activate) or set PYTHON"
    fi
}

# Sets PRESET_NAME from PRESET, or from MODEL_NAME / REWARD and the algorithm ($1: tp_grpo | flow_grpo);
# PRESET_KNOB names the knob the preset came from (for error messages).
resolve_preset() {
    local algorithm="$1"
    if [[ -n "${PRESET:-}" ]]; then
        PRESET_NAME="$PRESET"
        PRESET_KNOB="PRESET=$PRESET"
        return
    fi
    local model="${MODEL_NAME:-sd3}" reward="${REWARD:-pickscore}" task
    [[ "$model" =~ ^[A-Za-z0-9_]+$ ]] || die "MODEL_NAME=$model is not supported; use a model family such as sd3 or flux (or PRESET=<name>)"
    case "$reward" in
        pickscore) task=pickscore ;;
        geneval) task=geneval ;;
        general_ocr | ocr) task=ocr ;;
        *) die "REWARD=$reward is not supported; use REWARD=pickscore, REWARD=geneval or REWARD=general_ocr (or PRESET=<name>)" ;;
    esac
    PRESET_NAME="${task}_${model}"
    if [[ "$algorithm" == flow_grpo ]]; then
        PRESET_NAME+="_flow_grpo"
    fi
    PRESET_KNOB="MODEL_NAME=$model is not supported (REWARD=$reward)"
}

# Loads the preset (which also checks that it exists) and sets PRESET_FAMILY from its model family.
# Fails when the preset trains another algorithm than the script ($1) launches.
check_preset() {
    local algorithm="$1" python info preset_algorithm
    python="$(python_bin)"
    info="$(cd "$REPO_ROOT" && "$python" - "$PRESET_NAME" "$PRESET_KNOB" <<'PY'
import importlib.util
import sys

spec = importlib.util.spec_from_file_location("flow_grpo_presets", "config/grpo.py")
presets = importlib.util.module_from_spec(spec)
spec.loader.exec_module(presets)
try:
    config = presets.get_config(sys.argv[1])
except ValueError as error:
    print(f"error: {sys.argv[2]}: {error}", file=sys.stderr)
    sys.exit(2)
print(config.pretrained.family, config.algorithm)
PY
)" || exit 2
    read -r PRESET_FAMILY preset_algorithm <<<"$info"
    if [[ "$preset_algorithm" != "$algorithm" ]]; then
        die "preset $PRESET_NAME trains $preset_algorithm, but this script launches $algorithm; use scripts/<single_node|multi_node>/$preset_algorithm.sh or a $algorithm preset"
    fi
}

# Number of GPUs this machine exposes: CUDA_VISIBLE_DEVICES if set, else nvidia-smi, else 1.
count_gpus() {
    local count=0
    if [[ -n "${CUDA_VISIBLE_DEVICES+set}" ]]; then
        local ids id
        IFS=, read -ra ids <<<"$CUDA_VISIBLE_DEVICES"
        for id in "${ids[@]}"; do
            [[ -n "$id" && "$id" != "-1" ]] && count=$((count + 1))
        done
    elif command -v nvidia-smi >/dev/null 2>&1; then
        count="$(nvidia-smi --list-gpus 2>/dev/null | grep -c '^GPU' || true)"
    fi
    if [[ "$count" -gt 0 ]]; then
        echo "$count"
    else
        echo 1
    fi
}

check_common_knobs() {
    MASTER_PORT="${MASTER_PORT:-29500}"
    if ! is_positive_int "$MASTER_PORT" || ((MASTER_PORT > 65535)); then
        die "MASTER_PORT=$MASTER_PORT is not a port number (1-65535)"
    fi
    if [[ -n "${BETA:-}" ]] && ! [[ "$BETA" =~ ^[0-9]*\.?[0-9]+([eE][-+]?[0-9]+)?$ ]]; then
        die "BETA=$BETA is not a non-negative number (e.g. BETA=0 or BETA=1e-4)"
    fi
}

# The entry point (`-m flow_grpo.train`) and its arguments: preset, optional BETA, then the caller's extra arguments.
training_arguments() {
    TRAIN_ARGS=(-m flow_grpo.train "--config=config/grpo.py:$PRESET_NAME")
    if [[ -n "${BETA:-}" ]]; then
        TRAIN_ARGS+=("--config.train.beta=$BETA")
    fi
    TRAIN_ARGS+=("$@")
}

# Prints the command, then runs it from the repository root (unless DRY_RUN=1).
run_command() {
    echo "preset: $PRESET_NAME (model family $PRESET_FAMILY)"
    local quoted
    quoted="$(printf '%q ' "$@")"
    echo "command: ${quoted% }"
    if [[ "${DRY_RUN:-0}" == 1 ]]; then
        return 0
    fi
    command -v "$1" >/dev/null 2>&1 \
        || die "'$1' is not on PATH; activate the project's virtual environment (source .venv/bin/activate)"
    cd "$REPO_ROOT"
    exec "$@"
}

# Single node: `launch_single_node ALGORITHM [extra training arguments...]`.
launch_single_node() {
    local algorithm="$1"
    shift
    check_common_knobs
    local num_gpus="${NUM_GPUS:-$(count_gpus)}"
    is_positive_int "$num_gpus" || die "NUM_GPUS=$num_gpus is not a positive integer"
    resolve_preset "$algorithm"
    check_preset "$algorithm"
    training_arguments "$@"
    local command=(accelerate launch --num_processes "$num_gpus" --main_process_port "$MASTER_PORT")
    if ((num_gpus > 1)); then
        command+=(--config_file "$ACCELERATE_CONFIGS/multi_gpu.yaml")
    else
        command+=(--num_machines 1 --dynamo_backend no)
    fi
    run_command "${command[@]}" "${TRAIN_ARGS[@]}"
}

# Multi node: `launch_multi_node ALGORITHM NODE_RANK [extra training arguments...]`, run once per machine.
launch_multi_node() {
    local algorithm="$1"
    shift
    local rank="${1:-}"
    [[ "$rank" =~ ^(0|[1-9][0-9]*)$ ]] || die "the first argument must be this machine's rank (0 for the main machine), got '${rank}'"
    shift
    check_common_knobs
    [[ -n "${MASTER_ADDR:-}" ]] || die "MASTER_ADDR is not set; set it to the address of the rank-0 machine"
    [[ -n "${NUM_MACHINES:-}" ]] || die "NUM_MACHINES is not set; set it to the number of machines of the job"
    is_positive_int "$NUM_MACHINES" || die "NUM_MACHINES=$NUM_MACHINES is not a positive integer"
    ((rank < NUM_MACHINES)) || die "rank $rank is out of range for NUM_MACHINES=$NUM_MACHINES (use 0..$((NUM_MACHINES - 1)))"
    local num_processes="${NUM_PROCESSES:-$((NUM_MACHINES * $(count_gpus)))}"
    is_positive_int "$num_processes" || die "NUM_PROCESSES=$num_processes is not a positive integer"
    ((num_processes % NUM_MACHINES == 0)) \
        || die "NUM_PROCESSES=$num_processes (total) does not split evenly over NUM_MACHINES=$NUM_MACHINES machines"
    resolve_preset "$algorithm"
    check_preset "$algorithm"
    training_arguments "$@"
    run_command accelerate launch --config_file "$ACCELERATE_CONFIGS/multi_node.yaml" \
        --num_machines "$NUM_MACHINES" --num_processes "$num_processes" --machine_rank "$rank" \
        --main_process_ip "$MASTER_ADDR" --main_process_port "$MASTER_PORT" "${TRAIN_ARGS[@]}"
}
