//! Mutation fuzzing of images made by qemu-img (issue 8 §6): header fields, extensions,
//! backing names, L1/L2 entries, refcount table and blocks, compressed data, truncation.
//! Every mutant must end in a clean refusal, correct-looking data or an I/O error: never
//! a panic, a hang, or a write outside the clusters the mutant itself points at (its
//! metadata and its data clusters) or beyond its end. Fixed seed and bounded count here;
//! `scripts/fuzz-images.sh` runs long campaigns (STREAMFS_FUZZ_ITERS, STREAMFS_SEED).

mod common;

use common::*;
use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use streamfs::chain::Chain;

/// How long one mutant may take (open, read everything, write, flush).
const PER_MUTANT: Duration = Duration::from_secs(20);

struct Seed {
    name: &'static str,
    path: PathBuf,
}

/// The seed images: varied geometry, a backing chain, zero and compressed clusters.
fn seeds(s: &Scratch) -> Vec<Seed> {
    let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
    write_pattern(&base, 0x11, 0, 4 * MIB);
    let mut out = Vec::new();
    let configs: [(&'static str, Qcow2); 4] = [
        ("v3-64k", Qcow2::new().size(4 * MIB)),
        (
            "v3-32k-extl2",
            Qcow2::new()
                .size(4 * MIB)
                .cluster_size(32768)
                .extended_l2(true),
        ),
        ("v2-64k", Qcow2::new().size(4 * MIB).compat("0.10")),
        ("v3-512", Qcow2::new().size(MIB).cluster_size(512)),
    ];
    for (name, q) in configs {
        let p = q
            .backing(&base)
            .create(&s.join(format!("seed-{name}.qcow2")));
        write_pattern(&p, 0x22, 64 * KIB, 128 * KIB);
        write_compressed(&p, 0x33, 512 * KIB, 64 * KIB);
        if !name.starts_with("v2") {
            write_zeroes(&p, MIB - 64 * KIB, 64 * KIB);
        }
        out.push(Seed { name, path: p });
    }
    out
}

fn be64(b: &[u8], at: usize) -> u64 {
    b.get(at..at + 8)
        .map_or(0, |s| u64::from_be_bytes(s.try_into().unwrap()))
}
fn be32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |s| u32::from_be_bytes(s.try_into().unwrap()))
}

const OFF: u64 = 0x00ff_ffff_ffff_fe00;

/// The clusters a (possibly mutated) image itself points at: header, L1, refcount table,
/// L2 tables, refcount blocks and data clusters. Decoded leniently, as written.
fn own_clusters(b: &[u8]) -> BTreeSet<u64> {
    let mut set = BTreeSet::new();
    let bits = be32(b, 20);
    if !(9..=21).contains(&bits) {
        return set;
    }
    let cs = 1u64 << bits;
    let cl = |o: u64| o / cs * cs;
    let version = be32(b, 4);
    let extended = version >= 3 && be64(b, 72) & (1 << 4) != 0;
    let entry = if extended { 16 } else { 8 };
    set.insert(0);
    let (l1_off, l1_size) = (be64(b, 40), be32(b, 36) as u64);
    let (rt_off, rt_clusters) = (be64(b, 48), be32(b, 56) as u64);
    for c in 0..(l1_size * 8).div_ceil(cs).min(1 << 12) {
        set.insert(cl(l1_off) + c * cs);
    }
    for c in 0..rt_clusters.min(1 << 12) {
        set.insert(cl(rt_off) + c * cs);
    }
    for i in 0..l1_size.min(1 << 16) {
        let l2 = be64(b, (l1_off + i * 8) as usize) & OFF;
        if l2 == 0 {
            continue;
        }
        set.insert(cl(l2));
        for j in 0..cs / entry {
            let e = be64(b, (l2 + j * entry) as usize);
            if e & (1 << 62) == 0 && e & OFF != 0 {
                set.insert(cl(e & OFF));
            }
        }
    }
    for i in 0..(rt_clusters * cs / 8).min(1 << 16) {
        let rb = be64(b, (rt_off + i * 8) as usize) & !(cs - 1);
        if rb != 0 {
            set.insert(cl(rb));
        }
    }
    set
}

#[derive(Default, Debug)]
struct Tally {
    refused: u64,
    opened: u64,
    io_errors: u64,
    clean: u64,
}

/// One mutant: open, read all, write a few blocks, flush. Ok(outcome) or Err(why bad).
fn try_mutant(path: &Path) -> Result<&'static str, String> {
    let before = std::fs::read(path).map_err(|e| e.to_string())?;
    let chain = match Chain::open("fuzz.raw", path, false, true) {
        Ok(c) => c,
        Err(e) => {
            let msg = e.to_string();
            if msg.is_empty() {
                return Err("refused with an empty message".into());
            }
            return Ok("refused");
        }
    };
    let size = chain.size().min(16 * MIB);
    let mut buf = vec![0u8; 256 * KIB as usize];
    let mut io_error = false;
    let mut off = 0;
    while off < size {
        let n = (size - off).min(buf.len() as u64) as usize;
        if chain.read(off, &mut buf[..n]).is_err() {
            io_error = true;
        }
        off += n as u64;
    }
    for (i, at) in [0u64, 64 * KIB + 512, size / 2, size.saturating_sub(4096)]
        .iter()
        .enumerate()
    {
        if *at + 4096 <= chain.size() && chain.write(*at, &[0x40 + i as u8; 4096]).is_err() {
            io_error = true;
        }
    }
    if chain.flush_all().is_err() {
        io_error = true;
    }
    drop(chain);
    // New clusters go past the end (possibly far past, sparse, when a hostile refcount
    // claims a far cluster is in use: a leak, as in QEMU); only the old extent is judged.
    let len = std::fs::metadata(path).map_err(|e| e.to_string())?.len();
    let mut after = vec![0u8; before.len().min(len as usize)];
    std::fs::File::open(path)
        .and_then(|f| std::os::unix::fs::FileExt::read_exact_at(&f, &mut after, 0))
        .map_err(|e| e.to_string())?;
    // Every changed cluster inside the old file is one the mutant points at.
    let bits = be32(&before, 20);
    if (9..=21).contains(&bits) {
        let cs = 1usize << bits;
        let own = own_clusters(&before);
        let own_after = own_clusters(&after);
        for c in (0..before.len().min(after.len())).step_by(cs) {
            let e = (c + cs).min(before.len()).min(after.len());
            if before[c..e] != after[c..e]
                && !own.contains(&(c as u64))
                && !own_after.contains(&(c as u64))
            {
                return Err(format!(
                    "wrote cluster {c:#x}, which the image does not point at"
                ));
            }
        }
    }
    Ok(if io_error { "io-error" } else { "clean" })
}

