#!/usr/bin/env bash
# Side-by-side benchmark: streamfs vs qemu-storage-daemon (qsd) FUSE export vs a plain file.
#
#   scripts/bench.sh [read|cor|write|stream|sched|all]      (default: all)
#
# Environment knobs:
#   BENCH_SIZE_MB (1024)   virtual size of the test chains
#   BENCH_RUNTIME (10)     seconds per time-based fio run
#   BENCH_DEPTH   (32)     depth of the deep chain in the read section
#   BENCH_REPEAT  (3)      runs per target in the cold cor and stream measurements (median shown)
#   BENCH_STREAM_TIMEOUT (300) seconds before a stream job counts as hung
#   BENCH_LAT_TIMEOUT (120) the same for the stream under guest load
#   sched section (streaming next to other guests and processes; see section_sched):
#   BENCH_SCHED_IDLE (5)   seconds of fio alone before each stream starts
#   BENCH_SCHED_RUNS (5)   repeated own-guest (B5) runs
#   BENCH_SCHED_COLD_MB (max(BENCH_SIZE_MB, 1024)) size of the neighbour guest's chain A
#   BENCH_SCHED_CHAINS (50), BENCH_SCHED_SMALL_MB (max(16, BENCH_SIZE_MB/25)),
#   BENCH_SCHED_TOTAL_MB (200), BENCH_SCHED_MAX_JOBS (8)   the many-chains run
#   BENCH_SCHED_SCALE_GB (1024) virtual size of the sparse chain holding BENCH_SIZE_MB of data
#   BENCH_SCHED_TIMEOUT (max(BENCH_STREAM_TIMEOUT, 2 * BENCH_SIZE_MB / 4 + 60)) per stream
#   BENCH_SCHED_PARTS ("b10 b11 b5 fifty scale"), BENCH_SCHED_KEYS ("host disk qsd")  a subset
#   BENCH_NO_WAIT=1        don't wait for running cargo builds before measuring
#   BENCH_DIR     (/var/tmp) where the temp dir goes (must not be tmpfs)
#   BENCH_RESULTS (scripts/bench-results.txt) tables are appended here
#   BENCH_NO_BUILD=1       don't run `cargo build --release` first
#   BENCH_KEEP=1           keep the logs (not the images) of the temp dir
#   STREAMFS      (target/release/streamfs)
# Tables go to stdout (and the results file), progress to stderr.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SECTION=${1:-all}
SIZE_MB=${BENCH_SIZE_MB:-1024}
SIZE=$((SIZE_MB * 1024 * 1024))
RUNTIME=${BENCH_RUNTIME:-10}
DEPTH=${BENCH_DEPTH:-32}
STREAM_TIMEOUT=${BENCH_STREAM_TIMEOUT:-300}
REPEAT=${BENCH_REPEAT:-3}
LAT_TIMEOUT=${BENCH_LAT_TIMEOUT:-120}
SFS=${STREAMFS:-$ROOT/target/release/streamfs}
RESULTS=${BENCH_RESULTS:-$ROOT/scripts/bench-results.txt}
QMP="$ROOT/scripts/qmp.py"

case $SECTION in
read | cor | write | stream | sched | all) ;;
*)
    echo "usage: $0 [read|cor|write|stream|sched|all]" >&2
    exit 2
    ;;
esac
[[ $(id -u) = 0 ]] || { echo "bench.sh: must run as root (drop_caches, FUSE)" >&2; exit 1; }

