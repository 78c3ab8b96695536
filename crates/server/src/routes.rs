//! The HTTP routes: OpenAI's /v1/models, /v1/completions, /v1/chat/completions (streamed as
//! server-sent events or not), and vLLM's /tokenize, /detokenize, /health, /version,
//! /metrics.

use std::convert::Infallible;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use axum::extract::rejection::JsonRejection;
use axum::extract::{Request, State};
use axum::http::header::AUTHORIZATION;
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use futures::stream::{self, Stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc::{unbounded_channel, UnboundedReceiver};
use tokio_stream::wrappers::UnboundedReceiverStream;
use vllm_apple_engine::engine::PositionLogprobs;
use vllm_apple_engine::{RequestOutput, SamplingParams};
use vllm_apple_model::tokenizer::GgufTokenizer;

use crate::engine_thread::{EngineHandle, Event};
use crate::metrics::Metrics;
use crate::openai::{
    ApiError, ChatRequest, CompletionRequest, DetokenizeRequest, PromptField, TokenizeRequest,
};

/// What the server answers with, besides the engine.
#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub served_model_name: String,
    pub api_key: Option<String>,
    pub max_model_len: usize,
    pub vocab: usize,
}

pub struct AppState {
    pub engine: EngineHandle,
    pub tokenizer: Option<GgufTokenizer>,
    pub cfg: ServerConfig,
    pub metrics: Metrics,
    next_id: AtomicU64,
}

impl AppState {
    pub fn new(engine: EngineHandle, tokenizer: Option<GgufTokenizer>, cfg: ServerConfig) -> Self {
        AppState {
            metrics: Metrics::new(&cfg.served_model_name),
            engine,
            tokenizer,
            cfg,
            next_id: AtomicU64::new(0),
        }
    }
}

type Shared = Arc<AppState>;

