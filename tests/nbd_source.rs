//! The NBD byte source against real servers (qemu-nbd, nbdkit) that each test starts on
//! 127.0.0.1 or a Unix socket in a temporary directory, and kills when done.

use std::fs;
use std::net::TcpListener;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use rand::{Rng, RngCore, SeedableRng};
use streamfs::source::nbd::NbdSource;
use streamfs::source::uri::{NbdAddr, NbdServer};
use streamfs::source::{Extent, RemoteOptions, Source};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * 1024;

/// Whether `bin` can run; if not, skip (print) or, under CI, fail.
fn have(bin: &str) -> bool {
    let ok = Command::new(bin)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        let ci = std::env::var("CI").unwrap_or_default();
        let test = thread::current().name().unwrap_or("?").to_string();
        if ci.eq_ignore_ascii_case("true") || ci == "1" {
            panic!("{test}: {bin} is not installed (needed under CI)");
        }
        eprintln!("SKIP: {test}: {bin} is not installed");
    }
    ok
}

/// A server process, killed (and reaped) when dropped.
struct Server {
    child: Option<Child>,
    what: String,
}

impl Server {
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    fn addr(&self, export: &str) -> NbdAddr {
        match self {
            Listen::Tcp(port) => NbdAddr {
                server: NbdServer::Tcp {
                    host: "127.0.0.1".into(),
                    port: *port,
                },
                export: export.into(),
                uri: format!("nbd://127.0.0.1:{port}/{export}"),
            },
            Listen::Unix(p) => NbdAddr {
                server: NbdServer::Unix(p.clone()),
                export: export.into(),
                uri: format!("nbd+unix:///{export}?socket={}", p.display()),
            },
        }
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Starts `cmd` and waits until its pid file exists (both servers write it once they
/// listen).
fn start(mut cmd: Command, pidfile: &Path, what: &str) -> Server {
    let _ = fs::remove_file(pidfile);
    cmd.stdin(Stdio::null()).stdout(Stdio::null());
    let child = cmd.spawn().unwrap_or_else(|e| panic!("{what}: {e}"));
    let mut s = Server {
        child: Some(child),
        what: what.to_string(),
    };
    let t = Instant::now();
    while !pidfile.exists() {
        if let Some(st) = s.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
            panic!("{}: exited at start: {st}", s.what);
        }
        assert!(t.elapsed() < Duration::from_secs(20), "{what}: not ready");
        thread::sleep(Duration::from_millis(20));
    }
    // The pid file may be written a moment before the socket takes connections.
    thread::sleep(Duration::from_millis(50));
    s
}

/// qemu-nbd exporting `file` (raw, read-only, persistent) as `exp`.
fn qemu_nbd(dir: &Path, file: &Path, listen: &Listen, extra: &[&str]) -> Server {
    let pid = dir.join("qemu-nbd.pid");
    let mut c = Command::new("qemu-nbd");
    c.args(["-f", "raw", "-x", "exp", "-r", "-t"]);
    match listen {
        Listen::Tcp(p) => c.args(["-b", "127.0.0.1", "-p", &p.to_string()]),
        Listen::Unix(p) => {
            let _ = fs::remove_file(p);
            c.arg(format!("--socket={}", p.display()))
        }
    };
    c.args(extra).arg("--pid-file").arg(&pid).arg(file);
    start(c, &pid, "qemu-nbd")
}

/// nbdkit in the foreground with `args` (filters, plugin and parameters).
fn nbdkit(dir: &Path, listen: &Listen, args: &[&str]) -> Server {
    let pid = dir.join("nbdkit.pid");
    let mut c = Command::new("nbdkit");
    c.args(["-f", "--exit-with-parent", "-e", "exp"]);
    match listen {
        Listen::Tcp(p) => c.args(["-i", "127.0.0.1", "-p", &p.to_string()]),
        Listen::Unix(p) => {
            let _ = fs::remove_file(p);
            c.arg("-U").arg(p)
        }
    };
    c.arg("-P").arg(&pid).args(args);
    start(c, &pid, "nbdkit")
}

fn opts(timeout: Duration) -> RemoteOptions {
    RemoteOptions {
        timeout,
        ..RemoteOptions::default()
    }
}

fn random_file(path: &Path, len: usize, seed: u64) -> Vec<u8> {
    let mut data = vec![0u8; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut data);
    fs::write(path, &data).unwrap();
    data
}

/// Reads [off, off+len) and checks it against `data` (zeros and a short count past
/// the end).
fn check_read(src: &dyn Source, data: &[u8], off: u64, len: usize) {
    let mut buf = vec![0xa5u8; len];
    let n = src
        .read_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
    let size = data.len() as u64;
    let want = if off >= size {
        0
    } else {
        len.min((size - off) as usize)
    };
    assert_eq!(n, want, "count of read {len} at {off}");
    if want > 0 {
        assert!(
            buf[..n] == data[off as usize..off as usize + n],
            "data of read {len} at {off}"
        );
    }
    assert!(buf[n..].iter().all(|&b| b == 0), "zeros past the end");
}

fn tempdir() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("streamfs-nbd")
        .tempdir()
        .unwrap()
}

fn odd_reads(src: &dyn Source, data: &[u8]) {
    let size = data.len() as u64;
    for (off, len) in [
        (0, 1),
        (0, 4096),
        (1, 1),
        (511, 2),
        (4095, 8193),
        (12345, 54321),
        (MIB - 7, 3 * MIB as usize + 11),
        (size - 1, 1),
        (size - 100, 4096),
        (size, 10),
        (size + 12345, 512),
        (0, size as usize + 1000),
    ] {
        check_read(src, data, off, len);
    }
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..50 {
        let off = rng.gen_range(0..size + 100);
        let len = rng.gen_range(1..300 * KIB as usize);
        check_read(src, data, off, len);
    }
}

#[test]
fn qemu_nbd_data_matches_the_file() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    // qemu-nbd rounds a raw file's size up to 512 bytes: keep it whole (nbdkit serves the
    // odd sizes).
    let data = random_file(&file, (5 * MIB + 1536) as usize, 1);
    for listen in [
        Listen::Unix(d.path().join("s.sock")),
        Listen::Tcp(free_port()),
    ] {
        let _srv = qemu_nbd(d.path(), &file, &listen, &[]);
        let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
        assert_eq!(src.size(), data.len() as u64);
        assert!(src.is_remote());
        odd_reads(&src, &data);
        src.close();
        let mut b = [0u8; 1];
        let e = src.read_at(&mut b, 0).unwrap_err().to_string();
        assert!(e.contains("closed"), "{e}");
    }
}

