//! Where a worker's results are read in bursts: quiet batches.
//!
//! A worker running a `Batch` of tiny `map` chunks finishes one every few
//! microseconds. Woken by each result's write, the reader (the supervisor
//! thread or a caller driving the engine) spent a context switch per task,
//! and more time being woken than reading. So when `QUIET_MIN_TASKS` or
//! more map chunks go out in one frame (not submitted tasks: their caller
//! may be waiting on that one result), the worker's channel is muted (its
//! data no longer wakes anyone; a hang-up still does) and the frame asks
//! the worker to ring its doorbell after every `ring_every` results and
//! after the last. Each result is still written to the socket the moment
//! it exists, so a crash loses none (the exit path, and a failed write,
//! read the socket before the worker's tasks are settled) and log records
//! stay in order before their results.
//!
//! A smaller batch, or a single task, sent to a channel muted already asks
//! for a ring at its end (a task with descriptors travels alone and cannot:
//! sending one unmutes the channel). The worker also rings when it runs out
//! of tasks. The reader reads a muted channel whenever its doorbell rings,
//! before a time limit is enforced on it, and at the latest `QUIET_POLL`
//! after it last did; then, if the worker holds no task, or has not rung by
//! then (a task that was expected to be tiny runs long), the channel is
//! unmuted, so results are never held back by more than that (epoll's
//! millisecond timeouts round it up to 3 ms).

use std::time::{Duration, Instant};

use super::event_loop::Engine;
use crate::reactor::{Source, WorkerKey};

/// The longest a muted channel goes unread. A quiet batch of tiny tasks
/// (at most `DEEP_QUEUE` of them, each measured under 50 µs) is done well
/// within it, so it only fires when one of them runs long.
pub(super) const QUIET_POLL: Duration = Duration::from_millis(2);

/// The smallest batch that mutes a channel: below it, a mute, two rings and
/// an unmute cost more system calls than the wake-ups they save.
pub(super) const QUIET_MIN_TASKS: usize = 8;

/// How often a worker should ring within a frame of `tasks` (0: never, the
/// frame is not quiet): at half of it, when the engine tops a deep queue
/// up, and at its end. Only a batch of `map` chunks (`chunks`) is quiet: a
/// map hands out every result it finds finished at once, while a
/// submitted task's caller may be waiting on that one. A frame sent to a
/// channel muted already, a single task too, asks for one ring, at its end.
pub(super) fn ring_every(tasks: usize, chunks: bool, muted: bool) -> u64 {
    if chunks && tasks >= QUIET_MIN_TASKS {
        tasks.div_ceil(2) as u64
    } else if muted {
        tasks as u64
    } else {
        0
    }
}

impl Engine {
    /// A batch frame went to the worker: mute its channel until it rings
    /// (a channel muted already keeps the deadline of its last read).
    pub(super) fn mute(&mut self, key: WorkerKey, now: Instant) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        if !w.muted() {
            w.quiet_until = Some(now + QUIET_POLL);
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
        if !w.muted() {
            return;
        }
        if overdue || w.state.in_flight() == 0 || w.state.closing_since().is_some() {
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
                let overdue = w.quiet_until.is_some_and(|t| now >= t);
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
        assert_eq!(ring_every(QUIET_MIN_TASKS, true, false), 4);
        assert_eq!(ring_every(9, true, false), 5);
        assert_eq!(ring_every(32, true, true), 16);
    }

    #[test]
    fn a_small_batch_or_one_of_calls_mutes_nothing_but_rings_once_on_a_muted_channel() {
        assert_eq!(ring_every(2, true, false), 0);
        assert_eq!(ring_every(QUIET_MIN_TASKS - 1, true, false), 0);
        assert_eq!(ring_every(32, false, false), 0);
        assert_eq!(ring_every(3, true, true), 3);
        assert_eq!(ring_every(32, false, true), 32);
    }
}
