//! The README's OAuth2 demo: the test authorization server (oidc-provider) with the Dovecot
//! and Postfix that accept its tokens, a seeded mailbox, and the gateway itself in front of
//! them (`pop3` and `smtp` on 127.0.0.1 ports, spawned per connection the way xinetd
//! does, logging in with the OAuth2 account `demo`).
//!
//! `./tests/demo-oauth2` runs this test with `--nocapture` and `LMP_DEMO_WAIT=1`: it prints
//! the walkthrough (authorize the account with `legacy-mail-proxy oauth2 authorize`, approve
//! the sign-in, read mail with `curl pop3://`, send with `swaks`) and keeps everything up
//! until Enter, for the newcomer to type. In the suite it runs those exact printed commands
//! itself, through bash, and checks what they did.

mod common;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Output, Stdio};

use common::{
    CONFIDENTIAL_CLIENT_ID, Inetd, PUBLIC_CLIENT_ID, REDIRECT_URI, SCOPES, curl, oauth2, proxy_bin,
    require_client, servers, wait_for_messages,
};

/// The account name the gateway is configured with and the walkthrough authorizes.
const ACCOUNT: &str = "demo";
/// The user name and password the old clients give the gateway (not the mailbox's).
const CLIENT_USER: &str = "scanner";
const CLIENT_PASSWORD: &str = "gateway-demo";

/// Runs one printed walkthrough command with bash from the repository's root, as the
/// newcomer would.
fn bash(command: &str) -> Command {
    let mut cmd = Command::new("bash");
    cmd.args(["-euo", "pipefail", "-c", command])
        .current_dir(env!("CARGO_MANIFEST_DIR"));
    cmd
}

