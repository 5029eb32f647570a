//! Backing names that QEMU writes into qcow2 headers for network images, parsed as
//! QEMU's `nbd` and `curl` drivers parse them:
//! - `nbd://HOST[:PORT]/EXPORT` (also `nbd+tcp://`; port 10809 by default; the export
//!   is the path without its first '/', possibly empty),
//! - `nbd+unix:///EXPORT?socket=PATH`,
//! - legacy `nbd:HOST:PORT[:exportname=NAME]` and `nbd:unix:PATH[:exportname=NAME]`,
//! - `http://...` and `https://...`.

use std::fmt;
use std::path::PathBuf;

use crate::{Error, Result};

/// The NBD port IANA assigned.
pub const NBD_DEFAULT_PORT: u16 = 10809;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NbdServer {
    Tcp { host: String, port: u16 },
    Unix(PathBuf),
}

/// An NBD export, and the name it was given by.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NbdAddr {
    pub server: NbdServer,
    pub export: String,
    /// As written in the image (for messages).
    pub uri: String,
}

impl fmt::Display for NbdAddr {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.uri)
    }
}

/// Where an image is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Nbd(NbdAddr),
    /// An http:// or https:// URL.
    Http(url::Url),
}

impl Location {
    /// The name to show in messages: the path or the URI.
    pub fn display(&self) -> String {
        match self {
            Location::File(p) => p.display().to_string(),
            Location::Nbd(a) => a.uri.clone(),
            Location::Http(u) => u.to_string(),
        }
    }

    pub fn is_remote(&self) -> bool {
        !matches!(self, Location::File(_))
    }
}

/// Whether `name` is one of the network names this module parses (by its prefix alone).
pub fn is_remote_name(name: &str) -> bool {
    let lower = name.to_ascii_lowercase();
    ["nbd:", "nbd+tcp:", "nbd+unix:", "http:", "https:"]
        .iter()
        .any(|p| lower.starts_with(p))
}

fn bad(name: &str, why: &str) -> Error {
    Error::Invalid(format!("backing name '{name}': {why}"))
}

/// Parses a network name; `None` if `name` is not one (see `is_remote_name`).
pub fn parse_remote(name: &str) -> Option<Result<Location>> {
    if !is_remote_name(name) {
        return None;
    }
    let lower = name.to_ascii_lowercase();
    Some(
        if lower.starts_with("http:") || lower.starts_with("https:") {
            url::Url::parse(name)
                .map_err(|e| bad(name, &format!("not a valid URL: {e}")))
                .and_then(|u| {
                    if u.host_str().is_none_or(str::is_empty) {
                        Err(bad(name, "the URL has no host"))
                    } else {
                        Ok(Location::Http(u))
                    }
                })
        } else if lower.starts_with("nbd:") && !lower.starts_with("nbd://") {
            parse_legacy_nbd(name)
        } else {
            parse_nbd_uri(name)
        },
    )
}

fn parse_nbd_uri(name: &str) -> Result<Location> {
    let u = url::Url::parse(name).map_err(|e| bad(name, &format!("not a valid URI: {e}")))?;
    let path = percent_decode(u.path());
    let export = path.strip_prefix('/').unwrap_or(&path).to_string();
    let server = match u.scheme() {
        "nbd" | "nbd+tcp" => {
            if u.query().is_some_and(|q| !q.is_empty()) {
                return Err(bad(name, "nbd:// URIs take no query parameters"));
            }
            let host = match u.host() {
                Some(url::Host::Ipv6(a)) => a.to_string(),
                Some(h) => h.to_string(),
                None => return Err(bad(name, "no server host")),
            };
            if host.is_empty() {
                return Err(bad(name, "no server host"));
            }
            NbdServer::Tcp {
                host,
                port: u.port().unwrap_or(NBD_DEFAULT_PORT),
            }
        }
        "nbd+unix" => {
            if u.host_str().is_some_and(|h| !h.is_empty()) || u.port().is_some() {
                return Err(bad(
                    name,
                    "nbd+unix:// URIs name no host (nbd+unix:///EXPORT?socket=PATH)",
                ));
            }
            let mut socket = None;
            for (k, v) in u.query_pairs() {
                match (k.as_ref(), socket.is_none()) {
                    ("socket", true) => socket = Some(PathBuf::from(v.as_ref())),
                    _ => return Err(bad(name, "the only query parameter is one socket=PATH")),
                }
            }
            match socket {
                Some(s) if !s.as_os_str().is_empty() => NbdServer::Unix(s),
                _ => return Err(bad(name, "nbd+unix:// needs ?socket=PATH")),
            }
        }
        other => return Err(bad(name, &format!("unknown NBD transport '{other}'"))),
    };
    Ok(Location::Nbd(NbdAddr {
        server,
        export,
        uri: name.to_string(),
    }))
}

