//! How long a client may stay silent, and when the backend must hear from us, the same in
//! `pop3` and `smtp`.
//!
//! Time is counted in the ticks of the client's input: its reader fails with `TimedOut`
//! once per tick of the clock while the client sends nothing (`crate::input`). Counting
//! those, rather than reading a clock here, keeps the sessions deterministic under the
//! transcript tests, which stand for minutes of silence with a few `TimedOut` reads.

use std::time::Duration;

/// What a tick of silence calls for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tick {
    /// The client has been silent for the idle limit: say goodbye and close.
    Expired,
    /// The backend has not heard from us for the keepalive interval: send it something
    /// harmless (IMAP NOOP, SMTP NOOP) so that it does not drop the connection.
    KeepAlive,
    /// Nothing to do yet.
    Wait,
}

/// The silence of the client and of the backend connection in one session.
#[derive(Debug, Clone)]
pub struct Idle {
    tick: Duration,
    limit: Duration,
    keepalive: Duration,
    client: Duration,
    backend: Duration,
}

impl Idle {
    /// `tick`: the time each `TimedOut` read stands for; `limit`: the client's idle limit;
    /// `keepalive`: the backend's.
    pub fn new(tick: Duration, limit: Duration, keepalive: Duration) -> Self {
        Idle {
            tick,
            limit,
            keepalive,
            client: Duration::ZERO,
            backend: Duration::ZERO,
        }
    }

    /// The client sent something (a line, or data of a message).
    pub fn client_active(&mut self) {
        self.client = Duration::ZERO;
    }

    /// We sent the backend something ourselves, which keeps its connection alive as well
    /// as a keepalive would.
    pub fn backend_used(&mut self) {
        self.backend = Duration::ZERO;
    }

    /// One tick of silence from the client.
    pub fn tick(&mut self) -> Tick {
        self.client += self.tick;
        if self.client >= self.limit {
            return Tick::Expired;
        }
        self.backend += self.tick;
        if self.backend >= self.keepalive {
            self.backend = Duration::ZERO;
            return Tick::KeepAlive;
        }
        Tick::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINUTE: Duration = Duration::from_secs(60);

    #[test]
    fn the_limit_counts_silence_and_activity_resets_it() {
        let mut idle = Idle::new(MINUTE, 5 * MINUTE, 10 * MINUTE);
        for _ in 0..4 {
            assert_eq!(idle.tick(), Tick::Wait);
        }
        idle.client_active();
        for _ in 0..4 {
            assert_eq!(idle.tick(), Tick::Wait);
        }
        assert_eq!(idle.tick(), Tick::Expired);
    }

    #[test]
    fn keepalives_come_every_interval_unless_the_backend_was_used() {
        let mut idle = Idle::new(Duration::from_secs(30), 10 * MINUTE, MINUTE);
        assert_eq!(idle.tick(), Tick::Wait);
        assert_eq!(idle.tick(), Tick::KeepAlive);
        assert_eq!(idle.tick(), Tick::Wait);
        idle.backend_used();
        assert_eq!(idle.tick(), Tick::Wait);
        assert_eq!(idle.tick(), Tick::KeepAlive);
        // The client's activity does not touch the backend's clock.
        idle.client_active();
        assert_eq!(idle.tick(), Tick::Wait);
        assert_eq!(idle.tick(), Tick::KeepAlive);
    }

    #[test]
    fn a_zero_limit_expires_at_the_first_tick() {
        let mut idle = Idle::new(MINUTE, Duration::ZERO, MINUTE);
        assert_eq!(idle.tick(), Tick::Expired);
    }
}
