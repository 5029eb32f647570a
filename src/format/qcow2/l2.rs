//! L1/L2 entry encoding (qcow2.rst "Cluster mapping" and "Extended L2 Entries").
//! Pure functions over entry words, so the bit layouts are unit tested on their own.

pub const COPIED: u64 = 1 << 63;
pub const COMPRESSED: u64 = 1 << 62;
pub const ZERO: u64 = 1;
/// Bits 9..=55: host offset of an L2 table (in L1) or a standard cluster (in L2).
pub const OFFSET_MASK: u64 = 0x00ff_ffff_ffff_fe00;
pub const SUBCLUSTERS: u32 = 32;
const ALL_SUB: u32 = u32::MAX;

/// State of one guest cluster in one image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterState {
    /// Not here: read from the backing image.
    Unallocated,
    /// Reads as zeros; `host` is a preallocated cluster (0 if none).
    Zero { host: u64 },
    /// All data at `host`. `copied` = refcount is exactly one (writable in place).
    Data { host: u64, copied: bool },
    /// Compressed: `len` bytes starting at `host` (not aligned) hold the compressed stream.
    Compressed { host: u64, len: u64 },
    /// Extended L2 with mixed subclusters (bit x of `alloc`/`zero` = subcluster x), or
    /// none at all in a preallocated host cluster.
    Mixed {
        host: u64,
        alloc: u32,
        zero: u32,
        copied: bool,
    },
}

/// Per-subcluster (or whole-cluster) status used by reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubState {
    Unallocated,
    Zero,
    Data,
}

impl ClusterState {
    pub fn host(&self) -> u64 {
        match *self {
            ClusterState::Unallocated => 0,
            ClusterState::Zero { host }
            | ClusterState::Data { host, .. }
            | ClusterState::Compressed { host, .. }
            | ClusterState::Mixed { host, .. } => host,
        }
    }

    /// Status of subcluster `i` (0..32); for non-extended images any `i` gives the cluster's.
    pub fn sub(&self, i: u32) -> SubState {
        match *self {
            ClusterState::Unallocated => SubState::Unallocated,
            ClusterState::Zero { .. } => SubState::Zero,
            ClusterState::Data { .. } | ClusterState::Compressed { .. } => SubState::Data,
            ClusterState::Mixed { alloc, zero, .. } => {
                if alloc & (1 << i) != 0 {
                    SubState::Data
                } else if zero & (1 << i) != 0 {
                    SubState::Zero
                } else {
                    SubState::Unallocated
                }
            }
        }
    }

    /// True when every byte of the cluster is defined by this image (nothing falls
    /// through to the backing chain).
    pub fn fully_allocated(&self) -> bool {
        match *self {
            ClusterState::Unallocated => false,
            ClusterState::Mixed { alloc, zero, .. } => alloc | zero == ALL_SUB,
            _ => true,
        }
    }
}

