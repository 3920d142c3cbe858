//! TEST HELPER — not part of ironpool. A zygote and worker that speak the
//! wire protocol with no Python, so the integration tests in `tests/` can
//! drive the real supervisor against real processes, signals and sockets.
//!
//! The zygote reads its master channel from `IRONPOOL_ZYGOTE_FD` and calls
//! [`ironpool_core::zygote::serve`] with a `libc::fork` closure. If
//! `FAKE_ZYGOTE_FAIL` is set it reports that text as a start-up failure;
//! if `FAKE_ZYGOTE_EXIT` is set it exits before saying anything; with
//! `FAKE_ZYGOTE_ONCE` set to a path it starts only if it can create that
//! file, and reports a start-up failure otherwise (restart tests). With
//! `FAKE_ZYGOTE_FORK_LOG` set, it appends each forked pid to that file.
//!
//! The worker answers:
//! - `Init`: part 0 `fail` → `InitFailed` and exit 1; `crash` → SIGSEGV;
//!   `exit` → exit 3 without a word; anything else → `Ready`.
//! - `Register`: remembers part 0 under `id` and counts the registrations.
//! - `Forget`: drops it. `Shutdown`: exits 0.
//! - `Task`, by part 0:
//!   - `raise` → `Raised`; `retryable` → `Raised` marked retryable;
//!     `crash` → SIGSEGV; `abort` → SIGABRT;
//!     `exit:N` → `_exit(N)`; `hang` → sleeps forever;
//!   - `sleep:MS` → sleeps, then echoes; `pid` → its pid as text;
//!   - `fn` → the registered body of function `aux`, then `#` and how many
//!     times it was registered here;
//!   - `garbage` → raw non-frame bytes on the socket, then sleeps;
//!   - `raw:BYTES` → sends BYTES as one datagram as they are, then goes on;
//!   - `wrongid` → a result for a task it was not given;
//!   - `stderr:TEXT` → writes TEXT and a newline to fd 2, then SIGSEGV;
//!   - `stdout:TEXT` → writes TEXT and a newline to fd 1, then echoes;
//!   - `log:N` → sends N `Log` frames (`record 0` ...) from two threads,
//!     then SIGSEGV;
//!   - `big:N` → an N-byte result (byte i is `i % 251`), through a segment;
//!   - `crash_once:PATH` → creates PATH and crashes if it did not exist,
//!     else echoes (retry tests);
//!   - `script:PATH:STEPS` → appends a byte to PATH and does the step its
//!     length had chosen (0-based) among STEPS: `r` retryable raise, `x`
//!     raise, `c` crash, `h` hang, anything else echoes (the last step
//!     repeats);
//!   - anything else → echoes every part back as `Returned`.

use std::collections::HashMap;
use std::io::Write;
use std::os::fd::{FromRawFd, OwnedFd};
use std::time::{Duration, Instant};

use ironpool_core::ipc::payload::{self, DEFAULT_SEGMENT_THRESHOLD};
use ironpool_core::ipc::{Channel, Kind, Message, Recv};
use ironpool_core::zygote::{self, Served};

fn main() {
    let Some(fd) = std::env::var("IRONPOOL_ZYGOTE_FD")
        .ok()
        .and_then(|v| v.parse::<i32>().ok())
    else {
        eprintln!("ironpool-fake-zygote: IRONPOOL_ZYGOTE_FD is not set; this is a test helper");
        std::process::exit(2);
    };
    // SAFETY: the parent passed us this descriptor at exec; nothing else in
    // this process owns it.
    let master = unsafe { OwnedFd::from_raw_fd(fd) };
    if std::env::var_os("FAKE_ZYGOTE_EXIT").is_some() {
        std::process::exit(4);
    }
    if let Some(path) = std::env::var_os("FAKE_ZYGOTE_ONCE") {
        // Starts once; a restart reports a start-up failure.
        let first = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_ok();
        if !first {
            let _ = zygote::report_failure(master, "started twice");
            std::process::exit(1);
        }
    }
    if let Ok(text) = std::env::var("FAKE_ZYGOTE_FAIL") {
        let _ = zygote::report_failure(master, &text);
        std::process::exit(1);
    }
    let mut host = FakeHost {
        fork_log: std::env::var_os("FAKE_ZYGOTE_FORK_LOG"),
    };
    match zygote::serve(master, &mut host) {
        Ok(Served::Exit) => std::process::exit(0),
        Ok(Served::Child(child)) => worker(child.channel),
        Err(e) => {
            eprintln!("ironpool-fake-zygote: serve failed: {e}");
            std::process::exit(1);
        }
    }
}

/// Forks with libc (logging each child's pid to `fork_log` if set) and
/// answers a warm request with its own body, reversed line by line (a
/// request naming `threads` is answered as one that left threads behind).
struct FakeHost {
    fork_log: Option<std::ffi::OsString>,
}

