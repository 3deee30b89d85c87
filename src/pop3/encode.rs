//! Turning a raw message into the body of a POP3 multi-line reply, streamed.
//!
//! RFC 1939 §3: lines end in CRLF, a line starting with "." gets another ".", and the reply
//! ends with "." alone on a line. Messages on IMAP servers can hold bare LF or bare CR;
//! both become CRLF, and a message that does not end in a line break gets one, so the
//! terminating "." always stands on its own line. Every other byte passes unchanged, except
//! NUL when [`NulBytes::Replace`] is chosen.
//!
//! TOP (RFC 1939 §7) is the same stream cut short: the header, the blank line, then `n`
//! body lines. A message without a blank line is all header, so TOP sends all of it.
//!
//! The encoder keeps two bits of state between chunks, so the backend may split the message
//! anywhere (even between CR and LF) and memory never depends on the message size.

/// What happens to NUL bytes in a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NulBytes {
    /// Replace each NUL byte with 0x80, as Dovecot does; sizes stay the same.
    Replace,
    /// Pass NUL bytes through unchanged (some clients, Outlook among them, hang on them).
    Keep,
}

/// Dovecot replaces NUL with this byte too (its `i_stream_create_nonuls`).
const NUL_REPLACEMENT: u8 = 0x80;

#[derive(Debug)]
enum Limit {
    Whole,
    Top { in_body: bool, lines_left: u64 },
}

/// Streaming encoder for one message.
#[derive(Debug)]
pub struct Encoder {
    at_line_start: bool,
    pending_cr: bool,
    nul: NulBytes,
    limit: Limit,
    stopped: bool,
}

impl Encoder {
    /// Encodes the whole message (RETR).
    pub fn whole(nul: NulBytes) -> Self {
        Self::with_limit(nul, Limit::Whole)
    }

    /// Encodes the header and `body_lines` lines of the body (TOP).
    pub fn top(nul: NulBytes, body_lines: u64) -> Self {
        Self::with_limit(
            nul,
            Limit::Top {
                in_body: false,
                lines_left: body_lines,
            },
        )
    }

    fn with_limit(nul: NulBytes, limit: Limit) -> Self {
        Encoder {
            at_line_start: true,
            pending_cr: false,
            nul,
            limit,
            stopped: false,
        }
    }

    /// Appends the encoding of `input` to `out`. Returns `false` once the encoder needs no
    /// more input (TOP has its lines).
    pub fn feed(&mut self, input: &[u8], out: &mut Vec<u8>) -> bool {
        let mut i = 0;
        while i < input.len() && !self.stopped {
            if self.pending_cr {
                self.pending_cr = false;
                self.end_line(out);
                if input[i] == b'\n' {
                    i += 1;
                }
                continue;
            }
            match input[i] {
                b'\r' => {
                    self.pending_cr = true;
                    i += 1;
                }
                b'\n' => {
                    self.end_line(out);
                    i += 1;
                }
                first => {
                    let end =
                        memchr::memchr2(b'\r', b'\n', &input[i..]).map_or(input.len(), |p| i + p);
                    if self.at_line_start && first == b'.' {
                        out.push(b'.');
                    }
                    self.at_line_start = false;
                    let run = &input[i..end];
                    match self.nul {
                        // `contains` is a memchr: the byte-by-byte copy below is only for
                        // the rare line that holds a NUL.
                        NulBytes::Replace if !run.contains(&0) => out.extend_from_slice(run),
                        NulBytes::Keep => out.extend_from_slice(run),
                        NulBytes::Replace => out.extend(
                            run.iter()
                                .map(|&c| if c == 0 { NUL_REPLACEMENT } else { c }),
                        ),
                    }
                    i = end;
                }
            }
        }
        !self.stopped
    }

    /// Ends the message: a final line break if missing, then the terminating ".".
    pub fn finish(mut self, out: &mut Vec<u8>) {
        if !self.stopped && (self.pending_cr || !self.at_line_start) {
            self.end_line(out);
        }
        out.extend_from_slice(super::reply::END);
    }

    fn end_line(&mut self, out: &mut Vec<u8>) {
        out.extend_from_slice(b"\r\n");
        let line_was_empty = self.at_line_start;
        self.at_line_start = true;
        if let Limit::Top {
            in_body,
            lines_left,
        } = &mut self.limit
        {
            if *in_body {
                *lines_left -= 1;
            } else if line_was_empty {
                *in_body = true;
            }
            if *in_body && *lines_left == 0 {
                self.stopped = true;
            }
        }
    }
}

