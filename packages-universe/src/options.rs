//! Install options: defaults taken from the package's JSON Schema, the user's options merged
//! over them (`--options FILE.json`, then each `--set key=value`), and validation with the
//! `jsonschema` crate. Every error names the option's JSON pointer and what to do
//! (`/replicas: 7 is greater than the maximum of 5`), and an unknown option names the ones
//! that exist.

use serde_json::{Map, Value};

/// One thing wrong with the options.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, thiserror::Error)]
#[error("{}: {message}", if pointer.is_empty() { "/" } else { pointer.as_str() })]
pub struct OptionError {
    /// JSON pointer of the option (`/persistence/size_mb`); empty for the whole object.
    pub pointer: String,
    pub message: String,
}

fn oerr(pointer: impl Into<String>, message: impl Into<String>) -> OptionError {
    OptionError {
        pointer: pointer.into(),
        message: message.into(),
    }
}

/// Largest options document.
pub const MAX_OPTIONS_BYTES: usize = 64 * 1024;

/// Checks a package's schema: a valid JSON Schema of an object with properties, a string
/// option `name` with a default (the service name), and defaults that pass the schema.
pub fn check_schema(schema: &Value) -> Result<(), String> {
    jsonschema::meta::validate(schema).map_err(|e| format!("not a valid JSON Schema: {e}"))?;
    if schema["type"] != "object" || !schema["properties"].is_object() {
        return Err("the schema must be {\"type\": \"object\", \"properties\": {...}}".into());
    }
    let name = &schema["properties"]["name"];
    if name["type"] != "string" || !name["default"].is_string() {
        return Err(
            "declare option \"name\" (type string, with a default): the service's name".into(),
        );
    }
    let validator = jsonschema::validator_for(schema).map_err(|e| e.to_string())?;
    let d = defaults(schema);
    if let Some(e) = validator.iter_errors(&d).next() {
        return Err(format!(
            "the defaults fail the schema at {}: {e}",
            e.instance_path
        ));
    }
    Ok(())
}

/// The defaults a schema declares: each property's `default`, objects filled recursively.
pub fn defaults(schema: &Value) -> Value {
    let mut out = schema.get("default").cloned().unwrap_or(Value::Null);
    if let Some(props) = schema.get("properties").and_then(Value::as_object) {
        if !out.is_object() {
            out = Value::Object(Map::new());
        }
        for (k, sub) in props {
            let d = defaults(sub);
            if !d.is_null() {
                let slot = &mut out[k.as_str()];
                merge(slot, &d, true);
            }
        }
        if out.as_object().is_some_and(Map::is_empty) && schema.get("default").is_none() {
            return Value::Null;
        }
    }
    out
}

/// Merges user options `over` into `base` (objects key by key, anything else replaced; a
/// null `over` changes nothing): options in use, then the ones an update gives.
pub fn merge_options(base: &mut Value, over: &Value) {
    if !over.is_null() {
        merge(base, over, false);
    }
}

