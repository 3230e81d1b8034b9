//! Package routes (`/api/v1/packages`): search and describe the catalog (the packages bundled
//! in the binary, then those of added repos), render a package with options (a dry run),
//! install it as a stateful service, list the installed ones, update their options or
//! version, uninstall them; add, list and remove repos.
//!
//! Installing goes through the same code path as `POST /api/v1/services` (`services::create`)
//! with the spec rendered from the package; the spec carries a `PackageRef` (name, version,
//! source, full options), so the service's history records which options made each version.
//! Added repos are replicated: one KV entry per repo under `_cairn/package-repos/`, so every
//! master serves the same catalog and a leader change loses nothing (as DC/OS keeps its
//! repo list in the cluster, not in one client's config).

use super::services::{self, check_name, with_service};
use super::{query, with_index, Ctx, ReadParams};
use crate::error::{ApiError, JsonBody};
use crate::service::{PackageRef, StatefulService};
use crate::state::Command;
use axum::extract::{Path, Query};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use cairn_universe::options::{merge_options, OptionError, Options, MAX_OPTIONS_BYTES};
use cairn_universe::{Catalog, Package};
use serde::Deserialize;
use serde_json::{json, Value};
use std::collections::BTreeMap;

type Q<T> = Result<Query<T>, axum::extract::rejection::QueryRejection>;

/// KV prefix of added repos (`_cairn/package-repos/<repo>`: JSON `{"packages": {...}}`).
pub const REPO_PREFIX: &str = "_cairn/package-repos/";
/// Largest repo (all its packages' files, as stored).
pub const MAX_REPO_BYTES: usize = 256 * 1024;

/// The bundled packages, loaded once. They are checked by the universe crate's tests; a bad
/// one is logged and left out rather than taking the API down.
fn bundled() -> &'static [Package] {
    static BUNDLED: std::sync::OnceLock<Vec<Package>> = std::sync::OnceLock::new();
    BUNDLED.get_or_init(|| {
        cairn_universe::bundled().unwrap_or_else(|e| {
            tracing::error!("bundled packages: {e}");
            Vec::new()
        })
    })
}

/// Files of each package of a stored repo.
#[derive(Debug, serde::Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RepoBody {
    packages: BTreeMap<String, BTreeMap<String, String>>,
}

fn repo_packages(repo: &str, body: &RepoBody) -> Result<Vec<Package>, ApiError> {
    body.packages
        .iter()
        .map(|(name, files)| {
            let bytes = files
                .iter()
                .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
                .collect();
            let p = Package::from_files(repo, &bytes).map_err(|e| {
                ApiError::bad_request(
                    &format!("packages.{name}"),
                    format!("package {name:?}: {e}"),
                )
            })?;
            if &p.meta.name != name {
                return Err(ApiError::bad_request(
                    &format!("packages.{name}"),
                    format!("the folder {name:?} holds package {:?}", p.meta.name),
                ));
            }
            Ok(p)
        })
        .collect()
}

/// The catalog as of this master's state: bundled packages, then repos in the order added.
fn catalog(ctx: &Ctx) -> Catalog {
    let mut repos: Vec<(u64, String, String)> = ctx.read(|s| {
        s.kv.range(REPO_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(REPO_PREFIX))
            .map(|(k, e)| {
                (
                    e.create_index,
                    k[REPO_PREFIX.len()..].to_string(),
                    e.value.clone(),
                )
            })
            .collect()
    });
    repos.sort();
    let mut c = Catalog::new(bundled().to_vec());
    for (_, repo, value) in repos {
        match serde_json::from_str::<RepoBody>(&value)
            .map_err(|e| e.to_string())
            .and_then(|b| repo_packages(&repo, &b).map_err(|e| e.message))
        {
            Ok(ps) => c.extend(ps),
            Err(e) => tracing::warn!("package repo {repo:?} is left out: {e}"),
        }
    }
    c
}

/// A read barrier (unless `stale`), then the catalog.
async fn fresh_catalog(ctx: &Ctx, stale: bool) -> Result<(u64, Catalog), ApiError> {
    let p = ReadParams {
        stale: Some(stale),
        ..Default::default()
    };
    let index = ctx.prepare_read(&p, |s| s.indexes.kv).await?;
    Ok((index, catalog(ctx)))
}

fn no_package(c: &Catalog, name: &str, version: Option<&str>) -> ApiError {
    let versions: Vec<&str> = c
        .versions(name)
        .iter()
        .map(|p| p.meta.version.as_str())
        .collect();
    let msg = match version {
        Some(v) if !versions.is_empty() => {
            format!("package {name:?} has no version {v:?}; it has {versions:?}")
        }
        _ => format!("no package {name:?}; search with GET /api/v1/packages?q="),
    };
    ApiError::not_found(msg).field(if version.is_some() && !versions.is_empty() {
        "version"
    } else {
        "name"
    })
}

