//! A scripted NBD server on a Unix socket, for tests of what real servers never do:
//! broken replies, unknown cookies, dropped connections mid-reply.

use std::io::{Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use super::proto;
use crate::source::uri::{NbdAddr, NbdServer};

/// A request as the fake server saw it; `n` counts requests over all connections.
#[derive(Debug, Clone, Copy)]
pub struct Req {
    pub cmd: u16,
    pub cookie: u64,
    pub off: u64,
    pub len: u32,
    pub n: usize,
}

/// What to do with a request: write the reply (true) or drop the connection (false).
pub type Respond = dyn Fn(&mut UnixStream, Req) -> bool + Send + Sync;

pub struct Fake {
    pub addr: NbdAddr,
    _dir: tempfile::TempDir,
    pub connections: Arc<AtomicUsize>,
    /// A session panicked (a broken script): the test's verdict would mean nothing.
    panicked: Arc<AtomicBool>,
}

impl Drop for Fake {
    fn drop(&mut self) {
        if self.panicked.load(Ordering::SeqCst) && !std::thread::panicking() {
            panic!("a session of the fake NBD server panicked");
        }
    }
}

/// Serves an export of `size` bytes (structured replies and base:allocation as id 1
/// when `structured`), answering requests with `respond`.
pub fn serve(structured: bool, size: u64, respond: Box<Respond>) -> Fake {
    let dir = tempfile::tempdir().unwrap();
    let path: PathBuf = dir.path().join("fake.sock");
    let l = UnixListener::bind(&path).unwrap();
    let respond: Arc<Respond> = respond.into();
    let connections = Arc::new(AtomicUsize::new(0));
    let count = Arc::new(AtomicUsize::new(0));
    let conns = connections.clone();
    let panicked = Arc::new(AtomicBool::new(false));
    let flag = panicked.clone();
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            conns.fetch_add(1, Ordering::SeqCst);
            let (respond, count, flag) = (respond.clone(), count.clone(), flag.clone());
            std::thread::spawn(move || {
                // An I/O error is the client hanging up; only a panic is a fault.
                let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                    session(s, structured, size, &*respond, &count)
                }));
                if run.is_err() {
                    flag.store(true, Ordering::SeqCst);
                }
            });
        }
    });
    Fake {
        addr: NbdAddr {
            server: NbdServer::Unix(path.clone()),
            export: "x".into(),
            uri: format!("nbd+unix:///x?socket={}", path.display()),
        },
        _dir: dir,
        connections,
        panicked,
    }
}

fn opt_reply(s: &mut UnixStream, opt: u32, t: u32, p: &[u8]) -> std::io::Result<()> {
    let mut v = proto::OPT_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&t.to_be_bytes());
    v.extend_from_slice(&(p.len() as u32).to_be_bytes());
    v.extend_from_slice(p);
    s.write_all(&v)
}

fn session(
    mut s: UnixStream,
    structured: bool,
    size: u64,
    respond: &Respond,
    count: &AtomicUsize,
) -> std::io::Result<()> {
    s.write_all(b"NBDMAGICIHAVEOPT")?;
    s.write_all(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes())?;
    let mut b4 = [0u8; 4];
    s.read_exact(&mut b4)?;
    loop {
        let mut h = [0u8; 16];
        s.read_exact(&mut h)?;
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let len = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let mut data = vec![0u8; len as usize];
        s.read_exact(&mut data)?;
        match opt {
            proto::OPT_STRUCTURED_REPLY if structured => {
                opt_reply(&mut s, opt, proto::REP_ACK, &[])?
            }
            proto::OPT_SET_META_CONTEXT if structured => {
                let mut p = 1u32.to_be_bytes().to_vec();
                p.extend_from_slice(proto::META_BASE_ALLOCATION.as_bytes());
                opt_reply(&mut s, opt, proto::REP_META_CONTEXT, &p)?;
                opt_reply(&mut s, opt, proto::REP_ACK, &[])?;
            }
            proto::OPT_GO => {
                let mut p = vec![0, 0];
                p.extend_from_slice(&size.to_be_bytes());
                p.extend_from_slice(&3u16.to_be_bytes());
                opt_reply(&mut s, opt, proto::REP_INFO, &p)?;
                opt_reply(&mut s, opt, proto::REP_ACK, &[])?;
                break;
            }
            _ => opt_reply(&mut s, opt, proto::REP_ERR_UNSUP, &[])?,
        }
    }
    loop {
        let mut r = [0u8; 28];
        s.read_exact(&mut r)?;
        let req = Req {
            cmd: u16::from_be_bytes(r[6..8].try_into().unwrap()),
            cookie: u64::from_be_bytes(r[8..16].try_into().unwrap()),
            off: u64::from_be_bytes(r[16..24].try_into().unwrap()),
            len: u32::from_be_bytes(r[24..28].try_into().unwrap()),
            n: count.fetch_add(1, Ordering::SeqCst),
        };
        if req.cmd == proto::CMD_DISC || !respond(&mut s, req) {
            return Ok(());
        }
    }
}

/// A structured chunk.
pub fn chunk(s: &mut UnixStream, flags: u16, t: u16, cookie: u64, p: &[u8]) {
    let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
    v.extend_from_slice(&flags.to_be_bytes());
    v.extend_from_slice(&t.to_be_bytes());
    v.extend_from_slice(&cookie.to_be_bytes());
    v.extend_from_slice(&(p.len() as u32).to_be_bytes());
    v.extend_from_slice(p);
    let _ = s.write_all(&v);
}

/// The byte at `off` of the fake export's content.
pub fn byte(off: u64) -> u8 {
    (off % 251) as u8
}

/// An OFFSET_DATA chunk of the fake content for [off, off+len).
pub fn data_chunk(s: &mut UnixStream, flags: u16, cookie: u64, off: u64, len: u32) {
    let mut p = off.to_be_bytes().to_vec();
    p.extend((off..off + len as u64).map(byte));
    chunk(s, flags, proto::REPLY_TYPE_OFFSET_DATA, cookie, &p);
}

/// A structured error chunk.
pub fn error_chunk(s: &mut UnixStream, cookie: u64, errno: u32, msg: &str) {
    let mut p = errno.to_be_bytes().to_vec();
    p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    p.extend_from_slice(msg.as_bytes());
    chunk(
        s,
        proto::REPLY_FLAG_DONE,
        proto::REPLY_TYPE_ERROR,
        cookie,
        &p,
    );
}
