//! What callers see of the engine: the completion queue and workers'
//! logging records, handed over by [`Engine::publish`] (read without the
//! engine's lock), and, worked out when asked (`Pool::stats` is rare, tasks
//! are not), the per-worker figures and the pool's task counts.

use super::event_loop::Engine;
use super::worker::{State, Worker};
use super::{TaskCounts, WorkerStats, lock};

impl Engine {
    /// Hands callers the completions and logging records produced since
    /// the last call.
    pub fn publish(&mut self) {
        if !self.done.is_empty() || !self.logs.is_empty() {
            let mut done = lock(&self.hub.done);
            done.queue.extend(self.done.drain(..));
            done.logs.append(&mut self.logs);
            let wake = done.wake_for_completion();
            drop(done);
            self.hub.wake(wake);
        }
    }

    /// The running totals with what is queued and running now.
    pub fn counts(&self) -> TaskCounts {
        TaskCounts {
            queued: self.pending.len() as u64,
            running: self
                .workers
                .values()
                .map(|w| w.state.tasks().count() as u64)
                .sum(),
            ..self.totals
        }
    }

    /// One entry per slot, for the worker doing that slot's work.
    pub(super) fn worker_stats(&self) -> Vec<WorkerStats> {
        // A recycled worker's successor is forked while it finishes its
        // last task, so a slot may have two live workers: show the one
        // doing the slot's work (the old one while it runs, then the new).
        // (A successor whose pid is not known yet must not come first.)
        let rank = |w: &Worker| match w.state {
            State::Exiting { .. } => 2,
            _ if w.state.running().is_some() => 0,
            _ => 1,
        };
        let mut live: Vec<&Worker> = self
            .workers
            .values()
            .filter(|w| !matches!(w.state, State::ChannelClosed { .. }))
            .collect();
        live.sort_by_key(|w| (w.slot, rank(w), w.pid));
        live.dedup_by_key(|w| w.slot);
        live.into_iter()
            .map(|w| WorkerStats {
                slot: w.slot,
                pid: w.pid.unwrap_or(0),
                tasks_done: w.tasks_done,
                busy: w.state.running().is_some(),
                rss: 0, // read by `Pool::stats`, not on every task
                restarts: self.restarts.get(w.slot).copied().unwrap_or(0),
                last_exit: self.last_exit.get(w.slot).cloned().unwrap_or_default(),
                busy_ns: w.busy_ns,
            })
            .collect()
    }
}