#[test]
fn block_sizes_are_honoured_and_large_reads_split() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = random_file(&file, (3 * MIB) as usize, 2);
    let listen = Listen::Unix(d.path().join("s.sock"));
    // Any unaligned or oversized request is an error from this server.
    let _srv = nbdkit(
        d.path(),
        &listen,
        &[
            "--filter=blocksize-policy",
            "file",
            file.to_str().unwrap(),
            "blocksize-minimum=4096",
            "blocksize-preferred=65536",
            "blocksize-maximum=262144",
            "blocksize-error-policy=error",
        ],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    odd_reads(&src, &data);
    let (k, l) = src.extent(4097, 100).unwrap();
    assert!((1..=100).contains(&l), "{k:?} {l}");
}

#[test]
fn simple_replies_without_structured_replies() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = random_file(&file, (2 * MIB + 5) as usize, 3);
    let listen = Listen::Tcp(free_port());
    let _srv = nbdkit(
        d.path(),
        &listen,
        &["--no-sr", "file", file.to_str().unwrap()],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    odd_reads(&src, &data);
    // No structured replies: no block status, all data.
    assert_eq!(src.extent(0, 1000).unwrap(), (Extent::Data, 1000));
}

#[test]
fn plain_export_name_without_fixed_newstyle() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = random_file(&file, (MIB + 3) as usize, 4);
    let listen = Listen::Unix(d.path().join("s.sock"));
    let _srv = nbdkit(
        d.path(),
        &listen,
        &["--mask-handshake=0", "file", file.to_str().unwrap()],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    odd_reads(&src, &data);
}

