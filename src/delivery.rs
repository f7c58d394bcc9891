//! How a client without S3 credentials fetches what the worker stores: the URL handed out beside
//! every key (`DELIVERY`), in the document and in `audio.saved`.
//!
//! - `presigned` (the default): an S3 presigned GET URL, signed by [`crate::pipeline::store`]
//!   with the worker's own credentials. It works for at most 7 days (SigV4's limit), and no
//!   longer than those credentials: a URL signed with temporary credentials (an IAM role's
//!   session) stops working when the session ends.
//! - `public`: `{PUBLIC_BASE_URL}/{key}`, for a bucket served as it is behind a CDN (or a public
//!   bucket). It never expires; anyone holding it can fetch the object.
//! - `cloudfront`: a CloudFront signed URL with a canned policy: `{PUBLIC_BASE_URL}/{key}` with
//!   `Expires`, `Signature` and `Key-Pair-Id`, valid until `DELIVERY_URL_EXPIRY_SECS` after it
//!   was made. The signature is RSASSA-PKCS1-v1_5 with SHA-1 over the policy (what CloudFront
//!   verifies), made in process with the `rsa` crate from the key in
//!   `CLOUDFRONT_PRIVATE_KEY_FILE`, read and checked at start-up.
//!
//! Every key segment is percent-encoded when a URL is built (the segments are safe ASCII
//! already: tenant ids of `[A-Za-z0-9_-]`, a UUID, an extension; this keeps it so).

use std::time::Duration;

use chrono::{DateTime, Utc};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::DecodePrivateKey;
use rsa::signature::{SignatureEncoding, Signer};

/// The longest `DELIVERY_URL_EXPIRY_SECS` accepted: 365 days. CloudFront itself sets no limit on
/// a canned policy's `DateLessThan`; a signed URL that outlives a year is close to a public one,
/// which `DELIVERY=public` says more honestly.
pub const MAX_DELIVERY_URL_EXPIRY_SECS: u64 = 365 * 86_400;

/// The smallest RSA key accepted for CloudFront: 2048 bits, the size CloudFront's public keys
/// are made with.
pub const MIN_KEY_BITS: usize = 2048;

/// Which kind of URL the worker hands out (`DELIVERY`), recorded as `storage.delivery` beside
/// `key` and `url` so that a consumer knows what it holds (whether it expires, what it was
/// signed by) without knowing the worker's settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeliveryMode {
    /// An S3 presigned GET URL (the default).
    #[default]
    Presigned,
    /// `{PUBLIC_BASE_URL}/{key}`, never expiring.
    Public,
    /// A CloudFront signed URL (canned policy).
    CloudFront,
}

impl DeliveryMode {
    /// `presigned`, `public` or `cloudfront`: the `DELIVERY` value and the recorded `delivery`.
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryMode::Presigned => "presigned",
            DeliveryMode::Public => "public",
            DeliveryMode::CloudFront => "cloudfront",
        }
    }

    /// The mode a `DELIVERY` value names (ASCII case ignored); `None` for anything else.
    pub fn parse(value: &str) -> Option<Self> {
        [DeliveryMode::Presigned, DeliveryMode::Public, DeliveryMode::CloudFront]
            .into_iter()
            .find(|mode| value.eq_ignore_ascii_case(mode.as_str()))
    }
}

impl std::fmt::Display for DeliveryMode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How URLs are made, checked once at start-up (see [`crate::config`]).
#[derive(Debug, Clone)]
pub enum Delivery {
    /// S3 presigned GET URLs, made by the store (`PRESIGNED_URL_EXPIRY_SECS`, `S3_PUBLIC_ENDPOINT`).
    Presigned,
    /// `{PUBLIC_BASE_URL}/{key}`.
    Public(PublicBase),
    /// CloudFront signed URLs under `PUBLIC_BASE_URL`.
    CloudFront {
        /// The key, its id and the URLs' lifetime.
        signer: CloudFrontSigner,
        /// `CLOUDFRONT_PRIVATE_KEY_FILE`, where the key was read from at start-up: shown by
        /// `check-config` (the key never is).
        key_file: std::path::PathBuf,
    },
}

