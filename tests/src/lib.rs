//! End-to-end test harness: starts the real `palisade` binary on free loopback ports in front of
//! real backends, polls readiness with a deadline (never sleeps to synchronize) and stops the
//! processes it started by pid when dropped.
#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test harness: failing loudly is the point"
)]

use std::convert::Infallible;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, Once};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long to wait for a process or server to become ready.
pub const READY_DEADLINE: Duration = Duration::from_secs(30);

/// A free loopback TCP port (bound then released; collisions are unlikely and retried by
/// callers that care).
pub fn free_port() -> u16 {
    free_ports::<1>()[0]
}

/// `N` distinct free loopback TCP ports: all are held until each is chosen (two calls of
/// [`free_port`] in a row may get the same port back from the kernel).
pub fn free_ports<const N: usize>() -> [u16; N] {
    let listeners: Vec<TcpListener> = (0..N)
        .map(|_| TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().unwrap().port())
}

/// Two distinct loopback addresses: a client listener and an admin listener.
fn proxy_addrs() -> (SocketAddr, SocketAddr) {
    let [a, b] = free_ports::<2>();
    (
        SocketAddr::from(([127, 0, 0, 1], a)),
        SocketAddr::from(([127, 0, 0, 1], b)),
    )
}

/// Whether process `pid` holds a listening TCP socket on `addr` (Linux: the socket's inode in
/// `/proc/net/tcp{,6}` among the process's descriptors).
pub fn listens_on(pid: u32, addr: SocketAddr) -> bool {
    let table = if addr.is_ipv4() {
        "/proc/net/tcp"
    } else {
        "/proc/net/tcp6"
    };
    let port = format!(":{:04X}", addr.port());
    let inodes: Vec<String> = std::fs::read_to_string(table)
        .unwrap_or_default()
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // local_address is field 1, state field 3 (0A = LISTEN), inode field 9.
            (f.len() > 9 && f[1].ends_with(&port) && f[3] == "0A").then(|| f[9].to_string())
        })
        .collect();
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
        .any(|link| {
            let link = link.to_string_lossy();
            inodes.iter().any(|i| link == format!("socket:[{i}]"))
        })
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// Path of the `palisade` binary: `$PALISADE_BIN`, else `target/debug/palisade`, built once per
/// test process with `cargo build -p palisade` (a no-op when up to date).
pub fn palisade_bin() -> PathBuf {
    if let Ok(p) = std::env::var("PALISADE_BIN") {
        return PathBuf::from(p);
    }
    static BUILD: Once = Once::new();
    BUILD.call_once(|| {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args(["build", "-q", "-p", "palisade", "--bin", "palisade"])
            .current_dir(workspace_root())
            .status()
            .expect("run cargo build");
        assert!(status.success(), "cargo build -p palisade failed");
    });
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("debug").join("palisade")
}

/// One request as the backend saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    /// Method.
    pub method: String,
    /// Path and query.
    pub uri: String,
    /// Headers (lower-case names).
    pub headers: Vec<(String, String)>,
    /// The exact body bytes.
    pub body: Bytes,
}

impl SeenRequest {
    /// A request as a server received it.
    pub fn new(parts: &http::request::Parts, body: Bytes) -> SeenRequest {
        SeenRequest {
            method: parts.method.to_string(),
            uri: parts.uri.to_string(),
            headers: parts
                .headers
                .iter()
                .map(|(k, v)| (k.to_string(), String::from_utf8_lossy(v.as_bytes()).into()))
                .collect(),
            body,
        }
    }

    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// How a test backend answers.
#[derive(Clone)]
pub struct BackendBehavior {
    /// Delay before answering.
    pub delay: Duration,
    /// Status to answer.
    pub status: u16,
}

impl Default for BackendBehavior {
    fn default() -> Self {
        BackendBehavior {
            delay: Duration::ZERO,
            status: 200,
        }
    }
}

/// A real HTTP/1.1 backend (hyper) on a loopback port that records every request and answers
/// `{"backend": name, "path": ..., "body_len": n}`.
pub struct Backend {
    /// Its address.
    pub addr: SocketAddr,
    /// Its name (in responses).
    pub name: String,
    seen: Arc<Mutex<Vec<SeenRequest>>>,
    behavior: Arc<Mutex<BackendBehavior>>,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
}

impl Backend {
    /// Starts a backend on a free loopback port.
    pub async fn start(name: &str) -> Backend {
        Backend::start_with(name, BackendBehavior::default()).await
    }

