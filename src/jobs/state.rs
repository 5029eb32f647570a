//! A job's life as an explicit state machine: every transition is listed in `next`, so
//! what a command or a worker may do in each state is decided in one place (the shape of
//! QEMU's job.c transition table). The phase lives under the job's one lock (`job.rs`).

/// What `.control` shows for a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobState {
    Idle,
    Queued,
    Running,
    Paused,
    Completed,
    Cancelled,
    Failed,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Idle => "idle",
            JobState::Queued => "queued",
            JobState::Running => "running",
            JobState::Paused => "paused",
            JobState::Completed => "completed",
            JobState::Cancelled => "cancelled",
            JobState::Failed => "failed",
        }
    }
    pub fn is_active(self) -> bool {
        matches!(
            self,
            JobState::Queued | JobState::Running | JobState::Paused
        )
    }
}

/// Where a job is, finer than what it shows: a pause or cancel takes effect only once
/// the workers have stopped, and completion only once it has been proven.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Accepted, waiting for a slot (`--max-jobs`).
    Queued,
    /// Workers copying.
    Running,
    /// Pause requested; some workers are still finishing a piece.
    Pausing,
    /// Every live worker is parked.
    Paused,
    /// Cancel requested; workers are stopping.
    Cancelling,
    /// A worker failed; the others are stopping.
    Failing,
    /// Workers returned success: proving the range complete, then relinking.
    Finalizing,
    Completed,
    Cancelled,
    Failed,
}

/// What can happen to a job.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A slot became free for a queued job.
    Dequeue,
    Pause,
    /// The last live worker parked (or ended) while pausing.
    Parked,
    Resume,
    Cancel,
    /// A worker failed or panicked.
    Error,
    /// Every worker has returned.
    WorkersEnded,
    /// The final scan found the range complete and the link was rewritten.
    Proven,
}

impl Phase {
    /// What `.control` shows. A job keeps showing `running` until the workers really
    /// stopped (pausing), or until the outcome is settled (cancelling, finalizing).
    pub fn shown(self) -> JobState {
        match self {
            Phase::Queued => JobState::Queued,
            Phase::Running | Phase::Pausing | Phase::Cancelling | Phase::Failing => {
                JobState::Running
            }
            Phase::Finalizing => JobState::Running,
            Phase::Paused => JobState::Paused,
            Phase::Completed => JobState::Completed,
            Phase::Cancelled => JobState::Cancelled,
            Phase::Failed => JobState::Failed,
        }
    }

    pub fn is_terminal(self) -> bool {
        matches!(self, Phase::Completed | Phase::Cancelled | Phase::Failed)
    }

    /// Workers must stop copying (for good) in this phase.
    pub fn stopping(self) -> bool {
        matches!(self, Phase::Cancelling | Phase::Failing) || self.is_terminal()
    }

    /// Workers must park in this phase.
    pub fn parking(self) -> bool {
        matches!(self, Phase::Pausing | Phase::Paused)
    }
}

/// The transition table: the phase after `ev` in `p`, or why `ev` is refused there.
pub fn next(p: Phase, ev: Event) -> Result<Phase, &'static str> {
    use Event as E;
    use Phase as P;
    Ok(match (p, ev) {
        (P::Queued, E::Dequeue) => P::Running,
        // A queued job has no workers: a cancel ends it at once.
        (P::Queued, E::Cancel) => P::Cancelled,
        (P::Queued, E::Pause | E::Resume) => return Err("the job is queued"),
        (P::Running, E::Pause) => P::Pausing,
        (P::Pausing | P::Paused, E::Pause) => p,
        (P::Pausing, E::Parked) => P::Paused,
        (P::Running | P::Paused, E::Parked) => p,
        (P::Pausing | P::Paused | P::Running, E::Resume) => P::Running,
        (P::Running | P::Pausing | P::Paused | P::Cancelling, E::Cancel) => P::Cancelling,
        (P::Running | P::Pausing | P::Paused | P::Cancelling | P::Failing, E::Error) => P::Failing,
        (P::Finalizing, E::Error) => P::Failed,
        (P::Running | P::Pausing | P::Paused, E::WorkersEnded) => P::Finalizing,
        (P::Cancelling, E::WorkersEnded) => P::Cancelled,
        (P::Failing, E::WorkersEnded) => P::Failed,
        (P::Finalizing, E::Proven) => P::Completed,
        (P::Cancelling | P::Failing | P::Finalizing, E::Pause | E::Resume) => {
            return Err("the job is finishing")
        }
        (P::Failing | P::Finalizing, E::Cancel) => return Err("the job is finishing"),
        (P::Completed | P::Cancelled | P::Failed, _) => return Err("the job has ended"),
        _ => return Err("not possible in this state"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PHASES: [Phase; 10] = [
        Phase::Queued,
        Phase::Running,
        Phase::Pausing,
        Phase::Paused,
        Phase::Cancelling,
        Phase::Failing,
        Phase::Finalizing,
        Phase::Completed,
        Phase::Cancelled,
        Phase::Failed,
    ];
    const EVENTS: [Event; 8] = [
        Event::Dequeue,
        Event::Pause,
        Event::Parked,
        Event::Resume,
        Event::Cancel,
        Event::Error,
        Event::WorkersEnded,
        Event::Proven,
    ];

    #[test]
    fn completed_is_reached_only_by_proof_after_the_workers_ended() {
        for p in PHASES {
            for e in EVENTS {
                if next(p, e) == Ok(Phase::Completed) {
                    assert_eq!((p, e), (Phase::Finalizing, Event::Proven));
                }
            }
        }
        // The only way into Finalizing is every worker having returned.
        for p in PHASES {
            for e in EVENTS {
                if next(p, e) == Ok(Phase::Finalizing) {
                    assert_eq!(e, Event::WorkersEnded, "{p:?}");
                }
            }
        }
    }

    #[test]
    fn an_error_always_wins_and_terminal_states_are_final() {
        for p in PHASES {
            if p.is_terminal() {
                for e in EVENTS {
                    assert!(next(p, e).is_err(), "{p:?} {e:?}");
                }
            } else if p != Phase::Finalizing && p != Phase::Queued {
                assert_eq!(next(p, Event::Error), Ok(Phase::Failing), "{p:?}");
                assert_eq!(next(Phase::Failing, Event::WorkersEnded), Ok(Phase::Failed));
            }
        }
        assert_eq!(next(Phase::Finalizing, Event::Error), Ok(Phase::Failed));
        assert!(next(Phase::Failing, Event::Cancel).is_err());
    }

    #[test]
    fn pause_shows_paused_only_once_parked() {
        let p = next(Phase::Running, Event::Pause).unwrap();
        assert_eq!(p.shown(), JobState::Running);
        let p = next(p, Event::Parked).unwrap();
        assert_eq!(p.shown(), JobState::Paused);
        assert_eq!(next(p, Event::Resume), Ok(Phase::Running));
        // Cancel of a paused job stops it (cancelled once the workers ended).
        let p = next(p, Event::Cancel).unwrap();
        assert_eq!(next(p, Event::WorkersEnded), Ok(Phase::Cancelled));
    }
}
