//! The mount's event stream (`MOUNTPOINT/.events`): one line per event,
//! `SEQ TIME NAME EVENT key=value...`, kept in a ring of the last `RING` events. Each
//! reader has its own cursor; a reader that fell further behind than the ring reaches
//! gets one `overflow lost=N` line in place of what it missed. Publishing wakes the
//! readers through the waker the file system registers (no polling anywhere).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use parking_lot::Mutex;

/// Events kept for slow readers.
pub const RING: usize = 4096;

struct Inner {
    /// Sequence number of the last event published (SEQ counts from 1).
    last: u64,
    /// (seq, line with its newline), oldest first.
    ring: VecDeque<(u64, Arc<str>)>,
    closed: bool,
}

pub struct Bus {
    inner: Mutex<Inner>,
    waker: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

/// What a reader gets.
#[derive(Debug, PartialEq, Eq)]
pub enum Read {
    /// Whole lines, and the cursor to read from next.
    Lines(String, u64),
    /// Nothing new yet.
    Empty,
    /// Nothing new, and nothing will come: the mount is going away.
    Closed,
    /// The next line does not fit in the buffer.
    TooSmall,
}

impl Default for Bus {
    fn default() -> Self {
        Bus {
            inner: Mutex::new(Inner {
                last: 0,
                ring: VecDeque::with_capacity(RING),
                closed: false,
            }),
            waker: Mutex::new(None),
        }
    }
}

impl Bus {
    /// Called (outside the bus lock) after every publish and at close.
    pub fn set_waker(&self, waker: Box<dyn Fn() + Send + Sync>) {
        *self.waker.lock() = Some(waker);
    }

    fn wake(&self) {
        if let Some(w) = &*self.waker.lock() {
            w();
        }
    }

    /// The cursor of a reader opened now: it sees what is published from now on.
    pub fn subscribe(&self) -> u64 {
        self.inner.lock().last + 1
    }

    /// Publishes `EVENT` for disk `name` (`-` for mount-wide) with `kv` already rendered
    /// as `key=value` tokens. Returns its SEQ.
    pub fn publish(&self, name: &str, event: &str, kv: &[(&str, String)]) -> u64 {
        let seq = {
            let mut inner = self.inner.lock();
            inner.last += 1;
            let seq = inner.last;
            let mut line = format!("{seq} {} {name} {event}", rfc3339_now());
            for (k, v) in kv {
                line.push(' ');
                line.push_str(k);
                line.push('=');
                line.push_str(v);
            }
            line.push('\n');
            if inner.ring.len() == RING {
                inner.ring.pop_front();
            }
            inner.ring.push_back((seq, line.into()));
            seq
        };
        self.wake();
        seq
    }

    /// Ends every reader (unmount): once caught up, they read end-of-file.
    pub fn close(&self) {
        self.inner.lock().closed = true;
        self.wake();
    }

    /// Whole lines from `cursor` on, at most `max` bytes.
    pub fn read(&self, cursor: u64, max: usize) -> Read {
        let inner = self.inner.lock();
        if cursor > inner.last {
            return if inner.closed {
                Read::Closed
            } else {
                Read::Empty
            };
        }
        let mut out = String::new();
        let mut next = cursor;
        let oldest = inner.ring.front().map_or(inner.last + 1, |e| e.0);
        if next < oldest {
            // Lost what fell out of the ring: one line in its place, with the SEQ of
            // the last lost event so the next line's SEQ follows it.
            let line = format!(
                "{} {} - overflow lost={}\n",
                oldest - 1,
                rfc3339_now(),
                oldest - next
            );
            if line.len() > max {
                return Read::TooSmall;
            }
            out.push_str(&line);
            next = oldest;
        }
        let start = (next - oldest) as usize;
        for (seq, line) in inner.ring.iter().skip(start) {
            if out.len() + line.len() > max {
                break;
            }
            out.push_str(line);
            next = seq + 1;
        }
        if out.is_empty() {
            return Read::TooSmall;
        }
        Read::Lines(out, next)
    }

    /// Whether a reader at `cursor` has something to read (or end-of-file).
    pub fn readable(&self, cursor: u64) -> bool {
        let inner = self.inner.lock();
        cursor <= inner.last || inner.closed
    }
}

/// Now as RFC 3339 UTC with microseconds: `2026-12-01T19:00:00.123456Z`.
pub fn rfc3339_now() -> String {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    rfc3339(d.as_secs(), d.subsec_micros())
}

/// Formats seconds since the epoch (UTC) with microseconds.
pub fn rfc3339(secs: u64, micros: u32) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Howard Hinnant's days-to-civil.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{micros:06}Z",
        rem / 3600,
        rem / 60 % 60,
        rem % 60
    )
}

