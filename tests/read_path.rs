//! Reading through chains: mount real FUSE file systems over qcow2 chains made by qemu-img
//! and compare what the mount shows with what qemu-img says the chain contains (the read
//! matrix, copy-on-read, SEEK_DATA / SEEK_HOLE against `qemu-img map`, concurrent readers,
//! the fixtures themselves). Mount-time validation is in `tests/mount_validation.rs`, the
//! daemon's lifecycle in `tests/daemon_lifecycle.rs`.

mod common;

use common::*;
use std::fs::{self, File};
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

// ---------------------------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------------------------

/// Test data for a base image of `size` bytes: per `cluster`, alternately a compressible
/// pattern (changing every 512 bytes), incompressible random bytes and zeros.
fn mixed_data(size: u64, cluster: u64, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; size as usize];
    let random = random_bytes(seed, size as usize);
    for (k, chunk) in data.chunks_mut(cluster as usize).enumerate() {
        match k % 3 {
            0 => {
                for (j, b) in chunk.iter_mut().enumerate() {
                    *b = (k * 31 + j / 512) as u8 | 1;
                }
            }
            1 => chunk.copy_from_slice(&random[k * cluster as usize..][..chunk.len()]),
            _ => {}
        }
    }
    data
}

/// raw base <- qcow2 top.
fn raw_base(s: &Scratch) -> Chain {
    let base = create_raw(&s.join("base.raw"), 4 * MIB);
    qemu_io_cmds(
        &base,
        &[
            "write -P 0x11 0 1M",
            "write -P 0x22 1536k 512k",
            "write -P 0x33 3146728 5000",
        ],
    );
    let top = Qcow2::new().backing(&base).create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            "write -P 0xa1 512k 128k",
            "write -P 0xa2 1044480 8k",
            "write -z 2M 64k",
            "discard 3M 64k",
        ],
    );
    Chain::new(top, vec![base])
}

/// A raw base whose size (1000001 bytes) is not even a multiple of 512, under a larger top.
fn raw_base_odd_size(s: &Scratch) -> Chain {
    let base = create_raw_from(&s.join("base.raw"), &random_bytes(1000001, 1000001));
    let top = Qcow2::new()
        .size(2 * MIB)
        .backing(&base)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(&top, &["write -P 0xb1 64k 4k", "write -P 0xb2 960k 64k"]);
    Chain::new(top, vec![base])
}

/// Compressed base (`qemu-img convert -c`) <- mid <- top, all with cluster size `c` and
/// compression type `ctype`; mid and top have writes across cluster boundaries, zero
/// clusters, a compressed cluster and a discard.
fn compressed_chain(s: &Scratch, c: u64, size: u64, ctype: &str) -> Chain {
    let src = create_raw_from(&s.join("src.bin"), &mixed_data(size, c, c ^ size));
    let opts = Qcow2::new().cluster_size(c).compression_type(ctype);
    let base = opts.convert_from(&src, &s.join("base.qcow2"), true);
    fs::remove_file(&src).unwrap();
    let mid = opts
        .clone()
        .backing_name("base.qcow2", "qcow2")
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            &format!("write -P 0x61 {} {}", c / 2, c),
            &format!("write -z {} {}", 8 * c, c),
            &format!("write -P 0x62 {} 512", size - c / 2 - 512),
        ],
    );
    let top = opts
        .clone()
        .backing_name("mid.qcow2", "qcow2")
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            &format!("write -P 0x71 {} {}", c + c / 4 / 512 * 512, 2 * c),
            &format!("write -c -P 0x72 {} {}", 4 * c, c),
            &format!("discard {} {}", 5 * c, c),
            &format!("write -z {} 512", 6 * c + 512.min(c / 2)),
            &format!("write -c -P 0x73 {} {}", size - c, c),
        ],
    );
    Chain::new(top, vec![mid, base]).cluster(c)
}

