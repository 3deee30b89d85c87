//! The DATA phase's byte decoder: end-of-data detection, dot-unstuffing, line endings.
//!
//! RFC 5321 §4.1.1.4 and §2.3.8: the data ends only at `<CRLF>.<CRLF>`; bare CR and bare LF
//! are not line endings there. §4.5.2: a leading dot is removed from a line that has more
//! characters. RFC 5321 §2.3.8 forbids bare CR and LF in the data, and SMTP smuggling
//! (CVE-2023-51764 and friends) exploits servers that disagree on them, so:
//!
//! - only a real CRLF, `.`, CRLF (or `.` CRLF right after DATA) ends the message;
//! - every bare CR and bare LF becomes CRLF in the output, so nothing upstream can read a
//!   line ending differently from us;
//! - a line made of a single dot that did *not* end the data (`\n.\n`, `\n.\r\n`,
//!   `\r.\r\n`, `\r\n.\r`, `\r\n.\n`…) is content and stays a line holding one dot; the relay
//!   stuffs it again on the way out, so it cannot end the message at the backend either;
//! - bare CR/LF start a new line for unstuffing too, so `\n..x` gives the line `.x`, the
//!   same as `\r\n..x`.
//!
//! The decoder is sans-IO: it takes whatever bytes arrived (one at a time or megabytes) and
//! says how many it used, so bytes pipelined after the final dot stay with the caller.

/// Where the decoder is within the current line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// At the start of a line. `after_crlf`: the previous line ended with a real CRLF (or
    /// the data just began), so a lone dot here can end the data.
    LineStart { after_crlf: bool },
    /// A dot at the start of a line.
    Dot { after_crlf: bool },
    /// A dot and a CR at the start of a line.
    DotCr { after_crlf: bool },
    /// Inside a line.
    Text,
    /// A CR inside a line: CRLF if LF follows, else a bare CR.
    Cr,
    /// The end-of-data line has been read.
    Done,
}

#[derive(Debug)]
pub struct DataDecoder {
    state: State,
}

impl Default for DataDecoder {
    fn default() -> Self {
        Self::new()
    }
}

impl DataDecoder {
    /// A decoder positioned right after the DATA command's CRLF.
    pub fn new() -> Self {
        DataDecoder {
            state: State::LineStart { after_crlf: true },
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decodes `input`, appending message bytes to `out` (CRLF line endings, unstuffed).
    /// Returns how many input bytes were used: all of them, or fewer once the end-of-data
    /// line has been read.
    pub fn decode(&mut self, input: &[u8], out: &mut Vec<u8>) -> usize {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                State::Done => break,
                State::Text => {
                    // Fast path: copy up to the next CR or LF in one go.
                    let run = memchr::memchr2(b'\r', b'\n', &input[i..]).unwrap_or(input.len() - i);
                    out.extend_from_slice(&input[i..i + run]);
                    i += run;
                    if i < input.len() {
                        if input[i] == b'\r' {
                            self.state = State::Cr;
                        } else {
                            out.extend_from_slice(b"\r\n");
                            self.state = State::LineStart { after_crlf: false };
                        }
                        i += 1;
                    }
                }
                State::LineStart { after_crlf } => {
                    i += 1;
                    match b {
                        b'.' => self.state = State::Dot { after_crlf },
                        b'\r' => self.state = State::Cr,
                        b'\n' => {
                            out.extend_from_slice(b"\r\n");
                            self.state = State::LineStart { after_crlf: false };
                        }
                        _ => {
                            out.push(b);
                            self.state = State::Text;
                        }
                    }
                }
                State::Dot { after_crlf } => match b {
                    b'\r' => {
                        self.state = State::DotCr { after_crlf };
                        i += 1;
                    }
                    b'\n' => {
                        // A lone dot ended by a bare LF: content.
                        out.extend_from_slice(b".\r\n");
                        self.state = State::LineStart { after_crlf: false };
                        i += 1;
                    }
                    // More characters follow: drop the stuffed dot and read `b` as text.
                    _ => self.state = State::Text,
                },
                State::DotCr { after_crlf } => {
                    if b == b'\n' {
                        i += 1;
                        if after_crlf {
                            self.state = State::Done;
                        } else {
                            // `\n.\r\n` or `\r.\r\n`: a dot line after a bare line ending.
                            out.extend_from_slice(b".\r\n");
                            self.state = State::LineStart { after_crlf: true };
                        }
                    } else {
                        // `.` then a bare CR: a dot line; `b` starts the next line.
                        out.extend_from_slice(b".\r\n");
                        self.state = State::LineStart { after_crlf: false };
                    }
                }
                State::Cr => {
                    out.extend_from_slice(b"\r\n");
                    if b == b'\n' {
                        i += 1;
                        self.state = State::LineStart { after_crlf: true };
                    } else {
                        // A bare CR; `b` starts the next line.
                        self.state = State::LineStart { after_crlf: false };
                    }
                }
            }
        }
        i
    }
}

