//! The fixed newstyle handshake: structured replies, the base:allocation context, then
//! NBD_OPT_GO with block sizes (falling back to NBD_OPT_EXPORT_NAME for old servers).

use std::io::{self, Read, Write};

use super::proto::{self, Info, Wire};
use super::socket::io_text;

/// What the handshake agreed on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExportInfo {
    pub size: u64,
    pub flags: u16,
    pub min_block: u32,
    pub pref_block: u32,
    pub max_payload: u32,
    /// Structured replies were agreed.
    pub structured: bool,
    /// The id of base:allocation, when the server selected it.
    pub meta_id: Option<u32>,
}

impl ExportInfo {
    pub fn multi_conn(&self) -> bool {
        self.flags & proto::FLAG_CAN_MULTI_CONN != 0
    }
}

fn io_err(e: io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => {
            "the server closed the connection during the handshake".into()
        }
        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
            "no answer from the server during the handshake".into()
        }
        _ => format!("handshake failed: {}", io_text(&e)),
    }
}

fn read_n<S: Read, const N: usize>(s: &mut S) -> Wire<[u8; N]> {
    let mut b = [0u8; N];
    s.read_exact(&mut b).map_err(io_err)?;
    Ok(b)
}

fn read_vec<S: Read>(s: &mut S, len: u32) -> Wire<Vec<u8>> {
    let mut v = vec![0u8; len as usize];
    s.read_exact(&mut v).map_err(io_err)?;
    Ok(v)
}

fn send_option<S: Write>(s: &mut S, opt: u32, data: &[u8]) -> Wire<()> {
    let b = proto::encode_option(opt, data)?;
    s.write_all(&b).and_then(|_| s.flush()).map_err(io_err)
}

/// One option reply: its type and payload.
fn read_reply<S: Read>(s: &mut S, opt: u32) -> Wire<(u32, Vec<u8>)> {
    let h = proto::parse_opt_reply(&read_n::<S, 20>(s)?, opt)?;
    Ok((h.rtype, read_vec(s, h.len)?))
}

fn refusal(what: &str, rtype: u32, payload: &[u8]) -> String {
    let msg = proto::server_text(payload);
    let name = proto::rep_err_name(rtype);
    if msg.is_empty() {
        format!("the server refused {what}: {name}")
    } else {
        format!("the server refused {what}: {name}: {msg}")
    }
}

fn unknown_export(export: &str, payload: &[u8]) -> String {
    let msg = proto::server_text(payload);
    format!(
        "export '{}' is not offered by the server: {}",
        export,
        if msg.is_empty() {
            "NBD_REP_ERR_UNKNOWN"
        } else {
            &msg
        }
    )
}

