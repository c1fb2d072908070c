//! The running service: the state behind a mutex, the HTTP API (axum), one ZMQ follower per
//! instance with a KV event endpoint, the store follower and the health checker.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;

use crate::state::{
    ConductorState, InstanceInfo, Lifecycle, Registration, RegistryError, Role, ScheduleInput,
    StateConfig,
};

/// How the proxy turns a text prompt into token ids (for block hashes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Tokenize {
    /// Ask an instance's `POST /tokenize` (vLLM's endpoint), exact for any model.
    #[default]
    Remote,
    /// One token per byte (the engine simulator's tokenizer); no round trip.
    Bytes,
}

impl std::str::FromStr for Tokenize {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "remote" => Ok(Self::Remote),
            "bytes" => Ok(Self::Bytes),
            _ => Err(format!("unknown tokenizer `{s}` (remote or bytes)")),
        }
    }
}

/// Configuration of the service.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub struct ServiceConfig {
    /// The scheduler and registry.
    pub state: StateConfig,
    /// The store master's admin URL (`http://host:9003`) to follow its KV events.
    pub store_admin_url: Option<String>,
    /// Only this tenant's store keys.
    pub store_tenant: Option<String>,
    /// Bearer token of the master's admin port (with a cluster secret).
    pub store_token: Option<String>,
    /// How often instances' `/health` is checked (`None`: never; failed requests still mark
    /// an instance down, and nothing brings it back but a re-registration).
    pub health_interval: Option<Duration>,
    /// Longest wait for a prefill response, or for a decode response's first bytes.
    pub hop_timeout: Duration,
    /// Attempts per proxied request (each on instances not yet failed).
    pub max_attempts: u32,
    /// The proxy's tokenizer.
    pub tokenize: Tokenize,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        Self {
            state: StateConfig::default(),
            store_admin_url: None,
            store_tenant: None,
            store_token: None,
            health_interval: Some(Duration::from_secs(2)),
            hop_timeout: Duration::from_secs(60),
            max_attempts: 3,
            tokenize: Tokenize::Remote,
        }
    }
}

impl ServiceConfig {
    /// With this scheduler/registry configuration.
    pub fn with_state(mut self, state: StateConfig) -> Self {
        self.state = state;
        self
    }

    /// Following the store master at `url` (its admin port).
    pub fn with_store(mut self, url: Option<String>, token: Option<String>) -> Self {
        self.store_admin_url = url;
        self.store_token = token;
        self
    }

    /// Health-check period (`None`: off).
    pub fn with_health_interval(mut self, d: Option<Duration>) -> Self {
        self.health_interval = d;
        self
    }

    /// Per-hop timeout.
    pub fn with_hop_timeout(mut self, d: Duration) -> Self {
        self.hop_timeout = d;
        self
    }

    /// The proxy's tokenizer.
    pub fn with_tokenize(mut self, t: Tokenize) -> Self {
        self.tokenize = t;
        self
    }
}

/// Why an HTTP hop failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum HopError {
    /// Could not connect, or the connection broke.
    #[error("connection: {0}")]
    Connect(String),
    /// No answer in time.
    #[error("timed out")]
    Timeout,
    /// An error status.
    #[error("HTTP {0}")]
    Status(u16, Bytes),
    /// The body was not what was expected.
    #[error("bad body: {0}")]
    Body(String),
}

impl HopError {
    /// Whether the instance is to blame (down, overloaded, broken) rather than the request.
    pub fn instance_failed(&self) -> bool {
        !matches!(self, Self::Status(s, _) if *s < 500)
    }
}

/// A small HTTP/1 client (hyper) with per-call timeouts.
#[derive(Debug, Clone)]
pub struct HttpClient {
    inner: Client<HttpConnector, Full<Bytes>>,
}

