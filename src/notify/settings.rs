//! A CP's `[notify]` section: who hears about its runs ending.
//!
//! ```toml
//! [notify]
//! email = ["biobank-team@example.org", "Data Manager <dm@example.org>"]
//! webhook_url = "https://hooks.example.org/ocsync"
//! webhook_secret = { env = "OCSYNC_WEBHOOK_SECRET" }   # or { file = "/run/secrets/hook" }
//! on_success = false                                    # the default: Failed and Aborted only
//! ```
//!
//! Every value is checked while the file is read (parse, don't validate):
//! each address parses as an email address (duplicates refused), the URL is
//! http(s) without credentials in it, a webhook has a secret and the secret
//! is a reference (an environment variable or a mounted file, resolved only
//! when a webhook is sent), never the secret itself. Errors name the key
//! (`notify.email[2]`, `notify.webhook_url`, …) and never echo a URL, which
//! might carry a token.
//!
//! The stored JSON (in `ocsync.cps.config`) has the same keys; the trigger
//! of `migrations/20261129000700_notifications.sql` reads `email`,
//! `webhook_url`, `webhook_secret` and `on_success` from it.

use std::collections::BTreeSet;

use serde::de::{self, Deserializer};
use serde::ser::{SerializeMap, Serializer};
use serde::{Deserialize, Serialize};
use url::Url;

use crate::openclinica::CredentialRef;

/// The most recipients one CP may list.
pub const MAX_RECIPIENTS: usize = 50;

/// A CP's `[notify]` section.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpNotify {
    /// Recipients, as written (`a@b.org` or `Name <a@b.org>`).
    pub email: Vec<lettre::message::Mailbox>,
    /// Where the signed JSON is POSTed.
    pub webhook_url: Option<Url>,
    /// The HMAC key of the webhook's signature; present exactly when
    /// `webhook_url` is.
    pub webhook_secret: Option<CredentialRef>,
    /// Also notify when a run ends Success (Failed and Aborted always do).
    pub on_success: bool,
}

/// `[notify]` as written, before its values are checked.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    #[serde(default)]
    email: Vec<String>,
    #[serde(default)]
    webhook_url: Option<String>,
    #[serde(default)]
    webhook_secret: Option<CredentialRef>,
    #[serde(default)]
    on_success: bool,
}

impl CpNotify {
    fn from_raw(raw: Raw) -> Result<Self, String> {
        if raw.email.len() > MAX_RECIPIENTS {
            return Err(format!(
                "notify.email lists {} addresses; at most {MAX_RECIPIENTS}",
                raw.email.len()
            ));
        }
        let mut seen = BTreeSet::new();
        let mut email = Vec::with_capacity(raw.email.len());
        for (i, text) in raw.email.iter().enumerate() {
            let mailbox: lettre::message::Mailbox = text.trim().parse().map_err(|e| {
                format!("notify.email[{i}]: {text:?} is not an email address ({e})")
            })?;
            if !seen.insert(mailbox.email.to_string().to_ascii_lowercase()) {
                return Err(format!(
                    "notify.email[{i}]: {} is listed twice",
                    mailbox.email
                ));
            }
            email.push(mailbox);
        }
        let webhook_url = raw.webhook_url.as_deref().map(webhook_url).transpose()?;
        match (&webhook_url, &raw.webhook_secret) {
            (Some(_), None) => {
                return Err(
                    "notify.webhook_secret is required with notify.webhook_url: a reference, \
                     { env = \"NAME\" } or { file = \"/path\" }"
                        .into(),
                );
            }
            (None, Some(_)) => {
                return Err("notify.webhook_secret is set without notify.webhook_url".into());
            }
            _ => {}
        }
        if email.is_empty() && webhook_url.is_none() {
            return Err(
                "notify names no recipient: give notify.email, notify.webhook_url or both".into(),
            );
        }
        Ok(Self {
            email,
            webhook_url,
            webhook_secret: raw.webhook_secret,
            on_success: raw.on_success,
        })
    }
}

/// Checks a webhook URL without echoing it (it may carry a token).
fn webhook_url(text: &str) -> Result<Url, String> {
    let url =
        Url::parse(text.trim()).map_err(|e| format!("notify.webhook_url is not a URL ({e})"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!(
            "notify.webhook_url must be http(s), not {:?}",
            url.scheme()
        ));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(
            "notify.webhook_url must not carry credentials: the signature (webhook_secret) \
             authenticates ocsync to the receiver"
                .into(),
        );
    }
    if url.fragment().is_some() {
        return Err("notify.webhook_url must not have a fragment".into());
    }
    Ok(url)
}

