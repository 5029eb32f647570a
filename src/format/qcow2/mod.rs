//! qcow2 images: lookup of guest offsets through L1/L2 tables (with a bounded LRU cache of
//! L2 tables), reading data and compressed clusters, and (for a writable leaf) cluster
//! allocation, refcounting and the ordered flush that keeps the file consistent on disk.
//!
//! Concurrency: one short mutex (`meta`) guards the in-memory metadata; it is not held
//! across I/O: changes are planned under it, their data, table and refcount-block reads
//! and metadata zeroing happen without it, and the commit re-checks under it (`fill`).
//! L2 tables are shared `Arc`s with their own RwLock (frozen slices for a read-only
//! image) so lookups read entries without the metadata lock. Callers (the chain layer)
//! serialize changes to a guest cluster with cluster locks; this module serializes the
//! metadata itself.
//!
//! Allocation only ever bumps the end of the file: a cluster whose refcount dropped to
//! zero is never reused while we run, so a reader holding an old mapping can never see
//! another cluster's data and a freed cluster is never rewritten before its freeing is
//! durable.

pub mod compress;
mod fill;
pub mod header;
pub mod l2;
mod overlap;
pub mod refcount;
#[cfg(test)]
pub(crate) mod tests;

use std::collections::{BTreeSet, HashMap};
use std::fs::File;
use std::hash::{BuildHasherDefault, Hasher};
use std::num::NonZeroUsize;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;

use lru::LruCache;
use parking_lot::{Mutex, RwLock};

pub use self::fill::{Batch, ClusterOp};
use self::header::{Compression, Header, HeaderError};
use self::l2::{decode_l1, ClusterState, Geometry, SubState};
use self::overlap::{overlaps, Kind, MetaMap};
use self::refcount::{RefIo, RefSnapshot, Refcounts};
use super::Mapping;
use crate::source::io::{fdatasync, pwrite_all, read_exact, vanished};
use crate::source::{writable_file, LocalFile, Source};
use crate::{Error, Result};

/// Bytes of L2 tables kept in the cache (per image), and of decompressed clusters.
const L2_CACHE_BYTES: u64 = 8 << 20;
const DECOMPRESSED_CACHE_BYTES: u64 = 16 << 20;
/// Host offsets must fit in bits 9..=55 of an L2 entry.
const MAX_HOST_OFFSET: u64 = 1 << 56;
/// Bytes of read-only L2 tables each thread keeps at hand (see `with_l2`).
const HINT_BYTES: u64 = 2 << 20;
/// Flush passes `flush_all` makes before it reports that metadata does not settle.
const MAX_FLUSH_PASSES: usize = 16;

/// Read-only L2 tables by (image id, table offset), per thread.
#[derive(Default)]
struct Hints {
    tables: HashMap<(u64, u64), Arc<L2Table>, BuildHasherDefault<KeyHasher>>,
    bytes: u64,
}

/// A multiplicative hash: the keys are two integers, no attacker picks them.
#[derive(Default)]
struct KeyHasher(u64);

impl Hasher for KeyHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.write_u64(*b as u64);
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = (self.0.rotate_left(5) ^ v).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

thread_local! {
    static L2_HINTS: std::cell::RefCell<Hints> = std::cell::RefCell::new(Hints::default());
}

/// Distinguishes images in the per-thread hints (a reopened file gets a new id).
static NEXT_IMAGE_ID: AtomicU64 = AtomicU64::new(1);

pub struct L2Table {
    words: Words,
    /// Changed since it was last written (only meaningful while pinned).
    dirty: AtomicBool,
}

/// A table's entries. A read-only image's tables are never changed, so they are plain
/// immutable slices that any thread may keep and read without a lock.
enum Words {
    Frozen(Box<[u64]>),
    Live(RwLock<Vec<u64>>),
}

impl L2Table {
    fn from_bytes(b: &[u8], frozen: bool) -> Self {
        let words = b
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")));
        L2Table {
            words: if frozen {
                Words::Frozen(words.collect())
            } else {
                Words::Live(RwLock::new(words.collect()))
            },
            dirty: AtomicBool::new(false),
        }
    }
    /// Runs `f` on the entries (under a shared lock unless the table is frozen).
    fn read<R>(&self, f: impl FnOnce(&[u64]) -> R) -> R {
        match &self.words {
            Words::Frozen(w) => f(w),
            Words::Live(w) => f(&w.read()),
        }
    }
    /// The entries for modification; None for a read-only image's table.
    fn live(&self) -> Option<&RwLock<Vec<u64>>> {
        match &self.words {
            Words::Frozen(_) => None,
            Words::Live(w) => Some(w),
        }
    }
    fn to_bytes(&self) -> Vec<u8> {
        self.read(|w| w.iter().flat_map(|w| w.to_be_bytes()).collect())
    }
}

struct Meta {
    l1_dirty: BTreeSet<usize>,
    /// Dirty L2 tables (and ones being written): never evicted; the authoritative copy
    /// whenever present.
    pinned: HashMap<u64, Arc<L2Table>>,
    /// Bumped whenever a flush takes L2 tables to write: a table read from disk outside
    /// the lock is trusted only if no flush started meanwhile (see `l2_table`).
    l2_gen: u64,
    refs: Option<Refcounts>,
    space: Space,
    /// Host clusters losing a reference; applied once the L2 change is durable.
    pending_decref: Vec<u64>,
}

