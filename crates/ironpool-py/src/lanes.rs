//! Map lanes: a window of a `map`'s small chunks, submitted with one call
//! and settled here in the binding. A chunk of a lane never becomes a
//! future, a ticket or a `Completion` object: its completion waits in its
//! lane's slot until the map takes the lane's finished chunks in order, and
//! their values are unpickled straight into one list. A chunk that did not
//! simply return is handed to Python as a `Completion`, where every
//! failure is handled as for any other chunk.
//!
//! Lane task ids start at [`FIRST_LANE_ID`], above any id the Python side
//! gives a task, so a completion's id says whether a lane waits for it.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, Weak};

use ironpool_core::task::{Completion, Outcome, TaskId};
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
    Done(Completion),
    /// Out with the map's thread while it unpickles.
    Taken,
    /// Cancelled before a worker took it.
    Withdrawn,
    /// The pool stopped (true: it was terminated) before it finished.
    Stopped(bool),
}

struct LaneState {
    slots: Vec<Slot>,
    /// The next chunk the map takes.
    front: usize,
}

/// One lane's chunks, shared by the map's handle and the pool's router.
pub struct Lane {
    first: TaskId,
    state: Mutex<LaneState>,
}

impl Lane {
    fn settle(&self, id: TaskId, completion: Completion) {
        let mut s = lock(&self.state);
        let slot = &mut s.slots[(id - self.first) as usize];
        if matches!(slot, Slot::Pending) {
            *slot = Slot::Done(completion);
        }
    }

    fn stop(&self, terminated: bool) {
        let mut s = lock(&self.state);
        for slot in &mut s.slots {
            if matches!(slot, Slot::Pending) {
                *slot = Slot::Stopped(terminated);
            }
        }
    }
}

/// Every open lane of one pool, and completions waiting to be routed.
#[derive(Default)]
pub struct Lanes {
    next_id: AtomicU64,
    /// By first task id; a lane whose handle is gone is dropped.
    open: Mutex<BTreeMap<TaskId, (usize, Weak<Lane>)>>,
    /// Lane completions received and not yet put in their slots: they are
    /// routed after the logging records workers sent before them have been
    /// handled (`PoolCore.publish_lanes`).
    staged: Mutex<Vec<Completion>>,
}

impl Lanes {
    /// Room for `chunks` task ids, and the lane that waits for them.
    pub fn open(&self, chunks: usize) -> Arc<Lane> {
        let first = FIRST_LANE_ID + self.next_id.fetch_add(chunks as u64, Ordering::Relaxed);
        let lane = Arc::new(Lane {
            first,
            state: Mutex::new(LaneState {
                slots: (0..chunks).map(|_| Slot::Pending).collect(),
                front: 0,
            }),
        });
        lock(&self.open).insert(first, (chunks, Arc::downgrade(&lane)));
        lane
    }

    pub fn close(&self, lane: &Lane) {
        lock(&self.open).remove(&lane.first);
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
        lock(&self.staged).extend(lanes);
        rest
    }

    /// Puts staged completions in their slots; true if there were any.
    pub fn publish(&self) -> bool {
        let staged = std::mem::take(&mut *lock(&self.staged));
        let any = !staged.is_empty();
        for c in staged {
            if let Some(lane) = self.find(c.task_id) {
                lane.settle(c.task_id, c);
            }
        }
        any
    }

    /// Ids of `ids` that are not lane tasks; those that are are marked
    /// withdrawn in their lanes.
    pub fn withdraw(&self, ids: Vec<TaskId>) -> Vec<TaskId> {
        let (lanes, rest): (Vec<_>, Vec<_>) = ids.into_iter().partition(|&id| id >= FIRST_LANE_ID);
        for id in lanes {
            if let Some(lane) = self.find(id) {
                let mut s = lock(&lane.state);
                let slot = &mut s.slots[(id - lane.first) as usize];
                if matches!(slot, Slot::Pending) {
                    *slot = Slot::Withdrawn;
                }
            }
        }
        rest
    }

    /// The pool stopped: what is still pending never finishes.
    pub fn stop_all(&self, terminated: bool) {
        self.publish();
        let lanes: Vec<_> = lock(&self.open)
            .values()
            .filter_map(|(_, l)| l.upgrade())
            .collect();
        for lane in lanes {
            lane.stop(terminated);
        }
    }
}

/// A `map`'s handle on one lane (`PoolCore.submit_lane`).
#[pyclass(frozen, module = "ironpool._core")]
pub struct MapLane {
    lane: Arc<Lane>,
    lanes: Arc<Lanes>,
}

impl MapLane {
    pub fn new(lane: Arc<Lane>, lanes: Arc<Lanes>) -> Self {
        Self { lane, lanes }
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
        let mut s = lock(&self.lane.state);
        for id in ids {
            let slot = &mut s.slots[(id - self.lane.first) as usize];
            if matches!(slot, Slot::Pending) {
                *slot = Slot::Withdrawn;
            }
        }
    }
}

