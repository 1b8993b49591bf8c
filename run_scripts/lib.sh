# Shared helpers of the run scripts; source it, do not run it:  . "$(dirname "$0")/lib.sh"
#
# Provides (all names start with opsd_):
#   opsd_help FILE ARGS...   print FILE's header comment and exit 0 when ARGS holds -h or --help
#   opsd_header FILE         print FILE's header comment (the lines after the shebang up to the first non-comment)
#   opsd_wants_help ARGS...  true when ARGS holds -h or --help
#   opsd_python              set PYTHON: PYTHON_BIN, else $VENV/bin/python (VENV default .venv), else python3
#   opsd_gpu_count           print the number of NVIDIA GPUs nvidia-smi lists (0 without a working nvidia-smi)
#   opsd_gpu_info FILE       write each GPU's name, memory and driver (nvidia-smi CSV) to FILE; nothing without one
#   opsd_log MSG...          "[script] MSG" on stderr
#   opsd_note MSG...         "[script] note: MSG" on stderr (a setting that behaves differently from upstream)
#   opsd_die MSG...          "[script] error: MSG" on stderr, exit 2
#   opsd_bool NAME VALUE     print true/false for 1/true/yes/on or 0/false/no/off (any case); error naming NAME
#   opsd_int NAME VALUE      check VALUE is an integer (negative allowed); error naming NAME
#   opsd_has_module MOD      true when $PYTHON can import MOD
#   opsd_accelerate_cpu_cmd  `accelerate launch` of an ACCELERATE_CONFIG on CPU processes (see its block at the end)
# Variables read: PYTHON_BIN, VENV. Sets: OPSD_ROOT (repository root), OPSD_SCRIPT (calling script's name).

OPSD_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
OPSD_SCRIPT="$(basename "${BASH_SOURCE[1]:-$0}" .sh)"

opsd_log() { echo "[$OPSD_SCRIPT] $*" >&2; }
opsd_note() { echo "[$OPSD_SCRIPT] note: $*" >&2; }
opsd_die() {  # also from a command substitution ($(opsd_bool ...) inside [ ]): the script itself stops (USR1 trap)
  echo "[$OPSD_SCRIPT] error: $*" >&2
  [ "${BASHPID:-$$}" = "$$" ] || kill -USR1 "$$" 2>/dev/null
  exit 2
}
trap 'exit 2' USR1

opsd_header() {  # the header: every comment line after the shebang up to the first line that is not a comment
  awk 'NR == 1 && /^#!/ { next } /^#/ { sub(/^# ?/, ""); print; next } { exit }' "$1"
}

opsd_wants_help() {
  local arg
  for arg in "$@"; do
    if [ "$arg" = "-h" ] || [ "$arg" = "--help" ]; then return 0; fi
  done
  return 1
}

opsd_help() {
  local file=$1; shift
  if opsd_wants_help "$@"; then opsd_header "$file"; exit 0; fi
}

