//! Which URLs the worker may request: the one place that decides, so that a job cannot turn the
//! worker into a proxy into the cluster (server-side request forgery).
//!
//! The rules, in the order they are applied:
//! 1. A relative `audio_url` resolves only under `AUDIO_GENERATION_SERVICE_URL`. Dot segments
//!    (`.`, `..`, in any percent-encoding, however often encoded), backslashes and NUL are
//!    refused, never normalised away.
//! 2. An absolute URL must be `http` or `https`, carry no user-info, and name a host in
//!    `AUDIO_URL_ALLOWED_HOSTS` (default: the generation service's `host:port`).
//! 3. The address a host resolves to (or the address an IP literal spells, in any of its
//!    decimal, octal, hex or IPv4-mapped IPv6 forms, which [`Url`] normalises) must be public:
//!    loopback, private, link-local, unique-local, shared (CGNAT), unspecified, multicast,
//!    documentation and cloud-metadata addresses are refused, unless the host is listed in
//!    `AUDIO_URL_PRIVATE_HOSTS` (default: the generation service's `host:port`, which the
//!    operator configured, not a job).
//! 4. Redirects are followed only to URLs that pass rules 2 and 3, at most [`MAX_REDIRECTS`].
//!
//! Rule 3 is enforced by [`PolicyResolver`], the HTTP client's DNS resolver, so the address that
//! was checked is the address connected to: a name that re-resolves to another address between a
//! check and the connection (DNS rebinding) gains nothing. A refusal is a [`Refused`] error, a
//! permanent failure: the job goes to the dead-letter queue and no request is sent.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use url::{Host, Url};

/// Redirects followed per request, at most.
pub const MAX_REDIRECTS: usize = 3;

/// Why a URL may not be requested. Permanent: the same job would be refused again.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("refused by URL policy: {0}")]
pub struct Refused(pub String);

/// One entry of a host list: a host, and the port when the entry names one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostRule {
    /// The host as [`Url`] normalises it (lowercase name, canonical IP).
    host: Host<String>,
    /// `None` matches any port.
    port: Option<u16>,
}

impl HostRule {
    /// Parses `host`, `host:port`, `1.2.3.4:port` or `[v6]:port`.
    ///
    /// # Errors
    /// A message when the entry is not a host.
    pub fn parse(entry: &str) -> Result<Self, String> {
        let entry = entry.trim();
        if entry.is_empty() || entry.contains(['/', '@', '?', '#', '\\']) {
            return Err(format!("{entry:?} is not a host or host:port"));
        }
        // A scheme without a default port, so that an explicit `:80` or `:443` is kept.
        let url = Url::parse(&format!("x-host://{entry}")).map_err(|e| format!("{entry:?}: {e}"))?;
        let host = url.host().ok_or_else(|| format!("{entry:?} has no host"))?;
        let host = match host {
            // A non-special scheme leaves IPv4 spellings as names; parse them the http way.
            Host::Domain(name) => Url::parse(&format!("http://{name}/"))
                .ok()
                .and_then(|u| u.host().map(|h| h.to_owned()))
                .ok_or_else(|| format!("{entry:?} is not a host"))?,
            other => other.to_owned(),
        };
        Ok(Self { host, port: url.port() })
    }

    /// The rule for the origin of `url` (its host and port, the scheme's default port included).
    pub fn of_url(url: &Url) -> Option<Self> {
        Some(Self { host: url.host()?.to_owned(), port: url.port_or_known_default() })
    }

    fn matches(&self, host: &Host<&str>, port: Option<u16>) -> bool {
        self.host == host.to_owned() && self.port.is_none_or(|p| Some(p) == port)
    }

    fn matches_name(&self, name: &str) -> bool {
        match &self.host {
            Host::Domain(d) => d.eq_ignore_ascii_case(name.trim_end_matches(']').trim_start_matches('[')),
            Host::Ipv4(ip) => name.parse::<Ipv4Addr>().is_ok_and(|n| n == *ip),
            Host::Ipv6(ip) => name.trim_matches(['[', ']']).parse::<Ipv6Addr>().is_ok_and(|n| n == *ip),
        }
    }
}

