//! `MOUNTPOINT/.events`: each open is a reader with its own cursor into the mount's
//! event bus. A read with nothing to deliver is parked (its reply kept, the session
//! thread freed) and answered when an event arrives; O_NONBLOCK reads get EAGAIN;
//! poll() notifies through the kernel's poll handle. Closing the bus (unmount) ends
//! every reader with end-of-file.

use std::collections::HashMap;
use std::sync::Arc;

use fuser::{Errno, PollNotifier, ReplyData};
use parking_lot::Mutex;

use crate::events::{Bus, Read};

struct Reader {
    cursor: u64,
    /// Reads waiting for an event: (reply, buffer size).
    parked: Vec<(ReplyData, u32)>,
    poll: Option<PollNotifier>,
}

#[derive(Clone)]
pub struct EventReaders {
    bus: Arc<Bus>,
    readers: Arc<Mutex<HashMap<u64, Reader>>>,
}

/// A reply to send once the readers' lock is released.
enum Answer {
    Data(ReplyData, Vec<u8>),
    Error(ReplyData, Errno),
}

impl Answer {
    fn send(self) {
        match self {
            Answer::Data(r, d) => r.data(&d),
            Answer::Error(r, e) => r.error(e),
        }
    }
}

impl EventReaders {
    /// Registers itself as the bus's waker.
    pub fn new(bus: Arc<Bus>) -> EventReaders {
        let me = EventReaders {
            bus: bus.clone(),
            readers: Arc::default(),
        };
        let waker = me.clone();
        bus.set_waker(Box::new(move || waker.wake()));
        me
    }

    pub fn open(&self, fh: u64) {
        let cursor = self.bus.subscribe();
        self.readers.lock().insert(
            fh,
            Reader {
                cursor,
                parked: Vec::new(),
                poll: None,
            },
        );
    }

    pub fn release(&self, fh: u64) {
        if let Some(r) = self.readers.lock().remove(&fh) {
            for (reply, _) in r.parked {
                reply.data(&[]);
            }
        }
    }

    /// What a read of `size` bytes at the reader's cursor gets now; None: wait.
    fn try_read(&self, r: &mut Reader, size: u32) -> Option<Result<Vec<u8>, Errno>> {
        match self.bus.read(r.cursor, size as usize) {
            Read::Lines(text, next) => {
                r.cursor = next;
                Some(Ok(text.into_bytes()))
            }
            Read::Closed => Some(Ok(Vec::new())),
            // As inotify does: a buffer too small for one whole event.
            Read::TooSmall => Some(Err(Errno::EINVAL)),
            Read::Empty => None,
        }
    }

    pub fn read(&self, fh: u64, size: u32, nonblocking: bool, reply: ReplyData) {
        let answer = {
            let mut readers = self.readers.lock();
            let Some(r) = readers.get_mut(&fh) else {
                return reply.error(Errno::EBADF);
            };
            match self.try_read(r, size) {
                Some(Ok(d)) => Answer::Data(reply, d),
                Some(Err(e)) => Answer::Error(reply, e),
                None if nonblocking => Answer::Error(reply, Errno::EAGAIN),
                None => {
                    r.parked.push((reply, size));
                    return;
                }
            }
        };
        answer.send();
    }

    /// poll(): readable now, or remember the handle and notify when it becomes so.
    pub fn poll(&self, fh: u64, notifier: PollNotifier, schedule: bool) -> Result<bool, Errno> {
        let mut readers = self.readers.lock();
        let r = readers.get_mut(&fh).ok_or(Errno::EBADF)?;
        if self.bus.readable(r.cursor) {
            return Ok(true);
        }
        if schedule {
            r.poll = Some(notifier);
        }
        Ok(false)
    }

    /// After a publish or at close: answers parked reads and fires poll handles.
    fn wake(&self) {
        let mut answers = Vec::new();
        let mut polls = Vec::new();
        {
            let mut readers = self.readers.lock();
            for r in readers.values_mut() {
                if !self.bus.readable(r.cursor) {
                    continue;
                }
                polls.extend(r.poll.take());
                let parked = std::mem::take(&mut r.parked);
                for (reply, size) in parked {
                    match self.try_read(r, size) {
                        Some(Ok(d)) => answers.push(Answer::Data(reply, d)),
                        Some(Err(e)) => answers.push(Answer::Error(reply, e)),
                        None => r.parked.push((reply, size)),
                    }
                }
            }
        }
        for a in answers {
            a.send();
        }
        for p in polls {
            if let Err(e) = p.notify() {
                log::debug!("poll notification: {e}");
            }
        }
    }
}
