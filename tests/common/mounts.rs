//! Mounting and unmounting: the mount table, `streamfs mount` ([`MountCmd`]) and the live
//! [`Mount`] that cleans up after itself, tmpfs for out-of-space tests, the pid xattr.

use std::ffi::{CString, OsStr, OsString};
use std::fs;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Output};
use std::thread;
use std::time::{Duration, Instant};

use super::environment::{streamfs_bin, test_name, EXIT_TIMEOUT, IO_TIMEOUT, MOUNT_TIMEOUT};
use super::processes::{
    is_alive, processes_mentioning, run_with_timeout, send_signal, wait_until, with_timeout,
};

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

/// The file name streamfs gives a chain by default: `dir/vm1.qcow2` -> `vm1.raw`.
pub fn default_name(image: &Path) -> String {
    let name = Path::new(image.file_name().expect("image has a file name"));
    name.with_extension("raw").to_string_lossy().into_owned()
}
