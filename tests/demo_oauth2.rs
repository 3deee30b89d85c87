//! The README's OAuth2 demo backend: the test authorization server (oidc-provider) with the
//! Dovecot and Postfix that accept its tokens, a seeded mailbox, and the facts to give the
//! gateway. `./tests/demo-oauth2` runs this test with `--nocapture` and
//! `LMP_DEMO_WAIT=1`: it prints everything, then keeps the servers up until Enter (or
//! Ctrl-C). In the suite it checks that the printed recipe works: a device-flow token read
//! over IMAPS with curl, and a message sent with it through submission.

mod common;

use std::io::BufRead;

use common::{
    CONFIDENTIAL_CLIENT_ID, PUBLIC_CLIENT_ID, REDIRECT_URI, SCOPES, curl, oauth2, servers,
    wait_for_messages,
};

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
    let log = i.grant_log_text();
    assert!(!log.contains(tokens.access()) && !log.contains(tokens.refresh()));
    println!("Grant log so far:\n{log}");
    if std::env::var_os("LMP_DEMO_WAIT").is_some() {
        println!("The servers run until you press Enter (or Ctrl-C).");
        let _ = std::io::stdin().lock().lines().next();
    }
}
