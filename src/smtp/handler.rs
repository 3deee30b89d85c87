//! Message handlers: external programs run on each complete message before it is relayed
//! (`smtp --handler PROGRAM`, and `handler=` per account), as smtpproxy's Python handlers
//! are, for example to save a PBX's voicemail attachment or to drop unwanted mail.
//!
//! Each program is executed directly (no shell, no arguments, an empty environment but for
//! `PATH` and the envelope variables below, working directory `/`), with the message on
//! stdin (CRLF lines, as received) and its stdout and stderr read at the same time, so a
//! program that reads nothing, or writes before it has read everything, cannot deadlock the
//! gateway. The message and the program's output pass through spools (memory up to 256 KiB,
//! then an unlinked file), so memory stays the same whatever the size. Its exit code says:
//!
//! - 0: go on; what it wrote to stdout, if anything, replaces the message (line endings
//!   made CRLF, the size checked again);
//! - 100: accept and discard (the client gets 250, nothing goes upstream);
//! - 1–99: refuse with its first line of stdout: `550 5.7.1`, or `451 4.7.1` for 75
//!   (`EX_TEMPFAIL`);
//! - anything else, a signal, or running past --handler-timeout: `451 4.3.0`.
//!
//! Its stderr goes to the log, line by line (at most [`STDERR_LINES`] lines).

use super::reply::{Enhanced, Reply};
use super::spool::Spool;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

/// Lines of a handler's stderr logged per message; the rest is read and dropped.
pub const STDERR_LINES: usize = 50;

/// Bytes of one stderr line logged (the rest of the line is dropped).
const STDERR_LINE_MAX: usize = 1000;

/// How often the exit of a running handler is checked: std's `Child` has no wait with a
/// timeout.
const POLL: Duration = Duration::from_millis(10);

/// The handlers configured: for every message, then per account.
#[derive(Debug, Clone, Default)]
pub struct Handlers {
    pub all: Vec<PathBuf>,
    /// Account name and its `handler=` programs, run after `all`.
    pub per_account: Vec<(String, Vec<PathBuf>)>,
    pub timeout: Duration,
}

impl Handlers {
    /// The programs for a message sent through `account` (`None`: no account), in order.
    pub fn for_account(&self, account: Option<&str>) -> Vec<PathBuf> {
        let own = self
            .per_account
            .iter()
            .filter(|(name, _)| Some(name.as_str()) == account)
            .flat_map(|(_, programs)| programs.iter().cloned());
        self.all.iter().cloned().chain(own).collect()
    }
}

/// Checks a handler program when the gateway starts: an absolute path (nothing is looked
/// up in `PATH`) to an executable file.
pub fn check_program(program: &Path) -> Result<(), String> {
    use std::os::unix::fs::PermissionsExt;
    if !program.is_absolute() {
        return Err(format!("{} is not an absolute path", program.display()));
    }
    match std::fs::metadata(program) {
        Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => Ok(()),
        Ok(_) => Err(format!("{} is not an executable file", program.display())),
        Err(e) => Err(format!("{}: {e}", program.display())),
    }
}

/// The envelope, as the handler sees it in its environment.
#[derive(Debug, Clone, Copy)]
pub struct Envelope<'a> {
    pub sender: &'a str,
    pub recipients: &'a [String],
    pub account: Option<&'a str>,
    pub client: &'a str,
    pub helo: &'a str,
    pub user: Option<&'a str>,
}

/// What a handler decided.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on with the message (`replaced`: with the handler's output, now in `output`).
    Continue { replaced: bool },
    /// Accept and drop it.
    Discard,
    /// Refuse it with this reply.
    Refuse(Reply),
}

/// Why a handler gave no verdict: always `451 4.3.0` for the client; the text is the log's.
#[derive(Debug, PartialEq, Eq)]
pub struct Failure(pub String);

