//! A private, message-oriented socket between two processes.
//!
//! SOCK_SEQPACKET keeps message boundaries and delivers the descriptors of a
//! message atomically with its bytes, so no framing state can be torn by a
//! peer that dies mid-write.

use std::io::{self, ErrorKind, IoSlice};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::time::{Duration, Instant};

use super::frame::{FrameError, Kind, MAX_FRAME, Message};
use crate::platform;

/// Descriptors one message may carry: what the platform's message sockets
/// hold. Sending more fails; receiving more is a truncated frame.
pub const MAX_FDS: usize = platform::MAX_FDS_PER_MESSAGE;

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
        let (a, b) = platform::message_socket_pair()?;
        Ok((Channel::from_fd(a), Channel::from_fd(b)))
    }

    pub fn from_fd(fd: OwnedFd) -> Self {
        Self {
            fd,
            buf: Vec::new(),
        }
    }

    /// Another handle on the same socket, for a second sender (a worker's
    /// logging records, sent from whichever thread logs). Each message is
    /// one datagram, so senders sharing the socket never interleave bytes.
    pub fn try_clone(&self) -> io::Result<Channel> {
        Ok(Channel::from_fd(platform::duplicate_fd(&self.fd)?))
    }

    pub fn into_fd(self) -> OwnedFd {
        self.fd
    }

    pub fn set_nonblocking(&self, on: bool) -> io::Result<()> {
        platform::set_nonblocking(&self.fd, on)
    }

    /// Sends one message. `Ok(false)` means a non-blocking socket is full;
    /// nothing was sent and the caller keeps the message.
    pub fn send(&self, msg: &Message) -> io::Result<bool> {
        let header = msg.header();
        let iov = [IoSlice::new(&header), IoSlice::new(&msg.body)];
        let fds: Vec<BorrowedFd<'_>> = msg.fds.iter().map(|f| f.as_fd()).collect();
        self.send_iov(&iov, &fds)
    }

    /// Sends `tasks` as one [`Kind::Batch`] frame, their bodies gathered
    /// from where they are (no copy), asking the worker to ring its
    /// doorbell after every `ring_every` results (0: never). Same contract
    /// as [`Channel::send`]; the tasks must carry no descriptors and fit in
    /// one frame together.
    pub fn send_batch(&self, tasks: &[&Message], ring_every: u64) -> io::Result<bool> {
        debug_assert!(tasks.iter().all(|t| t.fds.is_empty()));
        let header = Message::new(Kind::Batch, ring_every, tasks.len() as u64).header();
        let entries = tasks
            .iter()
            .map(|t| t.batch_entry_header())
            .collect::<io::Result<Vec<_>>>()?;
        let mut iov = Vec::with_capacity(1 + 2 * tasks.len());
        iov.push(IoSlice::new(&header));
        for (entry, task) in entries.iter().zip(tasks) {
            iov.push(IoSlice::new(entry));
            iov.push(IoSlice::new(&task.body));
        }
        self.send_iov(&iov, &[])
    }

    fn send_iov(&self, iov: &[IoSlice<'_>], fds: &[BorrowedFd<'_>]) -> io::Result<bool> {
        loop {
            match platform::send_with_fds(&self.fd, iov, fds) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
    }

    /// Sends, waiting for room if the socket is non-blocking and full.
    pub fn send_blocking(&self, msg: &Message) -> io::Result<()> {
        while !self.send(msg)? {
            match platform::wait_writable(&self.fd, None) {
                Ok(_) => {}
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Receives one message.
    pub fn recv(&mut self) -> Result<Recv, RecvError> {
        // One byte more than the largest frame, so truncation is visible.
        self.buf.resize(MAX_FRAME + 1, 0);
        let mut fds = Vec::new();
        let mut reset = false;
        let got = loop {
            match platform::recv_with_fds(&self.fd, &mut self.buf, &mut fds) {
                Ok(r) => break r,
                Err(e) => match e.kind() {
                    ErrorKind::Interrupted => continue,
                    ErrorKind::WouldBlock => return Ok(Recv::WouldBlock),
                    // The peer closed with messages of ours unread. The
                    // kernel reports that once, ahead of anything the peer
                    // sent before it died (a worker's last result): read
                    // on, EOF comes after.
                    ErrorKind::ConnectionReset if !reset => reset = true,
                    ErrorKind::ConnectionReset => return Ok(Recv::Closed),
                    _ => return Err(RecvError::Io(e)),
                },
            }
        };
        if got.bytes == 0 && fds.is_empty() {
            return Ok(Recv::Closed);
        }
        if got.truncated || got.bytes > MAX_FRAME {
            return Err(FrameError::Truncated.into());
        }
        Ok(Recv::Message(Message::decode(&self.buf[..got.bytes], fds)?))
    }

    /// Receives on a non-blocking socket, polling for up to `spin` (and
    /// yielding the CPU between polls to any thread that wants it) before
    /// it sleeps until a message comes.
    pub fn recv_spinning(&mut self, spin: Duration) -> Result<Recv, RecvError> {
        let until = Instant::now() + spin;
        loop {
            match self.recv()? {
                Recv::WouldBlock if Instant::now() < until => std::thread::yield_now(),
                Recv::WouldBlock => return self.recv_blocking(),
                other => return Ok(other),
            }
        }
    }

    /// Receives, waiting if the socket is non-blocking and empty.
    pub fn recv_blocking(&mut self) -> Result<Recv, RecvError> {
        loop {
            match self.recv()? {
                Recv::WouldBlock => match platform::wait_readable(&self.fd, None) {
                    Ok(_) => {}
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(RecvError::Io(e)),
                },
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
    fn a_spinning_receive_gets_what_comes_while_it_polls_and_after_it_sleeps() {
        let (a, mut b) = Channel::pair().unwrap();
        b.set_nonblocking(true).unwrap();
        // Sent before: the first poll gets it.
        assert!(a.send(&Message::new(Kind::Task, 1, 0)).unwrap());
        let got = b.recv_spinning(Duration::from_micros(50)).unwrap();
        assert!(matches!(got, Recv::Message(m) if m.id == 1));
        // Sent long after the spin ended: the receiver sleeps, then gets it.
        let sender = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(20));
            assert!(a.send(&Message::new(Kind::Task, 2, 0)).unwrap());
            a
        });
        let got = b.recv_spinning(Duration::from_micros(50)).unwrap();
        assert!(matches!(got, Recv::Message(m) if m.id == 2));
        drop(sender.join().unwrap());
        assert!(matches!(
            b.recv_spinning(Duration::from_micros(50)).unwrap(),
            Recv::Closed
        ));
    }

    #[test]
    fn a_batch_arrives_as_one_frame_of_its_tasks() {
        let (a, mut b) = Channel::pair().unwrap();
        let one = Message::new(Kind::Task, 1, 5).with_body(b"first".to_vec());
        let two = Message::new(Kind::Task, 2, 5).with_body(vec![3; 300]);
        assert!(a.send_batch(&[&one, &two], 1).unwrap());
        let Recv::Message(m) = b.recv().unwrap() else {
            panic!("no frame");
        };
        assert_eq!((m.kind, m.id, m.aux), (Kind::Batch, 1, 2));
        let tasks = m.unbatch().unwrap();
        assert_eq!(tasks.iter().map(|t| t.id).collect::<Vec<_>>(), [1, 2]);
        assert_eq!(tasks[1].body, vec![3; 300]);
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
        platform::send_with_fds(&a, &[IoSlice::new(&[1, 2, 3])], &[]).unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Frame(FrameError::Short(3)))
        ));
        let big = vec![0u8; MAX_FRAME + 100];
        platform::send_with_fds(&a, &[IoSlice::new(&big)], &[]).unwrap();
        assert!(matches!(
            b.recv(),
            Err(RecvError::Frame(FrameError::Truncated))
        ));
    }
}
