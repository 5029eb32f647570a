//! The write model (issue 3, test 2): thousands of random writes, punches and zero ranges
//! through the mount, applied to an in-memory model of the disk as well; every read through
//! the mount must equal the model, and after unmount `qemu-img compare` leaf-vs-model must
//! be identical and `qemu-img check` clean (no leaks either).
//!
//! `STREAMFS_SEED` reproduces a run; `STREAMFS_MODEL_OPS` changes the number of operations
//! per configuration (default 3000).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

// ---------------------------------------------------------------------------------------------
// The chain
// ---------------------------------------------------------------------------------------------

#[derive(Clone)]
struct Setup {
    leaf: PathBuf,
    size: u64,
    cluster: u64,
    /// Leaf clusters prepared as compressed or zero clusters (targets for the writes).
    special: Vec<u64>,
}

/// base (64 KiB clusters; random, pattern and zero data) <- mid (32 KiB clusters; data,
/// zero clusters hiding base data, a compressed cluster) <- leaf (`leaf_opts`, cluster
/// `c`; data, compressed clusters, zero clusters, a discard).
fn build(s: &Scratch, size: u64, c: u64, leaf_opts: Qcow2, seed: u64) -> Setup {
    let mut data = vec![0u8; size as usize];
    for (k, chunk) in data.chunks_mut(64 * KIB as usize).enumerate() {
        match k % 5 {
            0 | 1 => fill_splitmix(chunk, seed ^ k as u64),
            2 => chunk.fill(0x10 + (k % 7) as u8),
            3 => fill_splitmix(&mut chunk[..5000], seed ^ !(k as u64)),
            _ => {}
        }
    }
    let raw = create_raw_from(&s.join("base-data.raw"), &data);
    drop(data);
    let base = Qcow2::new()
        .cluster_size(64 * KIB)
        .convert_from(&raw, &s.join("base.qcow2"), false);
    fs::remove_file(&raw).unwrap();
    qemu_io_cmds(&base, &[&format!("write -z {} {}", size / 2, MIB)]);

    let mid = Qcow2::new()
        .cluster_size(32 * KIB)
        .backing(&base)
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            &format!("write -P 0x21 {} {}", size / 8, MIB),
            &format!("write -z {} {}", size / 4, MIB),
            &format!("write -c -P 0x22 {} 32k", size / 4 + 2 * MIB),
            &format!("write -P 0x23 {} 3333", size / 3 + 777),
        ],
    );

    let leaf = leaf_opts.backing(&mid).create(&s.join("top.qcow2"));
    let n = size / c;
    let special: Vec<u64> = vec![3, 4, 7, n / 2 + 1, n - 2, 2, 5, n / 2 + 3];
    let (comp, zero) = special.split_at(5);
    let mut cmds: Vec<String> = vec![
        format!("write -P 0x31 {} {}", c / 2, c),
        format!("write -P 0x32 {} 1000", size / 5 + 12345),
    ];
    for (i, k) in comp.iter().enumerate() {
        cmds.push(format!("write -c -P {:#x} {} {}", 0x40 + i, k * c, c));
    }
    for k in zero {
        cmds.push(format!("write -z {} {}", k * c, c));
    }
    cmds.push(format!("discard {} {}", (n - 4) * c, c));
    qemu_io_cmds(&leaf, &cmds.iter().map(|s| s.as_str()).collect::<Vec<_>>());
    Setup {
        leaf,
        size,
        cluster: c,
        special: special.iter().map(|k| k * c).collect(),
    }
}

// ---------------------------------------------------------------------------------------------
// The workload
// ---------------------------------------------------------------------------------------------

fn gen_off(rng: &mut StdRng, st: &Setup) -> u64 {
    let c = st.cluster;
    let size = st.size;
    match rng.gen_range(0..20) {
        0..=5 => (rng.gen_range(0..size / c) * c).saturating_add_signed(rng.gen_range(-3..=3)),
        6..=7 => st.special[rng.gen_range(0..st.special.len())] + rng.gen_range(0..c / 512) * 512,
        8..=10 => rng.gen_range(0..size / 512) * 512,
        11..=12 => rng.gen_range(0..size / 4096) * 4096,
        13 => size - rng.gen_range(1..=2 * c).min(size),
        _ => rng.gen_range(0..size),
    }
    .min(size - 1)
}

fn gen_len(rng: &mut StdRng, st: &Setup) -> u64 {
    let c = st.cluster;
    match rng.gen_range(0..12) {
        0 => rng.gen_range(1..=16),
        1..=2 => rng.gen_range(1..=16) * 512,
        3 => c,
        4 => (c * rng.gen_range(1..=3) + rng.gen_range(0..2) * rng.gen_range(1..4096)).min(4 * MIB),
        5..=6 => rng.gen_range(1..=16) * 4096,
        _ => rng.gen_range(1..=(3 * c).min(MIB)),
    }
}

#[derive(Default, Debug)]
struct Stats {
    writes: u64,
    direct_writes: u64,
    punches: u64,
    zero_ranges: u64,
    syncs: u64,
    reads: u64,
    full_checks: u64,
}

fn full_check(file: &Path, model: &[u8], what: &str) {
    let got = read_file_direct(file, MIB as usize);
    assert_bytes_eq(what, &got, model);
}

