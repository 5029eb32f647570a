//! Background stream jobs (QEMU's block-stream): worker threads walk the disk, skip what
//! the leaf already has by scanning its L2 tables, and copy the rest with the chain's
//! copy-on-read machinery (`Chain::populate`, same per-cluster locks as guest writes).
//! Progress lives in the leaf's allocation, so a cancelled, failed or crashed stream
//! resumes where it stopped. A completed whole-disk stream rewrites the backing link.

mod throttle;

use std::collections::{BTreeMap, VecDeque};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::{Condvar, Mutex};

use self::throttle::Throttle;
use crate::chain::{Chain, Layer, Layers};
use crate::control::{Command, JobState, StatusLine};
use crate::format::Mapping;
use crate::{Error, Result};

/// Errno for cancel/pause/resume/speed when NAME has no active job.
pub const ENOJOB: i32 = libc::ESRCH;
/// Copy unit when the guest is idle, and when it is busy (smaller = shorter lock holds).
const CHUNK_IDLE: u64 = 8 << 20;
const CHUNK_BUSY: u64 = 256 << 10;
/// Largest piece copied per rate-limit admission while a speed limit is set.
const PIECE_THROTTLED: u64 = 1 << 20;
/// Stream work waits this long after the last guest request before starting a chunk,
/// but never more than `MAX_YIELD` in a row (so a busy guest cannot starve the stream).
const GUEST_GRACE: Duration = Duration::from_millis(2);
const MAX_YIELD: Duration = Duration::from_millis(20);
const WORKERS: usize = 2;
/// How often a running stream writes the leaf's metadata back.
const CHECKPOINT: Duration = Duration::from_secs(2);

struct Job {
    chain: Arc<Chain>,
    /// Guest range being streamed, cluster aligned.
    start: u64,
    end: u64,
    whole_disk: bool,
    /// The chain as the job started (None once finished, so dropped layers get closed),
    /// and the index of the base to keep.
    layers: Mutex<Option<Arc<Layers>>>,
    base: Option<usize>,
    base_label: Option<String>,
    cancel: AtomicBool,
    paused: Mutex<bool>,
    wake: Condvar,
    parked: Mutex<usize>,
    parked_cv: Condvar,
    throttle: Throttle,
    /// Next unclaimed offset, and for each chunk being worked on (by start) how far it
    /// got: `offset` is the lowest of those (everything below is done).
    cursor: Mutex<(u64, BTreeMap<u64, u64>)>,
    copied: AtomicU64,
    state: Mutex<JobState>,
    error: Mutex<Option<String>>,
    samples: Mutex<VecDeque<(Instant, u64, u64)>>,
    running_workers: AtomicUsize,
    last_flush_ns: AtomicU64,
    finished: AtomicBool,
}

impl Job {
    fn progress(&self) -> u64 {
        let c = self.cursor.lock();
        let done_to = c.1.values().min().copied().unwrap_or(c.0).min(self.end);
        done_to - self.start
    }

    fn advance(&self, chunk: u64, reached: u64) {
        if let Some(r) = self.cursor.lock().1.get_mut(&chunk) {
            *r = reached;
        }
    }

    /// True when copying must stop for now (paused, cancelled or failed).
    fn must_stop(&self) -> bool {
        *self.paused.lock() || self.cancel.load(Ordering::Acquire) || self.error.lock().is_some()
    }

    /// Claims the next chunk, or None at the end.
    fn claim(&self, size: u64) -> Option<(u64, u64)> {
        let mut c = self.cursor.lock();
        if c.0 >= self.end {
            return None;
        }
        let cs = self.chain.cluster_size();
        let a = c.0;
        let b = (a + size).div_ceil(cs) * cs;
        let b = b.min(self.end);
        c.0 = b;
        c.1.insert(a, a);
        Some((a, b))
    }

