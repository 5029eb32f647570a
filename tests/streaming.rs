//! Streaming and control-file integration tests (issue 4): background STREAM jobs driven
//! through MOUNTPOINT/.control and the `streamfs start|cancel|pause|resume|speed|status`
//! CLI, checked against qemu-img's view of the images.
//!
//! Jobs are made slow with `speed=` whenever a test must interact with a running job, and
//! every wait polls the status with a timeout (no sleep that merely hopes).

mod common;

use common::*;
use std::fs::{self, File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

// Leaves are inspected while mounted. streamfs locks them as QEMU locks a running VM's
// disk, so these look as one looks at a live VM's disk, with -U (they shadow common's; common's compare uses -U itself).
fn qemu_img_info(image: &Path) -> serde_json::Value {
    let out = qemu_img(&[
        "info",
        "-U",
        "--output=json",
        "-f",
        image_format(image),
        ps(image),
    ]);
    serde_json::from_str(&out).expect("qemu-img info json")
}

fn check_status_leaf_only(image: &Path) -> (i32, String) {
    let spec = serde_json::json!({
        "driver": "qcow2",
        "backing": null,
        "file": {"driver": "file", "filename": ps(image)},
    });
    let out = qemu_img_output(&["check", "-U", &format!("json:{spec}")]);
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.code().unwrap_or(-1), text)
}

/// How long an unthrottled stream of a test chain (≤ 64 MiB) may take.
const STREAM_TIMEOUT: Duration = Duration::from_secs(60);

// ---------------------------------------------------------------------------------------------
// Chains
// ---------------------------------------------------------------------------------------------

/// The name to store in `image` so that `backing` resolves from `image`'s directory.
fn rel_name(backing: &Path, image: &Path) -> String {
    if backing.parent() == image.parent() {
        backing.file_name().unwrap().to_string_lossy().into_owned()
    } else {
        ps(backing).to_string()
    }
}

/// `dir/STEM-base.qcow2` (random data, fully allocated) <- `dir/STEM.qcow2` (a few writes
/// of its own). With `holes`, the base also has discarded and zeroed regions.
fn two_layer(dir: &Path, stem: &str, size: u64, seed: u64, holes: bool) -> Chain {
    let base = random_qcow2(&dir.join(format!("{stem}-base.qcow2")), size, seed);
    if holes {
        qemu_io_cmds(
            &base,
            &[
                &format!("discard {} 1M", 4 * MIB),
                &format!("write -z {} 512k", 6 * MIB),
            ],
        );
    }
    let top_path = dir.join(format!("{stem}.qcow2"));
    let top = Qcow2::new()
        .backing_name(&rel_name(&base, &top_path), "qcow2")
        .create(&top_path);
    qemu_io_cmds(
        &top,
        &[
            &format!("write -P 0xa5 {} 1M", MIB),
            &format!("write -P 0x5a {} 256k", size / 2 + 64 * KIB),
            &format!("write -z {} 64k", size - 2 * MIB),
        ],
    );
    Chain::new(top, vec![base]).with_reference()
}

/// base <- mid1 <- mid2 <- top, each layer overriding parts of the ones below (zero
/// clusters included). `base_dir` may differ from `dir` (then names are absolute or
/// relative with `..`, as given by `base_name`).
fn four_deep(dir: &Path, base_dir: &Path, size: u64, seed: u64) -> Chain {
    let base = random_qcow2(&base_dir.join("base.qcow2"), size, seed);
    let mid1_path = dir.join("mid1.qcow2");
    let base_name = if base_dir == dir {
        "base.qcow2".to_string()
    } else {
        // Relative to mid1's directory.
        let rel = pathdiff(&base, dir);
        assert!(dir.join(&rel).exists());
        rel
    };
    let mid1 = Qcow2::new()
        .backing_name(&base_name, "qcow2")
        .create(&mid1_path);
    qemu_io_cmds(
        &mid1,
        &[
            &format!("write -P 0x11 {} 2M", 2 * MIB),
            &format!("write -z {} 1M", 8 * MIB),
        ],
    );
    let mid2 = Qcow2::new()
        .backing_name("mid1.qcow2", "qcow2")
        .create(&dir.join("mid2.qcow2"));
    qemu_io_cmds(
        &mid2,
        &[
            &format!("write -P 0x22 {} 1M", 3 * MIB),
            &format!("write -P 0x23 {} 3M", 12 * MIB),
        ],
    );
    let top = Qcow2::new()
        .backing_name("mid2.qcow2", "qcow2")
        .create(&dir.join("top.qcow2"));
    qemu_io_cmds(
        &top,
        &[
            &format!("write -P 0x33 {} 512k", 13 * MIB),
            &format!("write -P 0x34 {} 64k", size - 64 * KIB),
        ],
    );
    Chain::new(top, vec![mid2, mid1, base]).with_reference()
}

/// `target` relative to directory `from` (both absolute, no symlink games).
fn pathdiff(target: &Path, from: &Path) -> String {
    let t: Vec<_> = target.components().collect();
    let f: Vec<_> = from.components().collect();
    let common = t.iter().zip(&f).take_while(|(a, b)| a == b).count();
    let mut rel = PathBuf::new();
    for _ in common..f.len() {
        rel.push("..");
    }
    for c in &t[common..] {
        rel.push(c);
    }
    ps(&rel).to_string()
}

// ---------------------------------------------------------------------------------------------
// qemu-img checks
// ---------------------------------------------------------------------------------------------

/// The leaf has no backing file according to `qemu-img info`.
fn assert_no_backing(image: &Path) {
    let info = qemu_img_info(image);
    assert!(
        info.get("backing-filename").is_none() && info.get("full-backing-filename").is_none(),
        "{image:?} still has a backing file: {info:#}"
    );
    let text = qemu_img(&["info", "-U", "-f", "qcow2", ps(image)]);
    assert!(
        !text.contains("backing file"),
        "qemu-img info {image:?} shows a backing file:\n{text}"
    );
}

/// After a full stream: the leaf has no backing file, `qemu-img check` of it is clean and
/// the chain (now the leaf alone) still equals the reference.
fn assert_fully_streamed(c: &Chain) {
    assert_no_backing(&c.top);
    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(code, 0, "{out}");
    c.assert_compare();
}

/// The backing file name stored in `image` (None without one).
fn backing_filename(image: &Path) -> Option<String> {
    qemu_img_info(image)["backing-filename"]
        .as_str()
        .map(str::to_string)
}

/// Guest ranges the leaf itself allocates (data at depth 0), merged.
fn leaf_extents(image: &Path) -> Vec<std::ops::Range<u64>> {
    merge_ranges(
        qemu_img_map(image)
            .into_iter()
            .filter(|e| e.depth == 0 && (e.data || e.zero))
            .map(|e| e.start..e.start + e.length),
    )
}

/// Runs the streamfs CLI.
fn cli(args: &[&str]) -> Output {
    let mut cmd = Command::new(streamfs_bin());
    cmd.args(args);
    run_with_timeout(cmd, Duration::from_secs(120))
}

