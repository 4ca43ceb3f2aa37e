//! Identity: bearer JWTs.
//!
//! A token is signed with HS256 and `auth.jwt_secret` (`APP_AUTH__JWT_SECRET`), or with
//! RS256/ES256 and verified with the public key in `auth.public_key_file`. Its claims:
//!
//! - `sub`: the user id, as a decimal string;
//! - `exp`: expiry, seconds since the epoch (required);
//! - `roles` (optional): an array; `"admin"` grants the admin routes;
//! - `iss`, `aud` (optional): checked when `auth.issuer` / `auth.audience` are set.
//!
//! With no secret configured and the embedded Kafka cluster (a local two-command start), a
//! fixed development secret is used and a warning says so; against external brokers a
//! missing secret is a start-up error. `commerce-events token --user 42` mints a token with
//! the same settings.

use std::time::Duration;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use secrecy::ExposeSecret;
use serde::{Deserialize, Serialize};

use crate::common::ids::UserId;
use crate::config::{AuthSettings, KafkaBrokers, KafkaSettings};

/// Signs tokens when no secret is configured and Kafka is the embedded cluster (local use
/// only; a warning is logged).
pub const DEVELOPMENT_SECRET: &str = "commerce-events-development-secret-not-for-production";

/// The role that grants the admin routes.
pub const ADMIN_ROLE: &str = "admin";

/// Who is calling: the token's subject and whether it holds the admin role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Identity {
    pub user: UserId,
    pub admin: bool,
}

/// Why a token was refused (HTTP 401).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("no bearer token")]
    Missing,
    #[error("the token has expired")]
    Expired,
    #[error("the token's signature does not verify")]
    BadSignature,
    #[error("the token is malformed: {0}")]
    Malformed(String),
    #[error("the token's subject is not a user id")]
    BadSubject,
    #[error("the token's issuer or audience is not the configured one")]
    WrongIssuerOrAudience,
}

/// Why the authentication settings cannot be used (a start-up error).
#[derive(Debug, thiserror::Error)]
pub enum AuthSettingsError {
    #[error(
        "auth.jwt_secret (APP_AUTH__JWT_SECRET) must be set when Kafka is external: the \
         development secret is only for the embedded cluster"
    )]
    MissingSecret,
    #[error("auth.algorithm {0:?} is not one of HS256, RS256, ES256")]
    UnknownAlgorithm(String),
    #[error("auth.public_key_file {path:?}: {reason}")]
    PublicKey { path: String, reason: String },
    #[error("cannot sign tokens with {0:?}: only HS256 tokens are minted here")]
    CannotMint(Algorithm),
}

#[derive(Debug, Serialize, Deserialize)]
struct Claims {
    sub: String,
    exp: u64,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    roles: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    iss: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    aud: Option<String>,
}

/// Verifies (and, for HS256, mints) tokens.
#[derive(Clone)]
pub struct Authenticator {
    algorithm: Algorithm,
    decoding: DecodingKey,
    encoding: Option<EncodingKey>,
    validation: Validation,
    issuer: Option<String>,
    audience: Option<String>,
    /// Set when the development secret is in use.
    development: bool,
}

impl Authenticator {
    /// The authenticator the settings describe; see the module documentation.
    pub fn from_settings(
        settings: &AuthSettings,
        kafka: &KafkaSettings,
    ) -> Result<Self, AuthSettingsError> {
        let algorithm = match settings.algorithm.to_ascii_uppercase().as_str() {
            "HS256" => Algorithm::HS256,
            "RS256" => Algorithm::RS256,
            "ES256" => Algorithm::ES256,
            other => return Err(AuthSettingsError::UnknownAlgorithm(other.to_string())),
        };
        let mut development = false;
        let (decoding, encoding) = if algorithm == Algorithm::HS256 {
            let configured = settings.jwt_secret.expose_secret();
            let secret = if !configured.is_empty() {
                configured
            } else if kafka.brokers() == KafkaBrokers::Embedded {
                development = true;
                DEVELOPMENT_SECRET
            } else {
                return Err(AuthSettingsError::MissingSecret);
            };
            (
                DecodingKey::from_secret(secret.as_bytes()),
                Some(EncodingKey::from_secret(secret.as_bytes())),
            )
        } else {
            let path = &settings.public_key_file;
            let failed = |reason: String| AuthSettingsError::PublicKey {
                path: path.clone(),
                reason,
            };
            let pem = std::fs::read(path).map_err(|error| failed(error.to_string()))?;
            let key = if algorithm == Algorithm::RS256 {
                DecodingKey::from_rsa_pem(&pem)
            } else {
                DecodingKey::from_ec_pem(&pem)
            };
            (key.map_err(|error| failed(error.to_string()))?, None)
        };
        let issuer = Some(settings.issuer.clone()).filter(|issuer| !issuer.is_empty());
        let audience = Some(settings.audience.clone()).filter(|audience| !audience.is_empty());
        let mut validation = Validation::new(algorithm);
        validation.leeway = settings.leeway_secs;
        let mut required = vec!["exp", "sub"];
        required.extend(issuer.as_ref().map(|_| "iss"));
        required.extend(audience.as_ref().map(|_| "aud"));
        validation.set_required_spec_claims(&required);
        match &issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        Ok(Self {
            algorithm,
            decoding,
            encoding,
            validation,
            issuer,
            audience,
            development,
        })
    }

