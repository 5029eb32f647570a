//! Refcount table and blocks (qcow2.rst "Host cluster management"), kept in memory while
//! an image is writable. Blocks are loaded on demand and written back by the image's
//! flush, which orders them before any L2/L1 entry that relies on them.

use std::collections::{BTreeSet, HashMap};

/// Refcount table entries keep the block offset in bits 9..=63 (qcow2.rst; QEMU's
/// REFT_OFFSET_MASK), unlike L1/L2 entries (bits 9..=55): masking a hostile entry with
/// the narrower mask would send refcount updates to some other cluster.
const OFFSET_MASK: u64 = !0x1ff;

/// What the refcount logic needs from the image: reading existing blocks and taking
/// fresh (zeroed, space-reserved) clusters from the end of the file.
pub trait RefIo {
    fn load_block(&mut self, offset: u64) -> crate::Result<Vec<u8>>;
    /// Allocates `n` contiguous clusters; returns the host offset of the first.
    fn alloc_clusters(&mut self, n: u64) -> crate::Result<u64>;
    fn corrupt(&self, msg: String) -> crate::Error;
}

struct Block {
    offset: u64,
    data: Vec<u8>,
    dirty: bool,
}

pub struct Refcounts {
    bits: u32,
    cluster_size: u64,
    entries_per_block: u64,
    table: Vec<u64>,
    pub table_offset: u64,
    pub table_clusters: u64,
    dirty_table_entries: BTreeSet<usize>,
    /// The table was moved (grown): the header must point at it before L2 writes.
    pub table_moved: bool,
    /// Clusters of a replaced table: freed only once the header switch is durable.
    pub freed_after_header: Vec<(u64, u64)>,
    blocks: HashMap<u64, Block>,
    /// Blocks created since `take_new_blocks` last ran.
    new_blocks: Vec<u64>,
}

/// What a flush must write, in order.
#[derive(Default)]
pub struct RefSnapshot {
    pub blocks: Vec<(u64, Vec<u8>)>,
    /// Whole table (when moved) or dirty entries: (offset, bytes).
    pub table: Vec<(u64, Vec<u8>)>,
    pub block_indexes: Vec<u64>,
    pub table_entries: Vec<usize>,
}

impl Refcounts {
    pub fn new(
        order: u32,
        cluster_size: u64,
        table: Vec<u64>,
        table_offset: u64,
        table_clusters: u64,
    ) -> Self {
        let bits = 1u32 << order;
        Refcounts {
            bits,
            cluster_size,
            entries_per_block: cluster_size * 8 / bits as u64,
            table,
            table_offset,
            table_clusters,
            dirty_table_entries: BTreeSet::new(),
            table_moved: false,
            freed_after_header: Vec::new(),
            blocks: HashMap::new(),
            new_blocks: Vec::new(),
        }
    }

    /// Offsets of every refcount block the table points at.
    pub fn block_offsets(&self) -> Vec<u64> {
        self.table
            .iter()
            .map(|e| e & OFFSET_MASK)
            .filter(|&o| o != 0)
            .collect()
    }