/// Whether `data` has a CR not followed by LF, or an LF not preceded by CR.
#[cfg(test)]
pub(crate) fn has_bare_cr_or_lf(data: &[u8]) -> bool {
    data.iter().enumerate().any(|(i, &b)| {
        (b == b'\r' && data.get(i + 1) != Some(&b'\n'))
            || (b == b'\n' && (i == 0 || data[i - 1] != b'\r'))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Decodes `input` fed in chunks of `chunk` bytes; returns (output, bytes used, done).
    fn decode_chunked(input: &[u8], chunk: usize) -> (Vec<u8>, usize, bool) {
        let mut d = DataDecoder::new();
        let mut out = Vec::new();
        let mut used = 0;
        for part in input.chunks(chunk) {
            let n = d.decode(part, &mut out);
            used += n;
            if n < part.len() || d.is_done() {
                break;
            }
        }
        (out, used, d.is_done())
    }

    /// Every chunk size must give the same answer as one big chunk.
    fn decode_all_ways(input: &[u8]) -> (Vec<u8>, usize, bool) {
        let whole = decode_chunked(input, input.len().max(1));
        for chunk in 1..input.len() {
            assert_eq!(decode_chunked(input, chunk), whole, "chunk size {chunk}");
        }
        whole
    }

    fn ends(input: &[u8]) -> Option<(Vec<u8>, usize)> {
        let (out, used, done) = decode_all_ways(input);
        done.then_some((out, used))
    }

    #[test]
    fn ends_only_at_crlf_dot_crlf_and_leaves_what_follows() {
        let input = b"Subject: x\r\n\r\nbody\r\n.\r\nQUIT\r\n";
        let (out, used) = ends(input).unwrap();
        assert_eq!(out, b"Subject: x\r\n\r\nbody\r\n");
        assert_eq!(&input[used..], b"QUIT\r\n");
    }

    #[test]
    fn empty_message_ends_at_the_first_line() {
        assert_eq!(ends(b".\r\nNOOP\r\n"), Some((Vec::new(), 3)));
    }

    #[test]
    fn smuggling_sequences_are_content() {
        // Each sequence sits between two lines; none may end the data, and each comes out as
        // lines of plain CRLF with the lone dot kept as content.
        let cases: [(&[u8], &[u8]); 8] = [
            (b"a\n.\nb", b"a\r\n.\r\nb"),
            (b"a\n.\r\nb", b"a\r\n.\r\nb"),
            (b"a\r.\r\nb", b"a\r\n.\r\nb"),
            (b"a\r\n.\rb", b"a\r\n.\r\nb"),
            (b"a\r\n.\nb", b"a\r\n.\r\nb"),
            (b"a\r.\rb", b"a\r\n.\r\nb"),
            (b"a\n.\rb", b"a\r\n.\r\nb"),
            (b"a\r.\nb", b"a\r\n.\r\nb"),
        ];
        for (seq, expected) in cases {
            let mut input = seq.to_vec();
            input.extend_from_slice(b"\r\nMAIL FROM:<evil@x>\r\n");
            let (out, _, done) = decode_all_ways(&input);
            assert!(!done, "{seq:?} ended the data");
            let mut want = expected.to_vec();
            want.extend_from_slice(b"\r\nMAIL FROM:<evil@x>\r\n");
            assert_eq!(out, want, "{seq:?}");
            assert!(!has_bare_cr_or_lf(&out), "{seq:?}");
        }
    }

    #[test]
    fn a_real_end_after_odd_line_endings_still_ends() {
        // `\r\r\n.\r\n` holds a real CRLF.CRLF: the first CR is a bare CR (content).
        let (out, used) = ends(b"a\r\r\n.\r\nX").unwrap();
        assert_eq!(out, b"a\r\n\r\n");
        assert_eq!(used, 7);
        let (out, _) = ends(b"a\n\r\n.\r\n").unwrap();
        assert_eq!(out, b"a\r\n\r\n");
    }

    #[test]
    fn bare_line_endings_become_crlf() {
        let (out, _, done) = decode_all_ways(b"a\nb\rc\r\r\nd\n\ne");
        assert!(!done);
        assert_eq!(out, b"a\r\nb\r\nc\r\n\r\nd\r\n\r\ne");
    }

    #[test]
    fn dots_are_unstuffed_after_any_line_ending() {
        let (out, _) = ends(b"..a\r\n..\r\nx\n..b\r\n.\r\n").unwrap();
        assert_eq!(out, b".a\r\n.\r\nx\r\n.b\r\n");
        let (out, _) = ends(b"...\r\n. \r\n.\r\n").unwrap();
        assert_eq!(out, b"..\r\n \r\n");
    }

    #[test]
    fn eight_bit_and_nul_bytes_pass_through() {
        let mut input: Vec<u8> = (0u8..=255).filter(|&b| b != b'\r' && b != b'\n').collect();
        let body = input.clone();
        input.extend_from_slice(b"\r\n.\r\n");
        let (out, _) = ends(&input).unwrap();
        let mut want = body;
        if want[0] == b'.' {
            want.remove(0);
        }
        want.extend_from_slice(b"\r\n");
        assert_eq!(out, want);
    }

    #[test]
    fn output_never_holds_a_bare_cr_or_lf_for_any_short_input() {
        // Every string of up to 6 bytes over the interesting alphabet.
        let alphabet = [b'\r', b'\n', b'.', b'x'];
        let mut input = Vec::new();
        for len in 1..=6u32 {
            for mut n in 0..4usize.pow(len) {
                input.clear();
                for _ in 0..len {
                    input.push(alphabet[n % 4]);
                    n /= 4;
                }
                let mut d = DataDecoder::new();
                let mut out = Vec::new();
                d.decode(&input, &mut out);
                assert!(!has_bare_cr_or_lf(&out), "{input:?} -> {out:?}");
                let done_by_rfc = {
                    let mut with_start = b"\r\n".to_vec();
                    with_start.extend_from_slice(&input);
                    with_start.windows(5).any(|w| w == b"\r\n.\r\n")
                };
                assert_eq!(d.is_done(), done_by_rfc, "{input:?}");
            }
        }
    }
}
