//! HTTP(S) objects as byte sources, read as QEMU's `curl` driver reads them: ranged GETs
//! (`Range: bytes=A-B`) over keep-alive connections. Each `read_at` is one request on a
//! connection of its own from the agent's pool, so reads from many threads run in
//! parallel. Redirects are followed on every request (a signed or load-balanced URL may
//! send each one elsewhere); every reply must be 206 with exactly the range asked for.
//!
//! At open a `bytes=0-0` GET learns the size (from `Content-Range`) and the version (the
//! ETag, or Last-Modified), and shows that the server honours ranges. Each later GET
//! carries `If-Match` (or `If-Unmodified-Since`) and its reply's validators are compared,
//! so a replaced object fails with EIO instead of mixing two versions.
//!
//! Lost connections, refusals, time outs, 5xx, 408 and 429 are tried again with backoff
//! until `RemoteOptions::timeout`, counted from the call, is used up (`retry`); each
//! request's socket time outs are bounded by the time left.
//!
//! Proxies come from the environment (`http_proxy`, `https_proxy`, `no_proxy`, ...), as
//! for curl. Content encodings are not asked for (`Accept-Encoding: identity`), and a reply that has one is refused:
//! ranges must count the object's own bytes.

mod range;
mod retry;
mod tls;
mod version;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use ureq::http::Response;
use ureq::Body;

use self::retry::{Failure, Retry};
use self::version::{Version, CHANGED};
use super::{RemoteOptions, Source};
use crate::{Error, Result};

/// Redirects followed for one request.
const MAX_REDIRECTS: u32 = 10;
/// Idle keep-alive connections kept per host: enough for a mount's reading threads.
const POOL_PER_HOST: usize = 32;

/// An HTTP(S) object, read only.
pub struct HttpSource {
    name: String,
    url: url::Url,
    agent: ureq::Agent,
    size: u64,
    version: Version,
    timeout: Duration,
    closed: AtomicBool,
}

/// A header's value, if present and text.
fn header<'a>(resp: &'a Response<Body>, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

fn status_text(resp: &Response<Body>) -> String {
    let s = resp.status();
    match s.canonical_reason() {
        Some(r) => format!("HTTP {} {r}", s.as_u16()),
        None => format!("HTTP {}", s.as_u16()),
    }
}

/// A status that was not the one expected: worth another try, or the answer.
fn unexpected(resp: &Response<Body>) -> Failure {
    let text = status_text(resp);
    if retry::status_is_transient(resp.status().as_u16()) {
        Failure::Transient(text)
    } else {
        Failure::Fatal(text)
    }
}

/// Ranges count bytes of the representation sent: an encoded one is not the object.
fn check_identity(resp: &Response<Body>) -> Result<(), Failure> {
    match header(resp, "content-encoding").map(str::trim) {
        None | Some("") => Ok(()),
        Some(e) if e.eq_ignore_ascii_case("identity") => Ok(()),
        Some(e) => Err(Failure::Fatal(format!(
            "the server sent the object encoded (Content-Encoding: {e})"
        ))),
    }
}

fn body_error(e: std::io::Error) -> Failure {
    retry::classify(ureq::Error::from(e))
}

