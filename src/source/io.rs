//! Positional I/O on image files. Every data access goes through `pread`/`pwrite` at an
//! explicit offset, so no file position is shared and no lock is needed around I/O.

use std::fs::File;
use std::io;
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::{Error, Result};

/// Reads `buf.len()` bytes at `offset`; bytes past the end of the file read as zeros,
/// as QEMU's file driver does for images whose last cluster is not fully written.
/// Returns how many bytes came from the file.
pub fn pread_zero_tail(file: &File, path: &Path, buf: &mut [u8], offset: u64) -> Result<usize> {
    let mut done = 0;
    while done < buf.len() {
        match file.read_at(&mut buf[done..], offset + done as u64) {
            Ok(0) => {
                buf[done..].fill(0);
                return Ok(done);
            }
            Ok(n) => done += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                return Err(Error::io(
                    path,
                    format!("read of {} bytes at offset {}", buf.len(), offset),
                    e,
                ))
            }
        }
    }
    Ok(done)
}

/// An error for data that should exist but lies past the end of the file: the image
/// was truncated (or replaced) underneath us. Never read such data as zeros.
pub fn vanished(path: &Path, offset: u64) -> Error {
    Error::io(
        path,
        format!("data at offset {offset} is beyond the end of the file (truncated underneath?)"),
        io::Error::from_raw_os_error(libc::EIO),
    )
}

/// Reads exactly `buf.len()` bytes at `offset` from a source; a short one is a corrupt
/// image (metadata that the header places past the end).
pub fn read_exact(src: &dyn super::Source, buf: &mut [u8], offset: u64, what: &str) -> Result<()> {
    let n = src.read_at(buf, offset)?;
    if n < buf.len() {
        return Err(Error::corrupt(
            Path::new(src.name()),
            format!(
                "{what} at offset {offset} (+{} bytes) is beyond the end of the file",
                buf.len()
            ),
        ));
    }
    Ok(())
}

/// Reads exactly `buf.len()` bytes at `offset`; a short file is a corrupt image.
pub fn pread_exact(
    file: &File,
    path: &Path,
    buf: &mut [u8],
    offset: u64,
    what: &str,
) -> Result<()> {
    file.read_exact_at(buf, offset).map_err(|e| {
        if e.kind() == io::ErrorKind::UnexpectedEof {
            Error::corrupt(
                path,
                format!(
                    "{what} at offset {offset} (+{} bytes) is beyond the end of the file",
                    buf.len()
                ),
            )
        } else {
            Error::io(path, format!("reading {what} at offset {offset}"), e)
        }
    })
}

pub fn pwrite_all(file: &File, path: &Path, buf: &[u8], offset: u64, what: &str) -> Result<()> {
    file.write_all_at(buf, offset).map_err(|e| {
        Error::io(
            path,
            format!("writing {what} ({} bytes at offset {offset})", buf.len()),
            e,
        )
    })
}

pub fn fdatasync(file: &File, path: &Path) -> Result<()> {
    file.sync_data()
        .map_err(|e| Error::io(path, "fdatasync", e))
}

/// The size of an image file, or of a block device (from BLKGETSIZE64: a device's
/// metadata says 0).
pub fn file_len(file: &File, path: &Path) -> Result<u64> {
    let meta = file.metadata().map_err(|e| Error::io(path, "stat", e))?;
    if !meta.file_type().is_block_device() {
        return Ok(meta.len());
    }
    let mut size: u64 = 0;
    // SAFETY: BLKGETSIZE64 writes one u64 into `size`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKGETSIZE64, &mut size) };
    if r != 0 {
        return Err(Error::io(path, "BLKGETSIZE64", io::Error::last_os_error()));
    }
    Ok(size)
}

// Block device ioctls (linux/fs.h).
const BLKGETSIZE64: libc::c_ulong = 0x8008_1272;
const BLKSSZGET: libc::c_ulong = 0x1268;
const BLKZEROOUT: libc::c_ulong = 0x127f;

pub fn is_block_device(file: &File) -> bool {
    file.metadata()
        .is_ok_and(|m| m.file_type().is_block_device())
}

/// A block device's logical block size (BLKSSZGET), the unit BLKZEROOUT needs; 512 if
/// it cannot say.
pub fn logical_block_size(file: &File) -> u64 {
    let mut v: libc::c_uint = 0;
    // SAFETY: BLKSSZGET writes one unsigned int into `v`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKSSZGET, &mut v) };
    if r == 0 && v.is_power_of_two() {
        u64::from(v)
    } else {
        512
    }
}

/// Zeroes [off, off+len) of a block device with BLKZEROOUT (the device may unmap the
/// range, and reads return zeros). `off` and `len` must be logical-block aligned.
pub fn blk_zeroout(file: &File, path: &Path, off: u64, len: u64) -> Result<()> {
    let range: [u64; 2] = [off, len];
    // SAFETY: BLKZEROOUT reads two u64 (start, length) from `range`.
    let r = unsafe { libc::ioctl(file.as_raw_fd(), BLKZEROOUT, range.as_ptr()) };
    if r != 0 {
        return Err(Error::io(
            path,
            format!("BLKZEROOUT of {len} bytes at offset {off}"),
            io::Error::last_os_error(),
        ));
    }
    Ok(())
}

/// `lseek(SEEK_DATA)`: the next offset >= `offset` that holds data, or None past the last data.
pub fn seek_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_DATA)
}

/// `lseek(SEEK_HOLE)`: the next hole >= `offset` (EOF counts as a hole).
pub fn seek_hole(file: &File, offset: u64) -> io::Result<Option<u64>> {
    seek(file, offset, libc::SEEK_HOLE)
}

fn seek(file: &File, offset: u64, whence: i32) -> io::Result<Option<u64>> {
    let Ok(off) = libc::off_t::try_from(offset) else {
        return Ok(None);
    };
    // SAFETY: lseek on a valid fd owned by `file`; it does not touch memory.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, whence) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// Big-endian field readers for on-disk structures (callers check bounds first).
pub fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
pub fn be64(b: &[u8], at: usize) -> u64 {
    u64::from_be_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}
