//! The zygote's event loop: fork on request, reap, report exits.

use std::collections::HashMap;
use std::io;
use std::os::fd::OwnedFd;

use crate::ipc::{Channel, Kind, Message, Recv};
use crate::platform::{self, Pidfd, Poller};

const MASTER: u64 = 0;
const SESSION: u64 = 1 << 40;
const CHILD: u64 = 2 << 40;

/// How `serve` returned.
pub enum Served {
    /// The parent closed the master channel: the zygote should exit.
    Exit,
    /// We are a freshly forked worker; everything of the zygote is closed.
    Child(ForkedChild),
}

/// What a forked worker starts with: its channel to the pool supervisor.
/// stdout and stderr already point at the pool's capture pipes.
pub struct ForkedChild {
    pub channel: Channel,
}

struct State {
    poller: Poller,
    master: Channel,
    sessions: HashMap<u64, Channel>,
    children: HashMap<i32, (Pidfd, u64)>,
    next_session: u64,
}

/// Serves fork requests until the parent goes away. `fork` forks the calling
/// process and returns the child's pid in the parent and 0 in the child (the
/// Python binding calls `os.fork` so the interpreter's fork hooks run).
pub fn serve(master: OwnedFd, fork: &mut dyn FnMut() -> io::Result<i32>) -> io::Result<Served> {
    let master = Channel::from_fd(master);
    master.send_blocking(&Message::new(Kind::Ready, 0, 0))?;
    let poller = Poller::new()?;
    poller.add(&master, MASTER, false)?;
    let mut st = State {
        poller,
        master,
        sessions: HashMap::new(),
        children: HashMap::new(),
        next_session: 1,
    };
    let me = platform::current_pid();
    loop {
        for ev in st.poller.wait(None)? {
            match ev.token {
                MASTER => match st.master.recv_blocking() {
                    Ok(Recv::Message(mut m)) if m.kind == Kind::Session && m.fds.len() == 1 => {
                        let Some(fd) = m.fds.pop() else { continue };
                        let session = Channel::from_fd(fd);
                        let token = SESSION | st.next_session;
                        st.next_session += 1;
                        st.poller.add(&session, token, false)?;
                        st.sessions.insert(token, session);
                    }
                    Ok(Recv::Message(_)) => {}
                    Ok(Recv::Closed) | Err(_) => return Ok(Served::Exit),
                    Ok(Recv::WouldBlock) => {}
                },
                t if t & SESSION != 0 => {
                    let Some(session) = st.sessions.get_mut(&t) else {
                        continue;
                    };
                    match session.recv() {
                        Ok(Recv::Message(m)) if m.kind == Kind::Fork && m.fds.len() == 3 => {
                            if let Some(child) = fork_one(&mut st, t, m, fork, me)? {
                                return Ok(Served::Child(child));
                            }
                        }
                        Ok(Recv::Message(_)) | Ok(Recv::WouldBlock) => {}
                        Ok(Recv::Closed) | Err(_) => {
                            if let Some(s) = st.sessions.remove(&t) {
                                st.poller.delete(&s);
                            }
                        }
                    }
                }
                t if t & CHILD != 0 => {
                    let pid = (t & 0xffff_ffff) as i32;
                    let Some((pidfd, _)) = st.children.get(&pid) else {
                        continue;
                    };
                    let Ok(Some(status)) = pidfd.try_reap() else {
                        continue;
                    };
                    if let Some((pidfd, session)) = st.children.remove(&pid) {
                        st.poller.delete(&pidfd);
                        if let Some(s) = st.sessions.get(&session) {
                            let msg = Message::new(
                                Kind::Exited,
                                pid as u64,
                                super::encode_status(status),
                            );
                            let _ = s.send_blocking(&msg);
                        }
                    }
                }
                _ => {}
            }
        }
    }
}

fn fork_one(
    st: &mut State,
    session: u64,
    mut req: Message,
    fork: &mut dyn FnMut() -> io::Result<i32>,
    zygote_pid: i32,
) -> io::Result<Option<ForkedChild>> {
    let (Some(err), Some(out), Some(chan)) = (req.fds.pop(), req.fds.pop(), req.fds.pop()) else {
        return Ok(None);
    };
    let reply = |st: &State, msg: Message| {
        if let Some(s) = st.sessions.get(&session) {
            let _ = s.send_blocking(&msg);
        }
    };
    match fork() {
        Ok(0) => {
            // The worker. Our copies of the zygote's descriptors close when `st`
            // drops on return; only the channel and the redirected stdio stay.
            if !platform::die_with_parent(zygote_pid) {
                std::process::exit(70);
            }
            platform::redirect_stdio(&out, &err)?;
            Ok(Some(ForkedChild {
                channel: Channel::from_fd(chan),
            }))
        }
        Ok(pid) => {
            // Open the pidfd before anyone can reap: the pid cannot be reused yet.
            match Pidfd::open(pid) {
                Ok(pidfd) => {
                    let copy = rustix::io::fcntl_dupfd_cloexec(&pidfd, 0)?;
                    st.poller.add(&pidfd, CHILD | pid as u32 as u64, false)?;
                    st.children.insert(pid, (pidfd, session));
                    reply(
                        st,
                        Message::new(Kind::Forked, req.id, pid as u64).with_fds(vec![copy]),
                    );
                }
                Err(e) => reply(
                    st,
                    Message::new(Kind::ForkFailed, req.id, 0).with_body(e.to_string().into_bytes()),
                ),
            }
            Ok(None)
        }
        Err(e) => {
            reply(
                st,
                Message::new(Kind::ForkFailed, req.id, 0).with_body(e.to_string().into_bytes()),
            );
            Ok(None)
        }
    }
}

/// Tells the parent that start-up failed (a preload did not import).
pub fn report_failure(master: OwnedFd, text: &str) -> io::Result<()> {
    let master = Channel::from_fd(master);
    master.send_blocking(&Message::new(Kind::InitFailed, 0, 0).with_body(text.as_bytes().to_vec()))
}
