//! Vanguard, the request firewall. It runs before a request or connection
//! reaches any instance, in this order: IP lists, bans, path bans, rate
//! limit. Its answer is a `Permit` or a `Refusal`; the proxy can only
//! forward with a `Permit`, and only this module can make one, so no code
//! path skips the checks.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::RwLock;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::time::Duration;

use apm_compiler::ir::VanguardRules;
use apm_compiler::values::PathPattern;
use governor::clock::{Clock, DefaultClock, Reference};
use governor::{Quota, RateLimiter};

/// Proof that Vanguard let this request or connection through.
#[derive(Debug)]
pub struct Permit(());

impl Permit {
    /// For workers without a `vanguard { }` block: nothing to check.
    pub(crate) fn unguarded() -> Permit {
        Permit(())
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Refusal {
    /// 403 with `ban_response`: an IP list, a ban, or a banned path.
    Forbidden,
    /// 429: over the rate limit; try again after this long.
    TooMany { retry_after: Duration },
}

type KeyedLimiter<K, C> = RateLimiter<
    K,
    governor::state::keyed::DefaultKeyedStateStore<K>,
    C,
    governor::middleware::NoOpMiddleware<<C as Clock>::Instant>,
>;

/// Per-client state is keyed by family: an IPv4 key takes 4 bytes where an
/// `IpAddr` takes 17, which halves what a flood of addresses costs.
enum Key {
    V4(u32),
    V6(u128),
}

impl From<IpAddr> for Key {
    fn from(ip: IpAddr) -> Key {
        match ip {
            IpAddr::V4(v4) => Key::V4(v4.to_bits()),
            IpAddr::V6(v6) => Key::V6(v6.to_bits()),
        }
    }
}

struct Limiter<C: Clock> {
    v4: KeyedLimiter<u32, C>,
    v6: KeyedLimiter<u128, C>,
}

impl<C: Clock + Clone> Limiter<C> {
    fn new(quota: Quota, clock: &C) -> Limiter<C> {
        Limiter {
            v4: RateLimiter::new(quota, Default::default(), clock.clone()),
            v6: RateLimiter::new(quota, Default::default(), clock.clone()),
        }
    }

    fn check(&self, ip: IpAddr) -> Result<(), governor::NotUntil<C::Instant>> {
        match Key::from(ip) {
            Key::V4(key) => self.v4.check_key(&key),
            Key::V6(key) => self.v6.check_key(&key),
        }
    }

    fn len(&self) -> usize {
        self.v4.len() + self.v6.len()
    }

    /// Forgets the clients whose bucket has refilled.
    fn forget_idle(&self) {
        self.v4.retain_recent();
        self.v4.shrink_to_fit();
        self.v6.retain_recent();
        self.v6.shrink_to_fit();
    }
}

/// Clients banned after breaching the rate limit, until when. The times are
/// ms since the Vanguard was made, stored as whole seconds rounded up (4 bytes
/// where an `Instant` takes 16): a ban lasts at least `ban_ttl` and at most a
/// second longer.
#[derive(Default)]
struct Bans {
    v4: HashMap<u32, u32>,
    v6: HashMap<u128, u32>,
}

fn ms(seconds: u32) -> u64 {
    u64::from(seconds) * 1000
}

impl Bans {
    fn until(&self, ip: IpAddr) -> Option<u64> {
        match Key::from(ip) {
            Key::V4(key) => self.v4.get(&key).copied().map(ms),
            Key::V6(key) => self.v6.get(&key).copied().map(ms),
        }
    }

    fn insert(&mut self, ip: IpAddr, until: u64) {
        let seconds = u32::try_from(until.div_ceil(1000)).unwrap_or(u32::MAX);
        match Key::from(ip) {
            Key::V4(key) => self.v4.insert(key, seconds),
            Key::V6(key) => self.v6.insert(key, seconds),
        };
    }

    fn drop_expired(&mut self, now: u64) {
        self.v4.retain(|_, until| ms(*until) > now);
        self.v4.shrink_to_fit();
        self.v6.retain(|_, until| ms(*until) > now);
        self.v6.shrink_to_fit();
    }

    fn iter(&self) -> impl Iterator<Item = (IpAddr, u64)> + '_ {
        let v4 = self
            .v4
            .iter()
            .map(|(k, u)| (IpAddr::from(Ipv4Addr::from_bits(*k)), ms(*u)));
        let v6 = self
            .v6
            .iter()
            .map(|(k, u)| (IpAddr::from(Ipv6Addr::from_bits(*k)), ms(*u)));
        v4.chain(v6)
    }
}

/// What Vanguard decided so far, for `apm info`.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    pub allowed: u64,
    pub rate_limited: u64,
    pub banned: u64,
    pub blocked_path: u64,
    pub blocked_ip: u64,
    /// Clients the rate limiter remembers (seen within one refill window).
    #[serde(default)]
    pub tracked: usize,
    /// How many clients are banned now.
    #[serde(default)]
    pub banned_now: usize,
    /// The bans with the most time left (at most `LISTED_BANS`), with the
    /// milliseconds left.
    pub bans: Vec<(IpAddr, u64)>,
}

