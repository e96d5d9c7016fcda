//! The real `atlas-serve serve` binary on a loopback port with its own data directory, and a
//! small blocking HTTP client for it.

#![allow(dead_code)]

pub mod data_merge;
pub mod oracle;
pub mod postgres;
pub mod spec;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn fixtures() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/tiny")
}

pub const TVS: [&str; 2] = [
    "delta_c_openclip.safetensors",
    "delta_a_openclip_with_proj.safetensors",
];
pub const TV_NAMES: [&str; 2] = ["delta_c_openclip", "delta_a_openclip_with_proj"];

/// Flags serving the tiny fixture CLIP at f32 with `lib` as its library directory.
pub fn library_flags(lib: &Path) -> Vec<String> {
    [
        "--model",
        fixtures().join("clip").to_str().unwrap(),
        "--store",
        "f32",
        "--tv-dir",
        lib.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// Flags serving the tiny fixture CLIP with its two task vectors at f32.
pub fn tiny_flags() -> Vec<String> {
    let tvs: Vec<String> = TVS
        .iter()
        .map(|t| fixtures().join(t).display().to_string())
        .collect();
    vec![
        "--model".into(),
        fixtures().join("clip").display().to_string(),
        "--store".into(),
        "f32".into(),
        "--tvs".into(),
        tvs.join(","),
    ]
}

pub struct Server {
    child: Child,
    pub base: String,
    pub data: PathBuf,
    pub log: PathBuf,
    pub key: Option<String>,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the server on `data` (kept between restarts) and waits until /readyz says ready.
pub fn start(data: &Path, flags: &[String], env: &[(&str, &str)]) -> Server {
    start_under(&[], data, flags, env)
}

/// [`start`], run by the program `under` (a program and its arguments, which ends by
/// executing the server binary it is given after them), e.g. in a namespace of its own.
pub fn start_under(
    under: &[String],
    data: &Path,
    flags: &[String],
    env: &[(&str, &str)],
) -> Server {
    let port = free_port();
    let log = data.with_extension(format!("{port}.log"));
    let out = std::fs::File::create(&log).unwrap();
    let bin = env!("CARGO_BIN_EXE_atlas-serve");
    let mut cmd = match under.split_first() {
        None => Command::new(bin),
        Some((program, args)) => {
            let mut c = Command::new(program);
            c.args(args).arg(bin);
            c
        }
    };
    cmd.arg("serve")
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--data-dir", data.to_str().unwrap()])
        .args(flags)
        .env_remove("ATLAS_API_KEYS")
        .stdout(Stdio::from(out.try_clone().unwrap()))
        .stderr(Stdio::from(out));
    for (k, v) in env {
        cmd.env(k, v);
    }
    let server = Server {
        child: cmd.spawn().unwrap(),
        base: format!("http://127.0.0.1:{port}"),
        data: data.to_path_buf(),
        log,
        key: None,
    };
    server.wait_ready(Duration::from_secs(600));
    server
}

impl Server {
    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn wait_ready(&self, limit: Duration) {
        let deadline = Instant::now() + limit;
        loop {
            if let Ok(r) = reqwest::blocking::get(format!("{}/readyz", self.base)) {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "server did not become ready: {}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// SIGKILL: no shutdown path runs.
    pub fn kill(mut self) -> String {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.log_text()
    }

    /// SIGTERM, then wait for the process to exit.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s;
            }
            assert!(Instant::now() < deadline, "no exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn req(&self, m: reqwest::Method, path: &str) -> reqwest::blocking::RequestBuilder {
        let r = reqwest::blocking::Client::new().request(m, format!("{}{path}", self.base));
        match &self.key {
            Some(k) => r.bearer_auth(k),
            None => r,
        }
    }

    pub fn get(&self, path: &str) -> (u16, Value) {
        answer(self.req(reqwest::Method::GET, path).send().unwrap())
    }

    pub fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        answer(
            self.req(reqwest::Method::POST, path)
                .json(body)
                .send()
                .unwrap(),
        )
    }

    pub fn post_with(
        &self,
        path: &str,
        f: impl FnOnce(reqwest::blocking::RequestBuilder) -> reqwest::blocking::RequestBuilder,
    ) -> (u16, Value) {
        answer(f(self.req(reqwest::Method::POST, path)).send().unwrap())
    }

    pub fn delete(&self, path: &str) -> (u16, Value) {
        answer(self.req(reqwest::Method::DELETE, path).send().unwrap())
    }

    /// The server's resident memory, MiB, from its own /metrics.
    pub fn rss_mib(&self) -> f64 {
        let m = self.metrics();
        let line = m
            .lines()
            .find(|l| l.starts_with("process_resident_memory_bytes "))
            .unwrap();
        line.rsplit(' ').next().unwrap().parse::<f64>().unwrap() / 1048576.0
    }

    pub fn metrics(&self) -> String {
        reqwest::blocking::get(format!("{}/metrics", self.base))
            .unwrap()
            .text()
            .unwrap()
    }

    /// Reads a composition's event stream until its final status event; returns the events'
    /// JSON.
    pub fn events_until_final(&self, id: &str) -> Vec<Value> {
        use std::io::{BufRead, BufReader};
        let r = reqwest::blocking::Client::builder()
            .timeout(Duration::from_secs(120))
            .build()
            .unwrap()
            .get(format!("{}/compositions/{id}/events", self.base))
            .send()
            .unwrap();
        assert_eq!(r.headers()["content-type"], "text/event-stream");
        let mut out = Vec::new();
        for line in BufReader::new(r).lines() {
            let line = line.unwrap();
            if let Some(data) = line.strip_prefix("data: ") {
                let v: Value = serde_json::from_str(data).unwrap();
                let done = matches!(
                    v["status"].as_str(),
                    Some("succeeded" | "failed" | "cancelled")
                );
                out.push(v);
                if done {
                    break;
                }
            }
        }
        out
    }

    /// Polls a composition until its status is final.
    pub fn wait_final(&self, id: &str, limit: Duration) -> Value {
        let deadline = Instant::now() + limit;
        loop {
            let (_, v) = self.get(&format!("/compositions/{id}"));
            if matches!(
                v["status"].as_str(),
                Some("succeeded" | "failed" | "cancelled")
            ) {
                return v;
            }
            assert!(Instant::now() < deadline, "job did not finish: {v}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Status and JSON body; a problem answer is checked for its content type on the way.
fn answer(r: reqwest::blocking::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let ctype = content_type(&r);
    let v: Value = r.json().unwrap_or(Value::Null);
    if status >= 400 {
        assert_eq!(ctype, "application/problem+json", "{status} {v}");
        assert_eq!(v["status"].as_u64(), Some(status as u64), "{v}");
        spec::validate("Problem", &v);
    }
    (status, v)
}

/// The response's content type, empty when absent.
/// Copies the files of `from` (not its subdirectories) into `to`, made if missing.
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), to.join(e.file_name())).unwrap();
    }
}

pub fn content_type(r: &reqwest::blocking::Response) -> String {
    r.headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_string()
}

pub fn png(seed: u8) -> Vec<u8> {
    let img = image::RgbImage::from_fn(40, 36, |x, y| {
        image::Rgb([
            (x * 5) as u8 ^ seed,
            (y * 7) as u8,
            seed.wrapping_mul(3) ^ (x + y) as u8,
        ])
    });
    encode_png(&img)
}

pub fn encode_png(img: &image::RgbImage) -> Vec<u8> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

pub fn b64(bytes: &[u8]) -> String {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD.encode(bytes)
}
