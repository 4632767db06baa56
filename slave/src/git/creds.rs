use std::path::PathBuf;

use git2::{Cred, CredentialType, ErrorCode, ProxyOptions, RemoteCallbacks};

use super::types::*;

pub(super) fn proxy_options() -> ProxyOptions<'static> {
    let mut proxy = ProxyOptions::new();
    // Honours http.proxy and the usual *_proxy environment variables.
    proxy.auto();
    proxy
}

pub(super) fn remote_callbacks(
    creds: &GitCredentials,
    shown_url: &str,
) -> RemoteCallbacks<'static> {
    let mut state = CredentialState::new(creds.clone(), shown_url.to_owned());
    let mut callbacks = RemoteCallbacks::new();
    callbacks.credentials(move |_url, username_from_url, allowed| {
        state.next(username_from_url, allowed)
    });
    callbacks
}

/// One way to authenticate over ssh.
#[derive(Debug)]
pub(super) enum SshCandidate {
    Agent,
    Key {
        private: PathBuf,
        public: Option<PathBuf>,
    },
}

/// Walks through the configured credentials, one per call, because libgit2 calls back again
/// after each rejection.
#[derive(Debug)]
pub(super) struct CredentialState {
    pub(super) creds: GitCredentials,
    pub(super) shown_url: String,
    pub(super) attempts: u32,
    pub(super) ssh: Option<std::vec::IntoIter<SshCandidate>>,
    pub(super) userpass_tried: bool,
    pub(super) default_tried: bool,
}

impl CredentialState {
    pub(super) fn new(creds: GitCredentials, shown_url: String) -> Self {
        CredentialState {
            creds,
            shown_url,
            attempts: 0,
            ssh: None,
            userpass_tried: false,
            default_tried: false,
        }
    }

    pub(super) fn next(
        &mut self,
        username_from_url: Option<&str>,
        allowed: CredentialType,
    ) -> Result<Cred, git2::Error> {
        self.attempts += 1;
        if self.attempts > MAX_CREDENTIAL_ATTEMPTS {
            return Err(self.give_up(&format!(
                "authentication failed after {MAX_CREDENTIAL_ATTEMPTS} attempts"
            )));
        }
        if allowed.contains(CredentialType::USERNAME) {
            return Cred::username(&ssh_username(username_from_url));
        }
        if allowed.contains(CredentialType::SSH_KEY) {
            let user = ssh_username(username_from_url);
            let creds = &self.creds;
            let candidates = self
                .ssh
                .get_or_insert_with(|| ssh_candidates(creds).into_iter());
            if let Some(candidate) = candidates.next() {
                tracing::debug!(url = %self.shown_url, ?candidate, "trying ssh credentials");
                return match candidate {
                    SshCandidate::Agent => Cred::ssh_key_from_agent(&user),
                    SshCandidate::Key { private, public } => Cred::ssh_key(
                        &user,
                        public.as_deref(),
                        &private,
                        self.creds.ssh_key_passphrase.as_deref(),
                    ),
                };
            }
        }
        if allowed.contains(CredentialType::USER_PASS_PLAINTEXT)
            && !self.userpass_tried
            && let Some(token) = &self.creds.https_token
        {
            self.userpass_tried = true;
            let user = self
                .creds
                .https_username
                .as_deref()
                .or(username_from_url)
                .unwrap_or("x-access-token");
            return Cred::userpass_plaintext(user, token);
        }
        if allowed.contains(CredentialType::DEFAULT) && !self.default_tried {
            self.default_tried = true;
            return Cred::default();
        }
        Err(self.give_up("authentication failed: no (more) usable credentials configured"))
    }

    pub(super) fn give_up(&self, what: &str) -> git2::Error {
        git2::Error::new(
            ErrorCode::Auth,
            git2::ErrorClass::Net,
            format!("{what} for {}", self.shown_url),
        )
    }
}

/// The ssh user: the URL's, else the local user (as the `ssh` command would do).
pub(super) fn ssh_username(username_from_url: Option<&str>) -> String {
    username_from_url
        .map(str::to_owned)
        .or_else(|| std::env::var("USER").ok())
        .or_else(|| std::env::var("LOGNAME").ok())
        .unwrap_or_else(|| "git".to_owned())
}

pub(super) fn ssh_candidates(creds: &GitCredentials) -> Vec<SshCandidate> {
    let mut candidates = Vec::new();
    // Without a socket the agent attempt can only fail, and it would use up an attempt.
    if std::env::var_os("SSH_AUTH_SOCK").is_some() {
        candidates.push(SshCandidate::Agent);
    }
    let keys: Vec<PathBuf> = match &creds.ssh_key {
        Some(key) => vec![key.clone()],
        None => std::env::var_os("HOME")
            .map(|home| {
                let ssh_dir = PathBuf::from(home).join(".ssh");
                ["id_ed25519", "id_rsa"]
                    .iter()
                    .map(|name| ssh_dir.join(name))
                    .filter(|p| p.is_file())
                    .collect()
            })
            .unwrap_or_default(),
    };
    for private in keys {
        let mut public = private.clone().into_os_string();
        public.push(".pub");
        let public = PathBuf::from(public);
        candidates.push(SshCandidate::Key {
            public: public.is_file().then_some(public),
            private,
        });
    }
    candidates
}