fn show(o: &Output) -> String {
    format!(
        "{}\nstdout:\n{}\nstderr:\n{}",
        o.status,
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Reads `len` bytes at `off` of a mounted file (bounded).
fn pread_mount(path: &Path, off: u64, len: usize) -> std::io::Result<Vec<u8>> {
    let p = path.to_path_buf();
    with_timeout("pread through the mount", IO_TIMEOUT, move || {
        let f = File::open(&p)?;
        let mut buf = vec![0u8; len];
        let mut done = 0;
        while done < len {
            let n = f.read_at(&mut buf[done..], off + done as u64)?;
            if n == 0 {
                break;
            }
            done += n;
        }
        buf.truncate(done);
        Ok(buf)
    })
}

/// The whole mounted file via O_DIRECT (bypassing the page cache) equals `want`.
fn assert_mount_reads(m: &Mount, name: &str, want: &[u8]) {
    let got = read_file_direct(&m.file(name), MIB as usize);
    assert_bytes_eq(&format!("{name} through the mount"), &got, want);
}

// ---------------------------------------------------------------------------------------------
// Full stream
// ---------------------------------------------------------------------------------------------

#[test]
fn full_stream_removes_backing_and_backing_files_can_go() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 32 * MIB, 1, true);
    let name = c.name();
    let m = s.mount(&[&c.top], &[]);

    let idle = job(&m, &name);
    assert_eq!(state(&idle), "idle", "{}", idle.raw);
    assert_eq!(num(&idle, "len"), c.size(), "{}", idle.raw);
    assert_eq!(num(&idle, "layers"), 2, "{}", idle.raw);

    // The shell way: `echo start NAME > .control`.
    let sh = run_with_timeout(
        {
            let mut cmd = Command::new("sh");
            cmd.arg("-c")
                .arg(format!("echo start {name} > {}", ps(&m.control())));
            cmd
        },
        IO_TIMEOUT,
    );
    assert!(sh.status.success(), "echo start > .control: {}", show(&sh));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert_eq!(num(&done, "len"), c.size(), "{}", done.raw);
    assert_eq!(num(&done, "layers"), 1, "{}", done.raw);
    assert!(num(&done, "copied") > 0, "{}", done.raw);
    assert!(
        num(&done, "copied") <= c.size() - num(&idle, "leaf"),
        "copied more than the leaf lacked: {} (idle: {})",
        done.raw,
        idle.raw
    );
    assert_eq!(done.get("base"), Some("-"), "{}", done.raw);
    // The final state stays visible.
    assert_eq!(state(&job(&m, &name)), "completed");

    // The backing link is gone on disk already (durably rewritten), qemu agrees.
    assert_no_backing(&c.top);
    c.assert_compare();

    // The backing file can be deleted while mounted: both the mount and QEMU still read it.
    for b in &c.backing {
        fs::remove_file(b).unwrap();
    }
    assert_mount_reads(&m, &name, c.reference());
    check_random_preads(
        &m.file(&name),
        c.reference().to_vec().into(),
        64 * KIB,
        200,
        7,
    );
    c.assert_compare();
    qemu_io(&[
        "-r",
        "-U",
        "-f",
        "qcow2",
        "-c",
        &format!("read -P 0xa5 {} 1M", MIB),
        ps(&c.top),
    ]);
    m.umount();

    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(code, 0, "qemu-img check after a full stream:\n{out}");
    assert_no_backing(&c.top);
    c.assert_compare();
    qemu_io(&[
        "-r",
        "-f",
        "qcow2",
        "-c",
        &format!("read -P 0x5a {} 256k", 16 * MIB + 64 * KIB),
        ps(&c.top),
    ]);
    // And it mounts alone.
    let m = s.mount(&[&c.top], &["--read-only"]);
    assert_eq!(num(&job(&m, &name), "layers"), 1);
    assert_mount_reads(&m, &name, c.reference());
    m.umount();
}

// ---------------------------------------------------------------------------------------------
// Stream with a base
// ---------------------------------------------------------------------------------------------

