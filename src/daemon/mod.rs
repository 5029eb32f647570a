//! The daemon's life cycle: validate everything in the foreground (so errors reach the
//! user's terminal), fork, mount in the child, tell the parent over a pipe once the mount
//! is live, then serve until unmounted or signalled. SIGTERM/SIGINT/SIGHUP unmount; the
//! file system's `destroy` stops jobs and flushes every leaf before the process exits.
//! `names` checks disk names; `mounts` looks at mount points from outside (umount).

mod mounts;
mod names;

use self::mounts::check_mountpoint;
pub use self::mounts::{daemon_pid, is_mount_point, mount_points, umount};
pub use self::names::{parse_chain_arg, validate_name};

use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, FromRawFd};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::chain::Chain;
use crate::fs::StreamFs;
use crate::jobs::Jobs;
use crate::{Error, Result};

const CHECKPOINT_INTERVAL: Duration = Duration::from_secs(5);

pub struct MountOptions {
    pub mountpoint: PathBuf,
    /// (name in the mount, leaf image path)
    pub chains: Vec<(String, PathBuf)>,
    pub foreground: bool,
    pub read_only: bool,
    /// Skip the image-lock test (read-only mounts only).
    pub force_share: bool,
    /// Directories backing files must lie in (empty: anywhere).
    pub backing_dirs: Vec<PathBuf>,
    pub no_remote: bool,
    pub allow_remote: Vec<String>,
    /// `--remote-timeout`, `--ca-file`.
    pub remote: crate::source::RemoteOptions,
    pub copy_on_read: bool,
    pub allow_other: bool,
    pub threads: usize,
    pub speed: u64,
    pub stream: bool,
    /// When streams may run, the total cap, the job queue.
    pub policy: crate::jobs::Policy,
}

/// Opens the chains and mounts. Returns the process exit code.
pub fn mount(opts: MountOptions) -> i32 {
    let prepared = prepare(&opts);
    match prepared {
        Ok(mountpoint) if opts.foreground => match open_chains(&opts) {
            Ok(chains) => serve(&opts, &mountpoint, chains, None),
            Err(e) => {
                eprintln!("streamfs: {e}");
                1
            }
        },
        Ok(mountpoint) => daemonize(&opts, &mountpoint),
        Err(e) => {
            eprintln!("streamfs: {e}");
            1
        }
    }
}

/// Checks the arguments and sets the rules for opening images.
fn prepare(opts: &MountOptions) -> Result<PathBuf> {
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
    if opts.force_share && !opts.read_only {
        return Err(Error::Invalid("--force-share needs --read-only".into()));
    }
    let mut backing_dirs = Vec::new();
    for d in &opts.backing_dirs {
        let real = std::fs::canonicalize(d)
            .map_err(|e| Error::Invalid(format!("--backing-dir {}: {e}", d.display())))?;
        if !real.is_dir() {
            return Err(Error::Invalid(format!(
                "--backing-dir {}: not a directory",
                d.display()
            )));
        }
        backing_dirs.push(real);
    }
    if let Some(ca) = &opts.remote.ca_file {
        std::fs::File::open(ca)
            .map_err(|e| Error::Invalid(format!("--ca-file {}: {e}", ca.display())))?;
    }
    crate::chain::open::set_policy(crate::chain::open::OpenPolicy {
        force_share: opts.force_share,
        backing_dirs,
        no_remote: opts.no_remote,
        allow_remote: opts.allow_remote.clone(),
        remote: opts.remote.clone(),
    });
    Ok(mountpoint)
}