impl std::fmt::Display for HostRule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// The URL policy: built once from the settings, shared by job parsing, the DNS resolver and the
/// redirect policy of the download client.
#[derive(Debug, Clone)]
pub struct UrlPolicy {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    /// `AUDIO_GENERATION_SERVICE_URL`: what relative URLs resolve against.
    base: Url,
    /// Hosts an absolute URL (or a redirect) may name.
    allowed: Vec<HostRule>,
    /// Hosts that may be, or resolve to, non-public addresses.
    private_ok: Vec<HostRule>,
}

impl UrlPolicy {
    /// A policy with explicit host lists. An empty `allowed` list means the base's origin only;
    /// an empty `private_ok` list means no host may use a non-public address (so the base's
    /// own host must be listed when it is one, as on a laptop or in a cluster).
    pub fn new(base: Url, allowed: Vec<HostRule>, private_ok: Vec<HostRule>) -> Self {
        let allowed =
            if allowed.is_empty() { HostRule::of_url(&base).into_iter().collect() } else { allowed };
        Self { inner: Arc::new(Inner { base, allowed, private_ok }) }
    }

    /// The defaults: absolute URLs only to the base's origin, which may be a private address.
    pub fn for_base(base: Url) -> Self {
        let origin: Vec<HostRule> = HostRule::of_url(&base).into_iter().collect();
        Self::new(base, origin.clone(), origin)
    }

    /// `AUDIO_GENERATION_SERVICE_URL`.
    pub fn base(&self) -> &Url {
        &self.inner.base
    }

    /// `AUDIO_URL_ALLOWED_HOSTS`, as applied.
    pub fn allowed_hosts(&self) -> &[HostRule] {
        &self.inner.allowed
    }

    /// `AUDIO_URL_PRIVATE_HOSTS`, as applied.
    pub fn private_hosts(&self) -> &[HostRule] {
        &self.inner.private_ok
    }

    /// Resolves a job's `audio_url` (relative or absolute) to the URL to download, or refuses it.
    ///
    /// # Errors
    /// [`Refused`] with the rule that was broken; nothing has been requested.
    pub fn resolve(&self, audio_url: &str) -> Result<Url, Refused> {
        let audio_url = audio_url.trim_matches(' ');
        if audio_url.is_empty() {
            return Err(Refused("audio_url is empty".into()));
        }
        check_raw(audio_url)?;
        // The parser itself tells absolute from relative: no guess of ours can disagree with it.
        let absolute = match Url::parse(audio_url) {
            Ok(url) => Some(url),
            Err(url::ParseError::RelativeUrlWithoutBase) => None,
            Err(e) => return Err(Refused(format!("audio_url does not parse: {e}"))),
        };
        if let Some(url) = absolute {
            self.check_absolute(&url)?;
            Ok(url)
        } else if audio_url.starts_with("//") {
            Err(Refused("scheme-relative URLs are not accepted".into()))
        } else {
            let dir = base_dir(&self.inner.base);
            // `./` first, so that a first segment like `http:x` is a path segment, not a
            // same-scheme reference that the parser would resolve on its own terms.
            let url = dir
                .join(&format!("./{}", audio_url.trim_start_matches('/')))
                .map_err(|e| Refused(format!("audio_url does not resolve against the base: {e}")))?;
            // Belt and braces: whatever the parser did, the result stays under the base path.
            if url.origin() != dir.origin() || !url.path().starts_with(dir.path()) {
                return Err(Refused(format!("{} is outside {}", url.path(), dir.path())));
            }
            Ok(url)
        }
    }

