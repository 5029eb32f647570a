//! A job claims only what it achieved: the outcome of a stream is proven, and a failure,
//! a panic or a request that cannot be honoured in time is reported as such (issue 7).
//! Faults are injected through the daemon's `STREAMFS_FAULTS` (src/fault.rs).

mod common;

use common::*;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::thread;
use std::time::{Duration, Instant};

/// Mounts `images` with the daemon's fault points armed and its log in `s/daemon.log`.
fn mount_with_faults(s: &Scratch, images: &[&Path], faults: &str) -> (Mount, PathBuf) {
    let mp = s.new_mountpoint();
    let log = s.join("daemon.log");
    let mut cmd = Command::new(streamfs_bin());
    cmd.arg("mount")
        .arg("--log-file")
        .arg(&log)
        .arg(&mp)
        .args(images)
        .env("STREAMFS_FAULTS", faults);
    let out = run_with_timeout(cmd, MOUNT_TIMEOUT);
    assert!(
        out.status.success(),
        "mount with faults {faults:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (Mount::adopt(&mp), log)
}

fn line(m: &Mount, name: &str) -> ControlLine {
    let text = m.read_control();
    parse_control(&text)
        .into_iter()
        .find(|l| l.name == name)
        .unwrap_or_else(|| panic!("no {name} in .control:\n{text}"))
}

fn field(l: &ControlLine, k: &str) -> String {
    l.get(k)
        .unwrap_or_else(|| panic!("no {k}= in {}", l.raw))
        .to_string()
}

/// Polls until `name`'s state is one of `states`; panics with the last line on timeout.
fn wait_state(m: &Mount, name: &str, states: &[&str], timeout: Duration) -> ControlLine {
    let deadline = Instant::now() + timeout;
    loop {
        let l = line(m, name);
        if states.contains(&field(&l, "state").as_str()) {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "{name}: not {states:?} after {timeout:?}: {}",
            l.raw
        );
        thread::sleep(Duration::from_millis(20));
    }
}

/// base.qcow2 (PATTERN everywhere) <- top.qcow2 with `cluster` clusters, nothing in it.
fn patterned_chain(s: &Scratch, size: u64, cluster: u64) -> (PathBuf, PathBuf) {
    let base = Qcow2::new().size(size).create(&s.join("base.qcow2"));
    write_pattern(&base, 0xaa, 0, size);
    let top = Qcow2::new()
        .cluster_size(cluster)
        .backing(&base)
        .create(&s.join("top.qcow2"));
    (base, top)
}

fn has_backing(image: &Path) -> bool {
    qemu_img_info(image).get("backing-filename").is_some()
}

/// The reported defect: a throttled stream of a leaf whose clusters are larger than the
/// copy unit claimed `completed` with nothing copied and removed the backing link.
#[test]
fn throttled_streams_with_large_clusters_copy_everything() {
    require_fuse!();
    for cluster in [512 * KIB, MIB, 2 * MIB] {
        let s = Scratch::new();
        let (base, top) = patterned_chain(&s, 16 * MIB, cluster);
        let m = s.mount(&[&top], &["--log-file", ps(&s.join("log"))]);
        // 8 MiB/s: 1 MiB per 1/8 s, at or below one cluster per admission.
        ctl_ok(&m, "start top.raw speed=8M");
        let l = wait_state(
            &m,
            "top.raw",
            &["completed", "failed", "cancelled"],
            Duration::from_secs(60),
        );
        assert_eq!(
            field(&l, "state"),
            "completed",
            "cluster {cluster}: {}",
            l.raw
        );
        assert_eq!(
            field(&l, "copied"),
            (16 * MIB).to_string(),
            "cluster {cluster}: {}",
            l.raw
        );
        m.umount();
        assert!(!has_backing(&top), "cluster {cluster}: backing link kept");
        // The leaf alone holds the data: move the base away and read with qemu-io.
        std::fs::rename(&base, s.join("moved-away.qcow2")).unwrap();
        qemu_io(&[
            "-f",
            "qcow2",
            "-c",
            &format!("read -P 0xaa 0 {}", 16 * MIB),
            ps(&top),
        ]);
        qemu_img_check(&top);
    }
}

#[test]
fn a_panicking_worker_fails_the_job_and_the_panic_is_logged() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = patterned_chain(&s, 8 * MIB, 64 * KIB);
    let (m, log) = mount_with_faults(&s, &[&top], "stream-worker-panic");
    ctl_ok(&m, "start top.raw");
    let l = wait_state(
        &m,
        "top.raw",
        &["completed", "failed", "cancelled"],
        Duration::from_secs(30),
    );
    assert_eq!(field(&l, "state"), "failed", "{}", l.raw);
    // (`error="..."` is quoted and has spaces: look at the raw line.)
    assert!(
        l.raw
            .contains("error=\"a stream worker panicked: injected fault"),
        "{}",
        l.raw
    );
    // The data is still served (from the backing image), and the daemon lives on.
    assert_eq!(read_file(&m.file("top.raw")), vec![0xaa; 8 * MIB as usize]);
    m.umount();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(
        text.contains("panic in thread 'stream-") && text.contains("src/fault.rs"),
        "the log lacks the panic's thread and location:\n{text}"
    );
    assert!(
        has_backing(&top),
        "a failed stream removed the backing link"
    );
    qemu_img_check(&top);
}

