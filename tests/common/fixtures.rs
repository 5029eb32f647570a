//! Test fixtures: the per-test [`Scratch`] directory, raw and qcow2 images, chains of
//! them, patched headers, and random data.

use std::cell::Cell;
use std::ffi::OsStr;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use super::environment::{ps, test_name};
use super::environment::{KIB, MIB};
use super::mounts::default_name;
use super::mounts::{Mount, MountCmd, MountFailure};
use super::qemu::{
    assert_identical_to_raw, image_format, qemu_img, qemu_io_cmds, raw_reference, write_pattern,
};
use super::{Rng, SeedableRng, StdRng};

/// A private temporary directory for one test (removed on drop). Keep images and mount
/// points inside it; declare it before any `Mount` so mounts are dropped first.
pub struct Scratch {
    dir: tempfile::TempDir,
    mounts: Cell<u32>,
}

impl Scratch {
    /// Creates `/tmp/streamfs-<test name>-XXXX`.
    pub fn new() -> Scratch {
        let name: String = test_name()
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect();
        let dir = tempfile::Builder::new()
            .prefix(&format!("streamfs-{name}-"))
            .tempdir()
            .expect("create scratch dir");
        Scratch {
            dir,
            mounts: Cell::new(0),
        }
    }

    /// The directory itself.
    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// `path()/rel` (not created).
    pub fn join(&self, rel: impl AsRef<Path>) -> PathBuf {
        self.dir.path().join(rel)
    }

    /// `path()/rel`, created (with parents) as a directory.
    pub fn subdir(&self, rel: impl AsRef<Path>) -> PathBuf {
        let p = self.join(rel);
        fs::create_dir_all(&p).expect("create scratch subdir");
        p
    }

    /// A fresh empty directory to mount on (`mnt`, `mnt1`, ...).
    pub fn new_mountpoint(&self) -> PathBuf {
        let n = self.mounts.get();
        self.mounts.set(n + 1);
        self.subdir(if n == 0 {
            "mnt".to_string()
        } else {
            format!("mnt{n}")
        })
    }

    /// A [`MountCmd`] for a fresh mount point inside this directory.
    pub fn mount_cmd(&self) -> MountCmd {
        MountCmd::new().at(self.new_mountpoint())
    }

    /// Mounts `images` with `args` on a fresh mount point; panics (with stderr) on failure.
    pub fn mount<S: AsRef<OsStr>>(&self, images: &[S], args: &[&str]) -> Mount {
        self.mount_cmd()
            .args(args)
            .images(images)
            .run()
            .unwrap_or_else(|f| panic!("streamfs mount failed: {f}"))
    }

    /// Like [`Scratch::mount`] but returns the failure instead of panicking.
    pub fn try_mount<S: AsRef<OsStr>>(
        &self,
        images: &[S],
        args: &[&str],
    ) -> Result<Mount, MountFailure> {
        self.mount_cmd().args(args).images(images).run()
    }
}

/// Creates a sparse raw image of `size` bytes.
pub fn create_raw(path: &Path, size: u64) -> PathBuf {
    qemu_img(&["create", "-q", "-f", "raw", ps(path), &size.to_string()]);
    path.to_path_buf()
}

/// Writes `data` as a raw image file.
pub fn create_raw_from(path: &Path, data: &[u8]) -> PathBuf {
    fs::write(path, data).unwrap_or_else(|e| panic!("write {path:?}: {e}"));
    path.to_path_buf()
}

/// Options for creating (or converting to) a qcow2 image; unset options use qemu defaults.
#[derive(Clone, Debug, Default)]
pub struct Qcow2 {
    size: Option<u64>,
    cluster_size: Option<u64>,
    compat: Option<String>,
    extended_l2: bool,
    compression_type: Option<String>,
    backing: Option<(String, String)>,
    extra: Vec<String>,
}

impl Qcow2 {
    pub fn new() -> Qcow2 {
        Qcow2::default()
    }
    /// Virtual size (default: the backing file's size).
    pub fn size(mut self, size: u64) -> Qcow2 {
        self.size = Some(size);
        self
    }
    pub fn cluster_size(mut self, bytes: u64) -> Qcow2 {
        self.cluster_size = Some(bytes);
        self
    }
    /// "0.10" (v2) or "1.1" (v3).
    pub fn compat(mut self, compat: &str) -> Qcow2 {
        self.compat = Some(compat.into());
        self
    }
    pub fn extended_l2(mut self, on: bool) -> Qcow2 {
        self.extended_l2 = on;
        self
    }
    /// "zlib" or "zstd".
    pub fn compression_type(mut self, t: &str) -> Qcow2 {
        self.compression_type = Some(t.into());
        self
    }
    /// Backing file by path, format detected from its magic; the name is stored as given
    /// (relative names are resolved by qemu relative to the new image's directory).
    pub fn backing(self, backing: &Path) -> Qcow2 {
        let fmt = image_format(backing);
        self.backing_name(ps(backing), fmt)
    }
    /// Backing file by the exact name to store, with an explicit format.
    pub fn backing_name(mut self, name: &str, fmt: &str) -> Qcow2 {
        self.backing = Some((name.into(), fmt.into()));
        self
    }
    /// Any other `-o key=value`.
    pub fn option(mut self, kv: &str) -> Qcow2 {
        self.extra.push(kv.into());
        self
    }