log() { echo "[bench $(date +%T)] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

for t in qemu-img qemu-io qemu-storage-daemon python3 findmnt; do
    command -v "$t" >/dev/null || die "$t not found"
done
if ! command -v fio >/dev/null; then
    log "installing fio"
    { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fio; } </dev/null >&2 ||
        die "could not install fio"
fi

WORK=$(mktemp -d "${BENCH_DIR:-/var/tmp}/streamfs-bench.XXXXXX")
FSTYPE=$(df --output=fstype "$WORK" | tail -1)
[[ $FSTYPE != tmpfs ]] || die "$WORK is on tmpfs; set BENCH_DIR"

QSD_PIDS=()
MOUNTS=()
BG_PIDS=() # background fio runs
cleanup() {
    set +e
    local p m
    [[ -z $NOISE_PID ]] || kill "$NOISE_PID" 2>/dev/null
    for p in "${BG_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${BG_PIDS[@]}"; do reap "$p" 10; done
    for p in "${QSD_PIDS[@]}"; do kill "$p" 2>/dev/null; done
    for p in "${QSD_PIDS[@]}"; do reap "$p" 10; done
    for m in "${MOUNTS[@]}"; do
        if findmnt -rn --mountpoint "$m" >/dev/null; then
            timeout 30 "$SFS" umount "$m" >/dev/null 2>&1 || umount -l "$m"
        fi
    done
    findmnt -rn -o TARGET | grep -F "$WORK/" | while read -r m; do umount -l "$m"; done
    if [[ ${BENCH_KEEP:-0} = 1 ]]; then
        rm -f "$WORK"/*.qcow2 "$WORK"/*.raw
        log "kept logs in $WORK"
    else
        rm -rf "$WORK"
    fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM HUP

# reap PID SECONDS: wait for a child to exit, SIGKILL after SECONDS
reap() {
    local pid=$1 n=$(($2 * 10)) st
    while ((n-- > 0)); do
        st=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null || echo X)
        [[ $st = X || $st = Z ]] && break
        sleep 0.1
    done
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
}

now() { date +%s.%N; }
secs() { awk -v a="$1" 'BEGIN { printf "%.2f", a }'; }
calc() { awk "BEGIN { printf \"%s\", $* }"; }
# later T S: epoch T plus S seconds, in full (calc's %s would print 1.79617e+09)
later() { awk -v t="$1" -v s="$2" 'BEGIN { printf "%.3f\n", t + s }'; }
# ratio A B [fmt]: A/B, or "-" when either is missing
ratio() {
    [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] || { echo -; return; }
    awk -v a="$1" -v b="$2" -v f="${3:-%.2f}" 'BEGIN { if (b == 0) print "-"; else printf f "\n", a / b }'
}
# pct A B: A as a percentage of B
pct() {
    [[ $1 =~ ^[0-9.]+$ && $2 =~ ^[0-9.]+$ ]] || { echo -; return; }
    ratio "$(calc "$1 * 100")" "$2" "%.0f%%"
}

# median V...: median of numbers ("-" if none); range V...: "min-max"
median() { (($#)) || { echo -; return; }; printf '%s\n' "$@" | sort -g | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
range() { (($# > 1)) || { echo -; return; }; printf '%s\n' "$@" | sort -g | awk 'NR == 1 { a = $1 } { b = $1 } END { print a "-" b }'; }

# record whether a compiler runs while a section measures (the machine has 2 cores)
NOISE_PID=""
noise_start() {
    : >"$WORK/noise"
    (while :; do
        if pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; then echo 1; else echo 0; fi
        sleep 1
    done >>"$WORK/noise") &
    NOISE_PID=$!
}
noise_stop() {
    [[ -n $NOISE_PID ]] || return 0
    kill "$NOISE_PID" 2>/dev/null || true
    wait "$NOISE_PID" 2>/dev/null || true
    NOISE_PID=""
    local busy total
    busy=$(grep -c 1 "$WORK/noise" || true)
    total=$(wc -l <"$WORK/noise")
    ((busy == 0)) || echo "   NOTE: cargo (a build or test run) was running during ${busy} of ${total} s of this section: numbers are noisy"
}

drop_caches() { sync; echo 3 >/proc/sys/vm/drop_caches; }
warm() { cat "$@" >/dev/null; }

# wait until no compiler is running (benchmarks are noisy otherwise)
quiet_machine() {
    local n=0
    [[ ${BENCH_NO_WAIT:-0} != 1 ]] || return 0
    while pgrep -x rustc >/dev/null || pgrep -x cargo >/dev/null; do
        ((n == 0)) && log "waiting for running cargo builds/tests to finish before measuring..."
        ((n++ < 120)) || { log "WARNING: builds still running, measuring anyway"; return; }
        sleep 5
    done
}

# ---------------------------------------------------------------- fio helpers
FIO_COMMON=(--name=b --size="$SIZE" --invalidate=0 --allow_file_create=0 --output-format=json)
# fio_run OUT.json FILE FIO-ARGS...: bounded fio run, json to OUT.json
fio_run() {
    local out=$1 file=$2
    shift 2
    echo "fio --filename=$file ${FIO_COMMON[*]} $*" >>"$WORK/commands.log"
    timeout -k 10 $((RUNTIME * 3 + 180)) fio --filename="$file" "${FIO_COMMON[@]}" --output="$out" "$@" \
        >>"$WORK/fio.log" 2>&1 || { log "fio failed on $file (see fio output below)"; tail -5 "$WORK/fio.log" >&2; return 1; }
}
# fio_get OUT.json read|write mibs|iops|p50|p99|secs
fio_get() {
    python3 - "$@" <<'EOF'
import json, sys
path, ddir, what = sys.argv[1:4]
txt = open(path).read()
j = json.loads(txt[txt.index("{"):])["jobs"][0]
d = j[ddir]
if what == "mibs":
    print("%.0f" % (d["bw_bytes"] / 1048576))
elif what == "iops":
    print("%.0f" % d["iops"])
elif what in ("p50", "p99"):
    key = "50.000000" if what == "p50" else "99.000000"
    print("%.1f" % (d["clat_ns"]["percentile"][key] / 1000))
elif what == "secs":
    print("%.2f" % (d["runtime"] / 1000))
EOF
}
SEQ_READ=(--rw=read --bs=1M --direct=1 --ioengine=psync)
RAND_READ=(--rw=randread --bs=4k --direct=1 --ioengine=libaio --iodepth=16)
SEQ_WRITE=(--rw=write --bs=1M --direct=1 --ioengine=psync)
RAND_WRITE=(--rw=randwrite --bs=4k --direct=1 --ioengine=libaio --iodepth=16)
TIMED=(--runtime="$RUNTIME" --time_based)

# ---------------------------------------------------------------- qsd helpers
# qsd_start ID TOP MODE [iothread] [direct] [qmp]; MODE is ro|rw|cor.
# Sets QSD_PID, QSD_FILE (the exported file), QSD_SOCK.
qsd_start() {
    local id=$1 top=$2 mode=$3
    shift 3
    local fopts="driver=file,node-name=f,filename=$top" node=q writable=off ioexp="" flag n
    local args=()
    for flag in "$@"; do
        case $flag in
        iothread) args+=(--object "iothread,id=io0"); ioexp=",iothread=io0" ;;
        direct) fopts+=",cache.direct=on" ;;
        qmp)
            QSD_SOCK="$WORK/$id.qmp"
            args+=(--chardev "socket,id=qmp,path=$QSD_SOCK,server=on,wait=off" --monitor chardev=qmp)
            ;;
        esac
    done
    args=(--blockdev "$fopts" --blockdev "driver=qcow2,node-name=q,file=f" "${args[@]}")
    case $mode in
    rw) writable=on ;;
    cor)
        args+=(--blockdev "driver=copy-on-read,node-name=cor,file=q")
        node=cor writable=on
        ;;
    esac
    QSD_FILE="$WORK/$id.exp"
    unstale "$QSD_FILE"
    : >"$QSD_FILE"
    args+=(--export "type=fuse,id=e,node-name=$node,mountpoint=$QSD_FILE,writable=$writable$ioexp")
    echo "qemu-storage-daemon ${args[*]}" >>"$WORK/commands.log"
    qemu-storage-daemon "${args[@]}" >"$WORK/$id.qsd.log" 2>&1 &
    QSD_PID=$!
    QSD_PIDS+=("$QSD_PID")
    for ((n = 0; n < 100; n++)); do
        kill -0 "$QSD_PID" 2>/dev/null || break
        findmnt -rn --mountpoint "$QSD_FILE" >/dev/null && return 0
        sleep 0.1
    done
    log "qsd $id did not come up:"
    cat "$WORK/$id.qsd.log" >&2
    return 1
}
# unstale FILE: lazily unmount a dead FUSE export left on FILE (a qsd that exited without
# unmounting leaves ENOTCONN there, and findmnt would take it for a live export)
unstale() {
    if findmnt -rn --mountpoint "$1" >/dev/null; then
        log "WARNING: $1 was still mounted (a previous qsd left it); umount -l"
        umount -l "$1" 2>/dev/null || true
    fi
}
# qsd_diag: where the threads of a stuck qsd wait (for the report)
qsd_diag() {
    local t
    log "qsd $QSD_PID looks stuck; its threads (comm wchan):"
    for t in /proc/"$QSD_PID"/task/*; do
        echo "    $(cat "$t/comm" 2>/dev/null) $(cat "$t/wchan" 2>/dev/null)" >&2
    done
}
qsd_stop() {
    kill "$QSD_PID" 2>/dev/null || true
    reap "$QSD_PID" 60
    QSD_LEFT=$(findmnt -rn -o TARGET | grep -F "$WORK/" | grep '\.exp$' || true)
    [[ -z $QSD_LEFT ]] || log "WARNING: qsd $QSD_PID exited leaving its export mounted: $QSD_LEFT"
}

# ---------------------------------------------------------------- streamfs helpers
SFS_STATE=unknown # unknown|ok|broken
SFS_WHY=""
build_streamfs() {
    if [[ ${BENCH_NO_BUILD:-0} != 1 ]]; then
        log "cargo build --release"
        (cd "$ROOT" && cargo build --release >&2) || log "WARNING: cargo build --release failed"
    fi
    [[ -x $SFS ]] || { SFS_STATE=broken; SFS_WHY="no binary $SFS"; }
}
# sfs_mount MNT NAME IMAGE [mount options...]; more chains: SFS_MORE=(NAME=IMAGE ...)
SFS_MORE=()
sfs_mount() {
    local mnt=$1 name=$2 img=$3
    shift 3
    [[ $SFS_STATE != broken ]] || return 1
    mkdir -p "$mnt"
    MOUNTS+=("$mnt")
    echo "$SFS mount --log-file $mnt.log $* $mnt $name=$img ${SFS_MORE[*]}" >>"$WORK/commands.log"
    if ! timeout -k 5 60 "$SFS" mount --log-file "$mnt.log" "$@" "$mnt" "$name=$img" "${SFS_MORE[@]}" >"$mnt.out" 2>&1 ||
        [[ ! -e $mnt/$name ]]; then
        SFS_WHY="mount failed: $(tail -c 300 "$mnt.out" | tr '\n' ' ')"
        log "streamfs $SFS_WHY"
        [[ -f $mnt.log ]] && tail -5 "$mnt.log" >&2
        findmnt -rn --mountpoint "$mnt" >/dev/null && umount -l "$mnt"
        SFS_STATE=broken
        return 1
    fi
    SFS_STATE=ok
}
sfs_umount() {
    local mnt=$1
    if ! timeout -k 5 120 "$SFS" umount "$mnt" >>"$mnt.out" 2>&1; then
        log "streamfs umount $mnt failed; lazy unmount"
        umount -l "$mnt" 2>/dev/null || true
        return 1
    fi
}
# sfs_state MNT NAME: the state= field of NAME's line in MNT/.control
sfs_state() {
    awk -v n="$2" '$1 == n { for (i = 2; i <= NF; i++) if ($i ~ /^state=/) { sub(/^state=/, "", $i); print $i } }' \
        "$1/.control" 2>/dev/null || true
}
# sfs_stream MNT NAME: start a whole-chain stream via .control and poll until it ends.
# Sets STREAM_T0/STREAM_T1 (epoch seconds). Fails unless state=completed.
sfs_stream() {
    local mnt=$1 name=$2 st="" n
    STREAM_T0=$(now)
    echo "start $name" >"$mnt/.control" || return 1
    for ((n = 0; n < STREAM_TIMEOUT * 20; n++)); do
        st=$(sfs_state "$mnt" "$name")
        [[ $st = completed || $st = failed || $st = cancelled ]] && break
        sleep 0.05
    done
    STREAM_T1=$(now)
    cat "$mnt/.control" >>"$mnt.out" 2>&1 || true
    [[ $st = completed ]] || { log "streamfs stream ended in state '$st'"; cat "$mnt/.control" >&2 || true; return 1; }
}

# ---------------------------------------------------------------- images
new_leaf() { qemu-img create -q -f qcow2 -b "$2" -F qcow2 "$1"; }
# MiB allocated in the image itself (not its backing files)
leaf_mib() {
    qemu-img map --output=json "$1" | python3 -c '
import json, sys
print("%.0f" % (sum(e["length"] for e in json.load(sys.stdin) if e["depth"] == 0 and e["data"]) / 1048576))'
}
has_backing() { qemu-img info --output=json "$1" | grep -q '"backing-filename"'; }

prep_base() {
    [[ -f $WORK/base.qcow2 ]] && return
    log "making ${SIZE_MB} MiB random base: base.raw and base.qcow2"
    dd if=/dev/urandom of="$WORK/base.raw" bs=1M count="$SIZE_MB" status=none
    qemu-img convert -f raw -O qcow2 "$WORK/base.raw" "$WORK/base.qcow2"
    sync
}

# ---------------------------------------------------------------- output
TABLE=""
out() { TABLE+="$*"$'\n'; }
flush_table() {
    printf '%s\n' "$TABLE"
    printf '%s\n' "$TABLE" >>"$RESULTS"
    TABLE=""
}
row() { printf '%-34s' "$1"; shift; printf ' %12s' "$@"; printf '\n'; }

header() {
    local h
    h="### $(date -u '+%F %T UTC') streamfs $(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo ?)"
    h+=" | $(uname -r) | $(nproc) cpus | $(fio --version) | $(qemu-img --version | head -1 | awk '{print $3}')"
    h+=" | work dir $WORK on $FSTYPE ($(df --output=source "$WORK" | tail -1))"
    h+=" | fuse max_pages_limit $(cat /proc/sys/fs/fuse/max_pages_limit 2>/dev/null || echo ?)"
    h+=" | size ${SIZE_MB} MiB, runtime ${RUNTIME}s"
    echo "$h" | tee -a "$RESULTS"
}

# ================================================================ read
section_read() {
    prep_base
    local w=$WORK i j
    log "read: full leaf over an empty base; depth-$DEPTH chain"
    cp "$w/base.qcow2" "$w/full.qcow2"
    qemu-img create -q -f qcow2 "$w/empty.qcow2" "${SIZE_MB}M"
    qemu-img rebase -u -f qcow2 -F qcow2 -b empty.qcow2 "$w/full.qcow2"

    # deep chain: chunk j (SIZE/1024 bytes each) lives in layer j % DEPTH
    local chunk=$((SIZE / 1024)) prev="" cmds
    for ((i = 0; i < DEPTH; i++)); do
        if [[ -z $prev ]]; then
            qemu-img create -q -f qcow2 "$w/d$i.qcow2" "${SIZE_MB}M"
        else
            qemu-img create -q -f qcow2 -b "$prev" -F qcow2 "$w/d$i.qcow2"
        fi
        cmds=()
        for ((j = i; j < 1024; j += DEPTH)); do
            cmds+=(-c "write -q -P $((j % 251 + 1)) $((j * chunk)) $chunk")
        done
        qemu-io -f qcow2 "${cmds[@]}" "$w/d$i.qcow2" >/dev/null
        prev="d$i.qcow2"
    done
    local deep="$w/d$((DEPTH - 1)).qcow2"
    qemu-img convert -O raw "$deep" "$w/deep.raw"
    qemu-img convert -O qcow2 "$w/deep.raw" "$w/flat.qcow2"
    warm "$w"/*.qcow2 "$w/base.raw"
    quiet_machine
    noise_start

    local o="$w/fio.json"
    # measure LABEL FILE -> sets R_SEQ R_RAND
    measure() {
        R_SEQ=- R_RAND=-
        fio_run "$o" "$2" "${SEQ_READ[@]}" "${TIMED[@]}" && R_SEQ=$(fio_get "$o" read mibs)
        fio_run "$o" "$2" "${RAND_READ[@]}" "${TIMED[@]}" && R_RAND=$(fio_get "$o" read iops)
        log "  $1: seq ${R_SEQ} MiB/s, rand ${R_RAND} IOPS"
    }
    declare -A S R
    log "read: raw file (ceiling)"
    measure "raw O_DIRECT" "$w/base.raw"
    S[raw]=$R_SEQ R[raw]=$R_RAND
    log "read: raw file, page cache (fio --direct=0)"
    R_SEQ=- R_RAND=-
    fio_run "$o" "$w/base.raw" --rw=read --bs=1M --direct=0 --ioengine=psync "${TIMED[@]}" && R_SEQ=$(fio_get "$o" read mibs)
    fio_run "$o" "$w/base.raw" --rw=randread --bs=4k --direct=0 --ioengine=psync "${TIMED[@]}" && R_RAND=$(fio_get "$o" read iops)
    S[rawpc]=$R_SEQ R[rawpc]=$R_RAND

    local v
    for v in plain iothread; do
        log "read: qsd ($v)"
        S[qsd_$v]=- R[qsd_$v]=-
        local fl=()
        [[ $v = iothread ]] && fl=(iothread)
        if qsd_start "qsd-$v" "$w/full.qcow2" ro "${fl[@]}"; then
            cmp "$QSD_FILE" "$w/base.raw" || log "WARNING: qsd export differs from base.raw"
            measure "qsd $v" "$QSD_FILE"
            S[qsd_$v]=$R_SEQ R[qsd_$v]=$R_RAND
            qsd_stop
        fi
    done

    log "read: streamfs --read-only"
    S[sfs]=- R[sfs]=-
    local sfs_note=""
    if sfs_mount "$w/m-read" vm.raw "$w/full.qcow2" --read-only; then
        cmp "$w/m-read/vm.raw" "$w/base.raw" >&2 || sfs_note=" (DATA MISMATCH)"
        measure "streamfs" "$w/m-read/vm.raw"
        S[sfs]=$R_SEQ R[sfs]=$R_RAND
        sfs_umount "$w/m-read" || true
    fi

    out "== read: ${SIZE_MB} MiB chain (fully populated leaf over empty base), images warm in page cache =="
    out "   seq: fio ${SEQ_READ[*]} ${TIMED[*]}; rand: fio ${RAND_READ[*]} ${TIMED[*]}"
    out "   ceiling: the raw file read through the page cache (same jobs with --direct=0, rand with psync);"
    out "   the daemons read warm qcow2 files from the page cache too; O_DIRECT on the raw file measures the disk"
    out "$(row target 'seq MiB/s' 'x qsd' '% ceiling' 'rand IOPS' 'x qsd' '% ceiling')"
    local k label
    for k in rawpc raw qsd_plain qsd_iothread sfs; do
        case $k in
        raw) label="raw file O_DIRECT (disk)" ;;
        rawpc) label="raw file page cache (ceiling)" ;;
        qsd_plain) label="qsd fuse export" ;;
        qsd_iothread) label="qsd fuse export + iothread" ;;
        sfs) label="streamfs --read-only${sfs_note}" ;;
        esac
        out "$(row "$label" "${S[$k]}" "$(ratio "${S[$k]}" "${S[qsd_plain]}")" "$(pct "${S[$k]}" "${S[rawpc]}")" \
            "${R[$k]}" "$(ratio "${R[$k]}" "${R[qsd_plain]}")" "$(pct "${R[$k]}" "${R[rawpc]}")")"
    done
    [[ ${S[sfs]} = - ]] && out "   streamfs: n/a ($SFS_WHY)"

    # depth-N vs depth-1, same data
    log "read: depth-$DEPTH vs depth-1"
    declare -A DS DR
    local kind img
    for kind in flat deep; do
        img="$w/flat.qcow2"
        [[ $kind = deep ]] && img=$deep
        DS[qsd_$kind]=- DR[qsd_$kind]=- DS[sfs_$kind]=- DR[sfs_$kind]=-
        if qsd_start "qsd-$kind" "$img" ro; then
            measure "qsd $kind" "$QSD_FILE"
            DS[qsd_$kind]=$R_SEQ DR[qsd_$kind]=$R_RAND
            qsd_stop
        fi
        if sfs_mount "$w/m-$kind" vm.raw "$img" --read-only; then
            cmp "$w/m-$kind/vm.raw" "$w/deep.raw" >&2 || log "WARNING: streamfs $kind data differs from reference"
            measure "streamfs $kind" "$w/m-$kind/vm.raw"
            DS[sfs_$kind]=$R_SEQ DR[sfs_$kind]=$R_RAND
            sfs_umount "$w/m-$kind" || true
        fi
    done
    out "== read: depth-$DEPTH chain (1/1024 of the disk per chunk, chunk j in layer j%$DEPTH) vs depth-1 (same data) =="
    out "$(row target 'seq MiB/s' 'x depth-1' 'x qsd' 'rand IOPS' 'x depth-1' 'x qsd')"
    for k in qsd sfs; do
        label="qsd fuse export"
        [[ $k = sfs ]] && label="streamfs --read-only"
        out "$(row "$label depth-1" "${DS[${k}_flat]}" 1.00 "$(ratio "${DS[${k}_flat]}" "${DS[qsd_flat]}")" \
            "${DR[${k}_flat]}" 1.00 "$(ratio "${DR[${k}_flat]}" "${DR[qsd_flat]}")")"
        out "$(row "$label depth-$DEPTH" "${DS[${k}_deep]}" "$(ratio "${DS[${k}_deep]}" "${DS[${k}_flat]}")" \
            "$(ratio "${DS[${k}_deep]}" "${DS[qsd_deep]}")" "${DR[${k}_deep]}" \
            "$(ratio "${DR[${k}_deep]}" "${DR[${k}_flat]}")" "$(ratio "${DR[${k}_deep]}" "${DR[qsd_deep]}")")"
    done
    local NOTE
    NOTE=$(noise_stop)
    [[ -z $NOTE ]] || out "$NOTE"
    flush_table
    rm -f "$w"/d[0-9]*.qcow2 "$w/deep.raw" "$w/flat.qcow2" "$w/full.qcow2" "$w/empty.qcow2"
}

# ================================================================ cor
section_cor() {
    prep_base
    local w=$WORK o="$WORK/fio.json"
    declare -A MB SEC DUR LEAF
    local k t0 t1 t2 ok rep F
    local once=(--rw=read --bs=1M --direct=1 --ioengine=psync --runtime=300)
    local keys=(sfs qsd qsd_direct raw cp)
    for k in "${keys[@]}"; do MB[$k]="" SEC[$k]="" DUR[$k]="" LEAF[$k]=-; done
    quiet_machine
    noise_start
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for k in "${keys[@]}"; do
            log "cor: $k (run $rep/$REPEAT)"
            if [[ $k = cp ]]; then
                drop_caches
                t0=$(now)
                cp "$w/base.qcow2" "$w/copy.qcow2"
                sync
                t1=$(now)
                rm -f "$w/copy.qcow2"
                DUR[cp]+=" $(secs "$(calc "$t1 - $t0")")"
                MB[cp]+=" $(calc "sprintf(\"%.0f\", $SIZE_MB / ($t1 - $t0))")"
                continue
            fi
            if [[ $k = raw ]]; then
                drop_caches
                fio_run "$o" "$w/base.raw" "${once[@]}" &&
                    MB[raw]+=" $(fio_get "$o" read mibs)" SEC[raw]+=" $(fio_get "$o" read secs)"
                continue
            fi
            rm -f "$w/leaf.qcow2"
            new_leaf "$w/leaf.qcow2" base.qcow2
            ok=0
            case $k in
            sfs) sfs_mount "$w/m-cor" vm.raw "$w/leaf.qcow2" && F="$w/m-cor/vm.raw" && ok=1 ;;
            qsd) qsd_start qsd-cor "$w/leaf.qcow2" cor && F=$QSD_FILE && ok=1 ;;
            qsd_direct) qsd_start qsd-cor-direct "$w/leaf.qcow2" cor direct && F=$QSD_FILE && ok=1 ;;
            esac
            ((ok)) || continue
            drop_caches
            t0=$(now)
            local good=0
            if fio_run "$o" "$F" "${once[@]}"; then
                t1=$(now)
                good=1
                MB[$k]+=" $(fio_get "$o" read mibs)"
                SEC[$k]+=" $(secs "$(calc "$t1 - $t0")")"
            fi
            if [[ $k = sfs ]]; then sfs_umount "$w/m-cor" || true; else qsd_stop; fi
            sync
            t2=$(now)
            ((good)) && DUR[$k]+=" $(secs "$(calc "$t2 - $t0")")"
            LEAF[$k]=$(leaf_mib "$w/leaf.qcow2")
            log "  $k: MiB/s${MB[$k]}; durable s${DUR[$k]}; leaf ${LEAF[$k]} MiB"
        done
    done
    rm -f "$w/leaf.qcow2"
    local NOTE
    NOTE=$(noise_stop)

    out "== cor: cold sequential read of a ${SIZE_MB} MiB chain (all data in base, empty leaf), caches dropped =="
    out "   fio ${once[*]} (one pass); durable = read + unmount/stop + sync; median of $REPEAT runs (min-max)"
    out "$(row target 'MiB/s' 'range' 'x qsd' '% floor' 'read s' 'durable s' 'leaf MiB')"
    local label m
    declare -A MED
    # shellcheck disable=SC2086
    for k in "${keys[@]}"; do MED[$k]=$(median ${MB[$k]}); done
    for k in "${keys[@]}"; do
        case $k in
        sfs) label="streamfs (copy-on-read)" ;;
        qsd) label="qsd copy-on-read filter" ;;
        qsd_direct) label="qsd copy-on-read, cache.direct=on" ;;
        raw) label="raw file O_DIRECT read (no copy)" ;;
        cp) label="cp base + sync (floor)" ;;
        esac
        m=${MED[$k]}
        # shellcheck disable=SC2086
        out "$(row "$label" "$m" "$(range ${MB[$k]})" "$(ratio "$m" "${MED[qsd]}")" "$(pct "$m" "${MED[cp]}")" \
            "$(median ${SEC[$k]})" "$(median ${DUR[$k]})" "${LEAF[$k]}")"
    done
    [[ ${MED[sfs]} = - ]] && out "   streamfs: n/a ($SFS_WHY)"
    [[ -z $NOTE ]] || out "$NOTE"
    flush_table
}

# ================================================================ write
section_write() {
    prep_base
    local w=$WORK o="$WORK/fio.json" k ok F
    declare -A SW RW
    local once=(--runtime=300)
    log "write: scratch raw copy"
    cp "$w/base.raw" "$w/scratch.raw"
    sync
    quiet_machine
    noise_start
    for k in raw qsd qsd_iothread sfs; do
        SW[$k]=- RW[$k]=-
        local pass
        for pass in seq rand; do
            rm -f "$w/leaf.qcow2"
            new_leaf "$w/leaf.qcow2" base.qcow2
            ok=0
            case $k in
            raw) F="$w/scratch.raw" ok=1 ;;
            qsd) qsd_start qsd-w "$w/leaf.qcow2" rw && F=$QSD_FILE && ok=1 ;;
            qsd_iothread) qsd_start qsd-wio "$w/leaf.qcow2" rw iothread && F=$QSD_FILE && ok=1 ;;
            sfs) sfs_mount "$w/m-w" vm.raw "$w/leaf.qcow2" && F="$w/m-w/vm.raw" && ok=1 ;;
            esac
            ((ok)) || break
            log "write: $k $pass"
            if [[ $pass = seq ]]; then
                fio_run "$o" "$F" "${SEQ_WRITE[@]}" "${once[@]}" && SW[$k]=$(fio_get "$o" write mibs)
            else
                fio_run "$o" "$F" "${RAND_WRITE[@]}" "${TIMED[@]}" && RW[$k]=$(fio_get "$o" write iops)
            fi
            case $k in
            raw) ;;
            sfs) sfs_umount "$w/m-w" || true ;;
            *) qsd_stop ;;
            esac
        done
        log "  $k: seq ${SW[$k]} MiB/s, rand ${RW[$k]} IOPS"
    done
    rm -f "$w/scratch.raw" "$w/leaf.qcow2"
    out "== write: O_DIRECT writes into a fresh empty leaf over a ${SIZE_MB} MiB base (raw: preallocated file) =="
    out "   seq: fio ${SEQ_WRITE[*]} (one pass); rand: fio ${RAND_WRITE[*]} ${TIMED[*]}"
    out "$(row target 'seq MiB/s' 'x qsd' '% ceiling' 'rand IOPS' 'x qsd' '% ceiling')"
    local label
    for k in raw qsd qsd_iothread sfs; do
        case $k in
        raw) label="raw file O_DIRECT (ceiling)" ;;
        qsd) label="qsd fuse export writable" ;;
        qsd_iothread) label="qsd writable + iothread" ;;
        sfs) label="streamfs" ;;
        esac
        out "$(row "$label" "${SW[$k]}" "$(ratio "${SW[$k]}" "${SW[qsd]}")" "$(pct "${SW[$k]}" "${SW[raw]}")" \
            "${RW[$k]}" "$(ratio "${RW[$k]}" "${RW[qsd]}")" "$(pct "${RW[$k]}" "${RW[raw]}")")"
    done
    [[ ${SW[sfs]} = - ]] && out "   streamfs: n/a ($SFS_WHY)"
    local NOTE
    NOTE=$(noise_stop)
    [[ -z $NOTE ]] || out "$NOTE"
    flush_table
}

# ================================================================ stream
# lat_window LOG FROM TO: "p50 p99 count" (µs) of completions in [FROM, TO) epoch seconds
lat_window() {
    python3 - "$@" <<'EOF'
import sys
path, lo, hi = sys.argv[1], float(sys.argv[2]) * 1000, float(sys.argv[3]) * 1000
v = sorted(int(l.split(",")[1]) for l in open(path) if lo <= int(l.split(",")[0]) < hi)
if not v:
    print("- - 0")
else:
    q = lambda p: v[min(len(v) - 1, int(p * len(v)))] / 1000
    print("%.1f %.1f %d" % (q(0.50), q(0.99), len(v)))
EOF
}

section_stream() {
    prep_base
    local w=$WORK k t0 t1
    declare -A ST OK
    local rep t
    quiet_machine
    noise_start
    # 1) stream time, no guest I/O, caches dropped; REPEAT rounds, median
    for k in sfs qsd cp; do ST[$k]="" OK[$k]=-; done
    for ((rep = 1; rep <= REPEAT; rep++)); do
        for k in sfs qsd cp; do
            log "stream: $k (run $rep/$REPEAT)"
            t=-
            rm -f "$w/leaf.qcow2"
            new_leaf "$w/leaf.qcow2" base.qcow2
            if [[ $k = cp ]]; then
                drop_caches
                t0=$(now)
                cp "$w/base.qcow2" "$w/copy.qcow2"
                sync
                t1=$(now)
                rm -f "$w/copy.qcow2"
                ST[cp]+=" $(secs "$(calc "$t1 - $t0")")"
                continue
            elif [[ $k = sfs ]]; then
                sfs_mount "$w/m-s" vm.raw "$w/leaf.qcow2" || continue
                drop_caches
                sfs_stream "$w/m-s" vm.raw && t=$(secs "$(calc "$STREAM_T1 - $STREAM_T0")")
                sfs_umount "$w/m-s" || true
            else
                qsd_start qsd-s "$w/leaf.qcow2" ro qmp || continue
                drop_caches
                local r
                if r=$(timeout -k 5 $((STREAM_TIMEOUT + 10)) "$QMP" "$QSD_SOCK" stream q --timeout "$STREAM_TIMEOUT"); then
                    t=$(secs "${r##*elapsed=}")
                fi
                qsd_stop
            fi
            if [[ $t != - ]]; then
                ST[$k]+=" $t"
                if has_backing "$w/leaf.qcow2"; then OK[$k]="BACKING-LEFT"; else OK[$k]=no-backing; fi
                qemu-img check -q "$w/leaf.qcow2" || OK[$k]+=",CHECK-FAILED"
                OK[$k]+=",$(leaf_mib "$w/leaf.qcow2")MiB"
            else
                OK[$k]=FAILED
            fi
            log "  $k: ${t} s (${OK[$k]})"
        done
    done
    rm -f "$w/leaf.qcow2"
    declare -A RANGE
    for k in sfs qsd cp; do
        # shellcheck disable=SC2086
        RANGE[$k]=$(range ${ST[$k]})
        # shellcheck disable=SC2086
        ST[$k]=$(median ${ST[$k]})
    done

    # 2) guest 4k random read latency, idle then during an unthrottled stream
    local idle=5
    declare -A LAT
    local lat=(--rw=randread --bs=4k --direct=1 --ioengine=psync --iodepth=1 --runtime=900 --time_based
        --log_avg_msec=0 --log_unix_epoch=1)
    for k in sfs qsd; do
        LAT[$k]="- - 0 - - 0 -"
        rm -f "$w/leaf.qcow2" "$w"/lat_*.log
        new_leaf "$w/leaf.qcow2" base.qcow2
        local F
        if [[ $k = sfs ]]; then
            sfs_mount "$w/m-l" vm.raw "$w/leaf.qcow2" --no-copy-on-read || continue
            F="$w/m-l/vm.raw"
        else
            qsd_start qsd-l "$w/leaf.qcow2" ro qmp || continue
            F=$QSD_FILE
        fi
        log "stream latency: $k (${idle}s idle, then during stream)"
        drop_caches
        local fpid fstart ok=0 s0="" s1="" how=failed
        fstart=$(now)
        echo "fio --filename=$F ${FIO_COMMON[*]} ${lat[*]} --write_lat_log=$w/lat" >>"$WORK/commands.log"
        fio --filename="$F" "${FIO_COMMON[@]}" --output="$w/lat.json" "${lat[@]}" --write_lat_log="$w/lat" \
            >>"$WORK/fio.log" 2>&1 &
        fpid=$!
        sleep "$idle"
        s0=$(now)
        if [[ $k = sfs ]]; then
            STREAM_TIMEOUT=$LAT_TIMEOUT sfs_stream "$w/m-l" vm.raw && ok=1 && s0=$STREAM_T0 s1=$STREAM_T1
        else
            local r
            if r=$(timeout -k 5 $((LAT_TIMEOUT + 10)) "$QMP" "$QSD_SOCK" stream q --timeout "$LAT_TIMEOUT"); then
                ok=1
                s0=${r#start=} s0=${s0%% *}
                s1=${r#*end=} s1=${s1%% *}
            fi
        fi
        sleep 0.5
        [[ $k = sfs ]] || ((ok)) || log "fio state: $(cat "/proc/$fpid/wchan" 2>/dev/null) $(awk '{print $3}' "/proc/$fpid/stat" 2>/dev/null)"
        kill -INT "$fpid" 2>/dev/null || true
        reap "$fpid" 30
        if [[ $k = sfs ]]; then sfs_umount "$w/m-l" || true; else qsd_stop; fi
        if ((!ok)); then
            s1=$(now)
            (($(calc "($s1 - $s0 >= $LAT_TIMEOUT - 1)"))) && how=timeout
            [[ $k = qsd ]] && qsd_diag
            LAT[$k]="- - 0 - - 0 $how"
        fi
        if [[ -f $w/lat_clat.1.log ]]; then
            # skip the first second (cold start) of the idle window
            LAT[$k]="$(lat_window "$w/lat_clat.1.log" "$(later "$fstart" 1)" "$s0") $(lat_window "$w/lat_clat.1.log" "$s0" "$s1")"
            if ((ok)); then LAT[$k]+=" $(secs "$(calc "$s1 - $s0")")"; else LAT[$k]+=" $how"; fi
        fi
        log "  $k: idle p50 p99 n / during p50 p99 n / stream s = ${LAT[$k]}"
    done
    rm -f "$w/leaf.qcow2" "$w"/lat_*.log

    out "== stream: full stream of a ${SIZE_MB} MiB chain (all data in base, empty leaf), caches dropped first =="
    out "   median of $REPEAT runs (min-max); streamfs: echo start > .control, poll until state=completed; qsd: QMP block-stream until BLOCK_JOB_COMPLETED"
    out "$(row target 'seconds' 'range' 'MiB/s' 'x qsd time' '% floor' 'leaf after')"
    local label
    for k in sfs qsd cp; do
        case $k in
        sfs) label="streamfs start (.control)" ;;
        qsd) label="qsd block-stream (QMP)" ;;
        cp) label="cp base + sync (floor)" ;;
        esac
        local mbs=-
        [[ ${ST[$k]} = - ]] || mbs=$(calc "sprintf(\"%.0f\", $SIZE_MB / ${ST[$k]})")
        out "$(row "$label" "${ST[$k]}" "${RANGE[$k]}" "$mbs" "$(ratio "${ST[$k]}" "${ST[qsd]}")" "$(pct "${ST[cp]}" "${ST[$k]}")" "${OK[$k]}")"
    done
    [[ ${ST[sfs]} = - ]] && out "   streamfs: n/a ($SFS_WHY)"
    out "== stream: guest latency, fio ${lat[*]:0:5} (us); ${idle}s idle then during an unthrottled stream =="
    out "   streamfs mounted --no-copy-on-read, qsd export read-only (neither copies on read)"
    out "$(row target 'idle p50' 'idle p99' 'during p50' 'during p99' 'p50 x idle' 'p99 x idle' 'stream s')"
    for k in sfs qsd; do
        local a
        read -r -a a <<<"${LAT[$k]}"
        label="qsd block-stream"
        [[ $k = sfs ]] && label="streamfs"
        out "$(row "$label" "${a[0]}" "${a[1]}" "${a[3]}" "${a[4]}" "$(ratio "${a[3]}" "${a[0]}")" \
            "$(ratio "${a[4]}" "${a[1]}")" "${a[6]}")"
    done
    local NOTE
    NOTE=$(noise_stop)
    [[ -z $NOTE ]] || out "$NOTE"
    flush_table
}

# ================================================================ sched
# Streaming as a neighbour: the idle policies (--idle=host, the default, and --idle=disk,
# the behaviour before the scheduler) next to qsd's block-stream in the same situations.
SCHED_PY="$ROOT/scripts/bench-sched.py"
SCHED_IDLE=${BENCH_SCHED_IDLE:-5}
SCHED_RUNS=${BENCH_SCHED_RUNS:-5}
SCHED_MIN_MB=4 # streamfs's default --min-speed
SCHED_TIMEOUT=${BENCH_SCHED_TIMEOUT:-$((2 * SIZE_MB / SCHED_MIN_MB + 60 > STREAM_TIMEOUT ? 2 * SIZE_MB / SCHED_MIN_MB + 60 : STREAM_TIMEOUT))}
SCHED_LAT=(--rw=randread --bs=4k --direct=1 --ioengine=psync --iodepth=1 --runtime=3600 --time_based
    --log_avg_msec=0 --log_unix_epoch=1)

sfs_pid() { python3 "$SCHED_PY" pid "$1" 2>/dev/null || echo -; }
# read_bytes PID: bytes PID made the storage layer fetch (page cache hits don't count)
read_bytes() { awk '$1 == "read_bytes:" { print $2 }' "/proc/$1/io" 2>/dev/null || echo -; }
vm_hwm_mib() { awk '$1 == "VmHWM:" { printf "%.0f\n", $2 / 1024 }' "/proc/$1/status" 2>/dev/null || echo -; }

# qsd_pair ID TOP_A TOP_B: one qsd, chains A and B (nodes qa, qb), two read-only FUSE exports
# and a QMP socket. Sets QSD_PID, QSD_FILE_A, QSD_FILE_B, QSD_SOCK.
qsd_pair() {
    local id=$1 n
    QSD_SOCK="$WORK/$id.qmp" QSD_FILE_A="$WORK/$id.a.exp" QSD_FILE_B="$WORK/$id.b.exp"
    unstale "$QSD_FILE_A"
    unstale "$QSD_FILE_B"
    : >"$QSD_FILE_A"
    : >"$QSD_FILE_B"
    local args=(--blockdev "driver=file,node-name=fa,filename=$2" --blockdev "driver=qcow2,node-name=qa,file=fa"
        --blockdev "driver=file,node-name=fb,filename=$3" --blockdev "driver=qcow2,node-name=qb,file=fb"
        --chardev "socket,id=qmp,path=$QSD_SOCK,server=on,wait=off" --monitor chardev=qmp
        --export "type=fuse,id=ea,node-name=qa,mountpoint=$QSD_FILE_A,writable=off"
        --export "type=fuse,id=eb,node-name=qb,mountpoint=$QSD_FILE_B,writable=off")
    echo "qemu-storage-daemon ${args[*]}" >>"$WORK/commands.log"
    qemu-storage-daemon "${args[@]}" >"$WORK/$id.qsd.log" 2>&1 &
    QSD_PID=$!
    QSD_PIDS+=("$QSD_PID")
    for ((n = 0; n < 100; n++)); do
        kill -0 "$QSD_PID" 2>/dev/null || break
        findmnt -rn --mountpoint "$QSD_FILE_A" >/dev/null && findmnt -rn --mountpoint "$QSD_FILE_B" >/dev/null && return 0
        sleep 0.1
    done
    log "qsd $id did not come up:"
    cat "$WORK/$id.qsd.log" >&2
    return 1
}

# sched_stream sfs MNT NAME | qsd SOCK NODE | cp SRC DST: one bounded whole-chain stream (cp: cp + fsync).
# Sets SS_T0 SS_T1 (epoch s) and returns 0 on success; SS_HOW=failed|timeout otherwise.
sched_stream() {
    local kind=$1 r
    SS_T0=$(now) SS_T1="" SS_HOW=failed
    case $kind in
    sfs)
        if STREAM_TIMEOUT=$SCHED_TIMEOUT sfs_stream "$2" "$3"; then
            SS_T0=$STREAM_T0 SS_T1=$STREAM_T1
            return 0
        fi
        ;;
    qsd)
        if r=$(timeout -k 5 $((SCHED_TIMEOUT + 10)) "$QMP" "$2" stream "$3" --timeout "$SCHED_TIMEOUT"); then
            SS_T0=${r#start=} SS_T0=${SS_T0%% *}
            SS_T1=${r#*end=} SS_T1=${SS_T1%% *}
            return 0
        fi
        qsd_diag
        ;;
    cp)
        echo "cp $2 $3 && sync $3" >>"$WORK/commands.log"
        if timeout -k 5 "$SCHED_TIMEOUT" cp "$2" "$3" && timeout -k 5 "$SCHED_TIMEOUT" sync "$3"; then
            SS_T1=$(now)
            rm -f "$3"
            return 0
        fi
        rm -f "$3"
        ;;
    esac
    SS_T1=$(now)
    (($(calc "($SS_T1 - $SS_T0 >= $SCHED_TIMEOUT - 1)"))) && SS_HOW=timeout
    return 1
}

# sched_lat FILE SIZE WARM PID STREAM-ARGS...: fio 4k random reads (QD1, O_DIRECT) on FILE
# (SIZE bytes), SCHED_IDLE s alone, then during `sched_stream STREAM-ARGS` (bounded).
# WARM: a file to read into the page cache after dropping caches, or - (caches dropped
# right before fio starts). PID: the process serving FILE, for its storage reads over the
# idle window (- for none). Sets LATR to
#   "idle_p50 idle_p99 idle_n during_p50 during_p99 during_n stream_s|failed|timeout kib_per_read"
sched_lat() {
    local file=$1 fsize=$2 warmf=$3 pid=$4 w=$WORK fpid fstart s0 io0=- io1=- n_all kib=-
    shift 4
    rm -f "$w"/slat_*.log "$w/slat.json"
    drop_caches
    [[ $warmf = - ]] || warm "$warmf"
    echo "fio --filename=$file ${FIO_COMMON[*]} --size=$fsize ${SCHED_LAT[*]} --write_lat_log=$w/slat" >>"$WORK/commands.log"
    fstart=$(now)
    [[ $pid = - ]] || io0=$(read_bytes "$pid")
    timeout -k 5 $((SCHED_TIMEOUT + SCHED_IDLE + 120)) fio --filename="$file" "${FIO_COMMON[@]}" --size="$fsize" \
        --output="$w/slat.json" "${SCHED_LAT[@]}" --write_lat_log="$w/slat" >>"$WORK/fio.log" 2>&1 &
    fpid=$!
    BG_PIDS+=("$fpid")
    sleep "$SCHED_IDLE"
    [[ $pid = - ]] || io1=$(read_bytes "$pid")
    s0=$(now)
    local res=ok
    sched_stream "$@" || res=$SS_HOW
    sleep 0.5
    kill -INT "$fpid" 2>/dev/null || true
    reap "$fpid" 30
    if [[ ! -f $w/slat_clat.1.log ]]; then
        log "  no fio latency log for $file (fio.log tail:)"
        tail -3 "$WORK/fio.log" >&2
        LATR="- - 0 - - 0 $res -"
        return
    fi
    n_all=$(lat_window "$w/slat_clat.1.log" "$fstart" "$s0" | awk '{print $3}')
    [[ $io0 = - || $io1 = - || $n_all = 0 ]] || kib=$(calc "sprintf(\"%.1f\", ($io1 - $io0) / 1024 / $n_all)")
    [[ $res != ok ]] || res=$(secs "$(calc "$SS_T1 - $SS_T0")")
    # skip the first second (cold start) of the idle window
    LATR="$(lat_window "$w/slat_clat.1.log" "$(later "$fstart" 1)" "$s0") $(lat_window "$w/slat_clat.1.log" "$SS_T0" "$SS_T1") $res $kib"
}

# BENCH_SCHED_KEYS: which targets the sched section runs (default: all three)
read -r -a SCHED_KEYS <<<"${BENCH_SCHED_KEYS:-host disk qsd}"
# sched_part NAME: whether BENCH_SCHED_PARTS (default: all) includes b10, b11, b5, fifty or scale
sched_part() { [[ " ${BENCH_SCHED_PARTS:-b10 b11 b5 fifty scale} " == *" $1 "* ]]; }
sched_label() {
    case $1 in
    host) echo "streamfs --idle=host" ;;
    disk) echo "streamfs --idle=disk" ;;
    qsd) echo "qsd block-stream" ;;
    cp) echo "cp base.qcow2 + fsync" ;;
    esac
}

section_sched() {
    prep_base
    local w=$WORK k v a label run
    local cold_mb=${BENCH_SCHED_COLD_MB:-$((SIZE_MB > 1024 ? SIZE_MB : 1024))}
    local cold=$((cold_mb * 1024 * 1024))
    if [[ ! -f $w/baseA.qcow2 ]]; then
        log "sched: making chain A's ${cold_mb} MiB random base baseA.qcow2 (its own file: B's stream must not warm it)"
        dd if=/dev/urandom of="$w/baseA.raw" bs=1M count="$cold_mb" status=none
        qemu-img convert -f raw -O qcow2 "$w/baseA.raw" "$w/baseA.qcow2"
        rm -f "$w/baseA.raw"
        sync
    fi
    quiet_machine
    noise_start
    log "sched: per-stream timeout ${SCHED_TIMEOUT}s"

    if sched_part b10; then
    # ---- B10: neighbour guest. Chains A and B in one mount / one qsd; fio on A, stream B.
    declare -A B10
    local mnt=$w/m-nb F pid
    for v in warm cold; do
        for k in "${SCHED_KEYS[@]}"; do
            B10[$v.$k]="- - 0 - - 0 failed -"
            rm -f "$w/leafA.qcow2" "$w/leafB.qcow2"
            new_leaf "$w/leafA.qcow2" baseA.qcow2
            new_leaf "$w/leafB.qcow2" base.qcow2
            local warmf=-
            [[ $v = warm ]] && warmf=$w/baseA.qcow2
            log "sched B10 neighbour guest ($v A): $k"
            if [[ $k = qsd ]]; then
                qsd_pair qsd-nb "$w/leafA.qcow2" "$w/leafB.qcow2" || continue
                sched_lat "$QSD_FILE_A" "$cold" "$warmf" "$QSD_PID" qsd "$QSD_SOCK" qb
                qsd_stop
            else
                SFS_MORE=("b.raw=$w/leafB.qcow2")
                sfs_mount "$mnt" a.raw "$w/leafA.qcow2" --no-copy-on-read --idle="$k" || { SFS_MORE=(); continue; }
                SFS_MORE=()
                sched_lat "$mnt/a.raw" "$cold" "$warmf" "$(sfs_pid "$mnt")" sfs "$mnt" b.raw
                sfs_umount "$mnt" || true
            fi
            B10[$v.$k]=$LATR
            log "  idle p50 p99 n / during p50 p99 n / stream s / KiB read per fio read = $LATR"
        done
    done
    rm -f "$w/leafA.qcow2" "$w/leafB.qcow2"
    out "== sched B10: neighbour guest. fio ${SCHED_LAT[*]:0:5} on chain A (${cold_mb} MiB) while an unthrottled full stream runs on chain B (${SIZE_MB} MiB) =="
    out "   streamfs: one mount 'a.raw=leafA b.raw=leafB' --no-copy-on-read --idle=POLICY, echo start b.raw > .control;"
    out "   qsd: one daemon, two read-only FUSE exports, QMP block-stream on B's node. Latencies in us; ${SCHED_IDLE}s idle (first second skipped), then during the stream."
    out "   warm: caches dropped, then A's base read into the page cache (B's stream reads from disk)."
    out "   cold: caches dropped right before fio; A has its own base file (B's stream never warms it), and fio's random map"
    out "   reads every 4 KiB block at most once per pass, so reads miss the page cache until 'n' passes $((cold / 4096)) blocks."
    out "   'KiB/read': storage bytes the serving daemon read per fio read in the idle window (/proc/PID/io read_bytes; >= 4 means misses)."
    out "$(row target 'idle p50' 'idle p99' 'during p50' 'during p99' 'p99 x idle' 'goal 1.5x' 'stream s' 'B MiB/s' 'n idle/during' 'KiB/read')"
    for v in warm cold; do
        for k in "${SCHED_KEYS[@]}"; do
            read -r -a a <<<"${B10[$v.$k]}"
            local r99 goal=- mbs=-
            r99=$(ratio "${a[4]}" "${a[1]}")
            [[ $r99 = - ]] || goal=$(awk -v r="$r99" 'BEGIN { print (r <= 1.5) ? "ok" : "MISSED" }')
            [[ ${a[6]} =~ ^[0-9.]+$ ]] && mbs=$(calc "sprintf(\"%.0f\", $SIZE_MB / ${a[6]})")
            out "$(row "$(sched_label "$k"), $v A" "${a[0]}" "${a[1]}" "${a[3]}" "${a[4]}" "$r99" "$goal" "${a[6]}" "$mbs" "${a[2]}/${a[5]}" "${a[7]}")"
        done
    done
    flush_table

    fi
    if sched_part b11; then
    # ---- B11: neighbour process. fio on a plain file on the same disk while a stream runs.
    declare -A B11
    mnt=$w/m-np
    for k in "${SCHED_KEYS[@]}" cp; do
        B11[$k]="- - 0 - - 0 failed -"
        rm -f "$w/leaf.qcow2"
        new_leaf "$w/leaf.qcow2" base.qcow2
        log "sched B11 neighbour process: $k"
        case $k in
        qsd)
            qsd_start qsd-np "$w/leaf.qcow2" ro qmp || continue
            sched_lat "$w/base.raw" "$SIZE" - - qsd "$QSD_SOCK" q
            qsd_stop
            ;;
        cp) sched_lat "$w/base.raw" "$SIZE" - - cp "$w/base.qcow2" "$w/copy.qcow2" ;;
        *)
            sfs_mount "$mnt" vm.raw "$w/leaf.qcow2" --idle="$k" || continue
            sched_lat "$w/base.raw" "$SIZE" - - sfs "$mnt" vm.raw
            sfs_umount "$mnt" || true
            ;;
        esac
        B11[$k]=$LATR
        log "  idle p50 p99 n / during p50 p99 n / stream s = ${LATR% *}"
    done
    rm -f "$w/leaf.qcow2"
    out "== sched B11: neighbour process. fio ${SCHED_LAT[*]:0:5} on a plain file (base.raw, same disk, not through FUSE) during a full stream of ${SIZE_MB} MiB =="
    out "   caches dropped before each run (the stream reads from disk); streamfs: one chain, default --min-speed ${SCHED_MIN_MB}M; the stream must not fall below it"
    out "$(row target 'idle p50' 'idle p99' 'during p50' 'during p99' 'p99 x idle' 'stream s' 'MiB/s' ">= ${SCHED_MIN_MB} MiB/s")"
    for k in "${SCHED_KEYS[@]}" cp; do
        read -r -a a <<<"${B11[$k]}"
        local mbs=- minok=-
        if [[ ${a[6]} =~ ^[0-9.]+$ ]]; then
            mbs=$(calc "sprintf(\"%.0f\", $SIZE_MB / ${a[6]})")
            minok=$(awk -v s="${a[6]}" -v m="$SIZE_MB" -v f="$SCHED_MIN_MB" 'BEGIN { print (m / s >= f) ? "yes" : "NO" }')
        else
            minok="NO (${a[6]})"
        fi
        out "$(row "$(sched_label "$k")" "${a[0]}" "${a[1]}" "${a[3]}" "${a[4]}" "$(ratio "${a[4]}" "${a[1]}")" "${a[6]}" "$mbs" "$minok")"
    done
    flush_table

    fi
    if sched_part b5; then
    # ---- B5: own guest, SCHED_RUNS repeated runs (section_stream's latency measurement).
    declare -A B5
    mnt=$w/m-og
    for k in "${SCHED_KEYS[@]}"; do B5[$k]=""; done
    for ((run = 1; run <= SCHED_RUNS; run++)); do
        for k in "${SCHED_KEYS[@]}"; do
            LATR="- - 0 - - 0 failed -"
            rm -f "$w/leaf.qcow2"
            new_leaf "$w/leaf.qcow2" base.qcow2
            log "sched B5 own guest (run $run/$SCHED_RUNS): $k"
            if [[ $k = qsd ]]; then
                if qsd_start "qsd-og$run" "$w/leaf.qcow2" ro qmp; then
                    sched_lat "$QSD_FILE" "$SIZE" - - qsd "$QSD_SOCK" q
                    qsd_stop
                fi
            elif sfs_mount "$mnt" vm.raw "$w/leaf.qcow2" --no-copy-on-read --idle="$k"; then
                sched_lat "$mnt/vm.raw" "$SIZE" - - sfs "$mnt" vm.raw
                sfs_umount "$mnt" || true
            fi
            read -r -a a <<<"$LATR"
            B5[$k]+=" ${a[1]}:${a[4]}:${a[6]}"
            log "  idle p99 ${a[1]} us, during p99 ${a[4]} us, stream ${a[6]} s"
        done
    done
    rm -f "$w/leaf.qcow2"
    out "== sched B5: own guest. fio ${SCHED_LAT[*]:0:5} on the streamed disk itself during its unthrottled full stream (${SIZE_MB} MiB), ${SCHED_RUNS} runs =="
    out "   as section stream: streamfs --no-copy-on-read, qsd read-only export; caches dropped; per run: p99 during / p99 idle (stream s)"
    local hdr=(target)
    for ((run = 1; run <= SCHED_RUNS; run++)); do hdr+=("run $run"); done
    out "$(row "${hdr[@]}" 'median x' 'idle p99' 'during p99')"
    for k in "${SCHED_KEYS[@]}"; do
        local cells=() rs=() ip=() dp=() e
        for e in ${B5[$k]}; do
            IFS=: read -r i d s <<<"$e"
            local r
            r=$(ratio "$d" "$i")
            cells+=("$r($s)")
            [[ $r = - ]] || rs+=("$r")
            [[ $i = - ]] || ip+=("$i")
            [[ $d = - ]] || dp+=("$d")
        done
        out "$(row "$(sched_label "$k")" "${cells[@]}" "$(median "${rs[@]}")" "$(median "${ip[@]}")" "$(median "${dp[@]}")")"
    done
    flush_table

    fi
    if sched_part fifty; then
    # ---- many small chains in one mount under --total-speed / --max-jobs
    local nch=${BENCH_SCHED_CHAINS:-50} small_mb=${BENCH_SCHED_SMALL_MB:-$((SIZE_MB / 25 > 16 ? SIZE_MB / 25 : 16))}
    local tot_mb=${BENCH_SCHED_TOTAL_MB:-200} maxj=${BENCH_SCHED_MAX_JOBS:-8} i res=""
    mnt=$w/m-many
    log "sched many: $nch chains of ${small_mb} MiB, --total-speed ${tot_mb}M --max-jobs $maxj"
    mkdir -p "$w/many"
    head -c $((small_mb * 1024 * 1024)) "$w/base.raw" >"$w/many/sbase.raw"
    qemu-img convert -f raw -O qcow2 "$w/many/sbase.raw" "$w/many/sbase.qcow2"
    rm -f "$w/many/sbase.raw"
    SFS_MORE=()
    for ((i = 1; i < nch; i++)); do
        new_leaf "$w/many/c$(printf %02d "$i").qcow2" sbase.qcow2
        SFS_MORE+=("c$(printf %02d "$i").raw=$w/many/c$(printf %02d "$i").qcow2")
    done
    new_leaf "$w/many/c00.qcow2" sbase.qcow2
    drop_caches
    if sfs_mount "$mnt" c00.raw "$w/many/c00.qcow2" --total-speed "${tot_mb}M" --max-jobs "$maxj"; then
        SFS_MORE=()
        local tmo=$((nch * small_mb / (tot_mb / 2 > 1 ? tot_mb / 2 : 1) + SCHED_TIMEOUT))
        echo "python3 $SCHED_PY fifty $mnt $nch $tmo $((small_mb * 1024 * 1024)) $((tot_mb * 1024 * 1024))" >>"$WORK/commands.log"
        res=$(timeout -k 5 $((tmo + 30)) python3 "$SCHED_PY" fifty "$mnt" "$nch" "$tmo" $((small_mb * 1024 * 1024)) \
            $((tot_mb * 1024 * 1024))) || log "sched many: the driver failed"
        log "  $res"
        sfs_umount "$mnt" || true
    fi
    SFS_MORE=()
    rm -rf "$w/many"
    declare -A M=()
    for e in $res; do M[${e%%=*}]=${e#*=}; done
    local within=-
    [[ -n ${M[rate]:-} ]] && within=$(awk -v r="${M[rate]}" -v t="$tot_mb" 'BEGIN { d = (r - t) / t * 100; printf "%+.1f%% %s\n", d, (d <= 5 && d >= -5) ? "ok" : "MISSED" }')
    out "== sched many: $nch chains of ${small_mb} MiB (one shared dense base) in one mount, --total-speed ${tot_mb}M --max-jobs $maxj, caches dropped =="
    out "   'start cNN.raw' written to .control in order c00..c$((nch - 1)); .control polled every 20 ms, .events followed (scripts/bench-sched.py fifty)"
    out "   rate = sum of copied / (first start .. last completed event); steady = between 10% and 90% of the bytes"
    out "$(row 'wall s' 'rate MiB/s' 'vs cap' 'steady MiB/s' 'completed' 'max running' 'started ord' 'dequeue ord' 'completion inv')"
    out "$(printf '%-34s' "${M[wall]:--}") $(printf ' %12s' "${M[rate]:--}" "$within" "${M[steady]:--}" "${M[completed]:--}/$nch" \
        "${M[peak_running]:--}/$maxj" "${M[started_order]:--}" "${M[dequeue_order]:--}" "${M[completion_inv]:--}")"
    out "   ${M[queued]:-?} jobs seen queued, they left the queue at ${M[dequeue_polls]:-?} distinct polls (of ${M[polls]:-?}); dequeue ord = in start order (ties within a poll allowed)"
    flush_table

    fi
    if sched_part scale; then
    # ---- scale: a huge sparse chain holding SIZE_MB of scattered data vs the dense chain
    local vgb=${BENCH_SCHED_SCALE_GB:-1024}
    log "sched scale: ${vgb} GiB virtual chain with ${SIZE_MB} MiB of scattered extents (qemu-io)"
    qemu-img create -q -f qcow2 "$w/sparse-base.qcow2" "${vgb}G"
    local cmds=() line
    while read -r line; do cmds+=(-c "$line"); done < <(python3 "$SCHED_PY" extents $((vgb * 1024 * 1024 * 1024)) "$SIZE" 1)
    timeout -k 5 $((SCHED_TIMEOUT * 2)) qemu-io -f qcow2 "${cmds[@]}" "$w/sparse-base.qcow2" >/dev/null ||
        log "WARNING: qemu-io writing the sparse base failed"
    local n_ext=$((${#cmds[@]} / 2))
    sync
    declare -A SC
    local c t0 t1 mt st hwm ok
    for c in dense sparse; do
        local bimg=base.qcow2
        [[ $c = sparse ]] && bimg=sparse-base.qcow2
        for k in sfs qsd convert; do
            SC[$c.$k]="- - - - -"
            rm -f "$w/leaf.qcow2" "$w/conv.qcow2"
            new_leaf "$w/leaf.qcow2" "$bimg"
            log "sched scale: $c $k"
            mt=- st=- hwm=- ok=-
            drop_caches
            case $k in
            sfs)
                t0=$(now)
                sfs_mount "$w/m-sc" vm.raw "$w/leaf.qcow2" || continue
                t1=$(now)
                mt=$(secs "$(calc "$t1 - $t0")")
                pid=$(sfs_pid "$w/m-sc")
                sched_stream sfs "$w/m-sc" vm.raw && st=$(secs "$(calc "$SS_T1 - $SS_T0")")
                [[ $pid = - ]] || hwm=$(vm_hwm_mib "$pid")
                sfs_umount "$w/m-sc" || true
                ;;
            qsd)
                t0=$(now)
                qsd_start qsd-sc "$w/leaf.qcow2" ro qmp || continue
                t1=$(now)
                mt=$(secs "$(calc "$t1 - $t0")")
                sched_stream qsd "$QSD_SOCK" q && st=$(secs "$(calc "$SS_T1 - $SS_T0")")
                hwm=$(vm_hwm_mib "$QSD_PID")
                qsd_stop
                ;;
            convert)
                t0=$(now)
                echo "qemu-img convert -O qcow2 $w/leaf.qcow2 $w/conv.qcow2 && sync" >>"$WORK/commands.log"
                if timeout -k 5 "$SCHED_TIMEOUT" qemu-img convert -O qcow2 "$w/leaf.qcow2" "$w/conv.qcow2" && sync; then
                    t1=$(now)
                    st=$(secs "$(calc "$t1 - $t0")")
                fi
                ;;
            esac
            if [[ $st != - ]]; then
                local img=$w/leaf.qcow2
                [[ $k = convert ]] && img=$w/conv.qcow2
                if has_backing "$img"; then ok=BACKING-LEFT; else ok=no-backing; fi
                qemu-img check -q "$img" || ok+=",CHECK-FAILED"
                ok+=",$(leaf_mib "$img")MiB"
            fi
            SC[$c.$k]="$mt $st $hwm $ok"
            log "  mount s / stream s / peak RSS MiB / leaf: ${SC[$c.$k]}"
        done
    done
    rm -f "$w/leaf.qcow2" "$w/conv.qcow2" "$w/sparse-base.qcow2"
    out "== sched scale: ${vgb} GiB virtual chain holding ${SIZE_MB} MiB in $n_ext extents of 64 KiB..1 MiB (base, qemu-io), empty leaf; vs the dense ${SIZE_MB} MiB chain =="
    out "   caches dropped first; mount s = 'streamfs mount' returning / qsd export up; peak RSS = VmHWM after the stream (streamfs pid from xattr user.streamfs.pid)"
    out "   qemu-img convert -O qcow2 LEAF OUT + sync: the offline copy, as a reference"
    out "$(row target 'mount s' 'stream s' 'MiB/s' 'x dense' 'peak RSS MiB' 'RSS x dense' 'result')"
    for k in sfs qsd convert; do
        case $k in
        sfs) label="streamfs" ;;
        qsd) label="qsd block-stream" ;;
        convert) label="qemu-img convert" ;;
        esac
        for c in dense sparse; do
            read -r -a a <<<"${SC[$c.$k]}"
            local db mbs=-
            read -r -a db <<<"${SC[dense.$k]}"
            [[ ${a[1]} =~ ^[0-9.]+$ ]] && mbs=$(calc "sprintf(\"%.0f\", $SIZE_MB / ${a[1]})")
            local vname="dense ${SIZE_MB}M"
            [[ $c = sparse ]] && vname="${vgb}G sparse"
            out "$(row "$label, $vname" "${a[0]}" "${a[1]}" "$mbs" "$(ratio "${a[1]}" "${db[1]}")" "${a[2]}" "$(ratio "${a[2]}" "${db[2]}")" "${a[3]}")"
        done
    done
    fi
    [[ $SFS_STATE = broken ]] && out "   streamfs: n/a ($SFS_WHY)"
    local NOTE
    NOTE=$(noise_stop)
    [[ -z $NOTE ]] || out "$NOTE"
    flush_table
}

# ================================================================ main
header
build_streamfs
log "work dir $WORK ($FSTYPE)"
case $SECTION in
all)
    section_read
    section_cor
    section_write
    section_stream
    section_sched
    ;;
*) "section_$SECTION" ;;
esac
log "done; tables appended to $RESULTS"
