//! `legacy-mail-proxy oauth2 …`: the admin's commands, run by hand at a terminal (so, unlike
//! `pop3` and `smtp`, they print to stdout and stderr): `authorize` gets an account's first
//! token with the device flow, the authorization code flow with PKCE or client credentials;
//! `status`, `refresh` and `remove` look after the stored accounts.

use super::TokenError;
use super::grant::{self, HttpEndpoint};
use super::provider::{self, Flow, Overrides, Preset};
use super::store::{self, Account, ClientAuth, SecretSource, Store};
use crate::options::{BackendOptions, OAuth2Options};
use anyhow::Context;
use oauth2::{
    AuthUrl, AuthorizationCode, CsrfToken, DeviceAuthorizationUrl, PkceCodeChallenge, RedirectUrl,
    StandardDeviceAuthorizationResponse,
};
use std::io::{BufRead, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Debug, clap::Args)]
pub struct Args {
    #[command(subcommand)]
    pub action: Action,
}

impl Args {
    pub fn backend(&self) -> &BackendOptions {
        &self.common().backend
    }

    fn common(&self) -> &Common {
        match &self.action {
            Action::Authorize(a) => &a.common,
            Action::Status(a) => &a.common,
            Action::Refresh(a) | Action::Remove(a) => &a.common,
        }
    }
}

/// Options every action takes: where the store is, and how to reach the provider (the
/// same CA and timeout options as the mail backends).
#[derive(Debug, clap::Args)]
pub struct Common {
    #[command(flatten)]
    pub backend: BackendOptions,
    #[command(flatten)]
    pub oauth2: OAuth2Options,
}

#[derive(Debug, clap::Subcommand)]
pub enum Action {
    /// Get an account's first token (and store the account).
    Authorize(Box<AuthorizeArgs>),
    /// Show the accounts: user, provider, flow, token expiry, last refresh, last error.
    Status(StatusArgs),
    /// Refresh an account's token now (under the same lock as the gateway's processes).
    Refresh(AccountArgs),
    /// Delete an account and its tokens.
    Remove(AccountArgs),
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Only this account.
    pub account: Option<String>,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, clap::Args)]
pub struct AccountArgs {
    pub account: String,
    #[command(flatten)]
    pub common: Common,
}

#[derive(Debug, clap::Args)]
pub struct AuthorizeArgs {
    /// The account's name in the store (letters, digits, . _ - @).
    pub account: String,

    /// The identity provider.
    #[arg(long, value_enum)]
    pub provider: Preset,

    /// The mailbox's user name at the IMAP/SMTP server, usually its e-mail address.
    #[arg(long, value_name = "EMAIL")]
    pub user: String,

    /// How to get the first token. Default: device for Microsoft and custom, code for
    /// Google (whose device flow cannot grant mail access).
    #[arg(long, value_enum)]
    pub flow: Option<Flow>,

    /// Microsoft tenant: directory id or domain (default `organizations`; client
    /// credentials need the real one).
    #[arg(long)]
    pub tenant: Option<String>,

    /// The application (client) id of the app registration.
    #[arg(long, value_name = "ID")]
    pub client_id: String,

    /// File holding the client secret (read whenever a token is fetched; never stored in
    /// the account).
    #[arg(long, value_name = "FILE", conflicts_with = "client_secret_credential")]
    pub client_secret_file: Option<PathBuf>,

    /// Name of a systemd credential holding the client secret (`LoadCredential=NAME:…`).
    #[arg(long, value_name = "NAME")]
    pub client_secret_credential: Option<String>,

    /// How the secret is sent to the token endpoint.
    #[arg(long, value_enum, default_value = "basic")]
    pub client_auth: ClientAuth,

    /// Scopes to ask for, replacing the provider's defaults (repeat, or separate by
    /// spaces).
    #[arg(long = "scope", value_name = "SCOPE")]
    pub scopes: Vec<String>,

    /// Authorization endpoint (custom provider, or to override a preset).
    #[arg(long, value_name = "URL")]
    pub authorization_url: Option<String>,

    /// Token endpoint (custom provider, or to override a preset).
    #[arg(long, value_name = "URL")]
    pub token_url: Option<String>,

