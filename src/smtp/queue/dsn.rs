//! The delivery-status notification sent when a queued message cannot be delivered:
//! RFC 3464 `multipart/report; report-type=delivery-status` (RFC 6522), with a text part
//! for people, the `message/delivery-status` part (one per-recipient block per failed
//! recipient, RFC 3464 §2.3), and the original header block as `text/rfc822-headers`.

use super::store::Envelope;
use crate::smtp::headers::{message_id, rfc5322_date};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// At most this much of the original message is read to find its header block.
pub const HEADERS_MAX: usize = 64 * 1024;

/// The DSN for `envelope.failed`, as CRLF lines ready for DATA. `head` is the start of the
/// original message (its header block is returned, not its body).
pub fn build(envelope: &Envelope, head: &[u8], hostname: &str, now: SystemTime) -> Vec<u8> {
    let boundary = format!("{}/{hostname}", envelope.id);
    let arrival = rfc5322_date(UNIX_EPOCH + Duration::from_secs(envelope.created));
    let date = rfc5322_date(now);
    let to = if envelope.from.is_empty() {
        "postmaster".to_string()
    } else {
        envelope.from.clone()
    };
    let mut out = String::new();
    let mut line = |s: &str| {
        out.push_str(s);
        out.push_str("\r\n");
    };
    line(&format!(
        "From: Mail Delivery System <MAILER-DAEMON@{hostname}>"
    ));
    line(&format!("To: <{to}>"));
    line("Subject: Undelivered Mail Returned to Sender");
    line(&format!("Date: {date}"));
    line(&format!("Message-ID: {}", message_id(now, hostname)));
    line("Auto-Submitted: auto-replied");
    line("MIME-Version: 1.0");
    line(&format!(
        "Content-Type: multipart/report; report-type=delivery-status; boundary=\"{boundary}\""
    ));
    line("");
    line("This is a MIME-encapsulated message.");
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/plain; charset=utf-8");
    line("Content-Transfer-Encoding: 8bit");
    line("");
    line(&format!(
        "This is the mail gateway at {hostname}. Your message (queue id {}) could not be",
        envelope.id
    ));
    line("delivered to the recipients below. The mail system's reasons follow.");
    line("");
    for failure in &envelope.failed {
        line(&format!(
            "<{}>: {}",
            failure.recipient,
            one_line(&failure.reply)
        ));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: message/delivery-status");
    line("");
    line(&format!("Reporting-MTA: dns; {hostname}"));
    line(&format!("X-Legacy-Mail-Proxy-Queue-ID: {}", envelope.id));
    line(&format!("Arrival-Date: {arrival}"));
    for failure in &envelope.failed {
        line("");
        line(&format!("Final-Recipient: rfc822; {}", failure.recipient));
        line("Action: failed");
        line(&format!("Status: {}", status_of(&failure.reply)));
        if failure.reply.starts_with(|c: char| c.is_ascii_digit()) {
            line(&format!(
                "Diagnostic-Code: smtp; {}",
                one_line(&failure.reply)
            ));
        } else {
            line(&format!(
                "Diagnostic-Code: X-Legacy-Mail-Proxy; {}",
                one_line(&failure.reply)
            ));
        }
        line(&format!("Last-Attempt-Date: {date}"));
    }
    line("");
    line(&format!("--{boundary}"));
    line("Content-Type: text/rfc822-headers");
    line("");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&header_block(head));
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The enhanced status of a backend reply (`550 5.1.1 …` → `5.1.1`); `5.0.0` when it
/// has none; `4.4.7` (RFC 3463: delivery time expired) for an expired lifetime.
fn status_of(reply: &str) -> String {
    let mut words = reply.split_whitespace();
    let code = words.next().unwrap_or("");
    if !code.starts_with(|c: char| c.is_ascii_digit()) {
        return "4.4.7".into();
    }
    match words.next() {
        Some(word) if crate::smtp::reply::Enhanced::parse(word).is_some() => word.to_string(),
        _ if code.starts_with('4') => "4.0.0".into(),
        _ => "5.0.0".into(),
    }
}

fn one_line(s: &str) -> String {
    s.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

/// The header block of `head` up to (not including) the blank line, ending in CRLF.
fn header_block(head: &[u8]) -> Vec<u8> {
    let end = memchr::memmem::find(head, b"\r\n\r\n")
        .map(|i| i + 2)
        .unwrap_or(head.len());
    let mut block = head[..end].to_vec();
    if !block.ends_with(b"\r\n") {
        // A cut header block (over HEADERS_MAX): its last line is dropped whole.
        let last = memchr::memrchr(b'\n', &block).map(|i| i + 1).unwrap_or(0);
        block.truncate(last);
    }
    block
}
