//! When to try again: a read has `RemoteOptions::timeout` in all, counted from the call,
//! across reconnects. Between tries it waits 50 ms, doubling to at most 1 s, and never
//! past the deadline. Which failures are worth another try is decided here too.

use std::io;
use std::time::{Duration, Instant};

/// The first wait after a failed try.
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// The longest wait between two tries.
pub const MAX_BACKOFF: Duration = Duration::from_secs(1);

/// How one try ended, when it did not succeed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failure {
    /// No answer (connection refused or dropped, time out, 5xx, 408, 429): try again
    /// while time is left.
    Transient(String),
    /// An answer, or a fault that another try cannot mend: fail at once.
    Fatal(String),
}

/// The deadline of one call and the wait before its next try.
#[derive(Debug, Clone)]
pub struct Retry {
    deadline: Instant,
    backoff: Duration,
}

impl Retry {
    pub fn new(timeout: Duration, now: Instant) -> Retry {
        Retry {
            // An absurd timeout (years) saturates instead of overflowing.
            deadline: now.checked_add(timeout).unwrap_or(now + MAX_FAR),
            backoff: FIRST_BACKOFF,
        }
    }

    /// The time left for a try, which bounds its socket timeouts; `None` once used up.
    pub fn remaining(&self, now: Instant) -> Option<Duration> {
        let left = self.deadline.saturating_duration_since(now);
        (!left.is_zero()).then_some(left)
    }

    /// After a transient failure at `now`: how long to wait before the next try, or
    /// `None` if the deadline has passed (give up). Never waits past the deadline.
    pub fn wait_after_failure(&mut self, now: Instant) -> Option<Duration> {
        let left = self.remaining(now)?;
        let wait = self.backoff.min(left);
        self.backoff = (self.backoff * 2).min(MAX_BACKOFF);
        Some(wait)
    }
}

/// A deadline far enough to be "never" (about 30 years).
const MAX_FAR: Duration = Duration::from_secs(30 * 365 * 24 * 3600);

/// Whether an HTTP status that was not the one expected is worth another try: 5xx
/// (the server or a proxy in trouble), 408 (request timeout) and 429 (too many
/// requests). Any other status is the server's answer.
pub fn status_is_transient(status: u16) -> bool {
    (500..=599).contains(&status) || status == 408 || status == 429
}

/// Whether an I/O error means the connection was refused, lost or timed out (worth
/// another try) rather than something another try cannot mend (a TLS certificate
/// refused, garbage on the wire: `InvalidData`, and the like).
pub fn io_is_transient(kind: io::ErrorKind) -> bool {
    use io::ErrorKind::*;
    matches!(
        kind,
        ConnectionRefused
            | ConnectionReset
            | ConnectionAborted
            | NotConnected
            | BrokenPipe
            | UnexpectedEof
            | TimedOut
            | WouldBlock
            | Interrupted
            | AddrNotAvailable
            | NetworkUnreachable
            | HostUnreachable
            | NetworkDown
    )
}

/// Sorts a client error into `Failure`.
pub fn classify(err: ureq::Error) -> Failure {
    use ureq::Error as E;
    match err {
        E::Io(e) => {
            let msg = e.to_string();
            if io_is_transient(e.kind()) {
                Failure::Transient(msg)
            } else if msg.contains("UnknownIssuer") {
                Failure::Fatal(format!(
                    "{msg} (the server's CA is neither in the system's store nor in --ca-file)"
                ))
            } else {
                Failure::Fatal(msg)
            }
        }
        // A lost connection can also surface as a half-read response.
        E::Timeout(_) => Failure::Transient("timed out waiting for the server".into()),
        E::ConnectionFailed | E::HostNotFound | E::Protocol(_) | E::BodyStalled => {
            Failure::Transient(err.to_string())
        }
        E::StatusCode(s) if status_is_transient(s) => Failure::Transient(err.to_string()),
        e => Failure::Fatal(e.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_to_one_second() {
        let t0 = Instant::now();
        let mut r = Retry::new(Duration::from_secs(60), t0);
        let waits: Vec<u64> = (0..8)
            .map(|_| r.wait_after_failure(t0).unwrap().as_millis() as u64)
            .collect();
        assert_eq!(waits, [50, 100, 200, 400, 800, 1000, 1000, 1000]);
    }

    #[test]
    fn never_waits_past_the_deadline() {
        let t0 = Instant::now();
        let mut r = Retry::new(Duration::from_millis(1500), t0);
        for _ in 0..5 {
            r.wait_after_failure(t0);
        }
        // 1000 ms would be next, but only 300 ms are left.
        let now = t0 + Duration::from_millis(1200);
        assert_eq!(r.wait_after_failure(now), Some(Duration::from_millis(300)));
        assert_eq!(r.remaining(now), Some(Duration::from_millis(300)));
    }

    #[test]
    fn gives_up_once_the_time_is_used() {
        let t0 = Instant::now();
        let mut r = Retry::new(Duration::from_secs(2), t0);
        assert_eq!(r.remaining(t0), Some(Duration::from_secs(2)));
        let end = t0 + Duration::from_secs(2);
        assert_eq!(r.remaining(end), None);
        assert_eq!(r.wait_after_failure(end), None);
        assert_eq!(r.wait_after_failure(end + Duration::from_secs(5)), None);
    }

    #[test]
    fn zero_timeout_leaves_no_try() {
        let t0 = Instant::now();
        let mut r = Retry::new(Duration::ZERO, t0);
        assert_eq!(r.remaining(t0), None);
        assert_eq!(r.wait_after_failure(t0), None);
    }

    #[test]
    fn huge_timeout_does_not_overflow() {
        let t0 = Instant::now();
        let r = Retry::new(Duration::MAX, t0);
        assert!(r.remaining(t0).unwrap() > Duration::from_secs(3600));
    }

    #[test]
    fn which_statuses_are_retried() {
        for s in [500, 502, 503, 504, 599, 408, 429] {
            assert!(status_is_transient(s), "{s}");
        }
        for s in [400, 401, 403, 404, 410, 412, 416, 200, 301, 600] {
            assert!(!status_is_transient(s), "{s}");
        }
    }

    #[test]
    fn which_errors_are_retried() {
        let io = |k| ureq::Error::Io(io::Error::new(k, "x"));
        assert!(matches!(
            classify(io(io::ErrorKind::ConnectionRefused)),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(io(io::ErrorKind::ConnectionReset)),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(io(io::ErrorKind::UnexpectedEof)),
            Failure::Transient(_)
        ));
        // A refused certificate comes as InvalidData: another try cannot mend it.
        assert!(matches!(
            classify(io(io::ErrorKind::InvalidData)),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            classify(ureq::Error::ConnectionFailed),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(ureq::Error::StatusCode(503)),
            Failure::Transient(_)
        ));
        assert!(matches!(
            classify(ureq::Error::StatusCode(404)),
            Failure::Fatal(_)
        ));
        assert!(matches!(
            classify(ureq::Error::TooManyRedirects),
            Failure::Fatal(_)
        ));
    }
}