/// Streams `c` keeping `base_arg` (the chain's last image), then checks the new link.
fn stream_keeping_base(s: &Scratch, c: &Chain, base_arg: &str) {
    let name = c.name();
    let base = c.backing.last().unwrap().clone();
    let m = s.mount(&[&c.top], &[]);
    assert_eq!(num(&job(&m, &name), "layers"), 4);
    ctl_ok(&m, &format!("start {name} base={base_arg}"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert_eq!(num(&done, "layers"), 2, "{}", done.raw);
    let shown_base = done.get("base").unwrap_or("-");
    assert!(
        shown_base != "-" && shown_base.contains("base.qcow2"),
        "status does not name the kept base: {}",
        done.raw
    );

    let check_link = || {
        let info = qemu_img_info(&c.top);
        let bf = info["backing-filename"]
            .as_str()
            .unwrap_or_else(|| panic!("no backing-filename after a stream with base: {info:#}"));
        let resolved = c.top.parent().unwrap().join(bf);
        assert_eq!(
            fs::canonicalize(&resolved).ok(),
            Some(fs::canonicalize(&base).unwrap()),
            "backing-filename {bf:?} does not resolve from the leaf's directory to {base:?}"
        );
        let full = info["full-backing-filename"]
            .as_str()
            .unwrap_or_else(|| panic!("no full-backing-filename: {info:#}"));
        assert_eq!(
            fs::canonicalize(full).ok(),
            Some(fs::canonicalize(&base).unwrap()),
            "full-backing-filename {full:?} is not {base:?}"
        );
        assert_eq!(
            info["backing-filename-format"].as_str(),
            Some("qcow2"),
            "backing format: {info:#}"
        );
    };
    check_link();
    c.assert_compare();

    // The streamed-out layers may go; the kept base is still used.
    for mid in &c.backing[..c.backing.len() - 1] {
        fs::remove_file(mid).unwrap();
    }
    assert_mount_reads(&m, &name, c.reference());
    m.umount();

    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(code, 0, "qemu-img check:\n{out}");
    check_link();
    c.assert_compare();
    // The leaf only lacks what the base provides: map depth is 0 or 1, never deeper.
    let chain_json = qemu_img(&[
        "info",
        "--backing-chain",
        "--output=json",
        "-f",
        "qcow2",
        ps(&c.top),
    ]);
    let v: serde_json::Value = serde_json::from_str(&chain_json).unwrap();
    assert_eq!(
        v.as_array().map(Vec::len),
        Some(2),
        "chain after stream: {v:#}"
    );
    let m = s.mount(&[&c.top], &["--read-only"]);
    assert_mount_reads(&m, &name, c.reference());
    m.umount();
}

#[test]
fn stream_with_base_repoints_backing() {
    require_fuse!();
    let s = Scratch::new();
    let c = four_deep(s.path(), s.path(), 32 * MIB, 2);
    stream_keeping_base(&s, &c, "base.qcow2");
    assert_eq!(backing_filename(&c.top).as_deref(), Some("base.qcow2"));
}

#[test]
fn stream_with_base_in_another_directory() {
    require_fuse!();
    let s = Scratch::new();
    let vm = s.subdir("vms/one");
    let bases = s.subdir("templates");
    let c = four_deep(&vm, &bases, 32 * MIB, 3);
    let base = c.backing.last().unwrap().clone();
    stream_keeping_base(&s, &c, ps(&base));
    // Still resolves when the whole tree moves (the name is relative to the leaf).
    let bf = backing_filename(&c.top).unwrap();
    assert!(
        !Path::new(&bf).is_absolute() || bf == ps(&base),
        "unexpected backing name {bf:?}"
    );
}

// ---------------------------------------------------------------------------------------------
// Range stream
// ---------------------------------------------------------------------------------------------

#[test]
fn range_stream_allocates_only_that_range() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 32 * MIB, 4, false);
    let name = c.name();
    let before = leaf_extents(&c.top);
    let link = backing_filename(&c.top);
    assert!(link.is_some());
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    ctl_ok(&m, &format!("start {name} offset=8M length=4M"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert_eq!(num(&done, "len"), 4 * MIB, "{}", done.raw);
    assert_eq!(num(&done, "copied"), 4 * MIB, "{}", done.raw);
    assert_eq!(
        num(&done, "layers"),
        2,
        "range stream dropped layers: {}",
        done.raw
    );
    assert_mount_reads(&m, &name, c.reference());
    // A second range, with K suffixes.
    ctl_ok(&m, &format!("start {name} offset=20480K length=1024K"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert_eq!(num(&done, "len"), MIB, "{}", done.raw);
    m.umount();

    assert_eq!(
        backing_filename(&c.top),
        link,
        "range stream changed the backing link"
    );
    let after = leaf_extents(&c.top);
    let want = merge_ranges({
        let mut v = before.clone();
        v.push(8 * MIB..12 * MIB);
        v.push(20 * MIB..21 * MIB);
        v.sort_by_key(|r| r.start);
        v
    });
    assert_eq!(
        after, want,
        "leaf allocation after range streams (before: {before:?})"
    );
    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(code, 0, "{out}");
    c.assert_compare();

    // A full stream afterwards copies only what the ranges did not.
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    let idle = job(&m, &name);
    let missing = c.size() - num(&idle, "leaf");
    ctl_ok(&m, &format!("start {name}"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert_eq!(
        num(&done, "copied"),
        missing,
        "{} (idle: {})",
        done.raw,
        idle.raw
    );
    assert_eq!(num(&done, "layers"), 1, "{}", done.raw);
    m.umount();
    assert_no_backing(&c.top);
    c.assert_compare();
}

#[test]
fn umount_during_stream_keeps_progress() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 24, false);
    let name = c.name();
    let link = backing_filename(&c.top);
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    let missing = c.size() - num(&job(&m, &name), "leaf");
    ctl_ok(&m, &format!("start {name} speed=1M"));
    let l = wait_job(&m, &name, Duration::from_secs(20), "copying", |l| {
        num(l, "copied") > 0
    });
    let copied1 = num(&l, "copied");
    // Unmounting stops the (sleeping, throttled) job promptly.
    let t = Instant::now();
    m.umount();
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "umount during a throttled stream took {:?}",
        t.elapsed()
    );
    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(code, 0, "{out}");
    assert_eq!(backing_filename(&c.top), link);
    c.assert_compare();

    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    let idle = job(&m, &name);
    assert_eq!(state(&idle), "idle", "{}", idle.raw);
    let missing2 = c.size() - num(&idle, "leaf");
    assert!(
        missing2 <= missing - copied1,
        "progress lost over umount: leaf lacked {missing}, job copied {copied1}, now lacks {missing2}"
    );
    ctl_ok(&m, &format!("start {name}"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert_eq!(num(&done, "copied"), missing2, "{}", done.raw);
    m.umount();
    assert_no_backing(&c.top);
    c.assert_compare();
}

#[test]
fn stream_with_raw_base_keeps_its_format() {
    require_fuse!();
    let s = Scratch::new();
    let size = 16 * MIB;
    let base = create_raw_from(&s.join("base.img"), &random_bytes(25, size as usize));
    let mid = Qcow2::new()
        .backing_name("base.img", "raw")
        .create(&s.join("mid.qcow2"));
    write_pattern(&mid, 0x44, 2 * MIB, 3 * MIB);
    let top = Qcow2::new()
        .backing_name("mid.qcow2", "qcow2")
        .create(&s.join("top.qcow2"));
    write_pattern(&top, 0x55, 4 * MIB, 64 * KIB);
    let c = Chain::new(top, vec![mid, base.clone()]).with_reference();
    let m = s.mount(&[&c.top], &[]);
    ctl_ok(&m, &format!("start {} base=base.img", c.name()));
    let done = wait_completed(&m, &c.name(), STREAM_TIMEOUT);
    assert_eq!(num(&done, "layers"), 2, "{}", done.raw);
    fs::remove_file(&c.backing[0]).unwrap();
    assert_mount_reads(&m, &c.name(), c.reference());
    m.umount();
    let info = qemu_img_info(&c.top);
    assert_eq!(
        info["backing-filename"].as_str(),
        Some("base.img"),
        "{info:#}"
    );
    assert_eq!(
        info["backing-filename-format"].as_str(),
        Some("raw"),
        "the kept raw base must be recorded with its format: {info:#}"
    );
    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(code, 0, "{out}");
    c.assert_compare();
}

// ---------------------------------------------------------------------------------------------
// Cancel, pause, resume, speed
// ---------------------------------------------------------------------------------------------

#[test]
fn cancel_then_restart_continues_without_recopying() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 5, false);
    let name = c.name();
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    let idle = job(&m, &name);
    let missing = c.size() - num(&idle, "leaf");

    ctl_ok(&m, &format!("start {name} speed=1M"));
    let running = wait_job(&m, &name, Duration::from_secs(20), "copying", |l| {
        num(l, "copied") > 0
    });
    assert_eq!(state(&running), "running", "{}", running.raw);
    let t = Instant::now();
    ctl_ok(&m, &format!("cancel {name}"));
    assert!(
        t.elapsed() < Duration::from_secs(5),
        "cancel of a throttled job took {:?}",
        t.elapsed()
    );
    // cancel returns only once the job stopped.
    let cancelled = job(&m, &name);
    assert_eq!(
        state(&cancelled),
        "cancelled",
        "right after cancel: {}",
        cancelled.raw
    );
    let copied1 = num(&cancelled, "copied");
    assert!(copied1 > 0 && copied1 < missing, "{}", cancelled.raw);
    assert_eq!(num(&cancelled, "layers"), 2, "{}", cancelled.raw);
    thread::sleep(Duration::from_millis(300));
    let later = job(&m, &name);
    assert_eq!(
        num(&later, "copied"),
        copied1,
        "copying went on after cancel: {}",
        later.raw
    );
    assert_eq!(state(&later), "cancelled", "{}", later.raw);
    assert_mount_reads(&m, &name, c.reference());
    ctl_fails(&m, &format!("cancel {name}"), libc::ESRCH);

    // Restart: completes, copying only what the first job did not.
    ctl_ok(&m, &format!("start {name}"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    let copied2 = num(&done, "copied");
    assert!(
        copied2 < missing,
        "second job copied {copied2} of {missing} missing bytes (first job copied {copied1})"
    );
    assert_eq!(
        copied1 + copied2,
        missing,
        "first + second job copies != bytes the leaf lacked (recopied or skipped?)"
    );
    assert_eq!(num(&done, "layers"), 1, "{}", done.raw);
    assert_mount_reads(&m, &name, c.reference());
    m.umount();
    assert_fully_streamed(&c);
}

#[test]
fn pause_resume_and_speed_zero() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 6, false);
    let name = c.name();
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);

    ctl_ok(&m, &format!("start {name} speed=4M"));
    wait_job(&m, &name, Duration::from_secs(20), "copying", |l| {
        num(l, "copied") > 0
    });
    ctl_ok(&m, &format!("pause {name}"));
    let p1 = job(&m, &name);
    assert_eq!(state(&p1), "paused", "{}", p1.raw);
    thread::sleep(Duration::from_millis(600));
    let p2 = job(&m, &name);
    assert_eq!(state(&p2), "paused", "{}", p2.raw);
    assert_eq!(
        num(&p2, "copied"),
        num(&p1, "copied"),
        "copied advanced while paused: {} -> {}",
        p1.raw,
        p2.raw
    );
    assert_eq!(
        num(&p2, "offset"),
        num(&p1, "offset"),
        "{} -> {}",
        p1.raw,
        p2.raw
    );
    // speed works while paused.
    ctl_ok(&m, &format!("speed {name} 3M"));
    assert_eq!(num(&job(&m, &name), "speed"), 3 * MIB);

    ctl_ok(&m, &format!("resume {name}"));
    let r = job(&m, &name);
    assert_eq!(state(&r), "running", "after resume: {}", r.raw);
    // Unlimited: the rest goes quickly.
    let t = Instant::now();
    ctl_ok(&m, &format!("speed {name} 0"));
    assert_eq!(num(&job(&m, &name), "speed"), 0);
    let done = wait_completed(&m, &name, Duration::from_secs(20));
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "after `speed {name} 0` the job took {:?} to finish ({})",
        t.elapsed(),
        done.raw
    );
    assert_mount_reads(&m, &name, c.reference());
    m.umount();
    assert_no_backing(&c.top);
    c.assert_compare();
}

#[test]
fn pause_takes_effect_promptly_on_a_slow_job() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 27, false);
    let name = c.name();
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    ctl_ok(&m, &format!("start {name} speed=1M"));
    wait_job(&m, &name, Duration::from_secs(20), "copying", |l| {
        num(l, "copied") > 0
    });
    // A slow job must not make `pause` block for long (like `cancel` and `speed`, it has
    // to act at once, not after the current rate-limit delay).
    let t = Instant::now();
    ctl_ok(&m, &format!("pause {name}"));
    let took = t.elapsed();
    let p1 = job(&m, &name);
    assert_eq!(state(&p1), "paused", "{}", p1.raw);
    thread::sleep(Duration::from_millis(500));
    let p2 = job(&m, &name);
    assert_eq!(
        num(&p2, "copied"),
        num(&p1, "copied"),
        "{} -> {}",
        p1.raw,
        p2.raw
    );
    assert!(
        took < Duration::from_secs(3),
        "pause of a speed=1M job took {took:?}"
    );
    ctl_ok(&m, &format!("resume {name}"));
    let t = Instant::now();
    ctl_ok(&m, &format!("cancel {name}"));
    assert!(
        t.elapsed() < Duration::from_secs(3),
        "cancel took {:?}",
        t.elapsed()
    );
    assert_eq!(state(&job(&m, &name)), "cancelled");
    m.umount();
    c.assert_compare();
}

