//! The HTTP client every test and the launcher talk to nodes' APIs with.

use std::time::Duration;

/// A blocking HTTP client with a timeout generous enough for a busy cluster, and no credential.
pub fn http() -> reqwest::blocking::Client {
    http_as(None)
}

/// [`http`] that sends `Authorization: Bearer TOKEN` with every request.
pub fn http_as(token: Option<&str>) -> reqwest::blocking::Client {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).expect("a token is header-safe");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    reqwest::blocking::Client::builder()
        .timeout(Duration::from_secs(30))
        .default_headers(headers)
        .build()
        .expect("client")
}
