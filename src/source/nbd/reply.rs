//! Assembling the reply to one request from the messages the server sends: a simple
//! reply, or structured chunks (data, holes, block status, errors) until the one
//! flagged DONE. Every chunk is checked against the request it answers.

use std::collections::BTreeMap;
use std::io::{self, Read};

use super::proto::{self, ReplyHeader, Wire};

/// What a request asked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cmd {
    Read { off: u64, len: u32 },
    BlockStatus { off: u64, len: u32 },
}

/// The answer to a request.
#[derive(Debug, PartialEq, Eq)]
pub enum Answer {
    Data(Vec<u8>),
    /// (length, flags) descriptors from `off` on.
    Extents(Vec<(u32, u32)>),
}

/// Why a request has no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReqError {
    /// The server answered with an error (final: not retried).
    Server { errno: u32, msg: String },
    /// The server broke the protocol answering this request (final).
    Protocol(String),
    /// The connection went away before the answer (retried on another).
    Lost(String),
    /// No answer before the deadline.
    Timeout,
}

/// Why the reader must stop reading this connection.
#[derive(Debug)]
pub enum Fault {
    /// The stream failed or ended.
    Io(io::Error),
    /// The server sent something that breaks the protocol.
    Protocol(String),
}

impl From<io::Error> for Fault {
    fn from(e: io::Error) -> Self {
        Fault::Io(e)
    }
}

/// A request in flight and what has come of it so far.
pub struct Assembly {
    cmd: Cmd,
    /// For a read: the data, zeros where holes were reported.
    buf: Vec<u8>,
    /// Ranges (relative start -> end) already covered by content chunks.
    covered: BTreeMap<u64, u64>,
    extents: Option<Vec<(u32, u32)>>,
    error: Option<(u32, String)>,
}

impl Assembly {
    pub fn new(cmd: Cmd) -> Assembly {
        let buf = match cmd {
            Cmd::Read { len, .. } => vec![0u8; len as usize],
            Cmd::BlockStatus { .. } => Vec::new(),
        };
        Assembly {
            cmd,
            buf,
            covered: BTreeMap::new(),
            extents: None,
            error: None,
        }
    }

    /// Records [start, start+len) (relative to the read) as covered, refusing ranges
    /// outside the request or overlapping earlier ones.
    fn cover(&mut self, abs: u64, len: u64, what: &str) -> Wire<usize> {
        let (off, rlen) = match self.cmd {
            Cmd::Read { off, len } => (off, len as u64),
            Cmd::BlockStatus { .. } => return Err(format!("{what} in a block status reply")),
        };
        let start = abs.checked_sub(off).filter(|&s| s < rlen);
        let end = start
            .and_then(|s| s.checked_add(len))
            .filter(|&e| e <= rlen);
        let (Some(start), Some(end)) = (start, end) else {
            return Err(format!(
                "{what} at {abs} for {len} bytes outside the read of {rlen} bytes at {off}"
            ));
        };
        let before = self.covered.range(..=start).next_back();
        let after = self.covered.range(start..).next();
        if before.is_some_and(|(_, &e)| e > start) || after.is_some_and(|(&s, _)| s < end) {
            return Err(format!(
                "{what} at {abs} for {len} bytes overlaps an earlier chunk"
            ));
        }
        self.covered.insert(start, end);
        Ok(start as usize)
    }

    fn fail(&mut self, errno: u32, msg: String) {
        // The first error is kept: it says most.
        if self.error.is_none() {
            self.error = Some((errno, msg));
        }
    }

