//! The FUSE file system: a root directory holding one raw file per chain and `.control`.
//!
//! Threading: fuser 0.18 runs several session loops, each on its own cloned /dev/fuse fd
//! (`Config::n_threads` + `clone_fd`), and each loop calls into this `Sync` file system.
//! A request is served on the loop thread that received it, so a slow backing read holds
//! up only that loop while the others keep serving; that is the worker pool, without a
//! hand-off between threads on the hot path.
//!
//! Cache flags, chosen deliberately:
//! - raw files are opened with FOPEN_KEEP_CACHE: their contents change only through this
//!   mount (copy-on-read and streaming never change what a read returns), so the kernel
//!   page cache stays valid across opens. O_DIRECT opens (QEMU cache=none) bypass it.
//! - no FOPEN_DIRECT_IO for raw files: it would force every buffered reader through
//!   user space and break mmap; O_DIRECT users get direct I/O anyway.
//! - FOPEN_PARALLEL_DIRECT_WRITES: without it the kernel serializes direct writes to one
//!   file on the inode lock; we serialize per cluster ourselves.
//! - FUSE_ASYNC_DIO: lets one io_submit of several O_DIRECT requests (QEMU aio=native,
//!   fio libaio) reach us as parallel requests.
//! - max_write / max_readahead 1 MiB (FUSE_MAX_PAGES): fewer, larger requests for
//!   sequential I/O; the cost is per-loop buffers, which fuser allocates anyway.
//! - `.control` uses FOPEN_DIRECT_IO: its size is 0 and its contents are generated per open.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::fs::MetadataExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, INodeNo, InitFlags,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, ReplyAttr, ReplyData, ReplyDirectory,
    ReplyEmpty, ReplyEntry, ReplyLseek, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request,
    WriteFlags,
};
use parking_lot::Mutex;

mod events_file;

use self::events_file::EventReaders;
use crate::chain::Chain;
use crate::control;
use crate::events::{Bus, Failure, IoErrors};
use crate::jobs::Jobs;
use crate::Error;

const ROOT: u64 = 1;
const CONTROL: u64 = 2;
const EVENTS: u64 = 3;
const FIRST_CHAIN: u64 = 4;
pub const CONTROL_NAME: &str = ".control";
pub const EVENTS_NAME: &str = ".events";
/// Extended attribute on the root directory holding the daemon's pid.
pub const PID_XATTR: &str = "user.streamfs.pid";
const TTL: Duration = Duration::from_secs(1);
const MAX_IO: u32 = 1 << 20;

/// An open `.control`: the status taken at open, or the answer to the last command.
struct ControlHandle {
    status: Vec<u8>,
    answer: Option<(Vec<u8>, usize)>,
}

/// Owner, group and permission bits a raw file shows.
#[derive(Debug, Clone, Copy)]
struct Owner {
    uid: u32,
    gid: u32,
    perm: u16,
}

pub struct StreamFs {
    jobs: Arc<Jobs>,
    bus: Arc<Bus>,
    events: EventReaders,
    io_errors: Arc<IoErrors>,
    /// Per chain: taken from its leaf image file at mount, so with `--allow-other` the
    /// kernel (default_permissions) lets in exactly those who may use the leaf itself.
    owners: Vec<Owner>,
    handles: Mutex<HashMap<u64, ControlHandle>>,
    next_fh: AtomicU64,
    uid: u32,
    gid: u32,
    started: SystemTime,
}

/// The leaf's owner, group and read/write bits (never execute, setuid and the like); a
/// read-only mount drops the write bits. If the leaf cannot be stat'ed, only the mounting
/// user may read it.
fn leaf_owner(chain: &Chain, uid: u32, gid: u32) -> Owner {
    let path = chain.layers()[0].image.path().to_path_buf();
    match std::fs::metadata(&path) {
        Ok(m) => {
            let mut perm = (m.mode() & 0o666) as u16;
            if chain.read_only() {
                perm &= !0o222;
            }
            Owner {
                uid: m.uid(),
                gid: m.gid(),
                perm,
            }
        }
        Err(e) => {
            log::warn!(
                "{}: cannot stat {} ({e}); the raw file is mode 0400",
                chain.name(),
                path.display()
            );
            Owner {
                uid,
                gid,
                perm: 0o400,
            }
        }
    }
}

