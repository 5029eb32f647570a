//! The mount's disks and their jobs: one slot per chain holding its current or last job.
//! Commands arrive here by disk name (from `.control`, parsed by `control`).

use std::path::Path;
use std::sync::Arc;

use parking_lot::Mutex;

use super::job::{Job, Spec};
use super::scheduler::{Idle, Policy, Scheduler, Waiting};
use super::state::JobState;
use super::ENOJOB;
use crate::chain::{Chain, Layer};
use crate::events::Bus;
use crate::{Error, Result};

/// What `start` asks for.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct StartRequest {
    pub name: String,
    pub base: Option<String>,
    pub speed: Option<u64>,
    /// The idle policy for this job (default: the mount's).
    pub idle: Option<Idle>,
    pub offset: Option<u64>,
    pub length: Option<u64>,
}

/// One disk's line in the status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatusLine {
    pub name: String,
    pub state: JobState,
    pub offset: u64,
    pub len: u64,
    pub copied: u64,
    pub rate: u64,
    pub eta: u64,
    pub speed: u64,
    pub base: Option<String>,
    pub error: Option<String>,
    /// Images in the chain, and bytes of the disk the leaf defines itself.
    pub layers: usize,
    pub leaf_bytes: u64,
    /// What holds the job back right now.
    pub waiting: Waiting,
    /// The armed write threshold (0 = none) and the leaf's allocated end in its file.
    pub threshold: u64,
    pub alloc: u64,
}

pub struct Jobs {
    chains: Vec<Arc<Chain>>,
    bus: Arc<Bus>,
    sched: Arc<Scheduler>,
    slots: Vec<Mutex<Option<Arc<Job>>>>,
    default_speed: u64,
}

impl Jobs {
    pub fn new(chains: Vec<Arc<Chain>>, bus: Arc<Bus>, default_speed: u64, policy: Policy) -> Jobs {
        let slots = chains.iter().map(|_| Mutex::new(None)).collect();
        Jobs {
            sched: Arc::new(Scheduler::new(chains.clone(), policy)),
            chains,
            bus,
            slots,
            default_speed,
        }
    }

    pub fn bus(&self) -> &Arc<Bus> {
        &self.bus
    }

    pub fn chains(&self) -> &[Arc<Chain>] {
        &self.chains
    }

    fn index(&self, name: &str) -> Result<usize> {
        self.chains
            .iter()
            .position(|c| c.name() == name)
            .ok_or_else(|| {
                Error::state(
                    libc::ENOENT,
                    format!("no disk named '{name}' in this mount"),
                )
            })
    }

    fn active(&self, name: &str) -> Result<Arc<Job>> {
        let i = self.index(name)?;
        match &*self.slots[i].lock() {
            Some(j) if !j.is_ended() => Ok(j.clone()),
            _ => Err(Error::state(
                ENOJOB,
                format!("no stream job is active on '{name}'"),
            )),
        }
    }

    fn busy(&self, i: usize) -> Result<()> {
        match &*self.slots[i].lock() {
            Some(j) if !j.is_ended() => Err(Error::state(
                libc::EBUSY,
                format!(
                    "a stream job is already active on '{}'",
                    self.chains[i].name()
                ),
            )),
            _ => Ok(()),
        }
    }

    pub fn cancel(&self, name: &str) -> Result<()> {
        self.active(name)?.cancel()
    }

    pub fn pause(&self, name: &str) -> Result<()> {
        self.active(name)?.pause()
    }

    pub fn resume(&self, name: &str) -> Result<()> {
        self.active(name)?.resume()
    }

    pub fn set_speed(&self, name: &str, bytes: u64) -> Result<()> {
        self.active(name)?.set_speed(bytes);
        Ok(())
    }

    /// `total-speed BYTES`: the cap on the sum of every job's rate (0 = none).
    pub fn set_total_speed(&self, bytes: u64) -> Result<()> {
        self.sched.total.set_speed(bytes);
        self.bus
            .publish("-", "speed", &[("speed", bytes.to_string())]);
        log::info!("total stream speed {bytes}");
        Ok(())
    }

    pub fn set_threshold(&self, name: &str, bytes: u64) -> Result<()> {
        let i = self.index(name)?;
        self.chains[i].set_threshold(bytes)?;
        log::info!(
            "{name}: write threshold {}",
            if bytes == 0 {
                "disarmed".into()
            } else {
                format!("at {bytes}")
            }
        );
        Ok(())
    }

    /// After a write to `chain`'s leaf: publishes `threshold` if it fired.
    pub fn after_write(&self, chain: &Chain) {
        report_threshold(&self.bus, chain);
    }

