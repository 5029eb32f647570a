//! Shared harness for the streamfs integration tests.
//!
//! Everything here talks to streamfs only through its command line (`streamfs mount`,
//! `streamfs umount`), the mounted files and the `user.streamfs.pid` xattr, and builds its
//! images with `qemu-img` / `qemu-io`, so the tests exercise the real binary end to end.
//!
//! Rules the helpers follow so that a broken daemon can never hang or litter the machine:
//! * every external command runs under [`run_with_timeout`];
//! * every access to a mounted file that could block goes through [`with_timeout`];
//! * a [`Mount`] cleans up in `Drop` (lazy unmount, then `kill -9` of the daemon) even when
//!   the test panicked, and every wait in that path is bounded.
//!
//! Typical use:
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn reads_back() {
//!     require_fuse!();
//!     let s = Scratch::new();
//!     let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
//!     write_pattern(&base, 0x11, 0, MIB);
//!     let top = Qcow2::new().backing(&base).create(&s.join("top.qcow2"));
//!     let reference = raw_reference(&top);
//!     let m = s.mount(&[&top], &["--read-only"]);
//!     assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
//!     m.umount();
//! }
//! ```
#![allow(dead_code, unused_macros, unused_imports)]

use std::cell::Cell;
use std::ffi::{CString, OsStr, OsString};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output, Stdio};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

pub use rand::rngs::StdRng;
pub use rand::{Rng, SeedableRng};

pub const KIB: u64 = 1024;
pub const MIB: u64 = 1024 * 1024;

/// Limit for one `streamfs mount` invocation.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(30);
/// Limit for one qemu-img / qemu-io invocation.
pub const QEMU_TIMEOUT: Duration = Duration::from_secs(60);
/// Limit for one (possibly large) read or other access through the mount.
pub const IO_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a daemon may take to exit after being told to ("within a few seconds").
pub const EXIT_TIMEOUT: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Environment
// ---------------------------------------------------------------------------------------------

/// Why FUSE tests cannot run here, or `None` when they can (root and /dev/fuse openable).
pub fn fuse_skip_reason() -> Option<String> {
    if unsafe { libc::geteuid() } != 0 {
        return Some("not running as root, cannot mount FUSE file systems".into());
    }
    match OpenOptions::new().read(true).write(true).open("/dev/fuse") {
        Ok(_) => None,
        Err(e) => Some(format!("cannot open /dev/fuse: {e}")),
    }
}

/// True when /dev/fuse is openable and we may mount (we are root).
pub fn fuse_available() -> bool {
    fuse_skip_reason().is_none()
}

/// Whether a FUSE test runs (`Ok(None)`), skips (`Ok(Some(reason))`), or must fail
/// (`Err`): under `CI=true` (or `1`) a test that cannot mount fails instead of skipping,
/// so CI cannot pass on skipped mount tests.
pub fn skip_decision(reason: Option<String>, ci: Option<&str>) -> Result<Option<String>, String> {
    match (reason, ci) {
        (None, _) => Ok(None),
        (Some(r), Some(c)) if c.eq_ignore_ascii_case("true") || c == "1" => {
            Err(format!("CI={c}: FUSE tests must run here, but {r}"))
        }
        (Some(r), _) => Ok(Some(r)),
    }
}

/// First statement of every FUSE test: prints `SKIP: <test>: <reason>` and returns early
/// when FUSE is unavailable (a local run without /dev/fuse), or fails under `CI=true`.
macro_rules! require_fuse {
    () => {
        let ci = std::env::var("CI").ok();
        match $crate::common::skip_decision($crate::common::fuse_skip_reason(), ci.as_deref()) {
            Ok(None) => {}
            Ok(Some(reason)) => {
                eprintln!("SKIP: {}: {}", $crate::common::test_name(), reason);
                return;
            }
            Err(why) => panic!("{}: {why}", $crate::common::test_name()),
        }
    };
}
pub(crate) use require_fuse;

/// Name of the running test (libtest names each test's thread after it).
pub fn test_name() -> String {
    thread::current().name().unwrap_or("unnamed").to_string()
}

/// Path of the streamfs binary under test.
pub fn streamfs_bin() -> &'static str {
    env!("CARGO_BIN_EXE_streamfs")
}

/// A path as `&str` (all harness paths are UTF-8); handy for building argument lists.
pub fn ps(p: &Path) -> &str {
    p.to_str().unwrap_or_else(|| panic!("non UTF-8 path {p:?}"))
}

// ---------------------------------------------------------------------------------------------
// Processes and timeouts
// ---------------------------------------------------------------------------------------------

/// Runs `cmd` (stdin from /dev/null) and returns its output; kills it after `timeout`, in
/// which case the status is the SIGKILL status and a note is appended to stderr.
/// Output goes through temporary files, not pipes, so a daemon that inherits (and keeps)
/// the child's stdout/stderr cannot make this wait for EOF.
pub fn run_with_timeout(mut cmd: Command, timeout: Duration) -> Output {
    let out = tempfile::tempfile().expect("tempfile for stdout");
    let err = tempfile::tempfile().expect("tempfile for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().unwrap())
        .stderr(err.try_clone().unwrap());
    let mut child = spawn_retrying(&mut cmd);
    let deadline = Instant::now() + timeout;
    let mut timed_out = false;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if Instant::now() >= deadline {
            timed_out = true;
            let _ = child.kill();
            break child.wait().expect("wait for killed child");
        }
        thread::sleep(Duration::from_millis(5));
    };
    let slurp = |mut f: File| {
        let mut v = Vec::new();
        f.seek(SeekFrom::Start(0)).unwrap();
        f.read_to_end(&mut v).unwrap();
        v
    };
    let stdout = slurp(out);
    let mut stderr = slurp(err);
    if timed_out {
        stderr.extend_from_slice(
            format!("\n[harness: {cmd:?} killed after {timeout:?} timeout]\n").as_bytes(),
        );
    }
    Output {
        status,
        stdout,
        stderr,
    }
}

/// Spawns `cmd`, retrying for up to 10 s while the program is missing or busy (ENOENT,
/// ETXTBSY: a concurrent `cargo build` may be relinking the binary).
pub fn spawn_retrying(cmd: &mut Command) -> std::process::Child {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match cmd.spawn() {
            Ok(child) => return child,
            Err(e)
                if matches!(e.raw_os_error(), Some(libc::ENOENT | libc::ETXTBSY))
                    && Instant::now() < deadline =>
            {
                thread::sleep(Duration::from_millis(100))
            }
            Err(e) => panic!("cannot run {cmd:?}: {e}"),
        }
    }
}

