//! Transcript tests of the read-ahead: the POP3 core over the real IMAP maildrop, whose
//! connection is an in-memory IMAP server answering each command as it is written. Every
//! session runs with read-ahead off (the reference) and on, against a server that answers
//! pipelined commands one after the other and one that runs them at once (untagged data of
//! later commands first, tagged answers in reverse order, as Dovecot may), at several read
//! sizes; the client must see the same bytes every time.
//!
//! The server counts round trips per POP3 command: a read that waits for the answer to a
//! flight of commands written during that same POP3 command.

use super::*;
use crate::pop3::NulBytes;
use crate::pop3::session::{Config, End, Session, Summary};
use std::collections::BTreeMap;
use std::io::BufRead;
use std::time::Duration;

#[derive(Default)]
struct Server {
    /// (UID, message), in mailbox order.
    messages: Vec<(u32, Vec<u8>)>,
    /// UIDs expunged by another client right after the listing.
    gone_after_listing: Vec<u32>,
    /// At this POP3 command, this UID is expunged, and the next answer says so.
    expunge_at: Option<(u32, u32)>,
    /// The body of this UID is sent as that of another.
    wrong_uid: Option<(u32, u32)>,
    parallel: bool,
    listed: bool,
    /// The POP3 command being served (1 is the first line the client sends).
    phase: u32,
    /// Flights written: the POP3 command each was written in.
    flights: Vec<u32>,
    /// Answers not yet read: bytes and the flight they answer.
    output: VecDeque<(Vec<u8>, usize)>,
    input: Vec<u8>,
    /// Each command with the POP3 command it was written in.
    commands: Vec<(u32, String)>,
    /// Round trips waited for, per POP3 command.
    waits: BTreeMap<u32, std::collections::BTreeSet<usize>>,
    read_size: usize,
}

impl Server {
    fn new(sizes: &[usize]) -> Server {
        let messages = sizes
            .iter()
            .enumerate()
            .map(|(i, &size)| (10 + i as u32 * 3, message(i, size)))
            .collect();
        Server {
            messages,
            read_size: 4096,
            ..Server::default()
        }
    }

    fn position(&self, uid: u32) -> Option<usize> {
        self.messages.iter().position(|(u, _)| *u == uid)
    }

    /// The answer to one command: its untagged part and its tagged line.
    fn answer(&mut self, line: &str) -> (Vec<u8>, Vec<u8>) {
        let (tag, command) = line.split_once(' ').unwrap();
        let mut untagged = Vec::new();
        if let Some((phase, uid)) = self.expunge_at
            && self.phase >= phase
            && let Some(at) = self.position(uid)
        {
            self.messages.remove(at);
            untagged.extend_from_slice(format!("* {} EXPUNGE\r\n", at + 1).as_bytes());
        }
        let upper = command.to_ascii_uppercase();
        let ok = format!("{tag} OK done\r\n").into_bytes();
        if upper.starts_with("EXAMINE") || upper.starts_with("SELECT") {
            let exists = self.messages.len();
            untagged.extend_from_slice(
                format!(
                    "* {exists} EXISTS\r\n* OK [UIDVALIDITY 7] v\r\n* OK [PERMANENTFLAGS (\\Deleted \\*)] f\r\n"
                )
                .as_bytes(),
            );
        } else if upper.starts_with("UID FETCH 1:*") {
            for (i, (uid, body)) in self.messages.iter().enumerate() {
                untagged.extend_from_slice(
                    format!(
                        "* {} FETCH (UID {uid} RFC822.SIZE {} FLAGS ())\r\n",
                        i + 1,
                        body.len()
                    )
                    .as_bytes(),
                );
            }
            self.listed = true;
            for uid in std::mem::take(&mut self.gone_after_listing) {
                let at = self.position(uid).unwrap();
                self.messages.remove(at);
            }
        } else if let Some(rest) = upper.strip_prefix("UID FETCH ") {
            assert!(rest.contains("BODY.PEEK[]"), "not a PEEK: {line}");
            let uid: u32 = rest.split(' ').next().unwrap().parse().unwrap();
            if let Some(at) = self.position(uid) {
                let body = &self.messages[at].1;
                let (origin, part) = match rest.split_once("]<") {
                    None => (String::new(), &body[..]),
                    Some((_, range)) => {
                        let (offset, length) =
                            range.trim_end_matches(">)").split_once('.').unwrap();
                        let (offset, length): (usize, usize) =
                            (offset.parse().unwrap(), length.parse().unwrap());
                        let start = offset.min(body.len());
                        (
                            format!("<{offset}>"),
                            &body[start..(start + length).min(body.len())],
                        )
                    }
                };
                let said = match self.wrong_uid {
                    Some((asked, sent)) if asked == uid => sent,
                    _ => uid,
                };
                untagged.extend_from_slice(
                    format!(
                        "* {} FETCH (UID {said} BODY[]{origin} {{{}}}\r\n",
                        at + 1,
                        part.len()
                    )
                    .as_bytes(),
                );
                untagged.extend_from_slice(part);
                untagged.extend_from_slice(b")\r\n");
            }
        } else if upper.starts_with("LOGOUT") {
            untagged.extend_from_slice(b"* BYE bye\r\n");
        } else if upper.starts_with("STATUS") {
            return (untagged, format!("{tag} BAD no X-GUID\r\n").into_bytes());
        }
        (untagged, ok)
    }
}

