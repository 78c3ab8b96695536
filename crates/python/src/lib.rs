//! `vllm_apple`: vLLM's offline Python API (`LLM`, `SamplingParams`, `RequestOutput`,
//! `CompletionOutput`) over the Rust engine. The engine runs with the GIL released.

use std::collections::HashMap;

use pyo3::exceptions::{PyRuntimeError, PyTypeError, PyValueError};
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList};

use vllm_apple_engine::engine::PositionLogprobs;
use vllm_apple_engine::llm::ChatMessage;
use vllm_apple_engine::params::StopReason;
use vllm_apple_engine::{EngineArgs, EngineError, Prompt};

fn err(e: EngineError) -> PyErr {
    match e {
        EngineError::InvalidRequest(m) => PyValueError::new_err(m),
        other => PyRuntimeError::new_err(other.to_string()),
    }
}

/// vLLM's `SamplingParams`, same names and defaults.
#[pyclass(get_all, set_all, from_py_object)]
#[derive(Clone)]
struct SamplingParams {
    n: usize,
    temperature: f32,
    top_p: f32,
    top_k: i32,
    min_p: f32,
    presence_penalty: f32,
    frequency_penalty: f32,
    repetition_penalty: f32,
    seed: Option<u64>,
    stop: Vec<String>,
    stop_token_ids: Vec<u32>,
    ignore_eos: bool,
    max_tokens: Option<usize>,
    min_tokens: usize,
    logprobs: Option<usize>,
    prompt_logprobs: Option<usize>,
    skip_special_tokens: bool,
    include_stop_str_in_output: bool,
    logit_bias: Option<HashMap<u32, f32>>,
}

#[derive(FromPyObject)]
enum StopArg {
    One(String),
    Many(Vec<String>),
}

#[pymethods]
impl SamplingParams {
    #[new]
    #[pyo3(signature = (n=1, temperature=1.0, top_p=1.0, top_k=0, min_p=0.0, presence_penalty=0.0,
        frequency_penalty=0.0, repetition_penalty=1.0, seed=None, stop=None, stop_token_ids=None,
        ignore_eos=false, max_tokens=Some(16), min_tokens=0, logprobs=None, prompt_logprobs=None,
        skip_special_tokens=true, include_stop_str_in_output=false, logit_bias=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        n: usize,
        temperature: f32,
        top_p: f32,
        top_k: i32,
        min_p: f32,
        presence_penalty: f32,
        frequency_penalty: f32,
        repetition_penalty: f32,
        seed: Option<u64>,
        stop: Option<StopArg>,
        stop_token_ids: Option<Vec<u32>>,
        ignore_eos: bool,
        max_tokens: Option<usize>,
        min_tokens: usize,
        logprobs: Option<usize>,
        prompt_logprobs: Option<usize>,
        skip_special_tokens: bool,
        include_stop_str_in_output: bool,
        logit_bias: Option<HashMap<u32, f32>>,
    ) -> PyResult<Self> {
        let p = SamplingParams {
            n,
            temperature,
            top_p,
            top_k,
            min_p,
            presence_penalty,
            frequency_penalty,
            repetition_penalty,
            seed,
            stop: match stop {
                None => Vec::new(),
                Some(StopArg::One(s)) => vec![s],
                Some(StopArg::Many(v)) => v,
            },
            stop_token_ids: stop_token_ids.unwrap_or_default(),
            ignore_eos,
            max_tokens,
            min_tokens,
            logprobs,
            prompt_logprobs,
            skip_special_tokens,
            include_stop_str_in_output,
            logit_bias,
        };
        p.to_rust().validate().map_err(PyValueError::new_err)?;
        Ok(p)
    }

    fn __repr__(&self) -> String {
        format!(
            "SamplingParams(n={}, temperature={}, top_p={}, top_k={}, min_p={}, seed={:?}, \
             stop={:?}, max_tokens={:?}, logprobs={:?})",
            self.n,
            self.temperature,
            self.top_p,
            self.top_k,
            self.min_p,
            self.seed,
            self.stop,
            self.max_tokens,
            self.logprobs
        )
    }
}

