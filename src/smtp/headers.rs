//! Edits of the message's header block: From: address, Reply-To:, missing Date: and
//! Message-ID:.
//!
//! RFC 5322 §2.2 (header fields, folding), §3.6 (origination date and originator fields are
//! required; Message-ID SHOULD be present), §3.3 (date-time), §3.6.4 (msg-id). RFC 5321
//! §4.4: a submission client never adds Return-Path:, so neither do we.
//!
//! Only the header block is touched, and within it only the fields being changed: every
//! other byte, every body byte, folding and field order stay as sent. mailparse's
//! `parse_header` gives each field's exact span, folded lines included. The header block
//! ends where mailparse ends it: at the first empty line (or the end of the message). A
//! line without a colon inside the block is a broken field, not the start of the body, so
//! a Date: after it still counts and none is added. Only a message whose very first line
//! is not a header field has no header block (some devices send a body with no header at
//! all): it gets the added fields and an empty line before it, so it stays body.

use std::time::{SystemTime, UNIX_EPOCH};

/// What to change in each message.
#[derive(Debug, Clone, Default)]
pub struct HeaderEdits {
    /// Replace the address in From: (keeping the display name), or add From: when missing.
    pub rewrite_from: Option<String>,
    /// Replace any Reply-To: with this address.
    pub reply_to: Option<String>,
    /// Right-hand side of generated Message-IDs.
    pub id_domain: String,
}

/// Why the header block could not be edited.
#[derive(Debug, PartialEq, Eq)]
pub enum HeaderError {
    /// The header block does not end within the bytes held in memory.
    TooLarge,
}

/// Applies `edits` to `head`, the first bytes of a CRLF-normalised message. `complete` says
/// whether `head` is the whole message. Returns the new head (header block edited, the rest
/// of `head` unchanged) and a note of what changed, for the log.
pub fn edit(
    head: &[u8],
    complete: bool,
    edits: &HeaderEdits,
    now: SystemTime,
) -> Result<(Vec<u8>, Vec<&'static str>), HeaderError> {
    let fields = fields(head, complete)?;
    let end = fields.last().map_or(0, |f| f.end);
    let mut out = Vec::with_capacity(head.len() + 256);
    let mut changes = Vec::new();
    let (mut has_from, mut has_date, mut has_id) = (false, false, false);

    for field in &fields {
        let raw = &head[field.start..field.end];
        let name = field.name(head);
        if name.eq_ignore_ascii_case(b"from") {
            has_from = true;
            if let (Some(addr), Some(colon)) = (&edits.rewrite_from, field.colon) {
                out.extend_from_slice(&rewrite_from(raw, colon - field.start, addr));
                changes.push("from-rewritten");
                continue;
            }
        } else if name.eq_ignore_ascii_case(b"reply-to") && edits.reply_to.is_some() {
            continue; // replaced below
        } else if name.eq_ignore_ascii_case(b"date") {
            has_date = true;
        } else if name.eq_ignore_ascii_case(b"message-id") {
            has_id = true;
        }
        out.extend_from_slice(raw);
    }

    if let (false, Some(addr)) = (has_from, &edits.rewrite_from) {
        out.extend_from_slice(format!("From: {addr}\r\n").as_bytes());
        changes.push("from-added");
    }
    if let Some(addr) = &edits.reply_to {
        out.extend_from_slice(format!("Reply-To: {addr}\r\n").as_bytes());
        changes.push("reply-to-set");
    }
    if !has_date {
        out.extend_from_slice(format!("Date: {}\r\n", rfc5322_date(now)).as_bytes());
        changes.push("date-added");
    }
    if !has_id {
        out.extend_from_slice(
            format!("Message-ID: {}\r\n", message_id(now, &edits.id_domain)).as_bytes(),
        );
        changes.push("message-id-added");
    }
    let rest = &head[end..];
    if fields.is_empty() && !out.is_empty() && !rest.is_empty() && !rest.starts_with(b"\r\n") {
        // No header block at all: keep the original first line in the body.
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(rest);
    Ok((out, changes))
}

/// One header field's span within the head.
#[derive(Debug)]
struct Field {
    start: usize,
    /// `None` for a line without a colon inside the block (a broken header line).
    colon: Option<usize>,
    end: usize,
}

impl Field {
    /// The field name; empty for a line without a colon, which matches no field.
    fn name<'a>(&self, head: &'a [u8]) -> &'a [u8] {
        self.colon
            .map_or(&[][..], |colon| head[self.start..colon].trim_ascii_end())
    }
}

