//! The command line: `mount`/`umount` drive the daemon; `status`, `start`, `cancel`,
//! `pause`, `resume` and `speed` talk to a running mount through its `.control` file.

use std::fs::OpenOptions;
use std::io::{IsTerminal, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use crate::control::{self, parse_bytes};
use crate::daemon::{self, MountOptions};
use crate::fs::CONTROL_NAME;

#[derive(Parser)]
#[command(
    name = "streamfs",
    version,
    about = "Present qcow2 backing chains as flat raw files over FUSE, and stream them into their leaf",
    long_about = "streamfs shows each qcow2 backing chain (base <- ... <- leaf.qcow2) as one flat raw \
file in a mount point, readable and writable by any program (QEMU format=raw, dd, qemu-img). \
Reads copy what they touch into the leaf (copy-on-read); guest writes land in the leaf; a background \
stream job copies the rest and then drops the leaf's backing link. MOUNTPOINT/.control takes \
commands (start, cancel, pause, resume, speed) and shows each chain's job status when read."
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Mount chains: each [NAME=]IMAGE appears as MOUNTPOINT/NAME (default: the image's
    /// file name with its extension replaced by .raw). Returns once the mount is live.
    Mount {
        /// Directory to mount on (must exist and not already be a mount point).
        mountpoint: PathBuf,
        /// Top (leaf) image of each chain, optionally as NAME=IMAGE.
        #[arg(required = true, value_name = "[NAME=]IMAGE")]
        images: Vec<String>,
        /// Stay in the foreground (for systemd and debugging).
        #[arg(long)]
        foreground: bool,
        /// Open every image read-only: writes fail with EROFS, nothing is copied.
        #[arg(long)]
        read_only: bool,
        /// Ignore other users' image locks (like QEMU's -U; only with --read-only): read
        /// images that a VM may be writing, at the risk of inconsistent data.
        #[arg(long, requires = "read_only")]
        force_share: bool,
        /// Every backing file (after symlinks and ..) must lie under one of these
        /// directories, else the mount is refused (repeatable; default: anywhere).
        #[arg(long, value_name = "DIR")]
        backing_dir: Vec<PathBuf>,
        /// Refuse network backing files (nbd:, http:, ...).
        #[arg(long, conflicts_with = "allow_remote")]
        no_remote: bool,
        /// Network backing files whose name starts with PREFIX may be opened (repeatable;
        /// network backings are not implemented yet, so this only shapes the refusal).
        #[arg(long, value_name = "PREFIX")]
        allow_remote: Vec<String>,
        /// Do not copy data read from backing images into the leaf.
        #[arg(long)]
        no_copy_on_read: bool,
        /// Let other users access the mount (needs user_allow_other for non-root).
        #[arg(long)]
        allow_other: bool,
        /// Write the daemon's log to this file.
        #[arg(long, value_name = "PATH")]
        log_file: Option<PathBuf>,
        /// More logging (-v info, -vv debug); RUST_LOG overrides.
        #[arg(short, long, action = clap::ArgAction::Count)]
        verbose: u8,
        /// Default rate limit for stream jobs in bytes/s (K, M, G suffixes; 0 = unlimited).
        #[arg(long, value_name = "BYTES", value_parser = bytes_arg, default_value = "0")]
        speed: u64,
        /// Start a full stream of every chain at mount.
        #[arg(long)]
        stream: bool,
        /// FUSE request loops (threads serving requests).
        #[arg(long, default_value_t = 16)]
        threads: usize,
    },
    /// Unmount and wait until the daemon has flushed and exited.
    Umount {
        mountpoint: PathBuf,
        /// Detach even if files are open (the daemon exits once they are closed).
        #[arg(short, long)]
        lazy: bool,
        /// Seconds to wait for the daemon to exit.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
    },
    /// Show each chain's stream job as a progress bar.
    Status {
        mountpoint: PathBuf,
        /// Refresh every second until no job is running.
        #[arg(long)]
        watch: bool,
    },
    /// Start streaming the backing chain of NAME into its leaf.
    Start {
        mountpoint: PathBuf,
        name: String,
        /// Keep this backing image (and those below it); stream only the layers above.
        #[arg(long, value_name = "BACKING")]
        base: Option<String>,
        /// Rate limit in bytes/s (K, M, G suffixes; 0 = unlimited).
        #[arg(long, value_name = "BYTES", value_parser = bytes_arg)]
        speed: Option<u64>,
        /// Stream only from this guest offset...
        #[arg(long, value_name = "BYTES", value_parser = bytes_arg)]
        offset: Option<u64>,
        /// ...for this many bytes (the backing link is then kept).
        #[arg(long, value_name = "BYTES", value_parser = bytes_arg)]
        length: Option<u64>,
        /// Show progress until the job ends; exit non-zero unless it completed.
        #[arg(long)]
        wait: bool,
    },
    /// Cancel the stream job of NAME (returns once it has stopped; progress is kept).
    Cancel { mountpoint: PathBuf, name: String },
    /// Pause the stream job of NAME.
    Pause { mountpoint: PathBuf, name: String },
    /// Resume a paused stream job of NAME.
    Resume { mountpoint: PathBuf, name: String },
    /// Change the rate limit of NAME's running job (bytes/s, K/M/G suffixes, 0 = unlimited).
    Speed {
        mountpoint: PathBuf,
        name: String,
        #[arg(value_parser = bytes_arg)]
        bytes: u64,
    },
}

fn bytes_arg(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

fn init_logging(verbose: u8, log_file: Option<&Path>) -> Result<(), String> {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let mut b = env_logger::Builder::from_env(env_logger::Env::default().default_filter_or(level));
    if let Some(p) = log_file {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(p)
            .map_err(|e| format!("log file {}: {e}", p.display()))?;
        b.target(env_logger::Target::Pipe(Box::new(f)));
    }
    b.init();
    crate::panic_hook::install(log_file.is_some());
    Ok(())
}

pub fn main() -> i32 {
    let cli = Cli::parse();
    match cli.command {
        Cmd::Mount {
            mountpoint,
            images,
            foreground,
            read_only,
            force_share,
            backing_dir,
            no_remote,
            allow_remote,
            no_copy_on_read,
            allow_other,
            log_file,
            verbose,
            speed,
            stream,
            threads,
        } => {
            if let Err(e) = init_logging(verbose, log_file.as_deref()) {
                eprintln!("streamfs: {e}");
                return 1;
            }
            let mut chains = Vec::new();
            for arg in &images {
                match daemon::parse_chain_arg(arg) {
                    Ok(c) => chains.push(c),
                    Err(e) => {
                        eprintln!("streamfs: {e}");
                        return 1;
                    }
                }
            }
            daemon::mount(MountOptions {
                mountpoint,
                chains,
                foreground,
                read_only,
                force_share,
                backing_dirs: backing_dir,
                no_remote,
                allow_remote,
                copy_on_read: !no_copy_on_read,
                allow_other,
                threads,
                speed,
                stream,
            })
        }
        Cmd::Umount {
            mountpoint,
            lazy,
            timeout,
        } => match daemon::umount(&mountpoint, lazy, Duration::from_secs(timeout)) {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("streamfs: {e}");
                1
            }
        },
        Cmd::Status { mountpoint, watch } => status(&mountpoint, watch),
        Cmd::Start {
            mountpoint,
            name,
            base,
            speed,
            offset,
            length,
            wait,
        } => {
            let mut cmd = format!("start {name}");
            if let Some(b) = base {
                cmd.push_str(&format!(" base={b}"));
            }
            for (k, v) in [("speed", speed), ("offset", offset), ("length", length)] {
                if let Some(v) = v {
                    cmd.push_str(&format!(" {k}={v}"));
                }
            }
            let code = send(&mountpoint, &cmd);
            if code != 0 || !wait {
                return code;
            }
            wait_for_job(&mountpoint, &name)
        }
        Cmd::Cancel { mountpoint, name } => send(&mountpoint, &format!("cancel {name}")),
        Cmd::Pause { mountpoint, name } => send(&mountpoint, &format!("pause {name}")),
        Cmd::Resume { mountpoint, name } => send(&mountpoint, &format!("resume {name}")),
        Cmd::Speed {
            mountpoint,
            name,
            bytes,
        } => send(&mountpoint, &format!("speed {name} {bytes}")),
    }
}

/// Writes one command to `.control` and prints the daemon's answer.
fn send(mountpoint: &Path, cmd: &str) -> i32 {
    let path = mountpoint.join(CONTROL_NAME);
    let mut f = match OpenOptions::new().read(true).write(true).open(&path) {
        Ok(f) => f,
        Err(e) => {
            eprintln!(
                "streamfs: {}: {e} (is a streamfs file system mounted there?)",
                path.display()
            );
            return 1;
        }
    };
    let write_result = f.write_all(cmd.as_bytes());
    let mut answer = [0u8; 4096];
    let n = f.read_at(&mut answer, 0).unwrap_or(0);
    let answer = String::from_utf8_lossy(&answer[..n]).trim_end().to_string();
    match (write_result, answer.as_str()) {
        (Ok(()), "ok") => {
            println!("ok");
            0
        }
        (_, a) if a.starts_with("error: ") => {
            eprintln!("streamfs: {}", &a[7..]);
            1
        }
        (Err(e), _) => {
            eprintln!("streamfs: {cmd}: {e}");
            1
        }
        (Ok(()), a) => {
            eprintln!("streamfs: unexpected answer: {a}");
            1
        }
    }
}

type StatusLines = Vec<(String, std::collections::BTreeMap<String, String>)>;

/// Reads and parses `.control`; prints the error and returns None if it cannot.
fn read_status(mountpoint: &Path) -> Option<StatusLines> {
    let path = mountpoint.join(CONTROL_NAME);
    let mut s = String::new();
    match std::fs::File::open(&path).and_then(|mut f| f.read_to_string(&mut s)) {
        Ok(_) => Some(control::parse_status(&s)),
        Err(e) => {
            eprintln!("streamfs: {}: {e}", path.display());
            None
        }
    }
}

fn human(bytes: u64) -> String {
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

fn render_line(name: &str, kv: &std::collections::BTreeMap<String, String>) -> String {
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let (offset, len) = (num("offset"), num("len"));
    let pct = if len == 0 {
        100.0
    } else {
        offset as f64 * 100.0 / len as f64
    };
    let width = 30;
    let filled = ((pct / 100.0) * width as f64).round() as usize;
    let state = kv.get("state").map(String::as_str).unwrap_or("?");
    let mut line = format!(
        "{name:<16} [{}{}] {pct:5.1}%  {state:<9} {} / {}",
        "#".repeat(filled.min(width)),
        "-".repeat(width - filled.min(width)),
        human(offset),
        human(len)
    );
    if state == "running" {
        line.push_str(&format!("  {}/s  ETA {}s", human(num("rate")), num("eta")));
    }
    if let Some(e) = kv.get("error") {
        line.push_str(&format!("  error: {e}"));
    }
    line
}

fn status(mountpoint: &Path, watch: bool) -> i32 {
    let tty = std::io::stdout().is_terminal();
    loop {
        let Some(lines) = read_status(mountpoint) else {
            return 1;
        };
        if watch && tty {
            print!("\x1b[H\x1b[2J");
        }
        for (name, kv) in &lines {
            println!("{}", render_line(name, kv));
        }
        let active = lines.iter().any(|(_, kv)| {
            matches!(
                kv.get("state").map(String::as_str),
                Some("running" | "paused")
            )
        });
        if !watch || !active {
            return 0;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// Shows NAME's progress until its job ends; 0 only if it completed.
fn wait_for_job(mountpoint: &Path, name: &str) -> i32 {
    let tty = std::io::stderr().is_terminal();
    let mut last = String::new();
    loop {
        let Some(lines) = read_status(mountpoint) else {
            return 1;
        };
        let Some((_, kv)) = lines.into_iter().find(|(n, _)| n == name) else {
            eprintln!("streamfs: {name} disappeared from the status");
            return 1;
        };
        let line = render_line(name, &kv);
        let state = kv.get("state").cloned().unwrap_or_default();
        if tty {
            eprint!("\r{line}\x1b[K");
        } else if line != last {
            eprintln!("{line}");
        }
        last = line;
        match state.as_str() {
            "running" | "paused" => std::thread::sleep(Duration::from_millis(200)),
            "completed" => {
                if tty {
                    eprintln!();
                }
                println!("{name}: stream completed");
                return 0;
            }
            other => {
                if tty {
                    eprintln!();
                }
                let why = kv
                    .get("error")
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                eprintln!("streamfs: {name}: stream {other}{why}");
                return 1;
            }
        }
    }
}
