//! What every page shares: the layout (title, navigation, CSRF secret, asset URLs) and small
//! formatters for the values the API returns.

use crate::session::Session;
use askama::Template;
use axum::http::StatusCode;
use axum::response::{Html, IntoResponse, Response};
use serde_json::Value;

/// The frame of every page.
pub struct Layout {
    pub title: String,
    /// Which navigation entry is current.
    pub nav: &'static str,
    pub csrf: String,
    pub css: String,
    pub js: String,
    /// Re-render `<main>` when the cluster changes (over the event stream).
    pub live: bool,
    pub signed_in: bool,
}

impl Layout {
    pub fn new(title: impl Into<String>, nav: &'static str, sess: &Session) -> Layout {
        let (css, js) = crate::asset_urls();
        Layout {
            title: title.into(),
            nav,
            csrf: sess.csrf.clone(),
            css,
            js,
            live: false,
            signed_in: true,
        }
    }
    pub fn anonymous(title: &str) -> Layout {
        let (css, js) = crate::asset_urls();
        Layout {
            title: title.into(),
            nav: "",
            csrf: String::new(),
            css,
            js,
            live: false,
            signed_in: false,
        }
    }
    pub fn live(mut self) -> Layout {
        self.live = true;
        self
    }
    /// `aria-current="page"` for the current navigation entry.
    pub fn current(&self, nav: &str) -> &'static str {
        if self.nav == nav {
            "page"
        } else {
            "false"
        }
    }
}

/// Renders a template, or a plain 500 naming the template error.
pub fn render(t: &impl Template) -> Response {
    match t.render() {
        Ok(html) => Html(html).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("rendering the page failed: {e}"),
        )
            .into_response(),
    }
}

/// A value as text: strings without quotes, null as empty.
pub fn text(v: &Value) -> String {
    match v {
        Value::Null => String::new(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// From a `{state: count}` object the API returns (`tasks`, `agents`, `task_counts`): the
/// count of `only` that state, or of all.
pub fn count(counts: &Value, only: Option<&str>) -> usize {
    counts
        .as_object()
        .map(|o| {
            o.iter()
                .filter(|(k, _)| only.is_none_or(|s| k.as_str() == s))
                .filter_map(|(_, n)| n.as_u64())
                .sum::<u64>() as usize
        })
        .unwrap_or(0)
}

/// A Unix-milliseconds time as `2026-11-30 15:39:04 UTC`.
pub fn when(ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    chrono::DateTime::from_timestamp_millis(ms as i64)
        .map(|d| d.format("%Y-%m-%d %H:%M:%S UTC").to_string())
        .unwrap_or_default()
}

/// How long ago a Unix-milliseconds time was (`12s ago`, `3m ago`, `2h ago`, `4d ago`).
pub fn ago(ms: u64, now_ms: u64) -> String {
    if ms == 0 {
        return String::new();
    }
    let s = now_ms.saturating_sub(ms) / 1000;
    match s {
        0..=59 => format!("{s}s ago"),
        60..=3599 => format!("{}m ago", s / 60),
        3600..=86399 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86400),
    }
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A percentage of `used` in `total` (0 when total is 0), for meters.
pub fn pct(used: f64, total: f64) -> u32 {
    if total <= 0.0 {
        0
    } else {
        ((used / total) * 100.0).clamp(0.0, 100.0).round() as u32
    }
}

/// A package README (Markdown) as HTML with anything active removed: raw HTML, scripts,
/// event handlers and `javascript:` links are dropped by ammonia's allow-list.
pub fn markdown(md: &str) -> String {
    let parser = pulldown_cmark::Parser::new_ext(md, pulldown_cmark::Options::ENABLE_TABLES);
    let mut html = String::new();
    pulldown_cmark::html::push_html(&mut html, parser);
    ammonia::Builder::default()
        .url_schemes(["http", "https", "mailto"].into())
        .clean(&html)
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formatters() {
        assert_eq!(when(0), "");
        assert_eq!(when(1_796_053_330_878), "2026-11-30 15:42:10 UTC");
        assert_eq!(ago(1000, 13_000), "12s ago");
        assert_eq!(ago(0, 13_000), "");
        assert_eq!(ago(1, 3 * 3_600_000), "2h ago");
        assert_eq!(pct(1.0, 4.0), 25);
        assert_eq!(pct(1.0, 0.0), 0);
        assert_eq!(text(&serde_json::json!("a")), "a");
        assert_eq!(text(&serde_json::json!(3)), "3");
        let c = serde_json::json!({"active": 2, "unreachable": 1});
        assert_eq!((count(&c, None), count(&c, Some("active"))), (3, 2));
        assert_eq!(count(&serde_json::Value::Null, None), 0);
    }

    #[test]
    fn a_readme_cannot_carry_script() {
        let md = "# Hi\n\n<script>alert(1)</script>\n\n<img src=x onerror=alert(2)>\n\n\
                  [click](javascript:alert(3)) [ok](https://example.org)\n\n| a | b |\n|---|---|\n| 1 | 2 |\n";
        let html = markdown(md);
        assert!(html.contains("<h1>Hi</h1>"), "{html}");
        assert!(!html.contains("<script"), "{html}");
        assert!(!html.contains("onerror"), "{html}");
        assert!(!html.contains("javascript:"), "{html}");
        assert!(html.contains("https://example.org"), "{html}");
        assert!(html.contains("<table>"), "{html}");
    }
}
