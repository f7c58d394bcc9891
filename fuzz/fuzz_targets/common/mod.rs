//! Invariants shared by the fuzz targets. Every violation panics with
//! `invariant <name> violated: ...`, so a crash names the rule it broke.
//!
//! While triaging, known violations can be skipped so that a run goes on to find others:
//! `FUZZ_ALLOW=traversal_contained,cleanup_filename scripts/fuzz.sh ...`.
#![allow(dead_code)]

use std::sync::OnceLock;

use std::net::{IpAddr, Ipv4Addr};

use audio_worker::job::{AudioSource, Job, resolve_audio_source};
use audio_worker::audio::AudioFormat;
use audio_worker::asset::object_key;
use audio_worker::url_policy::{HostRule, UrlPolicy};
use url::{Host, Url};

/// The base URL of the generation service in the job targets.
pub const BASE: &str = "http://gen.internal:3000/api";

/// Bases the URL target resolves every input against: with and without a trailing slash, the
/// root, and a deeper path on https.
pub const BASES: &[&str] = &[
    "http://gen.internal:3000/api",
    "http://gen.internal:3000/api/",
    "http://gen.internal:3000",
    "https://gen.internal/tts/v1",
];

/// Hosts the "wide" policy allows besides the base: a CDN name, a public IP, and non-public IPs
/// that are allowed but not in the private list (so rule 3 must refuse them).
pub const WIDE_ALLOWED: &[&str] = &[
    "cdn.example.com",
    "93.184.216.34",
    "127.0.0.1",
    "10.0.0.1",
    "169.254.169.254",
    "[::1]",
    "[::ffff:7f00:1]",
];

pub fn base(s: &str) -> Url {
    Url::parse(s).expect("fuzz base URL")
}

/// A policy and what it allows, as the invariants see it.
pub struct Setup {
    pub policy: UrlPolicy,
    /// Hosts (as `Url::host_str` spells them) and ports (None: any) an accepted URL may name.
    pub allowed: Vec<(String, Option<u16>)>,
}

impl Setup {
    /// The default policy of a base: its own origin only.
    pub fn for_base(s: &str) -> Self {
        let b = base(s);
        let allowed = vec![(b.host_str().unwrap().to_owned(), b.port_or_known_default())];
        Self { policy: UrlPolicy::for_base(b), allowed }
    }

    /// The base's origin plus [`WIDE_ALLOWED`]; only the base may be a private address.
    pub fn wide(s: &str) -> Self {
        let b = base(s);
        let origin = HostRule::of_url(&b).unwrap();
        let mut rules = vec![origin.clone()];
        rules.extend(WIDE_ALLOWED.iter().map(|h| HostRule::parse(h).unwrap()));
        let mut allowed = vec![(b.host_str().unwrap().to_owned(), b.port_or_known_default())];
        allowed.extend(WIDE_ALLOWED.iter().map(|h| (h.to_string(), None)));
        Self { policy: UrlPolicy::new(b, rules, vec![origin]), allowed }
    }

    pub fn base(&self) -> &Url {
        self.policy.base()
    }
}

fn allowed(name: &str) -> bool {
    static ALLOW: OnceLock<Vec<String>> = OnceLock::new();
    ALLOW
        .get_or_init(|| {
            std::env::var("FUZZ_ALLOW")
                .unwrap_or_default()
                .split(',')
                .map(|s| s.trim().to_owned())
                .filter(|s| !s.is_empty())
                .collect()
        })
        .iter()
        .any(|a| a == name)
}

macro_rules! check {
    ($name:literal, $cond:expr, $($fmt:tt)*) => {
        if !$cond && !allowed($name) {
            panic!("invariant {} violated: {}", $name, format!($($fmt)*));
        }
    };
}

/// The base's path without its trailing slash: `/api` for `http://h/api/`, `` for `http://h`.
pub fn base_path(base: &Url) -> &str {
    base.path().trim_end_matches('/')
}

