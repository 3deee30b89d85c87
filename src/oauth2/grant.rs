//! The OAuth 2.0 grants, made with the `oauth2` crate over [`super::http::Client`]: refresh
//! (RFC 6749 §6), client credentials (§4.4), device authorization (RFC 8628) and
//! authorization code with PKCE (§4.1, RFC 7636). Also the mapping of their failures onto
//! [`TokenError`]: `invalid_grant` means the admin must authorize again, a network failure
//! or a 5xx may pass by itself, a refused client is a configuration error.

use super::TokenError;
use super::http::{Client, HttpError};
use super::store::{Account, ClientAuth, Grant, SecretSource, TokenEndpoint};
use crate::net::Timeouts;
use crate::tls::TlsOptions;
use oauth2::basic::{BasicClient, BasicErrorResponseType, BasicTokenResponse};
use oauth2::{
    AuthType, ClientId, ClientSecret, EndpointNotSet, EndpointSet, ErrorResponse, RefreshToken,
    RequestTokenError, Scope, TokenResponse, TokenUrl,
};
use std::cell::OnceCell;

/// A client with only its token endpoint set; the interactive flows add theirs.
pub type TokenClient =
    BasicClient<EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointNotSet, EndpointSet>;

/// Reads the client secret from where the account says, each time it is needed (a rotated
/// secret file takes effect without touching the account).
pub fn client_secret(name: &str, account: &Account) -> Result<Option<String>, TokenError> {
    let broken = |what: String| {
        TokenError::Broken(format!(
            "{what}; fix it or run `legacy-mail-proxy oauth2 authorize {name} …` with another secret source"
        ))
    };
    match &account.client_secret {
        SecretSource::None => Ok(None),
        SecretSource::File(path) => crate::secret::load(Some(path), &[], "")
            .map_err(|e| broken(format!("client secret: {e:#}"))),
        SecretSource::Credential(credential) => match crate::secret::load(None, &[], credential) {
            Ok(Some(secret)) => Ok(Some(secret)),
            Ok(None) => Err(broken(format!(
                "client secret: no systemd credential {credential:?} (LoadCredential= in the unit, $CREDENTIALS_DIRECTORY)"
            ))),
            Err(e) => Err(broken(format!("client secret: {e:#}"))),
        },
    }
}

/// The oauth2 client for `account`, with its secret loaded.
pub fn token_client(name: &str, account: &Account) -> Result<TokenClient, TokenError> {
    let token_url = TokenUrl::new(account.provider.token_url.clone()).map_err(|e| {
        TokenError::Broken(format!(
            "token URL {:?} of account {name:?}: {e}",
            account.provider.token_url
        ))
    })?;
    let mut client = BasicClient::new(ClientId::new(account.client_id.clone()))
        .set_token_uri(token_url)
        .set_auth_type(match account.client_auth {
            ClientAuth::Basic => AuthType::BasicAuth,
            ClientAuth::Post => AuthType::RequestBody,
        });
    if let Some(secret) = client_secret(name, account)? {
        client = client.set_client_secret(ClientSecret::new(secret));
    }
    Ok(client)
}

pub fn scopes(account: &Account) -> impl Iterator<Item = Scope> + '_ {
    account.scopes.iter().map(|s| Scope::new(s.clone()))
}

/// A token response as stored.
pub fn grant_of(response: &BasicTokenResponse) -> Grant {
    Grant {
        access_token: response.access_token().secret().clone(),
        expires_in: response.expires_in(),
        refresh_token: response.refresh_token().map(|t| t.secret().clone()),
    }
}

/// What a failed token request means for the account. Never includes the response body,
/// which could hold a token.
pub fn token_error<T>(name: &str, error: RequestTokenError<HttpError, T>) -> TokenError
where
    T: ErrorResponse + ServerError,
{
    match error {
        RequestTokenError::ServerResponse(response) => response.token_error(name),
        RequestTokenError::Request(e) => TokenError::Unavailable(e.to_string()),
        RequestTokenError::Parse(e, _body) => TokenError::Unavailable(format!(
            "the token endpoint's answer is not a token response ({})",
            e.path()
        )),
        RequestTokenError::Other(e) => TokenError::Unavailable(e),
    }
}

