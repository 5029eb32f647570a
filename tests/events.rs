//! `MOUNTPOINT/.events`, write thresholds and the CLI that waits on them (issue 10).
//! Readers run in separate threads and processes while jobs run; every wait is bounded.

mod common;

use common::*;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

/// One parsed event line.
#[derive(Debug, Clone)]
struct Ev {
    seq: u64,
    time: String,
    name: String,
    event: String,
    rest: String,
}

impl Ev {
    fn parse(line: &str) -> Ev {
        let mut it = line.splitn(5, ' ');
        let mut next = || {
            it.next()
                .unwrap_or_else(|| panic!("short event line {line:?}"))
        };
        let seq = next().parse().unwrap_or_else(|_| panic!("SEQ in {line:?}"));
        let (time, name, event) = (next().to_string(), next().to_string(), next().to_string());
        Ev {
            seq,
            time,
            name,
            event,
            rest: it.next().unwrap_or("").to_string(),
        }
    }
    fn get(&self, key: &str) -> Option<String> {
        let pat = format!("{key}=");
        let at = self.rest.split(' ').find(|t| t.starts_with(&pat))?;
        Some(at[pat.len()..].to_string())
    }
    fn num(&self, key: &str) -> u64 {
        self.get(key)
            .unwrap_or_else(|| panic!("no {key}= in {self:?}"))
            .parse()
            .unwrap_or_else(|_| panic!("{key}= not a number in {self:?}"))
    }
}

/// A reader of `.events` in its own thread: every line it reads goes to a channel.
struct Reader {
    rx: mpsc::Receiver<Option<String>>,
    seen: Vec<Ev>,
}

impl Reader {
    fn open(m: &Mount) -> Reader {
        let mut f = File::open(m.file(".events")).expect("open .events");
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut buf = vec![0u8; 1 << 16];
            loop {
                match f.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(n) => {
                        let text = String::from_utf8_lossy(&buf[..n]).into_owned();
                        assert!(
                            text.ends_with('\n'),
                            "a read returned a partial line: {text:?}"
                        );
                        for l in text.lines() {
                            if tx.send(Some(l.to_string())).is_err() {
                                return;
                            }
                        }
                    }
                }
            }
        });
        Reader {
            rx,
            seen: Vec::new(),
        }
    }

    /// Waits for the next event named `event` (of any disk), collecting all in between.
    fn until(&mut self, event: &str) -> Ev {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Some(l)) => {
                    let e = Ev::parse(&l);
                    self.seen.push(e.clone());
                    if e.event == event {
                        return e;
                    }
                }
                Ok(None) => panic!(
                    "end of .events while waiting for {event}; seen {:?}",
                    self.seen
                ),
                Err(_) => panic!("no {event} event within 30 s; seen {:?}", self.seen),
            }
        }
    }

    /// True when the reader ends (end-of-file) within `timeout`.
    fn ends_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self
                .rx
                .recv_timeout(deadline.saturating_duration_since(Instant::now()))
            {
                Ok(Some(l)) => self.seen.push(Ev::parse(&l)),
                Ok(None) => return true,
                Err(_) => return false,
            }
        }
    }
}

fn status_field(m: &Mount, name: &str, key: &str) -> String {
    let text = m.read_control();
    let l = parse_control(&text)
        .into_iter()
        .find(|l| l.name == name)
        .expect("status line");
    l.get(key)
        .unwrap_or_else(|| panic!("no {key}= in {}", l.raw))
        .to_string()
}

/// base (0xaa over `size`) <- top, in `dir`.
fn chain(dir: &Path, stem: &str, size: u64) -> (PathBuf, PathBuf) {
    let base = Qcow2::new()
        .size(size)
        .create(&dir.join(format!("{stem}-base.qcow2")));
    write_pattern(&base, 0xaa, 0, size);
    let top = Qcow2::new()
        .backing(&base)
        .create(&dir.join(format!("{stem}.qcow2")));
    (base, top)
}

fn cli(args: &[&str]) -> std::process::Output {
    let mut cmd = Command::new(streamfs_bin());
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(60))
}

