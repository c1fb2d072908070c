//! The OpenAI-compatible routing proxy for prefill/decode disaggregation, in the shape of
//! vLLM's disaggregated-serving proxies (`examples/online_serving/disaggregated_serving/`):
//!
//! 1. the prompt's token ids (from an instance's `POST /tokenize`, or given as ids) become
//!    block hashes, and the Conductor picks a prefill and a decode instance (or refuses: 429
//!    with the reason);
//! 2. the prefill instance gets the request with `max_tokens = 1`, `stream = false` and
//!    `kv_transfer_params = {"do_remote_decode": true, "do_remote_prefill": false, …}`;
//! 3. the decode instance gets the original request with the `kv_transfer_params` the prefill
//!    answered (`do_remote_prefill`, `remote_engine_id`, `remote_host`, `remote_port`,
//!    `remote_block_ids`, …), and its answer is streamed back.
//!
//! # Failures
//!
//! A hop that cannot connect, times out or answers 5xx marks its instance down (the health
//! checker brings it back) and the request starts over on the instances left, up to
//! `max_attempts`; the Conductor is told the first attempt was dropped. A decode answer is
//! committed to the client only once its first bytes arrived: after that the request is
//! never sent again (a decode that dies mid-stream ends the client's stream), so a completed
//! or partly delivered decode is never duplicated. 4xx answers are passed through.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::BodyExt;
use hyper::body::Incoming;
use serde_json::{Value, json};

use crate::service::{HopError, Service, Tokenize};
use crate::state::{Lifecycle, RejectReason, ScheduleInput};

fn error(status: u16, kind: &str, message: String, reason: Option<&RejectReason>) -> Response {
    let mut e = json!({"error": {"message": message, "type": kind, "code": status}});
    if let Some(r) = reason {
        e["error"]["reason"] = serde_json::to_value(r).unwrap_or(Value::Null);
    }
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        axum::Json(e),
    )
        .into_response()
}

