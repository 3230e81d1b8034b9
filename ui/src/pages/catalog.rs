//! The catalog: package cards with search, a package's README, and the install (or update)
//! form generated from its options schema, with a review of the rendered service before
//! anything is installed.

use super::{back, failure_page};
use crate::backend::{enc, ApiFailure};
use crate::form::{self, Field};
use crate::view::{markdown, render, text, Layout};
use crate::{Posted, Sess, St, Ui};
use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde::Deserialize;
use serde_json::{json, Value};
use std::sync::Arc;

pub(super) fn routes() -> Router<Arc<Ui>> {
    Router::new()
        .route("/ui/catalog", get(catalog))
        .route("/ui/catalog/{name}", get(package))
        .route(
            "/ui/catalog/{name}/install",
            get(install_form).post(install),
        )
        .route("/ui/services/{name}/options", get(update_form).post(update))
}

struct Card {
    name: String,
    version: String,
    description: String,
    tags: Vec<String>,
}

#[derive(Template)]
#[template(path = "catalog.html")]
struct CatalogPage {
    l: Layout,
    q: String,
    cards: Vec<Card>,
}

#[derive(Deserialize)]
struct SearchParam {
    q: Option<String>,
}

async fn catalog(State(ui): St, Sess(s): Sess, Query(q): Query<SearchParam>) -> Response {
    let q = q.q.unwrap_or_default();
    let l = Layout::new("Catalog", "catalog", &s);
    let path = if q.trim().is_empty() {
        "/api/v1/packages".to_string()
    } else {
        format!("/api/v1/packages?q={}", enc(q.trim()))
    };
    match ui.backend.get(&s.token, &path).await {
        Ok(v) => render(&CatalogPage {
            cards: v
                .as_array()
                .map(|a| {
                    a.iter()
                        .map(|p| Card {
                            name: text(&p["name"]),
                            version: text(&p["version"]),
                            description: text(&p["description"]),
                            tags: p["tags"]
                                .as_array()
                                .map(|t| t.iter().map(text).collect())
                                .unwrap_or_default(),
                        })
                        .collect()
                })
                .unwrap_or_default(),
            q,
            l,
        }),
        Err(e) => failure_page(l, &e),
    }
}

#[derive(Template)]
#[template(path = "package.html")]
struct PackagePage {
    l: Layout,
    name: String,
    version: String,
    description: String,
    licence: String,
    maintainer: String,
    requirements: String,
    readme: String,
}

async fn package(State(ui): St, Sess(s): Sess, Path(name): Path<String>) -> Response {
    let l = Layout::new(format!("Package {name}"), "catalog", &s);
    match ui
        .backend
        .get(&s.token, &format!("/api/v1/packages/{}", enc(&name)))
        .await
    {
        Ok(p) => render(&PackagePage {
            name: text(&p["name"]),
            version: text(&p["version"]),
            description: text(&p["description"]),
            licence: text(&p["licence"]),
            maintainer: text(&p["maintainer"]),
            requirements: if p["requirements"].is_null() {
                String::new()
            } else {
                serde_json::to_string(&p["requirements"]).unwrap_or_default()
            },
            readme: markdown(p["readme"].as_str().unwrap_or("")),
            l,
        }),
        Err(e) => failure_page(l, &e),
    }
}

/// The install or update form.
#[derive(Template)]
#[template(path = "install.html")]
struct InstallPage {
    l: Layout,
    package: String,
    version: String,
    /// Where the form posts.
    action: String,
    /// `install` or `update`.
    mode: &'static str,
    fields: Vec<Field>,
    json: String,
    error: String,
}

/// The review of what would be installed or changed.
#[derive(Template)]
#[template(path = "review.html")]
struct ReviewPage {
    l: Layout,
    package: String,
    version: String,
    action: String,
    mode: &'static str,
    service: String,
    options: String,
    spec: String,
}

async fn describe(ui: &Ui, token: &str, name: &str) -> Result<Value, ApiFailure> {
    ui.backend
        .get(token, &format!("/api/v1/packages/{}", enc(name)))
        .await
}