fn shown(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn demo_oauth2_backend() {
    let w = oauth2();
    let _up = w.idp.shared();
    let s = servers();
    let user = s.new_user("demo");
    user.seed_many(&[
        "From: Alice <alice@example.test>\r\nSubject: Read me with a token\r\n\r\n\
         This mailbox only opens with an OAuth2 access token (or the password).\r\n"
            .as_bytes()
            .to_vec(),
        "From: Bob <bob@example.test>\r\nSubject: Second message\r\n\r\nHello again.\r\n"
            .as_bytes()
            .to_vec(),
    ]);
    let i = &w.idp;
    let ca = i.ca_file.display();
    let issuer = &i.issuer;
    let name = &user.name;
    println!(
        "
=== legacy-mail-proxy OAuth2 demo backend ===

Authorization server (oidc-provider {issuer}), trusted through the CA file
  {ca}
  discovery       {issuer}/.well-known/openid-configuration
  authorization   {auth}
  token           {token}
  device          {device}   (codes are entered at {verify})
  revocation      {revoke}
  public client        {PUBLIC_CLIENT_ID}   (no secret, PKCE, redirect URI {REDIRECT_URI})
  confidential client  {CONFIDENTIAL_CLIENT_ID}   secret file {secret}
                       (client credentials open the mailbox {app} only)
  scopes          {SCOPES}
  access tokens live {ttl} s; a refresh token works once (rotation)
  grant log       {log}

Dovecot accepting its tokens (AUTH=XOAUTH2 AUTH=OAUTHBEARER, and PLAIN):
  IMAPS 127.0.0.1:{imaps}   IMAP+STARTTLS 127.0.0.1:{imap}   POP3 127.0.0.1:{pop3}
Postfix submission, same tokens through Dovecot SASL:
  implicit TLS 127.0.0.1:{smtps}   STARTTLS 127.0.0.1:{smtp}

Mail user {name}, password {password} (sign in with it at the authorization server),
address {email}, 2 messages in INBOX.

A token by hand (device authorization grant):
  curl --cacert {ca} -d client_id={PUBLIC_CLIENT_ID} -d 'scope={SCOPES}' {device}
  # open verification_uri_complete in a browser and sign in as {name}, or:
  LMP_IDP_CA={ca} LMP_IDP_PASSWORD='{password}' python3 tests/oauth2/browser.py device {issuer} USER_CODE {name}
  curl --cacert {ca} -d client_id={PUBLIC_CLIENT_ID} \\
    -d grant_type=urn:ietf:params:oauth:grant-type:device_code -d device_code=DEVICE_CODE {token}
Read the mailbox with the access token:
  curl --cacert {ca} -u {name}: --oauth2-bearer ACCESS_TOKEN 'imaps://127.0.0.1:{imaps}/INBOX;UID=1'

The gateway's backend options for this server:
  pop3: --imap-host 127.0.0.1 --imap-port {imaps} --imap-tls implicit --ca-file {ca}
  smtp: --smtp-host 127.0.0.1 --smtp-port {smtps} --smtp-tls implicit --ca-file {ca}
",
        auth = i.authorization_endpoint,
        token = i.token_endpoint,
        device = i.device_authorization_endpoint,
        verify = i.device_verification_uri,
        revoke = i.revocation_endpoint,
        secret = i.client_secret_file.display(),
        app = w.app_mailbox.name,
        ttl = i.access_ttl,
        log = i.grant_log_file.display(),
        imaps = w.imaps_port,
        imap = w.imap_port,
        pop3 = w.pop3_port,
        smtps = w.postfix.submissions_port,
        smtp = w.postfix.submission_port,
        password = user.password,
        email = user.email,
    );

    // The recipe above, done here: device flow, then curl reads message 1 and sends one.
    let tokens = i.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    let out = curl(&format!(
        "url = \"imaps://127.0.0.1:{}/INBOX;UID=1\"\ncacert = \"{ca}\"\nuser = \"{name}:\"\n\
         oauth2-bearer = \"{}\"\n",
        w.imaps_port,
        tokens.access()
    ));
    let message = String::from_utf8_lossy(&out.stdout);
    assert!(
        message.contains("Subject: Read me with a token"),
        "{message}{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.dovecot_logs()
    );
    let mail = s.dir.join("demo-oauth2-message.eml");
    std::fs::write(&mail, "Subject: sent with a token\r\n\r\nHi.\r\n").unwrap();
    let out = curl(&format!(
        "url = \"smtps://127.0.0.1:{}\"\ncacert = \"{ca}\"\nuser = \"{name}:\"\n\
         oauth2-bearer = \"{}\"\nmail-from = \"{}\"\nmail-rcpt = \"{}\"\nupload-file = \"{}\"\n",
        w.postfix.submissions_port,
        tokens.access(),
        user.email,
        user.email,
        mail.display()
    ));
    assert!(
        out.status.success(),
        "{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        w.postfix.logs()
    );
    wait_for_messages(&user, 3);
    println!(
        "Checked: a device-flow token read message 1 over IMAPS and sent one through submission."
    );
    gateway_walkthrough(&user);
    let log = i.grant_log_text();
    assert!(!log.contains(tokens.access()) && !log.contains(tokens.refresh()));
}

/// The gateway in front of the OAuth2 servers, and the walkthrough through it: printed for
/// the newcomer (`LMP_DEMO_WAIT`), or run here and checked.
fn gateway_walkthrough(user: &common::User) {
    let w = oauth2();
    let s = servers();
    let i = &w.idp;
    let ca = i.ca_file.display().to_string();
    let store = s.dir.join("demo-oauth2-store");
    std::fs::create_dir_all(&store).unwrap();
    let password_file = s.dir.join("demo-client-password");
    std::fs::write(&password_file, format!("{CLIENT_PASSWORD}\n")).unwrap();
    let (store, password_file) = (
        store.display().to_string(),
        password_file.display().to_string(),
    );
    let common_args = |host_option: &str, port_option: &str, port: u16, tls_option: &str| {
        vec![
            host_option.to_string(),
            "127.0.0.1".into(),
            port_option.into(),
            port.to_string(),
            tls_option.into(),
            "implicit".into(),
            "--ca-file".into(),
            ca.clone(),
            "--oauth2-dir".into(),
            store.clone(),
            "--client-user".into(),
            CLIENT_USER.into(),
            "--client-password-file".into(),
            password_file.clone(),
        ]
    };
    let mut pop3_args: Vec<String> = ["--log", "stderr", "pop3", "--imap-oauth2-account", ACCOUNT]
        .map(String::from)
        .into();
    pop3_args.extend(common_args(
        "--imap-host",
        "--imap-port",
        w.imaps_port,
        "--imap-tls",
    ));
    pop3_args.extend(["--lock-dir".into(), s.dir.display().to_string()]);
    let mut smtp_args: Vec<String> = ["--log", "stderr", "smtp", "--smtp-oauth2-account", ACCOUNT]
        .map(String::from)
        .into();
    smtp_args.extend(common_args(
        "--smtp-host",
        "--smtp-port",
        w.postfix.submissions_port,
        "--smtp-tls",
    ));
    smtp_args.extend(["--hostname".into(), "gateway.demo".into()]);
    let pop3 = Inetd::start(proxy_bin(), &pop3_args, &[]);
    let smtp = Inetd::start(proxy_bin(), &smtp_args, &[]);

    let bin = proxy_bin();
    let authorize = format!(
        "{bin} oauth2 authorize --oauth2-dir {store} --provider custom \\\n  \
         --device-url {} --token-url {} \\\n  \
         --scope '{SCOPES}' --ca-file {ca} --client-id {PUBLIC_CLIENT_ID} --user {} {ACCOUNT}",
        i.device_authorization_endpoint, i.token_endpoint, user.name
    );
    let approve = format!(
        "LMP_IDP_CA={ca} LMP_IDP_PASSWORD='{}' \\\n  \
         python3 tests/oauth2/browser.py device {} USER_CODE {}",
        user.password, i.issuer, user.name
    );
    let status = format!("{bin} oauth2 status --oauth2-dir {store} {ACCOUNT}");
    let read = format!(
        "curl -sS --user {CLIENT_USER}:{CLIENT_PASSWORD} pop3://127.0.0.1:{}/1",
        pop3.port
    );
    let send = format!(
        "swaks --server 127.0.0.1:{} --auth-user {CLIENT_USER} --auth-password {CLIENT_PASSWORD} \\\n  \
         --from {email} --to {email} --header 'Subject: sent through the gateway with a token'",
        smtp.port,
        email = user.email
    );
    println!(
        "
=== The gateway in front of them ===

legacy-mail-proxy runs as xinetd would run it, one process per connection, with the
OAuth2 account `{ACCOUNT}` (token store {store}):
  pop3 on 127.0.0.1:{pop3_port}   {pop3_args}
  smtp on 127.0.0.1:{smtp_port}   {smtp_args}
Old clients log in to it as {CLIENT_USER} / {CLIENT_PASSWORD}; its logs are under {logs}.

1. Authorize the account (device flow); it prints a URL and a code, then waits:
{authorize}

2. In another terminal, approve the code as the mail user: open the URL it printed in a
   browser and sign in as {name} / {password}, or script it (put the code it printed in
   place of USER_CODE):
{approve}
   The first terminal then says \"Account {ACCOUNT} authorized\". Check it with:
{status}

3. Read message 1 through the gateway with curl (POP3 in front, IMAPS + OAUTHBEARER behind):
{read}

4. Send through the gateway with swaks (SMTP in front, submission + OAUTHBEARER behind):
{send}
",
        pop3_port = pop3.port,
        smtp_port = smtp.port,
        pop3_args = pop3_args.join(" "),
        smtp_args = smtp_args.join(" "),
        logs = s.dir.join("inetd").display(),
        name = user.name,
        password = user.password,
    );
    if std::env::var_os("LMP_DEMO_WAIT").is_some() {
        println!("The servers run until you press Enter (or Ctrl-C).");
        let _ = std::io::stdin().lock().lines().next();
        return;
    }

    // The walkthrough, typed by the suite. 1 and 2: the device flow, approved by the
    // scripted browser with the code the first command printed.
    let mut authorizing = bash(&authorize)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the authorize command");
    let mut printed = BufReader::new(authorizing.stdout.take().unwrap());
    let mut seen = String::new();
    let code = loop {
        let mut line = String::new();
        if printed.read_line(&mut line).unwrap() == 0 {
            panic!("oauth2 authorize printed no code:\n{seen}");
        }
        seen.push_str(&line);
        if let Some((_, code)) = line.split_once("enter the code ") {
            break code.trim().to_string();
        }
    };
    let out = bash(&approve.replace("USER_CODE", &code)).output().unwrap();
    assert!(out.status.success(), "{}", shown(&out));
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut printed, &mut rest).unwrap();
    let done = authorizing.wait_with_output().unwrap();
    assert!(
        done.status.success() && rest.contains(&format!("Account {ACCOUNT} authorized")),
        "{seen}{rest}{}",
        String::from_utf8_lossy(&done.stderr)
    );
    let out = bash(&status).output().unwrap();
    assert!(out.status.success(), "{}", shown(&out));

    // 3: curl reads message 1 through the gateway.
    require_client("curl");
    let out = bash(&read).output().unwrap();
    assert!(
        out.status.success() && shown(&out).contains("Subject: Read me with a token"),
        "{}\n{}",
        shown(&out),
        pop3.logs()
    );
    // 4: swaks sends one through the gateway; it arrives in the mailbox.
    require_client("swaks");
    let out = bash(&send).output().unwrap();
    assert!(out.status.success(), "{}\n{}", shown(&out), smtp.logs());
    assert!(
        shown(&out).contains("250 2.0.0"),
        "{}\n{}",
        shown(&out),
        smtp.logs()
    );
    wait_for_messages(user, 4);

    // The gateway logged its OAuth2 logins, and never a token.
    let logs = format!("{}{}", pop3.logs(), smtp.logs());
    let stored =
        std::fs::read_to_string(Path::new(&store).join(format!("{ACCOUNT}.json"))).unwrap();
    let stored: serde_json::Value = serde_json::from_str(&stored).unwrap();
    for key in ["access_token", "refresh_token"] {
        let token = stored[key].as_str().expect(key);
        assert!(!logs.contains(token), "the {key} is in the gateway's log");
    }
    println!("Checked: the walkthrough above, run as printed.");
}
