//! The `.control` file protocol: parsing commands written to it, handing them to the
//! jobs, and rendering the status read from it. The file system layer feeds bytes in
//! and out.
//!
//! Commands (one per write, trailing newline optional):
//!     start NAME [base=BACKING] [speed=BYTES] [offset=BYTES] [length=BYTES] [idle=POLICY]
//!     total-speed BYTES
//!     cancel NAME | pause NAME | resume NAME | speed NAME BYTES | threshold NAME BYTES
//! Status: one line per chain, `NAME key=value ...`, values without spaces except the
//! quoted `error="..."`.

use std::collections::BTreeMap;

use crate::events::quote;
use crate::jobs::{Idle, Jobs, StartRequest, StatusLine};
use crate::{Error, Result};

/// Largest command accepted in one write.
pub const MAX_COMMAND: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    Start {
        name: String,
        base: Option<String>,
        speed: Option<u64>,
        offset: Option<u64>,
        length: Option<u64>,
        idle: Option<Idle>,
    },
    Cancel(String),
    Pause(String),
    Resume(String),
    Speed(String, u64),
    Threshold(String, u64),
    TotalSpeed(u64),
}

fn invalid<T>(msg: impl Into<String>) -> Result<T> {
    Err(Error::Invalid(msg.into()))
}

/// Parses a byte count with an optional K, M, G or T suffix (powers of 1024).
pub fn parse_bytes(s: &str) -> Result<u64> {
    let (digits, mult) = match s.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m: u64 = match c.to_ascii_uppercase() {
                'K' => 1 << 10,
                'M' => 1 << 20,
                'G' => 1 << 30,
                'T' => 1 << 40,
                _ => return invalid(format!("bad size suffix in '{s}' (use K, M, G or T)")),
            };
            (&s[..i], m)
        }
        _ => (s, 1),
    };
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return invalid(format!("bad number '{s}'"));
    }
    digits
        .parse::<u64>()
        .ok()
        .and_then(|v| v.checked_mul(mult))
        .ok_or_else(|| Error::Invalid(format!("number '{s}' is too large")))
}

pub fn parse_command(input: &[u8]) -> Result<Command> {
    if input.len() > MAX_COMMAND {
        return invalid(format!("command longer than {MAX_COMMAND} bytes"));
    }
    let text =
        std::str::from_utf8(input).map_err(|_| Error::Invalid("command is not text".into()))?;
    let text = text.strip_suffix('\n').unwrap_or(text);
    let text = text.strip_suffix('\r').unwrap_or(text);
    if text.chars().any(|c| c.is_control() && c != '\t') {
        return invalid("command contains control characters (one command per write)");
    }
    let words: Vec<&str> = text.split_whitespace().collect();
    let Some((&verb, args)) = words.split_first() else {
        return invalid("empty command");
    };
    let one_name = |args: &[&str]| -> Result<String> {
        match args {
            [name] => Ok(name.to_string()),
            _ => invalid(format!("'{verb}' takes exactly one NAME")),
        }
    };
    match verb {
        "start" => {
            let Some((&name, opts)) = args.split_first() else {
                return invalid("'start' needs a NAME");
            };
            if name.contains('=') {
                return invalid("'start' needs a NAME before its options");
            }
            let mut cmd = (None, None, None, None);
            let mut idle = None;
            for opt in opts {
                let Some((k, v)) = opt.split_once('=') else {
                    return invalid(format!("bad option '{opt}' (expected key=value)"));
                };
                let slot_taken = match k {
                    "base" if !v.is_empty() => cmd.0.replace(v.to_string()).is_some(),
                    "speed" => cmd.1.replace(parse_bytes(v)?).is_some(),
                    "offset" => cmd.2.replace(parse_bytes(v)?).is_some(),
                    "length" => cmd.3.replace(parse_bytes(v)?).is_some(),
                    "idle" => idle.replace(Idle::parse(v)?).is_some(),
                    _ => return invalid(format!("unknown option '{opt}'")),
                };
                if slot_taken {
                    return invalid(format!("option '{k}' given twice"));
                }
            }
            if cmd.3 == Some(0) {
                return invalid("length must be greater than 0");
            }
            Ok(Command::Start {
                name: name.to_string(),
                base: cmd.0,
                speed: cmd.1,
                offset: cmd.2,
                length: cmd.3,
                idle,
            })
        }
        "cancel" => Ok(Command::Cancel(one_name(args)?)),
        "pause" => Ok(Command::Pause(one_name(args)?)),
        "resume" => Ok(Command::Resume(one_name(args)?)),
        "speed" => match args {
            [name, bytes] => Ok(Command::Speed(name.to_string(), parse_bytes(bytes)?)),
            _ => invalid("usage: speed NAME BYTES"),
        },
        "total-speed" => match args {
            [bytes] => Ok(Command::TotalSpeed(parse_bytes(bytes)?)),
            _ => invalid("usage: total-speed BYTES"),
        },
        "threshold" => match args {
            [name, bytes] => Ok(Command::Threshold(name.to_string(), parse_bytes(bytes)?)),
            _ => invalid("usage: threshold NAME BYTES"),
        },
        _ => invalid(format!("unknown command '{verb}'")),
    }
}

