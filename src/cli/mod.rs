//! The command line: `mount`/`umount` drive the daemon; `status`, `start`, `cancel`,
//! `pause`, `resume`, `speed` and `threshold` talk to a running mount through its
//! `.control` file (`client`); `events`, `wait`, `start --wait` and `status --watch`
//! follow its `.events` (`wait`), drawing progress (`progress`).

mod client;
mod progress;
mod wait;

use std::fs::OpenOptions;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::{Parser, Subcommand};

use self::client::send;
use crate::control::parse_bytes;
use crate::daemon::{self, MountOptions};

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
        /// Only network backing files whose URI starts with PREFIX may be opened
        /// (repeatable; without it every nbd:, nbd://, nbd+unix://, http(s):// backing is).
        #[arg(long, value_name = "PREFIX")]
        allow_remote: Vec<String>,
        /// How long a read of a remote backing may wait for its server in all (reconnects
        /// included) before it fails with EIO; a stream job then fails.
        #[arg(long, value_name = "SECS", value_parser = secs_arg, default_value = "30")]
        remote_timeout: std::time::Duration,
        /// Extra CA certificates (PEM) for https:// backings, beside the system's roots.
        #[arg(long, value_name = "PATH")]
        ca_file: Option<PathBuf>,
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
        /// When stream work may run: host (no guest I/O on any chain of the mount and the
        /// disks under the images quiet), mount, disk (this chain's guest only) or off.
        #[arg(long, value_name = "POLICY", value_parser = idle_arg, default_value = "host")]
        idle: crate::jobs::Idle,
        /// Guaranteed rate of each job on a host that is never idle (bytes/s).
        #[arg(long, value_name = "BYTES", value_parser = bytes_arg, default_value = "4M")]
        min_speed: u64,
        /// Cap on the sum of all jobs' rates (bytes/s; 0 = unlimited).
        #[arg(long, value_name = "BYTES", value_parser = bytes_arg, default_value = "0")]
        total_speed: u64,
        /// Jobs running at once; more `start`s wait with state=queued (0 = unlimited).
        #[arg(long, value_name = "N", default_value_t = 0)]
        max_jobs: usize,
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
        /// Idle policy for this job (host, mount, disk, off; default: the mount's).
        #[arg(long, value_name = "POLICY", value_parser = idle_arg)]
        idle: Option<crate::jobs::Idle>,
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
    /// Follow MOUNTPOINT/.events until interrupted or unmounted (exit 0 at unmount).
    Events {
        mountpoint: PathBuf,
        /// One JSON object per line (seq, time, name, event, and the event's keys).
        #[arg(long)]
        json: bool,
    },
    /// Block until NAME's job ends: exit 0 completed, 1 failed or cancelled, 2 on
    /// timeout, no job since the mount, or bad usage.
    Wait {
        mountpoint: PathBuf,
        name: String,
        /// Give up after this many seconds (exit 2).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
    },
    /// Arm a one-shot write threshold on NAME's leaf image file (0 disarms): one
    /// `threshold` event fires when a write reaches past host offset BYTES.
    Threshold {
        mountpoint: PathBuf,
        name: String,
        #[arg(value_parser = bytes_arg)]
        bytes: u64,
    },
}

fn idle_arg(s: &str) -> Result<crate::jobs::Idle, String> {
    crate::jobs::Idle::parse(s).map_err(|e| e.to_string())
}

fn bytes_arg(s: &str) -> Result<u64, String> {
    parse_bytes(s).map_err(|e| e.to_string())
}

/// Seconds, fractions allowed ("30", "0.5"); more than 0 and at most a day.
fn secs_arg(s: &str) -> Result<std::time::Duration, String> {
    let v: f64 = s
        .parse()
        .map_err(|_| format!("'{s}' is not a number of seconds"))?;
    if !(v > 0.0 && v <= 86400.0) {
        return Err(format!(
            "'{s}': must be more than 0 and at most 86400 seconds"
        ));
    }
    Ok(std::time::Duration::from_secs_f64(v))
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
            remote_timeout,
            ca_file,
            no_copy_on_read,
            allow_other,
            log_file,
            verbose,
            speed,
            stream,
            threads,
            idle,
            min_speed,
            total_speed,
            max_jobs,
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
                remote: crate::source::RemoteOptions {
                    timeout: remote_timeout,
                    ca_file,
                },
                copy_on_read: !no_copy_on_read,
                allow_other,
                threads,
                speed,
                stream,
                policy: crate::jobs::Policy {
                    idle,
                    min_speed,
                    total_speed,
                    max_jobs,
                },
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
        Cmd::Status { mountpoint, watch } => wait::status(&mountpoint, watch),
        Cmd::Start {
            mountpoint,
            name,
            base,
            speed,
            offset,
            length,
            idle,
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
            if let Some(i) = idle {
                cmd.push_str(&format!(" idle={}", i.as_str()));
            }
            let code = send(&mountpoint, &cmd);
            if code != 0 || !wait {
                return code;
            }
            wait::wait(&mountpoint, &name, None, true)
        }
        Cmd::Cancel { mountpoint, name } => send(&mountpoint, &format!("cancel {name}")),
        Cmd::Pause { mountpoint, name } => send(&mountpoint, &format!("pause {name}")),
        Cmd::Resume { mountpoint, name } => send(&mountpoint, &format!("resume {name}")),
        Cmd::Speed {
            mountpoint,
            name,
            bytes,
        } => send(&mountpoint, &format!("speed {name} {bytes}")),
        Cmd::Events { mountpoint, json } => wait::follow(&mountpoint, json),
        Cmd::Wait {
            mountpoint,
            name,
            timeout,
        } => match timeout.map(Duration::try_from_secs_f64) {
            Some(Err(_)) => {
                eprintln!("streamfs: --timeout must be a number of seconds >= 0");
                2
            }
            Some(Ok(t)) => wait::wait(&mountpoint, &name, Some(t), false),
            None => wait::wait(&mountpoint, &name, None, false),
        },
        Cmd::Threshold {
            mountpoint,
            name,
            bytes,
        } => send(&mountpoint, &format!("threshold {name} {bytes}")),
    }
}
