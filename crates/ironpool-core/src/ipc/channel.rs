//! A private, message-oriented socket between two processes.
//!
//! SOCK_SEQPACKET keeps message boundaries and delivers the descriptors of a
//! message atomically with its bytes, so no framing state can be torn by a
//! peer that dies mid-write.

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::io::Errno;
use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

use super::frame::{FrameError, MAX_FRAME, Message};

/// Descriptors one message may carry.
pub const MAX_FDS: usize = 16;

/// What a receive produced.
#[derive(Debug)]
pub enum Recv {
    Message(Message),
    /// Non-blocking socket with nothing to read.
    WouldBlock,
    /// The peer closed its end (or died).
    Closed,
}

#[derive(Debug)]
pub struct Channel {
    fd: OwnedFd,
    buf: Vec<u8>,
}

/// Receive errors: the peer sent something that is not a frame, or the OS failed.
#[derive(Debug, thiserror::Error)]
pub enum RecvError {
    #[error("invalid frame: {0}")]
    Frame(#[from] FrameError),
    #[error(transparent)]
    Io(#[from] io::Error),
}

impl Channel {
    /// Two connected ends, close-on-exec.
    pub fn pair() -> io::Result<(Channel, Channel)> {
        let (a, b) = rustix::net::socketpair(
            AddressFamily::UNIX,
            SocketType::SEQPACKET,
            SocketFlags::CLOEXEC,
            None,
        )?;
        Ok((Channel::from_fd(a), Channel::from_fd(b)))
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd,
            buf: Vec::new(),
        }
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        rustix::io::ioctl_fionbio(&self.fd, on)?;
        Ok(())
    }

    /// Sends one message. `Ok(false)` means a non-blocking socket is full;
    /// nothing was sent and the caller keeps the message.
    pub fn send(&self, msg: &Message) -> io::Result<bool> {
        let header = msg.header();
        let iov = [IoSlice::new(&header), IoSlice::new(&msg.body)];
        let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(|f| f.as_fd()).collect();
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = SendAncillaryBuffer::new(&mut space);
        if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(&fds)) {
            return Err(io::Error::other("too many descriptors for one message"));
        }
        loop {
            match rustix::net::sendmsg(&self.fd, &iov, &mut control, SendFlags::NOSIGNAL) {
                Ok(_) => return Ok(true),
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(false),
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Sends, waiting for room if the socket is non-blocking and full.
    pub fn send_blocking(&self, msg: &Message) -> io::Result<()> {
        while !self.send(msg)? {
            let mut fds = [rustix::event::PollFd::new(
                &self.fd,
                rustix::event::PollFlags::OUT,
            )];
            match rustix::event::poll(&mut fds, None) {
                Ok(_) | Err(Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Recv, RecvError> {
        // One byte more than the largest frame, so truncation is visible.
        self.buf.resize(MAX_FRAME + 1, 0);
        let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS))];
        let mut control = RecvAncillaryBuffer::new(&mut space);
        let mut reset = false;
        let got = loop {
            let mut iov = [IoSliceMut::new(&mut self.buf)];
            match rustix::net::recvmsg(&self.fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC) {
                Ok(r) => break r,
                Err(Errno::INTR) => continue,
                Err(Errno::AGAIN) => return Ok(Recv::WouldBlock),
                // The peer closed with messages of ours unread. The kernel
                // reports that once, ahead of anything the peer sent before
                // it died (a worker's last result): read on, EOF comes after.
                Err(Errno::CONNRESET) if !reset => reset = true,
                Err(Errno::CONNRESET) => return Ok(Recv::Closed),
                Err(e) => return Err(RecvError::Io(e.into())),
            }
        };
        let mut fds = Vec::new();
        for item in control.drain() {
            if let RecvAncillaryMessage::ScmRights(received) = item {
                fds.extend(received);
            }
        }
        if got.bytes == 0 && fds.is_empty() {
            return Ok(Recv::Closed);
        }
        if got.flags.contains(ReturnFlags::TRUNC)
            || got.flags.contains(ReturnFlags::CTRUNC)
            || got.bytes > MAX_FRAME
        {
            return Err(FrameError::Truncated.into());
        }
        Ok(Recv::Message(Message::decode(&self.buf[..got.bytes], fds)?))
    }

    /// Receives, waiting if the socket is non-blocking and empty.
    pub fn recv_blocking(&mut self) -> Result<Recv, RecvError> {
        loop {
            match self.recv()? {
                Recv::WouldBlock => {
                    let mut fds = [rustix::event::PollFd::new(
                        &self.fd,
                        rustix::event::PollFlags::IN,
                    )];
                    match rustix::event::poll(&mut fds, None) {
                        Ok(_) | Err(Errno::INTR) => {}
                        Err(e) => return Err(RecvError::Io(e.into())),
                    }
                }
                other => return Ok(other),
            }
        }
    }
}

impl AsFd for Channel {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ipc::Kind;

    #[test]
    fn message_and_fd_cross() {
        let (a, mut b) = Channel::pair().unwrap();
        let (x, _y) = Channel::pair().unwrap();
        let msg = Message::new(Kind::Task, 3, 4)
            .with_body(vec![9; 1000])
            .with_fds(vec![x.into_fd()]);
        assert!(a.send(&msg).unwrap());
        match b.recv().unwrap() {
            Recv::Message(m) => {
                assert_eq!(
                    (m.kind, m.id, m.aux, m.body.len(), m.fds.len()),
                    (Kind::Task, 3, 4, 1000, 1)
                );
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn eof_and_would_block() {
        let (a, mut b) = Channel::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        assert!(matches!(b.recv().unwrap(), Recv::WouldBlock));
        drop(a);
        assert!(matches!(b.recv().unwrap(), Recv::Closed));
    }

    #[test]
    fn oversized_and_garbage_frames_are_errors_not_panics() {
        let (a, mut b) = Channel::pair().unwrap();
        rustix::net::send(&a, &[1, 2, 3], SendFlags::empty()).unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Frame(FrameError::Short(3)))
        ));
        let big = vec![0u8; MAX_FRAME + 100];
        rustix::net::send(&a, &big, SendFlags::empty()).unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Frame(FrameError::Truncated))
        ));
    }
}