#[test]
fn every_job_transition_in_order_with_its_keys() {
    require_fuse!();
    let s = Scratch::new();
    let (base, top) = chain(s.path(), "vm", 8 * MIB);
    let m = s.mount(&[&top], &[]);
    let mut r = Reader::open(&m);
    let r2 = Reader::open(&m); // a second reader sees the same stream
    ctl_ok(&m, "start vm.raw speed=1M");
    let e = r.until("started");
    assert_eq!(
        (
            e.name.as_str(),
            e.num("offset"),
            e.num("len"),
            e.num("speed")
        ),
        ("vm.raw", 0, 8 * MIB, MIB)
    );
    assert_eq!(e.get("base").as_deref(), Some("-"));
    assert!(
        e.time.ends_with('Z') && e.time.len() == 27,
        "RFC 3339 UTC with microseconds: {}",
        e.time
    );
    ctl_ok(&m, "pause vm.raw");
    let p = r.until("paused");
    ctl_ok(&m, "speed vm.raw 2M");
    assert_eq!(r.until("speed").num("speed"), 2 * MIB);
    ctl_ok(&m, "resume vm.raw");
    assert_eq!(r.until("resumed").num("offset"), p.num("offset"));
    ctl_ok(&m, "cancel vm.raw");
    let c = r.until("cancelled");
    assert_eq!(c.num("len"), 8 * MIB);
    assert!(
        c.get("copied").is_some() && c.get("offset").is_some(),
        "{c:?}"
    );
    ctl_ok(&m, "start vm.raw");
    r.until("started");
    let done = r.until("completed");
    assert_eq!(done.num("offset"), 8 * MIB);
    assert_eq!(
        done.num("layers"),
        1,
        "completed after the link was rewritten: {done:?}"
    );
    assert!(done.get("copied").is_some() && done.get("base").is_some());
    // A failure: the backing file vanishes under a running stream.
    drop(base);
    let seqs: Vec<u64> = r.seen.iter().map(|e| e.seq).collect();
    assert!(
        seqs.windows(2).all(|w| w[1] == w[0] + 1),
        "SEQ in order: {seqs:?}"
    );
    let kinds: Vec<&str> = r.seen.iter().map(|e| e.event.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "started",
            "paused",
            "speed",
            "resumed",
            "cancelled",
            "started",
            "completed"
        ]
    );
    let other: Vec<String> = (0..7)
        .map(|_| r2.rx.recv_timeout(Duration::from_secs(5)).unwrap().unwrap())
        .collect();
    assert_eq!(
        other.iter().map(|l| Ev::parse(l).seq).collect::<Vec<_>>(),
        seqs,
        "readers are independent"
    );
    m.umount();
    assert!(
        r.ends_within(Duration::from_secs(5)),
        "unmount ends readers with end-of-file"
    );
}

#[test]
fn a_vanished_backing_file_fails_the_job_with_an_event() {
    require_fuse!();
    let s = Scratch::new();
    let (base, top) = chain(s.path(), "vm", 8 * MIB);
    let m = s.mount(&[&top], &[]);
    let mut r = Reader::open(&m);
    ctl_ok(&m, "start vm.raw speed=1M");
    r.until("started");
    std::fs::remove_file(&base).unwrap();
    let f = r.until("failed");
    assert!(
        f.rest.contains("error=\"") && f.rest.contains("vm-base.qcow2"),
        "{f:?}"
    );
    assert!(f.get("copied").is_some() && f.get("offset").is_some() && f.get("len").is_some());
    m.umount();
}

#[test]
fn enospc_on_a_guest_write_is_an_io_error_event() {
    require_fuse!();
    let s = Scratch::new();
    let small = s.subdir("small");
    let _fs = Tmpfs::new(small.clone(), "4M");
    let top = Qcow2::new()
        .size(64 * MIB)
        .create(&small.join("leaf.qcow2"));
    let m = s.mount(&[&top], &[]);
    let mut r = Reader::open(&m);
    let f = open_rw(&m.file("leaf.raw")).unwrap();
    let chunk = vec![0x5au8; MIB as usize];
    let mut failed = None;
    for i in 0..16u64 {
        if let Err(e) = f.write_at(&chunk, i * MIB).and_then(|_| f.sync_data()) {
            failed = Some(e);
            break;
        }
    }
    let e = failed.expect("a 4 MiB tmpfs must fill up");
    assert_eq!(e.raw_os_error(), Some(libc::ENOSPC), "{e}");
    let ev = r.until("io-error");
    assert_eq!(ev.get("errno").as_deref(), Some("ENOSPC"), "{ev:?}");
    assert!(
        matches!(ev.get("op").as_deref(), Some("write" | "flush")),
        "{ev:?}"
    );
    drop(f);
    m.umount();
}

