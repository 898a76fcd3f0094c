//! The seed architecture's real services, each started inside its segment's
//! cgroup (or, for the enterprise CRM, inside the remote namespace) before it
//! opens a socket, and checked to answer before the agent starts.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, bail};

use super::host::Remote;
use super::packages::{Tools, user_ids};
use super::sys::{self, Placement, Proc};

pub const INFERENCE_PORT: u16 = 8000;
pub const RETRIEVAL_PORT: u16 = 5432;
pub const CONVERSATION_PORT: u16 = 6379;
pub const GATEWAY_PORT: u16 = 8080;
pub const ENTERPRISE_PORT: u16 = 80;

const START_TIMEOUT: Duration = Duration::from_secs(30);

/// What the clients ask, and what a correct answer contains.
pub struct Probes {
    pub sql: String,
    pub sql_expect: String,
    pub redis_key: String,
    pub redis_expect: String,
}

/// Where everything goes.
pub struct Layout<'a> {
    pub tmp: &'a Path,
    pub tools: &'a Tools,
    pub remote: &'a Remote,
    /// cgroup directory of a segment by name.
    pub cgroup: &'a dyn Fn(&str) -> PathBuf,
    /// cgroup of the remote namespace's processes (outside the attach point).
    pub remote_cgroup: &'a Path,
}

/// Fails clearly when a port the policy names is already taken on 127.0.0.1.
pub fn check_ports_free() -> anyhow::Result<()> {
    for (port, what) in [
        (INFERENCE_PORT, "inference (the policy allows orchestrator -> inference on 8000/tcp)"),
        (RETRIEVAL_PORT, "retrieval's PostgreSQL (the policy allows orchestrator -> retrieval on 5432/tcp)"),
        (CONVERSATION_PORT, "conversation-store's Redis (the policy allows orchestrator -> conversation-store on 6379/tcp)"),
        (GATEWAY_PORT, "the gateway's nginx (the policy allows orchestrator -> gateway on 8080/tcp)"),
    ] {
        if let Err(e) = TcpListener::bind(("127.0.0.1", port)) {
            let owner = Command::new("ss")
                .args(["-Hltnp", &format!("sport = :{port}")])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .unwrap_or_default();
            bail!(
                "127.0.0.1:{port} is not free ({e}); the demo runs {what} there.\n{}Stop whatever listens there (e.g. a system service: `systemctl stop …`) and run the demo again.",
                if owner.is_empty() { String::new() } else { format!("listening now:\n{}\n", sys::indent(&owner)) }
            );
        }
    }
    Ok(())
}

fn connects(addr: SocketAddr) -> bool {
    TcpStream::connect_timeout(&addr, Duration::from_millis(300)).is_ok()
}

/// Waits until every address accepts TCP connections (failing at once if the process exits).
fn wait_listening(p: &mut Proc, addrs: &[SocketAddr]) -> anyhow::Result<()> {
    let what = format!("{} to listen on {}", p.name, addrs.iter().map(|a| a.to_string()).collect::<Vec<_>>().join(" and "));
    sys::wait_for(&what, START_TIMEOUT, || {
        p.ensure_running()?;
        Ok(addrs.iter().all(|a| connects(*a)).then_some(()))
    })
    .with_context(|| format!("{} did not come up; its output:\n{}", p.name, sys::indent(&p.log_tail(25))))
}

fn addr(ip: &str, port: u16) -> SocketAddr {
    let ip: std::net::IpAddr = ip.parse().expect("demo addresses are valid");
    SocketAddr::new(ip, port)
}

fn log_path(l: &Layout, name: &str) -> PathBuf {
    l.tmp.join("logs").join(format!("{name}.log"))
}

