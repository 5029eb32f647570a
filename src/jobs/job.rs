//! One stream job: what it streams (immutable), its phase and progress (under one lock,
//! with one condvar for every wait), and the driver that runs the workers and settles
//! the outcome (QEMU's block/stream.c `run` / `prepare` / `abort`): `completed` only when
//! every worker returned success, the cursor reached the end, and a final scan of the
//! leaf proves that no layer above the kept base still provides anything in the range.
//! Only then is the backing link rewritten.

use std::collections::{BTreeMap, VecDeque};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use super::scheduler::{Idle, Scheduler, Waiting};
use super::state::{next, Event, JobState, Phase};
use super::throttle::Throttle;
use super::worker;
use crate::chain::{Chain, Layers};
use crate::events::{quote, Bus};
use crate::{Error, Result};

/// Stream workers per job.
pub const WORKERS: usize = 2;
/// Dirty leaf L2 tables a stream lets pile up before it writes them back.
const PINNED_LIMIT: u64 = 16 << 20;
/// Stream workers per job when a layer it copies from is remote: more requests in
/// flight hide the link's latency.
pub const REMOTE_WORKERS: usize = 4;
/// How long `pause` and `cancel` wait for the workers to stop before failing with
/// ETIMEDOUT (the request stays in force; the job pauses or ends when they do).
pub const STOP_TIMEOUT: Duration = Duration::from_secs(10);
/// How often a running stream writes the leaf's metadata back.
const CHECKPOINT: Duration = Duration::from_secs(2);

/// The mutable part of a job; every field is read and written under `Job::inner`.
pub(super) struct Inner {
    pub phase: Phase,
    /// `started` is published: the driver waits for it, so it precedes every event.
    pub announced: bool,
    pub error: Option<String>,
    /// Workers started and not yet returned, and how many of those are parked.
    pub live: usize,
    pub parked: usize,
    /// Next unclaimed offset, and for each chunk being worked on (by start) how far it
    /// got: progress is the lowest of those (everything below is done).
    pub next: u64,
    pub chunks: BTreeMap<u64, u64>,
    pub copied: u64,
    /// (when, progress, copied) every 200 ms over the last 5 s, for rate and ETA.
    pub samples: VecDeque<(Instant, u64, u64)>,
    pub last_flush: Instant,
    /// The chain as the job started; None once ended, so dropped layers get closed.
    pub layers: Option<Arc<Layers>>,
    /// Place in the scheduler's queue while queued; whether the job holds a slot.
    pub ticket: Option<u64>,
    pub held_slot: bool,
}

/// What a job is asked to do.
pub struct Spec {
    pub chain: Arc<Chain>,
    /// The chain's index in the mount.
    pub index: usize,
    pub layers: Arc<Layers>,
    /// Guest range, cluster aligned.
    pub range: (u64, u64),
    pub whole_disk: bool,
    pub base: Option<usize>,
    pub speed: u64,
    pub idle: Idle,
}

pub struct Job {
    /// A layer the job copies from is remote.
    remote: bool,
    /// How many workers copy (more when copying from a remote layer).
    workers: usize,
    pub chain: Arc<Chain>,
    pub index: usize,
    bus: Arc<Bus>,
    pub(super) sched: Arc<Scheduler>,
    pub idle: Idle,
    /// What holds the workers back right now (`Waiting` as u8), for status.
    waiting: AtomicU8,
    /// Guest range being streamed, cluster aligned.
    pub start: u64,
    pub end: u64,
    pub whole_disk: bool,
    /// Index (in the job's layer list) of the base to keep, and its name for status.
    pub base: Option<usize>,
    pub base_label: Option<String>,
    pub throttle: Throttle,
    pub(super) inner: Mutex<Inner>,
    /// Signalled on every phase change, park and worker exit.
    pub(super) changed: Condvar,
}

/// A job's state as `.control` shows it.
pub struct Snapshot {
    pub state: JobState,
    pub offset: u64,
    pub copied: u64,
    pub rate: u64,
    pub eta: u64,
    pub error: Option<String>,
}

