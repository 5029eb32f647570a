//! No silent panics: every panic, on any thread, is written with its message, location
//! and thread to the log (the `--log-file` once the daemon detached) and to stderr
//! while the process still has one. What happens next is up to the code that catches
//! it: a stream worker's panic fails its job, a FUSE handler's panic answers EIO and the
//! mount keeps serving (see `fs::StreamFs::guard`); anything else ends the thread.

use std::sync::atomic::{AtomicBool, Ordering};

static LOG_IS_STDERR: AtomicBool = AtomicBool::new(true);

/// Installs the hook. `log_to_file`: the log goes to a file, so stderr gets its own copy.
pub fn install(log_to_file: bool) {
    LOG_IS_STDERR.store(!log_to_file, Ordering::Relaxed);
    std::panic::set_hook(Box::new(|info| {
        let msg = crate::jobs::panic_text(info.payload());
        let at = info
            .location()
            .map(|l| format!("{}:{}:{}", l.file(), l.line(), l.column()))
            .unwrap_or_else(|| "unknown location".into());
        let thread = std::thread::current();
        let name = thread.name().unwrap_or("unnamed");
        let line = format!("panic in thread '{name}' at {at}: {msg}");
        log::error!("{line}\n{}", std::backtrace::Backtrace::force_capture());
        if !LOG_IS_STDERR.load(Ordering::Relaxed) {
            eprintln!("streamfs: {line}");
        }
    }));
}