/// Message `i` of `size` octets, CRLF lines, its number in every line.
fn message(i: usize, size: usize) -> Vec<u8> {
    let mut text = format!("Subject: message {i}\r\n\r\n").into_bytes();
    let line = format!("line of message {i} .\r\n");
    while text.len() < size {
        text.extend_from_slice(line.as_bytes());
    }
    text.truncate(size.max(20));
    if !text.ends_with(b"\r\n") {
        let n = text.len();
        text[n - 2..].copy_from_slice(b"\r\n");
    }
    text
}

#[derive(Clone)]
struct Wire(Rc<RefCell<Server>>);

impl Write for Wire {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let mut server = self.0.borrow_mut();
        server.input.extend_from_slice(buf);
        let phase = server.phase;
        server.flights.push(phase);
        let flight = server.flights.len() - 1;
        let mut answers = Vec::new();
        while let Some(end) = server.input.windows(2).position(|w| w == b"\r\n") {
            let line: Vec<u8> = server.input.drain(..end + 2).collect();
            let line = String::from_utf8(line[..end].to_vec()).unwrap();
            let command = line.split_once(' ').unwrap().1.to_string();
            server.commands.push((phase, command));
            answers.push(server.answer(&line));
        }
        let parallel = server.parallel;
        let mut out = Vec::new();
        match parallel {
            false => answers.iter().for_each(|(u, t)| {
                out.extend_from_slice(u);
                out.extend_from_slice(t);
            }),
            true => {
                answers.iter().for_each(|(u, _)| out.extend_from_slice(u));
                answers
                    .iter()
                    .rev()
                    .for_each(|(_, t)| out.extend_from_slice(t));
            }
        }
        if !out.is_empty() {
            server.output.push_back((out, flight));
        }
        Ok(buf.len())
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Read for Wire {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let mut server = self.0.borrow_mut();
        let phase = server.phase;
        let read_size = server.read_size;
        let Some((bytes, flight)) = server.output.front_mut() else {
            return Ok(0);
        };
        let flight = *flight;
        let n = buf.len().min(read_size).min(bytes.len());
        buf[..n].copy_from_slice(&bytes[..n]);
        bytes.drain(..n);
        if bytes.is_empty() {
            server.output.pop_front();
        }
        if server.flights[flight] == phase {
            server.waits.entry(phase).or_default().insert(flight);
        }
        Ok(n)
    }
}

/// The client's lines, handed out one at a time; each new line is the next POP3 command
/// for the server's count.
struct Client {
    lines: VecDeque<Vec<u8>>,
    server: Rc<RefCell<Server>>,
    started: bool,
}

impl Read for Client {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for Client {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        if !self.started && !self.lines.is_empty() {
            self.started = true;
            self.server.borrow_mut().phase += 1;
        }
        Ok(self.lines.front().map_or(&[][..], |l| &l[..]))
    }
    fn consume(&mut self, n: usize) {
        if let Some(line) = self.lines.front_mut() {
            line.drain(..n);
            if line.is_empty() {
                self.lines.pop_front();
                self.started = false;
            }
        }
    }
}

struct FakeOpener {
    server: Rc<RefCell<Server>>,
    window: u64,
}