    pub fn start(&self, req: &StartRequest) -> Result<()> {
        let name = req.name.as_str();
        let i = self.index(name)?;
        let chain = self.chains[i].clone();
        if chain.read_only() {
            return Err(Error::state(
                libc::EROFS,
                format!("'{name}' is mounted read-only"),
            ));
        }
        // Reopening a replaced backing file does I/O: do it before taking the slot, and
        // only when no job holds the chain's layers.
        self.busy(i)?;
        chain.refresh_backing()?;
        let layers = chain.layers();
        let base = match &req.base {
            None => None,
            Some(b) => Some(find_base(&layers, b).ok_or_else(|| {
                Error::state(
                    libc::ENOENT,
                    format!("no backing image '{b}' below the leaf of '{name}'"),
                )
            })?),
        };
        let size = chain.size();
        let cs = chain.cluster_size();
        let whole_disk = req.offset.is_none() && req.length.is_none();
        let start = req.offset.unwrap_or(0);
        let end = match req.length {
            Some(l) => start
                .checked_add(l)
                .ok_or_else(|| Error::Invalid("offset + length overflows".into()))?,
            None => size,
        };
        if start >= size && !(start == 0 && size == 0) || end > size {
            return Err(Error::Invalid(format!(
                "range {start}+{} is outside the disk ({size} bytes)",
                end - start.min(end)
            )));
        }
        let range = (start / cs * cs, end.div_ceil(cs) * cs);
        let speed = req.speed.unwrap_or(self.default_speed);
        let mut slot = self.slots[i].lock();
        if slot.as_ref().is_some_and(|j| !j.is_ended()) {
            return Err(Error::state(
                libc::EBUSY,
                format!("a stream job is already active on '{name}'"),
            ));
        }
        let spec = Spec {
            chain: chain.clone(),
            index: i,
            layers,
            range,
            whole_disk,
            base,
            speed,
            idle: req.idle.unwrap_or(self.sched.policy.idle),
        };
        let job = Arc::new(Job::new(spec, self.bus.clone(), self.sched.clone()));
        // One driver thread runs the workers and settles the final state, so a failure
        // to start any thread leaves nothing half running.
        let j = job.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("stream".into())
            .spawn(move || j.drive())
        {
            return Err(Error::state(
                libc::EAGAIN,
                format!("cannot start the stream thread: {e}"),
            ));
        }
        log::info!(
            "{name}: stream started ({}..{}, speed {speed})",
            range.0,
            range.1
        );
        *slot = Some(job.clone());
        drop(slot);
        job.announce();
        job.enqueue();
        Ok(())
    }

    /// One status line per chain.
    pub fn status(&self) -> Vec<StatusLine> {
        self.chains
            .iter()
            .zip(&self.slots)
            .map(|(chain, slot)| {
                let layers = chain.layers().len();
                let leaf_bytes = chain.leaf_bytes().unwrap_or(0);
                let job = slot.lock().clone();
                let mut line = StatusLine {
                    name: chain.name().to_string(),
                    state: JobState::Idle,
                    offset: 0,
                    len: chain.size(),
                    copied: 0,
                    rate: 0,
                    eta: 0,
                    speed: 0,
                    base: None,
                    error: None,
                    layers,
                    leaf_bytes,
                    waiting: Waiting::None,
                    threshold: chain.threshold(),
                    alloc: chain.alloc(),
                };
                if let Some(job) = job {
                    let s = job.snapshot();
                    line.state = s.state;
                    line.offset = s.offset;
                    line.len = job.end - job.start;
                    line.copied = s.copied;
                    line.rate = s.rate;
                    line.eta = s.eta;
                    line.speed = job.throttle.speed();
                    line.base = job.base_label.clone();
                    line.error = s.error;
                    line.waiting = job.waiting();
                }
                line
            })
            .collect()
    }

    /// Stops every job (unmount): cancels each and waits for its workers (bounded).
    pub fn shutdown(&self) {
        for slot in &self.slots {
            let job = slot.lock().clone();
            if let Some(job) = job.filter(|j| !j.is_ended()) {
                if let Err(e) = job.cancel() {
                    log::error!("{}: at unmount: {e}", job.chain.name());
                }
            }
        }
    }
}

/// Publishes `threshold` for `chain` if a write took its leaf past the threshold.
pub fn report_threshold(bus: &Bus, chain: &Chain) {
    if let Some(c) = chain.threshold_crossing() {
        log::info!(
            "{}: write threshold {} exceeded by {}",
            chain.name(),
            c.threshold,
            c.exceeded
        );
        bus.publish(
            chain.name(),
            "threshold",
            &[
                ("threshold", c.threshold.to_string()),
                ("exceeded", c.exceeded.to_string()),
                ("alloc", c.alloc.to_string()),
            ],
        );
    }
}

/// Finds BACKING among layers[1..] by the name the chain uses, its path, its file name
/// or its canonical path.
fn find_base(layers: &[Arc<Layer>], wanted: &str) -> Option<usize> {
    let wanted_canon = std::fs::canonicalize(wanted).ok();
    (1..layers.len()).find(|&i| {
        let l = &layers[i];
        let p = l.image.path();
        l.name == wanted
            || p == Path::new(wanted)
            || p.file_name().is_some_and(|f| f == wanted)
            || wanted_canon.is_some() && std::fs::canonicalize(p).ok() == wanted_canon
    })
}
