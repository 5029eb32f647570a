//! Filling leaf clusters in batches (copy-on-read, streaming, allocating writes, zeroing).
//! The chain decides under its cluster locks what each cluster needs and hands the batch
//! over once; this image plans host space under the metadata lock, writes the data
//! without it, and commits the L2 and refcount changes under it again (the shape of
//! QEMU's qcow2 and cloud-hypervisor's qcow). A commit changes all of a batch's entries
//! or none of them.

use std::borrow::Cow;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::l2::{decode_l1, ClusterState, SubState, COPIED};
use super::overlap::Kind;
use super::refcount::RefIo;
use super::{L2Table, Meta, Qcow2};
use crate::source::io::{pwrite_all, read_exact};
use crate::{Error, Result};

/// What one guest cluster of a batch needs. `old` is its state as the caller saw it
/// under the cluster lock; the commit refuses to go on if it is not that any more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClusterOp {
    /// Nothing to do.
    Keep,
    /// Becomes a zero cluster (v3 only); a preallocated host cluster is kept.
    Zero { old: ClusterState },
    /// Gets a fresh host cluster holding the batch's bytes for it.
    Fresh { old: ClusterState },
    /// Keeps its host cluster (preallocated, or a partly allocated extended L2 one) and
    /// becomes all data: the batch's bytes go where subclusters were not allocated, plus
    /// `write` (a guest write's in-cluster byte range). Allocated subclusters are left
    /// alone: lock-free in-place writers may be writing them right now, and rewriting
    /// them from a stale copy would lose those writes.
    Complete {
        old: ClusterState,
        write: Option<(usize, usize)>,
    },
    /// Already all data at `host` (a racing writer allocated it): `write` goes in place.
    Overwrite { host: u64, write: (usize, usize) },
}

impl ClusterOp {
    fn reads_data(&self) -> bool {
        !matches!(self, ClusterOp::Keep | ClusterOp::Zero { .. })
    }
}

/// One batch: `ops[i]` is for guest cluster `first + i`, whose guest view starts at
/// `data[i * cluster_size]` (zero padded if short; may be empty if no op uses it).
pub struct Batch<'a> {
    pub first: u64,
    pub ops: &'a [ClusterOp],
    pub data: &'a [u8],
    /// Start writeback of fresh clusters at once: copied data waits for no guest fsync,
    /// so the disk can work on it while copying goes on instead of at the next flush.
    pub writeback: bool,
}

