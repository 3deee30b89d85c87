//! STARTTLS exchanges done on the raw socket before a TLS handshake: POP3 `STLS`
//! (RFC 2595 §4), IMAP `STARTTLS` (RFC 3501 §6.2.1, RFC 9051 §6.2.1) and SMTP `EHLO` +
//! `STARTTLS` (RFC 3207 §4, RFC 5321 §4.1.1.1).
//!
//! Every server line is read a byte at a time, so nothing after the server's go-ahead is
//! consumed as plain text: bytes a man in the middle slips in after the go-ahead (the
//! command injection of CVE-2011-0411) stay in the socket, the TLS handshake reads them
//! and fails. None of the plain-text exchange reaches the client; each function returns
//! what the client should see instead, the server's greeting, as if it had connected to
//! an implicit-TLS port.

use crate::net::read_line_unbuffered;
use crate::smtp_wire::{Reply, ReplyBuilder};
use anyhow::{Context, bail, ensure};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

/// Longest server line accepted before TLS. Greetings and EHLO lines are far shorter
/// (RFC 5321 §4.5.3.1.5: 512 octets); Dovecot's IMAP greeting with capabilities is ~200.
const MAX_LINE: usize = 8192;

/// Most lines one reply may have before TLS (an EHLO reply has one per extension).
const MAX_LINES: usize = 100;

/// The tag of our one IMAP command. Any tag works; this one is easy to find in traces.
const IMAP_TAG: &[u8] = b"LMP1";

/// Which protocol's STARTTLS to speak.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Protocol {
    /// POP3 `STLS` (RFC 2595 §4), usually port 110.
    Pop3,
    /// IMAP `STARTTLS` (RFC 3501 §6.2.1), usually port 143.
    Imap,
    /// SMTP `EHLO` + `STARTTLS` (RFC 3207), usually port 587 or 25.
    Smtp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Pop3 => "pop3",
            Protocol::Imap => "imap",
            Protocol::Smtp => "smtp",
        })
    }
}

/// Runs the exchange and returns the bytes the client is to see first once TLS is up.
pub fn negotiate(protocol: Protocol, server: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    match protocol {
        Protocol::Pop3 => pop3(server),
        Protocol::Imap => imap(server),
        Protocol::Smtp => smtp(server),
    }
    .with_context(|| format!("{protocol} STARTTLS failed"))
}

/// POP3 sends no new greeting after STLS (RFC 2595 §4), so the client gets the original
/// one. Its APOP timestamp stays valid: it is the same server session.
fn pop3(server: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let greeting = read_line(server)?;
    ensure!(
        greeting.starts_with(b"+OK"),
        "greeting is not +OK: {}",
        show(&greeting)
    );
    send(server, b"STLS\r\n")?;
    let reply = read_line(server)?;
    ensure!(
        reply.starts_with(b"+OK"),
        "server refused STLS: {}",
        show(&reply)
    );
    Ok(greeting)
}

/// IMAP sends no new greeting after STARTTLS either. The client gets the original one
/// without its CAPABILITY code: that list is the plain-text one (it names STARTTLS and
/// often LOGINDISABLED), and RFC 3501 §6.2.1 says a client must forget it after TLS. Without
/// it the client asks CAPABILITY, and the answer comes over TLS.
fn imap(server: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let greeting = read_line(server)?;
    let upper = greeting.to_ascii_uppercase();
    // A PREAUTH greeting puts the session in the authenticated state, where STARTTLS is not
    // allowed: going on would mean going on without TLS (RFC 9051 §6.2.1).
    ensure!(
        !upper.starts_with(b"* PREAUTH"),
        "server greeted with PREAUTH, so it cannot start TLS: {}",
        show(&greeting)
    );
    ensure!(
        upper.starts_with(b"* OK"),
        "greeting is not OK: {}",
        show(&greeting)
    );
    let mut command = IMAP_TAG.to_vec();
    command.extend_from_slice(b" STARTTLS\r\n");
    send(server, &command)?;
    for _ in 0..MAX_LINES {
        let line = read_line(server)?;
        let Some(rest) = line
            .strip_prefix(IMAP_TAG)
            .and_then(|r| r.strip_prefix(b" "))
        else {
            // Untagged data before the tagged reply describes the plain-text session.
            continue;
        };
        ensure!(
            rest.len() >= 2 && rest[..2].eq_ignore_ascii_case(b"OK"),
            "server refused STARTTLS: {}",
            show(&line)
        );
        return Ok(strip_capability_code(&greeting));
    }
    bail!("no tagged reply to STARTTLS within {MAX_LINES} lines")
}

