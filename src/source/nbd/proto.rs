//! NBD wire format (doc/proto.md of the NBD project): constants, and pure encoders and
//! decoders of the messages streamfs sends and receives. Nothing here does I/O; every
//! decoder checks lengths and magics and answers a malformed message with an error
//! message, never a panic.

use crate::source::Extent;

// Handshake.
pub const NBDMAGIC: u64 = 0x4e42_444d_4147_4943; // "NBDMAGIC"
pub const IHAVEOPT: u64 = 0x4948_4156_454f_5054; // "IHAVEOPT"
pub const OLDSTYLE_MAGIC: u64 = 0x00_4202_8186_1253;
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;

// Handshake flags (server) and client flags.
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

// Transmission flags.
pub const FLAG_HAS_FLAGS: u16 = 1 << 0;
pub const FLAG_CAN_MULTI_CONN: u16 = 1 << 8;

// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
#[allow(dead_code)] // used by the tests
pub const OPT_ABORT: u32 = 2;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_SET_META_CONTEXT: u32 = 10;

// Option reply types.
pub const REP_ACK: u32 = 1;
#[allow(dead_code)] // used by the tests
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
pub const REP_FLAG_ERROR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_FLAG_ERROR | 1;
pub const REP_ERR_POLICY: u32 = REP_FLAG_ERROR | 2;
pub const REP_ERR_INVALID: u32 = REP_FLAG_ERROR | 3;
pub const REP_ERR_PLATFORM: u32 = REP_FLAG_ERROR | 4;
pub const REP_ERR_TLS_REQD: u32 = REP_FLAG_ERROR | 5;
pub const REP_ERR_UNKNOWN: u32 = REP_FLAG_ERROR | 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_FLAG_ERROR | 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_FLAG_ERROR | 8;
pub const REP_ERR_TOO_BIG: u32 = REP_FLAG_ERROR | 9;

// Information types (NBD_OPT_GO).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_BLOCK_SIZE: u16 = 3;

// Transmission.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

pub const CMD_READ: u16 = 0;
pub const CMD_DISC: u16 = 2;
pub const CMD_BLOCK_STATUS: u16 = 7;

pub const REPLY_FLAG_DONE: u16 = 1 << 0;

pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_FLAG_ERROR: u16 = 1 << 15;
#[allow(dead_code)] // used by the tests
pub const REPLY_TYPE_ERROR: u16 = REPLY_TYPE_FLAG_ERROR | 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = REPLY_TYPE_FLAG_ERROR | 2;

// Error values.
pub const EPERM: u32 = 1;
pub const EIO: u32 = 5;
pub const ENOMEM: u32 = 12;
pub const EINVAL: u32 = 22;
pub const ENOSPC: u32 = 28;
pub const EOVERFLOW: u32 = 75;
pub const ENOTSUP: u32 = 95;
pub const ESHUTDOWN: u32 = 108;

// base:allocation.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Sizes when the server states none (proto.md, "Size constraints").
pub const DEFAULT_MIN_BLOCK: u32 = 1;
pub const DEFAULT_PREF_BLOCK: u32 = 4096;
pub const DEFAULT_MAX_PAYLOAD: u32 = 32 << 20;

/// Largest option reply payload accepted during the handshake: the replies streamfs
/// asks for are a few bytes, error messages at most 4 KiB.
pub const MAX_OPT_REPLY: u32 = 1 << 20;
/// Largest error chunk payload (4 KiB message plus fixed fields, with room).
pub const MAX_ERROR_CHUNK: u32 = 64 << 10;
/// Largest block status chunk: 2^20 descriptors (the spec's SHOULD), plus slack.
pub const MAX_STATUS_CHUNK: u32 = 4 + 8 * (1 << 21);

pub type Wire<T> = std::result::Result<T, String>;

/// The name of an NBD error value, for messages.
pub fn errno_name(e: u32) -> &'static str {
    match e {
        EPERM => "NBD_EPERM (operation not permitted)",
        EIO => "NBD_EIO (input/output error)",
        ENOMEM => "NBD_ENOMEM (cannot allocate memory)",
        EINVAL => "NBD_EINVAL (invalid argument)",
        ENOSPC => "NBD_ENOSPC (no space left on device)",
        EOVERFLOW => "NBD_EOVERFLOW (value too large)",
        ENOTSUP => "NBD_ENOTSUP (operation not supported)",
        ESHUTDOWN => "NBD_ESHUTDOWN (server shutting down)",
        _ => "an unknown NBD error",
    }
}

