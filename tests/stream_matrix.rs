//! A generated configuration-space test of streaming, judged by QEMU's own tools.
//!
//! Dimensions (see [`LEAVES`], [`Speed`], [`Guest`], [`Kind`], [`Life`], [`BaseFmt`]):
//! the leaf image's format (cluster size, extended L2, qcow2 version), the speed class
//! (unlimited, above and below one cluster per 1/8 s), an idle or busy guest, the kind of
//! stream (whole disk, `base=`, `offset=/length=`), its life cycle (plain, pause + resume,
//! cancel + restart, kill -9 of the daemon + remount + restart) and the bottom image's
//! format. The cases are generated, not picked: every leaf format with every speed class,
//! plus a greedy all-pairs covering of all dimensions ([`generate_cases`]).
//!
//! Every case builds its own chain `base <- mid <- leaf` (data scattered over both
//! backing layers, overlapping, zero clusters, holes, unaligned extents, a partial
//! cluster in the leaf), records the chain's contents with `qemu-img convert` before
//! mounting, streams, waits for `completed`, unmounts, and is then judged by
//! `qemu-img check`, `qemu-img info`, `qemu-img compare` (also after moving the dropped
//! layers away) and `qemu-img map`; throttled cases also check the average rate.
//!
//! Environment: `STREAMFS_MATRIX=substring` runs only the cases whose label contains it
//! (e.g. `leaf=2M`, `c07 `); `STREAMFS_MATRIX_THREADS=N` sets how many mounts run at once.
//! Run with `--nocapture` to see the case list and timings.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::ffi::CString;
use std::fmt;
use std::fs;
use std::ops::Range;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::FileExt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------------------------
// Dimensions
// ---------------------------------------------------------------------------------------------

/// One leaf image format.
#[derive(Clone, Copy, Debug)]
struct LeafCfg {
    label: &'static str,
    cluster: u64,
    compat: &'static str,
    extended_l2: bool,
}

const LEAVES: [LeafCfg; 9] = [
    LeafCfg {
        label: "512",
        cluster: 512,
        compat: "1.1",
        extended_l2: false,
    },
    LeafCfg {
        label: "4K",
        cluster: 4 * KIB,
        compat: "1.1",
        extended_l2: false,
    },
    LeafCfg {
        label: "64K",
        cluster: 64 * KIB,
        compat: "1.1",
        extended_l2: false,
    },
    LeafCfg {
        label: "512K",
        cluster: 512 * KIB,
        compat: "1.1",
        extended_l2: false,
    },
    LeafCfg {
        label: "1M",
        cluster: MIB,
        compat: "1.1",
        extended_l2: false,
    },
    LeafCfg {
        label: "2M",
        cluster: 2 * MIB,
        compat: "1.1",
        extended_l2: false,
    },
    LeafCfg {
        label: "64K-extl2",
        cluster: 64 * KIB,
        compat: "1.1",
        extended_l2: true,
    },
    LeafCfg {
        label: "2M-extl2",
        cluster: 2 * MIB,
        compat: "1.1",
        extended_l2: true,
    },
    LeafCfg {
        label: "64K-v2",
        cluster: 64 * KIB,
        compat: "0.10",
        extended_l2: false,
    },
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Speed {
    Unlimited,
    /// [`ABOVE`] clusters per second: more than one cluster per 1/8 s.
    Above,
    /// [`BELOW`] clusters per second: less than one cluster per 1/8 s.
    Below,
}
const SPEEDS: [Speed; 3] = [Speed::Unlimited, Speed::Above, Speed::Below];
/// Speed classes in clusters per second (the throttle books about 1/8 s at a time, so
/// 9 clusters/s books 2-cluster pieces and 4 clusters/s single clusters).
const ABOVE: u64 = 9;
const BELOW: u64 = 4;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Guest {
    Idle,
    /// A thread does random reads (copy-on-read) and writes through the raw file while
    /// the job runs; its writes go into the model of the expected disk.
    Busy,
}
const GUESTS: [Guest; 2] = [Guest::Idle, Guest::Busy];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Whole,
    /// `base=` the bottom image: it is kept, the leaf is re-pointed at it.
    Base,
    /// `offset=/length=`: only that range, the backing link is kept.
    Range,
}
const KINDS: [Kind; 3] = [Kind::Whole, Kind::Base, Kind::Range];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Life {
    Plain,
    PauseResume,
    CancelRestart,
    /// kill -9 of the daemon midway, a new mount, a new `start`.
    Kill9,
}
const LIVES: [Life; 4] = [
    Life::Plain,
    Life::PauseResume,
    Life::CancelRestart,
    Life::Kill9,
];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum BaseFmt {
    Raw,
    /// qcow2 with a cluster size different from the leaf's.
    Qcow2,
}
const BASES: [BaseFmt; 2] = [BaseFmt::Raw, BaseFmt::Qcow2];

/// Number of values of each dimension, in the order leaf, speed, guest, kind, life, base.
const DIMS: [usize; 6] = [
    LEAVES.len(),
    SPEEDS.len(),
    GUESTS.len(),
    KINDS.len(),
    LIVES.len(),
    BASES.len(),
];
const DIM_NAMES: [&str; 6] = ["leaf", "speed", "guest", "kind", "life", "base"];

/// Leaf clusters per disk (the disk is 24 clusters, or 23.5 for odd cases).
const SLOTS: u64 = 24;

#[derive(Clone, Copy, Debug)]
struct Case {
    id: usize,
    leaf: LeafCfg,
    speed: Speed,
    guest: Guest,
    kind: Kind,
    life: Life,
    base: BaseFmt,
}