#[test]
fn oldstyle_server_is_a_clear_error() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let listen = Listen::Unix(d.path().join("s.sock"));
    let _srv = nbdkit(d.path(), &listen, &["-o", "memory", "1M"]);
    let e = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30)))
        .err()
        .expect("refused")
        .to_string();
    assert!(e.contains("oldstyle"), "{e}");
}

fn sparse_file(path: &Path) -> u64 {
    let f = fs::File::create(path).unwrap();
    f.set_len(8 * MIB).unwrap();
    f.write_all_at(&[0x5a; 64 * KIB as usize], 2 * MIB).unwrap();
    f.write_all_at(&[0x33; 4096], 8 * MIB - 4096).unwrap();
    8 * MIB
}

/// The extents of [0, size) as a list, merged.
fn extents(src: &dyn Source) -> Vec<(u64, u64, Extent)> {
    let mut v: Vec<(u64, u64, Extent)> = Vec::new();
    let mut at = 0;
    while at < src.size() {
        let (k, l) = src.extent(at, src.size() - at).unwrap();
        assert!(l >= 1 && l <= src.size() - at, "{at}: {l}");
        match v.last_mut() {
            Some(last) if last.2 == k && last.1 == at => last.1 += l,
            _ => v.push((at, at + l, k)),
        }
        at += l;
    }
    v
}

#[test]
fn block_status_of_a_sparse_file() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("sparse.raw");
    let size = sparse_file(&file);
    let listen = Listen::Unix(d.path().join("s.sock"));
    let _srv = qemu_nbd(d.path(), &file, &listen, &[]);
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    let v = extents(&src);
    assert_eq!(
        v,
        vec![
            (0, 2 * MIB, Extent::Hole),
            (2 * MIB, 2 * MIB + 64 * KIB, Extent::Data),
            (2 * MIB + 64 * KIB, size - 4096, Extent::Hole),
            (size - 4096, size, Extent::Data),
        ]
    );
    // Inside an extent, bounded by the length asked.
    assert_eq!(src.extent(2 * MIB + 10, 5).unwrap(), (Extent::Data, 5));
    assert_eq!(src.extent(100, 1000).unwrap(), (Extent::Hole, 1000));
}

#[test]
fn block_status_zero_and_noextents() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let list = d.path().join("extents");
    fs::write(&list, "0 1M\n1M 1M zero\n2M 1M hole,zero\n3M 1M hole\n").unwrap();
    let listen = Listen::Unix(d.path().join("s.sock"));
    let srv = nbdkit(
        d.path(),
        &listen,
        &[
            "--filter=extentlist",
            "memory",
            "5M",
            &format!("extentlist={}", list.display()),
        ],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    assert_eq!(
        extents(&src),
        vec![
            (0, MIB, Extent::Data),
            (MIB, 2 * MIB, Extent::Zero),
            (2 * MIB, 5 * MIB, Extent::Hole),
        ]
    );
    drop(src);
    drop(srv);
    // noextents: the server reports everything allocated.
    let _srv = nbdkit(d.path(), &listen, &["--filter=noextents", "memory", "5M"]);
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    assert_eq!(extents(&src), vec![(0, 5 * MIB, Extent::Data)]);
}