/// Runs `program` on the message in `message`; its stdout is collected in `output`
/// (cleared first), line endings made CRLF.
pub fn run(
    program: &Path,
    envelope: &Envelope,
    timeout: Duration,
    message: &mut Spool,
    output: &mut Spool,
) -> Result<Verdict, Failure> {
    let name = program.display().to_string();
    let mut child = Command::new(program)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .env("LMP_SENDER", envelope.sender)
        .env("LMP_RECIPIENTS", envelope.recipients.join(" "))
        .env("LMP_ACCOUNT", envelope.account.unwrap_or_default())
        .env("LMP_CLIENT", envelope.client)
        .env("LMP_HELO", envelope.helo)
        .env("LMP_AUTH_USER", envelope.user.unwrap_or_default())
        .env("LMP_SIZE", message.size().to_string())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| Failure(format!("cannot start {name}: {e}")))?;
    let (stdin, stdout, stderr) = (
        child.stdin.take().expect("piped"),
        child.stdout.take().expect("piped"),
        child.stderr.take().expect("piped"),
    );
    output.clear();
    let deadline = Instant::now() + timeout;
    let collected = &mut *output;
    let logged_as = name.as_str();
    let (status, fed) = std::thread::scope(|scope| {
        let feeder = scope.spawn(move || feed(stdin, message));
        scope.spawn(move || collect(stdout, collected));
        scope.spawn(move || log_stderr(stderr, logged_as));
        let status = wait(&mut child, deadline);
        // Every pipe is closed once the program is gone (killed or not), so the threads end.
        (status, feeder.join())
    });
    let status = status.map_err(|e| Failure(format!("{name}: {e}")))?;
    let Some(status) = status else {
        return Err(Failure(format!(
            "{name} ran longer than --handler-timeout {} s and was killed",
            timeout.as_secs()
        )));
    };
    if let Ok(Err(e)) = fed
        && e.kind() != io::ErrorKind::BrokenPipe
    {
        return Err(Failure(format!(
            "{name}: cannot read the spooled message: {e}"
        )));
    }
    if let Some(e) = output.take_error() {
        return Err(Failure(format!("{name}: cannot spool its output: {e}")));
    }
    verdict(&name, status, output)
}

/// The exit status and output turned into a verdict.
fn verdict(name: &str, status: ExitStatus, output: &Spool) -> Result<Verdict, Failure> {
    match status.code() {
        Some(0) => Ok(Verdict::Continue {
            replaced: output.size() > 0,
        }),
        Some(100) => Ok(Verdict::Discard),
        Some(code @ 1..=99) => {
            let text = first_line(output.head());
            let text = if text.is_empty() {
                format!("Message refused by a handler (exit {code})")
            } else {
                text
            };
            Ok(Verdict::Refuse(if code == 75 {
                Reply::new(451, Enhanced::new(4, 7, 1), text)
            } else {
                Reply::new(550, Enhanced::new(5, 7, 1), text)
            }))
        }
        Some(code) => Err(Failure(format!("{name} exited with {code}"))),
        None => Err(Failure(format!("{name} crashed: {status}"))),
    }
}

/// The first line of a handler's output as reply text: printable ASCII, at most 200 bytes.
fn first_line(output: &[u8]) -> String {
    let line = output
        .split(|&b| b == b'\r' || b == b'\n')
        .next()
        .unwrap_or_default();
    line.iter()
        .take(200)
        .map(|&b| {
            if (0x20..0x7f).contains(&b) {
                b as char
            } else {
                '?'
            }
        })
        .collect::<String>()
        .trim()
        .to_string()
}

/// Waits for the program's exit until `deadline`, then kills it. `None`: killed.
fn wait(child: &mut std::process::Child, deadline: Instant) -> io::Result<Option<ExitStatus>> {
    loop {
        let exited = child.try_wait().inspect_err(|_| {
            // Never leave it running: the pipe threads end only when it is gone.
            let _ = child.kill();
        })?;
        if let Some(status) = exited {
            return Ok(Some(status));
        }
        if Instant::now() >= deadline {
            let _ = child.kill();
            child.wait()?;
            return Ok(None);
        }
        std::thread::sleep(POLL);
    }
}

/// Writes the message to the program's stdin, then closes it. A program that exits
/// without reading it all gives `BrokenPipe` (Rust ignores SIGPIPE), which is fine.
fn feed(mut stdin: std::process::ChildStdin, message: &mut Spool) -> io::Result<()> {
    stdin.write_all(message.head())?;
    let (mut tail, _) = message.tail()?;
    io::copy(&mut tail, &mut stdin)?;
    Ok(())
}

/// Reads the program's stdout into `output`, every line ending made CRLF (a lone LF or a
/// lone CR), and ending with CRLF.
fn collect(mut stdout: std::process::ChildStdout, output: &mut Spool) {
    let mut buf = vec![0; 64 * 1024];
    let mut crlf = Vec::with_capacity(2 * buf.len() + 2);
    let mut normalizer = LineEndings::default();
    loop {
        match stdout.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => {
                crlf.clear();
                normalizer.push(&buf[..n], &mut crlf);
                output.write(&crlf);
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => break,
        }
    }
    crlf.clear();
    normalizer.finish(&mut crlf);
    output.write(&crlf);
}

/// Turns lone CR and lone LF into CRLF across chunk boundaries.
#[derive(Debug, Default)]
struct LineEndings {
    pending_cr: bool,
    last: Option<u8>,
}

