//! Turning ShareGPT's scraped HTML answers into markdown, as FastChat's `clean_sharegpt` does: HTML to markdown
//! (with `htmd`), then code blocks repaired where the scrape left the language name and a "Copy code" button
//! label inside the fence.

use std::sync::LazyLock;

use regex::Regex;

/// What [`normalize`] changed in one message, for the data report.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    pub html_converted: bool,
    pub code_blocks_repaired: bool,
}

/// Tags that mark a message as scraped HTML rather than text that happens to contain `<`.
static HTML_TAG: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?i)<(div|p|pre|code|span|ol|ul|li|h[1-6]|table|tr|td|th|br|strong|em|blockquote)\b[^>]*>")
        .ok()
});

/// ```` ```python Copy code print(1)``` ```` → a fence with the language on its own line.
static COPY_CODE: LazyLock<Option<Regex>> = LazyLock::new(|| {
    Regex::new(r"(?s)```[ \t]*\n?[ \t]*([A-Za-z0-9_+#.-]*)[ \t]*(?:Copy code)+(.+?)\s*?```").ok()
});

/// Noise the scrape left: "Copy12 chars / 3 words" counters and "1 / 2" regenerate counters at the start.
static COPY_CHARS: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"Copy\d+ chars / \d+ words").ok());
static REGENERATE: LazyLock<Option<Regex>> = LazyLock::new(|| Regex::new(r"^\d+ / \d+").ok());

/// Markdown for one message; text without HTML tags is left as it is (converting it would escape its `*`/`_`).
pub fn normalize(text: &str) -> (String, Changes) {
    let mut changes = Changes::default();
    let mut out = text.to_string();
    if HTML_TAG.as_ref().is_some_and(|re| re.is_match(&out))
        && let Ok(md) = htmd::convert(&out)
    {
        changes.html_converted = true;
        out = md.trim().to_string();
        if let Some(re) = REGENERATE.as_ref() {
            out = re.replace(&out, "").trim_start().to_string();
        }
        if let Some(re) = COPY_CHARS.as_ref() {
            out = re.replace_all(&out, "").to_string();
        }
    }
    if let Some(re) = COPY_CODE.as_ref()
        && re.is_match(&out)
    {
        changes.code_blocks_repaired = true;
        out = re
            .replace_all(&out, |c: &regex::Captures<'_>| {
                format!(
                    "```{}\n{}\n```",
                    &c[1],
                    c[2].trim_matches(|ch| ch == '\n' || ch == ' ')
                )
            })
            .to_string();
    }
    while out.contains("\n\n\n") {
        out = out.replace("\n\n\n", "\n\n");
    }
    (out, changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scraped_html_becomes_markdown_with_repaired_code_blocks() {
        let html = "<div class=\"markdown prose\"><p>Use <strong>this</strong>:</p><pre><code>python Copy code print(1)\n</code></pre></div>";
        let (md, changes) = normalize(html);
        assert!(changes.html_converted);
        assert!(md.contains("Use **this**:"), "{md}");
        assert!(!md.contains("<p>") && !md.contains("Copy code"), "{md}");
        assert!(md.contains("print(1)"), "{md}");
    }

    #[test]
    fn copy_code_labels_inside_fences_are_removed() {
        let (md, changes) = normalize("Here:\n```pythonCopy code\nprint(1)\n```");
        assert!(changes.code_blocks_repaired && !changes.html_converted);
        assert_eq!(md, "Here:\n```python\nprint(1)\n```");
    }

    #[test]
    fn plain_text_and_markdown_are_left_alone() {
        for text in [
            "a < b and c > d",
            "**bold** and snake_case",
            "```rust\nfn main() {}\n```",
        ] {
            assert_eq!(normalize(text), (text.to_string(), Changes::default()));
        }
    }
}