#[test]
fn nonblocking_reads_poll_and_overflow() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = chain(s.path(), "vm", 4 * MIB);
    let m = s.mount(&[&top], &[]);
    let f = OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(m.file(".events"))
        .unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let e = (&f).read(&mut buf).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EAGAIN));
    let poll = |ms: i32| {
        let mut p = libc::pollfd {
            fd: f.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut p, 1, ms) };
        (r, p.revents)
    };
    assert_eq!(poll(100).0, 0, "nothing to read yet");
    // A poll that is waiting wakes when an event arrives.
    let mp = m.control();
    let t = thread::spawn(move || {
        thread::sleep(Duration::from_millis(300));
        let c = open_rw(&mp).unwrap();
        let _ = c.write_at(b"start vm.raw speed=64K", 0);
    });
    let began = Instant::now();
    let (n, rev) = poll(10_000);
    t.join().unwrap();
    assert_eq!(
        (n, rev & libc::POLLIN),
        (1, libc::POLLIN),
        "woken after {:?}",
        began.elapsed()
    );
    let n = (&f).read(&mut buf).unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).contains(" vm.raw started "));
    // Writing is refused.
    assert!(OpenOptions::new()
        .write(true)
        .open(m.file(".events"))
        .is_err());
    // Overflow: more than 4096 events while this reader does not read (the job is
    // paused, so speed changes only make events).
    ctl_ok(&m, "pause vm.raw");
    for i in 0..4200 {
        ctl_ok(&m, &format!("speed vm.raw {}", 65536 + i));
    }
    let mut text = String::new();
    loop {
        match (&f).read(&mut buf) {
            Ok(n) => text.push_str(&String::from_utf8_lossy(&buf[..n])),
            Err(e) if e.raw_os_error() == Some(libc::EAGAIN) => break,
            Err(e) => panic!("{e}"),
        }
    }
    let lines: Vec<Ev> = text.lines().map(Ev::parse).collect();
    assert_eq!(lines[0].event, "overflow", "{:?}", &lines[..2]);
    assert_eq!(lines[0].name, "-");
    let lost = lines[0].num("lost");
    assert_eq!(
        lost + (lines.len() as u64 - 1),
        4200 + 1,
        "paused + 4200 speed events"
    );
    assert_eq!(
        lines[1].seq,
        lines[0].seq + 1,
        "the line after an overflow follows its SEQ"
    );
    ctl_ok(&m, "cancel vm.raw");
    drop(f);
    m.umount();
}