impl SamplingParams {
    fn to_rust(&self) -> vllm_apple_engine::SamplingParams {
        vllm_apple_engine::SamplingParams {
            n: self.n,
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            min_p: self.min_p,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            stop: self.stop.clone(),
            stop_token_ids: self.stop_token_ids.clone(),
            ignore_eos: self.ignore_eos,
            max_tokens: self.max_tokens,
            min_tokens: self.min_tokens,
            logprobs: self.logprobs,
            prompt_logprobs: self.prompt_logprobs,
            logit_bias: self
                .logit_bias
                .iter()
                .flatten()
                .map(|(k, v)| (*k, *v))
                .collect(),
            skip_special_tokens: self.skip_special_tokens,
            include_stop_str_in_output: self.include_stop_str_in_output,
        }
    }
}

/// vLLM's `Logprob`.
#[pyclass(get_all, from_py_object)]
#[derive(Clone)]
struct Logprob {
    logprob: f32,
    rank: usize,
    decoded_token: Option<String>,
}

#[pymethods]
impl Logprob {
    fn __repr__(&self) -> String {
        format!(
            "Logprob(logprob={}, rank={}, decoded_token={:?})",
            self.logprob, self.rank, self.decoded_token
        )
    }
}

/// vLLM's `CompletionOutput`.
#[pyclass(from_py_object)]
#[derive(Clone)]
struct CompletionOutput {
    #[pyo3(get)]
    index: usize,
    #[pyo3(get)]
    text: String,
    #[pyo3(get)]
    token_ids: Vec<u32>,
    #[pyo3(get)]
    cumulative_logprob: Option<f64>,
    /// One dict per generated token: token id -> Logprob (the sampled token and the top-N).
    #[pyo3(get)]
    logprobs: Option<Vec<HashMap<u32, Logprob>>>,
    #[pyo3(get)]
    finish_reason: Option<String>,
    stop: Option<StopReason>,
}

#[pymethods]
impl CompletionOutput {
    /// What stopped the sequence: the stop string, the stop token id, or None (eos, length).
    #[getter]
    fn stop_reason<'py>(&self, py: Python<'py>) -> PyResult<Option<Bound<'py, PyAny>>> {
        Ok(match &self.stop {
            None => None,
            Some(StopReason::Text(t)) => Some(t.clone().into_pyobject(py)?.into_any()),
            Some(StopReason::Token(t)) => Some(t.into_pyobject(py)?.into_any()),
        })
    }

    fn finished(&self) -> bool {
        self.finish_reason.is_some()
    }

    fn __repr__(&self) -> String {
        format!(
            "CompletionOutput(index={}, text={:?}, token_ids={:?}, finish_reason={:?})",
            self.index, self.text, self.token_ids, self.finish_reason
        )
    }
}

/// vLLM's `RequestOutput`.
#[pyclass(get_all, from_py_object)]
#[derive(Clone)]
struct RequestOutput {
    request_id: String,
    prompt: Option<String>,
    prompt_token_ids: Vec<u32>,
    prompt_logprobs: Option<Vec<Option<HashMap<u32, Logprob>>>>,
    outputs: Vec<CompletionOutput>,
    finished: bool,
}

#[pymethods]
impl RequestOutput {
    fn __repr__(&self) -> String {
        format!(
            "RequestOutput(request_id={:?}, prompt={:?}, outputs={} , finished={})",
            self.request_id,
            self.prompt,
            self.outputs.len(),
            self.finished
        )
    }
}

fn logprob_dict(
    p: &PositionLogprobs,
    decode: &dyn Fn(u32) -> Option<String>,
) -> HashMap<u32, Logprob> {
    let mut m = HashMap::new();
    for t in p.top.iter().chain(std::iter::once(&p.token)) {
        m.entry(t.token).or_insert(Logprob {
            logprob: t.logprob,
            rank: t.rank,
            decoded_token: decode(t.token),
        });
    }
    m
}

/// vLLM's `LLM`: loads a model (GGUF file, Hugging Face folder, or hub id in the local
/// cache) and generates for batches of prompts.
#[pyclass(name = "LLM")]
struct Llm {
    inner: vllm_apple_engine::LLM,
}