/// A state change to commit for guest cluster `ci`.
#[derive(Debug, Clone, Copy)]
struct Change {
    ci: u64,
    old: ClusterState,
    new: New,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum New {
    /// All data at `host`; `fresh`: newly allocated, gets its refcount now.
    Data {
        host: u64,
        fresh: bool,
    },
    Zero,
}

/// What a commit would have to read or zero under the lock; fetched without it first.
#[derive(Default)]
struct Need {
    tables: Vec<u64>,
    blocks: Vec<(u64, u64)>,
    spare: u64,
}

impl Need {
    fn is_empty(&self) -> bool {
        self.tables.is_empty() && self.blocks.is_empty() && self.spare == 0
    }
}

/// Tries before a commit stops fetching and reads what is still missing under the lock.
const COMMIT_ATTEMPTS: usize = 3;

impl Qcow2 {
    /// Fills the batch's clusters; returns the bytes of data written.
    pub fn fill(&self, b: &Batch) -> Result<u64> {
        self.check_writable()?;
        let cs = self.geo.cluster_size();
        let csu = cs as usize;
        let need_len = b.ops.len() * csu;
        let data: Cow<[u8]> =
            if b.data.len() >= need_len || !b.ops.iter().any(ClusterOp::reads_data) {
                Cow::Borrowed(b.data)
            } else {
                let mut d = b.data.to_vec();
                d.resize(need_len, 0);
                Cow::Owned(d)
            };
        let in_cluster = |r: (usize, usize)| r.0 <= r.1 && r.1 <= csu;
        for op in b.ops {
            let ok = match *op {
                ClusterOp::Complete { old, write } => {
                    old.host() != 0 && write.is_none_or(in_cluster)
                }
                ClusterOp::Overwrite { host, write } => host != 0 && in_cluster(write),
                _ => true,
            };
            if !ok {
                return Err(Error::Invalid(format!("bad cluster fill {op:?}")));
            }
        }
        let fresh = b
            .ops
            .iter()
            .filter(|o| matches!(o, ClusterOp::Fresh { .. }))
            .count() as u64;
        // Plan: one host range for all fresh clusters, in guest order.
        let mut host = if fresh > 0 { self.allocate(fresh)? } else { 0 };

        // Data, without the metadata lock.
        let mut changes = Vec::with_capacity(b.ops.len());
        let mut written = 0;
        let mut i = 0;
        while i < b.ops.len() {
            let ci = b.first + i as u64;
            let at = i * csu;
            match b.ops[i] {
                ClusterOp::Keep => {}
                ClusterOp::Zero { old } => changes.push(Change {
                    ci,
                    old,
                    new: New::Zero,
                }),
                ClusterOp::Fresh { .. } => {
                    // A run of fresh clusters: one write.
                    let mut j = i;
                    while let Some(&ClusterOp::Fresh { old }) = b.ops.get(j) {
                        changes.push(Change {
                            ci: b.first + j as u64,
                            old,
                            new: New::Data {
                                host: host + (j - i) as u64 * cs,
                                fresh: true,
                            },
                        });
                        j += 1;
                    }
                    let bytes = &data[at..j * csu];
                    self.pwrite(host, bytes)?;
                    if b.writeback {
                        self.start_writeback(host, bytes.len() as u64);
                    }
                    host += bytes.len() as u64;
                    written += bytes.len() as u64;
                    i = j;
                    continue;
                }
                ClusterOp::Complete { old, write } => {
                    written += self.complete_in_place(old, &data[at..at + csu], write)?;
                    changes.push(Change {
                        ci,
                        old,
                        new: New::Data {
                            host: old.host(),
                            fresh: false,
                        },
                    });
                }
                ClusterOp::Overwrite {
                    host,
                    write: (a, e),
                } => {
                    self.pwrite(host + a as u64, &data[at + a..at + e])?;
                    written += (e - a) as u64;
                }
            }
            i += 1;
        }
        self.commit(&changes)?;
        Ok(written)
    }

    /// Writes the unallocated subclusters of `old` (and `write`) from `cluster` in place.
    fn complete_in_place(
        &self,
        old: ClusterState,
        cluster: &[u8],
        write: Option<(usize, usize)>,
    ) -> Result<u64> {
        let sub = self.geo.subcluster_size() as usize;
        let mut ranges: Vec<(usize, usize)> = (0..cluster.len() / sub)
            .filter(|&k| old.sub(k as u32) != SubState::Data)
            .map(|k| (k * sub, (k + 1) * sub))
            .chain(write)
            .collect();
        ranges.sort_unstable();
        let mut merged: Vec<(usize, usize)> = Vec::with_capacity(ranges.len());
        for (a, b) in ranges {
            match merged.last_mut() {
                Some(last) if a <= last.1 => last.1 = last.1.max(b),
                _ => merged.push((a, b)),
            }
        }
        let mut written = 0;
        for (a, b) in merged {
            self.pwrite(old.host() + a as u64, &cluster[a..b])?;
            written += (b - a) as u64;
        }
        Ok(written)
    }

    /// Commits `changes` (ascending guest clusters). What the commit would otherwise read
    /// or zero under the metadata lock (evicted L2 tables, refcount blocks, space for new
    /// metadata clusters) is fetched without it first, then re-checked.
    fn commit(&self, changes: &[Change]) -> Result<()> {
        if changes.is_empty() {
            return Ok(());
        }
        self.load_refs()?;
        let mut attempt = 1;
        loop {
            let mut guard = self.meta.lock();
            let need = self.needs(&guard, changes)?;
            if need.is_empty() || attempt == COMMIT_ATTEMPTS {
                return self.apply(&mut guard, changes);
            }
            drop(guard);
            self.fetch(&need)?;
            attempt += 1;
        }
    }

