//! The OAuth2 test servers are real and work, shown with real clients (curl, Python,
//! the scripted browser) and no gateway code: the authorization server (oidc-provider)
//! serves each grant, rotates refresh tokens, revokes and introspects; Dovecot accepts its
//! access tokens for IMAP XOAUTH2 and OAUTHBEARER and refuses expired, revoked and wrong
//! ones; Postfix submission accepts them through Dovecot SASL and delivers.

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::{
    CONFIDENTIAL_CLIENT_ID, OAuth2World, PUBLIC_CLIENT_ID, REDIRECT_URI, SCOPES, User, curl,
    json_str, oauth2, python_ok, servers, wait_for_messages, wait_until,
};

const MESSAGE: &str =
    "From: Alice <alice@example.test>\r\nSubject: seen through OAuth2\r\n\r\nHello.\r\n";

/// `curl imaps://…` with a bearer token: lists the mailbox (`LIST "" *`) after
/// AUTHENTICATE OAUTHBEARER with SASL-IR (curl 7.88 always picks OAUTHBEARER when the
/// server offers it, whatever `AUTH=` says; XOAUTH2 is tested with Python). The token goes
/// to curl on stdin, not on its command line.
fn curl_imap(w: &OAuth2World, user: &str, token: &str) -> Output {
    curl(&format!(
        "url = \"imaps://127.0.0.1:{}/\"\ncacert = \"{}\"\nuser = \"{user}:\"\n\
         oauth2-bearer = \"{token}\"\n",
        w.imaps_port,
        w.idp.ca_file.display()
    ))
}

fn assert_ok(out: &Output, what: &str, w: &OAuth2World) {
    assert!(
        out.status.success(),
        "{what} failed ({}): {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr),
        w.dovecot_logs()
    );
}

/// Logs in over IMAP with SASL-IR XOAUTH2, returns the tagged answer (by hand, so that the
/// test sees exactly what the server says).
fn imap_xoauth2_answer(w: &OAuth2World, user: &str, token: &str) -> String {
    let out = python_ok(
        r#"
import base64, imaplib, os, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL("127.0.0.1", int(os.environ["PORT"]), ssl_context=ctx)
blob = "user=%s\x01auth=Bearer %s\x01\x01" % (os.environ["U"], os.environ["T"])
try:
    typ, data = m.authenticate("XOAUTH2", lambda challenge: blob.encode() if not challenge else b"")
    print(typ, data)
except imaplib.IMAP4.error as e:
    print("NO", e)
"#,
        &[
            ("CA", w.idp.ca_file.to_str().unwrap()),
            ("PORT", &w.imaps_port.to_string()),
            ("U", user),
            ("T", token),
        ],
    );
    String::from_utf8_lossy(&out).trim().to_string()
}

/// AUTH XOAUTH2 at the implicit-TLS submission port; returns the final reply ("235 …",
/// "535 …", "454 …").
fn smtp_xoauth2_reply(w: &OAuth2World, user: &str, token: &str) -> String {
    let out = python_ok(
        r#"
import base64, os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = smtplib.SMTP_SSL("127.0.0.1", int(os.environ["PORT"]), context=ctx)
s.ehlo()
blob = "user=%s\x01auth=Bearer %s\x01\x01" % (os.environ["U"], os.environ["T"])
code, text = s.docmd("AUTH", "XOAUTH2 " + base64.b64encode(blob.encode()).decode())
if code == 334:
    code, text = s.docmd("")
print(code, text.decode())
s.close()
"#,
        &[
            ("CA", w.idp.ca_file.to_str().unwrap()),
            ("PORT", &w.postfix.submissions_port.to_string()),
            ("U", user),
            ("T", token),
        ],
    );
    String::from_utf8_lossy(&out).trim().to_string()
}

fn user_with_mail(prefix: &str) -> User {
    let user = servers().new_user(prefix);
    user.seed_many(&[MESSAGE.as_bytes()]);
    user
}

