//! Where a worker's results are read in bursts: quiet batches.
//!
//! A worker running a `Batch` of tiny tasks finishes one every few
//! microseconds. Woken by each result's write, the reader (the supervisor
//! thread or a caller driving the engine) spent a context switch per task,
//! and more time being woken than reading. So when several tasks go out in
//! one frame, the worker's channel is muted (its data no longer wakes
//! anyone; a hang-up still does) and the frame asks the worker to ring its
//! doorbell after every `ring_every` results and after the last. Each
//! result is still written to the socket the moment it exists, so a crash
//! loses none (the exit path reads the socket before it settles the
//! worker's tasks) and log records stay in order before their results.
//!
//! A single task sent to a muted channel goes as a one-task batch that asks
//! for a ring (one with descriptors cannot: it unmutes the channel). The
//! worker also rings when it runs out of tasks, and the reader reads a
//! muted channel whenever its doorbell rings, before a time limit is
//! enforced on it, and at the latest `QUIET_POLL` after it last did; then,
//! if the worker holds no task, or has not rung by then (a task that was
//! expected to be tiny runs long), the channel is unmuted, so results are
//! never held back by more than that (epoll's millisecond timeouts round
//! it up to 3 ms).

use std::time::{Duration, Instant};

use super::event_loop::Engine;
use crate::reactor::{Source, WorkerKey};

/// The longest a muted channel goes unread. A quiet batch of tiny tasks
/// (at most `DEEP_QUEUE` of them, each measured under 50 µs) is done well
/// within it, so it only fires when one of them runs long.
pub(super) const QUIET_POLL: Duration = Duration::from_millis(2);

/// How often a worker rings within a quiet batch of `tasks`: at half of
/// it, when the engine tops a deep queue up, and at its end.
pub(super) fn ring_every(tasks: usize) -> u64 {
    tasks.div_ceil(2) as u64
}

impl Engine {
    /// A batch frame went to the worker: mute its channel until it rings
    /// (a channel muted already keeps the deadline of its last read).
    pub(super) fn mute(&mut self, key: WorkerKey, now: Instant) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        if !w.muted {
            w.quiet_until = Some(now + QUIET_POLL);
            w.muted = true;
            let _ = self.hub.channels.set_interest(
                &w.chan,
                Source::Channel(key).token(),
                false,
                w.wants_write,
            );
        }
    }

    /// Its doorbell rang: read what it announced.
    pub(super) fn on_doorbell(&mut self, key: WorkerKey) {
        let Some(w) = self.workers.get(&key) else {
            return;
        };
        w.doorbell.clear(); // before reading: a ring from now on wakes us again
        self.on_channel(key);
        self.review_mute(key, Instant::now(), false);
    }

    /// After reading a muted channel: unmute it once the worker holds no
    /// task, or when it has not rung for `QUIET_POLL` (`overdue`).
    pub(super) fn review_mute(&mut self, key: WorkerKey, now: Instant, overdue: bool) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        if !w.muted {
            return;
        }
        if overdue || w.state.in_flight() == 0 || w.state.closing_since().is_some() {
            w.muted = false;
            w.quiet_until = None;
            if w.state.closing_since().is_none() {
                let _ = self.hub.channels.set_interest(
                    &w.chan,
                    Source::Channel(key).token(),
                    true,
                    w.wants_write,
                );
            }
        } else {
            w.quiet_until = Some(now + QUIET_POLL);
        }
    }

    /// Reads the channels that are due: a muted one's quiet poll, or any
    /// whose running task's time limit is about to be judged (on a view that
    /// may be stale: its result may be in the socket, muted or not yet read).
    pub(super) fn read_due(&mut self, now: Instant) {
        let default_timeout = self.cfg.task_timeout;
        let due: Vec<(WorkerKey, bool)> = self
            .workers
            .values()
            .filter_map(|w| {
                let overdue = w.muted && w.quiet_until.is_some_and(|t| now >= t);
                let limit = w.deadline(default_timeout).is_some_and(|(d, _)| now >= d);
                (overdue || limit).then_some((w.key, overdue))
            })
            .collect();
        for (key, overdue) in due {
            self.on_channel(key);
            self.review_mute(key, now, overdue);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_rings_at_its_half_and_its_end() {
        assert_eq!(ring_every(2), 1);
        assert_eq!(ring_every(3), 2);
        assert_eq!(ring_every(32), 16);
    }
}