/// Runs `f` on a helper thread and returns its result, panicking if it takes longer than
/// `timeout` (the helper thread is abandoned; the `Mount` drop then kills the daemon, which
/// fails any FUSE request it is blocked in). Panics inside `f` are propagated.
pub fn with_timeout<T, F>(what: &str, timeout: Duration, f: F) -> T
where
    T: Send + 'static,
    F: FnOnce() -> T + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::channel();
    let handle = thread::Builder::new()
        .name(format!("{}:{what}", test_name()))
        .spawn(move || {
            let _ = tx.send(f());
        })
        .expect("spawn helper thread");
    match rx.recv_timeout(timeout) {
        Ok(v) => {
            let _ = handle.join();
            v
        }
        Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {
            panic!("timed out after {timeout:?}: {what}")
        }
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match handle.join() {
            Err(panic) => std::panic::resume_unwind(panic),
            Ok(()) => unreachable!("helper thread ended without a result"),
        },
    }
}

/// Polls `cond` every 10 ms until it is true (returns true) or `timeout` passed (false).
pub fn wait_until(mut cond: impl FnMut() -> bool, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if cond() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// True while process `pid` exists and is not a zombie.
pub fn is_alive(pid: i32) -> bool {
    match fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state is the first field after the parenthesised command name.
        Ok(stat) => match stat.rfind(')') {
            Some(i) => !matches!(stat[i + 1..].trim_start().chars().next(), Some('Z' | 'X')),
            None => true,
        },
        Err(_) => false,
    }
}

/// Sends signal `sig` to `pid` (errors ignored: the process may already be gone).
pub fn send_signal(pid: i32, sig: i32) {
    unsafe {
        libc::kill(pid, sig);
    }
}

/// Live processes (other than this one) whose command line mentions `needle`. Every test
/// keeps its images and mount points in a private scratch directory, so this finds the
/// daemons (and stray children) belonging to one test.
pub fn processes_mentioning(needle: &Path) -> Vec<i32> {
    let needle = needle.as_os_str().as_bytes();
    let me = std::process::id() as i32;
    let mut found = Vec::new();
    let Ok(dir) = fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if pid == me {
            continue;
        }
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        if cmdline.windows(needle.len()).any(|w| w == needle) && is_alive(pid) {
            found.push(pid);
        }
    }
    found
}

// ---------------------------------------------------------------------------------------------
// Mount table
// ---------------------------------------------------------------------------------------------

/// Decodes the octal escapes (`\040` ...) the kernel uses in /proc/self/mountinfo.
fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let b = field.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 4 <= b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            let v = b[i + 1..i + 4]
                .iter()
                .fold(0u32, |v, c| v * 8 + u32::from(c - b'0'));
            out.push(v as u8);
            i += 4;
            continue;
        }
        out.push(b[i]);
        i += 1;
    }
    out
}

/// `path` made absolute without touching the (possibly FUSE, possibly hung) final component.
fn absolute_no_follow(path: &Path) -> PathBuf {
    let abs = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap().join(path)
    };
    match (abs.parent(), abs.file_name()) {
        (Some(parent), Some(name)) => fs::canonicalize(parent)
            .unwrap_or_else(|_| parent.to_path_buf())
            .join(name),
        _ => abs,
    }
}

/// True when `path` is a mount point according to /proc/self/mountinfo.
pub fn is_mounted(path: &Path) -> bool {
    let want = absolute_no_follow(path);
    let info = fs::read_to_string("/proc/self/mountinfo").expect("read /proc/self/mountinfo");
    info.lines().any(|line| {
        line.split(' ')
            .nth(4)
            .is_some_and(|mp| unescape_mountinfo(mp) == want.as_os_str().as_bytes())
    })
}

/// The mountinfo line of the mount at `path` (for diagnostics), if any.
pub fn mountinfo_line(path: &Path) -> Option<String> {
    let want = absolute_no_follow(path);
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .find(|line| {
            line.split(' ')
                .nth(4)
                .is_some_and(|mp| unescape_mountinfo(mp) == want.as_os_str().as_bytes())
        })
        .map(str::to_string)
}

/// `umount -l DIR` (lazy detach; bounded); returns its output without checking it.
pub fn lazy_umount(dir: &Path) -> Output {
    let mut cmd = Command::new("umount");
    cmd.arg("-l").arg(dir);
    run_with_timeout(cmd, Duration::from_secs(10))
}

/// A tmpfs of `size` (e.g. "24m") mounted on a directory; lazily unmounted on drop.
pub struct Tmpfs {
    dir: PathBuf,
}

impl Tmpfs {
    /// Mounts the tmpfs on the existing directory `dir`; panics on failure.
    pub fn new(dir: PathBuf, size: &str) -> Tmpfs {
        let mut cmd = Command::new("mount");
        cmd.args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(&dir);
        let out = run_with_timeout(cmd, Duration::from_secs(10));
        assert!(
            out.status.success(),
            "mount tmpfs on {dir:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        if is_mounted(&self.dir) {
            lazy_umount(&self.dir);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Scratch directories
// ---------------------------------------------------------------------------------------------

/// A private temporary directory for one test (removed on drop). Keep images and mount
/// points inside it; declare it before any `Mount` so mounts are dropped first.
pub struct Scratch {
    dir: tempfile::TempDir,
    mounts: Cell<u32>,
}

impl Scratch {
    /// Creates `/tmp/streamfs-<test name>-XXXX`.
    pub fn new() -> Scratch {
        let name: String = test_name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("streamfs-{name}-"))
            .tempdir()
            .expect("create scratch dir");
        Scratch {
            dir,
            mounts: Cell::new(0),
        }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `path()/rel` (not created).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `path()/rel`, created (with parents) as a directory.
    pub fn subdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(&p).expect("create scratch subdir");
        p
    }

    /// A fresh empty directory to mount on (`mnt`, `mnt1`, ...).
    pub fn new_mountpoint(&self) -> PathBuf {
        let n = self.mounts.get();
        self.mounts.set(n + 1);
        self.subdir(if n == 0 {
            "mnt".to_string()
        } else {
            format!("mnt{n}")
        })
    }

    /// A [`MountCmd`] for a fresh mount point inside this directory.
    pub fn mount_cmd(&self) -> MountCmd {
        MountCmd::new().at(self.new_mountpoint())
    }

    /// Mounts `images` with `args` on a fresh mount point; panics (with stderr) on failure.
    pub fn mount<S: AsRef<OsStr>>(&self, images: &[S], args: &[&str]) -> Mount {
        self.mount_cmd()
            .args(args)
            .images(images)
            .run()
            .unwrap_or_else(|f| panic!("streamfs mount failed: {f}"))
    }

    /// Like [`Scratch::mount`] but returns the failure instead of panicking.
    pub fn try_mount<S: AsRef<OsStr>>(
        &self,
        images: &[S],
        args: &[&str],
    ) -> Result<Mount, MountFailure> {
        self.mount_cmd().args(args).images(images).run()
    }
}

// ---------------------------------------------------------------------------------------------
// Mounting
// ---------------------------------------------------------------------------------------------

/// A `streamfs mount` that failed cleanly (non-zero exit, nothing mounted, no process left).
#[derive(Debug)]
pub struct MountFailure {
    pub status: ExitStatus,
    pub stderr: String,
    pub elapsed: Duration,
}

impl std::fmt::Display for MountFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} after {:?}; stderr:\n{}",
            self.status, self.elapsed, self.stderr
        )
    }
}

