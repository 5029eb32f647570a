//! The connections of one export: one, or several when the server says they share one
//! cache (NBD_FLAG_CAN_MULTI_CONN). A lost connection is reopened with backoff (50 ms
//! doubling to 1 s) by whichever caller needs it next; the export must keep its size.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use super::conn::Conn;
use crate::source::uri::NbdAddr;

/// Connections opened when the server allows several.
pub const MULTI_CONN: usize = 4;
const BACKOFF_START: Duration = Duration::from_millis(50);
const BACKOFF_MAX: Duration = Duration::from_secs(1);

enum Slot {
    Up(Arc<Conn>),
    Down {
        retry_at: Instant,
        backoff: Duration,
        last: String,
    },
}

/// Why no connection can be had now.
pub enum NoConn {
    /// Try again at this instant; the last problem seen.
    Later(Instant, String),
    /// The export is not the one mounted any more: give up.
    Changed(String),
}

pub struct Pool {
    addr: NbdAddr,
    size: u64,
    /// Bounds writes, and each connect and handshake.
    io_timeout: Duration,
    slots: Vec<Mutex<Slot>>,
    /// Per slot: a background thread is reopening it.
    opening: Vec<AtomicBool>,
    next: AtomicUsize,
    changed: Mutex<Option<String>>,
    closed: AtomicBool,
}

impl Pool {
    /// A pool around the first connection, made at mount.
    pub fn new(addr: &NbdAddr, first: Conn, io_timeout: Duration) -> Pool {
        let n = if first.info.multi_conn() {
            MULTI_CONN
        } else {
            1
        };
        let size = first.info.size;
        let mut slots = vec![Mutex::new(Slot::Up(Arc::new(first)))];
        for _ in 1..n {
            slots.push(Mutex::new(Slot::Down {
                retry_at: Instant::now(),
                backoff: BACKOFF_START,
                last: "not connected yet".into(),
            }));
        }
        Pool {
            addr: addr.clone(),
            size,
            io_timeout,
            opening: (0..n).map(|_| AtomicBool::new(false)).collect(),
            slots,
            next: AtomicUsize::new(0),
            changed: Mutex::new(None),
            closed: AtomicBool::new(false),
        }
    }

    pub fn connections(&self) -> usize {
        self.slots.len()
    }

    pub fn changed(&self) -> Option<String> {
        self.changed.lock().clone()
    }

    fn live(&self, i: usize) -> Option<Arc<Conn>> {
        match &*self.slots[i].try_lock()? {
            Slot::Up(c) if c.dead().is_none() => Some(c.clone()),
            _ => None,
        }
    }

    /// A connection to send a request on: the next one in turn if it is up, else any
    /// live one (the next one is then reopened in the background, if due), else the next
    /// one reopened now.
    pub fn get(self: &Arc<Self>, deadline: Instant) -> Result<Arc<Conn>, NoConn> {
        if let Some(c) = self.changed() {
            return Err(NoConn::Changed(c));
        }
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        if let Some(c) = self.live(start) {
            return Ok(c);
        }
        for k in 1..n {
            if let Some(c) = self.live((start + k) % n) {
                self.reopen_aside(start);
                return Ok(c);
            }
        }
        self.reopen(start, deadline)
    }

    /// A live connection if there is one, without connecting.
    pub fn get_live(&self) -> Option<Arc<Conn>> {
        let n = self.slots.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed) % n;
        (0..n).find_map(|k| self.live((start + k) % n))
    }

    /// Reopens slot `i` in a thread of its own if it is down and due, so that a
    /// request with a live connection at hand never waits for a connect.
    fn reopen_aside(self: &Arc<Self>, i: usize) {
        if self.opening[i].swap(true, Ordering::AcqRel) {
            return;
        }
        let due = self.slots[i].try_lock().is_some_and(|s| match &*s {
            Slot::Up(c) => c.dead().is_some(),
            Slot::Down { retry_at, .. } => *retry_at <= Instant::now(),
        });
        let pool = self.clone();
        let spawned = due
            && std::thread::Builder::new()
                .name("nbd-connect".into())
                .spawn(move || {
                    // A failure stays in the slot (Down, with its reason and retry
                    // time) for the next request to see.
                    let _ = pool.reopen(i, Instant::now() + pool.io_timeout);
                    pool.opening[i].store(false, Ordering::Release);
                })
                .is_ok();
        if !spawned {
            self.opening[i].store(false, Ordering::Release);
        }
    }

    /// Reopens slot `i` if it is down and due; waits for its lock no later than the
    /// deadline (another caller may be reconnecting it).
    fn reopen(&self, i: usize, deadline: Instant) -> Result<Arc<Conn>, NoConn> {
        let wait = deadline.saturating_duration_since(Instant::now());
        let Some(mut slot) = self.slots[i].try_lock_for(wait) else {
            // Another caller is reconnecting it; its outcome will say more.
            return Err(NoConn::Later(deadline, String::new()));
        };
        let now = Instant::now();
        let backoff = match &*slot {
            Slot::Up(c) => match c.dead() {
                None => return Ok(c.clone()),
                Some(why) => {
                    log::warn!("{}: connection lost ({why}); reconnecting", self.addr.uri);
                    *slot = Slot::Down {
                        retry_at: now,
                        backoff: BACKOFF_START,
                        last: why,
                    };
                    BACKOFF_START
                }
            },
            Slot::Down {
                retry_at,
                backoff,
                last,
            } => {
                if *retry_at > now {
                    return Err(NoConn::Later(*retry_at, last.clone()));
                }
                *backoff
            }
        };
        let timeout = self
            .io_timeout
            .min(deadline.saturating_duration_since(now))
            .max(Duration::from_millis(10));
        match Conn::open(
            &self.addr.server,
            &self.addr.export,
            timeout,
            self.io_timeout,
        ) {
            Ok(c) if c.info.size != self.size => {
                let m = format!(
                    "the export changed size from {} to {} bytes after a reconnect: \
                     it is not the image that was mounted",
                    self.size, c.info.size
                );
                log::error!("{}: {m}", self.addr.uri);
                *self.changed.lock() = Some(m.clone());
                Err(NoConn::Changed(m))
            }
            Ok(_) if self.closed.load(Ordering::SeqCst) => {
                Err(NoConn::Later(deadline, "closed".into()))
            }
            Ok(c) => {
                log::info!("{}: connected", self.addr.uri);
                let c = Arc::new(c);
                *slot = Slot::Up(c.clone());
                Ok(c)
            }
            Err(e) => {
                log::debug!("{}: reconnect failed: {e}", self.addr.uri);
                let retry_at = Instant::now() + backoff;
                *slot = Slot::Down {
                    retry_at,
                    backoff: (backoff * 2).min(BACKOFF_MAX),
                    last: e.clone(),
                };
                Err(NoConn::Later(retry_at, e))
            }
        }
    }

    /// Drops a connection that failed (the next `get` reopens its slot).
    pub fn lost(&self, c: &Arc<Conn>, why: &str) {
        c.kill(why);
    }

    /// NBD_CMD_DISC on every live connection.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        for s in &self.slots {
            // A slot being reopened is left alone: its opener sees `closed` and drops
            // the new connection.
            let Some(mut s) = s.try_lock_for(Duration::from_millis(200)) else {
                continue;
            };
            if let Slot::Up(c) = &*s {
                c.disconnect();
            }
            *s = Slot::Down {
                retry_at: Instant::now() + Duration::from_secs(86400 * 365),
                backoff: BACKOFF_MAX,
                last: "closed".into(),
            };
        }
    }
}