#[test]
fn speed_limit_is_respected() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 7, false);
    let name = c.name();
    // The default limit comes from `mount --speed`.
    let m = s.mount(&[&c.top], &["--no-copy-on-read", "--speed", "2M"]);

    ctl_ok(&m, &format!("start {name}"));
    let t = Instant::now();
    let first = job(&m, &name);
    assert_eq!(
        num(&first, "speed"),
        2 * MIB,
        "mount --speed default: {}",
        first.raw
    );
    thread::sleep(Duration::from_millis(1500));
    let l = job(&m, &name);
    let el = t.elapsed();
    assert_eq!(state(&l), "running", "{}", l.raw);
    let copied = num(&l, "copied");
    // 2 MiB/s for ~1.5 s is ~3 MiB; allow a burst, but nowhere near 16 MiB.
    assert!(
        copied <= 8 * MIB,
        "speed=2M: copied {copied} bytes in {el:?} ({})",
        l.raw
    );
    assert!(copied > 0, "nothing copied in {el:?}: {}", l.raw);
    // offset (QEMU's progress) follows the copying.
    assert!(
        num(&l, "offset") > 0 || copied == 0,
        "offset does not advance although {copied} bytes were copied: {}",
        l.raw
    );

    // A live change, with each suffix.
    for (arg, want) in [
        ("1024K", MIB),
        ("1M", MIB),
        ("1G", 1 << 30),
        ("3145728", 3 * MIB),
    ] {
        ctl_ok(&m, &format!("speed {name} {arg}"));
        let l = job(&m, &name);
        assert_eq!(num(&l, "speed"), want, "after speed {arg}: {}", l.raw);
    }
    ctl_ok(&m, &format!("speed {name} 512K"));
    let a = num(&job(&m, &name), "copied");
    let t = Instant::now();
    thread::sleep(Duration::from_millis(1000));
    let b = num(&job(&m, &name), "copied");
    assert!(
        b - a <= 4 * MIB,
        "speed=512K: copied {} bytes in {:?}",
        b - a,
        t.elapsed()
    );
    ctl_ok(&m, &format!("speed {name} 0"));
    wait_completed(&m, &name, Duration::from_secs(20));
    m.umount();
    c.assert_compare();
}

#[test]
fn offset_and_copied_advance_while_throttled() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 23, false);
    let name = c.name();
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    let t = Instant::now();
    ctl_ok(&m, &format!("start {name} speed=1M"));
    assert!(
        t.elapsed() < Duration::from_secs(2),
        "start of a throttled job took {:?} (must return at once)",
        t.elapsed()
    );
    // QEMU's `offset`: progress through the range, advancing as the job copies (and over
    // what is already present). Sampled for 3 s: monotonic, and it must move.
    let (mut last_off, mut last_copied) = (0, 0);
    let mut samples = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        let l = job(&m, &name);
        assert_eq!(state(&l), "running", "{}", l.raw);
        let (off, copied) = (num(&l, "offset"), num(&l, "copied"));
        assert!(
            off >= last_off,
            "offset went backwards: {last_off} -> {}",
            l.raw
        );
        assert!(
            copied >= last_copied,
            "copied went backwards: {last_copied} -> {}",
            l.raw
        );
        assert!(off <= num(&l, "len"), "{}", l.raw);
        (last_off, last_copied) = (off, copied);
        samples.push(l.raw);
        thread::sleep(Duration::from_millis(100));
    }
    assert!(
        last_off > 0,
        "offset still 0 after 3 s of a speed=1M stream although copied={last_copied}; samples:\n{}",
        samples.join("\n")
    );
    // The CLI's percentage follows offset.
    let out = cli(&["status", ps(m.path())]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        !text.contains(" 0.0%"),
        "status shows 0% while the job has made progress:\n{text}"
    );
    ctl_ok(&m, &format!("cancel {name}"));
    m.umount();
    c.assert_compare();
}

// ---------------------------------------------------------------------------------------------
// Control errors
// ---------------------------------------------------------------------------------------------

