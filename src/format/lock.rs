//! QEMU's image locks (block/file-posix.c, `raw_apply_lock_bytes` and
//! `raw_check_lock_bytes`), so QEMU and streamfs see each other's use of an image.
//!
//! Each holder takes a shared OFD lock (F_RDLCK) on byte 100+i for every permission bit
//! i it holds, and on byte 200+i for every bit it does *not* share with others. Before
//! trusting its locks it tests (F_OFD_GETLK with F_WRLCK, which reports any other
//! holder's F_RDLCK) byte 200+i for each bit it wants and byte 100+i for each bit it
//! refuses to share. Locks are taken first and tested second, as QEMU does, so of two
//! racing openers at least one sees the other. OFD locks belong to the open file
//! description: they survive fork (the daemon keeps them), are not dropped when some
//! other descriptor of the file is closed, and conflict with other descriptors of this
//! same process (a leaf given twice in one mount).

use std::fs::File;
use std::os::unix::fs::MetadataExt;
use std::os::unix::io::{AsRawFd, RawFd};
use std::path::Path;

use parking_lot::Mutex;

use crate::{Error, Result};

/// QEMU's BLK_PERM_* bits. QEMU 7.0 dropped BLK_PERM_GRAPH_MOD (0x10); QEMU 10 uses these
/// four, so bytes 100..=103 and 200..=203.
pub const CONSISTENT_READ: u64 = 0x1;
pub const WRITE: u64 = 0x2;
pub const WRITE_UNCHANGED: u64 = 0x4;
pub const RESIZE: u64 = 0x8;
pub const ALL: u64 = 0xf;

const PERM_BASE: i64 = 100;
const SHARED_BASE: i64 = 200;
const PERM_NAMES: [&str; 4] = ["consistent read", "write", "write unchanged", "resize"];

/// What an opener takes and what it lets others take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Access {
    pub perm: u64,
    pub shared: u64,
    /// Test other holders' locks (off for `--force-share`, QEMU's `-U`).
    pub check: bool,
}

impl Access {
    /// A writable leaf, as qemu-io / qemu-storage-daemon hold a writable qcow2 image
    /// (checked in /proc/locks with QEMU 10: bytes 100, 101, 103, 201, 203): we write and
    /// grow the file, and let others only read.
    pub const WRITER: Access = Access {
        perm: CONSISTENT_READ | WRITE | RESIZE,
        shared: CONSISTENT_READ | WRITE_UNCHANGED,
        check: true,
    };
    /// A read-only image (a backing layer, or any layer of a `--read-only` mount), as
    /// QEMU holds backing files and `qemu-io -r` its image (bytes 100, 201, 203): readers
    /// coexist, nobody may write underneath us.
    pub const READER: Access = Access {
        perm: CONSISTENT_READ,
        shared: CONSISTENT_READ | WRITE_UNCHANGED,
        check: true,
    };
    /// `--force-share`, as QEMU's `-U` (byte 100 only, no test): reads whatever is there.
    pub const FORCE_SHARE: Access = Access {
        perm: CONSISTENT_READ,
        shared: ALL,
        check: false,
    };
}

/// The held locks: a descriptor of the image used for nothing else. Dropping it (closing
/// the descriptor) releases them.
#[derive(Debug)]
pub struct ImageLock {
    file: File,
}

/// Descriptors of every held lock, for [`release_all`].
static HELD: Mutex<Vec<RawFd>> = Mutex::new(Vec::new());

impl Drop for ImageLock {
    fn drop(&mut self) {
        // Removed before the descriptor closes (after this returns), so `release_all`
        // never touches a number the kernel may have handed out again.
        HELD.lock().retain(|&fd| fd != self.file.as_raw_fd());
    }
}

/// Releases every lock this process holds, at once. For the daemon's last moment, after
/// the final flush: the kernel closes files only when the last thread of a process has
/// gone, well after the main thread shows as exited (a zombie) to `streamfs umount`, and
/// a tool run right after the unmount must find the image free.
pub fn release_all() {
    let held = HELD.lock();
    for &fd in held.iter() {
        let fl = flock(libc::F_UNLCK, 0);
        let whole = libc::flock { l_len: 0, ..fl };
        // SAFETY: fcntl on a descriptor we hold open (HELD is locked, so not yet closed).
        unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &whole) };
    }
}

fn flock(kind: i32, byte: i64) -> libc::flock {
    // SAFETY: flock is plain old data; all-zero is a valid value (l_pid must be 0 for OFD).
    let mut fl: libc::flock = unsafe { std::mem::zeroed() };
    fl.l_type = kind as libc::c_short;
    fl.l_whence = libc::SEEK_SET as libc::c_short;
    fl.l_start = byte;
    fl.l_len = 1;
    fl
}