    fn needs(&self, m: &Meta, changes: &[Change]) -> Result<Need> {
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let mut need = Need::default();
        let mut new_tables = 0;
        let mut last = None;
        for ch in changes {
            let l1i = ch.ci / l2e;
            if last == Some(l1i) {
                continue;
            }
            last = Some(l1i);
            match self.l2_offset(l1i)? {
                0 => new_tables += 1,
                off if self.cached_l2(m, off).is_none() => need.tables.push(off),
                _ => {}
            }
        }
        let fresh = changes.iter().filter_map(|c| match c.new {
            New::Data { host, fresh: true } => Some(host / cs),
            _ => None,
        });
        let (blocks, new_blocks) = match &m.refs {
            Some(r) => r.missing(fresh),
            None => (Vec::new(), 0),
        };
        need.blocks = blocks;
        // New metadata clusters, plus one for a block that may have to cover them.
        let meta_clusters = new_tables + new_blocks;
        let wanted = meta_clusters + u64::from(meta_clusters > 0);
        need.spare = wanted.saturating_sub(m.space.spare.len() as u64);
        Ok(need)
    }

    fn fetch(&self, need: &Need) -> Result<()> {
        for &off in &need.tables {
            self.l2_table(off)?;
        }
        let cs = self.geo.cluster_size() as usize;
        let mut loaded = Vec::with_capacity(need.blocks.len());
        for &(bi, off) in &need.blocks {
            let mut data = vec![0u8; cs];
            read_exact(&*self.src, &mut data, off, "refcount block")?;
            loaded.push((bi, off, data));
        }
        if !loaded.is_empty() {
            if let Some(refs) = self.meta.lock().refs.as_mut() {
                for (bi, off, data) in loaded {
                    refs.insert_loaded(bi, off, data);
                }
            }
        }
        if need.spare > 0 {
            self.reserve_spare(need.spare)?;
        }
        Ok(())
    }

    /// Takes `n` clusters from the end of the file for metadata and zeroes them without
    /// the lock: a full disk fails here, before anything points at them.
    fn reserve_spare(&self, n: u64) -> Result<()> {
        let cs = self.geo.cluster_size();
        let off = self.meta.lock().space.bump(n, cs)?;
        let zeros = vec![0u8; (n * cs) as usize];
        pwrite_all(
            self.file()?,
            &self.path,
            &zeros,
            off,
            "new metadata clusters",
        )?;
        let mut m = self.meta.lock();
        m.space.spare.extend((0..n).map(|k| off + k * cs));
        Ok(())
    }

    /// The L2 table at `off` read under the lock (the commit's last resort when it keeps
    /// being evicted): not cached means clean, and nobody can change it meanwhile.
    fn read_l2_locked(&self, off: u64) -> Result<Arc<L2Table>> {
        let mut buf = vec![0u8; self.geo.cluster_size() as usize];
        read_exact(&*self.src, &mut buf, off, "L2 table")?;
        let t = Arc::new(L2Table::from_bytes(&buf, false));
        self.l2_cache.write().put(off, t.clone());
        Ok(t)
    }

