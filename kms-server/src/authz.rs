//! Authorization: roles, the one table of which role may call which RPC, role bindings, key
//! grants, break-glass windows, and dual-control approval requests.
//!
//! A request passes three gates, in order:
//! 1. its principal (from the client certificate) holds at least one role — no binding, no
//!    access;
//! 2. one of those roles may call the RPC ([`RULES`]; an RPC missing from the table is denied);
//! 3. for key use, a grant in force (or an open break-glass window) names the key and the
//!    operation, and the request's encryption context meets the grant's constraints
//!    ([`Access`], asked by the key service once it knows the key).
//!
//! Changes of privilege (grants, role bindings, quorums, key deletion, break-glass) are
//! proposals: they run exactly once, when the last required approval arrives (see
//! [`Authz::approve`]). Revoking a grant lowers privilege and takes effect at once.
//!
//! Bindings, grants and windows are small and read on every request, so they are cached in
//! memory and reloaded after every change this process makes, when another replica's change
//! is notified (PostgreSQL), and every few seconds (the server's refresher). A view that could
//! not be reloaded for [`AUTHZ_MAX_AGE`] is no longer trusted ([`Authz::is_current`]): the
//! server then refuses every request with `UNAVAILABLE` rather than honour a revoked grant.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use serde::{Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::Row;
use uuid::Uuid;

use crate::error::KmsError;
use crate::recovery::Recovery;
use crate::service::{Clock, Context, KeyAccess, KeyOp, KeyService};
use crate::store::{db_error, Backend, KeyState, Store};

/// What a principal may be. Roles are bound to principals in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Manages keys, proposes grants and deletions; never uses a key.
    SecurityOfficer,
    /// Uses the keys granted to it.
    App,
    /// Tokenizes in its granted domains.
    Tokenizer,
    /// Re-identifies tokens, each call a recorded disclosure.
    Reidentifier,
    /// Holds a recovery share; approves recoveries.
    Custodian,
    /// Reads and verifies the audit trail, reads key metadata.
    Auditor,
    /// Time-boxed emergency use of named keys.
    BreakGlass,
}

impl Role {
    /// Every role.
    pub const ALL: [Role; 7] = [
        Role::SecurityOfficer,
        Role::App,
        Role::Tokenizer,
        Role::Reidentifier,
        Role::Custodian,
        Role::Auditor,
        Role::BreakGlass,
    ];

    /// The role's name, as stored and as shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Role::SecurityOfficer => "security-officer",
            Role::App => "app",
            Role::Tokenizer => "tokenizer",
            Role::Reidentifier => "reidentifier",
            Role::Custodian => "custodian",
            Role::Auditor => "auditor",
            Role::BreakGlass => "break-glass",
        }
    }

    /// The role named `name`.
    pub fn parse(name: &str) -> Result<Role, KmsError> {
        Role::ALL
            .into_iter()
            .find(|r| r.as_str() == name)
            .ok_or(KmsError::InvalidArgument {
                field: "role",
                reason: "unknown role",
            })
    }

    /// Roles that use keys, as opposed to administering or overseeing them.
    pub fn uses_keys(self) -> bool {
        matches!(
            self,
            Role::App | Role::Tokenizer | Role::Reidentifier | Role::BreakGlass
        )
    }

    /// Whether a grant of `op` suits this role.
    pub fn may_hold(self, op: KeyOp) -> bool {
        match self {
            Role::App => matches!(
                op,
                KeyOp::GenerateDataKey | KeyOp::Encrypt | KeyOp::Decrypt | KeyOp::ReEncrypt
            ),
            Role::Tokenizer => matches!(op, KeyOp::Tokenize | KeyOp::DomainKey),
            Role::Reidentifier => op == KeyOp::Reidentify,
            _ => false,
        }
    }
}

use Role::*;

const ANY_ROLE: &[Role] = &Role::ALL;
const OFFICER: &[Role] = &[SecurityOfficer];
const OVERSIGHT: &[Role] = &[SecurityOfficer, Auditor];
const KEY_USERS: &[Role] = &[App, BreakGlass];
const APPROVERS: &[Role] = &[SecurityOfficer, Custodian, Auditor];
const RECOVERY_WATCHERS: &[Role] = &[SecurityOfficer, Custodian, Auditor];

/// Which roles may call each RPC of `kms.v1.KeyManagement`, by method name. The only place
/// where this is decided; a method that is not listed is denied to everyone (a test checks
/// that every method of the proto is listed).
pub const RULES: &[(&str, &[Role])] = &[
    ("Ping", ANY_ROLE),
    ("WhoAmI", ANY_ROLE),
    // Key management.
    ("CreateKey", OFFICER),
    ("EnableKey", OFFICER),
    ("DisableKey", OFFICER),
    ("RotateKey", OFFICER),
    ("SetMinDecryptionVersion", OFFICER),
    ("SetRotationPolicy", OFFICER),
    ("ScheduleKeyDeletion", OFFICER),
    ("CancelKeyDeletion", OFFICER),
    ("ListKeys", OVERSIGHT),
    // Key users see only the keys they hold a grant or window for (checked per key).
    ("DescribeKey", &[SecurityOfficer, Auditor, App, BreakGlass]),
    // Key use, further limited per key by grants and break-glass windows.
    ("GenerateDataKey", KEY_USERS),
    ("GenerateDataKeyWithoutPlaintext", KEY_USERS),
    ("Encrypt", KEY_USERS),
    ("Decrypt", KEY_USERS),
    ("ReEncrypt", KEY_USERS),
    ("BatchDecrypt", KEY_USERS),
    ("BatchReEncrypt", KEY_USERS),
    // Privilege, all through approval except revocation.
    ("ListRoleBindings", OVERSIGHT),
    ("ProposeRoleBinding", OFFICER),
    ("ProposeGrant", OFFICER),
    ("RevokeGrant", OFFICER),
    ("ListGrants", OVERSIGHT),
    ("ProposeQuorum", OFFICER),
    ("ListQuorums", OVERSIGHT),
    ("ListApprovals", APPROVERS),
    ("GetApproval", APPROVERS),
    // Whether this approver may decide this request is checked against the request's
    // approver role; a proposer may always withdraw (reject) its own request.
    ("Approve", &[SecurityOfficer, Custodian]),
    ("Reject", &[SecurityOfficer, Custodian, BreakGlass]),
    ("OpenBreakGlass", &[BreakGlass]),
    (
        "ListBreakGlassWindows",
        &[SecurityOfficer, Auditor, BreakGlass],
    ),
    // The audit trail.
    ("VerifyAudit", &[Auditor]),
    ("ListAuditRecords", &[Auditor]),
    ("HashIdentifier", &[Auditor]),
    // Recovery: officers run ceremonies, custodians hold shares (each call further checks
    // that the share is the caller's own), auditors watch.
    ("RegisterCustodianKey", &[Custodian]),
    ("ListCustodianKeys", RECOVERY_WATCHERS),
    ("ProposeRecoveryInit", OFFICER),
    ("ProposeRecoveryReshare", OFFICER),
    ("ProposeRecoveryBackup", OFFICER),
    ("GetRecoveryBackup", OFFICER),
    ("VerifyRecoveryBackup", OVERSIGHT),
    ("GetRecoveryStatus", RECOVERY_WATCHERS),
    ("GetRecoveryShare", &[Custodian]),
    ("ConfirmRecoveryShare", &[Custodian]),
    ("CloseRecoveryCeremony", OFFICER),
    ("BeginRestore", OFFICER),
    ("SubmitShare", &[Custodian]),
    ("CancelRecoverySession", OFFICER),
    // Tokenization domains: officers create and rotate them; use is further limited per domain
    // by grants on its master key (tokenize, domain-key, reidentify).
    ("CreateDomain", OFFICER),
    ("ListDomains", OVERSIGHT),
    ("ProposeDomainRotation", OFFICER),
    ("GetDomainKey", &[Tokenizer]),
    ("Tokenize", &[Tokenizer]),
    ("Detokenize", &[Reidentifier]),
];

/// Whether any of `roles` may call `rpc`.
pub fn allowed(rpc: &str, roles: &[Role]) -> bool {
    RULES
        .iter()
        .find(|(name, _)| *name == rpc)
        .is_some_and(|(_, allowed)| roles.iter().any(|r| allowed.contains(r)))
}

/// Separation of duties: one principal never administers or oversees keys and uses them, and
/// an auditor never also manages keys.
pub fn check_compatible(roles: &[Role]) -> Result<(), KmsError> {
    let users = roles.iter().any(|r| r.uses_keys());
    let others = roles.iter().any(|r| !r.uses_keys());
    if users && others {
        return Err(KmsError::Conflict {
            reason: "separation of duties: a principal cannot both administer and use keys",
        });
    }
    if roles.contains(&Auditor) && roles.contains(&SecurityOfficer) {
        return Err(KmsError::Conflict {
            reason: "separation of duties: an auditor cannot also be a security officer",
        });
    }
    Ok(())
}

/// The authenticated caller of one request.
#[derive(Debug, Clone)]
pub struct Caller {
    /// From the client certificate.
    pub principal: String,
    /// Its roles, sorted.
    pub roles: Arc<Vec<Role>>,
}

