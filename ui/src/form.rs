//! An HTML form generated from a package's options schema (JSON Schema), and the submitted
//! form turned back into options: pure functions, table-tested. Each input is named by its
//! option's JSON pointer (`/persistence/disk_mb`), the same pointer the API's errors name, so
//! an error lands beside its field.

use serde_json::{Map, Value};

/// One row of the form: a section heading (nested object) or an input.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Field {
    /// JSON pointer of the option; the input's name and id.
    pub pointer: String,
    pub label: String,
    pub description: String,
    /// `section`, `text`, `number`, `integer`, `checkbox`, `select` or `list`.
    pub kind: &'static str,
    pub required: bool,
    /// The value to show (the submitted one, else the current option, else the default).
    pub value: String,
    pub checked: bool,
    /// Choices of an enum: (value, selected).
    pub choices: Vec<(String, bool)>,
    pub min: String,
    pub max: String,
    pub pattern: String,
    /// Nesting depth (0: top level).
    pub depth: usize,
    pub error: String,
}

impl Field {
    pub fn is(&self, kind: &str) -> bool {
        self.kind == kind
    }
    /// The id of the element that describes this input (help and error).
    pub fn help_id(&self) -> String {
        format!("help-{}", self.pointer)
    }
}

fn escape_pointer(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

fn scalar_text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(scalar_text).collect::<Vec<_>>().join("\n"),
        other => other.to_string(),
    }
}

fn kind_of(schema: &Value) -> &'static str {
    if schema.get("enum").is_some() {
        return "select";
    }
    match schema["type"].as_str() {
        Some("object") => "section",
        Some("integer") => "integer",
        Some("number") => "number",
        Some("boolean") => "checkbox",
        Some("array") => "list",
        _ => "text",
    }
}

/// The form's rows for `schema`, showing `values` (the options so far: defaults, current
/// options or what was submitted) and `errors` (pointer → message) beside their inputs.
pub fn fields(schema: &Value, values: &Value, errors: &[(String, String)]) -> Vec<Field> {
    let mut out = Vec::new();
    walk(schema, values, errors, "", 0, &mut out);
    out
}

fn walk(
    schema: &Value,
    values: &Value,
    errors: &[(String, String)],
    prefix: &str,
    depth: usize,
    out: &mut Vec<Field>,
) {
    let empty = Map::new();
    let props = schema["properties"].as_object().unwrap_or(&empty);
    let required: Vec<&str> = schema["required"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_str).collect())
        .unwrap_or_default();
    for (key, sub) in props {
        let pointer = format!("{prefix}/{}", escape_pointer(key));
        let kind = kind_of(sub);
        let current = values
            .get(key)
            .cloned()
            .unwrap_or_else(|| sub["default"].clone());
        let error = errors
            .iter()
            .filter(|(p, _)| p == &pointer)
            .map(|(_, m)| m.as_str())
            .collect::<Vec<_>>()
            .join("; ");
        let mut f = Field {
            pointer: pointer.clone(),
            label: sub["title"].as_str().unwrap_or(key).to_string(),
            description: sub["description"].as_str().unwrap_or("").to_string(),
            kind,
            required: required.contains(&key.as_str()),
            depth,
            error,
            ..Default::default()
        };
        match kind {
            "section" => {
                out.push(f);
                walk(sub, &current, errors, &pointer, depth + 1, out);
                continue;
            }
            "checkbox" => f.checked = current.as_bool().unwrap_or(false),
            "select" => {
                let now = scalar_text(&current);
                f.choices = sub["enum"]
                    .as_array()
                    .map(|a| {
                        a.iter()
                            .map(|c| {
                                let c = scalar_text(c);
                                let sel = c == now;
                                (c, sel)
                            })
                            .collect()
                    })
                    .unwrap_or_default();
                f.value = now;
            }
            _ => f.value = scalar_text(&current),
        }
        f.min = sub
            .get("minimum")
            .map(scalar_text)
            .or_else(|| sub.get("minLength").map(|_| String::new()))
            .unwrap_or_default();
        f.max = sub.get("maximum").map(scalar_text).unwrap_or_default();
        f.pattern = sub["pattern"]
            .as_str()
            .map(|p| p.trim_start_matches('^').trim_end_matches('$').to_string())
            .unwrap_or_default();
        out.push(f);
    }
}

/// The options a submitted form gives, typed by the schema. An empty optional input is left
/// out (the package's default applies); an unchecked checkbox is `false`. Inputs that do not
/// parse as their type come back as errors naming the pointer.
pub fn collect(schema: &Value, form: &[(String, String)]) -> Result<Value, Vec<(String, String)>> {
    let mut errors = Vec::new();
    let v = collect_obj(schema, form, "", &mut errors);
    if errors.is_empty() {
        Ok(v)
    } else {
        Err(errors)
    }
}

