//! Per-cluster serialization: a table of held cluster ranges. Copy-on-read, streaming,
//! allocating writes and zeroing take the clusters they change exclusively, so a stream
//! or copy-on-read that read old backing data can never land on top of a guest write,
//! and no cluster is allocated twice. Reads and in-place writes of allocated clusters
//! take no lock at all. Ranges held at once are few (one per in-flight request), so a
//! list scan beats a map.

use parking_lot::{Condvar, Mutex};

#[derive(Default)]
pub struct ClusterLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Condvar,
}

pub struct RangeGuard<'a> {
    locks: &'a ClusterLocks,
    range: (u64, u64),
}

impl ClusterLocks {
    /// Locks clusters [first, end), waiting while any of them is held.
    pub fn lock(&self, first: u64, end: u64) -> RangeGuard<'_> {
        let mut held = self.held.lock();
        while held.iter().any(|&(s, e)| s < end && first < e) {
            self.released.wait(&mut held);
        }
        held.push((first, end));
        RangeGuard {
            locks: self,
            range: (first, end),
        }
    }

    /// Like `lock`, but gives up at once if any cluster is held (tests probe with it).
    #[cfg(test)]
    fn try_lock(&self, first: u64, end: u64) -> Option<RangeGuard<'_>> {
        let mut held = self.held.lock();
        if held.iter().any(|&(s, e)| s < end && first < e) {
            return None;
        }
        held.push((first, end));
        Some(RangeGuard {
            locks: self,
            range: (first, end),
        })
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|&r| r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn overlapping_ranges_exclude_each_other() {
        let locks = Arc::new(ClusterLocks::default());
        let g = locks.lock(10, 20);
        assert!(locks.try_lock(19, 21).is_none());
        assert!(locks.try_lock(5, 11).is_none());
        let other = locks.try_lock(20, 30);
        assert!(other.is_some(), "adjacent ranges do not overlap");
        drop(other);
        let entered = Arc::new(AtomicBool::new(false));
        let (l2, e2) = (locks.clone(), entered.clone());
        let t = std::thread::spawn(move || {
            let _g = l2.lock(15, 16);
            e2.store(true, Ordering::SeqCst);
        });
        std::thread::sleep(Duration::from_millis(50));
        assert!(
            !entered.load(Ordering::SeqCst),
            "waiter must block while the range is held"
        );
        drop(g);
        t.join().unwrap();
        assert!(entered.load(Ordering::SeqCst));
    }
}
