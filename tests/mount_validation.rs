//! Mount-time validation: which images, chains, mount points and names `streamfs mount`
//! refuses (a clear message, a non-zero exit, nothing left behind), and what a mount of
//! several chains presents (names, `.control`).

mod common;

use common::*;
use std::fs::{self, File};
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/// A header corruption: (case name, needs a backing file, patch).
type HeaderMutation = (&'static str, bool, fn(&Path));

/// Every header corruption the mount must reject.
fn header_mutations() -> Vec<HeaderMutation> {
    vec![
        ("truncated_header", false, |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(50)
                .unwrap()
        }),
        ("truncated_v3_header", false, |p| {
            File::options()
                .write(true)
                .open(p)
                .unwrap()
                .set_len(90)
                .unwrap()
        }),
        ("bad_magic", false, |p| patch_bytes(p, 0, b"QFI\xfa")),
        ("version_1", false, |p| patch_be32(p, 4, 1)),
        ("version_4", false, |p| patch_be32(p, 4, 4)),
        ("cluster_bits_8", false, |p| patch_be32(p, 20, 8)),
        ("cluster_bits_40", false, |p| patch_be32(p, 20, 40)),
        ("cluster_bits_255", false, |p| patch_be32(p, 20, 255)),
        ("l1_table_beyond_eof", false, |p| patch_be64(p, 40, 1 << 40)),
        ("l1_size_huge", false, |p| patch_be32(p, 36, 0xffff_ffff)),
        ("l1_size_beyond_eof", false, |p| {
            patch_be32(p, 36, 0x1000_0000)
        }),
        ("backing_name_huge", true, |p| {
            patch_be32(p, 16, 0xffff_ffff)
        }),
        ("backing_name_64k", true, |p| patch_be32(p, 16, 0x1_0000)),
        ("backing_offset_beyond_eof", true, |p| {
            patch_be64(p, 8, 1 << 40)
        }),
        ("unknown_incompatible_bit", false, |p| {
            let v = read_be64(p, 72);
            patch_be64(p, 72, v | 1 << 20)
        }),
        ("legacy_aes_encryption", false, |p| patch_be32(p, 32, 1)),
    ]
}

/// Runs `check` for each named case, collecting panics so one run reports all failures.
fn all_must_pass(cases: Vec<(String, Box<dyn FnOnce()>)>) {
    let mut failures = Vec::new();
    for (name, check) in cases {
        eprintln!("case {name}");
        if let Err(e) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(check)) {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            failures.push(format!("{name}: {msg}"));
        }
    }
    assert!(
        failures.is_empty(),
        "failing cases:\n{}",
        failures.join("\n\n")
    );
}

// ---------------------------------------------------------------------------------------------
// Images and chains the mount must refuse
// ---------------------------------------------------------------------------------------------

#[test]
fn mount_rejects_bad_headers() {
    require_fuse!();
    let s = Scratch::new();
    let cases = header_mutations()
        .into_iter()
        .map(|(name, with_backing, patch)| {
            let dir = s.subdir(name);
            let file = format!("{name}.qcow2");
            let img = if with_backing {
                valid_image_with_backing(&dir, &file)
            } else {
                valid_image(&dir, &file)
            };
            patch(&img);
            let mp = s.subdir(format!("{name}.mnt"));
            let check: Box<dyn FnOnce()> = Box::new(move || {
                assert_mount_fails(MountCmd::new().at(&mp).image(&img), &[&file]);
                assert!(!is_mounted(&mp));
            });
            (name.to_string(), check)
        })
        .collect();
    all_must_pass(cases);
}

#[test]
fn mount_rejects_luks_encrypted_image() {
    require_fuse!();
    let s = Scratch::new();
    let img = s.join("luks.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "--object",
        "secret,id=sec0,data=abc",
        "-o",
        "encrypt.format=luks,encrypt.key-secret=sec0",
        ps(&img),
        "1M",
    ]);
    for args in [&[][..], &["--read-only"][..]] {
        assert_mount_fails(s.mount_cmd().args(args).image(&img), &["luks.qcow2"]);
    }
}

