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

use apm_compiler::ir::{VanguardRules, WorkerSpec};
use apm_compiler::schema::Setting;
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
#[derive(Clone, Debug, Default, PartialEq)]
struct Ranges {
    v4: Vec<(u32, u32)>,
    v6: Vec<(u128, u128)>,
}

impl Ranges {
    fn new(nets: impl IntoIterator<Item = ipnet::IpNet>) -> Ranges {
        let nets = ipnet::IpNet::aggregate(&nets.into_iter().collect());
        let mut ranges = Ranges::default();
        for net in nets {
            match net {
                ipnet::IpNet::V4(n) => ranges.v4.push((n.network().into(), n.broadcast().into())),
                ipnet::IpNet::V6(n) => ranges.v6.push((n.network().into(), n.broadcast().into())),
            }
        }
        ranges
    }

    fn of(settings: &[Setting<ipnet::IpNet>]) -> Ranges {
        Ranges::new(settings.iter().map(|net| net.value))
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

/// The proxies trusted when `trusted_proxies` is not set: this machine.
pub const LOOPBACK: [&str; 2] = ["127.0.0.0/8", "::1/128"];

/// Who may tell apm a client's address (`trust_proxy`, `trusted_proxies`):
/// `X-Forwarded-For` and `X-Real-IP` count only on a connection from one of
/// these, so a client that connects directly is judged by its own address,
/// whatever it writes.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct TrustedProxies {
    /// `None` with `trust_proxy false`: nobody.
    ranges: Option<Ranges>,
}

/// Where a request comes from, as far as apm can tell.
#[derive(Debug, PartialEq, Eq)]
pub struct Origin {
    /// The address Vanguard judges and the instance is told of; `None` for
    /// a unix-socket client that no trusted proxy vouches for.
    pub client: Option<IpAddr>,
    /// The hops a trusted proxy vouches for, left to right, starting with
    /// `client`: what the instance gets in `X-Forwarded-For` before the
    /// peer. Empty when the client is the peer itself.
    pub hops: Vec<IpAddr>,
}

impl TrustedProxies {
    pub fn new(spec: &WorkerSpec) -> TrustedProxies {
        let ranges = spec.trust_proxy.value.then(|| {
            if spec.trusted_proxies.is_empty() {
                Ranges::new(LOOPBACK.map(|net| net.parse().expect("a valid CIDR")))
            } else {
                Ranges::of(&spec.trusted_proxies)
            }
        });
        TrustedProxies { ranges }
    }

    /// Whether a connection from `peer` may speak for its client. A
    /// unix-socket peer (`None`) is on this machine: trusted when loopback is.
    fn trusts(&self, peer: Option<IpAddr>) -> bool {
        let Some(ranges) = &self.ranges else {
            return false;
        };
        match peer {
            Some(ip) => ranges.contains(ip.to_canonical()),
            None => {
                ranges.contains(Ipv4Addr::LOCALHOST.into())
                    || ranges.contains(Ipv6Addr::LOCALHOST.into())
            }
        }
    }

    /// The client of a request from `peer` that carries these
    /// `X-Forwarded-For` fields (in order) and `X-Real-IP` (the last one).
    /// From a trusted peer, `X-Forwarded-For` is read from the right, as
    /// each proxy appends the address it saw: the client is the first
    /// address that is not itself a trusted proxy (so whatever a client
    /// wrote in front of that is never believed), or the last readable one.
    /// Without `X-Forwarded-For`, `X-Real-IP` names the client.
    pub fn origin<'h>(
        &self,
        peer: Option<IpAddr>,
        forwarded_for: impl DoubleEndedIterator<Item = &'h [u8]>,
        real_ip: Option<&[u8]>,
    ) -> Origin {
        let direct = Origin {
            client: peer,
            hops: Vec::new(),
        };
        let Some(ranges) = self.ranges.as_ref().filter(|_| self.trusts(peer)) else {
            return direct;
        };
        let mut entries = forwarded_for
            .rev()
            .flat_map(|field| field.rsplit(|&b| b == b','))
            .peekable();
        if entries.peek().is_none() {
            return match real_ip.and_then(hop) {
                Some(ip) => Origin {
                    client: Some(ip),
                    hops: vec![ip],
                },
                None => direct,
            };
        }
        let mut hops = Vec::new();
        for ip in entries.map_while(hop) {
            hops.push(ip);
            if !ranges.contains(ip) {
                break;
            }
        }
        hops.reverse();
        Origin {
            client: hops.first().copied().or(peer),
            hops,
        }
    }
}

