//! Output moderation while a reply streams: generated text is held back until a window of it is full, the window
//! is checked, and only checked text is released to the client, less a held-back tail that is checked again with
//! the text after it. A pattern no longer than the tail (half a window) that spans two windows is therefore seen
//! whole before any of it is released.

/// The held-back text of one reply. Synchronous, so the windowing is tested without a provider.
#[derive(Debug)]
pub struct OutputGate {
    window_chars: usize,
    hold_chars: usize,
    pending: String,
}

impl OutputGate {
    pub fn new(window_chars: usize) -> Self {
        Self {
            window_chars: window_chars.max(2),
            hold_chars: window_chars.max(2) / 2,
            pending: String::new(),
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

    /// What to check: everything held back.
    pub fn to_check(&self) -> &str {
        &self.pending
    }

    /// The checked text for the client: all of it at the end of the reply, otherwise all but the tail.
    pub fn release(&mut self, finished: bool) -> String {
        if finished {
            return std::mem::take(&mut self.pending);
        }
        let n = self.pending.chars().count();
        let split = self
            .pending
            .char_indices()
            .nth(n.saturating_sub(self.hold_chars))
            .map_or(self.pending.len(), |(i, _)| i);
        let tail = self.pending.split_off(split);
        std::mem::replace(&mut self.pending, tail)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_held_until_a_window_fills_and_the_tail_is_checked_again() {
        let mut gate = OutputGate::new(10);
        assert!(!gate.push("hello "));
        assert!(gate.push("world!"));
        assert_eq!(gate.to_check(), "hello world!");
        assert_eq!(gate.release(false), "hello w");
        // The last 5 characters stay held and are checked again with the next text.
        assert!(!gate.push("bye"));
        assert_eq!(gate.to_check(), "orld!bye");
        assert_eq!(gate.release(true), "orld!bye");
        assert!(!gate.has_pending());
    }

    #[test]
    fn a_word_across_two_windows_is_checked_whole_before_any_of_it_is_released() {
        let text: Vec<char> = "the capital is Paris, of course".chars().collect();
        let mut gate = OutputGate::new(10);
        let mut released = String::new();
        for piece in text.chunks(3) {
            if gate.push(&piece.iter().collect::<String>()) {
                if gate.to_check().contains("Paris") {
                    break;
                }
                released.push_str(&gate.release(false));
            }
        }
        assert!(gate.to_check().contains("Paris"), "the word was seen");
        assert!(!released.contains('P'), "part of it was released: {released:?}");
    }

    #[test]
    fn windows_count_characters_not_bytes() {
        let mut gate = OutputGate::new(4);
        assert!(!gate.push("ñññ"));
        assert!(gate.push("é"));
        assert_eq!(gate.release(false), "ññ");
        assert_eq!(gate.to_check(), "ñé");
    }
}
