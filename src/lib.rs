//! streamfs: presents qcow2 backing chains as flat raw files over FUSE and streams
//! (copies) backing data into the leaf image, like QEMU's block-stream.
//!
//! Layers, imported one way only (lower never imports higher):
//! `format` (qcow2/raw images) <- `chain` (backing chains, copy-on-read, writes)
//! <- `jobs` (stream job state machine, workers) <- `control` (commands and status
//! text) <- `fs` (fuser) <- `daemon`/`cli` (process life cycle, command line).
//! `error`, `text` (escaping names from images) and `fault` (test-only fault points)
//! are used by all.

pub mod chain;
pub mod cli;
pub mod control;
pub mod daemon;
pub mod error;
pub mod events;
pub mod fault;
pub mod format;
pub mod fs;
pub mod jobs;
pub mod panic_hook;
pub mod source;
pub mod text;

pub use error::{Error, Result};
