//! Message handlers (`smtp --handler`, `handler=` per account) in the real binary, relaying
//! to a scripted SMTP server: 30 MB messages through a handler that reads nothing and one
//! that replaces the message, with the process's peak RSS measured, and the README's
//! voicemail example handler run as the README shows it.

mod common;
#[path = "../src/smtp/fake_backend.rs"]
mod fake_backend;

use fake_backend::{FakeSmtp, Script};
use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

/// A directory for one test's handlers and files, removed at the end.
struct Dir(PathBuf);

impl Dir {
    fn new(name: &str) -> Dir {
        let dir =
            std::env::temp_dir().join(format!("lmp-handlers-test-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        Dir(dir)
    }

    /// An executable file (written before any proxy runs, so no ETXTBSY).
    fn program(&self, name: &str, text: &str) -> PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        path
    }
}

impl Drop for Dir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Runs the proxy under `/usr/bin/time` against `fake`, returning its output and peak RSS
/// in kB.
fn proxy_measured(fake: &FakeSmtp, args: &[&str], input: Vec<u8>) -> (Output, u64) {
    let time = common::require_client("time");
    let mut child = Command::new(time)
        .args(["-f", "maxrss=%M", common::proxy_bin()])
        .args(["--log", "stderr", "smtp", "--hostname", "proxy.test"])
        .args([
            "--smtp-host",
            "127.0.0.1",
            "--smtp-tls",
            "none",
            "--client-auth",
            "none",
        ])
        .args(["--smtp-port", &fake.port.to_string()])
        .args(args)
        .env_clear()
        .env("PATH", "/usr/local/bin:/usr/bin:/bin")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let writer = std::thread::spawn(move || {
        let _ = stdin.write_all(&input);
    });
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rss = stderr
        .rsplit("maxrss=")
        .next()
        .and_then(|r| r.trim().parse().ok())
        .unwrap_or_else(|| panic!("no maxrss in {stderr}"));
    (out, rss)
}

/// A 30 MB message (76-byte lines), CRLF, ending with CRLF.
fn thirty_mb() -> Vec<u8> {
    let mut message =
        b"From: <pbx@x.test>\r\nSubject: 30 MB\r\nDate: Thu, 3 Dec 2026 12:00:00 +0000\r\n\
Message-ID: <big@x.test>\r\n\r\n"
            .to_vec();
    let line = [b'A'; 76];
    while message.len() < 30 << 20 {
        message.extend_from_slice(&line);
        message.extend_from_slice(b"\r\n");
    }
    message
}

fn session(message: &[u8]) -> Vec<u8> {
    let mut input =
        b"EHLO dev\r\nMAIL FROM:<pbx@x.test>\r\nRCPT TO:<a@y.test>\r\nDATA\r\n".to_vec();
    input.extend_from_slice(message);
    input.extend_from_slice(b".\r\nQUIT\r\n");
    input
}

#[test]
fn thirty_megabytes_through_handlers_in_bounded_memory() {
    let dir = Dir::new("big");
    // Reads nothing at all: the gateway must not block writing the 30 MB to it.
    let ignores = dir.program(
        "ignores-input",
        "#!/bin/sh\necho 'did not read' >&2\nexit 0\n",
    );
    // Writes its input back: the output replaces the message (through the spool).
    let copies = dir.program("copies", "#!/bin/sh\nexec cat\n");
    let message = thirty_mb();
    let mut peaks = Vec::new();
    let (ignores, copies) = (ignores.to_str().unwrap(), copies.to_str().unwrap());
    for (name, handler) in [
        ("none", None),
        ("reads nothing", Some(ignores)),
        ("replaces it", Some(copies)),
    ] {
        let fake = FakeSmtp::start(Script::default());
        let started = std::time::Instant::now();
        let mut args = vec!["--max-message-size", "40000000"];
        if let Some(handler) = handler {
            args.extend(["--handler", handler]);
        }
        let (out, rss) = proxy_measured(&fake, &args, session(&message));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(
            stdout.contains("\r\n250 2.0.0 Ok: queued as "),
            "{name}: {stdout}\n{stderr}"
        );
        let journal = fake.journal();
        assert_eq!(journal.messages.len(), 1, "{name}");
        assert!(
            journal.messages[0] == message,
            "{name}: the backend got other bytes"
        );
        match name {
            "reads nothing" => assert!(stderr.contains("did not read"), "{stderr}"),
            "replaces it" => assert!(stderr.contains("replaced the message"), "{stderr}"),
            _ => {}
        }
        eprintln!(
            "30 MB message, handler: {name}: peak RSS {rss} kB, {:.1} s (debug build)",
            started.elapsed().as_secs_f64()
        );
        peaks.push(rss);
    }
    // The message alone is 30 MB; a bounded path stays far below it.
    for rss in peaks {
        assert!(rss < 24 * 1024, "peak RSS {rss} kB");
    }
}

/// The README's example handler, taken from the README, saves a PBX's voicemail
/// attachment and lets the mail go on unchanged; it runs as `handler=` of the PBX's account.
#[test]
fn the_readme_voicemail_handler_saves_the_attachment() {
    common::require_client("python3");
    let readme =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md")).unwrap();
    let example = readme
        .split("<!-- handler example: save-voicemail -->\n```python\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("the README's handler example");
    let dir = Dir::new("voicemail");
    let saved = dir.0.join("saved");
    std::fs::create_dir(&saved).unwrap();
    let example = example.replace("/var/spool/pbx-voicemail", saved.to_str().unwrap());
    // The shebang names /usr/bin/python3 (Debian's); tests need that one.
    assert!(
        Path::new("/usr/bin/python3").exists(),
        "{}",
        common::missing_program_message("/usr/bin/python3")
    );
    let handler = dir.program("save-voicemail", &format!("{example}\n"));
    let fake = FakeSmtp::start(Script::default());
    let accounts = dir.0.join("smtpproxy.ini");
    std::fs::write(
        &accounts,
        format!(
            "[pbx@x.test]\nsmtphost=127.0.0.1\nsmtpport={}\nhandler={}\n",
            fake.port,
            handler.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&accounts, std::fs::Permissions::from_mode(0o600)).unwrap();
    let audio = b"RIFF\x24\x00\x00\x00WAVEfmt fake voicemail bytes";
    let message = format!(
        "From: PBX <pbx@x.test>\r\nSubject: Voicemail from 555-0100\r\n\
         Date: Thu, 3 Dec 2026 12:00:00 +0000\r\nMessage-ID: <vm@x.test>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=b\r\n\r\n--b\r\nContent-Type: text/plain\r\n\r\n\
         You have a new message.\r\n--b\r\nContent-Type: audio/x-wav\r\n\
         Content-Disposition: attachment; filename=\"msg0001.wav\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}\r\n--b--\r\n",
        legacy_mail_proxy::base64::encode(audio)
    );
    let (out, _) = proxy_measured(
        &fake,
        &["--accounts", accounts.to_str().unwrap()],
        session(message.as_bytes()),
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stdout.contains("\r\n250 2.0.0 Ok: queued as "),
        "{stdout}\n{stderr}"
    );
    assert_eq!(fake.journal().messages, [message.as_bytes()]);
    let files: Vec<PathBuf> = std::fs::read_dir(&saved)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(files.len(), 1, "{stderr}");
    assert!(
        files[0].to_str().unwrap().ends_with("-0-msg0001.wav"),
        "{files:?}"
    );
    assert_eq!(std::fs::read(&files[0]).unwrap(), audio);
    assert!(
        stderr.contains("saved ") && stderr.contains("from pbx@x.test"),
        "{stderr}"
    );
}
