//! Identity-provider presets: the endpoints and scopes that Microsoft 365 and Google expect
//! for IMAP and SMTP, and a `custom` provider with explicit endpoints.
//!
//! Microsoft identity platform v2.0: `https://login.microsoftonline.com/{tenant}/oauth2/v2.0/`
//! `devicecode`, `authorize` and `token`; delegated scopes for IMAP and SMTP AUTH, app-only
//! scope `https://outlook.office365.com/.default`. Google: one scope for IMAP and SMTP
//! (`https://mail.google.com/`), which its device flow does not grant, so Google accounts
//! use the authorization code flow with PKCE.

use serde::{Deserialize, Serialize};

/// The preset an account was authorized with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Preset {
    /// Microsoft 365 / Exchange Online (Entra ID).
    Microsoft,
    /// Google Workspace and Gmail.
    Google,
    /// Any standard OAuth 2.0 server, with explicit endpoints.
    Custom,
}

/// How the first token is obtained (and, for client credentials, every later one).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Flow {
    /// Device authorization grant (RFC 8628): a code typed into any browser.
    Device,
    /// Authorization code with PKCE (RFC 7636): the admin pastes back the redirect URL.
    Code,
    /// Client credentials (app-only): no user, no refresh token.
    ClientCredentials,
}

/// The endpoints of one account's provider, resolved when the account was authorized so
/// that later processes need no preset logic.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoints {
    pub preset: Preset,
    /// Microsoft's tenant (directory id, domain, `organizations` or `common`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub token_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization_url: Option<String>,
}

/// Microsoft's default tenant: any work or school account (device and code flows). Client
/// credentials need the real tenant id or domain.
pub const MICROSOFT_DEFAULT_TENANT: &str = "organizations";

/// Delegated scopes for Exchange Online IMAP and SMTP AUTH; `offline_access` asks for a
/// refresh token.
pub const MICROSOFT_DELEGATED_SCOPES: &[&str] = &[
    "https://outlook.office.com/IMAP.AccessAsUser.All",
    "https://outlook.office.com/SMTP.Send",
    "offline_access",
];

/// App-only: the permissions granted to the app registration (IMAP.AccessAsApp,
/// SMTP.SendAsApp) are all in the token.
pub const MICROSOFT_APP_SCOPES: &[&str] = &["https://outlook.office365.com/.default"];

/// Full IMAP and SMTP access to Gmail.
pub const GOOGLE_SCOPES: &[&str] = &["https://mail.google.com/"];

/// Explicit endpoints given on the command line, which override a preset's.
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub tenant: Option<String>,
    pub token_url: Option<String>,
    pub device_url: Option<String>,
    pub authorization_url: Option<String>,
}

/// The endpoints for `preset`, with `overrides` applied.
pub fn endpoints(preset: Preset, overrides: &Overrides) -> anyhow::Result<Endpoints> {
    let mut resolved = match preset {
        Preset::Microsoft => {
            let tenant = overrides
                .tenant
                .clone()
                .unwrap_or_else(|| MICROSOFT_DEFAULT_TENANT.to_string());
            anyhow::ensure!(
                !tenant.is_empty()
                    && tenant
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"-._".contains(&b)),
                "--tenant {tenant:?} is not a tenant id or domain"
            );
            let base = format!("https://login.microsoftonline.com/{tenant}/oauth2/v2.0");
            Endpoints {
                preset,
                token_url: format!("{base}/token"),
                device_url: Some(format!("{base}/devicecode")),
                authorization_url: Some(format!("{base}/authorize")),
                tenant: Some(tenant),
            }
        }
        Preset::Google => {
            anyhow::ensure!(overrides.tenant.is_none(), "--tenant is for Microsoft only");
            Endpoints {
                preset,
                tenant: None,
                token_url: "https://oauth2.googleapis.com/token".into(),
                device_url: Some("https://oauth2.googleapis.com/device/code".into()),
                authorization_url: Some("https://accounts.google.com/o/oauth2/v2/auth".into()),
            }
        }
        Preset::Custom => Endpoints {
            preset,
            tenant: overrides.tenant.clone(),
            token_url: overrides
                .token_url
                .clone()
                .ok_or_else(|| anyhow::anyhow!("--provider custom needs --token-url"))?,
            device_url: None,
            authorization_url: None,
        },
    };
    if let Some(url) = &overrides.token_url {
        resolved.token_url = url.clone();
    }
    if overrides.device_url.is_some() {
        resolved.device_url = overrides.device_url.clone();
    }
    if overrides.authorization_url.is_some() {
        resolved.authorization_url = overrides.authorization_url.clone();
    }
    Ok(resolved)
}

