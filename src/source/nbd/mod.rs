//! NBD client byte source: an export read over the NBD protocol (doc/proto.md of the
//! NBD project), fixed newstyle with structured replies and base:allocation.
//!
//! - `proto`: the wire format, pure encoders and decoders;
//! - `socket`: TCP (TCP_NODELAY, connect timeout) or Unix socket streams;
//! - `handshake`: option haggling up to NBD_OPT_GO;
//! - `reply`: assembling one request's reply from simple replies or chunks;
//! - `conn`: one connection, requests pipelined by cookie, a reader thread;
//! - `pool`: one or several connections (multi-conn), reconnect with backoff;
//! - `readahead`: windows requested ahead of sequential reads;
//! - `fake`, `tests`: a scripted server and the tests that need one;
//! - here: `NbdSource`, which splits and aligns reads, retries requests whose
//!   connection was lost until the timeout, and answers block status.

mod conn;
#[cfg(test)]
mod fake;
mod handshake;
mod pool;
mod proto;
mod readahead;
mod reply;
mod socket;

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::conn::{Conn, Ticket};
use self::pool::{NoConn, Pool};
use self::readahead::Readahead;
use self::reply::{Answer, Cmd, ReqError};
use super::uri::NbdAddr;
use super::{Extent, RemoteOptions, Source};
use crate::{Error, Result};

/// Requests of one read in flight at once (at most 8 x 32 MiB buffered).
const IN_FLIGHT: usize = 8;

/// A duration for messages: "2 s", "0.5 s".
fn secs(d: Duration) -> String {
    let s = d.as_secs_f64();
    if s.fract() == 0.0 {
        format!("{s:.0} s")
    } else {
        format!("{s:.1} s")
    }
}

/// The last block status answer: extents (start, end, kind) in order.
type StatusCache = Option<Vec<(u64, u64, Extent)>>;

pub struct NbdSource {
    uri: String,
    size: u64,
    timeout: Duration,
    min_block: u64,
    max_payload: u64,
    block_status: bool,
    pool: Arc<Pool>,
    closed: AtomicBool,
    status: Mutex<StatusCache>,
    readahead: Readahead,
}

impl NbdSource {
    /// Connects to the export at mount: an unreachable server or an unknown export is
    /// an error at once (no waiting for the timeout).
    pub fn connect(addr: &NbdAddr, opts: &RemoteOptions) -> Result<NbdSource> {
        let timeout = opts.timeout.max(Duration::from_millis(100));
        let first = Conn::open(&addr.server, &addr.export, timeout, timeout)
            .map_err(|e| Error::remote(&addr.uri, e))?;
        let info = first.info.clone();
        let pool = Arc::new(Pool::new(addr, first, timeout));
        log::info!(
            "{}: NBD export of {} bytes, blocks {}/{}/{}, {} replies, {}, {} connection(s)",
            addr.uri,
            info.size,
            info.min_block,
            info.pref_block,
            info.max_payload,
            if info.structured {
                "structured"
            } else {
                "simple"
            },
            if info.meta_id.is_some() {
                "base:allocation"
            } else {
                "no block status"
            },
            pool.connections()
        );
        Ok(NbdSource {
            uri: addr.uri.clone(),
            size: info.size,
            timeout,
            min_block: info.min_block as u64,
            max_payload: info.max_payload as u64,
            block_status: info.meta_id.is_some(),
            pool,
            closed: AtomicBool::new(false),
            status: Mutex::new(None),
            readahead: Readahead::new(),
        })
    }

    /// How many connections the export may use (1, or more with multi-conn).
    pub fn connections(&self) -> usize {
        self.pool.connections()
    }

    fn err(&self, msg: impl Into<String>) -> Error {
        Error::remote(&self.uri, msg)
    }

    fn what(cmd: Cmd) -> String {
        match cmd {
            Cmd::Read { off, len } => format!("reading {len} bytes at offset {off}"),
            Cmd::BlockStatus { off, len } => {
                format!("block status of {len} bytes at offset {off}")
            }
        }
    }

