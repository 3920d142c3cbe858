//! The Linux port: pidfd, `waitid(P_PIDFD)`, PR_SET_PDEATHSIG and
//! PR_SET_CHILD_SUBREAPER, epoll and eventfd, memfd seals, `/proc`, cgroup
//! v2 quotas, cgroup OOM kill counters, SOCK_SEQPACKET with SCM_RIGHTS. One module per capability;
//! `platform/mod.rs` lists what each must provide.

pub mod fd;
pub mod heap;
pub mod limits;
pub mod oom;
pub mod pages;
pub mod poll;
pub mod process;
pub mod segment;
pub mod socket;
