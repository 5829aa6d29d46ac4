//! Turning parsed requests into a [`Validated`] generation: every check that needs no worker, each error naming
//! the field.

use serde::de::DeserializeOwned;

use crate::error::ApiError;
use crate::openai::{
    ChatCompletionRequest, CompletionRequest, Message, MessageContent, Prompt, SamplingFields, Stop,
};

/// Request limits that protect the gateway and workers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_messages: usize,
    /// Characters in all messages (or the prompt) together.
    pub max_prompt_chars: usize,
    pub max_stop_sequences: usize,
    /// `max_tokens` of a request that sets none (a key's `default_max_tokens` overrides it): sent to the worker, so
    /// that no generation runs to the end of the context unasked, and reserved against `tokens_per_minute`.
    pub default_max_tokens: u32,
    /// How long a request's body may take to arrive in full (a body dribbled slower is cut with 408).
    pub body_timeout: std::time::Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_body_bytes: 4 << 20,
            max_messages: 1024,
            max_prompt_chars: 1 << 20,
            max_stop_sequences: 4,
            default_max_tokens: 4096,
            body_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// What the model is asked for.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    /// `(role, content)` pairs, roles being `system`, `user` or `assistant`.
    Chat(Vec<(String, String)>),
    Prompt(String),
}

#[derive(Debug, Clone, PartialEq)]
pub struct Params {
    pub max_tokens: Option<u32>,
    pub temperature: f64,
    pub top_p: f64,
    pub top_k: u32,
    pub repetition_penalty: f64,
    pub presence_penalty: f64,
    pub frequency_penalty: f64,
    pub seed: Option<u64>,
    pub stop: Vec<String>,
    pub ignore_eos: bool,
}

impl Params {
    /// Greedy decoding with every penalty off and no stop strings: the gateway's own generations (a guard model's
    /// verdicts) use it.
    pub fn greedy(max_tokens: Option<u32>) -> Self {
        Self {
            max_tokens,
            temperature: 0.0,
            top_p: 1.0,
            top_k: 0,
            repetition_penalty: 1.0,
            presence_penalty: 0.0,
            frequency_penalty: 0.0,
            seed: None,
            stop: Vec::new(),
            ignore_eos: false,
        }
    }
}

/// Which API the request came through (it decides the response shape).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Api {
    Chat,
    Completions,
}

impl Api {
    pub fn route(self) -> &'static str {
        match self {
            Api::Chat => "/v1/chat/completions",
            Api::Completions => "/v1/completions",
        }
    }
}

/// A request that passed validation.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub api: Api,
    pub model: String,
    pub input: Input,
    pub params: Params,
    pub stream: bool,
    pub include_usage: bool,
    /// Whose prompt-prefix cache the request may share on the worker: the API key's name (empty without keys).
    /// Set at admission, never from the body.
    pub cache_salt: String,
    /// The LoRA adapter of `model` the client named (empty: the model itself). Set at resolution, never from the
    /// body.
    pub adapter: String,
}

impl Validated {
    /// The name a response carries in `model`: the adapter's when the request asked for one (as vLLM answers),
    /// else the model's.
    pub fn shown_model(&self) -> String {
        if self.adapter.is_empty() {
            self.model.clone()
        } else {
            self.adapter.clone()
        }
    }
}

/// Parses JSON, telling malformed JSON (400) from the wrong shape (422, naming the field).
pub fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        if inner.is_syntax() || inner.is_eof() {
            return ApiError::malformed_json(format!("the body is not valid JSON: {inner}"));
        }
        let message = inner.to_string();
        let mut param = if path == "." { String::new() } else { path };
        if let Some(field) = message
            .strip_prefix("missing field `")
            .and_then(|rest| rest.split('`').next())
        {
            param = if param.is_empty() {
                field.to_string()
            } else {
                format!("{param}.{field}")
            };
        }
        let shown = if param.is_empty() {
            "the body".to_string()
        } else {
            format!("`{param}`")
        };
        ApiError::wrong_shape(&param, format!("{shown}: {message}"))
    })?;
    de.end()
        .map_err(|e| ApiError::malformed_json(format!("the body is not valid JSON: {e}")))?;
    Ok(value)
}

/// Parses a chat completions body.
pub fn parse_chat(body: &[u8]) -> Result<ChatCompletionRequest, ApiError> {
    let mut request: ChatCompletionRequest = parse(body)?;
    request.sampling = parse(body)?;
    Ok(request)
}