impl Default for HttpClient {
    fn default() -> Self {
        let mut conn = HttpConnector::new();
        conn.set_nodelay(true);
        conn.set_connect_timeout(Some(Duration::from_secs(2)));
        Self {
            inner: Client::builder(TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(conn),
        }
    }
}

impl HttpClient {
    /// Sends a request and waits (up to `timeout`) for the response head.
    pub async fn send(
        &self,
        method: hyper::Method,
        url: &str,
        body: Option<Bytes>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<hyper::Response<Incoming>, HopError> {
        let mut b = hyper::Request::builder().method(method).uri(url);
        if body.is_some() {
            b = b.header(header::CONTENT_TYPE, "application/json");
        }
        if let Some(t) = bearer {
            b = b.header(header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = b
            .body(Full::new(body.unwrap_or_default()))
            .map_err(|e| HopError::Connect(e.to_string()))?;
        match tokio::time::timeout(timeout, self.inner.request(req)).await {
            Err(_) => Err(HopError::Timeout),
            Ok(Err(e)) => Err(HopError::Connect(e.to_string())),
            Ok(Ok(r)) => Ok(r),
        }
    }

    /// Sends a request and reads the whole body; error statuses are errors.
    pub async fn call(
        &self,
        method: hyper::Method,
        url: &str,
        body: Option<Bytes>,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<Bytes, HopError> {
        let deadline = tokio::time::Instant::now() + timeout;
        let r = self.send(method, url, body, bearer, timeout).await?;
        let status = r.status().as_u16();
        let body = tokio::time::timeout_at(deadline, r.into_body().collect())
            .await
            .map_err(|_| HopError::Timeout)?
            .map_err(|e| HopError::Connect(e.to_string()))?
            .to_bytes();
        if status >= 400 {
            return Err(HopError::Status(status, body));
        }
        Ok(body)
    }

    /// GET and parse JSON.
    pub async fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        url: &str,
        bearer: Option<&str>,
        timeout: Duration,
    ) -> Result<T, HopError> {
        let b = self
            .call(hyper::Method::GET, url, None, bearer, timeout)
            .await?;
        serde_json::from_slice(&b).map_err(|e| HopError::Body(e.to_string()))
    }
}

/// The service (see the module docs).
#[derive(Debug)]
pub struct Service {
    state: Mutex<ConductorState>,
    start: Instant,
    http: HttpClient,
    cfg: ServiceConfig,
    followers: Mutex<HashMap<String, JoinHandle<()>>>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Service {
    /// A service with no instances; background tasks start with [`start`].
    pub fn new(cfg: ServiceConfig) -> anyhow::Result<Arc<Self>> {
        let state = ConductorState::new(cfg.state.clone())?;
        Ok(Arc::new(Self {
            state: Mutex::new(state),
            start: Instant::now(),
            http: HttpClient::default(),
            cfg,
            followers: Mutex::new(HashMap::new()),
            tasks: Mutex::new(Vec::new()),
        }))
    }

    /// Seconds since the service started (the Conductor's clock).
    pub fn now_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// The configuration.
    pub fn config(&self) -> &ServiceConfig {
        &self.cfg
    }

    /// The HTTP client.
    pub fn http(&self) -> &HttpClient {
        &self.http
    }

    fn lock(&self) -> MutexGuard<'_, ConductorState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state, locked.
    pub fn with_state<R>(&self, f: impl FnOnce(&mut ConductorState) -> R) -> R {
        f(&mut self.lock())
    }

    /// Registers an instance and follows its KV events (if it has an endpoint).
    pub fn register(self: &Arc<Self>, reg: Registration) -> Result<InstanceInfo, RegistryError> {
        let info = self.with_state(|s| s.register(reg.clone()).cloned())?;
        let mut f = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(old) = f.remove(&reg.name) {
            old.abort();
        }
        if let Some(ep) = reg.kv_events_endpoint.clone() {
            let task = tokio::spawn(crate::zmq::follow(
                self.clone(),
                reg.name.clone(),
                ep,
                reg.kv_replay_endpoint.clone(),
                reg.kv_topic.clone().unwrap_or_default(),
            ));
            f.insert(reg.name.clone(), task);
        }
        Ok(info)
    }

    /// Deregisters an instance and stops following it.
    pub fn deregister(&self, name: &str) -> Result<InstanceInfo, RegistryError> {
        if let Some(t) = self
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(name)
        {
            t.abort();
        }
        self.with_state(|s| s.deregister(name))
    }

    /// The HTTP routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/health", get(|| async { "OK\n" }))
            .route("/metrics", get(metrics))
            .route("/v1/schedule", post(schedule))
            .route("/v1/requests/{id}/events", post(lifecycle))
            .route("/v1/instances", post(register).get(list))
            .route("/v1/instances/{name}", delete(deregister))
            .route(
                "/v1/completions",
                post(|s: State<Arc<Self>>, b: Bytes| crate::proxy::handle(s, "/v1/completions", b)),
            )
            .route(
                "/v1/chat/completions",
                post(|s: State<Arc<Self>>, b: Bytes| {
                    crate::proxy::handle(s, "/v1/chat/completions", b)
                }),
            )
            .with_state(self.clone())
    }

    fn spawn_background(self: &Arc<Self>) {
        let mut tasks = self.tasks.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(url) = self.cfg.store_admin_url.clone() {
            let _ = self.with_state(|s| s.ensure_store());
            tasks.push(tokio::spawn(crate::store::follow(
                self.clone(),
                url,
                self.cfg.store_tenant.clone(),
                self.cfg.store_token.clone(),
            )));
        }
        if let Some(every) = self.cfg.health_interval {
            tasks.push(tokio::spawn(health_loop(self.clone(), every)));
        }
    }

    /// Stops every background task.
    pub fn shutdown(&self) {
        for t in self
            .tasks
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain(..)
        {
            t.abort();
        }
        for (_, t) in self
            .followers
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            t.abort();
        }
    }
}

async fn health_loop(svc: Arc<Service>, every: Duration) {
    loop {
        tokio::time::sleep(every).await;
        let targets: Vec<(String, String, bool)> = svc.with_state(|s| {
            s.instances()
                .filter(|i| i.reg.role != Role::Store)
                .filter_map(|i| Some((i.reg.name.clone(), i.reg.url.clone()?, i.healthy)))
                .collect()
        });
        for (name, url, was) in targets {
            let ok = svc
                .http
                .call(
                    hyper::Method::GET,
                    &format!("{}/health", url.trim_end_matches('/')),
                    None,
                    None,
                    Duration::from_secs(1),
                )
                .await
                .is_ok();
            if ok != was {
                tracing::info!(instance = name, healthy = ok, "health changed");
                svc.with_state(|s| s.set_healthy(&name, ok));
            }
        }
    }
}

/// Resident set size of this process, from `/proc/self/statm` (0 elsewhere).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

fn json_status(status: u16, v: impl Serialize) -> Response {
    (
        StatusCode::from_u16(status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        Json(v),
    )
        .into_response()
}

async fn metrics(State(svc): State<Arc<Service>>) -> Response {
    let rss = rss_bytes();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        svc.with_state(|s| s.metrics(rss)),
    )
        .into_response()
}

/// The body of a refusal.
#[derive(Debug, Serialize, Deserialize)]
pub struct RejectBody {
    /// The service's id of the refused request.
    pub request_id: u64,
    /// Always `"reject"`.
    pub decision: String,
    /// Why.
    pub reason: crate::state::RejectReason,
}

async fn schedule(State(svc): State<Arc<Service>>, Json(input): Json<ScheduleInput>) -> Response {
    let now = svc.now_s();
    match svc.with_state(|s| s.schedule(&input, now)) {
        Ok(a) => json_status(200, a),
        Err((id, reason)) => json_status(
            reason.status(),
            RejectBody {
                request_id: id,
                decision: "reject".into(),
                reason,
            },
        ),
    }
}

#[derive(Debug, Deserialize)]
struct LifecycleBody {
    event: Lifecycle,
}

async fn lifecycle(
    State(svc): State<Arc<Service>>,
    Path(id): Path<u64>,
    Json(b): Json<LifecycleBody>,
) -> StatusCode {
    let now = svc.now_s();
    svc.with_state(|s| s.lifecycle(id, b.event, now));
    StatusCode::NO_CONTENT
}

async fn register(State(svc): State<Arc<Service>>, Json(reg): Json<Registration>) -> Response {
    match svc.register(reg) {
        Ok(info) => json_status(200, info),
        Err(e) => json_status(409, serde_json::json!({"error": e.to_string()})),
    }
}

async fn list(State(svc): State<Arc<Service>>) -> Response {
    json_status(
        200,
        svc.with_state(|s| s.instances().cloned().collect::<Vec<_>>()),
    )
}

async fn deregister(State(svc): State<Arc<Service>>, Path(name): Path<String>) -> Response {
    match svc.deregister(&name) {
        Ok(info) => json_status(200, info),
        Err(e) => json_status(404, serde_json::json!({"error": e.to_string()})),
    }
}

/// A service serving on a listener.
#[derive(Debug)]
pub struct RunningService {
    /// The bound address.
    pub addr: SocketAddr,
    /// The service.
    pub svc: Arc<Service>,
    server: JoinHandle<()>,
}

impl RunningService {
    /// Stops serving and every background task.
    pub fn stop(self) {
        self.server.abort();
        self.svc.shutdown();
    }

    /// Waits until the server ends (it does not by itself).
    pub async fn wait(self) {
        let _ = self.server.await;
    }
}

/// Starts the service on `listener` (on the current tokio runtime), registering `instances`.
pub async fn start(
    cfg: ServiceConfig,
    listener: tokio::net::TcpListener,
    instances: Vec<Registration>,
) -> anyhow::Result<RunningService> {
    let addr = listener.local_addr()?;
    let svc = Service::new(cfg)?;
    for r in instances {
        svc.register(r)?;
    }
    svc.spawn_background();
    let app = svc.router();
    let server = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::error!("conductor HTTP server: {e}");
        }
    });
    tracing::info!(%addr, "mooncake conductor listening");
    Ok(RunningService { addr, svc, server })
}

