//! The qcow2 header and its extensions (QEMU docs/interop/qcow2.rst, "Header").
//!
//! Parsing is a pure function over the bytes of the first cluster so that it can be unit
//! tested on mutated input. Every field an attacker controls is range-checked before it
//! sizes an allocation or an offset computation.

use crate::source::io::{be32, be64};

pub const MAGIC: u32 = 0x5146_49fb; // "QFI\xfb"
const V2_HEADER_LEN: usize = 72;
const V3_MIN_HEADER_LEN: usize = 104;

pub const MIN_CLUSTER_BITS: u32 = 9;
pub const MAX_CLUSTER_BITS: u32 = 21;
/// QEMU's limits (QCOW_MAX_L1_SIZE, QCOW_MAX_REFTABLE_SIZE, backing name length).
pub const MAX_L1_BYTES: u64 = 32 << 20;
pub const MAX_REFTABLE_BYTES: u64 = 8 << 20;
pub const MAX_BACKING_NAME: usize = 1023;

const EXT_END: u32 = 0;
const EXT_BACKING_FORMAT: u32 = 0xe279_2aca;
// The feature name table (0x6803f857) and unknown extensions are kept verbatim.
const EXT_BITMAPS: u32 = 0x2385_2875;
const EXT_CRYPTO: u32 = 0x0537_be77;
const EXT_DATA_FILE: u32 = 0x4441_5441;

pub const INCOMPAT_DIRTY: u64 = 1 << 0;
pub const INCOMPAT_CORRUPT: u64 = 1 << 1;
pub const INCOMPAT_DATA_FILE: u64 = 1 << 2;
pub const INCOMPAT_COMPRESSION: u64 = 1 << 3;
pub const INCOMPAT_EXTL2: u64 = 1 << 4;
const INCOMPAT_KNOWN: u64 =
    INCOMPAT_DIRTY | INCOMPAT_CORRUPT | INCOMPAT_DATA_FILE | INCOMPAT_COMPRESSION | INCOMPAT_EXTL2;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Deflate,
    Zstd,
}

/// Why a header was refused. `Unsupported` is a valid image using a feature we lack.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    Corrupt(String),
    Unsupported(String),
}

fn corrupt<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Corrupt(msg.into()))
}
fn unsupported<T>(msg: impl Into<String>) -> Result<T, HeaderError> {
    Err(HeaderError::Unsupported(msg.into()))
}

#[derive(Debug, Clone)]
pub struct Header {
    pub version: u32,
    pub backing_file_offset: u64,
    pub backing_file_size: u32,
    pub cluster_bits: u32,
    pub size: u64,
    pub l1_size: u32,
    pub l1_table_offset: u64,
    pub refcount_table_offset: u64,
    pub refcount_table_clusters: u32,
    pub nb_snapshots: u32,
    pub incompatible_features: u64,
    pub compatible_features: u64,
    pub autoclear_features: u64,
    pub refcount_order: u32,
    pub header_length: u32,
    pub compression: Compression,
    pub backing_file: Option<String>,
    pub backing_format: Option<String>,
    /// Raw header bytes [0, header_length), kept so a rewrite preserves fields we do not know.
    raw: Vec<u8>,
    /// Extensions we keep verbatim on rewrite (feature table, unknown ones): (type, data).
    kept_extensions: Vec<(u32, Vec<u8>)>,
}

impl Header {
    /// Bytes needed to learn the cluster size: parse `parse` needs the whole first cluster.
    pub const PROBE_LEN: usize = V3_MIN_HEADER_LEN;

    /// Reads the cluster size from the first bytes, validated, so the caller knows how much
    /// of the file to read for `parse`.
    pub fn probe_cluster_bits(buf: &[u8]) -> Result<u32, HeaderError> {
        if buf.len() < V2_HEADER_LEN {
            return corrupt(format!(
                "header truncated ({} bytes, need at least {V2_HEADER_LEN})",
                buf.len()
            ));
        }
        if be32(buf, 0) != MAGIC {
            return corrupt("bad magic (not a qcow2 image)");
        }
        let version = be32(buf, 4);
        if version != 2 && version != 3 {
            return unsupported(format!("qcow2 version {version} (only 2 and 3 exist)"));
        }
        let cluster_bits = be32(buf, 20);
        if !(MIN_CLUSTER_BITS..=MAX_CLUSTER_BITS).contains(&cluster_bits) {
            return corrupt(format!(
                "cluster_bits {cluster_bits} out of range ({MIN_CLUSTER_BITS}..={MAX_CLUSTER_BITS})"
            ));
        }
        Ok(cluster_bits)
    }