/// Parses a completions body.
pub fn parse_completion(body: &[u8]) -> Result<CompletionRequest, ApiError> {
    let mut request: CompletionRequest = parse(body)?;
    request.sampling = parse(body)?;
    Ok(request)
}

fn check_range(param: &str, v: f64, lo: f64, hi: f64, lo_open: bool) -> Result<f64, ApiError> {
    let ok = v.is_finite() && v <= hi && if lo_open { v > lo } else { v >= lo };
    if ok {
        Ok(v)
    } else {
        let bracket = if lo_open { "(" } else { "[" };
        Err(ApiError::invalid(
            param,
            format!("`{param}` must be in {bracket}{lo}, {hi}], got {v}"),
        ))
    }
}

fn params(s: &SamplingFields, max_tokens: Option<i64>, limits: &Limits) -> Result<Params, ApiError> {
    if let Some(n) = s.n.filter(|&n| n != 1) {
        return Err(ApiError::unsupported(
            "n",
            format!("`n` must be 1 (got {n}); send several requests instead"),
        ));
    }
    if s.stream_options.is_some() && !s.stream {
        return Err(ApiError::invalid(
            "stream_options",
            "`stream_options` is only allowed with `stream: true`",
        ));
    }
    let max_tokens = match max_tokens {
        None => None,
        Some(n) if (1..=i64::from(u32::MAX)).contains(&n) => Some(n as u32),
        Some(n) => {
            return Err(ApiError::invalid(
                "max_tokens",
                format!("`max_tokens` must be at least 1, got {n}"),
            ));
        }
    };
    let stop = match &s.stop {
        None => vec![],
        Some(Stop::One(s)) => vec![s.clone()],
        Some(Stop::Many(v)) => v.clone(),
    };
    if stop.len() > limits.max_stop_sequences {
        return Err(ApiError::invalid(
            "stop",
            format!(
                "`stop` takes at most {} sequences, got {}",
                limits.max_stop_sequences,
                stop.len()
            ),
        ));
    }
    if stop.iter().any(String::is_empty) {
        return Err(ApiError::invalid("stop", "`stop` sequences must not be empty"));
    }
    // The worker's own limit (it scans the output for each stop sequence at every step).
    let max_stop = camelid_contracts::worker_limits::MAX_STOP_BYTES;
    if let Some(i) = stop.iter().position(|s| s.len() > max_stop) {
        return Err(ApiError::invalid(
            "stop",
            format!("`stop[{i}]` is longer than {max_stop} bytes"),
        ));
    }
    let top_k = match s.top_k {
        None | Some(-1) => 0,
        Some(k) if (0..=i64::from(u32::MAX)).contains(&k) => k as u32,
        Some(k) => {
            return Err(ApiError::invalid(
                "top_k",
                format!("`top_k` must be >= 0 (or -1 for off), got {k}"),
            ));
        }
    };
    let seed = match s.seed {
        None => None,
        Some(seed) => {
            Some(u64::try_from(seed).map_err(|_| ApiError::invalid("seed", "`seed` must be >= 0"))?)
        }
    };
    Ok(Params {
        max_tokens,
        temperature: check_range("temperature", s.temperature.unwrap_or(1.0), 0.0, 2.0, false)?,
        top_p: check_range("top_p", s.top_p.unwrap_or(1.0), 0.0, 1.0, true)?,
        top_k,
        repetition_penalty: check_range(
            "repetition_penalty",
            s.repetition_penalty.unwrap_or(1.0),
            0.0,
            10.0,
            true,
        )?,
        presence_penalty: check_range(
            "presence_penalty",
            s.presence_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
            false,
        )?,
        frequency_penalty: check_range(
            "frequency_penalty",
            s.frequency_penalty.unwrap_or(0.0),
            -2.0,
            2.0,
            false,
        )?,
        seed,
        stop,
        ignore_eos: s.ignore_eos,
    })
}

fn require_model(model: &str) -> Result<String, ApiError> {
    if model.trim().is_empty() {
        return Err(ApiError::invalid("model", "`model` must not be empty"));
    }
    Ok(model.to_string())
}

