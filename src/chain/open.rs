//! Opening a backing chain the way QEMU does: the backing name from the header, relative
//! names resolved against the directory of the image that names them, the format from the
//! backing-format extension or else probed. Cycles are detected by (device, inode).
//! Every image is locked as QEMU locks it (`format::lock`) before it is opened.

use std::collections::HashSet;
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::RwLock;

use crate::format::lock::{Access, ImageLock};
use crate::format::{Format, Image};
use crate::{text, Error, Result};

/// How images are opened, beyond what `open_chain`'s arguments say. Process-wide, set by
/// the daemon before it opens anything: the chain code calls `open_chain` and
/// `reopen_backing` (on a backing file's return) without options, and both must apply
/// the same rules.
#[derive(Debug, Clone, Default)]
pub struct OpenPolicy {
    /// Read-only opens skip the lock test and share everything (`--force-share`).
    pub force_share: bool,
    /// Canonical directories every layer below the leaf must lie in (`--backing-dir`);
    /// empty: anywhere.
    pub backing_dirs: Vec<PathBuf>,
    /// `--no-remote`: refuse network backings.
    pub no_remote: bool,
    /// `--allow-remote PREFIX`: network backings that may be opened (once supported).
    pub allow_remote: Vec<String>,
}

static POLICY: RwLock<OpenPolicy> = parking_lot::const_rwlock(OpenPolicy {
    force_share: false,
    backing_dirs: Vec::new(),
    no_remote: false,
    allow_remote: Vec::new(),
});

/// Sets the rules for every later open.
pub fn set_policy(policy: OpenPolicy) {
    *POLICY.write() = policy;
}

fn policy() -> OpenPolicy {
    POLICY.read().clone()
}

/// Longest chain we open; deeper chains are almost always a mistake (or a loop through
/// names we cannot see through, like different paths to one file on a network FS).
pub const MAX_CHAIN_DEPTH: usize = 128;

/// One image of a chain, with the name it was referred to by.
pub struct Layer {
    pub image: Image,
    /// As named by the image above (or the path given on the command line for the leaf).
    pub name: String,
    /// Identity of the file when opened, to notice it being removed or replaced.
    id: (u64, u64),
    /// QEMU-compatible image locks, held as long as the layer is open.
    _lock: ImageLock,
}

impl Layer {
    /// (device, inode) of the file when opened.
    pub fn file_id(&self) -> (u64, u64) {
        self.id
    }

    /// Why the file at the layer's path is no longer the one we opened, if it is not.
    pub fn replaced(&self) -> Option<String> {
        let p = self.image.path();
        match std::fs::metadata(p) {
            Err(e) => Some(format!("{} is gone: {e}", text::path(p))),
            Ok(m) if (m.dev(), m.ino()) != self.id => {
                Some(format!("{} was replaced", text::path(p)))
            }
            Ok(_) => None,
        }
    }
}

fn open_layer(
    path: &Path,
    name: &str,
    format: Option<Format>,
    writable: bool,
    above: Option<&Layer>,
) -> Result<Layer> {
    let meta = std::fs::metadata(path).map_err(|e| match above {
        Some(above) => Error::io(
            path,
            format!(
                "backing file '{name}' of {} cannot be opened",
                above.image.path().display()
            ),
            e,
        ),
        None => Error::io(path, "cannot open image", e),
    })?;
    if !meta.is_file() && !meta.file_type().is_block_device() {
        return Err(Error::Invalid(format!(
            "{}: not a regular file",
            path.display()
        )));
    }
    let id = (meta.dev(), meta.ino());
    let policy = policy();
    if let Some(above) = above {
        confine(path, name, above.image.path(), id, &policy.backing_dirs)?;
    }
    // Locked before anything is read or written, so nothing touches an image QEMU writes.
    let access = match (writable, policy.force_share) {
        (true, _) => Access::WRITER,
        (false, false) => Access::READER,
        (false, true) => Access::FORCE_SHARE,
    };
    let lock = ImageLock::acquire(path, id, access)?;
    let fmt = match format {
        Some(f) => f,
        None => Format::probe(path)?,
    };
    let image = Image::open(path, fmt, writable)?;
    Ok(Layer {
        image,
        name: name.to_string(),
        id,
        _lock: lock,
    })
}

