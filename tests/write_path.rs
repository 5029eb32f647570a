//! Write-path integration tests (issue 3): copy-on-read into the leaf, concurrent guest
//! writes and copy-on-read with per-region ownership, O_DIRECT / aio with qemu-io, and a
//! leaf whose file system runs out of space. The random write model is in
//! `tests/write_model.rs`, the kill -9 loop in `tests/crash.rs`.

mod common;

use common::*;
use std::collections::HashMap;
use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Local helpers (not in tests/common)
// ---------------------------------------------------------------------------------------------

/// Map entries (clipped) that intersect `[start, end)`.
fn exts_in(map: &[MapEntry], start: u64, end: u64) -> Vec<MapEntry> {
    map.iter()
        .filter(|e| e.end() > start && e.start < end)
        .map(|e| {
            let s = e.start.max(start);
            MapEntry {
                start: s,
                length: e.end().min(end) - s,
                offset: e.offset.map(|o| o + (s - e.start)),
                ..e.clone()
            }
        })
        .collect()
}

/// `qemu-io -n -f raw --aio AIO -c CMD ... -c aio_flush FILE` (O_DIRECT; checked by
/// [`qemu_io`]).
fn qemu_io_aio(file: &Path, aio: &str, cmds: impl Iterator<Item = String>) {
    let mut args: Vec<String> = ["-n", "-f", "raw", "--aio", aio]
        .iter()
        .map(|a| a.to_string())
        .collect();
    for c in cmds.chain(["aio_flush".to_string()]) {
        args.push("-c".into());
        args.push(c);
    }
    args.push(ps(file).into());
    qemu_io(&args.iter().map(String::as_str).collect::<Vec<_>>());
}

/// `[start, end)` shrunk to multiples of `g` (possibly empty).
fn inner_aligned(start: u64, end: u64, g: u64) -> Option<(u64, u64)> {
    let s = start.div_ceil(g) * g;
    let e = end / g * g;
    (s < e).then_some((s, e))
}

// ---------------------------------------------------------------------------------------------
// 1. Copy-on-read
// ---------------------------------------------------------------------------------------------

const COR_SIZE: u64 = 12 * MIB;
/// Never written in any layer of [`cor_chain`].
const HOLE: (u64, u64) = (8 * MIB, 12 * MIB);

/// base (64 KiB clusters) <- mid (32 KiB clusters) <- leaf (`leaf_opts`), 12 MiB, with
/// data, zero clusters hiding backing data, zero clusters over nothing, a compressed
/// cluster in mid, unaligned writes, and 8M..12M a hole in every layer.
fn cor_chain(s: &Scratch, leaf_opts: Qcow2) -> (PathBuf, Vec<PathBuf>) {
    // Incompressible data in base 5M..6M, the rest written with qemu-io.
    let mut data = vec![0u8; COR_SIZE as usize];
    data[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&random_bytes(7, MIB as usize));
    let raw = create_raw_from(&s.join("base-data.raw"), &data);
    let base = Qcow2::new()
        .cluster_size(64 * KIB)
        .convert_from(&raw, &s.join("base.qcow2"), false);
    fs::remove_file(&raw).unwrap();
    qemu_io_cmds(
        &base,
        &[
            "write -P 0x11 0 3M",
            &format!("write -P 0x12 {} 5000", 3 * MIB + 4096 + 7),
            "write -z 4M 1M",
        ],
    );
    let mid = Qcow2::new()
        .cluster_size(32 * KIB)
        .backing(&base)
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            "write -P 0x22 1M 1M",
            "write -z 2M 512k",
            "write -P 0x23 6M 1M",
            "write -c -P 0x24 7M 64k",
            "write -z 7296k 256k",
        ],
    );
    let leaf = leaf_opts.backing(&mid).create(&s.join("top.qcow2"));
    qemu_io_cmds(&leaf, &["write -P 0x33 1536k 8k", "write -P 0x34 6400k 4k"]);
    (leaf, vec![base, mid])
}

