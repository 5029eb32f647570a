//! Remote backing images through a mount: templates served by qemu-nbd, nbdkit and nginx
//! (started here, on 127.0.0.1 and unix sockets) under local qcow2 leaves. Every result is
//! judged by QEMU's own tools opening the same chain (`qemu-img convert`/`compare`, which
//! follow the same nbd:// and http:// backing names).

mod common;

use std::fs::{self, File};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::*;

const SIZE: u64 = 8 * MIB;

/// A sparse raw template: random extents of 64 KiB..512 KiB (64 KiB aligned) with holes
/// between. Returns its bytes.
fn template(path: &Path, seed: u64) -> Vec<u8> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut data = vec![0u8; SIZE as usize];
    let f = File::create(path).unwrap();
    f.set_len(SIZE).unwrap();
    let mut off = 0u64;
    while off < SIZE {
        let len = rng.gen_range(1..=8) * 64 * KIB;
        let len = len.min(SIZE - off);
        if rng.gen_bool(0.5) {
            let piece = random_bytes(rng.gen(), len as usize);
            f.write_all_at(&piece, off).unwrap();
            data[off as usize..(off + len) as usize].copy_from_slice(&piece);
        }
        off += len + rng.gen_range(0..4) * 64 * KIB;
    }
    // Data at the start of every MiB, where the tests read.
    for mib in 0..SIZE / MIB {
        let (o, n) = (mib * MIB, 128 * KIB);
        let piece = random_bytes(rng.gen(), n as usize);
        f.write_all_at(&piece, o).unwrap();
        data[o as usize..(o + n) as usize].copy_from_slice(&piece);
    }
    data
}

/// Bytes of data in a sparse file (by SEEK_DATA/SEEK_HOLE).
fn data_bytes(path: &Path) -> u64 {
    extents(path).iter().map(|r| r.end - r.start).sum()
}

/// A local qcow2 leaf over `uri` (format `fmt`), with a few writes of its own, and the
/// raw file QEMU reads from it. The leaf is made and written over `local`, a local file
/// with the bytes the server serves, and then pointed at `uri` (`rebase -u`): the QEMU
/// here has no curl driver, so it judges HTTP chains through their local equivalent.
fn leaf_over(
    s: &Scratch,
    name: &str,
    local: &Path,
    uri: &str,
    fmt: &str,
    cluster: u64,
) -> (PathBuf, PathBuf) {
    let leaf = Qcow2::new()
        .size(SIZE)
        .cluster_size(cluster)
        .backing_name(ps(local), fmt)
        .create(&s.join(name));
    write_pattern(&leaf, 0x5a, 3 * MIB, 64 * KIB);
    write_pattern(&leaf, 0xa5, SIZE - 4 * KIB, 4 * KIB);
    let want = s.join(format!("{name}.want"));
    convert_to_raw(&leaf, &want);
    rebase_unsafe(&leaf, uri, fmt);
    (leaf, want)
}

/// A leaf naming `uri` that nothing needs to open now (`qemu-img create -u`).
fn leaf_naming(path: &Path, uri: &str, fmt: &str) -> PathBuf {
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        "-u",
        "-b",
        uri,
        "-F",
        fmt,
        ps(path),
        &SIZE.to_string(),
    ]);
    path.to_path_buf()
}

/// The raw file shown for `leaf` is `want`, by random reads and a whole read.
fn assert_mount_shows(s: &Scratch, leaf: &Path, want: &Path, args: &[&str]) {
    let reference = fs::read(want).unwrap();
    let m = s.mount(&[leaf], args);
    let name = default_name(leaf);
    check_random_preads(
        &m.file(&name),
        reference.clone().into(),
        64 * KIB,
        200,
        test_seed(),
    );
    assert_bytes_eq(&name, &read_file(&m.file(&name)), &reference);
    m.umount();
}

fn require_servers(progs: &[&str]) -> bool {
    if fuse_skip_reason().is_some() {
        require_fuse_or_skip();
        return false;
    }
    progs.iter().all(|p| require_program(p))
}

fn require_fuse_or_skip() {
    if let Some(reason) = fuse_skip_reason() {
        skip_or_fail(&reason);
    }
}