/// The name of an option reply error, for messages.
pub fn rep_err_name(t: u32) -> String {
    match t {
        REP_ERR_UNSUP => "NBD_REP_ERR_UNSUP (unsupported)".into(),
        REP_ERR_POLICY => "NBD_REP_ERR_POLICY (forbidden by policy)".into(),
        REP_ERR_INVALID => "NBD_REP_ERR_INVALID (invalid)".into(),
        REP_ERR_PLATFORM => "NBD_REP_ERR_PLATFORM (not supported on the platform)".into(),
        REP_ERR_TLS_REQD => "NBD_REP_ERR_TLS_REQD (TLS required)".into(),
        REP_ERR_UNKNOWN => "NBD_REP_ERR_UNKNOWN (unknown export)".into(),
        REP_ERR_SHUTDOWN => "NBD_REP_ERR_SHUTDOWN (server shutting down)".into(),
        REP_ERR_BLOCK_SIZE_REQD => "NBD_REP_ERR_BLOCK_SIZE_REQD (block size required)".into(),
        REP_ERR_TOO_BIG => "NBD_REP_ERR_TOO_BIG (too big)".into(),
        t => format!("option reply error {:#x}", t),
    }
}

/// A server's message text, made printable and bounded.
pub fn server_text(b: &[u8]) -> String {
    let s = String::from_utf8_lossy(&b[..b.len().min(4096)]);
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_string()
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}
fn be32(b: &[u8], at: usize) -> u32 {
    u32::from_be_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}
fn be64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_be_bytes(a)
}

// ---- Handshake ----

/// What follows NBDMAGIC: the second magic and the handshake flags (10 bytes).
pub fn parse_greeting(b: &[u8; 18]) -> Wire<u16> {
    if be64(b, 0) != NBDMAGIC {
        return Err(format!(
            "not an NBD server (greeting {:#018x} instead of NBDMAGIC)",
            be64(b, 0)
        ));
    }
    match be64(b, 8) {
        IHAVEOPT => Ok(be16(b, 16)),
        OLDSTYLE_MAGIC => Err(
            "the server speaks the oldstyle NBD handshake, which has no \
                               export names; streamfs needs a newstyle server"
                .into(),
        ),
        m => Err(format!("bad NBD handshake magic {m:#018x}")),
    }
}

/// An option request: IHAVEOPT, option, length, data.
pub fn encode_option(opt: u32, data: &[u8]) -> Wire<Vec<u8>> {
    let len = u32::try_from(data.len()).map_err(|_| "option data too long".to_string())?;
    let mut v = Vec::with_capacity(16 + data.len());
    v.extend_from_slice(&IHAVEOPT.to_be_bytes());
    v.extend_from_slice(&opt.to_be_bytes());
    v.extend_from_slice(&len.to_be_bytes());
    v.extend_from_slice(data);
    Ok(v)
}

/// NBD_OPT_GO data: the export name and the information requested.
pub fn encode_go(export: &str, infos: &[u16]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + export.len() + 2 * infos.len());
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(infos.len() as u16).to_be_bytes());
    for i in infos {
        v.extend_from_slice(&i.to_be_bytes());
    }
    v
}

/// NBD_OPT_SET_META_CONTEXT data: the export name and the queries.
pub fn encode_meta_context(export: &str, queries: &[&str]) -> Vec<u8> {
    let mut v = Vec::new();
    v.extend_from_slice(&(export.len() as u32).to_be_bytes());
    v.extend_from_slice(export.as_bytes());
    v.extend_from_slice(&(queries.len() as u32).to_be_bytes());
    for q in queries {
        v.extend_from_slice(&(q.len() as u32).to_be_bytes());
        v.extend_from_slice(q.as_bytes());
    }
    v
}

/// The fixed part of an option reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptReply {
    pub option: u32,
    pub rtype: u32,
    pub len: u32,
}

/// Decodes an option reply header, checking it answers `sent` and its length is sane.
pub fn parse_opt_reply(b: &[u8; 20], sent: u32) -> Wire<OptReply> {
    let magic = be64(b, 0);
    if magic != OPT_REPLY_MAGIC {
        return Err(format!("bad option reply magic {magic:#018x}"));
    }
    let r = OptReply {
        option: be32(b, 8),
        rtype: be32(b, 12),
        len: be32(b, 16),
    };
    if r.option != sent {
        return Err(format!(
            "the server answered option {} to option {sent}",
            r.option
        ));
    }
    if r.len > MAX_OPT_REPLY {
        return Err(format!(
            "option reply of {} bytes (the limit is {MAX_OPT_REPLY})",
            r.len
        ));
    }
    Ok(r)
}

