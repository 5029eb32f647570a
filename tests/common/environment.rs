//! Sizes, time limits, and what the machine allows: whether FUSE tests can run.

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

/// True when /dev/fuse is openable and we may mount (we are root).
pub fn fuse_available() -> bool {
    fuse_skip_reason().is_none()
}

/// First statement of every FUSE test: prints `SKIP: <test>: <reason>` and returns early
/// when FUSE is unavailable.
#[allow(unused_macros)] // unused in a binary without FUSE tests
macro_rules! require_fuse {
    () => {
        if let Some(reason) = $crate::common::fuse_skip_reason() {
            eprintln!("SKIP: {}: {}", $crate::common::test_name(), reason);
            return;
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
