//! Credentials of the metadata services.
//!
//! - The HTTP metadata server takes a bearer token. By default it is derived from the cluster
//!   secret (`ClusterSecret::token("metadata")`), so every node that holds the secret
//!   (`MC_CLUSTER_SECRET_FILE` or `MC_CLUSTER_SECRET`) holds the token too;
//!   `MC_METADATA_TOKEN` sets one explicitly (for clients of a server started with
//!   `--token-file`).
//! - The P2P handshake port authenticates peers with the cluster secret itself, by a
//!   challenge-response (see [`crate::p2p`]).

use mooncake_core::{ClusterSecret, Error, ErrorKind, Result};

/// The purpose the HTTP metadata token is derived for (`ClusterSecret::token(TOKEN_PURPOSE)`).
pub const TOKEN_PURPOSE: &str = "metadata";

/// The shortest token accepted.
pub const MIN_TOKEN_LEN: usize = 16;

/// The token of the HTTP metadata service derived from `secret`.
pub fn metadata_token(secret: &ClusterSecret) -> String {
    secret.token(TOKEN_PURPOSE)
}

/// The HTTP metadata token the environment configures: `MC_METADATA_TOKEN` when set, else
/// the one derived from the cluster secret (`MC_CLUSTER_SECRET_FILE`, `MC_CLUSTER_SECRET`),
/// else `None`.
pub fn metadata_token_from_env() -> Result<Option<String>> {
    if let Ok(t) = std::env::var("MC_METADATA_TOKEN")
        && !t.trim().is_empty()
    {
        let t = t.trim().to_string();
        check_token(&t)?;
        return Ok(Some(t));
    }
    Ok(ClusterSecret::from_env()?.map(|s| metadata_token(&s)))
}

/// Reads a token from a file (contents trimmed), as `mooncake metadata-server --token-file`
/// does.
pub fn token_from_file(path: &str) -> Result<String> {
    let raw = std::fs::read_to_string(path).map_err(|e| {
        Error::new(
            ErrorKind::Config,
            format!("cannot read the token file {path}: {e}"),
        )
    })?;
    let t = raw.trim().to_string();
    check_token(&t)
        .map_err(|e| Error::new(ErrorKind::Config, format!("{path}: {}", e.message())))?;
    Ok(t)
}

/// Checks that a token is usable in an `Authorization` header and long enough.
pub fn check_token(t: &str) -> Result<()> {
    if t.len() < MIN_TOKEN_LEN {
        return Err(Error::new(
            ErrorKind::Config,
            format!(
                "the metadata token has {} characters; at least {MIN_TOKEN_LEN} are required",
                t.len()
            ),
        ));
    }
    if !t.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(Error::new(
            ErrorKind::Config,
            "the metadata token must be printable ASCII without spaces",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_checked() {
        assert!(check_token("short").is_err());
        assert!(check_token("sixteen chars!!!").is_err());
        assert!(check_token("0123456789abcdef").is_ok());
        let s = ClusterSecret::from_bytes(b"0123456789abcdef").unwrap();
        let t = metadata_token(&s);
        assert!(check_token(&t).is_ok());
        assert_ne!(
            t,
            ClusterSecret::from_bytes(b"0123456789abcdeX")
                .unwrap()
                .token(TOKEN_PURPOSE)
        );
    }
}