impl Case {
    fn from_row(id: usize, r: [usize; 6]) -> Case {
        Case {
            id,
            leaf: LEAVES[r[0]],
            speed: SPEEDS[r[1]],
            guest: GUESTS[r[2]],
            kind: KINDS[r[3]],
            life: LIVES[r[4]],
            base: BASES[r[5]],
        }
    }
    fn cs(&self) -> u64 {
        self.leaf.cluster
    }
    fn stem(&self) -> String {
        format!("c{:02}", self.id)
    }
    fn name(&self) -> String {
        format!("{}.raw", self.stem())
    }
    /// Virtual size: 24 clusters; odd cases end in half a cluster (where that is a
    /// multiple of 512 bytes).
    fn size(&self) -> u64 {
        let full = SLOTS * self.cs();
        if self.id % 2 == 1 && self.cs() >= 4 * KIB {
            full - self.cs() / 2
        } else {
            full
        }
    }
    /// The class's limit in bytes/s (None when unlimited).
    fn limit(&self) -> Option<u64> {
        match self.speed {
            Speed::Unlimited => None,
            Speed::Above => Some(ABOVE * self.cs()),
            Speed::Below => Some(BELOW * self.cs()),
        }
    }
    /// `offset=`/`length=` of a range stream (deliberately not cluster aligned).
    fn range(&self) -> (u64, u64) {
        (3 * self.cs() + self.cs() / 2, 16 * self.cs())
    }
    /// The range a range stream covers, widened to clusters.
    fn aligned_range(&self) -> Range<u64> {
        let (off, len) = self.range();
        let cs = self.cs();
        off / cs * cs..((off + len).div_ceil(cs) * cs).min(self.size())
    }
    fn base_cluster(&self) -> u64 {
        if self.cs() >= 64 * KIB {
            self.cs() / 16
        } else {
            self.cs() * 8
        }
    }
    fn base_file(&self) -> String {
        match self.base {
            BaseFmt::Raw => format!("{}-base.raw", self.stem()),
            BaseFmt::Qcow2 => format!("{}-base.qcow2", self.stem()),
        }
    }
    fn base_fmt(&self) -> &'static str {
        match self.base {
            BaseFmt::Raw => "raw",
            BaseFmt::Qcow2 => "qcow2",
        }
    }
    /// Image count of the chain after the stream completed.
    fn layers_after(&self) -> u64 {
        match self.kind {
            Kind::Whole => 1,
            Kind::Base => 2,
            Kind::Range => 3,
        }
    }
}

impl fmt::Display for Case {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let speed = match (self.speed, self.limit()) {
            (Speed::Unlimited, _) if self.life != Life::Plain => {
                format!("unlimited(4cl/s until {:?})", self.life)
            }
            (Speed::Unlimited, _) => "unlimited".to_string(),
            (Speed::Above, Some(l)) => format!("above({ABOVE}cl/s={l})"),
            (_, l) => format!("below({BELOW}cl/s={})", l.unwrap_or(0)),
        };
        write!(
            f,
            "c{:02} leaf={} speed={} guest={:?} kind={:?} life={:?} base={}({}) size={}",
            self.id,
            self.leaf.label,
            speed,
            self.guest,
            self.kind,
            self.life,
            self.base_fmt(),
            match self.base {
                BaseFmt::Raw => "-".to_string(),
                BaseFmt::Qcow2 => format!("cl={}", self.base_cluster()),
            },
            self.size()
        )
    }
}

// ---------------------------------------------------------------------------------------------
// Case generation: every leaf x every speed, plus a greedy all-pairs covering
// ---------------------------------------------------------------------------------------------

type Pair = (usize, usize, usize, usize);

fn all_pairs() -> BTreeSet<Pair> {
    let mut s = BTreeSet::new();
    for (d1, &n1) in DIMS.iter().enumerate() {
        for (d2, &n2) in DIMS.iter().enumerate().skip(d1 + 1) {
            for v1 in 0..n1 {
                for v2 in 0..n2 {
                    s.insert((d1, v1, d2, v2));
                }
            }
        }
    }
    s
}

fn pairs_of(row: &[usize; 6]) -> Vec<Pair> {
    let mut v = Vec::new();
    for d1 in 0..DIMS.len() {
        for d2 in d1 + 1..DIMS.len() {
            v.push((d1, row[d1], d2, row[d2]));
        }
    }
    v
}

/// Deterministic greedy generator: first one row per (leaf, speed), then one row per
/// still uncovered pair; the free dimensions of a row are filled one by one with the
/// value covering the most uncovered pairs with the dimensions fixed so far (ties: the
/// value used least so far, then the first).
fn generate_rows() -> Vec<[usize; 6]> {
    let mut uncovered = all_pairs();
    let mut uses: Vec<Vec<usize>> = DIMS.iter().map(|&n| vec![0; n]).collect();
    let mut rows: Vec<[usize; 6]> = Vec::new();
    let complete = |fixed: [Option<usize>; 6],
                    uncovered: &BTreeSet<Pair>,
                    uses: &Vec<Vec<usize>>|
     -> [usize; 6] {
        let mut row = fixed;
        for d in 0..DIMS.len() {
            if row[d].is_some() {
                continue;
            }
            let best = (0..DIMS[d])
                .max_by_key(|&v| {
                    let gain = (0..DIMS.len())
                        .filter_map(|e| row[e].map(|w| (e, w)))
                        .filter(|&(e, w)| {
                            let p = if e < d { (e, w, d, v) } else { (d, v, e, w) };
                            uncovered.contains(&p)
                        })
                        .count();
                    // max_by_key keeps the last maximum: invert the tie-breakers.
                    (gain, usize::MAX - uses[d][v], usize::MAX - v)
                })
                .unwrap();
            row[d] = Some(best);
        }
        row.map(Option::unwrap)
    };
    let mut add = |row: [usize; 6], uncovered: &mut BTreeSet<Pair>, uses: &mut Vec<Vec<usize>>| {
        for p in pairs_of(&row) {
            uncovered.remove(&p);
        }
        for d in 0..DIMS.len() {
            uses[d][row[d]] += 1;
        }
        rows.push(row);
    };
    for leaf in 0..DIMS[0] {
        for speed in 0..DIMS[1] {
            let mut fixed = [None; 6];
            fixed[0] = Some(leaf);
            fixed[1] = Some(speed);
            let row = complete(fixed, &uncovered, &uses);
            add(row, &mut uncovered, &mut uses);
        }
    }
    while let Some(&(d1, v1, d2, v2)) = uncovered.iter().next() {
        let mut fixed = [None; 6];
        fixed[d1] = Some(v1);
        fixed[d2] = Some(v2);
        let row = complete(fixed, &uncovered, &uses);
        add(row, &mut uncovered, &mut uses);
    }
    rows
}