#[test]
fn unknown_export_fails_at_connect() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    random_file(&file, 4096, 5);
    let listen = Listen::Tcp(free_port());
    let _srv = qemu_nbd(d.path(), &file, &listen, &[]);
    let t = Instant::now();
    let e = NbdSource::connect(&listen.addr("nope"), &opts(Duration::from_secs(30)))
        .err()
        .expect("unknown export")
        .to_string();
    assert!(e.contains("export 'nope' is not offered"), "{e}");
    assert!(e.contains("nbd://127.0.0.1:"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn refused_connection_fails_quickly() {
    let port = free_port();
    let addr = Listen::Tcp(port).addr("x");
    let t = Instant::now();
    let e = NbdSource::connect(&addr, &opts(Duration::from_secs(30)))
        .err()
        .expect("refused")
        .to_string();
    assert!(
        e.contains(&format!(
            "cannot connect to 127.0.0.1:{port}: Connection refused"
        )),
        "{e}"
    );
    assert!(e.starts_with(&addr.uri), "{e}");
    let d = tempdir();
    let addr = Listen::Unix(d.path().join("none.sock")).addr("x");
    let e = NbdSource::connect(&addr, &opts(Duration::from_secs(30)))
        .err()
        .expect("no socket")
        .to_string();
    assert!(e.contains("cannot connect to socket"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn connect_to_a_silent_server_is_bounded_by_the_timeout() {
    // Accepts the connection but never says a word.
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = l.local_addr().unwrap().port();
    let keep = thread::spawn(move || l.accept().map(|(s, _)| s));
    let t = Instant::now();
    let e = NbdSource::connect(&Listen::Tcp(port).addr("x"), &opts(Duration::from_secs(1)))
        .err()
        .expect("silent")
        .to_string();
    assert!(e.contains("no answer"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(4), "{:?}", t.elapsed());
    drop(keep.join());
}

type StartFn<'a> = Box<dyn Fn(&Listen) -> Server + 'a>;

#[test]
fn many_threads_read_concurrently() {
    if !have("nbdkit") || !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = Arc::new(random_file(&file, (16 * MIB + 512) as usize, 6));
    // nbdkit's file plugin allows several connections; qemu-nbd read-only also.
    let servers: [(&str, StartFn); 2] = [
        (
            "nbdkit",
            Box::new(|l: &Listen| nbdkit(d.path(), l, &["file", file.to_str().unwrap()])),
        ),
        (
            "qemu-nbd",
            Box::new(|l: &Listen| qemu_nbd(d.path(), &file, l, &["-e", "8"])),
        ),
    ];
    for (name, run) in servers {
        let listen = Listen::Tcp(free_port());
        let _srv = run(&listen);
        let src = Arc::new(
            NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap(),
        );
        eprintln!("{name}: {} connection(s)", src.connections());
        let t = Instant::now();
        let hs: Vec<_> = (0..16)
            .map(|i| {
                let (src, data) = (src.clone(), data.clone());
                thread::spawn(move || {
                    let mut rng = rand::rngs::StdRng::seed_from_u64(100 + i);
                    for _ in 0..100 {
                        let off = rng.gen_range(0..data.len() as u64);
                        let len = rng.gen_range(1..256 * KIB as usize);
                        check_read(&*src, &data, off, len);
                    }
                })
            })
            .collect();
        for h in hs {
            h.join().unwrap();
        }
        eprintln!("{name}: 1600 reads in {:?}", t.elapsed());
    }
}

#[test]
fn reads_survive_a_server_restart() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = Arc::new(random_file(&file, (4 * MIB) as usize, 7));
    let listen = Listen::Unix(d.path().join("s.sock"));
    let mut srv = qemu_nbd(d.path(), &file, &listen, &[]);
    let src =
        Arc::new(NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(20))).unwrap());
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicUsize::new(0));
    let hs: Vec<_> = (0..4)
        .map(|i| {
            let (src, data, stop, done) = (src.clone(), data.clone(), stop.clone(), done.clone());
            thread::spawn(move || {
                let mut rng = rand::rngs::StdRng::seed_from_u64(200 + i);
                while !stop.load(Ordering::Relaxed) {
                    let off = rng.gen_range(0..data.len() as u64);
                    check_read(&*src, &data, off, rng.gen_range(1..128 * KIB as usize));
                    done.fetch_add(1, Ordering::Relaxed);
                }
            })
        })
        .collect();
    thread::sleep(Duration::from_millis(300));
    srv.kill();
    thread::sleep(Duration::from_millis(1500));
    let before = done.load(Ordering::Relaxed);
    let _srv2 = qemu_nbd(d.path(), &file, &listen, &[]);
    thread::sleep(Duration::from_millis(700));
    stop.store(true, Ordering::Relaxed);
    for h in hs {
        h.join().expect("reads across the restart succeed");
    }
    assert!(
        done.load(Ordering::Relaxed) > before,
        "reads after the restart"
    );
}

#[test]
fn server_down_longer_than_the_timeout_fails_the_read() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = random_file(&file, MIB as usize, 8);
    let listen = Listen::Tcp(free_port());
    let mut srv = qemu_nbd(d.path(), &file, &listen, &[]);
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(2))).unwrap();
    check_read(&src, &data, 0, 4096);
    srv.kill();
    let t = Instant::now();
    let mut b = vec![0u8; 4096];
    let e = src.read_at(&mut b, 0).unwrap_err().to_string();
    let took = t.elapsed();
    assert!(e.contains("no answer within 2 s"), "{e}");
    assert!(e.contains("Connection refused"), "{e}");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    assert!(took < Duration::from_secs(7), "{took:?}");
    // Back up: reads work again.
    let _srv = qemu_nbd(d.path(), &file, &listen, &[]);
    check_read(&src, &data, 4096, 4096);
}

