//! Descriptor plumbing: duplicating, inheriting over exec, non-blocking
//! mode and reads, and the pipes that capture a worker's stdout/stderr.

use std::io;
use std::os::fd::{AsFd, OwnedFd};

/// A close-on-exec duplicate of `fd` (the same open file).
pub fn duplicate_fd(fd: impl AsFd) -> io::Result<OwnedFd> {
    Ok(rustix::io::fcntl_dupfd_cloexec(fd, 0)?)
}

/// Lets `fd` survive exec. Allocation-free, so it may run between fork
/// and exec.
pub fn set_inheritable(fd: impl AsFd) -> io::Result<()> {
    rustix::io::fcntl_setfd(fd, rustix::io::FdFlags::empty())?;
    Ok(())
}

pub fn set_nonblocking(fd: impl AsFd, on: bool) -> io::Result<()> {
    rustix::io::ioctl_fionbio(fd, on)?;
    Ok(())
}

/// One `read` into `buf`: 0 at end of file; a non-blocking descriptor with
/// nothing to read gives a `WouldBlock` error, a signal an `Interrupted` one.
pub fn read(fd: impl AsFd, buf: &mut [u8]) -> io::Result<usize> {
    Ok(rustix::io::read(fd, buf)?)
}

/// A pipe whose read end is non-blocking (worker stdout/stderr capture).
pub fn output_pipe() -> io::Result<(OwnedFd, OwnedFd)> {
    let (r, w) = rustix::pipe::pipe_with(rustix::pipe::PipeFlags::CLOEXEC)?;
    rustix::io::ioctl_fionbio(&r, true)?;
    Ok((r, w))
}

/// Points this process's stdout and stderr at the given descriptors.
pub fn redirect_stdio(out: impl AsFd, err: impl AsFd) -> io::Result<()> {
    rustix::stdio::dup2_stdout(out)?;
    rustix::stdio::dup2_stderr(err)?;
    Ok(())
}
