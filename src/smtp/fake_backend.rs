//! A scripted SMTP submission server for tests: plain TCP on 127.0.0.1, one thread per
//! connection, behaving like Postfix where it matters here (a DATA refusal leaves the
//! transaction open, so MAIL then gets `503 5.5.1 Error: nested MAIL command`; an idle
//! client is dropped with `421` after a time limit, like `smtpd_timeout`), and able to
//! misbehave on cue: odd replies, slow replies, only AUTH LOGIN (like Exchange).
//!
//! Shared by the unit tests in `backend.rs` and by `tests/smtp.rs`, which includes this
//! file with `#[path]`; so it uses nothing but `std`.
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

/// How the server behaves. `Script::default()` is a well-behaved server without AUTH.
/// The lists of replies are used up across all connections.
#[derive(Debug, Clone, Default)]
pub struct Script {
    /// EHLO keywords after the greeting line, such as `AUTH LOGIN`.
    pub extensions: Vec<String>,
    /// The one account AUTH LOGIN accepts: (user, password), each base64-encoded as on the
    /// wire.
    pub account: Option<(String, String)>,
    /// Replies to the successive MAIL commands; then `250 2.1.0 Ok`.
    pub mail: Vec<String>,
    /// Replies to RCPT for particular addresses (default `250 2.1.5 Ok`).
    pub rcpt: Vec<(String, String)>,
    /// Replies to the session's successive DATA commands; then `354`.
    pub data: Vec<String>,
    /// Replies to the successive final dots; then `250 2.0.0 Ok: queued as F<n>`.
    pub end_of_data: Vec<String>,
    /// Pause before answering each final dot.
    pub end_of_data_delay: Duration,
    /// Like Postfix's smtpd_timeout: a client silent this long gets `421` and is dropped.
    pub idle_limit: Option<Duration>,
    /// Pause before answering QUIT.
    pub quit_delay: Duration,
    /// Bearer tokens AUTH XOAUTH2 / OAUTHBEARER accept (when offered in `extensions`);
    /// any other gets Dovecot's error challenge, then `535`.
    pub bearer_tokens: Vec<String>,
    /// Close the connection after a refused token (some servers do).
    pub close_after_refused_token: bool,
    /// Answer every XOAUTH2 / OAUTHBEARER with `454 4.7.0` (the server cannot check
    /// tokens now).
    pub bearer_unavailable: bool,
}

/// What the server saw, over all connections.
#[derive(Debug, Clone, Default)]
pub struct Journal {
    /// Command lines in order, without CRLF; AUTH credentials are left out, and events
    /// appear as `*CONNECT`, `*TIMEOUT` and `*EOF IN DATA`.
    pub commands: Vec<String>,
    /// Messages completed by a final dot (unstuffed, with their last CRLF).
    pub messages: Vec<Vec<u8>>,
    /// Bytes of messages whose connection ended before the final dot.
    pub incomplete: Vec<Vec<u8>>,
    /// Command lines that were already waiting when the server read them: the client
    /// sent them in one write with the command before (pipelining).
    pub pipelined: Vec<String>,
    /// Bearer tokens presented with XOAUTH2 / OAUTHBEARER, and whether each came as an
    /// initial response on the AUTH line.
    pub bearer: Vec<(String, bool)>,
}

pub struct FakeSmtp {
    pub port: u16,
    journal: Arc<Mutex<Journal>>,
}

impl FakeSmtp {
    pub fn start(script: Script) -> FakeSmtp {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake SMTP server");
        let port = listener.local_addr().unwrap().port();
        let journal = Arc::new(Mutex::new(Journal::default()));
        let shared = Arc::clone(&journal);
        let script = Arc::new(Mutex::new(script));
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (script, journal) = (Arc::clone(&script), Arc::clone(&shared));
                std::thread::spawn(move || {
                    let _ = Connection::new(stream, script, journal).serve();
                });
            }
        });
        FakeSmtp { port, journal }
    }

    pub fn journal(&self) -> Journal {
        self.journal.lock().unwrap().clone()
    }

    /// The command lines seen so far.
    pub fn commands(&self) -> Vec<String> {
        self.journal().commands
    }
}

