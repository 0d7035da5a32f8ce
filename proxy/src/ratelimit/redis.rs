//! Fleet-wide limiting: the same GCRA evaluated atomically in Redis by one Lua script per
//! check, so every proxy sharing the Redis shares each limit. Redis's own clock (`TIME`) is
//! used, so proxies need no clock agreement; keys expire when their bucket is full again.
//!
//! Never a hang: every check is bounded by a timeout, and after a failure Redis is not asked
//! again for `retry_after`, so the fallback applies at once instead of every request paying
//! the timeout. Failures are counted in metrics and logged (at most once per `retry_after`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use redis::aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig};
use redis::cluster_async::ClusterConnection;
use redis::Script;
use tokio::sync::OnceCell;

use super::local::Outcome;
use super::rule::{RedisSettings, RedisTarget};
use crate::metrics::Metrics;

/// GCRA in Lua. KEYS[1]: bucket; ARGV[1]: emission interval (µs); ARGV[2]: burst.
/// Returns {allowed (0/1), remaining, wait_µs (retry-after if limited, reset if allowed)}.
const GCRA_LUA: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local tolerance = interval * (burst - 1)
local tat = tonumber(redis.call('GET', KEYS[1]) or now)
if tat < now then tat = now end
if tat - now > tolerance then
  return {0, 0, tat - tolerance - now}
end
local new_tat = tat + interval
redis.call('SET', KEYS[1], new_tat, 'PX', math.ceil((new_tat - now) / 1000) + 1)
local remaining = math.floor((now + tolerance - (new_tat - interval)) / interval)
if remaining < 0 then remaining = 0 end
return {1, remaining, new_tat - now}
"#;

enum Conn {
    Single(ConnectionManager),
    Cluster(ClusterConnection),
}

/// Why a Redis check did not produce an answer.
#[derive(Debug, thiserror::Error)]
pub enum RedisCheckError {
    /// Recently failed; not asked.
    #[error("redis unavailable (recent failure)")]
    Skipped,
    /// No answer within the timeout.
    #[error("redis timed out")]
    Timeout,
    /// Connection or command error.
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
}

/// A shared Redis connection for every rule with `store: redis`.
pub struct RedisStore {
    settings: RedisSettings,
    conn: OnceCell<Conn>,
    script: Script,
    epoch: Instant,
    skip_until_ms: AtomicU64,
}

impl RedisStore {
    /// A store for these settings; connects lazily on first use, from the proxy's runtime.
    pub fn new(settings: RedisSettings) -> RedisStore {
        RedisStore {
            settings,
            conn: OnceCell::new(),
            script: Script::new(GCRA_LUA),
            epoch: Instant::now(),
            skip_until_ms: AtomicU64::new(0),
        }
    }

    /// The settings.
    pub fn settings(&self) -> &RedisSettings {
        &self.settings
    }

    async fn connect(&self) -> Result<Conn, redis::RedisError> {
        let t = self.settings.timeout;
        match &self.settings.target {
            RedisTarget::Single(url) => {
                let client = redis::Client::open(url.as_str())?;
                let cfg = ConnectionManagerConfig::new()
                    .set_connection_timeout(Some(t.max(Duration::from_millis(200))))
                    .set_response_timeout(Some(t))
                    .set_number_of_retries(1)
                    .set_max_delay(Duration::from_secs(1));
                Ok(Conn::Single(ConnectionManager::new_lazy_with_config(
                    client, cfg,
                )?))
            }
            RedisTarget::Cluster(urls) => {
                let client =
                    redis::cluster::ClusterClient::builder(urls.iter().map(String::as_str))
                        .connection_timeout(t.max(Duration::from_millis(200)))
                        .response_timeout(t)
                        .build()?;
                Ok(Conn::Cluster(client.get_async_connection().await?))
            }
        }
    }

    async fn eval<C: ConnectionLike + Send>(
        &self,
        conn: &mut C,
        key: &str,
        interval_us: u64,
        burst: u32,
    ) -> redis::RedisResult<(i64, i64, i64)> {
        self.script
            .key(key)
            .arg(interval_us)
            .arg(burst)
            .invoke_async(conn)
            .await
    }

    fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Checks one request against the shared bucket `key`.
    pub async fn check(
        &self,
        key: &str,
        interval: Duration,
        burst: u32,
        metrics: &Metrics,
    ) -> Result<Outcome, RedisCheckError> {
        if self.skip_until_ms.load(Ordering::Relaxed) > self.now_ms() {
            return Err(RedisCheckError::Skipped);
        }
        let started = Instant::now();
        let interval_us = (interval.as_micros() as u64).max(1);
        let result = tokio::time::timeout(self.settings.timeout, async {
            let conn = self.conn.get_or_try_init(|| self.connect()).await?;
            // Cloning a multiplexed connection handle is cheap (an Arc).
            match conn {
                Conn::Single(c) => self.eval(&mut c.clone(), key, interval_us, burst).await,
                Conn::Cluster(c) => self.eval(&mut c.clone(), key, interval_us, burst).await,
            }
        })
        .await;
        metrics
            .redis_duration
            .observe(started.elapsed().as_secs_f64());
        let failure = match result {
            Ok(Ok((allowed, remaining, wait_us))) => {
                let wait = Duration::from_micros(wait_us.max(0) as u64);
                return Ok(if allowed == 1 {
                    Outcome::Allowed {
                        remaining: remaining.clamp(0, i64::from(u32::MAX)) as u32,
                        reset: wait,
                    }
                } else {
                    Outcome::Limited { retry_after: wait }
                });
            }
            Ok(Err(e)) => RedisCheckError::Redis(e),
            Err(_) => RedisCheckError::Timeout,
        };
        let kind = match failure {
            RedisCheckError::Timeout => "timeout",
            _ => "error",
        };
        metrics.redis_errors.with_label_values(&[kind]).inc();
        let until = self.now_ms() + self.settings.retry_after.as_millis() as u64;
        // Log once per outage window, not once per request.
        if self.skip_until_ms.swap(until, Ordering::Relaxed) <= self.now_ms() {
            tracing::warn!(error = %failure, fallback = ?self.settings.on_error, retry_after = ?self.settings.retry_after,
                "redis rate-limit check failed; applying the fallback policy");
        }
        Err(failure)
    }
}
