//! POP3 transcripts shared by the POP3 suites (tests/pop3.rs against Dovecot,
//! tests/pop3_servers.rs against the other IMAP servers of the matrix): the message corpus,
//! what RETR must send for a stored message, and a transcript splitter.

use std::io::{BufRead, BufReader, Read};
use std::path::Path;

/// Options of a `legacy-mail-proxy pop3` for an IMAP server of the harness on
/// 127.0.0.1:`port` with `--imap-tls` `mode`, verified with the harness CA under the name
/// `localhost`: locks in `lock_dir`, failed logins answered at once, logs on stderr
/// (never stdout).
pub fn pop3_proxy_args(port: u16, mode: &str, lock_dir: &Path) -> Vec<String> {
    let s = super::servers();
    let mut args: Vec<String> = [
        "--log",
        "stderr",
        "--log-level",
        "debug",
        "pop3",
        "--imap-host",
        s.tls_host,
        "--imap-tls",
        mode,
        "--auth-failure-delay",
        "0",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    args.extend([
        "--imap-port".into(),
        port.to_string(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--lock-dir".into(),
        lock_dir.display().to_string(),
    ]);
    args
}

/// Splits a POP3 transcript into its responses, reading multi-line bodies for the
/// commands that have them, and undoing dot-stuffing. Panics on a truncated body.
pub fn responses(out: &[u8], multiline: &[bool]) -> Vec<(String, Vec<u8>)> {
    let mut reader = BufReader::new(out);
    let mut result = Vec::new();
    for &is_multi in multiline {
        let mut status = Vec::new();
        reader.read_until(b'\n', &mut status).unwrap();
        assert!(
            status.ends_with(b"\r\n"),
            "status line not CRLF-terminated: {status:?}"
        );
        let status = String::from_utf8_lossy(&status).trim_end().to_string();
        let mut body = Vec::new();
        if is_multi && status.starts_with("+OK") {
            loop {
                let mut line = Vec::new();
                reader.read_until(b'\n', &mut line).unwrap();
                assert!(
                    line.ends_with(b"\r\n"),
                    "body truncated after {} bytes",
                    body.len()
                );
                if line == b".\r\n" {
                    break;
                }
                let line = if line.starts_with(b"..") {
                    &line[1..]
                } else {
                    &line[..]
                };
                body.extend_from_slice(line);
            }
        }
        result.push((status, body));
    }
    let mut rest = Vec::new();
    reader.read_to_end(&mut rest).unwrap();
    assert!(
        rest.is_empty(),
        "unexpected trailing output: {:?}",
        String::from_utf8_lossy(&rest)
    );
    result
}

/// What RETR must send for a message Dovecot holds: CRLF line endings, ending in CRLF.
pub fn normalized(raw: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(raw.len() + 2);
    let mut i = 0;
    while i < raw.len() {
        match raw[i] {
            b'\r' if raw.get(i + 1) == Some(&b'\n') => {
                out.extend_from_slice(b"\r\n");
                i += 1;
            }
            b'\r' | b'\n' => out.extend_from_slice(b"\r\n"),
            b => out.push(b),
        }
        i += 1;
    }
    if !out.is_empty() && !out.ends_with(b"\r\n") {
        out.extend_from_slice(b"\r\n");
    }
    out
}

/// The corpus the issue asks for, seeded byte-exact into Maildir.
pub fn corpus() -> Vec<Vec<u8>> {
    let mut attachment = Vec::new();
    attachment.extend_from_slice(
        b"From: sender@example.test\r\nSubject: attachment\r\nMIME-Version: 1.0\r\n\
          Content-Type: multipart/mixed; boundary=XX\r\n\r\n--XX\r\n\
          Content-Type: application/octet-stream\r\nContent-Transfer-Encoding: base64\r\n\r\n",
    );
    let mut state = 0x1234_5678_u32;
    let data: Vec<u8> = (0..3 * 1024 * 1024)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            state as u8
        })
        .collect();
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let encoded: Vec<u8> = data
        .chunks(3)
        .flat_map(|c| {
            let n = (u32::from(c[0]) << 16)
                | (u32::from(*c.get(1).unwrap_or(&0)) << 8)
                | u32::from(*c.get(2).unwrap_or(&0));
            (0..4).map(move |i| alphabet[(n >> (18 - 6 * i) & 63) as usize])
        })
        .collect();
    for line in encoded.chunks(76) {
        attachment.extend_from_slice(line);
        attachment.extend_from_slice(b"\r\n");
    }
    attachment.extend_from_slice(b"--XX--\r\n");
    let mut long_lines = b"Subject: long lines\r\n\r\n".to_vec();
    long_lines.extend(std::iter::repeat_n(b'x', 5000));
    long_lines.extend_from_slice(b"\r\n");
    long_lines.extend(std::iter::repeat_n(b'.', 1200));
    long_lines.extend_from_slice(b"\r\nend\r\n");
    vec![
        b"Subject: 8-bit body\r\nContent-Type: text/plain; charset=iso-8859-1\r\n\
          Content-Transfer-Encoding: 8bit\r\n\r\nGr\xfc\xdfe, \xe9t\xe9 \xff\x80\x7f\r\n"
            .to_vec(),
        "Subject: Grüße aus Köln 日本語\r\nFrom: Jürgen Müller <j@example.test>\r\n\r\nUTF-8 headers\r\n"
            .as_bytes()
            .to_vec(),
        b"Subject: dots\r\n\r\n.\r\n..\r\n.leading dot\r\n. space\r\nnot.a.dot\r\n.\r\nend\r\n"
            .to_vec(),
        b"Subject: bare LF\n\nline one\nline two\n.dot after LF\n".to_vec(),
        long_lines,
        attachment,
        b"Subject: empty body\r\n\r\n".to_vec(),
        b"Subject: no separator\r\nX-Header: and no body at all\r\n".to_vec(),
    ]
}

/// A 1.5 MB message of 40 000 numbered lines, for cutting the server's connection while
/// RETR streams it.
pub fn message_to_cut() -> Vec<u8> {
    b"Subject: big\r\n\r\n"
        .iter()
        .copied()
        .chain(
            (0..40_000)
                .flat_map(|i| format!("line {i:06} of a message that is cut\r\n").into_bytes()),
        )
        .collect()
}