/// What `apm check` says of each worker with Vanguard rules: whose
/// forwarding headers name the client it judges.
pub fn trust_notes(config: &apm_compiler::Config) -> Vec<String> {
    config
        .workers
        .iter()
        .filter(|spec| spec.vanguard.as_ref().is_some_and(VanguardRules::has_rules))
        .map(|spec| {
            let label = spec.label();
            if !spec.trust_proxy.value {
                return format!(
                    "{label}: Vanguard judges every client by the address it connects from (`trust_proxy false`)"
                );
            }
            let listed: Vec<String> = match spec.trusted_proxies.as_slice() {
                [] => LOOPBACK.map(str::to_owned).to_vec(),
                nets => nets.iter().map(|net| net.value.to_string()).collect(),
            };
            let unix = if TrustedProxies::new(spec).trusts(None) {
                " and unix sockets"
            } else {
                ""
            };
            let whence = if spec.trusted_proxies.is_empty() {
                "loopback, the default; `trusted_proxies` names others"
            } else {
                "`trusted_proxies`"
            };
            format!(
                "{label}: Vanguard believes X-Forwarded-For / X-Real-IP only on connections from {}{unix} ({whence}); any other client is judged by the address it connects from",
                listed.join(", ")
            )
        })
        .collect()
}

/// One `X-Forwarded-For` entry: an address, maybe with a port as some
/// proxies write it (`192.0.2.1:5000`, `[2001:db8::1]:5000`).
fn hop(entry: &[u8]) -> Option<IpAddr> {
    let text = std::str::from_utf8(entry).ok()?.trim();
    let ip = text
        .parse::<IpAddr>()
        .or_else(|_| text.parse::<std::net::SocketAddr>().map(|a| a.ip()))
        .ok()?;
    Some(ip.to_canonical())
}

/// How many times a path is percent-decoded at most: a path still encoded
/// after that is an attempt to hide something, and refused.
const DECODINGS: usize = 4;

/// One `ban_path` pattern, lowercased, and where it must sit in a path.
struct PathRule {
    pattern: PathPattern,
    /// `/admin`, `/.git*`: from the path's start. Without a leading `/`
    /// (`*.php`, `.env`, `wp-*`), from any segment's start.
    rooted: bool,
}

impl PathRule {
    fn text(&self) -> &str {
        let (PathPattern::Suffix(s)
        | PathPattern::Prefix(s)
        | PathPattern::Contains(s)
        | PathPattern::Exact(s)) = &self.pattern;
        s
    }

    /// Whether a match at `start..end` of a judged path (`/a/b/`, see
    /// `judged_path`) is one this rule refuses. A match ends at a segment's
    /// end when a `/` follows or ends it, so `*.php` refuses
    /// `/index.php/extra` (PATH_INFO) and `/admin` refuses `/admin/users`.
    fn refuses(&self, path: &[u8], start: usize, end: usize) -> bool {
        let starts_right = || {
            if self.rooted {
                start == 0
            } else {
                path[start - 1] == b'/'
            }
        };
        // A pattern ending in `/` ends at the path's end; others, before a `/`.
        let ends_right = || path[end - 1] == b'/' || path[end] == b'/';
        match self.pattern {
            PathPattern::Contains(_) => true,
            PathPattern::Prefix(_) => starts_right(),
            PathPattern::Suffix(_) => ends_right(),
            PathPattern::Exact(_) => starts_right() && ends_right(),
        }
    }
}

