//! `serve` settings: config/default.toml (compiled in) under an optional config file, under
//! ATLAS_* environment variables, under flags. Every key has one default, in that file.

use anyhow::{bail, Context};
use serde::Deserialize;
use std::path::PathBuf;

const DEFAULTS: &str = include_str!("../../../../config/default.toml");

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    pub listen: String,
    pub model: String,
    pub demo_preset: String,
    pub tv_dir: String,
    pub tvs: Vec<String>,
    pub device: String,
    pub dtype: String,
    pub store: String,
    pub data_dir: PathBuf,
    pub database_url: String,
    pub blob_dir: PathBuf,
    pub replica: String,
    pub job_lease_s: u64,
    pub cache_mib: usize,
    pub queue: usize,
    pub max_batch: usize,
    pub max_wait_ms: u64,
    pub request_timeout_s: u64,
    pub workers: usize,
    pub job_queue: usize,
    pub api_keys: Vec<String>,
    pub auth_reads: bool,
    pub max_body_mib: usize,
    pub max_image_pixels: u64,
    pub max_request_pixels: u64,
    pub max_images: usize,
    pub max_examples: usize,
    pub max_classes: usize,
    pub max_parts: usize,
    pub max_connections: usize,
    pub max_job_mib: usize,
    pub max_heads: usize,
    pub header_timeout_s: u64,
    pub body_timeout_s: u64,
}

/// Flags of `serve`, one per key of config/default.toml; each also reads ATLAS_<KEY>.
#[derive(clap::Args, Debug, Default)]
pub struct Args {
    /// A TOML file of settings (keys as in config/default.toml).
    #[arg(long, env = "ATLAS_CONFIG")]
    pub config: Option<PathBuf>,
    #[arg(long, env = "ATLAS_LISTEN")]
    pub listen: Option<String>,
    #[arg(long, env = "ATLAS_MODEL")]
    pub model: Option<String>,
    #[arg(long, env = "ATLAS_DEMO_PRESET")]
    pub demo_preset: Option<String>,
    #[arg(long, env = "ATLAS_TV_DIR")]
    pub tv_dir: Option<String>,
    /// Task-vector files, comma-separated.
    #[arg(long, env = "ATLAS_TVS")]
    pub tvs: Option<String>,
    #[arg(long, env = "ATLAS_DEVICE")]
    pub device: Option<String>,
    #[arg(long, env = "ATLAS_DTYPE")]
    pub dtype: Option<String>,
    #[arg(long, env = "ATLAS_STORE")]
    pub store: Option<String>,
    #[arg(long, env = "ATLAS_DATA_DIR")]
    pub data_dir: Option<String>,
    /// postgres://… (empty: SQLite in data_dir).
    #[arg(long, env = "ATLAS_DATABASE_URL", hide_env_values = true)]
    pub database_url: Option<String>,
    #[arg(long, env = "ATLAS_BLOB_DIR")]
    pub blob_dir: Option<String>,
    #[arg(long, env = "ATLAS_REPLICA")]
    pub replica: Option<String>,
    #[arg(long, env = "ATLAS_JOB_LEASE_S")]
    pub job_lease_s: Option<String>,
    #[arg(long, env = "ATLAS_CACHE_MIB")]
    pub cache_mib: Option<String>,
    #[arg(long, env = "ATLAS_QUEUE")]
    pub queue: Option<String>,
    #[arg(long, env = "ATLAS_MAX_BATCH")]
    pub max_batch: Option<String>,
    #[arg(long, env = "ATLAS_MAX_WAIT_MS")]
    pub max_wait_ms: Option<String>,
    #[arg(long, env = "ATLAS_REQUEST_TIMEOUT_S")]
    pub request_timeout_s: Option<String>,
    #[arg(long, env = "ATLAS_WORKERS")]
    pub workers: Option<String>,
    #[arg(long, env = "ATLAS_JOB_QUEUE")]
    pub job_queue: Option<String>,
    /// Comma-separated bearer keys.
    #[arg(long, env = "ATLAS_API_KEYS", hide_env_values = true)]
    pub api_keys: Option<String>,
    #[arg(long, env = "ATLAS_AUTH_READS")]
    pub auth_reads: Option<String>,
    #[arg(long, env = "ATLAS_MAX_BODY_MIB")]
    pub max_body_mib: Option<String>,
    #[arg(long, env = "ATLAS_MAX_IMAGE_PIXELS")]
    pub max_image_pixels: Option<String>,
    #[arg(long, env = "ATLAS_MAX_REQUEST_PIXELS")]
    pub max_request_pixels: Option<String>,
    #[arg(long, env = "ATLAS_MAX_IMAGES")]
    pub max_images: Option<String>,
    #[arg(long, env = "ATLAS_MAX_EXAMPLES")]
    pub max_examples: Option<String>,
    #[arg(long, env = "ATLAS_MAX_CLASSES")]
    pub max_classes: Option<String>,
    #[arg(long, env = "ATLAS_MAX_PARTS")]
    pub max_parts: Option<String>,
    #[arg(long, env = "ATLAS_MAX_CONNECTIONS")]
    pub max_connections: Option<String>,
    #[arg(long, env = "ATLAS_MAX_JOB_MIB")]
    pub max_job_mib: Option<String>,
    #[arg(long, env = "ATLAS_MAX_HEADS")]
    pub max_heads: Option<String>,
    #[arg(long, env = "ATLAS_HEADER_TIMEOUT_S")]
    pub header_timeout_s: Option<String>,
    #[arg(long, env = "ATLAS_BODY_TIMEOUT_S")]
    pub body_timeout_s: Option<String>,
}

