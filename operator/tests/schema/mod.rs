//! Checks an object against a CRD's openAPIV3Schema in the API server's order: defaults, then the structural
//! schema, then the CEL rules (kube's CEL engine). Errors name the field, as `kubectl apply` shows them.

#![allow(clippy::unwrap_used, clippy::expect_used, dead_code)]

use serde_json::{Map, Value};

pub fn check(schema: &Value, object: &Value) -> Result<(), String> {
    let mut object = object.clone();
    apply_defaults(schema, &mut object);
    let mut errors = Vec::new();
    structural(schema, &object, "", &mut errors);
    if errors.is_empty()
        && let Err(e) = kube::core::cel::Validator::new().validate(schema, &object, None)
    {
        errors.push(e.to_string());
    }
    if errors.is_empty() {
        Ok(())
    } else {
        Err(errors.join("; "))
    }
}

fn apply_defaults(schema: &Value, value: &mut Value) {
    match value {
        Value::Object(map) => {
            if let Some(props) = schema["properties"].as_object() {
                for (name, sub) in props {
                    if !map.contains_key(name)
                        && let Some(default) = sub.get("default")
                    {
                        map.insert(name.clone(), default.clone());
                    }
                    if let Some(v) = map.get_mut(name) {
                        apply_defaults(sub, v);
                    }
                }
            }
        }
        Value::Array(items) => {
            for item in items {
                apply_defaults(&schema["items"], item);
            }
        }
        _ => {}
    }
}

fn at(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

fn structural(schema: &Value, value: &Value, path: &str, errors: &mut Vec<String>) {
    let shown = if path.is_empty() { "the object" } else { path };
    if value.is_null() {
        if schema["nullable"] != Value::Bool(true) {
            errors.push(format!("{shown}: must not be null"));
        }
        return;
    }
    if schema["x-kubernetes-int-or-string"] == Value::Bool(true) {
        if !(value.is_i64() || value.is_u64() || value.is_string()) {
            errors.push(format!("{shown}: must be an integer or a string"));
        }
        return;
    }
    let kind = schema["type"].as_str().unwrap_or("");
    let ok = match kind {
        "object" => value.is_object(),
        "array" => value.is_array(),
        "string" => value.is_string(),
        "integer" => value.is_i64() || value.is_u64(),
        "number" => value.is_number(),
        "boolean" => value.is_boolean(),
        _ => true,
    };
    if !ok {
        errors.push(format!("{shown}: must be of type {kind}, got {value}"));
        return;
    }
    if let Some(allowed) = schema["enum"].as_array()
        && !allowed.contains(value)
    {
        errors.push(format!(
            "{shown}: unsupported value {value}: supported values: {allowed:?}"
        ));
    }
    let number = value.as_f64();
    if let (Some(n), Some(min)) = (number, schema["minimum"].as_f64())
        && n < min
    {
        errors.push(format!(
            "{shown}: should be greater than or equal to {min}, got {n}"
        ));
    }
    if let (Some(n), Some(max)) = (number, schema["maximum"].as_f64())
        && n > max
    {
        errors.push(format!("{shown}: should be less than or equal to {max}, got {n}"));
    }
    let text = value.as_str();
    if let (Some(s), Some(min)) = (text, schema["minLength"].as_u64())
        && (s.chars().count() as u64) < min
    {
        errors.push(format!("{shown}: should be at least {min} chars long"));
    }
    if let (Some(s), Some(pattern)) = (text, schema["pattern"].as_str())
        && !regex::Regex::new(pattern).unwrap().is_match(s)
    {
        errors.push(format!("{shown}: should match '{pattern}', got {s:?}"));
    }
    match value {
        Value::Object(map) => object(schema, map, path, errors),
        Value::Array(items) => {
            for (i, item) in items.iter().enumerate() {
                structural(&schema["items"], item, &format!("{path}[{i}]"), errors);
            }
        }
        _ => {}
    }
}

fn object(schema: &Value, map: &Map<String, Value>, path: &str, errors: &mut Vec<String>) {
    if schema["x-kubernetes-preserve-unknown-fields"] == Value::Bool(true)
        && schema.get("properties").is_none()
    {
        return;
    }
    for required in schema["required"].as_array().into_iter().flatten() {
        let name = required.as_str().unwrap();
        if !map.contains_key(name) {
            errors.push(format!("{}: Required value", at(path, name)));
        }
    }
    let props = schema["properties"].as_object();
    for (name, v) in map {
        match props.and_then(|p| p.get(name)) {
            Some(sub) => structural(sub, v, &at(path, name), errors),
            None => match schema.get("additionalProperties") {
                Some(extra) if extra.is_object() => structural(extra, v, &at(path, name), errors),
                // apiVersion, kind and metadata are the API server's business, not the CRD schema's.
                _ if path.is_empty() && matches!(name.as_str(), "apiVersion" | "kind" | "metadata") => {}
                _ if props.is_none() => {}
                _ => errors.push(format!("{}: unknown field", at(path, name))),
            },
        }
    }
}
