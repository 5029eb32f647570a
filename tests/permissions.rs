//! Who may use a mounted disk: each raw file shows its leaf image's owner, group and
//! read/write bits (a read-only mount drops the write bits), `.control` belongs to the
//! mounting user with mode 0600, and the kernel enforces both (default_permissions). Checked
//! as an unprivileged user (`nobody`) in child processes that drop root before exec.

mod common;

use std::fs;
use std::os::unix::fs::{chown, MetadataExt, PermissionsExt};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use common::*;

const NOBODY: u32 = 65534;

/// Runs `argv` as uid/gid `NOBODY` (no supplementary groups); true if it exited 0.
fn as_nobody(argv: &[&str]) -> bool {
    let mut cmd = Command::new(argv[0]);
    cmd.args(&argv[1..])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    // SAFETY: only async-signal-safe syscalls between fork and exec.
    unsafe {
        cmd.pre_exec(|| {
            if libc::setgroups(0, std::ptr::null()) != 0
                || libc::setgid(NOBODY) != 0
                || libc::setuid(NOBODY) != 0
            {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    run_with_timeout(cmd, IO_TIMEOUT).status.success()
}

fn can_read(p: &Path) -> bool {
    as_nobody(&[
        "dd",
        &format!("if={}", ps(p)),
        "of=/dev/null",
        "bs=4096",
        "count=1",
    ])
}

fn can_write(p: &Path) -> bool {
    as_nobody(&[
        "dd",
        "if=/dev/zero",
        &format!("of={}", ps(p)),
        "bs=512",
        "count=1",
        "conv=notrunc",
    ])
}

/// A scratch directory that `nobody` can walk through to reach the mount point.
fn open_scratch() -> Scratch {
    let s = Scratch::new();
    fs::set_permissions(s.path(), fs::Permissions::from_mode(0o755)).unwrap();
    s
}

fn leaf(s: &Scratch, name: &str, mode: u32, owner: u32) -> std::path::PathBuf {
    let p = Qcow2::new().size(MIB).create(&s.join(name));
    write_pattern(&p, 0x42, 0, 4096);
    fs::set_permissions(&p, fs::Permissions::from_mode(mode)).unwrap();
    chown(&p, Some(owner), Some(owner)).unwrap();
    p
}

#[test]
fn raw_files_take_their_leafs_owner_and_mode() {
    require_fuse!();
    let s = open_scratch();
    let private = leaf(&s, "private.qcow2", 0o600, 0);
    let public = leaf(&s, "public.qcow2", 0o644, 0);
    let theirs = leaf(&s, "theirs.qcow2", 0o640, NOBODY);
    let m = s.mount(&[&private, &public, &theirs], &["--allow-other"]);
    for (name, mode, uid) in [
        ("private.raw", 0o600, 0),
        ("public.raw", 0o644, 0),
        ("theirs.raw", 0o640, NOBODY),
    ] {
        let md = fs::metadata(m.file(name)).unwrap();
        assert_eq!(md.mode() & 0o7777, mode, "{name} mode");
        assert_eq!((md.uid(), md.gid()), (uid, uid), "{name} owner");
    }
    assert!(
        !can_read(&m.file("private.raw")),
        "nobody read a 0600 root disk"
    );
    assert!(
        !can_write(&m.file("private.raw")),
        "nobody wrote a 0600 root disk"
    );
    assert!(
        can_read(&m.file("public.raw")),
        "nobody cannot read a 0644 disk"
    );
    assert!(
        !can_write(&m.file("public.raw")),
        "nobody wrote a 0644 root disk"
    );
    assert!(can_read(&m.file("theirs.raw")) && can_write(&m.file("theirs.raw")));
    // `.control` is the mounting user's alone.
    let control = fs::metadata(m.control()).unwrap();
    assert_eq!(control.mode() & 0o7777, 0o600);
    assert_eq!(control.uid(), 0);
    assert!(!can_read(&m.control()), "nobody read .control");
    assert!(
        !as_nobody(&[
            "sh",
            "-c",
            &format!("echo 'pause x' > {}", ps(&m.control()))
        ]),
        "nobody wrote .control"
    );
    m.umount();
}

#[test]
fn read_only_mounts_drop_write_bits() {
    require_fuse!();
    let s = open_scratch();
    let private = leaf(&s, "private.qcow2", 0o600, 0);
    let theirs = leaf(&s, "theirs.qcow2", 0o664, NOBODY);
    let m = s.mount(&[&private, &theirs], &["--allow-other", "--read-only"]);
    let md = fs::metadata(m.file("private.raw")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o400, 0));
    assert!(
        !can_read(&m.file("private.raw")),
        "nobody read a 0600 root disk"
    );
    let md = fs::metadata(m.file("theirs.raw")).unwrap();
    assert_eq!((md.mode() & 0o7777, md.uid()), (0o444, NOBODY));
    assert!(can_read(&m.file("theirs.raw")));
    assert!(!can_write(&m.file("theirs.raw")));
    m.umount();
}

#[test]
fn without_allow_other_other_users_are_kept_out() {
    require_fuse!();
    let s = open_scratch();
    let public = leaf(&s, "public.qcow2", 0o644, 0);
    let m = s.mount(&[&public], &[]);
    assert!(!can_read(&m.file("public.raw")));
    m.umount();
}

#[test]
fn mount_options_enforce_permissions_in_the_kernel() {
    require_fuse!();
    let s = open_scratch();
    let public = leaf(&s, "public.qcow2", 0o644, 0);
    let m = s.mount(&[&public], &["--allow-other"]);
    let line = mountinfo_line(m.path()).expect("mountinfo");
    assert!(line.contains("default_permissions"), "{line}");
    assert!(line.contains("allow_other"), "{line}");
    m.umount();
}
