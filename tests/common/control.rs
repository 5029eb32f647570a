//! The `.control` file client: commands written to it (checking the errno and the
//! answer), its status lines parsed, and polling a job's status until a condition holds.

use std::ffi::CString;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::thread;
use std::time::{Duration, Instant};

use super::environment::IO_TIMEOUT;
use super::file_io::read_file;
use super::mounts::Mount;
use super::processes::with_timeout;

impl Mount {
    /// Contents of `.control` (bounded).
    pub fn read_control(&self) -> String {
        String::from_utf8(read_file(&self.control())).expect(".control is not UTF-8")
    }

    /// `.control` parsed into one [`ControlLine`] per chain.
    pub fn control_lines(&self) -> Vec<ControlLine> {
        parse_control(&self.read_control())
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

/// `p` as a C string (for libc calls).
fn cpath(p: &Path) -> CString {
    CString::new(p.as_os_str().as_bytes()).unwrap()
}

/// `ENAME(n: message)` for an errno, for failure messages.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::EBUSY => "EBUSY",
        libc::ESRCH => "ESRCH",
        libc::EROFS => "EROFS",
        libc::EIO => "EIO",
        _ => "",
    };
    format!("{name}({e}: {})", std::io::Error::from_raw_os_error(e))
}

/// Opens `.control` (`path`) with `flags` (named `how` in the failure message) and
/// writes `bytes` in one write(). Returns the descriptor (for the caller to close) and Ok,
/// or the errno of the failed write. The open must succeed and the write not be short.
fn open_and_write(path: &CString, flags: i32, how: &str, bytes: &[u8]) -> (i32, Result<(), i32>) {
    let fd = unsafe { libc::open(path.as_ptr(), flags | libc::O_CLOEXEC) };
    assert!(
        fd >= 0,
        "open .control {how} failed: {}",
        std::io::Error::last_os_error()
    );
    let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
    let r = if n < 0 {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap())
    } else {
        assert_eq!(n as usize, bytes.len(), "short write to .control");
        Ok(())
    };
    (fd, r)
}

/// Writes `bytes` in one write() to `.control` opened O_WRONLY|O_TRUNC (like the shell's
/// `echo ... > .control`). Ok, or the errno of the failed write (the open must succeed).
pub fn ctl_raw(m: &Mount, bytes: &[u8]) -> Result<(), i32> {
    let path = cpath(&m.control());
    let bytes = bytes.to_vec();
    with_timeout(".control write", IO_TIMEOUT, move || {
        let (fd, r) = open_and_write(
            &path,
            libc::O_WRONLY | libc::O_TRUNC,
            "O_WRONLY|O_TRUNC",
            &bytes,
        );
        unsafe { libc::close(fd) };
        r
    })
}

/// Like [`ctl_raw`] with `cmd\n`.
pub fn ctl(m: &Mount, cmd: &str) -> Result<(), i32> {
    ctl_raw(m, format!("{cmd}\n").as_bytes())
}

/// Opens `.control` O_RDWR, writes `bytes` in one write(), then read()s the answer on the
/// same descriptor (the file position is then past the command). Returns the write result
/// and the answer.
pub fn ctl_answer_raw(m: &Mount, bytes: &[u8]) -> (Result<(), i32>, String) {
    let path = cpath(&m.control());
    let bytes = bytes.to_vec();
    with_timeout(".control write+read", IO_TIMEOUT, move || unsafe {
        let (fd, r) = open_and_write(&path, libc::O_RDWR, "O_RDWR", &bytes);
        let mut buf = vec![0u8; 8192];
        let mut got = Vec::new();
        loop {
            let k = libc::read(fd, buf.as_mut_ptr().cast(), buf.len());
            assert!(
                k >= 0,
                "read of the answer failed: {}",
                std::io::Error::last_os_error()
            );
            if k == 0 {
                break;
            }
            got.extend_from_slice(&buf[..k as usize]);
        }
        libc::close(fd);
        (r, String::from_utf8_lossy(&got).into_owned())
    })
}

