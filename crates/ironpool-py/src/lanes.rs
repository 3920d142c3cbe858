//! Map lanes: a window of a `map`'s small chunks, submitted with one call
//! and settled here in the binding. A chunk of a lane never becomes a
//! future, a ticket or a `Completion` object: its completion waits in its
//! lane's slot until the map takes the lane's finished chunks in order, and
//! their values are unpickled straight into one list. A chunk that did not
//! simply return is handed to Python with why (`MapLane.take`), where
//! every failure is handled as for any other chunk.
//!
//! Lane task ids start at [`FIRST_LANE_ID`], above any id the Python side
//! gives a task, so a completion's id says whether a lane waits for it.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::thread::{self, ThreadId};

use ironpool_core::ipc::Message;
use ironpool_core::task::{Completion, Outcome, TaskId};
use pyo3::exceptions::PyException;
use pyo3::prelude::*;
use pyo3::types::{PyList, PyTuple};

use crate::buffers;
use crate::outcome;
use crate::plain_pickle;
use ironpool_core::ipc::payload::{self, Part};

/// The first task id of lanes; Python numbers other tasks from 1.
pub const FIRST_LANE_ID: TaskId = 1 << 62;

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

enum Slot {
    Pending,
    Finished(Finished),
    /// Out with the map's thread while it unpickles.
    Taken,
}

/// How a chunk ended, as far as its lane knows.
enum Finished {
    Done(Completion),
    /// Cancelled before a worker took it.
    Withdrawn,
    /// The pool stopped (true: it was terminated) before it finished.
    Stopped(bool),
}

struct LaneState {
    slots: Vec<Slot>,
    /// The first slot not taken yet.
    front: usize,
    /// Slots taken (those before `front` and, out of order, some after).
    taken: usize,
    /// Whether the map takes chunks in order; else any finished one.
    ordered: bool,
}

impl LaneState {
    /// Whether a chunk can be taken now (the next one, in order).
    fn ready(&self) -> bool {
        let ended = |slot: &Slot| matches!(slot, Slot::Finished(_));
        if self.ordered {
            self.slots.get(self.front).is_some_and(ended)
        } else {
            self.slots[self.front..].iter().any(ended)
        }
    }
}

/// One lane's chunks, shared by the map's handle and the pool's router.
pub struct Lane {
    first: TaskId,
    state: Mutex<LaneState>,
    /// Items per chunk (the last may have fewer) and in all.
    chunk: usize,
    items: usize,
    /// The map's progress count, called with the items of the chunks that
    /// returned as they are put in their slots.
    progress: Option<Py<PyAny>>,
    /// The pool's count of lane chunks not finished (`Lanes::pending`).
    pending: Arc<AtomicUsize>,
}

impl Lane {
    /// Ends chunk `id` as `how`, unless it has ended already; the items it
    /// counts for progress (those of a chunk that returned).
    fn finish(&self, id: TaskId, how: Finished) -> usize {
        let index = (id - self.first) as usize;
        let returned =
            matches!(&how, Finished::Done(c) if matches!(c.outcome, Outcome::Returned(_)));
        let ended = self.end(&mut lock(&self.state).slots[index], how);
        if ended && returned {
            self.chunk.min(self.items - index * self.chunk)
        } else {
            0
        }
    }

    /// Ends every pending chunk as `how`.
    fn end_all(&self, how: impl Fn() -> Finished) {
        for slot in &mut lock(&self.state).slots {
            self.end(slot, how());
        }
    }

    /// Whether the slot was pending and now holds `how`.
    fn end(&self, slot: &mut Slot, how: Finished) -> bool {
        let pending = matches!(slot, Slot::Pending);
        if pending {
            *slot = Slot::Finished(how);
            self.pending.fetch_sub(1, Ordering::Relaxed);
        }
        pending
    }
}

/// Every open lane of one pool, and completions waiting to be routed.
#[derive(Default)]
pub struct Lanes {
    next_id: AtomicU64,
    /// By first task id; a lane whose handle is gone is dropped.
    open: Mutex<BTreeMap<TaskId, (usize, Weak<Lane>)>>,
    /// Lane completions received and not yet put in their slots, by the
    /// thread whose wait received them: that thread routes them once it
    /// has handled the logging records received with them
    /// (`PoolCore.publish_lanes`), so no result shows before its records.
    staged: Mutex<HashMap<ThreadId, Vec<Completion>>>,
    /// Chunks of open lanes not finished yet: in flight, as far as a
    /// waiting caller's choice to spin goes.
    pending: Arc<AtomicUsize>,
}

