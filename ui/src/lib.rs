//! Cairn's web UI: server-rendered pages (askama) served by every master under `/ui/`,
//! reading and writing only through the master's own API router (`backend`), with sessions
//! sealed in a cookie (`session`), CSRF secrets in every form, a strict Content Security
//! Policy and assets embedded in the binary under content-hashed names. A little plain
//! JavaScript (`assets/cairn.js`) keeps pages live over the API's event stream and follows
//! task logs; every page works without it.

pub mod backend;
pub mod form;
mod pages;
pub mod session;
mod view;

use axum::extract::{DefaultBodyLimit, FromRequest, FromRequestParts, Request, State};
use axum::http::{header, request::Parts, HeaderValue, Method, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::get;
use axum::Router;
use backend::Backend;
use session::{Keys, Session};
use std::sync::{Arc, LazyLock};

/// Shared by every page handler.
pub struct Ui {
    pub backend: Backend,
    pub keys: Keys,
    /// The master serves over TLS: session cookies are `Secure`.
    pub tls: bool,
}

pub(crate) type St = State<Arc<Ui>>;

/// The UI routes merged with `api` (the master's API router, which the UI calls in process).
/// `token` is the cluster token (it keys the session cookies, the same on every master).
pub fn router(api: Router, token: &str, tls: bool) -> Router {
    let ui = Arc::new(Ui {
        backend: Backend::new(api.clone()),
        keys: Keys::new(token),
        tls,
    });
    let pages = pages::routes()
        .route("/ui/assets/{file}", get(asset))
        .layer(DefaultBodyLimit::max(MAX_FORM))
        .layer(middleware::from_fn(guard))
        .with_state(ui);
    api.merge(pages)
        .route("/", get(|| async { Redirect::to("/ui/") }))
}

/// Largest form a page accepts (a pasted workload spec included).
const MAX_FORM: usize = 1 << 20;

/// The Content Security Policy of every page: scripts, styles and connections only from the
/// master itself, no inline script, no framing.
pub const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self'; \
    img-src 'self' data:; connect-src 'self'; frame-ancestors 'none'; form-action 'self'; \
    base-uri 'none'; object-src 'none'";

/// Security headers on every UI answer, and a refusal of any cross-site post.
async fn guard(req: Request, next: Next) -> Response {
    if req.method() == Method::POST && cross_site(req.headers()) {
        return (
            StatusCode::FORBIDDEN,
            "cross-site form posts are refused; use the Cairn UI itself",
        )
            .into_response();
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    r
}

/// A post whose `Origin` is another host, or that the browser marks cross-site.
fn cross_site(h: &axum::http::HeaderMap) -> bool {
    if h.get("sec-fetch-site")
        .is_some_and(|v| v.as_bytes() == b"cross-site")
    {
        return true;
    }
    match (
        h.get(header::ORIGIN).and_then(|v| v.to_str().ok()),
        h.get(header::HOST).and_then(|v| v.to_str().ok()),
    ) {
        (Some("null"), _) => true,
        (Some(origin), Some(host)) => {
            let o = origin
                .trim_start_matches("http://")
                .trim_start_matches("https://");
            o != host
        }
        _ => false,
    }
}

pub(crate) fn now_secs() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// The signed-in session of a page request; without one, a redirect to the login page.
pub(crate) struct Sess(pub Session);

impl FromRequestParts<Arc<Ui>> for Sess {
    type Rejection = Response;
    async fn from_request_parts(parts: &mut Parts, ui: &Arc<Ui>) -> Result<Self, Response> {
        let cookie = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .find_map(|h| session::cookie_value(h, session::COOKIE));
        match cookie.and_then(|c| ui.keys.open(c, now_secs())) {
            Some(s) => Ok(Sess(s)),
            None => {
                let next = parts
                    .uri
                    .path_and_query()
                    .map(|p| p.as_str())
                    .unwrap_or("/ui/");
                Err(Redirect::to(&format!("/ui/login?next={}", backend::enc(next))).into_response())
            }
        }
    }
}

/// A posted form of a signed-in session whose CSRF secret matches.
pub(crate) struct Posted {
    pub sess: Session,
    pub form: Vec<(String, String)>,
}

impl Posted {
    pub fn get(&self, key: &str) -> Option<&str> {
        self.form
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

impl FromRequest<Arc<Ui>> for Posted {
    type Rejection = Response;
    async fn from_request(req: Request, ui: &Arc<Ui>) -> Result<Self, Response> {
        let (mut parts, body) = req.into_parts();
        let Sess(sess) = Sess::from_request_parts(&mut parts, ui).await?;
        let req = Request::from_parts(parts, body);
        let axum::Form(form): axum::Form<Vec<(String, String)>> = axum::Form::from_request(req, ui)
            .await
            .map_err(|e| (StatusCode::BAD_REQUEST, e.body_text()).into_response())?;
        let token = form
            .iter()
            .find(|(k, _)| k == "csrf")
            .map(|(_, v)| v.as_str())
            .unwrap_or("");
        if !session::csrf_ok(&sess, token) {
            return Err((
                StatusCode::FORBIDDEN,
                "this form is missing its security token or has expired: reload the page and \
                 try again",
            )
                .into_response());
        }
        Ok(Posted { sess, form })
    }
}

/// An embedded asset: its bytes, content type and content-hashed name.
struct Asset {
    name: String,
    body: &'static str,
    mime: &'static str,
}

fn hashed(stem: &str, ext: &str, body: &'static str, mime: &'static str) -> Asset {
    use sha2::Digest;
    let h = sha2::Sha256::digest(body.as_bytes());
    let hex: String = h[..6].iter().map(|b| format!("{b:02x}")).collect();
    Asset {
        name: format!("{stem}.{hex}.{ext}"),
        body,
        mime,
    }
}

static ASSETS: LazyLock<[Asset; 2]> = LazyLock::new(|| {
    [
        hashed(
            "cairn",
            "css",
            include_str!("../assets/cairn.css"),
            "text/css; charset=utf-8",
        ),
        hashed(
            "cairn",
            "js",
            include_str!("../assets/cairn.js"),
            "text/javascript; charset=utf-8",
        ),
    ]
});

/// The URL of the stylesheet and the script, with their content hashes.
pub(crate) fn asset_urls() -> (String, String) {
    (
        format!("/ui/assets/{}", ASSETS[0].name),
        format!("/ui/assets/{}", ASSETS[1].name),
    )
}

async fn asset(axum::extract::Path(file): axum::extract::Path<String>) -> Response {
    match ASSETS.iter().find(|a| a.name == file) {
        Some(a) => (
            [
                (header::CONTENT_TYPE, a.mime),
                (header::CACHE_CONTROL, "public, max-age=31536000, immutable"),
            ],
            a.body,
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "no such asset").into_response(),
    }
}
