//! The HTTP(S) byte source against a real nginx, started by each test on 127.0.0.1 with
//! a generated config in a tempdir (everything it writes stays there) and killed by a
//! guard. Without nginx (or openssl, for HTTPS) a test is skipped with a message, or
//! fails when CI=true.

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use streamfs::source::http::HttpSource;
use streamfs::source::uri::{self, Location};
use streamfs::source::{RemoteOptions, Source};

const NGINX: &str = "/usr/sbin/nginx";

/// Whether a tool this test needs is there; if not, skip (or fail under CI).
fn have(tool: &str, path: &str) -> bool {
    if Path::new(path).exists() {
        return true;
    }
    if std::env::var("CI").as_deref() == Ok("true") {
        panic!("{tool} ({path}) is needed by this test and missing");
    }
    eprintln!("SKIPPED: {tool} ({path}) is not installed");
    false
}

/// Deterministic bytes (xorshift), no two 8-byte words alike in practice.
fn pattern(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = Vec::with_capacity(len + 8);
    while v.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.extend_from_slice(&x.to_le_bytes());
    }
    v.truncate(len);
    v
}

/// An odd size: 1 MiB and a bit.
const LEN: usize = (1 << 20) + 12_345;

struct Tls {
    cert: PathBuf,
    key: PathBuf,
    /// The CA that signed `cert`, for `RemoteOptions::ca_file`.
    ca: PathBuf,
}

/// One nginx, serving `dir/www`. Stopped (killed) on drop.
struct Nginx {
    dir: tempfile::TempDir,
    port: u16,
    tls: bool,
    child: Mutex<Option<Child>>,
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local addr").port()
}

/// Modules a packaging may leave out of nginx; their temp path directives would not parse.
fn compiled_out(module: &str) -> bool {
    let out = Command::new(NGINX).arg("-V").output().expect("nginx -V");
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    text.contains(&format!("--without-http_{module}_module"))
}

impl Nginx {
    fn new(tls: Option<&Tls>) -> Nginx {
        let dir = tempfile::tempdir().expect("tempdir");
        let d = dir.path();
        for sub in ["www/norange", "tmp"] {
            std::fs::create_dir_all(d.join(sub)).expect("mkdir");
        }
        let port = free_port();
        let p = |s: &str| d.join(s).display().to_string();
        let mut temp = String::new();
        for (directive, module) in [
            ("client_body_temp_path", None),
            ("proxy_temp_path", Some("proxy")),
            ("fastcgi_temp_path", Some("fastcgi")),
            ("uwsgi_temp_path", Some("uwsgi")),
            ("scgi_temp_path", Some("scgi")),
        ] {
            if module.is_some_and(compiled_out) {
                continue;
            }
            temp += &format!("    {directive} {};\n", p(&format!("tmp/{directive}")));
        }
        let (listen, ssl) = match tls {
            Some(t) => (
                format!("127.0.0.1:{port} ssl"),
                format!(
                    "ssl_certificate {};\n        ssl_certificate_key {};",
                    t.cert.display(),
                    t.key.display()
                ),
            ),
            None => (format!("127.0.0.1:{port}"), String::new()),
        };
        let conf = format!(
            "daemon off;
master_process off;
worker_processes 1;
pid {pid};
error_log {err} info;
events {{ worker_connections 512; }}
http {{
    log_format t '$connection $connection_requests $status \"$request\" im=$http_if_match';
    access_log {acc} t;
{temp}    default_type application/octet-stream;
    keepalive_requests 100000;
    server {{
        listen {listen};
        {ssl}
        root {www};
        location /norange/ {{ max_ranges 0; }}
        location = /moved {{ return 302 /data.bin; }}
        location = /loop {{ return 302 /loop; }}
        location = /busy {{ return 503; }}
        location = /slow-down {{ return 429; }}
        location = /forbidden {{ return 403; }}
        location /slow/ {{ alias {www}/; limit_rate 256k; }}
    }}
}}
",
            pid = p("nginx.pid"),
            err = p("error.log"),
            acc = p("access.log"),
            www = p("www"),
        );
        std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
        let data = pattern(LEN, 1);
        std::fs::write(d.join("www/data.bin"), &data).expect("write data");
        std::fs::write(d.join("www/norange/data.bin"), &data).expect("write data");
        std::fs::write(d.join("www/empty.bin"), b"").expect("write empty");
        let n = Nginx {
            dir,
            port,
            tls: tls.is_some(),
            child: Mutex::new(None),
        };
        n.start();
        n
    }

