//! Raw images: the guest offset is the host offset. Holes of a sparse raw file (found
//! with SEEK_DATA/SEEK_HOLE) count as unallocated for block status, like QEMU's file driver.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use super::io::{file_len, pread_zero_tail, pwrite_all, seek_data, seek_hole, vanished};
use crate::{Error, Result};

pub struct RawImage {
    path: PathBuf,
    file: File,
    size: u64,
    writable: bool,
}

impl RawImage {
    pub fn open(path: &Path, writable: bool) -> Result<RawImage> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let size = file_len(&file, path)?;
        Ok(RawImage {
            path: path.to_path_buf(),
            file,
            size,
            writable,
        })
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
        let n = pread_zero_tail(&self.file, &self.path, buf, off)?;
        let expected = (buf.len() as u64).min(self.size.saturating_sub(off)) as usize;
        if n < expected {
            return Err(vanished(&self.path, off + n as u64));
        }
        Ok(())
    }

    pub fn write(&self, off: u64, buf: &[u8]) -> Result<()> {
        pwrite_all(&self.file, &self.path, buf, off, "guest data")
    }

    /// Zeroes a range by punching a hole (the file keeps its size).
    pub fn zero(&self, off: u64, len: u64) -> Result<()> {
        // SAFETY: fallocate on our own fd; no memory is passed.
        let r = unsafe {
            libc::fallocate(
                self.file.as_raw_fd(),
                libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
                off as libc::off_t,
                len as libc::off_t,
            )
        };
        if r == 0 {
            return Ok(());
        }
        // Not supported by the host file system: write zeros instead.
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
        super::io::fdatasync(&self.file, &self.path)
    }

    /// Whether [off, off+len) starts with data (true) or a hole (false), and for how long.
    pub fn status(&self, off: u64, len: u64) -> Result<(bool, u64)> {
        let err = |e| Error::io(&self.path, "lseek", e);
        let data = seek_data(&self.file, off).map_err(err)?;
        match data {
            Some(d) if d <= off => {
                let hole = seek_hole(&self.file, off)
                    .map_err(err)?
                    .unwrap_or(self.size);
                Ok((true, (hole.max(off + 1) - off).min(len)))
            }
            Some(d) => Ok((false, (d - off).min(len))),
            None => Ok((false, len)),
        }
    }
}