pub fn router(state: Shared) -> Router {
    let v1 = Router::new()
        .route("/v1/models", get(models))
        .route("/v1/completions", post(completions))
        .route("/v1/chat/completions", post(chat))
        .route("/tokenize", post(tokenize))
        .route("/detokenize", post(detokenize))
        .route_layer(middleware::from_fn_with_state(state.clone(), auth));
    Router::new()
        .merge(v1)
        .route("/health", get(|| async { "" }))
        .route(
            "/version",
            get(|| async { Json(json!({"version": env!("CARGO_PKG_VERSION")})) }),
        )
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn auth(State(s): State<Shared>, req: Request, next: Next) -> Response {
    if let Some(key) = &s.cfg.api_key {
        let ok = req
            .headers()
            .get(AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|k| k == key);
        if !ok {
            return ApiError::unauthorized().into_response();
        }
    }
    next.run(req).await
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

async fn models(State(s): State<Shared>) -> Json<Value> {
    Json(json!({"object": "list", "data": [{
        "id": s.cfg.served_model_name,
        "object": "model",
        "created": now_secs(),
        "owned_by": "vllm-apple",
        "root": s.cfg.served_model_name,
        "max_model_len": s.cfg.max_model_len,
    }]}))
}

async fn metrics(State(s): State<Shared>) -> impl IntoResponse {
    (
        [("content-type", "text/plain; version=0.0.4")],
        s.metrics.render(&s.engine.stats()),
    )
}

fn json_body<T>(body: Result<Json<T>, JsonRejection>) -> Result<T, ApiError> {
    body.map(|Json(b)| b)
        .map_err(|e| ApiError::bad_request(format!("invalid request body: {}", e.body_text())))
}

fn check_model(s: &AppState, model: &Option<String>) -> Result<(), ApiError> {
    match model {
        Some(m) if *m != s.cfg.served_model_name => Err(ApiError::not_found(format!(
            "The model `{m}` does not exist."
        ))),
        _ => Ok(()),
    }
}

fn tokenizer(s: &AppState) -> Result<&GgufTokenizer, ApiError> {
    s.tokenizer
        .as_ref()
        .ok_or_else(|| ApiError::bad_request("this model has no tokenizer: send token ids"))
}

/// Checks a tokenized prompt and the parameters against the model before queueing.
fn validate(s: &AppState, ids: &[u32], p: &SamplingParams) -> Result<(), ApiError> {
    p.validate().map_err(ApiError::bad_request)?;
    p.validate_token_ids(s.cfg.vocab)
        .map_err(ApiError::bad_request)?;
    if ids.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    if let Some(bad) = ids.iter().find(|&&t| t as usize >= s.cfg.vocab) {
        return Err(
            ApiError::bad_request(format!("token id {bad} is out of vocabulary")).param("prompt"),
        );
    }
    let max_tokens = p.max_tokens.unwrap_or(1);
    if ids.len() >= s.cfg.max_model_len || ids.len() + max_tokens > s.cfg.max_model_len {
        return Err(ApiError::bad_request(format!(
            "This model's maximum context length is {} tokens. However, you requested {} tokens \
             ({} in the messages, {} in the completion). Please reduce the length of the \
             messages or completion.",
            s.cfg.max_model_len,
            ids.len() + max_tokens,
            ids.len(),
            max_tokens
        ))
        .param("max_tokens"));
    }
    Ok(())
}

/// Queues one engine request per prompt; returns their output channels.
fn submit(
    s: &AppState,
    prompts: &[Vec<u32>],
    p: &SamplingParams,
    kind: &str,
) -> (String, Vec<UnboundedReceiver<Event>>) {
    let base = s.next_id.fetch_add(1, Ordering::Relaxed);
    let id = format!("{kind}-{base}");
    let rxs = prompts
        .iter()
        .enumerate()
        .map(|(i, ids)| {
            let (tx, rx) = unbounded_channel();
            s.engine
                .add(format!("{id}-{i}"), ids.clone(), p.clone(), tx);
            rx
        })
        .collect();
    (id, rxs)
}

/// Follows one request's outputs for the latency metrics.
struct Timing {
    start: Instant,
    last: Option<Instant>,
    tokens: usize,
}

impl Timing {
    fn observe(&mut self, m: &Metrics, out: &RequestOutput) {
        let tokens: usize = out.outputs.iter().map(|o| o.token_ids.len()).sum();
        if tokens > self.tokens {
            let now = Instant::now();
            match self.last {
                None => m.ttft.observe((now - self.start).as_secs_f64()),
                Some(last) => {
                    let per = (now - last).as_secs_f64() / (tokens - self.tokens) as f64;
                    for _ in self.tokens..tokens {
                        m.itl.observe(per);
                    }
                }
            }
            self.last = Some(now);
            self.tokens = tokens;
        }
        if out.finished {
            m.request_success.inc();
        }
    }
}

/// Waits for the final output of every request.
async fn collect(
    s: &AppState,
    rxs: Vec<UnboundedReceiver<Event>>,
) -> Result<Vec<RequestOutput>, ApiError> {
    let start = Instant::now();
    let mut outs = Vec::with_capacity(rxs.len());
    for mut rx in rxs {
        let mut timing = Timing {
            start,
            last: None,
            tokens: 0,
        };
        let mut last = None;
        while let Some(ev) = rx.recv().await {
            let out = ev.map_err(ApiError::bad_request)?;
            timing.observe(&s.metrics, &out);
            let done = out.finished;
            last = Some(out);
            if done {
                break;
            }
        }
        outs.push(last.ok_or_else(|| ApiError::internal("the request ended without output"))?);
    }
    Ok(outs)
}

fn usage(outs: &[RequestOutput]) -> Value {
    let prompt: usize = outs.iter().map(|o| o.prompt_token_ids.len()).sum();
    let completion: usize = outs
        .iter()
        .flat_map(|o| &o.outputs)
        .map(|c| c.token_ids.len())
        .sum();
    json!({"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion})
}

fn token_text(tok: Option<&GgufTokenizer>, id: u32) -> String {
    tok.and_then(|t| t.decode(&[id], false).ok())
        .unwrap_or_else(|| format!("token_id:{id}"))
}

/// Legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset.
fn completion_logprobs(tok: Option<&GgufTokenizer>, lps: &[PositionLogprobs]) -> Value {
    let mut offset = 0;
    let mut offsets = Vec::new();
    let tokens: Vec<String> = lps
        .iter()
        .map(|p| {
            let t = token_text(tok, p.token.token);
            offsets.push(offset);
            offset += t.len();
            t
        })
        .collect();
    json!({
        "tokens": tokens,
        "token_logprobs": lps.iter().map(|p| p.token.logprob).collect::<Vec<_>>(),
        "top_logprobs": lps.iter().map(|p| {
            p.top.iter().map(|t| (token_text(tok, t.token), json!(t.logprob))).collect::<serde_json::Map<_, _>>()
        }).collect::<Vec<_>>(),
        "text_offset": offsets,
    })
}

/// Chat logprobs: `content: [{token, logprob, bytes, top_logprobs: [...]}]`.
fn chat_logprobs(tok: Option<&GgufTokenizer>, lps: &[PositionLogprobs]) -> Value {
    let entry = |id: u32, lp: f32| {
        let t = token_text(tok, id);
        json!({"token": t, "logprob": lp, "bytes": t.as_bytes()})
    };
    json!({"content": lps.iter().map(|p| {
        let mut e = entry(p.token.token, p.token.logprob);
        e["top_logprobs"] = Value::Array(p.top.iter().map(|t| entry(t.token, t.logprob)).collect());
        e
    }).collect::<Vec<_>>()})
}

fn prompts_of(s: &AppState, p: &PromptField) -> Result<Vec<Vec<u32>>, ApiError> {
    let encode = |t: &str| -> Result<Vec<u32>, ApiError> {
        tokenizer(s)?
            .encode(t)
            .map_err(|e| ApiError::bad_request(e.to_string()).param("prompt"))
    };
    Ok(match p {
        PromptField::Text(t) => vec![encode(t)?],
        PromptField::Texts(ts) => ts.iter().map(|t| encode(t)).collect::<Result<_, _>>()?,
        PromptField::Ids(ids) => vec![ids.clone()],
        PromptField::IdLists(l) => l.clone(),
    })
}

async fn completions(
    State(s): State<Shared>,
    body: Result<Json<CompletionRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    check_model(&s, &req.model)?;
    let mut params = req.sampling.params(Some(req.max_tokens.unwrap_or(16)))?;
    params.logprobs = req.logprobs;
    params.prompt_logprobs = req.prompt_logprobs;
    let prompts = prompts_of(&s, &req.prompt)?;
    if prompts.is_empty() {
        return Err(ApiError::bad_request("the prompt is empty").param("prompt"));
    }
    for ids in &prompts {
        validate(&s, ids, &params)?;
    }
    let (id, rxs) = submit(&s, &prompts, &params, "cmpl");
    let created = now_secs();
    let model = s.cfg.served_model_name.clone();
    let n = params.n;
    if req.stream {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head =
            json!({"id": id, "object": "text_completion", "created": created, "model": model});
        return Ok(
            stream_response(s.clone(), rxs, n, params, head, false, include_usage).into_response(),
        );
    }
    let outs = collect(&s, rxs).await?;
    let tok = s.tokenizer.as_ref();
    let mut choices = Vec::new();
    for (pi, o) in outs.iter().enumerate() {
        for c in &o.outputs {
            let text = if req.echo {
                format!("{}{}", o.prompt.clone().unwrap_or_default(), c.text)
            } else {
                c.text.clone()
            };
            choices.push(json!({
                "index": pi * n + c.index,
                "text": text,
                "logprobs": c.logprobs.as_ref().map(|l| completion_logprobs(tok, l)),
                "finish_reason": c.finish_reason.map(|f| f.as_str()),
                "stop_reason": stop_reason(c),
                "prompt_logprobs": o.prompt_logprobs.as_ref().map(|v| prompt_logprobs_json(tok, v)),
            }));
        }
    }
    Ok(Json(json!({
        "id": id, "object": "text_completion", "created": created, "model": model,
        "choices": choices, "usage": usage(&outs),
    }))
    .into_response())
}

fn stop_reason(c: &vllm_apple_engine::CompletionOutput) -> Value {
    match &c.stop_reason {
        Some(vllm_apple_engine::params::StopReason::Text(t)) => json!(t),
        Some(vllm_apple_engine::params::StopReason::Token(t)) => json!(t),
        None => Value::Null,
    }
}

fn prompt_logprobs_json(tok: Option<&GgufTokenizer>, v: &[Option<PositionLogprobs>]) -> Value {
    Value::Array(
        v.iter()
            .map(|p| match p {
                None => Value::Null,
                Some(p) => {
                    let mut m = serde_json::Map::new();
                    m.insert(
                        p.token.token.to_string(),
                        json!({"logprob": p.token.logprob, "rank": p.token.rank, "decoded_token": token_text(tok, p.token.token)}),
                    );
                    for t in &p.top {
                        m.entry(t.token.to_string()).or_insert(
                            json!({"logprob": t.logprob, "rank": t.rank, "decoded_token": token_text(tok, t.token)}),
                        );
                    }
                    Value::Object(m)
                }
            })
            .collect(),
    )
}

async fn chat(
    State(s): State<Shared>,
    body: Result<Json<ChatRequest>, JsonRejection>,
) -> Result<Response, ApiError> {
    let req = json_body(body)?;
    check_model(&s, &req.model)?;
    let tok = tokenizer(&s)?;
    let mut extra = req.chat_template_kwargs.clone().unwrap_or_default();
    if let Some(tools) = &req.tools {
        extra.insert("tools".into(), tools.clone());
    }
    let text = tok
        .render_chat(
            &Value::Array(req.messages.clone()),
            req.add_generation_prompt,
            &extra,
        )
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    let ids = tok
        .encode(&text)
        .map_err(|e| ApiError::bad_request(e.to_string()).param("messages"))?;
    let max_tokens = req
        .max_completion_tokens
        .or(req.max_tokens)
        .unwrap_or_else(|| s.cfg.max_model_len.saturating_sub(ids.len()).max(1));
    let mut params = req.sampling.params(Some(max_tokens))?;
    if req.logprobs {
        params.logprobs = Some(req.top_logprobs.unwrap_or(0));
    } else if req.top_logprobs.is_some() {
        return Err(
            ApiError::bad_request("top_logprobs needs logprobs = true").param("top_logprobs")
        );
    }
    validate(&s, &ids, &params)?;
    let (id, rxs) = submit(&s, &[ids], &params, "chatcmpl");
    let created = now_secs();
    let model = s.cfg.served_model_name.clone();
    if req.stream {
        let include_usage = req.stream_options.as_ref().is_some_and(|o| o.include_usage);
        let head = json!({"id": id, "object": "chat.completion.chunk", "created": created, "model": model});
        let n = params.n;
        return Ok(
            stream_response(s.clone(), rxs, n, params, head, true, include_usage).into_response(),
        );
    }
    let outs = collect(&s, rxs).await?;
    let tok = s.tokenizer.as_ref();
    let choices: Vec<Value> = outs[0]
        .outputs
        .iter()
        .map(|c| {
            json!({
                "index": c.index,
                "message": {"role": "assistant", "content": c.text},
                "logprobs": c.logprobs.as_ref().map(|l| chat_logprobs(tok, l)),
                "finish_reason": c.finish_reason.map(|f| f.as_str()),
                "stop_reason": stop_reason(c),
            })
        })
        .collect();
    Ok(Json(json!({
        "id": id, "object": "chat.completion", "created": created, "model": model,
        "choices": choices, "usage": usage(&outs),
    }))
    .into_response())
}

/// Streaming state of one choice: what was sent so far.
#[derive(Clone, Default)]
struct Sent {
    bytes: usize,
    tokens: usize,
    finished: bool,
    role_sent: bool,
}

/// Server-sent events: a chunk per output with new text (stop-string tails held back until
/// the sequence finishes, so trimmed text is never sent), the usage chunk if asked, then
/// `[DONE]`. Dropping the stream (client gone) drops the receivers, which aborts the
/// requests in the engine.
fn stream_response(
    s: Shared,
    rxs: Vec<UnboundedReceiver<Event>>,
    n: usize,
    params: SamplingParams,
    head: Value,
    chat: bool,
    include_usage: bool,
) -> Sse<impl Stream<Item = Result<SseEvent, Infallible>>> {
    // Submitted just before: time to first token counts from here.
    let start = Instant::now();
    let holdback = params.output_text_buffer_length();
    let want_logprobs = params.logprobs.is_some();
    let streams = rxs
        .into_iter()
        .enumerate()
        .map(|(pi, rx)| UnboundedReceiverStream::new(rx).map(move |ev| (pi, ev)));
    let merged = stream::select_all(streams);
    let mut sent: Vec<Sent> = Vec::new();
    let finals = Arc::new(std::sync::Mutex::new(Vec::<RequestOutput>::new()));
    let finals_in = finals.clone();
    let mut timings: Vec<Option<Timing>> = Vec::new();
    let state = s.clone();
    let usage_head = head.clone();
    let body = merged.filter_map(move |(pi, ev)| {
        let out = match ev {
            Ok(o) => o,
            Err(e) => {
                let err = ApiError::bad_request(e).body();
                return futures::future::ready(Some(vec![SseEvent::default().data(err.to_string())]));
            }
        };
        if timings.len() <= pi {
            timings.resize_with(pi + 1, || None);
        }
        timings[pi]
            .get_or_insert(Timing {
                start,
                last: None,
                tokens: 0,
            })
            .observe(&state.metrics, &out);
        let tok = state.tokenizer.as_ref();
        let mut events = Vec::new();
        for c in &out.outputs {
            let idx = pi * n + c.index;
            if sent.len() <= idx {
                sent.resize(idx + 1, Sent::default());
            }
            let st = &mut sent[idx];
            if st.finished {
                continue;
            }
            let done = c.finish_reason.is_some();
            let visible = if done {
                c.text.len()
            } else {
                // Hold back the last `holdback` characters: a stop string may start there.
                let mut end = c.text.len();
                for _ in 0..holdback {
                    match c.text[..end].char_indices().next_back() {
                        Some((i, _)) => end = i,
                        None => break,
                    }
                }
                end.max(st.bytes)
            };
            let delta = c.text.get(st.bytes..visible).unwrap_or("").to_string();
            let new_lps: Vec<PositionLogprobs> = c
                .logprobs
                .as_ref()
                .map(|l| l.get(st.tokens..).unwrap_or(&[]).to_vec())
                .unwrap_or_default();
            if delta.is_empty() && !done && (!chat || st.role_sent) {
                continue;
            }
            let mut chunk = head.clone();
            let finish = c.finish_reason.map(|f| f.as_str());
            let choice = if chat {
                let mut d = json!({"content": delta});
                if !st.role_sent {
                    d["role"] = json!("assistant");
                    st.role_sent = true;
                }
                json!({"index": idx, "delta": d,
                       "logprobs": if want_logprobs { chat_logprobs(tok, &new_lps) } else { Value::Null },
                       "finish_reason": finish, "stop_reason": if done { stop_reason(c) } else { Value::Null }})
            } else {
                json!({"index": idx, "text": delta,
                       "logprobs": if want_logprobs { completion_logprobs(tok, &new_lps) } else { Value::Null },
                       "finish_reason": finish, "stop_reason": if done { stop_reason(c) } else { Value::Null }})
            };
            chunk["choices"] = json!([choice]);
            events.push(SseEvent::default().data(chunk.to_string()));
            st.bytes = visible;
            st.tokens = c.token_ids.len();
            st.finished = done;
        }
        if out.finished {
            finals_in.lock().unwrap_or_else(|e| e.into_inner()).push(out);
        }
        futures::future::ready(Some(events))
    });
    let body = body.flat_map(stream::iter).map(Ok::<_, Infallible>);
    let tail = stream::once(async move {
        let outs = std::mem::take(&mut *finals.lock().unwrap_or_else(|e| e.into_inner()));
        let mut events = Vec::new();
        if include_usage {
            let mut chunk = usage_head;
            chunk["choices"] = json!([]);
            chunk["usage"] = usage(&outs);
            events.push(SseEvent::default().data(chunk.to_string()));
        }
        events.push(SseEvent::default().data("[DONE]"));
        stream::iter(events.into_iter().map(Ok::<_, Infallible>))
    })
    .flatten();
    Sse::new(body.chain(tail)).keep_alive(KeepAlive::default())
}

async fn tokenize(
    State(s): State<Shared>,
    body: Result<Json<TokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let tok = tokenizer(&s)?;
    let ids = match json_body(body)? {
        TokenizeRequest::Prompt { prompt, .. } => tok.encode(&prompt),
        TokenizeRequest::Chat {
            messages,
            add_generation_prompt,
        } => tok
            .render_chat(
                &Value::Array(messages),
                add_generation_prompt,
                &Default::default(),
            )
            .and_then(|t| tok.encode(&t)),
    }
    .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(
        json!({"count": ids.len(), "max_model_len": s.cfg.max_model_len, "tokens": ids}),
    ))
}

async fn detokenize(
    State(s): State<Shared>,
    body: Result<Json<DetokenizeRequest>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let tok = tokenizer(&s)?;
    let req = json_body(body)?;
    if let Some(bad) = req.tokens.iter().find(|&&t| t as usize >= s.cfg.vocab) {
        return Err(ApiError::bad_request(format!(
            "token id {bad} is out of vocabulary"
        )));
    }
    let text = tok
        .decode(&req.tokens, false)
        .map_err(|e| ApiError::bad_request(e.to_string()))?;
    Ok(Json(json!({"prompt": text})))
}
