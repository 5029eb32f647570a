//! Crash consistency (issue 3, test 5): a random write + fsync workload with copy-on-read
//! runs on the mount, the daemon is killed with SIGKILL at a random moment, the mount is
//! lazily detached, and the leaf must then pass `qemu-img check` (0 or 3: leaks are fine,
//! corruption is not), contain every write that was fsync'd before the kill, and read as
//! old or written data everywhere else, never garbage. Then it is remounted and the next
//! iteration continues on the same leaf.
//!
//! Every 4 KiB block written holds a header (magic, block index, version) and a fill derived
//! from (block, version), so each block's content identifies exactly which write it came
//! from. `STREAMFS_CRASH_ITERS` sets the number of iterations (default 24; see
//! `scripts/soak-crash.sh`), `STREAMFS_SEED` reproduces a run.

mod common;

use common::*;
use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

const BLK: usize = 4096;
const SIZE: u64 = 32 * MIB;
const NBLOCKS: usize = SIZE as usize / BLK;
/// Writes go to these first blocks half of the time, so that blocks are overwritten
/// across fsyncs.
const HOT: usize = 4 * MIB as usize / BLK;
/// A new leaf (over the same backing chain) is started every this many iterations, with
/// a different cluster configuration, so that copy-on-read stays busy.
const ITERS_PER_LEAF: usize = 6;
const MAGIC: &[u8; 8] = b"SFSCRASH";

// ---------------------------------------------------------------------------------------------
// Block contents
// ---------------------------------------------------------------------------------------------

/// What a 4 KiB block can hold.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Content {
    /// The backing chain's data.
    Ref,
    /// Zeros (punch / zero range).
    Zero,
    /// Written with this (globally unique) version.
    Ver(u64),
}

fn write_block(buf: &mut [u8], b: usize, v: u64) {
    fill_splitmix(
        &mut buf[24..],
        (b as u64) << 40 ^ v.wrapping_mul(0x2545_f491_4f6c_dd1d),
    );
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&(b as u64).to_le_bytes());
    buf[16..24].copy_from_slice(&v.to_le_bytes());
}

fn matches(reference: &[u8], got: &[u8], b: usize, c: Content) -> bool {
    match c {
        Content::Ref => got == &reference[b * BLK..(b + 1) * BLK],
        Content::Zero => got.iter().all(|&x| x == 0),
        Content::Ver(v) => {
            let mut want = vec![0u8; BLK];
            write_block(&mut want, b, v);
            got == &want[..]
        }
    }
}

/// A short description of a block's content for error messages.
fn describe(reference: &[u8], got: &[u8], b: usize) -> String {
    if matches(reference, got, b, Content::Ref) {
        "the reference".into()
    } else if got.iter().all(|&x| x == 0) {
        "zeros".into()
    } else if &got[..8] == MAGIC {
        let blk = u64::from_le_bytes(got[8..16].try_into().unwrap());
        let v = u64::from_le_bytes(got[16..24].try_into().unwrap());
        let intact = blk as usize == b && matches(reference, got, b, Content::Ver(v));
        format!("header block {blk} version {v} (intact: {intact})")
    } else {
        format!("garbage starting {:02x?}", &got[..16])
    }
}

// ---------------------------------------------------------------------------------------------
// The per-iteration log shared by the workload threads and the test
// ---------------------------------------------------------------------------------------------

#[derive(Default)]
struct Log {
    /// Every mutation, recorded before it is issued: (first block, count, content).
    ops: Vec<(usize, usize, Content)>,
    /// `ops[..durable]` completed before an fsync that returned success.
    durable: usize,
    /// Op indices touching each block, in order.
    by_block: HashMap<usize, Vec<usize>>,
    fsyncs: usize,
    reads: usize,
}

impl Log {
    fn record(&mut self, first: usize, count: usize, c: Content) {
        let i = self.ops.len();
        self.ops.push((first, count, c));
        for b in first..first + count {
            self.by_block.entry(b).or_default().push(i);
        }
    }

    /// Contents block `b` may hold after a crash, given its content `old` before this
    /// iteration: the last durable write to it and everything after, or, if none was
    /// durable, `old` and everything written.
    fn after_crash(&self, b: usize, old: Content) -> Vec<Content> {
        let ops = self.by_block.get(&b).map(|v| v.as_slice()).unwrap_or(&[]);
        let last_durable = ops.iter().rposition(|&i| i < self.durable);
        let mut out = Vec::new();
        match last_durable {
            Some(k) => out.extend(ops[k..].iter().map(|&i| self.ops[i].2)),
            None => {
                out.push(old);
                out.extend(ops.iter().map(|&i| self.ops[i].2));
            }
        }
        out
    }

