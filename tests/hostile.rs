//! Hostile leaf images: metadata that points guest data at the image's own tables must
//! fail the guest's I/O, never let a write destroy the image.

mod common;

use std::fs::OpenOptions;
use std::os::unix::fs::FileExt;

use common::*;

#[test]
fn data_cluster_pointing_at_l1_table_refuses_writes() {
    require_fuse!();
    let s = Scratch::new();
    let top = Qcow2::new().size(4 * MIB).create(&s.join("top.qcow2"));
    qemu_io_cmds(&top, &["write -P 0x5a 0 64k"]);
    // Redirect guest cluster 0 at the L1 table's cluster.
    let l1_off = read_be64(&top, 40);
    let l2_off = read_be64(&top, l1_off) & 0x00ff_ffff_ffff_fe00;
    patch_be64(&top, l2_off, l1_off | 1 << 63);
    let before = read_file(&top);

    let m = s.mount(&[&top], &[]);
    let f = OpenOptions::new()
        .write(true)
        .open(m.file("top.raw"))
        .unwrap();
    let err = with_timeout("write", IO_TIMEOUT, move || {
        f.write_at(&[0xff; 4096], 0).unwrap_err()
    });
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
    // Other clusters still work.
    let f = OpenOptions::new()
        .write(true)
        .open(m.file("top.raw"))
        .unwrap();
    with_timeout("write", IO_TIMEOUT, move || {
        f.write_at(&[0x11; 4096], 1 << 20).unwrap()
    });
    m.umount();

    let after = read_file(&top);
    let l1 = l1_off as usize..l1_off as usize + 8;
    assert_eq!(
        after[l1.clone()],
        before[l1],
        "the L1 table was overwritten"
    );
    assert_eq!(after[..72], before[..72], "the header was overwritten");
}
