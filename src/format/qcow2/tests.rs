//! Unit tests on real images made by qemu-img (and checked by it); `run` and `ps` serve
//! the chain's tests too.

use std::path::{Path, PathBuf};
use std::process::Command;

use super::l2::ClusterState;
use super::*;

/// Runs a qemu tool, failing the test with its output if it fails.
pub(crate) fn run(cmd: &str, args: &[&str]) {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .expect("run qemu tool");
    assert!(
        out.status.success(),
        "{cmd} {args:?}: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub(crate) fn ps(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, ps(&p), size],
    );
    p
}

/// Runs one qemu-io command on a qcow2 image.
pub(crate) fn qemu_io(image: &Path, cmd: &str) {
    run("qemu-io", &["-f", "qcow2", "-c", cmd, ps(image)]);
}

fn check(image: &Path) {
    run("qemu-img", &["check", "-q", "-f", "qcow2", ps(image)]);
}

/// Marks metadata dirty without changing anything on disk (the L1 entry is rewritten as is).
fn touch(q: &Qcow2) {
    q.meta.lock().l1_dirty.insert(0);
}

#[test]
fn flush_all_loops_until_metadata_is_clean() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    let q = Qcow2::open(&p, true).unwrap();
    // Each of the first six passes leaves something dirty (as releases do): four passes
    // are not enough, and returning then would leave the image incomplete on disk.
    let mut passes = 0;
    q.flush_until_clean(|| {
        q.flush()?;
        passes += 1;
        if passes <= 6 {
            touch(&q);
        }
        Ok(())
    })
    .unwrap();
    assert_eq!(passes, 7);
    assert!(!q.has_dirty_metadata());
}

#[test]
fn flush_all_reports_metadata_that_never_settles() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    let q = Qcow2::open(&p, true).unwrap();
    let err = q
        .flush_until_clean(|| {
            q.flush()?;
            touch(&q);
            Ok(())
        })
        .unwrap_err();
    assert_eq!(err.errno(), libc::EBUSY, "{err}");
    assert!(err.to_string().contains("still dirty"), "{err}");
}

/// Points guest cluster `ci`'s L2 entry (the image's first L2 table) at an unaligned
/// host offset, which `decode` rejects.
fn corrupt_entry(p: &Path, ci: u64) {
    use std::os::unix::fs::FileExt;
    let q = Qcow2::open(p, false).unwrap();
    let l2 = q.l2_offset(0).unwrap();
    assert_ne!(l2, 0);
    drop(q);
    let f = std::fs::OpenOptions::new().write(true).open(p).unwrap();
    let bad = (COPIED_BIT | 0x10200u64).to_be_bytes();
    f.write_at(&bad, l2 + ci * 8).unwrap();
}
const COPIED_BIT: u64 = 1 << 63;

#[test]
fn failed_commit_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    // Cluster 2 has data (so the first L2 table exists); cluster 1 gets a corrupt entry.
    qemu_io(&p, "write -P 0x11 128k 64k");
    corrupt_entry(&p, 1);
    let q = Qcow2::open(&p, true).unwrap();
    let cs = q.cluster_size() as usize;
    let data = vec![0x22u8; 2 * cs];
    let unalloc = ClusterState::Unallocated;
    let err = q
        .fill(&Batch {
            first: 0,
            ops: &[
                ClusterOp::Fresh { old: unalloc },
                ClusterOp::Fresh { old: unalloc },
            ],
            data: &data,
            writeback: false,
        })
        .unwrap_err();
    assert!(err.to_string().contains("not cluster aligned"), "{err}");
    // Cluster 0 came first in the batch: it must not point at the new data in memory
    // only, and no reference may have been taken for it.
    assert_eq!(q.cluster_state(0).unwrap(), unalloc);
    assert!(
        !q.has_dirty_metadata(),
        "a failed commit left dirty metadata"
    );
}

#[test]
fn a_commit_that_sees_a_changed_cluster_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    qemu_io(&p, "write -P 0x11 0 64k");
    let q = Qcow2::open(&p, true).unwrap();
    let err = q
        .fill(&Batch {
            first: 0,
            ops: &[ClusterOp::Zero {
                old: ClusterState::Unallocated,
            }],
            data: &[],
            writeback: false,
        })
        .unwrap_err();
    assert!(err.to_string().contains("changed under its lock"), "{err}");
    assert!(matches!(
        q.cluster_state(0).unwrap(),
        ClusterState::Data { .. }
    ));
}