    fn done_chunk(&self, a: u64) {
        self.cursor.lock().1.remove(&a);
        let now = Instant::now();
        let mut s = self.samples.lock();
        if s.back()
            .is_none_or(|l| now - l.0 >= Duration::from_millis(200))
        {
            s.push_back((now, self.progress(), self.copied.load(Ordering::Relaxed)));
            while s.len() > 2 && now - s[0].0 > Duration::from_secs(5) {
                s.pop_front();
            }
        }
    }

    /// Blocks while paused; returns false when the job must stop.
    fn checkpoint(&self) -> bool {
        let mut paused = self.paused.lock();
        if *paused && !self.cancel.load(Ordering::Acquire) {
            *self.parked.lock() += 1;
            self.parked_cv.notify_all();
            while *paused && !self.cancel.load(Ordering::Acquire) {
                self.wake.wait(&mut paused);
            }
            *self.parked.lock() -= 1;
        }
        !self.cancel.load(Ordering::Acquire) && self.error.lock().is_none()
    }

    /// Waits for a quiet moment in guest I/O (bounded); returns whether the guest is busy.
    fn yield_to_guest(&self) -> bool {
        let c = &self.chain.counters;
        let began = Instant::now();
        let mut busy = false;
        loop {
            let inflight = c.guest_inflight.load(Ordering::Acquire);
            let since = self
                .chain
                .now_ns()
                .saturating_sub(c.guest_last_ns.load(Ordering::Relaxed));
            let last_seen = c.guest_last_ns.load(Ordering::Relaxed) != 0;
            if inflight == 0 && (!last_seen || since >= GUEST_GRACE.as_nanos() as u64) {
                return busy || (last_seen && since < Duration::from_millis(200).as_nanos() as u64);
            }
            busy = true;
            if began.elapsed() >= MAX_YIELD {
                return true;
            }
            std::thread::sleep(Duration::from_micros(500));
        }
    }

    fn fail(&self, msg: String) {
        let mut e = self.error.lock();
        if e.is_none() {
            log::error!("{}: stream failed: {msg}", self.chain.name());
            *e = Some(msg);
        }
    }

    fn worker(self: Arc<Self>) {
        let Some(layers) = self.layers.lock().clone() else {
            return;
        };
        while self.checkpoint() {
            // A backing file removed or replaced underneath (the local equivalent of a
            // stale NFS handle) fails the job rather than streaming from a ghost.
            let source = &layers[1..self.base.unwrap_or(layers.len())];
            if let Some(why) = source.iter().find_map(|l| l.replaced()) {
                self.fail(why);
                break;
            }
            let busy = self.yield_to_guest();
            let cs = self.chain.cluster_size();
            let size = self
                .throttle
                .quantum(cs, if busy { CHUNK_BUSY } else { CHUNK_IDLE });
            let Some((a, b)) = self.claim(size) else {
                break;
            };
            match self.copy_range(&layers, a, b) {
                Ok(true) => self.done_chunk(a),
                // Interrupted: the chunk stays unfinished, so `offset` stops before it.
                Ok(false) => break,
                Err(e) => {
                    self.fail(e);
                    break;
                }
            }
            self.maybe_checkpoint(&layers);
        }
        self.running_workers.fetch_sub(1, Ordering::AcqRel);
        let _p = self.parked.lock();
        self.parked_cv.notify_all();
    }

