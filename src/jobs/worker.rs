//! The stream worker loop: claim a chunk, skip what the leaf already has (reading its
//! metadata), copy the rest from the layers above the kept base through the chain's
//! copy path (same per-cluster locks as guest I/O), and step back for the guest.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::job::{panic_text, Job};
use crate::chain::Layers;
use crate::fault;

/// Copy unit when the guest is idle, and when it is busy (smaller = shorter lock holds).
/// Never less than one cluster: the unit is `max(cluster, ...)`.
const CHUNK_IDLE: u64 = 8 << 20;
const CHUNK_BUSY: u64 = 256 << 10;
/// Largest piece copied per rate-limit admission while a speed limit is set.
const PIECE_THROTTLED: u64 = 1 << 20;
/// Stream work waits this long after the last guest request before starting a chunk,
/// but never more than `MAX_YIELD` in a row (so a busy guest cannot starve the stream).
const GUEST_GRACE: Duration = Duration::from_millis(2);
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
        let busy = yield_to_guest(job);
        let cs = chain.cluster_size();
        let size = job
            .throttle
            .quantum(cs, if busy { CHUNK_BUSY } else { CHUNK_IDLE });
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
    let cs = chain.cluster_size();
    let end = b.min(chain.size());
    let mut pos = a;
    while pos < end {
        // Pause parks here, so the chunk resumes where it stopped.
        if job.must_stop() && !job.gate() {
            return Ok(false);
        }
        let (defined, run) = chain
            .leaf_run(layers, pos, end - pos)
            .map_err(|e| format!("at guest offset {pos}: {e}"))?;
        let mut copied = 0;
        let run = if defined {
            run
        } else {
            // While throttled, copy in admitted pieces of about 1/8 s (but at least one
            // cluster), so a lower speed or a pause takes effect within one piece.
            let piece = match job.throttle.speed() {
                0 => run,
                _ => run.min(job.throttle.quantum(cs, PIECE_THROTTLED).div_ceil(cs) * cs),
            };
            if !job.throttle.admit(piece, || job.must_stop()) {
                continue; // paused or stopped while waiting: the gate above decides
            }
            // Test-only `stream-skip-copy`: a worker that claims success without copying,
            // which only the final scan of the leaf can catch.
            if fault::armed("stream-skip-copy").is_none() {
                copied = chain
                    .stream_fill(layers, pos, piece, job.base)
                    .map_err(|e| format!("at guest offset {pos}: {e}"))?;
            }
            job.throttle.refund(piece.saturating_sub(copied));
            if copied > 0 {
                job.after_write();
            }
            piece
        };
        pos += run;
        job.advance(a, pos, copied);
    }
    Ok(true)
}

/// Waits for a quiet moment in guest I/O (bounded); returns whether the guest is busy.
fn yield_to_guest(job: &Job) -> bool {
    let chain = &job.chain;
    let c = &chain.counters;
    let began = Instant::now();
    let mut busy = false;
    loop {
        let inflight = c.guest_inflight.load(Ordering::Acquire);
        let last = c.guest_last_ns.load(Ordering::Relaxed);
        let since = chain.now_ns().saturating_sub(last);
        let seen = last != 0;
        if inflight == 0 && (!seen || since >= GUEST_GRACE.as_nanos() as u64) {
            return busy || (seen && since < Duration::from_millis(200).as_nanos() as u64);
        }
        busy = true;
        if began.elapsed() >= MAX_YIELD {
            return true;
        }
        std::thread::sleep(Duration::from_micros(500));
    }
}
