//! One connection to the server in the transmission phase. Requests are pipelined: a
//! caller registers its request under a fresh cookie, writes it, and waits on a channel;
//! one reader thread per connection reads the replies as they come, in any order, and
//! hands each completed one to the caller by its cookie.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, RecvTimeoutError, Sender};
use parking_lot::Mutex;

use super::handshake::{self, ExportInfo};
use super::proto;
use super::reply::{Answer, Assembly, Cmd, Fault, ReqError};
use super::socket::{self, io_text, Stream};
use crate::source::uri::NbdServer;

type Outcome = Result<Answer, ReqError>;

struct Pending {
    asm: Assembly,
    tx: Sender<Outcome>,
}

struct State {
    pending: HashMap<u64, Pending>,
    /// Why the connection is unusable, once it is.
    dead: Option<String>,
}

struct Shared {
    state: Mutex<State>,
    /// Milliseconds since `epoch` when bytes last came from the server.
    last_rx: AtomicU64,
    epoch: Instant,
}

impl Shared {
    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }
    /// Marks the connection dead: every waiting caller sees its channel close.
    fn die(&self, why: String) {
        let mut st = self.state.lock();
        if st.dead.is_none() {
            st.dead = Some(why);
        }
        st.pending.clear();
    }
}

pub struct Conn {
    pub info: ExportInfo,
    label: String,
    writer: Mutex<Stream>,
    shared: Arc<Shared>,
    reader: Mutex<Option<JoinHandle<()>>>,
    next_cookie: AtomicU64,
    disconnected: AtomicBool,
}

/// A request sent and not yet answered.
pub struct Ticket {
    rx: Receiver<Outcome>,
    sent_ms: u64,
}

impl Conn {
    /// Connects and negotiates, all within `timeout`; `io_timeout` bounds later writes.
    pub fn open(
        server: &NbdServer,
        export: &str,
        timeout: Duration,
        io_timeout: Duration,
    ) -> Result<Conn, String> {
        let start = Instant::now();
        let mut s = socket::connect(server, timeout)?;
        let left = timeout.saturating_sub(start.elapsed());
        let label = socket::describe(server);
        s.set_timeouts(Some(left), Some(left))
            .map_err(|e| format!("{label}: {}", io_text(&e)))?;
        let info = handshake::negotiate(&mut s, export)?;
        s.set_timeouts(None, Some(io_timeout))
            .map_err(|e| format!("{label}: {}", io_text(&e)))?;
        let rs = s
            .try_clone()
            .map_err(|e| format!("{label}: {}", io_text(&e)))?;
        let shared = Arc::new(Shared {
            state: Mutex::new(State {
                pending: HashMap::new(),
                dead: None,
            }),
            last_rx: AtomicU64::new(0),
            epoch: Instant::now(),
        });
        let sh = shared.clone();
        let (structured, meta_id) = (info.structured, info.meta_id);
        let lbl = label.clone();
        let reader = std::thread::Builder::new()
            .name("nbd-reader".into())
            .spawn(move || reader_loop(rs, sh, structured, meta_id, lbl))
            .map_err(|e| format!("cannot start the reply reader thread: {e}"))?;
        log::debug!("NBD connection to {label} for export '{export}' is up");
        Ok(Conn {
            info,
            label,
            writer: Mutex::new(s),
            shared,
            reader: Mutex::new(Some(reader)),
            next_cookie: AtomicU64::new(1),
            disconnected: AtomicBool::new(false),
        })
    }

    /// Why the connection cannot be used, if it cannot.
    pub fn dead(&self) -> Option<String> {
        self.shared.state.lock().dead.clone()
    }

    /// Sends `cmd`; the answer comes through `wait`.
    pub fn submit(&self, cmd: Cmd) -> Result<Ticket, ReqError> {
        let cookie = self.next_cookie.fetch_add(1, Ordering::Relaxed);
        let (nbd_cmd, off, len) = match cmd {
            Cmd::Read { off, len } => (proto::CMD_READ, off, len),
            Cmd::BlockStatus { off, len } => (proto::CMD_BLOCK_STATUS, off, len),
        };
        let (tx, rx) = bounded(1);
        {
            // Registered before it is sent: the reply may come at once.
            let mut st = self.shared.state.lock();
            if let Some(why) = &st.dead {
                return Err(ReqError::Lost(why.clone()));
            }
            st.pending.insert(
                cookie,
                Pending {
                    asm: Assembly::new(cmd),
                    tx,
                },
            );
        }
        let sent_ms = self.shared.now_ms();
        let req = proto::encode_request(0, nbd_cmd, cookie, off, len);
        let r = self.writer.lock().write_all(&req);
        if let Err(e) = r {
            let why = format!("sending to {}: {}", self.label, io_text(&e));
            self.kill(&why);
            return Err(ReqError::Lost(why));
        }
        Ok(Ticket { rx, sent_ms })
    }