/// Geometry needed to decode entries.
#[derive(Debug, Clone, Copy)]
pub struct Geometry {
    pub cluster_bits: u32,
    pub extended: bool,
    /// v3 images only: bit 0 of a standard descriptor means "reads as zero" (so the
    /// image can store zero clusters at all).
    pub zero_flag: bool,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        1 << self.cluster_bits
    }
    /// Words per L2 entry (1, or 2 with extended L2).
    pub fn words(&self) -> usize {
        if self.extended {
            2
        } else {
            1
        }
    }
    pub fn l2_entries(&self) -> u64 {
        self.cluster_size() / (8 * self.words() as u64)
    }
    pub fn subcluster_size(&self) -> u64 {
        if self.extended {
            self.cluster_size() / SUBCLUSTERS as u64
        } else {
            self.cluster_size()
        }
    }
    fn csize_shift(&self) -> u32 {
        62 - (self.cluster_bits - 8)
    }

    /// Decodes an L2 entry (`word`, and `bitmap` for extended L2).
    pub fn decode(&self, word: u64, bitmap: u64) -> Result<ClusterState, String> {
        if word & COMPRESSED != 0 {
            let shift = self.csize_shift();
            let host = word & ((1u64 << shift) - 1);
            let sectors = ((word & !COPIED & !COMPRESSED) >> shift) + 1;
            let len = sectors * 512 - (host & 511);
            if host == 0 {
                return Err("compressed cluster at host offset 0".into());
            }
            return Ok(ClusterState::Compressed { host, len });
        }
        let host = word & OFFSET_MASK;
        let copied = word & COPIED != 0;
        if !host.is_multiple_of(self.cluster_size()) {
            return Err(format!(
                "L2 entry {word:#x}: host offset {host:#x} is not cluster aligned"
            ));
        }
        if !self.extended {
            if self.zero_flag && word & ZERO != 0 {
                return Ok(ClusterState::Zero { host });
            }
            return Ok(if host == 0 {
                ClusterState::Unallocated
            } else {
                ClusterState::Data { host, copied }
            });
        }
        let alloc = bitmap as u32;
        let zero = (bitmap >> 32) as u32;
        if alloc & zero != 0 {
            return Err(format!(
                "extended L2 bitmap {bitmap:#x}: subclusters both allocated and zero"
            ));
        }
        if alloc != 0 && host == 0 {
            return Err(format!(
                "extended L2 bitmap {bitmap:#x}: allocated subclusters without a host cluster"
            ));
        }
        Ok(match (alloc, zero) {
            // Nothing here, but a preallocated host cluster may be: keep it so it gets
            // filled in place instead of leaking.
            (0, 0) if host != 0 => ClusterState::Mixed {
                host,
                alloc,
                zero,
                copied,
            },
            (0, 0) => ClusterState::Unallocated,
            (ALL_SUB, _) => ClusterState::Data { host, copied },
            (0, ALL_SUB) => ClusterState::Zero { host },
            _ => ClusterState::Mixed {
                host,
                alloc,
                zero,
                copied,
            },
        })
    }

    /// Entry words for a fully allocated data cluster at `host` (refcount 1).
    pub fn encode_data(&self, host: u64) -> (u64, u64) {
        if self.extended {
            (host | COPIED, ALL_SUB as u64)
        } else {
            (host | COPIED, 0)
        }
    }

    /// Entry words for a cluster that reads as zeros, keeping `host` preallocated
    /// (0 for none). Only valid for v3 images.
    pub fn encode_zero(&self, host: u64) -> (u64, u64) {
        let copied = if host != 0 { COPIED } else { 0 };
        if self.extended {
            (host | copied, (ALL_SUB as u64) << 32)
        } else {
            (host | copied | ZERO, 0)
        }
    }

    /// Host clusters (cluster-aligned offsets) that a compressed cluster's data touches;
    /// each holds one reference from it.
    pub fn compressed_clusters(&self, host: u64, len: u64) -> impl Iterator<Item = u64> {
        let cs = self.cluster_size();
        let first = (host & !511) / cs;
        let last = ((host & !511) + len.max(1) - 1 + (host & 511)) / cs;
        (first..=last).map(move |c| c * cs)
    }
}

/// Validates an L1 entry: returns the L2 table offset (0 = none).
pub fn decode_l1(entry: u64, cluster_size: u64) -> Result<u64, String> {
    let off = entry & OFFSET_MASK;
    if !off.is_multiple_of(cluster_size) {
        return Err(format!(
            "L1 entry {entry:#x}: L2 table offset {off:#x} is not cluster aligned"
        ));
    }
    Ok(off)
}

#[cfg(test)]
mod tests {
    use super::*;

    const STD: Geometry = Geometry {
        cluster_bits: 16,
        extended: false,
        zero_flag: true,
    };
    const EXT: Geometry = Geometry {
        cluster_bits: 16,
        extended: true,
        zero_flag: false,
    };

