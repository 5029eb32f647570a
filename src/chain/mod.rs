//! A backing chain presented as one disk: guest reads resolve each range to the highest
//! layer that has it; copy-on-read and guest writes go into the leaf (layer 0), serialized
//! per leaf cluster (see `locks`). Copy-on-read and stream fills share one path
//! (`copy_in`, by `Purpose`); the leaf's qcow2 image owns allocation and metadata.

pub mod locks;
pub mod open;
pub mod stream;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

use self::locks::ClusterLocks;
pub use self::open::{open_chain, reopen_backing, Layer, MAX_CHAIN_DEPTH};
use crate::format::qcow2::l2::ClusterState;
use crate::format::qcow2::{Batch, ClusterOp, Qcow2};
use crate::format::{Image, Mapping, Status};
use crate::{Error, Result};

/// Granularity for locking and copying when the leaf is raw (it has no clusters).
const RAW_LEAF_CLUSTER: u64 = 64 << 10;
/// Largest buffer one copy-on-read or write batch builds.
const MAX_BATCH: u64 = 8 << 20;

#[derive(Default)]
pub struct Counters {
    /// Stream jobs running: guest activity is tracked only while there are any, so
    /// plain guest I/O pays no shared atomics for the stream's back-off.
    pub streams: AtomicUsize,
    /// Guest requests in flight, and when the last one ended (ns since `epoch`).
    pub guest_inflight: AtomicUsize,
    pub guest_last_ns: AtomicU64,
    /// Copy-on-read gave up because the leaf's file system is full (logged once).
    pub cor_nospace: AtomicBool,
}

pub struct Chain {
    name: String,
    size: u64,
    cluster_size: u64,
    copy_on_read: bool,
    read_only: bool,
    layers: RwLock<Arc<Layers>>,
    locks: ClusterLocks,
    pub counters: Counters,
    epoch: Instant,
}

/// Marks a guest request in flight for the stream workers' back-off (None: no stream
/// was running when the request started, nothing to undo).
pub struct GuestIo<'a>(Option<&'a Chain>);

impl Drop for GuestIo<'_> {
    fn drop(&mut self) {
        if let Some(chain) = self.0 {
            let c = &chain.counters;
            c.guest_last_ns.store(chain.now_ns(), Ordering::Relaxed);
            c.guest_inflight.fetch_sub(1, Ordering::Release);
        }
    }
}

impl Chain {
    /// Opens the chain whose leaf is `leaf`, shown as `name`.
    pub fn open(name: &str, leaf: &Path, read_only: bool, copy_on_read: bool) -> Result<Chain> {
        let layers = open_chain(leaf, read_only)?;
        let top = &layers[0].image;
        let cluster_size = top
            .as_qcow2()
            .map_or(RAW_LEAF_CLUSTER, |q| q.cluster_size());
        Ok(Chain {
            name: name.to_string(),
            size: top.size(),
            cluster_size,
            copy_on_read: copy_on_read
                && !read_only
                && top.as_qcow2().is_some()
                && layers.len() > 1,
            read_only,
            layers: RwLock::new(Arc::new(Layers::new(layers))),
            locks: ClusterLocks::default(),
            counters: Counters::default(),
            epoch: Instant::now(),
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn cluster_size(&self) -> u64 {
        self.cluster_size
    }
    pub fn read_only(&self) -> bool {
        self.read_only
    }
    pub fn layers(&self) -> Arc<Layers> {
        self.layers.read().clone()
    }
    pub fn now_ns(&self) -> u64 {
        self.epoch.elapsed().as_nanos() as u64
    }

    /// Registers a guest request until the returned guard drops.
    pub fn guest_io(&self) -> GuestIo<'_> {
        if self.counters.streams.load(Ordering::Relaxed) == 0 {
            return GuestIo(None);
        }
        self.counters.guest_inflight.fetch_add(1, Ordering::Acquire);
        GuestIo(Some(self))
    }

    fn leaf_qcow2<'a>(&self, layers: &'a Layers) -> Option<&'a Qcow2> {
        layers[0].image.as_qcow2()
    }

