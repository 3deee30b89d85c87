//! The reader driven by byte transcripts, each replayed at read sizes 1, 2, 3, 5 and 64:
//! the response styles of Dovecot, Gmail and Microsoft 365, and the grammar's corners.

use super::*;
use std::io::{BufReader, Read};

/// Hands out at most `size` octets per read, as a slow network would.
struct Trickle<'a> {
    bytes: &'a [u8],
    size: usize,
}

impl Read for Trickle<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.size).min(self.bytes.len());
        buf[..n].copy_from_slice(&self.bytes[..n]);
        self.bytes = &self.bytes[n..];
        Ok(n)
    }
}

const SIZES: [usize; 5] = [1, 2, 3, 5, 64];

/// Takes the literals of `BODY[]` attributes and records how they arrived.
#[derive(Default)]
struct Bodies {
    offers: Vec<(u32, String, Option<u32>, u64)>,
    received: Vec<u8>,
    /// The largest piece handed over at once: bounded by the input's buffer.
    largest_piece: usize,
}

impl Literals for Bodies {
    fn offer(&mut self, number: u32, name: &str, before: &Fetch, length: u64) -> io::Result<bool> {
        self.offers
            .push((number, name.to_string(), before.uid(), length));
        Ok(name.starts_with("BODY[]"))
    }
    fn data(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.largest_piece = self.largest_piece.max(bytes.len());
        self.received.extend_from_slice(bytes);
        Ok(())
    }
}

/// Every response in `transcript`, at every read size (which must all agree), with the
/// bodies taken.
fn read_all(transcript: &[u8]) -> (Vec<Response>, Bodies) {
    let mut first: Option<(Vec<Response>, Bodies)> = None;
    for size in SIZES {
        let input = BufReader::with_capacity(
            16,
            Trickle {
                bytes: transcript,
                size,
            },
        );
        let mut reader = Reader::new(input);
        let mut bodies = Bodies::default();
        let mut responses = Vec::new();
        loop {
            match reader.next(&mut bodies) {
                Ok(response) => responses.push(response),
                Err(Error::Closed) => break,
                Err(e) => panic!("read size {size}: {e}"),
            }
        }
        assert!(bodies.largest_piece <= 16, "a body was buffered whole");
        match &first {
            None => first = Some((responses, bodies)),
            Some((r, b)) => {
                assert_eq!(r, &responses, "read size {size}");
                assert_eq!(b.received, bodies.received, "read size {size}");
            }
        }
    }
    first.unwrap()
}

fn only(transcript: &[u8]) -> Response {
    let (mut responses, _) = read_all(transcript);
    assert_eq!(responses.len(), 1, "{responses:?}");
    responses.remove(0)
}

fn first_error(transcript: &[u8]) -> Error {
    let mut reader = Reader::new(transcript);
    loop {
        if let Err(e) = reader.next(&mut KeepAll) {
            return e;
        }
    }
}

fn atom(s: &str) -> Value {
    Value::Atom(s.as_bytes().to_vec())
}

fn string(s: &str) -> Value {
    Value::String(s.as_bytes().to_vec())
}

fn fetch_of(response: &Response) -> (u32, &Fetch) {
    match response {
        Response::Message {
            number,
            data: MessageData::Fetch(fetch),
        } => (*number, fetch),
        other => panic!("not a FETCH: {other:?}"),
    }
}

#[test]
fn tagged_untagged_and_continuation() {
    let (responses, _) =
        read_all(b"* 3 EXISTS\r\n* 2 EXPUNGE\r\n* 1 RECENT\r\n+ go ahead\r\n+\r\na1 ok done\r\n");
    assert_eq!(
        responses,
        [
            Response::Message {
                number: 3,
                data: MessageData::Exists
            },
            Response::Message {
                number: 2,
                data: MessageData::Expunge
            },
            Response::Message {
                number: 1,
                data: MessageData::Recent
            },
            Response::Continuation("go ahead".into()),
            Response::Continuation("".into()),
            Response::Tagged {
                tag: "a1".into(),
                status: Status {
                    kind: StatusKind::Ok,
                    code: None,
                    text: "done".into()
                }
            },
        ]
    );
}

