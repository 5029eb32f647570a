//! The daemon's life cycle: validate everything in the foreground (so errors reach the
//! user's terminal), fork, mount in the child, tell the parent over a pipe once the mount
//! is live, then serve until unmounted or signalled. SIGTERM/SIGINT/SIGHUP unmount; the
//! file system's `destroy` stops jobs and flushes every leaf before the process exits.

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::chain::Chain;
use crate::fs::{StreamFs, CONTROL_NAME};
use crate::jobs::Jobs;
use crate::{Error, Result};

const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// (name in the mount, leaf image path)
    pub chains: Vec<(String, PathBuf)>,
    pub foreground: bool,
    pub read_only: bool,
    pub copy_on_read: bool,
    pub allow_other: bool,
    pub threads: usize,
    pub speed: u64,
    pub stream: bool,
}

/// Splits `[NAME=]IMAGE` and derives the default name (`vm1.qcow2` -> `vm1.raw`).
pub fn parse_chain_arg(arg: &str) -> Result<(String, PathBuf)> {
    // The first '=' separates NAME; a path containing '=' is given as NAME=PATH.
    if let Some((name, image)) = arg.split_once('=') {
        validate_name(name)?;
        if image.is_empty() {
            return Err(Error::Invalid(format!("'{arg}': missing IMAGE after '='")));
        }
        return Ok((name.to_string(), PathBuf::from(image)));
    }
    let path = PathBuf::from(arg);
    let stem = path
        .file_stem()
        .ok_or_else(|| Error::Invalid(format!("'{arg}' is not an image file name")))?;
    let name = format!("{}.raw", stem.to_string_lossy());
    validate_name(&name)?;
    Ok((name, path))
}

pub fn validate_name(name: &str) -> Result<()> {
    let bad = if name.is_empty() {
        Some("is empty")
    } else if name.contains('/') {
        Some("contains '/'")
    } else if name == CONTROL_NAME {
        Some("is reserved for the control file")
    } else if name == "." || name == ".." {
        Some("is not a file name")
    } else if name.chars().any(|c| c.is_whitespace() || c.is_control()) {
        Some("contains white space or control characters")
    } else if name.len() > 255 {
        Some("is longer than 255 bytes")
    } else {
        None
    };
    match bad {
        Some(why) => Err(Error::Invalid(format!("disk name '{name}' {why}"))),
        None => Ok(()),
    }
}

/// Mount points listed in /proc/self/mountinfo (octal escapes decoded).
pub fn mount_points() -> Vec<PathBuf> {
    let Ok(text) = std::fs::read_to_string("/proc/self/mountinfo") else {
        return Vec::new();
    };
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|p| PathBuf::from(unescape_mountinfo(p)))
        .collect()
}

