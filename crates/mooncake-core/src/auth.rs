//! The cluster credential: a shared secret every port the project opens can check, by a
//! challenge-response that never sends the secret.
//!
//! A proof is HMAC-SHA256 under the secret over a role tag and a transcript of
//! length-prefixed fields (both sides' nonces, and the names and generations of both
//! peers), so a proof made for one connection, one role or one identity is useless for any
//! other. Comparison is constant-time.
//!
//! The secret comes from `MC_CLUSTER_SECRET_FILE` (a file whose contents, trimmed, are the
//! secret) or `MC_CLUSTER_SECRET` (the secret itself); it must be at least 16 bytes.

use std::sync::Arc;

use hmac::{Hmac, Mac};
use sha2::Sha256;

use crate::error::{Error, ErrorKind, Result};

/// Length of a proof (HMAC-SHA256).
pub const PROOF_LEN: usize = 32;
/// Length of a nonce.
pub const NONCE_LEN: usize = 16;
/// The shortest secret accepted.
pub const MIN_SECRET_LEN: usize = 16;

/// A shared cluster secret.
#[derive(Clone)]
pub struct ClusterSecret {
    key: Arc<[u8]>,
}

impl std::fmt::Debug for ClusterSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClusterSecret").finish_non_exhaustive()
    }
}

impl ClusterSecret {
    /// A secret from raw bytes (at least [`MIN_SECRET_LEN`]).
    pub fn from_bytes(bytes: &[u8]) -> Result<Self> {
        if bytes.len() < MIN_SECRET_LEN {
            return Err(Error::new(
                ErrorKind::Config,
                format!(
                    "the cluster secret has {} bytes; at least {MIN_SECRET_LEN} are required",
                    bytes.len()
                ),
            ));
        }
        Ok(Self { key: bytes.into() })
    }

    /// Reads the secret from `path` (contents trimmed of surrounding whitespace).
    pub fn from_file(path: &str) -> Result<Self> {
        let raw = std::fs::read(path).map_err(|e| {
            Error::new(
                ErrorKind::Config,
                format!("cannot read the cluster secret file {path}: {e}"),
            )
        })?;
        let text = String::from_utf8_lossy(&raw);
        Self::from_bytes(text.trim().as_bytes())
            .map_err(|e| Error::new(ErrorKind::Config, format!("{path}: {}", e.message())))
    }

    /// The secret configured in the environment (`MC_CLUSTER_SECRET_FILE`, else
    /// `MC_CLUSTER_SECRET`), or `None` when neither is set.
    pub fn from_env() -> Result<Option<Self>> {
        if let Ok(path) = std::env::var("MC_CLUSTER_SECRET_FILE")
            && !path.is_empty()
        {
            return Self::from_file(&path).map(Some);
        }
        match std::env::var("MC_CLUSTER_SECRET") {
            Ok(v) if !v.is_empty() => Self::from_bytes(v.trim().as_bytes()).map(Some),
            _ => Ok(None),
        }
    }

    fn mac(&self, role: &[u8], fields: &[&[u8]]) -> Hmac<Sha256> {
        let mut m = <Hmac<Sha256> as Mac>::new_from_slice(&self.key)
            .expect("HMAC takes keys of any length");
        for f in std::iter::once(role).chain(fields.iter().copied()) {
            m.update(&(f.len() as u64).to_le_bytes());
            m.update(f);
        }
        m
    }

    /// The proof of `role` over `fields`.
    pub fn prove(&self, role: &[u8], fields: &[&[u8]]) -> [u8; PROOF_LEN] {
        self.mac(role, fields).finalize().into_bytes().into()
    }

    /// True when `proof` is `role`'s proof over `fields` (constant-time).
    pub fn verify(&self, role: &[u8], fields: &[&[u8]], proof: &[u8]) -> bool {
        self.mac(role, fields).verify_slice(proof).is_ok()
    }

    /// A token derived from the secret for `purpose` (hex), for services that take a bearer
    /// token rather than a challenge-response (the HTTP metadata server).
    pub fn token(&self, purpose: &str) -> String {
        self.prove(b"mooncake-token", &[purpose.as_bytes()])
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect()
    }
}

/// A fresh random nonce.
pub fn nonce() -> [u8; NONCE_LEN] {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).expect("the operating system's random source");
    n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proofs_bind_role_and_every_field() {
        let s = ClusterSecret::from_bytes(b"0123456789abcdef").unwrap();
        let p = s.prove(b"client", &[b"a", b"bc"]);
        assert!(s.verify(b"client", &[b"a", b"bc"], &p));
        assert!(!s.verify(b"server", &[b"a", b"bc"], &p));
        // Length prefixes: moving a byte between fields changes the proof.
        assert!(!s.verify(b"client", &[b"ab", b"c"], &p));
        assert!(!s.verify(b"client", &[b"a", b"bc"], &p[..31]));
        let other = ClusterSecret::from_bytes(b"0123456789abcdeX").unwrap();
        assert!(!other.verify(b"client", &[b"a", b"bc"], &p));
        assert_ne!(nonce(), nonce());
    }

    #[test]
    fn short_secrets_are_refused_and_debug_hides_the_key() {
        assert_eq!(
            ClusterSecret::from_bytes(b"short").unwrap_err().kind(),
            ErrorKind::Config
        );
        let s = ClusterSecret::from_bytes(b"0123456789abcdef").unwrap();
        assert!(!format!("{s:?}").contains("0123"));
        assert_eq!(s.token("metadata").len(), 64);
    }
}
