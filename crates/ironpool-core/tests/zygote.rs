//! The zygote on its own: start-up, start-up failures, the session protocol
//! (Fork → Forked with a pidfd, Exited with the status), and its death.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::*;
use ironpool_core::ipc::{Channel, Kind, Message, Recv};
use ironpool_core::platform::{self, Pidfd};
use ironpool_core::task::ExitStatus;
use ironpool_core::zygote::{Zygote, decode_status, encode_status};

/// Receives one message on a blocking channel, failing after `limit`.
fn recv_within(chan: &mut Channel, limit: Duration) -> Message {
    let end = Instant::now() + limit;
    chan.set_nonblocking(true).expect("nonblocking");
    loop {
        match chan.recv().expect("valid frame") {
            Recv::Message(m) => return m,
            Recv::Closed => panic!("channel closed"),
            Recv::WouldBlock => {
                assert!(Instant::now() < end, "nothing received within {limit:?}");
                std::thread::sleep(Duration::from_millis(2));
            }
        }
    }
}

struct Forked {
    pid: i32,
    pidfd: Pidfd,
    chan: Channel,
}

fn fork_worker(session: &mut Channel, request: u64) -> Forked {
    let (ours, theirs) = Channel::pair().expect("pair");
    let (_out_r, out_w) = platform::output_pipe().expect("pipe");
    let (_err_r, err_w) = platform::output_pipe().expect("pipe");
    let fork = Message::new(Kind::Fork, request, 0).with_fds(vec![theirs.into_fd(), out_w, err_w]);
    session.send_blocking(&fork).expect("send fork");
    let mut m = recv_within(session, DEADLINE);
    assert_eq!((m.kind, m.id), (Kind::Forked, request));
    let pid = m.aux as i32;
    assert!(pid > 0);
    assert_eq!(m.fds.len(), 1, "a pidfd comes with Forked");
    let pidfd = Pidfd::from_fd(m.fds.pop().expect("pidfd"), pid);
    Forked {
        pid,
        pidfd,
        chan: ours,
    }
}

fn exited(session: &mut Channel) -> (i32, ExitStatus) {
    let m = recv_within(session, DEADLINE);
    assert_eq!(m.kind, Kind::Exited, "{m:?}");
    (m.id as i32, decode_status(m.aux))
}

#[test]
fn status_words_round_trip() {
    for s in [
        ExitStatus::Code(0),
        ExitStatus::Code(255),
        ExitStatus::Code(-1),
        ExitStatus::Signal(9),
        ExitStatus::Signal(11),
    ] {
        assert_eq!(decode_status(encode_status(s)), s);
    }
}

#[test]
fn starts_and_exits_when_dropped() {
    let z = zygote();
    let pid = z.pid();
    assert!(pid > 0 && z.is_alive());
    assert!(children_of(platform::current_pid()).contains(&pid));
    drop(z);
    assert!(!process_exists(pid), "zygote reaped on drop");
}

#[test]
fn start_up_failure_is_reported_with_its_text() {
    let mut cmd = Command::new(FAKE);
    cmd.env("FAKE_ZYGOTE_FAIL", "no module named numpy");
    let err = Zygote::spawn(cmd).expect_err("must fail");
    assert!(err.to_string().contains("no module named numpy"), "{err}");

    let mut cmd = Command::new(FAKE);
    cmd.env("FAKE_ZYGOTE_EXIT", "1");
    let err = Zygote::spawn(cmd).expect_err("must fail");
    assert!(err.to_string().contains("exited"), "{err}");

    let err = Zygote::spawn(Command::new("/nonexistent/ironpool-zygote")).expect_err("no binary");
    assert_eq!(err.kind(), std::io::ErrorKind::NotFound);
}

#[test]
fn session_forks_workers_and_reports_their_exits() {
    let z = zygote();
    let mut session = z.session().expect("session");
    let mut a = fork_worker(&mut session, 1);
    let b = fork_worker(&mut session, 2);
    assert_ne!(a.pid, b.pid);
    let kids = children_of(z.pid());
    assert!(kids.contains(&a.pid) && kids.contains(&b.pid), "{kids:?}");

    // Talk to worker a directly.
    a.chan.send_blocking(&init(b"ok")).expect("init");
    assert_eq!(recv_within(&mut a.chan, DEADLINE).kind, Kind::Ready);
    a.chan
        .send_blocking(&task(9, b"pid").payload)
        .expect("task");
    let r = recv_within(&mut a.chan, DEADLINE);
    assert_eq!((r.kind, r.id), (Kind::Returned, 9));
    assert_eq!(parts(&r)[0], a.pid.to_string().as_bytes());

    // It exits with a code; the zygote reaps it and says so.
    a.chan
        .send_blocking(&task(10, b"exit:5").payload)
        .expect("task");
    assert_eq!(exited(&mut session), (a.pid, ExitStatus::Code(5)));

    // Killed through the pidfd we were handed.
    b.pidfd.kill().expect("kill");
    assert_eq!(
        exited(&mut session),
        (b.pid, ExitStatus::Signal(libc::SIGKILL))
    );
    assert!(children_of(z.pid()).is_empty());
}

