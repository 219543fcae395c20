//! Email: a plain-text message through the configured SMTP server
//! (lettre on tokio, TLS by rustls).
//!
//! One connection per message (no pool: notifications are rare, and an
//! idle connection would only time out on the server). The SMTP server's
//! answers decide what happens next: a 5xx (a recipient refused, a login
//! denied) is a permanent failure; a 4xx, a refused or broken connection,
//! a TLS failure or a timeout is tried again later.

use std::time::Duration;

use lettre::message::Mailbox;
use lettre::message::header::ContentType;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::client::{Tls, TlsParameters};
use lettre::{AsyncSmtpTransport, AsyncTransport, Message, Tokio1Executor};
use secrecy::ExposeSecret;

use super::Failure;
use super::message::RunEnded;
use crate::config::{SmtpConfig, SmtpTls};

/// Sends notification emails through one SMTP server.
#[derive(Clone)]
pub struct Mailer {
    transport: AsyncSmtpTransport<Tokio1Executor>,
    from: Mailbox,
    /// `host:port`, for messages.
    server: String,
    timeout: Duration,
}

impl Mailer {
    /// A mailer for `config`; nothing connects until the first message.
    pub fn new(config: &SmtpConfig, timeout: Duration) -> Result<Self, String> {
        crate::install_crypto_provider();
        let tls = |host: &str| {
            TlsParameters::new(host.to_owned())
                .map_err(|e| format!("SMTP TLS settings for {host}: {e}"))
        };
        let tls = match config.tls {
            SmtpTls::None => Tls::None,
            SmtpTls::StartTls => Tls::Required(tls(&config.host)?),
            SmtpTls::Tls => Tls::Wrapper(tls(&config.host)?),
        };
        let mut builder = AsyncSmtpTransport::<Tokio1Executor>::builder_dangerous(&config.host)
            .port(config.port)
            .tls(tls)
            .timeout(Some(timeout));
        if let (Some(user), Some(password)) = (&config.username, config.password()) {
            builder = builder.credentials(Credentials::new(
                user.clone(),
                password.expose_secret().to_owned(),
            ));
        }
        Ok(Self {
            transport: builder.build(),
            from: config.from.clone(),
            server: format!("{}:{}", config.host, config.port),
            timeout,
        })
    }

    /// Sends `message` to `to` (a mailbox as the CP lists it).
    pub async fn send(&self, to: &str, message: &RunEnded) -> Result<(), Failure> {
        let to: Mailbox = to
            .parse()
            .map_err(|e| Failure::permanent(format!("not an email address: {e}")))?;
        let email = Message::builder()
            .from(self.from.clone())
            .to(to)
            .subject(message.subject())
            .header(ContentType::TEXT_PLAIN)
            .body(message.text())
            .map_err(|e| Failure::permanent(format!("the email cannot be built: {e}")))?;
        // lettre's timeout is per command; this bounds the whole exchange.
        match tokio::time::timeout(self.timeout, self.transport.send(email)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) if e.is_permanent() => Err(Failure::permanent(format!(
                "the SMTP server {} refused the message: {e}",
                self.server
            ))),
            Ok(Err(e)) => Err(Failure::retry(format!(
                "the SMTP server {}: {e}",
                self.server
            ))),
            Err(_) => Err(Failure::retry(format!(
                "the SMTP server {} did not finish within {} s",
                self.server,
                self.timeout.as_secs()
            ))),
        }
    }
}