impl<'de> Deserialize<'de> for CpNotify {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Self::from_raw(Raw::deserialize(d)?).map_err(de::Error::custom)
    }
}

/// Writes the section in the shape it is read from.
impl Serialize for CpNotify {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let Self {
            email,
            webhook_url,
            webhook_secret,
            on_success,
        } = self;
        let mut map = s.serialize_map(None)?;
        let email: Vec<String> = email.iter().map(ToString::to_string).collect();
        map.serialize_entry("email", &email)?;
        if let Some(url) = webhook_url {
            map.serialize_entry("webhook_url", url.as_str())?;
        }
        if let Some(secret) = webhook_secret {
            map.serialize_entry("webhook_secret", &SecretRef(secret))?;
        }
        map.serialize_entry("on_success", on_success)?;
        map.end()
    }
}

/// A credential reference as `{ env = … }` or `{ file = … }`.
pub(crate) struct SecretRef<'a>(pub &'a CredentialRef);

impl Serialize for SecretRef<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(1))?;
        match self.0 {
            CredentialRef::Env(name) => map.serialize_entry("env", name)?,
            CredentialRef::File(path) => map.serialize_entry("file", path)?,
        }
        map.end()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read(toml_text: &str) -> Result<CpNotify, String> {
        toml::from_str::<CpNotify>(toml_text).map_err(|e| e.message().to_owned())
    }

    #[test]
    fn a_full_section_reads_and_round_trips() {
        let n = read(
            r#"
email = ["a@example.org", "Data Manager <dm@example.org>"]
webhook_url = "https://hooks.example.org/ocsync?team=7"
webhook_secret = { env = "HOOK_SECRET" }
on_success = true
"#,
        )
        .unwrap();
        assert_eq!(n.email.len(), 2);
        assert_eq!(n.email[1].email.to_string(), "dm@example.org");
        assert_eq!(
            n.webhook_secret,
            Some(CredentialRef::Env("HOOK_SECRET".into()))
        );
        assert!(n.on_success);
        let json = serde_json::to_value(&n).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "email": ["a@example.org", "Data Manager <dm@example.org>"],
                "webhook_url": "https://hooks.example.org/ocsync?team=7",
                "webhook_secret": {"env": "HOOK_SECRET"},
                "on_success": true,
            })
        );
        let again: CpNotify = serde_json::from_value(json).unwrap();
        assert_eq!(again, n);
        let shown = toml::to_string(&n).unwrap();
        assert_eq!(read(&shown).unwrap(), n);
    }

    #[test]
    fn email_alone_defaults_to_failures_only() {
        let n = read("email = [\"a@example.org\"]").unwrap();
        assert!(!n.on_success);
        assert!(n.webhook_url.is_none());
    }

    #[test]
    fn bad_sections_name_the_key_and_never_echo_a_url_or_secret() {
        for (text, want) in [
            ("", "names no recipient"),
            ("email = []", "names no recipient"),
            ("email = [\"nobody\"]", "notify.email[0]"),
            (
                "email = [\"a@example.org\", \"A@example.org\"]",
                "notify.email[1]: A@example.org is listed twice",
            ),
            (
                "webhook_url = \"https://h.example.org/x\"",
                "notify.webhook_secret is required",
            ),
            (
                "email = [\"a@example.org\"]\nwebhook_secret = { env = \"S\" }",
                "set without notify.webhook_url",
            ),
            (
                "webhook_url = \"ftp://h.example.org/tok3n\"\nwebhook_secret = { env = \"S\" }",
                "must be http(s)",
            ),
            (
                "webhook_url = \"https://u:tok3n@h.example.org/\"\nwebhook_secret = { env = \"S\" }",
                "must not carry credentials",
            ),
            (
                "webhook_url = \"tok3n\"\nwebhook_secret = { env = \"S\" }",
                "not a URL",
            ),
            (
                "webhook_url = \"https://h.example.org/\"\nwebhook_secret = \"tok3n\"",
                "may not be written in the configuration",
            ),
            (
                "email = [\"a@example.org\"]\nonsuccess = true",
                "unknown field `onsuccess`",
            ),
        ] {
            let e = read(text).unwrap_err();
            assert!(e.contains(want), "{text}\n→ {e}");
            assert!(!e.contains("tok3n"), "echoed: {e}");
        }
        let many: Vec<String> = (0..=MAX_RECIPIENTS)
            .map(|i| format!("\"u{i}@example.org\""))
            .collect();
        let e = read(&format!("email = [{}]", many.join(","))).unwrap_err();
        assert!(e.contains("at most 50"), "{e}");
    }
}