impl zygote::Host for FakeHost {
    fn fork(&mut self) -> std::io::Result<i32> {
        // SAFETY: this process is single-threaded (no thread is ever started
        // here), so the child may go on running arbitrary code after fork.
        let pid = unsafe { libc::fork() };
        if pid < 0 {
            return Err(std::io::Error::last_os_error());
        }
        if let (Some(path), true) = (&self.fork_log, pid > 0) {
            let line = format!("{pid}\n");
            let _ = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .and_then(|mut f| f.write_all(line.as_bytes()));
        }
        Ok(pid)
    }

    fn warm(&mut self, request: &[u8], first: bool) -> Option<zygote::Warmed> {
        if first {
            return None; // two steps, like a real one: probe, then imports
        }
        let text = String::from_utf8_lossy(request);
        let report: Vec<&str> = text.lines().rev().collect();
        Some(zygote::Warmed {
            report: report.join("\n").into_bytes(),
            threaded: text.lines().any(|l| l == "threads"),
        })
    }
}

/// The parts of a payload message, copied out.
fn parts_of(msg: &Message) -> Vec<Vec<u8>> {
    let Ok((parts, maps)) = payload::decode(msg) else {
        return Vec::new();
    };
    parts
        .iter()
        .map(|p| {
            payload::part_bytes(msg, &maps, p)
                .unwrap_or_default()
                .to_vec()
        })
        .collect()
}

fn send(chan: &Channel, msg: &Message) {
    if chan.send_blocking(msg).is_err() {
        // The pool went away.
        exit(0);
    }
}

fn reply(chan: &Channel, kind: Kind, id: u64, started: Instant, parts: &[&[u8]]) {
    let ns = started.elapsed().as_nanos() as u64;
    match payload::encode(kind, id, ns, parts, DEFAULT_SEGMENT_THRESHOLD) {
        Ok(m) => send(chan, &m),
        Err(_) => exit(5),
    }
}

fn raise_retryable(chan: &Channel, id: u64, started: Instant, part: &[u8]) {
    let ns = started.elapsed().as_nanos() as u64;
    match payload::encode(Kind::Raised, id, ns, &[part], DEFAULT_SEGMENT_THRESHOLD) {
        Ok(mut m) => {
            m.flags = ironpool_core::ipc::RETRYABLE;
            send(chan, &m)
        }
        Err(_) => exit(5),
    }
}

fn exit(code: i32) -> ! {
    let _ = std::io::stdout().flush();
    // SAFETY: _exit ends the process at once; no Rust state outlives it.
    unsafe { libc::_exit(code) }
}

fn segfault() -> ! {
    // SAFETY: restoring the default action and raising a signal are plain
    // syscalls; the default action of SIGSEGV ends the process (Rust's own
    // handler would swallow a raised, non-fault SIGSEGV).
    unsafe {
        libc::signal(libc::SIGSEGV, libc::SIG_DFL);
        libc::raise(libc::SIGSEGV);
    }
    exit(99)
}

fn hang() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// Never rings its doorbell: the engine's quiet poll (`supervisor::quiet`)
/// must still read every result of a batch it muted the channel for, which
/// `a_muted_channel_whose_worker_never_rings_is_still_read` relies on.
fn worker(mut chan: Channel) -> ! {
    let mut objects: HashMap<u64, (Vec<u8>, u32)> = HashMap::new();
    loop {
        let msg = match chan.recv_blocking() {
            Ok(Recv::Message(m)) => m,
            Ok(_) => exit(0),
            Err(_) => exit(6),
        };
        match msg.kind {
            Kind::Init => {
                let parts = parts_of(&msg);
                match parts.first().map(Vec::as_slice) {
                    Some(b"fail") => {
                        let m = payload::encode(
                            Kind::InitFailed,
                            0,
                            0,
                            &[b"fake init failure"],
                            usize::MAX,
                        );
                        if let Ok(m) = m {
                            send(&chan, &m);
                        }
                        exit(1);
                    }
                    Some(b"crash") => segfault(),
                    Some(b"exit") => exit(3),
                    _ => send(&chan, &Message::new(Kind::Ready, 0, 0)),
                }
            }
            Kind::Register => {
                let body = parts_of(&msg).into_iter().next().unwrap_or_default();
                let entry = objects.entry(msg.id).or_insert((Vec::new(), 0));
                entry.0 = body;
                entry.1 += 1;
            }
            Kind::Forget => {
                objects.remove(&msg.id);
            }
            Kind::Shutdown => exit(0),
            Kind::Task => run_task(&mut chan, &msg, &objects),
            Kind::Batch => match msg.unbatch() {
                Ok(tasks) => tasks.iter().for_each(|t| run_task(&mut chan, t, &objects)),
                Err(_) => exit(6),
            },
            // Whatever the pool adds later: nothing to do here.
            _ => {}
        }
    }
}