    /// Parses and validates the header from the image's first cluster (`buf`, possibly
    /// shorter if the file is) given the image file's length.
    pub fn parse(buf: &[u8], file_len: u64) -> Result<Header, HeaderError> {
        let cluster_bits = Self::probe_cluster_bits(buf)?;
        let cluster_size = 1u64 << cluster_bits;
        let version = be32(buf, 4);
        let header_length = if version == 2 {
            V2_HEADER_LEN
        } else {
            if buf.len() < V3_MIN_HEADER_LEN {
                return corrupt(format!("v3 header truncated ({} bytes)", buf.len()));
            }
            let hl = be32(buf, 100) as usize;
            if hl < V3_MIN_HEADER_LEN || !hl.is_multiple_of(8) || hl as u64 > cluster_size {
                return corrupt(format!(
                    "header_length {hl} invalid (must be >= 104, 8-aligned, <= cluster size)"
                ));
            }
            if buf.len() < hl {
                return corrupt(format!(
                    "header truncated ({} bytes, header_length {hl})",
                    buf.len()
                ));
            }
            hl
        };

        let mut h = Header {
            version,
            backing_file_offset: be64(buf, 8),
            backing_file_size: be32(buf, 16),
            cluster_bits,
            // QEMU keeps whole 512-byte sectors (total_sectors = size / 512): a size that
            // is not a multiple of 512 shows, and is rewritten, rounded down.
            size: be64(buf, 24) / 512 * 512,
            l1_size: be32(buf, 36),
            l1_table_offset: be64(buf, 40),
            refcount_table_offset: be64(buf, 48),
            refcount_table_clusters: be32(buf, 56),
            nb_snapshots: be32(buf, 60),
            incompatible_features: 0,
            compatible_features: 0,
            autoclear_features: 0,
            refcount_order: 4,
            header_length: header_length as u32,
            compression: Compression::Deflate,
            backing_file: None,
            backing_format: None,
            raw: buf[..header_length].to_vec(),
            kept_extensions: Vec::new(),
        };
        let crypt_method = be32(buf, 32);
        if version == 3 {
            h.incompatible_features = be64(buf, 72);
            h.compatible_features = be64(buf, 80);
            h.autoclear_features = be64(buf, 88);
            h.refcount_order = be32(buf, 96);
            if header_length > 104 {
                h.compression = match buf[104] {
                    0 => Compression::Deflate,
                    1 => Compression::Zstd,
                    t => return unsupported(format!("compression type {t}")),
                };
            }
        }
        if crypt_method != 0 {
            return unsupported(format!("encrypted image (crypt_method {crypt_method}); decrypt it with qemu-img convert first"));
        }
        let unknown = h.incompatible_features & !INCOMPAT_KNOWN;
        if unknown != 0 {
            return unsupported(format!("unknown incompatible feature bits {unknown:#x}"));
        }
        if h.incompatible_features & INCOMPAT_DATA_FILE != 0 {
            return unsupported("external data file (data-file option)");
        }
        if h.incompatible_features & INCOMPAT_COMPRESSION == 0
            && h.compression != Compression::Deflate
        {
            return corrupt("compression type set without the compression-type feature bit");
        }
        if h.refcount_order > 6 {
            return corrupt(format!("refcount_order {} > 6", h.refcount_order));
        }

        // Tables: offsets aligned, sizes bounded, inside the file, no overflow.
        if h.size == 0 && h.l1_size == 0 {
            // An empty disk is legal.
        }
        let l2_entries = cluster_size / h.l2_entry_bytes();
        let bytes_per_l1 = l2_entries << cluster_bits;
        let needed_l1 = h.size.div_ceil(bytes_per_l1);
        if (h.l1_size as u64) * 8 > MAX_L1_BYTES {
            return corrupt(format!(
                "l1_size {} too large (limit {} entries)",
                h.l1_size,
                MAX_L1_BYTES / 8
            ));
        }
        if (h.l1_size as u64) < needed_l1 {
            return corrupt(format!(
                "l1_size {} too small for virtual size {} (needs {needed_l1})",
                h.l1_size, h.size
            ));
        }
        check_table(
            file_len,
            cluster_size,
            h.l1_table_offset,
            h.l1_size as u64 * 8,
            "L1 table",
        )?;
        let reftable_bytes = h.refcount_table_clusters as u64 * cluster_size;
        if reftable_bytes > MAX_REFTABLE_BYTES {
            return corrupt(format!(
                "refcount table of {} clusters too large",
                h.refcount_table_clusters
            ));
        }
        if h.refcount_table_clusters == 0 {
            return corrupt("refcount table has no clusters");
        }
        check_table(
            file_len,
            cluster_size,
            h.refcount_table_offset,
            reftable_bytes,
            "refcount table",
        )?;

        h.parse_extensions(buf, cluster_size, header_length)?;

        if h.backing_file_offset != 0 {
            let len = h.backing_file_size as usize;
            if len > MAX_BACKING_NAME {
                return corrupt(format!(
                    "backing file name length {len} > {MAX_BACKING_NAME}"
                ));
            }
            let start = h.backing_file_offset;
            if start
                .checked_add(len as u64)
                .is_none_or(|end| end > cluster_size.min(buf.len() as u64))
            {
                return corrupt(format!(
                    "backing file name (offset {start}, length {len}) is outside the first cluster"
                ));
            }
            let name = &buf[start as usize..start as usize + len];
            // QEMU reads the name as a C string: it ends at the first NUL (some tools
            // count a terminating NUL in the stored length).
            let name = name.split(|&b| b == 0).next().unwrap_or_default();
            let name = std::str::from_utf8(name).map_err(|_| {
                HeaderError::Corrupt(format!(
                    "backing file name \"{}\" is not UTF-8",
                    crate::text::escape_bytes(name)
                ))
            })?;
            if !name.is_empty() {
                h.backing_file = Some(name.to_string());
            }
        }
        Ok(h)
    }