    /// Reads the payload of the message `h` (for this request) from `r`. Returns true
    /// when the reply is complete.
    pub fn apply<R: Read>(
        &mut self,
        r: &mut R,
        h: &ReplyHeader,
        structured: bool,
        meta_id: Option<u32>,
    ) -> Result<bool, Fault> {
        match *h {
            ReplyHeader::Simple { error, .. } => {
                if structured && matches!(self.cmd, Cmd::Read { .. }) {
                    return Err(Fault::Protocol(
                        "simple reply to a read after structured replies were agreed".into(),
                    ));
                }
                if error != 0 {
                    self.fail(error, String::new());
                } else if let Cmd::Read { len, .. } = self.cmd {
                    r.read_exact(&mut self.buf)?;
                    self.covered.insert(0, len as u64);
                } else {
                    return Err(Fault::Protocol(
                        "simple reply without error to a block status request".into(),
                    ));
                }
                Ok(true)
            }
            ReplyHeader::Chunk {
                flags, rtype, len, ..
            } => {
                if !structured {
                    return Err(Fault::Protocol(
                        "structured reply chunk, but structured replies were not agreed".into(),
                    ));
                }
                self.chunk(r, rtype, len, meta_id)?;
                Ok(flags & proto::REPLY_FLAG_DONE != 0)
            }
        }
    }

    fn chunk<R: Read>(
        &mut self,
        r: &mut R,
        rtype: u16,
        len: u32,
        meta_id: Option<u32>,
    ) -> Result<(), Fault> {
        let bad = |m: String| Err(Fault::Protocol(m));
        match rtype {
            proto::REPLY_TYPE_NONE => {
                if len != 0 {
                    return bad(format!("NBD_REPLY_TYPE_NONE with {len} bytes"));
                }
            }
            proto::REPLY_TYPE_OFFSET_DATA => {
                if len < 9 {
                    return bad(format!("NBD_REPLY_TYPE_OFFSET_DATA of {len} bytes"));
                }
                let mut o = [0u8; 8];
                r.read_exact(&mut o)?;
                let abs = proto::parse_data_offset(&o);
                let n = (len - 8) as u64;
                let at = self.cover(abs, n, "data").map_err(Fault::Protocol)?;
                r.read_exact(&mut self.buf[at..at + n as usize])?;
            }
            proto::REPLY_TYPE_OFFSET_HOLE => {
                if len != 12 {
                    return bad(format!("NBD_REPLY_TYPE_OFFSET_HOLE of {len} bytes"));
                }
                let mut p = [0u8; 12];
                r.read_exact(&mut p)?;
                let (abs, n) = proto::parse_hole(&p).map_err(Fault::Protocol)?;
                let at = self.cover(abs, n as u64, "hole").map_err(Fault::Protocol)?;
                self.buf[at..at + n as usize].fill(0);
            }
            proto::REPLY_TYPE_BLOCK_STATUS => {
                if !matches!(self.cmd, Cmd::BlockStatus { .. }) {
                    return bad("block status chunk in a read reply".into());
                }
                if len > proto::MAX_STATUS_CHUNK {
                    return bad(format!("block status chunk of {len} bytes"));
                }
                let p = read_payload(r, len)?;
                let (id, d) = proto::parse_block_status(&p).map_err(Fault::Protocol)?;
                if Some(id) != meta_id {
                    return bad(format!("block status for context {id}, not agreed"));
                }
                if self.extents.is_some() {
                    return bad("two block status chunks for one context".into());
                }
                self.extents = Some(d);
            }
            t if t & proto::REPLY_TYPE_FLAG_ERROR != 0 => {
                if len > proto::MAX_ERROR_CHUNK {
                    return bad(format!("error chunk of {len} bytes"));
                }
                let p = read_payload(r, len)?;
                let e = proto::parse_error_chunk(t, &p).map_err(Fault::Protocol)?;
                let mut msg = e.msg;
                if let Some(o) = e.offset {
                    msg = if msg.is_empty() {
                        format!("at offset {o}")
                    } else {
                        format!("at offset {o}: {msg}")
                    };
                }
                self.fail(e.errno, msg);
            }
            t => return bad(format!("unknown reply chunk type {t}")),
        }
        Ok(())
    }