    fn path(&self, rel: &str) -> PathBuf {
        self.dir.path().join(rel)
    }

    fn url(&self, path: &str) -> url::Url {
        let scheme = if self.tls { "https" } else { "http" };
        let name = format!("{scheme}://127.0.0.1:{}{path}", self.port);
        match uri::parse_remote(&name) {
            Some(Ok(Location::Http(u))) => u,
            other => panic!("{name} parsed as {other:?}"),
        }
    }

    fn error_log(&self) -> String {
        std::fs::read_to_string(self.path("error.log")).unwrap_or_default()
    }

    /// Starts nginx and waits until it accepts connections.
    fn start(&self) {
        let mut slot = self.child.lock().unwrap();
        assert!(slot.is_none(), "nginx already running");
        let d = self.dir.path();
        let mut child = Command::new(NGINX)
            .arg("-p")
            .arg(d)
            .arg("-e")
            .arg(d.join("error.log"))
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn nginx");
        let t0 = Instant::now();
        loop {
            if TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                break;
            }
            if let Ok(Some(status)) = child.try_wait() {
                panic!("nginx exited ({status}):\n{}", self.error_log());
            }
            if t0.elapsed() > Duration::from_secs(10) {
                let _ = child.kill();
                let _ = child.wait();
                panic!("nginx did not listen within 10 s:\n{}", self.error_log());
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        *slot = Some(child);
    }

    /// Kills nginx (connections drop at once) and reaps it.
    fn stop(&self) {
        if let Some(mut child) = self.child.lock().unwrap_or_else(|e| e.into_inner()).take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.stop();
    }
}

fn opts(timeout: Duration) -> RemoteOptions {
    RemoteOptions {
        timeout,
        ca_file: None,
    }
}

fn open(n: &Nginx, path: &str, o: &RemoteOptions) -> HttpSource {
    HttpSource::open(&n.url(path), o)
        .unwrap_or_else(|e| panic!("open {path}: {e}\n{}", n.error_log()))
}

fn open_err(n: &Nginx, path: &str, o: &RemoteOptions) -> streamfs::Error {
    match HttpSource::open(&n.url(path), o) {
        Ok(s) => panic!("open {path} succeeded ({} bytes)", s.size()),
        Err(e) => {
            eprintln!("open {path}: {e}");
            e
        }
    }
}

fn check_read(src: &dyn Source, data: &[u8], off: u64, len: usize) {
    let mut buf = vec![0xAAu8; len];
    let n = src
        .read_at(&mut buf, off)
        .unwrap_or_else(|e| panic!("read {len} at {off}: {e}"));
    let avail = data.len().saturating_sub(off as usize).min(len);
    assert_eq!(n, avail, "count for {len} at {off}");
    if avail > 0 {
        assert!(
            buf[..n] == data[off as usize..off as usize + n],
            "data for {len} at {off}"
        );
    }
    assert!(
        buf[n..].iter().all(|&b| b == 0),
        "zeros past the end for {len} at {off}"
    );
}

#[test]
fn reads_match_the_file_and_zeros_past_its_end() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/data.bin", &opts(Duration::from_secs(10)));
    assert_eq!(src.size(), LEN as u64);
    assert_eq!(src.name(), n.url("/data.bin").as_str());
    assert!(src.is_remote());
    let end = LEN as u64;
    for (off, len) in [
        (0, 1),
        (1, 4095),
        (4097, 3),
        (12_345, 65_537),
        (777_777, 300_001),
        (0, LEN),
        (end - 10, 10),
        (end - 1, 1),
        // Past the end: the count says how much came from the object.
        (end - 30, 100),
        (end - 1, 4096),
        (end, 512),
        (end + 5, 512),
        (u64::MAX - 10, 8),
        (5, 0),
    ] {
        check_read(&src, &data, off, len);
    }
    src.close();
    let e = src.read_at(&mut [0u8; 4], 0).unwrap_err();
    assert_eq!(e.errno(), libc::EIO, "{e}");
}