fn generate_cases() -> Vec<Case> {
    let rows = generate_rows();
    // Independent check of the covering.
    let covered: BTreeSet<Pair> = rows.iter().flat_map(pairs_of).collect();
    let missing: Vec<_> = all_pairs().difference(&covered).copied().collect();
    assert!(missing.is_empty(), "pairs not covered: {missing:?}");
    for l in 0..DIMS[0] {
        for s in 0..DIMS[1] {
            assert!(
                rows.iter().any(|r| r[0] == l && r[1] == s),
                "leaf {l} x speed {s} missing"
            );
        }
    }
    rows.into_iter()
        .enumerate()
        .map(|(i, r)| Case::from_row(i, r))
        .collect()
}

#[test]
fn generated_cases_cover_all_pairs_and_every_leaf_with_every_speed() {
    let cases = generate_cases();
    let again = generate_cases();
    assert_eq!(
        cases.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        again.iter().map(|c| c.to_string()).collect::<Vec<_>>(),
        "generation is not deterministic"
    );
    // A covering of leaf x life alone needs 9 x 4 rows; greedy should stay close.
    assert!(
        cases.len() >= DIMS[0] * DIMS[4] && cases.len() <= 48,
        "{} cases",
        cases.len()
    );
}

// ---------------------------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------------------------

/// One write into a layer: data or zeroes (`write -z`; real zeroes on v2 images).
#[derive(Clone, Copy, Debug)]
enum Op {
    Data(u64, u64),
    Zero(u64, u64),
}

#[derive(Default)]
struct Layout {
    base: Vec<Op>,
    mid: Vec<Op>,
    leaf: Vec<Op>,
}

/// What each layer holds, slot by slot (slot = one leaf cluster), repeating every 12
/// slots: base data alone; base and mid overlapping; a mid zero cluster over base data;
/// mid data alone; base data starting a quarter into the cluster; leaf data over the
/// base; base data in the first half and mid data across the next boundary; a hole; a
/// small (subcluster-sized) leaf write over base data; base data; a leaf zero cluster
/// over base data. Everything is clipped to the disk size.
fn layout(c: &Case) -> Layout {
    let cs = c.cs();
    let mut l = Layout::default();
    for i in 0..SLOTS {
        let o = i * cs;
        match i % 12 {
            0 | 10 => l.base.push(Op::Data(o, cs)),
            1 => {
                l.base.push(Op::Data(o, cs));
                l.mid.push(Op::Data(o, cs));
            }
            2 => {
                l.base.push(Op::Data(o, cs));
                l.mid.push(Op::Zero(o, cs));
            }
            3 => l.mid.push(Op::Data(o, cs)),
            4 => l.base.push(Op::Data(o + cs / 4, cs - cs / 4)),
            5 => {
                l.base.push(Op::Data(o, cs));
                l.leaf.push(Op::Data(o, cs));
            }
            6 => {
                l.base.push(Op::Data(o, cs / 2));
                l.mid.push(Op::Data(o + cs / 2, cs));
            }
            7 | 8 => {}
            9 => {
                l.base.push(Op::Data(o, cs));
                l.leaf
                    .push(Op::Data(o + cs / 2, (cs / 32).max(512).min(cs / 2)));
            }
            _ => {
                l.base.push(Op::Data(o, cs));
                l.leaf.push(Op::Zero(o, cs));
            }
        }
    }
    let size = c.size();
    let clip = |ops: &mut Vec<Op>| {
        *ops = ops
            .iter()
            .filter_map(|op| {
                let (o, n, data) = match *op {
                    Op::Data(o, n) => (o, n, true),
                    Op::Zero(o, n) => (o, n, false),
                };
                let n = n.min(size.saturating_sub(o));
                (n > 0).then_some(if data { Op::Data(o, n) } else { Op::Zero(o, n) })
            })
            .collect()
    };
    clip(&mut l.base);
    clip(&mut l.mid);
    clip(&mut l.leaf);
    l
}

/// Applies `ops` to a qcow2 image in one qemu-io run: data comes from a random source
/// file, each write then tagged with its own byte pattern at its start so that no two
/// writes look alike.
fn apply_qcow2(image: &Path, ops: &[Op], src: &Path, tag_base: u8) {
    let mut cmds = Vec::new();
    for (k, op) in ops.iter().enumerate() {
        match *op {
            Op::Data(o, n) => {
                cmds.push(format!("write -q -s {} {o} {n}", ps(src)));
                let tag = tag_base.wrapping_add(k as u8) | 1;
                cmds.push(format!("write -q -P {tag:#x} {o} {}", n.min(16)));
            }
            Op::Zero(o, n) => cmds.push(format!("write -q -z {o} {n}")),
        }
    }
    if !cmds.is_empty() {
        let refs: Vec<&str> = cmds.iter().map(String::as_str).collect();
        qemu_io_cmds(image, &refs);
    }
}

/// A case's chain, made and recorded before mounting.
struct Prepared {
    case: Case,
    dir: PathBuf,
    leaf: PathBuf,
    mid: PathBuf,
    base: PathBuf,
    /// The chain's contents per `qemu-img convert` before mounting, and that raw file.
    reference: Vec<u8>,
    ref_raw: PathBuf,
    /// The leaf's backing-filename and its format before the stream.
    link_before: (Option<String>, Option<String>),
    /// Guest ranges the leaf itself defined before the stream.
    leaf_before: Vec<Range<u64>>,
}

