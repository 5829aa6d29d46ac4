//! Streaming text out of token ids: never emit half a UTF-8 character, and never emit text that may turn out to
//! be the start of a stop string.

use crate::error::Result;
use crate::generate::FinishReason;

/// Incremental detokenizer: decodes a small window of recent ids so that byte-level tokens which end inside a
/// multi-byte character are held until the character is complete (the prefix/read offset scheme of TGI).
#[derive(Debug, Default)]
pub struct IncrementalDecoder {
    ids: Vec<u32>,
    prefix_offset: usize,
    read_offset: usize,
}

impl IncrementalDecoder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one id and returns the text it completes, if any.
    pub fn push(&mut self, id: u32, decode: impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        self.ids.push(id);
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        if full.len() > prefix.len()
            && !full.ends_with('\u{FFFD}')
            && let Some(new) = full.get(prefix.len()..).filter(|_| full.starts_with(&prefix))
        {
            self.prefix_offset = self.read_offset;
            self.read_offset = self.ids.len();
            return Ok(new.to_string());
        }
        Ok(String::new())
    }

    /// Whatever is still held at the end of generation (an incomplete character decodes as U+FFFD).
    pub fn flush(&mut self, decode: impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        let prefix = decode(&self.ids[self.prefix_offset..self.read_offset])?;
        let full = decode(&self.ids[self.prefix_offset..])?;
        self.prefix_offset = self.ids.len();
        self.read_offset = self.ids.len();
        Ok(full
            .get(prefix.len()..)
            .filter(|_| full.starts_with(&prefix))
            .unwrap_or_default()
            .to_string())
    }
}

/// Finds stop strings in streamed text, holding back any tail that could still grow into one.
#[derive(Debug, Default)]
pub struct StopMatcher {
    stops: Vec<String>,
    pending: String,
}

impl StopMatcher {
    pub fn new(stops: &[String]) -> Self {
        Self {
            stops: stops.iter().filter(|s| !s.is_empty()).cloned().collect(),
            pending: String::new(),
        }
    }

    /// Adds text; returns the text that is safe to emit and whether a stop string was found (the stop string and
    /// anything after it are dropped).
    pub fn push(&mut self, text: &str) -> (String, bool) {
        self.pending.push_str(text);
        let earliest = self
            .stops
            .iter()
            .filter_map(|s| self.pending.find(s.as_str()))
            .min();
        if let Some(pos) = earliest {
            let out = self.pending[..pos].to_string();
            self.pending.clear();
            return (out, true);
        }
        let hold = self
            .pending
            .char_indices()
            .map(|(i, _)| i)
            .find(|&i| self.stops.iter().any(|s| s.starts_with(&self.pending[i..])))
            .unwrap_or(self.pending.len());
        let out = self.pending[..hold].to_string();
        self.pending.drain(..hold);
        (out, false)
    }

    /// The held-back text, once no more text will come.
    pub fn flush(&mut self) -> String {
        std::mem::take(&mut self.pending)
    }
}

/// What one sampled token produced.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Pushed {
    /// Text that became final (may be empty).
    pub text: String,
    /// Set when this token ended the sequence.
    pub finished: Option<FinishReason>,
}

/// Turns one sequence's sampled tokens into streamed text and decides when it ends: on an EOS id, a stop string or
/// `max_new` tokens. Shared by `generate` and the serving worker, so both give the same text.
#[derive(Debug)]
pub struct TokenTextStream {
    detok: IncrementalDecoder,
    stops: StopMatcher,
    eos: Vec<u32>,
    max_new: usize,
    generated: Vec<u32>,
}

impl TokenTextStream {
    pub fn new(stop: &[String], eos: Vec<u32>, max_new: usize) -> Self {
        Self {
            detok: IncrementalDecoder::new(),
            stops: StopMatcher::new(stop),
            eos,
            max_new,
            generated: Vec::new(),
        }
    }

    /// Tokens generated so far (EOS is not included).
    pub fn generated(&self) -> &[u32] {
        &self.generated
    }

    /// Adds a sampled token.
    pub fn push(&mut self, token: u32, decode: impl Fn(&[u32]) -> Result<String>) -> Result<Pushed> {
        if self.eos.contains(&token) {
            return Ok(Pushed {
                text: self.tail(decode)?,
                finished: Some(FinishReason::Stop),
            });
        }
        self.generated.push(token);
        let piece = self.detok.push(token, &decode)?;
        let (mut text, stopped) = self.stops.push(&piece);
        if stopped {
            return Ok(Pushed {
                text,
                finished: Some(FinishReason::Stop),
            });
        }
        let finished = (self.generated.len() >= self.max_new).then_some(FinishReason::Length);
        if finished.is_some() {
            text.push_str(&self.tail(decode)?);
        }
        Ok(Pushed { text, finished })
    }

    /// Pushes tokens whose text was already delivered (a generation continued from another worker's tokens),
    /// so that stop strings, penalties and `max_new` count them. Returns how the generation ended if the last of
    /// them ended it (the caller then only reports the end); an error if an earlier one did, since a real
    /// generation never goes on after its end.
    pub fn replay(
        &mut self,
        tokens: &[u32],
        decode: impl Fn(&[u32]) -> Result<String>,
    ) -> Result<Option<FinishReason>> {
        for (i, &token) in tokens.iter().enumerate() {
            if let Some(reason) = self.push(token, &decode)?.finished {
                if i + 1 == tokens.len() {
                    return Ok(Some(reason));
                }
                return Err(crate::ModelError::InvalidRequest(format!(
                    "the generation ended at token {i} of the {} to continue from",
                    tokens.len()
                )));
            }
        }
        Ok(None)
    }