impl Delivery {
    /// Which mode this is, as recorded beside each URL.
    pub fn mode(&self) -> DeliveryMode {
        match self {
            Delivery::Presigned => DeliveryMode::Presigned,
            Delivery::Public(_) => DeliveryMode::Public,
            Delivery::CloudFront { .. } => DeliveryMode::CloudFront,
        }
    }
}

/// `PUBLIC_BASE_URL`: the CDN's address for the bucket's root, e.g.
/// `https://d111111abcdef8.cloudfront.net` or `https://cdn.example.com/audio` (a path prefix is
/// kept). Held without a trailing `/`; it has no query, fragment or user-info.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PublicBase(String);

impl PublicBase {
    /// Checks and normalises a `PUBLIC_BASE_URL` value.
    ///
    /// # Errors
    /// A message saying what is wrong: not an absolute `http(s)://` URL with a host, or it has a
    /// query, a fragment or user-info (none of which a CDN URL for a key can carry).
    pub fn parse(raw: &str) -> Result<Self, String> {
        let url = url::Url::parse(raw).map_err(|e| format!("is not an absolute URL ({e})"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err("must be an http:// or https:// URL with a host".into());
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err("must not have a query or a fragment: keys are appended to its path".into());
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err("must not carry user-info (user:password@)".into());
        }
        Ok(Self(url.as_str().trim_end_matches('/').to_owned()))
    }

    /// `{base}/{key}`, each `/`-separated segment of `key` percent-encoded (everything but
    /// unreserved characters, RFC 3986), so the URL names exactly that key.
    pub fn url_for(&self, key: &str) -> String {
        let mut url = self.0.clone();
        for segment in key.split('/') {
            url.push('/');
            url.extend(percent_encoding::utf8_percent_encode(segment, SEGMENT));
        }
        url
    }
}

impl std::fmt::Display for PublicBase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// What a path segment keeps unencoded: RFC 3986's unreserved characters.
const SEGMENT: &percent_encoding::AsciiSet =
    &percent_encoding::NON_ALPHANUMERIC.remove(b'-').remove(b'.').remove(b'_').remove(b'~');

/// A CloudFront key that cannot be used (`CLOUDFRONT_PRIVATE_KEY_FILE`, `CLOUDFRONT_KEY_PAIR_ID`).
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// The file is neither a PKCS#1 (`BEGIN RSA PRIVATE KEY`) nor an unencrypted PKCS#8
    /// (`BEGIN PRIVATE KEY`) RSA private key in PEM.
    #[error("does not hold an RSA private key in PEM (PKCS#1 or unencrypted PKCS#8): {0}")]
    NotAKey(String),
    /// The key is smaller than [`MIN_KEY_BITS`].
    #[error("holds a {0}-bit RSA key; CloudFront keys are at least {MIN_KEY_BITS} bits")]
    TooSmall(usize),
    /// The key parsed but could not sign a policy.
    #[error("holds a key that cannot sign: {0}")]
    CannotSign(String),
    /// The key pair id is not what CloudFront issues (letters and digits, e.g. `K2JCJMDEHXQW5F`).
    #[error("must be the ID of a CloudFront public key: 1-128 ASCII letters and digits")]
    BadKeyPairId,
}

/// Signing failed at run time (the key was checked at start-up, so this is the system's random
/// number generator failing the signature's blinding).
#[derive(Debug, thiserror::Error)]
#[error("signing the CloudFront policy failed: {0}")]
pub struct SignError(String);

/// Signs CloudFront URLs with a canned policy: the key pair id, the private key (parsed once)
/// and how long each URL lasts.
#[derive(Clone)]
pub struct CloudFrontSigner {
    /// `PUBLIC_BASE_URL`: the distribution the URLs are for.
    base: PublicBase,
    /// `CLOUDFRONT_KEY_PAIR_ID`: the ID of the public key in the distribution's trusted key
    /// group; CloudFront finds the key to verify with by it.
    key_pair_id: String,
    /// From `CLOUDFRONT_PRIVATE_KEY_FILE`. RSASSA-PKCS1-v1_5 with SHA-1 (the only signature
    /// CloudFront accepts for signed URLs); each signature is blinded with fresh randomness.
    /// Shared, so that a signature can be made on a blocking thread without copying the key.
    key: std::sync::Arc<rsa::pkcs1v15::SigningKey<sha1::Sha1>>,
    /// `DELIVERY_URL_EXPIRY_SECS`: how long after it is made a URL works.
    expiry: Duration,
}