#[test]
fn reads_through_nbd_and_http_templates_match_qemu() {
    if !require_servers(&["qemu-nbd", NGINX]) {
        return;
    }
    let s = Scratch::new();
    let raw = s.join("srv/tmpl.raw");
    fs::create_dir_all(raw.parent().unwrap()).unwrap();
    template(&raw, 1);
    let q = s.join("srv/tmpl.qcow2");
    qemu_img(&[
        "convert",
        "-q",
        "-f",
        "raw",
        "-O",
        "qcow2",
        ps(&raw),
        ps(&q),
    ]);
    let tcp = qemu_nbd(&raw, "raw", Listen::Tcp(free_port()));
    let unix = qemu_nbd(&q, "raw", Listen::Unix(s.join("q.sock")));
    let port = free_port();
    let _web = nginx(s.path(), &s.join("srv"), port, "");
    let http = |f: &str| format!("http://127.0.0.1:{port}/{f}");
    let legacy = format!("nbd:unix:{}:exportname=exp", s.join("q.sock").display());
    let cases = [
        (tcp.nbd_uri("exp"), &raw, "raw", 64 * KIB),
        (tcp.nbd_uri("exp"), &raw, "raw", 4 * KIB),
        (unix.nbd_uri("exp"), &q, "qcow2", 64 * KIB),
        (http("tmpl.raw"), &raw, "raw", 2 * MIB),
        (http("tmpl.qcow2"), &q, "qcow2", 64 * KIB),
        // QEMU's legacy spelling.
        (legacy, &q, "qcow2", 512),
    ];
    for (i, (uri, local, fmt, cluster)) in cases.iter().enumerate() {
        let name = format!("leaf{i}.qcow2");
        let (leaf, want) = leaf_over(&s, &name, local, uri, fmt, *cluster);
        assert_mount_shows(&s, &leaf, &want, &[]);
        // Copy-on-read filled the leaf, which QEMU finds consistent (the leaf alone: this
        // QEMU cannot open an http:// backing).
        let (code, text) = check_status_leaf_only(&leaf);
        assert_eq!(code, 0, "qemu-img check of {}:\n{text}", leaf.display());
    }
}

#[test]
fn a_remote_layer_in_the_middle_of_a_chain() {
    if !require_servers(&["qemu-nbd", NGINX]) {
        return;
    }
    let s = Scratch::new();
    let srv = s.subdir("srv");
    let base = srv.join("base.raw");
    template(&base, 2);
    let nbd = qemu_nbd(&base, "raw", Listen::Unix(s.join("b.sock")));
    // mid.qcow2 is served over HTTP; its backing is an absolute URI (NBD), and a second
    // one names a relative file that resolves against its URL.
    let mid = Qcow2::new()
        .size(SIZE)
        .cluster_size(64 * KIB)
        .backing_name(&nbd.nbd_uri("exp"), "raw")
        .create(&srv.join("mid.qcow2"));
    write_pattern(&mid, 0x33, MIB, 256 * KIB);
    let mid2 = Qcow2::new()
        .size(SIZE)
        .backing_name("mid.qcow2", "qcow2")
        .create(&srv.join("mid2.qcow2"));
    write_pattern(&mid2, 0x44, 2 * MIB, 128 * KIB);
    let port = free_port();
    let _web = nginx(s.path(), &srv, port, "");
    let (leaf, want) = leaf_over(
        &s,
        "leaf.qcow2",
        &srv.join("mid2.qcow2"),
        &format!("http://127.0.0.1:{port}/mid2.qcow2"),
        "qcow2",
        64 * KIB,
    );
    assert_mount_shows(&s, &leaf, &want, &["--no-copy-on-read"]);
    // A relative name inside an NBD-served image has no base directory (as in QEMU).
    let nbd_mid = qemu_nbd(
        &srv.join("mid2.qcow2"),
        "raw",
        Listen::Unix(s.join("m.sock")),
    );
    let leaf = leaf_naming(&s.join("leaf2.qcow2"), &nbd_mid.nbd_uri("exp"), "qcow2");
    let err = assert_mount_fails(
        s.mount_cmd().image(&leaf),
        &[
            "Cannot generate a base directory for NBD nodes",
            "mid.qcow2",
        ],
    );
    assert!(err.contains("nbd+unix://"), "{err}");
}

/// Data extents of a file by SEEK_DATA/SEEK_HOLE.
fn extents(path: &Path) -> Vec<std::ops::Range<u64>> {
    let f = File::open(path).unwrap();
    data_extents_by_seek(&f, SIZE).unwrap()
}