async fn install_form(State(ui): St, Sess(s): Sess, Path(name): Path<String>) -> Response {
    let l = Layout::new(format!("Install {name}"), "catalog", &s);
    let p = match describe(&ui, &s.token, &name).await {
        Ok(p) => p,
        Err(e) => return failure_page(l, &e),
    };
    render(&InstallPage {
        package: text(&p["name"]),
        version: text(&p["version"]),
        action: format!("/ui/catalog/{}/install", enc(&name)),
        mode: "install",
        fields: form::fields(&p["schema"], &p["defaults"], &[]),
        json: serde_json::to_string_pretty(&p["defaults"]).unwrap_or_default(),
        error: String::new(),
        l,
    })
}

/// The options a posted form carries: the JSON editor's text when that tab was used, else
/// the generated inputs typed by the schema.
fn posted_options(p: &Posted, schema: &Value) -> Result<Value, (String, Vec<(String, String)>)> {
    if p.get("editor") == Some("json") {
        let raw = p.get("options_json").unwrap_or("");
        return serde_json::from_str(raw).map_err(|e| {
            (
                format!("The options are not valid JSON: {e}"),
                vec![("options_json".to_string(), e.to_string())],
            )
        });
    }
    form::collect(schema, &p.form).map_err(|errs| ("Some options need fixing.".to_string(), errs))
}

/// Steps of both flows: `review` renders (a dry run) and shows the result; `confirm` sends
/// the reviewed options (carried as JSON in the review page) to the API.
async fn flow(
    ui: &Ui,
    p: Posted,
    name: &str,
    mode: &'static str,
    service: Option<&str>,
) -> Response {
    let title = match service {
        Some(svc) => format!("Update {svc}"),
        None => format!("Install {name}"),
    };
    let l = Layout::new(
        &title,
        if service.is_some() {
            "services"
        } else {
            "catalog"
        },
        &p.sess,
    );
    let pkg = match describe(ui, &p.sess.token, name).await {
        Ok(pkg) => pkg,
        Err(e) => return failure_page(l, &e),
    };
    let action = match service {
        Some(svc) => format!("/ui/services/{}/options", enc(svc)),
        None => format!("/ui/catalog/{}/install", enc(name)),
    };
    let schema = &pkg["schema"];
    let form_again = |l: Layout, values: &Value, error: String, errs: &[(String, String)]| {
        let page = InstallPage {
            package: text(&pkg["name"]),
            version: text(&pkg["version"]),
            action: action.clone(),
            mode,
            fields: form::fields(schema, values, errs),
            json: serde_json::to_string_pretty(values).unwrap_or_default(),
            error,
            l,
        };
        (StatusCode::BAD_REQUEST, render(&page)).into_response()
    };
    if p.get("step") == Some("confirm") {
        let options: Value =
            serde_json::from_str(p.get("options_json").unwrap_or("{}")).unwrap_or(json!({}));
        let r = match service {
            Some(svc) => {
                ui.backend
                    .json(
                        &p.sess.token,
                        Method::PUT,
                        &format!("/api/v1/packages/installed/{}", enc(svc)),
                        Some(json!({ "options": options })),
                    )
                    .await
            }
            None => {
                ui.backend
                    .json(
                        &p.sess.token,
                        Method::POST,
                        &format!("/api/v1/packages/{}/install", enc(name)),
                        Some(json!({ "options": options })),
                    )
                    .await
            }
        };
        return match r {
            Ok(v) => {
                let svc = service
                    .map(str::to_string)
                    .or_else(|| v["name"].as_str().map(str::to_string))
                    .or_else(|| v["service"].as_str().map(str::to_string))
                    .unwrap_or_else(|| text(&options["name"]));
                back(&format!("/ui/services/{}", enc(&svc)))
            }
            Err(e) => {
                let errs = field_errors(&e);
                form_again(l, &options, e.message.clone(), &errs)
            }
        };
    }
    // Review: a dry run through the API's render, which validates every option.
    let options = match posted_options(&p, schema) {
        Ok(o) => o,
        Err((msg, errs)) => {
            let values = form::collect(schema, &p.form).unwrap_or_else(|_| submitted_raw(&p));
            return form_again(l, &values, msg, &errs);
        }
    };
    let r = ui
        .backend
        .json(
            &p.sess.token,
            Method::POST,
            &format!("/api/v1/packages/{}/render", enc(name)),
            Some(json!({ "options": options })),
        )
        .await;
    match r {
        Ok(v) => render(&ReviewPage {
            package: text(&pkg["name"]),
            version: text(&pkg["version"]),
            action,
            mode,
            service: text(&v["service"]["name"]),
            options: serde_json::to_string(&v["options"]).unwrap_or_default(),
            spec: text(&v["spec"]),
            l,
        }),
        Err(e) => {
            let errs = field_errors(&e);
            form_again(l, &options, e.message.clone(), &errs)
        }
    }
}

