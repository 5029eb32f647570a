//! HTTP(S) client (placeholder until the client lands).

use super::{RemoteOptions, Source};
use crate::{Error, Result};

pub struct HttpSource {
    name: String,
}

impl HttpSource {
    pub fn open(url: &url::Url, _opts: &RemoteOptions) -> Result<HttpSource> {
        Err(Error::Invalid(format!(
            "{url}: HTTP backings are not implemented yet"
        )))
    }
}

impl Source for HttpSource {
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