#[test]
fn control_errors_have_their_errno() {
    require_fuse!();
    let s = Scratch::new();
    let c = two_layer(s.path(), "vm", 64 * MIB, 8, false);
    let name = c.name();
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);

    // Malformed or unknown commands and arguments: EINVAL.
    for cmd in [
        "frobnicate vm.raw".to_string(),
        "".to_string(),
        "start".to_string(),
        "cancel".to_string(),
        "pause".to_string(),
        "resume".to_string(),
        format!("cancel {name} {name}"),
        format!("pause {name} extra"),
        "speed".to_string(),
        format!("speed {name}"),
        format!("speed {name} fast"),
        format!("speed {name} 12Q"),
        format!("speed {name} -5"),
        format!("speed {name} 1.5M"),
        format!("speed {name} M"),
        format!("speed {name} 1M 2M"),
        format!("start {name} speed=abc"),
        format!("start {name} speed=10X"),
        format!("start {name} speed="),
        format!("start {name} offset=1Z length=1M"),
        format!("start {name} offset=0 length=zz"),
        format!("start {name} bogus=1"),
        format!("start {name} speed"),
        format!("START {name}"),
        format!("start {name} speed=99999999999999999999999"),
    ] {
        ctl_fails(&m, &cmd, libc::EINVAL);
    }
    // Oversized, binary junk, several lines: EINVAL and no harm.
    let mut big = format!("start {name} base=").into_bytes();
    big.resize(5000, b'x');
    ctl_fails_raw(&m, &big, libc::EINVAL);
    let mut big = vec![b' '; 8000];
    big.extend_from_slice(format!("start {name}").as_bytes());
    ctl_fails_raw(&m, &big, libc::EINVAL);
    let junk = random_bytes(99, 512);
    ctl_fails_raw(&m, &junk, libc::EINVAL);
    ctl_fails_raw(&m, b"start \0vm.raw\n", libc::EINVAL);
    ctl_fails_raw(&m, b"\xff\xfe\x00\x01start", libc::EINVAL);
    ctl_fails_raw(
        &m,
        format!("start {name}\nstart {name}\n").as_bytes(),
        libc::EINVAL,
    );
    let l = job(&m, &name);
    assert_eq!(
        state(&l),
        "idle",
        "a failed command did something: {}",
        l.raw
    );

    // Unknown NAME or BACKING: ENOENT.
    ctl_fails(&m, "start nosuch.raw", libc::ENOENT);
    ctl_fails(&m, "cancel nosuch.raw", libc::ENOENT);
    ctl_fails(&m, "pause nosuch.raw", libc::ENOENT);
    ctl_fails(&m, "resume nosuch.raw", libc::ENOENT);
    ctl_fails(&m, "speed nosuch.raw 1M", libc::ENOENT);
    ctl_fails(&m, &format!("start {name} base=nosuch.qcow2"), libc::ENOENT);
    // The leaf itself is not a backing file below the leaf.
    ctl_fails(&m, &format!("start {name} base=vm.qcow2"), libc::ENOENT);

    // No active job: ESRCH (the documented choice).
    for verb in ["cancel", "pause", "resume"] {
        ctl_fails(&m, &format!("{verb} {name}"), libc::ESRCH);
    }
    ctl_fails(&m, &format!("speed {name} 1M"), libc::ESRCH);
    assert_eq!(state(&job(&m, &name)), "idle");

    // Active job: EBUSY for start; the running job is unaffected by all of the above.
    ctl_ok(&m, &format!("start {name} speed=1M"));
    let before = job(&m, &name);
    assert_eq!(state(&before), "running", "{}", before.raw);
    ctl_fails(&m, &format!("start {name}"), libc::EBUSY);
    ctl_fails(&m, &format!("start {name} offset=0 length=1M"), libc::EBUSY);
    ctl_fails_raw(&m, &junk, libc::EINVAL);
    ctl_fails(&m, &format!("speed {name} 7Y"), libc::EINVAL);
    let l = job(&m, &name);
    assert_eq!(state(&l), "running", "{}", l.raw);
    assert_eq!(
        num(&l, "speed"),
        MIB,
        "a failed command changed the speed: {}",
        l.raw
    );
    ctl_ok(&m, &format!("pause {name}"));
    ctl_fails(&m, &format!("start {name}"), libc::EBUSY);
    ctl_ok(&m, &format!("resume {name}"));
    ctl_ok(&m, &format!("cancel {name}"));
    for verb in ["cancel", "pause", "resume"] {
        ctl_fails(&m, &format!("{verb} {name}"), libc::ESRCH);
    }
    ctl_fails(&m, &format!("speed {name} 0"), libc::ESRCH);
    // Range outside the disk.
    ctl_fails(
        &m,
        &format!("start {name} offset=64M length=1M"),
        libc::EINVAL,
    );

    // The plain shell forms also work (O_TRUNC open, trailing newline) and the answer of
    // a successful command reads back as `ok`.
    let (r, answer) = ctl_answer_raw(&m, format!("start {name} speed=1M").as_bytes());
    assert_eq!(r, Ok(()), "start without a newline");
    assert_eq!(answer, "ok\n");
    assert_eq!(ctl(&m, &format!("speed {name} 2M")), Ok(()));
    assert_eq!(num(&job(&m, &name), "speed"), 2 * MIB);
    assert_eq!(ctl(&m, &format!("cancel {name}")), Ok(()));
    assert_eq!(state(&job(&m, &name)), "cancelled");

    // Still healthy: the disk reads correctly and a job can run to the end.
    assert_mount_reads(&m, &name, c.reference());
    ctl_ok(&m, &format!("start {name}"));
    wait_completed(&m, &name, STREAM_TIMEOUT);
    ctl_fails(&m, &format!("pause {name}"), libc::ESRCH);
    m.umount();
    c.assert_compare();

    // EROFS for start on a read-only mount (no job to act on otherwise).
    let c2 = two_layer(s.path(), "ro", 16 * MIB, 9, false);
    let m = s.mount(&[&c2.top], &["--read-only"]);
    ctl_fails(&m, &format!("start {}", c2.name()), libc::EROFS);
    ctl_fails(
        &m,
        &format!("start {} offset=0 length=1M", c2.name()),
        libc::EROFS,
    );
    ctl_fails(&m, "start nosuch.raw", libc::ENOENT);
    ctl_fails(&m, "frob", libc::EINVAL);
    assert_eq!(state(&job(&m, &c2.name())), "idle");
    m.umount();
    assert!(backing_filename(&c2.top).is_some());
}

#[test]
fn control_file_is_0600_and_status_is_parseable() {
    require_fuse!();
    let s = Scratch::new();
    let a = two_layer(s.path(), "a", 16 * MIB, 10, false);
    let b = two_layer(s.path(), "b", 16 * MIB, 11, false);
    let m = s.mount(&[&a.top, &b.top], &[]);
    use std::os::unix::fs::PermissionsExt;
    let meta = fs::metadata(m.control()).unwrap();
    assert_eq!(meta.permissions().mode() & 0o7777, 0o600, ".control mode");
    let lines = m.control_lines();
    assert_eq!(lines.len(), 2, "{}", m.read_control());
    for (l, c) in lines.iter().zip([&a, &b]) {
        assert_eq!(l.name, c.name());
        assert_eq!(state(l), "idle");
        for key in ["offset", "len", "copied", "rate", "eta", "speed"] {
            num(l, key);
        }
        assert!(l.get("base").is_some(), "no base= in {}", l.raw);
    }
    m.umount();
}

// ---------------------------------------------------------------------------------------------
// Guest writes during a stream
// ---------------------------------------------------------------------------------------------