impl Drop for MapLane {
    fn drop(&mut self) {
        self.lanes.close(&self.lane);
    }
}

/// What `MapLane.take` returns: values, chunks taken, and the chunk that
/// stopped it (its index and why).
type Taken<'py> = (Bound<'py, PyList>, usize, Option<(usize, Py<PyAny>)>);

/// Why the map's next chunk could not be taken as values.
enum Stuck {
    Completion(Completion),
    Withdrawn,
    Stopped(bool),
}

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
        s.slots.len() - s.front
    }

    /// Whether the next chunk can be taken (it finished, or never will).
    fn done(&self) -> bool {
        let s = lock(&self.lane.state);
        s.slots
            .get(s.front)
            .is_some_and(|slot| !matches!(slot, Slot::Pending))
    }

    /// Chunks from the front that have not finished yet.
    fn outstanding(&self) -> usize {
        let s = lock(&self.lane.state);
        s.slots[s.front..]
            .iter()
            .filter(|slot| matches!(slot, Slot::Pending))
            .count()
    }

    /// Takes the finished chunks at the front, in order: `(values, taken,
    /// stuck)`. `values` holds the items' values of the chunks that
    /// returned (unpickled with `loads`); `stuck`, if not None, is
    /// `(index, what)` for the chunk that stopped the run, counted in
    /// `taken`: a `Completion` (it did not simply return, or its value
    /// could not be unpickled here), `"withdrawn"`, `"stopped"` or
    /// `"terminated"`.
    fn take<'py>(&self, py: Python<'py>, loads: &Bound<'py, PyAny>) -> PyResult<Taken<'py>> {
        // Taken out under the lock, unpickled without it: unpickling runs
        // Python, which may let the results thread in to publish.
        let (base, mut ready) = {
            let mut s = lock(&self.lane.state);
            let base = s.front;
            let mut ready = Vec::new();
            for slot in &mut s.slots[base..] {
                if matches!(slot, Slot::Pending) {
                    break;
                }
                ready.push(std::mem::replace(slot, Slot::Taken));
            }
            (base, ready)
        };
        let values = PyList::empty(py);
        let mut stuck = None;
        let mut used = 0;
        for slot in &mut ready {
            used += 1;
            let done = match std::mem::replace(slot, Slot::Taken) {
                Slot::Done(c) => c,
                Slot::Withdrawn => {
                    stuck = Some(Stuck::Withdrawn);
                    break;
                }
                Slot::Stopped(t) => {
                    stuck = Some(Stuck::Stopped(t));
                    break;
                }
                other => {
                    // Not finished after all (never so: only finished slots were taken).
                    *slot = other;
                    used -= 1;
                    break;
                }
            };
            if let Some(returned) = returned_values(py, &done, loads) {
                for v in returned.iter() {
                    values.append(v)?;
                }
            } else {
                stuck = Some(Stuck::Completion(done));
                break;
            }
        }
        // What was taken out and not used goes back.
        {
            let mut s = lock(&self.lane.state);
            for (i, slot) in ready.into_iter().enumerate().skip(used) {
                s.slots[base + i] = slot;
            }
            s.front = base + used;
        }
        let stuck = match stuck {
            None => None,
            Some(what) => {
                let what = match what {
                    Stuck::Completion(c) => outcome::completion(py, c)?.into_any(),
                    Stuck::Withdrawn => "withdrawn".into_pyobject(py)?.into_any().unbind(),
                    Stuck::Stopped(false) => "stopped".into_pyobject(py)?.into_any().unbind(),
                    Stuck::Stopped(true) => "terminated".into_pyobject(py)?.into_any().unbind(),
                };
                Some((base + used - 1, what))
            }
        };
        Ok((values, used, stuck))
    }
}

/// The values of a chunk that returned with no failure, or `None` for
/// Python to handle it (a failure, or a value that would not unpickle).
fn returned_values<'py>(
    py: Python<'py>,
    c: &Completion,
    loads: &Bound<'py, PyAny>,
) -> Option<Bound<'py, PyList>> {
    let Outcome::Returned(m) = &c.outcome else {
        return None;
    };
    // A result of atoms (a tiny task's) is one inline part, read here.
    let inline = match payload::decode(m) {
        Ok((parts, _)) => match parts.as_slice() {
            [Part::Inline(r)] => m.body.get(r.clone()),
            _ => None,
        },
        Err(_) => None,
    };
    let pair = match inline.and_then(|bytes| plain_pickle::read(py, bytes)) {
        Some(pair) => pair,
        None => loads.call1((buffers::decode(py, m, false).ok()?,)).ok()?,
    };
    let pair = pair.cast_into::<PyTuple>().ok()?;
    if pair.len() != 2 || !pair.get_item(1).ok()?.is_none() {
        return None;
    }
    pair.get_item(0).ok()?.cast_into::<PyList>().ok()
}
