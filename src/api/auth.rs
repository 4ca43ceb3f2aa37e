//! Who is calling, and what they may do: the one place handlers get an identity from.
//!
//! - [`Caller`]: a valid bearer token (`Authorization: Bearer …`), else 401 with
//!   `WWW-Authenticate: Bearer`. The acting user is always the token's subject.
//! - [`Admin`]: a caller with the `admin` role, else 403.
//! - [`Caller::acts_as`]: a user id named by the request (body, path, query) must be the
//!   caller's own — even an admin never acts in a user's name (issuing, ordering, paying,
//!   charging).
//! - [`Caller::may_read`]: a user's resources are read by that user, or by an admin
//!   (support staff).
//! - [`client_address`]: who a request without a token comes from, for its rate limit
//!   (`http.trusted_proxy_header` behind a gateway).

use std::net::IpAddr;

use actix_web::dev::Payload;
use actix_web::http::header;
use actix_web::{FromRequest, HttpRequest, web};
use futures::future::{Ready, ready};

use crate::api::AppState;
use crate::api::error::ApiError;
use crate::common::ids::UserId;
use crate::guards::tokens::{AuthError, Identity};

/// An authenticated caller.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Caller(pub Identity);

impl Caller {
    pub fn user(&self) -> UserId {
        self.0.user
    }

    pub fn is_admin(&self) -> bool {
        self.0.admin
    }

    /// The caller acts as `user` (its own id, or none given): 403 otherwise.
    pub fn acts_as(&self, user: Option<UserId>) -> Result<UserId, ApiError> {
        match user {
            None => Ok(self.0.user),
            Some(user) if user == self.0.user => Ok(user),
            Some(user) => Err(ApiError::forbidden(format!(
                "the token's user {} may not act as user {user}",
                self.0.user
            ))),
        }
    }

    /// The caller may read `user`'s resources: its own, or any as an admin.
    pub fn may_read(&self, user: UserId) -> Result<(), ApiError> {
        if user == self.0.user || self.0.admin {
            Ok(())
        } else {
            Err(ApiError::forbidden(format!(
                "the token's user {} may not read user {user}'s resources",
                self.0.user
            )))
        }
    }
}

/// The bearer token of a request, if it carries one.
pub fn bearer_token(request: &HttpRequest) -> Result<&str, AuthError> {
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or(AuthError::Missing)?
        .to_str()
        .map_err(|_| AuthError::Malformed("the Authorization header is not text".into()))?;
    let (scheme, token) = value
        .split_once(' ')
        .ok_or_else(|| AuthError::Malformed("expected `Authorization: Bearer <token>`".into()))?;
    if !scheme.eq_ignore_ascii_case("bearer") || token.trim().is_empty() {
        return Err(AuthError::Malformed(
            "expected `Authorization: Bearer <token>`".into(),
        ));
    }
    Ok(token.trim())
}

fn authenticate(request: &HttpRequest) -> Result<Caller, ApiError> {
    let state = request
        .app_data::<web::Data<AppState>>()
        .expect("the application state is registered");
    let token = bearer_token(request)?;
    Ok(Caller(state.auth.verify(token)?))
}

impl FromRequest for Caller {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(request))
    }
}

/// A caller with the admin role.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Admin(pub Caller);

impl FromRequest for Admin {
    type Error = ApiError;
    type Future = Ready<Result<Self, ApiError>>;

    fn from_request(request: &HttpRequest, _: &mut Payload) -> Self::Future {
        ready(authenticate(request).and_then(|caller| {
            if caller.is_admin() {
                Ok(Admin(caller))
            } else {
                Err(ApiError::forbidden("this route needs the admin role"))
            }
        }))
    }
}

/// The address a request comes from: the trusted proxy header's first entry when one is
/// configured and present, the peer address otherwise.
pub fn client_address(request: &HttpRequest, trusted_proxy_header: &str) -> Option<IpAddr> {
    if !trusted_proxy_header.is_empty()
        && let Some(forwarded) = request
            .headers()
            .get(trusted_proxy_header)
            .and_then(|value| value.to_str().ok())
        && let Some(first) = forwarded.split(',').next()
        && let Ok(address) = first.trim().parse()
    {
        return Some(address);
    }
    request.peer_addr().map(|peer| peer.ip())
}

#[cfg(test)]
mod tests {
    use super::*;
    use actix_web::test::TestRequest;

    fn caller(user: i64, admin: bool) -> Caller {
        Caller(Identity {
            user: UserId::parse(user).unwrap(),
            admin,
        })
    }

    #[test]
    fn a_caller_acts_only_as_itself_even_an_admin() {
        let own = UserId::parse(1).unwrap();
        let other = UserId::parse(2).unwrap();
        assert_eq!(caller(1, false).acts_as(None).unwrap(), own);
        assert_eq!(caller(1, false).acts_as(Some(own)).unwrap(), own);
        assert!(caller(1, false).acts_as(Some(other)).is_err());
        assert!(caller(1, true).acts_as(Some(other)).is_err());
    }

    #[test]
    fn an_admin_reads_every_users_resources() {
        let other = UserId::parse(2).unwrap();
        assert!(caller(1, false).may_read(other).is_err());
        assert!(caller(1, true).may_read(other).is_ok());
    }

    #[test]
    fn the_bearer_scheme_is_required() {
        let request = TestRequest::default()
            .insert_header(("authorization", "Basic abc"))
            .to_http_request();
        assert!(matches!(
            bearer_token(&request),
            Err(AuthError::Malformed(_))
        ));
        let request = TestRequest::default()
            .insert_header(("authorization", "bearer  abc.def.ghi "))
            .to_http_request();
        assert_eq!(bearer_token(&request).unwrap(), "abc.def.ghi");
        assert_eq!(
            bearer_token(&TestRequest::default().to_http_request()),
            Err(AuthError::Missing)
        );
    }

    #[test]
    fn behind_a_gateway_the_forwarded_address_counts() {
        let request = TestRequest::default()
            .insert_header(("x-forwarded-for", "203.0.113.7, 10.0.0.1"))
            .peer_addr("10.0.0.1:5000".parse().unwrap())
            .to_http_request();
        assert_eq!(
            client_address(&request, "x-forwarded-for"),
            Some("203.0.113.7".parse().unwrap())
        );
        assert_eq!(
            client_address(&request, ""),
            Some("10.0.0.1".parse().unwrap())
        );
    }
}
