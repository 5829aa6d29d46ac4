//! Turning ShareGPT's scraped HTML answers into markdown, as FastChat's `clean_sharegpt` does: HTML to markdown
//! (with `htmd`), then code blocks repaired where the scrape left the language name and a "Copy code" button
//! label inside the fence.
//!
//! The HTML comes from the dataset, so it is hostile input: `htmd` converts the parsed tree recursively (a few
//! KiB of stack per level) and `html5ever` parses deeply nested elements in quadratic time. A message whose
//! elements nest deeper than [`MAX_HTML_DEPTH`] is therefore refused with [`MarkdownError::TooDeep`] (the cleaner
//! drops its conversation and counts it) instead of overflowing the stack: a cheap scan of the tags refuses the
//! obvious cases before parsing, and the parsed tree's real depth is checked, without recursion, before converting.

use std::rc::Rc;
use std::sync::LazyLock;

use regex::Regex;

/// The deepest node (element or text, below the document, counting the `html` and `body` the parser adds) that
/// is converted. Scraped chat answers nest a few dozen levels at most; at this depth `htmd`'s recursion needs well
/// under 1 MiB of stack even in a debug build (2 MiB is the smallest stack the trainer's code runs on: a test thread).
pub const MAX_HTML_DEPTH: usize = 128;

/// How deep the tag scan before parsing may estimate the nesting: looser than [`MAX_HTML_DEPTH`] because the scan
/// only approximates the parser's rules (it may count an unclosed tag the parser closes), tight enough that
/// parsing what passes stays fast.
const MAX_SCANNED_DEPTH: usize = 4 * MAX_HTML_DEPTH;

/// A message that cannot be converted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MarkdownError {
    /// Elements nest deeper than [`MAX_HTML_DEPTH`]: no scraped answer does, a crafted one may to exhaust the stack.
    #[error("its HTML nests elements more than {limit} deep ({found} levels counted)")]
    TooDeep { limit: usize, found: usize },
}

impl MarkdownError {
    /// A short, stable name for reports.
    pub fn category(&self) -> &'static str {
        match self {
            MarkdownError::TooDeep { .. } => "html_too_deep",
        }
    }
}

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
/// Never panics or recurses on hostile input; HTML nested too deeply to convert safely is an error.
pub fn normalize(text: &str) -> Result<(String, Changes), MarkdownError> {
    let mut changes = Changes::default();
    let mut out = text.to_string();
    if HTML_TAG.as_ref().is_some_and(|re| re.is_match(&out))
        && let Some(md) = html_to_markdown(&out)?
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
    Ok((out, changes))
}

/// `htmd`'s conversion, guarded by the depth checks (see the module doc); `None` when `htmd` fails (the text is
/// then kept as it is, as before).
fn html_to_markdown(html: &str) -> Result<Option<String>, MarkdownError> {
    let too_deep = |found| MarkdownError::TooDeep {
        limit: MAX_HTML_DEPTH,
        found,
    };
    let scanned = scanned_depth(html, MAX_SCANNED_DEPTH);
    if scanned > MAX_SCANNED_DEPTH {
        return Err(too_deep(scanned));
    }
    let converter = htmd::HtmlToMarkdown::new();
    let Ok(tree) = converter.html_to_tree(html) else {
        return Ok(None);
    };
    let depth = tree_depth(&tree);
    if depth > MAX_HTML_DEPTH {
        return Err(too_deep(depth));
    }
    Ok(Some(converter.tree_to_markdown(&tree)))
}

/// The depth of the deepest node below `root` (its children are at depth 1), walked with an explicit stack.
fn tree_depth(root: &Rc<htmd::Node>) -> usize {
    let mut deepest = 0;
    let mut stack = vec![(Rc::clone(root), 0usize)];
    while let Some((node, depth)) = stack.pop() {
        deepest = deepest.max(depth);
        for child in node.children.borrow().iter() {
            stack.push((Rc::clone(child), depth + 1));
        }
    }
    deepest
}

/// Elements that never have children (a start tag opens nothing).
const VOID: &[&str] = &[
    "area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr",
];
/// Elements a start tag of the same name closes when it is the current one (`<p>a<p>b`, `<li>a<li>b`).
const SELF_CLOSING_SIBLINGS: &[&str] = &["p", "li", "dt", "dd", "tr", "td", "th", "option"];

