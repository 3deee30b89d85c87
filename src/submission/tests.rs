//! Transcript tests of the client: each scenario replayed with the server's bytes split
//! at several read sizes (1 byte: every split point of every reply).

use super::client::{Client, Command, Error, SendError};
use super::dot::tests::reference as stuffed;
use super::transcript::{FailingSpool, Transcript};
use crate::oauth2::sasl::Mechanism;
use std::io;

const READ_SIZES: [usize; 6] = [1, 2, 3, 5, 64, 100_000];

const GREETING: &str = "220 mx.test ESMTP\r\n";
const EHLO_FULL: &str = "250-mx.test\r\n250-PIPELINING\r\n250-SIZE 10240000\r\n\
    250-8BITMIME\r\n250-SMTPUTF8\r\n250-CHUNKING\r\n250-ENHANCEDSTATUSCODES\r\n\
    250 AUTH PLAIN LOGIN OAUTHBEARER\r\n";
const EHLO_BARE: &str = "250 mx.test\r\n";

fn client(flights: &[&str], read_size: usize) -> Client<Transcript> {
    let mut client = Client::new(Transcript::new(flights, read_size));
    assert_eq!(client.greeting().unwrap().code, 220);
    client
}

#[test]
fn one_ehlo_learns_every_extension() {
    for size in READ_SIZES {
        let mut c = client(&[GREETING, EHLO_FULL], size);
        let reply = c.hello("gw.test").unwrap();
        assert_eq!(reply.code, 250);
        let offered = c.extensions();
        assert!(offered.pipelining && offered.chunking && offered.eight_bit_mime);
        assert!(offered.smtputf8 && offered.enhanced_status_codes && !offered.starttls);
        assert_eq!(offered.size, Some(10_240_000));
        assert!(offered.offers_auth("OAUTHBEARER"));
        assert_eq!(
            c.stream().text(),
            "EHLO gw.test\r\n",
            "one EHLO, nothing more"
        );
        assert_eq!(c.stream().round_trips, 1);

        let mut c = client(&[GREETING, EHLO_BARE], size);
        c.hello("gw.test").unwrap();
        assert_eq!(*c.extensions(), super::Extensions::default());
    }
}

#[test]
fn a_refused_ehlo_falls_back_to_helo_without_extensions() {
    for size in READ_SIZES {
        let mut c = client(&[GREETING, "502 5.5.2 no\r\n", "250 mx.test\r\n"], size);
        assert_eq!(c.hello("gw.test").unwrap().code, 250);
        assert_eq!(c.stream().text(), "EHLO gw.test\r\nHELO gw.test\r\n");
        assert!(!c.extensions().pipelining);
    }
}

#[test]
fn pipelined_replies_are_read_in_order_whatever_the_split() {
    let replies = "250 2.1.0 Ok\r\n550-5.1.1 <x@d.test>: Recipient address rejected:\r\n\
        550 5.1.1 User unknown\r\n250 2.1.5 Ok\r\n";
    for size in READ_SIZES {
        let mut c = client(&[GREETING, EHLO_FULL, replies], size);
        c.hello("gw").unwrap();
        c.send(&[
            Command::Mail {
                from: "a@c.test",
                eight_bit: true,
            },
            Command::Rcpt("x@d.test"),
            Command::Rcpt("y@d.test"),
        ])
        .unwrap();
        let mail = c.read_reply().unwrap();
        let refused = c.read_reply().unwrap();
        let accepted = c.read_reply().unwrap();
        assert_eq!((mail.code, refused.code, accepted.code), (250, 550, 250));
        assert_eq!(refused.lines.len(), 2);
        assert_eq!(
            refused.enhanced.map(|e| e.to_string()),
            Some("5.1.1".into())
        );
        assert_eq!(
            accepted.enhanced.map(|e| e.to_string()),
            Some("2.1.5".into())
        );
        let t = c.stream();
        assert!(t.text().ends_with(
            "MAIL FROM:<a@c.test> BODY=8BITMIME\r\nRCPT TO:<x@d.test>\r\nRCPT TO:<y@d.test>\r\n"
        ));
        assert_eq!(t.round_trips, 2, "EHLO, then the whole group");
        assert_eq!(t.writes, 2, "the group is one write");
    }
}

#[test]
fn garbage_and_a_closed_connection_are_errors_not_replies() {
    for size in READ_SIZES {
        let mut c = client(&[GREETING, "hello there\r\n"], size);
        assert!(matches!(c.command(Command::Noop), Err(Error::Malformed(_))));
        let mut c = client(&[GREETING, "250-half a reply\r\n"], size);
        let result = c.command(Command::Noop);
        assert!(
            matches!(&result, Err(Error::Io(e)) if e.kind() == io::ErrorKind::UnexpectedEof),
            "{result:?}"
        );
    }
    let mut c = client(&[GREETING], 64);
    let result = c.command(Command::Rcpt("a@b\r\nRSET"));
    assert!(matches!(result, Err(Error::Unsendable(_))), "{result:?}");
    assert_eq!(c.stream().text(), "", "nothing smuggled onto the wire");
}