pub fn chat(r: ChatCompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    let model = require_model(&r.model)?;
    refuse_unsupported(&r)?;
    let messages = messages(&r.messages, limits)?;
    let max_tokens = r.max_completion_tokens.or(r.sampling.max_tokens);
    let param_name_fix = |e: ApiError| {
        if r.max_completion_tokens.is_some() && e.param.as_deref() == Some("max_tokens") {
            e.with_param("max_completion_tokens")
        } else {
            e
        }
    };
    let params = params(&r.sampling, max_tokens, limits).map_err(param_name_fix)?;
    Ok(Validated {
        cache_salt: String::new(),
        adapter: String::new(),
        api: Api::Chat,
        model,
        input: Input::Chat(messages),
        params,
        stream: r.sampling.stream,
        include_usage: r
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

/// The chat features camelid does not serve (log probabilities, function calling, structured output) are refused
/// by name rather than ignored.
fn refuse_unsupported(r: &ChatCompletionRequest) -> Result<(), ApiError> {
    if r.logprobs == Some(true) {
        return Err(ApiError::unsupported("logprobs", "`logprobs` is not supported"));
    }
    for (name, value) in [("tools", &r.tools), ("functions", &r.functions)] {
        if value
            .as_ref()
            .is_some_and(|v| !v.is_null() && v.as_array().is_none_or(|a| !a.is_empty()))
        {
            return Err(ApiError::unsupported(
                name,
                format!("`{name}` (function calling) is not supported"),
            ));
        }
    }
    if let Some(kind) = r
        .response_format
        .as_ref()
        .and_then(|f| f.get("type"))
        .and_then(|t| t.as_str())
        && kind != "text"
    {
        return Err(ApiError::unsupported(
            "response_format",
            format!("`response_format` {kind:?} is not supported; only \"text\""),
        ));
    }
    Ok(())
}

/// The conversation as (role, text) pairs: within the limits, roles known, content text, ending on a turn the
/// model answers.
fn messages(input: &[Message], limits: &Limits) -> Result<Vec<(String, String)>, ApiError> {
    if input.is_empty() {
        return Err(ApiError::invalid(
            "messages",
            "`messages` must contain at least one message",
        ));
    }
    if input.len() > limits.max_messages {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "`messages` has {} messages; the limit is {}",
                input.len(),
                limits.max_messages
            ),
        ));
    }
    let mut messages = Vec::with_capacity(input.len());
    let mut chars = 0usize;
    for (i, m) in input.iter().enumerate() {
        let role = role(i, &m.role)?;
        let content = content(i, m.content.as_ref())?;
        chars += content.chars().count();
        messages.push((role.to_string(), content));
    }
    if chars > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "messages",
            format!(
                "the messages have {chars} characters; the limit is {}",
                limits.max_prompt_chars
            ),
        ));
    }
    if messages.last().is_some_and(|(role, _)| role == "assistant") {
        return Err(ApiError::invalid(
            "messages",
            "the last message must be from the user or system (continuing an assistant message is not supported)",
        ));
    }
    Ok(messages)
}

/// Message `i`'s role as the chat template knows it (`developer` is OpenAI's newer name for `system`).
fn role(i: usize, role: &str) -> Result<&'static str, ApiError> {
    match role {
        "system" | "developer" => Ok("system"),
        "user" => Ok("user"),
        "assistant" => Ok("assistant"),
        other => Err(ApiError::invalid(
            &format!("messages[{i}].role"),
            format!("`messages[{i}].role` {other:?} is not supported; use system, user or assistant"),
        )),
    }
}

/// Message `i`'s text: a string, or text parts joined (other parts, such as images, are refused by index).
fn content(i: usize, content: Option<&MessageContent>) -> Result<String, ApiError> {
    match content {
        Some(MessageContent::Text(t)) => Ok(t.clone()),
        Some(MessageContent::Parts(parts)) => {
            let mut text = String::new();
            for (j, p) in parts.iter().enumerate() {
                match (p.kind.as_str(), &p.text) {
                    ("text", Some(t)) => text.push_str(t),
                    (kind, _) => {
                        return Err(ApiError::unsupported(
                            &format!("messages[{i}].content[{j}]"),
                            format!("content part type {kind:?} is not supported; only text parts"),
                        ));
                    }
                }
            }
            Ok(text)
        }
        None => Err(ApiError::invalid(
            &format!("messages[{i}].content"),
            format!("`messages[{i}].content` is required"),
        )),
    }
}