impl Lanes {
    /// Room for the task ids of `items` items in chunks of `chunk`, and
    /// the lane that waits for them (`ordered`: taken in order, else as
    /// they finish; `progress`: called with the items of chunks that return).
    pub fn open(
        &self,
        items: usize,
        chunk: usize,
        ordered: bool,
        progress: Option<Py<PyAny>>,
    ) -> Arc<Lane> {
        let chunks = items.div_ceil(chunk);
        let first = FIRST_LANE_ID + self.next_id.fetch_add(chunks as u64, Ordering::Relaxed);
        self.pending.fetch_add(chunks, Ordering::Relaxed);
        let lane = Arc::new(Lane {
            first,
            chunk,
            items,
            progress,
            pending: self.pending.clone(),
            state: Mutex::new(LaneState {
                slots: (0..chunks).map(|_| Slot::Pending).collect(),
                front: 0,
                taken: 0,
                ordered,
            }),
        });
        lock(&self.open).insert(first, (chunks, Arc::downgrade(&lane)));
        lane
    }

    /// The map let go of `lane`: its chunks are no longer waited for.
    pub fn close(&self, lane: &Lane) {
        lock(&self.open).remove(&lane.first);
        lane.end_all(|| Finished::Withdrawn);
    }

    /// Chunks of open lanes not finished yet.
    pub fn pending(&self) -> usize {
        self.pending.load(Ordering::Relaxed)
    }

    fn find(&self, id: TaskId) -> Option<Arc<Lane>> {
        let open = lock(&self.open);
        let (first, (len, lane)) = open.range(..=id).next_back()?;
        (id - first < *len as u64).then(|| lane.upgrade()).flatten()
    }

    /// Keeps back lane completions (for [`Lanes::publish`]) and returns the rest.
    pub fn stage(&self, batch: Vec<Completion>) -> Vec<Completion> {
        if batch.iter().all(|c| c.task_id < FIRST_LANE_ID) {
            return batch;
        }
        let (lanes, rest): (Vec<_>, Vec<_>) =
            batch.into_iter().partition(|c| c.task_id >= FIRST_LANE_ID);
        lock(&self.staged)
            .entry(thread::current().id())
            .or_default()
            .extend(lanes);
        rest
    }

    /// Puts the completions this thread staged in their slots (true if
    /// there were any: `wake` then runs), then counts their items in their
    /// maps' progress. `Progress` keeps a failing bar's error for its map;
    /// an `Exception` that still gets out is reported as unraisable, as a
    /// future's failing done callback is logged, and results are not held
    /// up. Anything else (a `KeyboardInterrupt` in the caller's thread) is
    /// raised, once every count is made.
    pub fn publish(&self, py: Python<'_>, wake: impl FnOnce()) -> PyResult<()> {
        let staged = lock(&self.staged).remove(&thread::current().id());
        let (any, counts) = self.settle_all(staged.unwrap_or_default());
        if any {
            wake();
        }
        let mut interrupt = None;
        for (lane, items) in counts {
            let Some(progress) = &lane.progress else {
                continue;
            };
            match progress.call1(py, (items,)) {
                Err(e) if e.is_instance_of::<PyException>(py) => {
                    e.write_unraisable(py, Some(progress.bind(py)));
                }
                Err(e) => {
                    interrupt.get_or_insert(e);
                }
                Ok(_) => {}
            }
        }
        interrupt.map_or(Ok(()), Err)
    }

    /// Puts `completions` in their slots: whether there were any, and the
    /// items each lane with a progress count has to count.
    fn settle_all(&self, completions: Vec<Completion>) -> (bool, Vec<(Arc<Lane>, usize)>) {
        let any = !completions.is_empty();
        let mut counts: Vec<(Arc<Lane>, usize)> = Vec::new();
        for c in completions {
            let Some(lane) = self.find(c.task_id) else {
                continue;
            };
            let items = lane.finish(c.task_id, Finished::Done(c));
            if items == 0 || lane.progress.is_none() {
                continue;
            }
            match counts.iter_mut().find(|(l, _)| Arc::ptr_eq(l, &lane)) {
                Some((_, n)) => *n += items,
                None => counts.push((lane, items)),
            }
        }
        (any, counts)
    }