fn run_task(chan: &mut Channel, msg: &Message, objects: &HashMap<u64, (Vec<u8>, u32)>) {
    let started = Instant::now();
    let parts = parts_of(msg);
    let head = parts.first().cloned().unwrap_or_default();
    let text = String::from_utf8_lossy(&head).into_owned();
    let arg = |prefix: &str| text.strip_prefix(prefix).map(str::to_owned);
    let id = msg.id;
    if text == "raise" {
        reply(chan, Kind::Raised, id, started, &[b"raised"]);
    } else if text == "retryable" {
        raise_retryable(chan, id, started, b"retryable");
    } else if let Some((path, steps)) = arg("script:").as_deref().and_then(|a| a.rsplit_once(':')) {
        let runs = std::fs::metadata(path).map_or(0, |m| m.len() as usize);
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .and_then(|mut f| f.write_all(b"."));
        let step = steps.as_bytes().get(runs).or(steps.as_bytes().last());
        match step {
            Some(b'r') => raise_retryable(chan, id, started, format!("run {runs}").as_bytes()),
            Some(b'x') => reply(chan, Kind::Raised, id, started, &[b"final"]),
            Some(b'c') => segfault(),
            Some(b'h') => hang(),
            _ => reply(chan, Kind::Returned, id, started, &[head.as_slice()]),
        }
    } else if text == "crash" {
        segfault();
    } else if text == "abort" {
        std::process::abort();
    } else if let Some(n) = arg("exit:") {
        exit(n.parse().unwrap_or(1));
    } else if text == "hang" {
        hang();
    } else if let Some(ms) = arg("sleep:") {
        std::thread::sleep(Duration::from_millis(ms.parse().unwrap_or(0)));
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        reply(chan, Kind::Returned, id, started, &refs);
    } else if text == "pid" {
        let pid = std::process::id().to_string();
        reply(chan, Kind::Returned, id, started, &[pid.as_bytes()]);
    } else if text == "fn" {
        let out = match objects.get(&msg.aux) {
            Some((body, n)) => {
                let mut out = body.clone();
                out.extend_from_slice(format!("#{n}").as_bytes());
                out
            }
            None => b"unregistered".to_vec(),
        };
        reply(chan, Kind::Returned, id, started, &[&out]);
    } else if text == "garbage" {
        let fd = std::os::fd::AsFd::as_fd(&*chan);
        let _ = rustix::net::send(fd, b"this is not a frame", rustix::net::SendFlags::empty());
        hang();
    } else if head.starts_with(b"raw:") {
        let fd = std::os::fd::AsFd::as_fd(&*chan);
        let _ = rustix::net::send(fd, &head[4..], rustix::net::SendFlags::empty());
    } else if text == "wrongid" {
        reply(
            chan,
            Kind::Returned,
            id.wrapping_add(1000),
            started,
            &[b"x"],
        );
    } else if let Some(t) = arg("stderr:") {
        let _ = std::io::stderr().write_all(format!("{t}\n").as_bytes());
        segfault();
    } else if let Some(t) = arg("stdout:") {
        let mut out = std::io::stdout();
        let _ = out.write_all(format!("{t}\n").as_bytes());
        let _ = out.flush();
        reply(chan, Kind::Returned, id, started, &[head.as_slice()]);
    } else if let Some(n) = arg("log:") {
        let n: usize = n.parse().unwrap_or(0);
        let record = |chan: &Channel, i: usize| {
            let body = format!("record {i}");
            match payload::encode(
                Kind::Log,
                0,
                0,
                &[body.as_bytes()],
                DEFAULT_SEGMENT_THRESHOLD,
            ) {
                Ok(m) => send(chan, &m),
                Err(_) => exit(5),
            }
        };
        let second = match chan.try_clone() {
            Ok(c) => c,
            Err(_) => exit(5),
        };
        let evens = std::thread::spawn(move || (0..n).step_by(2).for_each(|i| record(&second, i)));
        (1..n).step_by(2).for_each(|i| record(chan, i));
        let _ = evens.join();
        segfault();
    } else if let Some(n) = arg("big:") {
        let n: usize = n.parse().unwrap_or(0);
        let data: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
        reply(chan, Kind::Returned, id, started, &[b"big", &data]);
    } else if let Some(path) = arg("crash_once:") {
        if std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .is_ok()
        {
            segfault();
        }
        reply(chan, Kind::Returned, id, started, &[head.as_slice()]);
    } else {
        let refs: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        reply(chan, Kind::Returned, id, started, &refs);
    }
}
