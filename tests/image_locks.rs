//! Image locks: streamfs takes the OFD byte-range locks QEMU takes (block/file-posix.c),
//! so QEMU, qemu-img and other streamfs mounts see a mounted image as in use, and
//! streamfs sees theirs. Checked against the real QEMU tools.

mod common;

use std::collections::BTreeSet;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use common::*;

/// Bytes of `path` locked with OFD locks by anyone, from /proc/locks.
fn ofd_locked_bytes(path: &Path) -> BTreeSet<u64> {
    let ino = std::fs::metadata(path).expect("stat").ino();
    let text = std::fs::read_to_string("/proc/locks").expect("/proc/locks");
    let mut bytes = BTreeSet::new();
    for line in text.lines() {
        let t: Vec<&str> = line.split_whitespace().collect();
        let Some(at) = t.iter().position(|w| *w == "OFDLCK") else {
            continue;
        };
        // "OFDLCK ADVISORY READ pid maj:min:inode start end"
        let Some(dev_ino) = t.get(at + 4) else {
            continue;
        };
        if dev_ino.rsplit(':').next() != Some(&ino.to_string()) {
            continue;
        }
        let (Some(a), Some(b)) = (t.get(at + 5), t.get(at + 6)) else {
            continue;
        };
        if let (Ok(a), Ok(b)) = (a.parse::<u64>(), b.parse::<u64>()) {
            bytes.extend(a..=b);
        }
    }
    bytes
}

/// A qemu-io process holding `image` open (interactively, waiting on stdin) until dropped.
struct QemuIo {
    child: Child,
}

impl QemuIo {
    fn hold(image: &Path, args: &[&str]) -> QemuIo {
        let child = Command::new("qemu-io")
            .args(["-f", image_format(image)])
            .args(args)
            .arg(image)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("spawn qemu-io");
        let h = QemuIo { child };
        assert!(
            wait_until(|| ofd_locked_bytes(image).contains(&100), QEMU_TIMEOUT),
            "qemu-io {args:?} never locked {image:?}"
        );
        h
    }
}

impl Drop for QemuIo {
    fn drop(&mut self) {
        drop(self.child.stdin.take());
        let pid = self.child.id() as i32;
        if !wait_until(|| !matches!(self.child.try_wait(), Ok(None)), EXIT_TIMEOUT) {
            send_signal(pid, libc::SIGKILL);
            let _ = self.child.wait();
        }
    }
}

/// qemu-io locks the leaf before it opens the backing file: wait for the latter too.
fn wait_for_backing_lock(base: &Path) {
    assert!(
        wait_until(|| ofd_locked_bytes(base).contains(&100), QEMU_TIMEOUT),
        "qemu-io never locked the backing file {base:?}"
    );
}

fn chain(s: &Scratch) -> (std::path::PathBuf, std::path::PathBuf) {
    let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
    write_pattern(&base, 0x11, 0, MIB);
    let leaf = Qcow2::new().backing(&base).create(&s.join("leaf.qcow2"));
    (base, leaf)
}

#[test]
fn locks_are_the_bytes_qemu_locks() {
    require_fuse!();
    let s = Scratch::new();
    let (base, leaf) = chain(&s);
    let (qemu_leaf, qemu_base) = {
        let _q = QemuIo::hold(&leaf, &[]);
        wait_for_backing_lock(&base);
        (ofd_locked_bytes(&leaf), ofd_locked_bytes(&base))
    };
    assert_eq!(
        qemu_leaf,
        BTreeSet::from([100, 101, 103, 201, 203]),
        "QEMU changed"
    );
    let m = s.mount(&[&leaf], &[]);
    assert_eq!(ofd_locked_bytes(&leaf), qemu_leaf, "leaf");
    assert_eq!(ofd_locked_bytes(&base), qemu_base, "backing file");
    m.umount();
    assert!(
        ofd_locked_bytes(&leaf).is_empty(),
        "locks kept after umount"
    );

    let (qemu_leaf_ro, qemu_base_ro) = {
        let _q = QemuIo::hold(&leaf, &["-r"]);
        wait_for_backing_lock(&base);
        (ofd_locked_bytes(&leaf), ofd_locked_bytes(&base))
    };
    let m = s.mount(&[&leaf], &["--read-only"]);
    assert_eq!(ofd_locked_bytes(&leaf), qemu_leaf_ro, "read-only leaf");
    assert_eq!(ofd_locked_bytes(&base), qemu_base_ro, "read-only backing");
    m.umount();

    let qemu_leaf_u = {
        let _q = QemuIo::hold(&leaf, &["-r", "-U"]);
        ofd_locked_bytes(&leaf)
    };
    let m = s.mount(&[&leaf], &["--read-only", "--force-share"]);
    assert_eq!(ofd_locked_bytes(&leaf), qemu_leaf_u, "--force-share leaf");
    m.umount();
}

#[test]
fn second_mount_of_a_mounted_leaf_fails() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, leaf) = chain(&s);
    let m = s.mount(&[&leaf], &[]);
    let err = assert_mount_fails(s.mount_cmd().image(&leaf), &[ps(&leaf), "in use"]);
    assert!(err.contains("\"write\" lock"), "{err}");
    // Read-only does not help: the writer does not share.
    assert_mount_fails(
        s.mount_cmd().arg("--read-only").image(&leaf),
        &[ps(&leaf), "in use"],
    );
    // The same leaf twice in one mount is the same conflict.
    m.umount();
    assert_mount_fails(
        s.mount_cmd().named("a.raw", &leaf).named("b.raw", &leaf),
        &[ps(&leaf), "in use"],
    );
    // Released: mounts again.
    s.mount(&[&leaf], &[]).umount();
}

