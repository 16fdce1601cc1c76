//! The HSM side of recovery: the trusted recovery wrapping key, the backup MAC key, wrapping
//! master key versions under the first (RFC 5649) and unwrapping them into a new token.
//!
//! - The wrapping key must carry `CKA_TRUSTED`, which only the token's security officer can
//!   set; a security officer can create only public objects. It is created wrap-only: with
//!   `CKA_UNWRAP` it would let anyone who can open a session unwrap a backup into a key with
//!   attributes of their choosing (extractable, not sensitive). Restore unwraps with a private
//!   *session* copy of the key that is destroyed before the call returns.
//! - PKCS#11 keeps one login state per application and token, so the officer login logs the
//!   user out of every session of this process: [`Hsm::install_recovery_key`] first takes every
//!   session permit (no operation in flight), and always logs the user back in.

use cryptoki::error::{Error as CkError, RvError};
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass, ObjectHandle};
use cryptoki::session::{Session, UserType};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use super::{classify, is_session_fault, logged_in, Hsm, HsmError, Inner, KeyRef, OpError};

/// `CKA_LABEL` of the trusted recovery wrapping key.
pub const RECOVERY_WRAP_LABEL: &str = "kms-recovery-wrap";
/// `CKA_LABEL` of the backup MAC key.
pub const RECOVERY_MAC_LABEL: &str = "kms-recovery-mac";

/// The two keys a recovery key gives the token, named by the ceremony that made them.
pub struct RecoveryKeys {
    /// `CKA_ID` of both objects (the ceremony id's bytes).
    pub object_id: Vec<u8>,
    /// The recovery key: AES-256, trusted, wrap only.
    pub wrap_key: Zeroizing<[u8; 32]>,
    /// HMAC-SHA256 key for backup files.
    pub mac_key: Zeroizing<[u8; 32]>,
}

fn labelled(label: &str, class_and_type: KeyType) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(class_and_type),
        Attribute::Label(label.as_bytes().to_vec()),
    ]
}

fn with_id(mut template: Vec<Attribute>, object_id: &[u8]) -> Vec<Attribute> {
    template.push(Attribute::Id(object_id.to_vec()));
    template
}

/// The attributes of a master key version, for generation and for unwrapping.
pub(super) fn master_key_attributes(key: KeyRef) -> Vec<Attribute> {
    vec![
        Attribute::Class(ObjectClass::SECRET_KEY),
        Attribute::KeyType(KeyType::AES),
        Attribute::Token(true),
        Attribute::Private(true),
        Attribute::Sensitive(true),
        // Extractable only through a trusted wrapping key (the recovery key), which only the
        // token's security officer can mark trusted.
        Attribute::Extractable(true),
        Attribute::WrapWithTrusted(true),
        Attribute::Encrypt(true),
        Attribute::Decrypt(true),
        Attribute::Wrap(false),
        Attribute::Unwrap(false),
        Attribute::Sign(false),
        Attribute::Verify(false),
        Attribute::Derive(false),
        Attribute::Id(key.object_id()),
        Attribute::Label(key.object_label().into_bytes()),
    ]
}

/// The one object matching `template`.
fn only(session: &Session, template: &[Attribute], what: &str) -> Result<ObjectHandle, OpError> {
    let found = session.find_objects(template)?;
    match found.as_slice() {
        [handle] => Ok(*handle),
        [] if !logged_in(session) => Err(CkError::Pkcs11(
            RvError::UserNotLoggedIn,
            cryptoki::context::Function::FindObjects,
        )
        .into()),
        [] => Err(HsmError::KeyMissing.into()),
        _ => Err(HsmError::Other(format!("more than one {what} object")).into()),
    }
}