impl LineEndings {
    fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) {
        for &b in chunk {
            if self.pending_cr {
                self.pending_cr = false;
                out.extend_from_slice(b"\r\n");
                self.last = Some(b'\n');
                if b == b'\n' {
                    continue;
                }
            }
            match b {
                b'\r' => self.pending_cr = true,
                b'\n' => out.extend_from_slice(b"\r\n"),
                _ => out.push(b),
            }
            if b != b'\r' {
                self.last = Some(b);
            }
        }
    }

    /// Ends the output: a trailing CR becomes CRLF, and a last line without its ending gets
    /// one (a message ends with CRLF).
    fn finish(&mut self, out: &mut Vec<u8>) {
        if self.pending_cr || self.last.is_some_and(|b| b != b'\n') {
            out.extend_from_slice(b"\r\n");
        }
        self.pending_cr = false;
        self.last = None;
    }
}

/// Logs the program's stderr, a line at a time, bounded.
fn log_stderr(stderr: std::process::ChildStderr, name: &str) {
    let mut reader = BufReader::new(stderr);
    let mut line = Vec::new();
    let mut logged = 0;
    loop {
        line.clear();
        match reader
            .by_ref()
            .take(STDERR_LINE_MAX as u64)
            .read_until(b'\n', &mut line)
        {
            Ok(0) | Err(_) => break,
            Ok(_) => {}
        }
        if !line.ends_with(b"\n") {
            // Skip the rest of an overlong line.
            let mut rest = Vec::new();
            let _ = reader.by_ref().take(1 << 20).read_until(b'\n', &mut rest);
        }
        if logged < STDERR_LINES {
            let text = String::from_utf8_lossy(&line);
            log::warn!("smtp: handler {name}: {}", text.trim_end());
            logged += 1;
        }
    }
    if logged >= STDERR_LINES {
        log::warn!("smtp: handler {name}: more stderr not logged");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn normalized(chunks: &[&[u8]]) -> Vec<u8> {
        let mut n = LineEndings::default();
        let mut out = Vec::new();
        for c in chunks {
            n.push(c, &mut out);
        }
        n.finish(&mut out);
        out
    }

    #[test]
    fn every_line_ending_becomes_crlf_across_chunks() {
        assert_eq!(normalized(&[b"a\nb\r\nc\rd"]), b"a\r\nb\r\nc\r\nd\r\n");
        assert_eq!(
            normalized(&[b"a\r", b"\nb\r", b"", b"c\r"]),
            b"a\r\nb\r\nc\r\n"
        );
        assert_eq!(normalized(&[b"x\r\n"]), b"x\r\n");
        assert_eq!(normalized(&[b""]), b"");
        assert_eq!(normalized(&[b"\n\n"]), b"\r\n\r\n");
    }

    #[test]
    fn exit_codes_decide() {
        use std::os::unix::process::ExitStatusExt;
        let mut out = Spool::new(&std::env::temp_dir(), 1000);
        let status = |code: i32| ExitStatus::from_raw(code << 8);
        assert_eq!(
            verdict("h", status(0), &out),
            Ok(Verdict::Continue { replaced: false })
        );
        assert_eq!(verdict("h", status(100), &out), Ok(Verdict::Discard));
        out.write(b"No \x07faxes\r\nsecond line\r\n");
        assert_eq!(
            verdict("h", status(1), &out),
            Ok(Verdict::Refuse(Reply::new(
                550,
                Enhanced::new(5, 7, 1),
                "No ?faxes"
            )))
        );
        assert_eq!(
            verdict("h", status(75), &out),
            Ok(Verdict::Refuse(Reply::new(
                451,
                Enhanced::new(4, 7, 1),
                "No ?faxes"
            )))
        );
        assert_eq!(
            verdict("h", status(0), &out),
            Ok(Verdict::Continue { replaced: true })
        );
        assert!(verdict("h", status(101), &out).is_err());
        assert!(
            verdict("h", ExitStatus::from_raw(9), &out).is_err(),
            "SIGKILL"
        );
        out.clear();
        assert_eq!(
            verdict("h", status(42), &out),
            Ok(Verdict::Refuse(Reply::new(
                550,
                Enhanced::new(5, 7, 1),
                "Message refused by a handler (exit 42)"
            )))
        );
    }

    #[test]
    fn programs_must_be_absolute_executable_files() {
        assert!(check_program(Path::new("/bin/true")).is_ok());
        assert!(check_program(Path::new("true")).is_err());
        assert!(check_program(Path::new("/etc/passwd")).is_err());
        assert!(check_program(Path::new("/nonexistent")).is_err());
        assert!(check_program(Path::new("/tmp")).is_err());
    }

    #[test]
    fn per_account_handlers_follow_the_global_ones() {
        let h = Handlers {
            all: vec!["/a".into()],
            per_account: vec![("x@y".into(), vec!["/b".into()])],
            timeout: Duration::from_secs(1),
        };
        assert_eq!(
            h.for_account(Some("x@y")),
            [PathBuf::from("/a"), "/b".into()]
        );
        assert_eq!(h.for_account(None), [PathBuf::from("/a")]);
    }
}

#[cfg(test)]
#[path = "handler_tests.rs"]
mod session_tests;