    /// Ids of `ids` that are not lane tasks; those that are are marked
    /// withdrawn in their lanes.
    pub fn withdraw(&self, ids: Vec<TaskId>) -> Vec<TaskId> {
        let (lanes, rest): (Vec<_>, Vec<_>) = ids.into_iter().partition(|&id| id >= FIRST_LANE_ID);
        for id in lanes {
            if let Some(lane) = self.find(id) {
                let _ = lane.finish(id, Finished::Withdrawn);
            }
        }
        rest
    }

    /// The pool stopped: what is still pending never finishes (and
    /// what had finished is not counted: the maps end).
    pub fn stop_all(&self, terminated: bool) {
        let staged = std::mem::take(&mut *lock(&self.staged));
        let _ = self.settle_all(staged.into_values().flatten().collect());
        let lanes: Vec<_> = lock(&self.open)
            .values()
            .filter_map(|(_, l)| l.upgrade())
            .collect();
        for lane in lanes {
            lane.end_all(|| Finished::Stopped(terminated));
        }
    }
}

/// A `map`'s handle on one lane (`PoolCore.submit_lane`).
#[pyclass(frozen, module = "ironpool._core")]
pub struct MapLane {
    lane: Arc<Lane>,
    lanes: Arc<Lanes>,
    /// The process that made it: a forked child's copy leaves the lanes
    /// alone, since another thread of the parent may have held their locks
    /// at the fork.
    pid: u32,
}

impl MapLane {
    pub fn new(lane: Arc<Lane>, lanes: Arc<Lanes>) -> Self {
        Self {
            lane,
            lanes,
            pid: std::process::id(),
        }
    }

    /// The task ids of the lane's chunks, in order.
    pub fn ids(&self) -> impl Iterator<Item = TaskId> + use<> {
        let first = self.lane.first;
        (0..self.chunks() as u64).map(move |i| first + i)
    }

    /// Task ids of the chunks not yet finished, from the front (for cancelling).
    pub fn unfinished(&self) -> Vec<TaskId> {
        let s = lock(&self.lane.state);
        (s.front..s.slots.len())
            .filter(|&i| matches!(s.slots[i], Slot::Pending))
            .map(|i| self.lane.first + i as u64)
            .collect()
    }

    pub fn withdrawn(&self, ids: &[TaskId]) {
        for &id in ids {
            let _ = self.lane.finish(id, Finished::Withdrawn);
        }
    }
}

impl Drop for MapLane {
    fn drop(&mut self) {
        if std::process::id() == self.pid {
            self.lanes.close(&self.lane);
        }
    }
}

/// What `MapLane.take` returns: values, chunks taken, and the chunk that
/// stopped it (its index and why).
type Taken<'py> = (
    Bound<'py, PyList>,
    usize,
    Option<(usize, &'static str, Py<PyAny>)>,
);

#[pymethods]
impl MapLane {
    /// Chunks in the lane.
    #[getter]
    fn chunks(&self) -> usize {
        lock(&self.lane.state).slots.len()
    }

    /// Chunks the map has not taken yet.
    #[getter]
    fn left(&self) -> usize {
        let s = lock(&self.lane.state);
        s.slots.len() - s.taken
    }

    /// Whether a chunk can be taken (it finished, or never will): the
    /// next one, or, out of order, any.
    fn done(&self) -> bool {
        lock(&self.lane.state).ready()
    }

    /// Chunks from the front that have not finished yet.
    fn outstanding(&self) -> usize {
        let s = lock(&self.lane.state);
        s.slots[s.front..]
            .iter()
            .filter(|slot| matches!(slot, Slot::Pending))
            .count()
    }