    /// The outcome once the last message came.
    pub fn finish(self) -> Result<Answer, ReqError> {
        if let Some((errno, msg)) = self.error {
            if errno == proto::ESHUTDOWN {
                return Err(ReqError::Lost("the server is shutting down".into()));
            }
            return Err(ReqError::Server { errno, msg });
        }
        match self.cmd {
            Cmd::Read { len, off } => {
                let got: u64 = self.covered.iter().map(|(s, e)| e - s).sum();
                if got != len as u64 {
                    return Err(ReqError::Protocol(format!(
                        "the server ended the read of {len} bytes at {off} after {got} bytes"
                    )));
                }
                Ok(Answer::Data(self.buf))
            }
            Cmd::BlockStatus { .. } => match self.extents {
                Some(e) => Ok(Answer::Extents(e)),
                None => Err(ReqError::Protocol(
                    "the server ended a block status reply without status".into(),
                )),
            },
        }
    }
}

fn read_payload<R: Read>(r: &mut R, len: u32) -> Result<Vec<u8>, Fault> {
    let mut v = vec![0u8; len as usize];
    r.read_exact(&mut v)?;
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    fn chunk(flags: u16, rtype: u16, payload: &[u8]) -> (ReplyHeader, Vec<u8>) {
        (
            ReplyHeader::Chunk {
                flags,
                rtype,
                cookie: 1,
                len: payload.len() as u32,
            },
            payload.to_vec(),
        )
    }
    fn data(off: u64, d: &[u8]) -> Vec<u8> {
        let mut p = off.to_be_bytes().to_vec();
        p.extend_from_slice(d);
        p
    }
    fn hole(off: u64, n: u32) -> Vec<u8> {
        let mut p = off.to_be_bytes().to_vec();
        p.extend_from_slice(&n.to_be_bytes());
        p
    }
    fn err(errno: u32, msg: &str) -> Vec<u8> {
        let mut p = errno.to_be_bytes().to_vec();
        p.extend_from_slice(&(msg.len() as u16).to_be_bytes());
        p.extend_from_slice(msg.as_bytes());
        p
    }

    /// Feeds chunks; Ok(answer) at DONE, or the fault.
    fn feed(
        cmd: Cmd,
        chunks: &[(ReplyHeader, Vec<u8>)],
    ) -> Result<Result<Answer, ReqError>, String> {
        let mut a = Assembly::new(cmd);
        for (h, p) in chunks {
            let mut r = Cursor::new(p.clone());
            match a.apply(&mut r, h, true, Some(3)) {
                Ok(true) => return Ok(a.finish()),
                Ok(false) => {}
                Err(Fault::Protocol(m)) => return Err(m),
                Err(Fault::Io(e)) => return Err(format!("io: {e}")),
            }
        }
        Err("no DONE".into())
    }

    const READ: Cmd = Cmd::Read { off: 1000, len: 8 };

    #[test]
    fn read_chunks_in_any_order() {
        let r = feed(
            READ,
            &[
                chunk(0, proto::REPLY_TYPE_OFFSET_DATA, &data(1004, b"5678")),
                chunk(0, proto::REPLY_TYPE_OFFSET_HOLE, &hole(1002, 2)),
                chunk(0, proto::REPLY_TYPE_OFFSET_DATA, &data(1000, b"12")),
                chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[]),
            ],
        );
        assert_eq!(r, Ok(Ok(Answer::Data(b"12\x00\x005678".to_vec()))));
        // DONE on a content chunk.
        let r = feed(
            READ,
            &[chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_OFFSET_DATA,
                &data(1000, b"abcdefgh"),
            )],
        );
        assert_eq!(r, Ok(Ok(Answer::Data(b"abcdefgh".to_vec()))));
    }

    #[test]
    fn error_chunks_fail_the_request() {
        let r = feed(
            READ,
            &[
                chunk(0, proto::REPLY_TYPE_OFFSET_DATA, &data(1000, b"12")),
                chunk(0, proto::REPLY_TYPE_ERROR, &err(5, "disk on fire")),
                chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[]),
            ],
        );
        assert_eq!(
            r,
            Ok(Err(ReqError::Server {
                errno: 5,
                msg: "disk on fire".into()
            }))
        );
        let mut p = err(22, "");
        p.extend_from_slice(&1004u64.to_be_bytes());
        let r = feed(
            READ,
            &[chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR_OFFSET,
                &p,
            )],
        );
        assert_eq!(
            r,
            Ok(Err(ReqError::Server {
                errno: 22,
                msg: "at offset 1004".into()
            }))
        );
        // An unknown error type still fails the request (and the stream goes on).
        let r = feed(READ, &[chunk(proto::REPLY_FLAG_DONE, 0x8077, &err(5, "x"))]);
        assert!(matches!(r, Ok(Err(ReqError::Server { errno: 5, .. }))));
        // ESHUTDOWN means reconnect, not fail.
        let r = feed(
            READ,
            &[chunk(
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_ERROR,
                &err(108, ""),
            )],
        );
        assert!(matches!(r, Ok(Err(ReqError::Lost(_)))));
    }

    #[test]
    fn hostile_read_chunks() {
        let done = |t, p: &[u8]| chunk(proto::REPLY_FLAG_DONE, t, p);
        for (what, chunks) in [
            (
                "before",
                vec![done(proto::REPLY_TYPE_OFFSET_DATA, &data(999, b"12"))],
            ),
            (
                "after",
                vec![done(proto::REPLY_TYPE_OFFSET_DATA, &data(1007, b"12"))],
            ),
            (
                "wrap",
                vec![done(proto::REPLY_TYPE_OFFSET_HOLE, &hole(u64::MAX, 2))],
            ),
            (
                "huge hole",
                vec![done(proto::REPLY_TYPE_OFFSET_HOLE, &hole(1000, u32::MAX))],
            ),
            (
                "overlap",
                vec![
                    chunk(0, proto::REPLY_TYPE_OFFSET_DATA, &data(1000, b"1234")),
                    done(proto::REPLY_TYPE_OFFSET_HOLE, &hole(1003, 2)),
                ],
            ),
            (
                "overlap before",
                vec![
                    chunk(0, proto::REPLY_TYPE_OFFSET_HOLE, &hole(1004, 2)),
                    done(proto::REPLY_TYPE_OFFSET_DATA, &data(1002, b"123")),
                ],
            ),
            (
                "short data",
                vec![done(proto::REPLY_TYPE_OFFSET_DATA, &data(1000, b""))],
            ),
            (
                "hole size",
                vec![done(proto::REPLY_TYPE_OFFSET_HOLE, &data(1000, b"1"))],
            ),
            ("none with bytes", vec![done(proto::REPLY_TYPE_NONE, b"x")]),
            ("unknown type", vec![done(77, b"")]),
            (
                "status in read",
                vec![done(proto::REPLY_TYPE_BLOCK_STATUS, &[0; 12])],
            ),
            (
                "error too short",
                vec![done(proto::REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0])],
            ),
            (
                "error message past chunk",
                vec![done(proto::REPLY_TYPE_ERROR, &[0, 0, 0, 5, 0xff, 0xff])],
            ),
        ] {
            assert!(feed(READ, &chunks).is_err(), "{what}");
        }
        // Success claimed with data missing.
        let r = feed(
            READ,
            &[done(proto::REPLY_TYPE_OFFSET_DATA, &data(1000, b"1234"))],
        );
        assert!(matches!(r, Ok(Err(ReqError::Protocol(_)))));
        // A huge length in the header with the payload missing: an I/O error, not an
        // allocation of the length.
        let mut a = Assembly::new(READ);
        let h = ReplyHeader::Chunk {
            flags: 0,
            rtype: proto::REPLY_TYPE_ERROR,
            cookie: 1,
            len: u32::MAX,
        };
        assert!(matches!(
            a.apply(&mut Cursor::new(vec![]), &h, true, None),
            Err(Fault::Protocol(_))
        ));
        let h = ReplyHeader::Chunk {
            flags: 0,
            rtype: proto::REPLY_TYPE_OFFSET_DATA,
            cookie: 1,
            len: u32::MAX,
        };
        assert!(a
            .apply(&mut Cursor::new(data(1000, b"")), &h, true, None)
            .is_err());
    }

    #[test]
    fn simple_replies() {
        let mut a = Assembly::new(READ);
        let h = ReplyHeader::Simple {
            error: 0,
            cookie: 1,
        };
        assert!(a
            .apply(&mut Cursor::new(b"abcdefgh".to_vec()), &h, false, None)
            .unwrap());
        assert_eq!(a.finish(), Ok(Answer::Data(b"abcdefgh".to_vec())));
        // Truncated payload.
        let mut a = Assembly::new(READ);
        assert!(matches!(
            a.apply(&mut Cursor::new(b"abc".to_vec()), &h, false, None),
            Err(Fault::Io(_))
        ));
        // Error: no payload follows.
        let mut a = Assembly::new(READ);
        let e = ReplyHeader::Simple {
            error: 5,
            cookie: 1,
        };
        assert!(a.apply(&mut Cursor::new(vec![]), &e, false, None).unwrap());
        assert!(matches!(a.finish(), Err(ReqError::Server { errno: 5, .. })));
        // Simple reply to a read once structured replies were agreed; chunk without.
        let mut a = Assembly::new(READ);
        assert!(a.apply(&mut Cursor::new(vec![]), &h, true, None).is_err());
        let (c, p) = chunk(1, proto::REPLY_TYPE_NONE, &[]);
        assert!(a.apply(&mut Cursor::new(p), &c, false, None).is_err());
    }

    #[test]
    fn block_status_replies() {
        let bs = Cmd::BlockStatus { off: 0, len: 4096 };
        let mut p = 3u32.to_be_bytes().to_vec();
        for v in [512u32, 0, 8192, 3] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        let r = feed(
            bs,
            &[
                chunk(0, proto::REPLY_TYPE_BLOCK_STATUS, &p),
                chunk(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, &[]),
            ],
        );
        assert_eq!(r, Ok(Ok(Answer::Extents(vec![(512, 0), (8192, 3)]))));
        // Wrong context id, two chunks, no chunk, data in a status reply.
        let mut other = p.clone();
        other[3] = 4;
        assert!(feed(bs, &[chunk(1, proto::REPLY_TYPE_BLOCK_STATUS, &other)]).is_err());
        assert!(feed(
            bs,
            &[
                chunk(0, proto::REPLY_TYPE_BLOCK_STATUS, &p),
                chunk(1, proto::REPLY_TYPE_BLOCK_STATUS, &p)
            ]
        )
        .is_err());
        assert!(matches!(
            feed(bs, &[chunk(1, proto::REPLY_TYPE_NONE, &[])]),
            Ok(Err(ReqError::Protocol(_)))
        ));
        assert!(feed(
            bs,
            &[chunk(1, proto::REPLY_TYPE_OFFSET_DATA, &data(0, b"x"))]
        )
        .is_err());
        // Huge status chunk refused before reading it.
        let mut a = Assembly::new(bs);
        let h = ReplyHeader::Chunk {
            flags: 1,
            rtype: proto::REPLY_TYPE_BLOCK_STATUS,
            cookie: 1,
            len: u32::MAX,
        };
        assert!(matches!(
            a.apply(&mut Cursor::new(vec![]), &h, true, Some(3)),
            Err(Fault::Protocol(_))
        ));
        // Simple error reply to block status is allowed.
        let mut a = Assembly::new(bs);
        let h = ReplyHeader::Simple {
            error: 22,
            cookie: 1,
        };
        assert!(a
            .apply(&mut Cursor::new(vec![]), &h, true, Some(3))
            .unwrap());
        assert!(matches!(
            a.finish(),
            Err(ReqError::Server { errno: 22, .. })
        ));
    }
}
