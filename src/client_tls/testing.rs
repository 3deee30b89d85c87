//! A stand-in for client TLS in the cores' transcript tests: the client's bytes come in
//! packets, and "starting TLS" drops the rest of the current packet, as the real front end
//! drops what it had read before the handshake. The output is shared so that a test can
//! see what had been sent when TLS started.

use super::StartTls;
use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::io::{self, BufRead, Read, Write};
use std::rc::Rc;

/// Client packets, read at most `read_size` bytes at a time.
pub struct Packets {
    packets: VecDeque<Vec<u8>>,
    current: Vec<u8>,
    pos: usize,
    read_size: usize,
    discard: Rc<Cell<bool>>,
}

impl Read for Packets {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        super::read_through_buffer(self, out)
    }
}

impl BufRead for Packets {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if self.discard.replace(false) {
            self.current.clear();
            self.pos = 0;
        }
        while self.pos == self.current.len() {
            match self.packets.pop_front() {
                Some(packet) => {
                    self.current = packet;
                    self.pos = 0;
                }
                None => return Ok(&[]),
            }
        }
        let end = self.current.len().min(self.pos + self.read_size);
        Ok(&self.current[self.pos..end])
    }

    fn consume(&mut self, amount: usize) {
        self.pos += amount;
    }
}

/// The session's output, shared with the test and with [`FakeTls`].
#[derive(Clone, Default)]
pub struct SharedOutput(pub Rc<RefCell<Vec<u8>>>);

impl Write for SharedOutput {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

/// Client TLS that "succeeds" (or fails) at once.
pub struct FakeTls {
    pub mode_starttls: bool,
    pub required: bool,
    pub active: bool,
    pub fail: bool,
    /// Output length when each handshake started: the "go ahead" must be in it.
    pub started_at: Vec<usize>,
    output: SharedOutput,
    discard: Rc<Cell<bool>>,
}

impl StartTls for FakeTls {
    fn offered(&self) -> bool {
        self.mode_starttls && !self.active
    }
    fn active(&self) -> bool {
        self.active
    }
    fn required(&self) -> bool {
        self.required
    }
    fn start(&mut self) -> Result<(), String> {
        self.started_at.push(self.output.0.borrow().len());
        self.discard.set(true);
        if self.fail {
            return Err("handshake refused".into());
        }
        self.active = true;
        Ok(())
    }
}

/// A client connection made of `packets`, its output, and its TLS (STARTTLS offered).
pub fn connection(packets: &[&[u8]], read_size: usize) -> (Packets, SharedOutput, FakeTls) {
    let discard = Rc::new(Cell::new(false));
    let output = SharedOutput::default();
    let input = Packets {
        packets: packets.iter().map(|p| p.to_vec()).collect(),
        current: Vec::new(),
        pos: 0,
        read_size: read_size.max(1),
        discard: discard.clone(),
    };
    let tls = FakeTls {
        mode_starttls: true,
        required: false,
        active: false,
        fail: false,
        started_at: Vec::new(),
        output: output.clone(),
        discard,
    };
    (input, output, tls)
}
