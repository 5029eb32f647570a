//! File I/O through the mount: bounded reads and comparisons, random and concurrent
//! checked preads, fallocate, O_DIRECT, SEEK_DATA / SEEK_HOLE.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::ops::Range;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use super::environment::{IO_TIMEOUT, KIB, MIB};
use super::processes::with_timeout;
use super::{Rng, SeedableRng, StdRng};

/// Reads a whole file (bounded by [`IO_TIMEOUT`]).
pub fn read_file(path: &Path) -> Vec<u8> {
    let p = path.to_path_buf();
    with_timeout(&format!("read {path:?}"), IO_TIMEOUT, move || {
        fs::read(&p).unwrap_or_else(|e| panic!("read {p:?}: {e}"))
    })
}

/// Index of the first differing byte (or the shorter length if one is a prefix).
pub fn first_mismatch(a: &[u8], b: &[u8]) -> Option<usize> {
    a.iter()
        .zip(b)
        .position(|(x, y)| x != y)
        .or_else(|| (a.len() != b.len()).then(|| a.len().min(b.len())))
}

/// Asserts `got == want`, reporting lengths and the first mismatch instead of the buffers.
pub fn assert_bytes_eq(what: &str, got: &[u8], want: &[u8]) {
    if let Some(i) = first_mismatch(got, want) {
        let show = |b: &[u8]| {
            let end = (i + 16).min(b.len());
            format!("{:02x?}", &b[i.min(b.len())..end])
        };
        panic!(
            "{what}: differs at byte {i} (got len {}, want len {}); got {} want {}",
            got.len(),
            want.len(),
            show(got),
            show(want)
        );
    }
}

/// A random read `(offset, len)` biased towards interesting places: cluster and sector
/// boundaries (± a few bytes), the end of file and beyond it.
pub fn random_read(rng: &mut StdRng, size: u64, cluster: u64) -> (u64, usize) {
    let cluster = cluster.max(512);
    let max_len = (3 * cluster).clamp(64 * KIB, MIB);
    let off = match rng.gen_range(0..10) {
        0..=3 => {
            let k = rng.gen_range(0..=size / cluster);
            (k * cluster).saturating_add_signed(rng.gen_range(-3i64..=3))
        }
        4 => {
            let k = rng.gen_range(0..=size / 512);
            (k * 512).saturating_add_signed(rng.gen_range(-1i64..=1))
        }
        5 => size.saturating_sub(rng.gen_range(0..=2 * cluster)),
        6 => size + rng.gen_range(0..=2 * cluster),
        _ => rng.gen_range(0..size.max(1)),
    };
    let len = match rng.gen_range(0..6) {
        0 => rng.gen_range(1..=16),
        1 => 512,
        2 => cluster.min(MIB) as usize,
        _ => rng.gen_range(1..=max_len as usize),
    };
    (off, len)
}

/// One `pread` checked against `reference` like a regular file of `reference.len()` bytes:
/// a single call returns exactly the bytes before EOF (0 at or past EOF).
pub fn check_pread(file: &File, reference: &[u8], off: u64, len: usize) -> Result<(), String> {
    let size = reference.len() as u64;
    let want =
        &reference[off.min(size) as usize..(off.saturating_add(len as u64)).min(size) as usize];
    let mut buf = vec![0u8; len];
    let n = file
        .read_at(&mut buf, off)
        .map_err(|e| format!("pread(off={off}, len={len}) failed: {e}"))?;
    if n != want.len() {
        return Err(format!(
            "pread(off={off}, len={len}) returned {n} bytes, a regular file of {size} bytes returns {}",
            want.len()
        ));
    }
    match first_mismatch(&buf[..n], want) {
        Some(i) => Err(format!(
            "pread(off={off}, len={len}): wrong data at file offset {} (got {:#04x}, want {:#04x})",
            off + i as u64,
            buf[i],
            want[i]
        )),
        None => Ok(()),
    }
}