/// Quotes a value the way `.control` does (`error="..."`): no raw control characters.
pub fn quote(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if c.is_control() => q.push(' '),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339_utc_with_microseconds() {
        assert_eq!(rfc3339(0, 0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400, 7), "2000-02-29T00:00:00.000007Z");
        assert_eq!(
            rfc3339(1_796_151_600, 123_456),
            "2026-12-01T19:00:00.123456Z"
        );
        assert_eq!(
            rfc3339(4_102_444_799, 999_999),
            "2099-12-31T23:59:59.999999Z"
        );
    }

    fn seqs(text: &str) -> Vec<u64> {
        text.lines()
            .map(|l| l.split(' ').next().unwrap().parse().unwrap())
            .collect()
    }

    #[test]
    fn readers_see_what_follows_their_open_in_order_and_whole_lines() {
        let bus = Bus::default();
        bus.publish("a.raw", "started", &[("offset", "0".into())]);
        let r = bus.subscribe();
        assert_eq!(bus.read(r, 4096), Read::Empty);
        assert!(!bus.readable(r));
        bus.publish("a.raw", "paused", &[("offset", "4096".into())]);
        bus.publish("-", "speed", &[("speed", "1".into())]);
        let Read::Lines(text, next) = bus.read(r, 4096) else {
            panic!()
        };
        assert_eq!(seqs(&text), [2, 3]);
        assert!(text
            .lines()
            .next()
            .unwrap()
            .ends_with(" a.raw paused offset=4096"));
        assert_eq!(next, 4);
        // A buffer that holds one line gets one line, never a part of one.
        let Read::Lines(one, n) = bus.read(r, text.find('\n').unwrap() + 5) else {
            panic!()
        };
        assert_eq!((seqs(&one), n), (vec![2], 3));
        assert_eq!(bus.read(r, 10), Read::TooSmall);
        bus.close();
        assert_eq!(bus.read(next, 4096), Read::Closed);
        assert!(
            matches!(bus.read(r, 4096), Read::Lines(..)),
            "closing keeps what is unread"
        );
    }

    #[test]
    fn a_reader_behind_the_ring_gets_one_overflow_line() {
        let bus = Bus::default();
        let r = bus.subscribe();
        for i in 0..RING + 10 {
            bus.publish("-", "speed", &[("speed", i.to_string())]);
        }
        let Read::Lines(text, _) = bus.read(r, 1 << 20) else {
            panic!()
        };
        let first = text.lines().next().unwrap();
        assert!(
            first.starts_with("10 ") && first.ends_with(" - overflow lost=10"),
            "{first}"
        );
        let s = seqs(&text);
        assert_eq!(s.len(), RING + 1);
        assert!(s.windows(2).all(|w| w[1] == w[0] + 1), "SEQ follows on");
    }
}

/// `io-error` events, at most one per second per disk and operation: errors within the
/// second after an event are folded into the next one (`count=N`), which the next error
/// or `flush` (called every second) publishes.
/// A guest request that failed: op (read, write, flush, discard), range, errno, reason.
pub struct Failure<'a> {
    pub op: &'static str,
    pub off: u64,
    pub len: u64,
    pub errno: i32,
    pub why: &'a str,
}

