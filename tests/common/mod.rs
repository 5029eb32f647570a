//! Shared harness for the streamfs integration tests.
//!
//! Everything here talks to streamfs only through its command line (`streamfs mount`,
//! `streamfs umount`), the mounted files and the `user.streamfs.pid` xattr, and builds its
//! images with `qemu-img` / `qemu-io`, so the tests exercise the real binary end to end.
//!
//! Rules the helpers follow so that a broken daemon can never hang or litter the machine:
//! * every external command runs under [`run_with_timeout`];
//! * every access to a mounted file that could block goes through [`with_timeout`];
//! * a [`Mount`] cleans up in `Drop` (lazy unmount, then `kill -9` of the daemon) even when
//!   the test panicked, and every wait in that path is bounded.
//!
//! Typical use:
//! ```ignore
//! mod common;
//! use common::*;
//!
//! #[test]
//! fn reads_back() {
//!     require_fuse!();
//!     let s = Scratch::new();
//!     let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
//!     write_pattern(&base, 0x11, 0, MIB);
//!     let top = Qcow2::new().backing(&base).create(&s.join("top.qcow2"));
//!     let reference = raw_reference(&top);
//!     let m = s.mount(&[&top], &["--read-only"]);
//!     assert_bytes_eq("top.raw", &read_file(&m.file("top.raw")), &reference);
//!     m.umount();
//! }
//! ```
//!
//! The harness is split by concern; everything is re-exported here, so `use common::*;` and
//! `common::NAME` reach every item:
//! * [`environment`]: sizes, time limits, FUSE availability and the skip-or-fail rule;
//! * [`processes`]: bounded commands and waits, signals, finding a test's processes;
//! * [`mounts`]: [`Mount`], [`MountCmd`], the mount table, tmpfs, the pid xattr;
//! * [`qemu`]: qemu-img / qemu-io, references, check, compare, info, map;
//! * [`fixtures`]: [`Scratch`], raw and [`Qcow2`] images, [`Chain`], header patches,
//!   random data;
//! * [`control`]: the `.control` client;
//! * [`file_io`]: checked reads, fallocate, O_DIRECT, SEEK_DATA / SEEK_HOLE;
//! * [`servers`]: qemu-nbd, nbdkit and nginx as image servers.
// Each integration test binary compiles this module and uses only part of it.
#![allow(dead_code)]

mod control;
mod environment;
mod file_io;
mod fixtures;
mod mounts;
mod processes;
mod qemu;
mod servers;

// A binary that uses nothing from one of these modules would warn about its re-export.
#[allow(unused_imports)]
pub use self::control::*;
#[allow(unused_imports)]
pub use self::environment::*;
#[allow(unused_imports)]
pub use self::file_io::*;
#[allow(unused_imports)]
pub use self::fixtures::*;
#[allow(unused_imports)]
pub use self::mounts::*;
#[allow(unused_imports)]
pub use self::processes::*;
#[allow(unused_imports)]
pub use self::qemu::*;
#[allow(unused_imports)]
pub use self::servers::*;
#[allow(unused_imports)]
pub use rand::rngs::StdRng;
#[allow(unused_imports)]
pub use rand::{Rng, SeedableRng};