#[test]
fn response_codes_are_read_from_the_wire() {
    let status = |transcript: &[u8]| match only(transcript) {
        Response::Tagged { status, .. } | Response::Condition(status) => status,
        other => panic!("{other:?}"),
    };
    let no = status(b"a3 NO [TRYCREATE] Mailbox doesn't exist: Trash\r\n");
    assert_eq!(no.kind, StatusKind::No);
    assert!(no.has_code("TRYCREATE"));
    assert_eq!(no.text, "Mailbox doesn't exist: Trash");
    let flags = status(b"* OK [PERMANENTFLAGS (\\Seen \\*)] Limited\r\n");
    assert_eq!(
        flags.code,
        Some(Code {
            name: "PERMANENTFLAGS".into(),
            arguments: "(\\Seen \\*)".into()
        })
    );
    assert!(status(b"a1 no [unavailable] later\r\n").has_code("UNAVAILABLE"));
    // "OK" alone, and a bracket that closes nowhere, which is text.
    assert_eq!(status(b"a1 OK\r\n").text, "");
    let open = status(b"* BYE [not a code\r\n");
    assert_eq!(
        (open.kind, open.code, open.text.as_str()),
        (StatusKind::Bye, None, "[not a code")
    );
    assert_eq!(
        parse_resp_text("[SERVERBUG] Internal error"),
        (
            Some(Code {
                name: "SERVERBUG".into(),
                arguments: "".into()
            }),
            "Internal error".into()
        )
    );
    assert_eq!(parse_resp_text("no code"), (None, "no code".into()));
}

#[test]
fn a_brace_at_the_end_of_free_text_is_text_not_a_literal() {
    let (responses, bodies) = read_all(
        b"* OK [ALERT] Your quota {5}\r\n+ send {3}\r\n* 1 FETCH (UID 7 BODY[] {5}\r\nhello)\r\nL1 OK done {2}\r\n",
    );
    assert_eq!(responses.len(), 4);
    assert!(matches!(&responses[0], Response::Condition(s)
        if s.has_code("ALERT") && s.text == "Your quota {5}"));
    assert_eq!(responses[1], Response::Continuation("send {3}".into()));
    assert_eq!(bodies.received, b"hello");
}

#[test]
fn gmail_attributes_with_parentheses_inside_quoted_strings() {
    let response = only(
        b"* 12 FETCH (X-GM-THRID 1278455344230334865 X-GM-MSGID 1278455344230334865 \
          X-GM-LABELS (\"\\\\Important\" \"a (b)\" \"c) \\\"d\" Work) UID 31 RFC822.SIZE 4242 \
          FLAGS (\\Seen))\r\n",
    );
    let (number, fetch) = fetch_of(&response);
    assert_eq!(number, 12);
    assert_eq!(fetch.uid(), Some(31));
    assert_eq!(fetch.number("RFC822.SIZE"), Some(4242));
    assert_eq!(fetch.flags(), Some(vec![&b"\\Seen"[..]]));
    assert_eq!(
        fetch.get("X-GM-LABELS"),
        Some(&Value::List(vec![
            string("\\Important"),
            string("a (b)"),
            string("c) \"d"),
            atom("Work")
        ]))
    );
}

#[test]
fn microsoft_365_sends_the_body_before_the_uid() {
    let (responses, bodies) = read_all(
        b"* 4 FETCH (BODY[] {11}\r\nSubject: x\n UID 9 FLAGS (\\Seen))\r\nL1 OK FETCH completed.\r\n",
    );
    let (_, fetch) = fetch_of(&responses[0]);
    assert_eq!(bodies.offers, [(4, "BODY[]".into(), None, 11)]);
    assert_eq!(bodies.received, b"Subject: x\n");
    assert_eq!(fetch.get("BODY[]"), Some(&Value::Taken(11)));
    assert_eq!(fetch.uid(), Some(9));
}

#[test]
fn literals_anywhere_and_of_every_kind() {
    let (responses, bodies) = read_all(
        b"* 2 FETCH (UID 8 BODY[HEADER.FIELDS (SUBJECT)] {4}\r\nS: x X-ORIGIN (\"a\" {2+}\r\nbc NIL) BINARY[] ~{3}\r\n\x00\x01\x02 BODY[]<0> {0}\r\n)\r\n\
          * STATUS {5}\r\nIN)BX (MESSAGES 2 X-GUID b61665115027116b)\r\n",
    );
    let (_, fetch) = fetch_of(&responses[0]);
    assert_eq!(
        fetch.get("BODY[HEADER.FIELDS (SUBJECT)]"),
        Some(&string("S: x"))
    );
    assert_eq!(
        fetch.get("X-ORIGIN"),
        Some(&Value::List(vec![string("a"), string("bc"), atom("NIL")]))
    );
    assert_eq!(fetch.get("BINARY[]"), Some(&Value::String(vec![0, 1, 2])));
    assert_eq!(fetch.get("BODY[]<0>"), Some(&Value::Taken(0)));
    assert_eq!(bodies.received, b"");
    assert_eq!(
        responses[1],
        Response::Data {
            name: "STATUS".into(),
            values: vec![
                string("IN)BX"),
                Value::List(vec![
                    atom("MESSAGES"),
                    atom("2"),
                    atom("X-GUID"),
                    atom("b61665115027116b")
                ])
            ]
        }
    );
}

