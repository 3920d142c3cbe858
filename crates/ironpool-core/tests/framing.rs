//! Fuzz-style property tests of everything that parses bytes from a worker:
//! the frame decoder, the payload table decoder and `Channel::recv` on a
//! real socket. Arbitrary input must give an error or a well-formed message,
//! never a panic, an out-of-bounds range or a hang.

use std::os::fd::OwnedFd;

use ironpool_core::ipc::channel::{MAX_FDS, RecvError};
use ironpool_core::ipc::frame::{HEADER_LEN, MAGIC, MAX_FRAME};
use ironpool_core::ipc::payload::{self, Part};
use ironpool_core::ipc::{Channel, FrameError, Kind, Message, Recv};
use proptest::prelude::*;
use rustix::net::SendFlags;

/// A frame as a worker would send it, kind byte and all taken raw.
fn raw_frame(kind: u8, flags: u8, id: u64, aux: u64, body: &[u8]) -> Vec<u8> {
    let mut w = Vec::with_capacity(HEADER_LEN + body.len());
    w.extend_from_slice(&MAGIC.to_le_bytes());
    w.extend_from_slice(&[kind, flags, 0, 0]);
    w.extend_from_slice(&id.to_le_bytes());
    w.extend_from_slice(&aux.to_le_bytes());
    w.extend_from_slice(body);
    w
}

fn mutate(mut bytes: Vec<u8>, edits: &[(usize, u8)], keep: usize) -> Vec<u8> {
    for &(at, v) in edits {
        if !bytes.is_empty() {
            let i = at % bytes.len();
            bytes[i] = v;
        }
    }
    // Half the time the whole frame, otherwise a prefix of it.
    if keep % 2 == 1 {
        bytes.truncate((keep / 2) % (bytes.len() + 1));
    }
    bytes
}

/// A decoded frame must say exactly what its bytes say.
fn check_decoded(bytes: &[u8], m: &Message) {
    assert!(bytes.len() >= HEADER_LEN);
    assert_eq!(m.kind as u8, bytes[4]);
    assert_eq!(m.flags, bytes[5]);
    assert_eq!(m.id.to_le_bytes(), bytes[8..16]);
    assert_eq!(m.aux.to_le_bytes(), bytes[16..24]);
    assert_eq!(m.body, bytes[HEADER_LEN..]);
}

/// Every range a successful payload decode hands out lies inside its buffer.
fn check_parts(msg: &Message) -> Option<Vec<Vec<u8>>> {
    let (parts, maps) = payload::decode(msg).ok()?;
    let mut out = Vec::new();
    for p in &parts {
        if let Part::Segment { fd, .. } = p {
            assert!(maps[*fd].is_some(), "a segment part comes with a mapping");
        }
        let bytes = payload::part_bytes(msg, &maps, p);
        assert!(bytes.is_some(), "{p:?} lies outside its buffer");
        out.push(bytes?.to_vec());
    }
    Some(out)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn frame_decoder_never_panics_on_arbitrary_bytes(bytes in prop::collection::vec(any::<u8>(), 0..256)) {
        if let Ok(m) = Message::decode(&bytes, Vec::new()) {
            check_decoded(&bytes, &m);
        }
    }

    #[test]
    fn frame_decoder_handles_mutated_valid_frames(
        kind in 0u8..20,
        flags in any::<u8>(),
        id in any::<u64>(),
        aux in any::<u64>(),
        body in prop::collection::vec(any::<u8>(), 0..128),
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        keep in any::<usize>(),
    ) {
        let bytes = mutate(raw_frame(kind, flags, id, aux, &body), &edits, keep);
        match Message::decode(&bytes, Vec::new()) {
            Ok(m) => check_decoded(&bytes, &m),
            Err(FrameError::Short(n)) => prop_assert!(n < HEADER_LEN && n == bytes.len()),
            Err(FrameError::BadMagic(_) | FrameError::UnknownKind(_)) => {}
            Err(e) => prop_assert!(false, "unexpected error {e}"),
        }
    }

    #[test]
    fn payload_decoder_never_panics_on_arbitrary_bodies(
        body in prop::collection::vec(any::<u8>(), 0..256),
        small_count in any::<bool>(),
    ) {
        let mut body = body;
        if small_count && body.len() >= 4 {
            // Make the part count plausible, so the table itself gets parsed.
            let n = u32::from(body[0] % 6);
            body[0..4].copy_from_slice(&n.to_le_bytes());
        }
        let msg = Message::new(Kind::Returned, 1, 0).with_body(body);
        if let Some(parts) = check_parts(&msg) {
            prop_assert!(parts.len() <= msg.body.len());
        }
    }

    #[test]
    fn payload_round_trips_and_survives_mutation(
        parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..400), 0..6),
        threshold in 0usize..500,
        edits in prop::collection::vec((any::<usize>(), any::<u8>()), 0..4),
        keep in any::<usize>(),
    ) {
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let msg = payload::encode(Kind::Task, 1, 2, &refs, threshold).expect("encode");
        prop_assert!(msg.body.len() + HEADER_LEN <= MAX_FRAME);
        prop_assert_eq!(check_parts(&msg), Some(parts.clone()));
        let body = mutate(msg.body.clone(), &edits, keep);
        let mut bad = Message::new(Kind::Task, 1, 2).with_body(body);
        bad.fds = msg.try_clone().expect("dup fds").fds;
        check_parts(&bad);
        // The same table with the segment missing must not decode to a
        // segment part.
        bad.fds.clear();
        check_parts(&bad);
    }

    #[test]
    fn payload_decoder_tolerates_foreign_descriptors(
        parts in prop::collection::vec(prop::collection::vec(any::<u8>(), 0..300), 1..4),
    ) {
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        let mut msg = payload::encode(Kind::Returned, 1, 0, &refs, 100).expect("encode");
        // A pipe instead of a segment: size 0, cannot be mapped.
        let (r, _w) = rustix::pipe::pipe().expect("pipe");
        msg.fds = vec![r];
        check_parts(&msg);
        // A socket.
        let (a, _b) = Channel::pair().expect("pair");
        msg.fds = vec![a.into_fd()];
        check_parts(&msg);
    }
}