    /// Contents a concurrent reader may see in block `b` (anything old or issued).
    fn any(&self, b: usize, old: Content) -> Vec<Content> {
        let mut out = vec![old];
        if let Some(ops) = self.by_block.get(&b) {
            out.extend(ops.iter().map(|&i| self.ops[i].2));
        }
        out
    }

    fn latest(&self, b: usize, old: Content) -> Content {
        self.by_block
            .get(&b)
            .and_then(|v| v.last())
            .map(|&i| self.ops[i].2)
            .unwrap_or(old)
    }
}

/// True for errors a killed daemon causes (the workload then just stops).
fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::ENOTCONN) | Some(libc::ECONNABORTED) | Some(libc::EIO) | Some(libc::ENODEV)
    )
}

// ---------------------------------------------------------------------------------------------
// Workload
// ---------------------------------------------------------------------------------------------

struct Shared {
    reference: Arc<Vec<u8>>,
    state: Arc<Vec<Content>>,
    log: Arc<Mutex<Log>>,
    stop: Arc<AtomicBool>,
}

/// The writer: writes (buffered and O_DIRECT), punches, zero ranges, fsyncs, and reads
/// that must return the latest content. Returns the number of operations, `Err` for a
/// real failure (wrong data, or an error that a killed daemon does not explain).
fn writer(file: PathBuf, sh: Shared, mut rng: StdRng, next_version: u64) -> Result<u64, String> {
    let f = open_rw(&file).map_err(|e| format!("open: {e}"))?;
    let d = open_rw_direct(&file).map_err(|e| format!("open O_DIRECT: {e}"))?;
    let mut version = next_version;
    let mut n = 0u64;
    // Stops quietly on errors from the killed daemon.
    macro_rules! io {
        ($what:expr, $e:expr) => {
            match $e {
                Ok(v) => v,
                Err(e) if is_disconnect(&e) || sh.stop.load(Ordering::SeqCst) => return Ok(n),
                Err(e) => return Err(format!("{}: {e}", $what)),
            }
        };
    }
    loop {
        n += 1;
        let count = match rng.gen_range(0..10) {
            0..=5 => 1,
            6..=7 => rng.gen_range(2..=4),
            _ => rng.gen_range(5..=24),
        };
        let first = if rng.gen_bool(0.5) {
            rng.gen_range(0..HOT)
        } else {
            rng.gen_range(0..NBLOCKS)
        }
        .min(NBLOCKS - count);
        let off = (first * BLK) as u64;
        let len = count * BLK;
        match rng.gen_range(0..100) {
            0..=69 => {
                version += 1;
                let mut buf = AlignedBuf::new(len, 4096);
                for (i, blk) in buf.chunks_mut(BLK).enumerate() {
                    write_block(blk, first + i, version);
                }
                sh.log
                    .lock()
                    .unwrap()
                    .record(first, count, Content::Ver(version));
                if rng.gen_bool(0.4) {
                    let w = io!("O_DIRECT write", d.write_at(&buf, off));
                    if w != len {
                        return Err(format!("short O_DIRECT write {w} of {len}"));
                    }
                } else {
                    io!("write", f.write_all_at(&buf, off));
                }
            }
            70..=77 => {
                let mode = if rng.gen_bool(0.5) { PUNCH } else { ZERO_RANGE };
                sh.log.lock().unwrap().record(first, count, Content::Zero);
                io!("fallocate", fallocate(&f, mode, off, len as u64));
            }
            78..=82 => {
                let upto = sh.log.lock().unwrap().ops.len();
                io!(
                    "fsync",
                    if rng.gen_bool(0.5) {
                        f.sync_all()
                    } else {
                        d.sync_data()
                    }
                );
                let mut log = sh.log.lock().unwrap();
                log.durable = log.durable.max(upto);
                log.fsyncs += 1;
            }
            _ => {
                let mut buf = AlignedBuf::new(len, 4096);
                let r = io!("read", d.read_at(&mut buf, off));
                if r != len {
                    if sh.stop.load(Ordering::SeqCst) {
                        return Ok(n);
                    }
                    return Err(format!("short read {r} of {len}@{off}"));
                }
                let log = sh.log.lock().unwrap();
                for i in 0..count {
                    let b = first + i;
                    let want = log.latest(b, sh.state[b]);
                    let got = &buf[i * BLK..(i + 1) * BLK];
                    if !matches(&sh.reference, got, b, want) {
                        return Err(format!(
                            "writer read of block {b}: want {want:?}, got {}",
                            describe(&sh.reference, got, b)
                        ));
                    }
                }
            }
        }
    }
}

