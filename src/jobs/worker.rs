//! The stream worker loop: claim a chunk, skip what the leaf already has (reading its
//! metadata), copy the rest from the layers above the kept base through the chain's
//! copy path (same per-cluster locks as guest I/O), and step back for the guest.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::job::{panic_text, Job};
use super::scheduler::Waiting;
use crate::chain::Layers;
use crate::fault;

/// Copy unit when the guest is idle, and when it is busy (smaller = shorter lock holds).
/// Never less than one cluster: the unit is `max(cluster, ...)`.
const CHUNK_IDLE: u64 = 8 << 20;
const CHUNK_BUSY: u64 = 256 << 10;
/// Chunk size while another process keeps the disks busy: each chunk is a burst of disk
/// time its requests queue behind.
const CHUNK_HOST: u64 = 64 << 10;
/// Largest piece copied per rate-limit admission while a speed limit is set.
const PIECE_THROTTLED: u64 = 1 << 20;
/// Stream work never waits for an idle moment longer than this in a row.
const MAX_YIELD: Duration = Duration::from_millis(20);

/// One worker thread's body. A panic is caught here and fails the job (the panic hook
/// has already logged its message and location).
pub fn run(job: &Job, layers: &Layers) {
    let result = catch_unwind(AssertUnwindSafe(|| work(job, layers)));
    match result {
        Ok(Ok(())) => {}
        Ok(Err(e)) => job.fail(e),
        Err(p) => job.fail(format!("a stream worker panicked: {}", panic_text(&*p))),
    }
    job.worker_exited();
}

fn work(job: &Job, layers: &Layers) -> Result<(), String> {
    let chain = &job.chain;
    let source = &layers[1..job.base.unwrap_or(layers.len())];
    while job.gate() {
        fault::panic_point("stream-worker-panic");
        // A backing file removed or replaced underneath (the local equivalent of a
        // stale NFS handle) fails the job rather than streaming from a ghost.
        if let Some(why) = source.iter().find_map(|l| l.replaced()) {
            return Err(why);
        }
        // Held back by a guest, or by another process on the disks below: small chunks,
        // so what goes ahead after the bounded wait is a short burst. (A job reading a
        // remote layer judges the host by the device counters, whose false alarms from
        // our own writeback must not shrink its chunks.)
        let held = yield_to_host(job);
        let max = if held == Waiting::Host && !job.copies_from_remote() {
            CHUNK_HOST
        } else if held == Waiting::Guest || job.sched.guest_recent(job.index, job.idle) {
            CHUNK_BUSY
        } else {
            CHUNK_IDLE
        };
        let cs = chain.cluster_size();
        let size = job
            .throttle
            .quantum(cs, max)
            .min(job.sched.total.quantum(cs, max));
        let Some((a, b)) = job.claim(size) else {
            return Ok(());
        };
        stall_if_injected();
        if !copy_range(job, layers, a, b)? {
            // Stopped for good: the chunk stays unfinished, so progress stops before it.
            return Ok(());
        }
        job.done_chunk(a);
        job.maybe_checkpoint();
    }
    Ok(())
}

/// Test-only: `stream-stall:MS` keeps this worker busy, deaf to pause and cancel.
fn stall_if_injected() {
    if let Some(ms) = fault::armed("stream-stall") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(15_000)));
    }
}

/// Copies what the leaf lacks in [a, b), parking in place while paused. Returns false
/// if the job stopped (cancel or failure) before the end.
fn copy_range(job: &Job, layers: &Layers, a: u64, b: u64) -> Result<bool, String> {
    let chain = &job.chain;
    let end = b.min(chain.size());
    let at = |pos: u64| move |e: crate::Error| format!("at guest offset {pos}: {e}");
    let mut pos = a;
    while pos < end {
        // Pause parks here, so the chunk resumes where it stopped.
        if job.must_stop() && !job.gate() {
            return Ok(false);
        }
        let (defined, run) = chain.leaf_run(layers, pos, end - pos).map_err(at(pos))?;
        if defined {
            pos += run;
            job.advance(a, pos, 0);
            continue;
        }
        // Nothing above the base has this range: nothing to copy, no time to book.
        let (provided, run) = chain
            .source_run(layers, pos, run, job.base)
            .map_err(at(pos))?;
        if !provided {
            pos += run;
            job.advance(a, pos, 0);
            continue;
        }
        let Some((piece, copied)) = copy_piece(job, layers, pos, run)? else {
            continue; // paused or stopped while waiting: the gate above decides
        };
        pos += piece;
        job.advance(a, pos, copied);
    }
    Ok(true)
}

/// Copies the start of `run` at `pos` (all of it when unthrottled; while throttled, an
/// admitted piece of about 1/8 s but at least one cluster, so a lower speed or a pause
/// takes effect within one piece). Returns (bytes advanced, bytes copied), or None if
/// the job was paused or stopped while waiting for admission.
fn copy_piece(
    job: &Job,
    layers: &Layers,
    pos: u64,
    run: u64,
) -> Result<Option<(u64, u64)>, String> {
    let chain = &job.chain;
    let cs = chain.cluster_size();
    let total = &job.sched.total;
    let piece = match (job.throttle.speed(), total.speed()) {
        (0, 0) => run,
        _ => run.min(
            job.throttle
                .quantum(cs, PIECE_THROTTLED)
                .min(total.quantum(cs, PIECE_THROTTLED))
                .div_ceil(cs)
                * cs,
        ),
    };
    if !job.throttle.admit(piece, || job.must_stop()) {
        return Ok(None);
    }
    // The mount's total cap, shared with every other job that wants it.
    if total.speed() > 0 {
        job.set_waiting(Waiting::Total);
        let admitted = total.admit(piece, || job.must_stop());
        job.set_waiting(Waiting::None);
        if !admitted {
            job.throttle.refund(piece);
            return Ok(None);
        }
    }
    // Test-only `stream-skip-copy`: a worker that claims success without copying,
    // which only the final scan of the leaf can catch.
    let copied = match fault::armed("stream-skip-copy") {
        Some(_) => 0,
        None => chain
            .stream_fill(layers, pos, piece, job.base)
            .map_err(|e| format!("at guest offset {pos}: {e}"))?,
    };
    job.throttle.refund(piece.saturating_sub(copied));
    total.refund(piece.saturating_sub(copied));
    if copied > 0 {
        job.after_write();
    }
    Ok(Some((piece, copied)))
}

/// Waits (bounded) until the job's idle policy says the disk is free: no guest I/O
/// (on this chain, or on any of the mount's), and for `host`, nobody else keeping the
/// disks under the images busy. Never more than `MAX_YIELD` in a row, and not at all
/// while the job runs below the mount's minimum speed, so a stream on a host that is
/// never idle still finishes. Returns what was last busy (`None` if nothing was); a
/// busy guest makes the next chunk small, so its requests wait less for cluster locks.
fn yield_to_host(job: &Job) -> Waiting {
    let began = Instant::now();
    let mut last = Waiting::None;
    loop {
        let why = job
            .sched
            .holdback(job.index, job.idle, job.copies_from_remote());
        if why == Waiting::None {
            job.set_waiting(Waiting::None);
            return last;
        }
        last = why;
        job.set_waiting(why);
        if began.elapsed() >= MAX_YIELD || job.recent_rate() < job.sched.policy.min_speed {
            job.set_waiting(Waiting::None);
            return last;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