/// Runs the handshake for `export` on a fresh connection.
pub fn negotiate<S: Read + Write>(s: &mut S, export: &str) -> Wire<ExportInfo> {
    if export.len() > 4096 {
        return Err("export name longer than 4096 bytes".into());
    }
    let hflags = proto::parse_greeting(&read_n::<S, 18>(s)?)?;
    let fixed = hflags & proto::FLAG_FIXED_NEWSTYLE != 0;
    let no_zeroes = hflags & proto::FLAG_NO_ZEROES != 0;
    let mut cflags = 0;
    if fixed {
        cflags |= proto::FLAG_C_FIXED_NEWSTYLE;
    }
    if no_zeroes {
        cflags |= proto::FLAG_C_NO_ZEROES;
    }
    s.write_all(&cflags.to_be_bytes()).map_err(io_err)?;
    if !fixed {
        log::info!("NBD server without fixed newstyle: plain NBD_OPT_EXPORT_NAME");
        return export_name(s, export, no_zeroes, false, None);
    }

    // Structured replies.
    send_option(s, proto::OPT_STRUCTURED_REPLY, &[])?;
    let structured = match read_reply(s, proto::OPT_STRUCTURED_REPLY)? {
        (proto::REP_ACK, _) => true,
        (t, p) if t & proto::REP_FLAG_ERROR != 0 => {
            log::info!(
                "NBD server: no structured replies ({}): simple replies",
                refusal("NBD_OPT_STRUCTURED_REPLY", t, &p)
            );
            false
        }
        (t, _) => return Err(format!("reply type {t} to NBD_OPT_STRUCTURED_REPLY")),
    };

    // base:allocation, which needs structured replies.
    let mut meta_id = None;
    if structured {
        let data = proto::encode_meta_context(export, &[proto::META_BASE_ALLOCATION]);
        send_option(s, proto::OPT_SET_META_CONTEXT, &data)?;
        let mut got = None;
        loop {
            match read_reply(s, proto::OPT_SET_META_CONTEXT)? {
                (proto::REP_META_CONTEXT, p) => {
                    let (id, name) = proto::parse_meta_context(&p)?;
                    if name == proto::META_BASE_ALLOCATION {
                        got = Some(id);
                    } else {
                        log::debug!("NBD server selected an unasked context '{name}'");
                    }
                }
                (proto::REP_ACK, _) => {
                    meta_id = got;
                    break;
                }
                (proto::REP_ERR_UNKNOWN, p) => return Err(unknown_export(export, &p)),
                (t, p) if t & proto::REP_FLAG_ERROR != 0 => {
                    log::info!(
                        "NBD server: no block status ({}): all data",
                        refusal("base:allocation", t, &p)
                    );
                    break;
                }
                (t, _) => return Err(format!("reply type {t} to NBD_OPT_SET_META_CONTEXT")),
            }
        }
        if meta_id.is_none() {
            log::info!("NBD server has no base:allocation for '{export}': all data");
        }
    }

    // Go, asking for the block sizes (the export info comes anyway).
    let data = proto::encode_go(export, &[proto::INFO_BLOCK_SIZE]);
    send_option(s, proto::OPT_GO, &data)?;
    let mut export_info = None;
    let mut sizes = None;
    loop {
        match read_reply(s, proto::OPT_GO)? {
            (proto::REP_INFO, p) => match proto::parse_info(&p)? {
                Info::Export { size, flags } => export_info = Some((size, flags)),
                Info::BlockSize { min, pref, max } => {
                    sizes = Some(proto::check_block_size(min, pref, max)?)
                }
                Info::Other(t) => log::debug!("NBD server sent info type {t}: ignored"),
            },
            (proto::REP_ACK, _) => break,
            (proto::REP_ERR_UNSUP, _) => {
                log::info!("NBD server has no NBD_OPT_GO: NBD_OPT_EXPORT_NAME");
                return export_name(s, export, no_zeroes, structured, meta_id);
            }
            (proto::REP_ERR_UNKNOWN, p) => return Err(unknown_export(export, &p)),
            (proto::REP_ERR_TLS_REQD, _) => {
                return Err(format!(
                    "the server requires TLS for export '{export}', which streamfs does not speak"
                ))
            }
            (t, p) if t & proto::REP_FLAG_ERROR != 0 => {
                return Err(refusal(&format!("export '{export}'"), t, &p))
            }
            (t, _) => return Err(format!("reply type {t} to NBD_OPT_GO")),
        }
    }
    let (size, flags) =
        export_info.ok_or("the server accepted NBD_OPT_GO without NBD_INFO_EXPORT")?;
    let (min, pref, max) = sizes.unwrap_or((
        proto::DEFAULT_MIN_BLOCK,
        proto::DEFAULT_PREF_BLOCK,
        proto::DEFAULT_MAX_PAYLOAD,
    ));
    finish(size, flags, (min, pref, max), structured, meta_id)
}

/// NBD_OPT_EXPORT_NAME: no error reply possible (an unknown export closes the
/// connection).
fn export_name<S: Read + Write>(
    s: &mut S,
    export: &str,
    no_zeroes: bool,
    structured: bool,
    meta_id: Option<u32>,
) -> Wire<ExportInfo> {
    send_option(s, proto::OPT_EXPORT_NAME, export.as_bytes())?;
    let b = read_n::<S, 10>(s).map_err(|e| {
        format!("{e} (after NBD_OPT_EXPORT_NAME: the export '{export}' may not exist)")
    })?;
    let (size, flags) = proto::parse_export_name_reply(&b);
    if !no_zeroes {
        read_n::<S, 124>(s)?;
    }
    finish(
        size,
        flags,
        (
            proto::DEFAULT_MIN_BLOCK,
            proto::DEFAULT_PREF_BLOCK,
            proto::DEFAULT_MAX_PAYLOAD,
        ),
        structured,
        meta_id,
    )
}