#[test]
fn fills_are_durable_and_consistent() {
    for opts in [
        "cluster_size=65536",
        "cluster_size=4096",
        "cluster_size=131072,extended_l2=on",
        "compat=0.10",
    ] {
        let dir = tempfile::tempdir().unwrap();
        // Wide enough to need a second L2 table and new refcount blocks.
        let p = create(dir.path(), "a.qcow2", opts, "8G");
        qemu_io(&p, "write -P 0x11 0 4k");
        let q = Qcow2::open(&p, true).unwrap();
        let cs = q.cluster_size();
        let l2_span = q.geometry().l2_entries() * cs;
        let zero = q.geometry().zero_flag;
        let c0 = q.cluster_state(0).unwrap();
        let mut data = vec![0u8; 3 * cs as usize];
        data[..cs as usize].fill(0xaa);
        data[cs as usize..].fill(0xbb);
        let first_op = match c0 {
            ClusterState::Data { host, .. } => ClusterOp::Overwrite {
                host,
                write: (0, 512),
            },
            old => ClusterOp::Complete { old, write: None },
        };
        let n = q
            .fill(&Batch {
                first: 0,
                ops: &[
                    first_op,
                    ClusterOp::Fresh {
                        old: ClusterState::Unallocated,
                    },
                    if zero {
                        ClusterOp::Zero {
                            old: ClusterState::Unallocated,
                        }
                    } else {
                        ClusterOp::Keep
                    },
                ],
                data: &data,
                writeback: true,
            })
            .unwrap();
        assert!(n >= cs, "{opts}: {n} bytes written");
        // Far away: a new L2 table, and (at 8 GiB with small clusters) new refcount blocks.
        let far = (8u64 << 30) / cs - 1;
        assert!(far * cs >= l2_span);
        let tail = vec![0xccu8; cs as usize];
        q.fill(&Batch {
            first: far,
            ops: &[ClusterOp::Fresh {
                old: ClusterState::Unallocated,
            }],
            data: &tail,
            writeback: false,
        })
        .unwrap();
        q.flush_all().unwrap();
        assert!(!q.has_dirty_metadata());
        drop(q);
        check(&p);
        let q = Qcow2::open(&p, false).unwrap();
        let mut buf = vec![0u8; cs as usize];
        for (off, want) in [(cs, 0xbbu8), (far * cs, 0xcc)] {
            let (m, _) = q.map(off, cs).unwrap();
            q.read_mapped(m, off, &mut buf).unwrap();
            assert!(buf.iter().all(|&b| b == want), "{opts}: at {off}");
        }
        let (m, _) = q.map(0, 512).unwrap();
        q.read_mapped(m, 0, &mut buf[..512]).unwrap();
        let want0 = if matches!(c0, ClusterState::Data { .. }) {
            0xaa
        } else {
            // Completed: the allocated 4k subclusters keep QEMU's data, the rest is ours.
            0x11
        };
        assert!(buf[..512].iter().all(|&b| b == want0), "{opts}");
        if zero {
            assert_eq!(q.map(2 * cs, cs).unwrap().0, Mapping::Zero, "{opts}");
        }
    }
}

#[test]
fn read_only_tables_are_frozen() {
    let dir = tempfile::tempdir().unwrap();
    let p = create(dir.path(), "a.qcow2", "cluster_size=65536", "4M");
    qemu_io(&p, "write -P 0x11 0 64k");
    let ro = Qcow2::open(&p, false).unwrap();
    let rw = Qcow2::open(&p, true).unwrap();
    let off = ro.l2_offset(0).unwrap();
    assert!(ro.l2_table(off).unwrap().live().is_none());
    assert!(rw.l2_table(off).unwrap().live().is_some());
    // Lookups through the per-thread tables see the same as the shared cache.
    for _ in 0..2 {
        assert!(matches!(ro.map(0, 65536).unwrap().0, Mapping::Data { .. }));
        assert_eq!(ro.map(65536, 65536).unwrap(), (Mapping::Unallocated, 65536));
    }
}