impl Caller {
    /// Whether the caller holds `role`.
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The roles as one string, for the audit record.
    pub fn roles_text(&self) -> String {
        self.roles
            .iter()
            .map(|r| r.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// A grant: what one principal may do with one key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Grant {
    /// Its id.
    pub grant_id: String,
    /// Who may use the key.
    pub principal: String,
    /// Which key.
    pub key_id: Uuid,
    /// Which operations.
    pub operations: Vec<KeyOp>,
    /// Context keys every call must carry.
    pub required_context_keys: Vec<String>,
    /// Context entries every call must carry with exactly these values.
    pub context_equals: BTreeMap<String, String>,
    /// Seconds since the Unix epoch; 0: never.
    pub expires_at: i64,
    /// When it took effect.
    pub created_at: i64,
    /// The approval request that created it.
    pub approval_id: String,
    /// When it was revoked; 0: in force unless expired.
    pub revoked_at: i64,
}

/// Why a grant does not cover a call, most specific first.
enum Refusal {
    NoGrant,
    Expired,
    Context,
}

impl Grant {
    fn covers(&self, op: KeyOp, key_id: Uuid, context: &Context, now: i64) -> Result<(), Refusal> {
        if self.key_id != key_id || self.revoked_at != 0 {
            return Err(Refusal::NoGrant);
        }
        // Any grant on a key lets its holder read the key's metadata.
        if op != KeyOp::Describe && !self.operations.contains(&op) {
            return Err(Refusal::NoGrant);
        }
        if self.expires_at != 0 && now > self.expires_at {
            return Err(Refusal::Expired);
        }
        if op == KeyOp::Describe {
            return Ok(());
        }
        let keys_present = self
            .required_context_keys
            .iter()
            .all(|k| context.contains_key(k));
        let values_match = self
            .context_equals
            .iter()
            .all(|(k, v)| context.get(k).is_some_and(|actual| actual == v));
        if keys_present && values_match {
            Ok(())
        } else {
            Err(Refusal::Context)
        }
    }
}

/// A break-glass window: emergency use of named keys by one principal, until it closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Window {
    /// Its id (marked on every audit record of a use inside it).
    pub window_id: String,
    /// Who may use the keys.
    pub principal: String,
    /// Which keys.
    pub key_ids: Vec<Uuid>,
    /// Why, as written by the principal.
    pub justification: String,
    /// When it opened (seconds since the Unix epoch).
    pub opened_at: i64,
    /// The last second in which it may be used.
    pub closes_at: i64,
    /// The approval request that opened it ("" when policy opens windows at once).
    pub approval_id: String,
}

impl Window {
    fn open_for(&self, key_id: Uuid, now: i64) -> bool {
        self.opened_at <= now && now <= self.closes_at && self.key_ids.contains(&key_id)
    }
}

/// The key-use rights of one caller for one request: a snapshot of its grants and windows
/// at the request's time. Remembers the break-glass window a use went through.
pub struct Access {
    caller: Caller,
    grants: Arc<GrantsByKey>,
    windows: Arc<Vec<Window>>,
    now: i64,
    used_window: Mutex<Option<String>>,
}

impl Access {
    /// The break-glass window a use went through, if any.
    pub fn used_window(&self) -> Option<String> {
        self.used_window
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl KeyAccess for Access {
    fn hides_unknown_keys(&self) -> bool {
        !(self.caller.has(SecurityOfficer) || self.caller.has(Auditor))
    }

    fn check(&self, op: KeyOp, key_id: Uuid, context: &Context) -> Result<(), KmsError> {
        if op == KeyOp::Describe && (self.caller.has(SecurityOfficer) || self.caller.has(Auditor)) {
            return Ok(());
        }
        let mut refusal = Refusal::NoGrant;
        if self
            .caller
            .roles
            .iter()
            .any(|r| *r != BreakGlass && r.uses_keys())
        {
            for grant in self.grants.get(&key_id).into_iter().flatten() {
                match grant.covers(op, key_id, context, self.now) {
                    Ok(()) => return Ok(()),
                    Err(Refusal::NoGrant) => {}
                    Err(other) => refusal = other,
                }
            }
        }
        if self.caller.has(BreakGlass) {
            if let Some(window) = self.windows.iter().find(|w| w.open_for(key_id, self.now)) {
                *self.used_window.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(window.window_id.clone());
                return Ok(());
            }
            return Err(KmsError::PermissionDenied {
                reason: "no open break-glass window for this key",
            });
        }
        Err(KmsError::PermissionDenied {
            reason: match refusal {
                Refusal::NoGrant => "no grant for this key and operation",
                Refusal::Expired => "grant expired",
                Refusal::Context => "encryption context does not meet the grant",
            },
        })
    }
}

/// Kinds of approval request, each with its own quorum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Kind {
    /// Creating a key grant.
    Grant,
    /// Adding or removing a role binding.
    RoleBinding,
    /// Changing a quorum.
    Quorum,
    /// Scheduling a key's destruction.
    KeyDeletion,
    /// Opening a break-glass window.
    BreakGlass,
    /// Creating (or replacing) the recovery domain.
    RecoveryInit,
    /// Handing the recovery key to new custodians.
    RecoveryReshare,
    /// Making a backup of the master keys.
    RecoveryBackup,
    /// A new key version for a tokenization domain (breaks pseudonym linkage).
    DomainRotation,
}

impl Kind {
    /// Every kind.
    pub const ALL: [Kind; 9] = [
        Kind::Grant,
        Kind::RoleBinding,
        Kind::Quorum,
        Kind::KeyDeletion,
        Kind::BreakGlass,
        Kind::RecoveryInit,
        Kind::RecoveryReshare,
        Kind::RecoveryBackup,
        Kind::DomainRotation,
    ];

    /// The kind's name, as stored and shown.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Grant => "grant",
            Kind::RoleBinding => "role-binding",
            Kind::Quorum => "quorum",
            Kind::KeyDeletion => "key-deletion",
            Kind::BreakGlass => "break-glass",
            Kind::RecoveryInit => "recovery-init",
            Kind::RecoveryReshare => "recovery-reshare",
            Kind::RecoveryBackup => "recovery-backup",
            Kind::DomainRotation => "domain-rotation",
        }
    }

    /// The kind named `name`.
    pub fn parse(name: &str) -> Result<Kind, KmsError> {
        Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == name)
            .ok_or(KmsError::InvalidArgument {
                field: "kind",
                reason: "unknown approval kind",
            })
    }
}

/// How many distinct approvers of which role a kind of request needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Quorum {
    /// Which requests.
    pub kind: Kind,
    /// Distinct approvers needed, besides the proposer.
    pub required: u32,
    /// The role each approver must hold.
    pub approver_role: Role,
}

/// The default for every kind: one security officer other than the proposer (dual control).
fn default_quorum(kind: Kind) -> Quorum {
    Quorum {
        kind,
        required: 1,
        approver_role: SecurityOfficer,
    }
}

/// Most approvers a quorum may require.
pub const MAX_QUORUM: u32 = 9;

/// The exact operation an approval request will run.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum Proposal {
    /// Create a grant.
    Grant {
        /// Grantee.
        principal: String,
        /// Key id.
        key_id: Uuid,
        /// Operation names (see [`KeyOp::as_str`]).
        operations: Vec<String>,
        /// Context keys every call must carry.
        required_context_keys: Vec<String>,
        /// Context entries every call must carry with these values.
        context_equals: BTreeMap<String, String>,
        /// Expiry, 0: none.
        expires_at: i64,
    },
    /// Add or remove a role binding.
    RoleBinding {
        /// Whose.
        principal: String,
        /// Which role.
        role: Role,
        /// Remove instead of add.
        remove: bool,
    },
    /// Replace a kind's quorum.
    Quorum {
        /// The new quorum.
        quorum: Quorum,
    },
    /// Schedule a key's destruction.
    KeyDeletion {
        /// Key id.
        key_id: Uuid,
        /// Waiting period in days (0: 30).
        pending_window_days: u32,
    },
    /// Open a break-glass window when approved.
    BreakGlass {
        /// Who will use the keys.
        principal: String,
        /// Which keys.
        key_ids: Vec<Uuid>,
        /// Why.
        justification: String,
        /// For how long, from approval.
        duration_secs: u64,
    },
    /// Create the recovery domain, or replace it with a new recovery key (`rekey`).
    RecoveryInit {
        /// M and the custodians.
        spec: crate::recovery::CeremonySpec,
        /// Replace the existing domain.
        rekey: bool,
    },
    /// Open a re-share session for new custodians / threshold.
    RecoveryReshare {
        /// The new M and custodians.
        spec: crate::recovery::CeremonySpec,
    },
    /// Make a backup.
    RecoveryBackup {},
    /// Add a tokenization domain's next key version, sealed when proposed (the blob is a
    /// ciphertext under the domain's master key, never a key in clear).
    DomainRotation {
        /// The domain.
        domain: String,
        /// The version it adds: the newest one + 1 when proposed, and still when run.
        version: u32,
        /// The sealed key (hex).
        sealed_key: String,
    },
}

impl Proposal {
    /// The request kind.
    pub fn kind(&self) -> Kind {
        match self {
            Proposal::Grant { .. } => Kind::Grant,
            Proposal::RoleBinding { .. } => Kind::RoleBinding,
            Proposal::Quorum { .. } => Kind::Quorum,
            Proposal::KeyDeletion { .. } => Kind::KeyDeletion,
            Proposal::BreakGlass { .. } => Kind::BreakGlass,
            Proposal::RecoveryInit { .. } => Kind::RecoveryInit,
            Proposal::RecoveryReshare { .. } => Kind::RecoveryReshare,
            Proposal::RecoveryBackup {} => Kind::RecoveryBackup,
            Proposal::DomainRotation { .. } => Kind::DomainRotation,
        }
    }

