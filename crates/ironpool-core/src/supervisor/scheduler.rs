//! Which task goes next, and how big a `map` chunk should be.

use std::collections::{HashMap, HashSet, VecDeque};
use std::time::Duration;

use crate::task::{FnId, Task, TaskId};

/// FIFO of tasks not yet sent to a worker. Cancellation is lazy: a cancelled
/// id is skipped when it reaches the front.
#[derive(Default)]
pub struct Pending {
    queue: VecDeque<Task>,
    cancelled: HashSet<TaskId>,
}

impl Pending {
    pub fn push_back(&mut self, t: Task) {
        self.queue.push_back(t);
    }

    /// Re-queues a task that a dead worker had not started, ahead of new work.
    pub fn push_front(&mut self, t: Task) {
        self.queue.push_front(t);
    }

    /// Withdraws a queued task; false if it is not queued (sent or done).
    pub fn cancel(&mut self, id: TaskId) -> bool {
        if self.queue.iter().any(|t| t.id == id) {
            self.cancelled.insert(id)
        } else {
            false
        }
    }

    pub fn drain_all(&mut self) -> Vec<TaskId> {
        self.cancelled.clear();
        self.queue.drain(..).map(|t| t.id).collect()
    }

    pub fn pop(&mut self) -> Option<Task> {
        while let Some(t) = self.queue.pop_front() {
            if !self.cancelled.remove(&t.id) {
                return Some(t);
            }
        }
        None
    }

    /// The queued tasks not withdrawn, in order.
    pub fn iter(&self) -> impl Iterator<Item = &Task> {
        self.queue
            .iter()
            .filter(|t| !self.cancelled.contains(&t.id))
    }

    pub fn is_empty(&self) -> bool {
        self.queue.len() == self.cancelled.len()
    }

    pub fn take_all(&mut self) -> Vec<Task> {
        let cancelled = std::mem::take(&mut self.cancelled);
        self.queue
            .drain(..)
            .filter(|t| !cancelled.contains(&t.id))
            .collect()
    }
}

/// Sizes `map` chunks from measured per-item time, so that a chunk takes
/// about `target` on a worker: tiny tasks get big chunks (little dispatch
/// overhead per item), slow tasks get chunks of one (good balance, and a
/// crash or timeout costs one item).
#[derive(Debug)]
pub struct ChunkSizer {
    target: Duration,
    max_chunk: usize,
    workers: usize,
    per_item_ns: HashMap<FnId, f64>,
}

impl Default for ChunkSizer {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(20),
            max_chunk: 16_384,
            workers: 1,
            per_item_ns: HashMap::new(),
        }
    }
}

impl ChunkSizer {
    pub fn set_workers(&mut self, n: usize) {
        self.workers = n.max(1);
    }

    /// Folds in one finished chunk (exponential moving average).
    pub fn record(&mut self, fn_id: FnId, elapsed: Duration, items: u32) {
        if items == 0 {
            return;
        }
        let sample = elapsed.as_nanos() as f64 / items as f64;
        let avg = self.per_item_ns.entry(fn_id).or_insert(sample);
        *avg = 0.7 * *avg + 0.3 * sample;
    }

    /// Mean measured time per item of `fn_id`, in nanoseconds.
    pub fn mean(&self, fn_id: FnId) -> Option<f64> {
        self.per_item_ns.get(&fn_id).copied()
    }

    /// Items for the next chunk; `remaining` (if known) keeps the tail of a
    /// map spread over all workers.
    pub fn next(&mut self, fn_id: FnId, remaining: Option<usize>) -> usize {
        let Some(&ns) = self.per_item_ns.get(&fn_id) else {
            return 1;
        };
        let by_time = (self.target.as_nanos() as f64 / ns.max(1.0)) as usize;
        let mut n = by_time.clamp(1, self.max_chunk);
        if let Some(rem) = remaining {
            n = n.min(rem.div_ceil(self.workers * 2).max(1));
        }
        n
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunk_grows_for_tiny_tasks_and_stays_one_for_slow() {
        let mut s = ChunkSizer::default();
        s.set_workers(2);
        assert_eq!(s.next(1, None), 1);
        s.record(1, Duration::from_micros(10), 10); // 1 µs per item
        assert!(s.next(1, None) > 1000);
        assert!(s.next(1, Some(100)) <= 25);
        s.record(2, Duration::from_millis(500), 1);
        assert_eq!(s.next(2, None), 1);
    }
}