    /// What the detokenizer and the stop matcher still hold once the sequence ends.
    fn tail(&mut self, decode: impl Fn(&[u32]) -> Result<String>) -> Result<String> {
        let tail = self.detok.flush(decode)?;
        let (safe, stopped) = self.stops.push(&tail);
        Ok(if stopped { safe } else { safe + &self.stops.flush() })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A toy byte-level vocabulary: id = byte value; decoding invalid UTF-8 gives U+FFFD like HF's ByteLevel.
    fn decode(ids: &[u32]) -> Result<String> {
        let bytes: Vec<u8> = ids.iter().map(|&i| i as u8).collect();
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    #[test]
    fn multibyte_characters_are_never_split() {
        let text = "aé🦙z";
        let mut dec = IncrementalDecoder::new();
        let mut pieces = Vec::new();
        for b in text.bytes() {
            let piece = dec.push(u32::from(b), decode).unwrap();
            assert!(
                !piece.contains('\u{FFFD}'),
                "emitted a broken character: {piece:?}"
            );
            if !piece.is_empty() {
                pieces.push(piece);
            }
        }
        assert_eq!(pieces, ["a", "é", "🦙", "z"]);
        assert_eq!(dec.flush(decode).unwrap(), "");
    }

    #[test]
    fn stop_strings_spanning_pushes_are_found_and_cut() {
        let mut m = StopMatcher::new(&["</s>".into(), "User:".into()]);
        assert_eq!(m.push("Hello <"), ("Hello ".into(), false));
        assert_eq!(m.push("/"), (String::new(), false));
        assert_eq!(m.push("s> more"), (String::new(), true));
    }

    #[test]
    fn held_text_is_released_when_it_cannot_be_a_stop() {
        let mut m = StopMatcher::new(&["STOP".into()]);
        assert_eq!(m.push("ST"), (String::new(), false));
        assert_eq!(m.push("ART"), ("START".into(), false));
        assert_eq!(m.push("S"), (String::new(), false));
        assert_eq!(m.flush(), "S");
    }

    #[test]
    fn earliest_stop_wins() {
        let mut m = StopMatcher::new(&["b".into(), "a".into()]);
        assert_eq!(m.push("xxaxb"), ("xx".into(), true));
    }

    /// Streams `ids` through a fresh stream: the text of each chunk (with the ids it carries), and the end.
    fn chunks(
        ids: &[u32],
        stop: &[String],
        max_new: usize,
    ) -> (Vec<(String, Vec<u32>)>, Option<FinishReason>) {
        let mut stream = TokenTextStream::new(stop, vec![0], max_new);
        let (mut out, mut unsent) = (Vec::new(), Vec::new());
        for &id in ids {
            let pushed = stream.push(id, decode).unwrap();
            unsent.push(id);
            if !pushed.text.is_empty() {
                out.push((pushed.text, std::mem::take(&mut unsent)));
            }
            if pushed.finished.is_some() {
                return (out, pushed.finished);
            }
        }
        (out, None)
    }

    #[test]
    fn a_stream_continued_after_any_chunk_sends_exactly_the_rest() {
        // Multi-byte characters and a stop string that spans chunks, so text is held back at chunk boundaries.
        let text = "héllo 🦙 wor END tail";
        let ids: Vec<u32> = text.bytes().map(u32::from).collect();
        let stop = vec!["END".to_string()];
        let (whole, end) = chunks(&ids, &stop, 100);
        assert_eq!(end, Some(FinishReason::Stop));
        let expected: String = whole.iter().map(|(t, _)| t.as_str()).collect();
        assert_eq!(expected, "héllo 🦙 wor ");
        for sent in 0..=whole.len() {
            // What a caller received from the first stream: `sent` chunks and their ids.
            let received: Vec<u32> = whole[..sent].iter().flat_map(|(_, ids)| ids.clone()).collect();
            let mut second = TokenTextStream::new(&stop, vec![0], 100);
            let replayed = second.replay(&received, decode).unwrap();
            let mut text: String = whole[..sent].iter().map(|(t, _)| t.as_str()).collect();
            if replayed.is_none() {
                for &id in &ids[received.len()..] {
                    let pushed = second.push(id, decode).unwrap();
                    text.push_str(&pushed.text);
                    if pushed.finished.is_some() {
                        break;
                    }
                }
            }
            assert_eq!(text, expected, "continued after {sent} chunks");
        }
    }

    #[test]
    fn a_continuation_past_the_end_is_refused() {
        let mut stream = TokenTextStream::new(&[], vec![0], 3);
        assert_eq!(
            stream.replay(&[65, 66, 67], decode).unwrap(),
            Some(FinishReason::Length)
        );
        let mut stream = TokenTextStream::new(&[], vec![0], 3);
        assert!(stream.replay(&[65, 0, 67], decode).is_err(), "tokens after EOS");
        let mut stream = TokenTextStream::new(&[], vec![0], 3);
        assert!(
            stream.replay(&[65, 66, 67, 68], decode).is_err(),
            "more than max_new"
        );
    }
}