/// A flood can ban a million clients; `apm info` lists the longest bans only.
const LISTED_BANS: usize = 20;

#[derive(Default)]
struct Counters {
    allowed: AtomicU64,
    rate_limited: AtomicU64,
    banned: AtomicU64,
    blocked_path: AtomicU64,
    blocked_ip: AtomicU64,
}

/// A set of IP ranges, merged and sorted, searched in logarithmic time.
#[derive(Debug, Default)]
struct Ranges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Ranges {
    fn new(nets: &[apm_compiler::schema::Setting<ipnet::IpNet>]) -> Ranges {
        let nets: Vec<ipnet::IpNet> =
            ipnet::IpNet::aggregate(&nets.iter().map(|n| n.value).collect());
        let mut ranges = Ranges::default();
        for net in nets {
            match net {
                ipnet::IpNet::V4(n) => ranges.v4.push((n.network().into(), n.broadcast().into())),
                ipnet::IpNet::V6(n) => ranges.v6.push((n.network().into(), n.broadcast().into())),
            }
        }
        ranges
    }

    fn is_empty(&self) -> bool {
        self.v4.is_empty() && self.v6.is_empty()
    }

    fn contains(&self, ip: IpAddr) -> bool {
        fn find<T: Ord + Copy>(ranges: &[(T, T)], x: T) -> bool {
            let i = ranges.partition_point(|&(start, _)| start <= x);
            i > 0 && x <= ranges[i - 1].1
        }
        match ip {
            IpAddr::V4(ip) => find(&self.v4, u32::from(ip)),
            IpAddr::V6(ip) => find(&self.v6, u128::from(ip)),
        }
    }
}

/// The `ban_path` patterns in one automaton: a path is scanned once,
/// whatever the number of patterns.
struct PathRules {
    automaton: Option<aho_corasick::AhoCorasick>,
    patterns: Vec<PathPattern>,
}

impl PathRules {
    fn new(patterns: &[apm_compiler::schema::Setting<PathPattern>]) -> PathRules {
        let patterns: Vec<PathPattern> = patterns.iter().map(|p| p.value.clone()).collect();
        let texts = patterns.iter().map(|p| match p {
            PathPattern::Suffix(s)
            | PathPattern::Prefix(s)
            | PathPattern::Contains(s)
            | PathPattern::Exact(s) => s.as_str(),
        });
        PathRules {
            automaton: aho_corasick::AhoCorasick::new(texts).ok(),
            patterns,
        }
    }

    fn matches(&self, path: &str) -> bool {
        match &self.automaton {
            Some(automaton) => automaton.find_overlapping_iter(path).any(|m| {
                match &self.patterns[m.pattern().as_usize()] {
                    PathPattern::Contains(_) => true,
                    PathPattern::Prefix(_) => m.start() == 0,
                    PathPattern::Suffix(_) => m.end() == path.len(),
                    PathPattern::Exact(_) => m.start() == 0 && m.end() == path.len(),
                }
            }),
            None => self.patterns.iter().any(|p| p.matches(path)),
        }
    }
}

/// `C` is the clock of rate limits and bans: the system's, or a fake one
/// that tests advance by hand.
pub struct Vanguard<C: Clock = DefaultClock> {
    pub rules: VanguardRules,
    allow: Ranges,
    deny: Ranges,
    paths: PathRules,
    counters: Counters,
    limiter: Option<Limiter<C>>,
    clock: C,
    bans: RwLock<Bans>,
    born: C::Instant,
    /// When state of departed clients was last dropped, in ms since `born`.
    swept_at: AtomicU64,
}

impl<C: Clock> std::fmt::Debug for Vanguard<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vanguard")
            .field("rules", &self.rules)
            .finish_non_exhaustive()
    }
}

/// How often state of departed clients (full buckets, expired bans) is
/// dropped; between sweeps it can only grow by what one second of traffic adds.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

impl Vanguard {
    pub fn new(rules: &VanguardRules) -> Vanguard {
        Vanguard::with_clock(rules, DefaultClock::default())
    }
}