/// An NBD_REP_INFO payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Info {
    Export { size: u64, flags: u16 },
    BlockSize { min: u32, pref: u32, max: u32 },
    Other(u16),
}

pub fn parse_info(p: &[u8]) -> Wire<Info> {
    if p.len() < 2 {
        return Err(format!("NBD_REP_INFO of {} bytes", p.len()));
    }
    match be16(p, 0) {
        INFO_EXPORT if p.len() == 12 => Ok(Info::Export {
            size: be64(p, 2),
            flags: be16(p, 10),
        }),
        INFO_EXPORT => Err(format!("NBD_INFO_EXPORT of {} bytes, not 12", p.len())),
        INFO_BLOCK_SIZE if p.len() == 14 => Ok(Info::BlockSize {
            min: be32(p, 2),
            pref: be32(p, 6),
            max: be32(p, 10),
        }),
        INFO_BLOCK_SIZE => Err(format!("NBD_INFO_BLOCK_SIZE of {} bytes, not 14", p.len())),
        t => Ok(Info::Other(t)),
    }
}

/// Checks the block size constraints of NBD_INFO_BLOCK_SIZE (proto.md "Size
/// constraints"): returns them, or why they cannot be honoured.
pub fn check_block_size(min: u32, pref: u32, max: u32) -> Wire<(u32, u32, u32)> {
    if min == 0 || !min.is_power_of_two() || min > 65536 {
        return Err(format!("invalid minimum block size {min}"));
    }
    if max < min {
        return Err(format!(
            "maximum payload {max} below the minimum block size {min}"
        ));
    }
    // The preferred size is a hint: an odd one is ignored rather than refused.
    let pref = if pref.is_power_of_two() && pref >= min {
        pref
    } else {
        min.max(DEFAULT_PREF_BLOCK.min(max))
    };
    Ok((min, pref, max))
}

/// An NBD_REP_META_CONTEXT payload: the context id and name.
pub fn parse_meta_context(p: &[u8]) -> Wire<(u32, String)> {
    if p.len() < 4 {
        return Err(format!("NBD_REP_META_CONTEXT of {} bytes", p.len()));
    }
    Ok((be32(p, 0), String::from_utf8_lossy(&p[4..]).into_owned()))
}

/// The reply to NBD_OPT_EXPORT_NAME: size and transmission flags (10 bytes, then 124
/// zeros unless NO_ZEROES was agreed).
pub fn parse_export_name_reply(b: &[u8; 10]) -> (u64, u16) {
    (be64(b, 0), be16(b, 8))
}

// ---- Transmission ----

/// A request header (no write payload: streamfs only reads).
pub fn encode_request(flags: u16, cmd: u16, cookie: u64, off: u64, len: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&cmd.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&off.to_be_bytes());
    b[24..28].copy_from_slice(&len.to_be_bytes());
    b
}

/// The header of a reply message, after its 4-byte magic told which kind it is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyHeader {
    Simple {
        error: u32,
        cookie: u64,
    },
    Chunk {
        flags: u16,
        rtype: u16,
        cookie: u64,
        len: u32,
    },
}

impl ReplyHeader {
    pub fn cookie(&self) -> u64 {
        match *self {
            ReplyHeader::Simple { cookie, .. } | ReplyHeader::Chunk { cookie, .. } => cookie,
        }
    }
}

/// How many bytes follow a reply magic before the payload: 12 for a simple reply, 16
/// for a structured chunk.
pub fn reply_rest_len(magic: u32) -> Wire<usize> {
    match magic {
        SIMPLE_REPLY_MAGIC => Ok(12),
        STRUCTURED_REPLY_MAGIC => Ok(16),
        m => Err(format!("bad reply magic {m:#010x}")),
    }
}

/// Decodes the bytes after the magic (`reply_rest_len(magic)` of them).
pub fn parse_reply_header(magic: u32, rest: &[u8]) -> Wire<ReplyHeader> {
    let want = reply_rest_len(magic)?;
    if rest.len() != want {
        return Err(format!("reply header of {} bytes", rest.len() + 4));
    }
    Ok(if magic == SIMPLE_REPLY_MAGIC {
        ReplyHeader::Simple {
            error: be32(rest, 0),
            cookie: be64(rest, 4),
        }
    } else {
        ReplyHeader::Chunk {
            flags: be16(rest, 0),
            rtype: be16(rest, 2),
            cookie: be64(rest, 4),
            len: be32(rest, 12),
        }
    })
}

