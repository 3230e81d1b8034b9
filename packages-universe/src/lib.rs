//! Cairn's package catalog and package format, pure (no IO beyond reading a folder the caller
//! names): the packages bundled in the binary (`packages/<name>/`, embedded at build time),
//! the format of one package (`Package::from_files`), options with JSON Schema defaults and
//! errors naming each option's JSON pointer (`options`), rendering to a stateful service spec
//! (`render`), and search and version choice over several sources (`catalog`).
//!
//! A package folder holds:
//! - `package.toml`: `PackageMeta` (name, version, description, tags, licence, maintainer,
//!   `[requirements]` an agent must meet);
//! - `options.schema.json`: a JSON Schema (draft 2020-12 or older) of the install options,
//!   with defaults; it must declare a string option `name` (the service's name);
//! - `service.toml.j2`: a minijinja template rendering to the stateful service spec (TOML);
//! - `config/*`: config file templates, rendered with the same options and reachable from
//!   the service template as `config("file")`;
//! - `README.md`.

pub mod catalog;
pub mod options;
pub mod render;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub use catalog::Catalog;
pub use options::{OptionError, Options};

/// The packages bundled in the binary.
static BUNDLED: include_dir::Dir<'static> =
    include_dir::include_dir!("$CARGO_MANIFEST_DIR/packages");

/// Where the bundled packages come from (`Package::source`).
pub const BUILTIN: &str = "builtin";

/// Most files in one package.
pub const MAX_FILES: usize = 64;
/// Largest file of a package.
pub const MAX_FILE_BYTES: usize = 64 * 1024;
/// Largest package (all files). Packages of added repos are kept in replicated state, so
/// this stays well below a Raft entry.
pub const MAX_PACKAGE_BYTES: usize = 256 * 1024;

/// `package.toml`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackageMeta {
    pub name: String,
    /// The package's version (`7.0.15-1`: the app's version, then the package revision).
    pub version: String,
    pub description: String,
    #[serde(default)]
    pub tags: Vec<String>,
    pub licence: String,
    pub maintainer: String,
    /// A home page or source of the app.
    pub website: Option<String>,
    #[serde(default)]
    pub requirements: Requirements,
}

/// What an agent needs to run the package.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Requirements {
    /// Absolute paths of host binaries the native tasks run (`/usr/bin/redis-server`).
    #[serde(default)]
    pub binaries: Vec<String>,
    /// Debian packages that provide them (a hint for the operator's error message).
    #[serde(default)]
    pub debian_packages: Vec<String>,
    /// OCI images that must be imported on the agent.
    #[serde(default)]
    pub images: Vec<String>,
}

/// One package: its metadata, schema, templates and readme.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Package {
    pub meta: PackageMeta,
    /// `builtin`, or the repo it was added from.
    pub source: String,
    pub schema: serde_json::Value,
    pub service_template: String,
    /// Config file templates by file name (`config/<name>`).
    pub config: BTreeMap<String, String>,
    pub readme: String,
}

/// A package that cannot be loaded: which file or field, and why.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{file}: {message}")]
pub struct FormatError {
    pub file: String,
    pub message: String,
}

fn ferr<T>(file: &str, message: impl Into<String>) -> Result<T, FormatError> {
    Err(FormatError {
        file: file.to_string(),
        message: message.into(),
    })
}

/// Names no package may take: they are paths of the packages API.
pub const RESERVED: [&str; 2] = ["installed", "repos"];

/// A package or option name: lowercase letters, digits and '-', starting with a letter.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 48
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && !name.ends_with('-')
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
}

/// A version: 1-32 of letters, digits, '.', '-', '+', '~'.
pub fn valid_version(v: &str) -> bool {
    !v.is_empty()
        && v.len() <= 32
        && v.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '+' | '~'))
}

