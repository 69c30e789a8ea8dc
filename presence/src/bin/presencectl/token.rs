//! `presencectl token`: an HS256 JWT as the server's verifier reads it
//! (`presence::server::JwtVerifier`): `sub` (the node a write scope may write),
//! `scope` (space-separated), `exp` (required), and `iat`.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use serde::Serialize;

use crate::args::{Scope, TokenArgs};

/// The variable that holds the server's HS256 secret.
pub const SECRET_VAR: &str = "PRESENCE_JWT_SECRET";

/// Why no token was made: always the caller's to fix (exit status 2).
#[derive(Debug)]
pub struct TokenError(pub String);

#[derive(Serialize)]
struct Claims<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    sub: Option<&'a str>,
    scope: String,
    iat: u64,
    exp: u64,
}

/// The token for `args`, signed with `secret`, valid from `now` for `args.ttl`.
pub fn mint(args: &TokenArgs, secret: &str, now: SystemTime) -> Result<String, TokenError> {
    if secret.is_empty() {
        return Err(TokenError(format!("{SECRET_VAR} is empty")));
    }
    if args.scope.contains(&Scope::Write) && args.sub.is_none() {
        return Err(TokenError(
            "--scope write needs --sub NODE: a write token is for one node".to_owned(),
        ));
    }
    if let Some(sub) = &args.sub {
        presence::model::NodeId::parse(sub)
            .map_err(|e| TokenError(format!("--sub {sub:?} is not a node id: {e}")))?;
    }
    let mut scopes: Vec<&str> = args.scope.iter().map(|s| s.claim()).collect();
    scopes.sort_unstable();
    scopes.dedup();
    let iat = now
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_secs();
    let claims = Claims {
        sub: args.sub.as_deref(),
        scope: scopes.join(" "),
        iat,
        exp: iat.saturating_add(args.ttl.as_secs()),
    };
    let key = EncodingKey::from_secret(secret.as_bytes())
        .map_err(|e| TokenError(format!("{SECRET_VAR}: {e}")))?;
    jsonwebtoken::encode(&Header::default(), &claims, &key)
        .map_err(|e| TokenError(format!("cannot sign the token: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;
    use presence::server::JwtVerifier;

    fn args(sub: Option<&str>, scope: &[Scope], ttl: u64) -> TokenArgs {
        TokenArgs {
            sub: sub.map(str::to_owned),
            scope: scope.to_vec(),
            ttl: Duration::from_secs(ttl),
        }
    }

    #[test]
    fn the_server_accepts_what_it_mints() {
        let verifier =
            JwtVerifier::new(Some(b"s3cret"), None).unwrap_or_else(|e| panic!("verifier: {e}"));
        let token = mint(
            &args(Some("n-1"), &[Scope::Write, Scope::Read], 3600),
            "s3cret",
            SystemTime::now(),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let access = verifier
            .verify(&token)
            .unwrap_or_else(|e| panic!("refused: {e}"));
        assert!(access.can_write("n-1") && !access.can_write("n-2") && access.can_read());

        let admin = mint(
            &args(None, &[Scope::Admin], 60),
            "s3cret",
            SystemTime::now(),
        )
        .unwrap_or_else(|e| panic!("{e:?}"));
        let access = verifier
            .verify(&admin)
            .unwrap_or_else(|e| panic!("refused: {e}"));
        assert!(access.can_write("anyone") && access.can_read());
    }

    #[test]
    fn an_old_token_is_expired_and_a_wrong_secret_refused() {
        let verifier =
            JwtVerifier::new(Some(b"s3cret"), None).unwrap_or_else(|e| panic!("verifier: {e}"));
        let long_ago = UNIX_EPOCH + Duration::from_secs(1_000_000);
        let old = mint(&args(None, &[Scope::Read], 60), "s3cret", long_ago)
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(verifier.verify(&old).is_err());
        let other = mint(&args(None, &[Scope::Read], 60), "other", SystemTime::now())
            .unwrap_or_else(|e| panic!("{e:?}"));
        assert!(verifier.verify(&other).is_err());
    }

    #[test]
    fn write_needs_a_valid_sub_and_the_secret_must_not_be_empty() {
        let now = SystemTime::now();
        assert!(mint(&args(None, &[Scope::Write], 60), "s", now).is_err());
        assert!(mint(&args(Some("a b"), &[Scope::Write], 60), "s", now).is_err());
        assert!(mint(&args(Some("n"), &[Scope::Read], 60), "", now).is_err());
    }
}
