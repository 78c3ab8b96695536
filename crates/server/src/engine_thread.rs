//! The engine on its own thread. HTTP handlers send it requests over a channel and get a
//! channel of outputs back; the thread steps the engine while anything is unfinished and
//! blocks on the command channel when idle. A request whose output channel is closed (the
//! client went away) is aborted, which frees its KV blocks.

use std::collections::HashMap;
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc::UnboundedSender;
use vllm_apple_engine::engine::EngineStats;
use vllm_apple_engine::{LLMEngine, Prompt, RequestOutput, SamplingParams};

/// What a request's channel carries: cumulative outputs, or an error that ends it.
pub type Event = Result<RequestOutput, String>;

enum Command {
    Add {
        id: String,
        prompt: Vec<u32>,
        params: Box<SamplingParams>,
        events: UnboundedSender<Event>,
    },
    Abort(String),
}

/// A handle on the engine thread (cheap to clone into every handler).
#[derive(Clone)]
pub struct EngineHandle {
    tx: Sender<Command>,
    stats: Arc<Mutex<EngineStats>>,
}

impl EngineHandle {
    /// Moves `engine` to a new thread and returns the handle.
    pub fn spawn(engine: LLMEngine) -> EngineHandle {
        let (tx, rx) = mpsc::channel();
        let stats = Arc::new(Mutex::new(engine.stats()));
        let shared = stats.clone();
        std::thread::Builder::new()
            .name("engine".into())
            .spawn(move || run(engine, rx, shared))
            .expect("spawning the engine thread");
        EngineHandle { tx, stats }
    }

    /// Queues a request; its outputs (or its error) arrive on `events`.
    pub fn add(
        &self,
        id: String,
        prompt: Vec<u32>,
        params: SamplingParams,
        events: UnboundedSender<Event>,
    ) {
        let cmd = Command::Add {
            id,
            prompt,
            params: Box::new(params),
            events: events.clone(),
        };
        if self.tx.send(cmd).is_err() {
            let _ = events.send(Err("the engine has stopped".into()));
        }
    }

    pub fn abort(&self, id: String) {
        let _ = self.tx.send(Command::Abort(id));
    }

    /// The engine's counters as of its last step.
    pub fn stats(&self) -> EngineStats {
        *self.stats.lock().unwrap_or_else(|e| e.into_inner())
    }
}

fn run(mut engine: LLMEngine, rx: Receiver<Command>, stats: Arc<Mutex<EngineStats>>) {
    let mut live: HashMap<String, UnboundedSender<Event>> = HashMap::new();
    loop {
        // Idle: wait for work (waking now and then to notice closed channels).
        if !engine.has_unfinished() {
            match rx.recv_timeout(Duration::from_millis(500)) {
                Ok(cmd) => apply(&mut engine, &mut live, cmd),
                Err(RecvTimeoutError::Timeout) => continue,
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
        while let Ok(cmd) = rx.try_recv() {
            apply(&mut engine, &mut live, cmd);
        }
        // Clients that went away before their next output.
        let gone: Vec<String> = live
            .iter()
            .filter(|(_, tx)| tx.is_closed())
            .map(|(id, _)| id.clone())
            .collect();
        for id in gone {
            engine.abort(&id);
            live.remove(&id);
        }
        if engine.has_unfinished() {
            match engine.step() {
                Ok(outs) => {
                    for out in outs {
                        let id = out.request_id.clone();
                        let finished = out.finished;
                        let delivered = live.get(&id).is_some_and(|tx| tx.send(Ok(out)).is_ok());
                        if !delivered && !finished {
                            engine.abort(&id);
                        }
                        if finished || !delivered {
                            live.remove(&id);
                        }
                    }
                }
                Err(e) => {
                    tracing::error!("engine step failed: {e}");
                    for (id, tx) in live.drain() {
                        let _ = tx.send(Err(format!("engine error: {e}")));
                        engine.abort(&id);
                    }
                }
            }
        }
        *stats.lock().unwrap_or_else(|e| e.into_inner()) = engine.stats();
    }
}

fn apply(engine: &mut LLMEngine, live: &mut HashMap<String, UnboundedSender<Event>>, cmd: Command) {
    match cmd {
        Command::Add {
            id,
            prompt,
            params,
            events,
        } => match engine.add_request(&id, Prompt::Ids(prompt), *params) {
            Ok(()) => {
                live.insert(id, events);
            }
            Err(e) => {
                let _ = events.send(Err(e.to_string()));
            }
        },
        Command::Abort(id) => {
            engine.abort(&id);
            live.remove(&id);
        }
    }
}