    /// The key the request is about, for the audit record.
    pub fn key_id(&self) -> Option<Uuid> {
        match self {
            Proposal::Grant { key_id, .. } | Proposal::KeyDeletion { key_id, .. } => Some(*key_id),
            _ => None,
        }
    }
}

/// The life of an approval request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ApprovalState {
    /// Waiting for approvals.
    Pending,
    /// Ran (exactly once).
    Executed,
    /// Rejected; can never run.
    Rejected,
    /// Not approved in time; can never run.
    Expired,
    /// Ran and failed (the reason is in `result`); can never run again.
    Failed,
}

impl ApprovalState {
    /// The stored spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ApprovalState::Pending => "pending",
            ApprovalState::Executed => "executed",
            ApprovalState::Rejected => "rejected",
            ApprovalState::Expired => "expired",
            ApprovalState::Failed => "failed",
        }
    }

    fn parse(s: &str) -> Result<Self, KmsError> {
        Ok(match s {
            "pending" => ApprovalState::Pending,
            "executed" => ApprovalState::Executed,
            "rejected" => ApprovalState::Rejected,
            "expired" => ApprovalState::Expired,
            "failed" => ApprovalState::Failed,
            _ => {
                return Err(KmsError::Internal {
                    what: "unknown approval state in store",
                })
            }
        })
    }

    fn refusal(self) -> KmsError {
        KmsError::Conflict {
            reason: match self {
                ApprovalState::Pending => "request is pending",
                ApprovalState::Executed => "request was already executed",
                ApprovalState::Rejected => "request was rejected",
                ApprovalState::Expired => "request expired",
                ApprovalState::Failed => "request already ran and failed",
            },
        }
    }
}

/// An approval request as stored.
#[derive(Debug, Clone)]
pub struct Approval {
    /// Its id.
    pub approval_id: String,
    /// Who proposed it.
    pub proposer: String,
    /// What it will run.
    pub proposal: Proposal,
    /// The exact parameters, as stored (JSON).
    pub parameters_json: String,
    /// Distinct approvers needed.
    pub required: u32,
    /// Their role.
    pub approver_role: Role,
    /// Who approved so far.
    pub approvers: Vec<String>,
    /// Where it is in its life.
    pub state: ApprovalState,
    /// When proposed.
    pub created_at: i64,
    /// Last second it can be approved in.
    pub expires_at: i64,
    /// When it ran, was rejected or expired (0: not yet).
    pub decided_at: i64,
    /// What the execution produced, who rejected it, or why it failed.
    pub result: String,
}

/// Policy settings of the authorization layer.
#[derive(Debug, Clone)]
pub struct AuthzParams {
    /// Principals bound to `security-officer` on first start (at least two).
    pub bootstrap_officers: Vec<String>,
    /// How long an approval request stays open.
    pub approval_ttl_secs: i64,
    /// Longest break-glass window.
    pub break_glass_max_secs: u64,
    /// Whether a break-glass window needs one approval (else it opens at once).
    pub break_glass_requires_approval: bool,
}

impl Default for AuthzParams {
    fn default() -> Self {
        AuthzParams {
            bootstrap_officers: Vec::new(),
            approval_ttl_secs: 24 * 3600,
            break_glass_max_secs: 4 * 3600,
            break_glass_requires_approval: true,
        }
    }
}

/// What opening a break-glass window gave.
#[derive(Debug, Clone)]
pub enum BreakGlassOutcome {
    /// Open now.
    Open(Window),
    /// Waiting for approval.
    Pending(Approval),
}

/// One principal's grants in force, by key.
type GrantsByKey = HashMap<Uuid, Vec<Grant>>;

#[derive(Default)]
struct Cache {
    roles: HashMap<String, Arc<Vec<Role>>>,
    grants: HashMap<String, Arc<GrantsByKey>>,
    windows: HashMap<String, Arc<Vec<Window>>>,
}

/// Installs `cache`, read by a reload that started at `started_ns`, unless a reload that
/// started later has installed its view already. Reloads run concurrently (this process's own
/// changes, notifications, the refresher): one that started earlier may finish later with an
/// older view, e.g. from before a revocation, and must not replace the newer one. Returns
/// whether `cache` was installed.
fn install_latest(
    slot: &RwLock<Cache>,
    installed_ns: &std::sync::atomic::AtomicU64,
    started_ns: u64,
    cache: Cache,
) -> bool {
    use std::sync::atomic::Ordering::SeqCst;
    let mut current = slot.write().unwrap_or_else(|p| p.into_inner());
    if installed_ns.load(SeqCst) > started_ns {
        return false;
    }
    *current = cache;
    installed_ns.store(started_ns, SeqCst);
    true
}

/// The authorization layer over the store.
pub struct Authz {
    store: Store,
    service: Arc<KeyService>,
    recovery: Arc<Recovery>,
    clock: Arc<dyn Clock>,
    params: AuthzParams,
    cache: RwLock<Cache>,
    /// When this layer was made: the origin of `reloaded_ns`.
    epoch: std::time::Instant,
    /// Nanoseconds after `epoch` at which the reload whose view is installed started (the
    /// latest-started successful reload); written under the `cache` write lock.
    reloaded_ns: std::sync::atomic::AtomicU64,
    /// Held by the one request that re-reads a stale view ([`Authz::reload_if_stale`]).
    stale_reload: tokio::sync::Mutex<()>,
}

/// The oldest view of bindings, grants and windows a replica acts on: three refresh periods
/// (the server reloads every 5 s, and at once when PostgreSQL notifies a change).
pub const AUTHZ_MAX_AGE: std::time::Duration = std::time::Duration::from_secs(15);

const NO_ROLES: &[Role] = &[];
const MAX_PRINCIPAL: usize = 256;
const MAX_CONTEXT_RULES: usize = 32;

impl Authz {
    /// Loads bindings, grants and windows. On a store without bindings, binds the bootstrap
    /// officers (at least two distinct ones are required; configuration checks this too).
    pub async fn open(
        store: Store,
        service: Arc<KeyService>,
        recovery: Arc<Recovery>,
        clock: Arc<dyn Clock>,
        params: AuthzParams,
    ) -> Result<Self, KmsError> {
        let authz = Authz {
            store,
            service,
            recovery,
            clock,
            params,
            cache: RwLock::default(),
            epoch: std::time::Instant::now(),
            reloaded_ns: std::sync::atomic::AtomicU64::new(0),
            stale_reload: tokio::sync::Mutex::new(()),
        };
        authz.bootstrap().await?;
        authz.reload().await?;
        Ok(authz)
    }

    /// The recovery domain that approved recovery requests run in.
    pub fn recovery(&self) -> &Arc<Recovery> {
        &self.recovery
    }

    async fn bootstrap(&self) -> Result<(), KmsError> {
        let pool = self.store.pool();
        let bound = || async {
            sqlx::query("SELECT COUNT(*) AS n FROM role_bindings")
                .fetch_one(pool)
                .await
                .map_err(db_error)?
                .try_get::<i64, _>("n")
                .map_err(db_error)
        };
        if bound().await? > 0 {
            return Ok(());
        }
        let mut officers = self.params.bootstrap_officers.clone();
        officers.sort();
        officers.dedup();
        if officers.len() < 2 {
            return Err(KmsError::InvalidArgument {
                field: "bootstrap.security_officers",
                reason: "at least two distinct principals are needed on first start",
            });
        }
        for officer in &officers {
            validate_principal(officer)?;
        }
        let now = self.clock.now_unix();
        let inserted = async {
            let mut tx = pool.begin().await?;
            for officer in &officers {
                sqlx::query(
                    "INSERT INTO role_bindings (principal, role, created_at, approval_id) \
                     VALUES ($1, $2, $3, $4)",
                )
                .bind(officer.as_str())
                .bind(SecurityOfficer.as_str())
                .bind(now)
                .bind("")
                .execute(&mut *tx)
                .await?;
            }
            tx.commit().await
        }
        .await;
        match inserted {
            Ok(()) => {}
            // Replicas started together on an empty store: another one bound them first.
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() && bound().await? > 0 => {
                return Ok(());
            }
            Err(e) => return Err(db_error(e)),
        }
        tracing::warn!(
            count = officers.len(),
            "first start: bound the bootstrap security officers"
        );
        Ok(())
    }

