//! JWT bearer tokens (`PRESENCE_JWT_SECRET`, `PRESENCE_JWT_PUBLIC_KEY_FILE`): who a
//! token is, and what it may do ([`Access`]).
//!
//! ```
//! use jsonwebtoken::{encode, EncodingKey, Header};
//! use presence::server::{Access, JwtVerifier};
//!
//! let verifier = JwtVerifier::new(Some(b"s3cret"), None).unwrap();
//! let claims = serde_json::json!({"sub": "node-1", "scope": "presence:write", "exp": 4_102_444_800u64});
//! let token = encode(&Header::default(), &claims, &EncodingKey::from_secret(b"s3cret").unwrap()).unwrap();
//! let access = verifier.verify(&token).unwrap();
//! assert!(access.can_write("node-1") && !access.can_write("node-2") && !access.can_read());
//! ```
//!
//! - `exp` is required and `nbf` honoured, both with 30 s of leeway for clock skew.
//! - A token is checked only against the keys of its header's `alg`: an HS256 token
//!   is never checked with a public key as its secret (the "alg confusion" attack),
//!   and `none` is no algorithm at all.
//! - `scope` is space-separated: `presence:read` (list, get, watch), `presence:write`
//!   (login, heartbeat and logout of the node named by `sub` only), `presence:admin`
//!   (everything, any node). Other scopes are ignored.

use std::fmt;

use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde::Deserialize;

/// Seconds of clock skew allowed on `exp` and `nbf`.
pub const JWT_LEEWAY_SECS: u64 = 30;

/// What a request's credentials allow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Access {
    /// Everything: no authentication configured, or the static
    /// `PRESENCE_AUTH_TOKEN`.
    Full,
    /// What a JWT's scopes grant.
    Scoped {
        /// `presence:read`.
        read: bool,
        /// `presence:write`: the node the token is for (`sub`).
        write: Option<String>,
        /// `presence:admin`.
        admin: bool,
    },
}

impl Access {
    /// May list, get and watch nodes.
    pub fn can_read(&self) -> bool {
        match self {
            Access::Full => true,
            Access::Scoped { read, admin, .. } => *read || *admin,
        }
    }

    /// May log `node` in, heartbeat it and log it out.
    pub fn can_write(&self, node: &str) -> bool {
        match self {
            Access::Full => true,
            Access::Scoped { write, admin, .. } => *admin || write.as_deref() == Some(node),
        }
    }
}

#[derive(Deserialize)]
struct Claims {
    #[serde(default)]
    sub: Option<String>,
    #[serde(default)]
    scope: Option<String>,
}

/// One key and the validation for tokens signed with it.
struct Key {
    key: DecodingKey,
    validation: Validation,
}

/// Checks JWTs against the configured keys (see the [module docs](self)).
pub struct JwtVerifier {
    keys: Vec<Key>,
}

impl fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let algorithms: Vec<_> = self
            .keys
            .iter()
            .map(|k| k.validation.algorithms[0])
            .collect();
        f.debug_struct("JwtVerifier")
            .field("algorithms", &algorithms)
            .finish()
    }
}

/// Why a token was refused (for the log; the client only learns `401`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InvalidToken(pub String);

impl fmt::Display for InvalidToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for InvalidToken {}

impl JwtVerifier {
    /// A verifier for HS256 tokens signed with `secret` and/or tokens signed with the
    /// private half of `public_pem` (a PEM public key: Ed25519 for `EdDSA`, or RSA for
    /// `RS256`).
    ///
    /// # Errors
    /// An empty secret, or a PEM that is neither an Ed25519 nor an RSA public key.
    pub fn new(secret: Option<&[u8]>, public_pem: Option<&[u8]>) -> Result<JwtVerifier, String> {
        let mut keys = Vec::new();
        if let Some(secret) = secret {
            if secret.is_empty() {
                return Err("the secret must not be empty".to_owned());
            }
            let key = DecodingKey::from_secret(secret).map_err(|e| e.to_string())?;
            keys.push(Key {
                key,
                validation: validation(Algorithm::HS256),
            });
        }
        if let Some(pem) = public_pem {
            let key = if let Ok(key) = DecodingKey::from_ed_pem(pem) {
                Key {
                    key,
                    validation: validation(Algorithm::EdDSA),
                }
            } else if let Ok(key) = DecodingKey::from_rsa_pem(pem) {
                Key {
                    key,
                    validation: validation(Algorithm::RS256),
                }
            } else {
                return Err(
                    "not a PEM public key of a supported type (Ed25519 for EdDSA, RSA for RS256)"
                        .to_owned(),
                );
            };
            keys.push(key);
        }
        Ok(JwtVerifier { keys })
    }

    /// Whether any key is configured.
    pub fn is_enabled(&self) -> bool {
        !self.keys.is_empty()
    }

    /// What `token` allows.
    ///
    /// # Errors
    /// The token is malformed, expired, not yet valid, signed with an algorithm no
    /// key is for, or its signature does not match.
    pub fn verify(&self, token: &str) -> Result<Access, InvalidToken> {
        let header = jsonwebtoken::decode_header(token)
            .map_err(|e| InvalidToken(format!("malformed token: {e}")))?;
        let key = self
            .keys
            .iter()
            .find(|k| k.validation.algorithms.contains(&header.alg))
            .ok_or_else(|| InvalidToken(format!("no key for algorithm {:?}", header.alg)))?;
        let data = jsonwebtoken::decode::<Claims>(token, &key.key, &key.validation)
            .map_err(|e| InvalidToken(e.to_string()))?;
        let mut read = false;
        let mut write = false;
        let mut admin = false;
        for scope in data
            .claims
            .scope
            .as_deref()
            .unwrap_or("")
            .split_ascii_whitespace()
        {
            match scope {
                "presence:read" => read = true,
                "presence:write" => write = true,
                "presence:admin" => admin = true,
                _ => {}
            }
        }
        Ok(Access::Scoped {
            read,
            write: data.claims.sub.filter(|_| write),
            admin,
        })
    }
}

fn validation(alg: Algorithm) -> Validation {
    let mut v = Validation::new(alg);
    v.leeway = JWT_LEEWAY_SECS;
    v.validate_nbf = true;
    // Tokens for this API carry no audience.
    v.validate_aud = false;
    v
}