fn unescape_mountinfo(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\'
            && i + 3 < b.len()
            && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c))
        {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

pub fn is_mount_point(path: &Path) -> bool {
    let Ok(canon) = std::fs::canonicalize(path) else {
        return false;
    };
    mount_points().contains(&canon)
}

fn check_mountpoint(mp: &Path) -> Result<PathBuf> {
    let meta = std::fs::metadata(mp).map_err(|e| {
        let hint = if e.raw_os_error() == Some(libc::ENOTCONN) {
            " (a dead FUSE mount: run 'umount -l' on it)"
        } else {
            ""
        };
        Error::Invalid(format!("mount point {}: {e}{hint}", mp.display()))
    })?;
    if !meta.is_dir() {
        return Err(Error::Invalid(format!(
            "mount point {} is not a directory",
            mp.display()
        )));
    }
    let canon = std::fs::canonicalize(mp)
        .map_err(|e| Error::Invalid(format!("mount point {}: {e}", mp.display())))?;
    let parent_dev = canon
        .parent()
        .and_then(|p| std::fs::metadata(p).ok())
        .map(|m| m.dev());
    if is_mount_point(&canon) || parent_dev.is_some_and(|d| d != meta.dev()) {
        return Err(Error::Invalid(format!(
            "mount point {} is already a mount point",
            mp.display()
        )));
    }
    Ok(canon)
}

/// Opens the chains and mounts. Returns the process exit code.
pub fn mount(opts: MountOptions) -> i32 {
    match prepare(&opts) {
        Ok((mountpoint, chains)) => {
            if opts.foreground {
                serve(&opts, &mountpoint, chains, None)
            } else {
                daemonize(&opts, &mountpoint, chains)
            }
        }
        Err(e) => {
            eprintln!("streamfs: {e}");
            1
        }
    }
}

fn prepare(opts: &MountOptions) -> Result<(PathBuf, Vec<Arc<Chain>>)> {
    if opts.chains.is_empty() {
        return Err(Error::Invalid("no IMAGE given".into()));
    }
    for (i, (name, _)) in opts.chains.iter().enumerate() {
        validate_name(name)?;
        if opts.chains[..i].iter().any(|(n, _)| n == name) {
            return Err(Error::Invalid(format!(
                "two disks are named '{name}' (use NAME=IMAGE)"
            )));
        }
    }
    let mountpoint = check_mountpoint(&opts.mountpoint)?;
    if !Path::new("/dev/fuse").exists() {
        return Err(Error::Invalid(
            "/dev/fuse does not exist (is the fuse module loaded?)".into(),
        ));
    }
    let mut chains = Vec::new();
    for (name, image) in &opts.chains {
        let chain = Chain::open(name, image, opts.read_only, opts.copy_on_read)?;
        log::info!(
            "{name}: {} ({} bytes, {} layers)",
            image.display(),
            chain.size(),
            chain.layers().len()
        );
        chains.push(Arc::new(chain));
    }
    // A leaf written through one disk must not be read through another.
    if !opts.read_only {
        for (i, a) in chains.iter().enumerate() {
            let leaf = a.layers()[0].file_id();
            for (j, b) in chains.iter().enumerate() {
                if i != j && b.layers().iter().any(|l| l.file_id() == leaf) {
                    return Err(Error::Invalid(format!(
                        "the leaf of '{}' ({}) is also part of the chain of '{}'",
                        a.name(),
                        a.layers()[0].image.path().display(),
                        b.name()
                    )));
                }
            }
        }
    }
    Ok((mountpoint, chains))
}

/// Forks; the parent waits for the child's "ready" (or its error) on a pipe.
fn daemonize(opts: &MountOptions, mountpoint: &Path, chains: Vec<Arc<Chain>>) -> i32 {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("streamfs: pipe: {}", std::io::Error::last_os_error());
        return 1;
    }
    // SAFETY: no other threads exist yet (chains spawn none), so fork is safe.
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        eprintln!("streamfs: fork: {}", std::io::Error::last_os_error());
        return 1;
    }
    if pid > 0 {
        // SAFETY: fds[1] is ours; closing it lets read() see EOF if the child dies.
        unsafe { libc::close(fds[1]) };
        // SAFETY: fds[0] is a valid fd we own from here on.
        let mut r = unsafe { File::from_raw_fd(fds[0]) };
        let mut msg = String::new();
        let _ = r.read_to_string(&mut msg);
        return match msg.strip_prefix("ok") {
            Some(_) => 0,
            None if msg.is_empty() => {
                eprintln!("streamfs: the daemon exited before the mount was ready");
                1
            }
            None => {
                eprintln!("streamfs: {}", msg.trim_end());
                1
            }
        };
    }
    // Child.
    // SAFETY: closing the parent's end, a valid fd we own.
    unsafe { libc::close(fds[0]) };
    // SAFETY: fds[1] is a valid fd we own.
    let mut ready = unsafe { File::from_raw_fd(fds[1]) };
    // setsid detaches from the terminal's session (a hangup there must not reach us);
    // chdir so the daemon does not keep the caller's directory busy (paths are absolute).
    // SAFETY: plain syscalls on a C string literal.
    let detached = unsafe { libc::setsid() } >= 0 && unsafe { libc::chdir(c"/".as_ptr()) } == 0;
    if !detached {
        let msg = format!("detaching the daemon: {}", std::io::Error::last_os_error());
        let _ = ready.write_all(msg.as_bytes());
        std::process::exit(1);
    }
    let code = serve(opts, mountpoint, chains, Some(ready));
    std::process::exit(code);
}

/// Points stdin/stdout/stderr at /dev/null (logging goes to --log-file if given).
fn detach_stdio() {
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard fds; `null` stays valid for the call.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
}

fn block_signals() -> libc::sigset_t {
    // SAFETY: plain signal-mask manipulation on a zeroed sigset.
    unsafe {
        let mut set: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut set);
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
            libc::sigaddset(&mut set, s);
        }
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
        set
    }
}

