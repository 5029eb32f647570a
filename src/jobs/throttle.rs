//! Rate limit for stream jobs: a shared timeline of booked copy time. Before copying
//! `bytes`, a worker waits until the timeline is free, then books `bytes / speed` on it;
//! bytes it did not copy after all (holes) are refunded. Waits are cut short when the
//! job is paused or cancelled (`stop`) or the speed changes, so `pause`, `cancel` and
//! `speed` act at once. Waiters are served in arrival order, so jobs sharing the mount's
//! total cap share it evenly (without the queue, whoever wins the wake-up race books
//! again and again: one job got 2.4x another's share).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

struct State {
    speed: u64,
    /// When the booked timeline ends.
    next: Instant,
    /// Tickets of the waiters, in arrival order; the first books next.
    queue: VecDeque<u64>,
    next_ticket: u64,
}

pub struct Throttle {
    state: Mutex<State>,
    changed: Condvar,
}

fn duration(bytes: u64, speed: u64) -> Duration {
    Duration::from_secs_f64(bytes as f64 / speed as f64)
}

impl Throttle {
    pub fn new(speed: u64) -> Throttle {
        Throttle {
            state: Mutex::new(State {
                speed,
                next: Instant::now(),
                queue: VecDeque::new(),
                next_ticket: 0,
            }),
            changed: Condvar::new(),
        }
    }

    pub fn speed(&self) -> u64 {
        self.state.lock().speed
    }

    /// Changes the limit now: what was booked at the old speed is forgotten.
    pub fn set_speed(&self, speed: u64) {
        let mut s = self.state.lock();
        s.speed = speed;
        s.next = Instant::now();
        self.changed.notify_all();
    }

    /// Wakes waiters so they re-check `stop` (on pause or cancel).
    pub fn wake(&self) {
        let _s = self.state.lock();
        self.changed.notify_all();
    }

    /// How much one booking should cover at the current speed: about 1/8 s of copying,
    /// so progress, pause and speed changes stay responsive; `max` when unlimited. Never
    /// less than `min` (one cluster, the smallest unit that can be copied), even when
    /// `min` exceeds `max` (2 MiB clusters) or 1/8 s of copying is less than a cluster.
    pub fn quantum(&self, min: u64, max: u64) -> u64 {
        let max = max.max(min);
        match self.speed() {
            0 => max,
            s => (s / 8).clamp(min, max),
        }
    }

    /// Waits until `bytes` may be copied and books them. Returns false (booking
    /// nothing) if `stop()` becomes true while waiting.
    pub fn admit(&self, bytes: u64, stop: impl Fn() -> bool) -> bool {
        self.book(bytes, stop).is_some()
    }

    /// `admit`, returning when the booking starts on the timeline: each booking starts
    /// no earlier than the previous one ended, so the bytes booked between two starts
    /// never exceed speed x the time between them (the accounting the tests check).
    fn book(&self, bytes: u64, stop: impl Fn() -> bool) -> Option<Instant> {
        let mut s = self.state.lock();
        if s.speed == 0 {
            return (!stop()).then(Instant::now);
        }
        let ticket = s.next_ticket;
        s.next_ticket += 1;
        s.queue.push_back(ticket);
        let leave = |s: &mut State| {
            s.queue.retain(|&t| t != ticket);
            self.changed.notify_all();
        };
        loop {
            if stop() {
                leave(&mut s);
                return None;
            }
            let now = Instant::now();
            if s.speed == 0 {
                leave(&mut s);
                return Some(now);
            }
            let first = s.queue.front() == Some(&ticket);
            if first && s.next <= now {
                s.next = now + duration(bytes, s.speed);
                leave(&mut s);
                return Some(now);
            }
            // The first waits for the timeline; the others for their turn (notified).
            let wait = if first {
                s.next - now
            } else {
                Duration::from_millis(50)
            };
            self.changed
                .wait_for(&mut s, wait.min(Duration::from_millis(50)));
        }
    }