    /// Makes every acknowledged write durable (fsync on the raw file).
    pub fn flush(&self) -> Result<()> {
        let layers = self.layers();
        match &layers[0].image {
            Image::Qcow2(q) => q.flush(),
            other => other.flush(),
        }
    }

    /// Writes dirty leaf metadata back if there is any (periodic checkpoint).
    pub fn checkpoint(&self) -> Result<()> {
        match self.layers()[0].image.as_qcow2() {
            Some(q) if q.has_dirty_metadata() => q.flush(),
            _ => Ok(()),
        }
    }

    /// Flushes everything, including released refcounts (unmount).
    pub fn flush_all(&self) -> Result<()> {
        self.layers()[0].image.flush()
    }

    /// Bytes of the disk defined by the leaf itself (data or zero clusters).
    pub fn leaf_bytes(&self) -> Result<u64> {
        let layers = self.layers();
        match layers[0].image.as_qcow2() {
            Some(q) if layers.len() > 1 => q.defined_bytes(),
            _ => Ok(self.size),
        }
    }

    /// Reopens the backing images if any was removed or replaced since it was opened
    /// (so a restored file is used again). Errors if the chain cannot be opened now.
    pub fn refresh_backing(&self) -> Result<()> {
        let layers = self.layers();
        if let Some(why) = layers[1..].iter().find_map(|l| l.replaced()) {
            log::info!("{}: {why}; reopening the backing chain", self.name);
            let fresh = reopen_backing(layers[0].clone())?;
            self.set_layers(fresh);
        }
        Ok(())
    }

    /// Replaces the layer list (after a stream removed backing layers).
    pub fn set_layers(&self, layers: Vec<Arc<Layer>>) {
        *self.layers.write() = Arc::new(Layers::new(layers));
    }
}

impl Chain {
    /// Reads guest data at `off` into `buf`; returns the bytes read (short at EOF).
    pub fn read(&self, off: u64, buf: &mut [u8]) -> Result<usize> {
        if off >= self.size {
            return Ok(0);
        }
        let n = (buf.len() as u64).min(self.size - off) as usize;
        let buf = &mut buf[..n];
        let layers = self.layers();
        if !self.copy_on_read || layers.len() == 1 {
            read_layers(&layers, 0, off, buf)?;
            return Ok(n);
        }
        // Serve what the leaf has; copy the rest into the leaf as it is read.
        let leaf = &layers[0].image;
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let (m, run) = leaf.map(pos, (n - done) as u64)?;
            let part = &mut buf[done..done + run as usize];
            match m {
                Mapping::Unallocated => {
                    self.copy_in(&layers, pos, run, Purpose::CopyOnRead(part))?;
                }
                m => leaf.read_mapped(m, pos, part)?,
            }
            done += run as usize;
        }
        Ok(n)
    }

    /// lseek(SEEK_DATA / SEEK_HOLE) over the whole chain: data wherever the layer that
    /// answers for a byte has data; zero clusters and unallocated ranges are holes.
    pub fn seek(&self, off: u64, data: bool) -> Result<Option<u64>> {
        if off >= self.size {
            return Ok(None);
        }
        let layers = self.layers();
        let mut pos = off;
        while pos < self.size {
            let (s, n) = chain_status(&layers, 0, pos, self.size - pos)?;
            if (s == Status::Data) == data {
                return Ok(Some(pos));
            }
            pos += n;
        }
        Ok(if data { None } else { Some(self.size) })
    }
}

/// A chain's images, top (leaf) first, with hints for deep chains: which backing layer
/// answers for a small guest granule. Backing images never change, so a hint stays true
/// for as long as this list lives; a new list (after a stream or a reopen) starts empty.
pub struct Layers {
    list: Vec<Arc<Layer>>,
    /// log2 of the granule (the smallest (sub)cluster of any backing qcow2), 0 = no hints.
    granule_bits: u32,
    /// Hints apply below every layer's end only (layer sizes may cut a granule).
    hint_limit: u64,
    /// Direct-mapped: ((granule + 1) << 8) | first answering layer index, 0 = empty.
    hints: Box<[AtomicU64]>,
}

/// Hints are worth their memory only when a read would otherwise walk several layers.
const HINT_MIN_DEPTH: usize = 4;
const HINT_SLOTS: usize = 1 << 16;