impl Job {
    pub fn new(spec: Spec, bus: Arc<Bus>, sched: Arc<Scheduler>) -> Job {
        let Spec {
            chain,
            index,
            layers,
            range: (start, end),
            whole_disk,
            base,
            speed,
            idle,
        } = spec;
        let base_label = base.map(|b| layers[b].image.path().display().to_string());
        let remote = layers[1..base.unwrap_or(layers.len())]
            .iter()
            .any(|l| l.image.source().is_remote());
        let workers = if remote { REMOTE_WORKERS } else { WORKERS };
        Job {
            remote,
            workers,
            chain,
            index,
            bus,
            sched,
            idle,
            waiting: AtomicU8::new(Waiting::Queued.to_u8()),
            start,
            end,
            whole_disk,
            base,
            base_label,
            throttle: Throttle::new(speed),
            inner: Mutex::new(Inner {
                phase: Phase::Queued,
                announced: false,
                error: None,
                // Counted from the start, so a pause sent before the threads run waits
                // for them to park; a worker that fails to start is taken off.
                live: workers,
                parked: 0,
                next: start,
                chunks: BTreeMap::new(),
                copied: 0,
                samples: VecDeque::from([(Instant::now(), 0, 0)]),
                last_flush: Instant::now(),
                layers: Some(layers),
                ticket: None,
                held_slot: false,
            }),
            changed: Condvar::new(),
        }
    }