/// Builder for one `streamfs mount [OPTIONS] MOUNTPOINT IMAGE...` invocation.
#[derive(Clone, Debug)]
pub struct MountCmd {
    mountpoint: Option<PathBuf>,
    args: Vec<OsString>,
    images: Vec<OsString>,
    cwd: Option<PathBuf>,
    timeout: Duration,
}

impl MountCmd {
    /// No mount point yet: one in a private temporary directory is used unless `at` is called.
    pub fn new() -> MountCmd {
        MountCmd {
            mountpoint: None,
            args: Vec::new(),
            images: Vec::new(),
            cwd: None,
            timeout: MOUNT_TIMEOUT,
        }
    }

    /// Mount on `mountpoint` (which the caller created, or deliberately did not).
    pub fn at(mut self, mountpoint: impl Into<PathBuf>) -> MountCmd {
        self.mountpoint = Some(mountpoint.into());
        self
    }

    /// Adds one option (`--read-only`, ...).
    pub fn arg(mut self, arg: impl AsRef<OsStr>) -> MountCmd {
        self.args.push(arg.as_ref().to_owned());
        self
    }

    /// Adds several options.
    pub fn args<S: AsRef<OsStr>>(mut self, args: &[S]) -> MountCmd {
        self.args.extend(args.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds an `IMAGE` argument (its default name is used).
    pub fn image(mut self, image: impl AsRef<OsStr>) -> MountCmd {
        self.images.push(image.as_ref().to_owned());
        self
    }

    /// Adds several `IMAGE` (or `NAME=IMAGE`) arguments verbatim.
    pub fn images<S: AsRef<OsStr>>(mut self, images: &[S]) -> MountCmd {
        self.images
            .extend(images.iter().map(|a| a.as_ref().to_owned()));
        self
    }

    /// Adds a `NAME=IMAGE` argument.
    pub fn named(mut self, name: &str, image: impl AsRef<Path>) -> MountCmd {
        let mut s = OsString::from(format!("{name}="));
        s.push(image.as_ref().as_os_str());
        self.images.push(s);
        self
    }

    /// Runs `streamfs mount` in `dir` (for relative image / mount point arguments).
    pub fn cwd(mut self, dir: impl Into<PathBuf>) -> MountCmd {
        self.cwd = Some(dir.into());
        self
    }

    /// Overrides [`MOUNT_TIMEOUT`].
    pub fn timeout(mut self, timeout: Duration) -> MountCmd {
        self.timeout = timeout;
        self
    }

    /// Runs the mount. `Ok` means exit 0 and the mount is live (checked in mountinfo).
    /// `Err` means a clean failure; a failure that leaves a mount or a process behind, or a
    /// "success" without a live mount, is a contract violation: cleaned up, then panics.
    pub fn run(self) -> Result<Mount, MountFailure> {
        let (own_dir, mountpoint) = match &self.mountpoint {
            Some(mp) => (None, mp.clone()),
            None => {
                let d = tempfile::Builder::new()
                    .prefix("streamfs-mnt-")
                    .tempdir()
                    .expect("create mount dir");
                let mp = d.path().join("mnt");
                fs::create_dir(&mp).unwrap();
                (Some(d), mp)
            }
        };
        // Paths relative to cwd are resolved here for our own bookkeeping.
        let mp_abs = match &self.cwd {
            Some(cwd) if mountpoint.is_relative() => cwd.join(&mountpoint),
            _ => mountpoint.clone(),
        };
        let mp_abs = absolute_no_follow(&mp_abs);
        let preexisting = processes_mentioning(&mp_abs);

        let mut cmd = Command::new(streamfs_bin());
        cmd.arg("mount")
            .args(&self.args)
            .arg(&mountpoint)
            .args(&self.images);
        if let Some(cwd) = &self.cwd {
            cmd.current_dir(cwd);
        }
        let started = Instant::now();
        let out = run_with_timeout(cmd, self.timeout);
        let elapsed = started.elapsed();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let describe = || {
            format!(
                "streamfs mount {:?} {:?} {:?} -> {} after {elapsed:?}; stderr:\n{stderr}",
                self.args, mountpoint, self.images, out.status
            )
        };
        let new_processes = || {
            processes_mentioning(&mp_abs)
                .into_iter()
                .filter(|p| !preexisting.contains(p))
                .collect::<Vec<_>>()
        };

        if !out.status.success() {
            let was_mounted = preexisting.is_empty() && is_mounted(&mp_abs);
            let quiet = wait_until(|| new_processes().is_empty(), EXIT_TIMEOUT);
            if was_mounted || !quiet {
                let left = new_processes();
                force_cleanup(&mp_abs, &left, was_mounted);
                panic!(
                    "failed mount left things behind (mounted: {was_mounted}, processes: {left:?}): {}",
                    describe()
                );
            }
            return Err(MountFailure {
                status: out.status,
                stderr,
                elapsed,
            });
        }

        if !is_mounted(&mp_abs) {
            let left = new_processes();
            force_cleanup(&mp_abs, &left, false);
            panic!(
                "streamfs mount exited 0 but {mp_abs:?} is not in /proc/self/mountinfo: {}",
                describe()
            );
        }
        let pid = match read_pid_xattr(&mp_abs) {
            Ok(pid) => pid,
            Err(e) => {
                let procs = new_processes();
                eprintln!(
                    "WARNING: {}: cannot read user.streamfs.pid on {mp_abs:?} ({e}); \
                     daemon candidates from /proc: {procs:?}",
                    test_name()
                );
                if procs.len() != 1 {
                    force_cleanup(&mp_abs, &procs, true);
                    panic!("cannot identify the streamfs daemon: {}", describe());
                }
                procs[0]
            }
        };
        Ok(Mount {
            mountpoint: mp_abs,
            pid,
            finished: false,
            mount_stderr: stderr,
            _own_dir: own_dir,
        })
    }
}

/// A failing mount must fail within this long.
pub const FAIL_FAST: Duration = Duration::from_secs(10);

/// Runs `cmd` and asserts it fails the way the contract says: non-zero exit within
/// [`FAIL_FAST`], one clear message on stderr (not a panic) that contains every string in
/// `mentions`, nothing left mounted, no process left (the last two are checked by
/// [`MountCmd::run`]). Returns stderr.
pub fn assert_mount_fails(cmd: MountCmd, mentions: &[&str]) -> String {
    let what = format!("{cmd:?}");
    let failure = match cmd.run() {
        Ok(m) => {
            let path = m.path().to_path_buf();
            drop(m);
            panic!("mount unexpectedly succeeded on {path:?}: {what}");
        }
        Err(f) => f,
    };
    let stderr = failure.stderr.trim();
    assert!(
        failure.elapsed < FAIL_FAST,
        "mount took {:?} to fail (limit {FAIL_FAST:?}): {failure}",
        failure.elapsed
    );
    assert!(!stderr.is_empty(), "mount failed silently: {failure}");
    assert!(
        !stderr.contains("panicked at") && !stderr.contains("RUST_BACKTRACE"),
        "mount failed with a panic instead of a message: {failure}"
    );
    for m in mentions {
        assert!(
            stderr.contains(m),
            "stderr does not mention {m:?}: {failure}"
        );
    }
    eprintln!("mount failed as expected: {stderr}");
    stderr.to_string()
}

/// Reads the daemon pid from the `user.streamfs.pid` xattr of the mount root (bounded).
pub fn read_pid_xattr(mountpoint: &Path) -> io::Result<i32> {
    let text = get_xattr(mountpoint, "user.streamfs.pid")?;
    let text = String::from_utf8_lossy(&text);
    text.trim().parse::<i32>().map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("user.streamfs.pid is {text:?}: {e}"),
        )
    })
}