    fn parse_extensions(
        &mut self,
        buf: &[u8],
        cluster_size: u64,
        start: usize,
    ) -> Result<(), HeaderError> {
        let end = if self.backing_file_offset != 0 {
            (self.backing_file_offset.min(cluster_size) as usize).min(buf.len())
        } else {
            (cluster_size as usize).min(buf.len())
        };
        let mut at = start;
        loop {
            if at + 8 > end {
                // QEMU requires the end marker only when there is room for one.
                return Ok(());
            }
            let ty = be32(buf, at);
            let len = be32(buf, at + 4) as usize;
            at += 8;
            if ty == EXT_END {
                return Ok(());
            }
            if len > end - at {
                return corrupt(format!(
                    "header extension {ty:#x} of length {len} overruns the header area"
                ));
            }
            let data = &buf[at..at + len];
            match ty {
                EXT_BACKING_FORMAT => {
                    let f = std::str::from_utf8(data)
                        .map_err(|_| HeaderError::Corrupt("backing format is not UTF-8".into()))?;
                    self.backing_format = Some(f.trim_end_matches('\0').to_string());
                }
                EXT_CRYPTO => return unsupported("encryption header extension present"),
                EXT_DATA_FILE => return unsupported("external data file"),
                EXT_BITMAPS => {} // dropped on rewrite: we clear the autoclear bit that validates it
                _ => self.kept_extensions.push((ty, data.to_vec())),
            }
            at += len.div_ceil(8) * 8;
        }
    }

    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    pub fn extended_l2(&self) -> bool {
        self.incompatible_features & INCOMPAT_EXTL2 != 0
    }
    pub fn l2_entry_bytes(&self) -> u64 {
        if self.extended_l2() {
            16
        } else {
            8
        }
    }
    pub fn is_corrupt(&self) -> bool {
        self.incompatible_features & INCOMPAT_CORRUPT != 0
    }
    pub fn is_dirty(&self) -> bool {
        self.incompatible_features & INCOMPAT_DIRTY != 0
    }