fn passthrough(status: u16, body: Bytes) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_GATEWAY),
        [(header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response()
}

/// The prompt's token ids, when they can be had.
async fn tokenize(svc: &Service, path: &str, req: &Value) -> Option<Vec<u32>> {
    let ids = |v: &Value| -> Option<Vec<u32>> {
        v.as_array()?
            .iter()
            .map(|t| t.as_u64().map(|t| t as u32))
            .collect()
    };
    if let Some(p) = req.get("prompt") {
        // Token ids given (one prompt, or the first of a batch).
        if let Some(t) = ids(p).or_else(|| p.as_array()?.first().and_then(ids)) {
            return Some(t);
        }
    }
    let chat = path.ends_with("chat/completions");
    let (prompt, messages) = if chat {
        (None, req.get("messages").cloned())
    } else {
        let p = req.get("prompt")?;
        let s = p
            .as_str()
            .or_else(|| p.as_array()?.first()?.as_str())?
            .to_owned();
        (Some(s), None)
    };
    match svc.config().tokenize {
        Tokenize::Bytes => {
            let text = match (&prompt, &messages) {
                (Some(p), _) => p.clone(),
                (None, Some(m)) => crate::chat_text(m),
                _ => return None,
            };
            Some(text.bytes().map(u32::from).collect())
        }
        Tokenize::Remote => {
            let url = svc.with_state(|s| {
                s.instances()
                    .filter(|i| i.healthy && i.prefill_slot.is_some())
                    .find_map(|i| i.reg.url.clone())
            })?;
            let mut body = json!({"model": req.get("model").cloned().unwrap_or(Value::Null)});
            match (prompt, messages) {
                (Some(p), _) => body["prompt"] = Value::String(p),
                (None, Some(m)) => body["messages"] = m,
                _ => return None,
            }
            let got = svc
                .http()
                .call(
                    hyper::Method::POST,
                    &format!("{}/tokenize", url.trim_end_matches('/')),
                    Some(Bytes::from(body.to_string())),
                    None,
                    svc.config().hop_timeout,
                )
                .await
                .ok()?;
            let v: Value = serde_json::from_slice(&got).ok()?;
            ids(v.get("tokens")?)
        }
    }
}

/// Marks `name` down, drops request `id` and counts `what`.
fn failed(svc: &Service, name: &str, id: u64, what: &'static str, e: &HopError) {
    tracing::warn!(instance = name, request = id, "{what}: {e}");
    let now = svc.now_s();
    svc.with_state(|s| {
        s.set_healthy(name, false);
        s.lifecycle(id, Lifecycle::Dropped, now);
        s.count_proxy(what);
    });
}

fn report(svc: &Service, id: u64, ev: Lifecycle) {
    let now = svc.now_s();
    svc.with_state(|s| s.lifecycle(id, ev, now));
}

/// `POST /v1/completions` and `/v1/chat/completions`.
pub(crate) async fn handle(
    State(svc): State<Arc<Service>>,
    path: &'static str,
    body: Bytes,
) -> Response {
    let req: Value = match serde_json::from_slice(&body) {
        Ok(v @ Value::Object(_)) => v,
        _ => {
            return error(
                400,
                "invalid_request_error",
                "body must be a JSON object".into(),
                None,
            );
        }
    };
    let stream = req.get("stream").and_then(Value::as_bool).unwrap_or(false);
    let max_tokens = req
        .get("max_tokens")
        .or_else(|| req.get("max_completion_tokens"))
        .and_then(Value::as_u64)
        .map(|m| m.min(u64::from(u32::MAX)) as u32);
    let token_ids = tokenize(&svc, path, &req).await;
    let input = ScheduleInput {
        input_tokens: match &token_ids {
            Some(_) => None,
            None => Some((body.len() / 4).max(1) as u32),
        },
        token_ids,
        output_tokens: max_tokens,
        ..Default::default()
    };
    let timeout = svc.config().hop_timeout;
    let mut last: Option<HopError> = None;
    for _ in 0..svc.config().max_attempts.max(1) {
        let now = svc.now_s();
        let a = match svc.with_state(|s| s.schedule(&input, now)) {
            Ok(a) => a,
            Err((id, reason)) => {
                svc.with_state(|s| s.count_proxy("rejected"));
                let kind = if reason.status() == 429 {
                    "rate_limit_error"
                } else {
                    "service_unavailable"
                };
                return error(
                    reason.status(),
                    kind,
                    format!("request {id} refused by the conductor ({})", reason.label()),
                    Some(&reason),
                );
            }
        };
        let id = a.request_id;
        let (Some(purl), Some(durl)) = (a.prefill.url.clone(), a.decode.url.clone()) else {
            report(&svc, id, Lifecycle::Dropped);
            return error(
                503,
                "service_unavailable",
                "instance without a URL".into(),
                None,
            );
        };
        // Hop 1: prefill only, producing the KV for a remote decode.
        let mut p = req.clone();
        p["max_tokens"] = json!(1);
        if p.get("max_completion_tokens").is_some() {
            p["max_completion_tokens"] = json!(1);
        }
        p["stream"] = json!(false);
        if let Some(o) = p.as_object_mut() {
            o.remove("stream_options");
        }
        p["kv_transfer_params"] = json!({
            "do_remote_decode": true,
            "do_remote_prefill": false,
            "remote_engine_id": null,
            "remote_block_ids": null,
            "remote_host": null,
            "remote_port": null,
            "transfer_id": format!("xfer-{id}"),
        });
        report(&svc, id, Lifecycle::PrefillStarted);
        let pbody = match svc
            .http()
            .call(
                hyper::Method::POST,
                &format!("{}{path}", purl.trim_end_matches('/')),
                Some(Bytes::from(p.to_string())),
                None,
                timeout,
            )
            .await
        {
            Ok(b) => b,
            Err(HopError::Status(code, b)) if code < 500 => {
                report(&svc, id, Lifecycle::Dropped);
                return passthrough(code, b);
            }
            Err(e) => {
                failed(&svc, &a.prefill.name, id, "prefill_failed", &e);
                last = Some(e);
                continue;
            }
        };
        report(&svc, id, Lifecycle::PrefillFinished);
        let params = serde_json::from_slice::<Value>(&pbody)
            .ok()
            .and_then(|v| v.get("kv_transfer_params").cloned())
            .filter(|v| !v.is_null());
        // Hop 2: decode with the KV the prefill produced.
        let mut d = req.clone();
        if let Some(params) = params {
            d["kv_transfer_params"] = params;
        }
        let url = format!("{}{path}", durl.trim_end_matches('/'));
        let resp = match svc
            .http()
            .send(
                hyper::Method::POST,
                &url,
                Some(Bytes::from(d.to_string())),
                None,
                timeout,
            )
            .await
        {
            Ok(r) => r,
            Err(e) => {
                failed(&svc, &a.decode.name, id, "decode_failed", &e);
                last = Some(e);
                continue;
            }
        };
        let status = resp.status().as_u16();
        if status >= 400 {
            let b = resp
                .into_body()
                .collect()
                .await
                .map(|c| c.to_bytes())
                .unwrap_or_default();
            let e = HopError::Status(status, b.clone());
            if e.instance_failed() {
                failed(&svc, &a.decode.name, id, "decode_failed", &e);
                last = Some(e);
                continue;
            }
            report(&svc, id, Lifecycle::Dropped);
            return passthrough(status, b);
        }
        report(&svc, id, Lifecycle::DecodeStarted);
        let ctype = resp
            .headers()
            .get(header::CONTENT_TYPE)
            .cloned()
            .unwrap_or(HeaderValue::from_static("application/json"));
        let mut body = resp.into_body();
        if !stream {
            match tokio::time::timeout(timeout, body.collect()).await {
                Ok(Ok(c)) => {
                    report(&svc, id, Lifecycle::Finished);
                    svc.with_state(|s| s.count_proxy("completed"));
                    return ([(header::CONTENT_TYPE, ctype)], c.to_bytes()).into_response();
                }
                Ok(Err(e)) => {
                    let e = HopError::Connect(e.to_string());
                    failed(&svc, &a.decode.name, id, "decode_failed", &e);
                    last = Some(e);
                }
                Err(_) => {
                    failed(
                        &svc,
                        &a.decode.name,
                        id,
                        "decode_failed",
                        &HopError::Timeout,
                    );
                    last = Some(HopError::Timeout);
                }
            }
            continue;
        }
        // Streaming: commit once the first bytes are in.
        let first = match tokio::time::timeout(timeout, first_data(&mut body)).await {
            Ok(Ok(Some(b))) => b,
            Ok(Ok(None)) => {
                let e = HopError::Body("decode stream ended before any data".into());
                failed(&svc, &a.decode.name, id, "decode_failed", &e);
                last = Some(e);
                continue;
            }
            Ok(Err(e)) => {
                failed(&svc, &a.decode.name, id, "decode_failed", &e);
                last = Some(e);
                continue;
            }
            Err(_) => {
                failed(
                    &svc,
                    &a.decode.name,
                    id,
                    "decode_failed",
                    &HopError::Timeout,
                );
                last = Some(HopError::Timeout);
                continue;
            }
        };
        let guard = StreamGuard {
            svc: svc.clone(),
            id,
            done: false,
        };
        let s = futures_util::stream::unfold(
            (Some(first), body, guard),
            |(first, mut body, mut guard)| async move {
                if let Some(b) = first {
                    return Some((Ok::<_, std::io::Error>(b), (None, body, guard)));
                }
                match first_data(&mut body).await {
                    Ok(Some(b)) => Some((Ok(b), (None, body, guard))),
                    Ok(None) => {
                        guard.finish();
                        None
                    }
                    Err(e) => Some((
                        Err(std::io::Error::other(e.to_string())),
                        (None, body, guard),
                    )),
                }
            },
        );
        return ([(header::CONTENT_TYPE, ctype)], Body::from_stream(s)).into_response();
    }
    svc.with_state(|s| s.count_proxy("gave_up"));
    error(
        502,
        "bad_gateway",
        format!(
            "no instance could serve the request: {}",
            last.map_or("no attempt".into(), |e| e.to_string())
        ),
        None,
    )
}

/// The next data frame of `body` (trailers skipped); `None` at its end.
async fn first_data(body: &mut Incoming) -> Result<Option<Bytes>, HopError> {
    loop {
        match body.frame().await {
            None => return Ok(None),
            Some(Err(e)) => return Err(HopError::Connect(e.to_string())),
            Some(Ok(f)) => {
                if let Ok(d) = f.into_data()
                    && !d.is_empty()
                {
                    return Ok(Some(d));
                }
            }
        }
    }
}

/// Reports a streamed request finished at its end, or dropped if the stream goes away first.
struct StreamGuard {
    svc: Arc<Service>,
    id: u64,
    done: bool,
}

impl StreamGuard {
    fn finish(&mut self) {
        if !self.done {
            self.done = true;
            report(&self.svc, self.id, Lifecycle::Finished);
            self.svc.with_state(|s| s.count_proxy("completed"));
        }
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if !self.done {
            report(&self.svc, self.id, Lifecycle::Dropped);
            self.svc.with_state(|s| s.count_proxy("stream_broken"));
        }
    }
}