#[test]
fn concurrent_reads_from_many_threads() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = Arc::new(pattern(LEN, 1));
    let src = Arc::new(open(&n, "/data.bin", &opts(Duration::from_secs(20))));
    std::thread::scope(|s| {
        for t in 0..12u64 {
            let (src, data) = (src.clone(), data.clone());
            s.spawn(move || {
                let mut x = pattern(16 * 60, t + 7);
                for i in 0..60 {
                    let r = u64::from_le_bytes(x[i * 16..i * 16 + 8].try_into().unwrap());
                    let l = u64::from_le_bytes(x[i * 16 + 8..i * 16 + 16].try_into().unwrap());
                    let off = r % (LEN as u64 + 100);
                    let len = 1 + (l % 70_000) as usize;
                    check_read(&*src, &data, off, len);
                }
                x.clear();
            });
        }
    });
    // Keep-alive: the requests shared far fewer connections, and each carried If-Match.
    let log = std::fs::read_to_string(n.path("access.log")).unwrap_or_default();
    let reads: Vec<&str> = log.lines().filter(|l| l.contains(" 206 ")).collect();
    assert!(reads.len() >= 12 * 60, "access log: {} reads", reads.len());
    let conns: std::collections::HashSet<&str> =
        reads.iter().filter_map(|l| l.split(' ').next()).collect();
    assert!(
        conns.len() <= 12 * 60 / 4,
        "{} connections for {} reads",
        conns.len(),
        reads.len()
    );
    assert!(
        reads[1..].iter().all(|l| !l.ends_with("im=-")),
        "a read without If-Match"
    );
}

#[test]
fn reads_run_in_parallel() {
    if !have("nginx", NGINX) {
        return;
    }
    // nginx sends each reply at 256 KiB/s: six reads of 128 KiB take half a second
    // side by side, three one after the other.
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/slow/data.bin", &opts(Duration::from_secs(20)));
    let t0 = Instant::now();
    std::thread::scope(|s| {
        for i in 0..6u64 {
            let (src, data) = (&src, &data);
            s.spawn(move || check_read(src, data, i * 150_001, 128 << 10));
        }
    });
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(300),
        "not rate limited? {took:?}"
    );
    assert!(took < Duration::from_secs(2), "reads in series? {took:?}");
}

#[test]
fn empty_object() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let src = open(&n, "/empty.bin", &opts(Duration::from_secs(10)));
    assert_eq!(src.size(), 0);
    check_read(&src, &[], 0, 100);
}

#[test]
fn missing_object_fails_at_open() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let e = open_err(&n, "/missing.bin", &opts(Duration::from_secs(10)));
    let m = e.to_string();
    assert!(m.contains("404") && m.contains("/missing.bin"), "{m}");
    assert_eq!(e.errno(), libc::EIO);
}

#[test]
fn answers_fail_at_once_and_overload_is_retried() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let o = opts(Duration::from_millis(1500));
    let t0 = Instant::now();
    let e = open_err(&n, "/forbidden", &o);
    assert!(e.to_string().contains("403"), "{e}");
    let e = open_err(&n, "/loop", &o);
    assert!(e.to_string().contains("redirect"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(1),
        "answers are not retried"
    );
    for path in ["/busy", "/slow-down"] {
        let t0 = Instant::now();
        let e = open_err(&n, path, &o);
        let took = t0.elapsed();
        let m = e.to_string();
        assert!(m.contains("no answer within 1.5 s"), "{m}");
        assert!(
            m.contains(if path == "/busy" { "503" } else { "429" }),
            "{m}"
        );
        assert!(
            took >= Duration::from_millis(1400),
            "gave up after {took:?}"
        );
        assert!(took < Duration::from_secs(4), "gave up after {took:?}");
    }
    // Tried again with backoff (50, 100, 200, 400, 800 ms): a handful, not hundreds.
    let log = std::fs::read_to_string(n.path("access.log")).unwrap_or_default();
    let tries = log.lines().filter(|l| l.contains("GET /busy ")).count();
    assert!((4..=8).contains(&tries), "{tries} tries");
}

