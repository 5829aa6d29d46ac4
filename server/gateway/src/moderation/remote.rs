//! Any OpenAI-compatible `/v1/moderations` endpoint (OpenAI's own, or a self-hosted one) as a provider: all texts
//! of a request in one call, with a timeout, and per-category score thresholds that override the endpoint's own
//! booleans.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use super::{CheckFuture, Provider, ProviderError, TextVerdict};

#[derive(Debug, Clone)]
pub struct RemoteConfig {
    pub url: String,
    /// The bearer key (read from the environment variable the config names); none for endpoints without keys.
    pub api_key: Option<String>,
    pub model: Option<String>,
    pub timeout: Duration,
    /// Category → the score at or above which it is flagged.
    pub thresholds: BTreeMap<String, f64>,
}

#[derive(Debug)]
pub struct Remote {
    config: RemoteConfig,
    client: reqwest::Client,
}

#[derive(Deserialize)]
struct Response {
    results: Vec<ResultItem>,
}

#[derive(Deserialize)]
struct ResultItem {
    flagged: bool,
    #[serde(default)]
    categories: BTreeMap<String, bool>,
    #[serde(default)]
    category_scores: BTreeMap<String, f64>,
}

impl Remote {
    pub fn new(config: RemoteConfig) -> Result<Self, String> {
        let client = reqwest::Client::builder()
            .timeout(config.timeout)
            .connect_timeout(config.timeout)
            .build()
            .map_err(|e| format!("HTTP client: {e}"))?;
        Ok(Self { config, client })
    }

    /// Applies the thresholds: a category with a threshold is flagged by its score alone; others keep the
    /// endpoint's boolean.
    fn verdict(&self, item: ResultItem) -> TextVerdict {
        let mut categories = item.categories;
        for (category, score) in &item.category_scores {
            if let Some(threshold) = self.config.thresholds.get(category) {
                categories.insert(category.clone(), *score >= *threshold);
            }
        }
        let flagged = if self.config.thresholds.is_empty() {
            item.flagged || categories.values().any(|f| *f)
        } else {
            categories.values().any(|f| *f)
        };
        TextVerdict {
            flagged,
            categories,
            scores: item.category_scores,
            flagged_by: Vec::new(),
        }
    }

    async fn call(&self, texts: &[String]) -> Result<Vec<TextVerdict>, ProviderError> {
        let mut body = serde_json::json!({ "input": texts });
        if let Some(model) = &self.config.model {
            body["model"] = serde_json::Value::String(model.clone());
        }
        let mut request = self.client.post(&self.config.url).json(&body);
        if let Some(key) = &self.config.api_key {
            request = request.bearer_auth(key);
        }
        let unavailable = |what: String| ProviderError::Unavailable(what);
        let response = request.send().await.map_err(|e| {
            if e.is_timeout() {
                unavailable(format!("no answer within {} ms", self.config.timeout.as_millis()))
            } else {
                unavailable(format!("cannot reach {}: {}", self.config.url, root_cause(&e)))
            }
        })?;
        let status = response.status();
        if !status.is_success() {
            return Err(unavailable(format!("{} answered HTTP {status}", self.config.url)));
        }
        let parsed: Response = response.json().await.map_err(|e| {
            if e.is_timeout() {
                unavailable(format!("no answer within {} ms", self.config.timeout.as_millis()))
            } else {
                unavailable(format!(
                    "{} answered an unexpected body: {}",
                    self.config.url,
                    root_cause(&e)
                ))
            }
        })?;
        if parsed.results.len() != texts.len() {
            return Err(unavailable(format!(
                "{} answered {} results for {} inputs",
                self.config.url,
                parsed.results.len(),
                texts.len()
            )));
        }
        Ok(parsed.results.into_iter().map(|r| self.verdict(r)).collect())
    }
}

fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

impl Provider for Remote {
    fn kind(&self) -> &'static str {
        "openai"
    }

    fn check<'a>(&'a self, texts: &'a [String]) -> CheckFuture<'a> {
        Box::pin(self.call(texts))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn remote(thresholds: &[(&str, f64)]) -> Remote {
        Remote::new(RemoteConfig {
            url: "http://127.0.0.1:9/v1/moderations".into(),
            api_key: None,
            model: None,
            timeout: Duration::from_millis(100),
            thresholds: thresholds.iter().map(|(c, t)| (c.to_string(), *t)).collect(),
        })
        .unwrap()
    }

    fn item(flagged: bool, scores: &[(&str, f64)]) -> ResultItem {
        ResultItem {
            flagged,
            categories: scores.iter().map(|(c, s)| (c.to_string(), *s > 0.5)).collect(),
            category_scores: scores.iter().map(|(c, s)| (c.to_string(), *s)).collect(),
        }
    }

    #[test]
    fn thresholds_decide_over_the_endpoints_booleans() {
        let r = remote(&[("violence", 0.3), ("hate", 0.95)]);
        let v = r.verdict(item(true, &[("violence", 0.4), ("hate", 0.9)]));
        assert!(v.flagged);
        assert_eq!(
            v.flagged_categories(),
            ["violence"],
            "hate's 0.9 is under its 0.95"
        );
        let v = r.verdict(item(true, &[("violence", 0.1), ("hate", 0.9)]));
        assert!(
            !v.flagged,
            "the endpoint said flagged, but no score reaches its threshold"
        );
    }

    #[test]
    fn without_thresholds_the_endpoints_answer_stands() {
        let r = remote(&[]);
        assert!(r.verdict(item(true, &[("violence", 0.4)])).flagged);
        assert!(!r.verdict(item(false, &[("violence", 0.4)])).flagged);
    }
}