/// An estimate of how deep the elements of `html` nest, from its tags alone, in one pass and without parsing:
/// start tags open an element (void ones and `<x/>` do not), an end tag closes back to the nearest open element of
/// its name (and is ignored when none is open). Stops counting once past `stop_after`.
fn scanned_depth(html: &str, stop_after: usize) -> usize {
    let bytes = html.as_bytes();
    let mut open: Vec<String> = Vec::new();
    let mut deepest = 0;
    let mut i = 0;
    while let Some(found) = bytes
        .get(i..)
        .and_then(|rest| rest.iter().position(|&b| b == b'<'))
    {
        i += found + 1;
        let closing = bytes.get(i) == Some(&b'/');
        let name_start = i + usize::from(closing);
        let name_len = bytes
            .get(name_start..)
            .unwrap_or_default()
            .iter()
            .take_while(|b| b.is_ascii_alphanumeric())
            .count();
        if name_len == 0 || !bytes.get(name_start).is_some_and(u8::is_ascii_alphabetic) {
            continue;
        }
        let name = html
            .get(name_start..name_start + name_len)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let end = bytes
            .get(name_start..)
            .unwrap_or_default()
            .iter()
            .position(|&b| b == b'>')
            .map_or(bytes.len(), |p| name_start + p);
        i = name_start + name_len;
        if closing {
            if let Some(at) = open.iter().rposition(|n| *n == name) {
                open.truncate(at);
            }
            continue;
        }
        let self_closed = end > 0 && bytes.get(end - 1) == Some(&b'/');
        if VOID.contains(&name.as_str()) || self_closed {
            continue;
        }
        if SELF_CLOSING_SIBLINGS.contains(&name.as_str()) && open.last() == Some(&name) {
            open.pop();
        }
        open.push(name);
        deepest = deepest.max(open.len());
        if deepest > stop_after {
            break;
        }
    }
    deepest
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scraped_html_becomes_markdown_with_repaired_code_blocks() {
        let html = "<div class=\"markdown prose\"><p>Use <strong>this</strong>:</p><pre><code>python Copy code print(1)\n</code></pre></div>";
        let (md, changes) = normalize(html).unwrap();
        assert!(changes.html_converted);
        assert!(md.contains("Use **this**:"), "{md}");
        assert!(!md.contains("<p>") && !md.contains("Copy code"), "{md}");
        assert!(md.contains("print(1)"), "{md}");
    }

    #[test]
    fn copy_code_labels_inside_fences_are_removed() {
        let (md, changes) = normalize("Here:\n```pythonCopy code\nprint(1)\n```").unwrap();
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
            assert_eq!(normalize(text), Ok((text.to_string(), Changes::default())));
        }
    }

    fn nested(open: &str, close: &str, depth: usize, inner: &str) -> String {
        format!("{}{inner}{}", open.repeat(depth), close.repeat(depth))
    }

    /// The attack: a 220 KB message of nested `<div>`s overflowed the stack of `camelid-trainer prepare`. It is
    /// refused (by the tag scan, before parsing) on this test thread's 2 MiB stack, and quickly.
    #[test]
    fn a_220_kb_message_of_nested_html_is_refused_not_a_stack_overflow() {
        let html = nested("<div>", "</div>", 22_000, "x");
        assert!(html.len() > 220_000);
        let started = std::time::Instant::now();
        let err = normalize(&html).unwrap_err();
        assert!(started.elapsed() < std::time::Duration::from_secs(5));
        assert!(
            matches!(err, MarkdownError::TooDeep { limit: MAX_HTML_DEPTH, found } if found > MAX_SCANNED_DEPTH),
            "{err:?}"
        );
        assert!(err.to_string().contains("more than 128 deep"), "{err}");
        // Unclosed tags of every kind count the same.
        assert!(normalize(&format!("<p>{}", "<span><b>".repeat(11_000))).is_err());
    }

    /// Nesting the tag scan lets through (it is below its looser limit) is still measured on the parsed tree
    /// before the recursive conversion; padding makes the message as large as the attack's.
    #[test]
    fn nesting_past_the_limit_is_refused_from_the_parsed_tree() {
        let padding = "<p>filler text</p>".repeat(12_500);
        let html = format!(
            "<div>{padding}{}</div>",
            nested("<ul><li>", "</li></ul>", 150, "deep")
        );
        assert!(html.len() > 220_000);
        assert!(scanned_depth(&html, MAX_SCANNED_DEPTH) <= MAX_SCANNED_DEPTH);
        match normalize(&html) {
            Err(MarkdownError::TooDeep { found, .. }) => assert!(found > MAX_HTML_DEPTH, "{found}"),
            other => panic!("{other:?}"),
        }
    }

    /// Just under the limit, the recursive conversion runs on a 2 MiB stack (this test thread's) in a debug build.
    #[test]
    fn nesting_up_to_the_limit_is_converted() {
        // document > html > body > div > (div > span) * 61 > strong > text: 3 + 122 + 2 = 127 levels.
        let html = format!(
            "<div>{}</div>",
            nested(
                "<div><span>",
                "</span></div>",
                (MAX_HTML_DEPTH - 6) / 2,
                "<strong>deep</strong>"
            )
        );
        assert_eq!(
            tree_depth(&htmd::HtmlToMarkdown::new().html_to_tree(&html).unwrap()),
            127
        );
        let (md, changes) = normalize(&html).unwrap();
        assert!(changes.html_converted);
        assert_eq!(md, "**deep**");
    }

    #[test]
    fn the_tag_scan_follows_closing_void_and_sibling_tags() {
        for (html, depth) in [
            ("<div><div>x</div></div><div></div>", 2),
            ("<p>a<p>b<p>c<li>d<li>e", 2),
            ("<br><img src=x><hr/><foo/>", 0),
            ("<div><span>unclosed</div><div>", 2),
            ("a < b, <3, </ div>, <!-- <div> --> <x", 2),
            ("</div></div><DIV><Div></div>", 2),
        ] {
            assert_eq!(scanned_depth(html, 100), depth, "{html}");
        }
        assert_eq!(
            scanned_depth(&"<i>".repeat(50), 10),
            11,
            "stops once past the limit"
        );
    }
}
