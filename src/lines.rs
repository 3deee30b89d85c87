//! Reading protocol command lines with a length limit.
//!
//! POP3 (RFC 1939 §3, RFC 2449 §4) and SMTP (RFC 5321 §4.5.3.1.4) both cap command lines.
//! A line over the cap is read to its end and discarded, so the next command starts clean.
//! Partial lines survive read timeouts: the session treats a timeout as an idle tick and
//! calls `read_from` again, which continues where it stopped.

use std::io::{self, BufRead};

/// What one call to [`LineBuffer::read_from`] produced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LineStatus {
    /// A whole line is in [`LineBuffer::line`], without its CRLF or LF.
    Complete,
    /// The line was longer than the limit; it has been consumed and thrown away.
    TooLong,
    /// The peer closed the connection (a partial last line is dropped).
    Eof,
}

/// Accumulates one command line at a time from a `BufRead`.
#[derive(Debug)]
pub struct LineBuffer {
    line: Vec<u8>,
    max: usize,
    /// The current line is over the limit: consume up to LF without storing.
    discarding: bool,
    /// `line` holds a finished line; the next read starts a new one.
    finished: bool,
}

impl LineBuffer {
    /// `max` counts the line's content, not its terminator.
    pub fn new(max: usize) -> Self {
        LineBuffer {
            line: Vec::with_capacity(128),
            max,
            discarding: false,
            finished: false,
        }
    }

    /// The last complete line, without its terminator (a trailing CR is stripped too, so
    /// clients that end lines with a bare LF are understood).
    pub fn line(&self) -> &[u8] {
        &self.line
    }

    /// Reads until a line is complete, too long, or the input ends. An error (such as a read
    /// timeout) leaves the partial line buffered for the next call.
    pub fn read_from(&mut self, input: &mut impl BufRead) -> io::Result<LineStatus> {
        if self.finished {
            self.line.clear();
            self.finished = false;
        }
        loop {
            let available = match input.fill_buf() {
                Ok(buf) => buf,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            if available.is_empty() {
                self.line.clear();
                self.discarding = false;
                return Ok(LineStatus::Eof);
            }
            let (chunk, found_lf) = match available.iter().position(|&b| b == b'\n') {
                Some(i) => (&available[..i], true),
                None => (available, false),
            };
            let used = chunk.len() + usize::from(found_lf);
            if !self.discarding {
                // `max + 1` leaves room for the CR of a CRLF-terminated line of `max` bytes.
                if self.line.len() + chunk.len() > self.max + 1 {
                    self.discarding = true;
                    self.line.clear();
                } else {
                    self.line.extend_from_slice(chunk);
                }
            }
            input.consume(used);
            if found_lf {
                self.finished = true;
                if self.line.last() == Some(&b'\r') {
                    self.line.pop();
                }
                if std::mem::take(&mut self.discarding) || self.line.len() > self.max {
                    self.line.clear();
                    return Ok(LineStatus::TooLong);
                }
                return Ok(LineStatus::Complete);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufReader;

    fn lines(input: &[u8], max: usize, capacity: usize) -> Vec<Result<Vec<u8>, LineStatus>> {
        let mut reader = BufReader::with_capacity(capacity, input);
        let mut buf = LineBuffer::new(max);
        let mut out = Vec::new();
        loop {
            match buf.read_from(&mut reader).unwrap() {
                LineStatus::Complete => out.push(Ok(buf.line().to_vec())),
                LineStatus::Eof => return out,
                other => out.push(Err(other)),
            }
        }
    }

    #[test]
    fn splits_crlf_and_bare_lf_lines_at_every_buffer_size() {
        let input = b"USER a\r\nPASS b c\nNOOP\r\npartial";
        for capacity in 1..input.len() + 2 {
            assert_eq!(
                lines(input, 10, capacity),
                vec![
                    Ok(b"USER a".to_vec()),
                    Ok(b"PASS b c".to_vec()),
                    Ok(b"NOOP".to_vec())
                ],
                "buffer capacity {capacity}"
            );
        }
    }

    #[test]
    fn overlong_line_is_discarded_whole_and_the_next_line_is_clean() {
        let mut input = vec![b'x'; 50];
        input.extend_from_slice(b"\r\nQUIT\r\n");
        for capacity in 1..input.len() + 2 {
            assert_eq!(
                lines(&input, 10, capacity),
                vec![Err(LineStatus::TooLong), Ok(b"QUIT".to_vec())]
            );
        }
    }

    #[test]
    fn limit_is_inclusive_and_excludes_the_terminator() {
        assert_eq!(
            lines(b"0123456789\r\n", 10, 4),
            vec![Ok(b"0123456789".to_vec())]
        );
        assert_eq!(
            lines(b"0123456789\n", 10, 4),
            vec![Ok(b"0123456789".to_vec())]
        );
        assert_eq!(
            lines(b"0123456789A\r\n", 10, 4),
            vec![Err(LineStatus::TooLong)]
        );
        assert_eq!(
            lines(b"0123456789A\n", 10, 4),
            vec![Err(LineStatus::TooLong)]
        );
    }

    /// Yields its parts in order; `None` is a read timeout.
    struct Hiccup<'a> {
        parts: std::collections::VecDeque<Option<&'a [u8]>>,
    }

    impl io::Read for Hiccup<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            match self.parts.pop_front() {
                None => Ok(0),
                Some(None) => Err(io::ErrorKind::TimedOut.into()),
                Some(Some(part)) => {
                    buf[..part.len()].copy_from_slice(part);
                    Ok(part.len())
                }
            }
        }
    }

    #[test]
    fn a_timeout_mid_line_keeps_the_partial_line() {
        let mut reader = BufReader::new(Hiccup {
            parts: [Some(&b"ST"[..]), None, Some(b"AT\r\n")].into(),
        });
        let mut buf = LineBuffer::new(10);
        let err = buf.read_from(&mut reader).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert_eq!(buf.read_from(&mut reader).unwrap(), LineStatus::Complete);
        assert_eq!(buf.line(), b"STAT");
    }
}