/// Host space: the end of the used area, and metadata clusters already zeroed (space
/// reserved) outside the lock for the next commits to take (see `fill::reserve_spare`).
struct Space {
    next_free: u64,
    /// `next_free`, readable without the metadata lock (guest writes check against it).
    end: Arc<AtomicU64>,
    spare: Vec<u64>,
    /// Where the file cannot grow past: the end of a block device (a full device fails
    /// the write with ENOSPC, as a full file system does), or qcow2's own limit.
    limit: u64,
}

impl Space {
    /// Takes `n` clusters at the end of the used area.
    fn bump(&mut self, n: u64, cluster_size: u64) -> Result<u64> {
        let off = self.next_free;
        let end = off
            .checked_add(n * cluster_size)
            .filter(|&e| e <= self.limit)
            .ok_or_else(|| {
                let what = if self.limit < MAX_HOST_OFFSET {
                    "the block device under the image is full"
                } else {
                    "qcow2 image reached its maximum host size"
                };
                Error::state(libc::ENOSPC, what)
            })?;
        self.next_free = end;
        self.end.store(end, Ordering::Release);
        Ok(off)
    }
}

/// Everything one flush writes, captured under the metadata lock.
struct Snapshot {
    refs: RefSnapshot,
    table_moved: bool,
    header: Option<Vec<u8>>,
    l2: Vec<(u64, Vec<u8>, Arc<L2Table>)>,
    l1: Vec<(u64, Vec<u8>)>,
    l1_indexes: Vec<usize>,
    decref: Vec<u64>,
    freed_after_header: Vec<(u64, u64)>,
}

pub struct Qcow2 {
    id: u64,
    /// The source's name (path or URI), for messages.
    path: PathBuf,
    /// Where the bytes come from; only a local file is ever written.
    src: Arc<dyn Source>,
    geo: Geometry,
    size: u64,
    compression: Compression,
    writable: bool,
    header: Mutex<Header>,
    /// L1 entries: read without locks on every lookup; changed under `meta`.
    l1: Vec<AtomicU64>,
    /// Metadata that guest data must never overwrite: the L1 table (offset, bytes) and
    /// the refcount table currently in the header.
    l1_range: (u64, u64),
    reftable_range: [AtomicU64; 2],
    /// Clean and dirty L2 tables. Hits only `peek` (shared lock, no recency update, so
    /// eviction is first-in first-out); inserts happen under `meta`, and never replace
    /// a table with a different copy of it.
    l2_cache: RwLock<LruCache<u64, Arc<L2Table>>>,
    meta: Mutex<Meta>,
    /// Serializes loading the refcounts (done outside `meta`: it reads the table and
    /// scans blocks from the end of the file).
    refs_init: Mutex<()>,
    /// `meta.refs` is loaded (it never goes away again): spares writes a lock round trip.
    refs_loaded: AtomicBool,
    flush_lock: Mutex<()>,
    decompressed: Mutex<LruCache<u64, Arc<Vec<u8>>>>,
    /// Data was written since the last fdatasync.
    unsynced: AtomicBool,
    /// Guest bytes this image defines itself (data or zero), once counted.
    defined: Mutex<Option<u64>>,
    /// Where the L2 tables and refcount blocks are, for the overlap check.
    overlap: MetaMap,
    /// The end of the used area (a mirror of `Space::next_free`).
    end: Arc<AtomicU64>,
}

/// The refcount module's view of the file: block loads and end-of-file allocation.
struct FileRefIo<'a> {
    src: &'a dyn Source,
    file: Result<&'a File>,
    path: &'a Path,
    cluster_size: u64,
    space: &'a mut Space,
}

impl RefIo for FileRefIo<'_> {
    fn load_block(&mut self, offset: u64) -> Result<Vec<u8>> {
        let mut b = vec![0u8; self.cluster_size as usize];
        read_exact(self.src, &mut b, offset, "refcount block")?;
        Ok(b)
    }
    fn alloc_clusters(&mut self, n: u64) -> Result<u64> {
        if n == 1 {
            if let Some(off) = self.space.spare.pop() {
                return Ok(off);
            }
        }
        // Rare (the commit's estimate fell short, or the refcount table grows): zero
        // under the lock. Metadata clusters get their space now, so a full disk fails
        // here, before anything points at them, and never in the middle of a flush.
        let off = self.space.bump(n, self.cluster_size)?;
        let zeros = vec![0u8; (n * self.cluster_size) as usize];
        let file = self
            .file
            .as_ref()
            .map_err(|e| Error::state(e.errno(), e.to_string()))?;
        pwrite_all(file, self.path, &zeros, off, "new metadata cluster")?;
        Ok(off)
    }
    fn corrupt(&self, msg: String) -> Error {
        Error::corrupt(self.path, msg)
    }
}

fn header_err(path: &Path, e: HeaderError) -> Error {
    match e {
        HeaderError::Corrupt(m) => Error::corrupt(path, m),
        HeaderError::Unsupported(m) => Error::unsupported(path, m),
    }
}