const INFERENCE_PY: &str = r#""""ztai demo: the inference segment's model server, an OpenAI-style
completions endpoint (POST /v1/completions, GET /v1/models)."""
import json, socketserver, sys, threading, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "ztai-demo-tiny"
ANSWER = ("Ticket 42 qualifies for a refund under the enterprise refund policy; "
          "confirm the customer's tier in the CRM through the gateway.").split()


class Server(ThreadingHTTPServer):
    def server_bind(self):  # no reverse DNS lookup of the listen address
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]


class Handler(BaseHTTPRequestHandler):
    server_version = "ztai-demo-inference/1"

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def error(self, code, message):
        self.reply(code, {"error": {"message": message, "type": "invalid_request_error"}})

    def do_GET(self):
        if self.path == "/v1/models":
            self.reply(200, {"object": "list", "data": [{"id": MODEL, "object": "model", "owned_by": "ztai-demo"}]})
        else:
            self.error(404, "unknown path " + self.path)

    def do_POST(self):
        if self.path != "/v1/completions":
            return self.error(404, "unknown path " + self.path)
        try:
            req = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        except ValueError:
            return self.error(400, "the body is not JSON")
        prompt = req.get("prompt", "")
        if isinstance(prompt, list):
            prompt = " ".join(map(str, prompt))
        n = max(1, min(int(req.get("max_tokens") or 16), len(ANSWER)))
        used = len(str(prompt).split())
        self.reply(200, {
            "id": "cmpl-ztai-demo-%d" % int(time.time() * 1000),
            "object": "text_completion",
            "created": int(time.time()),
            "model": req.get("model") or MODEL,
            "choices": [{"index": 0, "text": " " + " ".join(ANSWER[:n]), "logprobs": None,
                         "finish_reason": "length" if n < len(ANSWER) else "stop"}],
            "usage": {"prompt_tokens": used, "completion_tokens": n, "total_tokens": used + n},
        })

    def log_message(self, fmt, *args):
        sys.stderr.write("inference: %s %s\n" % (self.client_address[0], fmt % args))


for listen in sys.argv[1:]:
    host, port = listen.rsplit(":", 1)
    server = Server((host, int(port)), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    print("inference: serving", MODEL, "on", listen, flush=True)
threading.Event().wait()
"#;

const CRM_PY: &str = r#""""ztai demo: the enterprise segment's CRM, a JSON service on port 80 of the
remote network namespace (IPv4 and IPv6)."""
import json, socket, socketserver, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

CUSTOMERS = {
    "42": {"id": 42, "name": "Ada Lovelace", "company": "Analytical Engines Ltd", "tier": "gold", "open_tickets": 2},
    "7": {"id": 7, "name": "Grace Hopper", "company": "Compiler Works", "tier": "platinum", "open_tickets": 0},
}


class Server(ThreadingHTTPServer):
    address_family = socket.AF_INET6

    def server_bind(self):  # dual stack, no reverse DNS lookup
        self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = "crm.enterprise.example", self.server_address[1]


class Handler(BaseHTTPRequestHandler):
    server_version = "ztai-demo-crm/1"

    def reply(self, code, body):
        data = json.dumps(body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        parts = [p for p in self.path.split("?")[0].split("/") if p]
        if parts == ["crm", "customers"]:
            return self.reply(200, {"service": "enterprise-crm", "customers": list(CUSTOMERS.values())})
        if len(parts) == 3 and parts[:2] == ["crm", "customers"] and parts[2] in CUSTOMERS:
            return self.reply(200, {"service": "enterprise-crm", "customer": CUSTOMERS[parts[2]],
                                    "client": self.client_address[0], "via": self.headers.get("Via")})
        self.reply(404, {"service": "enterprise-crm", "error": "no such resource: " + self.path})

    def log_message(self, fmt, *args):
        sys.stderr.write("crm: %s %s\n" % (self.client_address[0], fmt % args))


server = Server(("::", int(sys.argv[1])), Handler)
print("crm: listening on [::]:%s" % sys.argv[1], flush=True)
server.serve_forever()
"#;

/// The enterprise CRM inside the remote namespace, outside every segment cgroup.
pub fn start_crm(l: &Layout) -> anyhow::Result<Proc> {
    let script = l.tmp.join("crm.py");
    std::fs::write(&script, CRM_PY)?;
    let mut cmd = l.remote.exec(&l.tools.python);
    cmd.arg("-u").arg(&script).arg(ENTERPRISE_PORT.to_string());
    sys::place(&mut cmd, Placement::cgroup(l.remote_cgroup));
    let mut p = Proc::spawn("enterprise CRM (python3 http.server in netns ztai-demo)", &mut cmd, Some(&log_path(l, "enterprise")))?;
    wait_listening(&mut p, &[addr(&l.remote.remote_v4, ENTERPRISE_PORT), addr(&l.remote.remote_v6, ENTERPRISE_PORT)])?;
    Ok(p)
}

/// The OpenAI-style completion server on 127.0.0.1:8000 (and on the host's
/// address on the enterprise link, so the enterprise's attempts reach a socket).
pub fn start_inference(l: &Layout) -> anyhow::Result<Proc> {
    let script = l.tmp.join("inference.py");
    std::fs::write(&script, INFERENCE_PY)?;
    let mut cmd = Command::new(&l.tools.python);
    cmd.arg("-u").arg(&script).arg(format!("127.0.0.1:{INFERENCE_PORT}")).arg(format!("{}:{INFERENCE_PORT}", l.remote.host_v4));
    sys::place(&mut cmd, Placement::cgroup(&(l.cgroup)("inference")));
    let mut p = Proc::spawn("inference (python3 http.server, POST /v1/completions)", &mut cmd, Some(&log_path(l, "inference")))?;
    wait_listening(&mut p, &[addr("127.0.0.1", INFERENCE_PORT), addr(&l.remote.host_v4, INFERENCE_PORT)])?;
    Ok(p)
}

fn psql_local(l: &Layout, socket_dir: &Path, db: &str, sql: &str) -> anyhow::Result<String> {
    let mut cmd = Command::new(&l.tools.psql);
    cmd.arg("-h").arg(socket_dir).args([
        "-p",
        &RETRIEVAL_PORT.to_string(),
        "-U",
        "postgres",
        "-d",
        db,
        "-XAtq",
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        sql,
    ]);
    sys::run_ok(&mut cmd, Duration::from_secs(20))
}

/// A throwaway PostgreSQL cluster (initdb into the temp dir, run as the
/// postgres user) on 127.0.0.1:5432, seeded with a few documents (and
/// pgvector embeddings where the extension is installed).
pub fn start_postgres(l: &Layout) -> anyhow::Result<(Proc, Probes)> {
    let (uid, gid) = user_ids("postgres")?;
    let dir = l.tmp.join("retrieval");
    let data = dir.join("data");
    std::fs::create_dir(&dir)?;
    std::os::unix::fs::chown(&dir, Some(uid), Some(gid))?;
    let cgroup = (l.cgroup)("retrieval");

    let mut initdb = Command::new(l.tools.pg_bin.join("initdb"));
    initdb.arg("-D").arg(&data).args(["-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"]);
    sys::place(&mut initdb, Placement::cgroup(&cgroup).run_as(uid, gid));
    sys::run_ok(&mut initdb, Duration::from_secs(120)).context("initdb failed")?;
    // The enterprise's attempts come from the remote namespace: let them in
    // as far as PostgreSQL is concerned, so only ztai decides.
    let hba = data.join("pg_hba.conf");
    let mut text = std::fs::read_to_string(&hba)?;
    text.push_str(&format!(
        "\n# ztai demo: the enterprise link\nhost all all {}/24 trust\n",
        l.remote.host_v4.rsplit_once('.').map(|(n, _)| format!("{n}.0")).unwrap_or_default()
    ));
    std::fs::write(&hba, text)?;

    let mut cmd = Command::new(l.tools.pg_bin.join("postgres"));
    cmd.arg("-D").arg(&data).args([
        "-c",
        &format!("listen_addresses=127.0.0.1,{}", l.remote.host_v4),
        "-c",
        &format!("port={RETRIEVAL_PORT}"),
        "-c",
        &format!("unix_socket_directories={}", dir.display()),
        "-c",
        "fsync=off",
        "-c",
        "synchronous_commit=off",
        "-c",
        "full_page_writes=off",
        "-c",
        "shared_buffers=16MB",
        "-c",
        "max_connections=50",
        "-c",
        "ssl=off",
    ]);
    sys::place(&mut cmd, Placement::cgroup(&cgroup).run_as(uid, gid));
    let mut p =
        Proc::spawn(&format!("retrieval (PostgreSQL {} as user postgres)", l.tools.pg_major), &mut cmd, Some(&log_path(l, "retrieval")))?
            .stop_with(sys::SIGINT); // fast shutdown
    wait_listening(&mut p, &[addr("127.0.0.1", RETRIEVAL_PORT), addr(&l.remote.host_v4, RETRIEVAL_PORT)])?;
    sys::wait_for("PostgreSQL to accept queries", START_TIMEOUT, || {
        p.ensure_running()?;
        Ok(psql_local(l, &dir, "postgres", "SELECT 1").ok())
    })?;

    psql_local(l, &dir, "postgres", "CREATE DATABASE ztai")?;
    let docs = [
        ("Refund policy for enterprise customers", [0.9, 0.1, 0.0]),
        ("GPU quota for the inference fleet", [0.0, 0.9, 0.1]),
        ("CRM escalation runbook", [0.1, 0.0, 0.9]),
    ];
    let (column, lit): (&str, fn(&[f64; 3]) -> String) = if l.tools.pgvector {
        ("vector(3)", |v| format!("'[{},{},{}]'", v[0], v[1], v[2]))
    } else {
        ("real[]", |v| format!("ARRAY[{},{},{}]::real[]", v[0], v[1], v[2]))
    };
    let rows: Vec<String> = docs.iter().enumerate().map(|(i, (title, v))| format!("({}, '{}', {})", i + 1, title, lit(v))).collect();
    let seed = format!(
        "{}CREATE TABLE docs (id int PRIMARY KEY, title text NOT NULL, embedding {column} NOT NULL); INSERT INTO docs VALUES {};",
        if l.tools.pgvector { "CREATE EXTENSION vector; " } else { "" },
        rows.join(", ")
    );
    psql_local(l, &dir, "ztai", &seed)?;
    // Nearest document to a "refund" query embedding.
    let sql = if l.tools.pgvector {
        "SELECT title FROM docs ORDER BY embedding <-> '[0.8,0.2,0.0]' LIMIT 1".to_string()
    } else {
        "SELECT title FROM docs ORDER BY (embedding[1]-0.8)^2 + (embedding[2]-0.2)^2 + (embedding[3]-0.0)^2 LIMIT 1".to_string()
    };
    let got = psql_local(l, &dir, "ztai", &sql)?;
    if got.trim() != docs[0].0 {
        bail!("the retrieval store answered {got:?} to {sql:?}, expected {:?}", docs[0].0);
    }
    Ok((
        p,
        Probes { sql, sql_expect: docs[0].0.to_string(), redis_key: "conversation:42".into(), redis_expect: "where is my refund".into() },
    ))
}

fn redis_cli(l: &Layout, args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(&l.tools.redis_cli);
    cmd.args(["-h", "127.0.0.1", "-p", &CONVERSATION_PORT.to_string()]).args(args);
    sys::run_ok(&mut cmd, Duration::from_secs(10))
}

/// redis-server on 127.0.0.1:6379, no persistence, working dir in the temp dir.
pub fn start_redis(l: &Layout) -> anyhow::Result<Proc> {
    let dir = l.tmp.join("conversation-store");
    std::fs::create_dir(&dir)?;
    // Redis picks its mode from its program name; Debian's redis-server is a
    // symlink named so to the binary in redis-tools. Do the same here.
    let program = if l.tools.redis_server.ends_with("redis-server") {
        l.tools.redis_server.clone()
    } else {
        let link = dir.join("redis-server");
        std::os::unix::fs::symlink(&l.tools.redis_server, &link)?;
        link
    };
    let mut cmd = Command::new(&program);
    cmd.args(["--port", &CONVERSATION_PORT.to_string(), "--bind", "127.0.0.1", &l.remote.host_v4])
        .args(["--save", "", "--appendonly", "no", "--protected-mode", "no", "--daemonize", "no", "--dir"])
        .arg(&dir);
    sys::place(&mut cmd, Placement::cgroup(&(l.cgroup)("conversation-store")));
    let mut p = Proc::spawn("conversation-store (redis-server)", &mut cmd, Some(&log_path(l, "conversation-store")))?;
    wait_listening(&mut p, &[addr("127.0.0.1", CONVERSATION_PORT), addr(&l.remote.host_v4, CONVERSATION_PORT)])?;
    sys::wait_for("redis-server to answer PING", START_TIMEOUT, || {
        p.ensure_running()?;
        Ok(redis_cli(l, &["PING"]).ok().filter(|o| o.trim() == "PONG"))
    })?;
    redis_cli(
        l,
        &[
            "RPUSH",
            "conversation:42",
            "user: where is my refund for ticket 42?",
            "assistant: checking the refund policy and your CRM record",
        ],
    )?;
    Ok(p)
}

/// nginx on 127.0.0.1:8080 as the API gateway: /crm/ is proxied to the
/// enterprise CRM. Checked end to end (through the proxy) before the agent starts.
pub fn start_nginx(l: &Layout) -> anyhow::Result<Proc> {
    let dir = l.tmp.join("gateway");
    std::fs::create_dir(&dir)?;
    let conf = dir.join("nginx.conf");
    let d = dir.display();
    std::fs::write(
        &conf,
        format!(
            r#"# ztai demo: the gateway segment's API gateway.
daemon off;
worker_processes 1;
user nobody nogroup;
pid {d}/nginx.pid;
error_log stderr notice;
events {{ worker_connections 128; }}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    default_type application/json;
    server {{
        listen 127.0.0.1:{GATEWAY_PORT};
        listen {host}:{GATEWAY_PORT};
        location = /healthz {{ return 200 '{{"gateway":"ok"}}'; }}
        # The single, auditable way to the enterprise systems.
        location /crm/ {{
            proxy_pass http://{crm}:{ENTERPRISE_PORT};
            proxy_set_header Via "1.1 ztai-demo-gateway";
            proxy_set_header X-Forwarded-For $remote_addr;
            proxy_connect_timeout 3s;
            proxy_read_timeout 5s;
        }}
        location / {{ return 404 '{{"error":"not routed by the gateway"}}'; }}
    }}
}}
"#,
            host = l.remote.host_v4,
            crm = l.remote.remote_v4,
        ),
    )?;
    let mut cmd = Command::new(&l.tools.nginx);
    cmd.arg("-p").arg(format!("{d}/")).arg("-c").arg(&conf).args(["-e", "stderr"]);
    sys::place(&mut cmd, Placement::cgroup(&(l.cgroup)("gateway")));
    let mut p = Proc::spawn("gateway (nginx)", &mut cmd, Some(&log_path(l, "gateway")))?;
    wait_listening(&mut p, &[addr("127.0.0.1", GATEWAY_PORT), addr(&l.remote.host_v4, GATEWAY_PORT)])?;
    // End to end through the proxy, before any policy is in force.
    let url = format!("http://127.0.0.1:{GATEWAY_PORT}/crm/customers/42");
    let out = sys::run_ok(Command::new(&l.tools.curl).args(["-sS", "-f", "-m", "5", &url]), Duration::from_secs(10))
        .with_context(|| format!("the gateway cannot reach the enterprise CRM (nginx output:\n{})", sys::indent(&p.log_tail(15))))?;
    if !out.contains("enterprise-crm") {
        bail!("{url} answered {out:?}, not the CRM");
    }
    Ok(p)
}