    /// Encodes the whole header area (header, extensions, backing name) as it should be
    /// written at offset 0, or an error if it does not fit in the first cluster.
    pub fn encode(&self) -> Result<Vec<u8>, HeaderError> {
        let mut out = self.raw.clone();
        let put32 =
            |o: &mut Vec<u8>, at: usize, v: u32| o[at..at + 4].copy_from_slice(&v.to_be_bytes());
        let put64 =
            |o: &mut Vec<u8>, at: usize, v: u64| o[at..at + 8].copy_from_slice(&v.to_be_bytes());
        // The size as parsed (whole sectors), as QEMU's qcow2_update_header writes it.
        put64(&mut out, 24, self.size);
        put64(&mut out, 48, self.refcount_table_offset);
        put32(&mut out, 56, self.refcount_table_clusters);
        if self.version == 3 {
            put64(&mut out, 72, self.incompatible_features);
            put64(&mut out, 88, self.autoclear_features);
        }
        let push_ext = |o: &mut Vec<u8>, ty: u32, data: &[u8]| {
            o.extend_from_slice(&ty.to_be_bytes());
            o.extend_from_slice(&(data.len() as u32).to_be_bytes());
            o.extend_from_slice(data);
            o.resize(o.len().div_ceil(8) * 8, 0);
        };
        if self.backing_file.is_some() {
            if let Some(fmt) = &self.backing_format {
                push_ext(&mut out, EXT_BACKING_FORMAT, fmt.as_bytes());
            }
        }
        for (ty, data) in &self.kept_extensions {
            push_ext(&mut out, *ty, data);
        }
        push_ext(&mut out, EXT_END, &[]);
        let (off, len) = match &self.backing_file {
            Some(name) => {
                if name.len() > MAX_BACKING_NAME {
                    return corrupt(format!(
                        "backing file name longer than {MAX_BACKING_NAME} bytes"
                    ));
                }
                let off = out.len();
                out.extend_from_slice(name.as_bytes());
                (off as u64, name.len() as u32)
            }
            None => (0, 0),
        };
        put64(&mut out, 8, off);
        put32(&mut out, 16, len);
        if out.len() as u64 > self.cluster_size() {
            return corrupt("header, extensions and backing name do not fit in the first cluster");
        }
        Ok(out)
    }

    /// Points the header at a new backing file (or none).
    pub fn set_backing(&mut self, file: Option<String>, format: Option<String>) {
        self.backing_format = file.as_ref().and(format);
        self.backing_file = file;
    }
}

