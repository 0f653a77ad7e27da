//! Connections to Redis that outlive it: each is a connection manager that reconnects with
//! backoff when the server goes away, so a Redis restart costs a pause, not a process.

use std::time::Duration;

use redis::aio::{ConnectionManager, ConnectionManagerConfig};

use crate::error::{Error, Result};

/// A command's answer must come within this on the ordinary connection (none of its
/// commands block); a dead server is noticed, and reconnected to, this soon.
const RESPONSE_TIMEOUT: Duration = Duration::from_secs(5);

/// A Redis address: `redis://host:port/db`, `redis://:password@host`, `unix:///path/to.sock`
/// (or `redis+unix://`), or a socket's path itself.
pub fn client(url: &str) -> Result<redis::Client> {
    let url = if url.starts_with('/') {
        format!("unix://{url}")
    } else {
        url.to_string()
    };
    let bad = |e: redis::RedisError| {
        Error::InvalidRequest(format!(
            "--redis `{}`: {e} (use redis://HOST:PORT or unix:///PATH)",
            redacted(&url)
        ))
    };
    let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).map_err(bad)?;
    let info = info.set_tcp_settings(tcp_settings());
    redis::Client::open(info).map_err(bad)
}

/// A TCP connection to a Redis that vanished without closing it (its machine lost power, a
/// partition) would only time out command by command; keepalive probes and a limit on
/// unacknowledged data make it fail as a broken connection, which reconnects, within
/// about 20 s.
fn tcp_settings() -> redis::io::tcp::TcpSettings {
    use redis::io::tcp::socket2::TcpKeepalive;
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5));
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let keepalive = keepalive.with_retries(2);
    let settings = redis::io::tcp::TcpSettings::default()
        .set_nodelay(true)
        .set_keepalive(keepalive);
    #[cfg(any(target_os = "linux", target_os = "android"))]
    let settings = settings.set_user_timeout(Duration::from_secs(20));
    settings
}

/// The address without its password, for messages and logs.
pub fn redacted(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://***@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

fn config(response_timeout: Option<Duration>) -> ConnectionManagerConfig {
    ConnectionManagerConfig::new()
        .set_min_delay(Duration::from_millis(100))
        .set_max_delay(Duration::from_secs(2))
        .set_exponent_base(2.0)
        .set_number_of_retries(8)
        .set_connection_timeout(Some(Duration::from_secs(2)))
        .set_response_timeout(response_timeout)
}

/// A connection for ordinary commands. It connects on first use, so a process may start
/// before Redis does; [`wait_until_up`] says when it is there.
pub fn commands(client: &redis::Client) -> Result<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(client.clone(), config(Some(RESPONSE_TIMEOUT)))
        .map_err(|e| Error::InvalidRequest(format!("cannot set up a Redis connection: {e}")))
}

/// A connection for blocking reads (`XREADGROUP ... BLOCK ms`): its answers may take as long
/// as the block plus this margin, where the default timeout would cut them off.
pub fn blocking(client: &redis::Client, block: Duration) -> Result<ConnectionManager> {
    ConnectionManager::new_lazy_with_config(client.clone(), config(Some(block + RESPONSE_TIMEOUT)))
        .map_err(|e| Error::InvalidRequest(format!("cannot set up a Redis connection: {e}")))
}

/// Pings until Redis answers, saying once that it waits. Returns the first error when
/// `give_up` passes first.
pub async fn wait_until_up(
    conn: &mut ConnectionManager,
    url: &str,
    give_up: Option<Duration>,
) -> Result<()> {
    let started = std::time::Instant::now();
    let mut said = false;
    let mut delay = Duration::from_millis(100);
    loop {
        match redis::cmd("PING").query_async::<String>(conn).await {
            Ok(_) => {
                if said {
                    eprintln!("Redis at {} is up", redacted(url));
                }
                return Ok(());
            }
            Err(e) => {
                if give_up.is_some_and(|limit| started.elapsed() >= limit) {
                    return Err(Error::InvalidRequest(format!(
                        "Redis at {} does not answer: {e}",
                        redacted(url)
                    )));
                }
                if !said {
                    eprintln!("waiting for Redis at {}: {e}", redacted(url));
                    said = true;
                }
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
        }
    }
}

/// A backoff for loops that retry after a Redis error: 100 ms doubling to 2 s; says the
/// first error of an outage and when it is over.
pub struct Backoff {
    delay: Duration,
    failing: bool,
    what: &'static str,
}

impl Backoff {
    pub fn new(what: &'static str) -> Self {
        Self {
            delay: Duration::from_millis(100),
            failing: false,
            what,
        }
    }

    pub async fn failed(&mut self, error: &redis::RedisError) {
        if !self.failing {
            eprintln!("{}: Redis error ({error}); retrying", self.what);
            self.failing = true;
        }
        tokio::time::sleep(self.delay).await;
        self.delay = (self.delay * 2).min(Duration::from_secs(2));
    }

    pub fn succeeded(&mut self) {
        if self.failing {
            eprintln!("{}: Redis is back", self.what);
        }
        self.failing = false;
        self.delay = Duration::from_millis(100);
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn addresses() {
        assert!(super::client("redis://127.0.0.1:6379/0").is_ok());
        assert!(super::client("unix:///tmp/x.sock").is_ok());
        assert!(super::client("/tmp/x.sock").is_ok());
        assert!(super::client("http://x").is_err());
        assert_eq!(
            super::redacted("redis://:secret@host:6379"),
            "redis://***@host:6379"
        );
    }
}
