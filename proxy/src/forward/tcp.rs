//! The TCP forward stage: one plan per connection; allowed connections are spliced to the
//! local application (deliver) or to a peer proxy over a fresh mTLS connection (mesh). A
//! refused connection is closed — that is the TCP denial.

use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncWrite};

use crate::observe::{Outcome, Record};
use crate::pipeline::{ConnInfo, ListenerCtx};
use crate::plan::{Knows, Plan, plan};
use crate::refusal::Refusal;

/// Forwards one TCP connection.
pub async fn serve<IO>(l: Arc<ListenerCtx>, mut io: IO, conn: ConnInfo)
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let shared = &l.shared;
    let own = shared.own_id();
    let src = if l.role.is_inbound() {
        conn.peer.as_ref()
    } else {
        own.as_ref()
    };
    let mut rec = Record::start(&l.name, "tcp", src, conn.orig_dst);
    if rec.admit(&shared.obs).await.is_err() {
        // Closed unrecorded: the access log cannot take its record (`on_full: refuse`).
        return;
    }
    let arrived = l.arrived(&conn, None);
    let destination = l.destination(&conn).await;
    let egress_set = shared.egress.as_ref().map(|e| e.set());
    let knows = Knows {
        own_id: own.as_ref(),
        authz: &shared.authz,
        destination: destination.as_ref(),
        egress: egress_set.as_deref(),
        gateway: None,
    };
    match plan(&arrived, &knows) {
        Err(r) => {
            rec.host = conn.hello.clone().flatten();
            crate::forward::external::log_refusal(&l, &rec, &conn, &r);
            rec.decided(&shared.obs, r.outcome, "refuse");
            rec.finish(&shared.obs, 0, r.refusal.log_reason(), 0, 0);
        }
        Ok(Plan::External(e)) => {
            crate::forward::external::tcp(&l, &conn, rec, &mut io, e).await;
        }
        // The gateway's plans are made for HTTP requests only (its listeners speak HTTP).
        Ok(p @ (Plan::Routed { .. } | Plan::Redirect { .. } | Plan::AcmeChallenge { .. })) => {
            let why = format!("a {} plan needs an HTTP request", p.label());
            rec.decided(
                &shared.obs,
                crate::observe::Outcome::plain("error", "gateway"),
                "refuse",
            );
            rec.finish(&shared.obs, 0, why, 0, 0);
        }
        Ok(Plan::Deliver {
            app,
            outcome,
            reason,
            ..
        }) => {
            rec.dst = own.as_ref().map(ToString::to_string);
            rec.decided(&shared.obs, outcome, "deliver");
            let mut up = match crate::forward::pools::dial(app).await {
                Ok(a) => a,
                Err(e) => {
                    let r = Refusal::AppUnreachable(e.to_string());
                    rec.finish(&shared.obs, 0, r.log_reason(), 0, 0);
                    return;
                }
            };
            let (i, o) = super::idle::splice(&mut io, &mut up, l.shared.idle_timeout)
                .await
                .unwrap_or((0, 0));
            rec.finish(&shared.obs, 0, reason, i, o);
        }
        Ok(Plan::Mesh {
            upstream, expected, ..
        }) => {
            let up = shared.upstreams.get(
                upstream,
                expected,
                &shared.sink,
                &l.name,
                &shared.obs.metrics,
            );
            let mut tls = match up.connect_tcp(&l.name, &shared.obs.metrics).await {
                Ok(s) => s,
                Err(e) => {
                    rec.decided(&shared.obs, Outcome::plain("error", "outbound"), "mesh");
                    let r = Refusal::Unavailable(format!("upstream {upstream} unavailable: {e}"));
                    rec.finish(&shared.obs, 0, r.log_reason(), 0, 0);
                    return;
                }
            };
            rec.decided(&shared.obs, Outcome::plain("allow", "outbound"), "mesh");
            rec.dst = crate::tls::upstream_id(&tls).map(|i| i.to_string());
            let (i, o) = super::idle::splice(&mut io, &mut tls, l.shared.idle_timeout)
                .await
                .unwrap_or((0, 0));
            rec.finish(&shared.obs, 0, "forwarded".into(), i, o);
        }
        Ok(Plan::Balanced { destination, .. }) => {
            crate::forward::balanced::tcp(&l, rec, &mut io, &destination).await;
        }
        Ok(Plan::Passthrough { to }) => {
            rec.decided(
                &shared.obs,
                Outcome::plain("allow", "passthrough"),
                "passthrough",
            );
            let mut up = match crate::forward::pools::dial(to).await {
                Ok(u) => u,
                Err(e) => {
                    let r = Refusal::Unavailable(format!("{to} unreachable: {e}"));
                    rec.finish(&shared.obs, 0, r.log_reason(), 0, 0);
                    return;
                }
            };
            let (i, o) = super::idle::splice(&mut io, &mut up, l.shared.idle_timeout)
                .await
                .unwrap_or((0, 0));
            rec.finish(
                &shared.obs,
                0,
                "outside the mesh: passed through".into(),
                i,
                o,
            );
        }
    }
}