fn check_table(
    file_len: u64,
    cluster_size: u64,
    offset: u64,
    bytes: u64,
    what: &str,
) -> Result<(), HeaderError> {
    if bytes == 0 {
        return Ok(());
    }
    if !offset.is_multiple_of(cluster_size) {
        return corrupt(format!("{what} offset {offset:#x} is not cluster aligned"));
    }
    match offset.checked_add(bytes) {
        Some(end) if end <= file_len => Ok(()),
        _ => corrupt(format!(
            "{what} at offset {offset:#x} ({bytes} bytes) is beyond the end of the file ({file_len} bytes)"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A minimal valid v3 image header area: 64 KiB clusters, 1 MiB disk, L1 at 3*64K,
    /// refcount table at 1*64K, backing "base.qcow2" with format qcow2.
    fn sample() -> (Vec<u8>, u64) {
        let cs = 65536usize;
        let mut b = vec![0u8; cs];
        b[0..4].copy_from_slice(&MAGIC.to_be_bytes());
        b[4..8].copy_from_slice(&3u32.to_be_bytes());
        b[20..24].copy_from_slice(&16u32.to_be_bytes());
        b[24..32].copy_from_slice(&(1u64 << 20).to_be_bytes());
        b[36..40].copy_from_slice(&1u32.to_be_bytes());
        b[40..48].copy_from_slice(&(3 * 65536u64).to_be_bytes());
        b[48..56].copy_from_slice(&65536u64.to_be_bytes());
        b[56..60].copy_from_slice(&1u32.to_be_bytes());
        b[96..100].copy_from_slice(&4u32.to_be_bytes());
        b[100..104].copy_from_slice(&112u32.to_be_bytes());
        let mut at = 112;
        b[at..at + 4].copy_from_slice(&EXT_BACKING_FORMAT.to_be_bytes());
        b[at + 4..at + 8].copy_from_slice(&5u32.to_be_bytes());
        b[at + 8..at + 13].copy_from_slice(b"qcow2");
        at += 16;
        at += 8; // end marker (zeros)
        b[8..16].copy_from_slice(&(at as u64).to_be_bytes());
        b[16..20].copy_from_slice(&10u32.to_be_bytes());
        b[at..at + 10].copy_from_slice(b"base.qcow2");
        (b, 4 * 65536)
    }

    fn set32(b: &mut [u8], at: usize, v: u32) {
        b[at..at + 4].copy_from_slice(&v.to_be_bytes());
    }
    fn set64(b: &mut [u8], at: usize, v: u64) {
        b[at..at + 8].copy_from_slice(&v.to_be_bytes());
    }

    fn corrupt_msg(b: &[u8], len: u64) -> String {
        match Header::parse(b, len) {
            Err(HeaderError::Corrupt(m)) => m,
            other => panic!("expected corrupt, got {other:?}"),
        }
    }

    #[test]
    fn parses_valid_header() {
        let (b, len) = sample();
        let h = Header::parse(&b, len).unwrap();
        assert_eq!(h.version, 3);
        assert_eq!(h.cluster_size(), 65536);
        assert_eq!(h.size, 1 << 20);
        assert_eq!(h.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h.backing_format.as_deref(), Some("qcow2"));
        assert_eq!(h.compression, Compression::Deflate);
    }

    #[test]
    fn encode_roundtrips_and_rewrites_backing() {
        let (b, len) = sample();
        let mut h = Header::parse(&b, len).unwrap();
        let enc = h.encode().unwrap();
        let h2 = Header::parse(&pad(enc), len).unwrap();
        assert_eq!(h2.backing_file.as_deref(), Some("base.qcow2"));
        assert_eq!(h2.backing_format.as_deref(), Some("qcow2"));
        h.set_backing(None, None);
        let h3 = Header::parse(&pad(h.encode().unwrap()), len).unwrap();
        assert_eq!(h3.backing_file, None);
        assert_eq!(h3.backing_format, None);
        h.set_backing(Some("../other/base.raw".into()), Some("raw".into()));
        let h4 = Header::parse(&pad(h.encode().unwrap()), len).unwrap();
        assert_eq!(h4.backing_file.as_deref(), Some("../other/base.raw"));
        assert_eq!(h4.backing_format.as_deref(), Some("raw"));
    }

    fn pad(mut v: Vec<u8>) -> Vec<u8> {
        v.resize(65536, 0);
        v
    }

    #[test]
    fn rejects_truncated_and_bad_magic() {
        let (b, len) = sample();
        for n in [0, 4, 50, 71] {
            assert!(corrupt_msg(&b[..n], len).contains("truncated"));
        }
        assert!(corrupt_msg(&b[..80], len).contains("truncated"));
        let mut m = b.clone();
        m[0] = b'X';
        assert!(corrupt_msg(&m, len).contains("magic"));
    }

    #[test]
    fn rejects_bad_version_and_cluster_bits() {
        let (b, len) = sample();
        let mut m = b.clone();
        set32(&mut m, 4, 4);
        assert!(matches!(
            Header::parse(&m, len),
            Err(HeaderError::Unsupported(_))
        ));
        for bits in [0, 8, 22, 63, u32::MAX] {
            let mut m = b.clone();
            set32(&mut m, 20, bits);
            assert!(corrupt_msg(&m, len).contains("cluster_bits"));
        }
    }

    #[test]
    fn rejects_bad_tables() {
        let (b, len) = sample();
        let mut m = b.clone();
        set64(&mut m, 40, 100 * 65536); // L1 beyond EOF
        assert!(corrupt_msg(&m, len).contains("L1 table"));
        let mut m = b.clone();
        set64(&mut m, 40, 65536 + 8); // unaligned
        assert!(corrupt_msg(&m, len).contains("aligned"));
        let mut m = b.clone();
        set64(&mut m, 40, u64::MAX - 65535); // overflow
        assert!(corrupt_msg(&m, len).contains("L1 table"));
        let mut m = b.clone();
        set32(&mut m, 36, u32::MAX); // absurd l1_size
        assert!(corrupt_msg(&m, len).contains("l1_size"));
        let mut m = b.clone();
        set32(&mut m, 36, 0); // too small for the disk
        assert!(corrupt_msg(&m, len).contains("too small"));
        let mut m = b.clone();
        set64(&mut m, 24, u64::MAX); // absurd size
        assert!(corrupt_msg(&m, len).contains("l1_size"));
        let mut m = b.clone();
        set32(&mut m, 56, u32::MAX); // absurd refcount table
        assert!(corrupt_msg(&m, len).contains("refcount table"));
        let mut m = b.clone();
        set64(&mut m, 48, 1 << 40);
        assert!(corrupt_msg(&m, len).contains("refcount table"));
    }

    #[test]
    fn rejects_bad_backing_name_and_extensions() {
        let (b, len) = sample();
        let mut m = b.clone();
        set32(&mut m, 16, 1 << 30);
        assert!(corrupt_msg(&m, len).contains("length"));
        let mut m = b.clone();
        set64(&mut m, 8, u64::MAX - 3);
        assert!(Header::parse(&m, len).is_err());
        let mut m = b.clone();
        set32(&mut m, 116, 1 << 31); // extension length overruns
        assert!(corrupt_msg(&m, len).contains("extension"));
        let mut m = b.clone();
        set32(&mut m, 100, 7); // header_length
        assert!(corrupt_msg(&m, len).contains("header_length"));
    }

    #[test]
    fn refuses_unsupported_features() {
        let (b, len) = sample();
        let mut m = b.clone();
        set32(&mut m, 32, 2);
        assert!(
            matches!(Header::parse(&m, len), Err(HeaderError::Unsupported(s)) if s.contains("encrypted"))
        );
        let mut m = b.clone();
        set64(&mut m, 72, 1 << 20);
        assert!(
            matches!(Header::parse(&m, len), Err(HeaderError::Unsupported(s)) if s.contains("incompatible"))
        );
        let mut m = b.clone();
        set64(&mut m, 72, INCOMPAT_DATA_FILE);
        assert!(matches!(
            Header::parse(&m, len),
            Err(HeaderError::Unsupported(_))
        ));
    }

    #[test]
    fn backing_name_ends_at_the_first_nul_like_qemu() {
        let (mut b, len) = sample();
        let at = u64::from_be_bytes(b[8..16].try_into().unwrap()) as usize;
        // Stored length counts a terminating NUL (and some padding).
        set32(&mut b, 16, 13);
        assert_eq!(
            Header::parse(&b, len).unwrap().backing_file.as_deref(),
            Some("base.qcow2")
        );
        // Only NULs: no backing file, as QEMU.
        b[at..at + 13].fill(0);
        assert_eq!(Header::parse(&b, len).unwrap().backing_file, None);
        // Not UTF-8: refused, and the message shows the bytes escaped.
        b[at..at + 4].copy_from_slice(b"a\xff\x1bb");
        let m = corrupt_msg(&b, len);
        assert!(m.contains("a\\xff\\x1bb") && !m.contains('\x1b'), "{m}");
    }

    #[test]
    fn virtual_size_rounds_down_to_512_like_qemu() {
        let (mut b, len) = sample();
        set64(&mut b, 24, 1_000_001);
        let h = Header::parse(&b, len).unwrap();
        assert_eq!(h.size, 999_936);
        // And is written back rounded, as QEMU's qcow2_update_header does.
        let out = h.encode().unwrap();
        assert_eq!(u64::from_be_bytes(out[24..32].try_into().unwrap()), 999_936);
        set64(&mut b, 24, 511);
        assert_eq!(Header::parse(&b, len).unwrap().size, 0);
    }

    #[test]
    fn fuzz_mutations_never_panic() {
        let (b, len) = sample();
        let mut seed = 0x1234_5678_9abc_def0u64;
        for _ in 0..20000 {
            let mut m = b.clone();
            for _ in 0..4 {
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                let at = (seed % 200) as usize;
                m[at] = (seed >> 32) as u8;
            }
            let cut = (seed >> 40) as usize % (m.len() + 1);
            let _ = Header::parse(&m[..cut.max(m.len() / 2)], len);
            let _ = Header::parse(&m, len);
        }
    }
}
