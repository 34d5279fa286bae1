//! Label selectors (`metav1.LabelSelector`): matchLabels and matchExpressions, validated once at the
//! edge so that matching is infallible and cheap.

use std::collections::BTreeMap;
use std::fmt;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

pub type Labels = BTreeMap<String, String>;

/// One requirement of a selector. matchLabels entries become `In` with one value.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Requirement {
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    DoesNotExist(String),
}

/// A validated selector: all requirements must hold. No requirements selects everything.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Selector {
    requirements: Vec<Requirement>,
}

#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error("matchExpressions[{index}].operator: unknown operator {operator:?} (expected In, NotIn, Exists or DoesNotExist)")]
    UnknownOperator { index: usize, operator: String },
    #[error("matchExpressions[{index}].values: operator {operator} needs at least one value")]
    MissingValues { index: usize, operator: String },
    #[error("matchExpressions[{index}].values: operator {operator} takes no values")]
    UnexpectedValues { index: usize, operator: String },
    #[error("matchExpressions[{index}].key: must not be empty")]
    EmptyKey { index: usize },
}

impl Selector {
    /// The selector that matches everything (`{}`).
    pub fn everything() -> Self {
        Self::default()
    }

    pub fn from_labels(labels: &Labels) -> Self {
        let mut requirements: Vec<Requirement> = labels
            .iter()
            .map(|(k, v)| Requirement::In(k.clone(), vec![v.clone()]))
            .collect();
        requirements.sort();
        Self { requirements }
    }

    pub fn parse(selector: &LabelSelector) -> Result<Self, SelectorError> {
        let mut requirements = Vec::new();
        for (k, v) in selector.match_labels.iter().flatten() {
            requirements.push(Requirement::In(k.clone(), vec![v.clone()]));
        }
        for (index, expr) in selector.match_expressions.iter().flatten().enumerate() {
            if expr.key.is_empty() {
                return Err(SelectorError::EmptyKey { index });
            }
            let mut values = expr.values.clone().unwrap_or_default();
            values.sort();
            values.dedup();
            let key = expr.key.clone();
            let op = expr.operator.as_str();
            let requirement = match op {
                "In" | "NotIn" if values.is_empty() => {
                    return Err(SelectorError::MissingValues {
                        index,
                        operator: op.to_string(),
                    })
                }
                "Exists" | "DoesNotExist" if !values.is_empty() => {
                    return Err(SelectorError::UnexpectedValues {
                        index,
                        operator: op.to_string(),
                    })
                }
                "In" => Requirement::In(key, values),
                "NotIn" => Requirement::NotIn(key, values),
                "Exists" => Requirement::Exists(key),
                "DoesNotExist" => Requirement::DoesNotExist(key),
                _ => {
                    return Err(SelectorError::UnknownOperator {
                        index,
                        operator: op.to_string(),
                    })
                }
            };
            requirements.push(requirement);
        }
        // Canonical order, so equal selectors compare (and hash into set names) equal.
        requirements.sort();
        requirements.dedup();
        Ok(Self { requirements })
    }

    /// Its requirements, in canonical order (all must hold).
    pub fn requirements(&self) -> &[Requirement] {
        &self.requirements
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.requirements.iter().all(|r| match r {
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::DoesNotExist(k) => !labels.contains_key(k),
        })
    }
}