fn collect_obj(
    schema: &Value,
    form: &[(String, String)],
    prefix: &str,
    errors: &mut Vec<(String, String)>,
) -> Value {
    let mut obj = Map::new();
    let empty = Map::new();
    for (key, sub) in schema["properties"].as_object().unwrap_or(&empty) {
        let pointer = format!("{prefix}/{}", escape_pointer(key));
        let submitted = form
            .iter()
            .find(|(k, _)| k == &pointer)
            .map(|(_, v)| v.trim());
        let kind = kind_of(sub);
        let value = match (kind, submitted) {
            ("section", _) => {
                let inner = collect_obj(sub, form, &pointer, errors);
                if inner.as_object().is_some_and(|o| o.is_empty()) {
                    continue;
                }
                inner
            }
            ("checkbox", s) => Value::Bool(s.is_some_and(|s| s == "on" || s == "true")),
            (_, None) | (_, Some("")) => continue,
            (_, Some(s)) => match typed(sub, kind, s) {
                Ok(v) => v,
                Err(m) => {
                    errors.push((pointer, m));
                    continue;
                }
            },
        };
        obj.insert(key.clone(), value);
    }
    Value::Object(obj)
}

fn typed(schema: &Value, kind: &str, s: &str) -> Result<Value, String> {
    let enum_type = schema["type"].as_str().unwrap_or("string");
    match kind {
        "integer" => s
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("{s:?} is not a whole number")),
        "number" => s
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| format!("{s:?} is not a number")),
        "select" if enum_type == "integer" || enum_type == "number" => {
            serde_json::from_str(s).map_err(|_| format!("{s:?} is not a number"))
        }
        "list" => {
            let items = &schema["items"];
            let ik = kind_of(items);
            s.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .map(|l| typed(items, ik, l))
                .collect::<Result<Vec<_>, _>>()
                .map(Value::Array)
        }
        _ => Ok(Value::String(s.to_string())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn schema() -> Value {
        json!({
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "default": "redis", "pattern": "^[a-z]+$",
                         "description": "the service's name"},
                "mem_mb": {"type": "integer", "default": 256, "minimum": 32, "maximum": 1024},
                "cpus": {"type": "number", "default": 0.5},
                "policy": {"type": "string", "enum": ["a", "b"], "default": "b"},
                "tags": {"type": "array", "items": {"type": "string"}},
                "persistence": {"type": "object", "properties": {
                    "aof": {"type": "boolean", "default": true},
                    "disk_mb": {"type": "integer", "default": 64}
                }}
            }
        })
    }

    #[test]
    fn every_type_gets_its_input_with_defaults_and_constraints() {
        let f = fields(
            &schema(),
            &json!({}),
            &[("/mem_mb".into(), "too small".into())],
        );
        let by = |p: &str| f.iter().find(|x| x.pointer == p).unwrap().clone();
        assert_eq!(by("/name").kind, "text");
        assert!(by("/name").required);
        assert_eq!(by("/name").pattern, "[a-z]+");
        assert_eq!(by("/name").description, "the service's name");
        assert_eq!(by("/mem_mb").kind, "integer");
        assert_eq!(
            (by("/mem_mb").min.as_str(), by("/mem_mb").max.as_str()),
            ("32", "1024")
        );
        assert_eq!(by("/mem_mb").value, "256");
        assert_eq!(by("/mem_mb").error, "too small");
        assert_eq!(by("/cpus").kind, "number");
        assert_eq!(by("/policy").kind, "select");
        assert_eq!(
            by("/policy").choices,
            vec![("a".to_string(), false), ("b".to_string(), true)]
        );
        assert_eq!(by("/tags").kind, "list");
        assert_eq!(by("/persistence").kind, "section");
        assert_eq!(by("/persistence/aof").depth, 1);
        assert!(by("/persistence/aof").checked);
        assert_eq!(by("/persistence/disk_mb").value, "64");
    }

    #[test]
    fn current_values_win_over_defaults() {
        let f = fields(
            &schema(),
            &json!({"persistence": {"aof": false}, "policy": "a"}),
            &[],
        );
        let by = |p: &str| f.iter().find(|x| x.pointer == p).unwrap().clone();
        assert!(!by("/persistence/aof").checked);
        assert_eq!(by("/policy").value, "a");
    }

    #[test]
    fn a_submitted_form_becomes_typed_options() {
        let form: Vec<(String, String)> = [
            ("/name", "cache"),
            ("/mem_mb", "512"),
            ("/cpus", "1.5"),
            ("/policy", "a"),
            ("/tags", "x\n\n y \n"),
            ("/persistence/disk_mb", ""),
            ("csrf", "ignored"),
        ]
        .iter()
        .map(|(a, b)| (a.to_string(), b.to_string()))
        .collect();
        let v = collect(&schema(), &form).unwrap();
        assert_eq!(
            v,
            json!({"name": "cache", "mem_mb": 512, "cpus": 1.5, "policy": "a",
                   "tags": ["x", "y"], "persistence": {"aof": false}})
        );
    }

    #[test]
    fn inputs_of_the_wrong_type_name_their_field() {
        let form = vec![
            ("/mem_mb".to_string(), "lots".to_string()),
            ("/cpus".to_string(), "NaN".to_string()),
        ];
        let e = collect(&schema(), &form).unwrap_err();
        assert_eq!(e.len(), 2);
        assert_eq!(e[0].0, "/cpus");
        assert_eq!(e[1].0, "/mem_mb");
        assert!(e[1].1.contains("whole number"));
    }
}
