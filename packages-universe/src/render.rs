//! Renders a package with resolved options into a stateful service spec (TOML text).
//!
//! Templates are minijinja with strict undefined variables (a typo in a template is an
//! error, not an empty string). The context is `options` (the resolved options) and
//! `package` (`name`, `version`, `source`). The service template reaches config file
//! templates with `config("redis.conf")`, rendered with the same context, and the filter
//! `toml` writes any value as a TOML literal (`template = {{ config("redis.conf") | toml }}`).
//! Parts meant for the agent's launch-time rendering go inside `{% raw %}...{% endraw %}`.

use crate::options::Options;
use crate::{FormatError, Package};
use minijinja::{Environment, Error, ErrorKind, UndefinedBehavior, Value};

const SERVICE: &str = "service.toml.j2";

fn describe(file: &str, e: &Error) -> FormatError {
    let mut message = match e.line() {
        Some(l) => format!("line {l}: {}", e.kind()),
        None => e.kind().to_string(),
    };
    if let Some(d) = e.detail() {
        message += &format!(": {d}");
    }
    // Errors raised inside `config(...)` carry the config file's own error as the source.
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        message += &format!(" ({s})");
        src = s.source();
    }
    FormatError {
        file: e.name().unwrap_or(file).to_string(),
        message,
    }
}

fn env(pkg: &Package) -> Environment<'static> {
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    if let Ok(syntax) = minijinja::syntax::SyntaxConfig::builder()
        .keep_trailing_newline(true)
        .build()
    {
        env.set_syntax(syntax);
    }
    env.add_filter("toml", to_toml);
    for (name, text) in &pkg.config {
        // Names are checked file names; templates were compiled by `check_templates`.
        let _ = env.add_template_owned(format!("config/{name}"), text.clone());
    }
    let _ = env.add_template_owned(SERVICE, pkg.service_template.clone());
    env
}

/// A value as a TOML literal on one line: strings quoted and escaped (JSON's escapes are
/// TOML's), arrays and tables inline.
fn to_toml(v: Value) -> Result<String, Error> {
    let json = serde_json::to_value(&v)
        .map_err(|e| Error::new(ErrorKind::InvalidOperation, e.to_string()))?;
    fn plain(j: &serde_json::Value) -> bool {
        match j {
            serde_json::Value::Null | serde_json::Value::Object(_) => false,
            serde_json::Value::Array(a) => a.iter().all(plain),
            _ => true,
        }
    }
    if plain(&json) {
        return Ok(json.to_string());
    }
    let t: toml::Value = serde_json::from_value(json).map_err(|e| {
        Error::new(
            ErrorKind::InvalidOperation,
            format!("cannot write {v} as TOML: {e}"),
        )
    })?;
    Ok(t.to_string())
}

/// Compiles every template of a package (syntax errors name the file and line).
pub fn check_templates(pkg: &Package) -> Result<(), FormatError> {
    let mut env = Environment::new();
    env.add_filter("toml", to_toml);
    env.add_template(SERVICE, &pkg.service_template)
        .map_err(|e| describe(SERVICE, &e))?;
    for (name, text) in &pkg.config {
        let file = format!("config/{name}");
        env.add_template_owned(file.clone(), text.clone())
            .map_err(|e| describe(&file, &e))?;
    }
    Ok(())
}

/// Renders the package's service spec with resolved options.
pub fn render(pkg: &Package, options: &Options) -> Result<String, FormatError> {
    let mut env = env(pkg);
    let ctx = minijinja::context! {
        options => Value::from(minijinja::value::Serde(&options.0)),
        package => minijinja::context! {
            name => pkg.meta.name.clone(),
            version => pkg.meta.version.clone(),
            source => pkg.source.clone(),
        },
    };
    let inner = env.clone();
    let cctx = ctx.clone();
    env.add_function("config", move |name: String| -> Result<String, Error> {
        let t = inner.get_template(&format!("config/{name}")).map_err(|_| {
            Error::new(
                ErrorKind::TemplateNotFound,
                format!("config({name:?}): the package has no config/{name}"),
            )
        })?;
        t.render(&cctx)
    });
    let t = env
        .get_template(SERVICE)
        .map_err(|e| describe(SERVICE, &e))?;
    t.render(&ctx).map_err(|e| describe(SERVICE, &e))
}