    /// Writes metadata back now and then, so a crash loses little progress and dirty
    /// tables do not pile up in memory.
    fn maybe_checkpoint(&self, layers: &[Arc<Layer>]) {
        let now = self.chain.now_ns();
        let last = self.last_flush_ns.load(Ordering::Relaxed);
        if now.saturating_sub(last) < CHECKPOINT.as_nanos() as u64
            || self
                .last_flush_ns
                .compare_exchange(last, now, Ordering::AcqRel, Ordering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Some(q) = layers[0].image.as_qcow2() {
            if let Err(e) = q.flush() {
                self.fail(format!("writing back the leaf's metadata: {e}"));
            }
        }
    }

    /// Copies what the leaf lacks in [a, b), skipping what its L2 tables say it has.
    /// Pauses (parks) between runs; returns false if cancelled before the end.
    fn copy_range(&self, layers: &Layers, a: u64, b: u64) -> Result<bool, String> {
        let leaf = &layers[0].image;
        let end = b.min(self.chain.size());
        let mut pos = a;
        while pos < end {
            if !self.checkpoint() {
                return Ok(false);
            }
            let (m, run) = leaf
                .map(pos, end - pos)
                .map_err(|e| format!("at guest offset {pos}: {e}"))?;
            let run = if m == Mapping::Unallocated {
                // While throttled, copy in small admitted pieces so that a lower speed
                // (or a pause) takes effect within one piece.
                let cs = self.chain.cluster_size();
                let piece = run.min(self.throttle.quantum(cs, PIECE_THROTTLED).div_ceil(cs) * cs);
                let piece = if self.throttle.speed() == 0 {
                    run
                } else {
                    piece
                };
                if !self.throttle.admit(piece, || self.must_stop()) {
                    continue; // paused or cancelled while waiting: checkpoint decides
                }
                let n = self
                    .chain
                    .populate(layers, pos, piece, None, self.base)
                    .map_err(|e| format!("at guest offset {pos}: {e}"))?;
                self.throttle.refund(piece.saturating_sub(n));
                self.copied.fetch_add(n, Ordering::Relaxed);
                piece
            } else {
                run
            };
            pos += run;
            self.advance(a, pos);
        }
        Ok(true)
    }

    /// Runs the job: starts the workers, waits for them, then settles the state.
    fn drive(self: Arc<Self>) {
        let mut handles = Vec::new();
        for w in 0..WORKERS {
            let j = self.clone();
            match std::thread::Builder::new()
                .name(format!("stream-{w}"))
                .spawn(move || j.worker())
            {
                Ok(h) => handles.push(h),
                Err(e) => {
                    self.running_workers.fetch_sub(1, Ordering::AcqRel);
                    self.fail(format!("cannot start a worker thread: {e}"));
                }
            }
        }
        for h in handles {
            let _ = h.join();
        }
        self.finish();
    }

    /// Runs after the workers stopped: decides the final state and relinks the leaf.
    fn finish(&self) {
        let state = if self.error.lock().is_some() {
            JobState::Failed
        } else if self.cancel.load(Ordering::Acquire) {
            JobState::Cancelled
        } else if let Err(e) = self.complete() {
            self.fail(e.to_string());
            JobState::Failed
        } else {
            JobState::Completed
        };
        *self.state.lock() = state;
        *self.layers.lock() = None;
        self.chain.counters.streams.fetch_sub(1, Ordering::AcqRel);
        self.finished.store(true, Ordering::Release);
        log::info!("{}: stream {}", self.chain.name(), state.as_str());
    }

    fn complete(&self) -> Result<()> {
        let Some(layers) = self.layers.lock().clone() else {
            return Ok(());
        };
        let Some(leaf) = layers[0].image.as_qcow2() else {
            return Ok(());
        };
        leaf.flush_all()?;
        if !self.whole_disk || layers.len() == 1 {
            return Ok(());
        }
        let current = self.chain.layers();
        match self.base {
            None => {
                leaf.set_backing(None, None)?;
                self.chain.set_layers(vec![current[0].clone()]);
            }
            Some(i) => {
                let base = &current[i].image;
                let name = relative_to(base.path(), leaf.path());
                leaf.set_backing(Some(name), Some(base.format().name().to_string()))?;
                let mut kept = vec![current[0].clone()];
                kept.extend(current[i..].iter().cloned());
                self.chain.set_layers(kept);
            }
        }
        Ok(())
    }

    fn status(&self) -> (JobState, Option<String>) {
        let state = *self.state.lock();
        let state = if state == JobState::Running && *self.paused.lock() {
            JobState::Paused
        } else {
            state
        };
        (state, self.error.lock().clone())
    }
}

/// The name to store so that `target` resolves from the directory of `image`.
fn relative_to(target: &Path, image: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let t = abs(target);
    let dir = abs(image)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tc: Vec<Component> = t.components().collect();
    let dc: Vec<Component> = dir.components().collect();
    let common = tc.iter().zip(&dc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return t.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..dc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c);
    }
    rel.display().to_string()
}