pub fn completion(r: CompletionRequest, limits: &Limits) -> Result<Validated, ApiError> {
    let model = require_model(&r.model)?;
    let prompt = match r.prompt {
        Prompt::One(p) => p,
        Prompt::Many(mut v) if v.len() == 1 => v.remove(0),
        Prompt::Many(v) => {
            return Err(ApiError::unsupported(
                "prompt",
                format!(
                    "`prompt` must be one string (got a list of {}); send one request per prompt",
                    v.len()
                ),
            ));
        }
    };
    if prompt.is_empty() {
        return Err(ApiError::invalid("prompt", "`prompt` must not be empty"));
    }
    if prompt.chars().count() > limits.max_prompt_chars {
        return Err(ApiError::invalid(
            "prompt",
            format!("`prompt` is longer than {} characters", limits.max_prompt_chars),
        ));
    }
    if r.echo == Some(true) {
        return Err(ApiError::unsupported("echo", "`echo` is not supported"));
    }
    if r.suffix.as_deref().is_some_and(|s| !s.is_empty()) {
        return Err(ApiError::unsupported("suffix", "`suffix` is not supported"));
    }
    if r.logprobs.as_ref().is_some_and(|v| !v.is_null()) {
        return Err(ApiError::unsupported("logprobs", "`logprobs` is not supported"));
    }
    if r.best_of.is_some_and(|b| b != 1) {
        return Err(ApiError::unsupported("best_of", "`best_of` must be 1"));
    }
    // The completions API's own default is 16 tokens.
    let params = params(&r.sampling, Some(r.sampling.max_tokens.unwrap_or(16)), limits)?;
    Ok(Validated {
        cache_salt: String::new(),
        adapter: String::new(),
        api: Api::Completions,
        model,
        input: Input::Prompt(prompt),
        params,
        stream: r.sampling.stream,
        include_usage: r
            .sampling
            .stream_options
            .as_ref()
            .is_some_and(|o| o.include_usage),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chat_json(body: &str) -> Result<Validated, ApiError> {
        chat(parse_chat(body.as_bytes())?, &Limits::default())
    }

    #[test]
    fn a_full_request_validates() {
        let v = chat_json(
            r#"{"model": "m", "messages": [{"role": "system", "content": "be brief"},
                {"role": "user", "content": [{"type": "text", "text": "hi"}]}],
                "temperature": 0, "max_completion_tokens": 5, "stop": "x", "seed": 3, "stream": true,
                "stream_options": {"include_usage": true}, "n": 1}"#,
        )
        .unwrap();
        assert_eq!(
            v.input,
            Input::Chat(vec![
                ("system".into(), "be brief".into()),
                ("user".into(), "hi".into())
            ])
        );
        assert_eq!(v.params.max_tokens, Some(5));
        assert_eq!(v.params.stop, ["x"]);
        assert!(v.stream && v.include_usage);
    }

    #[test]
    fn errors_name_the_field_and_status() {
        let cases = [
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}"#,
                400,
                None,
            ),
            (r#"{"messages": []}"#, 422, Some("model")),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}"#,
                422,
                Some("temperature"),
            ),
            (r#"{"model": "m", "messages": []}"#, 400, Some("messages")),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "n": 2}"#,
                400,
                Some("n"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "temperature": 3}"#,
                400,
                Some("temperature"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "tool", "content": "hi"}]}"#,
                400,
                Some("messages[0].role"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_completion_tokens": 0}"#,
                400,
                Some("max_completion_tokens"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}"#,
                400,
                Some("messages[0].content[0]"),
            ),
            (
                r#"{"model": "m", "messages": [{"role": "user", "content": "hi"}], "stop": ["a","b","c","d","e"]}"#,
                400,
                Some("stop"),
            ),
        ];
        for (body, status, param) in cases {
            let e = chat_json(body).expect_err(body);
            assert_eq!(e.status.as_u16(), status, "{body}: {e}");
            assert_eq!(e.param.as_deref(), param, "{body}: {e}");
        }
    }

    #[test]
    fn completions_default_to_16_tokens_and_take_one_prompt() {
        let v = completion(
            parse_completion(br#"{"model": "m", "prompt": ["once"]}"#).unwrap(),
            &Limits::default(),
        )
        .unwrap();
        assert_eq!(v.input, Input::Prompt("once".into()));
        assert_eq!(v.params.max_tokens, Some(16));
        let e = completion(
            parse_completion(br#"{"model": "m", "prompt": ["a", "b"]}"#).unwrap(),
            &Limits::default(),
        )
        .unwrap_err();
        assert_eq!(e.param.as_deref(), Some("prompt"));
    }
}