impl Layers {
    fn new(list: Vec<Arc<Layer>>) -> Layers {
        let granule = list[1.min(list.len())..]
            .iter()
            .filter_map(|l| l.image.as_qcow2().map(|q| q.geometry().subcluster_size()))
            .min();
        let (granule_bits, hints) = match granule {
            Some(g) if list.len() >= HINT_MIN_DEPTH => (
                g.trailing_zeros(),
                (0..HINT_SLOTS).map(|_| AtomicU64::new(0)).collect(),
            ),
            _ => (0, Box::default()),
        };
        let hint_limit = list.iter().map(|l| l.image.size()).min().unwrap_or(0);
        Layers {
            list,
            granule_bits,
            hint_limit,
            hints,
        }
    }

    /// The first layer from index 1 down that answers for `off` (by data, zeros, or its
    /// end), remembered per granule; None when hints do not apply to [off, off+len).
    fn hinted_start(&self, off: u64, len: u64) -> Result<Option<usize>> {
        let bits = self.granule_bits;
        if bits == 0
            || len == 0
            || off + len > self.hint_limit
            || off >> bits != (off + len - 1) >> bits
        {
            return Ok(None);
        }
        let g = off >> bits;
        let slot = &self.hints[(g as usize) % HINT_SLOTS];
        let e = slot.load(Ordering::Relaxed);
        if e >> 8 == g + 1 {
            return Ok(Some((e & 0xff) as usize));
        }
        let mut k = 1;
        while k < self.list.len() {
            let (m, _) = self.list[k].image.map(off, 1)?;
            if m != Mapping::Unallocated {
                break;
            }
            k += 1;
        }
        slot.store(((g + 1) << 8) | k as u64, Ordering::Relaxed);
        Ok(Some(k))
    }
}

impl std::ops::Deref for Layers {
    type Target = [Arc<Layer>];
    fn deref(&self) -> &[Arc<Layer>] {
        &self.list
    }
}

/// Reads `buf` at guest offset `off` from layers[idx..]: each range from the first layer
/// that has it; past a layer's end (a smaller backing file) or below the bottom, zeros.
pub fn read_layers(layers: &Layers, idx: usize, off: u64, buf: &mut [u8]) -> Result<()> {
    // Entering the backing chain: jump to the layer that answers, if known.
    let idx = match idx {
        1 => layers.hinted_start(off, buf.len() as u64)?.unwrap_or(1),
        _ => idx,
    };
    let Some(layer) = layers.get(idx) else {
        buf.fill(0);
        return Ok(());
    };
    let img = &layer.image;
    let mut done = 0usize;
    while done < buf.len() {
        let pos = off + done as u64;
        if pos >= img.size() {
            buf[done..].fill(0);
            return Ok(());
        }
        let want = ((buf.len() - done) as u64).min(img.size() - pos);
        let (m, run) = img.map(pos, want)?;
        let part = &mut buf[done..done + run as usize];
        match m {
            Mapping::Unallocated => read_layers(layers, idx + 1, pos, part)?,
            m => img.read_mapped(m, pos, part)?,
        }
        done += run as usize;
    }
    Ok(())
}

/// The allocation status of the chain layers[idx..] at `off`, and for how many bytes it
/// holds: resolved through unallocated ranges to the layer that answers.
pub fn chain_status(
    layers: &[Arc<Layer>],
    idx: usize,
    off: u64,
    len: u64,
) -> Result<(Status, u64)> {
    let (s, n, _) = resolve(layers, idx, off, len)?;
    Ok((s, n))
}

/// Like `chain_status`, also telling which layer decided: the one that answers, or whose
/// end cuts the range off (it reads as zeros there, hiding the layers below), or
/// `layers.len()` when no layer has anything. Every layer from `idx` up to that one is
/// unallocated over the whole returned length, so a read may start at it.
fn resolve(layers: &[Arc<Layer>], idx: usize, off: u64, len: u64) -> Result<(Status, u64, usize)> {
    let Some(layer) = layers.get(idx) else {
        return Ok((Status::Unallocated, len, layers.len()));
    };
    let img = &layer.image;
    if off >= img.size() {
        return Ok((Status::Unallocated, len, idx));
    }
    let (s, n) = img.status(off, len.min(img.size() - off))?;
    if s == Status::Unallocated {
        return resolve(layers, idx + 1, off, n);
    }
    Ok((s, n, idx))
}