/// Reads the whole body into `data`, which it must fill exactly; the body's end is read
/// too, so that the connection goes back to the pool.
fn read_body(resp: &mut Response<Body>, data: &mut [u8]) -> Result<(), Failure> {
    let mut reader = resp.body_mut().as_reader();
    let mut got = 0;
    while got < data.len() {
        match reader.read(&mut data[got..]) {
            Ok(0) => {
                return Err(Failure::Transient(format!(
                    "connection closed after {got} of {} bytes",
                    data.len()
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(body_error(e)),
        }
    }
    let mut more = [0u8; 1];
    loop {
        match reader.read(&mut more) {
            Ok(0) => return Ok(()),
            Ok(_) => {
                return Err(Failure::Fatal(format!(
                    "the reply has more than the {} bytes asked for",
                    data.len()
                )))
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(body_error(e)),
        }
    }
}

/// Seconds, for messages.
fn secs(d: Duration) -> String {
    if d.subsec_millis() == 0 {
        format!("{} s", d.as_secs())
    } else {
        format!("{:.1} s", d.as_secs_f64())
    }
}

impl HttpSource {
    /// Opens `url`: learns its size and version, and checks that the server serves
    /// byte ranges. Fails at once on an answer such as 404 or 403; retries a server
    /// that does not answer until `opts.timeout`.
    pub fn open(url: &url::Url, opts: &RemoteOptions) -> Result<HttpSource> {
        let name = url.to_string();
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Error::Invalid(format!("{name}: not an http(s) URL")));
        }
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(tls::roots(opts.ca_file.as_deref())?)
            .build();
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(MAX_REDIRECTS)
            .max_idle_connections(2 * POOL_PER_HOST)
            .max_idle_connections_per_host(POOL_PER_HOST)
            .user_agent(concat!("streamfs/", env!("CARGO_PKG_VERSION")))
            .tls_config(tls)
            .build()
            .into();
        let mut src = HttpSource {
            name,
            url: url.clone(),
            agent,
            size: 0,
            version: Version::default(),
            timeout: opts.timeout,
            closed: AtomicBool::new(false),
        };
        let (size, version) = src.retrying(|left| src.probe(left))?;
        if !version.is_known() {
            log::warn!(
                "{}: the server gives neither ETag nor Last-Modified: a change of the \
                 object while it is in use cannot be detected",
                src.name
            );
        }
        log::info!(
            "{}: {size} bytes, ETag {}, Last-Modified {}",
            src.name,
            version.etag.as_deref().unwrap_or("none"),
            version.last_modified.as_deref().unwrap_or("none")
        );
        src.size = size;
        src.version = version;
        Ok(src)
    }

    /// Runs `attempt` (given the time left) until it succeeds, fails for good, or the
    /// timeout, counted from now, is used up.
    fn retrying<T>(&self, mut attempt: impl FnMut(Duration) -> Result<T, Failure>) -> Result<T> {
        let mut retry = Retry::new(self.timeout, Instant::now());
        let mut last = String::from("no time left to try");
        while let Some(left) = retry.remaining(Instant::now()) {
            if self.closed.load(Ordering::Relaxed) {
                return Err(Error::remote(&self.name, "closed"));
            }
            match attempt(left) {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(m)) => return Err(Error::remote(&self.name, m)),
                Err(Failure::Transient(m)) => {
                    log::debug!("{}: {m}; trying again", self.name);
                    last = m;
                }
            }
            match retry.wait_after_failure(Instant::now()) {
                Some(wait) => std::thread::sleep(wait),
                None => break,
            }
        }
        Err(Error::remote(
            &self.name,
            format!("no answer within {}: {last}", secs(self.timeout)),
        ))
    }

    /// One ranged GET, bounded by `left` in all (redirects and body included).
    fn get(
        &self,
        range: &str,
        left: Duration,
        conditional: bool,
    ) -> Result<Response<Body>, Failure> {
        let mut req = self
            .agent
            .get(self.url.as_str())
            .header("Range", range)
            .header("Accept-Encoding", "identity");
        if conditional {
            if let Some((name, value)) = self.version.condition() {
                req = req.header(name, value);
            }
        }
        req.config()
            .timeout_global(Some(left))
            .build()
            .call()
            .map_err(retry::classify)
    }

    /// The open's `bytes=0-0` GET: the size and the version.
    fn probe(&self, left: Duration) -> Result<(u64, Version), Failure> {
        let mut resp = self.get("bytes=0-0", left, false)?;
        let version = Version::new(header(&resp, "etag"), header(&resp, "last-modified"));
        let content_range = header(&resp, "content-range").map(str::to_string);
        let size = match resp.status().as_u16() {
            206 => {
                check_identity(&resp)?;
                let cr = content_range
                    .ok_or_else(|| Failure::Fatal("206 without Content-Range".into()))?;
                match range::parse(&cr).map_err(Failure::Fatal)? {
                    range::ContentRange::Bytes {
                        first: 0,
                        last: 0,
                        total: Some(t),
                    } => t,
                    range::ContentRange::Bytes { total: None, .. } => {
                        return Err(Failure::Fatal(format!(
                            "the server does not tell the object's size (Content-Range: {cr})"
                        )))
                    }
                    _ => {
                        return Err(Failure::Fatal(format!(
                            "asked for bytes 0-0, got Content-Range: {cr}"
                        )))
                    }
                }
            }
            // An empty object has no byte 0 to send: 200 with nothing, or 416.
            200 if header(&resp, "content-length").map(str::trim) == Some("0") => 0,
            200 => {
                return Err(Failure::Fatal(
                    "the server does not support byte ranges: it answered a ranged GET \
                     with 200 and the whole object"
                        .into(),
                ))
            }
            416 if matches!(
                content_range.as_deref().map(range::parse),
                Some(Ok(range::ContentRange::Unsatisfied { total: 0 }))
            ) =>
            {
                0
            }
            _ => return Err(unexpected(&resp)),
        };
        let mut byte = [0u8; 1];
        let want = if size == 0 { 0 } else { 1 };
        read_body(&mut resp, &mut byte[..want])?;
        Ok((size, version))
    }

    /// One try at bytes `off..off+data.len()` (inside the object).
    fn read_range(&self, data: &mut [u8], off: u64, left: Duration) -> Result<(), Failure> {
        let (range, last) = range::request(off, data.len() as u64);
        let mut resp = self.get(&range, left, true)?;
        match resp.status().as_u16() {
            206 => {}
            200 => {
                return Err(Failure::Fatal(format!(
                    "{CHANGED} (the server answered 200 with the whole object instead of 206)"
                )))
            }
            412 => {
                return Err(Failure::Fatal(format!(
                    "{CHANGED} (412 Precondition Failed)"
                )))
            }
            416 => {
                return Err(Failure::Fatal(format!(
                    "{CHANGED} (416: bytes {off}-{last} are past its end now)"
                )))
            }
            _ => return Err(unexpected(&resp)),
        }
        self.version
            .check(header(&resp, "etag"), header(&resp, "last-modified"))
            .map_err(Failure::Fatal)?;
        range::expect(header(&resp, "content-range"), off, last, self.size).map_err(|m| {
            Failure::Fatal(match m {
                range::Mismatch::Total { .. } => format!("{CHANGED} ({m})"),
                range::Mismatch::Bad(m) => m,
            })
        })?;
        check_identity(&resp)?;
        read_body(&mut resp, data)
    }
}

impl Source for HttpSource {
    fn name(&self) -> &str {
        &self.name
    }

    fn size(&self) -> u64 {
        self.size
    }

    fn read_at(&self, buf: &mut [u8], off: u64) -> Result<usize> {
        if self.closed.load(Ordering::Relaxed) {
            return Err(Error::remote(&self.name, "closed"));
        }
        let n = usize::try_from(self.size.saturating_sub(off))
            .unwrap_or(usize::MAX)
            .min(buf.len());
        let (data, past_end) = buf.split_at_mut(n);
        past_end.fill(0);
        if n > 0 {
            self.retrying(|left| self.read_range(data, off, left))?;
        }
        Ok(n)
    }

    fn close(&self) {
        self.closed.store(true, Ordering::Relaxed);
    }
}