fn fields(head: &[u8], complete: bool) -> Result<Vec<Field>, HeaderError> {
    let mut fields = Vec::new();
    let mut pos = 0;
    while pos < head.len() && !head[pos..].starts_with(b"\r\n") {
        let line_end = head[pos..].iter().position(|&b| b == b'\n');
        let colon = field_name_end(&head[pos..]).map(|c| pos + c);
        if colon.is_none() && pos == 0 {
            if !complete && line_end.is_none() {
                // The line is cut off by the memory limit: cannot tell what it is.
                return Err(HeaderError::TooLarge);
            }
            break; // no header block at all: the message is all body
        }
        // Past the first field the block ends only at the empty line, as mailparse (and
        // Dovecot) read it: a line without a colon is a field with an empty value, not
        // the start of the body, so fields after it still count as present. A line
        // mailparse refuses (a space after a line without a colon) is kept the same way.
        let used = match mailparse::parse_header(&head[pos..]) {
            Ok((_, used)) if colon.is_some() => used,
            _ => line_end.map_or(head.len() - pos, |i| i + 1),
        };
        if pos + used == head.len() && !complete {
            // The field (or its folding) may continue past what we hold.
            return Err(HeaderError::TooLarge);
        }
        fields.push(Field {
            start: pos,
            colon,
            end: pos + used,
        });
        pos += used;
    }
    if pos == head.len() && !complete {
        return Err(HeaderError::TooLarge);
    }
    Ok(fields)
}

/// RFC 5322 §3.6.8: a field name is printable ASCII except `:`; obsolete syntax (§4.5.8)
/// allows white space before the colon. Returns the colon's offset.
fn field_name_end(line: &[u8]) -> Option<usize> {
    let name_len = line
        .iter()
        .position(|&b| !(b.is_ascii_graphic() && b != b':'))
        .unwrap_or(line.len());
    if name_len == 0 {
        return None;
    }
    let colon = name_len
        + line[name_len..]
            .iter()
            .position(|&b| b != b' ' && b != b'\t')
            .unwrap_or(line.len() - name_len);
    (line.get(colon) == Some(&b':')).then_some(colon)
}

/// Replaces the address of a From: field and keeps everything else: the display name
/// (quoted, encoded-word or a trailing comment), folding and spacing. A field that does not
/// hold exactly one mailbox is replaced whole.
fn rewrite_from(raw: &[u8], colon: usize, addr: &str) -> Vec<u8> {
    let name = &raw[..colon + 1];
    let value = raw[colon + 1..]
        .strip_suffix(b"\r\n")
        .unwrap_or(&raw[colon + 1..]);
    let single = mailparse::parse_header(raw)
        .ok()
        .and_then(|(h, _)| mailparse::addrparse_header(&h).ok())
        .is_some_and(|list| list.len() == 1 && matches!(list[0], mailparse::MailAddr::Single(_)));
    let mut out = name.to_vec();
    match address_span(value).filter(|_| single) {
        Some((start, end)) => {
            out.extend_from_slice(&value[..start]);
            out.extend_from_slice(addr.as_bytes());
            out.extend_from_slice(&value[end..]);
        }
        None => {
            out.push(b' ');
            out.extend_from_slice(addr.as_bytes());
        }
    }
    out.extend_from_slice(b"\r\n");
    out
}

/// Finds the address within a mailbox: inside the first `<…>` outside quotes and comments,
/// or else the addr-spec (everything outside comments and surrounding white space).
fn address_span(value: &[u8]) -> Option<(usize, usize)> {
    #[derive(PartialEq)]
    enum S {
        Normal,
        Quoted,
        Comment(u32),
    }
    let mut state = S::Normal;
    let mut escaped = false;
    let mut open = None;
    let mut first = None;
    let mut last = 0;
    for (i, &b) in value.iter().enumerate() {
        if escaped {
            escaped = false;
            if state == S::Quoted {
                last = i + 1;
            }
            continue;
        }
        match (&mut state, b) {
            (S::Quoted | S::Comment(_), b'\\') => escaped = true,
            (S::Normal, b'"') => {
                state = S::Quoted;
                first.get_or_insert(i);
            }
            (S::Quoted, b'"') => {
                state = S::Normal;
                last = i + 1;
            }
            (S::Quoted, _) => last = i + 1,
            (S::Normal, b'(') => state = S::Comment(1),
            (S::Comment(depth), b'(') => *depth += 1,
            (S::Comment(depth), b')') => {
                *depth -= 1;
                if *depth == 0 {
                    state = S::Normal;
                }
            }
            (S::Comment(_), _) => {}
            (S::Normal, b'<') if open.is_none() => open = Some(i + 1),
            (S::Normal, b'>') => {
                if let Some(start) = open {
                    return Some((start, i));
                }
            }
            (S::Normal, b' ' | b'\t' | b'\r' | b'\n') => {}
            (S::Normal, _) => {
                first.get_or_insert(i);
                last = i + 1;
            }
        }
    }
    match (open, first) {
        (None, Some(start)) if start < last => Some((start, last)),
        _ => None,
    }
}

