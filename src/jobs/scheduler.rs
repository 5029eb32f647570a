//! Streaming as a good citizen of the whole host: one scheduler per mount decides when
//! stream work may run (the idle policy), caps the sum of all jobs' rates (the total
//! speed, shared by the jobs that want it), and queues jobs beyond `max_jobs`.

use std::collections::{BTreeSet, VecDeque};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;

use super::host::{devices_for, HostMonitor};
use super::throttle::Throttle;
use crate::chain::Chain;
use crate::{Error, Result};

/// Stream work waits this long after the last guest request before starting a chunk.
pub const GUEST_GRACE: Duration = Duration::from_millis(2);
/// Guest activity this recent keeps stream chunks small.
const RECENT: Duration = Duration::from_millis(200);
/// Default guaranteed rate of a job on a host that is never idle.
pub const DEFAULT_MIN_SPEED: u64 = 4 << 20;

/// What "idle" means for a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idle {
    /// No guest I/O on any chain of the mount, and the host's disks under the images
    /// quiet (the default).
    Host,
    /// No guest I/O on any chain of the mount.
    Mount,
    /// No guest I/O on this job's own chain.
    Disk,
    /// Never wait.
    Off,
}

impl Idle {
    pub fn as_str(self) -> &'static str {
        match self {
            Idle::Host => "host",
            Idle::Mount => "mount",
            Idle::Disk => "disk",
            Idle::Off => "off",
        }
    }

    pub fn parse(s: &str) -> Result<Idle> {
        match s {
            "host" => Ok(Idle::Host),
            "mount" => Ok(Idle::Mount),
            "disk" => Ok(Idle::Disk),
            "off" => Ok(Idle::Off),
            _ => Err(Error::Invalid(format!(
                "bad idle policy '{s}' (host, mount, disk or off)"
            ))),
        }
    }
}

/// What holds a job back right now (status `waiting=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Waiting {
    #[default]
    None,
    Guest,
    Host,
    Total,
    Queued,
}

impl Waiting {
    pub fn as_str(self) -> &'static str {
        match self {
            Waiting::None => "none",
            Waiting::Guest => "guest",
            Waiting::Host => "host",
            Waiting::Total => "total",
            Waiting::Queued => "queued",
        }
    }
    pub fn from_u8(v: u8) -> Waiting {
        match v {
            1 => Waiting::Guest,
            2 => Waiting::Host,
            3 => Waiting::Total,
            4 => Waiting::Queued,
            _ => Waiting::None,
        }
    }
    pub fn to_u8(self) -> u8 {
        self as u8
    }
}

/// The mount-wide knobs.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub idle: Idle,
    pub min_speed: u64,
    pub total_speed: u64,
    /// 0 = unlimited.
    pub max_jobs: usize,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            idle: Idle::Host,
            min_speed: DEFAULT_MIN_SPEED,
            total_speed: 0,
            max_jobs: 0,
        }
    }
}

/// A job waiting for a slot: its wake-up (called with the slot taken).
pub type Start = Box<dyn FnOnce() + Send>;

struct Slots {
    running: usize,
    queue: VecDeque<(u64, Start)>,
    next_ticket: u64,
}

pub struct Scheduler {
    pub policy: Policy,
    chains: Vec<Arc<Chain>>,
    /// Devices under each chain's local images (same order as `chains`).
    devices: Vec<BTreeSet<String>>,
    host: HostMonitor,
    /// The total cap, shared by every job's workers.
    pub total: Throttle,
    slots: Mutex<Slots>,
}

impl Scheduler {
    pub fn new(chains: Vec<Arc<Chain>>, policy: Policy) -> Scheduler {
        let devices = chains
            .iter()
            .map(|c| {
                let mut d = BTreeSet::new();
                for l in c.layers().iter() {
                    d.extend(devices_for(l.image.path()));
                }
                d
            })
            .collect();
        Scheduler {
            total: Throttle::new(policy.total_speed),
            policy,
            chains,
            devices,
            host: HostMonitor::default(),
            slots: Mutex::new(Slots {
                running: 0,
                queue: VecDeque::new(),
                next_ticket: 0,
            }),
        }
    }

    /// Runs `start` now if a slot is free, or queues it. Returns the queue ticket when
    /// queued (for `dequeue` on cancel).
    pub fn admit(&self, start: Start) -> Option<u64> {
        let mut s = self.slots.lock();
        if self.policy.max_jobs == 0 || s.running < self.policy.max_jobs {
            s.running += 1;
            drop(s);
            start();
            return None;
        }
        let t = s.next_ticket;
        s.next_ticket += 1;
        s.queue.push_back((t, start));
        Some(t)
    }