    /// Applies `ev`; the only place a phase changes.
    pub(super) fn apply(&self, inner: &mut Inner, ev: Event) -> Result<Phase, &'static str> {
        let from = inner.phase;
        let to = next(from, ev)?;
        if to != from {
            log::debug!("{}: job {from:?} -> {to:?} on {ev:?}", self.chain.name());
            inner.phase = to;
            self.changed.notify_all();
            let offset = || vec![("offset", self.progress(inner).to_string())];
            match (from, to) {
                (_, Phase::Paused) => self.emit("paused", &offset()),
                (Phase::Paused, Phase::Running) => self.emit("resumed", &offset()),
                _ => {}
            }
        }
        Ok(to)
    }

    /// After the job wrote to the leaf: the write threshold may have fired.
    pub fn after_write(&self) {
        super::registry::report_threshold(&self.bus, &self.chain);
    }

    fn emit(&self, event: &str, kv: &[(&str, String)]) {
        self.bus.publish(self.chain.name(), event, kv);
    }

    /// Publishes `started` and lets the driver go: `started` precedes every other event.
    pub fn announce(&self) {
        let kv = [
            ("offset", "0".to_string()),
            ("len", (self.end - self.start).to_string()),
            ("speed", self.throttle.speed().to_string()),
            ("base", self.base_name()),
        ];
        self.emit("started", &kv);
        self.inner.lock().announced = true;
        self.changed.notify_all();
    }

    fn base_name(&self) -> String {
        self.base_label
            .as_deref()
            .unwrap_or("-")
            .replace(char::is_whitespace, "?")
    }

    pub fn set_speed(&self, bytes: u64) {
        self.throttle.set_speed(bytes);
        self.emit("speed", &[("speed", bytes.to_string())]);
    }

    pub fn is_ended(&self) -> bool {
        self.inner.lock().phase.is_terminal()
    }

    fn progress(&self, inner: &Inner) -> u64 {
        let done_to = inner.chunks.values().min().copied().unwrap_or(inner.next);
        done_to.min(self.end) - self.start
    }

    pub fn snapshot(&self) -> Snapshot {
        let inner = self.inner.lock();
        let state = inner.phase.shown();
        let len = self.end - self.start;
        let offset = if state == JobState::Completed {
            len
        } else {
            self.progress(&inner)
        };
        let (rate, eta) = if state == JobState::Running {
            rate_eta(&inner.samples, offset, inner.copied, len)
        } else {
            (0, 0)
        };
        Snapshot {
            state,
            offset,
            copied: inner.copied,
            rate,
            eta,
            error: inner.error.clone(),
        }
    }

    // ---- commands ----

    fn refused(&self, why: &str) -> Error {
        Error::state(libc::EBUSY, format!("{}: {why}", self.chain.name()))
    }

    /// Requests a pause and waits until every worker is parked.
    pub fn pause(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        self.apply(&mut inner, Event::Pause)
            .map_err(|w| self.refused(w))?;
        if inner.live == inner.parked {
            let _ = self.apply(&mut inner, Event::Parked);
        }
        drop(inner);
        self.throttle.wake();
        self.wait_for(|p| !p.parking() || p == Phase::Paused, "pause")?;
        // Superseded while waiting (resumed, cancelled, failed, ended): not paused.
        match self.inner.lock().phase {
            Phase::Paused => Ok(()),
            p => Err(self.refused(&format!(
                "the job is {} instead of paused",
                p.shown().as_str()
            ))),
        }
    }

    pub fn resume(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        self.apply(&mut inner, Event::Resume)
            .map_err(|w| self.refused(w))?;
        Ok(())
    }

    /// Requests a cancel and waits until the job has ended.
    pub fn cancel(&self) -> Result<()> {
        let mut inner = self.inner.lock();
        self.apply(&mut inner, Event::Cancel)
            .map_err(|w| self.refused(w))?;
        // Cancelled while queued: it gives up its place at once.
        if let Some(t) = inner.ticket.take() {
            self.sched.dequeue(t);
        }
        drop(inner);
        self.throttle.wake();
        self.wait_for(Phase::is_terminal, "cancel")
    }

    /// Waits (bounded) until `done(phase)`; ETIMEDOUT with a reason otherwise.
    fn wait_for(&self, done: impl Fn(Phase) -> bool, what: &str) -> Result<()> {
        let deadline = Instant::now() + STOP_TIMEOUT;
        let mut inner = self.inner.lock();
        while !done(inner.phase) {
            if self.changed.wait_until(&mut inner, deadline).timed_out() && !done(inner.phase) {
                let busy = inner.live - inner.parked;
                let at: Vec<String> = inner.chunks.values().map(u64::to_string).collect();
                let msg = format!(
                    "{what} of the job on '{}' timed out after {} s: {busy} of {} workers \
                     still busy (at guest offset {}); the request stays in force",
                    self.chain.name(),
                    STOP_TIMEOUT.as_secs(),
                    inner.live,
                    if at.is_empty() {
                        "-".into()
                    } else {
                        at.join(",")
                    },
                );
                log::warn!("{msg}");
                return Err(Error::state(libc::ETIMEDOUT, msg));
            }
        }
        Ok(())
    }

    /// Whether a layer the job copies from is remote (it then runs more workers).
    pub fn copies_from_remote(&self) -> bool {
        self.remote
    }

    // ---- what workers call ----

    /// Records a worker's failure: the first error is the job's, and stops the rest.
    pub fn fail(&self, msg: String) {
        let mut inner = self.inner.lock();
        if inner.error.is_none() {
            log::error!("{}: stream failed: {msg}", self.chain.name());
            inner.error = Some(msg);
        }
        let _ = self.apply(&mut inner, Event::Error);
        drop(inner);
        self.throttle.wake();
    }

    /// Parks while paused; false when the worker must stop for good.
    pub fn gate(&self) -> bool {
        let mut inner = self.inner.lock();
        if inner.phase.parking() {
            inner.parked += 1;
            if inner.parked == inner.live {
                let _ = self.apply(&mut inner, Event::Parked);
            }
            self.changed.notify_all();
            while inner.phase.parking() {
                self.changed.wait(&mut inner);
            }
            inner.parked -= 1;
        }
        !inner.phase.stopping()
    }

    /// True when copying must stop for now (pause, cancel or failure requested).
    pub fn must_stop(&self) -> bool {
        let p = self.inner.lock().phase;
        p.parking() || p.stopping()
    }

    /// Claims the next chunk of about `size` bytes, or None at the end.
    pub fn claim(&self, size: u64) -> Option<(u64, u64)> {
        let mut inner = self.inner.lock();
        if inner.next >= self.end {
            return None;
        }
        let cs = self.chain.cluster_size();
        let a = inner.next;
        let b = (a + size).div_ceil(cs) * cs;
        let b = b.min(self.end);
        inner.next = b;
        inner.chunks.insert(a, a);
        Some((a, b))
    }

    pub fn advance(&self, chunk: u64, reached: u64, copied: u64) {
        let mut inner = self.inner.lock();
        inner.copied += copied;
        if let Some(r) = inner.chunks.get_mut(&chunk) {
            *r = reached;
        }
    }

    pub fn done_chunk(&self, a: u64) {
        let mut inner = self.inner.lock();
        inner.chunks.remove(&a);
        let now = Instant::now();
        if inner
            .samples
            .back()
            .is_none_or(|l| now - l.0 >= Duration::from_millis(200))
        {
            let sample = (now, self.progress(&inner), inner.copied);
            inner.samples.push_back(sample);
            while inner.samples.len() > 2 && now - inner.samples[0].0 > Duration::from_secs(5) {
                inner.samples.pop_front();
            }
        }
    }

    /// Writes metadata back now and then, so a crash loses little progress and dirty
    /// tables do not pile up in memory. One worker at a time; the I/O is outside the lock.
    pub fn maybe_checkpoint(&self) {
        {
            let mut inner = self.inner.lock();
            // Also when the leaf's dirty L2 tables pile up (a stream over scattered
            // data dirties one per extent): they stay in memory until written back.
            let pinned = self.chain.pinned_bytes() > PINNED_LIMIT;
            if inner.last_flush.elapsed() < CHECKPOINT && !pinned {
                return;
            }
            inner.last_flush = Instant::now();
        }
        if let Err(e) = self.chain.checkpoint() {
            self.fail(format!("writing back the leaf's metadata: {e}"));
        }
        self.after_write();
    }

    // ---- the driver ----

    /// Runs the job: starts the workers, waits for all of them, settles the outcome.
    pub fn drive(self: Arc<Self>) {
        let layers = {
            let mut inner = self.inner.lock();
            while !inner.announced || inner.phase == Phase::Queued {
                self.changed.wait(&mut inner);
            }
            inner.layers.clone()
        };
        let Some(layers) = layers else {
            return;
        };
        if self.inner.lock().phase.is_terminal() {
            // Cancelled while queued: no workers ever ran.
            return self.finish();
        }
        let mut handles = Vec::new();
        for w in 0..self.workers {
            let j = self.clone();
            let l = layers.clone();
            match std::thread::Builder::new()
                .name(format!("stream-{w}"))
                .spawn(move || worker::run(&j, &l))
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.worker_exited();
                    self.fail(format!("cannot start a stream worker thread: {e}"));
                }
            }
        }
        for h in handles {
            // worker::run catches its own panics; a join error is a panic that escaped
            // even that (in the catch itself), and fails the job all the same.
            if let Err(p) = h.join() {
                self.fail(format!("a stream worker panicked: {}", panic_text(&*p)));
            }
        }
        self.settle(&layers);
    }

    /// Queues the job, or starts it if a slot is free (`--max-jobs`).
    pub fn enqueue(self: &Arc<Self>) {
        let me = self.clone();
        let ticket = self.sched.admit(Box::new(move || me.dequeue()));
        let mut inner = self.inner.lock();
        if inner.phase == Phase::Queued {
            inner.ticket = ticket;
        }
    }

    /// A slot is ours: go (or give it back if the job was cancelled meanwhile).
    fn dequeue(&self) {
        let mut inner = self.inner.lock();
        inner.ticket = None;
        if self.apply(&mut inner, Event::Dequeue).is_ok() {
            inner.held_slot = true;
            self.sched.track_guests(true);
            self.set_waiting(Waiting::None);
        } else {
            drop(inner);
            self.sched.release();
        }
    }

    pub fn set_waiting(&self, w: Waiting) {
        self.waiting.store(w.to_u8(), Ordering::Relaxed);
    }

    pub fn waiting(&self) -> Waiting {
        match self.inner.lock().phase {
            Phase::Queued => Waiting::Queued,
            p if p.is_terminal() || p == Phase::Paused => Waiting::None,
            _ => Waiting::from_u8(self.waiting.load(Ordering::Relaxed)),
        }
    }

    /// Copied bytes per second over about the last second (for the minimum speed).
    pub fn recent_rate(&self) -> u64 {
        let inner = self.inner.lock();
        let cutoff = Instant::now() - Duration::from_secs(1);
        let Some(&(t0, _, c0)) = inner.samples.iter().find(|s| s.0 >= cutoff) else {
            return 0;
        };
        let dt = t0.elapsed().as_secs_f64();
        if dt < 0.2 {
            return u64::MAX; // too early to tell: assume on pace
        }
        (inner.copied.saturating_sub(c0) as f64 / dt) as u64
    }

    /// A worker returned (or could not start): it no longer counts for parking.
    pub fn worker_exited(&self) {
        let mut inner = self.inner.lock();
        inner.live -= 1;
        if inner.phase == Phase::Pausing && inner.parked == inner.live {
            let _ = self.apply(&mut inner, Event::Parked);
        }
        self.changed.notify_all();
    }

    /// After every worker returned: decides the final state (prepare or abort).
    fn settle(&self, layers: &Layers) {
        let phase = {
            let mut inner = self.inner.lock();
            // Cannot fail: every non-terminal phase accepts WorkersEnded.
            match self.apply(&mut inner, Event::WorkersEnded) {
                Ok(p) => p,
                Err(w) => {
                    log::error!("{}: job settled twice: {w}", self.chain.name());
                    return;
                }
            }
        };
        if phase == Phase::Finalizing {
            match self.prove_and_relink(layers) {
                Ok(()) => {
                    let mut inner = self.inner.lock();
                    let _ = self.apply(&mut inner, Event::Proven);
                }
                Err(e) => {
                    let mut inner = self.inner.lock();
                    log::error!("{}: stream failed: {e}", self.chain.name());
                    inner.error.get_or_insert(e);
                    let _ = self.apply(&mut inner, Event::Error);
                }
            }
        } else if phase == Phase::Cancelled {
            // Progress is in the leaf's allocation: make it durable for a later resume.
            if let Err(e) = self.chain.checkpoint() {
                log::warn!(
                    "{}: writing back a cancelled stream: {e}",
                    self.chain.name()
                );
            }
        }
        self.finish();
    }

    /// The end of every job: gives back its slot, publishes its final event.
    fn finish(&self) {
        let mut inner = self.inner.lock();
        inner.layers = None;
        let held_slot = std::mem::take(&mut inner.held_slot);
        let state = inner.phase.shown();
        let why = inner.error.as_ref().map(|e| format!(": {e}"));
        log::info!(
            "{}: stream {}{}",
            self.chain.name(),
            state.as_str(),
            why.unwrap_or_default()
        );
        let len = self.end - self.start;
        let offset = match state {
            JobState::Completed => len,
            _ => self.progress(&inner),
        };
        let mut kv = vec![
            ("offset", offset.to_string()),
            ("len", len.to_string()),
            ("copied", inner.copied.to_string()),
        ];
        match state {
            JobState::Completed => {
                kv.push(("base", self.base_name()));
                kv.push(("layers", self.chain.layers().len().to_string()));
            }
            JobState::Failed => {
                kv.push(("error", quote(inner.error.as_deref().unwrap_or("unknown"))));
            }
            _ => {}
        }
        self.changed.notify_all();
        drop(inner);
        // Published once the state is settled, so a reader woken by it finds it final.
        self.emit(state.as_str(), &kv);
        if held_slot {
            self.sched.track_guests(false);
            self.sched.release();
        }
    }

    /// The proof of completion, then the backing-link rewrite (whole-disk streams).
    fn prove_and_relink(&self, layers: &Layers) -> Result<(), String> {
        {
            let inner = self.inner.lock();
            if inner.next < self.end || !inner.chunks.is_empty() {
                return Err(format!(
                    "the workers stopped at guest offset {} of {}",
                    self.start + self.progress(&inner),
                    self.end
                ));
            }
        }
        let end = self.end.min(self.chain.size());
        match self
            .chain
            .first_unstreamed(layers, self.start, end, self.base)
        {
            Ok(None) => {}
            Ok(Some(off)) => {
                return Err(format!(
                    "final check: guest offset {off} is still provided by a backing image, \
                     not the leaf; the backing link was left unchanged"
                ))
            }
            Err(e) => return Err(format!("final check of the leaf: {e}")),
        }
        let done = if self.whole_disk {
            self.chain.relink(layers, self.base)
        } else {
            self.chain.flush_all()
        };
        done.map_err(|e| format!("completing the stream: {e}"))
    }
}

