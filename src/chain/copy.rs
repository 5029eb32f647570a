//! Copying backing data into the leaf. Copy-on-read (a guest read of clusters the leaf
//! lacks) and stream fills are one path, `copy_in`; they differ only by `Purpose`: what
//! is read besides the clusters copied, and whether a full leaf file system is an error.

use std::sync::atomic::Ordering;

use super::read::{read_layers, resolve};
use super::{Chain, Layers, MAX_BATCH};
use crate::format::qcow2::l2::ClusterState;
use crate::format::qcow2::{Batch, ClusterOp, Qcow2};
use crate::format::Status;
use crate::Result;

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
    /// Copies the leaf clusters covering [off, off+len) that the leaf still lacks from
    /// the chain into the leaf, in batches locked cluster by cluster and re-checked under
    /// the lock (a guest write may have landed meanwhile: it is never overwritten).
    /// Returns the bytes newly copied.
    pub(super) fn copy_in(
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