#[test]
fn thresholds_fire_once_on_writes_copy_on_read_and_streams() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = chain(s.path(), "vm", 16 * MIB);
    let m = s.mount(&[&top], &[]);
    let mut r = Reader::open(&m);
    let alloc0: u64 = status_field(&m, "vm.raw", "alloc").parse().unwrap();
    assert_eq!(status_field(&m, "vm.raw", "threshold"), "0");
    // Guest write.
    let t1 = alloc0 + 64 * KIB;
    ctl_ok(&m, &format!("threshold vm.raw {t1}"));
    assert_eq!(status_field(&m, "vm.raw", "threshold"), t1.to_string());
    let f = open_rw(&m.file("vm.raw")).unwrap();
    f.write_at(&vec![1u8; 256 * KIB as usize], 0).unwrap();
    let e = r.until("threshold");
    assert_eq!(e.num("threshold"), t1);
    assert!(
        e.num("alloc") > t1 && e.num("exceeded") == e.num("alloc") - t1,
        "{e:?}"
    );
    assert_eq!(status_field(&m, "vm.raw", "threshold"), "0", "one-shot");
    f.write_at(&vec![2u8; 256 * KIB as usize], MIB).unwrap(); // no second event
                                                              // Copy-on-read.
    let alloc1: u64 = status_field(&m, "vm.raw", "alloc").parse().unwrap();
    ctl_ok(&m, &format!("threshold vm.raw {}", alloc1 + 1));
    let mut b = vec![0u8; 512 * KIB as usize];
    File::open(m.file("vm.raw"))
        .unwrap()
        .read_exact_at(&mut b, 4 * MIB)
        .unwrap();
    let e = r.until("threshold");
    assert_eq!(e.num("threshold"), alloc1 + 1);
    // Disarming: nothing fires.
    let alloc2: u64 = status_field(&m, "vm.raw", "alloc").parse().unwrap();
    ctl_ok(&m, &format!("threshold vm.raw {}", alloc2 + 1));
    ctl_ok(&m, "threshold vm.raw 0");
    f.write_at(&vec![3u8; 256 * KIB as usize], 8 * MIB).unwrap();
    // A stream, re-armed.
    let alloc3: u64 = status_field(&m, "vm.raw", "alloc").parse().unwrap();
    ctl_ok(&m, &format!("threshold vm.raw {}", alloc3 + MIB));
    ctl_ok(&m, "start vm.raw");
    let e = r.until("threshold");
    assert_eq!(e.num("threshold"), alloc3 + MIB);
    r.until("completed");
    let fired: Vec<u64> = r
        .seen
        .iter()
        .filter(|e| e.event == "threshold")
        .map(|e| e.num("threshold"))
        .collect();
    assert_eq!(
        fired,
        [t1, alloc1 + 1, alloc3 + MIB],
        "each armed threshold fired exactly once"
    );
    // Errors.
    assert_eq!(ctl(&m, "threshold nope.raw 1"), Err(libc::ENOENT));
    assert_eq!(ctl(&m, "threshold vm.raw lots"), Err(libc::EINVAL));
    drop(f);
    m.umount();
    let ro = s.mount(&[&top], &["--read-only"]);
    assert_eq!(ctl(&ro, "threshold vm.raw 1"), Err(libc::EROFS));
    ro.umount();
}

#[test]
fn cli_events_wait_and_threshold() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = chain(s.path(), "vm", 8 * MIB);
    let m = s.mount(&[&top], &[]);
    let mp = ps(m.path()).to_string();
    // No job since the mount: exit 2; unknown disk: exit 2.
    assert_eq!(cli(&["wait", &mp, "vm.raw"]).status.code(), Some(2));
    assert_eq!(cli(&["wait", &mp, "nope.raw"]).status.code(), Some(2));
    let follower = Command::new(streamfs_bin())
        .args(["events", &mp, "--json"])
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    thread::sleep(Duration::from_millis(300));
    ctl_ok(&m, "start vm.raw speed=1M");
    let t = cli(&["wait", &mp, "vm.raw", "--timeout", "0.5"]);
    assert_eq!(t.status.code(), Some(2), "timeout: {t:?}");
    let out = cli(&["threshold", &mp, "vm.raw", "100M"]);
    assert!(out.status.success(), "{out:?}");
    ctl_ok(&m, "speed vm.raw 0");
    let w = cli(&["wait", &mp, "vm.raw"]);
    assert_eq!(w.status.code(), Some(0), "{w:?}");
    // A job that already ended answers at once.
    assert_eq!(cli(&["wait", &mp, "vm.raw"]).status.code(), Some(0));
    m.umount();
    let out = with_timeout("events follower exit", Duration::from_secs(10), move || {
        follower.wait_with_output().unwrap()
    });
    assert!(out.status.success(), "events exits 0 at unmount: {out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    let first = text.lines().next().expect("events printed");
    let v: serde_json::Value = serde_json::from_str(first).unwrap();
    assert_eq!(v["event"], "started");
    assert_eq!(v["name"], "vm.raw");
    assert_eq!(v["len"], 8 * MIB, "numbers are numbers: {first}");
    assert!(v["seq"].is_u64() && v["time"].is_string());
    assert!(
        text.lines().any(|l| l.contains("\"event\":\"completed\"")),
        "{text}"
    );
}

#[test]
fn isatty_on_the_control_files_is_quiet() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = chain(s.path(), "vm", 4 * MIB);
    let log = s.join("log");
    let m = s.mount(&[&top], &["--log-file", ps(&log), "-v"]);
    for name in [".control", ".events", "vm.raw"] {
        let f = File::open(m.file(name)).unwrap();
        // SAFETY: isatty on a valid fd.
        assert_eq!(unsafe { libc::isatty(f.as_raw_fd()) }, 0);
        assert_eq!(
            std::io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOTTY),
            "{name}"
        );
    }
    m.umount();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(!text.contains("Not Implemented"), "{text}");
}
