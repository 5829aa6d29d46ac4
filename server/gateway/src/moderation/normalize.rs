//! Text as the rules see it. A bypass is a spelling that a reader reads as the flagged word but a pattern does not;
//! each step here removes one family of them, and [`views`] gives every spelling the rules are matched against:
//!
//! 1. NFKD: compatibility forms become their plain letters (mathematical bold and italic, full-width, circled,
//!    ligatures, superscripts), and accented letters split into letter + combining mark.
//! 2. Combining marks are dropped (`k̶i̶l̶l̶`, `múrder` → `kill`, `murder`), as are invisible and format characters:
//!    zero-width spaces and joiners, bidi controls and isolates, soft hyphens, word joiners, byte-order marks,
//!    variation selectors, tag characters (U+E0000 block), Hangul fillers, and control characters other than
//!    whitespace.
//! 3. Look-alike letters of other scripts (Cyrillic, Greek, Armenian, Latin small capitals and IPA) become the ASCII
//!    letter they imitate (`kіll` with a Cyrillic `і`), then everything is lower-cased.
//!
//! On top of that one normalized text, [`views`] adds: letters split by separators joined again (`k i l l`,
//! `k.i.l.l`, `m-u-r-d-e-r`), and the decoded text of base64 runs (one level, see [`decoded_base64`]).
//!
//! Pure and total: any input gives an output, no panics (a fuzz target's contract).

use base64::Engine as _;
use unicode_normalization::UnicodeNormalization;
use unicode_normalization::char::is_combining_mark;

/// The normalized text (steps 1-3 above).
pub fn normalize(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.nfkd() {
        if is_combining_mark(c) || is_invisible(c) {
            continue;
        }
        match look_alike(c) {
            Some(ascii) => out.push(ascii),
            None => out.extend(c.to_lowercase()),
        }
    }
    out
}

/// Every spelling of `text` the rules are matched against: the normalized text, that text with single letters split
/// by separators joined, and (when it has base64 runs that decode to text) the decoded text, normalized and joined
/// likewise.
pub fn views(text: &str) -> Vec<String> {
    let normalized = normalize(text);
    let mut views = Vec::with_capacity(4);
    if let Some(joined) = join_split_letters(&normalized) {
        views.push(joined);
    }
    if let Some(decoded) = decoded_base64(text) {
        let decoded = normalize(&decoded);
        if let Some(joined) = join_split_letters(&decoded) {
            views.push(joined);
        }
        views.push(decoded);
    }
    views.insert(0, normalized);
    views
}

/// Characters that render as nothing (or only steer rendering) and so can sit inside a word unseen.
fn is_invisible(c: char) -> bool {
    matches!(c,
        '\u{0000}'..='\u{0008}' | '\u{000B}' | '\u{000E}'..='\u{001F}' | '\u{007F}'..='\u{009F}'
        | '\u{00AD}' | '\u{034F}' | '\u{061C}' | '\u{115F}' | '\u{1160}' | '\u{17B4}' | '\u{17B5}'
        | '\u{180B}'..='\u{180F}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}' | '\u{2060}'..='\u{206F}'
        | '\u{3164}' | '\u{FE00}'..='\u{FE0F}' | '\u{FEFF}' | '\u{FFA0}' | '\u{FFF9}'..='\u{FFFB}'
        | '\u{1BCA0}'..='\u{1BCA3}' | '\u{1D173}'..='\u{1D17A}' | '\u{E0000}'..='\u{E007F}'
        | '\u{E0100}'..='\u{E01EF}')
}

