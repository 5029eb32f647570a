//! Talking to a mount from the command line: commands and status through `.control`,
//! events through `.events` (poll()-driven, never a sleep loop).

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::Path;
use std::time::Duration;

use crate::control;
use crate::fs::{CONTROL_NAME, EVENTS_NAME};

/// Writes one command to `.control`; the daemon's answer: Ok(()) or Err(reason).
pub fn command(mountpoint: &Path, cmd: &str) -> Result<(), String> {
    let path = mountpoint.join(CONTROL_NAME);
    let mut f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(|e| {
            format!(
                "{}: {e} (is a streamfs file system mounted there?)",
                path.display()
            )
        })?;
    let write_result = f.write_all(cmd.as_bytes());
    let mut answer = [0u8; 4096];
    let n = f.read_at(&mut answer, 0).unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).trim_end().to_string();
    match (write_result, answer.as_str()) {
        (Ok(()), "ok") => Ok(()),
        (_, a) if a.starts_with("error: ") => Err(a[7..].to_string()),
        (Err(e), _) => Err(format!("{cmd}: {e}")),
        (Ok(()), a) => Err(format!("unexpected answer: {a}")),
    }
}

/// Like `command`, printing `ok` or the error; the exit code.
pub fn send(mountpoint: &Path, cmd: &str) -> i32 {
    match command(mountpoint, cmd) {
        Ok(()) => {
            println!("ok");
            0
        }
        Err(e) => {
            eprintln!("streamfs: {e}");
            1
        }
    }
}

pub type StatusLines = Vec<(String, BTreeMap<String, String>)>;

/// Reads and parses `.control`.
pub fn status(mountpoint: &Path) -> Result<StatusLines, String> {
    let path = mountpoint.join(CONTROL_NAME);
    let mut s = String::new();
    File::open(&path)
        .and_then(|mut f| f.read_to_string(&mut s))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(control::parse_status(&s))
}

/// One line of `.events`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Event {
    pub seq: u64,
    pub time: String,
    pub name: String,
    pub event: String,
    pub kv: Vec<(String, String)>,
}

impl Event {
    pub fn parse(line: &str) -> Option<Event> {
        let mut it = line.splitn(5, ' ');
        let seq = it.next()?.parse().ok()?;
        let time = it.next()?.to_string();
        let name = it.next()?.to_string();
        let event = it.next()?.to_string();
        let kv = control::parse_pairs(it.next().unwrap_or(""));
        Some(Event {
            seq,
            time,
            name,
            event,
            kv,
        })
    }

    #[cfg(test)]
    pub fn get(&self, key: &str) -> Option<&str> {
        self.kv
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// One JSON object: `seq`, `time`, `name`, `event`, then the event's own keys,
    /// numbers as numbers.
    pub fn to_json(&self) -> String {
        let mut out = format!(
            "{{\"seq\":{},\"time\":{},\"name\":{},\"event\":{}",
            self.seq,
            json_str(&self.time),
            json_str(&self.name),
            json_str(&self.event)
        );
        for (k, v) in &self.kv {
            let value = match v.parse::<u64>() {
                Ok(n) if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) => n.to_string(),
                _ => json_str(v),
            };
            out.push_str(&format!(",{}:{value}", json_str(k)));
        }
        out.push('}');
        out
    }
}

fn json_str(s: &str) -> String {
    let mut q = String::with_capacity(s.len() + 2);
    q.push('"');
    for c in s.chars() {
        match c {
            '"' => q.push_str("\\\""),
            '\\' => q.push_str("\\\\"),
            c if (c as u32) < 0x20 => q.push_str(&format!("\\u{:04x}", c as u32)),
            c => q.push(c),
        }
    }
    q.push('"');
    q
}

/// An open `.events` (non-blocking; waits are poll()s with a timeout).
pub struct Events {
    file: File,
}

pub enum Next {
    Events(Vec<Event>),
    Timeout,
    /// End-of-file: the mount is going away.
    End,
}

impl Events {
    pub fn open(mountpoint: &Path) -> Result<Events, String> {
        let path = mountpoint.join(EVENTS_NAME);
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&path)
            .map_err(|e| {
                format!(
                    "{}: {e} (is a streamfs file system mounted there?)",
                    path.display()
                )
            })?;
        Ok(Events { file })
    }

    /// Waits up to `timeout` (None: forever) for events.
    pub fn next(&mut self, timeout: Option<Duration>) -> Result<Next, String> {
        let ms = timeout.map_or(-1, |t| t.as_millis().min(i32::MAX as u128) as i32);
        let mut pfd = libc::pollfd {
            fd: self.file.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                return Ok(Next::Timeout);
            }
            return Err(format!("poll on {EVENTS_NAME}: {e}"));
        }
        if r == 0 {
            return Ok(Next::Timeout);
        }
        let mut buf = vec![0u8; 1 << 16];
        match self.file.read(&mut buf) {
            Ok(0) => Ok(Next::End),
            Ok(n) => Ok(Next::Events(
                String::from_utf8_lossy(&buf[..n])
                    .lines()
                    .filter_map(Event::parse)
                    .collect(),
            )),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => Ok(Next::Events(Vec::new())),
            Err(e) if e.raw_os_error() == Some(libc::ENOTCONN) => Ok(Next::End),
            Err(e) => Err(format!("reading {EVENTS_NAME}: {e}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_lines_parse_and_become_json() {
        let e = Event::parse(
            "7 2026-12-01T19:00:00.123456Z vm1.raw failed offset=0 len=65536 copied=0 error=\"x \\\"y\\\"\"",
        )
        .unwrap();
        assert_eq!(
            (e.seq, e.name.as_str(), e.event.as_str()),
            (7, "vm1.raw", "failed")
        );
        assert_eq!(e.get("error"), Some("x \"y\""));
        assert_eq!(
            e.to_json(),
            "{\"seq\":7,\"time\":\"2026-12-01T19:00:00.123456Z\",\"name\":\"vm1.raw\",\
             \"event\":\"failed\",\"offset\":0,\"len\":65536,\"copied\":0,\"error\":\"x \\\"y\\\"\"}"
        );
        let o = Event::parse("9 T - overflow lost=12").unwrap();
        assert_eq!((o.name.as_str(), o.get("lost")), ("-", Some("12")));
        assert!(Event::parse("garbage").is_none());
    }
}