#[test]
fn an_overlong_reply_line_is_an_error_and_reading_moves_on() {
    // Found by the fuzzer: the error left the line buffered, so every later read failed
    // on it again without reading anything.
    let long = format!("250 {}\r\n250 next\r\n", "\r".repeat(20_000));
    for size in [7, 64, 100_000] {
        let mut c = client(&[GREETING, &long], size);
        c.send(&[Command::Noop]).unwrap();
        let mut errors = 0;
        let next = loop {
            match c.read_reply() {
                Err(Error::Malformed(_)) if errors < 10 => errors += 1,
                other => break other,
            }
        };
        assert!(errors >= 1, "{size}");
        assert_eq!(next.unwrap().lines, ["next"], "{size}");
    }
}

#[test]
fn starttls_refuses_bytes_buffered_past_its_reply() {
    let c = client(&[GREETING, "220 2.0.0 go\r\n"], 64);
    assert!(c.starttls().unwrap().is_ok());
    // A server (or a man in the middle) that answers commands not sent yet.
    let c = client(&[GREETING, "220 2.0.0 go\r\n250 injected\r\n"], 64);
    assert!(matches!(c.starttls(), Err(Error::Malformed(_))));
    let c = client(&[GREETING, "454 4.7.0 TLS not available\r\n"], 64);
    assert_eq!(c.starttls().unwrap().unwrap_err().code, 454);
}