/// Mounts and runs the session until it ends. `ready` is the pipe to the waiting parent.
fn serve(
    opts: &MountOptions,
    mountpoint: &Path,
    chains: Vec<Arc<Chain>>,
    ready: Option<File>,
) -> i32 {
    // Every thread spawned from here on inherits the mask; one thread waits for signals.
    let sigset = block_signals();
    let jobs = Arc::new(Jobs::new(chains, opts.speed));
    let fs = StreamFs::new(jobs.clone());
    let mut config = fuser::Config::default();
    config.mount_options = vec![
        fuser::MountOption::FSName("streamfs".into()),
        fuser::MountOption::Subtype("streamfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if opts.allow_other {
        config.acl = fuser::SessionACL::All;
    }
    config.n_threads = Some(opts.threads.max(1));
    config.clone_fd = true;
    let session = match fuser::Session::new(fs, mountpoint, &config) {
        Ok(s) => s,
        Err(e) => {
            let msg = format!("mounting {}: {e}", mountpoint.display());
            match ready {
                Some(mut r) => {
                    let _ = r.write_all(msg.as_bytes());
                }
                None => eprintln!("streamfs: {msg}"),
            }
            return 1;
        }
    };
    log::info!("mounted {}", mountpoint.display());
    if opts.stream {
        for c in jobs.chains() {
            let cmd = crate::control::Command::Start {
                name: c.name().to_string(),
                base: None,
                speed: None,
                offset: None,
                length: None,
            };
            if let Err(e) = crate::control::execute(&jobs, cmd) {
                log::error!("{}: cannot start stream: {e}", c.name());
            }
        }
    }
    let jobs_for_checkpoints = jobs.clone();
    let _ = std::thread::Builder::new()
        .name("checkpoint".into())
        .spawn(move || checkpoints(&jobs_for_checkpoints));
    let mp = mountpoint.to_path_buf();
    let jobs_for_signals = jobs.clone();
    let _ = std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || wait_for_signal(sigset, &mp, &jobs_for_signals));
    if let Some(mut r) = ready {
        let _ = r.write_all(b"ok");
        drop(r);
        detach_stdio();
    }
    match session.run() {
        Ok(()) => {
            log::info!("unmounted {}", mountpoint.display());
            0
        }
        Err(e) => {
            log::error!("session ended with an error: {e}");
            1
        }
    }
}

/// Writes dirty leaf metadata back every few seconds: guest writes that were never
/// fsync'd still reach a consistent on-disk state soon, and dirty tables stay few.
fn checkpoints(jobs: &Jobs) {
    loop {
        std::thread::sleep(CHECKPOINT_INTERVAL);
        for chain in jobs.chains() {
            if let Err(e) = chain.checkpoint() {
                log::error!("{}: checkpoint: {e}", chain.name());
            }
        }
    }
}

/// On SIGTERM/SIGINT/SIGHUP: detach the mount. With no open files the kernel ends the
/// connection at once and `run` returns (flushing in `destroy`). If files stay open, the
/// connection is aborted through fusectl; failing that, jobs are stopped, leaves flushed
/// and the process exits after a grace period.
fn wait_for_signal(set: libc::sigset_t, mountpoint: &Path, jobs: &Jobs) {
    let mut sig = 0;
    // SAFETY: sigwait on the blocked set; `sig` receives the signal number.
    unsafe { libc::sigwait(&set, &mut sig) };
    log::info!("signal {sig}: unmounting {}", mountpoint.display());
    let dev = std::fs::metadata(mountpoint).map(|m| m.dev()).ok();
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).expect("no NUL in path");
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), 0) } != 0 {
        if let Some(dev) = dev {
            abort_connection(dev);
        }
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
    std::thread::sleep(Duration::from_secs(3));
    log::warn!("session still busy after unmount; flushing and exiting");
    jobs.shutdown();
    for chain in jobs.chains() {
        if let Err(e) = chain.flush_all() {
            log::error!("{}: final flush failed: {e}", chain.name());
        }
    }
    std::process::exit(0);
}

