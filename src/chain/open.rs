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
use crate::source::uri::{is_remote_name, parse_remote};
use crate::source::{open_remote, Location, RemoteOptions};
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
    /// `--allow-remote PREFIX`: if given, the only network backings that may be opened.
    pub allow_remote: Vec<String>,
    /// `--remote-timeout`, `--ca-file`.
    pub remote: RemoteOptions,
}

static POLICY: RwLock<OpenPolicy> = parking_lot::const_rwlock(OpenPolicy {
    force_share: false,
    backing_dirs: Vec::new(),
    no_remote: false,
    allow_remote: Vec::new(),
    remote: RemoteOptions {
        timeout: std::time::Duration::from_secs(30),
        ca_file: None,
    },
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
    /// Where the image is: a local path, or the URI of a remote one.
    pub location: Location,
    /// Identity of a local file when opened, to notice it being removed or replaced.
    id: Option<(u64, u64)>,
    /// QEMU-compatible image locks on a local file, held as long as the layer is open.
    _lock: Option<ImageLock>,
}

impl Layer {
    /// (device, inode) of a local file when opened.
    pub fn file_id(&self) -> Option<(u64, u64)> {
        self.id
    }

    /// Why the file at the layer's path is no longer the one we opened, if it is not.
    /// (A remote layer reports its own failures on reads.)
    pub fn replaced(&self) -> Option<String> {
        let id = self.id?;
        let p = self.image.path();
        match std::fs::metadata(p) {
            Err(e) => Some(format!("{} is gone: {e}", text::path(p))),
            Ok(m) if (m.dev(), m.ino()) != id => Some(format!("{} was replaced", text::path(p))),
            Ok(_) => None,
        }
    }
}

fn open_layer(
    loc: &Location,
    name: &str,
    format: Option<Format>,
    writable: bool,
    above: Option<&Layer>,
) -> Result<Layer> {
    let path = match loc {
        Location::File(p) => p,
        remote => return open_remote_layer(remote, name, format, above),
    };
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
        location: loc.clone(),
        id: Some(id),
        _lock: Some(lock),
    })
}

/// Why the options refuse the network image `uri` (named `name`), if they do.
fn remote_refusal(policy: &OpenPolicy, uri: &str, name: &str) -> Option<String> {
    if policy.no_remote {
        return Some("and --no-remote refuses network backings".into());
    }
    // The URI as resolved; also the name as written, if it is a URI itself.
    let allowed = |p: &String| {
        uri.starts_with(p.as_str()) || is_remote_name(name) && name.starts_with(p.as_str())
    };
    if !policy.allow_remote.is_empty() && !policy.allow_remote.iter().any(allowed) {
        return Some(format!(
            "which matches no --allow-remote prefix ({})",
            policy.allow_remote.join(", ")
        ));
    }
    None
}

fn remote_leaf(loc: &Location) -> Error {
    Error::Invalid(format!(
        "{}: a remote image cannot be the leaf (it is never written); create a local \
         qcow2 leaf on top of it: qemu-img create -f qcow2 -b {} -F raw leaf.qcow2",
        loc.display(),
        loc.display()
    ))
}

/// Opens a backing image on an NBD export or an HTTP object: read-only, never locked
/// (the server owns it), allowed unless `--no-remote` or an `--allow-remote` list
/// without a matching prefix refuses it.
fn open_remote_layer(
    loc: &Location,
    name: &str,
    format: Option<Format>,
    above: Option<&Layer>,
) -> Result<Layer> {
    let Some(above) = above else {
        return Err(remote_leaf(loc));
    };
    let policy = policy();
    let uri = loc.display();
    if let Some(why) = remote_refusal(&policy, &uri, name) {
        return Err(Error::state(
            libc::EACCES,
            format!(
                "{}: backing file '{name}' is the network image {uri}, {why}; refused",
                above.image.path().display()
            ),
        ));
    }
    let context = |e: Error| {
        Error::remote(
            &uri,
            format!(
                "backing file '{name}' of {} cannot be opened: {e}",
                above.image.path().display()
            ),
        )
    };
    let src = open_remote(loc, &policy.remote).map_err(context)?;
    let fmt = match format {
        Some(f) => f,
        None => Format::probe_source(&*src).map_err(context)?,
    };
    let image = Image::on_source(src, fmt).map_err(context)?;
    Ok(Layer {
        image,
        name: name.to_string(),
        location: loc.clone(),
        id: None,
        _lock: None,
    })
}