    /// Device authorization endpoint (custom provider, or to override a preset).
    #[arg(long, value_name = "URL")]
    pub device_url: Option<String>,

    /// Redirect URI registered for the app (code flow). The browser is sent there after
    /// the sign-in; nothing needs to listen: copy the address bar.
    #[arg(long, value_name = "URL", default_value = "http://localhost")]
    pub redirect_url: String,

    /// Seconds before expiry at which the token is refreshed.
    #[arg(long, value_name = "SECONDS", default_value_t = store::DEFAULT_REFRESH_MARGIN)]
    pub refresh_margin: u64,

    #[command(flatten)]
    pub common: Common,
}

/// Runs one admin action; errors go to stderr.
pub fn run(args: Args) -> ExitCode {
    let result = match args.action {
        Action::Authorize(a) => authorize(*a),
        Action::Status(a) => status(a),
        Action::Refresh(a) => refresh(a),
        Action::Remove(a) => remove(a),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("legacy-mail-proxy oauth2: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn authorize(args: AuthorizeArgs) -> anyhow::Result<ExitCode> {
    store::check_name(&args.account)?;
    let preset = args.provider;
    let flow = args.flow.unwrap_or(match preset {
        Preset::Google => Flow::Code,
        _ => Flow::Device,
    });
    let client_secret = match (&args.client_secret_file, &args.client_secret_credential) {
        (Some(file), _) => SecretSource::File(std::path::absolute(file)?),
        (None, Some(name)) => SecretSource::Credential(name.clone()),
        (None, None) => SecretSource::None,
    };
    provider::check_flow(preset, flow, client_secret != SecretSource::None)?;
    let endpoints = provider::endpoints(
        preset,
        &Overrides {
            tenant: args.tenant.clone(),
            token_url: args.token_url.clone(),
            device_url: args.device_url.clone(),
            authorization_url: args.authorization_url.clone(),
        },
    )?;
    let scopes: Vec<String> = if args.scopes.is_empty() {
        provider::default_scopes(preset, flow)
    } else {
        args.scopes
            .iter()
            .flat_map(|s| s.split_whitespace())
            .map(str::to_string)
            .collect()
    };
    let mut account = Account {
        provider: endpoints,
        client_id: args.client_id.clone(),
        client_secret,
        client_auth: args.client_auth,
        scopes,
        flow,
        user: args.user.clone(),
        refresh_margin: args.refresh_margin,
        refresh_token: None,
        access_token: None,
        expires_at: None,
        last_refresh: None,
        last_error: None,
        last_error_at: None,
        revoked: false,
    };
    let name = &args.account;
    let endpoint = HttpEndpoint::new(args.common.backend.tls(), args.common.backend.timeouts());
    let grant = match flow {
        Flow::Device => device_flow(name, &account, &endpoint)?,
        Flow::Code => code_flow(name, &account, &endpoint, &args.redirect_url)?,
        Flow::ClientCredentials => {
            use super::store::TokenEndpoint;
            endpoint.renew(name, &account)?
        }
    };
    if flow != Flow::ClientCredentials && grant.refresh_token.is_none() {
        eprintln!(
            "warning: the provider sent no refresh token, so the account stops working when this token expires (Microsoft: ask for offline_access; Google: consent again)"
        );
    }
    account.apply(grant, store::now());
    let store = Store::new(&args.common.oauth2.oauth2_dir);
    store.write(name, &account)?;
    println!(
        "Account {name} authorized for {} ({}); stored in {}.",
        account.user,
        describe_expiry(&account),
        store.path(name).display()
    );
    Ok(ExitCode::SUCCESS)
}

/// RFC 8628: show the code, then poll at the server's interval (oauth2 handles
/// `authorization_pending` and `slow_down`) until approved, denied or expired.
fn device_flow(
    name: &str,
    account: &Account,
    endpoint: &HttpEndpoint,
) -> anyhow::Result<store::Grant> {
    let device_url = account.provider.device_url.clone().context(
        "this provider has no device authorization endpoint: give --device-url or use --flow code",
    )?;
    let client = grant::token_client(name, account)?.set_device_authorization_url(
        DeviceAuthorizationUrl::new(device_url).context("--device-url")?,
    );
    let http = endpoint.http()?;
    let details: StandardDeviceAuthorizationResponse = client
        .exchange_device_code()
        .add_scopes(grant::scopes(account))
        .request(http)
        .map_err(|e| grant::token_error(name, e))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "To sign in as {}, open {} in any browser and enter the code {}",
        account.user,
        details.verification_uri().as_str(),
        details.user_code().secret()
    )?;
    if let Some(complete) = details.verification_uri_complete() {
        writeln!(out, "(or open {})", complete.secret())?;
    }
    writeln!(
        out,
        "Waiting for the approval (the code is valid for {} s)…",
        details.expires_in().as_secs()
    )?;
    out.flush()?;
    drop(out);
    let response = client
        .exchange_device_access_token(&details)
        .request(http, std::thread::sleep, None)
        .map_err(|e| grant::token_error(name, e))?;
    Ok(grant::grant_of(&response))
}

/// RFC 6749 §4.1 with PKCE: print the URL, read the redirect URL back from stdin, check
/// its `state`, exchange the code.
fn code_flow(
    name: &str,
    account: &Account,
    endpoint: &HttpEndpoint,
    redirect_url: &str,
) -> anyhow::Result<store::Grant> {
    let auth_url = account
        .provider
        .authorization_url
        .clone()
        .context("this provider has no authorization endpoint: give --authorization-url")?;
    let client = grant::token_client(name, account)?
        .set_auth_uri(AuthUrl::new(auth_url).context("--authorization-url")?)
        .set_redirect_uri(RedirectUrl::new(redirect_url.to_string()).context("--redirect-url")?);
    let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
    let mut request = client
        .authorize_url(CsrfToken::new_random)
        .add_scopes(grant::scopes(account))
        .set_pkce_challenge(challenge);
    if account.provider.preset == Preset::Google {
        // Google sends a refresh token only for offline access, and only at a consent.
        request = request
            .add_extra_param("access_type", "offline")
            .add_extra_param("prompt", "consent");
    }
    if account.provider.preset == Preset::Microsoft {
        request = request.add_extra_param("login_hint", account.user.clone());
    }
    let (url, state) = request.url();
    println!(
        "Open this URL in a browser and sign in as {}:\n\n{url}\n",
        account.user
    );
    println!(
        "The browser then goes to {redirect_url}… (the page may fail to load: that is fine). Paste that whole address here and press Enter:"
    );
    std::io::stdout().flush()?;
    let mut line = String::new();
    std::io::stdin().lock().read_line(&mut line)?;
    let code = code_from_redirect(line.trim(), state.secret())?;
    let http = endpoint.http()?;
    let response = client
        .exchange_code(AuthorizationCode::new(code))
        .set_pkce_verifier(verifier)
        .request(http)
        .map_err(|e| grant::token_error(name, e))?;
    Ok(grant::grant_of(&response))
}

/// The `code` of a pasted redirect URL, after checking that its `state` is ours (RFC 6749
/// §10.12) and that it carries no `error`.
fn code_from_redirect(pasted: &str, state: &str) -> anyhow::Result<String> {
    let url = oauth2::url::Url::parse(pasted)
        .context("that is not a URL: paste the whole address from the browser's address bar")?;
    let param = |key: &str| {
        url.query_pairs()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.into_owned())
    };
    if let Some(error) = param("error") {
        let description = param("error_description").unwrap_or_default();
        anyhow::bail!("the provider refused the sign-in: {error} {description}");
    }
    anyhow::ensure!(
        param("state").as_deref() == Some(state),
        "the pasted address is not the answer to this sign-in (its state differs): start again"
    );
    param("code").context("the pasted address has no code")
}

