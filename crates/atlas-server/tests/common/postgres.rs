//! A real PostgreSQL for the tests: Debian's server binaries (the `postgresql` package), one
//! cluster per test binary in a temporary directory on a free loopback port, each test with a
//! database of its own. PostgreSQL refuses to run as root: when the tests run as root it runs
//! as `nobody`. A watcher stops it and removes its directory when the test process exits, even
//! by SIGKILL.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub struct Postgres {
    pub port: u16,
    /// Outlives the tests by design: it stops the cluster once they are gone.
    _watcher: std::process::Child,
}

static CLUSTER: OnceLock<Postgres> = OnceLock::new();
static DATABASES: AtomicUsize = AtomicUsize::new(0);

/// The test binary's cluster, started on first use.
pub fn cluster() -> &'static Postgres {
    CLUSTER.get_or_init(start)
}

/// A fresh, empty database of the cluster: its URL.
pub fn database() -> String {
    let pg = cluster();
    let name = format!(
        "t{}_{}",
        std::process::id(),
        DATABASES.fetch_add(1, Ordering::Relaxed)
    );
    let mut admin = postgres::Client::connect(&pg.url("postgres"), postgres::NoTls)
        .expect("connecting to the test cluster");
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .expect("creating a test database");
    pg.url(&name)
}

impl Postgres {
    pub fn url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }
}

/// The directory of `initdb` and `postgres`: ATLAS_TEST_PG_BIN, or the newest Debian install.
fn bin_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("ATLAS_TEST_PG_BIN") {
        return PathBuf::from(dir);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|b| b.join("initdb").exists())
        .collect();
    found.sort_by_key(|p| {
        p.parent()
            .and_then(|v| v.file_name())
            .and_then(|v| v.to_str())
            .and_then(|v| v.parse::<u32>().ok())
    });
    found.pop().expect(
        "PostgreSQL's server binaries were not found: install Debian's postgresql package \
         (apt-get install postgresql) or set ATLAS_TEST_PG_BIN to the directory of initdb",
    )
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` as the cluster's user: `nobody` under root, else ourselves.
fn as_owner(program: &Path) -> Command {
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "nobody", "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn start() -> Postgres {
    let bin = bin_dir();
    let dir = tempfile::Builder::new()
        .prefix("atlas-pg-")
        .tempdir()
        .expect("a temporary directory")
        .keep();
    let data = dir.join("data");
    if is_root() {
        let ok = Command::new("chown")
            .args(["-R", "nobody"])
            .arg(&dir)
            .status()
            .is_ok_and(|s| s.success());
        assert!(ok, "chown of the test cluster's directory to nobody");
    }
    let init = as_owner(&bin.join("initdb"))
        .args([
            "-D",
            data.to_str().unwrap(),
            "-U",
            "postgres",
            "--auth=trust",
        ])
        .args(["-E", "UTF8", "--no-sync"])
        .stdout(Stdio::null())
        .output()
        .expect("running initdb");
    assert!(
        init.status.success(),
        "initdb failed: {}",
        String::from_utf8_lossy(&init.stderr)
    );
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let server = as_owner(&bin.join("postgres"));
    let mut args: Vec<String> = vec![server.get_program().to_string_lossy().into_owned()];
    args.extend(server.get_args().map(|a| a.to_string_lossy().into_owned()));
    args.extend(
        [
            "-D",
            data.to_str().unwrap(),
            "-p",
            &port.to_string(),
            "-k",
            dir.to_str().unwrap(),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=300",
            "-c",
            "fsync=off",
        ]
        .map(String::from),
    );
    // The watcher: runs the server, and when this test process is gone stops it (fast
    // shutdown) and removes its directory.
    let watch = r#"watched=$1; dir=$2; shift 2
"$@" >"$dir/log" 2>&1 &
while kill -0 "$watched" 2>/dev/null; do sleep 0.5; done
kill -INT "$(head -1 "$dir/data/postmaster.pid" 2>/dev/null)" 2>/dev/null
wait
rm -rf "$dir""#;
    let watcher = Command::new("sh")
        .args(["-c", watch, "sh"])
        .arg(std::process::id().to_string())
        .arg(&dir)
        .args(&args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting postgres");
    let deadline = Instant::now() + Duration::from_secs(60);
    let url = format!("postgres://postgres@127.0.0.1:{port}/postgres");
    while postgres::Client::connect(&url, postgres::NoTls).is_err() {
        assert!(
            Instant::now() < deadline,
            "postgres did not start: {}",
            std::fs::read_to_string(dir.join("log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    Postgres {
        port,
        _watcher: watcher,
    }
}