#[test]
fn device_flow_end_to_end_then_imap_xoauth2() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = user_with_mail("device");
    let (status, body) = w.idp.post_form(
        &w.idp.device_authorization_endpoint,
        Some(PUBLIC_CLIENT_ID),
        None,
        &[("scope", SCOPES)],
    );
    assert_eq!(status, 200, "{body}");
    let device_code = json_str(&body, "device_code").unwrap();
    let user_code = json_str(&body, "user_code").unwrap();
    assert_eq!(
        json_str(&body, "verification_uri").as_deref(),
        Some(w.idp.device_verification_uri.as_str())
    );
    let poll = || {
        w.idp.token_request(
            PUBLIC_CLIENT_ID,
            &[
                ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
                ("device_code", &device_code),
            ],
        )
    };
    // Before the approval: the RFC 8628 "keep polling" answer.
    assert_eq!(poll().error.as_deref(), Some("authorization_pending"));
    w.idp.approve_device(&user_code, &user);
    let tokens = poll();
    assert!(tokens.refresh_token.is_some(), "{tokens:?}");
    assert_eq!(tokens.expires_in, Some(w.idp.access_ttl));
    let answer = imap_xoauth2_answer(w, &user.name, tokens.access());
    assert!(answer.starts_with("OK"), "{answer}\n{}", w.dovecot_logs());
    let log = w.dovecot_logs();
    assert!(
        log.contains(&format!("user=<{}>, method=XOAUTH2", user.name)),
        "{log}"
    );
    // The token is the user's: another account name is refused.
    let other = servers().new_user("device-other");
    assert!(imap_xoauth2_answer(w, &other.name, tokens.access()).starts_with("NO"));
    // A device code is used once; a second use counts as a replay and ends the grant
    // (RFC 6749 section 4.1.2 for codes): its access token stops working.
    assert_eq!(poll().error.as_deref(), Some("invalid_grant"));
    assert!(imap_xoauth2_answer(w, &user.name, tokens.access()).starts_with("NO"));
}

#[test]
fn device_flow_denied_by_the_user() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = servers().new_user("deny");
    let (_, body) = w.idp.post_form(
        &w.idp.device_authorization_endpoint,
        Some(PUBLIC_CLIENT_ID),
        None,
        &[("scope", SCOPES)],
    );
    w.idp
        .deny_device(&json_str(&body, "user_code").unwrap(), &user);
    let answer = w.idp.token_request(
        PUBLIC_CLIENT_ID,
        &[
            ("grant_type", "urn:ietf:params:oauth:grant-type:device_code"),
            ("device_code", &json_str(&body, "device_code").unwrap()),
        ],
    );
    assert_eq!(answer.error.as_deref(), Some("access_denied"), "{answer:?}");
}

/// S256 code challenge of `verifier` (RFC 7636), computed by openssl.
fn pkce_challenge(verifier: &str) -> String {
    let out = Command::new("sh")
        .arg("-c")
        .arg(
            "printf %s \"$1\" | openssl dgst -sha256 -binary | base64 -w0 | tr '+/' '-_' | tr -d =",
        )
        .arg("sh")
        .arg(verifier)
        .output()
        .unwrap();
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

fn query_param(url: &str, name: &str) -> Option<String> {
    let query = url.split_once('?')?.1;
    query.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == name).then(|| v.to_string())
    })
}