/// `getxattr(path, name)` with [`IO_TIMEOUT`].
pub fn get_xattr(path: &Path, name: &str) -> io::Result<Vec<u8>> {
    let cpath = CString::new(path.as_os_str().as_bytes()).unwrap();
    let cname = CString::new(name).unwrap();
    with_timeout("getxattr", IO_TIMEOUT, move || {
        let mut buf = vec![0u8; 256];
        let n = unsafe {
            libc::getxattr(
                cpath.as_ptr(),
                cname.as_ptr(),
                buf.as_mut_ptr().cast(),
                buf.len(),
            )
        };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    })
}

/// Best-effort, bounded teardown: lazy unmount, then SIGKILL for `pids` still alive.
fn force_cleanup(mountpoint: &Path, pids: &[i32], unmount: bool) {
    if unmount && is_mounted(mountpoint) {
        let mut cmd = Command::new("umount");
        cmd.arg("-l").arg(mountpoint);
        let out = run_with_timeout(cmd, Duration::from_secs(10));
        if !out.status.success() && is_mounted(mountpoint) {
            let c = CString::new(mountpoint.as_os_str().as_bytes()).unwrap();
            unsafe {
                libc::umount2(c.as_ptr(), libc::MNT_DETACH);
            }
        }
    }
    if !wait_until(
        || pids.iter().all(|&p| !is_alive(p)),
        Duration::from_secs(3),
    ) {
        for &p in pids {
            if is_alive(p) {
                eprintln!("harness: kill -9 {p} (streamfs daemon for {mountpoint:?})");
                send_signal(p, libc::SIGKILL);
            }
        }
        wait_until(
            || pids.iter().all(|&p| !is_alive(p)),
            Duration::from_secs(3),
        );
    }
}

/// Runs an unmount command (with [`MOUNT_TIMEOUT`]), retrying for up to 3 s while it
/// fails with "busy". Tests run in parallel threads of one process, and every command
/// another test spawns briefly inherits this process's open files (until exec closes
/// them), which makes the kernel refuse an unmount with EBUSY for that instant.
fn unmount_retrying_busy(make: impl Fn() -> Command) -> Output {
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let out = run_with_timeout(make(), MOUNT_TIMEOUT);
        let busy = String::from_utf8_lossy(&out.stderr).contains("busy");
        if out.status.success() || !busy || Instant::now() >= deadline {
            return out;
        }
        thread::sleep(Duration::from_millis(50));
    }
}

/// A live streamfs mount. Dropping it without `umount()` (e.g. on panic) detaches the
/// mount and kills the daemon.
pub struct Mount {
    mountpoint: PathBuf,
    pid: i32,
    finished: bool,
    mount_stderr: String,
    _own_dir: Option<tempfile::TempDir>,
}

impl Mount {
    /// `streamfs mount ARGS MP IMAGES` on a mount point in a private temporary directory.
    pub fn new<S: AsRef<OsStr>>(images: &[S], extra_args: &[&str]) -> Result<Mount, MountFailure> {
        MountCmd::new().args(extra_args).images(images).run()
    }

    /// Same, on the given (existing) mount point.
    pub fn at<S: AsRef<OsStr>>(
        mountpoint: &Path,
        images: &[S],
        extra_args: &[&str],
    ) -> Result<Mount, MountFailure> {
        MountCmd::new()
            .at(mountpoint)
            .args(extra_args)
            .images(images)
            .run()
    }

    /// Takes charge of a streamfs mount made some other way (e.g. `--foreground`): the
    /// pid comes from the xattr. Panics if `mountpoint` is not mounted.
    pub fn adopt(mountpoint: &Path) -> Mount {
        let mountpoint = absolute_no_follow(mountpoint);
        assert!(is_mounted(&mountpoint), "{mountpoint:?} is not mounted");
        let pid = match read_pid_xattr(&mountpoint) {
            Ok(pid) => pid,
            Err(e) => {
                let procs = processes_mentioning(&mountpoint);
                force_cleanup(&mountpoint, &procs, true);
                panic!("cannot read user.streamfs.pid on {mountpoint:?}: {e}");
            }
        };
        Mount {
            mountpoint,
            pid,
            finished: false,
            mount_stderr: String::new(),
            _own_dir: None,
        }
    }

    /// The mount point (absolute).
    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    /// `MOUNTPOINT/name`.
    pub fn file(&self, name: &str) -> PathBuf {
        self.mountpoint.join(name)
    }

    /// `MOUNTPOINT/.control`.
    pub fn control(&self) -> PathBuf {
        self.mountpoint.join(".control")
    }

    /// The daemon pid (from the `user.streamfs.pid` xattr).
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// What `streamfs mount` printed on stderr (usually nothing).
    pub fn mount_stderr(&self) -> &str {
        &self.mount_stderr
    }

    /// True while the daemon process exists.
    pub fn daemon_alive(&self) -> bool {
        is_alive(self.pid)
    }

    /// Contents of `.control` (bounded).
    pub fn read_control(&self) -> String {
        String::from_utf8(read_file(&self.control())).expect(".control is not UTF-8")
    }

    /// `.control` parsed into one [`ControlLine`] per chain.
    pub fn control_lines(&self) -> Vec<ControlLine> {
        parse_control(&self.read_control())
    }

