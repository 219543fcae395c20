//! The stylesheet and the script, compiled into the binary
//! (`include_str!`) and served from `/ui/assets/`: no build step, no CDN.
//!
//! Their URLs carry a hash of their content, so a browser may keep them
//! for a day and still never mixes an old script with a new page.

use axum::extract::Path;
use axum::http::header;
use axum::response::{IntoResponse, Response};

use super::page::Fail;

const CSS: &str = include_str!("assets/ui.css");
const JS: &str = include_str!("assets/ui.js");

/// FNV-1a: enough to tell two versions of a file apart.
const fn fnv1a(text: &str) -> u64 {
    let bytes = text.as_bytes();
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let mut i = 0;
    while i < bytes.len() {
        hash ^= bytes[i] as u64;
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
        i += 1;
    }
    hash
}

const CSS_HASH: u64 = fnv1a(CSS);
const JS_HASH: u64 = fnv1a(JS);

/// The stylesheet's URL (with its content hash).
pub fn css_url() -> String {
    format!("/ui/assets/ui.css?v={CSS_HASH:016x}")
}

/// The script's URL (with its content hash).
pub fn js_url() -> String {
    format!("/ui/assets/ui.js?v={JS_HASH:016x}")
}

/// `GET /ui/assets/{file}`.
pub async fn serve(Path(file): Path<String>) -> Response {
    let (body, content_type) = match file.as_str() {
        "ui.css" => (CSS, "text/css; charset=utf-8"),
        "ui.js" => (JS, "text/javascript; charset=utf-8"),
        _ => return Fail::not_found("There is no such file.").into_response(),
    };
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "public, max-age=86400"),
        ],
        body,
    )
        .into_response()
}