/// What the user typed, as strings, for a form shown again after a type error.
fn submitted_raw(p: &Posted) -> Value {
    let mut root = json!({});
    for (k, v) in &p.form {
        if !k.starts_with('/') {
            continue;
        }
        let parts: Vec<String> = k[1..]
            .split('/')
            .map(|s| s.replace("~1", "/").replace("~0", "~"))
            .collect();
        let mut cur = &mut root;
        for (i, part) in parts.iter().enumerate() {
            if i + 1 == parts.len() {
                cur[part.as_str()] = Value::String(v.clone());
            } else {
                if !cur[part.as_str()].is_object() {
                    cur[part.as_str()] = json!({});
                }
                cur = &mut cur[part.as_str()];
            }
        }
    }
    root
}

/// The API's per-field errors (JSON pointers), or its one field.
fn field_errors(e: &ApiFailure) -> Vec<(String, String)> {
    if !e.errors.is_empty() {
        return e.errors.clone();
    }
    match &e.field {
        Some(f) => vec![(f.clone(), e.message.clone())],
        None => vec![],
    }
}

async fn install(State(ui): St, Path(name): Path<String>, p: Posted) -> Response {
    flow(&ui, p, &name, "install", None).await
}

async fn update_form(State(ui): St, Sess(s): Sess, Path(svc): Path<String>) -> Response {
    let l = Layout::new(format!("Update {svc}"), "services", &s);
    let installed = match ui.backend.get(&s.token, "/api/v1/packages/installed").await {
        Ok(v) => v,
        Err(e) => return failure_page(l, &e),
    };
    let Some(inst) = installed
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|i| i["service"].as_str() == Some(svc.as_str()))
        })
        .cloned()
    else {
        return failure_page(
            l,
            &ApiFailure {
                status: 404,
                message: format!(
                    "service {svc} was not installed from the catalog: update it with \
                     cairn service update"
                ),
                ..Default::default()
            },
        );
    };
    let name = text(&inst["package"]);
    let pkg = match describe(&ui, &s.token, &name).await {
        Ok(p) => p,
        Err(e) => return failure_page(l, &e),
    };
    render(&InstallPage {
        package: name,
        version: text(&inst["version"]),
        action: format!("/ui/services/{}/options", enc(&svc)),
        mode: "update",
        fields: form::fields(&pkg["schema"], &inst["options"], &[]),
        json: serde_json::to_string_pretty(&inst["options"]).unwrap_or_default(),
        error: String::new(),
        l,
    })
}

async fn update(State(ui): St, Path(svc): Path<String>, p: Posted) -> Response {
    let installed = ui
        .backend
        .get(&p.sess.token, "/api/v1/packages/installed")
        .await
        .unwrap_or_default();
    let name = installed
        .as_array()
        .and_then(|a| {
            a.iter()
                .find(|i| i["service"].as_str() == Some(svc.as_str()))
        })
        .map(|i| text(&i["package"]))
        .unwrap_or_default();
    flow(&ui, p, &name, "update", Some(&svc)).await
}