impl Package {
    /// Builds a package from its files (paths relative to the package folder). The same
    /// checks run for bundled packages, folders added with `repo add`, and uploads.
    pub fn from_files(
        source: &str,
        files: &BTreeMap<String, Vec<u8>>,
    ) -> Result<Package, FormatError> {
        if files.len() > MAX_FILES {
            return ferr("", format!("a package has at most {MAX_FILES} files"));
        }
        let total: usize = files.values().map(Vec::len).sum();
        if total > MAX_PACKAGE_BYTES {
            return ferr(
                "",
                format!("a package is at most {} KiB", MAX_PACKAGE_BYTES / 1024),
            );
        }
        let mut text = BTreeMap::new();
        for (path, bytes) in files {
            if bytes.len() > MAX_FILE_BYTES {
                return ferr(path, format!("at most {} KiB", MAX_FILE_BYTES / 1024));
            }
            let known = matches!(
                path.as_str(),
                "package.toml" | "options.schema.json" | "service.toml.j2" | "README.md"
            ) || path
                .strip_prefix("config/")
                .is_some_and(|f| !f.is_empty() && !f.contains('/') && !f.starts_with('.'));
            if !known {
                return ferr(
                    path,
                    "unknown file: a package has package.toml, options.schema.json, \
                     service.toml.j2, README.md and config/<file>",
                );
            }
            let s = std::str::from_utf8(bytes).or_else(|_| ferr(path, "not UTF-8 text"))?;
            text.insert(path.clone(), s.to_string());
        }
        let need = |f: &str| {
            text.get(f).cloned().ok_or_else(|| FormatError {
                file: f.to_string(),
                message: "missing".into(),
            })
        };
        let meta: PackageMeta = toml::from_str(&need("package.toml")?)
            .or_else(|e| ferr("package.toml", e.message().trim()))?;
        check_meta(&meta)?;
        let schema: serde_json::Value = serde_json::from_str(&need("options.schema.json")?)
            .or_else(|e| ferr("options.schema.json", e.to_string()))?;
        options::check_schema(&schema).or_else(|m| ferr("options.schema.json", m))?;
        let service_template = need("service.toml.j2")?;
        let config: BTreeMap<String, String> = text
            .iter()
            .filter_map(|(p, s)| Some((p.strip_prefix("config/")?.to_string(), s.clone())))
            .collect();
        let pkg = Package {
            meta,
            source: source.to_string(),
            schema,
            service_template,
            config,
            readme: need("README.md")?,
        };
        render::check_templates(&pkg)?;
        Ok(pkg)
    }

    /// Reads a package folder (`package.toml`, ..., `config/*`), refusing symlinks.
    pub fn read_dir(source: &str, dir: &std::path::Path) -> Result<Package, FormatError> {
        Package::from_files(source, &read_files(dir)?)
    }

    /// One line for listings.
    pub fn summary(&self) -> serde_json::Value {
        serde_json::json!({
            "name": self.meta.name,
            "version": self.meta.version,
            "description": self.meta.description,
            "tags": self.meta.tags,
            "source": self.source,
        })
    }
}

fn check_meta(m: &PackageMeta) -> Result<(), FormatError> {
    let f = "package.toml";
    if !valid_name(&m.name) {
        return ferr(
            f,
            format!(
                "name {:?}: 1-48 lowercase letters, digits or '-', starting with a letter",
                m.name
            ),
        );
    }
    if RESERVED.contains(&m.name.as_str()) {
        return ferr(
            f,
            format!(
                "name {:?} is reserved (an API path); choose another",
                m.name
            ),
        );
    }
    if !valid_version(&m.version) {
        return ferr(
            f,
            format!(
                "version {:?}: 1-32 letters, digits, '.', '-', '+', '~'",
                m.version
            ),
        );
    }
    if m.description.is_empty() || m.description.len() > 512 {
        return ferr(f, "description: 1-512 characters");
    }
    if m.tags.len() > 16 || m.tags.iter().any(|t| !valid_name(t)) {
        return ferr(f, "tags: at most 16, each a lowercase word ('-' allowed)");
    }
    for b in &m.requirements.binaries {
        if !b.starts_with('/') || b.contains("..") || b.len() > 256 {
            return ferr(
                f,
                format!("requirements.binaries: {b:?} must be an absolute path without '..'"),
            );
        }
    }
    Ok(())
}