impl Args {
    fn overrides(&self) -> Vec<(&'static str, &Option<String>)> {
        vec![
            ("listen", &self.listen),
            ("model", &self.model),
            ("demo_preset", &self.demo_preset),
            ("tv_dir", &self.tv_dir),
            ("tvs", &self.tvs),
            ("device", &self.device),
            ("dtype", &self.dtype),
            ("store", &self.store),
            ("data_dir", &self.data_dir),
            ("database_url", &self.database_url),
            ("blob_dir", &self.blob_dir),
            ("replica", &self.replica),
            ("job_lease_s", &self.job_lease_s),
            ("cache_mib", &self.cache_mib),
            ("queue", &self.queue),
            ("max_batch", &self.max_batch),
            ("max_wait_ms", &self.max_wait_ms),
            ("request_timeout_s", &self.request_timeout_s),
            ("workers", &self.workers),
            ("job_queue", &self.job_queue),
            ("api_keys", &self.api_keys),
            ("auth_reads", &self.auth_reads),
            ("max_body_mib", &self.max_body_mib),
            ("max_image_pixels", &self.max_image_pixels),
            ("max_request_pixels", &self.max_request_pixels),
            ("max_images", &self.max_images),
            ("max_examples", &self.max_examples),
            ("max_classes", &self.max_classes),
            ("max_parts", &self.max_parts),
            ("max_connections", &self.max_connections),
            ("max_job_mib", &self.max_job_mib),
            ("max_heads", &self.max_heads),
            ("header_timeout_s", &self.header_timeout_s),
            ("body_timeout_s", &self.body_timeout_s),
        ]
    }
}