impl std::fmt::Debug for CloudFrontSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the key.
        f.debug_struct("CloudFrontSigner")
            .field("base", &self.base)
            .field("key_pair_id", &self.key_pair_id)
            .field("expiry", &self.expiry)
            .finish_non_exhaustive()
    }
}

impl CloudFrontSigner {
    /// A signer from the key in `pem` (PKCS#1 or unencrypted PKCS#8). The key is tried once on
    /// a policy, so a key that cannot sign stops start-up rather than every job.
    ///
    /// # Errors
    /// [`KeyError`]: the key pair id or the key cannot be used.
    pub fn new(base: PublicBase, key_pair_id: &str, pem: &str, expiry: Duration) -> Result<Self, KeyError> {
        if key_pair_id.is_empty()
            || key_pair_id.len() > 128
            || !key_pair_id.bytes().all(|b| b.is_ascii_alphanumeric())
        {
            return Err(KeyError::BadKeyPairId);
        }
        let private = if pem.contains("-----BEGIN RSA PRIVATE KEY-----") {
            rsa::PrivateKey::from_pkcs1_pem(pem).map_err(|e| KeyError::NotAKey(e.to_string()))?
        } else if pem.contains("-----BEGIN PRIVATE KEY-----") {
            rsa::PrivateKey::from_pkcs8_pem(pem).map_err(|e| KeyError::NotAKey(e.to_string()))?
        } else if pem.contains("-----BEGIN ENCRYPTED PRIVATE KEY-----") {
            return Err(KeyError::NotAKey(
                "it is encrypted; decrypt it (openssl pkcs8 -topk8 -nocrypt)".into(),
            ));
        } else {
            return Err(KeyError::NotAKey("no BEGIN RSA PRIVATE KEY or BEGIN PRIVATE KEY block".into()));
        };
        let bits = rsa::traits::PublicKeyParts::n(&private).bit_width() as usize;
        if bits < MIN_KEY_BITS {
            return Err(KeyError::TooSmall(bits));
        }
        let signer = Self {
            base,
            key_pair_id: key_pair_id.to_owned(),
            key: std::sync::Arc::new(rsa::pkcs1v15::SigningKey::new(private)),
            expiry,
        };
        signer
            .signature(&canned_policy("https://example.invalid/", 0))
            .map_err(|e| KeyError::CannotSign(e.0))?;
        Ok(signer)
    }

    /// The key pair id URLs carry.
    pub fn key_pair_id(&self) -> &str {
        &self.key_pair_id
    }

    /// The distribution's base URL.
    pub fn base(&self) -> &PublicBase {
        &self.base
    }

    /// How long a URL works after it is made.
    pub fn expiry(&self) -> Duration {
        self.expiry
    }

    /// The signed URL of `key`, valid until `now` + the expiry (whole seconds), and that time.
    /// A signature costs milliseconds of CPU (about 8 ms for a 2048-bit key in the test build):
    /// call it off the async threads.
    ///
    /// # Errors
    /// [`SignError`] when the signature cannot be made.
    pub fn signed_url(&self, key: &str, now: DateTime<Utc>) -> Result<(String, DateTime<Utc>), SignError> {
        let expires =
            now.timestamp().saturating_add(i64::try_from(self.expiry.as_secs()).unwrap_or(i64::MAX));
        let expires_at = DateTime::from_timestamp(expires, 0).unwrap_or(DateTime::<Utc>::MAX_UTC);
        Ok((self.sign_url(&self.base.url_for(key), expires)?, expires_at))
    }

