//! Services a fault test owns, so it can stop and restart them without touching the shared ones:
//! a RabbitMQ node of its own (another node name, port and data folder), an s3s-fs and a
//! SecantusDB on free ports. Each is stopped when dropped.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// `AUDIO_WORKER_HOME/tools`, where `scripts/services.sh` installs s3s-fs and SecantusDB.
fn tools() -> PathBuf {
    let home = std::env::var("AUDIO_WORKER_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache/audio-worker"));
    home.join("tools")
}

/// A free port on 127.0.0.1.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn listening(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200)).is_ok()
}

async fn wait_until(what: &str, limit: Duration, mut ready: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + limit;
    while !ready() {
        assert!(tokio::time::Instant::now() < deadline, "{what} not ready within {limit:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A RabbitMQ node of the test's own: name `aw-{id}@localhost`, its own ports and data folder,
/// no plugins. The machine's broker on 5672 is never touched.
pub struct OwnRabbit {
    pub port: u16,
    /// The management API's port, when the node runs the management plugin.
    pub management_port: Option<u16>,
    node: String,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl OwnRabbit {
    pub async fn start() -> Self {
        Self::start_with("").await
    }

    /// A node with `conf` (rabbitmq.conf lines) added to its configuration.
    pub async fn start_with(conf: &str) -> Self {
        Self::start_with_plugins(conf, None).await
    }

    /// A node running the management plugin (HTTP API on 127.0.0.1, a port of its own).
    pub async fn start_with_management() -> Self {
        let management = free_port();
        let conf = format!("management.tcp.ip = 127.0.0.1\nmanagement.tcp.port = {management}\n");
        let rabbit = Self::start_with_plugins(&conf, Some(management)).await;
        wait_until("the management API", Duration::from_secs(60), || listening(management)).await;
        rabbit
    }

    async fn start_with_plugins(conf: &str, management_port: Option<u16>) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let id = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        for sub in ["mnesia", "log"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let plugins = if management_port.is_some() { "[rabbitmq_management].\n" } else { "[].\n" };
        std::fs::write(dir.path().join("enabled_plugins"), plugins).unwrap();
        std::fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.local = 127.0.0.1:{port}\n{conf}"),
        )
        .unwrap();
        // Debian's rabbitmq-server drops to the rabbitmq user when started as root.
        let _ = Command::new("chown").args(["-R", "rabbitmq:rabbitmq"]).arg(dir.path()).status();
        let mut rabbit = Self { port, management_port, node: format!("aw-{id}@localhost"), dir, child: None };
        rabbit.launch().await;
        rabbit
    }

    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    async fn launch(&mut self) {
        let d = self.dir.path();
        let out = std::fs::File::create(d.join("server.out")).unwrap();
        let _ = Command::new("chown").args(["rabbitmq:rabbitmq"]).arg(d.join("server.out")).status();
        let child = Command::new("rabbitmq-server")
            .env("RABBITMQ_NODENAME", &self.node)
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", free_port().to_string())
            .env("RABBITMQ_CONFIG_FILE", d.join("rabbitmq.conf"))
            .env("RABBITMQ_MNESIA_BASE", d.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", d.join("log"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", d.join("enabled_plugins"))
            .env("RABBITMQ_PID_FILE", d.join("pid"))
            .stdout(out.try_clone().unwrap())
            .stderr(out)
            .spawn()
            .expect("rabbitmq-server");
        self.child = Some(child);
        let port = self.port;
        wait_until("own RabbitMQ node", Duration::from_secs(90), || listening(port)).await;
    }

    /// Stops the node (its queues are durable: messages survive).
    pub async fn stop(&mut self) {
        let _ =
            Command::new("rabbitmqctl").args(["-q", "-n", &self.node, "stop"]).stdout(Stdio::null()).status();
        if let Some(mut child) = self.child.take() {
            let _ = child.wait();
        }
        let port = self.port;
        wait_until("own RabbitMQ node to stop", Duration::from_secs(30), || !listening(port)).await;
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.launch().await;
    }
}

impl Drop for OwnRabbit {
    fn drop(&mut self) {
        let _ = Command::new("rabbitmqctl")
            .args(["-q", "-n", &self.node, "stop"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Three RabbitMQ nodes of the test's own ([`OwnRabbit`]), joined into one cluster with
/// `rabbitmqctl join_cluster`: quorum queues declared on it get a member on each node.
pub struct OwnCluster {
    pub nodes: Vec<OwnRabbit>,
}

impl OwnCluster {
    pub async fn start() -> Self {
        let mut nodes = Vec::new();
        for _ in 0..3 {
            nodes.push(OwnRabbit::start().await);
        }
        let first = nodes[0].node.clone();
        for node in &nodes[1..] {
            node.ctl(&["stop_app"]);
            node.ctl(&["join_cluster", &first]);
            node.ctl(&["start_app"]);
            let port = node.port;
            wait_until("joined node", Duration::from_secs(60), || listening(port)).await;
        }
        Self { nodes }
    }

    /// Every node's URL, as `AMQP_URL` lists them, starting with node `first`.
    pub fn url_from(&self, first: usize) -> String {
        let n = self.nodes.len();
        (0..n).map(|i| self.nodes[(first + i) % n].url()).collect::<Vec<_>>().join(",")
    }

    /// Which node holds `queue`'s quorum leader, asked of a running node.
    pub fn leader_of(&self, queue: &str) -> Option<usize> {
        let asker = self.nodes.iter().find(|n| listening(n.port))?;
        let out = asker.ctl(&["-q", "--no-table-headers", "list_queues", "name", "leader"]);
        let leader = out.lines().find_map(|l| {
            let mut cols = l.split_whitespace();
            (cols.next() == Some(queue)).then(|| cols.next().unwrap_or_default().to_owned())
        })?;
        self.nodes.iter().position(|n| n.node == leader)
    }

    /// Which node the worker process `pid` is connected to (its connection's name says
    /// `audio-worker pid {pid}`, the broker's side names the node's port).
    pub fn node_of_worker(&self, pid: u32) -> Option<usize> {
        let asker = self.nodes.iter().find(|n| listening(n.port))?;
        let out = asker.ctl(&["-q", "--no-table-headers", "list_connections", "name", "client_properties"]);
        let line = out.lines().find(|l| {
            l.contains(&format!("audio-worker pid {pid}\""))
                || l.contains(&format!("audio-worker pid {pid}>>"))
        })?;
        self.nodes.iter().position(|n| {
            line.contains(&format!("-> 127.0.0.1:{} ", n.port))
                || line.contains(&format!("-> 127.0.0.1:{}\t", n.port))
        })
    }
}

impl OwnRabbit {
    /// Runs `rabbitmqctl` against this node; its standard output.
    fn ctl(&self, args: &[&str]) -> String {
        let out =
            Command::new("rabbitmqctl").args(["-n", &self.node]).args(args).output().expect("rabbitmqctl");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }
}

/// A process on a fixed port that can be stopped and started again with the same data.
pub struct OwnServer {
    pub port: u16,
    command: Box<dyn Fn(u16) -> Command + Send + Sync>,
    child: Option<Child>,
    _data: tempfile::TempDir,
}

impl OwnServer {
    /// s3s-fs on a free port, same credentials as the shared one.
    pub async fn s3() -> Self {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().to_owned();
        let bin = tools().join("bin/s3s-fs");
        let access = crate::helpers::env_or("S3_ACCESS_KEY_ID", "audioworker");
        let secret = crate::helpers::env_or("S3_SECRET_ACCESS_KEY", "audioworker-secret");
        Self::start(data, move |port| {
            let mut c = Command::new(&bin);
            c.args([
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--access-key",
                &access,
                "--secret-key",
                &secret,
            ])
            .arg(&root);
            c
        })
        .await
    }

    /// SecantusDB on a free port, storing to a folder so a restart keeps the documents.
    pub async fn mongo() -> Self {
        let data = tempfile::tempdir().unwrap();
        let root = data.path().join("db");
        let python = tools().join("venv/bin/python");
        Self::start(data, move |port| {
            let mut c = Command::new(&python);
            c.args([
                "-m",
                "secantus",
                "--host",
                "127.0.0.1",
                "--port",
                &port.to_string(),
                "--log-level",
                "WARNING",
            ])
            .arg("--storage-path")
            .arg(&root);
            c
        })
        .await
    }

    async fn start(
        data: tempfile::TempDir,
        command: impl Fn(u16) -> Command + Send + Sync + 'static,
    ) -> Self {
        let mut server = Self { port: free_port(), command: Box::new(command), child: None, _data: data };
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let child = (self.command)(self.port)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start server");
        self.child = Some(child);
        let port = self.port;
        wait_until("own server", Duration::from_secs(60), || listening(port)).await;
    }

    /// The folder the server keeps its data in.
    pub fn data_dir(&self) -> &std::path::Path {
        self._data.path()
    }

    pub fn url(&self, scheme: &str) -> String {
        format!("{scheme}://127.0.0.1:{}", self.port)
    }

    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        let port = self.port;
        wait_until("own server to stop", Duration::from_secs(10), || !listening(port)).await;
    }

    pub async fn start_again(&mut self) {
        self.launch().await;
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP forwarder in front of a service that, once armed, holds the first request containing
/// `pattern` (e.g. `PUT ` in front of S3: the worker's first write after it took the save lease)
/// until the test says go, so a fault can be injected at that exact point. Everything else
/// passes through unchanged.
pub struct Tripwire {
    pub port: u16,
    state: std::sync::Arc<TripwireState>,
}

struct TripwireState {
    pattern: Vec<u8>,
    armed: std::sync::atomic::AtomicBool,
    tripped: tokio::sync::Notify,
    resume: tokio::sync::Notify,
}

impl Tripwire {
    /// Forwards 127.0.0.1:{port} to 127.0.0.1:{target}.
    pub async fn start(target: u16, pattern: &str) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let state = std::sync::Arc::new(TripwireState {
            pattern: pattern.as_bytes().to_vec(),
            armed: Default::default(),
            tripped: Default::default(),
            resume: Default::default(),
        });
        let shared = state.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let state = shared.clone();
                tokio::spawn(async move {
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async {
                        use tokio::io::{AsyncReadExt, AsyncWriteExt};
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            let hit = buf[..n].windows(state.pattern.len()).any(|w| w == state.pattern);
                            if hit && state.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                                state.tripped.notify_one();
                                state.resume.notified().await;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    // When the service closes (or dies), the client sees it close too, as it would
                    // without the tripwire in between.
                    let downstream = async {
                        use tokio::io::AsyncWriteExt;
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    let _ = tokio::join!(upstream, downstream);
                });
            }
        });
        Self { port, state }
    }

    /// Holds the next request that contains the pattern.
    pub fn arm(&self) {
        self.state.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the armed pattern was seen (its request is held), at most `limit`.
    pub async fn tripped(&self, limit: Duration) {
        tokio::time::timeout(limit, self.state.tripped.notified())
            .await
            .expect("the tripwire was not tripped");
    }

    /// Lets the held request through.
    pub fn resume(&self) {
        self.state.resume.notify_one();
    }
}

/// A TCP forwarder in front of a service that the test can cut, as a network partition would:
/// [`Gate::close`] drops every open connection and refuses new ones until [`Gate::open`]. The
/// service keeps running (and keeps what it stored), unlike a killed process.
pub struct Gate {
    pub port: u16,
    closed: tokio::sync::watch::Sender<bool>,
}

impl Gate {
    /// Forwards 127.0.0.1:{port} to 127.0.0.1:{target}, open.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (closed, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                if *watch.borrow() {
                    continue; // dropped: the connection is refused
                }
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    let Ok(mut server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut client, &mut server) => {}
                        _ = watch.wait_for(|closed| *closed) => {}
                    }
                });
            }
        });
        Self { port, closed }
    }

    /// Cuts the service off: open connections are dropped, new ones refused.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.closed.send_replace(false);
    }
}