/// extended_l2=on (mid: 32 KiB clusters, top: 64 KiB) over a plain base, with
/// subcluster-sized and unaligned writes, zero subclusters and whole zero clusters.
fn extended_l2(s: &Scratch) -> Chain {
    let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 4M"]);
    let mid = Qcow2::new()
        .extended_l2(true)
        .cluster_size(32 * KIB)
        .backing(&base)
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            "write -P 0x02 1k 1k",
            "write -P 0x03 33k 3000",
            "write -z 66k 4k",
            "write -z 128k 32k",
            "discard 192k 32k",
            "write -P 0x07 1M 100k",
        ],
    );
    let top = Qcow2::new()
        .extended_l2(true)
        .backing(&mid)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            "write -P 0x04 2k 2k",
            "write -P 0x05 70k 3k",
            "write -z 132k 2k",
            "write -z 256k 64k",
            "write -c -P 0x06 512k 64k",
            "write -z 1M 2k",
            "write -P 0x08 1050k 2k",
            "discard 2M 64k",
        ],
    );
    Chain::new(top, vec![mid, base]).cluster(2 * KIB)
}

/// compat=0.10 (qcow2 v2) chain with mixed cluster sizes; on v2, `write -z` writes zero
/// data and `discard` makes clusters unallocated (the backing shows through).
fn compat_010(s: &Scratch) -> Chain {
    let v2 = Qcow2::new().compat("0.10");
    let base = v2
        .clone()
        .size(4 * MIB)
        .cluster_size(4 * KIB)
        .create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 3M"]);
    let mid = v2
        .clone()
        .backing_name("base.qcow2", "qcow2")
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            "write -P 0x02 512k 512k",
            "write -z 1M 128k",
            "write -P 0x09 2M 512k",
            "discard 2M 256k",
        ],
    );
    let top = v2
        .clone()
        .cluster_size(16 * KIB)
        .backing_name("mid.qcow2", "qcow2")
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            "write -P 0x03 100k 50k",
            "write -P 0x04 2112k 64k",
            "discard 2112k 32k",
            "write -c -P 0x05 3M 16k",
        ],
    );
    Chain::new(top, vec![mid, base]).cluster(16 * KIB)
}

/// base, mid and top in three different directories; backing names relative to the
/// referencing image's directory (`relative`) or absolute.
fn other_dirs(s: &Scratch, relative: bool) -> Chain {
    let base = Qcow2::new()
        .size(4 * MIB)
        .create(&s.subdir("a").join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 2M"]);
    let mid_path = s.subdir("b").join("mid.qcow2");
    let mid = if relative {
        Qcow2::new().backing_name("../a/base.qcow2", "qcow2")
    } else {
        Qcow2::new().backing(&base)
    }
    .create(&mid_path);
    qemu_io_cmds(&mid, &["write -P 0x02 1M 2M"]);
    let top_path = s.subdir("c/deep").join("top.qcow2");
    let top = if relative {
        Qcow2::new().backing_name("../../b/mid.qcow2", "qcow2")
    } else {
        Qcow2::new().backing(&mid)
    }
    .create(&top_path);
    qemu_io_cmds(&top, &["write -P 0x03 1536k 1M"]);
    Chain::new(top, vec![mid, base])
}

/// Virtual sizes that are not multiples of the cluster size (base: 4 KiB clusters).
fn odd_size(s: &Scratch) -> Chain {
    let size = 5 * MIB + 3 * 512;
    let base = Qcow2::new()
        .size(size)
        .cluster_size(4 * KIB)
        .create(&s.join("base.qcow2"));
    qemu_io_cmds(
        &base,
        &[
            "write -P 0x01 0 4M",
            &format!("write -P 0x09 {} 3072", size - 3072),
        ],
    );
    let top = Qcow2::new().backing(&base).create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            &format!("write -P 0x0a {} 1024", size - 1024),
            &format!("write -z {} 64k", 4 * MIB - 32 * KIB),
        ],
    );
    Chain::new(top, vec![base])
}

/// Backing files smaller than the images above them (reads past a backing's end are
/// zeros), with writes straddling the backing's end.
fn smaller_backing(s: &Scratch) -> Chain {
    let base_size = 1536 * KIB + 512;
    let base = Qcow2::new().size(base_size).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &[&format!("write -P 0x01 0 {base_size}")]);
    let mid = Qcow2::new()
        .size(3 * MIB)
        .backing(&base)
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(&mid, &["write -P 0x02 1M 1M"]);
    let top = Qcow2::new()
        .size(6 * MIB)
        .backing(&mid)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            &format!("write -P 0x03 {} 3072", base_size - 1536),
            "write -P 0x04 3070k 4k",
        ],
    );
    Chain::new(top, vec![mid, base])
}