    /// `url` with the canned policy's query parameters: `Expires`, `Signature` and `Key-Pair-Id`
    /// (after `&` when `url` has a query already). The policy's `Resource` is `url` exactly.
    ///
    /// # Errors
    /// [`SignError`] when the signature cannot be made.
    pub fn sign_url(&self, url: &str, expires: i64) -> Result<String, SignError> {
        let signature = self.signature(&canned_policy(url, expires))?;
        let separator = if url.contains('?') { '&' } else { '?' };
        Ok(format!(
            "{url}{separator}Expires={expires}&Signature={signature}&Key-Pair-Id={}",
            self.key_pair_id
        ))
    }

    /// The policy's signature in CloudFront's URL-safe base64.
    fn signature(&self, policy: &str) -> Result<String, SignError> {
        let signature = self.key.try_sign(policy.as_bytes()).map_err(|e| SignError(e.to_string()))?;
        Ok(cloudfront_base64(&signature.to_bytes()))
    }
}

/// The canned policy CloudFront rebuilds from a signed URL and checks the signature against:
/// `{"Statement":[{"Resource":"<url>","Condition":{"DateLessThan":{"AWS:EpochTime":<expires>}}}]}`,
/// byte for byte (no whitespace). `url` is one of ours (no `"` or `\`: every segment is
/// percent-encoded), so it needs no JSON escaping.
pub fn canned_policy(url: &str, expires: i64) -> String {
    format!(
        r#"{{"Statement":[{{"Resource":"{url}","Condition":{{"DateLessThan":{{"AWS:EpochTime":{expires}}}}}}}]}}"#
    )
}