#[test]
fn auth_plain_login_and_oauth2() {
    for size in READ_SIZES {
        let mut c = client(&[GREETING, EHLO_FULL, "235 2.7.0 ok\r\n"], size);
        c.hello("gw").unwrap();
        assert_eq!(c.login("u", "p w").unwrap().code, 235);
        assert!(c.stream().text().ends_with("AUTH PLAIN AHUAcCB3\r\n"));

        let ehlo_login = "250-mx\r\n250 AUTH LOGIN\r\n";
        let flights = [
            GREETING,
            ehlo_login,
            "334 VXNlcm5hbWU6\r\n",
            "334 UGFzc3dvcmQ6\r\n",
            "535 5.7.8 no\r\n",
        ];
        let mut c = client(&flights, size);
        c.hello("gw").unwrap();
        assert_eq!(c.login("u", "p").unwrap().code, 535);
        assert!(
            c.stream()
                .text()
                .ends_with("AUTH LOGIN\r\ndQ==\r\ncA==\r\n")
        );

        // Dovecot's error challenge, answered with %x01, then the final failure.
        let challenge = "eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIn0=";
        let flights = [
            GREETING,
            EHLO_FULL,
            &format!("334 {challenge}\r\n"),
            "535 5.7.8 no\r\n",
        ];
        let mut c = client(&flights, size);
        c.hello("gw").unwrap();
        let (reply, seen) = c.login_oauth2(Mechanism::OAuthBearer, b"n,,\x01").unwrap();
        assert_eq!(reply.code, 535);
        assert_eq!(seen.unwrap(), br#"{"status":"invalid_token"}"#);
        assert!(
            c.stream()
                .text()
                .ends_with("AUTH OAUTHBEARER biwsAQ==\r\nAQ==\r\n")
        );
    }
    // Without PLAIN or LOGIN nothing is sent.
    let mut c = client(&[GREETING, EHLO_BARE], 64);
    c.hello("gw").unwrap();
    assert!(matches!(c.login("u", "p"), Err(Error::Unsendable(_))));
}

#[test]
fn a_long_initial_response_answers_an_empty_334() {
    let long = vec![b'x'; 600];
    let flights = [GREETING, EHLO_FULL, "334 \r\n", "235 2.7.0 ok\r\n"];
    let mut c = client(&flights, 64);
    c.hello("gw").unwrap();
    let (reply, challenge) = c.login_oauth2(Mechanism::XOAuth2, &long).unwrap();
    assert_eq!((reply.code, challenge), (235, None));
    let text = c.stream().text();
    let encoded = crate::base64::encode(&long);
    assert!(
        text.ends_with(&format!("AUTH XOAUTH2\r\n{encoded}\r\n")),
        "{text}"
    );
}

/// A message whose lines start with dots at and around every 256 KiB piece boundary.
fn dotted_message() -> Vec<u8> {
    let piece = 256 * 1024;
    let mut message = Vec::new();
    while message.len() < 3 * piece + 100 {
        let to_boundary = piece - message.len() % piece;
        let line_len = match to_boundary {
            3..=40 => to_boundary - 2,
            _ => 37,
        };
        let mut line = vec![b'a'; line_len];
        line[0] = b'.';
        if line_len > 2 {
            line[1] = b'.';
        }
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
    }
    message.extend_from_slice(b".\r\n");
    message
}

#[test]
fn data_is_dot_stuffed_across_piece_boundaries_and_ends_with_one_dot() {
    let message = dotted_message();
    let flights = [GREETING, "354 go\r\n", "250 2.0.0 queued\r\n"];
    let mut c = client(&flights, 64);
    assert_eq!(c.command(Command::Data).unwrap().code, 354);
    c.send_data(&mut &message[..], message.len() as u64)
        .unwrap();
    assert_eq!(c.read_reply().unwrap().code, 250);
    let t = c.stream();
    assert_eq!(&t.written[b"DATA\r\n".len()..], stuffed(&message));
    assert!(
        t.writes <= 2 + message.len() / (256 * 1024),
        "large writes: {}",
        t.writes
    );
}

#[test]
fn bdat_sends_the_message_as_it_is() {
    let message = dotted_message();
    let mut c = client(&[GREETING, "250 2.0.0 queued\r\n"], 64);
    c.send_bdat_last(&[], &mut &message[..], message.len() as u64)
        .unwrap();
    assert_eq!(c.read_reply().unwrap().code, 250);
    let t = c.stream();
    let head = format!("BDAT {} LAST\r\n", message.len());
    assert_eq!(t.written, [head.as_bytes(), &message].concat());
    assert_eq!(t.round_trips, 1);
    // Empty messages are legal BDAT chunks too.
    let mut c = client(&[GREETING, "250 ok\r\n"], 64);
    c.send_bdat_last(&[], &mut &b""[..], 0).unwrap();
    assert_eq!(c.stream().text(), "BDAT 0 LAST\r\n");
}

#[test]
fn a_spool_that_fails_mid_message_cuts_the_connection_before_the_end() {
    for good in [0, 1, 256 * 1024 - 1, 256 * 1024, 300_000] {
        let len = 600_000;
        let mut c = client(&[GREETING, "354 go\r\n"], 64);
        c.command(Command::Data).unwrap();
        let result = c.send_data(&mut FailingSpool { good }, len);
        let Err(SendError::Source { sent, .. }) = result else {
            panic!("{result:?}");
        };
        assert!(sent <= good as u64);
        let t = c.stream();
        assert!(t.cut, "the socket is shut down");
        assert!(!t.written.ends_with(b".\r\n"), "no final dot");
        assert!(t.written.len() <= b"DATA\r\n".len() + good);

        let mut c = client(&[GREETING], 64);
        let result = c.send_bdat_last(&[], &mut FailingSpool { good }, len);
        assert!(
            matches!(result, Err(SendError::Source { .. })),
            "{result:?}"
        );
        let t = c.stream();
        assert!(t.cut);
        let head = format!("BDAT {len} LAST\r\n").len();
        assert!(
            t.written.len() < head + len as usize,
            "the server never has the announced bytes"
        );
    }
}

#[test]
fn a_server_dying_mid_data_or_mid_bdat_is_a_connection_error() {
    let message = vec![b'y'; 1_000_000];
    for dies_after in [3, 100, 300_000] {
        let mut c = client(&[GREETING, "354 go\r\n"], 64);
        c.command(Command::Data).unwrap();
        let result = {
            let limit = b"DATA\r\n".len() + dies_after;
            set_dies_after(&mut c, limit);
            c.send_data(&mut &message[..], message.len() as u64)
        };
        assert!(
            matches!(result, Err(SendError::Connection(Error::Io(_)))),
            "{result:?}"
        );
        assert!(c.read_reply().is_err(), "no reply from a dead server");

        let mut c = client(&[GREETING], 64);
        set_dies_after(&mut c, dies_after);
        let result = c.send_bdat_last(&[], &mut &message[..], message.len() as u64);
        assert!(
            matches!(result, Err(SendError::Connection(Error::Io(_)))),
            "{result:?}"
        );
    }
}

fn set_dies_after(c: &mut Client<Transcript>, limit: usize) {
    c.stream_mut().dies_after = Some(limit);
}

#[test]
fn command_lines_are_exact() {
    assert_eq!(
        Command::Mail {
            from: "",
            eight_bit: false
        }
        .to_string(),
        "MAIL FROM:<>\r\n"
    );
    assert_eq!(Command::Rcpt("x@y").to_string(), "RCPT TO:<x@y>\r\n");
    assert_eq!(Command::Ehlo("gw").to_string(), "EHLO gw\r\n");
    for command in [Command::Rset, Command::Noop, Command::Quit, Command::Data] {
        let line = command.to_string();
        assert!(line.ends_with("\r\n") && line.len() == 6, "{line}");
    }
}
