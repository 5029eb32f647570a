//! Byte sources: where an image's bytes come from. A local file or block device, an NBD
//! export, an HTTP(S) object. The formats (`format::qcow2`, `format::raw`) read through
//! this trait only, so qcow2 over NBD is the same qcow2 code on another source. Only a
//! local file can be written (`Source::local`): a remote layer is never a leaf.

pub mod http;
pub mod io;
pub mod local;
pub mod nbd;
pub mod uri;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

pub use self::local::LocalFile;
pub use self::uri::Location;
use crate::Result;

/// Allocation of a range of a source, as NBD's `base:allocation` context reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Extent {
    /// Holds data (or may: the source cannot tell).
    Data,
    /// Allocated, but reads as zeros.
    Zero,
    /// Not allocated; reads as zeros.
    Hole,
}

/// What every byte source can do. Implementations are shared by all threads of a mount
/// (`Send + Sync`): concurrent calls are expected and should run in parallel.
pub trait Source: Send + Sync {
    /// The path or URI, for messages.
    fn name(&self) -> &str;
    /// Size in bytes when the source was opened (a local qcow2 leaf grows later).
    fn size(&self) -> u64;
    /// Fills `buf` from `off` and returns how many bytes came from the source: the rest,
    /// past its end, reads as zeros (as QEMU's drivers read a short image). A remote
    /// source retries a lost connection until its timeout, counted from the call; an
    /// error is never answered with zeros.
    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize>;
    /// The allocation of the start of [off, off+len) (inside the source) and how far it
    /// extends (at least 1 byte, at most `len`). Sources that cannot tell say `Data`.
    fn extent(&self, _off: u64, len: u64) -> Result<(Extent, u64)> {
        Ok((Extent::Data, len))
    }
    /// The local file behind this source, which alone can be written.
    fn local(&self) -> Option<&LocalFile> {
        None
    }
    /// Whether the bytes come over a network.
    fn is_remote(&self) -> bool {
        self.local().is_none()
    }
    /// Ends the session politely (NBD_CMD_DISC); later reads fail.
    fn close(&self) {}
}

/// The local file behind `src`, for writing, if the image is open for writing: EROFS
/// otherwise (a read-only open, or a remote image, which is never written).
pub fn writable_file(src: &dyn Source, writable: bool) -> Result<&std::fs::File> {
    match src.local() {
        Some(l) if writable => Ok(l.file()),
        _ => Err(crate::Error::state(
            libc::EROFS,
            format!("{} is open read-only", src.name()),
        )),
    }
}

/// Settings for remote sources (mount options).
#[derive(Debug, Clone)]
pub struct RemoteOptions {
    /// How long a read may wait for the remote answer in all (`--remote-timeout`),
    /// counted from when the read arrived, across reconnects.
    pub timeout: Duration,
    /// Extra CA certificates (PEM) for HTTPS (`--ca-file`), beside the system's roots.
    pub ca_file: Option<PathBuf>,
}

impl Default for RemoteOptions {
    fn default() -> Self {
        RemoteOptions {
            timeout: Duration::from_secs(30),
            ca_file: None,
        }
    }
}

/// Opens a remote source (an NBD export or an HTTP object) for reading.
pub fn open_remote(loc: &Location, opts: &RemoteOptions) -> Result<Arc<dyn Source>> {
    match loc {
        Location::Nbd(addr) => Ok(Arc::new(nbd::NbdSource::connect(addr, opts)?)),
        Location::Http(url) => Ok(Arc::new(http::HttpSource::open(url, opts)?)),
        Location::File(p) => Ok(Arc::new(LocalFile::open(p, false)?)),
    }
}