/// Standard base64 with CloudFront's substitutions for characters a query string cannot hold
/// as is: `+` → `-`, `=` → `_`, `/` → `~`.
pub fn cloudfront_base64(bytes: &[u8]) -> String {
    aws_smithy_types::base64::encode(bytes)
        .chars()
        .map(|c| match c {
            '+' => '-',
            '=' => '_',
            '/' => '~',
            c => c,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TEST ONLY: a 2048-bit RSA key made with `openssl genrsa 2048` for these tests, in its PKCS#1
    /// form (`openssl rsa -traditional`). It signs nothing anywhere else.
    const TEST_KEY_PKCS1: &str = "-----BEGIN RSA PRIVATE KEY-----
MIIEowIBAAKCAQEAsm1oVjCh94kr4C58LBeAzPm5rZxS5mpxtgbt/tx7knO0mJf+
6/XwXRCuRuzf+e0SnKZE/Ga/cxdC14OGgiksUEUc6UZ2FdPPG7FlcJ9HvM/hPop3
pD29lWOb7zv5DWc0nzrcTnniFulHFBqbQGZBqUhYxEwwMKSqanxgKpTBE3Cq8vZU
H0G97W8waQ3AJ/WrXHrE4+1/08FJ6fyNt/5XxICFDuAxAQG7IaxR+LfR/gZImKiJ
ZZuZIN5uvzQN2+TjGMdgIXqNDWLgQBk/penAzdNKodyLGEktDkkBtkdReKLuqHRA
LMwmz7a5dg7XBF/GISeL+5Hb+uYu3PfdceQ+lQIDAQABAoIBACVbJKIO8ooZzPbV
pKeykAPaMNa5SN324THEB6X5UWHbGa9s+zE5v4YsjOBKjaYMzX3AjebuOB0HfLYU
UmAD8MQphCEO4IA3ZUAeBufqYSGVwEnQwbXAO2YAgdA3lTAKMIk50JAZko1Lb9c0
rtZv0kV34SXP8bLtdsRun8+qbzX7YQWi01BLIz1cl9YNOj9iqYPtppd+mCZMxKQx
rZv16qkgdosQLdVYChIlgzpUBkX2brzM9qfKbHnzGcDin4WO3ZTYdCQOn7OxHhfd
mgH+ucDQCu5CvkErXvP/1+hrLfyIsD0laNTYcmcA8OjskwqU9KSAKzzEi5lQqDf5
7HmLP40CgYEA/D/HQxcWOTOVXzEf6ULdJDpbdCn4bR9mpPuehTswpLkMMHRxfqCd
/h+vH6uNEe4cCgF0h/jFRKI6/TeP3pMUtPVnj4prSK6rEXfhfKNK6dd6jGnHk7g7
5/yo4p7hfbBdoja2FeckBNCuOLds7gQty7QDqq/cZ9uMs8CengtxpA8CgYEAtRSd
yAENlPLfEzK48JMsGfnIGa8YXHDonEsbonmQ4gYKmrojAU6JZm7wKqLbOHpmJ55t
32rDx4x4uSgIeuGhPDrh0hxHX/CfjpTz3o5oXUlW03ulm8l5UDNTJGdmTggkORl7
CSZ0yFtmdr8qHFyuQHoSxqdqJRxEKf6f4Gyz/xsCgYBsWCSJH4BvH0XYNixjr1F2
vw4K7gADNsqKsHyc8xhomAaxRUJ+RhS2UvuQGcok2mX2sjtQL7zjRt8ZZeUIj5oE
Q6ewkp6UAFn/zcLvGuARYnkDmGedfjNU6EPN2ro1lywQgXliHP5uhwdd2wMRlH/r
D63HgXOktDtR9bjrXzT3ZwKBgHD67f7t+UVny5s02ILxsGB8oka0IqT6pYdurU1Q
P/9l+ZPUcybLk5rfuOVBOzof1ED/7lmpSYHluST9P108DdeAfYkUr8vCXCsf8JB5
ldAuhAfra8apjBFoFIXwJbqmBcPCjCuHXPHtZR7N4z5S7T25bKGZrvZ8jmMNRT9H
U37lAoGBAOZ+eYMsXsookijrfCrRQfXXrOX5+cVh5KowWsogLHqYBdFw09BVFaf4
jyiUZDdMohmBQDC5H5noTAABqKPoCisXIegkLgarIq9ENEgkqA851f4vX7rk5nB+
Ets6ySH2yBjVA+r9wOJ1PPaRSzsxjgPkDXnf9DqouDawWD3x2gW1
-----END RSA PRIVATE KEY-----
";

    /// TEST ONLY: the same key as [`TEST_KEY_PKCS1`] in PKCS#8 (`openssl pkcs8 -topk8 -nocrypt`).
    const TEST_KEY_PKCS8: &str = "-----BEGIN PRIVATE KEY-----
MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQCybWhWMKH3iSvg
LnwsF4DM+bmtnFLmanG2Bu3+3HuSc7SYl/7r9fBdEK5G7N/57RKcpkT8Zr9zF0LX
g4aCKSxQRRzpRnYV088bsWVwn0e8z+E+inekPb2VY5vvO/kNZzSfOtxOeeIW6UcU
GptAZkGpSFjETDAwpKpqfGAqlMETcKry9lQfQb3tbzBpDcAn9atcesTj7X/TwUnp
/I23/lfEgIUO4DEBAbshrFH4t9H+BkiYqIllm5kg3m6/NA3b5OMYx2Aheo0NYuBA
GT+l6cDN00qh3IsYSS0OSQG2R1F4ou6odEAszCbPtrl2DtcEX8YhJ4v7kdv65i7c
991x5D6VAgMBAAECggEAJVskog7yihnM9tWkp7KQA9ow1rlI3fbhMcQHpflRYdsZ
r2z7MTm/hiyM4EqNpgzNfcCN5u44HQd8thRSYAPwxCmEIQ7ggDdlQB4G5+phIZXA
SdDBtcA7ZgCB0DeVMAowiTnQkBmSjUtv1zSu1m/SRXfhJc/xsu12xG6fz6pvNfth
BaLTUEsjPVyX1g06P2Kpg+2ml36YJkzEpDGtm/XqqSB2ixAt1VgKEiWDOlQGRfZu
vMz2p8psefMZwOKfhY7dlNh0JA6fs7EeF92aAf65wNAK7kK+QSte8//X6Gst/Iiw
PSVo1NhyZwDw6OyTCpT0pIArPMSLmVCoN/nseYs/jQKBgQD8P8dDFxY5M5VfMR/p
Qt0kOlt0KfhtH2ak+56FOzCkuQwwdHF+oJ3+H68fq40R7hwKAXSH+MVEojr9N4/e
kxS09WePimtIrqsRd+F8o0rp13qMaceTuDvn/KjinuF9sF2iNrYV5yQE0K44t2zu
BC3LtAOqr9xn24yzwJ6eC3GkDwKBgQC1FJ3IAQ2U8t8TMrjwkywZ+cgZrxhccOic
SxuieZDiBgqauiMBTolmbvAqots4emYnnm3fasPHjHi5KAh64aE8OuHSHEdf8J+O
lPPejmhdSVbTe6WbyXlQM1MkZ2ZOCCQ5GXsJJnTIW2Z2vyocXK5AehLGp2olHEQp
/p/gbLP/GwKBgGxYJIkfgG8fRdg2LGOvUXa/DgruAAM2yoqwfJzzGGiYBrFFQn5G
FLZS+5AZyiTaZfayO1AvvONG3xll5QiPmgRDp7CSnpQAWf/Nwu8a4BFieQOYZ51+
M1ToQ83aujWXLBCBeWIc/m6HB13bAxGUf+sPrceBc6S0O1H1uOtfNPdnAoGAcPrt
/u35RWfLmzTYgvGwYHyiRrQipPqlh26tTVA//2X5k9RzJsuTmt+45UE7Oh/UQP/u
WalJgeW5JP0/XTwN14B9iRSvy8JcKx/wkHmV0C6EB+trxqmMEWgUhfAluqYFw8KM
K4dc8e1lHs3jPlLtPblsoZmu9nyOYw1FP0dTfuUCgYEA5n55gyxeyiiSKOt8KtFB
9des5fn5xWHkqjBayiAsepgF0XDT0FUVp/iPKJRkN0yiGYFAMLkfmehMAAGoo+gK
Kxch6CQuBqsir0Q0SCSoDznV/i9fuuTmcH4S2zrJIfbIGNUD6v3A4nU89pFLOzGO
A+QNed/0Oqi4NrBYPfHaBbU=
-----END PRIVATE KEY-----
";

    const URL: &str =
        "https://d111111abcdef8.cloudfront.net/c1/u1/audio/6f1c2a4e-8d3b-4b7a-9a51-2f0e5c7d9b10.wav";

    /// `openssl dgst -sha1 -sign test-key.pem policy.json | base64 -w0 | tr '+=/' '-_~'` of the
    /// canned policy of [`URL`] expiring at 1767225600 (2026-01-01T00:00:00Z): PKCS#1 v1.5 is
    /// deterministic, so the bytes must be these.
    const OPENSSL_SIGNATURE: &str = "WA-KNl-HvKRMHELdUXku7rTAcvm8BrMxVMZD6-J4~n-dreDpF2ok9AYa1pBLAYJP6vE3U8~maTtf7SFLstz6KJnx6zNDDKeu23NHaFvQ62s8lMXfV4N-CPFjYZQy8lspc8WlG-nhbFa-CC7nbVZ7NW1czxdO9LHlvUqKRyTJNgMPLf4VP~TBD5caAUJA6wIJRGHyL2VVxfMjKzNHdTfBYmGAPgn1IQ24qKlbPa3hpDkWR--SkZ0L3yKn4RERr21~th6DEJ5JLcgW-fAg4LuIVW0t0~FP2lcesZsyPp6cng7g-ID2C2qj8sVuuutl5p3-RiBBLqv-iqQSCPJevqNFXA__";

    fn base() -> PublicBase {
        PublicBase::parse("https://d111111abcdef8.cloudfront.net").unwrap()
    }

    fn signer(pem: &str) -> CloudFrontSigner {
        CloudFrontSigner::new(base(), "K2JCJMDEHXQW5F", pem, Duration::from_secs(600)).unwrap()
    }

    #[test]
    fn the_canned_policy_is_cloudfronts_byte_for_byte() {
        assert_eq!(
            canned_policy("https://d1.cloudfront.net/a/b.wav", 1767225600),
            r#"{"Statement":[{"Resource":"https://d1.cloudfront.net/a/b.wav","Condition":{"DateLessThan":{"AWS:EpochTime":1767225600}}}]}"#
        );
    }

    #[test]
    fn base64_uses_cloudfronts_substitutions() {
        // 0xfb 0xff 0xbf encodes to "+/+/" in standard base64; one byte leaves "==".
        assert_eq!(cloudfront_base64(&[0xfb, 0xff, 0xbf]), "-~-~");
        assert_eq!(cloudfront_base64(&[0xff]), "~w__");
        assert_eq!(cloudfront_base64(b"abc"), "YWJj");
    }

    #[test]
    fn the_signature_is_the_one_openssl_makes_from_either_pem_form() {
        for pem in [TEST_KEY_PKCS1, TEST_KEY_PKCS8] {
            let url = signer(pem).sign_url(URL, 1767225600).unwrap();
            assert_eq!(
                url,
                format!("{URL}?Expires=1767225600&Signature={OPENSSL_SIGNATURE}&Key-Pair-Id=K2JCJMDEHXQW5F")
            );
        }
    }

    #[test]
    fn a_url_with_a_query_gets_the_parameters_after_an_ampersand() {
        let url = signer(TEST_KEY_PKCS1).sign_url("https://d1.cloudfront.net/a.wav?v=2", 10).unwrap();
        assert!(url.starts_with("https://d1.cloudfront.net/a.wav?v=2&Expires=10&Signature="), "{url}");
        assert!(url.ends_with("&Key-Pair-Id=K2JCJMDEHXQW5F"), "{url}");
    }

    #[test]
    fn signed_urls_expire_after_the_expiry_and_name_the_key_under_the_base() {
        let now = DateTime::from_timestamp(1_700_000_000, 500_000_000).unwrap();
        let (url, expires_at) = signer(TEST_KEY_PKCS8).signed_url("c1/u1/audio/a.wav", now).unwrap();
        assert_eq!(expires_at.timestamp(), 1_700_000_600);
        assert!(
            url.starts_with("https://d111111abcdef8.cloudfront.net/c1/u1/audio/a.wav?Expires=1700000600&")
        );
    }

    #[test]
    fn public_urls_keep_the_base_path_and_encode_each_segment() {
        let base = PublicBase::parse("https://cdn.example.com/audio/").unwrap();
        assert_eq!(base.to_string(), "https://cdn.example.com/audio");
        assert_eq!(
            base.url_for("c1/u_1/audio/a-b.wav"),
            "https://cdn.example.com/audio/c1/u_1/audio/a-b.wav"
        );
        assert_eq!(
            base.url_for("c 1/ü/a?b#c.wav"),
            "https://cdn.example.com/audio/c%201/%C3%BC/a%3Fb%23c.wav"
        );
        for bad in [
            "cdn.example.com",
            "ftp://cdn.example.com",
            "https://cdn.example.com/?a=1",
            "https://u:p@cdn.example.com",
        ] {
            assert!(PublicBase::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unusable_keys_and_ids_are_refused() {
        let new = |id: &str, pem: &str| CloudFrontSigner::new(base(), id, pem, Duration::from_secs(1));
        assert!(matches!(new("K2JCJMDEHXQW5F", "not a key"), Err(KeyError::NotAKey(_))));
        let broken = TEST_KEY_PKCS1.replacen("MII", "MIX", 1);
        assert!(matches!(new("K2JCJMDEHXQW5F", &broken), Err(KeyError::NotAKey(_))));
        assert!(matches!(new("K2J CJ", TEST_KEY_PKCS1), Err(KeyError::BadKeyPairId)));
        assert!(matches!(new("", TEST_KEY_PKCS1), Err(KeyError::BadKeyPairId)));
        let shown = format!("{:?}", signer(TEST_KEY_PKCS1));
        assert!(shown.contains("K2JCJMDEHXQW5F") && !shown.contains("PRIVATE"), "{shown}");
    }

    #[test]
    fn modes_parse_and_print_as_configured() {
        for mode in [DeliveryMode::Presigned, DeliveryMode::Public, DeliveryMode::CloudFront] {
            assert_eq!(DeliveryMode::parse(mode.as_str()), Some(mode));
            assert_eq!(serde_json::to_value(mode).unwrap(), mode.as_str());
        }
        assert_eq!(DeliveryMode::parse("CloudFront"), Some(DeliveryMode::CloudFront));
        assert_eq!(DeliveryMode::parse("s3"), None);
    }
}
