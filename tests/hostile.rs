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

/// The reference image for the overlap cases: 64 KiB clusters, data in guest clusters
/// 0 and 16 (two L2 entries of one table; 1 GiB, so the L1 table has two entries), refcounts loaded from a block at `refblock`.
fn overlap_image(s: &Scratch) -> (std::path::PathBuf, u64, u64, u64) {
    let top = Qcow2::new().size(1024 * MIB).create(&s.join("top.qcow2"));
    qemu_io_cmds(&top, &["write -P 0x5a 0 64k", "write -P 0x6b 1M 64k"]);
    let l1_off = read_be64(&top, 40);
    let l2_off = read_be64(&top, l1_off) & 0x00ff_ffff_ffff_fe00;
    let reftable = read_be64(&top, 48);
    let refblock = read_be64(&top, reftable);
    (top, l2_off, reftable, refblock)
}

fn write_fails_with_eio(m: &Mount, off: u64) {
    let f = OpenOptions::new()
        .write(true)
        .open(m.file("top.raw"))
        .unwrap();
    let err = with_timeout("write", IO_TIMEOUT, move || {
        f.write_at(&[0xff; 4096], off).unwrap_err()
    });
    assert_eq!(err.raw_os_error(), Some(libc::EIO), "{err}");
}

/// Guest data pointed at an L2 table or a refcount block is refused; the metadata stays.
#[test]
fn data_clusters_pointing_at_l2_tables_or_refcount_blocks_refuse_writes() {
    require_fuse!();
    for target in ["l2", "refblock"] {
        let s = Scratch::new();
        let (top, l2_off, _reftable, refblock) = overlap_image(&s);
        let at = if target == "l2" { l2_off } else { refblock };
        // Guest cluster 16 (at 1 MiB) now claims to live on that metadata cluster.
        patch_be64(&top, l2_off + 16 * 8, at | 1 << 63);
        let before = read_file(&top);
        let m = s.mount(&[&top], &[]);
        write_fails_with_eio(&m, MIB);
        m.umount();
        let after = read_file(&top);
        let r = at as usize..at as usize + 65536;
        assert!(
            after[r.clone()] == before[r],
            "{target}: the metadata cluster was overwritten"
        );
    }
}

/// An L1 entry pointing into the refcount table: writing the L2 table there would corrupt
/// the refcounts (qemu-img check: "refcount block ... is outside image"); it is refused.
#[test]
fn an_l2_table_inside_the_refcount_table_is_never_written() {
    require_fuse!();
    let s = Scratch::new();
    let (top, _l2, reftable, _rb) = overlap_image(&s);
    let l1_off = read_be64(&top, 40);
    // The second L1 entry (guest 512 MiB..) claims its L2 table is the refcount table.
    patch_be64(&top, l1_off + 8, reftable | 1 << 63);
    let table_before = read_file(&top)[reftable as usize..reftable as usize + 65536].to_vec();
    let m = s.mount(&[&top], &[]);
    let f = OpenOptions::new()
        .write(true)
        .open(m.file("top.raw"))
        .unwrap();
    // The write lands in a new cluster, but making it durable means writing the L2
    // table into the refcount table: the fsync fails instead.
    let r = with_timeout("write+fsync", IO_TIMEOUT, move || {
        f.write_at(&[0x42; 4096], 552 * MIB)
            .and_then(|_| f.sync_all())
    });
    assert_eq!(r.unwrap_err().raw_os_error(), Some(libc::EIO));
    drop(m); // the daemon cannot write it back either; it must not try
    let after = read_file(&top);
    assert_eq!(
        &after[reftable as usize..reftable as usize + 65536],
        &table_before[..],
        "the refcount table was overwritten"
    );
}