/// Carries out a parsed command on the mount's jobs.
pub fn execute(jobs: &Jobs, cmd: Command) -> Result<()> {
    match cmd {
        Command::Start {
            name,
            base,
            speed,
            offset,
            length,
            idle,
        } => jobs.start(&StartRequest {
            name,
            base,
            speed,
            offset,
            length,
            idle,
        }),
        Command::Cancel(name) => jobs.cancel(&name),
        Command::Pause(name) => jobs.pause(&name),
        Command::Resume(name) => jobs.resume(&name),
        Command::Speed(name, bytes) => jobs.set_speed(&name, bytes),
        Command::Threshold(name, bytes) => jobs.set_threshold(&name, bytes),
        Command::TotalSpeed(bytes) => jobs.set_total_speed(bytes),
    }
}

pub fn render(lines: &[StatusLine]) -> String {
    let mut out = String::new();
    for l in lines {
        out.push_str(&format!(
            "{} state={} offset={} len={} copied={} rate={} eta={} speed={} base={} layers={} leaf={} threshold={} alloc={} waiting={}",
            l.name,
            l.state.as_str(),
            l.offset,
            l.len,
            l.copied,
            l.rate,
            l.eta,
            l.speed,
            crate::text::escape(l.base.as_deref().unwrap_or("-")).replace(char::is_whitespace, "?"),
            l.layers,
            l.leaf_bytes,
            l.threshold,
            l.alloc,
            l.waiting.as_str(),
        ));
        if let Some(e) = &l.error {
            out.push_str(" error=");
            out.push_str(&quote(e));
        }
        out.push('\n');
    }
    out
}

/// Parses status text back into (name, key -> value) lines (for the CLI).
pub fn parse_status(text: &str) -> Vec<(String, BTreeMap<String, String>)> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|line| {
            let line = line.trim();
            let (name, rest) = line.split_once(' ').unwrap_or((line, ""));
            (name.to_string(), parse_pairs(rest).into_iter().collect())
        })
        .collect()
}

