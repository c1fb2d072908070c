//! Follows the Mooncake Store master's KV-event stream (`GET /kv_events` on its admin port,
//! long-polled with sequence numbers; see `mooncake_store::server::events`) so blocks resident
//! in the store count as cache hits: the store is a pseudo-instance the prefix can be fetched
//! from.
//!
//! Store keys name blocks by their hash: the key's trailing hexadecimal digits (after its last
//! non-hex character, e.g. `llama@tp0@2d45fcb51d434798`) are the block hash, their low 64 bits
//! taken as with engine digests.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::service::Service;

/// The block hash a store key names, if it ends in hex digits.
pub fn store_key_hash(key: &str) -> Option<u64> {
    let tail = key.bytes().rev().take_while(u8::is_ascii_hexdigit).count();
    if tail == 0 {
        return None;
    }
    let hex = &key[key.len() - tail..];
    let low = &hex[hex.len().saturating_sub(16)..];
    u64::from_str_radix(low, 16).ok()
}

#[derive(Debug, Deserialize)]
struct Poll {
    next: u64,
    #[serde(default)]
    events: Vec<Event>,
    #[serde(default)]
    resync: bool,
    #[serde(default)]
    keys: std::collections::BTreeMap<String, Vec<String>>,
}

#[derive(Debug, Deserialize)]
struct Event {
    kind: String,
    tenant: String,
    keys: Vec<String>,
}

/// Long-polls `base` (the master's admin URL, `http://host:9003`) until the task is aborted.
/// `tenant`: only this tenant's keys (all when `None`); `token`: the admin bearer token when
/// the master has a cluster secret.
pub async fn follow(
    svc: Arc<Service>,
    base: String,
    tenant: Option<String>,
    token: Option<String>,
) {
    let base = base.trim_end_matches('/').to_owned();
    // A cursor past any master's log: the first answer is a full listing.
    let mut since = u64::MAX;
    let mut backoff = Duration::from_millis(50);
    let wanted = |t: &str| tenant.as_deref().is_none_or(|w| w == t);
    loop {
        let url = format!("{base}/kv_events?since={since}&timeout_ms=5000");
        let got = svc
            .http()
            .get_json::<Poll>(&url, token.as_deref(), Duration::from_secs(10))
            .await;
        let poll = match got {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(url, "store events: {e}");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
                continue;
            }
        };
        backoff = Duration::from_millis(50);
        let now = svc.now_s();
        if poll.resync {
            let stored: Vec<u64> = poll
                .keys
                .iter()
                .filter(|(t, _)| wanted(t))
                .flat_map(|(_, k)| k.iter().filter_map(|k| store_key_hash(k)))
                .collect();
            tracing::info!(keys = stored.len(), "store view re-listed");
            svc.with_state(|s| s.apply_store(&stored, &[], true, now));
        } else {
            for e in poll.events.iter().filter(|e| wanted(&e.tenant)) {
                let hashes: Vec<u64> = e.keys.iter().filter_map(|k| store_key_hash(k)).collect();
                if e.kind == "stored" {
                    svc.with_state(|s| s.apply_store(&hashes, &[], false, now));
                } else {
                    svc.with_state(|s| s.apply_store(&[], &hashes, false, now));
                }
            }
        }
        since = poll.next;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_trailing_hex() {
        assert_eq!(
            store_key_hash("m@tp0@2d45fcb51d434798"),
            Some(0x2d45fcb51d434798)
        );
        assert_eq!(store_key_hash("blk_ff"), Some(0xff));
        assert_eq!(
            store_key_hash(&format!("k/{}", "ab".repeat(32))),
            Some(0xabababababababab)
        );
        assert_eq!(store_key_hash("model@"), None);
    }
}
