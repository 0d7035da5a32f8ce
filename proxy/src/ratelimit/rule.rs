//! Rate-limit rules as validated from the config (what to count, how fast, where), before
//! they get runtime state in [`super::CompiledRateLimit`].

use std::time::Duration;

use super::key::KeyPart;

/// A rate: `count` requests per `window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Requests per window.
    pub count: u32,
    /// The window.
    pub window: Duration,
}

impl Rate {
    /// Parses `100/s`, `1000/min`, `5000/5m`, `10/h`, `3/30s`.
    pub fn parse(s: &str) -> Result<Rate, String> {
        let bad = || {
            format!("invalid rate {s:?}: write it like `100/s`, `1000/min`, `5000/5m` or `10/h`")
        };
        let (n, per) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().ok().filter(|n| *n > 0).ok_or_else(bad)?;
        let per = per.trim();
        let digits = per.chars().take_while(|c| c.is_ascii_digit()).count();
        let (mult, unit) = per.split_at(digits);
        let mult: u64 = if mult.is_empty() {
            1
        } else {
            mult.parse().ok().filter(|m| *m > 0).ok_or_else(bad)?
        };
        let unit_secs = match unit {
            "s" | "sec" | "second" => 1,
            "m" | "min" | "minute" => 60,
            "h" | "hour" => 3600,
            "d" | "day" => 86400,
            _ => return Err(bad()),
        };
        Ok(Rate {
            count,
            window: Duration::from_secs(mult * unit_secs),
        })
    }

    /// Time between two requests at the steady rate (GCRA's emission interval).
    pub fn interval(&self) -> Duration {
        self.window / self.count
    }
}

/// What a rule does when over its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitAction {
    /// 429.
    Block,
    /// Dry run: count and log only.
    Count,
}

/// Where a rule's state lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateLimitStore {
    /// This process.
    Local,
    /// Redis (shared).
    Redis,
}

/// Policy when Redis fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RedisOnError {
    /// Use a per-process limiter with the same rule.
    Local,
    /// Fail open.
    Allow,
    /// Fail closed (503).
    Block,
}

/// Which Redis deployment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisTarget {
    /// A standalone server (URL).
    Single(String),
    /// A Redis Cluster (seed node URLs).
    Cluster(Vec<String>),
}

/// Validated Redis settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisSettings {
    /// Where.
    pub target: RedisTarget,
    /// Per-check timeout.
    pub timeout: Duration,
    /// Failure policy.
    pub on_error: RedisOnError,
    /// How long to skip Redis after a failure.
    pub retry_after: Duration,
}

/// Which requests a rule applies to.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RateLimitScope {
    /// Route names (`None` = all).
    pub routes: Option<Vec<String>>,
    /// Methods (`None` = all).
    pub methods: Option<Vec<http::Method>>,
    /// Path regex.
    pub path: Option<PathRegex>,
}

/// A scope's path regex; two are equal when their patterns are (a reload keeps a rule's
/// state only when nothing about it changed).
#[derive(Debug, Clone)]
pub struct PathRegex(pub regex::Regex);

impl PartialEq for PathRegex {
    fn eq(&self, other: &Self) -> bool {
        self.0.as_str() == other.0.as_str()
    }
}

/// A validated rate-limit rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RateLimitRule {
    /// Name.
    pub name: String,
    /// Key parts (empty = aggregate).
    pub key: Vec<KeyPart>,
    /// Rate.
    pub rate: Rate,
    /// Burst (≥ 1).
    pub burst: u32,
    /// Scope.
    pub scope: RateLimitScope,
    /// Action.
    pub action: RateLimitAction,
    /// Store.
    pub store: RateLimitStore,
    /// Send headers on every response, not only on 429.
    pub headers_always: bool,
    /// Max tracked keys.
    pub max_keys: usize,
}

impl RateLimitRule {
    /// Whether the rule applies to a route name (method and path are checked per request).
    pub fn applies_to_route(&self, route: &str) -> bool {
        self.scope
            .routes
            .as_ref()
            .is_none_or(|r| r.iter().any(|n| n == route))
    }

    /// `RateLimit-Policy` value: `"name";q=N;w=SECONDS`.
    pub fn policy_header(&self) -> String {
        format!(
            "\"{}\";q={};w={}",
            self.name,
            self.rate.count,
            self.rate.window.as_secs().max(1)
        )
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, reason = "tests")]
mod tests {
    use super::*;

    #[test]
    fn rates_parse() {
        assert_eq!(
            Rate::parse("100/s").unwrap(),
            Rate {
                count: 100,
                window: Duration::from_secs(1)
            }
        );
        assert_eq!(
            Rate::parse("1000/min").unwrap().window,
            Duration::from_secs(60)
        );
        assert_eq!(
            Rate::parse("5000/5m").unwrap(),
            Rate {
                count: 5000,
                window: Duration::from_secs(300)
            }
        );
        assert_eq!(
            Rate::parse("10/h").unwrap().interval(),
            Duration::from_secs(360)
        );
        for bad in ["", "100", "0/s", "10/fortnight", "x/s", "10/0s"] {
            assert!(Rate::parse(bad).is_err(), "{bad}");
        }
    }
}