/// The ASCII letter a character of another script is drawn like (upper and lower case alike), for the common
/// look-alikes of Unicode's confusables list; `None` for everything else.
fn look_alike(c: char) -> Option<char> {
    Some(match c {
        // Cyrillic
        'А' | 'а' => 'a',
        'В' | 'в' | 'Ь' | 'ь' => 'b',
        'С' | 'с' | 'Ϲ' | 'ϲ' => 'c',
        'ԁ' => 'd',
        'Е' | 'е' | 'Ё' | 'ё' | 'Є' | 'є' => 'e',
        'Н' | 'н' | 'Һ' | 'һ' => 'h',
        'І' | 'і' | 'Ї' | 'ї' | 'Ӏ' | 'ӏ' => 'i',
        'Ј' | 'ј' => 'j',
        'К' | 'к' => 'k',
        'М' | 'м' => 'm',
        'О' | 'о' => 'o',
        'Р' | 'р' => 'p',
        'Ԛ' | 'ԛ' => 'q',
        'Ѕ' | 'ѕ' => 's',
        'Т' | 'т' => 't',
        'Ѵ' | 'ѵ' => 'v',
        'Ԝ' | 'ԝ' => 'w',
        'Х' | 'х' => 'x',
        'У' | 'у' | 'Ү' | 'ү' => 'y',
        // Greek
        'Α' | 'α' => 'a',
        'Β' | 'β' => 'b',
        'Ε' | 'ε' => 'e',
        'Η' => 'h',
        'η' => 'n',
        'Ι' | 'ι' => 'i',
        'Κ' | 'κ' => 'k',
        'Μ' => 'm',
        'Ν' => 'n',
        'ν' => 'v',
        'Ο' | 'ο' | 'σ' => 'o',
        'Ρ' | 'ρ' => 'p',
        'Τ' | 'τ' => 't',
        'Υ' | 'γ' => 'y',
        'υ' => 'u',
        'Χ' | 'χ' => 'x',
        'Ζ' => 'z',
        'ω' => 'w',
        'ϳ' => 'j',
        // Armenian
        'օ' => 'o',
        'ս' => 'u',
        'հ' => 'h',
        'ո' => 'n',
        'ց' => 'g',
        // Latin small capitals, IPA and other Latin look-alikes
        'ᴀ' | 'ɑ' => 'a',
        'ʙ' => 'b',
        'ᴄ' => 'c',
        'ᴅ' => 'd',
        'ᴇ' => 'e',
        'ꜰ' => 'f',
        'ɢ' | 'ɡ' => 'g',
        'ʜ' => 'h',
        'ɪ' | 'ı' | 'ɩ' => 'i',
        'ᴊ' | 'ȷ' => 'j',
        'ᴋ' => 'k',
        'ʟ' | 'ǀ' => 'l',
        'ᴍ' => 'm',
        'ɴ' => 'n',
        'ᴏ' => 'o',
        'ᴘ' => 'p',
        'ʀ' => 'r',
        'ꜱ' => 's',
        'ᴛ' => 't',
        'ᴜ' => 'u',
        'ᴠ' => 'v',
        'ᴡ' => 'w',
        'ʏ' => 'y',
        'ᴢ' => 'z',
        _ => return None,
    })
}

/// Characters that may separate the letters of a split word (`k i l l`, `k.i.l.l`, `k-i-l-l`, `k_i_l_l`, `k/i/l/l`,
/// `k*i*l*l`), newlines included so a word spelled one letter per message is seen in the whole conversation.
fn is_letter_separator(c: char) -> bool {
    c.is_whitespace()
        || matches!(
            c,
            '.' | '-' | '_' | '*' | '/' | '\\' | '|' | '·' | '•' | ',' | '+' | '~' | '\''
        )
}

/// `text` with every run of three or more single letters (or digits) separated by at most three separator
/// characters joined into one word; `None` when there is no such run (the view would repeat the text). Words of two
/// or more letters are left alone, so ordinary text is unchanged: only a spelled-out word is joined.
pub fn join_split_letters(text: &str) -> Option<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = String::with_capacity(text.len());
    let mut changed = false;
    let mut i = 0;
    while i < chars.len() {
        if let Some((letters, end)) = split_word_at(&chars, i) {
            out.extend(letters);
            changed = true;
            i = end;
        } else {
            out.push(chars[i]);
            i += 1;
        }
    }
    changed.then_some(out)
}

/// A run of single letters starting at `start` (which must begin a word): its letters and the index after the last.
fn split_word_at(chars: &[char], start: usize) -> Option<(Vec<char>, usize)> {
    let single = |i: usize| {
        chars.get(i).is_some_and(|c| c.is_alphanumeric())
            && !chars.get(i + 1).is_some_and(|c| c.is_alphanumeric())
            && (i == 0 || !chars[i - 1].is_alphanumeric())
    };
    if !single(start) {
        return None;
    }
    let mut letters = vec![chars[start]];
    let mut end = start + 1;
    // The same separator all along (`k.i.l.l`), so a single-letter word before a split one stays apart
    // (`a b.o.m.b` is `a bomb`).
    let mut separator: Option<&[char]> = None;
    loop {
        let mut j = end;
        while j < chars.len() && j - end < 3 && is_letter_separator(chars[j]) {
            j += 1;
        }
        if j == end || !single(j) || separator.is_some_and(|s| s != &chars[end..j]) {
            break;
        }
        separator = Some(&chars[end..j]);
        letters.push(chars[j]);
        end = j + 1;
    }
    (letters.len() >= 3).then_some((letters, end))
}

/// The shortest base64 run that is decoded: 8 characters are 6 bytes (`kill me` is 12 characters of base64).
const MIN_BASE64_RUN: usize = 8;

