//! Image formats (qcow2, raw): headers, cluster mapping, allocation, positional I/O.
//! This layer knows nothing of chains: each image answers for its own clusters.

pub mod lock;
pub mod qcow2;
pub mod raw;

use std::path::Path;
use std::sync::Arc;

use self::qcow2::Qcow2;
use self::raw::RawImage;
use crate::source::{Extent, LocalFile, Source};
use crate::{Error, Result};

/// How a guest range is stored in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mapping {
    /// Not in this image: look in the backing image.
    Unallocated,
    /// Reads as zeros, hiding any backing data.
    Zero,
    /// Data at this host offset (for the first byte of the range).
    Data { host: u64 },
    /// One compressed cluster starting at guest offset `cluster_start`.
    Compressed {
        host: u64,
        len: u64,
        cluster_start: u64,
    },
}

impl Mapping {
    /// Whether `next`, found `advanced` bytes after the start of `self`, extends it.
    pub fn continues_with(&self, next: &Mapping, advanced: u64) -> bool {
        match (self, next) {
            (Mapping::Unallocated, Mapping::Unallocated) | (Mapping::Zero, Mapping::Zero) => true,
            (Mapping::Data { host: a }, Mapping::Data { host: b }) => *b == a + advanced,
            _ => false,
        }
    }
}

/// Allocation status of a range in one image, for SEEK_DATA/SEEK_HOLE and stream planning.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Status {
    Unallocated,
    Zero,
    Data,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Qcow2,
    Raw,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Qcow2 => "qcow2",
            Format::Raw => "raw",
        }
    }

    pub fn from_name(path: &Path, name: &str) -> Result<Format> {
        match name {
            "qcow2" => Ok(Format::Qcow2),
            "raw" | "file" => Ok(Format::Raw),
            other => Err(Error::unsupported(
                path,
                format!("image format '{other}' (only qcow2 and raw)"),
            )),
        }
    }

    /// Probes like QEMU: the qcow2 magic, otherwise raw. Unlike QEMU, a file named
    /// `*.qcow2`/`*.qcow` without the magic is an error rather than silently raw: it is
    /// a damaged image, and writing into it as raw would bury what is left of it.
    pub fn probe(path: &Path) -> Result<Format> {
        Format::probe_source(&LocalFile::open(path, false)?)
    }

    /// Probes the bytes of any source (a remote template without a backing format).
    pub fn probe_source(src: &dyn Source) -> Result<Format> {
        let path = Path::new(src.name());
        let mut magic = [0u8; 4];
        let n = src.read_at(&mut magic, 0)?;
        if n == 4 && u32::from_be_bytes(magic) == qcow2::header::MAGIC {
            return Ok(Format::Qcow2);
        }
        let named_qcow = path
            .extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| matches!(e.to_ascii_lowercase().as_str(), "qcow2" | "qcow"));
        if named_qcow {
            return Err(Error::corrupt(
                path,
                "not a qcow2 image (bad magic, or header truncated)",
            ));
        }
        Ok(Format::Raw)
    }
}

// Images live behind an Arc in their layer, one per file: the size difference is moot.
#[allow(clippy::large_enum_variant)]
pub enum Image {
    Qcow2(Qcow2),
    Raw(RawImage),
}

impl Image {
    pub fn open(path: &Path, format: Format, writable: bool) -> Result<Image> {
        Image::on_source(Arc::new(LocalFile::open(path, writable)?), format)
    }

    /// An image in `format` on any byte source (writable if it is a writable local file).
    pub fn on_source(src: Arc<dyn Source>, format: Format) -> Result<Image> {
        Ok(match format {
            Format::Qcow2 => Image::Qcow2(Qcow2::open_source(src)?),
            Format::Raw => Image::Raw(RawImage::on(src)),
        })
    }

    /// The byte source the image reads from.
    pub fn source(&self) -> &Arc<dyn Source> {
        match self {
            Image::Qcow2(q) => q.source(),
            Image::Raw(r) => r.source(),
        }
    }

    pub fn format(&self) -> Format {
        match self {
            Image::Qcow2(_) => Format::Qcow2,
            Image::Raw(_) => Format::Raw,
        }
    }
    pub fn path(&self) -> &Path {
        match self {
            Image::Qcow2(q) => q.path(),
            Image::Raw(r) => r.path(),
        }
    }
    pub fn size(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.size(),
            Image::Raw(r) => r.size(),
        }
    }
    /// Where the image's allocated data ends in its file (qcow2: the end of the highest
    /// allocated cluster, qemu-img check's "Image end offset"; raw: its size).
    pub fn alloc_end(&self) -> u64 {
        match self {
            Image::Qcow2(q) => q.alloc_end(),
            Image::Raw(r) => r.size(),
        }
    }
    pub fn is_writable(&self) -> bool {
        match self {
            Image::Qcow2(q) => q.is_writable(),
            Image::Raw(r) => r.is_writable(),
        }
    }
    pub fn backing(&self) -> Option<(String, Option<String>)> {
        match self {
            Image::Qcow2(q) => q.backing(),
            Image::Raw(_) => None,
        }
    }
    pub fn as_qcow2(&self) -> Option<&Qcow2> {
        match self {
            Image::Qcow2(q) => Some(q),
            Image::Raw(_) => None,
        }
    }

    /// Maps [off, off+len), which must lie inside the image.
    pub fn map(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        match self {
            Image::Qcow2(q) => q.map(off, len),
            Image::Raw(_) => Ok((Mapping::Data { host: off }, len)),
        }
    }

    pub fn read_mapped(&self, m: Mapping, off: u64, buf: &mut [u8]) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.read_mapped(m, off, buf),
            Image::Raw(r) => match m {
                Mapping::Data { host } => r.read(host, buf),
                _ => {
                    buf.fill(0);
                    Ok(())
                }
            },
        }
    }

    /// Allocation status of the start of [off, off+len) (inside the image) and its length.
    pub fn status(&self, off: u64, len: u64) -> Result<(Status, u64)> {
        match self {
            Image::Qcow2(q) => {
                let (m, n) = q.map(off, len)?;
                let s = match m {
                    Mapping::Unallocated => Status::Unallocated,
                    Mapping::Zero => Status::Zero,
                    _ => Status::Data,
                };
                Ok((s, n))
            }
            Image::Raw(r) => {
                let (e, n) = r.status(off, len)?;
                let s = match e {
                    Extent::Data => Status::Data,
                    Extent::Zero => Status::Zero,
                    Extent::Hole => Status::Unallocated,
                };
                Ok((s, n))
            }
        }
    }

    pub fn flush(&self) -> Result<()> {
        match self {
            Image::Qcow2(q) => q.flush_all(),
            Image::Raw(r) if r.is_writable() => r.sync(),
            Image::Raw(_) => Ok(()),
        }
    }
}