/// Opens `leaf` and its backing images. The leaf is opened read-write unless `read_only`;
/// backing images are always read-only.
pub fn open_chain(leaf: &Path, read_only: bool) -> Result<Vec<Arc<Layer>>> {
    // Absolute (not canonical: symlinks stay as given, as QEMU keeps them), so backing
    // names resolve the same whatever the daemon's working directory.
    let abs = std::path::absolute(leaf).map_err(|e| Error::io(leaf, "resolving the path", e))?;
    let top = open_layer(&abs, &leaf.display().to_string(), None, !read_only, None)?;
    let mut layers = vec![Arc::new(top)];
    extend_chain(&mut layers)?;
    Ok(layers)
}

/// Opens the backing chain below an already open leaf afresh (after a backing file was
/// replaced or restored).
pub fn reopen_backing(leaf: Arc<Layer>) -> Result<Vec<Arc<Layer>>> {
    let mut layers = vec![leaf];
    extend_chain(&mut layers)?;
    Ok(layers)
}

/// Follows backing links from the last layer down to the bottom of the chain.
fn extend_chain(layers: &mut Vec<Arc<Layer>>) -> Result<()> {
    let mut seen: HashSet<(u64, u64)> = layers.iter().map(|l| l.id).collect();
    loop {
        let last = layers.last().expect("at least the leaf");
        let Some((bname, bfmt)) = last.image.backing() else {
            return Ok(());
        };
        let above = last.image.path();
        let path = resolve_backing(above, &bname)?;
        if layers.len() >= MAX_CHAIN_DEPTH {
            return Err(Error::unsupported(
                layers[0].image.path(),
                format!("backing chain deeper than {MAX_CHAIN_DEPTH} images"),
            ));
        }
        let format = match bfmt {
            Some(f) => Some(Format::from_name(above, &f)?),
            None => None,
        };
        if let Ok(m) = std::fs::metadata(&path) {
            if seen.contains(&(m.dev(), m.ino())) {
                return Err(Error::corrupt(
                    &path,
                    format!(
                        "backing chain loops back to this image (named '{bname}' by {})",
                        above.display()
                    ),
                ));
            }
        }
        let layer = open_layer(&path, &bname, format, false, Some(last))?;
        seen.insert(layer.id);
        layers.push(Arc::new(layer));
    }
}

/// Refuses a backing file outside every `--backing-dir` (after symlinks and `..`). The
/// canonical path must still be the file `id` we looked at, so a symlink swapped in
/// between cannot lead us elsewhere; the lock then checks its descriptor against `id` too.
fn confine(path: &Path, name: &str, above: &Path, id: (u64, u64), dirs: &[PathBuf]) -> Result<()> {
    if dirs.is_empty() {
        return Ok(());
    }
    let real = std::fs::canonicalize(path).map_err(|e| Error::io(path, "resolving the path", e))?;
    let inside = dirs.iter().any(|d| real.starts_with(d));
    let same = std::fs::metadata(&real).is_ok_and(|m| (m.dev(), m.ino()) == id);
    if inside && same {
        return Ok(());
    }
    let list: Vec<String> = dirs.iter().map(|d| d.display().to_string()).collect();
    Err(Error::state(
        libc::EACCES,
        format!(
            "{}: backing file '{name}' is {}, outside the --backing-dir directories ({}); refused",
            above.display(),
            real.display(),
            list.join(", ")
        ),
    ))
}

/// Protocols QEMU reaches over the network (block drivers with a protocol name).
const NETWORK_PROTOCOLS: &[&str] = &[
    "nbd",
    "nbd+tcp",
    "nbd+unix",
    "http",
    "https",
    "ftp",
    "ftps",
    "ssh",
    "iscsi",
    "iser",
    "rbd",
    "gluster",
    "gluster+tcp",
    "gluster+unix",
    "gluster+rdma",
    "nfs",
    "vxhs",
];

/// The protocol prefix of a backing name, as QEMU's `path_has_protocol` sees one: a ':'
/// before any '/'. Such names are never file names to QEMU (`file:x`, `nbd://h/x`,
/// `json:{...}`, `foo:bar`), so they must not be taken for relative ones here.
fn protocol(name: &str) -> Option<&str> {
    let end = name.find([':', '/'])?;
    (name.as_bytes()[end] == b':').then(|| &name[..end])
}