fn status(args: StatusArgs) -> anyhow::Result<ExitCode> {
    let store = Store::new(&args.common.oauth2.oauth2_dir);
    let names = match args.account {
        Some(name) => vec![name],
        None => store
            .list()
            .with_context(|| format!("cannot list {}", store.dir().display()))?,
    };
    if names.is_empty() {
        println!("No OAuth2 accounts in {}.", store.dir().display());
    }
    let mut code = ExitCode::SUCCESS;
    for name in names {
        match store.read(&name) {
            Ok(account) => {
                println!("{name}");
                println!("  user:         {}", account.user);
                let tenant = account
                    .provider
                    .tenant
                    .as_ref()
                    .map(|t| format!(" (tenant {t})"))
                    .unwrap_or_default();
                println!(
                    "  provider:     {}{tenant}",
                    clap::ValueEnum::to_possible_value(&account.provider.preset)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default()
                );
                println!("  token URL:    {}", account.provider.token_url);
                println!(
                    "  flow:         {}",
                    clap::ValueEnum::to_possible_value(&account.flow)
                        .map(|v| v.get_name().to_string())
                        .unwrap_or_default()
                );
                println!("  access token: {}", describe_expiry(&account));
                println!(
                    "  refresh token: {}",
                    if account.refresh_token.is_some() {
                        "stored"
                    } else {
                        "none"
                    }
                );
                println!(
                    "  last refresh: {}",
                    account
                        .last_refresh
                        .map(utc)
                        .unwrap_or_else(|| "never".into())
                );
                if let Some(error) = &account.last_error {
                    let at = account.last_error_at.map(utc).unwrap_or_default();
                    println!("  last error:   {at}: {error}");
                    code = ExitCode::FAILURE;
                }
            }
            Err(e) => {
                println!("{name}\n  error:        {e}");
                code = ExitCode::FAILURE;
            }
        }
    }
    Ok(code)
}