/// Runs `ops` random operations on the mounted `file` and on `model`; returns the model.
fn workload(file: PathBuf, st: &Setup, mut model: Vec<u8>, ops: usize, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let f = open_rw(&file).expect("open read-write");
    let d = open_rw_direct(&file).expect("open read-write O_DIRECT");
    let size = st.size;
    let mut stats = Stats::default();
    for i in 0..ops {
        let ctx = |what: String| format!("op #{i}: {what} (seed {seed})");
        match rng.gen_range(0..100) {
            0..=57 => {
                let off = gen_off(&mut rng, st);
                let len = gen_len(&mut rng, st).min(size - off);
                let mut data = vec![0u8; len as usize];
                match rng.gen_range(0..10) {
                    0 => {}
                    1..=2 => data.fill(rng.gen()),
                    _ => fill_splitmix(&mut data, rng.gen()),
                }
                f.write_all_at(&data, off)
                    .unwrap_or_else(|e| panic!("{}", ctx(format!("write {len}@{off}: {e}"))));
                model[off as usize..(off + len) as usize].copy_from_slice(&data);
                stats.writes += 1;
            }
            58..=67 => {
                let off = gen_off(&mut rng, st) / 4096 * 4096;
                let len = (gen_len(&mut rng, st).div_ceil(4096) * 4096).min(size - off);
                let mut buf = AlignedBuf::new(len as usize, 4096);
                fill_splitmix(&mut buf, rng.gen());
                let n = d.write_at(&buf, off).unwrap_or_else(|e| {
                    panic!("{}", ctx(format!("O_DIRECT write {len}@{off}: {e}")))
                });
                assert_eq!(
                    n as u64,
                    len,
                    "{}",
                    ctx(format!("short O_DIRECT write {len}@{off}"))
                );
                model[off as usize..(off + len) as usize].copy_from_slice(&buf);
                stats.direct_writes += 1;
            }
            68..=83 => {
                let punch = rng.gen_bool(0.5);
                let off = gen_off(&mut rng, st);
                let len = gen_len(&mut rng, st).min(size - off);
                let mode = if punch { PUNCH } else { ZERO_RANGE };
                fallocate(&f, mode, off, len).unwrap_or_else(|e| {
                    panic!("{}", ctx(format!("fallocate({mode:#x}, {len}@{off}): {e}")))
                });
                model[off as usize..(off + len) as usize].fill(0);
                if punch {
                    stats.punches += 1
                } else {
                    stats.zero_ranges += 1
                }
            }
            84..=85 => {
                if rng.gen_bool(0.5) {
                    f.sync_all()
                } else {
                    d.sync_data()
                }
                .unwrap_or_else(|e| panic!("{}", ctx(format!("fsync: {e}"))));
                stats.syncs += 1;
            }
            86..=92 => {
                let (off, len) = random_read(&mut rng, size, st.cluster);
                check_pread(&f, &model, off, len).unwrap_or_else(|e| panic!("{}", ctx(e)));
                stats.reads += 1;
            }
            _ => {
                let (off, len) = random_read(&mut rng, size, st.cluster);
                let off = off / 4096 * 4096;
                let len = len.div_ceil(4096) * 4096;
                check_direct_pread(&d, &model, off, len).unwrap_or_else(|e| panic!("{}", ctx(e)));
                stats.reads += 1;
            }
        }
        if (i + 1) % 750 == 0 {
            full_check(
                &file,
                &model,
                &format!("full read after op #{i} (seed {seed})"),
            );
            stats.full_checks += 1;
        }
    }
    full_check(
        &file,
        &model,
        &format!("full O_DIRECT read at the end (seed {seed})"),
    );
    assert_bytes_eq(
        &format!("full buffered read at the end (seed {seed})"),
        &std::fs::read(&file).expect("buffered read"),
        &model,
    );
    eprintln!("{stats:?}");
    model
}

fn run_model(size: u64, c: u64, leaf_opts: Qcow2) {
    require_fuse!();
    let seed = test_seed();
    let ops: usize = std::env::var("STREAMFS_MODEL_OPS")
        .map(|v| v.parse().expect("STREAMFS_MODEL_OPS"))
        .unwrap_or(3000);
    let s = Scratch::new();
    let st = build(&s, size, c, leaf_opts, seed);
    let info_before = qemu_img_info(&st.leaf);
    let model = raw_reference(&st.leaf);
    let m = s.mount(&[&st.leaf], &[]);
    let file = m.file("top.raw");
    let setup = st.clone();
    let model = with_timeout(
        "write model workload",
        std::time::Duration::from_secs(150),
        move || workload(file, &setup, model, ops, seed),
    );
    m.umount();

    let (code, text) = check_status(&st.leaf);
    assert_eq!(
        code, 0,
        "qemu-img check after the workload (seed {seed}):\n{text}"
    );
    let raw = create_raw_from(&s.join("model.raw"), &model);
    assert_identical_to_raw(&format!("leaf vs model (seed {seed})"), &st.leaf, &raw);
    let info = qemu_img_info(&st.leaf);
    assert_eq!(
        info["format-specific"]["data"]["compat"], info_before["format-specific"]["data"]["compat"],
        "compat level changed"
    );
    assert_eq!(
        info["format-specific"]["data"]["extended-l2"],
        info_before["format-specific"]["data"]["extended-l2"],
        "extended-l2 changed"
    );
    assert_eq!(info["cluster-size"], info_before["cluster-size"]);
}

#[test]
fn write_model_4k_clusters() {
    run_model(16 * MIB, 4 * KIB, Qcow2::new().cluster_size(4 * KIB));
}

#[test]
fn write_model_64k_clusters() {
    run_model(32 * MIB, 64 * KIB, Qcow2::new());
}

#[test]
fn write_model_2m_clusters() {
    run_model(64 * MIB, 2 * MIB, Qcow2::new().cluster_size(2 * MIB));
}

#[test]
fn write_model_extended_l2() {
    run_model(32 * MIB, 64 * KIB, Qcow2::new().extended_l2(true));
}

#[test]
fn write_model_v2_leaf() {
    run_model(32 * MIB, 64 * KIB, Qcow2::new().compat("0.10"));
}
