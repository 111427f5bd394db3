//! The HTTP client every test and the launcher talk to nodes' APIs with.

use std::time::Duration;

/// A blocking HTTP client with a timeout generous enough for a busy cluster, and no credential.
pub fn http() -> reqwest::blocking::Client {
    http_as(None)
}

/// [`http`] that sends `Authorization: Bearer TOKEN` with every request.
pub fn http_as(token: Option<&str>) -> reqwest::blocking::Client {
    http_as_within(token, Duration::from_secs(30))
}

/// [`http_as`] whose requests time out after `timeout`.
pub fn http_as_within(token: Option<&str>, timeout: Duration) -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .timeout(timeout)
        .default_headers(bearer_headers(token))
        .build()
        .expect("client")
}

/// The default headers of a client that sends `token` (none without one); for blocking and
/// async clients alike.
pub fn bearer_headers(token: Option<&str>) -> reqwest::header::HeaderMap {
    let mut headers = reqwest::header::HeaderMap::new();
    if let Some(t) = token {
        let value = reqwest::header::HeaderValue::from_str(&format!("Bearer {t}")).expect("a token is header-safe");
        headers.insert(reqwest::header::AUTHORIZATION, value);
    }
    headers
}