fn refresh(args: AccountArgs) -> anyhow::Result<ExitCode> {
    let store = Store::new(&args.common.oauth2.oauth2_dir);
    let backend = &args.common.backend;
    let endpoint = HttpEndpoint::new(backend.tls(), backend.timeouts());
    let timeouts = backend.timeouts();
    let (account, _) = store
        .refresh(
            &args.account,
            &endpoint,
            None,
            true,
            timeouts.connect + timeouts.io + Duration::from_secs(5),
        )
        .map_err(anyhow::Error::from)?;
    println!("{}: {}", args.account, describe_expiry(&account));
    Ok(ExitCode::SUCCESS)
}

fn remove(args: AccountArgs) -> anyhow::Result<ExitCode> {
    let store = Store::new(&args.common.oauth2.oauth2_dir);
    if store.remove(&args.account)? {
        println!(
            "Account {} removed (its grant stays valid at the provider until revoked there).",
            args.account
        );
        Ok(ExitCode::SUCCESS)
    } else {
        Err(TokenError::Broken(format!("no account {:?}", args.account)).into())
    }
}

fn describe_expiry(account: &Account) -> String {
    let now = store::now();
    match (&account.access_token, account.expires_at) {
        (None, _) => "no access token".into(),
        (Some(_), None) => "expiry unknown".into(),
        (Some(_), Some(at)) if at > now => {
            format!("expires {} (in {} s)", utc(at), at - now)
        }
        (Some(_), Some(at)) => format!("expired {} ({} s ago)", utc(at), now - at),
    }
}

/// Unix seconds as `YYYY-MM-DD HH:MM:SS UTC`.
fn utc(seconds: u64) -> String {
    let (year, month, day) = crate::calendar::civil_from_days((seconds / 86_400) as i64);
    let secs = seconds % 86_400;
    format!(
        "{year:04}-{month:02}-{day:02} {:02}:{:02}:{:02} UTC",
        secs / 3600,
        secs % 3600 / 60,
        secs % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats_known_instants() {
        assert_eq!(utc(0), "1970-01-01 00:00:00 UTC");
        assert_eq!(utc(951_782_400), "2000-02-29 00:00:00 UTC");
        assert_eq!(utc(1_798_761_599), "2026-12-31 23:59:59 UTC");
    }

    #[test]
    fn a_pasted_redirect_must_carry_our_state() {
        let ok = code_from_redirect("http://localhost/?code=abc%2Fd&state=S1", "S1").unwrap();
        assert_eq!(ok, "abc/d");
        assert!(code_from_redirect("http://localhost/?code=abc&state=S2", "S1").is_err());
        assert!(code_from_redirect("http://localhost/?code=abc", "S1").is_err());
        assert!(
            code_from_redirect("http://localhost/?error=access_denied&state=S1", "S1").is_err()
        );
        assert!(code_from_redirect("abc", "S1").is_err());
        assert!(code_from_redirect("http://localhost/?state=S1", "S1").is_err());
    }
}