/// Opens `leaf` and its backing images. The leaf is opened read-write unless `read_only`;
/// backing images are always read-only.
pub fn open_chain(leaf: &Path, read_only: bool) -> Result<Vec<Arc<Layer>>> {
    if let Some(Ok(remote)) = leaf.to_str().and_then(parse_remote) {
        return Err(remote_leaf(&remote));
    }
    // Absolute (not canonical: symlinks stay as given, as QEMU keeps them), so backing
    // names resolve the same whatever the daemon's working directory.
    let abs = std::path::absolute(leaf).map_err(|e| Error::io(leaf, "resolving the path", e))?;
    let top = open_layer(
        &Location::File(abs),
        &leaf.display().to_string(),
        None,
        !read_only,
        None,
    )?;
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
    let mut seen: HashSet<(u64, u64)> = layers.iter().filter_map(|l| l.id).collect();
    let mut seen_remote: HashSet<String> = HashSet::new();
    loop {
        let last = layers.last().expect("at least the leaf");
        let Some((bname, bfmt)) = last.image.backing() else {
            return Ok(());
        };
        let above = last.image.path();
        let loc = resolve_location(&last.location, &bname)?;
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
        let looped = match &loc {
            Location::File(path) => {
                std::fs::metadata(path).is_ok_and(|m| seen.contains(&(m.dev(), m.ino())))
            }
            remote => !seen_remote.insert(remote.display()),
        };
        if looped {
            return Err(Error::corrupt(
                Path::new(&loc.display()),
                format!(
                    "backing chain loops back to this image (named '{bname}' by {})",
                    above.display()
                ),
            ));
        }
        let layer = open_layer(&loc, &bname, format, false, Some(last))?;
        seen.extend(layer.id);
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
    msg.push_str(" (only local file names and NBD or HTTP(S) URIs)");
    if NETWORK_PROTOCOLS.contains(&proto.to_ascii_lowercase().as_str()) {
        if policy.no_remote {
            msg.push_str("; network backings are refused by --no-remote");
        } else {
            msg.push_str("; of network images, streamfs opens nbd:, nbd://, nbd+unix://, http:// and https:// ones");
        }
    }
    msg
}

/// Resolves a backing name relative to the directory of the image that stores it.
pub fn resolve_backing(image: &Path, name: &str) -> Result<PathBuf> {
    resolve_with(image, name, &policy())
}

/// Where the backing image `name`, stored in the image at `above`, is, as QEMU resolves
/// it: a network URI as itself; an absolute path as itself; a relative name against the
/// directory of a local image or the URL of an HTTP one. A relative name inside an
/// NBD-served image has no base to resolve against.
pub fn resolve_location(above: &Location, name: &str) -> Result<Location> {
    if let Some(remote) = parse_remote(name) {
        return remote;
    }
    match above {
        Location::File(p) => resolve_backing(p, name).map(Location::File),
        Location::Http(url) => {
            if let Some(proto) = protocol(name) {
                return Err(Error::unsupported(
                    Path::new(url.as_str()),
                    protocol_refusal(name, proto, &policy()),
                ));
            }
            if Path::new(name).is_absolute() {
                return Ok(Location::File(PathBuf::from(name)));
            }
            url.join(name).map(Location::Http).map_err(|e| {
                Error::Invalid(format!(
                    "{url}: backing file '{name}' does not resolve against the URL: {e}"
                ))
            })
        }
        Location::Nbd(addr) => {
            if Path::new(name).is_absolute() && protocol(name).is_none() {
                return Ok(Location::File(PathBuf::from(name)));
            }
            Err(Error::unsupported(
                Path::new(&addr.uri),
                format!(
                    "backing file '{name}' is a relative name inside an NBD-served image: \
                     Cannot generate a base directory for NBD nodes (store an absolute name \
                     or a URI)"
                ),
            ))
        }
    }
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
    fn remote_options_decide_which_network_backings_open() {
        let any = OpenPolicy::default();
        assert_eq!(remote_refusal(&any, "nbd://h/x", "nbd://h/x"), None);
        let deny = OpenPolicy {
            no_remote: true,
            ..OpenPolicy::default()
        };
        let e = remote_refusal(&deny, "nbd://h/x", "nbd://h/x").unwrap();
        assert!(e.contains("--no-remote"), "{e}");
        let allow = OpenPolicy {
            allow_remote: vec!["nbd://h/".into(), "https://o/t/".into()],
            ..OpenPolicy::default()
        };
        assert_eq!(remote_refusal(&allow, "nbd://h/x", "nbd://h/x"), None);
        // A relative name inside an HTTP image is judged by the URL it resolves to.
        assert_eq!(remote_refusal(&allow, "https://o/t/base", "base"), None);
        let e = remote_refusal(&allow, "https://o/x", "https://o/x").unwrap();
        assert!(
            e.contains("no --allow-remote") && e.contains("nbd://h/"),
            "{e}"
        );
        // Other network protocols say what streamfs opens, and what --no-remote does.
        let e = resolve_with(Path::new("/t"), "ssh://h/x", &deny).unwrap_err();
        assert!(e.to_string().contains("--no-remote"), "{e}");
        let e = resolve_with(Path::new("/t"), "ssh://h/x", &any).unwrap_err();
        assert!(e.to_string().contains("nbd+unix://"), "{e}");
        // Not a network protocol: the options are beside the point.
        let e = resolve_with(Path::new("/t"), "file:x", &deny).unwrap_err();
        assert!(!e.to_string().contains("--no-remote"), "{e}");
    }

    #[test]
    fn backing_names_inside_remote_images_resolve_like_qemu() {
        let http = Location::Http(url::Url::parse("http://s/t/top.qcow2").unwrap());
        assert_eq!(
            resolve_location(&http, "base.qcow2").unwrap(),
            Location::Http(url::Url::parse("http://s/t/base.qcow2").unwrap())
        );
        assert_eq!(
            resolve_location(&http, "/srv/base").unwrap(),
            Location::File("/srv/base".into())
        );
        let Some(Ok(nbd)) = parse_remote("nbd://s/top") else {
            panic!()
        };
        let e = resolve_location(&nbd, "base.qcow2").unwrap_err();
        assert!(
            e.to_string()
                .contains("Cannot generate a base directory for NBD nodes"),
            "{e}"
        );
        assert!(matches!(
            resolve_location(&nbd, "nbd+unix:///b?socket=/s").unwrap(),
            Location::Nbd(_)
        ));
        let file = Location::File("/a/top.qcow2".into());
        assert!(matches!(
            resolve_location(&file, "http://s/b").unwrap(),
            Location::Http(_)
        ));
        assert_eq!(
            resolve_location(&file, "b.raw").unwrap(),
            Location::File("/a/b.raw".into())
        );
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
