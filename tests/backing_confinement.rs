//! Backing files named by untrusted images: `--backing-dir` confines them (after symlinks
//! and `..`), also when a backing chain is reopened; protocol-style names (`json:`,
//! `file:`, `nbd://`, any `scheme:`) are refused as protocols, never taken for files; the
//! network options `--no-remote` / `--allow-remote` are named in those refusals.

mod common;

use std::fs;
use std::os::unix::fs::symlink;
use std::process::Command;

use common::*;

#[test]
fn backing_dir_refuses_escapes_by_dotdot_and_symlink() {
    require_fuse!();
    let s = Scratch::new();
    let images = s.subdir("images");
    let outside = s.subdir("outside");
    let secret = Qcow2::new()
        .size(4 * MIB)
        .create(&outside.join("secret.qcow2"));
    write_pattern(&secret, 0x5e, 0, MIB);
    let dotdot = Qcow2::new()
        .backing_name("../outside/secret.qcow2", "qcow2")
        .create(&images.join("dotdot.qcow2"));
    symlink("../outside/secret.qcow2", images.join("link.qcow2")).unwrap();
    let linked = Qcow2::new()
        .backing_name("link.qcow2", "qcow2")
        .create(&images.join("linked.qcow2"));
    let dir = ps(&images);

    let err = assert_mount_fails(
        s.mount_cmd().args(&["--backing-dir", dir]).image(&dotdot),
        &[ps(&dotdot), "'../outside/secret.qcow2'", "--backing-dir"],
    );
    assert!(
        err.contains(ps(&secret)),
        "does not say where it leads: {err}"
    );
    assert_mount_fails(
        s.mount_cmd().args(&["--backing-dir", dir]).image(&linked),
        &[ps(&linked), "'link.qcow2'", ps(&secret), "--backing-dir"],
    );
    // Also for read-only mounts, and whatever the leaf's own location.
    assert_mount_fails(
        s.mount_cmd()
            .args(&["--read-only", "--backing-dir", dir])
            .image(&dotdot),
        &["--backing-dir"],
    );
    // Without the option (the default) both open, as in QEMU.
    s.mount(&[&dotdot], &[]).umount();
    // A second --backing-dir that holds the file lets it through.
    s.mount(
        &[&linked],
        &["--backing-dir", dir, "--backing-dir", ps(&outside)],
    )
    .umount();
}

#[test]
fn backing_dir_allows_a_chain_inside_and_follows_it_down() {
    require_fuse!();
    let s = Scratch::new();
    let images = s.subdir("images");
    let base = Qcow2::new()
        .size(4 * MIB)
        .create(&images.join("base.qcow2"));
    write_pattern(&base, 0x11, 0, MIB);
    let outside = s.subdir("outside");
    // The middle layer is inside, the one below it is not.
    let low = Qcow2::new()
        .size(4 * MIB)
        .create(&outside.join("low.qcow2"));
    let mid = Qcow2::new()
        .backing_name("../outside/low.qcow2", "qcow2")
        .create(&images.join("mid.qcow2"));
    let top = Qcow2::new()
        .backing_name("mid.qcow2", "qcow2")
        .create(&images.join("top.qcow2"));
    let good = Qcow2::new()
        .backing_name("base.qcow2", "qcow2")
        .create(&images.join("good.qcow2"));
    let reference = raw_reference(&good);
    let m = s.mount(&[&good], &["--backing-dir", ps(&images)]);
    assert_bytes_eq("good.raw", &read_file(&m.file("good.raw")), &reference);
    m.umount();
    assert_mount_fails(
        s.mount_cmd()
            .args(&["--backing-dir", ps(&images)])
            .image(&top),
        &[ps(&mid), "'../outside/low.qcow2'", ps(&low)],
    );
}