fn prompt_of(obj: &Bound<'_, PyAny>) -> PyResult<Prompt> {
    if let Ok(s) = obj.extract::<String>() {
        return Ok(Prompt::Text(s));
    }
    if let Ok(d) = obj.cast::<PyDict>() {
        if let Some(ids) = d.get_item("prompt_token_ids")? {
            return Ok(Prompt::Ids(ids.extract()?));
        }
        if let Some(p) = d.get_item("prompt")? {
            return Ok(Prompt::Text(p.extract()?));
        }
    }
    Err(PyTypeError::new_err(
        "a prompt is a str or a dict with 'prompt' or 'prompt_token_ids'",
    ))
}

fn params_of(
    sp: Option<&Bound<'_, PyAny>>,
    n: usize,
) -> PyResult<Vec<vllm_apple_engine::SamplingParams>> {
    match sp {
        None => Ok(vec![vllm_apple_engine::SamplingParams::default()]),
        Some(obj) => {
            if let Ok(p) = obj.extract::<SamplingParams>() {
                return Ok(vec![p.to_rust()]);
            }
            let list: Vec<SamplingParams> = obj.extract()?;
            if list.len() != n {
                return Err(PyValueError::new_err(format!(
                    "{} sampling params for {n} prompts",
                    list.len()
                )));
            }
            Ok(list.iter().map(SamplingParams::to_rust).collect())
        }
    }
}

impl Llm {
    fn convert(&self, outs: Vec<vllm_apple_engine::RequestOutput>) -> PyResult<Vec<RequestOutput>> {
        let tok = self.inner.engine.tokenizer.as_ref();
        let decode = |id: u32| tok.and_then(|t| t.decode(&[id], false).ok());
        outs.into_iter()
            .map(|o| {
                let outputs = o
                    .outputs
                    .iter()
                    .map(|c| {
                        Ok(CompletionOutput {
                            index: c.index,
                            text: c.text.clone(),
                            token_ids: c.token_ids.clone(),
                            cumulative_logprob: c.cumulative_logprob,
                            logprobs: c
                                .logprobs
                                .as_ref()
                                .map(|l| l.iter().map(|p| logprob_dict(p, &decode)).collect()),
                            finish_reason: c.finish_reason.map(|f| f.as_str().to_string()),
                            stop: c.stop_reason.clone(),
                        })
                    })
                    .collect::<PyResult<Vec<_>>>()?;
                Ok(RequestOutput {
                    request_id: o.request_id,
                    prompt: o.prompt,
                    prompt_token_ids: o.prompt_token_ids,
                    prompt_logprobs: o.prompt_logprobs.map(|v| {
                        v.iter()
                            .map(|p| p.as_ref().map(|p| logprob_dict(p, &decode)))
                            .collect()
                    }),
                    outputs,
                    finished: o.finished,
                })
            })
            .collect()
    }
}

