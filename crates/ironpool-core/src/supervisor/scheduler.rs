//! Which task goes next, to which worker, and how big a `map` chunk should
//! be. [`plan`] is a pure function of the engine's state: it decides, the
//! engine (`dispatch.rs`) writes the frames.

use std::collections::VecDeque;

use crate::id_hash::{IdMap, IdSet};
use std::time::{Duration, Instant};

use super::worker::{Running, State};
use crate::reactor::WorkerKey;
use crate::task::{ObjectId, Task, TaskId};

/// A task is queued behind a running one only if tasks of its kind take
/// less than this on average...
const PREFETCH_BELOW_NS: f64 = 2_000_000.0;
/// ...and the running one began less than this ago.
const PREFETCH_WINDOW: Duration = Duration::from_millis(5);
/// Tasks of a kind that takes less than this may queue [`Rules::deep`]
/// deep, so that one frame carries many and the worker never waits for
/// the next: at most `deep` × this much known work waits behind a task.
const TINY_BELOW_NS: f64 = 50_000.0;
/// A running task that has taken this many times its kind's mean is overdue...
const OVERDUE_FACTOR: f64 = 4.0;
/// ...but never before this (timing noise, the wake-up of a result).
const OVERDUE_FLOOR: Duration = Duration::from_micros(200);
/// How deep tiny tasks queue (with prefetch on).
pub const DEEP_QUEUE: usize = 32;
/// A `map`'s tail is cut into chunks of no less work than this: a chunk
/// costs some 50 µs of sending and answering, so finer pieces would cost
/// more than the imbalance they remove.
const MIN_CHUNK_WORK_NS: f64 = 500_000.0;

/// FIFO of tasks not yet sent to a worker. Cancellation is lazy: a cancelled
/// id is skipped when it reaches the front.
#[derive(Default)]
pub struct Pending {
    queue: VecDeque<Task>,
    cancelled: IdSet<TaskId>,
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

    /// Queued tasks not withdrawn.
    pub fn len(&self) -> usize {
        self.queue.len() - self.cancelled.len()
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
    per_item_ns: IdMap<ObjectId, f64>,
}

impl Default for ChunkSizer {
    fn default() -> Self {
        Self {
            target: Duration::from_millis(20),
            max_chunk: 16_384,
            workers: 1,
            per_item_ns: IdMap::default(),
        }
    }
}

impl ChunkSizer {
    pub fn set_workers(&mut self, n: usize) {
        self.workers = n.max(1);
    }

    /// Folds in one finished chunk (exponential moving average).
    pub fn record(&mut self, function_id: ObjectId, elapsed: Duration, items: u32) {
        if items == 0 {
            return;
        }
        let sample = elapsed.as_nanos() as f64 / items as f64;
        let avg = self.per_item_ns.entry(function_id).or_insert(sample);
        *avg = 0.7 * *avg + 0.3 * sample;
    }

    /// Mean measured time per item of `function_id`, in nanoseconds.
    pub fn mean(&self, function_id: ObjectId) -> Option<f64> {
        self.per_item_ns.get(&function_id).copied()
    }

    /// Items for the next chunk; `remaining` (if known) keeps the tail of a
    /// map spread over all workers, in chunks of at least
    /// [`MIN_CHUNK_WORK_NS`].
    pub fn next(&mut self, function_id: ObjectId, remaining: Option<usize>) -> usize {
        let Some(&ns) = self.per_item_ns.get(&function_id) else {
            return 1;
        };
        let ns = ns.max(1.0);
        let by_time = (self.target.as_nanos() as f64 / ns) as usize;
        let mut n = by_time.clamp(1, self.max_chunk);
        if let Some(rem) = remaining {
            let floor = (MIN_CHUNK_WORK_NS / ns) as usize;
            let spread = rem.div_ceil(self.workers * 2).max(floor);
            n = n.min(spread).min(rem).max(1);
        }
        n
    }
}

/// What the scheduler needs to know about one worker.
pub struct WorkerView<'a> {
    pub key: WorkerKey,
    pub state: &'a State,
    pub tasks_done: u64,
    /// Registered objects it has been sent.
    pub has: &'a IdSet<ObjectId>,
}