    /// Whether tokens are signed with the development secret (warn about it).
    pub fn uses_development_secret(&self) -> bool {
        self.development
    }

    /// The identity a bearer token carries.
    pub fn verify(&self, token: &str) -> Result<Identity, AuthError> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation)
            .map_err(|error| match error.kind() {
                ErrorKind::ExpiredSignature => AuthError::Expired,
                ErrorKind::InvalidSignature => AuthError::BadSignature,
                ErrorKind::InvalidIssuer | ErrorKind::InvalidAudience => {
                    AuthError::WrongIssuerOrAudience
                }
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" || claim == "aud" => {
                    AuthError::WrongIssuerOrAudience
                }
                _ => AuthError::Malformed(error.to_string()),
            })?;
        let user = data
            .claims
            .sub
            .parse::<UserId>()
            .map_err(|_| AuthError::BadSubject)?;
        Ok(Identity {
            user,
            admin: data.claims.roles.iter().any(|role| role == ADMIN_ROLE),
        })
    }

    /// A token for `user` valid for `ttl`, with the admin role when `admin`.
    pub fn mint(
        &self,
        user: UserId,
        admin: bool,
        ttl: Duration,
    ) -> Result<String, AuthSettingsError> {
        let Some(key) = &self.encoding else {
            return Err(AuthSettingsError::CannotMint(self.algorithm));
        };
        let exp = (chrono::Utc::now() + chrono::Duration::from_std(ttl).unwrap_or_default())
            .timestamp()
            .max(0) as u64;
        let claims = Claims {
            sub: user.to_string(),
            exp,
            roles: if admin {
                vec![ADMIN_ROLE.to_string()]
            } else {
                Vec::new()
            },
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
        };
        Ok(
            jsonwebtoken::encode(&Header::new(self.algorithm), &claims, key)
                .expect("HS256 signing with a secret key cannot fail"),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(secret: &str) -> AuthSettings {
        AuthSettings {
            jwt_secret: secret.to_string().into(),
            ..AuthSettings::default()
        }
    }

    fn user(id: i64) -> UserId {
        UserId::parse(id).unwrap()
    }

    #[test]
    fn a_minted_token_verifies_to_its_user_and_roles() {
        let auth =
            Authenticator::from_settings(&settings("s3cret"), &KafkaSettings::default()).unwrap();
        let token = auth.mint(user(42), true, Duration::from_secs(60)).unwrap();
        assert_eq!(
            auth.verify(&token),
            Ok(Identity {
                user: user(42),
                admin: true
            })
        );
        let plain = auth.mint(user(7), false, Duration::from_secs(60)).unwrap();
        assert!(!auth.verify(&plain).unwrap().admin);
    }

    #[test]
    fn forged_expired_and_malformed_tokens_are_refused() {
        let kafka = KafkaSettings::default();
        let auth = Authenticator::from_settings(&settings("s3cret"), &kafka).unwrap();
        let other = Authenticator::from_settings(&settings("other"), &kafka).unwrap();
        let forged = other.mint(user(1), true, Duration::from_secs(60)).unwrap();
        assert_eq!(auth.verify(&forged), Err(AuthError::BadSignature));
        // A token signed with the right secret, for `sub` until `exp`.
        let signed = |sub: &str, exp: u64| {
            jsonwebtoken::encode(
                &Header::default(),
                &Claims {
                    sub: sub.into(),
                    exp,
                    roles: vec![],
                    iss: None,
                    aud: None,
                },
                &EncodingKey::from_secret(b"s3cret"),
            )
            .unwrap()
        };
        assert_eq!(auth.verify(&signed("1", 1_000)), Err(AuthError::Expired));
        assert!(matches!(
            auth.verify("not.a.token"),
            Err(AuthError::Malformed(_))
        ));
        assert_eq!(
            auth.verify(&signed("0", u64::MAX / 2)),
            Err(AuthError::BadSubject)
        );
    }

    #[test]
    fn the_development_secret_is_only_for_the_embedded_cluster() {
        let embedded =
            Authenticator::from_settings(&settings(""), &KafkaSettings::default()).unwrap();
        assert!(embedded.uses_development_secret());
        let external = KafkaSettings {
            brokers: "kafka-1:9092".into(),
            ..KafkaSettings::default()
        };
        assert!(matches!(
            Authenticator::from_settings(&settings(""), &external),
            Err(AuthSettingsError::MissingSecret)
        ));
    }

    #[test]
    fn issuer_and_audience_are_checked_when_configured() {
        let kafka = KafkaSettings::default();
        let strict = AuthSettings {
            issuer: "shop".into(),
            audience: "events".into(),
            ..settings("s3cret")
        };
        let auth = Authenticator::from_settings(&strict, &kafka).unwrap();
        let good = auth.mint(user(3), false, Duration::from_secs(60)).unwrap();
        assert!(auth.verify(&good).is_ok());
        let lax = Authenticator::from_settings(&settings("s3cret"), &kafka).unwrap();
        let anonymous = lax.mint(user(3), false, Duration::from_secs(60)).unwrap();
        assert_eq!(
            auth.verify(&anonymous),
            Err(AuthError::WrongIssuerOrAudience)
        );
    }
}
