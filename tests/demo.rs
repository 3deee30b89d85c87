//! The README's demo: a throwaway Dovecot on 127.0.0.1 with a seeded mailbox, and the
//! scripted POP3 dialogue an admin would pipe into the proxy by hand. `./tests/demo`
//! runs this test with `--nocapture` and prints the transcript; in the suite it checks
//! that the dialogue works end to end over implicit TLS.

mod common;

use common::servers;
use std::io::Write;
use std::process::{Command, Stdio};

const DIALOGUE: &[&str] = &["CAPA", "STAT", "LIST", "UIDL", "TOP 1 0", "RETR 1", "QUIT"];

#[test]
fn demo_pop3_dialogue() {
    let s = servers();
    let user = s.new_user("demo");
    user.seed_many(&[
        "From: Alice <alice@example.test>\r\nTo: demo@example.test\r\nSubject: Hello from IMAP\r\n\
         Date: Sun, 22 Nov 2026 09:00:00 +0000\r\nMessage-ID: <demo-1@example.test>\r\n\r\n\
         This message lives on an IMAP server.\r\n.A line starting with a dot is stuffed.\r\n"
            .as_bytes()
            .to_vec(),
        "From: Bob <bob@example.test>\r\nSubject: Grüße\r\n\r\nSecond message, UTF-8 header.\r\n"
            .as_bytes()
            .to_vec(),
    ]);
    let mut script = format!("USER {}\r\nPASS {}\r\n", user.name, user.password);
    for line in DIALOGUE {
        script.push_str(line);
        script.push_str("\r\n");
    }
    let args = vec![
        "--log".to_string(),
        "stderr".into(),
        "pop3".into(),
        "--imap-host".into(),
        s.tls_host.into(),
        "--imap-port".into(),
        s.imaps_port.to_string(),
        "--imap-tls".into(),
        "implicit".into(),
        "--ca-file".into(),
        s.ca_file.display().to_string(),
        "--lock-dir".into(),
        s.dir.join("demo-locks").display().to_string(),
    ];
    let mut child = Command::new(common::proxy_bin())
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the proxy");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(script.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let transcript = String::from_utf8_lossy(&out.stdout);
    let log = String::from_utf8_lossy(&out.stderr);

    println!("\n=== legacy-mail-proxy demo ===");
    println!(
        "Dovecot (throwaway) is serving IMAPS on 127.0.0.1:{}",
        s.imaps_port
    );
    println!("Command (password from the POP3 client, checked by Dovecot):");
    println!(
        "  printf 'USER {}\\r\\nPASS …\\r\\n{}\\r\\n' | legacy-mail-proxy {}",
        user.name,
        DIALOGUE.join("\\r\\n"),
        args.join(" ")
    );
    println!("\n--- client sent ---");
    for line in script.lines() {
        if line.starts_with("PASS ") {
            println!("PASS ********");
        } else {
            println!("{line}");
        }
    }
    println!("\n--- proxy answered on stdout ---\n{transcript}");
    println!("--- proxy log (stderr, because of --log stderr) ---\n{log}");

    assert!(out.status.success(), "{log}");
    assert!(transcript.starts_with("+OK legacy-mail-proxy POP3 ready.\r\n"));
    assert!(transcript.contains("+OK Logged in.\r\n"), "{transcript}");
    assert!(transcript.contains("\r\nTOP\r\nUIDL\r\n"));
    assert!(transcript.contains("..A line starting with a dot is stuffed.\r\n"));
    assert!(transcript.ends_with("+OK Bye.\r\n"));
    assert!(!log.contains(&user.password));
}