/// Merges `over` into `base`: objects key by key, anything else replaced. With
/// `keep_base`, values already in `base` win (used to lay defaults under a value).
fn merge(base: &mut Value, over: &Value, keep_base: bool) {
    match (base, over) {
        (Value::Object(b), Value::Object(o)) => {
            for (k, v) in o {
                match b.get_mut(k) {
                    Some(slot) => merge(slot, v, keep_base),
                    None => {
                        b.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        (b @ Value::Null, o) => *b = o.clone(),
        (b, o) if !keep_base => *b = o.clone(),
        _ => {}
    }
}

/// Resolved options: defaults with the user's options over them, valid against the schema.
#[derive(Clone, Debug, PartialEq)]
pub struct Options(pub Value);

impl Options {
    /// Fills defaults under `user` and validates. All errors are returned, each naming its
    /// option.
    pub fn resolve(schema: &Value, user: &Value) -> Result<Options, Vec<OptionError>> {
        let user = match user {
            Value::Null => Value::Object(Map::new()),
            Value::Object(_) => user.clone(),
            other => {
                return Err(vec![oerr(
                    "",
                    format!("options are a JSON object, not {}", kind(other)),
                )])
            }
        };
        let mut errors = Vec::new();
        unknown(schema, &user, "", &mut errors);
        if !errors.is_empty() {
            return Err(errors);
        }
        let mut all = defaults(schema);
        merge(&mut all, &user, false);
        let validator = jsonschema::validator_for(schema)
            .map_err(|e| vec![oerr("", format!("the package's schema is invalid: {e}"))])?;
        let errors: Vec<OptionError> = validator
            .iter_errors(&all)
            .map(|e| oerr(e.instance_path.to_string(), explain(schema, &e)))
            .collect();
        if errors.is_empty() {
            Ok(Options(all))
        } else {
            Err(errors)
        }
    }
}

/// The message of a schema error, with the option's description when there is one.
fn explain(schema: &Value, e: &jsonschema::ValidationError) -> String {
    let pointer = e.instance_path.to_string();
    let mut msg = e.to_string();
    if let Some(d) = schema_at(schema, &pointer)
        .and_then(|s| s.get("description"))
        .and_then(Value::as_str)
    {
        msg += &format!(" ({d})");
    }
    msg
}

fn kind(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "an array",
        Value::Object(_) => "an object",
    }
}

/// Options the schema does not declare (where it lists properties), with the known names.
fn unknown(schema: &Value, v: &Value, at: &str, errors: &mut Vec<OptionError>) {
    let (Some(props), Some(obj)) = (
        schema.get("properties").and_then(Value::as_object),
        v.as_object(),
    ) else {
        return;
    };
    let open = schema
        .get("additionalProperties")
        .is_some_and(|a| a != false);
    for (k, sub) in obj {
        let p = format!("{at}/{}", escape(k));
        match props.get(k) {
            Some(s) => unknown(s, sub, &p, errors),
            None if !open => {
                let known: Vec<&str> = props.keys().map(String::as_str).collect();
                let hint = closest(k, &known)
                    .map(|c| format!("did you mean {c:?}? "))
                    .unwrap_or_default();
                errors.push(oerr(
                    p,
                    format!("unknown option; {hint}the options here are {known:?}"),
                ));
            }
            None => {}
        }
    }
}

fn escape(k: &str) -> String {
    k.replace('~', "~0").replace('/', "~1")
}

/// The known name nearest to `k` (edit distance at most 2, or `k` a prefix of it).
fn closest<'a>(k: &str, known: &[&'a str]) -> Option<&'a str> {
    known
        .iter()
        .map(|c| {
            let d = distance(k, c);
            // A prefix (`disk` of `disk_mb`) counts as near.
            (if c.starts_with(k) { d.min(1) } else { d }, *c)
        })
        .filter(|(d, _)| *d <= 2)
        .min()
        .map(|(_, c)| c)
}

fn distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            let sub = prev[j] + usize::from(ca != *cb);
            cur.push(sub.min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// The sub-schema of an option by JSON pointer (through `properties` only).
pub fn schema_at<'a>(schema: &'a Value, pointer: &str) -> Option<&'a Value> {
    let mut s = schema;
    for part in pointer.split('/').skip(1) {
        let key = part.replace("~1", "/").replace("~0", "~");
        s = s.get("properties")?.get(&key)?;
    }
    Some(s)
}

/// Applies one `--set key=value` (`a.b=3`) to `options`. The value is read by the option's
/// schema type: a string option keeps the text as is; other types parse it as JSON
/// (`3`, `true`, `["a"]`); an unknown key is refused naming the options that exist.
pub fn set(options: &mut Value, schema: &Value, assignment: &str) -> Result<(), OptionError> {
    let Some((key, raw)) = assignment.split_once('=') else {
        return Err(oerr(
            "",
            format!("--set {assignment:?}: write KEY=VALUE, e.g. --set replicas=2"),
        ));
    };
    if key.is_empty() || key.split('.').any(str::is_empty) {
        return Err(oerr(
            "",
            format!("--set {assignment:?}: the key is empty; e.g. --set persistence.size_mb=512"),
        ));
    }
    let pointer: String = key.split('.').map(|k| format!("/{}", escape(k))).collect();
    let sub = schema_at(schema, &pointer);
    let Some(sub) = sub else {
        // Name the options at the deepest known level.
        let parts: Vec<&str> = key.split('.').collect();
        let mut at = String::new();
        let mut s = schema;
        for p in &parts {
            match s.get("properties").and_then(|ps| ps.get(*p)) {
                Some(next) => {
                    at += &format!("/{}", escape(p));
                    s = next;
                }
                None => {
                    let known: Vec<&str> = s
                        .get("properties")
                        .and_then(Value::as_object)
                        .map(|m| m.keys().map(String::as_str).collect())
                        .unwrap_or_default();
                    let hint = closest(p, &known)
                        .map(|c| format!("did you mean {c:?}? "))
                        .unwrap_or_default();
                    return Err(oerr(
                        format!("{at}/{}", escape(p)),
                        format!("unknown option; {hint}the options here are {known:?}"),
                    ));
                }
            }
        }
        return Err(oerr(pointer, "unknown option"));
    };
    let value = if sub["type"] == "string" {
        Value::String(raw.to_string())
    } else {
        serde_json::from_str(raw).unwrap_or_else(|_| Value::String(raw.to_string()))
    };
    if !options.is_object() {
        *options = Value::Object(Map::new());
    }
    let mut slot = options;
    for k in key.split('.') {
        if !slot.is_object() {
            *slot = Value::Object(Map::new());
        }
        slot = &mut slot[k];
    }
    *slot = value;
    Ok(())
}