impl Config {
    /// Defaults, then the config file, then flags and environment (clap merges those two).
    pub fn load(args: &Args) -> anyhow::Result<Config> {
        let mut table: toml::Table = DEFAULTS.parse().context("config/default.toml")?;
        if let Some(path) = &args.config {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config file {}", path.display()))?;
            let file: toml::Table = text
                .parse()
                .with_context(|| format!("parsing config file {}", path.display()))?;
            for (k, v) in file {
                if !table.contains_key(&k) {
                    bail!("{}: unknown setting {k:?}", path.display());
                }
                table.insert(k, v);
            }
        }
        for (key, value) in args.overrides() {
            if let Some(v) = value {
                let typed = typed_value(&table[key], v).with_context(|| {
                    format!(
                        "setting {key} (flag --{} or ATLAS_{}): {v:?}",
                        key.replace('_', "-"),
                        key.to_uppercase()
                    )
                })?;
                table.insert(key.to_string(), typed);
            }
        }
        let mut c: Config = table.try_into().context("invalid settings")?;
        c.validate()?;
        if c.blob_dir.as_os_str().is_empty() {
            c.blob_dir = c.data_dir.clone();
        }
        if c.replica.is_empty() {
            c.replica = default_replica();
        }
        Ok(c)
    }

    /// Built from the defaults alone.
    #[cfg(test)]
    pub fn defaults() -> Config {
        Config::load(&Args::default()).expect("config/default.toml is valid")
    }

    fn validate(&self) -> anyhow::Result<()> {
        let url = &self.database_url;
        if !(url.is_empty() || url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!("database_url must be empty (SQLite in data_dir) or start with postgres://");
        }
        if self.job_lease_s < 3 {
            bail!("job_lease_s must be at least 3 (the lease is renewed every job_lease_s / 3 s)");
        }
        let positive = [
            ("queue", self.queue),
            ("max_batch", self.max_batch),
            ("workers", self.workers),
            ("job_queue", self.job_queue),
            ("max_body_mib", self.max_body_mib),
            ("max_images", self.max_images),
            ("max_request_pixels", self.max_request_pixels as usize),
            ("max_examples", self.max_examples),
            ("max_classes", self.max_classes),
            ("max_parts", self.max_parts),
            ("request_timeout_s", self.request_timeout_s as usize),
            ("max_connections", self.max_connections),
            ("max_job_mib", self.max_job_mib),
            ("max_heads", self.max_heads),
            ("header_timeout_s", self.header_timeout_s as usize),
            ("body_timeout_s", self.body_timeout_s as usize),
        ];
        for (k, v) in positive {
            if v == 0 {
                bail!("setting {k} must be at least 1");
            }
        }
        if self.max_parts > atlas_core::coefficients::MAX_PARTS {
            bail!(
                "setting max_parts must be at most {}",
                atlas_core::coefficients::MAX_PARTS
            );
        }
        if self.max_connections > 1 << 20 {
            bail!("setting max_connections must be at most {}", 1 << 20);
        }
        if self.api_keys.iter().any(|k| k.len() < 16) {
            bail!("api_keys: each key must be at least 16 characters");
        }
        Ok(())
    }
}

/// Each setting's description: the comment above it in config/default.toml, on one line.
pub fn descriptions() -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    let mut comment: Vec<&str> = Vec::new();
    for line in DEFAULTS.lines() {
        let line = line.trim();
        if let Some(c) = line.strip_prefix('#') {
            comment.push(c.trim());
        } else if let Some((key, _)) = line.split_once('=') {
            out.push((key.trim(), comment.join(" ")));
            comment.clear();
        } else {
            comment.clear();
        }
    }
    out
}

/// `serve`'s flags with their descriptions (one source: config/default.toml).
pub fn describe_flags(mut serve: clap::Command) -> clap::Command {
    for (key, help) in descriptions() {
        serve = serve.mut_arg(key, |a| a.help(help));
    }
    serve
}