impl Hsm {
    /// Puts a recovery key into the token: the trusted wrapping key (in a security officer
    /// session) and the backup MAC key, both with `CKA_ID` `object_id`. Earlier recovery keys
    /// stay until [`Hsm::retire_recovery_keys`]. Pauses every other use of the token by this
    /// process meanwhile.
    pub async fn install_recovery_key(&self, keys: RecoveryKeys) -> Result<(), HsmError> {
        let Some(so_pin) = self.inner.so_pin.clone() else {
            return Err(HsmError::NoSoPin);
        };
        let _all = self
            .inner
            .permits
            .acquire_many(self.inner.pool_size)
            .await
            .map_err(|_| HsmError::Unavailable(RvError::DeviceRemoved))?;
        let inner = std::sync::Arc::clone(&self.inner);
        tokio::task::spawn_blocking(move || {
            let _held = super::hold(super::Access::Exclusive);
            let session = match inner.take_idle() {
                Some(s) => s,
                None => inner.open_session()?,
            };
            let officer_part = officer_session(&inner, &session, &so_pin, |session| {
                let mut template = labelled(RECOVERY_WRAP_LABEL, KeyType::AES);
                template.extend([
                    Attribute::Token(true),
                    Attribute::Private(false),
                    Attribute::Sensitive(true),
                    Attribute::Extractable(false),
                    Attribute::Trusted(true),
                    Attribute::Wrap(true),
                    Attribute::Unwrap(false),
                    Attribute::Encrypt(false),
                    Attribute::Decrypt(false),
                    Attribute::Sign(false),
                    Attribute::Verify(false),
                    Attribute::Derive(false),
                    Attribute::Id(keys.object_id.clone()),
                    Attribute::Value(keys.wrap_key.to_vec()),
                ]);
                session.create_object(&template)?;
                Ok(())
            });
            // Whatever happened, this process's sessions are the user's again; handles of
            // private objects did not survive the logout.
            inner.forget_all();
            if let Err(e) = officer_part {
                inner.release(session);
                return Err(e);
            }
            let mut template = super::hmac_key_attributes(RECOVERY_MAC_LABEL, &keys.object_id);
            template.push(Attribute::Value(keys.mac_key.to_vec()));
            let user_part = session.create_object(&template).map(|_| ());
            inner.release(session);
            user_part.map_err(classify)
        })
        .await
        .map_err(|_| HsmError::Other("HSM worker panicked".into()))?
    }

    /// 32 bytes from the token's random number generator.
    pub async fn random_key(&self) -> Result<Zeroizing<[u8; 32]>, HsmError> {
        self.run(|_inner, session| {
            let mut key = Zeroizing::new([0u8; 32]);
            session.generate_random_slice(key.as_mut())?;
            Ok(key)
        })
        .await
    }

    /// Destroys every recovery wrapping and MAC key except those with `CKA_ID` `keep`.
    pub async fn retire_recovery_keys(&self, keep: Vec<u8>) -> Result<(), HsmError> {
        self.run_exclusive(move |_inner, session| {
            destroy_others(session, &labelled(RECOVERY_WRAP_LABEL, KeyType::AES), &keep)?;
            destroy_others(
                session,
                &labelled(RECOVERY_MAC_LABEL, KeyType::GENERIC_SECRET),
                &keep,
            )
        })
        .await
    }

    /// Whether a security officer PIN is configured (recovery ceremonies need it).
    pub fn has_so_pin(&self) -> bool {
        self.inner.so_pin.is_some()
    }

    /// Re-wraps each of `keys` under the trusted recovery key and says whether every result
    /// equals its `wrapped` counterpart (compared in constant time). RFC 5649 wrapping is
    /// deterministic, so equality proves that `wrapped` unwraps, under the recovery key, to
    /// this very key version.
    pub async fn matches_wrapped(
        &self,
        object_id: Vec<u8>,
        keys: Vec<KeyRef>,
        wrapped: Vec<Vec<u8>>,
    ) -> Result<bool, HsmError> {
        if keys.len() != wrapped.len() {
            return Ok(false);
        }
        let fresh = self.wrap_for_backup(object_id, keys).await?;
        let mut same = subtle::Choice::from(1u8);
        for (f, w) in fresh.iter().zip(&wrapped) {
            same &= f.as_slice().ct_eq(w.as_slice());
        }
        Ok(bool::from(same))
    }