/// `count` random preads of `path` (see [`random_read`]) checked against `reference`;
/// panics with the seed on the first mismatch. Bounded by [`IO_TIMEOUT`].
pub fn check_random_preads(
    path: &Path,
    reference: Arc<[u8]>,
    cluster: u64,
    count: usize,
    seed: u64,
) {
    let p = path.to_path_buf();
    let err = with_timeout(
        &format!("random preads of {path:?}"),
        IO_TIMEOUT,
        move || {
            let file = File::open(&p).map_err(|e| format!("open {p:?}: {e}"))?;
            let mut rng = StdRng::seed_from_u64(seed);
            let size = reference.len() as u64;
            for i in 0..count {
                let (off, len) = random_read(&mut rng, size, cluster);
                check_pread(&file, &reference, off, len).map_err(|e| format!("read #{i}: {e}"))?;
            }
            Ok::<(), String>(())
        },
    );
    if let Err(e) = err {
        panic!("{path:?}: {e} (seed {seed})");
    }
}

/// `threads` threads doing random preads of `path` for `duration`, every read checked
/// against `reference`. Odd threads share one descriptor; even threads use O_DIRECT on
/// their own descriptor (aligned reads) to bypass the page cache. Returns the number of
/// reads done; panics with the seed on any mismatch.
pub fn check_concurrent_preads(
    path: &Path,
    reference: Arc<[u8]>,
    cluster: u64,
    threads: usize,
    duration: Duration,
    seed: u64,
) -> u64 {
    let p = path.to_path_buf();
    let result = with_timeout("concurrent preads", duration + IO_TIMEOUT, move || {
        let shared = Arc::new(File::open(&p).map_err(|e| format!("open {p:?}: {e}"))?);
        let deadline = Instant::now() + duration;
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let reference = reference.clone();
                let shared = shared.clone();
                let p = p.clone();
                thread::spawn(move || -> Result<u64, String> {
                    let mut rng = StdRng::seed_from_u64(seed.wrapping_add(t as u64));
                    let size = reference.len() as u64;
                    let direct = t % 2 == 0;
                    let own = if direct {
                        Some(open_direct(&p).map_err(|e| format!("O_DIRECT open: {e}"))?)
                    } else {
                        None
                    };
                    let mut n = 0u64;
                    while Instant::now() < deadline {
                        if let Some(f) = &own {
                            let (off, len) = random_read(&mut rng, size, cluster);
                            let off = off / 4096 * 4096;
                            let len = len.div_ceil(4096) * 4096;
                            check_direct_pread(f, &reference, off, len)
                        } else {
                            let (off, len) = random_read(&mut rng, size, cluster);
                            check_pread(&shared, &reference, off, len)
                        }
                        .map_err(|e| format!("thread {t}: {e}"))?;
                        n += 1;
                    }
                    Ok(n)
                })
            })
            .collect();
        let mut total = 0;
        for h in handles {
            total += h
                .join()
                .map_err(|_| "reader thread panicked".to_string())??;
        }
        Ok::<u64, String>(total)
    });
    match result {
        Ok(n) => n,
        Err(e) => panic!("{path:?}: {e} (seed {seed})"),
    }
}

/// `fallocate` mode that punches a hole (the file size is kept).
pub const PUNCH: i32 = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;

/// `fallocate` mode that zeroes a range.
pub const ZERO_RANGE: i32 = libc::FALLOC_FL_ZERO_RANGE;

/// `fallocate(2)` of `len` bytes at `off` of `file` with `mode` ([`PUNCH`], [`ZERO_RANGE`]).
pub fn fallocate(file: &File, mode: i32, off: u64, len: u64) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    let r = unsafe {
        libc::fallocate(
            file.as_raw_fd(),
            mode,
            off as libc::off_t,
            len as libc::off_t,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Opens `path` read-write (buffered; the file must exist).
pub fn open_rw(path: &Path) -> io::Result<File> {
    OpenOptions::new().read(true).write(true).open(path)
}

/// Opens `path` read-only with O_DIRECT.
pub fn open_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// Opens `path` read-write with O_DIRECT.
pub fn open_rw_direct(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .write(true)
        .custom_flags(libc::O_DIRECT)
        .open(path)
}

/// A zeroed buffer of `len` bytes whose start is aligned to `align` (for O_DIRECT).
pub struct AlignedBuf {
    storage: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    pub fn new(len: usize, align: usize) -> AlignedBuf {
        let storage = vec![0u8; len + align];
        let start = storage.as_ptr().align_offset(align);
        AlignedBuf {
            storage,
            start,
            len,
        }
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.storage[self.start..self.start + self.len]
    }
}

impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.storage[self.start..self.start + self.len]
    }
}

