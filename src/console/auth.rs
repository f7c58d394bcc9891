//! Who may use the console: the operator gives `CONSOLE_TOKEN` once at `/login` (compared in
//! constant time) and gets a random session id in a `Secure`, `HttpOnly`, `SameSite=Strict`
//! cookie; the session carries a CSRF token that every form posts back. Sessions live in this
//! process's memory ([`SESSION_TTL`]); restarting the console logs everyone out.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use askama::Template;
use axum::Form;
use axum::extract::{ConnectInfo, FromRequestParts, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::response::{IntoResponse, Redirect, Response};
use cookie::{Cookie, SameSite};
use serde::Deserialize;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::{Console, render};

/// The session cookie's name.
pub const COOKIE: &str = "audio_console_session";

/// How long a session lasts from its login.
pub const SESSION_TTL: Duration = Duration::from_secs(12 * 3600);

/// The most sessions held at once; past it the oldest is dropped (a flood of logins cannot
/// grow the process).
const MAX_SESSIONS: usize = 1000;

/// How long a wrong token's answer is held back, one wrong token at a time (a slow guess is a
/// useless guess).
const FAILED_LOGIN_DELAY: Duration = Duration::from_millis(500);

/// One logged-in operator.
#[derive(Debug, Clone)]
struct Session {
    /// The name the operator gave at login: who the audit log says did what.
    operator: String,
    /// What every form of this session posts back as `csrf`.
    csrf: String,
    /// When the session was made ([`SESSION_TTL`] from then it ends).
    created: Instant,
}

/// The logged-in sessions, by session id, and the gate wrong tokens queue at.
#[derive(Debug, Default)]
pub struct Sessions {
    /// Each open session, by its id.
    open: Mutex<HashMap<String, Session>>,
    /// Held while a wrong token's answer is delayed, so guesses cannot run in parallel.
    wrong_tokens: tokio::sync::Mutex<()>,
}

/// A random 64-hex-digit secret (two v4 UUIDs' 244 random bits, from the OS's generator).
fn secret() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// The first 8 hex digits of the SHA-256 of session id `id`: what the log says instead of the
/// secret ([`Operator::session`]).
fn session_tag(id: &str) -> String {
    hex::encode(&Sha256::digest(id.as_bytes())[..4])
}

/// Equal in constant time, whatever the lengths (both sides hashed first).
pub(crate) fn same_secret(given: &str, expected: &str) -> bool {
    Sha256::digest(given.as_bytes()).ct_eq(&Sha256::digest(expected.as_bytes())).into()
}

impl Sessions {
    fn open(&self, operator: String) -> (String, Session) {
        let id = secret();
        let session = Session { operator, csrf: secret(), created: Instant::now() };
        let mut sessions = self.open.lock().expect("sessions lock");
        sessions.retain(|_, s| s.created.elapsed() < SESSION_TTL);
        if sessions.len() >= MAX_SESSIONS
            && let Some(oldest) = sessions.iter().min_by_key(|(_, s)| s.created).map(|(id, _)| id.clone())
        {
            sessions.remove(&oldest);
        }
        sessions.insert(id.clone(), session.clone());
        (id, session)
    }

    fn get(&self, id: &str) -> Option<Session> {
        let sessions = self.open.lock().expect("sessions lock");
        sessions.get(id).filter(|s| s.created.elapsed() < SESSION_TTL).cloned()
    }

    fn close(&self, id: &str) {
        self.open.lock().expect("sessions lock").remove(id);
    }
}

/// The operator behind a request: extracting it is what makes a page need a login. Without a
/// valid session a GET is redirected to `/login` (303) and anything else answered 401.
#[derive(Debug, Clone)]
pub struct Operator {
    /// The name given at login.
    pub name: String,
    /// The first 8 hex digits of a hash of the session id: tells sessions apart in the log
    /// without writing the secret there.
    pub session: String,
    /// The session's CSRF token, put into every form.
    pub csrf: String,
    /// The session id (to log out).
    id: String,
}

impl Operator {
    /// The refusal (403) of a form whose `csrf` field is not this session's token; `None` when
    /// it is.
    pub fn csrf_refusal(&self, given: &str) -> Option<Response> {
        if same_secret(given, &self.csrf) {
            None
        } else {
            tracing::warn!(target: "audio_worker::console::audit", operator = %self.name, session = %self.session, "refused: missing or wrong CSRF token");
            Some(
                (
                    StatusCode::FORBIDDEN,
                    "refused: the form's CSRF token is missing or wrong; reload the page\n",
                )
                    .into_response(),
            )
        }
    }
}

impl FromRequestParts<Arc<Console>> for Operator {
    type Rejection = Response;

    async fn from_request_parts(parts: &mut Parts, console: &Arc<Console>) -> Result<Self, Self::Rejection> {
        let id = parts
            .headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(Cookie::split_parse)
            .filter_map(Result::ok)
            .find(|c| c.name() == COOKIE)
            .map(|c| c.value().to_owned());
        match id.and_then(|id| console.sessions.get(&id).map(|s| (id, s))) {
            Some((id, s)) => Ok(Self { name: s.operator, session: session_tag(&id), csrf: s.csrf, id }),
            None if parts.method == Method::GET => Err(Redirect::to("/login").into_response()),
            None => Err((StatusCode::UNAUTHORIZED, "log in first: /login\n").into_response()),
        }
    }
}

#[derive(Template)]
#[template(path = "console/login.html")]
struct LoginPage {
    /// Why the last try failed, if it did.
    error: Option<String>,
}

/// `GET /login`.
pub async fn login_page() -> Response {
    render(StatusCode::OK, &LoginPage { error: None })
}

/// The login form.
#[derive(Debug, Deserialize)]
pub struct LoginForm {
    /// The console token.
    #[serde(default)]
    token: String,
    /// Who is logging in, for the audit log (optional).
    #[serde(default)]
    operator: String,
}

/// `POST /login`: a right token opens a session and redirects to the overview; a wrong one is
/// answered 401 after [`FAILED_LOGIN_DELAY`] and logged with the peer's address.
pub async fn login(
    State(console): State<Arc<Console>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Form(form): Form<LoginForm>,
) -> Response {
    if !same_secret(&form.token, &console.console.token) {
        tracing::warn!(target: "audio_worker::console::audit", %peer, "login refused: wrong token");
        // One wrong token answered at a time: parallel guesses queue, two a second at most.
        let _gate = console.sessions.wrong_tokens.lock().await;
        tokio::time::sleep(FAILED_LOGIN_DELAY).await;
        return render(
            StatusCode::UNAUTHORIZED,
            &LoginPage { error: Some("That token is not right.".into()) },
        );
    }
    let name: String = form.operator.chars().filter(|c| !c.is_control()).take(64).collect();
    let name = if name.trim().is_empty() { "operator".to_owned() } else { name.trim().to_owned() };
    let (id, _) = console.sessions.open(name.clone());
    let session = session_tag(&id);
    tracing::info!(target: "audio_worker::console::audit", operator = %name, %session, %peer, "logged in");
    let cookie =
        Cookie::build((COOKIE, id)).http_only(true).secure(true).same_site(SameSite::Strict).path("/");
    ([(header::SET_COOKIE, cookie.to_string())], Redirect::to("/")).into_response()
}

/// A form that carries only its CSRF token.
#[derive(Debug, Deserialize)]
pub struct CsrfForm {
    /// The session's CSRF token.
    #[serde(default)]
    pub csrf: String,
}

/// `POST /logout`: ends the session and clears the cookie.
pub async fn logout(
    State(console): State<Arc<Console>>,
    operator: Operator,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = operator.csrf_refusal(&form.csrf) {
        return refused;
    }
    console.sessions.close(&operator.id);
    tracing::info!(target: "audio_worker::console::audit", operator = %operator.name, session = %operator.session, "logged out");
    let cleared = Cookie::build((COOKIE, ""))
        .http_only(true)
        .secure(true)
        .same_site(SameSite::Strict)
        .path("/")
        .max_age(cookie::time::Duration::ZERO);
    ([(header::SET_COOKIE, cleared.to_string())], Redirect::to("/login")).into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_compare_whole() {
        assert!(same_secret("0123456789abcdef", "0123456789abcdef"));
        assert!(!same_secret("0123456789abcdeF", "0123456789abcdef"));
        assert!(!same_secret("0123456789abcde", "0123456789abcdef"));
        assert!(!same_secret("", "0123456789abcdef"));
        assert_ne!(secret(), secret());
        assert_eq!(secret().len(), 64);
    }

    #[test]
    fn sessions_end_and_stay_bounded() {
        let sessions = Sessions::default();
        let (id, s) = sessions.open("ada".into());
        assert_eq!(sessions.get(&id).unwrap().csrf, s.csrf);
        sessions.close(&id);
        assert!(sessions.get(&id).is_none());
        for i in 0..MAX_SESSIONS + 10 {
            sessions.open(format!("op{i}"));
        }
        assert_eq!(sessions.open.lock().unwrap().len(), MAX_SESSIONS);
    }
}