/// The octet count RETR sends for `raw` before dot-stuffing: what LIST and STAT report.
pub fn normalized_size(raw: &[u8]) -> u64 {
    let mut size = 0u64;
    let mut at_line_start = true;
    let mut pending_cr = false;
    for &b in raw {
        if pending_cr {
            pending_cr = false;
            size += 2;
            at_line_start = true;
            if b == b'\n' {
                continue;
            }
        }
        match b {
            b'\r' => pending_cr = true,
            b'\n' => {
                size += 2;
                at_line_start = true;
            }
            _ => {
                size += 1;
                at_line_start = false;
            }
        }
    }
    if pending_cr || !at_line_start {
        size += 2;
    }
    size
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Encodes `raw` split into chunks of `chunk` bytes; returns the output and how many
    /// bytes the encoder accepted before it said stop.
    fn encode(mut encoder: Encoder, raw: &[u8], chunk: usize) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in raw.chunks(chunk.max(1)) {
            if !encoder.feed(piece, &mut out) {
                break;
            }
        }
        encoder.finish(&mut out);
        out
    }

    fn retr(raw: &[u8]) -> Vec<u8> {
        let whole = encode(Encoder::whole(NulBytes::Keep), raw, raw.len());
        for chunk in 1..raw.len() + 1 {
            assert_eq!(
                encode(Encoder::whole(NulBytes::Keep), raw, chunk),
                whole,
                "chunk size {chunk} changed the output"
            );
        }
        whole
    }

    fn top(raw: &[u8], lines: u64) -> Vec<u8> {
        let whole = encode(Encoder::top(NulBytes::Keep, lines), raw, raw.len());
        for chunk in 1..raw.len() + 1 {
            assert_eq!(
                encode(Encoder::top(NulBytes::Keep, lines), raw, chunk),
                whole,
                "chunk size {chunk} changed the output"
            );
        }
        whole
    }

    #[test]
    fn line_endings_become_crlf_and_the_end_is_terminated() {
        assert_eq!(retr(b"a\r\nb\r\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(retr(b"a\nb\n"), b"a\r\nb\r\n.\r\n");
        assert_eq!(retr(b"a\rb\r"), b"a\r\nb\r\n.\r\n");
        assert_eq!(retr(b"a\r\r\nb"), b"a\r\n\r\nb\r\n.\r\n");
        assert_eq!(retr(b"a\n\rb"), b"a\r\n\r\nb\r\n.\r\n");
        assert_eq!(retr(b"no newline"), b"no newline\r\n.\r\n");
        assert_eq!(retr(b""), b".\r\n");
    }

    #[test]
    fn lines_starting_with_a_dot_are_stuffed() {
        assert_eq!(
            retr(b".\r\n..\r\n.x\nx.\r.\r\n"),
            b"..\r\n...\r\n..x\r\nx.\r\n..\r\n.\r\n"
        );
        assert_eq!(retr(b"."), b"..\r\n.\r\n");
    }

    #[test]
    fn other_bytes_pass_unchanged_and_nul_follows_the_option() {
        let raw: Vec<u8> = (0u8..=255).filter(|&b| b != b'\r' && b != b'\n').collect();
        let mut expected = raw.clone();
        expected.extend_from_slice(b"\r\n.\r\n");
        assert_eq!(retr(&raw), expected);

        let mut out = Vec::new();
        let mut encoder = Encoder::whole(NulBytes::Replace);
        encoder.feed(b"a\0b", &mut out);
        encoder.finish(&mut out);
        assert_eq!(out, b"a\x80b\r\n.\r\n");
    }

    #[test]
    fn size_matches_the_retr_output_before_stuffing() {
        for raw in [
            &b"a\r\nb\r\n"[..],
            b"a\nb",
            b"a\r\r\n",
            b"",
            b"x\r",
            b".dot\n..\n",
        ] {
            let encoded = retr(raw);
            let stuffed = encoded
                .split(|&b| b == b'\n')
                .filter(|l| l.starts_with(b".") && l.len() > 2)
                .count() as u64;
            assert_eq!(
                normalized_size(raw) + stuffed + 3,
                encoded.len() as u64,
                "{raw:?}"
            );
        }
    }

    const MESSAGE: &[u8] = b"From: a\r\nSubject: b\r\n\r\nline1\r\n.line2\r\nline3\r\n";

    #[test]
    fn top_zero_sends_header_and_blank_line() {
        assert_eq!(top(MESSAGE, 0), b"From: a\r\nSubject: b\r\n\r\n.\r\n");
    }

    #[test]
    fn top_counts_body_lines_only_and_stuffs_dots() {
        assert_eq!(
            top(MESSAGE, 2),
            b"From: a\r\nSubject: b\r\n\r\nline1\r\n..line2\r\n.\r\n"
        );
        assert_eq!(top(MESSAGE, 3), retr(MESSAGE));
        assert_eq!(top(MESSAGE, u64::MAX), retr(MESSAGE));
    }

    #[test]
    fn top_of_a_message_without_blank_line_is_the_whole_message() {
        assert_eq!(
            top(b"From: a\nSubject: b", 0),
            b"From: a\r\nSubject: b\r\n.\r\n"
        );
    }

    #[test]
    fn top_with_bare_lf_and_bare_cr_separators() {
        assert_eq!(top(b"H: 1\n\nb1\nb2\n", 1), b"H: 1\r\n\r\nb1\r\n.\r\n");
        assert_eq!(top(b"H: 1\r\rb1\rb2\r", 1), b"H: 1\r\n\r\nb1\r\n.\r\n");
        assert_eq!(top(b"H: 1\n\nlast", 5), b"H: 1\r\n\r\nlast\r\n.\r\n");
    }

    #[test]
    fn top_stops_asking_for_input_once_done() {
        let mut encoder = Encoder::top(NulBytes::Keep, 1);
        let mut out = Vec::new();
        assert!(encoder.feed(b"H: 1\r\n\r\n", &mut out));
        assert!(!encoder.feed(b"b1\r\nb2\r\n", &mut out));
        assert_eq!(out, b"H: 1\r\n\r\nb1\r\n");
    }
}
