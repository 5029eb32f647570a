//! The byte stream to an NBD server: a TCP connection (TCP_NODELAY, connect timeout) or
//! a Unix socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::source::uri::NbdServer;

pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

/// An I/O error as a short sentence ("Connection refused"), without Rust's
/// "(os error N)" suffix.
pub fn io_text(e: &io::Error) -> String {
    let s = e.to_string();
    match s.find(" (os error ") {
        Some(i) => s[..i].to_string(),
        None => s,
    }
}

/// Where `server` is, for messages.
pub fn describe(server: &NbdServer) -> String {
    match server {
        NbdServer::Tcp { host, port } if host.contains(':') => format!("[{host}]:{port}"),
        NbdServer::Tcp { host, port } => format!("{host}:{port}"),
        NbdServer::Unix(p) => format!("socket {}", p.display()),
    }
}

/// Connects to `server`, a TCP connect taking at most `timeout` per address.
pub fn connect(server: &NbdServer, timeout: Duration) -> Result<Stream, String> {
    let timeout = timeout.max(Duration::from_millis(1));
    let fail = |e: &io::Error| format!("cannot connect to {}: {}", describe(server), io_text(e));
    match server {
        NbdServer::Unix(path) => UnixStream::connect(path)
            .map(Stream::Unix)
            .map_err(|e| fail(&e)),
        NbdServer::Tcp { host, port } => {
            let addrs = (host.as_str(), *port)
                .to_socket_addrs()
                .map_err(|e| format!("cannot resolve {}: {}", describe(server), io_text(&e)))?;
            let mut last = None;
            for a in addrs {
                match TcpStream::connect_timeout(&a, timeout) {
                    Ok(s) => {
                        s.set_nodelay(true).map_err(|e| fail(&e))?;
                        return Ok(Stream::Tcp(s));
                    }
                    Err(e) => last = Some(e),
                }
            }
            Err(match last {
                Some(e) if e.kind() == io::ErrorKind::TimedOut => format!(
                    "cannot connect to {}: no answer within {}",
                    describe(server),
                    super::secs(timeout)
                ),
                Some(e) => fail(&e),
                None => format!("{} has no address", describe(server)),
            })
        }
    }
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }
    pub fn set_timeouts(&self, read: Option<Duration>, write: Option<Duration>) -> io::Result<()> {
        // A zero duration is refused by the socket calls: clamp to a millisecond.
        let fix = |d: Option<Duration>| d.map(|d| d.max(Duration::from_millis(1)));
        match self {
            Stream::Tcp(s) => {
                s.set_read_timeout(fix(read))?;
                s.set_write_timeout(fix(write))
            }
            Stream::Unix(s) => {
                s.set_read_timeout(fix(read))?;
                s.set_write_timeout(fix(write))
            }
        }
    }
    pub fn shutdown(&self) {
        let _ = match self {
            Stream::Tcp(s) => s.shutdown(Shutdown::Both),
            Stream::Unix(s) => s.shutdown(Shutdown::Both),
        };
    }
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.read(buf),
            Stream::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => s.write(buf),
            Stream::Unix(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.flush(),
            Stream::Unix(s) => s.flush(),
        }
    }
}