fn link_of(image: &Path) -> (Option<String>, Option<String>) {
    let info = qemu_img_info(image);
    (
        info["backing-filename"].as_str().map(str::to_string),
        info["backing-filename-format"].as_str().map(str::to_string),
    )
}

/// Guest ranges allocated (data or zero) in the leaf itself, merged.
fn leaf_extents(image: &Path) -> Vec<Range<u64>> {
    merge_ranges(
        qemu_img_map(image)
            .into_iter()
            .filter(|e| e.depth == 0 && e.present)
            .map(|e| e.start..e.end()),
    )
}

fn build_chain(dir: &Path, c: &Case) -> Prepared {
    fs::create_dir_all(dir).unwrap();
    let cs = c.cs();
    let size = c.size();
    let l = layout(c);
    let v2 = c.leaf.compat == "0.10";
    let src = |what: &str, seed: u64| {
        let p = dir.join(format!("src-{what}.bin"));
        create_raw_from(&p, &splitmix_bytes(cs as usize, seed));
        p
    };
    let seed = 1000 * c.id as u64;

    let base = dir.join(c.base_file());
    match c.base {
        BaseFmt::Raw => {
            create_raw(&base, size);
            let f = open_rw(&base).unwrap();
            for (k, op) in l.base.iter().enumerate() {
                if let Op::Data(o, n) = *op {
                    f.write_all_at(&splitmix_bytes(n as usize, seed + 100 + k as u64), o)
                        .unwrap();
                }
            }
        }
        BaseFmt::Qcow2 => {
            let mut q = Qcow2::new().size(size).cluster_size(c.base_cluster());
            if v2 {
                q = q.compat("0.10");
            }
            q.create(&base);
            apply_qcow2(&base, &l.base, &src("base", seed + 1), 0x10);
        }
    }
    let mid = dir.join(format!("{}-mid.qcow2", c.stem()));
    Qcow2::new()
        .size(size)
        .cluster_size(cs)
        .compat(c.leaf.compat)
        .backing_name(&c.base_file(), c.base_fmt())
        .create(&mid);
    apply_qcow2(&mid, &l.mid, &src("mid", seed + 2), 0x50);
    let leaf = dir.join(format!("{}.qcow2", c.stem()));
    Qcow2::new()
        .size(size)
        .cluster_size(cs)
        .compat(c.leaf.compat)
        .extended_l2(c.leaf.extended_l2)
        .backing_name(mid.file_name().unwrap().to_str().unwrap(), "qcow2")
        .create(&leaf);
    apply_qcow2(&leaf, &l.leaf, &src("leaf", seed + 3), 0x90);

    let ref_raw = dir.join(format!("{}.ref.raw", c.stem()));
    convert_to_raw(&leaf, &ref_raw);
    let reference = fs::read(&ref_raw).unwrap();
    assert_eq!(reference.len() as u64, size, "reference size");
    Prepared {
        case: *c,
        dir: dir.to_path_buf(),
        link_before: link_of(&leaf),
        leaf_before: leaf_extents(&leaf),
        leaf,
        mid,
        base,
        reference,
        ref_raw,
    }
}

// ---------------------------------------------------------------------------------------------
// The control file
// ---------------------------------------------------------------------------------------------

/// One `write()` of `cmd\n` to `.control`; Ok or the errno.
fn ctl(m: &Mount, cmd: &str) -> Result<(), i32> {
    let path = CString::new(m.control().as_os_str().as_bytes()).unwrap();
    let bytes = format!("{cmd}\n").into_bytes();
    with_timeout(".control write", IO_TIMEOUT, move || unsafe {
        let fd = libc::open(
            path.as_ptr(),
            libc::O_WRONLY | libc::O_TRUNC | libc::O_CLOEXEC,
        );
        assert!(
            fd >= 0,
            "open .control: {}",
            std::io::Error::last_os_error()
        );
        let n = libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        let r = if n < 0 {
            Err(std::io::Error::last_os_error().raw_os_error().unwrap())
        } else {
            Ok(())
        };
        libc::close(fd);
        r
    })
}

fn ctl_ok(m: &Mount, cmd: &str) {
    if let Err(e) = ctl(m, cmd) {
        panic!(
            "{cmd:?} failed: {}; status:\n{}",
            std::io::Error::from_raw_os_error(e),
            m.read_control()
        );
    }
}

fn status(m: &Mount, name: &str) -> ControlLine {
    let text = m.read_control();
    parse_control(&text)
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no line for {name} in .control:\n{text}"))
}

fn num(l: &ControlLine, key: &str) -> u64 {
    l.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {:?}", l.raw))
        .parse()
        .unwrap_or_else(|e| panic!("{key}= in {:?}: {e}", l.raw))
}

fn state(l: &ControlLine) -> &str {
    l.get("state").unwrap_or("?")
}

/// Polls the status of `name` until `pred` holds; panics with the last line after
/// `timeout`.
fn wait_for(
    m: &Mount,
    name: &str,
    timeout: Duration,
    what: &str,
    mut pred: impl FnMut(&ControlLine) -> bool,
) -> ControlLine {
    let deadline = Instant::now() + timeout;
    loop {
        let l = status(m, name);
        if pred(&l) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "not {what} after {timeout:?}; last status: {}",
            l.raw
        );
        thread::sleep(Duration::from_millis(15));
    }
}

/// Waits until the job has copied something and is still running: the midway point of a
/// life-cycle event.
fn wait_midway(m: &Mount, name: &str) -> ControlLine {
    let l = wait_for(m, name, Duration::from_secs(30), "midway", |l| {
        state(l) != "running" || num(l, "copied") > 0
    });
    assert_eq!(
        state(&l),
        "running",
        "the job ended before the midway point of its life cycle: {}",
        l.raw
    );
    l
}