    /// Names in the mount root (bounded).
    pub fn list(&self) -> Vec<String> {
        let dir = self.mountpoint.clone();
        with_timeout("readdir", IO_TIMEOUT, move || {
            let mut v: Vec<String> = fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("readdir {dir:?}: {e}"))
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            v.sort();
            v
        })
    }

    /// Sends `sig` to the daemon.
    pub fn signal(&self, sig: i32) {
        send_signal(self.pid, sig)
    }

    /// `streamfs umount MP`: asserts it succeeds, that the daemon had already exited when
    /// it returned, and that the mount is gone.
    pub fn umount(mut self) {
        let out = unmount_retrying_busy(|| {
            let mut cmd = Command::new(streamfs_bin());
            cmd.arg("umount").arg(&self.mountpoint);
            cmd
        });
        assert!(
            out.status.success(),
            "streamfs umount {:?} failed: {}; stderr:\n{}",
            self.mountpoint,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            !is_alive(self.pid),
            "streamfs umount returned but daemon {} is still running",
            self.pid
        );
        assert!(
            !is_mounted(&self.mountpoint),
            "streamfs umount returned but {:?} is still mounted",
            self.mountpoint
        );
        self.finished = true;
    }

    /// Plain `umount MP` (the system tool); asserts success, then [`Mount::assert_gone`].
    pub fn system_umount(self) {
        let out = unmount_retrying_busy(|| {
            let mut cmd = Command::new("umount");
            cmd.arg(&self.mountpoint);
            cmd
        });
        assert!(
            out.status.success(),
            "umount {:?} failed: {}; stderr:\n{}",
            self.mountpoint,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        self.assert_gone(EXIT_TIMEOUT);
    }

    /// Sends `sig` to the daemon, then [`Mount::assert_gone`].
    pub fn terminate(self, sig: i32) {
        self.signal(sig);
        self.assert_gone(EXIT_TIMEOUT);
    }

    /// A crash: SIGKILL to the daemon (asserting it dies within [`EXIT_TIMEOUT`]), then
    /// `umount -l` of the dead mount (asserting success), then [`Mount::assert_gone`].
    /// `what` prefixes the failure messages.
    pub fn kill9_and_detach(self, what: &str) {
        let pid = self.pid;
        send_signal(pid, libc::SIGKILL);
        assert!(
            wait_until(|| !is_alive(pid), EXIT_TIMEOUT),
            "{what}: daemon {pid} survived SIGKILL"
        );
        let out = lazy_umount(&self.mountpoint);
        assert!(
            out.status.success(),
            "{what}: umount -l {:?}: {}; stderr:\n{}",
            self.mountpoint,
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        self.assert_gone(EXIT_TIMEOUT);
    }

    /// Asserts that within `timeout` the mount disappears and the daemon exits.
    pub fn assert_gone(mut self, timeout: Duration) {
        let gone = wait_until(
            || !is_mounted(&self.mountpoint) && !is_alive(self.pid),
            timeout,
        );
        assert!(
            gone,
            "after {timeout:?}: mounted={} daemon {} alive={}",
            is_mounted(&self.mountpoint),
            self.pid,
            is_alive(self.pid)
        );
        self.finished = true;
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let mut pids = processes_mentioning(&self.mountpoint);
        if !pids.contains(&self.pid) {
            pids.push(self.pid);
        }
        force_cleanup(&self.mountpoint, &pids, true);
    }
}

/// One line of `.control`: `NAME key=value ...`.
#[derive(Clone, Debug)]
pub struct ControlLine {
    pub name: String,
    pub fields: Vec<(String, String)>,
    pub raw: String,
}

impl ControlLine {
    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.fields
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

/// Parses `.control` text (tokens without `=` after the name are kept with an empty value).
pub fn parse_control(text: &str) -> Vec<ControlLine> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            let mut tokens = l.split_whitespace();
            let name = tokens.next().unwrap_or("").to_string();
            let fields = tokens
                .map(|t| match t.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => (t.to_string(), String::new()),
                })
                .collect();
            ControlLine {
                name,
                fields,
                raw: l.to_string(),
            }
        })
        .collect()
}

/// The file name streamfs gives a chain by default: `dir/vm1.qcow2` -> `vm1.raw`.
pub fn default_name(image: &Path) -> String {
    let name = Path::new(image.file_name().expect("image has a file name"));
    name.with_extension("raw").to_string_lossy().into_owned()
}

// ---------------------------------------------------------------------------------------------
// qemu-img / qemu-io
// ---------------------------------------------------------------------------------------------

/// Runs a tool with [`QEMU_TIMEOUT`] and returns stdout; panics with stderr on failure.
fn run_tool(tool: &str, args: &[&str]) -> String {
    let out = run_tool_output(tool, args);
    assert!(
        out.status.success(),
        "{tool} {args:?} failed: {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs a tool with [`QEMU_TIMEOUT`] and returns its raw output (no status check).
fn run_tool_output(tool: &str, args: &[&str]) -> Output {
    let mut cmd = Command::new(tool);
    cmd.args(args);
    run_with_timeout(cmd, QEMU_TIMEOUT)
}

/// `qemu-img ARGS`; returns stdout, panics with full stderr on failure.
pub fn qemu_img(args: &[&str]) -> String {
    run_tool("qemu-img", args)
}

/// `qemu-img ARGS` without the status check.
pub fn qemu_img_output(args: &[&str]) -> Output {
    run_tool_output("qemu-img", args)
}

/// True when qemu-io output reports a failed command: "... failed: ..." or a `-P` read's
/// "Pattern verification failed at ..." (which `aio_read` reports with exit status 0).
fn qemu_io_reports_failure(text: &str) -> bool {
    text.contains("failed:") || text.contains("Pattern verification failed")
}

/// `qemu-io ARGS`; returns stdout, panics with full stderr on failure (non-zero exit, a
/// command reporting "... failed:", or a pattern verification failure).
pub fn qemu_io(args: &[&str]) -> String {
    let out = run_tool_output("qemu-io", args);
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success()
            && !qemu_io_reports_failure(&stdout)
            && !qemu_io_reports_failure(&stderr),
        "qemu-io {args:?} failed: {}\nstdout:\n{stdout}\nstderr:\n{stderr}",
        out.status
    );
    stdout
}

/// "qcow2" when `path` starts with the qcow2 magic, else "raw".
pub fn image_format(path: &Path) -> &'static str {
    let mut magic = [0u8; 4];
    let ok = File::open(path).and_then(|mut f| f.read_exact(&mut magic));
    if ok.is_ok() && &magic == b"QFI\xfb" {
        "qcow2"
    } else {
        "raw"
    }
}

/// Runs qemu-io commands (`-c` each) on `image`, with its format given explicitly.
pub fn qemu_io_cmds(image: &Path, cmds: &[&str]) {
    let mut args = vec!["-f", image_format(image)];
    for c in cmds {
        args.push("-c");
        args.push(c);
    }
    args.push(ps(image));
    qemu_io(&args);
}

/// `write -P pattern off len`.
pub fn write_pattern(image: &Path, pattern: u8, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("write -P {pattern:#x} {off} {len}")]);
}

/// `write -z off len` (zero clusters / subclusters where the format allows).
pub fn write_zeroes(image: &Path, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("write -z {off} {len}")]);
}

/// `discard off len`.
pub fn discard(image: &Path, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("discard {off} {len}")]);
}

