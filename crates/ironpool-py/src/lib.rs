//! `ironpool._core`: the compiled half of ironpool. A list of exports; the
//! logic lives in `ironpool-core`.

mod buffers;
mod errors;
mod lanes;
mod numpy_alloc;
mod outcome;
mod plain;
mod plain_pickle;
mod pool;
mod testing;
mod worker;
mod zygote;

use pyo3::prelude::*;

/// Workers a pool starts by default: the CPUs this process may use.
#[pyfunction]
fn default_workers() -> usize {
    ironpool_core::platform::default_workers()
}

#[pymodule]
mod _core {
    #[pymodule_export]
    use super::buffers::{RegisteredPayload, SegmentView, digest};
    #[pymodule_export]
    use super::default_workers;
    #[pymodule_export]
    use super::lanes::MapLane;
    #[pymodule_export]
    use super::numpy_alloc::{
        in_shared_memory, set_numpy_handler, shared_memory_handler, shared_memory_stats,
    };
    #[pymodule_export]
    use super::outcome::{
        Completion, CrashReport, Crashed, Raised, Returned, StartFailed, TimedOut,
    };
    #[pymodule_export]
    use super::plain::{atoms_only, plain_call, plain_items};
    #[pymodule_export]
    use super::plain_pickle::{lane_pickle, lane_unpickle};
    #[pymodule_export]
    use super::pool::PoolCore;
    #[pymodule_export]
    use super::testing::{live_mappings, open_segments};
    #[pymodule_export]
    use super::worker::worker_main;
    #[pymodule_export]
    use super::zygote::{
        LogSender, WarmRequest, WorkerChannel, Zygote, die_with_parent, zygote_fail, zygote_serve,
    };
}
