//! A local file or block device: the one source that can also be written.

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use super::io::{
    file_len, is_block_device, logical_block_size, pread_zero_tail, seek_data, seek_hole,
};
use super::{Extent, Source};
use crate::{Error, Result};

pub struct LocalFile {
    path: PathBuf,
    name: String,
    file: File,
    size: u64,
    writable: bool,
    /// A block device (LVM, iSCSI, a loop device): its logical block size.
    device_block: Option<u64>,
}

impl LocalFile {
    pub fn open(path: &Path, writable: bool) -> Result<LocalFile> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|e| Error::io(path, "open", e))?;
        let size = file_len(&file, path)?;
        let device_block = is_block_device(&file).then(|| logical_block_size(&file));
        Ok(LocalFile {
            path: path.to_path_buf(),
            name: path.display().to_string(),
            file,
            size,
            writable,
            device_block,
        })
    }

    pub fn file(&self) -> &File {
        &self.file
    }
    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// The logical block size of a block device; None for a regular file.
    pub fn device_block(&self) -> Option<u64> {
        self.device_block
    }
}

impl Source for LocalFile {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        pread_zero_tail(&self.file, &self.path, buf, off)
    }
    /// Holes of a sparse file (SEEK_DATA/SEEK_HOLE); a block device is all data.
    fn extent(&self, off: u64, len: u64) -> Result<(Extent, u64)> {
        if self.device_block.is_some() {
            return Ok((Extent::Data, len));
        }
        let err = |e| Error::io(&self.path, format!("seeking data/holes at offset {off}"), e);
        let end = off + len;
        let data = seek_data(&self.file, off).map_err(err)?;
        match data {
            Some(d) if d <= off => {
                let hole = seek_hole(&self.file, off).map_err(err)?.unwrap_or(end);
                Ok((Extent::Data, hole.clamp(off + 1, end) - off))
            }
            Some(d) => Ok((Extent::Hole, d.min(end) - off)),
            None => Ok((Extent::Hole, len)),
        }
    }
    fn local(&self) -> Option<&LocalFile> {
        Some(self)
    }
}