/// The message of a panic payload.
pub fn panic_text(p: &(dyn std::any::Any + Send)) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(no message)".into())
}

fn rate_eta(
    samples: &VecDeque<(Instant, u64, u64)>,
    offset: u64,
    copied: u64,
    len: u64,
) -> (u64, u64) {
    let Some(&(t0, off0, cop0)) = samples.front() else {
        return (0, 0);
    };
    let dt = t0.elapsed().as_secs_f64();
    if dt < 0.05 {
        return (0, 0);
    }
    let rate = (copied.saturating_sub(cop0)) as f64 / dt;
    let progress = (offset.saturating_sub(off0)) as f64 / dt;
    let eta = if progress > 0.0 {
        ((len - offset.min(len)) as f64 / progress).ceil() as u64
    } else {
        0
    };
    (rate as u64, eta)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_and_eta_from_samples() {
        let t0 = Instant::now() - Duration::from_secs(2);
        let s = VecDeque::from([(t0, 0, 0)]);
        let (rate, eta) = rate_eta(&s, 100, 200, 300);
        assert!((90..=110).contains(&rate), "{rate}");
        assert!((3..=5).contains(&eta), "{eta}");
    }

    #[test]
    fn panic_payloads_become_text() {
        let p = std::panic::catch_unwind(|| panic!("boom {}", 42)).unwrap_err();
        assert_eq!(panic_text(&*p), "boom 42");
        let p = std::panic::catch_unwind(|| panic!("static")).unwrap_err();
        assert_eq!(panic_text(&*p), "static");
    }
}