fn finish(
    size: u64,
    flags: u16,
    (min, pref, max): (u32, u32, u32),
    structured: bool,
    meta_id: Option<u32>,
) -> Wire<ExportInfo> {
    if flags & proto::FLAG_HAS_FLAGS == 0 {
        return Err(format!(
            "transmission flags {flags:#x} lack NBD_FLAG_HAS_FLAGS"
        ));
    }
    if size > i64::MAX as u64 {
        return Err(format!("export size {size} is too large"));
    }
    // Reads are split at the payload limit, at most 32 MiB, in whole minimum blocks.
    let max = max.min(proto::DEFAULT_MAX_PAYLOAD) / min * min;
    let info = ExportInfo {
        size,
        flags,
        min_block: min,
        pref_block: pref,
        max_payload: max,
        structured,
        meta_id,
    };
    log::debug!("NBD export agreed: {info:?}");
    Ok(info)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Cursor;

    /// A server that says its script and records what the client sends.
    struct Scripted {
        input: Cursor<Vec<u8>>,
        sent: Vec<u8>,
    }
    impl Read for Scripted {
        fn read(&mut self, b: &mut [u8]) -> io::Result<usize> {
            self.input.read(b)
        }
    }
    impl Write for Scripted {
        fn write(&mut self, b: &[u8]) -> io::Result<usize> {
            self.sent.extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    fn greeting(flags: u16) -> Vec<u8> {
        let mut v = b"NBDMAGICIHAVEOPT".to_vec();
        v.extend_from_slice(&flags.to_be_bytes());
        v
    }
    fn rep(v: &mut Vec<u8>, opt: u32, t: u32, p: &[u8]) {
        v.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&opt.to_be_bytes());
        v.extend_from_slice(&t.to_be_bytes());
        v.extend_from_slice(&(p.len() as u32).to_be_bytes());
        v.extend_from_slice(p);
    }
    fn info_export(size: u64, flags: u16) -> Vec<u8> {
        let mut p = vec![0, 0];
        p.extend_from_slice(&size.to_be_bytes());
        p.extend_from_slice(&flags.to_be_bytes());
        p
    }
    fn info_bs(min: u32, pref: u32, max: u32) -> Vec<u8> {
        let mut p = vec![0, 3];
        for x in [min, pref, max] {
            p.extend_from_slice(&x.to_be_bytes());
        }
        p
    }
    fn run(input: Vec<u8>) -> (Wire<ExportInfo>, Vec<u8>) {
        let mut s = Scripted {
            input: Cursor::new(input),
            sent: vec![],
        };
        let r = negotiate(&mut s, "exp");
        (r, s.sent)
    }

    #[test]
    fn full_handshake_infos_in_any_order() {
        let mut v = greeting(3);
        rep(&mut v, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
        let mut mc = 5u32.to_be_bytes().to_vec();
        mc.extend_from_slice(b"base:allocation");
        rep(
            &mut v,
            proto::OPT_SET_META_CONTEXT,
            proto::REP_META_CONTEXT,
            &mc,
        );
        rep(&mut v, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
        rep(
            &mut v,
            proto::OPT_GO,
            proto::REP_INFO,
            &info_bs(512, 4096, 1 << 20),
        );
        rep(&mut v, proto::OPT_GO, proto::REP_INFO, &[0, 2, b'h', b'i']);
        rep(
            &mut v,
            proto::OPT_GO,
            proto::REP_INFO,
            &info_export(1 << 30, 0x101),
        );
        rep(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
        let (r, sent) = run(v);
        let i = r.unwrap();
        assert_eq!(
            i,
            ExportInfo {
                size: 1 << 30,
                flags: 0x101,
                min_block: 512,
                pref_block: 4096,
                max_payload: 1 << 20,
                structured: true,
                meta_id: Some(5),
            }
        );
        assert!(i.multi_conn());
        // Client flags: fixed newstyle and no zeroes.
        assert_eq!(&sent[..4], &[0, 0, 0, 3]);
        assert_eq!(&sent[4..12], b"IHAVEOPT");
    }

    #[test]
    fn fallbacks_when_options_are_unsupported() {
        let mut v = greeting(1);
        rep(
            &mut v,
            proto::OPT_STRUCTURED_REPLY,
            proto::REP_ERR_UNSUP,
            &[],
        );
        rep(&mut v, proto::OPT_GO, proto::REP_ERR_UNSUP, b"old");
        v.extend_from_slice(&4096u64.to_be_bytes());
        v.extend_from_slice(&1u16.to_be_bytes());
        v.extend_from_slice(&[0; 124]);
        let (r, sent) = run(v);
        let i = r.unwrap();
        assert_eq!((i.size, i.structured, i.meta_id), (4096, false, None));
        assert_eq!(i.max_payload, proto::DEFAULT_MAX_PAYLOAD);
        assert_eq!(&sent[..4], &[0, 0, 0, 1], "no NO_ZEROES unless offered");
    }

    #[test]
    fn meta_context_refused_means_all_data() {
        let mut v = greeting(3);
        rep(&mut v, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
        rep(
            &mut v,
            proto::OPT_SET_META_CONTEXT,
            proto::REP_ERR_UNSUP,
            &[],
        );
        rep(&mut v, proto::OPT_GO, proto::REP_INFO, &info_export(10, 1));
        rep(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
        let i = run(v).0.unwrap();
        assert_eq!((i.structured, i.meta_id), (true, None));
        // A huge maximum payload is capped at 32 MiB.
        let mut v = greeting(3);
        rep(&mut v, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
        rep(&mut v, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
        rep(&mut v, proto::OPT_GO, proto::REP_INFO, &info_export(10, 1));
        rep(
            &mut v,
            proto::OPT_GO,
            proto::REP_INFO,
            &info_bs(4096, 4096, u32::MAX),
        );
        rep(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
        let i = run(v).0.unwrap();
        assert_eq!((i.meta_id, i.max_payload), (None, 32 << 20));
    }

    #[test]
    fn unknown_export_is_a_clear_error() {
        let mut v = greeting(3);
        rep(&mut v, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
        rep(&mut v, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
        rep(
            &mut v,
            proto::OPT_GO,
            proto::REP_ERR_UNKNOWN,
            b"no such export",
        );
        let e = run(v).0.unwrap_err();
        assert_eq!(
            e,
            "export 'exp' is not offered by the server: no such export"
        );
    }

    #[test]
    fn hostile_handshakes_are_errors() {
        let ok_start = || {
            let mut v = greeting(3);
            rep(&mut v, proto::OPT_STRUCTURED_REPLY, proto::REP_ACK, &[]);
            rep(&mut v, proto::OPT_SET_META_CONTEXT, proto::REP_ACK, &[]);
            v
        };
        // Truncated everywhere.
        let mut full = ok_start();
        rep(
            &mut full,
            proto::OPT_GO,
            proto::REP_INFO,
            &info_export(10, 1),
        );
        rep(&mut full, proto::OPT_GO, proto::REP_ACK, &[]);
        assert!(run(full.clone()).0.is_ok());
        for cut in 0..full.len() {
            let e = run(full[..cut].to_vec()).0.unwrap_err();
            assert!(e.contains("closed the connection"), "{cut}: {e}");
        }
        // ACK without NBD_INFO_EXPORT.
        let mut v = ok_start();
        rep(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
        assert!(run(v).0.unwrap_err().contains("NBD_INFO_EXPORT"));
        // Huge reply length.
        let mut v = ok_start();
        v.extend_from_slice(&proto::OPT_REPLY_MAGIC.to_be_bytes());
        v.extend_from_slice(&proto::OPT_GO.to_be_bytes());
        v.extend_from_slice(&proto::REP_INFO.to_be_bytes());
        v.extend_from_slice(&u32::MAX.to_be_bytes());
        assert!(run(v).0.unwrap_err().contains("bytes"));
        // Bad block sizes, bad info length, no HAS_FLAGS, odd reply type.
        for (t, p) in [
            (proto::REP_INFO, info_bs(3, 4096, 1 << 20)),
            (proto::REP_INFO, vec![0, 0, 1]),
            (proto::REP_SERVER, vec![]),
        ] {
            let mut v = ok_start();
            rep(&mut v, proto::OPT_GO, t, &p);
            assert!(run(v).0.is_err());
        }
        let mut v = ok_start();
        rep(&mut v, proto::OPT_GO, proto::REP_INFO, &info_export(10, 0));
        rep(&mut v, proto::OPT_GO, proto::REP_ACK, &[]);
        assert!(run(v).0.unwrap_err().contains("HAS_FLAGS"));
        // Not an NBD server at all.
        assert!(run(b"HTTP/1.1 400 Bad Request\r\n\r\n".to_vec())
            .0
            .unwrap_err()
            .contains("not an NBD server"));
        // Other refusals name the reason.
        let mut v = ok_start();
        rep(&mut v, proto::OPT_GO, proto::REP_ERR_POLICY, b"go away");
        let e = run(v).0.unwrap_err();
        assert!(e.contains("POLICY") && e.contains("go away"), "{e}");
    }
}