#[test]
fn authorization_code_with_pkce_end_to_end() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = user_with_mail("authcode");
    let verifier = "a-verifier-of-at-least-43-characters-0123456789abcdef";
    let url = format!(
        "{}?client_id={PUBLIC_CLIENT_ID}&response_type=code&redirect_uri={}&scope={}\
         &state=st4te&code_challenge={}&code_challenge_method=S256",
        w.idp.authorization_endpoint,
        "http%3A%2F%2F127.0.0.1%2Fcallback",
        SCOPES.replace(' ', "%20"),
        pkce_challenge(verifier)
    );
    let redirect = w.idp.approve_authorization(&url, &user);
    assert!(
        redirect.starts_with(&format!("{REDIRECT_URI}?")),
        "{redirect}"
    );
    assert_eq!(query_param(&redirect, "state").as_deref(), Some("st4te"));
    let code = query_param(&redirect, "code").expect("code in the redirect");
    let exchange = |verifier: &str| {
        w.idp.token_request(
            PUBLIC_CLIENT_ID,
            &[
                ("grant_type", "authorization_code"),
                ("code", &code),
                ("redirect_uri", REDIRECT_URI),
                ("code_verifier", verifier),
            ],
        )
    };
    // PKCE is enforced: the wrong verifier is refused (and that burns the code: use the
    // right one first).
    let tokens = exchange(verifier);
    assert!(tokens.refresh_token.is_some(), "{tokens:?}");
    let out = curl_imap(w, &user.name, tokens.access());
    assert_ok(&out, "curl imaps OAUTHBEARER", w);
    assert!(String::from_utf8_lossy(&out.stdout).contains("INBOX"));
    let log = w.dovecot_logs();
    assert!(
        log.contains(&format!("user=<{}>, method=OAUTHBEARER", user.name)),
        "{log}"
    );

    let redirect = w.idp.approve_authorization(&url, &user);
    let code2 = query_param(&redirect, "code").unwrap();
    let wrong = w.idp.token_request(
        PUBLIC_CLIENT_ID,
        &[
            ("grant_type", "authorization_code"),
            ("code", &code2),
            ("redirect_uri", REDIRECT_URI),
            (
                "code_verifier",
                "another-verifier-of-at-least-43-characters-xxxxxxxx",
            ),
        ],
    );
    assert_eq!(wrong.error.as_deref(), Some("invalid_grant"), "{wrong:?}");
    // A public client without PKCE is turned back with an error redirect, not a code.
    let no_pkce = url.split("&code_challenge=").next().unwrap().to_string();
    let redirect = w.idp.approve_authorization(&no_pkce, &user);
    assert_eq!(
        query_param(&redirect, "error").as_deref(),
        Some("invalid_request"),
        "{redirect}"
    );
}

#[test]
fn denied_authorization_redirects_with_access_denied() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = servers().new_user("authdeny");
    let url = format!(
        "{}?client_id={PUBLIC_CLIENT_ID}&response_type=code&redirect_uri=http%3A%2F%2F127.0.0.1%2Fcallback\
         &scope=openid&state=s&code_challenge={}&code_challenge_method=S256",
        w.idp.authorization_endpoint,
        pkce_challenge("a-verifier-of-at-least-43-characters-0123456789abcdef")
    );
    let redirect = w.idp.deny_authorization(&url, &user);
    assert_eq!(
        query_param(&redirect, "error").as_deref(),
        Some("access_denied")
    );
    assert!(query_param(&redirect, "code").is_none());
}

#[test]
fn client_credentials_open_the_app_mailbox_only() {
    let w = oauth2();
    let _up = w.idp.shared();
    let token = w.idp.client_credentials_token();
    assert!(token.refresh_token.is_none(), "{token:?}");
    let out = curl_imap(w, &w.app_mailbox.name, token.access());
    assert_ok(&out, "curl imaps OAUTHBEARER with an app token", w);
    assert!(imap_xoauth2_answer(w, &w.app_mailbox.name, token.access()).starts_with("OK"));
    let other = servers().new_user("not-the-app");
    let out = curl_imap(w, &other.name, token.access());
    assert!(!out.status.success(), "an app token opened another mailbox");
    // The public client has no secret and may not use the grant.
    let refused = w
        .idp
        .token_request(PUBLIC_CLIENT_ID, &[("grant_type", "client_credentials")]);
    assert!(refused.error.is_some(), "{refused:?}");
    // A wrong secret is refused.
    let (status, body) = w.idp.post_form(
        &w.idp.token_endpoint,
        Some(CONFIDENTIAL_CLIENT_ID),
        Some("wrong-secret"),
        &[("grant_type", "client_credentials")],
    );
    assert_eq!(status, 401, "{body}");
    assert_eq!(json_str(&body, "error").as_deref(), Some("invalid_client"));
}