    /// The `-o` option string (may be empty).
    pub fn options_string(&self) -> String {
        let mut o = Vec::new();
        if let Some(c) = self.cluster_size {
            o.push(format!("cluster_size={c}"));
        }
        if let Some(c) = &self.compat {
            o.push(format!("compat={c}"));
        }
        if self.extended_l2 {
            o.push("extended_l2=on".into());
        }
        if let Some(c) = &self.compression_type {
            o.push(format!("compression_type={c}"));
        }
        o.extend(self.extra.iter().cloned());
        o.join(",")
    }

    /// `qemu-img create -f qcow2 ...`; returns `path`. Relative backing names are checked
    /// by qemu-img relative to `path`'s directory.
    pub fn create(&self, path: &Path) -> PathBuf {
        let opts = self.options_string();
        let size = self.size.map(|s| s.to_string());
        let mut args = vec!["create", "-q", "-f", "qcow2"];
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        if let Some((name, fmt)) = &self.backing {
            args.extend(["-b", name, "-F", fmt]);
        }
        args.push(ps(path));
        if let Some(s) = &size {
            args.push(s);
        }
        qemu_img(&args);
        path.to_path_buf()
    }

    /// `qemu-img convert [-c] -O qcow2 -o OPTS src path` (size and backing are ignored).
    pub fn convert_from(&self, src: &Path, path: &Path, compress: bool) -> PathBuf {
        let opts = self.options_string();
        let mut args = vec!["convert", "-q"];
        if compress {
            args.push("-c");
        }
        args.extend(["-f", image_format(src), "-O", "qcow2"]);
        if !opts.is_empty() {
            args.extend(["-o", &opts]);
        }
        args.extend([ps(src), ps(path)]);
        qemu_img(&args);
        path.to_path_buf()
    }
}

/// Overwrites bytes of a file at `off` (for corrupting headers).
pub fn patch_bytes(path: &Path, off: u64, bytes: &[u8]) {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap_or_else(|e| panic!("open {path:?}: {e}"));
    f.write_all_at(bytes, off)
        .unwrap_or_else(|e| panic!("patch {path:?}@{off}: {e}"));
}

/// Writes a big-endian u32 at `off`.
pub fn patch_be32(path: &Path, off: u64, v: u32) {
    patch_bytes(path, off, &v.to_be_bytes());
}

/// Writes a big-endian u64 at `off`.
pub fn patch_be64(path: &Path, off: u64, v: u64) {
    patch_bytes(path, off, &v.to_be_bytes());
}

/// Reads a big-endian u64 at `off`.
pub fn read_be64(path: &Path, off: u64) -> u64 {
    let mut b = [0u8; 8];
    File::open(path)
        .unwrap()
        .read_exact_at(&mut b, off)
        .unwrap();
    u64::from_be_bytes(b)
}

/// A seed for this test's RNG: `STREAMFS_SEED` if set, else from the clock. Printed so a
/// failure can be reproduced.
pub fn test_seed() -> u64 {
    let seed = match std::env::var("STREAMFS_SEED") {
        Ok(s) => s.parse().expect("STREAMFS_SEED must be a u64"),
        Err(_) => std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos() as u64,
    };
    eprintln!(
        "{}: seed {seed} (rerun with STREAMFS_SEED={seed})",
        test_name()
    );
    seed
}

/// Deterministic bytes from `seed` (incompressible test data).
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = vec![0u8; len];
    StdRng::seed_from_u64(seed).fill(&mut v[..]);
    v
}

/// Fills `buf` with fast deterministic data derived from `seed` (splitmix64).
pub fn fill_splitmix(buf: &mut [u8], seed: u64) {
    let mut x = seed;
    for chunk in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^= z >> 31;
        chunk.copy_from_slice(&z.to_le_bytes()[..chunk.len()]);
    }
}

