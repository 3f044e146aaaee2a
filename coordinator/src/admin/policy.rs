//! Who may do what over the admin channel, from the role in the requester's certificate
//! (never from a field of the request). Pure.
//!
//! | request | operator | auditor | site |
//! |---|---|---|---|
//! | create, change, stop a study | yes | no | no |
//! | list studies, show a ledger, metrics | yes | yes | no |
//! | read the audit log | no | yes | no |
//!
//! Operators do not read the audit log: it is the record auditors hold operators to, and an
//! operator has no need of it to run studies (least privilege). Sites use their own
//! protocol and see only the studies they are enrolled in.

use fedpriv_common::admin::AdminRequest;
use fedpriv_common::pki::Role;

/// A request the requester's role may not make.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub action: &'static str,
    pub reason: String,
}

/// Who may do what; see the module's table.
pub fn authorize(role: Role, request: &AdminRequest) -> Result<(), Refusal> {
    use AdminRequest as R;
    let allowed = match role {
        Role::Operator => matches!(
            request,
            R::CreateStudy { .. }
                | R::ChangeStudy { .. }
                | R::StopStudy { .. }
                | R::ListStudies
                | R::ShowLedger { .. }
                | R::Metrics
                | R::ExportModel { .. }
        ),
        Role::Auditor => matches!(
            request,
            R::ListStudies | R::ShowLedger { .. } | R::FetchAudit { .. } | R::Metrics
        ),
        Role::Site => false,
    };
    if allowed {
        return Ok(());
    }
    let why = match role {
        Role::Operator => "operators manage studies; the audit log is for auditors",
        Role::Auditor => {
            "auditors may list studies and read ledgers, the audit log and metrics, nothing else"
        }
        Role::Site => "sites have no admin rights; a site uses the site protocol",
    };
    Err(Refusal {
        action: request.action(),
        reason: format!("role {role} may not {}: {why}", request.action()),
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn every_request() -> Vec<AdminRequest> {
        vec![
            AdminRequest::CreateStudy {
                config_toml: String::new(),
            },
            AdminRequest::ChangeStudy {
                study: "s".into(),
                changes: vec![("rounds".into(), "3".into())],
            },
            AdminRequest::StopStudy {
                study: "s".into(),
                reason: "r".into(),
            },
            AdminRequest::ListStudies,
            AdminRequest::ShowLedger { study: "s".into() },
            AdminRequest::FetchAudit {
                from_seq: 1,
                max: 10,
            },
            AdminRequest::Metrics,
            AdminRequest::ExportModel {
                study: "s".into(),
                round: None,
            },
        ]
    }

    #[test]
    fn the_whole_role_matrix() {
        // (action, operator, auditor, site)
        let expected = [
            ("create_study", true, false, false),
            ("change_study", true, false, false),
            ("stop_study", true, false, false),
            ("list_studies", true, true, false),
            ("show_ledger", true, true, false),
            ("fetch_audit", false, true, false),
            ("metrics", true, true, false),
            ("export_model", true, false, false),
        ];
        let requests = every_request();
        assert_eq!(
            requests.len(),
            expected.len(),
            "every request kind is in the matrix"
        );
        for (req, (action, op, aud, site)) in requests.iter().zip(expected) {
            assert_eq!(req.action(), action);
            for (role, allowed) in [
                (Role::Operator, op),
                (Role::Auditor, aud),
                (Role::Site, site),
            ] {
                match authorize(role, req) {
                    Ok(()) => assert!(allowed, "{role} may not {action}"),
                    Err(r) => {
                        assert!(!allowed, "{role} must be allowed to {action}");
                        assert_eq!(r.action, action);
                        assert!(r.reason.contains(role.as_str()), "{}", r.reason);
                    }
                }
            }
            // Writes are what only operators may do, and an export (an operator's read of a
            // model, recorded, changing no state).
            assert_eq!(
                req.is_write(),
                op && !aud && action != "export_model",
                "{action}"
            );
        }
    }
}