fn key_segment_ok(s: &str) -> bool {
    !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// A job that parsed: tenant ids, object keys, and its audio source.
pub fn check_job(job: &Job, setup: &Setup) {
    let (cid, uid) = (job.customer_id.as_str(), job.user_id.as_str());
    check!("tenant_ids", key_segment_ok(cid) && key_segment_ok(uid), "customer_id {cid:?}, user_id {uid:?}");
    for format in [AudioFormat::Wav, AudioFormat::Mp3, AudioFormat::Ogg, AudioFormat::Flac] {
        let key = object_key(job, format);
        let prefix = format!("{cid}/{uid}/audio/");
        check!(
            "object_key",
            key.starts_with(&prefix)
                && !key.contains("//")
                && !key.contains('\\')
                && !key.split('/').any(|s| s == ".." || s == "."),
            "key {key:?} (prefix {prefix:?})"
        );
    }
    check_source(setup, &job.source);
}

/// Any resolved source: http(s) with a host; a cleanup URL only for `{base}/temp/{one file}`, and
/// then exactly `{base}/api/cleanup/temp/{that file}` on the base's origin.
pub fn check_source(setup: &Setup, src: &AudioSource) {
    let base = setup.base();
    let url = &src.url;
    check!("source_scheme_host", matches!(url.scheme(), "http" | "https"), "scheme of {url}");
    check!("source_scheme_host", url.host_str().is_some_and(|h| !h.is_empty()), "no host in {url}");
    check!("no_userinfo", url.username().is_empty() && url.password().is_none(), "{url}");
    let (host, port) = (url.host_str().unwrap_or_default(), url.port_or_known_default());
    check!(
        "allowed_host",
        setup.allowed.iter().any(|(h, p)| h == host && p.is_none_or(|p| Some(p) == port)),
        "{url}: {host} port {port:?} is not in {:?}",
        setup.allowed
    );
    if url.host() != base.host() {
        let ip = match url.host() {
            Some(Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
            Some(Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
            _ => None,
        };
        check!("public_ip", ip.is_none_or(is_public), "{url}: {ip:?} is not public");
    }
    let Some(cleanup) = &src.cleanup_url else { return };
    let bp = base_path(base);
    check!("cleanup_origin", cleanup.origin() == base.origin(), "cleanup {cleanup} for base {base}");
    let prefix = format!("{bp}/api/cleanup/temp/");
    let file = cleanup.path().strip_prefix(&prefix);
    check!(
        "cleanup_path",
        file.is_some_and(|f| !f.is_empty() && !f.contains('/'))
            && cleanup.query().is_none()
            && cleanup.fragment().is_none(),
        "cleanup {cleanup} is not {prefix}{{one segment}} (base {base}, audio {url})"
    );
    let file = file.unwrap_or_default();
    // What the generation service sees once it has percent-decoded the file name.
    let decoded = percent_encoding::percent_decode_str(file).decode_utf8_lossy();
    check!(
        "cleanup_filename",
        !decoded.is_empty() && !decoded.contains(['/', '\\']) && decoded != "." && decoded != "..",
        "cleanup {cleanup}: file name {file:?} decodes to {decoded:?} (audio {url})"
    );
    check!(
        "cleanup_matches_source",
        url.origin() == base.origin() && url.path() == format!("{bp}/temp/{file}"),
        "cleanup {cleanup} for audio {url} (base {base})"
    );
}

/// True when the input is relative in the URL standard's sense (what `Url::parse` refuses for
/// lack of a base).
pub fn is_relative(input: &str) -> bool {
    matches!(Url::parse(input.trim()), Err(url::ParseError::RelativeUrlWithoutBase))
}

/// True when the input has a `..` path segment (literal or `%2e`, any case, after the tab and
/// newline removal the URL parser does) or a backslash anywhere.
pub fn has_traversal(input: &str) -> bool {
    let s: String = input.chars().filter(|c| !matches!(c, '\t' | '\n' | '\r')).collect();
    if s.contains('\\') {
        return true;
    }
    let path = s.split(['?', '#']).next().unwrap_or_default().to_ascii_lowercase().replace("%2e", ".");
    path.split('/').any(|seg| seg == "..")
}

/// Rule 1 of the URL policy as documented: no dot segment however percent-encoded (4 rounds,
/// like the policy), no backslash and no NUL before the query, looking at the input after the
/// tab/newline removal the URL parser does. The whole text is checked, scheme and authority
/// included: no allowed URL has a dot segment, backslash or NUL there either. Leading and
/// trailing C0 controls and spaces are dropped first, as the URL parser drops them.
pub fn breaks_rule1(input: &str) -> bool {
    let s: String = input
        .trim()
        .trim_matches(|c| c <= ' ')
        .chars()
        .filter(|c| !matches!(c, '\t' | '\n' | '\r'))
        .collect();
    let mut decoded = s.split(['?', '#']).next().unwrap_or_default().to_owned();
    for _ in 0..4 {
        let next = percent_encoding::percent_decode_str(&decoded).decode_utf8_lossy().into_owned();
        if next == decoded {
            break;
        }
        decoded = next;
    }
    decoded.contains(['\\', '\0']) || decoded.split('/').any(|seg| matches!(seg.trim(), "." | ".."))
}

/// What `resolve_audio_source(base, input)` returned, checked against the input.
pub fn check_resolution(setup: &Setup, input: &str, src: &AudioSource) {
    let base = setup.base();
    let url = &src.url;
    let under = format!("{}/", base_path(base));
    let inside = url.origin() == base.origin() && url.path().starts_with(&under);
    let rule1 = breaks_rule1(input);
    check!("rule1_refused", !rule1, "{input:?} was accepted as {url}");
    // The same rule on the output: the path of an accepted URL, fully decoded, is clean.
    let dirty = breaks_rule1(url.path());
    check!("resolved_path_clean", !dirty, "{input:?} was accepted as {url}");
    if has_traversal(input) {
        check!("traversal_contained", inside, "{input:?} resolved to {url}, outside {base} (path {under}*)");
    }
    if is_relative(input) {
        check!(
            "relative_same_origin",
            url.origin() == base.origin(),
            "{input:?} resolved to {url}, base {base}"
        );
        check!(
            "relative_under_base",
            url.path().starts_with(&under),
            "{input:?} resolved to {url}, not under {under}"
        );
    }
    // "Encoded exactly once": resolving the resolved URL gives it back. (Not for an input that
    // should have been refused: its resolved form may well be refused, as it should.)
    if rule1 || dirty {
        return;
    }
    match resolve_audio_source(&setup.policy, url.as_str()) {
        Ok(again) => check!("resolve_idempotent", &again == src, "{input:?} -> {url} -> {}", again.url),
        Err(e) => check!("resolve_idempotent", false, "{input:?} -> {url} -> error {e}"),
    }
}

/// An independent (and deliberately simple) notion of a public address.
fn is_public(ip: IpAddr) -> bool {
    let v4_public = |v4: Ipv4Addr| {
        let [a, b, ..] = v4.octets();
        !(v4.is_loopback()
            || v4.is_private()
            || v4.is_link_local()
            || v4.is_unspecified()
            || v4.is_broadcast()
            || v4.is_multicast()
            || v4.is_documentation()
            || a == 0
            || a >= 240
            || (a == 100 && (64..128).contains(&b)))
    };
    match ip {
        IpAddr::V4(v4) => v4_public(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => v4_public(v4),
            None => {
                let s0 = v6.segments()[0];
                !(v6.is_loopback()
                    || v6.is_unspecified()
                    || v6.is_multicast()
                    || s0 & 0xfe00 == 0xfc00
                    || s0 & 0xffc0 == 0xfe80)
            }
        },
    }
}
