//! The CA roots HTTPS trusts: the system's store (as OpenSSL finds it, `SSL_CERT_FILE`
//! and `SSL_CERT_DIR` included), plus the PEM certificates of `--ca-file`. A machine
//! without a store falls back to the Mozilla roots built in.

use std::path::Path;
use std::sync::{Arc, OnceLock};

use ureq::tls::{Certificate, PemItem, RootCerts};

use crate::{Error, Result};

/// The system's roots, loaded once per process.
fn system_roots() -> &'static [Certificate<'static>] {
    static ROOTS: OnceLock<Vec<Certificate<'static>>> = OnceLock::new();
    ROOTS.get_or_init(|| {
        let found = rustls_native_certs::load_native_certs();
        for e in &found.errors {
            log::debug!("system CA store: {e}");
        }
        log::debug!("system CA store: {} certificates", found.certs.len());
        found
            .certs
            .iter()
            .map(|c| Certificate::from_der(c.as_ref()).to_owned())
            .collect()
    })
}

/// The certificates of a PEM file (other PEM sections, such as keys, are skipped).
pub fn read_pem(path: &Path) -> Result<Vec<Certificate<'static>>> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, "read --ca-file", e))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&bytes) {
        match item {
            Ok(PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => {
                return Err(Error::Invalid(format!(
                    "{}: --ca-file: bad PEM: {e}",
                    path.display()
                )))
            }
        }
    }
    if certs.is_empty() {
        return Err(Error::Invalid(format!(
            "{}: --ca-file: no PEM certificate in it",
            path.display()
        )));
    }
    Ok(certs)
}

/// The roots for one source.
pub fn roots(ca_file: Option<&Path>) -> Result<RootCerts> {
    let system = system_roots();
    let extra = match ca_file {
        Some(p) => read_pem(p)?,
        None => Vec::new(),
    };
    if system.is_empty() {
        if extra.is_empty() {
            log::info!("no system CA store found: HTTPS trusts the built-in Mozilla roots");
            return Ok(RootCerts::WebPki);
        }
        log::warn!("no system CA store found: HTTPS trusts only the --ca-file certificates");
    }
    let all: Vec<Certificate<'static>> = system.iter().cloned().chain(extra).collect();
    Ok(RootCerts::Specific(Arc::new(all)))
}