opsd_python() {
  local venv=${VENV:-$OPSD_ROOT/.venv}
  case "$venv" in /*) ;; *) venv="$OPSD_ROOT/$venv" ;; esac
  if [ -n "${PYTHON_BIN:-}" ]; then
    PYTHON=$PYTHON_BIN
  elif [ -x "$venv/bin/python" ]; then
    PYTHON="$venv/bin/python"
  else
    PYTHON=python3
  fi
  command -v "$PYTHON" >/dev/null 2>&1 \
    || opsd_die "interpreter '$PYTHON' not found; set PYTHON_BIN or run run_scripts/setup.sh"
  export PYTHON
}

opsd_gpu_info() {
  if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$1" 2>&1 || true
  fi
}

opsd_gpu_count() {
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    nvidia-smi -L | grep -c '^GPU'
  else
    echo 0
  fi
}

opsd_bool() {
  case "$2" in
    1|[Tt]rue|TRUE|[Yy]es|YES|[Oo]n|ON) echo true ;;
    0|[Ff]alse|FALSE|[Nn]o|NO|[Oo]ff|OFF) echo false ;;
    *) opsd_die "$1 must be 1/true/yes or 0/false/no, got '$2'" ;;
  esac
}

opsd_int() {
  [[ "$2" =~ ^-?[0-9]+$ ]] || opsd_die "$1 must be an integer, got '$2'"
}

opsd_has_module() { "$PYTHON" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$1') is None)" 2>/dev/null; }

# ----- upstream semantics helpers (kept apart from the functions above so that merges stay easy) -----------------
#   opsd_abspath VAR...      make each set, relative VAR absolute against the directory the user ran the script from
#                            (OPSD_CALLER_DIR); scripts `cd` to the repository root, defaults stay repository-relative
#   opsd_abspath_list VAR    the same for a space-separated [NAME=]FILE list
#   opsd_cpu_threads N       CPU runs: OMP_NUM_THREADS/MKL_NUM_THREADS = idle cores (cores - load) / N processes
#                            (>= 1) when unset, noted
#   opsd_flag_value FLAG ARGS...  print the last value given to --FLAG (as "--FLAG V" or "--FLAG=V") in ARGS
#   opsd_refuse_agent_vars   error naming upstream's agent-script variables (train_opd_agent.sh) that are set
# Sets OPSD_CALLER_DIR (exported, so nested scripts keep the user's directory).
export OPSD_CALLER_DIR=${OPSD_CALLER_DIR:-$PWD}

opsd_abspath() {
  local var value
  for var in "$@"; do
    value=${!var:-}
    case "$value" in ""|/*) ;; *) printf -v "$var" '%s' "$OPSD_CALLER_DIR/$value" ;; esac
  done
}

opsd_abspath_list() {
  local var=$1 spec out="" name file
  for spec in ${!var:-}; do
    name=""; file=$spec
    if [[ "$spec" == *=* && ! -e "$OPSD_CALLER_DIR/$spec" && ! -e "$spec" ]]; then name="${spec%%=*}="; file=${spec#*=}; fi
    case "$file" in /*) ;; *) file="$OPSD_CALLER_DIR/$file" ;; esac
    out="$out $name$file"
  done
  [ -n "${!var:-}" ] && printf -v "$var" '%s' "${out# }"
  return 0
}

opsd_cpu_threads() {
  # idle cores (cores minus the 1-minute load average) / processes, at least 1: torch's default of one thread per
  # core stalls when other work holds the cores (issue 17: a teacher generation batch took 353 s with the default
  # threads on a busy 2-core machine, 47 s with one thread)
  local procs=${1:-1} cores load idle
  if [ -n "${OMP_NUM_THREADS:-}" ]; then return 0; fi
  cores=$(nproc 2>/dev/null || echo 1)
  load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo 0); load=${load%%.*}
  idle=$(( cores - ${load:-0} ))
  OMP_NUM_THREADS=$(( idle / procs > 0 ? idle / procs : 1 ))
  export OMP_NUM_THREADS MKL_NUM_THREADS=${MKL_NUM_THREADS:-$OMP_NUM_THREADS}
  opsd_note "CPU run: OMP_NUM_THREADS=$OMP_NUM_THREADS torch threads per process ($cores cores, load ${load:-0}, \
$procs process(es)); set OMP_NUM_THREADS to choose"
}

opsd_flag_value() {
  local flag=$1 found="" take=0 arg; shift
  for arg in "$@"; do
    if [ "$take" = 1 ]; then found=$arg; take=0; continue; fi
    case "$arg" in "--$flag") take=1 ;; "--$flag="*) found=${arg#*=} ;; esac
  done
  printf '%s' "$found"
}

OPSD_AGENT_VARS="ENABLE_TOOLS MAX_ASSISTANT_TURNS MAX_TOOL_RESPONSE_LENGTH TOOL_FORMAT AGENT_NUM_WORKERS DATABASE_DIR \
TOOL_CONFIG_PATH REWARD_FN_PATH TRAIN_RATIO"
opsd_refuse_agent_vars() {
  local v set=""
  for v in $OPSD_AGENT_VARS; do
    [ -n "${!v:-}" ] || continue
    if [ "$v" = ENABLE_TOOLS ] && [ "$(opsd_bool ENABLE_TOOLS "$ENABLE_TOOLS")" = false ]; then continue; fi
    set="$set $v"
  done
  [ -z "$set" ] || opsd_die "${set# } set: upstream's agent script (train_opd_agent.sh: multi-turn tool rollouts, \
its own data and reward) is not supported by the run scripts; unset them (tool masks exist in the Python API: \
OPDTrainer with a tool_mask in the batch; a custom reward through opsd.reward)"
}

# ----- accelerate engines on CPU processes (ZeRO-3, FSDP, DDP configs without a GPU) ---------------------------
#   opsd_accelerate_cpu_cmd NPROC PORT ENTRY   set cmd=(...): `accelerate launch` of ENTRY with $ACCELERATE_CONFIG on
#                                              NPROC CPU processes (gloo), plus the training flags that engine needs
# Reads ACCELERATE_CONFIG, DTYPE, PYTHON, CXX; exports TORCH_EXTENSIONS_DIR [$OPSD_ROOT/.cache/torch_extensions] for
# DeepSpeed. accelerate 1.16 runs DeepSpeed only in processes not marked CPU, so those get --ddp_backend gloo instead
# of --use_cpu; FSDP and DDP configs get --use_cpu true (opsd's trainer attaches the FSDP plugin to the CPU
# processes). Mixed precision follows DTYPE (bf16 only with DTYPE=bfloat16), not the config.
opsd_accelerate_cpu_cmd() {
  local config=$ACCELERATE_CONFIG kind precision=no flags=()
  [ -f "$config" ] || opsd_die "ACCELERATE_CONFIG=$config is not a file (run_scripts/accelerate/*.yaml)"
  kind=$(awk -F': *' '/^distributed_type:/ { print $2 }' "$config")
  case "$kind" in
    DEEPSPEED)
      opsd_has_module deepspeed || opsd_die "ACCELERATE_CONFIG=$config uses DeepSpeed but $PYTHON cannot import \
deepspeed: pip install deepspeed==0.19.8 (requirements-test.txt)"
      # on CPU DeepSpeed JIT-compiles its shared-memory collective op when it starts (once, cached in
      # TORCH_EXTENSIONS_DIR) and fails without a C++ compiler
      command -v "${CXX:-c++}" >/dev/null 2>&1 || opsd_die "ACCELERATE_CONFIG=$config: DeepSpeed on CPU compiles an \
op at start and needs a C++ compiler with OpenMP ('${CXX:-c++}' not found; e.g. apt-get install g++)"
      # a cache per checkout: torch's shared ~/.cache one rebuilds whenever another install path compiled in between
      export TORCH_EXTENSIONS_DIR=${TORCH_EXTENSIONS_DIR:-$OPSD_ROOT/.cache/torch_extensions}
      flags=(--ddp_backend gloo) ;;
    FSDP|MULTI_GPU|MULTI_CPU) flags=(--use_cpu true) ;;
    *) opsd_die "ACCELERATE_CONFIG=$config: distributed_type '$kind' cannot run on CPU processes (DEEPSPEED, FSDP or \
MULTI_GPU can)" ;;
  esac
  [ "${DTYPE:-float32}" = bfloat16 ] && precision=bf16
  cmd=("$PYTHON" -m accelerate.commands.launch --config_file "$config" --num_processes "$1" --main_process_port "$2"
       --mixed_precision "$precision" -m "$3" "${flags[@]}")
}
