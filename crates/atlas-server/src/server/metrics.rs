//! Prometheus metrics of the server (text exposition at GET /metrics).

use prometheus::{
    Encoder, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts, Registry,
    TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub images: IntCounter,
    pub classify_seconds: Histogram,
    pub compose_seconds: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_bytes: IntGauge,
    pub rejected: IntCounter,
    pub jobs: IntCounterVec,
    pub batch_size: Histogram,
}

impl Metrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let secs = |name: &str, help: &str| {
            Histogram::with_opts(
                HistogramOpts::new(name, help)
                    .buckets(prometheus::exponential_buckets(0.001, 2.0, 16).expect("buckets")),
            )
            .expect("histogram")
        };
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "atlas_http_requests_total",
                    "HTTP requests by route and status",
                ),
                &["route", "status"],
            )
            .expect("counter"),
            images: IntCounter::new("atlas_classified_images_total", "Images classified")
                .expect("counter"),
            classify_seconds: secs(
                "atlas_classify_batch_seconds",
                "Engine time per classification batch",
            ),
            compose_seconds: secs(
                "atlas_compose_seconds",
                "Time to compose a model on a cache miss",
            ),
            cache_hits: IntCounter::new(
                "atlas_composition_cache_hits_total",
                "Composed-model cache hits",
            )
            .expect("counter"),
            cache_misses: IntCounter::new(
                "atlas_composition_cache_misses_total",
                "Composed-model cache misses",
            )
            .expect("counter"),
            cache_bytes: IntGauge::new(
                "atlas_composition_cache_bytes",
                "Bytes of composed models held",
            )
            .expect("gauge"),
            rejected: IntCounter::new(
                "atlas_rejected_requests_total",
                "Requests refused because the engine or learning queue was full",
            )
            .expect("counter"),
            jobs: IntCounterVec::new(
                Opts::new("atlas_learning_jobs_total", "Learning jobs by final status"),
                &["status"],
            )
            .expect("counter"),
            batch_size: Histogram::with_opts(
                HistogramOpts::new(
                    "atlas_engine_batch_images",
                    "Images per engine forward batch",
                )
                .buckets(vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0]),
            )
            .expect("histogram"),
            registry,
        };
        let r = &m.registry;
        r.register(Box::new(m.requests.clone())).expect("register");
        r.register(Box::new(m.images.clone())).expect("register");
        r.register(Box::new(m.classify_seconds.clone()))
            .expect("register");
        r.register(Box::new(m.compose_seconds.clone()))
            .expect("register");
        r.register(Box::new(m.cache_hits.clone()))
            .expect("register");
        r.register(Box::new(m.cache_misses.clone()))
            .expect("register");
        r.register(Box::new(m.cache_bytes.clone()))
            .expect("register");
        r.register(Box::new(m.rejected.clone())).expect("register");
        r.register(Box::new(m.jobs.clone())).expect("register");
        r.register(Box::new(m.batch_size.clone()))
            .expect("register");
        m
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).unwrap_or_default()
    }
}