impl Registration {
    /// Parses `name=NAME,url=URL[,kv=tcp://…][,replay=tcp://…][,topic=T][,capacity=TOKENS]`
    /// (the CLI's `--prefill`/`--decode`/`--both`).
    pub fn from_spec(role: Role, spec: &str) -> Result<Self, String> {
        let mut r = Self {
            name: String::new(),
            role,
            url: None,
            kv_events_endpoint: None,
            kv_replay_endpoint: None,
            kv_topic: None,
            kv_capacity_tokens: None,
        };
        for part in spec.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected key=value"))?;
            match k {
                "name" => r.name = v.into(),
                "url" => r.url = Some(v.into()),
                "kv" | "events" => r.kv_events_endpoint = Some(v.into()),
                "replay" => r.kv_replay_endpoint = Some(v.into()),
                "topic" => r.kv_topic = Some(v.into()),
                "capacity" => {
                    r.kv_capacity_tokens =
                        Some(v.parse().map_err(|e| format!("capacity `{v}`: {e}"))?)
                }
                _ => return Err(format!("unknown key `{k}` in `{spec}`")),
            }
        }
        if r.name.is_empty() {
            r.name = r
                .url
                .clone()
                .ok_or_else(|| format!("`{spec}`: give name= or url="))?;
        }
        Ok(r)
    }
}

/// Runs the service on `addr` until Ctrl-C (the CLI's `mooncake conductor`), on a tokio
/// runtime of its own with `threads` workers.
pub fn run_blocking(
    cfg: ServiceConfig,
    addr: SocketAddr,
    instances: Vec<Registration>,
    threads: usize,
) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads.max(1))
        .thread_name("mooncake-conductor")
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(addr).await?;
        let running = start(cfg, listener, instances).await?;
        eprintln!("mooncake conductor listening on http://{}", running.addr);
        tokio::signal::ctrl_c().await?;
        running.stop();
        anyhow::Ok(())
    })
}