/// Random writes (and checked reads) on the mounted file until `stop`, mirrored into
/// `model`; returns the model and the number of operations.
fn guest_io(
    path: PathBuf,
    mut model: Vec<u8>,
    seed: u64,
    stop: Arc<AtomicBool>,
    min_ops: usize,
    pace: Duration,
) -> (Vec<u8>, usize) {
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    let size = model.len() as u64;
    let mut ops = 0;
    while !stop.load(Ordering::Acquire) || ops < min_ops {
        let (off, len) = match rng.gen_range(0..4) {
            // Cluster-aligned, cluster-sized.
            0 => (
                rng.gen_range(0..size / (64 * KIB)) * 64 * KIB,
                64 * KIB as usize,
            ),
            // Small, unaligned, often crossing a cluster boundary.
            1 => {
                let k = rng.gen_range(1..size / (64 * KIB));
                (
                    k * 64 * KIB - rng.gen_range(1..4096),
                    rng.gen_range(1..8192),
                )
            }
            _ => (rng.gen_range(0..size - 1), rng.gen_range(1..300 * 1024)),
        };
        let len = len.min((size - off) as usize);
        let data = random_bytes(rng.gen(), len);
        f.write_all_at(&data, off)
            .unwrap_or_else(|e| panic!("guest write {off}+{len}: {e} (seed {seed})"));
        model[off as usize..off as usize + len].copy_from_slice(&data);
        if rng.gen_range(0..4) == 0 {
            f.sync_data().unwrap();
        }
        // Read back around what was written, and somewhere else.
        for (roff, rlen) in [
            (off.saturating_sub(70_000), len + 140_000),
            (rng.gen_range(0..size), rng.gen_range(1..256 * 1024)),
        ] {
            if let Err(e) = check_pread(&f, &model, roff, rlen) {
                panic!("after {ops} ops: {e} (seed {seed})");
            }
        }
        ops += 1;
        thread::sleep(pace);
    }
    f.sync_all().unwrap();
    (model, ops)
}

/// Pause between guest operations while a throttled job must stay running for a while.
const PACE: Duration = Duration::from_millis(10);

/// Sends `speed NAME 0`; a job that already completed by itself (the guest's writes and
/// copy-on-read may fill the leaf first) is fine too.
fn unthrottle(m: &Mount, name: &str) {
    let (r, answer) = ctl_answer(m, &format!("speed {name} 0"));
    if r.is_err() {
        let l = job(m, name);
        assert_eq!(
            (r, state(&l)),
            (Err(libc::ESRCH), "completed"),
            "speed {name} 0 -> {answer:?}; {}",
            l.raw
        );
    }
}

/// Starts [`guest_io`] on a helper thread.
fn spawn_guest_io(
    m: &Mount,
    name: &str,
    model: Vec<u8>,
    seed: u64,
    min_ops: usize,
    pace: Duration,
) -> (Arc<AtomicBool>, thread::JoinHandle<(Vec<u8>, usize)>) {
    let stop = Arc::new(AtomicBool::new(false));
    let st = stop.clone();
    let path = m.file(name);
    let h = thread::Builder::new()
        .name(format!("{}:guest-io", test_name()))
        .spawn(move || guest_io(path, model, seed, st, min_ops, pace))
        .unwrap();
    (stop, h)
}

/// Stops the guest I/O thread and returns its model (bounded).
fn join_guest_io(
    stop: Arc<AtomicBool>,
    h: thread::JoinHandle<(Vec<u8>, usize)>,
) -> (Vec<u8>, usize) {
    stop.store(true, Ordering::Release);
    with_timeout("guest I/O thread", IO_TIMEOUT, move || match h.join() {
        Ok(v) => v,
        Err(p) => std::panic::resume_unwind(p),
    })
}

#[test]
fn writes_during_streams_are_never_lost() {
    require_fuse!();
    let s = Scratch::new();
    let seed = test_seed();
    let fast = two_layer(s.path(), "fast", 64 * MIB, 12, true);
    let slow = two_layer(s.path(), "slow", 64 * MIB, 13, true);
    // With copy-on-read (the default) the guest's reads copy too.
    let m = s.mount(&[&fast.top], &[]);
    // Without it, only the (throttled) stream and the guest's writes fill the leaf.
    let m2 = s.mount(&[&slow.top], &["--no-copy-on-read"]);

    // Unthrottled stream while the guest writes and reads.
    let (stop, h) = spawn_guest_io(
        &m,
        &fast.name(),
        fast.reference().to_vec(),
        seed,
        20,
        Duration::ZERO,
    );
    ctl_ok(&m, &format!("start {}", fast.name()));
    wait_completed(&m, &fast.name(), STREAM_TIMEOUT);
    let (fast_model, ops) = join_guest_io(stop, h);
    eprintln!("unthrottled stream: {ops} guest writes");

    // Throttled stream: the guest writes ahead of and behind the stream's cursor; then
    // the limit is lifted while the guest keeps writing.
    let (stop, h) = spawn_guest_io(
        &m2,
        &slow.name(),
        slow.reference().to_vec(),
        seed + 1,
        20,
        PACE,
    );
    ctl_ok(&m2, &format!("start {} speed=4M", slow.name()));
    let l = wait_job(&m2, &slow.name(), Duration::from_secs(20), "copying", |l| {
        num(l, "copied") > 0
    });
    assert_eq!(state(&l), "running", "{}", l.raw);
    thread::sleep(Duration::from_millis(1500));
    ctl_ok(&m2, &format!("pause {}", slow.name()));
    thread::sleep(Duration::from_millis(300));
    ctl_ok(&m2, &format!("resume {}", slow.name()));
    ctl_ok(&m2, &format!("speed {} 0", slow.name()));
    wait_completed(&m2, &slow.name(), STREAM_TIMEOUT);
    let (slow_model, ops) = join_guest_io(stop, h);
    eprintln!("throttled stream: {ops} guest writes");

    // A stream that keeps a base, with copy-on-read, while the guest writes.
    let deep = four_deep(&s.subdir("deep"), &s.subdir("deep"), 32 * MIB, 26);
    let m3 = s.mount(&[&deep.top], &[]);
    let (stop, h) = spawn_guest_io(
        &m3,
        &deep.name(),
        deep.reference().to_vec(),
        seed + 3,
        20,
        PACE,
    );
    ctl_ok(
        &m3,
        &format!("start {} base=base.qcow2 speed=4M", deep.name()),
    );
    thread::sleep(Duration::from_millis(800));
    unthrottle(&m3, &deep.name());
    wait_completed(&m3, &deep.name(), STREAM_TIMEOUT);
    let (deep_model, ops) = join_guest_io(stop, h);
    eprintln!("stream with base: {ops} guest writes");
    assert_mount_reads(&m3, &deep.name(), &deep_model);
    m3.umount();
    assert_eq!(backing_filename(&deep.top).as_deref(), Some("base.qcow2"));
    let (code, out) = check_status_leaf_only(&deep.top);
    assert_eq!(code, 0, "{out}");
    assert_bytes_eq(
        "stream with base: leaf after unmount vs model",
        &raw_reference(&deep.top),
        &deep_model,
    );

    // A few more writes after completion (leaf alone now).
    let stop = Arc::new(AtomicBool::new(true));
    let (slow_model, _) = {
        let path = m2.file(&slow.name());
        let st = stop.clone();
        with_timeout("post-stream I/O", IO_TIMEOUT, move || {
            guest_io(path, slow_model, seed + 2, st, 50, Duration::ZERO)
        })
    };
    assert_mount_reads(&m, &fast.name(), &fast_model);
    assert_mount_reads(&m2, &slow.name(), &slow_model);
    m.umount();
    m2.umount();

    for (c, model) in [(&fast, &fast_model), (&slow, &slow_model)] {
        assert_no_backing(&c.top);
        let (code, out) = check_status_leaf_only(&c.top);
        assert_eq!(code, 0, "{:?}: {out}", c.top);
        let flat = raw_reference(&c.top);
        assert_bytes_eq(&format!("{:?} after unmount vs model", c.top), &flat, model);
    }
}

// ---------------------------------------------------------------------------------------------
// Crash during a stream
// ---------------------------------------------------------------------------------------------