#[test]
fn payload_segments_must_be_sealed() {
    // A sender that kept the right to shrink its segment could truncate it
    // after we mapped it, and our reads would fault: such a segment is
    // refused, as is any other kind of descriptor.
    let msg = payload::encode(Kind::Returned, 1, 0, &[&[7u8; 5000]], 100).expect("encode");
    assert!(payload::decode(&msg).is_ok());
    let unsealed = ironpool_core::platform::new_segment("test").expect("memfd");
    std::fs::File::from(unsealed.try_clone().expect("dup"))
        .set_len(8192)
        .expect("size");
    let mut bad = Message::new(Kind::Returned, 1, 0).with_body(msg.body.clone());
    bad.fds = vec![unsealed];
    assert!(matches!(
        payload::decode(&bad),
        Err(FrameError::BadPayload(_))
    ));
    let file = std::fs::File::open("/proc/self/exe").expect("open");
    bad.fds = vec![OwnedFd::from(file)];
    assert!(payload::decode(&bad).is_err());
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn channel_recv_survives_arbitrary_datagrams(
        datagrams in prop::collection::vec(
            prop_oneof![
                prop::collection::vec(any::<u8>(), 0..64),
                (0u8..16, any::<u64>(), prop::collection::vec(any::<u8>(), 0..200))
                    .prop_map(|(k, id, body)| raw_frame(k, 0, id, 0, &body)),
                (MAX_FRAME - 4..MAX_FRAME + 64).prop_map(|n| raw_frame(6, 0, 1, 0, &vec![0; n - HEADER_LEN])),
            ],
            1..12,
        ),
        fd_counts in prop::collection::vec(0usize..MAX_FDS + 6, 12),
    ) {
        let (tx, mut rx) = Channel::pair().expect("pair");
        rx.set_nonblocking(true).expect("nonblocking");
        for (i, d) in datagrams.iter().enumerate() {
            let fds: Vec<OwnedFd> = (0..fd_counts[i])
                .map(|_| rustix::pipe::pipe().expect("pipe").0)
                .collect();
            send_raw(&tx, d, &fds);
            // One datagram in, at most one result out; never a wait.
            match rx.recv() {
                Ok(Recv::Message(m)) => {
                    check_decoded(d, &m);
                    prop_assert!(d.len() <= MAX_FRAME);
                    prop_assert_eq!(m.fds.len(), fds.len());
                }
                Ok(Recv::Closed) => prop_assert!(d.is_empty() && fds.is_empty()),
                Ok(Recv::WouldBlock) => prop_assert!(false, "datagram {i} was lost"),
                Err(RecvError::Frame(FrameError::Truncated)) => {
                    prop_assert!(d.len() > MAX_FRAME || fds.len() > MAX_FDS)
                }
                Err(RecvError::Frame(_)) => prop_assert!(d.len() <= MAX_FRAME),
                Err(RecvError::Io(e)) => prop_assert!(false, "io error {e}"),
            }
        }
        prop_assert!(matches!(rx.recv(), Ok(Recv::WouldBlock)));
        drop(tx);
        prop_assert!(matches!(rx.recv(), Ok(Recv::Closed)));
    }

    #[test]
    fn channel_round_trips_any_frame(
        kind in prop::sample::select(vec![Kind::Init, Kind::Task, Kind::Returned, Kind::Raised, Kind::Shutdown]),
        id in any::<u64>(),
        aux in any::<u64>(),
        len in 0usize..MAX_FRAME - HEADER_LEN + 1,
        fill in any::<u8>(),
    ) {
        let (tx, mut rx) = Channel::pair().expect("pair");
        let sent = Message::new(kind, id, aux).with_body(vec![fill; len]);
        prop_assert!(tx.send(&sent).expect("send"));
        match rx.recv_blocking().expect("recv") {
            Recv::Message(m) => {
                prop_assert_eq!((m.kind, m.id, m.aux), (kind, id, aux));
                prop_assert_eq!(m.body, sent.body);
            }
            other => prop_assert!(false, "{other:?}"),
        }
    }
}