impl Opener for FakeOpener {
    fn open(&mut self, credentials: &Credentials) -> Result<Box<dyn Maildrop>, OpenError> {
        let mut connection = Connection::new(Wire(Rc::clone(&self.server)));
        let status = connection
            .login(credentials.user, credentials.password)
            .map_err(|e| OpenError::Temporary(e.to_string()))?;
        let settings = Settings {
            login: Login::Passthrough,
            mailbox: "INBOX".into(),
            policy: DeletePolicy::Hide,
            deleted_keyword: "$POP3Deleted".into(),
            trash_mailbox: "Trash".into(),
            mark_seen: false,
            lock_dir: None,
            lock_user_domain: lock::UserDomain::Keep,
            prefetch_window: self.window,
        };
        let maildrop = ImapMaildrop::open(connection, Some(status), settings, None, None)?;
        Ok(Box::new(maildrop))
    }
}

/// What one session did.
struct Run {
    out: String,
    summary: Summary,
    server: Server,
}

impl Run {
    /// Round trips waited for during the POP3 command on line `line` (1 is USER).
    fn waits(&self, line: u32) -> usize {
        self.server.waits.get(&line).map_or(0, |w| w.len())
    }

    fn commands(&self) -> Vec<&str> {
        self.server
            .commands
            .iter()
            .map(|(_, c)| c.as_str())
            .collect()
    }
}

fn session(make: &dyn Fn() -> Server, window: u64, commands: &[&str]) -> Run {
    let server = Rc::new(RefCell::new(make()));
    let mut lines: VecDeque<Vec<u8>> = ["USER alice", "PASS secret"]
        .iter()
        .chain(commands)
        .map(|c| format!("{c}\r\n").into_bytes())
        .collect();
    if commands.last() == Some(&"(leave)") {
        lines.pop_back();
    }
    let client = Client {
        lines,
        server: Rc::clone(&server),
        started: false,
    };
    let mut opener = FakeOpener {
        server: Rc::clone(&server),
        window,
    };
    let config = Config {
        auth_failure_delay: Duration::ZERO,
        nul_bytes: NulBytes::Keep,
        ..Config::default()
    };
    let mut out = Vec::new();
    let summary = Session::new(client, &mut out, &mut opener, config).run();
    drop(opener);
    let server = Rc::try_unwrap(server).ok().unwrap().into_inner();
    Run {
        out: String::from_utf8_lossy(&out).into_owned(),
        summary,
        server,
    }
}

/// Runs `commands` with read-ahead off, then with each window in `windows` against both
/// server styles at several read sizes: the client sees the same bytes every time. Returns
/// the runs with read-ahead on (sequential server, whole reads) per window, and the
/// reference.
fn same_with_and_without(
    make: &dyn Fn() -> Server,
    windows: &[u64],
    commands: &[&str],
) -> (Run, Vec<Run>) {
    same_at(make, windows, commands, &[4096, 7, 1])
}

fn same_at(
    make: &dyn Fn() -> Server,
    windows: &[u64],
    commands: &[&str],
    read_sizes: &[usize],
) -> (Run, Vec<Run>) {
    let reference = session(make, 0, commands);
    let mut first = Vec::new();
    for &window in windows {
        for parallel in [false, true] {
            for &read_size in read_sizes {
                let make_styled = || Server {
                    parallel,
                    read_size,
                    ..make()
                };
                let run = session(&make_styled, window, commands);
                assert_eq!(
                    run.out, reference.out,
                    "window {window}, parallel {parallel}, read size {read_size}: {commands:?}"
                );
                assert_eq!(run.summary, reference.summary, "{commands:?}");
                if !parallel && read_size == read_sizes[0] {
                    first.push(run);
                }
            }
        }
    }
    (reference, first)
}

fn small() -> Server {
    Server::new(&[300, 500, 200, 700, 400, 250])
}

fn retr_all(count: usize) -> Vec<String> {
    (1..=count).map(|n| format!("RETR {n}")).collect()
}

