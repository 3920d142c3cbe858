//! What a poller event came from. Every descriptor the supervisor's and the
//! zygote's pollers watch is named by one [`Source`], and this module is the
//! only place that packs one into the poller's 64-bit token and back.
//!
//! No system calls here: the poller itself lives in `platform`.

/// How the supervisor names one of its workers: a counter, which is also
/// the id of the fork request that made the worker.
pub type WorkerKey = u64;

/// A descriptor registered with a poller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// Supervisor: the eventfd callers use to wake the supervisor thread.
    Waker,
    /// Supervisor: its pool's session with the template process.
    Session,
    /// Supervisor: a worker's channel (registered in the channels poller).
    Channel(WorkerKey),
    /// Supervisor: the channels poller, nested in the supervisor's own.
    Channels,
    /// Supervisor: a worker's stdout pipe.
    Stdout(WorkerKey),
    /// Supervisor: a worker's stderr pipe.
    Stderr(WorkerKey),
    /// Supervisor: a worker's doorbell, rung when its channel is muted
    /// (registered in the channels poller).
    Doorbell(WorkerKey),
    /// Zygote: the master channel from the process that started it.
    Master,
    /// Zygote: a pidfd on that process (readable once it has died).
    Parent,
    /// Zygote: one pool's session, numbered in order of arrival.
    PoolSession(u64),
    /// Zygote: a pidfd on a worker it forked, by pid.
    Child(i32),
}

/// The tag sits in the top byte; the rest carries a key, number or pid.
const TAG_SHIFT: u32 = 56;
const VALUE_MASK: u64 = (1 << TAG_SHIFT) - 1;

impl Source {
    /// The poller token for this source.
    pub fn token(self) -> u64 {
        let (tag, value) = match self {
            Source::Waker => (0, 0),
            Source::Session => (1, 0),
            Source::Channel(key) => (2, key),
            Source::Stdout(key) => (3, key),
            Source::Stderr(key) => (4, key),
            Source::Master => (5, 0),
            Source::Parent => (6, 0),
            Source::PoolSession(n) => (7, n),
            Source::Child(pid) => (8, u64::from(pid as u32)),
            Source::Channels => (9, 0),
            Source::Doorbell(key) => (10, key),
        };
        // Keys and session numbers are counters: 2^56 is never reached.
        debug_assert_eq!(value & !VALUE_MASK, 0, "{self:?} does not fit a token");
        (tag << TAG_SHIFT) | (value & VALUE_MASK)
    }

    /// The source a token names; `None` for a token no source makes.
    pub fn from_token(token: u64) -> Option<Source> {
        let value = token & VALUE_MASK;
        let source = match token >> TAG_SHIFT {
            0 => Source::Waker,
            1 => Source::Session,
            2 => Source::Channel(value),
            3 => Source::Stdout(value),
            4 => Source::Stderr(value),
            5 => Source::Master,
            6 => Source::Parent,
            7 => Source::PoolSession(value),
            8 => Source::Child(value as u32 as i32),
            9 => Source::Channels,
            10 => Source::Doorbell(value),
            _ => return None,
        };
        Some(source)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_round_trips_through_its_token() {
        let all = [
            Source::Waker,
            Source::Session,
            Source::Channel(1),
            Source::Channel(VALUE_MASK),
            Source::Stdout(7),
            Source::Stderr(7),
            Source::Master,
            Source::Parent,
            Source::PoolSession(3),
            Source::Child(1),
            Source::Child(i32::MAX),
            Source::Channels,
            Source::Doorbell(5),
        ];
        for s in all {
            assert_eq!(Source::from_token(s.token()), Some(s));
        }
        let tokens: std::collections::HashSet<u64> = all.iter().map(|s| s.token()).collect();
        assert_eq!(tokens.len(), all.len(), "no two sources share a token");
        assert_eq!(Source::from_token(u64::MAX), None);
    }
}