/// Why clusters are copied into the leaf.
pub enum Purpose<'a> {
    /// A guest read: the buffer receives the chain's view of exactly the range asked
    /// for. A full leaf file system does not fail it: the data is then served from the
    /// backing images without copying.
    CopyOnRead(&'a mut [u8]),
    /// A stream job: copy from the layers above `base` (all backing layers when None).
    Stream { base: Option<usize> },
}

/// What a leaf cluster needs, decided under its cluster lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fill {
    /// Already defined by the leaf: nothing to copy.
    Present,
    /// No layer has anything: reads as zeros, stays unallocated.
    Hole,
    /// Reads as zeros because of zero clusters: becomes a zero cluster.
    Zero,
    /// Has data below: copy the cluster's contents, read from layer `from` on (every
    /// layer between the leaf and `from` lacks the whole cluster).
    Data { from: usize },
    /// Extended L2, some subclusters already in the leaf: fill in the rest.
    Complete,
}

impl Fill {
    /// The layer to start reading the cluster's guest view at, None when nothing needs
    /// reading (zeros, or a cluster a stream leaves alone).
    fn source(self, for_guest: bool) -> Option<usize> {
        match self {
            Fill::Present if for_guest => Some(0),
            Fill::Present | Fill::Hole | Fill::Zero => None,
            Fill::Data { from } => Some(from),
            Fill::Complete => Some(0),
        }
    }

    fn op(self, old: ClusterState, zero_clusters: bool) -> ClusterOp {
        match self {
            Fill::Present | Fill::Hole => ClusterOp::Keep,
            Fill::Zero if zero_clusters => ClusterOp::Zero { old },
            // A v2 leaf has no zero clusters: it gets the zeros written.
            Fill::Zero | Fill::Data { .. } => ClusterOp::Fresh { old },
            Fill::Complete => ClusterOp::Complete { old, write: None },
        }
    }
}

impl Chain {
    /// Copy-on-read (`out` given: the guest's view of exactly [off, off+len)) or a stream
    /// fill (`stop_at`: the kept base) — the job engine's entry point; see `copy_in`.
    pub fn populate(
        &self,
        layers: &Layers,
        off: u64,
        len: u64,
        out: Option<&mut [u8]>,
        stop_at: Option<usize>,
    ) -> Result<u64> {
        let purpose = match out {
            Some(buf) => Purpose::CopyOnRead(buf),
            None => Purpose::Stream { base: stop_at },
        };
        self.copy_in(layers, off, len, purpose)
    }