#[pymethods]
impl Llm {
    #[new]
    #[pyo3(signature = (model, tokenizer=None, dtype="auto", max_model_len=None,
        gpu_memory_utilization=0.9, max_num_seqs=256, max_num_batched_tokens=None,
        enable_prefix_caching=true, load_format="auto", seed=0, block_size=16,
        num_gpu_blocks_override=None, async_scheduling=true, **_kwargs))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        model: String,
        tokenizer: Option<String>,
        dtype: &str,
        max_model_len: Option<usize>,
        gpu_memory_utilization: f64,
        max_num_seqs: usize,
        max_num_batched_tokens: Option<usize>,
        enable_prefix_caching: bool,
        load_format: &str,
        seed: u64,
        block_size: usize,
        num_gpu_blocks_override: Option<usize>,
        async_scheduling: bool,
        _kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Self> {
        let args = EngineArgs {
            model,
            tokenizer,
            dtype: dtype.to_string(),
            max_model_len,
            gpu_memory_utilization,
            max_num_seqs,
            max_num_batched_tokens,
            enable_prefix_caching,
            load_format: load_format.to_string(),
            seed,
            block_size,
            num_gpu_blocks_override,
            async_scheduling,
        };
        let inner = py
            .detach(|| vllm_apple_engine::LLM::new(args))
            .map_err(err)?;
        Ok(Llm { inner })
    }

    /// Generates for one prompt or a list (str, or dict with 'prompt' / 'prompt_token_ids');
    /// outputs in prompt order.
    #[pyo3(signature = (prompts, sampling_params=None, use_tqdm=true))]
    fn generate(
        &mut self,
        py: Python<'_>,
        prompts: &Bound<'_, PyAny>,
        sampling_params: Option<&Bound<'_, PyAny>>,
        use_tqdm: bool,
    ) -> PyResult<Vec<RequestOutput>> {
        let _ = use_tqdm;
        let list: Vec<Prompt> = if let Ok(l) = prompts.cast::<PyList>() {
            l.iter().map(|p| prompt_of(&p)).collect::<PyResult<_>>()?
        } else {
            vec![prompt_of(prompts)?]
        };
        let params = params_of(sampling_params, list.len())?;
        let inner = &mut self.inner;
        let outs = py.detach(|| inner.generate(list, &params)).map_err(err)?;
        self.convert(outs)
    }

    /// Chat: one conversation (a list of {'role', 'content'} dicts) or a list of them,
    /// rendered with the model's chat template (`chat_template_kwargs` such as
    /// `enable_thinking` go to the template).
    #[pyo3(signature = (messages, sampling_params=None, use_tqdm=true, chat_template_kwargs=None))]
    fn chat(
        &mut self,
        py: Python<'_>,
        messages: &Bound<'_, PyList>,
        sampling_params: Option<&Bound<'_, PyAny>>,
        use_tqdm: bool,
        chat_template_kwargs: Option<&Bound<'_, PyDict>>,
    ) -> PyResult<Vec<RequestOutput>> {
        let _ = use_tqdm;
        let is_batch = messages
            .iter()
            .next()
            .is_some_and(|m| m.cast::<PyList>().is_ok());
        let convs: Vec<Vec<HashMap<String, String>>> = if is_batch {
            messages.extract()?
        } else {
            vec![messages.extract()?]
        };
        let convs: Vec<Vec<ChatMessage>> = convs
            .into_iter()
            .map(|c| {
                c.into_iter()
                    .map(|m| ChatMessage {
                        role: m.get("role").cloned().unwrap_or_default(),
                        content: m.get("content").cloned().unwrap_or_default(),
                    })
                    .collect()
            })
            .collect();
        let mut kwargs = serde_json::Map::new();
        if let Some(d) = chat_template_kwargs {
            for (k, v) in d.iter() {
                let key: String = k.extract()?;
                let value = if let Ok(b) = v.extract::<bool>() {
                    serde_json::Value::Bool(b)
                } else if let Ok(s) = v.extract::<String>() {
                    serde_json::Value::String(s)
                } else if let Ok(i) = v.extract::<i64>() {
                    serde_json::Value::from(i)
                } else {
                    return Err(PyTypeError::new_err(format!(
                        "chat_template_kwargs['{key}']: bool, str or int expected"
                    )));
                };
                kwargs.insert(key, value);
            }
        }
        let params = params_of(sampling_params, convs.len())?;
        let inner = &mut self.inner;
        let outs = py
            .detach(|| inner.chat(&convs, &params, &kwargs))
            .map_err(err)?;
        self.convert(outs)
    }

    /// The tokenizer's ids of `text`.
    fn encode(&self, text: &str) -> PyResult<Vec<u32>> {
        let tok = self
            .inner
            .engine
            .tokenizer
            .as_ref()
            .ok_or_else(|| PyValueError::new_err("this model has no tokenizer"))?;
        tok.encode(text)
            .map_err(|e| PyValueError::new_err(e.to_string()))
    }
}

#[pymodule]
fn _vllm_apple(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<Llm>()?;
    m.add_class::<SamplingParams>()?;
    m.add_class::<RequestOutput>()?;
    m.add_class::<CompletionOutput>()?;
    m.add_class::<Logprob>()?;
    m.add("__version__", env!("CARGO_PKG_VERSION"))?;
    Ok(())
}