/// The ranges `qemu-img map --output=json ARGS` reports as data.
fn map_data(args: &[&str]) -> Vec<std::ops::Range<u64>> {
    let mut all = vec!["map", "--output=json"];
    all.extend_from_slice(args);
    let v: serde_json::Value = serde_json::from_str(&qemu_img(&all)).expect("map json");
    v.as_array()
        .expect("a list")
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| {
            let (o, n) = (e["start"].as_u64().unwrap(), e["length"].as_u64().unwrap());
            o..o + n
        })
        .collect()
}

fn covered(ext: &[std::ops::Range<u64>], off: u64) -> bool {
    ext.iter().any(|r| r.contains(&off))
}

#[test]
fn holes_of_a_sparse_nbd_template_are_neither_shown_nor_copied() {
    if !require_servers(&["qemu-nbd"]) {
        return;
    }
    let s = Scratch::new();
    let raw = s.join("tmpl.raw");
    let data = template(&raw, 3);
    let srv = qemu_nbd(&raw, "raw", Listen::Tcp(free_port()));
    let leaf = Qcow2::new()
        .size(SIZE)
        .cluster_size(64 * KIB)
        .backing_name(&srv.nbd_uri("exp"), "raw")
        .create(&s.join("leaf.qcow2"));
    let m = s.mount(&[&leaf], &["--no-copy-on-read"]);
    let shown = extents(&m.file("leaf.raw"));
    // Every 64 KiB block with data is inside a data extent; blocks that are holes in the
    // template are not.
    for blk in (0..SIZE).step_by(64 * KIB as usize) {
        let any = data[blk as usize..(blk + 64 * KIB) as usize]
            .iter()
            .any(|&b| b != 0);
        let local = extents(&raw);
        assert_eq!(
            covered(&shown, blk),
            covered(&local, blk),
            "block at {blk}: {shown:?}"
        );
        if any {
            assert!(covered(&shown, blk), "data at {blk} shown as a hole");
        }
    }
    // qemu-img map of the mounted file (SEEK_DATA/SEEK_HOLE through FUSE) agrees with
    // qemu-img map of the chain as QEMU opens it (NBD block status).
    let of_mount = map_data(&["-f", "raw", ps(&m.file("leaf.raw"))]);
    let of_chain = map_data(&["-U", "-f", "qcow2", ps(&leaf)]);
    for blk in (0..SIZE).step_by(64 * KIB as usize) {
        assert_eq!(
            covered(&of_mount, blk),
            covered(&of_chain, blk),
            "qemu-img map disagrees at {blk}:\nmount {of_mount:?}\nchain {of_chain:?}"
        );
    }
    ctl_ok(&m, "start leaf.raw");
    let done = wait_completed(&m, "leaf.raw", Duration::from_secs(60));
    let copied = num(&done, "copied");
    let data_bytes = data_bytes(&raw);
    assert!(
        copied <= data_bytes,
        "copied {copied} bytes, the template holds {data_bytes}: {}",
        done.raw
    );
    m.umount();
    let want = s.join("want.raw");
    fs::write(&want, &data).unwrap();
    assert_identical_to_raw("streamed leaf", &leaf, &want);
    let info = qemu_img(&["info", "--output=json", ps(&leaf)]);
    assert!(!info.contains("backing-filename"), "{info}");
    // Holes were not allocated in the leaf.
    let map = qemu_img(&["map", "--output=json", ps(&leaf)]);
    let allocated: u64 = serde_json::from_str::<serde_json::Value>(&map)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["data"] == true)
        .map(|e| e["length"].as_u64().unwrap())
        .sum();
    assert!(
        allocated <= data_bytes + 64 * KIB * 64,
        "leaf allocates {allocated} bytes for {data_bytes} of data"
    );
    drop(srv);
}