#[test]
fn qemu_img_sees_a_mounted_leaf_as_in_use() {
    require_fuse!();
    let s = Scratch::new();
    let (base, leaf) = chain(&s);
    let m = s.mount(&[&leaf], &[]);
    let out = qemu_img_output(&["info", ps(&leaf)]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success(),
        "qemu-img info succeeded on a mounted leaf"
    );
    assert!(
        stderr.contains("Failed to get shared \"write\" lock"),
        "{stderr}"
    );
    qemu_img(&["info", "-U", ps(&leaf)]);
    // A backing file may be read but not written while we read it.
    qemu_img(&["info", ps(&base)]);
    let out = Command::new("qemu-io")
        .args(["-f", "qcow2", "-c", "write 0 4k"])
        .arg(&base)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("Failed to get \"write\" lock"), "{stderr}");
    m.umount();
    qemu_img(&["info", ps(&leaf)]);
    write_pattern(&base, 0x22, 0, 4096);
}

#[test]
fn mount_fails_while_qemu_io_writes_the_leaf() {
    require_fuse!();
    let s = Scratch::new();
    let (base, leaf) = chain(&s);
    let q = QemuIo::hold(&leaf, &[]);
    assert_mount_fails(s.mount_cmd().image(&leaf), &[ps(&leaf), "in use", "lock"]);
    assert_mount_fails(
        s.mount_cmd().arg("--read-only").image(&leaf),
        &[ps(&leaf), "in use", "shared \"write\" lock"],
    );
    // --force-share reads it anyway, as qemu-img -U does.
    let m = s.mount(&[&leaf], &["--read-only", "--force-share"]);
    m.umount();
    // The backing file QEMU only reads can back another chain.
    let other = Qcow2::new().backing(&base).create(&s.join("other.qcow2"));
    s.mount(&[&other], &[]).umount();
    drop(q);
    s.mount(&[&leaf], &[]).umount();
}

/// Ends a qemu-storage-daemon when dropped (also when the test failed).
struct Qsd(Child);

impl Drop for Qsd {
    fn drop(&mut self) {
        send_signal(self.0.id() as i32, libc::SIGTERM);
        if !wait_until(|| !matches!(self.0.try_wait(), Ok(None)), EXIT_TIMEOUT) {
            send_signal(self.0.id() as i32, libc::SIGKILL);
        }
        let _ = self.0.wait();
    }
}

#[test]
fn mount_fails_while_qemu_storage_daemon_serves_the_leaf() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, leaf) = chain(&s);
    let pidfile = s.join("qsd.pid");
    let qsd = Command::new("qemu-storage-daemon")
        .arg("--blockdev")
        .arg(format!("driver=file,filename={},node-name=f", ps(&leaf)))
        .args(["--blockdev", "driver=qcow2,file=f,node-name=q"])
        .arg("--nbd-server")
        .arg(format!(
            "addr.type=unix,addr.path={}",
            ps(&s.join("nbd.sock"))
        ))
        .args(["--export", "type=nbd,node-name=q,id=e,writable=on"])
        .arg("--pidfile")
        .arg(&pidfile)
        .stdout(Stdio::null())
        .spawn()
        .expect("spawn qemu-storage-daemon");
    let qsd = Qsd(qsd);
    assert!(
        wait_until(|| pidfile.exists(), QEMU_TIMEOUT),
        "qemu-storage-daemon did not start"
    );
    assert_mount_fails(s.mount_cmd().image(&leaf), &[ps(&leaf), "in use"]);
    drop(qsd);
    s.mount(&[&leaf], &[]).umount();
}

#[test]
fn read_only_mounts_share_an_image() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, leaf) = chain(&s);
    let reference = raw_reference(&leaf);
    let a = s.mount(&[&leaf], &["--read-only"]);
    let b = s.mount(&[&leaf], &["--read-only"]);
    assert_bytes_eq("a", &read_file(&a.file("leaf.raw")), &reference);
    assert_bytes_eq("b", &read_file(&b.file("leaf.raw")), &reference);
    // Readers share with readers (qemu-img info works) but keep writers out.
    qemu_img(&["info", ps(&leaf)]);
    assert_mount_fails(s.mount_cmd().image(&leaf), &[ps(&leaf), "in use"]);
    a.umount();
    b.umount();
}

#[test]
fn force_share_needs_read_only() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, leaf) = chain(&s);
    let f = s
        .mount_cmd()
        .arg("--force-share")
        .image(&leaf)
        .run()
        .map(|m| m.umount())
        .expect_err("--force-share without --read-only mounted");
    assert!(f.stderr.contains("--read-only"), "{f}");
    assert!(!f.status.success());
}

#[test]
fn images_are_free_as_soon_as_the_daemon_has_exited() {
    require_fuse!();
    let s = Scratch::new();
    let (base, leaf) = chain(&s);
    // The daemon's main thread shows as exited before its other threads are gone (and
    // with them its files): the locks must not outlive what umount waits for.
    for i in 0..10 {
        let m = s.mount(&[&leaf], &["--threads", "32"]);
        let f = std::fs::OpenOptions::new()
            .write(true)
            .open(m.file("leaf.raw"))
            .unwrap();
        with_timeout("write", IO_TIMEOUT, move || {
            std::os::unix::fs::FileExt::write_all_at(&f, &[0xab; 4096], i * 4096).unwrap()
        });
        if i % 2 == 0 {
            m.umount();
        } else {
            m.terminate(libc::SIGTERM);
        }
        for img in [&leaf, &base] {
            let out = qemu_img_output(&["info", ps(img)]);
            assert!(
                out.status.success(),
                "round {i}: {img:?} still locked: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}