#[test]
fn kill_9_during_stream_then_remount_and_finish() {
    require_fuse!();
    let s = Scratch::new();
    let seed = test_seed();
    let c = two_layer(s.path(), "vm", 64 * MIB, 14, false);
    let name = c.name();
    let m = s.mount(&[&c.top], &[]);
    let missing = c.size() - num(&job(&m, &name), "leaf");

    ctl_ok(&m, &format!("start {name} speed=4M"));
    // The guest writes (each synced) while the stream runs.
    let (stop, h) = spawn_guest_io(&m, &name, c.reference().to_vec(), seed, 30, PACE);
    let l = wait_job(&m, &name, Duration::from_secs(20), "copying", |l| {
        num(l, "copied") > 0
    });
    let (model, _) = join_guest_io(stop, h);
    let l2 = job(&m, &name);
    assert_eq!(state(&l2), "running", "{} / {}", l.raw, l2.raw);

    m.kill9_and_detach("kill -9 during a stream");

    let (code, out) = check_status_leaf_only(&c.top);
    assert!(
        code == 0 || code == 3,
        "qemu-img check after kill -9 exited {code} (want 0, or 3 for leaks):\n{out}"
    );
    assert!(
        backing_filename(&c.top).is_some(),
        "backing link lost in the crash"
    );
    let flat = raw_reference(&c.top);
    assert_bytes_eq("leaf after kill -9 vs model", &flat, &model);

    // Remount: progress survived in the leaf; a new stream completes.
    let m = s.mount(&[&c.top], &[]);
    let idle = job(&m, &name);
    let missing2 = c.size() - num(&idle, "leaf");
    assert!(
        missing2 < missing,
        "nothing of the first stream survived: {} (before: {missing} missing)",
        idle.raw
    );
    ctl_ok(&m, &format!("start {name}"));
    let done = wait_completed(&m, &name, STREAM_TIMEOUT);
    assert!(
        num(&done, "copied") < missing,
        "restart recopied: {} (leaf lacked {missing} before the first stream)",
        done.raw
    );
    assert_mount_reads(&m, &name, &model);
    m.umount();
    assert_no_backing(&c.top);
    let (code, out) = check_status_leaf_only(&c.top);
    assert!(
        code == 0 || code == 3,
        "qemu-img check exited {code}:\n{out}"
    );
    assert_bytes_eq(
        "leaf after restart vs model",
        &raw_reference(&c.top),
        &model,
    );
}

// ---------------------------------------------------------------------------------------------
// Backing read errors
// ---------------------------------------------------------------------------------------------

#[test]
fn unreadable_backing_fails_the_job_then_resumes() {
    require_fuse!();
    let s = Scratch::new();
    let size = 64 * MIB;
    let c = two_layer(s.path(), "vm", size, 15, false);
    let name = c.name();
    let base = c.backing[0].clone();
    let saved = fs::read(&base).unwrap();
    let link = backing_filename(&c.top);
    let m = s.mount(&[&c.top], &["--no-copy-on-read"]);
    let leaf_before = num(&job(&m, &name), "leaf");

    // `start --wait` from the CLI, slow enough that the failure comes mid-stream.
    let mp = ps(m.path()).to_string();
    let n2 = name.clone();
    let waiter = thread::spawn(move || cli(&["start", &mp, &n2, "--speed", "4M", "--wait"]));
    // `offset` is the low-water mark (everything below it is copied): the read of the
    // first 64 KiB below must find streamed data, whichever worker finished first.
    wait_job(&m, &name, Duration::from_secs(20), "copying", |l| {
        state(l) == "running" && num(l, "offset") >= 64 * KIB
    });
    OpenOptions::new()
        .write(true)
        .open(&base)
        .unwrap()
        .set_len(0)
        .unwrap();

    let failed = wait_end(&m, &name, Duration::from_secs(30));
    assert_eq!(
        state(&failed),
        "failed",
        "after truncating the base: {}",
        failed.raw
    );
    let err = failed
        .raw
        .split_once("error=\"")
        .map(|(_, e)| e.trim_end_matches('"').to_string())
        .unwrap_or_else(|| panic!("no error=\"...\" in {}", failed.raw));
    assert!(
        err.contains("vm-base.qcow2"),
        "error does not name the failing file: {}",
        failed.raw
    );
    assert!(
        num(&failed, "offset") < num(&failed, "len"),
        "{}",
        failed.raw
    );
    assert_eq!(num(&failed, "layers"), 2, "{}", failed.raw);
    let out = waiter.join().unwrap();
    assert!(
        !out.status.success(),
        "start --wait of a failed job: {}",
        show(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("stream completed"),
        "{}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("fail"),
        "start --wait does not say the job failed: {}",
        show(&out)
    );

    // The leaf is consistent and keeps its link.
    let (code, out) = check_status_leaf_only(&c.top);
    assert_eq!(
        code, 0,
        "qemu-img check of the leaf after the failure:\n{out}"
    );
    assert_eq!(backing_filename(&c.top), link);

    // Guest reads: not yet copied regions (the disk's end, far beyond the stream) get EIO;
    // what the leaf has keeps working.
    let f = m.file(&name);
    let tail = size - MIB;
    assert!(num(&failed, "offset") + 8 * MIB < tail, "{}", failed.raw);
    match pread_mount(&f, tail, 64 * KIB as usize) {
        Err(e) => assert_eq!(e.raw_os_error(), Some(libc::EIO), "read of lost data: {e}"),
        Ok(d) => panic!(
            "read of a region only the truncated base had succeeded ({} bytes{})",
            d.len(),
            if d.iter().all(|&b| b == 0) {
                ", zeros"
            } else {
                ""
            }
        ),
    }
    let own = pread_mount(&f, MIB, MIB as usize).expect("read of the leaf's own data");
    assert_bytes_eq(
        "leaf's own data",
        &own,
        &c.reference()[MIB as usize..2 * MIB as usize],
    );
    let early = pread_mount(&f, 0, 64 * KIB as usize).expect("read of streamed data");
    assert_bytes_eq("streamed data", &early, &c.reference()[..64 * KIB as usize]);

    // Restore the base in place; a new start resumes and completes.
    let fh = OpenOptions::new().write(true).open(&base).unwrap();
    fh.write_all_at(&saved, 0).unwrap();
    fh.sync_all().unwrap();
    drop(fh);
    let out = cli(&["start", ps(m.path()), &name, "--wait"]);
    assert!(
        out.status.success(),
        "start --wait after restore: {}",
        show(&out)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{name}: stream completed")),
        "{}",
        show(&out)
    );
    let done = wait_completed(&m, &name, Duration::from_secs(5));
    assert!(
        num(&done, "copied") < size - leaf_before,
        "restart recopied everything: {}",
        done.raw
    );
    assert_mount_reads(&m, &name, c.reference());
    m.umount();
    assert_fully_streamed(&c);
}

// ---------------------------------------------------------------------------------------------
// Several chains, CLI, mount --stream
// ---------------------------------------------------------------------------------------------

#[test]
fn two_chains_stream_at_once() {
    require_fuse!();
    let s = Scratch::new();
    let a = two_layer(s.path(), "a", 32 * MIB, 16, true);
    let b = two_layer(s.path(), "b", 48 * MIB, 17, false);
    let m = s.mount(&[&a.top, &b.top], &["--no-copy-on-read"]);
    ctl_ok(&m, &format!("start {} speed=4M", a.name()));
    ctl_ok(&m, &format!("start {} speed=4M", b.name()));
    // Both are running at the same time.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (la, lb) = (job(&m, &a.name()), job(&m, &b.name()));
        if state(&la) == "running"
            && state(&lb) == "running"
            && num(&la, "copied") > 0
            && num(&lb, "copied") > 0
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not both streaming: {} / {}",
            la.raw,
            lb.raw
        );
        thread::sleep(Duration::from_millis(20));
    }
    // Acting on one leaves the other alone.
    ctl_ok(&m, &format!("pause {}", a.name()));
    assert_eq!(state(&job(&m, &b.name())), "running");
    ctl_ok(&m, &format!("speed {} 0", b.name()));
    assert_eq!(num(&job(&m, &a.name()), "speed"), 4 * MIB);
    wait_completed(&m, &b.name(), STREAM_TIMEOUT);
    assert_eq!(state(&job(&m, &a.name())), "paused");
    ctl_ok(&m, &format!("resume {}", a.name()));
    ctl_ok(&m, &format!("speed {} 0", a.name()));
    wait_completed(&m, &a.name(), STREAM_TIMEOUT);
    assert_mount_reads(&m, &a.name(), a.reference());
    assert_mount_reads(&m, &b.name(), b.reference());
    m.umount();
    for c in [&a, &b] {
        assert_fully_streamed(c);
    }
}