    /// Copies the leaf clusters covering [off, off+len) that the leaf still lacks from
    /// the chain into the leaf, in batches locked cluster by cluster and re-checked under
    /// the lock (a guest write may have landed meanwhile: it is never overwritten).
    /// Returns the bytes newly copied.
    fn copy_in(
        &self,
        layers: &Layers,
        off: u64,
        len: u64,
        mut purpose: Purpose<'_>,
    ) -> Result<u64> {
        let cs = self.cluster_size;
        let Some(leaf) = self.leaf_qcow2(layers) else {
            if let Purpose::CopyOnRead(buf) = purpose {
                read_layers(layers, 0, off, buf)?;
            }
            return Ok(0);
        };
        let (for_guest, below) = match purpose {
            Purpose::CopyOnRead(_) => (true, layers.len()),
            Purpose::Stream { base } => (false, base.unwrap_or(layers.len())),
        };
        let zero_clusters = leaf.geometry().zero_flag;
        let first = off / cs;
        let end = (off + len).div_ceil(cs);
        let mut copied = 0;
        let mut c = first;
        while c < end {
            let batch_end = end.min(c + (MAX_BATCH / cs).max(1));
            let _guard = self.locks.lock(c, batch_end);
            let plan = self.classify(layers, leaf, c, batch_end, below)?;
            let start = c * cs;
            let stop = (batch_end * cs).min(self.size.div_ceil(cs) * cs);
            let readable = (self.size.min(stop) - start) as usize;
            let mut data = vec![0u8; (stop - start) as usize];
            // One read per run of clusters that start at the same layer.
            let csu = cs as usize;
            let mut i = 0;
            while i < plan.len() {
                let src = plan[i].1.source(for_guest);
                let mut j = i + 1;
                while j < plan.len() && plan[j].1.source(for_guest) == src {
                    j += 1;
                }
                let (a, b) = (i * csu, (j * csu).min(readable));
                if let Some(from) = src.filter(|_| a < b) {
                    read_layers(layers, from, start + a as u64, &mut data[a..b])?;
                }
                i = j;
            }
            let ops: Vec<ClusterOp> = plan
                .iter()
                .map(|&(old, fill)| fill.op(old, zero_clusters))
                .collect();
            let batch = Batch {
                first: c,
                ops: &ops,
                data: &data,
                writeback: true,
            };
            match leaf.fill(&batch) {
                Ok(n) => copied += n,
                Err(e) if e.is_no_space() && for_guest => {
                    if !self.counters.cor_nospace.swap(true, Ordering::Relaxed) {
                        log::warn!(
                            "{}: leaf file system full, copy-on-read paused: {e}",
                            self.name
                        );
                    }
                }
                Err(e) => return Err(e),
            }
            if let Purpose::CopyOnRead(buf) = &mut purpose {
                let lo = off.max(start);
                let hi = (off + len).min(stop);
                if lo < hi {
                    buf[(lo - off) as usize..(hi - off) as usize]
                        .copy_from_slice(&data[(lo - start) as usize..(hi - start) as usize]);
                }
            }
            c = batch_end;
        }
        Ok(copied)
    }

    /// Decides for each leaf cluster in [first, end) what copying must do, looking for
    /// data in layers[1..below]; returns each cluster's leaf state with it.
    fn classify(
        &self,
        layers: &Layers,
        leaf: &Qcow2,
        first: u64,
        end: u64,
        below: usize,
    ) -> Result<Vec<(ClusterState, Fill)>> {
        let cs = self.cluster_size;
        let mut plan = Vec::with_capacity((end - first) as usize);
        for c in first..end {
            let state = leaf.cluster_state(c)?;
            let fill = if state.fully_allocated() {
                Fill::Present
            } else if state.host() != 0 {
                Fill::Complete
            } else if state != ClusterState::Unallocated {
                // Only zero subclusters: nothing in place to keep.
                Fill::Data { from: 0 }
            } else {
                let start = c * cs;
                let stop = start + cs.min(self.size - start);
                let (mut data, mut zero, mut from) = (false, false, below);
                let mut pos = start;
                while pos < stop {
                    let (s, n, layer) = resolve(&layers[..below], 1, pos, stop - pos)?;
                    data |= s == Status::Data;
                    zero |= s == Status::Zero;
                    from = from.min(layer);
                    pos += n;
                }
                match (data, zero) {
                    (true, _) => Fill::Data { from },
                    (false, true) => Fill::Zero,
                    (false, false) => Fill::Hole,
                }
            };
            plan.push((state, fill));
        }
        Ok(plan)
    }
}

impl Chain {
    fn check_write(&self, off: u64, len: u64) -> Result<u64> {
        if self.read_only {
            return Err(Error::state(
                libc::EROFS,
                format!("{} is mounted read-only", self.name),
            ));
        }
        if off >= self.size && len > 0 {
            return Err(Error::state(
                libc::ENOSPC,
                "write beyond the end of the disk",
            ));
        }
        Ok(len.min(self.size - off))
    }