#[test]
fn reopened_backing_chain_is_confined_too() {
    require_fuse!();
    let s = Scratch::new();
    let images = s.subdir("images");
    let outside = s.subdir("outside");
    let base = Qcow2::new()
        .size(4 * MIB)
        .create(&images.join("base.qcow2"));
    write_pattern(&base, 0x11, 0, MIB);
    let top = Qcow2::new()
        .backing_name("base.qcow2", "qcow2")
        .create(&images.join("top.qcow2"));
    let m = s.mount(&[&top], &["--backing-dir", ps(&images)]);
    // Replace the backing file by a symlink to an identical copy outside: `start` reopens
    // the chain (the file was replaced) and must apply the confinement again.
    let copy = outside.join("base.qcow2");
    fs::copy(&base, &copy).unwrap();
    fs::remove_file(&base).unwrap();
    symlink(&copy, &base).unwrap();
    let out = run_with_timeout(
        {
            let mut c = Command::new(streamfs_bin());
            c.arg("start").arg(m.path()).arg("top.raw");
            c
        },
        IO_TIMEOUT,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "start succeeded: {stderr}");
    assert!(
        stderr.contains("--backing-dir") && stderr.contains(ps(&copy)),
        "{stderr}"
    );
    m.umount();
}

/// A leaf whose backing name is `name` (stored as is, never opened by qemu-img).
fn leaf_naming(s: &Scratch, file: &str, name: &str) -> std::path::PathBuf {
    let leaf = Qcow2::new().size(4 * MIB).create(&s.join(file));
    rebase_unsafe(&leaf, name, "raw");
    leaf
}

#[test]
fn protocol_backing_names_are_refused_as_protocols() {
    require_fuse!();
    let s = Scratch::new();
    // Files that a "relative name" reading would find: they must not be opened.
    fs::write(s.join("foo:bar"), vec![0u8; 4096]).unwrap();
    fs::create_dir_all(s.join("file:base.qcow2")).ok();
    let cases = [
        (
            r#"json:{"driver":"raw","file":{"driver":"file","filename":"/etc/passwd"}}"#,
            "json:",
        ),
        ("file:base.qcow2", "'file:'"),
        // Network protocols other than NBD and HTTP(S).
        ("ssh://localhost/x", "'ssh:'"),
        ("iscsi://localhost/iqn.x/0", "'iscsi:'"),
        ("foo:bar", "'foo:'"),
    ];
    for (i, (name, what)) in cases.iter().enumerate() {
        let leaf = leaf_naming(&s, &format!("leaf{i}.qcow2"), name);
        let err = assert_mount_fails(
            s.mount_cmd().image(&leaf),
            &[ps(&leaf), what, "not support"],
        );
        assert!(!err.contains("--no-remote"), "{err}");
    }
}

#[test]
fn remote_options_are_named_in_the_refusal() {
    require_fuse!();
    let s = Scratch::new();
    let leaf = leaf_naming(&s, "leaf.qcow2", "nbd://localhost:10809/x");
    assert_mount_fails(
        s.mount_cmd().arg("--no-remote").image(&leaf),
        &[ps(&leaf), "nbd://localhost:10809/x", "--no-remote"],
    );
    assert_mount_fails(
        s.mount_cmd()
            .args(&["--allow-remote", "https://mirror/"])
            .image(&leaf),
        &["no --allow-remote prefix", "https://mirror/"],
    );
    // Allowed: then it is opened (and fails only because nobody serves it here).
    let err = assert_mount_fails(
        s.mount_cmd()
            .args(&["--allow-remote", "nbd://localhost:10809/"])
            .image(&leaf),
        &["nbd://localhost:10809/x"],
    );
    assert!(!err.contains("refused;"), "{err}");
    // The two contradict each other: a usage error.
    let f = s
        .mount_cmd()
        .args(&["--no-remote", "--allow-remote", "nbd://x/"])
        .image(&leaf)
        .run()
        .map(|m| m.umount())
        .expect_err("--no-remote with --allow-remote mounted");
    assert!(f.stderr.contains("--allow-remote"), "{f}");
}

#[test]
fn backing_dir_must_exist() {
    require_fuse!();
    let s = Scratch::new();
    let leaf = Qcow2::new().size(MIB).create(&s.join("leaf.qcow2"));
    let missing = s.join("no-such-dir");
    assert_mount_fails(
        s.mount_cmd()
            .args(&["--backing-dir", ps(&missing)])
            .image(&leaf),
        &["--backing-dir", ps(&missing)],
    );
}
