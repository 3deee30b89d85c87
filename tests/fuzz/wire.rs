//! Reading transcripts the way a peer would, written apart from the proxy's own code so
//! that the oracles do not share its mistakes: client lines as `lines::LineBuffer` is meant
//! to split them, and reply lines that must each end in CRLF.

/// One line the client sent, as the core must see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientLine<'a> {
    /// Without its LF and one CR before it.
    Line(&'a [u8]),
    /// Longer than the core's limit: it gets one error reply.
    TooLong,
}

/// The next complete line of `input` from `pos` (lines end at LF; one CR before the LF is
/// not part of the line), and where the following line starts. `None` at the end of input
/// or when the last line has no LF: the core drops such a fragment at end of input.
pub fn next_line(input: &[u8], pos: usize, max: usize) -> Option<(ClientLine<'_>, usize)> {
    let rest = input.get(pos..)?;
    let lf = rest.iter().position(|&b| b == b'\n')?;
    let line = &rest[..lf];
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    let next = pos + lf + 1;
    if line.len() > max {
        Some((ClientLine::TooLong, next))
    } else {
        Some((ClientLine::Line(line), next))
    }
}

/// All complete client lines.
pub fn client_lines(input: &[u8], max: usize) -> Vec<ClientLine<'_>> {
    let mut lines = Vec::new();
    let mut pos = 0;
    while let Some((line, next)) = next_line(input, pos, max) {
        lines.push(line);
        pos = next;
    }
    lines
}

/// The core's output as lines without their CRLF. Every line must end in CRLF, and no CR
/// or LF may stand anywhere else: a bare one would let a client read lines we did not send.
pub fn output_lines(out: &[u8]) -> Result<Vec<&[u8]>, String> {
    let mut lines = Vec::new();
    let mut start = 0;
    let mut i = 0;
    while i < out.len() {
        match out[i] {
            b'\r' if out.get(i + 1) == Some(&b'\n') => {
                lines.push(&out[start..i]);
                i += 2;
                start = i;
            }
            b'\r' => return Err(format!("bare CR in output line {}", lines.len() + 1)),
            b'\n' => return Err(format!("bare LF in output line {}", lines.len() + 1)),
            _ => i += 1,
        }
    }
    if start != out.len() {
        return Err(format!("output ends without CRLF: {}", show(&out[start..])));
    }
    Ok(lines)
}

/// Whether a byte is a control character (C0 other than HT, or DEL).
pub fn is_control(b: u8) -> bool {
    (b < 0x20 && b != b'\t') || b == 0x7f
}

/// Bytes for a message: printable, escapes for the rest, cut at 120 characters.
pub fn show(bytes: &[u8]) -> String {
    let text: String = bytes.escape_ascii().to_string();
    if text.len() > 120 {
        format!("{}…({} bytes)", &text[..120], bytes.len())
    } else {
        text
    }
}

/// Splits `rest` into words at spaces and tabs, as the oracles read arguments.
pub fn words(rest: &[u8]) -> Vec<&[u8]> {
    rest.split(|&b| b == b' ' || b == b'\t')
        .filter(|w| !w.is_empty())
        .collect()
}

/// The keyword (bytes before the first space, upper-cased) and the rest after that space.
pub fn keyword(line: &[u8]) -> (Vec<u8>, Option<&[u8]>) {
    match line.iter().position(|&b| b == b' ') {
        Some(i) => (line[..i].to_ascii_uppercase(), Some(&line[i + 1..])),
        None => (line.to_ascii_uppercase(), None),
    }
}
