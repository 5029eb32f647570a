//! Rate limit for stream jobs: each copied chunk books `bytes / speed` seconds on a shared
//! timeline and the worker sleeps until its booking ends. Sleeps are cut short when the
//! job is cancelled or the speed changes, so `speed` and `cancel` act at once.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

pub struct Throttle {
    speed: AtomicU64,
    /// (end of the booked timeline, speed-change generation)
    state: Mutex<(Instant, u64)>,
    changed: Condvar,
}

impl Throttle {
    pub fn new(speed: u64) -> Throttle {
        Throttle {
            speed: AtomicU64::new(speed),
            state: Mutex::new((Instant::now(), 0)),
            changed: Condvar::new(),
        }
    }

    pub fn speed(&self) -> u64 {
        self.speed.load(Ordering::Relaxed)
    }

    pub fn set_speed(&self, speed: u64) {
        self.speed.store(speed, Ordering::Relaxed);
        let mut s = self.state.lock();
        s.0 = Instant::now();
        s.1 += 1;
        self.changed.notify_all();
    }

    /// Wakes sleepers (on cancel).
    pub fn wake(&self) {
        let mut s = self.state.lock();
        s.1 += 1;
        self.changed.notify_all();
    }

    /// Accounts `bytes` just copied and sleeps as the limit requires. Returns false if
    /// `cancel` was set meanwhile.
    pub fn wait(&self, bytes: u64, cancel: &AtomicBool) -> bool {
        let speed = self.speed();
        if speed == 0 {
            return !cancel.load(Ordering::Acquire);
        }
        let mut s = self.state.lock();
        let now = Instant::now();
        let target = s.0.max(now) + Duration::from_secs_f64(bytes as f64 / speed as f64);
        s.0 = target;
        let generation = s.1;
        loop {
            if cancel.load(Ordering::Acquire) {
                return false;
            }
            let now = Instant::now();
            if now >= target || s.1 != generation {
                return true;
            }
            self.changed
                .wait_for(&mut s, (target - now).min(Duration::from_millis(100)));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn limits_and_reacts_to_speed_changes() {
        let t = Arc::new(Throttle::new(1 << 20));
        let cancel = Arc::new(AtomicBool::new(false));
        let began = Instant::now();
        for _ in 0..4 {
            assert!(t.wait(64 << 10, &cancel));
        }
        let el = began.elapsed();
        assert!(
            el >= Duration::from_millis(230) && el < Duration::from_secs(2),
            "{el:?}"
        );
        // A long booking is cut short by a speed change.
        let (t2, c2) = (t.clone(), cancel.clone());
        let h = std::thread::spawn(move || {
            let b = Instant::now();
            t2.wait(100 << 20, &c2);
            b.elapsed()
        });
        std::thread::sleep(Duration::from_millis(50));
        t.set_speed(0);
        assert!(h.join().unwrap() < Duration::from_secs(5));
        // And by cancel.
        t.set_speed(1);
        let (t3, c3) = (t.clone(), cancel.clone());
        let h = std::thread::spawn(move || t3.wait(1 << 30, &c3));
        std::thread::sleep(Duration::from_millis(50));
        cancel.store(true, Ordering::Release);
        t.wake();
        assert!(!h.join().unwrap());
    }
}
