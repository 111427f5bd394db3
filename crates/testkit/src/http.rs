//! The HTTP client every test and the launcher talk to nodes' APIs with.

use std::time::Duration;

/// A blocking HTTP client with a timeout generous enough for a busy cluster.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder().timeout(Duration::from_secs(30)).build().expect("client")
}
