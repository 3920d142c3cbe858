//! Message sockets: connected pairs that keep message boundaries and carry
//! descriptors with the bytes (AF_UNIX SOCK_SEQPACKET with SCM_RIGHTS).

use std::io::{self, IoSlice, IoSliceMut};
use std::mem::MaybeUninit;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

use rustix::net::{
    AddressFamily, RecvAncillaryBuffer, RecvAncillaryMessage, RecvFlags, ReturnFlags,
    SendAncillaryBuffer, SendAncillaryMessage, SendFlags, SocketFlags, SocketType,
};

/// Descriptors one message can carry. The ancillary buffers hold exactly
/// this many, so a message with more arrives marked truncated.
pub const MAX_FDS_PER_MESSAGE: usize = 16;

/// Two connected ends, close-on-exec.
pub fn message_socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    Ok(rustix::net::socketpair(
        AddressFamily::UNIX,
        SocketType::SEQPACKET,
        SocketFlags::CLOEXEC,
        None,
    )?)
}

/// One `sendmsg` of `iov` as one message with `fds` attached; a closed
/// peer is an error, never SIGPIPE. A full non-blocking socket gives a
/// `WouldBlock` error, a signal an `Interrupted` one; either way nothing
/// was sent.
pub fn send_with_fds(
    fd: impl AsFd,
    iov: &[IoSlice<'_>],
    fds: &[BorrowedFd<'_>],
) -> io::Result<usize> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !fds.is_empty() && !control.push(SendAncillaryMessage::ScmRights(fds)) {
        return Err(io::Error::other("too many descriptors for one message"));
    }
    Ok(rustix::net::sendmsg(
        fd,
        iov,
        &mut control,
        SendFlags::NOSIGNAL,
    )?)
}

/// What one receive got.
#[derive(Debug, Clone, Copy)]
pub struct Received {
    /// Bytes of the message, at most the buffer's length.
    pub bytes: usize,
    /// The message had more bytes than the buffer, or more descriptors than
    /// [`MAX_FDS_PER_MESSAGE`]; the rest is lost.
    pub truncated: bool,
}

/// One `recvmsg` of one message into `buf`, its descriptors (close-on-exec)
/// appended to `fds`. Errors as for [`send_with_fds`]; a peer that closed
/// with messages of ours unread gives `ConnectionReset`. Zero bytes and no
/// descriptors: the peer closed its end.
pub fn recv_with_fds(
    fd: impl AsFd,
    buf: &mut [u8],
    fds: &mut Vec<OwnedFd>,
) -> io::Result<Received> {
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS_PER_MESSAGE))];
    let mut control = RecvAncillaryBuffer::new(&mut space);
    let mut iov = [IoSliceMut::new(buf)];
    let got = rustix::net::recvmsg(fd, &mut iov, &mut control, RecvFlags::CMSG_CLOEXEC)?;
    for item in control.drain() {
        if let RecvAncillaryMessage::ScmRights(received) = item {
            fds.extend(received);
        }
    }
    Ok(Received {
        bytes: got.bytes,
        truncated: got.flags.contains(ReturnFlags::TRUNC)
            || got.flags.contains(ReturnFlags::CTRUNC),
    })
}

/// Shuts both directions of a connected socket: the peer reads end of file
/// even while other processes hold copies of this end.
pub fn shutdown(fd: impl AsFd) -> io::Result<()> {
    rustix::net::shutdown(fd, rustix::net::Shutdown::Both)?;
    Ok(())
}
