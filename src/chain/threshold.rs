//! A one-shot write threshold on the leaf's image file (QEMU's block-set-write-threshold,
//! used to grow a thin volume under a qcow2 before the guest hits ENOSPC). Only the leaf
//! is ever written, so only the leaf has one. Allocation only bumps the end of the file,
//! so a write reaches past BYTES exactly when the leaf's allocated end does; callers that
//! wrote to the leaf ask `threshold_crossing` afterwards and report what it returns.

use std::sync::atomic::Ordering;

use super::Chain;
use crate::{Error, Result};

/// A threshold that fired: (threshold, bytes past it, the file's allocated end).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Crossing {
    pub threshold: u64,
    pub exceeded: u64,
    pub alloc: u64,
}

impl Chain {
    /// Arms (BYTES > 0) or disarms (0) the threshold. Arming one the file already
    /// exceeds fires at the next write.
    pub fn set_threshold(&self, bytes: u64) -> Result<()> {
        if self.read_only() {
            return Err(Error::state(
                libc::EROFS,
                format!("'{}' is mounted read-only", self.name()),
            ));
        }
        self.threshold.store(bytes, Ordering::Release);
        Ok(())
    }

    pub fn threshold(&self) -> u64 {
        self.threshold.load(Ordering::Acquire)
    }

    /// The leaf's allocated end in its file.
    pub fn alloc(&self) -> u64 {
        self.layers()[0].image.alloc_end()
    }

    /// After a write to the leaf: the crossing, once (the threshold disarms).
    pub fn threshold_crossing(&self) -> Option<Crossing> {
        let t = self.threshold.load(Ordering::Acquire);
        if t == 0 {
            return None;
        }
        let alloc = self.alloc();
        if alloc <= t {
            return None;
        }
        self.threshold
            .compare_exchange(t, 0, Ordering::AcqRel, Ordering::Acquire)
            .ok()?;
        Some(Crossing {
            threshold: t,
            exceeded: alloc - t,
            alloc,
        })
    }
}
