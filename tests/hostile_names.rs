//! Names and sizes stored in images, as QEMU reads them: backing names with control
//! characters are shown escaped (never raw on a terminal or in a log), a stored name
//! length that counts a terminating NUL is accepted, and a virtual size that is not a
//! multiple of 512 is rounded down, as QEMU does.

mod common;

use std::fs;
use std::io::{Read, Write};

use common::*;

fn read_be32(path: &std::path::Path, off: u64) -> u32 {
    let b = fs::read(path).unwrap();
    u32::from_be_bytes(b[off as usize..off as usize + 4].try_into().unwrap())
}

#[test]
fn control_characters_in_a_backing_name_do_not_reach_stderr_raw() {
    require_fuse!();
    let s = Scratch::new();
    let leaf = Qcow2::new().size(4 * MIB).create(&s.join("leaf.qcow2"));
    // An OSC title change, a screen clear, a bell and a forged second line.
    let name = "\x1b]0;owned\x07\x1b[2Jmissing\nstreamfs - all good.qcow2";
    rebase_unsafe(&leaf, name, "qcow2");
    let err = assert_mount_fails(s.mount_cmd().image(&leaf), &[ps(&leaf)]);
    for c in ['\x1b', '\x07', '\n'] {
        assert!(!err.contains(c), "raw {c:?} on stderr: {err:?}");
    }
    assert!(
        err.contains("\\x1b]0;owned\\x07\\x1b[2Jmissing\\x0astreamfs - all good.qcow2"),
        "{err:?}"
    );
    // The daemon's answers and log get the same treatment: mount with the backing file
    // present, remove it, and let `start` fail on reopening it.
    let log = s.join("log");
    Qcow2::new().size(4 * MIB).create(&s.join(name));
    let m = s.mount(&[&leaf], &["--log-file", ps(&log), "-v"]);
    fs::remove_file(s.join(name)).unwrap();
    let control = m.control();
    let answer = with_timeout("control", IO_TIMEOUT, move || {
        let mut f = fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&control)
            .unwrap();
        assert!(f.write_all(b"start leaf.raw").is_err(), "start succeeded");
        let mut a = String::new();
        f.read_to_string(&mut a).unwrap();
        a
    });
    assert!(answer.contains("\\x1b]0;owned"), "{answer:?}");
    let status = m.read_control();
    m.umount();
    let text = fs::read_to_string(&log).unwrap();
    for out in [&answer, &status, &text] {
        assert!(!out.contains('\x1b') && !out.contains('\x07'), "{out:?}");
    }
    assert!(
        text.contains("\\x1b]0;owned"),
        "the log does not mention it: {text:?}"
    );
}

#[test]
fn backing_name_length_counting_a_nul_opens_like_in_qemu() {
    require_fuse!();
    let s = Scratch::new();
    let base = Qcow2::new().size(4 * MIB).create(&s.join("base.qcow2"));
    write_pattern(&base, 0x3c, 0, MIB);
    let leaf = Qcow2::new()
        .backing_name("base.qcow2", "qcow2")
        .create(&s.join("leaf.qcow2"));
    write_pattern(&leaf, 0x4d, MIB, 64 * KIB);
    // Count the NUL after the name (qemu-img leaves the rest of the cluster zeroed).
    let len = read_be32(&leaf, 16);
    patch_be32(&leaf, 16, len + 1);
    let reference = raw_reference(&leaf); // QEMU opens it
    let m = s.mount(&[&leaf], &["--read-only"]);
    assert_bytes_eq("leaf.raw", &read_file(&m.file("leaf.raw")), &reference);
    m.umount();
}

#[test]
fn virtual_size_not_a_multiple_of_512_is_rounded_down_like_qemu() {
    require_fuse!();
    let s = Scratch::new();
    let img = Qcow2::new().size(MIB).create(&s.join("odd.qcow2"));
    write_pattern(&img, 0x77, 0, MIB);
    patch_be64(&img, 24, 1_000_001);
    let qemu = virtual_size(&img);
    assert_eq!(qemu, 999_936, "QEMU changed");
    let reference = raw_reference(&img);
    let m = s.mount(&[&img], &[]);
    assert_eq!(fs::metadata(m.file("odd.raw")).unwrap().len(), qemu);
    assert_bytes_eq("odd.raw", &read_file(&m.file("odd.raw")), &reference);
    m.umount();
    qemu_img_check(&img);
}