#[test]
fn cli_start_wait_status_and_errors() {
    require_fuse!();
    let s = Scratch::new();
    let a = two_layer(s.path(), "a", 32 * MIB, 18, false);
    let b = two_layer(s.path(), "b", 32 * MIB, 19, false);
    let m = s.mount(&[&a.top, &b.top], &["--no-copy-on-read"]);
    let mp = ps(m.path()).to_string();

    // status before anything: names and a percentage.
    let out = cli(&["status", &mp]);
    assert!(out.status.success(), "status: {}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    for c in [&a, &b] {
        assert!(
            text.contains(&c.name()),
            "status lacks {}: {text}",
            c.name()
        );
    }

    // start --wait that completes: exit 0, "NAME: stream completed" on stdout.
    let out = cli(&["start", &mp, &a.name(), "--wait"]);
    assert!(out.status.success(), "start --wait: {}", show(&out));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains(&format!("{}: stream completed", a.name())),
        "{}",
        show(&out)
    );
    assert_eq!(state(&job(&m, &a.name())), "completed");
    let out = cli(&["status", &mp]);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let a_line = text
        .lines()
        .find(|l| l.contains(&a.name()))
        .unwrap_or_else(|| panic!("status lacks {}: {text}", a.name()));
    assert!(
        a_line.contains("100"),
        "completed job not at 100%: {a_line:?}"
    );
    assert!(has_percentage(a_line), "no percentage in {a_line:?}");

    // start --wait of a job cancelled from elsewhere: non-zero, not "completed".
    let (mp2, nb) = (mp.clone(), b.name());
    let waiter = thread::spawn(move || cli(&["start", &mp2, &nb, "--speed", "1M", "--wait"]));
    wait_job(&m, &b.name(), Duration::from_secs(20), "copying", |l| {
        state(l) == "running" && num(l, "copied") > 0
    });
    // status while running: the name and a percentage.
    let out = cli(&["status", &mp]);
    assert!(out.status.success(), "{}", show(&out));
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let b_line = text
        .lines()
        .find(|l| l.contains(&b.name()))
        .unwrap_or_else(|| panic!("status lacks {}: {text}", b.name()));
    assert!(has_percentage(b_line), "no percentage in {b_line:?}");
    // pause/resume/speed/cancel from the CLI print ok.
    for args in [
        vec!["pause".to_string(), mp.clone(), b.name()],
        vec!["resume".to_string(), mp.clone(), b.name()],
        vec![
            "speed".to_string(),
            mp.clone(),
            b.name(),
            "512K".to_string(),
        ],
    ] {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = cli(&args);
        assert!(out.status.success(), "{args:?}: {}", show(&out));
        assert_eq!(
            String::from_utf8_lossy(&out.stdout).trim(),
            "ok",
            "{args:?}"
        );
    }
    assert_eq!(num(&job(&m, &b.name()), "speed"), 512 * KIB);
    let out = cli(&["cancel", &mp, &b.name()]);
    assert!(out.status.success(), "cancel: {}", show(&out));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "ok");
    let out = waiter.join().unwrap();
    assert!(
        !out.status.success(),
        "start --wait of a cancelled job exited 0: {}",
        show(&out)
    );
    assert!(
        !String::from_utf8_lossy(&out.stdout).contains("stream completed"),
        "{}",
        show(&out)
    );

    // Errors: exit 1 with `streamfs: REASON` on stderr.
    let nb = b.name();
    let mp = mp.as_str();
    for args in [
        vec!["start", &mp, "nosuch.raw"],
        vec!["pause", &mp, &nb],
        vec!["resume", &mp, &nb],
        vec!["cancel", &mp, &nb],
        vec!["speed", &mp, &nb, "1M"],
    ] {
        let out = cli(&args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", show(&out));
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.starts_with("streamfs: ") && err.len() > 12,
            "{args:?}: {}",
            show(&out)
        );
        assert!(!err.contains("panicked"), "{}", show(&out));
    }
    let out = cli(&["start", mp, &b.name(), "--base", "nosuch.qcow2", "--wait"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    // A bad number is refused (argument parsing may use its own usage exit code).
    let out = cli(&["speed", mp, &nb, "1Q"]);
    assert!(!out.status.success(), "{}", show(&out));
    assert!(!String::from_utf8_lossy(&out.stderr).contains("panicked"));

    // Restart b to completion with the CLI (keeps going from the cancelled progress).
    let out = cli(&["start", mp, &b.name(), "--wait"]);
    assert!(out.status.success(), "{}", show(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("stream completed"));
    m.umount();
    for c in [&a, &b] {
        assert_no_backing(&c.top);
        c.assert_compare();
    }
}

/// True if `line` has a number directly followed by `%`.
fn has_percentage(line: &str) -> bool {
    let b = line.as_bytes();
    (1..b.len()).any(|i| b[i] == b'%' && b[i - 1].is_ascii_digit())
}

#[test]
fn mount_stream_completes_by_itself() {
    require_fuse!();
    let s = Scratch::new();
    let a = two_layer(s.path(), "a", 32 * MIB, 20, true);
    let b = two_layer(s.path(), "b", 16 * MIB, 21, false);
    let m = s.mount(&[&a.top, &b.top], &["--stream"]);
    for c in [&a, &b] {
        let l = wait_completed(&m, &c.name(), STREAM_TIMEOUT);
        assert_eq!(num(&l, "layers"), 1, "{}", l.raw);
    }
    assert_mount_reads(&m, &a.name(), a.reference());
    assert_mount_reads(&m, &b.name(), b.reference());
    m.umount();
    for c in [&a, &b] {
        assert_fully_streamed(c);
    }

    // --stream with --speed: the jobs start throttled.
    let c = two_layer(s.path(), "c", 32 * MIB, 22, false);
    let m = s.mount(&[&c.top], &["--stream", "--speed", "1M"]);
    let l = wait_job(&m, &c.name(), Duration::from_secs(10), "started", |l| {
        state(l) != "idle"
    });
    assert_eq!(state(&l), "running", "{}", l.raw);
    assert_eq!(num(&l, "speed"), MIB, "{}", l.raw);
    ctl_ok(&m, &format!("speed {} 0", c.name()));
    wait_completed(&m, &c.name(), STREAM_TIMEOUT);
    m.umount();
    assert_no_backing(&c.top);
    c.assert_compare();
}