#[test]
fn full_and_base_streams_from_remote_templates() {
    if !require_servers(&["qemu-nbd", NGINX]) {
        return;
    }
    let s = Scratch::new();
    let srv = s.subdir("srv");
    let base = srv.join("base.raw");
    template(&base, 4);
    let nbd = qemu_nbd(&base, "raw", Listen::Tcp(free_port()));
    let mid = Qcow2::new()
        .size(SIZE)
        .backing_name(&nbd.nbd_uri("exp"), "raw")
        .create(&srv.join("mid.qcow2"));
    write_pattern(&mid, 0x71, 512 * KIB, 512 * KIB);
    let port = free_port();
    let _web = nginx(s.path(), &srv, port, "");
    let mid_url = format!("http://127.0.0.1:{port}/mid.qcow2");
    // Whole stream: the leaf needs neither server afterwards.
    let mid_local = srv.join("mid.qcow2");
    let (leaf, want) = leaf_over(&s, "full.qcow2", &mid_local, &mid_url, "qcow2", 64 * KIB);
    let m = s.mount(&[&leaf], &[]);
    ctl_ok(&m, "start full.raw speed=0");
    let done = wait_completed(&m, "full.raw", Duration::from_secs(60));
    assert_eq!(num(&done, "layers"), 1, "{}", done.raw);
    m.umount();
    assert_identical_to_raw("whole stream", &leaf, &want);
    // Base stream keeping the NBD base: the leaf is relinked to its URI.
    let (leaf, want) = leaf_over(&s, "part.qcow2", &mid_local, &mid_url, "qcow2", 64 * KIB);
    let m = s.mount(&[&leaf], &[]);
    ctl_ok(&m, &format!("start part.raw base={}", nbd.nbd_uri("exp")));
    let done = wait_completed(&m, "part.raw", Duration::from_secs(60));
    assert_eq!(num(&done, "layers"), 2, "{}", done.raw);
    m.umount();
    let info = qemu_img(&["info", "--output=json", ps(&leaf)]);
    assert!(info.contains(&nbd.nbd_uri("exp")), "{info}");
    assert_identical_to_raw("base stream", &leaf, &want);
}

#[test]
fn mount_fails_clearly_when_the_server_cannot_serve() {
    if !require_servers(&["qemu-nbd", NGINX]) {
        return;
    }
    let s = Scratch::new();
    let raw = s.join("tmpl.raw");
    template(&raw, 5);
    let nbd = qemu_nbd(&raw, "raw", Listen::Tcp(free_port()));
    let dead = format!("nbd://127.0.0.1:{}/exp", free_port());
    let unknown = nbd.nbd_uri("no-such-export");
    let srv = s.subdir("srv");
    fs::copy(&raw, srv.join("t.raw")).unwrap();
    let port = free_port();
    let _web = nginx(s.path(), &srv, port, "max_ranges 0;");
    let noranges = format!("http://127.0.0.1:{port}/t.raw");
    let missing = format!("http://127.0.0.1:{port}/missing.raw");
    for (i, (uri, why)) in [
        (&dead, "refused"),
        (&unknown, "export"),
        (&noranges, "range"),
        (&missing, "404"),
    ]
    .into_iter()
    .enumerate()
    {
        let leaf = leaf_naming(&s.join(format!("l{i}.qcow2")), uri, "raw");
        let t = Instant::now();
        let err = assert_mount_fails(
            s.mount_cmd().arg("--remote-timeout").arg("5").image(&leaf),
            &[uri],
        );
        assert!(err.to_lowercase().contains(why), "{uri}: {err}");
        assert!(
            t.elapsed() < Duration::from_secs(15),
            "{uri}: took {:?}",
            t.elapsed()
        );
        assert!(
            processes_mentioning(&leaf).is_empty(),
            "a process is left behind for {uri}"
        );
    }
    // The options that restrict remote backings.
    let leaf = Qcow2::new()
        .size(SIZE)
        .backing_name(&nbd.nbd_uri("exp"), "raw")
        .create(&s.join("ok.qcow2"));
    assert_mount_fails(
        s.mount_cmd().arg("--no-remote").image(&leaf),
        &["--no-remote"],
    );
    assert_mount_fails(
        s.mount_cmd()
            .arg("--allow-remote")
            .arg("http://")
            .image(&leaf),
        &["--allow-remote"],
    );
    let m = s.mount(&[&leaf], &["--allow-remote", "nbd://127.0.0.1:"]);
    m.umount();
    // A remote image is never a leaf.
    assert_mount_fails(
        s.mount_cmd().image(nbd.nbd_uri("exp")),
        &["cannot be the leaf"],
    );
}