    /// Whether the token holds any AES key object (a master key version or a recovery key):
    /// restore goes only into a token that holds none.
    pub async fn holds_aes_keys(&self) -> Result<bool, HsmError> {
        self.run(|_inner, session| {
            if !logged_in(session) {
                return Err(CkError::Pkcs11(
                    RvError::UserNotLoggedIn,
                    cryptoki::context::Function::FindObjects,
                )
                .into());
            }
            let found = session.find_objects(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(true),
            ])?;
            Ok(!found.is_empty())
        })
        .await
    }

    /// Wraps each version in `keys` under the trusted recovery key of ceremony `object_id`
    /// (AES key wrap with padding, RFC 5649), in order.
    pub async fn wrap_for_backup(
        &self,
        object_id: Vec<u8>,
        keys: Vec<KeyRef>,
    ) -> Result<Vec<Vec<u8>>, HsmError> {
        self.run(move |inner, session| {
            let wrapping = only(
                session,
                &with_id(labelled(RECOVERY_WRAP_LABEL, KeyType::AES), &object_id),
                "recovery wrapping key",
            )?;
            keys.iter()
                .map(|key| {
                    let handle = inner.handle(session, *key)?;
                    Ok(session.wrap_key(&Mechanism::AesKeyWrapPad, wrapping, handle)?)
                })
                .collect()
        })
        .await
    }

    /// HMAC-SHA256 of `data` under the backup MAC key of ceremony `object_id`.
    pub async fn backup_mac(
        &self,
        object_id: Vec<u8>,
        data: Vec<u8>,
    ) -> Result<[u8; 32], HsmError> {
        self.run(move |_inner, session| {
            let handle = only(
                session,
                &with_id(
                    labelled(RECOVERY_MAC_LABEL, KeyType::GENERIC_SECRET),
                    &object_id,
                ),
                "backup MAC key",
            )?;
            let mac = session.sign(&Mechanism::Sha256Hmac, handle, &data)?;
            mac.try_into()
                .map_err(|_| HsmError::Other("HMAC-SHA256 of unexpected length".into()).into())
        })
        .await
    }

    /// Whether `mac` is the backup MAC of `data` (compared in constant time).
    pub async fn verify_backup_mac(
        &self,
        object_id: Vec<u8>,
        data: Vec<u8>,
        mac: [u8; 32],
    ) -> Result<bool, HsmError> {
        let expected = self.backup_mac(object_id, data).await?;
        Ok(bool::from(expected.ct_eq(&mac)))
    }

    /// Unwraps every `(version, wrapped)` pair under `wrap_key` into token objects with the
    /// master key attributes. The unwrapping key lives only as a private session object for
    /// this call. All or nothing: on any failure the objects made so far are destroyed.
    /// A wrapped key that fails RFC 5649's integrity check is [`HsmError::AuthFailed`].
    pub async fn unwrap_master_keys(
        &self,
        wrap_key: Zeroizing<[u8; 32]>,
        items: Vec<(KeyRef, Vec<u8>)>,
    ) -> Result<(), HsmError> {
        self.run_exclusive(move |_inner, session| {
            let unwrapping = session.create_object(&[
                Attribute::Class(ObjectClass::SECRET_KEY),
                Attribute::KeyType(KeyType::AES),
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Extractable(false),
                Attribute::Unwrap(true),
                Attribute::Wrap(false),
                Attribute::Encrypt(false),
                Attribute::Decrypt(false),
                Attribute::Value(wrap_key.to_vec()),
            ])?;
            let mut made = Vec::with_capacity(items.len());
            let mut outcome = Ok(());
            for (key, wrapped) in &items {
                match session.unwrap_key(
                    &Mechanism::AesKeyWrapPad,
                    unwrapping,
                    wrapped,
                    &master_key_attributes(*key),
                ) {
                    Ok(handle) => made.push(handle),
                    Err(e) => {
                        outcome = Err(e);
                        break;
                    }
                }
            }
            let _ = session.destroy_object(unwrapping);
            if let Err(e) = outcome {
                for handle in made {
                    let _ = session.destroy_object(handle);
                }
                return Err(match e {
                    // SoftHSM2 reports a failed RFC 5649 integrity check as a general error.
                    CkError::Pkcs11(
                        RvError::GeneralError
                        | RvError::WrappedKeyInvalid
                        | RvError::WrappedKeyLenRange
                        | RvError::EncryptedDataInvalid,
                        _,
                    ) => HsmError::AuthFailed.into(),
                    other => other.into(),
                });
            }
            Ok(())
        })
        .await
    }
}

/// Runs `op` in a security officer login on `session`, then logs the user back in whatever
/// happened.
fn officer_session(
    inner: &Inner,
    session: &Session,
    so_pin: &cryptoki::types::AuthPin,
    op: impl FnOnce(&Session) -> Result<(), OpError>,
) -> Result<(), HsmError> {
    match session.logout() {
        Ok(()) | Err(CkError::Pkcs11(RvError::UserNotLoggedIn, _)) => {}
        Err(e) => return Err(classify(e)),
    }
    let outcome = match session.login(UserType::So, Some(so_pin)) {
        Ok(()) => {
            let done = op(session);
            let _ = session.logout();
            done.map_err(op_error)
        }
        Err(CkError::Pkcs11(RvError::PinIncorrect | RvError::PinLocked, _)) => {
            Err(HsmError::LoginRefused)
        }
        Err(e) => Err(classify(e)),
    };
    // The user PIN was good a moment ago; failing to log back in is a device fault that the
    // next operation's session recovery reports.
    if let Err(e) = session.login(UserType::User, Some(&inner.pin)) {
        tracing::debug!(error = %e, "user login after the officer session is left to recovery");
    }
    outcome
}

fn destroy_others(session: &Session, template: &[Attribute], keep: &[u8]) -> Result<(), OpError> {
    for handle in session.find_objects(template)? {
        let id = session.get_attributes(handle, &[cryptoki::object::AttributeType::Id])?;
        let is_new = id
            .iter()
            .any(|a| matches!(a, Attribute::Id(v) if v.as_slice() == keep));
        if !is_new {
            session.destroy_object(handle)?;
        }
    }
    Ok(())
}

fn op_error(e: OpError) -> HsmError {
    match e {
        OpError::Ck(CkError::Pkcs11(rv, _)) if is_session_fault(rv) => HsmError::Unavailable(rv),
        OpError::Ck(e) => classify(e),
        OpError::Hsm(e) => e,
    }
}
