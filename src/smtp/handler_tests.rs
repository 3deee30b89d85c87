//! Handlers in the SMTP core: real programs (shell scripts) on messages from a transcript,
//! relayed to the in-memory backend.

use super::*;
use crate::smtp::memory::MemoryRelay;
use crate::smtp::session::{Config, Session};
use std::io::BufReader;
use std::os::unix::fs::PermissionsExt;
use std::sync::OnceLock;

/// The test scripts, written once (executing a file another thread is still writing fails
/// with ETXTBSY).
fn scripts() -> &'static PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("lmp-handlers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        for (name, body) in [
            ("pass", "cat >/dev/null\nexit 0"),
            (
                "env",
                "cat >/dev/null\nenv | sort | grep -v '^PWD=' | grep -v '^SHLVL=' | grep -v '^_=' >\"$(dirname \"$0\")/env.$LMP_SENDER\"",
            ),
            ("replace", "cat >/dev/null\nprintf 'Subject: replaced\\n\\nnew body\\nlast line'"),
            ("tag", "printf 'X-Tag: yes\\r\\n'\ncat"),
            ("discard", "cat >/dev/null\nexit 100"),
            ("refuse", "cat >/dev/null\necho 'No faxes here, thanks'\necho second\nexit 1"),
            ("tempfail", "echo 'Try later'\nexit 75"),
            ("slow", "exec sleep 30"),
            ("crash", "cat >/dev/null\nkill -SEGV $$"),
            ("ignores-input", "echo 'nothing read' >&2\nexit 0"),
            ("huge", "cat >/dev/null\nhead -c 5000 /dev/zero | tr '\\0' 'x'"),
        ] {
            let path = dir.join(name);
            std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).unwrap();
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
        dir
    })
}

fn script(name: &str) -> PathBuf {
    scripts().join(name)
}

const MESSAGE: &str = "From: <dev@x.test>\r\nDate: Thu, 3 Dec 2026 12:00:00 +0000\r\nMessage-ID: <1@x>\r\n\r\nbody\r\n";

fn session(handlers: &[&str], timeout: u64, body: &str) -> (String, MemoryRelay) {
    let mut config = Config::new("gw.test");
    config.max_message_size = 4096;
    config.head_max = 256; // messages past 256 bytes use the spool's file too
    config.handlers = Handlers {
        all: handlers.iter().map(|h| script(h)).collect(),
        per_account: Vec::new(),
        timeout: Duration::from_secs(timeout),
    };
    let input = format!(
        "EHLO dev\r\nMAIL FROM:<dev@x.test>\r\nRCPT TO:<a@y.test>\r\nRCPT TO:<b@y.test>\r\nDATA\r\n{body}.\r\nQUIT\r\n"
    );
    let mut relay = MemoryRelay::default();
    let mut out = Vec::new();
    Session::new(
        BufReader::new(input.as_bytes()),
        &mut out,
        &mut relay,
        &config,
    )
    .run();
    (String::from_utf8(out).unwrap(), relay)
}

fn final_reply(out: &str) -> &str {
    out.lines().rev().nth(1).unwrap()
}

#[test]
fn exit_0_without_output_relays_the_message_unchanged_with_the_envelope_in_env() {
    let (out, relay) = session(&["pass", "env"], 10, MESSAGE);
    assert!(
        final_reply(&out).starts_with("250 2.0.0 Ok: queued"),
        "{out}"
    );
    assert_eq!(relay.delivered[0].data, MESSAGE.as_bytes());
    let env = std::fs::read_to_string(scripts().join("env.dev@x.test")).unwrap();
    for line in [
        "LMP_SENDER=dev@x.test\n",
        "LMP_RECIPIENTS=a@y.test b@y.test\n",
        "LMP_ACCOUNT=\n",
        "LMP_CLIENT=local\n",
        "LMP_HELO=dev\n",
        "LMP_SIZE=85\n",
        "PATH=/usr/local/bin:/usr/bin:/bin\n",
    ] {
        assert!(env.contains(line), "{line}{env}");
    }
    // Nothing else from the gateway's environment (passwords live there).
    assert_eq!(env.lines().count(), 8, "{env}");
}

#[test]
fn exit_0_with_output_replaces_the_message_byte_exact_with_crlf() {
    let (out, relay) = session(&["replace"], 10, MESSAGE);
    assert!(
        final_reply(&out).starts_with("250 2.0.0 Ok: queued"),
        "{out}"
    );
    let data = String::from_utf8(relay.delivered[0].data.clone()).unwrap();
    // Date and Message-ID are added by the gateway's header edits, after the handlers.
    let (head, body) = data.split_once("\r\n\r\n").unwrap();
    assert!(head.starts_with("Subject: replaced\r\nDate: "), "{data:?}");
    assert_eq!(body, "new body\r\nlast line\r\n");
    // Handlers run in order, each on the previous one's output.
    let (_, relay) = session(&["tag", "tag"], 10, MESSAGE);
    let expected = format!("X-Tag: yes\r\nX-Tag: yes\r\n{MESSAGE}");
    assert_eq!(String::from_utf8_lossy(&relay.delivered[0].data), expected);
}

#[test]
fn exit_100_discards_with_250_and_nothing_goes_upstream() {
    let (out, relay) = session(&["discard", "pass"], 10, MESSAGE);
    assert_eq!(
        final_reply(&out),
        "250 2.0.0 Ok: accepted and discarded by a message handler"
    );
    assert!(relay.delivered.is_empty());
    assert!(!relay.log.iter().any(|l| l == "DATA"), "{:?}", relay.log);
    assert!(relay.log.iter().any(|l| l == "RSET"), "{:?}", relay.log);
}

#[test]
fn exit_1_to_99_refuses_with_the_first_line_of_output() {
    let (out, relay) = session(&["refuse"], 10, MESSAGE);
    assert_eq!(final_reply(&out), "550 5.7.1 No faxes here, thanks");
    assert!(relay.delivered.is_empty());
    let (out, _) = session(&["tempfail"], 10, MESSAGE);
    assert_eq!(final_reply(&out), "451 4.7.1 Try later");
}

#[test]
fn a_slow_or_crashing_handler_defers_the_message() {
    let started = Instant::now();
    let (out, relay) = session(&["slow"], 1, MESSAGE);
    assert_eq!(
        final_reply(&out),
        "451 4.3.0 Local error in processing; try again later"
    );
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(relay.delivered.is_empty());
    let (out, relay) = session(&["crash"], 10, MESSAGE);
    assert_eq!(
        final_reply(&out),
        "451 4.3.0 Local error in processing; try again later"
    );
    assert!(relay.delivered.is_empty());
}

#[test]
fn a_handler_that_reads_nothing_does_not_block_a_large_message() {
    // 3,885 bytes, near the 4,096-byte limit: more than the 256 bytes held in memory.
    let body = format!(
        "{MESSAGE}{}",
        "0123456789abcdefghijklmnopqrstuvwxyz\r\n".repeat(100)
    );
    let (out, relay) = session(&["ignores-input"], 10, &body);
    assert!(
        final_reply(&out).starts_with("250 2.0.0 Ok: queued"),
        "{out}"
    );
    assert_eq!(relay.delivered.len(), 1);
}

#[test]
fn a_replacement_over_the_size_limit_is_refused() {
    let (out, relay) = session(&["huge"], 10, MESSAGE);
    assert_eq!(
        final_reply(&out),
        "552 5.3.4 Message size exceeds fixed maximum message size"
    );
    assert!(relay.delivered.is_empty());
}
