//! Progress display for `status --watch` and `start --wait`: an indicatif bar per disk,
//! redrawn in place when stdout is a terminal; plain lines (on change, at most every few
//! seconds) when it is not, so logs stay readable.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain (non-terminal) output repeats an unchanged running job.
const PLAIN_EVERY: Duration = Duration::from_secs(5);

pub fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn num(kv: &BTreeMap<String, String>, k: &str) -> u64 {
    kv.get(k).and_then(|v| v.parse().ok()).unwrap_or(0)
}

/// One status line as text: name, bar, percentage, state, bytes, rate, ETA.
pub fn render_line(name: &str, kv: &BTreeMap<String, String>) -> String {
    let (offset, len) = (num(kv, "offset"), num(kv, "len"));
    let pct = if len == 0 {
        100.0
    } else {
        offset as f64 * 100.0 / len as f64
    };
    let width = 30;
    let filled = (((pct / 100.0) * width as f64).round() as usize).min(width);
    let state = kv.get("state").map(String::as_str).unwrap_or("?");
    let mut line = format!(
        "{name:<16} [{}{}] {pct:5.1}%  {state:<9} {} / {}",
        "#".repeat(filled),
        "-".repeat(width - filled),
        human(offset),
        human(len)
    );
    if state == "running" {
        line.push_str(&format!(
            "  {}/s  ETA {}s",
            human(num(kv, "rate")),
            num(kv, "eta")
        ));
    }
    if let Some(e) = kv.get("error") {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

pub struct Progress {
    /// None: plain lines.
    multi: Option<MultiProgress>,
    bars: BTreeMap<String, ProgressBar>,
    plain: BTreeMap<String, (String, Instant)>,
}

impl Progress {
    /// Bars redrawn in place when stdout is a terminal; plain lines otherwise.
    pub fn new() -> Progress {
        let multi = std::io::stdout()
            .is_terminal()
            .then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stdout()));
        Progress {
            multi,
            bars: BTreeMap::new(),
            plain: BTreeMap::new(),
        }
    }

    pub fn update(&mut self, name: &str, kv: &BTreeMap<String, String>) {
        let Some(multi) = &self.multi else {
            let line = render_line(name, kv);
            let state_line = kv.get("state").cloned().unwrap_or_default();
            let due = match self.plain.get(name) {
                None => true,
                Some((last, at)) => {
                    *last != line
                        && (last.split_whitespace().nth(3) != Some(state_line.as_str())
                            || at.elapsed() >= PLAIN_EVERY)
                }
            };
            if due {
                println!("{line}");
                self.plain.insert(name.to_string(), (line, Instant::now()));
            }
            return;
        };
        let bar = self.bars.entry(name.to_string()).or_insert_with(|| {
            let b = multi.add(ProgressBar::new(num(kv, "len")));
            let style = ProgressStyle::with_template(
                "{prefix:16} [{bar:30}] {percent:>3}% {bytes}/{total_bytes} {msg}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("#>-");
            b.set_style(style);
            b.set_prefix(name.to_string());
            b
        });
        bar.set_length(num(kv, "len"));
        bar.set_position(num(kv, "offset"));
        let state = kv.get("state").map(String::as_str).unwrap_or("?");
        let msg = match state {
            "running" => format!("{}/s ETA {}s", human(num(kv, "rate")), num(kv, "eta")),
            "failed" => format!(
                "failed: {}",
                kv.get("error").map(String::as_str).unwrap_or("?")
            ),
            s => s.to_string(),
        };
        bar.set_message(msg);
        if !matches!(state, "running" | "paused") && !bar.is_finished() {
            bar.finish();
        }
    }

    pub fn finish(&mut self) {
        for b in self.bars.values() {
            if !b.is_finished() {
                b.abandon();
            }
        }
    }
}
