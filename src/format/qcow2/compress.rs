//! Decompression of compressed clusters: raw deflate (QEMU's default, no zlib header,
//! window bits 12) and zstd (compression_type=zstd, possibly several frames).
//! Decompression stops once a whole cluster has been produced; trailing bytes are ignored
//! because another compressed cluster may share the last sector.

use std::io::Read;

use super::header::Compression;

pub fn decompress(kind: Compression, input: &[u8], out: &mut [u8]) -> Result<(), String> {
    match kind {
        Compression::Deflate => inflate(input, out),
        Compression::Zstd => {
            let mut dec = zstd::stream::read::Decoder::with_buffer(input)
                .map_err(|e| format!("zstd: {e}"))?;
            dec.read_exact(out).map_err(|e| format!("zstd: {e}"))
        }
    }
}

fn inflate(input: &[u8], out: &mut [u8]) -> Result<(), String> {
    let mut d = flate2::Decompress::new(false);
    loop {
        let before_out = d.total_out();
        let in_pos = d.total_in() as usize;
        let out_pos = d.total_out() as usize;
        let status = d
            .decompress(
                &input[in_pos..],
                &mut out[out_pos..],
                flate2::FlushDecompress::Finish,
            )
            .map_err(|e| format!("deflate: {e}"))?;
        if d.total_out() as usize == out.len() {
            return Ok(());
        }
        if status == flate2::Status::StreamEnd || d.total_out() == before_out {
            return Err(format!(
                "deflate: compressed cluster produced {} of {} bytes",
                d.total_out(),
                out.len()
            ));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn inflates_raw_deflate_with_trailing_garbage() {
        let data: Vec<u8> = (0..65536u32).map(|i| (i % 251) as u8).collect();
        let mut enc =
            flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::default());
        enc.write_all(&data).unwrap();
        let mut c = enc.finish().unwrap();
        c.extend_from_slice(&[0xAB; 700]);
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Deflate, &c, &mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn zstd_roundtrip_and_garbage_errors() {
        let data: Vec<u8> = (0..4096u32).map(|i| (i * 7 % 256) as u8).collect();
        let c = zstd::bulk::compress(&data, 3).unwrap();
        let mut out = vec![0u8; data.len()];
        decompress(Compression::Zstd, &c, &mut out).unwrap();
        assert_eq!(out, data);
        assert!(decompress(Compression::Zstd, &[1, 2, 3, 4, 5], &mut out).is_err());
        assert!(decompress(Compression::Deflate, &[0xff; 16], &mut out).is_err());
        // Too little data for a full cluster is an error, not a short read.
        assert!(decompress(Compression::Deflate, &c[..0], &mut out).is_err());
    }
}