/// The pool settings the choice depends on.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    /// Tasks a worker may hold: the one it runs plus those prefetched.
    pub depth: usize,
    /// Tasks a worker may hold when all are tiny. It is refilled once half
    /// of them are done, so that the refill travels as one frame.
    pub deep: usize,
    pub max_tasks_per_worker: Option<u64>,
    /// False with a memory limit, which is checked between tasks: then
    /// nothing may wait behind one.
    pub may_prefetch: bool,
}

/// Send `task` to `worker`, after the registered objects in `register`
/// (those of the task's it has not been sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assignment {
    pub worker: WorkerKey,
    pub task: TaskId,
    pub register: Vec<ObjectId>,
}

/// A worker as the plan fills it.
struct Load<'a> {
    view: &'a WorkerView<'a>,
    in_flight: usize,
    /// When what it runs began (`now` for a task handed to it in this plan).
    started: Option<Instant>,
    /// Everything it holds is known to be quick, and what it runs began
    /// within the prefetch window: one more may wait behind it.
    quick: bool,
    /// Everything it holds is tiny, so it may hold [`Rules::deep`].
    tiny: bool,
    /// It was given a task in this plan (a deep queue is topped up in one go).
    refilling: bool,
    sent_now: Vec<ObjectId>,
}

impl Load<'_> {
    fn may_take(&self, rules: Rules) -> bool {
        let sent = self.view.tasks_done + self.in_flight as u64;
        if rules.max_tasks_per_worker.is_some_and(|n| sent >= n) {
            return false;
        }
        if self.in_flight == 0 {
            return true;
        }
        if !self.quick {
            return false;
        }
        if self.in_flight < rules.depth {
            return true;
        }
        let deep = rules.deep.max(rules.depth);
        self.tiny && self.in_flight < deep && (self.refilling || self.in_flight <= deep / 2)
    }
}

/// Known to take less than `below_ns`, over all its items.
fn known_below(sizer: &ChunkSizer, t: &Task, below_ns: f64) -> bool {
    sizer
        .mean(t.function_id)
        .is_some_and(|ns| ns * f64::from(t.items) < below_ns)
}

fn is_quick(sizer: &ChunkSizer, t: &Task) -> bool {
    known_below(sizer, t, PREFETCH_BELOW_NS)
}

fn is_tiny(sizer: &ChunkSizer, t: &Task) -> bool {
    known_below(sizer, t, TINY_BELOW_NS)
}

/// The running task began within [`PREFETCH_WINDOW`] and has not yet run
/// [`OVERDUE_FACTOR`] times what its kind takes (with a floor of
/// [`OVERDUE_FLOOR`]): one that has may be stuck, so nothing queues behind it.
fn on_time(sizer: &ChunkSizer, r: &Running, now: Instant) -> bool {
    let ran = now.duration_since(r.started);
    let expected = sizer
        .mean(r.task.function_id)
        .map_or(PREFETCH_WINDOW, |ns| {
            Duration::from_nanos((ns * f64::from(r.task.items) * OVERDUE_FACTOR) as u64)
        });
    ran < expected.max(OVERDUE_FLOOR).min(PREFETCH_WINDOW)
}