/// The scopes a preset asks for when none are given.
pub fn default_scopes(preset: Preset, flow: Flow) -> Vec<String> {
    let scopes: &[&str] = match (preset, flow) {
        (Preset::Microsoft, Flow::ClientCredentials) => MICROSOFT_APP_SCOPES,
        (Preset::Microsoft, _) => MICROSOFT_DELEGATED_SCOPES,
        (Preset::Google, _) => GOOGLE_SCOPES,
        (Preset::Custom, _) => &[],
    };
    scopes.iter().map(|s| s.to_string()).collect()
}

/// Combinations the provider is known to refuse, caught before the admin opens a browser.
pub fn check_flow(preset: Preset, flow: Flow, has_secret: bool) -> anyhow::Result<()> {
    match (preset, flow) {
        (Preset::Google, Flow::Device) => anyhow::bail!(
            "Google's device flow does not grant the mail scope: use --flow code (a Desktop app client)"
        ),
        (Preset::Google, Flow::ClientCredentials) => {
            anyhow::bail!("Google has no client credentials grant for Gmail: use --flow code")
        }
        (Preset::Google, Flow::Code) if !has_secret => anyhow::bail!(
            "Google needs the client secret even for Desktop apps: give --client-secret-file or --client-secret-credential"
        ),
        (_, Flow::ClientCredentials) if !has_secret => anyhow::bail!(
            "--flow client-credentials needs --client-secret-file or --client-secret-credential"
        ),
        _ => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn microsoft_endpoints_carry_the_tenant() {
        let e = endpoints(Preset::Microsoft, &Overrides::default()).unwrap();
        assert_eq!(
            e.token_url,
            "https://login.microsoftonline.com/organizations/oauth2/v2.0/token"
        );
        assert_eq!(
            e.device_url.as_deref(),
            Some("https://login.microsoftonline.com/organizations/oauth2/v2.0/devicecode")
        );
        let e = endpoints(
            Preset::Microsoft,
            &Overrides {
                tenant: Some("contoso.onmicrosoft.com".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(
            e.authorization_url.as_deref(),
            Some("https://login.microsoftonline.com/contoso.onmicrosoft.com/oauth2/v2.0/authorize")
        );
        let bad = Overrides {
            tenant: Some("x/../y".into()),
            ..Default::default()
        };
        assert!(endpoints(Preset::Microsoft, &bad).is_err());
    }

    #[test]
    fn custom_needs_a_token_url_and_overrides_win() {
        assert!(endpoints(Preset::Custom, &Overrides::default()).is_err());
        let e = endpoints(
            Preset::Custom,
            &Overrides {
                token_url: Some("https://idp/token".into()),
                device_url: Some("https://idp/device".into()),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(e.token_url, "https://idp/token");
        assert_eq!(e.device_url.as_deref(), Some("https://idp/device"));
        assert_eq!(e.authorization_url, None);
    }

    #[test]
    fn scopes_and_refused_flows() {
        assert_eq!(
            default_scopes(Preset::Microsoft, Flow::ClientCredentials),
            ["https://outlook.office365.com/.default"]
        );
        assert!(default_scopes(Preset::Microsoft, Flow::Device).contains(&"offline_access".into()));
        assert!(check_flow(Preset::Google, Flow::Device, true).is_err());
        assert!(check_flow(Preset::Google, Flow::Code, false).is_err());
        assert!(check_flow(Preset::Google, Flow::Code, true).is_ok());
        assert!(check_flow(Preset::Microsoft, Flow::ClientCredentials, false).is_err());
        assert!(check_flow(Preset::Microsoft, Flow::Device, false).is_ok());
    }
}