/// `write -c -P pattern off len` (compressed; whole clusters only).
pub fn write_compressed(image: &Path, pattern: u8, off: u64, len: u64) {
    qemu_io_cmds(image, &[&format!("write -c -P {pattern:#x} {off} {len}")]);
}

/// Creates a sparse raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> PathBuf {
    qemu_img(&["create", "-q", "-f", "raw", ps(path), &size.to_string()]);
    path.to_path_buf()
}

/// Writes `data` as a raw image file.
pub fn create_raw_from(path: &Path, data: &[u8]) -> PathBuf {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    path.to_path_buf()
}

/// Options for creating (or converting to) a qcow2 image; unset options use qemu defaults.
#[derive(Clone, Debug, Default)]
pub struct Qcow2 {
    size: Option<u64>,
    cluster_size: Option<u64>,
    compat: Option<String>,
    extended_l2: bool,
    compression_type: Option<String>,
    backing: Option<(String, String)>,
    extra: Vec<String>,
}

impl Qcow2 {
    pub fn new() -> Qcow2 {
        Qcow2::default()
    }
    /// Virtual size (default: the backing file's size).
    pub fn size(mut self, size: u64) -> Qcow2 {
        self.size = Some(size);
        self
    }
    pub fn cluster_size(mut self, bytes: u64) -> Qcow2 {
        self.cluster_size = Some(bytes);
        self
    }
    /// "0.10" (v2) or "1.1" (v3).
    pub fn compat(mut self, compat: &str) -> Qcow2 {
        self.compat = Some(compat.into());
        self
    }
    pub fn extended_l2(mut self, on: bool) -> Qcow2 {
        self.extended_l2 = on;
        self
    }
    /// "zlib" or "zstd".
    pub fn compression_type(mut self, t: &str) -> Qcow2 {
        self.compression_type = Some(t.into());
        self
    }
    /// Backing file by path, format detected from its magic; the name is stored as given
    /// (relative names are resolved by qemu relative to the new image's directory).
    pub fn backing(self, backing: &Path) -> Qcow2 {
        let fmt = image_format(backing);
        self.backing_name(ps(backing), fmt)
    }
    /// Backing file by the exact name to store, with an explicit format.
    pub fn backing_name(mut self, name: &str, fmt: &str) -> Qcow2 {
        self.backing = Some((name.into(), fmt.into()));
        self
    }
    /// Any other `-o key=value`.
    pub fn option(mut self, kv: &str) -> Qcow2 {
        self.extra.push(kv.into());
        self
    }

    /// The `-o` option string (may be empty).
    pub fn options_string(&self) -> String {
        let mut o = Vec::new();
        if let Some(c) = self.cluster_size {
            o.push(format!("cluster_size={c}"));
        }
        if let Some(c) = &self.compat {
            o.push(format!("compat={c}"));
        }
        if self.extended_l2 {
            o.push("extended_l2=on".into());
        }
        if let Some(c) = &self.compression_type {
            o.push(format!("compression_type={c}"));
        }
        o.extend(self.extra.iter().cloned());
        o.join(",")
    }

    /// `qemu-img create -f qcow2 ...`; returns `path`. Relative backing names are checked
    /// by qemu-img relative to `path`'s directory.
    pub fn create(&self, path: &Path) -> PathBuf {
        let opts = self.options_string();
        let size = self.size.map(|s| s.to_string());
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        if let Some((name, fmt)) = &self.backing {
            args.extend(["-b", name, "-F", fmt]);
        }
        args.push(ps(path));
        if let Some(s) = &size {
            args.push(s);
        }
        qemu_img(&args);
        path.to_path_buf()
    }

    /// `qemu-img convert [-c] -O qcow2 -o OPTS src path` (size and backing are ignored).
    pub fn convert_from(&self, src: &Path, path: &Path, compress: bool) -> PathBuf {
        let opts = self.options_string();
        let mut args = vec!["convert", "-q"];
        if compress {
            args.push("-c");
        }
        args.extend(["-f", image_format(src), "-O", "qcow2"]);
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        args.extend([ps(src), ps(path)]);
        qemu_img(&args);
        path.to_path_buf()
    }
}

/// `qemu-img convert -O raw image dst` (the whole chain flattened).
pub fn convert_to_raw(image: &Path, dst: &Path) {
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        image_format(image),
        "-O",
        "raw",
        ps(image),
        ps(dst),
    ]);
}

/// The flattened contents of the chain whose top is `image`, per qemu-img.
pub fn raw_reference(image: &Path) -> Vec<u8> {
    let dir = image.parent().unwrap_or(Path::new("."));
    let tmp = tempfile::Builder::new()
        .prefix(".reference-")
        .suffix(".raw")
        .tempfile_in(dir)
        .expect("reference temp file");
    convert_to_raw(image, tmp.path());
    fs::read(tmp.path()).expect("read reference")
}

/// `qemu-img rebase -u -b backing -F fmt image` (rewrites the backing name only).
pub fn rebase_unsafe(image: &Path, backing_name: &str, backing_fmt: &str) {
    qemu_img(&[
        "rebase",
        "-u",
        "-f",
        "qcow2",
        "-b",
        backing_name,
        "-F",
        backing_fmt,
        ps(image),
    ]);
}

/// Asserts `qemu-img check image` exits 0.
pub fn qemu_img_check(image: &Path) {
    let out = qemu_img_output(&["check", "-f", image_format(image), ps(image)]);
    assert!(
        out.status.success(),
        "qemu-img check {image:?} -> {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Exit code of a tool run and its stdout followed by its stderr.
fn code_and_text(out: &Output) -> (i32, String) {
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// Exit code and output of `qemu-img check -f qcow2 image` (0 clean, 3 leaks only, 2
/// corruption).
pub fn check_status(image: &Path) -> (i32, String) {
    code_and_text(&qemu_img_output(&["check", "-f", "qcow2", ps(image)]))
}

/// Like [`check_status`] for the qcow2 leaf alone: its backing files are not opened, so
/// this also works while a backing file is unreadable.
pub fn check_status_leaf_only(image: &Path) -> (i32, String) {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": ps(image)},
    });
    code_and_text(&qemu_img_output(&["check", &format!("json:{spec}")]))
}

/// Asserts `qemu-img compare` finds the chain of the qcow2 `image` and the raw file `raw`
/// identical (`what` says which comparison failed).
pub fn assert_identical_to_raw(what: &str, image: &Path, raw: &Path) {
    let out = qemu_img_output(&["compare", "-f", "qcow2", "-F", "raw", ps(image), ps(raw)]);
    assert!(
        out.status.success(),
        "{what}: qemu-img compare {image:?} {raw:?} -> {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `qemu-img info --output=json` of `image` (without the backing chain).
pub fn qemu_img_info(image: &Path) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "--output=json",
        "-f",
        image_format(image),
        ps(image),
    ]);
    serde_json::from_str(&out).expect("qemu-img info json")
}

/// Virtual size of `image`.
pub fn virtual_size(image: &Path) -> u64 {
    qemu_img_info(image)["virtual-size"]
        .as_u64()
        .expect("virtual-size")
}