#[test]
fn a_sequential_download_waits_for_the_server_only_at_the_first_message() {
    let mut commands = retr_all(6);
    commands.push("QUIT".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (reference, runs) = same_with_and_without(&small, &[4 << 20, 1000], &commands);
    assert!(reference.out.contains("line of message 5"));
    assert_eq!(reference.summary.end, End::Quit);
    // PASS: LOGIN, then SELECT and the listing in one flight.
    assert_eq!((reference.waits(2), runs[0].waits(2)), (2, 2));
    for line in 4..=8 {
        // RETR 2..6: one round trip each without read-ahead, none with it.
        assert_eq!(reference.waits(line), 1, "line {line}");
        assert_eq!(runs[0].waits(line), 0, "line {line}");
    }
    // A 1000-byte window still saves most of them (the 700-byte message alone fills it).
    let saved = (4..=8).filter(|&l| runs[1].waits(l) == 0).count();
    assert!(saved >= 3, "{saved}");
}

#[test]
fn a_top_sweep_reads_heads_ahead() {
    let mut commands: Vec<String> = (1..=6).map(|n| format!("TOP {n} 0")).collect();
    commands.extend(retr_all(2));
    commands.push("QUIT".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let make = || Server::new(&[300, 40_000, 200, 70_000, 400, 250]);
    let (_, runs) = same_with_and_without(&make, &[4 << 20], &commands);
    let run = &runs[0];
    for line in 4..=8 {
        assert_eq!(run.waits(line), 0, "TOP at line {line}");
    }
    // Heads only: a partial fetch of the first 16 kB, never the whole of a large message.
    let ahead: Vec<&str> = run
        .server
        .commands
        .iter()
        .filter(|(phase, c)| *phase == 3 && c.contains("BODY.PEEK"))
        .map(|(_, c)| c.as_str())
        .collect();
    assert!(ahead.len() >= 5, "{ahead:?}");
    assert!(ahead.iter().all(|c| c.ends_with("<0.16384>)")), "{ahead:?}");
}

#[test]
fn any_command_in_between_is_answered_at_once_and_correctly_in_every_order() {
    let between = ["TOP 3 0", "DELE 2", "LIST", "RSET", "NOOP", "RETR 4"];
    let mut orders = 0;
    permutations(&between, &mut |order| {
        let mut commands = vec!["RETR 1"];
        commands.extend(order);
        commands.extend(["RETR 2", "RETR 3", "QUIT"]);
        // A narrow window too, so that some messages are on the wire and others not.
        let (reference, runs) = same_at(&small, &[4 << 20, 900], &commands, &[4096, 5]);
        for run in runs.iter().chain([&reference]) {
            // Every fetch is a PEEK (the server checks), and \Seen is never set.
            assert!(
                run.commands().iter().all(|c| !c.contains("Seen")),
                "{:?}",
                run.commands()
            );
        }
        orders += 1;
    });
    assert_eq!(orders, 720);
}

#[test]
fn a_top_of_a_message_read_ahead_whole_keeps_it_for_the_retr() {
    let commands = ["RETR 1", "TOP 3 0", "RETR 2", "RETR 3", "QUIT"];
    let (_, runs) = same_with_and_without(&small, &[4 << 20], &commands);
    for uid in [13, 16] {
        let fetches = runs[0]
            .commands()
            .iter()
            .filter(|c| c.starts_with(&format!("UID FETCH {uid} ")))
            .count();
        assert_eq!(fetches, 1, "{:?}", runs[0].commands());
    }
    assert!((4..=6).all(|line| runs[0].waits(line) == 0));
}

/// Calls `each` with every order of `items`.
fn permutations<'a>(items: &[&'a str], each: &mut dyn FnMut(Vec<&'a str>)) {
    fn walk<'a>(
        rest: &mut Vec<&'a str>,
        done: &mut Vec<&'a str>,
        each: &mut dyn FnMut(Vec<&'a str>),
    ) {
        if rest.is_empty() {
            each(done.clone());
            return;
        }
        for i in 0..rest.len() {
            let item = rest.remove(i);
            done.push(item);
            walk(rest, done, each);
            done.pop();
            rest.insert(i, item);
        }
    }
    walk(&mut items.to_vec(), &mut Vec::new(), each);
}

#[test]
fn a_client_that_leaves_mid_read_ahead_deletes_nothing_and_the_session_ends_cleanly() {
    let commands = ["RETR 1", "DELE 1", "DELE 2", "(leave)"];
    let (reference, runs) = same_with_and_without(&small, &[4 << 20], &commands);
    for run in runs.iter().chain([&reference]) {
        assert_eq!(run.summary.end, End::ClientClosed);
        assert_eq!(run.summary.deleted, 0);
        let commands = run.commands();
        assert!(
            commands.iter().all(|c| !c.contains("STORE")),
            "{commands:?}"
        );
    }
    // Without read-ahead LOGOUT is answered; with read-ahead in flight the connection is
    // closed at once rather than first reading messages nobody asked for.
    assert_eq!(reference.commands().last(), Some(&"LOGOUT"));
    assert!(reference.server.output.is_empty());
    assert!(!runs[0].commands().contains(&"LOGOUT"));
}

#[test]
fn a_message_expunged_elsewhere_is_answered_err_and_nothing_of_it_is_sent() {
    // Gone before the server ran the read-ahead fetch: no body in the answer.
    let gone = || Server {
        gone_after_listing: vec![16],
        ..small()
    };
    let commands = ["RETR 1", "RETR 2", "RETR 3", "RETR 4", "QUIT"];
    let (reference, _) = same_with_and_without(&gone, &[4 << 20], &commands);
    assert!(
        reference
            .out
            .contains("-ERR Message was deleted by another client"),
        "{}",
        reference.out
    );
    assert!(!reference.out.contains("message 2 ."));
    assert!(reference.out.contains("message 3 ."));

    // Read ahead whole, then reported expunged (`* n EXPUNGE`) by the answer to a later
    // fetch that the client's RETR 6 needed, before it asks for message 3.
    let expunged = || Server {
        expunge_at: Some((5, 16)),
        ..small()
    };
    let commands = ["RETR 1", "RETR 2", "TOP 6 0", "RETR 3", "RETR 4", "QUIT"];
    let (reference, runs) = same_with_and_without(&expunged, &[1300], &commands);
    assert!(
        reference
            .out
            .contains("-ERR Message was deleted by another client")
    );
    assert!(!reference.out.contains("message 2 ."));
    // With read-ahead it had been fetched before it was expunged.
    let fetched_ahead = runs[0]
        .server
        .commands
        .iter()
        .any(|(phase, c)| *phase < 6 && c.starts_with("UID FETCH 16 "));
    assert!(fetched_ahead, "{:?}", runs[0].server.commands);
}

#[test]
fn a_body_under_another_uid_is_never_sent() {
    let lying = || Server {
        wrong_uid: Some((16, 99)),
        ..small()
    };
    let commands = ["RETR 1", "RETR 2", "RETR 3", "QUIT"];
    let reference = session(&lying, 0, &commands);
    assert!(
        reference.out.contains("-ERR [SYS/TEMP]"),
        "{}",
        reference.out
    );
    assert!(!reference.out.contains("message 2 ."));
    for window in [4 << 20, 900] {
        // A server that answers in order: the same answers.
        assert_eq!(session(&lying, window, &commands).out, reference.out);
        // One that runs the fetches at once: its lie comes while message 1 is sent, which
        // is then cut (no final "."), and the session ends. Either way no octet of the
        // mislabelled message reaches the client.
        let parallel = || Server {
            parallel: true,
            ..lying()
        };
        let run = session(&parallel, window, &commands);
        assert!(!run.out.contains("message 2 ."), "{}", run.out);
        assert!(matches!(run.summary.end, End::BackendFailed(_) | End::Quit));
    }
}

#[test]
fn the_window_bounds_what_is_fetched_ahead_and_a_larger_message_waits_to_be_asked_for() {
    let sizes = [100, 300, 300, 300, 5000, 100, 100, 300];
    let make = || Server::new(&sizes);
    let window = 700u64;
    let mut commands = retr_all(sizes.len());
    commands.push("QUIT".into());
    let commands: Vec<&str> = commands.iter().map(String::as_str).collect();
    let (_, runs) = same_with_and_without(&make, &[window], &commands);
    let run = &runs[0];
    let uid_of = |i: usize| 10 + i as u32 * 3;
    // Line 3 is RETR 1, so message i (0-based) is asked for at line i + 3.
    let asked_at = |i: usize| i as u32 + 3;
    let mut fetched_at = vec![None; sizes.len()];
    for (phase, command) in &run.server.commands {
        for (i, slot) in fetched_at.iter_mut().enumerate() {
            if command.starts_with(&format!("UID FETCH {} ", uid_of(i))) && slot.is_none() {
                *slot = Some(*phase);
            }
        }
    }
    for phase in 3..=asked_at(sizes.len() - 1) {
        // Fetched ahead and not yet asked for, at the end of this command.
        let outstanding: usize = (0..sizes.len())
            .filter(|&i| fetched_at[i].is_some_and(|f| f <= phase) && asked_at(i) > phase)
            .map(|i| sizes[i])
            .sum();
        assert!(outstanding as u64 <= window, "line {phase}: {outstanding}");
    }
    // The 5000-byte message is fetched only by its own RETR.
    assert_eq!(fetched_at[4], Some(asked_at(4)));
    assert!(fetched_at[1].is_some_and(|f| f < asked_at(1)));
}