/// Hands the queued tasks, in order, to workers: an idle one first (least
/// loaded, then lowest key), and behind a running task only when that one
/// and everything queued with it are known to be quick and it began less
/// than [`PREFETCH_WINDOW`] ago, so a long task never strands work behind
/// it while another worker is free. Tiny tasks queue deeper, topped up in
/// batches. Stops at the first task no worker may take. A worker is never
/// sent more than its task limit.
pub fn plan<'t>(
    workers: &[WorkerView<'_>],
    pending: impl IntoIterator<Item = &'t Task>,
    sizer: &ChunkSizer,
    rules: Rules,
    now: Instant,
) -> Vec<Assignment> {
    // A worker that is starting will be free within moments: nothing waits
    // behind a running task meanwhile (it could be the one that is long).
    let starting = workers.iter().any(|v| matches!(v.state, State::Starting));
    let mut loads: Vec<Load<'_>> = workers
        .iter()
        .filter(|v| v.state.takes_tasks())
        .map(|v| {
            let quick = rules.may_prefetch
                && !starting
                && v.state.tasks().all(|t| is_quick(sizer, t))
                && v.state.running().is_none_or(|r| on_time(sizer, r, now));
            Load {
                view: v,
                in_flight: v.state.in_flight(),
                started: v.state.running().map(|r| r.started),
                quick,
                tiny: quick && v.state.tasks().all(|t| is_tiny(sizer, t)),
                refilling: false,
                sent_now: Vec::new(),
            }
        })
        .collect();
    let mut out = Vec::new();
    for task in pending {
        let Some(load) = loads
            .iter_mut()
            .filter(|l| l.may_take(rules))
            // Least loaded first; between equals, the one whose task began
            // last (the other's may be the one that turns out long).
            .min_by_key(|l| (l.in_flight, std::cmp::Reverse(l.started), l.view.key))
        else {
            break;
        };
        let mut register = Vec::new();
        for id in std::iter::once(task.function_id).chain(task.needs.iter().copied()) {
            if !load.view.has.contains(&id) && !load.sent_now.contains(&id) {
                load.sent_now.push(id);
                register.push(id);
            }
        }
        // A task handed to an idle worker starts now, inside the window.
        load.quick = (load.in_flight == 0 || load.quick)
            && rules.may_prefetch
            && !starting
            && is_quick(sizer, task);
        load.tiny = load.quick && (load.in_flight == 0 || load.tiny) && is_tiny(sizer, task);
        load.refilling = true;
        if load.in_flight == 0 {
            load.started = Some(now);
        }
        load.in_flight += 1;
        out.push(Assignment {
            worker: load.view.key,
            task: task.id,
            register,
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::{Kind, Message};
    use crate::supervisor::worker::{Running, Work};

    const QUICK_FN: ObjectId = 1; // 1 µs per item
    const SLOW_FN: ObjectId = 2; // 10 ms per item
    const UNKNOWN_FN: ObjectId = 3;
    const MEDIUM_FN: ObjectId = 4; // 1 ms per item: quick, not tiny

    fn sizer() -> ChunkSizer {
        let mut s = ChunkSizer::default();
        s.record(QUICK_FN, Duration::from_micros(1), 1);
        s.record(SLOW_FN, Duration::from_millis(10), 1);
        s.record(MEDIUM_FN, Duration::from_millis(1), 1);
        s
    }

    fn task(id: TaskId, function_id: ObjectId) -> Task {
        Task::new(id, function_id, Message::new(Kind::Task, id, function_id))
    }

    fn busy(function_id: ObjectId, started: Instant) -> State {
        State::Busy(Work::from(Running {
            task: task(100, function_id),
            started,
        }))
    }

    const RULES: Rules = Rules {
        depth: 2,
        deep: 2,
        max_tasks_per_worker: None,
        may_prefetch: true,
    };

    /// Every worker has been sent `QUICK_FN`, `SLOW_FN` and `UNKNOWN_FN`.
    fn has_all() -> IdSet<ObjectId> {
        [QUICK_FN, SLOW_FN, UNKNOWN_FN, MEDIUM_FN]
            .into_iter()
            .collect()
    }

    fn view<'a>(key: WorkerKey, state: &'a State, has: &'a IdSet<ObjectId>) -> WorkerView<'a> {
        WorkerView {
            key,
            state,
            tasks_done: 0,
            has,
        }
    }

    #[test]
    fn pending_len_leaves_out_withdrawn_tasks() {
        let mut pending = Pending::default();
        for id in 1..=3 {
            pending.push_back(task(id, QUICK_FN));
        }
        assert!(pending.cancel(2));
        assert_eq!(pending.len(), 2);
        assert_eq!(pending.pop().map(|t| t.id), Some(1));
        assert_eq!(pending.pop().map(|t| t.id), Some(3));
        assert_eq!(pending.len(), 0);
        assert!(pending.is_empty());
    }

    /// (worker, task) pairs of a plan.
    /// The plan for one worker (key 1, which has every object) and one task.
    fn plan_one(state: &State, task: Task, now: Instant) -> Vec<Assignment> {
        let has = has_all();
        plan(&[view(1, state, &has)], &[task], &sizer(), RULES, now)
    }

    fn pairs(plan: &[Assignment]) -> Vec<(WorkerKey, TaskId)> {
        plan.iter().map(|a| (a.worker, a.task)).collect()
    }

    #[test]
    fn idle_workers_get_the_head_tasks_lowest_key_first() {
        let has = has_all();
        let idle = State::Idle;
        let workers = [view(2, &idle, &has), view(1, &idle, &has)];
        let pending = [
            task(10, UNKNOWN_FN),
            task(11, UNKNOWN_FN),
            task(12, UNKNOWN_FN),
        ];
        let p = plan(&workers, &pending, &sizer(), RULES, Instant::now());
        // Nothing is known about the function: nothing waits behind a task.
        assert_eq!(pairs(&p), [(1, 10), (2, 11)]);
    }

    #[test]
    fn an_idle_worker_comes_before_prefetching_to_a_busy_one() {
        let has = has_all();
        let now = Instant::now();
        let (b, idle) = (busy(QUICK_FN, now), State::Idle);
        let workers = [view(1, &b, &has), view(2, &idle, &has)];
        let pending = [task(10, QUICK_FN), task(11, QUICK_FN), task(12, QUICK_FN)];
        let p = plan(&workers, &pending, &sizer(), RULES, now);
        // Depth 2: the idle worker runs one and queues one, the busy one
        // queues one; the fourth slot does not exist.
        assert_eq!(pairs(&p), [(2, 10), (1, 11), (2, 12)]);
    }

    #[test]
    fn slow_or_unknown_tasks_are_never_prefetched() {
        let now = Instant::now();
        for running in [SLOW_FN, UNKNOWN_FN] {
            let b = busy(running, now);
            let p = plan_one(&b, task(10, QUICK_FN), now);
            assert!(p.is_empty(), "queued behind fn {running}");
        }
        let b = busy(QUICK_FN, now);
        for next in [SLOW_FN, UNKNOWN_FN] {
            let p = plan_one(&b, task(10, next), now);
            assert_eq!(
                pairs(&p),
                [(1, 10)],
                "fn {next} may wait behind a quick one"
            );
        }
    }

    #[test]
    fn a_chunk_of_many_quick_items_is_not_quick() {
        let now = Instant::now();
        let mut long = task(100, QUICK_FN);
        long.items = 5_000; // 5 ms
        let b = State::Busy(Work::from(Running {
            task: long,
            started: now,
        }));
        let p = plan_one(&b, task(10, QUICK_FN), now);
        assert!(p.is_empty());
    }

    #[test]
    fn quick_tasks_are_prefetched_only_within_the_window() {
        let now = Instant::now();
        let fresh = busy(QUICK_FN, now - Duration::from_micros(100));
        let p = plan_one(&fresh, task(10, QUICK_FN), now);
        assert_eq!(pairs(&p), [(1, 10)]);
        let medium = busy(MEDIUM_FN, now - Duration::from_millis(2));
        let p = plan_one(&medium, task(10, QUICK_FN), now);
        assert_eq!(pairs(&p), [(1, 10)], "within 4 x its 1 ms");
        let stale = busy(MEDIUM_FN, now - PREFETCH_WINDOW);
        let p = plan_one(&stale, task(10, QUICK_FN), now);
        assert!(
            p.is_empty(),
            "the running task may be stuck: do not queue behind it"
        );
        let overdue = busy(QUICK_FN, now - Duration::from_millis(1));
        let p = plan_one(&overdue, task(10, QUICK_FN), now);
        assert!(p.is_empty(), "1 ms into a 1 µs task: overdue");
    }

    #[test]
    fn between_equally_loaded_workers_the_one_whose_task_began_last_gets_more() {
        let has = has_all();
        let now = Instant::now();
        let older = busy(QUICK_FN, now - Duration::from_micros(150));
        let newer = busy(QUICK_FN, now - Duration::from_micros(10));
        let workers = [view(1, &older, &has), view(2, &newer, &has)];
        let p = plan(&workers, &[task(10, QUICK_FN)], &sizer(), RULES, now);
        assert_eq!(pairs(&p), [(2, 10)]);
    }

    #[test]
    fn prefetch_stops_at_the_depth() {
        let has = has_all();
        let now = Instant::now();
        let b = busy(QUICK_FN, now);
        let pending: Vec<Task> = (10..20).map(|id| task(id, QUICK_FN)).collect();
        let deep = Rules { depth: 4, ..RULES };
        let p = plan(&[view(1, &b, &has)], &pending, &sizer(), deep, now);
        assert_eq!(pairs(&p), [(1, 10), (1, 11), (1, 12)]);
    }

    /// A worker running one `function_id` task with `queued` more behind it.
    fn holding(function_id: ObjectId, queued: u64, now: Instant) -> State {
        let mut state = busy(function_id, now);
        for id in 0..queued {
            assert!(state.push(task(200 + id, function_id), now).is_ok());
        }
        state
    }

    #[test]
    fn tiny_tasks_queue_deep_and_are_topped_up_once_half_are_done() {
        let has = has_all();
        let now = Instant::now();
        let deep = Rules { deep: 8, ..RULES };
        let pending: Vec<Task> = (10..30).map(|id| task(id, QUICK_FN)).collect();
        let idle = State::Idle;
        let p = plan(&[view(1, &idle, &has)], &pending, &sizer(), deep, now);
        assert_eq!(p.len(), 8, "an idle worker is filled to the deep limit");
        let five = holding(QUICK_FN, 4, now);
        let p = plan(&[view(1, &five, &has)], &pending, &sizer(), deep, now);
        assert!(p.is_empty(), "more than half full: no refill of one task");
        let four = holding(QUICK_FN, 3, now);
        let p = plan(&[view(1, &four, &has)], &pending, &sizer(), deep, now);
        assert_eq!(p.len(), 4, "half full: topped up in one go");
    }

    #[test]
    fn tasks_that_are_quick_but_not_tiny_stop_at_the_prefetch_depth() {
        let has = has_all();
        let now = Instant::now();
        let deep = Rules { deep: 8, ..RULES };
        let idle = State::Idle;
        let pending: Vec<Task> = (10..30).map(|id| task(id, MEDIUM_FN)).collect();
        let p = plan(&[view(1, &idle, &has)], &pending, &sizer(), deep, now);
        assert_eq!(p.len(), 2);
        // Nor does a tiny task queue deep behind one that is not tiny.
        let medium = busy(MEDIUM_FN, now);
        let pending: Vec<Task> = (10..30).map(|id| task(id, QUICK_FN)).collect();
        let p = plan(&[view(1, &medium, &has)], &pending, &sizer(), deep, now);
        assert_eq!(p.len(), 1);
    }

    #[test]
    fn nothing_queues_behind_a_running_task_while_another_worker_starts() {
        let has = has_all();
        let now = Instant::now();
        let (b, starting) = (busy(QUICK_FN, now), State::Starting);
        let workers = [view(1, &b, &has), view(2, &starting, &has)];
        let p = plan(&workers, &[task(10, QUICK_FN)], &sizer(), RULES, now);
        assert!(p.is_empty(), "task 10 waits for worker 2");
        let idle = State::Idle;
        let workers = [view(1, &idle, &has), view(2, &starting, &has)];
        let pending = [task(10, QUICK_FN), task(11, QUICK_FN)];
        let p = plan(&workers, &pending, &sizer(), RULES, now);
        assert_eq!(pairs(&p), [(1, 10)]);
    }

    #[test]
    fn a_memory_limit_allows_no_prefetch() {
        let has = has_all();
        let now = Instant::now();
        let (b, idle) = (busy(QUICK_FN, now), State::Idle);
        let rules = Rules {
            may_prefetch: false,
            ..RULES
        };
        let workers = [view(1, &b, &has), view(2, &idle, &has)];
        let pending = [task(10, QUICK_FN), task(11, QUICK_FN)];
        let p = plan(&workers, &pending, &sizer(), rules, now);
        assert_eq!(pairs(&p), [(2, 10)]);
    }

    #[test]
    fn a_worker_is_never_sent_more_than_its_task_limit() {
        let has = has_all();
        let now = Instant::now();
        let idle = State::Idle;
        let rules = Rules {
            depth: 4,
            max_tasks_per_worker: Some(3),
            ..RULES
        };
        let worker = WorkerView {
            tasks_done: 1,
            ..view(1, &idle, &has)
        };
        let pending: Vec<Task> = (10..20).map(|id| task(id, QUICK_FN)).collect();
        let p = plan(&[worker], &pending, &sizer(), rules, now);
        assert_eq!(pairs(&p), [(1, 10), (1, 11)]);
    }

    #[test]
    fn registered_objects_a_worker_lacks_go_first_and_once() {
        let has: IdSet<ObjectId> = [QUICK_FN].into_iter().collect();
        let idle = State::Idle;
        let mut first = task(10, 7);
        first.needs = vec![8, QUICK_FN, 8];
        let mut second = task(11, 7);
        second.needs = vec![9];
        let p = plan(
            &[view(1, &idle, &has)],
            &[first, second],
            &sizer(),
            RULES,
            Instant::now(),
        );
        assert_eq!(p[0].register, [7, 8]);
        // Function 7 is unknown, so the second task goes nowhere.
        assert_eq!(p.len(), 1);
        let mut s = sizer();
        s.record(7, Duration::from_micros(1), 1);
        let mut first = task(10, 7);
        first.needs = vec![8];
        let mut second = task(11, 7);
        second.needs = vec![8, 9];
        let p = plan(
            &[view(1, &idle, &has)],
            &[first, second],
            &s,
            RULES,
            Instant::now(),
        );
        assert_eq!(p[0].register, [7, 8]);
        assert_eq!(p[1].register, [9], "sent earlier in the same plan");
    }

    #[test]
    fn only_workers_that_take_tasks_get_any() {
        let now = Instant::now();
        let others = [
            State::Starting,
            State::Retiring {
                running: Running {
                    task: task(100, QUICK_FN),
                    started: now,
                },
            },
            State::Exiting { since: now },
            State::StartFailed {
                since: now,
                error: None,
            },
            State::ChannelClosed {
                since: now,
                work: None,
            },
        ];
        for state in &others {
            let p = plan_one(state, task(10, QUICK_FN), now);
            assert!(p.is_empty());
        }
    }

    #[test]
    fn cancelled_tasks_are_not_planned() {
        let has = has_all();
        let idle = State::Idle;
        let mut pending = Pending::default();
        for id in 10..13 {
            pending.push_back(task(id, UNKNOWN_FN));
        }
        assert!(pending.cancel(10));
        let workers = [view(1, &idle, &has), view(2, &idle, &has)];
        let p = plan(&workers, pending.iter(), &sizer(), RULES, Instant::now());
        assert_eq!(pairs(&p), [(1, 11), (2, 12)]);
    }

    #[test]
    fn chunk_grows_for_tiny_tasks_and_stays_one_for_slow() {
        let mut s = ChunkSizer::default();
        s.set_workers(2);
        assert_eq!(s.next(1, None), 1);
        s.record(1, Duration::from_micros(10), 10); // 1 µs per item
        assert!(s.next(1, None) > 1000);
        // A short tail goes whole: 100 µs of work is not worth splitting...
        assert_eq!(s.next(1, Some(100)), 100);
        // ...a long one is spread over both workers, in chunks of ≥ 500 µs.
        assert_eq!(s.next(1, Some(8_000)), 2_000);
        assert_eq!(s.next(1, Some(1_200)), 500);
        s.record(2, Duration::from_millis(500), 1);
        assert_eq!(s.next(2, None), 1);
    }
}