/// Like [`ctl_answer_raw`] with `cmd\n`.
pub fn ctl_answer(m: &Mount, cmd: &str) -> (Result<(), i32>, String) {
    ctl_answer_raw(m, format!("{cmd}\n").as_bytes())
}

/// Sends `cmd` (O_RDWR), asserting the write succeeds and the answer is `ok\n`.
pub fn ctl_ok(m: &Mount, cmd: &str) {
    let (r, answer) = ctl_answer(m, cmd);
    assert!(
        r.is_ok(),
        "{cmd:?} failed with {} (answer {answer:?}); status:\n{}",
        errno_name(r.unwrap_err()),
        m.read_control()
    );
    assert_eq!(answer, "ok\n", "answer to {cmd:?}");
}

/// Asserts `cmd` fails with `errno`, both via O_WRONLY|O_TRUNC and via O_RDWR, and that
/// the answer read back on the O_RDWR descriptor is one `error: REASON` line.
pub fn ctl_fails_raw(m: &Mount, bytes: &[u8], errno: i32) {
    let shown = String::from_utf8_lossy(&bytes[..bytes.len().min(80)]).into_owned();
    match ctl_raw(m, bytes) {
        Ok(()) => panic!(
            "{shown:?} (O_WRONLY|O_TRUNC) succeeded, want {}",
            errno_name(errno)
        ),
        Err(e) => assert_eq!(
            e,
            errno,
            "{shown:?} (O_WRONLY|O_TRUNC) failed with {}, want {}",
            errno_name(e),
            errno_name(errno)
        ),
    }
    let (r, answer) = ctl_answer_raw(m, bytes);
    match r {
        Ok(()) => panic!("{shown:?} (O_RDWR) succeeded, want {}", errno_name(errno)),
        Err(e) => assert_eq!(
            e,
            errno,
            "{shown:?} (O_RDWR) failed with {}, want {}",
            errno_name(e),
            errno_name(errno)
        ),
    }
    assert!(
        answer.starts_with("error: ") && answer.ends_with('\n') && answer.len() > 8,
        "answer to failed {shown:?}: {answer:?}"
    );
    assert_eq!(
        answer.lines().count(),
        1,
        "answer to failed {shown:?}: {answer:?}"
    );
}

/// Like [`ctl_fails_raw`] with `cmd\n`.
pub fn ctl_fails(m: &Mount, cmd: &str, errno: i32) {
    ctl_fails_raw(m, format!("{cmd}\n").as_bytes(), errno)
}

/// The status line of `name` (panics if missing).
pub fn job(m: &Mount, name: &str) -> ControlLine {
    let text = m.read_control();
    parse_control(&text)
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no line for {name:?} in .control:\n{text}"))
}

/// A numeric field of a status line.
pub fn num(l: &ControlLine, key: &str) -> u64 {
    l.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {:?}", l.raw))
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {:?}: {e}", l.raw))
}

/// The `state=` field of a status line.
pub fn state(l: &ControlLine) -> &str {
    l.get("state")
        .unwrap_or_else(|| panic!("no state= in {:?}", l.raw))
}

/// Polls `name`'s status until `pred` holds; panics with the last line after `timeout`.
pub fn wait_job(
    m: &Mount,
    name: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&ControlLine) -> bool,
) -> ControlLine {
    let deadline = Instant::now() + timeout;
    loop {
        let l = job(m, name);
        if pred(&l) {
            return l;
        }
        if Instant::now() >= deadline {
            panic!(
                "{name}: not {what} after {timeout:?}; last status: {}",
                l.raw
            );
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Waits for the job on `name` to end (state not running/paused) and returns the line.
pub fn wait_end(m: &Mount, name: &str, timeout: Duration) -> ControlLine {
    wait_job(m, name, timeout, "finished", |l| {
        !matches!(state(l), "running" | "paused")
    })
}

/// Waits for `completed` (panics if the job ends otherwise), checks offset == len.
pub fn wait_completed(m: &Mount, name: &str, timeout: Duration) -> ControlLine {
    let l = wait_end(m, name, timeout);
    assert_eq!(state(&l), "completed", "job did not complete: {}", l.raw);
    assert_eq!(num(&l, "offset"), num(&l, "len"), "completed: {}", l.raw);
    l
}
