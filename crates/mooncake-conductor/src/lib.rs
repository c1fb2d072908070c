//! The online Conductor (`mooncake conductor`): the KVCache-centric scheduler of
//! `mooncake-scheduler` run as a service in front of real inference servers.
//!
//! # Modules
//!
//! - [`state`]: the sans-IO core: the [`mooncake_scheduler::Conductor`], the instance
//!   registry, request lifecycles, KV and store events, metrics.
//! - [`events`]: vLLM's KV event batches (msgpack, both of its layouts) and sequence tracking.
//! - [`hash`]: vLLM's block hashes of token ids (`sha256` over pickle, `sha256_cbor`).
//! - [`service`]: the HTTP API (axum), health checks, background tasks.
//! - [`zmq`]: the KV event subscriber (ZMQ SUB) with gap recovery through the replay socket.
//! - [`store`]: the follower of the store master's KV-event long poll.
//! - [`proxy`]: the OpenAI-compatible prefill/decode routing proxy.
//!
//! The driver stays thin: decisions, booking and the index live in the sans-IO Conductor; this
//! crate locks it, calls one method and lets go. See `docs/conductor.md`.

#![forbid(unsafe_code)]

pub mod events;
pub mod hash;
pub mod proxy;
pub mod service;
pub mod state;
pub mod store;
pub mod zmq;

pub use service::{RunningService, Service, ServiceConfig, Tokenize, run_blocking, start};
pub use state::{ConductorState, Registration, Role, StateConfig};

/// The text a chat request's messages make for the byte tokenizer: `role: content` lines. The
/// engine simulator (`tiny-vllm`) uses the same template, so `Tokenize::Bytes` matches it.
pub fn chat_text(messages: &serde_json::Value) -> String {
    let mut s = String::new();
    for m in messages.as_array().into_iter().flatten() {
        let role = m.get("role").and_then(|r| r.as_str()).unwrap_or("user");
        let content = match m.get("content") {
            Some(serde_json::Value::String(c)) => c.clone(),
            Some(serde_json::Value::Array(parts)) => parts
                .iter()
                .filter_map(|p| p.get("text").and_then(|t| t.as_str()))
                .collect(),
            _ => String::new(),
        };
        s.push_str(role);
        s.push_str(": ");
        s.push_str(&content);
        s.push('\n');
    }
    s
}
