//! Is the host's storage busy? The block devices under a file are found from the file
//! itself (its st_dev in /sys/dev/block, following partitions to their disk, and
//! device-mapper and loop devices to what they sit on), and their load is read from
//! /proc/diskstats: sectors moved since the last sample, less what this process itself
//! moved (/proc/self/io), and what the other processes say they moved (/proc/PID/io),
//! as far as that can tell ours from anybody else's.

use std::collections::{BTreeSet, HashMap};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use parking_lot::Mutex;

/// Samples are at least this far apart (a worker's question is answered from the last).
const SAMPLE: Duration = Duration::from_millis(50);
/// Others moving more than this per second on our devices makes the host busy.
const BUSY_BYTES_PER_SEC: u64 = 2 << 20;

/// The whole-disk devices (names as in /proc/diskstats) that `path`'s data lives on.
pub fn devices_for(path: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    if let Ok(m) = std::fs::metadata(path) {
        let dev = if m.file_type().is_block_device() {
            m.rdev()
        } else {
            m.dev()
        };
        let sys = PathBuf::from(format!(
            "/sys/dev/block/{}:{}",
            libc::major(dev),
            libc::minor(dev)
        ));
        walk(&sys, &mut out, 0);
    }
    out
}

/// Follows a /sys block device down to the disks it sits on.
fn walk(sys: &Path, out: &mut BTreeSet<String>, depth: usize) {
    if depth > 16 {
        return;
    }
    let Ok(real) = std::fs::canonicalize(sys) else {
        return;
    };
    // A partition: its disk is the parent directory.
    let dev = if real.join("partition").exists() {
        match real.parent() {
            Some(p) => p.to_path_buf(),
            None => return,
        }
    } else {
        real
    };
    let Some(name) = dev.file_name().map(|n| n.to_string_lossy().into_owned()) else {
        return;
    };
    // Device-mapper (and md): the devices it is built from.
    let slaves: Vec<PathBuf> = std::fs::read_dir(dev.join("slaves"))
        .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
        .unwrap_or_default();
    // A loop device: the file behind it, on whatever device that lives.
    let backing = std::fs::read_to_string(dev.join("loop/backing_file")).ok();
    out.insert(name);
    for s in slaves {
        walk(&s, out, depth + 1);
    }
    if let Some(f) = backing {
        for d in devices_for(Path::new(f.trim())) {
            out.insert(d);
        }
    }
}

/// Sectors (512 B) read + written per device, from /proc/diskstats text.
pub fn parse_diskstats(text: &str) -> HashMap<String, u64> {
    text.lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let read: u64 = f.get(5)?.parse().ok()?;
            let written: u64 = f.get(9)?.parse().ok()?;
            Some((f.get(2)?.to_string(), read + written))
        })
        .collect()
}

/// This process's storage bytes (read_bytes + write_bytes) from /proc/self/io text.
pub fn parse_self_io(text: &str) -> u64 {
    text.lines()
        .filter_map(|l| {
            let (k, v) = l.split_once(':')?;
            matches!(k, "read_bytes" | "write_bytes")
                .then(|| v.trim().parse::<u64>().ok())
                .flatten()
        })
        .sum()
}

/// Storage bytes every other process has moved (the sum of /proc/PID/io read_bytes +
/// write_bytes of all processes but this one; those we may not read do not count).
fn others_io() -> u64 {
    let me = std::process::id().to_string();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            let n = e.file_name();
            let n = n.to_string_lossy();
            n.bytes().all(|b| b.is_ascii_digit()) && *n != me
        })
        .filter_map(|e| std::fs::read_to_string(e.path().join("io")).ok())
        .map(|t| parse_self_io(&t))
        .sum()
}

struct Sample {
    at: Instant,
    sectors: HashMap<String, u64>,
    own: u64,
    /// What other processes moved in all, when sampled (`others_io`).
    all_others: u64,
    /// Bytes per second others moved on each device over the last interval, from the
    /// device counters less our own I/O.
    others: HashMap<String, u64>,
    /// The same, from what the other processes said they moved (`others_io`).
    others_by_process: HashMap<String, u64>,
}

