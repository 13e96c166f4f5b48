#!/usr/bin/env bash
# Builds the `bitclone` binary of the previous release (the commit named in
# deploy/previous-release) from this clone's git history, once per machine,
# into ~/.cache/bitclone/releases/<commit>/bitclone, and prints that path.
#   scripts/build-previous.sh          build if need be, print the path
#   scripts/build-previous.sh --path   print the path only
#
# It builds in the shared target dir (CARGO_TARGET_DIR, set by the
# Makefile) so that RocksDB's C++ is not compiled again. Its crates have
# another version than this checkout's (checked below), so they are
# separate artifacts; but cargo copies the binary it builds to
# $CARGO_TARGET_DIR/debug/bitclone: build this checkout again afterwards
# (the Makefile does) to put this build's binary back there.
set -euo pipefail
cd "$(dirname "$0")/.."

commit=$(awk '$1 == "commit" { print $2 }' deploy/previous-release)
if [[ ! $commit =~ ^[0-9a-f]{40}$ ]]; then
    echo "deploy/previous-release names no full commit id" >&2
    exit 2
fi
releases=${BITCLONE_RELEASES:-$HOME/.cache/bitclone/releases}
out="$releases/$commit/bitclone"
if [[ ${1:-} == --path ]]; then
    echo "$out"
    exit 0
fi
if [[ -x $out ]] && "$out" --version >/dev/null 2>&1; then
    echo "previous release ${commit:0:7}: built already" >&2
    echo "$out"
    exit 0
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    # A shallow or single-branch clone: its origin has the commit.
    GIT_TERMINAL_PROMPT=0 git fetch --quiet origin "$commit" || true
fi
if ! git cat-file -e "$commit^{commit}" 2>/dev/null; then
    echo "commit $commit (deploy/previous-release) is not in this clone's history" >&2
    exit 1
fi
: "${CARGO_TARGET_DIR:=$HOME/.cache/bitclone/target}"
export CARGO_TARGET_DIR
export PATH="$HOME/.cargo/bin:$PATH"

# A fixed source path: a rebuild reuses what an earlier one compiled.
src="$releases/src-$commit"
rm -rf "$src"
mkdir -p "$src"
git archive "$commit" | tar -x -C "$src"
# Cargo names a workspace crate's artifacts by its name, version and path
# relative to the workspace, not by where the workspace is: the previous
# release's crates share artifacts with this checkout's when their
# versions are equal, and each build would silently reuse the other's
# (checked by modification times only). A release bumps the version.
version() { sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"/\1/p' "$1"; }
if [[ $(version "$src/Cargo.toml") == "$(version Cargo.toml)" ]]; then
    echo "the previous release ${commit:0:7} has this checkout's version ($(version Cargo.toml)):" \
        "bump [workspace.package] version in Cargo.toml" >&2
    rm -rf "$src"
    exit 1
fi
# git archive dates every file at the commit: newer dates make cargo
# rebuild artifacts another checkout of that version left behind.
find "$src" -exec touch -h {} +
echo "previous release ${commit:0:7}: building from $src" >&2
(cd "$src" && cargo build --offline --locked -p bitclone-node --bin bitclone)
mkdir -p "$(dirname "$out")"
cp "$CARGO_TARGET_DIR/debug/bitclone" "$out.tmp"
mv "$out.tmp" "$out"
rm -rf "$src"
echo "previous release ${commit:0:7}: $("$out" --version)" >&2
echo "$out"
