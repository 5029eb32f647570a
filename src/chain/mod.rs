//! A backing chain presented as one disk: guest reads resolve each range to the highest
//! layer that has it; copy-on-read and guest writes go into the leaf (layer 0), serialized
//! per leaf cluster (see `locks`).
//!
//! Where to look: `read` resolves reads through the layers (and `seek`), `copy` copies
//! backing data into the leaf (copy-on-read and stream fills, one path), `write` takes
//! guest writes and zeroing, `stream` is what a stream job asks of a chain, `open`
//! opens and reopens the images. The leaf's qcow2 image owns allocation and metadata.

mod copy;
pub mod locks;
pub mod open;
mod read;
pub mod stream;
pub mod threshold;
mod write;

use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Instant;

use parking_lot::RwLock;

pub use self::copy::Purpose;
use self::locks::ClusterLocks;
pub use self::open::{open_chain, reopen_backing, Layer, MAX_CHAIN_DEPTH};
pub use self::read::{chain_status, read_layers, Layers};
use crate::format::qcow2::Qcow2;
use crate::format::Image;
use crate::Result;

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
    /// Armed write threshold on the leaf's file (0 = none); see `threshold`.
    threshold: AtomicU64,
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
            threshold: AtomicU64::new(0),
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

    /// Bytes of leaf metadata that only a flush can release from memory.
    pub fn pinned_bytes(&self) -> u64 {
        self.layers()[0]
            .image
            .as_qcow2()
            .map_or(0, |q| q.pinned_bytes())
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

    /// Ends the sessions with remote servers (NBD_CMD_DISC) at unmount.
    pub fn close_sources(&self) {
        for l in self.layers().iter() {
            l.image.source().close();
        }
    }

    /// Replaces the layer list (after a stream removed backing layers).
    pub fn set_layers(&self, layers: Vec<Arc<Layer>>) {
        *self.layers.write() = Arc::new(Layers::new(layers));
    }
}