/// The raw counters of one sample.
struct Counters {
    at: Instant,
    sectors: HashMap<String, u64>,
    own: u64,
    all_others: u64,
}

impl Counters {
    fn read() -> Option<Counters> {
        let stats = std::fs::read_to_string("/proc/diskstats").ok()?;
        let io = std::fs::read_to_string("/proc/self/io").ok()?;
        Some(Counters {
            at: Instant::now(),
            sectors: parse_diskstats(&stats),
            own: parse_self_io(&io),
            all_others: others_io(),
        })
    }
}

impl Sample {
    /// The sample after `prev`: what others moved on each device in between.
    fn next(prev: Option<&Sample>, c: Counters) -> Sample {
        let mut others = HashMap::new();
        let mut others_by_process = HashMap::new();
        if let Some(prev) = prev {
            let secs =
                c.at.saturating_duration_since(prev.at)
                    .as_secs_f64()
                    .max(1e-3);
            let own_delta = c.own.saturating_sub(prev.own);
            // While we stream, our own traffic (counted when dirtied, written back
            // later) makes the device counters both hide theirs and show ghosts of
            // ours; what the other processes say they moved does neither. Their I/O
            // is credited to every device of ours that moved anything: it cannot be
            // told which disk it went to.
            let theirs_all = c.all_others.saturating_sub(prev.all_others);
            for (dev, &now) in &c.sectors {
                let moved = now.saturating_sub(*prev.sectors.get(dev).unwrap_or(&now)) * 512;
                // Our own I/O may be on any of our devices: credit it to each.
                let beyond_ours = moved.saturating_sub(own_delta);
                let by_process = theirs_all.min(moved);
                let rate = |b: u64| (b as f64 / secs) as u64;
                others.insert(dev.clone(), rate(beyond_ours));
                others_by_process.insert(dev.clone(), rate(by_process));
            }
        }
        Sample {
            at: c.at,
            sectors: c.sectors,
            own: c.own,
            all_others: c.all_others,
            others,
            others_by_process,
        }
    }
}

/// The mount's view of its host storage.
pub struct HostMonitor {
    last: Mutex<Option<Sample>>,
}

impl Default for HostMonitor {
    fn default() -> Self {
        HostMonitor {
            last: Mutex::new(None),
        }
    }
}

