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
