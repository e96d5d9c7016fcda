//! Prometheus metrics of the server (text exposition at GET /metrics). Names start `atlas_`;
//! labels are bounded (route templates, methods, statuses, states): never composition ids.

use prometheus::core::Collector;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};

pub struct Metrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_seconds: HistogramVec,
    pub ready: IntGauge,
    pub queue_depth: IntGauge,
    pub queue_capacity: IntGauge,
    pub batch_size: Histogram,
    pub rejected: IntCounterVec,
    pub images: IntCounter,
    pub classify_seconds: Histogram,
    pub compose_seconds: Histogram,
    pub cache_hits: IntCounter,
    pub cache_misses: IntCounter,
    pub cache_evictions: IntCounter,
    pub cache_bytes: IntGauge,
    pub cache_capacity: IntGauge,
    pub jobs: IntGaugeVec,
    pub job_seconds: HistogramVec,
    pub step_seconds: Histogram,
    pub prediction_entropy: Histogram,
    pub prediction_confidence: Histogram,
    pub memory: IntGaugeVec,
    pub db_up: IntGauge,
    pub db_queries: IntCounter,
    pub db_errors: IntCounterVec,
    pub job_claims: IntCounterVec,
    pub leases_lost: IntCounter,
}

fn seconds_buckets() -> Vec<f64> {
    prometheus::exponential_buckets(0.0005, 2.0, 20).expect("buckets")
}

fn histogram(name: &str, help: &str, buckets: Vec<f64>) -> Histogram {
    Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets)).expect("histogram")
}

fn counter(name: &str, help: &str) -> IntCounter {
    IntCounter::new(name, help).expect("counter")
}

fn gauge(name: &str, help: &str) -> IntGauge {
    IntGauge::new(name, help).expect("gauge")
}

impl Metrics {
    pub fn new() -> Self {
        let unit: Vec<f64> = (1..=20).map(|i| i as f64 / 20.0).collect();
        let m = Metrics {
            requests: IntCounterVec::new(
                Opts::new(
                    "atlas_http_requests_total",
                    "HTTP requests by route, method and status",
                ),
                &["route", "method", "status"],
            )
            .expect("counter"),
            request_seconds: HistogramVec::new(
                HistogramOpts::new(
                    "atlas_http_request_duration_seconds",
                    "HTTP request latency",
                )
                .buckets(seconds_buckets()),
                &["route", "method"],
            )
            .expect("histogram"),
            ready: gauge("atlas_ready", "1 once the backbone and library are loaded"),
            queue_depth: gauge(
                "atlas_queue_depth",
                "Classify requests waiting for the engine",
            ),
            queue_capacity: gauge("atlas_queue_capacity", "Classify requests the queue holds"),
            batch_size: histogram(
                "atlas_batch_size",
                "Images per engine forward batch",
                vec![1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0],
            ),
            rejected: IntCounterVec::new(
                Opts::new("atlas_rejected_total", "Requests refused, by reason"),
                &["reason"],
            )
            .expect("counter"),
            images: counter("atlas_classified_images_total", "Images classified"),
            classify_seconds: histogram(
                "atlas_classify_batch_seconds",
                "Engine time per classification group",
                seconds_buckets(),
            ),
            compose_seconds: histogram(
                "atlas_compose_seconds",
                "Time to compose a model on a cache miss",
                seconds_buckets(),
            ),
            cache_hits: counter("atlas_cache_hits_total", "Composed-model cache hits"),
            cache_misses: counter("atlas_cache_misses_total", "Composed-model cache misses"),
            cache_evictions: counter(
                "atlas_cache_evictions_total",
                "Composed models evicted from the cache",
            ),
            cache_bytes: gauge(
                "atlas_cache_resident_bytes",
                "Bytes of composed models held",
            ),
            cache_capacity: gauge("atlas_cache_capacity_bytes", "Byte budget of the cache"),
            jobs: IntGaugeVec::new(
                Opts::new("atlas_jobs", "Learning jobs by state"),
                &["state"],
            )
            .expect("gauge"),
            job_seconds: HistogramVec::new(
                HistogramOpts::new("atlas_job_duration_seconds", "Learning job run time")
                    .buckets(prometheus::exponential_buckets(0.5, 2.0, 16).expect("buckets")),
                &["objective"],
            )
            .expect("histogram"),
            step_seconds: histogram(
                "atlas_learning_step_seconds",
                "Time per optimiser step of learning jobs",
                seconds_buckets(),
            ),
            prediction_entropy: histogram(
                "atlas_prediction_entropy",
                "Entropy (nats) of served class distributions",
                (0..=20).map(|i| i as f64 * 0.25).collect(),
            ),
            prediction_confidence: histogram(
                "atlas_prediction_confidence",
                "Top-1 probability of served predictions",
                unit,
            ),
            memory: IntGaugeVec::new(
                Opts::new("atlas_memory_bytes", "Resident model memory by kind"),
                &["kind"],
            )
            .expect("gauge"),
            db_up: gauge(
                "atlas_db_up",
                "1 when the last database round trip succeeded (or failed for another reason than reaching it)",
            ),
            db_queries: counter("atlas_db_queries_total", "Database round trips"),
            db_errors: IntCounterVec::new(
                Opts::new("atlas_db_errors_total", "Failed database round trips, by what for"),
                &["op"],
            )
            .expect("counter"),
            job_claims: IntCounterVec::new(
                Opts::new(
                    "atlas_job_claims_total",
                    "Jobs this replica claimed: queued ones, or ones whose lease had expired",
                ),
                &["how"],
            )
            .expect("counter"),
            leases_lost: counter(
                "atlas_job_leases_lost_total",
                "Jobs this replica stopped because its lease on them lapsed",
            ),
            registry: Registry::new(),
        };
        m.register_all();
        m
    }