/// A TCP forwarder that loses one reply: once armed, the next request containing the pattern
/// reaches the service, but its answer is never passed on and the connection is dropped, as when
/// a network fails right after the service applied a write. Other connections are not touched.
pub struct ReplyCut {
    pub port: u16,
    armed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    cut: std::sync::Arc<tokio::sync::Notify>,
    /// As [`Gate`]: while set, open connections are dropped and new ones refused.
    closed: tokio::sync::watch::Sender<bool>,
}

impl ReplyCut {
    /// Forwards 127.0.0.1:{port} to 127.0.0.1:{target}.
    pub async fn start(target: u16, pattern: &str) -> Self {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let armed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let cut = std::sync::Arc::new(tokio::sync::Notify::new());
        let pattern = pattern.as_bytes().to_vec();
        let (shared_armed, shared_cut) = (armed.clone(), cut.clone());
        let (closed, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                if *watch.borrow() {
                    continue; // dropped: the connection is refused
                }
                let (armed, cut, pattern) = (shared_armed.clone(), shared_cut.clone(), pattern.clone());
                let mut watch = watch.clone();
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let lost = std::sync::atomic::AtomicBool::new(false);
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            let hit = buf[..n].windows(pattern.len()).any(|w| w == pattern);
                            if hit && armed.swap(false, Ordering::SeqCst) {
                                lost.store(true, Ordering::SeqCst);
                                let _ = server_write.write_all(&buf[..n]).await;
                                cut.notify_one();
                                // Time for the service to apply it; then the connection goes.
                                tokio::time::sleep(Duration::from_millis(500)).await;
                                return;
                            }
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    let downstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match server_read.read(&mut buf).await {
                                Ok(0) | Err(_) => return,
                                Ok(n) => n,
                            };
                            if lost.load(Ordering::SeqCst) {
                                continue; // the reply is lost; the connection drops shortly
                            }
                            if client_write.write_all(&buf[..n]).await.is_err() {
                                return;
                            }
                        }
                    };
                    // Whichever side ends first ends the connection (both halves dropped).
                    tokio::select! {
                        () = upstream => {}
                        () = downstream => {}
                        _ = watch.wait_for(|closed| *closed) => {}
                    }
                });
            }
        });
        Self { port, armed, cut, closed }
    }

    /// Cuts the service off: open connections are dropped, new ones refused.
    pub fn close(&self) {
        self.closed.send_replace(true);
    }

    /// Lets connections through again.
    pub fn open(&self) {
        self.closed.send_replace(false);
    }

    /// Loses the reply to the next request that contains the pattern.
    pub fn arm(&self) {
        self.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    }

    /// Waits until the armed reply was lost, at most `limit`.
    pub async fn lost(&self, limit: Duration) {
        tokio::time::timeout(limit, self.cut.notified()).await.expect("no reply was cut");
    }
}