#[test]
fn a_server_restarted_mid_stream_is_reconnected_and_the_data_is_whole() {
    if !require_servers(&["qemu-nbd"]) {
        return;
    }
    let s = Scratch::new();
    let raw = s.join("tmpl.raw");
    let data = template(&raw, 6);
    let mut srv = qemu_nbd(&raw, "raw", Listen::Unix(s.join("t.sock")));
    let (leaf, want) = leaf_over(&s, "leaf.qcow2", &raw, &srv.nbd_uri("exp"), "raw", 64 * KIB);
    let m = s.mount(&[&leaf], &["--remote-timeout", "20"]);
    ctl_ok(&m, "start leaf.raw speed=2M");
    wait_job(&m, "leaf.raw", Duration::from_secs(30), "copying", |l| {
        num(l, "copied") > 0
    });
    srv.stop();
    // A guest read of a range only the server has waits for it.
    let f = File::open(m.file("leaf.raw")).unwrap();
    let reader = std::thread::spawn(move || {
        let mut buf = vec![0u8; 64 * 1024];
        f.read_exact_at(&mut buf, 6 * MIB).map(|_| buf)
    });
    std::thread::sleep(Duration::from_millis(1500));
    srv.restart();
    let got = reader
        .join()
        .unwrap()
        .expect("the read waits for the restarted server");
    assert_bytes_eq(
        "read across the restart",
        &got,
        &data[6 * MIB as usize..6 * MIB as usize + 65536],
    );
    ctl_ok(&m, "speed leaf.raw 0");
    let done = wait_completed(&m, "leaf.raw", Duration::from_secs(60));
    assert_eq!(num(&done, "layers"), 1, "{}", done.raw);
    m.umount();
    assert_identical_to_raw("stream across a server restart", &leaf, &want);
}

#[test]
fn an_outage_longer_than_the_timeout_fails_reads_and_the_job_then_resumes() {
    if !require_servers(&["qemu-nbd"]) {
        return;
    }
    let s = Scratch::new();
    let raw = s.join("tmpl.raw");
    template(&raw, 7);
    let mut srv = qemu_nbd(&raw, "raw", Listen::Tcp(free_port()));
    let uri = srv.nbd_uri("exp");
    let (leaf, want) = leaf_over(&s, "leaf.qcow2", &raw, &uri, "raw", 64 * KIB);
    let m = s.mount(&[&leaf], &["--remote-timeout", "2"]);
    ctl_ok(&m, "start leaf.raw speed=1M");
    wait_job(&m, "leaf.raw", Duration::from_secs(30), "copying", |l| {
        num(l, "copied") > 0
    });
    srv.stop();
    let failed = wait_end(&m, "leaf.raw", Duration::from_secs(30));
    assert_eq!(state(&failed), "failed", "{}", failed.raw);
    assert!(
        failed.raw.contains(&uri),
        "the error names the URI: {}",
        failed.raw
    );
    let first = num(&failed, "copied");
    // A guest read fails with EIO after about the timeout, never with zeros.
    let f = File::open(m.file("leaf.raw")).unwrap();
    let t = Instant::now();
    let mut buf = vec![0u8; 4096];
    let e = f.read_exact_at(&mut buf, 7 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(10),
        "EIO after {:?}",
        t.elapsed()
    );
    // What the leaf holds (its own writes, and what the job copied below its low-water
    // mark) reads with the server still down: such reads never touch the network.
    let own = 3 * MIB;
    f.read_exact_at(&mut buf, own)
        .expect("the leaf's own data with the server down");
    assert_bytes_eq(
        "the leaf's own data",
        &buf,
        &fs::read(&want).unwrap()[own as usize..][..4096],
    );
    if num(&failed, "offset") >= 4096 {
        f.read_exact_at(&mut buf, 0)
            .expect("streamed data with the server down");
        assert_bytes_eq("streamed data", &buf, &fs::read(&want).unwrap()[..4096]);
    }
    drop(f);
    // The leaf is consistent, and nothing was allocated for the failed reads.
    srv.restart();
    ctl_ok(&m, "start leaf.raw");
    let done = wait_completed(&m, "leaf.raw", Duration::from_secs(60));
    let again = num(&done, "copied");
    let total = data_bytes(&raw);
    assert!(
        first + again <= total + 64 * KIB,
        "the second job recopied: {first} + {again} bytes of a {total}-byte template"
    );
    m.umount();
    qemu_img_check(&leaf);
    assert_identical_to_raw("resumed stream", &leaf, &want);
}