/// One entry of `qemu-img map --output=json` (every field qemu-img prints, so equal maps
/// compare equal as vectors of entries).
#[derive(Clone, Debug, PartialEq)]
pub struct MapEntry {
    pub start: u64,
    pub length: u64,
    pub depth: u64,
    /// False where no layer of the chain allocates the range (true when not printed).
    pub present: bool,
    pub data: bool,
    pub zero: bool,
    pub compressed: bool,
    /// Host offset in the image file, when qemu-img reports one.
    pub offset: Option<u64>,
}

impl MapEntry {
    /// `start + length`.
    pub fn end(&self) -> u64 {
        self.start + self.length
    }
}

/// `qemu-img map --output=json image` (the whole chain, as qemu sees it).
pub fn qemu_img_map(image: &Path) -> Vec<MapEntry> {
    let out = qemu_img(&["map", "--output=json", "-f", image_format(image), ps(image)]);
    let v: serde_json::Value = serde_json::from_str(&out).expect("qemu-img map json");
    v.as_array()
        .expect("map is an array")
        .iter()
        .map(|e| MapEntry {
            start: e["start"].as_u64().unwrap(),
            length: e["length"].as_u64().unwrap(),
            depth: e["depth"].as_u64().unwrap_or(0),
            present: e["present"].as_bool().unwrap_or(true),
            data: e["data"].as_bool().unwrap_or(false),
            zero: e["zero"].as_bool().unwrap_or(false),
            compressed: e["compressed"].as_bool().unwrap_or(false),
            offset: e["offset"].as_u64(),
        })
        .collect()
}

/// Ranges qemu-img map reports as `"data": true`, adjacent ones merged.
pub fn map_data_extents(image: &Path) -> Vec<Range<u64>> {
    merge_ranges(
        qemu_img_map(image)
            .into_iter()
            .filter(|e| e.data)
            .map(|e| e.start..e.start + e.length),
    )
}

/// Merges touching or overlapping ranges (input in ascending order).
pub fn merge_ranges(ranges: impl IntoIterator<Item = Range<u64>>) -> Vec<Range<u64>> {
    let mut out: Vec<Range<u64>> = Vec::new();
    for r in ranges {
        if r.is_empty() {
            continue;
        }
        match out.last_mut() {
            Some(last) if r.start <= last.end => last.end = last.end.max(r.end),
            _ => out.push(r),
        }
    }
    out
}

/// Overwrites bytes of a file at `off` (for corrupting headers).
pub fn patch_bytes(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    f.write_all_at(bytes, off)
        .unwrap_or_else(|e| panic!("patch {path:?}@{off}: {e}"));
}

/// Writes a big-endian u32 at `off`.
pub fn patch_be32(path: &Path, off: u64, v: u32) {
    patch_bytes(path, off, &v.to_be_bytes());
}

/// Writes a big-endian u64 at `off`.
pub fn patch_be64(path: &Path, off: u64, v: u64) {
    patch_bytes(path, off, &v.to_be_bytes());
}

/// Reads a big-endian u64 at `off`.
pub fn read_be64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

// ---------------------------------------------------------------------------------------------
// Reading and comparing
// ---------------------------------------------------------------------------------------------