/// A flag or environment string as a TOML value of the default's type (lists comma-separated).
fn typed_value(default: &toml::Value, s: &str) -> anyhow::Result<toml::Value> {
    use toml::Value;
    Ok(match default {
        Value::String(_) => Value::String(s.to_string()),
        Value::Integer(_) => Value::Integer(s.trim().parse().context("expected an integer")?),
        Value::Float(_) => Value::Float(s.trim().parse().context("expected a number")?),
        Value::Boolean(_) => Value::Boolean(match s.trim() {
            "1" | "true" | "yes" | "on" => true,
            "0" | "false" | "no" | "off" => false,
            _ => bail!("expected true or false"),
        }),
        Value::Array(_) => {
            let items: Vec<Value> = s
                .split(',')
                .map(str::trim)
                .filter(|x| !x.is_empty())
                .map(|x| Value::String(x.to_string()))
                .collect();
            // " , " must not pass for "no keys": that would silently turn authentication off.
            if items.is_empty() && !s.trim().is_empty() {
                bail!("{s:?} has separators but no values: give comma-separated values or nothing");
            }
            Value::Array(items)
        }
        other => bail!("unsupported setting type {}", other.type_str()),
    })
}

/// The host name and the process id: unique among processes on one host, and among pods.
fn default_replica() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_string())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "atlas-serve".into());
    format!("{host}-{}", std::process::id())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_parse_and_flags_override() {
        let d = Config::defaults();
        assert_eq!(d.listen, "127.0.0.1:8080");
        let args = Args {
            cache_mib: Some("17".into()),
            tvs: Some("a.safetensors, b.safetensors".into()),
            auth_reads: Some("yes".into()),
            ..Args::default()
        };
        let c = Config::load(&args).unwrap();
        assert_eq!(c.cache_mib, 17);
        assert_eq!(c.tvs, vec!["a.safetensors", "b.safetensors"]);
        assert!(c.auth_reads);
    }

    #[test]
    fn every_flag_of_serve_has_its_description() {
        use clap::{Args as _, CommandFactory as _};
        let serve = describe_flags(Args::augment_args(clap::Command::new("serve")));
        let table: toml::Table = DEFAULTS.parse().unwrap();
        let described = descriptions();
        for key in table.keys() {
            let help = &described
                .iter()
                .find(|(k, _)| k == key)
                .expect("described")
                .1;
            assert!(
                !help.is_empty(),
                "{key} has no comment in config/default.toml"
            );
            let arg = serve.get_arguments().find(|a| a.get_id() == key).unwrap();
            assert_eq!(
                arg.get_help().map(|h| h.to_string()).as_deref(),
                Some(help.as_str())
            );
        }
        let _ = crate::Cli::command();
    }

    #[test]
    fn every_setting_is_in_the_readme_table() {
        let readme = include_str!("../../../../README.md");
        let table: toml::Table = DEFAULTS.parse().unwrap();
        for key in table.keys() {
            let flag = format!(
                "`--{}` / `ATLAS_{}`",
                key.replace('_', "-"),
                key.to_uppercase()
            );
            assert!(
                readme.contains(&format!("| `{key}` | {flag} |")),
                "README's Configuration table lacks {key}"
            );
        }
        assert_eq!(
            table.len(),
            Args::default().overrides().len(),
            "a flag per setting"
        );
    }

    #[test]
    fn bad_values_and_unknown_keys_are_named() {
        let args = Args {
            queue: Some("many".into()),
            ..Args::default()
        };
        let e = format!("{:#}", Config::load(&args).unwrap_err());
        assert!(e.contains("queue") && e.contains("integer"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "cache_mb = 3\n").unwrap();
        let args = Args {
            config: Some(path),
            ..Args::default()
        };
        let e = format!("{:#}", Config::load(&args).unwrap_err());
        assert!(e.contains("unknown setting \"cache_mb\""), "{e}");
        let args = Args {
            api_keys: Some("short".into()),
            ..Args::default()
        };
        assert!(format!("{:#}", Config::load(&args).unwrap_err()).contains("16 characters"));
        for only_separators in [" , ", ",", " ,, "] {
            let args = Args {
                api_keys: Some(only_separators.into()),
                ..Args::default()
            };
            let e = format!("{:#}", Config::load(&args).unwrap_err());
            assert!(e.contains("api_keys") && e.contains("no values"), "{e}");
        }
    }
}