/// An error chunk: error value, message and, for ERROR_OFFSET, the offset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkError {
    pub errno: u32,
    pub msg: String,
    pub offset: Option<u64>,
}

/// Decodes an error chunk's payload (any type with bit 15 set).
pub fn parse_error_chunk(rtype: u16, p: &[u8]) -> Wire<ChunkError> {
    if p.len() < 6 {
        return Err(format!("error chunk of {} bytes (at least 6)", p.len()));
    }
    let errno = be32(p, 0);
    let mlen = be16(p, 4) as usize;
    if 6 + mlen > p.len() {
        return Err(format!(
            "error chunk message of {mlen} bytes in a {}-byte chunk",
            p.len()
        ));
    }
    let msg = server_text(&p[6..6 + mlen]);
    let offset = if rtype == REPLY_TYPE_ERROR_OFFSET {
        if p.len() != 6 + mlen + 8 {
            return Err(format!(
                "NBD_REPLY_TYPE_ERROR_OFFSET of {} bytes with a {mlen}-byte message",
                p.len()
            ));
        }
        Some(be64(p, 6 + mlen))
    } else {
        None
    };
    // An error chunk with error 0 is broken, but still an error (spec: MUST be nonzero).
    Ok(ChunkError {
        errno: if errno == 0 { EIO } else { errno },
        msg,
        offset,
    })
}

/// An NBD_REPLY_TYPE_OFFSET_HOLE payload: offset and size.
pub fn parse_hole(p: &[u8]) -> Wire<(u64, u32)> {
    if p.len() != 12 {
        return Err(format!(
            "NBD_REPLY_TYPE_OFFSET_HOLE of {} bytes, not 12",
            p.len()
        ));
    }
    let len = be32(p, 8);
    if len == 0 {
        return Err("empty NBD_REPLY_TYPE_OFFSET_HOLE".into());
    }
    Ok((be64(p, 0), len))
}

/// The 8-byte offset that starts an NBD_REPLY_TYPE_OFFSET_DATA payload.
pub fn parse_data_offset(p: &[u8; 8]) -> u64 {
    u64::from_be_bytes(*p)
}

/// An NBD_REPLY_TYPE_BLOCK_STATUS payload: context id and (length, flags) descriptors.
pub fn parse_block_status(p: &[u8]) -> Wire<(u32, Vec<(u32, u32)>)> {
    if p.len() < 12 || !(p.len() - 4).is_multiple_of(8) {
        return Err(format!(
            "NBD_REPLY_TYPE_BLOCK_STATUS of {} bytes (4 + a positive multiple of 8)",
            p.len()
        ));
    }
    let id = be32(p, 0);
    let mut v = Vec::with_capacity((p.len() - 4) / 8);
    for d in p[4..].chunks_exact(8) {
        let len = be32(d, 0);
        if len == 0 {
            return Err("block status descriptor of length 0".into());
        }
        v.push((len, be32(d, 4)));
    }
    Ok((id, v))
}

