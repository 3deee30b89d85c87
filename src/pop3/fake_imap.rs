//! A scripted IMAP server for the OAuth2 login tests: plain TCP on 127.0.0.1, one thread
//! per connection. It takes `AUTHENTICATE OAUTHBEARER` / `XOAUTH2` as Dovecot does (with or
//! without SASL-IR; a refused token gets the JSON error challenge, then
//! `NO [AUTHENTICATIONFAILED]`), and serves a mailbox of at most one message, and can end a session
//! with Exchange Online's `* BYE Session invalidated - AccessTokenExpired`.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

#[derive(Debug, Clone, Default)]
pub struct Script {
    /// Capabilities in the greeting (as Dovecot) or only in answer to CAPABILITY (as
    /// Exchange and Gmail).
    pub in_greeting: bool,
    /// Capability names, such as `SASL-IR` and `AUTH=XOAUTH2`.
    pub capabilities: Vec<String>,
    /// The bearer tokens accepted.
    pub tokens: Vec<String>,
    /// Close the connection after a refused token.
    pub close_after_refusal: bool,
    /// The mailbox's one message (UID 5), if any.
    pub message: Option<String>,
    /// On the first connection, answer the command with this number (1 is the first)
    /// with Exchange's `* BYE Session invalidated - AccessTokenExpired` and close.
    pub bye_at_command: Option<usize>,
    /// The UID the body's FETCH response names (`None`: the message's own, 5): a server
    /// that answers with the wrong message.
    pub body_uid: Option<u32>,
    /// Send the UID after the body, as Microsoft 365 does.
    pub uid_after_body: bool,
}

#[derive(Debug, Clone, Default)]
pub struct Journal {
    pub connects: usize,
    /// Each token presented, and whether it came on the command line (SASL-IR).
    pub presented: Vec<(String, bool)>,
    /// Answers to error challenges, base64 as sent.
    pub error_responses: Vec<String>,
    /// Commands without their tag and arguments (`CAPABILITY`, `AUTHENTICATE`…).
    pub commands: Vec<String>,
}

pub struct FakeImap {
    pub port: u16,
    journal: Arc<Mutex<Journal>>,
}

impl FakeImap {
    pub fn start(script: Script) -> FakeImap {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind fake IMAP server");
        let port = listener.local_addr().unwrap().port();
        let journal = Arc::new(Mutex::new(Journal::default()));
        let shared = Arc::clone(&journal);
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (script, journal) = (script.clone(), Arc::clone(&shared));
                std::thread::spawn(move || serve(stream, &script, &journal));
            }
        });
        FakeImap { port, journal }
    }

    pub fn journal(&self) -> Journal {
        self.journal.lock().unwrap().clone()
    }
}

fn serve(stream: TcpStream, script: &Script, journal: &Mutex<Journal>) -> Option<()> {
    let connection = {
        let mut journal = journal.lock().unwrap();
        journal.connects += 1;
        journal.connects
    };
    let mut commands = 0;
    let mut output = stream.try_clone().ok()?;
    let mut input = BufReader::new(stream);
    let capabilities = format!("IMAP4rev1 {}", script.capabilities.join(" "));
    let greeting = match script.in_greeting {
        true => format!("* OK [CAPABILITY {capabilities}] fake ready.\r\n"),
        false => "* OK fake ready.\r\n".to_string(),
    };
    output.write_all(greeting.as_bytes()).ok()?;
    let mut read_line = move || {
        let mut line = String::new();
        match input.read_line(&mut line) {
            Ok(n) if n > 0 => Some(line.trim_end().to_string()),
            _ => None,
        }
    };
    loop {
        let line = read_line()?;
        let words: Vec<&str> = line.split(' ').collect();
        let (tag, command) = (words[0], words.get(1)?.to_ascii_uppercase());
        journal.lock().unwrap().commands.push(command.clone());
        commands += 1;
        if connection == 1 && script.bye_at_command == Some(commands) {
            journal.lock().unwrap().commands.push("*BYE".into());
            let _ = output.write_all(b"* BYE Session invalidated - AccessTokenExpired\r\n");
            return None;
        }
        let reply = match command.as_str() {
            "CAPABILITY" => format!("* CAPABILITY {capabilities}\r\n{tag} OK done\r\n"),
            "AUTHENTICATE" => {
                let ir = words.get(3).map(|s| s.to_string());
                let with_ir = ir.is_some();
                let message = match ir {
                    Some(message) => message,
                    None => {
                        output.write_all(b"+ \r\n").ok()?;
                        read_line()?
                    }
                };
                let message = crate::base64::decode(message.as_bytes()).unwrap_or_default();
                let text = String::from_utf8_lossy(&message).to_string();
                let token = text
                    .split('\x01')
                    .find_map(|field| field.strip_prefix("auth=Bearer "))
                    .unwrap_or_default()
                    .to_string();
                journal
                    .lock()
                    .unwrap()
                    .presented
                    .push((token.clone(), with_ir));
                if script.tokens.contains(&token) {
                    format!("{tag} OK Logged in\r\n")
                } else {
                    // Dovecot's: {"status":"invalid_token","schemes":"bearer","scope":"mail"}
                    output
                        .write_all(b"+ eyJzdGF0dXMiOiJpbnZhbGlkX3Rva2VuIiwic2NoZW1lcyI6ImJlYXJlciIsInNjb3BlIjoibWFpbCJ9\r\n")
                        .ok()?;
                    let answer = read_line()?;
                    journal.lock().unwrap().error_responses.push(answer);
                    output
                        .write_all(
                            format!("{tag} NO [AUTHENTICATIONFAILED] Authentication failed.\r\n")
                                .as_bytes(),
                        )
                        .ok()?;
                    if script.close_after_refusal {
                        return None;
                    }
                    continue;
                }
            }
            "EXAMINE" | "SELECT" => format!(
                "* {} EXISTS\r\n* OK [UIDVALIDITY 7] ok\r\n{tag} OK [READ-ONLY] done\r\n",
                usize::from(script.message.is_some())
            ),
            "UID" => match (&script.message, words.get(3).copied()) {
                (Some(message), Some("1:*")) => format!(
                    "* 1 FETCH (UID 5 RFC822.SIZE {} FLAGS ())\r\n{tag} OK done\r\n",
                    message.len()
                ),
                (Some(message), Some("5")) => {
                    let uid = script.body_uid.unwrap_or(5);
                    let length = message.len();
                    match script.uid_after_body {
                        false => format!(
                            "* 1 FETCH (UID {uid} BODY[] {{{length}}}\r\n{message})\r\n{tag} OK done\r\n"
                        ),
                        true => format!(
                            "* 1 FETCH (BODY[] {{{length}}}\r\n{message} UID {uid})\r\n{tag} OK done\r\n"
                        ),
                    }
                }
                _ => format!("{tag} OK done\r\n"),
            },
            "LOGOUT" => {
                output
                    .write_all(format!("* BYE\r\n{tag} OK done\r\n").as_bytes())
                    .ok()?;
                return None;
            }
            "NOOP" | "STATUS" => format!("{tag} OK done\r\n"),
            _ => format!("{tag} BAD unknown\r\n"),
        };
        output.write_all(reply.as_bytes()).ok()?;
    }
}