impl<C: Clock + Clone> Vanguard<C> {
    pub fn with_clock(rules: &VanguardRules, clock: C) -> Vanguard<C> {
        let limiter = rules.rate_limit.as_ref().and_then(|limit| {
            let rate = NonZeroU32::new(limit.value)?;
            let burst = rules
                .rate_burst
                .as_ref()
                .and_then(|b| NonZeroU32::new(b.value))
                .unwrap_or(rate);
            Some(Limiter::new(
                Quota::per_second(rate).allow_burst(burst),
                &clock,
            ))
        });
        Vanguard {
            rules: rules.clone(),
            allow: Ranges::new(&rules.allow_ip),
            deny: Ranges::new(&rules.ban_ip),
            paths: PathRules::new(&rules.ban_path),
            counters: Counters::default(),
            limiter,
            born: clock.now(),
            clock,
            bans: RwLock::default(),
            swept_at: AtomicU64::new(0),
        }
    }

    /// Drops the buckets that refilled and the bans that ran out, at most once
    /// per `SWEEP_EVERY`, by whichever request comes first.
    fn sweep_if_due(&self, at: u64) {
        let last = self.swept_at.load(AtomicOrdering::Relaxed);
        if at < last + SWEEP_EVERY.as_millis() as u64
            || self
                .swept_at
                .compare_exchange(last, at, AtomicOrdering::Relaxed, AtomicOrdering::Relaxed)
                .is_err()
        {
            return;
        }
        if let Some(limiter) = &self.limiter {
            limiter.forget_idle();
        }
        self.bans
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .drop_expired(at);
    }

    /// Now, in ms since the Vanguard was made: the clock bans are kept in.
    fn now(&self) -> u64 {
        Duration::from(self.clock.now().duration_since(self.born)).as_millis() as u64
    }

    fn ip_allowed(&self, ip: IpAddr) -> bool {
        (self.allow.is_empty() || self.allow.contains(ip)) && !self.deny.contains(ip)
    }

    /// A read lock: every request asks, and the sweep drops expired bans.
    /// Without `ban_ttl` there are no bans and not even the lock is taken.
    fn banned(&self, ip: IpAddr, now: u64) -> bool {
        if self.rules.ban_ttl.as_duration().is_zero() {
            return false;
        }
        let bans = self.bans.read().unwrap_or_else(|e| e.into_inner());
        bans.until(ip).is_some_and(|until| until > now)
    }

    pub fn stats(&self) -> Stats {
        let now = self.now();
        let read = |counter: &AtomicU64| counter.load(AtomicOrdering::Relaxed);
        let bans = self.bans.read().unwrap_or_else(|e| e.into_inner());
        let mut current: Vec<(IpAddr, u64)> = bans
            .iter()
            .filter(|(_, until)| *until > now)
            .map(|(ip, until)| (ip, until - now))
            .collect();
        let banned_now = current.len();
        current.sort_unstable_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        current.truncate(LISTED_BANS);
        Stats {
            allowed: read(&self.counters.allowed),
            rate_limited: read(&self.counters.rate_limited),
            banned: read(&self.counters.banned),
            blocked_path: read(&self.counters.blocked_path),
            blocked_ip: read(&self.counters.blocked_ip),
            tracked: self.limiter.as_ref().map_or(0, |limiter| limiter.len()),
            banned_now,
            bans: current,
        }
    }

    /// Counts a verdict on its way out.
    fn count(&self, verdict: Result<Permit, (Refusal, &AtomicU64)>) -> Result<Permit, Refusal> {
        match verdict {
            Ok(permit) => {
                self.counters.allowed.fetch_add(1, AtomicOrdering::Relaxed);
                Ok(permit)
            }
            Err((refusal, counter)) => {
                counter.fetch_add(1, AtomicOrdering::Relaxed);
                Err(refusal)
            }
        }
    }