fn errno(e: &Error) -> Errno {
    Errno::from_i32(e.errno())
}

thread_local! {
    /// Per-loop read buffer: avoids a large allocation (and its page faults) per request.
    static READ_BUF: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

impl StreamFs {
    pub fn new(jobs: Arc<Jobs>, io_errors: Arc<IoErrors>) -> StreamFs {
        // SAFETY: getuid/getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let bus = jobs.bus().clone();
        let owners = jobs
            .chains()
            .iter()
            .map(|c| leaf_owner(c, uid, gid))
            .collect();
        StreamFs {
            events: EventReaders::new(bus.clone()),
            bus,
            io_errors,
            jobs,
            owners,
            handles: Mutex::new(HashMap::new()),
            next_fh: AtomicU64::new(1),
            uid,
            gid,
            started: SystemTime::now(),
        }
    }

    fn chain(&self, ino: INodeNo) -> Option<&Arc<Chain>> {
        let i = ino.0.checked_sub(FIRST_CHAIN)?;
        self.jobs.chains().get(i as usize)
    }

    fn attr(&self, ino: u64) -> Option<FileAttr> {
        let (kind, perm, size, nlink) = match ino {
            ROOT => (FileType::Directory, 0o755, 0, 2),
            CONTROL => (FileType::RegularFile, 0o600, 0, 1),
            EVENTS => (FileType::RegularFile, 0o400, 0, 1),
            _ => {
                let c = self.chain(INodeNo(ino))?;
                (FileType::RegularFile, 0, c.size(), 1)
            }
        };
        let owner = match ino {
            ROOT | CONTROL | EVENTS => Owner {
                uid: self.uid,
                gid: self.gid,
                perm,
            },
            _ => *self.owners.get((ino - FIRST_CHAIN) as usize)?,
        };
        Some(FileAttr {
            ino: INodeNo(ino),
            size,
            blocks: size.div_ceil(512),
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm: owner.perm,
            nlink,
            uid: owner.uid,
            gid: owner.gid,
            rdev: 0,
            blksize: 4096,
            flags: 0,
        })
    }

    /// Runs a request handler. A panic in it is caught: the request is answered EIO (the
    /// reply, dropped unsent while unwinding, answers EIO by itself), the panic hook has
    /// logged the message and location, and this session loop goes on serving. Metadata
    /// stays consistent because every change is committed under its lock in one step.
    fn guard(&self, op: &str, f: impl FnOnce()) {
        if let Err(p) = std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
            log::error!(
                "FUSE {op} handler panicked ({}); answered EIO, still serving",
                crate::jobs::panic_text(&*p)
            );
        }
    }

    /// An error answered to a guest request: logged, and an `io-error` event.
    fn io_error(&self, chain: &Chain, op: &'static str, off: u64, len: u64, e: &Error) {
        if e.errno() == libc::EIO {
            log::error!("{}: {op} {len}@{off}: {e}", chain.name());
        }
        let why = e.to_string();
        let f = Failure {
            op,
            off,
            len,
            errno: e.errno(),
            why: &why,
        };
        self.io_errors.report(&self.bus, chain.name(), f);
    }

    fn control_write(&self, fh: u64, data: &[u8]) -> Result<(), Error> {
        let result = control::parse_command(data).and_then(|cmd| control::execute(&self.jobs, cmd));
        let answer = match &result {
            Ok(()) => "ok\n".to_string(),
            Err(e) => format!("error: {e}\n"),
        };
        if let Some(h) = self.handles.lock().get_mut(&fh) {
            h.answer = Some((answer.into_bytes(), 0));
        }
        result
    }
}

