//! Unit tests on real images made by qemu-img (and checked by it).

use std::path::{Path, PathBuf};
use std::process::Command;

use super::*;

fn run(cmd: &str, args: &[&str]) {
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

fn create(dir: &Path, name: &str, opts: &str, size: &str) -> PathBuf {
    let p = dir.join(name);
    let ps = p.to_str().expect("utf-8 path");
    run(
        "qemu-img",
        &["create", "-q", "-f", "qcow2", "-o", opts, ps, size],
    );
    p
}

fn qemu_io(image: &Path, cmd: &str) {
    let ps = image.to_str().expect("utf-8 path");
    run("qemu-io", &["-f", "qcow2", "-c", cmd, ps]);
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
