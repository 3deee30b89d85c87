//! The connection over byte transcripts, each replayed at several read sizes.

use super::*;
use std::cell::RefCell;
use std::rc::Rc;

/// The server's side given in advance, read in pieces of `chunk` bytes; what the client
/// writes is recorded.
pub(crate) struct Transcript {
    pub server: Vec<u8>,
    pub read: usize,
    pub chunk: usize,
    pub client: Rc<RefCell<Vec<u8>>>,
}

impl Transcript {
    pub fn new(server: &[u8], chunk: usize) -> (Transcript, Rc<RefCell<Vec<u8>>>) {
        let client = Rc::new(RefCell::new(Vec::new()));
        let transcript = Transcript {
            server: server.to_vec(),
            read: 0,
            chunk,
            client: Rc::clone(&client),
        };
        (transcript, client)
    }
}

impl Read for Transcript {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf.len().min(self.chunk).min(self.server.len() - self.read);
        buf[..n].copy_from_slice(&self.server[self.read..self.read + n]);
        self.read += n;
        Ok(n)
    }
}

impl Write for Transcript {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.client.borrow_mut().extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

const SIZES: [usize; 6] = [1, 2, 3, 5, 64, 4096];

#[test]
fn greeting_capability_and_login() {
    for chunk in SIZES {
        let server = b"* OK [CAPABILITY IMAP4rev1 SASL-IR] ready\r\n\
            * CAPABILITY IMAP4rev1 LOGINDISABLED \r\na1 OK done\r\n\
            a2 OK [CAPABILITY IMAP4rev1 MOVE] Logged in\r\n* BYE bye\r\na3 OK out\r\n";
        let (stream, written) = Transcript::new(server, chunk);
        let mut connection = Connection::new(stream);
        let greeting = connection.greeting().unwrap();
        assert_eq!(
            capability_code(&greeting).unwrap(),
            ["IMAP4rev1", "SASL-IR"]
        );
        let (names, _) = connection.capability().unwrap();
        assert!(has_capability(&names, "logindisabled"));
        let login = connection.login("al\"ice", "p\\w ü").unwrap();
        assert_eq!(login.kind, StatusKind::Ok);
        assert!(has_capability(&capability_code(&login).unwrap(), "MOVE"));
        assert_eq!(connection.logout().unwrap().kind, StatusKind::Ok);
        assert_eq!(
            String::from_utf8(written.take()).unwrap(),
            "a1 CAPABILITY\r\na2 LOGIN \"al\\\"ice\" \"p\\\\w ü\"\r\na3 LOGOUT\r\n"
        );
    }
}

#[test]
fn credentials_with_cr_lf_or_nul_are_never_sent() {
    let (stream, written) = Transcript::new(b"", 64);
    let mut connection = Connection::new(stream);
    for (user, password) in [("a\r\nb", "p"), ("a", "p\n"), ("a", "p\0")] {
        assert!(matches!(
            connection.login(user, password),
            Err(Error::Unsendable(_))
        ));
    }
    assert!(written.take().is_empty());
    assert_eq!(connection.pending(), 0);
}

#[test]
fn a_flight_goes_out_in_one_write_and_answers_are_read_in_order() {
    for chunk in SIZES {
        let server = b"* 3 EXISTS\r\na1 OK [READ-ONLY] examined\r\n* 1 EXPUNGE\r\na2 NO nope\r\n";
        let (stream, written) = Transcript::new(server, chunk);
        let mut connection = Connection::new(stream);
        let first = connection.send("EXAMINE INBOX");
        let second = connection.send("NOOP");
        assert!(written.borrow().is_empty(), "nothing before the flush");
        connection.flush().unwrap();
        assert_eq!(
            String::from_utf8(written.take()).unwrap(),
            "a1 EXAMINE INBOX\r\na2 NOOP\r\n"
        );
        let mut seen = Vec::new();
        let status = connection
            .read_to(&first, &mut KeepAll, |_, r| seen.push(r))
            .unwrap();
        assert!(status.has_code("READ-ONLY"));
        assert_eq!(seen.len(), 1);
        let status = connection
            .read_to(&second, &mut KeepAll, |_, _| {})
            .unwrap();
        assert_eq!(status.kind, StatusKind::No);
        assert_eq!(connection.pending(), 0);
    }
}

#[test]
fn answers_that_come_early_are_kept_for_their_own_read() {
    for chunk in SIZES {
        // A server running both FETCHes at once (Dovecot): the second's data and tagged
        // answer come first.
        let server = b"* 2 FETCH (UID 8 FLAGS ())\r\na2 OK second\r\n* 1 FETCH (UID 7 FLAGS ())\r\na1 OK first\r\n";
        let (stream, _) = Transcript::new(server, chunk);
        let mut connection = Connection::new(stream);
        let first = connection.send("UID FETCH 7 FLAGS");
        let second = connection.send("UID FETCH 8 FLAGS");
        let mut seen = 0;
        let status = connection
            .read_to(&first, &mut KeepAll, |_, _| seen += 1)
            .unwrap();
        assert_eq!((status.text.as_str(), seen), ("first", 2));
        assert!(connection.is_answered(&second));
        let status = connection
            .read_to(&second, &mut KeepAll, |_, _| {})
            .unwrap();
        assert_eq!(status.text, "second");
        assert_eq!(connection.pending(), 0);
        assert!(matches!(
            connection.read_to(&second, &mut KeepAll, |_, _| {}),
            Err(Error::Broken(_))
        ));
    }
}

#[test]
fn an_answer_to_another_tag_or_a_continuation_breaks_the_connection() {
    for server in [&b"zz OK what\r\n"[..], b"+ more\r\n"] {
        let (stream, _) = Transcript::new(server, 64);
        let mut connection = Connection::new(stream);
        assert!(matches!(connection.run("NOOP"), Err(Error::Broken(_))));
    }
    let (stream, _) = Transcript::new(b"* BYE going\r\n", 64);
    let mut connection = Connection::new(stream);
    assert!(matches!(connection.run("NOOP"), Err(Error::Closed)));
}

#[test]
fn authenticate_answers_each_continuation() {
    for chunk in SIZES {
        let server = b"+ \r\n+ eyJzIjoxfQ==\r\na1 NO [AUTHENTICATIONFAILED] no\r\n";
        let (stream, written) = Transcript::new(server, chunk);
        let mut connection = Connection::new(stream);
        let mut challenges = Vec::new();
        let status = connection
            .authenticate("XOAUTH2", |challenge| {
                challenges.push(challenge.to_vec());
                match challenge.is_empty() {
                    true => b"initial".to_vec(),
                    false => Vec::new(),
                }
            })
            .unwrap();
        assert!(status.has_code("AUTHENTICATIONFAILED"));
        assert_eq!(challenges, [b"".to_vec(), b"{\"s\":1}".to_vec()]);
        assert_eq!(
            String::from_utf8(written.take()).unwrap(),
            "a1 AUTHENTICATE XOAUTH2\r\naW5pdGlhbA==\r\n\r\n"
        );
    }
}

#[test]
fn discarding_reads_every_answer_in_flight_bodies_included() {
    let server = b"* 1 FETCH (UID 4 BODY[] {5}\r\nhello)\r\na1 OK\r\na2 OK\r\na3 OK bye\r\n";
    let (stream, _) = Transcript::new(server, 3);
    let mut connection = Connection::new(stream);
    connection.send("UID FETCH 4 BODY.PEEK[]");
    connection.send("NOOP");
    connection.discard_pending().unwrap();
    assert_eq!(connection.run("LOGOUT").unwrap().text, "bye");
}
