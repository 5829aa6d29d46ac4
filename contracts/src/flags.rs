//! Settings structs written as command-line flags: each camelCase JSON key `maxLength` becomes `--max-length`,
//! so one name runs from the CRD field through the JSON to the flag the receiving binary's clap parser reads.

use serde::Serialize;

/// The flags for every set field of `settings` (unset `Option`s are skipped by their serde attributes); a list
/// repeats its flag once per item.
pub fn to_args<T: Serialize>(settings: &T) -> Result<Vec<String>, serde_json::Error> {
    let map = match serde_json::to_value(settings)? {
        serde_json::Value::Object(map) => map,
        // A struct always serializes as an object.
        _ => serde_json::Map::new(),
    };
    let mut args = Vec::new();
    for (key, value) in map {
        let flag = format!("--{}", kebab(&key));
        let values = match value {
            serde_json::Value::Array(items) => items,
            one => vec![one],
        };
        for v in values {
            args.push(flag.clone());
            args.push(match v {
                serde_json::Value::String(s) => s,
                other => other.to_string(),
            });
        }
    }
    Ok(args)
}

/// `maxLength` → `max-length`.
pub fn kebab(camel: &str) -> String {
    let mut out = String::with_capacity(camel.len() + 4);
    for c in camel.chars() {
        if c.is_ascii_uppercase() {
            out.push('-');
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
