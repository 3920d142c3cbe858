//! Readiness: a level-triggered poller over many descriptors (epoll), a
//! waker for it (eventfd), and waits on a single descriptor (`poll`).

use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::RwLock;
use std::time::Duration;

use rustix::event::{PollFd, PollFlags};

fn timespec(d: Duration) -> rustix::time::Timespec {
    rustix::time::Timespec {
        tv_sec: d.as_secs() as i64,
        tv_nsec: d.subsec_nanos() as i64,
    }
}

/// One `poll` on `fd` for `flags`, up to `timeout` (forever if `None`);
/// true if `fd` became ready. EINTR is the caller's to handle.
fn wait_one(fd: impl AsFd, flags: PollFlags, timeout: Option<Duration>) -> io::Result<bool> {
    let mut fds = [PollFd::new(&fd, flags)];
    let ts = timeout.map(timespec);
    Ok(rustix::event::poll(&mut fds, ts.as_ref())? > 0)
}

/// Waits up to `timeout` (forever if `None`) until `fd` is readable, hung
/// up, or (a process handle) its process has exited. True if it is; an
/// interrupted wait is an `Interrupted` error.
pub fn wait_readable(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<bool> {
    wait_one(fd, PollFlags::IN, timeout)
}

/// Like [`wait_readable`], until `fd` has room to write.
pub fn wait_writable(fd: impl AsFd, timeout: Option<Duration>) -> io::Result<bool> {
    wait_one(fd, PollFlags::OUT, timeout)
}

/// Readiness of one registered descriptor.
#[derive(Debug, Clone, Copy)]
pub struct Ready {
    pub token: u64,
    pub readable: bool,
    pub writable: bool,
}

/// Level-triggered readiness over many descriptors (epoll). Closable, so a
/// finished pool gives its descriptor back while its handle lives on.
#[derive(Debug)]
pub struct Poller {
    ep: RwLock<Option<OwnedFd>>,
}

fn closed() -> io::Error {
    io::Error::new(io::ErrorKind::NotConnected, "poller closed")
}

impl Poller {
    pub fn new() -> io::Result<Self> {
        use rustix::event::epoll;
        Ok(Self {
            ep: RwLock::new(Some(epoll::create(epoll::CreateFlags::CLOEXEC)?)),
        })
    }

    fn flags(write: bool) -> rustix::event::epoll::EventFlags {
        use rustix::event::epoll::EventFlags;
        if write {
            EventFlags::IN | EventFlags::OUT
        } else {
            EventFlags::IN
        }
    }

    fn with<T>(&self, f: impl FnOnce(&OwnedFd) -> io::Result<T>) -> io::Result<T> {
        let guard = self.ep.read().unwrap_or_else(|p| p.into_inner());
        guard.as_ref().map_or_else(|| Err(closed()), f)
    }

    pub fn add(&self, fd: impl AsFd, token: u64, write: bool) -> io::Result<()> {
        use rustix::event::epoll;
        self.with(|ep| {
            epoll::add(ep, fd, epoll::EventData::new_u64(token), Self::flags(write))?;
            Ok(())
        })
    }

    /// Sets what wakes this poller's waiters for a registered `fd`: its
    /// data (`read`) and room to write (`write`). A hang-up or an error is
    /// reported either way (epoll always watches those).
    pub fn set_interest(
        &self,
        fd: impl AsFd,
        token: u64,
        read: bool,
        write: bool,
    ) -> io::Result<()> {
        use rustix::event::epoll::{self, EventFlags};
        let mut flags = EventFlags::empty();
        if read {
            flags |= EventFlags::IN;
        }
        if write {
            flags |= EventFlags::OUT;
        }
        self.with(|ep| {
            epoll::modify(ep, fd, epoll::EventData::new_u64(token), flags)?;
            Ok(())
        })
    }

    /// Watches `inner` (another poller) under `token`: this poller is ready
    /// while `inner` has events, which [`Poller::wait`] on `inner` then reads.
    pub fn add_poller(&self, inner: &Poller, token: u64) -> io::Result<()> {
        inner.with(|fd| self.add(fd, token, false))
    }

    /// Stops (`muted`) or resumes waking this poller's waiters for `inner`'s
    /// events. Resuming while `inner` has events wakes a waiter at once.
    pub fn mute_poller(&self, inner: &Poller, token: u64, muted: bool) -> io::Result<()> {
        use rustix::event::epoll::{self, EventFlags};
        let flags = if muted {
            EventFlags::empty()
        } else {
            Self::flags(false)
        };
        inner.with(|fd| {
            self.with(|ep| {
                Ok(epoll::modify(
                    ep,
                    fd,
                    epoll::EventData::new_u64(token),
                    flags,
                )?)
            })
        })
    }

    pub fn delete(&self, fd: impl AsFd) {
        let _ = self.with(|ep| Ok(rustix::event::epoll::delete(ep, fd)?));
    }

    /// Closes the epoll descriptor; later waits return no events at once.
    pub fn close(&self) {
        self.ep.write().unwrap_or_else(|p| p.into_inner()).take();
    }

    /// Waits up to `timeout` (forever if `None`); EINTR counts as no events.
    pub fn wait(&self, timeout: Option<Duration>) -> io::Result<Vec<Ready>> {
        use rustix::event::epoll::{self, EventFlags};
        let ts = timeout.map(timespec);
        let mut events = Vec::with_capacity(64);
        let guard = self.ep.read().unwrap_or_else(|p| p.into_inner());
        let Some(ep) = guard.as_ref() else {
            return Ok(Vec::new());
        };
        match epoll::wait(ep, rustix::buffer::spare_capacity(&mut events), ts.as_ref()) {
            Ok(_) | Err(rustix::io::Errno::INTR) => {}
            Err(e) => return Err(e.into()),
        }
        drop(guard);
        Ok(events
            .iter()
            .map(|e| {
                let flags = e.flags;
                let data = e.data;
                let hup = flags.intersects(EventFlags::HUP | EventFlags::ERR | EventFlags::RDHUP);
                Ready {
                    token: data.u64(),
                    readable: flags.contains(EventFlags::IN) || hup,
                    writable: flags.contains(EventFlags::OUT) || hup,
                }
            })
            .collect())
    }
}

/// A counter one process rings and another watches (an eventfd shared
/// through a fork): it stays readable from the first ring until cleared,
/// so a ring between a reader's look and its sleep is never lost.
#[derive(Debug)]
pub struct Doorbell {
    fd: OwnedFd,
}

impl Doorbell {
    pub fn new() -> io::Result<Self> {
        use rustix::event::EventfdFlags;
        let fd = rustix::event::eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        Ok(Self { fd })
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Self { fd }
    }

    pub fn try_clone(&self) -> io::Result<Self> {
        Ok(Self {
            fd: super::fd::duplicate_fd(&self.fd)?,
        })
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    /// Best effort: the only failure of a non-blocking eventfd write is a
    /// counter near overflow, which is readable anyway.
    pub fn ring(&self) {
        let _ = rustix::io::write(&self.fd, &1u64.to_ne_bytes());
    }

    /// Clears the rings so far (before reading what they announced).
    pub fn clear(&self) {
        let mut b = [0u8; 8];
        let _ = rustix::io::read(&self.fd, &mut b);
    }
}

impl AsFd for Doorbell {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

/// Wakes a thread blocked in [`Poller::wait`]: a [`Doorbell`] within one
/// process. Closable like the poller; waking a closed one does nothing.
#[derive(Debug)]
pub struct Waker {
    bell: RwLock<Option<Doorbell>>,
}

impl Waker {
    pub fn new() -> io::Result<Self> {
        Ok(Self {
            bell: RwLock::new(Some(Doorbell::new()?)),
        })
    }

    fn with(&self, f: impl FnOnce(&Doorbell)) {
        if let Some(bell) = self.bell.read().unwrap_or_else(|p| p.into_inner()).as_ref() {
            f(bell);
        }
    }

    pub fn wake(&self) {
        self.with(Doorbell::ring);
    }

    pub fn drain(&self) {
        self.with(Doorbell::clear);
    }

    /// Registers this waker with `poller` under `token`.
    pub fn register(&self, poller: &Poller, token: u64) -> io::Result<()> {
        let guard = self.bell.read().unwrap_or_else(|p| p.into_inner());
        let bell = guard.as_ref().ok_or_else(closed)?;
        poller.add(bell, token, false)
    }

    pub fn close(&self) {
        self.bell.write().unwrap_or_else(|p| p.into_inner()).take();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_muted_nested_poller_stays_quiet_until_unmuted_with_events_waiting() {
        let (outer, inner, waker) = (
            Poller::new().unwrap(),
            Poller::new().unwrap(),
            Waker::new().unwrap(),
        );
        waker.register(&inner, 7).unwrap();
        outer.add_poller(&inner, 1).unwrap();
        outer.mute_poller(&inner, 1, true).unwrap();
        waker.wake();
        assert!(
            outer
                .wait(Some(Duration::from_millis(20)))
                .unwrap()
                .is_empty()
        );
        // The inner set is read directly meanwhile.
        assert_eq!(inner.wait(Some(Duration::ZERO)).unwrap()[0].token, 7);
        outer.mute_poller(&inner, 1, false).unwrap();
        let events = outer.wait(Some(Duration::from_secs(5))).unwrap();
        assert_eq!(events.len(), 1);
        assert_eq!(events[0].token, 1);
        waker.drain();
        assert!(outer.wait(Some(Duration::ZERO)).unwrap().is_empty());
    }
}
