//! Images on block devices (issue 8 §1), on loop devices: sizes come from the device
//! (BLKGETSIZE64), a raw device reads as data, zeroing uses BLKZEROOUT, and a qcow2 leaf
//! on a full device fails the write with ENOSPC. Judged by qemu-img / qemu-io.

mod common;

use common::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// A loop device over a new file of `size` bytes filled with `byte`; detached on drop.
struct Loop {
    dev: PathBuf,
}

impl Loop {
    fn new(file: &Path, size: u64, byte: u8) -> Loop {
        let f = File::create(file).unwrap();
        if byte != 0 {
            let chunk = vec![byte; MIB as usize];
            for i in 0..size / MIB {
                f.write_all_at(&chunk, i * MIB).unwrap();
            }
        }
        f.set_len(size).unwrap();
        drop(f);
        let mut c = Command::new("losetup");
        c.args(["-f", "--show"]).arg(file);
        let out = run_with_timeout(c, Duration::from_secs(30));
        assert!(
            out.status.success(),
            "losetup: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop {
            dev: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        }
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.dev).status();
    }
}

#[test]
fn a_raw_backing_device_is_read_and_streamed() {
    require_fuse!();
    let s = Scratch::new();
    let lo = Loop::new(&s.join("blk.img"), 32 * MIB, 0xab);
    let top = Qcow2::new()
        .size(32 * MIB)
        .backing_name(ps(&lo.dev), "raw")
        .create(&s.join("top.qcow2"));
    let m = s.mount(&[&top], &[]);
    let raw = m.file("top.raw");
    let mut b = vec![0u8; 4096];
    File::open(&raw)
        .unwrap()
        .read_exact_at(&mut b, 20 * MIB)
        .unwrap();
    assert!(
        b.iter().all(|&x| x == 0xab),
        "a device backing read as {:#x}",
        b[0]
    );
    let f = open_rw(&raw).unwrap();
    f.write_all_at(&[0x5a; 4096], 0).unwrap();
    f.sync_all().unwrap();
    drop(f);
    let ctl = open_rw(&m.control()).unwrap();
    ctl.write_all_at(b"start top.raw", 0).unwrap();
    drop(ctl);
    assert!(
        wait_until(
            || m.read_control().contains("state=completed"),
            Duration::from_secs(60)
        ),
        "{}",
        m.read_control()
    );
    m.umount();
    drop(lo); // the device is gone: the leaf must stand alone
    qemu_img_check(&top);
    assert!(qemu_img_info(&top).get("backing-filename").is_none());
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        "read -P 0x5a 0 4k",
        "-c",
        &format!("read -P 0xab 4k {}", 32 * MIB - 4096),
        ps(&top),
    ]);
}

#[test]
fn a_qcow2_leaf_on_a_full_device_fails_writes_with_enospc() {
    require_fuse!();
    let s = Scratch::new();
    let base = Qcow2::new().size(64 * MIB).create(&s.join("base.qcow2"));
    write_pattern(&base, 0x11, 0, 64 * MIB);
    let lo = Loop::new(&s.join("small.img"), 4 * MIB, 0);
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2", "-F", "qcow2", "-b"])
        .arg(&base)
        .arg(&lo.dev)
        .arg("64M");
    assert!(run_with_timeout(c, QEMU_TIMEOUT).status.success());
    let m = s.mount(&[format!("vm={}", lo.dev.display())], &[]);
    // Copy-on-read works on the device.
    let mut b = vec![0u8; 65536];
    File::open(m.file("vm"))
        .unwrap()
        .read_exact_at(&mut b, 32 * MIB)
        .unwrap();
    assert!(b.iter().all(|&x| x == 0x11));
    let f = open_rw(&m.file("vm")).unwrap();
    let mut written = 0;
    let err = loop {
        match f
            .write_all_at(&vec![0x22; MIB as usize], written * MIB)
            .and_then(|_| f.sync_data())
        {
            Ok(()) => written += 1,
            Err(e) => break e,
        }
        assert!(written < 64, "64 MiB fit on a 4 MiB device");
    };
    assert_eq!(err.raw_os_error(), Some(libc::ENOSPC), "{err}");
    assert!(written >= 1, "nothing fit");
    let alloc: u64 = parse_control(&m.read_control())[0]
        .get("alloc")
        .unwrap()
        .parse()
        .unwrap();
    assert!(alloc <= 4 * MIB, "allocated past the device's end: {alloc}");
    drop(f);
    m.umount();
    let (code, out) = check_status(&lo.dev);
    assert_eq!(code, 0, "qemu-img check on the device: {out}");
    assert!(
        out.contains(&format!("Image end offset: {alloc}")),
        "alloc= is qemu-img's image end offset ({alloc}):\n{out}"
    );
    qemu_io(&[
        "-f",
        "qcow2",
        "-c",
        &format!("read -P 0x22 0 {}", written * MIB),
        "-c",
        "read -P 0x11 32M 64k",
        ps(&lo.dev),
    ]);
}

#[test]
fn a_raw_device_leaf_has_its_size_and_zeroes_with_blkzeroout() {
    require_fuse!();
    let s = Scratch::new();
    let lo = Loop::new(&s.join("disk.img"), 8 * MIB, 0x77);
    let m = s.mount(&[format!("disk={}", lo.dev.display())], &[]);
    let raw = m.file("disk");
    assert_eq!(std::fs::metadata(&raw).unwrap().len(), 8 * MIB);
    let f = open_rw(&raw).unwrap();
    // Unaligned edges are written, the aligned middle goes through BLKZEROOUT.
    fallocate(
        &f,
        libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
        MIB + 100,
        2 * MIB,
    )
    .unwrap();
    f.sync_all().unwrap();
    drop(f);
    m.umount();
    let dev = ps(&lo.dev).to_string();
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        &format!("read -P 0x77 0 {}", MIB + 100),
        &dev,
    ]);
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        &format!("read -P 0 {} {}", MIB + 100, 2 * MIB),
        &dev,
    ]);
    qemu_io(&[
        "-f",
        "raw",
        "-c",
        &format!("read -P 0x77 {} {}", 3 * MIB + 100, 5 * MIB - 100),
        &dev,
    ]);
}

#[test]
fn a_qcow2_backing_on_a_device_is_followed() {
    require_fuse!();
    let s = Scratch::new();
    let lo = Loop::new(&s.join("base.img"), 16 * MIB, 0);
    let dev = ps(&lo.dev).to_string();
    let mut c = Command::new("qemu-img");
    c.args(["create", "-q", "-f", "qcow2", &dev, "8M"]);
    assert!(run_with_timeout(c, QEMU_TIMEOUT).status.success());
    qemu_io(&["-f", "qcow2", "-c", "write -q -P 0x3c 1M 2M", &dev]);
    let top = Qcow2::new()
        .size(8 * MIB)
        .backing_name(&dev, "qcow2")
        .create(&s.join("top.qcow2"));
    let reference = raw_reference(&top);
    let m = s.mount(&[&top], &["--read-only"]);
    assert_bytes_eq(
        "chain over a qcow2 device",
        &read_file(&m.file("top.raw")),
        &reference,
    );
    m.umount();
}