    /// Gives back booked time for bytes that were not copied.
    pub fn refund(&self, bytes: u64) {
        let mut s = self.state.lock();
        if s.speed > 0 && bytes > 0 {
            let d = duration(bytes, s.speed);
            let now = Instant::now();
            s.next = s.next.checked_sub(d).map_or(now, |t| t.max(now));
            self.changed.notify_all();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;

    #[test]
    fn limits_rate_before_copying() {
        let t = Throttle::new(1 << 20);
        let began = Instant::now();
        // Five 64 KiB bookings at 1 MiB/s: the first goes at once, the fifth after ~250 ms.
        for _ in 0..5 {
            assert!(t.admit(64 << 10, || false));
        }
        let el = began.elapsed();
        assert!(
            el >= Duration::from_millis(230) && el < Duration::from_secs(2),
            "{el:?}"
        );
        // Refunds make room again.
        t.refund(64 << 10);
        assert_eq!(t.quantum(4096, 8 << 20), 128 << 10);
        t.set_speed(0);
        assert_eq!(t.quantum(4096, 8 << 20), 8 << 20);
    }

    /// Three jobs under a shared total cap, as the workers admit pieces (own limit
    /// first, then the total): the total is never exceeded over any window, the job with
    /// a lower limit of its own keeps to it, and the other two share the rest. Judged
    /// from the booking instants only: a slow machine books less, never more.
    #[test]
    fn a_total_cap_is_shared_and_never_exceeded() {
        const TOTAL: u64 = 32 << 20;
        const PIECE: u64 = 256 << 10;
        let total = Arc::new(Throttle::new(TOTAL));
        let own = [TOTAL / 4, 0, 0];
        let until = Instant::now() + Duration::from_millis(1500);
        let handles: Vec<_> = own
            .iter()
            .map(|&limit| {
                let total = total.clone();
                std::thread::spawn(move || {
                    let mine = Throttle::new(limit);
                    let mut booked = Vec::new();
                    while Instant::now() < until {
                        let a = mine.book(PIECE, || false).expect("not stopped");
                        let t = total.book(PIECE, || false).expect("not stopped");
                        booked.push((a, t));
                    }
                    booked
                })
            })
            .collect();
        let jobs: Vec<Vec<(Instant, Instant)>> =
            handles.into_iter().map(|h| h.join().unwrap()).collect();
        let within = |starts: &mut Vec<Instant>, speed: u64, what: &str| {
            starts.sort();
            for i in 0..starts.len() {
                for j in i + 1..starts.len() {
                    // Bookings i..j-1 fit between the starts of i and j.
                    let bytes = (j - i) as u64 * PIECE;
                    let room = speed as f64 * (starts[j] - starts[i]).as_secs_f64();
                    assert!(
                        bytes as f64 <= room + 1.0,
                        "{what}: {bytes} bytes booked in {:?}",
                        starts[j] - starts[i]
                    );
                }
            }
        };
        let mut all: Vec<Instant> = jobs.iter().flatten().map(|&(_, t)| t).collect();
        within(&mut all, TOTAL, "the total");
        let mut a: Vec<Instant> = jobs[0].iter().map(|&(a, _)| a).collect();
        within(&mut a, TOTAL / 4, "the job with its own limit");
        // The other two share what is left, roughly evenly.
        let (b, c) = (jobs[1].len() as f64, jobs[2].len() as f64);
        assert!(b + c >= 8.0, "too few bookings to judge: {b} {c}");
        eprintln!("shares: limited {}, others {b} and {c}", jobs[0].len());
        assert!(
            b.min(c) >= 0.3 * (b + c),
            "unfair share: {b} and {c} pieces (the limited job: {})",
            jobs[0].len()
        );
    }

    #[test]
    fn quantum_is_at_least_one_cluster_at_any_speed() {
        for cluster in [512u64, 4096, 64 << 10, 512 << 10, 1 << 20, 2 << 20] {
            for max in [256u64 << 10, 1 << 20, 8 << 20] {
                for speed in [0u64, 1, 1000, 1 << 20, 10 << 20, 1 << 30] {
                    let q = Throttle::new(speed).quantum(cluster, max);
                    assert!(
                        q >= cluster,
                        "cluster {cluster} max {max} speed {speed}: {q}"
                    );
                    assert!(
                        q <= max.max(cluster),
                        "cluster {cluster} max {max} speed {speed}"
                    );
                }
            }
        }
    }

    #[test]
    fn a_limit_below_one_cluster_per_admission_holds_on_average() {
        // 2 MiB pieces at 8 MiB/s: each admission books 1/4 s; five take at least 1 s.
        let t = Throttle::new(8 << 20);
        let began = Instant::now();
        for _ in 0..5 {
            assert!(t.admit(2 << 20, || false));
        }
        let el = began.elapsed();
        assert!(el >= Duration::from_millis(990), "{el:?}");
        assert!(el < Duration::from_secs(3), "{el:?}");
    }

    #[test]
    fn stop_and_speed_changes_cut_waits_short() {
        let t = Arc::new(Throttle::new(1));
        assert!(t.admit(1 << 20, || false)); // books ~12 days
        let stop = Arc::new(AtomicBool::new(false));
        let (t2, s2) = (t.clone(), stop.clone());
        let h = std::thread::spawn(move || t2.admit(1, || s2.load(Ordering::Acquire)));
        std::thread::sleep(Duration::from_millis(50));
        stop.store(true, Ordering::Release);
        t.wake();
        assert!(!h.join().unwrap(), "a stopped wait books nothing");
        let t3 = t.clone();
        let h = std::thread::spawn(move || {
            let b = Instant::now();
            t3.admit(1, || false);
            b.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        t.set_speed(1 << 30);
        assert!(h.join().unwrap() < Duration::from_secs(2));
    }
}
