//! Child processes and bounded waits: every external command runs under
//! [`run_with_timeout`], every access that could block under [`with_timeout`].

use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::thread;
use std::time::{Duration, Instant};

use super::environment::test_name;

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
