//! `ironpool._core`: the compiled half of ironpool. A list of exports; the
//! logic lives in `ironpool-core`.

mod buffers;
mod errors;
mod numpy_alloc;
mod outcome;
mod pool;
mod worker;
mod zygote;

use pyo3::prelude::*;

/// Engine facts for tests and diagnostics.
#[pyfunction]
fn default_workers() -> usize {
    ironpool_core::platform::default_workers()
}

/// Segments mapped in this process right now.
#[pyfunction]
fn live_mappings() -> usize {
    ironpool_core::shm::live_mappings()
}

/// ironpool segments (memfds) this process holds open.
#[pyfunction]
fn open_memfds() -> usize {
    ironpool_core::platform::open_segments()
}

/// Private resident memory of `pid` in bytes, if readable.
#[pyfunction]
fn resident_bytes(pid: i32) -> Option<u64> {
    ironpool_core::platform::resident_bytes(pid)
}

#[pymodule]
mod _core {
    #[pymodule_export]
    use super::buffers::{RegisteredPayload, SharedBuffer, digest};
    #[pymodule_export]
    use super::numpy_alloc::{
        in_shared_memory, set_numpy_handler, shared_memory_handler, shared_memory_stats,
    };
    #[pymodule_export]
    use super::outcome::{
        Completion, CrashReport, Crashed, Raised, Returned, StartFailed, TimedOut,
    };
    #[pymodule_export]
    use super::pool::PoolCore;
    #[pymodule_export]
    use super::worker::worker_main;
    #[pymodule_export]
    use super::zygote::{WorkerChannel, Zygote, zygote_fail, zygote_serve};
    #[pymodule_export]
    use super::{default_workers, live_mappings, open_memfds, resident_bytes};
}
