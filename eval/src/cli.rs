//! The command line of `camelid eval` (and of the `camelid-eval` binary): `answer`, `judge`, `report` and `gate`,
//! each a thin layer that reads flags, calls the library and says what happened. Both binaries hand their
//! arguments here, so the two spellings cannot drift apart.

use std::path::{Path, PathBuf};

use camelid_contracts::evaluation::GateSettings;

use crate::answer::{self, AnswerSettings, TemperaturePolicy};
use crate::client::{ChatClient, Endpoint, RetryPolicy};
use crate::judge::{self, AnswerSet, JudgeInputs, JudgeOptions, JudgePrompts, Pairing, References};
use crate::questions::{self, Selection};
use crate::report::{self, Bootstrap, Report};
use crate::{CliError, gate};

/// `camelid eval ...`
#[derive(Debug, clap::Args)]
pub struct EvalArgs {
    #[command(subcommand)]
    pub command: EvalCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum EvalCommand {
    /// Answer a question file (FastChat's question.jsonl) with a model behind an OpenAI-compatible endpoint;
    /// writes FastChat's model_answer jsonl, resumes a killed run.
    Answer(AnswerArgs),
    /// Judge answers with a judge model (FastChat's prompts): pairwise in both orders, or single-answer grading;
    /// writes FastChat's model_judgment jsonl, resumes a killed run.
    Judge(JudgeArgs),
    /// Win / tie / loss with bootstrap intervals and mean scores, by category and turn: a table here, and
    /// markdown and a self-contained HTML page on request.
    Report(ReportArgs),
    /// The FineTuneJob promotion gate: answer with the candidate and the baseline, judge them pairwise, report,
    /// and write the summary the operator reads.
    Gate(GateSettings),
}

/// Where a model is served, as flags.
#[derive(Debug, Clone, clap::Args)]
pub struct EndpointArgs {
    /// The OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`.
    #[arg(long)]
    pub base_url: String,
    /// The `model` of each request.
    #[arg(long)]
    pub model: String,
    /// The environment variable holding the API key, e.g. `OPENAI_API_KEY` (unset: no key is sent, so a key
    /// meant for one provider never reaches another's server by default).
    #[arg(long)]
    pub api_key_env: Option<String>,
}

impl EndpointArgs {
    fn endpoint(&self) -> Endpoint {
        endpoint(&self.base_url, &self.model, self.api_key_env.as_deref())
    }
}

#[derive(Debug, clap::Args)]
pub struct AnswerArgs {
    /// The question file (FastChat's question.jsonl).
    #[arg(long)]
    pub questions: PathBuf,
    #[command(flatten)]
    pub endpoint: EndpointArgs,
    /// The name the answers are written under (default: `--model`).
    #[arg(long)]
    pub model_id: Option<String>,
    /// The answer file (default: `model_answer/<model id>.jsonl` next to the question file, as FastChat lays
    /// out `data/<bench>/`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// One temperature for every question; default FastChat's per-category table.
    #[arg(long)]
    pub temperature: Option<f32>,
    #[arg(long, default_value_t = answer::DEFAULT_MAX_TOKENS)]
    pub max_tokens: u32,
    /// Questions in flight at once.
    #[arg(long, default_value_t = answer::DEFAULT_CONCURRENCY)]
    pub concurrency: usize,
    /// A system message before the first turn (default: none, the server's template decides).
    #[arg(long)]
    pub system_prompt: Option<String>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// FastChat's `--question-begin` / `--question-end`: a slice of the file.
    #[arg(long)]
    pub question_begin: Option<usize>,
    #[arg(long)]
    pub question_end: Option<usize>,
    /// Only the first this many (after the slice).
    #[arg(long)]
    pub max_questions: Option<usize>,
    /// Start over when the file was written under other settings (the old one is moved to `.old`).
    #[arg(long)]
    pub force_new: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    /// Each `--model` against `--baseline`, both orders (FastChat's pairwise-baseline).
    PairwiseBaseline,
    /// Every pair of the answer files' models, both orders.
    PairwiseAll,
    /// Each answer graded 1 to 10.
    Single,
}

#[derive(Debug, clap::Args)]
pub struct JudgeArgs {
    #[arg(long)]
    pub questions: PathBuf,
    /// Answer files (FastChat's model_answer/<model>.jsonl; the file name is the model).
    #[arg(long = "answers", required = true, num_args = 1..)]
    pub answers: Vec<PathBuf>,
    #[arg(long, value_enum, default_value = "pairwise-baseline")]
    pub mode: Mode,
    /// The baseline model in `pairwise-baseline` mode.
    #[arg(long)]
    pub baseline: Option<String>,
    /// The judge's OpenAI-compatible base URL.
    #[arg(long)]
    pub judge_url: String,
    #[arg(long)]
    pub judge_model: String,
    /// The environment variable holding the judge's API key, e.g. `OPENAI_API_KEY` (unset: none is sent).
    #[arg(long)]
    pub judge_api_key_env: Option<String>,
    /// Judge prompts in FastChat's judge_prompts.jsonl format (default: FastChat's own, built in).
    #[arg(long)]
    pub judge_prompts: Option<PathBuf>,
    /// Reference answers (FastChat's reference_answer/<judge>.jsonl); default: the questions' `reference`.
    #[arg(long)]
    pub reference_answers: Option<PathBuf>,
    #[arg(long, default_value_t = 2048)]
    pub max_tokens: u32,
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// The judgment file (default: `model_judgment/<judge>_pair.jsonl` or `_single.jsonl` next to the question
    /// file).
    #[arg(long)]
    pub out: Option<PathBuf>,
    #[arg(long)]
    pub force_new: bool,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The question file, for categories.
    #[arg(long)]
    pub questions: PathBuf,
    /// Judgment files, ours or FastChat's (pairwise and single may be mixed).
    #[arg(long = "judgments", required = true, num_args = 1..)]
    pub judgments: Vec<PathBuf>,
    /// See every pairing from this model's side.
    #[arg(long)]
    pub model: Option<String>,
    #[arg(long)]
    pub markdown: Option<PathBuf>,
    #[arg(long)]
    pub html: Option<PathBuf>,
    /// Bootstrap rounds for the win-rate intervals.
    #[arg(long, default_value_t = 1000)]
    pub bootstrap: u32,
    #[arg(long, default_value_t = report::stats::DEFAULT_SEED)]
    pub seed: u64,
}

/// Runs one `camelid eval` command to completion.
pub fn run(args: EvalArgs) -> Result<(), CliError> {
    let runtime = tokio::runtime::Runtime::new().map_err(CliError::Runtime)?;
    runtime.block_on(async {
        match args.command {
            EvalCommand::Answer(a) => run_answer(&a).await,
            EvalCommand::Judge(j) => run_judge(&j).await,
            EvalCommand::Report(r) => run_report(&r),
            EvalCommand::Gate(g) => gate::run_and_record(&g).await.map(|_| ()),
        }
    })
}

/// An endpoint whose key, if any, is in the environment variable `key_env`.
pub fn endpoint(base_url: &str, model: &str, key_env: Option<&str>) -> Endpoint {
    Endpoint {
        base_url: base_url.to_string(),
        model: model.to_string(),
        api_key: key_env
            .and_then(|v| std::env::var(v).ok())
            .filter(|k| !k.is_empty()),
    }
}

/// Whether to draw progress bars: only for a person watching.
pub fn progress() -> bool {
    use std::io::IsTerminal;
    std::io::stderr().is_terminal()
}

async fn run_answer(a: &AnswerArgs) -> Result<(), CliError> {
    let file = questions::read(&a.questions)?;
    let selection = Selection {
        begin: a.question_begin,
        end: a.question_end,
        max_questions: a.max_questions,
    };
    let selected = file.select(&selection)?;
    let mut settings = AnswerSettings::new(a.endpoint.endpoint(), &file, selection);
    settings.model_id = a.model_id.clone();
    settings.temperature = a
        .temperature
        .map_or(TemperaturePolicy::ByCategory, TemperaturePolicy::Fixed);
    settings.max_tokens = a.max_tokens;
    settings.concurrency = a.concurrency;
    settings.system_prompt = a.system_prompt.clone();
    settings.seed = Some(a.seed);
    settings.force_new = a.force_new;
    let out = a.out.clone().unwrap_or_else(|| {
        beside(
            &a.questions,
            "model_answer",
            &format!("{}.jsonl", file_safe(settings.model_id())),
        )
    });
    let stats = answer::answer(&settings, &selected, &out, progress()).await?;
    eprintln!(
        "{}: {} answered now, {} already there, in {:.1} s",
        out.display(),
        stats.answered,
        stats.resumed,
        stats.elapsed.as_secs_f64()
    );
    Ok(())
}

async fn run_judge(j: &JudgeArgs) -> Result<(), CliError> {
    let file = questions::read(&j.questions)?;
    let answers = AnswerSet::load_files(&j.answers)?;
    let references = j.reference_answers.as_deref().map(References::load).transpose()?;
    let inputs = JudgeInputs {
        questions: &file.questions,
        answers: &answers,
        references: references.as_ref(),
    };
    let kind = if j.mode == Mode::Single { "single" } else { "pair" };
    let out = j.out.clone().unwrap_or_else(|| {
        beside(
            &j.questions,
            "model_judgment",
            &format!("{}_{kind}.jsonl", file_safe(&j.judge_model)),
        )
    });
    let mut options = JudgeOptions::new(&j.judge_model, out.clone())?;
    if let Some(path) = &j.judge_prompts {
        options.prompts = JudgePrompts::from_file(path)?;
    }
    options.max_tokens = j.max_tokens;
    options.concurrency = j.concurrency.max(1);
    options.progress = progress();
    options.force_new = j.force_new;
    let client = ChatClient::new(
        endpoint(&j.judge_url, &j.judge_model, j.judge_api_key_env.as_deref()),
        RetryPolicy::default(),
    )?;
    let models: Vec<String> = answers.models().map(str::to_string).collect();
    let stats = match j.mode {
        Mode::Single => judge::judge_single(&client, &inputs, &models, &options).await?,
        Mode::PairwiseAll => judge::judge_pairwise(&client, &inputs, &Pairing::All(models), &options).await?,
        Mode::PairwiseBaseline => {
            let baseline = j.baseline.clone().ok_or(CliError::Usage(
                "--mode pairwise-baseline needs --baseline (one of the answer files' models)".into(),
            ))?;
            judge::judge_pairwise(
                &client,
                &inputs,
                &Pairing::Baseline { models, baseline },
                &options,
            )
            .await?
        }
    };
    eprintln!(
        "{}: {} judged now, {} already there, {} verdicts unparseable, {} matches missing an answer, {} judged \
         without a reference for want of one",
        out.display(),
        stats.judged,
        stats.skipped,
        stats.verdict_errors,
        stats.missing_answers.len(),
        stats.reference_fallbacks.len()
    );
    Ok(())
}

fn run_report(r: &ReportArgs) -> Result<(), CliError> {
    let judgments = report::read_judgments(&r.judgments)?;
    let categories = report::read_categories(&r.questions)?;
    let bootstrap = Bootstrap {
        rounds: r.bootstrap,
        seed: r.seed,
        ..Bootstrap::default()
    };
    let mut built = Report::new(&judgments, &categories, &bootstrap);
    if let Some(model) = &r.model {
        built = built.oriented_for(model);
    }
    print!("{}", built.text());
    write(r.markdown.as_deref(), &built.markdown())?;
    write(r.html.as_deref(), &built.html())?;
    Ok(())
}

/// Writes `text` to `path` when one is given.
pub(crate) fn write(path: Option<&Path>, text: &str) -> Result<(), CliError> {
    let Some(path) = path else { return Ok(()) };
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).map_err(|e| CliError::Write {
            path: path.to_path_buf(),
            source: e,
        })?;
    }
    std::fs::write(path, text).map_err(|e| CliError::Write {
        path: path.to_path_buf(),
        source: e,
    })
}

/// `<question file's folder>/<dir>/<name>`: FastChat's `data/<bench>/` layout.
fn beside(questions: &Path, dir: &str, name: &str) -> PathBuf {
    questions.parent().unwrap_or(Path::new(".")).join(dir).join(name)
}

/// A model name as a file name: FastChat names files by model, and names like `meta-llama/Llama-3` hold a `/`.
pub fn file_safe(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}