#[test]
fn server_ignoring_ranges_fails_at_open() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let e = open_err(&n, "/norange/data.bin", &opts(Duration::from_secs(10)));
    assert!(
        e.to_string().contains("does not support byte ranges"),
        "{e}"
    );
}

#[test]
fn redirect_is_followed() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/moved", &opts(Duration::from_secs(10)));
    assert_eq!(src.size(), LEN as u64);
    check_read(&src, &data, 99_999, 123_457);
    let log = std::fs::read_to_string(n.path("access.log")).unwrap_or_default();
    assert!(log.contains("/moved") && log.contains(" 302 "), "{log}");
}

#[test]
fn replaced_object_fails_reads() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/data.bin", &opts(Duration::from_secs(10)));
    check_read(&src, &data, 1000, 5000);
    // New content of the same size, a new mtime: a new ETag.
    let tmp = n.path("www/data.bin.new");
    std::fs::write(&tmp, pattern(LEN, 2)).unwrap();
    let f = std::fs::File::options().write(true).open(&tmp).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(100))
        .unwrap();
    drop(f);
    std::fs::rename(&tmp, n.path("www/data.bin")).unwrap();
    let t0 = Instant::now();
    let e = src.read_at(&mut vec![0u8; 5000], 1000).unwrap_err();
    eprintln!("{e}");
    assert!(
        e.to_string()
            .contains("the object changed since it was opened"),
        "{e}"
    );
    assert_eq!(e.errno(), libc::EIO);
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "an answer is not retried"
    );
}

#[test]
fn stopped_server_fails_reads_after_the_timeout() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/data.bin", &opts(Duration::from_secs(2)));
    check_read(&src, &data, 0, 4096);
    n.stop();
    let t0 = Instant::now();
    let e = src.read_at(&mut [0u8; 4096], 8192).unwrap_err();
    let took = t0.elapsed();
    eprintln!("after {took:?}: {e}");
    assert!(e.to_string().contains("no answer within 2 s"), "{e}");
    assert_eq!(e.errno(), libc::EIO);
    assert!(
        took >= Duration::from_millis(1900),
        "gave up after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
}

#[test]
fn silent_server_fails_reads_after_the_timeout() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/data.bin", &opts(Duration::from_secs(2)));
    check_read(&src, &data, 0, 4096);
    n.stop();
    // Something takes the port that accepts connections (the kernel does, from the
    // backlog) and never answers: each request's time outs must end with the read's.
    let _silent = TcpListener::bind(("127.0.0.1", n.port)).expect("bind nginx's port");
    let t0 = Instant::now();
    let e = src.read_at(&mut [0u8; 4096], 8192).unwrap_err();
    let took = t0.elapsed();
    eprintln!("after {took:?}: {e}");
    assert!(e.to_string().contains("no answer within 2 s"), "{e}");
    assert!(
        took >= Duration::from_millis(1900),
        "gave up after {took:?}"
    );
    assert!(took < Duration::from_secs(5), "gave up after {took:?}");
}

#[test]
fn server_restarted_within_the_timeout() {
    if !have("nginx", NGINX) {
        return;
    }
    let n = Nginx::new(None);
    let data = pattern(LEN, 1);
    let src = open(&n, "/data.bin", &opts(Duration::from_secs(15)));
    check_read(&src, &data, 0, 4096);
    n.stop();
    let t0 = Instant::now();
    std::thread::scope(|s| {
        s.spawn(|| {
            std::thread::sleep(Duration::from_millis(800));
            n.start();
        });
        check_read(&src, &data, 54_321, 65_536);
    });
    let took = t0.elapsed();
    assert!(
        took >= Duration::from_millis(800),
        "read before the restart? {took:?}"
    );
    assert!(took < Duration::from_secs(10), "{took:?}");
}

