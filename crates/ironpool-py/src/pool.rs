//! `PoolCore`: the Python face of one supervisor. Policy lives in the core
//! crate; this file converts arguments and outcomes and detaches from the
//! interpreter whenever it waits.

use std::sync::Arc;
use std::time::Duration;

use ironpool_core::ipc::{Kind, Message, payload};
use ironpool_core::supervisor::{Pool, PoolConfig};
use ironpool_core::task::Task;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList};

use crate::buffers;
use crate::errors::Error;
use crate::lanes::{Lanes, MapLane};
use crate::outcome::{Completion, completions};
use crate::plain_pickle::pickle_chunk;
use crate::zygote::Zygote;

/// A task of `function_id` with its limits; `payload` carries the flags.
fn task(
    id: u64,
    function_id: u64,
    payload: Message,
    timeout: Option<Duration>,
    retries: u32,
    items: u32,
) -> Task {
    let mut task = Task::new(id, function_id, payload);
    task.timeout = timeout;
    task.retries_left = retries;
    task.items = items;
    task
}

fn seconds(s: Option<f64>) -> PyResult<Option<Duration>> {
    match s {
        None => Ok(None),
        Some(v) if v.is_finite() && v > 0.0 => Ok(Some(Duration::from_secs_f64(v))),
        Some(v) => Err(Error::Value(format!(
            "a time limit must be a positive number of seconds, got {v}"
        ))
        .into()),
    }
}

/// One pool's engine. Created by `ironpool.Pool`; not for direct use.
#[pyclass(frozen, module = "ironpool._core")]
pub struct PoolCore {
    pool: Pool,
    threshold: usize,
    lanes: Arc<Lanes>,
}

impl PoolCore {
    /// Keeps back a batch's lane completions for `publish_lanes`; the end
    /// of the pool (None) ends every lane's pending chunks.
    fn route(
        &self,
        batch: Option<Vec<ironpool_core::task::Completion>>,
    ) -> Option<Vec<ironpool_core::task::Completion>> {
        match batch {
            Some(b) => Some(self.lanes.stage(b)),
            None => {
                self.lanes.stop_all(false);
                self.pool.kick();
                None
            }
        }
    }
}

