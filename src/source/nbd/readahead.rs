//! Sequential readahead: after two reads in a row that continue each other, the next
//! window past the last read is requested before it is asked for, and the reads that
//! fall inside it are served from it. Only on a connection already up; whatever goes
//! wrong with a window (lost connection, timeout) sends the read the ordinary way.

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

use parking_lot::Mutex;

use super::conn::{Conn, Ticket};
use super::reply::Answer;

/// Size of one readahead window (rounded to the block sizes).
pub const WINDOW: u64 = 2 << 20;
/// Windows kept (served or in flight).
const KEPT: usize = 3;

enum Fill {
    Sent(Arc<Conn>, Ticket),
    Ready(Arc<Vec<u8>>),
    Failed,
}

struct Window {
    off: u64,
    len: u64,
    fill: Mutex<Fill>,
}

struct State {
    /// Where the last read ended, and how many reads in a row ended where the next
    /// began.
    next: u64,
    streak: u32,
    windows: VecDeque<Arc<Window>>,
}

pub struct Readahead {
    state: Mutex<State>,
}

impl Readahead {
    pub fn new() -> Readahead {
        Readahead {
            state: Mutex::new(State {
                next: u64::MAX,
                streak: 0,
                windows: VecDeque::new(),
            }),
        }
    }

    /// Copies [off, off+n) into `buf` from a window that holds it all, waiting for the
    /// window if it is still in flight. False when no window serves it.
    pub fn serve(&self, buf: &mut [u8], off: u64, deadline: Instant) -> bool {
        let n = buf.len() as u64;
        let w = {
            let st = self.state.lock();
            st.windows
                .iter()
                .find(|w| w.off <= off && off + n <= w.off + w.len)
                .cloned()
        };
        let Some(w) = w else { return false };
        let data = {
            // Another reader may be waiting for this window: not past our deadline.
            let wait = deadline.saturating_duration_since(Instant::now());
            let Some(mut f) = w.fill.try_lock_for(wait) else {
                return false;
            };
            if let Fill::Sent(..) = &*f {
                let Fill::Sent(c, t) = std::mem::replace(&mut *f, Fill::Failed) else {
                    return false;
                };
                if let Ok(Answer::Data(d)) = c.wait(t, deadline) {
                    if d.len() as u64 == w.len {
                        *f = Fill::Ready(Arc::new(d));
                    }
                }
            }
            match &*f {
                Fill::Ready(d) => d.clone(),
                _ => return false,
            }
        };
        let at = (off - w.off) as usize;
        buf.copy_from_slice(&data[at..at + n as usize]);
        true
    }

    /// Notes a read of [off, off+n); returns the window to request next, if the reads
    /// are sequential and the windows in hand reach less than a window ahead.
    pub fn after_read(&self, off: u64, n: u64) -> Option<u64> {
        let mut st = self.state.lock();
        let sequential = off == st.next;
        st.streak = if sequential {
            st.streak.saturating_add(1)
        } else {
            0
        };
        let end = off + n;
        st.next = end;
        if sequential {
            // Windows behind the reads are done with.
            st.windows.retain(|w| w.off + w.len > off);
        }
        if st.streak < 2 {
            return None;
        }
        // How far the windows in hand continue from `end`.
        let mut reach = end;
        for _ in 0..KEPT {
            match st
                .windows
                .iter()
                .find(|w| w.off <= reach && reach < w.off + w.len)
            {
                Some(w) => reach = w.off + w.len,
                None => break,
            }
        }
        (reach - end < WINDOW).then_some(reach)
    }

    /// Records a window requested at `off` for `len` bytes.
    pub fn add(&self, off: u64, len: u64, c: Arc<Conn>, t: Ticket) {
        let mut st = self.state.lock();
        if st.windows.len() >= KEPT {
            st.windows.pop_front();
        }
        st.windows.push_back(Arc::new(Window {
            off,
            len,
            fill: Mutex::new(Fill::Sent(c, t)),
        }));
    }

    pub fn clear(&self) {
        let mut st = self.state.lock();
        st.windows.clear();
        st.streak = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_sequential_streaks_read_ahead() {
        let ra = Readahead::new();
        let k = 128 << 10;
        assert_eq!(ra.after_read(0, k), None);
        assert_eq!(ra.after_read(k, k), None);
        assert_eq!(ra.after_read(2 * k, k), Some(3 * k));
        assert_eq!(ra.after_read(3 * k, k), Some(4 * k), "no window was added");
        // A jump ends the streak.
        assert_eq!(ra.after_read(100 * k, k), None);
        assert_eq!(ra.after_read(101 * k, k), None);
        assert_eq!(ra.after_read(102 * k, k), Some(103 * k));
        // Backwards is not sequential.
        assert_eq!(ra.after_read(102 * k, k), None);
        ra.clear();
        assert_eq!(ra.after_read(103 * k, k), None);
    }

    #[test]
    fn nothing_to_serve_without_windows() {
        let ra = Readahead::new();
        let mut b = [0u8; 16];
        assert!(!ra.serve(&mut b, 0, Instant::now()));
    }
}