/// `nbd:HOST:PORT[:exportname=NAME]`, `nbd:unix:PATH[:exportname=NAME]` (QEMU's
/// `nbd_parse_filename`: the export name runs to the end, colons and all).
fn parse_legacy_nbd(name: &str) -> Result<Location> {
    let rest = &name[4..];
    let (addr, export) = match rest.find(":exportname=") {
        Some(i) => (&rest[..i], rest[i + ":exportname=".len()..].to_string()),
        None => (rest, String::new()),
    };
    let server = if let Some(path) = addr.strip_prefix("unix:") {
        if path.is_empty() {
            return Err(bad(name, "no socket path after nbd:unix:"));
        }
        NbdServer::Unix(PathBuf::from(path))
    } else {
        // HOST:PORT, HOST may be [IPv6].
        let (host, port) = if let Some(v6) = addr.strip_prefix('[') {
            let end = v6
                .find(']')
                .ok_or_else(|| bad(name, "unclosed '[' in the host"))?;
            let port = v6[end + 1..].strip_prefix(':');
            (v6[..end].to_string(), port)
        } else {
            match addr.rsplit_once(':') {
                Some((h, p)) => (h.to_string(), Some(p)),
                None => (addr.to_string(), None),
            }
        };
        if host.is_empty() {
            return Err(bad(name, "no server host"));
        }
        let port = match port {
            None => NBD_DEFAULT_PORT,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad(name, &format!("bad port '{p}'")))?,
        };
        NbdServer::Tcp { host, port }
    };
    Ok(Location::Nbd(NbdAddr {
        server,
        export,
        uri: name.to_string(),
    }))
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        let hex = |c: u8| (c as char).to_digit(16);
        if b[i] == b'%' && i + 2 < b.len() {
            if let (Some(h), Some(l)) = (hex(b[i + 1]), hex(b[i + 2])) {
                out.push((h * 16 + l) as u8);
                i += 3;
                continue;
            }
        }
        out.push(b[i]);
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nbd(name: &str) -> NbdAddr {
        match parse_remote(name).expect("a remote name").expect("valid") {
            Location::Nbd(a) => a,
            other => panic!("{name}: {other:?}"),
        }
    }
    fn tcp(host: &str, port: u16) -> NbdServer {
        NbdServer::Tcp {
            host: host.into(),
            port,
        }
    }

    #[test]
    fn nbd_uris() {
        let a = nbd("nbd://img-server/ubuntu");
        assert_eq!(
            (a.server, a.export.as_str()),
            (tcp("img-server", 10809), "ubuntu")
        );
        let a = nbd("nbd://127.0.0.1:1234/");
        assert_eq!((a.server, a.export.as_str()), (tcp("127.0.0.1", 1234), ""));
        let a = nbd("nbd://h");
        assert_eq!(a.export, "");
        let a = nbd("nbd+tcp://h:7/a/b%20c");
        assert_eq!((a.server, a.export.as_str()), (tcp("h", 7), "a/b c"));
        let a = nbd("nbd://[::1]:99/x");
        assert_eq!(a.server, tcp("::1", 99));
        let a = nbd("nbd+unix:///exp?socket=/run/nbd.sock");
        assert_eq!(a.server, NbdServer::Unix("/run/nbd.sock".into()));
        assert_eq!(a.export, "exp");
        let a = nbd("nbd+unix://?socket=/s");
        assert_eq!(
            (a.server, a.export.as_str()),
            (NbdServer::Unix("/s".into()), "")
        );
    }

    #[test]
    fn legacy_nbd_names() {
        let a = nbd("nbd:localhost:10810");
        assert_eq!((a.server, a.export.as_str()), (tcp("localhost", 10810), ""));
        let a = nbd("nbd:h:1:exportname=a:b");
        assert_eq!((a.server, a.export.as_str()), (tcp("h", 1), "a:b"));
        let a = nbd("nbd:unix:/tmp/s.sock:exportname=base");
        assert_eq!(a.server, NbdServer::Unix("/tmp/s.sock".into()));
        assert_eq!(a.export, "base");
        let a = nbd("nbd:[::1]:5");
        assert_eq!(a.server, tcp("::1", 5));
        let a = nbd("nbd:host");
        assert_eq!(a.server, tcp("host", 10809));
    }

    #[test]
    fn bad_remote_names_are_errors_not_panics() {
        for name in [
            "nbd://",
            "nbd://h:0x/x",
            "nbd://h/x?socket=/s",
            "nbd+unix:///x",
            "nbd+unix://host/x?socket=/s",
            "nbd+unix:///x?socket=/s&socket=/t",
            "nbd+unix:///x?other=1",
            "nbd:",
            "nbd::1",
            "nbd:h:99999",
            "nbd:h:0",
            "nbd:unix:",
            "nbd:[::1:5",
            "http://",
            "http://[bad/x",
        ] {
            match parse_remote(name) {
                Some(Err(e)) => assert!(e.to_string().contains(name), "{name}: {e}"),
                other => panic!("{name}: {other:?}"),
            }
        }
        for name in [
            "base.qcow2",
            "/a/nbd://x",
            "file:x",
            "json:{}",
            "ssh://h/x",
            "nbd+foo://h/x",
        ] {
            assert!(parse_remote(name).is_none(), "{name}");
        }
    }

    #[test]
    fn http_urls() {
        match parse_remote("HTTPS://img.example/t/ubuntu.qcow2")
            .unwrap()
            .unwrap()
        {
            Location::Http(u) => {
                assert_eq!(u.as_str(), "https://img.example/t/ubuntu.qcow2");
                assert_eq!(
                    u.join("base.qcow2").unwrap().as_str(),
                    "https://img.example/t/base.qcow2"
                );
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn percent_decoding_leaves_bad_escapes_alone() {
        assert_eq!(percent_decode("/a%2Fb%zz%4"), "/a/b%zz%4");
        assert_eq!(percent_decode("%"), "%");
    }
}