/// One slot per chain: the current or last job.
pub struct Jobs {
    chains: Vec<Arc<Chain>>,
    slots: Vec<Mutex<Option<Arc<Job>>>>,
    default_speed: u64,
}

impl Jobs {
    pub fn new(chains: Vec<Arc<Chain>>, default_speed: u64) -> Jobs {
        let slots = chains.iter().map(|_| Mutex::new(None)).collect();
        Jobs {
            chains,
            slots,
            default_speed,
        }
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
            Some(j) if !j.finished.load(Ordering::Acquire) => Ok(j.clone()),
            _ => Err(Error::state(
                ENOJOB,
                format!("no stream job is active on '{name}'"),
            )),
        }
    }

    /// Executes a control command; returns the text for the `ok` answer.
    pub fn execute(&self, cmd: Command) -> Result<()> {
        match cmd {
            Command::Start {
                name,
                base,
                speed,
                offset,
                length,
            } => self.start(
                &name,
                base.as_deref(),
                speed.unwrap_or(self.default_speed),
                offset,
                length,
            ),
            Command::Cancel(name) => {
                let job = self.active(&name)?;
                job.cancel.store(true, Ordering::Release);
                {
                    let _p = job.paused.lock();
                    job.wake.notify_all();
                }
                job.throttle.wake();
                wait_workers(&job);
                Ok(())
            }
            Command::Pause(name) => {
                let job = self.active(&name)?;
                *job.paused.lock() = true;
                job.throttle.wake();
                // Return once the workers have stopped copying (or ended).
                let mut parked = job.parked.lock();
                let deadline = Instant::now() + Duration::from_secs(10);
                while *parked < job.running_workers.load(Ordering::Acquire)
                    && Instant::now() < deadline
                {
                    job.parked_cv
                        .wait_for(&mut parked, Duration::from_millis(20));
                }
                Ok(())
            }
            Command::Resume(name) => {
                let job = self.active(&name)?;
                *job.paused.lock() = false;
                job.wake.notify_all();
                Ok(())
            }
            Command::Speed(name, bytes) => {
                let job = self.active(&name)?;
                job.throttle.set_speed(bytes);
                Ok(())
            }
        }
    }

    fn start(
        &self,
        name: &str,
        base: Option<&str>,
        speed: u64,
        offset: Option<u64>,
        length: Option<u64>,
    ) -> Result<()> {
        let i = self.index(name)?;
        let mut slot = self.slots[i].lock();
        if let Some(j) = &*slot {
            if !j.finished.load(Ordering::Acquire) {
                return Err(Error::state(
                    libc::EBUSY,
                    format!("a stream job is already active on '{name}'"),
                ));
            }
        }
        let chain = self.chains[i].clone();
        if chain.read_only() {
            return Err(Error::state(
                libc::EROFS,
                format!("'{name}' is mounted read-only"),
            ));
        }
        chain.refresh_backing()?;
        let layers = chain.layers();
        let base_index = match base {
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
        let whole_disk = offset.is_none() && length.is_none();
        let start = offset.unwrap_or(0);
        let end = match length {
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
        let (start, end) = (start / cs * cs, end.div_ceil(cs) * cs);
        let job = Arc::new(Job {
            chain: chain.clone(),
            start,
            end: end.min(size.div_ceil(cs) * cs),
            whole_disk,
            layers: Mutex::new(Some(layers.clone())),
            base: base_index,
            base_label: base_index.map(|b| layers[b].image.path().display().to_string()),
            cancel: AtomicBool::new(false),
            paused: Mutex::new(false),
            wake: Condvar::new(),
            parked: Mutex::new(0),
            parked_cv: Condvar::new(),
            throttle: Throttle::new(speed),
            cursor: Mutex::new((start, BTreeMap::new())),
            copied: AtomicU64::new(0),
            state: Mutex::new(JobState::Running),
            error: Mutex::new(None),
            samples: Mutex::new(VecDeque::from([(Instant::now(), 0, 0)])),
            running_workers: AtomicUsize::new(WORKERS),
            last_flush_ns: AtomicU64::new(chain.now_ns()),
            finished: AtomicBool::new(false),
        });
        // One driver thread runs the workers and settles the final state, so a failure
        // to start any thread leaves nothing half running.
        chain.counters.streams.fetch_add(1, Ordering::AcqRel);
        let j = job.clone();
        if let Err(e) = std::thread::Builder::new()
            .name("stream".into())
            .spawn(move || j.drive())
        {
            chain.counters.streams.fetch_sub(1, Ordering::AcqRel);
            return Err(Error::state(
                libc::EAGAIN,
                format!("cannot start the stream thread: {e}"),
            ));
        }
        log::info!("{name}: stream started ({start}..{end}, speed {speed})");
        *slot = Some(job);
        Ok(())
    }

    /// One status line per chain.
    pub fn status(&self) -> Vec<StatusLine> {
        self.chains
            .iter()
            .zip(&self.slots)
            .map(|(chain, slot)| {
                let layers = chain.layers();
                let leaf_bytes = chain.leaf_bytes().unwrap_or(0);
                let job = slot.lock().clone();
                let Some(job) = job else {
                    return StatusLine {
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
                        layers: layers.len(),
                        leaf_bytes,
                    };
                };
                let (state, error) = job.status();
                let len = job.end - job.start;
                let offset = if state == JobState::Completed {
                    len
                } else {
                    job.progress()
                };
                let copied = job.copied.load(Ordering::Relaxed);
                let (rate, eta) = if state == JobState::Running {
                    rate_eta(&job.samples.lock(), offset, copied, len)
                } else {
                    (0, 0)
                };
                StatusLine {
                    name: chain.name().to_string(),
                    state,
                    offset,
                    len,
                    copied,
                    rate,
                    eta,
                    speed: job.throttle.speed(),
                    base: job.base_label.clone(),
                    error,
                    layers: layers.len(),
                    leaf_bytes,
                }
            })
            .collect()
    }

    /// Stops every job (unmount): cancels and waits for the workers.
    pub fn shutdown(&self) {
        for slot in &self.slots {
            let job = slot.lock().clone();
            if let Some(job) = job {
                if !job.finished.load(Ordering::Acquire) {
                    job.cancel.store(true, Ordering::Release);
                    {
                        let _p = job.paused.lock();
                        job.wake.notify_all();
                    }
                    job.throttle.wake();
                    wait_workers(&job);
                }
            }
        }
    }
}

/// Waits (bounded) until the job's finisher has settled its state.
fn wait_workers(job: &Job) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while !job.finished.load(Ordering::Acquire) && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(2));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_from_the_leaf_directory() {
        assert_eq!(
            relative_to(Path::new("/a/b/base.qcow2"), Path::new("/a/b/top.qcow2")),
            "base.qcow2"
        );
        assert_eq!(
            relative_to(Path::new("/a/c/base.qcow2"), Path::new("/a/b/top.qcow2")),
            "../c/base.qcow2"
        );
        assert_eq!(
            relative_to(Path::new("/x/base"), Path::new("/a/b/top")),
            "../../x/base"
        );
    }

    #[test]
    fn rate_and_eta_from_samples() {
        let t0 = Instant::now() - Duration::from_secs(2);
        let s = VecDeque::from([(t0, 0, 0)]);
        let (rate, eta) = rate_eta(&s, 100, 200, 300);
        assert!((90..=110).contains(&rate), "{rate}");
        assert!((3..=5).contains(&eta), "{eta}");
    }
}