/// An OAuth error response (`{"error": …, "error_description": …}`) as a [`TokenError`].
pub trait ServerError {
    fn token_error(&self, name: &str) -> TokenError;
}

/// The provider's own words, shortened: they help the admin, and a description is never
/// a token.
fn described(code: &str, description: Option<&String>) -> String {
    match description {
        Some(text) => {
            let text: String = text.chars().take(300).collect();
            format!("{code}: {}", text.trim())
        }
        None => code.to_string(),
    }
}

impl ServerError for oauth2::basic::BasicErrorResponse {
    fn token_error(&self, name: &str) -> TokenError {
        let what = described(self.error().as_ref(), self.error_description());
        match self.error() {
            BasicErrorResponseType::InvalidGrant => TokenError::Revoked(format!(
                "the provider refused the grant ({what}): run `legacy-mail-proxy oauth2 authorize {name} …` again"
            )),
            BasicErrorResponseType::InvalidClient | BasicErrorResponseType::UnauthorizedClient => {
                TokenError::Broken(format!(
                    "the provider refused the client ({what}): check the client id, the client secret and the app registration of account {name:?}"
                ))
            }
            BasicErrorResponseType::Extension(code)
                if code == "temporarily_unavailable" || code == "server_error" =>
            {
                TokenError::Unavailable(what)
            }
            _ => TokenError::Broken(format!(
                "the provider refused the request ({what}): check the scopes and the app registration of account {name:?}"
            )),
        }
    }
}

impl ServerError for oauth2::DeviceCodeErrorResponse {
    fn token_error(&self, name: &str) -> TokenError {
        use oauth2::DeviceCodeErrorResponseType as T;
        let what = described(self.error().as_ref(), self.error_description());
        match self.error() {
            T::AccessDenied => TokenError::Revoked(format!("the sign-in was declined ({what})")),
            T::ExpiredToken => TokenError::Revoked(format!(
                "the code expired before it was approved ({what}): run `legacy-mail-proxy oauth2 authorize {name} …` again"
            )),
            T::Basic(basic) => oauth2::basic::BasicErrorResponse::new(
                basic.clone(),
                self.error_description().cloned(),
                None,
            )
            .token_error(name),
            _ => TokenError::Broken(what),
        }
    }
}

/// The real token endpoint: HTTP, built on first use.
pub struct HttpEndpoint {
    tls: TlsOptions,
    timeouts: Timeouts,
    client: OnceCell<Client>,
}

impl HttpEndpoint {
    pub fn new(tls: TlsOptions, timeouts: Timeouts) -> HttpEndpoint {
        HttpEndpoint {
            tls,
            timeouts,
            client: OnceCell::new(),
        }
    }

    pub fn http(&self) -> Result<&Client, TokenError> {
        if let Some(client) = self.client.get() {
            return Ok(client);
        }
        let client = Client::new(&self.tls, self.timeouts)
            .map_err(|e| TokenError::Broken(format!("TLS settings: {e:#}")))?;
        Ok(self.client.get_or_init(|| client))
    }
}

impl TokenEndpoint for HttpEndpoint {
    fn renew(&self, name: &str, account: &Account) -> Result<Grant, TokenError> {
        let client = token_client(name, account)?;
        let http = self.http()?;
        let response = match (&account.flow, &account.refresh_token) {
            (super::provider::Flow::ClientCredentials, _) => client
                .exchange_client_credentials()
                .add_scopes(scopes(account))
                .request(http),
            (_, Some(refresh)) => client
                .exchange_refresh_token(&RefreshToken::new(refresh.0.clone()))
                .request(http),
            (_, None) => {
                return Err(TokenError::Revoked(format!(
                    "account {name:?} has no refresh token (was offline_access asked for?): run `legacy-mail-proxy oauth2 authorize {name} …` again"
                )));
            }
        };
        response
            .map(|r| grant_of(&r))
            .map_err(|e| token_error(name, e))
    }
}
