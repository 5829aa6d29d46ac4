//! The built-in rules provider: category → patterns, matched case-insensitively in one pass of a `RegexSet` over
//! every spelling of the text that [`super::normalize::views`] gives (normalized; split letters joined; base64
//! decoded). A plain pattern is a whole word or phrase, each word of it also in its regular verb forms (`murder`
//! matches `murders`, `murdered`, `murdering`; see [`word_forms`]); `re:` starts a regular expression, for spellings
//! the words do not cover. Word rules know no context: `kill` flags "Kill Bill" and "kill the process" too, so
//! rules that must spare such uses are written as phrases (as the built-in profile's are).

use std::collections::BTreeMap;

use regex::RegexSet;

use super::normalize::{normalize, views};
use super::{CheckFuture, Provider, TextVerdict};

/// The rules of a `rules` provider: category → patterns (the YAML of a rules file, or inline in the config).
pub type RuleCategories = BTreeMap<String, Vec<String>>;

#[derive(Debug)]
pub struct Rules {
    set: RegexSet,
    /// Category of each pattern of `set`, by index.
    pattern_category: Vec<usize>,
    categories: Vec<String>,
}

impl Rules {
    /// Compiles the rules; an error names the category and the pattern.
    pub fn new(rules: &RuleCategories) -> Result<Self, String> {
        if rules.is_empty() {
            return Err("no categories".into());
        }
        let mut patterns = Vec::new();
        let mut pattern_category = Vec::new();
        let mut categories = Vec::new();
        for (index, (category, list)) in rules.iter().enumerate() {
            if category.trim().is_empty() {
                return Err("a category name is empty".into());
            }
            if list.is_empty() {
                return Err(format!("`{category}` has no patterns"));
            }
            categories.push(category.clone());
            for (i, pattern) in list.iter().enumerate() {
                let regex = compile(pattern).map_err(|e| format!("`{category}[{i}]` ({pattern:?}): {e}"))?;
                patterns.push(regex);
                pattern_category.push(index);
            }
        }
        let set = RegexSet::new(&patterns).map_err(|e| e.to_string())?;
        Ok(Self {
            set,
            pattern_category,
            categories,
        })
    }

    pub fn verdict(&self, text: &str) -> TextVerdict {
        let mut hit = vec![false; self.categories.len()];
        for view in views(text) {
            for pattern in self.set.matches(&view).iter() {
                hit[self.pattern_category[pattern]] = true;
            }
        }
        let categories: BTreeMap<String, bool> =
            self.categories.iter().cloned().zip(hit.iter().copied()).collect();
        TextVerdict {
            flagged: hit.iter().any(|h| *h),
            scores: categories
                .iter()
                .map(|(c, h)| (c.clone(), if *h { 1.0 } else { 0.0 }))
                .collect(),
            categories,
            flagged_by: Vec::new(),
        }
    }
}

/// A pattern as a regex: `re:` patterns as written, words and phrases normalized like the text, each word in its
/// verb forms, bounded by word edges, spaces matching any run of whitespace. Both are case-insensitive.
fn compile(pattern: &str) -> Result<String, String> {
    let regex = if let Some(re) = pattern.strip_prefix("re:") {
        format!("(?i){re}")
    } else {
        let words: Vec<String> = pattern
            .split_whitespace()
            .map(|w| word_forms(&normalize(w)))
            .collect();
        if words.is_empty() {
            return Err("empty pattern".into());
        }
        format!(r"(?i)\b{}\b", words.join(r"\s+"))
    };
    regex::Regex::new(&regex).map_err(|e| e.to_string())?;
    Ok(regex)
}