#[test]
fn refresh_rotates_and_the_old_refresh_token_is_refused() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = user_with_mail("rotate");
    for client in [PUBLIC_CLIENT_ID, CONFIDENTIAL_CLIENT_ID] {
        let first = w.idp.device_flow_tokens(client, &user);
        let before = w.idp.token_calls("refresh_token");
        let second = w.idp.refresh(client, first.refresh());
        // Compared without printing: assert_ne! would show the token values.
        assert!(second.refresh() != first.refresh(), "{client}: not rotated");
        assert!(
            second.access() != first.access(),
            "{client}: same access token"
        );
        assert!(
            imap_xoauth2_answer(w, &user.name, second.access()).starts_with("OK"),
            "{client}"
        );
        // The used refresh token is dead (and, as reuse of a rotated token, may end the
        // grant: oidc-provider revokes it).
        let again = w.idp.refresh(client, first.refresh());
        assert_eq!(again.error.as_deref(), Some("invalid_grant"), "{again:?}");
        assert_eq!(w.idp.token_calls("refresh_token"), before + 2);
        // The grant log has the calls, never the tokens.
        let log = w.idp.grant_log_text();
        for t in [
            first.access(),
            first.refresh(),
            second.access(),
            second.refresh(),
        ] {
            assert!(!log.contains(t), "a token value is in the grant log");
        }
    }
}

#[test]
fn expired_access_token_is_refused_by_dovecot() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = user_with_mail("expiry");
    let tokens = w.idp.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    assert!(imap_xoauth2_answer(w, &user.name, tokens.access()).starts_with("OK"));
    // Time has to pass: poll the authorization server until it calls the token expired.
    let ttl = Duration::from_secs(w.idp.access_ttl + 10);
    wait_until("the access token expires", ttl, || {
        !w.idp.is_active(tokens.access())
    });
    let answer = imap_xoauth2_answer(w, &user.name, tokens.access());
    assert!(answer.starts_with("NO [AUTHENTICATIONFAILED]"), "{answer}");
    let reply = smtp_xoauth2_reply(w, &user.name, tokens.access());
    assert!(reply.starts_with("535 5.7.8"), "{reply}");
    let out = curl_imap(w, &user.name, tokens.access());
    assert!(!out.status.success());
    // The refresh token still works, and its new access token is accepted.
    let renewed = w.idp.refresh(PUBLIC_CLIENT_ID, tokens.refresh());
    assert!(imap_xoauth2_answer(w, &user.name, renewed.access()).starts_with("OK"));
}

#[test]
fn revoked_refresh_token_gets_invalid_grant_and_ends_its_access_tokens() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = user_with_mail("revoke");
    let tokens = w.idp.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    assert!(imap_xoauth2_answer(w, &user.name, tokens.access()).starts_with("OK"));
    assert_eq!(w.idp.revoke(PUBLIC_CLIENT_ID, tokens.refresh()), 200);
    let answer = w.idp.refresh(PUBLIC_CLIENT_ID, tokens.refresh());
    assert_eq!(answer.error.as_deref(), Some("invalid_grant"), "{answer:?}");
    assert!(imap_xoauth2_answer(w, &user.name, tokens.access()).starts_with("NO"));
    assert!(
        w.idp
            .grant_log()
            .iter()
            .any(|e| e.endpoint == "revocation" && e.outcome == "ok")
    );
}

#[test]
fn refresh_token_and_garbage_are_not_imap_passwords() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = servers().new_user("notpw");
    let tokens = w.idp.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    // Introspection calls a refresh token active; Dovecot must still refuse it.
    assert!(w.idp.is_active(tokens.refresh()));
    assert!(imap_xoauth2_answer(w, &user.name, tokens.refresh()).starts_with("NO"));
    assert!(imap_xoauth2_answer(w, &user.name, "not-a-token").starts_with("NO"));
    // Passwords still work on the OAuth2 Dovecot (PLAIN is kept).
    let out = curl(&format!(
        "url = \"imaps://127.0.0.1:{}/\"\ncacert = \"{}\"\nuser = \"{}:{}\"\n",
        w.imaps_port,
        w.idp.ca_file.display(),
        user.name,
        user.password
    ));
    assert_ok(&out, "password login", w);
}

