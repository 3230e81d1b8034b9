//! A Wing–Gong linearizability checker with Lowe's memoization, for a single register
//! (one key of the cluster variables). Keys are independent, so a history is checked key by
//! key (P-compositionality).

use std::collections::HashSet;

/// One operation on the register as a client saw it.
#[derive(Clone, Debug)]
pub struct Op {
    pub call: u64,
    /// `None`: the outcome is unknown (it may take effect at any time after `call`, or never).
    pub ret: Option<u64>,
    pub kind: Kind,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    Write(String),
    /// What the read returned (`None`: absent).
    Read(Option<String>),
}

/// Returns Ok if the history is linearizable, or Err with a description.
pub fn check(ops: &[Op]) -> Result<(), String> {
    let n = ops.len();
    let words = n.div_ceil(64);
    let mut remaining = vec![0u64; words];
    for i in 0..n {
        remaining[i / 64] |= 1 << (i % 64);
    }
    let mut seen: HashSet<(Vec<u64>, Option<String>)> = HashSet::new();
    if search(ops, &mut remaining, None, &mut seen) {
        Ok(())
    } else {
        Err(format!(
            "no linearization exists for {n} operations (explored {} states)",
            seen.len()
        ))
    }
}

fn search(
    ops: &[Op],
    remaining: &mut Vec<u64>,
    state: Option<String>,
    seen: &mut HashSet<(Vec<u64>, Option<String>)>,
) -> bool {
    let live: Vec<usize> = (0..ops.len())
        .filter(|i| remaining[i / 64] & (1 << (i % 64)) != 0)
        .collect();
    // Done when only operations with unknown outcome remain: they may never have happened.
    if live.iter().all(|&i| ops[i].ret.is_none()) {
        return true;
    }
    if !seen.insert((remaining.clone(), state.clone())) {
        return false;
    }
    // The next linearized op must have been called before every remaining op returned.
    let min_ret = live
        .iter()
        .filter_map(|&i| ops[i].ret)
        .min()
        .unwrap_or(u64::MAX);
    for &i in &live {
        let op = &ops[i];
        if op.call > min_ret {
            continue;
        }
        let next = match &op.kind {
            Kind::Write(v) => Some(v.clone()),
            Kind::Read(r) => {
                if *r != state {
                    continue;
                }
                state.clone()
            }
        };
        remaining[i / 64] &= !(1 << (i % 64));
        let ok = search(ops, remaining, next, seen);
        remaining[i / 64] |= 1 << (i % 64);
        if ok {
            return true;
        }
    }
    false
}