/// Full sequential read with copy-on-read, then the checks of the test 1.
fn cor_full_read(leaf_opts: Qcow2, granularity: u64, zero_clusters: bool) {
    require_fuse!();
    let s = Scratch::new();
    let (leaf, backing) = cor_chain(&s, leaf_opts);
    let reference = raw_reference(&leaf);
    let ref_raw = create_raw_from(&s.join("reference.raw"), &reference);
    let before = qemu_img_map(&leaf);
    let backing_bytes: Vec<Vec<u8>> = backing.iter().map(|b| fs::read(b).unwrap()).collect();

    let m = s.mount(&[&leaf], &[]);
    let got = read_file(&m.file("top.raw"));
    assert_bytes_eq("full sequential read", &got, &reference);
    m.umount();

    let after = qemu_img_map(&leaf);
    for e in &after {
        if e.data {
            assert_eq!(
                e.depth, 0,
                "data extent not copied into the leaf: {e:?}\n{after:#?}"
            );
        }
    }
    // Zero ranges of the backing chain: zero (not data) in the leaf, at depth 0.
    // (A v2 leaf has no zero clusters: it must write zeros over backing data there.)
    for z in before
        .iter()
        .filter(|e| zero_clusters && e.zero && e.present && e.depth > 0)
    {
        let Some((s0, e0)) = inner_aligned(z.start, z.end(), granularity) else {
            continue;
        };
        for e in exts_in(&after, s0, e0) {
            assert!(
                !e.data,
                "backing zero range {z:?} became data in the leaf: {e:?}"
            );
            if zero_clusters {
                assert!(
                    e.zero && e.depth == 0,
                    "backing zero range {z:?} is not a zero cluster in the leaf: {e:?}"
                );
            }
        }
    }
    // Holes of the whole chain: nothing to copy, so no data in the leaf.
    for e in exts_in(&after, HOLE.0, HOLE.1) {
        assert!(!e.data, "chain hole became data: {e:?}");
    }
    let (code, text) = check_status(&leaf);
    assert_eq!(code, 0, "qemu-img check after copy-on-read:\n{text}");
    assert_identical_to_raw("leaf after copy-on-read vs reference", &leaf, &ref_raw);
    for (b, bytes) in backing.iter().zip(&backing_bytes) {
        assert!(
            &fs::read(b).unwrap() == bytes,
            "backing image {b:?} was modified"
        );
    }
}

#[test]
fn cor_full_read_64k() {
    cor_full_read(Qcow2::new(), 64 * KIB, true);
}

#[test]
fn cor_full_read_4k() {
    cor_full_read(Qcow2::new().cluster_size(4 * KIB), 4 * KIB, true);
}

#[test]
fn cor_full_read_2m() {
    cor_full_read(Qcow2::new().cluster_size(2 * MIB), 2 * MIB, true);
}

#[test]
fn cor_full_read_extended_l2() {
    // 64 KiB clusters, 2 KiB subclusters.
    cor_full_read(Qcow2::new().extended_l2(true), 2 * KIB, true);
}

#[test]
fn cor_full_read_v2_leaf() {
    // v2 has no zero clusters: zero ranges over backing data must become zero data.
    cor_full_read(Qcow2::new().compat("0.10"), 64 * KIB, false);
}

#[test]
fn no_copy_on_read_leaves_leaf_unchanged() {
    require_fuse!();
    let s = Scratch::new();
    let (leaf, _) = cor_chain(&s, Qcow2::new());
    let reference: Arc<[u8]> = raw_reference(&leaf).into();
    let before = qemu_img_map(&leaf);
    let m = s.mount(&[&leaf], &["--no-copy-on-read"]);
    assert_bytes_eq("full read", &read_file(&m.file("top.raw")), &reference);
    check_random_preads(
        &m.file("top.raw"),
        reference.clone(),
        64 * KIB,
        300,
        test_seed(),
    );
    m.umount();
    assert_eq!(
        qemu_img_map(&leaf),
        before,
        "--no-copy-on-read changed the leaf's map"
    );
    qemu_img_check(&leaf);
}