/// RFC 5322 §3.3 date-time in UTC, e.g. `Sat, 22 Nov 2025 00:32:00 +0000`.
pub fn rfc5322_date(now: SystemTime) -> String {
    let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (year, month, day) = crate::calendar::civil_from_days(days);
    const WEEKDAYS: [&str; 7] = ["Thu", "Fri", "Sat", "Sun", "Mon", "Tue", "Wed"];
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    format!(
        "{}, {} {} {} {:02}:{:02}:{:02} +0000",
        WEEKDAYS[days.rem_euclid(7) as usize],
        day,
        MONTHS[(month - 1) as usize],
        year,
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// RFC 5322 §3.6.4 msg-id, unique through time, process id, a per-process counter and a
/// per-process random key (std's hasher seed, so no extra dependency).
pub fn message_id(now: SystemTime, domain: &str) -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let t = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(n);
    let domain = if !domain.is_empty()
        && domain
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        domain
    } else {
        "localhost"
    };
    format!(
        "<{:x}.{:x}.{:x}.{n}.{:016x}@{domain}>",
        t.as_secs(),
        t.subsec_nanos(),
        std::process::id(),
        hasher.finish()
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn at(secs: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(secs)
    }

    fn edits(from: Option<&str>, reply_to: Option<&str>) -> HeaderEdits {
        HeaderEdits {
            rewrite_from: from.map(str::to_string),
            reply_to: reply_to.map(str::to_string),
            id_domain: "proxy.example".into(),
        }
    }

    const DATED: &str = "Date: x\r\nMessage-ID: <1@x>\r\n";

    fn edited(head: &str, e: &HeaderEdits) -> String {
        let (out, _) = edit(head.as_bytes(), true, e, at(0)).unwrap();
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn dates_are_rfc5322() {
        assert_eq!(rfc5322_date(at(0)), "Thu, 1 Jan 1970 00:00:00 +0000");
        assert_eq!(
            rfc5322_date(at(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 +0000"
        );
        assert_eq!(
            rfc5322_date(at(1_763_771_520)),
            "Sat, 22 Nov 2025 00:32:00 +0000"
        );
    }

    #[test]
    fn message_ids_are_unique_and_well_formed() {
        let a = message_id(at(5), "proxy.example");
        let b = message_id(at(5), "proxy.example");
        assert_ne!(a, b);
        assert!(a.starts_with('<') && a.ends_with("@proxy.example>"), "{a}");
        assert!(message_id(at(5), "bad host").ends_with("@localhost>"));
    }

    #[test]
    fn missing_date_and_message_id_are_added_at_the_end_of_the_header_block() {
        let out = edited("Subject: hi\r\nX-A: 1\r\n\r\nbody\r\n", &edits(None, None));
        assert!(
            out.starts_with(
                "Subject: hi\r\nX-A: 1\r\nDate: Thu, 1 Jan 1970 00:00:00 +0000\r\nMessage-ID: <"
            ),
            "{out}"
        );
        assert!(out.ends_with("@proxy.example>\r\n\r\nbody\r\n"), "{out}");
    }

    #[test]
    fn present_fields_are_left_byte_for_byte() {
        let msg = format!("Subject: a\r\n folded\r\n{DATED}x-odd :  v\r\n\r\nFrom: body\r\n");
        assert_eq!(edited(&msg, &edits(None, None)), msg);
        let msg = "DATE: x\r\nmessage-id: <y>\r\n\r\n";
        assert_eq!(edited(msg, &edits(None, None)), msg);
    }

    #[test]
    fn from_address_is_replaced_keeping_the_display_name_and_spacing() {
        let cases = [
            (
                "From: \"Lobby Scanner\" <scan@lan>\r\n",
                "From: \"Lobby Scanner\" <me@corp.example>\r\n",
            ),
            (
                "From: =?utf-8?q?Dru=C3=A7ker?= <p@lan>\r\n",
                "From: =?utf-8?q?Dru=C3=A7ker?= <me@corp.example>\r\n",
            ),
            ("From:scan@lan\r\n", "From:me@corp.example\r\n"),
            (
                "FROM:  scan@lan (Lobby Scanner)\r\n",
                "FROM:  me@corp.example (Lobby Scanner)\r\n",
            ),
            (
                "From: \"a <b@c>\"\r\n <scan@lan>\r\n",
                "From: \"a <b@c>\"\r\n <me@corp.example>\r\n",
            ),
            ("From: <scan@lan>\r\n", "From: <me@corp.example>\r\n"),
            ("From: a@lan, b@lan\r\n", "From: me@corp.example\r\n"),
            ("From:\r\n", "From: me@corp.example\r\n"),
        ];
        for (field, want) in cases {
            let msg = format!("{field}{DATED}\r\nbody <x@y>\r\n");
            let want = format!("{want}{DATED}\r\nbody <x@y>\r\n");
            assert_eq!(
                edited(&msg, &edits(Some("me@corp.example"), None)),
                want,
                "{field:?}"
            );
        }
    }

    #[test]
    fn from_is_added_when_missing_and_reply_to_replaced() {
        let msg = format!("Reply-To: old@x\r\n{DATED}Reply-to: second@x\r\n\r\nb\r\n");
        assert_eq!(
            edited(&msg, &edits(Some("me@c"), Some("desk@c"))),
            format!("{DATED}From: me@c\r\nReply-To: desk@c\r\n\r\nb\r\n")
        );
    }

    #[test]
    fn a_message_without_header_block_keeps_its_first_line_in_the_body() {
        let (out, _) = edit(
            b"hello world\r\nline 2\r\n",
            true,
            &edits(None, None),
            at(0),
        )
        .unwrap();
        let out = String::from_utf8(out).unwrap();
        assert!(out.starts_with("Date: "));
        assert!(out.ends_with(">\r\n\r\nhello world\r\nline 2\r\n"), "{out}");
        // Headers then a non-header line with no empty line: nothing is inserted there.
        let msg = format!("Subject: s\r\n{DATED}just text\r\n");
        assert_eq!(edited(&msg, &edits(None, None)), msg);
        // Only headers, no body.
        let msg = format!("Subject: s\r\n{DATED}");
        assert_eq!(edited(&msg, &edits(None, None)), msg);
        // Empty header block.
        let (out, _) = edit(b"\r\nbody\r\n", true, &edits(None, None), at(0)).unwrap();
        assert!(
            String::from_utf8(out)
                .unwrap()
                .ends_with(">\r\n\r\nbody\r\n")
        );
    }

    #[test]
    fn a_line_without_a_colon_does_not_end_the_header_block() {
        // The client's Date: and Message-ID: come after the broken line: nothing is added.
        let msg = "Subject: a\r\nbroken line\r\nDate: x\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n";
        assert_eq!(edited(msg, &edits(None, None)), msg);
        // Only Message-ID: is missing: it goes at the end of the block, after the Date:.
        let msg = "Subject: a\r\nbroken line\r\nDate: x\r\n\r\nbody\r\n";
        let out = edited(msg, &edits(None, None));
        assert_eq!(out.matches("Date:").count(), 1, "{out}");
        assert!(
            out.starts_with("Subject: a\r\nbroken line\r\nDate: x\r\nMessage-ID: <"),
            "{out}"
        );
        assert!(out.ends_with("@proxy.example>\r\n\r\nbody\r\n"), "{out}");
        // A line starting with a space after a broken line (mailparse refuses it) and a
        // From: after both: still one block, and the From: is the one rewritten.
        let msg = format!("X: 1\r\nbroken\r\n odd\r\nFrom: <a@lan>\r\n{DATED}\r\nFrom: body\r\n");
        assert_eq!(
            edited(&msg, &edits(Some("me@c"), None)),
            format!("X: 1\r\nbroken\r\n odd\r\nFrom: <me@c>\r\n{DATED}\r\nFrom: body\r\n")
        );
        // No empty line at all: the whole message is the block, as mailparse reads it.
        let msg = format!("Subject: s\r\nno colon\r\n{DATED}");
        assert_eq!(edited(&msg, &edits(None, None)), msg);
        // A broken line at the end of what is held in memory may go on: too large.
        assert_eq!(
            edit(b"Subject: s\r\nbroken", false, &edits(None, None), at(0)).unwrap_err(),
            HeaderError::TooLarge
        );
    }

    #[test]
    fn a_header_block_longer_than_the_head_is_refused() {
        let head = b"Subject: s\r\nX-Long: aaaaaaa";
        assert_eq!(
            edit(head, false, &edits(None, None), at(0)).unwrap_err(),
            HeaderError::TooLarge
        );
        let head = b"Subject: s\r\nX: 1\r\n";
        assert_eq!(
            edit(head, false, &edits(None, None), at(0)).unwrap_err(),
            HeaderError::TooLarge
        );
        // The body may run past the head: that is fine.
        let head = b"Subject: s\r\n\r\nbody bo";
        assert!(edit(head, false, &edits(None, None), at(0)).is_ok());
    }
}