#[test]
fn sessions_are_independent_and_a_closed_one_is_harmless() {
    let z = zygote();
    let mut s1 = z.session().expect("session");
    let mut s2 = z.session().expect("session");
    let w1 = fork_worker(&mut s1, 1);
    let w2 = fork_worker(&mut s2, 1);
    drop(s1);
    w1.pidfd.kill().expect("kill");
    w2.pidfd.kill().expect("kill");
    // Only the pool that asked for w2 hears of it.
    assert_eq!(exited(&mut s2), (w2.pid, ExitStatus::Signal(libc::SIGKILL)));
    assert!(wait_no_children(z.pid(), Duration::from_secs(5)).is_empty());
    assert!(z.is_alive());
    // Malformed requests are not fatal: a fork without its descriptors is
    // refused (so the pool's slot does not wait for it), the rest ignored.
    s2.send_blocking(&Message::new(Kind::Fork, 3, 0))
        .expect("send");
    let refused = recv_within(&mut s2, DEADLINE);
    assert_eq!(
        (refused.kind, refused.id),
        (Kind::ForkFailed, 3),
        "{refused:?}"
    );
    assert!(String::from_utf8_lossy(&refused.body).contains("descriptors"));
    s2.send_blocking(&Message::new(Kind::Task, 4, 0))
        .expect("send");
    let w3 = fork_worker(&mut s2, 5);
    w3.pidfd.kill().expect("kill");
    assert_eq!(exited(&mut s2).0, w3.pid);
}

#[test]
fn workers_die_with_the_zygote() {
    let z = zygote();
    let zpid = z.pid();
    let mut session = z.session().expect("session");
    let w = fork_worker(&mut session, 1);
    assert!(process_exists(w.pid));
    z.kill();
    assert!(!z.is_alive());
    // PR_SET_PDEATHSIG: the worker is SIGKILLed when the zygote goes.
    let end = Instant::now() + Duration::from_secs(5);
    while process_alive(w.pid) {
        assert!(
            Instant::now() < end,
            "worker {} outlived zygote {zpid}",
            w.pid
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    // And the session sees the zygote go.
    session.set_nonblocking(false).expect("blocking");
    let end = Instant::now() + Duration::from_secs(5);
    loop {
        assert!(Instant::now() < end);
        match session.recv() {
            Ok(Recv::Closed) | Err(_) => break,
            _ => continue,
        }
    }
}

/// Alive and not a zombie (an orphan is reaped by whoever adopts it).
fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat
            .rfind(')')
            .and_then(|i| stat[i + 1..].split_whitespace().next())
            .is_some_and(|state| state != "Z" && state != "X"),
        Err(_) => false,
    }
}

/// Sends a fork request without waiting for its answer.
fn ask_fork(session: &mut Channel, request: u64) -> Channel {
    let (ours, theirs) = Channel::pair().expect("pair");
    let (_out_r, out_w) = platform::output_pipe().expect("pipe");
    let (_err_r, err_w) = platform::output_pipe().expect("pipe");
    let fork = Message::new(Kind::Fork, request, 0).with_fds(vec![theirs.into_fd(), out_w, err_w]);
    session.send_blocking(&fork).expect("send fork");
    ours
}

#[test]
fn warm_request_waits_for_the_forks_asked_before_it() {
    let z = zygote();
    let mut session = z.session().expect("session");
    let _chans: Vec<Channel> = (1..=3).map(|i| ask_fork(&mut session, i)).collect();
    let warm = z.warm(b"numpy\npandas".to_vec()).expect("warm request");
    let report = warm
        .wait(Some(DEADLINE))
        .expect("answered")
        .expect("within the deadline");
    // The fake template answers with the request reversed.
    assert_eq!(report, b"pandas\nnumpy");
    // The template answered the forks before it did the imports: all three
    // answers are waiting already.
    session.set_nonblocking(true).expect("nonblocking");
    for i in 1..=3 {
        match session.recv().expect("valid frame") {
            Recv::Message(m) => assert_eq!((m.kind, m.id), (Kind::Forked, i)),
            other => panic!("fork {i} not answered before the warm request: {other:?}"),
        }
    }
}

#[test]
fn a_template_left_with_threads_exits_and_is_started_again() {
    let z = zygote();
    let first = z.pid();
    let warm = z.warm(b"threads".to_vec()).expect("warm request");
    let err = warm.wait(Some(DEADLINE)).map(|_| ()).err();
    // Either the report arrived before the exit (then the next wait sees
    // the end) or the end came first.
    if err.is_none() {
        assert!(
            warm.wait(Some(DEADLINE)).is_err(),
            "the session ends with the template"
        );
    }
    let end = Instant::now() + DEADLINE;
    while z.is_alive() {
        assert!(Instant::now() < end, "the template did not exit");
        std::thread::sleep(Duration::from_millis(5));
    }
    let mut session = z.session().expect("a session starts it again");
    assert_ne!(z.pid(), first);
    let w = fork_worker(&mut session, 1);
    assert!(w.pid > 0);
}