#[test]
fn cor_read_inside_chain_hole_allocates_nothing() {
    require_fuse!();
    let s = Scratch::new();
    for (name, opts) in [
        ("64k", Qcow2::new()),
        ("2m", Qcow2::new().cluster_size(2 * MIB)),
        ("ext", Qcow2::new().extended_l2(true)),
    ] {
        let dir = s.subdir(name);
        let sub = SubScratch(dir.clone());
        let (leaf, _) = cor_chain_in(&sub, opts);
        let before = qemu_img_map(&leaf);
        let len_before = fs::metadata(&leaf).unwrap().len();
        let m = s.mount(&[&leaf], &[]);
        let f = File::open(m.file("top.raw")).unwrap();
        let d = open_direct(&m.file("top.raw")).unwrap();
        for (off, len) in [
            (HOLE.0, 4096usize),
            (HOLE.0 + 12345, 777),
            (HOLE.0 + MIB, 2 * MIB as usize),
            (HOLE.1 - 4096, 4096),
        ] {
            check_pread(&f, &vec![0u8; COR_SIZE as usize], off, len).unwrap();
            check_direct_pread(&d, &vec![0u8; COR_SIZE as usize], off / 4096 * 4096, 4096).unwrap();
        }
        drop((f, d));
        m.umount();
        assert_eq!(
            qemu_img_map(&leaf),
            before,
            "{name}: a read inside a hole of the whole chain changed the leaf's map"
        );
        assert_eq!(
            fs::metadata(&leaf).unwrap().len(),
            len_before,
            "{name}: a read inside a hole of the whole chain grew the leaf file"
        );
        qemu_img_check(&leaf);
    }
}

/// A directory standing in for a [`Scratch`] when building a chain in a subdirectory.
struct SubScratch(PathBuf);

