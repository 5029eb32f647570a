//! `NbdSource` against the scripted server of `fake`: what real servers never do.

use super::fake::{self, byte, chunk, data_chunk, error_chunk, Req};
use super::*;
use std::io::Write;
use std::os::unix::net::UnixStream;

const SIZE: u64 = 1 << 20;

fn open(f: &fake::Fake, timeout_ms: u64) -> NbdSource {
    let o = RemoteOptions {
        timeout: Duration::from_millis(timeout_ms),
        ..RemoteOptions::default()
    };
    NbdSource::connect(&f.addr, &o).unwrap()
}

fn good(s: &mut UnixStream, r: Req) -> bool {
    data_chunk(s, proto::REPLY_FLAG_DONE, r.cookie, r.off, r.len);
    true
}

fn read(src: &NbdSource, off: u64, len: usize) -> Result<Vec<u8>> {
    let mut b = vec![0xeeu8; len];
    let n = src.read_at(&mut b, off)?;
    assert_eq!(n, len.min(SIZE.saturating_sub(off) as usize));
    Ok(b)
}

fn expect(off: u64, len: usize) -> Vec<u8> {
    (off..off + len as u64)
        .map(|o| if o < SIZE { byte(o) } else { 0 })
        .collect()
}

#[test]
fn chunks_out_of_order_with_holes() {
    let f = fake::serve(
        true,
        SIZE,
        Box::new(|s, r| {
            // Second half first, then a hole of 8 bytes, then the first part.
            let half = r.len / 2;
            data_chunk(s, 0, r.cookie, r.off + half as u64, r.len - half);
            let mut p = r.off.to_be_bytes().to_vec();
            p.extend_from_slice(&8u32.to_be_bytes());
            chunk(s, 0, proto::REPLY_TYPE_OFFSET_HOLE, r.cookie, &p);
            data_chunk(s, 0, r.cookie, r.off + 8, half - 8);
            chunk(
                s,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_NONE,
                r.cookie,
                &[],
            );
            true
        }),
    );
    let src = open(&f, 5000);
    let got = read(&src, 1000, 100).unwrap();
    let mut want = expect(1000, 100);
    want[..8].fill(0);
    assert_eq!(got, want);
}