/// `len` bytes of [`fill_splitmix`] data for `seed`.
pub fn splitmix_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut v = vec![0u8; len];
    fill_splitmix(&mut v, seed);
    v
}

/// A backing chain base <- ... <- top made for a test. Build it with [`Chain::new`], then
/// optionally [`Chain::cluster`] and [`Chain::with_reference`].
#[derive(Clone, Debug)]
pub struct Chain {
    /// The leaf (what gets mounted).
    pub top: PathBuf,
    /// The other images of the chain, nearest first (the base last).
    pub backing: Vec<PathBuf>,
    /// A cluster size to aim random reads at.
    pub cluster: u64,
    /// The flattened contents recorded by [`Chain::with_reference`], and the same as a
    /// raw file for `qemu-img compare`.
    recorded: Option<(Vec<u8>, PathBuf)>,
}

impl Chain {
    /// `top` over `backing` (nearest first), random reads aimed at 64 KiB clusters, no
    /// reference recorded.
    pub fn new(top: PathBuf, backing: Vec<PathBuf>) -> Chain {
        Chain {
            top,
            backing,
            cluster: 64 * KIB,
            recorded: None,
        }
    }

    /// Aims random reads at `cluster`-byte clusters.
    pub fn cluster(mut self, cluster: u64) -> Chain {
        self.cluster = cluster;
        self
    }

    /// Records the chain's current flattened contents (per qemu-img) as its reference,
    /// also as the raw file `<dir>/<stem>.ref.raw` beside the top.
    pub fn with_reference(mut self) -> Chain {
        let reference = raw_reference(&self.top);
        let ref_raw = self.top.with_file_name(format!(
            "{}.ref.raw",
            self.top.file_stem().unwrap().to_string_lossy()
        ));
        create_raw_from(&ref_raw, &reference);
        self.recorded = Some((reference, ref_raw));
        self
    }

    /// The name streamfs gives the chain by default.
    pub fn name(&self) -> String {
        default_name(&self.top)
    }

    /// The reference recorded by [`Chain::with_reference`] (panics without one).
    pub fn reference(&self) -> &[u8] {
        &self.recorded().0
    }

    /// The length of the reference (the chain's virtual size when it was recorded).
    pub fn size(&self) -> u64 {
        self.reference().len() as u64
    }

    /// `qemu-img compare` finds the chain identical to the recorded reference.
    pub fn assert_compare(&self) {
        assert_identical_to_raw("chain vs reference", &self.top, &self.recorded().1);
    }

    fn recorded(&self) -> &(Vec<u8>, PathBuf) {
        self.recorded.as_ref().unwrap_or_else(|| {
            panic!(
                "no reference recorded for the chain of {:?} (Chain::with_reference)",
                self.top
            )
        })
    }
}

/// A qcow2 image of `size` bytes filled with incompressible random data (from `seed`).
pub fn random_qcow2(path: &Path, size: u64, seed: u64) -> PathBuf {
    let raw = path.with_file_name(format!(
        ".{}.src.raw",
        path.file_name().unwrap().to_string_lossy()
    ));
    create_raw_from(&raw, &random_bytes(seed, size as usize));
    Qcow2::new().convert_from(&raw, path, false);
    fs::remove_file(&raw).unwrap();
    path.to_path_buf()
}

/// qcow2 base <- mid <- top (64 KiB clusters, relative backing names) with overlapping
/// writes, zero clusters in mid hiding base data, and discards.
pub fn three_layers(s: &Scratch) -> Chain {
    let base = Qcow2::new().size(8 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 8M"]);
    let mid = Qcow2::new()
        .backing_name("base.qcow2", "qcow2")
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            "write -P 0x02 1M 2M",
            "write -z 4M 1M",
            "write -z 5246976 4k",
            "discard 6M 1M",
        ],
    );
    let top = Qcow2::new()
        .backing_name("mid.qcow2", "qcow2")
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            "write -P 0x03 1536k 1M",
            "write -P 0x04 4227072 64k",
            "write -z 7M 128k",
            "discard 2M 256k",
            "write -P 0x05 8388096 512",
        ],
    );
    Chain::new(top, vec![mid, base])
}

/// A valid v3 image with some data, `dir/name`.
pub fn valid_image(dir: &Path, name: &str) -> PathBuf {
    let img = Qcow2::new().size(16 * MIB).create(&dir.join(name));
    write_pattern(&img, 0x5a, 0, MIB);
    img
}

/// A valid image `dir/name` with a backing file `dir/name.base`.
pub fn valid_image_with_backing(dir: &Path, name: &str) -> PathBuf {
    let base = valid_image(dir, &format!("{name}.base"));
    Qcow2::new().backing(&base).create(&dir.join(name))
}
