//! The mount-wide scheduler (issue 11): the job queue, the total cap, idle policies and
//! what `waiting=` says. Functional checks only; timing belongs to the benchmarks.

mod common;

use common::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

fn field(m: &Mount, name: &str, key: &str) -> String {
    let text = m.read_control();
    let l = parse_control(&text)
        .into_iter()
        .find(|l| l.name == name)
        .expect("status line");
    l.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {}", l.raw))
        .to_string()
}

fn wait_for(m: &Mount, name: &str, key: &str, want: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while field(m, name, key) != want {
        assert!(
            Instant::now() < deadline,
            "{name}: {key} never {want}:\n{}",
            m.read_control()
        );
        thread::sleep(Duration::from_millis(10));
    }
}

fn chains(dir: &Path, n: usize, size: u64) -> Vec<PathBuf> {
    (0..n)
        .map(|i| {
            let base = Qcow2::new()
                .size(size)
                .create(&dir.join(format!("b{i}.qcow2")));
            write_pattern(&base, 0x10 + i as u8, 0, size);
            Qcow2::new()
                .backing(&base)
                .create(&dir.join(format!("d{i}.qcow2")))
        })
        .collect()
}

#[test]
fn jobs_beyond_max_jobs_queue_and_start_in_order() {
    require_fuse!();
    let s = Scratch::new();
    let imgs = chains(s.path(), 4, 4 * MIB);
    let m = s.mount(&imgs, &["--max-jobs", "1", "--idle", "off"]);
    ctl_ok(&m, "start d0.raw speed=256K");
    for d in ["d1.raw", "d2.raw", "d3.raw"] {
        ctl_ok(&m, &format!("start {d}"));
        assert_eq!(field(&m, d, "state"), "queued");
        assert_eq!(field(&m, d, "waiting"), "queued");
    }
    assert_eq!(field(&m, "d0.raw", "state"), "running");
    assert_eq!(
        ctl(&m, "pause d1.raw"),
        Err(libc::EBUSY),
        "a queued job cannot pause"
    );
    // Cancel of a queued job ends it at once; it never copied anything.
    ctl_ok(&m, "cancel d2.raw");
    assert_eq!(field(&m, "d2.raw", "state"), "cancelled");
    assert_eq!(field(&m, "d2.raw", "copied"), "0");
    // The running one ends: the next queued (d1, then d3) take the slot in order.
    ctl_ok(&m, "speed d0.raw 0");
    wait_for(&m, "d0.raw", "state", "completed");
    wait_for(&m, "d1.raw", "state", "completed");
    wait_for(&m, "d3.raw", "state", "completed");
    assert_eq!(field(&m, "d2.raw", "state"), "cancelled");
    m.umount();
}

#[test]
fn waiting_says_what_holds_a_job_back() {
    require_fuse!();
    let s = Scratch::new();
    let imgs = chains(s.path(), 2, 16 * MIB);
    let m = s.mount(&imgs, &["--min-speed", "0"]);
    // A guest busy on the other chain holds back a job with the mount policy.
    let stop = Arc::new(AtomicBool::new(false));
    let (st, raw) = (stop.clone(), m.file("d1.raw"));
    let guest = thread::spawn(move || {
        let f = open_direct(&raw).unwrap();
        let mut b = AlignedBuf::new(4096, 4096);
        let mut i = 0u64;
        while !st.load(Ordering::Relaxed) {
            f.read_at(&mut b, (i % 4096) * 4096).unwrap();
            i += 1;
        }
    });
    ctl_ok(&m, "start d0.raw idle=mount speed=1M");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        seen = field(&m, "d0.raw", "waiting") == "guest";
    }
    assert!(seen, "never waiting=guest:\n{}", m.read_control());
    ctl_ok(&m, "cancel d0.raw");
    // With the disk policy the other chain's guest does not count.
    ctl_ok(&m, "start d0.raw idle=disk speed=1M");
    for _ in 0..200 {
        assert_ne!(
            field(&m, "d0.raw", "waiting"),
            "guest",
            "{}",
            m.read_control()
        );
    }
    ctl_ok(&m, "cancel d0.raw");
    stop.store(true, Ordering::Relaxed);
    guest.join().unwrap();
    // The total cap: two jobs share a tiny total.
    ctl_ok(&m, "total-speed 64K");
    ctl_ok(&m, "start d0.raw idle=off");
    ctl_ok(&m, "start d1.raw idle=off");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        seen =
            field(&m, "d0.raw", "waiting") == "total" || field(&m, "d1.raw", "waiting") == "total";
    }
    assert!(seen, "never waiting=total:\n{}", m.read_control());
    ctl_ok(&m, "total-speed 0");
    wait_for(&m, "d0.raw", "state", "completed");
    wait_for(&m, "d1.raw", "state", "completed");
    assert_eq!(field(&m, "d0.raw", "waiting"), "none");
    m.umount();
}