    /// Waits for the answer to `t` until `deadline`. A connection that sent nothing at
    /// all since the request went out is presumed gone (a silent network) and dropped.
    pub fn wait(&self, t: Ticket, deadline: Instant) -> Result<Answer, ReqError> {
        match t.rx.recv_deadline(deadline) {
            Ok(r) => r,
            Err(RecvTimeoutError::Disconnected) => Err(ReqError::Lost(
                self.dead()
                    .unwrap_or_else(|| "the connection was dropped".into()),
            )),
            Err(RecvTimeoutError::Timeout) => {
                if self.shared.last_rx.load(Ordering::Relaxed) <= t.sent_ms {
                    self.kill("the server sent nothing for the whole timeout");
                }
                Err(ReqError::Timeout)
            }
        }
    }

    /// Drops the connection at once (a hard disconnect).
    pub fn kill(&self, why: &str) {
        log::debug!("NBD connection to {}: dropped: {why}", self.label);
        self.shared.die(why.to_string());
        self.writer.lock().shutdown();
    }

    /// Ends the session politely: NBD_CMD_DISC, then the socket is closed.
    pub fn disconnect(&self) {
        if self.disconnected.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.dead().is_none() {
            let req = proto::encode_request(0, proto::CMD_DISC, 0, 0, 0);
            let mut w = self.writer.lock();
            let _ = w.write_all(&req).and_then(|_| w.flush());
        }
        self.kill("disconnected");
        if let Some(h) = self.reader.lock().take() {
            if h.join().is_err() {
                log::error!(
                    "NBD connection to {}: the reply reader panicked",
                    self.label
                );
            }
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.disconnect();
    }
}

fn reader_loop(
    mut r: Stream,
    sh: Arc<Shared>,
    structured: bool,
    meta_id: Option<u32>,
    label: String,
) {
    // A panic (logged by the panic hook) must not leave the connection looking alive
    // with nobody reading its replies: it dies like any other fault, and every waiter is
    // told at once.
    let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        read_until_fault(&mut r, &sh, structured, meta_id, &label)
    }));
    sh.die(run.unwrap_or_else(|_| format!("the reply reader for {label} panicked")));
}

/// Reads replies until the connection fails; returns why it did.
fn read_until_fault(
    r: &mut Stream,
    sh: &Shared,
    structured: bool,
    meta_id: Option<u32>,
    label: &str,
) -> String {
    loop {
        match read_one(r, sh, structured, meta_id) {
            Ok(()) => {}
            Err(Fault::Io(e)) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                return format!("{label} closed the connection");
            }
            Err(Fault::Io(e)) => return format!("reading from {label}: {}", io_text(&e)),
            Err(Fault::Protocol(m)) => {
                log::warn!("NBD server {label} broke the protocol: {m}; dropping the connection");
                return format!("{label} broke the protocol: {m}");
            }
        }
    }
}

/// Reads one reply message and applies it to the request it answers.
fn read_one(
    r: &mut Stream,
    sh: &Shared,
    structured: bool,
    meta_id: Option<u32>,
) -> Result<(), Fault> {
    let mut m = [0u8; 4];
    r.read_exact(&mut m)?;
    sh.last_rx.store(sh.now_ms(), Ordering::Relaxed);
    let magic = u32::from_be_bytes(m);
    let n = proto::reply_rest_len(magic).map_err(Fault::Protocol)?;
    let mut rest = [0u8; 16];
    r.read_exact(&mut rest[..n])?;
    let h = proto::parse_reply_header(magic, &rest[..n]).map_err(Fault::Protocol)?;
    let cookie = h.cookie();
    // Taken out of the table while its payload is read, so submitters are not held up.
    let mut p = sh
        .state
        .lock()
        .pending
        .remove(&cookie)
        .ok_or_else(|| Fault::Protocol(format!("reply for unknown cookie {cookie}")))?;
    match p.asm.apply(r, &h, structured, meta_id) {
        Ok(true) => {
            // The caller may have given up waiting: then nobody listens.
            let _ = p.tx.send(p.asm.finish());
        }
        Ok(false) => {
            let mut st = sh.state.lock();
            if st.dead.is_none() {
                st.pending.insert(cookie, p);
            }
        }
        Err(Fault::Protocol(m)) => {
            let _ = p.tx.send(Err(ReqError::Protocol(m.clone())));
            return Err(Fault::Protocol(m));
        }
        Err(e) => return Err(e),
    }
    sh.last_rx.store(sh.now_ms(), Ordering::Relaxed);
    Ok(())
}