/// A CA and a certificate it signed for 127.0.0.1, made with openssl.
fn make_tls(dir: &Path) -> Tls {
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .current_dir(dir)
            .output()
            .expect("run openssl");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let mut a = vec!["req", "-x509"];
    a.extend(ec);
    a.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2"]);
    a.extend(["-subj", "/CN=streamfs test CA"]);
    run(&a);
    let mut a = vec!["req"];
    a.extend(ec);
    a.extend([
        "-keyout",
        "leaf.key",
        "-out",
        "leaf.csr",
        "-subj",
        "/CN=127.0.0.1",
    ]);
    run(&a);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\n\
         extendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "leaf.pem",
        "-days",
        "2",
        "-extfile",
        "leaf.ext",
    ]);
    Tls {
        cert: dir.join("leaf.pem"),
        key: dir.join("leaf.key"),
        ca: dir.join("ca.pem"),
    }
}

#[test]
fn https_with_and_without_the_ca_file() {
    if !have("nginx", NGINX) || !have("openssl", "/usr/bin/openssl") {
        return;
    }
    let certs = tempfile::tempdir().unwrap();
    let tls = make_tls(certs.path());
    let n = Nginx::new(Some(&tls));
    let data = pattern(LEN, 1);
    let with_ca = RemoteOptions {
        timeout: Duration::from_secs(10),
        ca_file: Some(tls.ca.clone()),
    };
    let src = open(&n, "/data.bin", &with_ca);
    assert_eq!(src.size(), LEN as u64);
    check_read(&src, &data, 3, 200_000);
    check_read(&src, &data, LEN as u64 - 7, 100);

    let t0 = Instant::now();
    let e = open_err(&n, "/data.bin", &opts(Duration::from_secs(10)));
    assert!(e.to_string().to_lowercase().contains("certificate"), "{e}");
    assert!(
        t0.elapsed() < Duration::from_secs(5),
        "a refused certificate is not retried"
    );

    let bad = RemoteOptions {
        timeout: Duration::from_secs(10),
        ca_file: Some(certs.path().join("leaf.key")),
    };
    let e = open_err(&n, "/data.bin", &bad);
    assert!(e.to_string().contains("no PEM certificate"), "{e}");
}

/// A scripted HTTP server for the faults nginx does not make: one request per
/// connection (`Connection: close`), answered by `reply(request number, first, last)`
/// with the raw bytes to send (the connection closes after them).
struct Scripted {
    port: u16,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

type Reply = dyn Fn(usize, u64, u64) -> Vec<u8> + Send + Sync;

impl Scripted {
    fn new(reply: Box<Reply>) -> Scripted {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        l.set_nonblocking(true).unwrap();
        let port = l.local_addr().unwrap().port();
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::spawn(move || {
            let mut count = 0;
            while !stop2.load(Ordering::Relaxed) {
                let mut c = match l.accept() {
                    Ok((c, _)) => c,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(5));
                        continue;
                    }
                };
                c.set_nonblocking(false).unwrap();
                c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut req = Vec::new();
                let mut b = [0u8; 1024];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&b[..n]),
                    }
                }
                let req = String::from_utf8_lossy(&req).to_lowercase();
                let range = req
                    .lines()
                    .find_map(|l| l.strip_prefix("range: bytes="))
                    .and_then(|r| r.trim().split_once('-'))
                    .and_then(|(a, b)| Some((a.parse().ok()?, b.parse().ok()?)));
                let (first, last) = range.unwrap_or((0, u64::MAX));
                let _ = c.write_all(&reply(count, first, last));
                count += 1;
            }
        });
        Scripted {
            port,
            stop,
            thread: Some(thread),
        }
    }

    fn url(&self) -> url::Url {
        url::Url::parse(&format!("http://127.0.0.1:{}/obj", self.port)).unwrap()
    }
}