#[test]
fn host_io_on_the_same_disk_holds_the_stream_back() {
    require_fuse!();
    let s = Scratch::new();
    let imgs = chains(s.path(), 1, 16 * MIB);
    let m = s.mount(&imgs, &["--min-speed", "0"]);
    // Somebody else (this test process) writes to the same disk, synchronously.
    let stop = Arc::new(AtomicBool::new(false));
    let (st, path) = (stop.clone(), s.join("noise.bin"));
    let noise = thread::spawn(move || {
        let f = File::create(&path).unwrap();
        let chunk = vec![7u8; 1 << 20];
        let mut i = 0u64;
        while !st.load(Ordering::Relaxed) {
            f.write_at(&chunk, (i % 64) << 20).unwrap();
            f.sync_data().unwrap();
            i += 1;
        }
    });
    ctl_ok(&m, "start d0.raw speed=1M");
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = false;
    while Instant::now() < deadline && !seen {
        seen = field(&m, "d0.raw", "waiting") == "host";
        thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    noise.join().unwrap();
    ctl_ok(&m, "cancel d0.raw");
    m.umount();
    if !seen {
        // A scratch directory on tmpfs or overlay has no block device to watch.
        let devs = streamfs::jobs::host::devices_for(s.path());
        assert!(
            devs.is_empty(),
            "the disk under the images ({devs:?}) was busy, never waiting=host"
        );
        eprintln!(
            "SKIP host part: {} is on no block device",
            s.path().display()
        );
    }
}

#[test]
fn policy_options_are_checked() {
    require_fuse!();
    let s = Scratch::new();
    let imgs = chains(s.path(), 1, MIB);
    for (args, what) in [
        (vec!["--idle", "sometimes"], "idle"),
        (vec!["--max-jobs", "lots"], "max-jobs"),
        (vec!["--total-speed", "fast"], "total-speed"),
        (vec!["--min-speed", "1Q"], "min-speed"),
    ] {
        let f = s
            .mount_cmd()
            .args(&args)
            .images(&imgs)
            .run()
            .err()
            .unwrap_or_else(|| panic!("{args:?} mounted"));
        assert!(f.to_string().contains(what), "{args:?}: {f}");
    }
    let m = s.mount(
        &imgs,
        &["--idle", "disk", "--total-speed", "1G", "--max-jobs", "3"],
    );
    assert_eq!(ctl(&m, "start d0.raw idle=never"), Err(libc::EINVAL));
    assert_eq!(ctl(&m, "total-speed lots"), Err(libc::EINVAL));
    ctl_ok(&m, "start d0.raw idle=off");
    wait_for(&m, "d0.raw", "state", "completed");
    m.umount();
}

/// Runs a command, panicking with its output on failure; returns stdout.
fn sh(cmd: &[&str]) -> String {
    let mut c = std::process::Command::new(cmd[0]);
    c.args(&cmd[1..]);
    let out = run_with_timeout(c, Duration::from_secs(60));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

#[test]
fn devices_are_found_through_a_loop_device() {
    require_fuse!();
    let s = Scratch::new();
    let img = s.join("fs.img");
    File::create(&img).unwrap().set_len(64 * MIB).unwrap();
    let under = streamfs::jobs::host::devices_for(&img);
    let loopdev = sh(&["losetup", "-f", "--show", ps(&img)]);
    struct Detach(String);
    impl Drop for Detach {
        fn drop(&mut self) {
            let _ = std::process::Command::new("losetup")
                .args(["-d", &self.0])
                .status();
        }
    }
    let _detach = Detach(loopdev.clone());
    sh(&["mkfs.ext4", "-q", "-F", &loopdev]);
    let dir = s.subdir("loopfs");
    sh(&["mount", &loopdev, ps(&dir)]);
    struct Unmount(PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let _ = std::process::Command::new("umount").arg(&self.0).status();
        }
    }
    let _unmount = Unmount(dir.clone());
    let f = dir.join("leaf.qcow2");
    Qcow2::new().size(MIB).create(&f);
    let devs = streamfs::jobs::host::devices_for(&f);
    let name = loopdev.trim_start_matches("/dev/").to_string();
    assert!(devs.contains(&name), "{devs:?} lacks {name}");
    // ... and what the loop device's backing file sits on.
    for d in &under {
        assert!(
            devs.contains(d),
            "{devs:?} lacks {d} (under the loop device's file)"
        );
    }
    // A block device given directly maps to itself.
    assert!(streamfs::jobs::host::devices_for(Path::new(&loopdev)).contains(&name));
}