/// A reader: random reads (copy-on-read of clusters the writer is writing into); every
/// block must be old or something issued.
fn reader(file: PathBuf, sh: Shared, mut rng: StdRng, direct: bool) -> Result<u64, String> {
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(if direct { libc::O_DIRECT } else { 0 })
        .open(&file)
        .map_err(|e| format!("open: {e}"))?;
    let mut n = 0u64;
    loop {
        let count = rng.gen_range(1..=64).min(NBLOCKS);
        let first = rng.gen_range(0..=NBLOCKS - count);
        let mut buf = AlignedBuf::new(count * BLK, 4096);
        // The single writer records an op before issuing it, so the last op recorded now
        // may still be in flight when the read starts.
        let racing_from = sh.log.lock().unwrap().ops.len().saturating_sub(1);
        match f.read_at(&mut buf, (first * BLK) as u64) {
            Ok(r) if r == buf.len() => {}
            Ok(_) if sh.stop.load(Ordering::SeqCst) => return Ok(n),
            Ok(r) => return Err(format!("reader: short read {r} of {}", buf.len())),
            Err(e) if is_disconnect(&e) || sh.stop.load(Ordering::SeqCst) => return Ok(n),
            Err(e) => return Err(format!("reader: {e}")),
        }
        let mut log = sh.log.lock().unwrap();
        for i in 0..count {
            let b = first + i;
            // A read racing a write of the same block may see it half done: Linux gives
            // no atomicity between a concurrent pread and pwrite of one page (neither in
            // the page cache of the mount nor in the host file's). Only blocks with no
            // write in flight during the read are checked.
            if log
                .by_block
                .get(&b)
                .is_some_and(|ops| ops.iter().any(|&op| op >= racing_from))
            {
                continue;
            }
            let got = &buf[i * BLK..(i + 1) * BLK];
            if !log
                .any(b, sh.state[b])
                .into_iter()
                .any(|c| matches(&sh.reference, got, b, c))
            {
                return Err(format!(
                    "reader (direct={direct}): block {b} is {}, not old or written data",
                    describe(&sh.reference, got, b)
                ));
            }
        }
        log.reads += 1;
        n += 1;
    }
}

// ---------------------------------------------------------------------------------------------
// The loop
// ---------------------------------------------------------------------------------------------

fn leaf_config(epoch: usize) -> (&'static str, Qcow2) {
    match epoch % 3 {
        0 => ("64k", Qcow2::new()),
        1 => ("16k", Qcow2::new().cluster_size(16 * KIB)),
        _ => (
            "extended_l2 128k",
            Qcow2::new().extended_l2(true).cluster_size(128 * KIB),
        ),
    }
}

/// Verifies the leaf after a crash (through qemu-img) and returns the new block states.
fn verify_after_crash(
    s: &Scratch,
    leaf: &Path,
    reference: &[u8],
    state: &[Content],
    log: &Log,
    what: &str,
) -> Vec<Content> {
    let (code, text) = check_status(leaf);
    assert!(
        code == 0 || code == 3,
        "{what}: qemu-img check after kill -9 -> {code} (0 or 3 expected):\n{text}"
    );
    if code == 3 {
        eprintln!("{what}: qemu-img check reports leaks (allowed after a crash)");
    }
    let raw = s.join("after-crash.raw");
    convert_to_raw(leaf, &raw);
    let got = fs::read(&raw).unwrap();
    fs::remove_file(&raw).unwrap();
    assert_eq!(got.len(), reference.len(), "{what}: size");
    let mut new_state = state.to_vec();
    let mut lost = Vec::new();
    for b in 0..NBLOCKS {
        let g = &got[b * BLK..(b + 1) * BLK];
        let cands = log.after_crash(b, state[b]);
        match cands.iter().find(|&&c| matches(reference, g, b, c)) {
            Some(&c) => new_state[b] = c,
            None => lost.push(format!(
                "block {b} (offset {}): got {}, allowed {cands:?}",
                b * BLK,
                describe(reference, g, b)
            )),
        }
    }
    assert!(
        lost.is_empty(),
        "{what}: {} blocks hold neither an fsync'd write, nor old/written data (qemu-img check -> {code}):\n{}",
        lost.len(),
        lost.iter().take(20).cloned().collect::<Vec<_>>().join("\n")
    );
    new_state
}