#[pymethods]
impl PoolCore {
    #[new]
    #[pyo3(signature = (zygote, workers, init_parts, threshold, prefetch=1, task_timeout=None,
        max_tasks_per_worker=None, max_memory=None, hard_memory_factor=1.5,
        max_start_failures=3, forward_output=true))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        zygote: &Zygote,
        workers: usize,
        init_parts: &Bound<'_, PyList>,
        threshold: usize,
        prefetch: usize,
        task_timeout: Option<f64>,
        max_tasks_per_worker: Option<u64>,
        max_memory: Option<u64>,
        hard_memory_factor: f64,
        max_start_failures: u32,
        forward_output: bool,
    ) -> PyResult<Self> {
        let config = PoolConfig {
            workers,
            prefetch,
            task_timeout: seconds(task_timeout)?,
            max_tasks_per_worker,
            max_memory,
            hard_memory_factor,
            max_start_failures,
            forward_output,
            ..PoolConfig::default()
        };
        let init = buffers::encode(py, Kind::Init, 0, 0, init_parts, threshold)?;
        let zygote = zygote.inner.clone();
        let pool = py
            .detach(move || Pool::start(&zygote, config, init))
            .map_err(|e| Error::io("could not start the pool", e))?;
        Ok(Self {
            pool,
            threshold,
            lanes: Arc::default(),
        })
    }

    /// Queues task `task_id` calling function `function_id` with the payload `parts`.
    #[pyo3(signature = (task_id, function_id, parts, timeout=None, retries=0, items=1, flags=0, needs=Vec::new()))]
    #[allow(clippy::too_many_arguments)]
    fn submit(
        &self,
        py: Python<'_>,
        task_id: u64,
        function_id: u64,
        parts: &Bound<'_, PyList>,
        timeout: Option<f64>,
        retries: u32,
        items: u32,
        flags: u8,
        needs: Vec<u64>,
    ) -> PyResult<()> {
        let mut payload =
            buffers::encode(py, Kind::Task, task_id, function_id, parts, self.threshold)?;
        payload.flags = flags;
        let mut task = task(
            task_id,
            function_id,
            payload,
            seconds(timeout)?,
            retries,
            items,
        );
        task.needs = needs;
        self.pool.submit(task);
        Ok(())
    }

    /// Queues several tasks of function `function_id` at once (a `map`'s
    /// chunks): `tasks` holds `(task_id, parts, items, needs)` for each.
    #[pyo3(signature = (function_id, tasks, timeout=None, retries=0, flags=0))]
    fn submit_many(
        &self,
        py: Python<'_>,
        function_id: u64,
        tasks: Vec<(u64, Bound<'_, PyList>, u32, Vec<u64>)>,
        timeout: Option<f64>,
        retries: u32,
        flags: u8,
    ) -> PyResult<()> {
        let timeout = seconds(timeout)?;
        let mut queued = Vec::with_capacity(tasks.len());
        for (task_id, parts, items, needs) in tasks {
            let mut payload =
                buffers::encode(py, Kind::Task, task_id, function_id, &parts, self.threshold)?;
            payload.flags = flags;
            let mut task = task(task_id, function_id, payload, timeout, retries, items);
            task.needs = needs;
            queued.push(task);
        }
        self.pool.submit_many(queued);
        Ok(())
    }

    /// Queues `items` (a list or a range) of a `map` of function
    /// `function_id` as chunks of `chunk` items in one lane (see
    /// `lanes.rs`); None, with nothing queued, if an item is not one the
    /// lane's writer pickles (the map then sends them as tickets).
    /// `ordered`: the map takes the chunks in order; else as they finish.
    /// `progress`: called with the number of items of chunks that returned,
    /// from the thread that puts them in the lane (`publish_lanes`).
    #[pyo3(signature = (function_id, items, chunk, timeout=None, retries=0, flags=0, ordered=true, progress=None))]
    #[allow(clippy::too_many_arguments)]
    fn submit_lane(
        &self,
        function_id: u64,
        items: &Bound<'_, PyAny>,
        chunk: usize,
        timeout: Option<f64>,
        retries: u32,
        flags: u8,
        ordered: bool,
        progress: Option<Py<PyAny>>,
    ) -> PyResult<Option<MapLane>> {
        let timeout = seconds(timeout)?;
        if chunk == 0 {
            return Err(Error::Value("a lane's chunks need at least one item".into()).into());
        }
        let items: Vec<_> = items.try_iter()?.collect::<PyResult<_>>()?;
        if items.is_empty() {
            return Ok(None); // a lane of no chunks would reserve no ids
        }
        let mut pickles = Vec::with_capacity(items.len().div_ceil(chunk));
        for part in items.chunks(chunk) {
            match pickle_chunk(part, self.threshold) {
                Some(p) => pickles.push((p, part.len())),
                None => return Ok(None),
            }
        }
        let lane = self.lanes.open(items.len(), chunk, ordered, progress);
        let handle = MapLane::new(lane, self.lanes.clone());
        let mut tasks = Vec::with_capacity(pickles.len());
        for (id, (bytes, n)) in handle.ids().zip(pickles) {
            let mut msg = payload::encode(Kind::Task, id, function_id, &[&bytes], self.threshold)
                .map_err(|e| Error::io("could not build message", e))?;
            msg.flags = flags;
            tasks.push(task(id, function_id, msg, timeout, retries, n as u32));
        }
        self.pool.submit_many(tasks);
        Ok(Some(handle))
    }

    /// Withdraws a lane's chunks that no worker has taken.
    fn cancel_lane(&self, lane: &MapLane) {
        let withdrawn: Vec<_> = lane
            .unfinished()
            .into_iter()
            .filter(|&id| self.pool.cancel(id))
            .collect();
        lane.withdrawn(&withdrawn);
    }

    /// Chunks of the pool's lanes not finished yet.
    fn lane_chunks_pending(&self) -> usize {
        self.lanes.pending()
    }

    /// Puts the lane completions of the last wait in their lanes, once the
    /// logging records before them are handled; wakes callers waiting on
    /// a lane if there were any.
    fn publish_lanes(&self, py: Python<'_>) -> PyResult<()> {
        self.lanes.publish(py, || self.pool.kick())
    }

    /// Makes object `id` (a function or a shared argument) known to the pool;
    /// the engine sends it to each worker once, before the first task that needs it.
    fn register_object(&self, py: Python<'_>, id: u64, parts: &Bound<'_, PyList>) -> PyResult<()> {
        let msg = buffers::encode(py, Kind::Register, id, 0, parts, self.threshold)?;
        self.pool.register_object(id, msg);
        Ok(())
    }

    /// Registers a shared object like [`PoolCore::register_object`], returning
    /// the digest of the bytes registered (as `ironpool._core.digest` gives
    /// it), taken while copying them, so they are read once; `None` if they
    /// changed while being registered.
    fn register_digested<'py>(
        &self,
        py: Python<'py>,
        id: u64,
        parts: &Bound<'py, PyList>,
    ) -> PyResult<Option<Bound<'py, PyBytes>>> {
        let (msg, d) =
            buffers::encode_digested(py, Kind::Register, id, 0, parts, self.threshold, true)?;
        self.pool.register_object(id, msg);
        Ok(d.map(|d| PyBytes::new(py, &d.to_le_bytes())))
    }

    /// Forgets registered object `id` here and in every worker.
    fn unregister(&self, id: u64) {
        self.pool.unregister(id);
    }

    /// Withdraws a task not yet sent to a worker; false if it was sent.
    fn cancel(&self, task_id: u64) -> bool {
        self.pool.cancel(task_id)
    }

    fn is_dispatched(&self, task_id: u64) -> bool {
        self.pool.is_dispatched(task_id)
    }

    /// Drops all tasks not yet sent to a worker; returns their ids.
    fn cancel_pending(&self, py: Python<'_>) -> Vec<u64> {
        self.lanes
            .withdraw(py.detach(|| self.pool.cancel_pending()))
    }

    fn shutdown(&self) {
        self.pool.shutdown();
    }

    fn terminate(&self) {
        self.lanes.stop_all(true);
        self.pool.terminate();
    }

    /// Waits for the workers to stop; with a timeout, gives up after it and
    /// returns whether they had.
    #[pyo3(signature = (timeout=None))]
    fn join(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<bool> {
        match seconds(timeout)? {
            None => {
                py.detach(|| self.pool.join());
                Ok(true)
            }
            Some(t) => Ok(py.detach(|| self.pool.join_within(t))),
        }
    }

    /// Finished tasks as `Completion` objects; `None` once the pool has
    /// stopped and all were delivered.
    #[pyo3(signature = (timeout=None))]
    fn wait_completions<'py>(
        &self,
        py: Python<'py>,
        timeout: Option<f64>,
    ) -> PyResult<Option<Vec<Py<Completion>>>> {
        let timeout = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        let batch = py.detach(|| self.pool.wait_completions(timeout));
        completions(py, self.route(batch))
    }

    /// Like `wait_completions`, but for a caller that wants one result now:
    /// polls the workers itself for up to `spin` seconds first, and returns
    /// (possibly empty) once the generation moves past `generation`.
    #[pyo3(signature = (generation, spin, timeout=None))]
    fn wait_driving<'py>(
        &self,
        py: Python<'py>,
        generation: u64,
        spin: f64,
        timeout: Option<f64>,
    ) -> PyResult<Option<Vec<Py<Completion>>>> {
        let timeout = timeout.map(|t| Duration::from_secs_f64(t.max(0.0)));
        let spin = Duration::from_secs_f64(spin.max(0.0));
        let batch = py.detach(|| self.pool.wait_driving(generation, spin, timeout));
        completions(py, self.route(batch))
    }

    /// Workers' logging records since the last call, oldest first: each a
    /// list of payload parts (the pickled state of one record). A task's
    /// records are here before its completion is.
    fn take_logs<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyList>>> {
        self.pool
            .take_logs()
            .iter()
            .map(|m| buffers::decode(py, m, false))
            .collect()
    }

    /// Tasks submitted while the engine was busy, which went through its
    /// inbox (a diagnostic: the tests check the path runs).
    fn inboxed(&self) -> u64 {
        self.pool.inboxed()
    }

    fn generation(&self) -> u64 {
        self.pool.generation()
    }

    /// Wakes callers blocked in `wait_driving` to re-check their futures.
    fn kick(&self) {
        self.pool.kick();
    }

    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        self.pool
            .stats()
            .into_iter()
            .map(|s| {
                let d = PyDict::new(py);
                d.set_item("slot", s.slot)?;
                d.set_item("pid", s.pid)?;
                d.set_item("tasks_done", s.tasks_done)?;
                d.set_item("busy", s.busy)?;
                d.set_item("rss", s.rss)?;
                d.set_item("restarts", s.restarts)?;
                d.set_item("last_exit", s.last_exit)?;
                d.set_item("busy_seconds", s.busy_ns as f64 / 1e9)?;
                Ok(d)
            })
            .collect()
    }

    /// The pool's task figures: submitted, queued, running, returned,
    /// failed, retried, items_done, task_seconds.
    fn counts<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let c = self.pool.counts();
        let d = PyDict::new(py);
        d.set_item("submitted", c.submitted)?;
        d.set_item("queued", c.queued)?;
        d.set_item("running", c.running)?;
        d.set_item("returned", c.returned)?;
        d.set_item("failed", c.failed)?;
        d.set_item("retried", c.retried)?;
        d.set_item("items_done", c.items_done)?;
        d.set_item("task_seconds", c.task_ns as f64 / 1e9)?;
        Ok(d)
    }

    /// Items for the next `map` chunk of `function_id`, from measured task times.
    #[pyo3(signature = (function_id, remaining=None))]
    fn chunk_size(&self, function_id: u64, remaining: Option<usize>) -> usize {
        self.pool.chunk_size(function_id, remaining)
    }
}