    /// Checks an absolute URL (a job's, or a redirect's `Location`) against rules 2 and 3 as far
    /// as they can be checked without DNS: scheme, user-info, host list, IP literals.
    ///
    /// # Errors
    /// [`Refused`] naming the rule.
    pub fn check_absolute(&self, url: &Url) -> Result<(), Refused> {
        if !matches!(url.scheme(), "http" | "https") {
            return Err(Refused(format!("scheme {} is not http or https", url.scheme())));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(Refused("URLs with user-info (credentials) are not accepted".into()));
        }
        let host = url.host().ok_or_else(|| Refused("URL has no host".into()))?;
        let port = url.port_or_known_default();
        if !self.inner.allowed.iter().any(|rule| rule.matches(&host, port)) {
            return Err(Refused(format!(
                "host {host}{} is not in AUDIO_URL_ALLOWED_HOSTS",
                port_suffix(url)
            )));
        }
        let ip = match host {
            Host::Ipv4(ip) => IpAddr::V4(ip),
            Host::Ipv6(ip) => IpAddr::V6(ip),
            Host::Domain(name) => {
                // The resolver sees names, not ports: a name that may resolve to a private address
                // only on the ports its AUDIO_URL_PRIVATE_HOSTS entries name is refused on others.
                let named = self.inner.private_ok.iter().filter(|r| r.matches_name(name));
                if named.clone().next().is_some() && !named.clone().any(|r| r.matches(&host, port)) {
                    let ports: Vec<String> = named.filter_map(|r| r.port.map(|p| p.to_string())).collect();
                    return Err(Refused(format!(
                        "host {name}{} may reach a private address only on port {} (AUDIO_URL_PRIVATE_HOSTS)",
                        port_suffix(url),
                        ports.join(", ")
                    )));
                }
                return Ok(());
            }
        };
        if self.inner.private_ok.iter().any(|rule| rule.matches(&host, port)) {
            return Ok(());
        }
        match non_public(ip) {
            Some(kind) => Err(Refused(format!("address {ip} is {kind} and not in AUDIO_URL_PRIVATE_HOSTS"))),
            None => Ok(()),
        }
    }

    /// Whether `name` (a host name being resolved) may resolve to non-public addresses.
    fn private_ok_name(&self, name: &str) -> bool {
        self.inner.private_ok.iter().any(|rule| rule.matches_name(name))
    }

    /// The cleanup URL for a downloaded temporary file: `{base}/api/cleanup/temp/{filename}`, only
    /// when `audio` is `{base}/temp/{filename}` on the base's origin and `filename` is one path
    /// segment (no `/` or `\` even percent-encoded, not a dot segment).
    pub fn cleanup_url(&self, audio: &Url) -> Option<Url> {
        let dir = base_dir(&self.inner.base);
        let temp = format!("{}temp/", dir.path());
        let filename = audio.path().strip_prefix(&temp)?;
        if audio.origin() != dir.origin() || audio.query().is_some() || !is_one_segment(filename) {
            return None;
        }
        // `filename` is already percent-encoded; join would not encode it a second time.
        dir.join(&format!("api/cleanup/temp/{filename}")).ok()
    }

    /// The redirect policy of the download client: at most [`MAX_REDIRECTS`], each target checked
    /// with [`UrlPolicy::check_absolute`] (its addresses are then checked by the resolver).
    pub fn redirect_policy(&self) -> reqwest::redirect::Policy {
        let policy = self.clone();
        reqwest::redirect::Policy::custom(move |attempt| {
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(Refused(format!("more than {MAX_REDIRECTS} redirects")));
            }
            match policy.check_absolute(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(refused) => {
                    let refused = Refused(format!("redirect: {}", refused.0));
                    attempt.error(refused)
                }
            }
        })
    }

    /// The DNS resolver of the download client, enforcing rule 3 on every connection.
    pub fn resolver(&self) -> PolicyResolver {
        PolicyResolver { policy: self.clone() }
    }
}

