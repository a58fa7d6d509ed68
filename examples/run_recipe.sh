#!/usr/bin/env bash
# Launches recipes/<recipe>.yaml from the repository root, preparing its data first when it is missing.
#
#   bash examples/run_recipe.sh <recipe> [hydra overrides]
#   (e.g. trainer.logger=[console] trainer.total_training_steps=10, or --cfg job to print the config only)
#
# What a recipe needs is declared in its header (the YAML's leading '#' lines), which this script reads:
# - Data lines, `#   python data_preprocess/<script>.py <args>   # -> <output> [<output>...]`: each line runs (with
#   $PYTHON, from the repository root) unless every output exists; skipped with --cfg job. In the outputs `{a,b}`
#   and a leading `~` expand as in bash; in the arguments a leading `~` and `${NAME:-default}` do (so the default
#   lives in the recipe and the environment overrides it: OT3_MAX_SAMPLES=1000 for `--max_samples
#   ${OT3_MAX_SAMPLES:-50000}`). No other shell syntax is allowed there; the line is also what to type by hand.
# - `# Entry point: verl.trainer.sft_trainer`: an SFT recipe, run with
#   `python -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node=${NPROC_PER_NODE:-8}
#   -m verl.trainer.sft_trainer` (with --cfg job: `python -m verl.trainer.sft_trainer`). Otherwise the entry
#   point is `python -m opd_verl.main_opd`.
# - `# Student: the latest checkpoint of recipe <sft recipe> in <dir>`: unless actor_rollout_ref.model.path=... is
#   given, the student is SFT_DIR/global_step_<N>/huggingface, <N> from SFT_DIR/latest_checkpointed_iteration.txt
#   (SFT_DIR defaults to <dir> under the repository); with --cfg job a missing checkpoint is left to the recipe.
#
# PYTHON=... picks the interpreter (default: the repository's .venv, else python).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"
# the repository's .venv when there is one (examples/setup_cpu.sh makes it), else python on PATH
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python; fi
fi

die() { echo "run_recipe.sh: error: $*" >&2; exit 1; }

recipe="${1:-}"
available="$(cd recipes && for f in *.yaml; do printf '%s ' "${f%.yaml}"; done)"
if [ -z "$recipe" ]; then
    echo "usage: bash examples/run_recipe.sh <recipe> [hydra overrides]; recipes: ${available% }" >&2
    exit 2
elif [[ ! "$recipe" =~ ^[A-Za-z0-9_.-]+$ ]] || [ ! -f "recipes/$recipe.yaml" ]; then
    echo "run_recipe.sh: error: unknown recipe '$recipe'; available: ${available% }" >&2
    exit 2
fi
shift
header="$(grep '^#' "recipes/$recipe.yaml")"

print_only=0
for arg in "$@"; do
    case "$arg" in --cfg|--cfg=*|-c) print_only=1 ;; esac
done

# expand <word>: REPLY = <word> with a leading ~ and each ${NAME:-default} expanded; other shell syntax is an error
expand() {
    local word="$1" out="" name
    case "$word" in "~") word="$HOME" ;; "~/"*) word="$HOME/${word#"~/"}" ;; esac
    while [[ "$word" =~ ^([^\$]*)\$\{([A-Za-z_][A-Za-z0-9_]*):-([^\}\$]*)\}(.*)$ ]]; do
        name="${BASH_REMATCH[2]}"
        out+="${BASH_REMATCH[1]}${!name:-${BASH_REMATCH[3]}}"
        word="${BASH_REMATCH[4]}"
    done
    case "$word" in *[\$\`\"\'\\\;\|\&\<\>\(\)\*\?\{\}]*) die "recipes/$recipe.yaml: unsupported shell syntax in '$1'" ;; esac
    REPLY="$out$word"
}

# braces <word>: print the words of its bash brace expansion ({a,b}; nested groups not supported), one a line
braces() {
    if [[ "$1" =~ ^([^\{]*)\{([^\}]*)\}(.*)$ ]]; then
        local pre="${BASH_REMATCH[1]}" post="${BASH_REMATCH[3]}" alt
        local IFS=,
        for alt in ${BASH_REMATCH[2]}; do braces "$pre$alt$post"; done
    else
        printf '%s\n' "$1"
    fi
}

# the student of a recipe that trains on an SFT checkpoint (before the data, to fail early)
student=()
from="$(sed -nE 's/^# Student: the latest checkpoint of recipe ([^ ]+) in ([^ ]+)$/\1 \2/p' <<< "$header")"
if [ -n "$from" ]; then
    given=0
    for arg in "$@"; do
        case "$arg" in
            actor_rollout_ref.model.path=* | +actor_rollout_ref.model.path=* | ++actor_rollout_ref.model.path=*) given=1 ;;
        esac
    done
    if [ "$given" = 0 ]; then
        SFT_DIR="${SFT_DIR:-$REPO/${from#* }}"
        tracker="$SFT_DIR/latest_checkpointed_iteration.txt"
        if [ -f "$tracker" ]; then
            student=("actor_rollout_ref.model.path=$SFT_DIR/global_step_$(tr -d '[:space:]' < "$tracker")/huggingface")
        elif [ "$print_only" = 0 ]; then
            die "no SFT checkpoint in $SFT_DIR; run \`bash examples/run_recipe.sh ${from%% *}\` first," \
                "set SFT_DIR, or pass actor_rollout_ref.model.path=<HF model directory>"
        fi
    fi
fi

# the data lines: run each whose outputs are not all present
mapfile -t data_lines < <(grep -E '^#[[:space:]]+python data_preprocess/' <<< "$header" || true)
for line in ${data_lines[@]+"${data_lines[@]}"}; do
    line="${line#\#}"
    [[ "$line" == *" # -> "* ]] || die "recipes/$recipe.yaml: data line without '# -> <outputs>': $line"
    read -ra words <<< "${line%%" # -> "*}"
    read -ra outputs <<< "${line#*" # -> "}"
    [ "${#outputs[@]}" -gt 0 ] || die "recipes/$recipe.yaml: data line without outputs: $line"
    missing=0
    for out in "${outputs[@]}"; do
        mapfile -t files < <(braces "$out")
        for file in "${files[@]}"; do expand "$file"; [ -f "$REPLY" ] || missing=1; done
    done
    if [ "$missing" = 1 ] && [ "$print_only" = 0 ]; then
        args=()
        for word in "${words[@]:1}"; do expand "$word"; args+=("$REPLY"); done
        "$PYTHON" "${args[@]}"
    fi
done

if grep -qE '^# Entry point: verl\.trainer\.sft_trainer([[:space:]]|$)' <<< "$header"; then
    if [ "$print_only" = 1 ]; then
        # compose and print only: no need for torchrun's workers
        exec "$PYTHON" -m verl.trainer.sft_trainer --config-dir "$REPO" +recipes="$recipe" "$@"
    fi
    exec "$PYTHON" -m torch.distributed.run --standalone --nnodes=1 --nproc_per_node="${NPROC_PER_NODE:-8}" \
        -m verl.trainer.sft_trainer --config-dir "$REPO" +recipes="$recipe" "$@"
fi

exec "$PYTHON" -m opd_verl.main_opd --config-dir "$REPO" +recipes="$recipe" ${student[@]+"${student[@]}"} "$@"