struct Connection {
    input: BufReader<TcpStream>,
    output: TcpStream,
    script: Arc<Mutex<Script>>,
    journal: Arc<Mutex<Journal>>,
    in_transaction: bool,
    /// Recipients accepted in the open transaction: without one, DATA and BDAT are
    /// refused as Postfix does (`554 5.5.1 Error: no valid recipients`).
    recipients: usize,
    /// The BDAT chunks of the message so far (RFC 3030).
    chunks: Vec<u8>,
}

/// Why a connection ended early.
enum End {
    Closed,
    Io,
}

impl From<std::io::Error> for End {
    fn from(_: std::io::Error) -> End {
        End::Io
    }
}

impl Connection {
    fn new(
        stream: TcpStream,
        script: Arc<Mutex<Script>>,
        journal: Arc<Mutex<Journal>>,
    ) -> Connection {
        let _ = stream.set_read_timeout(script.lock().unwrap().idle_limit);
        let output = stream.try_clone().expect("clone fake SMTP stream");
        Connection {
            input: BufReader::new(stream),
            output,
            script,
            journal,
            in_transaction: false,
            recipients: 0,
            chunks: Vec::new(),
        }
    }

    fn script(&self) -> MutexGuard<'_, Script> {
        self.script.lock().unwrap()
    }

    fn note(&self, event: &str) {
        self.journal
            .lock()
            .unwrap()
            .commands
            .push(event.to_string());
    }

    fn send(&mut self, reply: &str) -> Result<(), End> {
        self.output.write_all(format!("{reply}\r\n").as_bytes())?;
        Ok(())
    }

    /// One line without its CRLF; `Err(Closed)` at EOF or after the idle limit.
    fn line(&mut self) -> Result<String, End> {
        let mut line = String::new();
        let waiting = !self.input.buffer().is_empty();
        match self.input.read_line(&mut line) {
            Ok(0) => Err(End::Closed),
            Ok(_) => {
                let line = line.trim_end_matches(['\r', '\n']).to_string();
                if waiting {
                    self.journal.lock().unwrap().pipelined.push(line.clone());
                }
                Ok(line)
            }
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                self.note("*TIMEOUT");
                let _ = self.send("421 4.4.2 fake Error: timeout exceeded");
                Err(End::Closed)
            }
            Err(e) => Err(e.into()),
        }
    }

    fn serve(mut self) -> Result<(), End> {
        self.note("*CONNECT");
        self.send("220 fake ESMTP")?;
        loop {
            let line = self.line()?;
            let upper = line.to_ascii_uppercase();
            let verb = upper.split(' ').next().unwrap_or_default().to_string();
            if verb == "AUTH" {
                self.note(&format!("AUTH {}", upper.split(' ').nth(1).unwrap_or("")));
                self.auth(&line)?;
                continue;
            }
            self.note(&line);
            match verb.as_str() {
                "EHLO" => {
                    let mut lines = vec!["fake".to_string()];
                    lines.extend(self.script().extensions.iter().cloned());
                    let last = lines.len() - 1;
                    for (i, text) in lines.iter().enumerate() {
                        let sep = if i == last { ' ' } else { '-' };
                        self.output
                            .write_all(format!("250{sep}{text}\r\n").as_bytes())?;
                    }
                }
                "MAIL" if self.in_transaction => {
                    self.send("503 5.5.1 Error: nested MAIL command")?
                }
                "MAIL" => {
                    let reply = {
                        let mut script = self.script();
                        match script.mail.is_empty() {
                            true => "250 2.1.0 Ok".to_string(),
                            false => script.mail.remove(0),
                        }
                    };
                    self.in_transaction = reply.starts_with('2');
                    self.recipients = 0;
                    self.send(&reply)?
                }
                "RCPT" if !self.in_transaction => {
                    self.send("503 5.5.1 Error: need MAIL command")?
                }
                "RCPT" => {
                    let reply = self
                        .script()
                        .rcpt
                        .iter()
                        .find(|(address, _)| line.contains(&format!("<{address}>")))
                        .map_or("250 2.1.5 Ok".to_string(), |(_, reply)| reply.clone());
                    if reply.starts_with('2') {
                        self.recipients += 1;
                    }
                    self.send(&reply)?;
                    if reply.starts_with("421") {
                        return Err(End::Closed);
                    }
                }
                "DATA" => self.data()?,
                "BDAT" => self.bdat(&upper)?,
                "RSET" => {
                    self.in_transaction = false;
                    self.send("250 2.0.0 Ok")?
                }
                "NOOP" => self.send("250 2.0.0 Ok")?,
                "QUIT" => {
                    let delay = self.script().quit_delay;
                    std::thread::sleep(delay);
                    self.send("221 2.0.0 Bye")?;
                    return Ok(());
                }
                _ => self.send("502 5.5.2 Error: command not recognized")?,
            }
        }
    }

    fn data(&mut self) -> Result<(), End> {
        if let Some(refusal) = self.no_recipient() {
            return self.send(refusal);
        }
        let reply = {
            let mut script = self.script();
            match script.data.is_empty() {
                true => "354 End data with <CR><LF>.<CR><LF>".to_string(),
                false => script.data.remove(0),
            }
        };
        self.send(&reply)?;
        if !reply.starts_with("354") {
            return Ok(());
        }
        let mut message = Vec::new();
        loop {
            let mut line = Vec::new();
            let n = self.input.read_until(b'\n', &mut line).unwrap_or(0);
            if n == 0 || !line.ends_with(b"\n") {
                message.extend_from_slice(&line);
                self.note("*EOF IN DATA");
                self.journal.lock().unwrap().incomplete.push(message);
                return Err(End::Closed);
            }
            if line == b".\r\n" {
                break;
            }
            let unstuffed = line.strip_prefix(b".").unwrap_or(&line);
            message.extend_from_slice(unstuffed);
        }
        self.in_transaction = false;
        self.complete(message)
    }

    /// `BDAT n [LAST]` (RFC 3030, offered when `extensions` has CHUNKING): exactly n
    /// octets follow the line; the last chunk completes the message.
    fn bdat(&mut self, line: &str) -> Result<(), End> {
        let mut words = line.split(' ').skip(1);
        let size: Option<usize> = words.next().and_then(|n| n.parse().ok());
        let last = words.next() == Some("LAST");
        let Some(size) = size else {
            return self.send("501 5.5.4 Syntax: BDAT count [LAST]");
        };
        let mut chunk = vec![0; size];
        let mut got = 0;
        while got < size {
            match std::io::Read::read(&mut self.input, &mut chunk[got..]) {
                Ok(0) | Err(_) => {
                    let mut message = std::mem::take(&mut self.chunks);
                    message.extend_from_slice(&chunk[..got]);
                    self.note("*EOF IN DATA");
                    self.journal.lock().unwrap().incomplete.push(message);
                    return Err(End::Closed);
                }
                Ok(n) => got += n,
            }
        }
        if let Some(refusal) = self.no_recipient() {
            return self.send(refusal);
        }
        self.chunks.extend_from_slice(&chunk);
        if !last {
            return self.send(&format!("250 2.0.0 Ok: {size} bytes"));
        }
        self.in_transaction = false;
        let message = std::mem::take(&mut self.chunks);
        self.complete(message)
    }

    /// Postfix's refusal of DATA or BDAT in a transaction without an accepted recipient.
    fn no_recipient(&self) -> Option<&'static str> {
        match (self.in_transaction, self.recipients) {
            (false, _) => Some("503 5.5.1 Error: need RCPT command"),
            (true, 0) => Some("554 5.5.1 Error: no valid recipients"),
            _ => None,
        }
    }

    /// A message completed (by the final dot or the last BDAT chunk): kept, and answered
    /// after `end_of_data_delay`.
    fn complete(&mut self, message: Vec<u8>) -> Result<(), End> {
        let delay = self.script().end_of_data_delay;
        std::thread::sleep(delay);
        let reply = {
            let mut script = self.script();
            let mut journal = self.journal.lock().unwrap();
            journal.messages.push(message);
            match script.end_of_data.is_empty() {
                true => format!("250 2.0.0 Ok: queued as F{}", journal.messages.len()),
                false => script.end_of_data.remove(0),
            }
        };
        self.send(&reply)
    }

    /// AUTH LOGIN against `script.account`, or XOAUTH2 / OAUTHBEARER against
    /// `script.bearer_tokens`.
    fn auth(&mut self, line: &str) -> Result<(), End> {
        let mechanism = line
            .split(' ')
            .nth(1)
            .unwrap_or_default()
            .to_ascii_uppercase();
        let offered = self
            .script()
            .extensions
            .iter()
            .any(|e| e.starts_with("AUTH ") && e.split(' ').any(|m| m == mechanism));
        if offered && (mechanism == "XOAUTH2" || mechanism == "OAUTHBEARER") {
            return self.bearer(line);
        }
        if mechanism != "LOGIN" || !offered {
            return self.send("504 5.5.4 Unsupported authentication mechanism");
        }
        let account = self.script().account.clone().unwrap_or_default();
        self.send("334 VXNlcm5hbWU6")?;
        let user = self.line()?;
        self.send("334 UGFzc3dvcmQ6")?;
        let password = self.line()?;
        match (user, password) == account {
            true => self.send("235 2.7.0 Authentication successful"),
            false => self.send("535 5.7.8 Error: authentication failed"),
        }
    }
}