/// A backing file larger than the top: only the top's virtual size is visible.
fn larger_backing(s: &Scratch) -> Chain {
    let base = Qcow2::new().size(8 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 1M", "write -P 0x01 1536k 6M"]);
    let top = Qcow2::new()
        .size(2 * MIB + 512)
        .backing(&base)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(&top, &["write -P 0x02 2M 512"]);
    Chain::new(top, vec![base])
}

/// A 16-image chain; every layer writes its own (unaligned, overlapping) range and every
/// other layer zeroes a cluster.
fn deep_chain(s: &Scratch) -> Chain {
    let base = Qcow2::new().size(4 * MIB).create(&s.join("layer00.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x10 0 2M"]);
    let mut images = vec![base];
    for i in 1..16u64 {
        let name = format!("layer{i:02}.qcow2");
        let below = images
            .last()
            .unwrap()
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        let img = Qcow2::new()
            .backing_name(&below, "qcow2")
            .create(&s.join(&name));
        let mut cmds = vec![format!(
            "write -P {:#x} {} {}",
            0x10 + i,
            i * 256 * KIB + i * 512,
            64 * KIB + i * 512
        )];
        if i % 2 == 0 {
            cmds.push(format!("write -z {} 64k", i * 256 * KIB - 128 * KIB));
        }
        let cmds: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_cmds(&img, &cmds);
        images.push(img);
    }
    let top = images.pop().unwrap();
    images.reverse();
    Chain::new(top, images)
}

/// base <- leaf created with `leaf` options (refcount width, lazy refcounts,
/// preallocation): copy-on-read must keep the leaf's metadata valid.
fn leaf_with_options(s: &Scratch, leaf: Qcow2) -> Chain {
    let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 3M"]);
    let top = leaf.backing(&base).create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            "write -P 0x02 100k 10k",
            "write -z 1M 64k",
            "write -P 0x03 2100224 70k",
        ],
    );
    Chain::new(top, vec![base])
}

/// A 6 MiB random base under a leaf with 512-byte clusters and 64-bit refcounts: one
/// refcount block covers only 32 KiB and the first refcount table 2 MiB of the leaf, so
/// copying the base into the leaf must grow the refcount table several times.
fn refcount_table_growth(s: &Scratch) -> Chain {
    let base = create_raw_from(&s.join("src.raw"), &random_bytes(6, 6 * MIB as usize));
    let base = Qcow2::new().convert_from(&base, &s.join("base.qcow2"), false);
    fs::remove_file(s.join("src.raw")).unwrap();
    qemu_io_cmds(&base, &["write -z 5M 512k"]);
    let top = Qcow2::new()
        .cluster_size(512)
        .option("refcount_bits=64")
        .backing(&base)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(&top, &["write -P 0x02 1000k 3k", "write -z 2M 4k"]);
    Chain::new(top, vec![base]).cluster(512)
}

/// extended_l2 with 2 MiB clusters (64 KiB subclusters) over a 4 KiB-cluster base.
fn extended_l2_2m(s: &Scratch) -> Chain {
    let base = Qcow2::new()
        .size(8 * MIB)
        .cluster_size(4 * KIB)
        .create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 7M"]);
    let top = Qcow2::new()
        .cluster_size(2 * MIB)
        .extended_l2(true)
        .backing(&base)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            "write -P 0x02 64k 64k",
            "write -P 0x03 2200k 10k",
            "write -z 4M 128k",
            "write -P 0x04 6M 2M",
            "write -z 6400k 64k",
        ],
    );
    Chain::new(top, vec![base])
}

type Builder = fn(&Scratch) -> Chain;

