//! A real browser for the UI tests: Debian's headless Chromium driven over WebDriver
//! (chromedriver) with fantoccini. Screenshots go to `target/ui-screenshots/`.

use fantoccini::{Client, ClientBuilder, Locator};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Browser {
    pub c: Client,
    driver: Child,
    pub shots: PathBuf,
}

/// Starts chromedriver on a free port and opens a headless Chromium session.
pub async fn browser() -> Browser {
    browser_with(&[]).await
}

/// As `browser`, with extra Chromium flags.
pub async fn browser_with(extra: &[&str]) -> Browser {
    use std::os::unix::process::CommandExt;
    let port = cairn_installer::lab::free_port();
    let driver = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .process_group(0)
        .spawn()
        .expect("chromedriver (Debian: apt-get install chromium chromium-driver)");
    let mut args = vec![
        "--headless=new",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--window-size=1280,1000",
    ];
    args.extend_from_slice(extra);
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        serde_json::json!({ "args": args }),
    );
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let c = loop {
        let conn = hyper_util::client::legacy::connect::HttpConnector::new();
        match ClientBuilder::new(conn)
            .capabilities(caps.clone())
            .connect(&url)
            .await
        {
            Ok(c) => break c,
            Err(e) if Instant::now() > deadline => panic!("no WebDriver session: {e}"),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    };
    let shots = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/ui-screenshots");
    std::fs::create_dir_all(&shots).unwrap();
    Browser { c, driver, shots }
}

impl Browser {
    pub async fn goto(&self, url: &str) {
        self.c
            .goto(url)
            .await
            .unwrap_or_else(|e| panic!("goto {url}: {e}"));
    }

    /// Saves a screenshot of the page as `<name>.png`.
    pub async fn shot(&self, name: &str) {
        let png = self.c.screenshot().await.expect("screenshot");
        std::fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    pub async fn find(&self, css: &str) -> fantoccini::elements::Element {
        match self
            .c
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
        {
            Ok(e) => e,
            Err(e) => self.fail(&format!("no element {css:?}: {e}")).await,
        }
    }

    /// Panics with `why`, the page's URL and text, after saving a screenshot `failure.png`.
    pub async fn fail(&self, why: &str) -> ! {
        let _ = self
            .c
            .screenshot()
            .await
            .map(|png| std::fs::write(self.shots.join("failure.png"), png));
        let url = self.c.current_url().await.map(|u| u.to_string());
        let text = match self.c.find(Locator::Css("body")).await {
            Ok(b) => b.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        panic!("{why}\npage {url:?}:\n{text}");
    }

    pub async fn text(&self, css: &str) -> String {
        self.find(css).await.text().await.unwrap_or_default()
    }

    /// An input's current value.
    pub async fn value(&self, css: &str) -> String {
        self.find(css)
            .await
            .prop("value")
            .await
            .ok()
            .flatten()
            .unwrap_or_default()
    }

    /// Replaces an input's value.
    pub async fn fill(&self, css: &str, value: &str) {
        let e = self.find(css).await;
        e.clear().await.expect("clear");
        e.send_keys(value).await.expect("type");
    }

    pub async fn click(&self, css: &str) {
        self.find(css)
            .await
            .click()
            .await
            .unwrap_or_else(|e| panic!("click {css:?}: {e}"));
    }

    pub async fn url(&self) -> String {
        self.c.current_url().await.expect("url").to_string()
    }

    /// Waits until the page's URL satisfies `ok` (a click's navigation may still be under way).
    pub async fn wait_url(&self, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let u = self.url().await;
            if ok(&u) {
                return u;
            }
            if Instant::now() > deadline {
                self.fail(&format!("timed out waiting for the URL of {what}: {u}"))
                    .await
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits (without reloading) until the text of `css` satisfies `ok`.
    pub async fn wait_text(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok(e) = self.c.find(Locator::Css(css)).await {
                last = e.text().await.unwrap_or_default();
                if ok(&last) {
                    return last;
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.fail(&format!(
            "timed out waiting for {what} in {css:?}; last text: {last:?}"
        ))
        .await
    }

    pub async fn close(self) {
        let _ = self.c.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // chromedriver and the Chromium it started share its process group.
        let _ = nix::sys::signal::killpg(
            nix::unistd::Pid::from_raw(self.driver.id() as i32),
            nix::sys::signal::Signal::SIGKILL,
        );
        let _ = self.driver.wait();
    }
}
