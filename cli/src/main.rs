//! `camelid`: the local command line. Thin: argument parsing and printing; everything else is in the crates.

use std::io::{BufRead, Write};
use std::process::ExitCode;

use anyhow::Context;
use camelid_model::{ChatMessage, Completion, GenerateRequest, LoadedModel, ModelError, SamplingParams};
use camelid_worker::ModelArgs;
use clap::{Args, Parser, Subcommand};

mod quantize;
mod serve;

#[derive(Parser)]
#[command(
    name = "camelid",
    version,
    about = "Fine-tune and serve LLaMA-family chat models"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    #[command(flatten)]
    telemetry: camelid_telemetry::TelemetryArgs,
}

#[derive(Subcommand)]
enum Command {
    /// Answer one message with the model's chat template; prints only the completion on stdout.
    Generate {
        /// The user message.
        #[arg(long)]
        prompt: String,
        /// A system message (the template's default when absent).
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Serve the OpenAI API locally: a worker and the gateway in one process (Ctrl-C stops).
    Serve(serve::ServeArgs),
    /// Interactive chat in the terminal: streams tokens and keeps the conversation (`/reset`, `/exit`).
    Chat {
        #[arg(long)]
        system: Option<String>,
        #[command(flatten)]
        model: ModelArgs,
        #[command(flatten)]
        sampling: SamplingArgs,
    },
    /// Judge-model evaluation against OpenAI-compatible endpoints (FastChat's llm_judge): answer, judge, report,
    /// and the FineTuneJob promotion gate.
    Eval(camelid_eval::cli::EvalArgs),
    /// Write a model (an HF directory or a GGUF file) as a GGUF file of quantized blocks that camelid and
    /// llama.cpp run.
    Quantize(quantize::QuantizeArgs),
}

#[derive(Args)]
struct SamplingArgs {
    /// Most tokens to generate.
    #[arg(long, default_value_t = 256)]
    max_tokens: usize,
    /// 0 is greedy.
    #[arg(long, default_value_t = 0.7, allow_negative_numbers = true)]
    temperature: f64,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    top_p: f64,
    /// 0 disables top-k.
    #[arg(long, default_value_t = 0)]
    top_k: usize,
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    repetition_penalty: f64,
    #[arg(long)]
    seed: Option<u64>,
    /// Stop when this text is generated (repeatable).
    #[arg(long)]
    stop: Vec<String>,
    /// Keep generating past end-of-turn tokens until --max-tokens (for benchmarks).
    #[arg(long)]
    ignore_eos: bool,
}

impl SamplingArgs {
    /// Checks every value before the model is loaded, naming the flag.
    fn validate(&self) -> Result<(), Failure> {
        if self.max_tokens == 0 {
            return Err(user_error(anyhow::anyhow!("--max-tokens must be at least 1")));
        }
        self.params().validate()?;
        Ok(())
    }