/// Why a backing name with protocol `proto` is refused, mentioning the remote options.
fn protocol_refusal(name: &str, proto: &str, policy: &OpenPolicy) -> String {
    let mut msg = match proto {
        "json" => {
            format!("backing file '{name}' is a json: description, which streamfs does not support")
        }
        _ => format!(
            "backing file '{name}' uses the protocol '{proto}:', which streamfs does not support"
        ),
    };
    msg.push_str(" (only local file names)");
    if NETWORK_PROTOCOLS.contains(&proto.to_ascii_lowercase().as_str()) {
        if policy.no_remote {
            msg.push_str("; network backings are refused by --no-remote");
        } else if let Some(p) = policy
            .allow_remote
            .iter()
            .find(|p| name.starts_with(p.as_str()))
        {
            msg.push_str(&format!(
                "; --allow-remote {p} allows it, but network backings are not implemented yet"
            ));
        } else if !policy.allow_remote.is_empty() {
            msg.push_str("; it matches no --allow-remote prefix");
        }
    }
    msg
}

/// Resolves a backing name relative to the directory of the image that stores it.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    resolve_with(image, name, &policy())
}

fn resolve_with(image: &Path, name: &str, policy: &OpenPolicy) -> Result<PathBuf> {
    if let Some(proto) = protocol(name) {
        return Err(Error::unsupported(
            image,
            protocol_refusal(name, proto, policy),
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
        // A ':' after a '/' is part of a file name, as in QEMU.
        assert_eq!(
            resolve_backing(Path::new("/a/top"), "./x:y").unwrap(),
            PathBuf::from("/a/./x:y")
        );
        assert_eq!(
            resolve_backing(Path::new("/a/top"), "/b/nbd://x").unwrap(),
            PathBuf::from("/b/nbd://x")
        );
    }

    #[test]
    fn protocol_names_are_refused_as_protocols() {
        let p = OpenPolicy::default();
        for (name, proto) in [
            ("json:{\"driver\":\"raw\"}", "json"),
            ("file:base.qcow2", "file"),
            ("nbd://host/x", "nbd"),
            ("nbd+unix:///x?socket=/s", "nbd+unix"),
            ("http://h/x", "http"),
            ("https://h/x", "https"),
            ("weird:thing", "weird"),
        ] {
            assert_eq!(protocol(name), Some(proto), "{name}");
            let e = resolve_with(Path::new("/t"), name, &p)
                .unwrap_err()
                .to_string();
            assert!(e.contains("not support"), "{e}");
            assert!(
                !e.contains("--allow-remote") && !e.contains("--no-remote"),
                "{e}"
            );
        }
        assert_eq!(protocol("base.qcow2"), None);
        assert_eq!(protocol("../b:c"), None);
    }

    #[test]
    fn remote_options_are_named_in_refusals() {
        let deny = OpenPolicy {
            no_remote: true,
            ..OpenPolicy::default()
        };
        let e = resolve_with(Path::new("/t"), "nbd://h/x", &deny).unwrap_err();
        assert!(e.to_string().contains("--no-remote"), "{e}");
        let allow = OpenPolicy {
            allow_remote: vec!["nbd://h/".into()],
            ..OpenPolicy::default()
        };
        let e = resolve_with(Path::new("/t"), "nbd://h/x", &allow).unwrap_err();
        assert!(e.to_string().contains("--allow-remote nbd://h/"), "{e}");
        let e = resolve_with(Path::new("/t"), "https://o/x", &allow).unwrap_err();
        assert!(e.to_string().contains("no --allow-remote"), "{e}");
        // Not a network protocol: the options are beside the point.
        let e = resolve_with(Path::new("/t"), "file:x", &deny).unwrap_err();
        assert!(!e.to_string().contains("--no-remote"), "{e}");
    }

    #[test]
    fn confinement_follows_symlinks_and_dotdot() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().canonicalize().unwrap();
        let inside = root.join("in");
        std::fs::create_dir(&inside).unwrap();
        std::fs::write(root.join("secret"), b"x").unwrap();
        std::fs::write(inside.join("ok"), b"x").unwrap();
        std::os::unix::fs::symlink(root.join("secret"), inside.join("link")).unwrap();
        let id = |p: &Path| {
            let m = std::fs::metadata(p).unwrap();
            (m.dev(), m.ino())
        };
        let dirs = vec![inside.clone()];
        let top = inside.join("top");
        confine(
            &inside.join("ok"),
            "ok",
            &top,
            id(&inside.join("ok")),
            &dirs,
        )
        .unwrap();
        for name in ["link", "../secret"] {
            let p = inside.join(name);
            let e = confine(&p, name, &top, id(&p), &dirs)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains(name) && e.contains("secret") && e.contains("--backing-dir"),
                "{e}"
            );
        }
        confine(
            &root.join("secret"),
            "x",
            &top,
            id(&root.join("secret")),
            &[],
        )
        .unwrap();
    }
}