    fn check_open(&self) -> Result<()> {
        if self.closed.load(Ordering::SeqCst) {
            return Err(self.err("the NBD session is closed"));
        }
        if let Some(m) = self.pool.changed() {
            return Err(self.err(m));
        }
        Ok(())
    }

    /// Sends `cmd` if a connection is at hand now (else `run` will retry it).
    fn try_submit(&self, cmd: Cmd, deadline: Instant) -> Option<(Arc<Conn>, Ticket)> {
        let c = self.pool.get(deadline).ok()?;
        match c.submit(cmd) {
            Ok(t) => Some((c, t)),
            Err(_) => None,
        }
    }

    /// Gets the answer to `cmd`, already sent as `sent` or not: retried on another
    /// connection whenever one is lost, until the deadline.
    fn run(
        &self,
        cmd: Cmd,
        deadline: Instant,
        mut sent: Option<(Arc<Conn>, Ticket)>,
    ) -> Result<Answer> {
        let mut last = String::new();
        let mut losses = 0u32;
        loop {
            if losses > 1 && sent.is_none() {
                // Connections that keep failing at once (a server answering with
                // NBD_ESHUTDOWN or garbage): back off as for a refused connect.
                let pause = Duration::from_millis(25 << losses.min(6)).min(Duration::from_secs(1));
                let left = deadline.saturating_duration_since(Instant::now());
                std::thread::sleep(pause.min(left));
            }
            if let Some((c, t)) = sent.take() {
                match c.wait(t, deadline) {
                    Ok(a) => return Ok(a),
                    Err(ReqError::Server { errno, msg }) => {
                        let mut m = format!(
                            "the server failed {}: {}",
                            Self::what(cmd),
                            proto::errno_name(errno)
                        );
                        if !msg.is_empty() {
                            m = format!("{m}: {msg}");
                        }
                        return Err(self.err(m));
                    }
                    Err(ReqError::Protocol(m)) => {
                        return Err(self.err(format!(
                            "{}: the server broke the NBD protocol: {m}",
                            Self::what(cmd)
                        )))
                    }
                    Err(ReqError::Timeout) => break,
                    Err(ReqError::Lost(why)) => {
                        self.pool.lost(&c, &why);
                        last = why;
                        losses += 1;
                    }
                }
            }
            self.check_open()?;
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            match self.pool.get(deadline) {
                Ok(c) => match c.submit(cmd) {
                    Ok(t) => sent = Some((c, t)),
                    Err(e) => {
                        let why = match e {
                            ReqError::Lost(why) => why,
                            e => format!("{e:?}"),
                        };
                        self.pool.lost(&c, &why);
                        last = why;
                        losses += 1;
                    }
                },
                Err(NoConn::Changed(m)) => return Err(self.err(m)),
                Err(NoConn::Later(at, why)) => {
                    if !why.is_empty() {
                        last = why;
                    }
                    let until = at.min(deadline);
                    let now = Instant::now();
                    if until > now {
                        std::thread::sleep(until - now);
                    }
                }
            }
        }
        let mut m = format!(
            "no answer within {} {}",
            secs(self.timeout),
            Self::what(cmd)
        );
        if !last.is_empty() {
            m = format!("{m} (last problem: {last})");
        }
        Err(self.err(m))
    }

    fn round_down(&self, x: u64) -> u64 {
        x / self.min_block * self.min_block
    }

    /// [start, end) around [off, off+len) in whole minimum blocks, inside the export.
    fn aligned(&self, off: u64, len: u64) -> (u64, u64) {
        let start = self.round_down(off);
        let end = (off + len).div_ceil(self.min_block) * self.min_block;
        (start, end.min(self.size))
    }

    fn block_status(&self, off: u64, len: u64) -> Result<Vec<(u64, u64, Extent)>> {
        let deadline = Instant::now() + self.timeout;
        let (start, end) = self.aligned(off, len);
        let max = self.round_down(u32::MAX as u64);
        let rlen = (end - start).min(max) as u32;
        let cmd = Cmd::BlockStatus {
            off: start,
            len: rlen,
        };
        let sent = self.try_submit(cmd, deadline);
        let Answer::Extents(d) = self.run(cmd, deadline, sent)? else {
            return Err(self.err("a block status request answered with data"));
        };
        let mut v = Vec::with_capacity(d.len());
        let mut at = start;
        for (l, flags) in d {
            if at >= self.size {
                break;
            }
            let e = (at + l as u64).min(self.size);
            v.push((at, e, proto::extent_of(flags)));
            at = e;
        }
        Ok(v)
    }