impl HostMonitor {
    /// Whether anybody else keeps any of `devices` busy right now. `by_process`: judge by
    /// what the other processes say they moved, which our own traffic cannot blur, but
    /// which cannot tell a neighbour from a local image server we are reading from;
    /// otherwise by the device counters less our own I/O.
    pub fn busy(&self, devices: &BTreeSet<String>, by_process: bool) -> bool {
        if devices.is_empty() {
            return false;
        }
        let stale = |last: &Option<Sample>| last.as_ref().is_none_or(|s| s.at.elapsed() >= SAMPLE);
        if stale(&self.last.lock()) {
            // Read without the lock (others_io walks every process); of two workers
            // sampling at once, the second's reading is dropped.
            let Some(c) = Counters::read() else {
                return false;
            };
            let mut last = self.last.lock();
            if stale(&last) {
                *last = Some(Sample::next(last.as_ref(), c));
            }
        }
        let last = self.last.lock();
        let Some(s) = last.as_ref() else {
            return false;
        };
        let others = if by_process {
            &s.others_by_process
        } else {
            &s.others
        };
        devices
            .iter()
            .any(|d| others.get(d).is_some_and(|&b| b > BUSY_BYTES_PER_SEC))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Device-mapper cannot be set up on this kernel, so the walk runs over a sysfs tree
    /// of the same shape: dm-0 built from a partition (sdb1 of sdb), an md array (of sdc
    /// and sdd) and a loop device whose file lives on the host's real disk.
    #[test]
    fn the_walk_follows_device_mapper_md_partitions_and_loop_devices() {
        use std::os::unix::fs::symlink;
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("devices");
        let mk = |rel: &str| {
            let p = root.join(rel);
            std::fs::create_dir_all(&p).unwrap();
            p
        };
        let sdb1 = mk("pci0/host0/block/sdb/sdb1");
        std::fs::write(sdb1.join("partition"), "1\n").unwrap();
        let sdc = mk("pci0/host1/block/sdc");
        let sdd = mk("pci0/host1/block/sdd");
        let md0 = mk("virtual/block/md0");
        mk("virtual/block/md0/slaves");
        symlink(&sdc, md0.join("slaves/sdc")).unwrap();
        symlink(&sdd, md0.join("slaves/sdd")).unwrap();
        let loop3 = mk("virtual/block/loop3/loop");
        let file = d.path().join("backing.img");
        std::fs::write(&file, b"x").unwrap();
        std::fs::write(loop3.join("backing_file"), format!("{}\n", file.display())).unwrap();
        let dm0 = mk("virtual/block/dm-0/slaves");
        symlink(&sdb1, dm0.join("sdb1")).unwrap();
        symlink(&md0, dm0.join("md0")).unwrap();
        symlink(root.join("virtual/block/loop3"), dm0.join("loop3")).unwrap();
        // /sys/dev/block/MAJ:MIN is a symlink to the device's directory.
        let link = d.path().join("253:0");
        symlink(root.join("virtual/block/dm-0"), &link).unwrap();
        let mut got = BTreeSet::new();
        walk(&link, &mut got, 0);
        let mut want: BTreeSet<String> = ["dm-0", "sdb", "md0", "sdc", "sdd", "loop3"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        want.extend(devices_for(&file));
        assert_eq!(got, want);
        // A cycle in the tree ends at the depth bound instead of recursing forever.
        symlink(root.join("virtual/block/dm-0"), md0.join("slaves/dm-0")).unwrap();
        let mut got = BTreeSet::new();
        walk(&link, &mut got, 0);
        assert!(got.contains("sdc") && got.contains("dm-0"));
    }

    /// Our own stream's traffic hides a neighbour in the device counters; what the other
    /// processes report still shows it, and only on devices that moved at all.
    #[test]
    fn others_are_seen_through_our_own_traffic() {
        let t0 = Instant::now();
        let counters = |at: Instant, vda: u64, vdb: u64, own: u64, others: u64| Counters {
            at,
            sectors: [("vda".to_string(), vda), ("vdb".to_string(), vdb)].into(),
            own,
            all_others: others,
        };
        let first = Sample::next(None, counters(t0, 0, 0, 0, 0));
        assert!(first.others.is_empty());
        // In 100 ms: vda moved 64 MiB, of which we claim 64 MiB; others say 4 MiB.
        let t1 = t0 + Duration::from_millis(100);
        let next = Sample::next(Some(&first), counters(t1, 131072, 0, 64 << 20, 4 << 20));
        assert_eq!(next.others["vda"], 0, "hidden in the device counters");
        assert_eq!(next.others_by_process["vda"], 40 << 20, "4 MiB in 0.1 s");
        assert_eq!(next.others_by_process["vdb"], 0, "vdb did not move");
    }

    #[test]
    fn diskstats_and_self_io_parse() {
        let t = "   7       0 loop0 10 0 80 0 5 0 40 0 0 0 0 0 0 0 0 0 0\n 254       0 vda 1 2 300 4 5 6 700 8 0 9 10\n garbage\n";
        let m = parse_diskstats(t);
        assert_eq!(m["loop0"], 120);
        assert_eq!(m["vda"], 1000);
        assert_eq!(m.len(), 2);
        let io = "rchar: 1\nwchar: 2\nsyscr: 3\nsyscw: 4\nread_bytes: 4096\nwrite_bytes: 8192\ncancelled_write_bytes: 0\n";
        assert_eq!(parse_self_io(io), 12288);
    }

    #[test]
    fn a_file_maps_to_the_disk_under_it() {
        // The crate's own source lives on some real device here; whatever it is, it is
        // listed in /proc/diskstats.
        let devs = devices_for(Path::new(env!("CARGO_MANIFEST_DIR")));
        let stats = std::fs::read_to_string("/proc/diskstats").unwrap_or_default();
        let known = parse_diskstats(&stats);
        for d in &devs {
            assert!(known.contains_key(d), "{d} not in /proc/diskstats");
        }
        assert!(devices_for(Path::new("/nonexistent/x")).is_empty());
    }
}