    /// Starts a backend with a given behavior.
    pub async fn start_with(name: &str, behavior: BackendBehavior) -> Backend {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let behavior = Arc::new(Mutex::new(behavior));
        let (tx, mut rx) = tokio::sync::oneshot::channel::<()>();
        let (seen2, behavior2, name2) = (seen.clone(), behavior.clone(), name.to_string());
        tokio::spawn(async move {
            loop {
                let (stream, _) = tokio::select! {
                    r = listener.accept() => match r { Ok(s) => s, Err(_) => continue },
                    _ = &mut rx => return,
                };
                let (seen, behavior, name) = (seen2.clone(), behavior2.clone(), name2.clone());
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req: Request<Incoming>| {
                        let (seen, behavior, name) = (seen.clone(), behavior.clone(), name.clone());
                        async move {
                            let (parts, body) = req.into_parts();
                            let body = body
                                .collect()
                                .await
                                .map(|b| b.to_bytes())
                                .unwrap_or_default();
                            let b = behavior.lock().unwrap().clone();
                            let path = parts.uri.path().to_string();
                            seen.lock()
                                .unwrap()
                                .push(SeenRequest::new(&parts, body.clone()));
                            if !b.delay.is_zero() {
                                tokio::time::sleep(b.delay).await;
                            }
                            let out = serde_json::json!({"backend": name, "path": path, "body_len": body.len()});
                            let resp = Response::builder()
                                .status(b.status)
                                .header("content-type", "application/json")
                                .body(Full::new(Bytes::from(out.to_string())))
                                .unwrap();
                            Ok::<_, Infallible>(resp)
                        }
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(stream), svc)
                        .await;
                });
            }
        });
        Backend {
            addr,
            name: name.to_string(),
            seen,
            behavior,
            shutdown: Some(tx),
        }
    }

    /// Every request seen so far.
    pub fn seen(&self) -> Vec<SeenRequest> {
        self.seen.lock().unwrap().clone()
    }

    /// Number of requests seen so far.
    pub fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    /// Changes how it answers from now on.
    pub fn set_behavior(&self, b: BackendBehavior) {
        *self.behavior.lock().unwrap() = b;
    }

    /// Stops accepting connections (existing ones finish).
    pub fn stop(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
    }
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running `palisade` process, killed (by its pid) when dropped.
pub struct Palisade {
    child: Child,
    /// Client listener.
    pub addr: SocketAddr,
    /// Admin listener.
    pub admin: SocketAddr,
    /// IPv6 loopback listener (`[::1]:port`), when started with one.
    pub addr6: Option<SocketAddr>,
    /// The directory holding the config (fixtures may be written next to it).
    pub dir: PathBuf,
    _dir: Option<tempfile::TempDir>,
    log_path: PathBuf,
}

/// The listeners/admin header used by [`Palisade::start`] configs.
pub fn listeners_yaml(addr: SocketAddr, admin: SocketAddr) -> String {
    format!("listeners:\n  - address: \"{addr}\"\nadmin:\n  address: \"{admin}\"\n")
}

impl Palisade {
    /// Starts `palisade run --config <file>` where the file is `listeners_yaml(..) + body`.
    pub async fn start(config_body: &str) -> Palisade {
        Palisade::start_in(tempfile::tempdir().unwrap(), config_body, false).await
    }

    /// Like [`Palisade::start`], with an extra listener on `[::1]` and the config written into
    /// `dir` (so relative paths in it resolve there).
    pub async fn start_in(dir: tempfile::TempDir, config_body: &str, ipv6: bool) -> Palisade {
        Palisade::start_in_with(dir, config_body, ipv6, &[]).await
    }

    /// Like [`Palisade::start_in`], with extra arguments after `run --config FILE`.
    pub async fn start_in_with(
        dir: tempfile::TempDir,
        config_body: &str,
        ipv6: bool,
        extra: &[&str],
    ) -> Palisade {
        Palisade::start_with(dir, |addr, admin, dir| {
            let mut yaml = listeners_yaml(addr, admin);
            let addr6 = ipv6.then(|| {
                let l = TcpListener::bind("[::1]:0").unwrap();
                l.local_addr().unwrap()
            });
            if let Some(a6) = addr6 {
                yaml = yaml.replacen("admin:", &format!("  - address: \"{a6}\"\nadmin:"), 1);
            }
            yaml.push_str(config_body);
            let path = dir.join("palisade.yaml");
            std::fs::write(&path, yaml).unwrap();
            let path = path.to_str().unwrap().to_string();
            let mut args = ["run", "--config", &path, "--threads", "2"]
                .map(String::from)
                .to_vec();
            args.extend(extra.iter().map(|e| e.to_string()));
            (args, addr6)
        })
        .await
    }