    fn params(&self) -> SamplingParams {
        SamplingParams {
            temperature: self.temperature,
            top_p: self.top_p,
            top_k: self.top_k,
            repetition_penalty: self.repetition_penalty,
            seed: self.seed,
            ..SamplingParams::default()
        }
    }
}

/// A failed command: the message and the exit code (2 for what the user can fix, 1 for everything else).
struct Failure {
    error: anyhow::Error,
    code: u8,
}

fn user_error(error: anyhow::Error) -> Failure {
    Failure { error, code: 2 }
}

impl From<ModelError> for Failure {
    fn from(e: ModelError) -> Self {
        let code = if e.is_user_error() { 2 } else { 1 };
        Failure {
            error: e.into(),
            code,
        }
    }
}

fn load(args: &ModelArgs) -> Result<LoadedModel, Failure> {
    args.load().map_err(|e| Failure {
        code: if e.is_user_error() { 2 } else { 1 },
        error: e.into(),
    })
}

fn messages(system: &Option<String>, turns: &[ChatMessage]) -> Vec<ChatMessage> {
    system
        .iter()
        .map(|s| ChatMessage::new("system", s))
        .chain(turns.iter().cloned())
        .collect()
}

fn request(loaded: &LoadedModel, prompt_ids: Vec<u32>, sampling: &SamplingArgs) -> GenerateRequest {
    GenerateRequest {
        prompt_ids,
        max_tokens: sampling.max_tokens,
        sampling: sampling.params(),
        stop: sampling.stop.clone(),
        eos_token_ids: if sampling.ignore_eos {
            vec![]
        } else {
            loaded.eos_token_ids.clone()
        },
    }
}

/// Generates a reply, printing each piece on stdout as soon as it is final; a closed stdout cancels generation.
fn stream_reply(
    loaded: &LoadedModel,
    prompt_ids: Vec<u32>,
    sampling: &SamplingArgs,
) -> Result<Completion, ModelError> {
    let mut stdout = std::io::stdout().lock();
    let request = request(loaded, prompt_ids, sampling);
    let completion = camelid_model::generate(&loaded.model, &loaded.tokenizer, &request, |piece| {
        stdout
            .write_all(piece.as_bytes())
            .and_then(|_| stdout.flush())
            .is_ok()
    })?;
    let _ = writeln!(stdout);
    Ok(completion)
}

fn run_generate(
    prompt: &str,
    system: &Option<String>,
    model: &ModelArgs,
    sampling: &SamplingArgs,
) -> Result<(), Failure> {
    sampling.validate()?;
    let loaded = load(model)?;
    let prompt_ids = loaded
        .chat_prompt(&messages(system, &[ChatMessage::new("user", prompt)]))
        .map_err(Failure::from)?;
    let completion = stream_reply(&loaded, prompt_ids, sampling)?;
    tracing::info!(
        prompt_tokens = completion.prompt_tokens,
        completion_tokens = completion.token_ids.len(),
        finish_reason = completion.finish_reason.as_str(),
        prefill_seconds = format!("{:.3}", completion.prefill_time.as_secs_f64()),
        decode_tokens_per_second = format!("{:.2}", completion.decode_tokens_per_second()),
        "done"
    );
    Ok(())
}

fn run_chat(system: &Option<String>, model: &ModelArgs, sampling: &SamplingArgs) -> Result<(), Failure> {
    sampling.validate()?;
    let loaded = load(model)?;
    eprintln!(
        "camelid chat: {} ({}); /reset clears the conversation, /exit or Ctrl-D quits",
        loaded.source.display(),
        loaded.template.name()
    );
    let mut turns: Vec<ChatMessage> = Vec::new();
    let stdin = std::io::stdin();
    let mut lines = stdin.lock().lines();
    loop {
        eprint!("> ");
        let Some(line) = lines.next() else { break };
        let line = line.context("reading stdin").map_err(user_error)?;
        let line = line.trim();
        match line {
            "" => continue,
            "/exit" | "/quit" => break,
            "/reset" => {
                turns.clear();
                eprintln!("(conversation cleared)");
                continue;
            }
            _ => {}
        }
        turns.push(ChatMessage::new("user", line));
        let context = loaded.config().max_position_embeddings;
        // Forget the oldest exchanges when the conversation no longer fits with room for a reply.
        let prompt_ids = loop {
            let ids = loaded
                .chat_prompt(&messages(system, &turns))
                .map_err(Failure::from)?;
            if ids.len() + sampling.max_tokens.min(context / 2) <= context || turns.len() <= 1 {
                break ids;
            }
            turns.drain(..2.min(turns.len() - 1));
            eprintln!("(dropped the oldest exchange to fit the {context}-token context)");
        };
        match stream_reply(&loaded, prompt_ids, sampling) {
            Ok(done) => turns.push(ChatMessage::new("assistant", &done.text)),
            Err(e) => {
                eprintln!("error: {e}");
                turns.pop();
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let _telemetry = camelid_telemetry::init("camelid", &cli.telemetry);
    let result = match cli.command {
        Command::Generate {
            prompt,
            system,
            model,
            sampling,
        } => run_generate(&prompt, &system, &model, &sampling),
        Command::Chat {
            system,
            model,
            sampling,
        } => run_chat(&system, &model, &sampling),
        Command::Serve(args) => serve::run(&args).map_err(|(error, code)| Failure { error, code }),
        Command::Quantize(args) => quantize::run(&args),
        Command::Eval(args) => camelid_eval::cli::run(args).map_err(|e| Failure {
            code: e.exit_code(),
            error: e.into(),
        }),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { error, code }) => {
            eprintln!("error: {error:#}");
            ExitCode::from(code)
        }
    }
}