#[test]
fn server_errors_and_slow_answers_become_eio_without_touching_the_leaf() {
    if !require_servers(&["nbdkit"]) {
        return;
    }
    let s = Scratch::new();
    let raw = s.join("tmpl.raw");
    template(&raw, 8);
    // Reads of [4 MiB, 5 MiB) fail with EIO on the server's side.
    let erring = nbdkit(
        Listen::Unix(s.join("e.sock")),
        &[
            "--filter=error",
            "file",
            &format!("file={}", raw.display()),
            "error=EIO",
            "error-pread-rate=1",
            &format!("error-file={}", s.join("armed").display()),
        ],
    );
    let (leaf, _) = leaf_over(&s, "leaf.qcow2", &raw, &erring.nbd_uri(""), "raw", 64 * KIB);
    let m = s.mount(&[&leaf], &["--remote-timeout", "5"]);
    let f = File::open(m.file("leaf.raw")).unwrap();
    let mut buf = vec![0u8; 4096];
    f.read_exact_at(&mut buf, 4 * MIB)
        .expect("read before the fault");
    fs::write(s.join("armed"), b"").unwrap();
    let before = job(&m, "leaf.raw");
    let t = Instant::now();
    let e = f.read_exact_at(&mut buf, 5 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    assert!(
        t.elapsed() < Duration::from_secs(4),
        "an error answer is not an outage: {:?}",
        t.elapsed()
    );
    // The failed copy-on-read allocated nothing in the leaf.
    let after = job(&m, "leaf.raw");
    assert_eq!(
        (num(&after, "leaf"), num(&after, "alloc")),
        (num(&before, "leaf"), num(&before, "alloc")),
        "{} -> {}",
        before.raw,
        after.raw
    );
    ctl_ok(&m, "start leaf.raw");
    let l = wait_end(&m, "leaf.raw", Duration::from_secs(30));
    assert_eq!(state(&l), "failed", "{}", l.raw);
    drop(f);
    m.umount();
    qemu_img_check(&leaf);
    let info = qemu_img(&["info", "-U", "--output=json", ps(&leaf)]);
    assert!(
        info.contains("backing-filename"),
        "the link stays after a failed stream: {info}"
    );
    // A server slower than --remote-timeout: EIO after about the timeout.
    let slow = nbdkit(
        Listen::Unix(s.join("d.sock")),
        &[
            "--filter=delay",
            "file",
            &format!("file={}", raw.display()),
            "rdelay=4",
        ],
    );
    let (leaf, _) = leaf_over(&s, "slow.qcow2", &raw, &slow.nbd_uri(""), "raw", 64 * KIB);
    let m = s.mount(&[&leaf], &["--remote-timeout", "1"]);
    let f = File::open(m.file("slow.raw")).unwrap();
    let t = Instant::now();
    let e = f.read_exact_at(&mut buf, MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    let took = t.elapsed();
    assert!(
        took >= Duration::from_millis(900) && took < Duration::from_secs(4),
        "EIO after {took:?}"
    );
    drop(f);
    m.umount();
    qemu_img_check(&leaf);
}

#[test]
fn an_http_object_replaced_during_a_mount_is_not_mixed_in() {
    if !require_servers(&[NGINX]) {
        return;
    }
    let s = Scratch::new();
    let srv = s.subdir("srv");
    let t = srv.join("t.raw");
    let data = template(&t, 9);
    let port = free_port();
    let _web = nginx(s.path(), &srv, port, "");
    let (leaf, _) = leaf_over(
        &s,
        "leaf.qcow2",
        &t,
        &format!("http://127.0.0.1:{port}/t.raw"),
        "raw",
        64 * KIB,
    );
    let m = s.mount(&[&leaf], &["--no-copy-on-read", "--remote-timeout", "3"]);
    let f = File::open(m.file("leaf.raw")).unwrap();
    let mut buf = vec![0u8; 65536];
    f.read_exact_at(&mut buf, 0).unwrap();
    assert_bytes_eq("before the replacement", &buf, &data[..65536]);
    // A new version of the template (new content, new ETag), put in place by rename.
    let new = srv.join("t.new");
    fs::write(&new, random_bytes(99, SIZE as usize)).unwrap();
    // nginx's ETag is mtime and size: a new version within the same second would look
    // the same to any client.
    let later = std::time::SystemTime::now() + Duration::from_secs(10);
    File::options()
        .write(true)
        .open(&new)
        .unwrap()
        .set_modified(later)
        .unwrap();
    fs::rename(&new, &t).unwrap();
    let e = f.read_exact_at(&mut buf, 2 * MIB).unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EIO), "{e}");
    drop(f);
    m.umount();
}