/// The `ban_path` patterns in one automaton: a path is scanned once,
/// whatever the number of patterns.
struct PathRules {
    /// `None` when the patterns make no automaton (beyond its size
    /// limits): then every path is refused rather than none.
    automaton: Option<aho_corasick::AhoCorasick>,
    rules: Vec<PathRule>,
    /// `ban_path /;`: the root only, not every path under it.
    root: bool,
}

impl PathRules {
    fn new(patterns: &[Setting<PathPattern>]) -> PathRules {
        let lowercase = |pattern: &PathPattern| match pattern {
            PathPattern::Suffix(s) => PathPattern::Suffix(s.to_lowercase()),
            PathPattern::Prefix(s) => PathPattern::Prefix(s.to_lowercase()),
            PathPattern::Contains(s) => PathPattern::Contains(s.to_lowercase()),
            PathPattern::Exact(s) => PathPattern::Exact(s.to_lowercase()),
        };
        let root_only = |p: &PathPattern| *p == PathPattern::Exact("/".to_owned());
        let rules: Vec<PathRule> = patterns
            .iter()
            .filter(|p| !root_only(&p.value))
            .map(|p| {
                let pattern = lowercase(&p.value);
                let rule = PathRule {
                    rooted: false,
                    pattern,
                };
                PathRule {
                    rooted: rule.text().starts_with('/'),
                    ..rule
                }
            })
            .collect();
        PathRules {
            automaton: aho_corasick::AhoCorasick::new(rules.iter().map(PathRule::text)).ok(),
            rules,
            root: patterns.iter().any(|p| root_only(&p.value)),
        }
    }

    /// Whether a request target is refused: judged with its path
    /// parameters stripped (as Tomcat and Spring read it) and, when it has
    /// any, as written (as other servers read it).
    fn refuses(&self, target: &str) -> bool {
        let Some(decoded) = decode(target.split(['?', '#']).next().unwrap_or("")) else {
            return true;
        };
        let decoded = String::from_utf8_lossy(&decoded).to_lowercase();
        self.refuses_path(&judged_path(&decoded, true))
            || (decoded.contains([';', '\0']) && self.refuses_path(&judged_path(&decoded, false)))
    }

    fn refuses_path(&self, path: &str) -> bool {
        if self.root && path == "/" {
            return true;
        }
        let Some(automaton) = &self.automaton else {
            return true;
        };
        automaton.find_overlapping_iter(path).any(|m| {
            self.rules[m.pattern().as_usize()].refuses(path.as_bytes(), m.start(), m.end())
        })
    }
}

/// A path percent-decoded until nothing decodes any more (`%252e` is `.`);
/// `None` when it still would after `DECODINGS` rounds.
fn decode(path: &str) -> Option<std::borrow::Cow<'_, [u8]>> {
    let hex = |b: u8| (b as char).to_digit(16).map(|d| d as u8);
    let escape_at = |bytes: &[u8], i: usize| {
        (bytes[i] == b'%')
            .then(|| Some(hex(*bytes.get(i + 1)?)? * 16 + hex(*bytes.get(i + 2)?)?))
            .flatten()
    };
    let escaped = |bytes: &[u8]| (0..bytes.len()).any(|i| escape_at(bytes, i).is_some());
    let mut path = std::borrow::Cow::Borrowed(path.as_bytes());
    for _ in 0..DECODINGS {
        if !escaped(&path) {
            return Some(path);
        }
        let mut decoded = Vec::with_capacity(path.len());
        let mut i = 0;
        while i < path.len() {
            match escape_at(&path, i) {
                Some(byte) => {
                    decoded.push(byte);
                    i += 3;
                }
                None => {
                    decoded.push(path[i]);
                    i += 1;
                }
            }
        }
        path = std::borrow::Cow::Owned(decoded);
    }
    (!escaped(&path)).then_some(path)
}

