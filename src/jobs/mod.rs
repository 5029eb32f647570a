//! Background stream jobs (QEMU's block-stream): worker threads walk the disk, skip what
//! the leaf already has, and copy the rest with the chain's copy path (same per-cluster
//! locks as guest writes). Progress lives in the leaf's allocation, so a cancelled,
//! failed or crashed stream resumes where it stopped. A whole-disk stream proven
//! complete rewrites the backing link.
//!
//! - `state`: the job's phases and the transition table;
//! - `job`: one job's state under one lock, its commands, and the driver that settles it;
//! - `worker`: the copy loop;
//! - `throttle`: the rate limit;
//! - `scheduler`: when stream work may run (idle policy), the total cap, the queue;
//! - `host`: the block devices under the images and how busy they are;
//! - `registry`: the mount's disks and their jobs.

pub mod host;
mod job;
mod registry;
mod scheduler;
mod state;
mod throttle;
mod worker;

pub use self::job::panic_text;
pub use self::registry::{Jobs, StartRequest, StatusLine};
pub use self::scheduler::{Idle, Policy, Waiting};
pub use self::state::JobState;

/// Errno for cancel/pause/resume/speed when NAME has no active job.
pub const ENOJOB: i32 = libc::ESRCH;
