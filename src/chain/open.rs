//! Opening a backing chain the way QEMU does: the backing name from the header, relative
//! names resolved against the directory of the image that names them, the format from the
//! backing-format extension or else probed. Cycles are detected by (device, inode).

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::format::{Format, Image};
use crate::{Error, Result};

/// Longest chain we open; deeper chains are almost always a mistake (or a loop through
/// names we cannot see through, like different paths to one file on a network FS).
pub const MAX_CHAIN_DEPTH: usize = 128;

/// One image of a chain, with the name it was referred to by.
pub struct Layer {
    pub image: Image,
    /// As named by the image above (or the path given on the command line for the leaf).
    pub name: String,
}

/// Opens `leaf` and its backing images. The leaf is opened read-write unless `read_only`;
/// backing images are always read-only.
pub fn open_chain(leaf: &Path, read_only: bool) -> Result<Vec<Arc<Layer>>> {
    let mut layers: Vec<Arc<Layer>> = Vec::new();
    let mut seen = HashSet::new();
    let mut path = leaf.to_path_buf();
    let mut name = leaf.display().to_string();
    let mut format = None;
    loop {
        let meta = std::fs::metadata(&path).map_err(|e| match layers.last() {
            Some(above) => Error::io(
                &path,
                format!(
                    "backing file '{name}' of {} cannot be opened",
                    above.image.path().display()
                ),
                e,
            ),
            None => Error::io(&path, "cannot open image", e),
        })?;
        if !meta.is_file() && !meta.file_type().is_block_device() {
            return Err(Error::Invalid(format!(
                "{}: not a regular file",
                path.display()
            )));
        }
        if !seen.insert((meta.dev(), meta.ino())) {
            return Err(Error::corrupt(
                &path,
                format!("backing chain loops back to this image (via '{name}')"),
            ));
        }
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(
                leaf,
                format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        let fmt = match format {
            Some(f) => f,
            None => Format::probe(&path)?,
        };
        let writable = layers.is_empty() && !read_only;
        let image = Image::open(&path, fmt, writable)?;
        let backing = image.backing();
        layers.push(Arc::new(Layer {
            image,
            name: name.clone(),
        }));
        let Some((bname, bfmt)) = backing else {
            return Ok(layers);
        };
        let next = resolve_backing(&path, &bname)?;
        format = match bfmt {
            Some(f) => Some(Format::from_name(&path, &f)?),
            None => None,
        };
        path = next;
        name = bname;
    }
}

/// Resolves a backing name relative to the directory of the image that stores it.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    if name.starts_with("json:") || (name.contains("://") && !name.starts_with('/')) {
        return Err(Error::unsupported(
            image,
            format!("backing file '{name}' is not a local file name"),
        ));
    }
    let p = Path::new(name);
    Ok(if p.is_absolute() {
        p.to_path_buf()
    } else {
        image.parent().unwrap_or(Path::new(".")).join(p)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backing_names_resolve_like_qemu() {
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), "base.qcow2").unwrap(),
            PathBuf::from("/a/b/base.qcow2")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), "../c/base.raw").unwrap(),
            PathBuf::from("/a/b/../c/base.raw")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/b/top.qcow2"), "/abs/base").unwrap(),
            PathBuf::from("/abs/base")
        );
        assert_eq!(
            resolve_backing(Path::new("top.qcow2"), "base.qcow2").unwrap(),
            PathBuf::from("base.qcow2")
        );
        assert!(resolve_backing(Path::new("/t"), "json:{}").is_err());
        assert!(resolve_backing(Path::new("/t"), "nbd://host/x").is_err());
    }
}