fn cor_chain_in(s: &SubScratch, leaf_opts: Qcow2) -> (PathBuf, Vec<PathBuf>) {
    let base = Qcow2::new().size(COR_SIZE).create(&s.0.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x11 0 3M", "write -z 4M 1M"]);
    let mid = Qcow2::new()
        .cluster_size(32 * KIB)
        .backing(&base)
        .create(&s.0.join("mid.qcow2"));
    qemu_io_cmds(&mid, &["write -P 0x22 1M 1M", "write -P 0x23 6M 1M"]);
    let leaf = leaf_opts.backing(&mid).create(&s.0.join("top.qcow2"));
    qemu_io_cmds(&leaf, &["write -P 0x33 1536k 8k"]);
    (leaf, vec![base, mid])
}

// ---------------------------------------------------------------------------------------------
// 3. Concurrency with per-region ownership
// ---------------------------------------------------------------------------------------------

const BLK: usize = 4096;

/// A writer's blocks: block index -> content it must hold.
type BlockModel = HashMap<usize, Vec<u8>>;
/// qemu-io writes of one process: (pattern, offset, length).
type PatternWrites = Vec<(u8, u64, u64)>;
/// How a test ends a mount.
type Ender = fn(Mount);

/// Writers own interleaved 4 KiB blocks of the same clusters (block b belongs to writer
/// `b % (writers + 1)`; the last slot belongs to nobody and must always read as the
/// reference). Readers read whole clusters (triggering copy-on-read of clusters the writers
/// are writing into) and check the unowned blocks.
fn concurrency(leaf_opts: Qcow2, cluster: u64) {
    require_fuse!();
    const WRITERS: usize = 4;
    const READERS: usize = 2;
    const SIZE: u64 = 8 * MIB;
    let duration = Duration::from_secs(3);
    let seed = test_seed();

    let s = Scratch::new();
    let mut data = random_bytes(seed ^ 1, SIZE as usize);
    data[6 * MIB as usize..].fill(0);
    let raw = create_raw_from(&s.join("data.raw"), &data);
    let base = Qcow2::new().convert_from(&raw, &s.join("base.qcow2"), false);
    fs::remove_file(&raw).unwrap();
    qemu_io_cmds(&base, &["write -z 5M 512k"]);
    let leaf = leaf_opts.backing(&base).create(&s.join("top.qcow2"));
    qemu_io_cmds(&leaf, &["write -P 0x44 64k 64k", "write -z 1M 128k"]);
    let reference: Arc<Vec<u8>> = Arc::new(raw_reference(&leaf));

    let m = s.mount(&[&leaf], &[]);
    let file = m.file("top.raw");
    let slots = WRITERS + 1;
    let nblocks = (SIZE as usize) / BLK;
    let hot_blocks = (32 * cluster as usize / BLK).min(nblocks);

    let r2 = reference.clone();
    let models: Vec<(usize, HashMap<usize, Vec<u8>>)> = with_timeout(
        "concurrent writers and readers",
        duration + IO_TIMEOUT,
        move || {
            let reference = r2;
            let deadline = Instant::now() + duration;
            let mut handles = Vec::new();
            for t in 0..WRITERS {
                let file = file.clone();
                let reference = reference.clone();
                handles.push(thread::spawn(move || -> Result<(usize, BlockModel, u64), String> {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(100 + t as u64));
                    let f = open_rw(&file).expect("open read-write");
                    let d = open_rw_direct(&file).expect("open read-write O_DIRECT");
                    let mut model: HashMap<usize, Vec<u8>> = HashMap::new();
                    let mut version = 0u64;
                    let mut ops = 0u64;
                    let own = |b: usize| b % slots == t;
                    let pick = |rng: &mut StdRng| loop {
                        let b = if rng.gen_bool(0.6) {
                            rng.gen_range(0..hot_blocks)
                        } else {
                            rng.gen_range(0..nblocks)
                        };
                        if own(b) {
                            break b;
                        }
                    };
                    let cur = |model: &HashMap<usize, Vec<u8>>, b: usize| -> Vec<u8> {
                        model
                            .get(&b)
                            .cloned()
                            .unwrap_or_else(|| reference[b * BLK..(b + 1) * BLK].to_vec())
                    };
                    let verify = |f: &File, model: &HashMap<usize, Vec<u8>>, b: usize, direct: bool| -> Result<(), String> {
                        let want = cur(model, b);
                        let mut buf = AlignedBuf::new(BLK, 4096);
                        let n = f
                            .read_at(&mut buf, (b * BLK) as u64)
                            .map_err(|e| format!("writer {t}: read block {b}: {e}"))?;
                        if n != BLK || buf[..] != want[..] {
                            let i = first_mismatch(&buf[..n], &want).unwrap_or(0);
                            return Err(format!(
                                "writer {t}: block {b} (direct={direct}) lost/torn write: byte {i} got {:#04x} want {:#04x}",
                                buf.get(i).copied().unwrap_or(0), want[i]
                            ));
                        }
                        Ok(())
                    };
                    while Instant::now() < deadline {
                        ops += 1;
                        let b = pick(&mut rng);
                        let off = (b * BLK) as u64;
                        version += 1;
                        let pseed = ((t as u64) << 56) ^ ((b as u64) << 24) ^ version;
                        match rng.gen_range(0..100) {
                            0..=44 => {
                                let data = splitmix_bytes(BLK, pseed);
                                f.write_all_at(&data, off)
                                    .map_err(|e| format!("writer {t}: write block {b}: {e}"))?;
                                model.insert(b, data);
                            }
                            45..=64 => {
                                let mut buf = AlignedBuf::new(BLK, 4096);
                                fill_splitmix(&mut buf, pseed);
                                let n = d
                                    .write_at(&buf, off)
                                    .map_err(|e| format!("writer {t}: O_DIRECT write block {b}: {e}"))?;
                                if n != BLK {
                                    return Err(format!("writer {t}: short O_DIRECT write {n}"));
                                }
                                model.insert(b, buf.to_vec());
                            }
                            65..=79 => {
                                // Unaligned piece of the block.
                                let start = rng.gen_range(0..BLK - 1);
                                let len = rng.gen_range(1..=BLK - start);
                                let data = splitmix_bytes(len, pseed);
                                f.write_all_at(&data, off + start as u64)
                                    .map_err(|e| format!("writer {t}: write {len}@{}: {e}", off + start as u64))?;
                                let mut m = cur(&model, b);
                                m[start..start + len].copy_from_slice(&data);
                                model.insert(b, m);
                            }
                            80..=83 => {
                                let mode = if rng.gen_bool(0.5) { PUNCH } else { ZERO_RANGE };
                                fallocate(&f, mode, off, BLK as u64)
                                    .map_err(|e| format!("writer {t}: fallocate({mode:#x}) block {b}: {e}"))?;
                                model.insert(b, vec![0u8; BLK]);
                            }
                            84 => {
                                f.sync_data().map_err(|e| format!("writer {t}: fdatasync: {e}"))?;
                            }
                            85..=92 => verify(&d, &model, b, true)?,
                            _ => verify(&f, &model, b, false)?,
                        }
                    }
                    for &b in model.keys() {
                        verify(&d, &model, b, true)?;
                        verify(&f, &model, b, false)?;
                    }
                    Ok((t, model, ops))
                }));
            }
            let mut readers = Vec::new();
            for r in 0..READERS {
                let file = file.clone();
                let reference = reference.clone();
                readers.push(thread::spawn(move || -> Result<u64, String> {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(200 + r as u64));
                    let f = if r % 2 == 0 {
                        open_direct(&file)
                    } else {
                        File::open(&file)
                    }
                    .map_err(|e| format!("reader {r}: open: {e}"))?;
                    let mut n = 0;
                    while Instant::now() < deadline {
                        let c = cluster as usize;
                        let first = if rng.gen_bool(0.7) {
                            rng.gen_range(0..hot_blocks * BLK / c)
                        } else {
                            rng.gen_range(0..SIZE as usize / c)
                        };
                        let count = rng.gen_range(1..=(256 * 1024 / c).max(1));
                        let start = first * c;
                        let len = (count * c).min(SIZE as usize - start).min(MIB as usize);
                        let mut buf = AlignedBuf::new(len, 4096);
                        let got = f
                            .read_at(&mut buf, start as u64)
                            .map_err(|e| format!("reader {r}: read {len}@{start}: {e}"))?;
                        if got != len {
                            return Err(format!("reader {r}: short read {got} of {len}@{start}"));
                        }
                        for b in (start / BLK)..(start + len) / BLK {
                            if b % slots == WRITERS {
                                let i = b * BLK - start;
                                if buf[i..i + BLK] != reference[b * BLK..(b + 1) * BLK] {
                                    return Err(format!("reader {r}: unowned block {b} changed"));
                                }
                            }
                        }
                        n += 1;
                    }
                    Ok(n)
                }));
            }
            let mut models = Vec::new();
            let mut errors = Vec::new();
            for h in handles {
                match h.join() {
                    Ok(Ok((t, model, ops))) => {
                        eprintln!("writer {t}: {ops} ops");
                        models.push((t, model));
                    }
                    Ok(Err(e)) => errors.push(e),
                    Err(_) => errors.push("writer panicked".into()),
                }
            }
            for h in readers {
                match h.join() {
                    Ok(Ok(n)) => eprintln!("reader: {n} reads"),
                    Ok(Err(e)) => errors.push(e),
                    Err(_) => errors.push("reader panicked".into()),
                }
            }
            assert!(errors.is_empty(), "seed {seed}: {errors:#?}");
            models
        },
    );

    let mut want = (*reference).clone();
    for (_, model) in &models {
        for (b, data) in model {
            want[b * BLK..(b + 1) * BLK].copy_from_slice(data);
        }
    }
    assert_bytes_eq(
        &format!("full read after the concurrent phase (seed {seed})"),
        &read_file_direct(&m.file("top.raw"), 256 * KIB as usize),
        &want,
    );
    m.umount();
    let (code, text) = check_status(&leaf);
    assert_eq!(code, 0, "qemu-img check (seed {seed}):\n{text}");
    let model_raw = create_raw_from(&s.join("model.raw"), &want);
    assert_identical_to_raw(&format!("leaf vs model (seed {seed})"), &leaf, &model_raw);
}