    #[test]
    fn standard_entries() {
        assert_eq!(STD.decode(0, 0).unwrap(), ClusterState::Unallocated);
        assert_eq!(
            STD.decode(0x50000 | COPIED, 0).unwrap(),
            ClusterState::Data {
                host: 0x50000,
                copied: true
            }
        );
        assert_eq!(STD.decode(ZERO, 0).unwrap(), ClusterState::Zero { host: 0 });
        assert_eq!(
            STD.decode(0x50000 | ZERO | COPIED, 0).unwrap(),
            ClusterState::Zero { host: 0x50000 }
        );
        assert!(
            STD.decode(0x50200 | COPIED, 0).is_err(),
            "unaligned host offset"
        );
        let v2 = Geometry {
            zero_flag: false,
            ..STD
        };
        assert_eq!(v2.decode(ZERO, 0).unwrap(), ClusterState::Unallocated);
        let (w, b) = STD.encode_data(0x70000);
        assert_eq!(
            STD.decode(w, b).unwrap(),
            ClusterState::Data {
                host: 0x70000,
                copied: true
            }
        );
        let (w, b) = STD.encode_zero(0x70000);
        assert_eq!(
            STD.decode(w, b).unwrap(),
            ClusterState::Zero { host: 0x70000 }
        );
    }

    #[test]
    fn compressed_descriptor() {
        // 64 KiB clusters: x = 62 - 8 = 54. Offset 0x12345, 3 additional sectors.
        let word = COMPRESSED | (3u64 << 54) | 0x12345;
        match STD.decode(word, 0).unwrap() {
            ClusterState::Compressed { host, len } => {
                assert_eq!(host, 0x12345);
                assert_eq!(len, 4 * 512 - 0x145);
            }
            s => panic!("{s:?}"),
        }
        // Spans host clusters 1 and 2 when it crosses a boundary.
        let c: Vec<u64> = STD.compressed_clusters(0x1ff00, 0x200).collect();
        assert_eq!(c, vec![0x10000, 0x20000]);
        let c: Vec<u64> = STD.compressed_clusters(0x10000, 512).collect();
        assert_eq!(c, vec![0x10000]);
    }

    #[test]
    fn extended_entries() {
        let host = 0x30000 | COPIED;
        assert_eq!(EXT.decode(0, 0).unwrap(), ClusterState::Unallocated);
        let prealloc = EXT.decode(host, 0).unwrap();
        assert_eq!(
            prealloc,
            ClusterState::Mixed {
                host: 0x30000,
                alloc: 0,
                zero: 0,
                copied: true
            }
        );
        assert_eq!(prealloc.sub(5), SubState::Unallocated);
        assert!(!prealloc.fully_allocated());
        assert_eq!(
            EXT.decode(host, 0xffff_ffff).unwrap(),
            ClusterState::Data {
                host: 0x30000,
                copied: true
            }
        );
        assert_eq!(
            EXT.decode(0, 0xffff_ffff_0000_0000).unwrap(),
            ClusterState::Zero { host: 0 }
        );
        let m = EXT.decode(host, (0b100u64 << 32) | 0b011).unwrap();
        assert_eq!(m.sub(0), SubState::Data);
        assert_eq!(m.sub(1), SubState::Data);
        assert_eq!(m.sub(2), SubState::Zero);
        assert_eq!(m.sub(3), SubState::Unallocated);
        assert!(!m.fully_allocated());
        assert!(
            EXT.decode(host, (1u64 << 32) | 1).is_err(),
            "alloc and zero overlap"
        );
        assert!(EXT.decode(0, 1).is_err(), "allocated without host");
        // Bit 0 is not a zero flag with extended L2.
        assert_eq!(EXT.decode(ZERO, 0).unwrap(), ClusterState::Unallocated);
        let (w, b) = EXT.encode_zero(0);
        assert_eq!(EXT.decode(w, b).unwrap(), ClusterState::Zero { host: 0 });
    }

    #[test]
    fn l1_entries() {
        assert_eq!(decode_l1(0x40000 | COPIED, 65536).unwrap(), 0x40000);
        assert!(decode_l1(0x40200, 65536).is_err());
    }
}