fn check_package_name(name: &str) -> Result<(), ApiError> {
    if cairn_universe::valid_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad_request(
            "name",
            format!("package {name:?}: 1-48 lowercase letters, digits or '-'"),
        ))
    }
}

fn check_version(v: &Option<String>) -> Result<(), ApiError> {
    match v {
        Some(v) if !cairn_universe::valid_version(v) => Err(ApiError::bad_request(
            "version",
            format!("version {v:?}: 1-32 letters, digits, '.', '-', '+', '~'"),
        )),
        _ => Ok(()),
    }
}

/// Bad options: 400 naming the first option's pointer, every problem in the message.
fn options_error(pkg: &Package, errs: Vec<OptionError>) -> ApiError {
    let field = errs.first().map(|e| e.pointer.clone()).unwrap_or_default();
    let all: Vec<String> = errs.iter().map(|e| e.to_string()).collect();
    ApiError::new(
        StatusCode::BAD_REQUEST,
        "invalid_option",
        format!(
            "package {} {}: {}",
            pkg.meta.name,
            pkg.meta.version,
            all.join("; ")
        ),
    )
    .field(if field.is_empty() { "/".into() } else { field })
    .errors(
        errs.into_iter()
            .map(|e| crate::error::FieldError {
                field: if e.pointer.is_empty() {
                    "/".into()
                } else {
                    e.pointer
                },
                message: e.message,
            })
            .collect(),
    )
}

/// Options → resolved options, the spec text and the validated service (with its
/// `PackageRef`). Nothing is changed.
fn render(pkg: &Package, user: &Value) -> Result<(Options, String, StatefulService), ApiError> {
    let size = serde_json::to_vec(user).map(|v| v.len()).unwrap_or(0);
    if size > MAX_OPTIONS_BYTES {
        return Err(ApiError::bad_request(
            "options",
            format!("options are at most {} KiB", MAX_OPTIONS_BYTES / 1024),
        ));
    }
    let o = Options::resolve(&pkg.schema, user).map_err(|e| options_error(pkg, e))?;
    let label = format!("package {} {}", pkg.meta.name, pkg.meta.version);
    let text = cairn_universe::render::render(pkg, &o).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "render_failed",
            format!("{label}: {e}"),
        )
    })?;
    let mut service = crate::service::spec::from_toml(&text)
        .and_then(|s| s.validate())
        .map_err(|e| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                "invalid_spec",
                format!(
                    "{label} rendered a spec the service API refuses at {}: {} (check the options; \
                     see the spec with POST /api/v1/packages/{}/render)",
                    e.field, e.message, pkg.meta.name
                ),
            )
            .field(format!("spec.{}", e.field))
        })?;
    // A bundled package's pods go only to agents that have its binaries (they list it in
    // their `cairn.packages` attribute); a repo's packages are not known to agents.
    if pkg.source == cairn_universe::BUILTIN && !pkg.meta.requirements.binaries.is_empty() {
        let only = crate::scheduler::Constraint {
            field: cairn_universe::PACKAGES_ATTRIBUTE.to_string(),
            op: crate::scheduler::ConstraintOp::Like,
            value: Some(format!("(.*,)?{}(,.*)?", regex::escape(&pkg.meta.name))),
        };
        for t in &mut service.pod_types {
            if !t.constraints.contains(&only) {
                t.constraints.push(only.clone());
            }
        }
    }
    // The options go where config templates see them at launch (`options`).
    service.options = o.0.to_string();
    service.package = Some(PackageRef {
        name: pkg.meta.name.clone(),
        version: pkg.meta.version.clone(),
        source: pkg.source.clone(),
    });
    Ok((o, text, service))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct SearchParams {
    q: Option<String>,
    tag: Option<String>,
    stale: Option<bool>,
}