    fn rate(&self, ip: IpAddr, now: u64) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        match limiter.check(ip) {
            Ok(()) => Ok(()),
            Err(not_until) => {
                let ttl = self.rules.ban_ttl.as_duration();
                if !ttl.is_zero() {
                    self.bans
                        .write()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(ip, now + ttl.as_millis() as u64);
                    return Err(Refusal::Forbidden);
                }
                let wait = not_until.wait_time_from(self.clock.now());
                Err(Refusal::TooMany {
                    retry_after: wait.max(Duration::from_secs(1)),
                })
            }
        }
    }

    /// A raw TCP (or WebSocket) connection: IP lists, bans, rate limit.
    pub fn admit_connection(&self, ip: IpAddr) -> Result<Permit, Refusal> {
        self.admit(ip, None)
    }

    /// An HTTP request: IP lists, bans, path bans, rate limit.
    pub fn admit_request(&self, ip: IpAddr, target: &str) -> Result<Permit, Refusal> {
        self.admit(ip, Some(target))
    }

    /// The checks in their order; the path ones only for a request target.
    fn admit(&self, ip: IpAddr, target: Option<&str>) -> Result<Permit, Refusal> {
        // An IPv4 client on a dual-stack socket arrives as ::ffff:a.b.c.d.
        let ip = ip.to_canonical();
        let now = self.now();
        self.sweep_if_due(now);
        let c = &self.counters;
        self.count(if !self.ip_allowed(ip) {
            Err((Refusal::Forbidden, &c.blocked_ip))
        } else if self.banned(ip, now) {
            Err((Refusal::Forbidden, &c.banned))
        } else if target.is_some_and(|target| self.paths.matches(&normalize_path(target))) {
            Err((Refusal::Forbidden, &c.blocked_path))
        } else {
            self.rate(ip, now)
                .map(|()| Permit(()))
                .map_err(|r| (r, &c.rate_limited))
        })
    }
}

