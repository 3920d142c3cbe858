//! The one boundary between ironpool and the operating system. No other
//! module of either crate calls the OS directly (no rustix, no libc); they
//! use the names re-exported here. (The integration tests in `tests/` call
//! rustix and libc themselves, to forge misbehaving peers.)
//!
//! The port contract: a port is one folder beside `linux/`, selected below
//! by `cfg(target_os)`, with the same capability modules, each providing
//! the items this file re-exports from it, with the same signatures and the
//! behaviour their docs promise. Nothing outside `platform/` changes. What
//! callers rely on most: a [`Pidfd`] never signals or reaps a recycled pid;
//! a segment after [`seal_readonly`] is immutable for every holder and
//! never shrinks under a mapping; a descriptor sent with [`send_with_fds`]
//! arrives atomically with its message; a child armed with
//! [`die_with_parent`] is killed once the thread that forked it is gone.

#[cfg(target_os = "linux")]
mod linux;
#[cfg(target_os = "linux")]
use linux as os;

#[cfg(not(target_os = "linux"))]
compile_error!("ironpool has no port for this OS: add a sibling of platform/linux");

// Descriptors: duplicating, inheriting, non-blocking reads, stdio capture.
pub use os::fd::{
    duplicate_fd, output_pipe, read, redirect_stdio, set_inheritable, set_nonblocking,
};
// The C heap, for memory C code frees itself (numpy's default handler).
pub use os::heap::{c_calloc, c_free, c_malloc, c_realloc};
// What the process may use and uses: CPUs (and whether all are busy),
// descriptors, resident memory.
pub use os::limits::{cpus_all_busy, default_workers, open_files_limit, resident_bytes};
// Whether the kernel's OOM killer ended a process (its memory cgroup's count).
pub use os::oom::{OOM_KILL_SIGNAL, OomCounter};
// Mappings of segments, and whether a private mapping was written.
pub use os::pages::{
    map_private, map_shared, page_size, pages_unmodified, remap_private_in_place, unmap,
};
// Readiness over many descriptors, its waker, doorbells between processes,
// and single-descriptor waits.
pub use os::poll::{Doorbell, Poller, Ready, Waker, wait_readable, wait_writable};
// Process handles, dying with the parent, process groups, children, fork hooks.
#[cfg(test)]
pub(crate) use os::process::run_in_forked_child;
pub use os::process::{
    Pidfd, become_child_subreaper, current_pid, die_with_parent, kill_process_group, own_children,
    put_in_own_process_group, run_around_fork, start_own_process_group, stop_dying_with_parent,
};
// Sealable shared-memory segments.
pub use os::segment::{
    is_sealed_against_shrinking, new_segment, open_segments, seal_readonly, segment_len,
    set_segment_len,
};
// Message sockets that carry descriptors.
pub use os::socket::{
    MAX_FDS_PER_MESSAGE, Received, message_socket_pair, recv_with_fds, send_with_fds, shutdown,
};