/// Parses `key=value` tokens in order; a value may be quoted (`error="a \"b\""`).
pub fn parse_pairs(mut rest: &str) -> Vec<(String, String)> {
    let mut kv = Vec::new();
    loop {
        rest = rest.trim_start();
        let Some((k, after)) = rest.split_once('=') else {
            break;
        };
        let (v, next) = if let Some(q) = after.strip_prefix('"') {
            let mut v = String::new();
            let mut chars = q.char_indices();
            let mut end = q.len();
            while let Some((i, c)) = chars.next() {
                match c {
                    '\\' => {
                        if let Some((_, n)) = chars.next() {
                            v.push(n);
                        }
                    }
                    '"' => {
                        end = i + 1;
                        break;
                    }
                    c => v.push(c),
                }
            }
            (v, &q[end.min(q.len())..])
        } else {
            match after.split_once(' ') {
                Some((v, n)) => (v.to_string(), n),
                None => (after.to_string(), ""),
            }
        };
        kv.push((k.to_string(), v));
        rest = next;
    }
    kv
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::JobState;

    #[test]
    fn bytes_with_suffixes() {
        assert_eq!(parse_bytes("0").unwrap(), 0);
        assert_eq!(parse_bytes("512").unwrap(), 512);
        assert_eq!(parse_bytes("4K").unwrap(), 4096);
        assert_eq!(parse_bytes("10M").unwrap(), 10 << 20);
        assert_eq!(parse_bytes("2g").unwrap(), 2 << 30);
        for bad in [
            "",
            "K",
            "-1",
            "1.5M",
            "10X",
            "10MB",
            "abc",
            " 1",
            "99999999999999999999",
            "16777216T",
        ] {
            assert!(parse_bytes(bad).is_err(), "{bad:?} must be rejected");
        }
    }

    #[test]
    fn commands() {
        assert_eq!(
            parse_command(b"start vm1.raw\n").unwrap(),
            Command::Start {
                name: "vm1.raw".into(),
                base: None,
                speed: None,
                offset: None,
                length: None,
                idle: None
            }
        );
        assert_eq!(
            parse_command(b"start vm1.raw base=base.qcow2 speed=1M offset=64K length=1G idle=disk")
                .unwrap(),
            Command::Start {
                name: "vm1.raw".into(),
                base: Some("base.qcow2".into()),
                speed: Some(1 << 20),
                offset: Some(65536),
                length: Some(1 << 30),
                idle: Some(Idle::Disk)
            }
        );
        assert_eq!(
            parse_command(b"cancel a").unwrap(),
            Command::Cancel("a".into())
        );
        assert_eq!(
            parse_command(b"pause a\r\n").unwrap(),
            Command::Pause("a".into())
        );
        assert_eq!(
            parse_command(b"resume a").unwrap(),
            Command::Resume("a".into())
        );
        assert_eq!(
            parse_command(b"speed a 0").unwrap(),
            Command::Speed("a".into(), 0)
        );
        assert_eq!(
            parse_command(b"total-speed 200M").unwrap(),
            Command::TotalSpeed(200 << 20)
        );
        assert_eq!(
            parse_command(b"threshold a 1G").unwrap(),
            Command::Threshold("a".into(), 1 << 30)
        );
    }

    #[test]
    fn malformed_commands_are_invalid() {
        let bad: &[&[u8]] = &[
            b"",
            b"\n",
            b"frobnicate x",
            b"start",
            b"start base=x",
            b"start a bogus",
            b"start a speed=fast",
            b"start a colour=red",
            b"start a speed=1 speed=2",
            b"start a length=0",
            b"cancel",
            b"cancel a b",
            b"speed a",
            b"speed a 1Q",
            b"threshold a",
            b"start a idle=sometimes",
            b"total-speed",
            b"total-speed fast",
            b"threshold a -1",
            b"threshold a 1 2",
            b"start a\nstart b",
            b"\xff\xfe\x00binary",
            b"start a\0",
        ];
        for b in bad {
            let e = parse_command(b).unwrap_err();
            assert_eq!(e.errno(), libc::EINVAL, "{:?}", String::from_utf8_lossy(b));
        }
        assert!(parse_command(&vec![b'a'; MAX_COMMAND + 1]).is_err());
    }

    #[test]
    fn render_and_parse_back() {
        let line = StatusLine {
            name: "vm1.raw".into(),
            state: JobState::Failed,
            offset: 65536,
            len: 1 << 20,
            copied: 4096,
            rate: 100,
            eta: 3,
            speed: 0,
            base: None,
            error: Some("read failed: \"base\" at 42\nbad".into()),
            layers: 3,
            leaf_bytes: 8192,
            threshold: 0,
            alloc: 196608,
            waiting: crate::jobs::Waiting::None,
        };
        let text = render(std::slice::from_ref(&line));
        assert!(text.starts_with("vm1.raw state=failed offset=65536 len=1048576 copied=4096 rate=100 eta=3 speed=0 base=- "));
        let parsed = parse_status(&text);
        assert_eq!(parsed.len(), 1);
        assert_eq!(parsed[0].0, "vm1.raw");
        assert_eq!(parsed[0].1["state"], "failed");
        assert_eq!(parsed[0].1["error"], "read failed: \"base\" at 42 bad");
        assert_eq!(parsed[0].1["leaf"], "8192");
    }

    #[test]
    fn base_paths_from_images_are_escaped() {
        let line = StatusLine {
            name: "vm1.raw".into(),
            state: JobState::Running,
            offset: 0,
            len: 1,
            copied: 0,
            rate: 0,
            eta: 0,
            speed: 0,
            base: Some("/i/\x1b[2J base".into()),
            error: None,
            layers: 2,
            leaf_bytes: 0,
            threshold: 0,
            alloc: 0,
            waiting: crate::jobs::Waiting::None,
        };
        let text = render(&[line]);
        assert!(!text.contains('\x1b'), "{text:?}");
        assert_eq!(parse_status(&text)[0].1["base"], "/i/\\x1b[2J?base");
    }
}
