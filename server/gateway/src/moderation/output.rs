//! Output moderation while a reply streams: generated text is held back until a window of it is full, the window
//! (with the end of the text already released, so a phrase split across windows is still seen whole) is checked,
//! and only checked text is released to the client.

/// The held-back text of one reply. Synchronous, so the windowing is tested without a provider.
#[derive(Debug)]
pub struct OutputGate {
    window_chars: usize,
    overlap_chars: usize,
    pending: String,
    released_tail: String,
}

impl OutputGate {
    pub fn new(window_chars: usize) -> Self {
        Self {
            window_chars: window_chars.max(1),
            overlap_chars: window_chars / 2,
            pending: String::new(),
            released_tail: String::new(),
        }
    }

    /// Holds `text` back; true when a window is full and should be checked.
    pub fn push(&mut self, text: &str) -> bool {
        self.pending.push_str(text);
        self.pending.chars().count() >= self.window_chars
    }

    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// What to check: the end of the released text and everything held back.
    pub fn to_check(&self) -> String {
        format!("{}{}", self.released_tail, self.pending)
    }

    /// The held-back text, once it passed, for the client.
    pub fn release(&mut self) -> String {
        let out = std::mem::take(&mut self.pending);
        let joined = format!("{}{}", self.released_tail, out);
        let skip = joined.chars().count().saturating_sub(self.overlap_chars);
        self.released_tail = joined.chars().skip(skip).collect();
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_held_until_a_window_fills_and_windows_overlap() {
        let mut gate = OutputGate::new(10);
        assert!(!gate.push("hello "));
        assert!(gate.push("world!"));
        assert_eq!(gate.to_check(), "hello world!");
        assert_eq!(gate.release(), "hello world!");
        assert!(!gate.has_pending());
        assert!(!gate.push("bye"));
        // The last 5 characters released are checked again with the new text.
        assert_eq!(gate.to_check(), "orld!bye");
        assert_eq!(gate.release(), "bye");
        assert_eq!(gate.to_check(), "d!bye");
    }

    #[test]
    fn windows_count_characters_not_bytes() {
        let mut gate = OutputGate::new(4);
        assert!(!gate.push("ñññ"));
        assert!(gate.push("é"));
        assert_eq!(gate.release(), "ñññé");
        assert_eq!(gate.to_check(), "ñé");
    }
}
