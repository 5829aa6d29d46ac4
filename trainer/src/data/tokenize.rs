//! Turning cleaned conversations into training samples: rendered with the model's chat template, tokenized,
//! split at exchange boundaries to fit the sequence length (counted in real tokens of that template), with labels
//! only on the assistant's words.
//!
//! FastChat's splitter loses the last segment of a long conversation and its tokenizer check silently masks whole
//! samples; here every segment is kept, an exchange too long on its own is truncated and counted, and a segment
//! left with nothing to learn is dropped and counted.

use camelid_model::{ChatMessage, LoadedModel, ModelError};
use serde::Serialize;

use crate::data::Conversation;

/// One training sequence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// The conversation id, with `#segment` when the conversation was split.
    pub id: String,
    pub ids: Vec<u32>,
    /// For each token, whether the model learns to produce it.
    pub labels: Vec<bool>,
}

impl Sample {
    /// Tokens that carry the loss (a label on the first token has nothing to predict it from).
    pub fn trainable_tokens(&self) -> usize {
        self.labels.iter().skip(1).filter(|&&l| l).count()
    }
}

/// What tokenization did to the data, for the data report.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct TokenReport {
    pub seq_len: usize,
    pub template: String,
    pub samples: usize,
    /// Conversations longer than `seq_len`, cut at exchange boundaries.
    pub split_conversations: usize,
    /// Samples that came from split conversations.
    pub segments_from_splits: usize,
    /// Single exchanges longer than `seq_len`, truncated to it.
    pub truncated_exchanges: usize,
    /// Segments with no assistant token left to learn (e.g. a user turn that fills the whole length); dropped.
    pub dropped_no_trainable_tokens: usize,
    pub total_tokens: usize,
    pub trainable_tokens: usize,
    /// The first few truncated or dropped sample ids, so a user can look them up.
    pub examples: Vec<String>,
}

const MAX_EXAMPLES: usize = 10;

/// A conversation as its system message and its exchanges (a user turn and the reply, if any).
fn exchanges(messages: &[ChatMessage]) -> (Option<&ChatMessage>, Vec<&[ChatMessage]>) {
    let (system, turns) = match messages.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first), rest),
        _ => (None, messages),
    };
    (system, turns.chunks(2).collect())
}

fn render(
    model: &LoadedModel,
    system: Option<&ChatMessage>,
    exchanges: &[&[ChatMessage]],
) -> Result<camelid_model::TrainingTokens, ModelError> {
    let messages: Vec<ChatMessage> = system
        .into_iter()
        .chain(exchanges.iter().flat_map(|e| e.iter()))
        .cloned()
        .collect();
    model.training_tokens(&messages)
}

/// Tokenizes, splits and labels `conversations` for sequences of at most `seq_len` tokens.
///
/// A split keeps the system message in front of every segment and packs as many whole exchanges as fit; the
/// last segment is kept however short it is.
pub fn tokenize(
    conversations: &[Conversation],
    model: &LoadedModel,
    seq_len: usize,
) -> Result<(Vec<Sample>, TokenReport), ModelError> {
    let mut report = TokenReport {
        seq_len,
        template: model.template.name().to_string(),
        ..TokenReport::default()
    };
    let mut samples = Vec::with_capacity(conversations.len());
    for conv in conversations {
        let whole = model.training_tokens(&conv.messages)?;
        let mut segments = Vec::new();
        if whole.ids.len() <= seq_len {
            segments.push((conv.id.clone(), whole));
        } else {
            report.split_conversations += 1;
            let (system, parts) = exchanges(&conv.messages);
            let mut start = 0;
            while start < parts.len() {
                let mut end = start + 1;
                let mut tokens = render(model, system, &parts[start..end])?;
                let id = format!("{}#{}", conv.id, segments.len());
                if tokens.ids.len() > seq_len {
                    tokens.ids.truncate(seq_len);
                    tokens.labels.truncate(seq_len);
                    report.truncated_exchanges += 1;
                    if report.examples.len() < MAX_EXAMPLES {
                        report
                            .examples
                            .push(format!("{id} (line {}): truncated", conv.line));
                    }
                } else {
                    while end < parts.len() {
                        let longer = render(model, system, &parts[start..end + 1])?;
                        if longer.ids.len() > seq_len {
                            break;
                        }
                        tokens = longer;
                        end += 1;
                    }
                }
                segments.push((id, tokens));
                start = end;
            }
            report.segments_from_splits += segments.len();
        }
        for (id, tokens) in segments {
            let sample = Sample {
                id,
                ids: tokens.ids,
                labels: tokens.labels,
            };
            if sample.trainable_tokens() == 0 {
                report.dropped_no_trainable_tokens += 1;
                if report.examples.len() < MAX_EXAMPLES {
                    report.examples.push(format!(
                        "{} (line {}): nothing left to learn",
                        sample.id, conv.line
                    ));
                }
                continue;
            }
            report.total_tokens += sample.ids.len();
            report.trainable_tokens += sample.trainable_tokens();
            samples.push(sample);
        }
    }
    report.samples = samples.len();
    Ok((samples, report))
}