    /// Re-reads bindings, grants and open windows into the cache.
    pub async fn reload(&self) -> Result<(), KmsError> {
        let started = self.epoch.elapsed();
        let pool = self.store.pool();
        let mut cache = Cache::default();
        let mut roles: HashMap<String, Vec<Role>> = HashMap::new();
        for row in sqlx::query("SELECT principal, role FROM role_bindings")
            .fetch_all(pool)
            .await
            .map_err(db_error)?
        {
            let principal: String = row.try_get("principal").map_err(db_error)?;
            let role: String = row.try_get("role").map_err(db_error)?;
            let role = Role::parse(&role).map_err(|_| KmsError::Internal {
                what: "unknown role in store",
            })?;
            roles.entry(principal).or_default().push(role);
        }
        for (principal, mut list) in roles {
            list.sort();
            cache.roles.insert(principal, Arc::new(list));
        }
        let mut grants: HashMap<String, GrantsByKey> = HashMap::new();
        for grant in self.grants_where_in_force().await? {
            grants
                .entry(grant.principal.clone())
                .or_default()
                .entry(grant.key_id)
                .or_default()
                .push(grant);
        }
        cache.grants = grants.into_iter().map(|(p, g)| (p, Arc::new(g))).collect();
        let mut windows: HashMap<String, Vec<Window>> = HashMap::new();
        for window in self.windows(Some(self.clock.now_unix())).await? {
            windows
                .entry(window.principal.clone())
                .or_default()
                .push(window);
        }
        cache.windows = windows.into_iter().map(|(p, w)| (p, Arc::new(w))).collect();
        let started_ns = u64::try_from(started.as_nanos()).unwrap_or(u64::MAX);
        install_latest(&self.cache, &self.reloaded_ns, started_ns, cache);
        Ok(())
    }

    /// Re-reads a view that is too old, at once rather than at the refresher's next tick
    /// (after a store outage longer than [`AUTHZ_MAX_AGE`], service resumes as soon as the
    /// store answers). One caller reloads; the others do not wait for it. Returns whether the
    /// view is current afterwards.
    pub async fn reload_if_stale(&self) -> bool {
        let Ok(_only) = self.stale_reload.try_lock() else {
            return false;
        };
        if self.is_current() {
            return true;
        }
        match tokio::time::timeout(crate::store::ACQUIRE_TIMEOUT, self.reload()).await {
            Ok(Ok(())) => self.is_current(),
            _ => false,
        }
    }

    /// Whether the cached view was read from the store less than [`AUTHZ_MAX_AGE`] ago.
    pub fn is_current(&self) -> bool {
        let reloaded = std::time::Duration::from_nanos(
            self.reloaded_ns.load(std::sync::atomic::Ordering::SeqCst),
        );
        self.epoch.elapsed().saturating_sub(reloaded) <= AUTHZ_MAX_AGE
    }

    /// The caller behind `principal`, with its roles (possibly none).
    pub fn caller(&self, principal: &str) -> Caller {
        let roles = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .roles
            .get(principal)
            .cloned()
            .unwrap_or_else(|| Arc::new(NO_ROLES.to_vec()));
        Caller {
            principal: principal.to_string(),
            roles,
        }
    }

    /// The key-use rights of `caller` now.
    pub fn access(&self, caller: &Caller) -> Access {
        let cache = self.cache.read().unwrap_or_else(|p| p.into_inner());
        Access {
            caller: caller.clone(),
            grants: cache
                .grants
                .get(&caller.principal)
                .cloned()
                .unwrap_or_default(),
            windows: cache
                .windows
                .get(&caller.principal)
                .cloned()
                .unwrap_or_default(),
            now: self.clock.now_unix(),
            used_window: Mutex::new(None),
        }
    }

