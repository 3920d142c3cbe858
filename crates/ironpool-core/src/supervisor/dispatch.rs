//! Sending to workers: carries out the scheduler's plan (register frames a
//! worker lacks, then the task) and writes each worker's outbox to its
//! socket without ever blocking.

use std::time::Instant;

use super::event_loop::Engine;
use super::lock;
use super::scheduler::{self, Rules, WorkerView};
use super::worker::Outgoing;
use crate::reactor::{Source, WorkerKey};

impl Engine {
    /// Sends queued tasks to the workers that may take them.
    pub(super) fn dispatch(&mut self) {
        self.send_pending();
        if self.cfg.max_tasks_per_worker.is_some() {
            // A worker just sent its last task: fork its successor now.
            self.fill_workers();
        }
    }

    fn send_pending(&mut self) {
        let rules = Rules {
            depth: 1 + self.cfg.prefetch,
            max_tasks_per_worker: self.cfg.max_tasks_per_worker,
            may_prefetch: self.cfg.max_memory.is_none(),
        };
        // A worker whose socket fails while it is sent a task closes: plan
        // again without it.
        'plan: while !self.pending.is_empty() {
            let plan = {
                let views: Vec<WorkerView<'_>> = self
                    .workers
                    .values()
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
            for step in plan {
                let Some(task) = self.pending.pop() else {
                    return;
                };
                debug_assert_eq!(task.id, step.task, "the plan follows the queue");
                let Some(w) = self.workers.get_mut(&step.worker) else {
                    self.pending.push_front(task);
                    return;
                };
                for id in step.register {
                    if w.objects.insert(id) {
                        if let Some(f) = self.registry.payload(id).and_then(|f| f.try_clone().ok())
                        {
                            w.outbox.push_back(Outgoing::Owned(f));
                        }
                    }
                }
                let id = task.id;
                if let Err(task) = w.state.push(task, Instant::now()) {
                    self.pending.push_front(task);
                    return;
                }
                w.outbox.push_back(Outgoing::Task(id));
                self.flush(step.worker);
                let open = self
                    .workers
                    .get(&step.worker)
                    .is_some_and(|w| w.state.takes_tasks());
                if !open {
                    continue 'plan;
                }
            }
            return;
        }
    }

    /// Writes what the worker's outbox holds until its socket is full (then
    /// waits for it to become writable) or fails (then the channel closes).
    pub(super) fn flush(&mut self, key: WorkerKey) {
        let Some(w) = self.workers.get_mut(&key) else {
            return;
        };
        let mut failed = false;
        while let Some(next) = w.outbox.front() {
            let msg = match next {
                Outgoing::Owned(m) => Some(m),
                Outgoing::Task(id) => w.state.tasks().find(|t| t.id == *id).map(|t| &t.payload),
            };
            let Some(msg) = msg else {
                w.outbox.pop_front();
                continue;
            };
            match w.chan.send(msg) {
                Ok(true) => {
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
            let _ = self
                .hub
                .poller
                .modify(&w.chan, Source::Channel(key).token(), want);
        }
        if failed {
            // The worker is dying; its exit report will settle its tasks.
            self.close_channel(key);
        }
    }
}