/// SMTP: the client gets the original 220 greeting, every line of it. The server forgets
/// the EHLO after STARTTLS (RFC 3207 §4.2), so the client's own EHLO, which it sends after
/// the greeting, goes through TLS and gets the real extension list, AUTH included.
fn smtp(server: &mut TcpStream) -> anyhow::Result<Vec<u8>> {
    let greeting = read_reply(server)?;
    ensure!(
        greeting.reply.code == 220,
        "greeting is not 220: {}",
        show(&greeting.raw)
    );
    let ehlo = format!("EHLO {}\r\n", address_literal(server.local_addr()?));
    send(server, ehlo.as_bytes())?;
    let extensions = read_reply(server)?;
    ensure!(
        extensions.reply.code == 250,
        "server refused EHLO: {}",
        show(&extensions.raw)
    );
    ensure!(
        extensions.has_keyword("STARTTLS"),
        "server does not offer STARTTLS: {}",
        show(&extensions.raw)
    );
    send(server, b"STARTTLS\r\n")?;
    let go = read_reply(server)?;
    ensure!(
        go.reply.code == 220,
        "server refused STARTTLS: {}",
        show(&go.raw)
    );
    Ok(greeting.raw)
}

/// One SMTP reply as read before TLS: the reply, and its lines exactly as received.
struct RawReply {
    reply: Reply,
    /// The lines exactly as received, CRLFs included: the greeting is replayed to the
    /// client byte for byte.
    raw: Vec<u8>,
}

impl RawReply {
    /// An EHLO keyword (RFC 5321 §4.1.1.1): the first word of a line's text.
    fn has_keyword(&self, keyword: &str) -> bool {
        self.reply.lines.iter().any(|text| {
            let word = text.split(' ').next().unwrap_or_default();
            word.eq_ignore_ascii_case(keyword)
        })
    }
}

/// Reads one reply a line at a time (never past its last line) through the one SMTP reply
/// reader, [`ReplyBuilder`], so a line is judged here as the submission client judges it.
fn read_reply(server: &mut impl Read) -> anyhow::Result<RawReply> {
    let mut builder = ReplyBuilder::default();
    let mut raw = Vec::new();
    for _ in 0..MAX_LINES {
        let line = read_line(server)?;
        raw.extend_from_slice(&line);
        let content = line.strip_suffix(b"\n").unwrap_or(&line);
        let content = content.strip_suffix(b"\r").unwrap_or(content);
        if let Some(reply) = builder.line(content).map_err(anyhow::Error::msg)? {
            return Ok(RawReply { reply, raw });
        }
    }
    bail!("reply longer than {MAX_LINES} lines")
}

/// Reads one SMTP reply as the STARTTLS exchange does: its code and its lines exactly as
/// received. For the fuzzer (tests/fuzz), which has no server.
pub fn read_smtp_reply(server: &mut impl Read) -> anyhow::Result<(u16, Vec<u8>)> {
    read_reply(server).map(|read| (read.reply.code, read.raw))
}

/// EHLO's argument: our own address as an address literal (RFC 5321 §4.1.3), which is
/// always valid, unlike the machine's host name, which often is not a full domain name.
fn address_literal(local: SocketAddr) -> String {
    match local {
        SocketAddr::V4(a) => format!("[{}]", a.ip()),
        SocketAddr::V6(a) => match a.ip().to_ipv4_mapped() {
            Some(v4) => format!("[{v4}]"),
            None => format!("[IPv6:{}]", a.ip()),
        },
    }
}

/// `* OK [CAPABILITY …] text` becomes `* OK text`; any other greeting is kept as it is.
pub fn strip_capability_code(greeting: &[u8]) -> Vec<u8> {
    const PREFIX: &[u8] = b"* OK [CAPABILITY ";
    let is_capability =
        greeting.len() > PREFIX.len() && greeting[..PREFIX.len()].eq_ignore_ascii_case(PREFIX);
    let Some(close) = greeting
        .iter()
        .position(|&b| b == b']')
        .filter(|_| is_capability)
    else {
        return greeting.to_vec();
    };
    let text = &greeting[close + 1..];
    let text = text.strip_prefix(b" ").unwrap_or(text);
    let mut stripped = b"* OK ".to_vec();
    if text.starts_with(b"\r") || text.starts_with(b"\n") || text.is_empty() {
        // RFC 3501 §7.1 requires text after the status; Dovecot always has some.
        stripped.extend_from_slice(b"ready\r\n");
    } else {
        stripped.extend_from_slice(text);
    }
    stripped
}

fn read_line(server: &mut impl Read) -> anyhow::Result<Vec<u8>> {
    read_line_unbuffered(server, MAX_LINE).context("reading from the server before TLS")
}

fn send(server: &mut TcpStream, bytes: &[u8]) -> anyhow::Result<()> {
    server
        .write_all(bytes)
        .context("writing to the server before TLS")
}