#[test]
fn submission_advertises_and_accepts_tokens_and_delivers() {
    let w = oauth2();
    let _up = w.idp.shared();
    let user = servers().new_user("submit");
    let tokens = w.idp.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    // What the submission ports offer after TLS (implicit, and STARTTLS).
    let out = python_ok(
        r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = smtplib.SMTP_SSL("127.0.0.1", int(os.environ["P465"]), context=ctx)
s.ehlo(); print(s.esmtp_features.get("auth", "")); s.quit()
s = smtplib.SMTP("127.0.0.1", int(os.environ["P587"]))
s.starttls(context=ctx); s.ehlo(); print(s.esmtp_features.get("auth", "")); s.quit()
"#,
        &[
            ("CA", w.idp.ca_file.to_str().unwrap()),
            ("P465", &w.postfix.submissions_port.to_string()),
            ("P587", &w.postfix.submission_port.to_string()),
        ],
    );
    let offered = String::from_utf8_lossy(&out);
    for line in offered.lines() {
        for mech in ["XOAUTH2", "OAUTHBEARER", "PLAIN"] {
            assert!(line.split_whitespace().any(|m| m == mech), "{offered}");
        }
    }
    // XOAUTH2 over implicit TLS, with Python's smtplib (SASL-IR: AUTH XOAUTH2 <blob>).
    python_ok(
        r#"
import os, smtplib, ssl
ctx = ssl.create_default_context(cafile=os.environ["CA"])
s = smtplib.SMTP_SSL("127.0.0.1", int(os.environ["P465"]), context=ctx)
blob = "user=%s\x01auth=Bearer %s\x01\x01" % (os.environ["U"], os.environ["T"])
s.auth("XOAUTH2", lambda challenge=None: blob if challenge is None else "")
s.sendmail(os.environ["A"], [os.environ["A"]], open(os.environ["M"], "rb").read())
s.quit()
"#,
        &[
            ("CA", w.idp.ca_file.to_str().unwrap()),
            ("P465", &w.postfix.submissions_port.to_string()),
            ("U", &user.name),
            ("T", tokens.access()),
            ("A", &user.email),
            ("M", write_message("XOAUTH2").to_str().unwrap()),
        ],
    );
    // OAUTHBEARER after STARTTLS, with curl.
    let send = |token: &str, tag: &str| {
        curl(&format!(
            "url = \"smtp://127.0.0.1:{}\"\nssl-reqd\ncacert = \"{}\"\nuser = \"{}:\"\n\
             oauth2-bearer = \"{token}\"\nmail-from = \"{}\"\nmail-rcpt = \"{}\"\n\
             upload-file = \"{}\"\n",
            w.postfix.submission_port,
            w.idp.ca_file.display(),
            user.name,
            user.email,
            user.email,
            write_message(tag).display(),
        ))
    };
    let out = send(tokens.access(), "OAUTHBEARER");
    assert_ok(&out, "curl smtp STARTTLS OAUTHBEARER", w);
    wait_for_messages(&user, 2);
    let log = w.postfix.logs();
    for mech in ["XOAUTH2", "OAUTHBEARER"] {
        let seen = format!("sasl_method={mech}, sasl_username={}", user.name);
        assert!(log.contains(&seen), "{seen} not in\n{log}");
    }
    // A wrong token is refused before MAIL.
    let out = send("wrong", "wrong");
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Login denied"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn write_message(tag: &str) -> std::path::PathBuf {
    let path = servers()
        .dir
        .join(format!("oauth2-message-{tag}-{}.eml", std::process::id()));
    std::fs::write(&path, MESSAGE.replace("seen through", tag)).unwrap();
    path
}