/// Opens every chain. In the daemon process itself: remote layers keep connections
/// and threads, which a fork would not carry over.
fn open_chains(opts: &MountOptions) -> Result<Vec<Arc<Chain>>> {
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
                if i != j && leaf.is_some() && b.layers().iter().any(|l| l.file_id() == leaf) {
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
    Ok(chains)
}

/// Forks; the child opens the chains and mounts, and the parent waits for its "ready"
/// (or its error) on a pipe.
fn daemonize(opts: &MountOptions, mountpoint: &Path) -> i32 {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two fds into the array.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        eprintln!("streamfs: pipe: {}", std::io::Error::last_os_error());
        return 1;
    }
    // SAFETY: no other threads exist yet (chains are opened in the child), so fork is safe.
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
    // setsid detaches from the terminal's session (a hangup there must not reach us).
    // SAFETY: a plain syscall.
    if unsafe { libc::setsid() } < 0 {
        let msg = format!("detaching the daemon: {}", std::io::Error::last_os_error());
        let _ = ready.write_all(msg.as_bytes());
        std::process::exit(1);
    }
    // Opened before the chdir: image paths on the command line may be relative.
    let chains = match open_chains(opts) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.write_all(e.to_string().as_bytes());
            std::process::exit(1);
        }
    };
    // chdir so the daemon does not keep the caller's directory busy (paths are absolute).
    // SAFETY: a plain syscall on a C string literal.
    if unsafe { libc::chdir(c"/".as_ptr()) } != 0 {
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
        for s in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGUSR1] {
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
    let jobs = Arc::new(Jobs::new(chains, Arc::default(), opts.speed, opts.policy));
    let io_errors = Arc::new(crate::events::IoErrors::default());
    let fs = StreamFs::new(jobs.clone(), io_errors.clone());
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
                idle: None,
            };
            if let Err(e) = crate::control::execute(&jobs, cmd) {
                log::error!("{}: cannot start stream: {e}", c.name());
            }
        }
    }
    let (bus, errs) = (jobs.bus().clone(), io_errors.clone());
    let jobs_for_checkpoints = jobs.clone();
    let mp = mountpoint.to_path_buf();
    let jobs_for_signals = jobs.clone();
    // Without them the mount would run without periodic write-back or clean shutdown on
    // signals: a thread that cannot start fails the mount (the session unmounts on drop).
    let started = spawn("io-errors", move || errs.run_flusher(&bus))
        .and_then(|_| spawn("checkpoint", move || checkpoints(&jobs_for_checkpoints)))
        .and_then(|_| {
            spawn("signals", move || {
                wait_for_signal(sigset, &mp, &jobs_for_signals)
            })
        });
    if let Err(msg) = started {
        match ready {
            Some(mut r) => {
                let _ = r.write_all(msg.as_bytes());
            }
            None => eprintln!("streamfs: {msg}"),
        }
        jobs.shutdown();
        return 1;
    }
    if let Some(mut r) = ready {
        let _ = r.write_all(b"ok");
        drop(r);
        detach_stdio();
    }
    let code = match session.run() {
        Ok(()) => {
            log::info!("unmounted {}", mountpoint.display());
            0
        }
        Err(e) => {
            log::error!("session ended with an error: {e}");
            1
        }
    };
    // Leaves were flushed in `destroy`; let others at the images before we are gone.
    crate::format::lock::release_all();
    code
}

/// Starts a daemon thread that runs for the life of the mount.
fn spawn(name: &str, f: impl FnOnce() + Send + 'static) -> std::result::Result<(), String> {
    std::thread::Builder::new()
        .name(name.into())
        .spawn(f)
        .map(drop)
        .map_err(|e| format!("starting the {name} thread: {e}"))
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
            jobs.after_write(chain);
        }
    }
}

/// On SIGTERM/SIGINT/SIGHUP: detach the mount. With no open files the kernel ends the
/// connection at once and `run` returns (flushing in `destroy`). If files stay open, the
/// connection is aborted through fusectl; failing that, jobs are stopped, leaves flushed
/// and the process exits after a grace period.
fn wait_for_signal(set: libc::sigset_t, mountpoint: &Path, jobs: &Jobs) {
    let mut sig = 0;
    loop {
        // SAFETY: sigwait on the blocked set; `sig` receives the signal number.
        unsafe { libc::sigwait(&set, &mut sig) };
        // `.events` readers keep the mount busy: end them first (end-of-file), and
        // give them a moment to close. SIGUSR1 (from `streamfs umount`) does only that.
        jobs.bus().close();
        if sig != libc::SIGUSR1 {
            break;
        }
        log::info!("ending .events readers before an unmount");
    }
    log::info!("signal {sig}: unmounting {}", mountpoint.display());
    let dev = std::fs::metadata(mountpoint).map(|m| m.dev()).ok();
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_bytes()).expect("no NUL in path");
    // SAFETY: umount2 with a valid C string.
    let umount = || unsafe { libc::umount2(c.as_ptr(), 0) } == 0;
    let deadline = Instant::now() + Duration::from_millis(500);
    let mut unmounted = umount();
    while !unmounted && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
        unmounted = umount();
    }
    if !unmounted {
        // Detach first, then abort: aborting ends the session, and the process may exit
        // before a detach that came second, leaving a dead mount behind.
        // SAFETY: as above.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
        if let Some(dev) = dev {
            abort_connection(dev);
        }
    }
    std::thread::sleep(Duration::from_secs(3));
    log::warn!("session still busy after unmount; flushing and exiting");
    jobs.shutdown();
    for chain in jobs.chains() {
        if let Err(e) = chain.flush_all() {
            log::error!("{}: final flush failed: {e}", chain.name());
        }
    }
    crate::format::lock::release_all();
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
