//! Reading a Prometheus text exposition (an operator's `/metrics`, or
//! `volt_operator::metrics::Metrics::render` of an in-process one).

use std::collections::BTreeMap;

/// The samples of `metric` (`metric{...} v` or `metric v`) whose labels include all of
/// `labels`, as (line, value).
fn samples<'a>(
    exposition: &'a str,
    metric: &'a str,
    labels: &'a [(&'a str, &'a str)],
) -> impl Iterator<Item = (&'a str, f64)> + 'a {
    let (labelled, bare) = (format!("{metric}{{"), format!("{metric} "));
    exposition
        .lines()
        .filter(move |l| l.starts_with(&labelled) || l.starts_with(&bare))
        .filter(move |l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| Some((l, l.rsplit(' ').next()?.parse::<f64>().ok()?)))
}

/// The sum of the samples of `metric`.
pub fn metric_sum(exposition: &str, metric: &str) -> f64 {
    metric_sum_where(exposition, metric, &[])
}

/// The sum of the samples of `metric` whose labels include all of `labels`.
pub fn metric_sum_where(exposition: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    samples(exposition, metric, labels).map(|(_, v)| v).sum()
}

/// The samples of `metric` summed by the value of its label `label` (`?` where it has none).
pub fn metric_by_label(exposition: &str, metric: &str, label: &str) -> BTreeMap<String, f64> {
    let key = format!("{label}=\"");
    let mut out = BTreeMap::new();
    for (line, v) in samples(exposition, metric, &[]) {
        let value = line.split(key.as_str()).nth(1).and_then(|r| r.split('"').next()).unwrap_or("?");
        *out.entry(value.to_string()).or_default() += v;
    }
    out
}