/// The text that base64 runs of `text` decode to, one decoded run a line; `None` when there is none. A run is 8 or
/// more characters of the standard or URL-safe alphabet (padding optional) that decodes to UTF-8 that is mostly
/// printable, so ordinary long words, which decode to binary, are skipped. One level only (base64 inside base64 is
/// not decoded again), and bounded by the text itself: the decoded text is shorter than the text.
pub fn decoded_base64(text: &str) -> Option<String> {
    let engine = base64::engine::GeneralPurpose::new(
        &base64::alphabet::STANDARD,
        base64::engine::GeneralPurposeConfig::new()
            .with_decode_padding_mode(base64::engine::DecodePaddingMode::Indifferent)
            .with_decode_allow_trailing_bits(true),
    );
    let mut decoded = String::new();
    for run in text.split(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '+' | '/' | '-' | '_' | '=')))
    {
        let run = run.trim_end_matches('=');
        if run.len() < MIN_BASE64_RUN || run.len() % 4 == 1 || run.contains('=') {
            continue;
        }
        // The URL-safe alphabet as the standard one (a run mixing both decodes to garbage and is skipped).
        let standard: String = run
            .chars()
            .map(|c| match c {
                '-' => '+',
                '_' => '/',
                c => c,
            })
            .collect();
        let Ok(bytes) = engine.decode(standard.as_bytes()) else {
            continue;
        };
        let Ok(text) = String::from_utf8(bytes) else {
            continue;
        };
        let printable = text
            .chars()
            .filter(|c| !c.is_control() || c.is_whitespace())
            .count();
        if printable * 10 >= text.chars().count() * 9 {
            decoded.push_str(&text);
            decoded.push('\n');
        }
    }
    (!decoded.is_empty()).then_some(decoded)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normalize_removes_what_hides_words() {
        assert_eq!(normalize("Ki\u{200B}LL"), "kill");
        assert_eq!(normalize("ｋｉｌｌ"), "kill");
        assert_eq!(normalize("so\u{00AD}ft"), "soft");
        assert_eq!(normalize("Ünïcode stays readable"), "unicode stays readable");
        assert_eq!(normalize("𝐤𝐢𝐥𝐥 𝘮𝘶𝘳𝘥𝘦𝘳"), "kill murder");
        assert_eq!(normalize("k\u{0336}i\u{0336}l\u{0336}l\u{0336}"), "kill");
        assert_eq!(
            normalize("kі\u{202E}ll"),
            "kill",
            "Cyrillic і and a bidi override"
        );
        assert_eq!(normalize("ΚΙLL"), "kill", "Greek capitals");
        assert_eq!(normalize("k\u{E0069}\u{E006C}ill"), "kill", "tag characters");
        assert_eq!(normalize("ᴋɪʟʟ"), "kill", "small capitals");
        assert_eq!(normalize("ⓚⓘⓛⓛ"), "kill", "circled letters");
    }

    #[test]
    fn split_letters_are_joined_and_words_are_left_alone() {
        assert_eq!(
            join_split_letters("how to k i l l him").as_deref(),
            Some("how to kill him")
        );
        assert_eq!(join_split_letters("k.i.l.l").as_deref(), Some("kill"));
        assert_eq!(
            join_split_letters("m - u - r - d - e - r").as_deref(),
            Some("murder")
        );
        assert_eq!(join_split_letters("k\ni\nl\nl").as_deref(), Some("kill"));
        assert_eq!(
            join_split_letters("make a b.o.m.b").as_deref(),
            Some("make a bomb")
        );
        assert_eq!(join_split_letters("k-means on x and y"), None);
        assert_eq!(join_split_letters("a normal sentence, of words."), None);
        assert_eq!(
            join_split_letters("ab c d e").as_deref(),
            Some("ab cde"),
            "`ab` is a word"
        );
        assert_eq!(
            join_split_letters("k    i    l    l"),
            None,
            "more than three separators apart"
        );
    }

    #[test]
    fn base64_runs_that_decode_to_text_are_decoded() {
        assert_eq!(
            decoded_base64("aG93IHRvIGtpbGwgaGlt").as_deref(),
            Some("how to kill him\n")
        );
        assert_eq!(
            decoded_base64("run: aG93IHRvIGtpbGwgaGlt!").as_deref(),
            Some("how to kill him\n")
        );
        assert_eq!(decoded_base64("a2lsbCBtZQ==").as_deref(), Some("kill me\n"));
        assert_eq!(
            decoded_base64("a2lsbCBtZQ").as_deref(),
            Some("kill me\n"),
            "padding is optional"
        );
        assert_eq!(decoded_base64("P-8_"), None, "too short");
        assert_eq!(
            decoded_base64("internationalization and extraordinarily long words"),
            None
        );
        assert!(views("aG93IHRvIGtpbGwgaGlt").contains(&"how to kill him\n".to_string()));
    }

    #[test]
    fn hostile_input_does_not_panic() {
        for text in [
            "",
            "=",
            "====",
            "\u{E0000}",
            "a\u{0301}\u{0301}\u{0301}",
            "\u{FFFF}\u{10FFFF}",
            "A===B",
        ] {
            let _ = views(text);
        }
        let long = "k ".repeat(10_000);
        assert_eq!(join_split_letters(&long).map(|s| s.len()), Some(10_001));
    }
}
