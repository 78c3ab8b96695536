//! Prometheus metrics under vLLM's names: requests running and waiting, KV-cache usage,
//! prefix-cache queries and hits, prompt and generation tokens, time to first token and
//! inter-token latency.

use std::sync::Mutex;

use prometheus::{
    Encoder, Gauge, Histogram, HistogramOpts, IntCounter, IntGauge, Registry, TextEncoder,
};
use vllm_apple_engine::engine::EngineStats;

pub struct Metrics {
    registry: Registry,
    running: IntGauge,
    waiting: IntGauge,
    kv_usage: Gauge,
    prefix_queries: IntCounter,
    prefix_hits: IntCounter,
    prompt_tokens: IntCounter,
    generation_tokens: IntCounter,
    preemptions: IntCounter,
    pub ttft: Histogram,
    pub itl: Histogram,
    pub request_success: IntCounter,
    /// Engine totals at the last scrape (counters advance by the difference).
    last: Mutex<EngineStats>,
}

fn must<T>(r: prometheus::Result<T>) -> T {
    // Names and buckets are constants of this file; a failure is a programming error
    // caught by the metrics test.
    r.unwrap_or_else(|e| panic!("metric definition: {e}"))
}

impl Metrics {
    pub fn new(model: &str) -> Metrics {
        let registry = Registry::new_custom(
            None,
            Some([("model_name".to_string(), model.to_string())].into()),
        )
        .unwrap_or_default();
        let latency = vec![
            0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5,
            10.0, 20.0, 40.0, 80.0,
        ];
        let m = Metrics {
            running: must(IntGauge::new(
                "vllm:num_requests_running",
                "Requests in the running batch.",
            )),
            waiting: must(IntGauge::new(
                "vllm:num_requests_waiting",
                "Requests waiting to be scheduled.",
            )),
            kv_usage: must(Gauge::new(
                "vllm:kv_cache_usage_perc",
                "KV-cache usage (1 = full).",
            )),
            prefix_queries: must(IntCounter::new(
                "vllm:prefix_cache_queries_total",
                "Prompt tokens looked up in the prefix cache.",
            )),
            prefix_hits: must(IntCounter::new(
                "vllm:prefix_cache_hits_total",
                "Prompt tokens found in the prefix cache.",
            )),
            prompt_tokens: must(IntCounter::new(
                "vllm:prompt_tokens_total",
                "Prompt tokens processed.",
            )),
            generation_tokens: must(IntCounter::new(
                "vllm:generation_tokens_total",
                "Tokens generated.",
            )),
            preemptions: must(IntCounter::new(
                "vllm:num_preemptions_total",
                "Preemptions.",
            )),
            ttft: must(Histogram::with_opts(
                HistogramOpts::new("vllm:time_to_first_token_seconds", "Time to first token.")
                    .buckets(latency.clone()),
            )),
            itl: must(Histogram::with_opts(
                HistogramOpts::new(
                    "vllm:inter_token_latency_seconds",
                    "Time between output tokens.",
                )
                .buckets(latency),
            )),
            request_success: must(IntCounter::new(
                "vllm:request_success_total",
                "Finished requests.",
            )),
            last: Mutex::new(EngineStats::default()),
            registry,
        };
        for c in [
            Box::new(m.running.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.waiting.clone()),
            Box::new(m.kv_usage.clone()),
            Box::new(m.prefix_queries.clone()),
            Box::new(m.prefix_hits.clone()),
            Box::new(m.prompt_tokens.clone()),
            Box::new(m.generation_tokens.clone()),
            Box::new(m.preemptions.clone()),
            Box::new(m.ttft.clone()),
            Box::new(m.itl.clone()),
            Box::new(m.request_success.clone()),
        ] {
            must(m.registry.register(c));
        }
        m
    }

    /// The exposition text, after bringing the engine's figures up to date.
    pub fn render(&self, s: &EngineStats) -> String {
        self.running.set(s.num_running as i64);
        self.waiting.set(s.num_waiting as i64);
        self.kv_usage.set(s.kv_cache_usage);
        {
            let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
            let diff = |now: u64, before: u64| now.saturating_sub(before);
            self.prefix_queries
                .inc_by(diff(s.prefix_cache.queries, last.prefix_cache.queries));
            self.prefix_hits
                .inc_by(diff(s.prefix_cache.hits, last.prefix_cache.hits));
            self.prompt_tokens
                .inc_by(diff(s.prompt_tokens, last.prompt_tokens));
            self.generation_tokens
                .inc_by(diff(s.generation_tokens, last.generation_tokens));
            self.preemptions
                .inc_by(diff(s.preemptions, last.preemptions));
            *last = *s;
        }
        let mut buf = Vec::new();
        if TextEncoder::new()
            .encode(&self.registry.gather(), &mut buf)
            .is_err()
        {
            return String::new();
        }
        String::from_utf8(buf).unwrap_or_default()
    }
}