    fn register_all(&self) {
        let all: Vec<Box<dyn Collector>> = vec![
            Box::new(self.requests.clone()),
            Box::new(self.request_seconds.clone()),
            Box::new(self.ready.clone()),
            Box::new(self.queue_depth.clone()),
            Box::new(self.queue_capacity.clone()),
            Box::new(self.batch_size.clone()),
            Box::new(self.rejected.clone()),
            Box::new(self.images.clone()),
            Box::new(self.classify_seconds.clone()),
            Box::new(self.compose_seconds.clone()),
            Box::new(self.cache_hits.clone()),
            Box::new(self.cache_misses.clone()),
            Box::new(self.cache_evictions.clone()),
            Box::new(self.cache_bytes.clone()),
            Box::new(self.cache_capacity.clone()),
            Box::new(self.jobs.clone()),
            Box::new(self.job_seconds.clone()),
            Box::new(self.step_seconds.clone()),
            Box::new(self.prediction_entropy.clone()),
            Box::new(self.prediction_confidence.clone()),
            Box::new(self.memory.clone()),
            Box::new(self.db_up.clone()),
            Box::new(self.db_queries.clone()),
            Box::new(self.db_errors.clone()),
            Box::new(self.job_claims.clone()),
            Box::new(self.leases_lost.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ];
        for c in all {
            self.registry.register(c).expect("register");
        }
        // Labelled series exist from the start, so dashboards and alerts see zeros, not gaps.
        for reason in [
            "queue_full",
            "timeout",
            "jobs_full",
            "heads_full",
            "composer_full",
            "merge_busy",
        ] {
            self.rejected.with_label_values(&[reason]);
        }
        for kind in ["backbone", "library", "cache"] {
            self.memory.with_label_values(&[kind]);
        }
        for op in crate::server::store::Op::ALL {
            self.db_errors.with_label_values(&[op.as_str()]);
        }
        for how in ["queued", "expired"] {
            self.job_claims.with_label_values(&[how]);
        }
        self.db_up.set(1);
    }

    /// Copies the store's counters (kept by the store, which has no registry) into the
    /// exported ones.
    pub fn observe_store(&self, store: &crate::server::store::Store) {
        self.db_up.set(i64::from(store.database_up()));
        let trips = store.round_trips();
        self.db_queries
            .inc_by(trips.saturating_sub(self.db_queries.get()));
        for (op, n) in store.errors() {
            let c = self.db_errors.with_label_values(&[op.as_str()]);
            c.inc_by(n.saturating_sub(c.get()));
        }
    }

    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .expect("text encoding");
        String::from_utf8(buf).expect("utf-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