#[test]
fn crash_loop() {
    require_fuse!();
    let iters: usize = std::env::var("STREAMFS_CRASH_ITERS")
        .map(|v| v.parse().expect("STREAMFS_CRASH_ITERS"))
        .unwrap_or(24);
    let seed = test_seed();
    let mut rng = StdRng::seed_from_u64(seed);
    let s = Scratch::new();

    // base (64 KiB clusters, 24 MiB of data) <- mid (32 KiB clusters, data and zero
    // clusters); leaves are created over mid.
    let mut data = vec![0u8; SIZE as usize];
    fill_splitmix(&mut data[..24 * MIB as usize], seed);
    let raw = create_raw_from(&s.join("base-data.raw"), &data);
    drop(data);
    let base = Qcow2::new().convert_from(&raw, &s.join("base.qcow2"), false);
    fs::remove_file(&raw).unwrap();
    let mid = Qcow2::new()
        .cluster_size(32 * KIB)
        .backing(&base)
        .create(&s.join("mid.qcow2"));
    qemu_io_cmds(
        &mid,
        &[
            "write -P 0x21 1M 1M",
            "write -z 3M 1M",
            "write -P 0x22 26M 2M",
        ],
    );
    let reference = Arc::new(raw_reference(&mid));

    let mut version = 0u64;
    let mut leaf = PathBuf::new();
    let mut state: Vec<Content> = Vec::new();
    let mut totals = (0u64, 0u64, 0usize, 0usize);
    let started = Instant::now();
    for it in 0..iters {
        if it % ITERS_PER_LEAF == 0 {
            let (name, opts) = leaf_config(it / ITERS_PER_LEAF);
            leaf = s.join(format!("leaf{}.qcow2", it / ITERS_PER_LEAF));
            opts.backing(&mid).create(&leaf);
            state = vec![Content::Ref; NBLOCKS];
            eprintln!("iteration {it}: new leaf ({name})");
        }
        let what = format!("iteration {it} (seed {seed})");
        let m = s.mount(&[&leaf], &[]);
        let file = m.file(&default_name(&leaf));
        let log = Arc::new(Mutex::new(Log::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let shared = || Shared {
            reference: reference.clone(),
            state: Arc::new(state.clone()),
            log: log.clone(),
            stop: stop.clone(),
        };
        let mut threads = Vec::new();
        {
            let (file, sh, r) = (file.clone(), shared(), StdRng::seed_from_u64(rng.gen()));
            let v = version;
            threads.push(thread::spawn(move || writer(file, sh, r, v)));
        }
        for direct in [true, false] {
            let (file, sh, r) = (file.clone(), shared(), StdRng::seed_from_u64(rng.gen()));
            threads.push(thread::spawn(move || reader(file, sh, r, direct)));
        }
        // Kill at a random moment.
        thread::sleep(Duration::from_millis(rng.gen_range(5..400)));
        stop.store(true, Ordering::SeqCst);
        m.kill9_and_detach(&what);
        let deadline = Instant::now() + Duration::from_secs(20);
        while !threads.iter().all(|t| t.is_finished()) {
            assert!(
                Instant::now() < deadline,
                "{what}: workload threads still blocked 20 s after the daemon was killed"
            );
            thread::sleep(Duration::from_millis(10));
        }
        let mut ops = Vec::new();
        for t in threads {
            match t.join() {
                Ok(Ok(n)) => ops.push(n),
                Ok(Err(e)) => panic!("{what}: workload: {e}"),
                Err(p) => std::panic::resume_unwind(p),
            }
        }
        let log = Arc::try_unwrap(log)
            .ok()
            .expect("log still shared")
            .into_inner()
            .unwrap();
        eprintln!(
            "{what}: {} mutations ({} durable), {} fsyncs, {} reader reads, ops per thread {ops:?}",
            log.ops.len(),
            log.durable,
            log.fsyncs,
            log.reads
        );
        totals.0 += log.ops.len() as u64;
        totals.1 += log.durable as u64;
        totals.2 += log.fsyncs;
        totals.3 += log.reads;
        state = verify_after_crash(&s, &leaf, &reference, &state, &log, &what);
        // The writer's versions must not be reused: skip past every version it may
        // have issued (it counts from `version` as given).
        version = version.max(
            log.ops
                .iter()
                .filter_map(|o| match o.2 {
                    Content::Ver(v) => Some(v),
                    _ => None,
                })
                .max()
                .unwrap_or(0),
        );
    }
    eprintln!(
        "{iters} iterations in {:?}: {} mutations, {} durable, {} fsyncs, {} reads",
        started.elapsed(),
        totals.0,
        totals.1,
        totals.2,
        totals.3
    );
    assert!(totals.2 > 0, "no fsync ever completed before a kill");

    // Finally: streamfs itself reads the crashed-and-remounted leaf as qemu does, and a
    // clean unmount leaves it consistent.
    let m = s.mount(&[&leaf], &[]);
    let got = read_file_direct(&m.file(&default_name(&leaf)), MIB as usize);
    for b in 0..NBLOCKS {
        let g = &got[b * BLK..(b + 1) * BLK];
        assert!(
            matches(&reference, g, b, state[b]),
            "final read through streamfs: block {b} is {}, qemu-img showed {:?} (seed {seed})",
            describe(&reference, g, b),
            state[b]
        );
    }
    m.umount();
    let (code, text) = check_status(&leaf);
    assert!(
        code == 0 || code == 3,
        "final qemu-img check -> {code}:\n{text}"
    );
}
