//! The OpenAI-compatible server: the engine on its own thread (`engine_thread`), axum
//! routes in front (`routes`), OpenAI request shapes and errors (`openai`), Prometheus
//! metrics under vLLM's names (`metrics`).

pub mod engine_thread;
pub mod metrics;
pub mod openai;
pub mod routes;

use std::sync::Arc;

use engine_thread::EngineHandle;
use routes::{AppState, ServerConfig};
use vllm_apple_engine::LLMEngine;

/// Serves `engine` on `addr` until the process is interrupted.
pub async fn serve(
    engine: LLMEngine,
    addr: &str,
    served_model_name: String,
    api_key: Option<String>,
) -> std::io::Result<()> {
    let cfg = ServerConfig {
        served_model_name,
        api_key,
        max_model_len: engine.cfg.max_model_len,
        vocab: engine.model.cfg.vocab,
    };
    let tokenizer = engine.tokenizer.clone();
    let handle = EngineHandle::spawn(engine);
    let app = routes::router(Arc::new(AppState::new(handle, tokenizer, cfg)));
    let listener = tokio::net::TcpListener::bind(addr).await?;
    tracing::info!("serving on http://{}", listener.local_addr()?);
    eprintln!("vllm-apple: serving on http://{}", listener.local_addr()?);
    axum::serve(listener, app)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await
}
