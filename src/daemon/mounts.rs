//! Mount points from outside the daemon: /proc/self/mountinfo, checking a mount point
//! before mounting, finding a mount's daemon, and `streamfs umount`.

use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::{Error, Result};

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

pub(super) fn check_mountpoint(mp: &Path) -> Result<PathBuf> {
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
    let try_umount = || unsafe { libc::umount2(c.as_ptr(), flags) } == 0;
    let mut done = try_umount();
    if !done && std::io::Error::last_os_error().raw_os_error() == Some(libc::EBUSY) {
        // Perhaps only `.events` readers hold it: ask the daemon to end them (they read
        // end-of-file and close), then try again for a moment.
        if let Some(pid) = pid {
            // SAFETY: kill with a pid read from the mount's xattr.
            unsafe { libc::kill(pid, libc::SIGUSR1) };
            let deadline = Instant::now() + Duration::from_secs(1);
            while !done && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
                done = try_umount();
            }
            if !done {
                // Report the failure of the last try, as before.
                done = try_umount();
            }
        }
    }
    if !done {
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
    fn mountinfo_escapes() {
        assert_eq!(unescape_mountinfo("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_mountinfo("/plain"), "/plain");
    }
}