/// A TCP forwarder that keeps a copy of everything each client sent (one buffer per
/// connection, in order), so a test can read the requests the worker really made: headers and
/// bodies as they went on the wire.
pub struct Wiretap {
    pub port: u16,
    sent: Connections,
}

/// What each connection through a [`Wiretap`] sent, one buffer per connection.
type Connections = std::sync::Arc<std::sync::Mutex<Vec<std::sync::Arc<std::sync::Mutex<Vec<u8>>>>>>;

impl Wiretap {
    /// Forwards 127.0.0.1:{port} to 127.0.0.1:{target}.
    pub async fn start(target: u16) -> Self {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let sent: Connections = Default::default();
        let connections = sent.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let copy = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
                connections.lock().unwrap().push(copy.clone());
                tokio::spawn(async move {
                    use tokio::io::{AsyncReadExt, AsyncWriteExt};
                    let Ok(server) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await else {
                        return;
                    };
                    let (mut client_read, mut client_write) = client.into_split();
                    let (mut server_read, mut server_write) = server.into_split();
                    let upstream = async {
                        let mut buf = vec![0u8; 64 * 1024];
                        loop {
                            let n = match client_read.read(&mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                            copy.lock().unwrap().extend_from_slice(&buf[..n]);
                            if server_write.write_all(&buf[..n]).await.is_err() {
                                break;
                            }
                        }
                        let _ = server_write.shutdown().await;
                    };
                    let downstream = async {
                        let _ = tokio::io::copy(&mut server_read, &mut client_write).await;
                        let _ = client_write.shutdown().await;
                    };
                    let _ = tokio::join!(upstream, downstream);
                });
            }
        });
        Self { port, sent }
    }

    /// Every request seen so far, parsed (HTTP/1.1 with Content-Length bodies, as the S3 SDK
    /// sends them): method, target, lowercased headers and body.
    pub fn requests(&self) -> Vec<TappedRequest> {
        let mut out = Vec::new();
        for connection in self.sent.lock().unwrap().iter() {
            let bytes = connection.lock().unwrap().clone();
            let mut at = 0;
            while let Some(end) = bytes[at..].windows(4).position(|w| w == b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&bytes[at..at + end]).into_owned();
                let mut lines = head.split("\r\n");
                let mut request_line = lines.next().unwrap_or_default().split(' ');
                let method = request_line.next().unwrap_or_default().to_owned();
                let target = request_line.next().unwrap_or_default().to_owned();
                let headers: HashMap<String, String> = lines
                    .filter_map(|l| l.split_once(':'))
                    .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
                    .collect();
                let length: usize = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                let start = at + end + 4;
                let body = bytes[start..(start + length).min(bytes.len())].to_vec();
                at = start + length;
                out.push(TappedRequest { method, target, headers, body });
                if at >= bytes.len() {
                    break;
                }
            }
        }
        out
    }
}

/// One request a [`Wiretap`] saw.
#[derive(Debug, Clone)]
pub struct TappedRequest {
    pub method: String,
    pub target: String,
    pub headers: HashMap<String, String>,
    pub body: Vec<u8>,
}