impl Drop for Scripted {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        // A scripted server that panicked would make the client's errors meaningless.
        if let Some(t) = self.thread.take() {
            if t.join().is_err() && !std::thread::panicking() {
                panic!("the scripted HTTP server panicked");
            }
        }
    }
}

/// A 206 for bytes `first..=last` of `obj`, with `etag`, whose body holds only `send` bytes.
fn partial(
    obj: &[u8],
    first: u64,
    last: u64,
    etag: &str,
    cr: Option<String>,
    send: usize,
) -> Vec<u8> {
    let body = &obj[first as usize..=last as usize];
    let cr = cr.unwrap_or_else(|| format!("bytes {first}-{last}/{}", obj.len()));
    let mut r = format!(
        "HTTP/1.1 206 Partial Content\r\nContent-Range: {cr}\r\nContent-Length: {}\r\n\
         ETag: {etag}\r\nConnection: close\r\n\r\n",
        body.len()
    )
    .into_bytes();
    r.extend_from_slice(&body[..send.min(body.len())]);
    r
}

#[test]
fn dropped_connection_mid_body_is_retried() {
    let obj = Arc::new(pattern(100_000, 3));
    let o2 = obj.clone();
    let served = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let served2 = served.clone();
    // Request 0 is the open; request 1 breaks off after 1000 bytes; the rest are whole.
    let s = Scripted::new(Box::new(move |n, f, l| {
        served2.store(n + 1, std::sync::atomic::Ordering::SeqCst);
        let send = if n == 1 { 1000 } else { usize::MAX };
        partial(&o2, f, l, "\"v1\"", None, send)
    }));
    let src = HttpSource::open(&s.url(), &opts(Duration::from_secs(10))).expect("open");
    assert_eq!(src.size(), 100_000);
    check_read(&src, &obj, 5000, 20_000);
    assert_eq!(
        served.load(std::sync::atomic::Ordering::SeqCst),
        3,
        "requests served"
    );
}

#[test]
fn wrong_content_range_or_etag_in_a_reply_fails() {
    let obj = Arc::new(pattern(100_000, 3));
    let o2 = obj.clone();
    // The open, then: another range than asked, another total, another ETag (a server
    // that ignores If-Match), a body longer than the range.
    let s = Scripted::new(Box::new(move |n, f, l| match n {
        0 => partial(&o2, f, l, "\"v1\"", None, usize::MAX),
        1 => partial(
            &o2,
            f,
            l,
            "\"v1\"",
            Some(format!("bytes {}-{}/100000", f + 1, l + 1)),
            usize::MAX,
        ),
        2 => partial(
            &o2,
            f,
            l,
            "\"v1\"",
            Some(format!("bytes {f}-{l}/100001")),
            usize::MAX,
        ),
        3 => partial(&o2, f, l, "\"v2\"", None, usize::MAX),
        _ => partial(
            &o2,
            f,
            l + 1,
            "\"v1\"",
            Some(format!("bytes {f}-{l}/100000")),
            usize::MAX,
        ),
    }));
    let src = HttpSource::open(&s.url(), &opts(Duration::from_secs(10))).expect("open");
    let mut buf = vec![0u8; 100];
    let t0 = Instant::now();
    let mut errs = Vec::new();
    for _ in 0..4 {
        let e = src.read_at(&mut buf, 10).unwrap_err();
        eprintln!("{e}");
        errs.push(e.to_string());
    }
    assert!(
        errs[0].contains("asked for bytes 10-109, got 11-110"),
        "{}",
        errs[0]
    );
    assert!(
        errs[1].contains("changed since it was opened"),
        "{}",
        errs[1]
    );
    assert!(
        errs[2].contains("changed since it was opened") && errs[2].contains("\"v2\""),
        "{}",
        errs[2]
    );
    assert!(errs[3].contains("more than"), "{}", errs[3]);
    assert!(
        t0.elapsed() < Duration::from_secs(3),
        "answers are not retried"
    );
}