/// Every chain of the read matrix, by name.
fn all_cases() -> Vec<(&'static str, Builder)> {
    vec![
        ("raw_base", raw_base),
        ("raw_base_odd_size", raw_base_odd_size),
        ("three_layers", three_layers),
        ("zlib_64k", |s| {
            compressed_chain(s, 64 * KIB, 8 * MIB, "zlib")
        }),
        ("zstd_64k", |s| {
            compressed_chain(s, 64 * KIB, 8 * MIB, "zstd")
        }),
        ("zlib_512", |s| compressed_chain(s, 512, 2 * MIB, "zlib")),
        ("zstd_4k", |s| compressed_chain(s, 4 * KIB, 4 * MIB, "zstd")),
        ("zlib_2m", |s| {
            compressed_chain(s, 2 * MIB, 24 * MIB, "zlib")
        }),
        ("extended_l2", extended_l2),
        ("compat_010", compat_010),
        ("relative_dirs", |s| other_dirs(s, true)),
        ("absolute_dirs", |s| other_dirs(s, false)),
        ("odd_size", odd_size),
        ("smaller_backing", smaller_backing),
        ("larger_backing", larger_backing),
        ("deep_chain", deep_chain),
        ("refcount_table_growth", refcount_table_growth),
        ("extended_l2_2m", extended_l2_2m),
        ("refcount_bits_1", |s| {
            leaf_with_options(s, Qcow2::new().option("refcount_bits=1"))
        }),
        ("refcount_bits_64_lazy", |s| {
            leaf_with_options(
                s,
                Qcow2::new()
                    .option("refcount_bits=64")
                    .option("lazy_refcounts=on"),
            )
        }),
        ("prealloc_metadata_extended_l2", |s| {
            leaf_with_options(
                s,
                Qcow2::new()
                    .size(4 * MIB)
                    .extended_l2(true)
                    .option("preallocation=metadata"),
            )
        }),
    ]
}

// ---------------------------------------------------------------------------------------------
// 1. Read matrix
// ---------------------------------------------------------------------------------------------

#[derive(Clone, Copy, Debug, PartialEq)]
enum Mode {
    ReadOnly,
    NoCopyOnRead,
    CopyOnRead,
}

impl Mode {
    fn args(self) -> &'static [&'static str] {
        match self {
            Mode::ReadOnly => &["--read-only"],
            Mode::NoCopyOnRead => &["--no-copy-on-read"],
            Mode::CopyOnRead => &[],
        }
    }
}

/// Checks the mounted `path` against `reference`: size, ~200 random preads (first, so that
/// in copy-on-read mode they hit uncopied data), the whole file, and the whole file again
/// with O_DIRECT 1 MiB reads.
fn check_mounted_file(path: &Path, reference: &Arc<[u8]>, cluster: u64, seed: u64) {
    let p = path.to_path_buf();
    let meta = with_timeout("stat", IO_TIMEOUT, move || fs::metadata(&p))
        .unwrap_or_else(|e| panic!("stat {path:?}: {e}"));
    assert!(meta.is_file(), "{path:?} is not a regular file");
    assert_eq!(meta.len(), reference.len() as u64, "size of {path:?}");
    check_random_preads(path, reference.clone(), cluster, 200, seed);
    assert_bytes_eq(&format!("read of {path:?}"), &read_file(path), reference);
    assert_bytes_eq(
        &format!("O_DIRECT read of {path:?}"),
        &read_file_direct(path, MIB as usize),
        reference,
    );
}

/// The read matrix for one chain: read-only, no-copy-on-read and default (copy-on-read)
/// mounts all show the reference; backing files are never modified; the leaf is untouched
/// by the first two modes and still passes `qemu-img check` (with the same contents)
/// after copy-on-read.
fn read_matrix(build: Builder) {
    let s = Scratch::new();
    let chain = build(&s);
    let reference: Arc<[u8]> = raw_reference(&chain.top).into();
    assert_eq!(reference.len() as u64, virtual_size(&chain.top));
    let seed = test_seed();
    let name = default_name(&chain.top);
    let backing_before: Vec<Vec<u8>> = chain.backing.iter().map(|p| fs::read(p).unwrap()).collect();
    for mode in [Mode::ReadOnly, Mode::NoCopyOnRead, Mode::CopyOnRead] {
        eprintln!("mode {mode:?}");
        let top_before = fs::read(&chain.top).unwrap();
        let m = s.mount(&[&chain.top], mode.args());
        check_mounted_file(&m.file(&name), &reference, chain.cluster, seed);
        m.umount();
        if mode == Mode::CopyOnRead {
            qemu_img_check(&chain.top);
            assert_all_data_in_leaf(&chain.top);
            assert_bytes_eq(
                "leaf contents after copy-on-read",
                &raw_reference(&chain.top),
                &reference,
            );
        } else {
            assert!(
                fs::read(&chain.top).unwrap() == top_before,
                "{mode:?} mount modified the leaf {:?}",
                chain.top
            );
        }
        for (p, before) in chain.backing.iter().zip(&backing_before) {
            assert!(
                fs::read(p).unwrap() == *before,
                "{mode:?} mount modified backing file {p:?}"
            );
        }
    }
}

