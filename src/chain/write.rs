//! Guest writes into the leaf: in place where a cluster is allocated (no lock), else
//! under the cluster locks with copy-on-write of partly covered clusters; zeroing.

use super::read::read_layers;
use super::{Chain, Layers, MAX_BATCH};
use crate::format::qcow2::l2::ClusterState;
use crate::format::qcow2::{Batch, ClusterOp, Qcow2};
use crate::format::{Image, Mapping};
use crate::{Error, Result};

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
