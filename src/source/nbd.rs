//! NBD client (placeholder until the client lands).

use super::uri::NbdAddr;
use super::{RemoteOptions, Source};
use crate::{Error, Result};

pub struct NbdSource {
    name: String,
}

impl NbdSource {
    pub fn connect(addr: &NbdAddr, _opts: &RemoteOptions) -> Result<NbdSource> {
        Err(Error::Invalid(format!(
            "{addr}: NBD backings are not implemented yet"
        )))
    }
}

impl Source for NbdSource {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        0
    }
    fn read_at(&self, _buf: &mut [u8], _off: u64) -> Result<usize> {
        Err(Error::Invalid(format!("{}: not connected", self.name)))
    }
}