pub(super) async fn search(ctx: Ctx, q: Q<SearchParams>) -> Result<Response, ApiError> {
    let p = query(q)?;
    let text = p.q.unwrap_or_default();
    if text.len() > 128 {
        return Err(ApiError::bad_request("q", "q is at most 128 characters"));
    }
    if let Some(t) = &p.tag {
        if !cairn_universe::valid_name(t) {
            return Err(ApiError::bad_request(
                "tag",
                format!("tag {t:?}: a lowercase word ('-' allowed)"),
            ));
        }
    }
    let (index, c) = fresh_catalog(&ctx, p.stale.unwrap_or(false)).await?;
    let found: Vec<Value> = c
        .search(&text, p.tag.as_deref())
        .iter()
        .map(|p| p.summary())
        .collect();
    Ok(with_index(index, found))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct DescribeParams {
    version: Option<String>,
    stale: Option<bool>,
}

/// Metadata, every version, the options schema with its defaults, templates and README.
pub(super) async fn describe(
    ctx: Ctx,
    Path(name): Path<String>,
    q: Q<DescribeParams>,
) -> Result<Response, ApiError> {
    check_package_name(&name)?;
    let p = query(q)?;
    check_version(&p.version)?;
    let (index, c) = fresh_catalog(&ctx, p.stale.unwrap_or(false)).await?;
    let pkg = c
        .get(&name, p.version.as_deref())
        .ok_or_else(|| no_package(&c, &name, p.version.as_deref()))?;
    let versions: Vec<Value> = c
        .versions(&name)
        .iter()
        .map(|v| json!({ "version": v.meta.version, "source": v.source }))
        .collect();
    let mut templates = BTreeMap::new();
    templates.insert("service.toml.j2".to_string(), pkg.service_template.clone());
    for (f, t) in &pkg.config {
        templates.insert(format!("config/{f}"), t.clone());
    }
    Ok(with_index(
        index,
        json!({
            "name": pkg.meta.name,
            "version": pkg.meta.version,
            "source": pkg.source,
            "versions": versions,
            "description": pkg.meta.description,
            "tags": pkg.meta.tags,
            "licence": pkg.meta.licence,
            "maintainer": pkg.meta.maintainer,
            "website": pkg.meta.website,
            "requirements": pkg.meta.requirements,
            "schema": pkg.schema,
            "defaults": cairn_universe::options::defaults(&pkg.schema),
            "templates": templates,
            "readme": pkg.readme,
        }),
    ))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct InstallBody {
    #[serde(default)]
    options: Value,
    version: Option<String>,
}

fn pick<'a>(c: &'a Catalog, name: &str, version: &Option<String>) -> Result<&'a Package, ApiError> {
    check_version(version)?;
    c.get(name, version.as_deref())
        .ok_or_else(|| no_package(c, name, version.as_deref()))
}

/// The spec a package renders with these options, and the options with defaults. A dry run.
pub(super) async fn render_package(
    ctx: Ctx,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<InstallBody>,
) -> Result<Response, ApiError> {
    check_package_name(&name)?;
    let (index, c) = fresh_catalog(&ctx, false).await?;
    let pkg = pick(&c, &name, &b.version)?;
    let (o, text, service) = render(pkg, &b.options)?;
    Ok(with_index(
        index,
        json!({
            "package": pkg.meta.name,
            "version": pkg.meta.version,
            "options": o.0,
            "spec": text,
            "service": service,
        }),
    ))
}

/// Renders and creates the service (`services::create`, as `POST /api/v1/services`).
/// A bundled package needs an active agent that has its binaries (`cairn.packages`), or the
/// install is refused saying what to put on an agent.
fn can_run(ctx: &Ctx, pkg: &Package) -> Result<(), ApiError> {
    let req = &pkg.meta.requirements;
    if pkg.source != cairn_universe::BUILTIN || req.binaries.is_empty() {
        return Ok(());
    }
    let name = &pkg.meta.name;
    let (active, able) = ctx.read(|s| {
        let active: Vec<&crate::model::Agent> = s
            .agents
            .values()
            .filter(|a| a.status == crate::model::AgentStatus::Active)
            .collect();
        let able = active
            .iter()
            .filter(|a| {
                a.attributes
                    .get(cairn_universe::PACKAGES_ATTRIBUTE)
                    .is_some_and(|v| v.split(',').any(|p| p == name))
            })
            .count();
        (active.len(), able)
    });
    if able > 0 {
        return Ok(());
    }
    Err(ApiError::bad_request(
        "agents",
        format!(
            "no agent can run package {name}: none of the {active} active agent(s) has {} \
             (Debian: apt-get install {}); install them on an agent and restart it",
            req.binaries.join(", "),
            req.debian_packages.join(" ")
        ),
    ))
}