/// Aborts a FUSE connection via fusectl (mounting it if needed), so open files fail and
/// the session ends.
fn abort_connection(dev: u64) {
    let dir = Path::new("/sys/fs/fuse/connections");
    let minor = libc::minor(dev as libc::dev_t);
    let abort = dir.join(minor.to_string()).join("abort");
    if !abort.exists() {
        let _ = std::process::Command::new("mount")
            .args(["-t", "fusectl", "fusectl"])
            .arg(dir)
            .status();
    }
    if let Ok(mut f) = std::fs::OpenOptions::new().write(true).open(&abort) {
        let _ = f.write_all(b"1");
    }
}

/// Reads the daemon pid from the mount's root xattr.
pub fn daemon_pid(mountpoint: &Path) -> Option<i32> {
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).ok()?;
    let name = std::ffi::CString::new(crate::fs::PID_XATTR).ok()?;
    let mut buf = [0u8; 32];
    // SAFETY: getxattr writes at most buf.len() bytes into buf.
    let n = unsafe {
        libc::getxattr(
            c.as_ptr(),
            name.as_ptr(),
            buf.as_mut_ptr().cast(),
            buf.len(),
        )
    };
    if n <= 0 {
        return None;
    }
    std::str::from_utf8(&buf[..n as usize])
        .ok()?
        .trim()
        .parse()
        .ok()
}

fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // A zombie has exited; it only waits to be reaped.
        Ok(stat) => !stat
            .rsplit(')')
            .next()
            .unwrap_or("")
            .trim_start()
            .starts_with('Z'),
        Err(_) => false,
    }
}

/// `streamfs umount`: unmounts and waits for the daemon to exit (so the leaf is flushed).
pub fn umount(mountpoint: &Path, lazy: bool, timeout: Duration) -> Result<()> {
    let pid = daemon_pid(mountpoint);
    if pid.is_none() && !is_mount_point(mountpoint) {
        return Err(Error::Invalid(format!(
            "{} is not mounted",
            mountpoint.display()
        )));
    }
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes())
        .map_err(|_| Error::Invalid("mount point contains a NUL byte".into()))?;
    let flags = if lazy { libc::MNT_DETACH } else { 0 };
    // SAFETY: umount2 with a valid C string.
    if unsafe { libc::umount2(c.as_ptr(), flags) } != 0 {
        let e = std::io::Error::last_os_error();
        match e.raw_os_error() {
            Some(libc::EPERM) => {
                let mut cmd = std::process::Command::new("fusermount3");
                cmd.arg("-u");
                if lazy {
                    cmd.arg("-z");
                }
                let ok = cmd.arg(mountpoint).status().is_ok_and(|s| s.success());
                if !ok {
                    return Err(Error::io(mountpoint, "unmount", e));
                }
            }
            Some(libc::EBUSY) => {
                return Err(Error::Invalid(format!(
                    "{} is busy (files are open); close them or use --lazy",
                    mountpoint.display()
                )))
            }
            _ => return Err(Error::io(mountpoint, "unmount", e)),
        }
    }
    if let Some(pid) = pid {
        let deadline = Instant::now() + timeout;
        while process_alive(pid) {
            if Instant::now() >= deadline {
                return Err(Error::Invalid(format!(
                    "unmounted, but daemon {pid} has not exited after {}s",
                    timeout.as_secs()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chain_args_and_names() {
        assert_eq!(
            parse_chain_arg("/images/vm1.qcow2").unwrap(),
            ("vm1.raw".into(), "/images/vm1.qcow2".into())
        );
        assert_eq!(
            parse_chain_arg("disk").unwrap(),
            ("disk.raw".into(), "disk".into())
        );
        assert_eq!(parse_chain_arg("a.b.qcow2").unwrap().0, "a.b.raw");
        assert_eq!(
            parse_chain_arg("root=x/y.qcow2").unwrap(),
            ("root".into(), "x/y.qcow2".into())
        );
        assert!(
            parse_chain_arg("/tmp/a=b/c.qcow2").is_err(),
            "a NAME with '/'"
        );
        assert_eq!(
            parse_chain_arg("d=/tmp/a=b/c.qcow2").unwrap(),
            ("d".into(), "/tmp/a=b/c.qcow2".into())
        );
        assert!(parse_chain_arg(".control=x.qcow2").is_err());
        assert!(parse_chain_arg("=x.qcow2").is_err());
        assert!(parse_chain_arg("a b=x.qcow2").is_err());
        assert!(parse_chain_arg("name=").is_err());
    }

    #[test]
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