#[test]
fn authorization_server_down_and_back_keeps_its_tokens() {
    let w = oauth2();
    let _alone = w.idp.exclusive();
    let user = user_with_mail("outage");
    let tokens = w.idp.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    w.idp.stop();
    assert!(!w.idp.is_running());
    // Nothing answers: no HTTP status at all.
    let down = w.idp.refresh(PUBLIC_CLIENT_ID, tokens.refresh());
    assert_eq!(down.status, 0, "{down:?}");
    // Dovecot cannot introspect: the login fails even with a good token.
    // Dovecot cannot introspect: IMAP refuses even a good token, as a temporary failure.
    // Postfix 3.7 turns the same Dovecot answer into a plain 535 (not RFC 4954's 454):
    // a gateway cannot tell this outage from a bad token by the SMTP reply alone.
    let answer = imap_xoauth2_answer(w, &user.name, tokens.access());
    assert!(answer.starts_with("NO [UNAVAILABLE]"), "{answer}");
    let reply = smtp_xoauth2_reply(w, &user.name, tokens.access());
    assert!(reply.starts_with("535 5.7.8"), "{reply}");
    w.idp.start();
    // Same port, same state: the refresh token issued before the outage still works.
    let renewed = w.idp.refresh(PUBLIC_CLIENT_ID, tokens.refresh());
    assert!(
        renewed.refresh_token.is_some(),
        "{renewed:?}\n{}",
        w.idp.logs()
    );
    assert!(imap_xoauth2_answer(w, &user.name, renewed.access()).starts_with("OK"));
    // Failed introspections are logged by Dovecot without its secret or the token.
    let secrets = w.secrets();
    let values = [
        tokens.access(),
        tokens.refresh(),
        renewed.access(),
        renewed.refresh(),
    ];
    for needle in values.into_iter().chain(secrets.iter().map(String::as_str)) {
        let hits = w.log_files_containing(needle);
        assert!(hits.is_empty(), "a token or secret is in {hits:?}");
    }
}

#[test]
fn imap_session_outlives_its_access_token() {
    // Dovecot checks a token at login only: a session opened with it goes on after the
    // token expires. (So "expiry during a long session" concerns the gateway's next
    // login, not the open IMAP connection.)
    let w = oauth2();
    let _up = w.idp.shared();
    let user = user_with_mail("long");
    let tokens = w.idp.device_flow_tokens(PUBLIC_CLIENT_ID, &user);
    let flag = servers().dir.join(format!("token-expired-{}", user.name));
    let python = common::require_client("python3");
    let child = Command::new(python)
        .arg("-c")
        .arg(
            r#"
import imaplib, os, ssl, time
ctx = ssl.create_default_context(cafile=os.environ["CA"])
m = imaplib.IMAP4_SSL("127.0.0.1", int(os.environ["PORT"]), ssl_context=ctx)
blob = "user=%s\x01auth=Bearer %s\x01\x01" % (os.environ["U"], os.environ["T"])
print(m.authenticate("XOAUTH2", lambda c: blob.encode() if not c else b"")[0], flush=True)
while not os.path.exists(os.environ["FLAG"]):
    m.noop()
    time.sleep(0.1)
print(m.select("INBOX")[0], m.fetch("1", "(BODY.PEEK[HEADER.FIELDS (SUBJECT)])")[0])
m.logout()
"#,
        )
        .env("CA", &w.idp.ca_file)
        .env("PORT", w.imaps_port.to_string())
        .env("U", &user.name)
        .env("T", tokens.access())
        .env("FLAG", &flag)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    wait_until(
        "the access token expires",
        Duration::from_secs(w.idp.access_ttl + 10),
        || !w.idp.is_active(tokens.access()),
    );
    std::fs::write(&flag, "").unwrap();
    let out = child.wait_with_output().unwrap();
    let said = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        said.trim(),
        "OK\nOK OK",
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // A new login with the same token is refused.
    assert!(imap_xoauth2_answer(w, &user.name, tokens.access()).starts_with("NO"));
}

/// Run by [`oauth2_servers_die_with_the_test_process`] in a child test process.
#[test]
#[ignore = "run as a child process by oauth2_servers_die_with_the_test_process"]
fn child_starts_oauth2_world_and_exits() {
    let w = oauth2();
    println!(
        "LMP-CHILD {} {} {} {}",
        servers().dir.display(),
        w.idp.pid().unwrap(),
        w.dovecot_pid(),
        w.postfix.master_pid()
    );
}

#[test]
fn oauth2_servers_die_with_the_test_process() {
    let line = common::run_child_test("child_starts_oauth2_world_and_exits");
    let f: Vec<&str> = line.split(' ').collect();
    let dir = std::path::Path::new(f[0]);
    let groups: Vec<u32> = f[1..].iter().map(|g| g.parse().unwrap()).collect();
    wait_until(
        "the child's IdP, Dovecot and Postfix are gone with its directory",
        Duration::from_secs(20),
        || {
            groups
                .iter()
                .all(|&g| common::live_process_group_members(g).is_empty())
                && !dir.exists()
        },
    );
}