/// A DNS resolver that drops non-public addresses of hosts not in `AUDIO_URL_PRIVATE_HOSTS`, and
/// fails with [`Refused`] when nothing is left, so no connection is ever opened to them.
#[derive(Debug, Clone)]
pub struct PolicyResolver {
    policy: UrlPolicy,
}

impl reqwest::dns::Resolve for PolicyResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy.clone();
        let name = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: Vec<SocketAddr> = tokio::net::lookup_host((name.as_str(), 0)).await?.collect();
            if policy.private_ok_name(&name) {
                return Ok(Box::new(addrs.into_iter()) as reqwest::dns::Addrs);
            }
            let (public, refused): (Vec<SocketAddr>, Vec<SocketAddr>) =
                addrs.into_iter().partition(|a| non_public(a.ip()).is_none());
            if public.is_empty()
                && let Some(first) = refused.first()
            {
                let kind = non_public(first.ip()).unwrap_or("not public");
                return Err(Box::new(Refused(format!(
                    "{name} resolves to {} ({kind}), not in AUDIO_URL_PRIVATE_HOSTS",
                    first.ip()
                ))) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(public.into_iter()) as reqwest::dns::Addrs)
        })
    }
}

/// The first [`Refused`] in an error's source chain: how a refusal by the resolver or the
/// redirect policy is told apart from a network failure inside a `reqwest::Error`.
pub fn find_refusal<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a Refused> {
    let mut current = Some(error);
    while let Some(e) = current {
        if let Some(refused) = e.downcast_ref::<Refused>() {
            return Some(refused);
        }
        current = e.source();
    }
    None
}

/// What kind of non-public address `ip` is, or `None` for a public one.
pub fn non_public(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => non_public_v4(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return non_public_v4(v4).map(|_| "an IPv4-mapped non-public address");
            }
            let seg = v6.segments();
            // NAT64 (64:ff9b::/96) and 6to4 (2002::/16) embed an IPv4 address that is reached.
            if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
                let v4 = Ipv4Addr::new((seg[6] >> 8) as u8, seg[6] as u8, (seg[7] >> 8) as u8, seg[7] as u8);
                return non_public_v4(v4).map(|_| "a NAT64 form of a non-public address");
            }
            if seg[0] == 0x2002 {
                let v4 = Ipv4Addr::new((seg[1] >> 8) as u8, seg[1] as u8, (seg[2] >> 8) as u8, seg[2] as u8);
                return non_public_v4(v4).map(|_| "a 6to4 form of a non-public address");
            }
            if v6.is_loopback() {
                Some("loopback")
            } else if v6.is_unspecified() {
                Some("unspecified")
            } else if v6.is_multicast() {
                Some("multicast")
            } else if seg[0] & 0xffc0 == 0xfe80 {
                Some("link-local")
            } else if seg[0] & 0xfe00 == 0xfc00 {
                // Includes fd00:ec2::254, the AWS metadata service over IPv6.
                Some("unique-local")
            } else if seg[0] & 0xffc0 == 0xfec0 {
                Some("site-local")
            } else if seg[0] == 0x2001 && seg[1] == 0x0db8 {
                Some("documentation")
            } else if v6.to_ipv4().is_some() {
                // IPv4-compatible (::a.b.c.d), deprecated and never a real destination.
                Some("an IPv4-compatible address")
            } else {
                None
            }
        }
    }
}

fn non_public_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    if ip == Ipv4Addr::new(169, 254, 169, 254) || ip == Ipv4Addr::new(100, 100, 100, 200) {
        Some("a cloud metadata address")
    } else if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (CGNAT)")
    } else if a == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("broadcast, multicast or reserved")
    } else if ip.is_documentation() || (a == 198 && (b & 0xfe) == 18) {
        Some("documentation or benchmarking")
    } else if a == 192 && b == 0 && c == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