fn bits(mask: u64) -> impl Iterator<Item = usize> {
    (0..PERM_NAMES.len()).filter(move |i| mask & (1 << i) != 0)
}

impl ImageLock {
    /// Locks the image at `path`, which must still be the file `id` (device, inode) that
    /// the caller looked at. Fails, naming the image, if another process holds it in a way
    /// `access` cannot share.
    pub fn acquire(path: &Path, id: (u64, u64), access: Access) -> Result<ImageLock> {
        let file = File::open(path).map_err(|e| Error::io(path, "opening to lock", e))?;
        let meta = file
            .metadata()
            .map_err(|e| Error::io(path, "opening to lock", e))?;
        if (meta.dev(), meta.ino()) != id {
            return Err(Error::Invalid(format!(
                "{}: the file was replaced while being opened",
                path.display()
            )));
        }
        let fd = file.as_raw_fd();
        let set = |byte: i64| -> Result<()> {
            let fl = flock(libc::F_RDLCK, byte);
            // SAFETY: fcntl on our open fd with a valid flock.
            if unsafe { libc::fcntl(fd, libc::F_OFD_SETLK, &fl) } == 0 {
                return Ok(());
            }
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // Only a write lock conflicts with ours, and QEMU takes none: whoever holds
                // one is not playing by these rules, but the file is in use all the same.
                Some(libc::EAGAIN | libc::EACCES) => Err(in_use(path, "the image is write-locked")),
                _ => Err(Error::io(
                    path,
                    format!("taking the image lock (byte {byte})"),
                    e,
                )),
            }
        };
        for i in bits(access.perm) {
            set(PERM_BASE + i as i64)?;
        }
        for i in bits(!access.shared & ALL) {
            set(SHARED_BASE + i as i64)?;
        }
        if access.check {
            let held = |byte: i64| -> Result<bool> {
                let mut fl = flock(libc::F_WRLCK, byte);
                // SAFETY: fcntl on our open fd; the kernel fills in `fl`.
                if unsafe { libc::fcntl(fd, libc::F_OFD_GETLK, &mut fl) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(Error::io(
                        path,
                        format!("testing the image lock (byte {byte})"),
                        e,
                    ));
                }
                Ok(fl.l_type != libc::F_UNLCK as libc::c_short)
            };
            // The same two loops, in the same order, as raw_check_lock_bytes, so the
            // first conflict is reported with QEMU's words.
            for i in bits(access.perm) {
                if held(SHARED_BASE + i as i64)? {
                    return Err(in_use(
                        path,
                        &format!("failed to get \"{}\" lock", PERM_NAMES[i]),
                    ));
                }
            }
            for i in bits(!access.shared & ALL) {
                if held(PERM_BASE + i as i64)? {
                    return Err(in_use(
                        path,
                        &format!("failed to get shared \"{}\" lock", PERM_NAMES[i]),
                    ));
                }
            }
        }
        HELD.lock().push(fd);
        Ok(ImageLock { file })
    }
}

fn in_use(path: &Path, why: &str) -> Error {
    Error::InUse {
        path: path.to_path_buf(),
        msg: format!("{why} (--read-only --force-share reads it anyway)"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn id(p: &Path) -> (u64, u64) {
        let m = std::fs::metadata(p).unwrap();
        (m.dev(), m.ino())
    }

    #[test]
    fn writers_exclude_each_other_and_readers() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        let w = ImageLock::acquire(&p, id(&p), Access::WRITER).unwrap();
        let e = ImageLock::acquire(&p, id(&p), Access::WRITER).unwrap_err();
        assert!(matches!(e, Error::InUse { .. }), "{e}");
        assert!(
            e.to_string().contains("failed to get \"write\" lock"),
            "{e}"
        );
        let e = ImageLock::acquire(&p, id(&p), Access::READER).unwrap_err();
        assert!(e.to_string().contains("shared \"write\" lock"), "{e}");
        ImageLock::acquire(&p, id(&p), Access::FORCE_SHARE).unwrap();
        drop(w);
        let r1 = ImageLock::acquire(&p, id(&p), Access::READER).unwrap();
        let _r2 = ImageLock::acquire(&p, id(&p), Access::READER).unwrap();
        assert!(ImageLock::acquire(&p, id(&p), Access::WRITER).is_err());
        drop((r1, _r2));
        let w = ImageLock::acquire(&p, id(&p), Access::WRITER).unwrap();
        release_all();
        ImageLock::acquire(&p, id(&p), Access::WRITER).unwrap();
        drop(w);
    }

    #[test]
    fn a_replaced_file_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("img");
        std::fs::write(&p, [0u8; 512]).unwrap();
        assert!(ImageLock::acquire(&p, (0, 0), Access::READER).is_err());
    }
}
