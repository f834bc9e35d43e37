//! Rendering identity templates for a pod, and label-selector matching. Pure.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

/// The facts a template may use.
#[derive(Debug, Clone, Default)]
pub struct PodFacts<'a> {
    /// Trust domain name.
    pub trust_domain: &'a str,
    /// Namespace.
    pub namespace: &'a str,
    /// Service account.
    pub service_account: &'a str,
    /// Pod name.
    pub pod_name: &'a str,
    /// Pod UID.
    pub pod_uid: &'a str,
    /// Node name.
    pub node_name: &'a str,
    /// Pod labels.
    pub pod_labels: Option<&'a BTreeMap<String, String>>,
    /// Namespace labels.
    pub namespace_labels: Option<&'a BTreeMap<String, String>>,
}

/// Replaces `{placeholder}`s; an unknown placeholder or a missing label is an error.
pub fn render(template: &str, f: &PodFacts<'_>) -> Result<String, String> {
    let mut out = String::with_capacity(template.len() + 32);
    let mut rest = template;
    while let Some(i) = rest.find('{') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let j = after
            .find('}')
            .ok_or_else(|| format!("unclosed placeholder in {template:?}"))?;
        let name = &after[..j];
        let label = |m: Option<&BTreeMap<String, String>>, k: &str, what: &str| {
            m.and_then(|m| m.get(k))
                .cloned()
                .ok_or_else(|| format!("{what} label {k:?} is not set"))
        };
        let v = match name {
            "trust_domain" => f.trust_domain.to_owned(),
            "namespace" => f.namespace.to_owned(),
            "service_account" => f.service_account.to_owned(),
            "pod_name" => f.pod_name.to_owned(),
            "pod_uid" => f.pod_uid.to_owned(),
            "node_name" => f.node_name.to_owned(),
            n if n.starts_with("pod_label:") => label(f.pod_labels, &n[10..], "pod")?,
            n if n.starts_with("namespace_label:") => {
                label(f.namespace_labels, &n[16..], "namespace")?
            }
            other => return Err(format!("unknown placeholder {{{other}}}")),
        };
        out.push_str(&v);
        rest = &after[j + 1..];
    }
    out.push_str(rest);
    Ok(out)
}

/// True if `labels` satisfy `selector` (matchLabels and matchExpressions with In, NotIn,
/// Exists, DoesNotExist). An unknown operator matches nothing.
pub fn selects(
    selector: Option<&LabelSelector>,
    labels: Option<&BTreeMap<String, String>>,
) -> bool {
    let Some(sel) = selector else { return true };
    let empty = BTreeMap::new();
    let labels = labels.unwrap_or(&empty);
    if let Some(ml) = &sel.match_labels
        && !ml.iter().all(|(k, v)| labels.get(k) == Some(v))
    {
        return false;
    }
    sel.match_expressions.iter().flatten().all(|e| {
        let have = labels.get(&e.key);
        let values = e.values.as_deref().unwrap_or_default();
        match e.operator.as_str() {
            "In" => have.is_some_and(|v| values.contains(v)),
            "NotIn" => !have.is_some_and(|v| values.contains(v)),
            "Exists" => have.is_some(),
            "DoesNotExist" => have.is_none(),
            _ => false,
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    #[test]
    fn rendering() {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), "web".to_owned());
        let f = PodFacts {
            trust_domain: "td",
            namespace: "shop",
            service_account: "web",
            pod_name: "web-1",
            pod_uid: "u",
            node_name: "n1",
            pod_labels: Some(&labels),
            namespace_labels: None,
        };
        assert_eq!(
            render(
                "spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}",
                &f
            )
            .unwrap(),
            "spiffe://td/ns/shop/sa/web"
        );
        assert_eq!(
            render(
                "spiffe://{trust_domain}/app/{pod_label:app}/{node_name}",
                &f
            )
            .unwrap(),
            "spiffe://td/app/web/n1"
        );
        assert!(
            render("spiffe://{trust_domain}/{pod_label:tier}", &f)
                .unwrap_err()
                .contains("tier")
        );
        assert!(
            render("spiffe://{trust_domain}/{bogus}", &f)
                .unwrap_err()
                .contains("bogus")
        );
        assert!(
            render("spiffe://{trust_domain", &f)
                .unwrap_err()
                .contains("unclosed")
        );
        assert!(render("spiffe://{trust_domain}/{namespace_label:team}", &f).is_err());
    }

    #[test]
    fn selectors() {
        let mut labels = BTreeMap::new();
        labels.insert("app".to_owned(), "web".to_owned());
        labels.insert("tier".to_owned(), "front".to_owned());
        let ml = |k: &str, v: &str| LabelSelector {
            match_labels: Some([(k.to_owned(), v.to_owned())].into()),
            match_expressions: None,
        };
        let expr = |k: &str, op: &str, vals: &[&str]| LabelSelector {
            match_labels: None,
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: k.into(),
                operator: op.into(),
                values: Some(vals.iter().map(|s| s.to_string()).collect()),
            }]),
        };
        assert!(selects(None, Some(&labels)));
        assert!(selects(Some(&ml("app", "web")), Some(&labels)));
        assert!(!selects(Some(&ml("app", "db")), Some(&labels)));
        assert!(selects(
            Some(&expr("tier", "In", &["front", "mid"])),
            Some(&labels)
        ));
        assert!(!selects(
            Some(&expr("tier", "NotIn", &["front"])),
            Some(&labels)
        ));
        assert!(selects(Some(&expr("app", "Exists", &[])), Some(&labels)));
        assert!(!selects(
            Some(&expr("app", "DoesNotExist", &[])),
            Some(&labels)
        ));
        assert!(!selects(
            Some(&expr("app", "Sometimes", &[])),
            Some(&labels)
        ));
        assert!(!selects(Some(&ml("app", "web")), None));
    }
}