/// A server line for a log message: lossy UTF-8, line ends trimmed, bounded.
fn show(line: &[u8]) -> String {
    let text = String::from_utf8_lossy(line);
    let text = text.trim_end();
    match text.char_indices().nth(200) {
        Some((cut, _)) => format!("{:?}…", &text[..cut]),
        None => format!("{text:?}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read};
    use std::net::TcpListener;
    use std::thread::JoinHandle;
    use std::time::Duration;

    /// One turn of a scripted fake server: read a line and check it is `expect` (no read
    /// when `expect` is empty, as for the greeting), then write `answer`.
    type Step = (&'static [u8], &'static [u8]);

    /// Runs `script` on a local socket and returns the client's end. After the script the
    /// server writes `trailer` in the same burst as its last answer: bytes that arrive
    /// before the TLS handshake. The server thread returns what the client sent after the
    /// script.
    fn fake_server(script: Vec<Step>, trailer: &'static [u8]) -> (TcpStream, JoinHandle<Vec<u8>>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let server = std::thread::spawn(move || {
            let (socket, _) = listener.accept().unwrap();
            let mut reader = BufReader::new(socket.try_clone().unwrap());
            let mut writer = socket;
            let last = script.len() - 1;
            for (i, (expect, answer)) in script.into_iter().enumerate() {
                if !expect.is_empty() {
                    let mut line = Vec::new();
                    reader.read_until(b'\n', &mut line).unwrap();
                    assert_eq!(show(&line), show(expect));
                }
                let mut burst = answer.to_vec();
                if i == last {
                    burst.extend_from_slice(trailer);
                }
                writer.write_all(&burst).unwrap();
            }
            // Hold the socket open until the client is done.
            let mut after = Vec::new();
            let _ = reader.read_to_end(&mut after);
            after
        });
        let client = TcpStream::connect(addr).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(10)))
            .unwrap();
        (client, server)
    }

    /// Runs a successful exchange whose last answer is followed by `injected`, and checks
    /// that the client would see `greeting` and that `injected` is still unread in the
    /// socket: the exchange took nothing past the go-ahead as plain text.
    fn succeeds(protocol: Protocol, script: Vec<Step>, injected: &'static [u8], greeting: &[u8]) {
        let (mut client, server) = fake_server(script, injected);
        assert_eq!(
            show(&negotiate(protocol, &mut client).unwrap()),
            show(greeting)
        );
        let mut rest = vec![0; injected.len()];
        client.read_exact(&mut rest).unwrap();
        assert_eq!(rest, injected);
        drop(client);
        server.join().unwrap();
    }

    #[test]
    fn pop3_replays_the_greeting_and_leaves_later_bytes_for_tls() {
        succeeds(
            Protocol::Pop3,
            vec![
                (b"", b"+OK POP3 ready <1.2@example>\r\n"),
                (b"STLS\r\n", b"+OK Begin TLS negotiation now.\r\n"),
            ],
            b"+OK injected\r\n",
            b"+OK POP3 ready <1.2@example>\r\n",
        );
    }

    #[test]
    fn imap_skips_untagged_lines_and_strips_the_plain_text_capabilities() {
        succeeds(
            Protocol::Imap,
            vec![
                (
                    b"",
                    b"* OK [CAPABILITY IMAP4rev1 STARTTLS LOGINDISABLED] Dovecot ready.\r\n",
                ),
                (
                    b"LMP1 STARTTLS\r\n",
                    b"* CAPABILITY IMAP4rev1 STARTTLS\r\nLMP1 OK Begin TLS negotiation now.\r\n",
                ),
            ],
            b"* OK [CAPABILITY IMAP4rev1 AUTH=PLAIN] injected\r\n",
            b"* OK Dovecot ready.\r\n",
        );
    }

    #[test]
    fn smtp_replays_the_whole_greeting_and_hides_the_ehlo() {
        succeeds(
            Protocol::Smtp,
            vec![
                (b"", b"220-mail.example ESMTP\r\n220 second line\r\n"),
                (
                    b"EHLO [127.0.0.1]\r\n",
                    b"250-mail.example\r\n250-PIPELINING\r\n250-starttls\r\n250 8BITMIME\r\n",
                ),
                (b"STARTTLS\r\n", b"220 2.0.0 Ready to start TLS\r\n"),
            ],
            b"250 injected\r\n",
            b"220-mail.example ESMTP\r\n220 second line\r\n",
        );
    }

    #[test]
    fn refusals_and_garbage_are_errors_that_say_why() {
        let cases: Vec<(Protocol, Vec<Step>, &str)> = vec![
            (Protocol::Pop3, vec![(b"", b"-ERR busy\r\n")], "not +OK"),
            (
                Protocol::Pop3,
                vec![(b"", b"+OK ready\r\n"), (b"STLS\r\n", b"-ERR not here\r\n")],
                "refused STLS",
            ),
            (
                Protocol::Imap,
                vec![(b"", b"* PREAUTH welcome, no TLS for you\r\n")],
                "PREAUTH",
            ),
            (Protocol::Imap, vec![(b"", b"* BYE busy\r\n")], "not OK"),
            (
                Protocol::Imap,
                vec![
                    (b"", b"* OK ready\r\n"),
                    (b"LMP1 STARTTLS\r\n", b"LMP1 BAD unknown command\r\n"),
                ],
                "refused STARTTLS",
            ),
            (
                Protocol::Smtp,
                vec![
                    (b"", b"220 mail.example ESMTP\r\n"),
                    // STARTTLS as a parameter of another keyword is not the extension.
                    (
                        b"EHLO [127.0.0.1]\r\n",
                        b"250-mail.example\r\n250-X-NOT STARTTLS\r\n250 AUTH PLAIN\r\n",
                    ),
                ],
                "does not offer STARTTLS",
            ),
            (
                Protocol::Smtp,
                vec![
                    (b"", b"220 mail.example ESMTP\r\n"),
                    (
                        b"EHLO [127.0.0.1]\r\n",
                        b"250-mail.example\r\n250 STARTTLS\r\n",
                    ),
                    (b"STARTTLS\r\n", b"454 4.7.0 TLS not available\r\n"),
                ],
                "refused STARTTLS",
            ),
            (
                Protocol::Smtp,
                vec![(b"", b"554 no service\r\n")],
                "not 220",
            ),
            (
                Protocol::Smtp,
                vec![(b"", b"hello\r\n")],
                "not an SMTP reply",
            ),
            (Protocol::Smtp, vec![(b"", b"22\r\n")], "not an SMTP reply"),
            (
                Protocol::Smtp,
                vec![(b"", b"220-first\r\n250 second\r\n")],
                "changes its code",
            ),
        ];
        for (protocol, script, why) in cases {
            let (mut client, server) = fake_server(script, b"");
            let error = format!("{:#}", negotiate(protocol, &mut client).unwrap_err());
            assert!(error.contains(why), "{protocol}: {error:?} lacks {why:?}");
            drop(client);
            // After a refusal the client says nothing more to that server.
            assert_eq!(
                show(&server.join().unwrap()),
                show(b""),
                "{protocol}: {why}"
            );
        }
    }

    /// STARTTLS and the submission client read replies with the one reader, so a server's
    /// reply is accepted or refused alike by both, with the same code and text.
    #[test]
    fn starttls_reads_replies_as_the_submission_client_does() {
        use crate::submission::Client;
        use crate::submission::transcript::Transcript;
        for input in [
            "220 mail.example ESMTP\r\n",
            "220-mail.example\r\n220 2.0.0 ready\r\n",
            "220\r\n",
            "220 x\n",
            "150 not a completion code\r\n",
            "000 zero\r\n",
            "999 too high\r\n",
            "220-first\r\n250 second\r\n",
            "220x\r\n",
            "22\r\n",
            "hello\r\n",
        ] {
            let starttls = read_smtp_reply(&mut input.as_bytes()).map(|(code, _)| code);
            let mut client = Client::new(Transcript::new(&[input], 64));
            let submission = client.read_reply().map(|reply| reply.code);
            assert_eq!(
                starttls.as_ref().ok(),
                submission.as_ref().ok(),
                "{input:?}: {starttls:?} / {submission:?}"
            );
        }
    }

    #[test]
    fn capability_code_is_stripped_only_from_capability_greetings() {
        assert_eq!(
            strip_capability_code(b"* OK [CAPABILITY IMAP4rev1 STARTTLS] Dovecot ready.\r\n"),
            b"* OK Dovecot ready.\r\n"
        );
        assert_eq!(
            strip_capability_code(b"* ok [capability IMAP4rev1]\r\n"),
            b"* OK ready\r\n"
        );
        for kept in [
            &b"* OK Dovecot ready.\r\n"[..],
            b"* OK [ALERT] maintenance tonight\r\n",
            b"* OK [CAPABILITY-ISH x] y\r\n",
        ] {
            assert_eq!(strip_capability_code(kept), kept);
        }
    }

    #[test]
    fn ehlo_argument_is_an_address_literal() {
        assert_eq!(
            address_literal("127.0.0.1:5".parse().unwrap()),
            "[127.0.0.1]"
        );
        assert_eq!(address_literal("[::1]:5".parse().unwrap()), "[IPv6:::1]");
        assert_eq!(
            address_literal("[::ffff:192.0.2.1]:5".parse().unwrap()),
            "[192.0.2.1]"
        );
    }
}