    /// Takes the finished chunks at the front, in order (out of order:
    /// every finished chunk): `(values, taken, stuck)`. `values` holds the
    /// items' values of the chunks that returned (unpickled with `loads`,
    /// each once); `stuck`, if not None, is `(index, kind, what)` for the
    /// chunk that stopped the run, counted in `taken`: `"returned"` and its
    /// `(values, failure)`, `"unpicklable"` and the exception unpickling
    /// raised, `"completion"` and the `Completion` of a chunk that did not
    /// return, or `"withdrawn"`, `"stopped"`, `"terminated"` (what is None).
    fn take<'py>(&self, py: Python<'py>, loads: &Bound<'py, PyAny>) -> PyResult<Taken<'py>> {
        // Taken out under the lock, unpickled without it: unpickling runs
        // Python, which may let the results thread in to publish.
        let ready = {
            let mut s = lock(&self.lane.state);
            let (front, ordered) = (s.front, s.ordered);
            let mut ready = Vec::new();
            for (i, slot) in s.slots.iter_mut().enumerate().skip(front) {
                match std::mem::replace(slot, Slot::Taken) {
                    Slot::Finished(how) => ready.push((i, how)),
                    other => {
                        *slot = other;
                        if ordered {
                            break;
                        }
                    }
                }
            }
            ready
        };
        let values = PyList::empty(py);
        let mut stuck = None;
        let mut used = 0;
        let mut ready = ready.into_iter();
        for (index, how) in ready.by_ref() {
            used += 1;
            let read = match how {
                Finished::Done(c) => read_chunk(py, c, loads),
                Finished::Withdrawn => Read::Stuck("withdrawn", py.None()),
                Finished::Stopped(true) => Read::Stuck("terminated", py.None()),
                Finished::Stopped(false) => Read::Stuck("stopped", py.None()),
            };
            match read {
                Read::Values(returned) => {
                    for v in returned.iter() {
                        values.append(v)?;
                    }
                }
                Read::Stuck(kind, what) => {
                    stuck = Some((index, kind, what));
                    break;
                }
            }
        }
        // What was taken out and not read goes back.
        let mut s = lock(&self.lane.state);
        for (i, how) in ready {
            s.slots[i] = Slot::Finished(how);
        }
        s.taken += used;
        while matches!(s.slots.get(s.front), Some(Slot::Taken)) {
            s.front += 1;
        }
        Ok((values, used, stuck))
    }
}

/// A finished chunk as the map takes it: the values of its items, or why
/// Python must handle it (`MapLane.take`).
enum Read<'py> {
    Values(Bound<'py, PyList>),
    Stuck(&'static str, Py<PyAny>),
}

/// Reads a finished chunk once: its values if it returned with no failure;
/// else `"returned"` and its unpickled `(values, failure)`, `"unpicklable"`
/// and the exception unpickling raised, or `"completion"` and the
/// `Completion` of a chunk that did not return.
fn read_chunk<'py>(py: Python<'py>, c: Completion, loads: &Bound<'py, PyAny>) -> Read<'py> {
    let Outcome::Returned(m) = &c.outcome else {
        return match outcome::completion(py, c) {
            Ok(done) => Read::Stuck("completion", done.into_any()),
            Err(e) => Read::Stuck("unpicklable", e.into_value(py).into_any()),
        };
    };
    match unpickle(py, m, loads) {
        Ok(pair) => match plain_values(&pair) {
            Some(values) => Read::Values(values),
            None => Read::Stuck("returned", pair.unbind()),
        },
        Err(e) => Read::Stuck("unpicklable", e.into_value(py).into_any()),
    }
}

/// A returned chunk's `(values, failure)`. A result of atoms (a tiny
/// task's) is one inline part, read here; anything else goes to `loads`.
fn unpickle<'py>(
    py: Python<'py>,
    m: &Message,
    loads: &Bound<'py, PyAny>,
) -> PyResult<Bound<'py, PyAny>> {
    if let Ok((parts, _)) = payload::decode(m)
        && let [Part::Inline(r)] = parts.as_slice()
        && let Some(pair) = m
            .body
            .get(r.clone())
            .and_then(|b| plain_pickle::read(py, b))
    {
        return Ok(pair);
    }
    loads.call1((buffers::decode(py, m, false)?,))
}

/// The values of `(values, None)`; None for any other shape.
fn plain_values<'py>(pair: &Bound<'py, PyAny>) -> Option<Bound<'py, PyList>> {
    let pair = pair.cast::<PyTuple>().ok()?;
    if pair.len() != 2 || !pair.get_item(1).ok()?.is_none() {
        return None;
    }
    pair.get_item(0).ok()?.cast_into::<PyList>().ok()
}