/// Sends bytes (and descriptors) as one datagram, bypassing `Channel::send`.
fn send_raw(chan: &Channel, bytes: &[u8], fds: &[OwnedFd]) {
    use rustix::net::{SendAncillaryBuffer, SendAncillaryMessage};
    use std::mem::MaybeUninit;
    use std::os::fd::{AsFd, BorrowedFd};
    let borrowed: Vec<BorrowedFd<'_>> = fds.iter().map(|f| f.as_fd()).collect();
    let mut space = [MaybeUninit::uninit(); rustix::cmsg_space!(ScmRights(MAX_FDS + 8))];
    let mut control = SendAncillaryBuffer::new(&mut space);
    if !borrowed.is_empty() {
        assert!(control.push(SendAncillaryMessage::ScmRights(&borrowed)));
    }
    let iov = [std::io::IoSlice::new(bytes)];
    rustix::net::sendmsg(chan, &iov, &mut control, SendFlags::empty()).expect("sendmsg");
}

#[test]
fn a_peer_that_dies_mid_stream_reads_as_closed() {
    let (tx, mut rx) = Channel::pair().expect("pair");
    rx.set_nonblocking(true).expect("nonblocking");
    tx.send(&Message::new(Kind::Ready, 0, 0)).expect("send");
    drop(tx);
    assert!(matches!(rx.recv(), Ok(Recv::Message(m)) if m.kind == Kind::Ready));
    for _ in 0..3 {
        assert!(matches!(rx.recv(), Ok(Recv::Closed)));
    }
}

#[test]
fn messages_sent_before_a_peer_died_with_unread_input_are_delivered() {
    // A worker that replies, then dies with prefetched tasks unread: the
    // kernel flags ECONNRESET on our end once, ahead of its queued reply.
    let (worker, mut pool) = Channel::pair().expect("pair");
    pool.set_nonblocking(true).expect("nonblocking");
    pool.send(&Message::new(Kind::Task, 2, 0)).expect("send");
    worker
        .send(&Message::new(Kind::Returned, 1, 0))
        .expect("reply");
    drop(worker);
    match pool.recv() {
        Ok(Recv::Message(m)) => assert_eq!((m.kind, m.id), (Kind::Returned, 1)),
        other => panic!("the reply was lost: {other:?}"),
    }
    assert!(matches!(pool.recv(), Ok(Recv::Closed)));
    assert!(matches!(pool.recv(), Ok(Recv::Closed)));
}

#[test]
fn send_to_a_dead_peer_is_an_error_not_a_signal() {
    let (tx, rx) = Channel::pair().expect("pair");
    drop(rx);
    // MSG_NOSIGNAL: EPIPE, not SIGPIPE killing the test process.
    assert!(tx.send(&Message::new(Kind::Task, 1, 0)).is_err());
    assert!(tx.send_blocking(&Message::new(Kind::Task, 1, 0)).is_err());
}

#[test]
fn too_many_descriptors_are_refused_on_send() {
    let (tx, _rx) = Channel::pair().expect("pair");
    // The control buffer has some slack for alignment; well past it fails.
    let fds: Vec<OwnedFd> = (0..MAX_FDS + 4)
        .map(|_| rustix::pipe::pipe().expect("pipe").0)
        .collect();
    assert!(
        tx.send(&Message::new(Kind::Task, 1, 0).with_fds(fds))
            .is_err()
    );
}
