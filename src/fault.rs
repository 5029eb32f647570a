//! Fault injection for tests: `STREAMFS_FAULTS=NAME[:ARG][,NAME[:ARG]...]` in the
//! daemon's environment makes the named points misbehave, so tests can prove that a
//! panic or a stuck worker is reported instead of hidden. Unset (always, in production)
//! every point is one relaxed load of an already-initialized cell.
//!
//! Points: `stream-worker-panic` (a stream worker panics before copying),
//! `stream-stall:MS` (a stream worker ignores cancel/pause for MS milliseconds),
//! `stream-skip-copy` (workers report success without copying anything),
//! `fuse-read-panic` (a FUSE read handler panics).

use std::sync::OnceLock;

fn faults() -> &'static [(String, Option<String>)] {
    static FAULTS: OnceLock<Vec<(String, Option<String>)>> = OnceLock::new();
    FAULTS.get_or_init(|| {
        std::env::var("STREAMFS_FAULTS")
            .unwrap_or_default()
            .split(',')
            .filter(|s| !s.is_empty())
            .map(|s| match s.split_once(':') {
                Some((n, a)) => (n.to_string(), Some(a.to_string())),
                None => (s.to_string(), None),
            })
            .collect()
    })
}

/// The argument of fault `name` if it is armed (`Some("")` when it has none).
pub fn armed(name: &str) -> Option<&'static str> {
    faults()
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, a)| a.as_deref().unwrap_or(""))
}

/// Panics when fault `name` is armed.
pub fn panic_point(name: &str) {
    if armed(name).is_some() {
        panic!("injected fault '{name}'");
    }
}
