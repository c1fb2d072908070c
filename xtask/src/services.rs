//! Real etcd and redis servers for the metadata tests, on free loopback ports.
//!
//! ```ignore
//! let services = services::start()?;          // installs etcd-server/redis-server if missing
//! cmd.envs(services.env());                   // MOONCAKE_TEST_ETCD, MOONCAKE_TEST_REDIS
//! run(&mut cmd)?;                             // dropping `services` stops both
//! ```
//!
//! Each server gets a fresh temporary data directory (removed on drop) holding its log, so a
//! failed start can be diagnosed. redis runs without persistence and with
//! `notify-keyspace-events Ex` (the redis backend's watch reports expiries from it).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};

/// Packages the services need: `(binary, Debian package)`.
pub(crate) const SERVICE_DEPS: &[(&str, &str)] = &[
    ("etcd", "etcd-server"),
    ("redis-server", "redis-server"),
    ("protoc", "protobuf-compiler"),
];

/// How long a server may take to answer after starting.
const START_TIMEOUT: Duration = Duration::from_secs(30);

/// One running server.
struct Server {
    name: &'static str,
    child: Child,
    dir: PathBuf,
}

impl Server {
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = log.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
        eprintln!("xtask: stopped {}", self.name);
    }
}

/// The running etcd and redis; dropping this stops them and removes their data.
pub struct Services {
    etcd_url: String,
    redis_url: String,
    _servers: Vec<Server>,
}

impl std::fmt::Debug for Services {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Services")
            .field("etcd", &self.etcd_url)
            .field("redis", &self.redis_url)
            .finish()
    }
}

impl Services {
    /// The environment the tests read: `MOONCAKE_TEST_ETCD=etcd://127.0.0.1:P` and
    /// `MOONCAKE_TEST_REDIS=redis://127.0.0.1:P`.
    pub fn env(&self) -> Vec<(String, String)> {
        vec![
            ("MOONCAKE_TEST_ETCD".to_string(), self.etcd_url.clone()),
            ("MOONCAKE_TEST_REDIS".to_string(), self.redis_url.clone()),
        ]
    }
}

/// Installs (apt-get) what is missing, starts etcd and redis on free loopback ports, and
/// waits until both answer.
pub fn start() -> anyhow::Result<Services> {
    crate::apt::ensure(SERVICE_DEPS)?;
    let mut servers = Vec::new();

    let (client, peer) = (free_port()?, free_port()?);
    let dir = data_dir("etcd")?;
    let c = format!("http://127.0.0.1:{client}");
    let p = format!("http://127.0.0.1:{peer}");
    let mut cmd = Command::new("etcd");
    cmd.args(["--name", "mooncake-test", "--data-dir"])
        .arg(dir.join("data"))
        .args(["--listen-client-urls", &c, "--advertise-client-urls", &c])
        .args([
            "--listen-peer-urls",
            &p,
            "--initial-advertise-peer-urls",
            &p,
        ])
        .args([
            "--initial-cluster",
            &format!("mooncake-test={p}"),
            "--initial-cluster-state",
            "new",
        ]);
    let etcd = spawn("etcd", cmd, dir)?;
    servers.push(etcd);
    wait_until("etcd", &servers[0], || etcd_healthy(client))?;

    let port = free_port()?;
    let dir = data_dir("redis")?;
    let mut cmd = Command::new("redis-server");
    cmd.args([
        "--port",
        &port.to_string(),
        "--bind",
        "127.0.0.1",
        "--save",
        "",
        "--appendonly",
        "no",
    ])
    .args([
        "--notify-keyspace-events",
        "Ex",
        "--protected-mode",
        "no",
        "--dir",
    ])
    .arg(&dir);
    let redis = spawn("redis", cmd, dir)?;
    servers.push(redis);
    wait_until("redis", &servers[1], || redis_pong(port))?;

    let s = Services {
        etcd_url: format!("etcd://127.0.0.1:{client}"),
        redis_url: format!("redis://127.0.0.1:{port}"),
        _servers: servers,
    };
    eprintln!("xtask: services up: {s:?}");
    Ok(s)
}

fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind("127.0.0.1:0").context("binding a loopback port")?;
    Ok(l.local_addr()?.port())
}

fn data_dir(name: &str) -> anyhow::Result<PathBuf> {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let dir = std::env::temp_dir().join(format!(
        "mooncake-xtask-{name}-{}-{nanos}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

fn spawn(name: &'static str, mut cmd: Command, dir: PathBuf) -> anyhow::Result<Server> {
    let log = std::fs::File::create(dir.join("server.log")).context("creating the server log")?;
    cmd.stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log);
    eprintln!("xtask: starting {name}: {cmd:?}");
    let child = cmd
        .spawn()
        .with_context(|| format!("cannot start {name} ({cmd:?})"))?;
    Ok(Server { name, child, dir })
}

fn wait_until(name: &str, server: &Server, ready: impl Fn() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + START_TIMEOUT;
    while Instant::now() < deadline {
        if ready() {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    bail!(
        "{name} did not answer within {START_TIMEOUT:?}; last log lines:\n{}",
        server.log_tail()
    )
}

fn exchange(port: u16, request: &[u8]) -> Option<String> {
    let mut s =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_secs(1)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    s.write_all(request).ok()?;
    let mut buf = vec![0u8; 4096];
    let n = s.read(&mut buf).ok()?;
    Some(String::from_utf8_lossy(&buf[..n]).into_owned())
}

fn redis_pong(port: u16) -> bool {
    exchange(port, b"PING\r\n").is_some_and(|r| r.starts_with("+PONG"))
}

fn etcd_healthy(port: u16) -> bool {
    let req =
        format!("GET /health HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n");
    exchange(port, req.as_bytes())
        .is_some_and(|r| r.starts_with("HTTP/1.1 200") && r.contains("\"health\":\"true\""))
}
