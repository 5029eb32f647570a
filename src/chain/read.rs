//! Resolving guest reads through the chain: each range comes from the first layer that
//! has it (`read_layers`), with per-granule hints for deep chains (`Layers`); the
//! allocation status behind SEEK_DATA/SEEK_HOLE and copy planning (`chain_status`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use super::{Chain, Layer, Purpose};
use crate::format::{Mapping, Status};
use crate::Result;

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
    pub(super) fn new(list: Vec<Arc<Layer>>) -> Layers {
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
pub(super) fn resolve(
    layers: &[Arc<Layer>],
    idx: usize,
    off: u64,
    len: u64,
) -> Result<(Status, u64, usize)> {
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