/// Rule 1 on the raw text, before any parser normalises it. No control character anywhere (the
/// URL parser drops tabs and newlines inside a URL and C0 controls around it, which would join
/// `.<TAB>.` into `..` after any check); and in everything before the query, decoded however
/// often it was encoded: no backslash (read as `/`), no NUL, no dot segment. The whole text is
/// checked, scheme and authority included, since neither can legitimately be `.` or `..` or
/// hold a backslash; that leaves no "which part is the path" guess to get wrong.
fn check_raw(audio_url: &str) -> Result<(), Refused> {
    if audio_url.chars().any(char::is_control) {
        return Err(Refused("control characters are not accepted in audio_url".into()));
    }
    // Raw backslashes anywhere, the query included: some servers read them as `/`.
    if audio_url.contains('\\') {
        return Err(Refused("backslashes are not accepted in audio_url".into()));
    }
    let before_query = audio_url.split(['?', '#']).next().unwrap_or_default();
    let decoded = fully_decoded(before_query);
    if decoded.contains('\\') {
        return Err(Refused("backslashes are not accepted in audio_url".into()));
    }
    if decoded.contains('\0') {
        return Err(Refused("NUL is not accepted in audio_url".into()));
    }
    if decoded.chars().any(char::is_control) {
        return Err(Refused("encoded control characters are not accepted in audio_url".into()));
    }
    // Segments are cut on the decoded text, so `%2F..%2F` is seen as the `..` it becomes.
    if decoded.split('/').any(|segment| matches!(segment.trim(), "." | "..")) {
        return Err(Refused("dot segments (. or ..) are not accepted in audio_url".into()));
    }
    Ok(())
}

/// Percent-decodes until nothing changes (at most 4 rounds), so `%252e%252e` is seen as `..`.
fn fully_decoded(text: &str) -> String {
    let mut current = text.to_owned();
    for _ in 0..4 {
        let next = percent_decode_str(&current).decode_utf8_lossy().into_owned();
        if next == current {
            break;
        }
        current = next;
    }
    current
}

fn is_one_segment(encoded: &str) -> bool {
    let decoded = fully_decoded(encoded);
    !encoded.is_empty() && !decoded.contains(['/', '\\', '\0']) && !matches!(decoded.trim(), "" | "." | "..")
}

fn port_suffix(url: &Url) -> String {
    url.port().map(|p| format!(":{p}")).unwrap_or_default()
}