    /// Reads [off, off+buf.len()) (inside the export) from the server.
    fn read_pieces(&self, buf: &mut [u8], off: u64, deadline: Instant) -> Result<()> {
        let n = buf.len();
        // Whole minimum blocks, split at the payload limit; up to IN_FLIGHT pieces are
        // sent before the first is waited for.
        let (start, end) = self.aligned(off, n as u64);
        let mut inflight = VecDeque::new();
        let mut at = start;
        while at < end || !inflight.is_empty() {
            if at < end && inflight.len() < IN_FLIGHT {
                let l = (end - at).min(self.max_payload);
                let cmd = Cmd::Read {
                    off: at,
                    len: l as u32,
                };
                inflight.push_back((at, cmd, self.try_submit(cmd, deadline)));
                at += l;
                continue;
            }
            let Some((p, cmd, sent)) = inflight.pop_front() else {
                break;
            };
            let Answer::Data(data) = self.run(cmd, deadline, sent)? else {
                return Err(self.err("a read answered with block status"));
            };
            // The part of [p, p+len) inside [off, off+n).
            let s = p.max(off);
            let e = (p + data.len() as u64).min(off + n as u64);
            if s < e {
                buf[(s - off) as usize..(e - off) as usize]
                    .copy_from_slice(&data[(s - p) as usize..(e - p) as usize]);
            }
        }
        Ok(())
    }

    /// Requests the readahead window from `at`, on a connection already up.
    fn read_ahead(&self, at: u64) {
        let start = self.round_down(at);
        if start >= self.size {
            return;
        }
        let len = readahead::WINDOW
            .min(self.max_payload)
            .min(self.size - start);
        let Some(c) = self.pool.get_live() else {
            return;
        };
        let cmd = Cmd::Read {
            off: start,
            len: len as u32,
        };
        if let Ok(t) = c.submit(cmd) {
            log::trace!("{}: readahead of {len} bytes at {start}", self.uri);
            self.readahead.add(start, len, c, t);
        }
    }
}

impl Source for NbdSource {
    fn name(&self) -> &str {
        &self.uri
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        let deadline = Instant::now() + self.timeout;
        self.check_open()?;
        let n = if off >= self.size {
            0
        } else {
            (buf.len() as u64).min(self.size - off) as usize
        };
        buf[n..].fill(0);
        if n == 0 {
            return Ok(0);
        }
        if !self.readahead.serve(&mut buf[..n], off, deadline) {
            self.read_pieces(&mut buf[..n], off, deadline)?;
        }
        if let Some(next) = self.readahead.after_read(off, n as u64) {
            self.read_ahead(next);
        }
        Ok(n)
    }

    fn extent(&self, off: u64, len: u64) -> Result<(Extent, u64)> {
        if len == 0 || !self.block_status || off >= self.size {
            return Ok((Extent::Data, len));
        }
        self.check_open()?;
        let len = len.min(self.size - off);
        let find = |v: &[(u64, u64, Extent)]| {
            v.iter()
                .find(|&&(s, e, _)| s <= off && off < e)
                .map(|&(_, e, k)| (k, (e - off).min(len)))
        };
        if let Some(r) = self.status.lock().as_deref().and_then(find) {
            return Ok(r);
        }
        let v = self.block_status(off, len)?;
        let r = find(&v);
        *self.status.lock() = Some(v);
        // A server may describe less than asked: what it left out counts as data.
        Ok(r.unwrap_or((Extent::Data, len.min(self.min_block.max(1)))))
    }

    fn close(&self) {
        if !self.closed.swap(true, Ordering::SeqCst) {
            self.readahead.clear();
            self.pool.close();
        }
    }
}

impl Drop for NbdSource {
    fn drop(&mut self) {
        self.close();
    }
}

#[cfg(test)]
mod tests;