#[test]
fn bad_magic_and_unknown_cookie_drop_the_connection_not_the_process() {
    for bad in [0u8, 1] {
        let f = fake::serve(
            true,
            SIZE,
            Box::new(move |s, r| {
                if bad == 0 {
                    let _ = s.write_all(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
                } else {
                    data_chunk(s, proto::REPLY_FLAG_DONE, r.cookie ^ 0x5555, r.off, r.len);
                }
                true
            }),
        );
        let src = open(&f, 1000);
        let t = Instant::now();
        let e = read(&src, 0, 512).unwrap_err().to_string();
        assert!(e.contains("no answer within 1 s"), "{e}");
        assert!(
            e.contains("bad reply magic") || e.contains("unknown cookie"),
            "{e}"
        );
        assert!(t.elapsed() < Duration::from_secs(4));
        assert!(f.connections.load(Ordering::SeqCst) > 1, "reconnected");
    }
}

#[test]
fn hostile_chunk_fails_that_read_at_once() {
    let f = fake::serve(
        true,
        SIZE,
        Box::new(|s, r| {
            // Claims 4 GiB of data at the read's offset.
            let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&proto::REPLY_FLAG_DONE.to_be_bytes());
            v.extend_from_slice(&proto::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
            v.extend_from_slice(&r.cookie.to_be_bytes());
            v.extend_from_slice(&u32::MAX.to_be_bytes());
            v.extend_from_slice(&r.off.to_be_bytes());
            let _ = s.write_all(&v);
            true
        }),
    );
    let src = open(&f, 30_000);
    let t = Instant::now();
    let e = read(&src, 4096, 512).unwrap_err().to_string();
    assert!(e.contains("broke the NBD protocol"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3));
}

#[test]
fn server_errors_are_final_and_shutdown_is_retried() {
    let f = fake::serve(
        true,
        SIZE,
        Box::new(|s, r| {
            if r.off == 0 {
                error_chunk(s, r.cookie, proto::ENOSPC, "full");
            } else if r.n == 0 {
                error_chunk(s, r.cookie, proto::ESHUTDOWN, "bye");
                return false;
            } else {
                data_chunk(s, proto::REPLY_FLAG_DONE, r.cookie, r.off, r.len);
            }
            true
        }),
    );
    let src = open(&f, 30_000);
    // The first request gets ESHUTDOWN: retried on a new connection.
    assert_eq!(read(&src, 512, 512).unwrap(), expect(512, 512));
    assert_eq!(f.connections.load(Ordering::SeqCst), 2);
    let t = Instant::now();
    let e = read(&src, 0, 512).unwrap_err().to_string();
    assert!(e.contains("NBD_ENOSPC") && e.contains("full"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(2));
}

#[test]
fn connection_dropped_mid_reply_is_retried() {
    let f = fake::serve(
        true,
        SIZE,
        Box::new(|s, r| {
            if r.n % 2 == 0 {
                // Half a chunk, then the connection goes.
                let mut p = r.off.to_be_bytes().to_vec();
                p.extend_from_slice(&[1, 2, 3]);
                let mut v = proto::STRUCTURED_REPLY_MAGIC.to_be_bytes().to_vec();
                v.extend_from_slice(&1u16.to_be_bytes());
                v.extend_from_slice(&proto::REPLY_TYPE_OFFSET_DATA.to_be_bytes());
                v.extend_from_slice(&r.cookie.to_be_bytes());
                v.extend_from_slice(&(8 + r.len).to_be_bytes());
                v.extend_from_slice(&p);
                let _ = s.write_all(&v);
                return false;
            }
            good(s, r)
        }),
    );
    let src = open(&f, 30_000);
    for i in 0..4 {
        assert_eq!(read(&src, i * 1000, 700).unwrap(), expect(i * 1000, 700));
    }
}

#[test]
fn reads_split_at_the_payload_limit_and_past_the_end() {
    // Default sizes: one 33 MiB read is two requests; the end reads as zeros.
    let big = 40u64 << 20;
    let f = fake::serve(
        false,
        big,
        Box::new(move |s, r| {
            assert!(r.len <= 32 << 20);
            let mut v = proto::SIMPLE_REPLY_MAGIC.to_be_bytes().to_vec();
            v.extend_from_slice(&0u32.to_be_bytes());
            v.extend_from_slice(&r.cookie.to_be_bytes());
            v.extend((r.off..r.off + r.len as u64).map(byte));
            s.write_all(&v).is_ok()
        }),
    );
    let src = open(&f, 30_000);
    let mut b = vec![0xeeu8; 34 << 20];
    let off = big - (33 << 20);
    assert_eq!(src.read_at(&mut b, off).unwrap(), 33 << 20);
    assert!(b[..33 << 20].iter().zip(off..).all(|(&x, o)| x == byte(o)));
    assert!(b[33 << 20..].iter().all(|&x| x == 0));
}

#[test]
fn block_status_descriptors() {
    let f = fake::serve(
        true,
        SIZE,
        Box::new(|s, r| {
            if r.cmd != proto::CMD_BLOCK_STATUS {
                return good(s, r);
            }
            let mut p = 1u32.to_be_bytes().to_vec();
            for (l, fl) in [(4096u32, 0u32), (4096, 2), (8192, 3), (u32::MAX, 1)] {
                p.extend_from_slice(&l.to_be_bytes());
                p.extend_from_slice(&fl.to_be_bytes());
            }
            chunk(
                s,
                proto::REPLY_FLAG_DONE,
                proto::REPLY_TYPE_BLOCK_STATUS,
                r.cookie,
                &p,
            );
            true
        }),
    );
    let src = open(&f, 30_000);
    assert_eq!(src.extent(0, SIZE).unwrap(), (Extent::Data, 4096));
    assert_eq!(src.extent(4096, SIZE).unwrap(), (Extent::Zero, 4096));
    assert_eq!(src.extent(9000, 100).unwrap(), (Extent::Hole, 100));
    // The last descriptor runs past the export: clipped at its end.
    assert_eq!(
        src.extent(16384, SIZE).unwrap(),
        (Extent::Hole, SIZE - 16384)
    );
}