    /// Writes guest data; returns the bytes written (short only at the end of the disk).
    pub fn write(&self, off: u64, data: &[u8]) -> Result<usize> {
        let n = self.check_write(off, data.len() as u64)? as usize;
        let data = &data[..n];
        let layers = self.layers();
        let leaf_image = &layers[0].image;
        let Some(leaf) = self.leaf_qcow2(&layers) else {
            if let Image::Raw(r) = leaf_image {
                r.write(off, data)?;
            }
            return Ok(n);
        };
        let cs = self.cluster_size;
        let mut done = 0usize;
        while done < n {
            let pos = off + done as u64;
            let (m, run) = leaf.map(pos, (n - done) as u64)?;
            let run = run as usize;
            if let Mapping::Data { host } = m {
                // Allocated: overwrite in place, no lock (see locks.rs).
                leaf.pwrite(host, &data[done..done + run])?;
                done += run;
                continue;
            }
            // Needs allocation or a state change: whole clusters, under their locks.
            let first = pos / cs;
            let end = (pos + run as u64)
                .div_ceil(cs)
                .min(first + (MAX_BATCH / cs).max(1));
            let upto = ((end * cs).min(off + n as u64) - off) as usize;
            self.write_locked(&layers, leaf, first, end, pos, &data[done..upto])?;
            done = upto;
        }
        Ok(n)
    }

    /// Writes `data` at guest offset `pos` into clusters [first, end) that were not plain
    /// allocated data when looked at: under the lock, completes each cluster with the
    /// chain's data (copy-on-write), then allocates or reuses its host cluster.
    fn write_locked(
        &self,
        layers: &Layers,
        leaf: &Qcow2,
        first: u64,
        end: u64,
        pos: u64,
        data: &[u8],
    ) -> Result<()> {
        let cs = self.cluster_size;
        let _guard = self.locks.lock(first, end);
        let start = first * cs;
        let stop = end * cs;
        let mut buf = vec![0u8; (stop - start) as usize];
        // Old contents only for the partly covered first and last clusters.
        let head = pos - start;
        let tail_from = pos + data.len() as u64;
        let read_cluster = |c: u64, buf: &mut [u8]| -> Result<()> {
            let (a, b) = (c * cs, (c * cs + cs).min(self.size));
            if a < b {
                read_layers(
                    layers,
                    0,
                    a,
                    &mut buf[(a - start) as usize..(b - start) as usize],
                )?;
            }
            Ok(())
        };
        if head > 0 {
            read_cluster(first, &mut buf)?;
        }
        if tail_from < stop && !(head > 0 && end - 1 == first) {
            read_cluster(end - 1, &mut buf)?;
        }
        buf[head as usize..head as usize + data.len()].copy_from_slice(data);

        // Per cluster: already-allocated data (a racing writer got there first) is
        // written in place; reusable host clusters (preallocated zero, partial extended
        // L2) in place then flipped to data; the rest into fresh clusters.
        let mut ops = Vec::with_capacity((end - first) as usize);
        for c in first..end {
            let base = c * cs;
            let write = (
                (base.max(pos) - base) as usize,
                ((base + cs).min(tail_from) - base) as usize,
            );
            ops.push(match leaf.cluster_state(c)? {
                ClusterState::Data { host, .. } => ClusterOp::Overwrite { host, write },
                old @ (ClusterState::Zero { host } | ClusterState::Mixed { host, .. })
                    if host != 0 =>
                {
                    ClusterOp::Complete {
                        old,
                        write: Some(write),
                    }
                }
                old => ClusterOp::Fresh { old },
            });
        }
        leaf.fill(&Batch {
            first,
            ops: &ops,
            data: &buf,
            writeback: false,
        })?;
        Ok(())
    }