    /// Like [`Palisade::start_in`] with TLS on the client listener: `tls` is the listener's
    /// `tls:` mapping (YAML flow style, e.g. `{certificates: [{cert: a.pem, key: a.key}]}`),
    /// with paths relative to `dir`.
    pub async fn start_tls(dir: tempfile::TempDir, tls: &str, config_body: &str) -> Palisade {
        let (tls, body) = (tls.to_string(), config_body.to_string());
        Palisade::start_with(dir, move |addr, admin, dir| {
            let mut yaml = listeners_yaml(addr, admin).replacen(
                "admin:",
                &format!("    tls: {tls}\nadmin:"),
                1,
            );
            yaml.push_str(&body);
            let path = dir.join("palisade.yaml");
            std::fs::write(&path, yaml).unwrap();
            let path = path.to_str().unwrap().to_string();
            let args = ["run", "--config", &path, "--threads", "2"]
                .map(String::from)
                .to_vec();
            (args, None)
        })
        .await
    }

    /// Starts `palisade run` with extra arguments on free ports (no config file).
    pub async fn start_args(extra: &[&str]) -> Palisade {
        Palisade::start_with(tempfile::tempdir().unwrap(), |addr, admin, _| {
            let (a, b) = (addr.to_string(), admin.to_string());
            let mut args = vec!["run".to_string(), "--listen".into(), a, "--admin".into(), b];
            args.extend(extra.iter().map(|e| e.to_string()));
            (args, None)
        })
        .await
    }

    /// Starts on fresh client and admin ports; `prepare` gets them and the directory and
    /// returns the arguments and the `[::1]` listener, if any. A start that loses a port to
    /// another test in between is tried again (at most 3 tries); any other early exit panics.
    async fn start_with(
        mut dir: tempfile::TempDir,
        prepare: impl Fn(SocketAddr, SocketAddr, &Path) -> (Vec<String>, Option<SocketAddr>),
    ) -> Palisade {
        for attempt in 1.. {
            let (addr, admin) = proxy_addrs();
            let (args, addr6) = prepare(addr, admin, dir.path());
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            match Palisade::spawn(&args, addr, admin, dir).await {
                Ok(mut p) => {
                    p.addr6 = addr6;
                    return p;
                }
                Err((d, log)) => {
                    let port_race = log.contains("cannot listen on") || log.contains("in use");
                    assert!(port_race && attempt < 3, "palisade exited early:\n{log}");
                    dir = d;
                }
            }
        }
        unreachable!()
    }

    /// Starts the process and waits until it is ready; if it exits first, its directory and
    /// log come back.
    async fn spawn(
        args: &[&str],
        addr: SocketAddr,
        admin: SocketAddr,
        dir: tempfile::TempDir,
    ) -> Result<Palisade, (tempfile::TempDir, String)> {
        let log_path = dir.path().join("palisade.log");
        let log = std::fs::File::create(&log_path).unwrap();
        let child = Command::new(palisade_bin())
            .args(args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start palisade");
        let mut p = Palisade {
            child,
            addr,
            admin,
            addr6: None,
            dir: dir.path().to_path_buf(),
            _dir: Some(dir),
            log_path,
        };
        match p.wait_ready().await {
            Ok(()) => Ok(p),
            Err(log) => Err((p._dir.take().unwrap(), log)),
        }
    }

    async fn wait_ready(&mut self) -> Result<(), String> {
        let deadline = Instant::now() + READY_DEADLINE;
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Err(format!("({status})\n{}", self.log()));
            }
            // A port taken by another test after the proxy checked it: pingora retries the
            // bind for 30 s; start again on other ports instead (the process is killed on drop).
            let log = self.log();
            if log.contains("is in use, will try again") {
                return Err(log);
            }
            // Both ports must be listened on by this process: a port lost to another test
            // after the proxy checked it would otherwise be served by that test's proxy.
            let pid = self.child.id();
            let owned = listens_on(pid, self.addr) && listens_on(pid, self.admin);
            let admin_up = owned
                && raw_get(self.admin, "/healthz")
                    .await
                    .is_some_and(|r| r.status == 200);
            let proxy_up = owned && tokio::net::TcpStream::connect(self.addr).await.is_ok();
            if admin_up && proxy_up {
                return Ok(());
            }
            assert!(
                Instant::now() < deadline,
                "palisade not ready in time:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `http://addr` of the client listener.
    pub fn url(&self, path: &str) -> String {
        format!("http://{}{}", self.addr, path)
    }

    /// The process id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Whether the process has exited (reaped, so a zombie counts as exited).
    pub fn exited(&mut self) -> bool {
        self.child.try_wait().ok().flatten().is_some()
    }

    /// The process's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path).unwrap_or_default()
    }

    /// The admin `/metrics` text.
    pub async fn metrics(&self) -> String {
        raw_get(self.admin, "/metrics")
            .await
            .map(|r| r.body_string())
            .unwrap_or_default()
    }

    /// Waits (up to 5 s) until a metric sample has `value`; metrics of a request are recorded
    /// in its logging phase, just after the client got the response. Panics with the metrics
    /// text if it never does.
    pub async fn expect_metric(&self, sample: &str, value: f64) {
        let ok = eventually(Duration::from_secs(5), || async {
            self.metric(sample).await == value
        })
        .await;
        assert!(
            ok,
            "expected {sample} = {value}; metrics:\n{}",
            self.metrics().await
        );
    }

    /// Value of one metric sample line, e.g. `palisade_requests_total{route="a",decision="forwarded"}`.
    pub async fn metric(&self, sample: &str) -> f64 {
        metric_value(&self.metrics().await, sample)
    }
}

/// Finds a sample in Prometheus text; 0 when absent.
pub fn metric_value(text: &str, sample: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(sample).and_then(|r| r.trim().parse().ok()))
        .unwrap_or(0.0)
}