#[test]
fn export_that_changed_size_after_a_restart_fails_reads() {
    if !have("qemu-nbd") {
        return;
    }
    let d = tempdir();
    let file = d.path().join("img.raw");
    let data = random_file(&file, MIB as usize, 9);
    let listen = Listen::Unix(d.path().join("s.sock"));
    let mut srv = qemu_nbd(d.path(), &file, &listen, &[]);
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(10))).unwrap();
    check_read(&src, &data, 0, 4096);
    srv.kill();
    let other = d.path().join("other.raw");
    random_file(&other, 2 * MIB as usize, 10);
    let _srv = qemu_nbd(d.path(), &other, &listen, &[]);
    let t = Instant::now();
    let mut b = vec![0u8; 4096];
    let e = src.read_at(&mut b, 0).unwrap_err().to_string();
    assert!(e.contains("changed size"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(5));
}

#[test]
fn server_error_fails_the_read_at_once() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let listen = Listen::Unix(d.path().join("s.sock"));
    let _srv = nbdkit(
        d.path(),
        &listen,
        &[
            "--filter=error",
            "pattern",
            "4M",
            "error-pread=EIO",
            "error-pread-rate=100%",
        ],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    let mut b = vec![0u8; 8192];
    let e = src.read_at(&mut b, 4096).unwrap_err();
    assert!(
        matches!(e, streamfs::Error::Remote { .. }),
        "maps to EIO: {e:?}"
    );
    let e = e.to_string();
    assert!(e.contains("NBD_EIO"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(3), "{:?}", t.elapsed());
}

#[test]
fn slow_server_times_out() {
    if !have("nbdkit") {
        return;
    }
    let d = tempdir();
    let listen = Listen::Tcp(free_port());
    let _srv = nbdkit(
        d.path(),
        &listen,
        &["--filter=delay", "pattern", "4M", "rdelay=10"],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(1))).unwrap();
    let t = Instant::now();
    let mut b = vec![0u8; 4096];
    let e = src.read_at(&mut b, 0).unwrap_err().to_string();
    assert!(e.contains("no answer within 1 s"), "{e}");
    assert!(t.elapsed() < Duration::from_secs(6), "{:?}", t.elapsed());
}