#[test]
fn mount_rejects_backing_cycle() {
    require_fuse!();
    let s = Scratch::new();
    let a = valid_image(s.path(), "a.qcow2");
    let b = Qcow2::new().backing(&a).create(&s.join("b.qcow2"));
    rebase_unsafe(&a, "b.qcow2", "qcow2");
    let err = assert_mount_fails(s.mount_cmd().image(&b), &[]);
    assert!(
        err.contains("a.qcow2") || err.contains("b.qcow2"),
        "cycle error names neither image: {err}"
    );
    // A self-reference is a cycle too.
    let c = valid_image(s.path(), "self.qcow2");
    rebase_unsafe(&c, "self.qcow2", "qcow2");
    assert_mount_fails(s.mount_cmd().arg("--read-only").image(&c), &["self.qcow2"]);
}

#[test]
fn mount_rejects_missing_backing_file() {
    require_fuse!();
    let s = Scratch::new();
    let top = valid_image_with_backing(s.path(), "top.qcow2");
    fs::remove_file(s.join("top.qcow2.base")).unwrap();
    assert_mount_fails(s.mount_cmd().image(&top), &["top.qcow2.base"]);
}

#[test]
fn mount_rejects_missing_image() {
    require_fuse!();
    let s = Scratch::new();
    assert_mount_fails(
        s.mount_cmd().image(s.join("nothere.qcow2")),
        &["nothere.qcow2"],
    );
    // One good image does not make a bad one acceptable.
    let good = valid_image(s.path(), "good.qcow2");
    assert_mount_fails(
        s.mount_cmd().image(&good).image(s.join("nothere.qcow2")),
        &["nothere.qcow2"],
    );
}

#[test]
fn mount_rejects_bad_mountpoint() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "img.qcow2");
    assert_mount_fails(
        MountCmd::new().at(s.join("missingdir")).image(&img),
        &["missingdir"],
    );
    fs::write(s.join("plainfile"), b"x").unwrap();
    assert_mount_fails(
        MountCmd::new().at(s.join("plainfile")).image(&img),
        &["plainfile"],
    );
    // Already a mount point: the second mount fails and the first keeps working.
    let reference = raw_reference(&img);
    let first = s.mount(&[&img], &["--read-only"]);
    let other = valid_image(s.path(), "other.qcow2");
    assert_mount_fails(
        MountCmd::new()
            .at(first.path())
            .arg("--read-only")
            .image(&other),
        &[first.path().file_name().unwrap().to_str().unwrap()],
    );
    assert!(is_mounted(first.path()));
    assert!(first.daemon_alive());
    assert_bytes_eq("img.raw", &read_file(&first.file("img.raw")), &reference);
    first.umount();
}

#[test]
fn corrupt_bit_needs_read_only() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "corrupt.qcow2");
    let reference = raw_reference(&img);
    let v = read_be64(&img, 72);
    patch_be64(&img, 72, v | 2);
    assert_mount_fails(s.mount_cmd().image(&img), &["corrupt.qcow2"]);
    assert_mount_fails(
        s.mount_cmd().arg("--no-copy-on-read").image(&img),
        &["corrupt.qcow2"],
    );
    let before = fs::read(&img).unwrap();
    let m = s.mount(&[&img], &["--read-only"]);
    assert_bytes_eq(
        "corrupt.raw",
        &read_file(&m.file("corrupt.raw")),
        &reference,
    );
    m.umount();
    assert!(
        fs::read(&img).unwrap() == before,
        "read-only mount modified the image"
    );
}

// ---------------------------------------------------------------------------------------------
// Several chains, names, paths, .control
// ---------------------------------------------------------------------------------------------

