//! One error type for the whole crate. Every variant carries enough context (file, offset,
//! what was being done) to be shown to a user as is, and maps to an errno for FUSE replies.
//! Paths and messages may carry names from images: they are shown escaped (`text`).

use std::io;
use std::path::{Path, PathBuf};

use crate::text;

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// An I/O error while doing `what` on `path`.
    #[error("{}: {}: {source}", text::path(path), text::escape(what))]
    Io {
        path: PathBuf,
        what: String,
        #[source]
        source: io::Error,
    },
    /// The image is malformed: QEMU would refuse it too.
    #[error("{}: corrupt image: {}", text::path(path), text::escape(msg))]
    Corrupt { path: PathBuf, msg: String },
    /// A valid image that uses something streamfs does not implement.
    #[error("{}: unsupported: {}", text::path(path), text::escape(msg))]
    Unsupported { path: PathBuf, msg: String },
    /// Another process holds the image in a way we cannot share (QEMU's image locks).
    #[error(
        "{}: in use by another process (QEMU, qemu-img or a streamfs mount): {}",
        text::path(path),
        text::escape(msg)
    )]
    InUse { path: PathBuf, msg: String },
    /// A remote source (NBD export, HTTP object) failed or did not answer in time.
    #[error("{}: {}", text::escape(uri), text::escape(msg))]
    Remote { uri: String, msg: String },
    /// Bad usage: arguments, names, mount points.
    #[error("{}", text::escape(.0))]
    Invalid(String),
    /// The operation is not allowed in this state (read-only, job active, ...).
    #[error("{}", text::escape(msg))]
    State { msg: String, errno: i32 },
}

impl Error {
    pub fn io(path: &Path, what: impl Into<String>, source: io::Error) -> Self {
        Error::Io {
            path: path.to_path_buf(),
            what: what.into(),
            source,
        }
    }

    pub fn corrupt(path: &Path, msg: impl Into<String>) -> Self {
        Error::Corrupt {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn unsupported(path: &Path, msg: impl Into<String>) -> Self {
        Error::Unsupported {
            path: path.to_path_buf(),
            msg: msg.into(),
        }
    }

    pub fn remote(uri: &str, msg: impl Into<String>) -> Self {
        Error::Remote {
            uri: uri.to_string(),
            msg: msg.into(),
        }
    }

    pub fn state(errno: i32, msg: impl Into<String>) -> Self {
        Error::State {
            msg: msg.into(),
            errno,
        }
    }

    /// The errno a FUSE reply should carry for this error.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Io { source, .. } => match source.raw_os_error() {
                Some(libc::ENOSPC) => libc::ENOSPC,
                Some(libc::EDQUOT) => libc::EDQUOT,
                Some(libc::EROFS) => libc::EROFS,
                _ => libc::EIO,
            },
            Error::Corrupt { .. } | Error::Unsupported { .. } | Error::Remote { .. } => libc::EIO,
            Error::InUse { .. } => libc::EBUSY,
            Error::Invalid(_) => libc::EINVAL,
            Error::State { errno, .. } => *errno,
        }
    }

    /// True when the error means the leaf's file system is full.
    pub fn is_no_space(&self) -> bool {
        matches!(self.errno(), libc::ENOSPC | libc::EDQUOT)
    }
}