pub(super) async fn install(
    ctx: Ctx,
    Path(name): Path<String>,
    JsonBody(b): JsonBody<InstallBody>,
) -> Result<Response, ApiError> {
    check_package_name(&name)?;
    let (_, c) = fresh_catalog(&ctx, false).await?;
    let pkg = pick(&c, &name, &b.version)?;
    let (_, _, service) = render(pkg, &b.options)?;
    let svc = service.name.clone();
    can_run(&ctx, pkg)?;
    if let Err(why) = ctx.read(|s| crate::service::driver::check_fits(s, &service)) {
        return Err(ApiError::bad_request(
            "agents",
            format!(
                "package {name} cannot run on this cluster: {why}; add agents, or change the \
                 options (fewer pods, less cpus/mem/disk, no spread)"
            ),
        ));
    }
    services::create(&ctx, service).await.map_err(|e| {
        if e.code == "conflict" {
            ApiError::new(
                StatusCode::CONFLICT,
                "conflict",
                format!(
                    "a service {svc:?} exists: update it (cairn package update {svc}) or install \
                     under another name (--set name=...)"
                ),
            )
            .field("/name")
        } else {
            e
        }
    })
}

/// One line per installed package (a service whose spec came from a package).
fn instance(svc: &crate::service::ServiceState) -> Option<Value> {
    let p = svc.spec.package.as_ref()?;
    Some(json!({
        "service": svc.spec.name,
        "package": p.name,
        "version": p.version,
        "source": p.source,
        "options": svc.spec.options_value(),
        "service_version": svc.version,
        "updated_at": svc.updated_at,
        "plans": svc.plans.iter().map(|(n, p)| (n.clone(), p.status())).collect::<BTreeMap<_, _>>(),
    }))
}

pub(super) async fn list_installed(ctx: Ctx, q: Q<ReadParams>) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.services).await?;
    let all: Vec<Value> = ctx.read(|s| s.services.values().filter_map(instance).collect());
    Ok(with_index(index, all))
}

