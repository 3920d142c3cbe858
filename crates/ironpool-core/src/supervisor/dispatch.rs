//! Sending to workers: carries out the scheduler's plan (register frames a
//! worker lacks, then the tasks, those planned for one worker in a row in
//! one frame) and writes each worker's outbox to its socket without ever
//! blocking.

use std::time::Instant;

use super::event_loop::Engine;
use super::lock;
use super::quiet;
use super::scheduler::{self, Rules, WorkerView};
use super::worker::{Outgoing, TaskFrame, Worker};
use crate::ipc::{MAP_CHUNK, Message};
use crate::reactor::{Source, WorkerKey};

impl Engine {
    /// Sends queued tasks to the workers that may take them.
    pub(super) fn dispatch(&mut self) {
        self.send_pending(true);
        self.after_dispatch();
    }

    /// Like [`Engine::dispatch`], for a caller's thread that just queued
    /// tasks: it starts or prefetches, but leaves topping up deep queues to
    /// whoever handles the next results, who then sends many in one frame
    /// (topping up one task per submit would cost a write each).
    ///
    /// With a `backlog` (tasks were queued already) it sends nothing: the
    /// queue's head could not go at the last dispatch, no worker has
    /// finished anything since (that would have dispatched again), and
    /// whether a worker may take a task does not depend on the task. The
    /// next result's handler sends the backlog, in batches.
    pub(super) fn dispatch_submitted(&mut self, backlog: bool) {
        if backlog {
            return;
        }
        self.send_pending(false);
        self.after_dispatch();
    }

    fn after_dispatch(&mut self) {
        if self.cfg.max_tasks_per_worker.is_some() {
            // A worker just sent its last task: fork its successor now.
            self.fill_workers();
        }
    }

    fn send_pending(&mut self, top_up: bool) {
        let depth = 1 + self.cfg.prefetch;
        let rules = Rules {
            depth,
            deep: if top_up && self.cfg.prefetch > 0 {
                scheduler::DEEP_QUEUE
            } else {
                depth
            },
            max_tasks_per_worker: self.cfg.max_tasks_per_worker,
            may_prefetch: self.cfg.max_memory.is_none(),
        };
        // A worker whose socket fails while it is sent tasks closes: plan
        // again without it.
        while !self.pending.is_empty() {
            let plan = {
                // A recycled worker's successor is forked while the last
                // task runs, but takes none until that task is done: a slot
                // runs one task at a time, so `workers` bounds how many run.
                let limit = self.cfg.max_tasks_per_worker;
                let spent = |w: &Worker| {
                    w.state.in_flight() > 0
                        && limit.is_some_and(|n| w.tasks_done + w.state.in_flight() as u64 >= n)
                };
                let finishing: Vec<(usize, WorkerKey)> = self
                    .workers
                    .values()
                    .filter(|w| spent(w))
                    .map(|w| (w.slot, w.key))
                    .collect();
                let views: Vec<WorkerView<'_>> = self
                    .workers
                    .values()
                    .filter(|w| {
                        !finishing
                            .iter()
                            .any(|&(slot, key)| slot == w.slot && key != w.key)
                    })
                    .map(|w| WorkerView {
                        key: w.key,
                        state: &w.state,
                        tasks_done: w.tasks_done,
                        has: &w.objects,
                    })
                    .collect();
                let sizer = lock(&self.hub.sizer);
                scheduler::plan(&views, self.pending.iter(), &sizer, rules, Instant::now())
            };
            if plan.is_empty() {
                return;
            }
            let mut sent_to: Vec<WorkerKey> = Vec::new();
            for step in plan {
                let Some(task) = self.pending.pop() else {
                    break;
                };
                debug_assert_eq!(task.id, step.task, "the plan follows the queue");
                let Some(w) = self.workers.get_mut(&step.worker) else {
                    self.pending.push_front(task);
                    break;
                };
                for id in step.register {
                    if w.objects.insert(id) {
                        if let Some(f) = self.registry.payload(id).and_then(|f| f.try_clone().ok())
                        {
                            w.outbox.push_back(Outgoing::Owned(f));
                        }
                    }
                }
                // Tasks planned for one worker in a row go out in one frame.
                let joined = match w.outbox.back_mut() {
                    Some(Outgoing::Tasks(frame)) => frame.add(&task),
                    _ => false,
                };
                let frame = (!joined).then(|| TaskFrame::new(&task));
                if let Err(task) = w.state.push(task, Instant::now()) {
                    self.pending.push_front(task);
                    break;
                }
                if let Some(frame) = frame {
                    w.outbox.push_back(Outgoing::Tasks(frame));
                }
                if !sent_to.contains(&step.worker) {
                    sent_to.push(step.worker);
                }
            }
            let mut closed = false;
            for key in sent_to {
                self.flush(key);
                closed |= self
                    .workers
                    .get(&key)
                    .is_some_and(|w| !w.state.takes_tasks());
            }
            if !closed {
                return;
            }
        }
    }

    /// Writes what the worker's outbox holds until its socket is full (then
    /// waits for it to become writable) or fails (then the channel closes).
    pub(super) fn flush(&mut self, key: WorkerKey) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        let mut quiet = false;
        let mut unmute = false;
        while let Some(next) = w.outbox.front() {
            let mut asks_ring = false;
            let sent = match next {
                Outgoing::Owned(m) => w.chan.send(m),
                Outgoing::Tasks(frame) => {
                    let msgs: Vec<&Message> = w
                        .state
                        .tasks()
                        .filter(|t| frame.ids.contains(&t.id))
                        .map(|t| &t.payload)
                        .collect();
                    // A task with descriptors travels alone: it cannot ask for a ring.
                    let alone = matches!(msgs.as_slice(), [one] if !one.fds.is_empty());
                    let chunks = msgs.iter().all(|m| m.flags & MAP_CHUNK != 0);
                    let ring_every = if alone {
                        0
                    } else {
                        quiet::ring_every(msgs.len(), chunks, w.muted())
                    };
                    unmute |= alone && w.muted();
                    asks_ring = ring_every > 0;
                    match msgs.as_slice() {
                        [] => Ok(true), // none of them is held any more
                        [one] if ring_every == 0 => w.chan.send(one),
                        many => w.chan.send_batch(many, ring_every),
                    }
                }
            };
            match sent {
                Ok(true) => {
                    quiet |= asks_ring;
                    w.outbox.pop_front();
                }
                Ok(false) => break,
                Err(_) => {
                    failed = true;
                    break;
                }
            }
        }
        let want = !w.outbox.is_empty() && !failed;
        if want != w.wants_write {
            w.wants_write = want;
            let _ = self.hub.channels.set_interest(
                &w.chan,
                Source::Channel(key).token(),
                !w.muted(),
                want,
            );
        }
        if failed {
            // The worker is dying; its exit report will settle its tasks.
            // Read what it sent first: once closed, its channel is not read,
            // and a result still in the socket would count as a crash.
            self.on_channel(key);
            self.close_channel(key);
        } else if unmute {
            self.review_mute(key, Instant::now(), true);
        } else if quiet {
            self.mute(key, Instant::now());
        }
    }
}
