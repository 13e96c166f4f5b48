#!/usr/bin/env bash
# Install Garage (the S3-compatible object store the sink tests run against)
# once per machine, cached outside the repo. Idempotent: prints the binary's
# path and exits at once when it is already there.
#
#   scripts/install-garage.sh        # prints the path of the garage binary
#
# Garage is built from crates.io (`cargo install --locked garage`) into
# $BITCLONE_CACHE/garage (default ~/.cache/bitclone/garage) with its own
# target dir, so it never invalidates BitClone's build. The first build takes
# a long while on a small machine; later runs reuse it.
set -euo pipefail

GARAGE_VERSION="${GARAGE_VERSION:-2.1.0}"
cache="${BITCLONE_CACHE:-${HOME}/.cache/bitclone}"
root="${cache}/garage"
bin="${root}/bin/garage"
export PATH="${HOME}/.cargo/bin:${PATH}"

if [[ -x "$bin" ]] && [[ -f "${root}/VERSION" ]] && [[ "$(cat "${root}/VERSION")" == "$GARAGE_VERSION" ]]; then
    echo "$bin"
    exit 0
fi

echo "install-garage: building garage ${GARAGE_VERSION} into ${root} (once per machine)" >&2
mkdir -p "$root"
CARGO_TARGET_DIR="${cache}/garage-target" \
    cargo install --locked --root "$root" --version "=${GARAGE_VERSION}" garage >&2
echo "$GARAGE_VERSION" >"${root}/VERSION"
# The build tree is only needed to build; drop it to save disk.
rm -rf "${cache}/garage-target"
echo "$bin"