/// A decoded, lowercased path as `ban_path` judges it: `\` is a separator
/// like `/`; each segment loses its path parameters (`;jsessionid=…`, with
/// `strip_parameters`) and what follows a NUL, then its trailing dots and
/// spaces (Windows ignores them); empty and `.` segments go and `..` takes
/// the one before it. The result starts and ends with `/` (`/a/b/`, or `/`
/// for the root), so every segment is between two slashes.
fn judged_path(decoded: &str, strip_parameters: bool) -> String {
    let mut segments: Vec<&str> = Vec::new();
    for segment in decoded.split(['/', '\\']) {
        let segment = match strip_parameters {
            true => segment.split([';', '\0']).next().unwrap_or(""),
            false => segment,
        };
        match segment.trim_end_matches(' ') {
            ".." => {
                segments.pop();
            }
            "." => {}
            other => match other.trim_end_matches(['.', ' ']) {
                "" => {}
                name => segments.push(name),
            },
        }
    }
    let mut path = String::with_capacity(decoded.len() + 2);
    path.push('/');
    for segment in segments {
        path.push_str(segment);
        path.push('/');
    }
    path
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
            allow: Ranges::of(&rules.allow_ip),
            deny: Ranges::of(&rules.ban_ip),
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
        } else if target.is_some_and(|target| self.paths.refuses(target)) {
            Err((Refusal::Forbidden, &c.blocked_path))
        } else {
            self.rate(ip, now)
                .map(|()| Permit(()))
                .map_err(|r| (r, &c.rate_limited))
        })
    }
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

    fn compiled(worker_text: &str) -> apm_compiler::Config {
        let config = format!("worker {{ exec x; {worker_text} }}");
        let loader = apm_compiler::MemLoader::new().file("a.conf", config);
        let compilation = apm_compiler::compile(Path::new("a.conf"), &loader).unwrap();
        assert_eq!(compilation.diagnostics, vec![]);
        compilation.config
    }

    /// Whether `ban_path PATTERNS;` refuses each target.
    fn refused(patterns: &str, targets: &[&str]) -> Vec<bool> {
        let (v, _) = rules(&format!("ban_path {patterns};"));
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        targets
            .iter()
            .map(|target| match v.admit_request(ip, target) {
                Ok(_) => false,
                Err(refusal) => {
                    assert_eq!(refusal, Refusal::Forbidden, "{target}");
                    true
                }
            })
            .collect()
    }

    #[track_caller]
    fn assert_refused(patterns: &str, targets: &[&str]) {
        for (target, refused) in targets.iter().zip(refused(patterns, targets)) {
            assert!(refused, "`{patterns}` let {target:?} through");
        }
    }

    #[track_caller]
    fn assert_passed(patterns: &str, targets: &[&str]) {
        for (target, refused) in targets.iter().zip(refused(patterns, targets)) {
            assert!(!refused, "`{patterns}` refused {target:?}");
        }
    }

    #[test]
    fn paths_are_judged_decoded_resolved_and_collapsed() {
        let judged = |target: &str| {
            let decoded = decode(target).unwrap();
            judged_path(&String::from_utf8_lossy(&decoded), true)
        };
        assert_eq!(judged("/a/../.env"), "/.env/");
        assert_eq!(judged("/%2e%2e/.env"), "/.env/");
        assert_eq!(judged("//wp-admin/./x.php"), "/wp-admin/x.php/");
        assert_eq!(judged("/static/"), "/static/");
        assert_eq!(judged("/"), "/");
        assert_eq!(judged("/../../.."), "/");
        assert_eq!(judged("/x/..;/secret;a=b"), "/secret/");
        assert_eq!(judged("\\a\\b/c"), "/a/b/c/");
        assert_eq!(judged("/a. . /b /.../c"), "/a/b/c/");
        assert_eq!(judged("/a/.. /b"), "/b/");
        assert_eq!(judged("/a%00.txt/b"), "/a/b/");
        assert_eq!(
            judged_path("/x/..;/a;b", false),
            "/x/..;/a;b/",
            "as written, parameters stay"
        );
        assert_eq!(judged_path("/x/../a;b", false), "/a;b/");
    }

    #[test]
    fn paths_are_decoded_until_stable_and_refused_when_that_takes_too_long() {
        let decoded = |path: &str| decode(path).map(|d| String::from_utf8_lossy(&d).into_owned());
        assert_eq!(decoded("/plain").as_deref(), Some("/plain"));
        assert_eq!(decoded("/%2e").as_deref(), Some("/."));
        assert_eq!(decoded("/%252e%25252e").as_deref(), Some("/.."));
        assert_eq!(decoded("/100%").as_deref(), Some("/100%"), "no escape");
        assert_eq!(decoded("/%2g%").as_deref(), Some("/%2g%"));
        assert_eq!(
            decoded("/%4A%4a").as_deref(),
            Some("/JJ"),
            "both cases of hex"
        );
        let mut deep = "2e".to_owned();
        for level in 1..=DECODINGS {
            deep = format!("25{deep}");
            let path = format!("/%{deep}");
            match level {
                // `%25…2e` takes `level + 1` rounds to become `.`.
                l if l < DECODINGS => assert_eq!(decoded(&path).as_deref(), Some("/.")),
                _ => assert_eq!(decoded(&path), None, "{path}"),
            }
        }
        assert_refused("/nothing", &["/%25252525252e"]);
    }

    #[test]
    fn ban_path_evasions_are_refused() {
        assert_refused(
            "/admin",
            &[
                "/admin",
                "/Admin",
                "/ADMIN/",
                "/admin/",
                "/admin/users",
                "/admin;jsessionid=0123",
                "/admin/;jsessionid=0123",
                "/x/..;/admin",
                "/admin.",
                "/admin%20",
                "/admin.%20.",
                "/%2561dmin",
                "/%61%64%6d%69%6e",
                "/x\\..\\admin",
                "/x%5c..%5cadmin",
                "/x%2f..%2fadmin",
                "//admin",
                "/./admin",
                "/admin%00.png",
                "/admin?x=1",
                "/admin#top",
            ],
        );
        assert_refused(
            "*.php",
            &[
                "/index.php",
                "/index.PHP",
                "/index.php/extra",
                "/index.php/extra/",
                "/index.php;x",
                "/index.php.",
                "/index.php%20",
                "/index%252ephp",
                "/a\\b.php",
                "/index.php%00.png",
                "/index.php.%20",
            ],
        );
        assert_refused(
            "/.git*",
            &[
                "/.git/config",
                "/.GIT/config",
                "/x/..%252f.git/config",
                "/x\\..\\.git",
            ],
        );
        assert_refused("*wp-*", &["/x/WP-login", "/wp-admin/"]);
    }

    #[test]
    fn ban_path_still_lets_other_paths_through() {
        assert_passed(
            "/admin",
            &["/administrator", "/x/admin", "/api/users", "/", "/admi"],
        );
        assert_passed("*.php", &["/php/x", "/index.phpx", "/index.html"]);
        assert_passed("/.env", &["/.environment", "/x/.env"]);
        assert_passed("/.git*", &["/x/.git", "/git"]);
        assert_passed("*wp-*", &["/wp", "/w/p-"]);
    }

    #[test]
    fn a_pattern_without_a_slash_names_a_segment_anywhere() {
        assert_refused(".env", &["/.env", "/app/.env", "/app/.ENV/", "/.env/x"]);
        assert_passed(".env", &["/.envx", "/x.env", "/a.env.b"]);
        assert_refused("wp-*", &["/wp-login", "/x/wp-admin/y"]);
        assert_passed("wp-*", &["/xwp-login", "/x/awp-"]);
        assert_refused("admin/login", &["/admin/login", "/x/admin/login/y"]);
        assert_passed("admin/login", &["/xadmin/login", "/admin/loginx"]);
    }

    #[test]
    fn a_pattern_with_a_slash_is_judged_on_the_whole_path() {
        assert_refused("*/config.php", &["/app/config.php", "/app/config.php/x"]);
        assert_passed("*/config.php", &["/app/myconfig.php", "/app/config.phpx"]);
        assert_refused("/admin/", &["/admin", "/admin/", "/admin/x"]);
        assert_passed("/admin/", &["/adminx"]);
        assert_refused("/static/*", &["/static", "/static/a.css"]);
        assert_passed("/static/*", &["/staticx"]);
        assert_refused("*/.git/*", &["/x/.git/config", "/.git"]);
    }

    #[test]
    fn the_root_pattern_refuses_the_root_only() {
        assert_refused("/", &["/", "//", "/%2e", "/x/.."]);
        assert_passed("/", &["/x", "/index.html"]);
    }

    #[test]
    fn case_is_folded_beyond_ascii() {
        assert_refused("/ädmin", &["/ÄDMIN", "/%C3%84dmin"]);
        assert_refused("/ÄDMIN", &["/ädmin"]);
    }

    #[test]
    fn parameters_hide_nothing_either_way() {
        // Stripped, `;` ends the segment (Tomcat); as written, the name
        // that other servers serve still matches.
        assert_refused("*secret*", &["/a;secret", "/a%3bsecret"]);
        assert_refused("*.php", &["/a.php;x.txt"]);
        assert_passed("*secret*", &["/a;b"]);
    }

    #[test]
    fn patterns_that_make_no_automaton_refuse_every_path() {
        let rules = PathRules {
            automaton: None,
            rules: Vec::new(),
            root: false,
        };
        assert!(rules.refuses("/anything"));
    }

    /// The client a worker with `worker_text` sees for a request from
    /// `peer` with these forwarding fields.
    fn origin(
        worker_text: &str,
        peer: Option<&str>,
        forwarded_for: &[&str],
        real_ip: Option<&str>,
    ) -> Origin {
        let config = compiled(worker_text);
        let proxies = TrustedProxies::new(&config.workers[0]);
        proxies.origin(
            peer.map(|p| p.parse().unwrap()),
            forwarded_for.iter().map(|f| f.as_bytes()),
            real_ip.map(str::as_bytes),
        )
    }

    fn ips(list: &[&str]) -> Vec<IpAddr> {
        list.iter().map(|ip| ip.parse().unwrap()).collect()
    }

    #[track_caller]
    fn assert_client(origin: Origin, client: Option<&str>, hops: &[&str]) {
        assert_eq!(
            origin,
            Origin {
                client: client.map(|c| c.parse().unwrap()),
                hops: ips(hops),
            }
        );
    }

    #[test]
    fn a_direct_client_is_judged_by_its_own_address_whatever_it_writes() {
        for worker in ["", "trusted_proxies 192.0.2.1;", "trust_proxy false;"] {
            let peer = Some("198.51.100.7");
            assert_client(origin(worker, peer, &["10.0.0.1"], None), peer, &[]);
            assert_client(origin(worker, peer, &[], Some("10.0.0.1")), peer, &[]);
            assert_client(
                origin(worker, peer, &["10.0.0.1", "203.0.113.9"], Some("10.0.0.2")),
                peer,
                &[],
            );
        }
    }

    #[test]
    fn a_trusted_proxy_names_the_client_by_default_from_loopback() {
        for peer in ["127.0.0.1", "127.9.9.9", "::1", "::ffff:127.0.0.1"] {
            assert_client(
                origin("", Some(peer), &["203.0.113.5"], None),
                Some("203.0.113.5"),
                &["203.0.113.5"],
            );
        }
        assert_client(
            origin("", Some("127.0.0.1"), &[], Some(" 203.0.113.6 ")),
            Some("203.0.113.6"),
            &["203.0.113.6"],
        );
        assert_client(
            origin("", Some("127.0.0.1"), &[], None),
            Some("127.0.0.1"),
            &[],
        );
    }

    #[test]
    fn trust_proxy_false_trusts_no_one_not_even_loopback() {
        for real_ip in [None, Some("203.0.113.6")] {
            assert_client(
                origin(
                    "trust_proxy false;",
                    Some("127.0.0.1"),
                    &["203.0.113.5"],
                    real_ip,
                ),
                Some("127.0.0.1"),
                &[],
            );
        }
        assert_client(
            origin(
                "trust_proxy false;",
                None,
                &["203.0.113.5"],
                Some("203.0.113.6"),
            ),
            None,
            &[],
        );
    }

    #[test]
    fn the_chain_is_read_from_the_right_up_to_the_first_untrusted_hop() {
        let worker = "trusted_proxies 192.0.2.0/24, 2001:db8::/32;";
        let peer = Some("192.0.2.1");
        // Whatever the client wrote in front of its own address is dropped.
        assert_client(
            origin(worker, peer, &["10.0.0.1, 203.0.113.5, 192.0.2.9"], None),
            Some("203.0.113.5"),
            &["203.0.113.5", "192.0.2.9"],
        );
        // Several fields are one list, in order.
        assert_client(
            origin(worker, peer, &["10.0.0.1", "203.0.113.5,2001:db8::7"], None),
            Some("203.0.113.5"),
            &["203.0.113.5", "2001:db8::7"],
        );
        // Every hop trusted: the first one is the client.
        assert_client(
            origin(worker, peer, &["192.0.2.3, 192.0.2.2"], None),
            Some("192.0.2.3"),
            &["192.0.2.3", "192.0.2.2"],
        );
        // An unreadable entry ends the walk at the last hop that was read.
        assert_client(
            origin(worker, peer, &["203.0.113.5, unknown, 192.0.2.2"], None),
            Some("192.0.2.2"),
            &["192.0.2.2"],
        );
        assert_client(origin(worker, peer, &["203.0.113.5, "], None), peer, &[]);
        assert_client(origin(worker, peer, &[""], Some("203.0.113.6")), peer, &[]);
        assert_client(origin(worker, peer, &[], Some("unknown")), peer, &[]);
        // X-Forwarded-For, when there is one, wins over X-Real-IP.
        assert_client(
            origin(worker, peer, &["203.0.113.5"], Some("203.0.113.6")),
            Some("203.0.113.5"),
            &["203.0.113.5"],
        );
        // Entries with ports, and IPv4 clients written as IPv6.
        assert_client(
            origin(worker, peer, &["[2001:db9::1]:443, 192.0.2.7:5000"], None),
            Some("2001:db9::1"),
            &["2001:db9::1", "192.0.2.7"],
        );
        assert_client(
            origin(worker, peer, &["::ffff:203.0.113.5"], None),
            Some("203.0.113.5"),
            &["203.0.113.5"],
        );
    }

    #[test]
    fn an_unreadable_field_is_not_believed() {
        let config = compiled("");
        let proxies = TrustedProxies::new(&config.workers[0]);
        let peer = Some(IpAddr::from(Ipv4Addr::LOCALHOST));
        let invalid: &[u8] = b"203.0.113.\xff";
        assert_eq!(
            proxies.origin(peer, [invalid].into_iter(), None),
            Origin {
                client: peer,
                hops: vec![],
            }
        );
        assert_eq!(
            proxies.origin(peer, [].into_iter(), Some(invalid)).client,
            peer
        );
    }

    #[test]
    fn trusted_proxies_replaces_loopback_and_decides_for_unix_sockets() {
        let worker = "trusted_proxies 192.0.2.1;";
        assert_client(
            origin(worker, Some("127.0.0.1"), &["203.0.113.5"], None),
            Some("127.0.0.1"),
            &[],
        );
        assert_client(origin(worker, None, &["203.0.113.5"], None), None, &[]);
        // A unix-socket peer is on this machine: trusted when loopback is.
        for worker in ["", "trusted_proxies 127.0.0.1;", "trusted_proxies ::1;"] {
            assert_client(
                origin(worker, None, &["203.0.113.5"], None),
                Some("203.0.113.5"),
                &["203.0.113.5"],
            );
            assert_client(
                origin(worker, None, &[], Some("203.0.113.6")),
                Some("203.0.113.6"),
                &["203.0.113.6"],
            );
        }
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
        // Every client is tracked, IPv6 too; each IPv4 one breached.
        assert_eq!((flooded.tracked, flooded.banned_now), (1001, 1000));
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
    fn a_ban_lasts_ban_ttl_rounded_up_to_the_second_and_is_dropped_when_over() {
        for client in ["192.0.2.9", "2001:db8::9"] {
            let (v, clock) = rules("rate_limit 1; ban_ttl 2500ms;");
            let ip: IpAddr = client.parse().unwrap();
            let _ = v.admit_request(ip, "/");
            clock.advance(Duration::from_millis(500));
            assert_eq!(v.admit_request(ip, "/").unwrap_err(), Refusal::Forbidden);
            // Banned at 0.5 s for 2.5 s: until 3 s. This request sweeps,
            // which keeps the ban.
            clock.advance(Duration::from_millis(1500));
            assert_eq!(v.admit_connection(ip).unwrap_err(), Refusal::Forbidden);
            assert_eq!(v.stats().bans, vec![(ip, 1000)], "the time left");
            clock.advance(Duration::from_millis(999));
            assert_eq!(v.stats().banned_now, 1);
            clock.advance(Duration::from_millis(1));
            assert_eq!(v.stats().banned_now, 0, "over at 3 s exactly");
            assert!(v.admit_connection(ip).is_ok());
            // That request swept too (a second after the last): the ban is gone.
            assert_eq!(v.bans.read().unwrap().iter().count(), 0);
        }
    }

    #[test]
    fn a_ban_is_over_at_its_end_between_sweeps_too() {
        let (v, clock) = rules("rate_limit 1; ban_ttl 2s;");
        let ip: IpAddr = "192.0.2.9".parse().unwrap();
        let _ = v.admit_request(ip, "/");
        assert_eq!(v.admit_request(ip, "/").unwrap_err(), Refusal::Forbidden);
        // Banned until 2 s; this request sweeps at 1.5 s, the next none.
        clock.advance(Duration::from_millis(1500));
        assert_eq!(v.admit_connection(ip).unwrap_err(), Refusal::Forbidden);
        clock.advance(Duration::from_millis(500));
        assert!(v.admit_connection(ip).is_ok());
        assert_eq!(v.bans.read().unwrap().iter().count(), 1, "not swept yet");
    }

    #[test]
    fn an_allow_list_of_one_family_refuses_the_other() {
        let (v, _) = rules("allow_ip 2001:db8::/32;");
        assert!(v.admit_connection("2001:db8::1".parse().unwrap()).is_ok());
        assert!(v.admit_connection("192.0.2.1".parse().unwrap()).is_err());
        let (v, _) = rules("allow_ip 192.0.2.0/24;");
        assert!(v.admit_connection("192.0.2.1".parse().unwrap()).is_ok());
        assert!(v.admit_connection("2001:db8::1".parse().unwrap()).is_err());
    }

    #[test]
    fn check_notes_whom_each_guarded_worker_trusts() {
        let config = compiled(
            "vanguard { rate_limit 5; } }\n\
             worker { name a; exec x; trusted_proxies 192.0.2.0/24; vanguard { ban_path *.php; } }\n\
             worker { name b; exec x; trust_proxy false; vanguard { ban_ip 192.0.2.1; } }\n\
             worker { name c; exec x; vanguard { ban_response no; }",
        );
        let notes = trust_notes(&config);
        assert_eq!(notes.len(), 3, "not for a worker without rules: {notes:?}");
        assert!(
            notes[0].contains("from 127.0.0.0/8, ::1/128 and unix sockets (loopback, the default"),
            "{notes:?}"
        );
        assert!(
            notes[1].starts_with("worker `a`: ")
                && notes[1].contains("from 192.0.2.0/24 (`trusted_proxies`)"),
            "no unix sockets without loopback: {notes:?}"
        );
        assert!(
            notes[2].starts_with(
                "worker `b`: Vanguard judges every client by the address it connects from"
            ),
            "{notes:?}"
        );
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