macro_rules! read_matrix_tests {
    ($($test:ident => $case:expr;)*) => {$(
        #[test]
        fn $test() {
            require_fuse!();
            read_matrix($case);
        }
    )*};
}

read_matrix_tests! {
    read_raw_base_qcow2_top => raw_base;
    read_raw_base_odd_size => raw_base_odd_size;
    read_three_layers_zero_and_discard => three_layers;
    read_compressed_zlib_64k => |s| compressed_chain(s, 64 * KIB, 8 * MIB, "zlib");
    read_compressed_zstd_64k => |s| compressed_chain(s, 64 * KIB, 8 * MIB, "zstd");
    read_cluster_512 => |s| compressed_chain(s, 512, 2 * MIB, "zlib");
    read_cluster_4k => |s| compressed_chain(s, 4 * KIB, 4 * MIB, "zstd");
    read_cluster_2m => |s| compressed_chain(s, 2 * MIB, 24 * MIB, "zlib");
    read_extended_l2_subclusters => extended_l2;
    read_compat_010 => compat_010;
    read_backing_other_dir_relative => |s| other_dirs(s, true);
    read_backing_other_dir_absolute => |s| other_dirs(s, false);
    read_size_not_cluster_multiple => odd_size;
    read_backing_smaller_than_top => smaller_backing;
    read_backing_larger_than_top => larger_backing;
    read_deep_chain_16 => deep_chain;
    read_leaf_refcount_table_growth => refcount_table_growth;
    read_extended_l2_2m_clusters => extended_l2_2m;
    read_leaf_refcount_bits_1 => |s| leaf_with_options(s, Qcow2::new().option("refcount_bits=1"));
    read_leaf_refcount_bits_64_lazy_refcounts => |s| {
        leaf_with_options(s, Qcow2::new().option("refcount_bits=64").option("lazy_refcounts=on"))
    };
    read_leaf_preallocated_extended_l2 => |s| {
        leaf_with_options(
            s,
            Qcow2::new().size(4 * MIB).extended_l2(true).option("preallocation=metadata"),
        )
    };
}

/// Relative IMAGE and MOUNTPOINT arguments are resolved against the caller's cwd.
#[test]
fn read_with_relative_arguments() {
    require_fuse!();
    let s = Scratch::new();
    let chain = other_dirs(&s, true);
    let reference: Arc<[u8]> = raw_reference(&chain.top).into();
    fs::create_dir(s.join("relmnt")).unwrap();
    let m = MountCmd::new()
        .cwd(s.path())
        .at("relmnt")
        .arg("--read-only")
        .image("c/deep/top.qcow2")
        .run()
        .unwrap_or_else(|f| panic!("mount with relative paths: {f}"));
    assert_eq!(m.path(), fs::canonicalize(s.path()).unwrap().join("relmnt"));
    assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
    m.umount();
}

/// After a copy-on-read pass over the whole file, qemu-img map of the leaf shows no data
/// still coming from a backing file.
fn assert_all_data_in_leaf(top: &Path) {
    let from_backing: Vec<MapEntry> = qemu_img_map(top)
        .into_iter()
        .filter(|e| e.data && e.depth > 0)
        .collect();
    assert!(
        from_backing.is_empty(),
        "after reading the whole file with copy-on-read these ranges are still read from backing files: {from_backing:?}"
    );
}

/// After reading everything with copy-on-read, all data of the chain lives in the leaf.
#[test]
fn copy_on_read_populates_leaf() {
    require_fuse!();
    let s = Scratch::new();
    let chain = three_layers(&s);
    let reference = raw_reference(&chain.top);
    let m = s.mount(&[&chain.top], &[]);
    assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
    m.umount();
    qemu_img_check(&chain.top);
    assert_all_data_in_leaf(&chain.top);
    assert_bytes_eq(
        "leaf after copy-on-read",
        &raw_reference(&chain.top),
        &reference,
    );
}

