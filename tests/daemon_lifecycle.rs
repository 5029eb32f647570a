//! The daemon's lifecycle: detaching from the caller, the pid xattr, `--foreground`,
//! signals and unmounting, a clean exit that leaves a consistent leaf, log files.

mod common;

use common::*;
use std::fs::{self, File};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Clean exit
// ---------------------------------------------------------------------------------------------

/// Mounts a three-layer chain with copy-on-read, reads it all (so the daemon writes the
/// leaf), ends the mount with `end`, then checks the leaf is consistent and unchanged.
fn clean_exit(end: impl FnOnce(Mount)) {
    let s = Scratch::new();
    let chain = three_layers(&s);
    let reference = raw_reference(&chain.top);
    let m = s.mount(&[&chain.top], &[]);
    assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
    end(m);
    qemu_img_check(&chain.top);
    assert_bytes_eq("leaf after exit", &raw_reference(&chain.top), &reference);
}

#[test]
fn exit_after_streamfs_umount() {
    require_fuse!();
    clean_exit(|m| m.umount());
}

#[test]
fn exit_after_system_umount() {
    require_fuse!();
    clean_exit(|m| m.system_umount());
}

#[test]
fn exit_after_sigterm() {
    require_fuse!();
    clean_exit(|m| m.terminate(libc::SIGTERM));
}

#[test]
fn exit_after_sigint() {
    require_fuse!();
    clean_exit(|m| m.terminate(libc::SIGINT));
}

/// SIGTERM while a file on the mount is still open: the daemon must still unmount and exit
/// within a few seconds, and the leaf (written by copy-on-read) must be consistent.
#[test]
fn exit_after_sigterm_with_open_file() {
    require_fuse!();
    let s = Scratch::new();
    let chain = three_layers(&s);
    let reference: Arc<[u8]> = raw_reference(&chain.top).into();
    let m = s.mount(&[&chain.top], &[]);
    let path = m.file("top.raw");
    let file = with_timeout("open", IO_TIMEOUT, move || File::open(path)).unwrap();
    let file = Arc::new(file);
    let (f, r) = (file.clone(), reference.clone());
    with_timeout("pread", IO_TIMEOUT, move || {
        check_pread(&f, &r, 3 * MIB, 2 * MIB as usize)
    })
    .unwrap();
    m.terminate(libc::SIGTERM);
    // The open descriptor now fails (or gives data) but must not hang.
    let f = file.clone();
    let _ = with_timeout("pread after exit", IO_TIMEOUT, move || {
        let mut buf = vec![0u8; 4096];
        std::os::unix::fs::FileExt::read_at(&*f, &mut buf, 0)
    });
    drop(file);
    qemu_img_check(&chain.top);
    assert_bytes_eq("leaf after SIGTERM", &raw_reference(&chain.top), &reference);
}

// ---------------------------------------------------------------------------------------------
// Detaching, the pid xattr, foreground, logs
// ---------------------------------------------------------------------------------------------

/// The pid xattr names the live daemon, which is the streamfs binary.
#[test]
fn pid_xattr_names_the_daemon() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "p.qcow2");
    let m = s.mount(&[&img], &["--read-only"]);
    let pid = read_pid_xattr(m.path()).expect("user.streamfs.pid");
    assert!(is_alive(pid), "pid {pid} from the xattr is not running");
    let exe = fs::read_link(format!("/proc/{pid}/exe")).unwrap();
    assert_eq!(exe, fs::canonicalize(streamfs_bin()).unwrap());
    m.umount();
    assert!(!is_alive(pid));
}

/// `mount` detaches from the caller: it exits and its stdout/stderr reach EOF (the daemon
/// does not keep the caller's pipes open, so `$(streamfs mount ...)` returns).
#[test]
fn mount_releases_callers_stdio() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "io.qcow2");
    let mp = s.new_mountpoint();
    let mut child = spawn_retrying(
        Command::new(streamfs_bin())
            .args(["mount", "--read-only", ps(&mp), ps(&img)])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped()),
    );
    let exited = wait_until(|| child.try_wait().unwrap().is_some(), MOUNT_TIMEOUT);
    if !exited {
        let _ = child.kill();
    }
    let status = child.wait().unwrap();
    // Adopt the mount (if any) first so it is cleaned up whatever happens next.
    let m = is_mounted(&mp).then(|| Mount::adopt(&mp));
    assert!(
        exited && status.success(),
        "mount exited={exited} status={status}"
    );
    let (mut out, mut err) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    with_timeout(
        "EOF on mount's stdout/stderr",
        Duration::from_secs(5),
        move || {
            use std::io::Read;
            let mut sink = Vec::new();
            out.read_to_end(&mut sink).unwrap();
            err.read_to_end(&mut sink).unwrap();
        },
    );
    m.expect("mounted").umount();
}

/// `--foreground` stays attached: the mount is live while the process runs, the xattr names
/// that very process, and SIGTERM ends it with exit 0 and the mount gone.
#[test]
fn foreground_stays_attached() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "fg.qcow2");
    let reference = raw_reference(&img);
    let mp = s.new_mountpoint();
    let log = s.join("fg.log");
    let mut cmd = Command::new(streamfs_bin());
    cmd.args([
        "mount",
        "--foreground",
        "--log-file",
        ps(&log),
        ps(&mp),
        ps(&img),
    ]);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let mut child = spawn_retrying(&mut cmd);
    let live = wait_until(|| is_mounted(&mp), MOUNT_TIMEOUT);
    if !live {
        let _ = child.kill();
        let _ = child.wait();
        panic!("--foreground mount did not become live within {MOUNT_TIMEOUT:?}");
    }
    let m = Mount::adopt(&mp);
    assert_eq!(
        m.pid(),
        child.id() as i32,
        "xattr pid vs foreground process"
    );
    assert!(
        child.try_wait().unwrap().is_none(),
        "--foreground process exited"
    );
    assert_bytes_eq("fg.raw", &read_file(&m.file("fg.raw")), &reference);
    m.signal(libc::SIGTERM);
    let exited = wait_until(|| child.try_wait().unwrap().is_some(), EXIT_TIMEOUT);
    let status = if exited {
        child.wait().unwrap()
    } else {
        Default::default()
    };
    assert!(
        exited,
        "--foreground process still running {EXIT_TIMEOUT:?} after SIGTERM"
    );
    assert!(
        status.success(),
        "--foreground exit status after SIGTERM: {status}"
    );
    m.assert_gone(EXIT_TIMEOUT);
    qemu_img_check(&img);
}

/// `--log-file PATH -v` writes a log; `--allow-other` shows in the mount options.
#[test]
fn log_file_and_allow_other() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "opt.qcow2");
    let log = s.join("daemon.log");
    let m = s.mount(&[&img], &["--allow-other", "--log-file", ps(&log), "-v"]);
    let info = mountinfo_line(m.path()).expect("mountinfo line");
    assert!(info.contains("allow_other"), "{info}");
    assert_eq!(read_file(&m.file("opt.raw")).len() as u64, 16 * MIB);
    m.umount();
    let text = fs::read_to_string(&log).expect("log file written");
    assert!(!text.trim().is_empty(), "log file {log:?} is empty with -v");
}