    /// Refcount blocks created since the last call (for the overlap check).
    pub fn take_new_blocks(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.new_blocks)
    }

    pub fn max_refcount(&self) -> u64 {
        if self.bits == 64 {
            u64::MAX
        } else {
            (1u64 << self.bits) - 1
        }
    }

    fn get_entry(&self, data: &[u8], i: u64) -> u64 {
        let bits = self.bits as u64;
        if bits < 8 {
            let byte = data[(i * bits / 8) as usize];
            let shift = (i * bits) % 8;
            (byte as u64 >> shift) & ((1 << bits) - 1)
        } else {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            data[at..at + n]
                .iter()
                .fold(0u64, |acc, &b| (acc << 8) | b as u64)
        }
    }

    fn set_entry(&self, data: &mut [u8], i: u64, v: u64) {
        let bits = self.bits as u64;
        if bits < 8 {
            let at = (i * bits / 8) as usize;
            let shift = (i * bits) % 8;
            let mask = (((1u16 << bits) - 1) << shift) as u8;
            data[at] = (data[at] & !mask) | (((v << shift) as u8) & mask);
        } else {
            let n = (bits / 8) as usize;
            let at = i as usize * n;
            for k in 0..n {
                data[at + k] = (v >> (8 * (n - 1 - k))) as u8;
            }
        }
    }

    /// Highest cluster index with a non-zero refcount, scanning from the table's end.
    pub fn last_used_cluster(&mut self, io: &mut dyn RefIo) -> crate::Result<Option<u64>> {
        for bi in (0..self.table.len() as u64).rev() {
            if self.table[bi as usize] & OFFSET_MASK == 0 {
                continue;
            }
            self.ensure_loaded(bi, io)?;
            let data = &self.blocks[&bi].data;
            for i in (0..self.entries_per_block).rev() {
                if self.get_entry(data, i) != 0 {
                    return Ok(Some(bi * self.entries_per_block + i));
                }
            }
        }
        Ok(None)
    }

    pub fn get(&mut self, cluster: u64, io: &mut dyn RefIo) -> crate::Result<u64> {
        let bi = cluster / self.entries_per_block;
        if bi as usize >= self.table.len() || self.table[bi as usize] & OFFSET_MASK == 0 {
            return Ok(0);
        }
        self.ensure_loaded(bi, io)?;
        Ok(self.get_entry(&self.blocks[&bi].data, cluster % self.entries_per_block))
    }

    /// For refcount changes of `clusters`: the blocks not in memory yet, as (block index,
    /// offset) to load outside the image's lock, and how many blocks must be created.
    pub fn missing(&self, clusters: impl IntoIterator<Item = u64>) -> (Vec<(u64, u64)>, u64) {
        let mut seen = BTreeSet::new();
        let (mut load, mut create) = (Vec::new(), 0);
        for c in clusters {
            let bi = c / self.entries_per_block;
            if !seen.insert(bi) || self.blocks.contains_key(&bi) {
                continue;
            }
            match self.table.get(bi as usize).map(|e| e & OFFSET_MASK) {
                None | Some(0) => create += 1,
                Some(off) => load.push((bi, off)),
            }
        }
        (load, create)
    }

    /// Adds block `bi` as read from `offset` outside the lock, unless it was loaded
    /// meanwhile (blocks are never evicted, so one not in memory was never changed and
    /// the file holds its contents).
    pub fn insert_loaded(&mut self, bi: u64, offset: u64, data: Vec<u8>) {
        let current = self.table.get(bi as usize).map(|e| e & OFFSET_MASK);
        if current == Some(offset)
            && offset.is_multiple_of(self.cluster_size)
            && data.len() as u64 == self.cluster_size
        {
            self.blocks.entry(bi).or_insert(Block {
                offset,
                data,
                dirty: false,
            });
        }
    }

    fn ensure_loaded(&mut self, bi: u64, io: &mut dyn RefIo) -> crate::Result<()> {
        if self.blocks.contains_key(&bi) {
            return Ok(());
        }
        let offset = self.table[bi as usize] & OFFSET_MASK;
        if !offset.is_multiple_of(self.cluster_size) {
            return Err(io.corrupt(format!(
                "refcount table entry {bi}: block offset {offset:#x} not aligned"
            )));
        }
        let data = io.load_block(offset)?;
        self.blocks.insert(
            bi,
            Block {
                offset,
                data,
                dirty: false,
            },
        );
        Ok(())
    }

    /// Adds `delta` to the refcount of host cluster `cluster`, creating refcount blocks and
    /// growing the table as needed (the clusters they take are refcounted too).
    pub fn adjust(&mut self, cluster: u64, delta: i64, io: &mut dyn RefIo) -> crate::Result<()> {
        let bi = cluster / self.entries_per_block;
        if bi as usize >= self.table.len() {
            self.grow_table(bi, io)?;
        }
        if self.table[bi as usize] & OFFSET_MASK == 0 {
            let offset = io.alloc_clusters(1)?;
            self.table[bi as usize] = offset;
            self.new_blocks.push(offset);
            self.dirty_table_entries.insert(bi as usize);
            let data = vec![0u8; self.cluster_size as usize];
            self.blocks.insert(
                bi,
                Block {
                    offset,
                    data,
                    dirty: true,
                },
            );
            // The new block needs a reference itself (often from itself).
            self.adjust(offset / self.cluster_size, 1, io)?;
        }
        self.ensure_loaded(bi, io)?;
        let idx = cluster % self.entries_per_block;
        let max = self.max_refcount();
        let block = self.blocks.get(&bi).expect("loaded");
        let cur = self.get_entry(&block.data, idx);
        let new = if delta >= 0 {
            cur.checked_add(delta as u64).filter(|&v| v <= max)
        } else {
            cur.checked_sub(delta.unsigned_abs())
        };
        let Some(new) = new else {
            return Err(io.corrupt(format!(
                "refcount of cluster {cluster} would go from {cur} by {delta} (max {max})"
            )));
        };
        let mut data = std::mem::take(&mut self.blocks.get_mut(&bi).expect("loaded").data);
        self.set_entry(&mut data, idx, new);
        let block = self.blocks.get_mut(&bi).expect("loaded");
        block.data = data;
        block.dirty = true;
        Ok(())
    }

    fn grow_table(&mut self, needed_index: u64, io: &mut dyn RefIo) -> crate::Result<()> {
        let per_cluster = self.cluster_size / 8;
        // Room for the blocks we need now, the new table's own blocks, and growth.
        let entries = (needed_index + 2).max(self.table.len() as u64 * 2);
        let clusters = entries.div_ceil(per_cluster);
        if clusters * self.cluster_size > super::header::MAX_REFTABLE_BYTES {
            return Err(io.corrupt("refcount table would exceed 8 MiB".into()));
        }
        let offset = io.alloc_clusters(clusters)?;
        self.table.resize((clusters * per_cluster) as usize, 0);
        self.freed_after_header
            .push((self.table_offset, self.table_clusters));
        self.table_offset = offset;
        self.table_clusters = clusters;
        self.table_moved = true;
        for c in 0..clusters {
            self.adjust(offset / self.cluster_size + c, 1, io)?;
        }
        Ok(())
    }

    /// Takes what must be written and marks it clean; `restore` undoes this on failure.
    pub fn snapshot(&mut self) -> RefSnapshot {
        let mut s = RefSnapshot::default();
        for (&bi, b) in self.blocks.iter_mut().filter(|(_, b)| b.dirty) {
            b.dirty = false;
            s.blocks.push((b.offset, b.data.clone()));
            s.block_indexes.push(bi);
        }
        if self.table_moved {
            let bytes = self.table.iter().flat_map(|e| e.to_be_bytes()).collect();
            s.table.push((self.table_offset, bytes));
        } else {
            for &i in &self.dirty_table_entries {
                s.table.push((
                    self.table_offset + i as u64 * 8,
                    self.table[i].to_be_bytes().to_vec(),
                ));
            }
        }
        s.table_entries = std::mem::take(&mut self.dirty_table_entries)
            .into_iter()
            .collect();
        s
    }

    pub fn restore(&mut self, s: &RefSnapshot) {
        for bi in &s.block_indexes {
            if let Some(b) = self.blocks.get_mut(bi) {
                b.dirty = true;
            }
        }
        self.dirty_table_entries
            .extend(s.table_entries.iter().copied());
    }

    pub fn is_dirty(&self) -> bool {
        self.table_moved
            || !self.dirty_table_entries.is_empty()
            || self.blocks.values().any(|b| b.dirty)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A fake file: blocks read as zeros, allocation bumps from `next`.
    struct FakeIo {
        next: u64,
        cs: u64,
        allocated: Vec<u64>,
    }
    impl RefIo for FakeIo {
        fn load_block(&mut self, _offset: u64) -> crate::Result<Vec<u8>> {
            Ok(vec![0; self.cs as usize])
        }
        fn alloc_clusters(&mut self, n: u64) -> crate::Result<u64> {
            let at = self.next;
            self.next += n * self.cs;
            for c in 0..n {
                self.allocated.push(at + c * self.cs);
            }
            Ok(at)
        }
        fn corrupt(&self, msg: String) -> crate::Error {
            crate::Error::Invalid(msg)
        }
    }

    #[test]
    fn entry_widths_roundtrip() {
        for order in 0..=6 {
            let mut r = Refcounts::new(order, 512, vec![0; 64], 512, 1);
            let max = r.max_refcount();
            let mut data = vec![0u8; 512];
            let n = 512 * 8 / (1u64 << order);
            for i in 0..n {
                r.set_entry(&mut data, i, (i * 7919) & max);
            }
            for i in 0..n {
                assert_eq!(
                    r.get_entry(&data, i),
                    (i * 7919) & max,
                    "order {order} entry {i}"
                );
            }
            // Sub-byte widths pack least significant bit first (qcow2.rst).
            if order == 0 {
                let mut d = vec![0u8; 512];
                r.set_entry(&mut d, 0, 1);
                r.set_entry(&mut d, 3, 1);
                assert_eq!(d[0], 0b1001);
            }
            let _ = &mut r;
        }
        // 16-bit entries are big endian.
        let r = Refcounts::new(4, 512, vec![0; 64], 512, 1);
        let mut d = vec![0u8; 512];
        r.set_entry(&mut d, 1, 0x0102);
        assert_eq!(&d[2..4], &[1, 2]);
    }

    #[test]
    fn new_blocks_reference_themselves_and_table_grows() {
        let cs = 512u64;
        // Table of one cluster (64 entries), each block covers 256 clusters (16-bit).
        let mut io = FakeIo {
            next: 5 * cs,
            cs,
            allocated: vec![],
        };
        let mut r = Refcounts::new(4, cs, vec![0; 64], cs, 1);
        r.adjust(4, 1, &mut io).unwrap();
        // A block was created at cluster 4*cs... it covers itself.
        let block_off = io.allocated[0];
        assert_eq!(r.get(4, &mut io).unwrap(), 1);
        assert_eq!(r.get(block_off / cs, &mut io).unwrap(), 1);
        // Far away cluster: needs table growth beyond 64 blocks (64*256 clusters).
        let far = 64 * 256 + 10;
        io.next = (far + 1) * cs;
        r.adjust(far, 1, &mut io).unwrap();
        assert!(r.table_moved);
        assert_eq!(r.freed_after_header, vec![(cs, 1)]);
        assert_eq!(r.get(far, &mut io).unwrap(), 1);
        for c in io.allocated.clone() {
            assert_eq!(
                r.get(c / cs, &mut io).unwrap(),
                1,
                "allocated cluster {c} refcounted"
            );
        }
        // Underflow and overflow are errors, not wraps.
        assert!(r.adjust(far, -2, &mut io).is_err());
        let mut one = Refcounts::new(0, cs, vec![0; 64], cs, 1);
        let mut io1 = FakeIo {
            next: 8 * cs,
            cs,
            allocated: vec![],
        };
        one.adjust(9, 1, &mut io1).unwrap();
        assert!(one.adjust(9, 1, &mut io1).is_err());
    }

    #[test]
    fn snapshot_and_restore() {
        let cs = 512u64;
        let mut io = FakeIo {
            next: 4 * cs,
            cs,
            allocated: vec![],
        };
        let mut r = Refcounts::new(4, cs, vec![0; 64], cs, 1);
        r.adjust(5, 1, &mut io).unwrap();
        assert!(r.is_dirty());
        let s = r.snapshot();
        assert_eq!(s.blocks.len(), 1);
        assert_eq!(s.table.len(), 1);
        assert!(!r.is_dirty());
        r.restore(&s);
        assert!(r.is_dirty());
        assert_eq!(r.last_used_cluster(&mut io).unwrap(), Some(5));
    }
}
