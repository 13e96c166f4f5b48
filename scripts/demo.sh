#!/usr/bin/env bash
# BitClone end-to-end demo on one node:
#   1. start `bitclone node` on a free loopback port
#   2. generate a deterministic ~150 MiB sample dataset (200 files, nested dirs)
#   3. put it, modify a little of it, put it again (only the changes are stored)
#   4. clone the latest snapshot to the sinks: a local object-store directory
#      (the S3 stand-in, file://…?mirror=true) and, when the machine has
#      Postgres binaries, a catalog in a throwaway Postgres server
#   5. restore it with `bitclone get`, and off-cluster with `bitclone restore`
#      from the sinks alone
#   6. check every restore and the export are byte-identical to the source
#
# usage: scripts/demo.sh PATH/TO/bitclone      (or simply: make demo)
# Everything lives in .bitclone/demo/ under the repo, wiped at each run.
set -euo pipefail

say() { echo "demo: $*"; }
die() {
    echo "demo: FAILED: $*" >&2
    exit 1
}

if [[ $# -ne 1 ]]; then
    echo "usage: $0 PATH/TO/bitclone" >&2
    exit 2
fi
BIN="$1"
[[ -x "$BIN" ]] || die "bitclone binary not found or not executable: $BIN (build it with: make demo)"
BIN="$(cd "$(dirname "$BIN")" && pwd)/$(basename "$BIN")"
command -v python3 >/dev/null 2>&1 || die "python3 is needed to generate the sample data (scripts/install-deps.sh)"

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
W="$ROOT/.bitclone/demo"
SRC="$W/source"
EXPORT="$W/export"
RESTORE="$W/restore"
CLUSTER_DIR="$W/cluster"
NODE_LOG="$CLUSTER_DIR/node-1.log"
DATASET=demo

# Files a sink may write next to the data (manifest, commit records): names
# starting with .bitclone or _bitclone are left out of the comparison.
META_GLOBS=('.bitclone*' '_bitclone*')

# ---------------------------------------------------------------- node process
CLUSTER_UP=0
stop_node() {
    # `bitclone dev down`: SIGTERM to every node, wait, SIGKILL stragglers.
    ((CLUSTER_UP)) || return 0
    CLUSTER_UP=0
    "$BIN" dev down --data-dir "$CLUSTER_DIR" >/dev/null
}
PG_DIR=""
PG_AS=()
PG_BIN=""
stop_pg() {
    [[ -n "$PG_DIR" ]] || return 0
    "${PG_AS[@]}" env -i PATH="$PATH" LANG=C "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf -- "$PG_DIR"
    PG_DIR=""
}
cleanup() {
    local status=$?
    stop_node || true
    stop_pg || true
    if ((status != 0)) && [[ -f "$NODE_LOG" ]]; then
        echo "demo: last lines of $NODE_LOG:" >&2
        tail -n 30 "$NODE_LOG" >&2 || true
    fi
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- helpers
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.2f", b - a }'; }
mb() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1e6 }'; }
mbps() { awk -v b="$1" -v s="$2" 'BEGIN { if (s > 0) printf "%.1f", b / 1e6 / s; else printf "n/a" }'; }
f2() { awk -v x="$1" 'BEGIN { if (x ~ /^[0-9.eE+-]+$/) printf "%.2f", x; else printf "%s", x }'; }
pct() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f%%", 100 * a / b; else printf "n/a" }'; }

# jfields JSON KEY... : print the keys' values, one per line ("-" when missing).
# Accepts the whole output being one JSON object, or the last line that is one.
jfields() {
    python3 - "$@" <<'PY'
import json, sys
text, keys = sys.argv[1], sys.argv[2:]
def parse(t):
    try:
        v = json.loads(t)
        if isinstance(v, dict):
            return v
    except ValueError:
        pass
    for line in reversed(t.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                v = json.loads(line)
                if isinstance(v, dict):
                    return v
            except ValueError:
                pass
    sys.exit("demo: no JSON object in the command's output:\n" + t)
obj = parse(text)
for k in keys:
    v = obj.get(k)
    if v is None:
        print("-")
    elif isinstance(v, (dict, list)):
        print(json.dumps(v))
    else:
        print(v)
PY
}

# cli ARGS... : the CLI against our node.
cli() { "$BIN" --endpoint "$ENDPOINT" "$@"; }

# run NAME ARGS... : run the CLI, stdout to $OUT, stderr to $W/NAME.err; die with
# the error text if it fails.
OUT=""
run() {
    local name="$1"
    shift
    if ! OUT="$(cli "$@" 2>"$W/$name.err")"; then
        echo "demo: \`bitclone $*\` failed; stdout:" >&2
        echo "$OUT" >&2
        echo "demo: stderr:" >&2
        cat "$W/$name.err" >&2
        die "$name"
    fi
}

# tree_sums DIR : sorted "sha256  ./path" lines of every file, sink metadata excluded.
tree_sums() {
    local prune=() g
    for g in "${META_GLOBS[@]}"; do
        prune+=(-name "$g" -prune -o)
    done
    (cd "$1" && find . "${prune[@]}" -type f -print0 | LC_ALL=C sort -z | xargs -0 -r sha256sum)
}

# verify NAME DIR : DIR must hold exactly the source's files, byte for byte.
verify() {
    local name="$1" dir="$2" x=() g
    [[ -d "$dir" ]] || die "$name: directory $dir does not exist"
    for g in "${META_GLOBS[@]}"; do
        x+=(-x "$g")
    done
    if ! diff -r "${x[@]}" "$SRC" "$dir" >"$W/diff-$name.txt" 2>&1; then
        echo "demo: $name differs from the source (first lines of $W/diff-$name.txt):" >&2
        head -n 20 "$W/diff-$name.txt" >&2
        die "$name is not identical to the source"
    fi
    tree_sums "$dir" >"$W/sha256-$name.txt"
    if ! cmp -s "$W/sha256-source.txt" "$W/sha256-$name.txt"; then
        diff "$W/sha256-source.txt" "$W/sha256-$name.txt" | head -n 20 >&2 || true
        die "$name: sha256 list differs from the source's"
    fi
    say "$name: identical to the source ($(wc -l <"$W/sha256-$name.txt") files, diff -r + sha256)"
}

# ---------------------------------------------------------------- sample data
# generate ROOT  |  modify ROOT : deterministic (seeded) dataset and changes.
dataset() {
    python3 - "$@" <<'PY'
import os, random, shutil, sys

mode, root = sys.argv[1], sys.argv[2]
MiB = 1 << 20
WORDS = ("alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike "
         "november oscar papa quebec romeo sierra tango uniform victor whiskey xray "
         "yankee zulu clone chunk snapshot tenant shard replica lease manifest").split()

def path(rel):
    p = os.path.join(root, rel)
    os.makedirs(os.path.dirname(p), exist_ok=True)
    return p

def text(rng, size):
    lines, n = [], 0
    while n < size:
        line = " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))) + "\n"
        lines.append(line)
        n += len(line)
    return "".join(lines)

def write_random(rel, size, rng):
    with open(path(rel), "wb") as f:
        left = size
        while left:
            n = min(left, MiB)
            f.write(rng.randbytes(n))
            left -= n

def note(i):
    return f"docs/team-{i % 6}/project-{i % 5}/notes-{i:03d}.txt"

if mode == "generate":
    rng = random.Random(42)
    for i in range(180):                       # small text files, 30 dirs
        with open(path(note(i)), "w") as f:
            f.write(text(rng, rng.randint(512, 32 * 1024)))
    for j in range(18):                        # 1-8 MiB binaries
        size = rng.randint(1, 7) * MiB + rng.randint(0, MiB - 1)
        write_random(f"data/shard-{j % 4}/part-{j:02d}.bin", size, rng)
    shutil.copyfile(path("data/shard-3/part-03.bin"),   # one duplicate file
                    path("backup/part-03-copy.bin"))
    write_random("media/big-video.raw", 64 * MiB, rng)  # one 64 MiB file
elif mode == "modify":
    rng = random.Random(43)
    for i in (0, 37, 74, 111, 148):            # append to 5 files
        with open(path(note(i)), "a") as f:
            f.write(text(rng, 2048))
    with open(path("media/big-video.raw"), "r+b") as f:   # 1 MiB in the middle
        f.seek(32 * MiB)
        f.write(rng.randbytes(MiB))
    with open(path("docs/team-0/project-0/new-notes.txt"), "w") as f:  # add 2 files
        f.write(text(rng, 10 * 1024))
    write_random("data/shard-1/part-new.bin", 2 * MiB, rng)
    os.remove(path(note(1)))                   # delete 1 file
else:
    sys.exit(f"unknown mode {mode}")

files = total = 0
for d, _, names in os.walk(root):
    for n in names:
        files += 1
        total += os.path.getsize(os.path.join(d, n))
print(files, total)
PY
}

# start_pg : a throwaway Postgres for the catalog sink, if the machine has the
# binaries; sets CATALOG. Postgres refuses to run as root: as root it runs as
# `nobody`, in a private directory under /tmp that nobody can reach.
CATALOG=""
start_pg() {
    PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [[ -z "$PG_BIN" || ! -x "$PG_BIN/initdb" ]]; then
        say "no Postgres binaries (/usr/lib/postgresql/*/bin): skipping the catalog sink"
        return 0
    fi
    PG_DIR=$(mktemp -d /tmp/bitclone-demo-pg.XXXXXX)
    if [[ "$(id -u)" == 0 ]]; then
        command -v setpriv >/dev/null || die "setpriv (util-linux) is needed to run Postgres as nobody"
        chown nobody:nogroup "$PG_DIR"
        PG_AS=(setpriv --reuid=nobody --regid=nogroup --clear-groups)
    fi
    chmod 700 "$PG_DIR"
    local port
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    "${PG_AS[@]}" env -i PATH="$PATH" LANG=C "$PG_BIN/initdb" -A trust -U postgres --no-sync -E UTF8 --locale=C -D "$PG_DIR/data" >"$W/initdb.log" 2>&1 ||
        die "initdb failed (see $W/initdb.log)"
    "${PG_AS[@]}" env -i PATH="$PATH" LANG=C "$PG_BIN/pg_ctl" -w -t 60 -D "$PG_DIR/data" -l "$PG_DIR/data/log" \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $PG_DIR/data -c fsync=off" start >/dev/null ||
        die "Postgres did not start: $(tail -n 5 "$PG_DIR/data/log" 2>/dev/null)"
    "$PG_BIN/psql" -X -q -h 127.0.0.1 -p "$port" -U postgres -d postgres -c "CREATE DATABASE demo" >/dev/null ||
        die "CREATE DATABASE failed"
    CATALOG="postgres://postgres@127.0.0.1:$port/demo"
    say "Postgres $("$PG_BIN/postgres" --version | awk '{print $3}') for the catalog sink at $CATALOG"
}

# ================================================================ the demo
say "work dir $W (wiped)"
rm -rf -- "$W"
mkdir -p "$W"

# The nodes write only to sinks their operator declared: the catalog is
# declared in their config as sink://catalog.
start_pg
NODE_CONFIG="$W/nodes.toml"
: >"$NODE_CONFIG"
if [[ -n "$CATALOG" ]]; then
    printf '[sinks.catalog]\ntenants = ["*"]\npostgres = { url = "%s" }\n' "$CATALOG" >"$NODE_CONFIG"
fi

say "starting a 3-node cluster: $BIN dev up --nodes 3 --data-dir $CLUSTER_DIR --allow-root $W --config $NODE_CONFIG (mutual TLS, bootstrap, join; file:// sinks only under the demo dir; the catalog declared as sink://catalog)"
CLUSTER_UP=1
run_up=$("$BIN" --json dev up --nodes 3 --data-dir "$CLUSTER_DIR" --allow-root "$W" --config "$NODE_CONFIG") || die "dev up failed"
ENDPOINT=$(jfields "$run_up" nodes | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["endpoint"])')
# TLS checked against the dev CA; an admin token dev up issued (any tenant).
export BITCLONE_CA BITCLONE_TOKEN_FILE
BITCLONE_CA=$(jfields "$run_up" ca)
BITCLONE_TOKEN_FILE=$(jfields "$run_up" token_file)
say "cluster up; talking to node 1 at $ENDPOINT over TLS (CA $BITCLONE_CA) with the admin token in $BITCLONE_TOKEN_FILE"
cli cluster status

say "generating the sample dataset in $SRC (seeded, deterministic)"
t=$(now)
read -r gen_files gen_bytes < <(dataset generate "$SRC")
say "generated $gen_files files, $(mb "$gen_bytes") MB in $(since "$t") s"

# 1. first put
say "put #1: bitclone put $SRC --dataset $DATASET"
t=$(now)
run put1 --json put "$SRC" --dataset "$DATASET"
wall1=$(since "$t")
{ read -r snap1; read -r files1; read -r bytes1; read -r new1; read -r secs1; } < <(jfields "$OUT" snapshot files bytes new_bytes seconds)
[[ "$secs1" != "-" ]] || secs1="$wall1"
say "put #1: snapshot $snap1, $files1 files, $(mb "$bytes1") MB, stored $(mb "$new1") MB new, ${secs1} s"

# 2. modify a little, put again
say "modifying: append to 5 files, overwrite 1 MiB inside the 64 MiB file, add 2 files, delete 1"
read -r mod_files mod_bytes < <(dataset modify "$SRC")
tree_sums "$SRC" >"$W/sha256-source.txt"
say "source now $mod_files files, $(mb "$mod_bytes") MB"

say "put #2 (incremental)"
t=$(now)
run put2 --json put "$SRC" --dataset "$DATASET"
wall2=$(since "$t")
{ read -r snap2; read -r files2; read -r bytes2; read -r new2; read -r unchanged2; read -r secs2; } < <(jfields "$OUT" snapshot files bytes new_bytes unchanged_files seconds)
[[ "$secs2" != "-" ]] || secs2="$wall2"
say "put #2: snapshot $snap2, $files2 files ($unchanged2 unchanged), $(mb "$bytes2") MB, stored only $(mb "$new2") MB new ($(pct "$new2" "$bytes2"))"
[[ "$snap2" != "$snap1" ]] || die "the second put returned the same snapshot id as the first"
if [[ "$new2" =~ ^[0-9]+$ && "$bytes2" =~ ^[0-9]+$ ]] && ((new2 * 4 > bytes2)); then
    say "WARNING: the incremental put stored more than 25% of the data; dedup is not working as expected"
fi

say "snapshots of dataset $DATASET:"
cli snapshots --dataset "$DATASET" || say "WARNING: 'bitclone snapshots' failed"

# 3. clone the latest snapshot to the sinks
mkdir -p "$EXPORT"
SINKS=(--to "file://$EXPORT?mirror=true")
[[ -z "$CATALOG" ]] || SINKS+=(--to "sink://catalog")
say "clone: bitclone clone --from snapshot://$DATASET ${SINKS[*]} --dataset $DATASET --wait"
t=$(now)
run clone --json clone --from "snapshot://$DATASET" "${SINKS[@]}" --dataset "$DATASET" --wait
wall_clone=$(since "$t")
{ read -r job_id; read -r job_state; read -r job_snap; read -r job_err; read -r job_attempts; } < <(jfields "$OUT" id state snapshot last_error attempts)
say "clone job $job_id: $job_state (snapshot $job_snap, attempts $job_attempts) in $wall_clone s"
[[ "$job_state" == "Succeeded" ]] || die "clone job $job_id ended $job_state: $job_err"

# 4. restore
say "restore: bitclone get --dataset $DATASET $RESTORE"
t=$(now)
run get --json get --dataset "$DATASET" "$RESTORE"
wall_get=$(since "$t")
{ read -r get_snap; read -r get_files; read -r get_bytes; read -r get_secs; } < <(jfields "$OUT" snapshot files bytes seconds)
[[ "$get_secs" != "-" ]] || get_secs="$wall_get"
say "restored snapshot $get_snap: $get_files files, $(mb "$get_bytes") MB in $get_secs s"
if [[ "$get_snap" != "-" && "$snap2" != "-" && "$get_snap" != "$snap2" ]]; then
    die "get without --snapshot restored $get_snap, not the latest snapshot $snap2"
fi

# 5. the operators' drill: restore from the sinks alone, no cluster involved
SINK_RESTORE="$W/restore-from-sinks"
DRILL=(restore --from "file://$EXPORT")
[[ -z "$CATALOG" ]] || DRILL+=(--catalog "$CATALOG")
say "off-cluster restore: bitclone ${DRILL[*]} $SINK_RESTORE"
"$BIN" "${DRILL[@]}" "$SINK_RESTORE" || die "bitclone restore from the sinks failed"
if [[ -n "$CATALOG" ]]; then
    rows=$("$PG_BIN/psql" -X -At "$CATALOG" -c "SELECT count(*) FROM bitclone_entries WHERE snapshot = '$snap2'")
    say "catalog: snapshot $snap2 has $rows entry rows in bitclone_entries"
fi

# 6. verify
verify restore "$RESTORE"
verify export "$EXPORT"
verify restore-from-sinks "$SINK_RESTORE"

say "node stats:"
cli stats || say "WARNING: 'bitclone stats' failed"

say "stopping the cluster (SIGTERM to every node)"
node_status=0
say "cluster status:"
cli cluster status
stop_node || node_status=$?
((node_status == 0)) || die "the node exited with status $node_status on SIGTERM (expected a clean shutdown)"

# ---------------------------------------------------------------- summary
echo
echo "BitClone demo summary (three-node cluster, data under ${W#"$ROOT"/})"
printf '%-14s %7s %10s %12s %9s %9s\n' step files MB "new MB" seconds "MB/s"
printf '%-14s %7s %10s %12s %9s %9s\n' "put #1" "$files1" "$(mb "$bytes1")" "$(mb "$new1")" "$(f2 "$secs1")" "$(mbps "$bytes1" "$secs1")"
printf '%-14s %7s %10s %12s %9s %9s\n' "put #2" "$files2" "$(mb "$bytes2")" "$(mb "$new2") ($(pct "$new2" "$bytes2"))" "$(f2 "$secs2")" "$(mbps "$bytes2" "$secs2")"
printf '%-14s %7s %10s %12s %9s %9s\n' "restore" "$get_files" "$(mb "$get_bytes")" "-" "$(f2 "$get_secs")" "$(mbps "$get_bytes" "$get_secs")"
printf '%-14s %s\n' "clone job" "$job_state in $wall_clone s (attempts $job_attempts) -> file://$EXPORT"
printf '%-14s %s\n' "sinks" "file://$EXPORT (S3 stand-in)${CATALOG:+ and sink://catalog, the Postgres catalog at $CATALOG}"
printf '%-14s %s\n' "verification" "OK: get, export and off-cluster restore byte-identical to the modified source ($mod_files files)"
