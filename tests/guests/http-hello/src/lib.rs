//! `GET /anything` → `hello from wasm GET /anything task=<CAIRN_TASK_ID>`;
//! `POST` echoes the body; `/spin` loops forever (for deadline and kill tests);
//! `/fetch` tries an outgoing request (denied without the network grant); `/panic` traps;
//! `/logswap?TARGET` replaces `stdout` with a symlink to TARGET and prints to it.

use std::io::{Read as _, Write as _};
use wasi::http::types::{
    Fields, IncomingRequest, Method, OutgoingBody, OutgoingResponse, ResponseOutparam,
};

struct Hello;

impl wasi::exports::http::incoming_handler::Guest for Hello {
    fn handle(request: IncomingRequest, out: ResponseOutparam) {
        let path = request.path_with_query().unwrap_or_default();
        let method = match request.method() {
            Method::Get => "GET".to_string(),
            Method::Post => "POST".to_string(),
            m => format!("{m:?}"),
        };
        if path.starts_with("/panic") {
            panic!("secret internal detail");
        }
        if let Some(target) = path.strip_prefix("/logswap?") {
            let _ = std::fs::remove_file("stdout");
            #[allow(deprecated)]
            let _ = std::fs::soft_link(target, "stdout");
            let _ = writeln!(std::io::stdout(), "pwned by http");
            let _ = std::io::stdout().flush();
        }
        if path.starts_with("/spin") {
            let mut i = 0u64;
            loop {
                i = std::hint::black_box(i + 1);
            }
        }
        let mut body_in = Vec::new();
        if let Ok(b) = request.consume() {
            if let Ok(mut s) = b.stream() {
                let _ = s.read_to_end(&mut body_in);
            }
        }
        let task = std::env::var("CAIRN_TASK_ID").unwrap_or_default();
        let mut text = format!("hello from wasm {method} {path} task={task}");
        if !body_in.is_empty() {
            text.push_str(&format!(" body={}", String::from_utf8_lossy(&body_in)));
        }
        if path.starts_with("/fetch") {
            let req = wasi::http::types::OutgoingRequest::new(Fields::new());
            let _ = req.set_authority(Some("127.0.0.1:9"));
            let _ = req.set_scheme(Some(&wasi::http::types::Scheme::Http));
            let _ = req.set_path_with_query(Some("/"));
            let r = wasi::http::outgoing_handler::handle(req, None);
            // Denied by the host (at once or when the response is awaited), or allowed (the
            // request went out, whatever came back).
            use wasi::http::types::ErrorCode;
            let verdict = match r {
                Err(ErrorCode::HttpRequestDenied) => "denied".to_string(),
                Err(e) => format!("error:{e:?}"),
                Ok(fut) => {
                    fut.subscribe().block();
                    match fut.get() {
                        Some(Ok(Err(ErrorCode::HttpRequestDenied))) => "denied".to_string(),
                        _ => "allowed".to_string(),
                    }
                }
            };
            text.push_str(&format!(" fetch={verdict}"));
        }
        let headers =
            Fields::from_list(&[("content-type".to_string(), b"text/plain".to_vec())]).unwrap();
        let resp = OutgoingResponse::new(headers);
        resp.set_status_code(200).unwrap();
        let body = resp.body().unwrap();
        ResponseOutparam::set(out, Ok(resp));
        let mut w = body.write().unwrap();
        w.write_all(text.as_bytes()).unwrap();
        w.flush().unwrap();
        drop(w);
        OutgoingBody::finish(body, None).unwrap();
    }
}

wasi::http::proxy::export!(Hello);
