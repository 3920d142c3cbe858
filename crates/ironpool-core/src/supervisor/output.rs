//! Worker stdout/stderr: forwarded line by line, stderr tail kept for crash
//! reports (faulthandler writes the dying worker's Python stack there).

use std::collections::VecDeque;
use std::io::{ErrorKind, Write};
use std::os::fd::OwnedFd;

use crate::platform;

pub struct Capture {
    pub fd: Option<OwnedFd>,
    partial: Vec<u8>,
    tail: VecDeque<String>,
    keep: usize,
    to_stderr: bool,
    forward: bool,
}

impl Capture {
    pub fn new(fd: OwnedFd, to_stderr: bool, keep: usize, forward: bool) -> Self {
        Self {
            fd: Some(fd),
            partial: Vec::new(),
            tail: VecDeque::new(),
            keep,
            to_stderr,
            forward,
        }
    }

    /// Reads what is available without blocking. Returns false at EOF.
    pub fn drain(&mut self) -> bool {
        let mut buf = [0u8; 16 * 1024];
        loop {
            let Some(fd) = &self.fd else { return false };
            match platform::read(fd, &mut buf) {
                Ok(0) => {
                    self.flush_partial();
                    self.fd = None;
                    return false;
                }
                Ok(n) => self.feed(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::Interrupted => continue,
                Err(_) => return true, // EAGAIN: drained for now
            }
        }
    }

    fn feed(&mut self, data: &[u8]) {
        self.partial.extend_from_slice(data);
        let Some(last_nl) = self.partial.iter().rposition(|&b| b == b'\n') else {
            return;
        };
        let complete: Vec<u8> = self.partial.drain(..=last_nl).collect();
        self.emit(&complete);
    }

    fn flush_partial(&mut self) {
        if !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            self.emit(&rest);
        }
    }

    fn emit(&mut self, lines: &[u8]) {
        if self.forward {
            // Whole lines in one write, so lines of workers never interleave.
            let _ = if self.to_stderr {
                std::io::stderr().lock().write_all(lines)
            } else {
                std::io::stdout().lock().write_all(lines)
            };
        }
        if self.keep > 0 {
            for line in String::from_utf8_lossy(lines).lines() {
                if self.tail.len() == self.keep {
                    self.tail.pop_front();
                }
                self.tail.push_back(line.to_string());
            }
        }
    }

    pub fn tail(&mut self) -> String {
        self.drain();
        self.flush_partial();
        self.tail.iter().cloned().collect::<Vec<_>>().join("\n")
    }
}
