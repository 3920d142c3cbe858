//! Where time limits are enforced: task timeouts, the hard memory limit
//! (polled while tasks run), and the grace a closing worker gets to exit;
//! and the nearest such deadline, which the supervisor thread sleeps
//! towards.

use std::time::{Duration, Instant};

use super::event_loop::Engine;
use crate::platform;
use crate::task::KillReason;

/// A worker that closed its channel but was not reported dead by then is killed.
const EXIT_GRACE: Duration = Duration::from_secs(2);
const MEMORY_POLL: Duration = Duration::from_millis(20);

impl Engine {
    pub fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        self.next_deadline()
            .map(|t| t.saturating_duration_since(now))
    }

    /// Records when the supervisor thread will next wake on its own.
    pub fn set_sleep(&mut self, timeout: Option<Duration>) {
        self.sleep_until = timeout.map(|t| Instant::now() + t);
    }

    /// True when a caller's change created a deadline earlier than the
    /// supervisor thread's planned wake-up: it must be woken to re-plan.
    pub fn needs_wake(&self) -> bool {
        match (self.next_deadline(), self.sleep_until) {
            (Some(next), Some(planned)) => next < planned,
            (Some(_), None) => true,
            (None, _) => self.shutting_down,
        }
    }

    /// The nearest of: a running task's time limit, a closing worker's exit
    /// grace, a muted channel's latest read, the next memory poll, the end
    /// of a start-failure back-off.
    fn next_deadline(&self) -> Option<Instant> {
        let mut next: Option<Instant> = self.backoff.respawn_at();
        let mut consider = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        let mut memory_watch = false;
        for w in self.workers.values() {
            if let Some((deadline, _)) = w.deadline(self.cfg.task_timeout) {
                consider(deadline);
            }
            if let Some(closed) = w.state.closing_since() {
                consider(closed + EXIT_GRACE);
            }
            if let Some(t) = w.quiet_until {
                consider(t);
            }
            if w.state.running().is_some() && self.cfg.max_memory.is_some() {
                memory_watch = true;
            }
        }
        if memory_watch {
            consider(self.last_memory_poll + MEMORY_POLL);
        }
        next
    }

    /// Kills workers past a deadline: a task's time limit, the exit grace,
    /// or (polled) the hard memory limit while a task runs.
    pub(super) fn check_timers(&mut self) {
        let now = Instant::now();
        self.read_due(now);
        let hard = self
            .cfg
            .max_memory
            .map(|m| (m as f64 * self.cfg.hard_memory_factor) as u64);
        let poll_memory = hard.is_some() && now >= self.last_memory_poll + MEMORY_POLL;
        if poll_memory {
            self.last_memory_poll = now;
        }
        let default_timeout = self.cfg.task_timeout;
        for w in self.workers.values_mut() {
            if let Some((deadline, limit)) = w.deadline(default_timeout) {
                if now >= deadline {
                    w.kill(KillReason::Timeout { limit });
                }
            }
            if let Some(closed) = w.state.closing_since() {
                if now >= closed + EXIT_GRACE {
                    w.kill(KillReason::Shutdown);
                }
            }
            if let (true, Some(limit), Some(pid)) = (poll_memory, hard, w.pid) {
                if w.state.running().is_some() {
                    if let Some(rss) = platform::resident_bytes(pid) {
                        if rss > limit {
                            w.kill(KillReason::Memory { rss, limit });
                        }
                    }
                }
            }
        }
    }
}