/// Waits for the midway point and pauses there. False if the pause was refused because
/// the job had meanwhile run out of work (copy-on-read by a busy guest can do the rest):
/// `pause` then fails with EBUSY, and the job must be finishing or completed.
fn pause_unless_finishing(m: &Mount, name: &str) -> bool {
    wait_midway(m, name);
    match ctl(m, &format!("pause {name}")) {
        Ok(()) => true,
        Err(libc::EBUSY) => {
            let l = status(m, name);
            assert!(
                matches!(state(&l), "running" | "completed") && num(&l, "offset") == num(&l, "len"),
                "pause refused with EBUSY, but the job is not finishing: {}",
                l.raw
            );
            eprintln!("{name}: the pause came as the job was finishing: {}", l.raw);
            false
        }
        Err(e) => panic!(
            "\"pause {name}\" failed: {}; status:\n{}",
            std::io::Error::from_raw_os_error(e),
            m.read_control()
        ),
    }
}

// ---------------------------------------------------------------------------------------------
// The busy guest
// ---------------------------------------------------------------------------------------------

/// Pause between two guest operations (each a write and a checked read).
const GUEST_PACE: Duration = Duration::from_millis(50);

type GuestResult = Result<(Vec<u8>, usize), String>;

/// The busy guest's thread. Dropping it (a case that panicked) stops the thread and
/// waits (bounded) until it has closed the raw file, so the mount can be unmounted.
struct GuestIo {
    stop: Arc<AtomicBool>,
    handle: Option<thread::JoinHandle<GuestResult>>,
}

impl Drop for GuestIo {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(h) = self.handle.take() {
            if wait_until(|| h.is_finished(), IO_TIMEOUT) {
                let _ = h.join();
            }
        }
    }
}

/// Random writes (recorded in `model`, a quarter of them followed by fdatasync) and
/// random reads checked against `model`, through the mounted raw file, until stopped
/// (at least 2 operations). Returns the model and the number of operations.
fn guest_io(
    path: PathBuf,
    mut model: Vec<u8>,
    cs: u64,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> GuestResult {
    let f = open_rw(&path).map_err(|e| format!("guest: open {path:?}: {e}"))?;
    let mut rng = StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    // Small operations (each touches one or two clusters), so that the guest races the
    // job without doing most of its work.
    let max = (cs / 2).clamp(512, 256 * KIB);
    let mut ops = 0;
    while ops < 2 || !stop.load(Ordering::Acquire) {
        let (off, len) = match rng.gen_range(0..3) {
            0 => (rng.gen_range(0..size / cs) * cs, max),
            1 => {
                let k = rng.gen_range(1..size / cs);
                (
                    k * cs - rng.gen_range(1..=cs.min(4096)),
                    rng.gen_range(1..=8192),
                )
            }
            _ => (rng.gen_range(0..size), rng.gen_range(1..=max)),
        };
        let len = len.min(size - off) as usize;
        let data = splitmix_bytes(len, rng.gen());
        f.write_all_at(&data, off)
            .map_err(|e| format!("guest write {off}+{len} after {ops} ops: {e}"))?;
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if rng.gen_range(0..4) == 0 {
            f.sync_data()
                .map_err(|e| format!("guest fdatasync after {ops} ops: {e}"))?;
        }
        let (roff, rlen) = random_read(&mut rng, size, cs);
        check_pread(&f, &model, roff, rlen.min(max as usize))
            .map_err(|e| format!("guest read after {ops} ops: {e} (seed {seed})"))?;
        ops += 1;
        thread::sleep(GUEST_PACE);
    }
    f.sync_all()
        .map_err(|e| format!("guest final fsync: {e}"))?;
    Ok((model, ops))
}

fn start_guest(m: &Mount, name: &str, model: Vec<u8>, cs: u64, seed: u64) -> GuestIo {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let path = m.file(name);
    let handle = thread::Builder::new()
        .name(format!("{}:guest", test_name()))
        .spawn(move || guest_io(path, model, cs, seed, st))
        .unwrap();
    GuestIo {
        stop,
        handle: Some(handle),
    }
}

/// Stops the guest and returns its model (panics with the guest's error).
fn stop_guest(mut g: GuestIo) -> (Vec<u8>, usize) {
    g.stop.store(true, Ordering::Release);
    let handle = g.handle.take().unwrap();
    let r = with_timeout("guest I/O thread", IO_TIMEOUT, move || handle.join());
    match r {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("busy guest: {e}"),
        Err(p) => std::panic::resume_unwind(p),
    }
}

// ---------------------------------------------------------------------------------------------
// Running a case
// ---------------------------------------------------------------------------------------------

/// What the run left for the verdict.
struct Outcome {
    /// The expected disk: the reference plus the guest's writes.
    model: Option<Vec<u8>>,
    guest_ops: usize,
    killed: bool,
    /// Problems that do not stop the case (the verdict by qemu-img still runs).
    problems: Vec<String>,
}

fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
        .unwrap_or_else(|| "(non-string panic)".into())
}

fn catch<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|p| panic_text(&*p))
}

/// Mounts `leaves` on `mp` (panics with stderr on failure).
fn mount_at(mp: &Path, leaves: &[&Path]) -> Mount {
    MountCmd::new()
        .at(mp)
        .images(leaves)
        .run()
        .unwrap_or_else(|f| panic!("streamfs mount {mp:?}: {f}"))
}

fn write_model(p: &Prepared, model: &[u8]) -> PathBuf {
    let path = p.dir.join(format!("{}.model.raw", p.case.stem()));
    create_raw_from(&path, model);
    path
}

