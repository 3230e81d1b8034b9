//! The web UI end to end: a real cluster (a master and real agents running Debian's
//! redis-server), driven from headless Chromium over WebDriver: sign in, install redis from
//! the catalog through the generated form (an invalid option first: an error beside its field
//! and nothing installed), review, watch the deploy plan complete live, follow a task's log,
//! scale a workload, uninstall, sign out. Without a browser: CSRF and cross-site posts are
//! refused, and what users supply (labels, logs, package READMEs) comes out inert.

mod common;

use common::browser::{browser, browser_with};
use common::*;
use serde_json::Value;
use std::time::Duration;

const MIN: Duration = Duration::from_secs(60);

async fn api(lab: &cairn_installer::lab::Lab, path: &str) -> Value {
    let addr = lab.running_addrs()[0].clone();
    lab.get(&addr, path).await.unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newcomer_installs_watches_scales_and_removes_in_a_real_browser() {
    let (_dir, lab) = master_and_agents(1, 28_000).await;
    let m = format!("http://{}", lab.running_addrs()[0]);
    let b = browser().await;

    // Any page first asks for the token.
    b.goto(&format!("{m}/ui/workloads")).await;
    b.wait_url("/ui/login", |u| u.contains("/ui/login")).await;
    b.shot("login").await;
    b.fill("input[name=token]", "not-the-token").await;
    b.click("form button[type=submit]").await;
    assert!(b.text("p.error").await.contains("not valid"));
    b.fill("input[name=token]", TOKEN).await;
    b.click("form button[type=submit]").await;
    b.wait_url("/ui/workloads", |u| u.ends_with("/ui/workloads"))
        .await;

    b.goto(&format!("{m}/ui/")).await;
    b.wait_text("main", "the agent", |t| t.contains("1 of 1 agents active"))
        .await;
    b.shot("overview").await;
    // Readable at a phone's width: nothing wider than the screen but the scrolled tables.
    b.c.set_window_size(390, 844).await.unwrap();
    b.shot("overview-phone").await;
    let overflow =
        b.c.execute(
            "return document.documentElement.scrollWidth > window.innerWidth + 1;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(
        overflow,
        serde_json::json!(false),
        "the page scrolls sideways"
    );
    b.c.set_window_size(1280, 1000).await.unwrap();

    // The catalog, a package's README, and its install form.
    b.goto(&format!("{m}/ui/catalog")).await;
    b.shot("catalog").await;
    b.click("a[href='/ui/catalog/redis']").await;
    assert!(b.text("article.readme").await.contains("redis-cli"));
    b.shot("package").await;
    b.click("main a[href='/ui/catalog/redis/install']").await;
    b.wait_text("h1", "the install form", |t| t.contains("Install redis"))
        .await;
    b.shot("install-form").await;

    // An invalid option: the error is beside its field, and nothing is installed.
    b.fill("input[name='/name']", "cache").await;
    b.fill("input[name='/mem_mb']", "5").await;
    b.click("form.options button[type=submit]").await;
    let err = b.text(".field.invalid .field-error").await;
    assert!(err.contains("minimum of 32"), "{err}");
    let field = b
        .find(".field.invalid input")
        .await
        .attr("name")
        .await
        .unwrap();
    assert_eq!(field.as_deref(), Some("/mem_mb"));
    b.shot("install-form-error").await;
    assert_eq!(api(&lab, "/api/v1/services").await, serde_json::json!([]));

    // Fixed, with one more option changed: the review shows it before anything happens.
    b.fill("input[name='/mem_mb']", "64").await;
    b.find("select[name='/maxmemory_policy']")
        .await
        .select_by_value("allkeys-lru")
        .await
        .unwrap();
    b.click("form.options button[type=submit]").await;
    let opts = b.text("#review-options").await;
    assert!(
        opts.contains("allkeys-lru") && opts.contains("\"mem_mb\":64"),
        "{opts}"
    );
    assert!(b.text("#review-spec").await.contains("redis"));
    b.shot("install-review").await;
    assert_eq!(api(&lab, "/api/v1/services").await, serde_json::json!([]));
    b.click("#confirm").await;
    b.wait_url("/ui/services/cache", |u| u.ends_with("/ui/services/cache"))
        .await;

    // The deploy plan reaches complete on the open page (live over the event stream).
    b.wait_text("[data-plan-status=deploy]", "deploy complete", |t| {
        t == "complete"
    })
    .await;
    b.shot("service").await;
    // Each pod shows where to connect.
    b.goto(&format!("{m}/ui/services/cache")).await;
    let address = b.text("[data-pod-address]").await;
    assert!(address.starts_with("127.0.0.1:"), "{address}");
    // A backup and a restore of it, started from the page (the restore form names the
    // backup, `latest` by default).
    b.click("#start-backup button[type=submit]").await;
    b.wait_text("[data-plan-status=backup]", "backup complete", |t| {
        t == "complete"
    })
    .await;
    b.goto(&format!("{m}/ui/services/cache")).await;
    assert_eq!(
        b.value("#start-restore input[name=param_from]").await,
        "latest"
    );
    b.click("#start-restore button[type=submit]").await;
    b.wait_text("[data-plan-status=restore]", "restore complete", |t| {
        t == "complete"
    })
    .await;
    let svc = api(&lab, "/api/v1/packages/installed").await;
    assert_eq!(
        svc[0]["options"]["maxmemory_policy"], "allkeys-lru",
        "{svc}"
    );

    // A workload submitted through the form; its task's log followed live.
    b.goto(&format!("{m}/ui/workloads")).await;
    let spec = "id = \"ticker\"\nkind = \"service\"\ninstances = 1\n\
        runtime.native = { cmd = \"/bin/sh\", args = [\"-c\", \"i=0; while true; do i=$$((i+1)); echo tick $$i; sleep 0.3; done\"] }\n\
        resources = { cpus = 0.1, mem = 32 }\n";
    b.fill("textarea[name=spec]", spec).await;
    b.click("form.stack button[type=submit]").await;
    b.wait_url("/ui/workloads/ticker", |u| {
        u.ends_with("/ui/workloads/ticker")
    })
    .await;
    b.wait_text("main", "ticker running", |t| t.contains("1 running of 1"))
        .await;
    b.shot("workload").await;
    b.click("a[href='/ui/tasks/ticker.0']").await;
    let first = b.text("#stdout").await;
    let seen = first
        .lines()
        .filter_map(|l| l.strip_prefix("tick ")?.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    let want = format!("tick {}", seen + 5);
    b.wait_text("#stdout", "a line written after the page opened", |t| {
        t.contains(&want)
    })
    .await;
    b.shot("task-logs").await;

    // Scale to 2 from the workload page.
    b.goto(&format!("{m}/ui/workloads/ticker")).await;
    b.fill("#instances", "2").await;
    b.click("form[action='/ui/workloads/ticker/scale'] button")
        .await;
    b.wait_text("main", "2 running", |t| t.contains("2 running of 2"))
        .await;

    b.goto(&format!("{m}/ui/events")).await;
    b.wait_text("main", "events", |t| t.contains("ticker"))
        .await;
    b.shot("events").await;
    b.goto(&format!("{m}/ui/agents")).await;
    b.shot("agents").await;

    // Uninstall names what it destroys, then removes the service.
    b.goto(&format!("{m}/ui/services/cache/uninstall")).await;
    let warn = b.text("ul.consequences").await;
    assert!(
        warn.contains("cache.redis-0.data.0") && warn.contains("destroyed"),
        "{warn}"
    );
    b.shot("uninstall-confirm").await;
    b.click("main form button.danger").await;
    b.wait_url("/ui/services", |u| u.ends_with("/ui/services"))
        .await;
    eventually(MIN, "service removed", || async {
        (api(&lab, "/api/v1/services").await == serde_json::json!([])).then_some(())
    })
    .await;

    // Sign out: pages ask for the token again.
    b.click(".logout button").await;
    b.wait_url("/ui/login", |u| u.contains("/ui/login")).await;
    b.goto(&format!("{m}/ui/agents")).await;
    b.wait_url("/ui/login?next=", |u| u.contains("/ui/login?next="))
        .await;
    b.close().await;
}

/// Signs in with plain HTTP; the session cookie.
async fn sign_in(http: &reqwest::Client, m: &str) -> String {
    let r = http
        .post(format!("{m}/ui/login"))
        .form(&[("token", TOKEN), ("next", "/ui/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let c = r.headers()["set-cookie"].to_str().unwrap().to_string();
    assert!(
        c.contains("HttpOnly") && c.contains("SameSite=Strict"),
        "{c}"
    );
    c.split(';').next().unwrap().to_string()
}

fn csrf_of(html: &str) -> String {
    let i = html.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    html[i..].split('"').next().unwrap().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forms_need_their_csrf_secret_and_user_input_comes_out_inert() {
    let (dir, lab) = master_and_agents(1, 28_500).await;
    let addr = lab.running_addrs()[0].clone();
    let m = format!("http://{addr}");
    let http = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let cookie = sign_in(&http, &m).await;
    // A token that cannot even go in a header is refused like a wrong one (no panic).
    let r = http
        .post(format!("{m}/ui/login"))
        .form(&[("token", "bad\u{1}token"), ("next", "/ui/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.text().await.unwrap().contains("not valid"));
    let page = |path: &str| {
        let (http, cookie, url) = (http.clone(), cookie.clone(), format!("{m}{path}"));
        async move {
            let r = http.get(url).header("cookie", cookie).send().await.unwrap();
            let h = r.headers().clone();
            (r.status().as_u16(), h, r.text().await.unwrap())
        }
    };

    // A workload whose label and output carry script.
    let spec = serde_json::json!({
        "id": "xss", "kind": "service", "instances": 1,
        "labels": {"note": "<script>alert(1)</script>"},
        "runtime": {"native": {"cmd": "/bin/sh",
            "args": ["-c", "echo '<script>alert(2)</script>'; sleep 600"]}},
        "resources": {"cpus": 0.1, "mem": 32}
    });
    let r = http
        .post(format!("{m}/api/v1/workloads"))
        .bearer_auth(TOKEN)
        .json(&spec)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    eventually(MIN, "xss running", || async {
        let (_, _, html) = page("/ui/workloads/xss").await;
        html.contains("1 running of 1").then_some(())
    })
    .await;
    let (status, headers, html) = page("/ui/workloads/xss").await;
    assert_eq!(status, 200);
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("script-src 'self'") && !csp.contains("unsafe-inline"),
        "{csp}"
    );
    assert_eq!(headers["x-frame-options"], "DENY");
    assert!(headers.contains_key("referrer-policy"));
    assert!(
        html.contains("&#60;script&#62;alert(1)"),
        "the label is shown, escaped"
    );
    assert!(!html.contains("<script>alert(1)"));
    eventually(MIN, "the log line", || async {
        let (_, _, html) = page("/ui/tasks/xss.0").await;
        html.contains("&#60;script&#62;alert(2)").then_some(html)
    })
    .await;
    let (_, _, html) = page("/ui/tasks/xss.0").await;
    assert!(!html.contains("<script>alert(2)"));
    // The same log through the masters with the CLI (no agent address needed).
    let (ok, out, err) = cairn_cli(&addr, &["logs", "xss.0"], MIN).await;
    assert!(
        ok && out.contains("<script>alert(2)</script>"),
        "{out}{err}"
    );

    // A package whose README carries script and a javascript: link.
    let repo = dir.path().join("evilrepo");
    let dst = copy_redis_package(&repo, "7.0.15-9");
    std::fs::write(
        dst.join("README.md"),
        "# Evil\n\n<script>alert(3)</script>\n\n<img src=x onerror=alert(4)>\n\n[x](javascript:alert(5))\n",
    )
    .unwrap();
    let (ok, out, err) = cairn_cli(
        &addr,
        &["package", "repo", "add", repo.to_str().unwrap()],
        MIN,
    )
    .await;
    assert!(ok, "{out}{err}");
    let (_, _, html) = page("/ui/catalog/redis").await;
    assert!(html.contains("<h1>Evil</h1>"), "the README is rendered");
    for bad in ["alert(3)", "onerror", "javascript:"] {
        assert!(!html.contains(bad), "{bad} in {html}");
    }

    // Posts without the CSRF secret, from another site, or without a session change nothing.
    let (_, _, html) = page("/ui/workloads/xss").await;
    let csrf = csrf_of(&html);
    let stop = format!("{m}/ui/workloads/xss/stop");
    let r = http
        .post(&stop)
        .header("cookie", &cookie)
        .form(&[("csrf", "wrong")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(&stop)
        .header("cookie", &cookie)
        .header("origin", "http://evil.example")
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 403);
    let r = http
        .post(&stop)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303, "no session: to the login page");
    assert!(r.headers()["location"]
        .to_str()
        .unwrap()
        .starts_with("/ui/login"));
    let w = api(&lab, "/api/v1/workloads/xss").await;
    assert_eq!(w["workload"]["stopped"], false, "nothing was stopped: {w}");
    // With the secret, from the page itself, it works.
    let r = http
        .post(&stop)
        .header("cookie", &cookie)
        .header("origin", &m)
        .form(&[("csrf", csrf.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let w = api(&lab, "/api/v1/workloads/xss").await;
    assert_eq!(w["workload"]["stopped"], true, "{w}");

    // A tampered or foreign session cookie is no session.
    let r = http
        .get(format!("{m}/ui/"))
        .header("cookie", "cairn_session=AAAA")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    // Assets are content-hashed and cached for good.
    let css = html
        .split("href=\"/ui/assets/")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .unwrap()
        .to_string();
    let r = http
        .get(format!("{m}/ui/assets/{css}"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.headers()["cache-control"]
        .to_str()
        .unwrap()
        .contains("immutable"));
}

/// Over TLS (the default of `cairn dev` and labs) the session cookie is `Secure` as well, and a
/// real browser signs in and reads the overview. (The browser is told to accept the test CA's
/// certificate: a newcomer imports the printed `ca.crt` or accepts the warning.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ui_signs_in_over_tls_with_a_secure_cookie() {
    let dir = tempfile::Builder::new()
        .prefix("cairn-ui-tls-")
        .tempdir_in("/var/tmp")
        .unwrap();
    let lab = cairn_installer::lab::Lab::start_tls(bin(), dir.path(), 1, TOKEN, &[]).unwrap();
    lab.wait_leader(Duration::from_secs(30))
        .await
        .expect("a leader");
    let m = format!("https://{}", lab.masters[0].addr);
    let http = lab
        .client_builder()
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .unwrap();
    let r = http
        .post(format!("{m}/ui/login"))
        .form(&[("token", TOKEN), ("next", "/ui/")])
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 303);
    let c = r.headers()["set-cookie"].to_str().unwrap().to_string();
    for attr in ["HttpOnly", "SameSite=Strict", "Secure"] {
        assert!(c.contains(attr), "no {attr} in {c}");
    }
    let b = browser_with(&["--ignore-certificate-errors"]).await;
    b.goto(&format!("{m}/ui/")).await;
    b.wait_url("/ui/login", |u| u.contains("/ui/login")).await;
    b.fill("input[name=token]", TOKEN).await;
    b.click("form button[type=submit]").await;
    b.wait_text("main", "the overview", |t| t.contains("leader"))
        .await;
    let cookies = b.c.get_all_cookies().await.unwrap();
    let session = cookies
        .iter()
        .find(|c| c.name() == "cairn_session")
        .expect("a session cookie");
    assert_eq!(session.secure(), Some(true));
    assert_eq!(session.http_only(), Some(true));
    b.shot("overview-tls").await;
    b.close().await;
}