/// Reads a whole file (bounded by [`IO_TIMEOUT`]).
pub fn read_file(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    with_timeout(&format!("read {path:?}"), IO_TIMEOUT, move || {
        fs::read(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
    })
}

/// Index of the first differing byte (or the shorter length if one is a prefix).
pub fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Asserts `got == want`, reporting lengths and the first mismatch instead of the buffers.
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_mismatch(got, want) {
        let show = |b: &[u8]| {
            let end = (i + 16).min(b.len());
            format!("{:02x?}", &b[i.min(b.len())..end])
        };
        panic!(
            "{what}: differs at byte {i} (got len {}, want len {}); got {} want {}",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

/// A seed for this test's RNG: `STREAMFS_SEED` if set, else from the clock. Printed so a
/// failure can be reproduced.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("STREAMFS_SEED") {
        Ok(s) => s.parse().expect("STREAMFS_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!(
        "{}: seed {seed} (rerun with STREAMFS_SEED={seed})",
        test_name()
    );
    seed
}

/// Deterministic bytes from `seed` (incompressible test data).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// A random read `(offset, len)` biased towards interesting places: cluster and sector
/// boundaries (± a few bytes), the end of file and beyond it.
pub fn random_read(rng: &mut StdRng, size: u64, cluster: u64) -> (u64, usize) {
    let cluster = cluster.max(512);
    let max_len = (3 * cluster).clamp(64 * KIB, MIB);
    let off = match rng.gen_range(0..10) {
        0..=3 => {
            let k = rng.gen_range(0..=size / cluster);
            (k * cluster).saturating_add_signed(rng.gen_range(-3i64..=3))
        }
        4 => {
            let k = rng.gen_range(0..=size / 512);
            (k * 512).saturating_add_signed(rng.gen_range(-1i64..=1))
        }
        5 => size.saturating_sub(rng.gen_range(0..=2 * cluster)),
        6 => size + rng.gen_range(0..=2 * cluster),
        _ => rng.gen_range(0..size.max(1)),
    };
    let len = match rng.gen_range(0..6) {
        0 => rng.gen_range(1..=16),
        1 => 512,
        2 => cluster.min(MIB) as usize,
        _ => rng.gen_range(1..=max_len as usize),
    };
    (off, len)
}

/// One `pread` checked against `reference` like a regular file of `reference.len()` bytes:
/// a single call returns exactly the bytes before EOF (0 at or past EOF).
pub fn check_pread(file: &File, reference: &[u8], off: u64, len: usize) -> Result<(), String> {
    let size = reference.len() as u64;
    let want =
        &reference[off.min(size) as usize..(off.saturating_add(len as u64)).min(size) as usize];
    let mut buf = vec![0u8; len];
    let n = file
        .read_at(&mut buf, off)
        .map_err(|e| format!("pread(off={off}, len={len}) failed: {e}"))?;
    if n != want.len() {
        return Err(format!(
            "pread(off={off}, len={len}) returned {n} bytes, a regular file of {size} bytes returns {}",
            want.len()
        ));
    }
    match first_mismatch(&buf[..n], want) {
        Some(i) => Err(format!(
            "pread(off={off}, len={len}): wrong data at file offset {} (got {:#04x}, want {:#04x})",
            off + i as u64,
            buf[i],
            want[i]
        )),
        None => Ok(()),
    }
}

/// `count` random preads of `path` (see [`random_read`]) checked against `reference`;
/// panics with the seed on the first mismatch. Bounded by [`IO_TIMEOUT`].
pub fn check_random_preads(
    path: &Path,
    reference: Arc<[u8]>,
    cluster: u64,
    count: usize,
    seed: u64,
) {
    let p = path.to_path_buf();
    let err = with_timeout(
        &format!("random preads of {path:?}"),
        IO_TIMEOUT,
        move || {
            let file = File::open(&p).map_err(|e| format!("open {p:?}: {e}"))?;
            let mut rng = StdRng::seed_from_u64(seed);
            let size = reference.len() as u64;
            for i in 0..count {
                let (off, len) = random_read(&mut rng, size, cluster);
                check_pread(&file, &reference, off, len).map_err(|e| format!("read #{i}: {e}"))?;
            }
            Ok::<(), String>(())
        },
    );
    if let Err(e) = err {
        panic!("{path:?}: {e} (seed {seed})");
    }
}

/// `threads` threads doing random preads of `path` for `duration`, every read checked
/// against `reference`. Odd threads share one descriptor; even threads use O_DIRECT on
/// their own descriptor (aligned reads) to bypass the page cache. Returns the number of
/// reads done; panics with the seed on any mismatch.
pub fn check_concurrent_preads(
    path: &Path,
    reference: Arc<[u8]>,
    cluster: u64,
    threads: usize,
    duration: Duration,
    seed: u64,
) -> u64 {
    let p = path.to_path_buf();
    let result = with_timeout("concurrent preads", duration + IO_TIMEOUT, move || {
        let shared = Arc::new(File::open(&p).map_err(|e| format!("open {p:?}: {e}"))?);
        let deadline = Instant::now() + duration;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let reference = reference.clone();
                let shared = shared.clone();
                let p = p.clone();
                thread::spawn(move || -> Result<u64, String> {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
                    let size = reference.len() as u64;
                    let direct = t % 2 == 0;
                    let own = if direct {
                        Some(open_direct(&p).map_err(|e| format!("O_DIRECT open: {e}"))?)
                    } else {
                        None
                    };
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        if let Some(f) = &own {
                            let (off, len) = random_read(&mut rng, size, cluster);
                            let off = off / 4096 * 4096;
                            let len = len.div_ceil(4096) * 4096;
                            check_direct_pread(f, &reference, off, len)
                        } else {
                            let (off, len) = random_read(&mut rng, size, cluster);
                            check_pread(&shared, &reference, off, len)
                        }
                        .map_err(|e| format!("thread {t}: {e}"))?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| "reader thread panicked".to_string())??;
        }
        Ok::<u64, String>(total)
    });
    match result {
        Ok(n) => n,
        Err(e) => panic!("{path:?}: {e} (seed {seed})"),
    }
}

// ---------------------------------------------------------------------------------------------
// Writing
// ---------------------------------------------------------------------------------------------

/// `fallocate` mode that punches a hole (the file size is kept).
pub const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
/// `fallocate` mode that zeroes a range.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// `fallocate(2)` of `len` bytes at `off` of `file` with `mode` ([`PUNCH`], [`ZERO_RANGE`]).
pub fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `path` read-write (buffered; the file must exist).
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Fills `buf` with fast deterministic data derived from `seed` (splitmix64).
pub fn fill_splitmix(buf: &mut [u8], seed: u64) {
    let mut x = seed;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// `len` bytes of [`fill_splitmix`] data for `seed`.
pub fn splitmix_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_splitmix(&mut v, seed);
    v
}

// ---------------------------------------------------------------------------------------------
// O_DIRECT
// ---------------------------------------------------------------------------------------------

/// Opens `path` read-only with O_DIRECT.
pub fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Opens `path` read-write with O_DIRECT.
pub fn open_rw_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// A zeroed buffer of `len` bytes whose start is aligned to `align` (for O_DIRECT).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// One aligned O_DIRECT pread checked like [`check_pread`].
pub fn check_direct_pread(
    file: &File,
    reference: &[u8],
    off: u64,
    len: usize,
) -> Result<(), String> {
    let size = reference.len() as u64;
    let want =
        &reference[off.min(size) as usize..(off.saturating_add(len as u64)).min(size) as usize];
    let mut buf = AlignedBuf::new(len, 4096);
    let n = file
        .read_at(&mut buf, off)
        .map_err(|e| format!("O_DIRECT pread(off={off}, len={len}) failed: {e}"))?;
    if n != want.len() {
        return Err(format!(
            "O_DIRECT pread(off={off}, len={len}) returned {n} bytes, want {}",
            want.len()
        ));
    }
    match first_mismatch(&buf[..n], want) {
        Some(i) => Err(format!(
            "O_DIRECT pread(off={off}, len={len}): wrong data at file offset {}",
            off + i as u64
        )),
        None => Ok(()),
    }
}

/// Reads the whole file with O_DIRECT in aligned `chunk`-byte reads (chunk a multiple of
/// 4 KiB), until a short read; bounded by [`IO_TIMEOUT`].
pub fn read_file_direct(path: &Path, chunk: usize) -> Vec<u8> {
    assert!(chunk.is_multiple_of(4096) && chunk > 0);
    let p = path.to_path_buf();
    with_timeout(&format!("O_DIRECT read {path:?}"), IO_TIMEOUT, move || {
        let f = open_direct(&p).unwrap_or_else(|e| panic!("open {p:?} with O_DIRECT: {e}"));
        let mut buf = AlignedBuf::new(chunk, 4096);
        let mut out = Vec::new();
        loop {
            let n = f
                .read_at(&mut buf, out.len() as u64)
                .unwrap_or_else(|e| panic!("O_DIRECT read {p:?} at {}: {e}", out.len()));
            out.extend_from_slice(&buf[..n]);
            if n < chunk {
                break;
            }
        }
        out
    })
}

// ---------------------------------------------------------------------------------------------
// SEEK_DATA / SEEK_HOLE
// ---------------------------------------------------------------------------------------------

fn lseek(file: &File, off: u64, whence: i32) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `lseek(fd, off, SEEK_DATA)`; `Ok(None)` for ENXIO (no data at or after `off`).
pub fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    match lseek(file, off, libc::SEEK_DATA) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        r => r.map(Some),
    }
}

/// `lseek(fd, off, SEEK_HOLE)`; `Ok(None)` for ENXIO (`off` at or past EOF).
pub fn seek_hole(file: &File, off: u64) -> io::Result<Option<u64>> {
    match lseek(file, off, libc::SEEK_HOLE) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        r => r.map(Some),
    }
}

/// The data extents of a file of `size` bytes as SEEK_DATA/SEEK_HOLE report them.
pub fn data_extents_by_seek(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let Some(data) = seek_data(file, off)? else {
            break;
        };
        let hole = seek_hole(file, data)?.ok_or_else(|| {
            io::Error::other(format!("SEEK_HOLE({data}) after SEEK_DATA gave ENXIO"))
        })?;
        if hole <= data || hole > size {
            return Err(io::Error::other(format!(
                "SEEK_DATA({off})={data} then SEEK_HOLE({data})={hole} (size {size})"
            )));
        }
        out.push(data..hole);
        off = hole;
    }
    Ok(out)
}