#[test]
fn disconnect_is_polite() {
    if !have("nbdkit") {
        return;
    }
    // nbdkit -v logs the commands it receives: NBD_CMD_DISC must be among them.
    let d = tempdir();
    let listen = Listen::Unix(d.path().join("s.sock"));
    let log = d.path().join("log");
    let pid = d.path().join("nbdkit.pid");
    let mut c = Command::new("nbdkit");
    c.args(["-f", "-v", "--exit-with-parent", "-U"])
        .arg(d.path().join("s.sock"))
        .arg("-P")
        .arg(&pid)
        .args(["memory", "1M"])
        .stderr(fs::File::create(&log).unwrap());
    let srv = start(c, &pid, "nbdkit -v");
    let src = NbdSource::connect(&listen.addr(""), &opts(Duration::from_secs(30))).unwrap();
    let mut b = [0u8; 512];
    src.read_at(&mut b, 0).unwrap();
    drop(src);
    let t = Instant::now();
    loop {
        let text = fs::read_to_string(&log).unwrap_or_default();
        if text.contains("NBD_CMD_DISC") {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "no NBD_CMD_DISC in:\n{text}"
        );
        thread::sleep(Duration::from_millis(50));
    }
    drop(srv);
}

#[test]
fn requests_are_pipelined_on_one_connection() {
    if !have("nbdkit") {
        return;
    }
    // One connection only (no multi-conn), each read answered after 0.5 s: 8 reads
    // from 8 threads take about 0.5 s together if they are in flight at once, 4 s if not.
    let d = tempdir();
    let listen = Listen::Unix(d.path().join("s.sock"));
    let _srv = nbdkit(
        d.path(),
        &listen,
        &[
            "--filter=multi-conn",
            "--filter=delay",
            "pattern",
            "4M",
            "rdelay=500ms",
            "multi-conn-mode=disable",
        ],
    );
    let src =
        Arc::new(NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap());
    assert_eq!(src.connections(), 1);
    let t = Instant::now();
    let hs: Vec<_> = (0..8u64)
        .map(|i| {
            let src = src.clone();
            thread::spawn(move || {
                let mut b = vec![0u8; 4096];
                assert_eq!(src.read_at(&mut b, i * 65536).unwrap(), 4096);
                // The pattern plugin: each 8-byte word is its own offset.
                assert_eq!(&b[8..16], &(i * 65536 + 8).to_be_bytes());
            })
        })
        .collect();
    for h in hs {
        h.join().unwrap();
    }
    let took = t.elapsed();
    assert!(took < Duration::from_millis(2500), "{took:?}");
}

#[test]
fn sequential_reads_are_read_ahead() {
    if !have("nbdkit") {
        return;
    }
    // Every request takes 50 ms: 48 sequential reads of 128 KiB take 2.4 s one by one,
    // far less when the reads ahead are already requested.
    let d = tempdir();
    let listen = Listen::Unix(d.path().join("s.sock"));
    let _srv = nbdkit(
        d.path(),
        &listen,
        &["--filter=delay", "pattern", "8M", "rdelay=50ms"],
    );
    let src = NbdSource::connect(&listen.addr("exp"), &opts(Duration::from_secs(30))).unwrap();
    let t = Instant::now();
    let k = 128 * KIB;
    let mut b = vec![0u8; k as usize];
    for i in 0..48 {
        assert_eq!(src.read_at(&mut b, i * k).unwrap(), k as usize);
        for (w, word) in b.chunks_exact(8).enumerate().step_by(997) {
            assert_eq!(word, &(i * k + 8 * w as u64).to_be_bytes(), "read {i}");
        }
    }
    let took = t.elapsed();
    eprintln!("48 sequential reads in {took:?}");
    assert!(took < Duration::from_millis(1600), "{took:?}");
    // Random reads after it are still right.
    let mut rng = rand::rngs::StdRng::seed_from_u64(11);
    for _ in 0..20 {
        let off = rng.gen_range(0..8 * MIB - 4096) / 8 * 8;
        let mut b = vec![0u8; 4096];
        src.read_at(&mut b, off).unwrap();
        assert_eq!(&b[..8], &off.to_be_bytes());
    }
}