    /// Makes [off, off+len) read as zeros, hiding backing data (fallocate PUNCH_HOLE and
    /// ZERO_RANGE). Whole clusters become zero clusters on a v3 leaf; partial ones (and a
    /// v2 leaf, which has no zero clusters) get zeros written.
    pub fn write_zeroes(&self, off: u64, len: u64) -> Result<()> {
        let len = self.check_write(off, len)?;
        let layers = self.layers();
        let Some(leaf) = self.leaf_qcow2(&layers) else {
            if let Image::Raw(r) = &layers[0].image {
                r.zero(off, len)?;
            }
            return Ok(());
        };
        let cs = self.cluster_size;
        let end = off + len;
        let (first_full, end_full) = if leaf.geometry().zero_flag {
            let a = off.div_ceil(cs);
            // A tail cluster cut by the end of the disk counts as whole.
            let b = if end == self.size {
                end.div_ceil(cs)
            } else {
                end / cs
            };
            (a, b.max(a))
        } else {
            (end.div_ceil(cs), end.div_ceil(cs))
        };
        let zeros_upto = |from: u64, to: u64| -> Result<()> {
            let zeros = vec![0u8; MAX_BATCH.min(to.saturating_sub(from)) as usize];
            let mut p = from;
            while p < to {
                let k = (to - p).min(zeros.len() as u64) as usize;
                self.write(p, &zeros[..k])?;
                p += k as u64;
            }
            Ok(())
        };
        if first_full >= end_full {
            return zeros_upto(off, end);
        }
        zeros_upto(off, first_full * cs)?;
        let mut c = first_full;
        while c < end_full {
            let e = end_full.min(c + (MAX_BATCH / cs).max(64));
            let _guard = self.locks.lock(c, e);
            let ops = (c..e)
                .map(|k| {
                    Ok(ClusterOp::Zero {
                        old: leaf.cluster_state(k)?,
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            leaf.fill(&Batch {
                first: c,
                ops: &ops,
                data: &[],
                writeback: false,
            })?;
            c = e;
        }
        zeros_upto((end_full * cs).min(end), end)
    }
}

#[cfg(test)]
mod tests {
    use std::path::{Path, PathBuf};

    use super::*;
    use crate::format::qcow2::tests::{ps, qemu_io, run};

    /// base (0x11 everywhere) <- top (extended L2, 128k clusters of 4k subclusters),
    /// whose first cluster QEMU allocated only partly: 0x22 in [0, 4k).
    fn partial_chain(dir: &Path) -> PathBuf {
        let base = dir.join("base.qcow2");
        let top = dir.join("top.qcow2");
        run(
            "qemu-img",
            &["create", "-q", "-f", "qcow2", ps(&base), "1M"],
        );
        qemu_io(&base, "write -P 0x11 0 1M");
        run(
            "qemu-img",
            &[
                "create",
                "-q",
                "-f",
                "qcow2",
                "-o",
                "extended_l2=on,cluster_size=131072",
                "-b",
                ps(&base),
                "-F",
                "qcow2",
                ps(&top),
            ],
        );
        qemu_io(&top, "write -P 0x22 0 4k");
        top
    }

    fn expect_view(chain: &Chain) {
        let mut buf = vec![0u8; 1 << 20];
        assert_eq!(chain.read(0, &mut buf).unwrap(), buf.len());
        assert!(buf[..4096].iter().all(|&b| b == 0x22));
        let bad = buf[4096..].iter().position(|&b| b != 0x11);
        assert_eq!(
            bad,
            None,
            "backing data lost at {:?}",
            bad.map(|p| p + 4096)
        );
    }

    #[test]
    fn stream_completes_partly_allocated_clusters_with_backing_data() {
        let dir = tempfile::tempdir().unwrap();
        let top = partial_chain(dir.path());
        let chain = Chain::open("t", &top, false, false).unwrap();
        let layers = chain.layers();
        let copied = chain.stream_fill(&layers, 0, 1 << 20, None).unwrap();
        assert_eq!(copied, (1 << 20) - 4096);
        assert_eq!(
            chain.first_unstreamed(&layers, 0, 1 << 20, None).unwrap(),
            None
        );
        // The leaf alone must now hold the guest view.
        chain.relink(&layers, None).unwrap();
        assert_eq!(chain.layers().len(), 1);
        expect_view(&chain);
    }

    #[test]
    fn copy_on_read_serves_and_copies_the_guest_view() {
        let dir = tempfile::tempdir().unwrap();
        let top = partial_chain(dir.path());
        let chain = Chain::open("t", &top, false, true).unwrap();
        // Unaligned, across the partly allocated cluster and whole ones.
        let mut part = vec![0u8; 300_000];
        assert_eq!(chain.read(1000, &mut part).unwrap(), part.len());
        assert!(part[..3096].iter().all(|&b| b == 0x22));
        assert!(part[3096..].iter().all(|&b| b == 0x11));
        expect_view(&chain);
        let layers = chain.layers();
        assert_eq!(
            chain.first_unstreamed(&layers, 0, 1 << 20, None).unwrap(),
            None
        );
    }
}