fn package_of(ctx: &Ctx, service: &str) -> Result<PackageRef, ApiError> {
    with_service(ctx, service, |_, svc| svc.spec.package.clone())?.ok_or_else(|| {
        ApiError::new(
            StatusCode::CONFLICT,
            "not_a_package",
            format!(
                "service {service:?} was not installed from a package (or was since updated \
                 with a hand-written spec); manage it with cairn service"
            ),
        )
        .field("service")
    })
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UpdateBody {
    /// Merged over the options in use (or over the defaults with `reset`).
    #[serde(default)]
    options: Value,
    /// Another version of the package (an upgrade or downgrade); default: the one installed.
    version: Option<String>,
    #[serde(default)]
    reset: bool,
    #[serde(default)]
    allow_decommission: bool,
}

/// New options and/or version → the spec rendered anew → `services::update` (deploy plan).
pub(super) async fn update(
    ctx: Ctx,
    Path(service): Path<String>,
    JsonBody(b): JsonBody<UpdateBody>,
) -> Result<Response, ApiError> {
    check_name("service", &service)?;
    let (_, c) = fresh_catalog(&ctx, false).await?;
    let current = package_of(&ctx, &service)?;
    let in_use = with_service(&ctx, &service, |_, svc| svc.spec.options_value())?;
    let version = b.version.clone().or(Some(current.version.clone()));
    let pkg = pick(&c, &current.name, &version)?;
    let mut options = if b.reset { json!({}) } else { in_use };
    if !b.options.is_object() && !b.options.is_null() {
        return Err(ApiError::bad_request(
            "options",
            "options are a JSON object",
        ));
    }
    merge_options(&mut options, &b.options);
    options["name"] = json!(service);
    if b.options.get("name").is_some_and(|n| n != &json!(service)) {
        return Err(ApiError::bad_request(
            "/name",
            "the name of an installed service cannot change; install a new one instead",
        ));
    }
    let (_, _, spec) = render(pkg, &options)?;
    services::update(&ctx, spec, b.allow_decommission).await
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct UninstallParams {
    keep_volumes: Option<bool>,
}

/// Removes a package's service: its tasks are killed and (unless `keep_volumes`) its
/// volumes destroyed.
pub(super) async fn uninstall(
    ctx: Ctx,
    Path(service): Path<String>,
    q: Q<UninstallParams>,
) -> Result<Response, ApiError> {
    check_name("service", &service)?;
    let p = query(q)?;
    package_of(&ctx, &service)?;
    services::remove(&ctx, service, p.keep_volumes.unwrap_or(false)).await
}

pub(super) async fn list_repos(ctx: Ctx, q: Q<ReadParams>) -> Result<Response, ApiError> {
    let p = query(q)?;
    let index = ctx.prepare_read(&p, |s| s.indexes.kv).await?;
    let c = catalog(&ctx);
    let repos: Vec<(u64, String)> = ctx.read(|s| {
        s.kv.range(REPO_PREFIX.to_string()..)
            .take_while(|(k, _)| k.starts_with(REPO_PREFIX))
            .map(|(k, e)| (e.create_index, k[REPO_PREFIX.len()..].to_string()))
            .collect()
    });
    let mut repos = repos;
    repos.sort();
    let mut out = vec![
        json!({ "name": cairn_universe::BUILTIN, "packages": names(&c, cairn_universe::BUILTIN) }),
    ];
    for (i, r) in repos {
        out.push(json!({ "name": r, "added_index": i, "packages": names(&c, &r) }));
    }
    Ok(with_index(index, out))
}

fn names(c: &Catalog, source: &str) -> Vec<String> {
    c.search("", None)
        .iter()
        .flat_map(|p| c.versions(&p.meta.name))
        .filter(|p| p.source == source)
        .map(|p| format!("{}@{}", p.meta.name, p.meta.version))
        .collect()
}

fn check_repo_name(repo: &str) -> Result<(), ApiError> {
    if !cairn_universe::valid_name(repo) || repo == cairn_universe::BUILTIN {
        return Err(ApiError::bad_request(
            "repo",
            format!("repo {repo:?}: 1-48 lowercase letters, digits or '-', not \"builtin\""),
        ));
    }
    Ok(())
}

/// Adds (or replaces) a repo: every package is checked (format, schema, defaults render to
/// a valid spec) before the repo is stored, in one KV write.
pub(super) async fn put_repo(
    ctx: Ctx,
    Path(repo): Path<String>,
    JsonBody(b): JsonBody<RepoBody>,
) -> Result<Response, ApiError> {
    check_repo_name(&repo)?;
    if b.packages.is_empty() || b.packages.len() > 256 {
        return Err(ApiError::bad_request(
            "packages",
            "a repo has 1-256 packages",
        ));
    }
    let value = serde_json::to_string(&b).unwrap_or_default();
    if value.len() > MAX_REPO_BYTES {
        return Err(ApiError::bad_request(
            "packages",
            format!("a repo is at most {} KiB of files", MAX_REPO_BYTES / 1024),
        ));
    }
    let packages = repo_packages(&repo, &b)?;
    for p in &packages {
        render(p, &json!({})).map_err(|e| {
            ApiError::bad_request(
                &format!("packages.{}", p.meta.name),
                format!("with default options: {}", e.message),
            )
        })?;
    }
    let out = ctx
        .propose(Command::KvPut {
            key: format!("{REPO_PREFIX}{repo}"),
            value,
            cas: None,
        })
        .await?;
    let index = match out {
        crate::state::Outcome::Kv(e) => e.modify_index,
        _ => 0,
    };
    let names: Vec<String> = packages
        .iter()
        .map(|p| format!("{}@{}", p.meta.name, p.meta.version))
        .collect();
    Ok((
        StatusCode::CREATED,
        with_index(index, json!({ "name": repo, "packages": names })),
    )
        .into_response())
}

pub(super) async fn delete_repo(ctx: Ctx, Path(repo): Path<String>) -> Result<Response, ApiError> {
    check_repo_name(&repo)?;
    let key = format!("{REPO_PREFIX}{repo}");
    if !ctx.read(|s| s.kv.contains_key(&key)) {
        return Err(ApiError::not_found(format!("no package repo {repo:?}")).field("repo"));
    }
    ctx.propose(Command::KvDelete { key }).await?;
    Ok(with_index(0, json!({ "name": repo })))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct RollbackBody {
    /// The service version to go back to (default: the one before the current).
    to: Option<u64>,
    #[serde(default)]
    allow_decommission: bool,
}

/// Puts back the spec (package version and options) of an earlier service version, as a new
/// version rolled out by the deploy plan (like `helm rollback`).
pub(super) async fn rollback(
    ctx: Ctx,
    Path(service): Path<String>,
    JsonBody(b): JsonBody<RollbackBody>,
) -> Result<Response, ApiError> {
    check_name("service", &service)?;
    package_of(&ctx, &service)?;
    let history = with_service(&ctx, &service, |_, svc| svc.history.clone())?;
    let kept: Vec<u64> = history.iter().map(|h| h.version).collect();
    let target = match b.to {
        Some(v) => history.iter().find(|h| h.version == v),
        None if history.len() >= 2 => history.get(history.len() - 2),
        None => None,
    }
    .ok_or_else(|| {
        ApiError::bad_request(
            "to",
            format!("service {service:?} keeps versions {kept:?}; name one of them (not the last)"),
        )
    })?;
    if target.spec.package.is_none() {
        return Err(ApiError::bad_request(
            "to",
            format!(
                "version {} of {service:?} was a hand-written spec; roll it back with cairn service",
                target.version
            ),
        ));
    }
    services::update(&ctx, target.spec.clone(), b.allow_decommission).await
}
