//! The byte stream to an NBD server: a TCP connection (TCP_NODELAY, connect timeout) or
//! a Unix socket.

use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

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
        NbdServer::Unix(path) => match connect_unix(path, timeout) {
            Ok(s) => Ok(Stream::Unix(s)),
            Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(format!(
                "cannot connect to {}: no answer within {}",
                describe(server),
                super::secs(timeout)
            )),
            Err(e) => Err(fail(&e)),
        },
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

/// A Unix socket connect that gives up after `timeout` when the server's backlog is
/// full (a blocking connect would wait for the server to accept, however long).
fn connect_unix(path: &Path, timeout: Duration) -> io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    let bytes = path.as_os_str().as_bytes();
    // SAFETY: sockaddr_un is plain old data; all zeros is a valid value.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    if bytes.len() >= addr.sun_path.len() || bytes.contains(&0) {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "the socket path is too long or holds a NUL byte",
        ));
    }
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    for (d, &b) in addr.sun_path.iter_mut().zip(bytes) {
        *d = b as libc::c_char;
    }
    let len = (std::mem::size_of::<libc::sa_family_t>() + bytes.len() + 1) as libc::socklen_t;
    loop {
        let flags = libc::SOCK_STREAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK;
        // SAFETY: plain socket(2); the descriptor is owned at once.
        let fd = unsafe { libc::socket(libc::AF_UNIX, flags, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: fd is a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        // SAFETY: addr is a valid sockaddr_un of at least `len` bytes.
        let r = unsafe {
            libc::connect(
                fd.as_raw_fd(),
                &addr as *const libc::sockaddr_un as *const libc::sockaddr,
                len,
            )
        };
        if r == 0 {
            let s = UnixStream::from(fd);
            s.set_nonblocking(false)?;
            return Ok(s);
        }
        let e = io::Error::last_os_error();
        // A full backlog: EAGAIN on a non-blocking Unix socket; try again shortly.
        if e.raw_os_error() != Some(libc::EAGAIN) {
            return Err(e);
        }
        let now = Instant::now();
        if now >= deadline {
            return Err(io::Error::from(io::ErrorKind::TimedOut));
        }
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;

    #[test]
    fn unix_connect_to_a_full_backlog_is_bounded() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("s");
        let _l = UnixListener::bind(&p).unwrap();
        let server = NbdServer::Unix(p.clone());
        // Never accepted: once the backlog is full, connects time out.
        let mut kept = Vec::new();
        let t = Instant::now();
        let e = loop {
            match connect(&server, Duration::from_millis(100)) {
                Ok(s) => kept.push(s),
                Err(e) => break e,
            }
            assert!(kept.len() < 100_000, "the backlog never filled");
        };
        assert!(e.contains("no answer within 0.1 s"), "{e}");
        assert!(t.elapsed() < Duration::from_secs(10));
        let e = connect(
            &NbdServer::Unix(d.path().join("none")),
            Duration::from_secs(1),
        )
        .err()
        .unwrap();
        assert!(e.ends_with("No such file or directory"), "{e}");
        let long = NbdServer::Unix(PathBuf::from("/".repeat(200)));
        assert!(connect(&long, Duration::from_secs(1)).is_err());
    }
}