impl Filesystem for StreamFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        let _ = config.set_max_write(MAX_IO);
        if let Err(max) = config.set_max_readahead(MAX_IO) {
            let _ = config.set_max_readahead(max);
        }
        for flag in [InitFlags::FUSE_ASYNC_DIO, InitFlags::FUSE_ATOMIC_O_TRUNC] {
            if config.add_capabilities(flag).is_err() {
                log::debug!("kernel lacks {flag:?}");
            }
        }
        let _ = config.set_max_background(64);
        Ok(())
    }

    fn destroy(&mut self) {
        self.bus.close();
        self.jobs.shutdown();
        for c in self.jobs.chains() {
            if let Err(e) = c.flush_all() {
                log::error!("{}: final flush failed: {e}", c.name());
            }
            c.close_sources();
        }
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        self.guard("lookup", move || {
            if parent.0 != ROOT {
                return reply.error(Errno::ENOENT);
            }
            let ino = if name == CONTROL_NAME {
                Some(CONTROL)
            } else if name == EVENTS_NAME {
                Some(EVENTS)
            } else {
                self.jobs
                    .chains()
                    .iter()
                    .position(|c| OsStr::new(c.name()) == name)
                    .map(|i| FIRST_CHAIN + i as u64)
            };
            match ino.and_then(|i| self.attr(i)) {
                Some(a) => reply.entry(&TTL, &a, fuser::Generation(0)),
                None => reply.error(Errno::ENOENT),
            }
        })
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        self.guard("getattr", move || match self.attr(ino.0) {
            Some(a) => reply.attr(&TTL, &a),
            None => reply.error(Errno::ENOENT),
        })
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        self.guard("setattr", move || {
            let Some(attr) = self.attr(ino.0) else {
                return reply.error(Errno::ENOENT);
            };
            // `.control` accepts the truncation of `echo cmd > .control`; disks cannot be
            // resized (but truncating to their own size is harmless).
            if let Some(s) = size {
                if ino.0 != CONTROL && s != attr.size {
                    return reply.error(Errno::EPERM);
                }
            }
            reply.attr(&TTL, &attr)
        })
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        self.guard("open", move || {
            let writing = flags.acc_mode() != OpenAccMode::O_RDONLY;
            if ino.0 == CONTROL {
                let status = control::render(&self.jobs.status()).into_bytes();
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.handles.lock().insert(
                    fh,
                    ControlHandle {
                        status,
                        answer: None,
                    },
                );
                return reply.opened(FileHandle(fh), FopenFlags::FOPEN_DIRECT_IO);
            }
            if ino.0 == EVENTS {
                // Read-only, even for root (whom default_permissions lets past 0400).
                if writing {
                    return reply.error(Errno::EACCES);
                }
                let fh = self.next_fh.fetch_add(1, Ordering::Relaxed);
                self.events.open(fh);
                return reply.opened(
                    FileHandle(fh),
                    FopenFlags::FOPEN_DIRECT_IO | FopenFlags::FOPEN_NONSEEKABLE,
                );
            }
            let Some(chain) = self.chain(ino) else {
                return reply.error(Errno::ENOENT);
            };
            if writing && chain.read_only() {
                return reply.error(Errno::EROFS);
            }
            // O_TRUNC is ignored, as a block device ignores it: a disk has a fixed size
            // (so `qemu-img convert -O raw ... MOUNT/disk.raw` and `dd` work).
            reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_KEEP_CACHE | FopenFlags::FOPEN_PARALLEL_DIRECT_WRITES,
            )
        })
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        self.guard("read", move || {
            if ino.0 == EVENTS {
                let nonblocking = flags.0 & libc::O_NONBLOCK != 0;
                return self.events.read(fh.0, size, nonblocking, reply);
            }
            if ino.0 == CONTROL {
                // Copy out under the lock, reply outside it.
                let bytes = {
                    let mut handles = self.handles.lock();
                    let Some(h) = handles.get_mut(&fh.0) else {
                        return reply.error(Errno::EBADF);
                    };
                    // After a write, reads return the answer (from its start, whatever the
                    // file position); otherwise the status taken at open.
                    if let Some((answer, pos)) = &mut h.answer {
                        let end = (*pos + size as usize).min(answer.len());
                        let b = answer[*pos..end].to_vec();
                        *pos = end;
                        b
                    } else {
                        let start = (offset as usize).min(h.status.len());
                        let end = (start + size as usize).min(h.status.len());
                        h.status[start..end].to_vec()
                    }
                };
                return reply.data(&bytes);
            }
            let Some(chain) = self.chain(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let _io = chain.guest_io();
            crate::fault::panic_point("fuse-read-panic");
            READ_BUF.with(|b| {
                let mut buf = b.borrow_mut();
                if buf.len() < size as usize {
                    buf.resize(size as usize, 0);
                }
                match chain.read(offset, &mut buf[..size as usize]) {
                    Ok(n) => {
                        // Copy-on-read writes to the leaf too.
                        self.jobs.after_write(chain);
                        reply.data(&buf[..n])
                    }
                    Err(e) => {
                        self.io_error(chain, "read", offset, size.into(), &e);
                        reply.error(errno(&e))
                    }
                }
            })
        })
    }

    fn write(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        self.guard("write", move || {
            if ino.0 == CONTROL {
                return match self.control_write(fh.0, data) {
                    Ok(()) => reply.written(data.len() as u32),
                    Err(e) => {
                        log::debug!("control: {e}");
                        reply.error(errno(&e))
                    }
                };
            }
            if ino.0 == EVENTS {
                return reply.error(Errno::EBADF);
            }
            let Some(chain) = self.chain(ino) else {
                return reply.error(Errno::ENOENT);
            };
            let _io = chain.guest_io();
            match chain.write(offset, data) {
                Ok(n) => {
                    self.jobs.after_write(chain);
                    reply.written(n as u32)
                }
                Err(e) => {
                    self.io_error(chain, "write", offset, data.len() as u64, &e);
                    reply.error(errno(&e))
                }
            }
        })
    }

    fn flush(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        self.guard("flush", move || {
            // close(): write back metadata (and released refcounts) so a consumer that
            // closes the file and then inspects the leaf, or unmounts, finds it consistent.
            if let Some(chain) = self.chain(ino) {
                if let Err(e) = chain.flush_all() {
                    self.io_error(chain, "flush", 0, 0, &e);
                    return reply.error(errno(&e));
                }
            }
            reply.ok()
        })
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("release", move || {
            if ino.0 == CONTROL {
                self.handles.lock().remove(&fh.0);
            } else if ino.0 == EVENTS {
                self.events.release(fh.0);
            }
            reply.ok()
        })
    }

    fn fsync(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.guard("fsync", move || {
            let Some(chain) = self.chain(ino) else {
                return reply.ok();
            };
            let _io = chain.guest_io();
            match chain.flush() {
                Ok(()) => {
                    self.jobs.after_write(chain);
                    reply.ok()
                }
                Err(e) => {
                    self.io_error(chain, "flush", 0, 0, &e);
                    reply.error(errno(&e))
                }
            }
        })
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        self.guard("readdir", move || {
            if ino.0 != ROOT {
                return reply.error(Errno::ENOTDIR);
            }
            let mut entries = vec![
                (ROOT, FileType::Directory, ".".to_string()),
                (ROOT, FileType::Directory, "..".to_string()),
                (CONTROL, FileType::RegularFile, CONTROL_NAME.to_string()),
                (EVENTS, FileType::RegularFile, EVENTS_NAME.to_string()),
            ];
            for (i, c) in self.jobs.chains().iter().enumerate() {
                entries.push((
                    FIRST_CHAIN + i as u64,
                    FileType::RegularFile,
                    c.name().to_string(),
                ));
            }
            for (i, (ino, kind, name)) in entries.into_iter().enumerate().skip(offset as usize) {
                if reply.add(INodeNo(ino), i as u64 + 1, kind, &name) {
                    break;
                }
            }
            reply.ok()
        })
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let total: u64 = self.jobs.chains().iter().map(|c| c.size()).sum();
        let files = self.jobs.chains().len() as u64 + 1;
        reply.statfs(total.div_ceil(4096), 0, 0, files, 0, 4096, 255, 4096)
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        if ino.0 != ROOT || name != PID_XATTR {
            return reply.error(Errno::ENODATA);
        }
        let value = std::process::id().to_string();
        if size == 0 {
            reply.size(value.len() as u32)
        } else if (size as usize) < value.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(value.as_bytes())
        }
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names: &[u8] = if ino.0 == ROOT {
            b"user.streamfs.pid\0"
        } else {
            b""
        };
        if size == 0 {
            reply.size(names.len() as u32)
        } else if (size as usize) < names.len() {
            reply.error(Errno::ERANGE)
        } else {
            reply.data(names)
        }
    }

    fn access(&self, _req: &Request, _ino: INodeNo, _mask: fuser::AccessFlags, reply: ReplyEmpty) {
        reply.ok()
    }

    fn fallocate(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        self.guard("fallocate", move || {
            let Some(chain) = self.chain(ino) else {
                return reply.error(Errno::EOPNOTSUPP);
            };
            let _io = chain.guest_io();
            let punch = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
            let result = if mode == punch
                || mode == libc::FALLOC_FL_ZERO_RANGE
                || mode == libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE
            {
                chain.write_zeroes(offset, length)
            } else if mode == 0 || mode == libc::FALLOC_FL_KEEP_SIZE {
                // Preallocation within the disk: every block is already backed.
                if offset.saturating_add(length) > chain.size() && mode == 0 {
                    Err(Error::state(libc::EFBIG, "disk cannot grow"))
                } else {
                    Ok(())
                }
            } else {
                Err(Error::state(libc::EOPNOTSUPP, "fallocate mode"))
            };
            match result {
                Ok(()) => {
                    self.jobs.after_write(chain);
                    reply.ok()
                }
                Err(e) => {
                    if e.errno() != libc::EOPNOTSUPP {
                        self.io_error(chain, "discard", offset, length, &e);
                    }
                    reply.error(errno(&e))
                }
            }
        })
    }

    fn lseek(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: i64,
        whence: i32,
        reply: ReplyLseek,
    ) {
        self.guard("lseek", move || {
            let Some(chain) = self.chain(ino) else {
                return reply.error(Errno::EINVAL);
            };
            if offset < 0 {
                return reply.error(Errno::ENXIO);
            }
            let data = match whence {
                libc::SEEK_DATA => true,
                libc::SEEK_HOLE => false,
                _ => return reply.error(Errno::EINVAL),
            };
            match chain.seek(offset as u64, data) {
                Ok(Some(o)) => reply.offset(o as i64),
                Ok(None) => reply.error(Errno::ENXIO),
                Err(e) => reply.error(errno(&e)),
            }
        })
    }

    fn poll(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        ph: fuser::PollNotifier,
        _events: fuser::PollEvents,
        flags: fuser::PollFlags,
        reply: fuser::ReplyPoll,
    ) {
        self.guard("poll", move || {
            use fuser::PollEvents as P;
            if ino.0 != EVENTS {
                return reply.poll(P::POLLIN | P::POLLOUT);
            }
            let schedule = flags.contains(fuser::PollFlags::FUSE_POLL_SCHEDULE_NOTIFY);
            match self.events.poll(fh.0, ph, schedule) {
                Ok(true) => reply.poll(P::POLLIN | P::POLLRDNORM),
                Ok(false) => reply.poll(P::empty()),
                Err(e) => reply.error(e),
            }
        })
    }

    /// No ioctls: isatty() and friends get ENOTTY, quietly (Python asks on every open).
    fn ioctl(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _flags: fuser::IoctlFlags,
        _cmd: u32,
        _in_data: &[u8],
        _out_size: u32,
        reply: fuser::ReplyIoctl,
    ) {
        reply.error(Errno::ENOTTY)
    }
}