/// Copy-on-read into a leaf that has an internal snapshot: the snapshot shares the leaf's
/// L2 tables and clusters (refcount 2), so filling them in place would change the
/// snapshot. Either streamfs refuses such a leaf cleanly, or after a full copy-on-read pass
/// the snapshot still reads as before and `qemu-img check` passes.
fn cor_with_internal_snapshot(extended_l2: bool) {
    let s = Scratch::new();
    let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 4M"]);
    let top = Qcow2::new()
        .extended_l2(extended_l2)
        .backing(&base)
        .create(&s.join("top.qcow2"));
    // Partly written clusters (subclusters with extended L2), whole clusters, and clusters
    // sharing an L2 table with unallocated ones.
    qemu_io_cmds(
        &top,
        &[
            "write -P 0x02 2k 2k",
            "write -P 0x03 1M 64k",
            "write -P 0x04 2054k 4k",
        ],
    );
    qemu_img(&["snapshot", "-c", "snap1", ps(&top)]);
    let snapshot_before = snapshot_contents(&s, &top, "snap1");
    let reference = raw_reference(&top);
    match s.try_mount(&[&top], &[]) {
        Err(f) => {
            assert!(f.stderr.contains("top.qcow2"), "{f}");
            eprintln!("leaf with internal snapshots refused: {}", f.stderr.trim());
            // Read-only never writes, so it must work and show the active layer.
            let m = s.mount(&[&top], &["--read-only"]);
            assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
            m.umount();
        }
        Ok(m) => {
            assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
            m.umount();
            qemu_img_check(&top);
            assert_bytes_eq(
                "active layer after copy-on-read",
                &raw_reference(&top),
                &reference,
            );
            assert_bytes_eq(
                "internal snapshot after copy-on-read",
                &snapshot_contents(&s, &top, "snap1"),
                &snapshot_before,
            );
        }
    }
}

/// The contents of internal snapshot `name` of `image` (flattened with its backing chain).
fn snapshot_contents(s: &Scratch, image: &Path, name: &str) -> Vec<u8> {
    let out = s.join(format!("{name}.snapshot.raw"));
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "qcow2",
        "-l",
        &format!("snapshot.name={name}"),
        "-O",
        "raw",
        ps(image),
        ps(&out),
    ]);
    let data = fs::read(&out).unwrap();
    fs::remove_file(&out).unwrap();
    data
}

#[test]
fn copy_on_read_preserves_internal_snapshot() {
    require_fuse!();
    cor_with_internal_snapshot(false);
}

#[test]
fn copy_on_read_preserves_internal_snapshot_extended_l2() {
    require_fuse!();
    cor_with_internal_snapshot(true);
}