    /// A queued job was cancelled: it gives up its place.
    pub fn dequeue(&self, ticket: u64) {
        self.slots.lock().queue.retain(|(t, _)| *t != ticket);
    }

    /// A running job ended: the next queued one (in start order) takes its slot.
    pub fn release(&self) {
        let next = {
            let mut s = self.slots.lock();
            match s.queue.pop_front() {
                Some((_, start)) => Some(start),
                None => {
                    s.running = s.running.saturating_sub(1);
                    None
                }
            }
        };
        if let Some(start) = next {
            start();
        }
    }

    /// Tracking guest activity costs shared atomics per request, so it runs only while
    /// a job runs; mount-wide and host policies need it on every chain.
    pub fn track_guests(&self, on: bool) {
        for c in &self.chains {
            if on {
                c.counters.streams.fetch_add(1, Ordering::AcqRel);
            } else {
                c.counters.streams.fetch_sub(1, Ordering::AcqRel);
            }
        }
    }

    /// Whether the guests that count for policy `idle` did anything in the last 200 ms:
    /// then stream chunks stay small, so a guest between requests (a queue-depth-one
    /// reader on a busy CPU leaves gaps longer than the grace) still waits little for
    /// cluster locks.
    pub fn guest_recent(&self, index: usize, idle: Idle) -> bool {
        self.guests_active(index, idle, RECENT)
    }

    /// Whether the guests that count for policy `idle` have a request in flight or
    /// finished one less than `within` ago.
    fn guests_active(&self, index: usize, idle: Idle, within: Duration) -> bool {
        let active = |c: &Chain| {
            let k = &c.counters;
            let last = k.guest_last_ns.load(Ordering::Relaxed);
            k.guest_inflight.load(Ordering::Acquire) > 0
                || last != 0 && c.now_ns().saturating_sub(last) < within.as_nanos() as u64
        };
        match idle {
            Idle::Off => false,
            Idle::Disk => active(&self.chains[index]),
            Idle::Mount | Idle::Host => self.chains.iter().any(|c| active(c)),
        }
    }

    /// Why a job on chain `index` with policy `idle` should not copy right now. A job
    /// that copies from a remote layer judges the host by the device counters: the image
    /// server may be a process on this host (a test, a local cache), and its reads are
    /// the stream's own traffic, not a neighbour's. Others judge by what the other
    /// processes say they moved.
    pub fn holdback(&self, index: usize, idle: Idle, remote_source: bool) -> Waiting {
        if self.guests_active(index, idle, GUEST_GRACE) {
            Waiting::Guest
        } else if idle == Idle::Host && self.host.busy(&self.devices[index], !remote_source) {
            Waiting::Host
        } else {
            Waiting::None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicUsize;

    #[test]
    fn policies_parse() {
        assert_eq!(Idle::parse("host").unwrap(), Idle::Host);
        assert_eq!(Idle::parse("off").unwrap(), Idle::Off);
        assert_eq!(Idle::parse("idle").unwrap_err().errno(), libc::EINVAL);
        for w in [
            Waiting::None,
            Waiting::Guest,
            Waiting::Host,
            Waiting::Total,
            Waiting::Queued,
        ] {
            assert_eq!(Waiting::from_u8(w.to_u8()), w);
        }
    }

    #[test]
    fn the_queue_starts_jobs_in_order_as_slots_free() {
        let s = Scheduler::new(
            Vec::new(),
            Policy {
                max_jobs: 2,
                ..Policy::default()
            },
        );
        let order = Arc::new(Mutex::new(Vec::new()));
        let started = Arc::new(AtomicUsize::new(0));
        let mut tickets = Vec::new();
        for i in 0..5 {
            let (o, n) = (order.clone(), started.clone());
            tickets.push(s.admit(Box::new(move || {
                o.lock().push(i);
                n.fetch_add(1, Ordering::SeqCst);
            })));
        }
        assert_eq!(*order.lock(), [0, 1], "two slots");
        assert!(tickets[0].is_none() && tickets[2].is_some());
        s.dequeue(tickets[3].unwrap()); // cancelled while queued
        s.release();
        assert_eq!(*order.lock(), [0, 1, 2]);
        s.release();
        assert_eq!(*order.lock(), [0, 1, 2, 4], "3 gave up its place");
        s.release();
        s.release();
        s.release();
        assert_eq!(s.slots.lock().running, 0);
    }
}
