//! Raw images: the guest offset is the host offset. Holes of a sparse raw file (found
//! with SEEK_DATA/SEEK_HOLE) count as unallocated for block status, like QEMU's file driver.

use std::fs::File;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::source::io::{blk_zeroout, pwrite_all, vanished};
use crate::source::{writable_file, Extent, LocalFile, Source};
use crate::{Error, Result};

pub struct RawImage {
    /// The source's name (path or URI), for messages.
    path: PathBuf,
    src: Arc<dyn Source>,
    size: u64,
    writable: bool,
    /// A block device (LVM, iSCSI, a loop device): no holes to punch; its logical block
    /// size, for BLKZEROOUT's alignment.
    device_block: Option<u64>,
}

impl RawImage {
    pub fn open(path: &Path, writable: bool) -> Result<RawImage> {
        Ok(RawImage::on(Arc::new(LocalFile::open(path, writable)?)))
    }

    /// A raw image on any byte source; writable if the source is a writable local file.
    pub fn on(src: Arc<dyn Source>) -> RawImage {
        let local = src.local();
        RawImage {
            path: PathBuf::from(src.name()),
            size: src.size(),
            writable: local.is_some_and(LocalFile::is_writable),
            device_block: local.and_then(LocalFile::device_block),
            src,
        }
    }

    /// The local file, for writing: a remote image is never written.
    fn file(&self) -> Result<&File> {
        writable_file(&*self.src, self.writable)
    }

    pub fn source(&self) -> &Arc<dyn Source> {
        &self.src
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// Reads at `off`; the image's size was fixed at open, so a short read inside it
    /// means the file shrank underneath us: an error, never zeros.
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<()> {
        let n = self.src.read_at(buf, off)?;
        let expected = (buf.len() as u64).min(self.size.saturating_sub(off)) as usize;
        if n < expected {
            return Err(vanished(&self.path, off + n as u64));
        }
        Ok(())
    }

    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        pwrite_all(self.file()?, &self.path, buf, off, "guest data")
    }

    /// Zeroes a range by punching a hole (the file keeps its size). Zeros are written
    /// instead only where the file system cannot punch holes; any other failure (a full
    /// disk, an I/O error) is reported, not papered over with a write that may fail later.
    pub fn zero(&self, off: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(()); // fallocate rejects an empty range with EINVAL
        }
        if let Some(bs) = self.device_block {
            return self.zero_device(off, len, bs);
        }
        // SAFETY: fallocate on our own fd; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file()?.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        let err = std::io::Error::last_os_error();
        if !punch_unsupported(err.raw_os_error()) {
            return Err(Error::io(
                &self.path,
                format!("punching a hole of {len} bytes at offset {off}"),
                err,
            ));
        }
        self.write_zeros(off, len)
    }

    /// A block device: BLKZEROOUT for the aligned middle, zeros written at the edges.
    fn zero_device(&self, off: u64, len: u64, bs: u64) -> Result<()> {
        let (a, b) = (off.div_ceil(bs) * bs, (off + len) / bs * bs);
        if a >= b {
            return self.write_zeros(off, len);
        }
        self.write_zeros(off, a - off)?;
        blk_zeroout(self.file()?, &self.path, a, b - a)?;
        self.write_zeros(b, off + len - b)
    }

    fn write_zeros(&self, off: u64, len: u64) -> Result<()> {
        let zeros = vec![0u8; len.min(1 << 20) as usize];
        let mut at = off;
        while at < off + len {
            let n = (off + len - at).min(zeros.len() as u64) as usize;
            self.write(at, &zeros[..n])?;
            at += n as u64;
        }
        Ok(())
    }

    pub fn sync(&self) -> Result<()> {
        crate::source::io::fdatasync(self.file()?, &self.path)
    }

    /// Whether [off, off+len) starts with data, reads as zeros, or is a hole (for
    /// block status), and for how long: the source's allocation (holes of a sparse file,
    /// NBD's base:allocation).
    pub fn status(&self, off: u64, len: u64) -> Result<(Extent, u64)> {
        let inside = len.min(self.size.saturating_sub(off));
        if inside == 0 {
            return Ok((Extent::Hole, len));
        }
        let len = inside;
        let (e, n) = self.src.extent(off, len)?;
        Ok((e, n.clamp(1, len)))
    }
}

/// Whether a failed hole punch means "this file system cannot do it" (write zeros
/// instead). EINVAL is that too: the range was checked non-empty, so it is the mode.
fn punch_unsupported(errno: Option<i32>) -> bool {
    matches!(errno, Some(libc::EOPNOTSUPP | libc::ENOSYS | libc::EINVAL))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_unsupported_hole_punches_fall_back_to_zeros() {
        for e in [libc::EOPNOTSUPP, libc::ENOSYS, libc::EINVAL] {
            assert!(punch_unsupported(Some(e)), "errno {e}");
        }
        for e in [
            libc::ENOSPC,
            libc::EIO,
            libc::EBADF,
            libc::ENODEV,
            libc::EPERM,
        ] {
            assert!(!punch_unsupported(Some(e)), "errno {e}");
        }
    }

    #[test]
    fn zero_reports_a_failed_hole_punch() {
        // /dev/null accepts writes but not fallocate (ENODEV): falling back to writing
        // zeros would report success for a range that was never punched.
        let null = RawImage::open(Path::new("/dev/null"), true).unwrap();
        let err = null.zero(0, 4096).unwrap_err();
        assert!(err.to_string().contains("punching a hole"), "{err}");
        assert!(null.zero(0, 0).is_ok());
    }

    #[test]
    fn zero_punches_a_hole_in_a_regular_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk.raw");
        std::fs::write(&path, vec![0xaau8; 1 << 20]).unwrap();
        let img = RawImage::open(&path, true).unwrap();
        img.zero(4096, 8192).unwrap();
        let mut buf = vec![0u8; 16384];
        img.read(0, &mut buf).unwrap();
        assert!(buf[..4096].iter().all(|&b| b == 0xaa));
        assert!(buf[4096..12288].iter().all(|&b| b == 0));
        assert!(buf[12288..].iter().all(|&b| b == 0xaa));
        assert_eq!(img.size(), 1 << 20);
    }
}