#[test]
fn long_literals_not_taken_are_skipped_not_kept() {
    let big = vec![b'x'; MAX_KEPT_LITERAL as usize + 1];
    let mut transcript = format!("* 1 FETCH (BODY[TEXT] {{{}}}\r\n", big.len()).into_bytes();
    transcript.extend_from_slice(&big);
    transcript.extend_from_slice(b" UID 3)\r\n");
    let mut reader = Reader::new(&transcript[..]);
    let response = reader.next(&mut KeepAll).unwrap();
    let (_, fetch) = fetch_of(&response);
    assert_eq!(
        fetch.get("BODY[TEXT]"),
        Some(&Value::Skipped(big.len() as u64))
    );
    assert_eq!(fetch.uid(), Some(3));
}

#[test]
fn unsolicited_responses_at_every_position_leave_the_answer_intact() {
    let unsolicited: &[&[u8]] = &[
        b"* 5 EXISTS\r\n",
        b"* 2 EXPUNGE\r\n",
        b"* 3 FETCH (FLAGS (\\Seen \\Answered))\r\n",
        b"* OK [ALERT] Mailbox is at 95% of quota {5}\r\n",
        b"* 3 FETCH (X-GM-LABELS (\"x (y\") MODSEQ (12))\r\n",
        b"* 1 RECENT\r\n",
    ];
    let answer: [&[u8]; 2] = [
        b"* 1 FETCH (UID 7 BODY[] {5}\r\nhello)\r\n",
        b"L1 OK done\r\n",
    ];
    for extra in unsolicited {
        for position in 0..=answer.len() {
            let mut transcript = Vec::new();
            for (i, part) in answer.iter().enumerate() {
                if i == position {
                    transcript.extend_from_slice(extra);
                }
                transcript.extend_from_slice(part);
            }
            if position == answer.len() {
                transcript.extend_from_slice(extra);
            }
            let (responses, bodies) = read_all(&transcript);
            assert_eq!(
                responses.len(),
                3,
                "{}",
                String::from_utf8_lossy(&transcript)
            );
            assert_eq!(bodies.received, b"hello");
        }
    }
}

#[test]
fn grammar_errors_are_errors_not_guesses() {
    for bad in [
        &b"* 1 FETCH (UID 5 BODY[] {5} trailing)\r\n"[..],
        b"* 1 FETCH (UID 5 X-GM-LABELS (\"open)\r\n",
        b"* 1 FETCH (UID 5 FLAGS (\\Seen)\r\n",
        b"* 1 FETCH (UID 5)trailing\r\n",
        b"* 1 FETCH UID 5\r\n",
        b"* 1 FETCH (BODY[] {x}\r\n",
        b"* 1 FETCH (BODY[] {99999999999999999999}\r\n",
        b"a1 BYE no\r\n",
        b"a1 MAYBE\r\n",
        b" OK\r\n",
        b"* 1 FETCH (\"name\" 1)\r\n",
        b"* 1 FETCH (UID 1 BODY[] {0}\n UID 1)\r\n",
        b"a1 OK done\n",
    ] {
        assert!(
            matches!(first_error(bad), Error::Syntax(_)),
            "{}",
            String::from_utf8_lossy(bad)
        );
    }
    let deep = format!("* LIST {}{}\r\n", "(".repeat(100), ")".repeat(100));
    assert!(matches!(first_error(deep.as_bytes()), Error::Syntax(_)));
    let long = vec![b'a'; MAX_LINE + 10];
    assert!(matches!(first_error(&long), Error::Syntax(_)));
}

#[test]
fn a_connection_cut_inside_a_literal_is_closed() {
    assert!(matches!(
        first_error(b"* 1 FETCH (UID 5 BODY[] {50}\r\nshort"),
        Error::Closed
    ));
    assert!(matches!(
        first_error(b"* 1 FETCH (UID 5 BODY[HEADER] {50}\r\nshort"),
        Error::Closed
    ));
    assert!(matches!(first_error(b"a1 OK no line end"), Error::Closed));
}

#[test]
fn a_handler_error_stops_the_read() {
    struct Failing;
    impl Literals for Failing {
        fn offer(&mut self, _: u32, _: &str, _: &Fetch, _: u64) -> io::Result<bool> {
            Ok(true)
        }
        fn data(&mut self, _: &[u8]) -> io::Result<()> {
            Err(io::Error::other("client gone"))
        }
    }
    let mut reader = Reader::new(&b"* 1 FETCH (BODY[] {5}\r\nhello)\r\n"[..]);
    assert!(matches!(reader.next(&mut Failing), Err(Error::Handler(_))));
}
