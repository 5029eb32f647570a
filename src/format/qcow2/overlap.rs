//! QEMU's metadata overlap check (`qcow2_check_metadata_overlap`): no write may land on
//! metadata of another kind. A corrupt or hostile image can point guest data, or an L2
//! table, at the header, the L1 table, the refcount table, an L2 table or a refcount
//! block; writing there would destroy the image, so such writes fail (EIO) instead.
//! The fixed tables are checked by range; L2 tables and refcount blocks are tracked by
//! cluster in an ordered map, so a check is one range lookup under a read lock.

use std::collections::BTreeMap;

use parking_lot::RwLock;

/// Kinds of metadata, as bits (one cluster may be claimed twice in a hostile image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Data = 0,
    Header = 1,
    L1 = 2,
    RefTable = 4,
    L2 = 8,
    RefBlock = 16,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Data => "guest data",
            Kind::Header => "the header",
            Kind::L1 => "the L1 table",
            Kind::RefTable => "the refcount table",
            Kind::L2 => "an L2 table",
            Kind::RefBlock => "a refcount block",
        }
    }
    fn from_bits(b: u8) -> Kind {
        [
            Kind::Header,
            Kind::L1,
            Kind::RefTable,
            Kind::L2,
            Kind::RefBlock,
        ]
        .into_iter()
        .find(|k| b & *k as u8 != 0)
        .unwrap_or(Kind::Data)
    }
}

#[derive(Default)]
pub struct MetaMap {
    /// Cluster offset -> kinds (bits) of the L2 tables and refcount blocks there.
    clusters: RwLock<BTreeMap<u64, u8>>,
}

impl MetaMap {
    pub fn add(&self, off: u64, kind: Kind) {
        self.add_all([off], kind);
    }

    pub fn add_all(&self, offs: impl IntoIterator<Item = u64>, kind: Kind) {
        let mut m = self.clusters.write();
        for off in offs {
            *m.entry(off).or_insert(0) |= kind as u8;
        }
    }

    /// Tracked metadata other than `what` in the clusters of [start, end).
    pub fn hit(&self, start: u64, end: u64, cluster_size: u64, what: Kind) -> Option<(u64, Kind)> {
        let from = start / cluster_size * cluster_size;
        self.clusters
            .read()
            .range(from..end)
            .find(|(_, &bits)| bits & !(what as u8) != 0)
            .map(|(&off, &bits)| (off, Kind::from_bits(bits & !(what as u8))))
    }
}

/// Whether [start, end) overlaps the region (offset, len).
pub fn overlaps(start: u64, end: u64, (off, len): (u64, u64)) -> bool {
    len > 0 && start < off.saturating_add(len) && off < end
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_may_land_on_their_own_kind_only() {
        let m = MetaMap::default();
        m.add(0x30000, Kind::L2);
        m.add_all([0x20000, 0x50000], Kind::RefBlock);
        let cs = 0x10000;
        assert_eq!(
            m.hit(0x30000, 0x40000, cs, Kind::L2),
            None,
            "an L2 table is rewritten in place"
        );
        assert_eq!(
            m.hit(0x30000, 0x30200, cs, Kind::Data),
            Some((0x30000, Kind::L2))
        );
        assert_eq!(
            m.hit(0x4fe00, 0x50010, cs, Kind::Data),
            Some((0x50000, Kind::RefBlock)),
            "straddles into one"
        );
        assert_eq!(
            m.hit(0x2fe00, 0x30010, cs, Kind::Data),
            Some((0x20000, Kind::RefBlock)),
            "starts in one"
        );
        assert_eq!(
            m.hit(0x40000, 0x50000, cs, Kind::Data),
            None,
            "end is exclusive"
        );
        assert_eq!(
            m.hit(0x20000, 0x30000, cs, Kind::L2),
            Some((0x20000, Kind::RefBlock))
        );
        // A cluster claimed as both (hostile): even its own kind may not write it.
        m.add(0x50000, Kind::L2);
        assert_eq!(
            m.hit(0x50000, 0x60000, cs, Kind::L2),
            Some((0x50000, Kind::RefBlock))
        );
        assert!(
            overlaps(10, 20, (19, 1)) && !overlaps(10, 20, (20, 5)) && !overlaps(10, 20, (0, 0))
        );
    }
}