/// A request target as `ban_path` sees it: the query dropped, percent-escapes
/// decoded and dot segments resolved, so `/%2e%2e/.env` and `/a/../.env` are
/// both `/.env`.
pub fn normalize_path(target: &str) -> String {
    let path = target.split(['?', '#']).next().unwrap_or("");
    let bytes = path.as_bytes();
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (
            bytes[i],
            bytes.get(i + 1).copied().and_then(hex),
            bytes.get(i + 2).copied().and_then(hex),
        ) {
            (b'%', Some(high), Some(low)) => {
                decoded.push((high * 16 + low) as u8);
                i += 3;
            }
            (byte, _, _) => {
                decoded.push(byte);
                i += 1;
            }
        }
    }
    let decoded = String::from_utf8_lossy(&decoded).replace('\\', "/");
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split('/') {
        match segment {
            "" | "." => {}
            ".." => {
                segments.pop();
            }
            other => segments.push(other),
        }
    }
    let mut out = format!("/{}", segments.join("/"));
    if decoded.ends_with('/') && out.len() > 1 {
        out.push('/');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    use governor::clock::FakeRelativeClock;

    /// A Vanguard whose time stands still until the test advances `clock`.
    fn rules(text: &str) -> (Vanguard<FakeRelativeClock>, FakeRelativeClock) {
        let config = format!("worker {{ exec x; vanguard {{ {text} }} }}");
        let loader = apm_compiler::MemLoader::new().file("a.conf", config);
        let compilation = apm_compiler::compile(Path::new("a.conf"), &loader).unwrap();
        assert_eq!(compilation.diagnostics, vec![]);
        let clock = FakeRelativeClock::default();
        let rules = compilation.config.workers[0].vanguard.as_ref().unwrap();
        (Vanguard::with_clock(rules, clock.clone()), clock)
    }

    #[test]
    fn paths_are_normalised_before_matching() {
        assert_eq!(normalize_path("/a/../.env?x=1"), "/.env");
        assert_eq!(normalize_path("/%2e%2e/.env"), "/.env");
        assert_eq!(normalize_path("//wp-admin/./x.php#frag"), "/wp-admin/x.php");
        assert_eq!(normalize_path("/static/"), "/static/");
        let (v, _) = rules("ban_path *.php, /.git*, *wp-*, /.env;");
        let ip: IpAddr = "10.0.0.1".parse().unwrap();
        for target in [
            "/index.php?a=b",
            "/.git/config",
            "/x/wp-login",
            "/a/../.env",
            "/%2e%2e/.env",
        ] {
            assert_eq!(
                v.admit_request(ip, target).unwrap_err(),
                Refusal::Forbidden,
                "{target}"
            );
        }
        assert!(v.admit_request(ip, "/.environment").is_ok());
        assert!(v.admit_request(ip, "/api/users").is_ok());
    }

    #[test]
    fn ip_lists_allow_only_listed_and_refuse_banned() {
        let (v, _) = rules("allow_ip 10.0.0.0/8; ban_ip 10.6.6.0/24;");
        assert!(v.admit_connection("10.1.2.3".parse().unwrap()).is_ok());
        assert_eq!(
            v.admit_connection("10.6.6.6".parse().unwrap()).unwrap_err(),
            Refusal::Forbidden
        );
        assert_eq!(
            v.admit_connection("192.0.2.1".parse().unwrap())
                .unwrap_err(),
            Refusal::Forbidden
        );
    }

    #[test]
    fn a_burst_passes_back_to_back_and_the_next_is_refused() {
        let (v, _) = rules("rate_limit 2; rate_burst 5;");
        let ip: IpAddr = "192.0.2.7".parse().unwrap();
        for i in 0..5 {
            assert!(v.admit_request(ip, "/").is_ok(), "request {i} of the burst");
        }
        // One request refills every 500 ms; Retry-After is in whole seconds.
        assert_eq!(
            v.admit_request(ip, "/").unwrap_err(),
            Refusal::TooMany {
                retry_after: Duration::from_secs(1)
            }
        );
        assert!(
            v.admit_request("192.0.2.8".parse().unwrap(), "/").is_ok(),
            "limits are per client"
        );
    }

    #[test]
    fn a_spent_burst_refills_at_the_rate() {
        let (v, clock) = rules("rate_limit 10; rate_burst 3;");
        let ip: IpAddr = "192.0.2.10".parse().unwrap();
        for _ in 0..3 {
            assert!(v.admit_request(ip, "/").is_ok());
        }
        assert!(v.admit_request(ip, "/").is_err());
        clock.advance(Duration::from_millis(99));
        assert!(v.admit_request(ip, "/").is_err(), "not yet: one per 100 ms");
        clock.advance(Duration::from_millis(1));
        assert!(v.admit_request(ip, "/").is_ok(), "one request refilled");
        assert!(v.admit_request(ip, "/").is_err(), "and only one");
        clock.advance(Duration::from_secs(1));
        for i in 0..3 {
            assert!(
                v.admit_request(ip, "/").is_ok(),
                "the whole burst is back: {i}"
            );
        }
        assert!(v.admit_request(ip, "/").is_err());
    }

    #[test]
    fn a_breach_with_ban_ttl_bans_the_client_until_it_expires() {
        let (v, clock) = rules("rate_limit 2; ban_ttl 10s;");
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        assert!(v.admit_request(ip, "/").is_ok());
        assert!(v.admit_request(ip, "/").is_ok());
        assert_eq!(v.admit_request(ip, "/").unwrap_err(), Refusal::Forbidden);
        assert_eq!(
            v.admit_connection(ip).unwrap_err(),
            Refusal::Forbidden,
            "banned everywhere for ban_ttl"
        );
        clock.advance(Duration::from_secs(9));
        assert_eq!(v.admit_request(ip, "/").unwrap_err(), Refusal::Forbidden);
        assert_eq!(v.stats().banned_now, 1);
        // A ban is kept in whole seconds: it ends within a second after ban_ttl.
        clock.advance(Duration::from_secs(2));
        assert!(v.admit_request(ip, "/").is_ok(), "the ban expired");
        let stats = v.stats();
        // The breach itself counts as rate-limited, the refusals after it as banned.
        assert_eq!((stats.rate_limited, stats.banned), (1, 2), "{stats:?}");
    }

    #[test]
    fn refilled_buckets_and_expired_bans_are_dropped() {
        let (v, clock) = rules("rate_limit 1000; rate_burst 1; ban_ttl 10ms;");
        for i in 0..1000u32 {
            let ip = IpAddr::from((0x0a00_0000 + i).to_be_bytes());
            let _ = v.admit_request(ip, "/");
            let _ = v.admit_request(ip, "/");
        }
        let v6: IpAddr = "2001:db8::1".parse().unwrap();
        let _ = v.admit_request(v6, "/");
        let flooded = v.stats();
        assert!(
            flooded.tracked > 900 && flooded.banned_now > 900,
            "{flooded:?}"
        );
        assert!(flooded.bans.len() <= LISTED_BANS);
        // Within the sweep interval nothing is dropped...
        clock.advance(SWEEP_EVERY / 2);
        let _ = v.admit_request("192.0.2.1".parse().unwrap(), "/");
        assert!(v.stats().tracked > 900);
        // ...after it, the next request sweeps what refilled or expired.
        clock.advance(SWEEP_EVERY);
        let _ = v.admit_request("192.0.2.1".parse().unwrap(), "/");
        assert_eq!(v.stats().tracked, 1, "only the client of this request");
        assert_eq!(v.bans.read().unwrap().iter().count(), 0);
    }

    #[test]
    fn ipv6_ranges_and_ipv4_mapped_clients() {
        let (v, _) = rules("ban_ip 2001:db8::/32, 198.51.100.0/24;");
        let judge = |ip: &str| v.admit_connection(ip.parse().unwrap()).is_ok();
        assert!(!judge("2001:db8:1::5"));
        assert!(judge("2001:db9::5"));
        assert!(
            !judge("::ffff:198.51.100.7"),
            "an IPv4 client on a v6 socket"
        );
        assert!(judge("::ffff:198.51.101.7"));
    }
}
