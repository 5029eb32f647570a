//! Sizes, time limits, and what the machine allows: whether FUSE tests can run, and what a
//! test does when they cannot (skip locally, fail under CI).

use std::fs::OpenOptions;
use std::path::Path;
use std::thread;
use std::time::Duration;

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

/// True when /dev/fuse is openable and we may mount (we are root). A test that skips
/// when this is false must go through [`skip_or_fail`] (or use `require_fuse!()`).
pub fn fuse_available() -> bool {
    fuse_skip_reason().is_none()
}

/// What a test does when something it needs is missing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Unavailable {
    /// Print this line and return (a developer's machine without FUSE).
    Skip(String),
    /// Panic with this message (under CI a test that cannot run is a failure, not a pass).
    Fail(String),
}

/// True when the value of the `CI` environment variable (`None`: unset) says we run under
/// CI: `true` (any case) or `1`.
pub fn is_ci(ci: Option<&str>) -> bool {
    ci.is_some_and(|v| v.trim().eq_ignore_ascii_case("true") || v.trim() == "1")
}

/// The rule for every skip path: test `test` cannot run because of `reason`; `ci` is the
/// value of the `CI` environment variable. Under CI that is a failure, elsewhere a skip.
pub fn unavailable_verdict(ci: Option<&str>, test: &str, reason: &str) -> Unavailable {
    if is_ci(ci) {
        Unavailable::Fail(format!(
            "{test}: cannot run under CI: {reason} (CI runs must be able to mount FUSE \
             file systems; unset CI to skip instead)"
        ))
    } else {
        Unavailable::Skip(format!("SKIP: {test}: {reason}"))
    }
}

/// Applies [`unavailable_verdict`] to the running test with the real `CI` variable:
/// prints the `SKIP: ...` line (the caller then returns) or panics.
pub fn skip_or_fail(reason: &str) {
    let ci = std::env::var("CI").ok();
    match unavailable_verdict(ci.as_deref(), &test_name(), reason) {
        Unavailable::Skip(line) => eprintln!("{line}"),
        Unavailable::Fail(message) => panic!("{message}"),
    }
}

/// First statement of every FUSE test. When FUSE is unavailable it prints
/// `SKIP: <test>: <reason>` and returns early, except under `CI=true` (or `CI=1`), where
/// it fails the test (see [`unavailable_verdict`]).
#[allow(unused_macros)] // unused in a binary without FUSE tests
macro_rules! require_fuse {
    () => {
        if let Some(reason) = $crate::common::fuse_skip_reason() {
            $crate::common::skip_or_fail(&reason);
            return;
        }
    };
}
#[allow(unused_imports)] // likewise
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