    /// Installs `changes` under the metadata lock, all or nothing: everything that can
    /// fail (a corrupt entry, a shared table, an entry that is not what the caller saw,
    /// allocation) happens before the first entry changes. New L2 tables made before a
    /// later failure stay: they are empty, consistent, and dirty for the next flush.
    fn apply(&self, m: &mut Meta, changes: &[Change]) -> Result<()> {
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();

        // 1. Validate.
        struct Slot {
            l1i: usize,
            off: u64,
            table: Option<Arc<L2Table>>,
        }
        let mut slots: Vec<Slot> = Vec::new();
        let mut slot_of = Vec::with_capacity(changes.len());
        for ch in changes {
            let l1i = (ch.ci / l2e) as usize;
            if slots.last().map(|s| s.l1i) != Some(l1i) {
                let entry = self
                    .l1
                    .get(l1i)
                    .ok_or_else(|| self.corrupt(format!("L1 index {l1i} beyond the L1 table")))?
                    .load(Ordering::Acquire);
                let off = decode_l1(entry, cs).map_err(|msg| self.corrupt(msg))?;
                if off != 0 && entry & COPIED == 0 {
                    return Err(Error::unsupported(
                        &self.path,
                        "shared L2 table (refcount > 1)",
                    ));
                }
                let table = match off {
                    0 => None,
                    off => Some(match self.cached_l2(m, off) {
                        Some(t) => t,
                        None => self.read_l2_locked(off)?,
                    }),
                };
                if table.as_ref().is_some_and(|t| t.live().is_none()) {
                    return Err(self.corrupt("L2 table of a writable image loaded read-only"));
                }
                slots.push(Slot { l1i, off, table });
            }
            slot_of.push(slots.len() - 1);
        }
        for (ch, &s) in changes.iter().zip(&slot_of) {
            let idx = (ch.ci % l2e) as usize;
            let cur = match &slots[s].table {
                None => ClusterState::Unallocated,
                Some(t) => t.read(|words| self.decode(words, idx))?,
            };
            if cur != ch.old {
                return Err(Error::state(
                    libc::EIO,
                    format!(
                        "{}: guest cluster {} changed under its lock (expected {:?}, found {cur:?})",
                        self.path.display(),
                        ch.ci,
                        ch.old
                    ),
                ));
            }
        }

        // 2. Allocation: new L2 tables, then refcounts of fresh clusters (undone if one
        // fails, so no reference exists without its entry).
        let Meta {
            l1_dirty,
            pinned,
            refs,
            space,
            pending_decref,
            ..
        } = m;
        let refs = refs
            .as_mut()
            .ok_or_else(|| self.corrupt("refcounts not loaded for a commit"))?;
        let mut io = self.ref_io(space);
        for slot in slots.iter_mut().filter(|s| s.table.is_none()) {
            let new_off = io.alloc_clusters(1)?;
            refs.adjust(new_off / cs, 1, &mut io)?;
            // Cached before the L1 entry is published, so a reader that sees the new
            // entry finds this table rather than loading its cluster; dirty so that the
            // flush writes it before the L1 entry.
            let t = Arc::new(L2Table::from_bytes(&vec![0u8; cs as usize], false));
            t.dirty.store(true, Ordering::Release);
            pinned.insert(new_off, t.clone());
            self.l2_cache.write().put(new_off, t.clone());
            self.overlap.add(new_off, Kind::L2);
            self.l1[slot.l1i].store(new_off | COPIED, Ordering::Release);
            l1_dirty.insert(slot.l1i);
            slot.off = new_off;
            slot.table = Some(t);
        }
        let fresh: Vec<u64> = changes
            .iter()
            .filter_map(|c| match c.new {
                New::Data { host, fresh: true } => Some(host / cs),
                _ => None,
            })
            .collect();
        for (k, &c) in fresh.iter().enumerate() {
            if let Err(e) = refs.adjust(c, 1, &mut io) {
                for &done in &fresh[..k] {
                    if let Err(undo) = refs.adjust(done, -1, &mut io) {
                        log::warn!(
                            "{}: undoing the reference of cluster {done}: {undo} (it leaks)",
                            self.path.display()
                        );
                    }
                }
                return Err(e);
            }
        }

        // 3. Entries: nothing fails from here on.
        let tables: Vec<(u64, Arc<L2Table>)> = slots
            .into_iter()
            .filter_map(|s| s.table.map(|t| (s.off, t)))
            .collect();
        let mut cache = self.l2_cache.write();
        for (off, t) in &tables {
            pinned.entry(*off).or_insert_with(|| t.clone());
            if cache.peek(off).is_none() {
                cache.put(*off, t.clone());
            }
        }
        drop(cache);
        let w = self.geo.words();
        let mut defined = self.defined.lock();
        let mut s = 0;
        let mut words = tables[0].1.live().expect("checked live").write();
        for (ch, &cs_slot) in changes.iter().zip(&slot_of) {
            if cs_slot != s {
                drop(words);
                s = cs_slot;
                words = tables[s].1.live().expect("checked live").write();
            }
            let old = ch.old;
            let (word, bitmap) = match ch.new {
                New::Data { host, .. } => {
                    if old.host() != host {
                        self.release(pending_decref, old);
                    }
                    self.geo.encode_data(host)
                }
                New::Zero => match old {
                    ClusterState::Compressed { .. } => {
                        self.release(pending_decref, old);
                        self.geo.encode_zero(0)
                    }
                    ClusterState::Unallocated => self.geo.encode_zero(0),
                    _ => self.geo.encode_zero(old.host()),
                },
            };
            let idx = (ch.ci % l2e) as usize * w;
            words[idx] = word;
            if w == 2 {
                words[idx + 1] = bitmap;
            }
            if let Some(d) = defined.as_mut() {
                *d += cs - self.defined_in(old);
            }
        }
        drop(words);
        for (_, t) in &tables {
            t.dirty.store(true, Ordering::Release);
        }
        Ok(())
    }
}