impl Drop for Palisade {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A raw HTTP/1.1 response.
#[derive(Debug)]
pub struct RawResponse {
    /// Status code.
    pub status: u16,
    /// Header lines (lower-case names).
    pub headers: Vec<(String, String)>,
    /// Body bytes (de-chunked if needed).
    pub body: Vec<u8>,
}

impl RawResponse {
    /// Body as UTF-8 (lossy).
    pub fn body_string(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
    /// Body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body_string()))
    }
    /// First value of a header.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// Sends raw request bytes on a fresh connection and reads one response (`Connection: close`
/// is expected in `request` or the response must carry a length). Times out after 30 s.
pub async fn raw_request(addr: SocketAddr, request: &[u8]) -> Option<RawResponse> {
    let stream = tokio::net::TcpStream::connect(addr).await.ok()?;
    exchange(stream, request).await
}

/// Writes one request and reads one response, within 30 s.
async fn exchange(mut s: tokio::net::TcpStream, request: &[u8]) -> Option<RawResponse> {
    tokio::time::timeout(Duration::from_secs(30), async {
        // The server may answer (e.g. 413) and close before the whole body is sent.
        let _ = s.write_all(request).await;
        let mut buf = Vec::new();
        let mut tmp = vec![0u8; 65536];
        loop {
            if let Some(r) = parse_response(&buf) {
                return Some(r);
            }
            match s.read(&mut tmp).await {
                Ok(0) | Err(_) => return parse_response_eof(&buf),
                Ok(n) => buf.extend_from_slice(&tmp[..n]),
            }
        }
    })
    .await
    .ok()
    .flatten()
}

/// Like [`raw_request`], from a chosen local source address (e.g. `127.0.0.2`: all of
/// 127.0.0.0/8 is loopback on Linux, which lets tests present different client addresses).
pub async fn raw_request_from(
    src: std::net::IpAddr,
    addr: SocketAddr,
    request: &[u8],
) -> Option<RawResponse> {
    let socket = if src.is_ipv4() {
        tokio::net::TcpSocket::new_v4().ok()?
    } else {
        tokio::net::TcpSocket::new_v6().ok()?
    };
    socket.bind(SocketAddr::new(src, 0)).ok()?;
    let stream = socket.connect(addr).await.ok()?;
    exchange(stream, request).await
}

/// `GET path` with `Connection: close` and extra header lines (`"Name: value"`), from `src`.
pub async fn get_from(src: &str, addr: SocketAddr, path: &str, headers: &[&str]) -> RawResponse {
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    for h in headers {
        req.push_str(h);
        req.push_str("\r\n");
    }
    req.push_str("\r\n");
    raw_request_from(src.parse().unwrap(), addr, req.as_bytes())
        .await
        .unwrap_or_else(|| panic!("no response from {addr} for {src} {path}"))
}

/// Raw HTTP/1.1 request bytes (`Connection: close`, `Content-Length` for bodies and for
/// POST/PUT/PATCH) with the given header lines; headers with an empty value are left out.
pub fn http1_request(
    method: &str,
    target: &str,
    host: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Vec<u8> {
    let mut req = format!("{method} {target} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n");
    for (k, v) in headers.iter().filter(|(_, v)| !v.is_empty()) {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        req.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    req.push_str("\r\n");
    let mut bytes = req.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// Path of a file in the repository.
pub fn repo_path(rel: &str) -> PathBuf {
    workspace_root().join(rel)
}

/// `GET path` with `Connection: close`.
pub async fn raw_get(addr: SocketAddr, path: &str) -> Option<RawResponse> {
    raw_request(
        addr,
        format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: palisade-tests\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .await
}

/// Header lines as (lower-case name, value).
type HeaderLines = Vec<(String, String)>;

fn split_head(buf: &[u8]) -> Option<(u16, HeaderLines, usize)> {
    let end = buf.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&buf[..end]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    Some((status, headers, end + 4))
}

fn parse_response(buf: &[u8]) -> Option<RawResponse> {
    let (status, headers, start) = split_head(buf)?;
    let get = |n: &str| headers.iter().find(|(k, _)| k == n).map(|(_, v)| v.clone());
    if let Some(len) = get("content-length").and_then(|v| v.parse::<usize>().ok()) {
        if buf.len() >= start + len {
            return Some(RawResponse {
                status,
                headers,
                body: buf[start..start + len].to_vec(),
            });
        }
        return None;
    }
    if get("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
        return dechunk(&buf[start..]).map(|body| RawResponse {
            status,
            headers,
            body,
        });
    }
    None
}

fn parse_response_eof(buf: &[u8]) -> Option<RawResponse> {
    parse_response(buf).or_else(|| {
        let (status, headers, start) = split_head(buf)?;
        Some(RawResponse {
            status,
            headers,
            body: buf[start..].to_vec(),
        })
    })
}

fn dechunk(mut data: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let line_end = data.windows(2).position(|w| w == b"\r\n")?;
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).ok()?.trim(), 16).ok()?;
        data = &data[line_end + 2..];
        if size == 0 {
            return Some(out);
        }
        if data.len() < size + 2 {
            return None;
        }
        out.extend_from_slice(&data[..size]);
        data = &data[size + 2..];
    }
}

/// Encodes `body` as chunked transfer-coding with chunks of `chunk` bytes.
pub fn chunked(body: &[u8], chunk: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + body.len() / chunk * 8 + 8);
    for c in body.chunks(chunk) {
        out.extend_from_slice(format!("{:x}\r\n", c.len()).as_bytes());
        out.extend_from_slice(c);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"0\r\n\r\n");
    out
}

/// A deterministic, non-repeating-looking body of `n` bytes (so truncation or reordering shows).
pub fn pattern_body(n: usize) -> Vec<u8> {
    (0..n)
        .map(|i| b"abcdefghijklmnopqrstuvwxyz0123456789"[(i * 7 + i / 36) % 36])
        .collect()
}

/// Runs `palisade` with arguments to completion, returning (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(palisade_bin())
        .args(args)
        .output()
        .expect("run palisade");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// Polls `cond` every 20 ms until it holds or the deadline passes; returns whether it held.
pub async fn eventually<F, Fut>(deadline: Duration, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let end = Instant::now() + deadline;
    loop {
        if cond().await {
            return true;
        }
        if Instant::now() >= end {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A real `redis-server` on a free loopback port, without persistence; killed (by pid) when
/// dropped. Needs Debian's `redis-server` (installed by `scripts/ensure-deps.sh`).
pub struct RedisServer {
    child: Option<Child>,
    /// Its port.
    pub port: u16,
}

impl RedisServer {
    /// Starts one and waits until it answers `PING`.
    pub async fn start() -> RedisServer {
        let port = free_port();
        let mut r = RedisServer { child: None, port };
        r.spawn().await;
        r
    }

    async fn spawn(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "yes",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (Debian package redis-server; scripts/ensure-deps.sh installs it)");
        self.child = Some(child);
        let port = self.port;
        let ok = eventually(READY_DEADLINE, || async move { redis_ping(port).await }).await;
        assert!(ok, "redis-server on port {port} did not answer PING");
    }

    /// Its port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:port/0`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/0", self.port)
    }

    /// Kills the server (as a crash would).
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn().await;
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether a Redis answers `PING` on this loopback port.
pub async fn redis_ping(port: u16) -> bool {
    let Ok(mut s) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else {
        return false;
    };
    if s.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 16];
    matches!(tokio::time::timeout(Duration::from_secs(2), s.read(&mut buf)).await, Ok(Ok(n)) if buf[..n].starts_with(b"+PONG"))
}
