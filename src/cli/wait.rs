//! Commands that follow a mount's events: `events`, `wait`, and the waiting parts of
//! `start --wait` and `status --watch`. Each opens `.events` before looking at the
//! status, so nothing that happens in between is missed, and blocks in poll().

use std::io::Write;
use std::path::Path;
use std::time::{Duration, Instant};

use super::client::{self, Event, Events, Next};
use super::progress::{render_line, Progress};

/// How often progress bars are redrawn while waiting for events.
const REDRAW: Duration = Duration::from_millis(250);

/// `streamfs events MOUNTPOINT [--json]`: exit 0 at unmount.
pub fn follow(mountpoint: &Path, json: bool) -> i32 {
    let mut events = match Events::open(mountpoint) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("streamfs: {e}");
            return 1;
        }
    };
    let mut out = std::io::stdout().lock();
    loop {
        match events.next(None) {
            Ok(Next::Events(list)) => {
                for e in list {
                    let line = if json { e.to_json() } else { plain(&e) };
                    if writeln!(out, "{line}").and_then(|_| out.flush()).is_err() {
                        return 0; // the reader went away (a closed pipe)
                    }
                }
            }
            Ok(Next::Timeout) => {}
            Ok(Next::End) => return 0,
            Err(e) => {
                eprintln!("streamfs: {e}");
                return 1;
            }
        }
    }
}

fn plain(e: &Event) -> String {
    let mut s = format!("{} {} {} {}", e.seq, e.time, e.name, e.event);
    for (k, v) in &e.kv {
        if v.contains(' ') || v.contains('"') {
            s.push_str(&format!(" {k}={}", crate::events::quote(v)));
        } else {
            s.push_str(&format!(" {k}={v}"));
        }
    }
    s
}

/// How a job ended, as exit codes: 0 completed, 1 failed or cancelled.
fn ended(name: &str, state: &str, error: Option<&str>) -> Option<i32> {
    match state {
        "completed" => {
            println!("{name}: stream completed");
            Some(0)
        }
        "failed" | "cancelled" => {
            let why = error.map(|e| format!(": {e}")).unwrap_or_default();
            eprintln!("streamfs: {name}: stream {state}{why}");
            Some(1)
        }
        _ => None,
    }
}

/// `streamfs wait`: 0 completed, 1 failed/cancelled, 2 timeout, no such job, bad usage.
/// With `progress`, draws NAME's bar meanwhile (`start --wait`).
pub fn wait(mountpoint: &Path, name: &str, timeout: Option<Duration>, progress: bool) -> i32 {
    let mut events = match Events::open(mountpoint) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("streamfs: {e}");
            return 2;
        }
    };
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut bars = progress.then(Progress::new);
    let mut first = true;
    loop {
        let lines = match client::status(mountpoint) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("streamfs: {e}");
                return 2;
            }
        };
        let Some((_, kv)) = lines.iter().find(|(n, _)| n == name) else {
            eprintln!("streamfs: no disk named '{name}' in this mount");
            return 2;
        };
        let state = kv.get("state").map(String::as_str).unwrap_or("");
        if let Some(b) = bars.as_mut() {
            b.update(name, kv);
        }
        if first && state == "idle" {
            eprintln!("streamfs: {name}: no stream job since the mount");
            return 2;
        }
        first = false;
        if let Some(code) = ended(name, state, kv.get("error").map(String::as_str)) {
            if let Some(b) = bars.as_mut() {
                b.finish();
            }
            return code;
        }
        let wait_for = match deadline {
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    eprintln!("streamfs: {name}: still {state} after the timeout");
                    return 2;
                }
                left.min(if progress { REDRAW } else { left })
            }
            None if progress => REDRAW,
            None => Duration::from_secs(3600),
        };
        match events.next(Some(wait_for)) {
            // The status read at the top of the loop settles it (events may be folded
            // or lost to overflow; the status is the truth).
            Ok(Next::Events(_)) | Ok(Next::Timeout) => {}
            Ok(Next::End) => {
                eprintln!("streamfs: {name}: the mount went away while waiting");
                return 1;
            }
            Err(e) => {
                eprintln!("streamfs: {e}");
                return 2;
            }
        }
    }
}

/// `streamfs status [--watch]`: a bar per disk; with `watch`, until no job runs.
pub fn status(mountpoint: &Path, watch: bool) -> i32 {
    if !watch {
        return match client::status(mountpoint) {
            Ok(lines) => {
                for (name, kv) in &lines {
                    println!("{}", render_line(name, kv));
                }
                0
            }
            Err(e) => {
                eprintln!("streamfs: {e}");
                1
            }
        };
    }
    let mut events = match Events::open(mountpoint) {
        Ok(e) => e,
        Err(e) => {
            eprintln!("streamfs: {e}");
            return 1;
        }
    };
    let mut bars = Progress::new();
    loop {
        let lines = match client::status(mountpoint) {
            Ok(l) => l,
            Err(e) => {
                eprintln!("streamfs: {e}");
                return 1;
            }
        };
        for (name, kv) in &lines {
            bars.update(name, kv);
        }
        let active = lines.iter().any(|(_, kv)| {
            matches!(
                kv.get("state").map(String::as_str),
                Some("running" | "paused")
            )
        });
        if !active {
            bars.finish();
            return 0;
        }
        match events.next(Some(REDRAW)) {
            Ok(Next::End) => return 0,
            Ok(_) => {}
            Err(e) => {
                eprintln!("streamfs: {e}");
                return 1;
            }
        }
    }
}