/// A word of a plain pattern as a regex of its regular verb forms: `-s`, `-es`, `-ed`, `-d`, `-ing`, with the final
/// consonant doubled (`stabbed`), a silent `e` dropped (`hating`) and `y` as `ies`/`ied` (`bullied`). Only words of
/// three or more ASCII letters are inflected; others, and agent nouns (`-er`: "killer feature", "bomber jacket"),
/// are matched as written.
fn word_forms(word: &str) -> String {
    let escaped = regex::escape(word);
    let letters: Vec<char> = word.chars().collect();
    if letters.len() < 3 || !letters.iter().all(char::is_ascii_lowercase) {
        return escaped;
    }
    let mut forms = vec![format!("{escaped}(?:s|es|ed|d|ing)?")];
    let vowel = |c: char| matches!(c, 'a' | 'e' | 'i' | 'o' | 'u');
    let (last, before) = (letters[letters.len() - 1], letters[letters.len() - 2]);
    let stem: String = letters[..letters.len() - 1].iter().collect();
    if !vowel(last) && !matches!(last, 'w' | 'x' | 'y') && vowel(before) {
        forms.push(format!("{escaped}{last}(?:ed|ing)"));
    }
    if last == 'e' {
        forms.push(format!("{stem}ing"));
    }
    if last == 'y' && !vowel(before) {
        forms.push(format!("{stem}(?:ies|ied)"));
    }
    format!("(?:{})", forms.join("|"))
}

impl Provider for Rules {
    fn kind(&self) -> &'static str {
        "rules"
    }

    fn check<'a>(&'a self, texts: &'a [String]) -> CheckFuture<'a> {
        let verdicts = texts.iter().map(|t| self.verdict(t)).collect();
        Box::pin(async move { Ok(verdicts) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules() -> Rules {
        let yaml = r#"
violence: ["kill", "re:\\bk[i1!|]+l+(s|ed|ing)?\\b", "blow up"]
self-harm: ["hurt myself"]
"#;
        Rules::new(&serde_yaml_ng::from_str(yaml).unwrap()).unwrap()
    }

    #[test]
    fn words_match_whole_words_in_any_case() {
        let r = rules();
        assert_eq!(
            r.verdict("How do I KILL a process?").flagged_categories(),
            ["violence"]
        );
        assert!(
            !r.verdict("the skill of a killjoy").flagged,
            "inside other words is not a match"
        );
        assert_eq!(
            r.verdict("I want to hurt   myself").flagged_categories(),
            ["self-harm"]
        );
        assert!(!r.verdict("a clean question about llamas").flagged);
    }

    #[test]
    fn tricky_spellings_are_caught_by_patterns_and_normalization() {
        let r = rules();
        for text in [
            "k1ll him",
            "K!LLING time",
            "ki\u{200B}ll",
            "ｋｉｌｌ",
            "kiiiilll",
            "blow\nup the bridge",
        ] {
            assert_eq!(r.verdict(text).flagged_categories(), ["violence"], "{text:?}");
        }
    }

    #[test]
    fn words_match_their_verb_forms_and_not_other_words() {
        let r = Rules::new(
            &serde_yaml_ng::from_str(r#"{violence: [murder, stab, hate, bully, hurt myself]}"#).unwrap(),
        )
        .unwrap();
        for text in [
            "murdered",
            "MURDERS",
            "murdering",
            "stabbed",
            "stabbing",
            "hating",
            "hated",
            "bullied",
            "hurting myself",
            "hurts myself",
        ] {
            assert!(r.verdict(text).flagged, "{text:?}");
        }
        for text in [
            "murderer",
            "stable",
            "whatever",
            "bullion",
            "hurtle myself",
            "hateful",
            "stabs",
        ] {
            let flagged = r.verdict(text).flagged;
            assert_eq!(flagged, text == "stabs", "{text:?}");
        }
    }

    #[test]
    fn every_category_is_reported_with_scores() {
        let v = rules().verdict("kill");
        assert_eq!(v.categories.len(), 2);
        assert_eq!(v.scores["violence"], 1.0);
        assert_eq!(v.scores["self-harm"], 0.0);
    }

    #[test]
    fn bad_rules_name_the_pattern() {
        let bad: RuleCategories = [(
            "hate".to_string(),
            vec!["ok".to_string(), "re:(unclosed".to_string()],
        )]
        .into();
        let e = Rules::new(&bad).unwrap_err();
        assert!(e.contains("`hate[1]`") && e.contains("(unclosed"), "{e}");
        let empty: RuleCategories = [("hate".to_string(), vec![])].into();
        assert!(Rules::new(&empty).unwrap_err().contains("no patterns"));
    }
}