impl fmt::Display for Selector {
    /// kubectl's selector syntax: `pod=a,ns notin (x),!gone`; `{}` for everything.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.requirements.is_empty() {
            return f.write_str("{}");
        }
        let parts: Vec<String> = self
            .requirements
            .iter()
            .map(|r| match r {
                Requirement::In(k, vs) if vs.len() == 1 => format!("{k}={}", vs[0]),
                Requirement::In(k, vs) => format!("{k} in ({})", vs.join(",")),
                Requirement::NotIn(k, vs) => format!("{k} notin ({})", vs.join(",")),
                Requirement::Exists(k) => k.clone(),
                Requirement::DoesNotExist(k) => format!("!{k}"),
            })
            .collect();
        f.write_str(&parts.join(","))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn expr(key: &str, op: &str, values: &[&str]) -> LabelSelectorRequirement {
        LabelSelectorRequirement {
            key: key.into(),
            operator: op.into(),
            values: if values.is_empty() {
                None
            } else {
                Some(values.iter().map(|v| v.to_string()).collect())
            },
        }
    }

    fn sel(exprs: Vec<LabelSelectorRequirement>) -> Selector {
        Selector::parse(&LabelSelector {
            match_expressions: Some(exprs),
            match_labels: None,
        })
        .unwrap()
    }

    #[test]
    fn empty_selector_matches_everything() {
        let s = Selector::parse(&LabelSelector::default()).unwrap();
        assert!(s.matches(&labels(&[])));
        assert!(s.matches(&labels(&[("a", "b")])));
        assert_eq!(s.to_string(), "{}");
    }

    #[test]
    fn match_labels_require_every_pair() {
        let s = Selector::from_labels(&labels(&[("pod", "b"), ("tier", "web")]));
        assert!(s.matches(&labels(&[("pod", "b"), ("tier", "web"), ("x", "y")])));
        assert!(!s.matches(&labels(&[("pod", "b")])));
        assert!(!s.matches(&labels(&[("pod", "c"), ("tier", "web")])));
    }

    #[test]
    fn every_operator_matches_as_the_api_defines() {
        let in_ = sel(vec![expr("pod", "In", &["b", "c"])]);
        assert!(in_.matches(&labels(&[("pod", "c")])));
        assert!(!in_.matches(&labels(&[("pod", "a")])));
        assert!(!in_.matches(&labels(&[])));

        let not_in = sel(vec![expr("ns", "NotIn", &["x"])]);
        assert!(not_in.matches(&labels(&[("ns", "y")])));
        assert!(not_in.matches(&labels(&[])), "NotIn matches a missing key");
        assert!(!not_in.matches(&labels(&[("ns", "x")])));

        let exists = sel(vec![expr("team", "Exists", &[])]);
        assert!(exists.matches(&labels(&[("team", "")])));
        assert!(!exists.matches(&labels(&[])));

        let absent = sel(vec![expr("team", "DoesNotExist", &[])]);
        assert!(absent.matches(&labels(&[])));
        assert!(!absent.matches(&labels(&[("team", "a")])));
    }

    #[test]
    fn labels_and_expressions_are_anded() {
        let s = Selector::parse(&LabelSelector {
            match_labels: Some(labels(&[("app", "web")])),
            match_expressions: Some(vec![expr("env", "NotIn", &["prod"])]),
        })
        .unwrap();
        assert!(s.matches(&labels(&[("app", "web"), ("env", "dev")])));
        assert!(!s.matches(&labels(&[("app", "web"), ("env", "prod")])));
        assert!(!s.matches(&labels(&[("env", "dev")])));
    }

    #[test]
    fn invalid_expressions_are_rejected_with_the_field() {
        let bad = Selector::parse(&LabelSelector {
            match_expressions: Some(vec![expr("a", "Exists", &[]), expr("b", "Like", &["x"])]),
            match_labels: None,
        })
        .unwrap_err();
        assert_eq!(
            bad.to_string(),
            "matchExpressions[1].operator: unknown operator \"Like\" (expected In, NotIn, Exists or DoesNotExist)"
        );
        assert!(matches!(
            Selector::parse(&LabelSelector {
                match_expressions: Some(vec![expr("a", "In", &[])]),
                match_labels: None
            }),
            Err(SelectorError::MissingValues { index: 0, .. })
        ));
        assert!(matches!(
            Selector::parse(&LabelSelector {
                match_expressions: Some(vec![expr("a", "Exists", &["v"])]),
                match_labels: None
            }),
            Err(SelectorError::UnexpectedValues { index: 0, .. })
        ));
    }

    #[test]
    fn equal_selectors_are_equal_whatever_the_order() {
        let a = sel(vec![expr("a", "In", &["2", "1"]), expr("b", "Exists", &[])]);
        let b = sel(vec![expr("b", "Exists", &[]), expr("a", "In", &["1", "2"])]);
        assert_eq!(a, b);
    }
}