/// A leaf with an external data file (incompatible bit 2) is either read correctly or
/// refused with a clean message naming it.
#[test]
fn external_data_file_is_read_or_refused() {
    require_fuse!();
    let s = Scratch::new();
    let base = Qcow2::new().size(2 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 2M"]);
    let top = Qcow2::new()
        // Absolute: qemu-img creates a relative data file in its working directory.
        .option(&format!("data_file={}", s.join("top.data").display()))
        .backing(&base)
        .create(&s.join("top.qcow2"));
    qemu_io_cmds(&top, &["write -P 0x02 64k 64k"]);
    let reference = raw_reference(&top);
    match s.try_mount(&[&top], &["--read-only"]) {
        Err(f) => {
            assert!(f.stderr.contains("top.qcow2"), "{f}");
            eprintln!("external data file refused: {}", f.stderr.trim());
        }
        Ok(m) => {
            assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
            m.umount();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 2. SEEK_DATA / SEEK_HOLE
// ---------------------------------------------------------------------------------------------

/// What SEEK_DATA and SEEK_HOLE at `off` must return for a file of `size` bytes whose data
/// extents are `extents` (None = ENXIO).
fn expected_seek(extents: &[Range<u64>], size: u64, off: u64) -> (Option<u64>, Option<u64>) {
    if off >= size {
        return (None, None);
    }
    let data = extents
        .iter()
        .find(|r| r.end > off)
        .map(|r| r.start.max(off));
    let hole = match extents.iter().find(|r| r.contains(&off)) {
        Some(r) => r.end,
        None => off,
    };
    (data, Some(hole))
}

/// Data extents by SEEK_DATA/SEEK_HOLE of the mounted chain equal qemu-img map's
/// `"data": true` ranges; plus 200 random-offset probes and the probes at and past EOF.
fn check_seek(build: Builder, seed: u64) -> Result<(), String> {
    let s = Scratch::new();
    let chain = build(&s);
    let size = virtual_size(&chain.top);
    let want = map_data_extents(&chain.top);
    let m = s.mount(&[&chain.top], &["--read-only"]);
    let path = m.file(&default_name(&chain.top));
    let want2 = want.clone();
    let result = with_timeout("lseek probes", IO_TIMEOUT, move || -> Result<(), String> {
        let f = File::open(&path).map_err(|e| format!("open: {e}"))?;
        let got = data_extents_by_seek(&f, size).map_err(|e| format!("lseek: {e}"))?;
        if got != want2 {
            return Err(format!(
                "SEEK_DATA/SEEK_HOLE extents {got:?}\n qemu-img map data extents {want2:?}"
            ));
        }
        let mut rng = StdRng::seed_from_u64(seed);
        let mut probes: Vec<u64> = (0..200).map(|_| rng.gen_range(0..size + 4096)).collect();
        probes.extend([0, size - 1, size, size + 1, size + MIB]);
        probes.extend(
            want2
                .iter()
                .flat_map(|r| [r.start, r.end, r.end.saturating_sub(1)]),
        );
        for off in probes {
            let got = (
                seek_data(&f, off).map_err(|e| format!("SEEK_DATA({off}): {e}"))?,
                seek_hole(&f, off).map_err(|e| format!("SEEK_HOLE({off}): {e}"))?,
            );
            let exp = expected_seek(&want2, size, off);
            if got != exp {
                return Err(format!(
                    "at {off}: (SEEK_DATA, SEEK_HOLE) = {got:?}, expected {exp:?} (None = ENXIO)"
                ));
            }
        }
        Ok(())
    });
    m.umount();
    result
}

#[test]
fn seek_data_hole_matches_qemu_img_map() {
    require_fuse!();
    let seed = test_seed();
    let mut failures = Vec::new();
    for (name, build) in all_cases() {
        eprintln!("case {name}");
        if let Err(e) = check_seek(build, seed) {
            failures.push(format!("{name}: {e}"));
        }
    }
    assert!(
        failures.is_empty(),
        "SEEK_DATA/SEEK_HOLE disagree with qemu-img map (seed {seed}):\n{}",
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency
// ---------------------------------------------------------------------------------------------

fn concurrent_reads(build: Builder, args: &[&str]) {
    let s = Scratch::new();
    let chain = build(&s);
    let reference: Arc<[u8]> = raw_reference(&chain.top).into();
    let seed = test_seed();
    let cor = !args.contains(&"--read-only") && !args.contains(&"--no-copy-on-read");
    let m = s.mount(&[&chain.top], args);
    let reads = check_concurrent_preads(
        &m.file("top.raw"),
        reference.clone(),
        chain.cluster,
        8,
        Duration::from_secs(3),
        seed,
    );
    eprintln!("{reads} concurrent reads");
    assert!(reads >= 8, "only {reads} reads completed in 3 s");
    assert_bytes_eq(
        "top.raw after concurrent reads",
        &read_file(&m.file("top.raw")),
        &reference,
    );
    m.umount();
    qemu_img_check(&chain.top);
    if cor {
        assert_all_data_in_leaf(&chain.top);
    }
    assert_bytes_eq(
        "leaf after concurrent reads",
        &raw_reference(&chain.top),
        &reference,
    );
}

#[test]
fn concurrent_reads_copy_on_read() {
    require_fuse!();
    concurrent_reads(three_layers, &[]);
}

#[test]
fn concurrent_reads_read_only() {
    require_fuse!();
    concurrent_reads(three_layers, &["--read-only"]);
}

/// Copy-on-read racing on partly allocated extended-L2 clusters.
#[test]
fn concurrent_reads_copy_on_read_extended_l2() {
    require_fuse!();
    concurrent_reads(extended_l2, &[]);
}

/// Copy-on-read racing on 512-byte clusters (many L2 tables, compressed base).
#[test]
fn concurrent_reads_copy_on_read_cluster_512() {
    require_fuse!();
    concurrent_reads(|s| compressed_chain(s, 512, 2 * MIB, "zlib"), &[]);
}

#[test]
fn concurrent_reads_no_copy_on_read_2m_clusters() {
    require_fuse!();
    concurrent_reads(
        |s| compressed_chain(s, 2 * MIB, 24 * MIB, "zstd"),
        &["--no-copy-on-read"],
    );
}

/// Two leaves over one shared base (a golden image), both copying-on-read at once: each
/// file shows its own chain, both leaves stay consistent, the base is never written.
#[test]
fn two_chains_sharing_a_base() {
    require_fuse!();
    let s = Scratch::new();
    let base = Qcow2::new().size(8 * MIB).create(&s.join("golden.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x01 0 6M"]);
    let vm1 = Qcow2::new().backing(&base).create(&s.join("vm1.qcow2"));
    qemu_io_cmds(&vm1, &["write -P 0x11 1M 1M", "write -z 4M 64k"]);
    let vm2 = Qcow2::new().backing(&base).create(&s.join("vm2.qcow2"));
    qemu_io_cmds(&vm2, &["write -P 0x22 1536k 1M", "discard 5M 128k"]);
    let base_before = fs::read(&base).unwrap();
    let refs: Vec<Arc<[u8]>> = [&vm1, &vm2]
        .iter()
        .map(|p| raw_reference(p).into())
        .collect();
    let m = s.mount(&[&vm1, &vm2], &[]);
    let seed = test_seed();
    let handles: Vec<_> = ["vm1.raw", "vm2.raw"]
        .iter()
        .zip(&refs)
        .map(|(name, r)| {
            let (path, r) = (m.file(name), r.clone());
            std::thread::spawn(move || {
                check_concurrent_preads(&path, r, 64 * KIB, 4, Duration::from_secs(2), seed)
            })
        })
        .collect();
    for h in handles {
        h.join().expect("reader panicked");
    }
    for (name, r) in ["vm1.raw", "vm2.raw"].iter().zip(&refs) {
        assert_bytes_eq(name, &read_file(&m.file(name)), r);
    }
    m.umount();
    for (img, r) in [&vm1, &vm2].iter().zip(&refs) {
        qemu_img_check(img);
        assert_all_data_in_leaf(img);
        assert_bytes_eq("leaf after copy-on-read", &raw_reference(img), r);
    }
    assert!(
        fs::read(&base).unwrap() == base_before,
        "shared base was modified"
    );
}

// ---------------------------------------------------------------------------------------------
// 4. The fixtures
// ---------------------------------------------------------------------------------------------

/// The fixtures themselves (no FUSE needed): every chain builds, passes `qemu-img check`,
/// and really contains what its case is about (compressed clusters, zero clusters, ...),
/// so the read matrix covers what it claims to.
#[test]
fn fixtures_cover_their_features() {
    for (name, build) in all_cases() {
        let s = Scratch::new();
        let chain = build(&s);
        for img in chain.backing.iter().chain([&chain.top]) {
            if image_format(img) == "qcow2" {
                qemu_img_check(img);
            }
        }
        let map = qemu_img_map(&chain.top);
        let size = virtual_size(&chain.top);
        assert_eq!(map.last().map(|e| e.start + e.length), Some(size), "{name}");
        let has = |f: &dyn Fn(&MapEntry) -> bool| map.iter().any(f);
        assert!(has(&|e| e.data), "{name}: no data at all");
        assert!(has(&|e| !e.data), "{name}: no holes at all");
        assert!(
            has(&|e| e.data && e.depth > 0),
            "{name}: nothing read from backing"
        );
        if name.starts_with("zlib") || name.starts_with("zstd") {
            assert!(
                has(&|e| e.compressed && e.depth == 0),
                "{name}: no compressed cluster in top"
            );
            assert!(
                has(&|e| e.compressed && e.depth == 2),
                "{name}: no compressed cluster in base"
            );
            assert!(
                has(&|e| e.data && !e.compressed && e.depth == 2),
                "{name}: base all compressed"
            );
            assert!(
                has(&|e| !e.data && e.zero && e.depth == 1),
                "{name}: no zero cluster in mid"
            );
        }
        if name == "three_layers" || name == "extended_l2" {
            assert!(
                has(&|e| !e.data && e.depth == 1),
                "{name}: no zero cluster in mid"
            );
            assert!(
                has(&|e| !e.data && e.depth == 0),
                "{name}: no zero cluster in top"
            );
        }
        if name == "extended_l2" {
            assert!(
                has(&|e| e.length < 64 * KIB && e.start % (64 * KIB) != 0),
                "{name}: no subcluster-granular extent"
            );
        }
        if name == "compat_010" {
            assert_eq!(
                qemu_img_info(&chain.top)["format-specific"]["data"]["compat"],
                "0.10"
            );
        }
    }
}
