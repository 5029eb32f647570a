//! Real image servers for remote-backing tests: qemu-nbd, nbdkit and nginx, started by the
//! test on 127.0.0.1 or a unix socket, killed in `Drop` (also when the test panicked).

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::environment::skip_or_fail;
use super::processes::wait_until;

/// A port nobody listens on right now (bound, then released).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// True if `prog` can be run; otherwise skip (or fail under CI=true) with a reason.
pub fn require_program(prog: &str) -> bool {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {prog}")])
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !found {
        skip_or_fail(&format!("{prog} is not installed (.ci/run installs it)"));
    }
    found
}

/// Where a server listens.
#[derive(Clone, Debug)]
pub enum Listen {
    Tcp(u16),
    Unix(PathBuf),
}

impl Listen {
    fn ready(&self) -> bool {
        match self {
            Listen::Tcp(p) => TcpStream::connect(("127.0.0.1", *p)).is_ok(),
            Listen::Unix(s) => std::os::unix::net::UnixStream::connect(s).is_ok(),
        }
    }
    /// An NBD URI for `export` on this address.
    pub fn nbd_uri(&self, export: &str) -> String {
        match self {
            Listen::Tcp(p) => format!("nbd://127.0.0.1:{p}/{export}"),
            Listen::Unix(s) => format!("nbd+unix:///{export}?socket={}", s.display()),
        }
    }
}

/// A server process that can be stopped and started again on the same address.
pub struct Server {
    what: String,
    command: Vec<String>,
    pub listen: Listen,
    child: Option<Child>,
}

impl Server {
    /// Starts `command` and waits until `listen` accepts connections.
    pub fn start(what: &str, command: Vec<String>, listen: Listen) -> Server {
        let mut s = Server {
            what: what.to_string(),
            command,
            listen,
            child: None,
        };
        s.restart();
        s
    }

    /// Starts the server again (after `stop`).
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} is already running", self.what);
        if let Listen::Unix(p) = &self.listen {
            let _ = std::fs::remove_file(p);
        }
        let child = Command::new(&self.command[0])
            .args(&self.command[1..])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", self.what));
        self.child = Some(child);
        let up = wait_until(|| self.listen.ready(), Duration::from_secs(20));
        assert!(
            up,
            "{} did not start listening: {:?}",
            self.what, self.command
        );
    }

    /// Kills the server (SIGKILL: as a crash or a lost link looks to the client).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn nbd_uri(&self, export: &str) -> String {
        self.listen.nbd_uri(export)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.stop();
    }
}

fn args(a: &[&str]) -> Vec<String> {
    a.iter().map(|s| s.to_string()).collect()
}

/// `qemu-nbd` exporting `file` read-only as export `exp`, bytes as they are (`-f raw`:
/// a qcow2 file is served as its qcow2 bytes; `-f qcow2`: as the disk it holds).
pub fn qemu_nbd(file: &Path, fmt: &str, listen: Listen) -> Server {
    let mut cmd = args(&["qemu-nbd", "-r", "-t", "-e", "8", "-x", "exp", "-f", fmt]);
    match &listen {
        Listen::Tcp(p) => cmd.extend(args(&["-b", "127.0.0.1", "-p", &p.to_string()])),
        Listen::Unix(s) => cmd.extend(args(&["-k", &s.display().to_string()])),
    }
    cmd.push(file.display().to_string());
    Server::start("qemu-nbd", cmd, listen)
}

/// `nbdkit` with `rest` (filters, plugin, parameters), foreground, serving any export name.
pub fn nbdkit(listen: Listen, rest: &[&str]) -> Server {
    let mut cmd = args(&["nbdkit", "-f", "--exit-with-parent", "-r"]);
    match &listen {
        Listen::Tcp(p) => cmd.extend(args(&["-i", "127.0.0.1", "-p", &p.to_string()])),
        Listen::Unix(s) => cmd.extend(args(&["-U", &s.display().to_string()])),
    }
    cmd.extend(args(rest));
    Server::start("nbdkit", cmd, listen)
}

/// Where Debian's nginx(-light) lives (root's PATH has /usr/sbin, a user's may not).
pub const NGINX: &str = "/usr/sbin/nginx";

/// Modules a packaging leaves out of nginx (nginx-light: proxy, fastcgi, ...): their temp
/// path directives would not parse.
fn nginx_lacks(module: &str) -> bool {
    let out = Command::new(NGINX).arg("-V").output().expect("nginx -V");
    let text = String::from_utf8_lossy(&out.stderr).into_owned();
    text.contains(&format!("--without-http_{module}_module"))
}

/// nginx serving `root` on 127.0.0.1:`port`; `extra` goes into the server block.
pub fn nginx(dir: &Path, root: &Path, port: u16, extra: &str) -> Server {
    let conf = dir.join(format!("nginx-{port}.conf"));
    let d = dir.display();
    let mut temp = format!("client_body_temp_path {d}/nx-body;\n");
    for m in ["proxy", "fastcgi", "uwsgi", "scgi"] {
        if !nginx_lacks(m) {
            temp += &format!("  {m}_temp_path {d}/nx-{m};\n");
        }
    }
    let text = format!(
        "daemon off;\nmaster_process off;\nworker_processes 1;\npid {d}/nginx-{port}.pid;\n\
         error_log {d}/nginx-{port}.err warn;\nevents {{ worker_connections 256; }}\n\
         http {{\n  access_log off;\n  {temp}  default_type application/octet-stream;\n\
         server {{\n    listen 127.0.0.1:{port};\n    root {};\n    {extra}\n  }}\n}}\n",
        root.display()
    );
    std::fs::write(&conf, text).expect("nginx config");
    let err = format!("{d}/nginx-{port}.err");
    let cmd = args(&[NGINX, "-e", &err, "-c", &conf.display().to_string()]);
    Server::start("nginx", cmd, Listen::Tcp(port))
}