#[derive(Default)]
pub struct IoErrors {
    folds: Mutex<std::collections::HashMap<(String, &'static str), Fold>>,
    /// Signalled when an error was folded, so the flusher sleeps only while one is due.
    folded: parking_lot::Condvar,
}

struct Fold {
    last_event: std::time::Instant,
    /// Errors since the last event, and the newest of them.
    folded: u64,
    newest: Vec<(&'static str, String)>,
}

impl IoErrors {
    /// Reports a guest request that failed.
    pub fn report(&self, bus: &Bus, disk: &str, f: Failure<'_>) {
        let Failure {
            op,
            off,
            len,
            errno,
            why,
        } = f;
        let kv = vec![
            ("op", op.to_string()),
            ("offset", off.to_string()),
            ("len", len.to_string()),
            ("errno", errno_name(errno)),
            ("error", quote(why)),
        ];
        let mut folds = self.folds.lock();
        let now = std::time::Instant::now();
        match folds.get_mut(&(disk.to_string(), op)) {
            Some(f) if now.duration_since(f.last_event) < std::time::Duration::from_secs(1) => {
                f.folded += 1;
                f.newest = kv;
                self.folded.notify_all();
            }
            Some(f) => {
                let mut kv = kv;
                if f.folded > 0 {
                    kv.push(("count", (f.folded + 1).to_string()));
                }
                f.last_event = now;
                f.folded = 0;
                drop(folds);
                bus.publish(disk, "io-error", &kv);
            }
            None => {
                folds.insert(
                    (disk.to_string(), op),
                    Fold {
                        last_event: now,
                        folded: 0,
                        newest: Vec::new(),
                    },
                );
                drop(folds);
                bus.publish(disk, "io-error", &kv);
            }
        }
    }

    /// The flusher thread's body: sleeps until an error was folded, publishes it when
    /// its second has passed. Never wakes while nothing is folded (no polling).
    pub fn run_flusher(&self, bus: &Bus) {
        loop {
            {
                let mut folds = self.folds.lock();
                while !folds.values().any(|f| f.folded > 0) {
                    self.folded.wait(&mut folds);
                }
            }
            std::thread::sleep(std::time::Duration::from_millis(250));
            self.flush(bus);
        }
    }

    /// Publishes folded errors whose second has passed.
    pub fn flush(&self, bus: &Bus) {
        let mut due = Vec::new();
        {
            let mut folds = self.folds.lock();
            let now = std::time::Instant::now();
            for ((disk, _), f) in folds.iter_mut() {
                if f.folded > 0
                    && now.duration_since(f.last_event) >= std::time::Duration::from_secs(1)
                {
                    let mut kv = std::mem::take(&mut f.newest);
                    kv.push(("count", f.folded.to_string()));
                    f.folded = 0;
                    f.last_event = now;
                    due.push((disk.clone(), kv));
                }
            }
        }
        for (disk, kv) in due {
            bus.publish(&disk, "io-error", &kv);
        }
    }
}

/// The symbolic name of an errno (`ENOSPC`), or `E<number>` for rare ones.
pub fn errno_name(e: i32) -> String {
    let name = match e {
        libc::EIO => "EIO",
        libc::ENOSPC => "ENOSPC",
        libc::EDQUOT => "EDQUOT",
        libc::EROFS => "EROFS",
        libc::EINVAL => "EINVAL",
        libc::ENOENT => "ENOENT",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EFBIG => "EFBIG",
        libc::EOPNOTSUPP => "EOPNOTSUPP",
        libc::EBUSY => "EBUSY",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EAGAIN => "EAGAIN",
        libc::ENXIO => "ENXIO",
        libc::EBADF => "EBADF",
        libc::ENOTCONN => "ENOTCONN",
        _ => return format!("E{e}"),
    };
    name.to_string()
}

#[cfg(test)]
mod io_error_tests {
    use super::*;

    #[test]
    fn io_errors_fold_within_a_second() {
        let bus = Bus::default();
        let r = bus.subscribe();
        let errs = IoErrors::default();
        let f = |op, off, len, errno, why| Failure {
            op,
            off,
            len,
            errno,
            why,
        };
        for i in 0..5 {
            errs.report(
                &bus,
                "a.raw",
                f("write", i * 4096, 4096, libc::ENOSPC, "full"),
            );
        }
        errs.report(&bus, "a.raw", f("read", 0, 512, libc::EIO, "bad"));
        let Read::Lines(text, next) = bus.read(r, 1 << 16) else {
            panic!()
        };
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 2, "{text}");
        assert!(lines[0]
            .contains(" a.raw io-error op=write offset=0 len=4096 errno=ENOSPC error=\"full\""));
        assert!(lines[1].contains("op=read") && lines[1].contains("errno=EIO"));
        errs.flush(&bus);
        assert_eq!(
            bus.read(next, 1 << 16),
            Read::Empty,
            "not yet: the second has not passed"
        );
        std::thread::sleep(std::time::Duration::from_millis(1050));
        errs.flush(&bus);
        let Read::Lines(text, _) = bus.read(next, 1 << 16) else {
            panic!()
        };
        assert!(
            text.contains("offset=16384") && text.trim_end().ends_with("count=4"),
            "{text}"
        );
    }
}