impl Connection {
    fn bearer(&mut self, line: &str) -> Result<(), End> {
        let initial = line.split(' ').nth(2).map(str::to_string);
        let with_initial = initial.is_some();
        if line.len() + 2 > 512 {
            return self.send("500 5.5.2 Error: line too long");
        }
        let message = match initial {
            Some(message) => message,
            None => {
                self.send("334 ")?;
                self.line()?
            }
        };
        let message = decode_base64(&message).unwrap_or_default();
        let text = String::from_utf8_lossy(&message);
        let token = text
            .split('\x01')
            .find_map(|field| field.strip_prefix("auth=Bearer "))
            .unwrap_or_default()
            .to_string();
        self.journal
            .lock()
            .unwrap()
            .bearer
            .push((token.clone(), with_initial));
        if self.script().bearer_unavailable {
            return self.send("454 4.7.0 Temporary authentication failure");
        }
        if self.script().bearer_tokens.contains(&token) {
            return self.send("235 2.7.0 Authentication successful");
        }
        // Dovecot's challenge: {"status":"invalid_token","schemes":"bearer","scope":"mail"}
        self.send(
            "334 eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciIsInNjb3BlIjoibWFpbCJ9",
        )?;
        let answer = self.line()?;
        self.note(&format!("*ERROR RESPONSE {answer}"));
        self.send("535 5.7.8 Error: authentication failed")?;
        if self.script().close_after_refused_token {
            return Err(End::Closed);
        }
        Ok(())
    }
}

/// Standard base64 with padding; `None` on anything else.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut bits = 0u32;
    let mut count = 0;
    let mut out = Vec::new();
    for c in text.trim_end_matches('=').bytes() {
        bits = bits << 6 | ALPHABET.iter().position(|&a| a == c)? as u32;
        count += 6;
        if count >= 8 {
            count -= 8;
            out.push((bits >> count) as u8);
        }
    }
    Some(out)
}