/// Every file of a package folder, keyed by relative path (`config/redis.conf`).
pub fn read_files(dir: &std::path::Path) -> Result<BTreeMap<String, Vec<u8>>, FormatError> {
    let mut files = BTreeMap::new();
    let d = dir.display().to_string();
    let entries = std::fs::read_dir(dir).or_else(|e| ferr(&d, e.to_string()))?;
    for e in entries {
        let e = e.or_else(|e| ferr(&d, e.to_string()))?;
        let name = e.file_name().to_string_lossy().to_string();
        let ty = e.file_type().or_else(|e| ferr(&name, e.to_string()))?;
        if name.starts_with('.') {
            continue;
        }
        if ty.is_dir() && name == "config" {
            for c in std::fs::read_dir(e.path()).or_else(|e| ferr("config", e.to_string()))? {
                let c = c.or_else(|e| ferr("config", e.to_string()))?;
                let cname = c.file_name().to_string_lossy().to_string();
                if cname.starts_with('.') {
                    continue;
                }
                let path = format!("config/{cname}");
                read_one(&mut files, &path, &c)?;
            }
        } else {
            read_one(&mut files, &name, &e)?;
        }
        if files.len() > MAX_FILES {
            return ferr(&d, format!("a package has at most {MAX_FILES} files"));
        }
    }
    Ok(files)
}

fn read_one(
    files: &mut BTreeMap<String, Vec<u8>>,
    path: &str,
    e: &std::fs::DirEntry,
) -> Result<(), FormatError> {
    let ty = e.file_type().or_else(|err| ferr(path, err.to_string()))?;
    if !ty.is_file() {
        return ferr(
            path,
            "not a regular file (symlinks and folders are refused)",
        );
    }
    let len = e.metadata().map(|m| m.len()).unwrap_or(0);
    if len > MAX_FILE_BYTES as u64 {
        return ferr(path, format!("at most {} KiB", MAX_FILE_BYTES / 1024));
    }
    let bytes = std::fs::read(e.path()).or_else(|err| ferr(path, err.to_string()))?;
    files.insert(path.to_string(), bytes);
    Ok(())
}

/// Reads a repo folder: one sub-folder per package. Fails on the first bad package, naming
/// it.
pub fn read_repo(source: &str, dir: &std::path::Path) -> Result<Vec<Package>, FormatError> {
    let d = dir.display().to_string();
    let mut names: Vec<std::path::PathBuf> = std::fs::read_dir(dir)
        .or_else(|e| ferr(&d, e.to_string()))?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.path())
        .collect();
    names.sort();
    if names.is_empty() {
        return ferr(&d, "no package folders (DIR/<name>/package.toml)");
    }
    names
        .iter()
        .map(|p| {
            Package::read_dir(source, p).map_err(|e| FormatError {
                file: format!("{}/{}", p.display(), e.file),
                message: e.message,
            })
        })
        .collect()
}

/// The agent attribute listing the bundled packages whose host binaries an agent has
/// (`cairn.packages: etcd,memcached,postgresql,redis`); package installs place pods only
/// where it names the package.
pub const PACKAGES_ATTRIBUTE: &str = "cairn.packages";

/// The names of the packages whose required binaries all exist (`exists` asks the host).
pub fn runnable(packages: &[Package], exists: impl Fn(&str) -> bool) -> Vec<String> {
    let mut out: Vec<String> = packages
        .iter()
        .filter(|p| p.meta.requirements.binaries.iter().all(|b| exists(b)))
        .map(|p| p.meta.name.clone())
        .collect();
    out.sort();
    out.dedup();
    out
}

/// The packages bundled in the binary, checked (a bad one is a build mistake: the unit test
/// `every_bundled_package_is_valid` catches it first).
pub fn bundled() -> Result<Vec<Package>, FormatError> {
    let mut out = Vec::new();
    for dir in BUNDLED.dirs() {
        let mut files = BTreeMap::new();
        collect(dir, dir.path(), &mut files);
        out.push(
            Package::from_files(BUILTIN, &files).map_err(|e| FormatError {
                file: format!("{}/{}", dir.path().display(), e.file),
                message: e.message,
            })?,
        );
    }
    Ok(out)
}

fn collect(
    dir: &include_dir::Dir<'static>,
    root: &std::path::Path,
    files: &mut BTreeMap<String, Vec<u8>>,
) {
    for f in dir.files() {
        if let Ok(rel) = f.path().strip_prefix(root) {
            files.insert(rel.to_string_lossy().to_string(), f.contents().to_vec());
        }
    }
    for d in dir.dirs() {
        collect(d, root, files);
    }
}

#[cfg(test)]
mod tests;