/// Runs the case's job through its life cycle to `completed`. `shared` is the group's
/// mount; kill -9 cases own theirs (`own`, replaced by the remount; `mp` is its mount
/// point).
fn run_case(
    p: &Prepared,
    shared: Option<&Mount>,
    own: &mut Option<Mount>,
    mp: &Path,
    seed: u64,
) -> Outcome {
    let c = &p.case;
    let name = c.name();
    let cs = c.cs();
    let busy = c.guest == Guest::Busy;
    let mut out = Outcome {
        model: None,
        guest_ops: 0,
        killed: false,
        problems: Vec::new(),
    };
    let initial_speed = match (c.limit(), c.life) {
        (Some(l), _) => l,
        (None, Life::Plain) => 0,
        // Unlimited, but slow until the event so that there is a "midway".
        (None, _) => BELOW * cs,
    };
    let final_speed = c.limit().unwrap_or(0);
    let start_cmd = |speed: u64| {
        let extra = match c.kind {
            Kind::Whole => String::new(),
            Kind::Base => format!(" base={}", c.base_file()),
            Kind::Range => {
                let (o, l) = c.range();
                format!(" offset={o} length={l}")
            }
        };
        format!("start {name}{extra} speed={speed}")
    };
    macro_rules! m {
        () => {
            shared.or(own.as_ref()).expect("a mount")
        };
    }

    let idle = status(m!(), &name);
    assert_eq!(state(&idle), "idle", "before the stream: {}", idle.raw);
    assert_eq!(num(&idle, "layers"), 3, "{}", idle.raw);
    let mut guest = busy.then(|| start_guest(m!(), &name, p.reference.clone(), cs, seed));
    let mut model = None;
    let t0 = Instant::now();
    ctl_ok(m!(), &start_cmd(initial_speed));
    let first = status(m!(), &name);
    assert_eq!(
        num(&first, "speed"),
        initial_speed,
        "speed of the new job: {}",
        first.raw
    );
    // Bytes copied by jobs that ended before the last one.
    let mut copied_before = 0;
    // Throttle bookings that start at once (each start and speed change has one).
    let mut free_bookings = 1;
    match c.life {
        Life::Plain => {}
        // A pause that came as the job was finishing is refused (EBUSY), which is
        // right: the job then goes on to complete, and is judged as any other.
        Life::PauseResume if !pause_unless_finishing(m!(), &name) => {}
        Life::PauseResume => {
            let p1 = status(m!(), &name);
            assert_eq!(state(&p1), "paused", "after pause: {}", p1.raw);
            thread::sleep(Duration::from_millis(400));
            let p2 = status(m!(), &name);
            assert_eq!(state(&p2), "paused", "400 ms after pause: {}", p2.raw);
            assert_eq!(
                num(&p2, "copied"),
                num(&p1, "copied"),
                "the job copied while paused: {} -> {}",
                p1.raw,
                p2.raw
            );
            if final_speed != initial_speed {
                ctl_ok(m!(), &format!("speed {name} {final_speed}"));
                free_bookings += 1;
            }
            ctl_ok(m!(), &format!("resume {name}"));
        }
        Life::CancelRestart => {
            wait_midway(m!(), &name);
            ctl_ok(m!(), &format!("cancel {name}"));
            let l1 = status(m!(), &name);
            assert_eq!(state(&l1), "cancelled", "after cancel: {}", l1.raw);
            assert_eq!(num(&l1, "layers"), 3, "after cancel: {}", l1.raw);
            thread::sleep(Duration::from_millis(300));
            let l2 = status(m!(), &name);
            assert_eq!(
                num(&l2, "copied"),
                num(&l1, "copied"),
                "copying went on after cancel: {} -> {}",
                l1.raw,
                l2.raw
            );
            copied_before += num(&l1, "copied");
            ctl_ok(m!(), &start_cmd(final_speed));
            free_bookings += 1;
        }
        Life::Kill9 => {
            // Only synced writes are sure to survive kill -9, so the guest stops (and
            // syncs) first: after a short burst racing the job, and before the midway
            // point (on a tiny disk a longer burst would do the whole job itself).
            if let Some(g) = guest.take() {
                thread::sleep(Duration::from_millis(100));
                let (mo, ops) = stop_guest(g);
                out.guest_ops += ops;
                model = Some(mo);
            }
            wait_midway(m!(), &name);
            let l = status(m!(), &name);
            assert_eq!(state(&l), "running", "just before kill -9: {}", l.raw);
            copied_before += num(&l, "copied");
            own.take()
                .expect("kill -9 cases own their mount")
                .kill9_and_detach("kill -9 midway");
            out.killed = true;
            // The images right after the crash.
            let (code, text) = check_status_leaf_only(&p.leaf);
            assert!(
                code == 0 || code == 3,
                "qemu-img check right after kill -9 exited {code}:\n{text}"
            );
            assert_eq!(
                link_of(&p.leaf),
                p.link_before,
                "the backing link changed in the crash"
            );
            let want = match &model {
                Some(mo) => write_model(p, mo),
                None => p.ref_raw.clone(),
            };
            assert_identical_to_raw("chain right after kill -9 vs expected", &p.leaf, &want);
            *own = Some(mount_at(mp, &[&p.leaf]));
            let l = status(m!(), &name);
            assert_eq!(state(&l), "idle", "after the remount: {}", l.raw);
            if let Some(mo) = model.take() {
                guest = Some(start_guest(m!(), &name, mo, cs, seed + 7));
            }
            ctl_ok(m!(), &start_cmd(final_speed));
            free_bookings += 1;
        }
    }
    let done = wait_for(m!(), &name, Duration::from_secs(90), "finished", |l| {
        !matches!(state(l), "running" | "paused")
    });
    let elapsed = t0.elapsed();
    if let Some(g) = guest.take() {
        let (mo, ops) = stop_guest(g);
        out.guest_ops += ops;
        model = Some(mo);
    }
    out.model = model;
    assert_eq!(state(&done), "completed", "final state: {}", done.raw);
    assert_eq!(
        num(&done, "offset"),
        num(&done, "len"),
        "completed: {}",
        done.raw
    );
    assert_eq!(
        num(&done, "layers"),
        c.layers_after(),
        "layers after the stream: {}",
        done.raw
    );
    if c.kind == Kind::Base {
        let b = done.get("base").unwrap_or("-");
        assert!(
            b.ends_with(&c.base_file()),
            "status does not name the kept base: {}",
            done.raw
        );
    }
    if let Some(limit) = c.limit() {
        let copied = copied_before + num(&done, "copied");
        // A token bucket: the rate over the elapsed time, plus the bookings that did
        // not wait (one quantum each: 1/8 s of copying, at least a cluster).
        let burst = free_bookings * (limit / 8).max(cs);
        let allowed = 1.25 * limit as f64 * elapsed.as_secs_f64() + burst as f64;
        let rate = copied as f64 / elapsed.as_secs_f64();
        eprintln!(
            "{c}: copied {copied} in {elapsed:.2?}: {rate:.0} B/s (limit {limit}, \
             allowed {allowed:.0} bytes)"
        );
        if copied as f64 > allowed {
            out.problems.push(format!(
                "speed limit not held: {copied} bytes copied in {elapsed:?} > 1.25 x {limit} B/s \
                 + {free_bookings} x {burst} B = {allowed:.0} (final status: {})",
                done.raw
            ));
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// The verdict, by qemu-img, after unmounting
// ---------------------------------------------------------------------------------------------

fn moved(path: &Path) -> PathBuf {
    let to = path.with_extension("moved-away");
    fs::rename(path, &to).unwrap_or_else(|e| panic!("rename {path:?}: {e}"));
    to
}

fn verify(p: &Prepared, o: &Outcome) {
    let c = &p.case;
    let (code, text) = check_status_leaf_only(&p.leaf);
    if o.killed {
        assert!(
            code == 0 || code == 3,
            "qemu-img check exited {code} (0, or 3 for leaks after kill -9):\n{text}"
        );
    } else {
        assert_eq!(code, 0, "qemu-img check of the leaf:\n{text}");
    }
    let info = qemu_img_info(&p.leaf);
    let (bf, bfmt) = link_of(&p.leaf);
    match c.kind {
        Kind::Whole => assert!(
            bf.is_none() && info.get("full-backing-filename").is_none(),
            "whole-disk stream: the leaf still has a backing file: {info:#}"
        ),
        Kind::Base => {
            let bf = bf.unwrap_or_else(|| panic!("stream with base=: no backing file: {info:#}"));
            let resolved = p.leaf.parent().unwrap().join(&bf);
            assert_eq!(
                fs::canonicalize(&resolved).ok(),
                Some(fs::canonicalize(&p.base).unwrap()),
                "backing-filename {bf:?} does not resolve to the kept base {:?}",
                p.base
            );
            assert_eq!(
                bfmt.as_deref(),
                Some(c.base_fmt()),
                "backing format of the kept base: {info:#}"
            );
        }
        Kind::Range => assert_eq!(
            (bf, bfmt),
            p.link_before,
            "a range stream changed the backing link"
        ),
    }
    let want = match &o.model {
        Some(model) => write_model(p, model),
        None => p.ref_raw.clone(),
    };
    assert_identical_to_raw("chain after the stream vs expected", &p.leaf, &want);
    match c.kind {
        Kind::Whole => {
            moved(&p.mid);
            moved(&p.base);
            assert_identical_to_raw(
                "leaf alone (mid and base moved away) vs expected",
                &p.leaf,
                &want,
            );
        }
        Kind::Base => {
            moved(&p.mid);
            assert_identical_to_raw(
                "leaf + kept base (mid moved away) vs expected",
                &p.leaf,
                &want,
            );
        }
        Kind::Range => {
            let r = c.aligned_range();
            let map = qemu_img_map(&p.leaf);
            for e in &map {
                if e.end() <= r.start || e.start >= r.end {
                    continue;
                }
                assert!(
                    e.depth == 0 || !e.data,
                    "range stream of {r:?}: {}+{} is still read from the backing chain \
                     (depth {}); qemu-img map of the leaf:\n{}",
                    e.start,
                    e.length,
                    e.depth,
                    map.iter()
                        .map(|e| format!(
                            "  {}+{} depth={} present={} data={} zero={}",
                            e.start, e.length, e.depth, e.present, e.data, e.zero
                        ))
                        .collect::<Vec<_>>()
                        .join("\n")
                );
            }
            if c.guest == Guest::Idle {
                // Nothing outside the range was copied.
                let outside = |v: &[Range<u64>]| -> Vec<Range<u64>> {
                    v.iter()
                        .flat_map(|x| [x.start..x.end.min(r.start), x.start.max(r.end)..x.end])
                        .filter(|x| !x.is_empty())
                        .collect()
                };
                assert_eq!(
                    outside(&leaf_extents(&p.leaf)),
                    outside(&p.leaf_before),
                    "the leaf's allocation outside the range {r:?} changed"
                );
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Groups of cases and the matrix
// ---------------------------------------------------------------------------------------------

/// Cases sharing one mount (kill -9 cases are alone in theirs).
struct Group {
    label: String,
    cases: Vec<Case>,
}

type Verdict = (Case, Duration, Result<Vec<String>, String>);

fn run_group(root: &Path, g: &Group, seed: u64) -> Vec<Verdict> {
    let began = Instant::now();
    let gdir = root.join(&g.label);
    let mut verdicts = Vec::new();
    let mut preps = Vec::new();
    for c in &g.cases {
        match catch(|| build_chain(&gdir.join(c.stem()), c)) {
            Ok(p) => preps.push(p),
            Err(e) => verdicts.push((*c, began.elapsed(), Err(format!("building the chain: {e}")))),
        }
    }
    let mp = gdir.join("mnt");
    fs::create_dir_all(&mp).unwrap();
    let leaves: Vec<&Path> = preps.iter().map(|p| p.leaf.as_path()).collect();
    let mount = match catch(|| mount_at(&mp, &leaves)) {
        Ok(m) => m,
        Err(e) => {
            for p in &preps {
                verdicts.push((p.case, began.elapsed(), Err(e.clone())));
            }
            return verdicts;
        }
    };
    let solo = g.cases.iter().any(|c| c.life == Life::Kill9);
    let mut runs: Vec<Result<Outcome, String>> = Vec::new();
    let mut umount_error = None;
    if solo {
        assert_eq!(preps.len(), 1);
        let mut own = Some(mount);
        runs.push(catch(|| run_case(&preps[0], None, &mut own, &mp, seed)));
        if let Some(m) = own.take() {
            umount_error = catch(|| m.umount()).err();
        }
    } else {
        let shared = &mount;
        runs = thread::scope(|s| {
            let handles: Vec<_> = preps
                .iter()
                .map(|p| {
                    let mp = &mp;
                    thread::Builder::new()
                        .name(p.case.stem())
                        .spawn_scoped(s, move || {
                            catch(|| {
                                run_case(p, Some(shared), &mut None, mp, seed + p.case.id as u64)
                            })
                        })
                        .unwrap()
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| Err(panic_text(&*p))))
                .collect()
        });
        umount_error = catch(|| mount.umount()).err();
    }
    for (p, run) in preps.iter().zip(runs) {
        let verdict = match (run, &umount_error) {
            (Err(e), _) => Err(format!("while streaming: {e}")),
            (Ok(_), Some(e)) => Err(format!("unmounting: {e}")),
            (Ok(o), None) => match catch(|| verify(p, &o)) {
                Ok(()) if o.problems.is_empty() => Ok(vec![format!("{} guest ops", o.guest_ops)]),
                Ok(()) => Err(o.problems.join("; ")),
                Err(e) => Err(o
                    .problems
                    .iter()
                    .cloned()
                    .chain([format!("verdict: {e}")])
                    .collect::<Vec<_>>()
                    .join("; ")),
            },
        };
        verdicts.push((p.case, began.elapsed(), verdict));
    }
    if verdicts.iter().all(|v| v.2.is_ok()) && std::env::var_os("STREAMFS_MATRIX_KEEP").is_none() {
        let _ = fs::remove_dir_all(&gdir);
    }
    verdicts
}

fn env_usize(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

#[test]
fn stream_matrix() {
    require_fuse!();
    let all = generate_cases();
    println!("stream matrix: {} generated cases", all.len());
    for (d, n) in DIMS.iter().enumerate() {
        let counts: Vec<usize> = (0..*n)
            .map(|v| generate_rows().iter().filter(|r| r[d] == v).count())
            .collect();
        println!(
            "  {:>5}: {n} values, cases per value {counts:?}",
            DIM_NAMES[d]
        );
    }
    for c in &all {
        println!("  {c}");
    }
    let filter = std::env::var("STREAMFS_MATRIX").unwrap_or_default();
    let cases: Vec<Case> = all
        .into_iter()
        .filter(|c| format!("{c} ").contains(&filter))
        .collect();
    assert!(
        !cases.is_empty(),
        "STREAMFS_MATRIX={filter:?} selects no case"
    );
    let seed = test_seed();

    let mut groups: Vec<Group> = Vec::new();
    for leaf in LEAVES {
        let shared: Vec<Case> = cases
            .iter()
            .filter(|c| c.leaf.label == leaf.label && c.life != Life::Kill9)
            .copied()
            .collect();
        if !shared.is_empty() {
            groups.push(Group {
                label: format!("leaf-{}", leaf.label),
                cases: shared,
            });
        }
    }
    for c in cases.iter().filter(|c| c.life == Life::Kill9) {
        groups.push(Group {
            label: format!("solo-{}", c.stem()),
            cases: vec![*c],
        });
    }
    // Big groups first, so the pool does not end with one long group running alone.
    groups.sort_by_key(|g| std::cmp::Reverse(g.cases.len()));

    let s = Scratch::new();
    let root = s.path().to_path_buf();
    let began = Instant::now();
    let queue = Mutex::new(
        groups
            .into_iter()
            .collect::<std::collections::VecDeque<_>>(),
    );
    let verdicts: Mutex<Vec<Verdict>> = Mutex::new(Vec::new());
    let threads = env_usize("STREAMFS_MATRIX_THREADS", 3).max(1);
    thread::scope(|sc| {
        for t in 0..threads {
            let (queue, verdicts, root) = (&queue, &verdicts, &root);
            thread::Builder::new()
                .name(format!("matrix-{t}"))
                .spawn_scoped(sc, move || loop {
                    let Some(g) = queue.lock().unwrap().pop_front() else {
                        break;
                    };
                    let v = run_group(root, &g, seed);
                    verdicts.lock().unwrap().extend(v);
                })
                .unwrap();
        }
    });
    let mut verdicts = verdicts.into_inner().unwrap();
    if std::env::var_os("STREAMFS_MATRIX_KEEP").is_some() {
        println!("keeping {root:?}");
        std::mem::forget(s);
    }
    verdicts.sort_by_key(|v| v.0.id);
    let failed: Vec<&Verdict> = verdicts.iter().filter(|v| v.2.is_err()).collect();
    println!(
        "stream matrix: {} cases in {:.1?}, {} failed",
        verdicts.len(),
        began.elapsed(),
        failed.len()
    );
    for (c, t, r) in &verdicts {
        match r {
            Ok(notes) => println!("  ok   {c} ({t:.1?}; {})", notes.join(", ")),
            Err(_) => println!("  FAIL {c} ({t:.1?})"),
        }
    }
    if !failed.is_empty() {
        let text: Vec<String> = failed
            .iter()
            .map(|(c, _, r)| format!("{c}:\n    {}", r.as_ref().unwrap_err()))
            .collect();
        panic!(
            "{} of {} stream matrix cases failed (seed {seed}):\n{}",
            failed.len(),
            verdicts.len(),
            text.join("\n")
        );
    }
}