impl Snapshot {
    fn is_empty(&self) -> bool {
        self.refs.blocks.is_empty()
            && self.refs.table.is_empty()
            && self.header.is_none()
            && self.l2.is_empty()
            && self.l1.is_empty()
            && self.decref.is_empty()
            && self.freed_after_header.is_empty()
    }
}

impl Qcow2 {
    /// Opens a local qcow2 image. `writable` opens the file read-write and validates that
    /// we can keep it consistent; a read-only open accepts images QEMU opens read-only.
    pub fn open(path: &Path, writable: bool) -> Result<Qcow2> {
        Qcow2::open_source(Arc::new(LocalFile::open(path, writable)?))
    }

    /// Opens a qcow2 image on any byte source; writable if the source is a writable
    /// local file.
    pub fn open_source(src: Arc<dyn Source>) -> Result<Qcow2> {
        let writable = src.local().is_some_and(LocalFile::is_writable);
        let path = &PathBuf::from(src.name());
        let len = src.size();
        let device = src.local().is_some_and(|l| l.device_block().is_some());
        let mut probe = vec![0u8; (Header::PROBE_LEN as u64).min(len) as usize];
        read_exact(&*src, &mut probe, 0, "header")?;
        let cluster_bits = Header::probe_cluster_bits(&probe).map_err(|e| header_err(path, e))?;
        let mut first = vec![0u8; (1u64 << cluster_bits).min(len) as usize];
        read_exact(&*src, &mut first, 0, "header cluster")?;
        let mut header = Header::parse(&first, len).map_err(|e| header_err(path, e))?;

        if writable {
            if header.is_corrupt() {
                return Err(Error::unsupported(
                    path,
                    "image is marked corrupt; QEMU opens such images only read-only (use --read-only), or repair it with qemu-img check -r all",
                ));
            }
            if header.is_dirty() {
                return Err(Error::unsupported(
                    path,
                    "image has the dirty bit set (lazy refcounts); repair it with qemu-img check -r all first",
                ));
            }
            if header.nb_snapshots > 0 {
                return Err(Error::unsupported(
                    path,
                    "writing to an image with internal snapshots (use --read-only, or qemu-img snapshot -d)",
                ));
            }
        }
        let geo = Geometry {
            cluster_bits,
            extended: header.extended_l2(),
            zero_flag: header.version >= 3,
        };
        let mut l1_bytes = vec![0u8; header.l1_size as usize * 8];
        read_exact(&*src, &mut l1_bytes, header.l1_table_offset, "L1 table")?;
        let l1 = l1_bytes
            .chunks_exact(8)
            .map(|c| AtomicU64::new(u64::from_be_bytes(c.try_into().expect("8 bytes"))))
            .collect();

        let cs = geo.cluster_size();
        let l2_cap = (L2_CACHE_BYTES / cs).max(16) as usize;
        let dc_cap = (DECOMPRESSED_CACHE_BYTES / cs).max(4) as usize;
        let used_end = if device { cs } else { len.div_ceil(cs) * cs };
        let end = Arc::new(AtomicU64::new(used_end));
        let img = Qcow2 {
            id: NEXT_IMAGE_ID.fetch_add(1, Ordering::Relaxed),
            path: path.to_path_buf(),
            size: header.size,
            compression: header.compression,
            writable,
            geo,
            l1,
            l1_range: (header.l1_table_offset, header.l1_size as u64 * 8),
            reftable_range: [
                AtomicU64::new(header.refcount_table_offset),
                AtomicU64::new(header.refcount_table_clusters as u64 * cs),
            ],
            l2_cache: RwLock::new(LruCache::new(NonZeroUsize::new(l2_cap).expect("nonzero"))),
            meta: Mutex::new(Meta {
                l1_dirty: BTreeSet::new(),
                pinned: HashMap::new(),
                l2_gen: 0,
                refs: None,
                // On a block device the used area ends where the refcounts say (loaded
                // at open below), not at the device's end.
                space: Space {
                    next_free: used_end,
                    end: end.clone(),
                    spare: Vec::new(),
                    limit: if device {
                        len / cs * cs
                    } else {
                        MAX_HOST_OFFSET
                    },
                },
                pending_decref: Vec::new(),
            }),
            refs_init: Mutex::new(()),
            refs_loaded: AtomicBool::new(false),
            header: Mutex::new(header.clone()),
            flush_lock: Mutex::new(()),
            decompressed: Mutex::new(LruCache::new(NonZeroUsize::new(dc_cap).expect("nonzero"))),
            unsynced: AtomicBool::new(false),
            defined: Mutex::new(None),
            overlap: MetaMap::default(),
            end,
            src,
        };
        if writable && header.autoclear_features != 0 {
            // We do not maintain what autoclear features describe (e.g. bitmaps): clearing
            // the bits tells every reader those extensions are stale (qcow2.rst).
            header.autoclear_features = 0;
            *img.header.lock() = header;
            img.write_header()?;
        }
        // The L2 tables the image has now; new ones are added as they are made.
        img.overlap.add_all(
            img.l1
                .iter()
                .filter_map(|e| decode_l1(e.load(Ordering::Relaxed), cs).ok())
                .filter(|&o| o != 0),
            Kind::L2,
        );
        if device {
            // Where the used area ends (for allocation and `alloc_end`) is known only
            // from the refcounts on a device.
            img.load_refs()?;
        }
        Ok(img)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    pub fn size(&self) -> u64 {
        self.size
    }
    pub fn cluster_size(&self) -> u64 {
        self.geo.cluster_size()
    }
    pub fn geometry(&self) -> Geometry {
        self.geo
    }
    /// End of the highest allocated cluster (allocation only ever bumps it).
    pub fn alloc_end(&self) -> u64 {
        self.end.load(Ordering::Acquire)
    }
    pub fn is_writable(&self) -> bool {
        self.writable
    }
    /// (backing file name as stored, backing format if given).
    pub fn backing(&self) -> Option<(String, Option<String>)> {
        let h = self.header.lock();
        h.backing_file
            .clone()
            .map(|f| (f, h.backing_format.clone()))
    }

    /// The local file, for writing: a remote image is never written.
    fn file(&self) -> Result<&File> {
        writable_file(&*self.src, self.writable)
    }

    /// The byte source the image is read from.
    pub fn source(&self) -> &Arc<dyn Source> {
        &self.src
    }

    fn corrupt(&self, msg: impl Into<String>) -> Error {
        Error::corrupt(&self.path, msg)
    }

    /// The refcount logic's access to this file, allocating from `space`.
    fn ref_io<'a>(&'a self, space: &'a mut Space) -> FileRefIo<'a> {
        FileRefIo {
            src: &*self.src,
            file: self.file(),
            path: &self.path,
            cluster_size: self.geo.cluster_size(),
            space,
        }
    }

    fn l2_offset(&self, l1_index: u64) -> Result<u64> {
        let entry = self
            .l1
            .get(l1_index as usize)
            .map_or(0, |e| e.load(Ordering::Acquire));
        decode_l1(entry, self.geo.cluster_size()).map_err(|m| self.corrupt(m))
    }

    /// The cached table at `off` (pinned first: it is authoritative), re-inserting a
    /// pinned table that fell out of the cache. Called with the metadata lock held.
    fn cached_l2(&self, m: &Meta, off: u64) -> Option<Arc<L2Table>> {
        if let Some(t) = m.pinned.get(&off) {
            let mut cache = self.l2_cache.write();
            if cache.peek(&off).is_none() {
                cache.put(off, t.clone());
            }
            return Some(t.clone());
        }
        self.l2_cache.read().peek(&off).cloned()
    }

    /// The L2 table at `off`, from the cache or the file. Hits take no exclusive lock;
    /// the disk read happens without the metadata lock, and if another thread inserted
    /// the table meanwhile, theirs wins (it may already hold changes).
    ///
    /// A table that is neither cached nor pinned is clean, so the file holds its current
    /// contents; the copy read is stale only if, during the read, someone loaded, changed
    /// and flushed it and it was evicted again. `l2_gen` catches that: read again.
    fn l2_table(&self, off: u64) -> Result<Arc<L2Table>> {
        if let Some(t) = self.l2_cache.read().peek(&off) {
            return Ok(t.clone());
        }
        loop {
            let gen = {
                let m = self.meta.lock();
                if let Some(t) = self.cached_l2(&m, off) {
                    return Ok(t);
                }
                m.l2_gen
            };
            let mut buf = vec![0u8; self.geo.cluster_size() as usize];
            read_exact(&*self.src, &mut buf, off, "L2 table")?;
            let table = Arc::new(L2Table::from_bytes(&buf, !self.writable));
            let m = self.meta.lock();
            if let Some(t) = self.cached_l2(&m, off) {
                return Ok(t);
            }
            if m.l2_gen == gen {
                self.l2_cache.write().put(off, table.clone());
                return Ok(table);
            }
        }
    }

    fn decode(&self, words: &[u64], idx: usize) -> Result<ClusterState> {
        let w = self.geo.words();
        let (word, bitmap) = (words[idx * w], if w == 2 { words[idx * w + 1] } else { 0 });
        self.geo.decode(word, bitmap).map_err(|m| self.corrupt(m))
    }

    /// Runs `f` on the entries of the L2 table at `off`.
    ///
    /// A read-only image's tables never change once loaded, so each thread keeps its own
    /// recently used ones and reads them without any lock or shared-counter update: in a
    /// deep chain every guest read walks many backing images, and atomics on shared
    /// cache lines (cache lock, Arc counts, table locks) were most of its cost.
    fn with_l2<R>(&self, off: u64, f: impl FnOnce(&[u64]) -> Result<R>) -> Result<R> {
        if self.writable {
            return self.l2_table(off)?.read(f);
        }
        L2_HINTS.with(|hints| {
            let mut hints = hints.borrow_mut();
            let key = (self.id, off);
            if !hints.tables.contains_key(&key) {
                let table = self.l2_table(off)?;
                let cs = self.geo.cluster_size();
                if hints.bytes + cs > HINT_BYTES {
                    // Simplest bounded policy: start over (also drops closed images).
                    hints.tables.clear();
                    hints.bytes = 0;
                }
                hints.bytes += cs;
                hints.tables.insert(key, table);
            }
            // Frozen (read-only image): no lock, no shared counter touched.
            hints.tables[&key].read(f)
        })
    }

    /// The state of guest cluster `ci`.
    pub fn cluster_state(&self, ci: u64) -> Result<ClusterState> {
        let l2e = self.geo.l2_entries();
        let l2off = self.l2_offset(ci / l2e)?;
        if l2off == 0 {
            return Ok(ClusterState::Unallocated);
        }
        self.l2_table(l2off)?
            .read(|words| self.decode(words, (ci % l2e) as usize))
    }

    /// Maps guest range [off, off+len) (inside the disk): returns how the first part is
    /// stored and how many bytes share that mapping (contiguous on the host for data).
    pub fn map(&self, off: u64, len: u64) -> Result<(Mapping, u64)> {
        let cb = self.geo.cluster_bits;
        let cs = self.geo.cluster_size();
        let l2e = self.geo.l2_entries();
        let ci = off >> cb;
        let l1_end = (ci / l2e + 1) * l2e * cs;
        let end = off + len.min(l1_end - off);
        let l2off = self.l2_offset(ci / l2e)?;
        if l2off == 0 {
            return Ok((Mapping::Unallocated, end - off));
        }
        self.with_l2(l2off, |words| {
            let sub = self.geo.subcluster_size();
            let mut first: Option<Mapping> = None;
            let mut pos = off;
            let w = self.geo.words();
            while pos < end {
                let idx = ((pos >> cb) % l2e) as usize;
                // Fast path: an all-zero entry is unallocated (most entries of a sparse
                // layer in a deep chain).
                let state = if words[idx * w..idx * w + w].iter().all(|&x| x == 0) {
                    ClusterState::Unallocated
                } else {
                    self.decode(words, idx)?
                };
                let cluster_start = pos & !(cs - 1);
                let in_cluster = pos - cluster_start;
                if let ClusterState::Compressed { host, len } = state {
                    if first.is_some() {
                        break;
                    }
                    let m = Mapping::Compressed {
                        host,
                        len,
                        cluster_start,
                    };
                    return Ok((m, end.min(cluster_start + cs) - off));
                }
                let si = in_cluster / sub;
                let m = match state.sub(si as u32) {
                    SubState::Unallocated => Mapping::Unallocated,
                    SubState::Zero => Mapping::Zero,
                    SubState::Data => Mapping::Data {
                        host: state.host() + in_cluster,
                    },
                };
                match first {
                    None => first = Some(m),
                    Some(f) if !f.continues_with(&m, pos - off) => break,
                    Some(_) => {}
                }
                pos = end.min(cluster_start + (si + 1) * sub);
            }
            Ok((first.unwrap_or(Mapping::Unallocated), pos - off))
        })
    }

    /// Reads data for a mapping returned by `map` (not Unallocated) into `buf`, where `off`
    /// is the guest offset of `buf[0]`.
    pub fn read_mapped(&self, m: Mapping, off: u64, buf: &mut [u8]) -> Result<()> {
        match m {
            Mapping::Zero | Mapping::Unallocated => buf.fill(0),
            Mapping::Data { host } => {
                // A short tail is normal (QEMU may leave a last cluster unwritten), but
                // no byte at all means the file shrank under us.
                if self.src.read_at(buf, host)? == 0 && !buf.is_empty() {
                    return Err(vanished(&self.path, host));
                }
            }
            Mapping::Compressed {
                host,
                len,
                cluster_start,
            } => {
                let data = self.decompressed_cluster(host, len)?;
                let at = (off - cluster_start) as usize;
                buf.copy_from_slice(&data[at..at + buf.len()]);
            }
        }
        Ok(())
    }

    fn decompressed_cluster(&self, host: u64, len: u64) -> Result<Arc<Vec<u8>>> {
        if let Some(d) = self.decompressed.lock().get(&host) {
            return Ok(d.clone());
        }
        let mut input = vec![0u8; len as usize];
        if self.src.read_at(&mut input, host)? == 0 {
            return Err(vanished(&self.path, host));
        }
        let mut out = vec![0u8; self.geo.cluster_size() as usize];
        compress::decompress(self.compression, &input, &mut out).map_err(|m| {
            self.corrupt(format!("compressed cluster at host offset {host:#x}: {m}"))
        })?;
        let out = Arc::new(out);
        self.decompressed.lock().put(host, out.clone());
        Ok(out)
    }

    // ---- writing (leaf only) ----

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(Error::state(
                libc::EROFS,
                format!("{} is open read-only", self.path.display()),
            ))
        }
    }

    /// Loads the refcount table on first use and finds the end of the used area. The
    /// reads and the scan happen outside the metadata lock (lookups go on meanwhile).
    fn load_refs(&self) -> Result<()> {
        if self.refs_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        let _init = self.refs_init.lock();
        if self.refs_loaded.load(Ordering::Acquire) {
            return Ok(());
        }
        // Stable while refs are not loaded: only a flush of loaded refs changes them.
        let h = self.header.lock().clone();
        let cs = self.geo.cluster_size();
        let mut bytes = vec![0u8; (h.refcount_table_clusters as u64 * cs) as usize];
        read_exact(
            &*self.src,
            &mut bytes,
            h.refcount_table_offset,
            "refcount table",
        )?;
        let table = bytes
            .chunks_exact(8)
            .map(|c| u64::from_be_bytes(c.try_into().expect("8 bytes")))
            .collect();
        let mut refs = Refcounts::new(
            h.refcount_order,
            cs,
            table,
            h.refcount_table_offset,
            h.refcount_table_clusters as u64,
        );
        // The scan only loads blocks; nothing is allocated from this scratch space.
        let mut scratch = Space {
            next_free: 0,
            end: Arc::default(),
            spare: Vec::new(),
            limit: MAX_HOST_OFFSET,
        };
        let last = refs.last_used_cluster(&mut self.ref_io(&mut scratch))?;
        self.overlap.add_all(refs.block_offsets(), Kind::RefBlock);
        let mut m = self.meta.lock();
        if let Some(last) = last {
            m.space.next_free = m.space.next_free.max((last + 1) * cs);
            m.space.end.store(m.space.next_free, Ordering::Release);
        }
        m.refs = Some(refs);
        self.refs_loaded.store(true, Ordering::Release);
        Ok(())
    }

    /// Reserves `n` contiguous fresh clusters at the end of the file for guest data.
    /// Their refcounts are set when the clusters are committed, so a failed data write
    /// leaves nothing but unreferenced space.
    fn allocate(&self, n: u64) -> Result<u64> {
        self.check_writable()?;
        self.load_refs()?;
        let mut m = self.meta.lock();
        m.space.bump(n, self.geo.cluster_size())
    }

    /// Writes guest data at `host`. Refuses (as QEMU's overlap check does) a write that
    /// would land on the header, the L1 table or the refcount table: only a corrupt or
    /// hostile L2 entry points there, and writing would destroy the image.
    pub fn pwrite(&self, host: u64, buf: &[u8]) -> Result<()> {
        // The refcount blocks are known once the refcounts are loaded.
        self.load_refs()?;
        self.check_overlap(host, buf.len() as u64, Kind::Data)?;
        // An allocated cluster lies inside the used area; one past it (a corrupt entry)
        // would grow the file wherever the entry says (reads of it fail the same way).
        let end = host.saturating_add(buf.len() as u64);
        if end > self.end.load(Ordering::Acquire) {
            return Err(self.corrupt(format!(
                "refusing a guest write at host offset {host:#x}: beyond the end of the image"
            )));
        }
        self.unsynced.store(true, Ordering::Release);
        pwrite_all(self.file()?, &self.path, buf, host, "guest data")
    }

    /// Refuses a write of `what` to [host, host+len) that would land on metadata of
    /// another kind (QEMU: "Preventing invalid write on metadata").
    fn check_overlap(&self, host: u64, len: u64, what: Kind) -> Result<()> {
        let end = host.saturating_add(len);
        let cs = self.geo.cluster_size();
        let reftable = (
            self.reftable_range[0].load(Ordering::Acquire),
            self.reftable_range[1].load(Ordering::Acquire),
        );
        let fixed = [
            (Kind::Header, (0, cs)),
            (Kind::L1, self.l1_range),
            (Kind::RefTable, reftable),
        ];
        let hit = fixed
            .iter()
            .find(|(k, r)| *k != what && overlaps(host, end, *r))
            .map(|(k, r)| (r.0, *k))
            .or_else(|| self.overlap.hit(host, end, cs, what));
        match hit {
            None => Ok(()),
            Some((at, kind)) => Err(self.corrupt(format!(
                "preventing an invalid write of {} at host offset {host:#x}: it overlaps {} at {at:#x}",
                what.name(),
                kind.name()
            ))),
        }
    }

    /// Asks the kernel to start writing [host, host+len) to disk now, without waiting
    /// (a hint: errors are ignored, a later fdatasync reports them).
    fn start_writeback(&self, host: u64, len: u64) {
        let Ok(f) = self.file() else { return };
        // SAFETY: sync_file_range on our own fd; no memory is passed.
        unsafe {
            libc::sync_file_range(
                f.as_raw_fd(),
                host as libc::off64_t,
                len as libc::off64_t,
                libc::SYNC_FILE_RANGE_WRITE,
            );
        }
    }

    /// Bytes of one cluster that a state defines (all of them unless subclusters fall through).
    fn defined_in(&self, st: ClusterState) -> u64 {
        match st {
            ClusterState::Unallocated => 0,
            ClusterState::Mixed { alloc, zero, .. } => {
                (alloc | zero).count_ones() as u64 * self.geo.subcluster_size()
            }
            _ => self.geo.cluster_size(),
        }
    }

    /// Guest bytes defined by this image itself (counted once by scanning the L2 tables,
    /// then kept up to date by commits). The last cluster may overhang the disk.
    pub fn defined_bytes(&self) -> Result<u64> {
        if let Some(d) = *self.defined.lock() {
            return Ok(d.min(self.size));
        }
        let l2e = self.geo.l2_entries();
        let n_l1 = self.l1.len() as u64;
        let mut total = 0;
        for l1i in 0..n_l1 {
            let off = self.l2_offset(l1i)?;
            if off == 0 {
                continue;
            }
            total += self.l2_table(off)?.read(|words| {
                (0..l2e as usize).try_fold(0, |sum, idx| {
                    Ok::<_, Error>(sum + self.defined_in(self.decode(words, idx)?))
                })
            })?;
        }
        let mut d = self.defined.lock();
        // A commit may have run meanwhile without a counter; a rescan would be exact,
        // but the difference is at most what changed during the scan.
        *d = Some(total);
        Ok(total.min(self.size))
    }

    /// Queues the references an old cluster state held for release after the next flush.
    fn release(&self, pending: &mut Vec<u64>, old: ClusterState) {
        let cs = self.geo.cluster_size();
        match old {
            ClusterState::Compressed { host, len } => {
                pending.extend(self.geo.compressed_clusters(host, len).map(|h| h / cs))
            }
            ClusterState::Unallocated => {}
            s if s.host() != 0 => pending.push(s.host() / cs),
            _ => {}
        }
    }

    /// Bytes of L2 tables held in memory until a flush writes them back (dirty tables
    /// cannot be evicted from the cache).
    pub fn pinned_bytes(&self) -> u64 {
        self.meta.lock().pinned.len() as u64 * self.geo.cluster_size()
    }

    /// True when metadata changes are waiting for a flush.
    pub fn has_dirty_metadata(&self) -> bool {
        let m = self.meta.lock();
        !m.l1_dirty.is_empty()
            || !m.pending_decref.is_empty()
            || m.pinned.values().any(|t| t.dirty.load(Ordering::Acquire))
            || m.refs.as_ref().is_some_and(|r| r.is_dirty())
    }

    /// Makes every write acknowledged so far durable, in the order that keeps the image
    /// consistent after a crash at any point:
    ///   1. data + refcount blocks, then fdatasync: a refcount is durable before anything
    ///      points at its cluster; then refcount table entries (or a moved table), fdatasync;
    ///   2. the header, if the refcount table moved, then fdatasync;
    ///   3. L2 tables, then fdatasync: data is durable before the entry pointing at it;
    ///   4. L1 entries, then fdatasync: an L2 table is durable before the L1 entry.
    ///
    /// References dropped by this flush's L2 changes are released in memory afterwards
    /// and reach the disk with the next flush (a crash in between only leaks clusters).
    pub fn flush(&self) -> Result<()> {
        if !self.writable {
            return Ok(());
        }
        let _serial = self.flush_lock.lock();
        // Taken before the snapshot: data written after this point is covered by a later
        // flush, and metadata pointing at it is not in this snapshot.
        let data = self.unsynced.swap(false, Ordering::AcqRel);
        let snap = self.take_snapshot()?;
        if !data && snap.is_empty() {
            return Ok(());
        }
        let result = self.write_snapshot(&snap);
        if result.is_err() && data {
            self.unsynced.store(true, Ordering::Release);
        }
        let mut guard = self.meta.lock();
        let m = &mut *guard;
        match result {
            Err(e) => {
                if let Some(r) = m.refs.as_mut() {
                    r.restore(&snap.refs);
                    r.table_moved |= snap.table_moved;
                    r.freed_after_header.extend(&snap.freed_after_header);
                }
                for (_, _, t) in &snap.l2 {
                    t.dirty.store(true, Ordering::Release);
                }
                m.l1_dirty.extend(&snap.l1_indexes);
                m.pending_decref.extend(&snap.decref);
                Err(e)
            }
            Ok(()) => {
                // Everything pinned and clean is on disk now (tables changed while we
                // wrote are dirty again and stay pinned).
                let clean: Vec<u64> = m
                    .pinned
                    .iter()
                    .filter(|(_, t)| !t.dirty.load(Ordering::Acquire))
                    .map(|(&off, _)| off)
                    .collect();
                let mut cache = self.l2_cache.write();
                for off in clean {
                    if let Some(t) = m.pinned.remove(&off) {
                        if cache.peek(&off).is_none() {
                            cache.put(off, t);
                        }
                    }
                }
                let cs = self.geo.cluster_size();
                let mut released: Vec<u64> = snap.decref.clone();
                for &(off, n) in &snap.freed_after_header {
                    released.extend((0..n).map(|i| off / cs + i));
                }
                if let Some(refs) = m.refs.as_mut() {
                    let mut io = self.ref_io(&mut m.space);
                    for c in released {
                        if let Err(e) = refs.adjust(c, -1, &mut io) {
                            log::warn!(
                                "{}: releasing cluster {c}: {e} (the cluster leaks)",
                                self.path.display()
                            );
                        }
                    }
                }
                Ok(())
            }
        }
    }

    /// Flushes until nothing is dirty (releases made by one flush need a second one).
    /// Fails rather than return with metadata still dirty: the caller (unmount, a
    /// relink) relies on the image being complete on disk.
    pub fn flush_all(&self) -> Result<()> {
        self.flush_until_clean(|| self.flush())
    }

    /// Runs `flush` until no metadata is dirty. Without concurrent writers two or three
    /// passes suffice; writers that keep dirtying metadata make it give up with an error.
    fn flush_until_clean(&self, mut flush: impl FnMut() -> Result<()>) -> Result<()> {
        for _ in 0..MAX_FLUSH_PASSES {
            flush()?;
            if !self.has_dirty_metadata() {
                return Ok(());
            }
        }
        Err(Error::state(
            libc::EBUSY,
            format!(
                "{}: metadata still dirty after {MAX_FLUSH_PASSES} flushes (writes kept coming)",
                self.path.display()
            ),
        ))
    }

    fn take_snapshot(&self) -> Result<Snapshot> {
        let mut guard = self.meta.lock();
        let m = &mut *guard;
        let (refs, table_moved, freed_after_header, header) = match m.refs.as_mut() {
            Some(r) => {
                self.overlap.add_all(r.take_new_blocks(), Kind::RefBlock);
                // snapshot() writes the whole table when it moved; then the header must
                // be switched to it before any L2 entry relies on its blocks.
                let s = r.snapshot();
                let moved = std::mem::take(&mut r.table_moved);
                let mut header = None;
                let mut freed = Vec::new();
                if moved {
                    let mut h = self.header.lock();
                    h.refcount_table_offset = r.table_offset;
                    h.refcount_table_clusters = r.table_clusters as u32;
                    // Guest data never lands in fresh table clusters (allocation only
                    // bumps), so tracking the table from this point on is enough.
                    self.reftable_range[0].store(r.table_offset, Ordering::Release);
                    self.reftable_range[1].store(
                        r.table_clusters * self.geo.cluster_size(),
                        Ordering::Release,
                    );
                    header = Some(h.encode().map_err(|e| header_err(&self.path, e))?);
                    freed = std::mem::take(&mut r.freed_after_header);
                }
                (s, moved, freed, header)
            }
            None => (RefSnapshot::default(), false, Vec::new(), None),
        };
        let mut l2 = Vec::new();
        for (&off, t) in &m.pinned {
            if t.dirty.swap(false, Ordering::AcqRel) {
                l2.push((off, t.to_bytes(), t.clone()));
            }
        }
        if !l2.is_empty() {
            m.l2_gen += 1;
        }
        let l1_indexes: Vec<usize> = std::mem::take(&mut m.l1_dirty).into_iter().collect();
        let h = self.header.lock();
        let l1 = l1_indexes
            .iter()
            .map(|&i| {
                (
                    h.l1_table_offset + i as u64 * 8,
                    self.l1[i].load(Ordering::Acquire).to_be_bytes().to_vec(),
                )
            })
            .collect();
        drop(h);
        Ok(Snapshot {
            refs,
            table_moved,
            header,
            l2,
            l1,
            l1_indexes,
            decref: std::mem::take(&mut m.pending_decref),
            freed_after_header,
        })
    }

    fn write_snapshot(&self, s: &Snapshot) -> Result<()> {
        let (f, p) = (self.file()?, self.path.as_path());
        // Nothing reaches the disk if any of it would land on other metadata.
        let checks = s
            .refs
            .blocks
            .iter()
            .map(|(o, b)| (*o, b.len(), Kind::RefBlock))
            .chain(
                s.refs
                    .table
                    .iter()
                    .map(|(o, b)| (*o, b.len(), Kind::RefTable)),
            )
            .chain(s.l2.iter().map(|(o, b, _)| (*o, b.len(), Kind::L2)))
            .chain(s.l1.iter().map(|(o, b)| (*o, b.len(), Kind::L1)));
        for (off, len, kind) in checks {
            self.check_overlap(off, len as u64, kind)?;
        }
        for (off, b) in &s.refs.blocks {
            pwrite_all(f, p, b, *off, "refcount block")?;
        }
        fdatasync(f, p)?;
        // A table entry (or a moved table) must not reach the disk before the block it
        // points at.
        if !s.refs.table.is_empty() {
            for (off, b) in &s.refs.table {
                pwrite_all(f, p, b, *off, "refcount table")?;
            }
            fdatasync(f, p)?;
        }
        if let Some(h) = &s.header {
            pwrite_all(f, p, h, 0, "header")?;
            fdatasync(f, p)?;
        }
        if !s.l2.is_empty() {
            for (off, b, _) in &s.l2 {
                pwrite_all(f, p, b, *off, "L2 table")?;
            }
            fdatasync(f, p)?;
        }
        if !s.l1.is_empty() {
            for (off, b) in &s.l1 {
                pwrite_all(f, p, b, *off, "L1 entry")?;
            }
            fdatasync(f, p)?;
        }
        Ok(())
    }

    fn write_header(&self) -> Result<()> {
        let bytes = self
            .header
            .lock()
            .encode()
            .map_err(|e| header_err(&self.path, e))?;
        pwrite_all(self.file()?, &self.path, &bytes, 0, "header")?;
        fdatasync(self.file()?, &self.path)
    }

    /// Durably rewrites the backing link (None removes it). Everything written before is
    /// flushed first, so the new link never points at data that is not yet in the image.
    pub fn set_backing(&self, file: Option<String>, format: Option<String>) -> Result<()> {
        self.check_writable()?;
        self.flush_all()?;
        let _serial = self.flush_lock.lock();
        let old = {
            let mut h = self.header.lock();
            let old = h.clone();
            h.set_backing(file, format);
            old
        };
        if let Err(e) = self.write_header() {
            *self.header.lock() = old;
            return Err(e);
        }
        Ok(())
    }
}