#[test]
fn concurrent_writes_and_cor_64k() {
    concurrency(Qcow2::new(), 64 * KIB);
}

#[test]
fn concurrent_writes_and_cor_4k() {
    // Every 4 KiB block is its own cluster: writers race on L2 tables and refcount blocks.
    concurrency(Qcow2::new().cluster_size(4 * KIB), 4 * KIB);
}

#[test]
fn concurrent_writes_and_cor_extended_l2() {
    concurrency(
        Qcow2::new().extended_l2(true).cluster_size(128 * KIB),
        128 * KIB,
    );
}

// ---------------------------------------------------------------------------------------------
// 4. O_DIRECT with qemu-io (nocache, aio)
// ---------------------------------------------------------------------------------------------

#[test]
fn qemu_io_direct_parallel_aio() {
    require_fuse!();
    let s = Scratch::new();
    let base = Qcow2::new().size(16 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x11 0 12M", "write -z 12M 1M"]);
    let leaf = Qcow2::new().backing(&base).create(&s.join("top.qcow2"));
    qemu_io_cmds(&leaf, &["write -P 0x22 2M 64k", "write -c -P 0x23 3M 64k"]);
    let mut want = raw_reference(&leaf);

    let m = s.mount(&[&leaf], &[]);
    let file = m.file("top.raw");
    // Process p writes 1 MiB region p: aligned 64 KiB aio writes, a 512-byte aligned
    // unaligned-to-4k one, and a write straddling two clusters.
    let jobs: Vec<(usize, &str, PatternWrites)> = (0..6)
        .map(|p| {
            let r = p as u64 * 2 * MIB + 512 * KIB;
            let pat = 0x50 + p as u8;
            let writes = vec![
                (pat, r, 64 * KIB),
                (pat + 0x10, r + 64 * KIB, 64 * KIB),
                (pat + 0x20, r + 200 * KIB + 512, 3 * 512),
                (pat + 0x30, r + 320 * KIB - 4 * KIB, 72 * KIB),
                (pat + 0x40, r + 512 * KIB, 256 * KIB),
            ];
            (p, if p % 3 == 2 { "threads" } else { "native" }, writes)
        })
        .collect();
    let handles: Vec<_> = jobs
        .iter()
        .cloned()
        .map(|(_, aio, writes)| {
            let file = file.clone();
            thread::spawn(move || {
                qemu_io_aio(
                    &file,
                    aio,
                    writes
                        .iter()
                        .map(|(pat, off, len)| format!("aio_write -P {pat:#x} {off} {len}")),
                );
                // Read back with O_DIRECT, sync and aio (qemu_io fails on a pattern mismatch).
                qemu_io_aio(
                    &file,
                    aio,
                    writes.iter().enumerate().map(|(i, (pat, off, len))| {
                        let cmd = if i % 2 == 0 { "read" } else { "aio_read" };
                        format!("{cmd} -P {pat:#x} {off} {len}")
                    }),
                );
            })
        })
        .collect();
    let mut failures = Vec::new();
    for h in handles {
        if let Err(e) = h.join() {
            failures.push(
                e.downcast_ref::<String>()
                    .cloned()
                    .unwrap_or_else(|| "panic".into()),
            );
        }
    }
    assert!(failures.is_empty(), "{failures:#?}");
    for (_, _, writes) in &jobs {
        for &(pat, off, len) in writes {
            want[off as usize..(off + len) as usize].fill(pat);
        }
    }
    // A qemu-io verification that spans everything, then our own view.
    qemu_io(&["-n", "-f", "raw", "-c", "read -P 0x11 0 512k", ps(&file)]);
    assert_bytes_eq(
        "O_DIRECT full read",
        &read_file_direct(&file, MIB as usize),
        &want,
    );
    m.umount();
    let (code, text) = check_status(&leaf);
    assert_eq!(code, 0, "qemu-img check:\n{text}");
    let model = create_raw_from(&s.join("model.raw"), &want);
    assert_identical_to_raw("leaf vs model", &leaf, &model);
}

/// The harness's `qemu_io` fails on a `-P` read whose data does not match, also for
/// `aio_read`, which reports the mismatch with exit status 0 (no FUSE needed).
#[test]
fn qemu_io_helper_rejects_pattern_mismatch() {
    let s = Scratch::new();
    let img = Qcow2::new().size(MIB).create(&s.join("p.qcow2"));
    write_pattern(&img, 0x11, 0, 64 * KIB);
    qemu_io_cmds(
        &img,
        &["read -P 0x11 0 64k", "aio_read -P 0x11 0 64k", "aio_flush"],
    );
    for cmds in [
        &["read -P 0x22 0 64k"][..],
        &["aio_read -P 0x22 0 64k", "aio_flush"],
    ] {
        let img = img.clone();
        let r = std::panic::catch_unwind(move || qemu_io_cmds(&img, cmds));
        assert!(r.is_err(), "qemu_io accepted a pattern mismatch: {cmds:?}");
    }
}

// ---------------------------------------------------------------------------------------------
// 6. ENOSPC
// ---------------------------------------------------------------------------------------------

#[test]
fn enospc_leaf_on_full_filesystem() {
    require_fuse!();
    const SIZE: u64 = 48 * MIB;
    let seed = test_seed();
    let s = Scratch::new();
    let data = random_bytes(seed, SIZE as usize);
    let raw = create_raw_from(&s.join("data.raw"), &data);
    let base = Qcow2::new().convert_from(&raw, &s.join("base.qcow2"), false);
    fs::remove_file(&raw).unwrap();
    drop(data);
    let small = s.subdir("small");
    let tmpfs = Tmpfs::new(small.clone(), "24m");
    let leaf = Qcow2::new().backing(&base).create(&small.join("top.qcow2"));
    let reference = raw_reference(&base);

    // Model: per 4 KiB block the content that must be there, and contents a failed write
    // may have left instead.
    let mut model = reference.clone();
    let mut alt: HashMap<usize, Vec<Vec<u8>>> = HashMap::new();
    let mut rng = StdRng::seed_from_u64(seed);

    let m = s.mount(&[&leaf], &[]);
    let file = m.file("top.raw");
    let f = open_rw(&file).expect("open read-write");
    // Region A (first 1 MiB) is written while there is space.
    for k in 0..16u64 {
        let data = splitmix_bytes(64 * KIB as usize, seed ^ k);
        f.write_all_at(&data, k * 64 * KIB)
            .expect("write with free space");
        model[(k * 64 * KIB) as usize..][..data.len()].copy_from_slice(&data);
    }
    // Copy-on-read of everything: fills the tmpfs; reads must still succeed.
    assert_bytes_eq(
        "full read while the leaf fills up",
        &read_file(&file),
        &model,
    );
    let got = read_file_direct(&file, MIB as usize);
    assert_bytes_eq("O_DIRECT full read with a full leaf FS", &got, &model);
    let df = fs2_available(&small);
    eprintln!("tmpfs available after copy-on-read: {df} bytes");

    let mut enospc = 0;
    let mut ok_new = 0;
    // Overwrites of region A need no new space: they must succeed.
    for i in 0..32u64 {
        let off = rng.gen_range(0..MIB / 4096) * 4096;
        let len = (rng.gen_range(1..=8u64) * 4096).min(MIB - off);
        let data = splitmix_bytes(len as usize, seed ^ (1000 + i));
        f.write_all_at(&data, off)
            .unwrap_or_else(|e| panic!("overwrite of allocated data {len}@{off} failed: {e}"));
        model[off as usize..][..len as usize].copy_from_slice(&data);
        for b in off as usize / BLK..(off + len) as usize / BLK {
            alt.remove(&b);
        }
    }
    // Writes all over the disk: those that need new clusters may fail, only with ENOSPC.
    for i in 0..400u64 {
        let off = rng.gen_range(MIB / 4096..SIZE / 4096) * 4096;
        let len = (rng.gen_range(1..=16u64) * 4096).min(SIZE - off);
        let data = splitmix_bytes(len as usize, seed ^ (5000 + i));
        let blocks = off as usize / BLK..(off + len) as usize / BLK;
        match f.write_all_at(&data, off) {
            Ok(()) => {
                ok_new += 1;
                model[off as usize..][..len as usize].copy_from_slice(&data);
                for b in blocks {
                    alt.remove(&b);
                }
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => {
                enospc += 1;
                for b in blocks {
                    let i = b * BLK - off as usize;
                    alt.entry(b).or_default().push(data[i..i + BLK].to_vec());
                }
            }
            Err(e) => panic!("write {len}@{off} failed with {e} (want success or ENOSPC)"),
        }
    }
    eprintln!("writes: {ok_new} succeeded, {enospc} ENOSPC");
    assert!(
        enospc > 0,
        "no write failed with ENOSPC although the leaf's FS is full"
    );
    let check_blocks = |what: &str, got: &[u8]| {
        assert_eq!(got.len(), model.len(), "{what}: size");
        for b in 0..model.len() / BLK {
            let g = &got[b * BLK..(b + 1) * BLK];
            let w = &model[b * BLK..(b + 1) * BLK];
            if g != w && !alt.get(&b).is_some_and(|v| v.iter().any(|a| a == g)) {
                panic!(
                    "{what}: block {b} (offset {}) is neither the written data nor a failed write's (seed {seed})",
                    b * BLK
                );
            }
        }
    };
    check_blocks(
        "read through the mount after ENOSPC",
        &read_file_direct(&file, MIB as usize),
    );
    match f.sync_all() {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::ENOSPC) => eprintln!("fsync: ENOSPC"),
        Err(e) => panic!("fsync with a full leaf FS: {e}"),
    }
    drop(f);
    m.umount();
    let (code, text) = check_status(&leaf);
    assert!(
        code == 0 || code == 3,
        "qemu-img check of the leaf on the full FS -> {code}:\n{text}"
    );
    let out = s.join("leaf-after.raw");
    convert_to_raw(&leaf, &out);
    check_blocks(
        "leaf after unmount (qemu-img convert)",
        &fs::read(&out).unwrap(),
    );
    drop(tmpfs);
    assert!(!is_mounted(&small), "tmpfs still mounted");
}

/// Free bytes of the file system holding `dir`.
fn fs2_available(dir: &Path) -> u64 {
    let c = std::ffi::CString::new(ps(dir)).unwrap();
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    let r = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    assert_eq!(r, 0, "statvfs {dir:?}");
    st.f_bavail as u64 * st.f_frsize as u64
}

// ---------------------------------------------------------------------------------------------
// Clean exits persist acknowledged writes (fsync'd or not)
// ---------------------------------------------------------------------------------------------

#[test]
fn clean_exit_persists_unsynced_writes() {
    require_fuse!();
    let seed = test_seed();
    let s = Scratch::new();
    let base = Qcow2::new().size(8 * MIB).create(&s.join("base.qcow2"));
    qemu_io_cmds(&base, &["write -P 0x11 0 6M"]);
    let leaf = Qcow2::new().backing(&base).create(&s.join("top.qcow2"));
    let mut want = raw_reference(&leaf);
    let mut rng = StdRng::seed_from_u64(seed);
    let ends: [(&str, Ender); 3] = [
        ("streamfs umount", |m| m.umount()),
        ("umount", |m| m.system_umount()),
        ("SIGTERM", |m| m.terminate(libc::SIGTERM)),
    ];
    for (name, end) in ends {
        let m = s.mount(&[&leaf], &[]);
        let f = open_rw(&m.file("top.raw")).expect("open read-write");
        for i in 0..50 {
            let off = rng.gen_range(0..8 * MIB - 1);
            let len = rng.gen_range(1..=200 * KIB).min(8 * MIB - off);
            let data = splitmix_bytes(len as usize, seed ^ i);
            f.write_all_at(&data, off).unwrap();
            want[off as usize..(off + len) as usize].copy_from_slice(&data);
        }
        let off = rng.gen_range(0..8 * MIB / 4096 - 16) * 4096;
        fallocate(&f, PUNCH, off, 64 * KIB).unwrap();
        want[off as usize..(off + 64 * KIB) as usize].fill(0);
        drop(f);
        end(m);
        let (code, text) = check_status(&leaf);
        assert_eq!(code, 0, "after {name}: qemu-img check:\n{text}");
        let model = create_raw_from(&s.join("model.raw"), &want);
        assert_identical_to_raw(&format!("after {name}: leaf vs model"), &leaf, &model);
    }
}
