//! Counters that tests read to prove nothing leaked (`ironpool._testing`
//! re-exports them); not part of ironpool's API.

use pyo3::prelude::*;

/// Segments mapped in this process right now.
#[pyfunction]
pub fn live_mappings() -> usize {
    ironpool_core::shm::live_mappings()
}

/// ironpool segments (memfds) this process holds open.
#[pyfunction]
pub fn open_segments() -> usize {
    ironpool_core::platform::open_segments()
}
