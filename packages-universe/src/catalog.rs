//! The packages a cluster can install: the bundled ones, then those of added repos, in the
//! order given. A name may have several versions (from different sources); without an
//! explicit version the newest is chosen, and for equal versions the earlier source wins.

use crate::Package;
use std::cmp::Ordering;

#[derive(Clone, Debug, Default)]
pub struct Catalog {
    packages: Vec<Package>,
}

/// Compares versions part by part (`7.0.15-1` < `7.2.0-1`, `10` > `9`): numeric parts as
/// numbers, others as text, a missing part first.
pub fn compare_versions(a: &str, b: &str) -> Ordering {
    let parts =
        |s: &str| -> Vec<String> { s.split(['.', '-', '+', '~']).map(str::to_string).collect() };
    let (pa, pb) = (parts(a), parts(b));
    for i in 0..pa.len().max(pb.len()) {
        let o = match (pa.get(i), pb.get(i)) {
            (Some(x), Some(y)) => match (x.parse::<u64>(), y.parse::<u64>()) {
                (Ok(m), Ok(n)) => m.cmp(&n),
                _ => x.cmp(y),
            },
            (Some(_), None) => Ordering::Greater,
            (None, Some(_)) => Ordering::Less,
            (None, None) => Ordering::Equal,
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

impl Catalog {
    pub fn new(packages: Vec<Package>) -> Catalog {
        Catalog { packages }
    }

    /// Adds packages after the ones already there (a repo).
    pub fn extend(&mut self, packages: impl IntoIterator<Item = Package>) {
        self.packages.extend(packages);
    }

    /// Every version of `name`, newest first.
    pub fn versions(&self, name: &str) -> Vec<&Package> {
        let mut v: Vec<&Package> = self
            .packages
            .iter()
            .filter(|p| p.meta.name == name)
            .collect();
        // Stable: equal versions keep source order.
        v.sort_by(|a, b| compare_versions(&b.meta.version, &a.meta.version));
        v
    }

    /// `name` at `version`, or its newest version.
    pub fn get(&self, name: &str, version: Option<&str>) -> Option<&Package> {
        let all = self.versions(name);
        match version {
            None => all.first().copied(),
            Some(v) => all.into_iter().find(|p| p.meta.version == v),
        }
    }

    /// The newest version of each package matching `q` (in name, description or tags,
    /// case-insensitive) and carrying `tag`, sorted by name.
    pub fn search(&self, q: &str, tag: Option<&str>) -> Vec<&Package> {
        let q = q.to_lowercase();
        let mut names: Vec<&str> = self
            .packages
            .iter()
            .filter(|p| {
                q.is_empty()
                    || p.meta.name.contains(&q)
                    || p.meta.description.to_lowercase().contains(&q)
                    || p.meta.tags.iter().any(|t| t.contains(&q))
            })
            .filter(|p| tag.is_none_or(|t| p.meta.tags.iter().any(|x| x == t)))
            .map(|p| p.meta.name.as_str())
            .collect();
        names.sort();
        names.dedup();
        names
            .into_iter()
            .filter_map(|n| self.get(n, None))
            .collect()
    }
}