#[test]
fn two_chains_default_and_explicit_names() {
    require_fuse!();
    let s = Scratch::new();
    let vm1 = valid_image_with_backing(&s.subdir("a"), "vm1.qcow2");
    let second = valid_image(&s.subdir("b"), "second.qcow2");
    write_pattern(&second, 0x77, 3 * MIB, 5000);
    let dotted = Qcow2::new()
        .size(3 * MIB + 512)
        .create(&s.subdir("c").join("my.disk.qcow2"));
    write_pattern(&dotted, 0x78, 0, 4096);
    let m = s
        .mount_cmd()
        .arg("--read-only")
        .image(&vm1)
        .named("data", &second)
        .image(&dotted)
        .run()
        .unwrap_or_else(|f| panic!("{f}"));

    let chains = [
        ("vm1.raw", &vm1),
        ("data", &second),
        ("my.disk.raw", &dotted),
    ];
    let mut listed = m.list();
    listed.retain(|n| n != ".control" && n != ".events");
    let mut names: Vec<&str> = chains.iter().map(|c| c.0).collect();
    names.sort();
    assert_eq!(listed, names, "files in the mount root");

    let meta = fs::metadata(m.control()).expect(".control exists");
    assert!(meta.is_file());
    assert_eq!(meta.permissions().mode() & 0o777, 0o600, ".control mode");

    for (name, img) in chains {
        let reference = raw_reference(img);
        assert_eq!(
            fs::metadata(m.file(name)).unwrap().len(),
            reference.len() as u64
        );
        assert_bytes_eq(name, &read_file(&m.file(name)), &reference);
    }

    let text = m.read_control();
    let lines = parse_control(&text);
    assert_eq!(lines.len(), 3, ".control:\n{text}");
    for (name, img) in chains {
        let line = lines
            .iter()
            .find(|l| l.name == name)
            .unwrap_or_else(|| panic!("no .control line for {name}:\n{text}"));
        let size = virtual_size(img).to_string();
        assert_eq!(line.get("state"), Some("idle"), "{}", line.raw);
        assert_eq!(line.get("offset"), Some("0"), "{}", line.raw);
        assert_eq!(line.get("len"), Some(size.as_str()), "{}", line.raw);
    }
    m.umount();
}

/// Mount point and image directories with spaces (escaped as \040 in mountinfo).
#[test]
fn paths_with_spaces() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image_with_backing(&s.subdir("dir with space"), "vm.qcow2");
    let reference = raw_reference(&img);
    let m = s
        .mount_cmd()
        .at(s.subdir("mount point"))
        .image(&img)
        .run()
        .unwrap_or_else(|f| panic!("{f}"));
    assert_bytes_eq("vm.raw", &read_file(&m.file("vm.raw")), &reference);
    m.umount();
    qemu_img_check(&img);
}

#[test]
fn control_exists_for_a_single_chain() {
    require_fuse!();
    let s = Scratch::new();
    let img = valid_image(s.path(), "solo.qcow2");
    let m = s.mount(&[&img], &[]);
    let lines = m.control_lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0].name, "solo.raw");
    assert_eq!(lines[0].get("state"), Some("idle"));
    assert_eq!(lines[0].get("offset"), Some("0"));
    assert_eq!(lines[0].get("len"), Some((16 * MIB).to_string().as_str()));
    m.umount();
}

#[test]
fn mount_rejects_bad_names() {
    require_fuse!();
    let s = Scratch::new();
    let a = valid_image(&s.subdir("a"), "vm1.qcow2");
    let b = valid_image(&s.subdir("b"), "vm1.qcow2");
    let c = valid_image(&s.subdir("c"), "other.qcow2");
    // Same default name from two directories.
    assert_mount_fails(s.mount_cmd().image(&a).image(&b), &["vm1.raw"]);
    // Same explicit name twice.
    assert_mount_fails(s.mount_cmd().named("x", &a).named("x", &c), &["x"]);
    // Explicit name equal to another chain's default name.
    assert_mount_fails(s.mount_cmd().image(&a).named("vm1.raw", &c), &["vm1.raw"]);
    // A name with a slash, and the reserved name.
    assert_mount_fails(s.mount_cmd().named("sub/disk", &a), &["sub/disk"]);
    // ... even when `NAME=IMAGE` also happens to spell an existing relative path
    // (`sub/disk=vm1.qcow2` in cwd): the argument is NAME `sub/disk`, IMAGE `vm1.qcow2`.
    fs::copy(&a, s.join("vm1.qcow2")).unwrap();
    fs::copy(&a, s.subdir("sub").join("disk=vm1.qcow2")).unwrap();
    assert_mount_fails(
        s.mount_cmd().cwd(s.path()).image("sub/disk=vm1.qcow2"),
        &["sub/disk"],
    );
    assert_mount_fails(s.mount_cmd().named(".control", &a), &[".control"]);
}
