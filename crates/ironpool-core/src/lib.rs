//! ironpool-core: the process-pool engine, with no Python in it.
//!
//! - [`zygote`]: the template process that forks workers, and the keeper
//!   thread that starts it.
//! - [`supervisor`]: the per-pool thread that dispatches tasks, watches
//!   workers, enforces limits and reports outcomes.
//! - [`ipc`]: frames over SOCK_SEQPACKET channels; payloads with parts.
//! - [`shm`]: sealed memfd segments and their mappings.
//! - [`platform`]: the only module that calls the OS; one folder per OS.
//! - [`reactor`]: what a poller event came from (one enum for both loops).
//! - [`task`]: tasks and their outcomes.

pub mod id_hash;
pub mod ipc;
pub mod platform;
pub mod reactor;
pub mod shm;
pub mod supervisor;
pub mod task;
pub mod zygote;