fn mutate(rng: &mut StdRng, img: &mut Vec<u8>) -> String {
    let cs = 1usize << be32(img, 20).clamp(9, 21);
    let l1 = be64(img, 40) as usize;
    let l2 = (be64(img, l1) & OFF) as usize;
    let rt = be64(img, 48) as usize;
    let rb = be64(img, rt) as usize;
    let interesting: [u64; 10] = [
        0,
        1,
        0x200,
        cs as u64 - 1,
        cs as u64,
        u32::MAX as u64,
        1 << 40,
        u64::MAX,
        img.len() as u64,
        (img.len() as u64) / 2,
    ];
    let (what, at) = match rng.gen_range(0..9) {
        0 => (
            "header field",
            [
                4, 8, 16, 20, 24, 32, 36, 40, 48, 56, 60, 64, 72, 80, 88, 96, 100,
            ][rng.gen_range(0..17)],
        ),
        1 => (
            "header extension",
            104 + rng.gen_range(0..(cs.min(img.len()).saturating_sub(104)).max(1)),
        ),
        2 => ("backing name", be64(img, 8) as usize + rng.gen_range(0..16)),
        3 => ("L1 entry", l1 + 8 * rng.gen_range(0..4)),
        4 => ("L2 entry", l2 + 8 * rng.gen_range(0..(cs / 8).min(64))),
        5 => ("refcount table", rt + 8 * rng.gen_range(0..4)),
        6 => (
            "refcount block",
            rb + 2 * rng.gen_range(0..(cs / 2).min(64)),
        ),
        7 => {
            let n = rng.gen_range(0..img.len().max(1));
            img.truncate(n);
            return format!("truncated to {n}");
        }
        _ => ("anywhere", rng.gen_range(0..img.len().max(1))),
    };
    if at + 8 > img.len() {
        return format!("{what}: out of range");
    }
    match rng.gen_range(0..3) {
        0 => {
            let v = interesting[rng.gen_range(0..interesting.len())];
            img[at..at + 8].copy_from_slice(&v.to_be_bytes());
            format!("{what} at {at:#x} = {v:#x}")
        }
        1 => {
            let bit = rng.gen_range(0..64);
            img[at + bit / 8] ^= 1 << (bit % 8);
            format!("{what} at {at:#x}: bit {bit} flipped")
        }
        _ => {
            let b: u8 = rng.gen();
            img[at] = b;
            format!("{what} at {at:#x}: byte {b:#x}")
        }
    }
}

#[test]
fn mutants_of_qemu_img_images_are_refused_or_served_safely() {
    let iters: u64 = std::env::var("STREAMFS_FUZZ_ITERS")
        .map_or(300, |v| v.parse().expect("STREAMFS_FUZZ_ITERS"));
    let seed: u64 =
        std::env::var("STREAMFS_SEED").map_or(0x5eed_f022, |v| v.parse().expect("STREAMFS_SEED"));
    let mut rng = StdRng::seed_from_u64(seed);
    let s = Scratch::new();
    let seeds = seeds(&s);
    let mut tally = Tally::default();
    let began = Instant::now();
    for i in 0..iters {
        let seed_img = &seeds[(i as usize) % seeds.len()];
        let mut img = std::fs::read(&seed_img.path).unwrap();
        let mut how = Vec::new();
        for _ in 0..rng.gen_range(1..=3) {
            how.push(mutate(&mut rng, &mut img));
        }
        let path = s.join(format!("mutant-{}.qcow2", seed_img.name));
        std::fs::write(&path, &img).unwrap();
        let (tx, rx) = mpsc::channel();
        let p = path.clone();
        std::thread::spawn(move || {
            let r = std::panic::catch_unwind(|| try_mutant(&p));
            let _ = tx.send(r);
        });
        let case = format!(
            "mutant {i} of {} (seed {seed}): {}",
            seed_img.name,
            how.join("; ")
        );
        match rx.recv_timeout(PER_MUTANT) {
            Err(_) => panic!("{case}: hung for {PER_MUTANT:?}"),
            Ok(Err(p)) => panic!("{case}: panicked: {}", streamfs::jobs::panic_text(&*p)),
            Ok(Ok(Err(why))) => panic!("{case}: {why}"),
            Ok(Ok(Ok(outcome))) => match outcome {
                "refused" => tally.refused += 1,
                "io-error" => {
                    tally.opened += 1;
                    tally.io_errors += 1
                }
                _ => {
                    tally.opened += 1;
                    tally.clean += 1
                }
            },
        }
    }
    eprintln!(
        "fuzz: {iters} mutants in {:?} (seed {seed}): {tally:?}",
        began.elapsed()
    );
    assert!(
        tally.refused > 0 && tally.opened > 0,
        "the mutations reach both outcomes: {tally:?}"
    );
}
