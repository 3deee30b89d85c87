//! A scripted server for the client's tests: its answers come in flights, and a flight is
//! released only by a write of the client after the previous one was read, as on a real
//! link. So the number of flights released is the number of round trips the client
//! waited for, and a client that waits for an answer to a command it has not sent yet is
//! caught (`WouldBlock`) instead of hanging.

use super::client::Transport;
use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::time::Duration;

#[derive(Debug)]
pub(crate) struct Transcript {
    flights: VecDeque<Vec<u8>>,
    available: Vec<u8>,
    position: usize,
    /// Bytes handed out per read at most.
    read_size: usize,
    wrote: bool,
    /// Everything the client wrote.
    pub written: Vec<u8>,
    /// How many times the client waited for the server after writing.
    pub round_trips: usize,
    /// How many writes the client made.
    pub writes: usize,
    /// The client cut the connection.
    pub cut: bool,
    /// The server dies once this many bytes were written: later writes fail, reads end.
    pub dies_after: Option<usize>,
    pub timeouts: Vec<Duration>,
}

impl Transcript {
    /// `flights[0]` is there from the start (the greeting).
    pub(crate) fn new(flights: &[&str], read_size: usize) -> Transcript {
        let mut flights: VecDeque<Vec<u8>> =
            flights.iter().map(|f| f.as_bytes().to_vec()).collect();
        Transcript {
            available: flights.pop_front().unwrap_or_default(),
            flights,
            position: 0,
            read_size,
            wrote: false,
            written: Vec::new(),
            round_trips: 0,
            writes: 0,
            cut: false,
            dies_after: None,
            timeouts: Vec::new(),
        }
    }

    fn dead(&self) -> bool {
        self.cut
            || self
                .dies_after
                .is_some_and(|limit| self.written.len() >= limit)
    }

    /// What the client wrote, as text.
    pub(crate) fn text(&self) -> String {
        String::from_utf8_lossy(&self.written).into_owned()
    }
}

impl Read for Transcript {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.position == self.available.len() {
            // After its last flight the server closes the connection.
            if self.dead() || self.flights.is_empty() {
                return Ok(0);
            }
            if !self.wrote {
                return Err(io::Error::new(
                    io::ErrorKind::WouldBlock,
                    "the client waits without having sent anything",
                ));
            }
            self.available = self.flights.pop_front().unwrap_or_default();
            self.position = 0;
            self.round_trips += 1;
            self.wrote = false;
        }
        let n = buf
            .len()
            .min(self.read_size)
            .min(self.available.len() - self.position);
        buf[..n].copy_from_slice(&self.available[self.position..self.position + n]);
        self.position += n;
        Ok(n)
    }
}

impl Write for Transcript {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.dead() {
            return Err(io::ErrorKind::BrokenPipe.into());
        }
        let room = match self.dies_after {
            Some(limit) => limit - self.written.len(),
            None => buf.len(),
        };
        let n = buf.len().min(room);
        self.written.extend_from_slice(&buf[..n]);
        self.writes += 1;
        self.wrote = true;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Transport for Transcript {
    fn set_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        self.timeouts.push(timeout);
        Ok(())
    }

    fn cut(&mut self) {
        self.cut = true;
    }

    fn is_quiet(&self) -> bool {
        !self.dead()
    }
}

/// A spool that gives `good` bytes of `x`, then fails (a disk error mid-message).
pub(crate) struct FailingSpool {
    pub good: usize,
}

impl Read for FailingSpool {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.good == 0 {
            return Err(io::Error::other("spool disk error"));
        }
        let n = buf.len().min(self.good);
        buf[..n].fill(b'x');
        self.good -= n;
        Ok(n)
    }
}