    /// Every role binding.
    pub async fn bindings(&self) -> Result<Vec<(String, Role, i64, String)>, KmsError> {
        let rows = sqlx::query(
            "SELECT principal, role, created_at, approval_id FROM role_bindings \
             ORDER BY principal, role",
        )
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let role: String = row.try_get("role").map_err(db_error)?;
                Ok((
                    row.try_get("principal").map_err(db_error)?,
                    Role::parse(&role)?,
                    row.try_get("created_at").map_err(db_error)?,
                    row.try_get("approval_id").map_err(db_error)?,
                ))
            })
            .collect()
    }

    /// Grants, optionally only one principal's or one key's, newest last.
    pub async fn grants(
        &self,
        principal: Option<&str>,
        key_id: Option<Uuid>,
    ) -> Result<Vec<Grant>, KmsError> {
        let rows = sqlx::query(&format!(
            "SELECT {GRANT_COLUMNS} FROM key_grants ORDER BY created_at, grant_id"
        ))
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        let mut grants = Vec::new();
        for row in &rows {
            let grant = grant_from_row(row)?;
            if principal.is_some_and(|p| p != grant.principal)
                || key_id.is_some_and(|k| k != grant.key_id)
            {
                continue;
            }
            grants.push(grant);
        }
        Ok(grants)
    }

    async fn grants_where_in_force(&self) -> Result<Vec<Grant>, KmsError> {
        let rows = sqlx::query(&format!(
            "SELECT {GRANT_COLUMNS} FROM key_grants WHERE revoked_at = 0"
        ))
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        rows.iter().map(grant_from_row).collect()
    }

    /// Break-glass windows; with `open_at`, only those not closed by then.
    pub async fn windows(&self, open_at: Option<i64>) -> Result<Vec<Window>, KmsError> {
        let rows = sqlx::query(
            "SELECT window_id, principal, key_ids, justification, opened_at, closes_at, \
             approval_id FROM break_glass_windows WHERE closes_at >= $1 ORDER BY opened_at",
        )
        .bind(open_at.unwrap_or(i64::MIN))
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        rows.iter()
            .map(|row| {
                let key_ids: String = row.try_get("key_ids").map_err(db_error)?;
                Ok(Window {
                    window_id: row.try_get("window_id").map_err(db_error)?,
                    principal: row.try_get("principal").map_err(db_error)?,
                    key_ids: serde_json::from_str(&key_ids).map_err(|_| corrupt())?,
                    justification: row.try_get("justification").map_err(db_error)?,
                    opened_at: row.try_get("opened_at").map_err(db_error)?,
                    closes_at: row.try_get("closes_at").map_err(db_error)?,
                    approval_id: row.try_get("approval_id").map_err(db_error)?,
                })
            })
            .collect()
    }

    /// The quorum of every kind (stored, or the default).
    pub async fn quorums(&self) -> Result<Vec<Quorum>, KmsError> {
        let mut conn = self.store.pool().acquire().await.map_err(db_error)?;
        quorums_in(&mut conn).await
    }

    async fn quorum(&self, kind: Kind) -> Result<Quorum, KmsError> {
        let mut conn = self.store.pool().acquire().await.map_err(db_error)?;
        quorum_in(&mut conn, kind).await
    }

    /// Records a proposal as a pending approval request, after checking that it could run now.
    pub async fn propose(&self, caller: &Caller, proposal: Proposal) -> Result<Approval, KmsError> {
        self.validate(caller, &proposal).await?;
        let quorum = self.quorum(proposal.kind()).await?;
        let now = self.clock.now_unix();
        let approval = Approval {
            approval_id: Uuid::new_v4().to_string(),
            proposer: caller.principal.clone(),
            parameters_json: serde_json::to_string(&proposal).map_err(|_| KmsError::Internal {
                what: "proposal encoding",
            })?,
            proposal,
            required: quorum.required,
            approver_role: quorum.approver_role,
            approvers: Vec::new(),
            state: ApprovalState::Pending,
            created_at: now,
            expires_at: now.saturating_add(self.params.approval_ttl_secs),
            decided_at: 0,
            result: String::new(),
        };
        sqlx::query(
            "INSERT INTO approvals (approval_id, kind, proposer, parameters, required, \
             approver_role, state, created_at, expires_at, decided_at, result) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)",
        )
        .bind(approval.approval_id.as_str())
        .bind(approval.proposal.kind().as_str())
        .bind(approval.proposer.as_str())
        .bind(approval.parameters_json.as_str())
        .bind(i64::from(approval.required))
        .bind(approval.approver_role.as_str())
        .bind(approval.state.as_str())
        .bind(approval.created_at)
        .bind(approval.expires_at)
        .bind(0_i64)
        .bind("")
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        tracing::info!(
            approval_id = %approval.approval_id,
            kind = approval.proposal.kind().as_str(),
            "approval requested"
        );
        Ok(approval)
    }

    /// Checks a proposal against the current state, so that one that cannot run is refused
    /// when proposed rather than when approved. Execution checks again.
    async fn validate(&self, caller: &Caller, proposal: &Proposal) -> Result<(), KmsError> {
        match proposal {
            Proposal::Grant {
                principal,
                key_id,
                operations,
                required_context_keys,
                context_equals,
                expires_at,
            } => {
                validate_principal(principal)?;
                let roles = self.caller(principal).roles;
                if !roles.iter().any(|r| *r != BreakGlass && r.uses_keys()) {
                    return Err(KmsError::Conflict {
                        reason: "grantee holds no app, tokenizer or reidentifier role",
                    });
                }
                parse_operations(operations)?;
                if required_context_keys.len() + context_equals.len() > MAX_CONTEXT_RULES {
                    return Err(KmsError::InvalidArgument {
                        field: "context constraints",
                        reason: "at most 32",
                    });
                }
                if *expires_at != 0 && *expires_at <= self.clock.now_unix() {
                    return Err(KmsError::InvalidArgument {
                        field: "expires_at",
                        reason: "in the past",
                    });
                }
                self.key_in_use(*key_id).await
            }
            Proposal::RoleBinding {
                principal,
                role,
                remove,
            } => {
                validate_principal(principal)?;
                let current = self.caller(principal).roles;
                if *remove {
                    if !current.contains(role) {
                        return Err(KmsError::NotFound {
                            what: "role binding",
                        });
                    }
                    if *role == SecurityOfficer && self.holders(SecurityOfficer) <= 2 {
                        return Err(KmsError::Conflict {
                            reason: "at least two security officers must remain",
                        });
                    }
                    Ok(())
                } else {
                    if current.contains(role) {
                        return Err(KmsError::Conflict {
                            reason: "role binding already exists",
                        });
                    }
                    let mut next = current.to_vec();
                    next.push(*role);
                    check_compatible(&next)
                }
            }
            Proposal::Quorum { quorum } => {
                if quorum.required == 0 || quorum.required > MAX_QUORUM {
                    return Err(KmsError::InvalidArgument {
                        field: "required",
                        reason: "1 to 9 approvers",
                    });
                }
                if !matches!(quorum.approver_role, SecurityOfficer | Custodian) {
                    return Err(KmsError::InvalidArgument {
                        field: "approver_role",
                        reason: "security-officer or custodian",
                    });
                }
                if self.holders(quorum.approver_role) < quorum.required as usize {
                    return Err(KmsError::Conflict {
                        reason: "fewer principals hold the approver role than the quorum needs",
                    });
                }
                Ok(())
            }
            Proposal::KeyDeletion {
                key_id,
                pending_window_days,
            } => {
                // The window is validated where the due date is computed.
                self.service.deletion_due_at(*pending_window_days)?;
                let record = self
                    .service
                    .describe_key(&crate::service::Unrestricted, &key_id.to_string())
                    .await?;
                match record.state {
                    KeyState::Enabled | KeyState::Disabled => Ok(()),
                    KeyState::PendingDeletion => Err(KmsError::KeyNotUsable {
                        state: "pending deletion",
                    }),
                    KeyState::Destroyed => Err(KmsError::KeyDestroyed),
                }
            }
            Proposal::BreakGlass {
                principal,
                key_ids,
                justification,
                duration_secs,
            } => {
                if principal != &caller.principal {
                    return Err(KmsError::PermissionDenied {
                        reason: "break-glass is requested by its user",
                    });
                }
                self.validate_break_glass(key_ids, justification, *duration_secs)
                    .await
            }
            Proposal::RecoveryInit { spec, rekey } => {
                self.recovery.validate_init(spec, *rekey).await
            }
            Proposal::RecoveryReshare { spec } => self.recovery.validate_reshare(spec).await,
            Proposal::RecoveryBackup {} => self.recovery.status().await.and_then(|status| {
                if status.ceremony_id.is_empty() {
                    Err(KmsError::Conflict {
                        reason: "no recovery domain: run a recovery init first",
                    })
                } else {
                    Ok(())
                }
            }),
            Proposal::DomainRotation { domain, .. } => crate::domains::check_name(domain),
        }
    }

    async fn validate_break_glass(
        &self,
        key_ids: &[Uuid],
        justification: &str,
        duration_secs: u64,
    ) -> Result<(), KmsError> {
        if key_ids.is_empty() || key_ids.len() > 16 {
            return Err(KmsError::InvalidArgument {
                field: "keys",
                reason: "1 to 16 keys",
            });
        }
        let visible = justification
            .chars()
            .filter(|c| !c.is_whitespace() && !deceptive(*c))
            .count();
        if !(10..=1000).contains(&visible) || justification.chars().count() > 1000 {
            return Err(KmsError::InvalidArgument {
                field: "justification",
                reason: "10 to 1000 characters",
            });
        }
        if justification
            .chars()
            .any(|c| c.is_control() || deceptive(c))
        {
            return Err(KmsError::InvalidArgument {
                field: "justification",
                reason: "one line of text without control or invisible characters",
            });
        }
        if duration_secs == 0 || duration_secs > self.params.break_glass_max_secs {
            return Err(KmsError::InvalidArgument {
                field: "duration_seconds",
                reason: "1 second up to the server's break-glass maximum",
            });
        }
        for key_id in key_ids {
            self.key_in_use(*key_id).await?;
        }
        Ok(())
    }

    async fn key_in_use(&self, key_id: Uuid) -> Result<(), KmsError> {
        let record = self
            .service
            .describe_key(&crate::service::Unrestricted, &key_id.to_string())
            .await?;
        if record.state == KeyState::Destroyed {
            return Err(KmsError::KeyDestroyed);
        }
        Ok(())
    }

    fn holders(&self, role: Role) -> usize {
        self.cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .roles
            .values()
            .filter(|roles| roles.contains(&role))
            .count()
    }

    /// One approval request.
    pub async fn approval(&self, approval_id: &str) -> Result<Approval, KmsError> {
        let row = sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE approval_id = $1"
        ))
        .bind(approval_id)
        .fetch_optional(self.store.pool())
        .await
        .map_err(db_error)?
        .ok_or(KmsError::NotFound {
            what: "approval request",
        })?;
        self.approval_from_row(&row).await
    }

    /// Approval requests, newest first (at most 500).
    pub async fn approvals(&self, pending_only: bool) -> Result<Vec<Approval>, KmsError> {
        self.expire_overdue().await?;
        let rows = sqlx::query(&format!(
            "SELECT {APPROVAL_COLUMNS} FROM approvals WHERE state = $1 OR $2 = 0 \
             ORDER BY created_at DESC, approval_id LIMIT 500"
        ))
        .bind(ApprovalState::Pending.as_str())
        .bind(i64::from(pending_only))
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?;
        let mut out = Vec::with_capacity(rows.len());
        for row in &rows {
            out.push(self.approval_from_row(row).await?);
        }
        Ok(out)
    }

    async fn expire_overdue(&self) -> Result<(), KmsError> {
        let now = self.clock.now_unix();
        sqlx::query(
            "UPDATE approvals SET state = $1, decided_at = $2 WHERE state = $3 AND expires_at < $4",
        )
        .bind(ApprovalState::Expired.as_str())
        .bind(now)
        .bind(ApprovalState::Pending.as_str())
        .bind(now)
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Adds `caller`'s approval. When it is the last one required, runs the request — exactly
    /// once, even when several approvers race: the state change from pending is conditional,
    /// and only the call that makes it runs the operation.
    pub async fn approve(&self, caller: &Caller, approval_id: &str) -> Result<Approval, KmsError> {
        let approval = self.decidable(approval_id).await?;
        if approval.proposer == caller.principal {
            return Err(KmsError::PermissionDenied {
                reason: "nobody approves their own request",
            });
        }
        if !caller.has(approval.approver_role) {
            return Err(KmsError::PermissionDenied {
                reason: "approver lacks the role this request needs",
            });
        }
        let now = self.clock.now_unix();
        let inserted = sqlx::query(
            "INSERT INTO approval_votes (approval_id, approver, created_at) \
             SELECT approval_id, $1, $2 FROM approvals WHERE approval_id = $3 AND state = $4",
        )
        .bind(caller.principal.as_str())
        .bind(now)
        .bind(approval_id)
        .bind(ApprovalState::Pending.as_str())
        .execute(self.store.pool())
        .await;
        match inserted {
            Ok(done) if done.rows_affected() == 1 => {}
            Ok(_) => return Err(self.approval(approval_id).await?.state.refusal()),
            Err(sqlx::Error::Database(db)) if db.is_unique_violation() => {
                // This principal's vote is in. If the call that cast it failed before the
                // request ran (a replica killed, the store restarting between the vote and
                // the execution), the quorum may be met with the request still pending:
                // run it now — execution is exactly once whoever calls it — so that
                // repeating an approval after an error completes it instead of leaving it
                // pending for good.
                let approval = self.approval(approval_id).await?;
                if approval.state == ApprovalState::Pending
                    && approval.approvers.len() >= approval.required as usize
                {
                    self.execute(&approval).await?;
                    let after = self.approval(approval_id).await?;
                    if after.state != ApprovalState::Pending {
                        return Ok(after);
                    }
                }
                return Err(KmsError::Conflict {
                    reason: "already approved by this principal",
                });
            }
            Err(e) => return Err(db_error(e)),
        }
        let approval = self.approval(approval_id).await?;
        if approval.state == ApprovalState::Pending
            && approval.approvers.len() >= approval.required as usize
        {
            self.execute(&approval).await?;
            return self.approval(approval_id).await;
        }
        Ok(approval)
    }

    /// Rejects a pending request for good. Its proposer may withdraw it; anyone else needs the
    /// request's approver role.
    pub async fn reject(&self, caller: &Caller, approval_id: &str) -> Result<Approval, KmsError> {
        let approval = self.decidable(approval_id).await?;
        if approval.proposer != caller.principal && !caller.has(approval.approver_role) {
            return Err(KmsError::PermissionDenied {
                reason: "rejecter lacks the role this request needs",
            });
        }
        let done = sqlx::query(
            "UPDATE approvals SET state = $1, decided_at = $2, result = $3 \
             WHERE approval_id = $4 AND state = $5",
        )
        .bind(ApprovalState::Rejected.as_str())
        .bind(self.clock.now_unix())
        .bind(format!("rejected by {}", caller.principal))
        .bind(approval_id)
        .bind(ApprovalState::Pending.as_str())
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        let now = self.approval(approval_id).await?;
        if done.rows_affected() == 0 {
            return Err(now.state.refusal());
        }
        Ok(now)
    }

    /// A request that can still be decided: pending and not expired (an expired one is marked
    /// so on the way).
    async fn decidable(&self, approval_id: &str) -> Result<Approval, KmsError> {
        let approval = self.approval(approval_id).await?;
        if approval.state != ApprovalState::Pending {
            return Err(approval.state.refusal());
        }
        if self.clock.now_unix() > approval.expires_at {
            self.expire_overdue().await?;
            return Err(ApprovalState::Expired.refusal());
        }
        Ok(approval)
    }

    /// Runs an approved request. Store-only operations (a key deletion among them) run in the
    /// same transaction as the state change, so they happen exactly once or not at all;
    /// recovery ceremonies run right after the state change, and a failure is recorded as
    /// `failed`.
    async fn execute(&self, approval: &Approval) -> Result<(), KmsError> {
        let now = self.clock.now_unix();
        let deletion_due = match &approval.proposal {
            Proposal::KeyDeletion {
                pending_window_days,
                ..
            } => Some(self.service.deletion_due_at(*pending_window_days)?),
            _ => None,
        };
        let result = match (&approval.proposal, deletion_due) {
            (Proposal::Grant { .. } | Proposal::BreakGlass { .. }, _) => Uuid::new_v4().to_string(),
            (_, Some(due)) => format!("deletion due at {due}"),
            _ => String::new(),
        };
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        // One privilege change at a time, so that every check below reads a state no other
        // execution is changing: a global advisory lock on PostgreSQL; on SQLite, a first
        // write takes the database's single write lock.
        match self.store.backend() {
            Backend::Postgres => {
                sqlx::query("SELECT pg_advisory_xact_lock(7243010)")
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
            }
            Backend::Sqlite => {
                sqlx::query("UPDATE approvals SET state = state WHERE approval_id = $1")
                    .bind(approval.approval_id.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
            }
        }
        // The quorum in force now, counted over approvers who hold its role now: an approver
        // unbound since voting no longer counts, and a raised quorum applies to pending
        // requests too.
        let quorum = quorum_in(&mut tx, approval.proposal.kind()).await?;
        let valid: i64 = sqlx::query(
            "SELECT COUNT(*) AS n FROM approval_votes v JOIN role_bindings b \
             ON b.principal = v.approver WHERE v.approval_id = $1 AND b.role = $2 \
             AND v.approver <> $3",
        )
        .bind(approval.approval_id.as_str())
        .bind(quorum.approver_role.as_str())
        .bind(approval.proposer.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?
        .try_get("n")
        .map_err(db_error)?;
        let required = i64::from(quorum.required.max(approval.required));
        if valid < required {
            return Ok(());
        }
        if let Err(refusal) = recheck_in(&mut tx, &approval.proposal).await {
            drop(tx);
            self.fail(&approval.approval_id, now, &refusal).await?;
            return Ok(());
        }
        let claimed = sqlx::query(
            "UPDATE approvals SET state = $1, decided_at = $2, result = $3 \
             WHERE approval_id = $4 AND state = $5",
        )
        .bind(ApprovalState::Executed.as_str())
        .bind(now)
        .bind(result.as_str())
        .bind(approval.approval_id.as_str())
        .bind(ApprovalState::Pending.as_str())
        .execute(&mut *tx)
        .await
        .map_err(db_error)?;
        if claimed.rows_affected() == 0 {
            // Another approver's call ran it.
            return Ok(());
        }
        let outcome = match &approval.proposal {
            Proposal::Grant {
                principal,
                key_id,
                operations,
                required_context_keys,
                context_equals,
                expires_at,
            } => sqlx::query(&format!(
                "INSERT INTO key_grants ({GRANT_COLUMNS}) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
            ))
            .bind(result.as_str())
            .bind(principal.as_str())
            .bind(key_id.to_string())
            .bind(operations.join(","))
            .bind(json(required_context_keys)?)
            .bind(json(context_equals)?)
            .bind(*expires_at)
            .bind(now)
            .bind(approval.approval_id.as_str())
            .bind(0_i64)
            .execute(&mut *tx)
            .await
            .map(|_| ()),
            Proposal::RoleBinding {
                principal,
                role,
                remove: false,
            } => sqlx::query(
                "INSERT INTO role_bindings (principal, role, created_at, approval_id) \
                     VALUES ($1, $2, $3, $4)",
            )
            .bind(principal.as_str())
            .bind(role.as_str())
            .bind(now)
            .bind(approval.approval_id.as_str())
            .execute(&mut *tx)
            .await
            .map(|_| ()),
            Proposal::RoleBinding {
                principal,
                role,
                remove: true,
            } => sqlx::query("DELETE FROM role_bindings WHERE principal = $1 AND role = $2")
                .bind(principal.as_str())
                .bind(role.as_str())
                .execute(&mut *tx)
                .await
                .map(|_| ()),
            Proposal::Quorum { quorum } => {
                sqlx::query("DELETE FROM approval_quorums WHERE kind = $1")
                    .bind(quorum.kind.as_str())
                    .execute(&mut *tx)
                    .await
                    .map_err(db_error)?;
                sqlx::query(
                    "INSERT INTO approval_quorums (kind, required, approver_role) \
                     VALUES ($1, $2, $3)",
                )
                .bind(quorum.kind.as_str())
                .bind(i64::from(quorum.required))
                .bind(quorum.approver_role.as_str())
                .execute(&mut *tx)
                .await
                .map(|_| ())
            }
            Proposal::BreakGlass {
                principal,
                key_ids,
                justification,
                duration_secs,
            } => insert_window(
                &mut tx,
                &Window {
                    window_id: result.clone(),
                    principal: principal.clone(),
                    key_ids: key_ids.clone(),
                    justification: justification.clone(),
                    opened_at: now,
                    closes_at: close_time(now, *duration_secs),
                    approval_id: approval.approval_id.clone(),
                },
            )
            .await
            .map(|_| ()),
            Proposal::DomainRotation {
                domain,
                version,
                sealed_key,
            } => sqlx::query(
                "INSERT INTO domain_key_versions (domain, version, sealed_key, created_at, \
                 approval_id) VALUES ($1, $2, $3, $4, $5)",
            )
            .bind(domain.as_str())
            .bind(i64::from(*version))
            .bind(sealed_key.as_str())
            .bind(now)
            .bind(approval.approval_id.as_str())
            .execute(&mut *tx)
            .await
            .map(|_| ()),
            Proposal::KeyDeletion { key_id, .. } => {
                // Its state was checked under the lock (`recheck_in`); no other change takes
                // a key out of enabled/disabled meanwhile.
                let due = deletion_due.unwrap_or_default();
                match crate::store::schedule_deletion_in(&mut tx, *key_id, due).await {
                    Ok(true) => Ok(()),
                    Ok(false) => Err(sqlx::Error::RowNotFound),
                    Err(e) => Err(e),
                }
            }
            Proposal::RecoveryInit { .. }
            | Proposal::RecoveryReshare { .. }
            | Proposal::RecoveryBackup {} => Ok(()),
        };
        outcome.map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        tracing::warn!(
            approval_id = %approval.approval_id,
            kind = approval.proposal.kind().as_str(),
            "approved request executed"
        );
        if let Proposal::KeyDeletion { key_id, .. } = &approval.proposal {
            tracing::warn!(%key_id, due_at = deletion_due, "key scheduled for deletion");
            // Other replicas hear of it by notification or their digest check (within the
            // cache bound); this one at once. If the store cannot be read now, the cache bound
            // still holds.
            if let Err(e) = self.service.reload(*key_id).await {
                tracing::warn!(%key_id, error = %e, "key cache not refreshed after scheduling its deletion");
            }
        }
        let deferred: Option<Result<String, KmsError>> = match &approval.proposal {
            Proposal::RecoveryInit { spec, .. } => {
                Some(self.recovery.init(spec, &approval.approval_id).await)
            }
            Proposal::RecoveryReshare { spec } => Some(
                self.recovery
                    .open_reshare(spec, &approval.approval_id)
                    .await,
            ),
            Proposal::RecoveryBackup {} => Some(self.recovery.backup(&approval.approval_id).await),
            _ => None,
        };
        // Operations outside the store run right after the state change; their outcome (or
        // failure) becomes the request's result.
        if let Some(done) = deferred {
            let (state, result) = match &done {
                Ok(result) => (ApprovalState::Executed, result.clone()),
                Err(e) => (ApprovalState::Failed, e.to_string()),
            };
            sqlx::query("UPDATE approvals SET state = $1, result = $2 WHERE approval_id = $3")
                .bind(state.as_str())
                .bind(result)
                .bind(approval.approval_id.as_str())
                .execute(self.store.pool())
                .await
                .map_err(db_error)?;
        }
        self.reload().await
    }

    /// Marks a request that can no longer run as it was approved (the state changed since it
    /// was proposed) as `failed`, with the reason.
    async fn fail(&self, approval_id: &str, now: i64, why: &KmsError) -> Result<(), KmsError> {
        tracing::warn!(approval_id, reason = %why, "approved request refused at execution");
        sqlx::query(
            "UPDATE approvals SET state = $1, decided_at = $2, result = $3 \
             WHERE approval_id = $4 AND state = $5",
        )
        .bind(ApprovalState::Failed.as_str())
        .bind(now)
        .bind(why.to_string())
        .bind(approval_id)
        .bind(ApprovalState::Pending.as_str())
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        Ok(())
    }

    /// Revokes a grant at once.
    pub async fn revoke_grant(&self, grant_id: &str) -> Result<Grant, KmsError> {
        let done = sqlx::query(
            "UPDATE key_grants SET revoked_at = $1 WHERE grant_id = $2 AND revoked_at = 0",
        )
        .bind(self.clock.now_unix())
        .bind(grant_id)
        .execute(self.store.pool())
        .await
        .map_err(db_error)?;
        let grant = self
            .grants(None, None)
            .await?
            .into_iter()
            .find(|g| g.grant_id == grant_id)
            .ok_or(KmsError::NotFound { what: "grant" })?;
        if done.rows_affected() == 0 {
            return Err(KmsError::Conflict {
                reason: "grant already revoked",
            });
        }
        self.reload().await?;
        tracing::warn!(grant_id, "grant revoked");
        Ok(grant)
    }

    /// Opens a break-glass window for `caller`: at once, or as an approval request, as the
    /// policy says.
    pub async fn open_break_glass(
        &self,
        caller: &Caller,
        key_ids: Vec<Uuid>,
        justification: String,
        duration_secs: u64,
    ) -> Result<BreakGlassOutcome, KmsError> {
        let duration_secs = match duration_secs {
            0 => self.params.break_glass_max_secs,
            d => d,
        };
        let proposal = Proposal::BreakGlass {
            principal: caller.principal.clone(),
            key_ids,
            justification,
            duration_secs,
        };
        self.validate(caller, &proposal).await?;
        // One window at a time: back-to-back windows would stretch the maximum length.
        let now = self.clock.now_unix();
        let open = self
            .cache
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .windows
            .get(&caller.principal)
            .is_some_and(|w| w.iter().any(|w| w.opened_at <= now && now <= w.closes_at));
        if open {
            return Err(KmsError::Conflict {
                reason: "a break-glass window is already open for this principal",
            });
        }
        if self.params.break_glass_requires_approval {
            return Ok(BreakGlassOutcome::Pending(
                self.propose(caller, proposal).await?,
            ));
        }
        let Proposal::BreakGlass {
            principal,
            key_ids,
            justification,
            duration_secs,
        } = proposal
        else {
            return Err(KmsError::Internal {
                what: "break-glass proposal",
            });
        };
        let now = self.clock.now_unix();
        let window = Window {
            window_id: Uuid::new_v4().to_string(),
            principal,
            key_ids,
            justification,
            opened_at: now,
            closes_at: close_time(now, duration_secs),
            approval_id: String::new(),
        };
        let mut tx = self.store.pool().begin().await.map_err(db_error)?;
        insert_window(&mut tx, &window).await.map_err(db_error)?;
        tx.commit().await.map_err(db_error)?;
        self.reload().await?;
        tracing::warn!(window_id = %window.window_id, "break-glass window opened");
        Ok(BreakGlassOutcome::Open(window))
    }

    async fn approval_from_row(&self, row: &AnyRow) -> Result<Approval, KmsError> {
        let approval_id: String = row.try_get("approval_id").map_err(db_error)?;
        let parameters_json: String = row.try_get("parameters").map_err(db_error)?;
        let required: i64 = row.try_get("required").map_err(db_error)?;
        let role: String = row.try_get("approver_role").map_err(db_error)?;
        let state: String = row.try_get("state").map_err(db_error)?;
        let approvers = sqlx::query(
            "SELECT approver FROM approval_votes WHERE approval_id = $1 ORDER BY created_at, approver",
        )
        .bind(approval_id.as_str())
        .fetch_all(self.store.pool())
        .await
        .map_err(db_error)?
        .iter()
        .map(|r| r.try_get::<String, _>("approver").map_err(db_error))
        .collect::<Result<Vec<_>, _>>()?;
        Ok(Approval {
            proposal: serde_json::from_str(&parameters_json).map_err(|_| corrupt())?,
            parameters_json,
            approval_id,
            proposer: row.try_get("proposer").map_err(db_error)?,
            required: u32::try_from(required).map_err(|_| corrupt())?,
            approver_role: Role::parse(&role).map_err(|_| corrupt())?,
            approvers,
            state: ApprovalState::parse(&state)?,
            created_at: row.try_get("created_at").map_err(db_error)?,
            expires_at: row.try_get("expires_at").map_err(db_error)?,
            decided_at: row.try_get("decided_at").map_err(db_error)?,
            result: row.try_get("result").map_err(db_error)?,
        })
    }
}

/// A connection, or a transaction (which dereferences to one).
type Conn = sqlx::AnyConnection;

/// The quorum of `kind`, read on `tx`.
async fn quorum_in(tx: &mut Conn, kind: Kind) -> Result<Quorum, KmsError> {
    Ok(quorums_in(tx)
        .await?
        .into_iter()
        .find(|q| q.kind == kind)
        .unwrap_or_else(|| default_quorum(kind)))
}

/// Every kind's quorum (stored, or the default), read on `tx`.
async fn quorums_in(tx: &mut Conn) -> Result<Vec<Quorum>, KmsError> {
    let rows = sqlx::query("SELECT kind, required, approver_role FROM approval_quorums")
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?;
    let mut quorums: Vec<Quorum> = Kind::ALL.into_iter().map(default_quorum).collect();
    for row in rows {
        let kind: String = row.try_get("kind").map_err(db_error)?;
        let required: i64 = row.try_get("required").map_err(db_error)?;
        let role: String = row.try_get("approver_role").map_err(db_error)?;
        let kind = Kind::parse(&kind).map_err(|_| corrupt())?;
        if let Some(q) = quorums.iter_mut().find(|q| q.kind == kind) {
            q.required = u32::try_from(required).map_err(|_| corrupt())?;
            q.approver_role = Role::parse(&role).map_err(|_| corrupt())?;
        }
    }
    Ok(quorums)
}

/// The roles `principal` holds, read on `tx`.
async fn roles_in(tx: &mut Conn, principal: &str) -> Result<Vec<Role>, KmsError> {
    sqlx::query("SELECT role FROM role_bindings WHERE principal = $1")
        .bind(principal)
        .fetch_all(&mut *tx)
        .await
        .map_err(db_error)?
        .iter()
        .map(|row| {
            let role: String = row.try_get("role").map_err(db_error)?;
            Role::parse(&role).map_err(|_| corrupt())
        })
        .collect()
}

/// How many principals hold `role`, read on `tx`.
async fn holders_in(tx: &mut Conn, role: Role) -> Result<u32, KmsError> {
    let n: i64 = sqlx::query("SELECT COUNT(*) AS n FROM role_bindings WHERE role = $1")
        .bind(role.as_str())
        .fetch_one(&mut *tx)
        .await
        .map_err(db_error)?
        .try_get("n")
        .map_err(db_error)?;
    Ok(u32::try_from(n).unwrap_or(u32::MAX))
}

/// The invariants a privilege change must keep, checked against the store inside the
/// executing transaction (the checks at proposal time may be stale by now: other requests
/// may have run in between, possibly through another server).
async fn recheck_in(tx: &mut Conn, proposal: &Proposal) -> Result<(), KmsError> {
    match proposal {
        Proposal::RoleBinding {
            principal,
            role,
            remove: false,
        } => {
            let mut roles = roles_in(tx, principal).await?;
            if roles.contains(role) {
                return Err(KmsError::Conflict {
                    reason: "role binding already exists",
                });
            }
            roles.push(*role);
            check_compatible(&roles)
        }
        Proposal::RoleBinding {
            principal,
            role,
            remove: true,
        } => {
            if !roles_in(tx, principal).await?.contains(role) {
                return Err(KmsError::NotFound {
                    what: "role binding",
                });
            }
            let remaining = holders_in(tx, *role).await?.saturating_sub(1);
            if *role == SecurityOfficer && remaining < 2 {
                return Err(KmsError::Conflict {
                    reason: "at least two security officers must remain",
                });
            }
            let needed = quorums_in(tx)
                .await?
                .iter()
                .filter(|q| q.approver_role == *role)
                .map(|q| q.required)
                .max()
                .unwrap_or(0);
            if remaining < needed {
                return Err(KmsError::Conflict {
                    reason: "removing this binding would leave a quorum unreachable",
                });
            }
            Ok(())
        }
        Proposal::Quorum { quorum } => {
            if holders_in(tx, quorum.approver_role).await? < quorum.required {
                return Err(KmsError::Conflict {
                    reason: "fewer principals hold the approver role than the quorum needs",
                });
            }
            Ok(())
        }
        Proposal::Grant {
            principal,
            operations,
            ..
        } => {
            let roles = roles_in(tx, principal).await?;
            if !roles.iter().any(|r| *r != BreakGlass && r.uses_keys()) {
                return Err(KmsError::Conflict {
                    reason: "grantee holds no app, tokenizer or reidentifier role",
                });
            }
            // Separation of duties within key use: envelope operations for apps,
            // tokenization for tokenizers, re-identification for re-identifiers only.
            for op in parse_operations(operations)? {
                if !roles.iter().any(|r| r.may_hold(op)) {
                    return Err(KmsError::Conflict {
                        reason: "an operation of the grant does not belong to the grantee's \
                                 roles (apps: envelope operations; tokenizers: tokenize, \
                                 domain-key; reidentifiers: reidentify)",
                    });
                }
            }
            Ok(())
        }
        Proposal::DomainRotation {
            domain, version, ..
        } => {
            let newest = crate::domains::newest_version(tx, domain).await?;
            if newest == 0 {
                return Err(KmsError::NotFound { what: "domain" });
            }
            if newest.checked_add(1) != Some(*version) {
                return Err(KmsError::Conflict {
                    reason: "the domain gained another key version since this was proposed",
                });
            }
            Ok(())
        }
        Proposal::KeyDeletion { key_id, .. } => {
            let state: Option<String> = sqlx::query("SELECT state FROM kms_keys WHERE key_id = $1")
                .bind(key_id.to_string())
                .fetch_optional(&mut *tx)
                .await
                .map_err(db_error)?
                .map(|row| row.try_get("state"))
                .transpose()
                .map_err(db_error)?;
            match state.as_deref() {
                Some("enabled" | "disabled") => Ok(()),
                Some("pending_deletion") => Err(KmsError::KeyNotUsable {
                    state: "pending deletion",
                }),
                Some(_) => Err(KmsError::KeyDestroyed),
                None => Err(KmsError::KeyNotFound),
            }
        }
        Proposal::BreakGlass { .. }
        | Proposal::RecoveryInit { .. }
        | Proposal::RecoveryReshare { .. }
        | Proposal::RecoveryBackup {} => Ok(()),
    }
}

const GRANT_COLUMNS: &str = "grant_id, principal, key_id, operations, required_context_keys, \
     context_equals, expires_at, created_at, approval_id, revoked_at";
const APPROVAL_COLUMNS: &str = "approval_id, kind, proposer, parameters, required, \
     approver_role, state, created_at, expires_at, decided_at, result";

fn grant_from_row(row: &AnyRow) -> Result<Grant, KmsError> {
    let key_id: String = row.try_get("key_id").map_err(db_error)?;
    let operations: String = row.try_get("operations").map_err(db_error)?;
    let keys: String = row.try_get("required_context_keys").map_err(db_error)?;
    let equals: String = row.try_get("context_equals").map_err(db_error)?;
    Ok(Grant {
        grant_id: row.try_get("grant_id").map_err(db_error)?,
        principal: row.try_get("principal").map_err(db_error)?,
        key_id: Uuid::parse_str(&key_id).map_err(|_| corrupt())?,
        operations: parse_operations(
            &operations
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect::<Vec<_>>(),
        )
        .map_err(|_| corrupt())?,
        required_context_keys: serde_json::from_str(&keys).map_err(|_| corrupt())?,
        context_equals: serde_json::from_str(&equals).map_err(|_| corrupt())?,
        expires_at: row.try_get("expires_at").map_err(db_error)?,
        created_at: row.try_get("created_at").map_err(db_error)?,
        approval_id: row.try_get("approval_id").map_err(db_error)?,
        revoked_at: row.try_get("revoked_at").map_err(db_error)?,
    })
}

/// Grantable operations by name; at least one, no repeats.
pub fn parse_operations(names: &[String]) -> Result<Vec<KeyOp>, KmsError> {
    const GRANTABLE: [KeyOp; 7] = [
        KeyOp::GenerateDataKey,
        KeyOp::Encrypt,
        KeyOp::Decrypt,
        KeyOp::ReEncrypt,
        KeyOp::Tokenize,
        KeyOp::DomainKey,
        KeyOp::Reidentify,
    ];
    let invalid = |reason| KmsError::InvalidArgument {
        field: "operations",
        reason,
    };
    if names.is_empty() {
        return Err(invalid("at least one operation"));
    }
    let mut ops = Vec::new();
    for name in names {
        let op = GRANTABLE
            .into_iter()
            .find(|op| op.as_str() == name)
            .ok_or(invalid(
                "one of generate-data-key, encrypt, decrypt, re-encrypt, tokenize, domain-key, \
                 reidentify",
            ))?;
        if ops.contains(&op) {
            return Err(invalid("listed twice"));
        }
        ops.push(op);
    }
    Ok(ops)
}

/// Characters that change how text looks without being seen: bidirectional overrides and
/// isolates, zero-width characters, the byte-order mark. Refused in principals and
/// justifications, where they could make an approver or auditor read something else.
pub fn deceptive(c: char) -> bool {
    matches!(c,
        '\u{00AD}' | '\u{061C}' | '\u{180E}' | '\u{200B}'..='\u{200F}' | '\u{202A}'..='\u{202E}'
            | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{2069}' | '\u{FEFF}')
}

fn validate_principal(principal: &str) -> Result<(), KmsError> {
    if principal.is_empty()
        || principal.len() > MAX_PRINCIPAL
        || principal
            .chars()
            .any(|c| c.is_control() || c.is_whitespace() || deceptive(c))
    {
        return Err(KmsError::InvalidArgument {
            field: "principal",
            reason: "1-256 printable characters without spaces",
        });
    }
    Ok(())
}

async fn insert_window(
    tx: &mut sqlx::Transaction<'_, sqlx::Any>,
    window: &Window,
) -> Result<(), sqlx::Error> {
    let key_ids =
        serde_json::to_string(&window.key_ids).map_err(|e| sqlx::Error::Encode(Box::new(e)))?;
    sqlx::query(
        "INSERT INTO break_glass_windows (window_id, principal, key_ids, justification, \
         opened_at, closes_at, approval_id) VALUES ($1, $2, $3, $4, $5, $6, $7)",
    )
    .bind(window.window_id.as_str())
    .bind(window.principal.as_str())
    .bind(key_ids)
    .bind(window.justification.as_str())
    .bind(window.opened_at)
    .bind(window.closes_at)
    .bind(window.approval_id.as_str())
    .execute(&mut **tx)
    .await?;
    Ok(())
}

/// The last second of a window that opens at `now` for `duration_secs`.
fn close_time(now: i64, duration_secs: u64) -> i64 {
    now.saturating_add(i64::try_from(duration_secs).unwrap_or(i64::MAX))
}

fn json<T: Serialize>(value: &T) -> Result<String, KmsError> {
    serde_json::to_string(value).map_err(|_| KmsError::Internal {
        what: "json encoding",
    })
}

fn corrupt() -> KmsError {
    KmsError::Internal {
        what: "unreadable authorization row in store",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grant(ops: &[KeyOp]) -> Grant {
        Grant {
            grant_id: "g".into(),
            principal: "p".into(),
            key_id: Uuid::nil(),
            operations: ops.to_vec(),
            required_context_keys: vec!["purpose".into()],
            context_equals: [("dept".to_string(), "cardiology".to_string())].into(),
            expires_at: 100,
            created_at: 0,
            approval_id: "a".into(),
            revoked_at: 0,
        }
    }

    /// Regression: a reload that started before a revocation but finished after the reload
    /// that saw it put the revoked grant back into the cache.
    #[test]
    fn an_older_reload_never_replaces_a_newer_view() {
        use std::sync::atomic::AtomicU64;
        let view = |who: &str| Cache {
            roles: HashMap::from([(who.to_string(), Arc::new(vec![Role::App]))]),
            ..Cache::default()
        };
        let slot = RwLock::new(Cache::default());
        let stamp = AtomicU64::new(0);
        assert!(install_latest(&slot, &stamp, 20, view("newer")));
        assert!(!install_latest(&slot, &stamp, 10, view("older")));
        assert!(slot.read().unwrap().roles.contains_key("newer"));
        assert!(install_latest(&slot, &stamp, 30, view("newest")));
        assert!(slot.read().unwrap().roles.contains_key("newest"));
        assert_eq!(stamp.load(std::sync::atomic::Ordering::SeqCst), 30);
    }

    fn ctx(pairs: &[(&str, &str)]) -> Context {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn grant_context_constraints_pass_only_the_allowed_context() {
        let g = grant(&[KeyOp::Decrypt]);
        let good = ctx(&[("purpose", "treatment"), ("dept", "cardiology")]);
        assert!(g.covers(KeyOp::Decrypt, Uuid::nil(), &good, 50).is_ok());
        for bad in [
            ctx(&[("dept", "cardiology")]),
            ctx(&[("purpose", "x"), ("dept", "oncology")]),
            ctx(&[("purpose", "x")]),
            Context::new(),
        ] {
            assert!(matches!(
                g.covers(KeyOp::Decrypt, Uuid::nil(), &bad, 50),
                Err(Refusal::Context)
            ));
        }
        assert!(matches!(
            g.covers(KeyOp::Encrypt, Uuid::nil(), &good, 50),
            Err(Refusal::NoGrant)
        ));
        assert!(matches!(
            g.covers(KeyOp::Decrypt, Uuid::max(), &good, 50),
            Err(Refusal::NoGrant)
        ));
        assert!(g.covers(KeyOp::Decrypt, Uuid::nil(), &good, 100).is_ok());
        assert!(matches!(
            g.covers(KeyOp::Decrypt, Uuid::nil(), &good, 101),
            Err(Refusal::Expired)
        ));
    }

    #[test]
    fn separation_of_duties_pairs() {
        for admin in [SecurityOfficer, Custodian, Auditor] {
            for user in [App, Tokenizer, Reidentifier, BreakGlass] {
                assert!(
                    check_compatible(&[admin, user]).is_err(),
                    "{admin:?}+{user:?}"
                );
            }
        }
        assert!(check_compatible(&[Auditor, SecurityOfficer]).is_err());
        assert!(check_compatible(&[SecurityOfficer, Custodian]).is_ok());
        assert!(check_compatible(&[Tokenizer, Reidentifier]).is_ok());
    }

    #[test]
    fn unlisted_rpc_is_denied_to_every_role() {
        assert!(!allowed("NoSuchRpc", &Role::ALL));
        assert!(!allowed("CreateKey", &[]));
    }
}