/// What base:allocation flags mean for streamfs.
pub fn extent_of(flags: u32) -> Extent {
    if flags & STATE_HOLE != 0 {
        Extent::Hole
    } else if flags & STATE_ZERO != 0 {
        Extent::Zero
    } else {
        Extent::Data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opt_reply(option: u32, rtype: u32, len: u32) -> [u8; 20] {
        let mut b = [0u8; 20];
        b[0..8].copy_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
        b[8..12].copy_from_slice(&option.to_be_bytes());
        b[12..16].copy_from_slice(&rtype.to_be_bytes());
        b[16..20].copy_from_slice(&len.to_be_bytes());
        b
    }

    #[test]
    fn greeting() {
        let mut b = [0u8; 18];
        b[0..8].copy_from_slice(b"NBDMAGIC");
        b[8..16].copy_from_slice(b"IHAVEOPT");
        b[16..18].copy_from_slice(&3u16.to_be_bytes());
        assert_eq!(parse_greeting(&b), Ok(3));
        b[8..16].copy_from_slice(&OLDSTYLE_MAGIC.to_be_bytes());
        assert!(parse_greeting(&b).unwrap_err().contains("oldstyle"));
        b[0] = b'X';
        assert!(parse_greeting(&b)
            .unwrap_err()
            .contains("not an NBD server"));
    }

    #[test]
    fn option_encoding() {
        let v = encode_option(OPT_GO, &encode_go("exp", &[INFO_BLOCK_SIZE])).unwrap();
        let mut want = b"IHAVEOPT".to_vec();
        want.extend_from_slice(&[0, 0, 0, 7, 0, 0, 0, 11, 0, 0, 0, 3]);
        want.extend_from_slice(b"exp");
        want.extend_from_slice(&[0, 1, 0, 3]);
        assert_eq!(v, want);
        let m = encode_meta_context("", &[META_BASE_ALLOCATION]);
        let mut want = vec![0, 0, 0, 0, 0, 0, 0, 1, 0, 0, 0, 15];
        want.extend_from_slice(b"base:allocation");
        assert_eq!(m, want);
    }

    #[test]
    fn option_replies() {
        let r = parse_opt_reply(&opt_reply(OPT_GO, REP_INFO, 12), OPT_GO).unwrap();
        assert_eq!((r.rtype, r.len), (REP_INFO, 12));
        // Wrong option, wrong magic, hostile length.
        assert!(parse_opt_reply(&opt_reply(OPT_ABORT, REP_ACK, 0), OPT_GO).is_err());
        let mut b = opt_reply(OPT_GO, REP_ACK, 0);
        b[0] ^= 1;
        assert!(parse_opt_reply(&b, OPT_GO).unwrap_err().contains("magic"));
        assert!(parse_opt_reply(&opt_reply(OPT_GO, REP_INFO, u32::MAX), OPT_GO).is_err());
    }

    #[test]
    fn infos() {
        let mut p = vec![0, 0];
        p.extend_from_slice(&(1u64 << 40).to_be_bytes());
        p.extend_from_slice(&0x0103u16.to_be_bytes());
        assert_eq!(
            parse_info(&p),
            Ok(Info::Export {
                size: 1 << 40,
                flags: 0x103
            })
        );
        assert!(parse_info(&p[..11]).is_err());
        assert!(parse_info(&[]).is_err());
        assert!(parse_info(&[0]).is_err());
        let mut p = vec![0, 3];
        for v in [512u32, 4096, 1 << 20] {
            p.extend_from_slice(&v.to_be_bytes());
        }
        assert_eq!(
            parse_info(&p),
            Ok(Info::BlockSize {
                min: 512,
                pref: 4096,
                max: 1 << 20
            })
        );
        p.push(0);
        assert!(parse_info(&p).is_err());
        assert_eq!(parse_info(&[0, 9, 1, 2, 3]), Ok(Info::Other(9)));
        assert_eq!(parse_info(&[0, 1]), Ok(Info::Other(1)));
    }

    #[test]
    fn block_size_checks() {
        assert_eq!(
            check_block_size(512, 4096, 1 << 25),
            Ok((512, 4096, 1 << 25))
        );
        assert!(check_block_size(0, 4096, 1 << 25).is_err());
        assert!(check_block_size(3, 4096, 1 << 25).is_err());
        assert!(check_block_size(1 << 17, 1 << 17, 1 << 25).is_err());
        assert!(check_block_size(4096, 4096, 512).is_err());
        assert_eq!(check_block_size(1, 3, u32::MAX), Ok((1, 4096, u32::MAX)));
    }

    #[test]
    fn meta_context() {
        let mut p = 7u32.to_be_bytes().to_vec();
        p.extend_from_slice(b"base:allocation");
        assert_eq!(parse_meta_context(&p), Ok((7, "base:allocation".into())));
        assert!(parse_meta_context(&p[..3]).is_err());
    }

    #[test]
    fn request_encoding() {
        let b = encode_request(0, CMD_READ, 0x0102030405060708, 4096, 512);
        assert_eq!(&b[0..4], &[0x25, 0x60, 0x95, 0x13]);
        assert_eq!(&b[4..8], &[0, 0, 0, 0]);
        assert_eq!(&b[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&b[16..24], &4096u64.to_be_bytes());
        assert_eq!(&b[24..28], &512u32.to_be_bytes());
    }

    #[test]
    fn reply_headers() {
        assert!(reply_rest_len(0xdeadbeef).unwrap_err().contains("magic"));
        let mut rest = 5u32.to_be_bytes().to_vec();
        rest.extend_from_slice(&9u64.to_be_bytes());
        assert_eq!(
            parse_reply_header(SIMPLE_REPLY_MAGIC, &rest),
            Ok(ReplyHeader::Simple {
                error: 5,
                cookie: 9
            })
        );
        assert!(parse_reply_header(SIMPLE_REPLY_MAGIC, &rest[..11]).is_err());
        let mut rest = vec![0, 1, 0, 2];
        rest.extend_from_slice(&9u64.to_be_bytes());
        rest.extend_from_slice(&12u32.to_be_bytes());
        let h = parse_reply_header(STRUCTURED_REPLY_MAGIC, &rest).unwrap();
        assert_eq!(
            h,
            ReplyHeader::Chunk {
                flags: 1,
                rtype: 2,
                cookie: 9,
                len: 12
            }
        );
        assert_eq!(h.cookie(), 9);
        assert!(parse_reply_header(STRUCTURED_REPLY_MAGIC, &rest[..12]).is_err());
        assert!(parse_reply_header(1, &rest).is_err());
    }

    #[test]
    fn error_chunks() {
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&4u16.to_be_bytes());
        p.extend_from_slice(b"oops");
        let e = parse_error_chunk(REPLY_TYPE_ERROR, &p).unwrap();
        assert_eq!((e.errno, e.msg.as_str(), e.offset), (5, "oops", None));
        // Message longer than the chunk.
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &p[..9]).is_err());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &p[..5]).is_err());
        // ERROR_OFFSET needs its offset after the message.
        assert!(parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).is_err());
        p.extend_from_slice(&4096u64.to_be_bytes());
        let e = parse_error_chunk(REPLY_TYPE_ERROR_OFFSET, &p).unwrap();
        assert_eq!(e.offset, Some(4096));
        // Zero error value is still an error; control characters are blanked.
        let mut p = 0u32.to_be_bytes().to_vec();
        p.extend_from_slice(&3u16.to_be_bytes());
        p.extend_from_slice(b"a\nb");
        let e = parse_error_chunk(REPLY_TYPE_FLAG_ERROR | 77, &p).unwrap();
        assert_eq!((e.errno, e.msg.as_str()), (EIO, "a b"));
        // Huge message length field.
        let mut p = 5u32.to_be_bytes().to_vec();
        p.extend_from_slice(&u16::MAX.to_be_bytes());
        assert!(parse_error_chunk(REPLY_TYPE_ERROR, &p).is_err());
    }

    #[test]
    fn holes() {
        let mut p = 512u64.to_be_bytes().to_vec();
        p.extend_from_slice(&1024u32.to_be_bytes());
        assert_eq!(parse_hole(&p), Ok((512, 1024)));
        assert!(parse_hole(&p[..11]).is_err());
        p[8..12].copy_from_slice(&[0; 4]);
        assert!(parse_hole(&p).is_err());
    }

    #[test]
    fn block_status_payload() {
        let mut p = 1u32.to_be_bytes().to_vec();
        for (l, f) in [(4096u32, 0u32), (8192, 3), (512, 2), (512, 1)] {
            p.extend_from_slice(&l.to_be_bytes());
            p.extend_from_slice(&f.to_be_bytes());
        }
        let (id, d) = parse_block_status(&p).unwrap();
        assert_eq!(id, 1);
        assert_eq!(d, vec![(4096, 0), (8192, 3), (512, 2), (512, 1)]);
        let kinds: Vec<_> = d.iter().map(|&(_, f)| extent_of(f)).collect();
        assert_eq!(
            kinds,
            vec![Extent::Data, Extent::Hole, Extent::Zero, Extent::Hole]
        );
        assert_eq!(extent_of(0xfffc), Extent::Data, "unknown flags are ignored");
        assert!(parse_block_status(&p[..4]).is_err(), "no descriptor");
        assert!(parse_block_status(&p[..13]).is_err(), "partial descriptor");
        let mut z = 1u32.to_be_bytes().to_vec();
        z.extend_from_slice(&[0; 8]);
        assert!(parse_block_status(&z).is_err(), "zero length");
    }

    #[test]
    fn server_text_is_bounded_and_printable() {
        assert_eq!(server_text(b"\x1b[31mred\x00"), "[31mred");
        assert_eq!(server_text(&vec![b'a'; 10000]).len(), 4096);
        assert_eq!(server_text(&[0xff, b'x']), "\u{fffd}x");
    }
}