#[test]
fn a_stream_that_did_not_copy_is_not_completed() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = patterned_chain(&s, 8 * MIB, 64 * KIB);
    // Every worker returns success without copying: only the final scan can tell.
    let (m, _log) = mount_with_faults(&s, &[&top], "stream-skip-copy");
    ctl_ok(&m, "start top.raw");
    let l = wait_state(
        &m,
        "top.raw",
        &["completed", "failed", "cancelled"],
        Duration::from_secs(30),
    );
    assert_eq!(field(&l, "state"), "failed", "{}", l.raw);
    assert!(
        l.raw.contains("error=\"final check: guest offset 0 "),
        "{}",
        l.raw
    );
    m.umount();
    assert!(
        has_backing(&top),
        "an unproven stream removed the backing link"
    );
    assert_identical_to_raw("chain after the failed stream", &top, &{
        let r = s.join("ref.raw");
        create_raw_from(&r, &vec![0xaa; 8 * MIB as usize]);
        r
    });
}

/// Pause and cancel that cannot take effect in time fail with ETIMEDOUT and a reason;
/// the status stays true (running, not paused), and the request still takes effect.
#[test]
fn pause_and_cancel_that_cannot_stop_in_time_fail_with_etimedout() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = patterned_chain(&s, 8 * MIB, 64 * KIB);
    let (m, _log) = mount_with_faults(&s, &[&top], "stream-stall:13000");
    ctl_ok(&m, "start top.raw");
    let began = Instant::now();
    thread::sleep(Duration::from_millis(300)); // the workers are into the stall
    let (r, answer) = ctl_answer(&m, "pause top.raw");
    assert_eq!(r, Err(libc::ETIMEDOUT), "pause of a stalled job: {answer}");
    assert!(
        answer.contains("timed out") && answer.contains("busy"),
        "{answer}"
    );
    assert_eq!(field(&line(&m, "top.raw"), "state"), "running");
    // Once the workers get past the stall, the pause takes effect by itself.
    let l = wait_state(&m, "top.raw", &["paused"], Duration::from_secs(30));
    assert!(began.elapsed() >= Duration::from_secs(12), "{}", l.raw);
    ctl_ok(&m, "resume top.raw");
    ctl_ok(&m, "cancel top.raw");
    assert_eq!(field(&line(&m, "top.raw"), "state"), "cancelled");
    m.umount();
    // A second mount: a cancel that cannot stop in time.
    let (m, _log) = mount_with_faults(&s, &[&top], "stream-stall:12000");
    ctl_ok(&m, "start top.raw");
    thread::sleep(Duration::from_millis(300));
    let (r, answer) = ctl_answer(&m, "cancel top.raw");
    assert_eq!(r, Err(libc::ETIMEDOUT), "cancel of a stalled job: {answer}");
    assert_eq!(field(&line(&m, "top.raw"), "state"), "running");
    wait_state(&m, "top.raw", &["cancelled"], Duration::from_secs(30));
    m.umount();
    assert!(has_backing(&top));
    qemu_img_check(&top);
}

/// A panic in a FUSE request handler answers that request EIO; the mount keeps serving
/// (more panics than it has session threads), and unmounts cleanly.
#[test]
fn a_panicking_fuse_handler_answers_eio_and_the_mount_keeps_serving() {
    require_fuse!();
    let s = Scratch::new();
    let (_base, top) = patterned_chain(&s, 8 * MIB, 64 * KIB);
    let (m, log) = mount_with_faults(&s, &[&top], "fuse-read-panic");
    let raw = m.file("top.raw");
    for i in 0..40u64 {
        let f = open_direct(&raw).expect("open O_DIRECT");
        let mut buf = AlignedBuf::new(4096, 4096);
        let r = with_timeout("read", IO_TIMEOUT, move || {
            f.read_at(&mut buf, i * 4096).map_err(|e| e.raw_os_error())
        });
        assert_eq!(r, Err(Some(libc::EIO)), "read {i}");
    }
    assert!(
        m.read_control().contains("top.raw state=idle"),
        "{}",
        m.read_control()
    );
    assert!(m.daemon_alive());
    m.umount();
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("injected fault 'fuse-read-panic'"), "{text}");
    assert!(text.contains("answered EIO, still serving"), "{text}");
}
