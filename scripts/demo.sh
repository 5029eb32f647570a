#!/usr/bin/env bash
# Demo: build streamfs, make a 3-image qcow2 chain, mount it, check the flat raw view
# against qemu-img, stream the chain into the leaf, check the leaf, unmount.
#   scripts/demo.sh          (needs root or FUSE access, qemu-img, qemu-io)
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
SFS="$ROOT/target/release/streamfs"

step() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
run() { echo "+ $*"; "$@"; }
fail() { echo "FAILED: $*" >&2; exit 1; }

step "cargo build --release"
(cd "$ROOT" && cargo build --release)

DIR=$(mktemp -d "${TMPDIR:-/var/tmp}/streamfs-demo.XXXXXX")
MNT="$DIR/mnt"
cleanup() {
    set +e
    if findmnt -rn --mountpoint "$MNT" >/dev/null 2>&1; then
        timeout 30 "$SFS" umount "$MNT" 2>/dev/null || umount -l "$MNT"
    fi
    rm -rf "$DIR"
}
trap cleanup EXIT
cd "$DIR"

step "make a chain in $DIR: base.qcow2 <- mid.qcow2 <- top.qcow2 (64 MiB)"
run qemu-img create -q -f qcow2 base.qcow2 64M
run qemu-io -f qcow2 -c "write -q -P 0xaa 0 48M" base.qcow2
run qemu-img create -q -f qcow2 -b base.qcow2 -F qcow2 mid.qcow2
run qemu-io -f qcow2 -c "write -q -P 0xbb 8M 8M" -c "write -q -P 0xbc 30M 100k" -c "write -q -z 40M 2M" mid.qcow2
run qemu-img create -q -f qcow2 -b mid.qcow2 -F qcow2 top.qcow2
run qemu-io -f qcow2 -c "write -q -P 0xcc 12M 1M" -c "write -q -P 0xcd 50M 4k" -c "write -q -P 0xce 63M 1M" top.qcow2
run qemu-img info --backing-chain top.qcow2 | grep -E '^(image|backing file):'

step "mount read-only and compare with qemu-img's view of the chain"
mkdir "$MNT"
run "$SFS" mount --read-only --log-file "$DIR/streamfs.log" "$MNT" top.qcow2
run ls -l "$MNT"
run cat "$MNT/.control"
run qemu-img convert -O raw top.qcow2 ref.raw
if run cmp "$MNT/top.raw" ref.raw; then
    echo "identical: $MNT/top.raw matches qemu-img convert -O raw top.qcow2"
else
    fail "mounted raw file differs from qemu-img convert"
fi
run "$SFS" umount "$MNT"

step "mount read-write (copy-on-read on): reading 4 MiB copies it into the leaf (see leaf=)"
run "$SFS" mount --log-file "$DIR/streamfs.log" "$MNT" top.qcow2
run cat "$MNT/.control"
run dd if="$MNT/top.raw" of=/dev/null bs=1M count=4 skip=20 status=none
run cat "$MNT/.control"

step "stream the rest of the chain into the leaf"
run "$SFS" start "$MNT" top.raw --wait
run cat "$MNT/.control"
run cmp "$MNT/top.raw" ref.raw || fail "data differs after streaming"
echo "still identical after streaming"

step "unmount"
run "$SFS" umount "$MNT"

step "the leaf after streaming"
run qemu-img info top.qcow2
if qemu-img info --output=json top.qcow2 | grep -q '"backing-filename"'; then
    fail "top.qcow2 still has a backing file"
fi
echo "top.qcow2 has no backing file any more"
run qemu-img check top.qcow2 || fail "qemu-img check top.qcow2"
run qemu-img compare -f qcow2 -F raw top.qcow2 ref.raw || fail "leaf differs from the reference"

step "demo OK"
