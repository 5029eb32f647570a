//! What a stream job asks of a chain: where the leaf still lacks data, filling a range
//! from the layers above a kept base, proving a range complete, and rewriting the
//! backing link once it is. Jobs use only these (and never the format layer directly).

use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use super::{chain_status, Chain, Layers};
use crate::format::{Mapping, Status};
use crate::source::Location;
use crate::Result;

impl Chain {
    /// Whether the leaf defines [off, off+len) from `off` on, and for how many bytes
    /// that answer holds (at least 1 byte, at most `len`).
    pub fn leaf_run(&self, layers: &Layers, off: u64, len: u64) -> Result<(bool, u64)> {
        let (m, run) = layers[0].image.map(off, len)?;
        Ok((m != Mapping::Unallocated, run))
    }

    /// Whether a layer above `base` provides anything from `off` on, and for how many
    /// bytes that answer holds: lets a stream jump over what no layer has without
    /// touching it cluster by cluster (unallocated L1 ranges answer in one step).
    pub fn source_run(
        &self,
        layers: &Layers,
        off: u64,
        len: u64,
        base: Option<usize>,
    ) -> Result<(bool, u64)> {
        let below = base.unwrap_or(layers.len());
        let (s, n) = chain_status(&layers[..below], 1, off, len)?;
        Ok((s != Status::Unallocated, n.clamp(1, len.max(1))))
    }

    /// Copies what the leaf lacks in [off, off+len) from the layers above `base` (all
    /// backing layers when None). Returns the bytes newly copied.
    pub fn stream_fill(
        &self,
        layers: &Layers,
        off: u64,
        len: u64,
        base: Option<usize>,
    ) -> Result<u64> {
        self.copy_in(layers, off, len, super::Purpose::Stream { base })
    }

    /// The first guest offset in [start, end) that a layer above `base` still provides
    /// and the leaf does not define, or None when the range is complete in the leaf.
    /// This is the proof a job needs before it may call itself completed.
    pub fn first_unstreamed(
        &self,
        layers: &Layers,
        start: u64,
        end: u64,
        base: Option<usize>,
    ) -> Result<Option<u64>> {
        let end = end.min(self.size());
        let below = base.unwrap_or(layers.len());
        let mut pos = start;
        while pos < end {
            let (defined, run) = self.leaf_run(layers, pos, end - pos)?;
            if !defined {
                let mut p = pos;
                while p < pos + run {
                    let (s, n) = chain_status(&layers[..below], 1, p, pos + run - p)?;
                    if s != Status::Unallocated {
                        return Ok(Some(p));
                    }
                    p += n.max(1);
                }
            }
            pos += run.max(1);
        }
        Ok(None)
    }

    /// After a completed whole-disk stream: makes the leaf durable, then points it at
    /// `layers[base]` (or at nothing), and drops the layers in between from the chain.
    /// `layers` is the list the job streamed from.
    pub fn relink(&self, layers: &Layers, base: Option<usize>) -> Result<()> {
        let leaf = &layers[0].image;
        leaf.flush()?;
        if layers.len() == 1 {
            return Ok(());
        }
        let Some(q) = leaf.as_qcow2() else {
            return Ok(());
        };
        match base {
            None => {
                q.set_backing(None, None)?;
                self.set_layers(vec![layers[0].clone()]);
            }
            Some(i) => {
                let b = &layers[i].image;
                // A kept remote base is named by its URI, as QEMU names it.
                let name = match &layers[i].location {
                    Location::File(p) => relative_to(p, leaf.path()),
                    remote => remote.display(),
                };
                q.set_backing(Some(name), Some(b.format().name().to_string()))?;
                let mut kept: Vec<Arc<_>> = vec![layers[0].clone()];
                kept.extend(layers[i..].iter().cloned());
                self.set_layers(kept);
            }
        }
        Ok(())
    }
}

/// The name to store so that `target` resolves from the directory of `image`.
pub(crate) fn relative_to(target: &Path, image: &Path) -> String {
    let abs = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
    let t = abs(target);
    let dir = abs(image)
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_default();
    let tc: Vec<Component> = t.components().collect();
    let dc: Vec<Component> = dir.components().collect();
    let common = tc.iter().zip(&dc).take_while(|(a, b)| a == b).count();
    if common == 0 {
        return t.display().to_string();
    }
    let mut rel = PathBuf::new();
    for _ in common..dc.len() {
        rel.push("..");
    }
    for c in &tc[common..] {
        rel.push(c);
    }
    rel.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relative_names_resolve_from_the_leaf_directory() {
        assert_eq!(
            relative_to(Path::new("/a/b/base.qcow2"), Path::new("/a/b/top.qcow2")),
            "base.qcow2"
        );
        assert_eq!(
            relative_to(Path::new("/a/c/base.qcow2"), Path::new("/a/b/top.qcow2")),
            "../c/base.qcow2"
        );
        assert_eq!(
            relative_to(Path::new("/x/base"), Path::new("/a/b/top")),
            "../../x/base"
        );
    }
}