/// The base with a trailing slash, so that `join` appends instead of replacing the last segment.
pub(crate) fn base_dir(base: &Url) -> Url {
    let mut dir = base.clone();
    if !dir.path().ends_with('/') {
        let path = format!("{}/", dir.path());
        dir.set_path(&path);
    }
    dir.set_query(None);
    dir.set_fragment(None);
    dir
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(extra_allowed: &[&str]) -> UrlPolicy {
        let base = Url::parse("http://gen.internal:3000/api").unwrap();
        let mut allowed = vec![HostRule::of_url(&base).unwrap()];
        allowed.extend(extra_allowed.iter().map(|h| HostRule::parse(h).unwrap()));
        UrlPolicy::new(base.clone(), allowed, vec![HostRule::of_url(&base).unwrap()])
    }

    #[test]
    fn relative_urls_resolve_under_the_base_only() {
        let p = policy(&[]);
        assert_eq!(p.resolve("/temp/x.wav").unwrap().as_str(), "http://gen.internal:3000/api/temp/x.wav");
        assert_eq!(
            p.resolve("temp/a b.wav").unwrap().as_str(),
            "http://gen.internal:3000/api/temp/a%20b.wav"
        );
        for bad in [
            "../x.wav",
            "/temp/../../etc/passwd",
            "/temp/%2e%2e/x",
            "/temp/%2E%2E/x",
            "/temp/.%2e/x",
            "/temp/%252e%252e/x",
            "/temp/..%2fx",
            "/temp/%2e%2e%2fx",
            "/temp/..\\x",
            "/temp\\..\\x",
            "/temp/%5c..%5cx",
            "./temp/x.wav",
            "/temp/%00.wav",
            "//evil.example/x.wav",
        ] {
            let err = p.resolve(bad).unwrap_err();
            assert!(!err.0.is_empty(), "{bad}");
        }
    }

    #[test]
    fn absolute_urls_need_an_allowed_host_and_no_credentials() {
        let p = policy(&["cdn.example.com"]);
        assert!(p.resolve("http://gen.internal:3000/api/temp/x.wav").is_ok());
        assert!(p.resolve("https://cdn.example.com/a.wav").is_ok());
        assert!(p.resolve("https://CDN.Example.COM/a.wav").is_ok());
        for (bad, why) in [
            ("http://gen.internal:3001/temp/x.wav", "AUDIO_URL_ALLOWED_HOSTS"),
            ("http://cdn.example.com./a.wav", "AUDIO_URL_ALLOWED_HOSTS"),
            ("http://cdn.example.com.evil.io/a.wav", "AUDIO_URL_ALLOWED_HOSTS"),
            ("http://evil.io/cdn.example.com/a.wav", "AUDIO_URL_ALLOWED_HOSTS"),
            ("http://cdn.example.com@evil.io/a.wav", "user-info"),
            ("http://user:pw@cdn.example.com/a.wav", "user-info"),
            ("ftp://cdn.example.com/a.wav", "scheme"),
            ("file:///etc/passwd", "scheme"),
            ("gopher://cdn.example.com/", "scheme"),
        ] {
            let err = p.resolve(bad).unwrap_err();
            assert!(err.0.contains(why), "{bad}: {err}");
        }
    }

    #[test]
    fn a_private_host_is_private_only_on_its_port() {
        // Any port of gen.internal is allowed, but only :3000 may be a private address.
        let base = Url::parse("http://gen.internal:3000/api").unwrap();
        let p = UrlPolicy::new(
            base.clone(),
            vec![HostRule::parse("gen.internal").unwrap(), HostRule::parse("10.0.0.9").unwrap()],
            vec![HostRule::of_url(&base).unwrap(), HostRule::parse("10.0.0.9:8080").unwrap()],
        );
        assert!(p.resolve("http://gen.internal:3000/temp/x.wav").is_ok());
        let err = p.resolve("http://gen.internal:22/temp/x.wav").unwrap_err();
        assert!(err.0.contains("only on port 3000"), "{err}");
        assert!(
            p.resolve("http://gen.internal/temp/x.wav").unwrap_err().0.contains("AUDIO_URL_PRIVATE_HOSTS")
        );
        assert!(p.resolve("http://10.0.0.9:8080/x.wav").is_ok());
        assert!(p.resolve("http://10.0.0.9:9090/x.wav").unwrap_err().0.contains("private"));
    }

    #[test]
    fn ip_literals_in_every_spelling_are_checked() {
        let p = policy(&[
            "127.0.0.1",
            "[::1]",
            "169.254.169.254",
            "10.0.0.1",
            "[::ffff:7f00:1]",
            "93.184.216.34",
        ]);
        for (bad, kind) in [
            ("http://127.0.0.1/x.wav", "loopback"),
            ("http://2130706433/x.wav", "loopback"),
            ("http://0x7f000001/x.wav", "loopback"),
            ("http://0177.0.0.1/x.wav", "loopback"),
            ("http://127.1/x.wav", "loopback"),
            ("http://[::1]/x.wav", "loopback"),
            ("http://[::ffff:127.0.0.1]/x.wav", "IPv4-mapped"),
            ("http://169.254.169.254/latest/meta-data/", "metadata"),
            ("http://2852039166/latest/meta-data/", "metadata"),
            ("http://10.0.0.1/x.wav", "private"),
        ] {
            let err = p.resolve(bad).unwrap_err();
            assert!(err.0.contains(kind), "{bad}: {err}");
        }
        assert!(p.resolve("http://93.184.216.34/x.wav").is_ok());
    }

    #[test]
    fn address_classes() {
        for ip in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.0.1",
            "100.64.0.1",
            "100.100.100.200",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "fd00:ec2::254",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "2002:7f00:1::",
        ] {
            assert!(non_public(ip.parse().unwrap()).is_some(), "{ip}");
        }
        for ip in ["93.184.216.34", "8.8.8.8", "2606:4700::1111", "100.128.0.1"] {
            assert_eq!(non_public(ip.parse().unwrap()), None, "{ip}");
        }
    }

    #[test]
    fn cleanup_targets_one_segment_under_the_cleanup_path() {
        let p = UrlPolicy::for_base(Url::parse("http://h:3000").unwrap());
        let cleanup = |u: &str| p.cleanup_url(&p.resolve(u).unwrap()).map(|u| u.to_string());
        assert_eq!(
            cleanup("/temp/my file.wav").as_deref(),
            Some("http://h:3000/api/cleanup/temp/my%20file.wav")
        );
        assert_eq!(cleanup("/temp/a%2Fb.wav"), None);
        assert!(p.resolve("/temp/a%5Cb.wav").is_err(), "a backslash never gets this far");
        assert_eq!(cleanup("/temp/sub/x.wav"), None);
        assert_eq!(cleanup("/temp/x.wav?y=1"), None);
        assert_eq!(cleanup("/other/x.wav"), None);
    }

    #[test]
    fn host_rules_parse_ports_and_ip_spellings() {
        assert_eq!(HostRule::parse("h:80").unwrap().to_string(), "h:80");
        assert_eq!(HostRule::parse("H.Example").unwrap().to_string(), "h.example");
        assert_eq!(HostRule::parse("2130706433").unwrap().to_string(), "127.0.0.1");
        assert_eq!(HostRule::parse("[::1]:9").unwrap().to_string(), "[::1]:9");
        for bad in ["", "http://h", "a/b", "u@h"] {
            assert!(HostRule::parse(bad).is_err(), "{bad:?}");
        }
    }

    /// A relative URL whose first segment looks like a scheme stays a path segment.
    #[test]
    fn a_scheme_lookalike_in_a_relative_url_is_a_path_segment() {
        let p = UrlPolicy::for_base(Url::parse("http://gen.internal:3000/api").unwrap());
        let url = p.resolve("/http:x%2fy.wav").unwrap();
        assert_eq!(url.as_str(), "http://gen.internal:3000/api/http:x%2fy.wav");
        // Found by fuzzing: this used to resolve to `/api/.%2f…`, a dot segment once decoded.
        let url = p.resolve("/http:.%2f\u{20c8}").unwrap();
        assert_eq!(url.path(), "/api/http:.%2f%E2%83%88");
    }

    /// Every input the fuzzer found (tests/fixtures/fuzz-regressions) is refused, both as an
    /// `audio_url` and inside a whole job.
    #[test]
    fn fuzz_regressions_are_refused() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/fuzz-regressions");
        let p = UrlPolicy::for_base(Url::parse("http://gen.internal:3000/api").unwrap());
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).unwrap().flatten() {
            let name = entry.file_name().to_string_lossy().into_owned();
            let bytes = std::fs::read(entry.path()).unwrap();
            if name.starts_with("url_resolve-") {
                let text = String::from_utf8_lossy(&bytes);
                match p.resolve(&text) {
                    Err(_) => {}
                    // A file name that only looks odd is fine, as long as it stays one clean
                    // path under the base.
                    Ok(url) => {
                        let decoded = fully_decoded(url.path());
                        assert!(url.path().starts_with("/api/"), "{name}: {url}");
                        assert!(!decoded.split('/').any(|s| s == "." || s == ".."), "{name}: {url}");
                    }
                }
                seen += 1;
            } else if name.starts_with("job_parse-") {
                assert!(crate::job::SaveAudioJob::parse(&bytes, &p).is_err(), "{name}");
                seen += 1;
            }
        }
        assert!(seen >= 16, "{seen} regression inputs");
    }
}