/// One aligned O_DIRECT pread checked like [`check_pread`].
pub fn check_direct_pread(
    file: &File,
    reference: &[u8],
    off: u64,
    len: usize,
) -> Result<(), String> {
    let size = reference.len() as u64;
    let want =
        &reference[off.min(size) as usize..(off.saturating_add(len as u64)).min(size) as usize];
    let mut buf = AlignedBuf::new(len, 4096);
    let n = file
        .read_at(&mut buf, off)
        .map_err(|e| format!("O_DIRECT pread(off={off}, len={len}) failed: {e}"))?;
    if n != want.len() {
        return Err(format!(
            "O_DIRECT pread(off={off}, len={len}) returned {n} bytes, want {}",
            want.len()
        ));
    }
    match first_mismatch(&buf[..n], want) {
        Some(i) => Err(format!(
            "O_DIRECT pread(off={off}, len={len}): wrong data at file offset {}",
            off + i as u64
        )),
        None => Ok(()),
    }
}

/// Reads the whole file with O_DIRECT in aligned `chunk`-byte reads (chunk a multiple of
/// 4 KiB), until a short read; bounded by [`IO_TIMEOUT`].
pub fn read_file_direct(path: &Path, chunk: usize) -> Vec<u8> {
    assert!(chunk.is_multiple_of(4096) && chunk > 0);
    let p = path.to_path_buf();
    with_timeout(&format!("O_DIRECT read {path:?}"), IO_TIMEOUT, move || {
        let f = open_direct(&p).unwrap_or_else(|e| panic!("open {p:?} with O_DIRECT: {e}"));
        let mut buf = AlignedBuf::new(chunk, 4096);
        let mut out = Vec::new();
        loop {
            let n = f
                .read_at(&mut buf, out.len() as u64)
                .unwrap_or_else(|e| panic!("O_DIRECT read {p:?} at {}: {e}", out.len()));
            out.extend_from_slice(&buf[..n]);
            if n < chunk {
                break;
            }
        }
        out
    })
}

fn lseek(file: &File, off: u64, whence: i32) -> io::Result<u64> {
    use std::os::fd::AsRawFd;
    let r = unsafe { libc::lseek(file.as_raw_fd(), off as libc::off_t, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// `lseek(fd, off, SEEK_DATA)`; `Ok(None)` for ENXIO (no data at or after `off`).
pub fn seek_data(file: &File, off: u64) -> io::Result<Option<u64>> {
    match lseek(file, off, libc::SEEK_DATA) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        r => r.map(Some),
    }
}

/// `lseek(fd, off, SEEK_HOLE)`; `Ok(None)` for ENXIO (`off` at or past EOF).
pub fn seek_hole(file: &File, off: u64) -> io::Result<Option<u64>> {
    match lseek(file, off, libc::SEEK_HOLE) {
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => Ok(None),
        r => r.map(Some),
    }
}

/// The data extents of a file of `size` bytes as SEEK_DATA/SEEK_HOLE report them.
pub fn data_extents_by_seek(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    let mut out = Vec::new();
    let mut off = 0;
    while off < size {
        let Some(data) = seek_data(file, off)? else {
            break;
        };
        let hole = seek_hole(file, data)?.ok_or_else(|| {
            io::Error::other(format!("SEEK_HOLE({data}) after SEEK_DATA gave ENXIO"))
        })?;
        if hole <= data || hole > size {
            return Err(io::Error::other(format!(
                "SEEK_DATA({off})={data} then SEEK_HOLE({data})={hole} (size {size})"
            )));
        }
        out.push(data..hole);
        off = hole;
    }
    Ok(out)
}
